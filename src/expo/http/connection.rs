//! One client connection: its phase (reading a request head, waiting for
//! its password check, writing a response, lingering before the close), its
//! transport (plain or TLS), its buffers, the budget it counts against and
//! the deadline of its phase; and the [`Limits`] it is held to.
//!
//! Owns: reading into the head buffer until a head is complete, too large or
//! malformed; asking the `Gate` about a complete head's credentials (every
//! route but `/healthz` and `/readyz`) and handing it to the `Responder`
//! when they pass, or writing the refusal; writing what it produced; keeping what a pipelining client sent after a request; shutting
//! the write side after a last response and discarding input until the client
//! closes.
//!
//! Never: blocks (every read and write stops at `WouldBlock`), reads past
//! `max_head_bytes` of a request head, reads a request body, answers more
//! than [`REQUESTS_PER_DRIVE`] requests or reads more than
//! [`LINGER_READ_BUDGET`] per wake-up, or decides on its own that it is
//! closed or must be driven again: it says what it needs ([`Next`]) and the
//! server acts.

use std::io::{self, Read};
use std::net::IpAddr;
use std::ops::ControlFlow;
use std::time::{Duration, Instant};

use super::auth::{Gate, Verdict};
use super::request::{examine, Examined, Request, Route};
use super::response::{write_reply, Responder, Status};
use super::transport::Transport;

/// What one client may cost the endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest request head (request line and headers), in bytes; a larger
    /// one is answered 431 and the connection closed. Default 8 KiB.
    pub max_head_bytes: usize,
    /// Time a client has to send a whole request head, from the accept or from
    /// the end of the previous response on a kept-alive connection. Default 5 s.
    pub head_deadline: Duration,
    /// Time a client has to take a whole response, from when it is ready.
    /// Default 10 s.
    pub write_deadline: Duration,
    /// Connections served at once (and, apart, connections being closed).
    /// Default 64.
    pub max_connections: usize,
    /// Connections served at once from one peer IP address; a newcomer beyond
    /// it is answered 503 and closed. Default 8: Prometheus keeps one
    /// connection per target, and a few more leave room for a second
    /// Prometheus behind the same address and a person with curl. A flood
    /// from one address then holds at most an eighth of `max_connections`,
    /// so a scraper from another address always finds a free slot.
    pub max_connections_per_peer: usize,
    /// Least time between two renders of one format: the `/metrics` requests
    /// within it get the bytes (and gzip) of the last render. Zero renders
    /// for every request. Default 250 ms: a flood of scrapes costs at most
    /// four renders a second per format, and a scraper (every 1 s at the
    /// fastest, 15 s by default in Prometheus) gets a body at most a quarter
    /// of a second old.
    pub min_render_interval: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_head_bytes: 8 * 1024,
            head_deadline: Duration::from_secs(5),
            write_deadline: Duration::from_secs(10),
            max_connections: 64,
            max_connections_per_peer: 8,
            min_render_interval: Duration::from_millis(250),
        }
    }
}

/// Requests answered per wake-up of one connection; then it yields to the
/// others and is driven again on the next round of the poll. Prometheus,
/// curl and browsers send one request at a time, so only a pipelining client
/// ever waits for a round; four responses per turn amortize its wake-up.
pub(super) const REQUESTS_PER_DRIVE: usize = 4;

/// Bytes discarded per wake-up from a connection that is being closed, so a
/// client flooding it cannot keep the thread from the others.
const LINGER_READ_BUDGET: usize = 64 * 1024;
/// Size of the scratch buffer those bytes are read into.
pub(super) const DRAIN_CHUNK: usize = 16 * 1024;

/// Which cap a connection counts against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Budget {
    /// Being served: waiting for a request head or writing a response.
    Serving,
    /// On its way out: a refusal being written, or a lingering close.
    Closing,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Phase {
    /// Reading a request head into `head`.
    Head,
    /// Waiting for the password check of this request.
    Authorizing { request: Request },
    /// Writing `out`; then the next request, or the lingering close.
    Respond { close: bool },
    /// Write side shut; discarding input until the client closes.
    Linger,
}

/// What the connection needs after it has made all the progress it can.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Next {
    /// Wait for readiness or the deadline.
    Keep,
    /// Drop it now.
    Close,
    /// Its last response is sent and its write side shut: linger if there is
    /// room among closing connections, else drop it.
    Linger,
    /// It answered [`REQUESTS_PER_DRIVE`] requests and may have more waiting
    /// (in its head buffer or its socket), for which no readiness event will
    /// come: drive it again on the next round.
    Again,
}

/// What a connection's drive needs besides itself: where it sits, the
/// responder, the gate of the web configuration (when there is one).
pub(super) struct Serve<'s, 'r> {
    pub(super) slot: usize,
    pub(super) responder: &'s mut Responder<'r>,
    pub(super) gate: Option<&'s mut Gate>,
}

/// A connection just accepted: its transport, serial number and peer.
pub(super) struct Accepted {
    pub(super) io: Transport,
    pub(super) id: u64,
    pub(super) peer: IpAddr,
}

pub(super) struct Conn {
    pub(super) io: Transport,
    /// Serial number, unique over the endpoint's life: tells a password
    /// check's answer for this connection from one for an earlier
    /// connection in the same slot.
    pub(super) id: u64,
    /// The client's address (IPv4-mapped IPv6 as IPv4), for the per-peer cap.
    pub(super) peer: IpAddr,
    /// The poll round that last drove it after a readiness event or a yield.
    pub(super) round: u64,
    pub(super) budget: Budget,
    pub(super) phase: Phase,
    /// When the current phase has to be over.
    pub(super) deadline: Instant,
    /// The request head buffer, `max_head_bytes` long (empty for refusals,
    /// which never read a head); `head[..filled]` is what has been read.
    head: Box<[u8]>,
    pub(super) filled: usize,
    /// `head[..filled]` holds a line end, so the request line is complete.
    saw_newline: bool,
    /// Bytes arrived that may complete, or break, the head.
    pending_parse: bool,
    /// The response being written; `out[..sent]` is written.
    out: Vec<u8>,
    sent: usize,
    /// Requests answered in the current [`Conn::drive`].
    answered: usize,
}

impl Conn {
    /// A served connection, waiting for its first request head.
    pub(super) fn serving(accepted: Accepted, now: Instant, limits: &Limits) -> Conn {
        let head = vec![0; limits.max_head_bytes].into_boxed_slice();
        Conn::waiting(accepted, head, now + limits.head_deadline)
    }

    /// A connection taken in only to be answered 503 and closed; it counts as
    /// closing from the start and never reads a head. On a TLS port it is
    /// closed without a word: a plain 503 would mean nothing to its client.
    pub(super) fn refusing(accepted: Accepted, now: Instant, limits: &Limits) -> Conn {
        let mut out = Vec::new();
        if matches!(accepted.io, Transport::Plain(_)) {
            write_reply(&mut out, Status::Busy.plain(false, true));
        }
        Conn {
            budget: Budget::Closing,
            phase: Phase::Respond { close: true },
            out,
            ..Conn::waiting(accepted, Box::default(), now + limits.write_deadline)
        }
    }

    /// A served connection waiting until `deadline` for a head to read into
    /// `head`.
    fn waiting(accepted: Accepted, head: Box<[u8]>, deadline: Instant) -> Conn {
        let Accepted { io, id, peer } = accepted;
        Conn {
            io,
            id,
            peer,
            round: 0,
            budget: Budget::Serving,
            phase: Phase::Head,
            deadline,
            head,
            filled: 0,
            saw_newline: false,
            pending_parse: false,
            out: Vec::new(),
            sent: 0,
            answered: 0,
        }
    }

    /// Removes the first request's `len` bytes, keeping what a pipelining
    /// client sent after it.
    fn consume(&mut self, len: usize) {
        self.head.copy_within(len..self.filled, 0);
        self.filled -= len;
        self.saw_newline = self.head[..self.filled].contains(&b'\n');
        self.pending_parse = self.filled > 0;
    }

    /// Whether it ended for a TLS error.
    pub(super) fn tls_failed(&self) -> bool {
        self.io.tls_failed()
    }

    /// Its last drive stopped at [`REQUESTS_PER_DRIVE`]: it has requests
    /// waiting and is listed to be driven again, so it is not idle.
    pub(super) fn yielded(&self) -> bool {
        self.answered >= REQUESTS_PER_DRIVE
    }

    /// Queues an error response after which the connection is closed.
    pub(super) fn fail(&mut self, status: Status, now: Instant, limits: &Limits) {
        self.filled = 0;
        self.pending_parse = false;
        self.out.clear();
        self.sent = 0;
        write_reply(&mut self.out, status.plain(false, true));
        self.phase = Phase::Respond { close: true };
        self.deadline = now + limits.write_deadline;
    }

    /// Makes all the progress the socket allows, until it would block or
    /// has answered [`REQUESTS_PER_DRIVE`] requests. `drain` is scratch
    /// space for input read only to be discarded.
    pub(super) fn drive(
        &mut self,
        now: Instant,
        limits: &Limits,
        serve: &mut Serve<'_, '_>,
        drain: &mut [u8],
    ) -> Next {
        self.answered = 0;
        loop {
            let step = match self.phase {
                Phase::Head => self.read_head(now, limits, serve),
                // Whatever the client sends meanwhile waits in the socket.
                Phase::Authorizing { .. } => ControlFlow::Break(Next::Keep),
                Phase::Respond { close } => self.write_response(close, now, limits),
                Phase::Linger => ControlFlow::Break(self.discard_input(drain)),
            };
            if let ControlFlow::Break(next) = step {
                return next;
            }
        }
    }

    /// One step of [`Phase::Head`]: parses what arrived if it may complete or
    /// break the head, else reads more. `Continue` when there may be more to
    /// do at once.
    fn read_head(
        &mut self,
        now: Instant,
        limits: &Limits,
        serve: &mut Serve<'_, '_>,
    ) -> ControlFlow<Next> {
        if self.answered >= REQUESTS_PER_DRIVE {
            // Whatever waits, in `head` or in the socket, waits a round.
            return ControlFlow::Break(Next::Again);
        }
        if self.pending_parse {
            self.pending_parse = false;
            if self.parse_head(now, limits, serve) {
                return ControlFlow::Continue(());
            }
            if matches!(self.phase, Phase::Authorizing { .. }) {
                return ControlFlow::Break(Next::Keep);
            }
        }
        if self.filled == self.head.len() {
            // Unreachable (a full buffer is always parsed, and then too large
            // or complete), but a read into an empty slice would look like the
            // client closing.
            self.fail(Status::HeadTooLarge, now, limits);
            return ControlFlow::Continue(());
        }
        let filled = self.filled;
        match self.io.read(&mut self.head[filled..]) {
            // The client closed; a half-sent request has no one to answer to.
            Ok(0) => ControlFlow::Break(Next::Close),
            Ok(n) => {
                let new = &self.head[filled..filled + n];
                let line_end = new.contains(&b'\n');
                self.filled += n;
                // Parse when a line completed (a header can be checked), while
                // the request line is still coming (garbage fails early), or
                // when the buffer is full. Not on every byte of a trickled
                // header: that would be quadratic in the head size.
                self.pending_parse =
                    line_end || !self.saw_newline || self.filled == self.head.len();
                self.saw_newline |= line_end;
                ControlFlow::Continue(())
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => ControlFlow::Break(Next::Keep),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => ControlFlow::Continue(()),
            Err(_) => ControlFlow::Break(Next::Close),
        }
    }

    /// Examines `head[..filled]`; true when that queued a response (to the
    /// request, its refusal, or the error that closes the connection) and
    /// moved the connection on to [`Phase::Respond`]. A request whose
    /// password is being checked moves it to [`Phase::Authorizing`] instead
    /// (false).
    fn parse_head(&mut self, now: Instant, limits: &Limits, serve: &mut Serve<'_, '_>) -> bool {
        let full = self.filled == self.head.len();
        match examine(&self.head[..self.filled], full) {
            Examined::Partial => false,
            Examined::Complete { len, request } => {
                let verdict = match serve.gate.as_deref_mut() {
                    Some(gate) if !matches!(request.route, Route::Healthz | Route::Readyz) => {
                        if gate.admit_request(now) {
                            let header = request
                                .authorization
                                .and_then(|(start, end)| self.head[..len].get(start..end));
                            gate.decide((serve.slot, self.id), self.peer, header)
                        } else {
                            Verdict::Limited
                        }
                    }
                    _ => Verdict::Pass,
                };
                self.consume(len);
                self.answered += 1;
                if verdict == Verdict::Pending {
                    self.phase = Phase::Authorizing { request };
                    self.deadline = now + limits.head_deadline;
                    return false;
                }
                self.answer(&request, verdict, now, limits, serve.responder);
                true
            }
            Examined::TooLarge => {
                self.fail(Status::HeadTooLarge, now, limits);
                true
            }
            Examined::Malformed => {
                self.fail(Status::BadRequest, now, limits);
                true
            }
        }
    }

    /// Queues the response to `request` when `verdict` passes it, else its
    /// refusal, and moves on to [`Phase::Respond`].
    fn answer(
        &mut self,
        request: &Request,
        verdict: Verdict,
        now: Instant,
        limits: &Limits,
        responder: &mut Responder<'_>,
    ) {
        self.out.clear();
        self.sent = 0;
        let close = match verdict {
            Verdict::Pass => responder.respond(request, now, &mut self.out),
            Verdict::Unauthorized => responder.refuse(request, Status::Unauthorized, &mut self.out),
            Verdict::Limited | Verdict::Pending => {
                responder.refuse(request, Status::TooManyRequests, &mut self.out)
            }
        };
        self.phase = Phase::Respond { close };
        self.deadline = now + limits.write_deadline;
    }

    /// The password check of the request this connection waits with has
    /// answered: queue its response or refusal. False if it was not waiting
    /// (a check that answered after its deadline).
    pub(super) fn checked(
        &mut self,
        verdict: Verdict,
        now: Instant,
        limits: &Limits,
        responder: &mut Responder<'_>,
    ) -> bool {
        let Phase::Authorizing { request } = self.phase else {
            return false;
        };
        self.answer(&request, verdict, now, limits, responder);
        true
    }

    /// One step of [`Phase::Respond`]: writes what is left of `out`; then
    /// shuts the write side (`close`) or goes back to reading a head, where
    /// a pipelined request may already be waiting.
    fn write_response(&mut self, close: bool, now: Instant, limits: &Limits) -> ControlFlow<Next> {
        while self.sent < self.out.len() {
            match self.io.write(&self.out[self.sent..]) {
                Ok(0) => return ControlFlow::Break(Next::Close),
                Ok(n) => self.sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return ControlFlow::Break(Next::Keep)
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return ControlFlow::Break(Next::Close),
            }
        }
        // TLS records of the response may still wait for the socket.
        match self.io.flush() {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                return ControlFlow::Break(Next::Keep)
            }
            Err(_) => return ControlFlow::Break(Next::Close),
        }
        self.out.clear();
        self.sent = 0;
        if close {
            // FIN after the response; then linger for the client's.
            self.io.shutdown_write();
            return ControlFlow::Break(Next::Linger);
        }
        self.phase = Phase::Head;
        self.deadline = now + limits.head_deadline;
        self.pending_parse = self.filled > 0;
        ControlFlow::Continue(())
    }

    /// [`Phase::Linger`]: reads input into `drain` and drops it, until the
    /// client closes, the socket would block, or the budget of this wake-up
    /// is spent.
    fn discard_input(&mut self, drain: &mut [u8]) -> Next {
        let mut budget = LINGER_READ_BUDGET;
        loop {
            // Raw bytes: on TLS, the records are dropped undecrypted.
            match self.io.socket().read(drain) {
                Ok(0) => return Next::Close,
                Ok(n) => {
                    budget = budget.saturating_sub(n);
                    if budget == 0 {
                        return Next::Keep;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Next::Keep,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Next::Close,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::request::{Request, Route};
    use super::*;

    fn complete(buf: &[u8]) -> (usize, Request) {
        match examine(buf, false) {
            Examined::Complete { len, request } => (len, request),
            other => panic!("{other:?} for {:?}", String::from_utf8_lossy(buf)),
        }
    }

    #[test]
    fn pipelined_requests_are_consumed_one_by_one() {
        let two = b"GET /healthz HTTP/1.1\r\n\r\nGET /readyz HTTP/1.1\r\n\r\n";
        let mut buf = vec![0u8; 64];
        buf[..two.len()].copy_from_slice(two);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let mut conn = Conn {
            io: Transport::Plain(mio::net::TcpStream::from_std(client)),
            id: 0,
            peer: IpAddr::from([127, 0, 0, 1]),
            round: 0,
            budget: Budget::Serving,
            phase: Phase::Head,
            deadline: Instant::now(),
            head: buf.into_boxed_slice(),
            filled: two.len(),
            saw_newline: true,
            pending_parse: true,
            out: Vec::new(),
            sent: 0,
            answered: 0,
        };
        let (len, r) = complete(&conn.head[..conn.filled]);
        assert_eq!(r.route, Route::Healthz);
        conn.consume(len);
        assert_eq!(conn.filled, two.len() - len);
        assert!(conn.pending_parse && conn.saw_newline);
        let (len, r) = complete(&conn.head[..conn.filled]);
        assert_eq!(r.route, Route::Readyz);
        conn.consume(len);
        assert_eq!(conn.filled, 0);
        assert!(!conn.pending_parse && !conn.saw_newline);
    }
}
