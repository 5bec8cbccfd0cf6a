//! Interface addresses: list one link's, add one.
//!
//! Contract: `addresses` gives both families in kernel order and leaves out
//! IPv6 link-local ones (fe80::/10): every interface makes its own, so they
//! are not configuration to copy. For IPv4 the local address (IFA_LOCAL) is
//! reported, which differs from IFA_ADDRESS only on point-to-point links.
//! `add_address` is `ip addr add` with NLM_F_EXCL: a duplicate is EEXIST.

use std::net::IpAddr;

use netlink_packet_core::{NLM_F_CREATE, NLM_F_EXCL};
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};

use crate::{Error, IpNet, Netlink};

impl Netlink {
    /// The addresses of link `index`, IPv6 link-local ones excepted.
    pub fn addresses(&mut self, index: u32) -> Result<Vec<IpNet>, Error> {
        let op = format!("listing the addresses of link {index}");
        let replies = self.dump(
            &op,
            RouteNetlinkMessage::GetAddress(AddressMessage::default()),
        )?;
        let mut out = Vec::new();
        for reply in replies {
            let RouteNetlinkMessage::NewAddress(m) = reply else {
                continue;
            };
            // The kernel dumps every link's addresses; filter here rather
            // than rely on strict checking.
            if m.header.index != index {
                continue;
            }
            let mut address = None;
            let mut local = None;
            for attr in &m.attributes {
                match attr {
                    AddressAttribute::Address(a) => address = Some(*a),
                    AddressAttribute::Local(a) => local = Some(*a),
                    _ => {}
                }
            }
            let Some(addr) = local.or(address) else {
                continue;
            };
            if is_ipv6_link_local(&addr) {
                continue;
            }
            out.push(IpNet {
                addr,
                prefix_len: m.header.prefix_len,
            });
        }
        Ok(out)
    }

    /// `ip addr add ADDR dev INDEX`.
    pub fn add_address(&mut self, index: u32, addr: &IpNet) -> Result<(), Error> {
        let op = format!("adding address {addr} to link {index}");
        let checked = IpNet::new(addr.addr, addr.prefix_len).map_err(|e| Error::Invalid {
            op: op.clone(),
            reason: e.to_string(),
        })?;
        let mut msg = AddressMessage::default();
        msg.header.family = family(&checked.addr);
        msg.header.prefix_len = checked.prefix_len;
        msg.header.index = index;
        // Like iproute2: IFA_LOCAL is the address, IFA_ADDRESS the same
        // (it would be the peer on a point-to-point link).
        msg.attributes.push(AddressAttribute::Local(checked.addr));
        msg.attributes.push(AddressAttribute::Address(checked.addr));
        self.request(
            &op,
            RouteNetlinkMessage::NewAddress(msg),
            NLM_F_CREATE | NLM_F_EXCL,
        )?;
        Ok(())
    }
}

pub(crate) fn family(addr: &IpAddr) -> AddressFamily {
    match addr {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    }
}

pub(crate) fn is_ipv6_link_local(addr: &IpAddr) -> bool {
    matches!(addr, IpAddr::V6(a) if a.segments()[0] & 0xffc0 == 0xfe80)
}
