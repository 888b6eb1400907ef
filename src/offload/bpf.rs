//! The kernel-side socket filter: a classic BPF program (`SO_ATTACH_FILTER`)
//! that lets through only the conntrack events of Service flows, by default
//! only those of their events the flow tracker may use, and optionally only
//! one reader's share of those flows.
//!
//! Owns: the program's instructions and the rules it applies, which are the
//! userspace rules: [`ServiceFilter::to_service`] (the ORIGINAL tuple's
//! destination is in a Service subnet and in no excluded one),
//! [`tracker_may_use`] (with [`FlowEvents::Used`]) and [`ReaderShare::owns`];
//! and the limits of classic BPF (`BPF_MAXINSNS`, 8-bit conditional jumps).
//! Never: drops a message that userspace would measure from. Whatever the
//! program cannot judge it passes whole: messages that are not conntrack
//! events (errors, `NLMSG_DONE`, overrun notices, other subsystems), families
//! other than IPv4 and IPv6, events without a readable original destination,
//! status or TCP state. It never makes
//! a syscall (attaching is `sys::filter`), and unlike the rest of `wire/` it
//! allocates: the program is built once, at start.
//!
//! The program (`A` accumulator, `X` index register, loads are big-endian;
//! `PASS` = `ret #0xffffffff`, the whole message; `DROP` = `ret #0`):
//!
//! ```text
//!       ld  len              ; jge #20 else PASS        nlmsghdr + nfgenmsg present
//!       ldh [4]              ; NEW or DELETE, else PASS  nlmsg_type (host order: the
//!                                                        constants are byte-swapped to match)
//!       ld  #20 ; ldx #1 ; ld [NLATTR]       ; 0 -> PASS  CTA_TUPLE_ORIG, top level
//!       ldx #1  ; ld [NLATTR_NEST]           ; 0 -> PASS  CTA_TUPLE_IP inside it
//!       tax ; ldb [16]                                   nfgenmsg family
//!       jeq #AF_INET6 -> v6 ; jeq #AF_INET -> v4 ; PASS  other families
//! v4:   txa ; ldx #2 ; ld [NLATTR_NEST]      ; 0 -> PASS  CTA_IP_V4_DST
//!       tax ; ldh [x+0] ; jeq #8 else PASS               nla_len 8 (host order, swapped)
//!       ld [x+4] ; tax                                   X = destination address
//!       per prefix length: txa ; and #mask ; jeq #net -> DROP ...   excluded subnets
//!       per prefix length: txa ; and #mask ; jeq #net -> KEEP ...   Service subnets
//!       DROP
//! v6:   txa ; ldx #4 ; ld [NLATTR_NEST]      ; 0 -> PASS  CTA_IP_V6_DST
//!       tax ; ldh [x+0] ; jeq #20 else PASS
//!       ld [x+4] ; st M[0] ; ... ; ld [x+16] ; st M[3]  the address's four words
//!       per subnet, per 32-bit word the prefix covers:
//!           ld M[i] ; (and #mask) ; jeq #word else next subnet ...  -> DROP / KEEP
//!       DROP
//! KEEP: with FlowEvents::Used (the rule of tracker_may_use):
//!       ldh [4] ; jeq #DELETE -> SHARE                   every DESTROY
//!       ld #20 ; ldx #3 ; ld [NLATTR] ; 0 -> SHARE       CTA_STATUS
//!       tax ; ldh [x+0] ; jeq #8 else SHARE ; ld [x+4]
//!       jset #SEEN_REPLY else DROP                       nothing before the reply
//!       jset #ASSURED else SHARE                         may be the first reply
//!       ldh [6] ; jset #CREATE|EXCL -> SHARE             a NEW (a merged re-send)
//!       ld #20 ; ldx #4 ; ld [NLATTR] ; 0 -> DROP        CTA_PROTOINFO
//!       ldx #1 ; ld [NLATTR_NEST] ; 0 -> DROP            CTA_PROTOINFO_TCP
//!       ldx #1 ; ld [NLATTR_NEST] ; 0 -> DROP            CTA_PROTOINFO_TCP_STATE
//!       tax ; ldh [x+0] ; jeq #5 else SHARE
//!       ldb [x+4] ; jge #FIN_WAIT else DROP ; jgt #CLOSE -> DROP   a closing state
//! SHARE: PASS, or with a reader share:
//!       ld #20 ; ldx #12 ; ld [NLATTR] ; 0 -> reader 0     CTA_ID
//!       tax ; ldh [x+0] ; jeq #8 else reader 0
//!       ld [x+4] ; mod #count ; jeq #index -> PASS ; DROP
//! ```
//!
//! Matches jump to a shared `ret` (or `ja KEEP`) placed after every run of at
//! most 240 instructions, so a conditional jump never goes further than
//! its 8-bit offset allows however long the lists are; only `ja` (32-bit
//! offset) goes far. An IPv4 subnet costs one instruction, an IPv6 subnet two
//! per 32-bit word of its prefix (three for a partial word): see
//! [`FilterError::TooLong`] for how many fit in the kernel's 4,096, and
//! [`MAX_IPV6_SUBNETS`] for the kernel's other limit, `net.core.optmem_max`.
//!
//! Two kernel traps, both silent:
//! - `SKF_AD_NLATTR` searches from `A` to the end of the message, not inside
//!   a nest: a search for `CTA_IP_V4_DST` (2) that runs out of `CTA_TUPLE_IP`
//!   finds `CTA_TUPLE_PROTO` (also 2) in an IPv6 event. Every search below the
//!   top level here is an `SKF_AD_NLATTR_NEST`, bounded by its nest, and the
//!   attribute's length is checked before its payload is read.
//! - `SKF_AD_NLATTR_NEST` takes in `A` the offset of the nest's own header
//!   (the kernel runs `nla_find_nested(&data[A], X)`): exactly what the
//!   previous search returned, with no `+4`. With a `+4` every search misses
//!   without an error: a filter that drops on a miss then matches nothing,
//!   and this one (which passes on a miss) would pass everything.
//!
//! Also: returning a number smaller than the message length truncates it
//! (`sk_filter` trims to the return value), so a kept message returns
//! `0xffffffff`; a load past the end of the message ends the program with 0
//! (drop), so every load is guarded by a length check; and the attribute
//! searches return 0 (not found, so: pass) on a non-linear skb, which
//! netlink does not build for events.

use std::fmt;

use libc::sock_filter;

use crate::flow::{ReaderShare, Subnet};
use crate::wire::ctnetlink::{
    AF_INET, AF_INET6, CTA_ID, CTA_IP_V4_DST, CTA_IP_V6_DST, CTA_PROTOINFO, CTA_PROTOINFO_TCP,
    CTA_PROTOINFO_TCP_STATE, CTA_STATUS, CTA_TUPLE_IP, CTA_TUPLE_ORIG, IPCTNL_MSG_CT_DELETE,
    IPCTNL_MSG_CT_NEW, NFGENMSG_LEN, NFNL_SUBSYS_CTNETLINK,
};
use crate::wire::netlink::{NLMSG_HDRLEN, NLM_F_CREATE, NLM_F_EXCL};
use crate::wire::nla::NLA_HDRLEN;
use crate::wire::{Status, TcpState};

#[cfg(doc)]
use crate::flow::{tracker_may_use, tracker_may_use_with, ServiceFilter};

/// The kernel's limit on a classic BPF program's length (`BPF_MAXINSNS`).
pub const BPF_MAXINSNS: usize = 4096;

/// The return value that keeps a whole message.
pub const PASS: u32 = u32::MAX;
/// The return value that drops a message.
pub const DROP: u32 = 0;

/// The longest run of instructions whose matches share one `ret`: every
/// conditional jump in it reaches the `ret` within its 8-bit offset.
const CHUNK: usize = 240;

/// At most this many IPv4 subnets fit in one program, all of one prefix
/// length, with a reader share and no IPv6 subnet (each distinct prefix
/// length costs two instructions more).
pub const MAX_IPV4_SUBNETS: usize = 3967;
/// At most this many IPv6 `/128` subnets fit in one program, with a reader
/// share and no IPv4 subnet (of `/112` subnets 440 fit, of `/64` 990).
///
/// The kernel also charges the program's translation to eBPF against
/// `net.core.optmem_max` (`ENOMEM` when it is larger). With the 131072 of
/// recent kernels every program up to these maximums attaches; with the
/// 20480 of older ones (set in a namespace here), one reader's program
/// takes about 2,290 IPv4 subnets below 128.0.0.0, 1,150 at or above it (a
/// comparison with such a constant takes two eBPF instructions), or 250
/// IPv6 `/128` subnets.
pub const MAX_IPV6_SUBNETS: usize = 495;

/// Why no filter program was built.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FilterError {
    /// The subnets need more instructions than the kernel takes.
    TooLong {
        /// IPv4 subnets the program must test (Service and excluded,
        /// duplicates removed).
        ipv4_subnets: usize,
        /// IPv6 subnets asked for.
        ipv6_subnets: usize,
        /// Instructions the program would need.
        instructions: usize,
    },
    /// A conditional jump out of its 8-bit range: a bug in this module.
    JumpTooFar {
        /// The instruction's position.
        at: usize,
        /// The offset it needed.
        offset: usize,
    },
}

impl fmt::Display for FilterError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            FilterError::TooLong {
                ipv4_subnets,
                ipv6_subnets,
                instructions,
            } => write!(
                f,
                "the socket filter for {ipv4_subnets} IPv4 and {ipv6_subnets} IPv6 subnets needs \
                 {instructions} classic BPF instructions, more than the kernel's {BPF_MAXINSNS}; \
                 an IPv4 subnet takes 1 instruction (+2 per distinct prefix length), an IPv6 \
                 subnet 2 per 32-bit word of its prefix: at most {MAX_IPV4_SUBNETS} IPv4 \
                 subnets of one prefix length, or {MAX_IPV6_SUBNETS} IPv6 /128 subnets, fit"
            ),
            FilterError::JumpTooFar { at, offset } => write!(
                f,
                "socket filter instruction {at} jumps {offset} ahead, beyond 255 (a bug)"
            ),
        }
    }
}

impl std::error::Error for FilterError {}

/// Which events of the flows it keeps a filter passes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlowEvents {
    /// Every event (`--no-socket-filter` with several readers, and
    /// `--print-events`, which shows them all).
    All,
    /// Only the events the flow tracker may draw an observation from
    /// ([`tracker_may_use`]): every DESTROY, and the NEW and UPDATE events
    /// that can be a flow's first reply or first closing state.
    Used,
    /// [`FlowEvents::Used`] and every NEW (`--live-latency`: a flow's start
    /// is its NEW).
    UsedLive,
}

/// Builds the socket filter that passes the events of flows to `services`
/// (and to none of `excluded`), only `share`'s flows if given, only the
/// events `events` says, and every message that is not a conntrack event.
/// Subnets of both families may be mixed; order and duplicates do not
/// matter. With no Service subnet of a family, the events of that family are
/// all dropped, as userspace would ignore them.
pub fn service_event_filter(
    services: &[Subnet],
    excluded: &[Subnet],
    share: Option<ReaderShare>,
    events: FlowEvents,
) -> Result<Vec<sock_filter>, FilterError> {
    let share = share.filter(|s| s.count() > 1);
    let services = Lists::new(services);
    let mut excluded = Lists::new(excluded);
    // An excluded subnet only matters where a Service subnet could match.
    if services.v4.is_empty() {
        excluded.v4.clear();
    }
    if services.v6.is_empty() {
        excluded.v6.clear();
    }

    let mut a = Asm::default();
    let keep_label = a.label();
    let keep = match (share, events) {
        (None, FlowEvents::All) => Verdict::Ret(PASS),
        _ => Verdict::Ja(keep_label),
    };
    let (v4, v6) = (a.label(), a.label());
    conntrack_event_family(&mut a, v4, v6);
    a.bind(v4);
    v4_destination(&mut a, &services, &excluded, keep);
    a.bind(v6);
    v6_destination(&mut a, &services, &excluded, keep);
    a.bind(keep_label);
    kept_flow(&mut a, share, events);

    if a.ops.len() > BPF_MAXINSNS {
        return Err(FilterError::TooLong {
            ipv4_subnets: services.v4.len() + excluded.v4.len(),
            ipv6_subnets: services.v6.len() + excluded.v6.len(),
            instructions: a.ops.len(),
        });
    }
    a.finish()
}

/// The program's start: whatever is not a conntrack NEW or DELETE event
/// with a readable original tuple passes; then on to `v4` or `v6` by the
/// event's family (other families pass). Leaves `X` at `CTA_TUPLE_IP`.
fn conntrack_event_family(a: &mut Asm, v4: usize, v6: usize) {
    // Not a conntrack event, or too short to hold one: pass.
    a.stmt(LD | W | LEN, 0);
    a.ret_unless(JGE, (NLMSG_HDRLEN + NFGENMSG_LEN) as u32, PASS);
    a.stmt(LD | H | ABS, 4);
    let event = a.label();
    a.jump(
        JEQ,
        ldh_value(ct_type(IPCTNL_MSG_CT_NEW)),
        To::Label(event),
        To::Skip(0),
    );
    a.jump(
        JEQ,
        ldh_value(ct_type(IPCTNL_MSG_CT_DELETE)),
        To::Skip(1),
        To::Skip(0),
    );
    a.ret(PASS);
    a.bind(event);

    // CTA_TUPLE_ORIG at the top level, then CTA_TUPLE_IP inside it.
    find_attribute(a, &[CTA_TUPLE_ORIG, CTA_TUPLE_IP], PASS);
    a.stmt(MISC | TAX, 0);

    a.stmt(LD | B | ABS, NLMSG_HDRLEN as u32);
    a.jump(JEQ, u32::from(AF_INET6), To::Skip(0), To::Skip(1));
    a.ja(v6);
    a.jump(JEQ, u32::from(AF_INET), To::Label(v4), To::Skip(0));
    a.ret(PASS);
}

/// An IPv4 event: dropped if its destination is excluded, `keep` if it is
/// in a Service subnet, dropped otherwise.
fn v4_destination(a: &mut Asm, services: &Lists, excluded: &Lists, keep: Verdict) {
    find_destination(a, CTA_IP_V4_DST, 4);
    a.stmt(LD | W | IND, NLA_HDRLEN as u32);
    a.stmt(MISC | TAX, 0);
    match_v4(a, &excluded.v4, Verdict::Ret(DROP));
    match_v4(a, &services.v4, keep);
    a.ret(DROP);
}

/// An IPv6 event: as [`v4_destination`].
fn v6_destination(a: &mut Asm, services: &Lists, excluded: &Lists, keep: Verdict) {
    find_destination(a, CTA_IP_V6_DST, 16);
    if !services.v6.is_empty() {
        // The address's four words into M[0..4]: a scratch load is one
        // instruction once the kernel has translated the program to eBPF,
        // a packet load several, and the translation is what counts
        // against `net.core.optmem_max`.
        for word in 0..4u32 {
            a.stmt(LD | W | IND, NLA_HDRLEN as u32 + 4 * word);
            a.stmt(ST, word);
        }
    }
    match_v6(a, &excluded.v6, Verdict::Ret(DROP));
    match_v6(a, &services.v6, keep);
    a.ret(DROP);
}

/// An event of a kept flow: with [`FlowEvents::Used`] only the events the
/// tracker may use, and with a share only the reader's flows, pass.
fn kept_flow(a: &mut Asm, share: Option<ReaderShare>, events: FlowEvents) {
    if events != FlowEvents::All {
        let used = a.label();
        used_events_only(a, used, events == FlowEvents::UsedLive);
        a.bind(used);
    }
    if let Some(share) = share {
        let no_id = if share.index() == 0 { PASS } else { DROP };
        find_attribute(a, &[CTA_ID], no_id);
        a.stmt(MISC | TAX, 0);
        a.stmt(LD | H | IND, 0);
        a.ret_unless(JEQ, ldh_value(nla_len(4)), no_id);
        a.stmt(LD | W | IND, NLA_HDRLEN as u32);
        a.stmt(ALU | MOD | K, share.count());
        a.ret_if(JEQ, share.index(), PASS);
        a.ret(DROP);
    } else if events != FlowEvents::All {
        a.ret(PASS);
    }
}

/// The rule of [`tracker_may_use_with`] (`live`: every NEW too), for an
/// event of a kept flow: drops it or goes on at `used`. `A` and `X` are
/// free. Whatever it cannot read (no status, an attribute of another size)
/// goes on: userspace judges it.
fn used_events_only(a: &mut Asm, used: usize, live: bool) {
    // Every DESTROY.
    a.stmt(LD | H | ABS, 4);
    a.jump(
        JEQ,
        ldh_value(ct_type(IPCTNL_MSG_CT_DELETE)),
        To::Label(used),
        To::Skip(0),
    );
    if live {
        // Every NEW.
        a_new_goes_to(a, used);
    }
    // A NEW or UPDATE without SEEN_REPLY: dropped.
    a.stmt(LD | IMM, (NLMSG_HDRLEN + NFGENMSG_LEN) as u32);
    a.stmt(LDX | IMM, u32::from(CTA_STATUS));
    a.stmt(LD | W | ABS, SKF_NLATTR);
    a.jump(JEQ, 0, To::Label(used), To::Skip(0));
    a.stmt(MISC | TAX, 0);
    a.stmt(LD | H | IND, 0);
    a.jump(JEQ, ldh_value(nla_len(4)), To::Skip(0), To::Label(used));
    a.stmt(LD | W | IND, NLA_HDRLEN as u32);
    a.jump(JSET, Status::SEEN_REPLY, To::Skip(1), To::Skip(0));
    a.ret(DROP);
    // With it: a NEW, or an UPDATE before ASSURED, may be the first reply.
    a.jump(JSET, Status::ASSURED, To::Skip(0), To::Label(used));
    a_new_goes_to(a, used);
    // An UPDATE after ASSURED: only in a closing TCP state (the FIN).
    find_attribute(
        a,
        &[CTA_PROTOINFO, CTA_PROTOINFO_TCP, CTA_PROTOINFO_TCP_STATE],
        DROP,
    );
    a.stmt(MISC | TAX, 0);
    a.stmt(LD | H | IND, 0);
    a.jump(JEQ, ldh_value(nla_len(1)), To::Skip(0), To::Label(used));
    a.stmt(LD | B | IND, NLA_HDRLEN as u32);
    a.ret_unless(JGE, u32::from(TcpState::FIN_WAIT.0), DROP);
    a.ret_if(JGT, u32::from(TcpState::CLOSE.0), DROP);
}

/// A NEW (its netlink flags have CREATE or EXCL) goes on at `used`; any
/// other event to the next instruction. Clobbers `A`.
fn a_new_goes_to(a: &mut Asm, used: usize) {
    a.stmt(LD | H | ABS, 6);
    a.jump(
        JSET,
        ldh_value(NLM_F_CREATE | NLM_F_EXCL),
        To::Label(used),
        To::Skip(0),
    );
}

/// Leaves in `A` the offset of the attribute at `path` (a top-level type,
/// then a type inside it, and so on), each searched inside the one before;
/// returns `missing` when one is not there.
fn find_attribute(a: &mut Asm, path: &[u16], missing: u32) {
    a.stmt(LD | IMM, (NLMSG_HDRLEN + NFGENMSG_LEN) as u32);
    for (depth, &kind) in path.iter().enumerate() {
        let search = if depth == 0 {
            SKF_NLATTR
        } else {
            SKF_NLATTR_NEST
        };
        a.stmt(LDX | IMM, u32::from(kind));
        a.stmt(LD | W | ABS, search);
        a.ret_if(JEQ, 0, missing);
    }
}

/// With `X` at `CTA_TUPLE_IP`: finds the destination attribute `kind` with a
/// `size`-byte payload and leaves its offset in `X`; passes the message if
/// there is none or it has another size.
fn find_destination(a: &mut Asm, kind: u16, size: usize) {
    a.stmt(MISC | TXA, 0);
    a.stmt(LDX | IMM, u32::from(kind));
    a.stmt(LD | W | ABS, SKF_NLATTR_NEST);
    a.ret_if(JEQ, 0, PASS);
    a.stmt(MISC | TAX, 0);
    a.stmt(LD | H | IND, 0);
    a.ret_unless(JEQ, ldh_value(nla_len(size)), PASS);
}

/// With the IPv4 destination in `X`: `verdict` if it is in any of `nets`
/// (sorted by prefix length), else on to the next instruction.
fn match_v4(a: &mut Asm, nets: &[(u32, u8)], verdict: Verdict) {
    let mut chunk = Chunk::open(a);
    let mut prefix = None;
    for &(net, len) in nets {
        if prefix != Some(len) {
            chunk.make_room(a, 3, verdict);
            prefix = Some(len);
            a.stmt(MISC | TXA, 0);
            let mask = mask32(len);
            if mask != u32::MAX {
                a.stmt(ALU | AND | K, mask);
            }
        }
        chunk.make_room(a, 1, verdict);
        a.jump(JEQ, net, To::Label(chunk.target), To::Skip(0));
    }
    chunk.close(a, verdict);
}

/// With the IPv6 destination's words in `M[0..4]`: `verdict` if it is in any
/// of `nets`, else on to the next instruction.
fn match_v6(a: &mut Asm, nets: &[(u128, u8)], verdict: Verdict) {
    let mut chunk = Chunk::open(a);
    for &(net, len) in nets {
        // (scratch slot of the word, its mask, its value) for each word the
        // prefix covers.
        let words: Vec<(u32, u32, u32)> = (0..4u8)
            .filter_map(|i| {
                let covered = len.saturating_sub(32 * i).min(32);
                (covered > 0).then(|| {
                    let shift = 96 - 32 * u32::from(i);
                    (u32::from(i), mask32(covered), (net >> shift) as u32)
                })
            })
            .collect();
        let cost = |w: &(u32, u32, u32)| if w.1 == u32::MAX { 2 } else { 3 };
        let total: usize = words.iter().map(cost).sum::<usize>().max(1);
        chunk.make_room(a, total, verdict);
        if words.is_empty() {
            a.ja(chunk.target);
            continue;
        }
        let mut left = total;
        for (i, w) in words.iter().enumerate() {
            left -= cost(w);
            a.stmt(LD | MEM, w.0);
            if w.1 != u32::MAX {
                a.stmt(ALU | AND | K, w.1);
            }
            if i + 1 == words.len() {
                a.jump(JEQ, w.2, To::Label(chunk.target), To::Skip(0));
            } else {
                // `left` < 13: the rest of this subnet's instructions.
                a.jump(JEQ, w.2, To::Skip(0), To::Skip(left as u8));
            }
        }
    }
    chunk.close(a, verdict);
}

/// The subnets of one list split by family, deduplicated and sorted by prefix
/// length.
struct Lists {
    v4: Vec<(u32, u8)>,
    v6: Vec<(u128, u8)>,
}

impl Lists {
    fn new(subnets: &[Subnet]) -> Lists {
        let mut v4 = Vec::new();
        let mut v6 = Vec::new();
        for s in subnets {
            match s.addr() {
                std::net::IpAddr::V4(a) => v4.push((u32::from(a), s.prefix())),
                std::net::IpAddr::V6(a) => v6.push((u128::from(a), s.prefix())),
            }
        }
        v4.sort_by_key(|&(net, len)| (len, net));
        v4.dedup();
        v6.sort_by_key(|&(net, len)| (len, net));
        v6.dedup();
        Lists { v4, v6 }
    }
}

fn mask32(prefix: u8) -> u32 {
    u32::MAX
        .checked_shl(32 - u32::from(prefix.min(32)))
        .unwrap_or(0)
}

/// The `nlmsg_type` of a ctnetlink message.
fn ct_type(msg: u16) -> u16 {
    NFNL_SUBSYS_CTNETLINK << 8 | msg
}

/// The `nla_len` of an attribute with a `payload`-byte payload.
fn nla_len(payload: usize) -> u16 {
    (NLA_HDRLEN + payload) as u16
}

/// What `ldh` (a big-endian load) reads from a host-order `u16` field that
/// holds `v`.
fn ldh_value(v: u16) -> u32 {
    u32::from(u16::from_be_bytes(v.to_ne_bytes()))
}

// Instruction classes and fields (`linux/bpf_common.h`, `linux/filter.h`),
// as `u16` codes.
const LD: u16 = libc::BPF_LD as u16;
const LDX: u16 = libc::BPF_LDX as u16;
const ST: u16 = libc::BPF_ST as u16;
const ALU: u16 = libc::BPF_ALU as u16;
const JMP: u16 = libc::BPF_JMP as u16;
const RET: u16 = libc::BPF_RET as u16;
const MISC: u16 = libc::BPF_MISC as u16;
const W: u16 = libc::BPF_W as u16;
const H: u16 = libc::BPF_H as u16;
const B: u16 = libc::BPF_B as u16;
const IMM: u16 = libc::BPF_IMM as u16;
const ABS: u16 = libc::BPF_ABS as u16;
const IND: u16 = libc::BPF_IND as u16;
const MEM: u16 = libc::BPF_MEM as u16;
const LEN: u16 = libc::BPF_LEN as u16;
const AND: u16 = libc::BPF_AND as u16;
const MOD: u16 = libc::BPF_MOD as u16;
const JA: u16 = libc::BPF_JA as u16;
const JEQ: u16 = libc::BPF_JEQ as u16;
const JGE: u16 = libc::BPF_JGE as u16;
const JGT: u16 = libc::BPF_JGT as u16;
const JSET: u16 = libc::BPF_JSET as u16;
const K: u16 = libc::BPF_K as u16;
const TAX: u16 = libc::BPF_TAX as u16;
const TXA: u16 = libc::BPF_TXA as u16;
/// `ld [SKF_AD_OFF + SKF_AD_NLATTR]`: `A` = offset of attribute `X` searched
/// from offset `A` to the end, or 0.
const SKF_NLATTR: u32 = (libc::SKF_AD_OFF + libc::SKF_AD_NLATTR) as u32;
/// `ld [SKF_AD_OFF + SKF_AD_NLATTR_NEST]`: `A` = offset of attribute `X`
/// inside the nest whose header is at `A`, or 0.
const SKF_NLATTR_NEST: u32 = (libc::SKF_AD_OFF + libc::SKF_AD_NLATTR_NEST) as u32;

/// Where a conditional jump goes.
#[derive(Clone, Copy, Debug)]
enum To {
    /// Skip this many instructions (0: the next one).
    Skip(u8),
    /// To a label, which must be bound ahead within 255 instructions.
    Label(usize),
}

/// What a match leads to.
#[derive(Clone, Copy, Debug)]
enum Verdict {
    /// Return this value.
    Ret(u32),
    /// Go on at this label (the share check), however far.
    Ja(usize),
}

#[derive(Clone, Copy, Debug)]
enum Op {
    Stmt { code: u16, k: u32 },
    Jump { code: u16, k: u32, jt: To, jf: To },
    Ja(usize),
}

/// A program under construction, with forward labels.
#[derive(Default)]
struct Asm {
    ops: Vec<Op>,
    labels: Vec<Option<usize>>,
}

impl Asm {
    fn label(&mut self) -> usize {
        self.labels.push(None);
        self.labels.len() - 1
    }

    fn bind(&mut self, label: usize) {
        self.labels[label] = Some(self.ops.len());
    }

    fn stmt(&mut self, code: u16, k: u32) {
        self.ops.push(Op::Stmt { code, k });
    }

    fn jump(&mut self, cond: u16, k: u32, jt: To, jf: To) {
        self.ops.push(Op::Jump {
            code: JMP | cond | K,
            k,
            jt,
            jf,
        });
    }

    fn ja(&mut self, label: usize) {
        self.ops.push(Op::Ja(label));
    }

    fn ret(&mut self, value: u32) {
        self.stmt(RET | K, value);
    }

    /// `if A <cond> k: return value`.
    fn ret_if(&mut self, cond: u16, k: u32, value: u32) {
        self.jump(cond, k, To::Skip(0), To::Skip(1));
        self.ret(value);
    }

    /// `if !(A <cond> k): return value`.
    fn ret_unless(&mut self, cond: u16, k: u32, value: u32) {
        self.jump(cond, k, To::Skip(1), To::Skip(0));
        self.ret(value);
    }

    fn verdict(&mut self, verdict: Verdict) {
        match verdict {
            Verdict::Ret(v) => self.ret(v),
            Verdict::Ja(label) => self.ja(label),
        }
    }

    /// The instructions, every label resolved to a forward offset.
    fn finish(self) -> Result<Vec<sock_filter>, FilterError> {
        let offset = |at: usize, label: usize| -> usize {
            // Every label used is bound after its use; an unbound or backward
            // one would be a bug, and shows as an out-of-range offset.
            self.labels[label]
                .and_then(|to| to.checked_sub(at + 1))
                .unwrap_or(usize::MAX)
        };
        let short = |at: usize, to: To| -> Result<u8, FilterError> {
            match to {
                To::Skip(n) => Ok(n),
                To::Label(label) => {
                    let offset = offset(at, label);
                    u8::try_from(offset).map_err(|_| FilterError::JumpTooFar { at, offset })
                }
            }
        };
        self.ops
            .iter()
            .enumerate()
            .map(|(at, op)| {
                Ok(match *op {
                    Op::Stmt { code, k } => insn(code, k, 0, 0),
                    Op::Jump { code, k, jt, jf } => insn(code, k, short(at, jt)?, short(at, jf)?),
                    Op::Ja(label) => {
                        let offset = offset(at, label);
                        let k = u32::try_from(offset)
                            .map_err(|_| FilterError::JumpTooFar { at, offset })?;
                        insn(JMP | JA | K, k, 0, 0)
                    }
                })
            })
            .collect()
    }
}

fn insn(code: u16, k: u32, jt: u8, jf: u8) -> sock_filter {
    sock_filter { code, jt, jf, k }
}

/// A run of match instructions that all jump to one verdict placed after
/// them: `... jeq -> target ... ; ja +1 ; target: verdict`.
struct Chunk {
    target: usize,
    start: usize,
}

impl Chunk {
    fn open(a: &mut Asm) -> Chunk {
        Chunk {
            target: a.label(),
            start: a.ops.len(),
        }
    }

    /// Closes this chunk and opens another if `next` more instructions would
    /// put its first jump out of reach of its target.
    fn make_room(&mut self, a: &mut Asm, next: usize, verdict: Verdict) {
        if a.ops.len() + next - self.start > CHUNK {
            self.close(a, verdict);
            *self = Chunk::open(a);
        }
    }

    fn close(&self, a: &mut Asm, verdict: Verdict) {
        if a.ops.len() == self.start {
            return;
        }
        a.stmt(JMP | JA | K, 1);
        a.bind(self.target);
        a.verdict(verdict);
    }
}

/// One instruction per line, as `bpf_dbg` prints them, for test failure
/// messages.
#[cfg(test)]
pub(crate) fn listing(program: &[sock_filter]) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    for (i, f) in program.iter().enumerate() {
        let _ = writeln!(
            out,
            "{i:4}: code {:#06x} jt {:3} jf {:3} k {:#010x}",
            f.code, f.jt, f.jf, f.k
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subnets(list: &[&str]) -> Vec<Subnet> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn ends_in_returns_and_every_jump_stays_inside() {
        let services = subnets(&["10.96.0.0/16", "fd00:96::/112", "192.168.0.0/24"]);
        let excluded = subnets(&["10.96.200.0/24", "fd00:96::80/121"]);
        for share in [None, Some(ReaderShare::new(1, 3).unwrap())] {
            let p = service_event_filter(&services, &excluded, share, FlowEvents::Used).unwrap();
            assert_eq!(p.last().unwrap().code, RET | K, "{}", listing(&p));
            for (i, f) in p.iter().enumerate() {
                if f.code & 0x07 == JMP {
                    let far = if f.code == JMP | JA | K {
                        f.k as usize
                    } else {
                        usize::from(f.jt.max(f.jf))
                    };
                    assert!(i + 1 + far < p.len(), "{i}\n{}", listing(&p));
                }
            }
        }
    }

    #[test]
    fn the_shape_of_the_one_subnet_program() {
        let p =
            service_event_filter(&subnets(&["10.96.0.0/16"]), &[], None, FlowEvents::All).unwrap();
        // Prologue 22, IPv4 lookup 11, one group (txa, and, jeq, ja, ret),
        // DROP, IPv6 lookup 9, DROP.
        assert_eq!(p.len(), 22 + 11 + 5 + 1 + 9 + 1, "{}", listing(&p));
        // The NLATTR_NEST searches are fed the previous result, no +4.
        assert!(p
            .iter()
            .all(|f| !(f.code == ALU | libc::BPF_ADD as u16 | K && f.k == 4)));
        let net = p
            .iter()
            .find(|f| f.code == JMP | JEQ | K && f.k == 0x0a60_0000);
        assert!(net.is_some(), "{}", listing(&p));
        assert!(p
            .iter()
            .any(|f| f.code == ALU | AND | K && f.k == 0xffff_0000));
    }

    #[test]
    fn long_lists_fit_up_to_the_documented_maximum() {
        let share = Some(ReaderShare::new(0, 2).unwrap());
        let v4: Vec<Subnet> = (0..MAX_IPV4_SUBNETS as u32 + 1)
            .map(|i| Subnet::new((0x0a00_0000 + i).to_be_bytes().into(), 32).unwrap())
            .collect();
        let (fit, over) = v4.split_at(MAX_IPV4_SUBNETS);
        let p = service_event_filter(fit, &[], share, FlowEvents::Used).unwrap();
        assert!(p.len() > BPF_MAXINSNS - 3, "{}", p.len());
        let err = service_event_filter(&v4, &[], share, FlowEvents::Used).unwrap_err();
        assert!(matches!(err, FilterError::TooLong { ipv4_subnets, .. }
            if ipv4_subnets == fit.len() + over.len()));
        assert!(err.to_string().contains("at most 3967 IPv4"), "{err}");

        let v6: Vec<Subnet> = (0..MAX_IPV6_SUBNETS as u128 + 1)
            .map(|i| {
                Subnet::new((0xfd00u128 << 112 | i << 40 | 7).to_be_bytes().into(), 128).unwrap()
            })
            .collect();
        assert!(
            service_event_filter(&v6[..MAX_IPV6_SUBNETS], &[], share, FlowEvents::Used).is_ok()
        );
        assert!(matches!(
            service_event_filter(&v6, &[], share, FlowEvents::Used),
            Err(FilterError::TooLong { ipv6_subnets, .. }) if ipv6_subnets == v6.len()
        ));
    }
}
