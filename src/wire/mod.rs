//! ctnetlink parsing: received bytes in, stack `Copy` events out.
//!
//! Owns: the wire format of netlink messages, netlink attributes and
//! ctnetlink conntrack events, and the typed errors for bytes that break it.
//! Never: allocates, uses `unsafe`, panics on any input, or knows about flows,
//! sockets or metrics. Every function here is safe to call on hostile bytes.
//!
//! Layers, one file each: [`nla`] (attribute framing) <- [`netlink`] (message
//! framing, control messages, the walk over a datagram) <- [`ctnetlink`]
//! (conntrack attributes into [`CtEvent`]). [`capture`] reads the
//! length-prefixed capture files under `tests/fixtures/`.

use std::fmt;

pub mod capture;
pub mod ctnetlink;
pub mod netlink;
pub mod nla;
pub mod stats;

#[cfg(test)]
pub(crate) mod encode;

pub use ctnetlink::{Counters, CtEvent, EventKind, Status, TcpState, Timestamp, Tuple};
pub use netlink::{Datagram, Message, NetlinkHeader};

/// Why some bytes are not a well-formed message. Small and `Copy`: building one
/// allocates nothing, so a flood of bad messages costs no more than good ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WireError {
    /// The bytes end before a fixed-size header (`what`) is complete.
    Truncated {
        /// The header or structure that is cut short.
        what: &'static str,
        /// Bytes it needs.
        need: usize,
        /// Bytes there were.
        have: usize,
    },
    /// `nlmsg_len` is shorter than the netlink header or longer than the bytes
    /// received.
    MessageLength {
        /// The length the header claims.
        nlmsg_len: u32,
        /// The bytes there were from the header on.
        available: usize,
    },
    /// An attribute's `nla_len` is shorter than its header or runs past the
    /// message or nest (`parent`) that holds it.
    AttrLength {
        /// The message or nest the attribute is in.
        parent: &'static str,
        /// The attribute's type, flags masked off.
        nla_type: u16,
        /// The length it claims.
        nla_len: u16,
        /// The bytes left in its parent.
        available: usize,
    },
    /// An attribute's payload has the wrong size for its type.
    AttrSize {
        /// The attribute (kernel name).
        attr: &'static str,
        /// Size the type has.
        expected: usize,
        /// Size the payload had.
        got: usize,
    },
    /// The message is not a ctnetlink conntrack event.
    NotConntrackEvent {
        /// Its `nlmsg_type`.
        nlmsg_type: u16,
    },
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            WireError::Truncated { what, need, have } => {
                write!(f, "truncated {what}: needs {need} bytes, {have} left")
            }
            WireError::MessageLength {
                nlmsg_len,
                available,
            } => write!(
                f,
                "bad nlmsg_len {nlmsg_len}: {available} bytes received from the header on"
            ),
            WireError::AttrLength {
                parent,
                nla_type,
                nla_len,
                available,
            } => write!(
                f,
                "attribute type {nla_type} in {parent} has nla_len {nla_len}, \
                 {available} bytes left in its parent"
            ),
            WireError::AttrSize {
                attr,
                expected,
                got,
            } => write!(f, "{attr} has {got} payload bytes, expected {expected}"),
            WireError::NotConntrackEvent { nlmsg_type } => {
                write!(f, "nlmsg_type {nlmsg_type:#06x} is not a conntrack event")
            }
        }
    }
}

impl std::error::Error for WireError {}
