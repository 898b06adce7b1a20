//! Faults injected by tests, to prove that a panic in a connection's task leaks nothing. Built only with the
//! `fault-injection` feature, which the crate's own tests enable; without it every check is an empty inline
//! function.
//!
//! # Layout
//! [`panic_at`] panics when the client id is `panic-at-POINT` for the named point: `hello` (a `HELLO` arrived,
//! before anything is decided), `hub` (while the session hub's lock is held), `welcome` (admitted by the
//! registry, before the `online` event), `data` (an admitted client's `DATA`).

/// Panic at `point` for the client id `panic-at-POINT`.
#[cfg(feature = "fault-injection")]
pub(crate) fn panic_at(point: &str, client: &str) {
    if client.strip_prefix("panic-at-") == Some(point) {
        panic!("injected fault: {point} for {client}");
    }
}

#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub(crate) fn panic_at(_point: &str, _client: &str) {}
