//! A real Prometheus (Debian's `prometheus` package) scraping real paygate workers over
//! HTTPS, as an operator runs it: the target is up, paygate's `worker` label arrives
//! unchanged (nothing is renamed to `exported_*`), the exposition passes
//! `promtool check metrics`, and every query of the Grafana dashboard
//! (`etc/grafana/paygate.json`) returns data.

mod common;

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Client, Creds, StopOnDrop, TempDir};
use serde_json::{json, Value};

/// A program of Debian's `prometheus` package, or a failure that says how to get it.
fn tool(name: &str) -> &str {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "`{name}` not found: install Debian's prometheus package \
         (apt-get install prometheus; .ci/run does)"
    );
    name
}

/// Percent-encodes a query parameter's value.
fn encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// `GET path` on Prometheus's plain-HTTP API: the status and the body.
fn get(prometheus: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect(prometheus)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {prometheus}\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Ok((status, body.to_owned()))
}

/// The result vector of an instant query.
fn query(prometheus: SocketAddr, promql: &str) -> Vec<Value> {
    let (status, body) = get(
        prometheus,
        &format!("/api/v1/query?query={}", encode(promql)),
    )
    .unwrap_or_else(|e| panic!("querying Prometheus: {e}"));
    assert_eq!(status, 200, "{promql}: {body}");
    let answer: Value = serde_json::from_str(&body).unwrap();
    answer["data"]["result"].as_array().unwrap().clone()
}

/// Whether any sample of `result` is a number (a quantile of no observations is NaN).
fn has_number(result: &[Value]) -> bool {
    result.iter().any(|sample| {
        sample["value"][1]
            .as_str()
            .and_then(|v| v.parse::<f64>().ok())
            .is_some_and(f64::is_finite)
    })
}

/// A query and what it is for (a panel's title, or a variable's label).
type Titled = (String, String);

/// What Grafana would send for each of the dashboard's queries, with its variables at
/// "All" and `$__rate_interval` at a window that holds several 1 s scrapes; and the
/// template variables' `label_values(SERIES, LABEL)` as (SERIES, LABEL).
fn dashboard_queries() -> (Vec<Titled>, Vec<Titled>) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("etc/grafana/paygate.json");
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let grafana = |expr: &str| {
        expr.replace("$__rate_interval", "30s")
            .replace("\"$job\"", "\".*\"")
            .replace("\"$worker\"", "\".*\"")
    };
    let mut panels = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let title = panel["title"].as_str().unwrap().to_owned();
            panels.push((title, grafana(target["expr"].as_str().unwrap())));
        }
    }
    // docs/operating.md lists every panel.
    let docs =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/operating.md"))
            .unwrap();
    for (title, _) in &panels {
        assert!(
            docs.contains(&format!("| {title} |")),
            "{title} is not in docs/operating.md"
        );
    }
    let mut variables = Vec::new();
    for variable in dashboard["templating"]["list"].as_array().unwrap() {
        let Some(definition) = variable["definition"].as_str() else {
            continue;
        };
        let inner = definition
            .strip_prefix("label_values(")
            .and_then(|d| d.strip_suffix(')'))
            .unwrap_or_else(|| panic!("{definition}"));
        let (series, label) = inner.rsplit_once(", ").unwrap();
        variables.push((grafana(series), label.to_owned()));
    }
    (panels, variables)
}

/// Requests of every kind the dashboard shows, over and over until `stop`: answers, 429s,
/// authentication failures, audit records, cache lookups.
async fn traffic(client: Client, alice: Creds, stop: tokio::sync::watch::Receiver<bool>) {
    let account = client.account(&alice, "EUR").await;
    let token = client.login(&alice).await;
    let mut n = 0;
    while !*stop.borrow() {
        n += 1;
        let payment = client
            .post(&format!("/accounts/{account}/payments"))
            .bearer(&token)
            .json(&json!({"payee": "ACME", "amount_minor": n, "currency": "EUR"}))
            .send()
            .await;
        assert_eq!(payment.status, 201, "{}", payment.text());
        let id = payment.json()["id"].as_str().unwrap().to_owned();
        let read = client
            .get(&format!("/accounts/{account}/payments/{id}"))
            .bearer(&token)
            .send()
            .await;
        assert_eq!(read.status, 200);
        // The rule below allows three; the rest are 429s.
        client.get("/apiStatus").send().await;
        let forged = client
            .get("/users/me")
            .bearer(&format!("{token}x"))
            .send()
            .await;
        assert_eq!(forged.status, 401);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_every_worker_and_every_dashboard_query_has_data() {
    let (prometheus_bin, promtool) = (tool("prometheus"), tool("promtool"));
    let dir = TempDir::new("prometheus");
    let rule = ["--rate-limit", "GET /apiStatus 1/hour burst=3 key=ip"];
    let args = [&["--workers", "2"][..], &rule[..]].concat();
    let (paygate, addr, _log) = common::serve_logging(&dir, &args, "info");
    let _paygate = StopOnDrop(paygate);
    let ca = dir.0.join("certs/server.crt");
    let client = Client::new(addr, &ca);
    let alice = client.register("alice").await;

    // What a scrape reads is a clean exposition for Prometheus's own checker.
    let exposition = client.get("/metrics").send().await;
    assert_eq!(exposition.status, 200);
    let mut check = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    check
        .stdin
        .take()
        .unwrap()
        .write_all(exposition.text().as_bytes())
        .unwrap();
    let checked = check.wait_with_output().unwrap();
    let said = String::from_utf8_lossy(&checked.stdout).into_owned()
        + &String::from_utf8_lossy(&checked.stderr);
    assert!(checked.status.success() && said.trim().is_empty(), "{said}");

    // Prometheus as an operator configures it: HTTPS, the development certificate as CA.
    let web = SocketAddr::from(([127, 0, 0, 1], common::free_port()));
    let config = dir.0.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n  - job_name: paygate\n    scheme: https\n    \
             tls_config:\n      ca_file: {}\n    static_configs:\n      \
             - targets: ['{addr}']\n",
            ca.display()
        ),
    )
    .unwrap();
    let prometheus = Command::new(prometheus_bin)
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.0.join("tsdb").display()
        ))
        .arg(format!("--web.listen-address={web}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(
            std::fs::File::create(dir.0.join("prometheus.log")).unwrap(),
        ))
        .spawn()
        .unwrap();
    let _prometheus = StopOnDrop(prometheus);
    let prometheus_log = || std::fs::read_to_string(dir.0.join("prometheus.log")).unwrap();

    let (stop, stopped) = tokio::sync::watch::channel(false);
    let traffic = tokio::spawn(traffic(client.clone(), alice, stopped));
    let (panels, variables) = dashboard_queries();
    assert!(panels.len() >= 12, "{panels:?}");

    // Prometheus may take a moment to listen.
    let ready = Instant::now();
    while get(web, "/-/ready").map_or(true, |(s, _)| s != 200) {
        assert!(
            ready.elapsed() < Duration::from_secs(120),
            "{}",
            prometheus_log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Until everything shows (Prometheus starts, scrapes twice a window), or a minute.
    let missing = tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        loop {
            let mut missing = Vec::new();
            let up = query(web, "up{job=\"paygate\"}");
            if up.len() != 1 || up[0]["value"][1] != "1" {
                missing.push(format!("up: {up:?}"));
            }
            for (title, promql) in &panels {
                if !has_number(&query(web, promql)) {
                    missing.push(format!("{title}: {promql}"));
                }
            }
            for (series, label) in &variables {
                let result = query(web, series);
                if !result.iter().any(|s| s["metric"][label].is_string()) {
                    missing.push(format!("variable {label}: {series}"));
                }
            }
            if missing.is_empty() || started.elapsed() > Duration::from_secs(120) {
                return missing;
            }
            std::thread::sleep(Duration::from_secs(1));
        }
    });
    let missing = missing.await.unwrap();
    stop.send(true).unwrap();
    traffic.await.unwrap();
    assert!(
        missing.is_empty(),
        "no data for:\n{}\n{}",
        missing.join("\n"),
        prometheus_log()
    );

    // Both workers' series arrive through one target, each under its own `worker`, with
    // `instance` left to Prometheus (the target) and no label renamed.
    let starts = query(web, "paygate_worker_start_time_seconds{job=\"paygate\"}");
    let mut workers: Vec<&str> = starts
        .iter()
        .map(|s| s["metric"]["worker"].as_str().unwrap())
        .collect();
    workers.sort();
    assert_eq!(workers, ["1", "2"], "{starts:?}");
    for sample in &starts {
        assert_eq!(sample["metric"]["instance"], addr.to_string(), "{sample}");
    }
    let renamed = query(web, "count({job=\"paygate\", exported_instance=~\".+\"})");
    assert!(renamed.is_empty(), "{renamed:?}");
    let renamed = query(web, "count({job=\"paygate\", exported_job=~\".+\"})");
    assert!(renamed.is_empty(), "{renamed:?}");
}
