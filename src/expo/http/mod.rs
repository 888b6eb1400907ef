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
//!   answered 503 on a best-effort write and closed at once;
//! - at most [`Limits::max_connections_per_peer`] connections from one IP
//!   address are served at once; a newcomer beyond it gets 503 and close, so
//!   a flood from one address leaves slots for scrapers from others;
//! - a connection answers at most four pipelined requests per wake-up, then
//!   yields to the others and is driven again on the next round;
//! - `/metrics` is rendered at most once per [`Limits::min_render_interval`]
//!   and format; the requests within it get the same bytes (and the same
//!   gzip), so a flood of scrapes costs copies, not renders.
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
//! With a web configuration ([`Endpoint::bind_with`], `--web.config.file`):
//!
//! - with TLS, every connection is TLS (rustls); a client that does not
//!   complete a handshake (plain HTTP, TLS below 1.2, a client certificate
//!   the configuration refuses) is closed without a response, counted in
//!   `http_tls_errors_total`. The handshake counts against the head
//!   deadline;
//! - with users, every request but `/healthz` and `/readyz` (which say no
//!   more than up or down, and which the kubelet probes without
//!   credentials) needs Basic credentials: none or wrong get 401 with
//!   `WWW-Authenticate`; the bcrypt check runs on a thread of its own within
//!   a fixed CPU share, and what it cannot afford gets 429 (`auth`);
//! - the configuration's headers go on every response to a request;
//! - the file is read again on [`StopHandle::reload`] (SIGHUP) and when it
//!   or a file it names changes (`web`).
//!
//! Never: runs on the per-event reader thread, blocks on a socket, starts a
//! thread (but the one password-check thread with a web configuration),
//! keeps more than the head limit of a request, accepts a request
//! body, or reads the shards itself: the caller's renderer does, at most once
//! per `min_render_interval` and format.
//!
//! The public items are [`Endpoint`], [`StopHandle`], [`Limits`] and
//! [`Format`]. The code behind them sits in private modules whose arrows point
//! one way, down this list: a module may use those below it, never one above.
//!
//! - `server`: the poll loop and the slab of connections (accept, dispatch,
//!   eviction, deadlines, refusals beyond both caps, reloads in force);
//! - `web`: the web configuration in force, its file watch and reloads;
//! - `connection`: one client connection (its phases, buffers, budget and
//!   deadline) and the [`Limits`] it is held to;
//! - `auth`: Basic credentials, their caches, the password-check thread;
//! - `transport`: a connection's bytes, plain or TLS;
//! - `response`: statuses, the bytes of a response, and the `Responder` that
//!   renders and compresses a `/metrics` body and keeps it for reuse;
//! - `request`: parsing a request head and negotiating [`Format`] and gzip.

mod auth;
mod connection;
mod request;
mod response;
mod server;
mod transport;
mod web;

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use mio::net::TcpListener;
use mio::{Interest, Poll, Waker};

pub use auth::CHECK_CPU_SHARE;
pub use connection::Limits;
pub use request::Format;
pub use web::WATCH_EVERY;

use crate::expo::web_config::WebConfig;
use auth::Gate;
use response::Responder;
use server::{Secured, Server, LISTENER, WAKER};

/// The bound, not yet serving, scrape endpoint. [`Endpoint::run`] serves it on
/// the calling thread.
#[derive(Debug)]
pub struct Endpoint {
    poll: Poll,
    listener: TcpListener,
    local_addr: SocketAddr,
    limits: Limits,
    stop: Arc<AtomicBool>,
    secured: Option<Secured>,
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
    /// Set to ask for a reload, with a web configuration.
    reload: Option<Arc<AtomicBool>>,
}

impl StopHandle {
    /// Makes [`Endpoint::run`] return `Ok(())` promptly, closing every
    /// connection. Stopping before `run` starts makes it return at once.
    pub fn stop(&self) {
        // Release pairs with the Acquire load in `Server::run`; the wake-up is
        // what makes `run` look, the flag is what it finds.
        self.stop.store(true, Ordering::Release);
        // A failed wake-up (the eventfd is full) means one is already pending.
        let _ = self.waker.wake();
    }

    /// Makes the endpoint read its web configuration file again on its next
    /// turn (a broken file is logged and the configuration in force kept);
    /// false when it runs without one.
    pub fn reload(&self) -> bool {
        let Some(reload) = &self.reload else {
            return false;
        };
        // Release pairs with the Acquire swap in `Watch::look`.
        reload.store(true, Ordering::Release);
        let _ = self.waker.wake();
        true
    }
}

impl Endpoint {
    /// Binds the listening socket (with `SO_REUSEADDR`, and mio's listen
    /// backlog of 128) and returns the endpoint and the handle that stops it.
    /// Fails with `InvalidInput` when `max_connections`,
    /// `max_connections_per_peer` or `max_head_bytes` is zero.
    pub fn bind(addr: SocketAddr, limits: Limits) -> io::Result<(Endpoint, StopHandle)> {
        Endpoint::bind_with(addr, limits, None)
    }

    /// [`Endpoint::bind`], served with the web configuration `web` (read
    /// from the file at its path, which is watched and read again on
    /// [`StopHandle::reload`]). Starts the password-check thread.
    pub fn bind_with(
        addr: SocketAddr,
        limits: Limits,
        web: Option<(PathBuf, WebConfig)>,
    ) -> io::Result<(Endpoint, StopHandle)> {
        if limits.max_connections == 0
            || limits.max_connections_per_peer == 0
            || limits.max_head_bytes == 0
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "max_connections, max_connections_per_peer and max_head_bytes must be at least 1",
            ));
        }
        let poll = Poll::new()?;
        let mut listener = TcpListener::bind(addr)?;
        let local_addr = listener.local_addr()?;
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let stop = Arc::new(AtomicBool::new(false));
        let (secured, reload) = match web {
            Some((path, config)) => {
                let asked = Arc::new(AtomicBool::new(false));
                let gate = Gate::start(
                    Arc::clone(&config.users),
                    config.rate_limit,
                    Arc::clone(&waker),
                )?;
                let watch = web::Watch::new(path, config, Arc::clone(&asked));
                (Some(Secured { watch, gate }), Some(asked))
            }
            None => (None, None),
        };
        let handle = StopHandle {
            stop: Arc::clone(&stop),
            waker: Arc::clone(&waker),
            reload,
        };
        let endpoint = Endpoint {
            poll,
            listener,
            local_addr,
            limits,
            stop,
            secured,
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
    /// format to the Vec (called on this thread, with an empty Vec, for a
    /// `/metrics` request, GET or HEAD, unless that format was rendered less
    /// than `min_render_interval` before); `healthy` answers `/healthz`, and
    /// `/readyz` is 200 only when `ready` and `healthy` both say so.
    ///
    /// Returns `Ok(())` after [`StopHandle::stop`], or the error of the poll
    /// itself; errors on single connections only close those.
    pub fn run(
        self,
        render: &mut dyn FnMut(Format, &mut Vec<u8>),
        ready: &dyn Fn() -> bool,
        healthy: &dyn Fn() -> bool,
    ) -> io::Result<()> {
        // `_waker` stays in `self`, alive until this returns.
        let Endpoint {
            mut poll,
            listener,
            limits,
            stop,
            secured,
            ..
        } = self;
        let reuse_for = limits.min_render_interval;
        let mut responder = Responder::new(render, ready, healthy, reuse_for);
        Server::new(limits, secured).run(&mut poll, &listener, &stop, &mut responder)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
            Limits {
                max_connections_per_peer: 0,
                ..Limits::default()
            },
        ] {
            let err = Endpoint::bind(addr, limits).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        }
    }
}
