//! The attribute parser behind a header that is always valid.
//!
//! Random bytes almost never make a valid 16-byte nlmsghdr (nlmsg_len must equal
//! the length, nlmsg_type must be a ctnetlink event) followed by a 4-byte
//! nfgenmsg, so the raw target (`parse_event`) spends most of its time being
//! rejected at the header. Here, in the style of regex-automata's
//! `fuzz_regex_automata_deserialize_*` targets, the header is built by the
//! harness and the fuzzer's bytes only ever land in the attribute area.
//!
//! Input layout:
//!
//! ```text
//! data[0]   selector byte
//!             bit 0: nlmsg_type   0 = 0x0100 (IPCTNL_MSG_CT_NEW)   1 = 0x0102 (IPCTNL_MSG_CT_DELETE)
//!             bit 1: nlmsg_flags  0 = 0x0600 (NLM_F_CREATE|NLM_F_EXCL: a NEW event)  1 = 0 (UPDATE / DESTROY)
//!             bit 2: nfgen_family 0 = AF_INET (2)             1 = AF_INET6 (10)
//!             bits 3..7 ignored
//! data[1..] the attributes (nlattrs), appended after the 20-byte header
//! ```
//!
//! The message built is `nlmsghdr { nlmsg_len = 20 + data.len() - 1, nlmsg_type,
//! nlmsg_flags, nlmsg_seq = 0, nlmsg_pid = 0 }` in host byte order, then
//! `nfgenmsg { nfgen_family, version = 0 (NFNETLINK_V0), res_id = 0 }`, then
//! `data[1..]`. `fuzz/seed-corpus.sh` writes seeds in exactly this layout.
//!
//! The only property checked is that nothing panics.
#![no_main]

use std::hint::black_box;

use conntrack_metrics::wire::CtEvent;
use libfuzzer_sys::fuzz_target;

const NLMSG_HDRLEN: usize = 16;
const NFGENMSG_LEN: usize = 4;
const HDR_LEN: usize = NLMSG_HDRLEN + NFGENMSG_LEN;

const CT_NEW: u16 = 0x0100; // (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW
const CT_DELETE: u16 = 0x0102; // (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_DELETE
const NLM_F_CREATE_EXCL: u16 = 0x0600; // NLM_F_CREATE (0x400) | NLM_F_EXCL (0x200)
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, attrs)) = data.split_first() else {
        return;
    };
    let Ok(nlmsg_len) = u32::try_from(HDR_LEN + attrs.len()) else {
        return;
    };
    let nlmsg_type = if selector & 0b001 == 0 {
        CT_NEW
    } else {
        CT_DELETE
    };
    let nlmsg_flags = if selector & 0b010 == 0 {
        NLM_F_CREATE_EXCL
    } else {
        0
    };
    let family = if selector & 0b100 == 0 {
        AF_INET
    } else {
        AF_INET6
    };

    // Exact capacity: under AddressSanitizer an `unsafe` read past the end of
    // the message hits the redzone right after it.
    let mut msg = Vec::with_capacity(HDR_LEN + attrs.len());
    msg.extend_from_slice(&nlmsg_len.to_ne_bytes());
    msg.extend_from_slice(&nlmsg_type.to_ne_bytes());
    msg.extend_from_slice(&nlmsg_flags.to_ne_bytes());
    msg.extend_from_slice(&0u32.to_ne_bytes()); // nlmsg_seq
    msg.extend_from_slice(&0u32.to_ne_bytes()); // nlmsg_pid
    msg.push(family); // nfgen_family
    msg.push(0); // version: NFNETLINK_V0
    msg.extend_from_slice(&0u16.to_be_bytes()); // res_id (network order; 0 either way)
    msg.extend_from_slice(attrs);

    let _ = black_box(CtEvent::parse(black_box(&msg)));
});
