//! The audit writer: one thread per worker process that appends chained lines to this
//! instance's file with group commit.
//!
//! Requests hand their record to a queue and wait. The thread takes *everything* queued,
//! chains it, writes it with one `write`, makes it durable with one `fdatasync`, answers
//! every waiter, and then records the checkpoint (at most every 10 ms while busy, and
//! whenever it falls idle). Records queued while a sync runs go into
//! the next one, which starts as soon as this one ends: no timer, and a request never waits
//! for a sync that began before its record was queued. Records nobody waits for
//! (`response` records) never start a commit by themselves while requests keep coming:
//! they go out with the next waited-for commit, or after 50 ms at most. While requests
//! wait, [`keep_awake`] keeps their runtime polling instead of sleeping.
//!
//! If a write or sync fails, every waiter of that batch gets an error (the request answers
//! 503 and does nothing), the file is cut back to its last durable length, and each later
//! batch first retries that repair: until it succeeds, every record fails, so the worker
//! serves nothing it could not audit.

use std::fs::{self, OpenOptions};
use std::future::Future;
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::task::{Context, Poll};

use ring::hmac;
use tokio::sync::{oneshot, Notify};

use super::file::AuditFile;
use super::record::{checkpoint_mac, seal, Record};
use super::verify::check_before_append;
use crate::metrics::AuditMetrics;
use crate::secret_file::sync_dir;
use crate::store::{Checkpoint, Checkpoints};

/// The audit log could not make a record durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuditUnavailable;

type Done = oneshot::Sender<Result<(), AuditUnavailable>>;

struct Entry {
    /// Where the record's JSON (without `seq` and `chain`) ends in its batch's `bytes`.
    end: usize,
    /// Who waits for it to be durable, if anyone.
    done: Option<Done>,
}

/// Records queued for one commit. Two batches take turns: requests fill one while the
/// writer commits the other, and both keep their capacity. So once warm, queuing a record
/// allocates nothing, and no memory a request allocated is freed by the writer thread
/// (with glibc's per-thread arenas, such frees make both threads contend for the
/// allocator's lock: measured as futex calls and lock waits in every batch).
#[derive(Default)]
struct Batch {
    /// The records' bodies, back to back.
    bytes: Vec<u8>,
    entries: Vec<Entry>,
}

impl Batch {
    /// Each record's body, in order.
    fn bodies(&self) -> impl Iterator<Item = &[u8]> {
        let mut start = 0;
        self.entries.iter().map(move |entry| {
            let body = &self.bytes[start..entry.end];
            start = entry.end;
            body
        })
    }
}

#[derive(Default)]
struct Queue {
    batch: Batch,
    /// How many of the batch's records someone waits for: only those start a commit at
    /// once.
    waited_for: usize,
    /// The writer waits on the condition variable. Waking it is a system call (and an
    /// interrupt to the other CPU) paid by the request's thread, so only a sleeping writer
    /// is woken; a busy one looks at the queue when its commit ends.
    writer_sleeping: bool,
    closing: bool,
}

/// How long records nobody waits for (`response` records) may sit in the queue before
/// they are committed on their own. Under load they ride along with the next commit that
/// a request waits for, instead of making that request wait behind a commit of their own.
const UNWAITED_FLUSH: std::time::Duration = std::time::Duration::from_millis(50);

/// How far the checkpoint may lag the log while commits keep coming. Saving it (an SQLite
/// transaction) cost as much CPU as a quarter of a commit when done after every batch; now
/// a busy writer saves it at most this often, and an idle one at once.
const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_millis(10);

/// How long the runtime keeps polling instead of sleeping after the last answered commit
/// while requests still wait for one (see [`keep_awake`]). Far longer than a sync on a disk
/// that makes spinning worth it; on a slower one, spinning stops until the next answer.
const SPIN_LIMIT: std::time::Duration = std::time::Duration::from_millis(1);

struct Shared {
    queue: Mutex<Queue>,
    wake: Condvar,
    /// Fault injection for tests: while set, writes and repairs fail as a full disk would.
    fault: AtomicBool,
    /// Requests of this runtime waiting for their record to be durable.
    waiting: AtomicUsize,
    /// Commits answered so far: [`keep_awake`] stops spinning when none comes for a while.
    answered: AtomicUsize,
    /// Wakes [`keep_awake`]: a first request starts waiting, a commit was answered, or the
    /// log is closing (then it ends).
    spin: Notify,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Resolves when a record queued by [`AuditWriter::append_durably`] is durable, or with
/// [`AuditUnavailable`] when it cannot be.
pub struct Durable(Answer);

enum Answer {
    /// Known at once: refused (the log is closing), or nothing to wait for (auditing off).
    Ready(Result<(), AuditUnavailable>),
    Waiting {
        answer: oneshot::Receiver<Result<(), AuditUnavailable>>,
        /// Counts this request among those waiting until the answer is taken or dropped.
        _waiting: Waiting,
    },
}

/// One request counted in [`Shared::waiting`] for as long as it lives.
struct Waiting(Arc<Shared>);

impl Waiting {
    fn start(shared: &Arc<Shared>) -> Waiting {
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

/// A worker's handle on its audit log.
pub struct AuditWriter {
    shared: Arc<Shared>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// Where a chain stands: records written so far and the last chain value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    pub seq: u64,
    pub chain: [u8; 32],
}

/// File name of the `n`th file of an instance.
pub fn file_name(n: u32) -> String {
    format!("{n:06}.jsonl")
}

/// The numbered log files of an instance directory, in order.
pub fn log_files(dir: &Path) -> std::io::Result<Vec<(u32, PathBuf)>> {
    let mut files = Vec::new();
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if let Some(n) = name
            .strip_suffix(".jsonl")
            .filter(|stem| stem.len() == 6)
            .and_then(|stem| stem.parse::<u32>().ok())
        {
            files.push((n, path));
        }
    }
    files.sort();
    Ok(files)
}

/// What [`open_instance`] found and prepared.
struct Opened {
    file: AuditFile,
    number: u32,
    head: Head,
}

/// Opens the newest file of an instance directory for appending, creating the first one
/// (and the chain's first checkpoint) if there is none — but only after the chain checks
/// out against its checkpoint ([`check_before_append`]): a worker never appends to a
/// chain that does not verify. A torn last line after the checkpointed records (left by a
/// crash mid-write) is moved to `<file>.<ms>.torn` and cut off, so the chain continues
/// from the last whole record; zeros after it are preallocated space and stay.
fn open_instance(
    dir: &Path,
    instance: &str,
    key: &hmac::Key,
    checkpoints: &Checkpoints,
) -> Result<Opened, String> {
    let fail = |what: &str, e: &dyn std::fmt::Display| format!("{what} in {}: {e}", dir.display());
    let files = log_files(dir).map_err(|e| fail("cannot list the audit files", &e))?;
    let checkpoint = checkpoints
        .load(instance)
        .map_err(|e| fail("cannot read the audit checkpoint", &e))?;
    let fresh = checkpoint.is_none();
    let point = check_before_append(dir, instance, &files, key, checkpoint).map_err(|b| {
        format!(
            "the audit chain of instance {instance} does not verify up to its checkpoint, \
             so this worker will not append to it: {b}. Nothing was changed. Run `paygate \
             audit verify` to see the whole log; then restore the audit directory from a \
             backup, or, once the damage is understood, stop every worker on this data \
             directory and run `paygate audit seal --reason TEXT`, which continues in a new \
             chain segment whose first record states the break"
        )
    })?;
    let Some(last) = point.last else {
        // A new chain: its first checkpoint is durable before its first file exists, so
        // files without a checkpoint always mean a checkpoint store that was lost.
        if fresh {
            save_checkpoint(checkpoints, instance, key, point.head, true)
                .map_err(|e| fail("cannot record the audit chain's first checkpoint", &e))?;
        }
        let path = dir.join(file_name(1));
        let file = AuditFile::open(&path, true, 0, 0, &[])
            .map_err(|e| fail("cannot create the first audit file", &e))?;
        sync_dir(dir).map_err(|e| fail("cannot sync", &e))?;
        return Ok(Opened {
            file,
            number: 1,
            head: point.head,
        });
    };
    let mut allocated = last.bytes.len() as u64;
    if last.torn.is_some() {
        // Keep what was written, without the preallocated zeros after it.
        let tail = &last.bytes[last.good..];
        let written = tail.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
        let torn = last
            .path
            .with_extension(format!("jsonl.{}.torn", crate::time::now_millis()));
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&torn)
            .and_then(|mut file| {
                file.write_all(&tail[..written])?;
                file.sync_all()
            })
            .and_then(|()| OpenOptions::new().write(true).open(&last.path))
            .and_then(|file| {
                file.set_len(last.good as u64)?;
                file.sync_all()
            })
            .and_then(|()| sync_dir(dir))
            .map_err(|e| fail("cannot set a torn audit tail aside", &e))?;
        allocated = last.good as u64;
        log::warn!(
            "audit file {} ended in a torn record ({written} bytes, left by a crash after the \
             last checkpointed record); moved it to {} and continued the chain from the last \
             whole record",
            last.path.display(),
            torn.display()
        );
    }
    let file = AuditFile::open(
        &last.path,
        false,
        last.good as u64,
        allocated,
        &last.bytes[..last.good],
    )
    .map_err(|e| fail("cannot open the audit file", &e))?;
    Ok(Opened {
        file,
        number: last.number,
        head: point.head,
    })
}

/// Saves `head` as the checkpoint of `instance`, with its MAC.
pub(super) fn save_checkpoint(
    checkpoints: &Checkpoints,
    instance: &str,
    key: &hmac::Key,
    head: Head,
    durably: bool,
) -> Result<(), crate::store::StoreError> {
    let checkpoint = Checkpoint {
        records: head.seq,
        head: head.chain,
        mac: Some(checkpoint_mac(key, instance, head.seq, &head.chain)),
    };
    if durably {
        checkpoints.save_durably(instance, &checkpoint)
    } else {
        checkpoints.save(instance, &checkpoint)
    }
}

/// The thread's state.
struct Writer {
    dir: PathBuf,
    instance: String,
    key: hmac::Key,
    file: AuditFile,
    number: u32,
    head: Head,
    rotate_bytes: u64,
    checkpoints: Checkpoints,
    /// Records were committed after the last checkpoint.
    checkpoint_pending: bool,
    /// When the checkpoint was last saved.
    checkpointed: std::time::Instant,
    /// A write failed and the file has not been cut back yet.
    broken: bool,
    shared: Arc<Shared>,
    /// The batch the queue hands over next (empty, with the capacity it grew to).
    spare: Batch,
    /// The sealed lines of a batch, reused.
    buffer: Vec<u8>,
    /// The runtime the waiters run on. Answering a batch's waiters from one task spawned
    /// there costs one cross-thread wake-up per batch instead of one per waiter, and frees
    /// this thread for the next commit sooner.
    answer_on: Option<tokio::runtime::Handle>,
    /// Records and commits since start, logged at a clean stop (the average batch size
    /// says how much group commit is saving).
    committed: (u64, u64),
    /// The same, and fsync latency, for `GET /metrics`.
    metrics: Arc<AuditMetrics>,
}

impl AuditWriter {
    /// Opens (or continues) the chain in `dir` (this instance's directory) and starts the
    /// writer thread. `audit_dir` holds the checkpoint database.
    pub fn start(
        audit_dir: &Path,
        dir: &Path,
        instance: &str,
        key: hmac::Key,
        rotate_bytes: u64,
        metrics: Arc<AuditMetrics>,
    ) -> Result<AuditWriter, String> {
        let checkpoints = Checkpoints::open(audit_dir).map_err(|e| {
            format!(
                "cannot open the audit checkpoints in {}: {e}",
                audit_dir.display()
            )
        })?;
        let opened = open_instance(dir, instance, &key, &checkpoints)?;
        if !opened.file.is_direct() {
            log::info!(
                "audit log {} is written through the page cache (no direct I/O here)",
                dir.display()
            );
        }
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            wake: Condvar::new(),
            fault: AtomicBool::new(false),
            waiting: AtomicUsize::new(0),
            answered: AtomicUsize::new(0),
            spin: Notify::new(),
        });
        let mut writer = Writer {
            dir: dir.to_owned(),
            instance: instance.to_owned(),
            key,
            file: opened.file,
            number: opened.number,
            head: opened.head,
            rotate_bytes,
            checkpoints,
            checkpoint_pending: false,
            checkpointed: std::time::Instant::now(),
            broken: false,
            shared: shared.clone(),
            spare: Batch::default(),
            buffer: Vec::with_capacity(64 * 1024),
            answer_on: tokio::runtime::Handle::try_current().ok(),
            metrics,
            committed: (0, 0),
        };
        if let Some(runtime) = &writer.answer_on {
            drop(runtime.spawn(keep_awake(shared.clone())));
        }
        let thread = std::thread::Builder::new()
            .name("paygate-audit".into())
            .spawn(move || writer.run())
            .map_err(|e| format!("cannot start the audit writer thread: {e}"))?;
        Ok(AuditWriter {
            shared,
            thread: Mutex::new(Some(thread)),
        })
    }

    fn enqueue(&self, record: &impl Record, done: Option<Done>) -> bool {
        let mut queue = self.shared.lock();
        if queue.closing {
            return false;
        }
        // The writer needs waking when a waiter arrives (commit now), or when the queue
        // stops being empty (start the flush clock for unwaited records).
        let wake = queue.writer_sleeping
            && (done.is_some() && queue.waited_for == 0 || queue.batch.entries.is_empty());
        if wake {
            queue.writer_sleeping = false;
        }
        queue.waited_for += usize::from(done.is_some());
        // Serialised in place: a microsecond under the lock, which the writer takes only
        // once per batch.
        record.write_body(&mut queue.batch.bytes);
        let end = queue.batch.bytes.len();
        queue.batch.entries.push(Entry { end, done });
        drop(queue);
        if wake {
            self.shared.wake.notify_one();
        }
        true
    }

    /// Queues a record now; the future resolves once it is durable. The record is not
    /// borrowed by the future.
    pub fn append_durably(&self, record: &impl Record) -> Durable {
        let (done, durable) = oneshot::channel();
        if !self.enqueue(record, Some(done)) {
            return Durable::ready(Err(AuditUnavailable));
        }
        Durable(Answer::Waiting {
            answer: durable,
            _waiting: Waiting::start(&self.shared),
        })
    }

    /// Queues a record without waiting (it goes out with the next group commit).
    pub fn append(&self, record: &impl Record) {
        if !self.enqueue(record, None) {
            log::error!("an audit record arrived after the log was closed");
        }
    }

    /// Makes writes fail (as on a full or broken disk) until called with `false`. For
    /// fault-injection tests.
    pub fn inject_fault(&self, failing: bool) {
        self.shared.fault.store(failing, Ordering::SeqCst);
    }

    /// Writes what is queued and stops the thread. Blocking.
    pub fn close(&self) {
        self.shared.lock().closing = true;
        self.shared.wake.notify_all();
        self.shared.spin.notify_one();
        let thread = self
            .thread
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(thread) = thread {
            if thread.join().is_err() {
                // Its panic message was printed when it happened; this says what it cost.
                log::error!(
                    "the audit writer thread panicked; records queued after its last commit \
                     were not written"
                );
            }
        }
    }
}

impl Drop for AuditWriter {
    fn drop(&mut self) {
        // Let the thread drain and end on its own; never block a drop.
        self.shared.lock().closing = true;
        self.shared.wake.notify_all();
        self.shared.spin.notify_one();
    }
}

/// Keeps the runtime polling while its requests wait for a commit, instead of letting it
/// sleep in `epoll_wait`.
///
/// Group commit makes the runtime's work bursty: a commit's answers arrive together, the
/// runtime serves them, and with every other request waiting for the next sync it falls
/// idle. Put to sleep, a CPU takes long to wake, on virtual machines especially (a halted
/// vCPU is woken by an inter-processor interrupt through the hypervisor), and every
/// request of the next commit pays that wake-up in latency. So while a request waits, this
/// task yields round after round: it runs only when the runtime has nothing else ready,
/// and then lets the runtime poll its sockets without blocking and pick up the answer as
/// soon as it is queued. Each round also yields the CPU to any other thread that wants it
/// (the audit writer, another worker), so the polling takes only time nobody else uses.
/// If no commit is answered for [`SPIN_LIMIT`] (a slow disk), it stops until the next one.
async fn keep_awake(shared: Arc<Shared>) {
    loop {
        shared.spin.notified().await;
        if shared.lock().closing {
            return;
        }
        let mut answered = shared.answered.load(Ordering::Relaxed);
        let mut since = std::time::Instant::now();
        while shared.waiting.load(Ordering::Relaxed) > 0 {
            let now = shared.answered.load(Ordering::Relaxed);
            if now != answered {
                answered = now;
                since = std::time::Instant::now();
            } else if since.elapsed() > SPIN_LIMIT {
                break;
            }
            std::thread::yield_now();
            tokio::task::yield_now().await;
        }
    }
}

impl Writer {
    fn run(&mut self) {
        let shared = self.shared.clone();
        loop {
            let mut batch = std::mem::take(&mut self.spare);
            {
                let mut queue = shared.lock();
                loop {
                    if queue.waited_for > 0 || queue.closing {
                        break;
                    }
                    if queue.batch.entries.is_empty() {
                        if self.checkpoint_pending {
                            // Idle: bring the checkpoint up to date before sleeping. Under
                            // load this runs between most commits, and that is wanted: paced
                            // like the busy checkpoints instead, the writer sleeps in those
                            // gaps and each next record must wake it, which measured 4–10 %
                            // fewer audited reads per second (BENCHMARKS.md, runs 14 and 15).
                            drop(queue);
                            self.checkpoint();
                            queue = shared.lock();
                            continue;
                        }
                        queue.writer_sleeping = true;
                        queue = shared
                            .wake
                            .wait(queue)
                            .unwrap_or_else(PoisonError::into_inner);
                        queue.writer_sleeping = false;
                        continue;
                    }
                    queue.writer_sleeping = true;
                    let (next, waited) = shared
                        .wake
                        .wait_timeout(queue, UNWAITED_FLUSH)
                        .unwrap_or_else(PoisonError::into_inner);
                    queue = next;
                    queue.writer_sleeping = false;
                    if waited.timed_out() {
                        break;
                    }
                }
                if queue.batch.entries.is_empty() {
                    if queue.closing {
                        drop(queue);
                        if self.checkpoint_pending {
                            self.checkpoint();
                        }
                        self.trim();
                        let (records, commits) = self.committed;
                        log::info!(
                            "audit log closed: {records} records in {commits} commits \
                             ({:.1} per fdatasync)",
                            records as f64 / commits.max(1) as f64
                        );
                        return;
                    }
                    self.spare = batch;
                    continue;
                }
                queue.waited_for = 0;
                std::mem::swap(&mut queue.batch, &mut batch);
            }
            let result = self.commit(&batch);
            let waiters: Vec<Done> = batch.entries.drain(..).filter_map(|e| e.done).collect();
            batch.bytes.clear();
            self.spare = batch;
            let counted = shared.clone();
            let answer = move || {
                for done in waiters {
                    // A waiter that went away (client disconnected) needs no answer.
                    let _ = done.send(result);
                }
                counted.answered.fetch_add(1, Ordering::Relaxed);
                counted.spin.notify_one();
            };
            match &self.answer_on {
                Some(runtime) => drop(runtime.spawn(async move { answer() })),
                None => answer(),
            }
            // After the answers: the checkpoint is not what makes records durable, so no
            // request waits for it. It never runs ahead of the log.
            if result.is_ok() {
                self.checkpoint_pending = true;
                if self.checkpointed.elapsed() >= CHECKPOINT_EVERY {
                    self.checkpoint();
                }
            }
        }
    }

    fn checkpoint(&mut self) {
        let saved = save_checkpoint(
            &self.checkpoints,
            &self.instance,
            &self.key,
            self.head,
            false,
        );
        if let Err(e) = saved {
            log::warn!("could not checkpoint the audit log (records stay durable): {e}");
        }
        self.checkpoint_pending = false;
        self.checkpointed = std::time::Instant::now();
    }

    fn fault(&self) -> std::io::Result<()> {
        if self.shared.fault.load(Ordering::SeqCst) {
            Err(std::io::Error::other("injected audit write failure"))
        } else {
            Ok(())
        }
    }

    /// Chains, writes and syncs one batch.
    fn commit(&mut self, batch: &Batch) -> Result<(), AuditUnavailable> {
        if self.broken {
            if let Err(e) = self.repair() {
                log::error!("audit log still not writable, refusing requests: {e}");
                return Err(AuditUnavailable);
            }
            log::info!("audit log writable again; serving requests");
            self.broken = false;
        }
        self.buffer.clear();
        let mut head = self.head;
        for body in batch.bodies() {
            head.seq += 1;
            head.chain = seal(&self.key, &head.chain, head.seq, body, &mut self.buffer);
        }
        let written = self.rotate_if_full().and_then(|()| self.write_buffer());
        match written {
            Ok(()) => {
                self.head = head;
                let records = batch.entries.len() as u64;
                self.committed.0 += records;
                self.committed.1 += 1;
                self.metrics.record_commit(records);
                Ok(())
            }
            Err(e) => {
                log::error!(
                    "writing the audit log {} failed: {e}; refusing requests until it is \
                     writable",
                    self.dir.join(file_name(self.number)).display()
                );
                self.broken = true;
                Err(AuditUnavailable)
            }
        }
    }

    fn write_buffer(&mut self) -> std::io::Result<()> {
        self.fault()?;
        let synced = self.file.append_durably(&self.buffer)?;
        self.metrics.record_fsync(synced);
        Ok(())
    }

    /// Drops the preallocated zeros at a clean stop: a closed file ends with its last
    /// record.
    fn trim(&mut self) {
        if let Err(e) = self.file.cut_to_records() {
            log::warn!("could not trim the audit file: {e}");
        }
    }

    /// Starts the next file when this batch would push the current one past the limit.
    fn rotate_if_full(&mut self) -> std::io::Result<()> {
        let size = self.file.size();
        if size == 0 || size + self.buffer.len() as u64 <= self.rotate_bytes {
            return Ok(());
        }
        self.fault()?;
        self.file.cut_to_records()?;
        let next = self.number + 1;
        let path = self.dir.join(file_name(next));
        let file = AuditFile::open(&path, true, 0, 0, &[])?;
        sync_dir(&self.dir)?;
        self.file = file;
        self.number = next;
        log::info!("audit log rotated to {}", path.display());
        Ok(())
    }

    /// Cuts the file back to its durable length, dropping whatever a failed write left.
    fn repair(&mut self) -> std::io::Result<()> {
        self.fault()?;
        self.file.cut_to_records()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::record::RequestRecord;

    /// CPU time this thread has used (user and system), in clock ticks.
    fn thread_cpu_ticks() -> u64 {
        let stat = fs::read_to_string("/proc/thread-self/stat").unwrap();
        let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
        // utime and stime are the 14th and 15th fields; the state (3rd) comes first here.
        fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
    }

    #[test]
    fn the_runtime_sleeps_once_no_request_waits_even_after_one_gave_up() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let audit_dir =
            std::env::temp_dir().join(format!("paygate-keep-awake-{}", uuid::Uuid::new_v4()));
        let dir = audit_dir.join("1");
        fs::create_dir_all(&dir).unwrap();
        let record = RequestRecord {
            time: "2026-11-29T23:00:00.000Z",
            phase: "request",
            request_id: "0190f3a2-7c1e-7d2a-9b4e-1a2b3c4d5e6f",
            worker: "1",
            pid: 1,
            client_ip: std::net::IpAddr::from([127, 0, 0, 1]),
            principal: None,
            claimed: None,
            auth: "none",
            auth_result: None,
            auth_reason: None,
            capability: None,
            method: "GET",
            path: "/apiStatus",
            op: "R",
        };
        runtime.block_on(async {
            let key = hmac::Key::new(hmac::HMAC_SHA256, b"k");
            let writer =
                AuditWriter::start(&audit_dir, &dir, "1", key, 1 << 30, Arc::default()).unwrap();
            // A request whose client went away before its record was durable...
            drop(writer.append_durably(&record));
            // ...and one that waited for it.
            assert_eq!(writer.append_durably(&record).await, Ok(()));
            assert_eq!(writer.shared.waiting.load(Ordering::Relaxed), 0);
            // Nothing waits: the runtime must sleep, not poll. Polling for these 300 ms
            // would use about 30 ticks of this thread's CPU.
            let before = thread_cpu_ticks();
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            let used = thread_cpu_ticks() - before;
            assert!(
                used <= 5,
                "an idle runtime used {used} ticks of CPU in 300 ms"
            );
            writer.close();
        });
        let _ = fs::remove_dir_all(audit_dir);
    }
}
