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
    /// Buffers for `batch` datagrams of at most `slot_bytes` each. The
    /// headers and iovecs point into `storage` from here on: the three
    /// vectors are never resized, so their heap buffers never move (moving
    /// the `RecvBatch` itself moves only the vectors' handles).
    pub fn new(batch: usize, slot_bytes: usize) -> RecvBatch {
        let batch = batch.max(1);
        let mut rb = RecvBatch {
            storage: vec![0; batch * slot_bytes],
            slot_bytes,
            // SAFETY: `iovec` and `mmsghdr` are plain C structs for which all
            // zero bytes (null pointers, zero lengths) is a valid value.
            iovecs: vec![unsafe { std::mem::zeroed() }; batch],
            // SAFETY: as above.
            headers: vec![unsafe { std::mem::zeroed() }; batch],
            received: 0,
        };
        let base = rb.storage.as_mut_ptr();
        for (i, (iov, hdr)) in rb.iovecs.iter_mut().zip(&mut rb.headers).enumerate() {
            // SAFETY: `i * slot_bytes` is within `storage`, which holds
            // `batch * slot_bytes` bytes.
            iov.iov_base = unsafe { base.add(i * slot_bytes) }.cast();
            iov.iov_len = slot_bytes;
            hdr.msg_hdr.msg_iov = iov;
            hdr.msg_hdr.msg_iovlen = 1;
        }
        rb
    }

    /// Takes up to the batch size of the datagrams queued now, in one syscall,
    /// without waiting (`MSG_DONTWAIT`): [`RecvError::WouldBlock`] when none
    /// is queued (the caller then waits for readiness). Returns how many.
    /// `EINTR` is retried here.
    pub fn recv(&mut self, socket: &impl AsRawFd) -> Result<usize, RecvError> {
        // The kernel writes back only the headers of the datagrams it filled
        // (length, flags, and the name and control lengths): reset those.
        // The iovecs are only read by the kernel and stay as `new` set them.
        for hdr in &mut self.headers[..self.received] {
            hdr.msg_hdr.msg_namelen = 0;
            hdr.msg_hdr.msg_controllen = 0;
            hdr.msg_hdr.msg_flags = 0;
            hdr.msg_len = 0;
        }
        self.received = 0;
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixDatagram;

    /// The headers are set up once; a second receive must not see the first
    /// one's lengths or truncation flags.
    #[test]
    fn consecutive_receives_report_their_own_lengths_and_truncation() {
        let (tx, rx) = UnixDatagram::pair().expect("socketpair");
        let mut batch = RecvBatch::new(4, 8);

        tx.send(&[1; 3]).expect("send");
        tx.send(&[2; 20]).expect("send"); // longer than a slot
        tx.send(&[3; 8]).expect("send");
        let received = |b: &RecvBatch| -> Vec<(Vec<u8>, bool)> {
            b.datagrams()
                .map(|d| (d.bytes.to_vec(), d.truncated))
                .collect()
        };
        assert_eq!(batch.recv(&rx).expect("first receive"), 3);
        assert_eq!(
            received(&batch),
            vec![(vec![1; 3], false), (vec![2; 8], true), (vec![3; 8], false)]
        );

        tx.send(&[4; 5]).expect("send");
        tx.send(&[5; 1]).expect("send");
        assert_eq!(batch.recv(&rx).expect("second receive"), 2);
        assert_eq!(
            received(&batch),
            vec![(vec![4; 5], false), (vec![5; 1], false)]
        );

        assert!(matches!(batch.recv(&rx), Err(RecvError::WouldBlock)));
        assert_eq!(batch.datagrams().count(), 0);

        // More queued than the batch holds: the rest comes on the next call.
        for i in 0..6u8 {
            tx.send(&[i; 2]).expect("send");
        }
        assert_eq!(batch.recv(&rx).expect("full batch"), 4);
        assert_eq!(batch.recv(&rx).expect("remainder"), 2);
        let rest: Vec<u8> = batch.datagrams().map(|d| d.bytes[0]).collect();
        assert_eq!(rest, vec![4, 5]);
    }
}
