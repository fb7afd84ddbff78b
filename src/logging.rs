//! The operational log on stderr, as people and log pipelines read it.
//!
//! Two formats (`--log-format`, `PAYGATE_LOG_FORMAT`):
//! - `text`: `[time LEVEL target] message key=value …`, for a terminal (the worker is not
//!   repeated on every line: systemd's identifier, or the supervisor's lines, name it);
//! - `json`: one JSON object per line with `time` (RFC 3339, UTC, µs), `level`, `target`,
//!   `message`, `worker` once the process is a worker, and the record's structured fields
//!   (`request_id`, …), for Vector, Fluent Bit, Loki and the like.
//!
//! When stderr is the systemd journal (`JOURNAL_STREAM` names stderr's device and inode),
//! each line starts with the syslog priority of its level (`<3>` error … `<7>` debug), which
//! journald strips and stores as `PRIORITY`, and text lines leave the time to the journal.
//! Secrets never reach this log: the code never logs a credential in any format, and the
//! tests hunt for them in both.

use std::io::Write as _;
use std::sync::OnceLock;

use log::kv::{Key, Value, VisitSource};
use log::{Level, Record};
use serde_json::{Map, Value as Json};

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

impl LogFormat {
    /// `text` or `json`; anything else is refused with what is accepted.
    pub fn parse(value: &str) -> Result<LogFormat, String> {
        match value {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!(
                "--log-format (PAYGATE_LOG_FORMAT) must be `text` or `json`, not `{other}`"
            )),
        }
    }
}

/// This process's worker name, once it is a worker.
static WORKER: OnceLock<String> = OnceLock::new();

/// Names the worker in every later line (its audit instance). Only the first call counts.
pub fn set_worker(name: &str) {
    let _ = WORKER.set(name.to_owned());
}

/// Installs the logger: level filter from `RUST_LOG` (default `info`), lines in `format`.
pub fn init(format: LogFormat) {
    let journal = stderr_is_journal();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format(move |out, record| {
            let line = match format {
                LogFormat::Text => text_line(record, journal, &out.timestamp_micros().to_string()),
                LogFormat::Json => json_line(record, &out.timestamp_micros().to_string()),
            };
            let priority = if journal {
                format!("<{}>", priority(record.level()))
            } else {
                String::new()
            };
            writeln!(out, "{priority}{line}")
        })
        .init();
}

/// The syslog priority journald files a level under.
fn priority(level: Level) -> u8 {
    match level {
        Level::Error => 3,
        Level::Warn => 4,
        Level::Info => 6,
        Level::Debug | Level::Trace => 7,
    }
}

/// Whether stderr is the stream systemd connected to the journal, as `JOURNAL_STREAM`
/// (`DEVICE:INODE`) says; a redirected stderr of a process started by a unit is not.
fn stderr_is_journal() -> bool {
    use std::os::fd::AsFd as _;
    use std::os::unix::fs::MetadataExt as _;
    let Ok(stream) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let Ok(stderr) = std::io::stderr().as_fd().try_clone_to_owned() else {
        return false;
    };
    let Ok(metadata) = std::fs::File::from(stderr).metadata() else {
        return false;
    };
    stream == format!("{}:{}", metadata.dev(), metadata.ino())
}

/// The record's structured fields, in the order given.
fn fields(record: &Record<'_>) -> Vec<(String, String)> {
    struct Collect(Vec<(String, String)>);
    impl<'kvs> VisitSource<'kvs> for Collect {
        fn visit_pair(&mut self, key: Key<'kvs>, value: Value<'kvs>) -> Result<(), log::kv::Error> {
            self.0.push((key.to_string(), value.to_string()));
            Ok(())
        }
    }
    let mut collect = Collect(Vec::new());
    let _ = record.key_values().visit(&mut collect);
    collect.0
}

fn text_line(record: &Record<'_>, journal: bool, time: &str) -> String {
    let mut line = if journal {
        format!("{} {}", record.level(), record.target())
    } else {
        format!("[{time} {:<5} {}]", record.level(), record.target())
    };
    line.push(' ');
    line.push_str(&record.args().to_string());
    for (key, value) in fields(record) {
        line.push_str(&format!(" {key}={value}"));
    }
    line
}

fn json_line(record: &Record<'_>, time: &str) -> String {
    let mut object = Map::new();
    object.insert("time".into(), time.into());
    object.insert(
        "level".into(),
        record.level().as_str().to_lowercase().into(),
    );
    object.insert("target".into(), record.target().into());
    object.insert("message".into(), record.args().to_string().into());
    if let Some(worker) = WORKER.get() {
        object.insert("worker".into(), worker.as_str().into());
    }
    for (key, value) in fields(record) {
        // A field never replaces one of the fixed keys above.
        object.entry(key).or_insert(Json::String(value));
    }
    Json::Object(object).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record_with<'a>(
        args: std::fmt::Arguments<'a>,
        kvs: &'a [(&'a str, &'a str)],
        run: impl FnOnce(&Record<'_>),
    ) {
        let record = Record::builder()
            .args(args)
            .level(Level::Warn)
            .target("paygate::server")
            .key_values(&kvs)
            .build();
        run(&record);
    }

    #[test]
    fn a_json_line_is_one_object_with_the_fixed_keys_and_the_fields() {
        let kvs = [("request_id", "0193"), ("message", "cannot replace")];
        record_with(format_args!("slow \"client\"\nnext"), &kvs, |record| {
            let line = json_line(record, "2026-12-02T03:00:00.000001Z");
            assert!(!line.contains('\n'));
            let object: Json = serde_json::from_str(&line).unwrap();
            assert_eq!(object["time"], "2026-12-02T03:00:00.000001Z");
            assert_eq!(object["level"], "warn");
            assert_eq!(object["target"], "paygate::server");
            assert_eq!(object["message"], "slow \"client\"\nnext");
            assert_eq!(object["request_id"], "0193");
        });
    }

    #[test]
    fn a_text_line_under_journald_leaves_the_time_to_the_journal() {
        record_with(format_args!("draining"), &[("request_id", "7")], |record| {
            let line = text_line(record, false, "T");
            assert!(
                line.starts_with("[T WARN  paygate::server] draining"),
                "{line}"
            );
            assert!(line.ends_with(" request_id=7"), "{line}");
            let line = text_line(record, true, "T");
            assert!(line.starts_with("WARN paygate::server draining"), "{line}");
        });
        assert_eq!(priority(Level::Error), 3);
        assert_eq!(priority(Level::Warn), 4);
        assert_eq!(priority(Level::Info), 6);
        assert_eq!(priority(Level::Debug), 7);
    }

    #[test]
    fn only_text_and_json_are_formats() {
        assert_eq!(LogFormat::parse("json"), Ok(LogFormat::Json));
        assert_eq!(LogFormat::parse("text"), Ok(LogFormat::Text));
        assert!(LogFormat::parse("JSON")
            .unwrap_err()
            .contains("`text` or `json`"));
    }
}
