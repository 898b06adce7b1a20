//! A slot's waker, without an allocation: the waker's one data word holds its loop's number and the slot's key,
//! and the loop's [`Bell`] is found in a process-wide table when it fires.
//!
//! # Layout
//! [`Registration`] puts a loop's bell in the table (and takes it out when the loop ends); [`slot_waker`] makes
//! the waker a visit hands to the hooks' command sources (a connection's control slot, a cluster channel). A
//! waker that outlives its loop finds no bell and does nothing; one whose loop number was reused rings a slot
//! of the new loop for nothing, and the visit finds nothing to do. Either way it is harmless.
//!
//! # Rules
//! Sources keep the waker they were polled with and wake it once (they take it), so a slot is listed at most once
//! per command burst. The table's lock is read for a wake and written only when a loop starts or ends; the
//! bell's own list is locked under it, briefly.

use std::sync::{Arc, RwLock};
use std::task::{RawWaker, RawWakerVTable, Waker};

use super::Bell;

/// Bits of the data word that number the loop; the rest hold the key (24 on a 32-bit target, 48 on 64).
const LOOP_BITS: u32 = if usize::BITS >= 64 { 16 } else { 8 };
const KEY_BITS: u32 = usize::BITS - LOOP_BITS;

static BELLS: RwLock<slab::Slab<Arc<Bell>>> = RwLock::new(slab::Slab::new());

/// A loop's place in the table, for as long as it lives.
pub(crate) struct Registration(usize);

impl Registration {
    /// Put `bell` in the table. Fails if the process already runs as many loops as a waker can number.
    pub(crate) fn new(bell: Arc<Bell>) -> std::io::Result<Registration> {
        let mut bells = BELLS.write().unwrap_or_else(|p| p.into_inner());
        if bells.len() >= 1 << LOOP_BITS {
            return Err(std::io::Error::other(format!("more than {} event loops in one process", 1usize << LOOP_BITS)));
        }
        Ok(Registration(bells.insert(bell)))
    }

    /// The waker for slot `key` of this loop.
    pub(crate) fn slot_waker(&self, key: usize) -> Waker {
        debug_assert!(key < 1 << KEY_BITS, "slab key beyond the waker's bits");
        let data = (self.0 << KEY_BITS | key) as *const ();
        // SAFETY: the vtable's functions only decode the data word as two integers; it is never dereferenced.
        unsafe { Waker::from_raw(RawWaker::new(data, &VTABLE)) }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        BELLS.write().unwrap_or_else(|p| p.into_inner()).try_remove(self.0);
    }
}

static VTABLE: RawWakerVTable = RawWakerVTable::new(clone, wake, wake, drop);

fn clone(data: *const ()) -> RawWaker {
    RawWaker::new(data, &VTABLE)
}

fn wake(data: *const ()) {
    let word = data as usize;
    let (loop_no, key) = (word >> KEY_BITS, word & ((1 << KEY_BITS) - 1));
    if let Some(bell) = BELLS.read().unwrap_or_else(|p| p.into_inner()).get(loop_no) {
        bell.ring(key);
    }
}

fn drop(_: *const ()) {}
