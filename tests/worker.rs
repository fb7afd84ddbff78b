//! A worker's life after start: the command loop the supervisor and signals drive, and the
//! shutdown that ends every connection before the audit log closes.

mod common;

use std::time::Duration;

use common::{paygate_command, Client, TestServer};
use paygate::config::TlsFiles;
use paygate::worker::{obey, Inputs};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

#[tokio::test]
async fn a_reload_takes_the_new_certificate_and_stop_ends_the_loop() {
    let server = TestServer::start().await;
    let (commands, command_rx) = mpsc::unbounded_channel();
    let (hangups, hangup_rx) = mpsc::unbounded_channel();
    // A new certificate and key in place of the old ones, as certbot would leave them.
    let files = TlsFiles {
        cert: server.dir.0.join("server.crt"),
        key: server.dir.0.join("server.key"),
        are_defaults: false,
    };
    let old_client = Client::new(server.addr, &files.cert);
    paygate::tls::write_dev_certificate(&files, true).unwrap();
    let new_client = Client::new(server.addr, &files.cert);
    hangups.send(()).unwrap();
    commands.send("frobnicate".to_owned()).unwrap();
    commands.send("stop".to_owned()).unwrap();
    let inputs = Inputs {
        stop: std::future::pending(),
        commands: command_rx,
        hangups: hangup_rx,
    };
    obey(server.running(), inputs).await;
    // The loop reloaded on SIGHUP, ignored the unknown command and returned on `stop`;
    // serving is the caller's to end.
    assert_eq!(new_client.get("/apiStatus").send().await.status, 200);
    assert!(
        old_client.get("/apiStatus").try_send().await.is_none(),
        "new connections present the new certificate"
    );
    drop(hangups);
    server.shutdown().await;
}

#[tokio::test]
async fn the_loop_ends_when_the_supervisor_goes_or_a_stop_signal_arrives() {
    let server = TestServer::start().await;
    let (commands, command_rx) = mpsc::unbounded_channel::<String>();
    let (_hangups, hangup_rx) = mpsc::unbounded_channel();
    drop(commands);
    let inputs = Inputs {
        stop: std::future::pending(),
        commands: command_rx,
        hangups: hangup_rx,
    };
    obey(server.running(), inputs).await;
    let (_commands, command_rx) = mpsc::unbounded_channel::<String>();
    let (_hangups, hangup_rx) = mpsc::unbounded_channel();
    let inputs = Inputs {
        stop: std::future::ready(()),
        commands: command_rx,
        hangups: hangup_rx,
    };
    obey(server.running(), inputs).await;
    server.shutdown().await;
}

/// A client that stalls mid-body holds its request past the drain deadline: shutdown ends
/// its connection, and only then closes the audit log, whose chain still verifies.
#[tokio::test]
async fn shutdown_ends_stalled_requests_before_the_audit_log_closes() {
    let server =
        TestServer::start_with(&[("client-timeout", "60"), ("shutdown-timeout", "1")]).await;
    let mut stalled = server.client.connect().await;
    stalled
        .write_all(
            b"POST /users HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n\
              content-length: 100\r\n\r\n{\"username\":",
        )
        .await
        .unwrap();
    stalled.flush().await.unwrap();
    // The request is in the handler (its body being read) once its audit record exists.
    let data = server.data_dir();
    let mut recorded = false;
    for _ in 0..600 {
        let audit = std::fs::read_dir(data.join("audit"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|dir| std::fs::read_dir(dir.path()).ok())
            .flatten()
            .flatten()
            .filter_map(|file| std::fs::read(file.path()).ok())
            .any(|bytes| String::from_utf8_lossy(&bytes).contains("\"/users\""));
        if audit {
            recorded = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(recorded, "the stalled request was recorded");
    let dir = server.stop().await;
    // The connection was closed by the server, not answered later.
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(30), stalled.read_to_end(&mut rest)).await;
    assert!(read.is_ok(), "the stalled connection was ended by shutdown");
    let verified = paygate_command(&dir)
        .args(["audit", "verify", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(
        verified.status.success(),
        "{}",
        String::from_utf8_lossy(&verified.stdout)
    );
}
