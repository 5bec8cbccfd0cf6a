//! Validating a descriptor chain the guest offered, and copying bytes in and
//! out of its buffers.
//!
//! `virtio_queue::DescriptorChain` stops iterating silently on a loop (its
//! TTL runs out), on an unreadable descriptor table entry or on a bad
//! indirect table. Those cases all end with a descriptor that still has
//! `NEXT` set, which is how [`parse_chain`] tells a broken chain from a
//! complete one.

use std::ops::Deref;

use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, GuestMemoryBackend, GuestMemoryMmap};

/// No device here needs more buffers in one request; longer chains
/// (possible through indirect tables) are refused.
pub const MAX_CHAIN_LEN: usize = 1024;

/// One guest buffer of a chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Buf {
    pub addr: GuestAddress,
    pub len: u32,
}

/// A chain split into its device-readable buffers and the device-writable
/// buffers that follow them.
#[derive(Debug, Default)]
pub struct Chain {
    pub head: u16,
    pub readable: Vec<Buf>,
    pub writable: Vec<Buf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    #[error("descriptor chain is empty (bad head index or descriptor table)")]
    Empty,
    #[error("descriptor chain is cut short (loop, bad next index or unreadable descriptor)")]
    Truncated,
    #[error("descriptor chain is longer than {MAX_CHAIN_LEN} buffers")]
    TooLong,
    #[error("a device-readable buffer follows a device-writable one")]
    ReadableAfterWritable,
    #[error("buffer {addr:#x}+{len:#x} is outside guest memory")]
    OutsideMemory { addr: u64, len: u32 },
}

/// Walk a chain, checking that it ends properly, that readable buffers come
/// first, and that every buffer lies inside guest memory.
pub fn parse_chain<M>(mem: &GuestMemoryMmap, chain: DescriptorChain<M>) -> Result<Chain, ChainError>
where
    M: Deref,
    M::Target: GuestMemory,
{
    let head = chain.head_index();
    let mut out = Chain {
        head,
        ..Chain::default()
    };
    let mut last_has_next = false;
    let mut count = 0usize;
    for desc in chain {
        count += 1;
        if count > MAX_CHAIN_LEN {
            return Err(ChainError::TooLong);
        }
        last_has_next = desc.has_next();
        let buf = Buf {
            addr: desc.addr(),
            len: desc.len(),
        };
        if !in_memory(mem, buf) {
            return Err(ChainError::OutsideMemory {
                addr: buf.addr.0,
                len: buf.len,
            });
        }
        if desc.is_write_only() {
            out.writable.push(buf);
        } else if out.writable.is_empty() {
            out.readable.push(buf);
        } else {
            return Err(ChainError::ReadableAfterWritable);
        }
    }
    if count == 0 {
        return Err(ChainError::Empty);
    }
    if last_has_next {
        return Err(ChainError::Truncated);
    }
    Ok(out)
}

fn in_memory(mem: &GuestMemoryMmap, buf: Buf) -> bool {
    buf.len == 0 || GuestMemoryBackend::check_range(mem, buf.addr, buf.len as usize)
}

/// Total length of a list of buffers (a chain is at most 4 GiB long).
pub fn total_len(bufs: &[Buf]) -> u64 {
    bufs.iter().map(|b| u64::from(b.len)).sum()
}

/// Copy bytes out of `bufs`, starting `skip` bytes into them. Returns how
/// many bytes were copied (short if the buffers end first).
pub fn read_from_bufs(
    mem: &GuestMemoryMmap,
    bufs: &[Buf],
    mut skip: u64,
    out: &mut [u8],
) -> Result<usize, vm_memory::GuestMemoryError> {
    let mut done = 0usize;
    for buf in bufs {
        if done == out.len() {
            break;
        }
        let len = u64::from(buf.len);
        if skip >= len {
            skip -= len;
            continue;
        }
        let n = ((len - skip) as usize).min(out.len() - done);
        let addr = buf
            .addr
            .checked_add(skip)
            .ok_or(vm_memory::GuestMemoryError::InvalidGuestAddress(buf.addr))?;
        mem.read_slice(&mut out[done..done + n], addr)?;
        done += n;
        skip = 0;
    }
    Ok(done)
}

/// Copy `data` into `bufs`, starting `skip` bytes into them. Returns how
/// many bytes were copied (short if the buffers end first).
pub fn write_to_bufs(
    mem: &GuestMemoryMmap,
    bufs: &[Buf],
    mut skip: u64,
    data: &[u8],
) -> Result<usize, vm_memory::GuestMemoryError> {
    let mut done = 0usize;
    for buf in bufs {
        if done == data.len() {
            break;
        }
        let len = u64::from(buf.len);
        if skip >= len {
            skip -= len;
            continue;
        }
        let n = ((len - skip) as usize).min(data.len() - done);
        let addr = buf
            .addr
            .checked_add(skip)
            .ok_or(vm_memory::GuestMemoryError::InvalidGuestAddress(buf.addr))?;
        mem.write_slice(&data[done..done + n], addr)?;
        done += n;
        skip = 0;
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::testutil::{mem, TestQueue, F_NEXT, F_WRITE};
    use virtio_queue::QueueT;

    fn pop(q: &TestQueue, m: &GuestMemoryMmap) -> Result<Chain, ChainError> {
        let mut queue = q.queue();
        let chain = queue.pop_descriptor_chain(m).expect("a chain is available");
        parse_chain(m, chain)
    }

    #[test]
    fn well_formed_chain_is_split_in_readable_and_writable() {
        let m = mem(0x10000);
        let mut q = TestQueue::new(&m, 0, 16);
        q.add_chain(&[(0x4000, 16, false), (0x5000, 512, true), (0x6000, 1, true)]);
        let c = pop(&q, &m).unwrap();
        assert_eq!(c.readable.len(), 1);
        assert_eq!(c.writable.len(), 2);
        assert_eq!(total_len(&c.writable), 513);
    }

    #[test]
    fn looping_chain_is_truncated() {
        let m = mem(0x10000);
        let mut q = TestQueue::new(&m, 0, 16);
        q.write_desc(0, 0x4000, 16, F_NEXT, 1);
        q.write_desc(1, 0x5000, 16, F_NEXT, 0);
        q.publish(0);
        assert_eq!(pop(&q, &m).unwrap_err(), ChainError::Truncated);
    }

    #[test]
    fn next_index_past_queue_is_truncated() {
        let m = mem(0x10000);
        let mut q = TestQueue::new(&m, 0, 16);
        q.write_desc(0, 0x4000, 16, F_NEXT, 200);
        q.publish(0);
        assert_eq!(pop(&q, &m).unwrap_err(), ChainError::Truncated);
    }

    #[test]
    fn head_past_queue_is_empty() {
        let m = mem(0x10000);
        let mut q = TestQueue::new(&m, 0, 16);
        q.publish(999);
        assert_eq!(pop(&q, &m).unwrap_err(), ChainError::Empty);
    }

    #[test]
    fn buffer_outside_memory_is_refused() {
        let m = mem(0x10000);
        let mut q = TestQueue::new(&m, 0, 16);
        q.add_chain(&[(0xfff0, 0x100, false)]);
        assert!(matches!(
            pop(&q, &m).unwrap_err(),
            ChainError::OutsideMemory { .. }
        ));
        q.add_chain(&[(u64::MAX - 4, 0x100, false)]);
        let mut queue = q.queue();
        queue.set_next_avail(1);
        let chain = queue.pop_descriptor_chain(&m).unwrap();
        assert!(matches!(
            parse_chain(&m, chain).unwrap_err(),
            ChainError::OutsideMemory { .. }
        ));
    }

    #[test]
    fn readable_after_writable_is_refused() {
        let m = mem(0x10000);
        let mut q = TestQueue::new(&m, 0, 16);
        q.add_chain(&[(0x4000, 16, true), (0x5000, 16, false)]);
        assert_eq!(pop(&q, &m).unwrap_err(), ChainError::ReadableAfterWritable);
    }

    #[test]
    fn indirect_table_with_bad_length_is_truncated_or_empty() {
        let m = mem(0x10000);
        let mut q = TestQueue::new(&m, 0, 16);
        // An indirect descriptor whose length is not a multiple of 16.
        q.write_desc(
            0,
            0x8000,
            17,
            crate::devices::virtio::testutil::F_INDIRECT,
            0,
        );
        q.publish(0);
        assert_eq!(pop(&q, &m).unwrap_err(), ChainError::Empty);
    }

    #[test]
    fn gather_and_scatter_cross_buffer_boundaries() {
        let m = mem(0x10000);
        let bufs = [
            Buf {
                addr: GuestAddress(0x1000),
                len: 3,
            },
            Buf {
                addr: GuestAddress(0x2000),
                len: 5,
            },
        ];
        assert_eq!(write_to_bufs(&m, &bufs, 1, b"abcdefghij").unwrap(), 7);
        let mut out = [0u8; 10];
        assert_eq!(read_from_bufs(&m, &bufs, 0, &mut out).unwrap(), 8);
        assert_eq!(&out[..8], b"\0abcdefg");
        let _ = F_WRITE;
    }
}
