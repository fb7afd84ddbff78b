//! Reading the change log on PostgreSQL (`sql/postgres/001_init.sql`): what a node's cache
//! evicts when another node changed something. The same answers as
//! `store::DataVersion::changes_since` on SQLite; the log's head row stands in for
//! `sqlite_sequence`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use tokio::sync::oneshot;

use super::PgStore;
use crate::store::{Change, ChangesSince, StoreError};

/// Reads of the change log's head, shared by the callers that ask at the same time. Each
/// caller gets a value read by a query sent after a moment it names (when it asked, or
/// when the request it serves began), so it sees every commit that returned before that
/// moment — exact, as one query per caller would be. Callers that ask while a query is out
/// share the next one, and a request's later decisions reuse a value read after it began:
/// under load a node sends one such query per round trip, not one per decision.
pub struct HeadReads {
    store: PgStore,
    round: Mutex<Round>,
    /// Queries sent so far.
    sent: AtomicU64,
}

#[derive(Default)]
struct Round {
    /// Whether a query is out (a task is running rounds).
    running: bool,
    /// Callers waiting for a query sent after they asked.
    waiting: Vec<oneshot::Sender<Result<i64, StoreError>>>,
    /// The newest head read, and when its query was sent.
    latest: Option<(Instant, i64)>,
}

impl HeadReads {
    pub fn new(store: PgStore) -> Arc<HeadReads> {
        Arc::new(HeadReads {
            store,
            round: Mutex::new(Round::default()),
            sent: AtomicU64::new(0),
        })
    }

    /// How many queries of the head this node sent: against the decisions they served,
    /// how much sharing saved.
    pub fn queries(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// The change log's head, read by a query sent after `since` (default: now).
    pub async fn newest(self: &Arc<Self>, since: Option<Instant>) -> Result<i64, StoreError> {
        let (answer, wait) = oneshot::channel();
        let start = {
            let mut round = self.round.lock().unwrap_or_else(PoisonError::into_inner);
            if let (Some(since), Some((sent, head))) = (since, round.latest) {
                if sent >= since {
                    return Ok(head);
                }
            }
            round.waiting.push(answer);
            !std::mem::replace(&mut round.running, true)
        };
        if start {
            tokio::spawn(self.clone().rounds());
        }
        wait.await.map_err(|_| StoreError::TaskFailed)?
    }

    /// Sends one query for everyone waiting, answers them, and goes on while more wait.
    async fn rounds(self: Arc<Self>) {
        loop {
            let waiting = {
                let mut round = self.round.lock().unwrap_or_else(PoisonError::into_inner);
                if round.waiting.is_empty() {
                    round.running = false;
                    return;
                }
                std::mem::take(&mut round.waiting)
            };
            // Every caller in `waiting` asked before this query is sent.
            let sent = Instant::now();
            self.sent.fetch_add(1, Ordering::Relaxed);
            let head = self.store.newest_change().await;
            if let Ok(seq) = head {
                // Rounds run one after another: this is the newest value.
                self.round
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .latest = Some((sent, seq));
            }
            for answer in waiting {
                let _ = answer.send(match &head {
                    Ok(seq) => Ok(*seq),
                    Err(e) => Err(e.duplicate()),
                });
            }
        }
    }
}

impl PgStore {
    /// The change log's newest position (0 before the first change).
    pub async fn newest_change(&self) -> Result<i64, StoreError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached("SELECT seq FROM changes_head")
            .await?;
        Ok(client.query_one(&statement, &[]).await?.try_get(0)?)
    }

    /// The changes committed after position `seen`, or word that some were pruned.
    /// Positions are consecutive and in commit order (the head row's lock), so a gap
    /// after `seen` is rows the sweep deleted.
    pub async fn changes_since(&self, seen: i64) -> Result<ChangesSince, StoreError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(
                "SELECT c.seq, c.kind, c.key, (SELECT h.seq FROM changes_head h) AS head
                 FROM changes c WHERE c.seq > $1 ORDER BY c.seq",
            )
            .await?;
        let rows = client.query(&statement, &[&seen]).await?;
        let mut changes = Vec::with_capacity(rows.len());
        let mut last = seen;
        for row in &rows {
            let seq: i64 = row.try_get(0)?;
            if changes.is_empty() && seq != seen + 1 {
                return Ok(ChangesSince::FellBehind(row.try_get(3)?));
            }
            let (kind, key): (String, String) = (row.try_get(1)?, row.try_get(2)?);
            changes.push(Change::parse(&kind, &key));
            last = seq;
        }
        if changes.is_empty() {
            let newest = self.newest_change().await?;
            if newest > seen {
                return Ok(ChangesSince::FellBehind(newest));
            }
        }
        Ok(ChangesSince::Changes(changes, last))
    }
}
