//! Templates: one snapshot of a freshly booted, ready guest per set of boot
//! inputs, kept in a store and restored by every sandbox start.
//!
//! A template is keyed by a hash of everything that shapes the saved guest
//! (kernel and root image contents, vCPUs, memory, spare disk slots, the
//! thaw version and the snapshot format), so changing any input selects a
//! new template instead of resuming a stale one.
//!
//! Store layout:
//! ```text
//! <store>/<key>/{state,memory,template.json}   complete templates only
//! <store>/<key>.lock                           flock taken while building/removing
//! <store>/<key>.failed                         the last failed build: when and why
//! <store>/.build-<key>-<pid>                   a build in progress (or a crashed one)
//! <store>/.digests/<id>                        cached input file digests
//! <store>/.digests/.lock                       flock taken while hashing one
//! <store>/<key>.in-use                         shared flock of every VM restored from it;
//!                                              its mtime: when the template was last used
//! ```
//! Everything in the store is owner-only (0600 files, 0700 directories):
//! a template's memory file is a booted guest's RAM.
//! A build writes into its own temporary directory and renames it to
//! `<key>` once complete, under the key's lock: readers never see half a
//! template, and concurrent builders of one key build it once.
//!
//! A failed build is remembered: until the store's retry interval has
//! passed, a build of that key fails at once with the recorded reason
//! instead of booting again. On a host too slow to boot within the build's
//! deadline, every sandbox start would otherwise pay a failed build before
//! its cold boot.
//!
//! The store can have a size quota ([`Store::evict_to`]): past it, the
//! least recently used templates go, but never one that a VM is running
//! from. "In use" is a shared flock on `<key>.in-use` that the restoring
//! VMM takes ([`Store::pin`]) before it reads the snapshot and keeps until
//! it exits, so a crashed shim or VMM can never leave a template held: the
//! kernel drops the lock with the process. Eviction takes the key's build
//! lock and then `<key>.in-use` exclusively, both without waiting, and
//! skips the template if either is held. It does not rely on Linux
//! keeping a removed file's pages for a VM that mapped it (`MAP_PRIVATE`
//! holds the inode, so that would be safe too, but the space would not be
//! freed until the VM exits, and the quota would be a fiction). Templates
//! used in the last [`MIN_IDLE`] are not evicted either: that covers the
//! moment between a shim being given a template's directory and its VMM
//! pinning it.

use crate::digest::{DigestCache, FileDigest};
use crate::error::io;
use crate::Error;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{FORMAT_VERSION, MEMORY_FILE, STATE_FILE};

/// Where templates live unless configured otherwise.
pub const DEFAULT_STORE: &str = "/var/lib/thaw/templates";
/// The record of a template's inputs, next to its state and memory.
pub const RECORD_FILE: &str = "template.json";
const BUILD_PREFIX: &str = ".build-";
const FAILED_SUFFIX: &str = ".failed";
/// How long a failed build is remembered unless the store says otherwise.
pub const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(600);
const DIGEST_DIR: &str = ".digests";
const IN_USE_SUFFIX: &str = ".in-use";
/// A template used more recently than this is never evicted.
pub const MIN_IDLE: Duration = Duration::from_secs(60);

/// What a template is booted from. Paths are read for their contents; the
/// key does not depend on where the files are.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateInputs {
    pub kernel: PathBuf,
    pub root_image: PathBuf,
    pub vcpus: u8,
    pub memory_mib: u32,
    pub spare_disks: u8,
    /// The VMM's own guest command line: it is baked into the snapshot, so
    /// a change must give a new template.
    #[serde(default)]
    pub guest_cmdline: String,
}

/// The hex SHA-256 of a template's inputs; also its directory name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TemplateKey(String);

impl TemplateKey {
    /// Hashes the inputs: file contents (read in full), then the
    /// parameters. [`Store::key`] gives the same key without rereading
    /// unchanged files.
    pub fn compute(inputs: &TemplateInputs) -> Result<Self, Error> {
        Self::compute_with(inputs, FileDigest::of)
    }

    /// Every field is length- or tag-prefixed so no two inputs collide by
    /// concatenation.
    fn compute_with(
        inputs: &TemplateInputs,
        digest: impl Fn(&Path) -> Result<FileDigest, Error>,
    ) -> Result<Self, Error> {
        let mut h = Sha256::new();
        h.update(b"thaw-template-v2\0");
        for (tag, path) in [(b'K', &inputs.kernel), (b'R', &inputs.root_image)] {
            let d = digest(path)?;
            h.update([tag]);
            h.update(d.len.to_le_bytes());
            h.update(d.sha256);
        }
        h.update([b'C', inputs.vcpus]);
        h.update(b"M");
        h.update(inputs.memory_mib.to_le_bytes());
        h.update([b'S', inputs.spare_disks]);
        h.update(b"L");
        h.update((inputs.guest_cmdline.len() as u64).to_le_bytes());
        h.update(inputs.guest_cmdline.as_bytes());
        let version = env!("CARGO_PKG_VERSION").as_bytes();
        h.update(b"V");
        h.update((version.len() as u64).to_le_bytes());
        h.update(version);
        h.update(b"F");
        h.update(FORMAT_VERSION.to_le_bytes());
        let digest = h.finalize();
        Ok(TemplateKey(
            digest.iter().map(|b| format!("{b:02x}")).collect(),
        ))
    }

    /// A key typed by a user or read from a directory name.
    pub fn parse(s: &str) -> Result<Self, Error> {
        let ok = s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        if ok {
            Ok(TemplateKey(s.to_string()))
        } else {
            Err(Error::BadKey(s.to_string()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for TemplateKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for TemplateKey {
    type Error = Error;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        TemplateKey::parse(&s)
    }
}

impl From<TemplateKey> for String {
    fn from(k: TemplateKey) -> String {
        k.0
    }
}

/// `template.json`: what a template was built from, for `list` and `gc`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateRecord {
    pub key: TemplateKey,
    pub inputs: TemplateInputs,
    pub kernel_size: u64,
    pub root_image_size: u64,
    pub thaw_version: String,
    pub format_version: u32,
    /// Seconds since the Unix epoch.
    pub created_unix: u64,
    /// How long the builder took, in milliseconds.
    pub build_ms: u64,
}

impl TemplateRecord {
    /// One line for `list` (`thaw-vmm template list`, `thaw templates
    /// list`): key, shape, inputs, creation time.
    pub fn summary(&self) -> String {
        format!(
            "{}  vcpus={} memory_mib={} spare_disks={} kernel={} root={} created={} build_ms={}",
            self.key,
            self.inputs.vcpus,
            self.inputs.memory_mib,
            self.inputs.spare_disks,
            self.inputs.kernel.display(),
            self.inputs.root_image.display(),
            self.created_unix,
            self.build_ms
        )
    }
}

/// `<key>.failed`: the last failed build of a key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailureRecord {
    /// Seconds since the Unix epoch.
    pub failed_unix: u64,
    pub reason: String,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A directory of templates.
#[derive(Clone, Debug)]
pub struct Store {
    root: PathBuf,
    retry_after: Duration,
}

/// Holds a key's flock until dropped (closing the file releases it).
struct KeyLock(#[allow(dead_code)] File);

/// A VM's hold on the template it was restored from: a shared flock on
/// `<key>.in-use`, released when dropped or when the process ends.
#[derive(Debug)]
pub struct Pin(#[allow(dead_code)] File);

/// One template as eviction sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Usage {
    pub key: TemplateKey,
    /// Bytes allocated on disk (the memory file is sparse).
    pub bytes: u64,
    pub last_used: SystemTime,
}

impl Store {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Store {
            root: root.into(),
            retry_after: DEFAULT_RETRY_AFTER,
        }
    }

    /// How long a failed build keeps others from building that key again
    /// (zero: every build tries).
    pub fn with_retry_after(mut self, retry_after: Duration) -> Self {
        self.retry_after = retry_after;
        self
    }

    /// The store at [`DEFAULT_STORE`].
    pub fn default_location() -> Self {
        Store::new(DEFAULT_STORE)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn dir(&self, key: &TemplateKey) -> PathBuf {
        self.root.join(key.as_str())
    }

    /// The key of `inputs`, as [`TemplateKey::compute`] gives it, but
    /// rereading an input file only when it changed since the last key
    /// (see [`DigestCache`]): every sandbox start asks for a key, and the
    /// kernel alone is ~17 MB.
    pub fn key(&self, inputs: &TemplateInputs) -> Result<TemplateKey, Error> {
        let cache = DigestCache::new(self.root.join(DIGEST_DIR));
        TemplateKey::compute_with(inputs, |p| cache.digest(p))
    }

    /// The template's directory if it is complete (all three files present).
    pub fn get(&self, key: &TemplateKey) -> Option<PathBuf> {
        let dir = self.dir(key);
        let complete = [STATE_FILE, MEMORY_FILE, RECORD_FILE]
            .iter()
            .all(|f| dir.join(f).is_file());
        complete.then_some(dir)
    }

    /// Takes `<store>/<key>.lock` exclusively, waiting for whoever holds it.
    fn lock(&self, key: &TemplateKey) -> Result<KeyLock, Error> {
        crate::private::create_dir_all(&self.root)
            .map_err(io("creating template store", &self.root))?;
        let path = self.root.join(format!("{key}.lock"));
        let f =
            crate::private::open_lock_file(&path).map_err(io("opening template lock", &path))?;
        f.lock().map_err(io("locking", &path))?;
        Ok(KeyLock(f))
    }

    fn in_use_path(&self, key: &TemplateKey) -> PathBuf {
        self.root.join(format!("{key}{IN_USE_SUFFIX}"))
    }

    /// Marks `key` used now (the mtime of `<key>.in-use`). Best effort: a
    /// stamp that cannot be written only makes the template look older.
    pub fn mark_used(&self, key: &TemplateKey) {
        let path = self.in_use_path(key);
        if let Ok(f) = crate::private::open_lock_file(&path) {
            let _ = f.set_modified(SystemTime::now());
        }
    }

    /// Holds the template at `snapshot` for a VM restored from it, if it is
    /// one in a store (its name a key and its store's `<key>.lock` next to
    /// it); None for any other snapshot directory. Waits only for an
    /// eviction in progress, and fails if the template is gone or
    /// incomplete once the hold is taken. Keep the pin as long as the VM runs.
    pub fn pin(snapshot: &Path) -> Result<Option<Pin>, Error> {
        let name = snapshot.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let Ok(key) = TemplateKey::parse(name) else {
            return Ok(None);
        };
        let Some(root) = snapshot.parent() else {
            return Ok(None);
        };
        if !root.join(format!("{key}.lock")).is_file() {
            return Ok(None);
        }
        let store = Store::new(root);
        let path = store.in_use_path(&key);
        let f = crate::private::open_lock_file(&path).map_err(io("opening", &path))?;
        f.lock_shared().map_err(io("locking", &path))?;
        if store.get(&key).is_none() {
            return Err(Error::NotFound(key.to_string()));
        }
        let _ = f.set_modified(SystemTime::now());
        Ok(Some(Pin(f)))
    }

    /// Every complete template with its size on disk and last use.
    pub fn usage(&self) -> Result<Vec<Usage>, Error> {
        let entries = match std::fs::read_dir(&self.root) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io("listing", &self.root)(e)),
        };
        let mut out = Vec::new();
        for e in entries.flatten() {
            let Ok(key) = TemplateKey::parse(&e.file_name().to_string_lossy()) else {
                continue;
            };
            let Some(dir) = self.get(&key) else { continue };
            let mut bytes = 0u64;
            // Removed meanwhile by another process: nothing to count.
            let Ok(files) = std::fs::read_dir(&dir) else {
                continue;
            };
            for f in files.flatten() {
                if let Ok(m) = f.metadata() {
                    bytes = bytes.saturating_add(m.blocks().saturating_mul(512));
                }
            }
            // Built (the record's write) or last used, whichever is later.
            let built = std::fs::metadata(dir.join(RECORD_FILE)).and_then(|m| m.modified());
            let used = std::fs::metadata(self.in_use_path(&key)).and_then(|m| m.modified());
            let last_used = [built.ok(), used.ok()]
                .into_iter()
                .flatten()
                .max()
                .unwrap_or(UNIX_EPOCH);
            out.push(Usage {
                key,
                bytes,
                last_used,
            });
        }
        out.sort_by(|a, b| (a.last_used, &a.key).cmp(&(b.last_used, &b.key)));
        Ok(out)
    }

    /// Removes least recently used templates until the store's templates
    /// take at most `max_bytes` on disk. Skipped: `keep`, templates a VM
    /// holds ([`Store::pin`]), one being built or removed, and any used
    /// within [`MIN_IDLE`]. Returns the keys removed; the store may stay
    /// over its quota if everything left is skipped.
    pub fn evict_to(
        &self,
        max_bytes: u64,
        keep: Option<&TemplateKey>,
    ) -> Result<Vec<TemplateKey>, Error> {
        self.evict_idle(max_bytes, keep, MIN_IDLE)
    }

    fn evict_idle(
        &self,
        max_bytes: u64,
        keep: Option<&TemplateKey>,
        min_idle: Duration,
    ) -> Result<Vec<TemplateKey>, Error> {
        let usage = self.usage()?;
        let mut total: u64 = usage.iter().map(|u| u.bytes).sum();
        let now = SystemTime::now();
        let mut removed = Vec::new();
        for u in usage {
            if total <= max_bytes {
                break;
            }
            let idle = now.duration_since(u.last_used).unwrap_or_default();
            if Some(&u.key) == keep || idle < min_idle {
                continue;
            }
            if self.try_evict(&u.key)? {
                total = total.saturating_sub(u.bytes);
                removed.push(u.key);
            }
        }
        Ok(removed)
    }

    /// Removes `key` unless it is being built or removed or a VM holds it.
    fn try_evict(&self, key: &TemplateKey) -> Result<bool, Error> {
        let lock_path = self.root.join(format!("{key}.lock"));
        let lock = crate::private::open_lock_file(&lock_path)
            .map_err(io("opening template lock", &lock_path))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => return Ok(false),
            Err(std::fs::TryLockError::Error(e)) => return Err(io("locking", &lock_path)(e)),
        }
        let use_path = self.in_use_path(key);
        let in_use = crate::private::open_lock_file(&use_path).map_err(io("opening", &use_path))?;
        match in_use.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => return Ok(false),
            Err(std::fs::TryLockError::Error(e)) => return Err(io("locking", &use_path)(e)),
        }
        let dir = self.dir(key);
        if !dir.exists() {
            return Ok(false);
        }
        let doomed = self
            .root
            .join(format!("{BUILD_PREFIX}{key}-evict{}", std::process::id()));
        std::fs::rename(&dir, &doomed).map_err(io("evicting template", &dir))?;
        std::fs::remove_dir_all(&doomed).map_err(io("evicting template", &doomed))?;
        // A VMM that opens it from now on finds the template gone; the
        // build lock file stays (see `remove`).
        let _ = std::fs::remove_file(&use_path);
        Ok(true)
    }

    /// Returns the template for `key`, building it with `builder` if it is
    /// missing. `builder` gets an empty directory and must leave the
    /// snapshot's `state` and `memory` files in it. Only one caller builds a
    /// key at a time; the others wait on the lock and then find it built.
    /// A failed build leaves nothing behind.
    pub fn build<E: std::fmt::Display>(
        &self,
        key: &TemplateKey,
        inputs: &TemplateInputs,
        builder: impl FnOnce(&Path) -> Result<(), E>,
    ) -> Result<PathBuf, Error> {
        if let Some(dir) = self.get(key) {
            self.mark_used(key);
            return Ok(dir);
        }
        let _lock = self.lock(key)?;
        if let Some(dir) = self.get(key) {
            self.mark_used(key);
            return Ok(dir);
        }
        self.check_recent_failure(key)?;
        // Holding the lock, anything else for this key is debris of a
        // crashed build (or a half-removed template): clear it.
        self.remove_debris(key)?;

        let tmp = self
            .root
            .join(format!("{BUILD_PREFIX}{key}-{}", std::process::id()));
        crate::private::create_dir(&tmp).map_err(io("creating build directory", &tmp))?;
        let result = self.build_into(key, inputs, &tmp, builder);
        match &result {
            Ok(_) => {
                let _ = std::fs::remove_file(self.failure_path(key));
            }
            Err(e) => {
                let _ = std::fs::remove_dir_all(&tmp);
                self.record_failure(key, &e.to_string());
            }
        }
        result
    }

    fn failure_path(&self, key: &TemplateKey) -> PathBuf {
        self.root.join(format!("{key}{FAILED_SUFFIX}"))
    }

    /// The last failed build of `key`, if one is recorded.
    pub fn failure(&self, key: &TemplateKey) -> Option<FailureRecord> {
        let bytes = std::fs::read(self.failure_path(key)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Best effort: a record that cannot be written only costs a retry.
    fn record_failure(&self, key: &TemplateKey, reason: &str) {
        let record = FailureRecord {
            failed_unix: unix_now(),
            reason: reason.to_string(),
        };
        let path = self.failure_path(key);
        let tmp = path.with_extension("failed.tmp");
        let written = serde_json::to_vec(&record)
            .ok()
            .is_some_and(|json| crate::private::write_file(&tmp, &json).is_ok())
            && std::fs::rename(&tmp, &path).is_ok();
        if !written {
            let _ = std::fs::remove_file(&tmp);
        }
    }

    /// Fails while a recorded failure is younger than the retry interval.
    fn check_recent_failure(&self, key: &TemplateKey) -> Result<(), Error> {
        let Some(f) = self.failure(key) else {
            return Ok(());
        };
        let age_secs = unix_now().saturating_sub(f.failed_unix);
        if Duration::from_secs(age_secs) < self.retry_after {
            return Err(Error::RecentFailure {
                key: key.to_string(),
                age_secs,
                retry_after_secs: self.retry_after.as_secs(),
                reason: f.reason,
            });
        }
        Ok(())
    }

    fn build_into<E: std::fmt::Display>(
        &self,
        key: &TemplateKey,
        inputs: &TemplateInputs,
        tmp: &Path,
        builder: impl FnOnce(&Path) -> Result<(), E>,
    ) -> Result<PathBuf, Error> {
        let failed = |reason: String| Error::Build {
            key: key.to_string(),
            reason,
        };
        let started = std::time::Instant::now();
        builder(tmp).map_err(|e| failed(e.to_string()))?;
        let build_ms = started.elapsed().as_millis() as u64;
        for f in [STATE_FILE, MEMORY_FILE] {
            let p = tmp.join(f);
            if !p.is_file() {
                return Err(failed(format!("the builder left no {f} file")));
            }
            // The rename below must not publish data still in the page cache only.
            File::open(&p)
                .and_then(|f| f.sync_all())
                .map_err(io("syncing", &p))?;
        }
        let size = |p: &Path| {
            std::fs::metadata(p)
                .map(|m| m.len())
                .map_err(io("reading template input", p))
        };
        let record = TemplateRecord {
            key: key.clone(),
            inputs: inputs.clone(),
            kernel_size: size(&inputs.kernel)?,
            root_image_size: size(&inputs.root_image)?,
            thaw_version: env!("CARGO_PKG_VERSION").to_string(),
            format_version: FORMAT_VERSION,
            created_unix: unix_now(),
            build_ms,
        };
        let json = serde_json::to_vec_pretty(&record).map_err(|e| Error::Record {
            path: tmp.join(RECORD_FILE).display().to_string(),
            reason: e.to_string(),
        })?;
        let rec_path = tmp.join(RECORD_FILE);
        let mut f = crate::private::create_file(&rec_path).map_err(io("writing", &rec_path))?;
        f.write_all(&json)
            .and_then(|_| f.sync_all())
            .map_err(io("writing", &rec_path))?;
        let dir = self.dir(key);
        std::fs::rename(tmp, &dir).map_err(io("publishing template", &dir))?;
        File::open(&self.root)
            .and_then(|d| d.sync_all())
            .map_err(io("syncing", &self.root))?;
        Ok(dir)
    }

    /// Removes a key's build directories and an incomplete template dir.
    /// Call only with the key's lock held.
    fn remove_debris(&self, key: &TemplateKey) -> Result<(), Error> {
        let prefix = format!("{BUILD_PREFIX}{key}-");
        let entries = std::fs::read_dir(&self.root).map_err(io("listing", &self.root))?;
        for entry in entries.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with(&prefix) || name == key.as_str() {
                let p = entry.path();
                std::fs::remove_dir_all(&p).map_err(io("removing stale build", &p))?;
            }
        }
        Ok(())
    }

    /// Every complete template, sorted by key. A template whose record does
    /// not parse is listed with an error instead of hiding it.
    pub fn list(&self) -> Result<Vec<Result<TemplateRecord, Error>>, Error> {
        let entries = match std::fs::read_dir(&self.root) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io("listing", &self.root)(e)),
        };
        let mut keys: Vec<TemplateKey> = entries
            .flatten()
            .filter_map(|e| TemplateKey::parse(&e.file_name().to_string_lossy()).ok())
            .filter(|k| self.get(k).is_some())
            .collect();
        keys.sort();
        Ok(keys.iter().map(|k| self.record(k)).collect())
    }

    /// The record of a complete template.
    pub fn record(&self, key: &TemplateKey) -> Result<TemplateRecord, Error> {
        let dir = self
            .get(key)
            .ok_or_else(|| Error::NotFound(key.to_string()))?;
        let path = dir.join(RECORD_FILE);
        let bytes = std::fs::read(&path).map_err(io("reading", &path))?;
        let record: TemplateRecord = serde_json::from_slice(&bytes).map_err(|e| Error::Record {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        if &record.key != key {
            return Err(Error::Record {
                path: path.display().to_string(),
                reason: format!("records key {}, not its directory's", record.key),
            });
        }
        Ok(record)
    }

    /// Removes a template, waiting for a build of it to finish first. The
    /// directory is renamed away before deletion so no reader sees it half
    /// deleted. (A VMM already restored from it keeps its mapping.)
    pub fn remove(&self, key: &TemplateKey) -> Result<(), Error> {
        let _lock = self.lock(key)?;
        let dir = self.dir(key);
        let failure = self.failure_path(key);
        let had_failure = std::fs::remove_file(&failure).is_ok();
        if !dir.exists() {
            if had_failure {
                return Ok(());
            }
            return Err(Error::NotFound(key.to_string()));
        }
        let doomed = self
            .root
            .join(format!("{BUILD_PREFIX}{key}-rm{}", std::process::id()));
        std::fs::rename(&dir, &doomed).map_err(io("removing template", &dir))?;
        std::fs::remove_dir_all(&doomed).map_err(io("removing template", &doomed))?;
        // A VM still holding it keeps its own handle on the in-use file.
        let _ = std::fs::remove_file(self.in_use_path(key));
        // The lock file stays: unlinking it while another process waits on
        // it would let a third lock a fresh file and build alongside.
        Ok(())
    }

    /// Removes templates whose recorded inputs no longer hash to their key
    /// (an input file changed or is gone, or thaw was upgraded), and those
    /// with an unreadable record. Returns the keys removed.
    pub fn gc(&self) -> Result<Vec<TemplateKey>, Error> {
        let entries = match std::fs::read_dir(&self.root) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io("listing", &self.root)(e)),
        };
        let keys: Vec<TemplateKey> = entries
            .flatten()
            .filter_map(|e| TemplateKey::parse(&e.file_name().to_string_lossy()).ok())
            .collect();
        let mut removed = Vec::new();
        for key in keys {
            let stale = match self.record(&key) {
                Ok(r) => self.key(&r.inputs).map_or(true, |k| k != key),
                Err(_) => true,
            };
            if stale {
                self.remove(&key)?;
                removed.push(key);
            }
        }
        // Failure records past their interval no longer hold anything back.
        if let Ok(entries) = std::fs::read_dir(&self.root) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let Some(key) = name.strip_suffix(FAILED_SUFFIX) else {
                    continue;
                };
                if let Ok(key) = TemplateKey::parse(key) {
                    if self.check_recent_failure(&key).is_ok() {
                        let _ = std::fs::remove_file(e.path());
                    }
                }
            }
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Barrier};
    use std::time::Duration;

    fn inputs(dir: &Path) -> TemplateInputs {
        let kernel = dir.join("vmlinux");
        let root_image = dir.join("root.img");
        if !kernel.exists() {
            std::fs::write(&kernel, b"kernel bytes").unwrap();
            std::fs::write(&root_image, b"root image bytes").unwrap();
        }
        TemplateInputs {
            kernel,
            root_image,
            vcpus: 1,
            memory_mib: 128,
            spare_disks: 1,
            guest_cmdline: "console=ttyS0".into(),
        }
    }

    fn fake_builder(dir: &Path) -> Result<(), String> {
        std::fs::write(dir.join(STATE_FILE), b"state").map_err(|e| e.to_string())?;
        std::fs::write(dir.join(MEMORY_FILE), b"memory").map_err(|e| e.to_string())
    }

    /// Everything in the store except lock files.
    fn store_entries(store: &Store) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(store.root())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| !n.ends_with(".lock"))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn key_changes_with_every_input() {
        let tmp = tempfile::tempdir().unwrap();
        let base = inputs(tmp.path());
        let k0 = TemplateKey::compute(&base).unwrap();
        assert_eq!(k0, TemplateKey::compute(&base).unwrap(), "deterministic");
        assert_eq!(TemplateKey::parse(k0.as_str()).unwrap(), k0);

        let mut keys = vec![k0.clone()];
        for change in [
            |i: &mut TemplateInputs| i.vcpus = 2,
            |i: &mut TemplateInputs| i.memory_mib = 256,
            |i: &mut TemplateInputs| i.spare_disks = 2,
        ] {
            let mut i = base.clone();
            change(&mut i);
            keys.push(TemplateKey::compute(&i).unwrap());
        }
        // Same contents elsewhere: same key; changed contents: new key.
        let copy = tmp.path().join("copy-of-kernel");
        std::fs::copy(&base.kernel, &copy).unwrap();
        let moved = TemplateInputs {
            kernel: copy,
            ..base.clone()
        };
        assert_eq!(TemplateKey::compute(&moved).unwrap(), k0);
        std::fs::write(&base.kernel, b"kernel bytes, rebuilt").unwrap();
        keys.push(TemplateKey::compute(&base).unwrap());
        std::fs::write(&base.root_image, b"root image bytes, rebuilt").unwrap();
        keys.push(TemplateKey::compute(&base).unwrap());
        let other_cmdline = TemplateInputs {
            guest_cmdline: "console=ttyS0 quiet".into(),
            ..base.clone()
        };
        keys.push(TemplateKey::compute(&other_cmdline).unwrap());
        let mut unique = keys.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), keys.len(), "{keys:?}");

        let missing = TemplateInputs {
            kernel: tmp.path().join("nope"),
            ..base
        };
        let e = TemplateKey::compute(&missing).unwrap_err().to_string();
        assert!(e.contains("nope"), "{e}");
    }

    #[test]
    fn the_store_gives_the_same_key_and_follows_a_rebuilt_input() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::new(tmp.path().join("store"));
        let inp = inputs(tmp.path());
        let k0 = TemplateKey::compute(&inp).unwrap();
        assert_eq!(store.key(&inp).unwrap(), k0);
        assert_eq!(store.key(&inp).unwrap(), k0, "from the digest cache");
        std::fs::write(&inp.kernel, b"kernel bytes, rebuilt").unwrap();
        let k1 = store.key(&inp).unwrap();
        assert_ne!(k1, k0);
        assert_eq!(k1, TemplateKey::compute(&inp).unwrap());
        // The cache directory is not a template.
        assert!(store.list().unwrap().is_empty());
        assert!(store.gc().unwrap().is_empty());
    }

    #[test]
    fn bad_keys_are_refused() {
        for bad in ["", "abc", &"G".repeat(64), &"A".repeat(64), "../etc"] {
            assert!(TemplateKey::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn build_publishes_a_complete_template_and_reuses_it() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::new(tmp.path().join("store"));
        let inp = inputs(tmp.path());
        let key = TemplateKey::compute(&inp).unwrap();
        assert_eq!(store.get(&key), None);
        assert!(
            store.list().unwrap().is_empty(),
            "missing store lists empty"
        );

        let dir = store.build(&key, &inp, fake_builder).unwrap();
        assert_eq!(dir, store.root().join(key.as_str()));
        assert_eq!(store.get(&key), Some(dir.clone()));
        assert_eq!(std::fs::read(dir.join(STATE_FILE)).unwrap(), b"state");
        let rec = store.record(&key).unwrap();
        assert_eq!((rec.inputs.clone(), rec.kernel_size), (inp.clone(), 12));
        assert_eq!(rec.format_version, FORMAT_VERSION);
        assert_eq!(store_entries(&store), vec![key.to_string()]);

        // Second build: the builder is not called.
        let again = store
            .build(&key, &inp, |_| Err::<(), _>("must not run"))
            .unwrap();
        assert_eq!(again, dir);
        let listed: Vec<TemplateRecord> = store
            .list()
            .unwrap()
            .into_iter()
            .map(|r| r.unwrap())
            .collect();
        assert_eq!(listed, vec![rec]);

        store.remove(&key).unwrap();
        assert_eq!(store.get(&key), None);
        assert!(store_entries(&store).is_empty());
        let e = store.remove(&key).unwrap_err();
        assert!(matches!(e, Error::NotFound(_)), "{e}");
    }

    #[test]
    fn a_failed_build_leaves_nothing_but_its_record() {
        let tmp = tempfile::tempdir().unwrap();
        // Every build tries: this test is about what a failure leaves.
        let store = Store::new(tmp.path().join("store")).with_retry_after(Duration::ZERO);
        let inp = inputs(tmp.path());
        let key = TemplateKey::compute(&inp).unwrap();

        // Fails after writing part of a snapshot.
        let e = store
            .build(&key, &inp, |dir| {
                std::fs::write(dir.join(STATE_FILE), b"half").unwrap();
                Err("guest never became ready")
            })
            .unwrap_err()
            .to_string();
        assert!(e.contains("guest never became ready"), "{e}");
        assert_eq!(store.get(&key), None);
        let failed = format!("{key}{FAILED_SUFFIX}");
        assert_eq!(store_entries(&store), vec![failed.clone()]);

        // "Succeeds" without a memory file: refused, nothing published.
        let e = store
            .build(&key, &inp, |dir| std::fs::write(dir.join(STATE_FILE), b"s"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("no memory file"), "{e}");
        assert_eq!(store_entries(&store), vec![failed]);

        // Debris of a crashed build is cleared by the next build.
        let debris = store.root().join(format!("{BUILD_PREFIX}{key}-99999"));
        std::fs::create_dir(&debris).unwrap();
        std::fs::write(debris.join(STATE_FILE), b"x").unwrap();
        store.build(&key, &inp, fake_builder).unwrap();
        // A success forgets the failure.
        assert_eq!(store_entries(&store), vec![key.to_string()]);
    }

    #[test]
    fn a_failed_build_is_not_retried_before_the_interval() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("store");
        let store = Store::new(&root);
        let inp = inputs(tmp.path());
        let key = TemplateKey::compute(&inp).unwrap();
        let e = store
            .build(&key, &inp, |_| {
                Err("the guest was not ready before the deadline")
            })
            .unwrap_err();
        assert!(matches!(e, Error::Build { .. }), "{e}");
        let rec = store.failure(&key).expect("failure recorded");
        assert!(
            rec.reason.contains("not ready before the deadline"),
            "{rec:?}"
        );

        // Within the interval: refused at once, naming the first failure.
        let ran = AtomicUsize::new(0);
        let e = store
            .build(&key, &inp, |_| {
                ran.fetch_add(1, Ordering::SeqCst);
                Err("must not run")
            })
            .unwrap_err();
        assert_eq!(ran.load(Ordering::SeqCst), 0, "the builder ran again");
        match &e {
            Error::RecentFailure {
                reason,
                retry_after_secs,
                ..
            } => {
                assert!(reason.contains("not ready before the deadline"), "{e}");
                assert_eq!(*retry_after_secs, DEFAULT_RETRY_AFTER.as_secs());
            }
            other => panic!("expected RecentFailure, got {other}"),
        }

        // After the interval (here: none) the next build tries, and its
        // success clears the record.
        let store = Store::new(&root).with_retry_after(Duration::ZERO);
        store.build(&key, &inp, fake_builder).unwrap();
        assert_eq!(store.failure(&key), None);

        // `rm` of a key that only failed clears the record too.
        let other = TemplateInputs {
            vcpus: 2,
            ..inputs(tmp.path())
        };
        let k2 = TemplateKey::compute(&other).unwrap();
        let _ = store.build(&k2, &other, |_| Err("no"));
        assert!(store.failure(&k2).is_some());
        store.remove(&k2).unwrap();
        assert_eq!(store.failure(&k2), None);
    }

    #[test]
    fn concurrent_builders_build_once_and_never_see_half_a_template() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::new(tmp.path().join("store"));
        let inp = inputs(tmp.path());
        let key = TemplateKey::compute(&inp).unwrap();
        let builds = Arc::new(AtomicUsize::new(0));
        let start = Arc::new(Barrier::new(2));
        let threads: Vec<_> = (0..2)
            .map(|_| {
                let (store, inp, key) = (store.clone(), inp.clone(), key.clone());
                let (builds, start) = (builds.clone(), start.clone());
                std::thread::spawn(move || {
                    start.wait();
                    store
                        .build(&key, &inp, |dir| {
                            builds.fetch_add(1, Ordering::SeqCst);
                            std::fs::write(dir.join(STATE_FILE), b"state").unwrap();
                            // Slow builder: the other thread must wait, not
                            // see this half-written template.
                            std::thread::sleep(Duration::from_millis(300));
                            assert_eq!(store.get(&key), None);
                            std::fs::write(dir.join(MEMORY_FILE), b"memory")
                        })
                        .unwrap()
                })
            })
            .collect();
        let dirs: Vec<PathBuf> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        assert_eq!(builds.load(Ordering::SeqCst), 1, "built more than once");
        assert_eq!(dirs[0], dirs[1]);
        assert_eq!(std::fs::read(dirs[0].join(MEMORY_FILE)).unwrap(), b"memory");
    }

    #[test]
    fn gc_removes_templates_whose_inputs_changed() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::new(tmp.path().join("store"));
        let inp = inputs(tmp.path());
        let old = TemplateKey::compute(&inp).unwrap();
        store.build(&old, &inp, fake_builder).unwrap();
        let two = TemplateInputs {
            vcpus: 2,
            ..inp.clone()
        };
        let kept = TemplateKey::compute(&two).unwrap();
        store.build(&kept, &two, fake_builder).unwrap();
        assert!(store.gc().unwrap().is_empty(), "nothing changed yet");

        // The root image changes: both templates' keys no longer match.
        std::fs::write(&inp.root_image, b"new root image").unwrap();
        let mut removed = store.gc().unwrap();
        removed.sort();
        let mut expected = vec![old, kept];
        expected.sort();
        assert_eq!(removed, expected);
        assert!(store.list().unwrap().is_empty());
    }

    /// Builds a template of `memory_mib` whose memory file has `bytes`
    /// written (allocated) and returns its key.
    fn built(store: &Store, tmp: &Path, memory_mib: u32, bytes: usize) -> TemplateKey {
        let inp = TemplateInputs {
            memory_mib,
            ..inputs(tmp)
        };
        let key = store.key(&inp).unwrap();
        store
            .build(&key, &inp, |dir| {
                std::fs::write(dir.join(STATE_FILE), b"state")?;
                std::fs::write(dir.join(MEMORY_FILE), vec![7u8; bytes])
            })
            .unwrap();
        key
    }

    fn used_secs_ago(store: &Store, key: &TemplateKey, secs: u64) {
        let t = SystemTime::now() - Duration::from_secs(secs);
        let f = crate::private::open_lock_file(&store.in_use_path(key)).unwrap();
        f.set_modified(t).unwrap();
        File::open(store.dir(key).join(RECORD_FILE))
            .unwrap()
            .set_modified(t)
            .unwrap();
    }

    #[test]
    fn quota_evicts_the_least_recently_used_template_no_vm_holds() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::new(tmp.path().join("store"));
        let mib = 1 << 20;
        let a = built(&store, tmp.path(), 128, mib);
        let b = built(&store, tmp.path(), 256, mib);
        let c = built(&store, tmp.path(), 512, mib);
        let d = built(&store, tmp.path(), 1024, mib);
        // Least recent first: a, then b (held by a running VM), then c.
        used_secs_ago(&store, &a, 400);
        used_secs_ago(&store, &b, 300);
        used_secs_ago(&store, &c, 200);
        used_secs_ago(&store, &d, 100);
        let pin = Store::pin(&store.dir(&b))
            .unwrap()
            .expect("a store template");
        // pin marked b used just now; make it the oldest again.
        used_secs_ago(&store, &b, 500);
        let order: Vec<_> = store.usage().unwrap().into_iter().map(|u| u.key).collect();
        assert_eq!(order, [b.clone(), a.clone(), c.clone(), d.clone()]);
        // Room for two: b is held, so a and c go.
        let removed = store.evict_to(2 * mib as u64 + 64 * 1024, None).unwrap();
        assert_eq!(removed, [a.clone(), c.clone()]);
        assert!(store.get(&b).is_some(), "held by a running VM");
        assert!(store.get(&d).is_some(), "most recently used");
        assert!(store.get(&a).is_none() && store.get(&c).is_none());
        // Once the VM is gone, b is the least recently used.
        drop(pin);
        assert_eq!(store.evict_to(mib as u64 + 64 * 1024, None).unwrap(), [b]);
        // `keep` (the template just built) stays even over the quota.
        assert!(store.evict_to(0, Some(&d)).unwrap().is_empty());
        assert_eq!(store.evict_to(0, None).unwrap(), [d]);
        assert!(store.list().unwrap().is_empty());
    }

    #[test]
    fn a_template_being_built_or_removed_is_not_evicted() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::new(tmp.path().join("store"));
        let k = built(&store, tmp.path(), 128, 4096);
        let lock = store.lock(&k).unwrap();
        assert!(store
            .evict_idle(0, None, Duration::ZERO)
            .unwrap()
            .is_empty());
        drop(lock);
        assert_eq!(store.evict_idle(0, None, Duration::ZERO).unwrap(), [k]);
    }

    #[test]
    fn recently_used_templates_are_not_evicted() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::new(tmp.path().join("store"));
        let k = built(&store, tmp.path(), 128, 4096);
        assert!(store.evict_to(0, None).unwrap().is_empty(), "just built");
        assert_eq!(store.evict_idle(0, None, Duration::ZERO).unwrap(), [k]);
    }

    #[test]
    fn a_hit_marks_the_template_used() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::new(tmp.path().join("store"));
        let k = built(&store, tmp.path(), 128, 4096);
        used_secs_ago(&store, &k, 1000);
        let before = store.usage().unwrap()[0].last_used;
        let inp = TemplateInputs {
            memory_mib: 128,
            ..inputs(tmp.path())
        };
        store.build(&k, &inp, fake_builder).unwrap();
        assert!(store.usage().unwrap()[0].last_used > before);
    }

    #[test]
    fn pin_is_only_for_store_templates_and_fails_once_evicted() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::new(tmp.path().join("store"));
        let k = built(&store, tmp.path(), 128, 4096);
        // A plain snapshot directory is not pinned (and nothing is made).
        let plain = tmp.path().join("snap");
        std::fs::create_dir(&plain).unwrap();
        assert!(Store::pin(&plain).unwrap().is_none());
        assert!(!tmp.path().join("snap.in-use").exists());
        let dir = store.dir(&k);
        let evicted = store.evict_idle(0, None, Duration::ZERO).unwrap();
        assert_eq!(evicted, std::slice::from_ref(&k));
        let e = Store::pin(&dir).unwrap_err().to_string();
        assert!(e.contains(k.as_str()), "{e}");
    }

    #[test]
    fn a_mapped_memory_file_outlives_its_removal() {
        // What a VM restored with MAP_PRIVATE keeps if its template is
        // removed anyway (`thaw-vmm template rm`): its pages stay readable.
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("memory");
        std::fs::write(&p, vec![0x5au8; 8192]).unwrap();
        let f = File::open(&p).unwrap();
        // SAFETY: a fresh private read-only mapping of a file we own,
        // unmapped below; nothing else aliases it.
        let (v, len) = unsafe {
            use std::os::fd::AsRawFd;
            let m = libc::mmap(
                std::ptr::null_mut(),
                8192,
                libc::PROT_READ,
                libc::MAP_PRIVATE,
                f.as_raw_fd(),
                0,
            );
            assert_ne!(m, libc::MAP_FAILED);
            drop(f);
            std::fs::remove_file(&p).unwrap();
            let s = std::slice::from_raw_parts(m as *const u8, 8192);
            let v = (s[0], s[8191]);
            libc::munmap(m, 8192);
            (v, 8192)
        };
        assert_eq!(v, (0x5a, 0x5a));
        assert_eq!(len, 8192);
    }

    #[test]
    fn store_files_are_0600_and_directories_0700() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::new(tmp.path().join("store"));
        let k = built(&store, tmp.path(), 128, 4096);
        let _pin = Store::pin(&store.dir(&k)).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().mode() & 0o7777;
        assert_eq!(mode(store.root()), 0o700);
        for e in std::fs::read_dir(store.root()).unwrap() {
            let p = e.unwrap().path();
            let want = if p.is_dir() { 0o700 } else { 0o600 };
            assert_eq!(mode(&p), want, "{}", p.display());
            if p.is_dir() {
                for f in std::fs::read_dir(&p).unwrap() {
                    let f = f.unwrap().path();
                    let want = if f.is_dir() { 0o700 } else { 0o600 };
                    if f.file_name().unwrap() == MEMORY_FILE || f.file_name().unwrap() == STATE_FILE
                    {
                        // Written by the test's builder, not by the store.
                        continue;
                    }
                    assert_eq!(mode(&f), want, "{}", f.display());
                }
            }
        }
    }
}
