//! `thaw-vmm`'s command line as data: fill in [`BootArgs`], [`RestoreArgs`]
//! or [`TemplateBuildArgs`], wrap it in [`VmmCommand`] and get a
//! `std::process::Command`. Numbers are always passed (the VMM's defaults
//! are this crate's `Default`s); optional paths only when set. The VMM's
//! parser (`thaw-vmm`'s `cli` module, with the `template` subcommand's
//! arguments in `template`) is tested against these argv.

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::process::Command;

/// One `thaw-vmm` invocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmmCommand {
    /// Boot a kernel (cold boot).
    Boot(BootArgs),
    /// Resume a VM from a snapshot directory.
    Restore(RestoreArgs),
    /// `thaw-vmm template build`: boot once, wait for the guest, snapshot
    /// into the store; prints the template's directory on its last line.
    TemplateBuild(TemplateBuildArgs),
}

/// A virtio-blk disk backed by a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    pub path: PathBuf,
    pub read_only: bool,
}

impl Disk {
    pub fn read_only(path: impl Into<PathBuf>) -> Disk {
        Disk {
            path: path.into(),
            read_only: true,
        }
    }

    pub fn read_write(path: impl Into<PathBuf>) -> Disk {
        Disk {
            path: path.into(),
            read_only: false,
        }
    }

    /// `PATH,ro` or `PATH,rw`: with the suffix always there, a path that
    /// itself ends in `,ro` keeps its meaning.
    fn arg(&self) -> OsString {
        with_suffix(&self.path, if self.read_only { ",ro" } else { ",rw" })
    }
}

/// A host directory the guest sees through virtio-fs (tag `thaw-share`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Share {
    pub dir: PathBuf,
    pub read_only: bool,
}

impl Share {
    /// `DIR,ro` or `DIR,rw` (the suffix always there, as for disks).
    fn arg(&self) -> OsString {
        with_suffix(&self.dir, if self.read_only { ",ro" } else { ",rw" })
    }
}

/// Run the VMM jailed (`--jail`, `--jail-bind`): as `uid`:`gid`, in a
/// mount namespace holding only its own files and these paths.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Jail {
    pub uid: u32,
    pub gid: u32,
    /// Host paths the VMM opens later (by `attach_disk`, say) that it is
    /// not told of on its command line.
    pub binds: Vec<JailBind>,
    /// The largest file the VMM may write (RLIMIT_FSIZE), in bytes.
    pub max_file_size: Option<u64>,
}

/// A host path visible in the jail, at the same path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JailBind {
    pub path: PathBuf,
    pub read_only: bool,
}

impl Jail {
    fn push_args(&self, a: &mut Argv) {
        a.opt("--jail", format!("{}:{}", self.uid, self.gid));
        if let Some(n) = self.max_file_size {
            a.opt("--jail-max-file-size", n.to_string());
        }
        for b in &self.binds {
            a.opt(
                "--jail-bind",
                with_suffix(&b.path, if b.read_only { ",ro" } else { ",rw" }),
            );
        }
    }
}

/// Where the guest console goes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Serial {
    None,
    #[default]
    Stdout,
    File(PathBuf),
}

impl Serial {
    fn arg(&self) -> OsString {
        match self {
            Serial::None => "none".into(),
            Serial::Stdout => "stdout".into(),
            // Files named like the keywords must not be read as them.
            Serial::File(p) if p == Path::new("none") || p == Path::new("stdout") => {
                Path::new(".").join(p).into()
            }
            Serial::File(p) => p.into(),
        }
    }
}

/// The guest workarounds for PVM hosts (`--pvm`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Pvm {
    /// On when the host's KVM is PVM.
    #[default]
    Auto,
    On,
    Off,
}

impl Pvm {
    fn arg(self) -> &'static str {
        match self {
            Pvm::Auto => "auto",
            Pvm::On => "on",
            Pvm::Off => "off",
        }
    }
}

/// How a template build recognises a ready guest (`--ready`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReadyProbe {
    /// The guest agent: ready once it dials the ready port. The connection
    /// stays open until the snapshot is taken, so the agent sits idle in it
    /// and re-dials after a restore resets it.
    #[default]
    Agent,
    /// thaw's test init (tests/test-init): walked through its boot steps
    /// (disk report, nonce, echo on port 5001) to its serve loop, where it
    /// re-dials after a restore and says `ready`.
    TestInit,
}

impl ReadyProbe {
    /// The word `--ready` takes.
    pub fn arg(self) -> &'static str {
        match self {
            ReadyProbe::Agent => "agent",
            ReadyProbe::TestInit => "test-init",
        }
    }
}

/// A cold boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootArgs {
    /// Uncompressed ELF guest kernel (vmlinux).
    pub kernel: PathBuf,
    pub initramfs: Option<PathBuf>,
    /// In order: the first is /dev/vda.
    pub disks: Vec<Disk>,
    /// Empty disk slots for `attach_disk`.
    pub spare_disks: u32,
    /// Turns on virtio-vsock; the host side is this Unix socket.
    pub vsock_uds: Option<PathBuf>,
    /// Guest CID; needs `vsock_uds`. The VMM's default is 3.
    pub cid: Option<u32>,
    pub vcpus: u32,
    pub memory_mib: u32,
    /// Appended to thaw's guest command line; not passed when empty.
    pub append: String,
    pub serial: Serial,
    /// The control socket.
    pub api_sock: Option<PathBuf>,
    pub pvm: Pvm,
    /// The NIC's MAC, `xx:xx:xx:xx:xx:xx`; None: the VMM's fixed, locally
    /// administered one.
    pub net_mac: Option<String>,
    /// Bind the NIC to this tap at start (created if missing, in the VMM's
    /// network namespace); None: no backend until `attach_tap`.
    pub tap: Option<String>,
    /// Export this directory through virtio-fs from the start; None: none
    /// until `attach_share`.
    pub share: Option<Share>,
    /// System calls to forbid on top of the VMM's filter (names or numbers).
    pub deny_syscalls: Vec<String>,
    /// None: the VMM runs unjailed (as its caller).
    pub jail: Option<Jail>,
}

impl BootArgs {
    /// Boots `kernel` with the VMM's defaults for everything else.
    pub fn new(kernel: impl Into<PathBuf>) -> BootArgs {
        BootArgs {
            kernel: kernel.into(),
            initramfs: None,
            disks: Vec::new(),
            spare_disks: 0,
            vsock_uds: None,
            cid: None,
            vcpus: 1,
            memory_mib: 256,
            append: String::new(),
            serial: Serial::Stdout,
            api_sock: None,
            pvm: Pvm::Auto,
            net_mac: None,
            tap: None,
            share: None,
            deny_syscalls: Vec::new(),
            jail: None,
        }
    }
}

/// A restore: only host-side resources; the snapshot fixes the rest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoreArgs {
    pub snapshot: PathBuf,
    /// Replace the snapshot's disks in order (as many or fewer).
    pub disks: Vec<Disk>,
    /// The new vsock socket.
    pub vsock_uds: Option<PathBuf>,
    /// None: where the snapshotted VM's console went.
    pub serial: Option<Serial>,
    pub api_sock: Option<PathBuf>,
    /// Bind the NIC to this tap at start; a snapshot never carries one.
    pub tap: Option<String>,
    /// Export this directory through virtio-fs at start; a snapshot never
    /// carries one.
    pub share: Option<Share>,
    /// System calls to forbid on top of the VMM's filter (names or numbers).
    pub deny_syscalls: Vec<String>,
    /// None: the VMM runs unjailed (as its caller).
    pub jail: Option<Jail>,
}

impl RestoreArgs {
    pub fn new(snapshot: impl Into<PathBuf>) -> RestoreArgs {
        RestoreArgs {
            snapshot: snapshot.into(),
            disks: Vec::new(),
            vsock_uds: None,
            serial: None,
            api_sock: None,
            tap: None,
            share: None,
            deny_syscalls: Vec::new(),
            jail: None,
        }
    }
}

/// `thaw-vmm template build`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateBuildArgs {
    pub kernel: PathBuf,
    /// The root disk (read-only, /dev/vda).
    pub root_image: PathBuf,
    pub spare_disks: u32,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub ready: ReadyProbe,
    /// The vsock port a ready guest dials; None: the probe's usual one
    /// (1024 for the agent, 1234 for the test init).
    pub ready_port: Option<u32>,
    /// Give up on the build after this long.
    pub timeout_secs: u64,
    /// After a failed build, fail at once with its reason for this long.
    pub retry_after_secs: u64,
    /// None: the VMM's default store (/var/lib/thaw/templates).
    pub store: Option<PathBuf>,
    /// Keep the store within this many MiB (least recently used unused
    /// templates go); None: no quota.
    pub max_store_mib: Option<u64>,
}

impl TemplateBuildArgs {
    pub fn new(kernel: impl Into<PathBuf>, root_image: impl Into<PathBuf>) -> TemplateBuildArgs {
        TemplateBuildArgs {
            kernel: kernel.into(),
            root_image: root_image.into(),
            spare_disks: 0,
            vcpus: 1,
            memory_mib: 256,
            ready: ReadyProbe::Agent,
            ready_port: None,
            timeout_secs: 300,
            retry_after_secs: 600,
            store: None,
            max_store_mib: None,
        }
    }
}

fn with_suffix(path: &Path, suffix: &str) -> OsString {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    s
}

/// Collects `--option value` pairs.
#[derive(Default)]
struct Argv(Vec<OsString>);

impl Argv {
    fn opt(&mut self, name: &str, value: impl AsRef<OsStr>) {
        self.0.push(name.into());
        self.0.push(value.as_ref().to_owned());
    }

    fn opt_if(&mut self, name: &str, value: Option<impl AsRef<OsStr>>) {
        if let Some(v) = value {
            self.opt(name, v);
        }
    }

    fn number(&mut self, name: &str, value: impl ToString) {
        self.opt(name, value.to_string());
    }
}

impl VmmCommand {
    /// The arguments after the program name.
    pub fn args(&self) -> Vec<OsString> {
        let mut a = Argv::default();
        match self {
            VmmCommand::Boot(b) => {
                a.opt("--kernel", &b.kernel);
                a.opt_if("--initramfs", b.initramfs.as_ref());
                for d in &b.disks {
                    a.opt("--disk", d.arg());
                }
                a.number("--spare-disks", b.spare_disks);
                a.opt_if("--vsock-uds", b.vsock_uds.as_ref());
                a.opt_if("--cid", b.cid.map(|c| c.to_string()));
                a.number("--vcpus", b.vcpus);
                a.number("--memory-mib", b.memory_mib);
                if !b.append.is_empty() {
                    a.opt("--append", &b.append);
                }
                a.opt("--serial", b.serial.arg());
                a.opt_if("--api-sock", b.api_sock.as_ref());
                a.opt("--pvm", b.pvm.arg());
                a.opt_if("--net-mac", b.net_mac.as_ref());
                a.opt_if("--tap", b.tap.as_ref());
                a.opt_if("--share", b.share.as_ref().map(Share::arg));
                for c in &b.deny_syscalls {
                    a.opt("--deny-syscall", c);
                }
                if let Some(j) = &b.jail {
                    j.push_args(&mut a);
                }
            }
            VmmCommand::Restore(r) => {
                a.opt("--restore", &r.snapshot);
                for d in &r.disks {
                    a.opt("--disk", d.arg());
                }
                a.opt_if("--vsock-uds", r.vsock_uds.as_ref());
                a.opt_if("--serial", r.serial.as_ref().map(Serial::arg));
                a.opt_if("--api-sock", r.api_sock.as_ref());
                a.opt_if("--tap", r.tap.as_ref());
                a.opt_if("--share", r.share.as_ref().map(Share::arg));
                for c in &r.deny_syscalls {
                    a.opt("--deny-syscall", c);
                }
                if let Some(j) = &r.jail {
                    j.push_args(&mut a);
                }
            }
            VmmCommand::TemplateBuild(t) => {
                a.0.push("template".into());
                a.0.push("build".into());
                a.opt("--kernel", &t.kernel);
                a.opt("--disk", with_suffix(&t.root_image, ",ro"));
                a.number("--spare-disks", t.spare_disks);
                a.number("--vcpus", t.vcpus);
                a.number("--memory-mib", t.memory_mib);
                a.opt("--ready", t.ready.arg());
                a.opt_if("--ready-port", t.ready_port.map(|p| p.to_string()));
                a.number("--timeout", t.timeout_secs);
                a.number("--retry-after", t.retry_after_secs);
                a.opt_if("--store", t.store.as_ref());
                a.opt_if("--max-store-mib", t.max_store_mib.map(|m| m.to_string()));
            }
        }
        a.0
    }

    /// `vmm` with [`Self::args`]; stdio and environment are the caller's.
    pub fn command(&self, vmm: &Path) -> Command {
        let mut c = Command::new(vmm);
        c.args(self.args());
        c
    }
}

impl From<BootArgs> for VmmCommand {
    fn from(b: BootArgs) -> Self {
        VmmCommand::Boot(b)
    }
}

impl From<RestoreArgs> for VmmCommand {
    fn from(r: RestoreArgs) -> Self {
        VmmCommand::Restore(r)
    }
}

impl From<TemplateBuildArgs> for VmmCommand {
    fn from(t: TemplateBuildArgs) -> Self {
        VmmCommand::TemplateBuild(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(c: impl Into<VmmCommand>) -> String {
        let args = c.into().args();
        let words: Vec<String> = args.iter().map(|a| a.to_string_lossy().into()).collect();
        words.join(" ")
    }

    #[test]
    fn a_minimal_boot_states_the_defaults() {
        assert_eq!(
            argv(BootArgs::new("/k")),
            "--kernel /k --spare-disks 0 --vcpus 1 --memory-mib 256 --serial stdout --pvm auto"
        );
    }

    #[test]
    fn a_full_boot() {
        let b = BootArgs {
            initramfs: Some("/i".into()),
            disks: vec![Disk::read_only("/a"), Disk::read_write("/b,ro")],
            spare_disks: 8,
            vsock_uds: Some("/v".into()),
            cid: Some(7),
            vcpus: 2,
            memory_mib: 512,
            append: "quiet loglevel=0".into(),
            serial: Serial::File("/c".into()),
            api_sock: Some("/api".into()),
            pvm: Pvm::Off,
            net_mac: Some("02:00:00:00:00:07".into()),
            tap: Some("tap7".into()),
            share: Some(Share {
                dir: "/srv/p,ro".into(),
                read_only: false,
            }),
            deny_syscalls: vec!["openat2".into(), "39".into()],
            ..BootArgs::new("/k")
        };
        let args = VmmCommand::Boot(b).args();
        let expected = [
            "--kernel",
            "/k",
            "--initramfs",
            "/i",
            "--disk",
            "/a,ro",
            "--disk",
            "/b,ro,rw",
            "--spare-disks",
            "8",
            "--vsock-uds",
            "/v",
            "--cid",
            "7",
            "--vcpus",
            "2",
            "--memory-mib",
            "512",
            "--append",
            "quiet loglevel=0",
            "--serial",
            "/c",
            "--api-sock",
            "/api",
            "--pvm",
            "off",
            "--net-mac",
            "02:00:00:00:00:07",
            "--tap",
            "tap7",
            "--share",
            "/srv/p,ro,rw",
            "--deny-syscall",
            "openat2",
            "--deny-syscall",
            "39",
        ];
        assert_eq!(args, expected.map(OsString::from));
    }

    #[test]
    fn serial_files_named_like_keywords_stay_files() {
        assert_eq!(Serial::None.arg(), "none");
        assert_eq!(Serial::File("none".into()).arg(), "./none");
        assert_eq!(Serial::File("stdout".into()).arg(), "./stdout");
        assert_eq!(Serial::File("console.log".into()).arg(), "console.log");
    }

    #[test]
    fn a_restore_passes_only_what_is_set() {
        assert_eq!(argv(RestoreArgs::new("/snap")), "--restore /snap");
        let r = RestoreArgs {
            disks: vec![Disk::read_only("/root.img")],
            vsock_uds: Some("/r/v.sock".into()),
            serial: Some(Serial::None),
            api_sock: Some("/r/api.sock".into()),
            tap: Some("tap0".into()),
            share: Some(Share {
                dir: "/r/shared".into(),
                read_only: true,
            }),
            jail: Some(Jail {
                uid: 65534,
                gid: 65533,
                binds: vec![JailBind {
                    path: "/img/ns/a".into(),
                    read_only: true,
                }],
                max_file_size: Some(1 << 20),
            }),
            ..RestoreArgs::new("/t/abc")
        };
        assert_eq!(
            argv(r),
            "--restore /t/abc --disk /root.img,ro --vsock-uds /r/v.sock --serial none \
             --api-sock /r/api.sock --tap tap0 --share /r/shared,ro \
             --jail 65534:65533 --jail-max-file-size 1048576 --jail-bind /img/ns/a,ro"
        );
    }

    #[test]
    fn a_template_build() {
        assert_eq!(
            argv(TemplateBuildArgs::new("/k", "/r")),
            "template build --kernel /k --disk /r,ro --spare-disks 0 --vcpus 1 --memory-mib 256 \
             --ready agent --timeout 300 --retry-after 600"
        );
        let t = TemplateBuildArgs {
            spare_disks: 2,
            memory_mib: 128,
            ready: ReadyProbe::TestInit,
            ready_port: Some(4321),
            timeout_secs: 5,
            store: Some("/s".into()),
            max_store_mib: Some(2048),
            ..TemplateBuildArgs::new("/k", "/r")
        };
        assert_eq!(
            argv(t),
            "template build --kernel /k --disk /r,ro --spare-disks 2 --vcpus 1 --memory-mib 128 \
             --ready test-init --ready-port 4321 --timeout 5 --retry-after 600 --store /s \
             --max-store-mib 2048"
        );
    }

    #[test]
    fn command_runs_the_given_binary() {
        let c = VmmCommand::Restore(RestoreArgs::new("/snap")).command(Path::new("/bin/thaw-vmm"));
        assert_eq!(c.get_program(), "/bin/thaw-vmm");
        assert_eq!(c.get_args().collect::<Vec<_>>(), ["--restore", "/snap"]);
    }
}
