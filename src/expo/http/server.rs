//! The running endpoint: one poll loop over the listening socket and a slab of
//! client connections.
//!
//! Owns: the tokens of the poll, accepting (and retrying `accept` after a lack
//! of resources), admission against the two caps of [`Limits::max_connections`]
//! (serving, and closing), evicting the connection that has waited longest for
//! its head, acting on passed deadlines, and refusing a newcomer beyond both
//! caps. What a single connection does with its socket is `connection`'s.
//!
//! Never: blocks (the poll timeout is the nearest deadline, not a timer
//! thread), or holds more than `max_connections` serving and
//! `max_connections` closing connections.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Registry, Token};

use super::connection::{Budget, Conn, Limits, Next, Phase, DRAIN_CHUNK};
use super::response::{write_reply, Responder, Status};

pub(super) const LISTENER: Token = Token(0);
pub(super) const WAKER: Token = Token(1);
/// Connection `i` of the slab is registered as `Token(FIRST_CONN + i)`.
const FIRST_CONN: usize = 2;
/// Readiness events taken per poll.
const EVENTS: usize = 256;
/// When `accept` fails for want of resources (file descriptors, memory), the
/// pending connections stay queued and no new readiness event may come:
/// try again after this long.
const ACCEPT_RETRY: Duration = Duration::from_millis(50);

/// The connections of a running endpoint.
pub(super) struct Server {
    limits: Limits,
    /// Slab of connections; a free slot is `None` and listed in `free`.
    conns: Vec<Option<Conn>>,
    free: Vec<usize>,
    /// Connections with `Budget::Serving`, at most `limits.max_connections`.
    serving: usize,
    /// Connections with `Budget::Closing`, at most `limits.max_connections`.
    closing: usize,
    /// When to call `accept` again after it failed for want of resources.
    accept_retry: Option<Instant>,
    /// Where lingering connections' input is read and discarded.
    drain: Vec<u8>,
    /// The 503 of a connection refused without a slot.
    refusal: Vec<u8>,
}

impl Server {
    pub(super) fn new(limits: Limits) -> Server {
        Server {
            limits,
            conns: Vec::new(),
            free: Vec::new(),
            serving: 0,
            closing: 0,
            accept_retry: None,
            drain: vec![0; DRAIN_CHUNK],
            refusal: Vec::new(),
        }
    }

    /// Serves `listener` (registered in `poll` as [`LISTENER`], next to the
    /// waker as [`WAKER`]) until `stop` is set; returns only the poll's own
    /// errors.
    pub(super) fn run(
        &mut self,
        poll: &mut Poll,
        listener: &TcpListener,
        stop: &AtomicBool,
        responder: &mut Responder<'_>,
    ) -> io::Result<()> {
        let mut events = Events::with_capacity(EVENTS);
        loop {
            // Acquire pairs with the Release store in `StopHandle::stop`.
            if stop.load(Ordering::Acquire) {
                return Ok(());
            }
            let now = Instant::now();
            let timeout = self
                .next_deadline()
                .map(|at| at.saturating_duration_since(now));
            match poll.poll(&mut events, timeout) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            let now = Instant::now();
            let registry = poll.registry();
            for event in events.iter() {
                match event.token() {
                    // The stop flag is looked at on the next turn.
                    WAKER => {}
                    LISTENER => self.accept_all(listener, registry, now, responder),
                    Token(t) => self.drive_slot(t - FIRST_CONN, registry, now, responder),
                }
            }
            if self.accept_retry.is_some_and(|at| at <= now) {
                self.accept_retry = None;
                self.accept_all(listener, registry, now, responder);
            }
            self.expire(registry, now, responder);
        }
    }

    /// The earliest deadline of any connection or accept retry. A linear scan:
    /// there are at most `2 * max_connections` connections.
    fn next_deadline(&self) -> Option<Instant> {
        let conns = self.conns.iter().flatten().map(|c| c.deadline);
        conns.chain(self.accept_retry).min()
    }

    fn accept_all(
        &mut self,
        listener: &TcpListener,
        registry: &Registry,
        now: Instant,
        responder: &mut Responder<'_>,
    ) {
        loop {
            match listener.accept() {
                Ok((stream, _)) => self.admit(stream, registry, now, responder),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::Interrupted
                            | io::ErrorKind::ConnectionAborted
                            | io::ErrorKind::ConnectionReset
                    ) => {}
                Err(_) => {
                    // EMFILE, ENFILE, ENOBUFS, ENOMEM: leave the rest queued
                    // in the kernel and come back shortly.
                    self.accept_retry = Some(now + ACCEPT_RETRY);
                    return;
                }
            }
        }
    }

    /// Takes a freshly accepted connection in, as served, refused or dropped.
    fn admit(
        &mut self,
        stream: TcpStream,
        registry: &Registry,
        now: Instant,
        responder: &mut Responder<'_>,
    ) {
        let _ = stream.set_nodelay(true);
        let max = self.limits.max_connections;
        if self.serving >= max {
            self.evict_oldest_waiting(registry, now, responder);
        }
        let conn = if self.serving < max {
            self.serving += 1;
            Conn::serving(stream, now, &self.limits)
        } else if self.closing < max {
            self.closing += 1;
            Conn::refusing(stream, now, &self.limits)
        } else {
            self.refuse(stream);
            return;
        };
        let idx = match self.free.pop() {
            Some(idx) => idx,
            None => {
                self.conns.push(None);
                self.conns.len() - 1
            }
        };
        let conn = self.conns[idx].insert(conn);
        let token = Token(FIRST_CONN + idx);
        if registry
            .register(
                &mut conn.stream,
                token,
                Interest::READABLE | Interest::WRITABLE,
            )
            .is_err()
        {
            self.close_slot(idx, registry);
            return;
        }
        // The request may already be waiting: edge-triggered readiness only
        // reports what arrives from now on.
        self.drive_slot(idx, registry, now, responder);
    }

    /// A connection beyond both caps: a 503 if the socket takes it at once,
    /// then close. Reading what already arrived first keeps the close a FIN
    /// rather than a reset in the common case.
    fn refuse(&mut self, stream: TcpStream) {
        for _ in 0..4 {
            match (&stream).read(&mut self.drain) {
                Ok(n) if n > 0 => {}
                _ => break,
            }
        }
        if self.refusal.is_empty() {
            write_reply(&mut self.refusal, Status::Busy.plain(false, true));
        }
        let _ = (&stream).write(&self.refusal);
        let _ = stream.shutdown(Shutdown::Write);
    }

    /// At the cap: frees a serving slot by evicting the connection that has
    /// waited longest for its request head, after letting it read what it has
    /// been sent (a request that is complete gets its answer and is not
    /// evicted). Does nothing when every served connection is writing a
    /// response.
    fn evict_oldest_waiting(
        &mut self,
        registry: &Registry,
        now: Instant,
        responder: &mut Responder<'_>,
    ) {
        while self.serving >= self.limits.max_connections {
            let victim = self
                .conns
                .iter()
                .enumerate()
                .filter_map(|(i, c)| c.as_ref().map(|c| (i, c)))
                .filter(|(_, c)| c.budget == Budget::Serving && c.phase == Phase::Head)
                .min_by_key(|(_, c)| c.deadline)
                .map(|(i, _)| i);
            let Some(idx) = victim else { return };
            self.drive_slot(idx, registry, now, responder);
            let Some(conn) = self.conns[idx].as_mut() else {
                continue; // it closed by itself
            };
            if conn.budget != Budget::Serving || conn.phase != Phase::Head {
                continue; // it got a request in and is being answered
            }
            if self.closing >= self.limits.max_connections {
                self.close_slot(idx, registry);
                return;
            }
            conn.budget = Budget::Closing;
            self.serving -= 1;
            self.closing += 1;
            if conn.filled > 0 {
                conn.fail(Status::Timeout, now, &self.limits);
            } else {
                let _ = conn.stream.shutdown(Shutdown::Write);
                conn.phase = Phase::Linger;
                conn.deadline = now + self.limits.head_deadline;
            }
            self.drive_slot(idx, registry, now, responder);
            return;
        }
    }

    /// Drives connection `idx` (if it is still there: events may name a slot
    /// closed earlier in the same batch) and closes it when it is done.
    fn drive_slot(
        &mut self,
        idx: usize,
        registry: &Registry,
        now: Instant,
        responder: &mut Responder<'_>,
    ) {
        loop {
            let Some(conn) = self.conns.get_mut(idx).and_then(Option::as_mut) else {
                return;
            };
            match conn.drive(now, &self.limits, responder, &mut self.drain) {
                Next::Keep => return,
                Next::Close => break,
                Next::Linger => {
                    if conn.budget == Budget::Serving {
                        if self.closing >= self.limits.max_connections {
                            break;
                        }
                        conn.budget = Budget::Closing;
                        self.serving -= 1;
                        self.closing += 1;
                    }
                    conn.phase = Phase::Linger;
                    conn.deadline = now + self.limits.head_deadline;
                }
            }
        }
        self.close_slot(idx, registry);
    }

    /// Acts on every deadline that has passed.
    fn expire(&mut self, registry: &Registry, now: Instant, responder: &mut Responder<'_>) {
        for idx in 0..self.conns.len() {
            let Some(conn) = self.conns[idx].as_mut() else {
                continue;
            };
            if conn.deadline > now {
                continue;
            }
            if conn.phase == Phase::Head && conn.filled > 0 {
                // Half a request in time: say why before closing.
                conn.fail(Status::Timeout, now, &self.limits);
                self.drive_slot(idx, registry, now, responder);
            } else {
                // Idle, too slow to take its response, or done lingering.
                self.close_slot(idx, registry);
            }
        }
    }

    fn close_slot(&mut self, idx: usize, registry: &Registry) {
        if let Some(mut conn) = self.conns[idx].take() {
            let _ = registry.deregister(&mut conn.stream);
            match conn.budget {
                Budget::Serving => self.serving -= 1,
                Budget::Closing => self.closing -= 1,
            }
            self.free.push(idx);
        }
    }
}
