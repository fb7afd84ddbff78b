//! The audit log against real servers: both records for every request, failed logins with
//! the claimed user and reason, no secret in the log, tamper detection by `audit verify`,
//! torn tails, rotation, write failures, `kill -9`, and `GET /audit`.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use common::{paygate_command, serve, Creds, TempDir, TestServer};
use serde_json::{json, Value};

use paygate::audit::verify::verify_dir;
use paygate::audit::{load_key, AUDIT_DIR, KEY_FILE};

fn audit_dir(server: &TestServer) -> PathBuf {
    server.data_dir().join(AUDIT_DIR)
}

/// Every record of every chain, in file order.
fn records(audit_dir: &Path) -> Vec<Value> {
    let mut out = Vec::new();
    for (_, dir) in paygate::audit::instance_dirs(audit_dir).unwrap() {
        for (_, file) in paygate::audit::writer::log_files(&dir).unwrap() {
            let text = std::fs::read_to_string(file).unwrap();
            out.extend(
                text.lines()
                    .map(|l| serde_json::from_str::<Value>(l).unwrap()),
            );
        }
    }
    out
}

fn by_request(records: &[Value]) -> HashMap<String, Vec<Value>> {
    let mut map: HashMap<String, Vec<Value>> = HashMap::new();
    for r in records {
        map.entry(r["request_id"].as_str().unwrap().to_owned())
            .or_default()
            .push(r.clone());
    }
    map
}

fn verify(audit_dir: &Path) -> Result<u64, String> {
    let key = load_key(&audit_dir.parent().unwrap().join(KEY_FILE)).unwrap();
    verify_dir(audit_dir, &key)
        .map(|r| r.records)
        .map_err(|b| b.to_string())
}

/// The current file of the (only) chain.
fn current_file(audit_dir: &Path) -> PathBuf {
    let (_, dir) = paygate::audit::instance_dirs(audit_dir).unwrap().remove(0);
    paygate::audit::writer::log_files(&dir)
        .unwrap()
        .pop()
        .unwrap()
        .1
}

#[tokio::test]
async fn a_reader_of_the_live_file_sees_only_complete_json_lines() {
    // What `jq`, `tail -F` or a log shipper reads while the server runs: no preallocated
    // zeros, no partial line, every line a record.
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    for _ in 0..20 {
        server.client.get("/users/me").basic(&alice).send().await;
    }
    let file = current_file(&audit_dir(&server));
    let bytes = std::fs::read(&file).unwrap();
    assert!(!bytes.contains(&0), "NUL bytes in {}", file.display());
    assert_eq!(bytes.last(), Some(&b'\n'));
    let text = String::from_utf8(bytes).unwrap();
    let seqs: Vec<u64> = text
        .lines()
        .map(|line| {
            serde_json::from_str::<Value>(line).unwrap()["seq"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert!(seqs.len() >= 40, "{seqs:?}");
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");
    assert_eq!(std::fs::metadata(&file).unwrap().len(), text.len() as u64);
    server.shutdown().await;
}

#[tokio::test]
async fn every_request_has_both_records_and_failures_say_why() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let status = server.client.get("/apiStatus").send().await;
    let denied = server
        .client
        .get("/accounts")
        .basic(&Creds::new("alice", "not her password"))
        .send()
        .await;
    let token = server.login(&alice).await;
    let listed = server
        .client
        .get("/accounts?limit=5")
        .bearer(&token)
        .send()
        .await;
    let missing = server.client.get("/nowhere").send().await;
    let id = |r: &common::TestResponse| r.header("x-request-id").unwrap().to_owned();
    let ids = [id(&status), id(&denied), id(&listed), id(&missing)];
    let dir = audit_dir(&server);
    let data = server.data_dir();
    let _kept = server.stop().await;

    let all = records(&dir);
    let grouped = by_request(&all);
    for id in &ids {
        let pair = &grouped[id];
        assert_eq!(pair.len(), 2, "{id}: {pair:?}");
        assert_eq!(pair[0]["phase"], "request");
        assert_eq!(pair[1]["phase"], "response");
        assert!(pair[0]["seq"].as_u64() < pair[1]["seq"].as_u64());
        for r in pair {
            assert!(r["time"].as_str().unwrap().ends_with('Z'));
            assert_eq!(r["worker"], "1");
            assert!(r["pid"].is_u64());
        }
        assert!(pair[1]["duration_us"].is_u64());
    }
    let failed = &grouped[&ids[1]];
    assert_eq!(failed[0]["auth"], "basic");
    assert_eq!(failed[0]["auth_result"], "failed");
    assert_eq!(failed[0]["claimed"], "alice");
    assert_eq!(failed[0]["principal"], Value::Null);
    assert_eq!(failed[0]["auth_reason"], "unknown user or wrong password");
    assert_eq!(failed[0]["op"], "R");
    assert_eq!(failed[1]["status"], 401);
    assert_eq!(failed[1]["reason"], "unknown user or wrong password");
    let ok = &grouped[&ids[2]];
    assert_eq!(ok[0]["auth"], "bearer-jwt");
    assert_eq!(ok[0]["auth_result"], "ok");
    assert_eq!(ok[0]["principal"], "alice");
    assert_eq!(ok[0]["path"], "/accounts?limit=5");
    assert_eq!(ok[1]["status"], 200);
    assert_eq!(ok[1]["reason"], Value::Null);
    assert_eq!(grouped[&ids[0]][0]["auth"], "none");
    assert_eq!(grouped[&ids[3]][1]["status"], 404);
    // The login was a Create.
    assert!(all
        .iter()
        .any(|r| r["path"] == "/sessions" && r["op"] == "C" && r["principal"] == "alice"));

    assert_eq!(verify(&dir), Ok(all.len() as u64));
    // And through the command line, as an operator runs it.
    let cwd = TempDir::new("audit-cli");
    let output = paygate_command(&cwd)
        .args(["audit", "verify", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(output.status.success());
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains(&format!("{} records", all.len())),
        "{stdout}"
    );
}

#[tokio::test]
async fn no_secret_reaches_the_audit_log() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    let jwt = server.login(&alice).await;
    let opaque_worker = server.sibling_with(&[("token-format", "opaque")]).await;
    let opaque = opaque_worker.login(&alice).await;
    // A TOTP enrolment: the secret, and a code at confirmation and at login.
    let enrol = server
        .client
        .post("/users/me/totp")
        .bearer(&jwt)
        .send()
        .await;
    let secret = enrol.json()["secret"].as_str().unwrap().to_owned();
    let confirm_code = "123456";
    server
        .client
        .post("/users/me/totp/confirm")
        .bearer(&jwt)
        .json(&json!({ "code": confirm_code }))
        .send()
        .await;
    server
        .client
        .post("/sessions")
        .basic(&alice)
        .header("x-totp", "654321")
        .send()
        .await;
    // Secrets in the query string, and a wrong password.
    server
        .client
        .get(&format!("/users/me?access_token={jwt}&token={opaque}"))
        .send()
        .await;
    let wrong = Creds::new("alice", "Wrong-Secret-Passw0rd");
    server.client.get("/accounts").basic(&wrong).send().await;
    // A malformed body whose parser error would quote the value.
    server
        .client
        .post("/users")
        .json(&json!({"username": "mallory", "password": 1234567890123u64}))
        .send()
        .await;
    let dir = audit_dir(&server);
    opaque_worker.shutdown().await;
    let _kept = server.stop().await;

    let mut log = String::new();
    for (_, instance) in paygate::audit::instance_dirs(&dir).unwrap() {
        for (_, file) in paygate::audit::writer::log_files(&instance).unwrap() {
            log.push_str(&std::fs::read_to_string(file).unwrap());
        }
    }
    assert!(log.contains("access_token=REDACTED"));
    let jwt_signature = jwt.rsplit('.').next().unwrap();
    for (kind, secret) in [
        ("password", alice.password.as_str()),
        ("wrong password", wrong.password.as_str()),
        (
            "Basic header value",
            alice.header().trim_start_matches("Basic "),
        ),
        ("JWT", jwt.as_str()),
        ("JWT signature", jwt_signature),
        ("opaque token", opaque.as_str()),
        ("TOTP secret", secret.as_str()),
        ("TOTP code (confirm)", confirm_code),
        ("TOTP code (login)", "654321"),
        ("password in a malformed body", "1234567890123"),
    ] {
        assert!(!log.contains(secret), "{kind} found in the audit log");
    }
}

/// A server run that leaves a few dozen records, then stopped; returns its data dir.
async fn audited_run(extra: &[(&'static str, &str)]) -> (TempDir, PathBuf) {
    let server = TestServer::start_with(extra).await;
    let alice = server.register("alice").await;
    for _ in 0..6 {
        server.client.get("/accounts").basic(&alice).send().await;
    }
    for _ in 0..6 {
        server.client.get("/apiStatus").send().await;
    }
    let data = server.data_dir();
    (server.stop().await, data)
}

/// Copies a stopped server's data directory. SQLite may remove its `-wal` and `-shm`
/// files a moment after the stop (the last connection closing), so a file that vanished
/// between listing and copying is skipped: what it held is in the database by then.
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        match entry.file_type() {
            Ok(kind) if kind.is_dir() => copy_dir(&entry.path(), &target),
            Ok(_) => match std::fs::copy(entry.path(), &target) {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => panic!("copying {}: {e}", entry.path().display()),
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => panic!("reading {}: {e}", entry.path().display()),
        }
    }
}

fn rewrite_lines(file: &Path, change: impl FnOnce(&mut Vec<String>)) {
    let text = std::fs::read_to_string(file).unwrap();
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    change(&mut lines);
    let mut out = lines.join("\n");
    out.push('\n');
    std::fs::write(file, out).unwrap();
}

#[tokio::test]
async fn verify_names_every_kind_of_tampering() {
    let (_keep, data) = audited_run(&[]).await;
    let audit = data.join(AUDIT_DIR);
    let total = verify(&audit).unwrap();
    assert_eq!(total, 26, "13 requests, two records each");

    let case = |name: &str, change: &dyn Fn(&mut Vec<String>)| {
        let copy = data.parent().unwrap().join(format!("case-{name}"));
        copy_dir(&data, &copy);
        let dir = copy.join(AUDIT_DIR);
        rewrite_lines(&current_file(&dir), |lines| change(lines));
        let result = verify(&dir);
        std::fs::remove_dir_all(&copy).unwrap();
        result.expect_err(name)
    };
    let edited = case("edit", &|lines| {
        lines[4] = lines[4].replace("\"GET\"", "\"PUT\"");
    });
    assert!(edited.contains(":5: chain broken"), "{edited}");
    let deleted = case("delete", &|lines| {
        lines.remove(6);
    });
    assert!(
        deleted.contains(":7: chain broken: record 7 was expected"),
        "{deleted}"
    );
    let swapped = case("swap", &|lines| lines.swap(8, 9));
    assert!(swapped.contains(":9: chain broken"), "{swapped}");
    let inserted = case("insert", &|lines| {
        let copy = lines[3].clone();
        lines.insert(3, copy);
    });
    assert!(inserted.contains(":5: chain broken"), "{inserted}");
    // Cutting whole lines off the end leaves a valid chain: the checkpoint catches it.
    let cut = case("truncate", &|lines| {
        lines.truncate(lines.len() - 3);
    });
    assert!(cut.contains("tail cut off"), "{cut}");
    let forged = case("forge", &|lines| {
        lines.push(
            r#"{"seq":999,"phase":"request","chain":"0000000000000000000000000000000000000000000000000000000000000000"}"#
                .to_owned(),
        );
    });
    assert!(forged.contains("chain broken"), "{forged}");

    // The command line reports it too, with a non-zero exit.
    rewrite_lines(&current_file(&audit), |lines| {
        lines.remove(2);
    });
    let cwd = TempDir::new("verify-cli");
    let output = paygate_command(&cwd)
        .args(["audit", "verify"])
        .arg(&audit)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("BROKEN") && stderr.contains("000001.jsonl:3"),
        "{stderr}"
    );
}

#[tokio::test]
async fn a_torn_tail_is_set_aside_and_the_chain_continues() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    server.client.get("/accounts").basic(&alice).send().await;
    let dir = audit_dir(&server);
    let server = {
        // Stop, then leave half a record at the end, as a crash mid-write would.
        let file = current_file(&dir);
        let restarted = server.restart_with(|| {
            use std::io::Write as _;
            let mut f = std::fs::OpenOptions::new()
                .append(true)
                .open(&file)
                .unwrap();
            f.write_all(br#"{"seq":99,"time":"2026-11-29T12:00:00.000Z","pha"#)
                .unwrap();
        });
        restarted.await
    };
    let response = server.client.get("/accounts").basic(&alice).send().await;
    assert_eq!(response.status, 200);
    let dir = audit_dir(&server);
    let _kept = server.stop().await;
    let (_, instance) = paygate::audit::instance_dirs(&dir).unwrap().remove(0);
    let torn: Vec<_> = std::fs::read_dir(&instance)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(".torn"))
        .collect();
    assert_eq!(torn.len(), 1, "{torn:?}");
    assert!(std::fs::read_to_string(&torn[0])
        .unwrap()
        .starts_with("{\"seq\":99"));
    let total = verify(&dir).unwrap();
    assert_eq!(total, records(&dir).len() as u64);
}

#[tokio::test]
async fn rotation_continues_the_chain_across_files() {
    let (_keep, data) = audited_run(&[("audit-rotate-bytes", "2000")]).await;
    let audit = data.join(AUDIT_DIR);
    let (_, instance) = paygate::audit::instance_dirs(&audit).unwrap().remove(0);
    let files = paygate::audit::writer::log_files(&instance).unwrap();
    assert!(files.len() >= 3, "{files:?}");
    for (_, file) in &files {
        assert!(std::fs::metadata(file).unwrap().len() <= 2000 + 4096);
    }
    let total = verify(&audit).unwrap();
    assert_eq!(total, records(&audit).len() as u64);
    // A missing middle file is named.
    std::fs::remove_file(&files[1].1).unwrap();
    let err = verify(&audit).unwrap_err();
    assert!(err.contains("000002.jsonl is missing"), "{err}");
}

#[tokio::test]
async fn a_write_failure_is_a_503_and_nothing_happens() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    server.app().audit.inject_fault(true);
    let response = server
        .client
        .post("/accounts")
        .basic(&alice)
        .json(&json!({"name": "Unaudited", "currency": "EUR"}))
        .send()
        .await;
    let body = response.assert_problem(503);
    assert_eq!(
        body["type"],
        "tag:paygate.dev,2026:problem:audit-unavailable"
    );
    assert_eq!(response.header("retry-after"), Some("1"));
    // The worker keeps refusing while the log cannot be written.
    server
        .client
        .get("/apiStatus")
        .send()
        .await
        .assert_problem(503);
    server.app().audit.inject_fault(false);
    let listed = server.client.get("/accounts").basic(&alice).send().await;
    assert_eq!(listed.status, 200);
    assert_eq!(listed.json()["items"], json!([]), "the handler never ran");
    let dir = audit_dir(&server);
    let _kept = server.stop().await;
    assert_eq!(verify(&dir), Ok(records(&dir).len() as u64));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_loses_no_record_of_an_answered_request() {
    let dir = TempDir::new("audit-kill");
    let (mut child, addr) = serve(&dir, &["--rate-limit", "none"]);
    let client = common::Client::new(addr, &dir.0.join("certs/server.crt"));
    let answered_so_far = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (client, counter) = (client.clone(), answered_so_far.clone());
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for _ in 0..400 {
                let Ok(response) = tokio::time::timeout(
                    std::time::Duration::from_secs(30),
                    client.get("/nowhere").try_send(),
                )
                .await
                else {
                    break;
                };
                match response {
                    Some(r) => {
                        ids.push(r.header("x-request-id").unwrap().to_owned());
                        counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    }
                    None => break,
                }
            }
            ids
        }));
    }
    // Kill once enough requests were answered, however long that takes on a busy machine.
    while answered_so_far.load(std::sync::atomic::Ordering::SeqCst) < 40 {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let mut answered = Vec::new();
    for task in tasks {
        answered.extend(task.await.unwrap());
    }
    assert!(answered.len() > 20, "only {} answered", answered.len());

    // A restart recovers whatever the kill left, and the chain verifies.
    let (mut child, _) = serve(&dir, &["--rate-limit", "none"]);
    common::signal(&child, "TERM");
    child.wait().unwrap();
    let audit = dir.0.join("data").join(AUDIT_DIR);
    assert!(verify(&audit).is_ok(), "{:?}", verify(&audit));
    let logged = by_request(&records(&audit));
    for id in &answered {
        let phases: Vec<&str> = logged
            .get(id)
            .map(|rs| rs.iter().map(|r| r["phase"].as_str().unwrap()).collect())
            .unwrap_or_default();
        assert!(
            phases.contains(&"request"),
            "request {id} was answered but not audited"
        );
    }
}

#[tokio::test]
async fn auditors_and_admins_read_recent_records() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    // An auditor, created as an operator would (paygate user add --role auditor).
    let auditor = server.staff(
        "carol.audit",
        "auditor passphrase 1",
        paygate::domain::Role::Auditor,
    );
    let marker = server.client.get("/apiStatus").send().await;
    let marker_id = marker.header("x-request-id").unwrap().to_owned();
    let token = server.login(&auditor).await;

    let response = server
        .client
        .get("/audit?limit=50")
        .bearer(&token)
        .send()
        .await;
    assert_eq!(response.status, 200, "{}", response.text());
    let items = response.json()["items"].as_array().unwrap().clone();
    assert!(items.len() <= 50);
    assert!(items
        .iter()
        .any(|r| r["request_id"] == marker_id.as_str() && r["phase"] == "request"));
    let times: Vec<&str> = items.iter().map(|r| r["time"].as_str().unwrap()).collect();
    assert!(times.windows(2).all(|w| w[0] >= w[1]), "newest first");

    // `since` in the future: nothing; in the past: something; malformed: 400.
    let future = server
        .client
        .get("/audit?since=2999-01-01T00:00:00Z")
        .bearer(&token)
        .send()
        .await;
    assert_eq!(future.json()["items"], json!([]));
    let past = server
        .client
        .get("/audit?since=2000-01-01T00:00:00Z&limit=3")
        .bearer(&token)
        .send()
        .await;
    assert_eq!(past.json()["items"].as_array().unwrap().len(), 3);
    server
        .client
        .get("/audit?since=yesterday")
        .bearer(&token)
        .send()
        .await
        .assert_problem(400);

    // Others: 403 for a user without the role, 401 for nobody.
    server
        .client
        .get("/audit")
        .basic(&alice)
        .send()
        .await
        .assert_problem(403);
    server.client.get("/audit").send().await.assert_problem(401);

    // Reading the log was itself audited.
    let again = server
        .client
        .get("/audit?limit=1000")
        .bearer(&token)
        .send()
        .await;
    let items = again.json()["items"].as_array().unwrap().clone();
    assert!(items
        .iter()
        .any(|r| r["path"] == "/audit?limit=50" && r["principal"] == "carol.audit"));
}

#[tokio::test]
async fn a_claimed_name_is_recorded_only_when_it_is_a_username() {
    let server = TestServer::start().await;
    let alice = server.register("alice").await;
    // A password typed into the username field, and a 20,000-character "username".
    let typo = Creds::new("Tr0ub4dor&3-my-real-password", "");
    let huge = Creds::new(&"u".repeat(20_000), "whatever");
    for creds in [&typo, &huge] {
        let response = server.client.get("/accounts").basic(creds).send().await;
        response.assert_problem(401);
    }
    // A 20,000-byte query string and a long made-up method are cut too.
    let query = format!("/accounts?{}", "q".repeat(20_000));
    server.client.get(&query).send().await.assert_problem(401);
    let method = http::Method::from_bytes(&[b'M'; 2_000]).unwrap();
    server.client.request(method, "/accounts").send().await;
    // A wrong password for a real name is still recorded with the name.
    let wrong = Creds::new("alice", "not her password");
    server.client.get("/accounts").basic(&wrong).send().await;
    server.client.get("/accounts").basic(&alice).send().await;
    let data = server.data_dir();
    let _kept = server.stop().await;

    let text = common::audit_text(&data);
    assert!(
        !text.contains("Tr0ub4dor"),
        "the typed password was recorded"
    );
    assert!(!text.contains(&"u".repeat(100)));
    for line in text.lines() {
        assert!(line.len() < 3_000, "an audit line of {} bytes", line.len());
    }
    let requests: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|r| r["phase"] == "request" && r["auth"] == "basic")
        .collect();
    let malformed: Vec<&Value> = requests
        .iter()
        .filter(|r| r["auth_reason"] == "malformed username")
        .collect();
    assert_eq!(malformed.len(), 2, "{requests:?}");
    assert!(malformed.iter().all(|r| r["claimed"].is_null()));
    assert!(requests
        .iter()
        .any(|r| r["claimed"] == "alice" && r["auth_reason"] == "unknown user or wrong password"));
}

/// A real `paygate serve` (one worker) on `dir`, asked for `requests` statuses and stopped
/// cleanly: two records per request.
async fn run_and_stop(dir: &TempDir, requests: usize) {
    let (mut child, addr) = serve(dir, &["--rate-limit", "none"]);
    let client = common::Client::new(addr, &dir.0.join("certs/server.crt"));
    for _ in 0..requests {
        assert_eq!(client.get("/apiStatus").send().await.status, 200);
    }
    common::signal(&child, "TERM");
    assert!(common::wait_exit(&mut child).success());
}

/// Starts `paygate serve` on a damaged log and returns what it said when it refused.
fn serve_refused(dir: &TempDir) -> String {
    use std::io::{BufRead, BufReader};
    let mut child = paygate_command(dir)
        .args(["serve", "--listen", "127.0.0.1:0", "--workers", "1"])
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut said = String::new();
    for line in BufReader::new(child.stderr.take().unwrap()).lines() {
        let line = line.unwrap();
        if line.contains("listening on") {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("a worker started on a damaged audit log:\n{said}{line}");
        }
        said.push_str(&line);
        said.push('\n');
    }
    let status = common::wait_exit(&mut child);
    assert_eq!(status.code(), Some(1), "{said}");
    said
}

/// `paygate audit verify` on `dir`: exit code and everything it printed.
fn verify_cli(dir: &TempDir) -> (Option<i32>, String) {
    let output = paygate_command(dir)
        .args(["audit", "verify"])
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.code(), text)
}

fn chain_file(dir: &TempDir) -> PathBuf {
    dir.0.join("data/audit/1/000001.jsonl")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_tail_is_never_laundered_by_the_next_start() {
    let dir = TempDir::new("audit-cut");
    run_and_stop(&dir, 11).await;
    let (code, said) = verify_cli(&dir);
    assert_eq!(code, Some(0), "{said}");
    assert!(said.contains("22 records"), "{said}");
    // The last four lines removed: no key is needed for that.
    rewrite_lines(&chain_file(&dir), |lines| lines.truncate(18));
    let before = std::fs::read(chain_file(&dir)).unwrap();
    let (code, said) = verify_cli(&dir);
    assert_eq!(code, Some(1));
    assert!(said.contains("tail cut off"), "{said}");
    // The worker refuses to start, naming the file, the line, what is wrong and what to do.
    let refused = serve_refused(&dir);
    assert!(
        refused.contains("000001.jsonl:19: tail cut off")
            && refused.contains("checkpoint says 22")
            && refused.contains("paygate audit seal --reason"),
        "{refused}"
    );
    // Nothing was appended and the checkpoint did not move: verify still says so.
    assert_eq!(std::fs::read(chain_file(&dir)).unwrap(), before);
    let (code, said) = verify_cli(&dir);
    assert_eq!(code, Some(1), "{said}");

    // The same cut disguised as a torn last line.
    let mut disguised = before.clone();
    disguised.extend_from_slice(br#"{"seq":19,"time":"2026-12-01T00:00:00.000Z","pha"#);
    std::fs::write(chain_file(&dir), &disguised).unwrap();
    let refused = serve_refused(&dir);
    assert!(refused.contains("tail cut off"), "{refused}");
    assert_eq!(std::fs::read(chain_file(&dir)).unwrap(), disguised);

    // The operator looked, and continues on purpose: a new segment states the break.
    let output = paygate_command(&dir)
        .args([
            "audit",
            "seal",
            "--reason",
            "4 lines lost in an incident; ticket 4711",
        ])
        .output()
        .unwrap();
    let sealed = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{sealed}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(sealed.contains("SEALED after record 18"), "{sealed}");
    let (code, said) = verify_cli(&dir);
    assert_eq!(code, Some(3), "{said}");
    assert!(
        said.contains("1 ACKNOWLEDGED BREAK")
            && said.contains("000002.jsonl")
            && said.contains("ticket 4711")
            && said.contains("tail cut off"),
        "{said}"
    );
    assert!(!said.contains("audit log OK"));
    // Workers start again, continue after the break, and verify keeps naming it.
    run_and_stop(&dir, 3).await;
    let (code, said) = verify_cli(&dir);
    assert_eq!(code, Some(3), "{said}");
    assert!(said.contains("25 records"), "18 + the break + 6: {said}");
    let records: Vec<Value> = std::fs::read_to_string(dir.0.join("data/audit/1/000002.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(records[0]["phase"], "break");
    assert_eq!(records[0]["seq"], 19);
    assert_eq!(records[0]["after_seq"], 18);
    assert_eq!(
        records[0]["reason"],
        "4 lines lost in an incident; ticket 4711"
    );
    assert_eq!(records[1]["seq"], 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edited_record_or_a_moved_checkpoint_stops_the_worker() {
    let dir = TempDir::new("audit-edit");
    run_and_stop(&dir, 8).await;
    let original = std::fs::read(chain_file(&dir)).unwrap();
    // A record in the middle edited.
    rewrite_lines(&chain_file(&dir), |lines| {
        lines[6] = lines[6].replace("/apiStatus", "/elsewhere");
    });
    let refused = serve_refused(&dir);
    assert!(
        refused.contains("000001.jsonl:7: chain broken"),
        "{refused}"
    );
    std::fs::write(chain_file(&dir), &original).unwrap();

    // A cut tail with the checkpoint moved to match it (as sqlite3 would): the checkpoint's
    // MAC needs the audit key.
    rewrite_lines(&chain_file(&dir), |lines| lines.truncate(10));
    let line_10: Value = serde_json::from_str(
        std::fs::read_to_string(chain_file(&dir))
            .unwrap()
            .lines()
            .last()
            .unwrap(),
    )
    .unwrap();
    let head = line_10["chain"].as_str().unwrap();
    let db = dir.0.join("data/audit/checkpoints.db");
    let conn = rusqlite::Connection::open(&db).unwrap();
    conn.execute(
        "UPDATE checkpoints SET records = 10, head = unhex(?1)",
        [head],
    )
    .unwrap();
    drop(conn);
    let refused = serve_refused(&dir);
    assert!(
        refused.contains("not authenticated by the audit key"),
        "{refused}"
    );
    let (code, said) = verify_cli(&dir);
    assert_eq!(code, Some(1), "{said}");

    // The checkpoint store deleted as well: files without checkpoints are an error too.
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", db.display()));
    }
    let (code, said) = verify_cli(&dir);
    assert_eq!(code, Some(1), "{said}");
    assert!(said.contains("checkpoint store is missing"), "{said}");
    let refused = serve_refused(&dir);
    assert!(
        refused.contains("no checkpoint for this chain"),
        "{refused}"
    );
}

/// Peak resident memory of a process so far, in KiB.
fn peak_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn audit_reads_hold_a_page_in_memory_not_the_log() {
    use paygate::audit::record::{body_of, checkpoint_mac, seal, RequestRecord, GENESIS};
    let dir = TempDir::new("audit-read-memory");
    // A 32 MiB chain, written as a worker would have (same key, checkpoint and all).
    let data = dir.0.join("data");
    paygate::secret_file::create_private_dir(&data.join("audit/1")).unwrap();
    let key = paygate::audit::load_or_create_key(&data).unwrap();
    let chain_dir = data.join("audit/1");
    let time = paygate::time::format_rfc3339_millis(paygate::time::now_millis() - 60_000);
    let record = RequestRecord {
        time: &time,
        phase: "request",
        request_id: "0190f3a2-7c1e-7d2a-9b4e-1a2b3c4d5e6f",
        worker: "1",
        pid: 1,
        client_ip: std::net::IpAddr::from([127, 0, 0, 1]),
        principal: None,
        claimed: None,
        auth: "none",
        auth_result: None,
        auth_reason: None,
        capability: None,
        method: "GET",
        path: "/apiStatus",
        op: "R",
    };
    let body = body_of(&record);
    let (mut seq, mut chain, mut bytes) = (0u64, GENESIS, Vec::new());
    while bytes.len() < 32 << 20 {
        seq += 1;
        chain = seal(&key, &chain, seq, &body, &mut bytes);
    }
    std::fs::write(chain_dir.join("000001.jsonl"), &bytes).unwrap();
    drop(bytes);
    let checkpoints = paygate::store::Checkpoints::open(&data.join("audit")).unwrap();
    let checkpoint = paygate::store::Checkpoint {
        records: seq,
        head: chain,
        mac: Some(checkpoint_mac(&key, "1", seq, &chain)),
    };
    checkpoints.save("1", &checkpoint).unwrap();
    drop(checkpoints);

    let (mut child, addr) = serve(&dir, &["--rate-limit", "none", "--instance", "1"]);
    let client = common::Client::new(addr, &dir.0.join("certs/server.crt"));
    let auditor = Creds::new("carol.audit", "auditor passphrase 1");
    let mut add = paygate_command(&dir)
        .args(["user", "add", "carol.audit", "--role", "auditor"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write as _;
        let mut stdin = add.stdin.take().unwrap();
        writeln!(stdin, "{}", auditor.password).unwrap();
    }
    assert!(add.wait().unwrap().success());
    let token = client.login(&auditor).await;
    let read = client.get("/audit?limit=1").bearer(&token).send().await;
    assert_eq!(read.status, 200, "{}", read.text());
    let before = peak_kib(child.id());
    let mut reads = Vec::new();
    for _ in 0..16 {
        let (client, token) = (client.clone(), token.clone());
        reads.push(tokio::spawn(async move {
            client.get("/audit?limit=1").bearer(&token).send().await
        }));
    }
    for read in reads {
        let read = read.await.unwrap();
        assert_eq!(read.status, 200);
        assert_eq!(read.json()["items"].as_array().unwrap().len(), 1);
    }
    let grown = peak_kib(child.id()).saturating_sub(before);
    common::signal(&child, "TERM");
    assert!(common::wait_exit(&mut child).success());
    // Reading whole files, 16 reads would have taken 16 × 32 MiB.
    assert!(
        grown < 16 * 1024,
        "16 reads of one record took {grown} KiB more at peak"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_from_before_macs_is_authenticated_by_seal_without_a_break() {
    let dir = TempDir::new("audit-upgrade");
    run_and_stop(&dir, 4).await;
    // As a paygate before checkpoint MACs left it.
    let db = rusqlite::Connection::open(dir.0.join("data/audit/checkpoints.db")).unwrap();
    db.execute("UPDATE checkpoints SET mac = NULL", []).unwrap();
    drop(db);
    let refused = serve_refused(&dir);
    assert!(
        refused.contains("older than checkpoint MACs") && refused.contains("--reason upgrade"),
        "{refused}"
    );
    let output = paygate_command(&dir)
        .args(["audit", "seal", "--reason", "upgrade"])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{said}");
    assert!(said.contains("now authenticated"), "{said}");
    // No break: the log is plainly OK, and workers start.
    let (code, said) = verify_cli(&dir);
    assert_eq!(code, Some(0), "{said}");
    run_and_stop(&dir, 1).await;
    assert_eq!(verify_cli(&dir).0, Some(0));
}
