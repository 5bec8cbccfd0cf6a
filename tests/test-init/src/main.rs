//! A tiny init for the VMM's end-to-end test, run as PID 1 in the guest.
//! It exercises what the test checks from the host:
//! 1. writes the "init" boot marker (MMIO through /dev/mem);
//! 2. reads the whole of /dev/vdb and hashes it;
//! 3. dials the host over vsock (port 1234), reports the hash, and answers
//!    the host's nonce;
//! 4. listens on vsock port 5001 and echoes one line to a host-initiated
//!    connection;
//! 5. serves the host: dials host port 1234 again and again (so a VM
//!    restored from a snapshot, whose old connection was reset, comes back
//!    on its new socket) and answers `write <word>` (appends to a tmpfs
//!    file), `read`, `flood <n>` (writes n boot marks, every value in
//!    turn, as a hostile guest would) and `reboot`.
//!
//! Built static (`-C target-feature=+crt-static`); only libc is used.
//! Failures are printed to the console and end in a reboot too: the host
//! test then sees the missing steps.

// Test code: a failed step panics with its message. (The workspace denies
// unwrap and expect outside tests.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::ffi::CString;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};

const BOOT_MARKER_MMIO: libc::off_t = 0xd000_0000;
const MARK_INIT: u8 = 2;
const HOST_CID: u32 = 2;
const REPORT_PORT: u32 = 1234;
const ECHO_PORT: u32 = 5001;

fn say(msg: &str) {
    let _ = std::io::stdout().write_all(format!("thaw-test-init: {msg}\n").as_bytes());
}

fn mark_init() -> Result<(), String> {
    write_marks(&[MARK_INIT])
}

/// Writes each byte of `marks` to the boot-marker page, in order.
fn write_marks(marks: &[u8]) -> Result<(), String> {
    let path = CString::new("/dev/mem").map_err(|e| e.to_string())?;
    // SAFETY: plain syscalls; the mapping is used only for one volatile write.
    unsafe {
        let fd = libc::open(path.as_ptr(), libc::O_RDWR | libc::O_SYNC);
        if fd < 0 {
            return Err(format!(
                "open /dev/mem: {}",
                std::io::Error::last_os_error()
            ));
        }
        let p = libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd,
            BOOT_MARKER_MMIO,
        );
        libc::close(fd);
        if p == libc::MAP_FAILED {
            return Err(format!("mmap marker: {}", std::io::Error::last_os_error()));
        }
        for m in marks {
            (p as *mut u8).write_volatile(*m);
        }
        libc::munmap(p, 4096);
    }
    Ok(())
}

fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
    })
}

fn vsock_socket() -> Result<OwnedFd, String> {
    // SAFETY: socket(2) returns a new fd or -1.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(format!("vsock socket: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: fd is a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn vsock_addr(cid: u32, port: u32) -> libc::sockaddr_vm {
    // SAFETY: sockaddr_vm is plain data; zero is a valid start.
    let mut a: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    a.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    a.svm_cid = cid;
    a.svm_port = port;
    a
}

fn connect_host(port: u32) -> Result<std::fs::File, String> {
    use std::os::fd::AsRawFd;
    let fd = vsock_socket()?;
    let addr = vsock_addr(HOST_CID, port);
    let len = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;
    // SAFETY: addr is a valid sockaddr_vm of `len` bytes.
    let r = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            &addr as *const _ as *const libc::sockaddr,
            len,
        )
    };
    if r < 0 {
        return Err(format!(
            "vsock connect to host port {port}: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(std::fs::File::from(fd))
}

fn listen(port: u32) -> Result<OwnedFd, String> {
    use std::os::fd::AsRawFd;
    let fd = vsock_socket()?;
    let addr = vsock_addr(libc::VMADDR_CID_ANY, port);
    let len = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;
    // SAFETY: addr is a valid sockaddr_vm of `len` bytes.
    unsafe {
        if libc::bind(
            fd.as_raw_fd(),
            &addr as *const _ as *const libc::sockaddr,
            len,
        ) < 0
            || libc::listen(fd.as_raw_fd(), 1) < 0
        {
            return Err(format!(
                "vsock listen {port}: {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    Ok(fd)
}

fn accept(listener: &OwnedFd) -> Result<std::fs::File, String> {
    use std::os::fd::AsRawFd;
    // SAFETY: accept(2) on a listening socket.
    let fd = unsafe {
        libc::accept(
            listener.as_raw_fd(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
        )
    };
    if fd < 0 {
        return Err(format!("vsock accept: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: fd is a fresh descriptor we own.
    Ok(std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}

fn steps() -> Result<(), String> {
    mark_init()?;
    say("marker written");
    let mut disk = Vec::new();
    std::fs::File::open("/dev/vdb")
        .and_then(|mut f| f.read_to_end(&mut disk))
        .map_err(|e| format!("read /dev/vdb: {e}"))?;
    say(&format!("read {} bytes from /dev/vdb", disk.len()));

    // Listen first, so the host may connect as soon as it hears from us.
    let listener = listen(ECHO_PORT)?;
    let conn = connect_host(REPORT_PORT)?;
    let mut w = conn.try_clone().map_err(|e| e.to_string())?;
    writeln!(w, "disk {} {:016x}", disk.len(), fnv1a(&disk)).map_err(|e| e.to_string())?;
    let mut line = String::new();
    BufReader::new(conn)
        .read_line(&mut line)
        .map_err(|e| e.to_string())?;
    let nonce = line
        .trim()
        .strip_prefix("nonce ")
        .ok_or(format!("bad host line {line:?}"))?;
    writeln!(w, "ack {nonce}").map_err(|e| e.to_string())?;
    say("reported to the host");

    let echo = accept(&listener)?;
    let mut line = String::new();
    let mut ew = echo.try_clone().map_err(|e| e.to_string())?;
    BufReader::new(echo)
        .read_line(&mut line)
        .map_err(|e| e.to_string())?;
    write!(ew, "echo {line}").map_err(|e| e.to_string())?;
    say("echoed the host's line");
    serve_forever()
}

/// Appends to a file on a fresh tmpfs: each VM's writes are its own.
const NOTES: &str = "/run/notes";

fn mount_run_tmpfs() -> Result<(), String> {
    let src = CString::new("tmpfs").map_err(|e| e.to_string())?;
    let dst = CString::new("/run").map_err(|e| e.to_string())?;
    // SAFETY: mount(2) with valid C strings.
    let r = unsafe {
        libc::mount(
            src.as_ptr(),
            dst.as_ptr(),
            src.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if r < 0 {
        return Err(format!(
            "mount tmpfs on /run: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

fn serve(conn: std::fs::File) -> Result<(), String> {
    let mut w = conn.try_clone().map_err(|e| e.to_string())?;
    let mut r = BufReader::new(conn);
    writeln!(w, "ready").map_err(|e| e.to_string())?;
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).map_err(|e| e.to_string())? == 0 {
            return Err("host closed".into());
        }
        let line = line.trim();
        if let Some(word) = line.strip_prefix("write ") {
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(NOTES)
                .map_err(|e| e.to_string())?;
            write!(f, "{word} ").map_err(|e| e.to_string())?;
            writeln!(w, "ok").map_err(|e| e.to_string())?;
        } else if line == "read" {
            let notes = std::fs::read_to_string(NOTES).unwrap_or_default();
            writeln!(w, "notes {}", notes.trim()).map_err(|e| e.to_string())?;
        } else if let Some(n) = line.strip_prefix("flood ") {
            // A hostile guest: every marker value, over and over.
            let n: usize = n.parse().map_err(|e| format!("flood {n}: {e}"))?;
            let marks: Vec<u8> = (0..n).map(|i| i as u8).collect();
            write_marks(&marks)?;
            writeln!(w, "flooded {n}").map_err(|e| e.to_string())?;
        } else if line == "reboot" {
            return Ok(());
        } else {
            writeln!(w, "unknown {line}").map_err(|e| e.to_string())?;
        }
    }
}

fn serve_forever() -> Result<(), String> {
    mount_run_tmpfs()?;
    loop {
        match connect_host(REPORT_PORT) {
            Ok(conn) => match serve(conn) {
                Ok(()) => return Ok(()),
                // A reset (e.g. after a restore) or a closed host: dial again.
                Err(e) => say(&format!("connection ended: {e}; dialing again")),
            },
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(50)),
        }
    }
}

fn main() {
    if let Err(e) = steps() {
        say(&format!("FAILED: {e}"));
    }
    // SAFETY: flush the page cache, then reboot; the VMM sees the reset.
    unsafe {
        libc::sync();
        libc::reboot(libc::RB_AUTOBOOT);
    }
    loop {
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
}
