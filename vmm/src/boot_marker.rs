//! Boot timing: the guest writes a byte to a marker port or MMIO page and
//! the VMM records how long after its own start that happened.

use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use thaw_vmm_api::BootMark;

use crate::devices::{BusDevice, DeviceRequest};

/// Written by the boot stub right before it jumps to the kernel.
pub const MARK_KERNEL_ENTRY: u8 = 1;
/// Written by the guest's init (or agent) once it runs.
pub const MARK_INIT: u8 = 2;
/// Written by the guest agent once it is ready to serve.
pub const MARK_AGENT_READY: u8 = 3;

static PROCESS_START: OnceLock<Instant> = OnceLock::new();

/// Call first thing in `main`: every mark is measured from here.
pub fn set_process_start() {
    PROCESS_START.get_or_init(Instant::now);
}

pub fn since_start() -> Duration {
    PROCESS_START.get_or_init(Instant::now).elapsed()
}

pub fn mark_name(mark: u8) -> String {
    match mark {
        MARK_KERNEL_ENTRY => "kernel-entry".into(),
        MARK_INIT => "init".into(),
        MARK_AGENT_READY => "agent-ready".into(),
        other => format!("guest-{other}"),
    }
}

/// The recorded marks, shared with the control API.
///
/// Each name is recorded (and printed) once, its first time: the guest
/// can write the marker port in a loop, and neither the VMM's memory nor
/// its log may grow with that. Repeats are only counted.
#[derive(Clone, Default)]
pub struct BootTimes(Arc<Mutex<Recorded>>);

#[derive(Default)]
struct Recorded {
    marks: Vec<BootMark>,
    repeats: u64,
}

impl BootTimes {
    /// Records a mark the first time its name is seen and prints it as
    /// `thaw-vmm: mark <name> <µs> us`, the line the benchmarks read.
    pub fn record(&self, name: String) {
        let micros = since_start().as_micros() as u64;
        let mut r = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if r.marks.iter().any(|m| m.name == name) {
            r.repeats = r.repeats.saturating_add(1);
            return;
        }
        eprintln!("thaw-vmm: mark {name} {micros} us");
        r.marks.push(BootMark { name, micros });
    }

    pub fn marks(&self) -> Vec<BootMark> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .marks
            .clone()
    }

    /// Marks written again after their first time (not recorded).
    pub fn repeats(&self) -> u64 {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).repeats
    }
}

/// The marker as a device: on both the port bus and the MMIO bus.
pub struct BootMarker {
    times: BootTimes,
}

impl BootMarker {
    pub fn new(times: BootTimes) -> Self {
        Self { times }
    }
}

impl BusDevice for BootMarker {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) -> DeviceRequest {
        if let Some(&mark) = data.first() {
            self.times.record(mark_name(mark));
        }
        DeviceRequest::None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_marks_in_order() {
        let times = BootTimes::default();
        let mut dev = BootMarker::new(times.clone());
        dev.write(0, &[MARK_KERNEL_ENTRY]);
        dev.write(0, &[MARK_INIT, 0, 0, 0]);
        dev.write(0, &[]);
        let marks = times.marks();
        assert_eq!(marks.len(), 2);
        assert_eq!(marks[0].name, "kernel-entry");
        assert_eq!(marks[1].name, "init");
        assert!(marks[0].micros <= marks[1].micros);
    }

    #[test]
    fn a_guest_writing_marks_in_a_loop_adds_nothing() {
        let times = BootTimes::default();
        let mut dev = BootMarker::new(times.clone());
        for i in 0..100_000u32 {
            dev.write(0, &[(i % 256) as u8]);
        }
        // At most one record per mark value, ever.
        assert_eq!(times.marks().len(), 256);
        assert_eq!(times.repeats(), 100_000 - 256);
        let first_init = times.marks().iter().find(|m| m.name == "init").cloned();
        dev.write(0, &[MARK_INIT]);
        assert_eq!(
            times.marks().iter().find(|m| m.name == "init").cloned(),
            first_init,
            "the first time counts"
        );
    }
}
