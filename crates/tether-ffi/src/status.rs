//! Status codes, their names, each thread's last error message, and the guard every entry point runs under.

use std::cell::RefCell;
use std::ffi::{c_char, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

/// Success.
pub const TETHER_OK: i32 = 0;
/// `tether_next_event`: no event came within the timeout; `tether_close`: the goodbye goes on in the background.
pub const TETHER_TIMEOUT: i32 = 1;
/// `tether_next_event`: the client is closed (or gave up) and every event was taken; nothing more will come.
pub const TETHER_CLOSED: i32 = 2;
/// A pointer argument that must not be NULL was NULL.
pub const TETHER_ERR_NULL: i32 = -1;
/// A string argument was not valid UTF-8.
pub const TETHER_ERR_UTF8: i32 = -2;
/// An argument's value is not acceptable: an empty or over-long id (more than 128 bytes), a malformed
/// `host:port`, a client configuration without a server, a negative timeout other than -1.
pub const TETHER_ERR_INVALID: i32 = -3;
/// The payload is larger than the server takes for that destination.
pub const TETHER_ERR_TOO_LARGE: i32 = -4;
/// Disconnected and the queue of sends waiting for the next connection is full, or (reliable) the window of
/// unacknowledged messages is full: try again after `TETHER_EVENT_CONNECTED` or `TETHER_EVENT_ACKED`.
pub const TETHER_ERR_FULL: i32 = -5;
/// The client was closed (`tether_close`), or it gave up reconnecting (`TETHER_EVENT_GAVE_UP`).
pub const TETHER_ERR_CLOSED: i32 = -6;
/// The TLS settings could not be used: an unreadable CA file, no certificate in it, a malformed server name.
pub const TETHER_ERR_TLS: i32 = -7;
/// A call that waits was made on the library's own thread (from the wake-up callback), where it would stall
/// every client.
pub const TETHER_ERR_THREAD: i32 = -8;
/// A defect inside the library (a caught panic) or a resource it could not get (its thread); the message says
/// which.
pub const TETHER_ERR_INTERNAL: i32 = -9;

/// The name of a status code: a static string, never NULL, never to be freed.
#[no_mangle]
pub extern "C" fn tether_status_text(status: i32) -> *const c_char {
    let s: &'static CStr = match status {
        TETHER_OK => c"ok",
        TETHER_TIMEOUT => c"timeout",
        TETHER_CLOSED => c"closed",
        TETHER_ERR_NULL => c"null pointer",
        TETHER_ERR_UTF8 => c"invalid UTF-8",
        TETHER_ERR_INVALID => c"invalid argument",
        TETHER_ERR_TOO_LARGE => c"payload too large",
        TETHER_ERR_FULL => c"queue full",
        TETHER_ERR_CLOSED => c"client closed",
        TETHER_ERR_TLS => c"TLS settings",
        TETHER_ERR_THREAD => c"called on the library's thread",
        TETHER_ERR_INTERNAL => c"internal error",
        _ => c"unknown status",
    };
    s.as_ptr()
}

/// The library's version, e.g. "0.1.0": a static string.
#[no_mangle]
pub extern "C" fn tether_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

/// What went wrong in the last call on this thread that returned an error (an empty string if none did). The
/// string belongs to the library and stays valid until the next failing call on this thread.
#[no_mangle]
pub extern "C" fn tether_last_error() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

/// A failed call: its status and what to tell the caller.
#[derive(Debug)]
pub(crate) struct Error {
    pub code: i32,
    pub message: String,
}

impl Error {
    pub fn new(code: i32, message: impl Into<String>) -> Error {
        Error { code, message: message.into() }
    }
}

pub(crate) type Result<T> = std::result::Result<T, Error>;

/// Run an entry point: its status, or its error recorded for `tether_last_error`; a panic becomes
/// `TETHER_ERR_INTERNAL` and never unwinds into the caller.
pub(crate) fn guard(f: impl FnOnce() -> Result<i32>) -> i32 {
    let e = match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(code)) => return code,
        Ok(Err(e)) => e,
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic".into());
            Error::new(TETHER_ERR_INTERNAL, format!("internal error: {what}"))
        }
    };
    LAST_ERROR.with(|last| *last.borrow_mut() = c_string(&e.message));
    e.code
}

/// `s` as a C string; a NUL inside (a server's text, say) becomes U+FFFD rather than cutting it short.
pub(crate) fn c_string(s: &str) -> CString {
    CString::new(s.replace('\0', "\u{FFFD}")).expect("no NUL left")
}

/// A required string argument: not NULL, valid UTF-8.
pub(crate) unsafe fn arg_str<'a>(p: *const c_char, what: &str) -> Result<&'a str> {
    if p.is_null() {
        return Err(Error::new(TETHER_ERR_NULL, format!("{what} is NULL")));
    }
    // SAFETY: the caller passes a NUL-terminated string that lives for the call (the header's rule).
    unsafe { CStr::from_ptr(p) }
        .to_str()
        .map_err(|e| Error::new(TETHER_ERR_UTF8, format!("{what} is not valid UTF-8: {e}")))
}

/// An optional string argument: NULL is `None`.
pub(crate) unsafe fn opt_str<'a>(p: *const c_char, what: &str) -> Result<Option<&'a str>> {
    if p.is_null() {
        return Ok(None);
    }
    // SAFETY: as `arg_str`.
    unsafe { arg_str(p, what) }.map(Some)
}

/// A client id: 1 to 128 bytes (the protocol's limit).
pub(crate) fn check_id(id: &str, what: &str) -> Result<()> {
    let max = tether_proto::frame::MAX_ID_LEN;
    if id.is_empty() || id.len() > max {
        return Err(Error::new(TETHER_ERR_INVALID, format!("{what} must be 1 to {max} bytes, got {}", id.len())));
    }
    Ok(())
}

/// A required pointer to something the library handed out.
pub(crate) unsafe fn arg_ref<'a, T>(p: *const T, what: &str) -> Result<&'a T> {
    // SAFETY: a non-NULL pointer is one the library handed out and the caller has not freed (the header's rule).
    unsafe { p.as_ref() }.ok_or_else(|| Error::new(TETHER_ERR_NULL, format!("{what} is NULL")))
}
