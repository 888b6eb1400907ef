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
//! Owns: this instance's table, `inet conntrack_metrics_<pid>_<start ns>`
//! (both in hex: in Kubernetes every pod's process may be pid 1), in the
//! exporter's network namespace: its ruleset (built from the Service and
//! excluded subnets) and the `nft -i` child that holds it. The table has the
//! nftables `owner` flag: it belongs to the netlink socket of that child,
//! only that socket can change or delete it, `nft flush ruleset` skips it,
//! and the kernel deletes it when the socket closes. The child reads its
//! commands from a pipe only this process holds; when the exporter exits,
//! however it exits (SIGTERM, a panic, SIGKILL, the OOM killer), the pipe
//! closes, `nft -i` reads end of file and exits, and the table goes with it.
//! So no instance ever removes another's table, and an owned table cannot
//! outlive its exporter. Also owns the removal at every start of the legacy
//! table `inet conntrack_metrics`, which versions before table ownership
//! installed without the flag (and a killed one left behind).
//! Never: runs per event; touches any other table; changes its table after
//! start.
//!
//! The trade-off, plainly: the mask is per flow, not per listener. Every
//! other conntrack listener on the node (`conntrack -E`, conntrackd, another
//! exporter) stops seeing the events of flows not to a Service, and sees only
//! [`SERVICE_EVENTS`] of Service flows.
//!
//! Two instances in one namespace (a rolling update with surge, a test run)
//! each have a table, and both tables' chains run on every new flow, at the
//! same priority. With the same subnets they set the same mask. With
//! different subnets the chain that runs last decides the mask, and which
//! one that is the kernel does not promise: the instances must agree on
//! `--svc-subnet` and `--exclude-subnet`.
//!
//! The chains run on prerouting and output at priority -150: after
//! conntrack (-200) has attached the flow, before DNAT (-100) rewrites the
//! destination, and before the flow is confirmed (the kernel reads the mask
//! when it confirms the flow). The rules match `ct state new` only: the
//! reply of a Service flow goes to the client, outside the Service subnets,
//! and without that match it would zero the mask of the confirmed flow.

use std::fmt;
use std::io::{self, Read, Write};
use std::os::unix::process::CommandExt;
use std::process::{Child, ChildStdin, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::flow::Subnet;

/// The table (family and name) that versions before table ownership
/// installed, without the owner flag; removed at every start.
pub const LEGACY_TABLE: &str = "inet conntrack_metrics";

/// The family of each instance's table.
const FAMILY: &str = "inet";

/// The start of each instance's table name.
pub const TABLE_PREFIX: &str = "conntrack_metrics_";

/// How long `nft -i` may take to create the table.
const INSTALL_WAIT: Duration = Duration::from_secs(5);

/// How long `nft -i` may take to exit once its stdin is closed.
const EXIT_WAIT: Duration = Duration::from_secs(2);

/// Between two looks at the child and the table.
const POLL: Duration = Duration::from_millis(10);

/// What an install error names as the requirement.
const OWNER_NEEDS: &str = "--event-mask needs nftables table ownership (`flags owner`): \
                           Linux 5.12 or later, and an nft that knows the flag";

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
    /// `nft -i` did not create this instance's table.
    NotCreated {
        /// The table (family and name).
        table: String,
        /// What happened, and nft's stderr.
        detail: String,
    },
    /// `nft` refused a command, or the table outlived its owner.
    Refused {
        /// What was asked.
        what: &'static str,
        /// The table (family and name).
        table: String,
        /// nft's exit status and stderr, or what went wrong.
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
            EventMaskError::NotCreated { table, detail } => write!(
                f,
                "nft could not create table {table}: {detail} ({OWNER_NEEDS})"
            ),
            EventMaskError::Refused {
                what,
                table,
                detail,
            } => write!(f, "nft could not {what} table {table}: {detail}"),
        }
    }
}

impl std::error::Error for EventMaskError {}

/// This instance's table name: the prefix, the pid and the time since the
/// epoch in nanoseconds, both in hex. The pid alone is not enough: in
/// Kubernetes every pod's process may be pid 1.
pub fn instance_table(pid: u32, since_epoch: Duration) -> String {
    format!("{TABLE_PREFIX}{pid:x}_{:x}", since_epoch.as_nanos())
}

/// The nft commands that create the table `name` (family inet) with the
/// owner flag, its two chains and their rules, for flows to any of
/// `services` and none of `excluded`. `nft -i` takes them as one line,
/// joined by `; `, and runs a line as one transaction: the table appears
/// with all its rules or not at all. (`nft -i` reads a line at a time: a
/// `table { ... }` block over several lines is a syntax error.)
pub fn commands(name: &str, services: &[Subnet], excluded: &[Subnet]) -> Vec<String> {
    let set = |v4: bool, list: &[Subnet]| -> Option<String> {
        let items: Vec<String> = list
            .iter()
            .filter(|s| s.addr().is_ipv4() == v4)
            .map(Subnet::to_string)
            .collect();
        (!items.is_empty()).then(|| format!("{{ {} }}", items.join(", ")))
    };
    let mut rules = Vec::new();
    for (v4, daddr) in [(true, "ip daddr"), (false, "ip6 daddr")] {
        // Excluded first: an excluded subnet inside a Service subnet wins.
        if let Some(ex) = set(v4, excluded) {
            rules.push(format!("ct state new {daddr} {ex} ct event set 0x0 accept"));
        }
        if let Some(svc) = set(v4, services) {
            rules.push(format!(
                "ct state new {daddr} {svc} ct event set {SERVICE_EVENTS:#x} accept"
            ));
        }
    }
    rules.push("ct state new ct event set 0x0".to_string());
    let table = format!("{FAMILY} {name}");
    let mut out = vec![format!(
        "add table {table} {{ flags owner; comment \"conntrack-metrics --event-mask: \
         deleted by the kernel when the exporter exits\"; }}"
    )];
    for (chain, hook) in [("prerouting", "prerouting"), ("output", "output")] {
        out.push(format!(
            "add chain {table} {chain} {{ type filter hook {hook} priority -150; policy accept; }}"
        ));
        out.extend(
            rules
                .iter()
                .map(|r| format!("add rule {table} {chain} {r}")),
        );
    }
    out
}

/// This instance's table, held by its `nft -i` child; gone when this is
/// removed or dropped, or when the process ends in any way.
#[derive(Debug)]
pub struct EventMask {
    /// Family and name.
    table: String,
    /// `None` once released.
    owner: Option<Owner>,
}

impl EventMask {
    /// Creates this instance's table through an `nft -i` child that keeps
    /// the netlink socket owning it, and waits (at most 5 s) until the
    /// table is listed.
    pub fn install(services: &[Subnet], excluded: &[Subnet]) -> Result<EventMask, EventMaskError> {
        let since_epoch = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let name = instance_table(std::process::id(), since_epoch);
        let table = format!("{FAMILY} {name}");
        let mut owner = Owner::spawn()?;
        let line = commands(&name, services, excluded).join("; ") + "\n";
        let created = owner
            .stdin
            .write_all(line.as_bytes())
            .map_err(|e| format!("cannot write to nft -i: {e}"))
            .and_then(|()| owner.wait_for(&table));
        match created {
            Ok(()) => Ok(EventMask {
                table,
                owner: Some(owner),
            }),
            Err(why) => {
                let (_, stderr) = owner.kill();
                Err(EventMaskError::NotCreated {
                    table,
                    detail: format!("{why}{stderr}"),
                })
            }
        }
    }

    /// The table's family and name (`inet conntrack_metrics_…`).
    pub fn table(&self) -> &str {
        &self.table
    }

    /// Whether the `nft -i` child that owns the table still runs, so the
    /// table and the mask are there. A child that was killed on its own took
    /// the table with it: the kernel builds every event again. One
    /// `waitpid(WNOHANG)`.
    pub fn held(&mut self) -> bool {
        self.owner
            .as_mut()
            .is_some_and(|owner| matches!(owner.child.try_wait(), Ok(None)))
    }

    /// Ends the `nft -i` child now and checks that the kernel deleted the
    /// table (also what dropping it does, errors ignored).
    pub fn remove(mut self) -> Result<(), EventMaskError> {
        self.release()
    }

    fn release(&mut self) -> Result<(), EventMaskError> {
        let Some(owner) = self.owner.take() else {
            return Ok(());
        };
        let refused = |detail: String| EventMaskError::Refused {
            what: "remove",
            table: self.table.clone(),
            detail,
        };
        let (ended, stderr) = owner.end();
        match ended {
            Ended::Before(status) => {
                return Err(refused(format!(
                    "nft -i had exited before the exporter stopped ({status}{stderr}): \
                     the table went with it, and the kernel stopped masking then"
                )))
            }
            Ended::Killed => {
                return Err(refused(format!(
                    "nft -i did not exit within {EXIT_WAIT:?} of its stdin closing: \
                     killed{stderr}"
                )))
            }
            Ended::Closed => {}
        }
        if listed(&self.table)? {
            return Err(refused(
                "the table is still listed after its owner exited".to_string(),
            ));
        }
        Ok(())
    }
}

impl Drop for EventMask {
    fn drop(&mut self) {
        let _ = self.release();
    }
}

/// The `nft -i` child whose netlink socket owns the table.
#[derive(Debug)]
struct Owner {
    child: Child,
    /// The pipe whose end of file ends the child.
    stdin: ChildStdin,
    /// What the child wrote on stderr so far.
    stderr: Arc<Mutex<Vec<u8>>>,
    /// Reads the child's stderr into `stderr` until the child exits.
    reader: JoinHandle<()>,
}

/// How [`Owner::end`] found the child.
enum Ended {
    /// It exited when its stdin closed.
    Closed,
    /// It had exited before (killed on its own, or crashed).
    Before(ExitStatus),
    /// It did not exit in time and was killed.
    Killed,
}

impl Owner {
    fn spawn() -> Result<Owner, EventMaskError> {
        // The pipe to its stdin is the table's lifeline. The standard
        // library creates it close-on-exec (pipe2 with O_CLOEXEC), so no
        // other child inherits the write end: when this process dies in any
        // way, the kernel closes the only copy, nft reads end of file and
        // exits, and its socket's closing deletes the table. That is why no
        // PR_SET_PDEATHSIG is needed (it would also fire when the spawning
        // thread, not the process, exits).
        let mut child = Command::new("nft")
            .arg("-i")
            .stdin(Stdio::piped())
            // Nothing it is asked prints; stderr carries its errors.
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            // Its own process group: a Ctrl-C in a terminal stops the
            // exporter, which then ends the child in order, rather than
            // killing the child (and the mask) first.
            .process_group(0)
            .spawn()
            .map_err(EventMaskError::NoNft)?;
        let (Some(stdin), Some(mut pipe)) = (child.stdin.take(), child.stderr.take()) else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(EventMaskError::NoNft(io::Error::other(
                "nft -i started without its pipes",
            )));
        };
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let kept = Arc::clone(&stderr);
        let reader = thread::Builder::new()
            .name("nft-stderr".into())
            .spawn(move || {
                let mut chunk = [0u8; 512];
                while let Ok(n @ 1..) = pipe.read(&mut chunk) {
                    if let Ok(mut all) = kept.lock() {
                        all.extend_from_slice(&chunk[..n]);
                    }
                }
            })
            .map_err(EventMaskError::NoNft)?;
        Ok(Owner {
            child,
            stdin,
            stderr,
            reader,
        })
    }

    /// Waits until `table` is listed; the reason if nft exited, wrote an
    /// error, or the table did not appear within [`INSTALL_WAIT`].
    fn wait_for(&mut self, table: &str) -> Result<(), String> {
        let deadline = Instant::now() + INSTALL_WAIT;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return Err(format!("nft -i exited ({status})")),
                Ok(None) => {}
                Err(e) => return Err(format!("cannot wait for nft -i: {e}")),
            }
            if self.stderr.lock().is_ok_and(|e| !e.is_empty()) {
                return Err("nft -i refused the commands".to_string());
            }
            if listed(table).map_err(|e| e.to_string())? {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!("the table was not listed within {INSTALL_WAIT:?}"));
            }
            thread::sleep(POLL);
        }
    }

    /// Closes the child's stdin and waits (at most [`EXIT_WAIT`]) for it to
    /// exit, killing it after that. How it ended, and its stderr as
    /// `": …"` (empty if it wrote nothing).
    fn end(self) -> (Ended, String) {
        let Owner {
            mut child,
            stdin,
            stderr,
            reader,
        } = self;
        let ended = if let Ok(Some(status)) = child.try_wait() {
            Ended::Before(status)
        } else {
            drop(stdin);
            let deadline = Instant::now() + EXIT_WAIT;
            loop {
                if let Ok(Some(_)) = child.try_wait() {
                    break Ended::Closed;
                }
                if Instant::now() >= deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    break Ended::Killed;
                }
                thread::sleep(POLL);
            }
        };
        // The child has exited: its stderr is at end of file.
        let _ = reader.join();
        let text = stderr
            .lock()
            .map(|e| nft_messages(&String::from_utf8_lossy(&e)))
            .unwrap_or_default();
        let text = if text.is_empty() {
            text
        } else {
            format!(": {text}")
        };
        (ended, text)
    }

    /// Kills the child; as [`Owner::end`].
    fn kill(mut self) -> (Ended, String) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.end()
    }
}

/// nft's messages in `stderr` on one line: its `Error:` and `Warning:`
/// lines, without the command it echoes and the carets under it (all
/// non-blank lines if it wrote neither).
fn nft_messages(stderr: &str) -> String {
    let lines = || stderr.lines().map(str::trim).filter(|l| !l.is_empty());
    let messages: Vec<&str> = lines()
        .filter(|l| l.starts_with("Error") || l.starts_with("Warning"))
        .collect();
    if messages.is_empty() {
        lines().collect::<Vec<_>>().join(" / ")
    } else {
        messages.join(" / ")
    }
}

/// Removes the legacy table [`LEGACY_TABLE`] that versions before table
/// ownership installed (and left when killed); run at every start, with or
/// without `--event-mask`. Returns whether there was one. Without `nft` on
/// the machine there can be no table: `Ok(false)`.
pub fn remove_legacy() -> Result<bool, EventMaskError> {
    if !listed(LEGACY_TABLE).unwrap_or(false) {
        return Ok(false);
    }
    let out = table_command("delete", LEGACY_TABLE)?;
    if out.status.success() {
        Ok(true)
    } else {
        Err(EventMaskError::Refused {
            what: "delete",
            table: LEGACY_TABLE.to_string(),
            detail: format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        })
    }
}

/// Whether `nft list table FAMILY NAME` finds `table`.
fn listed(table: &str) -> Result<bool, EventMaskError> {
    Ok(table_command("list", table)?.status.success())
}

/// Runs `nft VERB table FAMILY NAME` for `table` ("FAMILY NAME"); its
/// stdout is discarded.
fn table_command(verb: &str, table: &str) -> Result<Output, EventMaskError> {
    let (family, name) = table.split_once(' ').unwrap_or((FAMILY, table));
    Command::new("nft")
        .args([verb, "table", family, name])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .map_err(EventMaskError::NoNft)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subnets(list: &[&str]) -> Vec<Subnet> {
        list.iter().map(|s| s.parse().expect("subnet")).collect()
    }

    #[test]
    fn commands_mask_per_family_with_exclusions_first() {
        let list = commands(
            "conntrack_metrics_1_abc",
            &subnets(&["10.96.0.0/16", "fd00:96::/112", "10.97.0.0/16"]),
            &subnets(&["10.96.5.0/24"]),
        );
        let rules = |chain: &str| -> Vec<String> {
            let head = format!("add rule inet conntrack_metrics_1_abc {chain} ");
            list.iter()
                .filter_map(|c| c.strip_prefix(&head))
                .map(str::to_string)
                .collect()
        };
        let want = vec![
            "ct state new ip daddr { 10.96.5.0/24 } ct event set 0x0 accept",
            "ct state new ip daddr { 10.96.0.0/16, 10.97.0.0/16 } ct event set 0x2d accept",
            "ct state new ip6 daddr { fd00:96::/112 } ct event set 0x2d accept",
            "ct state new ct event set 0x0",
        ];
        assert_eq!(rules("prerouting"), want);
        assert_eq!(rules("output"), want);
        // The owned table first, then each chain before its rules.
        assert_eq!(
            list[0],
            "add table inet conntrack_metrics_1_abc { flags owner; comment \
             \"conntrack-metrics --event-mask: deleted by the kernel when the exporter exits\"; }"
        );
        assert_eq!(
            list[1],
            "add chain inet conntrack_metrics_1_abc prerouting \
             { type filter hook prerouting priority -150; policy accept; }"
        );
        assert_eq!(
            list[6],
            "add chain inet conntrack_metrics_1_abc output \
             { type filter hook output priority -150; policy accept; }"
        );
        assert_eq!(list.len(), 11);
    }

    #[test]
    fn commands_fit_on_the_one_line_nft_i_reads() {
        let list = commands("t", &subnets(&["10.96.0.0/16"]), &[]);
        assert!(list
            .iter()
            .all(|c| !c.contains('\n') && c.starts_with("add ")));
        // Only the default rule, with no subnet of a family.
        assert_eq!(
            list.last().map(String::as_str),
            Some("add rule inet t output ct state new ct event set 0x0")
        );
    }

    #[test]
    fn the_table_name_tells_instances_apart_also_as_pid_1() {
        let at = |ns: u64| instance_table(1, Duration::from_nanos(ns));
        assert_eq!(
            at(0x18a2_b3c4_d5e6_f7a8),
            "conntrack_metrics_1_18a2b3c4d5e6f7a8"
        );
        assert_ne!(at(1_700_000_000_000_000_000), at(1_700_000_000_000_000_001));
        assert_eq!(
            instance_table(0x4d2, Duration::from_nanos(255)),
            "conntrack_metrics_4d2_ff"
        );
        assert!(at(0).starts_with(TABLE_PREFIX) && LEGACY_TABLE.ends_with(" conntrack_metrics"));
    }

    #[test]
    fn a_refused_install_names_the_owner_flag_requirement() {
        let e = EventMaskError::NotCreated {
            table: "inet conntrack_metrics_1_ff".into(),
            detail: "nft -i refused the commands: Error: Could not process rule: \
                     Operation not supported"
                .into(),
        };
        let text = e.to_string();
        for want in [
            "inet conntrack_metrics_1_ff",
            "Operation not supported",
            "flags owner",
            "Linux 5.12",
        ] {
            assert!(text.contains(want), "{want:?} not in {text}");
        }
    }

    #[test]
    fn nft_errors_come_on_one_line_without_the_echoed_command() {
        // nft 1.0.6 -i on Linux 6.18, given a rule for a chain that does not
        // exist (stderr as written, abridged command line).
        let stderr = "Error: Could not process rule: No such file or directory\n\
                      add table inet t { flags owner; }; add rule inet t nochain ct state new\n\
                      \x20                                                 ^^^^^^^\n";
        assert_eq!(
            nft_messages(stderr),
            "Error: Could not process rule: No such file or directory"
        );
        assert_eq!(
            nft_messages("Error: a\nline\nError: b\n"),
            "Error: a / Error: b"
        );
        assert_eq!(
            nft_messages("something else\n\n  went wrong\n"),
            "something else / went wrong"
        );
        assert_eq!(nft_messages(""), "");
    }

    #[test]
    fn the_service_mask_is_new_reply_protoinfo_destroy() {
        assert_eq!(SERVICE_EVENTS, 0x2d);
    }
}
