//! Read-only erofs images of container root filesystems, cached by content
//! per containerd namespace and shared by every shim on the host.
//!
//! Layout under `<state_dir>/images/` (every directory 0700, every file
//! 0600, whatever the umask: an image is a tenant's root filesystem):
//! - `ns/<namespace>/<key>.erofs`: a finished image (never written again
//!   once renamed in);
//! - `ns/<namespace>/refs/<key>/<owner-hash>`: one file per container
//!   using the image, its text names the owner (`namespace/container-id`);
//! - `ns/<namespace>/locks/<key>.lock`: flock serializing build, reference
//!   and removal of one key across shim processes;
//! - `ns/<namespace>/tmp/`, `ns/<namespace>/mnt/`: images being built and
//!   overlay views being read.
//!
//! Tenants apart: a containerd namespace is the unit of tenancy (CRI uses
//! `k8s.io`, each `ctr -n` user its own), so each namespace has its own
//! directory of images, references and locks, and no lookup ever leaves
//! it. Within a namespace the key (`rootfs::content_key`) names the exact
//! inodes and their ctime, so it cannot be forged either: see that module.
//! The namespace is checked against containerd's own rule for names
//! before it becomes a path component.
//!
//! The budget is global: unreferenced images of all namespaces together
//! are kept up to `keep_unused_mib`, then the least recently used go,
//! whichever namespace they are in. A per-namespace budget would let disk
//! use grow with the number of namespaces, which a tenant may choose; a
//! global one means a busy namespace can push another's *unused* images
//! out (a rebuild later, never a wrong image), and referenced images are
//! never evicted.
//!
//! Older shims kept images flat (`images/<key>.erofs`, `images/refs/`,
//! `images/locks/`). A bundle record of theirs still names its
//! `cache_dir` (`images/`) and key, so `release_ref` releases it the same
//! way; `gc` removes flat images once nothing references them (they are
//! never looked up again).

use std::fs::{self, File};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use thaw_snapshots::private;

use crate::child;
use crate::error::{Error, IoContext, Result};
use crate::rootfs::{self, RootfsSource};

/// mkfs.erofs flags; part of the cache key.
const MKFS_FLAGS: &[&str] = &["--preserve-mtime", "--quiet"];
const MKFS_TIMEOUT: Duration = Duration::from_secs(600);
/// The kernel's limit on mount option text.
const MAX_MOUNT_DATA: usize = 4095;
/// Where the per-namespace directories live, under `images/`.
const NS_DIR: &str = "ns";
/// containerd's limit on a namespace name.
const MAX_NAMESPACE: usize = 76;

/// One container's hold on a cached image. Plain data so it can be stored
/// in the bundle and released by `delete` after a shim crash. `cache_dir`
/// is the namespace's directory (`images/ns/<namespace>`), or `images/`
/// in records written by shims before namespaces were kept apart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRef {
    pub key: String,
    pub path: PathBuf,
    pub owner: String,
    pub cache_dir: PathBuf,
}

#[derive(Debug, Clone)]
pub struct ImageCache {
    dir: PathBuf,
    mkfs: PathBuf,
    keep_unused_bytes: u64,
}

/// What `acquire` did, for logs and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Hit,
    Built,
}

fn owner_file(owner: &str) -> String {
    let mut h = Sha256::new();
    h.update(owner.as_bytes());
    format!("{:x}", h.finalize())[..32].to_string()
}

/// Checks a containerd namespace name the way containerd does (letters and
/// digits, single `.`, `_` or `-` between them, at most 76 bytes), so it
/// is one safe path component: never empty, `.`, `..` or with a `/`.
pub fn validate_namespace(ns: &str) -> Result<()> {
    let bad = |why: &str| Err(Error::ImageCache(format!("namespace {ns:?} {why}")));
    if ns.is_empty() {
        return bad("is empty");
    }
    if ns.len() > MAX_NAMESPACE {
        return bad("is longer than 76 bytes");
    }
    let b = ns.as_bytes();
    let sep = |c: u8| matches!(c, b'.' | b'_' | b'-');
    if !b.iter().all(|&c| c.is_ascii_alphanumeric() || sep(c)) {
        return bad("has characters other than letters, digits, '.', '_' and '-'");
    }
    if sep(b[0]) || sep(b[b.len() - 1]) || b.windows(2).any(|w| sep(w[0]) && sep(w[1])) {
        return bad("must start and end with a letter or digit and not repeat separators");
    }
    Ok(())
}

/// An exclusive flock on `locks/<key>.lock`, re-taken if GC unlinked the
/// file while we waited for it.
struct KeyLock {
    _lock: Flock<File>,
}

impl KeyLock {
    fn take(dir: &Path, key: &str, wait: bool) -> Result<Option<KeyLock>> {
        let path = dir.join("locks").join(format!("{key}.lock"));
        loop {
            let f = private::open_lock_file(&path).ctx(|| format!("opening {}", path.display()))?;
            let arg = if wait {
                FlockArg::LockExclusive
            } else {
                FlockArg::LockExclusiveNonblock
            };
            let lock = match Flock::lock(f, arg) {
                Ok(l) => l,
                Err((_, nix::errno::Errno::EWOULDBLOCK)) if !wait => return Ok(None),
                Err((_, e)) => {
                    return Err(Error::io(format!("locking {}", path.display()), e.into()))
                }
            };
            let same = match (lock.metadata(), fs::metadata(&path)) {
                (Ok(a), Ok(b)) => a.ino() == b.ino() && a.dev() == b.dev(),
                _ => false,
            };
            if same {
                return Ok(Some(KeyLock { _lock: lock }));
            }
        }
    }
}

/// Unmounts (lazily) and removes a temporary mount point when dropped.
struct TempMount(PathBuf);

impl Drop for TempMount {
    fn drop(&mut self) {
        if let Err(e) = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH) {
            log::warn!("unmounting {}: {e}", self.0.display());
        }
        let _ = fs::remove_dir(&self.0);
    }
}

fn private_dir(p: &Path) -> Result<()> {
    private::create_dir_all(p).ctx(|| format!("creating {}", p.display()))
}

/// The image directory of `namespace` under `state_dir`, made if missing
/// (0700): what a sandbox's VMM may read images from.
pub fn namespace_dir(state_dir: &Path, namespace: &str) -> Result<PathBuf> {
    let cache = ImageCache::new(state_dir, 0, Path::new(""));
    let dir = cache.ns_dir(namespace)?;
    cache.ensure_dirs(&dir)?;
    Ok(dir)
}

impl ImageCache {
    pub fn new(state_dir: &Path, keep_unused_mib: u64, mkfs: &Path) -> Self {
        ImageCache {
            dir: state_dir.join("images"),
            mkfs: mkfs.to_path_buf(),
            keep_unused_bytes: keep_unused_mib.saturating_mul(1 << 20),
        }
    }

    /// The directory of one namespace's images (the namespace checked).
    fn ns_dir(&self, namespace: &str) -> Result<PathBuf> {
        validate_namespace(namespace)?;
        Ok(self.dir.join(NS_DIR).join(namespace))
    }

    /// Creates (or narrows to 0700) the cache's directories down to the
    /// namespace's.
    fn ensure_dirs(&self, ns_dir: &Path) -> Result<()> {
        private_dir(&self.dir)?;
        private_dir(&self.dir.join(NS_DIR))?;
        for d in ["", "refs", "locks", "tmp", "mnt"] {
            private_dir(&ns_dir.join(d))?;
        }
        Ok(())
    }

    /// Finds or builds the image for `src` in `namespace`'s cache and
    /// records `owner` as a user.
    pub fn acquire(
        &self,
        src: &RootfsSource,
        namespace: &str,
        owner: &str,
    ) -> Result<(ImageRef, Outcome)> {
        let ns_dir = self.ns_dir(namespace)?;
        self.ensure_dirs(&ns_dir)?;
        let extra = format!("mkfs.erofs {}", MKFS_FLAGS.join(" "));
        let key = rootfs::content_key(src, &extra)?;
        let _lock = KeyLock::take(&ns_dir, &key, true)?;
        let path = entry_path(&ns_dir, &key);
        let outcome = if path.exists() {
            Outcome::Hit
        } else {
            self.build(src, &ns_dir, &key, &path)?;
            Outcome::Built
        };
        let refs = ns_dir.join("refs").join(&key);
        private_dir(&refs)?;
        let rf = refs.join(owner_file(owner));
        private::write_file(&rf, owner.as_bytes()).ctx(|| format!("writing {}", rf.display()))?;
        // The mtime orders unreferenced entries for eviction.
        if let Ok(f) = File::open(&path) {
            let _ = f.set_modified(SystemTime::now());
        }
        Ok((
            ImageRef {
                key,
                path,
                owner: owner.to_string(),
                cache_dir: ns_dir,
            },
            outcome,
        ))
    }

    fn build(&self, src: &RootfsSource, ns_dir: &Path, key: &str, dest: &Path) -> Result<()> {
        let unique = format!("{key}.{}", std::process::id());
        let tmp = ns_dir.join("tmp").join(format!("{unique}.erofs"));
        let _ = fs::remove_file(&tmp);
        let (input, _mount) = match src {
            RootfsSource::Dir(d) => (d.clone(), None),
            RootfsSource::Overlay(layers) => {
                let mp = ns_dir.join("mnt").join(&unique);
                let m = mount_merged_view(layers, &mp)?;
                (mp, Some(m))
            }
        };
        let mut cmd = Command::new(&self.mkfs);
        cmd.args(MKFS_FLAGS).arg(&tmp).arg(&input);
        let res = child::run(&mut cmd, MKFS_TIMEOUT);
        let fin = match res {
            Ok(f) => f,
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                return Err(Error::ImageCache(format!(
                    "running {}: {e}",
                    self.mkfs.display()
                )));
            }
        };
        if fin.code != 0 {
            let _ = fs::remove_file(&tmp);
            let msg = format!("{}{}", fin.stderr.trim(), fin.stdout.trim());
            return Err(Error::ImageCache(format!(
                "{} failed for {} (exit {}): {}",
                self.mkfs.display(),
                input.display(),
                fin.code,
                msg.lines().last().unwrap_or("")
            )));
        }
        // mkfs.erofs made the file from the umask; only the VMM (root)
        // reads it, through its own read-only open.
        if let Err(e) = private::restrict_file(&tmp) {
            let _ = fs::remove_file(&tmp);
            return Err(Error::io(format!("chmod {}", tmp.display()), e));
        }
        fs::rename(&tmp, dest).ctx(|| format!("renaming {} into the cache", tmp.display()))?;
        Ok(())
    }

    /// Drops one container's reference and collects garbage.
    pub fn release(&self, r: &ImageRef) -> Result<()> {
        release_ref(r)?;
        self.gc().map(|_| ())
    }

    /// Evicts unreferenced images of every namespace beyond the budget,
    /// least recently used first, and unreferenced images of the old flat
    /// layout whatever the budget; returns the removed keys.
    pub fn gc(&self) -> Result<Vec<String>> {
        let mut removed = Vec::new();
        // The flat layout of older shims: never looked up again.
        for (_, key, _) in unreferenced(&self.dir)? {
            if evict(&self.dir, &key)? {
                removed.push(key);
            }
        }
        let ns_root = self.dir.join(NS_DIR);
        let mut unused = Vec::new();
        let namespaces = match fs::read_dir(&ns_root) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(removed),
            Err(e) => return Err(Error::io(format!("reading {}", ns_root.display()), e)),
        };
        for ns in namespaces.flatten() {
            let ns_dir = ns.path();
            for (mtime, key, size) in unreferenced(&ns_dir)? {
                unused.push((mtime, ns_dir.clone(), key, size));
            }
        }
        unused.sort();
        let mut total: u64 = unused.iter().map(|u| u.3).sum();
        for (_, ns_dir, key, size) in unused {
            if total <= self.keep_unused_bytes {
                break;
            }
            if evict(&ns_dir, &key)? {
                total = total.saturating_sub(size);
                removed.push(key);
            }
        }
        Ok(removed)
    }
}

fn entry_path(dir: &Path, key: &str) -> PathBuf {
    dir.join(format!("{key}.erofs"))
}

/// The images in `dir` that no container references: (mtime, key, size).
fn unreferenced(dir: &Path) -> Result<Vec<(SystemTime, String, u64)>> {
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(format!("reading {}", dir.display()), e)),
    };
    let mut unused = Vec::new();
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let Some(key) = name.strip_suffix(".erofs") else {
            continue;
        };
        if has_refs(dir, key) {
            continue;
        }
        if let Ok(md) = e.metadata() {
            let mtime = md.modified().unwrap_or(SystemTime::UNIX_EPOCH);
            unused.push((mtime, key.to_string(), md.len()));
        }
    }
    Ok(unused)
}

/// Removes `dir`'s image `key` unless another shim holds its lock or it
/// gained a reference meanwhile; true if it was removed.
fn evict(dir: &Path, key: &str) -> Result<bool> {
    let Some(lock) = KeyLock::take(dir, key, false)? else {
        return Ok(false);
    };
    if has_refs(dir, key) {
        return Ok(false);
    }
    let removed = fs::remove_file(entry_path(dir, key)).is_ok();
    let _ = fs::remove_dir(dir.join("refs").join(key));
    let _ = fs::remove_file(dir.join("locks").join(format!("{key}.lock")));
    drop(lock);
    Ok(removed)
}

fn has_refs(dir: &Path, key: &str) -> bool {
    fs::read_dir(dir.join("refs").join(key))
        .map(|mut rd| rd.next().is_some())
        .unwrap_or(false)
}

/// Removes one reference file (and its key dir when it was the last). Used
/// by `delete` after a crash too, where no config is at hand; works for
/// records of the flat layout as well (their `cache_dir` is `images/`).
pub fn release_ref(r: &ImageRef) -> Result<()> {
    if r.key.is_empty() || !r.key.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(Error::ImageCache(format!(
            "the bundle record names image key {:?}, not a cache key",
            r.key
        )));
    }
    let _lock = KeyLock::take(&r.cache_dir, &r.key, true)?;
    let refs = r.cache_dir.join("refs").join(&r.key);
    let rf = refs.join(owner_file(&r.owner));
    match fs::remove_file(&rf) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io(format!("removing {}", rf.display()), e)),
    }
    let _ = fs::remove_dir(&refs);
    Ok(())
}

/// Mounts the read-only merged view of overlay `layers` (topmost first).
fn mount_merged_view(layers: &[PathBuf], mp: &Path) -> Result<TempMount> {
    let lower: Vec<String> = layers.iter().map(|l| l.display().to_string()).collect();
    let data = format!("lowerdir={}", lower.join(":"));
    if data.len() > MAX_MOUNT_DATA {
        return Err(Error::Rootfs(format!(
            "{} overlay layers make a mount option of {} bytes, over the kernel's {MAX_MOUNT_DATA}",
            layers.len(),
            data.len()
        )));
    }
    private_dir(mp)?;
    nix::mount::mount(
        Some("overlay"),
        mp,
        Some("overlay"),
        nix::mount::MsFlags::MS_RDONLY,
        Some(data.as_str()),
    )
    .map_err(|e| {
        let _ = fs::remove_dir(mp);
        Error::Rootfs(format!(
            "mounting the overlay view of {} layers: {e}",
            layers.len()
        ))
    })?;
    Ok(TempMount(mp.to_path_buf()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn have_mkfs() -> bool {
        Command::new("mkfs.erofs").arg("--help").output().is_ok()
    }

    fn tree(root: &Path, content: &str) {
        fs::create_dir_all(root.join("bin")).unwrap();
        fs::write(root.join("bin/app"), content).unwrap();
    }

    fn cache(state: &Path, keep_mib: u64) -> ImageCache {
        ImageCache::new(state, keep_mib, Path::new("mkfs.erofs"))
    }

    #[test]
    fn build_hit_release_and_gc() {
        if !have_mkfs() {
            panic!("mkfs.erofs (erofs-utils) must be installed for this test");
        }
        let state = tempfile::tempdir().unwrap();
        let src = tempfile::tempdir().unwrap();
        tree(src.path(), "v1");
        let c = cache(state.path(), 0);
        let s = RootfsSource::Dir(src.path().into());
        let (r1, o1) = c.acquire(&s, "ns", "ns/a").unwrap();
        assert_eq!(o1, Outcome::Built);
        assert!(r1.path.exists());
        // erofs superblock magic at offset 1024.
        let img = fs::read(&r1.path).unwrap();
        assert_eq!(&img[1024..1028], &0xE0F5_E1E2u32.to_le_bytes());
        let (r2, o2) = c.acquire(&s, "ns", "ns/b").unwrap();
        assert_eq!(o2, Outcome::Hit);
        assert_eq!(r1.path, r2.path);

        c.release(&r1).unwrap();
        assert!(r1.path.exists(), "still referenced by ns/b");
        c.release(&r2).unwrap();
        assert!(
            !r1.path.exists(),
            "budget 0: evicted with its last reference"
        );
        assert_eq!(
            fs::read_dir(state.path().join("images/ns/ns/refs"))
                .unwrap()
                .count(),
            0
        );
    }

    #[test]
    fn unused_images_are_kept_within_budget() {
        let state = tempfile::tempdir().unwrap();
        let src = tempfile::tempdir().unwrap();
        tree(src.path(), "v1");
        let c = cache(state.path(), 64);
        let (r, _) = c
            .acquire(&RootfsSource::Dir(src.path().into()), "ns", "ns/a")
            .unwrap();
        c.release(&r).unwrap();
        assert!(r.path.exists(), "kept for reuse under the 64 MiB budget");
        let (_, o) = c
            .acquire(&RootfsSource::Dir(src.path().into()), "ns", "ns/b")
            .unwrap();
        assert_eq!(o, Outcome::Hit);
    }

    #[test]
    fn changed_content_gets_a_new_image() {
        let state = tempfile::tempdir().unwrap();
        let src = tempfile::tempdir().unwrap();
        tree(src.path(), "v1");
        let c = cache(state.path(), 64);
        let (a, _) = c
            .acquire(&RootfsSource::Dir(src.path().into()), "ns", "ns/a")
            .unwrap();
        fs::write(src.path().join("bin/app"), "version two").unwrap();
        let (b, o) = c
            .acquire(&RootfsSource::Dir(src.path().into()), "ns", "ns/b")
            .unwrap();
        assert_eq!(o, Outcome::Built);
        assert_ne!(a.key, b.key);
    }

    #[test]
    fn overlay_layers_are_merged_with_whiteouts() {
        let state = tempfile::tempdir().unwrap();
        let d = tempfile::tempdir().unwrap();
        let lower = d.path().join("lower");
        let upper = d.path().join("upper");
        fs::create_dir_all(lower.join("etc")).unwrap();
        fs::write(lower.join("etc/gone"), "x").unwrap();
        fs::write(lower.join("etc/kept"), "lower").unwrap();
        fs::create_dir_all(upper.join("etc")).unwrap();
        fs::write(upper.join("etc/kept"), "upper").unwrap();
        // An overlay whiteout: a 0:0 character device.
        nix::sys::stat::mknod(
            &upper.join("etc/gone"),
            nix::sys::stat::SFlag::S_IFCHR,
            nix::sys::stat::Mode::empty(),
            0,
        )
        .unwrap();
        let c = cache(state.path(), 64);
        let (r, _) = c
            .acquire(&RootfsSource::Overlay(vec![upper, lower]), "ns", "ns/o")
            .unwrap();
        // No temporary mount is left behind.
        assert_eq!(
            fs::read_dir(state.path().join("images/ns/ns/mnt"))
                .unwrap()
                .count(),
            0
        );
        // Read the image back through the kernel's erofs driver.
        let mp = d.path().join("check");
        fs::create_dir(&mp).unwrap();
        let out = Command::new("mount")
            .args(["-t", "erofs", "-o", "ro,loop"])
            .arg(&r.path)
            .arg(&mp)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let kept = fs::read_to_string(mp.join("etc/kept"));
        let gone = mp.join("etc/gone").exists();
        let _ = Command::new("umount").arg(&mp).status();
        assert_eq!(kept.unwrap(), "upper");
        assert!(!gone, "whiteout must hide the lower file");
    }

    #[test]
    fn mkfs_failure_is_readable_and_leaves_no_temp_file() {
        let state = tempfile::tempdir().unwrap();
        let src = tempfile::tempdir().unwrap();
        tree(src.path(), "v1");
        let c = ImageCache::new(state.path(), 64, Path::new("/nonexistent/mkfs.erofs"));
        let e = c
            .acquire(&RootfsSource::Dir(src.path().into()), "ns", "ns/a")
            .unwrap_err()
            .to_string();
        assert!(e.contains("/nonexistent/mkfs.erofs"), "{e}");
        assert_eq!(
            fs::read_dir(state.path().join("images/ns/ns/tmp"))
                .unwrap()
                .count(),
            0
        );
        assert_eq!(
            fs::read_dir(state.path().join("images/ns/ns/refs"))
                .unwrap()
                .count(),
            0
        );
    }

    /// Reads `file` from an erofs image through the kernel's driver.
    fn read_from_image(image: &Path, file: &str) -> String {
        let d = tempfile::tempdir().unwrap();
        let out = Command::new("mount")
            .args(["-t", "erofs", "-o", "ro,loop"])
            .arg(image)
            .arg(d.path())
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let text = fs::read_to_string(d.path().join(file));
        let _ = Command::new("umount").arg(d.path()).status();
        text.unwrap()
    }

    /// Gives every entry of a `tree` fixed modes and mtimes: all the
    /// metadata a tenant controls.
    fn same_metadata(root: &Path) {
        use std::os::unix::fs::PermissionsExt;
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        for (p, mode) in [("bin/app", 0o755), ("bin", 0o755), ("", 0o755)] {
            let p = root.join(p);
            fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
            File::open(&p).unwrap().set_modified(t).unwrap();
        }
    }

    #[test]
    fn a_planted_look_alike_is_not_served_as_anothers_image() {
        let state = tempfile::tempdir().unwrap();
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        // Same names, sizes, modes, owners and mtimes; other bytes.
        tree(a.path(), "tenant A's app");
        tree(b.path(), "tenant B's app");
        same_metadata(a.path());
        same_metadata(b.path());
        let c = cache(state.path(), 64);
        let src_a = RootfsSource::Dir(a.path().into());
        let src_b = RootfsSource::Dir(b.path().into());
        // B plants first, in its own namespace and (were it let in) in A's.
        let (planted, o) = c.acquire(&src_b, "tenant-b", "tenant-b/p").unwrap();
        assert_eq!(o, Outcome::Built);
        let (planted_in_a, o) = c.acquire(&src_b, "tenant-a", "tenant-a/p").unwrap();
        assert_eq!(o, Outcome::Built);
        // A's start builds A's own image and reads A's bytes from it.
        let (img_a, o) = c.acquire(&src_a, "tenant-a", "tenant-a/x").unwrap();
        assert_eq!(o, Outcome::Built, "a look-alike must not be a hit");
        assert_ne!(img_a.key, planted_in_a.key);
        assert_ne!(img_a.path, planted.path);
        assert_eq!(read_from_image(&img_a.path, "bin/app"), "tenant A's app");
        // And B gets B's, not A's.
        let (again_b, o) = c.acquire(&src_b, "tenant-b", "tenant-b/q").unwrap();
        assert_eq!(o, Outcome::Hit);
        assert_eq!(again_b.path, planted.path);
        assert_eq!(read_from_image(&again_b.path, "bin/app"), "tenant B's app");
    }

    #[test]
    fn namespaces_get_separate_images() {
        let state = tempfile::tempdir().unwrap();
        let src = tempfile::tempdir().unwrap();
        tree(src.path(), "shared");
        let s = RootfsSource::Dir(src.path().into());
        let c = cache(state.path(), 64);
        let (x, ox) = c.acquire(&s, "k8s.io", "k8s.io/c1").unwrap();
        let (y, oy) = c.acquire(&s, "default", "default/c1").unwrap();
        assert_eq!((ox, oy), (Outcome::Built, Outcome::Built));
        assert_eq!(x.key, y.key, "same tree, same key");
        assert_ne!(x.path, y.path);
        assert!(x.path.starts_with(state.path().join("images/ns/k8s.io")));
        assert!(y.path.starts_with(state.path().join("images/ns/default")));
        // Releasing one namespace's reference leaves the other's image.
        let c0 = cache(state.path(), 0);
        c0.release(&x).unwrap();
        assert!(!x.path.exists());
        assert!(y.path.exists(), "still referenced in its own namespace");
        c0.release(&y).unwrap();
        assert!(!y.path.exists());
    }

    #[test]
    fn bad_namespaces_are_refused_before_touching_disk() {
        let state = tempfile::tempdir().unwrap();
        let src = tempfile::tempdir().unwrap();
        tree(src.path(), "v1");
        let c = cache(state.path(), 64);
        let long = "a".repeat(77);
        for ns in [
            "", ".", "..", "a/b", "../x", "-a", "a-", "a..b", "a b", &long,
        ] {
            let e = c
                .acquire(&RootfsSource::Dir(src.path().into()), ns, "o")
                .unwrap_err()
                .to_string();
            assert!(e.contains("namespace"), "{ns:?}: {e}");
        }
        assert!(!state.path().join("images").exists());
        for ns in ["default", "k8s.io", "a_b-c.d", "moby", &"b".repeat(76)] {
            validate_namespace(ns).unwrap();
        }
    }

    #[test]
    fn cached_files_are_0600_and_directories_0700() {
        let state = tempfile::tempdir().unwrap();
        let src = tempfile::tempdir().unwrap();
        tree(src.path(), "v1");
        // An install from before: a world-readable cache directory.
        let images = state.path().join("images");
        fs::create_dir(&images).unwrap();
        {
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(&images, fs::Permissions::from_mode(0o755)).unwrap();
        }
        let c = cache(state.path(), 64);
        let (r, _) = c
            .acquire(&RootfsSource::Dir(src.path().into()), "ns", "ns/a")
            .unwrap();
        let mode = |p: &Path| fs::symlink_metadata(p).unwrap().mode();
        let mut seen = (0, 0);
        let mut stack = vec![images.clone()];
        while let Some(d) = stack.pop() {
            assert_eq!(mode(&d) & 0o7777, 0o700, "{}", d.display());
            seen.0 += 1;
            for e in fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                if fs::symlink_metadata(&p).unwrap().is_dir() {
                    stack.push(p);
                } else {
                    assert_eq!(mode(&p) & 0o7777, 0o600, "{}", p.display());
                    seen.1 += 1;
                }
            }
        }
        // images, ns, ns/ns, refs, refs/<key>, locks, tmp, mnt; the image,
        // its reference and its lock.
        assert_eq!(seen, (8, 3));
        assert_eq!(mode(&r.path) & 0o777, 0o600);
    }

    #[test]
    fn eviction_is_least_recently_used_across_namespaces() {
        let state = tempfile::tempdir().unwrap();
        let (s1, s2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        tree(s1.path(), "one");
        tree(s2.path(), "two");
        let big = cache(state.path(), 64);
        let (old, _) = big
            .acquire(&RootfsSource::Dir(s1.path().into()), "ns-a", "ns-a/1")
            .unwrap();
        let (new, _) = big
            .acquire(&RootfsSource::Dir(s2.path().into()), "ns-b", "ns-b/2")
            .unwrap();
        File::open(&old.path)
            .unwrap()
            .set_modified(SystemTime::now() - Duration::from_secs(60))
            .unwrap();
        big.release(&old).unwrap();
        big.release(&new).unwrap();
        // Room for one unused image: the older goes, whatever its namespace.
        let size = fs::metadata(&new.path).unwrap().len();
        let one = ImageCache {
            keep_unused_bytes: size,
            ..big.clone()
        };
        assert_eq!(one.gc().unwrap(), vec![old.key.clone()]);
        assert!(!old.path.exists());
        assert!(new.path.exists());
    }

    #[test]
    fn records_of_the_flat_layout_are_released_and_their_images_removed() {
        let state = tempfile::tempdir().unwrap();
        let images = state.path().join("images");
        let key = "ab".repeat(32);
        let owner = "default/old";
        fs::create_dir_all(images.join("refs").join(&key)).unwrap();
        fs::create_dir_all(images.join("locks")).unwrap();
        fs::write(images.join(format!("{key}.erofs")), b"old image").unwrap();
        fs::write(
            images.join("refs").join(&key).join(owner_file(owner)),
            owner,
        )
        .unwrap();
        // What an older shim wrote into the bundle record.
        let json = format!(
            r#"{{"key":"{key}","path":"{}","owner":"{owner}","cache_dir":"{}"}}"#,
            images.join(format!("{key}.erofs")).display(),
            images.display()
        );
        let old: ImageRef = serde_json::from_str(&json).unwrap();
        let c = cache(state.path(), 64);
        assert!(c.gc().unwrap().is_empty(), "referenced: kept");
        c.release(&old).unwrap();
        assert!(!images.join(format!("{key}.erofs")).exists());
        assert!(!images.join("refs").join(&key).exists());
        // A record naming no key is refused, not a path to remove.
        let bad = ImageRef {
            key: "../x".into(),
            ..old
        };
        assert!(release_ref(&bad).unwrap_err().to_string().contains("../x"));
    }
}
