//! What an idle TLS connection costs the server in heap, counted by a global allocator on the server's runtime
//! thread only: the TLS clients (rustls, on this test's thread) allocate too, and are not counted. A regression
//! guard beside `tests/heap.rs` (BENCHMARKS.md, "TLS: what rustls keeps per idle connection").

use tether::{DevPki, ServerConfig, ServerTls};

#[path = "support/counting.rs"]
mod counting;
#[path = "support/idle_heap.rs"]
mod idle_heap;

/// Heap per idle TLS 1.3 connection on the server, measured at the time of writing (rustc 1.95, rustls 0.23):
/// 3,074 bytes in 9.2 allocations at 4,000 connections (`heap_per_conn`, release), of which about 2,350 are
/// rustls's own state (BENCHMARKS.md); this test's 128 measure 3,213–3,226 bytes in 11–12 allocations in a debug build.
/// The bound leaves room for the maps' and the slab's growth steps; ring's expanded keys (1 KB more) exceed it.
const MAX_HEAP_PER_CONNECTION: isize = 3_400;
const MAX_ALLOCS_PER_CONNECTION: isize = 13;

#[test]
fn an_idle_tls_connection_costs_the_server_no_more_heap_than_measured() {
    // 128 sessions: the client and server ends fit under the usual 1,024-descriptor soft limit, and a debug
    // build's handshakes stay quick.
    const N: usize = 128;
    let pki = DevPki::generate(&["127.0.0.1"], "client").unwrap();
    let tls = ServerTls::from_pem(pki.server_cert.as_bytes(), pki.server_key.as_bytes(), None).unwrap();
    let cfg = ServerConfig { tls: Some(tls), ..Default::default() };
    let client = idle_heap::tls_client(&pki);
    let (bytes, allocs) =
        idle_heap::per_idle_session(cfg, N, true, |addr, id, buf| idle_heap::open_tls(addr, &client, id, buf));
    println!("{N} idle TLS connections: {bytes} heap bytes and {allocs} allocations each");
    // The count is the server's alone: a plain connection's heap is about 710 B, rustls's part well over 1 KB.
    assert!(bytes > 1_500, "{bytes} heap bytes per idle TLS connection: the server's allocations were not counted");
    assert!(bytes <= MAX_HEAP_PER_CONNECTION, "{bytes} heap bytes per idle TLS connection");
    assert!(allocs <= MAX_ALLOCS_PER_CONNECTION, "{allocs} allocations per idle TLS connection");
}
