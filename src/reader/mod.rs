//! A reader: one conntrack socket drained by batched receives, each batch
//! taken through the per-event path ([`path`]); and the threads that run
//! the readers ([`threads`]).
//!
//! Owns: the loop of one reader thread (receive until the socket is empty,
//! then wait in `poll` until it is readable or the reader is stopped), and
//! what it does on an overrun.
//! Never: allocates, locks, logs or makes a syscall per event; the one
//! syscall per batch is the receive. It logs at most one line per
//! [`OVERRUN_LOG_EVERY`] about overruns.

pub mod path;
pub mod threads;

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};

use crate::sys::{ConntrackSocket, RecvBatch, RecvError};

pub use path::{wall_clock_ns, EventPath};

/// Bytes per receive slot: one page; the kernel never sends a conntrack
/// event larger than that, and a longer datagram is counted as truncated.
pub const SLOT_BYTES: usize = 4096;

/// The poll token of the netlink socket.
pub const SOCKET: Token = Token(0);
/// The poll token of the waker that stops the reader.
pub const WAKE: Token = Token(1);

/// At most one log line about overruns per this interval.
pub const OVERRUN_LOG_EVERY: Duration = Duration::from_secs(10);

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
    overruns: OverrunLog,
}

impl<'a> Reader<'a> {
    /// A reader of `socket` that waits in `poll` (whose waker, token
    /// [`WAKE`], stops it) and takes each batch through `path`. Allocates
    /// its receive buffers, once.
    pub fn new(
        socket: ConntrackSocket,
        poll: Poll,
        path: EventPath<'a>,
        options: &ReaderOptions,
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
            overruns: OverrunLog::default(),
        })
    }

    /// Reads events until `stop` is set (and the waker woken) or the socket
    /// fails. `ready` is true while the loop runs.
    pub fn run(&mut self, stop: &AtomicBool, ready: &AtomicBool) -> io::Result<()> {
        ready.store(true, Ordering::Release);
        let result = self.read_until(stop);
        ready.store(false, Ordering::Release);
        result
    }

    fn read_until(&mut self, stop: &AtomicBool) -> io::Result<()> {
        loop {
            match self.batch.recv(&self.socket) {
                Ok(received) => self.take_batch(received)?,
                Err(RecvError::Overrun) => {
                    // The kernel dropped events for us; reading goes on at once.
                    self.path.overrun();
                    self.overruns.note();
                }
                Err(RecvError::WouldBlock) => {
                    if !self.wait(stop)? {
                        return Ok(());
                    }
                }
                Err(RecvError::Io(e)) => return Err(e),
            }
        }
    }

    /// The batch just received, through the per-event path.
    fn take_batch(&mut self, received: usize) -> io::Result<()> {
        let received_ns = self.path.begin_batch(received);
        for datagram in self.batch.datagrams() {
            self.path
                .datagram(datagram.bytes, datagram.truncated, received_ns)?;
        }
        self.path.end_batch()
    }

    /// Drained: waits until the socket is readable (true) or the reader is
    /// stopped (false). Readable, it lets more events gather first (one
    /// sleep per wake-up, never per event) if their stamps make it harmless.
    fn wait(&mut self, stop: &AtomicBool) -> io::Result<bool> {
        loop {
            if stop.load(Ordering::Acquire) {
                return Ok(false);
            }
            match self.poll.poll(&mut self.events, None) {
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
