//! The kernel-side conntrack event mask (`--event-mask`): an nftables table
//! that tells the kernel, for each new flow, which conntrack events to build
//! at all.
//!
//! Why: the kernel builds every event of every flow for every listener
//! before any socket filter runs; on a busy node, with most flows not going
//! to a Service, that costs the node 25-40 % of its peak new-flow rate. A
//! `ct event set` on a flow's first packet is the one lever that stops the
//! kernel from building the events at all.
//!
//! Owns: the table `inet conntrack_metrics` in the exporter's network
//! namespace: its ruleset (built from the Service and excluded subnets), its
//! atomic creation (replacing a stale table a crashed exporter left), and its
//! removal when the exporter stops (and at the next start when the flag is
//! off). The table is managed with the `nft` binary, once at start and once
//! at exit.
//! Never: runs per event; touches any other table.
//!
//! The trade-off, plainly: the mask is per flow, not per listener. Every
//! other conntrack listener on the node (`conntrack -E`, conntrackd, another
//! exporter) stops seeing the events of flows not to a Service, and sees only
//! [`SERVICE_EVENTS`] of Service flows.
//!
//! The chains run on prerouting and output at priority -150: after
//! conntrack (-200) has attached the flow, before DNAT (-100) rewrites the
//! destination, and before the flow is confirmed (the kernel reads the mask
//! when it confirms the flow). The rules match `ct state new` only: the
//! reply of a Service flow goes to the client, outside the Service subnets,
//! and without that match it would zero the mask of the confirmed flow.

use std::fmt;
use std::io::{self, Write};
use std::process::{Command, Stdio};

use crate::flow::Subnet;

/// The table's family and name.
pub const TABLE: &str = "inet conntrack_metrics";

/// `enum ip_conntrack_events` bits (`nf_conntrack_common.h`).
const IPCT_NEW: u32 = 1 << 0;
const IPCT_DESTROY: u32 = 1 << 2;
const IPCT_REPLY: u32 = 1 << 3;
const IPCT_PROTOINFO: u32 = 1 << 5;

/// The events a Service flow keeps: NEW (the flow's start), REPLY (the
/// UPDATE that sets SEEN_REPLY), PROTOINFO (the UPDATEs of TCP state
/// changes: SYN_RECV, FIN_WAIT, ...) and DESTROY (counters and timestamps).
/// Not ASSURED, MARK, HELPER, SEQADJ, SECMARK, LABEL, SYNPROXY, RELATED: the
/// exporter reads nothing from those UPDATEs.
pub const SERVICE_EVENTS: u32 = IPCT_NEW | IPCT_REPLY | IPCT_PROTOINFO | IPCT_DESTROY;

/// Why the table could not be set or removed.
#[derive(Debug)]
pub enum EventMaskError {
    /// `nft` could not be started (not installed, not on PATH).
    NoNft(io::Error),
    /// `nft` refused the ruleset or the command.
    Refused {
        /// What was asked.
        what: &'static str,
        /// nft's exit status and stderr.
        detail: String,
    },
}

impl fmt::Display for EventMaskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EventMaskError::NoNft(e) => write!(
                f,
                "--event-mask needs the nft binary (package nftables) on PATH: {e}"
            ),
            EventMaskError::Refused { what, detail } => {
                write!(f, "nft could not {what} table {TABLE}: {detail}")
            }
        }
    }
}

impl std::error::Error for EventMaskError {}

/// The ruleset that replaces the table atomically (one nft transaction:
/// create if missing, delete, create with the chains), for flows to any of
/// `services` and none of `excluded`.
pub fn ruleset(services: &[Subnet], excluded: &[Subnet]) -> String {
    let set = |v4: bool, list: &[Subnet]| -> Option<String> {
        let items: Vec<String> = list
            .iter()
            .filter(|s| s.addr().is_ipv4() == v4)
            .map(Subnet::to_string)
            .collect();
        (!items.is_empty()).then(|| format!("{{ {} }}", items.join(", ")))
    };
    let mut rules = String::new();
    for (v4, daddr) in [(true, "ip daddr"), (false, "ip6 daddr")] {
        // Excluded first: an excluded subnet inside a Service subnet wins.
        if let Some(ex) = set(v4, excluded) {
            rules += &format!("    ct state new {daddr} {ex} ct event set 0x0 accept\n");
        }
        if let Some(svc) = set(v4, services) {
            rules += &format!(
                "    ct state new {daddr} {svc} ct event set {SERVICE_EVENTS:#x} accept\n"
            );
        }
    }
    rules += "    ct state new ct event set 0x0\n";
    let mut out = format!(
        "# conntrack-metrics --event-mask: which conntrack events the kernel builds\n\
         table {TABLE} {{}}\n\
         delete table {TABLE}\n\
         table {TABLE} {{\n"
    );
    for (chain, hook) in [("prerouting", "prerouting"), ("output", "output")] {
        out += &format!(
            "  chain {chain} {{\n    type filter hook {hook} priority -150; policy accept;\n{rules}  }}\n"
        );
    }
    out += "}\n";
    out
}

/// The installed table; removed when dropped.
#[derive(Debug)]
pub struct EventMask {
    removed: bool,
}

impl EventMask {
    /// Creates the table, replacing a stale one in the same transaction.
    pub fn install(services: &[Subnet], excluded: &[Subnet]) -> Result<EventMask, EventMaskError> {
        nft(&["-f", "-"], Some(&ruleset(services, excluded)), "create")?;
        Ok(EventMask { removed: false })
    }

    /// Deletes the table now (also what dropping it does, errors ignored).
    pub fn remove(mut self) -> Result<(), EventMaskError> {
        self.removed = true;
        delete()
    }
}

impl Drop for EventMask {
    fn drop(&mut self) {
        if !self.removed {
            let _ = delete();
        }
    }
}

/// Deletes a table a crashed exporter left, when the exporter starts without
/// `--event-mask`. Returns whether there was one. Without `nft` on the
/// machine there can be no table: `Ok(false)`.
pub fn remove_stale() -> Result<bool, EventMaskError> {
    if table_command("list").is_err() {
        return Ok(false);
    }
    table_command("delete").map(|()| true)
}

fn delete() -> Result<(), EventMaskError> {
    table_command("delete")
}

/// `nft VERB table inet conntrack_metrics`.
fn table_command(verb: &'static str) -> Result<(), EventMaskError> {
    let (family, name) = TABLE.split_once(' ').unwrap_or(("inet", TABLE));
    nft(&[verb, "table", family, name], None, verb)
}

/// Runs `nft args`, feeding `stdin` if given; its stdout is discarded.
fn nft(args: &[&str], stdin: Option<&str>, what: &'static str) -> Result<(), EventMaskError> {
    let mut child = Command::new("nft")
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(EventMaskError::NoNft)?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // A write error shows up as nft's own failure below.
        let _ = pipe.write_all(text.as_bytes());
    }
    let output = child.wait_with_output().map_err(EventMaskError::NoNft)?;
    if output.status.success() {
        Ok(())
    } else {
        Err(EventMaskError::Refused {
            what,
            detail: format!(
                "{}: {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subnets(list: &[&str]) -> Vec<Subnet> {
        list.iter().map(|s| s.parse().expect("subnet")).collect()
    }

    #[test]
    fn ruleset_masks_per_family_with_exclusions_first() {
        let text = ruleset(
            &subnets(&["10.96.0.0/16", "fd00:96::/112", "10.97.0.0/16"]),
            &subnets(&["10.96.5.0/24"]),
        );
        let prerouting: Vec<&str> = text
            .lines()
            .skip_while(|l| !l.contains("chain prerouting"))
            .skip(2)
            .take_while(|l| l.trim() != "}")
            .map(str::trim)
            .collect();
        assert_eq!(
            prerouting,
            vec![
                "ct state new ip daddr { 10.96.5.0/24 } ct event set 0x0 accept",
                "ct state new ip daddr { 10.96.0.0/16, 10.97.0.0/16 } ct event set 0x2d accept",
                "ct state new ip6 daddr { fd00:96::/112 } ct event set 0x2d accept",
                "ct state new ct event set 0x0",
            ]
        );
        assert_eq!(text.matches("priority -150").count(), 2);
        assert!(text.contains("hook output"));
        // Create-if-missing, delete, create: one transaction replaces a stale table.
        let head: Vec<&str> = text.lines().skip(1).take(3).collect();
        assert_eq!(
            head,
            vec![
                "table inet conntrack_metrics {}",
                "delete table inet conntrack_metrics",
                "table inet conntrack_metrics {",
            ]
        );
    }

    #[test]
    fn the_service_mask_is_new_reply_protoinfo_destroy() {
        assert_eq!(SERVICE_EVENTS, 0x2d);
    }
}
