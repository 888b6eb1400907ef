//! The operating-system side: the conntrack netlink socket and the batched
//! receive from it, the socket of requests to ctnetlink, and the small syscalls
//! around them.
//!
//! Owns: every `unsafe` block of the crate, each a small wrapper around one
//! syscall with a `// SAFETY:` argument. File descriptors are `OwnedFd`s.
//! Never: parses messages (that is `wire/`) or allocates after setup; the
//! receive path makes exactly one syscall per batch.

#![allow(unsafe_code)]

pub mod filter;
pub mod local_addresses;
pub mod memory;
pub mod netlink;
pub mod privileges;
pub mod process;
pub mod recv;
pub mod request_socket;
pub mod signal;
pub mod sysctl;

pub use netlink::{ConntrackSocket, EventGroups};
pub use recv::{RecvBatch, RecvError};

use std::io;
use std::os::fd::RawFd;

/// `setsockopt(fd, SOL_SOCKET, option, value)`: the one wrapper every socket
/// option of the crate goes through.
///
/// # Safety
/// Every pointer inside `value` must be valid for what the kernel reads
/// through it for `option` during the call (a plain value holds none).
pub(crate) unsafe fn set_socket_option<T>(
    fd: RawFd,
    option: libc::c_int,
    value: &T,
) -> io::Result<()> {
    // SAFETY: `value` is a live `T` whose size is passed with it, and the
    // kernel only reads it (copy_from_user) during the call; what it points
    // to is the caller's promise. A bad `fd` fails with EBADF or ENOTSOCK.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            option,
            (value as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
