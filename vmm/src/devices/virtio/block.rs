//! virtio-blk backed by a raw image file (virtio spec 5.2).
//!
//! API for the VMM: [`Block::new`] (path, read-only flag), or
//! [`Block::empty`] for a spare slot that [`Block::attach`] fills later (the
//! guest gets a config-change interrupt and sees the new capacity);
//! optionally [`Block::with_id`]. Wrap in `MmioTransport`. Snapshots:
//! [`Persist`] with [`BlockState`]; the image is not part of it and is
//! reopened by path on restore.
//!
//! Requests are served synchronously on the worker thread, one at a time:
//! a rootfs image is read mostly once, and this keeps the device simple.
//! Data goes through a bounded bounce buffer rather than straight into
//! guest memory; the extra copy is cheap next to the syscall.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_blk;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::descriptors::{read_from_bufs, total_len, write_to_bufs, Buf, Chain, ChainError};
use super::worker::{spawn_queue_worker, Worker};
use super::{
    read_config_bytes, ActivateContext, ActivateError, Interrupt, PauseError, VirtioDevice,
    FEATURE_RING_EVENT_IDX, FEATURE_RING_INDIRECT_DESC, FEATURE_VERSION_1, TYPE_BLOCK,
};
use crate::devices::Persist;

pub const SECTOR_SIZE: u64 = 512;
pub const QUEUE_SIZE: u16 = 256;
/// Data segments per request we tell the driver it may use.
const SEG_MAX: u32 = 128;
const ID_BYTES: usize = 20;
const BOUNCE_SIZE: usize = 128 * 1024;

const FEATURE_SEG_MAX: u64 = 1 << virtio_blk::VIRTIO_BLK_F_SEG_MAX;
const FEATURE_RO: u64 = 1 << virtio_blk::VIRTIO_BLK_F_RO;
const FEATURE_FLUSH: u64 = 1 << virtio_blk::VIRTIO_BLK_F_FLUSH;

const REQ_IN: u32 = virtio_blk::VIRTIO_BLK_T_IN;
const REQ_OUT: u32 = virtio_blk::VIRTIO_BLK_T_OUT;
const REQ_FLUSH: u32 = virtio_blk::VIRTIO_BLK_T_FLUSH;
const REQ_GET_ID: u32 = virtio_blk::VIRTIO_BLK_T_GET_ID;

// The status byte the device writes (the bindings type them u32).
const STATUS_OK: u8 = virtio_blk::VIRTIO_BLK_S_OK as u8;
const STATUS_IOERR: u8 = virtio_blk::VIRTIO_BLK_S_IOERR as u8;
const STATUS_UNSUPP: u8 = virtio_blk::VIRTIO_BLK_S_UNSUPP as u8;

#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("cannot open disk image {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("disk image {path} has {found} sectors, the snapshot expects {expected}")]
    SizeChanged {
        path: PathBuf,
        expected: u64,
        found: u64,
    },
    #[error("the snapshot has a disk attached but no image path was given")]
    MissingPath,
    #[error("a read-write disk cannot go in a slot the guest negotiated as read-only")]
    ReadOnlySlot,
}

/// What a snapshot records about a block device (the image itself is not
/// part of it: it is attached again by path).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockState {
    /// False for a spare slot that had no disk.
    pub attached: bool,
    pub read_only: bool,
    /// What the device offered: VIRTIO_BLK_F_RO (fixed for its lifetime).
    pub offered_read_only: bool,
    pub capacity_sectors: u64,
    pub id: String,
    pub acked_features: u64,
    pub config_generation: u32,
}

/// The backing image, shared with the worker so `attach` can swap it.
struct Disk {
    file: Option<File>,
    path: Option<PathBuf>,
    read_only: bool,
    capacity_sectors: u64,
    id: [u8; ID_BYTES],
}

pub struct Block {
    disk: Arc<RwLock<Disk>>,
    offered_read_only: bool,
    acked_features: u64,
    config_generation: Arc<AtomicU32>,
    /// The generation the driver was last told about; an attach while the
    /// device is not running is announced when it starts again.
    announced_generation: u32,
    interrupt: Option<Arc<dyn Interrupt>>,
    worker: Option<Worker<Queue>>,
}

fn open_image(path: &Path, read_only: bool) -> Result<(File, u64), BlockError> {
    let open_err = |source| BlockError::Open {
        path: path.to_path_buf(),
        source,
    };
    let file = OpenOptions::new()
        .read(true)
        .write(!read_only)
        .open(path)
        .map_err(open_err)?;
    let len = file.metadata().map_err(open_err)?.len();
    Ok((file, len / SECTOR_SIZE))
}

fn default_id() -> [u8; ID_BYTES] {
    let mut id = [0u8; ID_BYTES];
    id[..8].copy_from_slice(b"thaw-blk");
    id
}

impl Block {
    pub fn new(path: &Path, read_only: bool) -> Result<Self, BlockError> {
        let (file, capacity_sectors) = open_image(path, read_only)?;
        Ok(Self::with_disk(
            Disk {
                file: Some(file),
                path: Some(path.to_path_buf()),
                read_only,
                capacity_sectors,
                id: default_id(),
            },
            read_only,
        ))
    }

    /// A slot without a disk: capacity 0 until [`Block::attach`]. It offers
    /// a writable device so that either kind of disk can go in later (a
    /// read-only one then answers writes with an I/O error).
    pub fn empty() -> Self {
        Self::with_disk(
            Disk {
                file: None,
                path: None,
                read_only: false,
                capacity_sectors: 0,
                id: default_id(),
            },
            false,
        )
    }

    fn with_disk(disk: Disk, offered_read_only: bool) -> Self {
        Self {
            disk: Arc::new(RwLock::new(disk)),
            offered_read_only,
            acked_features: 0,
            config_generation: Arc::new(AtomicU32::new(0)),
            announced_generation: 0,
            interrupt: None,
            worker: None,
        }
    }

    fn disk(&self) -> std::sync::RwLockReadGuard<'_, Disk> {
        self.disk.read().unwrap_or_else(|e| e.into_inner())
    }

    /// The serial the guest sees (`/sys/block/vdX/serial`), at most 20 bytes.
    pub fn with_id(self, id: &str) -> Self {
        {
            let mut disk = self.disk.write().unwrap_or_else(|e| e.into_inner());
            disk.id = [0; ID_BYTES];
            let n = id.len().min(ID_BYTES);
            disk.id[..n].copy_from_slice(&id.as_bytes()[..n]);
        }
        self
    }

    /// Put an image in this slot (replacing any), and tell a running guest
    /// that the capacity changed. Requests in flight finish on the old image.
    pub fn attach(&mut self, path: &Path, read_only: bool) -> Result<(), BlockError> {
        if self.offered_read_only && !read_only {
            return Err(BlockError::ReadOnlySlot);
        }
        let (file, capacity_sectors) = open_image(path, read_only)?;
        {
            let mut disk = self.disk.write().unwrap_or_else(|e| e.into_inner());
            disk.file = Some(file);
            disk.path = Some(path.to_path_buf());
            disk.read_only = read_only;
            disk.capacity_sectors = capacity_sectors;
        }
        let generation = self.config_generation.fetch_add(1, Ordering::SeqCst) + 1;
        if let (Some(irq), Some(_)) = (&self.interrupt, &self.worker) {
            irq.signal_config_change();
            self.announced_generation = generation;
        }
        Ok(())
    }

    pub fn path(&self) -> Option<PathBuf> {
        self.disk().path.clone()
    }

    pub fn capacity_sectors(&self) -> u64 {
        self.disk().capacity_sectors
    }

    fn config(&self) -> [u8; 16] {
        let mut c = [0u8; 16];
        c[..8].copy_from_slice(&self.capacity_sectors().to_le_bytes());
        // size_max (8..12) unused; seg_max at 12.
        c[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        c
    }
}

impl Persist for Block {
    type State = BlockState;
    /// The image to reopen for an attached disk: it must have the size the
    /// guest already knows. `None` for a slot that was empty (a slot that
    /// held a disk is then refused: the guest may have it mounted).
    type Resources = Option<PathBuf>;
    type Error = BlockError;

    fn save(&self) -> Result<BlockState, BlockError> {
        let disk = self.disk();
        let id_len = disk.id.iter().position(|&b| b == 0).unwrap_or(ID_BYTES);
        Ok(BlockState {
            attached: disk.file.is_some(),
            read_only: disk.read_only,
            offered_read_only: self.offered_read_only,
            capacity_sectors: disk.capacity_sectors,
            id: String::from_utf8_lossy(&disk.id[..id_len]).into_owned(),
            acked_features: self.acked_features,
            config_generation: self.config_generation.load(Ordering::SeqCst),
        })
    }

    fn restore(state: &BlockState, image: Option<PathBuf>) -> Result<Self, BlockError> {
        let mut disk = Disk {
            file: None,
            path: None,
            read_only: state.read_only,
            capacity_sectors: state.capacity_sectors,
            id: default_id(),
        };
        if state.attached {
            let path = image.ok_or(BlockError::MissingPath)?;
            let (file, found) = open_image(&path, state.read_only)?;
            if found != state.capacity_sectors {
                return Err(BlockError::SizeChanged {
                    path,
                    expected: state.capacity_sectors,
                    found,
                });
            }
            disk.file = Some(file);
            disk.path = Some(path);
        } else {
            disk.capacity_sectors = 0;
        }
        let mut block = Self::with_disk(disk, state.offered_read_only).with_id(&state.id);
        block.acked_features = state.acked_features & block.avail_features();
        block
            .config_generation
            .store(state.config_generation, Ordering::SeqCst);
        block.announced_generation = state.config_generation;
        Ok(block)
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn avail_features(&self) -> u64 {
        let mut f = FEATURE_VERSION_1
            | FEATURE_RING_EVENT_IDX
            | FEATURE_RING_INDIRECT_DESC
            | FEATURE_SEG_MAX;
        f |= if self.offered_read_only {
            FEATURE_RO
        } else {
            FEATURE_FLUSH
        };
        f
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features();
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config(), offset, data)
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // Nothing in our config space is writable (no CONFIG_WCE).
    }

    fn config_generation(&self) -> u32 {
        self.config_generation.load(Ordering::SeqCst)
    }

    fn activate(&mut self, mut ctx: ActivateContext) -> Result<(), ActivateError> {
        let got = ctx.queues.len();
        let (Some(queue), Some(evt), 1) = (ctx.queues.pop(), ctx.queue_events.pop(), got) else {
            return Err(ActivateError::QueueCount { expected: 1, got });
        };
        self.worker = None;
        let disk = self.disk.clone();
        let mut bounce = Vec::new();
        self.interrupt = Some(ctx.interrupt.clone());
        let generation = self.config_generation.load(Ordering::SeqCst);
        if generation != self.announced_generation {
            ctx.interrupt.signal_config_change();
            self.announced_generation = generation;
        }
        let worker = spawn_queue_worker(
            "thaw-virtio-blk",
            crate::confined::ThreadRole::Block,
            ctx.mem,
            queue,
            evt,
            ctx.interrupt,
            move |mem, chain| {
                let disk = disk.read().unwrap_or_else(|e| e.into_inner());
                disk.handle(mem, chain, &mut bounce)
            },
        )
        .map_err(ActivateError::Worker)?;
        self.worker = Some(worker);
        Ok(())
    }

    fn reset(&mut self) -> bool {
        // Dropping the worker stops and joins it.
        self.worker = None;
        self.interrupt = None;
        true
    }

    fn pause(&mut self) -> Result<Vec<Queue>, PauseError> {
        let worker = self.worker.take().ok_or(PauseError::NotActive)?;
        Ok(vec![worker.stop()?])
    }
}

/// The 16-byte request header (virtio_blk_outhdr).
struct RequestHeader {
    kind: u32,
    sector: u64,
}

impl Disk {
    /// Serve one request; returns the number of bytes written into the
    /// chain. A chain with nowhere to put a status byte is dropped (used
    /// length 0): there is no way to tell the driver anything about it.
    fn handle(
        &self,
        mem: &GuestMemoryMmap,
        chain: Result<Chain, ChainError>,
        bounce: &mut Vec<u8>,
    ) -> u32 {
        let chain = match chain {
            Ok(c) => c,
            Err(e) => {
                log::warn!("virtio-blk: dropping malformed request: {e}");
                return 0;
            }
        };
        let Some((status_at, data_out)) = split_status(&chain.writable) else {
            log::warn!("virtio-blk: request without a status byte, dropped");
            return 0;
        };
        let (status, written) = self.execute(mem, &chain.readable, &data_out, bounce);
        if let Err(e) = mem.write_obj(status, status_at) {
            log::warn!("virtio-blk: cannot write status byte: {e}");
            return 0;
        }
        // `written` is bounded by the chain length, itself below 4 GiB.
        u32::try_from(written + 1).unwrap_or(u32::MAX)
    }

    /// Returns the status and the number of data bytes written to the guest.
    fn execute(
        &self,
        mem: &GuestMemoryMmap,
        readable: &[Buf],
        data_out: &[Buf],
        bounce: &mut Vec<u8>,
    ) -> (u8, u64) {
        let mut raw = [0u8; 16];
        match read_from_bufs(mem, readable, 0, &mut raw) {
            Ok(16) => {}
            _ => return (STATUS_IOERR, 0),
        }
        let header = RequestHeader {
            kind: u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]),
            sector: u64::from_le_bytes([
                raw[8], raw[9], raw[10], raw[11], raw[12], raw[13], raw[14], raw[15],
            ]),
        };
        let data_in_len = total_len(readable) - 16;
        let data_out_len = total_len(data_out);
        match header.kind {
            REQ_IN => {
                // A read whose data buffer the driver marked device-readable
                // (or that has none) would have us write where we may not.
                if data_in_len != 0 || data_out_len == 0 {
                    return (STATUS_IOERR, 0);
                }
                match self.check_range(header.sector, data_out_len) {
                    Some(offset) => match self.read_disk(mem, data_out, offset, bounce) {
                        Ok(()) => (STATUS_OK, data_out_len),
                        Err(e) => {
                            log::warn!("virtio-blk: read failed: {e}");
                            (STATUS_IOERR, 0)
                        }
                    },
                    None => (STATUS_IOERR, 0),
                }
            }
            REQ_OUT => {
                if self.read_only || data_out_len != 0 {
                    return (STATUS_IOERR, 0);
                }
                match self.check_range(header.sector, data_in_len) {
                    Some(offset) => match self.write_disk(mem, readable, offset, bounce) {
                        Ok(()) => (STATUS_OK, 0),
                        Err(e) => {
                            log::warn!("virtio-blk: write failed: {e}");
                            (STATUS_IOERR, 0)
                        }
                    },
                    None => (STATUS_IOERR, 0),
                }
            }
            REQ_FLUSH => {
                if self.read_only {
                    return (STATUS_OK, 0);
                }
                match self.file.as_ref().map(File::sync_data) {
                    Some(Ok(())) => (STATUS_OK, 0),
                    _ => (STATUS_IOERR, 0),
                }
            }
            REQ_GET_ID => {
                let n = (ID_BYTES as u64).min(data_out_len) as usize;
                match write_to_bufs(mem, data_out, 0, &self.id[..n]) {
                    Ok(w) => (STATUS_OK, w as u64),
                    Err(_) => (STATUS_IOERR, 0),
                }
            }
            _ => (STATUS_UNSUPP, 0),
        }
    }

    /// Byte offset of `sector` if `len` bytes from there are whole sectors
    /// inside the disk.
    fn check_range(&self, sector: u64, len: u64) -> Option<u64> {
        if !len.is_multiple_of(SECTOR_SIZE) {
            return None;
        }
        let end = sector.checked_add(len / SECTOR_SIZE)?;
        (end <= self.capacity_sectors).then(|| sector * SECTOR_SIZE)
    }

    fn read_disk(
        &self,
        mem: &GuestMemoryMmap,
        bufs: &[Buf],
        mut offset: u64,
        bounce: &mut Vec<u8>,
    ) -> std::io::Result<()> {
        let file = self.file.as_ref().ok_or_else(no_disk)?;
        bounce.resize(BOUNCE_SIZE, 0);
        for buf in bufs {
            let mut done = 0u64;
            while done < u64::from(buf.len) {
                let n = (u64::from(buf.len) - done).min(BOUNCE_SIZE as u64) as usize;
                file.read_exact_at(&mut bounce[..n], offset)?;
                mem.write_slice(&bounce[..n], GuestAddress(buf.addr.0 + done))
                    .map_err(std::io::Error::other)?;
                done += n as u64;
                offset += n as u64;
            }
        }
        Ok(())
    }

    /// Write the data that follows the 16-byte header in `readable`.
    fn write_disk(
        &self,
        mem: &GuestMemoryMmap,
        readable: &[Buf],
        mut offset: u64,
        bounce: &mut Vec<u8>,
    ) -> std::io::Result<()> {
        let file = self.file.as_ref().ok_or_else(no_disk)?;
        bounce.resize(BOUNCE_SIZE, 0);
        let mut skip = 16u64;
        let total = total_len(readable);
        while skip < total {
            let n = (total - skip).min(BOUNCE_SIZE as u64) as usize;
            let got = read_from_bufs(mem, readable, skip, &mut bounce[..n])
                .map_err(std::io::Error::other)?;
            if got != n {
                return Err(std::io::Error::other("short guest buffer"));
            }
            file.write_all_at(&bounce[..n], offset)?;
            skip += n as u64;
            offset += n as u64;
        }
        Ok(())
    }
}

fn no_disk() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::NotFound, "no disk attached")
}

/// Split the writable buffers into the status byte (the very last byte)
/// and the data buffers before it.
fn split_status(writable: &[Buf]) -> Option<(GuestAddress, Vec<Buf>)> {
    let mut data: Vec<Buf> = writable.to_vec();
    // Trailing zero-length buffers cannot hold the status.
    while data.last().is_some_and(|b| b.len == 0) {
        data.pop();
    }
    let last = data.last_mut()?;
    let status_at = GuestAddress(last.addr.0 + u64::from(last.len) - 1);
    last.len -= 1;
    if last.len == 0 {
        data.pop();
    }
    Some((status_at, data))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::mmio::tests::{negotiate, r, setup_queue, w, ALL_OK};
    use crate::devices::virtio::mmio::{MmioResources, MmioTransport};
    use crate::devices::virtio::testutil::{mem, CountingInterrupt, TestQueue, F_NEXT, F_WRITE};
    use crate::devices::BusDevice;
    use std::io::Write;
    use std::time::Duration;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
    use vmm_sys_util::tempfile::TempFile;

    const HDR: u64 = 0x10000;
    const DATA: u64 = 0x11000;
    const STATUS: u64 = 0x20000;

    /// A disk of 8 sectors, sector i filled with byte i.
    fn disk() -> TempFile {
        let f = TempFile::new().unwrap();
        for i in 0..8u8 {
            f.as_file().write_all(&[i; 512]).unwrap();
        }
        f
    }

    struct Rig {
        mem: GuestMemoryMmap,
        q: TestQueue,
        /// The device's view of the queue; persists across `serve` calls.
        queue: Queue,
        block: Block,
    }

    impl Rig {
        fn new(read_only: bool) -> (Self, TempFile) {
            let f = disk();
            let block = Block::new(f.as_path(), read_only).unwrap();
            let m = mem(0x40000);
            let q = TestQueue::new(&m, 0, 16);
            let queue = q.queue();
            (
                Self {
                    block,
                    mem: m,
                    q,
                    queue,
                },
                f,
            )
        }

        fn header(&self, kind: u32, sector: u64) {
            self.mem.write_obj(kind, GuestAddress(HDR)).unwrap();
            self.mem.write_obj(0u32, GuestAddress(HDR + 4)).unwrap();
            self.mem.write_obj(sector, GuestAddress(HDR + 8)).unwrap();
            self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        }

        /// Serve everything in the queue synchronously; return used lens.
        fn serve(&mut self) -> Vec<u32> {
            let before = self.q.used_idx();
            let mut bounce = Vec::new();
            let m = self.mem.clone();
            let disk = self.block.disk();
            super::super::worker::serve_queue(&m, &mut self.queue, 1000, |c| {
                disk.handle(&m, c, &mut bounce)
            });
            (before..self.q.used_idx())
                .map(|i| self.q.used_elem(i).1)
                .collect()
        }

        fn status(&self) -> u8 {
            self.mem.read_obj(GuestAddress(STATUS)).unwrap()
        }
    }

    #[test]
    fn read_write_flush_get_id() {
        let (mut rig, f) = Rig::new(false);
        rig.header(REQ_IN, 2);
        rig.q
            .add_chain(&[(HDR, 16, false), (DATA, 1024, true), (STATUS, 1, true)]);
        assert_eq!(rig.serve(), vec![1025]);
        assert_eq!(rig.status(), STATUS_OK);
        let mut got = [0u8; 1024];
        rig.mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
        assert!(got[..512].iter().all(|&b| b == 2));
        assert!(got[512..].iter().all(|&b| b == 3));

        rig.mem
            .write_slice(&[0xab; 512], GuestAddress(DATA))
            .unwrap();
        rig.header(REQ_OUT, 7);
        rig.q
            .add_chain(&[(HDR, 16, false), (DATA, 512, false), (STATUS, 1, true)]);
        assert_eq!(rig.serve(), vec![1]);
        assert_eq!(rig.status(), STATUS_OK);
        let mut on_disk = [0u8; 512];
        f.as_file().read_exact_at(&mut on_disk, 7 * 512).unwrap();
        assert_eq!(on_disk, [0xab; 512]);

        rig.header(REQ_FLUSH, 0);
        rig.q.add_chain(&[(HDR, 16, false), (STATUS, 1, true)]);
        assert_eq!(rig.serve(), vec![1]);
        assert_eq!(rig.status(), STATUS_OK);

        rig.header(REQ_GET_ID, 0);
        rig.q
            .add_chain(&[(HDR, 16, false), (DATA, 20, true), (STATUS, 1, true)]);
        assert_eq!(rig.serve(), vec![21]);
        let mut id = [0u8; 8];
        rig.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
        assert_eq!(&id, b"thaw-blk");
    }

    #[test]
    fn header_data_and_status_in_one_buffer_each_side() {
        // Any layout is allowed: header + data in one readable buffer, status
        // at the end of the only writable one.
        let (mut rig, f) = Rig::new(false);
        rig.mem.write_obj(REQ_OUT, GuestAddress(HDR)).unwrap();
        rig.mem.write_obj(1u64, GuestAddress(HDR + 8)).unwrap();
        rig.mem
            .write_slice(&[0x5a; 512], GuestAddress(HDR + 16))
            .unwrap();
        rig.q
            .add_chain(&[(HDR, 16 + 512, false), (STATUS, 1, true)]);
        assert_eq!(rig.serve(), vec![1]);
        assert_eq!(rig.status(), STATUS_OK);
        let mut on_disk = [0u8; 512];
        f.as_file().read_exact_at(&mut on_disk, 512).unwrap();
        assert_eq!(on_disk, [0x5a; 512]);
    }

    #[test]
    fn read_only_disk_refuses_writes_and_says_so() {
        let (mut rig, f) = Rig::new(true);
        let block = Block::new(f.as_path(), true).unwrap();
        assert_ne!(block.avail_features() & FEATURE_RO, 0);
        assert_eq!(block.avail_features() & FEATURE_FLUSH, 0);
        rig.header(REQ_OUT, 0);
        rig.q
            .add_chain(&[(HDR, 16, false), (DATA, 512, false), (STATUS, 1, true)]);
        assert_eq!(rig.serve(), vec![1]);
        assert_eq!(rig.status(), STATUS_IOERR);
        let mut on_disk = [0u8; 512];
        f.as_file().read_exact_at(&mut on_disk, 0).unwrap();
        assert_eq!(on_disk, [0; 512]);
    }

    #[test]
    fn capacity_is_in_config_space() {
        let f = disk();
        let block = Block::new(f.as_path(), false).unwrap();
        let mut cap = [0u8; 8];
        block.read_config(0, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), 8);
        let mut past = [0xffu8; 4];
        block.read_config(64, &mut past);
        assert_eq!(past, [0; 4]);
    }

    // Hostile chains from here on: none may panic, hang, or touch memory or
    // disk outside what the request allows.

    #[test]
    fn out_of_range_sectors_are_ioerr() {
        let (mut rig, _f) = Rig::new(false);
        for sector in [8u64, 7, u64::MAX, u64::MAX / 512] {
            rig.header(REQ_IN, sector);
            rig.q
                .add_chain(&[(HDR, 16, false), (DATA, 1024, true), (STATUS, 1, true)]);
            assert_eq!(rig.serve(), vec![1], "sector {sector}");
            assert_eq!(rig.status(), STATUS_IOERR);
        }
        // Not a whole number of sectors.
        rig.header(REQ_IN, 0);
        rig.q
            .add_chain(&[(HDR, 16, false), (DATA, 100, true), (STATUS, 1, true)]);
        assert_eq!(rig.serve(), vec![1]);
        assert_eq!(rig.status(), STATUS_IOERR);
    }

    #[test]
    fn missing_or_short_header_is_ioerr() {
        let (mut rig, _f) = Rig::new(false);
        rig.header(REQ_IN, 0);
        rig.q.add_chain(&[(HDR, 8, false), (STATUS, 1, true)]);
        assert_eq!(rig.serve(), vec![1]);
        assert_eq!(rig.status(), STATUS_IOERR);
        rig.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        rig.q.add_chain(&[(DATA, 512, true), (STATUS, 1, true)]);
        assert_eq!(rig.serve(), vec![1]);
        assert_eq!(rig.status(), STATUS_IOERR);
    }

    #[test]
    fn no_status_descriptor_is_dropped() {
        let (mut rig, _f) = Rig::new(false);
        rig.header(REQ_FLUSH, 0);
        rig.q.add_chain(&[(HDR, 16, false)]);
        rig.q.add_chain(&[(HDR, 16, false), (STATUS, 0, true)]);
        assert_eq!(rig.serve(), vec![0, 0]);
        assert_eq!(rig.status(), 0xff);
    }

    #[test]
    fn read_into_device_readable_buffer_is_refused() {
        let (mut rig, _f) = Rig::new(false);
        rig.mem
            .write_slice(&[0x77; 512], GuestAddress(DATA))
            .unwrap();
        rig.header(REQ_IN, 1);
        rig.q
            .add_chain(&[(HDR, 16, false), (DATA, 512, false), (STATUS, 1, true)]);
        assert_eq!(rig.serve(), vec![1]);
        assert_eq!(rig.status(), STATUS_IOERR);
        let mut got = [0u8; 512];
        rig.mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
        assert_eq!(got, [0x77; 512], "device wrote into a read-only buffer");
        // A write whose data sits in device-writable buffers is refused too.
        rig.header(REQ_OUT, 1);
        rig.q
            .add_chain(&[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)]);
        assert_eq!(rig.serve(), vec![1]);
        assert_eq!(rig.status(), STATUS_IOERR);
    }

    #[test]
    fn looping_and_out_of_memory_chains_are_dropped() {
        let (mut rig, _f) = Rig::new(false);
        rig.header(REQ_IN, 0);
        // 0 -> 1 -> 0 -> ...
        rig.q.write_desc(0, HDR, 16, F_NEXT, 1);
        rig.q.write_desc(1, DATA, 512, F_NEXT | F_WRITE, 0);
        rig.q.publish(0);
        assert_eq!(rig.serve(), vec![0]);
        // Data buffer past the end of guest memory.
        rig.q.write_desc(2, HDR, 16, F_NEXT, 3);
        rig.q.write_desc(3, 0x3ff00, 0x1000, F_NEXT | F_WRITE, 4);
        rig.q.write_desc(4, STATUS, 1, F_WRITE, 0);
        rig.q.publish(2);
        // Descriptor table entry index beyond the queue.
        rig.q.write_desc(5, HDR, 16, F_NEXT, 0xffff);
        rig.q.publish(5);
        assert_eq!(rig.serve(), vec![0, 0]);
        assert_eq!(rig.status(), 0xff);
        // Avail index far ahead of what the queue can hold: nothing served,
        // no hang.
        rig.q.set_avail_idx(rig.q.used_idx().wrapping_add(1000));
        assert_eq!(rig.serve(), Vec::<u32>::new());
    }

    #[test]
    fn random_hostile_chains_are_all_answered() {
        let (mut rig, f) = Rig::new(false);
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..2000 {
            let kind = [REQ_IN, REQ_OUT, REQ_FLUSH, REQ_GET_ID, next() as u32][next() as usize % 5];
            let sector = if next() % 4 == 0 { next() } else { next() % 10 };
            rig.header(kind, sector);
            let n = 1 + next() as usize % 5;
            let mut bufs = Vec::new();
            for i in 0..n {
                let addr = match next() % 10 {
                    0 => next(),
                    1 => 0x3ff00,
                    _ if i == 0 => HDR,
                    _ => DATA + (next() % 0x8000),
                };
                let len = match next() % 6 {
                    0 => 0,
                    1 => next() as u32,
                    _ => (next() % 2048) as u32,
                };
                bufs.push((addr, len, next() % 2 == 0));
            }
            if next() % 8 == 0 {
                rig.q.write_desc(15, HDR, 16, F_NEXT, 15);
                rig.q.publish(15);
            } else {
                rig.q.add_chain(&bufs);
            }
            assert_eq!(rig.serve().len(), 1, "every chain gets a used entry");
        }
        // The disk never grew: no write landed past its end.
        assert_eq!(f.as_file().metadata().unwrap().len(), 8 * 512);
    }

    #[test]
    fn unknown_request_is_unsupp() {
        let (mut rig, _f) = Rig::new(false);
        rig.header(0x1234, 0);
        rig.q.add_chain(&[(HDR, 16, false), (STATUS, 1, true)]);
        assert_eq!(rig.serve(), vec![1]);
        assert_eq!(rig.status(), STATUS_UNSUPP);
    }

    #[test]
    fn served_through_mmio_transport_and_worker_thread() {
        let f = disk();
        let m = mem(0x40000);
        let mut t = MmioTransport::new(m.clone(), Block::new(f.as_path(), true).unwrap()).unwrap();
        let mut cap = [0u8; 8];
        t.read(0x100, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), 8);
        negotiate(&mut t);
        let mut q = TestQueue::new(&m, 0, 16);
        setup_queue(&mut t, 0, &q);
        w(&mut t, 0x70, ALL_OK);
        assert_eq!(r(&mut t, 0x70), ALL_OK);

        m.write_obj(REQ_IN, GuestAddress(HDR)).unwrap();
        m.write_obj(5u64, GuestAddress(HDR + 8)).unwrap();
        q.add_chain(&[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)]);
        // The guest kicks by writing QueueNotify (no ioeventfd here).
        w(&mut t, 0x50, 0);
        assert!(q.wait_used(1, Duration::from_secs(5)));
        assert_eq!(q.used_elem(0).1, 513);
        let mut got = [0u8; 512];
        m.read_slice(&mut got, GuestAddress(DATA)).unwrap();
        assert_eq!(got, [5; 512]);
        assert_eq!(t.interrupt_event().read().unwrap(), 1);
        assert_eq!(r(&mut t, 0x60), 1);

        // Pause: the ring position survives into the state and a resumed
        // device carries on from there.
        t.pause().unwrap();
        let state = t.save().unwrap();
        assert_eq!(state.transport.queues[0].next_avail, 1);
        assert_eq!(state.transport.queues[0].next_used, 1);
        let res = MmioResources {
            mem: m.clone(),
            device: Some(f.as_path().to_path_buf()),
        };
        let mut t2 = MmioTransport::<Block>::restore(&state, res).unwrap();
        t2.resume().unwrap();
        m.write_obj(6u64, GuestAddress(HDR + 8)).unwrap();
        q.add_chain(&[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)]);
        w(&mut t2, 0x50, 0);
        assert!(q.wait_used(2, Duration::from_secs(5)));
        m.read_slice(&mut got, GuestAddress(DATA)).unwrap();
        assert_eq!(got, [6; 512]);
        // Reset stops the worker.
        w(&mut t2, 0x70, 0);
        assert!(!t2.is_active());
    }

    #[test]
    fn spare_slot_attach_changes_capacity_and_signals_config() {
        let f = disk();
        let m = mem(0x40000);
        let mut t = MmioTransport::new(m.clone(), Block::empty()).unwrap();
        let mut cap = [0u8; 8];
        t.read(0x100, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), 0);
        negotiate(&mut t);
        let mut q = TestQueue::new(&m, 0, 16);
        setup_queue(&mut t, 0, &q);
        w(&mut t, 0x70, ALL_OK);
        let generation = r(&mut t, 0xfc);

        // Without a disk, reads fail.
        m.write_obj(REQ_IN, GuestAddress(HDR)).unwrap();
        m.write_obj(1u64, GuestAddress(HDR + 8)).unwrap();
        q.add_chain(&[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)]);
        w(&mut t, 0x50, 0);
        assert!(q.wait_used(1, Duration::from_secs(5)));
        assert_eq!(
            m.read_obj::<u8>(GuestAddress(STATUS)).unwrap(),
            STATUS_IOERR
        );

        t.device_mut().attach(f.as_path(), true).unwrap();
        t.read(0x100, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), 8);
        assert_ne!(r(&mut t, 0xfc), generation);
        assert_ne!(r(&mut t, 0x60) & 2, 0, "config change interrupt");

        q.add_chain(&[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)]);
        w(&mut t, 0x50, 0);
        assert!(q.wait_used(2, Duration::from_secs(5)));
        assert_eq!(m.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), STATUS_OK);
        let mut got = [0u8; 512];
        m.read_slice(&mut got, GuestAddress(DATA)).unwrap();
        assert_eq!(got, [1; 512]);

        // Attached while the device is paused (e.g. right after a snapshot
        // restore): the guest hears about it on resume.
        t.pause().unwrap();
        w(&mut t, 0x64, 3);
        let other = disk();
        other.as_file().set_len(16 * 512).unwrap();
        t.device_mut().attach(other.as_path(), true).unwrap();
        assert_eq!(r(&mut t, 0x60) & 2, 0);
        t.resume().unwrap();
        assert_ne!(r(&mut t, 0x60) & 2, 0, "config change announced on resume");
        t.read(0x100, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), 16);

        t.pause().unwrap();
        let state = t.device().save().unwrap();
        assert!(state.attached);
        assert!(matches!(
            Block::restore(&state, None),
            Err(BlockError::MissingPath)
        ));
        let empty_state = Block::empty().save().unwrap();
        let restored = Block::restore(&empty_state, None).unwrap();
        assert_eq!(restored.capacity_sectors(), 0);
    }

    #[test]
    fn restore_refuses_a_disk_of_another_size() {
        let f = disk();
        let state = Block::new(f.as_path(), true).unwrap().save().unwrap();
        let other = TempFile::new().unwrap();
        other.as_file().set_len(4096 * 2).unwrap();
        assert!(matches!(
            Block::restore(&state, Some(other.as_path().to_path_buf())),
            Err(BlockError::SizeChanged { .. })
        ));
    }

    /// Capacity, seg_max, features, config generation: what a driver reads.
    fn visible(t: &mut MmioTransport<Block>) -> Vec<u32> {
        let mut v: Vec<u32> = (0..4).map(|i| r(t, 0x100 + 4 * i)).collect();
        for sel in 0..2 {
            w(t, 0x14, sel);
            v.push(r(t, 0x10));
        }
        v.extend([r(t, 0x70), r(t, 0xfc)]);
        v
    }

    #[test]
    fn restored_disk_and_spare_slot_serve_like_the_saved_ones() {
        let f = disk();
        let m = mem(0x40000);
        let dev = Block::new(f.as_path(), false).unwrap().with_id("rootfs-7");
        let mut t = MmioTransport::new(m.clone(), dev).unwrap();
        negotiate(&mut t);
        let mut q = TestQueue::new(&m, 0, 16);
        setup_queue(&mut t, 0, &q);
        w(&mut t, 0x70, ALL_OK);
        m.write_slice(&[0x3c; 512], GuestAddress(DATA)).unwrap();
        m.write_obj(REQ_OUT, GuestAddress(HDR)).unwrap();
        m.write_obj(3u64, GuestAddress(HDR + 8)).unwrap();
        q.add_chain(&[(HDR, 16, false), (DATA, 512, false), (STATUS, 1, true)]);
        w(&mut t, 0x50, 0);
        assert!(q.wait_used(1, Duration::from_secs(5)));
        t.pause().unwrap();
        let state = crate::devices::persist::through_state_file(&t.save().unwrap());
        assert_eq!(state.device.id, "rootfs-7");

        // A "new process": a fresh transport over the same guest memory.
        let res = MmioResources {
            mem: m.clone(),
            device: Some(f.as_path().to_path_buf()),
        };
        let mut t2 = MmioTransport::<Block>::restore(&state, res).unwrap();
        assert_eq!(t2.save().unwrap(), state);
        assert_eq!(visible(&mut t2), visible(&mut t));
        t2.resume().unwrap();
        assert!(t2.is_active());
        // The write before the snapshot reads back; the id is the saved one.
        m.write_obj(REQ_IN, GuestAddress(HDR)).unwrap();
        q.add_chain(&[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)]);
        m.write_obj(REQ_GET_ID, GuestAddress(HDR + 0x100)).unwrap();
        let id_at = DATA + 0x1000;
        q.add_chain(&[
            (HDR + 0x100, 16, false),
            (id_at, 20, true),
            (STATUS + 1, 1, true),
        ]);
        w(&mut t2, 0x50, 0);
        assert!(q.wait_used(3, Duration::from_secs(5)));
        let mut got = [0u8; 512];
        m.read_slice(&mut got, GuestAddress(DATA)).unwrap();
        assert_eq!(got, [0x3c; 512]);
        let mut id = [0u8; 8];
        m.read_slice(&mut id, GuestAddress(id_at)).unwrap();
        assert_eq!(&id, b"rootfs-7");

        // An empty spare slot comes back empty and can still take a disk,
        // announced to the driver when it runs again.
        let mut spare = MmioTransport::new(m.clone(), Block::empty()).unwrap();
        negotiate(&mut spare);
        setup_queue(&mut spare, 0, &TestQueue::new(&m, 0x30000, 16));
        w(&mut spare, 0x70, ALL_OK);
        spare.pause().unwrap();
        let state = crate::devices::persist::through_state_file(&spare.save().unwrap());
        let res = MmioResources {
            mem: m.clone(),
            device: None,
        };
        let mut spare2 = MmioTransport::<Block>::restore(&state, res).unwrap();
        assert_eq!(visible(&mut spare2), visible(&mut spare));
        spare2.device_mut().attach(f.as_path(), true).unwrap();
        spare2.resume().unwrap();
        assert_ne!(r(&mut spare2, 0x60) & 2, 0, "config change announced");
        assert_eq!(r(&mut spare2, 0x100), 8);
    }

    #[test]
    fn direct_activation_with_counting_interrupt() {
        let f = disk();
        let m = mem(0x40000);
        let mut block = Block::new(f.as_path(), false).unwrap();
        let mut q = TestQueue::new(&m, 0, 16);
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let irq = CountingInterrupt::new();
        // A request queued before activation is served at start.
        m.write_obj(REQ_FLUSH, GuestAddress(HDR)).unwrap();
        q.add_chain(&[(HDR, 16, false), (STATUS, 1, true)]);
        block
            .activate(ActivateContext {
                mem: m.clone(),
                interrupt: irq.clone(),
                queues: vec![q.queue()],
                queue_events: vec![evt.try_clone().unwrap()],
            })
            .unwrap();
        assert!(q.wait_used(1, Duration::from_secs(5)));
        let queues = block.pause().unwrap();
        assert_eq!(queues.len(), 1);
        assert!(irq.used_count() >= 1);
    }
}
