//! The library's own runtime: one IO thread (`tether-io`) for every client in the process, started by the first
//! client and kept for the life of the process, plus at most two threads for blocking work (name lookups) that
//! tokio starts when needed and stops when idle.

use std::sync::OnceLock;

use tokio::runtime::{Builder, Handle, Runtime};

use crate::status::{Error, Result, TETHER_ERR_INTERNAL, TETHER_ERR_THREAD};

static RUNTIME: OnceLock<std::result::Result<Runtime, String>> = OnceLock::new();

/// The runtime's handle, starting it on first use.
pub(crate) fn handle() -> Result<Handle> {
    let rt = RUNTIME.get_or_init(|| {
        Builder::new_multi_thread()
            .worker_threads(1)
            .max_blocking_threads(2)
            .thread_name("tether-io")
            .enable_all()
            .build()
            .map_err(|e| format!("could not start the library's thread: {e}"))
    });
    match rt {
        Ok(rt) => Ok(rt.handle().clone()),
        Err(e) => Err(Error::new(TETHER_ERR_INTERNAL, e.clone())),
    }
}

/// Refuse a call that waits when it is made on a runtime thread (the wake-up callback runs there): waiting would
/// stall every client, and tokio forbids it.
pub(crate) fn not_on_runtime(what: &str) -> Result<()> {
    match on_runtime() {
        true => Err(Error::new(
            TETHER_ERR_THREAD,
            format!("{what} waits, and was called on the library's own thread (from the wake-up callback?)"),
        )),
        false => Ok(()),
    }
}

/// This thread is a runtime's (the library's own, where the wake-up callback runs).
pub(crate) fn on_runtime() -> bool {
    Handle::try_current().is_ok()
}
