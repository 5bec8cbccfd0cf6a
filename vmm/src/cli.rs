//! `thaw-vmm`'s command line, on clap: boot a kernel, resume a snapshot,
//! or `thaw-vmm template ...`. A bad command line exits 64 (EX_USAGE)
//! with clap's message, which names the option at fault; `--help` exits 0.
//! `thaw-vmm-api`'s command builder writes these argv, and the tests below
//! parse what it writes.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::error::ErrorKind;
use clap::{Args, Parser, Subcommand};

use crate::config::{DiskConfig, PvmQuirks, SerialOutput, ShareConfig, VmConfig, VsockConfig};
use crate::jail::{JailBind, JailConfig};
use crate::snapshot::RestoreOptions;
use crate::template::TemplateCommand;

/// What the command line asks for: boot a kernel, or resume a snapshot.
#[derive(Debug)]
pub enum Launch {
    Boot(VmConfig),
    Restore(RestoreOptions),
}

/// Everything `thaw-vmm` can be asked to do.
#[derive(Debug)]
pub enum Invocation {
    /// Run a VM; `deny_syscalls` are forbidden on top of the VMM's filter;
    /// jailed if `jail` says so.
    Launch {
        launch: Launch,
        deny_syscalls: Vec<libc::c_long>,
        jail: Option<JailConfig>,
    },
    Template(TemplateCommand),
}

/// The exit status of a bad command line (sysexits' EX_USAGE).
pub const EXIT_USAGE: i32 = 64;

/// Boots one micro-VM and runs it until the guest stops or the control
/// socket says stop.
#[derive(Debug, Parser)]
#[command(
    name = "thaw-vmm",
    version,
    // The last of a repeated option wins, as callers appending overrides expect.
    args_override_self = true,
    subcommand_negates_reqs = true,
    args_conflicts_with_subcommands = true,
    after_help = "Exit status: 0 the guest reset or powered off, or was stopped; \
                  2 the guest triple-faulted; 1 a VMM or KVM error; 64 a bad command line."
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    launch: LaunchArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Build, list and remove VM templates (booted, snapshotted VMs).
    #[command(subcommand)]
    Template(TemplateCommand),
}

#[derive(Debug, Args)]
struct LaunchArgs {
    /// Uncompressed ELF guest kernel (vmlinux).
    #[arg(
        long,
        value_name = "PATH",
        required_unless_present = "restore",
        conflicts_with = "restore"
    )]
    kernel: Option<PathBuf>,
    /// Initramfs to load (prefer a root disk: it is faster).
    #[arg(long, value_name = "PATH", conflicts_with = "restore")]
    initramfs: Option<PathBuf>,
    /// Virtio-blk disk from a raw file (repeatable; the first is /dev/vda).
    /// With --restore, replaces the snapshot's disks in order.
    #[arg(long = "disk", value_name = "PATH[,ro]", value_parser = parse_disk)]
    disks: Vec<DiskConfig>,
    /// Empty virtio-blk slots for attach_disk.
    #[arg(
        long,
        value_name = "N",
        default_value_t = 0,
        conflicts_with = "restore"
    )]
    spare_disks: u8,
    /// Enable virtio-vsock; the host side is this Unix socket.
    #[arg(long, value_name = "PATH")]
    vsock_uds: Option<PathBuf>,
    /// Guest vsock CID [default: 3].
    #[arg(
        long,
        value_name = "N",
        requires = "vsock_uds",
        conflicts_with = "restore"
    )]
    cid: Option<u32>,
    /// Number of vCPUs.
    #[arg(
        long,
        value_name = "N",
        default_value_t = 1,
        conflicts_with = "restore"
    )]
    vcpus: u8,
    /// Guest memory in MiB.
    #[arg(
        long,
        value_name = "N",
        default_value_t = 256,
        conflicts_with = "restore"
    )]
    memory_mib: u32,
    /// Extra guest kernel command line.
    #[arg(
        long,
        value_name = "STRING",
        default_value = "",
        hide_default_value = true,
        allow_hyphen_values = true,
        conflicts_with = "restore"
    )]
    append: String,
    /// Where the guest console goes: stdout, none or a file [default:
    /// stdout; with --restore, where the snapshotted VM's went].
    #[arg(long, value_name = "stdout|none|PATH", value_parser = parse_serial)]
    serial: Option<SerialOutput>,
    /// Control socket (pause, resume, stop, status, snapshot, ...).
    #[arg(long, value_name = "PATH")]
    api_sock: Option<PathBuf>,
    /// Guest workarounds for PVM hosts.
    #[arg(long, value_name = "MODE", value_enum, default_value_t = PvmQuirks::Auto,
          conflicts_with = "restore")]
    pvm: PvmQuirks,
    /// The NIC's MAC [default: 02:74:68:61:77:01, locally administered].
    #[arg(long, value_name = "MAC", value_parser = parse_mac, conflicts_with = "restore")]
    net_mac: Option<[u8; 6]>,
    /// Bind the NIC to this tap at start (created if missing, in the VMM's
    /// network namespace). Without it the NIC has no backend until the
    /// attach_tap control request.
    #[arg(long, value_name = "NAME")]
    tap: Option<String>,
    /// Export this host directory through virtio-fs (tag thaw-share) from
    /// the start; `,ro` makes the VMM refuse every write. Without it the
    /// device has no share until the attach_share control request.
    #[arg(long, value_name = "DIR[,ro]", value_parser = parse_share)]
    share: Option<ShareConfig>,
    /// Resume the VM saved in DIR (by the snapshot control request) instead
    /// of booting; --vsock-uds gives it a new socket.
    #[arg(long, value_name = "DIR")]
    restore: Option<PathBuf>,
    /// Forbid this system call too (repeatable): a name the VMM uses only
    /// for virtio-fs (openat2, getdents64, ...) or a number. Calling it
    /// kills the VMM (SIGSYS).
    #[arg(long = "deny-syscall", value_name = "NAME|NR", value_parser = crate::seccomp::deniable)]
    deny_syscalls: Vec<libc::c_long>,
    /// Run jailed as UID:GID: a private mount namespace holding only this
    /// VM's files, a few capabilities kept for virtio-fs and the tap, an
    /// own IPC namespace.
    #[arg(long, value_name = "UID:GID", value_parser = parse_ids)]
    jail: Option<(u32, u32)>,
    /// Make this host path visible in the jail too, at the same path
    /// (repeatable; `,ro` read-only).
    #[arg(long = "jail-bind", value_name = "PATH[,ro]", value_parser = parse_disk,
          requires = "jail")]
    jail_binds: Vec<DiskConfig>,
    /// The largest file the jailed VMM may write, in bytes (RLIMIT_FSIZE):
    /// a guest's write past it into a volume's file fails with EFBIG.
    #[arg(long = "jail-max-file-size", value_name = "BYTES", requires = "jail")]
    jail_max_file_size: Option<u64>,
}

/// `UID:GID`, numbers.
fn parse_ids(value: &str) -> Result<(u32, u32), String> {
    let bad = || format!("expected UID:GID (numbers), got {value:?}");
    let (u, g) = value.split_once(':').ok_or_else(bad)?;
    Ok((u.parse().map_err(|_| bad())?, g.parse().map_err(|_| bad())?))
}

/// `PATH`, `PATH,ro` or `PATH,rw`.
fn parse_disk(value: &str) -> Result<DiskConfig, String> {
    let (path, read_only) = match value.strip_suffix(",ro") {
        Some(p) => (p, true),
        None => (value.strip_suffix(",rw").unwrap_or(value), false),
    };
    if path.is_empty() {
        return Err("expected PATH or PATH,ro".into());
    }
    Ok(DiskConfig {
        path: path.into(),
        read_only,
    })
}

/// `DIR`, `DIR,ro` or `DIR,rw`.
fn parse_share(value: &str) -> Result<ShareConfig, String> {
    let disk = parse_disk(value).map_err(|_| "expected DIR or DIR,ro".to_string())?;
    Ok(ShareConfig {
        dir: disk.path,
        read_only: disk.read_only,
    })
}

/// `xx:xx:xx:xx:xx:xx`, hexadecimal; a unicast address.
fn parse_mac(value: &str) -> Result<[u8; 6], String> {
    let bad = || format!("expected a MAC like 02:00:00:00:00:01, got {value:?}");
    let mut mac = [0u8; 6];
    let mut parts = value.split(':');
    for byte in &mut mac {
        let part = parts.next().filter(|p| p.len() == 2).ok_or_else(bad)?;
        *byte = u8::from_str_radix(part, 16).map_err(|_| bad())?;
    }
    if parts.next().is_some() {
        return Err(bad());
    }
    if mac[0] & 1 != 0 {
        return Err(format!("{value} is a multicast address"));
    }
    Ok(mac)
}

fn parse_serial(value: &str) -> Result<SerialOutput, String> {
    Ok(match value {
        "stdout" => SerialOutput::Stdout,
        "none" => SerialOutput::None,
        file => SerialOutput::File(file.into()),
    })
}

impl LaunchArgs {
    fn into_launch(self) -> Result<Launch, clap::Error> {
        if let Some(snapshot) = self.restore {
            return Ok(Launch::Restore(RestoreOptions {
                snapshot,
                vsock_uds: self.vsock_uds,
                disks: self.disks,
                serial: self.serial,
                api_socket: self.api_sock,
                tap: self.tap,
                share: self.share,
            }));
        }
        // clap enforces it (required_unless_present); this keeps it so.
        let kernel = self.kernel.ok_or_else(|| {
            clap::Error::raw(
                ErrorKind::MissingRequiredArgument,
                "--kernel or --restore is required\n",
            )
        })?;
        Ok(Launch::Boot(VmConfig {
            kernel,
            initramfs: self.initramfs,
            disks: self.disks,
            spare_disks: self.spare_disks,
            vsock: self.vsock_uds.map(|uds_path| VsockConfig {
                guest_cid: self.cid.unwrap_or(3),
                uds_path,
            }),
            vcpus: self.vcpus,
            memory_mib: self.memory_mib,
            append: self.append,
            serial: self.serial.unwrap_or(SerialOutput::Stdout),
            api_socket: self.api_sock,
            pvm_quirks: self.pvm,
            net_mac: self
                .net_mac
                .unwrap_or(crate::devices::virtio::net::DEFAULT_MAC),
            tap: self.tap,
            share: self.share,
        }))
    }
}

/// Parses a whole argv, program name first.
pub fn parse<I, T>(argv: I) -> Result<Invocation, clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let cli = Cli::try_parse_from(argv)?;
    match cli.command {
        Some(Command::Template(t)) => Ok(Invocation::Template(t)),
        None => {
            let deny_syscalls = cli.launch.deny_syscalls.clone();
            let jail = cli.launch.jail.map(|(uid, gid)| JailConfig {
                uid,
                gid,
                binds: cli
                    .launch
                    .jail_binds
                    .iter()
                    .map(|b| JailBind {
                        path: b.path.clone(),
                        read_only: b.read_only,
                    })
                    .collect(),
                max_file_size: cli.launch.jail_max_file_size,
            });
            Ok(Invocation::Launch {
                launch: cli.launch.into_launch()?,
                deny_syscalls,
                jail,
            })
        }
    }
}

/// Prints a parse failure (help to stdout, mistakes to stderr) and returns
/// the exit status: 0 for --help and --version, 64 for a mistake.
pub fn report(e: &clap::Error) -> i32 {
    // Nothing useful is left to do if the terminal is gone.
    let _ = e.print();
    report_status(e.kind())
}

/// 0 for --help and --version, 64 for everything else clap refuses.
pub fn report_status(kind: ErrorKind) -> i32 {
    match kind {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => 0,
        _ => EXIT_USAGE,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        std::iter::once("thaw-vmm")
            .chain(s.split_whitespace())
            .map(String::from)
            .collect()
    }

    fn launch(argv: Vec<String>) -> Launch {
        match parse(argv).unwrap() {
            Invocation::Launch { launch, .. } => launch,
            other => panic!("expected a launch, got {other:?}"),
        }
    }

    fn boot(s: &str) -> VmConfig {
        match launch(args(s)) {
            Launch::Boot(c) => c,
            other => panic!("expected a boot, got {other:?}"),
        }
    }

    fn err(s: &str) -> clap::Error {
        parse(args(s)).unwrap_err()
    }

    #[test]
    fn jail_takes_ids_and_binds() {
        match parse(args(
            "--kernel /k --jail 65534:65533 --jail-bind /i,ro --jail-bind /s",
        ))
        .unwrap()
        {
            Invocation::Launch { jail, .. } => assert_eq!(
                jail,
                Some(JailConfig {
                    uid: 65534,
                    gid: 65533,
                    binds: vec![JailBind::ro("/i"), JailBind::rw("/s")],
                    max_file_size: None,
                })
            ),
            _ => panic!("not a launch"),
        }
        match parse(args("--kernel /k --jail 1:2 --jail-max-file-size 4096")).unwrap() {
            Invocation::Launch { jail, .. } => {
                assert_eq!(jail.and_then(|j| j.max_file_size), Some(4096))
            }
            _ => panic!("not a launch"),
        }
        for bad in [
            "--jail 1",
            "--jail a:1",
            "--jail 1:-1",
            "--jail-bind /i",
            "--jail-max-file-size 5",
        ] {
            let e = err(&format!("--kernel /k {bad}")).to_string();
            assert!(e.contains("--jail"), "{bad}: {e}");
        }
    }

    #[test]
    fn deny_syscall_takes_names_and_numbers() {
        match parse(args("--kernel /k --deny-syscall openat2 --deny-syscall 39")).unwrap() {
            Invocation::Launch { deny_syscalls, .. } => {
                assert_eq!(deny_syscalls, [libc::SYS_openat2, 39]);
            }
            other => panic!("expected a launch, got {other:?}"),
        }
        let e = err("--kernel /k --deny-syscall fork2").to_string();
        assert!(e.contains("--deny-syscall") && e.contains("fork2"), "{e}");
    }

    #[test]
    fn parses_a_full_command_line() {
        let c = boot(
            "--kernel /k --disk /a,ro --disk /b --spare-disks 2 --vsock-uds /v --cid 7 \
             --vcpus 2 --memory-mib 512 --serial none --api-sock /api --pvm off \
             --net-mac 02:aB:00:00:00:01 --tap tap3 --share /srv/p,ro",
        );
        assert_eq!(
            c.share,
            Some(ShareConfig {
                dir: "/srv/p".into(),
                read_only: true
            })
        );
        assert_eq!(c.net_mac, [2, 0xab, 0, 0, 0, 1]);
        assert_eq!(c.tap.as_deref(), Some("tap3"));
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
        assert_eq!(
            c,
            VmConfig {
                kernel: "/k".into(),
                ..VmConfig::default()
            }
        );
        assert_eq!(
            boot("--kernel /k --vsock-uds /v").vsock.unwrap().guest_cid,
            3
        );
    }

    #[test]
    fn the_last_of_a_repeated_option_wins() {
        assert_eq!(boot("--kernel /k --vcpus 2 --vcpus 3").vcpus, 3);
    }

    #[test]
    fn append_takes_words_that_look_like_options() {
        let mut argv = args("--kernel /k --append");
        argv.push("--foo bar".into());
        match launch(argv) {
            Launch::Boot(c) => assert_eq!(c.append, "--foo bar"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn restore_takes_host_resources_only() {
        match launch(args(
            "--restore /snap --vsock-uds /v2 --disk /img,ro --api-sock /a --tap t1 --share /d",
        )) {
            Launch::Restore(r) => {
                assert_eq!(
                    r.share,
                    Some(ShareConfig {
                        dir: "/d".into(),
                        read_only: false
                    })
                );
                assert_eq!(r.tap.as_deref(), Some("t1"));
                assert_eq!(r.snapshot, PathBuf::from("/snap"));
                assert_eq!(r.vsock_uds, Some(PathBuf::from("/v2")));
                assert_eq!(r.disks.len(), 1);
                assert!(r.serial.is_none());
            }
            other => panic!("{other:?}"),
        }
        for fixed in [
            "--kernel /k",
            "--initramfs /i",
            "--spare-disks 1",
            "--vcpus 2",
            "--memory-mib 64",
            "--append quiet",
            "--pvm on",
            "--net-mac 02:00:00:00:00:01",
        ] {
            let e = err(&format!("--restore /snap {fixed}"));
            assert_eq!(e.kind(), ErrorKind::ArgumentConflict, "{fixed}: {e}");
            let option = fixed.split(' ').next().unwrap();
            assert!(e.to_string().contains(option), "{e}");
        }
    }

    #[test]
    fn mistakes_name_the_option() {
        let e = err("--kernel /k --vcpus two");
        assert_eq!(e.kind(), ErrorKind::ValueValidation);
        assert!(e.to_string().contains("'--vcpus <N>'"), "{e}");
        assert!(e.to_string().contains("'two'"), "{e}");
        assert!(err("--kernel /k --vcpus 300")
            .to_string()
            .contains("--vcpus"));
        let e = err("--kernel /k --frobnicate 1");
        assert_eq!(e.kind(), ErrorKind::UnknownArgument);
        assert!(e.to_string().contains("--frobnicate"), "{e}");
        let e = err("--kernel");
        assert!(e.to_string().contains("--kernel"), "{e}");
        let e = err("--vcpus 1");
        assert_eq!(e.kind(), ErrorKind::MissingRequiredArgument);
        assert!(e.to_string().contains("--kernel"), "{e}");
        let e = err("--kernel /k --pvm maybe");
        assert!(e.to_string().contains("--pvm"), "{e}");
        let e = err("--kernel /k --cid 5");
        assert_eq!(e.kind(), ErrorKind::MissingRequiredArgument);
        assert!(e.to_string().contains("--vsock-uds"), "{e}");
        for bad in [
            "02:00:00:00:00",
            "02:00:00:00:00:01:02",
            "zz:00:00:00:00:01",
            "2:0:0:0:0:1",
        ] {
            let e = err(&format!("--kernel /k --net-mac {bad}"));
            assert!(e.to_string().contains("--net-mac"), "{e}");
        }
        let e = err("--kernel /k --net-mac 01:00:5e:00:00:01");
        assert!(e.to_string().contains("multicast"), "{e}");
        let e = err("--kernel /k --disk ,ro");
        assert!(e.to_string().contains("expected PATH or PATH,ro"), "{e}");
        for bad in [err("--vcpus x"), err("--kernel /k template list")] {
            assert_eq!(report_status(bad.kind()), EXIT_USAGE, "{bad}");
        }
        assert_eq!(report_status(err("--help").kind()), 0);
        assert_eq!(report_status(err("template --help").kind()), 0);
    }

    fn api_args(c: thaw_vmm_api::VmmCommand) -> Vec<OsString> {
        std::iter::once(OsString::from("thaw-vmm"))
            .chain(c.args())
            .collect()
    }

    /// What thaw-vmm-api builds is what this parser reads, option by option.
    #[test]
    fn reads_the_boot_command_line_the_api_crate_builds() {
        use thaw_vmm_api::{BootArgs, Disk, Pvm, Serial, Share};
        let minimal = api_args(BootArgs::new("/k").into());
        match launch_os(minimal) {
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
            net_mac: Some("02:00:00:00:00:09".into()),
            tap: Some("tap9".into()),
            share: Some(Share {
                dir: "/srv/x,ro".into(),
                read_only: false,
            }),
            ..BootArgs::new("/k")
        };
        match launch_os(api_args(full.into())) {
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
                    net_mac: [2, 0, 0, 0, 0, 9],
                    tap: Some("tap9".into()),
                    share: Some(ShareConfig {
                        dir: "/srv/x,ro".into(),
                        read_only: false
                    }),
                }
            ),
            other => panic!("{other:?}"),
        }
        let off = BootArgs {
            pvm: Pvm::Off,
            serial: Serial::None,
            ..BootArgs::new("/k")
        };
        match launch_os(api_args(off.into())) {
            Launch::Boot(c) => {
                assert_eq!(c.pvm_quirks, PvmQuirks::Off);
                assert_eq!(c.serial, SerialOutput::None);
            }
            other => panic!("{other:?}"),
        }
    }

    fn launch_os(argv: Vec<OsString>) -> Launch {
        match parse(argv).unwrap() {
            Invocation::Launch { launch, .. } => launch,
            other => panic!("expected a launch, got {other:?}"),
        }
    }

    #[test]
    fn reads_the_restore_command_line_the_api_crate_builds() {
        use thaw_vmm_api::{Disk, RestoreArgs, Serial, Share};
        match launch_os(api_args(RestoreArgs::new("/snap").into())) {
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
            tap: Some("tap2".into()),
            share: Some(Share {
                dir: "/r/s".into(),
                read_only: true,
            }),
            ..RestoreArgs::new("/snap")
        };
        match launch_os(api_args(full.into())) {
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
                assert_eq!(r.tap.as_deref(), Some("tap2"));
                assert_eq!(
                    r.share,
                    Some(ShareConfig {
                        dir: "/r/s".into(),
                        read_only: true
                    })
                );
            }
            other => panic!("{other:?}"),
        }
    }
}
