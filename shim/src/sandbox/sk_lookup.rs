//! Steering every TCP connection to 127.0.0.1 in a network namespace, on
//! any port, to one listening socket, with a BPF `sk_lookup` program
//! (Linux 5.9+). The accepted connection's local address keeps the port
//! the client dialed, so one listener serves them all.
//!
//! This is how CRI's PortForward reaches the guest: containerd dials
//! `localhost:<port>` inside the pod's network namespace, where nothing of
//! the pod listens (the pod's processes are in the VM). Any other way
//! needs a listener per port, known in advance, or NAT rules.
//!
//! The program is 20 instructions, assembled here: a BPF toolchain (clang
//! with the bpf target, or aya's bpf-linker) is not something a runtime
//! should need at build time, and libbpf-rs would add a C library to load
//! them. The attachment is a BPF link owned by the returned descriptor:
//! closing it (the shim exits, however it ends) detaches the program.

use std::io;
use std::net::TcpListener;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_MAP_TYPE_SOCKMAP: u32 = 15;
const BPF_PROG_TYPE_SK_LOOKUP: u32 = 30;
const BPF_SK_LOOKUP: u32 = 36;

/// Helper function ids (linux/bpf.h `__BPF_FUNC_MAPPER`).
const HELPER_MAP_LOOKUP_ELEM: i32 = 1;
const HELPER_SK_RELEASE: i32 = 86;
const HELPER_SK_ASSIGN: i32 = 124;

/// Offsets in `struct bpf_sk_lookup`.
const CTX_PROTOCOL: i16 = 12;
const CTX_LOCAL_IP4: i16 = 40;

/// 127.0.0.1 as the context holds it (network order, loaded as a
/// little-endian word).
const LOOPBACK_IP4: i32 = i32::from_le_bytes([127, 0, 0, 1]);
const SK_PASS: i32 = 1;

/// One BPF instruction (`struct bpf_insn`).
#[repr(C)]
#[derive(Clone, Copy)]
struct Insn {
    code: u8,
    regs: u8,
    off: i16,
    imm: i32,
}

fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        regs: (src << 4) | (dst & 0x0f),
        off,
        imm,
    }
}

// Opcodes used below (class | size/op | source).
const MOV64_REG: u8 = 0xbf;
const MOV64_IMM: u8 = 0xb7;
const ADD64_IMM: u8 = 0x07;
const LDX_W: u8 = 0x61;
const ST_W: u8 = 0x62;
const JNE_IMM: u8 = 0x55;
const JEQ_IMM: u8 = 0x15;
const LD_IMM64: u8 = 0x18;
const CALL: u8 = 0x85;
const EXIT: u8 = 0x95;
/// `src` of a 64-bit immediate load that names a map by descriptor.
const PSEUDO_MAP_FD: u8 = 1;

/// If the lookup is TCP to 127.0.0.1, select the socket in slot 0 of the
/// map; let every other lookup go on as usual.
fn program(map_fd: RawFd) -> Vec<Insn> {
    let (r0, r1, r2, r3, r6, r7, r10) = (0, 1, 2, 3, 6, 7, 10);
    let mut p = vec![
        insn(MOV64_REG, r6, r1, 0, 0),
        insn(LDX_W, r2, r6, CTX_PROTOCOL, 0),
        insn(JNE_IMM, r2, 0, 0, libc::IPPROTO_TCP), // -> pass (patched)
        insn(LDX_W, r2, r6, CTX_LOCAL_IP4, 0),
        insn(JNE_IMM, r2, 0, 0, LOOPBACK_IP4), // -> pass (patched)
        insn(ST_W, r10, 0, -4, 0),
        insn(MOV64_REG, r2, r10, 0, 0),
        insn(ADD64_IMM, r2, 0, 0, -4),
        insn(LD_IMM64, r1, PSEUDO_MAP_FD, 0, map_fd),
        insn(0, 0, 0, 0, 0),
        insn(CALL, 0, 0, 0, HELPER_MAP_LOOKUP_ELEM),
        insn(JEQ_IMM, r0, 0, 0, 0), // -> pass (patched)
        insn(MOV64_REG, r7, r0, 0, 0),
        insn(MOV64_REG, r1, r6, 0, 0),
        insn(MOV64_REG, r2, r7, 0, 0),
        insn(MOV64_IMM, r3, 0, 0, 0),
        insn(CALL, 0, 0, 0, HELPER_SK_ASSIGN),
        insn(MOV64_REG, r1, r7, 0, 0),
        insn(CALL, 0, 0, 0, HELPER_SK_RELEASE),
    ];
    let pass = p.len();
    p.push(insn(MOV64_IMM, r0, 0, 0, SK_PASS));
    p.push(insn(EXIT, 0, 0, 0, 0));
    for at in [2usize, 4, 11] {
        p[at].off = (pass - at - 1) as i16;
    }
    p
}

fn bpf(cmd: libc::c_long, attr: &mut [u64; 16]) -> io::Result<OwnedFd> {
    // SAFETY: `attr` is a zero-padded `union bpf_attr` prefix of 128
    // bytes, as large as the kernel reads for these commands; pointers in
    // it refer to buffers that outlive the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.as_mut_ptr(),
            std::mem::size_of_val(attr),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: these commands return a new descriptor we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(rc as RawFd) })
}

fn words(a: u32, b: u32) -> u64 {
    u64::from(a) | (u64::from(b) << 32)
}

/// An attached steering program; dropping it detaches it.
#[derive(Debug)]
pub struct Steering {
    _link: OwnedFd,
    _map: OwnedFd,
}

/// Steers TCP connections to 127.0.0.1:* in the network namespace
/// `netns` (a descriptor of it) to `listener`, which must be a TCP socket
/// listening in that namespace.
pub fn steer_loopback(netns: RawFd, listener: &TcpListener) -> io::Result<Steering> {
    let what = |step: &str, e: io::Error| io::Error::new(e.kind(), format!("{step}: {e}"));
    let mut attr = [0u64; 16];
    attr[0] = words(BPF_MAP_TYPE_SOCKMAP, 4); // map_type, key_size
    attr[1] = words(4, 1); // value_size (a descriptor), max_entries
    let map = bpf(BPF_MAP_CREATE, &mut attr).map_err(|e| what("creating a BPF sockmap", e))?;

    let key = 0u32;
    let value = listener.as_raw_fd() as u32;
    let mut attr = [0u64; 16];
    attr[0] = u64::from(map.as_raw_fd() as u32);
    attr[1] = std::ptr::addr_of!(key) as u64;
    attr[2] = std::ptr::addr_of!(value) as u64;
    // BPF_MAP_UPDATE_ELEM returns 0, not a descriptor.
    // SAFETY: as in `bpf`; key and value live until the call returns.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_UPDATE_ELEM,
            attr.as_mut_ptr(),
            std::mem::size_of_val(&attr),
        )
    };
    if rc < 0 {
        return Err(what(
            "putting the listener in the sockmap",
            io::Error::last_os_error(),
        ));
    }

    let insns = program(map.as_raw_fd());
    let license = c"Dual BSD/GPL";
    let mut log = vec![0u8; 4096];
    let mut attr = [0u64; 16];
    attr[0] = words(BPF_PROG_TYPE_SK_LOOKUP, insns.len() as u32);
    attr[1] = insns.as_ptr() as u64;
    attr[2] = license.as_ptr() as u64;
    attr[3] = words(1, log.len() as u32); // log_level, log_size
    attr[4] = log.as_mut_ptr() as u64;
    attr[8] = words(0, BPF_SK_LOOKUP); // prog_ifindex, expected_attach_type
    let prog = bpf(BPF_PROG_LOAD, &mut attr).map_err(|e| {
        let end = log.iter().position(|b| *b == 0).unwrap_or(log.len());
        let verifier = String::from_utf8_lossy(&log[..end]);
        what(
            &format!(
                "loading the sk_lookup program (verifier: {})",
                verifier.trim()
            ),
            e,
        )
    })?;

    let mut attr = [0u64; 16];
    attr[0] = words(prog.as_raw_fd() as u32, netns as u32);
    attr[1] = words(BPF_SK_LOOKUP, 0);
    let link = bpf(BPF_LINK_CREATE, &mut attr)
        .map_err(|e| what("attaching the sk_lookup program to the namespace", e))?;
    Ok(Steering {
        _link: link,
        _map: map,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpStream;

    /// In a private network namespace: connections to two arbitrary
    /// loopback ports land on one listener, which sees each port.
    #[test]
    fn every_loopback_port_reaches_the_one_listener() {
        std::thread::spawn(|| {
            // SAFETY: unshare affects this thread only.
            assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0);
            let mut nl = thaw_netlink::Netlink::open().unwrap();
            let lo = nl.link_by_name("lo").unwrap();
            nl.set_up(lo.index).unwrap();
            let ns = std::fs::File::open("/proc/thread-self/ns/net").unwrap();
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let steering = steer_loopback(ns.as_raw_fd(), &listener).unwrap();
            for port in [7000u16, 43210] {
                let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
                let (mut s, _) = listener.accept().unwrap();
                assert_eq!(s.local_addr().unwrap().port(), port);
                c.write_all(b"x").unwrap();
                let mut b = [0u8; 1];
                s.read_exact(&mut b).unwrap();
            }
            drop(steering);
            // Detached: nothing listens on that port any more.
            assert!(TcpStream::connect(("127.0.0.1", 7000)).is_err());
        })
        .join()
        .unwrap();
    }
}
