//! The `paygate` binary as an operator runs it: start-up with embedded defaults, refusals
//! with clear messages, `dev-cert`, `user add`, and a clean exit on SIGTERM.

mod common;

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Output, Stdio};

use common::{serve, signal, wait_exit, Client, Creds, TempDir};

fn paygate(dir: &TempDir) -> Command {
    common::paygate_command(dir)
}

fn run(command: &mut Command) -> Output {
    command.stdin(Stdio::null()).output().unwrap()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn defaults_generate_a_dev_certificate_serve_and_stop_cleanly_on_sigterm() {
    let dir = TempDir::new("cli-defaults");
    let (mut child, addr) = serve(&dir, &[]);
    let key = dir.0.join("certs/server.key");
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert!(dir.0.join("data/paygate.db").exists(), "data under ./data");

    let client = Client::new(addr, &dir.0.join("certs/server.crt"));
    let response = client.get("/apiStatus").send().await;
    assert_eq!(response.status, 200);

    signal(&child, "TERM");
    assert!(wait_exit(&mut child).success(), "SIGTERM exits 0");

    // The node's audit signing key was made at its first start (private), and
    // `audit public-key` prints its public half, the same every time.
    let signing = dir.0.join("data/audit-signing.key");
    assert_eq!(
        std::fs::metadata(&signing).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let public = |dir: &TempDir| {
        let output = run(paygate(dir).args(["audit", "public-key"]));
        assert!(output.status.success(), "{}", stderr(&output));
        String::from_utf8(output.stdout).unwrap()
    };
    let printed = public(&dir);
    assert!(
        printed.starts_with("ed25519:") && printed.trim_end().len() == 8 + 43,
        "{printed}"
    );
    assert_eq!(public(&dir), printed);
    assert!(!printed.contains(std::fs::read_to_string(&signing).unwrap().trim()));

    // A second start reuses the certificate rather than generating another.
    let before = std::fs::read(dir.0.join("certs/server.crt")).unwrap();
    let (mut child, _) = serve(&dir, &[]);
    assert_eq!(
        std::fs::read(dir.0.join("certs/server.crt")).unwrap(),
        before
    );
    signal(&child, "INT");
    assert!(wait_exit(&mut child).success(), "SIGINT exits 0");
}

#[test]
fn explicit_certificate_paths_must_exist() {
    let dir = TempDir::new("cli-missing-cert");
    let output =
        run(paygate(&dir).args(["serve", "--tls-cert", "mine.crt", "--tls-key", "mine.key"]));
    assert_eq!(output.status.code(), Some(1));
    let message = stderr(&output);
    assert!(
        message.contains("mine.crt") && message.contains("paygate dev-cert"),
        "{message}"
    );
    assert!(
        !dir.0.join("mine.crt").exists(),
        "nothing generated for explicit paths"
    );

    let output = run(paygate(&dir)
        .args(["serve"])
        .env("PAYGATE_TLS_KEY", "env.key"));
    assert_eq!(output.status.code(), Some(1), "an env path is explicit too");
}

#[test]
fn bad_configuration_is_refused_with_a_message() {
    let dir = TempDir::new("cli-config");
    let output = run(paygate(&dir).args(["serve", "--workers", "65"]));
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains("at most 64 worker processes"),
        "{}",
        stderr(&output)
    );

    let output = run(paygate(&dir)
        .args(["serve"])
        .env("PAYGATE_LISTEN", "nonsense"));
    assert!(
        stderr(&output).contains("PAYGATE_LISTEN"),
        "{}",
        stderr(&output)
    );

    let output = run(paygate(&dir).args(["serve", "--frobnicate"]));
    assert_eq!(output.status.code(), Some(2), "usage errors exit 2");

    // A data directory that cannot be one (a file is in the way).
    std::fs::write(dir.0.join("occupied"), b"").unwrap();
    paygate::tls::write_dev_certificate(
        &paygate::config::TlsFiles {
            cert: dir.0.join("certs/server.crt"),
            key: dir.0.join("certs/server.key"),
            are_defaults: true,
        },
        false,
    )
    .unwrap();
    let output = run(paygate(&dir).args(["serve", "--data-dir", "occupied"]));
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).contains("occupied"), "{}", stderr(&output));
}

#[test]
fn a_database_from_a_newer_paygate_is_refused() {
    let dir = TempDir::new("cli-newer-db");
    let output = run(paygate(&dir).args(["dev-cert"]));
    assert!(output.status.success());
    // Create the database, then pretend a future version migrated it.
    let mut add = paygate(&dir)
        .args(["user", "add", "admin1", "--role", "admin"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    add.stdin
        .take()
        .unwrap()
        .write_all(b"a long admin passphrase\n")
        .unwrap();
    assert!(add.wait_with_output().unwrap().status.success());
    let db = rusqlite::Connection::open(dir.0.join("data/paygate.db")).unwrap();
    db.execute(
        "INSERT INTO schema_migrations VALUES (999, '999_future.sql', 0)",
        [],
    )
    .unwrap();
    drop(db);

    let output = run(paygate(&dir).args(["serve", "--listen", "127.0.0.1:0"]));
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains("newer paygate"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn dev_cert_writes_a_key_only_the_owner_can_read_and_never_overwrites_silently() {
    let dir = TempDir::new("cli-dev-cert");
    let output = run(paygate(&dir).args(["dev-cert", "--tls-cert", "a.crt", "--tls-key", "a.key"]));
    assert!(output.status.success(), "{}", stderr(&output));
    let mode = std::fs::metadata(dir.0.join("a.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let pem = std::fs::read_to_string(dir.0.join("a.crt")).unwrap();
    assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"));

    let again = run(paygate(&dir).args(["dev-cert", "--tls-cert", "a.crt", "--tls-key", "a.key"]));
    assert_eq!(again.status.code(), Some(1));
    assert!(stderr(&again).contains("--force"));
    let forced = run(paygate(&dir).args([
        "dev-cert",
        "--tls-cert",
        "a.crt",
        "--tls-key",
        "a.key",
        "--force",
    ]));
    assert!(forced.status.success());
    assert_ne!(std::fs::read_to_string(dir.0.join("a.crt")).unwrap(), pem);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_add_creates_a_user_who_can_authenticate() {
    let dir = TempDir::new("cli-user-add");
    let add = |name: &str, password: &[u8], extra: &[&str]| {
        let mut child = paygate(&dir)
            .args(["user", "add", name])
            .args(extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // A command that refuses its arguments exits without reading the password, so the
        // write may meet a closed pipe; the exit status is what the test checks.
        let _ = child.stdin.take().unwrap().write_all(password);
        child.wait_with_output().unwrap()
    };
    let output = add(
        "root.admin",
        b"a long admin passphrase\n",
        &["--role", "admin"],
    );
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(String::from_utf8_lossy(&output.stdout).contains("role admin"));

    assert_eq!(
        add("root.admin", b"another passphrase 1\n", &[])
            .status
            .code(),
        Some(1)
    );
    let weak = add("weakling", b"password\n", &[]);
    assert!(stderr(&weak).contains("commonly used"), "{}", stderr(&weak));
    let role = add("someone", b"a fine passphrase\n", &["--role", "root"]);
    assert!(
        stderr(&role).contains("admin or auditor"),
        "{}",
        stderr(&role)
    );

    let (mut child, addr) = serve(&dir, &[]);
    let client = Client::new(addr, &dir.0.join("certs/server.crt"));
    let admin = Creds::new("root.admin", "a long admin passphrase");
    let me = client.get("/users/root.admin").basic(&admin).send().await;
    assert_eq!(me.status, 200, "{}", me.text());
    assert_eq!(me.json()["role"], "admin");
    signal(&child, "TERM");
    assert!(wait_exit(&mut child).success());
}

#[test]
fn help_documents_every_command() {
    let dir = TempDir::new("cli-help");
    let output = run(paygate(&dir).arg("--help"));
    assert!(output.status.success());
    let text = String::from_utf8_lossy(&output.stdout);
    for needle in [
        "serve",
        "dev-cert",
        "user add",
        "user disable",
        "keys rotate",
        "keys prune",
        "keys export",
        "PAYGATE_LISTEN",
        "PAYGATE_TOKEN_FORMAT",
        "PAYGATE_TOKEN_TTL",
        "PAYGATE_STEP_UP_AMOUNT",
        "--max-body",
    ] {
        assert!(text.contains(needle), "{needle}");
    }
    for command in [
        &["serve", "--help"][..],
        &["dev-cert", "--help"],
        &["user", "add", "--help"],
        &["user", "disable", "--help"],
        &["keys", "rotate", "--help"],
        &["keys", "prune", "--help"],
        &["keys", "export", "--help"],
    ] {
        let output = run(paygate(&dir).args(command));
        assert!(output.status.success(), "{command:?}");
        assert!(
            String::from_utf8_lossy(&output.stdout).contains("--data-dir"),
            "{command:?}"
        );
    }
}

/// The audit log cannot be turned off in a production binary: only one built with the
/// `audit-off` feature (the load test's) accepts `--audit off`.
#[cfg(not(feature = "audit-off"))]
#[test]
fn the_audit_log_cannot_be_turned_off() {
    let dir = TempDir::new("cli-audit-off");
    for command in [
        paygate(&dir).args(["serve", "--audit", "off"]),
        paygate(&dir).args(["serve"]).env("PAYGATE_AUDIT", "off"),
    ] {
        let output = run(command);
        assert_eq!(output.status.code(), Some(1));
        assert!(
            stderr(&output).contains("`audit-off` feature"),
            "{}",
            stderr(&output)
        );
    }
    assert!(
        !dir.0.join("data").exists(),
        "refused before anything was created"
    );
}

#[test]
fn a_command_group_lists_its_commands_and_internal_flags_stay_hidden() {
    let dir = TempDir::new("cli-groups");
    for (group, commands) in [
        ("user", &["user add", "user disable"][..]),
        (
            "keys",
            &[
                "keys rotate",
                "keys prune",
                "keys export",
                "keys rotate-totp",
            ],
        ),
        ("audit", &["audit verify", "audit seal"]),
    ] {
        for args in [&[group, "--help"][..], &[group]] {
            let output = run(paygate(&dir).args(args));
            assert!(output.status.success(), "{args:?}");
            let text = String::from_utf8_lossy(&output.stdout);
            for command in commands {
                assert!(text.contains(command), "{args:?} lists {command}");
            }
            assert!(
                !text.contains("serve"),
                "{args:?} lists only its own commands"
            );
        }
    }
    for args in [&["--help"][..], &["serve", "--help"]] {
        let output = run(paygate(&dir).args(args));
        let text = String::from_utf8_lossy(&output.stdout);
        assert!(
            !text.contains("--supervised"),
            "{args:?}: internal flag shown"
        );
    }
}

#[test]
fn every_usage_error_exits_2_with_what_to_fix() {
    let dir = TempDir::new("cli-usage");
    for (args, says) in [
        (&["user", "add"][..], "takes exactly one user name"),
        (&["user", "add", "a", "b"], "takes exactly one user name"),
        (&["user", "disable"], "takes exactly one user name"),
        (&["keys", "rotate", "extra"], "takes no arguments"),
        (
            &["audit", "verify", "a", "b"],
            "takes at most one directory",
        ),
        (&["serve", "--no-such-flag"], "does not take --no-such-flag"),
        (&["serve", "--listen"], "needs a value"),
        (&["user", "frobnicate"], "unknown command"),
        (&["frobnicate"], "unknown command"),
    ] {
        let output = run(paygate(&dir).args(args));
        assert_eq!(output.status.code(), Some(2), "{args:?}");
        assert!(
            stderr(&output).contains(says),
            "{args:?}: {}",
            stderr(&output)
        );
    }
}

#[test]
fn a_signal_right_after_start_still_drains_and_exits_0() {
    // The handlers are installed before the server announces itself, so a signal sent the
    // moment it says "listening" is a clean stop, never the default kill.
    let dir = TempDir::new("cli-early-signal");
    for name in ["TERM", "INT", "TERM", "INT", "TERM"] {
        let (mut child, _) = serve(&dir, &[]);
        signal(&child, name);
        assert!(
            wait_exit(&mut child).success(),
            "SIG{name} right after start"
        );
    }
}

#[test]
fn keys_commands_manage_a_private_key_file() {
    let dir = TempDir::new("cli-keys");
    let data = dir.0.join("data");
    let export = run(paygate(&dir)
        .args(["keys", "export", "--data-dir"])
        .arg(&data));
    assert!(export.status.success(), "{}", stderr(&export));
    let jwks: serde_json::Value = serde_json::from_slice(&export.stdout).unwrap();
    assert_eq!(
        jwks["keys"].as_array().unwrap().len(),
        1,
        "created on first use"
    );
    assert_eq!(jwks["keys"][0]["kty"], "oct");
    let file = data.join("jwt-keys.json");
    let mode = std::fs::metadata(&file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);

    let rotate = run(paygate(&dir)
        .args(["keys", "rotate", "--data-dir"])
        .arg(&data));
    assert!(rotate.status.success(), "{}", stderr(&rotate));
    let export = run(paygate(&dir)
        .args(["keys", "export", "--data-dir"])
        .arg(&data));
    let jwks: serde_json::Value = serde_json::from_slice(&export.stdout).unwrap();
    assert_eq!(jwks["keys"].as_array().unwrap().len(), 2);
    let prune = run(paygate(&dir)
        .args(["keys", "prune", "--data-dir"])
        .arg(&data));
    assert!(String::from_utf8_lossy(&prune.stdout).contains("no key to prune"));

    // A key file others can read is refused, with the fix in the message.
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let export = run(paygate(&dir)
        .args(["keys", "export", "--data-dir"])
        .arg(&data));
    assert!(!export.status.success());
    assert!(stderr(&export).contains("chmod 600"), "{}", stderr(&export));
    let bad_ttl = run(paygate(&dir)
        .args(["keys", "prune", "--token-ttl", "0", "--data-dir"])
        .arg(&data));
    assert!(!bad_ttl.status.success());
}

#[test]
fn user_disable_names_an_unknown_user() {
    let dir = TempDir::new("cli-disable");
    let output = run(paygate(&dir).args(["user", "disable", "nobody"]));
    assert!(!output.status.success());
    assert!(stderr(&output).contains("nobody"), "{}", stderr(&output));
}
