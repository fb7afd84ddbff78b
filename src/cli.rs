//! Command-line parsing, step one of configuration: turn `argv` into a [`Invocation`]
//! holding the command and the raw option values, with no I/O and no validation.
//!
//! Every option is declared once in [`OPTIONS`]; the parser, the environment lookup in
//! `config` and the `--help` text are all driven by that table, so they cannot drift apart.
//! Turning raw strings into typed, checked values is `config`'s job.

use std::collections::BTreeMap;
use std::fmt;

/// One option: its flag, environment variable, default and help line.
#[derive(Debug)]
pub struct OptionSpec {
    /// Long flag without the leading dashes, e.g. `listen`.
    pub name: &'static str,
    /// Environment variable consulted when the flag is absent.
    pub env: Option<&'static str>,
    /// Placeholder shown in help, e.g. `ADDR`; empty for switches that take no value.
    pub value: &'static str,
    /// Default shown in help (the typed default lives in `config`).
    pub default: &'static str,
    pub help: &'static str,
    /// The commands that accept this option.
    pub commands: &'static [CommandName],
    /// Set by paygate itself (the supervisor on its workers), never by a person: accepted,
    /// but not shown in help.
    pub internal: bool,
    /// For options that may be given several times: the separator of the values in the
    /// environment variable.
    pub list_separator: Option<char>,
}

/// The subcommands paygate knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommandName {
    Serve,
    DevCert,
    UserAdd,
    UserDisable,
    KeysRotate,
    KeysPrune,
    KeysExport,
    KeysRotateTotp,
    AuditVerify,
    AuditSeal,
    AuditPublicKey,
    MigrateStore,
}

impl CommandName {
    /// The positional arguments the command takes: at least, at most, and what they are.
    fn arity(self) -> (usize, usize, &'static str) {
        match self {
            CommandName::UserAdd | CommandName::UserDisable => (1, 1, "exactly one user name"),
            CommandName::AuditVerify => (0, 1, "at most one directory"),
            _ => (0, 0, "no arguments"),
        }
    }

    fn usage(self) -> &'static str {
        match self {
            CommandName::Serve => "paygate serve [OPTIONS]",
            CommandName::DevCert => "paygate dev-cert [OPTIONS]",
            CommandName::UserAdd => "paygate user add NAME [OPTIONS]   (password read from stdin)",
            CommandName::UserDisable => "paygate user disable NAME [OPTIONS]",
            CommandName::KeysRotate => "paygate keys rotate [OPTIONS]",
            CommandName::KeysPrune => "paygate keys prune [OPTIONS]",
            CommandName::KeysExport => "paygate keys export [OPTIONS]",
            CommandName::KeysRotateTotp => "paygate keys rotate-totp [OPTIONS]",
            CommandName::AuditVerify => "paygate audit verify [DIR] [OPTIONS]",
            CommandName::AuditSeal => "paygate audit seal --reason TEXT [OPTIONS]",
            CommandName::AuditPublicKey => "paygate audit public-key [OPTIONS]",
            CommandName::MigrateStore => {
                "paygate migrate-store --from sqlite:DIR --to postgres://USER@HOST/DATABASE"
            }
        }
    }

    fn about(self) -> &'static str {
        match self {
            CommandName::Serve => "Run the HTTPS payments API server.",
            CommandName::DevCert => {
                "Write a self-signed development certificate for localhost and 127.0.0.1 \
                 (90 days) to the configured certificate and key paths."
            }
            CommandName::UserAdd => {
                "Create a user. The password is read from the first line of standard input \
                 and must meet the same rules as registration over the API."
            }
            CommandName::UserDisable => {
                "Disable a user: their password, sessions and tokens stop working at once, in \
                 every worker."
            }
            CommandName::KeysRotate => {
                "Add a new current JWT signing key. Older keys keep verifying the tokens they \
                 signed; running workers switch to the new key within a second."
            }
            CommandName::KeysPrune => {
                "Delete retired JWT signing keys whose tokens have all expired (retired more \
                 than --token-ttl + 120 s ago). The current key is never deleted."
            }
            CommandName::AuditVerify => {
                "Check every audit chain in DIR (default: the audit directory of --data-dir) \
                 with the audit key of its data directory (DIR/../audit.key). Exits 0 and \
                 prints the number of records checked; exits 3 when the log verifies except \
                 for breaks an operator acknowledged with `audit seal`, listing each; exits 1 \
                 naming the first bad file and line and why. With --archive, checks the \
                 archive instead, with public keys (and optionally audit keys): exits 0, 3 \
                 or 1 the same way, naming every deleted, replaced or added object, missing \
                 digest and segment left out of the digests."
            }
            CommandName::AuditSeal => {
                "Acknowledge a damaged audit log so that workers can start again: for every \
                 chain that does not verify up to its checkpoint (or only the one named by \
                 --instance), start a new file whose first record chains from the last record \
                 that verifies and states what was found, the reason given and when. The \
                 damaged files stay as they are, as evidence. Stop every worker on the data \
                 directory first. From then on `audit verify` reports the break (exit 3)."
            }
            CommandName::AuditPublicKey => {
                "Print this node's audit signing public key (`ed25519:…`), creating the \
                 key (audit-signing.key, mode 0600) if the data directory has none. Digests \
                 of archived audit segments are signed with it; give it to auditors, who \
                 verify the archive with public keys only."
            }
            CommandName::KeysRotateTotp => {
                "Add a new key for sealing TOTP secrets (totp.key) and re-seal every secret \
                 under it. The key before it stays in the file until the next rotation (run \
                 it twice to retire a key entirely); running workers pick the new one up. With \
                 --database (a shared PostgreSQL), it takes two runs: the first stages a new \
                 key in this data directory's totp.key, to be copied to every node; the \
                 second, once every running node holds it, re-seals the database under it \
                 and makes it current (copy the file to every node again)."
            }
            CommandName::MigrateStore => {
                "Copy a single machine's data (the SQLite databases and the JWT signing keys \
                 of its data directory) into a new, empty PostgreSQL database, in one \
                 transaction, keeping every id, and check that every table's count matches. \
                 Stop the server first; then give every node the data directory's totp.key."
            }
            CommandName::KeysExport => {
                "Print every JWT signing key as a JSON Web Key Set, current key first, so other \
                 services can verify paygate's tokens. The output is SECRET: anyone holding it \
                 can mint tokens for any user."
            }
        }
    }
}

use CommandName::{
    AuditPublicKey, AuditSeal, AuditVerify, DevCert, KeysExport, KeysPrune, KeysRotate,
    KeysRotateTotp, MigrateStore, Serve, UserAdd, UserDisable,
};

/// Every option paygate accepts. Order is the order of `--help`.
pub const OPTIONS: &[OptionSpec] = &[
    OptionSpec {
        name: "listen",
        env: Some("PAYGATE_LISTEN"),
        value: "ADDR",
        default: "127.0.0.1:8443",
        help: "Address and port to listen on.",
        internal: false,
        commands: &[Serve],
        list_separator: None,
    },
    OptionSpec {
        name: "data-dir",
        env: Some("PAYGATE_DATA_DIR"),
        value: "DIR",
        default: "./data",
        help: "Directory for the SQLite databases and keys; created if missing, must be writable.",
        internal: false,
        commands: &[
            Serve,
            DevCert,
            UserAdd,
            UserDisable,
            KeysRotate,
            KeysPrune,
            KeysExport,
            KeysRotateTotp,
            AuditVerify,
            AuditSeal,
            AuditPublicKey,
        ],
        list_separator: None,
    },
    OptionSpec {
        name: "tls-cert",
        env: Some("PAYGATE_TLS_CERT"),
        value: "FILE",
        default: "certs/server.crt",
        help: "PEM certificate chain. When this and --tls-key are left at their defaults and \
               both files are missing, `serve` generates a development certificate there.",
        internal: false,
        commands: &[Serve, DevCert],
        list_separator: None,
    },
    OptionSpec {
        name: "tls-key",
        env: Some("PAYGATE_TLS_KEY"),
        value: "FILE",
        default: "certs/server.key",
        help: "PEM private key (PKCS#8, PKCS#1 or SEC1).",
        internal: false,
        commands: &[Serve, DevCert],
        list_separator: None,
    },
    OptionSpec {
        name: "database",
        env: Some("PAYGATE_DATABASE"),
        value: "URL",
        default: "SQLite in --data-dir",
        help: "PostgreSQL shared by several nodes: a postgres:// URL or a key=value string \
               (several hosts with target_session_attrs=read-write; sslmode=verify-full with \
               sslrootcert=FILE for TLS that checks the server). Unset: SQLite, one machine.",
        internal: false,
        commands: &[
            Serve,
            UserAdd,
            UserDisable,
            KeysRotate,
            KeysPrune,
            KeysExport,
            KeysRotateTotp,
        ],
        list_separator: None,
    },
    OptionSpec {
        name: "database-pool-size",
        env: Some("PAYGATE_DATABASE_POOL_SIZE"),
        value: "N",
        default: "16",
        help: "PostgreSQL connections each worker process keeps at most.",
        internal: false,
        commands: &[Serve],
        list_separator: None,
    },
    OptionSpec {
        name: "log-format",
        env: Some("PAYGATE_LOG_FORMAT"),
        value: "FORMAT",
        default: "text",
        help: "The operational log on stderr: `text` for people, `json` (one object per line) \
               for a log pipeline. Under systemd, each line carries its journald priority.",
        internal: false,
        commands: &[Serve],
        list_separator: None,
    },
    OptionSpec {
        name: "workers",
        env: Some("PAYGATE_WORKERS"),
        value: "N",
        default: "number of CPUs",
        help: "Worker processes. 1 serves in this process; more start a supervisor that runs \
               them on one port (SO_REUSEPORT), restarts crashed ones and forwards signals.",
        internal: false,
        commands: &[Serve],
        list_separator: None,
    },
    OptionSpec {
        name: "shutdown-timeout",
        env: Some("PAYGATE_SHUTDOWN_TIMEOUT"),
        value: "SECS",
        default: "30",
        help: "On SIGTERM/SIGINT, how long in-flight requests may take to finish.",
        internal: false,
        commands: &[Serve],
        list_separator: None,
    },
    OptionSpec {
        name: "max-body",
        env: Some("PAYGATE_MAX_BODY"),
        value: "BYTES",
        default: "16384",
        help: "Largest request body accepted; larger bodies get 413 while still being read.",
        internal: false,
        commands: &[Serve],
        list_separator: None,
    },
    OptionSpec {
        name: "max-connections",
        env: Some("PAYGATE_MAX_CONNECTIONS"),
        value: "N",
        default: "1024",
        help: "Concurrent client connections; further connections wait in the kernel backlog.",
        internal: false,
        commands: &[Serve],
        list_separator: None,
    },
    OptionSpec {
        name: "max-connections-per-client",
        env: Some("PAYGATE_MAX_CONNECTIONS_PER_CLIENT"),
        value: "N",
        default: "32",
        help: "Concurrent connections from one client address (IPv6: one /64) per worker; \
               more are closed at once. Trusted proxies are exempt.",
        internal: false,
        commands: &[Serve],
        list_separator: None,
    },
    OptionSpec {
        name: "client-timeout",
        env: Some("PAYGATE_CLIENT_TIMEOUT"),
        value: "SECS",
        default: "10",
        help: "Deadline for each client phase: TLS handshake, first request, request headers, \
               request body. Slow clients are dropped.",
        internal: false,
        commands: &[Serve],
        list_separator: None,
    },
    OptionSpec {
        name: "rate-limit",
        env: Some("PAYGATE_RATE_LIMITS"),
        value: "RULE",
        default: "the rules listed in docs/operating.md",
        help: "Rate-limit rule `METHOD PATH-PREFIX RATE/UNIT burst=N key=ip|user|global \
               [delay=MS]`; repeat for several, first match wins. In the environment, \
               separate rules with `;`. `none` disables rule-based limits.",
        internal: false,
        commands: &[Serve],
        list_separator: Some(';'),
    },
    OptionSpec {
        name: "trusted-proxy",
        env: Some("PAYGATE_TRUSTED_PROXIES"),
        value: "CIDR",
        default: "none: the client is the TCP peer",
        help: "A proxy whose X-Forwarded-For is believed; repeat for several. In the \
               environment, separate ranges with `,`.",
        internal: false,
        commands: &[Serve],
        list_separator: Some(','),
    },
    OptionSpec {
        name: "password-check-limit",
        env: Some("PAYGATE_PASSWORD_CHECK_LIMIT"),
        value: "LIMIT",
        default: "60/min burst=30",
        help: "Password checks (Argon2id hashes) allowed per client address, on any route, \
               as `RATE/UNIT burst=N`; while spent, requests with a password answer 429 \
               without hashing. `none` disables it.",
        internal: false,
        commands: &[Serve],
        list_separator: None,
    },
    OptionSpec {
        name: "password-queue",
        env: Some("PAYGATE_PASSWORD_QUEUE"),
        value: "N",
        default: "32",
        help: "Password checks that may wait for a hashing slot in each worker; one more is \
               refused at once with 503 and Retry-After.",
        internal: false,
        commands: &[Serve],
        list_separator: None,
    },
    OptionSpec {
        name: "guess-limit",
        env: Some("PAYGATE_GUESS_LIMIT"),
        value: "LIMIT",
        default: "10/15min burst=10",
        help: "Failed password checks allowed per username across all addresses, as \
               `RATE/UNIT burst=N`; while spent, password checks for it answer 429. \
               `none` disables it.",
        internal: false,
        commands: &[Serve],
        list_separator: None,
    },
    OptionSpec {
        name: "token-format",
        env: Some("PAYGATE_TOKEN_FORMAT"),
        value: "opaque|jwt",
        default: "jwt",
        help: "What POST /sessions issues: a signed JWT or a random opaque token stored (hashed) \
               in the database. Both kinds are always accepted.",
        internal: false,
        commands: &[Serve],
        list_separator: None,
    },
    OptionSpec {
        name: "token-ttl",
        env: Some("PAYGATE_TOKEN_TTL"),
        value: "SECS",
        default: "3600",
        help: "Lifetime of issued tokens, at most 86400; JWTs claiming a longer lifetime are \
               refused. `keys prune` uses it to know when a retired key's tokens are gone.",
        internal: false,
        commands: &[Serve, KeysPrune],
        list_separator: None,
    },
    OptionSpec {
        name: "step-up-amount",
        env: Some("PAYGATE_STEP_UP_AMOUNT"),
        value: "MINOR",
        default: "off",
        help: "Payments above this amount (in minor units) need a token obtained with a TOTP \
               code (amr includes otp).",
        internal: false,
        commands: &[Serve],
        list_separator: None,
    },
    OptionSpec {
        name: "capability-max-ttl",
        env: Some("PAYGATE_CAPABILITY_MAX_TTL"),
        value: "SECS",
        default: "86400",
        help: "Longest `expires_in` a capability may be minted or derived with.",
        internal: false,
        commands: &[Serve],
        list_separator: None,
    },
    OptionSpec {
        name: "instance",
        env: Some("PAYGATE_INSTANCE"),
        value: "NAME",
        default: "the first free number",
        help: "This worker's name in the audit log: its chain is audit/NAME/. Every process \
               on a data directory needs its own (systemd: %i). With `audit seal`: seal only \
               this chain.",
        internal: false,
        commands: &[Serve, AuditSeal],
        list_separator: None,
    },
    OptionSpec {
        name: "audit",
        env: Some("PAYGATE_AUDIT"),
        value: "on|off",
        default: "on",
        help: "`off` serves requests without audit records, only in a binary built with the \
               `audit-off` feature, for measuring the audit log's cost; it is logged loudly at \
               start.",
        // Not a setting of a production binary, which refuses `off`.
        internal: !cfg!(feature = "audit-off"),
        commands: &[Serve],
        list_separator: None,
    },
    OptionSpec {
        name: "audit-rotate-bytes",
        env: Some("PAYGATE_AUDIT_ROTATE_BYTES"),
        value: "BYTES",
        default: "67108864",
        help: "Size at which an audit file is sealed and the chain continues in the next.",
        internal: false,
        commands: &[Serve],
        list_separator: None,
    },
    OptionSpec {
        name: "audit-rotate-interval",
        env: Some("PAYGATE_AUDIT_ROTATE_INTERVAL"),
        value: "SECS",
        default: "3600",
        help: "Age of its first record at which an audit file is sealed, however small, so a \
               quiet worker seals (and can ship) its log too. An empty file is never sealed.",
        internal: false,
        commands: &[Serve],
        list_separator: None,
    },
    OptionSpec {
        name: "audit-archive",
        env: Some("PAYGATE_AUDIT_ARCHIVE"),
        value: "s3://BUCKET/PREFIX",
        default: "none",
        help: "Ship every sealed audit segment to this S3 bucket and key prefix (create-only, checksummed, under Object Lock retention), in the background. Unset: no archive.",
        internal: false,
        commands: &[Serve],
        list_separator: None,
    },
    OptionSpec {
        name: "audit-archive-endpoint",
        env: Some("PAYGATE_AUDIT_ARCHIVE_ENDPOINT"),
        value: "URL",
        default: "https://s3.REGION.amazonaws.com",
        help: "The S3-compatible service (http:// or https://).",
        internal: false,
        commands: &[Serve, AuditVerify],
        list_separator: None,
    },
    OptionSpec {
        name: "audit-archive-region",
        env: Some("PAYGATE_AUDIT_ARCHIVE_REGION"),
        value: "REGION",
        default: "us-east-1",
        help: "The region requests are signed for.",
        internal: false,
        commands: &[Serve, AuditVerify],
        list_separator: None,
    },
    OptionSpec {
        name: "audit-archive-retention",
        env: Some("PAYGATE_AUDIT_ARCHIVE_RETENTION"),
        value: "DAYS",
        default: "400",
        help: "Object Lock retention (COMPLIANCE mode) of each archived segment and digest. \
               0 sends none: for a bucket without Object Lock, or to let the bucket's default \
               retention apply.",
        internal: false,
        commands: &[Serve],
        list_separator: None,
    },
    OptionSpec {
        name: "audit-archive-credentials",
        env: Some("PAYGATE_AUDIT_ARCHIVE_CREDENTIALS"),
        value: "FILE",
        default: "the environment",
        help: "A file (mode 0600) of AWS_ACCESS_KEY_ID=… and AWS_SECRET_ACCESS_KEY=… lines. Unset: those two environment variables.",
        internal: false,
        commands: &[Serve, AuditVerify],
        list_separator: None,
    },
    OptionSpec {
        name: "audit-archive-ca",
        env: Some("PAYGATE_AUDIT_ARCHIVE_CA"),
        value: "FILE",
        default: "/etc/ssl/certs/ca-certificates.crt",
        help: "CA certificates (PEM) an https endpoint's certificate is checked against.",
        internal: false,
        commands: &[Serve, AuditVerify],
        list_separator: None,
    },
    OptionSpec {
        name: "audit-archive-node",
        env: Some("PAYGATE_AUDIT_ARCHIVE_NODE"),
        value: "NAME",
        default: "the host name",
        help: "This node's name in the archive's object keys (PREFIX/NODE/INSTANCE/NNNNNN.jsonl).",
        internal: false,
        commands: &[Serve],
        list_separator: None,
    },
    OptionSpec {
        name: "audit-digest-interval",
        env: Some("PAYGATE_AUDIT_DIGEST_INTERVAL"),
        value: "SECS",
        default: "3600",
        help: "How long each signed digest of archived segments covers: one is written per \
               interval, with traffic or without, each starting where the last ended.",
        internal: false,
        commands: &[Serve],
        list_separator: None,
    },
    OptionSpec {
        name: "audit-local-retention",
        env: Some("PAYGATE_AUDIT_LOCAL_RETENTION"),
        value: "DAYS",
        default: "7",
        help: "How long a sealed audit file stays on local disk after its upload, once a \
               confirmed digest lists it (0: delete it then). Without an archive, nothing \
               is deleted.",
        internal: false,
        commands: &[Serve],
        list_separator: None,
    },
    OptionSpec {
        name: "worker-threads",
        env: Some("PAYGATE_WORKER_THREADS"),
        value: "N",
        default: "1",
        help: "Threads of each worker's async runtime; 1 runs a current-thread runtime, the \
               fastest measured (BENCHMARKS.md, 'Workers'): scale with --workers instead.",
        internal: false,
        commands: &[Serve],
        list_separator: None,
    },
    OptionSpec {
        name: "supervised",
        env: None,
        value: "",
        default: "off",
        help: "Internal: set by the supervisor on the workers it starts (commands arrive on \
               stdin; its end means stop).",
        internal: true,
        commands: &[Serve],
        list_separator: None,
    },
    OptionSpec {
        name: "archive",
        env: None,
        value: "s3://BUCKET/PREFIX",
        default: "none: verify the local audit directory",
        help: "Verify the archive there instead (as --audit-archive of the nodes; reached with \
               the --audit-archive-endpoint, -region, -ca and -credentials options): every \
               digest's signature and their chain, every listed segment's hash, and with \
               --audit-key every record.",
        internal: false,
        commands: &[AuditVerify],
        list_separator: None,
    },
    OptionSpec {
        name: "public-key",
        env: None,
        value: "KEY|FILE",
        default: "none (required with --archive)",
        help: "A node's audit signing public key as `paygate audit public-key` prints it \
               (`ed25519:…`), or a file of such keys, one per line; repeat for several. \
               Digests signed by any other key are refused.",
        internal: false,
        commands: &[AuditVerify],
        list_separator: None,
    },
    OptionSpec {
        name: "audit-key",
        env: None,
        value: "FILE",
        default: "none: records are not checked",
        help: "With --archive: a node's audit key file (its data directory's audit.key); \
               repeat for several nodes. Each archived chain's records and HMAC chain are \
               then checked with the key that verifies them.",
        internal: false,
        commands: &[AuditVerify],
        list_separator: None,
    },
    OptionSpec {
        name: "save",
        env: None,
        value: "DIR",
        default: "none",
        help: "With --archive: write every segment that matches its digest to \
               DIR/NODE/INSTANCE/NNNNNN.jsonl (a node's log restored from the archive).",
        internal: false,
        commands: &[AuditVerify],
        list_separator: None,
    },
    OptionSpec {
        name: "from",
        env: None,
        value: "sqlite:DIR",
        default: "none (required)",
        help: "The data directory of the single machine to copy (its --data-dir).",
        internal: false,
        commands: &[MigrateStore],
        list_separator: None,
    },
    OptionSpec {
        name: "to",
        env: None,
        value: "URL",
        default: "none (required)",
        help: "The new, empty PostgreSQL database the nodes will share (as --database).",
        internal: false,
        commands: &[MigrateStore],
        list_separator: None,
    },
    OptionSpec {
        name: "reason",
        env: None,
        value: "TEXT",
        default: "none (required)",
        help: "Why the damaged log is continued (1–500 characters), written into the break \
               record, e.g. 'disk replaced after I/O errors; ticket 4711'.",
        internal: false,
        commands: &[AuditSeal],
        list_separator: None,
    },
    OptionSpec {
        name: "role",
        env: None,
        value: "ROLE",
        default: "none",
        help: "Global role for the new user: admin or auditor.",
        internal: false,
        commands: &[UserAdd],
        list_separator: None,
    },
    OptionSpec {
        name: "force",
        env: None,
        value: "",
        default: "off",
        help: "Overwrite existing certificate and key files.",
        internal: false,
        commands: &[DevCert],
        list_separator: None,
    },
];

/// What the user asked for, with option values still as strings.
#[derive(Debug, PartialEq, Eq)]
pub enum Invocation {
    /// Print this text and exit 0.
    Help(String),
    Version,
    Run {
        command: CommandName,
        /// Positional arguments after the command (the user name for `user add`).
        positional: Vec<String>,
        /// Flag values by option name, in the order given.
        options: BTreeMap<&'static str, Vec<String>>,
    },
}

/// A command line that cannot be understood; the message says what to fix.
#[derive(Debug, PartialEq, Eq)]
pub struct UsageError(pub String);

impl fmt::Display for UsageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}\n\nRun `paygate --help` for usage.", self.0)
    }
}

impl std::error::Error for UsageError {}

/// Parses the arguments after the program name.
pub fn parse<I, S>(args: I) -> Result<Invocation, UsageError>
where
    I: IntoIterator<Item = S>,
    S: Into<String>,
{
    let mut args: Vec<String> = args.into_iter().map(Into::into).collect();
    args.reverse(); // pop() from the front
    let command = match args.pop().as_deref() {
        None | Some("help" | "--help" | "-h") => return Ok(Invocation::Help(main_help())),
        Some("--version" | "-V") => return Ok(Invocation::Version),
        Some("serve") => Serve,
        Some("dev-cert") => DevCert,
        Some("migrate-store") => MigrateStore,
        Some("user") => match args.pop().as_deref() {
            Some("add") => UserAdd,
            Some("disable") => UserDisable,
            Some("--help" | "-h") | None => return Ok(Invocation::Help(group_help("user"))),
            Some(other) => {
                return Err(UsageError(format!(
                    "unknown command `user {other}`; the user command has: add, disable"
                )))
            }
        },
        Some("keys") => match args.pop().as_deref() {
            Some("rotate") => KeysRotate,
            Some("prune") => KeysPrune,
            Some("export") => KeysExport,
            Some("rotate-totp") => KeysRotateTotp,
            Some("--help" | "-h") | None => return Ok(Invocation::Help(group_help("keys"))),
            Some(other) => {
                return Err(UsageError(format!(
                    "unknown command `keys {other}`; the keys command has: rotate, prune, \
                     export, rotate-totp"
                )))
            }
        },
        Some("audit") => match args.pop().as_deref() {
            Some("verify") => AuditVerify,
            Some("seal") => AuditSeal,
            Some("public-key") => AuditPublicKey,
            Some("--help" | "-h") | None => return Ok(Invocation::Help(group_help("audit"))),
            Some(other) => {
                return Err(UsageError(format!(
                    "unknown command `audit {other}`; the audit command has: verify, seal, \
                     public-key"
                )))
            }
        },
        Some(other) => {
            return Err(UsageError(format!(
                "unknown command `{other}`; commands are: serve, dev-cert, user add, \
                 user disable, keys rotate, keys prune, keys export, keys rotate-totp, audit \
                 verify, audit seal, audit public-key, migrate-store"
            )))
        }
    };

    let mut positional = Vec::new();
    let mut options = BTreeMap::new();
    while let Some(arg) = args.pop() {
        if arg == "--help" || arg == "-h" {
            return Ok(Invocation::Help(command_help(command)));
        }
        let Some(flag) = arg.strip_prefix("--") else {
            positional.push(arg);
            continue;
        };
        let (name, inline_value) = match flag.split_once('=') {
            Some((name, value)) => (name, Some(value.to_owned())),
            None => (flag, None),
        };
        let spec = OPTIONS
            .iter()
            .find(|spec| spec.name == name && spec.commands.contains(&command))
            .ok_or_else(|| {
                UsageError(format!(
                    "`{}` does not take --{name}",
                    command.usage().split(" [").next().unwrap_or("paygate")
                ))
            })?;
        let value = if spec.value.is_empty() {
            if inline_value.is_some() {
                return Err(UsageError(format!("--{name} takes no value")));
            }
            "true".to_owned()
        } else {
            match inline_value.or_else(|| args.pop()) {
                Some(value) => value,
                None => {
                    return Err(UsageError(format!(
                        "--{name} needs a value ({})",
                        spec.value
                    )))
                }
            }
        };
        options
            .entry(spec.name)
            .or_insert_with(Vec::new)
            .push(value);
    }
    let (least, most, what) = command.arity();
    if positional.len() < least || positional.len() > most {
        let name = command.usage().split(" [").next().unwrap_or("paygate");
        let name = name
            .trim_end_matches(" NAME")
            .trim_end_matches(" --reason TEXT");
        return Err(UsageError(format!("`{name}` takes {what}")));
    }
    Ok(Invocation::Run {
        command,
        positional,
        options,
    })
}

fn main_help() -> String {
    let mut out = String::from(
        "paygate — a secure payments API server\n\n\
         Usage:\n  paygate serve [OPTIONS]          run the HTTPS API server\n  \
         paygate dev-cert [OPTIONS]       write a self-signed development certificate\n  \
         paygate user add NAME [OPTIONS]  create a user (password from stdin)\n  \
         paygate user disable NAME        disable a user and end their sessions\n  \
         paygate keys rotate              add a new current JWT signing key\n  \
         paygate keys prune               delete retired keys whose tokens expired\n  \
         paygate keys export              print the keys as a JWK Set (secret!)\n  \
         paygate keys rotate-totp         new key for the sealed TOTP secrets\n  \
         paygate audit verify [DIR]       check every audit chain\n  \
         paygate audit seal --reason TEXT continue a damaged audit log, recording the break\n  \
         paygate audit public-key         print this node's audit signing public key\n  \
         paygate migrate-store --from sqlite:DIR --to URL\n                                   \
         copy a single machine's data into PostgreSQL\n  \
         paygate <command> --help         options of one command\n  \
         paygate --version\n\n\
         Every option can also be set through its environment variable; flags win over the \
         environment, which wins over the defaults.\n",
    );
    out.push_str("\nOptions:\n");
    for spec in OPTIONS.iter().filter(|s| !s.internal) {
        push_option_help(&mut out, spec);
    }
    out
}

/// `paygate user --help` and the like: the group's commands, from the main help.
fn group_help(group: &str) -> String {
    let prefix = format!("paygate {group} ");
    let mut out = format!("paygate {group} — commands:\n\nUsage:\n");
    for line in main_help().lines() {
        if line.trim_start().starts_with(&prefix) {
            out.push_str(line);
            out.push('\n');
        }
    }
    out.push_str(&format!(
        "\nRun `paygate {group} <command> --help` for the options of one command.\n"
    ));
    out
}

fn command_help(command: CommandName) -> String {
    let mut out = format!(
        "{}\n\nUsage: {}\n\nOptions:\n",
        command.about(),
        command.usage()
    );
    for spec in OPTIONS
        .iter()
        .filter(|s| s.commands.contains(&command) && !s.internal)
    {
        push_option_help(&mut out, spec);
    }
    out.push_str("  -h, --help\n          Print this help.\n");
    out
}

fn push_option_help(out: &mut String, spec: &OptionSpec) {
    let flag = if spec.value.is_empty() {
        format!("--{}", spec.name)
    } else {
        format!("--{} {}", spec.name, spec.value)
    };
    out.push_str(&format!("  {flag}\n          {}\n", spec.help));
    let mut facts = vec![format!("default: {}", spec.default)];
    if let Some(env) = spec.env {
        facts.push(format!("env: {env}"));
    }
    out.push_str(&format!("          [{}]\n", facts.join("; ")));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(
        args: &[&str],
    ) -> (
        CommandName,
        Vec<String>,
        BTreeMap<&'static str, Vec<String>>,
    ) {
        match parse(args.iter().copied()).unwrap() {
            Invocation::Run {
                command,
                positional,
                options,
            } => (command, positional, options),
            other => panic!("expected a command, got {other:?}"),
        }
    }

    #[test]
    fn flags_take_separate_or_inline_values() {
        let (command, _, options) = run(&["serve", "--listen", "0.0.0.0:1", "--max-body=10"]);
        assert_eq!(command, Serve);
        assert_eq!(options["listen"], ["0.0.0.0:1"]);
        assert_eq!(options["max-body"], ["10"]);
    }

    #[test]
    fn user_add_takes_a_name_and_a_role() {
        let (command, positional, options) = run(&["user", "add", "alice", "--role", "admin"]);
        assert_eq!(command, UserAdd);
        assert_eq!(positional, ["alice"]);
        assert_eq!(options["role"], ["admin"]);
    }

    #[test]
    fn repeated_options_keep_every_value() {
        let (_, _, options) = run(&[
            "serve",
            "--trusted-proxy",
            "10.0.0.0/8",
            "--trusted-proxy=::1",
        ]);
        assert_eq!(options["trusted-proxy"], ["10.0.0.0/8", "::1"]);
    }

    #[test]
    fn options_are_checked_per_command() {
        let err = parse(["dev-cert", "--listen", "x"]).unwrap_err();
        assert!(err.0.contains("does not take --listen"), "{err}");
        let err = parse(["serve", "--role", "admin"]).unwrap_err();
        assert!(err.0.contains("--role"), "{err}");
    }

    #[test]
    fn missing_values_and_unknown_commands_are_usage_errors() {
        assert!(parse(["serve", "--listen"])
            .unwrap_err()
            .0
            .contains("needs a value"));
        assert!(parse(["frobnicate"])
            .unwrap_err()
            .0
            .contains("unknown command"));
        assert!(parse(["dev-cert", "--force=yes"]).is_err());
    }

    #[test]
    fn help_lists_every_option_of_the_command_with_env_and_default() {
        let Invocation::Help(text) = parse(["serve", "--help"]).unwrap() else {
            panic!("expected help")
        };
        for spec in OPTIONS.iter().filter(|s| s.commands.contains(&Serve)) {
            if spec.internal {
                let flag = format!("--{}", spec.name);
                let listed = text.lines().any(|line| {
                    let line = line.trim_start();
                    line == flag || line.starts_with(&format!("{flag} "))
                });
                assert!(!listed, "{}", spec.name);
                continue;
            }
            assert!(text.contains(&format!("--{}", spec.name)), "{}", spec.name);
            if let Some(env) = spec.env {
                assert!(text.contains(env), "{env}");
            }
        }
        assert!(matches!(
            parse(Vec::<String>::new()).unwrap(),
            Invocation::Help(_)
        ));
    }
}
