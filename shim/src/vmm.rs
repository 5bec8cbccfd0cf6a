//! The shim's VM config as `thaw-vmm` invocations. thaw_vmm_api builds the
//! argv and speaks the control socket; what is left here is the shim's
//! choice of options and the guest's names for its disks.

use std::path::{Path, PathBuf};
use std::process::Command;

use thaw_vmm_api::{BootArgs, Disk, Jail, JailBind, RestoreArgs, Serial, VmmCommand};

use thaw_config::VmConfig;

/// Where one VM's files live.
#[derive(Debug, Clone)]
pub struct VmPaths {
    pub vsock_uds: PathBuf,
    pub api_sock: PathBuf,
    /// The guest console.
    pub serial: Serial,
    /// What the VMM opens later beside these (its namespace's image
    /// cache, for `attach_disk`), visible read-only in its jail.
    pub images: Option<PathBuf>,
}

/// The jail of `vm.jail`, if on: the sandbox directory (sockets, console,
/// share) is bound because the VMM's sockets are in it.
fn jail(vm: &VmConfig, paths: &VmPaths) -> Option<Jail> {
    vm.jail.then(|| Jail {
        uid: vm.jail_uid,
        gid: vm.jail_gid,
        binds: paths
            .images
            .iter()
            .map(|p| JailBind {
                path: p.clone(),
                read_only: true,
            })
            .collect(),
        max_file_size: (vm.jail_max_file_mib > 0)
            .then_some(vm.jail_max_file_mib.saturating_mul(1 << 20)),
    })
}

/// The guest console from the config's `serial`: "none", "stdout" or a
/// file, a relative name resolving in `dir`.
pub fn serial(configured: &str, dir: &Path) -> Serial {
    match configured {
        "none" => Serial::None,
        "stdout" => Serial::Stdout,
        file => Serial::File(dir.join(file)),
    }
}

/// The cold boot of one sandbox's VM.
pub fn boot_command(vm: &VmConfig, paths: &VmPaths) -> Command {
    VmmCommand::Boot(BootArgs {
        disks: vec![Disk::read_only(&vm.root_image)],
        spare_disks: vm.spare_disks,
        vsock_uds: Some(paths.vsock_uds.clone()),
        vcpus: vm.vcpus,
        memory_mib: vm.memory_mib,
        append: vm.kernel_append.clone(),
        serial: paths.serial.clone(),
        api_sock: Some(paths.api_sock.clone()),
        deny_syscalls: vm.deny_syscalls.clone(),
        jail: jail(vm, paths),
        ..BootArgs::new(&vm.kernel)
    })
    .command(&vm.vmm)
}

/// `thaw-vmm template build`: boots the template once (or finds it built)
/// and prints its snapshot directory on the last line.
pub fn template_build_command(vm: &VmConfig) -> Command {
    VmmCommand::TemplateBuild(vm.template_build_args()).command(&vm.vmm)
}

/// Resuming a template snapshot: new sockets, the same root disk; the
/// spare slots come from the snapshot.
pub fn restore_command(vm: &VmConfig, template: &Path, paths: &VmPaths) -> Command {
    VmmCommand::Restore(RestoreArgs {
        disks: vec![Disk::read_only(&vm.root_image)],
        vsock_uds: Some(paths.vsock_uds.clone()),
        serial: Some(paths.serial.clone()),
        api_sock: Some(paths.api_sock.clone()),
        deny_syscalls: vm.deny_syscalls.clone(),
        jail: jail(vm, paths),
        ..RestoreArgs::new(template)
    })
    .command(&vm.vmm)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn args(c: Command) -> String {
        c.get_args()
            .map(|a| a.to_string_lossy().to_string())
            .collect::<Vec<_>>()
            .join(" ")
    }

    fn paths() -> VmPaths {
        VmPaths {
            vsock_uds: "/run/s/v.sock".into(),
            api_sock: "/run/s/api.sock".into(),
            serial: Serial::None,
            images: Some("/var/lib/thaw/images/ns/k8s.io".into()),
        }
    }

    #[test]
    fn boot_passes_the_vm_shape_and_the_sandbox_files() {
        let vm = VmConfig::default();
        let c = boot_command(&vm, &paths());
        assert_eq!(c.get_program(), vm.vmm.as_os_str());
        assert_eq!(
            args(c),
            "--kernel /usr/local/share/thaw/vmlinux --disk /usr/local/share/thaw/root.img,ro \
             --spare-disks 8 --vsock-uds /run/s/v.sock --vcpus 1 --memory-mib 256 \
             --serial none --api-sock /run/s/api.sock --pvm auto \
             --jail 65534:65534 --jail-bind /var/lib/thaw/images/ns/k8s.io,ro"
        );
        let vm = VmConfig {
            kernel_append: "quiet".into(),
            ..VmConfig::default()
        };
        assert!(args(boot_command(&vm, &paths())).contains("--append quiet"));
    }

    #[test]
    fn template_build_and_restore() {
        let vm = VmConfig::default();
        assert_eq!(
            args(template_build_command(&vm)),
            "template build --kernel /usr/local/share/thaw/vmlinux \
             --disk /usr/local/share/thaw/root.img,ro --spare-disks 8 --vcpus 1 \
             --memory-mib 256 --ready agent --timeout 600 --retry-after 600 \
             --store /var/lib/thaw/templates --max-store-mib 8192"
        );
        let unlimited = VmConfig {
            template_store_max_mib: 0,
            ..VmConfig::default()
        };
        assert!(!args(template_build_command(&unlimited)).contains("--max-store-mib"));
        assert_eq!(
            args(restore_command(&vm, Path::new("/t/abc"), &paths())),
            "--restore /t/abc --disk /usr/local/share/thaw/root.img,ro \
             --vsock-uds /run/s/v.sock --serial none --api-sock /run/s/api.sock \
             --jail 65534:65534 --jail-bind /var/lib/thaw/images/ns/k8s.io,ro"
        );
        let unjailed = VmConfig {
            jail: false,
            ..VmConfig::default()
        };
        assert!(!args(restore_command(&unjailed, Path::new("/t/abc"), &paths())).contains("jail"));
        let capped = VmConfig {
            jail_max_file_mib: 3,
            ..VmConfig::default()
        };
        assert!(
            args(restore_command(&capped, Path::new("/t/abc"), &paths()))
                .contains("--jail 65534:65534 --jail-max-file-size 3145728 --jail-bind")
        );
    }

    #[test]
    fn serial_names_resolve_in_the_sandbox_dir() {
        let dir = Path::new("/run/s");
        assert_eq!(serial("none", dir), Serial::None);
        assert_eq!(serial("stdout", dir), Serial::Stdout);
        assert_eq!(
            serial("console.log", dir),
            Serial::File("/run/s/console.log".into())
        );
        assert_eq!(serial("/var/log/c", dir), Serial::File("/var/log/c".into()));
    }

    #[test]
    fn guest_device_names() {
        assert_eq!(guest_device(0), "/dev/vdb");
        assert_eq!(guest_device(24), "/dev/vdz");
        assert_eq!(guest_device(25), "/dev/vdaa");
    }
}
