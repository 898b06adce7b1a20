//! What one `/metrics` scrape allocates and how long it takes, and that neither grows with connections.
//!
//! `cargo run --release -p tether-admin --example scrape_alloc [SIZES...]` (default sizes: 100 1000): starts a
//! tether server in this process, connects in-process `tether::Client`s up to each size (two sockets each:
//! this process holds both ends), waits until they are online, then calls [`tether_admin::prom::render`] 100
//! times and prints the allocations, bytes allocated and time per call, under a counting global allocator. It
//! also prints the same for [`tether::ServerHandle::metrics`] alone (the snapshot the render encodes).
//!
//! A scrape reads the server's atomics and two counts from the session hub (under its lock), so its cost should
//! be the same at every size; the last line says whether it was.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tether::{Client, ClientConfig, Server, ServerConfig, ServerHandle};

/// Counts every allocation (a `realloc` counts as one, of its new size) and the bytes asked for.
struct Counting;
static ALLOCS: AtomicU64 = AtomicU64::new(0);
static BYTES: AtomicU64 = AtomicU64::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        BYTES.fetch_add(layout.size() as u64, Ordering::Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        BYTES.fetch_add(layout.size() as u64, Ordering::Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        BYTES.fetch_add(new_size as u64, Ordering::Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Calls per measurement.
const CALLS: u32 = 100;

/// Per call of `f`, over [`CALLS`] calls: (allocations, bytes allocated, µs). Other threads (the runtime's, the
/// clients' heartbeats) allocate too and are counted: the result is the least of three rounds, and the runtime
/// is idle between heartbeats.
fn per_call<T>(mut f: impl FnMut() -> T) -> (f64, f64, f64) {
    let mut best = (f64::MAX, f64::MAX, f64::MAX);
    for _ in 0..3 {
        let (a0, b0) = (ALLOCS.load(Ordering::Relaxed), BYTES.load(Ordering::Relaxed));
        let t0 = Instant::now();
        for _ in 0..CALLS {
            std::hint::black_box(f());
        }
        let us = t0.elapsed().as_secs_f64() * 1e6 / f64::from(CALLS);
        let (a1, b1) = (ALLOCS.load(Ordering::Relaxed), BYTES.load(Ordering::Relaxed));
        let n = f64::from(CALLS);
        best = (best.0.min((a1 - a0) as f64 / n), best.1.min((b1 - b0) as f64 / n), best.2.min(us));
    }
    best
}

/// Connect clients `from..to` (a batch at a time) and keep them.
async fn connect(addr: std::net::SocketAddr, from: usize, to: usize, clients: &mut Vec<Client>) {
    const BATCH: usize = 100;
    let mut i = from;
    while i < to {
        let end = (i + BATCH).min(to);
        let batch: Vec<_> = (i..end)
            .map(|k| {
                let mut cfg = ClientConfig::new(format!("scrape-{k}"));
                cfg.heartbeat_interval = Some(Duration::from_secs(5));
                tokio::spawn(Client::connect(addr, cfg))
            })
            .collect();
        for b in batch {
            clients.push(b.await.expect("connect task").expect("connect"));
        }
        i = end;
    }
}

fn wait_online(handle: &ServerHandle, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while handle.stats().online < n {
        assert!(Instant::now() < deadline, "only {} of {n} clients online", handle.stats().online);
        std::thread::sleep(Duration::from_millis(10));
    }
    // Let the handshakes' own allocations finish before counting.
    std::thread::sleep(Duration::from_millis(500));
}

fn main() {
    let mut sizes: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    if sizes.is_empty() {
        sizes = vec![100, 1000];
    }
    sizes.sort_unstable();
    let most = *sizes.last().expect("a size");
    // Both ends of every connection are in this process: stay far below the descriptor limit.
    assert!(most <= 5000, "at most 5000 clients (two descriptors each, in this one process)");
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let mut cfg = ServerConfig { listen: "127.0.0.1:0".parse().unwrap(), ..Default::default() };
    cfg.max_connections = most + 100;
    cfg.max_handshakes = most + 100;
    // Every client comes from this one address.
    cfg.max_handshakes_per_ip = Some(most + 100);
    assert!(cfg.metrics, "metrics are on by default");
    let server = rt.block_on(Server::bind(cfg)).unwrap();
    let addr = server.local_addr().unwrap();
    let handle = server.handle();
    rt.spawn(server.run(std::future::pending()));

    println!("/metrics render (tether_admin::prom::render), mean of {CALLS} calls, least of 3 rounds:");
    let mut clients = Vec::new();
    let mut results = Vec::new();
    for &n in &sizes {
        rt.block_on(connect(addr, clients.len(), n, &mut clients));
        wait_online(&handle, n);
        let body = tether_admin::prom::render(&handle).expect("render");
        assert!(body.contains("tether_sessions_online "), "{body}");
        let render = per_call(|| tether_admin::prom::render(&handle).expect("render"));
        let snapshot = per_call(|| handle.metrics());
        println!(
            "  {n:>5} clients online: render {:.1} allocations, {:.0} bytes allocated, {:.1} µs per call \
             (snapshot alone: {:.1} allocations, {:.0} bytes, {:.1} µs); body {} bytes",
            render.0,
            render.1,
            render.2,
            snapshot.0,
            snapshot.1,
            snapshot.2,
            body.len()
        );
        results.push((n, render));
    }
    let (first, last) = (results[0], results[results.len() - 1]);
    let flat = last.1 .0 <= first.1 .0 * 1.05 && last.1 .1 <= first.1 .1 * 1.05;
    println!(
        "from {} to {} clients: allocations per render {:.1} -> {:.1}, bytes {:.0} -> {:.0}, time {:.1} -> {:.1} µs: {}",
        first.0,
        last.0,
        first.1 .0,
        last.1 .0,
        first.1 .1,
        last.1 .1,
        first.1 .2,
        last.1 .2,
        if flat { "allocation does not grow with connections" } else { "allocation GROWS with connections" }
    );
    drop(clients);
}
