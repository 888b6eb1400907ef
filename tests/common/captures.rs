//! The kernel captures under `tests/fixtures/`: their names and their
//! datagrams. Shared by the end-to-end tests (through `common`) and the
//! benches (`#[path]`), so the list is written once.
#![allow(dead_code)]

use std::path::PathBuf;

use conntrack_metrics::wire::capture;

/// Every capture file, by name, in a fixed order.
pub const CAPTURES: [&str; 6] = [
    "tcp_dnat_ab",
    "tcp_dnat_ab_load_midstream",
    "tcp_dnat_refused",
    "udp_dnat_dns_load_midstream",
    "udp_dnat_vip53",
    "udp_unreplied_sink",
];

pub fn fixture_path(file: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(file)
}

/// The datagrams of one capture, each as `recvmsg` returned it.
pub fn datagrams(name: &str) -> Vec<Vec<u8>> {
    let bytes = std::fs::read(fixture_path(&format!("{name}.bin"))).unwrap();
    capture::records(&bytes)
        .map(|r| r.unwrap().to_vec())
        .collect()
}
