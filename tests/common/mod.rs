//! Shared by the end-to-end tests: the kernel captures under `tests/fixtures/`.
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

pub mod exporter;
pub mod netns;
pub mod traffic;

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
