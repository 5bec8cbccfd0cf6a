//! The control socket: newline-delimited JSON requests, one JSON reply line
//! each. The shim (and the snapshot code) drive a running VM through it.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::mpsc::Sender;
use std::sync::Arc;

use thaw_vmm_api::wire::MAX_REQUEST_LINE;
use thaw_vmm_api::{Reply, Request, RunState, SnapshotSaved, Status};

use crate::boot_marker::BootTimes;
use crate::snapshot::{PauseResumeError, SnapshotError};
use crate::vcpu::VmExit;
use crate::vm::AttachError;

/// What a request can act on. Implemented by the running VMM; a trait so
/// the request handling is testable without a VM.
pub trait VmControl: Send + Sync {
    fn pause(&self) -> Result<(), PauseResumeError>;
    fn resume(&self) -> Result<(), PauseResumeError>;
    fn stop(&self);
    fn status(&self) -> Status;
    fn attach_disk(&self, slot: usize, path: &Path, read_only: bool) -> Result<(), AttachError>;
    fn attach_tap(&self, name: &str) -> Result<(), AttachError>;
    fn attach_share(&self, dir: &Path, read_only: bool) -> Result<(), AttachError>;
    fn snapshot(&self, dir: &Path) -> Result<SnapshotSaved, SnapshotError>;
}

/// A reply, and whether the VMM is to stop once it has been sent.
#[derive(Debug, PartialEq)]
pub struct Handled {
    pub reply: Reply,
    /// Stopping before the reply is written would let the process exit
    /// first, and the client read EOF instead of `{"ok":true}`.
    pub stop_after_reply: bool,
}

/// Carries out one request line (all but a stop, which the caller carries
/// out after replying); every failure is a `Failed` reply.
pub fn handle(ctl: &dyn VmControl, line: &str) -> Handled {
    let request = Request::from_line(line);
    let stop_after_reply = matches!(request, Ok(Request::Stop));
    let reply = match request {
        Err(e) => Reply::Failed(e.to_string()),
        Ok(Request::Status) => Reply::Status(ctl.status()),
        Ok(Request::Pause) => reply(ctl.pause(), |()| Reply::Done),
        Ok(Request::Resume) => reply(ctl.resume(), |()| Reply::Done),
        Ok(Request::Stop) => Reply::Done,
        Ok(Request::AttachDisk {
            slot,
            path,
            read_only,
        }) => reply(ctl.attach_disk(slot as usize, &path, read_only), |()| {
            Reply::Done
        }),
        Ok(Request::AttachTap { name }) => reply(ctl.attach_tap(&name), |()| Reply::Done),
        Ok(Request::AttachShare { dir, read_only }) => {
            reply(ctl.attach_share(&dir, read_only), |()| Reply::Done)
        }
        Ok(Request::Snapshot { dir }) => reply(ctl.snapshot(&dir), Reply::SnapshotSaved),
    };
    Handled {
        reply,
        stop_after_reply,
    }
}

/// The reply to a request whose work ended in `result`.
fn reply<T, E: std::fmt::Display>(result: Result<T, E>, ok: impl FnOnce(T) -> Reply) -> Reply {
    match result {
        Ok(v) => ok(v),
        Err(e) => Reply::Failed(e.to_string()),
    }
}

fn serve_connection(ctl: &dyn VmControl, stream: UnixStream) -> std::io::Result<()> {
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    loop {
        let mut line = String::new();
        let n = (&mut reader).take(MAX_REQUEST_LINE).read_line(&mut line)?;
        if n == 0 {
            return Ok(());
        }
        if !line.ends_with('\n') && n as u64 >= MAX_REQUEST_LINE {
            let mut refusal = Reply::Failed("request too long".into()).to_line();
            refusal.push('\n');
            writer.write_all(refusal.as_bytes())?;
            return Ok(());
        }
        let handled = handle(ctl, line.trim());
        let mut reply = handled.reply.to_line();
        reply.push('\n');
        let written = writer
            .write_all(reply.as_bytes())
            .and_then(|_| writer.flush());
        if handled.stop_after_reply {
            ctl.stop();
        }
        written?;
    }
}

/// Serves the socket on its own thread, one client at a time.
pub fn spawn_server(listener: UnixListener, ctl: Arc<dyn VmControl>) -> std::io::Result<()> {
    crate::confined::spawn("control", crate::confined::ThreadRole::Control, move || {
        for stream in listener.incoming() {
            match stream {
                Ok(s) => {
                    if let Err(e) = serve_connection(ctl.as_ref(), s) {
                        log::warn!("control connection: {e}");
                    }
                }
                Err(e) => log::warn!("control accept: {e}"),
            }
        }
    })?;
    Ok(())
}

/// The running VMM's side of the control API.
pub struct VmmControl {
    pub vm: Arc<crate::snapshot::VmHandle>,
    pub exits: Sender<VmExit>,
    pub times: BootTimes,
    pub guest_ram: Vec<(u64, u64)>,
    pub disks: crate::vm::DiskAttacher,
    pub taps: crate::vm::TapAttacher,
    pub shares: crate::vm::ShareAttacher,
}

impl VmControl for VmmControl {
    fn pause(&self) -> Result<(), PauseResumeError> {
        self.vm.pause()
    }
    fn resume(&self) -> Result<(), PauseResumeError> {
        self.vm.resume()
    }
    fn stop(&self) {
        let _ = self.exits.send(VmExit::Stopped);
    }
    fn status(&self) -> Status {
        let (vmm_rss_kib, guest_rss_kib) = crate::memory_usage(&self.guest_ram).unwrap_or((0, 0));
        Status {
            state: if self.vm.run.is_paused() {
                RunState::Paused
            } else {
                RunState::Running
            },
            marks: self.times.marks(),
            vmm_rss_kib,
            guest_rss_kib,
        }
    }
    fn attach_disk(&self, slot: usize, path: &Path, read_only: bool) -> Result<(), AttachError> {
        (self.disks)(slot, path, read_only)
    }
    fn attach_tap(&self, name: &str) -> Result<(), AttachError> {
        (self.taps)(name)
    }
    fn attach_share(&self, dir: &Path, read_only: bool) -> Result<(), AttachError> {
        (self.shares)(dir, read_only)
    }
    fn snapshot(&self, dir: &Path) -> Result<SnapshotSaved, SnapshotError> {
        let (state_bytes, memory_bytes_written) = self.vm.snapshot(dir)?;
        Ok(SnapshotSaved {
            state_bytes,
            memory_bytes_written,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Fake {
        calls: Mutex<Vec<String>>,
    }
    impl VmControl for Fake {
        fn pause(&self) -> Result<(), PauseResumeError> {
            self.calls.lock().unwrap().push("pause".into());
            Ok(())
        }
        fn resume(&self) -> Result<(), PauseResumeError> {
            Err(crate::vcpu::VcpuError::Stopping.into())
        }
        fn stop(&self) {
            self.calls.lock().unwrap().push("stop".into());
        }
        fn status(&self) -> Status {
            Status {
                state: RunState::Running,
                marks: vec![],
                vmm_rss_kib: 0,
                guest_rss_kib: 0,
            }
        }
        fn attach_disk(&self, slot: usize, path: &Path, ro: bool) -> Result<(), AttachError> {
            self.calls
                .lock()
                .unwrap()
                .push(format!("attach {slot} {} {ro}", path.display()));
            Ok(())
        }
        fn attach_tap(&self, name: &str) -> Result<(), AttachError> {
            self.calls.lock().unwrap().push(format!("tap {name}"));
            if name == "busy" {
                return Err(AttachError::NoNic);
            }
            Ok(())
        }
        fn attach_share(&self, dir: &Path, ro: bool) -> Result<(), AttachError> {
            self.calls
                .lock()
                .unwrap()
                .push(format!("share {} {ro}", dir.display()));
            if dir == Path::new("/taken") {
                return Err(AttachError::NoFs);
            }
            Ok(())
        }
        fn snapshot(&self, _: &Path) -> Result<SnapshotSaved, SnapshotError> {
            Err(SnapshotError::Unsupported("no".into()))
        }
    }

    #[test]
    fn requests_map_to_calls_and_errors_are_replies() {
        let f = Fake::default();
        let handle = |line| handle(&f, line).reply.to_line();
        assert_eq!(handle(r#"{"op":"pause"}"#), r#"{"ok":true}"#);
        assert_eq!(
            handle(r#"{"op":"resume"}"#),
            r#"{"ok":false,"error":"the VM is stopping"}"#
        );
        assert_eq!(
            handle(r#"{"op":"status"}"#),
            r#"{"ok":true,"state":"running","marks":[],"vmm_rss_kib":0,"guest_rss_kib":0}"#
        );
        let r = handle(r#"{"op":"attach_disk","slot":1,"path":"/x","read_only":true}"#);
        assert_eq!(r, r#"{"ok":true}"#);
        assert_eq!(
            handle(r#"{"op":"attach_tap","name":"tap0"}"#),
            r#"{"ok":true}"#
        );
        assert_eq!(
            handle(r#"{"op":"attach_tap","name":"busy"}"#),
            r#"{"ok":false,"error":"this VM has no NIC"}"#
        );
        assert_eq!(
            handle(r#"{"op":"attach_share","dir":"/srv/v","read_only":true}"#),
            r#"{"ok":true}"#
        );
        assert_eq!(
            handle(r#"{"op":"attach_share","dir":"/taken","read_only":false}"#),
            r#"{"ok":false,"error":"this VM has no virtio-fs device"}"#
        );
        assert_eq!(
            handle(r#"{"op":"snapshot","dir":"/s"}"#),
            r#"{"ok":false,"error":"cannot snapshot this VM: no"}"#
        );
        let r = handle(r#"{"op":"explode"}"#);
        assert!(r.contains("bad request") && r.contains("explode"), "{r}");
        let r = handle("not json");
        assert!(r.starts_with(r#"{"ok":false"#));
        assert_eq!(
            *f.calls.lock().unwrap(),
            vec![
                "pause",
                "attach 1 /x true",
                "tap tap0",
                "tap busy",
                "share /srv/v true",
                "share /taken false"
            ]
        );
        // Stop is acknowledged first and carried out after the reply.
        assert_eq!(
            super::handle(&f, r#"{"op":"stop"}"#),
            Handled {
                reply: Reply::Done,
                stop_after_reply: true
            }
        );
        assert!(!f.calls.lock().unwrap().contains(&"stop".to_string()));
    }

    #[test]
    fn socket_round_trip_and_overlong_request() {
        let dir = std::env::temp_dir().join(format!("thaw-ctl-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("api.sock");
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).unwrap();
        spawn_server(listener, Arc::new(Fake::default())).unwrap();
        let mut s = UnixStream::connect(&path).unwrap();
        s.write_all(b"{\"op\":\"stop\"}\n{\"op\":\"status\"}\n")
            .unwrap();
        let mut r = BufReader::new(s.try_clone().unwrap());
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        assert_eq!(line, "{\"ok\":true}\n");
        line.clear();
        r.read_line(&mut line).unwrap();
        assert!(line.contains("running"));
        // One client at a time: close the first one (both handles).
        drop(r);
        drop(s);
        let mut s2 = UnixStream::connect(&path).unwrap();
        s2.write_all(&vec![b'x'; MAX_REQUEST_LINE as usize + 10])
            .unwrap();
        let mut line = String::new();
        BufReader::new(s2).read_line(&mut line).unwrap();
        assert!(line.contains("too long"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
