//! Links: list, look up by name, set up/MTU/MAC, create a veth pair, delete.
//!
//! Contract: links are named by index in every change; errors name that
//! index. `link_by_name` asks the kernel for that one name (no dump) and
//! turns ENODEV into `Error::LinkNotFound(name)`.

use netlink_packet_core::{NLM_F_CREATE, NLM_F_EXCL};
use netlink_packet_route::link::{
    InfoData, InfoKind, InfoVeth, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use netlink_packet_route::RouteNetlinkMessage;

use crate::{Error, Link, Netlink};

/// IFNAMSIZ less the NUL.
const MAX_NAME: usize = 15;

impl Netlink {
    /// Every link in the namespace.
    pub fn links(&mut self) -> Result<Vec<Link>, Error> {
        let op = "listing links";
        let replies = self.dump(op, RouteNetlinkMessage::GetLink(LinkMessage::default()))?;
        let mut links = Vec::new();
        for reply in replies {
            if let RouteNetlinkMessage::NewLink(m) = reply {
                links.push(to_link(op, m)?);
            }
        }
        Ok(links)
    }

    /// The link called `name`; `Error::LinkNotFound(name)` if there is none.
    pub fn link_by_name(&mut self, name: &str) -> Result<Link, Error> {
        let op = format!("looking up link {name:?}");
        check_name(&op, name)?;
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(name.to_string()));
        let replies = match self.request(&op, RouteNetlinkMessage::GetLink(msg), 0) {
            Err(Error::Kernel { errno, .. }) if errno == libc::ENODEV => {
                return Err(Error::LinkNotFound(name.to_string()))
            }
            r => r?,
        };
        for reply in replies {
            if let RouteNetlinkMessage::NewLink(m) = reply {
                return to_link(&op, m);
            }
        }
        Err(Error::Reply {
            op,
            detail: "no RTM_NEWLINK in the reply".to_string(),
        })
    }

    /// `ip link set up`.
    pub fn set_up(&mut self, index: u32) -> Result<(), Error> {
        let mut msg = link_message(index);
        msg.header.flags = LinkFlags::Up;
        msg.header.change_mask = LinkFlags::Up;
        self.set_link(&format!("setting link {index} up"), msg)
    }

    /// `ip link set mtu`.
    pub fn set_mtu(&mut self, index: u32, mtu: u32) -> Result<(), Error> {
        let mut msg = link_message(index);
        msg.attributes.push(LinkAttribute::Mtu(mtu));
        self.set_link(&format!("setting the MTU of link {index} to {mtu}"), msg)
    }

    /// `ip link set address`.
    pub fn set_mac(&mut self, index: u32, mac: [u8; 6]) -> Result<(), Error> {
        let mut msg = link_message(index);
        msg.attributes.push(LinkAttribute::Address(mac.to_vec()));
        let op = format!(
            "setting the MAC of link {index} to {}",
            crate::format_mac(&mac)
        );
        self.set_link(&op, msg)
    }

    /// `ip link add NAME type veth peer name PEER` (both down, in this
    /// namespace). EEXIST if either name is taken.
    pub fn create_veth(&mut self, name: &str, peer: &str) -> Result<(), Error> {
        let op = format!("creating veth pair {name:?} <-> {peer:?}");
        check_name(&op, name)?;
        check_name(&op, peer)?;
        let mut peer_msg = LinkMessage::default();
        peer_msg
            .attributes
            .push(LinkAttribute::IfName(peer.to_string()));
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(name.to_string()));
        msg.attributes.push(LinkAttribute::LinkInfo(vec![
            LinkInfo::Kind(InfoKind::Veth),
            LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(peer_msg))),
        ]));
        self.request(
            &op,
            RouteNetlinkMessage::NewLink(msg),
            NLM_F_CREATE | NLM_F_EXCL,
        )?;
        Ok(())
    }

    /// `ip link del` (a veth's peer goes with it).
    pub fn delete_link(&mut self, index: u32) -> Result<(), Error> {
        let op = format!("deleting link {index}");
        self.request(&op, RouteNetlinkMessage::DelLink(link_message(index)), 0)?;
        Ok(())
    }

    fn set_link(&mut self, op: &str, msg: LinkMessage) -> Result<(), Error> {
        // RTM_NEWLINK without NLM_F_CREATE changes an existing link, and,
        // unlike RTM_SETLINK, takes everything in one message.
        self.request(op, RouteNetlinkMessage::NewLink(msg), 0)?;
        Ok(())
    }
}

fn link_message(index: u32) -> LinkMessage {
    let mut msg = LinkMessage::default();
    msg.header.index = index;
    msg
}

fn check_name(op: &str, name: &str) -> Result<(), Error> {
    if name.is_empty() || name.len() > MAX_NAME || name.contains(['/', ' ', '\0']) {
        return Err(Error::Invalid {
            op: op.to_string(),
            reason: format!("{name:?} is not a valid interface name"),
        });
    }
    Ok(())
}

fn to_link(op: &str, m: LinkMessage) -> Result<Link, Error> {
    let mut name = None;
    let mut mac = None;
    let mut mtu = 0;
    let mut kind = None;
    for attr in m.attributes {
        match attr {
            LinkAttribute::IfName(n) => name = Some(n),
            LinkAttribute::Address(a) => mac = <[u8; 6]>::try_from(a.as_slice()).ok(),
            LinkAttribute::Mtu(m) => mtu = m,
            LinkAttribute::LinkInfo(infos) => {
                for info in infos {
                    if let LinkInfo::Kind(k) = info {
                        kind = Some(k.to_string());
                    }
                }
            }
            _ => {}
        }
    }
    let index = m.header.index;
    let name = name.ok_or_else(|| Error::Reply {
        op: op.to_string(),
        detail: format!("link {index} has no IFLA_IFNAME"),
    })?;
    Ok(Link {
        index,
        name,
        mac,
        mtu,
        kind,
        up: m.header.flags.contains(LinkFlags::Up),
    })
}
