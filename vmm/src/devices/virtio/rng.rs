//! virtio-rng (virtio spec 5.4): fills the guest's buffers from the host's
//! getrandom(2). After a snapshot restore this is how a guest gets fresh
//! entropy, so every restored VM does not share the template's RNG state.
//!
//! API for the VMM: [`Rng::new`]. Snapshots: [`Persist`] with [`RngState`]
//! (nothing but the negotiated features; it has no host resources).

use std::convert::Infallible;

use serde::{Deserialize, Serialize};
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;

use super::descriptors::{write_to_bufs, Chain, ChainError};
use super::worker::{spawn_queue_worker, Worker};
use super::{
    ActivateContext, ActivateError, PauseError, VirtioDevice, FEATURE_RING_EVENT_IDX,
    FEATURE_VERSION_1, TYPE_RNG,
};
use crate::devices::Persist;

pub const QUEUE_SIZE: u16 = 64;
/// Bytes served per request at most; the spec lets the device write less
/// than offered, and this bounds the time one request can take.
const MAX_BYTES_PER_REQUEST: usize = 64 * 1024;

/// What a snapshot records about the RNG.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RngState {
    pub acked_features: u64,
}

#[derive(Default)]
pub struct Rng {
    acked_features: u64,
    worker: Option<Worker<Queue>>,
}

impl Rng {
    pub fn new() -> Self {
        Self::default()
    }
}

impl Persist for Rng {
    type State = RngState;
    type Resources = ();
    type Error = Infallible;

    fn save(&self) -> Result<RngState, Infallible> {
        Ok(RngState {
            acked_features: self.acked_features,
        })
    }

    fn restore(state: &RngState, (): ()) -> Result<Self, Infallible> {
        let mut rng = Self::new();
        rng.acked_features = state.acked_features & rng.avail_features();
        Ok(rng)
    }
}

/// Fill `buf` from getrandom(2), retrying on EINTR and short reads.
pub fn fill_random(buf: &mut [u8]) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: the pointer and length describe `rest`, a live, writable
        // slice; getrandom writes at most that many bytes.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        done += n as usize;
    }
    Ok(())
}

fn serve(mem: &GuestMemoryMmap, chain: Result<Chain, ChainError>, scratch: &mut Vec<u8>) -> u32 {
    let chain = match chain {
        Ok(c) => c,
        Err(e) => {
            log::warn!("virtio-rng: dropping malformed request: {e}");
            return 0;
        }
    };
    let want = chain
        .writable
        .iter()
        .map(|b| b.len as usize)
        .fold(0usize, usize::saturating_add)
        .min(MAX_BYTES_PER_REQUEST);
    scratch.resize(want, 0);
    if let Err(e) = fill_random(scratch) {
        log::error!("virtio-rng: getrandom failed: {e}");
        return 0;
    }
    match write_to_bufs(mem, &chain.writable, 0, scratch) {
        Ok(n) => n as u32,
        Err(e) => {
            log::warn!("virtio-rng: cannot write to guest buffer: {e}");
            0
        }
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        TYPE_RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn avail_features(&self) -> u64 {
        FEATURE_VERSION_1 | FEATURE_RING_EVENT_IDX
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features();
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(&mut self, mut ctx: ActivateContext) -> Result<(), ActivateError> {
        let got = ctx.queues.len();
        let (Some(queue), Some(evt), 1) = (ctx.queues.pop(), ctx.queue_events.pop(), got) else {
            return Err(ActivateError::QueueCount { expected: 1, got });
        };
        self.worker = None;
        let mut scratch = Vec::new();
        self.worker = Some(
            spawn_queue_worker(
                "thaw-virtio-rng",
                crate::confined::ThreadRole::Rng,
                ctx.mem,
                queue,
                evt,
                ctx.interrupt,
                move |mem, chain| serve(mem, chain, &mut scratch),
            )
            .map_err(ActivateError::Worker)?,
        );
        Ok(())
    }

    fn reset(&mut self) -> bool {
        self.worker = None;
        true
    }

    fn pause(&mut self) -> Result<Vec<Queue>, PauseError> {
        let worker = self.worker.take().ok_or(PauseError::NotActive)?;
        Ok(vec![worker.stop()?])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::mmio::tests::{negotiate, r, setup_queue, w, ALL_OK};
    use crate::devices::virtio::mmio::{MmioResources, MmioTransport};
    use crate::devices::virtio::testutil::{mem, CountingInterrupt, TestQueue, F_NEXT, F_WRITE};
    use std::time::Duration;
    use vm_memory::{Bytes, GuestAddress};
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    #[test]
    fn fills_writable_buffers_with_random_bytes() {
        let m = mem(0x40000);
        let mut q = TestQueue::new(&m, 0, 16);
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let irq = CountingInterrupt::new();
        let mut rng = Rng::new();
        rng.activate(ActivateContext {
            mem: m.clone(),
            interrupt: irq.clone(),
            queues: vec![q.queue()],
            queue_events: vec![evt.try_clone().unwrap()],
        })
        .unwrap();
        q.add_chain(&[(0x10000, 64, true), (0x11000, 64, true)]);
        evt.write(1).unwrap();
        assert!(q.wait_used(1, Duration::from_secs(5)));
        assert_eq!(q.used_elem(0).1, 128);
        let mut a = [0u8; 64];
        let mut b = [0u8; 64];
        m.read_slice(&mut a, GuestAddress(0x10000)).unwrap();
        m.read_slice(&mut b, GuestAddress(0x11000)).unwrap();
        // 64 zero bytes from a working getrandom: probability 2^-512.
        assert_ne!(a, [0u8; 64]);
        assert_ne!(a, b);

        // Hostile: a huge buffer is served only up to the cap; a readable
        // buffer and a loop are refused without touching memory.
        q.add_chain(&[(0x20000, 0x20000, true)]);
        q.add_chain(&[(0x10000, 64, false)]);
        q.write_desc(10, 0x10000, 8, F_NEXT | F_WRITE, 10);
        q.publish(10);
        evt.write(1).unwrap();
        assert!(q.wait_used(4, Duration::from_secs(5)));
        assert_eq!(q.used_elem(1).1, MAX_BYTES_PER_REQUEST as u32);
        assert_eq!(q.used_elem(2).1, 0);
        assert_eq!(q.used_elem(3).1, 0);
        assert!(irq.used_count() >= 2);
        let queues = rng.pause().unwrap();
        assert_eq!(queues.len(), 1);
        assert!(rng.pause().is_err());
    }

    #[test]
    fn restored_rng_serves_the_same_queue_where_it_left_off() {
        let m = mem(0x40000);
        let mut t = MmioTransport::new(m.clone(), Rng::new()).unwrap();
        negotiate(&mut t);
        let mut q = TestQueue::new(&m, 0, 16);
        setup_queue(&mut t, 0, &q);
        w(&mut t, 0x70, ALL_OK);
        q.add_chain(&[(0x10000, 32, true)]);
        w(&mut t, 0x50, 0);
        assert!(q.wait_used(1, Duration::from_secs(5)));
        t.pause().unwrap();
        let state = crate::devices::persist::through_state_file(&t.save().unwrap());
        assert_eq!(state.device.acked_features, state.transport.acked_features);

        let res = MmioResources {
            mem: m.clone(),
            device: (),
        };
        let mut t2 = MmioTransport::<Rng>::restore(&state, res).unwrap();
        assert_eq!(t2.save().unwrap(), state);
        t2.resume().unwrap();
        assert_eq!(r(&mut t2, 0x70), ALL_OK);
        // The next request lands in used ring entry 1, not over entry 0.
        q.add_chain(&[(0x11000, 48, true)]);
        w(&mut t2, 0x50, 0);
        assert!(q.wait_used(2, Duration::from_secs(5)));
        assert_eq!(q.used_elem(0).1, 32);
        assert_eq!(q.used_elem(1).1, 48);
        let mut b = [0u8; 48];
        m.read_slice(&mut b, GuestAddress(0x11000)).unwrap();
        assert_ne!(b, [0u8; 48]);
    }
}
