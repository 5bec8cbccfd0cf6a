//! The FUSE wire protocol, the part thaw's server speaks (kernel
//! `include/uapi/linux/fuse.h`, 7.31): opcodes, flags, and the request and
//! reply structs as little-endian byte layouts.
//!
//! Requests are decoded with [`Reader`], which never reads past the bytes
//! the guest sent: a short or malformed argument is an `EINVAL`, never a
//! panic. Replies are encoded field by field into a `Vec<u8>` (no
//! transmutes, so no `unsafe` and no padding leaks).

/// The protocol version we answer INIT with.
pub const KERNEL_VERSION: u32 = 7;
pub const KERNEL_MINOR_VERSION: u32 = 31;
/// The oldest minor whose INIT reply has today's 64-byte layout.
pub const MIN_KERNEL_MINOR_VERSION: u32 = 23;
pub const ROOT_ID: u64 = 1;

pub const IN_HEADER_LEN: usize = 40;
pub const OUT_HEADER_LEN: usize = 16;
pub const ATTR_LEN: usize = 88;
pub const ENTRY_OUT_LEN: usize = 40 + ATTR_LEN;
pub const ATTR_OUT_LEN: usize = 16 + ATTR_LEN;
pub const OPEN_OUT_LEN: usize = 16;
pub const INIT_OUT_LEN: usize = 64;
pub const STATFS_OUT_LEN: usize = 80;
pub const DIRENT_HEADER_LEN: usize = 24;

pub mod opcode {
    pub const LOOKUP: u32 = 1;
    pub const FORGET: u32 = 2;
    pub const GETATTR: u32 = 3;
    pub const SETATTR: u32 = 4;
    pub const READLINK: u32 = 5;
    pub const SYMLINK: u32 = 6;
    pub const MKNOD: u32 = 8;
    pub const MKDIR: u32 = 9;
    pub const UNLINK: u32 = 10;
    pub const RMDIR: u32 = 11;
    pub const RENAME: u32 = 12;
    pub const LINK: u32 = 13;
    pub const OPEN: u32 = 14;
    pub const READ: u32 = 15;
    pub const WRITE: u32 = 16;
    pub const STATFS: u32 = 17;
    pub const RELEASE: u32 = 18;
    pub const FSYNC: u32 = 20;
    pub const GETXATTR: u32 = 22;
    pub const LISTXATTR: u32 = 23;
    pub const FLUSH: u32 = 25;
    pub const INIT: u32 = 26;
    pub const OPENDIR: u32 = 27;
    pub const READDIR: u32 = 28;
    pub const RELEASEDIR: u32 = 29;
    pub const FSYNCDIR: u32 = 30;
    pub const ACCESS: u32 = 34;
    pub const CREATE: u32 = 35;
    pub const INTERRUPT: u32 = 36;
    pub const DESTROY: u32 = 38;
    pub const BATCH_FORGET: u32 = 42;
    pub const RENAME2: u32 = 45;
}

/// INIT flags we may grant (only those the kernel also offered).
pub const INIT_ASYNC_READ: u32 = 1 << 0;
pub const INIT_BIG_WRITES: u32 = 1 << 5;
pub const INIT_MAX_PAGES: u32 = 1 << 22;

/// SETATTR `valid` bits.
pub const FATTR_MODE: u32 = 1 << 0;
pub const FATTR_UID: u32 = 1 << 1;
pub const FATTR_GID: u32 = 1 << 2;
pub const FATTR_SIZE: u32 = 1 << 3;
pub const FATTR_ATIME: u32 = 1 << 4;
pub const FATTR_MTIME: u32 = 1 << 5;
pub const FATTR_FH: u32 = 1 << 6;
pub const FATTR_ATIME_NOW: u32 = 1 << 7;
pub const FATTR_MTIME_NOW: u32 = 1 << 8;

/// The request header every FUSE message starts with.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InHeader {
    pub len: u32,
    pub opcode: u32,
    pub unique: u64,
    pub nodeid: u64,
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
}

/// A cursor over a request's bytes. Every getter fails with `EINVAL` when
/// the bytes run out.
pub struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }

    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], i32> {
        if self.buf.len() < n {
            return Err(libc::EINVAL);
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    pub fn u16(&mut self) -> Result<u16, i32> {
        let b = self.bytes(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    pub fn u32(&mut self) -> Result<u32, i32> {
        let b = self.bytes(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub fn u64(&mut self) -> Result<u64, i32> {
        let b = self.bytes(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }

    /// A NUL-terminated string (without its NUL).
    pub fn cstr(&mut self) -> Result<&'a [u8], i32> {
        let end = self.buf.iter().position(|&b| b == 0).ok_or(libc::EINVAL)?;
        let s = &self.buf[..end];
        self.buf = &self.buf[end + 1..];
        Ok(s)
    }

    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }

    pub fn in_header(&mut self) -> Result<InHeader, i32> {
        let h = InHeader {
            len: self.u32()?,
            opcode: self.u32()?,
            unique: self.u64()?,
            nodeid: self.u64()?,
            uid: self.u32()?,
            gid: self.u32()?,
            pid: self.u32()?,
        };
        // total_extlen and padding: we negotiate no request extensions.
        self.u32()?;
        Ok(h)
    }
}

/// Appends little-endian fields to a reply.
pub trait Put {
    fn put_u16(&mut self, v: u16);
    fn put_u32(&mut self, v: u32);
    fn put_u64(&mut self, v: u64);
}

impl Put for Vec<u8> {
    fn put_u16(&mut self, v: u16) {
        self.extend_from_slice(&v.to_le_bytes());
    }
    fn put_u32(&mut self, v: u32) {
        self.extend_from_slice(&v.to_le_bytes());
    }
    fn put_u64(&mut self, v: u64) {
        self.extend_from_slice(&v.to_le_bytes());
    }
}

/// `fuse_out_header`; `error` is a negative errno or 0.
pub fn put_out_header(out: &mut Vec<u8>, len: u32, error: i32, unique: u64) {
    out.put_u32(len);
    out.put_u32(error as u32);
    out.put_u64(unique);
}

/// `fuse_attr` from a host `stat`.
pub fn put_attr(out: &mut Vec<u8>, st: &libc::stat) {
    out.put_u64(st.st_ino);
    out.put_u64(st.st_size as u64);
    out.put_u64(st.st_blocks as u64);
    out.put_u64(st.st_atime as u64);
    out.put_u64(st.st_mtime as u64);
    out.put_u64(st.st_ctime as u64);
    out.put_u32(st.st_atime_nsec as u32);
    out.put_u32(st.st_mtime_nsec as u32);
    out.put_u32(st.st_ctime_nsec as u32);
    out.put_u32(st.st_mode);
    out.put_u32(st.st_nlink as u32);
    out.put_u32(st.st_uid);
    out.put_u32(st.st_gid);
    // Device numbers of host files mean nothing to the guest.
    out.put_u32(0);
    out.put_u32(st.st_blksize as u32);
    out.put_u32(0);
}

/// How long the guest may cache entries and attributes (seconds). Short:
/// the host side (the shim bind-mounting sources) may change the tree.
pub const TTL_SECS: u64 = 1;

/// `fuse_entry_out`.
pub fn put_entry(out: &mut Vec<u8>, nodeid: u64, st: &libc::stat) {
    out.put_u64(nodeid);
    out.put_u64(0); // generation: node ids are never reused while mounted
    out.put_u64(TTL_SECS);
    out.put_u64(TTL_SECS);
    out.put_u32(0);
    out.put_u32(0);
    put_attr(out, st);
}

/// `fuse_attr_out`.
pub fn put_attr_out(out: &mut Vec<u8>, st: &libc::stat) {
    out.put_u64(TTL_SECS);
    out.put_u32(0);
    out.put_u32(0);
    put_attr(out, st);
}

/// `fuse_open_out`.
pub fn put_open_out(out: &mut Vec<u8>, fh: u64) {
    out.put_u64(fh);
    out.put_u32(0);
    out.put_u32(0);
}

/// `fuse_kstatfs`.
pub fn put_statfs(out: &mut Vec<u8>, st: &libc::statfs) {
    out.put_u64(st.f_blocks);
    out.put_u64(st.f_bfree);
    out.put_u64(st.f_bavail);
    out.put_u64(st.f_files);
    out.put_u64(st.f_ffree);
    out.put_u32(st.f_bsize as u32);
    out.put_u32(st.f_namelen as u32);
    out.put_u32(st.f_frsize as u32);
    out.put_u32(0);
    out.extend_from_slice(&[0u8; 24]);
}

/// Bytes a `fuse_dirent` with a name of `namelen` takes (8-byte aligned).
pub fn dirent_size(namelen: usize) -> usize {
    (DIRENT_HEADER_LEN + namelen + 7) & !7
}

/// `fuse_dirent` plus its name and padding.
pub fn put_dirent(out: &mut Vec<u8>, ino: u64, off: u64, kind: u8, name: &[u8]) {
    let start = out.len();
    out.put_u64(ino);
    out.put_u64(off);
    out.put_u32(name.len() as u32);
    out.put_u32(u32::from(kind));
    out.extend_from_slice(name);
    out.resize(start + dirent_size(name.len()), 0);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_have_the_kernel_sizes() {
        // SAFETY: all-zero bytes are a valid stat/statfs.
        let st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let sfs: libc::statfs = unsafe { std::mem::zeroed() };
        let mut v = Vec::new();
        put_attr(&mut v, &st);
        assert_eq!(v.len(), ATTR_LEN);
        v.clear();
        put_entry(&mut v, 1, &st);
        assert_eq!(v.len(), ENTRY_OUT_LEN);
        v.clear();
        put_attr_out(&mut v, &st);
        assert_eq!(v.len(), ATTR_OUT_LEN);
        v.clear();
        put_statfs(&mut v, &sfs);
        assert_eq!(v.len(), STATFS_OUT_LEN);
        v.clear();
        put_dirent(&mut v, 1, 2, 4, b"abc");
        assert_eq!(v.len(), 32);
        assert_eq!(dirent_size(8), 32);
        assert_eq!(dirent_size(9), 40);
    }

    #[test]
    fn reader_refuses_short_input() {
        let mut r = Reader::new(&[1, 0, 0]);
        assert_eq!(r.u32(), Err(libc::EINVAL));
        let mut r = Reader::new(b"abc");
        assert_eq!(r.cstr(), Err(libc::EINVAL));
        let mut r = Reader::new(b"ab\0cd\0");
        assert_eq!(r.cstr().unwrap(), b"ab");
        assert_eq!(r.cstr().unwrap(), b"cd");
        assert!(r.rest().is_empty());
        assert_eq!(Reader::new(&[0; 39]).in_header(), Err(libc::EINVAL));
    }
}
