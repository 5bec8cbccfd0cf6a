//! The guest's side of pod networking: the host hands over what CNI set up
//! on the pod's interface (MAC, MTU, addresses, routes, neighbours) and the
//! agent applies it to the guest NIC, which the host's tc redirect joins to
//! that interface. Containers share the guest's network namespace.
//!
//! Applied once per guest: a pod's network does not change, and a second
//! call would meet addresses that already exist.

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};

use thaw_agent_protocol::agent::ConfigureNetworkRequest;
use thaw_netlink::{IpNet, Link, Neighbour, Netlink, Route, RouteScope};

use crate::error::{Error, Result};

static CONFIGURED: AtomicBool = AtomicBool::new(false);

/// The request checked and parsed, before anything is changed, so a bad
/// field is refused by name and leaves the guest as it was.
#[derive(Debug, PartialEq)]
struct Plan {
    mac: [u8; 6],
    mtu: u32,
    addresses: Vec<IpNet>,
    routes: Vec<Route>,
    neighbours: Vec<Neighbour>,
}

fn parse_ip(field: &str, s: &str) -> Result<IpAddr> {
    s.parse()
        .map_err(|_| Error::InvalidRequest(format!("{field} {s:?} is not an IP address")))
}

fn optional_ip(field: &str, s: &str) -> Result<Option<IpAddr>> {
    if s.is_empty() {
        Ok(None)
    } else {
        parse_ip(field, s).map(Some)
    }
}

fn parse_net(field: &str, s: &str) -> Result<IpNet> {
    s.parse()
        .map_err(|_| Error::InvalidRequest(format!("{field} {s:?} is not an address/prefix")))
}

fn plan(req: &ConfigureNetworkRequest) -> Result<Plan> {
    let mac = thaw_netlink::parse_mac(&req.mac)
        .map_err(|_| Error::InvalidRequest(format!("mac {:?} is not a MAC address", req.mac)))?;
    // 68 is IPv4's minimum; above 65535 no virtio-net frame fits.
    if req.mtu != 0 && !(68..=65535).contains(&req.mtu) {
        return Err(Error::InvalidRequest(format!(
            "mtu {} is outside 68..=65535",
            req.mtu
        )));
    }
    let addresses = req
        .addresses
        .iter()
        .map(|a| parse_net("address", &a.cidr))
        .collect::<Result<Vec<_>>>()?;
    let mut routes = Vec::with_capacity(req.routes.len());
    for r in &req.routes {
        routes.push(Route {
            destination: if r.destination.is_empty() {
                None
            } else {
                Some(parse_net("route destination", &r.destination)?)
            },
            gateway: optional_ip("route gateway", &r.gateway)?,
            source: optional_ip("route source", &r.source)?,
            mtu: (r.mtu != 0).then_some(r.mtu),
            scope: if r.link_scope {
                RouteScope::Link
            } else {
                RouteScope::Universe
            },
            onlink: r.onlink,
        });
    }
    // A gateway must be reachable when its route is added: link routes
    // first, the routes through gateways after them.
    routes.sort_by_key(|r| r.gateway.is_some());
    let neighbours = req
        .neighbors
        .iter()
        .map(|n| {
            Ok(Neighbour {
                ip: parse_ip("neighbor", &n.ip)?,
                mac: thaw_netlink::parse_mac(&n.mac).map_err(|_| {
                    Error::InvalidRequest(format!("neighbor mac {:?} is not a MAC address", n.mac))
                })?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Plan {
        mac,
        mtu: req.mtu,
        addresses,
        routes,
        neighbours,
    })
}

/// The guest's NIC: the one link that is not loopback. The VM has exactly
/// one virtio-net device.
fn guest_nic(nl: &mut Netlink) -> Result<Link> {
    let links = nl
        .links()
        .map_err(|e| Error::Internal(format!("listing the guest's links: {e}")))?;
    let mut nics = links.into_iter().filter(|l| l.name != "lo");
    match (nics.next(), nics.next()) {
        (Some(nic), None) => Ok(nic),
        (None, _) => Err(Error::FailedPrecondition(
            "the guest has no network interface (no virtio-net device in this VM)".into(),
        )),
        (Some(a), Some(b)) => Err(Error::FailedPrecondition(format!(
            "the guest has more than one network interface ({}, {}, ...)",
            a.name, b.name
        ))),
    }
}

fn net_err(what: String) -> impl FnOnce(thaw_netlink::Error) -> Error {
    move |e| Error::Internal(format!("{what}: {e}"))
}

/// Applies the pod's network to the guest NIC. Refused outside a VM (it
/// would reconfigure the host's interfaces) and when already applied.
pub fn configure(req: &ConfigureNetworkRequest, pid1: bool) -> Result<()> {
    let plan = plan(req)?;
    if !pid1 {
        return Err(Error::FailedPrecondition(
            "refusing to configure the network: the agent is not the guest's init".into(),
        ));
    }
    if CONFIGURED.swap(true, Ordering::SeqCst) {
        return Err(Error::FailedPrecondition(
            "the guest's network is already configured".into(),
        ));
    }
    let result = apply(&plan);
    if result.is_err() {
        // Half applied: a retry would meet what did get in. The shim gives
        // up on the sandbox anyway.
        log::error!("network configuration failed part way");
    }
    result
}

fn apply(plan: &Plan) -> Result<()> {
    let mut nl = Netlink::open().map_err(net_err("opening a netlink socket".into()))?;
    let nic = guest_nic(&mut nl)?;
    let (i, name) = (nic.index, nic.name.as_str());
    nl.set_mac(i, plan.mac).map_err(net_err(format!(
        "setting {name}'s MAC to {}",
        thaw_netlink::format_mac(&plan.mac)
    )))?;
    if plan.mtu != 0 {
        nl.set_mtu(i, plan.mtu)
            .map_err(net_err(format!("setting {name}'s MTU to {}", plan.mtu)))?;
    }
    nl.set_up(i)
        .map_err(net_err(format!("bringing {name} up")))?;
    for a in &plan.addresses {
        nl.add_address(i, a)
            .map_err(net_err(format!("adding {a} to {name}")))?;
    }
    for r in &plan.routes {
        match nl.add_route(i, r) {
            Ok(()) => {}
            // Adding an address made its subnet route already.
            Err(e) if r.gateway.is_none() && e.errno() == Some(libc::EEXIST) => {}
            Err(e) => return Err(net_err(format!("adding route {r:?} on {name}"))(e)),
        }
    }
    for n in &plan.neighbours {
        nl.add_neighbour(i, n)
            .map_err(net_err(format!("adding neighbour {} on {name}", n.ip)))?;
    }
    log::info!(
        "network: {name} {} mtu {} with {} addresses, {} routes, {} neighbours",
        thaw_netlink::format_mac(&plan.mac),
        plan.mtu,
        plan.addresses.len(),
        plan.routes.len(),
        plan.neighbours.len()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use thaw_agent_protocol::agent::{IpAddress, Neighbor, Route as ProtoRoute};

    fn request() -> ConfigureNetworkRequest {
        let mut req = ConfigureNetworkRequest::new();
        req.mac = "02:42:0a:58:00:05".into();
        req.mtu = 1500;
        let mut a = IpAddress::new();
        a.cidr = "10.88.0.5/16".into();
        req.addresses.push(a);
        let mut default = ProtoRoute::new();
        default.gateway = "10.88.0.1".into();
        req.routes.push(default);
        let mut subnet = ProtoRoute::new();
        subnet.destination = "10.88.0.0/16".into();
        subnet.link_scope = true;
        req.routes.push(subnet);
        let mut n = Neighbor::new();
        n.ip = "10.88.0.1".into();
        n.mac = "aa:bb:cc:dd:ee:ff".into();
        req.neighbors.push(n);
        req
    }

    #[test]
    fn a_request_is_parsed_with_link_routes_before_gateways() {
        let p = plan(&request()).unwrap();
        assert_eq!(p.mac, [0x02, 0x42, 0x0a, 0x58, 0, 5]);
        assert_eq!(p.addresses[0].to_string(), "10.88.0.5/16");
        assert_eq!(p.routes.len(), 2);
        assert_eq!(p.routes[0].gateway, None);
        assert_eq!(p.routes[0].scope, RouteScope::Link);
        assert_eq!(p.routes[1].destination, None);
        assert_eq!(p.routes[1].gateway, Some("10.88.0.1".parse().unwrap()));
        assert_eq!(p.neighbours[0].mac, [0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xff]);
    }

    #[test]
    fn bad_fields_are_refused_by_name() {
        type Breaks = fn(&mut ConfigureNetworkRequest);
        let cases: Vec<(Breaks, &str)> = vec![
            (|r| r.mac = "02:42".into(), "mac"),
            (|r| r.mtu = 20, "mtu 20"),
            (|r| r.addresses[0].cidr = "10.88.0.5/40".into(), "address"),
            (|r| r.routes[0].gateway = "gw".into(), "route gateway"),
            (
                |r| r.routes[1].destination = "x/1".into(),
                "route destination",
            ),
            (|r| r.neighbors[0].ip = "::g".into(), "neighbor"),
        ];
        for (break_it, named) in cases {
            let mut req = request();
            break_it(&mut req);
            let e = plan(&req).unwrap_err().to_string();
            assert!(e.contains(named), "{named}: {e}");
        }
    }

    #[test]
    fn outside_a_vm_nothing_is_changed() {
        let e = configure(&request(), false).unwrap_err().to_string();
        assert!(e.contains("not the guest's init"), "{e}");
        assert!(!CONFIGURED.load(Ordering::SeqCst));
    }
}
