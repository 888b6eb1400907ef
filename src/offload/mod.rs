//! Work pushed into the kernel: the classic-BPF socket filter that keeps
//! unused events out of the reader's socket, and the nftables event mask
//! that stops the kernel from building them at all.
//!
//! Owns: the filter program ([`bpf`]) and the rules it encodes, which are
//! the flow layer's own (`flow::ServiceFilter`, `flow::tracker_may_use`,
//! `flow::ReaderShare`), which program each reader's socket gets
//! ([`socket_filter`]); the event-mask table ([`event_mask`]).
//! Never: runs on the per-event path (programs and tables are built once, at
//! start), or decides a rule of its own: whatever it cannot judge in the
//! kernel it passes to userspace. It sits above `wire` (message layout) and
//! `flow` (the rules); neither of those knows it exists. Attaching a program
//! is a syscall, in `sys::filter`.

pub mod bpf;
pub mod event_mask;
pub mod socket_filter;

#[cfg(test)]
mod kernel_agreement;
