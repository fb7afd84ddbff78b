//! Group commit for the main database: one thread owns a write connection and commits every
//! write job waiting at once in a single transaction, so concurrent payments share one WAL
//! fsync (`synchronous=FULL`) instead of queueing for the write lock one fsync at a time.
//!
//! Each job runs in its own savepoint: a job that fails is rolled back alone and the others
//! commit. No job's result is handed back before the COMMIT that makes it durable has
//! returned; if that COMMIT fails, every job of the batch is told so and none of them
//! happened. Only hot, short writes go through here (payment creation); everything else
//! uses the connection pool.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};

use rusqlite::Connection;
use tokio::sync::oneshot;

use super::StoreError;

/// A write waiting for the next batch.
trait Job: Send {
    /// Runs the job's statements inside the batch's transaction (in its own savepoint).
    fn run(&mut self, conn: &Connection) -> Result<(), ()>;
    /// Answers the caller once the batch has committed (`Ok`) or failed (`Err`).
    fn finish(self: Box<Self>, committed: Result<(), &StoreError>);
}

/// A job with a typed answer.
struct Typed<T, F> {
    work: Option<F>,
    outcome: Option<Result<T, StoreError>>,
    done: oneshot::Sender<Result<T, StoreError>>,
}

impl<T, F> Job for Typed<T, F>
where
    T: Send + 'static,
    F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
{
    fn run(&mut self, conn: &Connection) -> Result<(), ()> {
        let outcome = match self.work.take() {
            Some(work) => work(conn),
            None => Err(StoreError::TaskFailed),
        };
        let ok = outcome.is_ok();
        self.outcome = Some(outcome);
        if ok {
            Ok(())
        } else {
            Err(())
        }
    }

    fn finish(self: Box<Self>, committed: Result<(), &StoreError>) {
        let answer = match committed {
            Ok(()) => self.outcome.unwrap_or(Err(StoreError::TaskFailed)),
            Err(StoreError::Busy) => Err(StoreError::Busy),
            Err(e) => Err(StoreError::CommitFailed(e.to_string())),
        };
        // A caller that went away (client disconnected) needs no answer.
        let _ = self.done.send(answer);
    }
}

#[derive(Default)]
struct Queue {
    jobs: VecDeque<Box<dyn Job>>,
    /// Set when the queue is dropped or its thread ended: no new jobs are taken.
    closed: bool,
}

struct Shared {
    queue: Mutex<Queue>,
    wake: Condvar,
    /// Jobs committed and transactions used, for tests and the batching figure.
    jobs: AtomicU64,
    commits: AtomicU64,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The handle to the group-commit thread; the thread ends when the handle is dropped (after
/// committing what is queued).
pub struct CommitQueue {
    shared: Arc<Shared>,
}

impl CommitQueue {
    /// Starts the thread with `conn`, a configured write connection to the database.
    pub fn start(conn: Connection) -> Result<CommitQueue, StoreError> {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            wake: Condvar::new(),
            jobs: AtomicU64::new(0),
            commits: AtomicU64::new(0),
        });
        let thread_shared = shared.clone();
        std::thread::Builder::new()
            .name("paygate-commit".into())
            .spawn(move || run(&thread_shared, &conn))
            .map_err(|e| StoreError::Startup(format!("cannot start the commit thread: {e}")))?;
        Ok(CommitQueue { shared })
    }

    /// Runs `work` in the next batch and returns its result once that batch is durable.
    pub async fn write<T, F>(&self, work: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let (done, answer) = oneshot::channel();
        let job = Box::new(Typed {
            work: Some(work),
            outcome: None,
            done,
        });
        {
            let mut queue = self.shared.lock();
            if queue.closed {
                return Err(StoreError::TaskFailed);
            }
            queue.jobs.push_back(job);
        }
        self.shared.wake.notify_one();
        // The sender is dropped unanswered only if the thread died.
        answer.await.unwrap_or(Err(StoreError::TaskFailed))
    }

    /// (jobs committed, transactions they took).
    pub fn batching(&self) -> (u64, u64) {
        (
            self.shared.jobs.load(Ordering::Relaxed),
            self.shared.commits.load(Ordering::Relaxed),
        )
    }
}

impl Drop for CommitQueue {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.wake.notify_all();
    }
}

/// Marks the queue closed when the thread ends for any reason, so callers get an error
/// instead of waiting forever; queued jobs are dropped (their callers see `TaskFailed`).
struct EndGuard<'a>(&'a Shared);

impl Drop for EndGuard<'_> {
    fn drop(&mut self) {
        let mut queue = self.0.lock();
        queue.closed = true;
        queue.jobs.clear();
    }
}

fn run(shared: &Shared, conn: &Connection) {
    let _guard = EndGuard(shared);
    loop {
        let mut batch: Vec<Box<dyn Job>> = {
            let mut queue = shared.lock();
            while queue.jobs.is_empty() && !queue.closed {
                queue = shared
                    .wake
                    .wait(queue)
                    .unwrap_or_else(PoisonError::into_inner);
            }
            if queue.jobs.is_empty() {
                return;
            }
            queue.jobs.drain(..).collect()
        };
        let committed = commit(conn, &mut batch);
        if committed.is_ok() {
            shared.jobs.fetch_add(batch.len() as u64, Ordering::Relaxed);
            shared.commits.fetch_add(1, Ordering::Relaxed);
        } else if let Err(e) = &committed {
            log::error!("a batch of {} writes did not commit: {e}", batch.len());
        }
        for job in batch {
            job.finish(committed.as_ref().map(|_| ()));
        }
    }
}

/// One transaction for the whole batch, a savepoint per job.
fn commit(conn: &Connection, batch: &mut [Box<dyn Job>]) -> Result<(), StoreError> {
    conn.execute_batch("BEGIN IMMEDIATE")?;
    for job in batch.iter_mut() {
        let step = conn.execute_batch("SAVEPOINT job").and_then(|()| {
            if job.run(conn).is_ok() {
                conn.execute_batch("RELEASE job")
            } else {
                conn.execute_batch("ROLLBACK TO job; RELEASE job")
            }
        });
        if let Err(e) = step {
            roll_back(conn);
            return Err(e.into());
        }
    }
    if let Err(e) = conn.execute_batch("COMMIT") {
        roll_back(conn);
        return Err(e.into());
    }
    Ok(())
}

/// Ends a failed batch's transaction. If even that fails, SQLite rolls back when the
/// connection next begins one; the log says so.
fn roll_back(conn: &rusqlite::Connection) {
    if let Err(e) = conn.execute_batch("ROLLBACK") {
        log::warn!("rolling back a failed commit batch: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queue() -> (CommitQueue, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!("paygate-commits-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.db");
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL;
             CREATE TABLE t (k INTEGER PRIMARY KEY, v TEXT NOT NULL);",
        )
        .unwrap();
        (CommitQueue::start(conn).unwrap(), dir)
    }

    fn count(dir: &std::path::Path) -> i64 {
        Connection::open(dir.join("t.db"))
            .unwrap()
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_writes_share_commits_and_a_failing_one_fails_alone() {
        let (commits, dir) = queue();
        let commits = Arc::new(commits);
        let mut tasks = Vec::new();
        for k in 0..64i64 {
            let commits = commits.clone();
            tasks.push(tokio::spawn(async move {
                commits
                    .write(move |conn| {
                        // Key 13 twice: the second insert fails on the primary key.
                        conn.execute("INSERT INTO t (k, v) VALUES (?1, 'a')", [k])?;
                        if k == 13 {
                            conn.execute("INSERT INTO t (k, v) VALUES (?1, 'b')", [k])?;
                        }
                        Ok(k)
                    })
                    .await
            }));
        }
        let mut failed = Vec::new();
        for task in tasks {
            match task.await.unwrap() {
                Ok(_) => {}
                Err(e) => failed.push(e.to_string()),
            }
        }
        assert_eq!(failed.len(), 1, "{failed:?}");
        assert!(failed[0].contains("UNIQUE"), "{failed:?}");
        // Every acknowledged write is there; the failed job left nothing (not even its
        // first insert).
        assert_eq!(count(&dir), 63);
        let (jobs, transactions) = commits.batching();
        assert_eq!(jobs, 64);
        assert!(transactions < 64, "{transactions} transactions for 64 jobs");
        drop(commits);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn a_batch_that_cannot_commit_acknowledges_nothing() {
        let (commits, dir) = queue();
        // Another connection holds the write lock longer than the busy handler of this
        // plain test connection waits (none: it fails at once).
        let blocker = Connection::open(dir.join("t.db")).unwrap();
        blocker.execute_batch("BEGIN IMMEDIATE").unwrap();
        let refused = commits
            .write(|conn| Ok(conn.execute("INSERT INTO t (k, v) VALUES (1, 'x')", [])?))
            .await;
        assert!(matches!(refused, Err(StoreError::Busy)), "{refused:?}");
        blocker.execute_batch("ROLLBACK").unwrap();
        assert_eq!(count(&dir), 0);
        // The queue keeps working once the lock is free.
        commits
            .write(|conn| Ok(conn.execute("INSERT INTO t (k, v) VALUES (2, 'y')", [])?))
            .await
            .unwrap();
        assert_eq!(count(&dir), 1);
        drop(commits);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
