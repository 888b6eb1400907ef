//! Service names (namespace and name) for ClusterIPs, read from the rules
//! kube-proxy programs on this node: no Kubernetes API access.
//!
//! Owns: the table ClusterIP, port and protocol -> Service ([`ServiceNames`],
//! swapped whole at each read), and its refresh, at start and then every
//! interval on a thread of its own (`ct-service-names`). The sources:
//! - nftables mode: the `service-ips` maps of the tables `ip kube-proxy`
//!   and `ip6 kube-proxy` (`nftables.rs`);
//! - iptables mode: the `"NAMESPACE/NAME:PORT cluster IP"` rules of the nat
//!   chain `KUBE-SERVICES` (`iptables.rs`), through `iptables-save` and
//!   `ip6tables-save`.
//!
//! A node without either (IPVS mode, Cilium or another replacement of
//! kube-proxy) has no names: logged once, not an error. A read that fails
//! and a rule that cannot be read are counted
//! ([`SERVICE_NAME_ERRORS`]) and logged once per source and kind; the names
//! of the last read stay until a read gives others.
//!
//! Never: runs on the per-event path (its readers are the scrape), stops
//! the exporter, or asks the Kubernetes API.

mod iptables;
mod nftables;
mod read;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use crate::stats::self_metrics::{SERVICE_NAMES, SERVICE_NAME_ERRORS};

pub use read::{read_rules, RulesRead, SourceRead, COMMAND_TIMEOUT};

pub use crate::flow::{ServiceKey, SCTP, TCP, UDP};

/// A Service's namespace and name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceName {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
}

impl fmt::Display for ServiceName {
    /// `namespace/name`, as kubectl writes it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Where names come from; its label value is [`Source::label`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Source {
    /// kube-proxy's nftables mode.
    Nftables,
    /// kube-proxy's iptables mode.
    Iptables,
}

impl Source {
    /// The `source` label's value.
    pub fn label(self) -> &'static str {
        match self {
            Source::Nftables => "nftables",
            Source::Iptables => "iptables",
        }
    }
}

/// The names of one read: immutable, shared by the scrapes that read it.
pub type NameTable = HashMap<ServiceKey, ServiceName>;

/// The names the last read found, for the scrape to look up.
#[derive(Debug, Default)]
pub struct ServiceNames {
    /// Swapped whole at each read; a reader clones the `Arc` under the lock.
    table: Mutex<Arc<NameTable>>,
}

impl ServiceNames {
    /// Reads the rules now (so the first scrape has names), then every
    /// `interval` on the thread `ct-service-names`, in the calling thread's
    /// network namespace. Never fails: without the thread (it could not be
    /// started: logged) the names stay those of the first read.
    pub fn start(interval: Duration) -> Arc<ServiceNames> {
        let names = Arc::new(ServiceNames::default());
        let mut refresh = Refresh::new();
        refresh.once(&names);
        let shared = Arc::clone(&names);
        let thread = std::thread::Builder::new()
            .name("ct-service-names".into())
            .spawn(move || loop {
                std::thread::sleep(interval);
                refresh.once(&shared);
            });
        if let Err(e) = thread {
            crate::log!("warning: service names are read once only: no thread ({e})");
        }
        names
    }

    /// The Service at `ip`, `port`, `proto` (IP protocol number), if the
    /// last read named one.
    pub fn lookup(&self, key: ServiceKey) -> Option<ServiceName> {
        self.table().get(&key).cloned()
    }

    /// The whole table of the last read: one lock for a scrape's many
    /// look-ups, none of which clones.
    pub fn table(&self) -> Arc<NameTable> {
        Arc::clone(&self.table.lock().unwrap_or_else(PoisonError::into_inner))
    }

    fn replace(&self, table: NameTable) {
        *self.table.lock().unwrap_or_else(PoisonError::into_inner) = Arc::new(table);
    }
}

/// What a source gave, merged into one table: nftables first, so a key
/// both sources name (left-over rules of the other mode) keeps the
/// nftables name.
fn merge(read: &RulesRead) -> NameTable {
    let mut table = NameTable::new();
    for source in [&read.nftables, &read.iptables] {
        for (addr, name) in &source.names {
            table.entry(*addr).or_insert_with(|| name.clone());
        }
    }
    table
}

/// The refresh's state: what it has logged, and what it last found.
struct Refresh {
    logged: HashSet<(Source, &'static str)>,
    /// Whether any of kube-proxy's rules was found at the last read.
    found: Option<bool>,
}

impl Refresh {
    fn new() -> Refresh {
        Refresh {
            logged: HashSet::new(),
            found: None,
        }
    }

    /// One read: the table replaced, the gauges set, the problems counted
    /// and, the first time each kind shows, logged.
    fn once(&mut self, names: &ServiceNames) {
        let read = read_rules();
        for source in [&read.nftables, &read.iptables] {
            self.record(source);
        }
        let found = read.nftables.found || read.iptables.found;
        if self.found != Some(found) {
            if found {
                let sources: Vec<&str> = [&read.nftables, &read.iptables]
                    .into_iter()
                    .filter(|s| s.found)
                    .map(|s| s.source.label())
                    .collect();
                crate::log!(
                    "service names: reading kube-proxy's rules ({})",
                    sources.join(", ")
                );
            } else {
                let why: Vec<String> = [&read.nftables, &read.iptables]
                    .into_iter()
                    .flat_map(|s| s.absent.iter().chain(&s.failed).cloned())
                    .collect();
                crate::log!(
                    "service names: no kube-proxy rules found on this node ({}); Services \
                     stay unnamed (join with kube_service_info: docs/service-names.md)",
                    why.join("; ")
                );
            }
            self.found = Some(found);
        }
        names.replace(merge(&read));
    }

    fn record(&mut self, source: &SourceRead) {
        let label = source.source.label();
        let services: BTreeSet<&ServiceName> = source.names.iter().map(|(_, n)| n).collect();
        metrics::gauge!(SERVICE_NAMES, "source" => label).set(services.len() as f64);
        let failed =
            metrics::counter!(SERVICE_NAME_ERRORS, "source" => label, "reason" => "read failed");
        failed.increment(source.failed.len() as u64);
        if let Some(first) = source.failed.first() {
            if self.logged.insert((source.source, "read failed")) {
                crate::log!("warning: service names ({label}): {first} (logged once; counted in {SERVICE_NAME_ERRORS})");
            }
        }
        let malformed =
            metrics::counter!(SERVICE_NAME_ERRORS, "source" => label, "reason" => "malformed");
        malformed.increment(source.malformed);
        if let Some(first) = &source.first_malformed {
            if self.logged.insert((source.source, "malformed")) {
                crate::log!(
                    "warning: service names ({label}): skipped {} rule(s) not in kube-proxy's \
                     format, e.g. {first:?} (logged once; counted in {SERVICE_NAME_ERRORS})",
                    source.malformed
                );
            }
        }
    }
}

/// Parsed names of one command's output, with what was skipped.
#[derive(Debug, Default)]
struct Parsed {
    names: Vec<(ServiceKey, ServiceName)>,
    malformed: u64,
    first_malformed: Option<String>,
}

impl Parsed {
    fn malformed(&mut self, text: &str) {
        self.malformed += 1;
        self.first_malformed.get_or_insert_with(|| text.to_string());
    }
}

/// A Kubernetes namespace, Service or port name as kube-proxy writes it: a
/// DNS label of 1 to 63 lowercase letters, digits and dashes.
fn valid_name(s: &str) -> bool {
    (1..=63).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// Names as `ADDR NAMESPACE/NAME`, by address: what the tests compare.
#[cfg(test)]
fn described(names: &[(ServiceKey, ServiceName)]) -> Vec<String> {
    let mut sorted = names.to_vec();
    sorted.sort();
    sorted.iter().map(|(a, n)| format!("{a} {n}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(ip: &str, port: u16, proto: u8) -> ServiceKey {
        ServiceKey {
            addr: ip.parse().unwrap(),
            port,
            proto,
        }
    }

    fn name(ns: &str, name: &str) -> ServiceName {
        ServiceName {
            namespace: ns.into(),
            name: name.into(),
        }
    }

    fn source(source: Source, names: Vec<(ServiceKey, ServiceName)>) -> SourceRead {
        SourceRead {
            source,
            names,
            malformed: 0,
            first_malformed: None,
            found: true,
            absent: vec![],
            failed: vec![],
        }
    }

    #[test]
    fn merge_prefers_nftables_and_lookup_finds_by_address_port_and_protocol() {
        let read = RulesRead {
            nftables: source(
                Source::Nftables,
                vec![(addr("10.96.0.10", 53, UDP), name("kube-system", "kube-dns"))],
            ),
            iptables: source(
                Source::Iptables,
                vec![
                    (addr("10.96.0.10", 53, UDP), name("stale", "left-over")),
                    (addr("10.96.0.10", 53, TCP), name("kube-system", "kube-dns")),
                ],
            ),
        };
        let names = ServiceNames::default();
        names.replace(merge(&read));
        assert_eq!(
            names.lookup(addr("10.96.0.10", 53, UDP)),
            Some(name("kube-system", "kube-dns"))
        );
        assert_eq!(
            names.lookup(addr("10.96.0.10", 53, TCP)),
            Some(name("kube-system", "kube-dns"))
        );
        assert_eq!(names.lookup(addr("10.96.0.10", 53, SCTP)), None);
        assert_eq!(names.lookup(addr("10.96.0.10", 54, UDP)), None);
        assert_eq!(names.table().len(), 2);
        assert_eq!(
            described(&read.iptables.names),
            [
                "10.96.0.10:53/tcp kube-system/kube-dns",
                "10.96.0.10:53/udp stale/left-over"
            ]
        );
        let v6 = addr("fd00::a", 3868, SCTP);
        assert_eq!(v6.to_string(), "[fd00::a]:3868/sctp");
    }

    #[test]
    fn names_are_dns_labels() {
        for ok in ["a", "kube-system", "x1-2", &"a".repeat(63)] {
            assert!(valid_name(ok), "{ok}");
        }
        for bad in ["", "Ns", "a_b", "a.b", "a/b", "a b", &"a".repeat(64)] {
            assert!(!valid_name(bad), "{bad}");
        }
    }
}
