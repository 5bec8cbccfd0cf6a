//! Routes of one interface in the main table: list, add.
//!
//! Contract: `routes(index)` gives the unicast routes of the main table, both
//! families, whose output device is `index`, minus those the kernel made
//! itself (protocol `kernel`): the prefix route of each address (IPv4
//! `10.1.2.0/24 … proto kernel`, IPv6 `fd00::/64`), and IPv6's `fe80::/64`
//! and multicast routes. The kernel recreates them when `add_address` runs
//! on an up link, so copying them would only make `add_route` fail with
//! EEXIST. Multipath routes (no single output device) are not reported,
//! nor routes of a scope other than universe/link/host.
//! `add_route` is `ip route add … dev INDEX` (protocol boot, NLM_F_EXCL);
//! a route via a gateway needs the gateway reachable first (an address
//! whose prefix covers it on an up link), unless `onlink` is set.

use std::net::IpAddr;

use netlink_packet_core::{NLM_F_CREATE, NLM_F_EXCL};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteHeader, RouteMessage, RouteMetric,
    RouteProtocol, RouteScope as NlScope, RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};

use crate::addr::family;
use crate::{Error, IpNet, Netlink, Route, RouteScope};

impl Netlink {
    /// The routes through link `index` (see the module contract).
    pub fn routes(&mut self, index: u32) -> Result<Vec<Route>, Error> {
        let op = format!("listing the routes of link {index}");
        let replies = self.dump(&op, RouteNetlinkMessage::GetRoute(RouteMessage::default()))?;
        let mut out = Vec::new();
        for reply in replies {
            if let RouteNetlinkMessage::NewRoute(m) = reply {
                if let Some(r) = to_route(index, m) {
                    out.push(r);
                }
            }
        }
        Ok(out)
    }

    /// `ip route add ROUTE dev INDEX`.
    pub fn add_route(&mut self, index: u32, route: &Route) -> Result<(), Error> {
        let op = format!("adding route {route} to link {index}");
        let v6 = route.is_ipv6();
        let addrs = [
            route.destination.map(|d| d.addr),
            route.gateway,
            route.source,
        ];
        if addrs.iter().flatten().any(|a| a.is_ipv6() != v6) {
            return Err(Error::Invalid {
                op,
                reason: "mixes IPv4 and IPv6 addresses".to_string(),
            });
        }
        let mut msg = RouteMessage::default();
        msg.header.address_family = if v6 {
            AddressFamily::Inet6
        } else {
            AddressFamily::Inet
        };
        msg.header.table = RouteHeader::RT_TABLE_MAIN;
        // What `ip route add` uses: a route set up by an administrator.
        msg.header.protocol = RouteProtocol::Boot;
        msg.header.scope = match route.scope {
            RouteScope::Universe => NlScope::Universe,
            RouteScope::Link => NlScope::Link,
            RouteScope::Host => NlScope::Host,
        };
        msg.header.kind = RouteType::Unicast;
        if route.onlink {
            msg.header.flags = RouteFlags::Onlink;
        }
        if let Some(dst) = route.destination {
            msg.header.address_family = family(&dst.addr);
            msg.header.destination_prefix_length = dst.prefix_len;
            msg.attributes
                .push(RouteAttribute::Destination(RouteAddress::from(dst.addr)));
        }
        if let Some(gw) = route.gateway {
            msg.attributes
                .push(RouteAttribute::Gateway(RouteAddress::from(gw)));
        }
        if let Some(src) = route.source {
            msg.attributes
                .push(RouteAttribute::PrefSource(RouteAddress::from(src)));
        }
        msg.attributes.push(RouteAttribute::Oif(index));
        if let Some(mtu) = route.mtu {
            msg.attributes
                .push(RouteAttribute::Metrics(vec![RouteMetric::Mtu(mtu)]));
        }
        self.request(
            &op,
            RouteNetlinkMessage::NewRoute(msg),
            NLM_F_CREATE | NLM_F_EXCL,
        )?;
        Ok(())
    }
}

/// The route if it is one `routes(index)` reports.
fn to_route(index: u32, m: RouteMessage) -> Option<Route> {
    let h = &m.header;
    if h.kind != RouteType::Unicast
        || h.protocol == RouteProtocol::Kernel
        || h.flags.contains(RouteFlags::Cloned)
    {
        return None;
    }
    let scope = match h.scope {
        NlScope::Universe => RouteScope::Universe,
        NlScope::Link => RouteScope::Link,
        NlScope::Host => RouteScope::Host,
        _ => return None,
    };
    // Tables above 255 only fit the attribute; the header then says 252.
    let mut table = u32::from(h.table);
    let mut oif = None;
    let mut destination = None;
    let mut gateway = None;
    let mut source = None;
    let mut mtu = None;
    for attr in &m.attributes {
        match attr {
            RouteAttribute::Table(t) => table = *t,
            RouteAttribute::Oif(o) => oif = Some(*o),
            RouteAttribute::Destination(a) => destination = ip(a),
            RouteAttribute::Gateway(a) => gateway = ip(a),
            RouteAttribute::PrefSource(a) => source = ip(a),
            RouteAttribute::Metrics(metrics) => {
                for metric in metrics {
                    if let RouteMetric::Mtu(v) = metric {
                        mtu = Some(*v);
                    }
                }
            }
            _ => {}
        }
    }
    if table != u32::from(RouteHeader::RT_TABLE_MAIN) || oif != Some(index) {
        return None;
    }
    let destination = match destination {
        Some(addr) if h.destination_prefix_length > 0 => Some(IpNet {
            addr,
            prefix_len: h.destination_prefix_length,
        }),
        _ => None,
    };
    Some(Route {
        destination,
        gateway,
        source,
        mtu,
        scope,
        onlink: h.flags.contains(RouteFlags::Onlink),
    })
}

fn ip(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}
