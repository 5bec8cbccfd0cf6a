//! virtio-net device benchmark: `cargo bench -p thaw-benches --bench net_device`.
//!
//! Host CPU cost of the device's TX path, per frame: a batch of frames is
//! queued in a TX ring in guest memory (in-memory, no VM), the worker is
//! kicked once, and the time until the last one is in the used ring is
//! divided by the batch. The frames go into a real tap, up, in a private
//! network namespace, where the kernel drops them (no address, no
//! forwarding). Prints p50/p99 over the batches of:
//! - 1500-byte frames, one buffer each (header and frame together);
//! - 64 KiB TSO frames (a valid TCPv4 GSO header), the headers in one
//!   buffer and the payload in 4 KiB pages, as Linux' driver queues them.
//!
//! Needs root (a network namespace and a tap). Environment:
//! THAW_BENCH_RUNS (batches per size, default 200).

// Test code: a failed step panics with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use thaw_benches::{count_from_env, summarize};
use thaw_vmm::devices::virtio::net::{Net, DEFAULT_MAC, FEATURE_CSUM, FEATURE_HOST_TSO4};
use thaw_vmm::devices::virtio::{ActivateContext, Interrupt, VirtioDevice, FEATURE_VERSION_1};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const QSIZE: u16 = 256;
const DESC: u64 = 0;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
const BUFS: u64 = 0x10000;
const HDR: usize = 12;
const TAP: &str = "thawbench0";

struct NoIrq;
impl Interrupt for NoIrq {
    fn signal_used_queue(&self) {}
    fn signal_config_change(&self) {}
}

/// The driver's side of one split ring, as Linux writes it.
struct Ring {
    m: GuestMemoryMmap,
    avail_idx: u16,
}

impl Ring {
    fn desc(&self, i: u16, addr: u64, len: u32, next: Option<u16>) {
        let at = DESC + 16 * u64::from(i);
        self.m.write_obj(addr, GuestAddress(at)).unwrap();
        self.m.write_obj(len, GuestAddress(at + 8)).unwrap();
        let flags: u16 = if next.is_some() { 1 } else { 0 };
        self.m.write_obj(flags, GuestAddress(at + 12)).unwrap();
        self.m
            .write_obj(next.unwrap_or(0), GuestAddress(at + 14))
            .unwrap();
    }

    fn publish(&mut self, heads: impl Iterator<Item = u16>) {
        for head in heads {
            let slot = AVAIL + 4 + 2 * u64::from(self.avail_idx % QSIZE);
            self.m.write_obj(head, GuestAddress(slot)).unwrap();
            self.avail_idx = self.avail_idx.wrapping_add(1);
        }
        self.m
            .write_obj(self.avail_idx, GuestAddress(AVAIL + 2))
            .unwrap();
    }

    fn used_idx(&self) -> u16 {
        self.m.read_obj(GuestAddress(USED + 2)).unwrap()
    }
}

fn ip_checksum(h: &[u8]) -> u16 {
    let mut sum: u32 = h
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// vnet header, Ethernet, IPv4 and TCP headers of a frame of `len` bytes;
/// a GSO (TSO) header when `tso`.
fn headers(len: usize, tso: bool) -> Vec<u8> {
    let mut h = vec![0u8; HDR];
    if tso {
        h[0] = 1; // NEEDS_CSUM
        h[1] = 1; // GSO_TCPV4
        h[2..4].copy_from_slice(&54u16.to_le_bytes()); // hdr_len
        h[4..6].copy_from_slice(&1448u16.to_le_bytes()); // gso_size
        h[6..8].copy_from_slice(&34u16.to_le_bytes()); // csum_start
        h[8..10].copy_from_slice(&16u16.to_le_bytes()); // csum_offset
    }
    h.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x99]); // to a MAC nobody has
    h.extend_from_slice(&DEFAULT_MAC);
    h.extend_from_slice(&0x0800u16.to_be_bytes());
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&((len - 14) as u16).to_be_bytes());
    ip[8] = 64;
    ip[9] = 6; // TCP
    ip[12..16].copy_from_slice(&[10, 0, 0, 2]);
    ip[16..20].copy_from_slice(&[10, 0, 0, 1]);
    let c = ip_checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    h.extend_from_slice(&ip);
    let mut tcp = [0u8; 20];
    tcp[0..2].copy_from_slice(&40000u16.to_be_bytes());
    tcp[2..4].copy_from_slice(&5001u16.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = 0x10; // ACK
    h.extend_from_slice(&tcp);
    h
}

/// Queues `frames` frames of `len` bytes (payload in `page`-sized
/// buffers after the headers' buffer), kicks once, and returns the time
/// until all are used.
fn batch(ring: &mut Ring, kick: &EventFd, frames: u16, len: usize, page: usize) -> Duration {
    let hdrs = headers(len, len > 1514);
    let payload = len + HDR - hdrs.len();
    let pages = payload.div_ceil(page);
    let per_chain = if page >= payload { 1 } else { 1 + pages as u16 };
    let mut heads = Vec::new();
    for f in 0..frames {
        let head = f * per_chain;
        let base = BUFS + u64::from(f) * 0x20000;
        ring.m.write_slice(&hdrs, GuestAddress(base)).unwrap();
        let first_len = if page >= payload {
            len + HDR
        } else {
            hdrs.len()
        };
        let next = (pages > 0 && page < payload).then_some(head + 1);
        ring.desc(head, base, first_len as u32, next);
        if page < payload {
            for p in 0..pages {
                let i = head + 1 + p as u16;
                let this = page.min(payload - p * page);
                let next = (p + 1 < pages).then_some(i + 1);
                ring.desc(i, base + 0x1000 + (p * page) as u64, this as u32, next);
            }
        }
        heads.push(head);
    }
    let target = ring.used_idx().wrapping_add(frames);
    let t = Instant::now();
    ring.publish(heads.into_iter());
    kick.write(1).unwrap();
    while ring.used_idx() != target {
        std::hint::spin_loop();
    }
    t.elapsed()
}

fn link_up(name: &str) {
    // SAFETY: plain socket(2) call.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) };
    assert!(fd >= 0);
    // SAFETY: all-zero is a valid ifreq.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    // SAFETY: the ioctls read and write the ifreq we own; fd is ours.
    unsafe {
        assert_eq!(libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut ifr), 0);
        ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as i16;
        assert_eq!(libc::ioctl(fd, libc::SIOCSIFFLAGS, &ifr), 0);
        libc::close(fd);
    }
}

fn bench(runs: usize) {
    let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
    let mut net = Net::new(DEFAULT_MAC).unwrap();
    net.set_acked_features(FEATURE_VERSION_1 | FEATURE_CSUM | FEATURE_HOST_TSO4);
    net.attach_tap(TAP).unwrap();
    link_up(TAP);
    let mut queues = Vec::new();
    for q in 0..2u64 {
        let mut queue = Queue::new(QSIZE).unwrap();
        // RX gets a ring that stays empty, well away from TX's.
        let off = if q == 0 { 0x8000 } else { 0 };
        queue
            .try_set_desc_table_address(GuestAddress(DESC + off))
            .unwrap();
        queue
            .try_set_avail_ring_address(GuestAddress(AVAIL + off))
            .unwrap();
        queue
            .try_set_used_ring_address(GuestAddress(USED + off))
            .unwrap();
        queue.set_ready(true);
        queues.push(queue);
    }
    let evts: Vec<EventFd> = (0..2)
        .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
        .collect();
    net.activate(ActivateContext {
        mem: m.clone(),
        interrupt: Arc::new(NoIrq),
        queues,
        queue_events: evts.iter().map(|e| e.try_clone().unwrap()).collect(),
    })
    .unwrap();
    let mut ring = Ring { m, avail_idx: 0 };
    let stats = net.stats();

    println!("virtio-net TX into a tap, wall time per frame ({runs} batches each):");
    println!("  {:<36} {:>10} {:>10}", "", "p50", "p99");
    let cases: [(&str, u16, usize, usize); 2] = [
        ("1500-byte frame (256 per batch)", 256, 1514, 4096),
        ("64 KiB TSO frame (15 per batch)", 15, 65_514, 4096),
    ];
    for (label, frames, len, page) in cases {
        batch(&mut ring, &evts[1], frames, len, page); // warm-up
        let per_frame: Vec<Duration> = (0..runs)
            .map(|_| batch(&mut ring, &evts[1], frames, len, page) / u32::from(frames))
            .collect();
        let s = summarize(&per_frame).unwrap();
        println!(
            "  {label:<36} {:>7} ns {:>7} ns",
            s.p50.as_nanos(),
            s.p99.as_nanos()
        );
    }
    let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::SeqCst);
    let errors = load(&stats.tx_errors) + load(&stats.tx_malformed) + load(&stats.tx_too_big);
    println!(
        "  frames sent {}, refused or dropped {errors}",
        load(&stats.tx_frames)
    );
    assert_eq!(errors, 0, "the tap must take every frame");
    net.pause().unwrap();
}

fn main() -> ExitCode {
    let runs = match count_from_env("THAW_BENCH_RUNS", 200) {
        Ok(n) => n,
        Err(e) => {
            eprintln!("net_device: {e}");
            return ExitCode::FAILURE;
        }
    };
    let t = std::thread::spawn(move || {
        // SAFETY: unshare with a flag only; it moves just this thread, so
        // the host's network namespace is never touched.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            eprintln!(
                "net_device: skipped: cannot make a network namespace ({}); run as root",
                std::io::Error::last_os_error()
            );
            return;
        }
        bench(runs);
    });
    match t.join() {
        Ok(()) => ExitCode::SUCCESS,
        Err(_) => ExitCode::FAILURE,
    }
}
