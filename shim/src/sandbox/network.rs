//! The pod's network, host side: which network namespace the VMM runs in,
//! and joining that namespace's interface to the VM.
//!
//! CNI configures an interface (a veth, usually `eth0`) in a network
//! namespace: under CRI before the sandbox is created (the spec names the
//! namespace by path), under `ctr run --cni` or a nerdctl hook after the
//! task is created (in the namespace of the pid the shim reported, the
//! VMM's, so the shim gives the VMM a namespace of its own). When the
//! sandbox's first container starts, the shim reads that interface's
//! configuration, has the VMM open a tap next to it, redirects every frame
//! between the two with tc (ingress qdiscs and a mirred redirect each way),
//! and hands the configuration to the guest agent, which gives the guest
//! NIC the interface's MAC, addresses and routes. The host namespace keeps
//! its interface and addresses untouched: CNI's DEL still finds what its
//! ADD made.
//!
//! Cleanup: the tap belongs to the VMM's file descriptor and disappears
//! with it, and so does a namespace the shim made (nothing else holds it).
//! The ingress qdisc on the CNI interface is removed when the sandbox
//! stops, and by `delete` after a shim crash (the record names the
//! namespace).

use std::fs::File;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};

use thaw_agent_protocol::agent as proto;
use thaw_netlink::{IpNet, Link, Netlink, Route, RouteScope};

use crate::error::{Error, Result};

/// The tap the VMM opens in the pod's namespace (at most 15 bytes).
pub const TAP_NAME: &str = "thaw-tap0";

/// NS_GET_NSTYPE = _IO(0xb7, 0x3): which kind of namespace a file is.
const NS_GET_NSTYPE: libc::c_ulong = 0xb703;

/// Where the VMM's network namespace comes from.
#[derive(Debug)]
pub enum PodNetns {
    /// The spec names one by path (CRI: CNI configured it already).
    Joined { path: PathBuf, file: File },
    /// The spec asks for a new namespace: the VMM gets one of its own, at
    /// `/proc/<vmm pid>/ns/net`, which `ctr run --cni` configures.
    Own,
    /// No network namespace in the spec (hostNetwork): the VMM stays in
    /// the shim's, and the guest gets loopback only.
    Host,
}

impl PodNetns {
    /// Reads the spec's `linux.namespaces` network entry; a path that is
    /// not a network namespace is refused, naming it.
    pub fn from_spec(spec: &serde_json::Value) -> Result<Self> {
        if let Some(path) = crate::spec::network_namespace_path(spec) {
            let file = open_netns(Path::new(&path))?;
            return Ok(PodNetns::Joined {
                path: PathBuf::from(path),
                file,
            });
        }
        if crate::spec::has_namespace(spec, "network") {
            Ok(PodNetns::Own)
        } else {
            Ok(PodNetns::Host)
        }
    }

    /// What the VMM's child process does between fork and exec: join the
    /// namespace, or make its own. Only async-signal-safe calls.
    pub fn enter_in_child(&self) -> impl Fn() -> std::io::Result<()> + Send + Sync + 'static {
        let action: (Option<RawFd>, bool) = match self {
            PodNetns::Joined { file, .. } => (Some(file.as_raw_fd()), false),
            PodNetns::Own => (None, true),
            PodNetns::Host => (None, false),
        };
        move || {
            let rc = match action {
                // SAFETY: setns takes plain integers; the fd stays open in
                // the parent (and so in the child) until after exec.
                (Some(fd), _) => unsafe { libc::setns(fd, libc::CLONE_NEWNET) },
                // SAFETY: unshare takes a flag and touches no memory.
                (None, true) => unsafe { libc::unshare(libc::CLONE_NEWNET) },
                (None, false) => 0,
            };
            if rc != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        }
    }

    /// The namespace's path on the host once the VMM runs in it.
    pub fn path(&self, vmm_pid: u32) -> Option<PathBuf> {
        match self {
            PodNetns::Joined { path, .. } => Some(path.clone()),
            PodNetns::Own => Some(PathBuf::from(format!("/proc/{vmm_pid}/ns/net"))),
            PodNetns::Host => None,
        }
    }
}

/// Opens `path` and checks it is a network namespace.
pub fn open_netns(path: &Path) -> Result<File> {
    let what = || format!("network namespace {} (linux.namespaces)", path.display());
    let file = File::open(path).map_err(|e| Error::InvalidSpec(format!("{}: {e}", what())))?;
    // SAFETY: an ioctl without arguments on a descriptor we own.
    let kind = unsafe { libc::ioctl(file.as_raw_fd(), NS_GET_NSTYPE) };
    if kind < 0 {
        return Err(Error::InvalidSpec(format!(
            "{}: not a namespace file ({})",
            what(),
            std::io::Error::last_os_error()
        )));
    }
    if kind != libc::CLONE_NEWNET {
        return Err(Error::InvalidSpec(format!(
            "{}: a namespace of another kind, not a network one",
            what()
        )));
    }
    Ok(file)
}

/// Runs `f` on a thread that has entered the namespace at `path`, so the
/// shim's own threads never change namespace (for sockets that must be
/// made there; netlink work uses [`netlink_in`]).
pub(super) fn in_netns<T: Send + 'static>(
    path: &Path,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    let file = open_netns(path)?;
    let shown = path.display().to_string();
    let handle = std::thread::Builder::new()
        .name("thaw-netns".into())
        .spawn(move || -> Result<T> {
            // SAFETY: setns on a descriptor we own; it affects this
            // thread only, which ends when `f` returns.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(Error::io(
                    format!("entering network namespace {shown}"),
                    std::io::Error::last_os_error(),
                ));
            }
            f()
        })
        .map_err(|e| Error::io("starting a network namespace thread".to_string(), e))?;
    handle
        .join()
        .map_err(|_| Error::Shim("the network namespace thread panicked".into()))?
}

/// A netlink socket in the network namespace at `path` (checked to be
/// one); the calling thread stays where it is.
fn netlink_in(path: &Path) -> Result<Netlink> {
    open_netns(path)?;
    Netlink::open_in(path)
        .map_err(|e| Error::Sandbox(format!("netlink in {}: {e}", path.display())))
}

/// The CNI interface's configuration as read in the namespace.
#[derive(Debug, Clone)]
struct Interface {
    link: Link,
    addresses: Vec<IpNet>,
    routes: Vec<Route>,
    neighbours: Vec<thaw_netlink::Neighbour>,
}

fn nl_err(what: String) -> impl FnOnce(thaw_netlink::Error) -> Error {
    move |e| Error::Sandbox(format!("{what}: {e}"))
}

/// The interface CNI made: the one that is neither loopback nor our tap
/// (`eth0` wins if there are several). None: nothing configured the
/// namespace (plain `ctr run`), the guest gets loopback only.
fn find_interface(nl: &mut Netlink) -> Result<Option<Interface>> {
    let links = nl
        .links()
        .map_err(nl_err("listing the pod namespace's links".into()))?;
    let candidates: Vec<Link> = links
        .into_iter()
        .filter(|l| l.name != "lo" && l.name != TAP_NAME)
        .collect();
    let link = match candidates.len() {
        0 => return Ok(None),
        1 => candidates.into_iter().next(),
        _ => {
            let names: Vec<String> = candidates.iter().map(|l| l.name.clone()).collect();
            let eth0 = candidates.into_iter().find(|l| l.name == "eth0");
            if eth0.is_none() {
                return Err(Error::Sandbox(format!(
                    "the pod's network namespace has several interfaces ({}) and none is eth0; \
                     thaw joins one interface to the VM",
                    names.join(", ")
                )));
            }
            log::warn!(
                "the pod's network namespace has several interfaces ({}); only eth0 reaches the VM",
                names.join(", ")
            );
            eth0
        }
    };
    let Some(link) = link else { return Ok(None) };
    let name = link.name.clone();
    let mut addresses = nl
        .addresses(link.index)
        .map_err(nl_err(format!("reading {name}'s addresses")))?;
    let mut routes = nl
        .routes(link.index)
        .map_err(nl_err(format!("reading {name}'s routes")))?;
    let mut neighbours = nl
        .neighbours(link.index)
        .map_err(nl_err(format!("reading {name}'s neighbours")))?;
    // The guest kernel has no IPv6 (yet): say so rather than fail the pod.
    let v6 = addresses.iter().filter(|a| a.addr.is_ipv6()).count();
    if v6 > 0 {
        log::warn!("{name}: {v6} IPv6 addresses not given to the guest (no IPv6 in thaw's guest kernel yet)");
    }
    addresses.retain(|a| a.addr.is_ipv4());
    routes.retain(route_is_ipv4);
    neighbours.retain(|n| n.ip.is_ipv4());
    Ok(Some(Interface {
        link,
        addresses,
        routes,
        neighbours,
    }))
}

fn route_is_ipv4(r: &Route) -> bool {
    let dest_v4 = r.destination.as_ref().map(|d| d.addr.is_ipv4());
    let gw_v4 = r.gateway.as_ref().map(IpAddr::is_ipv4);
    dest_v4.or(gw_v4).unwrap_or(true)
}

fn request_for(iface: &Interface) -> Result<proto::ConfigureNetworkRequest> {
    let mac = iface.link.mac.ok_or_else(|| {
        Error::Sandbox(format!(
            "{} has no MAC address: only Ethernet interfaces can be joined to the VM",
            iface.link.name
        ))
    })?;
    let mut r = proto::ConfigureNetworkRequest::new();
    r.mac = thaw_netlink::format_mac(&mac);
    r.mtu = iface.link.mtu;
    for a in &iface.addresses {
        let mut p = proto::IpAddress::new();
        p.cidr = a.to_string();
        r.addresses.push(p);
    }
    for route in &iface.routes {
        let mut p = proto::Route::new();
        p.destination = route
            .destination
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default();
        p.gateway = route.gateway.map(|g| g.to_string()).unwrap_or_default();
        p.source = route.source.map(|s| s.to_string()).unwrap_or_default();
        p.mtu = route.mtu.unwrap_or(0);
        p.onlink = route.onlink;
        p.link_scope = route.scope == RouteScope::Link;
        r.routes.push(p);
    }
    for n in &iface.neighbours {
        let mut p = proto::Neighbor::new();
        p.ip = n.ip.to_string();
        p.mac = thaw_netlink::format_mac(&n.mac);
        r.neighbors.push(p);
    }
    Ok(r)
}

/// Reads the CNI interface in `netns`; None when there is none.
pub fn read_interface(netns: &Path) -> Result<Option<(String, proto::ConfigureNetworkRequest)>> {
    let iface = find_interface(&mut netlink_in(netns)?)?;
    match iface {
        None => Ok(None),
        Some(i) => Ok(Some((i.link.name.clone(), request_for(&i)?))),
    }
}

/// Redirects every frame between `interface` and the VMM's tap, both ways,
/// and brings the tap up with the interface's MTU. Undone on failure.
pub fn redirect(netns: &Path, interface: &str, mtu: u32) -> Result<()> {
    let mut nl = netlink_in(netns)?;
    let result = redirect_in(&mut nl, interface, mtu);
    if result.is_err() {
        if let Ok(link) = nl.link_by_name(interface) {
            let _ = nl.delete_ingress_qdisc(link.index);
        }
    }
    result
}

fn redirect_in(nl: &mut Netlink, interface: &str, mtu: u32) -> Result<()> {
    let link = nl
        .link_by_name(interface)
        .map_err(nl_err(format!("finding {interface}")))?;
    let tap = nl
        .link_by_name(TAP_NAME)
        .map_err(nl_err(format!("finding the VMM's tap {TAP_NAME}")))?;
    if mtu != 0 {
        nl.set_mtu(tap.index, mtu)
            .map_err(nl_err(format!("setting {TAP_NAME}'s MTU to {mtu}")))?;
    }
    nl.set_up(tap.index)
        .map_err(nl_err(format!("bringing {TAP_NAME} up")))?;
    for (from, to) in [(&link, &tap), (&tap, &link)] {
        nl.add_ingress_qdisc(from.index)
            .map_err(nl_err(format!("adding an ingress qdisc to {}", from.name)))?;
        nl.redirect_ingress(from.index, to.index)
            .map_err(nl_err(format!(
                "redirecting {}'s ingress to {}",
                from.name, to.name
            )))?;
    }
    Ok(())
}

/// Removes the ingress qdiscs [`redirect`] added in `netns` (the tap's
/// went with the VMM; only the shim adds ingress qdiscs in a pod's
/// namespace). A namespace or interface already gone is fine: CNI's DEL
/// may have run first.
pub fn unlink(netns: &Path) {
    if !netns.exists() {
        return;
    }
    let result = netlink_in(netns).and_then(|mut nl| {
        let links = nl
            .links()
            .map_err(nl_err("listing the pod namespace's links".into()))?;
        let mut removed = Vec::new();
        for l in links.iter().filter(|l| l.name != "lo") {
            if nl
                .delete_ingress_qdisc(l.index)
                .map_err(nl_err(format!("removing {}'s ingress qdisc", l.name)))?
            {
                removed.push(l.name.clone());
            }
        }
        Ok(removed)
    });
    match result {
        Ok(removed) if !removed.is_empty() => log::info!(
            "removed the tc redirect on {} in {}",
            removed.join(", "),
            netns.display()
        ),
        Ok(_) => {}
        Err(e) => log::warn!("cleaning up the pod network in {}: {e}", netns.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_netns_path_that_is_not_one_is_refused_by_name() {
        let spec = serde_json::json!({"linux": {"namespaces": [
            {"type": "network", "path": "/var/run/netns/does-not-exist"}]}});
        let e = PodNetns::from_spec(&spec).unwrap_err().to_string();
        assert!(e.contains("/var/run/netns/does-not-exist"), "{e}");
        let spec = serde_json::json!({"linux": {"namespaces": [
            {"type": "network", "path": "/etc/hostname"}]}});
        let e = PodNetns::from_spec(&spec).unwrap_err().to_string();
        assert!(
            e.contains("/etc/hostname") && e.contains("not a namespace"),
            "{e}"
        );
        let spec = serde_json::json!({"linux": {"namespaces": [
            {"type": "network", "path": "/proc/self/ns/uts"}]}});
        let e = PodNetns::from_spec(&spec).unwrap_err().to_string();
        assert!(e.contains("not a network one"), "{e}");
    }

    #[test]
    fn the_spec_decides_where_the_vmm_runs() {
        let own = serde_json::json!({"linux": {"namespaces": [{"type": "network"}]}});
        assert!(matches!(PodNetns::from_spec(&own).unwrap(), PodNetns::Own));
        let host = serde_json::json!({"linux": {"namespaces": [{"type": "pid"}]}});
        assert!(matches!(
            PodNetns::from_spec(&host).unwrap(),
            PodNetns::Host
        ));
        let joined = serde_json::json!({"linux": {"namespaces": [
            {"type": "network", "path": "/proc/self/ns/net"}]}});
        assert!(matches!(
            PodNetns::from_spec(&joined).unwrap(),
            PodNetns::Joined { .. }
        ));
    }
}
