//! The heap guards' measurement (`tests/heap.rs`, `tests/heap_tls.rs`): a server on a one-worker runtime (one event
//! loop), N idle sessions opened by blocking clients on the test's thread, and the heap the server's allocator
//! counted for them; and the TLS clients they open. Included by path beside `support/counting.rs`, which installs
//! the allocator (also by the `heap_per_conn` example).
#![allow(dead_code)] // each binary uses part of it

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};

use tether::proto::frame::{self, Hello, PROTOCOL_VERSION};
use tether::proto::Frame;
use tether::{DevPki, Server, ServerConfig};

use super::counting::{self, live};

/// Read one whole frame into `buf` (kept by the caller, so nothing is allocated here once it has grown).
pub fn next_frame(s: &mut impl Read, buf: &mut Vec<u8>) -> Frame {
    loop {
        if let Some(n) = frame::check(buf, 1 << 20).unwrap() {
            let f = Frame::parse(&buf[..n]).unwrap();
            buf.drain(..n);
            return f;
        }
        let mut chunk = [0u8; 256];
        let got = s.read(&mut chunk).expect("a frame within the read timeout");
        assert!(got > 0, "the server closed a connection");
        buf.extend_from_slice(&chunk[..got]);
    }
}

/// Say `HELLO` as `id` on `s` and read its `WELCOME`.
pub fn hello<S: Read + Write>(mut s: S, id: &str, buf: &mut Vec<u8>) -> S {
    s.write_all(&Frame::Hello(Hello::new(PROTOCOL_VERSION, id, 1)).to_bytes()).unwrap();
    assert!(matches!(next_frame(&mut s, buf), Frame::Welcome(_)));
    s
}

/// A blocking TLS client session.
pub type Tls = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// A client configuration trusting `pki`'s CA, on rustls's own provider (an implementation independent of the
/// server's record protection).
pub fn tls_client(pki: &DevPki) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_slice(pki.ca_cert.as_bytes()).unwrap()).unwrap();
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    Arc::new(cfg)
}

/// A TLS session `id` at `addr` (a certificate for its IP address): the handshake, `HELLO`, then its `WELCOME`.
pub fn open_tls(addr: SocketAddr, cfg: &Arc<rustls::ClientConfig>, id: &str, buf: &mut Vec<u8>) -> Tls {
    let tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let conn = rustls::ClientConnection::new(cfg.clone(), ServerName::IpAddress(addr.ip().into())).unwrap();
    hello(rustls::StreamOwned::new(conn, tcp), id, buf)
}

/// Heap bytes and allocations per idle session of `n`, opened with `open(addr, id, buf)`. `server_only`: count
/// the server's runtime thread alone (clients that allocate, such as rustls, are then not counted).
pub fn per_idle_session<S: Read + Write>(
    mut cfg: ServerConfig,
    n: usize,
    server_only: bool,
    mut open: impl FnMut(SocketAddr, &str, &mut Vec<u8>) -> S,
) -> (isize, isize) {
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    rt.worker_threads(1).enable_all();
    if server_only {
        rt.on_thread_start(counting::count_only_this_thread);
    }
    let rt = rt.build().unwrap();
    cfg.listen = "127.0.0.1:0".parse().unwrap();
    cfg.max_handshakes_per_ip = Some(n + 10);
    // No heartbeat or probe falls inside the measurement.
    cfg.heartbeat.interval = Duration::from_secs(60);
    cfg.heartbeat.timeout = Duration::from_secs(180);
    let server = rt.block_on(Server::bind(cfg)).unwrap();
    let addr = server.local_addr().unwrap();
    rt.spawn(server.run(std::future::pending()));
    let mut buf = Vec::with_capacity(4096);
    let mut peers = Vec::with_capacity(n);
    // One session first, so that what the server builds once (its loop's buffers, the maps' first tables) is not
    // charged to the measured ones; it leaves again before the measurement, freeing its slot for the first.
    drop(open(addr, "warmup", &mut buf));
    let before = live();
    for i in 0..n {
        peers.push(open(addr, &format!("device-{i:04}"), &mut buf));
    }
    // A round trip on the last connection: the one event loop has finished with every connection before it.
    let last = peers.last_mut().unwrap();
    last.write_all(&Frame::Ping { seq: 1, ts_ms: 0 }.to_bytes()).unwrap();
    while !matches!(next_frame(last, &mut buf), Frame::Pong { .. }) {}
    let after = live();
    drop(peers);
    rt.shutdown_timeout(Duration::from_secs(1));
    ((after.0 - before.0) / n as isize, (after.1 - before.1) / n as isize)
}
