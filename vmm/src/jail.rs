//! The VMM's jail (`--jail UID:GID`), entered by the VMM itself before it
//! opens /dev/kvm or maps guest memory, while it is still one thread.
//!
//! What a jailed VMM has left, should a guest take over a device model:
//! - **Files**: a private mount namespace whose root is an empty read-only
//!   tmpfs holding bind mounts of only what this VM uses, each at its
//!   host path (so no path the VMM is given needs translating): its
//!   kernel, disks or template snapshot (read-only), the directories of
//!   its sockets and console file, `/dev/kvm`, `/dev/net/tun`, and the
//!   caller's `--jail-bind`s (the shim's: this namespace's image cache,
//!   read-only). No procfs (a root-owned procfs reaches the host through
//!   `/proc/1/root`): the few `/proc/self` files the VMM reads are opened
//!   before ([`crate::proc_self`]). Mounts are slaves of the host's, so
//!   the volumes the shim binds into the sandbox's share later appear in
//!   the jail too.
//! - **Identity**: the given uid and gid, no supplementary groups, and of
//!   root's capabilities only [`KEPT_CAPS`] (the bounding set is cut to
//!   them too). The virtio-fs server is why any are kept: like Kata's
//!   virtiofsd it serves files of any owner to the guest's root.
//! - **Processes**: its own pid namespace, as its pid 1
//!   ([`crate::pid_namespace`], entered first): it sees no other process.
//! - **IPC**: its own IPC namespace.
//! - The seccomp filter, installed later, before the guest runs.
//!
//! Not done: per-VM uids (VMMs share the jail uid; their mount and pid
//! namespaces keep them apart).

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};

use caps::{CapSet, Capability, CapsHashSet};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{unshare, CloneFlags};
use nix::unistd::{Gid, Uid};

use crate::cli::Launch;
use crate::config::SerialOutput;
use crate::pid_namespace::Parent;

/// Root's capabilities a jailed VMM keeps: the virtio-fs server creates,
/// chowns, chmods and opens files of any owner in the share (CHOWN,
/// DAC_OVERRIDE, FOWNER, FSETID); `attach_tap` creates the pod's tap in
/// the pod's network namespace (NET_ADMIN).
pub const KEPT_CAPS: [Capability; 5] = [
    Capability::CAP_CHOWN,
    Capability::CAP_DAC_OVERRIDE,
    Capability::CAP_FOWNER,
    Capability::CAP_FSETID,
    Capability::CAP_NET_ADMIN,
];

/// Device nodes every VM needs in its jail (those missing are skipped).
const DEVICES: &[&str] = &["/dev/kvm", "/dev/net/tun"];

/// Where the jail's root is assembled: a tmpfs mounted over the first of
/// these that exists, in the VMM's own mount namespace only.
const ASSEMBLY_POINTS: &[&str] = &["/tmp", "/mnt", "/run"];

/// Who the jailed VMM is and what else it may see.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JailConfig {
    pub uid: u32,
    pub gid: u32,
    /// Paths the caller adds (`--jail-bind`).
    pub binds: Vec<JailBind>,
    /// RLIMIT_FSIZE, in bytes (`--jail-max-file-size`).
    pub max_file_size: Option<u64>,
}

/// One host path visible in the jail, at the same path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JailBind {
    pub path: PathBuf,
    pub read_only: bool,
}

impl JailBind {
    pub fn ro(path: impl Into<PathBuf>) -> Self {
        JailBind {
            path: path.into(),
            read_only: true,
        }
    }

    pub fn rw(path: impl Into<PathBuf>) -> Self {
        JailBind {
            path: path.into(),
            read_only: false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error("jail: {what}: {source}")]
    Sys {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("jail: {0}")]
    Invalid(String),
}

/// Maps a failed call to [`JailError::Sys`] saying what was being done.
pub(crate) fn sys(what: impl Into<String>) -> impl FnOnce(nix::errno::Errno) -> JailError {
    let what = what.into();
    move |e| JailError::Sys {
        what,
        source: io::Error::from(e),
    }
}

fn caps_err(what: &'static str) -> impl FnOnce(caps::errors::CapsError) -> JailError {
    move |e| JailError::Sys {
        what: what.into(),
        source: io::Error::other(e.to_string()),
    }
}

/// Everything the VM described by `launch` opens by path after the jail
/// is entered, plus the caller's binds.
pub fn binds_for(launch: &Launch, extra: &[JailBind]) -> Vec<JailBind> {
    let mut binds = extra.to_vec();
    let parent_rw = |p: &Path| p.parent().map(JailBind::rw);
    let (disks, share, sockets, serial) = match launch {
        Launch::Boot(c) => {
            binds.push(JailBind::ro(&c.kernel));
            binds.extend(c.initramfs.as_ref().map(JailBind::ro));
            (
                &c.disks,
                &c.share,
                [
                    c.api_socket.as_deref(),
                    c.vsock.as_ref().map(|v| v.uds_path.as_path()),
                ],
                Some(&c.serial),
            )
        }
        Launch::Restore(r) => {
            binds.push(JailBind::ro(&r.snapshot));
            (
                &r.disks,
                &r.share,
                [r.api_socket.as_deref(), r.vsock_uds.as_deref()],
                r.serial.as_ref(),
            )
        }
    };
    binds.extend(disks.iter().map(|d| JailBind {
        path: d.path.clone(),
        read_only: d.read_only,
    }));
    binds.extend(share.iter().map(|s| JailBind {
        path: s.dir.clone(),
        read_only: s.read_only,
    }));
    binds.extend(sockets.into_iter().flatten().filter_map(parent_rw));
    if let Some(SerialOutput::File(f)) = serial {
        binds.extend(parent_rw(f));
    }
    if let Some(p) = std::env::var_os(crate::profile::PROFILE_ENV).filter(|p| !p.is_empty()) {
        binds.extend(parent_rw(Path::new(&p)));
    }
    binds.extend(
        DEVICES
            .iter()
            .filter(|d| Path::new(d).exists())
            .map(JailBind::rw),
    );
    binds
}

/// The binds to make, outermost first: paths made absolute and checked,
/// duplicates merged (read-write wins), and a path inside another bind
/// left to that one. A read-write path inside a read-only bind is an
/// error: it could not be written.
pub fn plan(binds: &[JailBind]) -> Result<Vec<JailBind>, JailError> {
    let mut merged: BTreeMap<PathBuf, bool> = BTreeMap::new();
    for b in binds {
        let abs = std::path::absolute(&b.path).map_err(|source| JailError::Sys {
            what: format!("resolving {}", b.path.display()),
            source,
        })?;
        if abs.components().any(|c| c == Component::ParentDir) || abs == Path::new("/") {
            return Err(JailError::Invalid(format!(
                "{} cannot be bound into the jail (the root, or a path with ..)",
                b.path.display()
            )));
        }
        let ro = merged.entry(abs).or_insert(true);
        *ro &= b.read_only;
    }
    let mut planned: Vec<JailBind> = Vec::new();
    for (path, read_only) in merged {
        if let Some(outer) = planned.iter().find(|o| path.starts_with(&o.path)) {
            if outer.read_only && !read_only {
                return Err(JailError::Invalid(format!(
                    "{} needs write access but lies in {}, bound read-only",
                    path.display(),
                    outer.path.display()
                )));
            }
            continue;
        }
        planned.push(JailBind { path, read_only });
    }
    Ok(planned)
}

/// Enters the jail; see the module's documentation. The process must be
/// single-threaded (a mount namespace is per process).
pub fn enter(config: &JailConfig, binds: &[JailBind], parent: &Parent) -> Result<(), JailError> {
    let binds = plan(binds)?;

    unshare(CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWIPC)
        .map_err(sys("unsharing the mount and IPC namespaces"))?;
    // Nothing mounted here reaches the host; the host's later mounts (the
    // share's volumes) still reach here.
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_SLAVE,
        None::<&str>,
    )
    .map_err(sys("making / a slave mount"))?;
    // The sources, opened before anything is mounted over them, and in
    // this namespace (a bind's source must be a mount of the caller's).
    let mut sources = Vec::with_capacity(binds.len());
    for b in &binds {
        let fd: OwnedFd = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH)
            .open(&b.path)
            .map_err(|source| JailError::Sys {
                what: format!("opening {}", b.path.display()),
                source,
            })?
            .into();
        let is_dir = fs::metadata(&b.path)
            .map_err(|source| JailError::Sys {
                what: format!("inspecting {}", b.path.display()),
                source,
            })?
            .is_dir();
        sources.push((fd, is_dir));
    }
    let base = ASSEMBLY_POINTS
        .iter()
        .map(Path::new)
        .find(|p| p.is_dir())
        .ok_or_else(|| {
            JailError::Invalid(format!(
                "none of {} exists to assemble the jail on",
                ASSEMBLY_POINTS.join(", ")
            ))
        })?;
    mount(
        Some("tmpfs"),
        base,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some("mode=0755,size=256k"),
    )
    .map_err(sys(format!(
        "mounting the jail's tmpfs on {}",
        base.display()
    )))?;
    for (b, (fd, is_dir)) in binds.iter().zip(&sources) {
        bind(base, b, fd, *is_dir)?;
    }
    drop(sources);

    nix::unistd::chdir(base).map_err(sys("entering the jail"))?;
    nix::unistd::pivot_root(".", ".").map_err(sys("pivot_root into the jail"))?;
    // The old root now sits on top of the new one: detach it.
    umount2(".", MntFlags::MNT_DETACH).map_err(sys("detaching the host's root"))?;
    nix::unistd::chdir("/").map_err(sys("entering the jail's root"))?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REMOUNT
            | MsFlags::MS_BIND
            | MsFlags::MS_RDONLY
            | MsFlags::MS_NOSUID
            | MsFlags::MS_NODEV
            | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .map_err(sys("making the jail's root read-only"))?;

    set_limits(config.max_file_size)?;
    drop_privileges(config.uid, config.gid)?;
    // A change of uid clears the parent-death signal and the dumpable
    // flag: set both again, then make sure the shim did not die meanwhile.
    // SAFETY: prctl with integer arguments only.
    let failed = unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0
            || libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) != 0
    };
    if failed {
        return Err(JailError::Sys {
            what: "restoring the parent-death signal and non-dumpable flag".into(),
            source: io::Error::last_os_error(),
        });
    }
    if parent.exited() {
        return Err(JailError::Invalid(
            "the VMM's parent exited while it entered the jail".into(),
        ));
    }
    Ok(())
}

/// Binds one source (by its fd) at its own path under `base`.
fn bind(base: &Path, b: &JailBind, fd: &OwnedFd, is_dir: bool) -> Result<(), JailError> {
    let target = base.join(b.path.strip_prefix("/").unwrap_or(&b.path));
    let io_err = |what: &str| {
        let what = format!("{what} {}", target.display());
        move |source| JailError::Sys { what, source }
    };
    if let Some(dir) = target.parent() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)
            .map_err(io_err("creating"))?;
    }
    if is_dir {
        fs::DirBuilder::new()
            .mode(0o755)
            .create(&target)
            .map_err(io_err("creating"))?;
    } else {
        fs::File::create(&target).map_err(io_err("creating"))?;
    }
    let source = format!("/proc/self/fd/{}", fd.as_raw_fd());
    mount(
        Some(source.as_str()),
        &target,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(sys(format!("binding {} into the jail", b.path.display())))?;
    // Flags of a bind change only by a remount. Device nodes keep theirs.
    let device = b.path.starts_with("/dev");
    let mut flags =
        MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC;
    if !device {
        flags |= MsFlags::MS_NODEV;
    }
    if b.read_only {
        flags |= MsFlags::MS_RDONLY;
    }
    mount(None::<&str>, &target, None::<&str>, flags, None::<&str>)
        .map_err(sys(format!("restricting {} in the jail", b.path.display())))
}

/// The most descriptors a jailed VMM may hold: the virtio-fs server's
/// inode and handle bounds, and room for its devices and sockets. Its hard
/// limit too, so it can never raise it.
pub const MAX_FILES: u64 = (crate::devices::virtio::fs::passthrough::MAX_INODES
    + crate::devices::virtio::fs::passthrough::MAX_HANDLES
    + 1024) as u64;

fn set_limits(max_file_size: Option<u64>) -> Result<(), JailError> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(sys("reading RLIMIT_NOFILE"))?;
    let limit = hard.min(MAX_FILES);
    setrlimit(Resource::RLIMIT_NOFILE, limit, limit).map_err(sys("setting RLIMIT_NOFILE"))?;
    if let Some(bytes) = max_file_size {
        // A write past the limit must fail (EFBIG, passed to the guest),
        // not kill the VMM.
        // SAFETY: ignoring a signal; no handler runs.
        unsafe {
            nix::sys::signal::signal(
                nix::sys::signal::Signal::SIGXFSZ,
                nix::sys::signal::SigHandler::SigIgn,
            )
        }
        .map_err(sys("ignoring SIGXFSZ"))?;
        setrlimit(Resource::RLIMIT_FSIZE, bytes, bytes).map_err(sys("setting RLIMIT_FSIZE"))?;
    }
    Ok(())
}

/// Becomes `uid`:`gid` with only [`KEPT_CAPS`].
fn drop_privileges(uid: u32, gid: u32) -> Result<(), JailError> {
    let kept: CapsHashSet = KEPT_CAPS.into_iter().collect();
    for cap in caps::all().difference(&kept) {
        // Capabilities this kernel does not know cannot be dropped.
        if caps::has_cap(None, CapSet::Bounding, *cap).unwrap_or(false) {
            caps::drop(None, CapSet::Bounding, *cap)
                .map_err(caps_err("cutting the capability bounding set"))?;
        }
    }
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0) } != 0 {
        return Err(JailError::Sys {
            what: "keeping capabilities across the uid change".into(),
            source: io::Error::last_os_error(),
        });
    }
    nix::unistd::setgroups(&[]).map_err(sys("dropping supplementary groups"))?;
    let (gid, uid) = (Gid::from_raw(gid), Uid::from_raw(uid));
    nix::unistd::setresgid(gid, gid, gid).map_err(sys(format!("becoming gid {gid}")))?;
    nix::unistd::setresuid(uid, uid, uid).map_err(sys(format!("becoming uid {uid}")))?;
    caps::set(None, CapSet::Permitted, &kept).map_err(caps_err("narrowing permitted caps"))?;
    caps::set(None, CapSet::Effective, &kept).map_err(caps_err("raising the kept caps"))?;
    caps::clear(None, CapSet::Inheritable).map_err(caps_err("clearing inheritable caps"))?;
    caps::clear(None, CapSet::Ambient).map_err(caps_err("clearing ambient caps"))?;
    // SAFETY: prctl with integer arguments only.
    unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, 0, 0, 0, 0) };
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plan_merges_nests_and_refuses() {
        let p = plan(&[
            JailBind::rw("/run/s/api.sock/.."),
            JailBind::ro("/img/ns/a"),
            JailBind::rw("/run/s"),
            JailBind::ro("/run/s"),
            JailBind::ro("/run/s/share"),
            JailBind::ro("/k/vmlinux"),
            JailBind::ro("/k/vmlinux"),
        ]);
        // A `..` is refused before anything else.
        assert!(matches!(p, Err(JailError::Invalid(m)) if m.contains("..")));
        let p = plan(&[
            JailBind::ro("/img/ns/a"),
            JailBind::rw("/run/s"),
            JailBind::ro("/run/s"),
            JailBind::ro("/run/s/share"),
            JailBind::ro("/k/vmlinux"),
            JailBind::ro("/k/vmlinux"),
            JailBind::rw("/run/sx"),
        ])
        .unwrap();
        assert_eq!(
            p,
            [
                JailBind::ro("/img/ns/a"),
                JailBind::ro("/k/vmlinux"),
                JailBind::rw("/run/s"),
                JailBind::rw("/run/sx"),
            ]
        );
        let e = plan(&[JailBind::ro("/img"), JailBind::rw("/img/ns/a/x")]).unwrap_err();
        assert!(e.to_string().contains("/img/ns/a/x"), "{e}");
        assert!(plan(&[JailBind::rw("/")]).is_err());
    }

    #[test]
    fn a_restore_binds_its_snapshot_disks_and_socket_dirs() {
        let launch = crate::cli::parse([
            "thaw-vmm",
            "--restore",
            "/t/abc",
            "--disk",
            "/i/root.img,ro",
            "--vsock-uds",
            "/run/s/v.sock",
            "--api-sock",
            "/run/s/api.sock",
            "--serial",
            "/var/log/c",
        ])
        .unwrap();
        let crate::cli::Invocation::Launch { launch, .. } = launch else {
            panic!("not a launch");
        };
        let binds = plan(&binds_for(&launch, &[JailBind::ro("/img/ns/x")])).unwrap();
        let want = [
            JailBind::ro("/i/root.img"),
            JailBind::ro("/img/ns/x"),
            JailBind::rw("/run/s"),
            JailBind::ro("/t/abc"),
            JailBind::rw("/var/log"),
        ];
        for w in want {
            assert!(binds.contains(&w), "{w:?} missing from {binds:?}");
        }
    }
}
