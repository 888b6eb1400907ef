//! kube-proxy's nftables mode: the `service-ips` verdict map of the tables
//! `ip kube-proxy` and `ip6 kube-proxy`, as `nft list map` prints it.
//!
//! Owns: the reading of that text. kube-proxy (pkg/proxy/nftables/
//! proxier.go) writes one element per Service port and address,
//! `IP . PROTO . PORT : goto CHAIN`, where CHAIN is
//! `service-HASH-NAMESPACE/NAME/PROTO/PORTNAME` (cluster traffic policy),
//! `local-HASH-…` (internal traffic policy Local) or `external-HASH-…`
//! (external and LoadBalancer IPs); HASH is 8 base32 characters and
//! PORTNAME is empty for a Service's one unnamed port. `nft` prints the
//! elements inside `elements = { … }`, comma-separated, one or several to a
//! line (nft indents with tabs):
//!
//! ```text
//! table ip kube-proxy {
//!     map service-ips {
//!         type ipv4_addr . inet_proto . inet_service : verdict
//!         comment "ClusterIP, ExternalIP and LoadBalancer IP traffic"
//!         elements = { 10.96.0.10 . udp . 53 : goto service-ULMVA6XW-kube-system/kube-dns/udp/dns,
//!                  10.96.0.1 . tcp . 443 : goto service-2QRHZV4L-default/kubernetes/tcp/https }
//!     }
//! }
//! ```
//!
//! Only ClusterIPs are named (`service-` and `local-` chains): the exporter
//! measures flows to `--svc-subnet`, where external and LoadBalancer IPs
//! are not, so `external-` elements are passed over (not counted).
//!
//! Never: runs a command (that is `read`), or fails on any text: an element
//! it cannot read is skipped and counted.

use std::net::IpAddr;

use super::{valid_name, Parsed, ServiceKey, ServiceName};

/// The elements of one `nft list map … service-ips` output.
pub fn parse_service_ips(text: &str) -> Parsed {
    let mut parsed = Parsed::default();
    let Some(at) = text.find("elements = {") else {
        return parsed; // an empty map
    };
    let body = &text[at + "elements = {".len()..];
    for element in split_elements(body) {
        let element = element.trim();
        if element.is_empty() {
            continue;
        }
        match parse_element(element) {
            Element::Named(addr, name) => parsed.names.push((addr, name)),
            Element::External => {}
            Element::Malformed => parsed.malformed(element),
        }
    }
    parsed
}

/// The comma-separated elements up to the `}` that closes the set, outside
/// double quotes (an element's comment may hold either).
fn split_elements(body: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut start, mut quoted) = (0, false);
    for (i, c) in body.char_indices() {
        match c {
            '"' => quoted = !quoted,
            ',' if !quoted => {
                out.push(&body[start..i]);
                start = i + 1;
            }
            '}' if !quoted => {
                out.push(&body[start..i]);
                return out;
            }
            _ => {}
        }
    }
    out.push(&body[start..]); // no closing brace: the last one is checked as it is
    out
}

enum Element {
    Named(ServiceKey, ServiceName),
    External,
    Malformed,
}

/// `IP . PROTO . PORT : goto CHAIN`.
fn parse_element(element: &str) -> Element {
    let Some((key, verdict)) = element.split_once(" : ") else {
        return Element::Malformed;
    };
    let parts: Vec<&str> = key.split(" . ").map(str::trim).collect();
    let [ip, proto, port] = parts[..] else {
        return Element::Malformed;
    };
    // What follows the port (an element's `comment "…"`) is not the key.
    let port = port.split_whitespace().next().unwrap_or_default();
    let (Ok(ip), Some(proto), Ok(port)) = (ip.parse::<IpAddr>(), protocol(proto), port.parse())
    else {
        return Element::Malformed;
    };
    let verdict = verdict.trim();
    let Some(chain) = verdict
        .strip_prefix("goto ")
        .or_else(|| verdict.strip_prefix("jump "))
    else {
        return Element::Malformed;
    };
    let chain = chain.trim().trim_matches('"');
    if chain.starts_with("external-") {
        return Element::External;
    }
    let Some(base) = chain
        .strip_prefix("service-")
        .or_else(|| chain.strip_prefix("local-"))
    else {
        return Element::Malformed;
    };
    match service_of_chain(base, proto) {
        Some(name) => Element::Named(
            ServiceKey {
                addr: ip,
                port,
                proto,
            },
            name,
        ),
        None => Element::Malformed,
    }
}

/// `HASH-NAMESPACE/NAME/PROTO/PORTNAME`, whose protocol must be the key's.
fn service_of_chain(base: &str, proto: u8) -> Option<ServiceName> {
    let (hash, rest) = base.split_once('-')?;
    let hash_ok = hash.len() == 8
        && hash
            .bytes()
            .all(|b| b.is_ascii_uppercase() || (b'2'..=b'7').contains(&b));
    let parts: Vec<&str> = rest.split('/').collect();
    let [namespace, name, chain_proto, port_name] = parts[..] else {
        return None;
    };
    let port_ok = port_name.is_empty() || valid_name(port_name);
    (hash_ok
        && valid_name(namespace)
        && valid_name(name)
        && protocol(chain_proto) == Some(proto)
        && port_ok)
        .then(|| ServiceName {
            namespace: namespace.to_string(),
            name: name.to_string(),
        })
}

/// An IP protocol as nft prints it (a name, or a number it has none for).
pub(super) fn protocol(text: &str) -> Option<u8> {
    ServiceKey::protocol_number(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service_names::described;

    fn named(p: &Parsed) -> Vec<String> {
        described(&p.names)
    }

    /// As `nft list map ip kube-proxy service-ips` (nftables 1.0.6) printed a
    /// table loaded with `nft -f` in a test namespace, with kube-proxy's
    /// element and chain formats: one element a line.
    const IPV4: &str = "table ip kube-proxy {
\tmap service-ips {
\t\ttype ipv4_addr . inet_proto . inet_service : verdict
\t\tcomment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\"
\t\telements = { 10.96.0.20 . sctp . 3868 : goto service-BBBBBBBB-my-ns/web/sctp/,
\t\t\t     10.96.0.10 . udp . 53 : goto local-AAAAAAAA-kube-system/kube-dns/udp/dns,
\t\t\t     192.168.99.1 . tcp . 80 : goto external-CCCCCCCC-ns1/svc1/tcp/p80,
\t\t\t     172.30.0.41 . tcp . 80 : goto service-ULMVA6XW-ns1/svc1/tcp/p80 }
\t}
}
";

    #[test]
    fn clusterip_elements_name_their_service() {
        let p = parse_service_ips(IPV4);
        assert_eq!(
            named(&p),
            [
                "10.96.0.10:53/udp kube-system/kube-dns",
                "10.96.0.20:3868/sctp my-ns/web",
                "172.30.0.41:80/tcp ns1/svc1",
            ]
        );
        assert_eq!(p.malformed, 0, "the external element is passed over");
    }

    #[test]
    fn ipv6_one_line_and_a_port_name_with_dashes() {
        let text = "table ip6 kube-proxy {
\tmap service-ips {
\t\ttype ipv6_addr . inet_proto . inet_service : verdict
\t\telements = { fd00:10:96::a . tcp . 8080 : goto service-DDDDDDDD-ns-2/svc-v6/tcp/http-alt-port }
\t}
}
";
        let p = parse_service_ips(text);
        assert_eq!(named(&p), ["[fd00:10:96::a]:8080/tcp ns-2/svc-v6"]);
        assert_eq!(p.malformed, 0);
    }

    #[test]
    fn several_elements_to_a_line_and_an_element_comment() {
        let text = "\t\telements = { 10.96.0.1 . tcp . 443 : goto service-2QRHZV4L-default/kubernetes/tcp/https, 10.96.0.2 . 17 . 53 comment \"a, b\" : goto service-AAAAAAAA-a/b/udp/ }";
        let p = parse_service_ips(text);
        assert_eq!(
            named(&p),
            [
                "10.96.0.1:443/tcp default/kubernetes",
                "10.96.0.2:53/udp a/b"
            ]
        );
    }

    #[test]
    fn an_empty_map_names_nothing() {
        let text = "table ip kube-proxy {
\tmap service-ips {
\t\ttype ipv4_addr . inet_proto . inet_service : verdict
\t}
}
";
        let p = parse_service_ips(text);
        assert!(p.names.is_empty() && p.malformed == 0);
    }

    #[test]
    fn malformed_elements_are_skipped_and_counted() {
        let text = "\t\telements = { 10.96.0.1 . tcp . 443 : goto service-2QRHZV4L-default/kubernetes/tcp/https,
\t\t\t     10.96.0.30 . udp . 80 : goto service-XXXXXXXX-ns/svc/tcp/p80,
\t\t\t     10.96.0.31 . tcp . 80 : goto service-bogus,
\t\t\t     10.96.0.32 . tcp . 80 : goto service-lowercas-ns/svc/tcp/p80,
\t\t\t     10.96.0.33 . tcp . 80 : goto service-XXXXXXXX-Ns/svc/tcp/p80,
\t\t\t     10.96.0.34 . tcp . 80 : goto service-XXXXXXXX-ns/svc/tcp/p80/x,
\t\t\t     10.96.0.35 . tcp . 80 : drop,
\t\t\t     10.96.0.36 . tcp . 80 : goto mark-for-masquerade,
\t\t\t     10.96.0.999 . tcp . 80 : goto service-XXXXXXXX-ns/svc/tcp/p80,
\t\t\t     10.96.0.37 . icmp . 80 : goto service-XXXXXXXX-ns/svc/icmp/p80,
\t\t\t     10.96.0.38 . tcp . 65536 : goto service-XXXXXXXX-ns/svc/tcp/p80,
\t\t\t     10.96.0.39 . tcp : goto service-XXXXXXXX-ns/svc/tcp/p80,
\t\t\t     10.96.0.40 . tcp . 80 goto service-XXXXXXXX-ns/svc/tcp/p80,
\t\t\t     10.96.0.41 . tcp . 80 : goto service-XXXXXXXX-/svc/tcp/p80,
\t\t\t     10.96.0.2 . tcp . 80 : goto service-XXXXXXXX-ns/svc/tcp/p80 }";
        let p = parse_service_ips(text);
        assert_eq!(
            named(&p),
            [
                "10.96.0.1:443/tcp default/kubernetes",
                "10.96.0.2:80/tcp ns/svc"
            ]
        );
        assert_eq!(p.malformed, 13);
        assert_eq!(
            p.first_malformed.as_deref(),
            Some("10.96.0.30 . udp . 80 : goto service-XXXXXXXX-ns/svc/tcp/p80")
        );
    }
}
