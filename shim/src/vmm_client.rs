//! The thaw-vmm command line and its control socket (`--api-sock`):
//! newline-delimited JSON, one request and one reply line per connection
//! round trip: `{"op":"status"}` -> `{"ok":true,...}` or
//! `{"ok":false,"error":"..."}`. Everything VMM-specific the shim knows
//! lives in this module.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};

use crate::config::VmConfig;
use crate::error::{Error, Result};

/// A reply line longer than this is a broken VMM, not a reply.
const MAX_REPLY: u64 = 1 << 20;

/// Where one VM's files live.
#[derive(Debug, Clone)]
pub struct VmPaths {
    pub vsock_uds: PathBuf,
    pub api_sock: PathBuf,
    /// Guest console when `serial` is "file" (relative names resolve here).
    pub serial: String,
}

/// The `thaw-vmm` invocation for one sandbox.
pub fn command(vm: &VmConfig, paths: &VmPaths) -> Command {
    let mut c = Command::new(&vm.vmm);
    c.arg("--kernel")
        .arg(&vm.kernel)
        .arg("--disk")
        .arg(format!("{},ro", vm.root_image.display()))
        .arg("--spare-disks")
        .arg(vm.spare_disks.to_string())
        .arg("--vsock-uds")
        .arg(&paths.vsock_uds)
        .arg("--vcpus")
        .arg(vm.vcpus.to_string())
        .arg("--memory-mib")
        .arg(vm.memory_mib.to_string())
        .arg("--serial")
        .arg(&paths.serial)
        .arg("--api-sock")
        .arg(&paths.api_sock);
    if !vm.kernel_append.is_empty() {
        c.arg("--append").arg(&vm.kernel_append);
    }
    c
}

/// `thaw-vmm template build`: boots the template once (or finds it built)
/// and prints its snapshot directory on the last line.
pub fn template_build_command(vm: &VmConfig) -> Command {
    let mut c = Command::new(&vm.vmm);
    c.arg("template")
        .arg("build")
        .arg("--kernel")
        .arg(&vm.kernel)
        .arg("--disk")
        .arg(&vm.root_image)
        .arg("--spare-disks")
        .arg(vm.spare_disks.to_string())
        .arg("--vcpus")
        .arg(vm.vcpus.to_string())
        .arg("--memory-mib")
        .arg(vm.memory_mib.to_string())
        .arg("--timeout")
        .arg(vm.template_build_timeout_secs.to_string())
        .arg("--retry-after")
        .arg(vm.template_retry_secs.to_string())
        .arg("--store")
        .arg(&vm.template_store);
    c
}

/// The `thaw-vmm` invocation resuming a template snapshot: new sockets,
/// the same root disk; the spare slots come from the snapshot.
pub fn restore_command(vm: &VmConfig, template: &Path, paths: &VmPaths) -> Command {
    let mut c = Command::new(&vm.vmm);
    c.arg("--restore")
        .arg(template)
        .arg("--disk")
        .arg(format!("{},ro", vm.root_image.display()))
        .arg("--vsock-uds")
        .arg(&paths.vsock_uds)
        .arg("--serial")
        .arg(&paths.serial)
        .arg("--api-sock")
        .arg(&paths.api_sock);
    c
}

/// The guest device name of spare disk `slot` (disk 0 is /dev/vda).
pub fn guest_device(slot: u32) -> String {
    let n = slot + 1;
    // vda..vdz, then vdaa.. as Linux names them.
    let mut name = String::new();
    let mut i = n as i64;
    loop {
        name.insert(0, (b'a' + (i % 26) as u8) as char);
        i = i / 26 - 1;
        if i < 0 {
            break;
        }
    }
    format!("/dev/vd{name}")
}

#[derive(Debug, Clone)]
pub struct VmmClient {
    api_sock: PathBuf,
    timeout: Duration,
}

impl VmmClient {
    pub fn new(api_sock: &Path, timeout: Duration) -> Self {
        VmmClient {
            api_sock: api_sock.to_path_buf(),
            timeout,
        }
    }

    /// Sends one request and returns the reply object (with `ok: true`).
    pub fn request(&self, req: &Value) -> Result<Value> {
        let op = req
            .get("op")
            .and_then(Value::as_str)
            .unwrap_or("?")
            .to_string();
        let fail = |m: String| Error::Vmm(format!("{op}: {m}"));
        let mut s = UnixStream::connect(&self.api_sock)
            .map_err(|e| fail(format!("connecting to {}: {e}", self.api_sock.display())))?;
        s.set_read_timeout(Some(self.timeout))
            .and_then(|_| s.set_write_timeout(Some(self.timeout)))
            .map_err(|e| fail(e.to_string()))?;
        let mut line = serde_json::to_vec(req).map_err(|e| fail(e.to_string()))?;
        line.push(b'\n');
        s.write_all(&line)
            .map_err(|e| fail(format!("sending: {e}")))?;
        let mut reply = String::new();
        BufReader::new((&s).take(MAX_REPLY))
            .read_line(&mut reply)
            .map_err(|e| fail(format!("reading reply: {e}")))?;
        if reply.trim().is_empty() {
            return Err(fail("VMM closed the connection without a reply".into()));
        }
        let v: Value = serde_json::from_str(reply.trim())
            .map_err(|e| fail(format!("bad reply {:?}: {e}", reply.trim())))?;
        if v.get("ok").and_then(Value::as_bool) == Some(true) {
            Ok(v)
        } else {
            let msg = v
                .get("error")
                .and_then(Value::as_str)
                .unwrap_or("VMM reported failure without a message");
            Err(fail(msg.to_string()))
        }
    }

    #[allow(dead_code)] // for the snapshot/restore flow
    pub fn status(&self) -> Result<Value> {
        self.request(&json!({"op": "status"}))
    }

    #[allow(dead_code)] // for the snapshot/restore flow
    pub fn pause(&self) -> Result<()> {
        self.request(&json!({"op": "pause"})).map(|_| ())
    }

    #[allow(dead_code)] // for the snapshot/restore flow
    pub fn resume(&self) -> Result<()> {
        self.request(&json!({"op": "resume"})).map(|_| ())
    }

    pub fn stop(&self) -> Result<()> {
        self.request(&json!({"op": "stop"})).map(|_| ())
    }

    pub fn attach_disk(&self, slot: u32, path: &Path, read_only: bool) -> Result<()> {
        self.request(&json!({
            "op": "attach_disk",
            "slot": slot,
            "path": path,
            "read_only": read_only,
        }))
        .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    /// A fake control socket answering each request line with `reply(req)`.
    fn fake_vmm(dir: &Path, reply: fn(&Value) -> String) -> PathBuf {
        let path = dir.join("api.sock");
        let l = UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            for s in l.incoming().flatten() {
                let mut r = BufReader::new(&s);
                let mut line = String::new();
                if r.read_line(&mut line).is_ok() && !line.is_empty() {
                    let req: Value = serde_json::from_str(&line).unwrap();
                    let mut out = reply(&req);
                    out.push('\n');
                    let _ = (&s).write_all(out.as_bytes());
                }
            }
        });
        path
    }

    #[test]
    fn attach_disk_sends_the_documented_request() {
        let d = tempfile::tempdir().unwrap();
        let sock = fake_vmm(d.path(), |req| {
            if req["op"] == "attach_disk"
                && req["slot"] == 2
                && req["path"] == "/x.erofs"
                && req["read_only"] == true
            {
                r#"{"ok":true}"#.into()
            } else {
                format!(r#"{{"ok":false,"error":"unexpected {req}"}}"#)
            }
        });
        let c = VmmClient::new(&sock, Duration::from_secs(5));
        c.attach_disk(2, Path::new("/x.erofs"), true).unwrap();
    }

    #[test]
    fn errors_carry_the_vmm_message() {
        let d = tempfile::tempdir().unwrap();
        let sock = fake_vmm(d.path(), |_| {
            r#"{"ok":false,"error":"slot 9 out of range"}"#.into()
        });
        let c = VmmClient::new(&sock, Duration::from_secs(5));
        let e = c
            .attach_disk(9, Path::new("/x"), true)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("attach_disk") && e.contains("slot 9 out of range"),
            "{e}"
        );
    }

    #[test]
    fn garbage_and_silence_are_errors_not_hangs() {
        let d = tempfile::tempdir().unwrap();
        let sock = fake_vmm(d.path(), |_| "not json".into());
        let c = VmmClient::new(&sock, Duration::from_secs(5));
        assert!(c.status().is_err());

        let d2 = tempfile::tempdir().unwrap();
        let path = d2.path().join("api.sock");
        let l = UnixListener::bind(&path).unwrap();
        let t = std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            std::thread::sleep(Duration::from_secs(2));
            drop(s);
        });
        let c = VmmClient::new(&path, Duration::from_millis(300));
        let start = std::time::Instant::now();
        assert!(c.status().is_err());
        assert!(start.elapsed() < Duration::from_secs(2));
        t.join().unwrap();
    }

    #[test]
    fn template_commands_match_the_vmm_cli() {
        let vm = VmConfig::default();
        let args = |c: Command| -> String {
            c.get_args()
                .map(|a| a.to_string_lossy().to_string())
                .collect::<Vec<_>>()
                .join(" ")
        };
        let b = args(template_build_command(&vm));
        assert!(b.starts_with("template build --kernel"), "{b}");
        assert!(
            b.contains("--spare-disks 8") && b.contains("--timeout 90"),
            "{b}"
        );
        assert!(b.contains("--store /var/lib/thaw/templates"), "{b}");
        let p = VmPaths {
            vsock_uds: "/r/v.sock".into(),
            api_sock: "/r/api.sock".into(),
            serial: "none".into(),
        };
        let r = args(restore_command(&vm, Path::new("/t/abc"), &p));
        assert!(
            r.starts_with("--restore /t/abc --disk /usr/local/share/thaw/root.img,ro"),
            "{r}"
        );
        assert!(
            r.contains("--vsock-uds /r/v.sock") && r.contains("--api-sock /r/api.sock"),
            "{r}"
        );
    }

    #[test]
    fn guest_device_names() {
        assert_eq!(guest_device(0), "/dev/vdb");
        assert_eq!(guest_device(24), "/dev/vdz");
        assert_eq!(guest_device(25), "/dev/vdaa");
    }

    #[test]
    fn command_line_matches_the_vmm_cli() {
        let vm = VmConfig::default();
        let p = VmPaths {
            vsock_uds: "/run/s/v.sock".into(),
            api_sock: "/run/s/api.sock".into(),
            serial: "none".into(),
        };
        let c = command(&vm, &p);
        let args: Vec<_> = c
            .get_args()
            .map(|a| a.to_string_lossy().to_string())
            .collect();
        let s = args.join(" ");
        assert!(
            s.contains("--disk /usr/local/share/thaw/root.img,ro"),
            "{s}"
        );
        assert!(s.contains("--vsock-uds /run/s/v.sock"), "{s}");
        assert!(s.contains("--spare-disks 8"), "{s}");
        assert!(!s.contains("--append"), "{s}");
    }
}
