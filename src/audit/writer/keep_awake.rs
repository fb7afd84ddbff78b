//! Keeping a runtime polling while its requests wait for a commit (see [`keep_awake`]).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::queue::{Shared, SPIN_LIMIT};

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
pub(super) async fn keep_awake(shared: Arc<Shared>) {
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
