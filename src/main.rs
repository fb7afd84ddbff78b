//! The `paygate` binary: parse the command line, then hand over to the library.
//! Exit codes: 0 success, 1 runtime or configuration failure, 2 usage error; `audit verify`
//! exits 3 for a log that verifies except for acknowledged (sealed) breaks.

use std::io::BufRead;
use std::process::ExitCode;

use paygate::cli::{self, CommandName, Invocation};
use paygate::config::{ServeConfig, Sources};
use paygate::domain::{check_password, Role, Username};
use paygate::logging::LogFormat;
use paygate::store::postgres::PgStore;
use paygate::store::sealing::TotpKeys;
use paygate::store::{NewUser, SqliteStore, StoreError, UserInsert};
use paygate::tokens::keys;

type Failure = Box<dyn std::error::Error>;

fn main() -> ExitCode {
    let invocation = match cli::parse(std::env::args().skip(1)) {
        Ok(invocation) => invocation,
        Err(usage) => {
            eprintln!("paygate: {usage}");
            return ExitCode::from(2);
        }
    };
    let format = match &invocation {
        Invocation::Run { options, .. } => {
            let env = |name: &str| std::env::var(name).ok();
            let format = Sources::new(options, &env).string("log-format");
            LogFormat::parse(format.as_deref().unwrap_or("text"))
        }
        _ => Ok(LogFormat::Text),
    };
    match format {
        Ok(format) => paygate::logging::init(format),
        Err(usage) => {
            eprintln!("paygate: {usage}");
            return ExitCode::from(2);
        }
    }
    let result: Result<ExitCode, Failure> = match invocation {
        Invocation::Help(text) => {
            print!("{text}");
            Ok(ExitCode::SUCCESS)
        }
        Invocation::Version => {
            println!("paygate {}", env!("CARGO_PKG_VERSION"));
            Ok(ExitCode::SUCCESS)
        }
        Invocation::Run {
            command,
            positional,
            options,
        } => {
            let env = |name: &str| std::env::var(name).ok();
            let sources = Sources::new(&options, &env);
            let done = |result: Result<(), Failure>| result.map(|()| ExitCode::SUCCESS);
            match command {
                CommandName::Serve => done(serve(&sources, &positional)),
                CommandName::DevCert => done(dev_cert(&sources, &positional)),
                CommandName::UserAdd => done(user_add(&sources, &positional)),
                CommandName::UserDisable => done(user_disable(&sources, &positional)),
                CommandName::KeysRotate => done(keys_rotate(&sources, &positional)),
                CommandName::KeysPrune => done(keys_prune(&sources, &positional)),
                CommandName::KeysExport => done(keys_export(&sources, &positional)),
                CommandName::KeysRotateTotp => done(keys_rotate_totp(&sources, &positional)),
                CommandName::AuditVerify => audit_verify(&sources, &positional),
                CommandName::AuditSeal => done(audit_seal(&sources, &positional)),
                CommandName::AuditPublicKey => done(audit_public_key(&sources, &positional)),
                CommandName::MigrateStore => done(migrate_store(&sources, &positional)),
            }
        }
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("paygate: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn no_positional(positional: &[String]) -> Result<(), Failure> {
    match positional.first() {
        None => Ok(()),
        Some(extra) => Err(format!("unexpected argument `{extra}`").into()),
    }
}

fn serve(sources: &Sources<'_>, positional: &[String]) -> Result<(), Failure> {
    no_positional(positional)?;
    let config = ServeConfig::resolve(sources)?;
    if config.workers > 1 {
        // Everything after `serve`; the supervisor adds what makes each one a worker.
        let args: Vec<String> = std::env::args().skip(2).collect();
        return paygate::supervisor::run(args, &config);
    }
    paygate::worker::run(config)
}

fn dev_cert(sources: &Sources<'_>, positional: &[String]) -> Result<(), Failure> {
    no_positional(positional)?;
    let files = sources.tls_files();
    paygate::tls::write_dev_certificate(&files, sources.flag("force"))?;
    println!(
        "wrote a self-signed development certificate for localhost and 127.0.0.1, valid {} days:\n  certificate {}\n  key         {} (mode 0600)",
        paygate::tls::DEV_CERT_DAYS,
        files.cert.display(),
        files.key.display()
    );
    Ok(())
}

fn user_add(sources: &Sources<'_>, positional: &[String]) -> Result<(), Failure> {
    let [name] = positional else {
        return Err("`paygate user add` takes exactly one user name".into());
    };
    let username = Username::parse("username", name).map_err(|e| format!("user name {e}"))?;
    let role = match sources.string("role") {
        None => None,
        Some(raw) => Some(
            Role::parse(&raw).ok_or_else(|| format!("--role `{raw}`: must be admin or auditor"))?,
        ),
    };
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    // Only the line ending is removed: the password is otherwise taken exactly as typed.
    let password = line
        .strip_suffix('\n')
        .map(|l| l.strip_suffix('\r').unwrap_or(l))
        .unwrap_or(&line);
    check_password(&username, password).map_err(|e| format!("{e} (read from stdin)"))?;
    let password_hash = paygate::passwords::hash_blocking(password)?;
    let new = NewUser {
        username,
        password_hash,
        role,
    };
    let inserted = match Shared::open(sources, Sealing::LoadOrCreate)? {
        Some(shared) => shared.run(shared.store.create_user(new.clone()))?,
        None => SqliteStore::open(&sources.data_dir())?.create_user_blocking(&new)?,
    };
    match inserted {
        UserInsert::Created(user) => {
            println!(
                "created user {}{}",
                user.username,
                role.map(|r| format!(" with role {}", r.as_str()))
                    .unwrap_or_default()
            );
            Ok(())
        }
        UserInsert::UsernameTaken => Err(format!("user {} already exists", new.username).into()),
    }
}

fn user_disable(sources: &Sources<'_>, positional: &[String]) -> Result<(), Failure> {
    let [name] = positional else {
        return Err("`paygate user disable` takes exactly one user name".into());
    };
    let disabled = match Shared::open(sources, Sealing::LoadOrCreate)? {
        Some(shared) => shared.run(shared.store.disable_user(name.clone()))?,
        None => SqliteStore::open(&sources.data_dir())?.disable_user_blocking(name)?,
    };
    if disabled {
        println!("disabled user {name}; their sessions and tokens no longer work");
        Ok(())
    } else {
        Err(format!("no user is named {name:?}").into())
    }
}

/// Where the sealing key comes from for a command on the shared database.
enum Sealing {
    /// The data directory's, created if missing (as the first node does): for commands
    /// that seal nothing.
    LoadOrCreate,
    /// The data directory's, which must exist: for commands that seal what running nodes
    /// must open, where a fresh key would lock them out.
    Load,
}

/// The PostgreSQL database `--database` names, for the commands that change users and keys
/// of every node at once.
struct Shared {
    runtime: tokio::runtime::Runtime,
    store: PgStore,
}

impl Shared {
    /// `None` when no database is configured (SQLite in the data directory).
    fn open(sources: &Sources<'_>, sealing: Sealing) -> Result<Option<Shared>, Failure> {
        let Some(url) = sources.database()? else {
            return Ok(None);
        };
        let dir = sources.data_dir();
        let keys = match sealing {
            Sealing::LoadOrCreate => {
                paygate::store::ensure_data_dir(&dir)?;
                TotpKeys::load_or_create(&dir)?
            }
            Sealing::Load => TotpKeys::load(&dir)?,
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let store = runtime.block_on(PgStore::open(
            &url,
            2,
            std::sync::Arc::new(keys),
            paygate::time::Clock::system(),
        ))?;
        log::info!("PostgreSQL at {}", url.describe());
        Ok(Some(Shared { runtime, store }))
    }

    fn run<T, E>(&self, work: impl std::future::Future<Output = Result<T, E>>) -> Result<T, E> {
        self.runtime.block_on(work)
    }
}

fn now_s() -> i64 {
    paygate::time::now_millis() / 1000
}

fn keys_rotate(sources: &Sources<'_>, positional: &[String]) -> Result<(), Failure> {
    no_positional(positional)?;
    if let Some(shared) = Shared::open(sources, Sealing::Load)? {
        let now = now_s();
        let set = shared.run(keys::rotate_shared(&shared.store, now))?;
        println!(
            "new current signing key {}; {} key(s) in the database; every node switches \
             within a second",
            set.current().kid,
            set.all().len()
        );
        return Ok(());
    }
    let dir = sources.data_dir();
    paygate::store::ensure_data_dir(&dir)?;
    let now = now_s();
    let (set, ()) = keys::update(&dir, now, |set| {
        Ok((set.rotated(&ring::rand::SystemRandom::new(), now)?, ()))
    })?;
    println!(
        "new current signing key {}; {} key(s) in {}; running workers switch within a second",
        set.current().kid,
        set.all().len(),
        dir.join(keys::KEYS_FILE).display()
    );
    Ok(())
}

fn keys_prune(sources: &Sources<'_>, positional: &[String]) -> Result<(), Failure> {
    no_positional(positional)?;
    let dir = sources.data_dir();
    paygate::store::ensure_data_dir(&dir)?;
    let ttl = sources.token_ttl()?;
    let now = now_s();
    let (left, removed) = match Shared::open(sources, Sealing::Load)? {
        Some(shared) => shared.run(async {
            let removed = shared
                .store
                .prune_jwt_keys(now - ttl - keys::PRUNE_MARGIN_S + 1)
                .await?;
            Ok::<_, StoreError>((shared.store.jwt_keys().await?.len(), removed))
        })?,
        None => {
            let (set, removed) = keys::update(&dir, now, |set| Ok(set.pruned(now, ttl)))?;
            (set.all().len(), removed)
        }
    };
    if removed.is_empty() {
        println!(
            "no key to prune: every retired key may still have live tokens (token ttl {ttl} s)"
        );
    } else {
        println!(
            "pruned {} key(s): {}; {} key(s) left",
            removed.len(),
            removed.join(", "),
            left
        );
    }
    Ok(())
}

fn keys_rotate_totp(sources: &Sources<'_>, positional: &[String]) -> Result<(), Failure> {
    no_positional(positional)?;
    let dir = sources.data_dir();
    if let Some(shared) = Shared::open(sources, Sealing::Load)? {
        return rotate_cluster_sealing_key(&shared, &dir);
    }
    let store = SqliteStore::open(&dir)?;
    let (id, resealed) = store.run_blocking(|conn| paygate::store::sealing::rotate(&dir, conn))?;
    println!(
        "new TOTP sealing key {id:08x}; {resealed} user(s) re-sealed; the previous key stays \
         in {} until the next rotation",
        dir.join(paygate::store::sealing::TOTP_KEY_FILE).display()
    );
    Ok(())
}

/// `keys rotate-totp` on a shared database, in two runs: the first stages a new key in
/// this machine's `totp.key`, to be copied to every node; the second, once every running
/// node reports holding it, re-seals everything under it and makes it current.
fn rotate_cluster_sealing_key(shared: &Shared, dir: &std::path::Path) -> Result<(), Failure> {
    use paygate::store::sealing;
    let path = dir.join(sealing::TOTP_KEY_FILE);
    let keys = TotpKeys::load(dir)?;
    let held = shared.run(shared.store.sealing_keys_held())?;
    let Some(staged) = keys.staged() else {
        // Step 1: only when every running node seals with this machine's current key (the
        // last rotation's file reached them all), or a node would keep sealing with a key
        // the next promotion drops.
        let current = format!("{:08x}", keys.current().unwrap_or_default());
        let behind: Vec<String> = held
            .iter()
            .filter(|(_, ids)| ids.split(' ').next() != Some(current.as_str()))
            .map(|(node, ids)| {
                let theirs = ids.split(' ').next().unwrap_or("none");
                format!("node {node} seals with key {theirs}")
            })
            .collect();
        if !behind.is_empty() {
            return Err(format!(
                "not staging a new sealing key: {}, this machine's current key is {current}. \
                 Copy {} to every node first (the file of the last rotation)",
                behind.join(", "),
                path.display()
            )
            .into());
        }
        let id = sealing::stage(dir)?;
        println!(
            "staged sealing key {id:08x} in {}. Copy that file to every node's data \
             directory (mode 0600; running nodes read it within a second), then run \
             `paygate keys rotate-totp` here again: it re-seals the database under the new \
             key once every running node holds it.",
            path.display()
        );
        return Ok(());
    };
    // Step 2: every running node must hold the staged key before anything is sealed
    // under it.
    let wanted = format!("{staged:08x}");
    let lacking: Vec<String> = held
        .iter()
        .filter(|(_, ids)| !ids.split(' ').any(|id| id == wanted))
        .map(|(node, _)| format!("node {node} does not hold the staged key {wanted}"))
        .collect();
    if !lacking.is_empty() {
        return Err(format!(
            "not re-sealing yet: {}. Copy {} to those nodes (running nodes read it within a \
             second) and run this again",
            lacking.join("; "),
            path.display()
        )
        .into());
    }
    if held.is_empty() {
        log::warn!(
            "no node is running: nodes started later need the new {} before they start",
            path.display()
        );
    }
    let (users, jwt_keys) = shared.run(shared.store.reseal_all(staged))?;
    sealing::promote(dir)?;
    println!(
        "re-sealed {users} user(s) and {jwt_keys} JWT signing key(s) under sealing key \
         {wanted}, now the current key in {}; the previous key is kept there until the next \
         rotation. Copy that file to every node again, so that they seal new secrets with \
         the new key (the next rotation waits for it).",
        path.display()
    );
    Ok(())
}

fn audit_public_key(sources: &Sources<'_>, positional: &[String]) -> Result<(), Failure> {
    no_positional(positional)?;
    let dir = sources.data_dir();
    paygate::store::ensure_data_dir(&dir)?;
    let key = paygate::audit::signing::SigningKey::load_or_create(&dir)?;
    println!("{}", key.public_key());
    Ok(())
}

fn keys_export(sources: &Sources<'_>, positional: &[String]) -> Result<(), Failure> {
    no_positional(positional)?;
    let set = match Shared::open(sources, Sealing::Load)? {
        Some(shared) => keys::KeySet::from_rows(shared.run(shared.store.jwt_keys())?)?,
        None => {
            let dir = sources.data_dir();
            paygate::store::ensure_data_dir(&dir)?;
            keys::load_or_create(&dir, now_s())?
        }
    };
    println!("{}", serde_json::to_string_pretty(&set.jwks())?);
    Ok(())
}

fn audit_verify(sources: &Sources<'_>, positional: &[String]) -> Result<ExitCode, Failure> {
    if let Some(archive) = paygate::config::archive_to_verify(sources)? {
        no_positional(positional)?;
        return audit_verify_archive(sources, &archive);
    }
    let dir = match positional {
        [] => sources.data_dir().join(paygate::audit::AUDIT_DIR),
        [dir] => std::path::PathBuf::from(dir),
        _ => return Err("`paygate audit verify` takes at most one directory".into()),
    };
    if !dir.is_dir() {
        return Err(format!("{} is not an audit directory", dir.display()).into());
    }
    let data_dir = dir
        .canonicalize()?
        .parent()
        .map(std::path::Path::to_path_buf)
        .unwrap_or_default();
    let key = paygate::audit::load_key(&data_dir.join(paygate::audit::KEY_FILE))?;
    match paygate::audit::verify::verify_dir(&dir, &key) {
        Ok(report) if report.breaks.is_empty() => {
            println!(
                "audit log OK: {} records in {} file(s), {} chain(s) verified",
                report.records, report.files, report.chains
            );
            Ok(ExitCode::SUCCESS)
        }
        Ok(report) => {
            println!(
                "audit log verified WITH {} ACKNOWLEDGED BREAK(S): {} records in {} file(s), \
                 {} chain(s); records between each break's damage and its seal are not \
                 vouched for:",
                report.breaks.len(),
                report.records,
                report.files,
                report.chains
            );
            for sealed in &report.breaks {
                println!("  break: {sealed}");
            }
            Ok(ExitCode::from(3))
        }
        Err(broken) => Err(format!("audit log BROKEN: {broken}").into()),
    }
}

/// `paygate audit verify --archive`: the archive checked with public keys, and with the
/// audit keys when given.
fn audit_verify_archive(
    sources: &Sources<'_>,
    archive: &paygate::config::ArchiveSettings,
) -> Result<ExitCode, Failure> {
    let mut trusted = Vec::new();
    for value in sources.list("public-key").unwrap_or_default() {
        if value.starts_with("ed25519:") {
            trusted.push(value);
            continue;
        }
        let text = std::fs::read_to_string(&value)
            .map_err(|e| format!("--public-key: `{value}` is neither a key nor a file: {e}"))?;
        trusted.extend(
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(str::to_owned),
        );
    }
    if trusted.is_empty() {
        return Err(
            "`paygate audit verify --archive` needs --public-key: the nodes' \
                    audit signing public keys (`paygate audit public-key` on each node)"
                .into(),
        );
    }
    let audit_keys = sources
        .list("audit-key")
        .unwrap_or_default()
        .iter()
        .map(|path| paygate::audit::load_key(std::path::Path::new(path)))
        .collect::<Result<Vec<_>, _>>()?;
    let save = sources.string("save").map(std::path::PathBuf::from);
    let bucket = archive.bucket()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let report = runtime.block_on(paygate::audit::verify_archive::verify_archive(
        &bucket,
        &archive.prefix,
        &trusted,
        &audit_keys,
        save.as_deref(),
    ))?;
    if report.chains.is_empty() && report.problems.is_empty() {
        return Err(format!(
            "no audit chain under s3://{}/{}: check --archive (the nodes' --audit-archive)",
            archive.bucket, archive.prefix
        )
        .into());
    }
    for chain in &report.chains {
        let covered = chain.covered.as_ref().map_or_else(
            || "no verified digest".to_owned(),
            |(from, to)| format!("{from} to {to}"),
        );
        let records = match chain.records_checked {
            _ if chain.segments == 0 => "no record yet".to_owned(),
            Some(n) => format!("{n} records verified with the audit key"),
            None if audit_keys.is_empty() => {
                format!(
                    "records 1 to {} (not checked without --audit-key)",
                    chain.last_seq
                )
            }
            None => format!("records 1 to {} (not checked: see below)", chain.last_seq),
        };
        println!(
            "chain {}: {} digest(s) covering {covered}; {} segment(s); {records}",
            chain.chain, chain.digests, chain.segments
        );
        for sealed in &chain.breaks {
            println!("  acknowledged break: {sealed}");
        }
        for key in &chain.pending {
            println!("  not covered by a digest yet (archived after the newest): {key}");
        }
    }
    if !report.problems.is_empty() {
        println!(
            "audit archive NOT OK: {} problem(s):",
            report.problems.len()
        );
        for problem in &report.problems {
            println!("  {problem}");
        }
        return Ok(ExitCode::FAILURE);
    }
    if report.chains.iter().any(|c| !c.breaks.is_empty()) {
        println!("audit archive verified WITH ACKNOWLEDGED BREAK(S), listed above");
        return Ok(ExitCode::from(3));
    }
    println!(
        "audit archive OK: {} chain(s), {} digest(s), {} segment(s)",
        report.chains.len(),
        report.chains.iter().map(|c| c.digests).sum::<usize>(),
        report.chains.iter().map(|c| c.segments).sum::<usize>()
    );
    Ok(ExitCode::SUCCESS)
}

fn audit_seal(sources: &Sources<'_>, positional: &[String]) -> Result<(), Failure> {
    no_positional(positional)?;
    let Some(reason) = sources.string("reason") else {
        return Err(
            "`paygate audit seal` needs --reason TEXT: say why the damaged log is \
                    continued; it is written into the break record"
                .into(),
        );
    };
    let instance = sources.string("instance");
    let outcomes =
        paygate::audit::seal::seal_damaged(&sources.data_dir(), instance.as_deref(), &reason)?;
    for outcome in outcomes {
        match outcome {
            paygate::audit::seal::Sealed::Intact { instance } => {
                println!("chain {instance}: verifies up to its checkpoint; nothing to seal")
            }
            paygate::audit::seal::Sealed::Authenticated { instance, records } => println!(
                "chain {instance}: its checkpoint had no MAC (written before checkpoints \
                 carried one); all {records} records verify against it, so it is now \
                 authenticated — no break recorded"
            ),
            paygate::audit::seal::Sealed::Sealed {
                instance,
                file,
                found,
                after_seq,
            } => println!(
                "chain {instance}: SEALED after record {after_seq}; {} begins with a break \
                 record stating: {found}",
                file.display()
            ),
        }
    }
    Ok(())
}

fn migrate_store(sources: &Sources<'_>, positional: &[String]) -> Result<(), Failure> {
    no_positional(positional)?;
    let from = sources
        .string("from")
        .ok_or("`paygate migrate-store` needs --from sqlite:DIR, the data directory to copy")?;
    let dir = std::path::PathBuf::from(from.strip_prefix("sqlite:").unwrap_or(&from));
    let to = sources
        .string("to")
        .ok_or("`paygate migrate-store` needs --to URL, the PostgreSQL database to fill")?;
    if !paygate::store::postgres::is_postgres(&to) {
        return Err("--to: expected a postgres:// URL or a key=value connection string".into());
    }
    let url = paygate::store::postgres::DatabaseUrl::parse(&to)
        .map_err(|e| e.replacen("--database", "--to", 1))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    // The signing keys of a single machine are a file of its data directory.
    let keys_file = dir.join(keys::KEYS_FILE);
    let jwt_keys = if keys_file.exists() {
        keys::load(&keys_file)?.rows()
    } else {
        Vec::new()
    };
    let copied = runtime.block_on(paygate::store::postgres::import_sqlite(
        &dir, &jwt_keys, &url,
    ))?;
    println!("copied {} into {}:", dir.display(), url.describe());
    for table in &copied {
        println!(
            "  {:<17} {:>9} rows (SQLite {})",
            table.table, table.postgres, table.sqlite
        );
    }
    println!(
        "every count matches. Give every node a copy of {} (mode 0600): it seals the TOTP \
         secrets and signing keys now in the database.",
        dir.join(paygate::store::sealing::TOTP_KEY_FILE).display()
    );
    Ok(())
}
