//! Reading the change log on PostgreSQL (`sql/postgres/001_init.sql`): what a node's cache
//! evicts when another node changed something. The same answers as
//! `store::DataVersion::changes_since` on SQLite; the log's head row stands in for
//! `sqlite_sequence`.

use super::PgStore;
use crate::store::{Change, ChangesSince, StoreError};

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
