//! What a worker counts, and `GET /metrics` in the Prometheus text format (version 0.0.4).
//!
//! Every counter is a relaxed atomic or a short `Mutex<HashMap>` update (~100 ns) on the
//! request path; nothing here does I/O while a request waits. Each worker counts its own
//! requests and labels every series with `worker`, its instance name (not `instance`, which
//! Prometheus reserves for the scrape target and would rename to `exported_instance`).
//! Because SO_REUSEPORT hands a scrape to any one worker, each worker also writes a snapshot
//! of its series to `<data-dir>/metrics/<instance>.json` every [`SNAPSHOT_EVERY`], and `GET /metrics`
//! answers with its own live series plus every sibling's snapshot younger than
//! [`SNAPSHOT_STALE`]: one scrape shows all workers, at most a few seconds behind.
//! A worker removes its snapshot when it stops cleanly; a crashed one's goes stale.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use serde_json::{json, Value};

/// How often a worker writes its snapshot for its siblings.
pub const SNAPSHOT_EVERY: Duration = Duration::from_secs(2);
/// A snapshot older than this belongs to a worker that is gone.
pub const SNAPSHOT_STALE: Duration = Duration::from_secs(10);
/// Directory of the snapshots, inside the data directory.
pub const METRICS_DIR: &str = "metrics";

/// Upper bounds (seconds) of the audit fsync latency histogram's buckets.
const FSYNC_BUCKETS: [f64; 12] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
];

/// Upper bounds (seconds) of the request duration histogram's buckets: OpenTelemetry's
/// advice for `http.server.request.duration`, with three finer buckets below 5 ms, where
/// most of paygate's answers fall.
const DURATION_BUCKETS: [f64; 17] = [
    0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
    7.5, 10.0,
];

/// One request duration histogram series: per-bucket counts (the last is +Inf), sum in ns.
#[derive(Default)]
struct Durations {
    buckets: [u64; DURATION_BUCKETS.len() + 1],
    sum_ns: u64,
}

/// The label of a status code's class: `2xx`, `4xx`, …
fn status_class(status: u16) -> &'static str {
    match status / 100 {
        1 => "1xx",
        2 => "2xx",
        3 => "3xx",
        4 => "4xx",
        _ => "5xx",
    }
}

/// The audit writer's figures, updated by its thread.
#[derive(Default)]
pub struct AuditMetrics {
    /// Records made durable.
    records: AtomicU64,
    /// fdatasync latency: per-bucket counts (the last is +Inf), and the sum in ns.
    fsync_buckets: [AtomicU64; FSYNC_BUCKETS.len() + 1],
    fsync_sum_ns: AtomicU64,
    /// The archive (see `audit::archive`): whether there is one, the sealed segments and
    /// bytes waiting, the last confirmed upload (Unix ms, 0: none yet), failed attempts.
    archive_on: std::sync::atomic::AtomicBool,
    archive_backlog_segments: AtomicU64,
    archive_backlog_bytes: AtomicU64,
    archive_last_upload_ms: AtomicI64,
    archive_last_digest_ms: AtomicI64,
    archive_failures: AtomicU64,
}

impl AuditMetrics {
    pub fn record_commit(&self, records: u64) {
        self.records.fetch_add(records, Ordering::Relaxed);
    }

    /// The sealed segments and bytes not archived yet.
    pub fn archive_backlog(&self, segments: u64, bytes: u64) {
        self.archive_on.store(true, Ordering::Relaxed);
        self.archive_backlog_segments
            .store(segments, Ordering::Relaxed);
        self.archive_backlog_bytes.store(bytes, Ordering::Relaxed);
    }

    /// A segment's upload was confirmed at `at_ms`.
    pub fn archive_uploaded(&self, at_ms: i64) {
        self.archive_last_upload_ms.store(at_ms, Ordering::Relaxed);
    }

    /// A digest's upload was confirmed at `at_ms`.
    pub fn archive_digested(&self, at_ms: i64) {
        self.archive_last_digest_ms.store(at_ms, Ordering::Relaxed);
    }

    /// An upload attempt failed.
    pub fn archive_failed(&self) {
        self.archive_failures.fetch_add(1, Ordering::Relaxed);
    }

    pub fn record_fsync(&self, took: Duration) {
        let seconds = took.as_secs_f64();
        let bucket = FSYNC_BUCKETS
            .iter()
            .position(|&bound| seconds <= bound)
            .unwrap_or(FSYNC_BUCKETS.len());
        self.fsync_buckets[bucket].fetch_add(1, Ordering::Relaxed);
        let ns = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        self.fsync_sum_ns.fetch_add(ns, Ordering::Relaxed);
    }
}

/// A worker's request counters.
/// What this worker's exact cache did (see `cache`): counted there, reported here.
#[derive(Debug, Default)]
pub struct CacheMetrics {
    /// Lookups answered from memory.
    pub hits: AtomicU64,
    /// Lookups that read the database (concurrent ones for one key share a read).
    pub fetches: AtomicU64,
    /// Entries evicted because the change log named what they depend on.
    pub evicted: AtomicU64,
    /// Times the whole cache was dropped: it fell behind the pruned change log, or filled.
    pub dropped: AtomicU64,
}

pub struct Metrics {
    /// What this worker's cache did.
    cache: std::sync::Arc<CacheMetrics>,
    /// This worker's name in every series (its audit instance).
    instance: String,
    /// When this worker started, in seconds since the epoch.
    started_s: f64,
    /// Requests answered, by route label and status.
    requests: Mutex<HashMap<(&'static str, u16), u64>>,
    /// How long requests took, by route label and status class.
    durations: Mutex<HashMap<(&'static str, &'static str), Durations>>,
    /// Requests refused by the rate limiter, by rule (policy name).
    rate_limited: Mutex<HashMap<String, u64>>,
    /// Failed authentication attempts, by method (`basic`, `bearer-jwt`, …).
    auth_failures: Mutex<HashMap<&'static str, u64>>,
    /// TLS connections being served now.
    open_connections: AtomicI64,
    /// Connections closed at once because their address held its share.
    refused_connections: std::sync::atomic::AtomicU64,
}

fn count<K: std::hash::Hash + Eq>(map: &Mutex<HashMap<K, u64>>, key: K) {
    // Plain counters: a panic elsewhere cannot leave them inconsistent.
    let mut map = map.lock().unwrap_or_else(|p| p.into_inner());
    *map.entry(key).or_insert(0) += 1;
}

impl Metrics {
    pub fn new(instance: &str) -> Metrics {
        Metrics {
            cache: std::sync::Arc::default(),
            instance: instance.to_owned(),
            started_s: crate::time::now_millis() as f64 / 1000.0,
            requests: Mutex::default(),
            durations: Mutex::default(),
            rate_limited: Mutex::default(),
            auth_failures: Mutex::default(),
            open_connections: AtomicI64::new(0),
            refused_connections: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// The counters the worker's cache keeps.
    pub fn cache(&self) -> std::sync::Arc<CacheMetrics> {
        self.cache.clone()
    }

    /// Counts a connection closed because its address held its share of the slots.
    pub fn connection_refused(&self) {
        self.refused_connections.fetch_add(1, Ordering::Relaxed);
    }

    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// Counts an answered request and how long it took, from its first byte read to its
    /// response handed to hyper.
    pub fn request(&self, route: &'static str, status: u16, took: Duration) {
        count(&self.requests, (route, status));
        let seconds = took.as_secs_f64();
        let bucket = DURATION_BUCKETS
            .iter()
            .position(|&bound| seconds <= bound)
            .unwrap_or(DURATION_BUCKETS.len());
        let ns = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        let mut map = self.durations.lock().unwrap_or_else(|p| p.into_inner());
        let series = map.entry((route, status_class(status))).or_default();
        series.buckets[bucket] += 1;
        series.sum_ns = series.sum_ns.saturating_add(ns);
    }

    pub fn rate_limited(&self, rule: &str) {
        let mut map = self.rate_limited.lock().unwrap_or_else(|p| p.into_inner());
        match map.get_mut(rule) {
            Some(n) => *n += 1,
            None => {
                map.insert(rule.to_owned(), 1);
            }
        }
    }

    pub fn auth_failure(&self, method: &'static str) {
        count(&self.auth_failures, method);
    }

    /// Counts a connection as open until the guard is dropped.
    pub fn connection(&self) -> OpenConnection<'_> {
        self.open_connections.fetch_add(1, Ordering::Relaxed);
        OpenConnection(&self.open_connections)
    }

    /// This worker's series, as samples.
    pub fn snapshot(&self, audit: Option<&AuditMetrics>) -> Vec<Sample> {
        let worker = || vec![("worker".to_owned(), self.instance.clone())];
        let with = |name: &str, value: &str| {
            let mut labels = worker();
            labels.push((name.to_owned(), value.to_owned()));
            labels
        };
        let mut samples = Vec::new();
        let push = |samples: &mut Vec<Sample>, family: &'static str, labels, value: f64| {
            samples.push(Sample {
                family,
                suffix: "",
                labels,
                value,
            });
        };
        {
            let requests = self.requests.lock().unwrap_or_else(|p| p.into_inner());
            for ((route, status), n) in requests.iter() {
                let mut labels = with("route", route);
                labels.push(("status".to_owned(), status.to_string()));
                push(&mut samples, "paygate_requests_total", labels, *n as f64);
            }
        }
        {
            let durations = self.durations.lock().unwrap_or_else(|p| p.into_inner());
            for ((route, class), series) in durations.iter() {
                let mut labels = with("route", route);
                labels.push(("status_class".to_owned(), (*class).to_owned()));
                let histogram = Histogram {
                    family: "paygate_http_server_request_duration_seconds",
                    labels,
                    bounds: &DURATION_BUCKETS,
                    counts: &series.buckets,
                    sum_ns: series.sum_ns,
                };
                histogram.push_to(&mut samples);
            }
        }
        {
            let limited = self.rate_limited.lock().unwrap_or_else(|p| p.into_inner());
            for (rule, n) in limited.iter() {
                let labels = with("rule", rule);
                push(
                    &mut samples,
                    "paygate_rate_limited_total",
                    labels,
                    *n as f64,
                );
            }
        }
        {
            let failures = self.auth_failures.lock().unwrap_or_else(|p| p.into_inner());
            for (method, n) in failures.iter() {
                let labels = with("method", method);
                push(
                    &mut samples,
                    "paygate_auth_failures_total",
                    labels,
                    *n as f64,
                );
            }
        }
        let open = self.open_connections.load(Ordering::Relaxed) as f64;
        push(&mut samples, "paygate_open_connections", worker(), open);
        let refused = self.refused_connections.load(Ordering::Relaxed) as f64;
        push(
            &mut samples,
            "paygate_connections_refused_total",
            worker(),
            refused,
        );
        let started = self.started_s;
        push(
            &mut samples,
            "paygate_worker_start_time_seconds",
            worker(),
            started,
        );
        let cache = &self.cache;
        for (result, n) in [("hit", &cache.hits), ("fetched", &cache.fetches)] {
            let n = n.load(Ordering::Relaxed) as f64;
            let labels = with("result", result);
            push(&mut samples, "paygate_cache_lookups_total", labels, n);
        }
        for (reason, n) in [("change", &cache.evicted), ("all", &cache.dropped)] {
            let n = n.load(Ordering::Relaxed) as f64;
            let labels = with("reason", reason);
            push(&mut samples, "paygate_cache_evictions_total", labels, n);
        }
        if let Some(audit) = audit {
            let records = audit.records.load(Ordering::Relaxed) as f64;
            push(
                &mut samples,
                "paygate_audit_records_total",
                worker(),
                records,
            );
            let counts = audit
                .fsync_buckets
                .each_ref()
                .map(|b| b.load(Ordering::Relaxed));
            let histogram = Histogram {
                family: "paygate_audit_fsync_seconds",
                labels: worker(),
                bounds: &FSYNC_BUCKETS,
                counts: &counts,
                sum_ns: audit.fsync_sum_ns.load(Ordering::Relaxed),
            };
            histogram.push_to(&mut samples);
            if audit.archive_on.load(Ordering::Relaxed) {
                let load = |n: &AtomicU64| n.load(Ordering::Relaxed) as f64;
                let backlog = load(&audit.archive_backlog_segments);
                push(
                    &mut samples,
                    "paygate_audit_archive_backlog_segments",
                    worker(),
                    backlog,
                );
                let bytes = load(&audit.archive_backlog_bytes);
                push(
                    &mut samples,
                    "paygate_audit_archive_backlog_bytes",
                    worker(),
                    bytes,
                );
                let last = audit.archive_last_upload_ms.load(Ordering::Relaxed) as f64 / 1000.0;
                push(
                    &mut samples,
                    "paygate_audit_archive_last_upload_time_seconds",
                    worker(),
                    last,
                );
                let digest = audit.archive_last_digest_ms.load(Ordering::Relaxed) as f64 / 1000.0;
                push(
                    &mut samples,
                    "paygate_audit_archive_last_digest_time_seconds",
                    worker(),
                    digest,
                );
                let failures = load(&audit.archive_failures);
                push(
                    &mut samples,
                    "paygate_audit_archive_failures_total",
                    worker(),
                    failures,
                );
            }
        }
        samples
    }
}

/// One histogram series, ready to become its `_bucket`, `_sum` and `_count` samples.
struct Histogram<'a> {
    family: &'static str,
    labels: Vec<(String, String)>,
    /// The buckets' upper bounds; `counts` has one more, for +Inf.
    bounds: &'a [f64],
    /// Observations per bucket (not cumulative).
    counts: &'a [u64],
    sum_ns: u64,
}

impl Histogram<'_> {
    fn push_to(self, samples: &mut Vec<Sample>) {
        let mut cumulative = 0;
        for (i, n) in self.counts.iter().enumerate() {
            cumulative += n;
            let le = self
                .bounds
                .get(i)
                .map_or_else(|| "+Inf".to_owned(), |b| b.to_string());
            let mut labels = self.labels.clone();
            labels.push(("le".to_owned(), le));
            samples.push(Sample {
                family: self.family,
                suffix: "_bucket",
                labels,
                value: cumulative as f64,
            });
        }
        samples.push(Sample {
            family: self.family,
            suffix: "_sum",
            labels: self.labels.clone(),
            value: self.sum_ns as f64 / 1e9,
        });
        samples.push(Sample {
            family: self.family,
            suffix: "_count",
            labels: self.labels,
            value: cumulative as f64,
        });
    }
}

/// An open connection, counted until dropped.
pub struct OpenConnection<'a>(&'a AtomicI64);

impl Drop for OpenConnection<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One sample: `<family><suffix>{labels} value`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub family: &'static str,
    pub suffix: &'static str,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

/// Every family, in the order they are rendered: name, type, help.
const FAMILIES: [(&str, &str, &str); 16] = [
    (
        "paygate_requests_total",
        "counter",
        "Requests answered, by route and status.",
    ),
    (
        "paygate_http_server_request_duration_seconds",
        "histogram",
        "Time from a request's arrival to its response, by route and status class.",
    ),
    (
        "paygate_rate_limited_total",
        "counter",
        "Requests refused with 429, by rate-limit rule.",
    ),
    (
        "paygate_auth_failures_total",
        "counter",
        "Credentials that failed to authenticate, by method.",
    ),
    (
        "paygate_audit_records_total",
        "counter",
        "Audit records made durable.",
    ),
    (
        "paygate_audit_fsync_seconds",
        "histogram",
        "Latency of the audit log's fdatasync per group commit.",
    ),
    (
        "paygate_audit_archive_backlog_segments",
        "gauge",
        "Sealed audit segments not yet confirmed in the archive.",
    ),
    (
        "paygate_audit_archive_backlog_bytes",
        "gauge",
        "Bytes of sealed audit segments not yet confirmed in the archive.",
    ),
    (
        "paygate_audit_archive_last_upload_time_seconds",
        "gauge",
        "When the last audit segment upload was confirmed, in seconds since the Unix epoch (0: none since start).",
    ),
    (
        "paygate_audit_archive_last_digest_time_seconds",
        "gauge",
        "When the last signed digest upload was confirmed, in seconds since the Unix epoch (0: none since start).",
    ),
    (
        "paygate_audit_archive_failures_total",
        "counter",
        "Audit segment and digest uploads that failed (they are retried).",
    ),
    (
        "paygate_open_connections",
        "gauge",
        "Client connections being served.",
    ),
    (
        "paygate_connections_refused_total",
        "counter",
        "Connections closed at once because their client address held its share.",
    ),
    (
        "paygate_worker_start_time_seconds",
        "gauge",
        "When the worker started, in seconds since the Unix epoch.",
    ),
    (
        "paygate_cache_lookups_total",
        "counter",
        "Lookups of token state, grants, capabilities and payments: answered from the worker's cache (hit) or read from the database (fetched).",
    ),
    (
        "paygate_cache_evictions_total",
        "counter",
        "Cache entries evicted because the change log named them (change), and whole-cache drops (all).",
    ),
];

/// Writes `samples` as one Prometheus text exposition: each family once, with its HELP
/// and TYPE, then its samples.
pub fn render(samples: &[Sample]) -> String {
    let mut out = String::with_capacity(4096);
    for (family, kind, help) in FAMILIES {
        let _ = writeln!(out, "# HELP {family} {help}\n# TYPE {family} {kind}");
        for sample in samples.iter().filter(|s| s.family == family) {
            out.push_str(family);
            out.push_str(sample.suffix);
            out.push('{');
            for (i, (name, value)) in sample.labels.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                let _ = write!(out, "{name}=\"{}\"", escape_label(value));
            }
            let _ = writeln!(out, "}} {}", sample.value);
        }
    }
    out
}

/// Label values escape `\`, `"` and newlines.
fn escape_label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn snapshot_path(data_dir: &Path, instance: &str) -> PathBuf {
    data_dir.join(METRICS_DIR).join(format!("{instance}.json"))
}

/// Writes this worker's samples for its siblings (atomically: temporary file, rename).
/// Blocking.
pub fn write_snapshot(data_dir: &Path, instance: &str, samples: &[Sample]) -> std::io::Result<()> {
    let dir = data_dir.join(METRICS_DIR);
    crate::secret_file::create_private_dir(&dir)?;
    let rows: Vec<Value> = samples
        .iter()
        .map(|s| json!([s.family, s.suffix, s.labels, s.value]))
        .collect();
    let path = snapshot_path(data_dir, instance);
    let temporary = dir.join(format!(".{instance}.json.tmp"));
    {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&temporary)?
            .write_all(Value::Array(rows).to_string().as_bytes())?;
    }
    std::fs::rename(&temporary, &path)
}

/// Removes this worker's snapshot (a clean stop). Blocking.
pub fn remove_snapshot(data_dir: &Path, instance: &str) {
    let _ = std::fs::remove_file(snapshot_path(data_dir, instance));
}

/// The samples of every other worker whose snapshot is fresh. Unreadable or malformed
/// snapshots are skipped: metrics never fail a scrape. Blocking.
pub fn sibling_samples(data_dir: &Path, instance: &str) -> Vec<Sample> {
    let Ok(entries) = std::fs::read_dir(data_dir.join(METRICS_DIR)) else {
        return Vec::new();
    };
    let mut samples = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(sibling) = name.to_str().and_then(|n| n.strip_suffix(".json")) else {
            continue;
        };
        if sibling == instance || sibling.starts_with('.') {
            continue;
        }
        let fresh = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age < SNAPSHOT_STALE);
        if !fresh {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(entry.path()) else {
            continue;
        };
        let Ok(Value::Array(rows)) = serde_json::from_str::<Value>(&text) else {
            continue;
        };
        samples.extend(rows.iter().filter_map(parse_sample));
    }
    samples
}

fn parse_sample(row: &Value) -> Option<Sample> {
    let [family, suffix, labels, value] = row.as_array()?.as_slice() else {
        return None;
    };
    // Only families and suffixes this build knows: a snapshot cannot inject lines.
    let family = FAMILIES
        .iter()
        .map(|(f, _, _)| *f)
        .find(|f| Some(*f) == family.as_str())?;
    let suffix = ["", "_bucket", "_sum", "_count"]
        .into_iter()
        .find(|s| Some(*s) == suffix.as_str())?;
    let labels = labels
        .as_array()?
        .iter()
        .map(|pair| match pair.as_array()?.as_slice() {
            [name, value] => {
                let name = name.as_str()?;
                let plain =
                    !name.is_empty() && name.bytes().all(|b| b.is_ascii_lowercase() || b == b'_');
                plain.then_some((name.to_owned(), value.as_str()?.to_owned()))
            }
            _ => None,
        })
        .collect::<Option<Vec<_>>>()?;
    Some(Sample {
        family,
        suffix,
        labels,
        value: value.as_f64()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_each_family_once_with_escaped_labels() {
        let metrics = Metrics::new("w\"1");
        metrics.request("GET /apiStatus", 200, Duration::from_micros(300));
        metrics.request("GET /apiStatus", 200, Duration::from_millis(3));
        metrics.request("GET /apiStatus", 404, Duration::from_secs(20));
        metrics.rate_limited("default");
        metrics.auth_failure("basic");
        let audit = AuditMetrics::default();
        audit.record_commit(3);
        audit.record_fsync(Duration::from_micros(80));
        audit.record_fsync(Duration::from_secs(1));
        let text = render(&metrics.snapshot(Some(&audit)));
        assert!(text.contains(
            "paygate_requests_total{worker=\"w\\\"1\",route=\"GET /apiStatus\",status=\"200\"} 2\n"
        ));
        assert!(text.contains("paygate_rate_limited_total{worker=\"w\\\"1\",rule=\"default\"} 1\n"));
        let durations = "paygate_http_server_request_duration_seconds";
        let series = |suffix: &str, rest: &str| {
            format!("{durations}{suffix}{{worker=\"w\\\"1\",route=\"GET /apiStatus\",{rest}")
        };
        for (class, le, n) in [
            ("2xx", "0.0005", 1),
            ("2xx", "0.0025", 1),
            ("2xx", "0.005", 2),
            ("2xx", "+Inf", 2),
            ("4xx", "10", 0),
            ("4xx", "+Inf", 1),
        ] {
            let line = series(
                "_bucket",
                &format!("status_class=\"{class}\",le=\"{le}\"}} {n}\n"),
            );
            assert!(text.contains(&line), "{line} in {text}");
        }
        assert!(text.contains(&series("_count", "status_class=\"2xx\"} 2\n")));
        assert!(text.contains(&series("_sum", "status_class=\"2xx\"} 0.0033\n")));
        let series = |suffix: &str, rest: &str| {
            format!(
                "paygate_http_server_request_duration_seconds{suffix}\
                 {{worker=\"w\\\"1\",route=\"GET /apiStatus\",{rest}"
            )
        };
        for (class, le, n) in [
            ("2xx", "0.0005", 1),
            ("2xx", "0.0025", 1),
            ("2xx", "0.005", 2),
            ("2xx", "+Inf", 2),
            ("4xx", "10", 0),
            ("4xx", "+Inf", 1),
        ] {
            let rest = format!("status_class=\"{class}\",le=\"{le}\"}} {n}\n");
            let line = series("_bucket", &rest);
            assert!(text.contains(&line), "{line} in {text}");
        }
        assert!(text.contains(&series("_count", "status_class=\"2xx\"} 2\n")));
        assert!(text.contains(&series("_sum", "status_class=\"2xx\"} 0.0033\n")));
        assert!(text.contains("paygate_audit_records_total{worker=\"w\\\"1\"} 3\n"));
        assert!(text
            .contains("paygate_audit_fsync_seconds_bucket{worker=\"w\\\"1\",le=\"0.00005\"} 0\n"));
        assert!(text
            .contains("paygate_audit_fsync_seconds_bucket{worker=\"w\\\"1\",le=\"0.0001\"} 1\n"));
        assert!(
            text.contains("paygate_audit_fsync_seconds_bucket{worker=\"w\\\"1\",le=\"+Inf\"} 2\n")
        );
        assert!(text.contains("paygate_audit_fsync_seconds_count{worker=\"w\\\"1\"} 2\n"));
        assert_eq!(
            text.matches("# TYPE paygate_requests_total counter")
                .count(),
            1
        );
        let connection = metrics.connection();
        assert!(render(&metrics.snapshot(None))
            .contains("paygate_open_connections{worker=\"w\\\"1\"} 1\n"));
        drop(connection);
        assert!(render(&metrics.snapshot(None))
            .contains("paygate_open_connections{worker=\"w\\\"1\"} 0\n"));
    }

    #[test]
    fn siblings_snapshots_merge_and_stale_or_forged_ones_do_not() {
        let dir = std::env::temp_dir().join(format!("paygate-metrics-{}", uuid::Uuid::new_v4()));
        let one = Metrics::new("1");
        one.request("GET /apiStatus", 200, Duration::ZERO);
        let two = Metrics::new("2");
        two.request("GET /apiStatus", 429, Duration::ZERO);
        write_snapshot(&dir, "1", &one.snapshot(None)).unwrap();
        write_snapshot(&dir, "2", &two.snapshot(None)).unwrap();
        // A snapshot naming an unknown family is ignored row by row.
        std::fs::write(
            dir.join(METRICS_DIR).join("3.json"),
            r#"[["evil_total\n","",[],1],["paygate_open_connections","",[["worker","3"]],4]]"#,
        )
        .unwrap();
        let mut samples = one.snapshot(None);
        samples.extend(sibling_samples(&dir, "1"));
        let text = render(&samples);
        assert!(text.contains("{worker=\"1\",route=\"GET /apiStatus\",status=\"200\"} 1\n"));
        assert!(text.contains("{worker=\"2\",route=\"GET /apiStatus\",status=\"429\"} 1\n"));
        assert!(text.contains("paygate_open_connections{worker=\"3\"} 4\n"));
        assert!(!text.contains("evil"));
        assert_eq!(text.matches("# HELP paygate_requests_total").count(), 1);
        // A worker that stopped writing (crashed) drops out once its snapshot is stale.
        let old = std::time::SystemTime::now() - SNAPSHOT_STALE - Duration::from_secs(1);
        std::fs::File::options()
            .write(true)
            .open(dir.join(METRICS_DIR).join("3.json"))
            .and_then(|f| f.set_modified(old))
            .unwrap();
        assert!(!render(&sibling_samples(&dir, "1")).contains("worker=\"3\""));
        remove_snapshot(&dir, "2");
        assert!(!render(&sibling_samples(&dir, "1")).contains("worker=\"2\""));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
