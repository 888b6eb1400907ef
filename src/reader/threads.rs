//! The reader threads: one per subscribed socket, each pinned where asked,
//! started once everything they use is allocated, and stopped together.
//!
//! Owns: spawning, pinning, the readiness every reader reports, the stop
//! that reaches every reader's poll, and joining them with their outcome.
//! Never: runs on the per-event path, or stops a reader in the middle of a
//! batch (a reader sees the stop only when its socket is drained).

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;

use crossbeam_channel::Receiver;
use mio::{Poll, Waker};

use super::{wall_clock_ns, EventPath, Reader, ReaderHealth, ReaderOptions, WAKE};
use crate::flow::{FlowTracker, LiveFlows};
use crate::stats::Registry;
use crate::sys::ConntrackSocket;

/// What one reader is started with: everything allocated at start.
pub struct ReaderPlan {
    /// Its subscribed socket (filter attached).
    pub socket: ConntrackSocket,
    /// Its flow tracker, table allocated.
    pub tracker: FlowTracker,
    /// The CPU to pin it to, if any.
    pub cpu: Option<usize>,
    /// Where the table census leaves the flows each dump found, if it runs.
    pub live_flows: Option<Receiver<Arc<LiveFlows>>>,
}

/// Stops every reader: sets the shared flag and wakes each reader's poll.
#[derive(Clone)]
pub struct StopReaders {
    stopping: Arc<AtomicBool>,
    wakers: Arc<[Waker]>,
}

impl StopReaders {
    /// Wakes reader `index`'s poll without stopping it: it looks at its
    /// mail (a table dump to reconcile with).
    pub fn wake(&self, index: usize) {
        if let Some(waker) = self.wakers.get(index) {
            let _ = waker.wake();
        }
    }

    /// Each reader returns at its next drained socket.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::Release);
        for waker in self.wakers.iter() {
            let _ = waker.wake();
        }
    }
}

/// The polls of `readers` readers, and the handle that stops them: made
/// before any reader starts, so that whatever may need to stop them has the
/// handle first.
pub fn polls(readers: usize) -> io::Result<(Vec<Poll>, StopReaders)> {
    let mut polls = Vec::with_capacity(readers);
    let mut wakers = Vec::with_capacity(readers);
    for _ in 0..readers {
        let poll = Poll::new()?;
        wakers.push(Waker::new(poll.registry(), WAKE)?);
        polls.push(poll);
    }
    let stop = StopReaders {
        stopping: Arc::new(AtomicBool::new(false)),
        wakers: wakers.into(),
    };
    Ok((polls, stop))
}

/// The first reader panic, as one line: where and what.
static FIRST_PANIC: OnceLock<String> = OnceLock::new();

/// From here on, a panic on a reader thread prints nothing itself: it is
/// kept as one line that [`Readers::join`] returns as the reader's error,
/// and `main` logs once. Other threads' panics print as before.
pub fn report_reader_panics() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let thread = std::thread::current();
        let name = thread.name().unwrap_or("");
        if !name.starts_with("ct-reader-") {
            return previous(info);
        }
        let payload = info.payload();
        let what = payload
            .downcast_ref::<&str>()
            .copied()
            .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
            .unwrap_or("a panic");
        let at = info
            .location()
            .map_or(String::new(), |l| format!(" at {}:{}", l.file(), l.line()));
        let _ = FIRST_PANIC.set(format!("{name} panicked{at}: {what}"));
    }));
}

/// Calls its closure when dropped, on a normal return and while a panic
/// unwinds alike.
struct OnExit<F: Fn()>(F);

impl<F: Fn()> Drop for OnExit<F> {
    fn drop(&mut self) {
        (self.0)();
    }
}

/// The running reader threads.
pub struct Readers {
    threads: Vec<JoinHandle<io::Result<()>>>,
    health: Vec<Arc<ReaderHealth>>,
}

impl Readers {
    /// Starts reader `i` of `plans` on thread `ct-reader-{i}` with `polls[i]`,
    /// writing shard `i` of `registry`. Each stops at `stop`; when one
    /// returns or panics, it calls `on_exit` (which stops the others and
    /// the endpoint).
    pub fn start(
        registry: &Arc<Registry>,
        plans: Vec<ReaderPlan>,
        polls: Vec<Poll>,
        options: ReaderOptions,
        stop: &StopReaders,
        on_exit: impl Fn() + Clone + Send + 'static,
    ) -> io::Result<Readers> {
        let mut readers = Readers {
            threads: Vec::with_capacity(plans.len()),
            health: Vec::with_capacity(plans.len()),
        };
        for (index, (plan, poll)) in plans.into_iter().zip(polls).enumerate() {
            let health = Arc::new(ReaderHealth::default());
            readers.health.push(Arc::clone(&health));
            let (registry, stopping) = (Arc::clone(registry), Arc::clone(&stop.stopping));
            let on_exit = on_exit.clone();
            let thread = std::thread::Builder::new()
                .name(format!("ct-reader-{index}"))
                .spawn(move || {
                    let _stop_all = OnExit(on_exit);
                    read(index, &registry, plan, poll, options, &stopping, &health)
                })?;
            readers.threads.push(thread);
        }
        Ok(readers)
    }

    /// Whether every reader's loop runs.
    pub fn ready(&self) -> bool {
        self.health.iter().all(|h| h.ready())
    }

    /// Whether no reader is stuck on a batch
    /// ([`READER_STUCK_AFTER`](super::READER_STUCK_AFTER)).
    pub fn healthy(&self) -> bool {
        self.stuck() == 0
    }

    /// Readers stuck on one batch for longer than
    /// [`READER_STUCK_AFTER`](super::READER_STUCK_AFTER).
    pub fn stuck(&self) -> usize {
        let now = wall_clock_ns();
        self.health.iter().filter(|h| h.stuck(now)).count()
    }

    /// Waits for every reader; the first failure, if any.
    pub fn join(self) -> io::Result<()> {
        let mut outcome = Ok(());
        for (index, thread) in self.threads.into_iter().enumerate() {
            let result = match thread.join() {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(io::Error::new(
                    e.kind(),
                    format!("event reader {index} stopped: {e}"),
                )),
                Err(_) => Err(io::Error::other(match FIRST_PANIC.get() {
                    Some(line) => format!("event reader {index} stopped: {line}"),
                    None => format!("event reader {index} panicked"),
                })),
            };
            if outcome.is_ok() {
                outcome = result;
            }
        }
        outcome
    }
}

/// The body of reader thread `index`: pin, claim its shard, read.
fn read(
    index: usize,
    registry: &Registry,
    plan: ReaderPlan,
    poll: Poll,
    options: ReaderOptions,
    stopping: &AtomicBool,
    health: &ReaderHealth,
) -> io::Result<()> {
    if let Some(core) = plan.cpu {
        if !core_affinity::set_for_current(core_affinity::CoreId { id: core }) {
            crate::log!("could not pin event reader {index} to CPU {core}");
        }
    }
    let shard = registry
        .shards()
        .writer(index)
        .ok_or_else(|| io::Error::other(format!("stats shard {index} already has a writer")))?;
    let path = EventPath::new(index, shard, plan.tracker, options.print_events);
    Reader::new(plan.socket, poll, path, &options, plan.live_flows)?.run(stopping, health)
}
