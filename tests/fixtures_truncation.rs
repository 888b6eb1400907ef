//! Every prefix of every captured message is an error, never a panic; and the
//! same with `nlmsg_len` rewritten to the cut length, where nests and
//! attributes then overflow the message.

mod common;

use conntrack_metrics::wire::{CtEvent, Datagram, WireError};

#[test]
fn truncation_at_every_offset_of_every_fixture_is_an_error() {
    let mut cuts = 0;
    for name in common::captures::CAPTURES {
        for d in common::captures::datagrams(name) {
            for n in 0..d.len() {
                let cut = &d[..n];
                let err = CtEvent::parse(cut).unwrap_err();
                assert!(
                    matches!(
                        err,
                        WireError::Truncated { .. } | WireError::MessageLength { .. }
                    ),
                    "{name} cut at {n}: {err}"
                );
                let walked: Vec<_> = Datagram::new(cut).collect();
                assert!(
                    n == 0 || walked.iter().any(|m| m.is_err()),
                    "{name} cut at {n}"
                );
                cuts += 1;
            }
        }
    }
    // Every byte of the 1,962 captured messages is a cut point.
    assert_eq!(cuts, 394_468);
}

/// Offsets where a top-level attribute ends (padding included), walked here
/// by hand so the test does not trust the parser's own framing.
fn top_level_boundaries(msg: &[u8]) -> Vec<usize> {
    let mut at = 20;
    let mut ends = vec![at];
    while at + 4 <= msg.len() {
        let len = u16::from_ne_bytes([msg[at], msg[at + 1]]) as usize;
        at += (len + 3) & !3;
        ends.push(at.min(msg.len()));
    }
    ends
}

#[test]
fn truncation_with_a_consistent_header_fails_inside_attributes_only() {
    for name in common::captures::CAPTURES {
        for d in common::captures::datagrams(name) {
            let full = CtEvent::parse(&d).unwrap();
            let boundaries = top_level_boundaries(&d);
            for n in 16..d.len() {
                let mut cut = d[..n].to_vec();
                cut[..4].copy_from_slice(&(n as u32).to_ne_bytes());
                match CtEvent::parse(&cut) {
                    // A cut exactly between two top-level attributes is a valid,
                    // shorter message: what it holds agrees with the full one.
                    Ok(ev) => {
                        assert!(boundaries.contains(&n), "{name}: accepted a cut at {n}");
                        assert_eq!(ev.kind, full.kind);
                        assert!(ev.id.is_none() || ev.id == full.id);
                        assert!(ev.orig.is_none() || ev.orig == full.orig);
                        assert!(ev.reply.is_none() || ev.reply == full.reply);
                        assert!(ev.status.is_none() || ev.status == full.status);
                        assert!(
                            ev.counters_orig.is_none() || ev.counters_orig == full.counters_orig
                        );
                        assert!(ev.timestamp.is_none() || ev.timestamp == full.timestamp);
                    }
                    Err(e) => {
                        assert!(
                            !boundaries.contains(&n),
                            "{name}: rejected a cut at boundary {n}: {e}"
                        );
                        assert!(
                            matches!(
                                e,
                                WireError::Truncated { .. } | WireError::AttrLength { .. }
                            ),
                            "{name} cut at {n}: {e}"
                        );
                    }
                }
            }
        }
    }
}
