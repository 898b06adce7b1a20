//! What the kernel says about a process and the machine: RSS, CPU time, slab memory, socket states.
//!
//! # Layout
//! Plain readers of `/proc`, and of one socket's `TCP_INFO` ([`tcp_segments`]); each returns `None` (or an error)
//! where the file or option is missing or unreadable, so a benchmark run elsewhere degrades to missing figures
//! instead of wrong ones.

use std::time::Duration;

/// Resident set size of `pid`, in bytes (VmRSS).
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// User + system CPU time used by `pid` (all its threads) so far: the process's CPU-time clock, to the
/// nanosecond, else `/proc/PID/stat` in clock ticks (10 ms).
pub fn cpu_time(pid: u32) -> Option<Duration> {
    let mut clock: libc::clockid_t = 0;
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: both pointers are to live locals of the types the calls write.
    let ok = unsafe {
        libc::clock_getcpuclockid(pid as libc::pid_t, &mut clock) == 0 && libc::clock_gettime(clock, &mut ts) == 0
    };
    if ok {
        return Some(Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32));
    }
    cpu_ticks(pid)
}

/// User + system CPU time of `pid` from `/proc/PID/stat` (clock-tick resolution).
fn cpu_ticks(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th of those.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Some(Duration::from_secs_f64(ticks as f64 / hz))
}

/// Kernel slab memory of the whole machine, in bytes (`Slab:` in /proc/meminfo). Socket structures live there;
/// on loopback both ends of every connection are on this machine, so per-connection figures include both.
pub fn slab_bytes() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("Slab:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Counts of (ESTABLISHED, CLOSE_WAIT) sockets whose local address is exactly `addr` (an IPv4 server address).
/// Matching the port alone is wrong on loopback: a client socket on another 127.x address can get the same
/// number as its ephemeral local port.
pub fn server_socket_counts(addr: std::net::SocketAddr) -> (usize, usize) {
    let std::net::SocketAddr::V4(v4) = addr else { return (0, 0) };
    // /proc/net/tcp prints the address as the 32-bit value in host (little-endian) order, then the port.
    let want = format!("{:08X}:{:04X}", u32::from_le_bytes(v4.ip().octets()), v4.port());
    let (mut est, mut cw) = (0, 0);
    let Ok(text) = std::fs::read_to_string("/proc/net/tcp") else { return (0, 0) };
    for line in text.lines().skip(1) {
        let mut cols = line.split_whitespace();
        let (Some(local), Some(state)) = (cols.nth(1), cols.nth(1)) else { continue };
        if local.eq_ignore_ascii_case(&want) {
            match state {
                "01" => est += 1,
                "08" => cw += 1,
                _ => {}
            }
        }
    }
    (est, cw)
}

/// Raise this process's open-file limit to its hard limit (children inherit it): a server under test holds one
/// descriptor per connection, and a peer such as rumqttd does not raise its own. Best effort: where it fails the
/// run goes on, and the connections beyond the limit are reported as failed.
pub fn raise_nofile() {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit and setrlimit with a pointer to a live rlimit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// Wait (at most `limit`) until the machine's TCP stack is quiet: few sockets in use and no orphans, so a
/// scenario is not measured while the kernel still tears down the previous one's connections.
pub fn wait_quiet(limit: Duration) {
    let deadline = std::time::Instant::now() + limit;
    while std::time::Instant::now() < deadline {
        let Ok(s) = std::fs::read_to_string("/proc/net/sockstat") else { return };
        let field = |name: &str| -> u64 {
            let tcp = s.lines().find(|l| l.starts_with("TCP:")).unwrap_or("");
            let words: Vec<&str> = tcp.split_whitespace().collect();
            words
                .iter()
                .position(|w| *w == name)
                .and_then(|i| words.get(i + 1))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        if field("inuse") < 100 && field("orphan") == 0 {
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// TCP segments a socket sent and received so far (`TCP_INFO`'s `tcpi_segs_out`, `tcpi_segs_in`: pure
/// acknowledgements included, wrapping at `u32::MAX`); `None` where the platform or kernel has no such count.
#[cfg(target_os = "linux")]
pub fn tcp_segments(fd: std::os::fd::RawFd) -> Option<(u32, u32)> {
    // SAFETY: tcp_info is plain old data; all-zero is a valid value.
    let mut i: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `i`, which is that large, and updates `len`.
    let rc = unsafe {
        libc::getsockopt(fd, libc::IPPROTO_TCP, libc::TCP_INFO, (&mut i as *mut libc::tcp_info).cast(), &mut len)
    };
    // A kernel older than the counts (4.2) fills less of the struct.
    let needed = std::mem::offset_of!(libc::tcp_info, tcpi_segs_in) + std::mem::size_of::<u32>();
    (rc == 0 && len as usize >= needed).then_some((i.tcpi_segs_out, i.tcpi_segs_in))
}

#[cfg(not(target_os = "linux"))]
pub fn tcp_segments(_fd: i32) -> Option<(u32, u32)> {
    None
}

/// Microseconds since the Unix epoch: the clock shared by coordinator and workers (separate processes).
pub fn epoch_us() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let me = std::process::id();
        assert!(rss_bytes(me).unwrap() > 100_000);
        // The CPU clock moves while this thread spins (finer than /proc's 10 ms ticks).
        let t0 = cpu_time(me).unwrap();
        let started = std::time::Instant::now();
        while cpu_time(me).unwrap() < t0 + Duration::from_millis(3) {
            assert!(started.elapsed() < Duration::from_secs(10), "the CPU clock did not move");
        }
        assert!(cpu_ticks(me).is_some());
        assert!(slab_bytes().unwrap() > 0);
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let client = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (server, _) = l.accept().unwrap();
        let _ = port;
        assert_eq!(server_socket_counts(l.local_addr().unwrap()), (1, 0));
        // Segments move with traffic: the handshake's at least, then one more each way per write and its answer.
        {
            use std::io::{Read, Write};
            use std::os::fd::AsRawFd;
            let (out0, in0) = tcp_segments(client.as_raw_fd()).unwrap();
            (&client).write_all(b"ping").unwrap();
            let mut got = [0u8; 4];
            (&server).read_exact(&mut got).unwrap();
            (&server).write_all(b"pong").unwrap();
            (&client).read_exact(&mut got).unwrap();
            let (out1, in1) = tcp_segments(client.as_raw_fd()).unwrap();
            assert!(out1 > out0 && in1 > in0, "segments out {out0}→{out1}, in {in0}→{in1}");
        }
        // A different address with the same port number is not the server.
        let other = std::net::SocketAddr::from(([127, 0, 1, 1], l.local_addr().unwrap().port()));
        assert_eq!(server_socket_counts(other), (0, 0));
        wait_quiet(Duration::from_millis(10));
    }
}
