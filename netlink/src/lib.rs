//! Synchronous rtnetlink for thaw's pod networking (issue 12).
//!
//! The shim (host) reads the configuration CNI gave the pod's veth
//! (`link_by_name`, `addresses`, `routes`, `neighbours`) and joins the veth
//! to the VM's tap with tc (`add_ingress_qdisc` + `redirect_ingress`, both
//! directions); the guest agent applies the same configuration to its NIC
//! (`set_mac`, `set_mtu`, `add_address`, `set_up`, `add_route`,
//! `add_neighbour`).
//!
//! Contract: a [`Netlink`] works in the network namespace of the thread
//! that opened it ([`Netlink::open`]) or of the namespace file it was given
//! ([`Netlink::open_in`], which leaves the calling thread where it is), one blocking request at a time (no async runtime, no
//! `ip`/`tc` subprocesses). Every failure is one [`Error`] naming the
//! operation, the link index or name, address or route, and the errno.
//! The plain data types are serde-able so the shim can record them and
//! send them to the guest.

mod addr;
mod error;
mod link;
mod neigh;
mod route;
mod socket;
mod tc;
mod types;

#[cfg(test)]
mod tests;

pub use error::Error;
pub use socket::Netlink;
pub use types::{format_mac, parse_mac, IpNet, Link, Neighbour, Route, RouteScope};
