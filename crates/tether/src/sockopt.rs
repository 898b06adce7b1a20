//! TCP socket options on every accepted and connected socket: NODELAY, keepalive, and TCP_USER_TIMEOUT.
//!
//! # Layout
//! [`SocketOptions`] is the configuration; [`SocketOptions::apply`] sets it on one socket; [`read_back`] reads
//! the effective values (the server logs them once at start, from its listening socket, whose options Linux
//! copies to accepted sockets). An option the platform lacks is warned about once per process and skipped.
//! [`unacked_bytes`] asks the kernel how much written data it still holds, which tells a user timeout
//! (`write_timeout`) from a keepalive timeout (`keepalive_timeout`) when a read fails with ETIMEDOUT.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};

/// Kernel keepalive probes: first after `idle` of silence, then every `interval`, `count` unanswered ones kill the
/// connection with ETIMEDOUT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keepalive {
    pub idle: Duration,
    pub interval: Duration,
    pub count: u32,
}

/// Options set on every socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketOptions {
    pub nodelay: bool,
    /// `None` disables SO_KEEPALIVE.
    pub keepalive: Option<Keepalive>,
    /// TCP_USER_TIMEOUT: how long written data may stay unacknowledged before the kernel gives up.
    /// `None` derives it as `idle + interval × count` (or leaves the kernel default without keepalive);
    /// `Some(ZERO)` leaves the kernel default (about 15 minutes of retransmissions).
    pub user_timeout: Option<Duration>,
}

impl Default for SocketOptions {
    fn default() -> Self {
        SocketOptions {
            nodelay: true,
            keepalive: Some(Keepalive { idle: Duration::from_secs(15), interval: Duration::from_secs(5), count: 3 }),
            user_timeout: None,
        }
    }
}

impl SocketOptions {
    /// The user timeout that will be set, after derivation; `None` leaves the kernel default.
    pub fn effective_user_timeout(&self) -> Option<Duration> {
        match (self.user_timeout, self.keepalive) {
            (Some(d), _) if d.is_zero() => None,
            (Some(d), _) => Some(d),
            (None, Some(k)) => Some(k.idle + k.interval * k.count),
            (None, None) => None,
        }
    }

    /// Set the options on `sock`. Failures of options the platform does not have are warned about once and
    /// skipped; other failures are returned.
    pub fn apply<'s>(&self, sock: impl Into<SockRef<'s>>) -> std::io::Result<()> {
        let sock = sock.into();
        sock.set_tcp_nodelay(self.nodelay)?;
        match self.keepalive {
            None => sock.set_keepalive(false)?,
            Some(k) => {
                let params = TcpKeepalive::new().with_time(k.idle).with_interval(k.interval).with_retries(k.count);
                if let Err(e) = sock.set_tcp_keepalive(&params) {
                    warn_once(&KEEPALIVE_WARNED, "keepalive interval/count", &e);
                    sock.set_keepalive(true)?;
                }
            }
        }
        set_user_timeout(&sock, self.effective_user_timeout());
        Ok(())
    }
}

/// The values the kernel reports for a socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Effective {
    pub nodelay: bool,
    pub keepalive: Option<Keepalive>,
    pub user_timeout: Option<Duration>,
}

impl fmt::Display for Effective {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "nodelay={} ", self.nodelay)?;
        match self.keepalive {
            Some(k) => write!(f, "keepalive=idle {:?}/interval {:?}/count {} ", k.idle, k.interval, k.count)?,
            None => write!(f, "keepalive=off ")?,
        }
        match self.user_timeout {
            Some(d) => write!(f, "user_timeout={d:?}"),
            None => write!(f, "user_timeout=kernel default"),
        }
    }
}

/// Read the effective options back from the kernel.
pub fn read_back<'s>(sock: impl Into<SockRef<'s>>) -> std::io::Result<Effective> {
    let sock = sock.into();
    let keepalive = if sock.keepalive()? {
        Some(Keepalive {
            idle: sock.tcp_keepalive_time()?,
            interval: sock.tcp_keepalive_interval()?,
            count: sock.tcp_keepalive_retries()?,
        })
    } else {
        None
    };
    Ok(Effective { nodelay: sock.tcp_nodelay()?, keepalive, user_timeout: get_user_timeout(&sock) })
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn set_user_timeout(sock: &SockRef<'_>, timeout: Option<Duration>) {
    if let Err(e) = sock.set_tcp_user_timeout(timeout) {
        warn_once(&USER_TIMEOUT_WARNED, "TCP_USER_TIMEOUT", &e);
    }
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn set_user_timeout(_sock: &SockRef<'_>, timeout: Option<Duration>) {
    if timeout.is_some() {
        let e = std::io::Error::from(std::io::ErrorKind::Unsupported);
        warn_once(&USER_TIMEOUT_WARNED, "TCP_USER_TIMEOUT", &e);
    }
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn get_user_timeout(sock: &SockRef<'_>) -> Option<Duration> {
    sock.tcp_user_timeout().ok().flatten()
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn get_user_timeout(_sock: &SockRef<'_>) -> Option<Duration> {
    None
}

static KEEPALIVE_WARNED: AtomicBool = AtomicBool::new(false);
static USER_TIMEOUT_WARNED: AtomicBool = AtomicBool::new(false);

fn warn_once(flag: &AtomicBool, what: &str, err: &std::io::Error) {
    if !flag.swap(true, Ordering::Relaxed) {
        tracing::warn!("{what} is not available on this platform ({err}); going on without it");
    }
}

/// Bytes written to the socket that the peer has not acknowledged (or that were not sent yet), per the kernel.
/// `None` where the platform cannot tell.
#[cfg(target_os = "linux")]
pub fn unacked_bytes(fd: std::os::fd::RawFd) -> Option<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: TIOCOUTQ (SIOCOUTQ) writes one c_int through the pointer, which is valid for the call.
    let rc = unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut n) };
    (rc == 0 && n >= 0).then_some(n as usize)
}

#[cfg(not(target_os = "linux"))]
pub fn unacked_bytes(_fd: i32) -> Option<usize> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_timeout_is_derived_from_keepalive() {
        let o = SocketOptions::default();
        assert_eq!(o.effective_user_timeout(), Some(Duration::from_secs(30)));
        let off = SocketOptions { user_timeout: Some(Duration::ZERO), ..o };
        assert_eq!(off.effective_user_timeout(), None);
        let none = SocketOptions { keepalive: None, ..o };
        assert_eq!(none.effective_user_timeout(), None);
    }

    #[test]
    fn options_read_back_as_set() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let s = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let o = SocketOptions {
            nodelay: true,
            keepalive: Some(Keepalive { idle: Duration::from_secs(7), interval: Duration::from_secs(2), count: 4 }),
            user_timeout: None,
        };
        o.apply(&s).unwrap();
        let e = read_back(&s).unwrap();
        assert!(e.nodelay);
        assert_eq!(e.keepalive, o.keepalive);
        if cfg!(target_os = "linux") {
            assert_eq!(e.user_timeout, Some(Duration::from_secs(15)));
        }
        assert!(e.to_string().contains("count 4"));
    }
}
