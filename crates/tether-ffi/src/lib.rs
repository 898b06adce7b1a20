//! libtether: the tether client for any language that can call C.
//!
//! # Layout
//! The library wraps [`tether_core::ReconnectingClient`], complete: a server list for failover, reconnecting with
//! jittered backoff, the servers' `retry_after` and `alternative` hints, subscriptions and unsent data kept across
//! outages, TLS, and reliable sessions. Every client runs on one runtime thread of the library's own
//! (`tether-io`, started by the first client), so nothing runs on the caller's threads but the calls themselves.
//!
//! - [`config`]: `tether_config_*`, a builder the caller owns and frees.
//! - [`client`]: `tether_client_start`, sends, subscriptions, `tether_close`, `tether_free`; each client is a
//!   small task that owns its `ReconnectingClient` and hands events over to the caller.
//! - [`event`]: `tether_next_event` pulls the next event (waiting up to a timeout) into a flat C struct whose
//!   strings and bytes the library keeps until the next pull; an optional wake-up callback tells event loops.
//! - [`status`]: the status codes, their names, and each thread's last error message.
//!
//! # The rules of the ABI (also in `tether.h`)
//! - Every function returns a status (`TETHER_OK`, a positive "no event" status, or a negative error); on an
//!   error, `tether_last_error()` on the same thread says what went wrong in words.
//! - No panic crosses the ABI: each entry point runs under `catch_unwind` and reports `TETHER_ERR_INTERNAL`.
//! - NULL pointers, strings that are not UTF-8, ids over 128 bytes, payloads over the limit, calls after
//!   `tether_close` and a second `tether_close` are errors, never crashes. A pointer the library did not hand
//!   out, or one already freed, cannot be detected.
//!
//! The header is generated from this crate by cbindgen and checked in (`tether.h`); a test fails when it is stale
//! (`TETHER_BLESS=1 cargo test -p tether-ffi` rewrites it).

#![allow(non_camel_case_types)]
// Every `unsafe extern "C"` function documents its contract in the header's comments (which are these doc
// comments); clippy's `# Safety` section would repeat the same sentence on each.
#![allow(clippy::missing_safety_doc)]

pub mod client;
pub mod config;
pub mod event;
mod runtime;
pub mod status;

pub use client::*;
pub use config::*;
pub use event::*;
pub use status::*;

#[cfg(test)]
mod tests;
