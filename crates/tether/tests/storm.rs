//! Server restart under 1,000 reconnecting clients, on the real clock (the spread of real reconnects is the
//! point). Asserts: every client is back within a bound derived from the settings, nobody gives up, and the
//! restarted server never has more handshakes in flight than its cap. Prints the histogram of reconnect times.

mod support;

use std::time::{Duration, Instant};

use support::{test_config, TestServer};
use tether::proto::reconnect::{BackoffConfig, ReconnectConfig};
use tether::{ClientConfig, LinkEvent, ReconnectingClient, ResilienceConfig, ServerConfig};
use tokio::sync::mpsc;

const CLIENTS: usize = 1000;
const CAP: usize = 8;

fn server_cfg(listen: std::net::SocketAddr) -> ServerConfig {
    let mut cfg = ServerConfig { listen, ..test_config() };
    cfg.heartbeat.interval = Duration::from_secs(5);
    cfg.heartbeat.timeout = Duration::from_secs(15);
    cfg.max_handshakes = CAP;
    cfg.busy_retry_after = Duration::from_millis(200);
    cfg.busy_retry_spread = Duration::from_secs(1);
    cfg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_under_a_thousand_clients() {
    let backoff = BackoffConfig { initial: Duration::from_millis(200), max: Duration::from_secs(2), multiplier: 2.0 };
    let s = TestServer::start(server_cfg("127.0.0.1:0".parse().unwrap())).await;
    let addr = s.addr;
    let (tx, mut rx) = mpsc::unbounded_channel::<(usize, Instant, LinkEvent)>();
    for i in 0..CLIENTS {
        let res = ResilienceConfig {
            reconnect: ReconnectConfig { backoff, return_to_primary: None, ..ReconnectConfig::default() },
            queue_limit: 10,
            seed: Some(i as u64),
        };
        let mut rc = ReconnectingClient::start(vec![addr.to_string()], ClientConfig::new(format!("c{i}")), res);
        let tx = tx.clone();
        tokio::spawn(async move {
            while let Some(ev) = rc.next_event().await {
                if tx.send((i, Instant::now(), ev)).is_err() {
                    return;
                }
            }
        });
    }
    // Everyone connected (the cap applies to the first wave too: some were told `busy` and came back).
    let mut connected = vec![false; CLIENTS];
    let mut up = 0;
    while up < CLIENTS {
        let (i, _, ev) = tokio::time::timeout(support::PATIENCE, rx.recv()).await.expect("initial connect").unwrap();
        if matches!(ev, LinkEvent::Connected { .. }) && !std::mem::replace(&mut connected[i], true) {
            up += 1;
        }
    }
    let first_wave_busy = s.handle.stats().refused_busy;

    // Crash and restart on the same port at once.
    s.crash().await;
    let t0 = Instant::now();
    let s2 = TestServer::start(server_cfg(addr)).await;

    // Derived bound: a client's first retry comes within `initial`; every `busy` answer defers it by at most
    // busy_retry_after + busy_retry_spread (1.2 s); with a cap of 8 handshakes and sub-millisecond handshakes on
    // loopback, a client meets `busy` a handful of times at most. We allow 4 refusals in a row.
    let bound = backoff.initial + (Duration::from_millis(200) + Duration::from_secs(1)) * 4;
    let mut back_at = vec![None::<Duration>; CLIENTS];
    let mut refusals = vec![0u32; CLIENTS];
    let mut back = 0;
    while back < CLIENTS {
        let left = (bound + Duration::from_secs(5)).saturating_sub(t0.elapsed());
        let Ok(Some((i, at, ev))) = tokio::time::timeout(left, rx.recv()).await else {
            panic!("only {back} of {CLIENTS} clients back after {:?}", t0.elapsed());
        };
        match ev {
            LinkEvent::Connected { .. } if back_at[i].is_none() => {
                back_at[i] = Some(at.saturating_duration_since(t0));
                back += 1;
            }
            LinkEvent::ConnectFailed { .. } => refusals[i] += 1,
            LinkEvent::GaveUp { .. } => panic!("client {i} gave up"),
            _ => {}
        }
    }
    let mut times: Vec<Duration> = back_at.into_iter().flatten().collect();
    times.sort();
    let all_back = *times.last().unwrap();
    let peak = s2.handle.stats().peak_handshakes;
    let busy = s2.handle.stats().refused_busy;
    println!("restart under {CLIENTS} clients, handshake cap {CAP}:");
    println!(
        "  all back after {:.3}s (bound {:.1}s); p50 {:.3}s, p99 {:.3}s",
        all_back.as_secs_f64(),
        bound.as_secs_f64(),
        times[CLIENTS / 2].as_secs_f64(),
        times[CLIENTS * 99 / 100].as_secs_f64()
    );
    println!(
        "  peak handshakes in flight {peak}; busy refusals {busy} (first wave {first_wave_busy}); most failed attempts by one client {}",
        refusals.iter().max().unwrap()
    );
    println!("  reconnect times (100 ms buckets):");
    let buckets = (all_back.as_millis() / 100 + 1) as usize;
    for b in 0..buckets {
        let n = times.iter().filter(|t| (t.as_millis() / 100) as usize == b).count();
        println!("    {:>5}-{:<5} ms {:>5} {}", b * 100, b * 100 + 100, n, "#".repeat(n.div_ceil(10)));
    }
    assert!(all_back <= bound, "all back after {all_back:?}, bound {bound:?}");
    assert!(peak <= CAP, "peak handshakes {peak} above the cap {CAP}");
    assert!(peak > 0);
    // Spread, not one wave: no 100 ms bucket holds more than half the clients.
    for b in 0..buckets {
        let n = times.iter().filter(|t| (t.as_millis() / 100) as usize == b).count();
        assert!(n <= CLIENTS / 2, "{n} clients reconnected in one 100 ms bucket");
    }
    assert_eq!(s2.handle.stats().online, CLIENTS);
}
