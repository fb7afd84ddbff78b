//! The crate's layers point one way: a module may use the modules below it, never the ones
//! above. This test reads every source file under `src/` and checks each `crate::…` path
//! outside comments and unit tests against the order below (also in `docs/design.md`).
//! A new top-level module must be given a layer here, so the question is asked once.

use std::collections::BTreeSet;
use std::path::Path;

/// Bottom first. Modules in one layer do not use each other.
const LAYERS: &[&[&str]] = &[
    // Leaves: values and helpers that know nothing of paygate's state.
    &[
        "decimal",
        "time",
        "domain",
        "secret_file",
        "client_ip",
        "token_bucket",
        "systemd",
        "signals",
        "logging",
    ],
    // All SQL; per-worker counters; the command-line grammar.
    &["store", "metrics", "cli", "s3"],
    // The exact per-worker cache of what was read from the store.
    &["cache"],
    // The mechanisms' own machinery.
    &["tokens", "passwords", "audit", "ratelimit"],
    // Who a request is; the error type and its one mapping to HTTP; validated settings.
    &["identity", "http", "config"],
    // What requests share; which operations exist; TLS; one deployment per address.
    &["app", "routes", "tls", "deployment"],
    // The handlers.
    &["api"],
    // The chain in front of them.
    &["filter"],
    // Connections.
    &["server"],
    // Worker processes.
    &["supervisor", "worker"],
];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|layer| layer.contains(&module))
}

/// The top-level modules a source file names as `crate::<module>`, outside comments and
/// outside its `#[cfg(test)]` part.
fn uses(source: &str) -> BTreeSet<String> {
    let code = source.split("#[cfg(test)]").next().unwrap_or_default();
    let mut found = BTreeSet::new();
    for line in code.lines() {
        let line = line.split("//").next().unwrap_or_default();
        let mut rest = line;
        while let Some(at) = rest.find("crate::") {
            rest = &rest[at + "crate::".len()..];
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
                .collect();
            if !name.is_empty() {
                found.insert(name);
            }
        }
        // `use crate::{a::b, c};`
        if let Some(group) = line.split("crate::{").nth(1) {
            for part in group.split(',') {
                let name: String = part
                    .trim()
                    .chars()
                    .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
                    .collect();
                if !name.is_empty() {
                    found.insert(name);
                }
            }
        }
    }
    found
}

fn visit(dir: &Path, files: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            visit(&path, files);
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
}

#[test]
fn no_module_uses_a_layer_above_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    visit(&src, &mut files);
    let mut violations = Vec::new();
    for file in &files {
        let relative = file.strip_prefix(&src).unwrap();
        let top = relative
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy()
            .trim_end_matches(".rs")
            .to_owned();
        if top == "main" || top == "lib" {
            continue;
        }
        let Some(own) = layer_of(&top) else {
            violations.push(format!("{top}: not given a layer in tests/layers.rs"));
            continue;
        };
        let source = std::fs::read_to_string(file).unwrap();
        for used in uses(&source) {
            if used == top {
                continue;
            }
            match layer_of(&used) {
                Some(layer) if layer < own => {}
                Some(_) => violations.push(format!(
                    "{}: uses crate::{used}, which is not in a layer below {top}",
                    relative.display()
                )),
                None => violations.push(format!("{used}: not given a layer in tests/layers.rs")),
            }
        }
    }
    assert!(violations.is_empty(), "{}", violations.join("\n"));
}

#[test]
fn the_checker_sees_uses_and_ignores_comments_and_tests() {
    let source = "use crate::store::Store;\nuse crate::{http::ApiError, time};\n\
                  // crate::server in a comment\nfn f() { crate::audit::x(); }\n\
                  #[cfg(test)]\nmod tests { use crate::filter; }\n";
    let found: Vec<_> = uses(source).into_iter().collect();
    assert_eq!(found, ["audit", "http", "store", "time"]);
}
