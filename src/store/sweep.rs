//! Deleting what has expired: sessions, JWT revocations and capabilities (they are refused
//! by their expiry anyway; sweeping only keeps the tables small), and the change log
//! beyond its newest [`CHANGES_KEPT`] rows.

use rusqlite::TransactionBehavior;

use super::{SqliteStore, StoreError};

/// Rows of the change log kept by the sweep: what workers read when the data version moves.
/// One that has not looked for this many changes drops its whole cache instead.
pub const CHANGES_KEPT: i64 = 100_000;

impl SqliteStore {
    /// Deletes expired sessions, JWT revocations and capabilities; returns how many rows
    /// went. (A capability's descendants never outlive it, so one statement removes whole
    /// expired trees and the parent references stay intact.)
    pub async fn sweep_expired(&self) -> Result<usize, StoreError> {
        let clock = self.clock.clone();
        self.run(move |conn| {
            let now_ms = clock.now_millis();
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let sessions = tx.execute("DELETE FROM sessions WHERE expires_at <= ?1", [now_ms])?;
            let revoked = tx.execute(
                "DELETE FROM revoked_tokens WHERE expires_at <= ?1",
                [now_ms / 1000],
            )?;
            let capabilities =
                tx.execute("DELETE FROM capabilities WHERE expires_at <= ?1", [now_ms])?;
            // The change log keeps its newest rows; a worker further behind drops its cache.
            tx.execute(
                "DELETE FROM changes WHERE seq <= (SELECT max(seq) FROM changes) - ?1",
                [CHANGES_KEPT],
            )?;
            tx.commit()?;
            Ok(sessions + revoked + capabilities)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use crate::store::test_support::{temp_store, user};

    #[tokio::test]
    async fn the_sweeper_removes_only_what_expired() {
        let (store, dir) = temp_store();
        let alice = user(&store, "alice");
        let now = crate::time::now_millis();
        store
            .create_session([1; 32], alice, "pwd".into(), now - 1)
            .await
            .unwrap();
        store
            .create_session([2; 32], alice, "pwd".into(), now + 60_000)
            .await
            .unwrap();
        store
            .revoke_jti("old".into(), now / 1000 - 1)
            .await
            .unwrap();
        store
            .revoke_jti("new".into(), now / 1000 + 60)
            .await
            .unwrap();
        assert_eq!(store.sweep_expired().await.unwrap(), 2);
        assert!(store.session([2; 32]).await.unwrap().is_some());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
