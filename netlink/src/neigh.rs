//! Permanent neighbour (ARP/NDP) entries of one interface: list, add.
//!
//! Contract: only NUD_PERMANENT entries are reported or made: learned ones
//! are the kernel's cache, not configuration. Entries without a 6-byte
//! link-layer address are not reported.

use std::net::IpAddr;

use netlink_packet_core::{NLM_F_CREATE, NLM_F_EXCL};
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::route::RouteType;
use netlink_packet_route::RouteNetlinkMessage;

use crate::addr::family;
use crate::{format_mac, Error, Neighbour, Netlink};

impl Netlink {
    /// The permanent neighbour entries of link `index`, both families.
    pub fn neighbours(&mut self, index: u32) -> Result<Vec<Neighbour>, Error> {
        let op = format!("listing the neighbours of link {index}");
        let replies = self.dump(
            &op,
            RouteNetlinkMessage::GetNeighbour(NeighbourMessage::default()),
        )?;
        let mut out = Vec::new();
        for reply in replies {
            let RouteNetlinkMessage::NewNeighbour(m) = reply else {
                continue;
            };
            if m.header.ifindex != index || m.header.state != NeighbourState::Permanent {
                continue;
            }
            let mut ip = None;
            let mut mac = None;
            for attr in &m.attributes {
                match attr {
                    NeighbourAttribute::Destination(NeighbourAddress::Inet(a)) => {
                        ip = Some(IpAddr::V4(*a))
                    }
                    NeighbourAttribute::Destination(NeighbourAddress::Inet6(a)) => {
                        ip = Some(IpAddr::V6(*a))
                    }
                    NeighbourAttribute::LinkLayerAddress(l) => {
                        mac = <[u8; 6]>::try_from(l.as_slice()).ok()
                    }
                    _ => {}
                }
            }
            if let (Some(ip), Some(mac)) = (ip, mac) {
                out.push(Neighbour { ip, mac });
            }
        }
        Ok(out)
    }

    /// `ip neigh add IP lladdr MAC dev INDEX nud permanent`.
    pub fn add_neighbour(&mut self, index: u32, n: &Neighbour) -> Result<(), Error> {
        let op = format!(
            "adding neighbour {} lladdr {} to link {index}",
            n.ip,
            format_mac(&n.mac)
        );
        let mut msg = NeighbourMessage::default();
        msg.header.family = family(&n.ip);
        msg.header.ifindex = index;
        msg.header.state = NeighbourState::Permanent;
        msg.header.kind = RouteType::Unicast;
        msg.attributes
            .push(NeighbourAttribute::Destination(NeighbourAddress::from(
                n.ip,
            )));
        msg.attributes
            .push(NeighbourAttribute::LinkLayerAddress(n.mac.to_vec()));
        self.request(
            &op,
            RouteNetlinkMessage::NewNeighbour(msg),
            NLM_F_CREATE | NLM_F_EXCL,
        )?;
        Ok(())
    }
}
