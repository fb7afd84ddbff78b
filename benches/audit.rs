//! Criterion benches for the audit log. Run with `cargo bench --bench audit`.
//!
//! - `audit/seal`: serialising a request record and chaining it (HMAC-SHA256): the CPU a
//!   record costs before any I/O.
//! - `audit_durable/group_commit/N`: N concurrent writers each make one record durable
//!   (queued, written and fdatasync'd together); throughput is records per second.
//! - `audit_durable/fsync_per_record`: the baseline without group commit — one `write` and
//!   one `fdatasync` per record, same record size, same file system.
//! - `audit_start/…`: opening a worker's audit log, which verifies its chain against the
//!   checkpoint before appending: a 64 MiB newest file (the default rotation size, so the
//!   most one start walks), and 256 MiB of rotated history with an 8 MiB newest file
//!   (history costs nothing).

use std::io::Write as _;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

use paygate::audit::record::{body_of, seal, RequestRecord, GENESIS};
use paygate::audit::{AuditLog, Rotation};

/// A log that never rotates while measured.
fn unbounded() -> Rotation {
    Rotation {
        bytes: 1 << 40,
        interval: std::time::Duration::from_secs(1 << 30),
    }
}

fn sample(time: &str) -> RequestRecord<'_> {
    RequestRecord {
        time,
        phase: "request",
        request_id: "0190f3a2-7c1e-7d2a-9b4e-1a2b3c4d5e6f",
        worker: "1",
        pid: 4242,
        client_ip: std::net::IpAddr::from([127, 0, 0, 1]),
        principal: Some("alice"),
        claimed: None,
        auth: "bearer-jwt",
        auth_result: Some("ok"),
        auth_reason: None,
        capability: None,
        method: "GET",
        path: "/accounts/0190f3a2-7c1e-7d2a-9b4e-1a2b3c4d5e6f/payments/0190f3a2-7c1e-7d2a-9b4e-aaaaaaaaaaaa",
        op: "R",
    }
}

fn bench_audit(c: &mut Criterion) {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &[7; 32]);
    let time = paygate::time::format_rfc3339_millis(paygate::time::now_millis());
    let mut line = Vec::with_capacity(1024);
    c.bench_function("audit/seal", |b| {
        b.iter(|| {
            line.clear();
            let body = body_of(&sample(&time));
            seal(&key, &GENESIS, 1, &body, &mut line)
        })
    });

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let dir = std::env::temp_dir().join(format!("paygate-bench-audit-{}", uuid::Uuid::new_v4()));
    let log = Arc::new(AuditLog::open(&dir, Some("bench"), unbounded(), true).expect("audit log"));
    let mut group = c.benchmark_group("audit_durable");
    group.sample_size(20);
    for writers in [1u64, 16, 64] {
        group.throughput(Throughput::Elements(writers));
        group.bench_function(BenchmarkId::new("group_commit", writers), |b| {
            b.iter(|| {
                runtime.block_on(async {
                    let mut tasks = Vec::with_capacity(writers as usize);
                    for _ in 0..writers {
                        let (log, time) = (log.clone(), time.clone());
                        tasks.push(tokio::spawn(async move {
                            log.append_durably(&sample(&time)).await
                        }));
                    }
                    for task in tasks {
                        task.await.expect("task").expect("durable");
                    }
                })
            })
        });
    }
    let baseline = dir.join("fsync-per-record.jsonl");
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&baseline)
        .expect("file");
    let mut line = Vec::new();
    seal(&key, &GENESIS, 1, &body_of(&sample(&time)), &mut line);
    group.throughput(Throughput::Elements(1));
    group.bench_function("fsync_per_record", |b| {
        b.iter(|| {
            file.write_all(&line).expect("write");
            file.sync_data().expect("fdatasync");
        })
    });
    group.finish();
    log.close();
    let _ = std::fs::remove_dir_all(dir);
}

/// A data directory whose chain `1` holds `files` files of about `bytes_each`, with its
/// checkpoint at the last record, as a clean stop leaves it.
fn chain_on_disk(files: u32, bytes_each: usize) -> std::path::PathBuf {
    use paygate::audit::record::checkpoint_mac;
    use paygate::store::{Checkpoint, Checkpoints};
    let data = std::env::temp_dir().join(format!("paygate-bench-start-{}", uuid::Uuid::new_v4()));
    let audit = data.join(paygate::audit::AUDIT_DIR);
    let dir = audit.join("1");
    paygate::secret_file::create_private_dir(&dir).expect("dir");
    let key = paygate::audit::load_or_create_key(&data).expect("key");
    let time = paygate::time::format_rfc3339_millis(paygate::time::now_millis());
    let body = body_of(&sample(&time));
    let (mut seq, mut chain) = (0u64, GENESIS);
    let mut bytes = Vec::with_capacity(bytes_each + 1024);
    for number in 1..=files {
        bytes.clear();
        while bytes.len() < bytes_each {
            seq += 1;
            chain = seal(&key, &chain, seq, &body, &mut bytes);
        }
        let path = dir.join(paygate::audit::writer::file_name(number));
        std::fs::write(path, &bytes).expect("write");
    }
    let checkpoints = Checkpoints::open(&audit).expect("checkpoints");
    let checkpoint = Checkpoint {
        records: seq,
        head: chain,
        mac: Some(checkpoint_mac(&key, "1", seq, &chain)),
    };
    checkpoints.save("1", &checkpoint).expect("checkpoint");
    data
}

fn bench_start(c: &mut Criterion) {
    let mut group = c.benchmark_group("audit_start");
    group.sample_size(10);
    for (name, files, each) in [
        ("newest_64MiB", 1, 64 << 20),
        ("history_256MiB_newest_8MiB", 33, 8 << 20),
    ] {
        let data = chain_on_disk(files, each);
        group.bench_function(name, |b| {
            b.iter(|| {
                let log = AuditLog::open(&data, Some("1"), unbounded(), true).expect("open");
                log.close();
            })
        });
        let _ = std::fs::remove_dir_all(data);
    }
    group.finish();
}

criterion_group!(benches, bench_audit, bench_start);
criterion_main!(benches);
