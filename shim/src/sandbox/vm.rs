//! The product backend: one `thaw-vmm` micro-VM per sandbox. Images reach
//! the guest as virtio-blk spare disks filled through the control socket.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use thaw_agent_protocol::agent as proto;
use thaw_vmm_api::VmmClient;

use super::{Attached, Backend};
use crate::error::{Error, Result};
use crate::vmm::{self, VmPaths};
use thaw_config::VmConfig;

/// virtio-blk counts capacity in 512-byte sectors.
const SECTOR_SIZE: u64 = 512;

pub struct VmBackend {
    vm: VmConfig,
    /// The sandbox's namespace's image cache, which `attach` reads.
    images: Option<std::path::PathBuf>,
    api_sock: std::sync::Mutex<Option<std::path::PathBuf>>,
    /// The template snapshot to restore, when there is one.
    template: std::sync::Mutex<Option<std::path::PathBuf>>,
}

impl VmBackend {
    pub fn new(vm: VmConfig, images: Option<std::path::PathBuf>) -> Self {
        VmBackend {
            vm,
            images,
            api_sock: std::sync::Mutex::new(None),
            template: std::sync::Mutex::new(None),
        }
    }

    /// Finds or builds the template for this VM shape; None means cold
    /// boot (templates off, a custom command line, or the build failed).
    fn template(&self) -> Option<std::path::PathBuf> {
        if !self.vm.templates {
            return None;
        }
        if !self.vm.kernel_append.is_empty() {
            log::info!(
                "vm.kernel_append is set: cold boot (templates use the default command line)"
            );
            return None;
        }
        let mut cmd = vmm::template_build_command(&self.vm);
        let started = std::time::Instant::now();
        // A build of the same key by another start holds the key's lock
        // until its own deadline: wait for that one and then ours.
        let wait = Duration::from_secs(2 * self.vm.template_build_timeout_secs + 60);
        match crate::child::run(&mut cmd, wait) {
            Ok(f) if f.code == 0 => {
                let dir = f.stdout.lines().last().unwrap_or("").trim().to_string();
                if dir.is_empty() || !Path::new(&dir).is_dir() {
                    log::warn!(
                        "template build printed no directory ({:?}); cold boot",
                        f.stdout
                    );
                    return None;
                }
                log::info!("template {dir} ready after {:?}", started.elapsed());
                Some(std::path::PathBuf::from(dir))
            }
            Ok(f) => {
                // The first line says what failed; the last ones, what the
                // guest and the VMM said last.
                let first = f
                    .stderr
                    .lines()
                    .find(|l| !l.trim().is_empty())
                    .unwrap_or("");
                log::warn!(
                    "template build failed (exit {}): {first} | ... | {}; cold boot",
                    f.code,
                    crate::sandbox::last_lines(&f.stderr, 3)
                );
                None
            }
            Err(e) => {
                log::warn!("template build: {e}; cold boot");
                None
            }
        }
    }

    fn client(&self) -> Result<VmmClient> {
        let p = self
            .api_sock
            .lock()
            .ok()
            .and_then(|g| g.clone())
            .ok_or(Error::VmmNotStarted)?;
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

    fn prepare(&self, dir: &Path) -> Result<Option<std::path::PathBuf>> {
        if self.vm.jail {
            super::share::prepare_mount_point(dir)?;
        }
        let t = self.template();
        if let Ok(mut g) = self.template.lock() {
            *g = t;
        }
        Ok(None)
    }

    fn command(&self, uds: &Path, dir: &Path) -> Command {
        let api_sock = dir.join("api.sock");
        if let Ok(mut g) = self.api_sock.lock() {
            *g = Some(api_sock.clone());
        }
        let paths = VmPaths {
            vsock_uds: uds.to_path_buf(),
            api_sock,
            // A relative name goes next to the sandbox's other files.
            serial: vmm::serial(&self.vm.serial, dir),
            images: self.images.clone(),
        };
        match self.template.lock().ok().and_then(|g| g.clone()) {
            Some(t) => vmm::restore_command(&self.vm, &t, &paths),
            None => vmm::boot_command(&self.vm, &paths),
        }
    }

    fn attach(&self, slot: u32, image: &Path) -> Result<(proto::Rootfs, Attached)> {
        let size = std::fs::metadata(image)
            .map_err(|e| Error::io(format!("reading the size of image {}", image.display()), e))?
            .len();
        self.client()?.attach_disk(slot, image, true)?;
        let mut r = proto::Rootfs::new();
        r.source = vmm::guest_device(slot);
        r.fstype = "erofs".into();
        // What the VMM offers: whole sectors.
        r.size_bytes = size - size % SECTOR_SIZE;
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

    fn needs_share(&self) -> bool {
        true
    }

    fn attach_share(&self, dir: &Path) -> Result<()> {
        self.client()?.attach_share(dir, false)?;
        Ok(())
    }

    fn attach_tap(&self, name: &str) -> Result<()> {
        self.client()?.attach_tap(name)?;
        Ok(())
    }

    fn restored(&self) -> bool {
        self.template.lock().map(|g| g.is_some()).unwrap_or(false)
    }

    fn describe(&self) -> String {
        match self.template.lock().ok().and_then(|g| g.clone()) {
            Some(t) => format!(
                "thaw-vmm ({}, restoring {})",
                self.vm.vmm.display(),
                t.display()
            ),
            None => format!("thaw-vmm ({}, cold boot)", self.vm.vmm.display()),
        }
    }
}
