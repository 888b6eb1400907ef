//! Raw bytes, exactly as they could arrive from a NETLINK_NETFILTER socket.
//!
//! The same input is fed to both entry points of the parser:
//! - `CtEvent::parse`, which takes one netlink message (16-byte nlmsghdr
//!   included), and
//! - `Datagram::new`, iterated to the end, which walks every netlink message
//!   of one `recvmmsg` datagram (nlmsghdr framing, NLMSG_ERROR / DONE /
//!   OVERRUN / other types, then the event parser for each event).
//!
//! The only property checked is that nothing panics (no slice index out of
//! range, no arithmetic overflow with `-a`, no infinite loop, and, under
//! AddressSanitizer, no out-of-bounds read by `unsafe` code).
#![no_main]

use std::hint::black_box;

use conntrack_metrics::wire::{CtEvent, Datagram};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = black_box(CtEvent::parse(black_box(data)));

    for item in Datagram::new(black_box(data)) {
        let _ = black_box(item);
    }
});
