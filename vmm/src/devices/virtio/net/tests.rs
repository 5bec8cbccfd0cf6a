//! virtio-net against in-memory guest RAM and a real tap. Every test that
//! needs a tap runs on a thread moved into its own network namespace, so
//! the host's is never touched (tests run as root).

use super::*;
use crate::devices::virtio::mmio::tests::{negotiate, r, setup_queue, w, ALL_OK};
use crate::devices::virtio::mmio::{MmioResources, MmioTransport};
use crate::devices::virtio::testutil::{mem, CountingInterrupt, TestQueue, F_NEXT, F_WRITE};
use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;
use vm_memory::{Bytes, GuestAddress};

const ETHERTYPE: u16 = 0x88b5; // IEEE local experimental: nothing else sends it
const WAIT: Duration = Duration::from_secs(5);
const RXQ: u64 = 0;
const TXQ: u64 = 0x4000;

/// Runs `f` on a thread in a new, private network namespace.
pub(crate) fn in_netns<F: FnOnce() + Send + 'static>(f: F) {
    let t = std::thread::spawn(move || {
        // SAFETY: unshare with a flag only; it moves just this thread.
        let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "unshare: {}", io::Error::last_os_error());
        // A link that comes up would send IPv6 router solicitations, which
        // would land in the guest's buffers before the test's frames.
        for p in ["all", "default"] {
            let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{p}/disable_ipv6"), "1");
        }
        f()
    });
    if let Err(panic) = t.join() {
        std::panic::resume_unwind(panic);
    }
}

/// `ip link set NAME up`, with an ioctl.
pub(crate) fn link_up(name: &str) {
    // SAFETY: plain socket(2) call; the fd is owned right after.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) };
    assert!(fd >= 0);
    // SAFETY: fd is a fresh, valid descriptor nobody else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: all-zero is a valid ifreq.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write the ifreq we own.
    unsafe {
        assert_eq!(
            libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut ifr),
            0
        );
        ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as i16;
        assert_eq!(
            libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &ifr),
            0,
            "SIOCSIFFLAGS: {}",
            io::Error::last_os_error()
        );
    }
}

/// An AF_PACKET socket on the tap: the host's end of the wire.
struct Wire(OwnedFd);

impl Wire {
    fn bind(name: &str) -> Wire {
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain socket(2) call.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
        assert!(fd >= 0, "{}", io::Error::last_os_error());
        // SAFETY: fresh descriptor nobody else owns.
        let sock = unsafe { OwnedFd::from_raw_fd(fd) };
        let cname = CString::new(name).unwrap();
        // SAFETY: a NUL-terminated string.
        let ifindex = unsafe { libc::if_nametoindex(cname.as_ptr()) };
        assert_ne!(ifindex, 0);
        // SAFETY: all-zero is a valid sockaddr_ll.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = proto;
        sll.sll_ifindex = ifindex as i32;
        // SAFETY: sll lives for the call and its size is passed.
        let rc = unsafe {
            libc::bind(
                sock.as_raw_fd(),
                (&sll as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(rc, 0, "{}", io::Error::last_os_error());
        Wire(sock)
    }

    /// Puts a frame on the wire towards the guest.
    fn send(&self, frame: &[u8]) {
        // SAFETY: the buffer lives for the call.
        let n = unsafe { libc::send(self.0.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        assert_eq!(n, frame.len() as isize, "{}", io::Error::last_os_error());
    }

    /// The next frame of ours the guest sent, if one comes in time.
    fn recv(&self) -> Option<Vec<u8>> {
        let deadline = std::time::Instant::now() + WAIT;
        while std::time::Instant::now() < deadline {
            let mut pfd = libc::pollfd {
                fd: self.0.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one pollfd we own.
            if unsafe { libc::poll(&mut pfd, 1, 100) } <= 0 {
                continue;
            }
            let mut buf = vec![0u8; 70_000];
            // SAFETY: the buffer lives for the call.
            let n = unsafe {
                libc::recv(
                    self.0.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if n >= 14 && buf[12..14] == ETHERTYPE.to_be_bytes() {
                buf.truncate(n as usize);
                return Some(buf);
            }
        }
        None
    }
}

/// An Ethernet frame of `len` bytes with a recognisable payload.
fn frame(len: usize, seed: u8) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, seed]);
    f.extend_from_slice(&ETHERTYPE.to_be_bytes());
    f.extend((0..len - 14).map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed)));
    f
}

struct Rig {
    m: GuestMemoryMmap,
    rx: TestQueue,
    tx: TestQueue,
    evts: Vec<EventFd>,
    irq: Arc<CountingInterrupt>,
    net: Net,
}

impl Rig {
    fn new(features: u64) -> Rig {
        let m = mem(0x40_0000);
        let rx = TestQueue::new(&m, RXQ, QUEUE_SIZE);
        let tx = TestQueue::new(&m, TXQ, QUEUE_SIZE);
        let mut net = Net::new(DEFAULT_MAC).unwrap();
        net.set_acked_features(features);
        Rig {
            evts: (0..2)
                .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
                .collect(),
            irq: CountingInterrupt::new(),
            m,
            rx,
            tx,
            net,
        }
    }

    fn activate(&mut self) {
        self.net
            .activate(ActivateContext {
                mem: self.m.clone(),
                interrupt: self.irq.clone(),
                queues: vec![self.rx.queue(), self.tx.queue()],
                queue_events: self.evts.iter().map(|e| e.try_clone().unwrap()).collect(),
            })
            .unwrap();
    }

    fn kick(&self, q: usize) {
        self.evts[q].write(1).unwrap();
    }

    /// Queues `frame` behind a zero header, split in two buffers at `addr`.
    fn send(&mut self, addr: u64, frame: &[u8]) {
        let mut buf = vec![0u8; VNET_HDR_LEN];
        buf.extend_from_slice(frame);
        self.m.write_slice(&buf, GuestAddress(addr)).unwrap();
        let hdr = VNET_HDR_LEN as u32;
        self.tx.add_chain(&[
            (addr, hdr, false),
            (addr + u64::from(hdr), frame.len() as u32, false),
        ]);
        self.kick(TX);
    }

    fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        self.m.read_slice(&mut b, GuestAddress(addr)).unwrap();
        b
    }
}

fn count(c: &AtomicU64) -> u64 {
    c.load(Ordering::SeqCst)
}

const TAP: &str = "thawtest0";

#[test]
fn config_space_features_and_offloads() {
    let net = Net::new([2, 1, 2, 3, 4, 5]).unwrap();
    assert_eq!(net.device_type(), 1);
    let mut c = [0u8; 10];
    net.read_config(0, &mut c);
    assert_eq!(&c[..6], &[2, 1, 2, 3, 4, 5]);
    assert_eq!(u16::from_le_bytes([c[6], c[7]]), STATUS_LINK_UP);
    let f = net.avail_features();
    for need in [
        FEATURE_VERSION_1,
        FEATURE_MRG_RXBUF,
        FEATURE_CSUM,
        FEATURE_GUEST_TSO4,
        FEATURE_HOST_TSO6,
        FEATURE_STATUS,
        FEATURE_MAC,
    ] {
        assert_ne!(f & need, 0);
    }
    assert_eq!(tap_offload(0), 0);
    assert_eq!(
        tap_offload(FEATURE_GUEST_TSO4),
        0,
        "TSO needs checksum offload"
    );
    assert_eq!(
        tap_offload(FEATURE_GUEST_CSUM | FEATURE_GUEST_TSO4 | FEATURE_GUEST_TSO6 | FEATURE_CSUM),
        libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6
    );
}

#[test]
fn without_a_tap_tx_is_dropped_and_rx_never_delivers() {
    let mut rig = Rig::new(FEATURE_VERSION_1);
    rig.activate();
    rig.rx.add_chain(&[(0x10000, 2048, true)]);
    rig.kick(RX);
    rig.send(0x20000, &frame(60, 1));
    // Hostile TX: a writable buffer, and a loop.
    rig.tx.add_chain(&[(0x21000, 64, true)]);
    rig.tx.write_desc(200, 0x22000, 64, F_NEXT, 200);
    rig.tx.publish(200);
    rig.kick(TX);
    assert!(rig.tx.wait_used(3, WAIT));
    for i in 0..3 {
        assert_eq!(rig.tx.used_elem(i).1, 0);
    }
    let s = rig.net.stats();
    assert_eq!(count(&s.tx_no_backend), 1);
    assert_eq!(count(&s.tx_malformed), 2);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(rig.rx.used_idx(), 0);
    assert!(rig.net.pause().is_ok());
}

#[test]
fn tx_reaches_the_tap_and_rx_reaches_the_guest() {
    in_netns(|| {
        let mut rig = Rig::new(FEATURE_VERSION_1);
        rig.net.attach_tap(TAP).unwrap();
        link_up(TAP);
        let wire = Wire::bind(TAP);
        rig.activate();

        let out = frame(100, 3);
        rig.send(0x20000, &out);
        assert_eq!(wire.recv().as_deref(), Some(&out[..]));
        assert!(rig.tx.wait_used(1, WAIT));
        assert_eq!(count(&rig.net.stats().tx_frames), 1);

        // A readable RX chain is returned empty; a chain too small for the
        // first frame stays for the second.
        rig.m
            .write_slice(&[0xaa; 256], GuestAddress(0x10000))
            .unwrap();
        rig.rx.add_chain(&[(0x30000, 64, false)]);
        rig.rx
            .add_chain(&[(0x10000, 12, true), (0x10100, 100, true)]);
        rig.kick(RX);
        wire.send(&frame(200, 4));
        let small = frame(100, 5);
        wire.send(&small);
        assert!(rig.rx.wait_used(2, WAIT));
        assert_eq!(rig.rx.used_elem(0).1, 0);
        assert_eq!(rig.rx.used_elem(1).1, 112);
        let hdr = rig.read(0x10000, 12);
        assert_eq!(&hdr[..10], &[0u8; 10], "no offloads in a plain frame");
        assert_eq!(u16::from_le_bytes([hdr[10], hdr[11]]), 1, "num_buffers");
        assert_eq!(rig.read(0x10100, 100), small);
        let s = rig.net.stats();
        assert_eq!(
            (
                count(&s.rx_frames),
                count(&s.rx_too_big),
                count(&s.rx_malformed)
            ),
            (1, 1, 1)
        );
        assert!(rig.irq.used_count() >= 2);
        rig.net.pause().unwrap();
    });
}

#[test]
fn mergeable_rx_spans_chains_and_pause_gives_unused_ones_back() {
    in_netns(|| {
        let mut rig = Rig::new(FEATURE_VERSION_1 | FEATURE_MRG_RXBUF);
        rig.net.attach_tap(TAP).unwrap();
        link_up(TAP);
        let wire = Wire::bind(TAP);
        rig.activate();

        // Fewer buffers than a 64 KiB frame needs: the frame is bounced.
        for i in 0..3 {
            rig.rx.add_chain(&[(0x100000 + i * 0x1000, 600, true)]);
        }
        rig.kick(RX);
        let f = frame(1400, 6);
        wire.send(&f);
        assert!(rig.rx.wait_used(3, WAIT));
        let lens: Vec<u32> = (0..3).map(|i| rig.rx.used_elem(i).1).collect();
        assert_eq!(lens, [600, 600, 212]);
        let mut got = Vec::new();
        for (i, len) in lens.iter().enumerate() {
            got.extend(rig.read(0x100000 + i as u64 * 0x1000, *len as usize));
        }
        assert_eq!(u16::from_le_bytes([got[10], got[11]]), 3, "num_buffers");
        assert_eq!(&got[12..], &f[..]);

        // Room for any frame: read straight into the guest's buffers; the
        // buffers left over are popped but not used.
        for i in 0..70 {
            rig.rx.add_chain(&[(0x200000 + i * 0x800, 1024, true)]);
        }
        rig.kick(RX);
        std::thread::sleep(Duration::from_millis(50));
        let f = frame(1400, 7);
        wire.send(&f);
        assert!(rig.rx.wait_used(5, WAIT));
        assert_eq!(rig.rx.used_elem(3).1, 1024);
        assert_eq!(rig.rx.used_elem(4).1, 388);
        let first = rig.read(0x200000, 1024);
        assert_eq!(u16::from_le_bytes([first[10], first[11]]), 2);
        assert_eq!(&first[12..], &f[..1012]);
        assert_eq!(rig.read(0x200800, 388), &f[1012..]);

        // A pause rewinds to the first buffer not used.
        let queues = rig.net.pause().unwrap();
        assert_eq!(queues[RX].next_avail(), 5);
        assert_eq!(count(&rig.net.stats().rx_frames), 2);
    });
}

#[test]
fn a_tap_attached_later_is_picked_up_and_a_second_is_refused() {
    in_netns(|| {
        let mut rig = Rig::new(FEATURE_VERSION_1);
        rig.activate();
        rig.send(0x20000, &frame(80, 1));
        assert!(rig.tx.wait_used(1, WAIT));
        assert_eq!(count(&rig.net.stats().tx_no_backend), 1);

        rig.net.attach_tap(TAP).unwrap();
        assert_eq!(rig.net.tap_name(), Some(TAP));
        link_up(TAP);
        let wire = Wire::bind(TAP);
        let f = frame(90, 2);
        rig.send(0x21000, &f);
        assert_eq!(wire.recv().as_deref(), Some(&f[..]));
        assert!(rig.tx.wait_used(2, WAIT));

        let e = rig.net.attach_tap("thawtest1").unwrap_err().to_string();
        assert!(e.contains(TAP) && e.contains("already bound"), "{e}");
        rig.net.pause().unwrap();
    });
}

#[test]
fn a_restored_nic_resumes_at_its_ring_positions_on_a_new_tap() {
    in_netns(|| {
        let m = mem(0x40_0000);
        let mut t = MmioTransport::new(m.clone(), Net::new([2, 9, 9, 9, 9, 9]).unwrap()).unwrap();
        t.device_mut().attach_tap(TAP).unwrap();
        link_up(TAP);
        let wire = Wire::bind(TAP);
        let acked = negotiate(&mut t);
        assert_ne!(acked & FEATURE_MRG_RXBUF, 0);
        let mut rx = TestQueue::new(&m, RXQ, 64);
        let mut tx = TestQueue::new(&m, TXQ, 64);
        setup_queue(&mut t, 0, &rx);
        setup_queue(&mut t, 1, &tx);
        w(&mut t, 0x70, ALL_OK);

        let put = |m: &GuestMemoryMmap, tx: &mut TestQueue, addr: u64, f: &[u8]| {
            let mut b = vec![0u8; VNET_HDR_LEN];
            b.extend_from_slice(f);
            m.write_slice(&b, GuestAddress(addr)).unwrap();
            tx.add_chain(&[(addr, b.len() as u32, false)]);
        };
        let f1 = frame(64, 1);
        put(&m, &mut tx, 0x20000, &f1);
        w(&mut t, 0x50, 1);
        assert_eq!(wire.recv().as_deref(), Some(&f1[..]));
        assert!(tx.wait_used(1, WAIT));

        t.pause().unwrap();
        let state = crate::devices::persist::through_state_file(&t.save().unwrap());
        assert_eq!(state.device.mac, [2, 9, 9, 9, 9, 9]);
        assert_eq!(state.device.acked_features, acked);
        assert!(state.device.link_up);
        // The old tap goes with its VMM; the new one is created afresh.
        drop(t);
        drop(wire);
        let res = MmioResources {
            mem: m.clone(),
            device: Some(Tap::open(TAP).unwrap()),
        };
        let mut t2 = MmioTransport::<Net>::restore(&state, res).unwrap();
        assert_eq!(t2.save().unwrap(), state);
        assert_eq!(t2.device().tap_name(), Some(TAP));
        link_up(TAP);
        let wire = Wire::bind(TAP);
        t2.resume().unwrap();
        assert_eq!(r(&mut t2, 0x70), ALL_OK);

        let f2 = frame(70, 2);
        put(&m, &mut tx, 0x21000, &f2);
        w(&mut t2, 0x50, 1);
        assert_eq!(wire.recv().as_deref(), Some(&f2[..]));
        assert!(tx.wait_used(2, WAIT));
        assert_eq!(tx.used_elem(1).0, 1, "the second chain, in used entry 1");

        rx.add_chain(&[(0x30000, 2048, true)]);
        w(&mut t2, 0x50, 0);
        let f3 = frame(300, 3);
        wire.send(&f3);
        assert!(rx.wait_used(1, WAIT));
        assert_eq!(rx.used_elem(0).1, 312);
        let mut got = vec![0u8; 312];
        m.read_slice(&mut got, GuestAddress(0x30000)).unwrap();
        assert_eq!(&got[12..], &f3[..]);
        let _ = F_WRITE;
    });
}
