//! The audit archive with a real S3 service (SeaweedFS, a server of this test's own from
//! `scripts/s3.sh`, so that it can be stopped): sealed segments arrive byte for byte under
//! Object Lock; while the service is down they wait on local disk and `/metrics` shows the
//! backlog; once it is back every one arrives.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http::Method;
use paygate::s3::{Bucket, Credentials};

use common::{serve_logging, signal, wait_exit, Client, StopOnDrop, TempDir};

/// A SeaweedFS of this test's own, stopped and removed when dropped.
struct Seaweed {
    dir: PathBuf,
    endpoint: String,
    access: String,
    secret: String,
}

fn s3_script(args: &[&str]) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/s3.sh");
    let out = std::process::Command::new("bash")
        .arg(script)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "s3.sh {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

impl Seaweed {
    fn start() -> Seaweed {
        let out = s3_script(&["start"]);
        let field = |name: &str| {
            out.lines()
                .find_map(|l| l.strip_prefix(&format!("{name}=")))
                .unwrap()
                .to_owned()
        };
        Seaweed {
            dir: PathBuf::from(field("S3_DIR")),
            endpoint: field("PAYGATE_TEST_S3_ENDPOINT"),
            access: field("PAYGATE_TEST_S3_ACCESS_KEY"),
            secret: field("PAYGATE_TEST_S3_SECRET_KEY"),
        }
    }

    fn bucket(&self, name: &str) -> Bucket {
        let credentials = Credentials {
            access_key_id: self.access.clone(),
            secret_access_key: self.secret.clone(),
        };
        let ca = Path::new("/etc/ssl/certs/ca-certificates.crt");
        Bucket::new(&self.endpoint, "us-east-1", name, credentials, ca).unwrap()
    }
}

impl Drop for Seaweed {
    fn drop(&mut self) {
        let _ = std::process::Command::new("bash")
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/s3.sh"))
            .args(["stop", &self.dir.to_string_lossy()])
            .output();
    }
}

/// The sealed files of the worker's chain (every one but the newest), with their bytes.
fn sealed(chain: &Path) -> Vec<(String, Vec<u8>)> {
    let files = paygate::audit::writer::log_files(chain).unwrap();
    let count = files.len().saturating_sub(1);
    files
        .into_iter()
        .take(count)
        .map(|(_, path)| {
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(path).unwrap())
        })
        .collect()
}

/// Waits (up to `secs`) until every sealed file is in the bucket with the same bytes, and
/// returns how many there were.
async fn all_arrive(bucket: &Bucket, chain: &Path, secs: u64) -> usize {
    let mut missing = Vec::new();
    for _ in 0..secs * 4 {
        missing.clear();
        let local = sealed(chain);
        for (name, bytes) in &local {
            let key = format!("audit/node-a/1/{name}");
            match bucket.get(&key).await {
                Ok(Some(there)) if there.as_ref() == bytes.as_slice() => {}
                other => missing.push(format!("{key}: {other:?}")),
            }
        }
        if missing.is_empty() && !local.is_empty() {
            return local.len();
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    panic!("not archived: {missing:?}");
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}{{worker=\"1\"}} ")))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn segments_reach_the_archive_and_an_outage_loses_none() {
    let seaweed = Seaweed::start();
    let bucket = seaweed.bucket("paygate-archive");
    let lock = [("x-amz-bucket-object-lock-enabled", "true".to_owned())];
    let created = bucket
        .send(Method::PUT, "", &[], &lock, Bytes::new())
        .await
        .unwrap();
    assert!(created.status.is_success(), "{created:?}");

    let dir = TempDir::new("archive");
    let credentials = dir.0.join("s3.credentials");
    std::fs::write(
        &credentials,
        format!(
            "AWS_ACCESS_KEY_ID={}\nAWS_SECRET_ACCESS_KEY={}\n",
            seaweed.access, seaweed.secret
        ),
    )
    .unwrap();
    std::fs::set_permissions(
        &credentials,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let credentials = credentials.to_string_lossy().into_owned();
    let args = [
        "--audit-archive",
        "s3://paygate-archive/audit",
        "--audit-archive-endpoint",
        &seaweed.endpoint,
        "--audit-archive-credentials",
        &credentials,
        "--audit-archive-node",
        "node-a",
        "--audit-archive-retention",
        "1",
        "--audit-rotate-interval",
        "1",
        "--rate-limit",
        "none",
    ];
    let (child, addr, log) = serve_logging(&dir, &args, "info");
    let mut child = StopOnDrop(child);
    let client = Client::new(addr, &dir.0.join("certs/server.crt"));
    let chain = dir.0.join("data/audit/1");
    let traffic = |seconds: u64| {
        let client = client.clone();
        async move {
            for _ in 0..seconds * 10 {
                assert_eq!(client.get("/apiStatus").send().await.status, 200);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };

    // Segments sealed every second arrive, byte for byte.
    traffic(3).await;
    let first = all_arrive(&bucket, &chain, 60).await;
    assert!(first >= 2, "{first} segments");

    // The service goes away under load: segments wait on local disk, /metrics shows them.
    s3_script(&["down", &seaweed.dir.to_string_lossy()]);
    traffic(4).await;
    let mut backlog = 0.0;
    for _ in 0..100 {
        let text = client.get("/metrics").send().await.text();
        backlog = metric(&text, "paygate_audit_archive_backlog_segments");
        if backlog >= 2.0 && metric(&text, "paygate_audit_archive_failures_total") >= 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(backlog >= 2.0, "backlog {backlog}");
    assert!(
        log.lock().unwrap().contains("segments wait on local disk"),
        "{}",
        log.lock().unwrap()
    );

    // Back: every segment arrives, the backlog empties.
    s3_script(&["up", &seaweed.dir.to_string_lossy()]);
    let all = all_arrive(&bucket, &chain, 120).await;
    assert!(all >= first + 2, "{all} segments");
    let text = client.get("/metrics").send().await.text();
    assert!(metric(&text, "paygate_audit_archive_last_upload_time_seconds") > 0.0);

    // Each archived segment is retained in COMPLIANCE mode.
    let listed = bucket.list("audit/node-a/1/").await.unwrap();
    assert!(listed.len() >= all, "{listed:?}");
    for object in &listed {
        let retention = bucket
            .send(
                Method::GET,
                &object.key,
                &[("retention", "")],
                &[],
                Bytes::new(),
            )
            .await
            .unwrap();
        let text = String::from_utf8_lossy(&retention.body);
        assert!(
            text.contains("<Mode>COMPLIANCE</Mode>"),
            "{}: {text}",
            object.key
        );
    }
    signal(&child.0, "TERM");
    assert!(wait_exit(&mut child.0).success());
}
