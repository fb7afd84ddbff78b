//! Configuration, step two: raw option strings (from [`crate::cli`]) and `PAYGATE_*`
//! environment variables become typed, validated settings.
//!
//! Precedence is flag > environment > default. Nothing here touches the filesystem or the
//! process environment directly: the environment comes in as a lookup function, so every
//! rule is testable. Checks that need I/O (does the certificate exist, is the data directory
//! writable) happen where the files are opened, with messages that name the path.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::cli::OPTIONS;
use crate::client_ip::Cidr;
use crate::ratelimit::rules::{self, Rule};
use crate::store::postgres::{is_postgres, DatabaseUrl};
use crate::token_bucket::Limit;
use crate::tokens::{TokenFormat, MAX_TOKEN_TTL_S};

/// Default certificate path, relative to the working directory.
pub const DEFAULT_TLS_CERT: &str = "certs/server.crt";
/// Default private key path, relative to the working directory.
pub const DEFAULT_TLS_KEY: &str = "certs/server.key";

/// A configuration value that cannot be used; the message names the option and its source.
#[derive(Debug, PartialEq, Eq)]
pub struct ConfigError(pub String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

/// Where the TLS certificate and key are, and whether they are the defaults (only then may
/// a missing pair be replaced by a generated development certificate).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// True when neither path was given by flag or environment.
    pub are_defaults: bool,
}

/// Everything `paygate serve` needs, validated.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    /// The PostgreSQL database nodes share; `None`: SQLite in `data_dir`.
    pub database: Option<DatabaseUrl>,
    /// PostgreSQL connections per worker process.
    pub database_pool_size: usize,
    pub tls: TlsFiles,
    /// How long in-flight requests may take to finish after SIGTERM/SIGINT.
    pub shutdown_timeout: Duration,
    /// Largest accepted request body in bytes.
    pub max_body: usize,
    /// Concurrent connections served; the rest wait in the listen backlog.
    pub max_connections: usize,
    /// Concurrent connections from one client address per worker (trusted proxies exempt).
    pub max_connections_per_client: usize,
    /// Deadline for each phase a client controls: handshake, first request, headers, body.
    pub client_timeout: Duration,
    /// Rate-limit rules, first match wins.
    pub rate_limits: Vec<Rule>,
    /// Proxies whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<Cidr>,
    /// Failed password checks allowed per username; `None` when disabled.
    pub guess_limit: Option<Limit>,
    /// Password checks allowed per client address (a `key=ip` rule named
    /// `password-checks`); `None` when disabled.
    pub password_check_limit: Option<Rule>,
    /// Password checks that may wait for a hashing slot in a worker.
    pub password_queue: usize,
    /// What `POST /sessions` issues.
    pub token_format: TokenFormat,
    /// Lifetime of issued tokens in seconds; also the longest a JWT may claim.
    pub token_ttl_s: i64,
    /// Payments above this amount (minor units) need a second factor; `None` when off.
    pub step_up_amount: Option<i64>,
    /// This worker's audit chain; `None` picks the first free instance number.
    pub instance: Option<String>,
    /// Whether requests are audited (off only to measure the audit log's cost).
    pub audit: bool,
    /// When an audit file is sealed and the chain continues in the next.
    pub audit_rotation: crate::audit::Rotation,
    /// Where sealed audit segments are shipped, if anywhere.
    pub audit_archive: Option<ArchiveSettings>,
    /// Longest lifetime a capability may be minted or derived with, in seconds.
    pub capability_max_ttl_s: u64,
    /// Worker processes: 1 serves in this process; more start a supervisor.
    pub workers: u32,
    /// This process is a worker of a supervisor, which sends its commands on stdin.
    pub supervised: bool,
    /// Threads of this process's async runtime (1: a current-thread runtime).
    pub worker_threads: usize,
}

/// The audit archive's settings, as given.
#[derive(Debug, Clone)]
pub struct ArchiveSettings {
    pub bucket: String,
    /// Without leading or trailing slashes; may be empty.
    pub prefix: String,
    pub endpoint: String,
    pub region: String,
    pub retention_days: u64,
    pub credentials: crate::s3::Credentials,
    pub ca_file: PathBuf,
    pub node: String,
    /// How long each signed digest covers, in seconds.
    pub digest_interval_s: u64,
    /// How long a local copy is kept once archived, in days (0: until its digest).
    pub local_retention_days: u64,
}

impl ArchiveSettings {
    /// The bucket these settings name, reached as they say.
    pub fn bucket(&self) -> Result<crate::s3::Bucket, String> {
        crate::s3::Bucket::new(
            &self.endpoint,
            &self.region,
            &self.bucket,
            self.credentials.clone(),
            &self.ca_file,
        )
        .map_err(|e| format!("--audit-archive-endpoint: {e}"))
    }
}

/// `--audit-archive` and its companions; `None` when there is no archive.
fn archive_settings(sources: &Sources<'_>) -> Result<Option<ArchiveSettings>, ConfigError> {
    let Some(mut settings) = archive_location(sources, "audit-archive")? else {
        return Ok(None);
    };
    let node = match sources.string("audit-archive-node") {
        Some(node) => node,
        None => std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_default(),
    };
    if !crate::audit::valid_instance(&node) {
        return Err(ConfigError(format!(
            "--audit-archive-node: `{node}` cannot name a node in object keys (1–64 of \
             A-Z a-z 0-9 . _ -); set it"
        )));
    }
    settings.node = node;
    settings.retention_days = sources.parse("audit-archive-retention", 400, "a number of days")?;
    settings.digest_interval_s =
        sources.positive("audit-digest-interval", 3600, "a number of seconds")?;
    settings.local_retention_days =
        sources.parse("audit-local-retention", 7, "a number of days")?;
    Ok(Some(settings))
}

/// The archive `paygate audit verify --archive` reads, with the endpoint, region, CA and
/// credentials options; `None` without `--archive`.
pub fn archive_to_verify(sources: &Sources<'_>) -> Result<Option<ArchiveSettings>, ConfigError> {
    archive_location(sources, "archive")
}

/// Where an archive is (the `s3://` URL in option `option`) and how to reach it; the
/// uploader's own settings are left at their defaults.
fn archive_location(
    sources: &Sources<'_>,
    option: &str,
) -> Result<Option<ArchiveSettings>, ConfigError> {
    let Some((url, source)) = sources.get(option) else {
        return Ok(None);
    };
    let bad = || {
        ConfigError(format!(
            "{source}: `{url}` is not s3://BUCKET or s3://BUCKET/PREFIX"
        ))
    };
    let rest = url.trim().strip_prefix("s3://").ok_or_else(bad)?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    let bucket_ok = (3..=63).contains(&bucket.len())
        && bucket
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
    if !bucket_ok {
        return Err(bad());
    }
    let region = sources
        .string("audit-archive-region")
        .unwrap_or_else(|| "us-east-1".to_owned());
    let endpoint = sources
        .string("audit-archive-endpoint")
        .unwrap_or_else(|| format!("https://s3.{region}.amazonaws.com"));
    let credentials = archive_credentials(sources, &source)?;
    Ok(Some(ArchiveSettings {
        bucket: bucket.to_owned(),
        prefix: prefix.trim_matches('/').to_owned(),
        endpoint,
        region,
        retention_days: 400,
        credentials,
        ca_file: sources.string("audit-archive-ca").map_or_else(
            || PathBuf::from("/etc/ssl/certs/ca-certificates.crt"),
            PathBuf::from,
        ),
        node: String::new(),
        digest_interval_s: 3600,
        local_retention_days: 7,
    }))
}

/// The archive's access key: from `--audit-archive-credentials FILE`, or from
/// `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY`. The secret is never shown.
fn archive_credentials(
    sources: &Sources<'_>,
    needed_by: &str,
) -> Result<crate::s3::Credentials, ConfigError> {
    let mut values: BTreeMap<String, String> = BTreeMap::new();
    let origin = match sources.string("audit-archive-credentials") {
        Some(path) => {
            let text = crate::secret_file::read_private(std::path::Path::new(&path))
                .map_err(|e| ConfigError(format!("--audit-archive-credentials: {e}")))?;
            for line in String::from_utf8_lossy(&text).lines() {
                if let Some((name, value)) = line.trim().split_once('=') {
                    values.insert(name.trim().to_owned(), value.trim().to_owned());
                }
            }
            path
        }
        None => {
            for name in ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"] {
                if let Some(value) = (sources.env)(name).filter(|v| !v.is_empty()) {
                    values.insert(name.to_owned(), value);
                }
            }
            "the environment".to_owned()
        }
    };
    match (
        values.remove("AWS_ACCESS_KEY_ID"),
        values.remove("AWS_SECRET_ACCESS_KEY"),
    ) {
        (Some(access_key_id), Some(secret_access_key)) => Ok(crate::s3::Credentials {
            access_key_id,
            secret_access_key,
        }),
        _ => Err(ConfigError(format!(
            "{needed_by} needs an access key: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY \
             in {origin} (or --audit-archive-credentials FILE)"
        ))),
    }
}

/// Reads option values with flag > environment > default precedence.
pub struct Sources<'a> {
    options: &'a BTreeMap<&'static str, Vec<String>>,
    env: &'a dyn Fn(&str) -> Option<String>,
}

impl<'a> Sources<'a> {
    pub fn new(
        options: &'a BTreeMap<&'static str, Vec<String>>,
        env: &'a dyn Fn(&str) -> Option<String>,
    ) -> Self {
        Sources { options, env }
    }

    /// The value of an option and a description of where it came from, if set at all.
    fn get(&self, name: &str) -> Option<(String, String)> {
        if let Some(value) = self.options.get(name).and_then(|v| v.last()) {
            return Some((value.clone(), format!("--{name}")));
        }
        let env = OPTIONS.iter().find(|o| o.name == name)?.env?;
        (self.env)(env)
            .filter(|v| !v.is_empty())
            .map(|v| (v, env.to_owned()))
    }

    fn parse<T: std::str::FromStr>(
        &self,
        name: &str,
        default: T,
        what: &str,
    ) -> Result<T, ConfigError> {
        match self.get(name) {
            None => Ok(default),
            Some((raw, source)) => raw
                .trim()
                .parse()
                .map_err(|_| ConfigError(format!("{source}: `{raw}` is not {what}"))),
        }
    }

    fn positive(&self, name: &str, default: u64, what: &str) -> Result<u64, ConfigError> {
        let value = self.parse(name, default, what)?;
        if value == 0 {
            let source = self.get(name).map(|(_, s)| s).unwrap_or_default();
            return Err(ConfigError(format!("{source}: must be at least 1")));
        }
        Ok(value)
    }

    /// The data directory (every command has one).
    pub fn data_dir(&self) -> PathBuf {
        self.get("data-dir")
            .map(|(v, _)| PathBuf::from(v))
            .unwrap_or_else(|| PathBuf::from("./data"))
    }

    /// The certificate and key paths.
    pub fn tls_files(&self) -> TlsFiles {
        let cert = self.get("tls-cert").map(|(v, _)| PathBuf::from(v));
        let key = self.get("tls-key").map(|(v, _)| PathBuf::from(v));
        TlsFiles {
            are_defaults: cert.is_none() && key.is_none(),
            cert: cert.unwrap_or_else(|| PathBuf::from(DEFAULT_TLS_CERT)),
            key: key.unwrap_or_else(|| PathBuf::from(DEFAULT_TLS_KEY)),
        }
    }

    /// Every value of a repeatable option: all flags if any were given, else the
    /// environment variable split at the option's separator.
    pub fn list(&self, name: &str) -> Option<Vec<String>> {
        if let Some(values) = self.options.get(name) {
            return Some(values.clone());
        }
        let spec = OPTIONS.iter().find(|o| o.name == name)?;
        let raw = (self.env)(spec.env?).filter(|v| !v.trim().is_empty())?;
        let separator = spec.list_separator?;
        Some(
            raw.split(separator)
                .map(str::trim)
                .filter(|v| !v.is_empty())
                .map(str::to_owned)
                .collect(),
        )
    }

    /// `--token-ttl` in seconds, within 1 s and [`MAX_TOKEN_TTL_S`] (used by `serve` and by
    /// `keys prune`, which must know how long tokens live).
    pub fn token_ttl(&self) -> Result<i64, ConfigError> {
        let ttl = self.positive("token-ttl", 3600, "a number of seconds")?;
        if ttl > MAX_TOKEN_TTL_S {
            let source = self.get("token-ttl").map(|(_, s)| s).unwrap_or_default();
            return Err(ConfigError(format!(
                "{source}: tokens may live at most {MAX_TOKEN_TTL_S} s (one day)"
            )));
        }
        Ok(i64::try_from(ttl).unwrap_or(i64::MAX))
    }

    /// `--database`: `None` for SQLite in the data directory, else the PostgreSQL the
    /// nodes share (`serve` and the commands that change users and keys).
    pub fn database(&self) -> Result<Option<DatabaseUrl>, ConfigError> {
        match self.get("database") {
            None => Ok(None),
            Some((value, source)) if is_postgres(&value) => {
                Ok(Some(DatabaseUrl::parse(&value).map_err(|e| {
                    ConfigError(e.replacen("--database", &source, 1))
                })?))
            }
            Some((_, source)) => Err(ConfigError(format!(
                "{source}: expected a postgres:// URL or a key=value connection string \
                 (host=... user=... dbname=...); leave it unset for SQLite in --data-dir"
            ))),
        }
    }

    /// A switch such as `--force`.
    pub fn flag(&self, name: &str) -> bool {
        self.options.contains_key(name)
    }

    /// A free-form string option.
    pub fn string(&self, name: &str) -> Option<String> {
        self.get(name).map(|(v, _)| v)
    }
}

/// One worker per CPU this process may run on (its affinity mask and cgroup quota count),
/// at most 64.
fn default_workers() -> u64 {
    std::thread::available_parallelism().map_or(1, |n| n.get().min(64) as u64)
}

impl ServeConfig {
    /// Validates the options of `paygate serve`.
    pub fn resolve(sources: &Sources<'_>) -> Result<Self, ConfigError> {
        let listen = sources.parse(
            "listen",
            SocketAddr::from(([127, 0, 0, 1], 8443)),
            "an address with a port, such as 127.0.0.1:8443 or [::]:8443",
        )?;
        let workers =
            sources.positive("workers", default_workers(), "a number of worker processes")?;
        let supervised = sources.flag("supervised");
        // One runtime thread per worker process: paygate scales with processes (one per
        // CPU), and a second thread only adds cross-thread wake-ups (BENCHMARKS.md, "Workers").
        let worker_threads = sources.positive("worker-threads", 1, "a number of threads")?;
        let worker_threads = usize::try_from(worker_threads.min(256)).unwrap_or(1);
        if workers > 64 {
            return Err(ConfigError(format!(
                "--workers {workers}: at most 64 worker processes"
            )));
        }
        let max_body = sources.positive("max-body", 16 * 1024, "a size in bytes")?;
        let max_body = usize::try_from(max_body)
            .ok()
            .filter(|&b| b <= 64 * 1024 * 1024)
            .ok_or_else(|| ConfigError("--max-body: at most 67108864 bytes (64 MiB)".into()))?;
        let max_connections_per_client =
            sources.positive("max-connections-per-client", 32, "a number of connections")?;
        let max_connections =
            sources.positive("max-connections", 1024, "a number of connections")?;
        let rate_limits = match sources.list("rate-limit") {
            None => rules::default_rules(),
            Some(texts) => rules::parse_rules(&texts).map_err(|e| ConfigError(e.0))?,
        };
        let trusted_proxies = sources
            .list("trusted-proxy")
            .unwrap_or_default()
            .iter()
            .map(|raw| Cidr::parse(raw).map_err(|e| ConfigError(format!("--trusted-proxy: {e}"))))
            .collect::<Result<Vec<_>, _>>()?;
        let guess_text = sources
            .string("guess-limit")
            .unwrap_or_else(|| crate::ratelimit::DEFAULT_GUESS_LIMIT.to_owned());
        let guess_limit = if guess_text.trim() == "none" {
            Ok(None)
        } else {
            rules::parse_rule(&format!("* / {guess_text} key=global")).map(|rule| Some(rule.limit))
        }
            .map_err(|_| {
                ConfigError(format!(
                    "--guess-limit \"{guess_text}\": expected RATE/UNIT burst=N, e.g. 10/15min burst=10"
                ))
            })?;
        let check_text = sources
            .string("password-check-limit")
            .unwrap_or_else(|| crate::ratelimit::DEFAULT_PASSWORD_CHECK_LIMIT.to_owned());
        let password_check_limit = if check_text.trim() == "none" {
            None
        } else {
            Some(
                crate::ratelimit::password_check_rule(&check_text).map_err(|_| {
                    ConfigError(format!(
                        "--password-check-limit \"{check_text}\": expected RATE/UNIT burst=N, \
                         e.g. 60/min burst=30, or none"
                    ))
                })?,
            )
        };
        let password_queue =
            sources.positive("password-queue", 32, "a number of waiting checks")?;
        let token_format = match sources.get("token-format") {
            None => TokenFormat::Jwt,
            Some((raw, source)) => TokenFormat::parse(raw.trim()).ok_or_else(|| {
                ConfigError(format!(
                    "{source}: `{raw}` is not a token format: opaque or jwt"
                ))
            })?,
        };
        let step_up_amount = match sources.get("step-up-amount") {
            None => None,
            Some((raw, _)) if raw.trim() == "off" => None,
            Some(_) => Some(sources.positive("step-up-amount", 1, "an amount in minor units")?),
        };
        let instance = match sources.get("instance") {
            None => None,
            Some((raw, source)) if crate::audit::valid_instance(raw.trim()) => {
                let _ = source;
                Some(raw.trim().to_owned())
            }
            Some((raw, source)) => {
                return Err(ConfigError(format!(
                    "{source}: `{raw}` is not an instance name: 1 to 64 of A-Z a-z 0-9 . _ -"
                )))
            }
        };
        let audit = match sources.get("audit") {
            None => true,
            Some((raw, source)) => match raw.trim() {
                "on" => true,
                "off" if cfg!(feature = "audit-off") => false,
                // A production binary cannot run without its audit log, whatever the
                // environment says.
                "off" => {
                    return Err(ConfigError(format!(
                        "{source}: this paygate was built without the `audit-off` feature, so \
                         its audit log cannot be turned off (the load test builds its own \
                         binary with `--features audit-off`)"
                    )))
                }
                _ => return Err(ConfigError(format!("{source}: `{raw}` is not on or off"))),
            },
        };
        let audit_rotation = crate::audit::Rotation {
            bytes: sources.positive(
                "audit-rotate-bytes",
                crate::audit::DEFAULT_ROTATE_BYTES,
                "a size in bytes",
            )?,
            interval: Duration::from_secs(sources.positive(
                "audit-rotate-interval",
                crate::audit::DEFAULT_ROTATE_INTERVAL.as_secs(),
                "a number of seconds",
            )?),
        };
        let capability_max_ttl_s =
            sources.positive("capability-max-ttl", 86_400, "a number of seconds")?;
        if capability_max_ttl_s > 366 * 86_400 {
            return Err(ConfigError(
                "--capability-max-ttl: at most 31622400 s (366 days)".into(),
            ));
        }
        let database = sources.database()?;
        let database_pool_size =
            sources.positive("database-pool-size", 16, "a number of connections")?;
        if database_pool_size > 1000 {
            return Err(ConfigError(
                "--database-pool-size: at most 1000 connections per worker".into(),
            ));
        }
        Ok(ServeConfig {
            database,
            database_pool_size: usize::try_from(database_pool_size).unwrap_or(16),
            workers: u32::try_from(workers).unwrap_or(1),
            supervised,
            worker_threads,
            capability_max_ttl_s,
            instance,
            audit,
            audit_rotation,
            audit_archive: archive_settings(sources)?,
            token_format,
            token_ttl_s: sources.token_ttl()?,
            step_up_amount: step_up_amount.map(|a| i64::try_from(a).unwrap_or(i64::MAX)),
            listen,
            data_dir: sources.data_dir(),
            tls: sources.tls_files(),
            shutdown_timeout: Duration::from_secs(sources.parse(
                "shutdown-timeout",
                30,
                "a number of seconds",
            )?),
            max_body,
            max_connections: usize::try_from(max_connections).unwrap_or(usize::MAX),
            max_connections_per_client: usize::try_from(max_connections_per_client)
                .unwrap_or(usize::MAX),
            client_timeout: Duration::from_secs(sources.positive(
                "client-timeout",
                10,
                "a number of seconds",
            )?),
            rate_limits,
            trusted_proxies,
            guess_limit,
            password_check_limit,
            password_queue: usize::try_from(password_queue).unwrap_or(usize::MAX),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve(
        flags: &[(&'static str, &str)],
        env: &[(&str, &str)],
    ) -> Result<ServeConfig, ConfigError> {
        let mut options: BTreeMap<&'static str, Vec<String>> = BTreeMap::new();
        for (k, v) in flags {
            options.entry(*k).or_default().push(v.to_string());
        }
        let env: BTreeMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let lookup = move |name: &str| env.get(name).cloned();
        ServeConfig::resolve(&Sources::new(&options, &lookup))
    }

    #[test]
    fn the_audit_archive_needs_a_bucket_url_and_an_access_key_and_never_shows_the_secret() {
        assert!(resolve(&[], &[]).unwrap().audit_archive.is_none());
        let keys = [
            ("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE"),
            ("AWS_SECRET_ACCESS_KEY", "s3cr3t-never-shown"),
        ];
        let flags = [
            ("audit-archive", "s3://paygate-audit/prod/"),
            ("audit-archive-node", "node-a"),
        ];
        let config = resolve(&flags, &keys).unwrap();
        let archive = config.audit_archive.clone().unwrap();
        assert_eq!(
            (archive.bucket.as_str(), archive.prefix.as_str()),
            ("paygate-audit", "prod")
        );
        assert_eq!(archive.endpoint, "https://s3.us-east-1.amazonaws.com");
        assert_eq!(archive.retention_days, 400);
        assert!(!format!("{config:?}").contains("s3cr3t"));
        for bad in ["paygate-audit", "s3://", "s3://Upper/x", "s3://ab"] {
            let err = resolve(&[("audit-archive", bad), flags[1]], &keys).unwrap_err();
            assert!(err.to_string().contains("s3://BUCKET"), "{bad}: {err}");
        }
        let err = resolve(&flags, &keys[..1]).unwrap_err().to_string();
        assert!(err.contains("AWS_SECRET_ACCESS_KEY"), "{err}");
    }

    #[test]
    fn defaults_match_the_design() {
        let config = resolve(&[], &[]).unwrap();
        assert_eq!(config.listen, "127.0.0.1:8443".parse().unwrap());
        assert_eq!(config.data_dir, PathBuf::from("./data"));
        assert!(config.tls.are_defaults);
        assert_eq!(config.tls.cert, PathBuf::from(DEFAULT_TLS_CERT));
        assert_eq!(config.shutdown_timeout, Duration::from_secs(30));
        assert_eq!(config.max_body, 16384);
    }

    #[test]
    fn flags_override_environment_which_overrides_defaults() {
        let config = resolve(
            &[("listen", "127.0.0.1:9000")],
            &[
                ("PAYGATE_LISTEN", "127.0.0.1:7000"),
                ("PAYGATE_MAX_BODY", "100"),
            ],
        )
        .unwrap();
        assert_eq!(config.listen.port(), 9000);
        assert_eq!(config.max_body, 100);
    }

    #[test]
    fn explicit_certificate_paths_are_not_defaults() {
        let config = resolve(&[], &[("PAYGATE_TLS_CERT", "/etc/paygate/cert.pem")]).unwrap();
        assert!(!config.tls.are_defaults);
        assert_eq!(config.tls.key, PathBuf::from(DEFAULT_TLS_KEY));
    }

    #[test]
    fn bad_values_name_their_source() {
        let err = resolve(&[], &[("PAYGATE_LISTEN", "localhost")]).unwrap_err();
        assert!(err.0.starts_with("PAYGATE_LISTEN: `localhost`"), "{err}");
        let err = resolve(&[("max-body", "0")], &[]).unwrap_err();
        assert!(err.0.contains("--max-body"), "{err}");
    }

    #[test]
    fn rate_limits_come_from_repeated_flags_or_a_separated_variable() {
        let defaults = resolve(&[], &[]).unwrap();
        assert_eq!(defaults.rate_limits, rules::default_rules());
        let from_env = resolve(
            &[],
            &[(
                "PAYGATE_RATE_LIMITS",
                "GET /a 1/s burst=1 key=ip; * / 5/s burst=5 key=user",
            )],
        )
        .unwrap();
        assert_eq!(from_env.rate_limits.len(), 2);
        let from_flags = resolve(
            &[("rate-limit", "GET /a 1/s burst=1 key=ip")],
            &[(
                "PAYGATE_RATE_LIMITS",
                "GET /b 1/s burst=1 key=ip; GET /c 1/s burst=1 key=ip",
            )],
        )
        .unwrap();
        assert_eq!(
            from_flags.rate_limits.len(),
            1,
            "flags replace the environment"
        );
        let err = resolve(&[("rate-limit", "GET /a fast burst=1 key=ip")], &[]).unwrap_err();
        assert!(err.0.contains("\"GET /a fast burst=1 key=ip\""), "{err}");
    }

    #[test]
    fn trusted_proxies_and_guess_limit() {
        let config = resolve(
            &[("trusted-proxy", "10.0.0.0/8"), ("trusted-proxy", "::1")],
            &[("PAYGATE_GUESS_LIMIT", "5/hour burst=5")],
        )
        .unwrap();
        assert_eq!(config.trusted_proxies.len(), 2);
        assert_eq!(
            config.guess_limit,
            Some(Limit::new(5, 3600 * 1_000_000_000, 5))
        );
        let env = resolve(
            &[],
            &[("PAYGATE_TRUSTED_PROXIES", "10.0.0.0/8, 192.168.0.0/16")],
        )
        .unwrap();
        assert_eq!(env.trusted_proxies.len(), 2);
        assert!(resolve(&[("trusted-proxy", "10.0.0.0/99")], &[]).is_err());
        assert!(resolve(&[("guess-limit", "lots")], &[]).is_err());
        let default = resolve(&[], &[]).unwrap().guess_limit;
        assert_eq!(default, Some(Limit::new(10, 900 * 1_000_000_000, 10)));
        assert_eq!(
            resolve(&[("guess-limit", "none")], &[])
                .unwrap()
                .guess_limit,
            None
        );
    }

    #[test]
    fn token_settings() {
        let defaults = resolve(&[], &[]).unwrap();
        assert_eq!(defaults.token_format, TokenFormat::Jwt);
        assert_eq!(defaults.token_ttl_s, 3600);
        assert_eq!(defaults.step_up_amount, None);
        let set = resolve(
            &[("token-format", "opaque"), ("step-up-amount", "100000")],
            &[("PAYGATE_TOKEN_TTL", "600")],
        )
        .unwrap();
        assert_eq!(set.token_format, TokenFormat::Opaque);
        assert_eq!(set.token_ttl_s, 600);
        assert_eq!(set.step_up_amount, Some(100_000));
        let err = resolve(&[("token-ttl", "86401")], &[]).unwrap_err();
        assert!(err.0.contains("at most 86400"), "{err}");
        assert!(resolve(&[("token-ttl", "0")], &[]).is_err());
        let err = resolve(&[("token-format", "paseto")], &[]).unwrap_err();
        assert!(err.0.contains("opaque or jwt"), "{err}");
        assert!(resolve(&[("step-up-amount", "-5")], &[]).is_err());
    }

    #[test]
    fn audit_settings() {
        let defaults = resolve(&[], &[]).unwrap();
        assert!(defaults.audit);
        assert_eq!(defaults.instance, None);
        assert_eq!(defaults.audit_rotation.bytes, 64 * 1024 * 1024);
        assert_eq!(defaults.audit_rotation.interval, Duration::from_secs(3600));
        assert_eq!(defaults.capability_max_ttl_s, 86_400);
        assert!(resolve(&[("capability-max-ttl", "0")], &[]).is_err());
        let set = resolve(
            &[("instance", "w-2"), ("audit", "on")],
            &[("PAYGATE_AUDIT_ROTATE_BYTES", "1000")],
        )
        .unwrap();
        assert_eq!(set.instance.as_deref(), Some("w-2"));
        assert!(set.audit);
        let off = resolve(&[], &[("PAYGATE_AUDIT", "off")]);
        if cfg!(feature = "audit-off") {
            assert!(!off.unwrap().audit);
        } else {
            let refusal = off.unwrap_err().to_string();
            assert!(refusal.contains("audit-off"), "{refusal}");
        }
        assert_eq!(set.audit_rotation.bytes, 1000);
        assert!(resolve(&[("instance", "../etc")], &[]).is_err());
        assert!(resolve(&[("instance", ".hidden")], &[]).is_err());
        assert!(resolve(&[("audit", "maybe")], &[]).is_err());
    }

    #[test]
    fn workers_are_counted() {
        assert_eq!(
            u64::from(resolve(&[], &[]).unwrap().workers),
            default_workers()
        );
        assert_eq!(resolve(&[("workers", "4")], &[]).unwrap().workers, 4);
        assert!(resolve(&[("workers", "0")], &[]).is_err());
        assert!(resolve(&[("workers", "65")], &[]).is_err());
    }
}
