//! Content digests of template input files, cached by file identity.
//!
//! Every sandbox start computes its template key, which hashes the guest
//! kernel and root image. Rereading ~20 MB each time costs more than the
//! restore itself, so a digest is kept per file *version*: its path,
//! device, inode, size, mtime and ctime. Replacing or rewriting the file
//! changes the inode or ctime (which no user can set back), so a stale
//! entry is never found again.
//!
//! The cache is only an optimization: an entry that cannot be read or
//! written means the file is hashed again, never an error.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::error::io;
use crate::Error;

/// A file's length and the SHA-256 of its contents.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileDigest {
    pub len: u64,
    pub sha256: [u8; 32],
}

impl FileDigest {
    /// Reads the whole file. Fails if it changes size while being read.
    pub fn of(path: &Path) -> Result<FileDigest, Error> {
        let mut f = File::open(path).map_err(io("opening template input", path))?;
        let len = f
            .metadata()
            .map_err(io("reading template input", path))?
            .len();
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0u64;
        loop {
            let n = f
                .read(&mut buf)
                .map_err(io("reading template input", path))?;
            if n == 0 {
                break;
            }
            total += n as u64;
            h.update(&buf[..n]);
        }
        if total != len {
            return Err(Error::Io {
                what: "reading template input",
                path: path.display().to_string(),
                source: std::io::Error::other("file changed size while being hashed"),
            });
        }
        Ok(FileDigest {
            len,
            sha256: h.finalize().into(),
        })
    }

    fn to_line(self) -> String {
        let hex: String = self.sha256.iter().map(|b| format!("{b:02x}")).collect();
        format!("{} {hex}\n", self.len)
    }

    fn from_line(line: &str) -> Option<FileDigest> {
        let (len, hex) = line.trim().split_once(' ')?;
        if hex.len() != 64 {
            return None;
        }
        let mut sha256 = [0u8; 32];
        for (i, b) in sha256.iter_mut().enumerate() {
            *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(FileDigest {
            len: len.parse().ok()?,
            sha256,
        })
    }
}

/// The file whose flock serializes hashing (its name is no entry's: ids
/// are hex).
const LOCK_FILE: &str = ".lock";

/// A directory of `<id> -> "<len> <sha256>"` entries.
pub struct DigestCache {
    dir: PathBuf,
}

impl DigestCache {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        DigestCache { dir: dir.into() }
    }

    /// The digest of `path`, from the cache when this version of the file
    /// was hashed before.
    pub fn digest(&self, path: &Path) -> Result<FileDigest, Error> {
        let before = identity(path)?;
        let entry = self.dir.join(&before);
        let cached = || {
            std::fs::read_to_string(&entry)
                .ok()
                .and_then(|s| FileDigest::from_line(&s))
        };
        if let Some(d) = cached() {
            return Ok(d);
        }
        // Starts at the same moment would each hash the same files (the
        // first pods on a node, all at once): one hashes, the others wait
        // and read its entry. Without the lock, each hashes.
        let _hashing = self.lock();
        if let Some(d) = cached() {
            return Ok(d);
        }
        let d = FileDigest::of(path)?;
        // Cached only if the file did not change while it was read.
        if identity(path)? == before {
            self.store(&entry, d);
        }
        Ok(d)
    }

    /// The cache's flock (`<dir>/.lock`), held until dropped; None if it
    /// cannot be had.
    fn lock(&self) -> Option<File> {
        crate::private::create_dir_all(&self.dir).ok()?;
        let f = crate::private::open_lock_file(&self.dir.join(LOCK_FILE)).ok()?;
        f.lock().ok()?;
        Some(f)
    }

    fn store(&self, entry: &Path, d: FileDigest) {
        let tmp = entry.with_extension(format!("tmp{}", std::process::id()));
        let written = crate::private::create_dir_all(&self.dir)
            .and_then(|()| crate::private::write_file(&tmp, d.to_line().as_bytes()))
            .and_then(|()| std::fs::rename(&tmp, entry));
        if written.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
    }
}

/// A name for one version of the file at `path`.
fn identity(path: &Path) -> Result<String, Error> {
    let m = std::fs::metadata(path).map_err(io("reading template input", path))?;
    let canonical = std::fs::canonicalize(path).map_err(io("reading template input", path))?;
    let mut h = Sha256::new();
    h.update(canonical.as_os_str().as_encoded_bytes());
    for v in [m.dev(), m.ino(), m.size()] {
        h.update(v.to_le_bytes());
    }
    for v in [m.mtime(), m.mtime_nsec(), m.ctime(), m.ctime_nsec()] {
        h.update(v.to_le_bytes());
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Cache entries, the lock file left out.
    fn entries(dir: &Path) -> usize {
        std::fs::read_dir(dir)
            .map(|d| {
                d.filter(|e| e.as_ref().is_ok_and(|e| e.file_name() != LOCK_FILE))
                    .count()
            })
            .unwrap_or(0)
    }

    #[test]
    fn a_rewritten_file_is_hashed_again() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("vmlinux");
        let cache = DigestCache::new(tmp.path().join("cache"));
        std::fs::write(&file, b"first").unwrap();
        let first = cache.digest(&file).unwrap();
        assert_eq!(first, FileDigest::of(&file).unwrap());
        assert_eq!(entries(&tmp.path().join("cache")), 1);
        assert_eq!(cache.digest(&file).unwrap(), first, "served from the cache");
        assert_eq!(entries(&tmp.path().join("cache")), 1);

        // Same size, rewritten in place: ctime moves, so the entry is new.
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&file, b"other").unwrap();
        let second = cache.digest(&file).unwrap();
        assert_ne!(second, first);
        assert_eq!(second, FileDigest::of(&file).unwrap());
    }

    #[test]
    fn concurrent_misses_agree_and_leave_one_entry() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("vmlinux");
        std::fs::write(&file, vec![7u8; 4 << 20]).unwrap();
        let dir = tmp.path().join("cache");
        let digests: Vec<_> = (0..4)
            .map(|_| {
                let (dir, file) = (dir.clone(), file.clone());
                std::thread::spawn(move || DigestCache::new(dir).digest(&file).unwrap())
            })
            .map(|t| t.join().unwrap())
            .collect();
        assert!(digests.iter().all(|d| *d == FileDigest::of(&file).unwrap()));
        // One entry and the lock file; no temporary file left.
        let mut names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names.len(), 2, "{names:?}");
        assert_eq!(names[0], LOCK_FILE);
    }

    #[test]
    fn a_corrupt_entry_is_ignored_and_replaced() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("root.img");
        std::fs::write(&file, b"image").unwrap();
        let dir = tmp.path().join("cache");
        let cache = DigestCache::new(&dir);
        let good = cache.digest(&file).unwrap();
        let entry = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.file_name() != Some(LOCK_FILE.as_ref()))
            .unwrap();
        for junk in [
            "",
            "5 zz",
            "5 00",
            "x 0000000000000000000000000000000000000000000000000000000000000000",
        ] {
            std::fs::write(&entry, junk).unwrap();
            assert_eq!(cache.digest(&file).unwrap(), good, "{junk:?}");
        }
        assert_eq!(FileDigest::from_line(&good.to_line()), Some(good));
    }

    #[test]
    fn an_unwritable_cache_still_gives_the_digest() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("vmlinux");
        std::fs::write(&file, b"kernel").unwrap();
        // The cache directory's place is taken by a file.
        std::fs::write(tmp.path().join("cache"), b"").unwrap();
        let cache = DigestCache::new(tmp.path().join("cache"));
        assert_eq!(cache.digest(&file).unwrap(), FileDigest::of(&file).unwrap());
        let e = cache.digest(&tmp.path().join("missing")).unwrap_err();
        assert!(e.to_string().contains("missing"), "{e}");
    }
}
