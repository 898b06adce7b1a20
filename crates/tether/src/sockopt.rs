//! TCP socket options on every accepted and connected socket: NODELAY, keepalive, TCP_USER_TIMEOUT, and a
//! ceiling on the retransmission timeout.
//!
//! # Layout
//! [`SocketOptions`] is the configuration; [`SocketOptions::apply`] sets it on one socket; [`read_back`] reads
//! the effective values (the server logs them once at start, from its listening socket, whose options Linux
//! copies to accepted sockets). An option the platform lacks is warned about once per process and skipped.
//! [`unacked_bytes`] asks the kernel how much written data it still holds, which tells a user timeout
//! (`write_timeout`) from a keepalive timeout (`keepalive_timeout`) when a read fails with ETIMEDOUT.
//! [`tcp_info`] reads the kernel's view of one socket (`TCP_INFO`), [`tcp_state_name`] names its state, and
//! [`kernel_queue`] is the part of it the write-progress rule needs.
//!
//! # The retransmission ceiling
//! A path that goes silent for a few seconds (a tunnel, a cell handover) leaves TCP retransmitting with a timeout
//! that doubles each time, from about 200 ms up to 120 s. After the path heals, the next retransmission can come
//! seconds later, and a heartbeat deadline can pass in that wait although nothing is wrong any more. [`RtoMax`]
//! caps the doubling per socket (Linux 6.15's `TCP_RTO_MAX_MS`, at least 1 s): with a ceiling of `c`, the first
//! segment goes through at most `c` after the heal. The driver sets it once the heartbeat is negotiated
//! ([`cap_retransmissions`]), from that connection's interval. Where the kernel lacks the option it falls back to
//! thin-stream linear timeouts (`TCP_THIN_LINEAR_TIMEOUTS`: the first six retransmissions of a connection with
//! little in flight keep the first timeout instead of doubling), and says so once; where neither exists, once as
//! well. A ceiling under 60 s departs from RFC 6298, which asks for a maximum of at least 60 s; the RFC guards
//! against retransmissions piling onto a congested path, and a heartbeat connection carries a few small segments,
//! so the cost is a retransmission a second at most while a path is down, against a live device condemned.

use std::fmt;
use std::os::fd::AsFd;
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
    /// The ceiling on the retransmission timeout, set once a connection's heartbeat is negotiated.
    pub rto_max: RtoMax,
    /// Raise keepalive's idle time on each connection to 1.5 heartbeat intervals when that is longer
    /// ([`SocketOptions::for_heartbeat`]). Off: keepalive's idle time is what `keepalive` says, whatever the
    /// heartbeat (an operator who asked for a keepalive idle time gets exactly that).
    pub keepalive_follows_heartbeat: bool,
}

impl Default for SocketOptions {
    fn default() -> Self {
        SocketOptions {
            nodelay: true,
            keepalive: Some(Keepalive { idle: Duration::from_secs(15), interval: Duration::from_secs(5), count: 3 }),
            user_timeout: None,
            rto_max: RtoMax::Auto,
            keepalive_follows_heartbeat: true,
        }
    }
}

/// The smallest retransmission ceiling Linux accepts.
pub const RTO_MAX_FLOOR: Duration = Duration::from_secs(1);
/// Linux's own ceiling (`TCP_RTO_MAX`): a cap at or above it changes nothing.
pub const KERNEL_RTO_MAX: Duration = Duration::from_secs(120);

/// The ceiling on a socket's retransmission timeout (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RtoMax {
    /// A fifth of the connection's heartbeat interval, at least 1 s: 1 s for heartbeats up to 5 s, 6 s at 30 s,
    /// none (the kernel's 120 s) from 10 minutes on. A blip then costs at most a fifth of an interval after it
    /// heals, while a long outage is retransmitted into no more than five times per interval.
    #[default]
    Auto,
    /// This ceiling on every connection, whatever its interval (1 s to 120 s).
    Fixed(Duration),
    /// The kernel's own doubling up to 120 s.
    Off,
}

impl RtoMax {
    /// The ceiling for a connection whose heartbeat interval is `interval`; `None` leaves the kernel's.
    pub fn for_interval(self, interval: Duration) -> Option<Duration> {
        let cap = match self {
            RtoMax::Off => return None,
            RtoMax::Fixed(d) => d,
            RtoMax::Auto => interval / 5,
        };
        let cap = cap.clamp(RTO_MAX_FLOOR, KERNEL_RTO_MAX);
        (cap < KERNEL_RTO_MAX).then_some(cap)
    }
}

impl fmt::Display for RtoMax {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RtoMax::Auto => f.write_str("auto"),
            RtoMax::Fixed(d) => write!(f, "{d:?}"),
            RtoMax::Off => f.write_str("off"),
        }
    }
}

/// What [`cap_retransmissions`] could do on a socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RtoCap {
    /// `TCP_RTO_MAX_MS` is set to this.
    Capped(Duration),
    /// The kernel has no `TCP_RTO_MAX_MS`: thin-stream linear timeouts are on instead.
    ThinLinear,
    /// Neither option exists here: the kernel's exponential backoff stands.
    Unavailable,
}

/// Linux's `TCP_RTO_MAX_MS` (include/uapi/linux/tcp.h, since 6.15); the libc crate does not name it yet.
#[cfg(any(target_os = "linux", target_os = "android"))]
const TCP_RTO_MAX_MS: libc::c_int = 44;

/// Cap the retransmission timeout of `sock` at `cap` (see the module docs), falling back to thin-stream linear
/// timeouts; what could not be done is warned about once per process.
#[cfg(any(target_os = "linux", target_os = "android"))]
pub fn cap_retransmissions<'s>(sock: impl Into<SockRef<'s>>, cap: Duration) -> RtoCap {
    use std::os::fd::AsRawFd;
    let sock = sock.into();
    let ms = cap.clamp(RTO_MAX_FLOOR, KERNEL_RTO_MAX).as_millis() as libc::c_int;
    // A kernel that refused the option once refuses it for every socket: straight to the fallback then, rather
    // than one failing call per connection.
    if RTO_MAX_MISSING.load(Ordering::Relaxed) {
        return thin_linear(&sock);
    }
    // SAFETY: setsockopt reads one c_int through a pointer valid for the call.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_TCP,
            TCP_RTO_MAX_MS,
            (&ms as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        return RtoCap::Capped(Duration::from_millis(ms as u64));
    }
    let e = std::io::Error::last_os_error();
    if !matches!(e.raw_os_error(), Some(libc::ENOPROTOOPT) | Some(libc::EINVAL)) {
        // Not the option's absence (a socket already closed, say): no fallback to choose, nothing to remember.
        return RtoCap::Unavailable;
    }
    RTO_MAX_MISSING.store(true, Ordering::Relaxed);
    thin_linear(&sock)
}

/// The fallback where the kernel has no `TCP_RTO_MAX_MS`: thin-stream linear timeouts, and one warning.
#[cfg(any(target_os = "linux", target_os = "android"))]
fn thin_linear(sock: &SockRef<'_>) -> RtoCap {
    match sock.set_tcp_thin_linear_timeouts(true) {
        Ok(()) => {
            if !RTO_MAX_WARNED.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    "TCP_RTO_MAX_MS is not available (it needs Linux 6.15): thin-stream linear timeouts instead, so \
                     a path that heals after more than about a second may take seconds to carry data again"
                );
            }
            RtoCap::ThinLinear
        }
        Err(e) => {
            if !RTO_MAX_WARNED.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    "neither TCP_RTO_MAX_MS nor TCP_THIN_LINEAR_TIMEOUTS ({e}) is available: the kernel's \
                     exponential retransmission backoff stands, so a blip can end in a heartbeat timeout"
                );
            }
            RtoCap::Unavailable
        }
    }
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
pub fn cap_retransmissions<'s>(_sock: impl Into<SockRef<'s>>, _cap: Duration) -> RtoCap {
    if !RTO_MAX_WARNED.swap(true, Ordering::Relaxed) {
        tracing::warn!("no retransmission ceiling on this platform: the kernel's exponential backoff stands");
    }
    RtoCap::Unavailable
}

/// The retransmission ceiling the kernel holds for `sock` (`None`: the option does not exist here).
#[cfg(any(target_os = "linux", target_os = "android"))]
pub fn rto_max<'s>(sock: impl Into<SockRef<'s>>) -> Option<Duration> {
    use std::os::fd::AsRawFd;
    let sock = sock.into();
    let mut ms: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `ms`, which is that large.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_TCP,
            TCP_RTO_MAX_MS,
            (&mut ms as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    (rc == 0 && ms > 0).then(|| Duration::from_millis(ms as u64))
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
pub fn rto_max<'s>(_sock: impl Into<SockRef<'s>>) -> Option<Duration> {
    None
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

    /// What changes once a connection's heartbeat `interval` is negotiated: the retransmission ceiling
    /// ([`RtoMax`]), and keepalive's idle time raised to one and a half intervals when that is longer (unless
    /// `keepalive_follows_heartbeat` is off), so that a connection whose heartbeat runs never sends a keepalive
    /// probe of its own (each probe would wake a mobile device's radio between two heartbeats); keepalive still
    /// probes a connection whose heartbeat stopped. `previous`: the interval they were last set for on this
    /// socket, when the heartbeat changed during the session (what is no longer wanted is undone then).
    pub fn for_heartbeat<'s>(&self, sock: impl Into<SockRef<'s>>, interval: Duration, previous: Option<Duration>) {
        let sock = sock.into();
        match (self.rto_max.for_interval(interval), previous.and_then(|p| self.rto_max.for_interval(p))) {
            (Some(cap), _) => {
                cap_retransmissions(&sock.as_fd(), cap);
            }
            // Capped before, and the new interval wants no cap: back to the kernel's own ceiling.
            (None, Some(_)) => {
                cap_retransmissions(&sock.as_fd(), KERNEL_RTO_MAX);
            }
            (None, None) => {}
        }
        let set = |p: Option<Duration>| p.and_then(|p| self.keepalive_idle_for(p));
        let idle = self.keepalive_idle_for(interval);
        if idle != set(previous) {
            // The raised idle time, or the configured one again when the interval shrank back.
            let idle = idle.or(self.keepalive.map(|k| k.idle));
            if let Some(idle) = idle {
                if let Err(e) = sock.set_tcp_keepalive(&TcpKeepalive::new().with_time(idle)) {
                    warn_once(&KEEPALIVE_WARNED, "keepalive idle time", &e);
                }
            }
        }
    }

    /// Keepalive's idle time for a heartbeat of `interval`, when it differs from the configured one.
    pub fn keepalive_idle_for(&self, interval: Duration) -> Option<Duration> {
        let k = self.keepalive.filter(|_| self.keepalive_follows_heartbeat)?;
        // The kernel counts whole seconds.
        let idle = k.idle.max(Duration::from_secs((interval * 3 / 2).as_secs_f64().ceil() as u64));
        (idle != k.idle).then_some(idle)
    }
}

/// The values the kernel reports for a socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Effective {
    pub nodelay: bool,
    pub keepalive: Option<Keepalive>,
    pub user_timeout: Option<Duration>,
    /// The retransmission ceiling on this socket; `None` where the kernel has no such option.
    pub rto_max: Option<Duration>,
}

impl fmt::Display for Effective {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "nodelay={} ", self.nodelay)?;
        match self.keepalive {
            Some(k) => write!(f, "keepalive=idle {:?}/interval {:?}/count {} ", k.idle, k.interval, k.count)?,
            None => write!(f, "keepalive=off ")?,
        }
        match self.user_timeout {
            Some(d) => write!(f, "user_timeout={d:?} ")?,
            None => write!(f, "user_timeout=kernel default ")?,
        }
        match self.rto_max {
            Some(d) => write!(f, "rto_max={d:?}"),
            None => write!(f, "rto_max=not available"),
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
    Ok(Effective {
        nodelay: sock.tcp_nodelay()?,
        keepalive,
        user_timeout: get_user_timeout(&sock),
        rto_max: rto_max(&sock.as_fd()),
    })
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
static RTO_MAX_WARNED: AtomicBool = AtomicBool::new(false);
/// The kernel refused `TCP_RTO_MAX_MS` as unknown: later sockets go straight to the fallback.
#[cfg(any(target_os = "linux", target_os = "android"))]
static RTO_MAX_MISSING: AtomicBool = AtomicBool::new(false);

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

/// The kernel's own view of one TCP socket (Linux `TCP_INFO`), in the units people read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TcpInfo {
    /// The kernel's TCP state number (1 = ESTABLISHED, 8 = CLOSE_WAIT, …).
    pub state: u8,
    /// Consecutive retransmissions on the retransmission timer (0 when data is being acknowledged).
    pub retransmits: u8,
    /// Unanswered probes: zero-window probes while data waits, keepalive probes on an idle socket.
    pub probes: u8,
    /// Smoothed round-trip time and its variation.
    pub rtt: Duration,
    pub rttvar: Duration,
    /// Segments sent and not acknowledged.
    pub unacked: u32,
    /// Retransmissions over the socket's life.
    pub total_retrans: u32,
    /// Time since data was last sent, data last received, and an acknowledgement last received.
    pub since_data_sent: Duration,
    pub since_data_recv: Duration,
    pub since_ack_recv: Duration,
    /// Bytes written and not sent yet.
    pub notsent_bytes: u32,
    /// The window the peer offers, and ours.
    pub snd_wnd: u32,
    pub rcv_wnd: u32,
    pub snd_cwnd: u32,
    pub bytes_acked: u64,
    pub bytes_received: u64,
}

/// The name of a Linux TCP state number ([`TcpInfo::state`]; `include/net/tcp_states.h`), lower case as `ss`
/// prints it; `"unknown"` for any other number.
pub fn tcp_state_name(state: u8) -> &'static str {
    match state {
        1 => "established",
        2 => "syn_sent",
        3 => "syn_recv",
        4 => "fin_wait1",
        5 => "fin_wait2",
        6 => "time_wait",
        7 => "close",
        8 => "close_wait",
        9 => "last_ack",
        10 => "listen",
        11 => "closing",
        12 => "new_syn_recv",
        _ => "unknown",
    }
}

/// `TCP_INFO` for `fd`; `None` where the platform has none or the call fails.
#[cfg(target_os = "linux")]
pub fn tcp_info(fd: std::os::fd::RawFd) -> Option<TcpInfo> {
    // SAFETY: tcp_info is plain old data; all-zero is a valid value.
    let mut i: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `i`, which is that large, and updates `len`.
    let rc = unsafe {
        libc::getsockopt(fd, libc::IPPROTO_TCP, libc::TCP_INFO, (&mut i as *mut libc::tcp_info).cast(), &mut len)
    };
    if rc != 0 {
        return None;
    }
    let us = |v: u32| Duration::from_micros(v.into());
    let ms = |v: u32| Duration::from_millis(v.into());
    Some(TcpInfo {
        state: i.tcpi_state,
        retransmits: i.tcpi_retransmits,
        probes: i.tcpi_probes,
        rtt: us(i.tcpi_rtt),
        rttvar: us(i.tcpi_rttvar),
        unacked: i.tcpi_unacked,
        total_retrans: i.tcpi_total_retrans,
        since_data_sent: ms(i.tcpi_last_data_sent),
        since_data_recv: ms(i.tcpi_last_data_recv),
        since_ack_recv: ms(i.tcpi_last_ack_recv),
        notsent_bytes: i.tcpi_notsent_bytes,
        snd_wnd: i.tcpi_snd_wnd,
        rcv_wnd: i.tcpi_rcv_wnd,
        snd_cwnd: i.tcpi_snd_cwnd,
        bytes_acked: i.tcpi_bytes_acked,
        bytes_received: i.tcpi_bytes_received,
    })
}

#[cfg(not(target_os = "linux"))]
pub fn tcp_info(_fd: i32) -> Option<TcpInfo> {
    None
}

/// What the kernel holds of our output on `fd`, for the write-progress rule (see [`tether_proto::KernelQueue`]).
pub fn kernel_queue(fd: std::os::fd::RawFd) -> Option<tether_proto::KernelQueue> {
    let i = tcp_info(fd)?;
    Some(tether_proto::KernelQueue {
        unacked: i.unacked,
        notsent: i.notsent_bytes,
        retransmitting: i.retransmits > 0,
        // Probing, or output waiting with nothing in flight: the peer's window is closed. (A peer that keeps sending
        // resets the probe count with every segment, so probes alone miss it.)
        zero_window: i.notsent_bytes > 0 && (i.probes > 0 || i.unacked == 0),
        since_ack: i.since_ack_recv,
        since_data_sent: i.since_data_sent,
    })
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
            rto_max: RtoMax::Auto,
            keepalive_follows_heartbeat: true,
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

    #[test]
    fn keepalive_waits_out_a_heartbeat_and_a_half() {
        let o = SocketOptions::default();
        let s = Duration::from_secs;
        assert_eq!(o.keepalive_idle_for(s(5)), None, "15 s already exceeds 7.5 s");
        assert_eq!(o.keepalive_idle_for(s(30)), Some(s(45)));
        assert_eq!(o.keepalive_idle_for(Duration::from_millis(10_100)), Some(s(16)), "whole seconds, rounded up");
        assert_eq!(SocketOptions { keepalive: None, ..o }.keepalive_idle_for(s(30)), None);
        let asked = SocketOptions { keepalive_follows_heartbeat: false, ..o };
        assert_eq!(asked.keepalive_idle_for(s(30)), None, "an idle time the operator asked for stays");
    }

    #[test]
    fn the_retransmission_ceiling_follows_the_interval() {
        let s = Duration::from_secs;
        assert_eq!(RtoMax::Auto.for_interval(s(5)), Some(s(1)), "the default heartbeat");
        assert_eq!(RtoMax::Auto.for_interval(Duration::from_millis(200)), Some(s(1)), "never under the floor");
        assert_eq!(RtoMax::Auto.for_interval(s(30)), Some(s(6)));
        assert_eq!(RtoMax::Auto.for_interval(s(600)), None, "a fifth of 10 min is the kernel's own ceiling");
        assert_eq!(RtoMax::Fixed(Duration::from_millis(300)).for_interval(s(5)), Some(s(1)));
        assert_eq!(RtoMax::Fixed(s(3)).for_interval(s(60)), Some(s(3)));
        assert_eq!(RtoMax::Off.for_interval(s(5)), None);
    }

    /// A heartbeat that changes during the session (the adaptive heartbeat) moves keepalive's idle time and the
    /// retransmission ceiling with it, both ways.
    #[test]
    fn a_heartbeat_that_changes_moves_keepalive_and_the_ceiling_both_ways() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let sock = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let o = SocketOptions::default();
        o.apply(&sock).unwrap();
        let s = Duration::from_secs;
        let idle = |sock: &std::net::TcpStream| read_back(sock).unwrap().keepalive.map(|k| k.idle);
        let ceiling = |sock: &std::net::TcpStream| read_back(sock).unwrap().rto_max;
        o.for_heartbeat(&sock, s(5), None);
        assert_eq!(idle(&sock), Some(s(15)));
        let capped = ceiling(&sock).is_some();
        o.for_heartbeat(&sock, s(60), Some(s(5)));
        assert_eq!(idle(&sock), Some(s(90)));
        if capped {
            assert_eq!(ceiling(&sock), Some(s(12)));
        }
        o.for_heartbeat(&sock, s(900), Some(s(60)));
        assert_eq!(idle(&sock), Some(s(1350)));
        if capped {
            assert_eq!(ceiling(&sock), Some(KERNEL_RTO_MAX), "no cap at 15 min: the kernel's own again");
        }
        o.for_heartbeat(&sock, s(5), Some(s(900)));
        assert_eq!(idle(&sock), Some(s(15)), "back to the configured idle time");
        if capped {
            assert_eq!(ceiling(&sock), Some(s(1)));
        }
    }

    /// On a kernel with `TCP_RTO_MAX_MS` (6.15+) the ceiling reads back as set; elsewhere the fallback is named.
    #[cfg(target_os = "linux")]
    #[test]
    fn the_retransmission_ceiling_reads_back_as_set() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let s = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        match cap_retransmissions(&s, Duration::from_millis(1500)) {
            RtoCap::Capped(d) => {
                assert_eq!(d, Duration::from_millis(1500));
                assert_eq!(rto_max(&s), Some(d));
                assert!(read_back(&s).unwrap().to_string().ends_with("rto_max=1.5s"));
            }
            other => {
                assert_eq!(rto_max(&s), None, "{other:?} means the option is missing");
                println!("SKIPPED: this kernel has no TCP_RTO_MAX_MS ({other:?})");
            }
        }
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn tcp_info_reads_the_kernel_view_of_a_live_socket() {
        use std::io::{Read, Write};
        use std::os::fd::AsRawFd;
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut s = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (mut peer, _) = l.accept().unwrap();
        s.write_all(b"hello").unwrap();
        let mut buf = [0u8; 5];
        peer.read_exact(&mut buf).unwrap();
        peer.write_all(b"back").unwrap();
        s.read_exact(&mut buf[..4]).unwrap();
        let i = tcp_info(s.as_raw_fd()).unwrap();
        assert_eq!(i.state, 1, "ESTABLISHED");
        assert_eq!((i.bytes_acked, i.bytes_received), (6, 4), "SYN counts as one acked byte");
        assert!(i.rtt > Duration::ZERO && i.rtt < Duration::from_secs(1));
        let q = kernel_queue(s.as_raw_fd()).unwrap();
        assert!(!q.holds_output() && q.stalled_for() == Duration::ZERO);
    }
}
