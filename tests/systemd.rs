//! The systemd units in `etc/systemd/`: they pass `systemd-analyze verify`, their sandbox
//! keeps the exposure score at 1.5 or lower, and the example environment file sets only
//! options `paygate serve` knows.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::TempDir;

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// `systemd-analyze` with its output; it comes with systemd, which `.ci/run` installs.
fn analyze(args: &[&str]) -> (bool, String) {
    let output = Command::new("systemd-analyze")
        .args(args)
        .output()
        .expect("systemd-analyze (package systemd) is needed to check the units");
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    (output.status.success(), text)
}

#[test]
fn the_units_verify_with_the_built_binary_in_place() {
    // `verify` checks that ExecStart names an executable: point it at the one just built.
    let dir = TempDir::new("units");
    let unit = std::fs::read_to_string(repo("etc/systemd/paygate@.service")).unwrap();
    assert!(unit.contains("ExecStart=/usr/local/bin/paygate "));
    let unit = unit.replace("/usr/local/bin/paygate", env!("CARGO_BIN_EXE_paygate"));
    std::fs::write(dir.0.join("paygate@.service"), unit).unwrap();
    std::fs::copy(
        repo("etc/systemd/paygate.target"),
        dir.0.join("paygate.target"),
    )
    .unwrap();
    let instance = dir.0.join("paygate@1.service");
    std::os::unix::fs::symlink(dir.0.join("paygate@.service"), &instance).unwrap();
    let (ok, text) = analyze(&[
        "verify",
        instance.to_str().unwrap(),
        dir.0.join("paygate.target").to_str().unwrap(),
    ]);
    assert!(ok, "{text}");
    // Warnings about the units themselves would also be printed without failing.
    assert!(!text.contains("paygate"), "{text}");
}

#[test]
fn the_sandbox_keeps_the_exposure_score_at_most_1_5() {
    let unit = repo("etc/systemd/paygate@.service");
    let (_, text) = analyze(&["security", "--offline=true", unit.to_str().unwrap()]);
    let score: f64 = text
        .lines()
        .find_map(|line| line.split_once("Overall exposure level for paygate@"))
        .and_then(|(_, rest)| {
            rest.split_once(": ")?
                .1
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no exposure level in:\n{text}"));
    assert!(score <= 1.5, "exposure {score}:\n{text}");
}

#[test]
fn the_example_environment_file_sets_only_known_options() {
    let help = Command::new(env!("CARGO_BIN_EXE_paygate"))
        .args(["serve", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout).into_owned();
    let env = std::fs::read_to_string(repo("etc/paygate.env")).unwrap();
    let mut names = 0;
    for line in env.lines().map(str::trim) {
        let line = line.trim_start_matches('#');
        let Some((name, _)) = line.split_once('=') else {
            continue;
        };
        if name.starts_with("PAYGATE_") {
            names += 1;
            assert!(
                help.contains(name),
                "{name} is not an option of paygate serve"
            );
        }
    }
    assert!(names >= 8, "{env}");
}

#[test]
fn install_sh_stages_the_binary_units_and_environment_file() {
    use std::os::unix::fs::PermissionsExt as _;
    let stage = TempDir::new("install");
    let run = || {
        Command::new("bash")
            .arg(repo("scripts/install.sh"))
            .env("DESTDIR", &stage.0)
            .env("PAYGATE_BIN", env!("CARGO_BIN_EXE_paygate"))
            .env("PREFIX", "/opt/paygate")
            .output()
            .unwrap()
    };
    let output = run();
    assert!(output.status.success(), "{output:?}");
    let mode = |path: &str| {
        std::fs::metadata(stage.0.join(path))
            .unwrap_or_else(|e| panic!("{path}: {e}"))
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode("opt/paygate/bin/paygate"), 0o755);
    assert_eq!(mode("etc/systemd/system/paygate@.service"), 0o644);
    assert_eq!(mode("etc/systemd/system/paygate.target"), 0o644);
    assert_eq!(mode("etc/paygate/paygate.env"), 0o640);
    assert_eq!(mode("etc/paygate/tls"), 0o750);
    // The unit starts the binary where it was installed.
    let unit =
        std::fs::read_to_string(stage.0.join("etc/systemd/system/paygate@.service")).unwrap();
    assert!(
        unit.contains("ExecStart=/opt/paygate/bin/paygate serve"),
        "{unit}"
    );
    // Running it again upgrades the binary but keeps the operator's configuration.
    let env = stage.0.join("etc/paygate/paygate.env");
    std::fs::write(&env, "PAYGATE_LISTEN=0.0.0.0:443\n").unwrap();
    let output = run();
    assert!(output.status.success(), "{output:?}");
    assert_eq!(
        std::fs::read_to_string(&env).unwrap(),
        "PAYGATE_LISTEN=0.0.0.0:443\n"
    );
}

#[test]
fn install_sh_prints_usage_refuses_unknown_arguments_and_dry_runs() {
    let run = |args: &[&str], prefix: &std::path::Path| {
        Command::new("bash")
            .arg(repo("scripts/install.sh"))
            .args(args)
            .env_remove("DESTDIR")
            .env("PAYGATE_BIN", env!("CARGO_BIN_EXE_paygate"))
            .env("PREFIX", prefix)
            .output()
            .unwrap()
    };
    // Never a real install from these, even as root: the prefix must stay untouched.
    let scratch = TempDir::new("install-args");
    let prefix = scratch.0.join("prefix");
    let help = run(&["--help"], &prefix);
    assert!(help.status.success());
    let text = String::from_utf8_lossy(&help.stdout);
    assert!(
        text.contains("Usage:") && text.contains("--dry-run"),
        "{text}"
    );
    let unknown = run(&["--force"], &prefix);
    assert_eq!(unknown.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("unknown argument '--force'"));
    let dry = run(&["--dry-run"], &prefix);
    assert!(dry.status.success(), "{dry:?}");
    let text = String::from_utf8_lossy(&dry.stdout);
    assert!(
        text.contains("would run: install -D -m 0755") && text.contains("nothing was changed"),
        "{text}"
    );
    assert!(!prefix.exists(), "a dry run installed something");
}
