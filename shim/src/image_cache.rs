//! Read-only erofs images of container root filesystems, cached by content
//! and shared by every shim on the host.
//!
//! Layout under `<state_dir>/images/`:
//! - `<key>.erofs`: a finished image (never written again once renamed in);
//! - `refs/<key>/<owner-hash>`: one file per container using the image, its
//!   text names the owner (`namespace/container-id`);
//! - `locks/<key>.lock`: flock serializing build, reference and removal of
//!   one key across shim processes;
//! - `tmp/`, `mnt/`: images being built and overlay views being read.
//!
//! An image without references is kept for reuse until the unreferenced
//! images exceed `keep_unused_mib`; then the least recently used go.

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::child;
use crate::error::{Error, IoContext, Result};
use crate::rootfs::{self, RootfsSource};

/// mkfs.erofs flags; part of the cache key.
const MKFS_FLAGS: &[&str] = &["--preserve-mtime", "--quiet"];
const MKFS_TIMEOUT: Duration = Duration::from_secs(600);
/// The kernel's limit on mount option text.
const MAX_MOUNT_DATA: usize = 4095;

/// One container's hold on a cached image. Plain data so it can be stored
/// in the bundle and released by `delete` after a shim crash.
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

/// An exclusive flock on `locks/<key>.lock`, re-taken if GC unlinked the
/// file while we waited for it.
struct KeyLock {
    _lock: Flock<File>,
}

impl KeyLock {
    fn take(dir: &Path, key: &str, wait: bool) -> Result<Option<KeyLock>> {
        let path = dir.join("locks").join(format!("{key}.lock"));
        loop {
            let f = OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
                .ctx(|| format!("opening {}", path.display()))?;
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

impl ImageCache {
    pub fn new(state_dir: &Path, keep_unused_mib: u64, mkfs: &Path) -> Self {
        ImageCache {
            dir: state_dir.join("images"),
            mkfs: mkfs.to_path_buf(),
            keep_unused_bytes: keep_unused_mib.saturating_mul(1 << 20),
        }
    }

    fn ensure_dirs(&self) -> Result<()> {
        for d in ["", "refs", "locks", "tmp", "mnt"] {
            let p = self.dir.join(d);
            fs::create_dir_all(&p).ctx(|| format!("creating {}", p.display()))?;
        }
        Ok(())
    }

    fn entry_path(&self, key: &str) -> PathBuf {
        self.dir.join(format!("{key}.erofs"))
    }

    /// Finds or builds the image for `src` and records `owner` as a user.
    pub fn acquire(&self, src: &RootfsSource, owner: &str) -> Result<(ImageRef, Outcome)> {
        self.ensure_dirs()?;
        let extra = format!("mkfs.erofs {}", MKFS_FLAGS.join(" "));
        let key = rootfs::content_key(src, &extra)?;
        let _lock = KeyLock::take(&self.dir, &key, true)?;
        let path = self.entry_path(&key);
        let outcome = if path.exists() {
            Outcome::Hit
        } else {
            self.build(src, &key, &path)?;
            Outcome::Built
        };
        let refs = self.dir.join("refs").join(&key);
        fs::create_dir_all(&refs).ctx(|| format!("creating {}", refs.display()))?;
        let rf = refs.join(owner_file(owner));
        fs::write(&rf, owner).ctx(|| format!("writing {}", rf.display()))?;
        // The mtime orders unreferenced entries for eviction.
        if let Ok(f) = File::open(&path) {
            let _ = f.set_modified(SystemTime::now());
        }
        Ok((
            ImageRef {
                key,
                path,
                owner: owner.to_string(),
                cache_dir: self.dir.clone(),
            },
            outcome,
        ))
    }

    fn build(&self, src: &RootfsSource, key: &str, dest: &Path) -> Result<()> {
        let unique = format!("{key}.{}", std::process::id());
        let tmp = self.dir.join("tmp").join(format!("{unique}.erofs"));
        let _ = fs::remove_file(&tmp);
        let (input, _mount) = match src {
            RootfsSource::Dir(d) => (d.clone(), None),
            RootfsSource::Overlay(layers) => {
                let mp = self.dir.join("mnt").join(&unique);
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
        let mut perm = fs::metadata(&tmp)
            .ctx(|| format!("stat {}", tmp.display()))?
            .permissions();
        perm.set_readonly(true);
        let _ = fs::set_permissions(&tmp, perm);
        fs::rename(&tmp, dest).ctx(|| format!("renaming {} into the cache", tmp.display()))?;
        Ok(())
    }

    /// Drops one container's reference and collects garbage.
    pub fn release(&self, r: &ImageRef) -> Result<()> {
        release_ref(r)?;
        self.gc().map(|_| ())
    }

    /// Evicts unreferenced images beyond the budget, least recently used
    /// first; returns the removed keys.
    pub fn gc(&self) -> Result<Vec<String>> {
        let mut unused = Vec::new();
        let rd = match fs::read_dir(&self.dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Error::io(format!("reading {}", self.dir.display()), e)),
        };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            let Some(key) = name.strip_suffix(".erofs") else {
                continue;
            };
            if has_refs(&self.dir, key) {
                continue;
            }
            if let Ok(md) = e.metadata() {
                let mtime = md.modified().unwrap_or(SystemTime::UNIX_EPOCH);
                unused.push((mtime, key.to_string(), md.len()));
            }
        }
        unused.sort();
        let mut total: u64 = unused.iter().map(|u| u.2).sum();
        let mut removed = Vec::new();
        for (_, key, size) in unused {
            if total <= self.keep_unused_bytes {
                break;
            }
            // Skip keys another shim is working on right now.
            let Some(lock) = KeyLock::take(&self.dir, &key, false)? else {
                continue;
            };
            if has_refs(&self.dir, &key) {
                continue;
            }
            let p = self.entry_path(&key);
            if fs::remove_file(&p).is_ok() {
                total = total.saturating_sub(size);
                removed.push(key.clone());
            }
            let _ = fs::remove_dir(self.dir.join("refs").join(&key));
            let _ = fs::remove_file(self.dir.join("locks").join(format!("{key}.lock")));
            drop(lock);
        }
        Ok(removed)
    }
}

fn has_refs(dir: &Path, key: &str) -> bool {
    fs::read_dir(dir.join("refs").join(key))
        .map(|mut rd| rd.next().is_some())
        .unwrap_or(false)
}

/// Removes one reference file (and its key dir when it was the last). Used
/// by `delete` after a crash too, where no config is at hand.
pub fn release_ref(r: &ImageRef) -> Result<()> {
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
    fs::create_dir_all(mp).ctx(|| format!("creating {}", mp.display()))?;
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
        let (r1, o1) = c.acquire(&s, "ns/a").unwrap();
        assert_eq!(o1, Outcome::Built);
        assert!(r1.path.exists());
        // erofs superblock magic at offset 1024.
        let img = fs::read(&r1.path).unwrap();
        assert_eq!(&img[1024..1028], &0xE0F5_E1E2u32.to_le_bytes());
        let (r2, o2) = c.acquire(&s, "ns/b").unwrap();
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
            fs::read_dir(state.path().join("images/refs"))
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
            .acquire(&RootfsSource::Dir(src.path().into()), "ns/a")
            .unwrap();
        c.release(&r).unwrap();
        assert!(r.path.exists(), "kept for reuse under the 64 MiB budget");
        let (_, o) = c
            .acquire(&RootfsSource::Dir(src.path().into()), "ns/b")
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
            .acquire(&RootfsSource::Dir(src.path().into()), "ns/a")
            .unwrap();
        fs::write(src.path().join("bin/app"), "version two").unwrap();
        let (b, o) = c
            .acquire(&RootfsSource::Dir(src.path().into()), "ns/b")
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
            .acquire(&RootfsSource::Overlay(vec![upper, lower]), "ns/o")
            .unwrap();
        // No temporary mount is left behind.
        assert_eq!(
            fs::read_dir(state.path().join("images/mnt"))
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
            .acquire(&RootfsSource::Dir(src.path().into()), "ns/a")
            .unwrap_err()
            .to_string();
        assert!(e.contains("/nonexistent/mkfs.erofs"), "{e}");
        assert_eq!(
            fs::read_dir(state.path().join("images/tmp"))
                .unwrap()
                .count(),
            0
        );
        assert_eq!(
            fs::read_dir(state.path().join("images/refs"))
                .unwrap()
                .count(),
            0
        );
    }
}
