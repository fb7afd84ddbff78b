//! paygate: a secure payments API server.
//!
//! Every request passes a chain of security mechanisms before any handler sees it (see
//! [`filter`]); this crate holds the server, the chain, the handlers and the storage they
//! share. The `paygate` binary (`main.rs`) only parses the command line and calls in here.
//!
//! # Layout
//!
//! Bottom layer first; a module uses only modules in layers below its own
//! (`tests/layers.rs` checks this, `docs/design.md` explains it).
//!
//! - Leaves: [`time`] (the one [`time::Clock`] and timestamps), [`decimal`], [`domain`]
//!   (validated values: usernames, permissions, amounts, ...), [`secret_file`] (private
//!   files, written atomically), [`client_ip`], [`token_bucket`] (the bucket arithmetic),
//!   [`systemd`] (`sd_notify`), [`signals`] (the stop signal), [`logging`] (the
//!   operational log's text and JSON lines).
//! - [`store`]: all SQL, behind the [`store::Store`] seam over SQLite and PostgreSQL; [`metrics`]: per-worker counters
//!   and `GET /metrics`; [`cli`]: the command-line grammar; [`s3`]: the S3 client of the
//!   audit archive.
//! - [`cache`]: this worker's exact cache of what it read from the store.
//! - The mechanisms' machinery: [`tokens`] (JWTs and their keys, opaque sessions, TOTP,
//!   capabilities), [`passwords`] (Argon2id at bounded concurrency), [`audit`] (the
//!   HMAC-chained, group-committed log and its verifier), [`ratelimit`] (buckets shared
//!   through SQLite, leases, the rule grammar).
//! - [`identity`]: who a request is (what authentication labels it with and the grant
//!   access control issues); [`http`]: the error type and its one mapping to
//!   problem+json; [`config`]: validated settings.
//! - [`app`]: the state requests share; [`routes`]: which operations exist and what access
//!   each needs; [`tls`]: rustls (ring) and development certificates; [`deployment`]: one
//!   deployment (data directory) per listening address.
//! - [`api`]: the handlers, one module per resource.
//! - [`filter`]: the chain in front of them, one module per stage —
//!   [`filter::rate_limit`], [`filter::authenticate`], [`filter::audit`],
//!   [`filter::access`].
//! - [`server`]: TCP accept loop, TLS, HTTP/1.1 and HTTP/2, structured shutdown.
//! - [`worker`]: one worker process's life (ready, reload, stop); [`supervisor`]:
//!   `serve --workers N` runs, restarts and rolls the worker processes.

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
pub mod logging;
pub mod metrics;
pub mod passwords;
pub mod ratelimit;
pub mod routes;
pub mod s3;
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
