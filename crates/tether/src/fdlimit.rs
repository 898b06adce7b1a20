//! The process's file-descriptor limit, and how many connections it leaves room for.
//!
//! # Layout
//! [`raise_fd_limit`] lifts the soft `RLIMIT_NOFILE` to the hard limit (a service started with the common default
//! of 1,024 would otherwise stall near a thousand clients). [`Capacity::measure`] turns the soft limit into the
//! number of connections the server can hold: the limit, minus descriptors already open, minus a margin kept for
//! refusals in flight (`BYE(busy)` needs a socket too). The server admits at most that many and answers `busy`
//! beyond it. [`Reserve`] is one descriptor held back for the moment the limit is hit anyway (another part of
//! the process opened files): it is released to accept one waiting connection, refuse it, and is taken again, so
//! that newcomers hear `busy` instead of waiting in the kernel's backlog for an accept that cannot happen.

use std::io;

/// Soft and hard `RLIMIT_NOFILE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FdLimit {
    pub soft: u64,
    pub hard: u64,
}

/// The current `RLIMIT_NOFILE`.
pub fn fd_limit() -> io::Result<FdLimit> {
    let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes one rlimit through a pointer valid for the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 {
        return Err(io::Error::last_os_error());
    }
    #[allow(clippy::unnecessary_cast)] // rlim_t is u64 on Linux, not on every platform
    Ok(FdLimit { soft: r.rlim_cur as u64, hard: r.rlim_max as u64 })
}

/// Raise the soft limit to the hard limit. Returns the limits before and after.
pub fn raise_fd_limit() -> io::Result<(FdLimit, FdLimit)> {
    let before = fd_limit()?;
    if before.soft >= before.hard {
        return Ok((before, before));
    }
    let r = libc::rlimit { rlim_cur: before.hard as libc::rlim_t, rlim_max: before.hard as libc::rlim_t };
    // SAFETY: setrlimit reads one rlimit through a pointer valid for the call.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &r) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((before, fd_limit()?))
}

/// Descriptors this process has open now (Linux: entries of /proc/self/fd), if the platform can tell.
pub fn open_fds() -> Option<u64> {
    Some(std::fs::read_dir("/proc/self/fd").ok()?.count().saturating_sub(1) as u64)
}

/// How many connections the descriptor limit leaves room for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacity {
    /// Connections the server may hold: `limit - open - margin`.
    pub connections: usize,
    pub limit: u64,
    /// Descriptors open when it was measured (listener, runtime, standard streams, log files, …).
    pub open: u64,
    /// Kept free for refusals in flight and the [`Reserve`].
    pub margin: u64,
}

impl Capacity {
    /// Measure against the current soft limit. The margin is 64 descriptors, or a quarter of the limit when that
    /// is smaller.
    pub fn measure() -> io::Result<Capacity> {
        let limit = fd_limit()?.soft;
        let open = open_fds().unwrap_or(16);
        Ok(Capacity::from_parts(limit, open))
    }

    pub fn from_parts(limit: u64, open: u64) -> Capacity {
        let margin = (limit / 4).min(64);
        let connections = limit.saturating_sub(open).saturating_sub(margin).min(usize::MAX as u64) as usize;
        Capacity { connections, limit, open, margin }
    }
}

/// One descriptor held back to accept-and-refuse when the process is out of descriptors.
#[derive(Debug)]
pub struct Reserve(Option<std::fs::File>);

impl Reserve {
    pub fn new() -> Reserve {
        Reserve(std::fs::File::open("/dev/null").ok())
    }

    /// Release the held descriptor (so that one accept can succeed). False when there was none to release.
    pub fn release(&mut self) -> bool {
        self.0.take().is_some()
    }

    /// Take a descriptor back, if one is free again.
    pub fn restore(&mut self) {
        if self.0.is_none() {
            self.0 = std::fs::File::open("/dev/null").ok();
        }
    }
}

impl Default for Reserve {
    fn default() -> Self {
        Reserve::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capacity_leaves_a_margin_for_refusals() {
        assert_eq!(Capacity::from_parts(1024, 12).connections, 1024 - 12 - 64);
        assert_eq!(Capacity::from_parts(64, 10).connections, 64 - 10 - 16);
        assert_eq!(Capacity::from_parts(8, 10).connections, 0);
        assert_eq!(Capacity::from_parts(1 << 20, 12).connections, (1 << 20) - 12 - 64);
    }

    #[test]
    fn the_limit_reads_back_and_the_reserve_holds_one_descriptor() {
        let l = fd_limit().unwrap();
        assert!(l.soft <= l.hard && l.soft > 0);
        assert!(open_fds().unwrap() >= 3, "at least the standard streams");
        let mut r = Reserve::new();
        assert!(r.0.is_some());
        assert!(r.release());
        assert!(!r.release());
        r.restore();
        assert!(r.0.is_some());
    }
}
