//! What requests and the writer thread share: the queue of records for the next commit
//! (two batches taking turns), and the [`Durable`] future a request awaits until its
//! record is on disk.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::task::{Context, Poll};

use tokio::sync::{oneshot, Notify};

use super::AuditUnavailable;

pub(super) type Done = oneshot::Sender<Result<(), AuditUnavailable>>;

pub(super) struct Entry {
    /// Where the record's JSON (without `seq` and `chain`) ends in its batch's `bytes`.
    pub(super) end: usize,
    /// Who waits for it to be durable, if anyone.
    pub(super) done: Option<Done>,
}

/// Records queued for one commit. Two batches take turns: requests fill one while the
/// writer commits the other, and both keep their capacity. So once warm, queuing a record
/// allocates nothing, and no memory a request allocated is freed by the writer thread
/// (with glibc's per-thread arenas, such frees make both threads contend for the
/// allocator's lock: measured as futex calls and lock waits in every batch).
#[derive(Default)]
pub(super) struct Batch {
    /// The records' bodies, back to back.
    pub(super) bytes: Vec<u8>,
    pub(super) entries: Vec<Entry>,
}

impl Batch {
    /// Each record's body, in order.
    pub(super) fn bodies(&self) -> impl Iterator<Item = &[u8]> {
        let mut start = 0;
        self.entries.iter().map(move |entry| {
            let body = &self.bytes[start..entry.end];
            start = entry.end;
            body
        })
    }
}

#[derive(Default)]
pub(super) struct Queue {
    pub(super) batch: Batch,
    /// How many of the batch's records someone waits for: only those start a commit at
    /// once.
    pub(super) waited_for: usize,
    /// The writer waits on the condition variable. Waking it is a system call (and an
    /// interrupt to the other CPU) paid by the request's thread, so only a sleeping writer
    /// is woken; a busy one looks at the queue when its commit ends.
    pub(super) writer_sleeping: bool,
    pub(super) closing: bool,
}

/// How long records nobody waits for (`response` records) may sit in the queue before
/// they are committed on their own. Under load they ride along with the next commit that
/// a request waits for, instead of making that request wait behind a commit of their own.
pub(super) const UNWAITED_FLUSH: std::time::Duration = std::time::Duration::from_millis(50);

/// How far the checkpoint may lag the log while commits keep coming. Saving it (an SQLite
/// transaction) cost as much CPU as a quarter of a commit when done after every batch; now
/// a busy writer saves it at most this often, and an idle one at once.
pub(super) const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_millis(10);

/// How long the runtime keeps polling instead of sleeping after the last answered commit
/// while requests still wait for one (see [`keep_awake`]). Far longer than a sync on a disk
/// that makes spinning worth it; on a slower one, spinning stops until the next answer.
pub(super) const SPIN_LIMIT: std::time::Duration = std::time::Duration::from_millis(1);

pub(super) struct Shared {
    pub(super) queue: Mutex<Queue>,
    pub(super) wake: Condvar,
    /// Fault injection for tests: while set, writes and repairs fail as a full disk would.
    pub(super) fault: AtomicBool,
    /// Requests of this runtime waiting for their record to be durable.
    pub(super) waiting: AtomicUsize,
    /// Commits answered so far: [`keep_awake`] stops spinning when none comes for a while.
    pub(super) answered: AtomicUsize,
    /// Wakes [`keep_awake`]: a first request starts waiting, a commit was answered, or the
    /// log is closing (then it ends).
    pub(super) spin: Notify,
}

impl Shared {
    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Resolves when a record queued by [`super::AuditWriter::append_durably`] is durable, or with
/// [`AuditUnavailable`] when it cannot be.
pub struct Durable(pub(super) Answer);

pub(super) enum Answer {
    /// Known at once: refused (the log is closing), or nothing to wait for (auditing off).
    Ready(Result<(), AuditUnavailable>),
    Waiting {
        answer: oneshot::Receiver<Result<(), AuditUnavailable>>,
        /// Counts this request among those waiting until the answer is taken or dropped.
        _waiting: Waiting,
    },
}

/// One request counted in [`Shared::waiting`] for as long as it lives.
pub(super) struct Waiting(pub(super) Arc<Shared>);

impl Waiting {
    pub(super) fn start(shared: &Arc<Shared>) -> Waiting {
        if shared.waiting.fetch_add(1, Ordering::Relaxed) == 0 {
            shared.spin.notify_one();
        }
        Waiting(shared.clone())
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Durable {
    /// An answer known without waiting.
    pub fn ready(answer: Result<(), AuditUnavailable>) -> Durable {
        Durable(Answer::Ready(answer))
    }
}

impl Future for Durable {
    type Output = Result<(), AuditUnavailable>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.0 {
            Answer::Ready(answer) => Poll::Ready(*answer),
            // A dropped sender is a writer that died: nothing can be made durable.
            Answer::Waiting { answer, .. } => Pin::new(answer)
                .poll(cx)
                .map(|answer| answer.unwrap_or(Err(AuditUnavailable))),
        }
    }
}
