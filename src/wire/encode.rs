//! Test-only encoder: builds the netlink message the kernel would send for a
//! [`CtEvent`], so property tests can check `parse(encode(e)) == e`.
//!
//! Written from the kernel's layout (`ctnetlink_fill_info`), not from the
//! parser: it shares only the attribute-number constants.

use std::net::IpAddr;

use super::ctnetlink::*;
use super::netlink::{NLM_F_CREATE, NLM_F_EXCL};
use super::nla::{align4, NLA_F_NESTED};

/// How to write what the event does not pin down.
#[derive(Clone, Copy, Debug, Default)]
pub struct Form {
    /// Write counters in the legacy 32-bit form where they fit.
    pub counters32: bool,
}

/// A growing message; nests are opened and closed by offset.
pub struct Builder {
    pub buf: Vec<u8>,
}

impl Builder {
    pub fn new() -> Self {
        Builder { buf: Vec::new() }
    }

    pub fn attr(&mut self, kind: u16, payload: &[u8]) {
        let len = u16::try_from(4 + payload.len()).unwrap();
        self.buf.extend_from_slice(&len.to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(payload);
        self.buf.resize(align4(self.buf.len()), 0);
    }

    pub fn open(&mut self, kind: u16) -> usize {
        let at = self.buf.len();
        self.buf.extend_from_slice(&[0, 0]);
        self.buf
            .extend_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
        at
    }

    pub fn close(&mut self, at: usize) {
        let len = u16::try_from(self.buf.len() - at).unwrap();
        self.buf[at..at + 2].copy_from_slice(&len.to_ne_bytes());
    }
}

/// The whole netlink message for `ev`.
pub fn encode(ev: &CtEvent, form: Form) -> Vec<u8> {
    let (msg, flags) = match ev.kind {
        EventKind::New => (IPCTNL_MSG_CT_NEW, NLM_F_CREATE | NLM_F_EXCL),
        EventKind::Update => (IPCTNL_MSG_CT_NEW, 0),
        EventKind::Destroy => (IPCTNL_MSG_CT_DELETE, 0),
    };
    let mut b = Builder::new();
    b.buf.extend_from_slice(&[0; 4]); // nlmsg_len, filled in below
    b.buf
        .extend_from_slice(&(NFNL_SUBSYS_CTNETLINK << 8 | msg).to_ne_bytes());
    b.buf.extend_from_slice(&flags.to_ne_bytes());
    b.buf.extend_from_slice(&[0; 8]); // seq, pid
    b.buf.extend_from_slice(&[ev.family, 0, 0, 0]);

    if let Some(t) = &ev.orig {
        tuple(&mut b, CTA_TUPLE_ORIG, t, ev.family);
    }
    if let Some(t) = &ev.reply {
        tuple(&mut b, CTA_TUPLE_REPLY, t, ev.family);
    }
    if let Some(id) = ev.id {
        b.attr(CTA_ID, &id.to_be_bytes());
    }
    if let Some(s) = ev.status {
        b.attr(CTA_STATUS, &s.0.to_be_bytes());
    }
    if let Some(t) = ev.timeout {
        b.attr(CTA_TIMEOUT, &t.to_be_bytes());
    }
    if let Some(m) = ev.mark {
        b.attr(CTA_MARK, &m.to_be_bytes());
    }
    if let Some(z) = ev.zone {
        b.attr(CTA_ZONE, &z.to_be_bytes());
    }
    if let Some(c) = &ev.counters_orig {
        counters(&mut b, CTA_COUNTERS_ORIG, c, form);
    }
    if let Some(c) = &ev.counters_reply {
        counters(&mut b, CTA_COUNTERS_REPLY, c, form);
    }
    if let Some(ts) = &ev.timestamp {
        let at = b.open(CTA_TIMESTAMP);
        if let Some(v) = ts.start {
            b.attr(CTA_TIMESTAMP_START, &v.to_be_bytes());
        }
        if let Some(v) = ts.stop {
            b.attr(CTA_TIMESTAMP_STOP, &v.to_be_bytes());
        }
        b.close(at);
    }
    if let Some(state) = ev.tcp_state {
        let at = b.open(CTA_PROTOINFO);
        let tcp = b.open(CTA_PROTOINFO_TCP);
        b.attr(CTA_PROTOINFO_TCP_STATE, &[state.0]);
        b.attr(2, &[7]); // CTA_PROTOINFO_TCP_WSCALE_ORIGINAL: not parsed, skipped
        b.close(tcp);
        b.close(at);
    }
    if let Some(t) = ev.timestamp_event {
        b.attr(CTA_TIMESTAMP_EVENT, &t.to_be_bytes());
    }
    let len = u32::try_from(b.buf.len()).unwrap();
    b.buf[0..4].copy_from_slice(&len.to_ne_bytes());
    b.buf
}

fn tuple(b: &mut Builder, kind: u16, t: &Tuple, family: u8) {
    let at = b.open(kind);
    if t.src.is_some() || t.dst.is_some() {
        let ip = b.open(CTA_TUPLE_IP);
        for (addr, v4, v6) in [
            (t.src, CTA_IP_V4_SRC, CTA_IP_V6_SRC),
            (t.dst, CTA_IP_V4_DST, CTA_IP_V6_DST),
        ] {
            match addr {
                Some(IpAddr::V4(a)) => b.attr(v4, &a.octets()),
                Some(IpAddr::V6(a)) => b.attr(v6, &a.octets()),
                None => {}
            }
        }
        b.close(ip);
    }
    let proto = b.open(CTA_TUPLE_PROTO);
    if let Some(p) = t.proto {
        b.attr(CTA_PROTO_NUM, &[p]);
    }
    if let Some(p) = t.src_port {
        b.attr(CTA_PROTO_SRC_PORT, &p.to_be_bytes());
    }
    if let Some(p) = t.dst_port {
        b.attr(CTA_PROTO_DST_PORT, &p.to_be_bytes());
    }
    let (id, ty, code) = if family == AF_INET6 {
        (
            CTA_PROTO_ICMPV6_ID,
            CTA_PROTO_ICMPV6_TYPE,
            CTA_PROTO_ICMPV6_CODE,
        )
    } else {
        (CTA_PROTO_ICMP_ID, CTA_PROTO_ICMP_TYPE, CTA_PROTO_ICMP_CODE)
    };
    if let Some(v) = t.icmp_id {
        b.attr(id, &v.to_be_bytes());
    }
    if let Some(v) = t.icmp_type {
        b.attr(ty, &[v]);
    }
    if let Some(v) = t.icmp_code {
        b.attr(code, &[v]);
    }
    b.close(proto);
    if let Some(z) = t.zone {
        b.attr(CTA_TUPLE_ZONE, &z.to_be_bytes());
    }
    b.close(at);
}

fn counters(b: &mut Builder, kind: u16, c: &Counters, form: Form) {
    let at = b.open(kind);
    for (value, wide, narrow) in [
        (c.packets, CTA_COUNTERS_PACKETS, CTA_COUNTERS32_PACKETS),
        (c.bytes, CTA_COUNTERS_BYTES, CTA_COUNTERS32_BYTES),
    ] {
        match value {
            Some(v) if form.counters32 && v <= u64::from(u32::MAX) => {
                b.attr(narrow, &(v as u32).to_be_bytes())
            }
            Some(v) => b.attr(wide, &v.to_be_bytes()),
            None => {}
        }
    }
    b.attr(5, &[0; 4]); // CTA_COUNTERS_PAD-like unknown attribute: skipped
    b.close(at);
}

/// A bare netlink message of type `kind` (NLMSG_ERROR, NLMSG_DONE, an
/// overrun notice...) with `payload` after the 16-byte header.
pub fn control(kind: u16, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&((16 + payload.len()) as u32).to_ne_bytes());
    v.extend_from_slice(&kind.to_ne_bytes());
    v.extend_from_slice(&[0; 10]);
    v.extend_from_slice(payload);
    v
}

/// Every message of every kernel capture under `tests/fixtures/`.
pub fn fixture_messages() -> Vec<Vec<u8>> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let mut paths: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "bin"))
        .collect();
    paths.sort();
    let mut all = Vec::new();
    for path in paths {
        let bytes = std::fs::read(&path).unwrap();
        all.extend(super::capture::records(&bytes).map(|r| r.unwrap().to_vec()));
    }
    all
}
