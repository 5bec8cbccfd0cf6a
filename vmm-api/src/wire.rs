//! The control socket's wire format. A client writes one request line and
//! reads one reply line; it may send more requests on the same connection.
//! The VMM serves one connection at a time.
//!
//! | request | reply when it worked |
//! | --- | --- |
//! | `{"op":"status"}` | `{"ok":true,"state":"running","marks":[...],"vmm_rss_kib":N,"guest_rss_kib":N}` |
//! | `{"op":"pause"}`, `resume`, `stop` | `{"ok":true}` |
//! | `{"op":"attach_disk","slot":N,"path":"...","read_only":B}` | `{"ok":true}` |
//! | `{"op":"attach_tap","name":"..."}` | `{"ok":true}` |
//! | `{"op":"attach_share","dir":"...","read_only":B}` | `{"ok":true}` |
//! | `{"op":"snapshot","dir":"..."}` | `{"ok":true,"state_bytes":N,"memory_bytes_written":N}` |
//!
//! Any request can instead get `{"ok":false,"error":"..."}`.

use std::path::PathBuf;

use serde::de::{DeserializeOwned, IgnoredAny};
use serde::{Deserialize, Serialize};

use crate::Error;

/// Longest request line the VMM reads; a longer one is refused unread.
pub const MAX_REQUEST_LINE: u64 = 64 * 1024;
/// Longest reply line a client reads: past it the VMM is broken, and
/// reading on would let it make the client buffer without end.
pub const MAX_REPLY_LINE: u64 = 1 << 20;

/// One request line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Run state, boot marks and memory use: replies [`Reply::Status`].
    Status,
    /// Stops the vCPUs, then the device workers.
    Pause,
    /// Restarts the device workers, then the vCPUs.
    Resume,
    /// Ends the VMM (exit status 0) right after the reply.
    Stop,
    /// Puts the image at `path` into spare disk slot `slot` (slot 0 is the
    /// first spare, the guest's disk after the `--disk` ones).
    AttachDisk {
        slot: u32,
        path: PathBuf,
        read_only: bool,
    },
    /// Binds the NIC to tap `name` (opened, or created, in the VMM's
    /// network namespace). Refused if a tap is already bound.
    AttachTap { name: String },
    /// Exports host directory `dir` through the VM's virtio-fs device (tag
    /// `thaw-share`), read-only at the VMM if `read_only`. Refused if a
    /// share is already attached.
    AttachShare { dir: PathBuf, read_only: bool },
    /// Pauses the VM, which stays paused, and saves it into `dir`:
    /// replies [`Reply::SnapshotSaved`].
    Snapshot { dir: PathBuf },
}

impl Request {
    /// The `op` field: what error messages call the request.
    pub fn op(&self) -> &'static str {
        match self {
            Request::Status => "status",
            Request::Pause => "pause",
            Request::Resume => "resume",
            Request::Stop => "stop",
            Request::AttachDisk { .. } => "attach_disk",
            Request::AttachTap { .. } => "attach_tap",
            Request::AttachShare { .. } => "attach_share",
            Request::Snapshot { .. } => "snapshot",
        }
    }

    /// The request as one line of JSON, without the newline. Fails only
    /// for a path that is not UTF-8 (JSON strings cannot carry it).
    pub fn to_line(&self) -> Result<String, Error> {
        serde_json::to_string(self).map_err(|source| Error::Encode {
            op: self.op(),
            source,
        })
    }

    /// Parses a request line (the VMM's side).
    pub fn from_line(line: &str) -> Result<Request, Error> {
        serde_json::from_str(line).map_err(Error::BadRequest)
    }
}

/// Whether the vCPUs run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunState {
    Running,
    Paused,
}

/// A point in the boot the guest reported, in µs since the VMM started.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootMark {
    pub name: String,
    pub micros: u64,
}

/// What `status` returns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub state: RunState,
    /// The boot marks so far, in the order the guest wrote them.
    pub marks: Vec<BootMark>,
    /// Resident memory of the VMM process outside guest RAM.
    pub vmm_rss_kib: u64,
    /// Resident guest RAM.
    pub guest_rss_kib: u64,
}

/// What `snapshot` returns: the sizes written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotSaved {
    pub state_bytes: u64,
    /// Bytes of guest RAM written; all-zero pages are skipped, so this is
    /// below the memory file's (sparse) size.
    pub memory_bytes_written: u64,
}

/// One reply line. Which success shape a line has depends on the request
/// it answers, so [`Reply::from_line`] needs that request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// `{"ok":true}`: pause, resume, stop, attach_disk, attach_tap and
    /// attach_share were carried out.
    Done,
    Status(Status),
    SnapshotSaved(SnapshotSaved),
    /// `{"ok":false,"error":...}`: refused or failed, with the VMM's reason.
    Failed(String),
}

/// The JSON object of every reply: `ok`, then `error` or the data's fields.
#[derive(Serialize)]
struct ReplyLine<'a, T> {
    ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a str>,
    #[serde(flatten)]
    data: T,
}

/// The data of a reply that carries none.
#[derive(Serialize)]
struct NoData {}

/// The part of a reply line that is there whatever the request was.
#[derive(Deserialize)]
struct ReplyHead {
    ok: bool,
    #[serde(default)]
    error: Option<String>,
}

/// Said when a refusal comes without a reason.
const NO_REASON: &str = "VMM reported failure without a message";

impl Reply {
    /// The reply as one line of JSON, without the newline.
    pub fn to_line(&self) -> String {
        fn ok<T: Serialize>(data: T) -> serde_json::Result<String> {
            serde_json::to_string(&ReplyLine {
                ok: true,
                error: None,
                data,
            })
        }
        let line = match self {
            Reply::Done => ok(NoData {}),
            Reply::Status(s) => ok(s),
            Reply::SnapshotSaved(s) => ok(s),
            Reply::Failed(e) => serde_json::to_string(&ReplyLine {
                ok: false,
                error: Some(e),
                data: NoData {},
            }),
        };
        // Strings and numbers always encode; this fallback is never sent.
        line.unwrap_or_else(|_| r#"{"ok":false,"error":"reply"}"#.into())
    }

    /// Parses the reply line that answers `request`. A refusal is
    /// `Ok(Reply::Failed)`: the line itself was fine.
    pub fn from_line(line: &str, request: &Request) -> Result<Reply, Error> {
        let op = request.op();
        let reply = match request {
            Request::Status => parse_reply(line, op)?.map(Reply::Status),
            Request::Snapshot { .. } => parse_reply(line, op)?.map(Reply::SnapshotSaved),
            Request::Pause
            | Request::Resume
            | Request::Stop
            | Request::AttachDisk { .. }
            | Request::AttachTap { .. }
            | Request::AttachShare { .. } => {
                parse_reply::<IgnoredAny>(line, op)?.map(|_| Reply::Done)
            }
        };
        Ok(reply.unwrap_or_else(Reply::Failed))
    }
}

/// Parses a reply line to request `op`: the data a success carries, as
/// `T`, or the VMM's reason for a refusal.
pub(crate) fn parse_reply<T: DeserializeOwned>(
    line: &str,
    op: &'static str,
) -> Result<Result<T, String>, Error> {
    let bad = |source| Error::BadReply {
        op,
        line: line.to_string(),
        source,
    };
    let head: ReplyHead = serde_json::from_str(line).map_err(bad)?;
    if !head.ok {
        return Ok(Err(head.error.unwrap_or_else(|| NO_REASON.to_string())));
    }
    // The data's fields sit next to `ok`, which T ignores.
    serde_json::from_str(line).map(Ok).map_err(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every request with the exact line the VMM has always read.
    fn requests() -> Vec<(Request, &'static str)> {
        vec![
            (Request::Status, r#"{"op":"status"}"#),
            (Request::Pause, r#"{"op":"pause"}"#),
            (Request::Resume, r#"{"op":"resume"}"#),
            (Request::Stop, r#"{"op":"stop"}"#),
            (
                Request::AttachDisk {
                    slot: 2,
                    path: "/x.erofs".into(),
                    read_only: true,
                },
                r#"{"op":"attach_disk","slot":2,"path":"/x.erofs","read_only":true}"#,
            ),
            (
                Request::AttachTap {
                    name: "tap0".into(),
                },
                r#"{"op":"attach_tap","name":"tap0"}"#,
            ),
            (
                Request::AttachShare {
                    dir: "/run/thaw/p1/shared".into(),
                    read_only: false,
                },
                r#"{"op":"attach_share","dir":"/run/thaw/p1/shared","read_only":false}"#,
            ),
            (
                Request::Snapshot {
                    dir: "/tmp/snap".into(),
                },
                r#"{"op":"snapshot","dir":"/tmp/snap"}"#,
            ),
        ]
    }

    #[test]
    fn every_request_round_trips_through_its_wire_line() {
        for (request, line) in requests() {
            assert_eq!(request.to_line().unwrap(), line);
            assert_eq!(Request::from_line(line).unwrap(), request);
            assert!(line.starts_with(&format!(r#"{{"op":"{}""#, request.op())));
        }
    }

    #[test]
    fn requests_parse_in_any_field_order_and_refuse_strangers() {
        assert_eq!(
            Request::from_line(r#"{"read_only":false,"path":"/d","slot":0,"op":"attach_disk"}"#)
                .unwrap(),
            Request::AttachDisk {
                slot: 0,
                path: "/d".into(),
                read_only: false
            }
        );
        let e = |line| Request::from_line(line).unwrap_err().to_string();
        let unknown = e(r#"{"op":"explode"}"#);
        assert!(
            unknown.starts_with("bad request: ") && unknown.contains("explode"),
            "{unknown}"
        );
        assert!(e(r#"{"op":"snapshot","dir":"/s","now":true}"#).contains("now"));
        // serde checks unknown fields only for ops that have fields; the
        // VMM has always taken these.
        assert_eq!(
            Request::from_line(r#"{"op":"stop","now":true}"#).unwrap(),
            Request::Stop
        );
        assert!(e(r#"{"op":"attach_disk","slot":1,"path":"/x"}"#).contains("read_only"));
        assert!(
            e(r#"{"op":"attach_disk","slot":-1,"path":"/x","read_only":true}"#)
                .starts_with("bad request: ")
        );
        assert!(e("not json").starts_with("bad request: "));
        assert!(e(r#"{"op":"attach_tap"}"#).contains("name"));
        assert!(e(r#"{"op":"attach_tap","name":"t","slot":1}"#).contains("slot"));
    }

    #[test]
    fn a_path_that_is_not_utf8_cannot_be_sent() {
        use std::os::unix::ffi::OsStrExt;
        let dir = std::ffi::OsStr::from_bytes(b"/tmp/\xff").into();
        let e = Request::Snapshot { dir }.to_line().unwrap_err().to_string();
        assert!(e.starts_with("snapshot: cannot encode the request"), "{e}");
    }

    fn status() -> Status {
        Status {
            state: RunState::Paused,
            marks: vec![
                BootMark {
                    name: "kernel-entry".into(),
                    micros: 16078,
                },
                BootMark {
                    name: "init".into(),
                    micros: 912_345,
                },
            ],
            vmm_rss_kib: 2100,
            guest_rss_kib: 40000,
        }
    }

    /// Every reply, the request it answers and its exact line.
    fn replies() -> Vec<(Reply, Request, &'static str)> {
        let attach = Request::AttachDisk {
            slot: 0,
            path: "/x".into(),
            read_only: true,
        };
        let snapshot = Request::Snapshot { dir: "/s".into() };
        vec![
            (Reply::Done, Request::Pause, r#"{"ok":true}"#),
            (Reply::Done, Request::Resume, r#"{"ok":true}"#),
            (Reply::Done, Request::Stop, r#"{"ok":true}"#),
            (Reply::Done, attach.clone(), r#"{"ok":true}"#),
            (
                Reply::Done,
                Request::AttachTap { name: "t".into() },
                r#"{"ok":true}"#,
            ),
            (
                Reply::Done,
                Request::AttachShare {
                    dir: "/d".into(),
                    read_only: true,
                },
                r#"{"ok":true}"#,
            ),
            (
                Reply::Failed("tap t is already bound to the NIC (asked to bind u)".into()),
                Request::AttachTap { name: "u".into() },
                r#"{"ok":false,"error":"tap t is already bound to the NIC (asked to bind u)"}"#,
            ),
            (
                Reply::Status(status()),
                Request::Status,
                concat!(
                    r#"{"ok":true,"state":"paused","marks":[{"name":"kernel-entry","micros":16078},"#,
                    r#"{"name":"init","micros":912345}],"vmm_rss_kib":2100,"guest_rss_kib":40000}"#
                ),
            ),
            (
                Reply::Status(Status {
                    state: RunState::Running,
                    marks: vec![],
                    vmm_rss_kib: 0,
                    guest_rss_kib: 0,
                }),
                Request::Status,
                r#"{"ok":true,"state":"running","marks":[],"vmm_rss_kib":0,"guest_rss_kib":0}"#,
            ),
            (
                Reply::SnapshotSaved(SnapshotSaved {
                    state_bytes: 52_117,
                    memory_bytes_written: 9_437_184,
                }),
                snapshot.clone(),
                r#"{"ok":true,"state_bytes":52117,"memory_bytes_written":9437184}"#,
            ),
            (
                Reply::Failed("not paused".into()),
                Request::Resume,
                r#"{"ok":false,"error":"not paused"}"#,
            ),
            (
                Reply::Failed("no spare disk slot 9 (there are 8)".into()),
                attach,
                r#"{"ok":false,"error":"no spare disk slot 9 (there are 8)"}"#,
            ),
            (
                Reply::Failed("request too long".into()),
                snapshot,
                r#"{"ok":false,"error":"request too long"}"#,
            ),
        ]
    }

    #[test]
    fn every_reply_round_trips_through_its_wire_line() {
        for (reply, request, line) in replies() {
            assert_eq!(reply.to_line(), line, "{reply:?}");
            assert_eq!(Reply::from_line(line, &request).unwrap(), reply, "{line}");
        }
    }

    #[test]
    fn replies_tolerate_new_fields_and_name_what_is_missing() {
        // A newer VMM may say more; older clients read what they know.
        let r = Reply::from_line(
            r#"{"ok":true,"state":"running","marks":[],"vmm_rss_kib":1,"guest_rss_kib":2,"vcpus":1}"#,
            &Request::Status,
        )
        .unwrap();
        assert!(matches!(r, Reply::Status(Status { vmm_rss_kib: 1, .. })));
        assert_eq!(
            Reply::from_line(r#"{"ok":false}"#, &Request::Stop).unwrap(),
            Reply::Failed(NO_REASON.into())
        );
        let e = Reply::from_line(r#"{"ok":true}"#, &Request::Status)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("status: bad reply") && e.contains("state"),
            "{e}"
        );
        let e = Reply::from_line("not json", &Request::Pause)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("pause: bad reply \"not json\""), "{e}");
    }
}
