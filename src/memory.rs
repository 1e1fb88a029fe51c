//! Handing freed memory back to the operating system: after a checkpoint (a rare, large,
//! short-lived allocation) and when a thread goes idle after work.
//!
//! The service runs on mimalloc (`main.rs`). mimalloc keeps a freed page in its owning
//! thread's heap until that thread next *collects*, and purges it to the OS only a delay after
//! that. A thread that goes on serving small requests rarely gets there, so what a checkpoint
//! freed stayed resident (~20 MB at 200 pods), and the I/O threads held the pages of a burst
//! of requests long after it (BENCHMARKS.md, "Freed pages handed back, and a checkpoint one
//! shard at a time").
//!
//! A forced collection walks the calling thread's pages and purges every free arena page of
//! the process with `madvise` (best effort: if another thread is purging, it skips); pages a
//! thread needs again fault back in. That is done once per checkpoint, and at most once a
//! second per thread when it is about to wait for work: under a steady load, about once a
//! second per worker.
//!
//! The crate's only `unsafe` code is here: foreign calls without preconditions, and the test's
//! allocations through mimalloc itself.
#![allow(unsafe_code)]

use std::cell::Cell;
use std::time::{Duration, Instant};

/// How long a thread keeps freed pages at least, between idle releases.
const IDLE_RELEASE_EVERY: Duration = Duration::from_secs(1);

thread_local! {
    static LAST_RELEASE: Cell<Option<Instant>> = const { Cell::new(None) };
}

thread_local! {
    /// A release asked for within a second of the last one: done once it is due.
    static PENDING: Cell<bool> = const { Cell::new(false) };
    /// Releases this thread has made.
    static RELEASED: Cell<u64> = const { Cell::new(0) };
}

/// How many releases the calling thread has made.
pub fn releases_here() -> u64 {
    RELEASED.with(Cell::get)
}

/// Frees this thread's empty mimalloc pages and purges every free arena page to the OS now.
/// Harmless when mimalloc is not the global allocator: its heap for this thread is then empty.
pub fn release_freed() {
    // SAFETY: `mi_collect` takes a bool, touches only the calling thread's heap and the
    // process's arenas under mimalloc's own locks, and may be called from any thread at any
    // time (mimalloc runs the same collection itself when a thread exits).
    unsafe { libmimalloc_sys::mi_collect(true) }
    LAST_RELEASE.with(|l| l.set(Some(Instant::now())));
    PENDING.with(|p| p.set(false));
    RELEASED.with(|r| r.set(r.get() + 1));
}

/// [`release_freed`], unless this thread did so less than a second ago: for a thread about to
/// wait for work, which may happen thousands of times a second under load. Whether it ran.
pub fn release_when_idle() -> bool {
    let due = LAST_RELEASE.with(|l| l.get().is_none_or(|t| t.elapsed() >= IDLE_RELEASE_EVERY));
    if due {
        release_freed();
    }
    due
}

/// [`release_freed`] now, or, if this thread did so less than a second ago, once that second
/// is over ([`release_pending`]): after a scrape, which any client may ask for in a loop.
pub fn release_soon() {
    if !release_when_idle() {
        PENDING.with(|p| p.set(true));
    }
}

/// Makes the release [`release_soon`] put off, once it is due: for a thread's work loop, so a
/// thread that never idles still hands the pages back.
pub fn release_pending() {
    if PENDING.with(Cell::get) {
        release_when_idle();
    }
}

#[cfg(test)]
mod tests {
    use std::alloc::{GlobalAlloc, Layout};

    use mimalloc::MiMalloc;

    use super::release_freed;

    /// Resident bytes of the mapping that holds `addr`: mimalloc's arena, which nothing else
    /// in the test binary allocates from (its global allocator is the system's).
    fn resident(addr: usize) -> usize {
        let smaps = std::fs::read_to_string("/proc/self/smaps").expect("Linux smaps");
        let mut inside = false;
        for line in smaps.lines() {
            let range = line.split(' ').next().and_then(|r| r.split_once('-'));
            if let Some((lo, hi)) = range {
                if let (Ok(lo), Ok(hi)) =
                    (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16))
                {
                    inside = (lo..hi).contains(&addr);
                    continue;
                }
            }
            if let Some(kib) = line.strip_prefix("Rss:").filter(|_| inside) {
                let kib = kib.trim().trim_end_matches(" kB").parse::<usize>();
                return kib.expect("an Rss line in kB") * 1024;
            }
        }
        panic!("no mapping holds {addr:#x}")
    }

    #[test]
    fn release_hands_freed_pages_back_at_once() {
        const MIB: usize = 1 << 20;
        let layout = Layout::from_size_align(64 * 1024, 8).expect("a valid layout");
        let blocks: Vec<*mut u8> = (0..1024)
            // SAFETY: a non-zero size; every block is freed below with the same layout.
            .map(|_| unsafe { MiMalloc.alloc(layout) })
            .collect();
        for &p in &blocks {
            assert!(!p.is_null());
            // SAFETY: `p` is a live block of `layout.size()` bytes.
            unsafe { p.write_bytes(1, layout.size()) };
        }
        let arena = blocks[0] as usize;
        for p in blocks {
            // SAFETY: allocated above by the same allocator with the same layout.
            unsafe { MiMalloc.dealloc(p, layout) };
        }
        let held = resident(arena);
        release_freed();
        let after = resident(arena);
        assert!(
            after + 32 * MIB <= held,
            "64 MiB freed; {} MiB of the {} MiB mimalloc held are still resident",
            after / MIB,
            held / MIB
        );
    }
}
