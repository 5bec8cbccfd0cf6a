//! One boot, timed: under thaw-vmm (marks from its stderr, memory from its
//! control socket) or under QEMU's microvm (the baseline: time until the
//! test init's first console line).

use std::io::{BufRead, BufReader, Read};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use thaw_vmm_api::{BootArgs, Disk, Serial, VmmClient, VmmCommand};

use crate::Error;

/// The line thaw-vmm prints for each boot mark: `thaw-vmm: mark <name> <µs> us`.
pub fn parse_mark(line: &str) -> Option<(String, u64)> {
    let rest = line.trim().strip_prefix("thaw-vmm: mark ")?;
    let mut words = rest.split_whitespace();
    let name = words.next()?;
    let micros = words.next()?.parse().ok()?;
    (words.next() == Some("us")).then(|| (name.to_string(), micros))
}

/// Kills and reaps the child on every path out of a boot.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

/// Lines of `r`, each with the instant it arrived, until EOF.
fn timed_lines(r: impl Read + Send + 'static) -> mpsc::Receiver<(String, Instant)> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(r).lines() {
            let Ok(line) = line else { return };
            if tx.send((line, Instant::now())).is_err() {
                return;
            }
        }
    });
    rx
}

fn tail(text: &str, lines: usize) -> String {
    let v: Vec<&str> = text.lines().collect();
    v[v.len().saturating_sub(lines)..].join("\n")
}

pub struct ThawOptions<'a> {
    pub vmm: &'a Path,
    pub kernel: &'a Path,
    pub root: &'a Path,
    pub data: &'a Path,
    /// Sockets and the console log go here.
    pub work: &'a Path,
    pub memory_mib: u32,
    pub deadline: Duration,
}

#[derive(Debug, Clone)]
pub struct ThawBoot {
    /// (mark, µs since the VMM process started), as the VMM printed them.
    pub marks: Vec<(String, u64)>,
    /// From spawning the VMM to reading its init mark.
    pub spawn_to_init: Duration,
    pub vmm_rss_kib: u64,
    pub guest_rss_kib: u64,
    /// The guest command line the VMM used (its info log).
    pub cmdline: Option<String>,
}

impl ThawBoot {
    pub fn mark(&self, name: &str) -> Option<u64> {
        self.marks.iter().find(|(n, _)| n == name).map(|&(_, m)| m)
    }
}

/// Boots to the init mark, reads the VMM's memory use while the guest runs
/// (the test init then waits on its vsock connection, which this function
/// accepts into a backlog and never answers), and stops the VM.
pub fn boot_thaw(o: &ThawOptions<'_>) -> Result<ThawBoot, Error> {
    let uds = o.work.join("vsock.sock");
    let api = o.work.join("api.sock");
    let console = o.work.join("console.log");
    let report_path = PathBuf::from(format!("{}_1234", uds.display()));
    let _ = std::fs::remove_file(&report_path);
    let _report = UnixListener::bind(&report_path).map_err(Error::io("binding the vsock port"))?;

    let started = Instant::now();
    let boot = VmmCommand::Boot(BootArgs {
        disks: vec![Disk::read_only(o.root), Disk::read_only(o.data)],
        vsock_uds: Some(uds.clone()),
        api_sock: Some(api.clone()),
        serial: Serial::File(console.clone()),
        memory_mib: o.memory_mib,
        ..BootArgs::new(o.kernel)
    });
    let mut child = boot
        .command(o.vmm)
        .env("THAW_VMM_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(Error::io(format!("starting {}", o.vmm.display())))?;
    let stderr = child.stderr.take();
    let mut child = Reaped(child);
    let lines = timed_lines(stderr.ok_or_else(|| Error::Boot("no VMM stderr".into()))?);

    let mut seen = String::new();
    let mut marks = Vec::new();
    let mut cmdline = None;
    let spawn_to_init = loop {
        let left = o.deadline.saturating_sub(started.elapsed());
        let (line, at) = match lines.recv_timeout(left) {
            Ok(l) => l,
            Err(e) => {
                let why = match e {
                    mpsc::RecvTimeoutError::Timeout => {
                        format!("no init mark within {:?}", o.deadline)
                    }
                    mpsc::RecvTimeoutError::Disconnected => {
                        "the VMM exited before the init mark".into()
                    }
                };
                let con = std::fs::read_to_string(&console).unwrap_or_default();
                return Err(Error::Boot(format!(
                    "{why}\nVMM stderr:\n{}\nconsole (tail):\n{}",
                    tail(&seen, 20),
                    tail(&con, 20)
                )));
            }
        };
        seen += &line;
        seen.push('\n');
        if let Some(c) = line.split_once("guest command line: ").map(|(_, c)| c) {
            cmdline = Some(c.trim().to_string());
        }
        if let Some(m) = parse_mark(&line) {
            let is_init = m.0 == "init";
            marks.push(m);
            if is_init {
                break at.duration_since(started);
            }
        }
    };

    let vmm = VmmClient::new(&api, Duration::from_secs(30));
    let status = vmm.status()?;
    // Best effort: the guard kills the VMM if it does not stop by itself.
    let _ = vmm.stop();
    let stop_deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < stop_deadline {
        if let Ok(Some(_)) = child.0.try_wait() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(ThawBoot {
        marks,
        spawn_to_init,
        vmm_rss_kib: status.vmm_rss_kib,
        guest_rss_kib: status.guest_rss_kib,
        cmdline,
    })
}

pub struct QemuOptions<'a> {
    pub kernel: &'a Path,
    pub root: &'a Path,
    pub data: &'a Path,
    /// thaw's guest command line without its virtio_mmio words: QEMU's
    /// microvm adds its own for the devices it creates.
    pub cmdline: &'a str,
    pub memory_mib: u32,
    /// PVM hosts: a small CPU model (qemu64 plus TSC-deadline and x2APIC)
    /// instead of `-cpu host`, whose features the PVM guest cannot all run.
    pub pvm: bool,
    pub deadline: Duration,
}

pub const QEMU: &str = "qemu-system-x86_64";

/// The test init's first line on the console; it comes right after the
/// init mark, which QEMU does not see.
const INIT_LINE: &str = "thaw-test-init:";

/// Boots QEMU's microvm on the same kernel, root image and command line
/// and returns the time from spawn to the test init's first console line.
pub fn boot_qemu(o: &QemuOptions<'_>) -> Result<Duration, Error> {
    let cpu = if o.pvm {
        "qemu64,+tsc-deadline,+x2apic,+hypervisor,+xsaveerptr"
    } else {
        "host"
    };
    let drive = |path: &Path, id: &str| {
        format!(
            "file={},if=none,id={id},format=raw,readonly=on",
            path.display()
        )
    };
    let started = Instant::now();
    let mut child = Command::new(QEMU)
        .args([
            "-M",
            "microvm,x-option-roms=off,isa-serial=on,rtc=off,acpi=off",
        ])
        .args(["-enable-kvm", "-cpu", cpu, "-smp", "1"])
        .args(["-m", &o.memory_mib.to_string()])
        .args(["-nodefaults", "-no-user-config", "-display", "none"])
        .args(["-serial", "stdio", "-no-reboot"])
        .arg("-kernel")
        .arg(o.kernel)
        .args(["-append", o.cmdline])
        .args(["-drive", &drive(o.root, "root")])
        .args(["-device", "virtio-blk-device,drive=root"])
        .args(["-drive", &drive(o.data, "data")])
        .args(["-device", "virtio-blk-device,drive=data"])
        .args(["-device", "virtio-rng-device"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(Error::io(format!("starting {QEMU}")))?;
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let mut child = Reaped(child);
    let lines = timed_lines(stdout.ok_or_else(|| Error::Boot("no QEMU stdout".into()))?);
    let mut seen = String::new();
    loop {
        let left = o.deadline.saturating_sub(started.elapsed());
        match lines.recv_timeout(left) {
            Ok((line, at)) => {
                if line.contains(INIT_LINE) {
                    let _ = child.0.kill();
                    return Ok(at.duration_since(started));
                }
                seen += &line;
                seen.push('\n');
            }
            Err(e) => {
                let _ = child.0.kill();
                let mut err = String::new();
                if let Some(mut s) = stderr {
                    let _ = s.read_to_string(&mut err);
                }
                return Err(Error::Boot(format!(
                    "QEMU: no test init line ({e:?})\nstderr:\n{}\nconsole (tail):\n{}",
                    tail(&err, 10),
                    tail(&seen, 20)
                )));
            }
        }
    }
}

/// thaw's command line for QEMU: its virtio_mmio words dropped.
pub fn cmdline_for_qemu(thaw_cmdline: &str) -> String {
    thaw_cmdline
        .split_whitespace()
        .filter(|w| !w.starts_with("virtio_mmio.device="))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_are_parsed_and_other_lines_are_not() {
        assert_eq!(
            parse_mark("thaw-vmm: mark kernel-entry 16078 us"),
            Some(("kernel-entry".into(), 16078))
        );
        assert_eq!(parse_mark("thaw-vmm: mark init 12x us"), None);
        assert_eq!(parse_mark("thaw-vmm: mark init 12"), None);
        assert_eq!(parse_mark("thaw-vmm: guest requested reset"), None);
    }

    #[test]
    fn qemu_gets_the_command_line_without_thaws_devices() {
        let c = "console=ttyS0 quiet virtio_mmio.device=4K@0xd0001000:5 root=/dev/vda ro";
        assert_eq!(cmdline_for_qemu(c), "console=ttyS0 quiet root=/dev/vda ro");
    }
}
