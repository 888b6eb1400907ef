//! The census of the kernel's conntrack table: a dump of every entry, at
//! start and then every `--table-dump-seconds`, on a thread of its own;
//! and the table's statistics ([`node_stats`]), read when a scrape renders.
//!
//! Owns: the dump (its request, its answers, each receive bounded by a
//! timeout) and what is read from it:
//! - the Service flows alive in the kernel ([`LiveFlows`]), handed to the
//!   readers, which drop from their flow tables the flows the kernel no
//!   longer has (their DESTROY was lost) and count them;
//! - the DNAT'd flows whose original destination lies outside every
//!   service subnet and is not an address of this node: the gauge
//!   [`DNAT_OUTSIDE`], and once, a hint naming the prefix they fall in. A
//!   `--svc-subnet` narrower than the cluster's Service range shows itself
//!   here (kubeadm's default range is 10.96.0.0/12, the flag's default
//!   10.96.0.0/16).
//!
//! Never: runs on a reader thread or touches a flow table (the readers
//! reconcile their own, between batches), keeps more of a dump than the
//! keys of its Service flows (8 bytes each), or stops the exporter: a dump
//! that fails is logged (the first failure, and the recovery) and counted.

pub mod node_stats;
mod requests;

use std::fmt;
use std::io;
use std::net::IpAddr;
use std::ops::ControlFlow;
use std::time::Duration;

use crate::flow::{wall_clock_ns, FlowTracker, LiveFlows, ServiceFilter, Subnet};
use crate::stats::self_metrics::{DNAT_OUTSIDE, TABLE_DUMPS};
use crate::wire::ctnetlink::dump_request;
use crate::wire::netlink::NLM_F_DUMP_INTR;
use crate::wire::{CtEvent, EventKind, Status};

use requests::Requests;

/// How long one receive of a dump may wait for the kernel (a dump of a
/// million entries takes about a second in all, its parts milliseconds).
pub const RECEIVE_TIMEOUT: Duration = Duration::from_secs(5);

/// What one dump found.
#[derive(Debug)]
pub struct Tally {
    /// The Service flows alive, as flow keys.
    pub live: LiveFlows,
    /// DNAT'd flows to destinations outside every service subnet.
    pub outside: Outside,
    /// The kernel flagged the dump as interrupted (`NLM_F_DUMP_INTR`): the
    /// table changed under it in a way that may have skipped entries, so it
    /// must not be reconciled with.
    pub interrupted: bool,
}

/// DNAT'd flows whose original destination is outside every service
/// subnet and is not an address of this node (NodePorts and host ports
/// are): ClusterIPs a too-narrow `--svc-subnet` misses, or the
/// LoadBalancer and external IPs kube-proxy also translates.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Outside {
    /// How many.
    pub flows: u64,
    /// Lowest and highest destination seen, per family (IPv4, IPv6).
    v4: Option<(IpAddr, IpAddr)>,
    v6: Option<(IpAddr, IpAddr)>,
    /// One destination, with its port, for the hint.
    example: Option<(IpAddr, u16)>,
}

impl Outside {
    fn note(&mut self, dst: IpAddr, port: u16) {
        self.flows += 1;
        self.example.get_or_insert((dst, port));
        let range = if dst.is_ipv4() {
            &mut self.v4
        } else {
            &mut self.v6
        };
        let (low, high) = range.get_or_insert((dst, dst));
        *low = (*low).min(dst);
        *high = (*high).max(dst);
    }

    /// Takes in `other`'s destinations (their ranges and example), keeping
    /// this count: what every dump so far found outside.
    fn absorb(&mut self, other: &Outside) {
        for (mine, theirs) in [(&mut self.v4, other.v4), (&mut self.v6, other.v6)] {
            if let Some((low, high)) = theirs {
                let (l, h) = mine.get_or_insert((low, high));
                *l = (*l).min(low);
                *h = (*h).max(high);
            }
        }
        if self.example.is_none() {
            self.example = other.example;
        }
    }

    /// The smallest prefix holding every destination, per family seen.
    pub fn prefixes(&self) -> Vec<Subnet> {
        [self.v4, self.v6]
            .into_iter()
            .flatten()
            .filter_map(|(low, high)| Subnet::covering(low, high))
            .collect()
    }

    /// The one-time hint to the operator, if there is anything to hint at.
    pub fn hint(&self, services: &[Subnet]) -> Option<String> {
        let (dst, port) = self.example?;
        let join = |list: &[Subnet]| {
            list.iter()
                .map(Subnet::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        };
        let example = match dst {
            IpAddr::V4(_) => format!("{dst}:{port}"),
            IpAddr::V6(_) => format!("[{dst}]:{port}"),
        };
        Some(format!(
            "{} DNAT'd flow(s) go to destinations outside every --svc-subnet ({}) and \
             are not measured; they fall in {} (e.g. {example}). If that is your \
             cluster's Service range (kubeadm's default is 10.96.0.0/12), widen \
             --svc-subnet to cover it; LoadBalancer and external IPs count here too \
             (gauge {DNAT_OUTSIDE})",
            self.flows,
            join(services),
            join(&self.prefixes()),
        ))
    }
}

/// Why a dump failed.
#[derive(Debug)]
pub enum CensusError {
    /// The socket could not be opened, written or read (or timed out).
    Io(io::Error),
    /// The kernel answered the request with an error (positive errno).
    Refused(i32),
    /// An answer could not be parsed.
    Malformed(crate::wire::WireError),
}

impl fmt::Display for CensusError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CensusError::Io(e) => write!(f, "conntrack table dump failed: {e}"),
            CensusError::Refused(errno) => write!(
                f,
                "the kernel refused the conntrack table dump: {}",
                io::Error::from_raw_os_error(*errno)
            ),
            CensusError::Malformed(e) => write!(f, "conntrack table dump unreadable: {e}"),
        }
    }
}

impl std::error::Error for CensusError {}

/// Dumps the table and reads it: one per exporter.
pub struct Census {
    requests: Requests,
    classify: Classify,
}

/// What the census reads of each entry.
struct Classify {
    filter: ServiceFilter,
    services: Vec<Subnet>,
    local: Vec<IpAddr>,
}

impl Census {
    /// A census of the Service flows of `services` minus `excluded`, on a
    /// socket of its own; `local` are this node's addresses (a DNAT to
    /// one of them is a NodePort or host port, not a missed Service).
    pub fn new(services: &[Subnet], excluded: &[Subnet], local: Vec<IpAddr>) -> io::Result<Census> {
        Ok(Census {
            requests: Requests::open(RECEIVE_TIMEOUT)?,
            classify: Classify {
                filter: ServiceFilter::new(services.to_vec(), excluded.to_vec()),
                services: services.to_vec(),
                local,
            },
        })
    }

    /// Dumps the table; `now_ns` is the wall clock before the request.
    pub fn take(&mut self, now_ns: u64) -> Result<Tally, CensusError> {
        let mut keys = Vec::new();
        let mut outside = Outside::default();
        let mut interrupted = false;
        let mut ev = CtEvent::empty(EventKind::New, 0);
        let classify = &self.classify;
        self.requests.ask(dump_request, |header, msg| {
            interrupted |= header.flags & NLM_F_DUMP_INTR != 0;
            if CtEvent::is_event_type(header.kind) {
                CtEvent::parse_into(msg, &mut ev).map_err(CensusError::Malformed)?;
                classify.entry(&ev, &mut keys, &mut outside);
            }
            Ok(ControlFlow::Continue(()))
        })?;
        Ok(Tally {
            live: LiveFlows::new(keys, now_ns),
            outside,
            interrupted,
        })
    }
}

impl Classify {
    /// One entry: a Service flow's key, or a DNAT'd flow outside.
    fn entry(&self, ev: &CtEvent, keys: &mut Vec<u64>, outside: &mut Outside) {
        if self.filter.to_service(ev) {
            keys.extend(FlowTracker::key_of(ev));
            return;
        }
        let Some(dst) = ev.orig.and_then(|t| t.dst) else {
            return;
        };
        // DST_NAT only: a reply from elsewhere without it is SNAT's or a
        // helper's doing, not a Service.
        let dnat = ev.status.is_some_and(|s| s.has(Status::DST_NAT));
        let in_services = self.services.iter().any(|s| s.contains(dst));
        if dnat && !in_services && !dst.is_loopback() && !self.local.contains(&dst) {
            let port = ev.orig.and_then(|t| t.dst_port).unwrap_or(0);
            outside.note(dst, port);
        }
    }
}

/// Runs the census every `interval`, from now on, on the calling thread
/// (never returns): each tally's [`LiveFlows`] goes to `deliver` unless the
/// dump was interrupted, the gauge and the counter are set, and the hint
/// is logged when the prefix of every destination found outside so far
/// first appears or widens (once, unless flows to a wider range come
/// later: a first dump may catch only some of them).
pub fn run(mut census: Census, interval: Duration, mut deliver: impl FnMut(LiveFlows)) -> ! {
    let gauge = metrics::gauge!(DNAT_OUTSIDE);
    let ok = metrics::counter!(TABLE_DUMPS, "outcome" => "ok");
    let failed = metrics::counter!(TABLE_DUMPS, "outcome" => "failed");
    let mut failing = false;
    // Every destination found outside so far, and the prefixes last named.
    let (mut ever, mut named) = (Outside::default(), Vec::new());
    loop {
        match census.take(wall_clock_ns()) {
            Ok(tally) => {
                ok.increment(1);
                if failing {
                    crate::log!("conntrack table dump works again");
                    failing = false;
                }
                gauge.set(tally.outside.flows as f64);
                ever.absorb(&tally.outside);
                ever.flows = tally.outside.flows;
                let prefixes = ever.prefixes();
                if ever.flows > 0 && prefixes != named {
                    if let Some(hint) = ever.hint(&census.classify.services) {
                        crate::log!("hint: {hint}");
                    }
                    named = prefixes;
                }
                if !tally.interrupted {
                    deliver(tally.live);
                }
            }
            Err(e) => {
                failed.increment(1);
                if !failing {
                    crate::log!("warning: {e} (the next in {}s)", interval.as_secs());
                    failing = true;
                }
            }
        }
        std::thread::sleep(interval);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn outside_names_the_prefix_of_every_destination() {
        let mut o = Outside::default();
        assert_eq!(o.hint(&[]), None);
        o.note(ip("10.100.1.1"), 80);
        o.note(ip("10.104.2.2"), 53);
        o.note(ip("10.101.0.9"), 443);
        o.note(ip("fd00:96::1:5"), 80);
        assert_eq!(o.flows, 4);
        let prefixes: Vec<String> = o.prefixes().iter().map(Subnet::to_string).collect();
        assert_eq!(prefixes, ["10.96.0.0/12", "fd00:96::1:5/128"]);
        let mut ever = Outside::default();
        let mut first = Outside::default();
        first.note(ip("10.100.1.1"), 80);
        ever.absorb(&first);
        assert_eq!(ever.prefixes()[0].to_string(), "10.100.1.1/32");
        ever.absorb(&o);
        assert_eq!(
            ever.prefixes(),
            o.prefixes(),
            "a later, wider dump widens it"
        );
        let hint = o.hint(&["10.96.0.0/16".parse().unwrap()]).unwrap();
        assert!(
            hint.starts_with("4 DNAT'd flow(s)")
                && hint.contains("(10.96.0.0/16)")
                && hint.contains("fall in 10.96.0.0/12, fd00:96::1:5/128 (e.g. 10.100.1.1:80)"),
            "{hint}"
        );
    }
}
