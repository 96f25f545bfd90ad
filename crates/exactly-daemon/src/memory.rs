//! Freed heap handed back to the operating system in the long-running commands.
//!
//! A relay or consumer catching up after a broker outage fills librdkafka's fetch or produce
//! queues with large buffers and drains them again. glibc serves a large allocation with its own
//! `mmap` (returned on free) only above its mmap threshold, and by default it raises that
//! threshold to the size of each large block freed: after the first outage the next backlog's
//! buffers came from the heap instead, and fragments of it stayed resident. The 30-minute soak
//! showed it: RSS flat between faults, a step up at each fault, never down (consumer 22.6 →
//! 30.1 MiB after two 15 s blackholes). Pinning the threshold keeps large buffers out of the heap
//! (the same 9-minute blackhole soak: +38.6% without, +6.1% with), and a periodic `malloc_trim`
//! returns the free pages of what small allocations leave behind.

use std::time::Duration;

/// Allocations this large get their own mapping, returned to the system when freed. glibc's
/// starting value; fixing it is what stops the dynamic raise.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD_BYTES: libc::c_int = 256 * 1024;

/// How often free pages are returned: rare enough to cost nothing measurable.
const TRIM_EVERY: Duration = Duration::from_secs(30);

/// Keeps large buffers out of the heap and starts a thread that returns freed heap to the
/// system every `TRIM_EVERY` (glibc only; other allocators return memory on their own terms).
pub fn bound_resident_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only sets a glibc allocator parameter under its own lock; it takes no
        // pointer. Called once at start, before the Kafka and database clients allocate.
        let set = unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) };
        if set != 1 {
            tracing::warn!("cannot pin the allocator's mmap threshold (RSS may keep its high-water mark)");
        }
        let started = std::thread::Builder::new()
            .name("exactly-trim".into())
            .spawn(|| loop {
                std::thread::sleep(TRIM_EVERY);
                // SAFETY: malloc_trim only walks glibc's own arenas under their locks; it takes
                // no pointer and is safe to call from any thread at any time.
                unsafe {
                    libc::malloc_trim(0);
                }
            });
        if let Err(e) = started {
            tracing::warn!("cannot start the memory trim thread (RSS keeps its high-water mark): {e}");
        }
    }
}
