//! Netlink framing: the message header (`struct nlmsghdr`), the control
//! messages (error, done, overrun), and the walk over every message of one
//! received datagram.
//!
//! Owns: message boundaries and the decision "is this a conntrack event, a
//! control message, or something else".
//! Never: allocates, panics on any input, or stops at a bad event when the
//! framing around it is intact (the next message is still yielded).

use super::ctnetlink::{CtEvent, EventKind};
use super::nla::align4;
use super::WireError;

/// Size of `struct nlmsghdr`.
pub const NLMSG_HDRLEN: usize = 16;
/// No-op message.
pub const NLMSG_NOOP: u16 = 1;
/// Error or acknowledgement; the payload starts with a negative errno (0 = ack).
pub const NLMSG_ERROR: u16 = 2;
/// End of a multi-part dump.
pub const NLMSG_DONE: u16 = 3;
/// Data lost.
pub const NLMSG_OVERRUN: u16 = 4;
/// `nlmsg_flags`: a NEW conntrack event (set with `NLM_F_EXCL`).
pub const NLM_F_CREATE: u16 = 0x400;
/// `nlmsg_flags`: a NEW conntrack event (set with `NLM_F_CREATE`).
pub const NLM_F_EXCL: u16 = 0x200;

/// `nlmsg_flags`: a request (to the kernel).
pub const NLM_F_REQUEST: u16 = 0x1;
/// `nlmsg_flags`: one part of a multi-part reply (a dump), ended by `NLMSG_DONE`.
pub const NLM_F_MULTI: u16 = 0x2;
/// `nlmsg_flags`: a request for every entry (`NLM_F_ROOT | NLM_F_MATCH`).
pub const NLM_F_DUMP: u16 = 0x300;
/// `nlmsg_flags` of a dump's part: the table changed under the dump in a way
/// that may have skipped or repeated entries.
pub const NLM_F_DUMP_INTR: u16 = 0x10;

/// The fixed header of every netlink message, host byte order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetlinkHeader {
    /// Length of the whole message, header included.
    pub len: u32,
    /// Message type; for netfilter, `subsystem << 8 | message`.
    pub kind: u16,
    /// `NLM_F_*` flags.
    pub flags: u16,
    /// Sequence number (0 on multicast events).
    pub seq: u32,
    /// Sender port id (0 for the kernel).
    pub pid: u32,
}

impl NetlinkHeader {
    /// Reads the header at the start of `buf` and checks `nlmsg_len` against
    /// `buf`. Returns the header and the message's bytes (header included).
    #[inline]
    pub fn parse(buf: &[u8]) -> Result<(NetlinkHeader, &[u8]), WireError> {
        let Some(h) = buf.first_chunk::<NLMSG_HDRLEN>() else {
            return Err(WireError::Truncated {
                what: "nlmsghdr",
                need: NLMSG_HDRLEN,
                have: buf.len(),
            });
        };
        let header = NetlinkHeader {
            len: u32::from_ne_bytes([h[0], h[1], h[2], h[3]]),
            kind: u16::from_ne_bytes([h[4], h[5]]),
            flags: u16::from_ne_bytes([h[6], h[7]]),
            seq: u32::from_ne_bytes([h[8], h[9], h[10], h[11]]),
            pid: u32::from_ne_bytes([h[12], h[13], h[14], h[15]]),
        };
        // A u32 always fits a usize on the 32- and 64-bit targets netlink runs on;
        // if it did not, `MAX` is past any buffer and fails the check below.
        let len = usize::try_from(header.len).unwrap_or(usize::MAX);
        if len < NLMSG_HDRLEN || len > buf.len() {
            return Err(WireError::MessageLength {
                nlmsg_len: header.len,
                available: buf.len(),
            });
        }
        Ok((header, &buf[..len]))
    }
}

/// What one netlink message is, as far as the exporter cares.
///
/// `E` is what an event carries: the [`CtEvent`] itself (the default, from
/// [`Message::parse`] and the [`Datagram`] iterator), or `()` when the event
/// was parsed into the caller's slot ([`Message::parse_into`],
/// [`Datagram::next_into`]: the hot path, which copies nothing).
// The event is kept inline on purpose: boxing it would allocate per event.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Message<E = CtEvent> {
    /// A conntrack NEW, UPDATE or DESTROY event.
    Event(E),
    /// `NLMSG_ERROR` with a non-zero error: the positive errno (e.g. `ENOBUFS`).
    Error {
        /// Positive errno value.
        errno: i32,
    },
    /// `NLMSG_ERROR` with error 0: an acknowledgement.
    Ack,
    /// `NLMSG_DONE`.
    Done,
    /// `NLMSG_OVERRUN`: the kernel says data was lost.
    Overrun,
    /// Any other message (`NLMSG_NOOP`, another netfilter subsystem, ...).
    Other {
        /// Its `nlmsg_type`.
        nlmsg_type: u16,
    },
}

impl<E> Message<E> {
    /// The same message with `event` in place of what an event carried.
    #[inline]
    pub fn with_event<F>(self, event: F) -> Message<F> {
        match self {
            Message::Event(_) => Message::Event(event),
            Message::Error { errno } => Message::Error { errno },
            Message::Ack => Message::Ack,
            Message::Done => Message::Done,
            Message::Overrun => Message::Overrun,
            Message::Other { nlmsg_type } => Message::Other { nlmsg_type },
        }
    }
}

impl Message {
    /// Classifies one whole netlink message (header included) and, if it is a
    /// conntrack event, parses it.
    #[inline]
    pub fn parse(msg: &[u8]) -> Result<Message, WireError> {
        let mut ev = CtEvent::empty(EventKind::New, 0);
        Message::parse_into(msg, &mut ev).map(|m| m.with_event(ev))
    }

    /// Classifies one whole netlink message (header included); a conntrack
    /// event is parsed into `ev` (every field overwritten) and reported as
    /// `Message::Event(())`. Other messages leave `ev` alone.
    #[inline]
    pub fn parse_into(msg: &[u8], ev: &mut CtEvent) -> Result<Message<()>, WireError> {
        let (header, msg) = NetlinkHeader::parse(msg)?;
        match header.kind {
            NLMSG_ERROR => {
                let body = msg.get(NLMSG_HDRLEN..).unwrap_or_default();
                let Some(err) = body.first_chunk::<4>() else {
                    return Err(WireError::Truncated {
                        what: "nlmsgerr",
                        need: 4,
                        have: body.len(),
                    });
                };
                // The kernel writes `-errno`; `wrapping_neg` keeps i32::MIN from panicking.
                match i32::from_ne_bytes(*err).wrapping_neg() {
                    0 => Ok(Message::Ack),
                    errno => Ok(Message::Error { errno }),
                }
            }
            NLMSG_DONE => Ok(Message::Done),
            NLMSG_OVERRUN => Ok(Message::Overrun),
            kind if CtEvent::is_event_type(kind) => {
                CtEvent::parse_body_into(&header, msg, ev).map(|()| Message::Event(()))
            }
            nlmsg_type => Ok(Message::Other { nlmsg_type }),
        }
    }
}

/// Every netlink message of one received datagram, in order.
///
/// A malformed event yields its error and the walk goes on with the next
/// message; a bad `nlmsg_len` yields its error and ends the walk, since the
/// next message's start is then unknown.
#[derive(Clone, Debug)]
pub struct Datagram<'a> {
    rest: &'a [u8],
}

impl<'a> Datagram<'a> {
    /// The messages in `buf`, exactly the bytes one `recvmsg` returned.
    #[inline]
    pub fn new(buf: &'a [u8]) -> Self {
        Datagram { rest: buf }
    }

    /// The next message, with a conntrack event parsed into `ev` (see
    /// [`Message::parse_into`]); `None` after the last one. The hot path: the
    /// event is written once, where the caller keeps it.
    #[inline]
    pub fn next_into(&mut self, ev: &mut CtEvent) -> Option<Result<Message<()>, WireError>> {
        if self.rest.is_empty() {
            return None;
        }
        match NetlinkHeader::parse(self.rest) {
            Err(e) => {
                self.rest = &[];
                Some(Err(e))
            }
            Ok((_, msg)) => {
                let step = align4(msg.len()).min(self.rest.len());
                self.rest = self.rest.get(step..).unwrap_or_default();
                Some(Message::parse_into(msg, ev))
            }
        }
    }
}

impl Iterator for Datagram<'_> {
    type Item = Result<Message, WireError>;

    #[inline]
    fn next(&mut self) -> Option<Self::Item> {
        let mut ev = CtEvent::empty(EventKind::New, 0);
        self.next_into(&mut ev).map(|m| m.map(|m| m.with_event(ev)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::encode::control;

    #[test]
    fn control_messages_are_recognised_not_events() {
        let mut d = control(NLMSG_ERROR, &(-105i32).to_ne_bytes());
        d.extend(control(NLMSG_ERROR, &0i32.to_ne_bytes()));
        d.extend(control(NLMSG_DONE, &0i32.to_ne_bytes()));
        d.extend(control(NLMSG_OVERRUN, &[]));
        d.extend(control(NLMSG_NOOP, &[]));
        // Another netfilter subsystem (expectations, subsys 2).
        d.extend(control(0x0200, &[2, 0, 0, 0]));
        let got: Vec<_> = Datagram::new(&d).collect();
        assert_eq!(
            got,
            vec![
                Ok(Message::Error { errno: 105 }),
                Ok(Message::Ack),
                Ok(Message::Done),
                Ok(Message::Overrun),
                Ok(Message::Other { nlmsg_type: 1 }),
                Ok(Message::Other { nlmsg_type: 0x0200 }),
            ]
        );
    }

    #[test]
    fn next_into_reports_events_in_the_slot_and_control_messages_as_they_are() {
        let mut d = control(NLMSG_DONE, &[0; 4]);
        d.extend(control(NLMSG_ERROR, &(-105i32).to_ne_bytes()));
        let mut ev = CtEvent::empty(EventKind::Destroy, 7);
        let mut walk = Datagram::new(&d);
        assert_eq!(walk.next_into(&mut ev), Some(Ok(Message::Done)));
        assert_eq!(
            walk.next_into(&mut ev),
            Some(Ok(Message::Error { errno: 105 }))
        );
        assert_eq!(walk.next_into(&mut ev), None);
        assert_eq!(
            ev,
            CtEvent::empty(EventKind::Destroy, 7),
            "untouched by control messages"
        );
    }

    #[test]
    fn error_message_without_errno_is_truncated() {
        let d = control(NLMSG_ERROR, &[1, 2]);
        assert_eq!(
            Message::parse(&d),
            Err(WireError::Truncated {
                what: "nlmsgerr",
                need: 4,
                have: 2
            })
        );
    }

    #[test]
    fn bad_message_length_ends_the_walk() {
        let mut d = control(NLMSG_DONE, &[0; 4]);
        d[0] = 8; // shorter than the header itself
        d.extend(control(NLMSG_DONE, &[0; 4]));
        let got: Vec<_> = Datagram::new(&d).collect();
        assert_eq!(
            got,
            vec![Err(WireError::MessageLength {
                nlmsg_len: 8,
                available: 40
            })]
        );
    }

    #[test]
    fn short_buffer_is_truncated_header() {
        assert_eq!(
            Message::parse(&[1, 2, 3]),
            Err(WireError::Truncated {
                what: "nlmsghdr",
                need: 16,
                have: 3
            })
        );
        assert_eq!(Datagram::new(&[]).next(), None);
    }
}
