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
//! Last, it opens N idle TLS connections (TLS 1.3, from `DevPki` certificates) to a second server in this process.
//! The TLS clients run in a child process (this example, started with `--tls-clients`), so that only the
//! server's side is counted.

use std::io::{Read, Write};
use std::time::Duration;

use bytes::Bytes;
use tether::proto::frame::{Hello, PROTOCOL_VERSION};
use tether::proto::Frame;
use tether::{Server, ServerConfig};

#[path = "../tests/support/counting.rs"]
mod counting;
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
    if args.get(1).map(String::as_str) == Some("--tls-clients") {
        return tls_clients(args[2].parse().unwrap(), args[3].parse().unwrap(), &args[4]);
    }
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

    // TLS: a second server; its clients live in a child process, announced line by line on its stdout.
    let pki = tether::DevPki::generate(&["127.0.0.1"], "client").unwrap();
    let ca_path = std::env::temp_dir().join(format!("tether-heap-per-conn-ca-{}.pem", std::process::id()));
    std::fs::write(&ca_path, &pki.ca_cert).unwrap();
    let mut tcfg = ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        max_connections: n + 10,
        max_handshakes: n + 10,
        ..Default::default()
    };
    tcfg.heartbeat.interval = Duration::from_secs(60);
    tcfg.heartbeat.timeout = Duration::from_secs(180);
    tcfg.tls = Some(tether::ServerTls::from_pem(pki.server_cert.as_bytes(), pki.server_key.as_bytes(), None).unwrap());
    let tserver = rt.block_on(Server::bind(tcfg)).unwrap();
    let taddr = tserver.local_addr().unwrap();
    let thandle = tserver.handle();
    rt.spawn(tserver.run(std::future::pending()));
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--tls-clients", &taddr.to_string(), &n.to_string(), ca_path.to_str().unwrap()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(child.stdout.take().unwrap()));
    assert_eq!(lines.next().unwrap().unwrap(), "warm"); // one connection, so lazily built state is not charged
    wait_online(&thandle, 1, Duration::from_millis(300));
    let before = live();
    writeln!(child.stdin.as_mut().unwrap(), "go").unwrap();
    assert_eq!(lines.next().unwrap().unwrap(), "ready");
    wait_online(&thandle, n + 1, Duration::from_millis(500));
    report("idle TLS connections", n, before, live());
    drop(child.stdin.take());
    let _ = child.wait();
    let _ = std::fs::remove_file(&ca_path);
}

/// Child mode: one TLS client, then (after "go" on stdin) `n` more, each handshaken and idle; exits at end of
/// stdin.
fn tls_clients(addr: std::net::SocketAddr, n: usize, ca_path: &str) {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName};
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_file(ca_path).unwrap()).unwrap();
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let cfg = std::sync::Arc::new(cfg);
    let open = |i: usize| {
        let tcp = std::net::TcpStream::connect(addr).unwrap();
        let conn = rustls::ClientConnection::new(cfg.clone(), ServerName::IpAddress(addr.ip().into())).unwrap();
        let mut tls = rustls::StreamOwned::new(conn, tcp);
        tls.write_all(&hello(&format!("tls-{i}"), 3)).unwrap();
        let mut buf = [0u8; 64];
        let _ = tls.read(&mut buf).unwrap(); // WELCOME
        tls
    };
    let mut held = vec![open(usize::MAX)];
    println!("warm");
    let mut stdin = std::io::stdin().lines();
    let _ = stdin.next();
    held.extend((0..n).map(open));
    println!("ready");
    for _ in stdin {}
    drop(held);
}

fn connect(addr: std::net::SocketAddr, id: &str) -> std::net::TcpStream {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.write_all(&hello(id, 1)).unwrap();
    let mut buf = [0u8; 64];
    let _ = s.read(&mut buf).unwrap(); // WELCOME
    s
}
