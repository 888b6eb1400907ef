//! The scrape endpoint: a small HTTP/1.x server for `/metrics`, `/healthz` and
//! `/readyz`, run by the exporter thread on one `mio` poll.
//!
//! Owns: the listening socket, every client connection and its buffers, the
//! parsing of request heads (httparse, zero-copy, borrowed from the connection's
//! buffer), content negotiation (Prometheus text 0.0.4 or OpenMetrics 1.0.0,
//! gzip or identity), and the limits that keep a hostile or broken client from
//! hurting the exporter:
//!
//! - a request head is at most [`Limits::max_head_bytes`] (431, then close);
//!   a malformed head gets 400, then close; a request body is never read (413,
//!   then close); methods other than GET and HEAD get 405, then close;
//! - the head must arrive within [`Limits::head_deadline`] of the accept (or of
//!   the end of the previous response on a kept-alive connection): an idle
//!   connection is then closed, a half-sent request gets 408, then close;
//! - a response must be taken by the client within [`Limits::write_deadline`],
//!   or the connection is dropped;
//! - at most [`Limits::max_connections`] connections are served at once. When a
//!   new one arrives at the cap, the connection that has waited longest for its
//!   request head is evicted (idle sockets cannot lock scrapers out); when every
//!   served connection is busy with a response, the newcomer gets 503 and close.
//!   Connections on their way out (response sent, waiting for the client to
//!   close) are counted apart, under the same cap; past both, a newcomer is
//!   answered 503 on a best-effort write and closed at once.
//!
//! A connection that is closed after a response first shuts its write side and
//! then discards what the client still sends until the client closes or the
//! head deadline passes ("lingering close"): closing a socket with unread input
//! makes the kernel send a reset, which can destroy the response before the
//! client has read it.
//!
//! Every socket is non-blocking and edge-triggered; reads go on until
//! `WouldBlock` and output is buffered per connection, so a client that stops
//! reading only stalls itself. Timeouts come from the poll timeout (the nearest
//! deadline), not from a timer thread.
//!
//! Never: runs on the per-event reader thread, blocks on a socket, starts a
//! thread, keeps more than the head limit of a request, accepts a request
//! body, or reads the shards itself: the caller's renderer does, once per
//! `/metrics` request.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use flate2::write::GzEncoder;
use flate2::Compression;
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Registry, Token, Waker};

/// The exposition format of a `/metrics` response, chosen from the request's
/// `Accept` header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// Prometheus text 0.0.4, the default.
    Prometheus,
    /// OpenMetrics 1.0.0, when the scraper asks for `application/openmetrics-text`.
    OpenMetrics,
}

impl Format {
    /// The `Content-Type` of a response in this format.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Prometheus => "text/plain; version=0.0.4; charset=utf-8",
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }
}

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
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_head_bytes: 8 * 1024,
            head_deadline: Duration::from_secs(5),
            write_deadline: Duration::from_secs(10),
            max_connections: 64,
        }
    }
}

/// The bound, not yet serving, scrape endpoint. [`Endpoint::run`] serves it on
/// the calling thread.
#[derive(Debug)]
pub struct Endpoint {
    poll: Poll,
    listener: TcpListener,
    local_addr: SocketAddr,
    limits: Limits,
    stop: Arc<AtomicBool>,
    /// Kept as long as the poll: if the last handle dropped the waker while
    /// its wake-up was still unread, closing its eventfd would take the
    /// event out of the poll, and `run` would never see the stop.
    _waker: Arc<Waker>,
}

/// Stops a running [`Endpoint`] from any thread.
#[derive(Clone, Debug)]
pub struct StopHandle {
    stop: Arc<AtomicBool>,
    waker: Arc<Waker>,
}

impl StopHandle {
    /// Makes [`Endpoint::run`] return `Ok(())` promptly, closing every
    /// connection. Stopping before `run` starts makes it return at once.
    pub fn stop(&self) {
        // Release pairs with the Acquire load in `run`; the wake-up is what
        // makes `run` look, the flag is what it finds.
        self.stop.store(true, Ordering::Release);
        // A failed wake-up (the eventfd is full) means one is already pending.
        let _ = self.waker.wake();
    }
}

const LISTENER: Token = Token(0);
const WAKER: Token = Token(1);
/// Connection `i` of the slab is registered as `Token(FIRST_CONN + i)`.
const FIRST_CONN: usize = 2;
/// Readiness events taken per poll.
const EVENTS: usize = 256;
/// Most header lines in a request head; more is answered 431.
const MAX_HEADERS: usize = 64;
/// Bytes discarded per wake-up from a connection that is being closed, so a
/// client flooding it cannot keep the thread from the others.
const LINGER_READ_BUDGET: usize = 64 * 1024;
/// Size of the scratch buffer those bytes are read into.
const DRAIN_CHUNK: usize = 16 * 1024;
/// When `accept` fails for want of resources (file descriptors, memory), the
/// pending connections stay queued and no new readiness event may come:
/// try again after this long.
const ACCEPT_RETRY: Duration = Duration::from_millis(50);

impl Endpoint {
    /// Binds the listening socket (with `SO_REUSEADDR`, and mio's listen
    /// backlog of 128) and returns the endpoint and the handle that stops it.
    /// Fails with `InvalidInput` when `max_connections` or `max_head_bytes` is
    /// zero.
    pub fn bind(addr: SocketAddr, limits: Limits) -> io::Result<(Endpoint, StopHandle)> {
        if limits.max_connections == 0 || limits.max_head_bytes == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "max_connections and max_head_bytes must be at least 1",
            ));
        }
        let poll = Poll::new()?;
        let mut listener = TcpListener::bind(addr)?;
        let local_addr = listener.local_addr()?;
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let stop = Arc::new(AtomicBool::new(false));
        let handle = StopHandle {
            stop: Arc::clone(&stop),
            waker: Arc::clone(&waker),
        };
        let endpoint = Endpoint {
            poll,
            listener,
            local_addr,
            limits,
            stop,
            _waker: waker,
        };
        Ok((endpoint, handle))
    }

    /// The address the endpoint listens on (with the real port when bound to
    /// port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Serves until stopped. `render` appends the exposition body for the
    /// format to the Vec (called once per `/metrics` request, GET or HEAD, on
    /// this thread, with an empty Vec); `ready` answers `/readyz`.
    ///
    /// Returns `Ok(())` after [`StopHandle::stop`], or the error of the poll
    /// itself; errors on single connections only close those.
    pub fn run(
        self,
        render: &mut dyn FnMut(Format, &mut Vec<u8>),
        ready: &dyn Fn() -> bool,
    ) -> io::Result<()> {
        let Endpoint {
            mut poll,
            listener,
            limits,
            stop,
            ..
        } = self;
        let mut events = Events::with_capacity(EVENTS);
        let mut server = Server {
            limits,
            conns: Vec::new(),
            free: Vec::new(),
            serving: 0,
            closing: 0,
            accept_retry: None,
        };
        let mut responder = Responder {
            render,
            ready,
            body: Vec::new(),
            gz: Vec::new(),
            drain: vec![0; DRAIN_CHUNK],
            refusal: Vec::new(),
        };
        loop {
            // Acquire pairs with the Release store in `StopHandle::stop`.
            if stop.load(Ordering::Acquire) {
                return Ok(());
            }
            let now = Instant::now();
            let timeout = server
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
                    LISTENER => server.accept_all(&listener, registry, now, &mut responder),
                    Token(t) => server.drive_slot(t - FIRST_CONN, registry, now, &mut responder),
                }
            }
            if server.accept_retry.is_some_and(|at| at <= now) {
                server.accept_retry = None;
                server.accept_all(&listener, registry, now, &mut responder);
            }
            server.expire(registry, now, &mut responder);
        }
    }
}

/// Which cap a connection counts against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Budget {
    /// Being served: waiting for a request head or writing a response.
    Serving,
    /// On its way out: a refusal being written, or a lingering close.
    Closing,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Reading a request head into `head`.
    Head,
    /// Writing `out`; then the next request, or the lingering close.
    Respond { close: bool },
    /// Write side shut; discarding input until the client closes.
    Linger,
}

/// What the connection needs after it has made all the progress it can.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Next {
    /// Wait for readiness or the deadline.
    Keep,
    /// Drop it now.
    Close,
    /// Its last response is sent and its write side shut: linger if there is
    /// room among closing connections, else drop it.
    Linger,
}

struct Conn {
    stream: TcpStream,
    budget: Budget,
    phase: Phase,
    /// When the current phase has to be over.
    deadline: Instant,
    /// The request head buffer, `max_head_bytes` long (empty for refusals,
    /// which never read a head); `head[..filled]` is what has been read.
    head: Box<[u8]>,
    filled: usize,
    /// `head[..filled]` holds a line end, so the request line is complete.
    saw_newline: bool,
    /// Bytes arrived that may complete, or break, the head.
    pending_parse: bool,
    /// The response being written; `out[..sent]` is written.
    out: Vec<u8>,
    sent: usize,
}

impl Conn {
    /// Removes the first request's `len` bytes, keeping what a pipelining
    /// client sent after it.
    fn consume(&mut self, len: usize) {
        self.head.copy_within(len..self.filled, 0);
        self.filled -= len;
        self.saw_newline = self.head[..self.filled].contains(&b'\n');
        self.pending_parse = self.filled > 0;
    }

    /// Queues an error response after which the connection is closed.
    fn fail(&mut self, status: Status, now: Instant, limits: &Limits) {
        self.filled = 0;
        self.pending_parse = false;
        self.out.clear();
        self.sent = 0;
        write_reply(&mut self.out, status.plain(false, true));
        self.phase = Phase::Respond { close: true };
        self.deadline = now + limits.write_deadline;
    }

    /// Makes all the progress the socket allows, until it would block.
    fn drive(&mut self, now: Instant, limits: &Limits, responder: &mut Responder<'_>) -> Next {
        loop {
            match self.phase {
                Phase::Head => {
                    if self.pending_parse {
                        self.pending_parse = false;
                        let full = self.filled == self.head.len();
                        match examine(&self.head[..self.filled], full) {
                            Examined::Partial => {}
                            Examined::Complete { len, request } => {
                                self.consume(len);
                                self.out.clear();
                                self.sent = 0;
                                let close = responder.respond(&request, &mut self.out);
                                self.phase = Phase::Respond { close };
                                self.deadline = now + limits.write_deadline;
                                continue;
                            }
                            Examined::TooLarge => {
                                self.fail(Status::HeadTooLarge, now, limits);
                                continue;
                            }
                            Examined::Malformed => {
                                self.fail(Status::BadRequest, now, limits);
                                continue;
                            }
                        }
                    }
                    if self.filled == self.head.len() {
                        // Unreachable (a full buffer is always parsed, and
                        // then too large or complete), but a read into an
                        // empty slice would look like the client closing.
                        self.fail(Status::HeadTooLarge, now, limits);
                        continue;
                    }
                    let filled = self.filled;
                    match (&self.stream).read(&mut self.head[filled..]) {
                        // The client closed; a half-sent request has no one
                        // to answer to.
                        Ok(0) => return Next::Close,
                        Ok(n) => {
                            let new = &self.head[filled..filled + n];
                            let line_end = new.contains(&b'\n');
                            self.filled += n;
                            // Parse when a line completed (a header can be
                            // checked), while the request line is still coming
                            // (garbage fails early), or when the buffer is full.
                            // Not on every byte of a trickled header: that
                            // would be quadratic in the head size.
                            self.pending_parse =
                                line_end || !self.saw_newline || self.filled == self.head.len();
                            self.saw_newline |= line_end;
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Next::Keep,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(_) => return Next::Close,
                    }
                }
                Phase::Respond { close } => {
                    while self.sent < self.out.len() {
                        match (&self.stream).write(&self.out[self.sent..]) {
                            Ok(0) => return Next::Close,
                            Ok(n) => self.sent += n,
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Next::Keep,
                            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                            Err(_) => return Next::Close,
                        }
                    }
                    self.out.clear();
                    self.sent = 0;
                    if close {
                        // FIN after the response; then linger for the client's.
                        let _ = self.stream.shutdown(Shutdown::Write);
                        return Next::Linger;
                    }
                    self.phase = Phase::Head;
                    self.deadline = now + limits.head_deadline;
                    self.pending_parse = self.filled > 0;
                }
                Phase::Linger => {
                    let mut budget = LINGER_READ_BUDGET;
                    loop {
                        match (&self.stream).read(&mut responder.drain) {
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
        }
    }
}

/// The connections of a running endpoint.
struct Server {
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
}

impl Server {
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
            Conn {
                stream,
                budget: Budget::Serving,
                phase: Phase::Head,
                deadline: now + self.limits.head_deadline,
                head: vec![0; self.limits.max_head_bytes].into_boxed_slice(),
                filled: 0,
                saw_newline: false,
                pending_parse: false,
                out: Vec::new(),
                sent: 0,
            }
        } else if self.closing < max {
            self.closing += 1;
            let mut out = Vec::new();
            write_reply(&mut out, Status::Busy.plain(false, true));
            Conn {
                stream,
                budget: Budget::Closing,
                phase: Phase::Respond { close: true },
                deadline: now + self.limits.write_deadline,
                head: Box::default(),
                filled: 0,
                saw_newline: false,
                pending_parse: false,
                out,
                sent: 0,
            }
        } else {
            responder.refuse(stream);
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
            match conn.drive(now, &self.limits, responder) {
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

/// Turns requests into responses; the buffers are reused across requests.
struct Responder<'r> {
    render: &'r mut dyn FnMut(Format, &mut Vec<u8>),
    ready: &'r dyn Fn() -> bool,
    /// The rendered exposition body.
    body: Vec<u8>,
    /// `body` compressed.
    gz: Vec<u8>,
    /// Where lingering connections' input is read and discarded.
    drain: Vec<u8>,
    /// The 503 of a connection refused without a slot.
    refusal: Vec<u8>,
}

impl Responder<'_> {
    /// Appends the response to `request` to `out`; returns whether the
    /// connection is closed after it.
    fn respond(&mut self, request: &Request, out: &mut Vec<u8>) -> bool {
        let head_only = request.method == Method::Head;
        let close = !request.keep_alive;
        match request.method {
            Method::Other => {
                write_reply(out, Status::MethodNotAllowed.plain(false, true));
                return true;
            }
            Method::Get | Method::Head => {}
        }
        if request.has_body {
            write_reply(out, Status::BodyRefused.plain(head_only, true));
            return true;
        }
        let reply = match request.route {
            Route::Metrics => {
                self.body.clear();
                (self.render)(request.format, &mut self.body);
                let gzip = request.gzip && self.compress();
                Reply {
                    status: Status::Ok,
                    content_type: request.format.content_type(),
                    body: if gzip { &self.gz } else { &self.body },
                    gzip,
                    negotiated: true,
                    head_only,
                    close,
                }
            }
            Route::Healthz => Status::Ok.plain(head_only, close),
            Route::Readyz if (self.ready)() => Status::Ok.plain(head_only, close),
            Route::Readyz => Status::NotReady.plain(head_only, close),
            Route::NotFound => Status::NotFound.plain(head_only, close),
        };
        write_reply(out, reply);
        close
    }

    /// Compresses `body` into `gz`; false if that failed (then the response
    /// goes out uncompressed).
    fn compress(&mut self) -> bool {
        let mut gz = std::mem::take(&mut self.gz);
        gz.clear();
        // The fastest level: the exposition text compresses well anyway, and
        // this thread also merges the shards for every scrape.
        let mut encoder = GzEncoder::new(gz, Compression::fast());
        if encoder.write_all(&self.body).is_err() {
            return false;
        }
        match encoder.finish() {
            Ok(gz) => {
                self.gz = gz;
                true
            }
            Err(_) => false,
        }
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
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Status {
    Ok,
    BadRequest,
    NotFound,
    MethodNotAllowed,
    Timeout,
    BodyRefused,
    HeadTooLarge,
    NotReady,
    Busy,
}

impl Status {
    fn line(self) -> &'static str {
        match self {
            Status::Ok => "200 OK",
            Status::BadRequest => "400 Bad Request",
            Status::NotFound => "404 Not Found",
            Status::MethodNotAllowed => "405 Method Not Allowed",
            Status::Timeout => "408 Request Timeout",
            Status::BodyRefused => "413 Content Too Large",
            Status::HeadTooLarge => "431 Request Header Fields Too Large",
            Status::NotReady | Status::Busy => "503 Service Unavailable",
        }
    }

    /// The short text body of everything but `/metrics`.
    fn text(self) -> &'static [u8] {
        match self {
            Status::Ok => b"ok\n",
            Status::BadRequest => b"malformed request\n",
            Status::NotFound => b"not found; the metrics are at /metrics\n",
            Status::MethodNotAllowed => b"only GET and HEAD\n",
            Status::Timeout => b"request head not received in time\n",
            Status::BodyRefused => b"request bodies are not accepted\n",
            Status::HeadTooLarge => b"request head too large\n",
            Status::NotReady => b"not ready\n",
            Status::Busy => b"too many connections\n",
        }
    }

    fn plain(self, head_only: bool, close: bool) -> Reply<'static> {
        Reply {
            status: self,
            content_type: "text/plain; charset=utf-8",
            body: self.text(),
            gzip: false,
            negotiated: false,
            head_only,
            close,
        }
    }
}

struct Reply<'a> {
    status: Status,
    content_type: &'static str,
    body: &'a [u8],
    gzip: bool,
    /// Content type and encoding depend on `Accept` and `Accept-Encoding`.
    negotiated: bool,
    /// A HEAD request: headers as for GET, no body.
    head_only: bool,
    close: bool,
}

/// Appends the response to `out`: always with `Content-Length`, always
/// `HTTP/1.1` (which a 1.0 client accepts).
fn write_reply(out: &mut Vec<u8>, r: Reply<'_>) {
    // Writing into a Vec cannot fail.
    let _ = write!(
        out,
        "HTTP/1.1 {}\r\nContent-Type: {}\r\nContent-Length: {}\r\n",
        r.status.line(),
        r.content_type,
        r.body.len()
    );
    if r.gzip {
        out.extend_from_slice(b"Content-Encoding: gzip\r\n");
    }
    if r.negotiated {
        out.extend_from_slice(b"Vary: Accept, Accept-Encoding\r\n");
    }
    if r.status == Status::MethodNotAllowed {
        out.extend_from_slice(b"Allow: GET, HEAD\r\n");
    }
    if r.status == Status::Busy {
        out.extend_from_slice(b"Retry-After: 1\r\n");
    }
    if r.close {
        out.extend_from_slice(b"Connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    if !r.head_only {
        out.extend_from_slice(r.body);
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Method {
    Get,
    Head,
    Other,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Route {
    Metrics,
    Healthz,
    Readyz,
    NotFound,
}

/// What the server needs from a request head, copied out of the borrowed
/// httparse view so the buffer can be reused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Request {
    method: Method,
    route: Route,
    format: Format,
    gzip: bool,
    keep_alive: bool,
    /// `Content-Length` above zero or any `Transfer-Encoding`.
    has_body: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Examined {
    /// Valid so far; more bytes needed.
    Partial,
    /// Not complete within the head limit, or too many header lines.
    TooLarge,
    /// Not an HTTP/1.x request head.
    Malformed,
    /// A whole head of `len` bytes; what follows belongs to the next request.
    Complete { len: usize, request: Request },
}

/// Parses the request head at the start of `buf`. `full` says `buf` is as
/// long as the head limit allows, so an incomplete head is too large.
fn examine(buf: &[u8], full: bool) -> Examined {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut headers);
    match parsed.parse(buf) {
        Ok(httparse::Status::Complete(len)) => match Request::from_parsed(&parsed) {
            Some(request) => Examined::Complete { len, request },
            None => Examined::Malformed,
        },
        Ok(httparse::Status::Partial) if full => Examined::TooLarge,
        Ok(httparse::Status::Partial) => Examined::Partial,
        Err(httparse::Error::TooManyHeaders) => Examined::TooLarge,
        Err(_) => Examined::Malformed,
    }
}

impl Request {
    /// None for a head httparse accepts but this server cannot trust (an
    /// unreadable `Content-Length`).
    fn from_parsed(parsed: &httparse::Request<'_, '_>) -> Option<Request> {
        let method = match parsed.method? {
            "GET" => Method::Get,
            "HEAD" => Method::Head,
            _ => Method::Other,
        };
        let path = parsed.path?;
        let path = path.split_once('?').map_or(path, |(p, _)| p);
        let route = match path {
            "/metrics" => Route::Metrics,
            "/healthz" => Route::Healthz,
            "/readyz" => Route::Readyz,
            _ => Route::NotFound,
        };
        let mut keep_alive = parsed.version? == 1;
        let mut has_body = false;
        let mut om_q = 0.0f32;
        let mut text_q = 0.0f32;
        let mut coding = Coding::default();
        for header in parsed.headers.iter() {
            let name = header.name;
            // A value that is not UTF-8 is ignored, as if absent.
            let value = std::str::from_utf8(header.value).unwrap_or("");
            if name.eq_ignore_ascii_case("accept") {
                accept_q(value, &mut om_q, &mut text_q);
            } else if name.eq_ignore_ascii_case("accept-encoding") {
                coding.add(value);
            } else if name.eq_ignore_ascii_case("connection") {
                if value
                    .split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("close"))
                {
                    keep_alive = false;
                }
            } else if name.eq_ignore_ascii_case("content-length") {
                let value = value.trim();
                if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
                    return None;
                }
                has_body |= value.bytes().any(|b| b != b'0');
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                has_body = true;
            }
        }
        Some(Request {
            method,
            route,
            format: choose_format(om_q, text_q),
            gzip: coding.gzip(),
            keep_alive,
            has_body,
        })
    }
}

/// OpenMetrics when the client accepts it (`q > 0`, any version) at least as
/// much as it accepts `text/plain`; Prometheus text otherwise. Wildcards do
/// not ask for OpenMetrics: the plain text is the default.
fn choose_format(om_q: f32, text_q: f32) -> Format {
    if om_q > 0.0 && om_q >= text_q {
        Format::OpenMetrics
    } else {
        Format::Prometheus
    }
}

/// Folds one `Accept` value into the highest `q` given to
/// `application/openmetrics-text` and to `text/plain`.
fn accept_q(value: &str, om_q: &mut f32, text_q: &mut f32) {
    for range in value.split(',') {
        let (media, params) = range.split_once(';').unwrap_or((range, ""));
        let media = media.trim();
        let q = q_param(params);
        if media.eq_ignore_ascii_case("application/openmetrics-text") {
            *om_q = om_q.max(q);
        } else if media.eq_ignore_ascii_case("text/plain") {
            *text_q = text_q.max(q);
        }
    }
}

/// The `q` parameter among `;`-separated parameters: 1 when absent, 0 when
/// unreadable (an unreadable preference is not a request).
fn q_param(params: &str) -> f32 {
    for param in params.split(';') {
        let Some((name, value)) = param.split_once('=') else {
            continue;
        };
        if name.trim().eq_ignore_ascii_case("q") {
            return match value.trim().parse::<f32>() {
                Ok(q) if (0.0..=1.0).contains(&q) => q,
                _ => 0.0,
            };
        }
    }
    1.0
}

/// What `Accept-Encoding` says about gzip.
#[derive(Clone, Copy, Debug, Default)]
struct Coding {
    /// Highest `q` of `gzip` or `x-gzip`, if named.
    gzip_q: Option<f32>,
    /// Highest `q` of `*`, if named.
    any_q: Option<f32>,
}

impl Coding {
    fn add(&mut self, value: &str) {
        for coding in value.split(',') {
            let (name, params) = coding.split_once(';').unwrap_or((coding, ""));
            let name = name.trim();
            let q = q_param(params);
            let slot = if name.eq_ignore_ascii_case("gzip") || name.eq_ignore_ascii_case("x-gzip") {
                &mut self.gzip_q
            } else if name == "*" {
                &mut self.any_q
            } else {
                continue;
            };
            *slot = Some(slot.map_or(q, |old| old.max(q)));
        }
    }

    /// gzip named with `q > 0`, or not named and `*` with `q > 0`.
    fn gzip(self) -> bool {
        match (self.gzip_q, self.any_q) {
            (Some(q), _) => q > 0.0,
            (None, Some(q)) => q > 0.0,
            (None, None) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn format_for(accept: &str) -> Format {
        let (mut om, mut text) = (0.0, 0.0);
        accept_q(accept, &mut om, &mut text);
        choose_format(om, text)
    }

    fn gzip_for(values: &[&str]) -> bool {
        let mut coding = Coding::default();
        for v in values {
            coding.add(v);
        }
        coding.gzip()
    }

    fn complete(buf: &[u8]) -> (usize, Request) {
        match examine(buf, false) {
            Examined::Complete { len, request } => (len, request),
            other => panic!("{other:?} for {:?}", String::from_utf8_lossy(buf)),
        }
    }

    #[test]
    fn accept_headers_of_real_scrapers() {
        // Prometheus 2.x default.
        assert_eq!(
            format_for(
                "application/openmetrics-text;version=1.0.0;q=0.5,\
                 application/openmetrics-text;version=0.0.1;q=0.4,\
                 text/plain;version=0.0.4;q=0.3,*/*;q=0.2"
            ),
            Format::OpenMetrics
        );
        // Prometheus 3 default.
        assert_eq!(
            format_for(
                "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.6,\
                 application/openmetrics-text;version=0.0.1;q=0.5,\
                 text/plain;version=1.0.0;escaping=allow-utf-8;q=0.4,\
                 text/plain;version=0.0.4;q=0.3,*/*;q=0.2"
            ),
            Format::OpenMetrics
        );
        // Prometheus with `scrape_protocols: [PrometheusText0.0.4, ...]`.
        assert_eq!(
            format_for(
                "text/plain;version=0.0.4;q=0.5,application/openmetrics-text;version=1.0.0;q=0.4"
            ),
            Format::Prometheus
        );
        // curl, browsers, no header at all.
        assert_eq!(format_for("*/*"), Format::Prometheus);
        assert_eq!(
            format_for("text/html,application/xhtml+xml,*/*;q=0.8"),
            Format::Prometheus
        );
        assert_eq!(format_for(""), Format::Prometheus);
    }

    #[test]
    fn accept_openmetrics_edge_cases() {
        assert_eq!(
            format_for("application/openmetrics-text"),
            Format::OpenMetrics
        );
        assert_eq!(
            format_for("Application/OpenMetrics-Text; Version=0.0.1"),
            Format::OpenMetrics
        );
        assert_eq!(
            format_for(" application/openmetrics-text ; q = 0.1 "),
            Format::OpenMetrics
        );
        assert_eq!(
            format_for("application/openmetrics-text;q=0"),
            Format::Prometheus
        );
        assert_eq!(
            format_for("application/openmetrics-text;q=0.000"),
            Format::Prometheus
        );
        assert_eq!(
            format_for("application/openmetrics-text;q=nonsense"),
            Format::Prometheus
        );
        assert_eq!(
            format_for("application/openmetrics-text;q=2"),
            Format::Prometheus
        );
        // A tie goes to OpenMetrics: the client named it.
        assert_eq!(
            format_for("text/plain,application/openmetrics-text"),
            Format::OpenMetrics
        );
        // Wildcards never select it.
        assert_eq!(format_for("application/*"), Format::Prometheus);
    }

    #[test]
    fn accept_encoding() {
        assert!(gzip_for(&["gzip"]));
        assert!(gzip_for(&["gzip, deflate, br"]));
        assert!(gzip_for(&["br;q=1.0, GZIP;q=0.5"]));
        assert!(gzip_for(&["x-gzip"]));
        assert!(gzip_for(&["*"]));
        assert!(gzip_for(&["identity", "gzip"]));
        assert!(!gzip_for(&[]));
        assert!(!gzip_for(&["identity"]));
        assert!(!gzip_for(&["deflate, br"]));
        assert!(!gzip_for(&["gzip;q=0"]));
        assert!(!gzip_for(&["gzip;q=0.0, *"]));
        assert!(!gzip_for(&["*;q=0"]));
        assert!(!gzip_for(&["gzipfoo"]));
        assert!(!gzip_for(&["gzip;q=x"]));
    }

    #[test]
    fn request_fields() {
        let head =
            b"GET /metrics?x=1 HTTP/1.1\r\nHost: a\r\nAccept: application/openmetrics-text\r\n\
              Accept-Encoding: gzip\r\n\r\n";
        let mut with_next = head.to_vec();
        with_next.extend_from_slice(b"GET /next");
        let (len, r) = complete(&with_next);
        assert_eq!(len, head.len());
        assert_eq!(r.method, Method::Get);
        assert_eq!(r.route, Route::Metrics);
        assert_eq!(r.format, Format::OpenMetrics);
        assert!(r.gzip && r.keep_alive && !r.has_body);

        let (_, r) = complete(b"HEAD /healthz HTTP/1.0\r\n\r\n");
        assert_eq!(
            (r.method, r.route, r.keep_alive),
            (Method::Head, Route::Healthz, false)
        );
        let (_, r) = complete(b"GET /readyz HTTP/1.1\r\nConnection: Keep-Alive, Close\r\n\r\n");
        assert_eq!((r.route, r.keep_alive), (Route::Readyz, false));
        let (_, r) = complete(b"POST /metrics HTTP/1.1\r\nContent-Length: 3\r\n\r\n");
        assert_eq!((r.method, r.has_body), (Method::Other, true));
        let (_, r) = complete(b"GET / HTTP/1.1\r\nContent-Length: 000\r\n\r\n");
        assert_eq!((r.route, r.has_body), (Route::NotFound, false));
        let (_, r) = complete(b"GET /metricsx HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert_eq!((r.route, r.has_body), (Route::NotFound, true));
        // Bare LF line ends are accepted.
        let (len, _) = complete(b"GET /metrics HTTP/1.1\n\n");
        assert_eq!(len, 23);
    }

    #[test]
    fn malformed_heads() {
        for bad in [
            &b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"[..],
            b"GET /metrics HTTP/2.0\r\n\r\n",
            b"GET /metrics FTP/1.1\r\n\r\n",
            b"GET\t/metrics HTTP/1.1\r\n\r\n",
            b"GET /metrics HTTP/1.1\r\nno colon here\r\n\r\n",
            b"GET /metrics HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
            b"GET /metrics HTTP/1.1\r\nContent-Length: 1, 1\r\n\r\n",
        ] {
            assert_eq!(examine(bad, false), Examined::Malformed, "{bad:?}");
        }
    }

    #[test]
    fn head_size_accounting() {
        let head = b"GET /metrics HTTP/1.1\r\nHost: example\r\n\r\n";
        // Every strict prefix is partial while under the limit, and too large
        // once it fills the buffer.
        for n in 0..head.len() {
            assert_eq!(examine(&head[..n], false), Examined::Partial, "{n}");
            assert_eq!(examine(&head[..n], true), Examined::TooLarge, "{n}");
        }
        // A head exactly as long as the limit is fine.
        assert!(matches!(examine(head, true), Examined::Complete { len, .. } if len == head.len()));

        // Too many header lines count as too large, even if short.
        let mut many = b"GET /metrics HTTP/1.1\r\n".to_vec();
        for _ in 0..=MAX_HEADERS {
            many.extend_from_slice(b"a: b\r\n");
        }
        assert_eq!(examine(&many, false), Examined::TooLarge);
        many.extend_from_slice(b"\r\n");
        assert_eq!(examine(&many, false), Examined::TooLarge);
    }

    #[test]
    fn pipelined_requests_are_consumed_one_by_one() {
        let two = b"GET /healthz HTTP/1.1\r\n\r\nGET /readyz HTTP/1.1\r\n\r\n";
        let mut buf = vec![0u8; 64];
        buf[..two.len()].copy_from_slice(two);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let mut conn = Conn {
            stream: TcpStream::from_std(client),
            budget: Budget::Serving,
            phase: Phase::Head,
            deadline: Instant::now(),
            head: buf.into_boxed_slice(),
            filled: two.len(),
            saw_newline: true,
            pending_parse: true,
            out: Vec::new(),
            sent: 0,
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

    #[test]
    fn replies_carry_length_and_head_has_no_body() {
        let mut get = Vec::new();
        write_reply(
            &mut get,
            Reply {
                status: Status::Ok,
                content_type: Format::OpenMetrics.content_type(),
                body: b"# EOF\n",
                gzip: true,
                negotiated: true,
                head_only: false,
                close: false,
            },
        );
        assert_eq!(
            get,
            b"HTTP/1.1 200 OK\r\n\
              Content-Type: application/openmetrics-text; version=1.0.0; charset=utf-8\r\n\
              Content-Length: 6\r\nContent-Encoding: gzip\r\nVary: Accept, Accept-Encoding\r\n\
              \r\n# EOF\n"
        );
        let mut head = Vec::new();
        write_reply(&mut head, Status::MethodNotAllowed.plain(true, true));
        let text = String::from_utf8(head).unwrap();
        assert!(text.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"));
        assert!(text.contains("Content-Length: 18\r\n"));
        assert!(text.contains("Allow: GET, HEAD\r\n"));
        assert!(text.ends_with("Connection: close\r\n\r\n"));
    }

    #[test]
    fn limits_are_checked_at_bind() {
        let addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
        for limits in [
            Limits {
                max_connections: 0,
                ..Limits::default()
            },
            Limits {
                max_head_bytes: 0,
                ..Limits::default()
            },
        ] {
            let err = Endpoint::bind(addr, limits).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        }
    }
}
