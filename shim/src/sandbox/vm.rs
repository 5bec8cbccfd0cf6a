//! The product backend: one `thaw-vmm` micro-VM per sandbox. Images reach
//! the guest as virtio-blk spare disks filled through the control socket.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use thaw_agent_protocol::agent as proto;

use super::{Attached, Backend};
use crate::config::VmConfig;
use crate::error::{Error, Result};
use crate::vmm_client::{self, VmPaths, VmmClient};

pub struct VmBackend {
    vm: VmConfig,
    api_sock: std::sync::Mutex<Option<std::path::PathBuf>>,
}

impl VmBackend {
    pub fn new(vm: VmConfig) -> Self {
        VmBackend {
            vm,
            api_sock: std::sync::Mutex::new(None),
        }
    }

    fn client(&self) -> Result<VmmClient> {
        let p = self
            .api_sock
            .lock()
            .ok()
            .and_then(|g| g.clone())
            .ok_or_else(|| Error::Vmm("the VMM was not started".into()))?;
        Ok(VmmClient::new(&p, Duration::from_secs(10)))
    }
}

fn need_file(key: &str, p: &Path) -> Result<()> {
    match std::fs::metadata(p) {
        Ok(m) if m.is_file() => Ok(()),
        Ok(_) => Err(Error::Sandbox(format!(
            "{key} {} is not a file",
            p.display()
        ))),
        Err(e) => Err(Error::Sandbox(format!(
            "{key} {}: {e} (set {key} in the thaw config)",
            p.display()
        ))),
    }
}

/// A program that cannot be executed must be caught here: a failed exec in
/// the spawned child would race the shim's SIGCHLD reaper.
pub fn need_executable(key: &str, p: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    match std::fs::metadata(p) {
        Ok(m) if m.is_file() && m.permissions().mode() & 0o111 != 0 => Ok(()),
        _ => Err(Error::Sandbox(format!(
            "{key} {} is not an executable file",
            p.display()
        ))),
    }
}

impl Backend for VmBackend {
    fn check(&self) -> Result<()> {
        if !Path::new("/dev/kvm").exists() {
            return Err(Error::Sandbox(
                "/dev/kvm is missing: KVM is required".into(),
            ));
        }
        need_file("vm.vmm", &self.vm.vmm)?;
        need_executable("vm.vmm", &self.vm.vmm)?;
        need_file("vm.kernel", &self.vm.kernel)?;
        need_file("vm.root_image", &self.vm.root_image)?;
        Ok(())
    }

    fn command(&self, uds: &Path, dir: &Path) -> Command {
        let api_sock = dir.join("api.sock");
        if let Ok(mut g) = self.api_sock.lock() {
            *g = Some(api_sock.clone());
        }
        let serial = match self.vm.serial.as_str() {
            "none" | "stdout" => self.vm.serial.clone(),
            // A relative name goes next to the sandbox's other files.
            other => dir.join(other).display().to_string(),
        };
        vmm_client::command(
            &self.vm,
            &VmPaths {
                vsock_uds: uds.to_path_buf(),
                api_sock,
                serial,
            },
        )
    }

    fn attach(&self, slot: u32, image: &Path) -> Result<(proto::Rootfs, Attached)> {
        self.client()?.attach_disk(slot, image, true)?;
        let mut r = proto::Rootfs::new();
        r.source = vmm_client::guest_device(slot);
        r.fstype = "erofs".into();
        Ok((
            r,
            Attached {
                slot,
                loop_dev: None,
            },
        ))
    }

    fn mounted(&self, _attached: &Attached) {}

    fn adapt_spec(&self, spec: &serde_json::Value) -> Result<serde_json::Value> {
        crate::spec::for_vm(spec)
    }

    fn detach(&self, _attached: &Attached) {
        // The VMM has no detach; the slot is refilled by the next attach
        // once the guest has unmounted it (RemoveContainer).
    }

    fn request_stop(&self, _pid: u32) {
        if let Ok(c) = self.client() {
            if let Err(e) = c.stop() {
                log::debug!("VMM stop request: {e}");
            }
        }
    }

    fn describe(&self) -> String {
        format!("thaw-vmm ({})", self.vm.vmm.display())
    }
}
