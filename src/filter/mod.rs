//! The filter chain: every request passes these stages, in this order, before a handler
//! runs. This file is the whole security story of a request; read [`handle`] top to bottom.
//!
//! ```text
//! TLS ─▶ authenticate ─▶ access control ─▶ handler
//!        (never rejects)  (may 401/403/404)
//! ```
//!
//! TLS is terminated by the server before a request exists (`crate::server`). Each stage
//! lives in its own module; this one only wires them together.

pub mod access;
pub mod authenticate;

use std::net::SocketAddr;

use crate::http::RequestBody;
use http::{Request, Response};
use uuid::Uuid;

use crate::api;
use crate::app::App;
use crate::http::{finish, Body};
use crate::routes;

/// Runs one request through the chain and returns the response to send.
pub async fn handle(
    app: &App,
    _peer: SocketAddr,
    request: Request<impl RequestBody>,
) -> Response<Body> {
    // Every response, error or not, carries this id in X-Request-Id.
    let request_id = Uuid::new_v4();
    // Which operation is asked for (pure parsing; unknown routes become a 404/405 to send).
    let route = routes::resolve(request.method(), request.uri().path());
    // Authenticate: label the request with who it proves to be; never rejects.
    let identity = authenticate::identify(app, request.headers()).await;
    // Access control: the only stage here that refuses (401/403/404).
    let result = match access::authorize(app, identity, route.requirement()).await {
        // The handler runs only with the grant access control issued.
        Ok(grant) => api::dispatch(app, route, grant, request).await,
        Err(refusal) => Err(refusal),
    };
    finish(result, request_id)
}

#[cfg(test)]
mod tests {
    //! The order of the stages, observed from outside: what a request is told reveals which
    //! stage stopped it.

    use super::*;
    use crate::config::{ServeConfig, Sources};
    use crate::domain::Username;
    use crate::passwords::{hash_blocking, Passwords};
    use crate::store::{NewUser, Store};
    use base64::Engine as _;
    use bytes::Bytes;
    use http_body_util::Full;

    struct Fixture {
        app: App,
        dir: std::path::PathBuf,
    }

    impl Drop for Fixture {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    async fn fixture() -> Fixture {
        let dir = std::env::temp_dir().join(format!("paygate-chain-{}", Uuid::new_v4()));
        let store = Store::open(&dir).unwrap();
        let options = std::collections::BTreeMap::new();
        let no_env = |_: &str| None;
        let config = ServeConfig::resolve(&Sources::new(&options, &no_env)).unwrap();
        let user = NewUser {
            username: Username::parse("username", "alice").unwrap(),
            password_hash: hash_blocking("alice password 1").unwrap(),
            role: None,
        };
        store.create_user_blocking(&user).unwrap();
        Fixture {
            app: App {
                config,
                store,
                passwords: Passwords::new().unwrap(),
            },
            dir,
        }
    }

    fn request(method: &str, path: &str, auth: Option<&str>, body: &str) -> Request<Full<Bytes>> {
        let mut builder = Request::builder().method(method).uri(path);
        if let Some(credentials) = auth {
            let encoded = base64::engine::general_purpose::STANDARD.encode(credentials);
            builder = builder.header("authorization", format!("Basic {encoded}"));
        }
        builder
            .body(Full::new(Bytes::from(body.to_owned())))
            .unwrap()
    }

    async fn status(f: &Fixture, request: Request<Full<Bytes>>) -> u16 {
        let peer = SocketAddr::from(([127, 0, 0, 1], 1));
        handle(&f.app, peer, request).await.status().as_u16()
    }

    #[tokio::test]
    async fn access_control_runs_before_the_handler_reads_the_body() {
        let f = fixture().await;
        // Without credentials: 401, although the body would also be a 415.
        assert_eq!(
            status(&f, request("POST", "/accounts", None, "not json")).await,
            401
        );
        // Wrong password: still 401 from access control, the handler never runs.
        let wrong = request(
            "POST",
            "/accounts",
            Some("alice:wrong password"),
            "not json",
        );
        assert_eq!(status(&f, wrong).await, 401);
        // Right password: now the handler runs and judges the body.
        let right = request(
            "POST",
            "/accounts",
            Some("alice:alice password 1"),
            "not json",
        );
        assert_eq!(status(&f, right).await, 415);
    }

    #[tokio::test]
    async fn authentication_labels_but_never_rejects() {
        let f = fixture().await;
        // Bad credentials on a public route: authenticated (and failed), yet served.
        let public = request("GET", "/apiStatus", Some("alice:wrong password"), "");
        assert_eq!(status(&f, public).await, 200);
        let unknown = request("GET", "/apiStatus", Some("mallory:whatever1"), "");
        assert_eq!(status(&f, unknown).await, 200);
    }

    #[tokio::test]
    async fn object_checks_come_before_permission_checks() {
        let f = fixture().await;
        let account = Uuid::new_v4();
        // No grant on the account: 404 even for an operation alice could never do.
        let path = format!("/accounts/{account}/members");
        let r = request("POST", &path, Some("alice:alice password 1"), "{}");
        assert_eq!(status(&f, r).await, 404);
    }

    #[tokio::test]
    async fn unknown_routes_pass_the_chain_and_are_answered_at_the_end() {
        let f = fixture().await;
        assert_eq!(status(&f, request("GET", "/nowhere", None, "")).await, 404);
        assert_eq!(
            status(&f, request("DELETE", "/apiStatus", None, "")).await,
            405
        );
    }
}
