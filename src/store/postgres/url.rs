//! `--database` values for PostgreSQL: libpq connection URLs (`postgres://…`,
//! `postgresql://…`) and key=value strings, read into a tokio-postgres configuration and
//! the TLS settings paygate applies itself.
//!
//! tokio-postgres reads everything but the libpq TLS options it lacks: `sslmode` values
//! `verify-ca` and `verify-full`, and `sslrootcert`. Those two are taken out here and
//! mean what they mean to libpq:
//!
//! | `sslmode` | TLS | the server's certificate |
//! |---|---|---|
//! | `disable` | never | - |
//! | `prefer` (the default) | when the server offers it | not verified |
//! | `require` | always | not verified, unless `sslrootcert` is given: then as `verify-ca` |
//! | `verify-ca` | always | signed by `sslrootcert` |
//! | `verify-full` | always | signed by `sslrootcert` and naming the host connected to |
//!
//! `sslrootcert` is a PEM file of CA certificates, or `system` for the operating system's
//! bundle. Nothing here ever puts the password into a message: errors name options, never
//! their values, and [`DatabaseUrl::describe`] is built from the parsed parts.

use std::fmt::Write as _;
use std::path::PathBuf;

use tokio_postgres::config::{Host, SslMode};

/// Where the operating system's CA bundle lives (Debian and derivatives).
const SYSTEM_ROOTS: &str = "/etc/ssl/certs/ca-certificates.crt";

/// How much of the server's certificate is checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verify {
    /// Encrypted, but anyone can answer (libpq's `prefer` and `require`).
    Nothing,
    /// The chain leads to one of these roots; any name (`verify-ca`).
    Chain(PathBuf),
    /// The chain leads to one of these roots and names the host (`verify-full`).
    ChainAndName(PathBuf),
}

/// A parsed `--database` value.
#[derive(Clone)]
pub struct DatabaseUrl {
    /// Hosts, ports, user, password, database, `target_session_attrs`, timeouts.
    pub config: tokio_postgres::Config,
    /// What is checked of the server's certificate when TLS is used.
    pub verify: Verify,
}

impl std::fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

/// Whether `value` selects the PostgreSQL backend (the other value is a SQLite directory).
pub fn is_postgres(value: &str) -> bool {
    let lower = value.trim_start().to_ascii_lowercase();
    lower.starts_with("postgres://")
        || lower.starts_with("postgresql://")
        || (!lower.contains("://") && lower.contains('='))
}

impl DatabaseUrl {
    /// Reads a libpq URL or key=value string. The error names what to fix and never
    /// repeats a value from the input.
    pub fn parse(value: &str) -> Result<DatabaseUrl, String> {
        let (rest, mode, rootcert) = take_tls_options(value)?;
        let mut config: tokio_postgres::Config =
            rest.parse().map_err(|e: tokio_postgres::Error| {
                format!("--database: {}", scrub(&e.to_string(), value))
            })?;
        if config.get_hosts().is_empty() {
            return Err("--database: no host given (postgres://USER@HOST:PORT/DATABASE)".into());
        }
        if config.get_user().is_none() {
            return Err("--database: no user given (postgres://USER@HOST:PORT/DATABASE)".into());
        }
        let rootcert = rootcert.map(|path| {
            if path == "system" {
                PathBuf::from(SYSTEM_ROOTS)
            } else {
                PathBuf::from(path)
            }
        });
        let needs_roots = |mode: &str| {
            format!(
                "--database: sslmode={mode} needs sslrootcert=FILE (the CA certificates that \
                 signed the server's, PEM) or sslrootcert=system"
            )
        };
        let (ssl_mode, verify) = match mode.as_deref().unwrap_or("prefer") {
            "disable" => (SslMode::Disable, Verify::Nothing),
            "prefer" => (SslMode::Prefer, Verify::Nothing),
            "require" => match rootcert {
                Some(roots) => (SslMode::Require, Verify::Chain(roots)),
                None => (SslMode::Require, Verify::Nothing),
            },
            "verify-ca" => (
                SslMode::Require,
                Verify::Chain(rootcert.ok_or_else(|| needs_roots("verify-ca"))?),
            ),
            "verify-full" => (
                SslMode::Require,
                Verify::ChainAndName(rootcert.ok_or_else(|| needs_roots("verify-full"))?),
            ),
            _ => {
                return Err(
                    "--database: sslmode must be disable, prefer, require, verify-ca or \
                            verify-full"
                        .into(),
                )
            }
        };
        config.ssl_mode(ssl_mode);
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(std::time::Duration::from_secs(5));
        }
        Ok(DatabaseUrl { config, verify })
    }

    /// The connection for logs and errors: hosts, database, user and TLS mode, never the
    /// password.
    pub fn describe(&self) -> String {
        let mut out = String::from("postgres://");
        if let Some(user) = self.config.get_user() {
            let _ = write!(out, "{user}@");
        }
        let ports = self.config.get_ports();
        for (i, host) in self.config.get_hosts().iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            match host {
                Host::Tcp(name) => out.push_str(name),
                Host::Unix(path) => out.push_str(&path.display().to_string()),
            }
            let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
            let _ = write!(out, ":{port}");
        }
        let _ = write!(out, "/{}", self.config.get_dbname().unwrap_or(""));
        let mode = match (&self.verify, self.config.get_ssl_mode()) {
            (_, SslMode::Disable) => "disable",
            (Verify::ChainAndName(_), _) => "verify-full",
            (Verify::Chain(_), _) => "verify-ca",
            (Verify::Nothing, SslMode::Require) => "require",
            _ => "prefer",
        };
        let _ = write!(out, "?sslmode={mode}");
        out
    }

    /// Whether a connection could reach a server other than the one meant without anyone
    /// noticing: TLS that does not check the name, to a host that is not this machine.
    pub fn unverified_remote(&self) -> bool {
        let remote = self.config.get_hosts().iter().any(|host| match host {
            Host::Tcp(name) => !matches!(name.as_str(), "localhost" | "127.0.0.1" | "::1"),
            Host::Unix(_) => false,
        });
        remote && !matches!(self.verify, Verify::ChainAndName(_))
    }
}

/// Removes the password from a message, wherever a parser may have quoted it.
fn scrub(message: &str, input: &str) -> String {
    let mut out = message.to_owned();
    for secret in passwords_in(input) {
        if !secret.is_empty() {
            out = out.replace(&secret, "***");
        }
    }
    out
}

/// The password as written in `input` (URL user info or a `password` option), raw and
/// decoded.
fn passwords_in(input: &str) -> Vec<String> {
    let mut found = Vec::new();
    if let Some(after) = input.split_once("://").map(|(_, rest)| rest) {
        let authority = after.split(['/', '?']).next().unwrap_or("");
        if let Some((userinfo, _)) = authority.rsplit_once('@') {
            if let Some((_, password)) = userinfo.split_once(':') {
                found.push(password.to_owned());
                found.push(percent_decode(password));
            }
        }
        if let Some((_, query)) = after.split_once('?') {
            for (key, value) in query.split('&').filter_map(|p| p.split_once('=')) {
                if key == "password" {
                    found.push(value.to_owned());
                    found.push(percent_decode(value));
                }
            }
        }
    } else if let Ok(pairs) = key_values(input) {
        found.extend(
            pairs
                .into_iter()
                .filter(|(k, _)| k == "password")
                .map(|(_, v)| v),
        );
    }
    found
}

/// Splits `sslmode` and `sslrootcert` off either form; returns the rest for tokio-postgres.
fn take_tls_options(value: &str) -> Result<(String, Option<String>, Option<String>), String> {
    let (mut mode, mut rootcert) = (None, None);
    let lower = value.trim_start().to_ascii_lowercase();
    if lower.starts_with("postgres://") || lower.starts_with("postgresql://") {
        let Some((base, query)) = value.split_once('?') else {
            return Ok((value.to_owned(), None, None));
        };
        let mut kept = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, raw) = pair.split_once('=').unwrap_or((pair, ""));
            match key {
                "sslmode" => mode = Some(percent_decode(raw)),
                "sslrootcert" => rootcert = Some(percent_decode(raw)),
                _ => kept.push(pair),
            }
        }
        let rest = if kept.is_empty() {
            base.to_owned()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        return Ok((rest, mode, rootcert));
    }
    let mut rest = String::new();
    for (key, value) in key_values(value)? {
        match key.as_str() {
            "sslmode" => mode = Some(value),
            "sslrootcert" => rootcert = Some(value),
            _ => {
                let quoted = value.replace('\\', "\\\\").replace('\'', "\\'");
                let _ = write!(rest, "{key}='{quoted}' ");
            }
        }
    }
    Ok((rest, mode, rootcert))
}

/// A libpq key=value string: `key = value` pairs separated by spaces, values optionally in
/// single quotes with `\'` and `\\` escapes.
fn key_values(input: &str) -> Result<Vec<(String, String)>, String> {
    let mut pairs = Vec::new();
    let mut chars = input.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.peek().is_none() {
            return Ok(pairs);
        }
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| !c.is_whitespace() && *c != '=') {
            key.push(c);
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.next() != Some('=') {
            return Err(format!("--database: expected `=` after `{key}`"));
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            loop {
                match chars.next() {
                    Some('\'') => break,
                    Some('\\') => match chars.next() {
                        Some(c) => value.push(c),
                        None => return Err(format!("--database: unterminated value of `{key}`")),
                    },
                    Some(c) => value.push(c),
                    None => return Err(format!("--database: unterminated value of `{key}`")),
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                value.push(c);
            }
        }
        pairs.push((key, value));
    }
}

/// `%XX` escapes of a URL component; a malformed escape stays as written.
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "s3cr%40t-pw";

    #[test]
    fn urls_and_key_value_strings_read_alike() {
        let url = DatabaseUrl::parse(&format!(
            "postgres://paygate:{SECRET}@db1:5433,db2:5434/pay?target_session_attrs=read-write&sslmode=verify-full&sslrootcert=%2Fetc%2Fpg%2Fca.pem"
        ))
        .unwrap();
        assert_eq!(url.config.get_password(), Some(&b"s3cr@t-pw"[..]));
        assert_eq!(url.config.get_ports(), [5433, 5434]);
        assert_eq!(
            url.config.get_target_session_attrs(),
            tokio_postgres::config::TargetSessionAttrs::ReadWrite
        );
        assert_eq!(url.verify, Verify::ChainAndName("/etc/pg/ca.pem".into()));
        assert_eq!(url.config.get_ssl_mode(), SslMode::Require);
        assert_eq!(
            url.describe(),
            "postgres://paygate@db1:5433,db2:5434/pay?sslmode=verify-full"
        );

        let kv = DatabaseUrl::parse(
            "host=db1 port = 5433 user=paygate password='it\\'s quoted' dbname=pay sslmode=verify-ca sslrootcert=system",
        )
        .unwrap();
        assert_eq!(kv.config.get_password(), Some(&b"it's quoted"[..]));
        assert_eq!(kv.verify, Verify::Chain(SYSTEM_ROOTS.into()));
        assert_eq!(
            kv.describe(),
            "postgres://paygate@db1:5433/pay?sslmode=verify-ca"
        );
    }

    #[test]
    fn tls_modes_mean_what_they_mean_to_libpq() {
        let mode = |q: &str| {
            let url = DatabaseUrl::parse(&format!("postgres://u@h/d{q}")).unwrap();
            (url.config.get_ssl_mode(), url.verify)
        };
        assert_eq!(mode(""), (SslMode::Prefer, Verify::Nothing));
        assert_eq!(
            mode("?sslmode=disable"),
            (SslMode::Disable, Verify::Nothing)
        );
        assert_eq!(
            mode("?sslmode=require"),
            (SslMode::Require, Verify::Nothing)
        );
        assert_eq!(
            mode("?sslmode=require&sslrootcert=ca.pem"),
            (SslMode::Require, Verify::Chain("ca.pem".into())),
            "require with a root certificate verifies the chain, as in libpq"
        );
        for needs_roots in ["verify-ca", "verify-full"] {
            let err =
                DatabaseUrl::parse(&format!("postgres://u@h/d?sslmode={needs_roots}")).unwrap_err();
            assert!(err.contains("sslrootcert"), "{err}");
        }
        let err = DatabaseUrl::parse("postgres://u@h/d?sslmode=allow").unwrap_err();
        assert!(err.contains("sslmode must be"), "{err}");
    }

    #[test]
    fn the_password_never_appears_in_an_error_or_a_description() {
        let bad = [
            format!("postgres://paygate:{SECRET}@db/pay?sslmode=bogus"),
            format!("postgres://paygate:{SECRET}@db/pay?frobnicate={SECRET}"),
            format!("postgres://paygate:{SECRET}@db:notaport/pay"),
            format!("host=db user=paygate password={SECRET} port=x"),
            format!("host=db user=paygate password='{SECRET}"),
            format!("host=db user=paygate password {SECRET}"),
            format!("user=paygate password={SECRET}"),
        ];
        for input in &bad {
            let err = DatabaseUrl::parse(input).unwrap_err();
            assert!(!err.contains(SECRET), "{input} -> {err}");
            assert!(!err.contains("s3cr@t-pw"), "{input} -> {err}");
            assert!(err.starts_with("--database"), "{err}");
        }
        let good = DatabaseUrl::parse(&format!("postgres://paygate:{SECRET}@db/pay")).unwrap();
        assert!(!format!("{good:?} {}", good.describe()).contains("s3cr"));
    }

    #[test]
    fn only_postgres_values_select_postgres() {
        assert!(is_postgres("postgres://u@h/d"));
        assert!(is_postgres("postgresql://u@h/d"));
        assert!(is_postgres("host=h user=u"));
        assert!(!is_postgres("/var/lib/paygate"));
        assert!(!is_postgres("./data"));
    }

    #[test]
    fn a_remote_server_without_name_checks_is_flagged() {
        let flagged = |s: &str| DatabaseUrl::parse(s).unwrap().unverified_remote();
        assert!(flagged("postgres://u@db.example/d?sslmode=require"));
        assert!(!flagged("postgres://u@127.0.0.1/d"));
        assert!(!flagged(
            "postgres://u@db.example/d?sslmode=verify-full&sslrootcert=ca.pem"
        ));
    }
}
