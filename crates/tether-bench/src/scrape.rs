//! `GET /metrics` from a tether server's admin listener, timed: what one Prometheus scrape costs.
//!
//! # Layout
//! [`request`] (and [`get`] for a 200 body) is a minimal HTTP/1.1 client on a blocking [`TcpStream`] (one
//! request per connection, `Connection: close`, a `Content-Length` or chunked body); `tether sockets` and the CLI
//! tests use it too. [`measure`] scrapes a number of times back to back and returns
//! the wall-clock latencies and the server's CPU per scrape.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::sys;

/// A series every scrape must carry: the snapshot lists every close reason from the start, zero included.
pub const MUST_CONTAIN: &str = "tether_disconnects_total{reason=\"heartbeat_timeout\"}";

/// What [`measure`] found.
#[derive(Debug, Clone)]
pub struct Scrapes {
    pub ms_p50: f64,
    pub ms_max: f64,
    /// The server's CPU time per scrape, its background rate (`background_cpu`) subtracted; `None` where /proc
    /// or the background rate is unavailable.
    pub cpu_ms: Option<f64>,
    /// The last body's size.
    pub bytes: usize,
}

/// `count` scrapes of `http://{admin}/metrics`, one after another, each on a new connection. `pid` is the
/// server's, and `background_cpu` its CPU seconds per second without scrapes (the heartbeats go on meanwhile).
pub fn measure(admin: SocketAddr, pid: u32, count: usize, background_cpu: Option<f64>) -> anyhow::Result<Scrapes> {
    let mut ms = Vec::with_capacity(count);
    let mut bytes = 0;
    let cpu0 = sys::cpu_time(pid);
    let t0 = Instant::now();
    for _ in 0..count.max(1) {
        let t = Instant::now();
        let body = get(admin, "/metrics")?;
        ms.push(t.elapsed().as_secs_f64() * 1000.0);
        if !body.contains(MUST_CONTAIN) {
            bail!("GET /metrics from {admin} has no {MUST_CONTAIN} ({} bytes)", body.len());
        }
        bytes = body.len();
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let cpu1 = sys::cpu_time(pid);
    let cpu_ms = cpu0.zip(cpu1).zip(background_cpu).map(|((a, b), bg)| {
        let used = (b - a).as_secs_f64() - bg * elapsed;
        used.max(0.0) / ms.len() as f64 * 1000.0
    });
    ms.sort_by(f64::total_cmp);
    Ok(Scrapes { ms_p50: ms[(ms.len() - 1) / 2], ms_max: ms[ms.len() - 1], cpu_ms, bytes })
}

/// One `GET path` over HTTP/1.1; the body of a 200 answer.
pub fn get(addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    match request(addr, "GET", path, None)? {
        (200, body) => Ok(body),
        (status, body) => bail!("GET {path} from {addr}: {status} {}", body.trim()),
    }
}

/// One request over HTTP/1.1 (a JSON `body` for methods that carry one): the status and the body.
pub fn request(addr: SocketAddr, method: &str, path: &str, body: Option<&str>) -> anyhow::Result<(u16, String)> {
    request_with(addr, method, path, body, None, Duration::from_secs(10))
}

/// [`request`] with `Authorization: Bearer TOKEN` when `bearer` is given, waiting at most `wait` for the answer.
pub fn request_with(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
    bearer: Option<&str>,
    wait: Duration,
) -> anyhow::Result<(u16, String)> {
    let mut s =
        TcpStream::connect_timeout(&addr, Duration::from_secs(5)).with_context(|| format!("connecting to {addr}"))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(wait))?;
    // One write: `write!` on a socket would send each formatted piece as a segment of its own.
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: */*\r\nConnection: close\r\n");
    if let Some(token) = bearer {
        req.push_str(&format!("Authorization: Bearer {token}\r\n"));
    }
    if let Some(b) = body {
        req.push_str(&format!("Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}", b.len()));
    } else {
        req.push_str("\r\n");
    }
    s.write_all(req.as_bytes())?;
    let mut raw = Vec::with_capacity(32 * 1024);
    if let Err(e) = s.read_to_end(&mut raw) {
        if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) {
            bail!("{method} {path} to {addr}: no answer within {wait:?}");
        }
        return Err(e).with_context(|| format!("reading {method} {path} from {addr}"));
    }
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").context("no end of headers")?;
    let head = std::str::from_utf8(&raw[..split]).context("headers are not UTF-8")?;
    let mut body = raw[split + 4..].to_vec();
    let status_line = head.lines().next().unwrap_or("");
    let status = status_line.split_whitespace().nth(1).and_then(|s| s.parse().ok());
    let status = status.with_context(|| format!("{method} {path} from {addr}: no status in {status_line:?}"))?;
    let header = |name: &str| {
        head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim().to_ascii_lowercase())
        })
    };
    if header("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        body = dechunk(&body)?;
    } else if let Some(len) = header("content-length") {
        let len: usize = len.parse().context("content-length")?;
        if body.len() != len {
            bail!("{method} {path}: {} body bytes, content-length {len}", body.len());
        }
    }
    Ok((status, String::from_utf8(body).context("the body is not UTF-8")?))
}

/// A chunked body, decoded.
fn dechunk(mut b: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(b.len());
    loop {
        let eol = b.windows(2).position(|w| w == b"\r\n").context("truncated chunk size")?;
        let size = std::str::from_utf8(&b[..eol])?.split(';').next().unwrap_or("").trim();
        let n = usize::from_str_radix(size, 16).context("chunk size")?;
        b = &b[eol + 2..];
        if n == 0 {
            return Ok(out);
        }
        if b.len() < n + 2 {
            bail!("truncated chunk");
        }
        out.extend_from_slice(&b[..n]);
        b = &b[n + 2..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_bodies_are_decoded() {
        assert_eq!(dechunk(b"5\r\nhello\r\n7;x=y\r\n, world\r\n0\r\n\r\n").unwrap(), b"hello, world");
        assert!(dechunk(b"5\r\nhel").is_err());
    }

    #[test]
    fn a_get_reads_status_headers_and_body() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            for answer in ["HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", "HTTP/1.1 401 Unauthorized\r\n\r\n"] {
                let (mut s, _) = l.accept().unwrap();
                let mut req = [0u8; 1024];
                let n = s.read(&mut req).unwrap();
                assert!(std::str::from_utf8(&req[..n]).unwrap().starts_with("GET /metrics HTTP/1.1\r\n"));
                s.write_all(answer.as_bytes()).unwrap();
            }
        });
        assert_eq!(get(addr, "/metrics").unwrap(), "ok");
        assert!(get(addr, "/metrics").unwrap_err().to_string().contains("401"));
        server.join().unwrap();
    }
}
