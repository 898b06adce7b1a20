//! Heap bytes the server holds per idle connection, counted by a wrapping global allocator.
//!
//! `cargo run --release -p tether --example heap_per_conn [N]`: starts a server in this process, opens N loopback
//! connections from plain blocking sockets (which allocate next to nothing on the client side), completes each
//! handshake, and prints live heap bytes and allocations per connection. RSS also counts allocator slack and
//! fragmentation; this counts only what is asked for.
//!
//! Then it opens N slowloris connections that trickle the first 40 bytes of a `HELLO` one byte at a time, and
//! prints what each of those costs: the server buffers only the incomplete frame's bytes, so a slowloris costs
//! no more than an idle connection (the handshake timeout is raised to 60 s here so that none expires during
//! the measurement).
//!
//! Last, it opens N idle TLS connections (TLS 1.3, from `DevPki` certificates) to a second server in this process,
//! on a runtime of its own whose threads alone are counted from then on: the rustls clients on this thread are not.

use std::io::Write;
use std::time::Duration;

use bytes::Bytes;
use tether::proto::frame::{Hello, PROTOCOL_VERSION};
use tether::proto::Frame;
use tether::{Server, ServerConfig};

#[path = "../tests/support/counting.rs"]
mod counting;
#[path = "../tests/support/idle_heap.rs"]
mod idle_heap;
use counting::live;

/// Wait until `handle` counts `online` sessions, then `settle` more for the tasks to go idle.
fn wait_online(handle: &tether::ServerHandle, online: usize, settle: Duration) {
    while handle.stats().online < online {
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(settle);
}

/// Print the heap and allocations per connection between two readings.
fn report(what: &str, n: usize, before: (isize, isize), after: (isize, isize)) {
    println!(
        "{n} {what}: {:.0} heap bytes and {:.1} allocations per connection",
        (after.0 - before.0) as f64 / n as f64,
        (after.1 - before.1) as f64 / n as f64
    );
}

/// An encoded `HELLO` for `id`.
fn hello(id: &str, nonce: u64) -> Bytes {
    Frame::Hello(Hello::new(PROTOCOL_VERSION, id, nonce)).to_bytes()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let n: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(2000);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut cfg =
        ServerConfig { listen: "127.0.0.1:0".parse().unwrap(), max_connections: n + 10, ..Default::default() };
    cfg.max_handshakes = n + 10;
    // Every measured connection comes from this one address.
    cfg.max_handshakes_per_ip = Some(n + 10);
    cfg.max_connections = 2 * n + 10;
    cfg.conn.handshake_timeout = Duration::from_secs(60);
    let server = rt.block_on(Server::bind(cfg)).unwrap();
    let addr = server.local_addr().unwrap();
    let handle = server.handle();
    rt.spawn(server.run(std::future::pending()));
    // Warm up: one connection, so lazily built server structures are not charged to the measured ones.
    let mut peers = vec![connect(addr, "warmup")];
    std::thread::sleep(Duration::from_millis(200));
    let before = live();
    for i in 0..n {
        peers.push(connect(addr, &format!("dev-{i}")));
    }
    wait_online(&handle, n + 1, Duration::from_millis(500));
    let idle = live();
    report("idle connections", n, before, idle);

    // Slowloris: each connection trickles a HELLO, one byte per round, every connection per round.
    let hello = hello("slow-loris-with-a-long-enough-id-to-trickle", 2);
    const TRICKLED: usize = 40;
    assert!(hello.len() > TRICKLED, "the HELLO must stay incomplete");
    let mut slow: Vec<std::net::TcpStream> = (0..n).map(|_| std::net::TcpStream::connect(addr).unwrap()).collect();
    for s in &slow {
        s.set_nodelay(true).unwrap();
    }
    std::thread::sleep(Duration::from_millis(300));
    let connected = live();
    for i in 0..TRICKLED {
        for s in &mut slow {
            s.write_all(&hello[i..i + 1]).unwrap();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(500));
    let trickled = live();
    report(&format!("slowloris connections ({TRICKLED} bytes of a HELLO, one at a time)"), n, idle, trickled);
    report("slowloris connections, for the trickled bytes alone", n, connected, trickled);
    assert_eq!(handle.stats().online, n + 1, "no slowloris got in");
    drop(slow);
    drop(peers);

    // TLS: a second server, on a runtime whose threads are the only ones counted from now on.
    let pki = tether::DevPki::generate(&["127.0.0.1"], "client").unwrap();
    let trt = tokio::runtime::Builder::new_multi_thread()
        .on_thread_start(counting::count_only_this_thread)
        .enable_all()
        .build()
        .unwrap();
    let mut tcfg = ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        max_connections: n + 10,
        max_handshakes: n + 10,
        ..Default::default()
    };
    tcfg.heartbeat.interval = Duration::from_secs(60);
    tcfg.heartbeat.timeout = Duration::from_secs(180);
    tcfg.tls = Some(tether::ServerTls::from_pem(pki.server_cert.as_bytes(), pki.server_key.as_bytes(), None).unwrap());
    let tserver = trt.block_on(Server::bind(tcfg)).unwrap();
    let taddr = tserver.local_addr().unwrap();
    let thandle = tserver.handle();
    trt.spawn(tserver.run(std::future::pending()));
    let client = idle_heap::tls_client(&pki);
    let mut buf = Vec::new();
    // One connection first, so lazily built state is not charged.
    let mut held = vec![idle_heap::open_tls(taddr, &client, "tls-warmup", &mut buf)];
    wait_online(&thandle, 1, Duration::from_millis(300));
    let before = live();
    held.extend((0..n).map(|i| idle_heap::open_tls(taddr, &client, &format!("tls-{i}"), &mut buf)));
    wait_online(&thandle, n + 1, Duration::from_millis(500));
    report("idle TLS connections", n, before, live());
    drop(held);
}

fn connect(addr: std::net::SocketAddr, id: &str) -> std::net::TcpStream {
    idle_heap::hello(std::net::TcpStream::connect(addr).unwrap(), id, &mut Vec::new())
}
