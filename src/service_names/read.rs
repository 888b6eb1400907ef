//! One read of kube-proxy's rules: the commands that print them, and what
//! each source gave.
//!
//! Owns: running `nft list map {ip,ip6} kube-proxy service-ips` and
//! `{ip,ip6}tables-save -t nat` (in the caller's network namespace, with
//! `LC_ALL=C`, each bounded by [`COMMAND_TIMEOUT`]), and telling apart rules
//! that are absent (no binary, no table, no chain: a node without
//! kube-proxy, or in the other mode) from a read that failed.
//!
//! Never: parses (that is `nftables` and `iptables`), records a metric or
//! logs (the refresh in `mod.rs` does, from what this returns).

use std::io::{self, Read};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use super::{iptables, nftables, Parsed, ServiceKey, ServiceName, Source};

/// How long one command may take before it is killed and its read counted
/// as failed.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);

/// What one source gave in one read.
#[derive(Debug)]
pub struct SourceRead {
    /// Where the names come from.
    pub source: Source,
    /// The ClusterIPs named, in the order read.
    pub names: Vec<(ServiceKey, ServiceName)>,
    /// Rules or map elements skipped as unreadable.
    pub malformed: u64,
    /// The first of them, for the log.
    pub first_malformed: Option<String>,
    /// Whether any of kube-proxy's tables or chains was there (even empty).
    pub found: bool,
    /// Why each read that found nothing did (e.g. "nft is not installed"):
    /// not errors.
    pub absent: Vec<String>,
    /// The reads that failed, described: errors.
    pub failed: Vec<String>,
}

impl SourceRead {
    fn new(source: Source) -> SourceRead {
        SourceRead {
            source,
            names: Vec::new(),
            malformed: 0,
            first_malformed: None,
            found: false,
            absent: Vec::new(),
            failed: Vec::new(),
        }
    }

    fn add(&mut self, parsed: Parsed) {
        self.names.extend(parsed.names);
        self.malformed += parsed.malformed;
        if self.first_malformed.is_none() {
            self.first_malformed = parsed.first_malformed;
        }
    }
}

/// What both sources gave in one read.
#[derive(Debug)]
pub struct RulesRead {
    /// The nftables mode's `service-ips` maps.
    pub nftables: SourceRead,
    /// The iptables mode's `KUBE-SERVICES` chains.
    pub iptables: SourceRead,
}

/// Reads both sources once, in the calling thread's network namespace.
/// Never fails as a whole: each read's failure is in its [`SourceRead`].
pub fn read_rules() -> RulesRead {
    let mut nft = SourceRead::new(Source::Nftables);
    for family in ["ip", "ip6"] {
        let what = format!("table {family} kube-proxy");
        match run("nft", &["list", "map", family, "kube-proxy", "service-ips"]) {
            Ok(text) => {
                nft.found = true;
                nft.add(nftables::parse_service_ips(&text));
            }
            Err(Run::NotInstalled) => nft.absent.push("nft is not installed".into()),
            // nft's message for a table or map that does not exist.
            Err(Run::Failed(stderr)) if stderr.contains("No such file or directory") => {
                nft.absent.push(format!("no {what}"))
            }
            Err(e) => nft
                .failed
                .push(format!("nft list map {family} kube-proxy: {e}")),
        }
    }
    let mut ipt = SourceRead::new(Source::Iptables);
    for program in ["iptables-save", "ip6tables-save"] {
        match run(program, &["-t", "nat"]) {
            Ok(text) => {
                let (parsed, found) = iptables::parse_save(&text);
                ipt.found |= found;
                if !found {
                    ipt.absent
                        .push(format!("no KUBE-SERVICES chain ({program})"));
                }
                ipt.add(parsed);
            }
            Err(Run::NotInstalled) => ipt.absent.push(format!("{program} is not installed")),
            Err(e) => ipt.failed.push(format!("{program} -t nat: {e}")),
        }
    }
    nft.absent.dedup();
    ipt.absent.dedup();
    RulesRead {
        nftables: nft,
        iptables: ipt,
    }
}

/// Why a command gave no text.
#[derive(Debug)]
enum Run {
    /// No such program on `PATH`.
    NotInstalled,
    /// It could not be started or read.
    Io(io::Error),
    /// It exited unsuccessfully; its stderr.
    Failed(String),
    /// It ran past [`COMMAND_TIMEOUT`] and was killed.
    TimedOut,
}

impl std::fmt::Display for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Run::NotInstalled => write!(f, "not installed"),
            Run::Io(e) => write!(f, "{e}"),
            Run::Failed(stderr) => {
                let first = stderr.lines().next().unwrap_or("no message");
                write!(f, "failed: {first}")
            }
            Run::TimedOut => write!(f, "no answer in {}s", COMMAND_TIMEOUT.as_secs()),
        }
    }
}

/// Runs `program` and returns its stdout. A helper thread reads the output
/// so that this one can give up after [`COMMAND_TIMEOUT`].
fn run(program: &str, args: &[&str]) -> Result<String, Run> {
    let mut child = Command::new(program)
        .args(args)
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => Run::NotInstalled,
            _ => Run::Io(e),
        })?;
    let (Some(mut stdout), Some(mut stderr)) = (child.stdout.take(), child.stderr.take()) else {
        unreachable!("both were piped");
    };
    let (done, output) = mpsc::channel();
    let reader = std::thread::Builder::new()
        .name("ct-service-names-out".into())
        .spawn(move || {
            let (mut out, mut err) = (Vec::new(), Vec::new());
            // stderr after stdout: the commands write a line or two there.
            let read = stdout
                .read_to_end(&mut out)
                .and_then(|_| stderr.read_to_end(&mut err));
            let _ = done.send(read.map(|_| (out, err)));
        });
    if let Err(e) = reader {
        let _ = child.kill();
        let _ = child.wait();
        return Err(Run::Io(e));
    }
    let (out, err) = match output.recv_timeout(COMMAND_TIMEOUT) {
        Ok(Ok(both)) => both,
        Ok(Err(e)) => {
            let _ = child.kill();
            let _ = child.wait();
            return Err(Run::Io(e));
        }
        Err(_) => {
            let _ = child.kill(); // closes the pipes: the reader ends too
            let _ = child.wait();
            return Err(Run::TimedOut);
        }
    };
    let status = child.wait().map_err(Run::Io)?;
    if !status.success() {
        return Err(Run::Failed(String::from_utf8_lossy(&err).into_owned()));
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}
