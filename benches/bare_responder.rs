//! The yardstick for load tests: a bare hyper + tokio-rustls server with paygate's own TLS
//! configuration, answering every request with a fixed JSON body of a chosen size and
//! nothing else — no chain, no storage. `scripts/loadtest.sh` measures it in the same run as
//! paygate, so every paygate figure can be quoted as a ratio of this machine's limit.
//!
//! ```text
//! cargo run --release --example bare_responder -- LISTEN CERT KEY BODY_BYTES
//! ```

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Response};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [listen, cert, key, size] = args.as_slice() else {
        return Err("usage: bare_responder LISTEN CERT KEY BODY_BYTES".into());
    };
    let listen: SocketAddr = listen.parse()?;
    let files = paygate::config::TlsFiles {
        cert: PathBuf::from(cert),
        key: PathBuf::from(key),
        are_defaults: false,
    };
    let acceptor = TlsAcceptor::from(paygate::tls::server_config(&files)?.0);
    let body = Bytes::from(format!(
        "{{\"pad\":\"{}\"}}",
        "x".repeat(size.parse::<usize>()?.saturating_sub(10))
    ));
    let listener = TcpListener::bind(listen).await?;
    eprintln!(
        "bare responder listening on https://{}",
        listener.local_addr()?
    );
    let builder = Arc::new(auto::Builder::new(TokioExecutor::new()));
    loop {
        let (tcp, _) = listener.accept().await?;
        let (acceptor, builder, body) = (acceptor.clone(), builder.clone(), body.clone());
        tokio::spawn(async move {
            let _ = tcp.set_nodelay(true);
            let Ok(tls) = acceptor.accept(tcp).await else {
                return;
            };
            let service = service_fn(move |_request| {
                let mut response = Response::new(Full::new(body.clone()));
                response.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
                async move { Ok::<_, Infallible>(response) }
            });
            let _ = builder.serve_connection(TokioIo::new(tls), service).await;
        });
    }
}
