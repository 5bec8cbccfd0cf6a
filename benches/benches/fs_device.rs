//! virtio-fs server benchmark: `cargo bench -p thaw-benches --bench fs_device`.
//!
//! Host CPU cost of the VMM's FUSE server per request, over a real
//! directory on this host's disk: the request bytes as the guest kernel
//! sends them go to `Server::handle`, and the time until the reply is
//! built is measured (no VM, no virtqueue: the device adds one copy of
//! the request and reply between guest memory and these buffers). This is
//! the part of the `volumes` benchmark's per-request cost that is the
//! host's; the rest is the guest kernel and the exit to the VMM, which on
//! PVM dominates. Prints p50/p99 per request of:
//! - LOOKUP of an existing name (path resolution with openat2 + fstat);
//! - GETATTR of a known node;
//! - CREATE of a new file (and its RELEASE, not timed);
//! - WRITE and READ of 128 KiB at increasing offsets (page cache warm).
//!
//! Environment: THAW_BENCH_RUNS (requests per kind, default 2000).

// Test code: a failed step panics with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::ExitCode;
use std::time::{Duration, Instant};

use thaw_benches::{count_from_env, summarize};
use thaw_vmm::devices::virtio::fs::passthrough::{Limits, Share};
use thaw_vmm::devices::virtio::fs::protocol::{opcode, ROOT_ID};
use thaw_vmm::devices::virtio::fs::server::Server;

const CHUNK: usize = 128 * 1024;
/// The reply room the guest kernel gives a request (max_pages 256 + header).
const ROOM: usize = (1 << 20) + 4096;

fn le32(v: &[u32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn le64(v: &[u64]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn cstr(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// A FUSE client speaking to the server as the guest kernel does.
struct Client {
    server: Server,
    unique: u64,
}

impl Client {
    fn request(&mut self, op: u32, node: u64, args: &[u8]) -> Vec<u8> {
        self.unique += 1;
        let mut r = Vec::with_capacity(40 + args.len());
        r.extend_from_slice(&((40 + args.len()) as u32).to_le_bytes());
        r.extend_from_slice(&op.to_le_bytes());
        r.extend_from_slice(&self.unique.to_le_bytes());
        r.extend_from_slice(&node.to_le_bytes());
        r.extend_from_slice(&le32(&[0, 0, 1, 0])); // uid, gid, pid, padding
        r.extend_from_slice(args);
        r
    }

    /// Sends `req`; returns the reply body and the time the server took.
    fn timed(&mut self, req: &[u8], what: &str) -> (Vec<u8>, Duration) {
        let start = Instant::now();
        let reply = self.server.handle(req, ROOM);
        let took = start.elapsed();
        let err = i32::from_le_bytes(reply[4..8].try_into().unwrap());
        assert_eq!(err, 0, "{what}: the server answered errno {}", -err);
        (reply[16..].to_vec(), took)
    }

    /// FORGET has no reply.
    fn forget(&mut self, node: u64) {
        let req = self.request(opcode::FORGET, node, &le64(&[1]));
        self.server.handle(&req, ROOM);
    }

    fn call(&mut self, op: u32, node: u64, args: &[u8], what: &str) -> Vec<u8> {
        let req = self.request(op, node, args);
        self.timed(&req, what).0
    }
}

fn row(what: &str, samples: &[Duration], bytes: Option<usize>) {
    let s = summarize(samples).expect("samples");
    let rate = bytes
        .map(|b| format!("{:>8.0} MB/s", b as f64 / s.p50.as_secs_f64() / 1e6))
        .unwrap_or_default();
    println!(
        "{what:<28} {:>9.2} {:>9.2} {rate}",
        s.p50.as_secs_f64() * 1e6,
        s.p99.as_secs_f64() * 1e6
    );
}

fn main() -> ExitCode {
    let runs = match count_from_env("THAW_BENCH_RUNS", 2000) {
        Ok(n) => n,
        Err(e) => {
            eprintln!("fs_device: {e}");
            return ExitCode::FAILURE;
        }
    };
    let dir = tempfile::tempdir().expect("a temporary directory");
    std::fs::write(dir.path().join("existing"), b"x").expect("a file to look up");
    let mut server = Server::new();
    server.set_share(Share::new(dir.path(), false, Limits::default()).expect("the share"));
    let mut c = Client { server, unique: 0 };
    let mut init = le32(&[7, 31, CHUNK as u32, 0xffff_ffff]);
    init.extend_from_slice(&[0u8; 48]);
    c.call(opcode::INIT, 0, &init, "INIT");

    let mut lookups = Vec::with_capacity(runs);
    for _ in 0..runs {
        let req = c.request(opcode::LOOKUP, ROOT_ID, &cstr("existing"));
        let (body, took) = c.timed(&req, "LOOKUP");
        let node = u64_at(&body, 0);
        lookups.push(took);
        c.forget(node);
    }
    // Every LOOKUP above was forgotten, so the server dropped the node
    // each time; keep this one.
    let node = u64_at(
        &c.call(opcode::LOOKUP, ROOT_ID, &cstr("existing"), "LOOKUP"),
        0,
    );

    let mut getattrs = Vec::with_capacity(runs);
    for _ in 0..runs {
        let req = c.request(opcode::GETATTR, node, &[0u8; 16]);
        getattrs.push(c.timed(&req, "GETATTR").1);
    }

    let mut creates = Vec::with_capacity(runs);
    for i in 0..runs {
        let mut args = le32(&[libc::O_RDWR as u32, 0o644, 0, 0]);
        args.extend_from_slice(&cstr(&format!("f{i}")));
        let req = c.request(opcode::CREATE, ROOT_ID, &args);
        let (body, took) = c.timed(&req, "CREATE");
        creates.push(took);
        let (created, fh) = (u64_at(&body, 0), u64_at(&body, 128));
        let mut rel = le64(&[fh]);
        rel.extend_from_slice(&le32(&[0, 0]));
        rel.extend_from_slice(&le64(&[0]));
        c.call(opcode::RELEASE, 0, &rel, "RELEASE");
        c.forget(created);
    }

    let mut args = le32(&[libc::O_RDWR as u32, 0o644, 0, 0]);
    args.extend_from_slice(&cstr("big"));
    let body = c.call(opcode::CREATE, ROOT_ID, &args, "CREATE big");
    let fh = u64_at(&body, 128);
    let data = vec![0x5au8; CHUNK];
    let mut writes = Vec::with_capacity(runs);
    for i in 0..runs {
        let mut args = le64(&[fh, (i * CHUNK) as u64]);
        args.extend_from_slice(&le32(&[CHUNK as u32, 0]));
        args.extend_from_slice(&le64(&[0]));
        args.extend_from_slice(&le32(&[0, 0]));
        args.extend_from_slice(&data);
        let req = c.request(opcode::WRITE, 0, &args);
        writes.push(c.timed(&req, "WRITE").1);
    }
    let mut reads = Vec::with_capacity(runs);
    for i in 0..runs {
        let mut args = le64(&[fh, (i * CHUNK) as u64]);
        args.extend_from_slice(&le32(&[CHUNK as u32, 0]));
        args.extend_from_slice(&le64(&[0]));
        args.extend_from_slice(&le32(&[0, 0]));
        let req = c.request(opcode::READ, 0, &args);
        let (body, took) = c.timed(&req, "READ");
        assert_eq!(body.len(), CHUNK, "a short read");
        reads.push(took);
    }

    println!("virtio-fs server, host CPU per request (in-process, real directory, {runs} each)");
    println!("{:<28} {:>9} {:>9}", "request", "p50 µs", "p99 µs");
    row("LOOKUP", &lookups, None);
    row("GETATTR", &getattrs, None);
    row("CREATE (new file)", &creates, None);
    row("WRITE 128 KiB", &writes, Some(CHUNK));
    row("READ 128 KiB (cached)", &reads, Some(CHUNK));
    ExitCode::SUCCESS
}
