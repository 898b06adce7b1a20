//! What an idle connection costs the server in heap, counted by a global allocator: a regression guard for the
//! event loop's promise (BENCHMARKS.md, "Memory"). The clients are blocking std sockets on this test's thread,
//! which allocate nothing; the server runs on a one-worker runtime (one event loop) beside them.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use tether::proto::frame::{self, Hello, PROTOCOL_VERSION};
use tether::proto::Frame;
use tether::{Server, ServerConfig};

#[path = "support/counting.rs"]
mod counting;
use counting::live;

/// Read one whole frame from a blocking socket into `buf` (kept by the caller, so nothing is allocated here
/// once it has grown).
fn next_frame(s: &mut TcpStream, buf: &mut Vec<u8>) -> Frame {
    loop {
        if let Some(n) = frame::check(buf, 1 << 20).unwrap() {
            let f = Frame::parse(&buf[..n]).unwrap();
            buf.drain(..n);
            return f;
        }
        let mut chunk = [0u8; 256];
        let got = s.read(&mut chunk).unwrap();
        assert!(got > 0, "the server closed a connection");
        buf.extend_from_slice(&chunk[..got]);
    }
}

/// Open a session `id`: `HELLO`, then its `WELCOME`.
fn open(addr: SocketAddr, id: &str, buf: &mut Vec<u8>) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(&Frame::Hello(Hello::new(PROTOCOL_VERSION, id, 1)).to_bytes()).unwrap();
    assert!(matches!(next_frame(&mut s, buf), Frame::Welcome(_)));
    s
}

/// Heap per idle connection, measured at the time of writing (rustc 1.95): 724 bytes in 2 allocations at 4,000
/// connections (`heap_per_conn`, release), 709 at this test's 256 (debug). The bound leaves room for the hash
/// maps' and the slab's growth steps, which fall differently at other sizes.
const MAX_HEAP_PER_CONNECTION: isize = 800;
const MAX_ALLOCS_PER_CONNECTION: isize = 3;

#[test]
fn an_idle_connection_costs_the_server_no_more_heap_than_measured() {
    // 256 sessions: the client and server ends fit under the usual 1,024-descriptor soft limit.
    const N: usize = 256;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let mut cfg = ServerConfig { listen: "127.0.0.1:0".parse().unwrap(), ..Default::default() };
    cfg.max_handshakes_per_ip = Some(N + 10);
    // No heartbeat or probe falls inside the measurement.
    cfg.heartbeat.interval = Duration::from_secs(60);
    cfg.heartbeat.timeout = Duration::from_secs(180);
    let server = rt.block_on(Server::bind(cfg)).unwrap();
    let addr = server.local_addr().unwrap();
    rt.spawn(server.run(std::future::pending()));
    let mut buf = Vec::with_capacity(4096);
    let mut peers = Vec::with_capacity(N);
    // One session first, so that what the server builds once (its loop's buffers, the maps' first tables) is not
    // charged to the measured ones; it leaves again before the measurement, freeing its slot for the first.
    drop(open(addr, "warmup", &mut buf));
    let before = live();
    for i in 0..N {
        peers.push(open(addr, &format!("device-{i:04}"), &mut buf));
    }
    // A round trip on the last connection: the one event loop has finished with every connection before it.
    let last = peers.last_mut().unwrap();
    last.write_all(&Frame::Ping { seq: 1, ts_ms: 0 }.to_bytes()).unwrap();
    while !matches!(next_frame(last, &mut buf), Frame::Pong { .. }) {}
    let after = live();
    let (bytes, allocs) = ((after.0 - before.0) / N as isize, (after.1 - before.1) / N as isize);
    println!("{N} idle connections: {bytes} heap bytes and {allocs} allocations each");
    assert!(bytes <= MAX_HEAP_PER_CONNECTION, "{bytes} heap bytes per idle connection");
    assert!(allocs <= MAX_ALLOCS_PER_CONNECTION, "{allocs} allocations per idle connection");
    drop(peers);
    rt.shutdown_timeout(Duration::from_secs(1));
}
