//! Service subnets: which original destinations count as Service traffic.
//!
//! Owns: parsing a CIDR (`10.96.0.0/16`, `fd00:96::/112`) and the membership
//! test. Never: allocates when testing an address (it is on the per-event
//! path).

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// An IPv4 or IPv6 prefix, stored with its host bits cleared.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Subnet {
    addr: IpAddr,
    prefix: u8,
}

impl Subnet {
    /// `0.0.0.0/0`: every IPv4 address.
    pub const ALL_V4: Subnet = Subnet {
        addr: IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
        prefix: 0,
    };
    /// `::/0`: every IPv6 address.
    pub const ALL_V6: Subnet = Subnet {
        addr: IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
        prefix: 0,
    };

    /// The prefix `addr/prefix`; `None` if the length is too long for the
    /// family. Host bits are cleared.
    pub fn new(addr: IpAddr, prefix: u8) -> Option<Subnet> {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if prefix > max {
            return None;
        }
        let addr = match addr {
            IpAddr::V4(a) => IpAddr::V4((u32::from(a) & mask32(prefix)).into()),
            IpAddr::V6(a) => IpAddr::V6((u128::from(a) & mask128(prefix)).into()),
        };
        Some(Subnet { addr, prefix })
    }

    /// Whether `ip` is inside. An address of the other family never is.
    #[inline]
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(a)) => {
                u32::from(a) & mask32(self.prefix) == u32::from(net)
            }
            (IpAddr::V6(net), IpAddr::V6(a)) => {
                u128::from(a) & mask128(self.prefix) == u128::from(net)
            }
            _ => false,
        }
    }

    /// The network address.
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// The prefix length.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// The longest prefix holding both `a` and `b`; `None` when their
    /// families differ.
    pub fn covering(a: IpAddr, b: IpAddr) -> Option<Subnet> {
        let common = match (a, b) {
            (IpAddr::V4(a), IpAddr::V4(b)) => (u32::from(a) ^ u32::from(b)).leading_zeros(),
            (IpAddr::V6(a), IpAddr::V6(b)) => (u128::from(a) ^ u128::from(b)).leading_zeros(),
            _ => return None,
        };
        Subnet::new(a, common as u8)
    }
}

#[inline]
fn mask32(prefix: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0)
}

#[inline]
fn mask128(prefix: u8) -> u128 {
    u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0)
}

impl fmt::Display for Subnet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// Why a subnet did not parse.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubnetError(String);

impl fmt::Display for SubnetError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for SubnetError {}

impl FromStr for Subnet {
    type Err = SubnetError;

    /// `address/prefix`, e.g. `10.96.0.0/16` or `fd00:96::/112`. Host bits
    /// set in the address are an error (a likely typo, as Go's
    /// `net.ParseCIDR` users often meet), except that a bare address means
    /// the single host (`/32`, `/128`).
    fn from_str(s: &str) -> Result<Subnet, SubnetError> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .trim()
            .parse()
            .map_err(|_| SubnetError(format!("{s:?} is not an IP address or CIDR")))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| SubnetError(format!("{s:?}: prefix length must be 0 to {max}")))?,
        };
        let subnet = Subnet::new(addr, prefix)
            .ok_or_else(|| SubnetError(format!("{s:?}: prefix length must be 0 to {max}")))?;
        if subnet.addr != addr {
            return Err(SubnetError(format!(
                "{s:?} has host bits set; did you mean {subnet}?"
            )));
        }
        Ok(subnet)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn covering_is_the_longest_common_prefix() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let cover = |a, b| Subnet::covering(ip(a), ip(b)).map(|s| s.to_string());
        assert_eq!(
            cover("10.100.1.1", "10.104.2.2").as_deref(),
            Some("10.96.0.0/12")
        );
        assert_eq!(
            cover("10.96.0.10", "10.96.0.10").as_deref(),
            Some("10.96.0.10/32")
        );
        assert_eq!(
            cover("fd00:96::1", "fd00:96::ff").as_deref(),
            Some("fd00:96::/120")
        );
        assert_eq!(cover("10.0.0.1", "fd00::1"), None);
    }

    #[test]
    fn parses_and_tests_membership_for_both_families() {
        let v4: Subnet = "10.96.0.0/16".parse().unwrap();
        assert!(v4.contains("10.96.255.1".parse().unwrap()));
        assert!(!v4.contains("10.97.0.1".parse().unwrap()));
        assert!(!v4.contains("::ffff:10.96.0.1".parse().unwrap()));
        let v6: Subnet = "fd00:96::/112".parse().unwrap();
        assert!(v6.contains("fd00:96::ffff".parse().unwrap()));
        assert!(!v6.contains("fd00:96::1:0".parse().unwrap()));
        let all: Subnet = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("1.2.3.4".parse().unwrap()));
        let host: Subnet = "10.96.0.10".parse().unwrap();
        assert_eq!(host.prefix(), 32);
        assert_eq!(v4.to_string(), "10.96.0.0/16");
    }

    #[test]
    fn bad_subnets_say_why() {
        for (s, why) in [
            ("10.96.0.1/16", "host bits"),
            ("10.96.0.0/33", "0 to 32"),
            ("fd00::/129", "0 to 128"),
            ("10.96.0.0/x", "0 to 32"),
            ("banana", "not an IP"),
            ("", "not an IP"),
        ] {
            let err = s.parse::<Subnet>().unwrap_err().to_string();
            assert!(err.contains(why), "{s}: {err}");
        }
    }
}
