//! The host-process backend: the guest agent runs directly on the host.
//! NOT ISOLATED: containers share the host kernel like with runc. It
//! exists so the whole shim can be tested on machines where a VM cannot
//! run guest user space, and is only used when the config says
//! `backend = "host-unisolated"`.
//!
//! The agent runs as PID 1 of its own pid and mount namespaces (via
//! util-linux `unshare`), so when it dies every container process and
//! every mount it made go with it, as they would with a VM. Images reach it
//! as read-only loop devices.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use thaw_agent_protocol::agent as proto;

use super::{Attached, Backend};
use crate::child;
use crate::config::HostConfig;
use crate::error::{Error, Result};

pub struct HostBackend {
    host: HostConfig,
}

impl HostBackend {
    pub fn new(host: HostConfig) -> Self {
        HostBackend { host }
    }
}

fn losetup(args: &[&str]) -> Result<String> {
    let f = child::run(Command::new("losetup").args(args), Duration::from_secs(30))?;
    if f.code != 0 {
        return Err(Error::Sandbox(format!(
            "losetup {}: {}",
            args.join(" "),
            f.stderr.trim()
        )));
    }
    Ok(f.stdout.trim().to_string())
}

impl Backend for HostBackend {
    fn check(&self) -> Result<()> {
        match std::fs::metadata(&self.host.agent) {
            Ok(m) if m.is_file() => Ok(()),
            _ => Err(Error::Sandbox(format!(
                "host.agent {} does not exist (set host.agent in the thaw config)",
                self.host.agent.display()
            ))),
        }
    }

    fn command(&self, uds: &Path, _dir: &Path) -> Command {
        let mut c = Command::new("unshare");
        c.args([
            "--pid",
            "--fork",
            "--kill-child",
            "--mount-proc",
            "--propagation",
            "private",
        ])
        .arg(&self.host.agent)
        .arg("--host")
        .arg(format!("unix://{}", uds.display()));
        c
    }

    fn attach(&self, slot: u32, image: &Path) -> Result<(proto::Rootfs, Attached)> {
        let image = image.to_str().ok_or_else(|| {
            Error::Sandbox(format!("image path {} is not UTF-8", image.display()))
        })?;
        let dev = losetup(&["--find", "--show", "--read-only", image])?;
        if !dev.starts_with("/dev/loop") {
            return Err(Error::Sandbox(format!(
                "losetup printed {dev:?}, not a loop device"
            )));
        }
        let mut r = proto::Rootfs::new();
        r.source = dev.clone();
        r.fstype = "erofs".into();
        Ok((
            r,
            Attached {
                slot,
                loop_dev: Some(dev),
            },
        ))
    }

    fn mounted(&self, attached: &Attached) {
        // Detaching a mounted loop device only marks it auto-clear: the
        // kernel frees it when the agent's mount goes, even if the agent
        // dies. So nothing is left to clean after a crash.
        self.detach(attached);
    }

    fn detach(&self, attached: &Attached) {
        if let Some(dev) = &attached.loop_dev {
            if let Err(e) = losetup(&["--detach", dev]) {
                log::debug!("{e}");
            }
        }
    }

    fn request_stop(&self) {
        // SIGKILL (by the caller) of `unshare --kill-child` takes the agent
        // and its pid namespace down.
    }

    fn describe(&self) -> String {
        format!("host-unisolated agent ({})", self.host.agent.display())
    }
}
