//! virtio-fs tests: the FUSE server over a real temporary directory, and
//! the device over in-memory guest memory and a test virtqueue.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::passthrough::{Limits, Share};
use super::protocol::{opcode, ROOT_ID};
use super::server::{Server, MAX_REQUEST};
use super::*;
use crate::devices::virtio::mmio::tests::{negotiate, setup_queue, w, ALL_OK};
use crate::devices::virtio::mmio::{MmioResources, MmioTransport};
use crate::devices::virtio::testutil::{mem, CountingInterrupt, TestQueue};

const S_IFMT: u32 = libc::S_IFMT;

fn header(len: usize, op: u32, unique: u64, nodeid: u64) -> Vec<u8> {
    let mut h = Vec::new();
    h.extend_from_slice(&(len as u32).to_le_bytes());
    h.extend_from_slice(&op.to_le_bytes());
    h.extend_from_slice(&unique.to_le_bytes());
    h.extend_from_slice(&nodeid.to_le_bytes());
    h.extend_from_slice(&1000u32.to_le_bytes()); // uid
    h.extend_from_slice(&1000u32.to_le_bytes()); // gid
    h.extend_from_slice(&1u32.to_le_bytes()); // pid
    h.extend_from_slice(&0u32.to_le_bytes());
    h
}

fn request(op: u32, unique: u64, nodeid: u64, args: &[u8]) -> Vec<u8> {
    let mut r = header(40 + args.len(), op, unique, nodeid);
    r.extend_from_slice(args);
    r
}

fn init_args(major: u32, minor: u32) -> Vec<u8> {
    let mut a = Vec::new();
    for v in [major, minor, 128 * 1024, 0xffff_ffff] {
        a.extend_from_slice(&v.to_le_bytes());
    }
    a.extend_from_slice(&[0u8; 48]);
    a
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

fn le32(vals: &[u32]) -> Vec<u8> {
    vals.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn le64(vals: &[u64]) -> Vec<u8> {
    vals.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn cstr(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

/// An entry: (node id, mode, size).
type Ent = (u64, u32, u64);

/// A FUSE client driving a [`Server`] the way the guest kernel would.
struct Client {
    server: Server,
    unique: u64,
}

impl Client {
    fn new(dir: &Path, read_only: bool, limits: Limits) -> Self {
        let mut server = Server::new();
        server.set_share(Share::new(dir, read_only, limits).unwrap());
        let mut c = Self { server, unique: 0 };
        c.call(opcode::INIT, 0, &init_args(7, 38)).unwrap();
        c
    }

    fn mounted(dir: &Path) -> Self {
        Self::new(dir, false, Limits::default())
    }

    /// The reply body, or the errno.
    fn call(&mut self, op: u32, nodeid: u64, args: &[u8]) -> Result<Vec<u8>, i32> {
        self.unique += 1;
        let reply = self
            .server
            .handle(&request(op, self.unique, nodeid, args), 1 << 21);
        assert!(reply.len() >= 16, "no reply to opcode {op}");
        assert_eq!(u32_at(&reply, 0) as usize, reply.len());
        assert_eq!(u64_at(&reply, 8), self.unique);
        let err = u32_at(&reply, 4) as i32;
        if err != 0 {
            assert_eq!(reply.len(), 16);
            return Err(-err);
        }
        Ok(reply[16..].to_vec())
    }

    fn entry(body: &[u8]) -> Ent {
        (u64_at(body, 0), u32_at(body, 100), u64_at(body, 48))
    }

    fn lookup(&mut self, parent: u64, name: &str) -> Result<Ent, i32> {
        self.call(opcode::LOOKUP, parent, &cstr(name))
            .map(|b| Self::entry(&b))
    }

    fn create(&mut self, parent: u64, name: &str, mode: u32) -> Result<(Ent, u64), i32> {
        let args = cat(&[&le32(&[libc::O_RDWR as u32, mode, 0, 0]), &cstr(name)]);
        let b = self.call(opcode::CREATE, parent, &args)?;
        Ok((Self::entry(&b), u64_at(&b, 128)))
    }

    fn mkdir(&mut self, parent: u64, name: &str, mode: u32) -> Result<Ent, i32> {
        let args = cat(&[&le32(&[mode, 0]), &cstr(name)]);
        self.call(opcode::MKDIR, parent, &args)
            .map(|b| Self::entry(&b))
    }

    fn mknod(&mut self, parent: u64, name: &str, mode: u32) -> Result<Ent, i32> {
        let args = cat(&[&le32(&[mode, 0x0801, 0, 0]), &cstr(name)]);
        self.call(opcode::MKNOD, parent, &args)
            .map(|b| Self::entry(&b))
    }

    fn open(&mut self, node: u64, flags: i32) -> Result<u64, i32> {
        self.call(opcode::OPEN, node, &le32(&[flags as u32, 0]))
            .map(|b| u64_at(&b, 0))
    }

    fn opendir(&mut self, node: u64) -> Result<u64, i32> {
        self.call(opcode::OPENDIR, node, &le32(&[0, 0]))
            .map(|b| u64_at(&b, 0))
    }

    fn release(&mut self, fh: u64) -> Result<(), i32> {
        let args = cat(&[&le64(&[fh]), &le32(&[0, 0]), &le64(&[0])]);
        self.call(opcode::RELEASE, 0, &args).map(drop)
    }

    fn write(&mut self, fh: u64, offset: u64, data: &[u8]) -> Result<u32, i32> {
        let args = cat(&[
            &le64(&[fh, offset]),
            &le32(&[data.len() as u32, 0]),
            &le64(&[0]),
            &le32(&[0, 0]),
            data,
        ]);
        self.call(opcode::WRITE, 0, &args).map(|b| u32_at(&b, 0))
    }

    fn read(&mut self, fh: u64, offset: u64, size: u32) -> Result<Vec<u8>, i32> {
        let args = cat(&[
            &le64(&[fh, offset]),
            &le32(&[size, 0]),
            &le64(&[0]),
            &le32(&[0, 0]),
        ]);
        self.call(opcode::READ, 0, &args)
    }

    /// (mode, size)
    fn getattr(&mut self, node: u64) -> Result<(u32, u64), i32> {
        let b = self.call(opcode::GETATTR, node, &[0u8; 16])?;
        Ok((u32_at(&b, 76), u64_at(&b, 24)))
    }

    fn setattr_mode(&mut self, node: u64, mode: u32) -> Result<u32, i32> {
        let mut args = vec![0u8; 88];
        args[0..4].copy_from_slice(&protocol::FATTR_MODE.to_le_bytes());
        args[68..72].copy_from_slice(&mode.to_le_bytes());
        self.call(opcode::SETATTR, node, &args)
            .map(|b| u32_at(&b, 76))
    }

    fn truncate(&mut self, node: u64, size: u64) -> Result<u64, i32> {
        let mut args = vec![0u8; 88];
        args[0..4].copy_from_slice(&protocol::FATTR_SIZE.to_le_bytes());
        args[16..24].copy_from_slice(&size.to_le_bytes());
        self.call(opcode::SETATTR, node, &args)
            .map(|b| u64_at(&b, 24))
    }

    fn readdir(&mut self, node: u64) -> Vec<String> {
        let fh = self.opendir(node).unwrap();
        let mut names = Vec::new();
        let mut offset = 0;
        loop {
            // A small buffer, so listing takes several calls.
            let args = cat(&[
                &le64(&[fh, offset]),
                &le32(&[80, 0]),
                &le64(&[0]),
                &le32(&[0, 0]),
            ]);
            let b = self.call(opcode::READDIR, 0, &args).unwrap();
            if b.is_empty() {
                break;
            }
            let mut pos = 0;
            while pos < b.len() {
                offset = u64_at(&b, pos + 8);
                let namelen = u32_at(&b, pos + 16) as usize;
                let name = &b[pos + 24..pos + 24 + namelen];
                names.push(String::from_utf8(name.to_vec()).unwrap());
                pos += protocol::dirent_size(namelen);
            }
        }
        self.call(opcode::RELEASEDIR, 0, &cat(&[&le64(&[fh]), &[0u8; 16]]))
            .unwrap();
        names.sort();
        names
    }

    fn rename(&mut self, from: u64, old: &str, to: u64, new: &str) -> Result<(), i32> {
        let args = cat(&[&le64(&[to]), &cstr(old), &cstr(new)]);
        self.call(opcode::RENAME, from, &args).map(drop)
    }

    fn unlink(&mut self, parent: u64, name: &str) -> Result<(), i32> {
        self.call(opcode::UNLINK, parent, &cstr(name)).map(drop)
    }

    fn symlink(&mut self, parent: u64, name: &str, target: &str) -> Result<Ent, i32> {
        let args = cat(&[&cstr(name), &cstr(target)]);
        self.call(opcode::SYMLINK, parent, &args)
            .map(|b| Self::entry(&b))
    }

    fn readlink(&mut self, node: u64) -> Result<Vec<u8>, i32> {
        self.call(opcode::READLINK, node, &[])
    }
}

fn host_mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().permissions().mode()
}

#[test]
fn init_handshake_needs_a_share_and_version_7() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::new();
    // No share yet: the mount fails, nothing panics.
    let reply = server.handle(&request(opcode::INIT, 1, 0, &init_args(7, 38)), 256);
    assert_eq!(u32_at(&reply, 4) as i32, -libc::ENXIO);
    server.set_share(Share::new(dir.path(), false, Limits::default()).unwrap());
    // Not initialized: other requests are refused.
    let reply = server.handle(&request(opcode::GETATTR, 2, ROOT_ID, &[0; 16]), 256);
    assert_eq!(u32_at(&reply, 4) as i32, -libc::EIO);
    let reply = server.handle(&request(opcode::INIT, 3, 0, &init_args(6, 0)), 256);
    assert_eq!(u32_at(&reply, 4) as i32, -libc::EPROTO);
    let reply = server.handle(&request(opcode::INIT, 4, 0, &init_args(7, 38)), 256);
    assert_eq!(reply.len(), 16 + 64);
    assert_eq!(u32_at(&reply, 4), 0);
    assert_eq!(u32_at(&reply, 16), 7);
    assert_eq!(u32_at(&reply, 20), 31);
    assert_eq!(u32_at(&reply, 36), server::MAX_WRITE);
    assert!(server.mounted());
    let reply = server.handle(&request(opcode::DESTROY, 5, 0, &[]), 256);
    assert_eq!(u32_at(&reply, 4), 0);
    assert!(!server.mounted());
}

#[test]
fn create_write_read_back_and_stat() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Client::mounted(dir.path());
    let ((node, mode, size), fh) = c.create(ROOT_ID, "f", 0o644).unwrap();
    assert_eq!(mode & S_IFMT, libc::S_IFREG);
    assert_eq!(size, 0);
    assert_eq!(c.write(fh, 0, b"hello world").unwrap(), 11);
    assert_eq!(c.write(fh, 6, b"thaw!").unwrap(), 5);
    assert_eq!(c.read(fh, 0, 100).unwrap(), b"hello thaw!");
    assert_eq!(c.read(fh, 6, 2).unwrap(), b"th");
    assert_eq!(c.getattr(node).unwrap().1, 11);
    c.release(fh).unwrap();
    assert_eq!(c.release(fh), Err(libc::EBADF));
    assert_eq!(std::fs::read(dir.path().join("f")).unwrap(), b"hello thaw!");
    // A second lookup names the same node; reopen and truncate.
    assert_eq!(c.lookup(ROOT_ID, "f").unwrap().0, node);
    let fh = c.open(node, libc::O_RDONLY).unwrap();
    assert_eq!(c.truncate(node, 5).unwrap(), 5);
    assert_eq!(c.read(fh, 0, 100).unwrap(), b"hello");
    // Forgetting both lookups drops the node.
    c.server
        .handle(&request(opcode::FORGET, 99, node, &le64(&[2])), 0);
    assert_eq!(c.getattr(node), Err(libc::ENOENT));
    assert_eq!(c.server.share().unwrap().inode_count(), 1);
    // STATFS, FSYNC, FLUSH, ACCESS answer.
    assert_eq!(c.call(opcode::STATFS, ROOT_ID, &[]).unwrap().len(), 80);
    c.call(opcode::FSYNC, 0, &cat(&[&le64(&[fh]), &le32(&[1, 0])]))
        .unwrap();
    c.call(opcode::FLUSH, 0, &cat(&[&le64(&[fh]), &[0u8; 16]]))
        .unwrap();
    c.call(opcode::ACCESS, ROOT_ID, &le32(&[libc::W_OK as u32, 0]))
        .unwrap();
    assert_eq!(
        c.call(opcode::GETXATTR, ROOT_ID, &[0u8; 8]),
        Err(libc::ENOSYS)
    );
}

#[test]
fn readdir_mkdir_rename_unlink_rmdir() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Client::mounted(dir.path());
    let (d, mode, _) = c.mkdir(ROOT_ID, "d", 0o755).unwrap();
    assert_eq!(mode & S_IFMT, libc::S_IFDIR);
    for name in ["a", "b", "a-much-longer-name-than-the-others"] {
        let (_, fh) = c.create(d, name, 0o600).unwrap();
        c.release(fh).unwrap();
    }
    assert_eq!(
        c.readdir(d),
        [".", "..", "a", "a-much-longer-name-than-the-others", "b"]
    );
    c.rename(d, "a", ROOT_ID, "moved").unwrap();
    assert!(dir.path().join("moved").is_file());
    assert_eq!(c.lookup(d, "a"), Err(libc::ENOENT));
    c.unlink(ROOT_ID, "moved").unwrap();
    assert!(!dir.path().join("moved").exists());
    // RENAME2 with flags is refused; with 0 it renames.
    let args = cat(&[&le64(&[d]), &le32(&[1, 0]), &cstr("b"), &cstr("c")]);
    assert_eq!(c.call(opcode::RENAME2, d, &args), Err(libc::EINVAL));
    let args = cat(&[&le64(&[d]), &le32(&[0, 0]), &cstr("b"), &cstr("c")]);
    c.call(opcode::RENAME2, d, &args).unwrap();
    assert_eq!(
        c.call(opcode::RMDIR, ROOT_ID, &cstr("d")),
        Err(libc::ENOTEMPTY)
    );
    c.unlink(d, "c").unwrap();
    c.unlink(d, "a-much-longer-name-than-the-others").unwrap();
    c.call(opcode::RMDIR, ROOT_ID, &cstr("d")).unwrap();
    assert!(!dir.path().join("d").exists());
    // A confined hard link: files yes, directories no.
    let (f, fh) = c.create(ROOT_ID, "f", 0o600).unwrap();
    c.release(fh).unwrap();
    let linked = c
        .call(opcode::LINK, ROOT_ID, &cat(&[&le64(&[f.0]), &cstr("g")]))
        .unwrap();
    assert_eq!(Client::entry(&linked).0, f.0);
    assert_eq!(std::fs::metadata(dir.path().join("f")).unwrap().nlink(), 2);
    let (sub, _, _) = c.mkdir(ROOT_ID, "sub", 0o755).unwrap();
    let r = c.call(opcode::LINK, ROOT_ID, &cat(&[&le64(&[sub]), &cstr("sub2")]));
    assert_eq!(r, Err(libc::EPERM));
}

#[test]
fn dotdot_and_slashes_stay_inside_the_share() {
    let outer = tempfile::tempdir().unwrap();
    std::fs::write(outer.path().join("secret"), b"host only").unwrap();
    let share = outer.path().join("share");
    std::fs::create_dir(&share).unwrap();
    std::fs::create_dir(share.join("sub")).unwrap();
    let mut c = Client::mounted(&share);
    // `..` at the root is the root.
    assert_eq!(c.lookup(ROOT_ID, "..").unwrap().0, ROOT_ID);
    assert_eq!(c.lookup(ROOT_ID, ".").unwrap().0, ROOT_ID);
    assert_eq!(c.lookup(ROOT_ID, "secret"), Err(libc::ENOENT));
    // Multi-component names never resolve.
    assert_eq!(c.lookup(ROOT_ID, "../secret"), Err(libc::EINVAL));
    assert_eq!(c.lookup(ROOT_ID, "sub/../../secret"), Err(libc::EINVAL));
    let (sub, _, _) = c.lookup(ROOT_ID, "sub").unwrap();
    assert_eq!(c.lookup(sub, ".."), Err(libc::EACCES));
    // Creating through `..` or a slash is refused too.
    assert_eq!(c.mkdir(ROOT_ID, "..", 0o755), Err(libc::EINVAL));
    assert_eq!(
        c.create(ROOT_ID, "../escape", 0o644).unwrap_err(),
        libc::EINVAL
    );
    assert_eq!(
        c.rename(ROOT_ID, "sub", ROOT_ID, "../sub"),
        Err(libc::EINVAL)
    );
    assert!(!outer.path().join("escape").exists());
    // A forged node id or file handle names nothing.
    assert_eq!(c.getattr(12345), Err(libc::ENOENT));
    assert_eq!(c.read(777, 0, 10), Err(libc::EBADF));
}

#[test]
fn symlinks_are_never_followed_by_the_server() {
    let dir = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink("/etc/passwd", dir.path().join("passwd")).unwrap();
    std::os::unix::fs::symlink("/etc", dir.path().join("etc")).unwrap();
    let mut c = Client::mounted(dir.path());
    let (link, mode, _) = c.lookup(ROOT_ID, "passwd").unwrap();
    assert_eq!(
        mode & S_IFMT,
        libc::S_IFLNK,
        "the link itself, not its target"
    );
    assert_eq!(c.readlink(link).unwrap(), b"/etc/passwd");
    assert_eq!(c.open(link, libc::O_RDONLY), Err(libc::ELOOP));
    assert_eq!(c.truncate(link, 0), Err(libc::EINVAL));
    assert_eq!(c.setattr_mode(link, 0o777), Err(libc::EOPNOTSUPP));
    // A symlinked directory is not a directory to the server.
    let (etc, _, _) = c.lookup(ROOT_ID, "etc").unwrap();
    assert_eq!(c.lookup(etc, "passwd"), Err(libc::ENOTDIR));
    assert_eq!(c.opendir(etc), Err(libc::ENOTDIR));
    assert_eq!(c.create(etc, "x", 0o644).unwrap_err(), libc::ENOTDIR);
    // Creating over a symlink does not write through it.
    assert_eq!(c.create(ROOT_ID, "passwd", 0o644).unwrap_err(), libc::ELOOP);
    // A link the guest makes is stored, never resolved.
    let (own, _, _) = c.symlink(ROOT_ID, "shadow", "/etc/shadow").unwrap();
    assert_eq!(c.open(own, libc::O_RDONLY), Err(libc::ELOOP));
    assert_eq!(
        std::fs::read_link(dir.path().join("shadow")).unwrap(),
        Path::new("/etc/shadow")
    );
}

#[test]
fn no_setuid_setgid_bits_and_no_device_nodes() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Client::mounted(dir.path());
    let ((f, mode, _), fh) = c.create(ROOT_ID, "suid", 0o4755).unwrap();
    c.release(fh).unwrap();
    assert_eq!(mode & (libc::S_ISUID | libc::S_ISGID), 0);
    assert_eq!(host_mode(&dir.path().join("suid")) & 0o7000, 0);
    let (_, mode, _) = c.mkdir(ROOT_ID, "sgid", 0o2775).unwrap();
    assert_eq!(mode & 0o7000, 0);
    assert_eq!(host_mode(&dir.path().join("sgid")) & 0o7000, 0);
    let mode = c.setattr_mode(f, 0o6777).unwrap();
    assert_eq!(mode & 0o7777, 0o0777);
    assert_eq!(host_mode(&dir.path().join("suid")) & 0o7777, 0o777);
    // The sticky bit is harmless and kept.
    assert_eq!(c.setattr_mode(f, 0o1755).unwrap() & 0o7777, 0o1755);
    assert_eq!(
        c.mknod(ROOT_ID, "null", libc::S_IFCHR | 0o666),
        Err(libc::EPERM)
    );
    assert_eq!(
        c.mknod(ROOT_ID, "sda", libc::S_IFBLK | 0o666),
        Err(libc::EPERM)
    );
    assert_eq!(
        c.mknod(ROOT_ID, "sock", libc::S_IFSOCK | 0o666),
        Err(libc::EPERM)
    );
    assert!(!dir.path().join("null").exists());
    let (fifo, mode, _) = c.mknod(ROOT_ID, "fifo", libc::S_IFIFO | 0o4644).unwrap();
    assert_eq!(mode & S_IFMT, libc::S_IFIFO);
    assert_eq!(mode & 0o7000, 0);
    // The server never opens what is not a regular file (a fifo would
    // block its thread).
    assert_eq!(c.open(fifo, libc::O_RDONLY), Err(libc::ENXIO));
    let (_, _, _) = c.mknod(ROOT_ID, "plain", libc::S_IFREG | 0o644).unwrap();
    // CREATE of an existing file opens it and leaves its owner alone.
    let existing = dir.path().join("existing");
    std::fs::write(&existing, b"x").unwrap();
    let owner = std::fs::metadata(&existing).unwrap().uid();
    c.create(ROOT_ID, "existing", 0o644).unwrap();
    assert_eq!(std::fs::metadata(&existing).unwrap().uid(), owner);
    let excl = cat(&[
        &le32(&[(libc::O_RDWR | libc::O_EXCL) as u32, 0o644, 0, 0]),
        &cstr("existing"),
    ]);
    assert_eq!(c.call(opcode::CREATE, ROOT_ID, &excl), Err(libc::EEXIST));
    // A setuid file the host put there loses the bit when opened to write.
    let host_suid = dir.path().join("host-suid");
    std::fs::write(&host_suid, b"#!/bin/sh").unwrap();
    std::fs::set_permissions(&host_suid, std::fs::Permissions::from_mode(0o6755)).unwrap();
    let (hs, _, _) = c.lookup(ROOT_ID, "host-suid").unwrap();
    c.open(hs, libc::O_RDONLY).unwrap();
    assert_eq!(host_mode(&host_suid) & 0o7777, 0o6755, "reading keeps it");
    c.open(hs, libc::O_WRONLY).unwrap();
    assert_eq!(host_mode(&host_suid) & 0o7777, 0o0755);
}

#[test]
fn a_read_only_share_refuses_every_write_at_the_server() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("f"), b"data").unwrap();
    std::fs::create_dir(dir.path().join("d")).unwrap();
    let mut c = Client::new(dir.path(), true, Limits::default());
    let (f, _, _) = c.lookup(ROOT_ID, "f").unwrap();
    let (d, _, _) = c.lookup(ROOT_ID, "d").unwrap();
    let fh = c.open(f, libc::O_RDONLY).unwrap();
    assert_eq!(c.read(fh, 0, 10).unwrap(), b"data");
    assert_eq!(c.write(fh, 0, b"x"), Err(libc::EROFS));
    assert_eq!(c.open(f, libc::O_RDWR), Err(libc::EROFS));
    assert_eq!(c.open(f, libc::O_WRONLY), Err(libc::EROFS));
    assert_eq!(c.open(f, libc::O_RDONLY | libc::O_TRUNC), Err(libc::EROFS));
    assert_eq!(c.create(ROOT_ID, "new", 0o644).unwrap_err(), libc::EROFS);
    assert_eq!(c.mkdir(ROOT_ID, "nd", 0o755), Err(libc::EROFS));
    assert_eq!(
        c.mknod(ROOT_ID, "n", libc::S_IFREG | 0o644),
        Err(libc::EROFS)
    );
    assert_eq!(c.symlink(ROOT_ID, "l", "f"), Err(libc::EROFS));
    assert_eq!(c.unlink(ROOT_ID, "f"), Err(libc::EROFS));
    assert_eq!(c.call(opcode::RMDIR, ROOT_ID, &cstr("d")), Err(libc::EROFS));
    assert_eq!(c.rename(ROOT_ID, "f", d, "f"), Err(libc::EROFS));
    assert_eq!(c.truncate(f, 0), Err(libc::EROFS));
    assert_eq!(c.setattr_mode(f, 0o777), Err(libc::EROFS));
    let r = c.call(opcode::LINK, ROOT_ID, &cat(&[&le64(&[f]), &cstr("g")]));
    assert_eq!(r, Err(libc::EROFS));
    let r = c.call(opcode::ACCESS, f, &le32(&[libc::W_OK as u32, 0]));
    assert_eq!(r, Err(libc::EROFS));
    assert_eq!(std::fs::read(dir.path().join("f")).unwrap(), b"data");
    assert_eq!(host_mode(&dir.path().join("f")) & 0o777, 0o644);
}

#[test]
fn open_handles_and_inodes_are_bounded() {
    let dir = tempfile::tempdir().unwrap();
    for n in ["a", "b", "c"] {
        std::fs::write(dir.path().join(n), n).unwrap();
    }
    let limits = Limits {
        max_inodes: 3,
        max_handles: 2,
    };
    let mut c = Client::new(dir.path(), false, limits);
    let (a, _, _) = c.lookup(ROOT_ID, "a").unwrap();
    let (b, _, _) = c.lookup(ROOT_ID, "b").unwrap();
    // Root, a and b: the inode table is full.
    assert_eq!(c.lookup(ROOT_ID, "c"), Err(libc::ENFILE));
    assert_eq!(
        c.lookup(ROOT_ID, "a").unwrap().0,
        a,
        "known inodes still resolve"
    );
    assert_eq!(c.mkdir(ROOT_ID, "d", 0o755), Err(libc::ENFILE));
    let h1 = c.open(a, libc::O_RDONLY).unwrap();
    let _h2 = c.open(b, libc::O_RDONLY).unwrap();
    assert_eq!(c.open(a, libc::O_RDONLY), Err(libc::ENFILE));
    assert_eq!(c.opendir(ROOT_ID), Err(libc::ENFILE));
    c.release(h1).unwrap();
    c.open(a, libc::O_RDONLY).unwrap();
    c.server
        .handle(&request(opcode::FORGET, 0, b, &le64(&[1])), 0);
    c.lookup(ROOT_ID, "c").unwrap();
    let share = c.server.share().unwrap();
    assert_eq!((share.inode_count(), share.handle_count()), (3, 2));
}

#[test]
fn malformed_requests_get_an_error_reply_and_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Client::mounted(dir.path());
    let err = |reply: &[u8]| u32_at(reply, 4) as i32;
    // Shorter than a header: EINVAL, unique unknown (0).
    let reply = c.server.handle(&[1, 2, 3], 64);
    assert_eq!(
        (reply.len(), err(&reply), u64_at(&reply, 8)),
        (16, -libc::EINVAL, 0)
    );
    // The header's len disagrees with what was sent.
    let mut req = request(opcode::GETATTR, 7, ROOT_ID, &[0; 16]);
    req[0] = 200;
    let reply = c.server.handle(&req, 64);
    assert_eq!((err(&reply), u64_at(&reply, 8)), (-libc::EINVAL, 7));
    // Unknown opcode.
    let reply = c.server.handle(&request(9999, 8, ROOT_ID, &[]), 64);
    assert_eq!(err(&reply), -libc::ENOSYS);
    // Arguments too short, a name without its NUL.
    assert_eq!(
        c.call(opcode::SETATTR, ROOT_ID, &[0; 10]),
        Err(libc::EINVAL)
    );
    assert_eq!(c.call(opcode::LOOKUP, ROOT_ID, b"abc"), Err(libc::EINVAL));
    assert_eq!(c.call(opcode::WRITE, 0, &le64(&[1])), Err(libc::EINVAL));
    // A WRITE whose size field lies about its payload.
    let (_, fh) = c.create(ROOT_ID, "f", 0o644).unwrap();
    let args = cat(&[&le64(&[fh, 0]), &le32(&[100, 0]), &[0u8; 16], b"abc"]);
    assert_eq!(c.call(opcode::WRITE, 0, &args), Err(libc::EINVAL));
    // A reply that does not fit: an error, or nothing if not even that fits.
    let reply = c
        .server
        .handle(&request(opcode::GETATTR, 9, ROOT_ID, &[0; 16]), 20);
    assert_eq!(err(&reply), -libc::EOVERFLOW);
    assert!(c
        .server
        .handle(&request(opcode::GETATTR, 9, ROOT_ID, &[0; 16]), 8)
        .is_empty());
    // A READ is cut to the room given.
    c.write(fh, 0, &[7u8; 4096]).unwrap();
    let args = cat(&[&le64(&[fh, 0]), &le32(&[4096, 0]), &[0u8; 16]]);
    let reply = c
        .server
        .handle(&request(opcode::READ, 10, 0, &args), 16 + 100);
    assert_eq!((reply.len(), err(&reply)), (116, 0));
    // Hostile forgets and random bytes.
    let batch = cat(&[&le32(&[1000, 0]), &le64(&[ROOT_ID, 5])]);
    assert!(c
        .server
        .handle(&request(opcode::BATCH_FORGET, 0, 0, &batch), 0)
        .is_empty());
    let mut seed = 0x1234_5678_u64;
    for _ in 0..2000 {
        let mut junk = vec![0u8; (seed % 200) as usize];
        for b in junk.iter_mut() {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            *b = (seed >> 56) as u8;
        }
        let op = (seed >> 8) as u32 % 50;
        let mut req = request(op, 1, (seed >> 20) % 4, &junk);
        let len = req.len();
        req[..4].copy_from_slice(&(len as u32).to_le_bytes());
        let _ = c.server.handle(&req, 4096);
    }
    // Still serving (the junk may have held a DESTROY: mount again).
    c.call(opcode::INIT, 0, &init_args(7, 38)).unwrap();
    assert_eq!(c.lookup(ROOT_ID, ".").unwrap().0, ROOT_ID);
}

/// The device over a real virtqueue: a chain in, the reply in the guest's
/// buffers and the used ring.
#[test]
fn device_serves_requests_from_both_queues() {
    let m = mem(0x400000);
    let dir = tempfile::tempdir().unwrap();
    let mut fs = Fs::new(DEFAULT_TAG).unwrap();
    let mut cfg = [0u8; 40];
    fs.read_config(0, &mut cfg);
    assert_eq!(&cfg[..10], b"thaw-share");
    assert_eq!(u32_at(&cfg, 36), 1);
    assert_eq!(fs.device_type(), 26);
    let mut hi = TestQueue::new(&m, 0, 16);
    let mut rq = TestQueue::new(&m, 0x1000, 16);
    let evts = [
        EventFd::new(EFD_NONBLOCK).unwrap(),
        EventFd::new(EFD_NONBLOCK).unwrap(),
    ];
    let irq = CountingInterrupt::new();
    fs.activate(ActivateContext {
        mem: m.clone(),
        interrupt: irq.clone(),
        queues: vec![hi.queue(), rq.queue()],
        queue_events: evts.iter().map(|e| e.try_clone().unwrap()).collect(),
    })
    .unwrap();
    // Before a share: ENXIO.
    let init = request(opcode::INIT, 1, 0, &init_args(7, 38));
    m.write_slice(&init, GuestAddress(0x10000)).unwrap();
    rq.add_chain(&[(0x10000, init.len() as u32, false), (0x20000, 80, true)]);
    evts[1].write(1).unwrap();
    assert!(rq.wait_used(1, Duration::from_secs(5)));
    assert_eq!(rq.used_elem(0).1, 16);
    let e: u32 = m.read_obj(GuestAddress(0x20004)).unwrap();
    assert_eq!(e as i32, -libc::ENXIO);
    // Attached while running; the header in one buffer, args in another.
    fs.attach_share(dir.path(), false).unwrap();
    let again = fs.attach_share(Path::new("/"), false).unwrap_err();
    assert!(matches!(again, FsError::AlreadyAttached { .. }), "{again}");
    m.write_slice(&init, GuestAddress(0x10000)).unwrap();
    rq.add_chain(&[
        (0x10000, 40, false),
        (0x10028, init.len() as u32 - 40, false),
        (0x20000, 16, true),
        (0x21000, 64, true),
    ]);
    evts[1].write(1).unwrap();
    assert!(rq.wait_used(2, Duration::from_secs(5)));
    assert_eq!(rq.used_elem(1).1, 80);
    let major: u32 = m.read_obj(GuestAddress(0x21000)).unwrap();
    assert_eq!(major, 7);
    assert!(fs.mounted());
    // Malformed chains: no writable buffer, a request too big to accept.
    rq.add_chain(&[(0x10000, 40, false)]);
    rq.add_chain(&[
        (0x10000, MAX_REQUEST as u32 + 100, false),
        (0x20000, 16, true),
    ]);
    evts[1].write(1).unwrap();
    assert!(rq.wait_used(4, Duration::from_secs(5)));
    assert_eq!(rq.used_elem(2).1, 0);
    assert_eq!(rq.used_elem(3).1, 16);
    let e: u32 = m.read_obj(GuestAddress(0x20004)).unwrap();
    assert_eq!(e as i32, -libc::EINVAL);
    // hiprio: a FORGET has no reply.
    let forget = request(opcode::FORGET, 0, 5, &le64(&[1]));
    m.write_slice(&forget, GuestAddress(0x30000)).unwrap();
    hi.add_chain(&[(0x30000, forget.len() as u32, false)]);
    evts[0].write(1).unwrap();
    assert!(hi.wait_used(1, Duration::from_secs(5)));
    assert_eq!(hi.used_elem(0).1, 0);
    assert!(irq.used_count() >= 3);
    assert_eq!(fs.pause().unwrap().len(), 2);
    // A reset forgets the session.
    assert!(fs.reset());
    assert!(!fs.mounted());
}

#[test]
fn template_state_round_trips_and_a_mounted_one_is_refused() {
    let m = mem(0x100000);
    let dir = tempfile::tempdir().unwrap();
    let mut t = MmioTransport::new(m.clone(), Fs::new(DEFAULT_TAG).unwrap()).unwrap();
    negotiate(&mut t);
    let hi = TestQueue::new(&m, 0, 16);
    let mut rq = TestQueue::new(&m, 0x1000, 16);
    setup_queue(&mut t, 0, &hi);
    setup_queue(&mut t, 1, &rq);
    w(&mut t, 0x70, ALL_OK);
    t.pause().unwrap();
    let state = crate::devices::persist::through_state_file(&t.save().unwrap());
    assert!(!state.device.mounted);
    assert_eq!(state.device.tag, DEFAULT_TAG);
    assert_ne!(state.device.acked_features, 0);

    // Restored with a share given on the restoring VMM's command line.
    let share = ShareConfig {
        dir: dir.path().to_path_buf(),
        read_only: false,
    };
    let res = MmioResources {
        mem: m.clone(),
        device: Some(share),
    };
    let mut t2 = MmioTransport::<Fs>::restore(&state, res).unwrap();
    assert_eq!(t2.device().share_dir().as_deref(), Some(dir.path()));
    t2.resume().unwrap();
    let init = request(opcode::INIT, 1, 0, &init_args(7, 38));
    m.write_slice(&init, GuestAddress(0x10000)).unwrap();
    rq.add_chain(&[(0x10000, init.len() as u32, false), (0x20000, 80, true)]);
    w(&mut t2, 0x50, 1);
    assert!(rq.wait_used(1, Duration::from_secs(5)));
    assert_eq!(rq.used_elem(0).1, 80);

    // Now mounted: such a snapshot cannot be restored.
    t2.pause().unwrap();
    let mounted = t2.save().unwrap();
    assert!(mounted.device.mounted);
    let res = MmioResources {
        mem: m.clone(),
        device: None,
    };
    assert!(MmioTransport::<Fs>::restore(&mounted, res).is_err());
    assert!(matches!(
        Fs::restore(&mounted.device, None),
        Err(FsError::MountedInSnapshot)
    ));
    assert!(Fs::new("").is_err());
    assert!(Fs::new(&"x".repeat(37)).is_err());
}
