//! The filesystem the FUSE server exports: one host directory, passed
//! through, with the guest confined beneath it by the kernel.
//!
//! Contract:
//! - An inode is an `O_PATH` fd, keyed by the host's `(st_dev, st_ino)`,
//!   with the guest's lookup count; node ids are ours (a counter, never
//!   reused while the share lives), so a guest cannot name a host inode it
//!   was not given. Root is node 1 and never forgotten.
//! - Every name the guest sends is one component (no `/`, no NUL, at most
//!   255 bytes) and is resolved with `openat2(parent, name,
//!   RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)`, so the
//!   kernel, not string checks, keeps resolution under the parent. `..` is
//!   answered by the server itself: the root at the root, `EACCES` below it
//!   (the guest kernel walks `..` in its own dcache; we offer no NFS export
//!   support that would need it).
//! - Symlinks are never followed on the guest's behalf: a lookup of a
//!   symlink yields an `O_PATH` fd of the link itself, which can be
//!   `READLINK`ed (the guest kernel resolves the target in the guest) but
//!   never opened, used as a directory, chmod-ed or truncated.
//! - Files are opened for I/O by reopening an inode's `O_PATH` fd through
//!   `/proc/self/fd/N` (the one magic link we follow, on our own fds only),
//!   and only after `fstat` on that fd says it is a regular file (or a
//!   directory for `OPENDIR`): the type of an open fd cannot change, so
//!   there is no race, and device nodes, fifos and sockets are never opened
//!   by the server.
//! - Created files, directories and nodes never get S_ISUID/S_ISGID; MKNOD
//!   makes only regular files and fifos (`EPERM` for devices and sockets);
//!   `SETATTR` strips the same bits, and so does an open for writing of a
//!   file that has them (the VMM's CAP_FSETID would keep them on write). Ownership follows the requesting guest
//!   uid/gid where the VMM may chown (best effort).
//! - Hard links are confined: the source is an inode already in the share
//!   (never a directory), the target a name under a share directory.
//! - A read-only share refuses every write op with `EROFS` here, and opens
//!   files read-only, whatever the guest mounted it as.
//! - At most [`Limits::max_inodes`] inodes and [`Limits::max_handles`] open
//!   handles (default 65536 each); beyond, `ENFILE`. The VMM's fd usage is
//!   thus bounded by the two plus a few.
//! - Not passed through: xattrs, locks, DAX, file handles (`name_to_handle_at`
//!   is also denied by the VMM's seccomp filter).

use std::collections::HashMap;
use std::ffi::{CStr, CString};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use super::protocol::ROOT_ID;

/// Default bounds on what a guest can make the VMM hold open.
pub const MAX_INODES: usize = 65536;
pub const MAX_HANDLES: usize = 65536;
/// The longest name a component may have (NAME_MAX).
const NAME_MAX: usize = 255;
/// The longest symlink target (PATH_MAX less the NUL).
const TARGET_MAX: usize = 4095;

/// An errno, positive.
pub type Errno = i32;
pub type FsResult<T> = Result<T, Errno>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_inodes: usize,
    pub max_handles: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_inodes: MAX_INODES,
            max_handles: MAX_HANDLES,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ShareError {
    #[error("share {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("share {0}: not a directory")]
    NotADirectory(PathBuf),
    #[error("share {path}: this kernel lacks openat2 with RESOLVE_BENEATH ({source})")]
    NoOpenat2 {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// `struct open_how` (libc's is non-exhaustive, so it cannot be built).
#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

const RESOLVE_CONFINED: u64 =
    libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS;

fn errno() -> Errno {
    io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

/// `ret` as a result, with errno on -1.
fn check(ret: libc::c_int) -> FsResult<libc::c_int> {
    if ret < 0 {
        Err(errno())
    } else {
        Ok(ret)
    }
}

fn openat2(dir: RawFd, name: &CStr, flags: i32, mode: u32, resolve: u64) -> FsResult<OwnedFd> {
    let how = OpenHow {
        flags: (flags | libc::O_CLOEXEC) as u64,
        mode: u64::from(mode),
        resolve,
    };
    // SAFETY: `name` is NUL-terminated and `how` a live open_how of the
    // size passed; the kernel reads both and returns an fd or -1.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir,
            name.as_ptr(),
            &how as *const OpenHow,
            std::mem::size_of::<OpenHow>(),
        )
    };
    if fd < 0 {
        return Err(errno());
    }
    // SAFETY: the kernel just returned this fd to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// `fstat` of any fd, `O_PATH` and symlinks included.
pub fn stat_fd(fd: RawFd) -> FsResult<libc::stat> {
    // SAFETY: all-zero bytes are a valid stat; fstatat fills it.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: an empty NUL-terminated path and a live stat buffer.
    check(unsafe {
        libc::fstatat(
            fd,
            c"".as_ptr(),
            &mut st,
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
        )
    })?;
    Ok(st)
}

fn file_type(mode: u32) -> u32 {
    mode & libc::S_IFMT
}

/// Permission bits a guest may set: no setuid, no setgid.
fn safe_mode(mode: u32) -> u32 {
    mode & 0o7777 & !(libc::S_ISUID | libc::S_ISGID)
}

/// A file opened for writing loses S_ISUID/S_ISGID first: the kernel would
/// not clear them on write, the VMM holding CAP_FSETID, so a setuid file
/// the host put in the share could otherwise be rewritten by the guest.
fn drop_setid_bits(file: &File) -> FsResult<()> {
    let st = stat_fd(file.as_raw_fd())?;
    if st.st_mode & (libc::S_ISUID | libc::S_ISGID) != 0 {
        // SAFETY: fchmod on an fd we own.
        check(unsafe { libc::fchmod(file.as_raw_fd(), safe_mode(st.st_mode)) })?;
    }
    Ok(())
}

/// A component the guest wants to create or remove.
fn entry_name(name: &[u8]) -> FsResult<CString> {
    if name.len() > NAME_MAX {
        return Err(libc::ENAMETOOLONG);
    }
    if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') {
        return Err(libc::EINVAL);
    }
    CString::new(name).map_err(|_| libc::EINVAL)
}

struct Inode {
    fd: OwnedFd,
    key: (u64, u64),
    /// File type bits, fixed for the fd's life.
    kind: u32,
    lookups: u64,
}

struct Handle {
    file: File,
}

/// One exported directory and what the guest holds in it.
pub struct Share {
    dir: PathBuf,
    read_only: bool,
    limits: Limits,
    /// `/proc/self/fd`, for reopening our own `O_PATH` fds.
    proc_fds: OwnedFd,
    inodes: HashMap<u64, Inode>,
    by_key: HashMap<(u64, u64), u64>,
    next_node: u64,
    handles: HashMap<u64, Handle>,
    next_fh: u64,
}

/// What a lookup-like op hands the guest.
pub struct Entry {
    pub nodeid: u64,
    pub st: libc::stat,
}

impl Share {
    pub fn new(dir: &Path, read_only: bool, limits: Limits) -> Result<Self, ShareError> {
        let open_err = |source| ShareError::Open {
            path: dir.to_owned(),
            source,
        };
        let cpath = CString::new(dir.as_os_str().as_bytes())
            .map_err(|_| open_err(io::Error::from_raw_os_error(libc::EINVAL)))?;
        // The path is the host's choice: following its symlinks is fine.
        let root = openat2(
            libc::AT_FDCWD,
            &cpath,
            libc::O_PATH | libc::O_DIRECTORY,
            0,
            0,
        )
        .map_err(|e| {
            if e == libc::ENOTDIR {
                ShareError::NotADirectory(dir.to_owned())
            } else {
                open_err(io::Error::from_raw_os_error(e))
            }
        })?;
        if let Err(e) = openat2(root.as_raw_fd(), c".", libc::O_PATH, 0, RESOLVE_CONFINED) {
            return Err(ShareError::NoOpenat2 {
                path: dir.to_owned(),
                source: io::Error::from_raw_os_error(e),
            });
        }
        // Opened before the jail, which has no procfs.
        let proc_fds = crate::proc_self::fd_dir().map_err(|source| ShareError::Open {
            path: "/proc/self/fd".into(),
            source,
        })?;
        let st =
            stat_fd(root.as_raw_fd()).map_err(|e| open_err(io::Error::from_raw_os_error(e)))?;
        let mut share = Self {
            dir: dir.to_owned(),
            read_only,
            limits,
            proc_fds,
            inodes: HashMap::new(),
            by_key: HashMap::new(),
            next_node: ROOT_ID + 1,
            handles: HashMap::new(),
            next_fh: 1,
        };
        let key = (st.st_dev, st.st_ino);
        share.by_key.insert(key, ROOT_ID);
        share.inodes.insert(
            ROOT_ID,
            Inode {
                fd: root,
                key,
                kind: file_type(st.st_mode),
                lookups: 1,
            },
        );
        Ok(share)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn read_only(&self) -> bool {
        self.read_only
    }

    pub fn inode_count(&self) -> usize {
        self.inodes.len()
    }

    pub fn handle_count(&self) -> usize {
        self.handles.len()
    }

    /// Forget everything the guest held (unmount, DESTROY, device reset),
    /// keeping the root.
    pub fn forget_all(&mut self) {
        self.handles.clear();
        self.inodes.retain(|&id, _| id == ROOT_ID);
        self.by_key.retain(|_, id| *id == ROOT_ID);
    }

    fn writable(&self) -> FsResult<()> {
        if self.read_only {
            Err(libc::EROFS)
        } else {
            Ok(())
        }
    }

    fn inode(&self, nodeid: u64) -> FsResult<&Inode> {
        self.inodes.get(&nodeid).ok_or(libc::ENOENT)
    }

    fn fd(&self, nodeid: u64) -> FsResult<RawFd> {
        Ok(self.inode(nodeid)?.fd.as_raw_fd())
    }

    fn dir_fd(&self, nodeid: u64) -> FsResult<RawFd> {
        let inode = self.inode(nodeid)?;
        if inode.kind != libc::S_IFDIR {
            return Err(libc::ENOTDIR);
        }
        Ok(inode.fd.as_raw_fd())
    }

    fn handle(&self, fh: u64) -> FsResult<&File> {
        self.handles.get(&fh).map(|h| &h.file).ok_or(libc::EBADF)
    }

    /// The name of an inode's fd under `/proc/self/fd`.
    fn proc_name(inode: &Inode) -> CString {
        // Digits only: never contains a NUL.
        CString::new(inode.fd.as_raw_fd().to_string()).unwrap_or_default()
    }

    /// A new I/O fd on the inode itself (type already checked by callers).
    fn reopen(&self, inode: &Inode, flags: i32) -> FsResult<File> {
        let name = Self::proc_name(inode);
        // SAFETY: a NUL-terminated name; openat returns an fd or -1.
        let fd = check(unsafe {
            libc::openat(
                self.proc_fds.as_raw_fd(),
                name.as_ptr(),
                flags | libc::O_CLOEXEC | libc::O_NOCTTY,
            )
        })?;
        // SAFETY: a fresh fd that nothing else owns.
        Ok(unsafe { File::from_raw_fd(fd) })
    }

    fn room_for_inode(&self) -> FsResult<()> {
        if self.inodes.len() >= self.limits.max_inodes {
            return Err(libc::ENFILE);
        }
        Ok(())
    }

    fn room_for_handle(&self) -> FsResult<()> {
        if self.handles.len() >= self.limits.max_handles {
            return Err(libc::ENFILE);
        }
        Ok(())
    }

    fn add_handle(&mut self, file: File) -> FsResult<u64> {
        self.room_for_handle()?;
        let fh = self.next_fh;
        self.next_fh += 1;
        self.handles.insert(fh, Handle { file });
        Ok(fh)
    }

    /// Count a lookup of the inode `fd` refers to, adding it if new.
    fn remember(&mut self, fd: OwnedFd) -> FsResult<Entry> {
        let st = stat_fd(fd.as_raw_fd())?;
        let key = (st.st_dev, st.st_ino);
        if let Some(&nodeid) = self.by_key.get(&key) {
            if let Some(inode) = self.inodes.get_mut(&nodeid) {
                inode.lookups = inode.lookups.saturating_add(1);
                return Ok(Entry { nodeid, st });
            }
        }
        self.room_for_inode()?;
        let nodeid = self.next_node;
        self.next_node += 1;
        self.by_key.insert(key, nodeid);
        self.inodes.insert(
            nodeid,
            Inode {
                fd,
                key,
                kind: file_type(st.st_mode),
                lookups: 1,
            },
        );
        Ok(Entry { nodeid, st })
    }

    pub fn lookup(&mut self, parent: u64, name: &[u8]) -> FsResult<Entry> {
        let dir = self.dir_fd(parent)?;
        match name {
            b"." => return self.relookup(parent),
            b".." if parent == ROOT_ID => return self.relookup(ROOT_ID),
            b".." => return Err(libc::EACCES),
            _ => {}
        }
        if name.len() > NAME_MAX {
            return Err(libc::ENAMETOOLONG);
        }
        let cname = CString::new(name).map_err(|_| libc::EINVAL)?;
        if name.is_empty() || name.contains(&b'/') {
            return Err(libc::EINVAL);
        }
        let fd = openat2(
            dir,
            &cname,
            libc::O_PATH | libc::O_NOFOLLOW,
            0,
            RESOLVE_CONFINED,
        )?;
        self.remember(fd)
    }

    fn relookup(&mut self, nodeid: u64) -> FsResult<Entry> {
        let inode = self.inodes.get_mut(&nodeid).ok_or(libc::ENOENT)?;
        inode.lookups = inode.lookups.saturating_add(1);
        let st = stat_fd(inode.fd.as_raw_fd())?;
        Ok(Entry { nodeid, st })
    }

    pub fn forget(&mut self, nodeid: u64, n: u64) {
        if nodeid == ROOT_ID {
            return;
        }
        let Some(inode) = self.inodes.get_mut(&nodeid) else {
            return;
        };
        inode.lookups = inode.lookups.saturating_sub(n);
        if inode.lookups == 0 {
            let key = inode.key;
            self.inodes.remove(&nodeid);
            self.by_key.remove(&key);
        }
    }

    pub fn getattr(&self, nodeid: u64) -> FsResult<libc::stat> {
        stat_fd(self.fd(nodeid)?)
    }

    pub fn setattr(&mut self, nodeid: u64, a: &SetAttr) -> FsResult<libc::stat> {
        use super::protocol::*;
        let changes = FATTR_MODE
            | FATTR_UID
            | FATTR_GID
            | FATTR_SIZE
            | FATTR_ATIME
            | FATTR_MTIME
            | FATTR_ATIME_NOW
            | FATTR_MTIME_NOW;
        if a.valid & changes != 0 {
            self.writable()?;
        }
        let inode = self.inode(nodeid)?;
        let is_link = inode.kind == libc::S_IFLNK;
        let name = Self::proc_name(inode);
        if a.valid & FATTR_MODE != 0 {
            if is_link {
                return Err(libc::EOPNOTSUPP);
            }
            // SAFETY: NUL-terminated name under our /proc/self/fd fd.
            check(unsafe {
                libc::fchmodat(
                    self.proc_fds.as_raw_fd(),
                    name.as_ptr(),
                    safe_mode(a.mode),
                    0,
                )
            })?;
        }
        if a.valid & (FATTR_UID | FATTR_GID) != 0 {
            let uid = if a.valid & FATTR_UID != 0 {
                a.uid
            } else {
                u32::MAX
            };
            let gid = if a.valid & FATTR_GID != 0 {
                a.gid
            } else {
                u32::MAX
            };
            // SAFETY: an empty path on our own fd; -1 (u32::MAX) leaves an id.
            check(unsafe {
                libc::fchownat(
                    inode.fd.as_raw_fd(),
                    c"".as_ptr(),
                    uid,
                    gid,
                    libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
                )
            })?;
        }
        if a.valid & FATTR_SIZE != 0 {
            if inode.kind != libc::S_IFREG {
                return Err(if inode.kind == libc::S_IFDIR {
                    libc::EISDIR
                } else {
                    libc::EINVAL
                });
            }
            let size = i64::try_from(a.size).map_err(|_| libc::EFBIG)?;
            let via_handle = if a.valid & FATTR_FH != 0 {
                self.handle(a.fh).ok()
            } else {
                None
            };
            let owned;
            let file = match via_handle {
                Some(f) => f,
                None => {
                    owned = self.reopen(inode, libc::O_WRONLY)?;
                    &owned
                }
            };
            // SAFETY: ftruncate on an fd we own.
            check(unsafe { libc::ftruncate(file.as_raw_fd(), size) })?;
        }
        let time_bits = FATTR_ATIME | FATTR_MTIME | FATTR_ATIME_NOW | FATTR_MTIME_NOW;
        if a.valid & time_bits != 0 {
            if is_link {
                return Err(libc::EOPNOTSUPP);
            }
            let ts = |set: u32, now: u32, secs: u64, nsecs: u32| libc::timespec {
                tv_sec: secs as libc::time_t,
                tv_nsec: if a.valid & now != 0 {
                    libc::UTIME_NOW
                } else if a.valid & set != 0 {
                    libc::c_long::from(nsecs.min(999_999_999))
                } else {
                    libc::UTIME_OMIT
                },
            };
            let times = [
                ts(FATTR_ATIME, FATTR_ATIME_NOW, a.atime, a.atimensec),
                ts(FATTR_MTIME, FATTR_MTIME_NOW, a.mtime, a.mtimensec),
            ];
            // SAFETY: NUL-terminated name, a live two-element array.
            check(unsafe {
                libc::utimensat(self.proc_fds.as_raw_fd(), name.as_ptr(), times.as_ptr(), 0)
            })?;
        }
        stat_fd(inode.fd.as_raw_fd())
    }

    pub fn readlink(&self, nodeid: u64) -> FsResult<Vec<u8>> {
        let inode = self.inode(nodeid)?;
        if inode.kind != libc::S_IFLNK {
            return Err(libc::EINVAL);
        }
        let mut buf = vec![0u8; TARGET_MAX + 1];
        // SAFETY: an empty path on an O_PATH symlink fd; the buffer is live
        // and its length passed.
        let n = unsafe {
            libc::readlinkat(
                inode.fd.as_raw_fd(),
                c"".as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        if n < 0 {
            return Err(errno());
        }
        buf.truncate(n as usize);
        Ok(buf)
    }

    /// Flags the guest may pass to an open of a regular file.
    fn open_flags(&self, flags: u32) -> FsResult<i32> {
        let flags = flags as i32;
        let acc = flags & libc::O_ACCMODE;
        if self.read_only && (acc != libc::O_RDONLY || flags & libc::O_TRUNC != 0) {
            return Err(libc::EROFS);
        }
        let keep = libc::O_ACCMODE | libc::O_APPEND | libc::O_TRUNC | libc::O_SYNC | libc::O_DSYNC;
        Ok(flags & keep)
    }

    pub fn open(&mut self, nodeid: u64, flags: u32) -> FsResult<u64> {
        let flags = self.open_flags(flags)?;
        self.room_for_handle()?;
        let inode = self.inode(nodeid)?;
        match inode.kind {
            libc::S_IFREG => {}
            libc::S_IFDIR => return Err(libc::EISDIR),
            libc::S_IFLNK => return Err(libc::ELOOP),
            _ => return Err(libc::ENXIO),
        }
        let file = self.reopen(inode, flags)?;
        if flags & libc::O_ACCMODE != libc::O_RDONLY {
            drop_setid_bits(&file)?;
        }
        self.add_handle(file)
    }

    pub fn opendir(&mut self, nodeid: u64) -> FsResult<u64> {
        self.room_for_handle()?;
        let inode = self.inode(nodeid)?;
        if inode.kind != libc::S_IFDIR {
            return Err(libc::ENOTDIR);
        }
        let file = self.reopen(inode, libc::O_RDONLY | libc::O_DIRECTORY)?;
        self.add_handle(file)
    }

    pub fn release(&mut self, fh: u64) -> FsResult<()> {
        self.handles.remove(&fh).map(drop).ok_or(libc::EBADF)
    }

    pub fn read(&self, fh: u64, offset: u64, buf: &mut [u8]) -> FsResult<usize> {
        let file = self.handle(fh)?;
        let offset = i64::try_from(offset).map_err(|_| libc::EINVAL)?;
        // SAFETY: the buffer is live and its length passed.
        let n =
            unsafe { libc::pread(file.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), offset) };
        if n < 0 {
            return Err(errno());
        }
        Ok(n as usize)
    }

    pub fn write(&self, fh: u64, offset: u64, data: &[u8]) -> FsResult<usize> {
        self.writable()?;
        let file = self.handle(fh)?;
        let offset = i64::try_from(offset).map_err(|_| libc::EINVAL)?;
        // SAFETY: the data is live and its length passed.
        let n = unsafe { libc::pwrite(file.as_raw_fd(), data.as_ptr().cast(), data.len(), offset) };
        if n < 0 {
            return Err(errno());
        }
        Ok(n as usize)
    }

    pub fn fsync(&self, fh: u64, datasync: bool) -> FsResult<()> {
        let fd = self.handle(fh)?.as_raw_fd();
        // SAFETY: fsync/fdatasync on an fd we own.
        check(unsafe {
            if datasync {
                libc::fdatasync(fd)
            } else {
                libc::fsync(fd)
            }
        })
        .map(drop)
    }

    pub fn flush(&self, fh: u64) -> FsResult<()> {
        // We never dup a handle, so there is nothing to close early.
        self.handle(fh).map(drop)
    }

    /// Directory entries from cookie `offset` as `fuse_dirent`s, at most
    /// `size` bytes of them.
    pub fn readdir(&self, fh: u64, offset: u64, size: usize, out: &mut Vec<u8>) -> FsResult<()> {
        use super::protocol::{dirent_size, put_dirent};
        let fd = self.handle(fh)?.as_raw_fd();
        let offset = i64::try_from(offset).map_err(|_| libc::EINVAL)?;
        // SAFETY: lseek on an fd we own.
        if unsafe { libc::lseek(fd, offset, libc::SEEK_SET) } < 0 {
            return Err(errno());
        }
        // linux_dirent64 records are smaller than fuse_dirents, so `size`
        // bytes of them are always enough to fill `size` bytes of reply.
        let mut buf = vec![0u8; size.clamp(512, 64 * 1024)];
        // SAFETY: the buffer is live and its length passed.
        let n = unsafe { libc::syscall(libc::SYS_getdents64, fd, buf.as_mut_ptr(), buf.len()) };
        if n < 0 {
            return Err(errno());
        }
        let data = &buf[..n as usize];
        let start = out.len();
        let mut pos = 0usize;
        // linux_dirent64: d_ino u64, d_off i64, d_reclen u16, d_type u8, name.
        while pos + 19 <= data.len() {
            let rec = &data[pos..];
            let ino = u64::from_ne_bytes(rec[0..8].try_into().map_err(|_| libc::EIO)?);
            let off = u64::from_ne_bytes(rec[8..16].try_into().map_err(|_| libc::EIO)?);
            let reclen = usize::from(u16::from_ne_bytes([rec[16], rec[17]]));
            let kind = rec[18];
            if reclen < 19 || reclen > rec.len() {
                break;
            }
            let name_bytes = &rec[19..reclen];
            let name = name_bytes
                .iter()
                .position(|&b| b == 0)
                .map_or(name_bytes, |end| &name_bytes[..end]);
            if out.len() - start + dirent_size(name.len()) > size {
                break;
            }
            put_dirent(out, ino, off, kind, name);
            pos += reclen;
        }
        Ok(())
    }

    pub fn statfs(&self, nodeid: u64) -> FsResult<libc::statfs> {
        let fd = self.fd(nodeid)?;
        // SAFETY: all-zero bytes are a valid statfs; fstatfs fills it.
        let mut st: libc::statfs = unsafe { std::mem::zeroed() };
        // SAFETY: fstatfs on our own fd into a live buffer.
        check(unsafe { libc::fstatfs(fd, &mut st) })?;
        Ok(st)
    }

    pub fn access(&self, nodeid: u64, mask: u32) -> FsResult<()> {
        self.inode(nodeid)?;
        // Permissions are the guest kernel's to check (virtio-fs mounts with
        // default_permissions); a write is refused here when read-only.
        if mask as i32 & libc::W_OK != 0 {
            self.writable()?;
        }
        Ok(())
    }

    /// Give a new entry the requesting guest's ids, where we may.
    fn chown_to(&self, fd: RawFd, owner: (u32, u32)) {
        // SAFETY: an empty path on our own fd. Failure (no CAP_CHOWN) is
        // fine: the file stays the VMM's.
        unsafe {
            libc::fchownat(
                fd,
                c"".as_ptr(),
                owner.0,
                owner.1,
                libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
            );
        }
    }

    /// Checks before making a new entry: writable, room for its inode, a
    /// valid name, a directory to make it in.
    fn prepare_new(&self, parent: u64, name: &[u8]) -> FsResult<(RawFd, CString)> {
        self.writable()?;
        self.room_for_inode()?;
        let cname = entry_name(name)?;
        Ok((self.dir_fd(parent)?, cname))
    }

    /// Returns the entry and the open handle.
    pub fn create(
        &mut self,
        parent: u64,
        name: &[u8],
        flags: u32,
        mode: u32,
        owner: (u32, u32),
    ) -> FsResult<(Entry, u64)> {
        let (dir, cname) = self.prepare_new(parent, name)?;
        self.room_for_handle()?;
        let exclusive = flags as i32 & libc::O_EXCL != 0;
        let flags = self.open_flags(flags)? | libc::O_NOFOLLOW;
        // Made exclusively, so only a file we made gets the guest's ids; an
        // existing one is opened as it is (unless the guest said O_EXCL).
        let made = openat2(
            dir,
            &cname,
            flags | libc::O_CREAT | libc::O_EXCL,
            safe_mode(mode),
            RESOLVE_CONFINED,
        );
        let fd = match made {
            Ok(fd) => {
                self.chown_to(fd.as_raw_fd(), owner);
                fd
            }
            Err(libc::EEXIST) if !exclusive => openat2(dir, &cname, flags, 0, RESOLVE_CONFINED)?,
            Err(e) => return Err(e),
        };
        let file = File::from(fd);
        // CREATE also opens a file that already exists (no O_EXCL).
        if flags & libc::O_ACCMODE != libc::O_RDONLY {
            drop_setid_bits(&file)?;
        }
        let entry = self.lookup(parent, name)?;
        let fh = self.add_handle(file)?;
        Ok((entry, fh))
    }

    pub fn mkdir(
        &mut self,
        parent: u64,
        name: &[u8],
        mode: u32,
        owner: (u32, u32),
    ) -> FsResult<Entry> {
        let (dir, cname) = self.prepare_new(parent, name)?;
        // SAFETY: a NUL-terminated single component under our dir fd.
        check(unsafe { libc::mkdirat(dir, cname.as_ptr(), safe_mode(mode)) })?;
        self.new_entry(parent, name, owner)
    }

    pub fn mknod(
        &mut self,
        parent: u64,
        name: &[u8],
        mode: u32,
        owner: (u32, u32),
    ) -> FsResult<Entry> {
        let kind = file_type(mode);
        if kind != libc::S_IFREG && kind != libc::S_IFIFO {
            return Err(libc::EPERM);
        }
        let (dir, cname) = self.prepare_new(parent, name)?;
        // SAFETY: a NUL-terminated single component under our dir fd.
        check(unsafe { libc::mknodat(dir, cname.as_ptr(), kind | safe_mode(mode), 0) })?;
        self.new_entry(parent, name, owner)
    }

    pub fn symlink(
        &mut self,
        parent: u64,
        name: &[u8],
        target: &[u8],
        owner: (u32, u32),
    ) -> FsResult<Entry> {
        let (dir, cname) = self.prepare_new(parent, name)?;
        if target.is_empty() || target.len() > TARGET_MAX {
            return Err(libc::EINVAL);
        }
        let ctarget = CString::new(target).map_err(|_| libc::EINVAL)?;
        // SAFETY: NUL-terminated target and name. The target is stored,
        // never resolved by us.
        check(unsafe { libc::symlinkat(ctarget.as_ptr(), dir, cname.as_ptr()) })?;
        self.new_entry(parent, name, owner)
    }

    fn new_entry(&mut self, parent: u64, name: &[u8], owner: (u32, u32)) -> FsResult<Entry> {
        let entry = self.lookup(parent, name)?;
        if let Ok(inode) = self.inode(entry.nodeid) {
            self.chown_to(inode.fd.as_raw_fd(), owner);
        }
        let st = self.getattr(entry.nodeid)?;
        Ok(Entry { st, ..entry })
    }

    pub fn link(&mut self, nodeid: u64, parent: u64, name: &[u8]) -> FsResult<Entry> {
        let (dir, cname) = self.prepare_new(parent, name)?;
        let inode = self.inode(nodeid)?;
        if inode.kind == libc::S_IFDIR {
            return Err(libc::EPERM);
        }
        let src = Self::proc_name(inode);
        // SAFETY: NUL-terminated names; the source is our own fd's magic
        // link, which names an inode already inside the share.
        check(unsafe {
            libc::linkat(
                self.proc_fds.as_raw_fd(),
                src.as_ptr(),
                dir,
                cname.as_ptr(),
                libc::AT_SYMLINK_FOLLOW,
            )
        })?;
        self.lookup(parent, name)
    }

    pub fn unlink(&mut self, parent: u64, name: &[u8], dir_flag: bool) -> FsResult<()> {
        self.writable()?;
        let cname = entry_name(name)?;
        let dir = self.dir_fd(parent)?;
        let flags = if dir_flag { libc::AT_REMOVEDIR } else { 0 };
        // SAFETY: a NUL-terminated single component under our dir fd.
        check(unsafe { libc::unlinkat(dir, cname.as_ptr(), flags) }).map(drop)
    }

    pub fn rename(
        &mut self,
        olddir: u64,
        oldname: &[u8],
        newdir: u64,
        newname: &[u8],
        flags: u32,
    ) -> FsResult<()> {
        self.writable()?;
        if flags != 0 {
            return Err(libc::EINVAL);
        }
        let old = entry_name(oldname)?;
        let new = entry_name(newname)?;
        let (from, to) = (self.dir_fd(olddir)?, self.dir_fd(newdir)?);
        // SAFETY: NUL-terminated single components under our dir fds.
        check(unsafe { libc::renameat(from, old.as_ptr(), to, new.as_ptr()) }).map(drop)
    }
}

/// A SETATTR request's fields.
#[derive(Debug, Default, Clone, Copy)]
pub struct SetAttr {
    pub valid: u32,
    pub fh: u64,
    pub size: u64,
    pub atime: u64,
    pub mtime: u64,
    pub atimensec: u32,
    pub mtimensec: u32,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}
