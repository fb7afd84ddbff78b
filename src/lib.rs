//! paygate: a secure payments API server.
//!
//! Every request passes a chain of security mechanisms before any handler sees it (see
//! [`filter`]); this crate holds the server, the chain, the handlers and the storage they
//! share. The `paygate` binary (`main.rs`) only parses the command line and calls in here.
//!
//! # Layout
//!
//! - [`cli`] and [`config`]: command line and environment → validated settings.
//! - [`server`]: TCP accept loop, TLS termination, HTTP/1.1 and HTTP/2, graceful drain;
//!   [`deployment`]: one deployment (data directory) per listening address.
//! - [`tls`]: rustls configuration (ring provider) and development certificates.
//! - [`filter`]: the filter chain, one module per stage — [`filter::rate_limit`],
//!   [`filter::authenticate`], [`filter::access`].
//! - [`audit`]: the HMAC-chained, group-committed audit log and its verifier.
//! - [`routes`]: which operations exist and what access each needs.
//! - [`api`]: the handlers, one module per resource.
//! - [`http`]: the error type and its one mapping to problem+json, JSON bodies, headers.
//! - [`domain`]: validated values (usernames, permissions, amounts, currencies, ...).
//! - [`passwords`]: Argon2id hashing at bounded concurrency.
//! - [`tokens`]: JWTs and their keys, opaque session tokens, TOTP, and the exact per-worker
//!   cache of token state.
//! - [`ratelimit`]: token buckets shared through SQLite, and the rule grammar.
//! - [`store`]: all SQL, behind the [`store::Store`] type; [`cache`]: this worker's exact
//!   cache of what it read there.
//! - [`supervisor`]: `serve --workers N`: runs, restarts and stops the worker processes.
//! - [`metrics`]: per-worker counters and `GET /metrics` (Prometheus text).
//! - [`systemd`]: `sd_notify` (READY, STOPPING) over `$NOTIFY_SOCKET`.
//! - [`secret_file`]: private (0600) files in the data directory, written atomically.
//! - [`app`]: the state requests share; [`time`]: timestamps; [`decimal`]: integers as
//!   digits for hand-built header values and audit lines.

#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

pub mod api;
pub mod app;
pub mod audit;
pub mod cache;
pub mod cli;
pub mod client_ip;
pub mod config;
pub mod decimal;
pub mod deployment;
pub mod domain;
pub mod filter;
pub mod http;
pub mod identity;
pub mod metrics;
pub mod passwords;
pub mod ratelimit;
pub mod routes;
pub mod secret_file;
pub mod server;
pub mod signals;
pub mod store;
pub mod supervisor;
pub mod systemd;
pub mod time;
pub mod tls;
pub mod token_bucket;
pub mod tokens;
pub mod worker;
