//! The thread a device runs its queues on, and the epoll loop it waits in.
//!
//! A worker owns the device's queues while it runs; stopping it (driver
//! reset, pause for a snapshot) joins the thread and returns whatever the
//! thread handed back, typically the queues with their ring positions.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::thread::JoinHandle;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::descriptors::{parse_chain, Chain, ChainError};
use super::{Interrupt, PauseError};
use crate::confined::{self, ThreadRole};

/// Chains served before the worker looks at its stop event again, so a
/// guest that keeps its queue full cannot keep a pause from happening.
pub const CHAINS_PER_ROUND: usize = 256;

/// A running device thread. Dropping it stops and joins the thread.
pub struct Worker<T> {
    stop: EventFd,
    handle: Option<JoinHandle<T>>,
}

impl<T: Send + 'static> Worker<T> {
    /// Start `body` on a new thread. `body` gets the stop eventfd, which it
    /// must watch and return promptly once it becomes readable.
    /// The thread runs under `role`'s system call allow-list
    /// ([`crate::confined`]).
    pub fn spawn<F>(name: &str, role: ThreadRole, body: F) -> io::Result<Self>
    where
        F: FnOnce(EventFd) -> T + Send + 'static,
    {
        let stop = EventFd::new(EFD_NONBLOCK)?;
        let thread_stop = stop.try_clone()?;
        let handle = confined::spawn(name, role, move || body(thread_stop))?;
        Ok(Self {
            stop,
            handle: Some(handle),
        })
    }

    /// Ask the thread to stop and wait for it.
    pub fn stop(mut self) -> Result<T, PauseError> {
        self.stop_and_join()
    }

    fn stop_and_join(&mut self) -> Result<T, PauseError> {
        let Some(handle) = self.handle.take() else {
            return Err(PauseError::NotActive);
        };
        // An eventfd write only fails if the counter would overflow, in
        // which case the thread is already being told to stop.
        let _ = self.stop.write(1);
        handle.join().map_err(|_| PauseError::WorkerPanicked)
    }
}

impl<T> Drop for Worker<T> {
    fn drop(&mut self) {
        if let Some(handle) = self.handle.take() {
            let _ = self.stop.write(1);
            let _ = handle.join();
        }
    }
}

/// A small wrapper over epoll: fds are registered with a caller-chosen
/// token that `wait` hands back.
pub struct EventLoop {
    epoll: Epoll,
    events: Vec<EpollEvent>,
}

impl EventLoop {
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            epoll: Epoll::new()?,
            events: vec![EpollEvent::default(); 64],
        })
    }

    pub fn add(&self, fd: RawFd, token: u64, events: EventSet) -> io::Result<()> {
        self.epoll
            .ctl(ControlOperation::Add, fd, EpollEvent::new(events, token))
    }

    /// Change what `fd` is watched for (an empty set: only errors).
    pub fn modify(&self, fd: RawFd, token: u64, events: EventSet) -> io::Result<()> {
        self.epoll
            .ctl(ControlOperation::Modify, fd, EpollEvent::new(events, token))
    }

    pub fn remove(&self, fd: RawFd) -> io::Result<()> {
        self.epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default())
    }

    /// Wait up to `timeout_ms` (-1: forever). An interrupted wait returns
    /// no events rather than an error.
    pub fn wait(&mut self, timeout_ms: i32) -> io::Result<Vec<(u64, EventSet)>> {
        let n = match self.epoll.wait(timeout_ms, &mut self.events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => 0,
            Err(e) => return Err(e),
        };
        Ok(self.events[..n]
            .iter()
            .map(|e| (e.data(), e.event_set()))
            .collect())
    }
}

/// Empty an eventfd's counter; an empty counter (EAGAIN) is not an error.
pub fn drain_eventfd(evt: &EventFd) {
    let _ = evt.read();
}

/// What happened in one pass over a queue.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Served {
    pub chains: usize,
    /// The budget ran out with chains possibly left in the ring.
    pub more: bool,
}

/// Serve the chains the guest made available, at most `budget` of them.
/// `handle` gets each chain (or why it is malformed) and returns the number
/// of bytes it wrote into it, which goes in the used ring. Notifications
/// are suppressed while serving, following the virtio pattern
/// (disable, drain, re-enable, re-check).
pub fn serve_queue<H>(
    mem: &GuestMemoryMmap,
    queue: &mut Queue,
    budget: usize,
    mut handle: H,
) -> Served
where
    H: FnMut(Result<Chain, ChainError>) -> u32,
{
    let mut served = Served::default();
    // Rounds in which the ring claims buffers but none could be popped; a
    // corrupt avail index does that forever.
    let mut empty_rounds = 0;
    loop {
        if let Err(e) = queue.disable_notification(mem) {
            log::warn!("virtio: cannot disable notifications: {e}");
            return served;
        }
        let mut popped = 0;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let len = handle(parse_chain(mem, chain));
            if let Err(e) = queue.add_used(mem, head, len) {
                log::warn!("virtio: cannot add used entry {head}: {e}");
            }
            popped += 1;
            served.chains += 1;
            if served.chains >= budget {
                served.more = true;
                return served;
            }
        }
        match queue.enable_notification(mem) {
            Ok(true) if popped > 0 => continue,
            Ok(true) => {
                empty_rounds += 1;
                if empty_rounds > 8 {
                    log::warn!("virtio: avail ring index is corrupt; ignoring the queue until the next notification");
                    return served;
                }
            }
            Ok(false) => return served,
            Err(e) => {
                log::warn!("virtio: cannot enable notifications: {e}");
                return served;
            }
        }
    }
}

/// Tell the driver about used buffers, if it asked to be told.
pub fn notify_guest(mem: &GuestMemoryMmap, queue: &mut Queue, interrupt: &dyn Interrupt) {
    match queue.needs_notification(mem) {
        Ok(false) => {}
        // When in doubt, interrupt: a spurious interrupt is harmless.
        Ok(true) | Err(_) => interrupt.signal_used_queue(),
    }
}

/// Start a worker that serves one queue with `handle` (see [`serve_queue`])
/// until stopped, then hands the queue back.
pub fn spawn_queue_worker<H>(
    name: &str,
    role: ThreadRole,
    mem: GuestMemoryMmap,
    mut queue: Queue,
    queue_evt: EventFd,
    interrupt: Arc<dyn Interrupt>,
    mut handle: H,
) -> io::Result<Worker<Queue>>
where
    H: FnMut(&GuestMemoryMmap, Result<Chain, ChainError>) -> u32 + Send + 'static,
{
    const QUEUE: u64 = 0;
    const STOP: u64 = 1;
    Worker::spawn(name, role, move |stop: EventFd| {
        let mut events = match EventLoop::new().and_then(|ev| {
            ev.add(queue_evt.as_raw_fd(), QUEUE, EventSet::IN)?;
            ev.add(stop.as_raw_fd(), STOP, EventSet::IN)?;
            Ok(ev)
        }) {
            Ok(ev) => ev,
            Err(e) => {
                log::error!("virtio worker: cannot set up epoll: {e}");
                return queue;
            }
        };
        // Buffers may have been queued before we started (resume, or a
        // notification that raced with activation).
        let mut pending = true;
        loop {
            if pending {
                let served = serve_queue(&mem, &mut queue, CHAINS_PER_ROUND, |c| handle(&mem, c));
                if served.chains > 0 {
                    notify_guest(&mem, &mut queue, interrupt.as_ref());
                }
                pending = served.more;
            }
            let timeout = if pending { 0 } else { -1 };
            let ready = match events.wait(timeout) {
                Ok(ready) => ready,
                Err(e) => {
                    log::error!("virtio worker: epoll failed: {e}");
                    return queue;
                }
            };
            if ready.iter().any(|(t, _)| *t == STOP) {
                return queue;
            }
            if ready.iter().any(|(t, _)| *t == QUEUE) {
                drain_eventfd(&queue_evt);
                pending = true;
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_stops_on_request_and_returns_its_value() {
        let worker = Worker::spawn("test-worker", ThreadRole::Rng, |stop: EventFd| {
            let mut ev = EventLoop::new().unwrap();
            ev.add(stop.as_raw_fd(), 7, EventSet::IN).unwrap();
            loop {
                let events = ev.wait(-1).unwrap();
                if events.iter().any(|(t, _)| *t == 7) {
                    return 42u32;
                }
            }
        })
        .unwrap();
        assert_eq!(worker.stop().unwrap(), 42);
    }

    #[test]
    fn panicking_worker_is_reported() {
        let worker = Worker::spawn("test-panic", ThreadRole::Rng, |_stop: EventFd| -> u32 {
            panic!("worker failed on purpose")
        })
        .unwrap();
        assert!(matches!(worker.stop(), Err(PauseError::WorkerPanicked)));
    }
}
