//! The audit archive with a real S3 service (SeaweedFS, a server of this test's own from
//! `scripts/s3.sh`, so that it can be stopped): sealed segments arrive byte for byte under
//! Object Lock; while the service is down they wait on local disk and `/metrics` shows the
//! backlog; once it is back every one arrives and `paygate audit verify --archive` passes.
//! On a bucket without Object Lock, every kind of tampering an attacker could try is named
//! by the verifier; local copies go once digested, and the chain still verifies and
//! continues from the files that remain.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http::Method;
use paygate::s3::{Bucket, Credentials};

use common::{
    paygate_command, serve_logging, signal, verify_audit, wait_exit, Client, StopOnDrop, TempDir,
};

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

    /// Creates bucket `name` (with Object Lock when `lock`), retrying while the service
    /// is still starting.
    async fn create_bucket(&self, name: &str, lock: bool) -> Bucket {
        let bucket = self.bucket(name);
        let headers = [("x-amz-bucket-object-lock-enabled", "true".to_owned())];
        let headers = if lock { &headers[..] } else { &[][..] };
        let mut last = None;
        for _ in 0..120 {
            match bucket
                .send(Method::PUT, "", &[], headers, Bytes::new())
                .await
            {
                Ok(answer) if answer.status.is_success() => return bucket,
                other => last = Some(format!("{other:?}")),
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        panic!("cannot create bucket {name}: {last:?}");
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

/// Writes the service's access key to a 0600 file in `dir` and returns its path.
fn credentials_file(dir: &TempDir, seaweed: &Seaweed) -> String {
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
    credentials.to_string_lossy().into_owned()
}

/// The options of a node `node-a` that archives to `bucket` every second (segments sealed
/// and digests written each second), followed by `extra`.
fn archiving(seaweed: &Seaweed, bucket: &str, credentials: &str, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "--audit-archive",
        &format!("s3://{bucket}/audit"),
        "--audit-archive-endpoint",
        &seaweed.endpoint,
        "--audit-archive-credentials",
        credentials,
        "--audit-archive-node",
        "node-a",
        "--audit-rotate-interval",
        "1",
        "--audit-digest-interval",
        "1",
        "--rate-limit",
        "none",
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    args.extend(extra.iter().map(|a| a.to_string()));
    args
}

/// The node's audit signing public key, as `paygate audit public-key` prints it.
fn public_key(dir: &TempDir) -> String {
    let out = paygate_command(dir)
        .args(["audit", "public-key"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// Runs `paygate audit verify --archive s3://BUCKET/audit` in `dir` with `extra`; returns
/// its exit code and what it printed.
fn verify_archive(
    dir: &TempDir,
    seaweed: &Seaweed,
    bucket: &str,
    credentials: &str,
    extra: &[&str],
) -> (i32, String) {
    let out = paygate_command(dir)
        .args([
            "audit",
            "verify",
            "--archive",
            &format!("s3://{bucket}/audit"),
        ])
        .args(["--audit-archive-endpoint", &seaweed.endpoint])
        .args(["--audit-archive-credentials", credentials])
        .args(extra)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

/// The number of segments the verifier found listed in digests for the chain.
fn listed_segments(report: &str) -> usize {
    report
        .lines()
        .find(|l| l.starts_with("chain node-a/1:"))
        .and_then(|l| l.split("; ").nth(1))
        .and_then(|part| part.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// The number of verified digests the verifier found for the chain.
fn digests(report: &str) -> usize {
    report
        .lines()
        .find_map(|l| l.strip_prefix("chain node-a/1: "))
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// The problems a failed verification listed.
fn problems(report: &str) -> Vec<&str> {
    report
        .lines()
        .skip_while(|l| !l.starts_with("audit archive NOT OK"))
        .skip(1)
        .collect()
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
    let bucket = seaweed.create_bucket("paygate-archive", true).await;

    let dir = TempDir::new("archive");
    let credentials = credentials_file(&dir, &seaweed);
    let args = archiving(
        &seaweed,
        "paygate-archive",
        &credentials,
        &["--audit-archive-retention", "1"],
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
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

    // The auditor's check, with the public key and the audit key: every digest, segment
    // and record of the outage run verifies.
    let key = public_key(&dir);
    let (code, report) = verify_archive(
        &dir,
        &seaweed,
        "paygate-archive",
        &credentials,
        &["--public-key", &key, "--audit-key", "data/audit.key"],
    );
    assert_eq!(code, 0, "{report}");
    assert!(report.contains("audit archive OK"), "{report}");
    assert!(
        report.contains("records verified with the audit key"),
        "{report}"
    );
    assert!(listed_segments(&report) >= 2, "{report}");
}

/// Rewrites an object on a bucket without Object Lock (create-only uploads cannot).
async fn overwrite(bucket: &Bucket, key: &str, bytes: Bytes) {
    bucket.delete(key).await.unwrap();
    let put = bucket.put_new(key, bytes, None).await.unwrap();
    assert!(matches!(put, paygate::s3::Put::Created { .. }), "{key}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kind_of_tampering_with_the_archive_is_named() {
    let seaweed = Seaweed::start();
    let bucket = seaweed.create_bucket("paygate-plain", false).await;
    let dir = TempDir::new("archive-tamper");
    let credentials = credentials_file(&dir, &seaweed);
    let args = archiving(
        &seaweed,
        "paygate-plain",
        &credentials,
        &[
            "--audit-local-retention",
            "0",
            "--audit-archive-retention",
            "0",
        ],
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (child, addr, _log) = serve_logging(&dir, &args, "info");
    let mut child = StopOnDrop(child);
    let client = Client::new(addr, &dir.0.join("certs/server.crt"));
    let key = public_key(&dir);
    let verify = |extra: &[&str]| {
        let mut all = vec!["--public-key", &key];
        all.extend_from_slice(extra);
        verify_archive(&dir, &seaweed, "paygate-plain", &credentials, &all)
    };

    // Traffic until at least 3 segments are listed in 4 signed digests and the local
    // copies of digested segments are gone (--audit-local-retention 0).
    let chain = dir.0.join("data/audit/1");
    let mut report = String::new();
    for _ in 0..240 {
        assert_eq!(client.get("/apiStatus").send().await.status, 200);
        let (code, text) = verify(&[]);
        report = text;
        if code == 0
            && listed_segments(&report) >= 3
            && digests(&report) >= 4
            && !chain.join("000001.jsonl").exists()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(listed_segments(&report) >= 3, "{report}");
    assert!(!chain.join("000001.jsonl").exists(), "{report}");
    signal(&child.0, "TERM");
    assert!(wait_exit(&mut child.0).success());

    // Locally, the chain verifies from the files that remain, and the node continues it;
    // its digests continue their chain across the restart, without a gap in time.
    verify_audit(&dir);
    let digests_before = digests(&verify(&[]).1);
    let (again, addr, _) = serve_logging(&dir, &args, "info");
    let mut again = StopOnDrop(again);
    let client = Client::new(addr, &dir.0.join("certs/server.crt"));
    for _ in 0..240 {
        assert_eq!(client.get("/apiStatus").send().await.status, 200);
        let (code, text) = verify(&[]);
        assert_eq!(code, 0, "{text}");
        report = text;
        if digests(&report) > digests_before {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(digests(&report) > digests_before, "{report}");
    signal(&again.0, "TERM");
    assert!(wait_exit(&mut again.0).success());
    verify_audit(&dir);

    // Intact: OK with the public key alone, and with the audit key every record verifies.
    let (code, report) = verify(&[]);
    assert_eq!(code, 0, "{report}");
    let (code, report) = verify(&["--audit-key", "data/audit.key"]);
    assert_eq!(code, 0, "{report}");
    assert!(
        report.contains("records verified with the audit key"),
        "{report}"
    );
    // The node's log restored from the archive: every digested segment, byte for byte
    // (the local copies of the first ones are gone).
    let restored = dir.0.join("restored");
    let save = restored.to_string_lossy().into_owned();
    let (code, report) = verify(&["--save", &save]);
    assert_eq!(code, 0, "{report}");
    let saved = paygate::audit::writer::log_files(&restored.join("node-a/1")).unwrap();
    assert_eq!(saved.len(), listed_segments(&report), "{report}");
    assert_eq!(saved[0].0, 1);
    for (number, path) in &saved {
        let key = format!("audit/node-a/1/{number:06}.jsonl");
        let there = bucket.get(&key).await.unwrap().unwrap();
        assert_eq!(std::fs::read(path).unwrap(), there.as_ref(), "{key}");
    }
    // A key the auditor does not trust signs nothing.
    let other = TempDir::new("archive-other-key");
    let stranger = public_key(&other);
    let (code, report) = verify_archive(
        &dir,
        &seaweed,
        "paygate-plain",
        &credentials,
        &["--public-key", &stranger],
    );
    assert_eq!(code, 1, "{report}");
    assert!(report.contains("not a trusted key"), "{report}");

    let segment = |n: u32| format!("audit/node-a/1/{n:06}.jsonl");
    let digest = |n: u32| format!("audit/node-a/1/digests/{n:06}.json");
    let get = |key: String| {
        let bucket = bucket.clone();
        async move { bucket.get(&key).await.unwrap().unwrap() }
    };
    let expect = |problem: &str| {
        let (code, report) = verify(&[]);
        assert_eq!(code, 1, "{problem}: {report}");
        assert!(report.contains(problem), "{problem}: {report}");
        report
    };
    let second = get(segment(2)).await;

    // A deleted segment.
    bucket.delete(&segment(2)).await.unwrap();
    let report = expect("audit/node-a/1/000002.jsonl: deleted: listed in");
    assert_eq!(problems(&report).len(), 1, "{report}");
    bucket
        .put_new(&segment(2), second.clone(), None)
        .await
        .unwrap();
    assert_eq!(verify(&[]).0, 0);

    // A replaced segment.
    overwrite(&bucket, &segment(2), get(segment(3)).await).await;
    expect("audit/node-a/1/000002.jsonl: replaced:");
    overwrite(&bucket, &segment(2), second.clone()).await;

    // Added objects: one that is no segment or digest, one numbered as a segment.
    bucket
        .put_new("audit/node-a/1/notes.txt", Bytes::from_static(b"x"), None)
        .await
        .unwrap();
    bucket
        .put_new(&segment(0), second.clone(), None)
        .await
        .unwrap();
    let report = expect("audit/node-a/1/notes.txt: added");
    assert!(
        report.contains("audit/node-a/1/000000.jsonl: in the archive but in no digest"),
        "{report}"
    );
    bucket.delete("audit/node-a/1/notes.txt").await.unwrap();
    bucket.delete(&segment(0)).await.unwrap();
    assert_eq!(verify(&[]).0, 0);

    // A digest deleted from the middle of the chain.
    let second_digest = get(digest(2)).await;
    bucket.delete(&digest(2)).await.unwrap();
    expect("audit/node-a/1/digests/000002.json: a digest missing from the chain");
    bucket
        .put_new(&digest(2), second_digest, None)
        .await
        .unwrap();
    assert_eq!(verify(&[]).0, 0);

    // A segment left out of a digest, by someone holding the node's signing key: the
    // digest that listed it and every later one re-signed, so that their chain is whole.
    let signing = paygate::audit::signing::SigningKey::load_or_create(&dir.0.join("data")).unwrap();
    let trusted = vec![key.clone()];
    let keys: Vec<String> = bucket
        .list("audit/node-a/1/digests/")
        .await
        .unwrap()
        .into_iter()
        .map(|l| l.key)
        .collect();
    let mut originals = Vec::new();
    let mut previous: Option<(String, String)> = None;
    let mut rewriting = false;
    for key in &keys {
        let bytes = get(key.clone()).await;
        let (mut read, _) = paygate::audit::digest::Digest::verify(&bytes, &trusted).unwrap();
        let lists_second = read.segments.iter().any(|s| s.key == segment(2));
        if lists_second {
            read.segments.retain(|s| s.key != segment(2));
            rewriting = true;
        }
        if rewriting {
            read.previous = previous.clone();
            let forged = Bytes::from(read.sign(&signing));
            let (_, signature) = paygate::audit::digest::Digest::verify(&forged, &trusted).unwrap();
            overwrite(&bucket, key, forged).await;
            originals.push((key.clone(), bytes.clone()));
            previous = Some((key.clone(), signature));
        } else {
            let (_, signature) = paygate::audit::digest::Digest::verify(&bytes, &trusted).unwrap();
            previous = Some((key.clone(), signature));
        }
    }
    assert!(!originals.is_empty());
    let report = expect("audit/node-a/1/000002.jsonl: in the archive but in no digest");
    assert_eq!(problems(&report).len(), 1, "{report}");
    for (key, bytes) in originals {
        overwrite(&bucket, &key, bytes).await;
    }
    let (code, report) = verify(&["--audit-key", "data/audit.key"]);
    assert_eq!(code, 0, "{report}");
}
