//! Plain data the crate reads from and writes to the kernel.
//!
//! Contract: these types carry no kernel handles, so the shim can keep them
//! in its state file and send them to the guest agent (serde). Addresses use
//! `std::net`; MACs are `[u8; 6]` and print as `aa:bb:cc:dd:ee:ff`.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::Error;

/// A network interface as `links()` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Link {
    pub index: u32,
    pub name: String,
    /// None for links without a 6-byte hardware address (lo has an all-zero
    /// one and keeps it; tun/ip tunnels have none).
    pub mac: Option<[u8; 6]>,
    pub mtu: u32,
    /// `IFLA_INFO_KIND`: "veth", "tun", "bridge"…; None for physical NICs
    /// and lo.
    pub kind: Option<String>,
    /// Administratively up (`IFF_UP`), whatever the carrier.
    pub up: bool,
}

/// An address with its prefix length, as on an interface ("10.1.2.3/24").
/// Host bits are kept: this is an interface address, not only a network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct IpNet {
    pub addr: IpAddr,
    pub prefix_len: u8,
}

impl IpNet {
    /// Fails if `prefix_len` is longer than the family allows.
    pub fn new(addr: IpAddr, prefix_len: u8) -> Result<Self, Error> {
        let max = max_prefix(&addr);
        if prefix_len > max {
            return Err(Error::InvalidIpNet {
                input: format!("{addr}/{prefix_len}"),
                reason: format!("prefix length above {max}"),
            });
        }
        Ok(IpNet { addr, prefix_len })
    }

    /// Whether `ip` lies in this network (host bits of `self.addr` ignored).
    pub fn contains(&self, ip: &IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = mask_u32(self.prefix_len);
                u32::from(net) & mask == u32::from(*ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = mask_u128(self.prefix_len);
                u128::from(net) & mask == u128::from(*ip) & mask
            }
            _ => false,
        }
    }
}

fn max_prefix(addr: &IpAddr) -> u8 {
    if addr.is_ipv4() {
        32
    } else {
        128
    }
}

fn mask_u32(prefix_len: u8) -> u32 {
    u32::MAX
        .checked_shl(32 - u32::from(prefix_len.min(32)))
        .unwrap_or(0)
}

fn mask_u128(prefix_len: u8) -> u128 {
    u128::MAX
        .checked_shl(128 - u32::from(prefix_len.min(128)))
        .unwrap_or(0)
}

impl fmt::Display for IpNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

impl FromStr for IpNet {
    type Err = Error;

    /// "10.1.2.3/24", "fd00::2/64"; a bare address gets the full length.
    fn from_str(s: &str) -> Result<Self, Error> {
        let invalid = |reason: &str| Error::InvalidIpNet {
            input: s.to_string(),
            reason: reason.to_string(),
        };
        let (addr, len) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| invalid("not an IP address"))?;
        let prefix_len = match len {
            Some(l) => l.parse::<u8>().map_err(|_| invalid("bad prefix length"))?,
            None => max_prefix(&addr),
        };
        IpNet::new(addr, prefix_len).map_err(|_| invalid("prefix length too long"))
    }
}

/// `rtm_scope` of a route: the three that occur on a pod's interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
pub enum RouteScope {
    /// Via a gateway (or a default route).
    #[default]
    Universe,
    /// Directly reachable on the link ("scope link").
    Link,
    /// This host only.
    Host,
}

/// A route through one interface, in the main table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    /// None: the default route (0.0.0.0/0 or ::/0).
    pub destination: Option<IpNet>,
    pub gateway: Option<IpAddr>,
    /// Preferred source address (`src` in `ip route`).
    pub source: Option<IpAddr>,
    /// Path MTU metric (`mtu` in `ip route`).
    pub mtu: Option<u32>,
    pub scope: RouteScope,
    /// The gateway is on the link even if no prefix says so (`onlink`).
    pub onlink: bool,
}

impl Route {
    /// The address family the route is in: the destination's, else the
    /// gateway's, else the source's; IPv4 for a bare default route.
    pub fn is_ipv6(&self) -> bool {
        self.destination
            .map(|d| d.addr)
            .or(self.gateway)
            .or(self.source)
            .is_some_and(|a| a.is_ipv6())
    }
}

impl fmt::Display for Route {
    /// In `ip route` words, for error messages and logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.destination {
            Some(d) => write!(f, "{d}")?,
            None => write!(f, "default")?,
        }
        if let Some(g) = &self.gateway {
            write!(f, " via {g}")?;
        }
        if let Some(s) = &self.source {
            write!(f, " src {s}")?;
        }
        if let Some(m) = self.mtu {
            write!(f, " mtu {m}")?;
        }
        match self.scope {
            RouteScope::Universe => {}
            RouteScope::Link => write!(f, " scope link")?,
            RouteScope::Host => write!(f, " scope host")?,
        }
        if self.onlink {
            write!(f, " onlink")?;
        }
        Ok(())
    }
}

/// A static ARP (IPv4) or NDP (IPv6) entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Neighbour {
    pub ip: IpAddr,
    pub mac: [u8; 6],
}

/// "aa:bb:cc:dd:ee:ff" (either case) → bytes.
pub fn parse_mac(s: &str) -> Result<[u8; 6], Error> {
    let invalid = || Error::InvalidMac(s.to_string());
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for byte in mac.iter_mut() {
        let part = parts.next().ok_or_else(invalid)?;
        if part.len() != 2 {
            return Err(invalid());
        }
        *byte = u8::from_str_radix(part, 16).map_err(|_| invalid())?;
    }
    if parts.next().is_some() {
        return Err(invalid());
    }
    Ok(mac)
}

/// Bytes → "aa:bb:cc:dd:ee:ff" (lower case, as `ip link` prints).
pub fn format_mac(mac: &[u8; 6]) -> String {
    let [a, b, c, d, e, g] = mac;
    format!("{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipnet_parses_and_prints() {
        let n: IpNet = "10.1.2.3/24".parse().unwrap();
        assert_eq!(n.addr, "10.1.2.3".parse::<IpAddr>().unwrap());
        assert_eq!(n.prefix_len, 24);
        assert_eq!(n.to_string(), "10.1.2.3/24");
        let n: IpNet = "fd00::2/64".parse().unwrap();
        assert_eq!(n.to_string(), "fd00::2/64");
        assert_eq!("10.0.0.1".parse::<IpNet>().unwrap().prefix_len, 32);
        assert_eq!("fd00::1".parse::<IpNet>().unwrap().prefix_len, 128);
        for bad in [
            "10.0.0.1/33",
            "fd00::/129",
            "10.0.0/8",
            "x/1",
            "10.0.0.1/",
            "10.0.0.1/-1",
        ] {
            let err = bad.parse::<IpNet>().unwrap_err();
            assert!(err.to_string().contains(bad), "{err}");
        }
    }

    #[test]
    fn ipnet_contains() {
        let n: IpNet = "10.1.2.3/24".parse().unwrap();
        assert!(n.contains(&"10.1.2.200".parse().unwrap()));
        assert!(!n.contains(&"10.1.3.1".parse().unwrap()));
        assert!(!n.contains(&"fd00::1".parse().unwrap()));
        let all: IpNet = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(&"192.0.2.1".parse().unwrap()));
        let ll: IpNet = "fe80::/10".parse().unwrap();
        assert!(ll.contains(&"fe80::1234".parse().unwrap()));
        assert!(ll.contains(&"febf::1".parse().unwrap()));
        assert!(!ll.contains(&"fec0::1".parse().unwrap()));
    }

    #[test]
    fn mac_round_trip() {
        let mac = parse_mac("02:AB:cd:00:01:ff").unwrap();
        assert_eq!(mac, [0x02, 0xab, 0xcd, 0x00, 0x01, 0xff]);
        assert_eq!(format_mac(&mac), "02:ab:cd:00:01:ff");
        for bad in [
            "",
            "02:ab:cd:00:01",
            "02:ab:cd:00:01:ff:00",
            "02:ab:cd:00:01:f",
            "0g:ab:cd:00:01:ff",
            "02-ab-cd-00-01-ff",
        ] {
            let err = parse_mac(bad).unwrap_err();
            assert!(matches!(err, Error::InvalidMac(ref s) if s == bad), "{err}");
        }
    }

    #[test]
    fn route_display_and_serde() {
        let r = Route {
            destination: None,
            gateway: Some("10.1.2.1".parse().unwrap()),
            source: None,
            mtu: Some(1400),
            scope: RouteScope::Universe,
            onlink: true,
        };
        assert_eq!(r.to_string(), "default via 10.1.2.1 mtu 1400 onlink");
        assert!(!r.is_ipv6());
        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(serde_json::from_str::<Route>(&json).unwrap(), r);
        let r6 = Route {
            destination: Some("fd00:1::/64".parse().unwrap()),
            gateway: None,
            source: None,
            mtu: None,
            scope: RouteScope::Link,
            onlink: false,
        };
        assert_eq!(r6.to_string(), "fd00:1::/64 scope link");
        assert!(r6.is_ipv6());
    }
}
