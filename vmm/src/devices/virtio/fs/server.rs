//! The FUSE server: one request's bytes in, its reply's bytes out.
//!
//! Contract: [`Server::handle`] never panics on any input. A request too
//! short for its header gets an `EINVAL` reply with `unique` 0; a header
//! whose `len` disagrees with the bytes sent, or arguments too short for
//! the opcode, an `EINVAL` reply; an unknown opcode `ENOSYS`; a reply that
//! would not fit the guest's writable space an `EOVERFLOW` error instead
//! (READ and READDIR are cut to fit). FORGET, BATCH_FORGET and INTERRUPT get
//! no reply (an empty one). Before a share is attached every request but
//! DESTROY gets `ENXIO`; before INIT, everything but INIT gets `EIO`.

use std::path::Path;

use super::passthrough::{Entry, FsResult, SetAttr, Share};
use super::protocol::*;

/// The largest WRITE payload we accept (and tell the kernel in INIT).
pub const MAX_WRITE: u32 = 1024 * 1024;
/// The largest READ we serve in one reply.
pub const MAX_READ: usize = 1024 * 1024;
/// The largest request we read from the guest: a WRITE of MAX_WRITE with
/// its headers, or a few names.
pub const MAX_REQUEST: usize = MAX_WRITE as usize + 4096;
const PAGE_SIZE: u32 = 4096;

/// The share (if attached) and the session on it.
#[derive(Default)]
pub struct Server {
    share: Option<Share>,
    /// INIT succeeded and no DESTROY followed: the guest has it mounted.
    mounted: bool,
}

impl Server {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn share(&self) -> Option<&Share> {
        self.share.as_ref()
    }

    pub fn set_share(&mut self, share: Share) {
        self.share = Some(share);
        self.mounted = false;
    }

    pub fn mounted(&self) -> bool {
        self.mounted
    }

    pub fn share_dir(&self) -> Option<&Path> {
        self.share.as_ref().map(Share::dir)
    }

    /// The driver reset the device: whatever it held is gone.
    pub fn end_session(&mut self) {
        self.mounted = false;
        if let Some(s) = self.share.as_mut() {
            s.forget_all();
        }
    }

    /// Serve one request. `room` is the writable space the guest gave for
    /// the reply. Returns the reply bytes (empty: no reply).
    pub fn handle(&mut self, req: &[u8], room: usize) -> Vec<u8> {
        let mut r = Reader::new(req);
        let Ok(h) = r.in_header() else {
            return fit(error_reply(0, libc::EINVAL), room);
        };
        if h.len as usize != req.len() {
            return fit(error_reply(h.unique, libc::EINVAL), room);
        }
        if matches!(
            h.opcode,
            opcode::FORGET | opcode::BATCH_FORGET | opcode::INTERRUPT
        ) {
            self.forget(&h, &mut r);
            return Vec::new();
        }
        let mut out = Vec::with_capacity(OUT_HEADER_LEN + 128);
        out.resize(OUT_HEADER_LEN, 0);
        let result = self.dispatch(&h, &mut r, room.saturating_sub(OUT_HEADER_LEN), &mut out);
        let reply = match result {
            Ok(()) => {
                let len = out.len() as u32;
                let mut head = Vec::with_capacity(OUT_HEADER_LEN);
                put_out_header(&mut head, len, 0, h.unique);
                out[..OUT_HEADER_LEN].copy_from_slice(&head);
                out
            }
            Err(e) => error_reply(h.unique, e),
        };
        if reply.len() > room {
            return fit(error_reply(h.unique, libc::EOVERFLOW), room);
        }
        reply
    }

    fn forget(&mut self, h: &InHeader, r: &mut Reader<'_>) {
        let Some(share) = self.share.as_mut() else {
            return;
        };
        match h.opcode {
            opcode::FORGET => {
                if let Ok(n) = r.u64() {
                    share.forget(h.nodeid, n);
                }
            }
            opcode::BATCH_FORGET => {
                let Ok(count) = r.u32() else { return };
                let _ = r.u32();
                for _ in 0..count {
                    let (Ok(nodeid), Ok(n)) = (r.u64(), r.u64()) else {
                        return;
                    };
                    share.forget(nodeid, n);
                }
            }
            _ => {}
        }
    }

    fn dispatch(
        &mut self,
        h: &InHeader,
        r: &mut Reader<'_>,
        room: usize,
        out: &mut Vec<u8>,
    ) -> FsResult<()> {
        if h.opcode == opcode::DESTROY {
            self.end_session();
            return Ok(());
        }
        let mounted = self.mounted;
        let share = self.share.as_mut().ok_or(libc::ENXIO)?;
        if h.opcode == opcode::INIT {
            init(r, out)?;
            share.forget_all();
            self.mounted = true;
            return Ok(());
        }
        if !mounted {
            return Err(libc::EIO);
        }
        let node = h.nodeid;
        let owner = (h.uid, h.gid);
        match h.opcode {
            opcode::LOOKUP => {
                let name = r.cstr()?;
                put_entry_of(out, share.lookup(node, name)?);
            }
            opcode::GETATTR => {
                put_attr_out(out, &share.getattr(node)?);
            }
            opcode::SETATTR => {
                let a = setattr_in(r)?;
                put_attr_out(out, &share.setattr(node, &a)?);
            }
            opcode::READLINK => {
                out.extend_from_slice(&share.readlink(node)?);
            }
            opcode::SYMLINK => {
                let name = r.cstr()?;
                let target = r.cstr()?;
                put_entry_of(out, share.symlink(node, name, target, owner)?);
            }
            opcode::MKNOD => {
                let mode = r.u32()?;
                let _rdev = r.u32()?;
                let umask = r.u32()?;
                let _ = r.u32()?;
                let name = r.cstr()?;
                put_entry_of(out, share.mknod(node, name, mode & !umask, owner)?);
            }
            opcode::MKDIR => {
                let mode = r.u32()?;
                let umask = r.u32()?;
                let name = r.cstr()?;
                put_entry_of(out, share.mkdir(node, name, mode & !umask, owner)?);
            }
            opcode::UNLINK | opcode::RMDIR => {
                let name = r.cstr()?;
                share.unlink(node, name, h.opcode == opcode::RMDIR)?;
            }
            opcode::RENAME | opcode::RENAME2 => {
                let newdir = r.u64()?;
                let flags = if h.opcode == opcode::RENAME2 {
                    let flags = r.u32()?;
                    r.u32()?;
                    flags
                } else {
                    0
                };
                let old = r.cstr()?;
                let new = r.cstr()?;
                share.rename(node, old, newdir, new, flags)?;
            }
            opcode::LINK => {
                let old = r.u64()?;
                let name = r.cstr()?;
                put_entry_of(out, share.link(old, node, name)?);
            }
            opcode::OPEN => {
                let flags = r.u32()?;
                put_open_out(out, share.open(node, flags)?);
            }
            opcode::OPENDIR => {
                r.u32()?;
                put_open_out(out, share.opendir(node)?);
            }
            opcode::READ => {
                let fh = r.u64()?;
                let offset = r.u64()?;
                let size = r.u32()? as usize;
                let n = size.min(room).min(MAX_READ);
                let start = out.len();
                out.resize(start + n, 0);
                let got = share.read(fh, offset, &mut out[start..])?;
                out.truncate(start + got);
            }
            opcode::WRITE => {
                let fh = r.u64()?;
                let offset = r.u64()?;
                let size = r.u32()? as usize;
                r.bytes(20)?; // write_flags, lock_owner, flags, padding
                let data = r.rest();
                if size != data.len() || size > MAX_WRITE as usize {
                    return Err(libc::EINVAL);
                }
                let n = share.write(fh, offset, data)?;
                out.put_u32(n as u32);
                out.put_u32(0);
            }
            opcode::STATFS => put_statfs(out, &share.statfs(node)?),
            opcode::RELEASE | opcode::RELEASEDIR => share.release(r.u64()?)?,
            opcode::FLUSH => share.flush(r.u64()?)?,
            opcode::FSYNC | opcode::FSYNCDIR => {
                let fh = r.u64()?;
                let flags = r.u32()?;
                share.fsync(fh, flags & 1 != 0)?;
            }
            opcode::READDIR => {
                let fh = r.u64()?;
                let offset = r.u64()?;
                let size = (r.u32()? as usize).min(room).min(MAX_READ);
                share.readdir(fh, offset, size, out)?;
            }
            opcode::ACCESS => share.access(node, r.u32()?)?,
            opcode::CREATE => {
                let flags = r.u32()?;
                let mode = r.u32()?;
                let umask = r.u32()?;
                r.u32()?;
                let name = r.cstr()?;
                let (entry, fh) = share.create(node, name, flags, mode & !umask, owner)?;
                put_entry_of(out, entry);
                put_open_out(out, fh);
            }
            opcode::GETXATTR | opcode::LISTXATTR => return Err(libc::ENOSYS),
            _ => return Err(libc::ENOSYS),
        }
        Ok(())
    }
}

fn put_entry_of(out: &mut Vec<u8>, e: Entry) {
    put_entry(out, e.nodeid, &e.st);
}

/// INIT: version check and what we grant.
fn init(r: &mut Reader<'_>, out: &mut Vec<u8>) -> FsResult<()> {
    let major = r.u32()?;
    let minor = r.u32()?;
    let max_readahead = r.u32()?;
    let flags = r.u32()?;
    if major != KERNEL_VERSION || minor < MIN_KERNEL_MINOR_VERSION {
        return Err(libc::EPROTO);
    }
    let granted = flags & (INIT_ASYNC_READ | INIT_BIG_WRITES | INIT_MAX_PAGES);
    out.put_u32(KERNEL_VERSION);
    out.put_u32(KERNEL_MINOR_VERSION.min(minor));
    out.put_u32(max_readahead);
    out.put_u32(granted);
    out.put_u16(16); // max_background
    out.put_u16(12); // congestion_threshold
    out.put_u32(MAX_WRITE);
    out.put_u32(1); // time_gran: nanoseconds
    out.put_u16((MAX_WRITE / PAGE_SIZE) as u16); // max_pages
    out.put_u16(0); // map_alignment
    out.extend_from_slice(&[0u8; 32]); // flags2, unused
    Ok(())
}

fn setattr_in(r: &mut Reader<'_>) -> FsResult<SetAttr> {
    let valid = r.u32()?;
    r.u32()?;
    let fh = r.u64()?;
    let size = r.u64()?;
    let _lock_owner = r.u64()?;
    let atime = r.u64()?;
    let mtime = r.u64()?;
    let _ctime = r.u64()?;
    let atimensec = r.u32()?;
    let mtimensec = r.u32()?;
    let _ctimensec = r.u32()?;
    let mode = r.u32()?;
    r.u32()?;
    let uid = r.u32()?;
    let gid = r.u32()?;
    Ok(SetAttr {
        valid,
        fh,
        size,
        atime,
        mtime,
        atimensec,
        mtimensec,
        mode,
        uid,
        gid,
    })
}

pub fn error_reply(unique: u64, errno: i32) -> Vec<u8> {
    let mut out = Vec::with_capacity(OUT_HEADER_LEN);
    put_out_header(&mut out, OUT_HEADER_LEN as u32, -errno, unique);
    out
}

/// A reply that does not fit even as a bare header is not sent at all.
fn fit(reply: Vec<u8>, room: usize) -> Vec<u8> {
    if reply.len() > room {
        Vec::new()
    } else {
        reply
    }
}
