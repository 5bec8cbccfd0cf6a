//! The control socket: newline-delimited JSON requests, one JSON reply line
//! each. The shim (and the snapshot code) drive a running VM through it.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::Sender;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::boot_marker::BootTimes;
use crate::vcpu::VmExit;

/// Longest request line accepted; anything longer is refused, not buffered.
const MAX_REQUEST: u64 = 64 * 1024;

#[derive(Debug, Deserialize, PartialEq)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    Status,
    Pause,
    Resume,
    Stop,
    AttachDisk {
        slot: usize,
        path: PathBuf,
        read_only: bool,
    },
    Snapshot {
        dir: PathBuf,
    },
}

#[derive(Debug, Serialize)]
struct Reply {
    ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    #[serde(flatten)]
    data: serde_json::Value,
}

/// What a request can act on. Implemented by the running VMM; a trait so
/// the request handling is testable without a VM.
pub trait VmControl: Send + Sync {
    fn pause(&self) -> Result<(), String>;
    fn resume(&self) -> Result<(), String>;
    fn stop(&self);
    fn status(&self) -> serde_json::Value;
    fn attach_disk(&self, slot: usize, path: &Path, read_only: bool) -> Result<(), String>;
    fn snapshot(&self, dir: &Path) -> Result<serde_json::Value, String>;
}

/// A reply line, and whether the VMM is to stop once it has been sent.
#[derive(Debug, PartialEq)]
pub struct Handled {
    pub reply: String,
    /// Stopping before the reply is written would let the process exit
    /// first, and the client read EOF instead of `{"ok":true}`.
    pub stop_after_reply: bool,
}

pub fn handle(ctl: &dyn VmControl, line: &str) -> Handled {
    let mut stop_after_reply = false;
    let result = match serde_json::from_str::<Request>(line) {
        Err(e) => Err(format!("bad request: {e}")),
        Ok(Request::Status) => Ok(ctl.status()),
        Ok(Request::Pause) => ctl.pause().map(|_| json!({})),
        Ok(Request::Resume) => ctl.resume().map(|_| json!({})),
        Ok(Request::Stop) => {
            stop_after_reply = true;
            Ok(json!({}))
        }
        Ok(Request::AttachDisk {
            slot,
            path,
            read_only,
        }) => ctl.attach_disk(slot, &path, read_only).map(|_| json!({})),
        Ok(Request::Snapshot { dir }) => ctl.snapshot(&dir),
    };
    let reply = match result {
        Ok(data) => Reply {
            ok: true,
            error: None,
            data,
        },
        Err(e) => Reply {
            ok: false,
            error: Some(e),
            data: json!({}),
        },
    };
    let reply =
        serde_json::to_string(&reply).unwrap_or_else(|_| r#"{"ok":false,"error":"reply"}"#.into());
    Handled {
        reply,
        stop_after_reply,
    }
}

fn serve_connection(ctl: &dyn VmControl, stream: UnixStream) -> std::io::Result<()> {
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    loop {
        let mut line = String::new();
        let n = (&mut reader).take(MAX_REQUEST).read_line(&mut line)?;
        if n == 0 {
            return Ok(());
        }
        if !line.ends_with('\n') && n as u64 >= MAX_REQUEST {
            writer.write_all(b"{\"ok\":false,\"error\":\"request too long\"}\n")?;
            return Ok(());
        }
        let handled = handle(ctl, line.trim());
        let written = writer
            .write_all(handled.reply.as_bytes())
            .and_then(|_| writer.write_all(b"\n"))
            .and_then(|_| writer.flush());
        if handled.stop_after_reply {
            ctl.stop();
        }
        written?;
    }
}

/// Serves the socket on its own thread, one client at a time.
pub fn spawn_server(listener: UnixListener, ctl: Arc<dyn VmControl>) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
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
}

impl VmControl for VmmControl {
    fn pause(&self) -> Result<(), String> {
        self.vm.pause()
    }
    fn resume(&self) -> Result<(), String> {
        self.vm.resume()
    }
    fn stop(&self) {
        let _ = self.exits.send(VmExit::Stopped);
    }
    fn status(&self) -> serde_json::Value {
        let (vmm_kib, guest_kib) = crate::memory_usage(&self.guest_ram).unwrap_or((0, 0));
        json!({
            "state": if self.vm.run.is_paused() { "paused" } else { "running" },
            "marks": self.times.marks(),
            "vmm_rss_kib": vmm_kib,
            "guest_rss_kib": guest_kib,
        })
    }
    fn attach_disk(&self, slot: usize, path: &Path, read_only: bool) -> Result<(), String> {
        (self.disks)(slot, path, read_only)
    }
    fn snapshot(&self, dir: &Path) -> Result<serde_json::Value, String> {
        let (state_bytes, memory_bytes) = self.vm.snapshot(dir).map_err(|e| e.to_string())?;
        Ok(json!({"state_bytes": state_bytes, "memory_bytes_written": memory_bytes}))
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
        fn pause(&self) -> Result<(), String> {
            self.calls.lock().unwrap().push("pause".into());
            Ok(())
        }
        fn resume(&self) -> Result<(), String> {
            Err("not paused".into())
        }
        fn stop(&self) {
            self.calls.lock().unwrap().push("stop".into());
        }
        fn status(&self) -> serde_json::Value {
            json!({"state": "running"})
        }
        fn attach_disk(&self, slot: usize, path: &Path, ro: bool) -> Result<(), String> {
            self.calls
                .lock()
                .unwrap()
                .push(format!("attach {slot} {} {ro}", path.display()));
            Ok(())
        }
        fn snapshot(&self, _: &Path) -> Result<serde_json::Value, String> {
            Err("no".into())
        }
    }

    #[test]
    fn requests_map_to_calls_and_errors_are_replies() {
        let f = Fake::default();
        let reply = |line: &str| handle(&f, line).reply;
        assert_eq!(reply(r#"{"op":"pause"}"#), r#"{"ok":true}"#);
        assert_eq!(
            reply(r#"{"op":"resume"}"#),
            r#"{"ok":false,"error":"not paused"}"#
        );
        assert!(reply(r#"{"op":"status"}"#).contains(r#""state":"running""#));
        let r = reply(r#"{"op":"attach_disk","slot":1,"path":"/x","read_only":true}"#);
        assert_eq!(r, r#"{"ok":true}"#);
        let r = reply(r#"{"op":"explode"}"#);
        assert!(r.contains("bad request") && r.contains("explode"), "{r}");
        let r = reply("not json");
        assert!(r.starts_with(r#"{"ok":false"#));
        assert_eq!(*f.calls.lock().unwrap(), vec!["pause", "attach 1 /x true"]);
        // Stop is acknowledged first and carried out after the reply.
        assert_eq!(
            handle(&f, r#"{"op":"stop"}"#),
            Handled {
                reply: r#"{"ok":true}"#.into(),
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
        s2.write_all(&vec![b'x'; MAX_REQUEST as usize + 10])
            .unwrap();
        let mut line = String::new();
        BufReader::new(s2).read_line(&mut line).unwrap();
        assert!(line.contains("too long"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
