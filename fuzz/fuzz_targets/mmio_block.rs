//! The virtio-MMIO transport driving virtio-blk, as a hostile guest would:
//! register reads and writes (raw, or the usual negotiation steps so the
//! fuzzer reaches the data path), descriptors, avail ring entries and raw
//! bytes in guest memory, pause/resume and a snapshot round trip. The disk
//! is a small temporary file.
//!
//! Guest memory is written only while the device is paused (the worker
//! serves what is available as soon as it resumes), so a run is repeatable;
//! register accesses happen with the worker running, as they do in a VM.

#![no_main]

use std::io::Write;

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use thaw_vmm::devices::virtio::block::Block;
use thaw_vmm::devices::virtio::mmio::{
    MmioResources, MmioTransport, STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK,
    STATUS_FEATURES_OK,
};
use thaw_vmm::devices::{BusDevice, Persist};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MEM_SIZE: usize = 64 * 1024;
const DISK_SECTORS: u64 = 16;
const MAX_OPS: usize = 64;

#[derive(Arbitrary, Debug)]
enum Op {
    Read {
        offset: u16,
        width: u8,
    },
    Write {
        offset: u16,
        width: u8,
        value: u64,
    },
    /// ACKNOWLEDGE, DRIVER, both feature words, FEATURES_OK.
    Negotiate {
        features: u64,
    },
    /// Select queue 0, set its size and rings, make it ready.
    SetupQueue {
        size: u16,
        desc: u32,
        avail: u32,
        used: u32,
    },
    DriverOk,
    /// What a Linux driver does, in one step: negotiate, one queue of
    /// 2^(k % 9) entries at 0 / 0x1000 / 0x2000, DRIVER_OK.
    Standard {
        k: u8,
        event_idx: bool,
    },
    /// One descriptor in the table set up by `SetupQueue`.
    Desc {
        index: u16,
        addr: u32,
        len: u32,
        flags: u16,
        next: u16,
    },
    /// A well-formed request in one step: header, `sectors % 9` data
    /// sectors and the status byte in buffer slot `slot`, chained from
    /// descriptor `first` on, and published.
    Request {
        first: u16,
        slot: u8,
        kind: u32,
        sector: u64,
        sectors: u8,
    },
    /// A block request header at `at`.
    Header {
        at: u16,
        kind: u32,
        sector: u64,
    },
    Publish {
        head: u16,
    },
    SetAvailIdx {
        idx: u16,
    },
    Poke {
        at: u16,
        data: Vec<u8>,
    },
    Notify {
        queue: u32,
    },
    PauseResume,
    /// Pause, save, restore into a new transport over the same disk, resume.
    Snapshot,
    Reset,
}

struct Harness {
    mem: GuestMemoryMmap,
    transport: MmioTransport<Block>,
    disk: tempfile::NamedTempFile,
    desc: u64,
    avail: u64,
    size: u16,
    avail_idx: u16,
}

impl Harness {
    fn write32(&mut self, offset: u64, value: u32) {
        self.transport.write(offset, &value.to_le_bytes());
    }

    /// Run `f` on guest memory with the device's worker stopped; the worker
    /// serves whatever is available as soon as it resumes.
    fn with_paused(&mut self, f: impl FnOnce(&mut Self)) {
        if self.transport.pause().is_err() {
            return;
        }
        f(self);
        let _ = self.transport.resume();
    }

    fn apply(&mut self, op: Op) {
        match op {
            Op::Read { offset, width } => {
                let mut buf = [0u8; 8];
                let n = [1, 2, 4, 8][usize::from(width % 4)];
                self.transport
                    .read(u64::from(offset % 0x1000), &mut buf[..n]);
            }
            Op::Write {
                offset,
                width,
                value,
            } => {
                let n = [1, 2, 4, 8][usize::from(width % 4)];
                self.transport
                    .write(u64::from(offset % 0x1000), &value.to_le_bytes()[..n]);
            }
            Op::Negotiate { features } => {
                self.write32(0x70, STATUS_ACKNOWLEDGE);
                self.write32(0x70, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
                self.write32(0x24, 0);
                self.write32(0x20, features as u32);
                self.write32(0x24, 1);
                self.write32(0x20, (features >> 32) as u32 | 1);
                self.write32(
                    0x70,
                    STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
                );
            }
            Op::SetupQueue {
                size,
                desc,
                avail,
                used,
            } => {
                let size = size % 300;
                let (desc, avail, used) = (
                    u64::from(desc) % MEM_SIZE as u64 & !15,
                    u64::from(avail) % MEM_SIZE as u64 & !1,
                    u64::from(used) % MEM_SIZE as u64 & !3,
                );
                self.write32(0x30, 0);
                self.write32(0x38, u32::from(size));
                self.write32(0x80, desc as u32);
                self.write32(0x84, 0);
                self.write32(0x90, avail as u32);
                self.write32(0x94, 0);
                self.write32(0xa0, used as u32);
                self.write32(0xa4, 0);
                self.write32(0x44, 1);
                (self.desc, self.avail, self.size, self.avail_idx) = (desc, avail, size, 0);
            }
            Op::Standard { k, event_idx } => {
                let features = 1 << 28 | if event_idx { 1 << 29 } else { 0 };
                self.apply(Op::Negotiate { features });
                self.apply(Op::SetupQueue {
                    size: 1 << (k % 9),
                    desc: 0,
                    avail: 0x1000,
                    used: 0x2000,
                });
                self.apply(Op::DriverOk);
            }
            Op::DriverOk => {
                let status = self.transport.status();
                self.write32(0x70, status | STATUS_DRIVER_OK);
            }
            Op::Desc {
                index,
                addr,
                len,
                flags,
                next,
            } => {
                let at = self.desc + 16 * u64::from(index % self.size.max(1));
                // Mostly inside guest memory; sometimes anywhere.
                let addr = if addr & 1 << 31 != 0 {
                    u64::from(addr) << 16
                } else {
                    u64::from(addr) % MEM_SIZE as u64
                };
                let len = if len & 1 << 31 != 0 { len } else { len % 8192 };
                self.with_paused(|h| {
                    let mut raw = [0u8; 16];
                    raw[..8].copy_from_slice(&addr.to_le_bytes());
                    raw[8..12].copy_from_slice(&len.to_le_bytes());
                    raw[12..14].copy_from_slice(&(flags & 7).to_le_bytes());
                    raw[14..16].copy_from_slice(&next.to_le_bytes());
                    let _ = h.mem.write_slice(&raw, GuestAddress(at));
                });
            }
            Op::Request {
                first,
                slot,
                kind,
                sector,
                sectors,
            } => {
                // Slots of 0x1800 bytes from 0x4000, above the rings
                // `Standard` sets up: header, data at +0x200, status at
                // +0x1400.
                let base = 0x4000 + u64::from(slot % 8) * 0x1800;
                let kind = kind % 12;
                let sectors = u32::from(sectors % 9);
                let size = self.size.max(1);
                let i0 = first % size;
                let i1 = (i0 + 1) % size;
                let i2 = (i0 + 2) % size;
                // Reads (IN) and GET_ID write into the data buffer.
                let data_flags = if kind == 0 || kind == 8 { 2 } else { 0 };
                let mut descs = vec![(i0, base, 16u32, 1u16, i1)];
                if sectors > 0 {
                    descs.push((i1, base + 0x200, sectors * 512, 1 | data_flags, i2));
                    descs.push((i2, base + 0x1400, 1, 2, 0));
                } else {
                    descs.push((i1, base + 0x1400, 1, 2, 0));
                }
                self.apply(Op::Header {
                    at: base as u16,
                    kind,
                    sector,
                });
                for (index, addr, len, flags, next) in descs {
                    self.apply(Op::Desc {
                        index,
                        addr: addr as u32,
                        len,
                        flags,
                        next,
                    });
                }
                self.apply(Op::Publish { head: i0 });
            }
            Op::Header { at, kind, sector } => {
                let mut raw = [0u8; 16];
                raw[..4].copy_from_slice(&(kind % 12).to_le_bytes());
                raw[8..].copy_from_slice(&(sector % (DISK_SECTORS + 4)).to_le_bytes());
                self.with_paused(|h| {
                    let _ = h.mem.write_slice(&raw, GuestAddress(u64::from(at)));
                });
            }
            Op::Publish { head } => {
                self.with_paused(|h| {
                    let slot = h.avail + 4 + 2 * u64::from(h.avail_idx % h.size.max(1));
                    let _ = h.mem.write_obj(head, GuestAddress(slot));
                    h.avail_idx = h.avail_idx.wrapping_add(1);
                    let _ = h.mem.write_obj(h.avail_idx, GuestAddress(h.avail + 2));
                });
            }
            Op::SetAvailIdx { idx } => {
                self.with_paused(|h| {
                    h.avail_idx = idx;
                    let _ = h.mem.write_obj(idx, GuestAddress(h.avail + 2));
                });
            }
            Op::Poke { at, data } => {
                self.with_paused(|h| {
                    let _ = h.mem.write_slice(&data, GuestAddress(u64::from(at)));
                });
            }
            Op::Notify { queue } => self.write32(0x50, queue % 3),
            Op::PauseResume => {
                let _ = self.transport.pause();
                let _ = self.transport.resume();
            }
            Op::Snapshot => {
                if self.transport.pause().is_err() {
                    return;
                }
                let Ok(state) = self.transport.save() else {
                    return;
                };
                let device = state
                    .device
                    .attached
                    .then(|| self.disk.path().to_path_buf());
                let res = MmioResources {
                    mem: self.mem.clone(),
                    device,
                };
                if let Ok(mut t) = MmioTransport::<Block>::restore(&state, res) {
                    let _ = t.resume();
                    self.transport = t;
                }
            }
            Op::Reset => self.write32(0x70, 0),
        }
    }
}

fuzz_target!(|ops: Vec<Op>| {
    let Ok(mem) = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]) else {
        return;
    };
    let Ok(mut disk) = tempfile::NamedTempFile::new() else {
        return;
    };
    if disk
        .write_all(&vec![0xa5; (DISK_SECTORS * 512) as usize])
        .is_err()
    {
        return;
    }
    let Ok(block) = Block::new(disk.path(), false) else {
        return;
    };
    let Ok(transport) = MmioTransport::new(mem.clone(), block) else {
        return;
    };
    let mut h = Harness {
        mem,
        transport,
        disk,
        desc: 0,
        avail: 0x1000,
        size: 0,
        avail_idx: 0,
    };
    for op in ops.into_iter().take(MAX_OPS) {
        h.apply(op);
    }
    // Stop (join) the worker so everything it did happens inside this run.
    let _ = h.transport.pause();
});
