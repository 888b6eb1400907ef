//! The running endpoint: one poll loop over the listening socket and a slab of
//! client connections.
//!
//! Owns: the tokens of the poll, accepting (and retrying `accept` after a lack
//! of resources), admission against the two caps of [`Limits::max_connections`]
//! (serving, and closing) and against [`Limits::max_connections_per_peer`],
//! evicting the connection that has waited longest for its head, the list of
//! connections that yielded with requests left and are driven again on the
//! next round, acting on passed deadlines, refusing a newcomer beyond both
//! caps, and counting refusals in `http_connections_refused_total`; with a
//! web configuration, starting TLS on each accepted connection, handing the
//! password checks' answers to their connections, and putting a reloaded
//! configuration in force (for connections accepted and requests read from
//! then on). What a single connection does with its socket is
//! `connection`'s.
//!
//! Never: blocks (the poll timeout is the nearest deadline, not a timer
//! thread, and zero while a connection waits to be driven again), drives a
//! connection twice in a round for readiness, holds more than
//! `max_connections` serving and `max_connections` closing connections, or
//! serves more than `max_connections_per_peer` from one address.

use std::io::{self, Read, Write};
use std::net::{IpAddr, Shutdown};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Registry, Token};

use metrics::Counter;

use super::auth::{Gate, Verdict};
use super::connection::{Accepted, Budget, Conn, Limits, Next, Phase, Serve, DRAIN_CHUNK};
use super::response::{write_reply, Responder, Status};
use super::transport::Transport;
use super::web::Watch;
use crate::stats::self_metrics::{HTTP_REFUSED, HTTP_TLS_ERRORS};

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
    /// Poll rounds so far; a connection is driven once per round for
    /// readiness or a yield (`Conn::round`).
    round: u64,
    /// Slots whose connection yielded with requests left ([`Next::Again`]):
    /// edge-triggered readiness will not report them, so the next round
    /// drives them. May name a slot closed since, which is then skipped.
    again: Vec<usize>,
    /// The list being driven this round (kept to reuse its allocation).
    redrive: Vec<usize>,
    /// Newcomers refused because their address had
    /// `max_connections_per_peer` connections.
    refused_peer: Counter,
    /// Newcomers refused because all `max_connections` were busy.
    refused_busy: Counter,
    /// The serial number of the next connection.
    next_id: u64,
    /// Connections closed for a TLS error (a failed handshake: plain HTTP
    /// or an old TLS version on the TLS port, an unknown client
    /// certificate).
    tls_errors: Counter,
    /// Authentication, with a web configuration.
    gate: Option<Gate>,
    /// The web configuration's file and its reloads.
    watch: Option<Watch>,
    /// Password checks answered, taken from the gate each round.
    checked: Vec<((usize, u64), Verdict)>,
}

/// What the endpoint serves with a web configuration: the configuration and
/// its file, and the gate of its users.
pub(super) struct Secured {
    pub(super) watch: Watch,
    pub(super) gate: Gate,
}

impl std::fmt::Debug for Secured {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Secured").finish_non_exhaustive()
    }
}

impl Server {
    pub(super) fn new(limits: Limits, secured: Option<Secured>) -> Server {
        let (gate, watch) = match secured {
            Some(Secured { watch, gate }) => (Some(gate), Some(watch)),
            None => (None, None),
        };
        Server {
            limits,
            conns: Vec::new(),
            free: Vec::new(),
            serving: 0,
            closing: 0,
            accept_retry: None,
            drain: vec![0; DRAIN_CHUNK],
            refusal: Vec::new(),
            round: 0,
            again: Vec::new(),
            redrive: Vec::new(),
            refused_peer: metrics::counter!(HTTP_REFUSED, "reason" => "peer cap"),
            refused_busy: metrics::counter!(HTTP_REFUSED, "reason" => "connection cap"),
            next_id: 0,
            tls_errors: metrics::counter!(HTTP_TLS_ERRORS),
            gate,
            watch,
            checked: Vec::new(),
        }
    }

    /// Puts the web configuration in force (at the start and after each
    /// reload): connections accepted from now on get its TLS (read from
    /// the watch at each accept), requests its users and headers.
    fn apply(&mut self, responder: &mut Responder<'_>) {
        let (Some(watch), Some(gate)) = (self.watch.as_ref(), self.gate.as_mut()) else {
            return;
        };
        let config = &watch.current;
        responder.headers = Arc::clone(&config.headers);
        gate.reconfigure(Arc::clone(&config.users), config.rate_limit);
    }

    /// Hands the password checks' answers to their connections.
    fn take_checks(&mut self, registry: &Registry, now: Instant, responder: &mut Responder<'_>) {
        let Some(gate) = self.gate.as_mut() else {
            return;
        };
        gate.answers(&mut self.checked);
        let mut checked = std::mem::take(&mut self.checked);
        for ((idx, id), verdict) in checked.drain(..) {
            let Some(conn) = self.conns.get_mut(idx).and_then(Option::as_mut) else {
                continue;
            };
            if conn.id == id && conn.checked(verdict, now, &self.limits, responder) {
                self.drive_slot(idx, registry, now, responder);
            }
        }
        self.checked = checked;
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
        self.apply(responder);
        loop {
            // Acquire pairs with the Release store in `StopHandle::stop`.
            if stop.load(Ordering::Acquire) {
                return Ok(());
            }
            let now = Instant::now();
            if self.watch.as_mut().is_some_and(|w| w.look(now)) {
                self.apply(responder);
            }
            let timeout = if self.again.is_empty() {
                self.next_deadline()
                    .map(|at| at.saturating_duration_since(now))
            } else {
                // Connections wait to be driven again: only look for events.
                Some(Duration::ZERO)
            };
            match poll.poll(&mut events, timeout) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            let now = Instant::now();
            let registry = poll.registry();
            self.round += 1;
            std::mem::swap(&mut self.again, &mut self.redrive);
            for event in events.iter() {
                match event.token() {
                    // The stop flag and a reload are looked at on the next
                    // turn; the password checks' answers now.
                    WAKER => self.take_checks(registry, now, responder),
                    LISTENER => self.accept_all(listener, registry, now, responder),
                    Token(t) => self.drive_ready(t - FIRST_CONN, registry, now, responder),
                }
            }
            let mut redrive = std::mem::take(&mut self.redrive);
            for idx in redrive.drain(..) {
                self.drive_ready(idx, registry, now, responder);
            }
            self.redrive = redrive;
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
        let watch = self.watch.as_ref().map(|w| w.next_look);
        conns.chain(self.accept_retry).chain(watch).min()
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
                Ok((stream, addr)) => {
                    self.admit(stream, addr.ip().to_canonical(), registry, now, responder)
                }
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

    /// Takes a freshly accepted connection from `peer` in, as served,
    /// refused or dropped. At a cap, the connection that has waited longest
    /// for its head makes room: at the per-peer cap, one of the same
    /// address (another address's connections are never its to take); at
    /// the cap on all, any.
    fn admit(
        &mut self,
        stream: TcpStream,
        peer: IpAddr,
        registry: &Registry,
        now: Instant,
        responder: &mut Responder<'_>,
    ) {
        let _ = stream.set_nodelay(true);
        let max = self.limits.max_connections;
        let peer_full = !self.evict_oldest_waiting(Some(peer), registry, now, responder);
        if peer_full {
            self.refused_peer.increment(1);
        } else if !self.evict_oldest_waiting(None, registry, now, responder) {
            self.refused_busy.increment(1);
        }
        let tls = self.watch.as_ref().and_then(|w| w.current.tls.as_ref());
        let io = match tls {
            None => Transport::Plain(stream),
            Some(config) => match rustls::ServerConnection::new(Arc::clone(config)) {
                Ok(tls) => Transport::tls(stream, tls),
                Err(_) => return,
            },
        };
        let accepted = Accepted {
            io,
            id: self.next_id,
            peer,
        };
        self.next_id += 1;
        let conn = if !peer_full && self.serving < max {
            self.serving += 1;
            Conn::serving(accepted, now, &self.limits)
        } else if self.closing < max {
            self.closing += 1;
            Conn::refusing(accepted, now, &self.limits)
        } else {
            self.refuse(accepted.io);
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
                conn.io.socket(),
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

    /// Connections being served from `peer`. A linear scan, once per accept:
    /// there are at most `2 * max_connections` connections.
    fn served_from(&self, peer: IpAddr) -> usize {
        let conns = self.conns.iter().flatten();
        conns
            .filter(|c| c.budget == Budget::Serving && c.peer == peer)
            .count()
    }

    /// A connection beyond both caps: a 503 if the socket takes it at once
    /// (on a plain HTTP port), then close. Reading what already arrived
    /// first keeps the close a FIN rather than a reset in the common case.
    fn refuse(&mut self, mut io: Transport) {
        let tls = !matches!(io, Transport::Plain(_));
        let stream: &TcpStream = io.socket();
        for _ in 0..4 {
            match (&*stream).read(&mut self.drain) {
                Ok(n) if n > 0 => {}
                _ => break,
            }
        }
        if self.refusal.is_empty() {
            write_reply(&mut self.refusal, Status::Busy.plain(false, true));
        }
        if !tls {
            let _ = (&*stream).write(&self.refusal);
        }
        let _ = stream.shutdown(Shutdown::Write);
    }

    /// Whether another connection from `peer` (with `Some`), or from
    /// anywhere (`None`), may be served now.
    fn has_room(&self, peer: Option<IpAddr>) -> bool {
        match peer {
            Some(peer) => self.served_from(peer) < self.limits.max_connections_per_peer,
            None => self.serving < self.limits.max_connections,
        }
    }

    /// Makes room for a newcomer from `peer` (`Some`: under the per-peer
    /// cap, `None`: under the cap on all) if there is none, by evicting the
    /// connection (from `peer`, or any) that has waited longest for its
    /// request head, after letting it read what it has been sent (a request
    /// that is complete gets its answer and is not evicted). Evicts no one
    /// when every such connection is writing a response or has requests
    /// waiting; false when there is still no room.
    fn evict_oldest_waiting(
        &mut self,
        peer: Option<IpAddr>,
        registry: &Registry,
        now: Instant,
        responder: &mut Responder<'_>,
    ) -> bool {
        while !self.has_room(peer) {
            let victim = self
                .conns
                .iter()
                .enumerate()
                .filter_map(|(i, c)| c.as_ref().map(|c| (i, c)))
                .filter(|(_, c)| c.budget == Budget::Serving && c.phase == Phase::Head)
                .filter(|(_, c)| !c.yielded() && peer.is_none_or(|p| c.peer == p))
                .min_by_key(|(_, c)| c.deadline)
                .map(|(i, _)| i);
            let Some(idx) = victim else { return false };
            self.drive_slot(idx, registry, now, responder);
            let Some(conn) = self.conns[idx].as_mut() else {
                continue; // it closed by itself
            };
            if conn.budget != Budget::Serving || conn.phase != Phase::Head || conn.yielded() {
                continue; // it got a request in and is being answered
            }
            if self.closing >= self.limits.max_connections {
                self.close_slot(idx, registry);
                return true;
            }
            conn.budget = Budget::Closing;
            self.serving -= 1;
            self.closing += 1;
            if conn.filled > 0 {
                conn.fail(Status::Timeout, now, &self.limits);
            } else {
                conn.io.shutdown_write();
                conn.phase = Phase::Linger;
                conn.deadline = now + self.limits.head_deadline;
            }
            self.drive_slot(idx, registry, now, responder);
            return true;
        }
        true
    }

    /// Drives connection `idx` for a readiness event or a yield, unless this
    /// round already did (a connection that yielded and then got an event).
    fn drive_ready(
        &mut self,
        idx: usize,
        registry: &Registry,
        now: Instant,
        responder: &mut Responder<'_>,
    ) {
        let round = self.round;
        match self.conns.get_mut(idx).and_then(Option::as_mut) {
            Some(conn) if conn.round != round => conn.round = round,
            _ => return,
        }
        self.drive_slot(idx, registry, now, responder);
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
            let mut serve = Serve {
                slot: idx,
                responder: &mut *responder,
                gate: self.gate.as_mut(),
            };
            let next = conn.drive(now, &self.limits, &mut serve, &mut self.drain);
            if next == Next::Close && conn.tls_failed() {
                self.tls_errors.increment(1);
            }
            match next {
                Next::Keep => return,
                Next::Again => {
                    self.again.push(idx);
                    return;
                }
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
            } else if matches!(conn.phase, Phase::Authorizing { .. }) {
                // Its password check did not answer in time.
                conn.fail(Status::CheckTimeout, now, &self.limits);
                self.drive_slot(idx, registry, now, responder);
            } else {
                // Idle, too slow to take its response, or done lingering.
                self.close_slot(idx, registry);
            }
        }
    }

    fn close_slot(&mut self, idx: usize, registry: &Registry) {
        if let Some(mut conn) = self.conns[idx].take() {
            let _ = registry.deregister(conn.io.socket());
            match conn.budget {
                Budget::Serving => self.serving -= 1,
                Budget::Closing => self.closing -= 1,
            }
            self.free.push(idx);
        }
    }
}
