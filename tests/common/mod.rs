//! Shared by the end-to-end tests: the kernel captures under `tests/fixtures/`,
//! virtual nodes in network namespaces, the exporter, and traffic.
#![allow(dead_code)]

pub mod captures;
pub mod exporter;
pub mod netns;
pub mod traffic;
