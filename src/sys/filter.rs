//! Attaching a classic BPF socket filter (`SO_ATTACH_FILTER`) to a socket,
//! and removing it.
//!
//! Owns: the two socket options and the `sock_fprog` handed to the
//! kernel. The program itself is built in `crate::offload::bpf`.
//! Never: builds or changes a program, or touches a socket it was not given;
//! the kernel copies and checks the program during the call, so nothing here
//! outlives it.
//!
//! The kernel runs an attached filter on every message before queueing it on
//! the socket (`sk_filter`, for multicast deliveries and for unicast alike):
//! a dropped message takes no receive-buffer space and causes no `ENOBUFS`.

use std::io;
use std::os::fd::RawFd;

use libc::{sock_filter, sock_fprog};

/// `SO_ATTACH_FILTER` (`asm-generic/socket.h`; the same number on every
/// architecture Linux has except SPARC, which this exporter does not run on).
const SO_ATTACH_FILTER: libc::c_int = 26;
/// `SO_DETACH_FILTER`.
const SO_DETACH_FILTER: libc::c_int = 27;

/// Attaches `program` to the socket `fd`, replacing any filter it had. The
/// kernel checks the program (`bpf_check_classic`) and refuses it with
/// `EINVAL` if it is malformed, or longer than 4,096 instructions; and with
/// `ENOMEM` (an [`io::ErrorKind::OutOfMemory`] error saying so) if its
/// translation to eBPF is larger than `net.core.optmem_max` allows.
pub fn attach_filter(fd: RawFd, program: &[sock_filter]) -> io::Result<()> {
    let len = u16::try_from(program.len())
        .ok()
        .filter(|&n| n > 0)
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "a socket filter needs 1 to 65535 instructions, not {}",
                    program.len()
                ),
            )
        })?;
    let fprog = sock_fprog {
        len,
        // The kernel only reads the program (copy_from_user): the pointer is
        // `*mut` in the C struct alone.
        filter: program.as_ptr().cast_mut(),
    };
    // SAFETY: `fprog.filter` points at `len` initialised `sock_filter`s
    // borrowed from `program`, which the kernel copies before returning and
    // never writes.
    let Err(err) = (unsafe { super::set_socket_option(fd, SO_ATTACH_FILTER, &fprog) }) else {
        return Ok(());
    };
    if err.raw_os_error() == Some(libc::ENOMEM) {
        return Err(io::Error::new(
            io::ErrorKind::OutOfMemory,
            format!(
                "the kernel refused a socket filter of {len} instructions (ENOMEM): its \
                 translation to eBPF is charged against net.core.optmem_max of the socket's \
                 network namespace, which is too small for it (the default is 131072 on \
                 recent kernels, 20480 on older ones); raise it, or filter on fewer subnets"
            ),
        ));
    }
    Err(err)
}

/// Removes the socket filter of `fd`: every message is queued again. Fails
/// with `ENOENT` if it had none.
pub fn detach_filter(fd: RawFd) -> io::Result<()> {
    let unused: libc::c_int = 0;
    // SAFETY: a plain `c_int` (which the kernel ignores for this option).
    unsafe { super::set_socket_option(fd, SO_DETACH_FILTER, &unused) }
}

/// A netlink socket that sends to itself, for tests of filter programs: the
/// kernel's own BPF interpreter (or JIT) judges every message sent. A
/// `NETLINK_USERSOCK` socket sends each message to its own port id, and
/// `netlink_unicast` runs `sk_filter` on the receiving socket before it
/// queues the message, synchronously. What arrives was passed.
#[cfg(test)]
pub(crate) mod loopback {
    use std::io;
    use std::os::fd::AsRawFd;

    use libc::sock_filter;
    use netlink_sys::{Socket, SocketAddr};

    use super::attach_filter;

    const NETLINK_USERSOCK: isize = 2;

    /// A socket that sends to itself.
    pub struct Loopback {
        /// The socket.
        pub socket: Socket,
        /// Its own address.
        pub me: SocketAddr,
    }

    impl Loopback {
        /// A non-blocking socket bound to its own address.
        pub fn new() -> Loopback {
            let mut socket = Socket::new(NETLINK_USERSOCK).unwrap();
            let me = socket.bind_auto().unwrap();
            socket.set_non_blocking(true).unwrap();
            socket.set_rx_buf_sz(1 << 20).unwrap();
            Loopback { socket, me }
        }

        /// Attaches `program`; panics with its listing if the kernel refuses.
        pub fn attach(&self, program: &[sock_filter]) {
            attach_filter(self.socket.as_raw_fd(), program).unwrap_or_else(|e| {
                panic!("attach a program of {} instructions: {e}", program.len())
            });
        }

        /// Whether the kernel's filter passed `msg`; a passed message must
        /// arrive whole.
        pub fn passes(&self, msg: &[u8]) -> bool {
            let sent = self.socket.send_to(msg, &self.me, 0).unwrap();
            assert_eq!(sent, msg.len());
            let mut buf = vec![0u8; 65536];
            let mut slice = &mut buf[..];
            match self
                .socket
                .recv(&mut slice, libc::MSG_DONTWAIT | libc::MSG_TRUNC)
            {
                Ok(n) => {
                    assert_eq!(&buf[..n], msg, "a passed message arrives whole");
                    true
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => false,
                Err(e) => panic!("recv: {e}"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::os::fd::AsRawFd;

    use libc::sock_filter;

    use super::loopback::Loopback;
    use super::*;
    use crate::wire::encode::control;
    use crate::wire::netlink::NLMSG_DONE;

    const PASS: u32 = u32::MAX;
    const DROP: u32 = 0;

    fn ret(value: u32) -> sock_filter {
        sock_filter {
            code: (libc::BPF_RET | libc::BPF_K) as u16,
            jt: 0,
            jf: 0,
            k: value,
        }
    }

    #[test]
    fn usersock_unicast_runs_the_receivers_socket_filter() {
        let lo = Loopback::new();
        let msg = control(NLMSG_DONE, &0i32.to_ne_bytes());
        assert!(lo.passes(&msg), "no filter: delivered");
        lo.attach(&[ret(DROP)]);
        assert!(!lo.passes(&msg), "drop-all filter: nothing queued");
        // Not merely late: a blocking receive times out too.
        lo.socket.set_non_blocking(false).unwrap();
        let timeout = libc::timeval {
            tv_sec: 0,
            tv_usec: 200_000,
        };
        // SAFETY: a plain `timeval`, no pointer inside.
        unsafe {
            crate::sys::set_socket_option(lo.socket.as_raw_fd(), libc::SO_RCVTIMEO, &timeout)
        }
        .unwrap();
        lo.socket.send_to(&msg, &lo.me, 0).unwrap();
        let mut buf = vec![0u8; 256];
        let err = lo.socket.recv(&mut &mut buf[..], 0).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock, "{err}");
        lo.socket.set_non_blocking(true).unwrap();
        // A small return value truncates instead of passing whole.
        lo.attach(&[ret(8)]);
        lo.socket.send_to(&msg, &lo.me, 0).unwrap();
        let n = lo.socket.recv(&mut &mut buf[..], 0).unwrap();
        assert_eq!(n, 8);
        lo.attach(&[ret(PASS)]);
        assert!(lo.passes(&msg));
        detach_filter(lo.socket.as_raw_fd()).unwrap();
        assert!(lo.passes(&msg));
        let err = detach_filter(lo.socket.as_raw_fd()).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOENT));
        assert!(attach_filter(lo.socket.as_raw_fd(), &[]).is_err());
        // The kernel checks the program: a last instruction that is no
        // return is refused.
        let mut bad = ret(PASS);
        bad.code = (libc::BPF_LD | libc::BPF_IMM) as u16;
        let err = attach_filter(lo.socket.as_raw_fd(), &[bad]).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EINVAL));
    }
}
