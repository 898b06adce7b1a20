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

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::{Read, Write};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use tether::proto::frame::{Hello, PROTOCOL_VERSION};
use tether::proto::Frame;
use tether::{Server, ServerConfig};

struct Counting;
static LIVE_BYTES: AtomicIsize = AtomicIsize::new(0);
static LIVE_ALLOCS: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE_BYTES.fetch_add(layout.size() as isize, Ordering::Relaxed);
        LIVE_ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE_BYTES.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        LIVE_ALLOCS.fetch_sub(1, Ordering::Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE_BYTES.fetch_add(new_size as isize - layout.size() as isize, Ordering::Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn main() {
    let n: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(2000);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut cfg =
        ServerConfig { listen: "127.0.0.1:0".parse().unwrap(), max_connections: n + 10, ..Default::default() };
    cfg.max_handshakes = n + 10;
    cfg.max_connections = 2 * n + 10;
    cfg.conn.handshake_timeout = Duration::from_secs(60);
    let server = rt.block_on(Server::bind(cfg)).unwrap();
    let addr = server.local_addr().unwrap();
    let handle = server.handle();
    rt.spawn(server.run(std::future::pending()));
    // Warm up: one connection, so lazily built server structures are not charged to the measured ones.
    let mut peers = vec![connect(addr, "warmup")];
    std::thread::sleep(Duration::from_millis(200));
    let (b0, a0) = (LIVE_BYTES.load(Ordering::Relaxed), LIVE_ALLOCS.load(Ordering::Relaxed));
    for i in 0..n {
        peers.push(connect(addr, &format!("dev-{i}")));
    }
    while handle.online() < n + 1 {
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(500));
    let (b1, a1) = (LIVE_BYTES.load(Ordering::Relaxed), LIVE_ALLOCS.load(Ordering::Relaxed));
    println!(
        "{n} idle connections: {:.0} heap bytes and {:.1} allocations per connection",
        (b1 - b0) as f64 / n as f64,
        (a1 - a0) as f64 / n as f64
    );

    // Slowloris: each connection trickles a HELLO, one byte per round, every connection per round.
    let hello = Frame::Hello(Hello {
        version: PROTOCOL_VERSION,
        heartbeat_ms: 0,
        nonce: 2,
        client_id: "slow-loris-with-a-long-enough-id-to-trickle".into(),
        credential: Bytes::new(),
    })
    .to_bytes();
    const TRICKLED: usize = 40;
    assert!(hello.len() > TRICKLED, "the HELLO must stay incomplete");
    let mut slow: Vec<std::net::TcpStream> = (0..n).map(|_| std::net::TcpStream::connect(addr).unwrap()).collect();
    for s in &slow {
        s.set_nodelay(true).unwrap();
    }
    std::thread::sleep(Duration::from_millis(300));
    let (b2, a2) = (LIVE_BYTES.load(Ordering::Relaxed), LIVE_ALLOCS.load(Ordering::Relaxed));
    for i in 0..TRICKLED {
        for s in &mut slow {
            s.write_all(&hello[i..i + 1]).unwrap();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(500));
    let (b3, a3) = (LIVE_BYTES.load(Ordering::Relaxed), LIVE_ALLOCS.load(Ordering::Relaxed));
    println!(
        "{n} slowloris connections ({TRICKLED} bytes of a HELLO, one at a time): {:.0} heap bytes and {:.1} \
         allocations per connection, of which {:.0} bytes and {:.1} allocations hold the trickled bytes",
        (b3 - b1) as f64 / n as f64,
        (a3 - a1) as f64 / n as f64,
        (b3 - b2) as f64 / n as f64,
        (a3 - a2) as f64 / n as f64,
    );
    assert_eq!(handle.online(), n + 1, "no slowloris got in");
    drop(slow);
    drop(peers);
}

fn connect(addr: std::net::SocketAddr, id: &str) -> std::net::TcpStream {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    let hello =
        Hello { version: PROTOCOL_VERSION, heartbeat_ms: 0, nonce: 1, client_id: id.into(), credential: Bytes::new() };
    s.write_all(&Frame::Hello(hello).to_bytes()).unwrap();
    let mut buf = [0u8; 64];
    let _ = s.read(&mut buf).unwrap(); // WELCOME
    s
}
