//! The process model, with real processes: SIGHUP reloads the certificate (and keeps the
//! old one when the new files are bad), systemd readiness notifications, several
//! processes serving one port through SO_REUSEPORT, the supervisor restarting and stopping
//! its workers, and SIGUSR2 rolling them over.

mod common;

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use common::{paygate_command, serve, signal, wait_exit, wait_for_log, Client, TempDir};

/// Whether a client trusting only `ca` completes a request.
async fn trusts(addr: std::net::SocketAddr, ca: &std::path::Path) -> bool {
    let client = Client::new(addr, ca);
    match tokio::time::timeout(Duration::from_secs(2), client.get("/apiStatus").try_send()).await {
        Ok(Some(response)) => response.status == 200,
        _ => false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_certificate_and_keeps_it_when_the_new_files_are_bad() {
    // One process, and a supervisor that passes the signal on to each of its workers.
    for workers in ["1", "2"] {
        let dir = TempDir::new("sighup");
        let (child, addr) = serve(&dir, &["--workers", workers]);
        let mut child = common::StopOnDrop(child);
        let cert = dir.0.join("certs/server.crt");
        let old_ca = dir.0.join("old-ca.pem");
        std::fs::copy(&cert, &old_ca).unwrap();
        assert!(trusts(addr, &old_ca).await);

        // A new certificate in place of the old one, then SIGHUP.
        let status = paygate_command(&dir)
            .args(["dev-cert", "--force"])
            .output()
            .unwrap()
            .status;
        assert!(status.success());
        let new_ca = dir.0.join("new-ca.pem");
        std::fs::copy(&cert, &new_ca).unwrap();
        signal(&child.0, "HUP");
        // Every worker switches: a run of new connections (spread over the workers by
        // the kernel) all present the new certificate.
        let mut in_a_row = 0;
        for _ in 0..100 {
            if trusts(addr, &new_ca).await {
                in_a_row += 1;
                if in_a_row == 12 {
                    break;
                }
            } else {
                in_a_row = 0;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        assert_eq!(
            in_a_row, 12,
            "new connections use the new certificate ({workers} workers)"
        );
        assert!(!trusts(addr, &old_ca).await, "the old certificate is gone");

        // A broken file: reported, and the certificate in use stays.
        std::fs::write(&cert, "not a certificate").unwrap();
        signal(&child.0, "HUP");
        tokio::time::sleep(Duration::from_millis(300)).await;
        for _ in 0..6 {
            assert!(trusts(addr, &new_ca).await);
        }
        signal(&child.0, "TERM");
        assert_eq!(wait_exit(&mut child.0).code(), Some(0));
    }
}

#[test]
fn readiness_and_stopping_are_sent_to_notify_socket() {
    // One worker in the foreground tells systemd itself; a supervisor tells it once all its
    // workers listen, and its workers stay silent (they would claim readiness too early).
    for (workers, status) in [
        ("1", "STATUS=listening on https://127.0.0.1:"),
        ("2", "STATUS=2 workers listening on https://127.0.0.1:"),
    ] {
        let dir = TempDir::new("notify");
        let socket_path = dir.0.join("notify.sock");
        let socket = UnixDatagram::bind(&socket_path).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let child = paygate_command(&dir)
            .args(["serve", "--listen", "127.0.0.1:0", "--workers", workers])
            .env("NOTIFY_SOCKET", &socket_path)
            .stdin(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let mut child = common::StopOnDrop(child);
        let mut buffer = [0u8; 512];
        let n = socket.recv(&mut buffer).unwrap();
        let ready = String::from_utf8_lossy(&buffer[..n]).into_owned();
        assert!(ready.starts_with("READY=1\n"), "{ready}");
        assert!(ready.contains(status), "{ready}");
        signal(&child.0, "TERM");
        let n = socket.recv(&mut buffer).unwrap();
        assert_eq!(&buffer[..n], b"STOPPING=1");
        assert_eq!(wait_exit(&mut child.0).code(), Some(0));
        socket.set_nonblocking(true).unwrap();
        assert!(socket.recv(&mut buffer).is_err(), "a further notification");
    }
}

#[test]
fn under_journald_each_line_carries_its_priority_in_both_formats() {
    use std::os::unix::fs::MetadataExt as _;
    // systemd connects stderr to the journal and names that stream in JOURNAL_STREAM
    // (device:inode); here the stream is a file, which paygate cannot tell apart.
    for format in ["text", "json"] {
        let dir = TempDir::new("journal");
        let path = dir.0.join("stderr");
        // Appending, so that each run after the truncation below writes from the start.
        let stderr = std::fs::File::options()
            .append(true)
            .create(true)
            .open(&path)
            .unwrap();
        let metadata = stderr.metadata().unwrap();
        let stream = format!("{}:{}", metadata.dev(), metadata.ino());
        for (journal_stream, journal) in [(stream.as_str(), true), ("1:2", false)] {
            let child = paygate_command(&dir)
                .args(["serve", "--listen", "127.0.0.1:0", "--workers", "1"])
                .args(["--log-format", format])
                .env("JOURNAL_STREAM", journal_stream)
                .stdin(std::process::Stdio::null())
                .stderr(stderr.try_clone().unwrap())
                .spawn()
                .unwrap();
            let mut child = common::StopOnDrop(child);
            let read = || std::fs::read_to_string(&path).unwrap();
            for _ in 0..400 {
                if read().contains("listening on https://") {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            signal(&child.0, "TERM");
            assert_eq!(wait_exit(&mut child.0).code(), Some(0));
            let log = read();
            stderr.set_len(0).unwrap();
            assert!(log.contains("paygate stopped"), "{format}: {log}");
            for line in log.lines() {
                if !journal {
                    assert!(!line.starts_with('<'), "{format}: {line}");
                    continue;
                }
                let (priority, rest) = line[1..].split_once('>').expect(line);
                assert!(["3", "4", "6", "7"].contains(&priority), "{line}");
                if format == "json" {
                    let object: serde_json::Value = serde_json::from_str(rest).expect(line);
                    let level = object["level"].as_str().unwrap();
                    let expected = match level {
                        "error" => "3",
                        "warn" => "4",
                        "info" => "6",
                        _ => "7",
                    };
                    assert_eq!(priority, expected, "{line}");
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_serve_one_port_and_one_can_die() {
    let dir = TempDir::new("reuseport");
    let (mut first, addr) = serve(&dir, &[]);
    let port = addr.port().to_string();
    let listen = format!("127.0.0.1:{port}");
    let (mut second, second_addr) = serve(&dir, &["--listen", &listen]);
    assert_eq!(second_addr, addr, "both listen on the same port");
    let ca = dir.0.join("certs/server.crt");
    let client = Client::new(addr, &ca);
    for _ in 0..20 {
        assert_eq!(client.get("/apiStatus").send().await.status, 200);
    }
    // One process dies without warning; the port keeps being served by the other.
    first.kill().unwrap();
    first.wait().unwrap();
    for _ in 0..20 {
        assert_eq!(client.get("/apiStatus").send().await.status, 200);
    }
    signal(&second, "TERM");
    assert_eq!(wait_exit(&mut second).code(), Some(0));
    // Both wrote their own audit chain, and both verify.
    let stdout = common::verify_audit(&dir);
    // The first process was killed; a restart (not done here) would recover its tail, and
    // verify accepts the preallocated zeros it left.
    assert!(stdout.contains("2 chain(s)"), "{stdout}");
}

/// The pids of the workers the supervisor reported starting, by instance, latest first.
fn started_workers(log: &str) -> Vec<(String, u32)> {
    let mut found: Vec<(String, u32)> = log
        .split("started worker ")
        .skip(1)
        .filter_map(|rest| {
            let (instance, rest) = rest.split_once(" (pid ")?;
            let pid = rest.split(')').next()?.parse().ok()?;
            Some((instance.to_owned(), pid))
        })
        .collect();
    found.reverse();
    found
}

/// Whether a worker still exists. A zombie counts: the main thread of a killed
/// multi-threaded process turns zombie before its other threads have exited and released
/// its files (its listening socket among them); only once the supervisor has reaped it
/// is everything closed.
fn alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_supervisor_runs_restarts_and_stops_its_workers() {
    let dir = TempDir::new("supervisor");
    let (supervisor, addr, log) = common::serve_logging(&dir, &["--workers", "2"], "info");
    let mut supervisor = common::StopOnDrop(supervisor);
    let client = Client::new(addr, &dir.0.join("certs/server.crt"));
    // Wait until both workers said they listen.
    for _ in 0..100 {
        if log.lock().unwrap().matches("listening on https://").count() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let workers = started_workers(&log.lock().unwrap());
    assert_eq!(workers.len(), 2, "{}", log.lock().unwrap());
    for _ in 0..10 {
        assert_eq!(client.get("/apiStatus").send().await.status, 200);
    }
    // Kill worker 1: the port keeps being served, and a new worker 1 starts.
    let (_, victim) = workers.iter().find(|(i, _)| i == "1").unwrap().clone();
    std::process::Command::new("kill")
        .args(["-KILL", &victim.to_string()])
        .status()
        .unwrap();
    // Connections the kernel queued for the dying worker are reset with it (the cost of a
    // killed worker); once it is gone, every new connection goes to the living one.
    for _ in 0..300 {
        if !alive(victim) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // While worker 1 is replaced, requests keep being answered. (One reset is tolerated:
    // before waiting for the worker to be reaped, this test saw connections reset by the
    // dying process on a loaded machine; a retrying client would not notice.)
    let mut resets = 0;
    for _ in 0..20 {
        match client.get("/apiStatus").try_send().await {
            Some(response) => assert_eq!(response.status, 200),
            None => resets += 1,
        }
    }
    assert!(
        resets <= 1,
        "{resets} of 20 connections failed while a worker restarted"
    );
    let mut replaced = None;
    for _ in 0..100 {
        let now = started_workers(&log.lock().unwrap());
        let listening = log.lock().unwrap().matches("listening on https://").count();
        if let Some((_, pid)) = now.iter().find(|(i, p)| i == "1" && *p != victim) {
            if listening >= 3 {
                replaced = Some(*pid);
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let replaced = replaced.expect("worker 1 restarted");
    assert!(log.lock().unwrap().contains("exited unexpectedly"));
    // With the replacement listening, every connection is served again.
    for _ in 0..10 {
        assert_eq!(client.get("/apiStatus").send().await.status, 200);
    }
    // SIGTERM: every worker drains, the supervisor exits 0, nobody is left.
    signal(&supervisor.0, "TERM");
    assert_eq!(wait_exit(&mut supervisor.0).code(), Some(0));
    let all: Vec<u32> = started_workers(&log.lock().unwrap())
        .into_iter()
        .map(|(_, pid)| pid)
        .collect();
    assert!(all.contains(&replaced));
    for pid in all {
        assert!(!alive(pid), "worker {pid} still running");
    }
}

/// Outcome of a client loop that keeps its HTTP/1.1 connection alive and, like browsers
/// and HTTP libraries do, retries a request that failed before any response arrived
/// (the server closed the connection, or a new connection was reset).
#[derive(Debug, Default)]
struct LoopTally {
    ok: u64,
    retried: u64,
    failed: Vec<String>,
}

/// Sends `GET /apiStatus` over a kept-alive connection until `stop` is set.
async fn keep_alive_loop(
    client: Client,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> LoopTally {
    let mut tally = LoopTally::default();
    let mut connection = common::KeepAlive::default();
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let mut attempts = 0;
        loop {
            attempts += 1;
            match client.get("/apiStatus").send_on(&mut connection).await {
                Ok(response) if response.status == 200 => tally.ok += 1,
                Ok(response) => tally.failed.push(format!("status {}", response.status)),
                Err(_) if attempts < 3 => {
                    tally.retried += 1;
                    continue;
                }
                Err(why) => tally.failed.push(why),
            }
            break;
        }
    }
    tally
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigusr2_rolls_every_worker_over_without_failing_a_request() {
    let dir = TempDir::new("rollout");
    // The loops below send thousands of requests a second from one address.
    let (supervisor, addr, log) = common::serve_logging(
        &dir,
        &[
            "--workers",
            "2",
            "--rate-limit",
            "* / 1000000/s burst=1000000 key=ip",
        ],
        "info",
    );
    let mut supervisor = common::StopOnDrop(supervisor);
    wait_for_log(&log, "all 2 workers are listening", 1, 30).await;
    let old: Vec<u32> = started_workers(&log.lock().unwrap())
        .into_iter()
        .map(|(_, pid)| pid)
        .collect();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let loops: Vec<_> = (0..4)
        .map(|_| {
            let client = Client::new(addr, &dir.0.join("certs/server.crt"));
            tokio::spawn(keep_alive_loop(client, stop.clone()))
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    signal(&supervisor.0, "USR2");
    wait_for_log(&log, "rollout complete", 1, 60).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut total = LoopTally::default();
    for handle in loops {
        let tally = handle.await.unwrap();
        total.ok += tally.ok;
        total.retried += tally.retried;
        total.failed.extend(tally.failed);
    }
    total.failed.truncate(10);
    assert!(total.failed.is_empty(), "failed requests: {total:?}");
    assert!(total.ok > 100, "{total:?}");
    // Both old workers were drained and are gone; two new ones serve. (The supervisor's
    // log lines may trail what the clients saw: wait for them rather than race them.)
    wait_for_log(&log, "drained and stopped", 2, 30).await;
    let text = log.lock().unwrap().clone();
    assert_eq!(text.matches("drained and stopped").count(), 2, "{text}");
    for pid in &old {
        assert!(!alive(*pid), "old worker {pid} still running");
    }
    let client = Client::new(addr, &dir.0.join("certs/server.crt"));
    assert_eq!(client.get("/apiStatus").send().await.status, 200);
    signal(&supervisor.0, "TERM");
    assert_eq!(wait_exit(&mut supervisor.0).code(), Some(0));
    for (_, pid) in started_workers(&log.lock().unwrap()) {
        assert!(!alive(pid), "worker {pid} still running");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_stops_at_a_worker_that_cannot_start_and_the_old_ones_keep_serving() {
    let dir = TempDir::new("rollout-bad");
    let (supervisor, addr, log) = common::serve_logging(&dir, &["--workers", "2"], "info");
    let mut supervisor = common::StopOnDrop(supervisor);
    wait_for_log(&log, "all 2 workers are listening", 1, 30).await;
    // A broken configuration for the next workers: an unreadable certificate.
    let cert = dir.0.join("certs/server.crt");
    let good = std::fs::read(&cert).unwrap();
    std::fs::write(&cert, "not a certificate").unwrap();
    signal(&supervisor.0, "USR2");
    wait_for_log(&log, "rollout stopped", 1, 30).await;
    std::fs::write(dir.0.join("good.crt"), &good).unwrap();
    let client = Client::new(addr, &dir.0.join("good.crt"));
    for _ in 0..20 {
        assert_eq!(client.get("/apiStatus").send().await.status, 200);
    }
    let text = log.lock().unwrap().clone();
    assert!(!text.contains("draining worker"), "{text}");
    assert!(!text.contains("giving up"), "{text}");
    signal(&supervisor.0, "TERM");
    assert_eq!(wait_exit(&mut supervisor.0).code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_worker_survives_sigusr2() {
    let dir = TempDir::new("usr2");
    let (child, addr, log) = common::serve_logging(&dir, &[], "info");
    let mut child = common::StopOnDrop(child);
    signal(&child.0, "USR2");
    wait_for_log(&log, "SIGUSR2 ignored", 1, 10).await;
    let client = Client::new(addr, &dir.0.join("certs/server.crt"));
    assert_eq!(client.get("/apiStatus").send().await.status, 200);
    signal(&child.0, "TERM");
    assert_eq!(wait_exit(&mut child.0).code(), Some(0));
}

/// Every directory and file under `dir` whose mode lets group or others in.
fn shared_paths(dir: &std::path::Path) -> Vec<String> {
    use std::os::unix::fs::PermissionsExt as _;
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let Ok(meta) = std::fs::symlink_metadata(entry.path()) else {
            continue; // gone meanwhile (SQLite's -shm at a stop)
        };
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            found.push(format!("{} {mode:o}", entry.path().display()));
        }
        if meta.is_dir() {
            found.extend(shared_paths(&entry.path()));
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn everything_in_the_data_directory_is_private_whatever_the_umask() {
    let dir = TempDir::new("modes");
    // umask 000: any file paygate does not create private explicitly would be 0666.
    let mut child = std::process::Command::new("sh")
        .args(["-c", "umask 000 && exec \"$0\" \"$@\""])
        .arg(env!("CARGO_BIN_EXE_paygate"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--workers",
            "1",
            "--audit-rotate-bytes",
            "4096",
        ])
        .current_dir(&dir.0)
        .env_remove("RUST_LOG")
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let addr = {
        use std::io::{BufRead as _, BufReader};
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let addr = loop {
            let line = lines.next().expect("the server exited").unwrap();
            if let Some(addr) = line.split("listening on https://").nth(1) {
                break addr.trim().parse::<std::net::SocketAddr>().unwrap();
            }
        };
        std::thread::spawn(move || for _ in lines {});
        addr
    };
    let mut child = common::StopOnDrop(child);
    let client = Client::new(addr, &dir.0.join("certs/server.crt"));
    let alice = client.register("alice").await;
    let token = client.login(&alice).await;
    assert_eq!(
        client
            .post("/users/me/totp")
            .bearer(&token)
            .send()
            .await
            .status,
        200
    );
    for _ in 0..20 {
        client.get("/accounts").bearer(&token).send().await;
    }
    // While it runs (WAL and shared-memory files exist, audit files rotated) and after.
    let data = dir.0.join("data");
    assert_eq!(shared_paths(&data), Vec::<String>::new());
    signal(&child.0, "TERM");
    assert!(wait_exit(&mut child.0).success());
    assert_eq!(shared_paths(&data), Vec::<String>::new());
    use std::os::unix::fs::PermissionsExt as _;
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&data), 0o700);
    assert_eq!(mode(&dir.0.join("certs/server.key")), 0o600);

    // Refused at start when something is readable by others, naming the fix.
    let refused = |what: &std::path::Path, chmod: &str| {
        let output = common::paygate_command(&dir)
            .args(["serve", "--listen", "127.0.0.1:0", "--workers", "1"])
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&output.stderr).into_owned();
        assert_eq!(output.status.code(), Some(1), "{said}");
        // Named as configured (here relative to the working directory).
        let name = what.file_name().unwrap().to_string_lossy();
        let fix = format!("chmod {chmod} ");
        assert!(said.contains(&fix) && said.contains(&*name), "{said}");
    };
    let set = |p: &std::path::Path, m: u32| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap()
    };
    set(&data, 0o755);
    refused(&data, "700");
    set(&data, 0o700);
    let db = data.join("paygate.db");
    set(&db, 0o644);
    refused(&db, "600");
    set(&db, 0o600);
    let key = dir.0.join("certs/server.key");
    set(&key, 0o644);
    refused(&key, "600");
    set(&key, 0o600);
    // Put right, it starts again.
    let (mut again, _) = common::serve(&dir, &[]);
    signal(&again, "TERM");
    assert!(wait_exit(&mut again).success());
}

/// `paygate serve` on `listen` in `dir`, data directory `data`; returns the child once it
/// listens, or what it said when it exited instead.
fn serve_on(
    dir: &TempDir,
    listen: &str,
    data: &str,
) -> Result<(common::StopOnDrop, String), String> {
    use std::io::{BufRead as _, BufReader};
    let mut child = paygate_command(dir)
        .args([
            "serve",
            "--workers",
            "1",
            "--listen",
            listen,
            "--data-dir",
            data,
        ])
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut said = String::new();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    for line in lines.by_ref() {
        let line = line.unwrap();
        said.push_str(&line);
        said.push('\n');
        if line.contains("listening on https://") {
            std::thread::spawn(move || for _ in lines {});
            return Ok((common::StopOnDrop(child), said));
        }
    }
    child.wait().unwrap();
    Err(said)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_deployment_cannot_share_a_listening_address() {
    let dir = TempDir::new("one-deployment");
    let listen = format!("127.0.0.1:{}", common::free_port());
    let (mut first, _) = serve_on(&dir, &listen, "data-a").expect("the first one starts");
    // Another data directory on the same address: refused, naming the address.
    let refused = serve_on(&dir, &listen, "data-b").err().expect("refused");
    assert!(
        refused.contains(&format!("{listen} is already served by another paygate"))
            && refused.contains("data-a"),
        "{refused}"
    );
    // The same data directory shares it (as the supervisor's workers and systemd instances
    // do), and keeps serving when the first one stops.
    let (mut second, _) = serve_on(&dir, &listen, "data-a").expect("the same deployment shares");
    signal(&first.0, "TERM");
    assert!(wait_exit(&mut first.0).success());
    let client = Client::new(listen.parse().unwrap(), &dir.0.join("certs/server.crt"));
    assert_eq!(client.get("/apiStatus").send().await.status, 200);
    // The second takes the claim over (within a second or so): wait until the address's
    // claim answers again, then another deployment is still refused.
    let name = {
        use std::os::linux::net::SocketAddrExt as _;
        std::os::unix::net::SocketAddr::from_abstract_name(format!("paygate-listen/{listen}"))
            .unwrap()
    };
    let give_up = std::time::Instant::now() + Duration::from_secs(60);
    while std::os::unix::net::UnixStream::connect_addr(&name).is_err() {
        assert!(
            std::time::Instant::now() < give_up,
            "nobody took the claim over"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let refused = serve_on(&dir, &listen, "data-b")
        .err()
        .expect("still refused");
    assert!(refused.contains("already served"), "{refused}");
    signal(&second.0, "TERM");
    assert!(wait_exit(&mut second.0).success());
}
