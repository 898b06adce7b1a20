//! What the client spends to hand a message to its application: the receive path of [`tether::Client`].
//!
//! `cargo run --release -p tether --example client_receive [N]`: starts a server in this process and one client;
//! the server's application sends N 64-byte messages (default 500,000) to the client, which reads each with
//! `next_event`. Prints messages per second and the process's CPU time per message (server and client together:
//! compare runs of the same build only).

use std::time::{Duration, Instant};

use bytes::Bytes;
use tether::{Client, ClientConfig, ClientEvent, EventQueue, Server, ServerConfig};

fn cpu_time() -> Duration {
    let mut u = std::mem::MaybeUninit::<libc::rusage>::uninit();
    // SAFETY: getrusage fills the struct.
    let u = unsafe {
        libc::getrusage(libc::RUSAGE_SELF, u.as_mut_ptr());
        u.assume_init()
    };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(u.ru_utime) + tv(u.ru_stime)
}

#[tokio::main]
async fn main() {
    let n: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(500_000);
    let mut cfg = ServerConfig { listen: "127.0.0.1:0".parse().unwrap(), ..ServerConfig::default() };
    cfg.outbound_queue = n + 1;
    cfg.conn.max_outbound_bytes = 1 << 30;
    let server = Server::bind(cfg).await.expect("bind");
    let addr = server.local_addr().unwrap();
    let handle = server.handle();
    tokio::spawn(async move { server.run(std::future::pending()).await });
    // A queue that holds every message: this measures the path, not what a slow reader loses.
    let cfg = ClientConfig { event_queue: EventQueue::Bounded(n), ..ClientConfig::new("reader") };
    let mut client = Client::connect(addr, cfg).await.expect("connect");
    let payload = Bytes::from(vec![b'x'; 64]);
    let (start, cpu) = (Instant::now(), cpu_time());
    let sender = tokio::spawn(async move {
        for _ in 0..n {
            while handle.send("reader", payload.clone()).is_err() {
                tokio::task::yield_now().await;
            }
        }
    });
    let mut got = 0;
    while got < n {
        match client.next_event().await.expect("the client runs") {
            ClientEvent::Data { .. } => got += 1,
            ClientEvent::Dropped { count } => panic!("{count} events dropped: the reader cannot keep up"),
            _ => {}
        }
    }
    sender.await.unwrap();
    let (wall, cpu) = (start.elapsed(), cpu_time() - cpu);
    println!(
        "{n} messages in {:.2} s: {:.0} msg/s, {:.2} µs CPU per message (server and client)",
        wall.as_secs_f64(),
        n as f64 / wall.as_secs_f64(),
        cpu.as_secs_f64() * 1e6 / n as f64
    );
}
