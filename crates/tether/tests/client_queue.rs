//! The client's event queue is bounded: an application that stops reading loses plain events, counted and
//! reported, and never a reliable message (the connection ends with `slow_consumer` and the resume brings what
//! it could not take); how a connection ended is always heard.

mod support;

use bytes::Bytes;
use support::{test_config, TestServer, PATIENCE};
use tether::{
    Client, ClientConfig, ClientEvent, CloseReason, EventKind, EventQueue, LinkEvent, ReconnectingClient,
    ReliableConfig, ReliableLink, ResilienceConfig,
};

#[tokio::test(start_paused = true)]
async fn a_client_that_stops_reading_loses_counted_events_and_still_hears_how_it_ended() {
    let mut s = TestServer::start(test_config()).await;
    let cfg = ClientConfig { event_queue: EventQueue::Bounded(16), ..ClientConfig::new("slow") };
    let mut c = Client::connect(s.addr, cfg).await.expect("connect");
    s.wait(|k| matches!(k, EventKind::Online { client, .. } if client == "slow")).await;
    // The application reads nothing while the server sends.
    let mut sent = 0u64;
    for i in 0..2000 {
        if s.handle.send("slow", Bytes::from(format!("m{i}"))).is_ok() {
            sent += 1;
        }
        tokio::task::yield_now().await;
    }
    assert!(s.handle.kick("slow"));
    let (mut data, mut dropped, mut ends) = (0u64, 0u64, Vec::new());
    tokio::time::timeout(PATIENCE, async {
        while let Some(ev) = c.next_event().await {
            assert!(ends.is_empty(), "{ev:?} after Disconnected");
            match ev {
                ClientEvent::Data { .. } => data += 1,
                ClientEvent::Dropped { count } => dropped += count,
                ClientEvent::Disconnected(d) => ends.push(d.reason),
                other => panic!("unexpected {other:?}"),
            }
        }
    })
    .await
    .expect("the events end");
    // Every message is accounted for: taken, or counted as dropped. The ending is heard once, last.
    assert_eq!(data + dropped, sent, "{data} taken + {dropped} dropped");
    assert!(dropped > 0, "nothing was dropped: the queue held {data} events");
    assert_eq!(ends, [CloseReason::Kicked]);
}

#[tokio::test(start_paused = true)]
async fn a_reliable_reader_that_falls_behind_ends_its_connection_and_loses_nothing() {
    const N: usize = 300;
    let mut s = TestServer::start(test_config()).await;
    let link = || Some(ReliableLink::new(ReliableConfig::default()));
    let cfg = ClientConfig { reliable: link(), event_queue: EventQueue::Bounded(8), ..ClientConfig::new("reader") };
    let mut reader = ReconnectingClient::start(vec![s.addr.to_string()], cfg, ResilienceConfig::default());
    s.wait(|k| matches!(k, EventKind::Online { client, .. } if client == "reader")).await;
    let writer = Client::connect(s.addr, ClientConfig { reliable: link(), ..ClientConfig::new("writer") }).await;
    let writer = writer.expect("connect");
    for i in 0..N {
        writer.send_reliable(Some("reader"), Bytes::from(format!("m{i}"))).expect("within the window");
    }
    // The reader's queue fills: its client ends the connection rather than take what it cannot queue.
    let verdict = s
        .wait(|k| {
            matches!(k, EventKind::Offline { client, reason: CloseReason::SlowConsumer, by_peer: true, .. }
                if client == "reader")
        })
        .await;
    assert!(matches!(verdict, EventKind::Offline { .. }));
    // Now it reads: every message once, in order, across however many resumes it took.
    let mut got = Vec::new();
    let mut slow = 0;
    tokio::time::timeout(PATIENCE, async {
        while got.len() < N {
            match reader.next_event().await.expect("the client runs") {
                LinkEvent::Data { payload, .. } => got.push(String::from_utf8(payload.to_vec()).unwrap()),
                LinkEvent::Disconnected { disconnect, .. } => {
                    assert_eq!(disconnect.reason, CloseReason::SlowConsumer, "{disconnect:?}");
                    assert!(!disconnect.by_peer);
                    slow += 1;
                }
                LinkEvent::Connected { reliable, .. } => {
                    let grant = reliable.expect("reliable");
                    assert!(grant.lost == 0, "{grant:?}");
                }
                // Plain events the full queue dropped (the `Reconnecting`s), counted.
                LinkEvent::Dropped { .. } | LinkEvent::Reconnecting { .. } => {}
                other => panic!("unexpected {other:?}"),
            }
        }
    })
    .await
    .expect("every message arrives");
    assert_eq!(got, (0..N).map(|i| format!("m{i}")).collect::<Vec<_>>());
    assert!(slow >= 1, "the reader's own slow_consumer verdict was not reported");
    reader.close().await;
}

/// A reliable message refused for want of room ends the connection; a smaller one right behind it, read in the
/// same batch, must not be taken either (its acknowledgement would cover the refused one, which would be lost).
#[tokio::test(start_paused = true)]
async fn a_message_behind_a_refused_one_is_not_taken_either() {
    const BIG: usize = 65_000;
    // 258 big messages leave 7,216 bytes of the 16 MiB: the next (8,000 bytes) does not fit, the last (10) would.
    let sizes: Vec<usize> = (0..258).map(|_| BIG).chain([8_000, 10]).collect();
    // The server may hold the whole burst for the reader.
    let mut cfg = test_config();
    cfg.hold.per_session.bytes = 64 << 20;
    let mut s = TestServer::start(cfg).await;
    let link = || Some(ReliableLink::new(ReliableConfig::default()));
    let cfg =
        ClientConfig { reliable: link(), event_queue: EventQueue::Bounded(100_000), ..ClientConfig::new("reader") };
    let mut reader = ReconnectingClient::start(vec![s.addr.to_string()], cfg, ResilienceConfig::default());
    s.wait(|k| matches!(k, EventKind::Online { client, .. } if client == "reader")).await;
    let mut writer = Client::connect(s.addr, ClientConfig { reliable: link(), ..ClientConfig::new("writer") })
        .await
        .expect("connect");
    for (i, &len) in sizes.iter().enumerate() {
        let mut payload = format!("{i}:").into_bytes();
        payload.resize(len, b'x');
        let payload = Bytes::from(payload);
        // The writer's window holds 4 MiB: wait for acknowledgements when it is full.
        while writer.send_reliable(Some("reader"), payload.clone()).is_err() {
            tokio::time::timeout(PATIENCE, writer.next_event()).await.expect("acknowledgements come");
        }
    }
    s.wait(|k| {
        matches!(k, EventKind::Offline { client, reason: CloseReason::SlowConsumer, by_peer: true, .. }
            if client == "reader")
    })
    .await;
    let mut got = Vec::new();
    tokio::time::timeout(PATIENCE, async {
        while got.len() < sizes.len() {
            if let LinkEvent::Data { payload, .. } = reader.next_event().await.expect("the client runs") {
                let head = payload.split(|&b| b == b':').next().unwrap().to_vec();
                got.push((String::from_utf8(head).unwrap().parse::<usize>().unwrap(), payload.len()));
            }
        }
    })
    .await
    .expect("every message arrives");
    let want: Vec<(usize, usize)> = sizes.iter().copied().enumerate().collect();
    assert_eq!(got, want);
    reader.close().await;
}

/// Acknowledgements are cumulative: a full queue holds the latest back rather than dropping it, and the
/// application learns the final position (here: a sender that reads nothing while it sends).
#[tokio::test(start_paused = true)]
async fn acknowledgements_are_held_back_not_dropped_when_the_queue_is_full() {
    const N: u64 = 400;
    let s = TestServer::start(test_config()).await;
    let reliable = |receipts| Some(ReliableLink::new(ReliableConfig { receipts, ..ReliableConfig::default() }));
    let _reader = Client::connect(s.addr, ClientConfig { reliable: reliable(true), ..ClientConfig::new("reader") })
        .await
        .expect("connect");
    let cfg =
        ClientConfig { reliable: reliable(false), event_queue: EventQueue::Bounded(2), ..ClientConfig::new("sender") };
    let mut sender = Client::connect(s.addr, cfg).await.expect("connect");
    for i in 0..N {
        sender.send_reliable(Some("reader"), Bytes::from(format!("m{i}"))).expect("within the window");
        tokio::task::yield_now().await;
    }
    let mut last = 0;
    tokio::time::timeout(PATIENCE, async {
        while last < N {
            match sender.next_event().await.expect("the client runs") {
                ClientEvent::Acked { upto } => {
                    assert!(upto > last, "{upto} after {last}");
                    last = upto;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("the last acknowledgement heard was {last} of {N}"));
}
