//! A blocking client for the control socket: one connection per request,
//! bounded in time (a timeout on every read and write) and in memory (the
//! reply line's length).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::{DeserializeOwned, IgnoredAny};

use crate::wire::{self, Request, SnapshotSaved, Status, MAX_REPLY_LINE};
use crate::Error;

#[derive(Debug, Clone)]
pub struct VmmClient {
    api_sock: PathBuf,
    timeout: Duration,
}

impl VmmClient {
    /// A client of the VMM listening on `api_sock`. `timeout` bounds each
    /// read and write of a round trip; it must not be zero.
    pub fn new(api_sock: impl Into<PathBuf>, timeout: Duration) -> Self {
        VmmClient {
            api_sock: api_sock.into(),
            timeout,
        }
    }

    pub fn api_sock(&self) -> &Path {
        &self.api_sock
    }

    pub fn status(&self) -> Result<Status, Error> {
        self.round_trip(&Request::Status)
    }

    pub fn pause(&self) -> Result<(), Error> {
        self.round_trip::<IgnoredAny>(&Request::Pause).map(drop)
    }

    pub fn resume(&self) -> Result<(), Error> {
        self.round_trip::<IgnoredAny>(&Request::Resume).map(drop)
    }

    /// Asks the VMM to exit; it replies first.
    pub fn stop(&self) -> Result<(), Error> {
        self.round_trip::<IgnoredAny>(&Request::Stop).map(drop)
    }

    /// Fills spare disk slot `slot` (0 is the first spare) with `path`.
    pub fn attach_disk(&self, slot: u32, path: &Path, read_only: bool) -> Result<(), Error> {
        let request = Request::AttachDisk {
            slot,
            path: path.to_path_buf(),
            read_only,
        };
        self.round_trip::<IgnoredAny>(&request).map(drop)
    }

    /// Binds the NIC to tap `name` (created if missing, in the VMM's
    /// network namespace).
    pub fn attach_tap(&self, name: &str) -> Result<(), Error> {
        let request = Request::AttachTap {
            name: name.to_string(),
        };
        self.round_trip::<IgnoredAny>(&request).map(drop)
    }

    /// Exports host directory `dir` to the guest through virtio-fs (tag
    /// `thaw-share`); `read_only` is enforced by the VMM.
    pub fn attach_share(&self, dir: &Path, read_only: bool) -> Result<(), Error> {
        let request = Request::AttachShare {
            dir: dir.to_path_buf(),
            read_only,
        };
        self.round_trip::<IgnoredAny>(&request).map(drop)
    }

    /// Pauses the VM (it stays paused) and saves it into `dir`.
    pub fn snapshot(&self, dir: &Path) -> Result<SnapshotSaved, Error> {
        self.round_trip(&Request::Snapshot {
            dir: dir.to_path_buf(),
        })
    }

    /// Sends `request` on a new connection and decodes the reply's data as
    /// `T`; a refusal is `Error::Refused` with the VMM's reason.
    fn round_trip<T: DeserializeOwned>(&self, request: &Request) -> Result<T, Error> {
        let op = request.op();
        let io = |what| move |source| Error::Io { op, what, source };
        let mut line = request.to_line()?;
        line.push('\n');
        let stream = UnixStream::connect(&self.api_sock).map_err(|source| Error::Connect {
            op,
            path: self.api_sock.clone(),
            source,
        })?;
        stream
            .set_read_timeout(Some(self.timeout))
            .and_then(|_| stream.set_write_timeout(Some(self.timeout)))
            .map_err(io("setting the timeout"))?;
        (&stream)
            .write_all(line.as_bytes())
            .map_err(io("sending"))?;
        let mut reply = String::new();
        BufReader::new((&stream).take(MAX_REPLY_LINE))
            .read_line(&mut reply)
            .map_err(io("reading the reply"))?;
        if reply.is_empty() {
            return Err(Error::NoReply { op });
        }
        if !reply.ends_with('\n') && reply.len() as u64 >= MAX_REPLY_LINE {
            return Err(Error::ReplyTooLong {
                op,
                limit: MAX_REPLY_LINE,
            });
        }
        wire::parse_reply(reply.trim(), op)?.map_err(|message| Error::Refused { op, message })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;
    use std::time::Instant;

    /// A fake control socket answering each request line with
    /// `reply(request line)`, one connection at a time like the VMM.
    fn fake_vmm(dir: &Path, reply: fn(&str) -> String) -> PathBuf {
        let path = dir.join("api.sock");
        let listener = UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            for s in listener.incoming().flatten() {
                let mut r = BufReader::new(&s);
                let mut line = String::new();
                while r.read_line(&mut line).is_ok() && !line.is_empty() {
                    let mut out = reply(line.trim());
                    out.push('\n');
                    let _ = (&s).write_all(out.as_bytes());
                    line.clear();
                }
            }
        });
        path
    }

    fn client(sock: &Path) -> VmmClient {
        VmmClient::new(sock, Duration::from_secs(5))
    }

    #[test]
    fn each_call_sends_its_wire_line_and_reads_its_reply() {
        let d = tempfile::tempdir().unwrap();
        let sock = fake_vmm(d.path(), |req| {
            match req {
            r#"{"op":"status"}"# => r#"{"ok":true,"state":"running","marks":[{"name":"init","micros":5}],"vmm_rss_kib":3,"guest_rss_kib":4}"#.into(),
            r#"{"op":"snapshot","dir":"/s"}"# => r#"{"ok":true,"state_bytes":1,"memory_bytes_written":2}"#.into(),
            r#"{"op":"pause"}"#
            | r#"{"op":"resume"}"#
            | r#"{"op":"stop"}"#
            | r#"{"op":"attach_disk","slot":2,"path":"/x.erofs","read_only":true}"#
            | r#"{"op":"attach_tap","name":"tap0"}"#
            | r#"{"op":"attach_share","dir":"/srv/p","read_only":true}"# => {
                r#"{"ok":true}"#.into()
            }
            other => format!(r#"{{"ok":false,"error":"unexpected {}"}}"#, other.replace('"', "'")),
        }
        });
        let c = client(&sock);
        let s = c.status().unwrap();
        assert_eq!(s.state, crate::RunState::Running);
        assert_eq!(
            (s.marks[0].micros, s.vmm_rss_kib, s.guest_rss_kib),
            (5, 3, 4)
        );
        assert_eq!(
            c.snapshot(Path::new("/s")).unwrap(),
            SnapshotSaved {
                state_bytes: 1,
                memory_bytes_written: 2
            }
        );
        c.pause().unwrap();
        c.resume().unwrap();
        c.stop().unwrap();
        c.attach_disk(2, Path::new("/x.erofs"), true).unwrap();
        c.attach_tap("tap0").unwrap();
        c.attach_share(Path::new("/srv/p"), true).unwrap();
        assert!(matches!(
            c.attach_share(Path::new("/srv/p"), false),
            Err(Error::Refused {
                op: "attach_share",
                ..
            })
        ));
        assert!(matches!(
            c.attach_tap("tap1"),
            Err(Error::Refused {
                op: "attach_tap",
                ..
            })
        ));
        let e = c.attach_disk(2, Path::new("/x.erofs"), false).unwrap_err();
        assert!(
            matches!(
                e,
                Error::Refused {
                    op: "attach_disk",
                    ..
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn refusals_carry_the_vmm_reason_and_the_request() {
        let d = tempfile::tempdir().unwrap();
        let sock = fake_vmm(d.path(), |_| {
            r#"{"ok":false,"error":"no spare disk slot 9 (there are 8)"}"#.into()
        });
        let e = client(&sock)
            .attach_disk(9, Path::new("/x"), true)
            .unwrap_err()
            .to_string();
        assert_eq!(e, "attach_disk: no spare disk slot 9 (there are 8)");
    }

    #[test]
    fn garbage_silence_and_floods_are_errors_not_hangs() {
        let d = tempfile::tempdir().unwrap();
        let sock = fake_vmm(d.path(), |_| "not json".into());
        let e = client(&sock).status().unwrap_err().to_string();
        assert!(e.starts_with("status: bad reply \"not json\""), "{e}");

        // Accepts and says nothing: the read times out.
        let d2 = tempfile::tempdir().unwrap();
        let path = d2.path().join("api.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let t = std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            std::thread::sleep(Duration::from_secs(2));
            drop(s);
        });
        let c = VmmClient::new(&path, Duration::from_millis(300));
        let started = Instant::now();
        let e = c.status().unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(2));
        assert!(
            matches!(
                e,
                Error::Io {
                    what: "reading the reply",
                    ..
                }
            ),
            "{e}"
        );
        t.join().unwrap();

        // Closes without a word.
        let d3 = tempfile::tempdir().unwrap();
        let path = d3.path().join("api.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let t = std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            let mut line = String::new();
            let _ = BufReader::new(&s).read_line(&mut line);
        });
        let e = client(&path).stop().unwrap_err().to_string();
        assert_eq!(e, "stop: VMM closed the connection without a reply");
        t.join().unwrap();

        // Sends a line without end: the client stops reading at the bound.
        let d4 = tempfile::tempdir().unwrap();
        let path = d4.path().join("api.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let t = std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            let chunk = vec![b'x'; 64 * 1024];
            while (&s).write_all(&chunk).is_ok() {}
        });
        let e = client(&path).status().unwrap_err();
        assert!(matches!(e, Error::ReplyTooLong { .. }), "{e}");
        drop(e);
        t.join().unwrap();
    }

    #[test]
    fn no_socket_is_a_connect_error_naming_the_path() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("missing.sock");
        let e = client(&path).pause().unwrap_err().to_string();
        assert!(
            e.starts_with(&format!("pause: connecting to {}: ", path.display())),
            "{e}"
        );
    }
}
