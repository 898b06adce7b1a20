//! What an idle connection costs the server in heap, counted by a global allocator: a regression guard for the
//! event loop's promise (BENCHMARKS.md, "Memory"). The clients are blocking std sockets on this test's thread,
//! which allocate nothing; the server runs on a one-worker runtime (one event loop) beside them.

use std::net::TcpStream;

#[path = "support/counting.rs"]
mod counting;
#[path = "support/idle_heap.rs"]
mod idle_heap;

/// Heap per idle connection, measured at the time of writing (rustc 1.95): 724 bytes in 2 allocations at 4,000
/// connections (`heap_per_conn`, release), 712 at this test's 256 (debug). The bound leaves room for the hash
/// maps' and the slab's growth steps, which fall differently at other sizes.
const MAX_HEAP_PER_CONNECTION: isize = 800;
const MAX_ALLOCS_PER_CONNECTION: isize = 3;

#[test]
fn an_idle_connection_costs_the_server_no_more_heap_than_measured() {
    // 256 sessions: the client and server ends fit under the usual 1,024-descriptor soft limit.
    const N: usize = 256;
    let (bytes, allocs) = idle_heap::per_idle_session(Default::default(), N, false, |addr, id, buf| {
        idle_heap::hello(TcpStream::connect(addr).unwrap(), id, buf)
    });
    println!("{N} idle connections: {bytes} heap bytes and {allocs} allocations each");
    assert!(bytes <= MAX_HEAP_PER_CONNECTION, "{bytes} heap bytes per idle connection");
    assert!(allocs <= MAX_ALLOCS_PER_CONNECTION, "{allocs} allocations per idle connection");
}
