//! A reader: one conntrack socket drained by batched receives, each batch
//! taken through the per-event path ([`path`]); and the threads that run
//! the readers ([`threads`]).
//!
//! Owns: the loop of one reader thread (receive until the socket is empty,
//! then wait in `poll` until it is readable or the reader is stopped), what
//! it does on an overrun, and when, between batches, it reconciles its flow
//! table with a dump of the kernel's table.
//! Never: allocates, locks, logs or makes a syscall per event; the one
//! syscall per batch is the receive. It logs at most one line per
//! [`OVERRUN_LOG_EVERY`] about overruns.

pub mod path;
pub mod threads;

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};

use crate::flow::LiveFlows;
use crate::sys::{ConntrackSocket, RecvBatch, RecvError};

pub use path::{ignores_event_stamps, wall_clock_ns, EventPath};

/// Bytes per receive slot: one page; the kernel never sends a conntrack
/// event larger than that, and a longer datagram is counted as truncated.
pub const SLOT_BYTES: usize = 4096;

/// The poll token of the netlink socket.
pub const SOCKET: Token = Token(0);
/// The poll token of the waker that stops the reader.
pub const WAKE: Token = Token(1);

/// At most one log line about overruns per this interval.
pub const OVERRUN_LOG_EVERY: Duration = Duration::from_secs(10);

/// Flow-table slots reconciled with a table dump per drained socket: a
/// slice of a few hundred microseconds, after which the reader receives
/// again, so a large table's sweep never holds events back for long.
pub const RECONCILE_SLOTS: usize = 16_384;

/// A reader that has been away from its poll this long without finishing a
/// batch is stuck: `/healthz` says so. A batch takes microseconds; a
/// drain of a garbage-collector burst of 100,000 events, batch after
/// batch, well under a second.
pub const READER_STUCK_AFTER: Duration = Duration::from_secs(5);

/// What the endpoint's probes read of one reader: whether its loop runs,
/// and since when it has been away from its poll. Written once per batch
/// and once per wait (a `Relaxed` store each), read by the probes.
#[derive(Debug, Default)]
pub struct ReaderHealth {
    ready: AtomicBool,
    /// Wall clock (ms) of the batch being taken; 0 while waiting in poll.
    busy_since_ms: AtomicU64,
}

impl ReaderHealth {
    /// Whether the reader's loop runs.
    pub fn ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// Whether, at `now_ns` (wall clock), the reader has been on one batch
    /// for longer than [`READER_STUCK_AFTER`].
    pub fn stuck(&self, now_ns: u64) -> bool {
        let since_ms = self.busy_since_ms.load(Ordering::Relaxed);
        let limit_ms = READER_STUCK_AFTER.as_millis() as u64;
        since_ms != 0 && (now_ns / 1_000_000).saturating_sub(since_ms) > limit_ms
    }

    fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Release);
    }

    /// Taking a batch received at `at_ns`.
    fn working(&self, at_ns: u64) {
        self.busy_since_ms
            .store((at_ns / 1_000_000).max(1), Ordering::Relaxed);
    }

    /// Back in poll.
    fn waiting(&self) {
        self.busy_since_ms.store(0, Ordering::Relaxed);
    }
}

/// A fault a test build injects into a reader at its first batch, named by
/// the environment variable `CONNTRACK_METRICS_FAULT`: `reader-panic` (the
/// reader panics) or `reader-stall` (it stops reading until it is
/// stopped). Debug builds only: a release build has no such code.
#[cfg(debug_assertions)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    Panic,
    Stall,
}

#[cfg(debug_assertions)]
impl Fault {
    fn from_env() -> Option<Fault> {
        match std::env::var("CONNTRACK_METRICS_FAULT").ok()?.as_str() {
            "reader-panic" => Some(Fault::Panic),
            "reader-stall" => Some(Fault::Stall),
            _ => None,
        }
    }

    fn strike(self, stop: &AtomicBool) {
        match self {
            Fault::Panic => panic!("injected fault (CONNTRACK_METRICS_FAULT=reader-panic)"),
            Fault::Stall => {
                while !stop.load(Ordering::Acquire) {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
    }
}

/// How a reader reads, the same for every reader.
#[derive(Clone, Copy, Debug)]
pub struct ReaderOptions {
    /// `--recv-batch`: datagrams per receive.
    pub batch: usize,
    /// `--drain-delay-us`: once the socket is readable, wait this long before
    /// draining it, so events gather into full batches and the reader wakes
    /// less often. Applied only while the kernel stamps its events
    /// (`CTA_TIMESTAMP_EVENT`): without stamps the receive time is the
    /// event's time, and waiting would add to every latency.
    pub drain_delay: Duration,
    /// `--print-events`: every event to stdout.
    pub print_events: bool,
    /// Wake at least this often, even without events (`None`: only for
    /// events): with `--service-labels`, idle Services' series must leave
    /// on a quiet node too.
    pub tick: Option<Duration>,
}

/// Overruns since the last log line, and when that was.
#[derive(Default)]
struct OverrunLog {
    unlogged: u64,
    last: Option<Instant>,
}

impl OverrunLog {
    fn note(&mut self) {
        self.unlogged += 1;
        if self.last.is_some_and(|t| t.elapsed() < OVERRUN_LOG_EVERY) {
            return;
        }
        crate::log!(
            "netlink overrun (ENOBUFS): the kernel dropped events; {} overrun(s) since the \
             last report (a larger --rcvbuf-bytes, or a pinned --reader-cpu, helps)",
            self.unlogged
        );
        self.unlogged = 0;
        self.last = Some(Instant::now());
    }
}

/// One reader: its socket, the poll it waits in, its receive buffers and
/// its per-event path.
pub struct Reader<'a> {
    socket: ConntrackSocket,
    poll: Poll,
    events: Events,
    batch: RecvBatch,
    path: EventPath<'a>,
    drain_delay: Duration,
    tick: Option<Duration>,
    overruns: OverrunLog,
    /// Where the table census leaves the flows a dump found.
    live_flows: Option<Receiver<Arc<LiveFlows>>>,
    /// The dump being reconciled with, and the slot to go on from.
    reconciling: Option<(Arc<LiveFlows>, usize)>,
    #[cfg(debug_assertions)]
    fault: Option<Fault>,
}

impl<'a> Reader<'a> {
    /// A reader of `socket` that waits in `poll` (whose waker, token
    /// [`WAKE`], stops it, or wakes it for its mail) and takes each batch
    /// through `path`; it reconciles its flow table with each [`LiveFlows`]
    /// that arrives on `live_flows`. Allocates its receive buffers, once.
    pub fn new(
        socket: ConntrackSocket,
        poll: Poll,
        path: EventPath<'a>,
        options: &ReaderOptions,
        live_flows: Option<Receiver<Arc<LiveFlows>>>,
    ) -> io::Result<Reader<'a>> {
        let fd = socket.as_raw_fd();
        poll.registry()
            .register(&mut SourceFd(&fd), SOCKET, Interest::READABLE)?;
        Ok(Reader {
            socket,
            poll,
            events: Events::with_capacity(4),
            batch: RecvBatch::new(options.batch, SLOT_BYTES),
            path,
            drain_delay: options.drain_delay,
            tick: options.tick,
            overruns: OverrunLog::default(),
            live_flows,
            reconciling: None,
            #[cfg(debug_assertions)]
            fault: Fault::from_env(),
        })
    }

    /// Reads events until `stop` is set (and the waker woken) or the socket
    /// fails. `health` is ready while the loop runs, and knows when the
    /// reader left its poll.
    pub fn run(&mut self, stop: &AtomicBool, health: &ReaderHealth) -> io::Result<()> {
        health.set_ready(true);
        let result = self.read_until(stop, health);
        health.set_ready(false);
        result
    }

    fn read_until(&mut self, stop: &AtomicBool, health: &ReaderHealth) -> io::Result<()> {
        loop {
            match self.batch.recv(&self.socket) {
                Ok(received) => {
                    self.take_batch(received, health)?;
                    #[cfg(debug_assertions)]
                    if let Some(fault) = self.fault.take() {
                        fault.strike(stop);
                    }
                }
                Err(RecvError::Overrun) => {
                    // The kernel dropped events for us; reading goes on at once.
                    self.path.overrun();
                    self.overruns.note();
                }
                Err(RecvError::WouldBlock) => {
                    self.path.drained();
                    if self.reconcile_some() {
                        continue;
                    }
                    health.waiting();
                    if !self.wait(stop)? {
                        return Ok(());
                    }
                }
                Err(RecvError::Io(e)) => return Err(e),
            }
        }
    }

    /// The batch just received, through the per-event path.
    fn take_batch(&mut self, received: usize, health: &ReaderHealth) -> io::Result<()> {
        let received_ns = self.path.begin_batch(received);
        health.working(received_ns);
        for datagram in self.batch.datagrams() {
            self.path
                .datagram(datagram.bytes, datagram.truncated, received_ns)?;
        }
        self.path.end_batch()
    }

    /// At a drained socket: the next slice of the reconciliation under way,
    /// or else a table dump's flows taken from the mail. True when the
    /// reader should receive again before it waits: events that came
    /// meanwhile go first, and a dump just taken is applied only at the
    /// next drained socket, when every event the kernel sent before the dump
    /// ended has been taken.
    fn reconcile_some(&mut self) -> bool {
        if let Some((live, from)) = self.reconciling.take() {
            if let Some(next) = self.path.reconcile(&live, from, RECONCILE_SLOTS) {
                self.reconciling = Some((live, next));
            }
            return true;
        }
        match self.live_flows.as_ref().map(Receiver::try_recv) {
            Some(Ok(live)) => {
                self.reconciling = Some((live, 0));
                true
            }
            _ => false,
        }
    }

    /// Drained: waits until the socket is readable (true) or the reader is
    /// stopped (false). Readable, it lets more events gather first (one
    /// sleep per wake-up, never per event) if their stamps make it harmless.
    fn wait(&mut self, stop: &AtomicBool) -> io::Result<bool> {
        loop {
            if stop.load(Ordering::Acquire) {
                return Ok(false);
            }
            match self.poll.poll(&mut self.events, self.tick) {
                Ok(()) => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        if !self.drain_delay.is_zero() && self.path.stamped() && !stop.load(Ordering::Acquire) {
            std::thread::sleep(self.drain_delay);
        }
        Ok(true)
    }
}
