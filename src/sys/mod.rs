//! The operating-system side: the conntrack netlink socket and the batched
//! receive from it.
//!
//! Owns: every `unsafe` block of the crate, each a small wrapper around one
//! syscall with a `// SAFETY:` argument. File descriptors are owned by
//! `netlink_sys::Socket` (never cloned: it closes its fd on drop).
//! Never: parses messages (that is `wire/`) or allocates after setup; the
//! receive path makes exactly one syscall per batch.

#![allow(unsafe_code)]

pub mod filter;
pub mod memory;
pub mod netlink;
pub mod process;
pub mod recv;
pub mod signal;
pub mod sysctl;

pub use netlink::{ConntrackSocket, EventGroups};
pub use recv::{RecvBatch, RecvError};
