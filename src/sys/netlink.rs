//! The `NETLINK_NETFILTER` socket joined to the conntrack event groups, with
//! an enlarged receive buffer.
//!
//! Owns: the socket's file descriptor, as an `OwnedFd` (closed once, when the
//! socket drops; the type is not `Clone`). netlink-sys sets the socket up
//! and then hands its descriptor over: its `Socket` is `Clone` over a raw fd
//! that each copy closes on drop, so it is never kept.
//! Never: reads from the socket (that is `recv`), or enables
//! `NETLINK_NO_ENOBUFS` or `NETLINK_BROADCAST_ERROR`.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};

use netlink_sys::{protocols::NETLINK_NETFILTER, Socket};

/// Multicast groups of conntrack events (`enum nfnetlink_groups`).
const NFNLGRP_CONNTRACK_NEW: u32 = 1;
const NFNLGRP_CONNTRACK_UPDATE: u32 = 2;
const NFNLGRP_CONNTRACK_DESTROY: u32 = 3;

/// Which conntrack events to subscribe to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EventGroups {
    /// NEW events.
    pub new: bool,
    /// UPDATE events.
    pub update: bool,
    /// DESTROY events.
    pub destroy: bool,
}

impl EventGroups {
    /// All three groups.
    pub const ALL: EventGroups = EventGroups {
        new: true,
        update: true,
        destroy: true,
    };
}

/// A netlink socket subscribed to conntrack events.
#[derive(Debug)]
pub struct ConntrackSocket {
    fd: OwnedFd,
    granted_rcvbuf: usize,
}

impl ConntrackSocket {
    /// Opens the socket, asks for a receive buffer of `rcvbuf_bytes` and joins
    /// `groups`. Needs CAP_NET_ADMIN in the socket's network namespace.
    ///
    /// The buffer is asked for with `SO_RCVBUFFORCE` (beyond `rmem_max`; needs
    /// CAP_NET_ADMIN in the initial user namespace), else `SO_RCVBUF`, halving
    /// the request until the kernel accepts it. The size granted (the kernel
    /// doubles the request) is read back: see [`Self::granted_rcvbuf`].
    pub fn open(groups: EventGroups, rcvbuf_bytes: usize) -> io::Result<ConntrackSocket> {
        let mut socket = Socket::new(NETLINK_NETFILTER)?;
        socket.bind_auto()?;
        // Losses must stay visible as ENOBUFS: never set NETLINK_NO_ENOBUFS,
        // and never NETLINK_BROADCAST_ERROR (it would hold dying flows).
        let mut request = rcvbuf_bytes.max(4096);
        loop {
            let asked = i32::try_from(request).unwrap_or(i32::MAX);
            match set_rcvbuf(socket.as_raw_fd(), libc::SO_RCVBUFFORCE, asked)
                .or_else(|_| set_rcvbuf(socket.as_raw_fd(), libc::SO_RCVBUF, asked))
            {
                Ok(()) => break,
                Err(e) if request <= 4096 => return Err(e),
                Err(_) => request /= 2,
            }
        }
        for (wanted, group) in [
            (groups.new, NFNLGRP_CONNTRACK_NEW),
            (groups.update, NFNLGRP_CONNTRACK_UPDATE),
            (groups.destroy, NFNLGRP_CONNTRACK_DESTROY),
        ] {
            if wanted {
                socket.add_membership(group)?;
            }
        }
        let granted_rcvbuf = socket.get_rx_buf_sz()?;
        // SAFETY: `into_raw_fd` gives up the `Socket`'s ownership of its
        // open descriptor (it forgets the `Socket`, so nothing else closes
        // it): the `OwnedFd` is its one owner from here on.
        let fd = unsafe { OwnedFd::from_raw_fd(socket.into_raw_fd()) };
        Ok(ConntrackSocket { fd, granted_rcvbuf })
    }

    /// The receive buffer the kernel granted, in bytes.
    pub fn granted_rcvbuf(&self) -> usize {
        self.granted_rcvbuf
    }

    /// Attaches a classic BPF socket filter (see `crate::offload::bpf`): the
    /// kernel runs it on each event before queueing it, so what it drops
    /// takes no receive-buffer space and causes no overrun.
    pub fn attach_filter(&self, program: &[libc::sock_filter]) -> io::Result<()> {
        super::filter::attach_filter(self.fd.as_raw_fd(), program)
    }
}

impl AsRawFd for ConntrackSocket {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl AsFd for ConntrackSocket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

fn set_rcvbuf(fd: RawFd, option: libc::c_int, bytes: i32) -> io::Result<()> {
    // SAFETY: a plain `i32`, no pointer inside.
    unsafe { super::set_socket_option(fd, option, &bytes) }
}
