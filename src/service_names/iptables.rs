//! kube-proxy's iptables mode: the rules of the nat chain `KUBE-SERVICES`,
//! as `iptables-save -t nat` and `ip6tables-save -t nat` print them.
//!
//! Owns: the reading of that text. kube-proxy (pkg/proxy/iptables/
//! proxier.go) writes one rule per Service port and ClusterIP, with the
//! comment `"NAMESPACE/NAME:PORTNAME cluster IP"` (`NAMESPACE/NAME cluster
//! IP` for a Service's one unnamed port); `iptables-save` prints it as
//!
//! ```text
//! -A KUBE-SERVICES -d 10.96.0.10/32 -p udp -m comment --comment "kube-system/kube-dns:dns cluster IP" -m udp --dport 53 -j KUBE-SVC-TCOU7JCQXEZGVUNU
//! ```
//!
//! Only those rules name a Service: the chain's other rules (external and
//! LoadBalancer IPs, the NodePorts jump, rules without a comment) are
//! passed over, not counted.
//!
//! Never: runs a command (that is `read`), or fails on any text: a
//! "cluster IP" rule it cannot read is skipped and counted.

use std::net::IpAddr;

use super::nftables::protocol;
use super::{valid_name, Parsed, ServiceKey, ServiceName};

/// The chain kube-proxy dispatches Service traffic from.
const CHAIN: &str = "KUBE-SERVICES";

/// What ends the comment of a rule that names a ClusterIP; a comment with
/// it elsewhere is a ClusterIP rule that cannot be read.
const CLUSTER_IP: &str = " cluster IP";

/// The ClusterIP rules of one `iptables-save -t nat` output; `found` tells
/// whether the nat table had a `KUBE-SERVICES` chain at all.
pub fn parse_save(text: &str) -> (Parsed, bool) {
    let mut parsed = Parsed::default();
    let (mut in_nat, mut found) = (false, false);
    for line in text.lines() {
        let line = line.trim_end();
        if let Some(table) = line.strip_prefix('*') {
            in_nat = table == "nat";
            continue;
        }
        if !in_nat {
            continue;
        }
        if line
            .strip_prefix(':')
            .is_some_and(|l| l.split_whitespace().next() == Some(CHAIN))
        {
            found = true;
            continue;
        }
        let Some(tokens) = tokens(line) else {
            if line.starts_with("-A KUBE-SERVICES ") {
                parsed.malformed(line); // an unclosed quote
            }
            continue;
        };
        if tokens.len() < 2 || tokens[0] != "-A" || tokens[1] != CHAIN {
            continue;
        }
        found = true;
        let Some(comment) = value_of(&tokens, "--comment") else {
            continue;
        };
        if !comment.contains(CLUSTER_IP) {
            continue;
        }
        match parse_rule(&tokens, comment) {
            Some((addr, name)) => parsed.names.push((addr, name)),
            None => parsed.malformed(line),
        }
    }
    (parsed, found)
}

/// A ClusterIP rule: `-d IP/32 -p PROTO … --dport PORT`, named by
/// `NAMESPACE/NAME[:PORTNAME]`.
fn parse_rule(tokens: &[String], comment: &str) -> Option<(ServiceKey, ServiceName)> {
    let service_port = comment.strip_suffix(CLUSTER_IP)?;
    if tokens.iter().any(|t| t == "!") {
        return None; // a negated match is not kube-proxy's
    }
    let (service, port_name) = match service_port.split_once(':') {
        Some((service, port_name)) => (service, Some(port_name)),
        None => (service_port, None),
    };
    let (namespace, name) = service.split_once('/')?;
    if !valid_name(namespace) || !valid_name(name) || !port_name.is_none_or(valid_name) {
        return None;
    }
    let ip = host_address(value_of(tokens, "-d")?)?;
    let proto = protocol(value_of(tokens, "-p")?)?;
    let port = value_of(tokens, "--dport")?.parse().ok()?;
    let name = ServiceName {
        namespace: namespace.to_string(),
        name: name.to_string(),
    };
    Some((
        ServiceKey {
            addr: ip,
            port,
            proto,
        },
        name,
    ))
}

/// `IP`, `IP/32` or `IP/128`: one address, not a prefix.
fn host_address(text: &str) -> Option<IpAddr> {
    let (ip, len) = match text.split_once('/') {
        Some((ip, len)) => (ip.parse::<IpAddr>().ok()?, Some(len)),
        None => (text.parse::<IpAddr>().ok()?, None),
    };
    let full = if ip.is_ipv4() { "32" } else { "128" };
    len.is_none_or(|len| len == full).then_some(ip)
}

/// The token after the first `option`.
fn value_of<'a>(tokens: &'a [String], option: &str) -> Option<&'a str> {
    let at = tokens.iter().position(|t| t == option)?;
    tokens.get(at + 1).map(String::as_str)
}

/// A saved rule split as iptables-restore splits it: on whitespace, except
/// inside double quotes, where `\"` and `\\` stand for `"` and `\`. `None`
/// for a quote left open.
fn tokens(line: &str) -> Option<Vec<String>> {
    let mut out = Vec::new();
    let mut chars = line.chars();
    let mut token: Option<String> = None;
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                let t = token.get_or_insert_with(String::new);
                loop {
                    match chars.next()? {
                        '"' => break,
                        '\\' => t.push(chars.next()?),
                        c => t.push(c),
                    }
                }
            }
            c if c.is_whitespace() => out.extend(token.take()),
            c => token.get_or_insert_with(String::new).push(c),
        }
    }
    out.extend(token);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service_names::described;

    fn named(p: &Parsed) -> Vec<String> {
        described(&p.names)
    }

    /// As `iptables-save -t nat` (iptables 1.8.9, nf_tables) printed rules
    /// added in a test namespace with kube-proxy's arguments
    /// (`-m comment --comment "…" -m tcp -p tcp -d IP --dport PORT -j …`),
    /// plus other tables' lines and the chain's non-ClusterIP rules.
    const SAVE: &str = r#"# Generated by iptables-save v1.8.9 (nf_tables) on Wed Dec  2 06:56:14 2026
*filter
:KUBE-SERVICES - [0:0]
-A KUBE-SERVICES -d 10.96.0.50/32 -p tcp -m comment --comment "ns/no-endpoints:http has no endpoints" -m tcp --dport 80 -j REJECT --reject-with icmp-port-unreachable
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-SVC-NPX46M4PTMTKRN6Y - [0:0]
-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A KUBE-SERVICES -d 10.96.0.1/32 -p tcp -m comment --comment "default/kubernetes:https cluster IP" -m tcp --dport 443 -j KUBE-SVC-NPX46M4PTMTKRN6Y
-A KUBE-SERVICES -d 10.96.0.10/32 -p udp -m comment --comment "kube-system/kube-dns:dns cluster IP" -m udp --dport 53 -j KUBE-SVL-ABCDEF
-A KUBE-SERVICES -d 10.96.0.11/32 -p tcp -m comment --comment "ns1/nameless cluster IP" -m tcp --dport 8080 -j KUBE-SVC-NPX46M4PTMTKRN6Y
-A KUBE-SERVICES -d 10.96.0.12/32 -p sctp -m comment --comment "my-team-ns/diameter-svc:diameter-port cluster IP" -m sctp --dport 3868 -j KUBE-SVC-AAAAAAAAAAAAAAAA
-A KUBE-SERVICES -d 192.168.99.1/32 -p tcp -m comment --comment "ns1/svc1:p80 external IP" -m tcp --dport 80 -j KUBE-EXT-XPGD46QRK7WJZT7O
-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be the last rule in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS
COMMIT
"#;

    #[test]
    fn cluster_ip_rules_name_their_service() {
        let (p, found) = parse_save(SAVE);
        assert!(found);
        assert_eq!(
            named(&p),
            [
                "10.96.0.1:443/tcp default/kubernetes",
                "10.96.0.10:53/udp kube-system/kube-dns",
                "10.96.0.11:8080/tcp ns1/nameless",
                "10.96.0.12:3868/sctp my-team-ns/diameter-svc",
            ]
        );
        assert_eq!(p.malformed, 0, "other rules are passed over");
    }

    #[test]
    fn ipv6_rules() {
        let text = r#"*nat
:KUBE-SERVICES - [0:0]
-A KUBE-SERVICES -d fd00:10:96::a/128 -p tcp -m comment --comment "ns-2/svc-v6:http-alt cluster IP" -m tcp --dport 8080 -j KUBE-SVC-X
COMMIT
"#;
        let (p, found) = parse_save(text);
        assert!(found);
        assert_eq!(named(&p), ["[fd00:10:96::a]:8080/tcp ns-2/svc-v6"]);
    }

    #[test]
    fn no_chain_is_not_found() {
        let text = "*nat\n:PREROUTING ACCEPT [0:0]\nCOMMIT\n";
        let (p, found) = parse_save(text);
        assert!(!found && p.names.is_empty() && p.malformed == 0);
        // A KUBE-SERVICES chain of another table is not kube-proxy's nat one.
        let (_, found) = parse_save("*filter\n:KUBE-SERVICES - [0:0]\nCOMMIT\n");
        assert!(!found);
    }

    #[test]
    fn malformed_rules_are_skipped_and_counted() {
        let text = r#"*nat
:KUBE-SERVICES - [0:0]
-A KUBE-SERVICES -d 10.96.0.20/32 -p tcp -m comment --comment "\"ns1/quoted:http cluster IP\"" -m tcp --dport 80 -j KUBE-SVC-A
-A KUBE-SERVICES -d 10.96.0.21/32 -p tcp -m comment --comment "ns1/no-port cluster IP" -j KUBE-SVC-A
-A KUBE-SERVICES -d 10.96.0.0/24 -p tcp -m comment --comment "ns1/prefix:http cluster IP" -m tcp --dport 80 -j KUBE-SVC-A
-A KUBE-SERVICES -d 10.96.0.22/32 -p icmp -m comment --comment "ns1/icmp:http cluster IP" -j KUBE-SVC-A
-A KUBE-SERVICES -d 10.96.0.23/32 -p tcp -m comment --comment "Ns1/upper:http cluster IP" -m tcp --dport 80 -j KUBE-SVC-A
-A KUBE-SERVICES -d 10.96.0.24/32 -p tcp -m comment --comment "no-slash:http cluster IP" -m tcp --dport 80 -j KUBE-SVC-A
-A KUBE-SERVICES -d 10.96.0.25/32 -p tcp -m comment --comment "ns1/empty-port: cluster IP" -m tcp --dport 80 -j KUBE-SVC-A
-A KUBE-SERVICES ! -d 10.96.0.26/32 -p tcp -m comment --comment "ns1/negated:http cluster IP" -m tcp --dport 80 -j KUBE-SVC-A
-A KUBE-SERVICES -d 10.96.0.27/32 -p tcp -m comment --comment "ns1/open:http cluster IP -m tcp --dport 80 -j KUBE-SVC-A
-A KUBE-SERVICES -d 10.96.0.2/32 -p tcp -m comment --comment "ns1/good:http cluster IP" -m tcp --dport 80 -j KUBE-SVC-A
COMMIT
"#;
        let (p, _) = parse_save(text);
        assert_eq!(named(&p), ["10.96.0.2:80/tcp ns1/good"]);
        assert_eq!(p.malformed, 9);
        assert!(p
            .first_malformed
            .as_deref()
            .is_some_and(|l| l.contains("10.96.0.20/32")));
    }

    #[test]
    fn tokens_follow_iptables_restore_quoting() {
        assert_eq!(
            tokens(r#"-A X --comment "a \"b\" \\ c" -j Y"#).unwrap(),
            ["-A", "X", "--comment", r#"a "b" \ c"#, "-j", "Y"]
        );
        assert_eq!(tokens(r#"-A X --comment "open"#), None);
    }
}
