//! Tests against the real kernel. Each runs in a thread that first moves
//! itself into a new, private network namespace (`unshare(CLONE_NEWNET)`
//! changes only the calling thread's), so the host's network is never
//! touched and nothing needs cleaning up: the namespace and its links go
//! away with the thread.

use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use crate::{Error, IpNet, Link, Neighbour, Netlink, Route, RouteScope};

/// Runs `f` in a fresh network namespace on its own thread. Without the
/// privilege to make one (not root), says so and skips.
fn in_netns(test: &str, f: impl FnOnce(&mut Netlink) + Send + 'static) {
    let test = test.to_string();
    let handle = std::thread::spawn(move || {
        // SAFETY: unshare takes no pointers; CLONE_NEWNET moves only this
        // thread into a new network namespace.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EPERM) {
                eprintln!("skipping {test}: unshare(CLONE_NEWNET): {err} (needs root)");
                return;
            }
            panic!("{test}: unshare(CLONE_NEWNET): {err}");
        }
        let mut nl = Netlink::open().unwrap();
        f(&mut nl);
    });
    if let Err(panic) = handle.join() {
        std::panic::resume_unwind(panic);
    }
}

fn veth(nl: &mut Netlink, a: &str, b: &str) -> (Link, Link) {
    nl.create_veth(a, b).unwrap();
    (nl.link_by_name(a).unwrap(), nl.link_by_name(b).unwrap())
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// Turns IPv6 on for `ifname` in this thread's namespace; Err(reason) if
/// the kernel has no IPv6.
fn enable_ipv6(ifname: &str) -> Result<(), String> {
    let path = format!("/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6");
    if !std::path::Path::new("/proc/sys/net/ipv6").exists() {
        return Err("the kernel has no IPv6 (/proc/sys/net/ipv6 missing)".into());
    }
    std::fs::write(&path, "0").map_err(|e| format!("writing {path}: {e}"))?;
    // Duplicate address detection would leave addresses tentative and
    // gateways unusable for a second; these tests have no duplicates.
    let dad = format!("/proc/sys/net/ipv6/conf/{ifname}/accept_dad");
    std::fs::write(&dad, "0").map_err(|e| format!("writing {dad}: {e}"))
}

#[test]
fn veth_pair_and_link_settings() {
    in_netns("veth_pair_and_link_settings", |nl| {
        let (a, b) = veth(nl, "ta0", "tb0");
        assert_eq!(a.kind.as_deref(), Some("veth"));
        assert_eq!(b.kind.as_deref(), Some("veth"));
        assert!(!a.up && !b.up);
        assert_ne!(a.index, b.index);

        let mac = crate::parse_mac("02:00:5e:10:20:30").unwrap();
        nl.set_mtu(a.index, 1400).unwrap();
        nl.set_mac(a.index, mac).unwrap();
        nl.set_up(a.index).unwrap();
        let a2 = nl.link_by_name("ta0").unwrap();
        assert_eq!(
            a2,
            Link {
                index: a.index,
                name: "ta0".into(),
                mac: Some(mac),
                mtu: 1400,
                kind: Some("veth".into()),
                up: true,
            }
        );

        let links = nl.links().unwrap();
        let names: Vec<&str> = links.iter().map(|l| l.name.as_str()).collect();
        assert!(
            names.contains(&"lo") && names.contains(&"ta0") && names.contains(&"tb0"),
            "{names:?}"
        );
        assert_eq!(links.iter().find(|l| l.name == "ta0"), Some(&a2));

        // Deleting one end takes the pair.
        nl.delete_link(a.index).unwrap();
        assert!(matches!(nl.link_by_name("tb0"), Err(Error::LinkNotFound(n)) if n == "tb0"));
        let err = nl.delete_link(a.index).unwrap_err();
        assert_eq!(err.errno(), Some(libc::ENODEV), "{err}");
        assert!(
            err.to_string().contains(&format!("link {}", a.index)),
            "{err}"
        );
    });
}

#[test]
fn missing_link_is_link_not_found() {
    in_netns("missing_link_is_link_not_found", |nl| {
        let err = nl.link_by_name("nosuch0").unwrap_err();
        assert!(
            matches!(&err, Error::LinkNotFound(n) if n == "nosuch0"),
            "{err:?}"
        );
        assert!(err.to_string().contains("nosuch0"), "{err}");
        let err = nl.link_by_name("a-name-far-too-long").unwrap_err();
        assert!(matches!(err, Error::Invalid { .. }), "{err:?}");
    });
}

#[test]
fn addresses_both_families() {
    in_netns("addresses_both_families", |nl| {
        let (a, b) = veth(nl, "ta0", "tb0");
        let v4 = net("10.1.2.3/24");
        nl.add_address(a.index, &v4).unwrap();
        assert_eq!(nl.addresses(a.index).unwrap(), vec![v4]);
        assert_eq!(nl.addresses(b.index).unwrap(), vec![]);

        let err = nl.add_address(a.index, &v4).unwrap_err();
        assert_eq!(err.errno(), Some(libc::EEXIST), "{err:?}");
        let msg = err.to_string();
        assert!(
            msg.contains("10.1.2.3/24") && msg.contains("EEXIST"),
            "{msg}"
        );
        assert!(msg.contains(&format!("link {}", a.index)), "{msg}");

        match enable_ipv6("ta0") {
            Err(reason) => eprintln!("addresses_both_families: IPv6 part skipped: {reason}"),
            Ok(()) => {
                enable_ipv6("tb0").unwrap();
                let v6 = net("fd00:1::3/64");
                nl.add_address(a.index, &v6).unwrap();
                // Up with carrier: the kernel adds an fe80:: address, which
                // `addresses` leaves out.
                nl.set_up(b.index).unwrap();
                nl.set_up(a.index).unwrap();
                let deadline = Instant::now() + Duration::from_secs(2);
                while !has_link_local("ta0") && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(20));
                }
                assert!(has_link_local("ta0"), "no fe80:: address appeared on ta0");
                let mut got = nl.addresses(a.index).unwrap();
                got.sort_by_key(|n| n.addr.is_ipv6());
                assert_eq!(got, vec![v4, v6]);
            }
        }
    });
}

/// Whether `ifname` has an IPv6 link-local address, from /proc (this
/// thread's namespace: /proc/thread-self, not /proc/self).
fn has_link_local(ifname: &str) -> bool {
    std::fs::read_to_string("/proc/thread-self/net/if_inet6")
        .unwrap_or_default()
        .lines()
        .any(|l| l.starts_with("fe80") && l.split_whitespace().last() == Some(ifname))
}

#[test]
fn routes_added_and_read_back() {
    in_netns("routes_added_and_read_back", |nl| {
        let (a, b) = veth(nl, "ta0", "tb0");
        nl.set_up(b.index).unwrap();
        nl.set_up(a.index).unwrap();
        nl.add_address(a.index, &net("10.1.2.3/24")).unwrap();
        // Only the kernel's prefix route so far, which is not reported.
        assert_eq!(nl.routes(a.index).unwrap(), vec![]);

        let default = Route {
            destination: None,
            gateway: Some(ip("10.1.2.1")),
            source: None,
            mtu: None,
            scope: RouteScope::Universe,
            onlink: false,
        };
        let via = Route {
            destination: Some(net("10.9.0.0/24")),
            gateway: Some(ip("10.1.2.254")),
            source: Some(ip("10.1.2.3")),
            mtu: Some(1300),
            scope: RouteScope::Universe,
            onlink: false,
        };
        let on_link = Route {
            destination: Some(net("192.0.2.0/24")),
            gateway: None,
            source: None,
            mtu: None,
            scope: RouteScope::Link,
            onlink: false,
        };
        // A gateway outside every prefix of the link (Calico's style).
        let onlink_gw = Route {
            destination: Some(net("198.51.100.0/24")),
            gateway: Some(ip("203.0.113.1")),
            source: None,
            mtu: None,
            scope: RouteScope::Universe,
            onlink: true,
        };
        let mut want = vec![
            default.clone(),
            via.clone(),
            on_link.clone(),
            onlink_gw.clone(),
        ];
        for r in &want {
            nl.add_route(a.index, r).unwrap();
        }

        let err = nl.add_route(a.index, &default).unwrap_err();
        assert_eq!(err.errno(), Some(libc::EEXIST), "{err}");
        assert!(err.to_string().contains("default via 10.1.2.1"), "{err}");
        let unreachable = Route {
            destination: Some(net("10.8.0.0/16")),
            gateway: Some(ip("172.31.0.1")),
            ..on_link.clone()
        };
        let err = nl.add_route(a.index, &unreachable).unwrap_err();
        assert!(
            err.to_string().contains("10.8.0.0/16 via 172.31.0.1"),
            "{err}"
        );
        let mixed = Route {
            gateway: Some(ip("fd00::1")),
            ..via.clone()
        };
        assert!(matches!(
            nl.add_route(a.index, &mixed),
            Err(Error::Invalid { .. })
        ));

        match enable_ipv6("ta0") {
            Err(reason) => eprintln!("routes_added_and_read_back: IPv6 part skipped: {reason}"),
            Ok(()) => {
                nl.add_address(a.index, &net("fd00:1::3/64")).unwrap();
                let v6_default = Route {
                    destination: None,
                    gateway: Some(ip("fd00:1::1")),
                    ..default.clone()
                };
                let v6_via = Route {
                    destination: Some(net("fd00:9::/64")),
                    gateway: Some(ip("fd00:1::1")),
                    mtu: Some(1280),
                    ..default.clone()
                };
                nl.add_route(a.index, &v6_default).unwrap();
                nl.add_route(a.index, &v6_via).unwrap();
                want.push(v6_default);
                want.push(v6_via);
            }
        }

        let mut got = nl.routes(a.index).unwrap();
        let key = |r: &Route| r.to_string();
        got.sort_by_key(key);
        want.sort_by_key(key);
        assert_eq!(got, want);
        // Routes of other links are not reported.
        assert_eq!(nl.routes(b.index).unwrap(), vec![]);
    });
}

#[test]
fn permanent_neighbours() {
    in_netns("permanent_neighbours", |nl| {
        let (a, _b) = veth(nl, "ta0", "tb0");
        let n4 = Neighbour {
            ip: ip("10.1.2.7"),
            mac: crate::parse_mac("02:00:00:00:00:07").unwrap(),
        };
        nl.add_neighbour(a.index, &n4).unwrap();
        let mut want = vec![n4];
        let err = nl.add_neighbour(a.index, &n4).unwrap_err();
        assert_eq!(err.errno(), Some(libc::EEXIST), "{err}");
        assert!(
            err.to_string()
                .contains("10.1.2.7 lladdr 02:00:00:00:00:07"),
            "{err}"
        );
        match enable_ipv6("ta0") {
            Err(reason) => eprintln!("permanent_neighbours: IPv6 part skipped: {reason}"),
            Ok(()) => {
                let n6 = Neighbour {
                    ip: ip("fd00:1::7"),
                    mac: crate::parse_mac("02:00:00:00:00:08").unwrap(),
                };
                nl.add_neighbour(a.index, &n6).unwrap();
                want.push(n6);
            }
        }
        assert_eq!(nl.neighbours(a.index).unwrap(), want);
    });
}

#[test]
fn ingress_qdisc_add_has_delete() {
    in_netns("ingress_qdisc_add_has_delete", |nl| {
        let (a, b) = veth(nl, "ta0", "tb0");
        assert!(!nl.has_ingress_qdisc(a.index).unwrap());
        // Never had one: nothing to delete.
        assert!(!nl.delete_ingress_qdisc(a.index).unwrap());
        nl.add_ingress_qdisc(a.index).unwrap();
        assert!(nl.has_ingress_qdisc(a.index).unwrap());
        assert!(!nl.has_ingress_qdisc(b.index).unwrap());
        let err = nl.add_ingress_qdisc(a.index).unwrap_err();
        assert_eq!(err.errno(), Some(libc::EEXIST), "{err}");
        assert!(
            err.to_string()
                .contains(&format!("ingress qdisc to link {}", a.index)),
            "{err}"
        );
        assert!(nl.delete_ingress_qdisc(a.index).unwrap());
        assert!(!nl.has_ingress_qdisc(a.index).unwrap());
        // Had one once: the kernel's answer differs, the result does not.
        assert!(!nl.delete_ingress_qdisc(a.index).unwrap());
    });
}

/// Experimental ethertype (IEEE 802 local experimental 1).
const TEST_ETHERTYPE: u16 = 0x88b5;

/// An AF_PACKET socket bound to `ifindex` for TEST_ETHERTYPE frames.
fn packet_socket(ifindex: u32) -> OwnedFd {
    let proto = TEST_ETHERTYPE.to_be();
    // SAFETY: socket(2) takes no pointers; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
    assert!(fd >= 0, "socket(AF_PACKET): {}", io::Error::last_os_error());
    // SAFETY: fd is a new descriptor nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_ll is plain old data; all-zero is a valid value.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = proto;
    sll.sll_ifindex = ifindex as i32;
    // SAFETY: sll is a live sockaddr_ll and the length says so.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&sll as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "bind(AF_PACKET): {}", io::Error::last_os_error());
    let tv = libc::timeval {
        tv_sec: 0,
        tv_usec: 100_000,
    };
    // SAFETY: tv is a live timeval and the length says so.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "SO_RCVTIMEO: {}", io::Error::last_os_error());
    fd
}

fn send_frame(fd: &OwnedFd, src: [u8; 6], marker: &[u8]) {
    let mut frame = vec![0xff; 6];
    frame.extend_from_slice(&src);
    frame.extend_from_slice(&TEST_ETHERTYPE.to_be_bytes());
    frame.extend_from_slice(marker);
    frame.resize(64, 0);
    // SAFETY: frame is a live buffer of the given length.
    let n = unsafe { libc::send(fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
    assert_eq!(
        n,
        frame.len() as isize,
        "send: {}",
        io::Error::last_os_error()
    );
}

/// Whether a frame carrying `marker` arrives on `fd` within `wait`.
fn receives(fd: &OwnedFd, marker: &[u8], wait: Duration) -> bool {
    let deadline = Instant::now() + wait;
    let mut buf = [0u8; 2048];
    while Instant::now() < deadline {
        // SAFETY: buf is a live buffer of the given length.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            let err = io::Error::last_os_error();
            match err.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => continue,
                _ => panic!("recv(AF_PACKET): {err}"),
            }
        }
        let frame = &buf[..n as usize];
        if frame.len() >= 14 + marker.len()
            && frame[12..14] == TEST_ETHERTYPE.to_be_bytes()
            && &frame[14..14 + marker.len()] == marker
        {
            return true;
        }
    }
    false
}

#[test]
fn redirect_ingress_moves_frames_to_the_other_link() {
    in_netns("redirect_ingress_moves_frames_to_the_other_link", |nl| {
        // B sends into A (its peer); A's ingress is redirected out of C,
        // whose peer D receives.
        let (a, b) = veth(nl, "ta0", "tb0");
        let (c, d) = veth(nl, "tc0", "td0");
        for l in [&a, &b, &c, &d] {
            nl.set_up(l.index).unwrap();
        }
        let tx = packet_socket(b.index);
        let rx = packet_socket(d.index);
        let src = b.mac.unwrap();

        // Control: without the redirect nothing crosses.
        send_frame(&tx, src, b"thaw-before");
        assert!(!receives(&rx, b"thaw-before", Duration::from_millis(300)));

        let err = nl.redirect_ingress(a.index, c.index).unwrap_err();
        assert!(
            err.to_string()
                .contains(&format!("ingress of link {}", a.index)),
            "{err}"
        );

        nl.add_ingress_qdisc(a.index).unwrap();
        nl.redirect_ingress(a.index, c.index).unwrap();
        send_frame(&tx, src, b"thaw-redirected");
        assert!(
            receives(&rx, b"thaw-redirected", Duration::from_secs(3)),
            "the frame sent into tb0 did not come out of td0"
        );

        // The other direction too, as for a veth and a tap: D sends into C,
        // C's ingress goes out of A, B receives.
        nl.add_ingress_qdisc(c.index).unwrap();
        nl.redirect_ingress(c.index, a.index).unwrap();
        let back_tx = packet_socket(d.index);
        let back_rx = packet_socket(b.index);
        send_frame(&back_tx, d.mac.unwrap(), b"thaw-back");
        assert!(
            receives(&back_rx, b"thaw-back", Duration::from_secs(3)),
            "the frame sent into td0 did not come out of tb0"
        );

        // One redirect per link: a second one is refused, not stacked.
        let err = nl.redirect_ingress(a.index, c.index).unwrap_err();
        assert_eq!(err.errno(), Some(libc::EEXIST), "{err}");

        // Removing the qdisc removes the filter with it.
        assert!(nl.delete_ingress_qdisc(a.index).unwrap());
        send_frame(&tx, src, b"thaw-after");
        assert!(!receives(&rx, b"thaw-after", Duration::from_millis(300)));
    });
}

#[test]
fn open_in_another_namespace() {
    in_netns("open_in_another_namespace", |nl| {
        // A second namespace, held by a thread until told to go.
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let holder = std::thread::spawn(move || {
            // SAFETY: as in `in_netns`: only this thread moves.
            assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0);
            Netlink::open()
                .unwrap()
                .create_veth("inner0", "inner1")
                .unwrap();
            // SAFETY: gettid has no arguments and cannot fail.
            let tid = unsafe { libc::gettid() };
            ready_tx.send(format!("/proc/{tid}/ns/net")).unwrap();
            let _ = done_rx.recv();
        });
        let path = ready_rx.recv().unwrap();
        let mut inner = Netlink::open_in(std::path::Path::new(&path)).unwrap();
        assert_eq!(
            inner.link_by_name("inner0").unwrap().kind.as_deref(),
            Some("veth")
        );
        // This thread stayed where it was.
        assert!(matches!(
            nl.link_by_name("inner0"),
            Err(Error::LinkNotFound(_))
        ));
        assert!(matches!(
            Netlink::open().unwrap().link_by_name("inner0"),
            Err(Error::LinkNotFound(_))
        ));
        done_tx.send(()).unwrap();
        holder.join().unwrap();

        let err = Netlink::open_in(std::path::Path::new("/nonexistent/netns")).unwrap_err();
        assert_eq!(err.errno(), Some(libc::ENOENT), "{err}");
        assert!(err.to_string().contains("/nonexistent/netns"), "{err}");
    });
}
