//! vCPU threads: each runs `KVM_RUN` in a loop and routes exits to the
//! buses. Pausing kicks the threads out of `KVM_RUN` with a signal.

use std::cell::Cell;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::kvm_run;
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::boot_marker::BootTimes;
use crate::devices::{Bus, DeviceRequest};
use crate::profile::{RipSampler, SAMPLE_INTERVAL};

/// Why the VM stopped running.
#[derive(Debug, Clone, PartialEq)]
pub enum VmExit {
    /// The guest asked for a reset (reboot or poweroff through the i8042).
    GuestReset,
    /// A vCPU executed HLT with interrupts off for good.
    GuestHalted,
    /// Triple fault: the guest crashed or used it to reboot.
    GuestShutdown,
    /// The control API asked the VM to stop.
    Stopped,
    /// KVM could not run the guest (internal/entry error) or a VMM error.
    Error(String),
}

impl VmExit {
    /// The VMM process's exit status for this reason.
    pub fn exit_code(&self) -> i32 {
        match self {
            VmExit::GuestReset | VmExit::GuestHalted | VmExit::Stopped => 0,
            VmExit::GuestShutdown => 2,
            VmExit::Error(_) => 1,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RunState {
    Running,
    Paused,
    Stopping,
}

struct ControlState {
    run: RunState,
    paused: usize,
}

/// Shared between the vCPU threads and whoever pauses, resumes or stops them.
pub struct RunControl {
    state: Mutex<ControlState>,
    cond: Condvar,
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// Set when THAW_VMM_PROFILE asks for guest RIP samples (see profile.rs).
    sampler: OnceLock<Arc<RipSampler>>,
}

#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("vCPUs did not pause within {0:?}")]
    PauseTimeout(Duration),
    #[error("the VM is stopping")]
    Stopping,
    #[error("cannot install the vCPU kick signal handler: {0}")]
    Signal(#[source] vmm_sys_util::errno::Error),
    #[error("cannot start vCPU thread: {0}")]
    Spawn(#[source] std::io::Error),
}

const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);

impl RunControl {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(ControlState {
                run: RunState::Running,
                paused: 0,
            }),
            cond: Condvar::new(),
            threads: Mutex::new(Vec::new()),
            sampler: OnceLock::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, ControlState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Called by a vCPU before each `KVM_RUN`. Blocks while paused; returns
    /// false once the VM is stopping.
    fn pause_requested(&self) -> bool {
        self.lock().run == RunState::Paused
    }

    fn checkpoint(&self) -> bool {
        let mut s = self.lock();
        if s.run == RunState::Paused {
            s.paused += 1;
            self.cond.notify_all();
            while s.run == RunState::Paused {
                s = self.cond.wait(s).unwrap_or_else(|e| e.into_inner());
            }
            s.paused -= 1;
        }
        s.run != RunState::Stopping
    }

    fn kick_all(&self) {
        for t in self
            .threads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            // A thread that already ended cannot be signalled: nothing to do.
            let _ = t.kill(SIGRTMIN());
        }
    }

    fn running_threads(&self) -> usize {
        let threads = self.threads.lock().unwrap_or_else(|e| e.into_inner());
        threads.iter().filter(|t| !t.is_finished()).count()
    }

    /// Returns once every vCPU is outside `KVM_RUN` and parked.
    pub fn pause(&self) -> Result<(), VcpuError> {
        let deadline = Instant::now() + PAUSE_TIMEOUT;
        {
            let mut s = self.lock();
            if s.run == RunState::Stopping {
                return Err(VcpuError::Stopping);
            }
            s.run = RunState::Paused;
        }
        loop {
            // Kick repeatedly: a signal that lands just before KVM_RUN is
            // caught by immediate_exit, but a thread between checks needs
            // another one.
            self.kick_all();
            let s = self.lock();
            if s.paused >= self.running_threads() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(VcpuError::PauseTimeout(PAUSE_TIMEOUT));
            }
            let (_s, _) = self
                .cond
                .wait_timeout(s, Duration::from_millis(5))
                .unwrap_or_else(|e| e.into_inner());
        }
    }

    pub fn resume(&self) -> Result<(), VcpuError> {
        let mut s = self.lock();
        if s.run == RunState::Stopping {
            return Err(VcpuError::Stopping);
        }
        s.run = RunState::Running;
        self.cond.notify_all();
        Ok(())
    }

    pub fn is_paused(&self) -> bool {
        self.lock().run == RunState::Paused
    }

    /// Asks every vCPU to leave its loop and waits for the threads.
    pub fn stop_and_join(&self) {
        {
            let mut s = self.lock();
            s.run = RunState::Stopping;
            self.cond.notify_all();
        }
        self.kick_all();
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|e| e.into_inner()));
        for t in threads {
            let deadline = Instant::now() + Duration::from_secs(2);
            while !t.is_finished() && Instant::now() < deadline {
                let _ = t.kill(SIGRTMIN());
                std::thread::sleep(Duration::from_millis(1));
            }
            if t.is_finished() {
                let _ = t.join();
            }
        }
        if let Some(s) = self.sampler.get() {
            match s.write_file() {
                Ok(n) => eprintln!("thaw-vmm: profile: {n} samples in {}", s.path().display()),
                Err(e) => eprintln!("thaw-vmm: profile {}: {e}", s.path().display()),
            }
        }
    }

    /// Kicks vCPU 0 every SAMPLE_INTERVAL until the VM stops; the vCPU
    /// records its RIP on each kick (`run_loop`).
    fn start_sampler(self: &Arc<Self>, sampler: RipSampler) -> Result<(), VcpuError> {
        if self.sampler.set(Arc::new(sampler)).is_err() {
            return Ok(());
        }
        let ctl = Arc::downgrade(self);
        std::thread::Builder::new()
            .name("rip-sampler".into())
            .spawn(move || loop {
                std::thread::sleep(SAMPLE_INTERVAL);
                let Some(ctl) = ctl.upgrade() else { return };
                if ctl.lock().run == RunState::Stopping {
                    return;
                }
                let threads = ctl.threads.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(t) = threads.first() {
                    let _ = t.kill(SIGRTMIN());
                }
            })
            .map_err(VcpuError::Spawn)?;
        Ok(())
    }

    fn stop_requested(&self) {
        let mut s = self.lock();
        s.run = RunState::Stopping;
        self.cond.notify_all();
    }
}

thread_local! {
    static KVM_RUN_PTR: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Async-signal-safe: one volatile store into this thread's kvm_run, so a
    // kick that races with entering KVM_RUN still makes it return at once.
    KVM_RUN_PTR.with(|p| {
        let p = p.get();
        if !p.is_null() {
            // SAFETY: set by this thread to its own mapped kvm_run, which
            // lives as long as the thread's VcpuFd.
            unsafe { std::ptr::addr_of_mut!((*p).immediate_exit).write_volatile(1) };
        }
    });
}

pub fn install_kick_handler() -> Result<(), VcpuError> {
    register_signal_handler(SIGRTMIN(), kick_handler).map_err(VcpuError::Signal)
}

/// One vCPU and what its exits need.
pub struct Vcpu {
    pub id: u8,
    pub fd: Arc<Mutex<VcpuFd>>,
    pub io_bus: Arc<Bus>,
    pub mmio_bus: Arc<Bus>,
    pub mem: GuestMemoryMmap,
    pub times: BootTimes,
}

enum Step {
    Continue,
    Exit(VmExit),
}

impl Vcpu {
    pub fn spawn(self, control: Arc<RunControl>, exits: Sender<VmExit>) -> Result<(), VcpuError> {
        let ctl = control.clone();
        let first_vcpu = self.id == 0;
        let name = format!("vcpu{}", self.id);
        let handle = crate::confined::spawn(&name, crate::confined::ThreadRole::Vcpu, move || {
            let exit = self.run_loop(&ctl);
            if let Some(exit) = exit {
                ctl.stop_requested();
                ctl.kick_all();
                let _ = exits.send(exit);
            }
        })
        .map_err(VcpuError::Spawn)?;
        control
            .threads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(handle);
        if first_vcpu {
            if let Some(sampler) = RipSampler::from_env() {
                control.start_sampler(sampler)?;
            }
        }
        Ok(())
    }

    fn run_loop(&self, control: &RunControl) -> Option<VmExit> {
        {
            let mut fd = self.fd.lock().unwrap_or_else(|e| e.into_inner());
            let ptr: *mut kvm_run = fd.get_kvm_run();
            KVM_RUN_PTR.with(|p| p.set(ptr));
        }
        let mut first = self.id == 0;
        // The last exit was port or MMIO I/O, which KVM completes (result
        // into the registers, RIP past the instruction) on the next entry.
        let mut io_pending = false;
        loop {
            if io_pending && control.pause_requested() {
                // A snapshot taken now would replay the access after restore
                // (a second read of a read-to-clear register, say). An entry
                // with immediate_exit completes it without running the guest.
                let mut fd = self.fd.lock().unwrap_or_else(|e| e.into_inner());
                fd.set_kvm_immediate_exit(1);
                let _ = fd.run();
                fd.set_kvm_immediate_exit(0);
                io_pending = false;
            }
            if !control.checkpoint() {
                return None;
            }
            let mut fd = self.fd.lock().unwrap_or_else(|e| e.into_inner());
            if first {
                self.times.record("first-guest-instruction".into());
                first = false;
            }
            let step = match fd.run() {
                Ok(exit) => {
                    io_pending = matches!(
                        exit,
                        VcpuExit::IoIn(..)
                            | VcpuExit::IoOut(..)
                            | VcpuExit::MmioRead(..)
                            | VcpuExit::MmioWrite(..)
                    );
                    self.handle_exit(exit)
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    // Any pending I/O was completed on the way in.
                    io_pending = false;
                    fd.set_kvm_immediate_exit(0);
                    if let Some(s) = control.sampler.get().filter(|_| self.id == 0) {
                        if let Ok(regs) = fd.get_regs() {
                            s.record(regs.rip);
                        }
                    }
                    Step::Continue
                }
                Err(e) => Step::Exit(VmExit::Error(format!("vCPU {}: KVM_RUN: {e}", self.id))),
            };
            let step = match step {
                Step::Exit(VmExit::Error(msg)) if msg.is_empty() => {
                    Step::Exit(VmExit::Error(self.describe_internal_error(&mut fd)))
                }
                s => s,
            };
            if let Step::Exit(exit) = step {
                return Some(exit);
            }
        }
    }

    fn handle_exit(&self, exit: VcpuExit<'_>) -> Step {
        match exit {
            VcpuExit::IoIn(port, data) => {
                if !self.io_bus.read(u64::from(port), data) {
                    // Nothing there: an open bus reads all ones.
                    data.fill(0xff);
                }
                Step::Continue
            }
            VcpuExit::IoOut(port, data) => match self.io_bus.write(u64::from(port), data) {
                Some(DeviceRequest::Reset) => Step::Exit(VmExit::GuestReset),
                _ => Step::Continue,
            },
            VcpuExit::MmioRead(addr, data) => {
                if !self.mmio_bus.read(addr, data) {
                    data.fill(0);
                }
                Step::Continue
            }
            VcpuExit::MmioWrite(addr, data) => match self.mmio_bus.write(addr, data) {
                Some(DeviceRequest::Reset) => Step::Exit(VmExit::GuestReset),
                _ => Step::Continue,
            },
            VcpuExit::Hlt => Step::Exit(VmExit::GuestHalted),
            VcpuExit::Shutdown => Step::Exit(VmExit::GuestShutdown),
            // Filled in by the caller, which holds the vCPU fd.
            VcpuExit::InternalError => Step::Exit(VmExit::Error(String::new())),
            VcpuExit::FailEntry(reason, cpu) => Step::Exit(VmExit::Error(format!(
                "vCPU {}: KVM entry failed, hardware reason {reason:#x} on CPU {cpu}",
                self.id
            ))),
            VcpuExit::Intr | VcpuExit::IrqWindowOpen => Step::Continue,
            other => Step::Exit(VmExit::Error(format!(
                "vCPU {}: unexpected KVM exit {other:?}",
                self.id
            ))),
        }
    }

    /// RIP and the instruction bytes there: what one needs to find the
    /// instruction KVM could not emulate (map RIP with System.map).
    fn describe_internal_error(&self, fd: &mut VcpuFd) -> String {
        let run = fd.get_kvm_run();
        // SAFETY: KVM filled the `internal` member for this exit reason.
        let (suberror, ndata, data) = unsafe {
            let i = &run.__bindgen_anon_1.internal;
            (i.suberror, i.ndata, i.data)
        };
        let mut msg = format!("vCPU {}: KVM internal error, suberror {suberror}", self.id);
        let extra: Vec<String> = data
            .iter()
            .take((ndata as usize).min(data.len()))
            .map(|d| format!("{d:#x}"))
            .collect();
        if !extra.is_empty() {
            msg += &format!(" (data {})", extra.join(" "));
        }
        match (fd.get_regs(), fd.get_sregs()) {
            (Ok(regs), Ok(sregs)) => {
                msg += &format!(
                    "; RIP {:#x} RSP {:#x} CS {:#x} CR3 {:#x}",
                    regs.rip, regs.rsp, sregs.cs.selector, sregs.cr3
                );
                let bytes = fd
                    .translate_gva(regs.rip)
                    .ok()
                    .filter(|t| t.valid != 0)
                    .and_then(|t| {
                        let mut b = [0u8; 16];
                        self.mem
                            .read_slice(&mut b, GuestAddress(t.physical_address))
                            .ok()?;
                        Some(b)
                    });
                match bytes {
                    Some(b) => {
                        let hex: Vec<String> = b.iter().map(|x| format!("{x:02x}")).collect();
                        msg += &format!("; code at RIP: {}", hex.join(" "));
                    }
                    None => msg += "; code at RIP: unreadable",
                }
            }
            _ => msg += "; registers unreadable",
        }
        msg
    }
}
