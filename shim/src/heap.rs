//! The shim's heap, kept small: an idle sandbox's shim is per-pod memory
//! that runc's users do not pay for a VM.

/// One malloc arena for the whole process. glibc gives each new thread an
/// arena of its own (up to 8 per CPU); the shim's ~20 threads had 14 of
/// them, ~700 KiB dirty. In one arena most of that is live data: with the
/// trim below an idle sandbox's shim went from 1356 to 1256 KiB
/// Private_Dirty (PVM, release). The shim's threads mostly wait, so sharing
/// one lock costs nothing.
pub fn one_arena() {
    // SAFETY: mallopt only sets an allocator parameter; called before any
    // thread exists.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) };
}

/// Hands the heap freed while setting a container up back to the host.
/// Called once a task has started, when a shim usually goes idle.
pub fn release_freed() {
    // SAFETY: malloc_trim only returns free heap pages to the kernel.
    unsafe { libc::malloc_trim(0) };
}
