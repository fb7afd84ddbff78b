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
//!
//! This file is the handle requests use; the queue and [`Durable`] are in `queue`, the
//! thread's commit, rotate and repair loop in `commit`, file naming and opening (with
//! torn-tail recovery) in `files`, and the runtime's busy-polling in `keep_awake`.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};

use ring::hmac;
use tokio::sync::{oneshot, Notify};

mod commit;
mod files;
mod keep_awake;
mod queue;

use commit::Writer;
use files::open_instance;
pub(super) use files::save_checkpoint;
pub use files::{file_name, log_files};
use keep_awake::keep_awake;
pub use queue::Durable;
use queue::{Answer, Batch, Done, Entry, Queue, Shared, Waiting};

use super::record::Record;
use super::Rotation;
use crate::metrics::AuditMetrics;
use crate::store::Checkpoints;

/// The audit log could not make a record durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuditUnavailable;

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

impl AuditWriter {
    /// Opens (or continues) the chain in `dir` (this instance's directory) and starts the
    /// writer thread. `audit_dir` holds the checkpoint database.
    pub fn start(
        audit_dir: &Path,
        dir: &Path,
        instance: &str,
        key: hmac::Key,
        rotation: Rotation,
        metrics: Arc<AuditMetrics>,
    ) -> Result<AuditWriter, String> {
        let checkpoints = Checkpoints::open(audit_dir).map_err(|e| {
            format!(
                "cannot open the audit checkpoints in {}: {e}",
                audit_dir.display()
            )
        })?;
        let opened = open_instance(dir, instance, &key, &checkpoints)?;
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
            rotation,
            segment_started: opened.first_record_age.map(|age| {
                let now = std::time::Instant::now();
                now.checked_sub(age).unwrap_or(now)
            }),
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

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;
    use crate::audit::record::RequestRecord;

    /// CPU time this thread has used (user and system), in clock ticks.
    fn thread_cpu_ticks() -> u64 {
        let stat = fs::read_to_string("/proc/thread-self/stat").unwrap();
        let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
        // utime and stime are the 14th and 15th fields; the state (3rd) comes first here.
        fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
    }

    fn unbounded() -> Rotation {
        Rotation {
            bytes: 1 << 30,
            interval: std::time::Duration::from_secs(1 << 30),
        }
    }

    fn sample() -> RequestRecord<'static> {
        RequestRecord {
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
        }
    }

    /// The number of records in each file of an instance directory.
    fn records_per_file(dir: &Path) -> Vec<usize> {
        log_files(dir)
            .unwrap()
            .iter()
            .map(|(_, path)| fs::read_to_string(path).unwrap().lines().count())
            .collect()
    }

    #[test]
    fn a_quiet_writer_seals_its_file_by_age_and_never_an_empty_one() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let audit_dir =
            std::env::temp_dir().join(format!("paygate-rotate-age-{}", uuid::Uuid::new_v4()));
        let dir = audit_dir.join("1");
        fs::create_dir_all(&dir).unwrap();
        let key = hmac::Key::new(hmac::HMAC_SHA256, b"k");
        let rotation = Rotation {
            bytes: 1 << 30,
            interval: std::time::Duration::from_millis(300),
        };
        let writer =
            AuditWriter::start(&audit_dir, &dir, "1", key.clone(), rotation, Arc::default())
                .unwrap();
        let settle = || std::thread::sleep(std::time::Duration::from_millis(900));
        runtime.block_on(async {
            assert_eq!(writer.append_durably(&sample()).await, Ok(()));
            assert_eq!(writer.append_durably(&sample()).await, Ok(()));
        });
        // No request comes: the file is sealed all the same, and the next one stays empty
        // (and unsealed) however long nothing comes.
        settle();
        assert_eq!(records_per_file(&dir), [2, 0]);
        settle();
        assert_eq!(records_per_file(&dir), [2, 0]);
        runtime.block_on(async {
            assert_eq!(writer.append_durably(&sample()).await, Ok(()));
        });
        settle();
        assert_eq!(records_per_file(&dir), [2, 1, 0]);
        writer.close();
        let report = crate::audit::verify::verify_dir(&audit_dir, &key).unwrap();
        assert_eq!(report.records, 3);
        let _ = fs::remove_dir_all(audit_dir);
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
        let record = sample();
        runtime.block_on(async {
            let key = hmac::Key::new(hmac::HMAC_SHA256, b"k");
            let writer =
                AuditWriter::start(&audit_dir, &dir, "1", key, unbounded(), Arc::default())
                    .unwrap();
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
