//! Loading a snapshot's state file from arbitrary bytes: it must be
//! refused with an error, never panic, abort or run out of memory.
//!
//! The first byte picks what the rest is:
//! - 0: the whole state file, as read from disk;
//! - 1: the payload of a `MicrovmState` file behind a valid header (right
//!   version, this host's CPU, the right length and checksum), so the
//!   fuzzer gets past the checks into deserialization;
//! - 2: the same for the virtio slots alone; every slot that deserializes
//!   is then restored (transport and device) over small guest memory and
//!   a temporary disk, as `thaw-vmm restore` would;
//! - 3: guest memory regions, restored from a small memory file.

#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use serde::ser::SerializeTuple;
use serde::{Serialize, Serializer};
use thaw_snapshots::{decode_state, encode_state, CpuFingerprint, STATE_FILE};
use thaw_vmm::devices::virtio::block::Block;
use thaw_vmm::devices::virtio::mmio::{MmioResources, MmioTransport};
use thaw_vmm::devices::virtio::rng::Rng;
use thaw_vmm::devices::virtio::vsock::Vsock;
use thaw_vmm::devices::Persist;
use thaw_vmm::memory::MemoryRegionState;
use thaw_vmm::slots::{VirtioSlotState, VirtioState};
use thaw_vmm::snapshot::MicrovmState;
use vm_memory::{GuestAddress, GuestMemoryMmap};

/// Bytes that bincode writes as they are (no length prefix), so a file
/// written with it carries exactly the fuzzer's payload.
struct Raw<'a>(&'a [u8]);

impl Serialize for Raw<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut t = s.serialize_tuple(self.0.len())?;
        for b in self.0 {
            t.serialize_element(b)?;
        }
        t.end()
    }
}

fn restore_slot(slot: &VirtioSlotState, dir: &Path, disk: &Path) {
    let Ok(mem) = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 * 1024)]) else {
        return;
    };
    match &slot.state {
        VirtioState::Block(s) => {
            let device = s.device.attached.then(|| disk.to_path_buf());
            if let Ok(mut t) = MmioTransport::<Block>::restore(s, MmioResources { mem, device }) {
                let _ = t.resume();
                let _ = t.pause();
            }
        }
        VirtioState::Rng(s) => {
            if let Ok(mut t) = MmioTransport::<Rng>::restore(s, MmioResources { mem, device: () }) {
                let _ = t.resume();
                let _ = t.pause();
            }
        }
        VirtioState::Vsock(s) => {
            let device = dir.join("vsock.sock");
            if let Ok(mut t) = MmioTransport::<Vsock>::restore(s, MmioResources { mem, device }) {
                let _ = t.resume();
                let _ = t.pause();
            }
        }
        // Net needs a tap and fs a shared directory: their states are
        // deserialized above, not restored.
        _ => {}
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let path = Path::new(STATE_FILE);
    let cpu = CpuFingerprint::host();
    // A state file with `rest` as its payload behind a valid header.
    let framed = || encode_state(path, &cpu, &Raw(rest)).ok();
    match mode % 4 {
        0 => {
            let _ = decode_state::<MicrovmState>(path, rest, &cpu);
        }
        1 => {
            if let Some(file) = framed() {
                let _ = decode_state::<MicrovmState>(path, &file, &cpu);
            }
        }
        2 => {
            let Some(file) = framed() else { return };
            let Ok(slots) = decode_state::<Vec<VirtioSlotState>>(path, &file, &cpu) else {
                return;
            };
            let Ok(dir) = tempfile::tempdir() else {
                return;
            };
            let disk = dir.path().join("disk.img");
            if std::fs::write(&disk, vec![0u8; 16 * 512]).is_err() {
                return;
            }
            for slot in slots.iter().take(8) {
                restore_slot(slot, dir.path(), &disk);
            }
        }
        _ => {
            let Some(file) = framed() else { return };
            let Ok(regions) = decode_state::<Vec<MemoryRegionState>>(path, &file, &cpu) else {
                return;
            };
            let Ok(dir) = tempfile::tempdir() else {
                return;
            };
            let memory = dir.path().join("memory");
            if std::fs::write(&memory, vec![0u8; 64 * 1024]).is_ok() {
                let _ = thaw_vmm::memory::restore(&memory, &regions);
            }
        }
    }
});
