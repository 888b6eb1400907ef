//! Batched receive: one non-blocking `recvmmsg` fills up to `batch`
//! datagrams into buffers allocated once, as quinn-udp's `recv_via_recvmmsg`
//! does.

use std::io;
use std::os::fd::AsRawFd;

/// Why a receive returned no datagrams.
#[derive(Debug)]
pub enum RecvError {
    /// `ENOBUFS`: the kernel dropped events for this socket since the last
    /// receive. Reading can go on at once.
    Overrun,
    /// `EAGAIN` on a non-blocking socket: nothing queued.
    WouldBlock,
    /// Any other error.
    Io(io::Error),
}

/// Receive buffers for one batch: `batch` slots of `slot_bytes` each, in one
/// allocation made at start.
pub struct RecvBatch {
    storage: Vec<u8>,
    slot_bytes: usize,
    iovecs: Vec<libc::iovec>,
    headers: Vec<libc::mmsghdr>,
    received: usize,
}

impl RecvBatch {
    /// Buffers for `batch` datagrams of at most `slot_bytes` each.
    pub fn new(batch: usize, slot_bytes: usize) -> RecvBatch {
        let batch = batch.max(1);
        RecvBatch {
            storage: vec![0; batch * slot_bytes],
            slot_bytes,
            // SAFETY: `iovec` and `mmsghdr` are plain C structs for which all
            // zero bytes (null pointers, zero lengths) is a valid value.
            iovecs: vec![unsafe { std::mem::zeroed() }; batch],
            // SAFETY: as above.
            headers: vec![unsafe { std::mem::zeroed() }; batch],
            received: 0,
        }
    }

    /// Takes up to the batch size of the datagrams queued now, in one syscall,
    /// without waiting (`MSG_DONTWAIT`): [`RecvError::WouldBlock`] when none
    /// is queued (the caller then waits for readiness). Returns how many.
    /// `EINTR` is retried here.
    pub fn recv(&mut self, socket: &impl AsRawFd) -> Result<usize, RecvError> {
        self.received = 0;
        let base = self.storage.as_mut_ptr();
        for (i, (iov, hdr)) in self.iovecs.iter_mut().zip(&mut self.headers).enumerate() {
            // SAFETY: `i * slot_bytes` is within `storage`, which holds
            // `batch * slot_bytes` bytes.
            iov.iov_base = unsafe { base.add(i * self.slot_bytes) }.cast();
            iov.iov_len = self.slot_bytes;
            hdr.msg_hdr.msg_name = std::ptr::null_mut();
            hdr.msg_hdr.msg_namelen = 0;
            hdr.msg_hdr.msg_iov = iov;
            hdr.msg_hdr.msg_iovlen = 1;
            hdr.msg_hdr.msg_control = std::ptr::null_mut();
            hdr.msg_hdr.msg_controllen = 0;
            hdr.msg_hdr.msg_flags = 0;
            hdr.msg_len = 0;
        }
        let vlen = libc::c_uint::try_from(self.headers.len()).unwrap_or(libc::c_uint::MAX);
        loop {
            // SAFETY: `headers` holds `vlen` initialised `mmsghdr`s, each
            // pointing at one `iovec` in `iovecs` that points at its own
            // disjoint slot of `storage`; all three outlive the call and are not
            // otherwise borrowed during it. A null timeout blocks.
            let n = unsafe {
                libc::recvmmsg(
                    socket.as_raw_fd(),
                    self.headers.as_mut_ptr(),
                    vlen,
                    libc::MSG_DONTWAIT,
                    std::ptr::null_mut(),
                )
            };
            if n >= 0 {
                self.received = n as usize;
                return Ok(self.received);
            }
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::ENOBUFS) => return Err(RecvError::Overrun),
                Some(libc::EAGAIN) => return Err(RecvError::WouldBlock),
                _ => return Err(RecvError::Io(err)),
            }
        }
    }

    /// The datagrams of the last receive, in order. A datagram larger than its
    /// slot comes cut short with `truncated` set (`MSG_TRUNC`).
    pub fn datagrams(&self) -> impl Iterator<Item = Received<'_>> {
        self.headers[..self.received]
            .iter()
            .enumerate()
            .map(|(i, hdr)| {
                let start = i * self.slot_bytes;
                let len = (hdr.msg_len as usize).min(self.slot_bytes);
                Received {
                    bytes: &self.storage[start..start + len],
                    truncated: hdr.msg_hdr.msg_flags & libc::MSG_TRUNC != 0,
                }
            })
    }
}

/// One received datagram.
#[derive(Clone, Copy, Debug)]
pub struct Received<'a> {
    /// Its bytes, at most one slot.
    pub bytes: &'a [u8],
    /// Whether it was longer than its slot and cut short.
    pub truncated: bool,
}
