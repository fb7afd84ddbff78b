//! The filter chain: every request passes these stages, in this order, before a handler
//! runs. This file is the whole security story of a request; read [`handle`] top to bottom.
//!
//! ```text
//! TLS ─▶ rate limit ─▶ authenticate ─▶ audit ─▶ access control ─▶ handler
//!        (may 429)     (never rejects)  (durable; (may 401/403/404)
//!                                       503 if not)
//! ```
//!
//! TLS is terminated by the server before a request exists (`crate::server`). Each stage
//! lives in its own module; this one only wires them together.

pub mod access;
pub mod audit;
pub mod authenticate;
pub mod rate_limit;

use std::borrow::Cow;
use std::net::SocketAddr;
use std::time::Instant;

use http::{Request, Response};
use uuid::Uuid;

use crate::api;
use crate::app::App;
use crate::client_ip::client_ip;
use crate::filter::authenticate::Credentials;
use crate::http::{finish, ApiError, Body, RequestBody};
use crate::identity::{AuthMethod, Identity};
use crate::routes;

/// Runs one request through the chain and returns the response to send.
pub async fn handle(
    app: &App,
    peer: SocketAddr,
    request: Request<impl RequestBody>,
) -> Response<Body> {
    let started = Instant::now();
    crate::cache::serving(started, chain(app, peer, request, started)).await
}

async fn chain(
    app: &App,
    peer: SocketAddr,
    request: Request<impl RequestBody>,
    started: Instant,
) -> Response<Body> {
    // Every response, error or not, carries this id in X-Request-Id (and the audit log).
    let request_id = Uuid::new_v4();
    // The client: the TCP peer, or what a trusted proxy says in X-Forwarded-For.
    let client = client_ip(peer.ip(), request.headers(), &app.config.trusted_proxies);
    // Which operation is asked for (pure parsing; unknown routes become a 404/405 to send).
    let route = routes::resolve(request.method(), request.uri().path());
    // The credentials offered, parsed once (a JWT's signature is checked here, in memory):
    // the rate limit keys on the user they name.
    let query = request.uri().query();
    let credentials = Credentials::read(request.headers(), query, &app.tokens, app.clock.now_s());
    // Rate limit: first, so a flood costs no hashing, no logging and no database work.
    let (method, path) = (request.method(), request.uri().path());
    let user = credentials.rate_limit_user(&app.cache);
    let password_user = credentials.password_user();
    let admitted = rate_limit::admit(app, client, method, path, user.as_deref(), password_user);
    let mut admission = match admitted.await {
        Ok(admission) => admission,
        Err(refusal) => {
            return answer(
                app,
                route.label(),
                Err(refusal),
                (request_id, started),
                None,
            )
        }
    };
    drop(user);
    // Authenticate: label the request with who it proves to be; never rejects.
    let identity = authenticate::identify(app, credentials).await;
    if let Identity::Failed { method, .. } = &identity {
        app.metrics
            .auth_failure(method.map_or("unknown-scheme", AuthMethod::as_str));
    }
    // A password that proved right gives back the guess the rate limit reserved for it.
    admission.settle(app, &identity).await;
    // Audit: the attempt is durable on disk before anything can change (or 503).
    let (path, query) = (request.uri().path(), request.uri().query());
    let method = request.method();
    let audited = audit::record_request(
        app, request_id, started, client, method, path, query, &route, &identity,
    );
    let audited = match audited.await {
        Ok(audited) => audited,
        Err(refusal) => {
            return answer(
                app,
                route.label(),
                Err(refusal),
                (request_id, started),
                Some(&admission),
            )
        }
    };
    let auth_failure = match &identity {
        Identity::Failed { reason, .. } => Some(reason.as_str()),
        _ => None,
    };
    // Access control: refuses with 401/403/404, or issues the grant the handler runs with.
    let label = route.label();
    let result = match access::authorize(app, identity, route.requirement(), client).await {
        Ok(grant) => api::dispatch(app, route, grant, request).await,
        Err(refusal) => Err(refusal),
    };
    // Audit: how it ended.
    let reason = match &result {
        Ok(_) => None,
        Err(ApiError::Unauthenticated(_)) => {
            Some(auth_failure.map_or(Cow::Borrowed("no credentials"), Cow::Borrowed))
        }
        Err(e) => Some(e.audit_reason()),
    };
    let status = match &result {
        Ok(response) => response.status(),
        Err(e) => e.status(),
    };
    audited.record_response(app, status.as_u16(), reason);
    answer(app, label, result, (request_id, started), Some(&admission))
}

/// Turns the chain's outcome into the response, counting it: every request ends here,
/// whichever stage answered it. Once the rate limit admitted the request, its quota
/// headers go on the answer too.
fn answer(
    app: &App,
    label: &'static str,
    result: Result<Response<Body>, ApiError>,
    (request_id, started): (Uuid, Instant),
    admission: Option<&rate_limit::Admission>,
) -> Response<Body> {
    let status = match &result {
        Ok(response) => response.status(),
        Err(refusal) => {
            if let ApiError::RateLimited { quota, .. } = refusal {
                app.metrics.rate_limited(&quota.name);
            }
            refusal.status()
        }
    };
    app.metrics
        .request(label, status.as_u16(), started.elapsed());
    let mut response = finish(result, request_id);
    if let Some(admission) = admission {
        admission.decorate(&mut response);
    }
    response
}

#[cfg(test)]
mod tests {
    //! The order of the stages, observed from outside: what a request is told reveals which
    //! stage stopped it.

    use super::*;
    use crate::config::{ServeConfig, Sources};
    use crate::domain::Username;
    use crate::passwords::hash_blocking;
    use crate::store::NewUser;
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
        fixture_with_rules(&[]).await
    }

    async fn fixture_with_rules(rules: &[&str]) -> Fixture {
        let dir = std::env::temp_dir().join(format!("paygate-chain-{}", Uuid::new_v4()));
        let mut options = std::collections::BTreeMap::new();
        options.insert("data-dir", vec![dir.display().to_string()]);
        if !rules.is_empty() {
            options.insert("rate-limit", rules.iter().map(|r| r.to_string()).collect());
        }
        let no_env = |_: &str| None;
        let config = ServeConfig::resolve(&Sources::new(&options, &no_env)).unwrap();
        let app = App::open(config, crate::time::Clock::system()).unwrap();
        let user = NewUser {
            username: Username::parse("username", "alice").unwrap(),
            password_hash: hash_blocking("alice password 1").unwrap(),
            role: None,
        };
        app.store
            .sqlite()
            .expect("a SQLite store")
            .create_user_blocking(&user)
            .unwrap();
        Fixture { app, dir }
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
    async fn the_rate_limit_refuses_before_anything_else_looks_at_the_request() {
        let f = fixture_with_rules(&["* / 1/day burst=1 key=ip"]).await;
        let right = || request("POST", "/accounts", Some("alice:alice password 1"), "x");
        assert_eq!(
            status(&f, right()).await,
            415,
            "the first request reaches the handler"
        );
        // Refused before authentication: no 401 for the wrong password, no 404 for a route
        // that does not exist, and the password-guess budget is not touched.
        let wrong = request("POST", "/accounts", Some("alice:wrong password"), "x");
        assert_eq!(status(&f, wrong).await, 429);
        assert_eq!(status(&f, request("GET", "/nowhere", None, "")).await, 429);
        for _ in 0..20 {
            let wrong = request("GET", "/accounts", Some("alice:wrong password"), "");
            assert_eq!(status(&f, wrong).await, 429);
        }
        let ticket = f.app.limiter.reserve_guess("alice").await;
        assert!(
            matches!(ticket, Ok(Some(_))),
            "alice's guess budget is untouched"
        );
    }

    #[tokio::test]
    async fn a_broken_rate_limit_store_fails_closed_with_503() {
        let f = fixture_with_rules(&["* / 100/s burst=100 key=ip"]).await;
        let db = rusqlite::Connection::open(f.dir.join("ratelimit.db")).unwrap();
        db.execute_batch("DROP TABLE buckets").unwrap();
        drop(db);
        let response = handle(
            &f.app,
            SocketAddr::from(([127, 0, 0, 1], 1)),
            request("GET", "/apiStatus", None, ""),
        )
        .await;
        assert_eq!(response.status(), 503);
        assert_eq!(
            response.headers()["content-type"],
            "application/problem+json"
        );
        assert_eq!(response.headers()["retry-after"], "1");
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
