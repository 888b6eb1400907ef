//! Requests to ctnetlink and the walk over their answers: what the table
//! census and the node statistics share.
//!
//! Owns: a request socket of its own, its receive buffer and the request
//! numbers; passing over what answers an earlier, timed-out request; the end
//! of an answer (`NLMSG_DONE`, an error, or the caller saying it is whole).
//! Never: reads what an answer's messages mean (its caller does), or runs
//! on a reader thread.

use std::io;
use std::ops::ControlFlow;
use std::time::Duration;

use crate::sys::request_socket::RequestSocket;
use crate::wire::ctnetlink::DUMP_REQUEST_LEN;
use crate::wire::netlink::{NetlinkHeader, NLMSG_DONE, NLMSG_ERROR};
use crate::wire::nla::align4;
use crate::wire::Message;

use super::CensusError;

/// The receive buffer: the kernel sizes a dump's parts after the reader's
/// buffer, up to 32 KiB, and never sends one larger than this.
const BUFFER: usize = 64 * 1024;

/// A socket for requests, one at a time.
pub(super) struct Requests {
    socket: RequestSocket,
    buf: Vec<u8>,
    seq: u32,
}

impl Requests {
    /// A socket whose every receive gives up after `timeout`.
    pub(super) fn open(timeout: Duration) -> io::Result<Requests> {
        Ok(Requests {
            socket: RequestSocket::open(timeout)?,
            buf: vec![0; BUFFER],
            seq: 0,
        })
    }

    /// Sends `request(seq)` and hands each message of its answer (header,
    /// and the whole message) to `each`, until the kernel ends the answer
    /// (`NLMSG_DONE`), refuses it (an error), or `each` breaks: an answer
    /// that is no dump is one message.
    pub(super) fn ask(
        &mut self,
        request: impl FnOnce(u32) -> [u8; DUMP_REQUEST_LEN],
        mut each: impl FnMut(&NetlinkHeader, &[u8]) -> Result<ControlFlow<()>, CensusError>,
    ) -> Result<(), CensusError> {
        self.seq = self.seq.wrapping_add(1);
        self.socket
            .send(&request(self.seq))
            .map_err(CensusError::Io)?;
        loop {
            let len = self.socket.recv(&mut self.buf).map_err(CensusError::Io)?;
            let mut rest = &self.buf[..len];
            while !rest.is_empty() {
                let (header, msg) = NetlinkHeader::parse(rest).map_err(CensusError::Malformed)?;
                rest = rest.get(align4(msg.len())..).unwrap_or_default();
                if header.seq != self.seq {
                    continue; // the rest of an earlier, timed-out request
                }
                match header.kind {
                    NLMSG_DONE => return Ok(()),
                    NLMSG_ERROR => {
                        // Error 0 is an acknowledgement: nothing to do.
                        let parsed = Message::parse(msg).map_err(CensusError::Malformed)?;
                        if let Message::Error { errno } = parsed {
                            return Err(CensusError::Refused(errno));
                        }
                    }
                    _ => {
                        if each(&header, msg)?.is_break() {
                            return Ok(());
                        }
                    }
                }
            }
        }
    }
}
