//! Shared by the process-based cluster tests (`cluster.rs`, `convergence.rs`): `tether serve --cluster` nodes
//! on loopback ports, what Redis and each node's admin API say is held, and small clients for the test process.
#![allow(dead_code)]

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde_json::Value;
use tether::proto::frame::{self, Hello};
use tether::proto::Frame;
use tether::{ClientConfig, LinkEvent, ReconnectingClient, ResilienceConfig};
use tether_bench::redis::Redis;

use crate::common::{event, Proc};

pub const LEASE: Duration = Duration::from_secs(3);
pub const PATIENCE: Duration = Duration::from_secs(30);

/// Skip the calling test loudly when `redis-server` is not installed.
macro_rules! redis_or_skip {
    ($name:expr) => {
        if let Some(why) = tether_bench::redis::unavailable() {
            eprintln!("\n*** SKIPPED cluster test {}: {why} ***\n", $name);
            println!("SKIPPED: {} ({why})", $name);
            return;
        }
    };
}

pub struct Node {
    pub proc: Proc,
    /// The `--node-id`.
    pub id: String,
    pub addr: String,
    pub admin: String,
}

/// `tether serve --cluster` on ephemeral loopback ports, heartbeat 1 s / 3 s, lease 3 s.
pub fn node(redis: &Redis, id: &str, extra: &[&str]) -> Node {
    node_on(redis, id, "127.0.0.1:0", extra)
}

/// [`node`] listening on `listen` (a node restarted on the port its previous process was given).
pub fn node_on(redis: &Redis, id: &str, listen: &str, extra: &[&str]) -> Node {
    let url = redis.url();
    let mut args = vec!["serve", "--listen", listen, "--admin", "127.0.0.1:0", "--events", "json"];
    args.extend_from_slice(&["--insecure-no-auth", "--heartbeat-interval", "1s", "--heartbeat-timeout", "3s"]);
    args.extend_from_slice(&["--cluster", &url, "--node-id", id, "--node-lease", "3s", "--max-connections", "2000"]);
    // Every test client comes from 127.0.0.1: room for all their handshakes at once.
    args.extend_from_slice(&["--max-handshakes-per-ip", "1000"]);
    args.extend_from_slice(extra);
    let proc = Proc::spawn(&args);
    let l = proc.expect("listening", |v| event(v) == "listening");
    Node {
        id: id.to_owned(),
        addr: l["addr"].as_str().unwrap().into(),
        admin: l["admin"].as_str().unwrap().into(),
        proc,
    }
}

/// Every id a node holds, from its admin API (all pages).
pub fn sessions_of(n: &Node) -> Vec<String> {
    let admin = n.admin.parse().unwrap();
    let mut out = Vec::new();
    let mut after = String::new();
    loop {
        let path = if after.is_empty() {
            "/v1/sessions?limit=1000".to_owned()
        } else {
            format!("/v1/sessions?limit=1000&after={after}")
        };
        let page: Value = serde_json::from_str(&tether_bench::scrape::get(admin, &path).unwrap()).unwrap();
        for s in page["sessions"].as_array().unwrap() {
            out.push(s["client"].as_str().unwrap().to_owned());
        }
        match page["next"].as_str() {
            Some(n) => after = n.to_owned(),
            None => return out,
        }
    }
}

/// Every id Redis says is held, with its node (empty when the hash has none), read in one script so that the
/// answer is one moment's.
pub fn holders(redis: &Redis) -> HashMap<String, String> {
    const ALL: &str = "local out = {} \
        for _, k in ipairs(redis.call('KEYS', 'tether:id:*')) do \
          out[#out + 1] = k; out[#out + 1] = redis.call('HGET', k, 'node') or '' \
        end \
        return out";
    let text = redis.cli(&["EVAL", ALL, "0"]);
    let lines: Vec<&str> = text.split('\n').collect();
    if lines.len() < 2 {
        return HashMap::new();
    }
    lines
        .chunks(2)
        .filter(|kv| kv.len() == 2)
        .map(|kv| (kv[0].trim_start_matches("tether:id:").to_owned(), kv[1].trim().to_owned()))
        .collect()
}

/// Poll `cond` until it holds; fails after [`PATIENCE`].
pub async fn until(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A device whose connection stays open and silent, like a hung client: `HELLO` asking a 60 s heartbeat, then
/// nothing. Returns the socket after `WELCOME`.
pub async fn hung_device(addr: &str, id: &str, nonce: u64) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut hello = Hello::new(frame::V1, id, nonce);
    hello.heartbeat_ms = 60_000;
    s.write_all(&Frame::Hello(hello).to_bytes()).await.unwrap();
    match read_frame(&mut s).await {
        Some(Frame::Welcome(_)) => s,
        other => panic!("expected WELCOME, got {other:?}"),
    }
}

/// The next v1 frame on `s`; `None` at the end of the stream.
pub async fn read_frame(s: &mut tokio::net::TcpStream) -> Option<Frame> {
    use tokio::io::AsyncReadExt;
    let mut header = [0u8; 4];
    s.read_exact(&mut header).await.ok()?;
    let len = u32::from_be_bytes(header) as usize;
    assert!((1..=frame::DEFAULT_MAX_FRAME as usize).contains(&len), "bad frame length {len}");
    let mut whole = header.to_vec();
    whole.resize(4 + len, 0);
    s.read_exact(&mut whole[4..]).await.ok()?;
    Some(Frame::parse(&whole).unwrap())
}

pub fn resilient(id: &str, servers: &[&str]) -> ReconnectingClient {
    let mut c = ClientConfig::new(id);
    c.nonce = Some(rand_nonce(id));
    let mut res = ResilienceConfig::default();
    res.reconnect.backoff.initial = Duration::from_millis(200);
    ReconnectingClient::start(servers.iter().map(|s| s.to_string()).collect(), c, res)
}

pub fn rand_nonce(id: &str) -> u64 {
    id.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3))
}

/// Wait for a reconnecting client's next `Connected`; its server.
pub async fn connected(c: &mut ReconnectingClient) -> String {
    loop {
        match tokio::time::timeout(PATIENCE, c.next_event()).await.expect("no reconnect").expect("ended") {
            LinkEvent::Connected { server, .. } => return server,
            LinkEvent::GaveUp { .. } => panic!("gave up"),
            _ => {}
        }
    }
}
