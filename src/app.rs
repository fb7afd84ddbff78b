//! The state every request of a worker shares.

use crate::config::ServeConfig;
use crate::passwords::Passwords;
use crate::store::Store;

/// Shared, read-mostly state; one per worker, behind an `Arc`.
pub struct App {
    pub config: ServeConfig,
    pub store: Store,
    pub passwords: Passwords,
}
