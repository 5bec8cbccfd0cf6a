//! The container's root filesystem, inside its new mount namespace: the
//! spec's mounts, devices, pivot_root, masked and read-only paths.

use std::collections::VecDeque;
use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::stat::{makedev, mknod, Mode, SFlag};

use super::{fail, field_fail, R};
use crate::plan::{DevicePlan, MountPlan, RootfsPlan};

/// Resolves `unsafe_path` inside `root` the way the container will see it:
/// symlinks are followed but can never lead outside `root`.
pub fn secure_join(root: &Path, unsafe_path: &Path) -> std::io::Result<PathBuf> {
    let mut resolved = PathBuf::new();
    let mut pending: VecDeque<PathBuf> = unsafe_path
        .components()
        .map(|c| PathBuf::from(c.as_os_str()))
        .collect();
    let mut links = 0;
    while let Some(part) = pending.pop_front() {
        match part.components().next() {
            None | Some(Component::RootDir) | Some(Component::CurDir) => continue,
            Some(Component::ParentDir) => {
                resolved.pop();
            }
            Some(Component::Prefix(_)) => continue,
            Some(Component::Normal(name)) => {
                let candidate = resolved.join(name);
                let full = root.join(&candidate);
                match fs::symlink_metadata(&full) {
                    Ok(md) if md.file_type().is_symlink() => {
                        links += 1;
                        if links > 255 {
                            return Err(std::io::Error::from_raw_os_error(libc::ELOOP));
                        }
                        let target = fs::read_link(&full)?;
                        if target.is_absolute() {
                            resolved = PathBuf::new();
                        }
                        for c in target.components().rev() {
                            pending.push_front(PathBuf::from(c.as_os_str()));
                        }
                    }
                    _ => resolved = candidate,
                }
            }
        }
    }
    Ok(root.join(resolved))
}

/// Mount options split into flags, propagation and filesystem data.
#[derive(Debug, PartialEq)]
pub struct Options {
    pub flags: MsFlags,
    pub clear: MsFlags,
    pub propagation: MsFlags,
    pub data: Vec<String>,
    pub bind: bool,
}

pub fn parse_options(options: &[String]) -> Options {
    let mut o = Options {
        flags: MsFlags::empty(),
        clear: MsFlags::empty(),
        propagation: MsFlags::empty(),
        data: Vec::new(),
        bind: false,
    };
    for opt in options {
        let (set, clear): (MsFlags, MsFlags) = match opt.as_str() {
            "ro" => (MsFlags::MS_RDONLY, MsFlags::empty()),
            "rw" => (MsFlags::empty(), MsFlags::MS_RDONLY),
            "nosuid" => (MsFlags::MS_NOSUID, MsFlags::empty()),
            "suid" => (MsFlags::empty(), MsFlags::MS_NOSUID),
            "nodev" => (MsFlags::MS_NODEV, MsFlags::empty()),
            "dev" => (MsFlags::empty(), MsFlags::MS_NODEV),
            "noexec" => (MsFlags::MS_NOEXEC, MsFlags::empty()),
            "exec" => (MsFlags::empty(), MsFlags::MS_NOEXEC),
            "sync" => (MsFlags::MS_SYNCHRONOUS, MsFlags::empty()),
            "async" => (MsFlags::empty(), MsFlags::MS_SYNCHRONOUS),
            "dirsync" => (MsFlags::MS_DIRSYNC, MsFlags::empty()),
            "remount" => (MsFlags::MS_REMOUNT, MsFlags::empty()),
            "mand" => (MsFlags::MS_MANDLOCK, MsFlags::empty()),
            "nomand" => (MsFlags::empty(), MsFlags::MS_MANDLOCK),
            "noatime" => (MsFlags::MS_NOATIME, MsFlags::empty()),
            "atime" => (MsFlags::empty(), MsFlags::MS_NOATIME),
            "nodiratime" => (MsFlags::MS_NODIRATIME, MsFlags::empty()),
            "diratime" => (MsFlags::empty(), MsFlags::MS_NODIRATIME),
            "relatime" => (MsFlags::MS_RELATIME, MsFlags::empty()),
            "norelatime" => (MsFlags::empty(), MsFlags::MS_RELATIME),
            "strictatime" => (MsFlags::MS_STRICTATIME, MsFlags::empty()),
            "nostrictatime" => (MsFlags::empty(), MsFlags::MS_STRICTATIME),
            "bind" => {
                o.bind = true;
                (MsFlags::MS_BIND, MsFlags::empty())
            }
            "rbind" => {
                o.bind = true;
                (MsFlags::MS_BIND | MsFlags::MS_REC, MsFlags::empty())
            }
            "private" | "rprivate" | "shared" | "rshared" | "slave" | "rslave" | "unbindable"
            | "runbindable" => {
                o.propagation |= propagation_flags(opt).unwrap_or(MsFlags::empty());
                continue;
            }
            other => {
                o.data.push(other.to_string());
                continue;
            }
        };
        o.flags |= set;
        o.flags &= !clear;
        o.clear |= clear;
    }
    o
}

pub fn propagation_flags(name: &str) -> Option<MsFlags> {
    Some(match name {
        "private" => MsFlags::MS_PRIVATE,
        "rprivate" => MsFlags::MS_PRIVATE | MsFlags::MS_REC,
        "shared" => MsFlags::MS_SHARED,
        "rshared" => MsFlags::MS_SHARED | MsFlags::MS_REC,
        "slave" => MsFlags::MS_SLAVE,
        "rslave" => MsFlags::MS_SLAVE | MsFlags::MS_REC,
        "unbindable" => MsFlags::MS_UNBINDABLE,
        "runbindable" => MsFlags::MS_UNBINDABLE | MsFlags::MS_REC,
        _ => return None,
    })
}

fn mkdir_all(path: &Path) -> std::io::Result<()> {
    fs::create_dir_all(path)
}

fn ensure_file(path: &Path) -> std::io::Result<()> {
    if let Some(parent) = path.parent() {
        mkdir_all(parent)?;
    }
    match fs::symlink_metadata(path) {
        Ok(_) => Ok(()),
        Err(_) => fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map(drop),
    }
}

fn mount_one(root: &Path, m: &MountPlan) -> R<()> {
    let what = |msg: String| field_fail(&m.field, format!("{} on {}: {msg}", m.typ, m.destination));
    let dest = secure_join(root, Path::new(&m.destination))
        .map_err(|e| what(format!("resolving destination: {e}")))?;
    let opts = parse_options(&m.options);
    let typ = match m.typ.as_str() {
        // A v1 "cgroup" mount request gets the v2 hierarchy: the guest only
        // has cgroup v2.
        "cgroup" => "cgroup2",
        "" if opts.bind => "bind",
        t => t,
    };
    let bind = opts.bind || typ == "bind";

    let source_is_file = bind
        && fs::metadata(&m.source)
            .map(|md| !md.is_dir())
            .map_err(|e| what(format!("source {}: {e}", m.source)))?;
    if source_is_file {
        ensure_file(&dest)
    } else {
        mkdir_all(&dest)
    }
    .map_err(|e| what(format!("creating mount point {}: {e}", dest.display())))?;

    let data = opts.data.join(",");
    let data = (!data.is_empty()).then_some(data.as_str());
    if bind {
        let flags = MsFlags::MS_BIND | (opts.flags & MsFlags::MS_REC);
        mount(
            Some(m.source.as_str()),
            &dest,
            None::<&str>,
            flags,
            None::<&str>,
        )
        .map_err(|e| what(format!("bind mount of {}: {e}", m.source)))?;
        // Bind mounts ignore most flags on creation: apply them by remount.
        let extra = opts.flags & !(MsFlags::MS_BIND | MsFlags::MS_REC | MsFlags::MS_REMOUNT);
        if !extra.is_empty() {
            mount(
                None::<&str>,
                &dest,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REMOUNT | extra,
                None::<&str>,
            )
            .map_err(|e| what(format!("remounting with {extra:?}: {e}")))?;
        }
    } else {
        let source = if m.source.is_empty() {
            typ
        } else {
            m.source.as_str()
        };
        mount(Some(source), &dest, Some(typ), opts.flags, data)
            .map_err(|e| what(format!("mount: {e}")))?;
    }
    if !opts.propagation.is_empty() {
        mount(
            None::<&str>,
            &dest,
            None::<&str>,
            opts.propagation,
            None::<&str>,
        )
        .map_err(|e| what(format!("setting propagation: {e}")))?;
    }
    Ok(())
}

fn is_mounted_at(root: &Path, dest: &str) -> bool {
    let Ok(target) = secure_join(root, Path::new(dest)) else {
        return false;
    };
    fs::read_to_string("/proc/self/mountinfo")
        .map(|info| {
            info.lines().any(|l| {
                l.split(' ')
                    .nth(4)
                    .map(|mp| Path::new(mp) == target)
                    .unwrap_or(false)
            })
        })
        .unwrap_or(false)
}

fn make_device(root: &Path, d: &DevicePlan) -> R<()> {
    let field = format!("linux.devices({})", d.path);
    let dest = secure_join(root, Path::new(&d.path))
        .map_err(|e| field_fail(&field, format!("resolving path: {e}")))?;
    if let Some(parent) = dest.parent() {
        mkdir_all(parent).map_err(|e| field_fail(&field, e.to_string()))?;
    }
    let kind = match d.kind {
        'c' | 'u' => SFlag::S_IFCHR,
        'b' => SFlag::S_IFBLK,
        'p' => SFlag::S_IFIFO,
        other => return Err(field_fail(&field, format!("unknown device type {other:?}"))),
    };
    let _ = fs::remove_file(&dest);
    mknod(
        &dest,
        kind,
        Mode::from_bits_truncate(d.mode & 0o7777),
        makedev(d.major, d.minor),
    )
    .map_err(|e| field_fail(&field, format!("mknod {}: {e}", dest.display())))?;
    // mknod applies the umask; set the mode the spec asked for.
    fs::set_permissions(&dest, fs::Permissions::from_mode(d.mode & 0o7777))
        .map_err(|e| field_fail(&field, format!("chmod: {e}")))?;
    nix::unistd::chown(
        &dest,
        Some(nix::unistd::Uid::from_raw(d.uid)),
        Some(nix::unistd::Gid::from_raw(d.gid)),
    )
    .map_err(|e| field_fail(&field, format!("chown: {e}")))?;
    Ok(())
}

fn dev_symlinks(root: &Path) -> R<()> {
    let dev = secure_join(root, Path::new("/dev")).map_err(|e| fail(format!("/dev: {e}")))?;
    let links = [
        ("/proc/self/fd", "fd"),
        ("/proc/self/fd/0", "stdin"),
        ("/proc/self/fd/1", "stdout"),
        ("/proc/self/fd/2", "stderr"),
    ];
    for (target, name) in links {
        let path = dev.join(name);
        if fs::symlink_metadata(&path).is_err() {
            symlink(target, &path).map_err(|e| fail(format!("symlink {}: {e}", path.display())))?;
        }
    }
    // With a private devpts instance, /dev/ptmx must be its ptmx.
    if dev.join("pts/ptmx").exists() {
        let ptmx = dev.join("ptmx");
        let _ = fs::remove_file(&ptmx);
        symlink("pts/ptmx", &ptmx).map_err(|e| fail(format!("symlink /dev/ptmx: {e}")))?;
    }
    Ok(())
}

fn pivot(root: &Path) -> R<()> {
    nix::unistd::chdir(root).map_err(|e| fail(format!("chdir {}: {e}", root.display())))?;
    // pivot_root(".", ".") stacks the old root on top of the new one, so it
    // can be detached without needing a directory for it in the rootfs.
    nix::unistd::pivot_root(".", ".").map_err(|e| fail(format!("pivot_root: {e}")))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(|e| fail(format!("detaching old root: {e}")))?;
    nix::unistd::chdir("/").map_err(|e| fail(format!("chdir /: {e}")))?;
    Ok(())
}

fn mask(path: &str) -> R<()> {
    let field = format!("linux.maskedPaths({path})");
    let md = match fs::metadata(path) {
        Ok(md) => md,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(field_fail(field, e.to_string())),
    };
    let r = if md.is_dir() {
        mount(
            Some("tmpfs"),
            path,
            Some("tmpfs"),
            MsFlags::MS_RDONLY,
            None::<&str>,
        )
    } else {
        mount(
            Some("/dev/null"),
            path,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
    };
    r.map_err(|e| field_fail(field, e.to_string()))
}

fn make_readonly(path: &str, field: &str) -> R<()> {
    match fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(field_fail(field, e.to_string())),
        Ok(_) => {}
    }
    mount(
        Some(path),
        path,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(|e| field_fail(field, format!("bind: {e}")))?;
    mount(
        None::<&str>,
        path,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(|e| field_fail(field, format!("remount read-only: {e}")))
}

/// Builds the root filesystem and switches into it.
pub fn setup(r: &RootfsPlan) -> R<()> {
    let root = r.path.as_path();
    // Nothing we mount may propagate back into the agent's namespace.
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(|e| fail(format!("making / private: {e}")))?;
    // pivot_root needs the new root to be a mount point.
    mount(
        Some(root),
        root,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(|e| fail(format!("bind mounting rootfs {}: {e}", root.display())))?;

    for m in &r.mounts {
        mount_one(root, m)?;
    }

    let dev_mounted = is_mounted_at(root, "/dev");
    for d in &r.devices {
        make_device(root, d)?;
    }
    if dev_mounted {
        dev_symlinks(root)?;
    }

    pivot(root)?;

    // Before the read-only paths: /proc/sys is usually one of them.
    for (key, value) in &r.sysctl {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        fs::write(&path, value)
            .map_err(|e| field_fail(format!("linux.sysctl.{key}"), e.to_string()))?;
    }
    for p in &r.masked_paths {
        mask(p)?;
    }
    for p in &r.readonly_paths {
        make_readonly(p, &format!("linux.readonlyPaths({p})"))?;
    }
    if r.readonly {
        mount(
            None::<&str>,
            "/",
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
            None::<&str>,
        )
        .map_err(|e| field_fail("root.readonly", e.to_string()))?;
    }
    if let Some(p) = &r.propagation {
        let flags = propagation_flags(p)
            .ok_or_else(|| field_fail("linux.rootfsPropagation", format!("unknown value {p:?}")))?;
        mount(None::<&str>, "/", None::<&str>, flags, None::<&str>)
            .map_err(|e| field_fail("linux.rootfsPropagation", e.to_string()))?;
    }
    Ok(())
}

/// Binds the tty slave on /dev/console, as runc does, so programs that open
/// the console reach the container's terminal.
pub fn bind_console(slave_path: &Path) -> R<()> {
    let console = Path::new("/dev/console");
    if !Path::new("/dev").is_dir() {
        return Ok(());
    }
    ensure_file(console).map_err(|e| fail(format!("creating /dev/console: {e}")))?;
    mount(
        Some(slave_path),
        console,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(|e| {
        fail(format!(
            "binding {} on /dev/console: {e}",
            slave_path.display()
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secure_join_stays_inside_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir_all(root.join("a/b")).unwrap();
        symlink("/etc", root.join("a/abs")).unwrap();
        symlink("../../../../..", root.join("a/b/up")).unwrap();
        symlink("loop2", root.join("loop1")).unwrap();
        symlink("loop1", root.join("loop2")).unwrap();
        assert_eq!(
            secure_join(root, Path::new("/a/abs/hosts")).unwrap(),
            root.join("etc/hosts")
        );
        assert_eq!(
            secure_join(root, Path::new("/a/b/up/x")).unwrap(),
            root.join("x")
        );
        assert_eq!(
            secure_join(root, Path::new("../../x/./y")).unwrap(),
            root.join("x/y")
        );
        assert!(secure_join(root, Path::new("/loop1/z")).is_err());
    }

    #[test]
    fn options_split_into_flags_and_data() {
        let o = parse_options(&[
            "nosuid".into(),
            "rbind".into(),
            "ro".into(),
            "rslave".into(),
            "mode=755".into(),
            "size=65536k".into(),
        ]);
        assert!(o.bind);
        assert!(o
            .flags
            .contains(MsFlags::MS_NOSUID | MsFlags::MS_RDONLY | MsFlags::MS_REC));
        assert_eq!(o.propagation, MsFlags::MS_SLAVE | MsFlags::MS_REC);
        assert_eq!(o.data, vec!["mode=755", "size=65536k"]);
        let o = parse_options(&["ro".into(), "rw".into()]);
        assert!(!o.flags.contains(MsFlags::MS_RDONLY));
    }
}
