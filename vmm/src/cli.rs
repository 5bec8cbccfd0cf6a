//! `thaw-vmm` command-line parsing. Hand-written: a dozen options do not
//! need a parser crate, and every mistake names the option at fault.

use std::path::PathBuf;

use crate::config::{DiskConfig, PvmQuirks, SerialOutput, VmConfig, VsockConfig};
use crate::snapshot::RestoreOptions;

/// What the command line asks for: boot a kernel, or resume a snapshot.
#[derive(Debug)]
pub enum Launch {
    Boot(VmConfig),
    Restore(RestoreOptions),
}

pub const USAGE: &str = "\
usage: thaw-vmm --kernel VMLINUX [options]
       thaw-vmm --restore SNAPSHOT_DIR [--vsock-uds P] [--disk P[,ro]]... [--serial S] [--api-sock P]
  --kernel PATH          uncompressed ELF guest kernel (vmlinux)
  --initramfs PATH       initramfs to load (prefer a root disk: it is faster)
  --disk PATH[,ro]       virtio-blk disk from a raw file (repeatable; first is /dev/vda)
  --spare-disks N        empty virtio-blk slots for attach_disk (default 0)
  --vsock-uds PATH       enable virtio-vsock; host side is this Unix socket
  --cid N                guest vsock CID (default 3)
  --vcpus N              number of vCPUs (default 1)
  --memory-mib N         guest memory in MiB (default 256)
  --append STRING        extra guest kernel command line
  --serial stdout|none|PATH  where the guest console goes (default stdout)
  --api-sock PATH        control socket (pause, resume, stop, status, ...)
  --pvm auto|on|off      guest workarounds for PVM hosts (default auto)
  --restore DIR          resume the VM saved in DIR (by the snapshot control
                         request) instead of booting; --disk replaces its
                         disks in order, --vsock-uds gives it a new socket";

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum CliError {
    #[error("unknown option {0}")]
    Unknown(String),
    #[error("{0} needs a value")]
    MissingValue(String),
    #[error("{option}: {reason} (got {value:?})")]
    BadValue {
        option: String,
        value: String,
        reason: &'static str,
    },
    #[error("--kernel is required")]
    NoKernel,
    #[error("--cid given without --vsock-uds")]
    CidWithoutVsock,
    #[error("help requested")]
    Help,
    #[error("{0} cannot be combined with --restore: the snapshot fixes it")]
    NotWithRestore(String),
}

fn number<T: std::str::FromStr>(option: &str, value: &str) -> Result<T, CliError> {
    value.parse().map_err(|_| CliError::BadValue {
        option: option.into(),
        value: value.into(),
        reason: "not a valid number",
    })
}

pub fn parse<I: IntoIterator<Item = String>>(args: I) -> Result<Launch, CliError> {
    let mut cfg = VmConfig::default();
    let mut restore: Option<PathBuf> = None;
    let mut seen: Vec<String> = Vec::new();
    let mut serial_given = false;
    let mut kernel = None;
    let mut vsock_uds = None;
    let mut cid = None;
    let mut args = args.into_iter();
    while let Some(opt) = args.next() {
        if opt == "--help" || opt == "-h" {
            return Err(CliError::Help);
        }
        let known = [
            "--kernel",
            "--initramfs",
            "--disk",
            "--spare-disks",
            "--vsock-uds",
            "--cid",
            "--vcpus",
            "--memory-mib",
            "--append",
            "--serial",
            "--api-sock",
            "--pvm",
            "--restore",
        ];
        if !known.contains(&opt.as_str()) {
            return Err(CliError::Unknown(opt));
        }
        let value = args
            .next()
            .ok_or_else(|| CliError::MissingValue(opt.clone()))?;
        seen.push(opt.clone());
        match opt.as_str() {
            "--restore" => restore = Some(PathBuf::from(value)),
            "--kernel" => kernel = Some(PathBuf::from(value)),
            "--initramfs" => cfg.initramfs = Some(value.into()),
            "--disk" => {
                let (path, read_only) = match value.strip_suffix(",ro") {
                    Some(p) => (p, true),
                    None => (value.strip_suffix(",rw").unwrap_or(&value), false),
                };
                if path.is_empty() {
                    return Err(CliError::BadValue {
                        option: opt,
                        value,
                        reason: "expected PATH or PATH,ro",
                    });
                }
                cfg.disks.push(DiskConfig {
                    path: path.into(),
                    read_only,
                });
            }
            "--spare-disks" => cfg.spare_disks = number(&opt, &value)?,
            "--vsock-uds" => vsock_uds = Some(PathBuf::from(value)),
            "--cid" => cid = Some(number(&opt, &value)?),
            "--vcpus" => cfg.vcpus = number(&opt, &value)?,
            "--memory-mib" => cfg.memory_mib = number(&opt, &value)?,
            "--append" => cfg.append = value,
            "--serial" => {
                serial_given = true;
                cfg.serial = match value.as_str() {
                    "stdout" => SerialOutput::Stdout,
                    "none" => SerialOutput::None,
                    _ => SerialOutput::File(value.into()),
                }
            }
            "--api-sock" => cfg.api_socket = Some(value.into()),
            "--pvm" => {
                cfg.pvm_quirks = match value.as_str() {
                    "auto" => PvmQuirks::Auto,
                    "on" => PvmQuirks::On,
                    "off" => PvmQuirks::Off,
                    _ => {
                        return Err(CliError::BadValue {
                            option: opt,
                            value,
                            reason: "expected auto, on or off",
                        })
                    }
                }
            }
            _ => return Err(CliError::Unknown(opt)),
        }
    }
    if let Some(snapshot) = restore {
        let fixed = [
            "--kernel",
            "--initramfs",
            "--spare-disks",
            "--cid",
            "--vcpus",
            "--memory-mib",
            "--append",
            "--pvm",
        ];
        if let Some(o) = seen.iter().find(|o| fixed.contains(&o.as_str())) {
            return Err(CliError::NotWithRestore(o.clone()));
        }
        return Ok(Launch::Restore(RestoreOptions {
            snapshot,
            vsock_uds,
            disks: cfg.disks,
            serial: serial_given.then_some(cfg.serial),
            api_socket: cfg.api_socket,
        }));
    }
    cfg.kernel = kernel.ok_or(CliError::NoKernel)?;
    cfg.vsock = match (vsock_uds, cid) {
        (Some(uds_path), cid) => Some(VsockConfig {
            guest_cid: cid.unwrap_or(3),
            uds_path,
        }),
        (None, Some(_)) => return Err(CliError::CidWithoutVsock),
        (None, None) => None,
    };
    Ok(Launch::Boot(cfg))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    fn boot(s: &str) -> VmConfig {
        match parse(args(s)).unwrap() {
            Launch::Boot(c) => c,
            other => panic!("expected a boot, got {other:?}"),
        }
    }

    #[test]
    fn parses_a_full_command_line() {
        let c = boot(
            "--kernel /k --disk /a,ro --disk /b --spare-disks 2 --vsock-uds /v --cid 7 \
             --vcpus 2 --memory-mib 512 --serial none --api-sock /api --pvm off",
        );
        assert_eq!(c.kernel, PathBuf::from("/k"));
        assert_eq!(c.disks.len(), 2);
        assert!(c.disks[0].read_only && !c.disks[1].read_only);
        assert_eq!(c.spare_disks, 2);
        assert_eq!(
            c.vsock,
            Some(VsockConfig {
                guest_cid: 7,
                uds_path: "/v".into()
            })
        );
        assert_eq!((c.vcpus, c.memory_mib), (2, 512));
        assert_eq!(c.serial, SerialOutput::None);
        assert_eq!(c.pvm_quirks, PvmQuirks::Off);
    }

    #[test]
    fn defaults_boot_with_just_a_kernel() {
        let c = boot("--kernel /k");
        assert_eq!((c.vcpus, c.memory_mib, c.vsock.is_none()), (1, 256, true));
    }

    #[test]
    fn restore_takes_host_resources_only() {
        match parse(args(
            "--restore /snap --vsock-uds /v2 --disk /img,ro --api-sock /a",
        ))
        .unwrap()
        {
            Launch::Restore(r) => {
                assert_eq!(r.snapshot, PathBuf::from("/snap"));
                assert_eq!(r.vsock_uds, Some(PathBuf::from("/v2")));
                assert_eq!(r.disks.len(), 1);
                assert!(r.serial.is_none());
            }
            other => panic!("{other:?}"),
        }
        let e = parse(args("--restore /snap --vcpus 2"))
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "--vcpus cannot be combined with --restore: the snapshot fixes it"
        );
    }

    #[test]
    fn mistakes_name_the_option() {
        let e = |s| parse(args(s)).unwrap_err().to_string();
        assert_eq!(
            e("--kernel /k --vcpus two"),
            "--vcpus: not a valid number (got \"two\")"
        );
        assert_eq!(
            e("--kernel /k --frobnicate 1"),
            "unknown option --frobnicate"
        );
        assert_eq!(e("--kernel"), "--kernel needs a value");
        assert_eq!(e("--vcpus 1"), "--kernel is required");
        assert!(e("--kernel /k --pvm maybe").starts_with("--pvm:"));
        assert_eq!(e("--kernel /k --cid 5"), "--cid given without --vsock-uds");
    }

    fn api_args(c: thaw_vmm_api::VmmCommand) -> Vec<String> {
        c.args()
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect()
    }

    /// What thaw-vmm-api builds is what this parser reads, option by option.
    #[test]
    fn reads_the_boot_command_line_the_api_crate_builds() {
        use thaw_vmm_api::{BootArgs, Disk, Pvm, Serial};
        let minimal = api_args(BootArgs::new("/k").into());
        match parse(minimal).unwrap() {
            Launch::Boot(c) => assert_eq!(
                c,
                VmConfig {
                    kernel: "/k".into(),
                    ..VmConfig::default()
                }
            ),
            other => panic!("{other:?}"),
        }
        let full = BootArgs {
            initramfs: Some("/i".into()),
            disks: vec![Disk::read_only("/a"), Disk::read_write("/b,ro")],
            spare_disks: 2,
            vsock_uds: Some("/v".into()),
            cid: Some(7),
            vcpus: 2,
            memory_mib: 512,
            append: "quiet loglevel=0".into(),
            serial: Serial::File("none".into()),
            api_sock: Some("/api".into()),
            pvm: Pvm::On,
            ..BootArgs::new("/k")
        };
        match parse(api_args(full.into())).unwrap() {
            Launch::Boot(c) => assert_eq!(
                c,
                VmConfig {
                    kernel: "/k".into(),
                    initramfs: Some("/i".into()),
                    disks: vec![
                        DiskConfig {
                            path: "/a".into(),
                            read_only: true
                        },
                        DiskConfig {
                            path: "/b,ro".into(),
                            read_only: false
                        },
                    ],
                    spare_disks: 2,
                    vsock: Some(VsockConfig {
                        guest_cid: 7,
                        uds_path: "/v".into()
                    }),
                    vcpus: 2,
                    memory_mib: 512,
                    append: "quiet loglevel=0".into(),
                    serial: SerialOutput::File("./none".into()),
                    api_socket: Some("/api".into()),
                    pvm_quirks: PvmQuirks::On,
                }
            ),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn reads_the_restore_command_line_the_api_crate_builds() {
        use thaw_vmm_api::{Disk, RestoreArgs, Serial};
        match parse(api_args(RestoreArgs::new("/snap").into())).unwrap() {
            Launch::Restore(r) => {
                assert_eq!(r.snapshot, PathBuf::from("/snap"));
                assert!(r.vsock_uds.is_none() && r.disks.is_empty());
                assert!(r.serial.is_none() && r.api_socket.is_none());
            }
            other => panic!("{other:?}"),
        }
        let full = RestoreArgs {
            disks: vec![Disk::read_only("/root.img")],
            vsock_uds: Some("/v2".into()),
            serial: Some(Serial::None),
            api_sock: Some("/a".into()),
            ..RestoreArgs::new("/snap")
        };
        match parse(api_args(full.into())).unwrap() {
            Launch::Restore(r) => {
                assert_eq!(r.snapshot, PathBuf::from("/snap"));
                assert_eq!(
                    r.disks,
                    [DiskConfig {
                        path: "/root.img".into(),
                        read_only: true
                    }]
                );
                assert_eq!(r.vsock_uds, Some(PathBuf::from("/v2")));
                assert_eq!(r.serial, Some(SerialOutput::None));
                assert_eq!(r.api_socket, Some(PathBuf::from("/a")));
            }
            other => panic!("{other:?}"),
        }
    }
}
