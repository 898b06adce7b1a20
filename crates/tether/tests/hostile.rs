//! 10,000 connections of random garbage against a server that keeps serving 100 good clients, on the real
//! clock: the garbage is refused connection by connection, and no good client gets a verdict.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use support::{test_config, TestServer};
use tether::{Client, ClientConfig, ClientEvent, EventKind};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const GOOD: usize = 100;
const GARBAGE: usize = 10_000;

/// xorshift64*, seeded: the same garbage every run.
fn next(state: &mut u64) -> u64 {
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    state.wrapping_mul(0x2545_f491_4f6c_dd1d)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_connections_do_not_disturb_good_clients() {
    let mut cfg = test_config();
    cfg.heartbeat.interval = Duration::from_millis(200);
    cfg.heartbeat.timeout = Duration::from_millis(600);
    cfg.conn.handshake_timeout = Duration::from_secs(2);
    let mut s = TestServer::start(cfg).await;
    let mut good = Vec::new();
    for i in 0..GOOD {
        good.push(Client::connect(s.addr, ClientConfig::new(format!("good-{i}"))).await.unwrap());
    }
    // 10,000 hostile connections, 64 at a time: random bytes (sometimes a plausible length prefix, sometimes
    // noise), then FIN; each must be closed by the server without affecting anyone else.
    let done = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(tokio::sync::Semaphore::new(64));
    let mut tasks = Vec::new();
    for i in 0..GARBAGE {
        let permit = gate.clone().acquire_owned().await.unwrap();
        let (addr, done) = (s.addr, done.clone());
        tasks.push(tokio::spawn(async move {
            let _permit = permit;
            let mut rng = 0x9e37_79b9_7f4a_7c15u64 ^ (i as u64).wrapping_mul(0x1000_0000_01b3);
            let len = (next(&mut rng) % 200 + 1) as usize;
            let mut junk: Vec<u8> = (0..len).map(|_| next(&mut rng) as u8).collect();
            if i % 3 == 0 {
                junk[..4.min(len)].copy_from_slice(&[0, 0, 0, 40][..4.min(len)]);
                // plausible length, then junk
            }
            let Ok(mut c) = tokio::net::TcpStream::connect(addr).await else { return };
            let _ = c.write_all(&junk).await;
            let _ = c.shutdown().await;
            // Closed means the server ended it (EOF or reset); a read that times out is not closed.
            let mut sink = [0u8; 512];
            let closed = loop {
                match tokio::time::timeout(Duration::from_secs(5), c.read(&mut sink)).await {
                    Ok(Ok(0)) | Ok(Err(_)) => break true,
                    Ok(Ok(_)) => continue,
                    Err(_) => break false,
                }
            };
            if closed {
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(done.load(Ordering::Relaxed), GARBAGE, "every hostile connection was closed by the server");
    // The good clients are all still there and still round-trip data; nobody got a verdict.
    for (i, c) in good.iter_mut().enumerate() {
        c.send(None, Bytes::from(format!("alive {i}"))).await.unwrap();
        while let Ok(Some(ev)) = tokio::time::timeout(Duration::from_millis(1), c.next_event()).await {
            assert!(!matches!(ev, ClientEvent::Disconnected(_)), "good-{i} was disconnected: {ev:?}");
        }
    }
    let mut alive = 0;
    while alive < GOOD {
        match s.wait(|k| matches!(k, EventKind::Data { .. } | EventKind::Offline { .. })).await {
            EventKind::Data { .. } => alive += 1,
            other => panic!("a good client got a verdict: {other:?}"),
        }
    }
    assert_eq!(s.handle.stats().online, GOOD);
}
