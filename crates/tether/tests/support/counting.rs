//! A global allocator that counts live heap bytes and allocations, for the heap guard (`tests/heap.rs`) and the
//! `heap_per_conn` example. Included by path (`#[path]`) so that each binary installs it as its own allocator.
//! It counts every thread, or, once a thread has called [`count_only_this_thread`], only the threads that did (a
//! server's runtime threads, with its clients beside them in the same process uncounted).
#![allow(dead_code)] // each binary uses part of it

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicIsize, Ordering};

pub struct Counting;
static LIVE_BYTES: AtomicIsize = AtomicIsize::new(0);
static LIVE_ALLOCS: AtomicIsize = AtomicIsize::new(0);
static FILTERED: AtomicBool = AtomicBool::new(false);
thread_local! {
    static COUNTED: Cell<bool> = const { Cell::new(false) };
}

/// From now on, count this thread and the others that call this, and no other.
pub fn count_only_this_thread() {
    COUNTED.with(|c| c.set(true));
    FILTERED.store(true, Ordering::Relaxed);
}

fn counted() -> bool {
    !FILTERED.load(Ordering::Relaxed) || COUNTED.try_with(Cell::get).unwrap_or(false)
}

fn add(bytes: isize, allocs: isize) {
    if counted() {
        LIVE_BYTES.fetch_add(bytes, Ordering::Relaxed);
        LIVE_ALLOCS.fetch_add(allocs, Ordering::Relaxed);
    }
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        add(layout.size() as isize, 1);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        add(-(layout.size() as isize), -1);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        add(new_size as isize - layout.size() as isize, 0);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Live heap bytes and allocations now.
pub fn live() -> (isize, isize) {
    (LIVE_BYTES.load(Ordering::Relaxed), LIVE_ALLOCS.load(Ordering::Relaxed))
}
