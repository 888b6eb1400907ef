//! A `NETLINK_NETFILTER` socket for requests to ctnetlink (dumps of the
//! conntrack table, its statistics): requests out, the kernel's answers
//! in, each receive bounded by a timeout.
//!
//! Owns: the socket (joined to no multicast group, so only the answers to
//! its own requests reach it) and its receive timeout.
//! Never: is used by a reader (a dump takes a lock per hash bucket in the
//! kernel and its answers take milliseconds), or parses what it receives
//! (that is `wire/`).

use std::io;
use std::os::fd::AsRawFd;
use std::time::Duration;

use netlink_sys::{protocols::NETLINK_NETFILTER, Socket};

/// A socket for requests to ctnetlink.
///
/// It keeps netlink-sys' `Socket` (which closes its descriptor when
/// dropped) and never clones it, so the descriptor has one owner.
pub struct RequestSocket {
    socket: Socket,
}

impl RequestSocket {
    /// Opens the socket; every receive gives up after `timeout` without a
    /// datagram (`SO_RCVTIMEO`). Needs CAP_NET_ADMIN in the network
    /// namespace to be answered.
    pub fn open(timeout: Duration) -> io::Result<RequestSocket> {
        let mut socket = Socket::new(NETLINK_NETFILTER)?;
        socket.bind_auto()?;
        let timeval = libc::timeval {
            tv_sec: libc::time_t::try_from(timeout.as_secs()).unwrap_or(libc::time_t::MAX),
            tv_usec: libc::suseconds_t::from(timeout.subsec_micros() as i32),
        };
        // SAFETY: a `timeval` holds no pointer.
        unsafe { super::set_socket_option(socket.as_raw_fd(), libc::SO_RCVTIMEO, &timeval)? };
        Ok(RequestSocket { socket })
    }

    /// Sends one request to the kernel.
    pub fn send(&self, request: &[u8]) -> io::Result<()> {
        let sent = self.socket.send(request, 0)?;
        if sent == request.len() {
            Ok(())
        } else {
            Err(io::Error::other(format!(
                "netlink sent {sent} of {} bytes",
                request.len()
            )))
        }
    }

    /// Receives one datagram into `buf`; its length. A datagram longer than
    /// `buf` is an error (`MSG_TRUNC` gives its real length), and so is no
    /// datagram within the timeout (`WouldBlock` or `TimedOut`).
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        let room = buf.len();
        let mut unfilled = &mut buf[..];
        let len = loop {
            match self.socket.recv(&mut unfilled, libc::MSG_TRUNC) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => break other?,
            }
        };
        if len > room {
            return Err(io::Error::other(format!(
                "a {len}-byte netlink datagram does not fit the {room}-byte buffer"
            )));
        }
        Ok(len)
    }
}
