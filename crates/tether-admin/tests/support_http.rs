//! A minimal HTTP/1.1 client for the admin tests (one request per connection), a `/metrics` parser, and an
//! admin listener on port 0 over a test server.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;

use tether::ServerHandle;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Start the admin listener for `handle` on 127.0.0.1:0 as [`tether_admin::start`] does, but served on the test's
/// runtime (a paused clock must see the listener's timers, and a thread of its own would let that clock jump while
/// it works); returns its address. The listener runs until the test's runtime ends.
pub async fn start_admin(handle: ServerHandle, cfg: tether_admin::AdminConfig) -> SocketAddr {
    let listener = tether_admin::bind("127.0.0.1:0".parse().unwrap(), cfg.token.as_deref()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    handle.set_admin_addr(addr);
    tokio::spawn(tether_admin::serve(listener, tether_admin::router(handle, cfg), std::future::pending()));
    addr
}

pub struct Reply {
    pub status: u16,
    pub headers: String,
    pub body: String,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

/// One request; `token` adds `Authorization: Bearer`.
pub async fn request(addr: SocketAddr, method: &str, path: &str, body: Option<&str>, token: Option<&str>) -> Reply {
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    request_with(addr, method, path, body, &format!("Host: {addr}\r\n{auth}")).await
}

/// One request with the given header lines (each ending in CRLF; `Host` included).
pub async fn request_with(addr: SocketAddr, method: &str, path: &str, body: Option<&str>, headers: &str) -> Reply {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\n{headers}Connection: close\r\n");
    let body = body.unwrap_or("");
    req.push_str(&format!("Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len()));
    s.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.unwrap();
    let text = String::from_utf8(raw).expect("UTF-8 reply");
    let (head, body) = text.split_once("\r\n\r\n").expect("a complete reply");
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).expect("a status line");
    // Bodies of unknown length come chunked; the tests' bodies fit in one chunk or are read whole.
    let body =
        if head.to_ascii_lowercase().contains("transfer-encoding: chunked") { dechunk(body) } else { body.into() };
    Reply { status, headers: head.to_owned(), body }
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((len, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(len.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        s = &rest[n + 2..];
    }
    out
}

pub async fn get(addr: SocketAddr, path: &str) -> Reply {
    request(addr, "GET", path, None, None).await
}

/// `/metrics` as `name{labels}` → value.
pub async fn metrics(addr: SocketAddr) -> HashMap<String, f64> {
    let r = get(addr, "/metrics").await;
    assert_eq!(r.status, 200, "{}", r.body);
    parse_metrics(&r.body)
}

pub fn parse_metrics(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_owned(), v.parse().ok()?))
        })
        .collect()
}

/// A metric's value; fails when it is missing.
pub fn value(m: &HashMap<String, f64>, key: &str) -> f64 {
    *m.get(key).unwrap_or_else(|| panic!("{key} missing from /metrics"))
}
