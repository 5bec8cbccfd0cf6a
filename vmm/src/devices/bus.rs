//! An address bus (port I/O or MMIO) that routes guest accesses to devices.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use super::DeviceRequest;

/// The one small trait every device implements. `offset` is relative to the
/// start of the device's range. A read the device does not understand must
/// leave `data` as zeros; nothing the guest does may panic.
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]) -> DeviceRequest;
}

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("bus range {base:#x}+{len:#x} overlaps an existing device")]
    Overlap { base: u64, len: u64 },
    #[error("bus range at {base:#x} has zero length")]
    Empty { base: u64 },
}

#[derive(Clone)]
struct Entry {
    len: u64,
    device: Arc<Mutex<dyn BusDevice>>,
}

/// Ranges are kept in a map keyed by base address; lookup is a range query.
#[derive(Default, Clone)]
pub struct Bus {
    devices: BTreeMap<u64, Entry>,
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(
        &mut self,
        base: u64,
        len: u64,
        device: Arc<Mutex<dyn BusDevice>>,
    ) -> Result<(), BusError> {
        if len == 0 {
            return Err(BusError::Empty { base });
        }
        let end = base
            .checked_add(len)
            .ok_or(BusError::Overlap { base, len })?;
        let overlaps = self
            .devices
            .range(..end)
            .next_back()
            .is_some_and(|(b, e)| b + e.len > base);
        if overlaps {
            return Err(BusError::Overlap { base, len });
        }
        self.devices.insert(base, Entry { len, device });
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<(u64, &Entry)> {
        let (base, entry) = self.devices.range(..=addr).next_back()?;
        (addr - base < entry.len).then_some((addr - base, entry))
    }

    /// Returns false if no device claims `addr` (the caller then reads zeros
    /// / ignores the write, as real hardware would).
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        let Some((offset, entry)) = self.find(addr) else {
            return false;
        };
        // A poisoned lock means a device thread panicked; keep serving.
        let mut dev = entry.device.lock().unwrap_or_else(|e| e.into_inner());
        dev.read(offset, data);
        true
    }

    pub fn write(&self, addr: u64, data: &[u8]) -> Option<DeviceRequest> {
        let (offset, entry) = self.find(addr)?;
        let mut dev = entry.device.lock().unwrap_or_else(|e| e.into_inner());
        Some(dev.write(offset, data))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(u8);
    impl BusDevice for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(self.0.wrapping_add(offset as u8));
        }
        fn write(&mut self, _offset: u64, data: &[u8]) -> DeviceRequest {
            self.0 = data[0];
            DeviceRequest::None
        }
    }

    #[test]
    fn routes_by_range_and_rejects_overlap() {
        let mut bus = Bus::new();
        bus.insert(0x100, 0x10, Arc::new(Mutex::new(Echo(1))))
            .unwrap();
        bus.insert(0x110, 0x10, Arc::new(Mutex::new(Echo(7))))
            .unwrap();
        assert!(bus.insert(0x10f, 2, Arc::new(Mutex::new(Echo(0)))).is_err());
        assert!(bus
            .insert(0xf0, 0x11, Arc::new(Mutex::new(Echo(0))))
            .is_err());
        let mut b = [0u8; 1];
        assert!(bus.read(0x102, &mut b));
        assert_eq!(b[0], 3);
        assert!(bus.read(0x110, &mut b));
        assert_eq!(b[0], 7);
        assert!(!bus.read(0x120, &mut b));
        assert_eq!(bus.write(0x111, &[9]), Some(DeviceRequest::None));
        bus.read(0x110, &mut b);
        assert_eq!(b[0], 9);
    }
}
