//! Cache leases: how a node's cache stays exact without asking the database on every
//! request (`sql/postgres/002_cache_leases.sql`).
//!
//! Each serving process holds a lease: every [`RENEW_EVERY`] it renews its row, which
//! also tells it the change log's head, applies what changed, and records the position it
//! applied (`seen`). It trusts its cache without a query only until [`TRUSTED_FOR`] after
//! it *sent* its last successful renewal; otherwise each decision reads the head as before
//! (`HeadReads`). A transaction that logged a change (a logout, a revocation, a disabled
//! user, a grant changed, a capability revoked, a payment cancelled) answers only after
//! [`PgStore::applied_everywhere`]: every process with a recent row has recorded a `seen`
//! at or past the change, or [`LEASE`] has passed since the commit returned.
//!
//! Why that is exact. Take a change committed at time C and answered at R, and a request
//! that starts after R on a process whose lease is trusted when the request decides. That
//! lease comes from a renewal sent at some S, trusted until S + 900 ms. If the renewal's
//! head read (a snapshot taken after S) saw the change, the process applied it before it
//! trusted the lease. If not, the snapshot, and so S, came before C: the lease is trusted
//! until before C + 900 ms, which is before R when the writer waited out the lease (R >
//! C + 1 s), and when the writer did not, it saw the process record `seen` past the change,
//! which the process writes only after applying it. Either way the request sees the change.
//! Only each machine's monotonic clock measures the lease (the 100 ms between 900 ms and
//! 1 s absorbs clocks running at different rates). The database's clock only decides which
//! rows are *dead* (not renewed for 10 s, so a crashed process does not make every writer
//! wait a second): the guarantee assumes that clock does not jump forward by more than
//! 9 s at once.
//!
//! Notifications make it fast, not correct: the change-log trigger calls
//! `pg_notify('paygate_changes', …)`, and each process listens on a connection of its own
//! ([`ChangeFeed`]); a notification starts a renewal at once, so a writer usually waits for
//! one round trip or two, not for the next renewal. A lost notification, or a listening
//! connection cut, costs the writer at most the wait until the next renewal (200 ms); the
//! listener reconnects by itself and renews on reconnecting.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio_postgres::AsyncMessage;
use tokio_postgres_rustls::MakeRustlsConnect;
use uuid::Uuid;

use super::{error_text, tls, PgStore};
use crate::store::StoreError;

/// How long a writer waits at most for every process to apply its change.
pub const LEASE: Duration = Duration::from_millis(1_000);

/// How long after sending a renewal a process trusts its cache without a query.
pub const TRUSTED_FOR: Duration = Duration::from_millis(900);

/// How often a process renews its lease.
pub const RENEW_EVERY: Duration = Duration::from_millis(200);

/// The longest pause between two looks at who has applied a change.
const MAX_PAUSE: Duration = Duration::from_millis(20);

impl PgStore {
    /// Renews (or takes) the lease of `holder`, a process of `node` that has applied the
    /// change log up to `seen`; the log's head, read by this statement after it was sent.
    pub async fn renew_lease(
        &self,
        holder: Uuid,
        node: &str,
        seen: i64,
    ) -> Result<i64, StoreError> {
        // The sealing keys this process holds go with each renewal (a stat of the key
        // file; it is read again only when it changed), for `keys rotate-totp`.
        let sealing = self.totp_keys.held();
        let client = self.client().await?;
        let statement = client
            .prepare_cached(
                "INSERT INTO cache_leases (holder, node, seen, renewed_at, sealing_keys)
                 VALUES ($1, $2, $3, now(), $4)
                 ON CONFLICT (holder) DO UPDATE
                     SET seen = greatest(cache_leases.seen, excluded.seen),
                         renewed_at = excluded.renewed_at,
                         sealing_keys = excluded.sealing_keys
                 RETURNING (SELECT seq FROM changes_head)",
            )
            .await?;
        let row = client
            .query_one(&statement, &[&holder, &node, &seen, &sealing])
            .await?;
        Ok(row.try_get(0)?)
    }

    /// Records that `holder` has applied the change log up to `seen`.
    pub async fn record_applied(&self, holder: Uuid, seen: i64) -> Result<(), StoreError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached("UPDATE cache_leases SET seen = $2 WHERE holder = $1 AND seen < $2")
            .await?;
        client.execute(&statement, &[&holder, &seen]).await?;
        Ok(())
    }

    /// The sealing keys each running process holds, as it last reported them with its
    /// lease: `(node, keys)`, the key it seals with first (processes not heard of for 10 s
    /// are gone and left out).
    pub async fn sealing_keys_held(&self) -> Result<Vec<(String, String)>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT node, sealing_keys FROM cache_leases
                  WHERE renewed_at > now() - interval '10 seconds'
                  ORDER BY node",
                &[],
            )
            .await?;
        rows.iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
            .collect()
    }

    /// Gives up `holder`'s lease (a process stopping): writers stop waiting for it.
    pub async fn end_lease(&self, holder: Uuid) -> Result<(), StoreError> {
        let client = self.client().await?;
        client
            .execute("DELETE FROM cache_leases WHERE holder = $1", &[&holder])
            .await?;
        Ok(())
    }

    /// Waits, after a transaction that logged a change has committed, until every live
    /// process has applied the change log up to its head, or [`LEASE`] has passed: by
    /// then each lease that missed the change has lapsed. Never fails: when the database
    /// cannot be asked, the lease is waited out.
    pub(super) async fn applied_everywhere(&self) {
        let deadline = Instant::now() + LEASE;
        let mut head = None;
        let mut pause = Duration::from_millis(1);
        loop {
            match self.lagging(head).await {
                Ok((_, 0)) => return,
                Ok((newest, _)) => head = Some(newest),
                Err(e) if head.is_none() => {
                    log::warn!("cannot read who has applied a change ({e}): waiting out the lease");
                    tokio::time::sleep_until(deadline.into()).await;
                    return;
                }
                Err(_) => {}
            }
            let now = Instant::now();
            if now >= deadline {
                return;
            }
            tokio::time::sleep(pause.min(deadline - now)).await;
            pause = (pause * 2).min(MAX_PAUSE);
        }
    }

    /// The change log's head (`head`, or read now), and how many live processes have not
    /// applied it.
    async fn lagging(&self, head: Option<i64>) -> Result<(i64, i64), StoreError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(
                // Rows not renewed for 10 s belong to processes that are gone.
                "SELECT h.seq, (SELECT count(*) FROM cache_leases l
                                WHERE l.seen < h.seq
                                  AND l.renewed_at > now() - interval '10 seconds')
                 FROM (SELECT coalesce($1, (SELECT seq FROM changes_head)) AS seq) h",
            )
            .await?;
        let row = client.query_one(&statement, &[&head]).await?;
        Ok((row.try_get(0)?, row.try_get(1)?))
    }

    /// Deletes the rows of processes gone for an hour (their writers stopped waiting for
    /// them after 10 s).
    pub(super) async fn sweep_dead_leases(&self) -> Result<u64, StoreError> {
        let client = self.client().await?;
        Ok(client
            .execute(
                "DELETE FROM cache_leases WHERE renewed_at < now() - interval '1 hour'",
                &[],
            )
            .await?)
    }

    /// Starts listening for the change log's notifications on a connection of its own;
    /// each one (and each reconnection, since notifications were lost while cut) wakes
    /// `wake`. Runs until the feed is dropped.
    pub fn follow_changes(&self, wake: Arc<Notify>) -> ChangeFeed {
        let url = self.url.clone();
        let task = tokio::spawn(async move {
            let mut pause = Duration::from_millis(100);
            loop {
                match listen(&url, &wake).await {
                    Ok(()) => pause = Duration::from_millis(100),
                    Err(e) => {
                        log::warn!(
                            "change notifications from {}: {e}; retrying in {} ms",
                            url.describe(),
                            pause.as_millis()
                        );
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(Duration::from_secs(5));
                    }
                }
            }
        });
        ChangeFeed { task }
    }
}

/// The task listening for change notifications; stops when dropped.
pub struct ChangeFeed {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ChangeFeed {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One listening connection, until it ends: `Ok` when it was up and then closed.
async fn listen(url: &super::DatabaseUrl, wake: &Arc<Notify>) -> Result<(), String> {
    let tls = tls::client_config(&url.verify)?;
    let mut config = url.config.clone();
    config.application_name("paygate-changes");
    let (client, mut connection) = config
        .connect(MakeRustlsConnect::new(tls))
        .await
        .map_err(|e| error_text(&e))?;
    let heard = wake.clone();
    let reader = tokio::spawn(async move {
        loop {
            match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notification(_))) => heard.notify_one(),
                Some(Ok(_)) => {}
                Some(Err(e)) => return Some(error_text(&e)),
                None => return None,
            }
        }
    });
    if let Err(e) = client.batch_execute("LISTEN paygate_changes").await {
        reader.abort();
        return Err(error_text(&e));
    }
    // Whatever was committed while nobody listened is read by the renewal this starts.
    wake.notify_one();
    // The client stays open (and so the connection) until the reader sees it end.
    let ended = reader.await;
    drop(client);
    match ended {
        Ok(Some(e)) => Err(e),
        _ => Ok(()),
    }
}
