//! ctnetlink conntrack events (`nfnetlink_conntrack.h`): the attribute numbers,
//! and the parse of one NEW / UPDATE / DESTROY message into a [`CtEvent`].
//!
//! Owns: what each attribute means and its size; which attributes are
//! present (every field is an `Option`: absent is never zero).
//! Never: allocates, panics on any input, or decides what an event means for a
//! flow (that is `flow/`). Unknown attributes are skipped, not errors.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::netlink::{
    NetlinkHeader, NLMSG_HDRLEN, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REQUEST,
};
use super::nla::{Nla, NlaIter};
use super::WireError;

/// `NFNL_SUBSYS_CTNETLINK`: the high byte of a conntrack message's `nlmsg_type`.
pub const NFNL_SUBSYS_CTNETLINK: u16 = 1;
/// `IPCTNL_MSG_CT_NEW`: NEW and UPDATE events (told apart by `nlmsg_flags`).
pub const IPCTNL_MSG_CT_NEW: u16 = 0;
/// `IPCTNL_MSG_CT_GET`: a request for entries of the table (a dump with
/// `NLM_F_DUMP`).
pub const IPCTNL_MSG_CT_GET: u16 = 1;
/// `IPCTNL_MSG_CT_DELETE`: DESTROY events.
pub const IPCTNL_MSG_CT_DELETE: u16 = 2;
/// Size of `struct nfgenmsg` (family, version, res_id) after the netlink header.
pub const NFGENMSG_LEN: usize = 4;

/// `AF_INET`.
pub const AF_INET: u8 = 2;
/// `AF_INET6`.
pub const AF_INET6: u8 = 10;

// enum ctattr_type
/// Original-direction tuple (nested).
pub const CTA_TUPLE_ORIG: u16 = 1;
/// Reply-direction tuple (nested).
pub const CTA_TUPLE_REPLY: u16 = 2;
/// Status bits, be32.
pub const CTA_STATUS: u16 = 3;
/// Protocol state (nested).
pub const CTA_PROTOINFO: u16 = 4;
/// Seconds until the entry expires, be32.
pub const CTA_TIMEOUT: u16 = 7;
/// Connection mark, be32.
pub const CTA_MARK: u16 = 8;
/// Original-direction counters (nested).
pub const CTA_COUNTERS_ORIG: u16 = 9;
/// Reply-direction counters (nested).
pub const CTA_COUNTERS_REPLY: u16 = 10;
/// Conntrack id, be32.
pub const CTA_ID: u16 = 12;
/// Conntrack zone, be16.
pub const CTA_ZONE: u16 = 18;
/// Start / stop timestamps (nested).
pub const CTA_TIMESTAMP: u16 = 20;
/// Kernel time the event was emitted, be64 ns (Linux 6.14+).
pub const CTA_TIMESTAMP_EVENT: u16 = 27;

// enum ctattr_tuple
/// Addresses (nested).
pub const CTA_TUPLE_IP: u16 = 1;
/// Protocol and ports (nested).
pub const CTA_TUPLE_PROTO: u16 = 2;
/// Tuple zone, be16.
pub const CTA_TUPLE_ZONE: u16 = 3;

// enum ctattr_ip
/// IPv4 source, 4 bytes.
pub const CTA_IP_V4_SRC: u16 = 1;
/// IPv4 destination, 4 bytes.
pub const CTA_IP_V4_DST: u16 = 2;
/// IPv6 source, 16 bytes.
pub const CTA_IP_V6_SRC: u16 = 3;
/// IPv6 destination, 16 bytes.
pub const CTA_IP_V6_DST: u16 = 4;

// enum ctattr_l4proto
/// L4 protocol number, u8.
pub const CTA_PROTO_NUM: u16 = 1;
/// Source port, be16.
pub const CTA_PROTO_SRC_PORT: u16 = 2;
/// Destination port, be16.
pub const CTA_PROTO_DST_PORT: u16 = 3;
/// ICMP id, be16.
pub const CTA_PROTO_ICMP_ID: u16 = 4;
/// ICMP type, u8.
pub const CTA_PROTO_ICMP_TYPE: u16 = 5;
/// ICMP code, u8.
pub const CTA_PROTO_ICMP_CODE: u16 = 6;
/// ICMPv6 id, be16.
pub const CTA_PROTO_ICMPV6_ID: u16 = 7;
/// ICMPv6 type, u8.
pub const CTA_PROTO_ICMPV6_TYPE: u16 = 8;
/// ICMPv6 code, u8.
pub const CTA_PROTO_ICMPV6_CODE: u16 = 9;

// enum ctattr_protoinfo / ctattr_protoinfo_tcp
/// TCP protocol info (nested in `CTA_PROTOINFO`).
pub const CTA_PROTOINFO_TCP: u16 = 1;
/// TCP conntrack state, u8.
pub const CTA_PROTOINFO_TCP_STATE: u16 = 1;

// enum ctattr_counters
/// Packets, be64.
pub const CTA_COUNTERS_PACKETS: u16 = 1;
/// Bytes, be64.
pub const CTA_COUNTERS_BYTES: u16 = 2;
/// Packets, legacy be32.
pub const CTA_COUNTERS32_PACKETS: u16 = 3;
/// Bytes, legacy be32.
pub const CTA_COUNTERS32_BYTES: u16 = 4;

// enum ctattr_tstamp
/// Flow start, be64 ns, wall clock.
pub const CTA_TIMESTAMP_START: u16 = 1;
/// Flow stop, be64 ns, wall clock.
pub const CTA_TIMESTAMP_STOP: u16 = 2;

/// Which conntrack event a message is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EventKind {
    /// A new flow was confirmed (`IPCT_NEW`).
    New,
    /// A flow changed state, status or mark.
    Update,
    /// A flow was removed (timed out, flushed, killed by RST).
    Destroy,
}

/// The `IPS_*` status bits of a flow (`nf_conntrack_common.h`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Hash)]
pub struct Status(pub u32);

impl Status {
    /// `IPS_EXPECTED`.
    pub const EXPECTED: u32 = 1 << 0;
    /// `IPS_SEEN_REPLY`: packets have gone both ways.
    pub const SEEN_REPLY: u32 = 1 << 1;
    /// `IPS_ASSURED`.
    pub const ASSURED: u32 = 1 << 2;
    /// `IPS_CONFIRMED`.
    pub const CONFIRMED: u32 = 1 << 3;
    /// `IPS_SRC_NAT`.
    pub const SRC_NAT: u32 = 1 << 4;
    /// `IPS_DST_NAT`: the original destination was rewritten (a Service's DNAT).
    pub const DST_NAT: u32 = 1 << 5;
    /// `IPS_DYING`.
    pub const DYING: u32 = 1 << 9;

    /// Whether every bit of `bits` is set.
    #[inline]
    pub fn has(self, bits: u32) -> bool {
        self.0 & bits == bits
    }
}

impl fmt::Display for Status {
    /// Hexadecimal, as `0x3ae`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

/// A TCP conntrack state (`enum tcp_conntrack`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TcpState(pub u8);

impl TcpState {
    /// `TCP_CONNTRACK_NONE`.
    pub const NONE: TcpState = TcpState(0);
    /// `TCP_CONNTRACK_SYN_SENT`.
    pub const SYN_SENT: TcpState = TcpState(1);
    /// `TCP_CONNTRACK_SYN_RECV`: the server answered the SYN.
    pub const SYN_RECV: TcpState = TcpState(2);
    /// `TCP_CONNTRACK_ESTABLISHED`.
    pub const ESTABLISHED: TcpState = TcpState(3);
    /// `TCP_CONNTRACK_FIN_WAIT`.
    pub const FIN_WAIT: TcpState = TcpState(4);
    /// `TCP_CONNTRACK_CLOSE_WAIT`.
    pub const CLOSE_WAIT: TcpState = TcpState(5);
    /// `TCP_CONNTRACK_LAST_ACK`.
    pub const LAST_ACK: TcpState = TcpState(6);
    /// `TCP_CONNTRACK_TIME_WAIT`.
    pub const TIME_WAIT: TcpState = TcpState(7);
    /// `TCP_CONNTRACK_CLOSE`.
    pub const CLOSE: TcpState = TcpState(8);
    /// `TCP_CONNTRACK_SYN_SENT2`.
    pub const SYN_SENT2: TcpState = TcpState(9);

    /// The kernel's name of the state (`conntrack -E` spelling).
    pub fn name(self) -> &'static str {
        match self.0 {
            0 => "NONE",
            1 => "SYN_SENT",
            2 => "SYN_RECV",
            3 => "ESTABLISHED",
            4 => "FIN_WAIT",
            5 => "CLOSE_WAIT",
            6 => "LAST_ACK",
            7 => "TIME_WAIT",
            8 => "CLOSE",
            9 => "SYN_SENT2",
            _ => "UNKNOWN",
        }
    }

    /// A state reached only after one side sent FIN (or the flow closed):
    /// FIN_WAIT, CLOSE_WAIT, LAST_ACK, TIME_WAIT or CLOSE: the states from
    /// FIN_WAIT to CLOSE (the socket filter tests the same range).
    pub fn is_closing(self) -> bool {
        (TcpState::FIN_WAIT.0..=TcpState::CLOSE.0).contains(&self.0)
    }
}

/// One direction's tuple: addresses, protocol, ports or ICMP identity.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Hash)]
pub struct Tuple {
    /// Source address (`CTA_IP_V4_SRC` / `CTA_IP_V6_SRC`).
    pub src: Option<IpAddr>,
    /// Destination address (`CTA_IP_V4_DST` / `CTA_IP_V6_DST`).
    pub dst: Option<IpAddr>,
    /// L4 protocol number (6 TCP, 17 UDP, 132 SCTP, ...).
    pub proto: Option<u8>,
    /// Source port (TCP, UDP, UDP-Lite, SCTP, DCCP).
    pub src_port: Option<u16>,
    /// Destination port.
    pub dst_port: Option<u16>,
    /// ICMP or ICMPv6 echo id.
    pub icmp_id: Option<u16>,
    /// ICMP or ICMPv6 type.
    pub icmp_type: Option<u8>,
    /// ICMP or ICMPv6 code.
    pub icmp_code: Option<u8>,
    /// Zone of this direction (`CTA_TUPLE_ZONE`).
    pub zone: Option<u16>,
}

/// Packet and byte counters of one direction (64-bit or legacy 32-bit form).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Hash)]
pub struct Counters {
    /// Packets.
    pub packets: Option<u64>,
    /// Bytes.
    pub bytes: Option<u64>,
}

/// A flow's start and stop times, wall-clock nanoseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Hash)]
pub struct Timestamp {
    /// When the flow was created.
    pub start: Option<u64>,
    /// When it ended (DESTROY only; back-dated to expiry by the kernel).
    pub stop: Option<u64>,
}

/// One conntrack event, decoded onto the stack. Borrows nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CtEvent {
    /// NEW, UPDATE or DESTROY.
    pub kind: EventKind,
    /// L3 family from `nfgenmsg` (`AF_INET`, `AF_INET6`).
    pub family: u8,
    /// Conntrack id (`CTA_ID`); the kernel reuses ids.
    pub id: Option<u32>,
    /// Conntrack zone (`CTA_ZONE`).
    pub zone: Option<u16>,
    /// Connection mark (`CTA_MARK`).
    pub mark: Option<u32>,
    /// Status bits (`CTA_STATUS`).
    pub status: Option<Status>,
    /// Seconds until expiry (`CTA_TIMEOUT`).
    pub timeout: Option<u32>,
    /// Original-direction tuple: who opened the flow, to which (service) address.
    pub orig: Option<Tuple>,
    /// Reply-direction tuple: after DNAT, its source is the backend.
    pub reply: Option<Tuple>,
    /// TCP state (`CTA_PROTOINFO_TCP_STATE`).
    pub tcp_state: Option<TcpState>,
    /// Original-direction counters (DESTROY, with `nf_conntrack_acct=1`).
    pub counters_orig: Option<Counters>,
    /// Reply-direction counters.
    pub counters_reply: Option<Counters>,
    /// Flow start / stop (DESTROY, with `nf_conntrack_timestamp=1`).
    pub timestamp: Option<Timestamp>,
    /// When the kernel emitted this event (`CTA_TIMESTAMP_EVENT`, Linux 6.14+).
    pub timestamp_event: Option<u64>,
}

impl CtEvent {
    /// An event of `kind` and `family` with every attribute absent.
    pub const fn empty(kind: EventKind, family: u8) -> CtEvent {
        CtEvent {
            kind,
            family,
            id: None,
            zone: None,
            mark: None,
            status: None,
            timeout: None,
            orig: None,
            reply: None,
            tcp_state: None,
            counters_orig: None,
            counters_reply: None,
            timestamp: None,
            timestamp_event: None,
        }
    }

    /// Makes `self` an event of `kind` and `family` with every attribute
    /// absent, field by field: assigning a whole [`CtEvent::empty`] makes the
    /// compiler build it aside and copy all of it.
    #[inline]
    fn reset(&mut self, kind: EventKind, family: u8) {
        let CtEvent {
            kind: k,
            family: f,
            id,
            zone,
            mark,
            status,
            timeout,
            orig,
            reply,
            tcp_state,
            counters_orig,
            counters_reply,
            timestamp,
            timestamp_event,
        } = self;
        (*k, *f) = (kind, family);
        (*id, *zone, *mark, *status, *timeout) = (None, None, None, None, None);
        (*orig, *reply, *tcp_state) = (None, None, None);
        (*counters_orig, *counters_reply, *timestamp) = (None, None, None);
        *timestamp_event = None;
    }

    /// Whether `nlmsg_type` is a ctnetlink conntrack event (NEW/UPDATE or DELETE).
    #[inline]
    pub fn is_event_type(nlmsg_type: u16) -> bool {
        nlmsg_type >> 8 == NFNL_SUBSYS_CTNETLINK
            && matches!(nlmsg_type & 0xff, IPCTNL_MSG_CT_NEW | IPCTNL_MSG_CT_DELETE)
    }

    /// Parses one netlink message (header included) carrying a conntrack event.
    /// Any other message is [`WireError::NotConntrackEvent`].
    ///
    /// The event is about 260 bytes: on a hot path, prefer
    /// [`CtEvent::parse_into`] with one event reused for every message.
    #[inline]
    pub fn parse(msg: &[u8]) -> Result<CtEvent, WireError> {
        let mut ev = CtEvent::empty(EventKind::New, 0);
        Self::parse_into(msg, &mut ev).map(|()| ev)
    }

    /// Parses like [`CtEvent::parse`] into `ev`, overwriting every field, so
    /// nothing is copied. On error `ev` holds no meaningful event.
    #[inline]
    pub fn parse_into(msg: &[u8], ev: &mut CtEvent) -> Result<(), WireError> {
        let (header, msg) = NetlinkHeader::parse(msg)?;
        if !Self::is_event_type(header.kind) {
            return Err(WireError::NotConntrackEvent {
                nlmsg_type: header.kind,
            });
        }
        Self::parse_body_into(&header, msg, ev)
    }

    /// Parses an event whose header was already read into `ev` (every field
    /// is overwritten); `msg` is the whole message, `nlmsg_len` bytes long.
    #[inline]
    pub(crate) fn parse_body_into(
        header: &NetlinkHeader,
        msg: &[u8],
        ev: &mut CtEvent,
    ) -> Result<(), WireError> {
        Self::parse_body_with::<true>(header, msg, ev)
    }

    /// `KERNEL_LAYOUT`: try the layouts the kernel writes (see [`layout`])
    /// before walking attribute by attribute. Both ways give the same result;
    /// tests run both on every fixture and on property-test events.
    #[inline]
    fn parse_body_with<const KERNEL_LAYOUT: bool>(
        header: &NetlinkHeader,
        msg: &[u8],
        ev: &mut CtEvent,
    ) -> Result<(), WireError> {
        let kind = match header.kind & 0xff {
            IPCTNL_MSG_CT_DELETE => EventKind::Destroy,
            _ if header.flags & (NLM_F_CREATE | NLM_F_EXCL) != 0 => EventKind::New,
            _ => EventKind::Update,
        };
        let (nfgen, attrs) = split_nfgenmsg(msg)?;
        ev.reset(kind, nfgen[0]);
        Self::fill::<KERNEL_LAYOUT>(ev, attrs)
    }

    /// Fills `ev` from the top-level attributes `attrs`.
    #[inline]
    fn fill<const KERNEL_LAYOUT: bool>(ev: &mut CtEvent, attrs: &[u8]) -> Result<(), WireError> {
        for nla in NlaIter::new(attrs, "ctnetlink message") {
            let nla = nla?;
            match nla.kind() {
                CTA_TUPLE_ORIG => {
                    let t = ev.orig.insert(Tuple::default());
                    if !(KERNEL_LAYOUT && layout::tuple(nla.payload(), t)) {
                        parse_tuple(nla, "CTA_TUPLE_ORIG", t)?;
                    }
                }
                CTA_TUPLE_REPLY => {
                    let t = ev.reply.insert(Tuple::default());
                    if !(KERNEL_LAYOUT && layout::tuple(nla.payload(), t)) {
                        parse_tuple(nla, "CTA_TUPLE_REPLY", t)?;
                    }
                }
                CTA_STATUS => ev.status = Some(Status(nla.u32_be("CTA_STATUS")?)),
                CTA_PROTOINFO => {
                    let state = match KERNEL_LAYOUT {
                        true => layout::protoinfo_tcp(nla.payload()),
                        false => None,
                    };
                    if let Some(state) =
                        state.map_or_else(|| parse_protoinfo(nla), |s| Ok(Some(s)))?
                    {
                        ev.tcp_state = Some(state);
                    }
                }
                CTA_TIMEOUT => ev.timeout = Some(nla.u32_be("CTA_TIMEOUT")?),
                CTA_MARK => ev.mark = Some(nla.u32_be("CTA_MARK")?),
                CTA_COUNTERS_ORIG => {
                    let (packets, bytes) = parse_pair::<KERNEL_LAYOUT>(nla, &COUNTERS_ORIG)?;
                    ev.counters_orig = Some(Counters { packets, bytes });
                }
                CTA_COUNTERS_REPLY => {
                    let (packets, bytes) = parse_pair::<KERNEL_LAYOUT>(nla, &COUNTERS_REPLY)?;
                    ev.counters_reply = Some(Counters { packets, bytes });
                }
                CTA_ID => ev.id = Some(nla.u32_be("CTA_ID")?),
                CTA_ZONE => ev.zone = Some(nla.u16_be("CTA_ZONE")?),
                CTA_TIMESTAMP => {
                    let (start, stop) = parse_pair::<KERNEL_LAYOUT>(nla, &TIMESTAMP)?;
                    ev.timestamp = Some(Timestamp { start, stop });
                }
                CTA_TIMESTAMP_EVENT => {
                    ev.timestamp_event = Some(nla.u64_be("CTA_TIMESTAMP_EVENT")?)
                }
                _ => {}
            }
        }
        Ok(())
    }
}

/// A netfilter message's `struct nfgenmsg` (family, version, res_id) and
/// its attributes; `msg` is the whole message, header included.
#[inline]
pub(crate) fn split_nfgenmsg(msg: &[u8]) -> Result<(&[u8; NFGENMSG_LEN], &[u8]), WireError> {
    let body = msg.get(NLMSG_HDRLEN..).unwrap_or_default();
    body.split_first_chunk::<NFGENMSG_LEN>()
        .ok_or(WireError::Truncated {
            what: "nfgenmsg",
            need: NFGENMSG_LEN,
            have: body.len(),
        })
}

/// Length of a ctnetlink request without attributes: a netlink header and
/// a `struct nfgenmsg`.
pub const DUMP_REQUEST_LEN: usize = NLMSG_HDRLEN + NFGENMSG_LEN;

/// A ctnetlink request of message type `msg` with `flags` (beside
/// `NLM_F_REQUEST`), numbered `seq`, for both address families
/// (`AF_UNSPEC`), with no attribute.
pub fn request(msg: u16, flags: u16, seq: u32) -> [u8; DUMP_REQUEST_LEN] {
    let mut out = [0u8; DUMP_REQUEST_LEN];
    let kind = NFNL_SUBSYS_CTNETLINK << 8 | msg;
    out[0..4].copy_from_slice(&(DUMP_REQUEST_LEN as u32).to_ne_bytes());
    out[4..6].copy_from_slice(&kind.to_ne_bytes());
    out[6..8].copy_from_slice(&(NLM_F_REQUEST | flags).to_ne_bytes());
    out[8..12].copy_from_slice(&seq.to_ne_bytes());
    // pid 0: to the kernel. nfgenmsg: AF_UNSPEC, NFNETLINK_V0, res_id 0.
    out
}

/// The request for every entry of the conntrack table of the socket's
/// network namespace, both address families, numbered `seq`. The kernel
/// answers with one `IPCTNL_MSG_CT_NEW` message per entry, carrying the
/// attributes of an event, in parts flagged `NLM_F_MULTI`, then
/// `NLMSG_DONE`.
pub fn dump_request(seq: u32) -> [u8; DUMP_REQUEST_LEN] {
    request(IPCTNL_MSG_CT_GET, NLM_F_DUMP, seq)
}

/// The fixed layouts the kernel writes for the common nests, matched at
/// known offsets so that reading them is not a chain of dependent length
/// loads (the attribute walk costs about 2 ns per attribute here, and an
/// event holds 25-35 attributes).
///
/// A layout matches only when every attribute header at its offset is
/// exactly the one the kernel writes (length and type, nested flag
/// included) and the nest is exactly that long: then the walk would visit
/// the same well-formed attributes and give the same values. Anything else
/// (a zone, ICMP, a PAD attribute, an older kernel without NLA_F_NESTED)
/// falls back to the walk.
mod layout {
    use super::*;
    use crate::wire::nla::NLA_F_NESTED;

    /// An attribute header as it is in memory (host order).
    const fn hdr(len: u16, kind: u16) -> u32 {
        let l = len.to_ne_bytes();
        let t = kind.to_ne_bytes();
        u32::from_ne_bytes([l[0], l[1], t[0], t[1]])
    }

    #[inline(always)]
    fn word<const N: usize>(p: &[u8; N], at: usize) -> u32 {
        match p.get(at..at + 4) {
            Some(&[a, b, c, d]) => u32::from_ne_bytes([a, b, c, d]),
            _ => 0,
        }
    }

    #[inline(always)]
    fn bytes<const N: usize, const M: usize>(p: &[u8; N], at: usize) -> [u8; M] {
        p.get(at..at + M)
            .and_then(|s| <[u8; M]>::try_from(s).ok())
            .unwrap_or([0; M])
    }

    /// The protocol nest with number and ports, at offset `at` of `p`.
    #[inline(always)]
    fn ports<const N: usize>(p: &[u8; N], at: usize, t: &mut Tuple) -> bool {
        let ok = (word(p, at) == hdr(28, CTA_TUPLE_PROTO | NLA_F_NESTED))
            & (word(p, at + 4) == hdr(5, CTA_PROTO_NUM))
            & (word(p, at + 12) == hdr(6, CTA_PROTO_SRC_PORT))
            & (word(p, at + 20) == hdr(6, CTA_PROTO_DST_PORT));
        if ok {
            t.proto = Some(bytes::<N, 1>(p, at + 8)[0]);
            t.src_port = Some(u16::from_be_bytes(bytes(p, at + 16)));
            t.dst_port = Some(u16::from_be_bytes(bytes(p, at + 24)));
        }
        ok
    }

    /// An IPv4 or IPv6 tuple with ports (TCP, UDP, UDP-Lite, SCTP, DCCP).
    #[inline]
    pub(super) fn tuple(payload: &[u8], t: &mut Tuple) -> bool {
        if let Ok(p) = <&[u8; 48]>::try_from(payload) {
            let ok = (word(p, 0) == hdr(20, CTA_TUPLE_IP | NLA_F_NESTED))
                & (word(p, 4) == hdr(8, CTA_IP_V4_SRC))
                & (word(p, 12) == hdr(8, CTA_IP_V4_DST));
            if ok && ports(p, 20, t) {
                t.src = Some(IpAddr::V4(Ipv4Addr::from(bytes::<48, 4>(p, 8))));
                t.dst = Some(IpAddr::V4(Ipv4Addr::from(bytes::<48, 4>(p, 16))));
                return true;
            }
        } else if let Ok(p) = <&[u8; 72]>::try_from(payload) {
            let ok = (word(p, 0) == hdr(44, CTA_TUPLE_IP | NLA_F_NESTED))
                & (word(p, 4) == hdr(20, CTA_IP_V6_SRC))
                & (word(p, 24) == hdr(20, CTA_IP_V6_DST));
            if ok && ports(p, 44, t) {
                t.src = Some(IpAddr::V6(Ipv6Addr::from(bytes::<72, 16>(p, 8))));
                t.dst = Some(IpAddr::V6(Ipv6Addr::from(bytes::<72, 16>(p, 28))));
                return true;
            }
        }
        *t = Tuple::default();
        false
    }

    /// TCP protoinfo in the kernel's order (`tcp_to_nlattr`): state, both
    /// window scales and both flag pairs (NEW, UPDATE), or the state alone
    /// (DESTROY). Returns the state.
    #[inline]
    pub(super) fn protoinfo_tcp(payload: &[u8]) -> Option<TcpState> {
        if let Ok(p) = <&[u8; 44]>::try_from(payload) {
            let ok = (word(p, 0) == hdr(44, CTA_PROTOINFO_TCP | NLA_F_NESTED))
                & (word(p, 4) == hdr(5, CTA_PROTOINFO_TCP_STATE))
                & (word(p, 12) == hdr(5, 2))
                & (word(p, 20) == hdr(5, 3))
                & (word(p, 28) == hdr(6, 4))
                & (word(p, 36) == hdr(6, 5));
            return ok.then(|| TcpState(bytes::<44, 1>(p, 8)[0]));
        }
        let p = <&[u8; 12]>::try_from(payload).ok()?;
        let ok = (word(p, 0) == hdr(12, CTA_PROTOINFO_TCP | NLA_F_NESTED))
            & (word(p, 4) == hdr(5, CTA_PROTOINFO_TCP_STATE));
        ok.then(|| TcpState(bytes::<12, 1>(p, 8)[0]))
    }

    /// Two be64 attributes of types `a` then `b` (counters: packets, bytes;
    /// timestamp: start, stop), with no PAD attribute.
    #[inline]
    pub(super) fn pair(payload: &[u8], a: u16, b: u16) -> Option<(u64, u64)> {
        let p = <&[u8; 24]>::try_from(payload).ok()?;
        let ok = (word(p, 0) == hdr(12, a)) & (word(p, 12) == hdr(12, b));
        ok.then(|| {
            (
                u64::from_be_bytes(bytes(p, 4)),
                u64::from_be_bytes(bytes(p, 16)),
            )
        })
    }
}

/// A nest of two 64-bit values: its name, the attribute types, and the
/// legacy 32-bit types of the same values (0 where there are none).
struct PairNest {
    name: &'static str,
    first: (u16, &'static str),
    second: (u16, &'static str),
    first32: (u16, &'static str),
    second32: (u16, &'static str),
}

const fn counters_nest(name: &'static str) -> PairNest {
    PairNest {
        name,
        first: (CTA_COUNTERS_PACKETS, "CTA_COUNTERS_PACKETS"),
        second: (CTA_COUNTERS_BYTES, "CTA_COUNTERS_BYTES"),
        first32: (CTA_COUNTERS32_PACKETS, "CTA_COUNTERS32_PACKETS"),
        second32: (CTA_COUNTERS32_BYTES, "CTA_COUNTERS32_BYTES"),
    }
}

const COUNTERS_ORIG: PairNest = counters_nest("CTA_COUNTERS_ORIG");
const COUNTERS_REPLY: PairNest = counters_nest("CTA_COUNTERS_REPLY");
const TIMESTAMP: PairNest = PairNest {
    name: "CTA_TIMESTAMP",
    first: (CTA_TIMESTAMP_START, "CTA_TIMESTAMP_START"),
    second: (CTA_TIMESTAMP_STOP, "CTA_TIMESTAMP_STOP"),
    first32: (0, ""),
    second32: (0, ""),
};

/// Counters (packets, bytes) or timestamps (start, stop).
#[inline]
fn parse_pair<const KERNEL_LAYOUT: bool>(
    nest: Nla<'_>,
    kind: &PairNest,
) -> Result<(Option<u64>, Option<u64>), WireError> {
    if KERNEL_LAYOUT {
        if let Some((a, b)) = layout::pair(nest.payload(), kind.first.0, kind.second.0) {
            return Ok((Some(a), Some(b)));
        }
    }
    let (mut first, mut second) = (None, None);
    for nla in nest.nested(kind.name) {
        let nla = nla?;
        match nla.kind() {
            0 => {}
            t if t == kind.first.0 => first = Some(nla.u64_be(kind.first.1)?),
            t if t == kind.second.0 => second = Some(nla.u64_be(kind.second.1)?),
            t if t == kind.first32.0 => first = Some(u64::from(nla.u32_be(kind.first32.1)?)),
            t if t == kind.second32.0 => second = Some(u64::from(nla.u32_be(kind.second32.1)?)),
            _ => {}
        }
    }
    Ok((first, second))
}

fn parse_tuple(nest: Nla<'_>, name: &'static str, t: &mut Tuple) -> Result<(), WireError> {
    for nla in nest.nested(name) {
        let nla = nla?;
        match nla.kind() {
            CTA_TUPLE_IP => {
                for ip in nla.nested("CTA_TUPLE_IP") {
                    let ip = ip?;
                    match ip.kind() {
                        CTA_IP_V4_SRC => t.src = Some(v4(ip, "CTA_IP_V4_SRC")?),
                        CTA_IP_V4_DST => t.dst = Some(v4(ip, "CTA_IP_V4_DST")?),
                        CTA_IP_V6_SRC => t.src = Some(v6(ip, "CTA_IP_V6_SRC")?),
                        CTA_IP_V6_DST => t.dst = Some(v6(ip, "CTA_IP_V6_DST")?),
                        _ => {}
                    }
                }
            }
            CTA_TUPLE_PROTO => {
                for p in nla.nested("CTA_TUPLE_PROTO") {
                    let p = p?;
                    match p.kind() {
                        CTA_PROTO_NUM => t.proto = Some(p.u8("CTA_PROTO_NUM")?),
                        CTA_PROTO_SRC_PORT => t.src_port = Some(p.u16_be("CTA_PROTO_SRC_PORT")?),
                        CTA_PROTO_DST_PORT => t.dst_port = Some(p.u16_be("CTA_PROTO_DST_PORT")?),
                        CTA_PROTO_ICMP_ID | CTA_PROTO_ICMPV6_ID => {
                            t.icmp_id = Some(p.u16_be("CTA_PROTO_ICMP_ID")?)
                        }
                        CTA_PROTO_ICMP_TYPE | CTA_PROTO_ICMPV6_TYPE => {
                            t.icmp_type = Some(p.u8("CTA_PROTO_ICMP_TYPE")?)
                        }
                        CTA_PROTO_ICMP_CODE | CTA_PROTO_ICMPV6_CODE => {
                            t.icmp_code = Some(p.u8("CTA_PROTO_ICMP_CODE")?)
                        }
                        _ => {}
                    }
                }
            }
            CTA_TUPLE_ZONE => t.zone = Some(nla.u16_be("CTA_TUPLE_ZONE")?),
            _ => {}
        }
    }
    Ok(())
}

#[inline]
fn v4(nla: Nla<'_>, name: &'static str) -> Result<IpAddr, WireError> {
    Ok(IpAddr::V4(Ipv4Addr::from(nla.bytes::<4>(name)?)))
}

#[inline]
fn v6(nla: Nla<'_>, name: &'static str) -> Result<IpAddr, WireError> {
    Ok(IpAddr::V6(Ipv6Addr::from(nla.bytes::<16>(name)?)))
}

/// The TCP state, if the protoinfo holds TCP info with a state.
fn parse_protoinfo(nest: Nla<'_>) -> Result<Option<TcpState>, WireError> {
    let mut state = None;
    for nla in nest.nested("CTA_PROTOINFO") {
        let nla = nla?;
        if nla.kind() == CTA_PROTOINFO_TCP {
            for tcp in nla.nested("CTA_PROTOINFO_TCP") {
                let tcp = tcp?;
                if tcp.kind() == CTA_PROTOINFO_TCP_STATE {
                    state = Some(TcpState(tcp.u8("CTA_PROTOINFO_TCP_STATE")?));
                }
            }
        }
    }
    Ok(state)
}

/// Writes `key=value`, or nothing when the value is absent.
struct Field<'a, T>(&'a str, Option<T>);

impl<T: fmt::Display> fmt::Display for Field<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.1 {
            Some(v) => write!(f, " {}={}", self.0, v),
            None => Ok(()),
        }
    }
}

impl fmt::Display for Tuple {
    /// `proto=6 src=10.0.0.1 dst=10.96.0.10 sport=40000 dport=80`, absent
    /// fields left out (the `conntrack -E` spelling of a tuple).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}{}{}{}{}{}{}{}{}",
            Field("proto", self.proto),
            Field("src", self.src),
            Field("dst", self.dst),
            Field("sport", self.src_port),
            Field("dport", self.dst_port),
            Field("icmp_id", self.icmp_id),
            Field("icmp_type", self.icmp_type),
            Field("icmp_code", self.icmp_code),
            Field("zone", self.zone),
        )
    }
}

impl fmt::Display for CtEvent {
    /// One line: `[DESTROY] family=2 id=7 status=0x3ae state=TIME_WAIT
    /// event_ns=... orig: proto=6 src=... reply: ... counters_orig: packets=5
    /// bytes=346 ... timestamp: start=... stop=...`; absent fields left out.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            EventKind::New => "NEW",
            EventKind::Update => "UPDATE",
            EventKind::Destroy => "DESTROY",
        };
        write!(
            f,
            "[{kind}] family={}{}{}{}{}{}{}{}",
            self.family,
            Field("id", self.id),
            Field("status", self.status),
            Field("state", self.tcp_state.map(TcpState::name)),
            Field("timeout", self.timeout),
            Field("mark", self.mark),
            Field("zone", self.zone),
            Field("event_ns", self.timestamp_event),
        )?;
        if let Some(t) = &self.orig {
            write!(f, " orig:{t}")?;
        }
        if let Some(t) = &self.reply {
            write!(f, " reply:{t}")?;
        }
        for (name, c) in [
            ("counters_orig", &self.counters_orig),
            ("counters_reply", &self.counters_reply),
        ] {
            if let Some(c) = c {
                write!(
                    f,
                    " {name}:{}{}",
                    Field("packets", c.packets),
                    Field("bytes", c.bytes)
                )?;
            }
        }
        if let Some(ts) = &self.timestamp {
            write!(
                f,
                " timestamp:{}{}",
                Field("start", ts.start),
                Field("stop", ts.stop)
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    //! Hand-built messages for what the kernel captures lack. Attribute numbers
    //! are written as literals from `nfnetlink_conntrack.h`, not the constants
    //! above, so a wrong constant cannot hide behind itself.
    use super::*;

    #[test]
    fn dump_request_is_a_ctnetlink_get_with_the_dump_flags() {
        let req = dump_request(7);
        let (h, msg) = NetlinkHeader::parse(&req).unwrap();
        assert_eq!(msg.len(), 20);
        assert_eq!(
            (h.len, h.kind, h.flags, h.seq, h.pid),
            (20, 0x0101, 0x0301, 7, 0)
        );
        assert_eq!(&req[16..], &[0, 0, 0, 0], "AF_UNSPEC, version 0, res_id 0");
    }
    use crate::wire::encode::{encode, fixture_messages, Builder, Form};
    use crate::wire::{Datagram, Message};
    use proptest::prelude::*;

    /// Header for a ctnetlink message: type NEW (0x100) or DELETE (0x102).
    fn message(
        nlmsg_type: u16,
        flags: u16,
        family: u8,
        attrs: impl FnOnce(&mut Builder),
    ) -> Vec<u8> {
        let mut b = Builder::new();
        b.buf.extend_from_slice(&[0; 4]);
        b.buf.extend_from_slice(&nlmsg_type.to_ne_bytes());
        b.buf.extend_from_slice(&flags.to_ne_bytes());
        b.buf.extend_from_slice(&[0; 8]);
        b.buf.extend_from_slice(&[family, 0, 0, 0]);
        attrs(&mut b);
        let len = b.buf.len() as u32;
        b.buf[..4].copy_from_slice(&len.to_ne_bytes());
        b.buf
    }

    fn nest(b: &mut Builder, kind: u16, inner: impl FnOnce(&mut Builder)) {
        let at = b.open(kind);
        inner(b);
        b.close(at);
    }

    #[test]
    fn ipv6_tcp_destroy_with_zone_mark_counters_and_timestamps() {
        let src: Ipv6Addr = "fd00::1".parse().unwrap();
        let vip: Ipv6Addr = "fd00:96::a".parse().unwrap();
        let backend: Ipv6Addr = "fd00:123::2".parse().unwrap();
        let msg = message(0x102, 0, 10, |b| {
            nest(b, 1, |b| {
                nest(b, 1, |b| {
                    b.attr(3, &src.octets());
                    b.attr(4, &vip.octets());
                });
                nest(b, 2, |b| {
                    b.attr(1, &[6]);
                    b.attr(2, &40000u16.to_be_bytes());
                    b.attr(3, &80u16.to_be_bytes());
                });
                b.attr(3, &7u16.to_be_bytes());
            });
            nest(b, 2, |b| {
                nest(b, 1, |b| {
                    b.attr(3, &backend.octets());
                    b.attr(4, &src.octets());
                });
                nest(b, 2, |b| {
                    b.attr(1, &[6]);
                    b.attr(2, &8080u16.to_be_bytes());
                    b.attr(3, &40000u16.to_be_bytes());
                });
            });
            b.attr(12, &0xdead_beefu32.to_be_bytes());
            b.attr(3, &0x3aeu32.to_be_bytes());
            b.attr(8, &0x4000u32.to_be_bytes());
            b.attr(18, &7u16.to_be_bytes());
            nest(b, 9, |b| {
                b.attr(1, &5u64.to_be_bytes());
                b.attr(2, &(5u64 << 33).to_be_bytes());
            });
            nest(b, 10, |b| {
                b.attr(1, &4u64.to_be_bytes());
                b.attr(2, &300u64.to_be_bytes());
            });
            nest(b, 20, |b| {
                b.attr(1, &100u64.to_be_bytes());
                b.attr(2, &250u64.to_be_bytes());
            });
            nest(b, 4, |b| nest(b, 1, |b| b.attr(1, &[7])));
            b.attr(27, &300u64.to_be_bytes());
        });
        let ev = CtEvent::parse(&msg).unwrap();
        assert_eq!(ev.kind, EventKind::Destroy);
        assert_eq!(ev.family, AF_INET6);
        let orig = ev.orig.unwrap();
        assert_eq!(orig.src, Some(IpAddr::V6(src)));
        assert_eq!(orig.dst, Some(IpAddr::V6(vip)));
        assert_eq!(
            (orig.proto, orig.src_port, orig.dst_port),
            (Some(6), Some(40000), Some(80))
        );
        assert_eq!(orig.zone, Some(7));
        let reply = ev.reply.unwrap();
        assert_eq!(reply.src, Some(IpAddr::V6(backend)));
        assert_eq!((reply.src_port, reply.zone), (Some(8080), None));
        assert_eq!(ev.id, Some(0xdead_beef));
        let status = ev.status.unwrap();
        assert!(status.has(Status::SEEN_REPLY | Status::ASSURED | Status::DST_NAT | Status::DYING));
        assert_eq!((ev.mark, ev.zone), (Some(0x4000), Some(7)));
        assert_eq!(
            ev.counters_orig,
            Some(Counters {
                packets: Some(5),
                bytes: Some(5 << 33)
            })
        );
        assert_eq!(
            ev.counters_reply,
            Some(Counters {
                packets: Some(4),
                bytes: Some(300)
            })
        );
        assert_eq!(
            ev.timestamp,
            Some(Timestamp {
                start: Some(100),
                stop: Some(250)
            })
        );
        assert_eq!(ev.tcp_state, Some(TcpState::TIME_WAIT));
        assert_eq!(ev.timestamp_event, Some(300));
        assert_eq!(ev.timeout, None);
    }

    #[test]
    fn icmp_echo_new_event() {
        let msg = message(0x100, 0x600, 2, |b| {
            nest(b, 1, |b| {
                nest(b, 1, |b| {
                    b.attr(1, &[10, 0, 0, 1]);
                    b.attr(2, &[10, 96, 0, 1]);
                });
                nest(b, 2, |b| {
                    b.attr(1, &[1]);
                    b.attr(4, &0x1234u16.to_be_bytes());
                    b.attr(5, &[8]);
                    b.attr(6, &[0]);
                });
            });
            b.attr(7, &30u32.to_be_bytes());
        });
        let ev = CtEvent::parse(&msg).unwrap();
        assert_eq!(ev.kind, EventKind::New);
        let t = ev.orig.unwrap();
        assert_eq!(t.dst, Some(IpAddr::V4(Ipv4Addr::new(10, 96, 0, 1))));
        assert_eq!(
            (t.proto, t.icmp_id, t.icmp_type, t.icmp_code),
            (Some(1), Some(0x1234), Some(8), Some(0))
        );
        assert_eq!((t.src_port, t.dst_port), (None, None));
        assert_eq!(ev.timeout, Some(30));
        assert_eq!(
            (ev.tcp_state, ev.counters_orig, ev.timestamp),
            (None, None, None)
        );
    }

    #[test]
    fn icmpv6_attributes_fill_the_same_fields() {
        let msg = message(0x100, 0, 10, |b| {
            nest(b, 1, |b| {
                nest(b, 2, |b| {
                    b.attr(1, &[58]);
                    b.attr(7, &9u16.to_be_bytes());
                    b.attr(8, &[128]);
                    b.attr(9, &[0]);
                });
            });
        });
        let ev = CtEvent::parse(&msg).unwrap();
        assert_eq!(ev.kind, EventKind::Update);
        let t = ev.orig.unwrap();
        assert_eq!(
            (t.proto, t.icmp_id, t.icmp_type, t.icmp_code),
            (Some(58), Some(9), Some(128), Some(0))
        );
        assert_eq!((t.src, t.dst), (None, None));
    }

    #[test]
    fn sctp_destroy_with_legacy_32bit_counters_and_no_timestamp() {
        let msg = message(0x102, 0, 2, |b| {
            nest(b, 1, |b| {
                nest(b, 2, |b| {
                    b.attr(1, &[132]);
                    b.attr(2, &5000u16.to_be_bytes());
                    b.attr(3, &38412u16.to_be_bytes());
                });
            });
            nest(b, 9, |b| {
                b.attr(3, &u32::MAX.to_be_bytes());
                b.attr(4, &70000u32.to_be_bytes());
            });
            nest(b, 10, |b| b.attr(4, &1u32.to_be_bytes()));
            // SCTP protoinfo (CTA_PROTOINFO_SCTP = 3): not TCP, no TCP state.
            nest(b, 4, |b| nest(b, 3, |b| b.attr(1, &[3])));
        });
        let ev = CtEvent::parse(&msg).unwrap();
        let t = ev.orig.unwrap();
        assert_eq!(
            (t.proto, t.src_port, t.dst_port),
            (Some(132), Some(5000), Some(38412))
        );
        assert_eq!(
            ev.counters_orig,
            Some(Counters {
                packets: Some(u64::from(u32::MAX)),
                bytes: Some(70000)
            })
        );
        assert_eq!(
            ev.counters_reply,
            Some(Counters {
                packets: None,
                bytes: Some(1)
            })
        );
        assert_eq!(
            (ev.timestamp, ev.timestamp_event, ev.tcp_state),
            (None, None, None)
        );
    }

    #[test]
    fn non_dnat_flow_keeps_its_destination_in_both_directions() {
        // An unreplied UDP flow with no NAT: reply source == original destination.
        let msg = message(0x102, 0, 2, |b| {
            for (kind, s, d) in [
                (1, [10, 124, 0, 1], [10, 124, 255, 254]),
                (2, [10, 124, 255, 254], [10, 124, 0, 1]),
            ] {
                nest(b, kind, |b| {
                    nest(b, 1, |b| {
                        b.attr(1, &s);
                        b.attr(2, &d);
                    });
                    nest(b, 2, |b| b.attr(1, &[17]));
                });
            }
            b.attr(3, &(Status::CONFIRMED | Status::DYING).to_be_bytes());
        });
        let ev = CtEvent::parse(&msg).unwrap();
        assert_eq!(ev.orig.unwrap().dst, ev.reply.unwrap().src);
        let status = ev.status.unwrap();
        assert!(!status.has(Status::DST_NAT));
        assert!(!status.has(Status::SEEN_REPLY));
    }

    #[test]
    fn unknown_attributes_are_skipped_at_every_level() {
        let msg = message(0x100, 0, 2, |b| {
            b.attr(200, &[1, 2, 3]);
            nest(b, 1, |b| {
                b.attr(99, &[0; 9]);
                nest(b, 1, |b| {
                    b.attr(77, &[1]);
                    b.attr(1, &[1, 2, 3, 4]);
                });
            });
            nest(b, 20, |b| b.attr(3, &[0; 4])); // CTA_TIMESTAMP_PAD
        });
        let ev = CtEvent::parse(&msg).unwrap();
        assert_eq!(
            ev.orig.unwrap().src,
            Some(IpAddr::V4(Ipv4Addr::new(1, 2, 3, 4)))
        );
        assert_eq!(
            ev.timestamp,
            Some(Timestamp {
                start: None,
                stop: None
            })
        );
    }

    #[test]
    fn wrong_attribute_sizes_are_typed_errors() {
        type Attrs = Box<dyn Fn(&mut Builder)>;
        let cases: [(&str, Attrs, WireError); 4] = [
            (
                "short id",
                Box::new(|b: &mut Builder| b.attr(12, &[1, 2])),
                WireError::AttrSize {
                    attr: "CTA_ID",
                    expected: 4,
                    got: 2,
                },
            ),
            (
                "v4 with 16 bytes",
                Box::new(|b: &mut Builder| nest(b, 1, |b| nest(b, 1, |b| b.attr(2, &[0; 16])))),
                WireError::AttrSize {
                    attr: "CTA_IP_V4_DST",
                    expected: 4,
                    got: 16,
                },
            ),
            (
                "2-byte proto num",
                Box::new(|b: &mut Builder| nest(b, 2, |b| nest(b, 2, |b| b.attr(1, &[0, 6])))),
                WireError::AttrSize {
                    attr: "CTA_PROTO_NUM",
                    expected: 1,
                    got: 2,
                },
            ),
            (
                "4-byte bytes counter",
                Box::new(|b: &mut Builder| nest(b, 9, |b| b.attr(2, &[0; 4]))),
                WireError::AttrSize {
                    attr: "CTA_COUNTERS_BYTES",
                    expected: 8,
                    got: 4,
                },
            ),
        ];
        for (what, attrs, want) in cases {
            let msg = message(0x102, 0, 2, |b| attrs(b));
            assert_eq!(CtEvent::parse(&msg), Err(want), "{what}");
        }
    }

    #[test]
    fn nest_overflowing_its_parent_is_an_error() {
        let mut msg = message(0x100, 0, 2, |b| {
            nest(b, 1, |b| nest(b, 1, |b| b.attr(1, &[1, 2, 3, 4])));
        });
        // Inner CTA_TUPLE_IP claims 4 bytes more than CTA_TUPLE_ORIG holds.
        let inner = 20 + 4;
        let len = u16::from_ne_bytes([msg[inner], msg[inner + 1]]) + 4;
        msg[inner..inner + 2].copy_from_slice(&len.to_ne_bytes());
        assert_eq!(
            CtEvent::parse(&msg),
            Err(WireError::AttrLength {
                parent: "CTA_TUPLE_ORIG",
                nla_type: 1,
                nla_len: 16,
                available: 12
            })
        );
    }

    #[test]
    fn message_too_short_for_nfgenmsg_and_foreign_types() {
        let mut msg = message(0x100, 0, 2, |_| {});
        msg.truncate(18);
        msg[..4].copy_from_slice(&18u32.to_ne_bytes());
        assert_eq!(
            CtEvent::parse(&msg),
            Err(WireError::Truncated {
                what: "nfgenmsg",
                need: 4,
                have: 2
            })
        );
        let get = message(0x101, 0, 2, |_| {}); // IPCTNL_MSG_CT_GET
        assert_eq!(
            CtEvent::parse(&get),
            Err(WireError::NotConntrackEvent { nlmsg_type: 0x101 })
        );
        assert_eq!(
            Message::parse(&get),
            Ok(Message::Other { nlmsg_type: 0x101 })
        );
    }

    #[test]
    fn a_bad_event_does_not_hide_the_next_one_in_a_datagram() {
        let bad = message(0x102, 0, 2, |b| b.attr(12, &[1]));
        let good = message(0x102, 0, 2, |b| b.attr(12, &9u32.to_be_bytes()));
        let mut d = bad.clone();
        d.extend_from_slice(&good);
        let got: Vec<_> = Datagram::new(&d).collect();
        assert!(got[0].is_err());
        assert!(matches!(
            got[1],
            Ok(Message::Event(CtEvent { id: Some(9), .. }))
        ));
        assert_eq!(got.len(), 2);
    }

    #[test]
    fn display_is_one_line_with_absent_fields_left_out() {
        let mut ev = CtEvent::empty(EventKind::Destroy, AF_INET6);
        ev.id = Some(7);
        ev.tcp_state = Some(TcpState::TIME_WAIT);
        ev.orig = Some(Tuple {
            proto: Some(6),
            dst: Some("fd00::a".parse().unwrap()),
            dst_port: Some(80),
            ..Tuple::default()
        });
        ev.counters_reply = Some(Counters {
            packets: Some(2),
            bytes: None,
        });
        assert_eq!(
            ev.to_string(),
            "[DESTROY] family=10 id=7 state=TIME_WAIT orig: proto=6 dst=fd00::a dport=80 \
             counters_reply: packets=2"
        );
    }

    /// Parses with and without the kernel-layout matching.
    fn both_ways(msg: &[u8]) -> (Result<CtEvent, WireError>, Result<CtEvent, WireError>) {
        let (h, m) = NetlinkHeader::parse(msg).unwrap();
        let way = |fast: bool| {
            let mut ev = CtEvent::empty(EventKind::New, 0);
            match fast {
                true => CtEvent::parse_body_with::<true>(&h, m, &mut ev),
                false => CtEvent::parse_body_with::<false>(&h, m, &mut ev),
            }
            .map(|()| ev)
        };
        (way(true), way(false))
    }

    #[test]
    fn kernel_layouts_match_the_fixtures_and_agree_with_the_walk() {
        let messages = fixture_messages();
        assert_eq!(messages.len(), 1962);
        let (mut tuples, mut tcp, mut pairs) = (0, 0, 0);
        for msg in &messages {
            let (fast, walk) = both_ways(msg);
            assert_eq!(fast, walk);
            // Count how often each layout matched, so this test cannot pass
            // by never taking the fast way.
            for nla in NlaIter::new(&msg[20..], "m") {
                let nla = nla.unwrap();
                match nla.kind() {
                    CTA_TUPLE_ORIG | CTA_TUPLE_REPLY => {
                        tuples += usize::from(layout::tuple(nla.payload(), &mut Tuple::default()))
                    }
                    CTA_PROTOINFO => {
                        tcp += usize::from(layout::protoinfo_tcp(nla.payload()).is_some())
                    }
                    CTA_COUNTERS_ORIG | CTA_COUNTERS_REPLY => {
                        pairs += usize::from(layout::pair(nla.payload(), 1, 2).is_some())
                    }
                    CTA_TIMESTAMP => {
                        pairs += usize::from(layout::pair(nla.payload(), 1, 2).is_some())
                    }
                    _ => {}
                }
            }
        }
        assert_eq!(tuples, 2 * 1962, "every captured tuple is IPv4 with ports");
        // Every TCP message (427 + 40 + 500) carries protoinfo in one of the
        // two kernel layouts; every DESTROY has counters both ways and a
        // timestamp in the pair layout.
        assert_eq!(tcp, 967);
        let destroys = messages.iter().filter(|m| m[4] == 2).count();
        assert_eq!(pairs, 3 * destroys);
    }

    #[test]
    fn kernel_layout_of_an_ipv6_tuple_matches() {
        let ev = CtEvent {
            orig: Some(Tuple {
                src: Some("fd00::1".parse().unwrap()),
                dst: Some("fd00:96::a".parse().unwrap()),
                proto: Some(6),
                src_port: Some(1),
                dst_port: Some(2),
                ..Tuple::default()
            }),
            ..CtEvent::empty(EventKind::New, AF_INET6)
        };
        let msg = encode(&ev, Form::default());
        let nla = NlaIter::new(&msg[20..], "m").next().unwrap().unwrap();
        let mut t = Tuple::default();
        assert!(layout::tuple(nla.payload(), &mut t));
        assert_eq!(Some(t), ev.orig);
    }

    fn addr(v6: bool) -> impl Strategy<Value = IpAddr> {
        if v6 {
            any::<[u8; 16]>()
                .prop_map(|o| IpAddr::V6(Ipv6Addr::from(o)))
                .boxed()
        } else {
            any::<[u8; 4]>()
                .prop_map(|o| IpAddr::V4(Ipv4Addr::from(o)))
                .boxed()
        }
    }

    fn tuple(v6: bool) -> impl Strategy<Value = Tuple> {
        (
            (
                proptest::option::of(addr(v6)),
                proptest::option::of(addr(v6)),
                proptest::option::of(any::<u8>()),
            ),
            (
                proptest::option::of(any::<u16>()),
                proptest::option::of(any::<u16>()),
                proptest::option::of(any::<u16>()),
                proptest::option::of(any::<u8>()),
                proptest::option::of(any::<u8>()),
                proptest::option::of(any::<u16>()),
            ),
        )
            .prop_map(
                |((src, dst, proto), (src_port, dst_port, icmp_id, icmp_type, icmp_code, zone))| {
                    Tuple {
                        src,
                        dst,
                        proto,
                        src_port,
                        dst_port,
                        icmp_id,
                        icmp_type,
                        icmp_code,
                        zone,
                    }
                },
            )
    }

    fn counters() -> impl Strategy<Value = Counters> {
        let value = prop_oneof![any::<u64>(), 0..=u64::from(u32::MAX)];
        (
            proptest::option::of(value.clone()),
            proptest::option::of(value),
        )
            .prop_map(|(packets, bytes)| Counters { packets, bytes })
    }

    prop_compose! {
        fn event()(v6 in any::<bool>())(
            kind in prop_oneof![Just(EventKind::New), Just(EventKind::Update), Just(EventKind::Destroy)],
            family in Just(if v6 { AF_INET6 } else { AF_INET }),
            ids in (
                proptest::option::of(any::<u32>()),
                proptest::option::of(any::<u16>()),
                proptest::option::of(any::<u32>()),
                proptest::option::of(any::<u32>().prop_map(Status)),
                proptest::option::of(any::<u32>()),
            ),
            orig in proptest::option::of(tuple(v6)),
            reply in proptest::option::of(tuple(v6)),
            tcp_state in proptest::option::of(any::<u8>().prop_map(TcpState)),
            counters_orig in proptest::option::of(counters()),
            counters_reply in proptest::option::of(counters()),
            timestamp in proptest::option::of(
                (proptest::option::of(any::<u64>()), proptest::option::of(any::<u64>()))
                    .prop_map(|(start, stop)| Timestamp { start, stop })),
            timestamp_event in proptest::option::of(any::<u64>()),
        ) -> CtEvent {
            let (id, zone, mark, status, timeout) = ids;
            CtEvent {
                kind, family, id, zone, mark, status, timeout, orig, reply, tcp_state,
                counters_orig, counters_reply, timestamp, timestamp_event,
            }
        }
    }

    /// Events as the kernel sends them for TCP/UDP flows: every field of the
    /// common layouts present, so the kernel-layout matching is exercised.
    fn kernel_shaped_event() -> impl Strategy<Value = CtEvent> {
        (
            (
                any::<bool>(),
                any::<bool>(),
                prop_oneof![Just(6u8), Just(17), Just(132)],
            ),
            any::<[u32; 3]>(),
            any::<[u16; 4]>(),
            any::<[u64; 7]>(),
        )
            .prop_map(|((destroy, v6, proto), ids, ports, v)| {
                let kind = if destroy {
                    EventKind::Destroy
                } else {
                    EventKind::Update
                };
                let family = if v6 { AF_INET6 } else { AF_INET };
                let a = |x: u8| -> IpAddr {
                    if v6 {
                        Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, u16::from(x)).into()
                    } else {
                        Ipv4Addr::new(10, 0, 0, x).into()
                    }
                };
                let tuple = |s: u16, d: u16| Tuple {
                    src: Some(a(1)),
                    dst: Some(a(2)),
                    proto: Some(proto),
                    src_port: Some(s),
                    dst_port: Some(d),
                    ..Tuple::default()
                };
                CtEvent {
                    id: Some(ids[0]),
                    status: Some(Status(ids[1])),
                    timeout: Some(ids[2]),
                    orig: Some(tuple(ports[0], ports[1])),
                    reply: Some(tuple(ports[2], ports[3])),
                    tcp_state: (proto == 6).then_some(TcpState((v[0] % 10) as u8)),
                    counters_orig: Some(Counters {
                        packets: Some(v[1]),
                        bytes: Some(v[2]),
                    }),
                    counters_reply: Some(Counters {
                        packets: Some(v[3]),
                        bytes: Some(v[4]),
                    }),
                    timestamp: Some(Timestamp {
                        start: Some(v[5]),
                        stop: Some(v[6]),
                    }),
                    timestamp_event: Some(v[0]),
                    ..CtEvent::empty(kind, family)
                }
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn parse_returns_exactly_the_encoded_event(ev in event(), counters32 in any::<bool>()) {
            let msg = encode(&ev, Form { counters32 });
            prop_assert_eq!(CtEvent::parse(&msg), Ok(ev));
            // The same message inside a datagram with a second copy behind it.
            let mut d = msg.clone();
            d.extend_from_slice(&msg);
            let got: Vec<_> = Datagram::new(&d).collect();
            prop_assert_eq!(got, vec![Ok(Message::Event(ev)), Ok(Message::Event(ev))]);
            // The in-place walk, with a slot holding an unrelated event.
            let mut walk = Datagram::new(&d);
            let mut slot = CtEvent { id: Some(1), ..CtEvent::empty(EventKind::Destroy, 99) };
            for _ in 0..2 {
                prop_assert_eq!(walk.next_into(&mut slot), Some(Ok(Message::Event(()))));
                prop_assert_eq!(slot, ev);
                slot.mark = Some(5);
            }
            prop_assert_eq!(walk.next_into(&mut slot), None);
        }

        #[test]
        fn kernel_layouts_and_the_walk_agree(ev in event(), counters32 in any::<bool>()) {
            let msg = encode(&ev, Form { counters32 });
            let (fast, walk) = both_ways(&msg);
            prop_assert_eq!(fast, walk);
        }

        #[test]
        fn kernel_shaped_events_round_trip(ev in kernel_shaped_event()) {
            let msg = encode(&ev, Form::default());
            let (fast, walk) = both_ways(&msg);
            prop_assert_eq!(fast, Ok(ev));
            prop_assert_eq!(walk, Ok(ev));
        }

        #[test]
        fn every_truncation_of_an_encoded_event_is_an_error(ev in event(), cut in any::<prop::sample::Index>()) {
            let msg = encode(&ev, Form::default());
            let n = cut.index(msg.len());
            prop_assert!(CtEvent::parse(&msg[..n]).is_err());
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = CtEvent::parse(&bytes);
            for m in Datagram::new(&bytes) {
                let _ = m;
            }
        }
    }
}
