//! The writer thread: take everything queued, chain it, write it with one `write`, make it
//! durable with one `fdatasync`, answer the waiters, save the checkpoint; rotate full
//! files and repair after a failed write.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant};

use ring::hmac;

use super::files::{file_name, save_checkpoint};
use super::queue::{Batch, Done, Shared, CHECKPOINT_EVERY, UNWAITED_FLUSH};
use super::{AuditUnavailable, Head};
use crate::audit::file::AuditFile;
use crate::audit::record::seal;
use crate::audit::Rotation;
use crate::metrics::AuditMetrics;
use crate::secret_file::sync_dir;
use crate::store::Checkpoints;

/// The thread's state.
pub(super) struct Writer {
    pub(super) dir: PathBuf,
    pub(super) instance: String,
    pub(super) key: hmac::Key,
    pub(super) file: AuditFile,
    pub(super) number: u32,
    pub(super) head: Head,
    pub(super) rotation: Rotation,
    /// When the current file's first record was written (`None`: the file is empty).
    pub(super) segment_started: Option<Instant>,
    pub(super) checkpoints: Checkpoints,
    /// Records were committed after the last checkpoint.
    pub(super) checkpoint_pending: bool,
    /// When the checkpoint was last saved.
    pub(super) checkpointed: std::time::Instant,
    /// A write failed and the file has not been cut back yet.
    pub(super) broken: bool,
    pub(super) shared: Arc<Shared>,
    /// The batch the queue hands over next (empty, with the capacity it grew to).
    pub(super) spare: Batch,
    /// The sealed lines of a batch, reused.
    pub(super) buffer: Vec<u8>,
    /// The runtime the waiters run on. Answering a batch's waiters from one task spawned
    /// there costs one cross-thread wake-up per batch instead of one per waiter, and frees
    /// this thread for the next commit sooner.
    pub(super) answer_on: Option<tokio::runtime::Handle>,
    /// Records and commits since start, logged at a clean stop (the average batch size
    /// says how much group commit is saving).
    pub(super) committed: (u64, u64),
    /// The same, and fsync latency, for `GET /metrics`.
    pub(super) metrics: Arc<AuditMetrics>,
}

impl Writer {
    pub(super) fn run(&mut self) {
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
                        let (next, waited) = shared
                            .wake
                            .wait_timeout(queue, self.until_rotation())
                            .unwrap_or_else(PoisonError::into_inner);
                        queue = next;
                        queue.writer_sleeping = false;
                        if waited.timed_out() && self.segment_is_old() {
                            // Quiet: seal the segment by age all the same.
                            drop(queue);
                            if let Err(e) = self.rotate() {
                                log::error!(
                                    "sealing the audit file by age failed: {e}; refusing \
                                     requests until it is writable"
                                );
                                self.broken = true;
                            }
                            queue = shared.lock();
                        }
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

    pub(super) fn checkpoint(&mut self) {
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

    pub(super) fn fault(&self) -> std::io::Result<()> {
        if self.shared.fault.load(Ordering::SeqCst) {
            Err(std::io::Error::other("injected audit write failure"))
        } else {
            Ok(())
        }
    }

    /// Chains, writes and syncs one batch.
    pub(super) fn commit(&mut self, batch: &Batch) -> Result<(), AuditUnavailable> {
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

    pub(super) fn write_buffer(&mut self) -> std::io::Result<()> {
        self.fault()?;
        let synced = self.file.append_durably(&self.buffer)?;
        self.metrics.record_fsync(synced);
        Ok(())
    }

    /// Whether the current file holds records and the first is as old as the interval.
    fn segment_is_old(&self) -> bool {
        self.file.size() > 0
            && self
                .segment_started
                .is_some_and(|started| started.elapsed() >= self.rotation.interval)
    }

    /// How long the writer may sleep before the current file is due for sealing by age.
    fn until_rotation(&self) -> Duration {
        match self.segment_started {
            Some(started) if self.file.size() > 0 => self
                .rotation
                .interval
                .saturating_sub(started.elapsed())
                .max(Duration::from_millis(1)),
            // Nothing to seal: a record will wake the writer first.
            _ => Duration::from_secs(3600),
        }
    }

    /// Starts the next file when this batch would push the current one past the size
    /// limit, or when the current one is due for sealing by age.
    pub(super) fn rotate_if_full(&mut self) -> std::io::Result<()> {
        let size = self.file.size();
        let full = size > 0 && size + self.buffer.len() as u64 > self.rotation.bytes;
        if full || self.segment_is_old() {
            self.rotate()?;
        }
        if self.file.size() == 0 {
            self.segment_started = Some(Instant::now());
        }
        Ok(())
    }

    /// Seals the current file (cut to its records and synced; never written again) and
    /// continues the chain in the next.
    pub(super) fn rotate(&mut self) -> std::io::Result<()> {
        if self.broken {
            self.repair()?;
            self.broken = false;
        }
        self.fault()?;
        self.file.cut_to_records()?;
        let next = self.number + 1;
        let path = self.dir.join(file_name(next));
        let file = AuditFile::open(&path, true, 0)?;
        sync_dir(&self.dir)?;
        self.file = file;
        self.number = next;
        self.segment_started = None;
        log::info!("audit log rotated to {}", path.display());
        Ok(())
    }

    /// Cuts the file back to its durable length, dropping whatever a failed write left.
    pub(super) fn repair(&mut self) -> std::io::Result<()> {
        self.fault()?;
        self.file.cut_to_records()
    }
}
