//! The admin listener over real loopback sockets: exact metric values for a scripted scenario (one connection
//! per close reason loopback can produce), refusals, kick and drain through the API, the event stream and a
//! stalled consumer of it, the token, and bad input.

#[path = "../../tether/tests/support/mod.rs"]
mod support;
mod support_http;

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use socket2::SockRef;
use support::{next_disconnect, offline_reason, test_config, RawPeer, TestServer};
use support_http::{get, metrics, request, start_admin, value};
use tether::proto::Frame;
use tether::{Client, ClientConfig, CloseReason, ConnectError, EventKind};
use tether_admin::AdminConfig;
use tokio::io::AsyncWriteExt;

fn client_cfg(id: &str) -> ClientConfig {
    let mut c = ClientConfig::new(id);
    c.heartbeat_interval = Some(Duration::from_secs(1));
    c
}

/// `tether_disconnects_total` for every reason: exactly `expected`, zero for every other reason, and every
/// `CloseReason` present as a label.
fn assert_disconnects(m: &HashMap<String, f64>, expected: &[(CloseReason, u64)]) {
    for r in CloseReason::ALL {
        let want = expected.iter().find(|(e, _)| *e == r).map_or(0, |(_, n)| *n);
        let key = format!("tether_disconnects_total{{reason=\"{}\"}}", r.as_str());
        assert_eq!(value(m, &key), want as f64, "{key}");
    }
    assert_eq!(value(m, "tether_disconnects_total{reason=\"unknown\"}"), 0.0);
}

#[tokio::test(start_paused = true)]
async fn every_reason_loopback_can_produce_is_counted_exactly() {
    let mut cfg = test_config();
    cfg.registry.max_subscriptions = 2;
    cfg.conn.max_data_rate = Some(4096);
    cfg.conn.max_outbound_bytes = 256 * 1024;
    cfg.outbound_queue = 64;
    let mut s = TestServer::start(cfg).await;
    let admin = start_admin(s.handle.clone(), AdminConfig::default()).await;

    // Before anything happened, every reason is already a label, at zero (a rate query works from the start).
    let m = metrics(admin).await;
    assert_disconnects(&m, &[]);
    assert_eq!(value(&m, "tether_connections"), 0.0);

    let mut expected: Vec<(CloseReason, u64)> = Vec::new();
    fn bump_in(expected: &mut Vec<(CloseReason, u64)>, r: CloseReason) {
        match expected.iter_mut().find(|(e, _)| *e == r) {
            Some((_, n)) => *n += 1,
            None => expected.push((r, 1)),
        }
    }
    macro_rules! bump {
        ($r:expr) => {
            bump_in(&mut expected, $r)
        };
    }

    // A watcher of p1: its snapshot, then p1 online and offline: three PRESENCE frames.
    let watch = Client::connect(s.addr, client_cfg("watch")).await.unwrap();
    watch.subscribe(vec!["p1".into()]).await.unwrap();
    let mut p1 = Client::connect(s.addr, client_cfg("p1")).await.unwrap();
    s.wait(|k| matches!(k, EventKind::Online { client, .. } if client == "p1")).await;
    let m = metrics(admin).await;
    assert_eq!(value(&m, "tether_sessions_online"), 2.0);
    assert_eq!(value(&m, "tether_connections"), 2.0);
    assert_eq!(value(&m, "tether_presence_subscriptions"), 1.0);
    support::close_cleanly(&mut s, &mut p1, "p1").await;
    bump!(CloseReason::Bye);

    let (p, _) = RawPeer::hello(s.addr, "eof1", 1).await;
    SockRef::from(&p.stream).shutdown(std::net::Shutdown::Write).unwrap();
    s.wait(|k| offline_reason(k, "eof1").is_some()).await;
    drop(p);
    bump!(CloseReason::Eof);

    let (p, _) = RawPeer::hello(s.addr, "rst1", 1).await;
    SockRef::from(&p.stream).set_linger(Some(Duration::ZERO)).unwrap();
    drop(p);
    s.wait(|k| offline_reason(k, "rst1").is_some()).await;
    bump!(CloseReason::Reset);

    let (_silent, _) = RawPeer::hello(s.addr, "silent", 1).await;
    let k = s.wait(|k| offline_reason(k, "silent").is_some()).await;
    assert_eq!(offline_reason(&k, "silent"), Some(CloseReason::HeartbeatTimeout));
    bump!(CloseReason::HeartbeatTimeout);

    // Same device twice: the first connection is taken over.
    let mut old = Client::connect(s.addr, ClientConfig { nonce: Some(7), ..client_cfg("tk") }).await.unwrap();
    let mut tk = Client::connect(s.addr, ClientConfig { nonce: Some(7), ..client_cfg("tk") }).await.unwrap();
    assert_eq!(next_disconnect(&mut old).await.reason, CloseReason::Takeover);
    bump!(CloseReason::Takeover);

    // Two live devices on one id: a takeover, then an id conflict for the one that comes straight back.
    let mut a = Client::connect(s.addr, ClientConfig { nonce: Some(1), ..client_cfg("x") }).await.unwrap();
    let _b = Client::connect(s.addr, ClientConfig { nonce: Some(2), ..client_cfg("x") }).await.unwrap();
    assert_eq!(next_disconnect(&mut a).await.reason, CloseReason::Takeover);
    bump!(CloseReason::Takeover);
    let err = Client::connect(s.addr, ClientConfig { nonce: Some(1), ..client_cfg("x") }).await.err().unwrap();
    assert!(matches!(err, ConnectError::Refused(ref d) if d.reason == CloseReason::IdConflict), "{err:?}");
    bump!(CloseReason::IdConflict);

    let mut p = RawPeer::connect(s.addr).await;
    p.send_raw(&[0, 0, 0, 3, 0x7f, 1, 2]).await;
    assert_eq!(p.expect_bye().await.reason, CloseReason::ProtocolError);
    bump!(CloseReason::ProtocolError);

    let mut p = RawPeer::connect(s.addr).await;
    assert_eq!(p.expect_bye().await.reason, CloseReason::HandshakeTimeout);
    bump!(CloseReason::HandshakeTimeout);

    let (mut flood, _) = RawPeer::hello(s.addr, "pinger", 1).await;
    for seq in 0..20 {
        if flood.stream.write_all(&Frame::Ping { seq, ts_ms: 0 }.to_bytes()).await.is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    s.wait(|k| offline_reason(k, "pinger").is_some()).await;
    bump!(CloseReason::PingFlood);

    let (mut flood, _) = RawPeer::hello(s.addr, "datafl", 1).await;
    let chunk = Frame::Data { peer: String::new(), payload: Bytes::from(vec![b'x'; 1000]) }.to_bytes();
    for _ in 0..100 {
        if flood.stream.write_all(&chunk).await.is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let k = s.wait(|k| offline_reason(k, "datafl").is_some()).await;
    assert_eq!(offline_reason(&k, "datafl"), Some(CloseReason::RateLimited));
    bump!(CloseReason::RateLimited);

    let mut greedy = Client::connect(s.addr, client_cfg("greedy")).await.unwrap();
    greedy.subscribe(vec!["a".into(), "b".into(), "c".into()]).await.unwrap();
    next_disconnect(&mut greedy).await;
    s.wait(|k| offline_reason(k, "greedy").is_some()).await;
    bump!(CloseReason::SubscriptionRefused);

    let (sink, _) = RawPeer::hello(s.addr, "sink", 1).await;
    SockRef::from(&sink.stream).set_recv_buffer_size(4096).unwrap();
    support::send_until_refused(&s.handle, "sink", Bytes::from(vec![7u8; 16 * 1024]), 20_000).await;
    s.wait(|k| offline_reason(k, "sink").is_some()).await;
    bump!(CloseReason::SlowConsumer);

    // Relay: one delivered, one undeliverable.
    let relay = Client::connect(s.addr, client_cfg("relay")).await.unwrap();
    relay.send(Some("tk"), Bytes::from_static(b"hi")).await.unwrap();
    assert_eq!(&support::next_data(&mut tk).await[..], b"hi");
    relay.send(Some("nobody"), Bytes::from_static(b"hi")).await.unwrap();

    // Kicked through the API.
    let r = request(admin, "POST", "/v1/sessions/relay/kick", Some(r#"{"retry_after": 1500}"#), None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["retry_after_ms"], 1500);
    let k = s.wait(|k| offline_reason(k, "relay").is_some()).await;
    assert_eq!(offline_reason(&k, "relay"), Some(CloseReason::Kicked));
    bump!(CloseReason::Kicked);

    let m = metrics(admin).await;
    assert_disconnects(&m, &expected);
    assert_eq!(value(&m, "tether_takeovers_total"), 2.0);
    assert_eq!(value(&m, "tether_id_conflicts_total"), 1.0);
    assert_eq!(value(&m, "tether_relayed_data_total"), 1.0);
    assert_eq!(value(&m, "tether_undeliverable_total"), 1.0);
    assert_eq!(value(&m, "tether_presence_frames_sent_total"), 3.0);
    let closed: u64 = expected.iter().map(|(_, n)| n).sum();
    // Open now: watch, tk, x (device b); accepted = closed + open.
    assert_eq!(value(&m, "tether_connections"), 3.0);
    assert_eq!(value(&m, "tether_connections_accepted_total"), (closed + 3) as f64);
    assert_eq!(value(&m, "tether_handshakes_in_flight"), 0.0);
    assert_eq!(value(&m, "tether_outbound_queued_bytes"), 0.0);
    // Two verdicts at a deadline (heartbeat and handshake timeouts), both exactly on time in virtual time.
    assert_eq!(value(&m, "tether_verdict_lateness_seconds_count"), 2.0);
    assert_eq!(value(&m, "tether_verdict_lateness_seconds_bucket{le=\"0.0001\"}"), 2.0);
    // Every admitted session has a handshake time (watch p1 eof1 rst1 silent tk tk x x pinger datafl greedy sink
    // relay: 14), every ended one a duration (all but watch, tk and x: 11).
    assert_eq!(value(&m, "tether_handshake_duration_seconds_count"), 14.0);
    assert_eq!(value(&m, "tether_session_duration_seconds_count"), 11.0);
    assert!(value(&m, "tether_frames_received_total") > 20.0);
    assert!(value(&m, "tether_frames_sent_total") > 20.0);
    assert!(value(&m, "tether_received_bytes_total") > 0.0 && value(&m, "tether_sent_bytes_total") > 0.0);
    let inf = value(&m, "tether_verdict_lateness_seconds_bucket{le=\"+Inf\"}");
    assert_eq!(inf, 2.0, "+Inf bucket equals the count");

    // The ring of recent disconnects agrees with the counters, newest first, and filters by reason.
    let r = get(admin, "/v1/disconnects?limit=100").await.json();
    let list = r["disconnects"].as_array().unwrap();
    assert_eq!(list.len() as u64, closed);
    assert_eq!(list[0]["reason"], "kicked");
    assert_eq!(list[0]["client"], "relay");
    let hb = get(admin, "/v1/disconnects?reason=heartbeat_timeout").await.json();
    let hb = hb["disconnects"].as_array().unwrap();
    assert_eq!(hb.len(), 1);
    assert_eq!(hb[0]["client"], "silent");
    assert_eq!(hb[0]["lateness_ms"], 0.0);
    assert_eq!(hb[0]["silent_ms"], 3000.0);
    assert!(hb[0]["bytes_in"].as_u64().unwrap() > 0);

    // A drain says goodbye to the three left, counted as server_shutdown.
    let r = request(admin, "POST", "/v1/drain", Some(r#"{"spread": "300ms"}"#), None).await;
    assert_eq!(r.status, 202, "{}", r.body);
    assert_eq!(r.json()["total"], 3);
    for _ in 0..3 {
        s.wait(|k| matches!(k, EventKind::Offline { reason: CloseReason::ServerShutdown, .. })).await;
    }
    bump!(CloseReason::ServerShutdown);
    bump!(CloseReason::ServerShutdown);
    bump!(CloseReason::ServerShutdown);
    let m = metrics(admin).await;
    assert_disconnects(&m, &expected);
    assert_eq!(value(&m, "tether_draining"), 1.0);
    assert_eq!(value(&m, "tether_sessions_online"), 0.0);
    assert_eq!(value(&m, "tether_presence_subscriptions"), 0.0);
}

#[tokio::test(start_paused = true)]
async fn refusals_are_counted_by_cause() {
    let secret = b"0123456789abcdef0123".to_vec();
    let tokens = tether::HmacTokens::new(secret).unwrap();
    let mut cfg = test_config();
    cfg.max_per_ip = Some(1);
    cfg.max_connections = 2;
    cfg.auth =
        Some(tether::Auth(std::sync::Arc::new(tether::HmacTokens::new(b"0123456789abcdef0123".to_vec()).unwrap())));
    cfg.auth_fail_delay = Duration::from_millis(100);
    let mut s = TestServer::start(cfg).await;
    let admin = start_admin(s.handle.clone(), AdminConfig::default()).await;
    let with_token = |id: &str| {
        let mut c = client_cfg(id);
        c.credential = tokens.mint(id, SystemTime::now(), Duration::from_secs(600), None).into_bytes();
        c
    };
    // A forged credential.
    let mut bad = client_cfg("mallory");
    bad.credential = b"forged".to_vec();
    let err = Client::connect(s.addr, bad).await.err().unwrap();
    assert!(matches!(err, ConnectError::Refused(ref d) if d.reason == CloseReason::AuthFailed), "{err:?}");
    // One per address: a second from 127.0.0.1 is ip_limit.
    let _one = Client::connect(s.addr, with_token("one")).await.unwrap();
    let err = Client::connect(s.addr, with_token("two")).await.err().unwrap();
    assert!(matches!(err, ConnectError::Refused(ref d) if d.reason == CloseReason::IpLimit), "{err:?}");
    // From another loopback address; then the server is full and a third is busy.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let mut second = RawPeer::from_stream(sock.connect(s.addr).await.unwrap());
    let hello = tether::proto::frame::Hello {
        credential: tokens.mint("two", SystemTime::now(), Duration::from_secs(600), None).into(),
        ..tether::proto::frame::Hello::new(2, "two", 2)
    };
    second.send(&Frame::Hello(hello)).await;
    assert!(matches!(second.next_frame().await, Some(Frame::Welcome(_))));
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind("127.0.0.3:0".parse().unwrap()).unwrap();
    let mut third = RawPeer::from_stream(sock.connect(s.addr).await.unwrap());
    assert_eq!(third.expect_bye().await.reason, CloseReason::Busy);
    s.wait(|k| matches!(k, EventKind::Closed { reason: CloseReason::Busy, .. })).await;

    let m = metrics(admin).await;
    assert_eq!(value(&m, "tether_refused_total{reason=\"auth_failed\"}"), 1.0);
    assert_eq!(value(&m, "tether_refused_total{reason=\"ip_limit\"}"), 1.0);
    assert_eq!(value(&m, "tether_refused_total{reason=\"busy\"}"), 1.0);
    assert_eq!(value(&m, "tether_refused_total{reason=\"draining\"}"), 0.0);
    assert_disconnects(&m, &[(CloseReason::AuthFailed, 1), (CloseReason::IpLimit, 1), (CloseReason::Busy, 1)]);
    assert_eq!(value(&m, "tether_connections_accepted_total"), 5.0);
}

#[tokio::test(start_paused = true)]
async fn round_trips_are_measured_by_the_server_beside_the_kernel() {
    let mut s = TestServer::start(test_config()).await;
    let admin = start_admin(s.handle.clone(), AdminConfig::default()).await;
    let _c = Client::connect(s.addr, client_cfg("r")).await.unwrap();
    s.wait(|k| matches!(k, EventKind::Online { .. })).await;
    // The server's own probe goes with its PONG to a client PING within 12 intervals of WELCOME, however busy
    // the client keeps it.
    tokio::time::sleep(Duration::from_millis(13_500)).await;
    let m = metrics(admin).await;
    let app = value(&m, "tether_heartbeat_rtt_seconds_count");
    assert!(app >= 1.0, "no server-measured round trip");
    assert_eq!(value(&m, "tether_kernel_rtt_seconds_count"), app, "the kernel's RTT is read at the same moments");
    let one = get(admin, "/v1/sessions/r").await;
    assert_eq!(one.status, 200, "{}", one.body);
    let v = one.json();
    assert!(v["session"]["app_rtt_ms"].is_number(), "{v}");
    assert_eq!(v["session"]["state"], "online");
    assert_eq!(v["session"]["heartbeat_ms"], 1000);
    assert_eq!(v["kernel"]["state"], "established");
    assert!(v["kernel"]["rtt_ms"].is_number() && v["kernel"]["unacked"].is_number(), "{v}");
}

#[tokio::test(start_paused = true)]
async fn sessions_are_paged_in_id_order_and_filtered_by_prefix() {
    let mut s = TestServer::start(test_config()).await;
    let admin = start_admin(s.handle.clone(), AdminConfig::default()).await;
    let mut clients = Vec::new();
    for id in ["b-2", "a-1", "b-1", "c-1", "b-3"] {
        clients.push(Client::connect(s.addr, client_cfg(id)).await.unwrap());
    }
    for _ in 0..5 {
        s.wait(|k| matches!(k, EventKind::Online { .. })).await;
    }
    let ids = |v: &serde_json::Value| -> Vec<String> {
        v["sessions"].as_array().unwrap().iter().map(|s| s["client"].as_str().unwrap().to_owned()).collect()
    };
    let page = get(admin, "/v1/sessions?limit=2").await.json();
    assert_eq!(ids(&page), ["a-1", "b-1"]);
    assert_eq!(page["next"], "b-1");
    let page = get(admin, "/v1/sessions?limit=2&after=b-1").await.json();
    assert_eq!(ids(&page), ["b-2", "b-3"]);
    let page = get(admin, "/v1/sessions?prefix=b-&after=b-2").await.json();
    assert_eq!(ids(&page), ["b-3"]);
    assert_eq!(page["next"], serde_json::Value::Null);
    let all = get(admin, "/v1/sessions").await.json();
    assert_eq!(all["sessions"].as_array().unwrap().len(), 5);
    assert!(all["sessions"][0]["last_frame_ms"].is_number() && all["sessions"][0]["epoch"].is_number());
}

#[tokio::test(start_paused = true)]
async fn a_reliable_sessions_hold_is_on_the_api_online_and_offline_and_in_the_metrics() {
    let mut s = TestServer::start(test_config()).await;
    let admin = start_admin(s.handle.clone(), AdminConfig::default()).await;
    let link = tether::ReliableLink::new(tether::ReliableConfig::default());
    let cfg = ClientConfig { reliable: Some(link.clone()), ..client_cfg("r") };
    let mut r = Client::connect(s.addr, cfg.clone()).await.unwrap();
    s.wait(|k| matches!(k, EventKind::Online { .. })).await;
    let online = get(admin, "/v1/sessions/r").await.json();
    assert_eq!(online["session"]["client"], "r");
    assert_eq!((online["hold"]["online"].as_bool(), online["hold"]["messages"].as_u64()), (Some(true), Some(0)));
    r.close().await;
    s.wait(|k| matches!(k, EventKind::Offline { .. })).await;
    for i in 0..3 {
        s.handle.send("r", Bytes::from(format!("held {i}"))).unwrap();
    }
    // Offline, its session still holds what was sent to it, and says when it expires.
    let offline = get(admin, "/v1/sessions/r").await.json();
    assert_eq!(offline["session"], serde_json::Value::Null);
    let hold = &offline["hold"];
    assert_eq!(
        (hold["online"].as_bool(), hold["messages"].as_u64(), hold["assigned"].as_u64()),
        (Some(false), Some(3), Some(3))
    );
    assert_eq!(hold["expires_in_ms"].as_f64(), Some(120_000.0));
    let m = metrics(admin).await;
    assert_eq!((value(&m, "tether_held_messages"), value(&m, "tether_reliable_sessions")), (3.0, 1.0));
    assert_eq!(get(admin, "/v1/sessions/nobody").await.status, 404);
    // It resumes and takes them: nothing held.
    let mut r = Client::connect(s.addr, cfg).await.unwrap();
    for i in 0..3 {
        assert_eq!(support::next_data(&mut r).await, Bytes::from(format!("held {i}")));
    }
    let m = metrics(admin).await;
    assert_eq!(value(&m, "tether_reliable_resumed_total"), 1.0);
}

#[tokio::test(start_paused = true)]
async fn bad_input_gets_a_json_error_with_the_right_status() {
    let s = TestServer::start(test_config()).await;
    let admin = start_admin(s.handle.clone(), AdminConfig::default()).await;
    let cases: &[(&str, &str, Option<&str>, u16, &str)] = &[
        ("GET", "/v1/sessions?limit=0", None, 400, "limit"),
        ("GET", "/v1/sessions?limit=x", None, 400, "limit"),
        ("GET", "/v1/sessions?color=red", None, 400, "unknown query parameter"),
        ("GET", "/v1/disconnects?reason=gremlins", None, 400, "unknown reason"),
        ("GET", "/v1/sessions/nobody", None, 404, "not online"),
        ("POST", "/v1/sessions/nobody/kick", None, 404, "not online"),
        ("POST", "/v1/sessions/nobody/kick", Some("[1,2]"), 400, "JSON object"),
        ("POST", "/v1/sessions/nobody/kick", Some("{\"retry_after\": \"soon\"}"), 400, "retry_after"),
        ("POST", "/v1/drain", Some("{\"redirect\": \"no port\"}"), 400, "redirect"),
        ("POST", "/v1/drain", Some("{\"spread\": -1}"), 400, "spread"),
        ("POST", "/v1/drain", Some("{not json"), 400, "not valid JSON"),
        ("GET", "/v1/events?snapshots=maybe", None, 400, "snapshots"),
        ("GET", "/v2/anything", None, 404, "no such endpoint"),
    ];
    for (method, path, body, status, needle) in cases {
        let r = request(admin, method, path, *body, None).await;
        assert_eq!(r.status, *status, "{method} {path}: {}", r.body);
        let msg = r.json()["error"].as_str().unwrap_or_default().to_owned();
        assert!(msg.contains(needle), "{method} {path}: {msg:?} lacks {needle:?}");
    }
    // Nothing of the above changed the server.
    assert!(s.handle.is_ready());
    assert_eq!(get(admin, "/healthz").await.status, 200);
}

#[tokio::test(start_paused = true)]
async fn drain_is_paced_refuses_newcomers_and_can_be_undone() {
    let mut s = TestServer::start(test_config()).await;
    let admin = start_admin(s.handle.clone(), AdminConfig::default()).await;
    let mut clients = Vec::new();
    for i in 0..10 {
        clients.push(Client::connect(s.addr, client_cfg(&format!("d{i}"))).await.unwrap());
    }
    for _ in 0..10 {
        s.wait(|k| matches!(k, EventKind::Online { .. })).await;
    }
    assert_eq!(get(admin, "/readyz").await.status, 200);
    let t0 = tokio::time::Instant::now();
    let r =
        request(admin, "POST", "/v1/drain", Some(r#"{"redirect": "other.example:7400", "spread": "1s"}"#), None).await;
    assert_eq!(r.status, 202, "{}", r.body);
    let again = request(admin, "POST", "/v1/drain", Some("{}"), None).await;
    assert_eq!(again.status, 409, "{}", again.body);
    let ready = get(admin, "/readyz").await;
    assert_eq!((ready.status, ready.json()["reason"].clone()), (503, serde_json::json!("draining")));
    // Newcomers are sent to the redirect.
    let err = Client::connect(s.addr, client_cfg("late")).await.err().unwrap();
    let ConnectError::Refused(d) = err else { panic!("{err:?}") };
    assert_eq!((d.reason, d.alternative.as_deref()), (CloseReason::ServerShutdown, Some("other.example:7400")));
    // Everyone is told, with the redirect, paced over the spread: not all in the first batch.
    let mut told = Vec::new();
    for c in &mut clients {
        let d = next_disconnect(c).await;
        assert_eq!((d.reason, d.alternative.as_deref()), (CloseReason::ServerShutdown, Some("other.example:7400")));
        told.push(t0.elapsed());
    }
    told.sort();
    assert!(told[9] - told[0] >= Duration::from_millis(800), "goodbyes not paced: {told:?}");
    assert!(told[9] <= Duration::from_millis(1300), "drain too slow: {told:?}");
    let status = get(admin, "/v1/drain").await.json();
    assert_eq!((status["total"].clone(), status["sent"].clone()), (serde_json::json!(10), serde_json::json!(10)));
    // Undo: admitted again.
    let r = request(admin, "DELETE", "/v1/drain", None, None).await;
    assert_eq!((r.status, r.json()["draining"].clone()), (200, serde_json::json!(false)));
    assert_eq!(get(admin, "/readyz").await.status, 200);
    Client::connect(s.addr, client_cfg("welcome-back")).await.unwrap();
    assert_eq!(value(&metrics(admin).await, "tether_refused_total{reason=\"draining\"}"), 1.0);
}

#[tokio::test(start_paused = true)]
async fn the_token_is_required_and_compared() {
    let s = TestServer::start(test_config()).await;
    // A non-loopback admin address without a token is refused before anything is bound.
    let err = tether_admin::bind("0.0.0.0:0".parse().unwrap(), None).await.err().unwrap();
    assert!(err.to_string().contains("not loopback"), "{err}");
    assert!(tether_admin::check_exposure("[::]:7401".parse().unwrap(), Some("")).is_err());
    assert!(tether_admin::check_exposure("10.0.0.1:7401".parse().unwrap(), Some("t0ken")).is_ok());
    let cfg = AdminConfig { token: Some("s3cret-token".into()), open_metrics: true };
    let admin = start_admin(s.handle.clone(), cfg).await;
    let r = request(admin, "GET", "/v1/overview", None, None).await;
    assert_eq!(r.status, 401);
    assert!(r.headers.to_ascii_lowercase().contains("www-authenticate: bearer"), "{}", r.headers);
    assert_eq!(request(admin, "GET", "/v1/overview", None, Some("s3cret-tokeN")).await.status, 403);
    assert_eq!(request(admin, "GET", "/v1/overview", None, Some("s3cret")).await.status, 403);
    assert_eq!(request(admin, "POST", "/v1/drain", Some("{}"), Some("wrong")).await.status, 403);
    assert!(s.handle.is_ready(), "a refused request changed nothing");
    assert_eq!(request(admin, "GET", "/v1/overview", None, Some("s3cret-token")).await.status, 200);
    // Scrapers and health checks are open with open_metrics; the page itself carries no data.
    assert_eq!(get(admin, "/metrics").await.status, 200);
    assert_eq!(get(admin, "/healthz").await.status, 200);
    assert_eq!(get(admin, "/").await.status, 200);
    let closed = AdminConfig { token: Some("s3cret-token".into()), ..Default::default() };
    let admin = start_admin(s.handle.clone(), closed).await;
    assert_eq!(get(admin, "/metrics").await.status, 401);
}

#[tokio::test]
async fn start_records_the_bound_address_and_stop_ends_the_listener() {
    let s = TestServer::start(test_config()).await;
    assert_eq!(s.handle.admin_addr(), None);
    let admin =
        tether_admin::start("127.0.0.1:0".parse().unwrap(), AdminConfig::default(), s.handle.clone()).await.unwrap();
    let addr = admin.addr();
    assert_ne!(addr.port(), 0);
    assert_eq!(s.handle.admin_addr(), Some(addr));
    let overview = request(addr, "GET", "/v1/overview", None, None).await.json();
    assert_eq!(overview["server"]["listen"], s.addr.to_string(), "the bound address, not port 0");
    assert_eq!(overview["server"]["admin"], addr.to_string());
    admin.stop().await;
    assert!(tokio::net::TcpStream::connect(addr).await.is_err(), "stopped: nothing listens there");
}

#[tokio::test]
async fn stopping_the_listener_ends_its_event_streams_so_the_servers_own_stream_ends() {
    let mut server = tether::Server::bind(test_config()).await.unwrap();
    let mut events = server.events().unwrap();
    let admin =
        tether_admin::start("127.0.0.1:0".parse().unwrap(), AdminConfig::default(), server.handle()).await.unwrap();
    // An operator's open event stream: its connection holds a handle on the server.
    let watcher = open_event_stream(admin.addr(), None).await;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(server.run(async move {
        let _ = stopped.await;
    }));
    let _ = stop.send(());
    run.await.unwrap().unwrap();
    admin.stop().await;
    // The application's stream ends once nothing holds the server any more (the CLI's event printer waits for
    // that at shutdown): the watcher's connection was ended with the listener, though its client is still there.
    let ended = tokio::time::timeout(support::PATIENCE, async { while events.recv().await.is_some() {} }).await;
    assert!(ended.is_ok(), "an admin connection still holds the server after stop()");
    drop(watcher);
}

/// Open `/v1/events` on a fresh connection and return the socket once the response headers arrived (the watch
/// is registered before the handler answers).
async fn open_event_stream(admin: std::net::SocketAddr, rcvbuf: Option<u32>) -> tokio::net::TcpStream {
    use tokio::io::AsyncReadExt;
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    if let Some(n) = rcvbuf {
        sock.set_recv_buffer_size(n).unwrap();
    }
    let mut stream = sock.connect(admin).await.unwrap();
    stream.write_all(format!("GET /v1/events HTTP/1.1\r\nHost: {admin}\r\n\r\n").as_bytes()).await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        assert_eq!(stream.read(&mut b).await.unwrap(), 1, "stream closed before its headers");
        head.push(b[0]);
    }
    let head = String::from_utf8(head).unwrap();
    assert!(head.starts_with("HTTP/1.1 200") && head.contains("text/event-stream"), "{head}");
    stream
}

#[tokio::test]
async fn a_stalled_event_stream_is_cut_off_and_closed_while_a_reading_one_keeps_everything() {
    use tokio::io::AsyncReadExt;
    const EVENTS: usize = 8000;
    let mut s = TestServer::start(test_config()).await;
    let admin = start_admin(s.handle.clone(), AdminConfig::default()).await;
    let mut stalled = open_event_stream(admin, Some(4096)).await;
    let mut reader = open_event_stream(admin, None).await;
    let reading = tokio::spawn(async move {
        let (mut seen, mut buf, mut tail) = (0usize, vec![0u8; 64 * 1024], Vec::new());
        while seen < EVENTS {
            let n = reader.read(&mut buf).await.unwrap();
            assert!(n > 0, "the reading stream was closed after {seen} events");
            tail.extend_from_slice(&buf[..n]);
            // Count whole messages only; keep an incomplete last one for the next read.
            let done = tail.windows(2).rposition(|w| w == b"\n\n").map_or(0, |i| i + 2);
            seen += String::from_utf8_lossy(&tail[..done]).matches("\"event\":\"data\"").count();
            tail.drain(..done);
        }
        seen
    });
    // 8,000 events of 2 KiB each: 16 MiB for every watcher, far more than socket buffers and the cut-off
    // bound hold.
    let c = Client::connect(s.addr, client_cfg("talker")).await.unwrap();
    let payload = Bytes::from(vec![b'x'; 2048]);
    for _ in 0..EVENTS {
        c.send(None, payload.clone()).await.unwrap();
    }
    assert_eq!(tokio::time::timeout(Duration::from_secs(60), reading).await.unwrap().unwrap(), EVENTS);
    let m = metrics(admin).await;
    assert_eq!(value(&m, "tether_event_watchers_cut_total"), 1.0, "the stalled stream was not cut off");
    // Its connection is closed by the server: reading what it was sent ends, and it is far less than what was
    // emitted (the server did not keep queueing for it).
    let mut got = 0usize;
    let mut buf = vec![0u8; 64 * 1024];
    let read_all = async {
        loop {
            match stalled.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got += n,
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(30), read_all).await.expect("the stalled stream was left open");
    println!("the stalled reader was sent {got} bytes of 16 MiB+ emitted before its connection was closed");
    assert!(got < 10 * 1024 * 1024, "{got} bytes reached the stalled reader: the server kept queueing");
    // The server and its application never noticed.
    assert_eq!(s.handle.stats().online, 1);
    let _ = s.drain();
}

#[tokio::test(start_paused = true)]
async fn write_timeout_and_tls_error_are_counted_too() {
    // A peer that stops reading with data in flight: write_timeout, a deadline verdict with its lateness.
    let mut s = TestServer::start(support::write_stall_config()).await;
    let admin = start_admin(s.handle.clone(), AdminConfig::default()).await;
    let (p, _) = RawPeer::hello(s.addr, "stuck", 1).await;
    SockRef::from(&p.stream).set_recv_buffer_size(4096).unwrap();
    support::send_until_refused(&s.handle, "stuck", Bytes::from(vec![1u8; 32 * 1024]), 400).await;
    let k = s.wait(|k| offline_reason(k, "stuck").is_some()).await;
    assert_eq!(offline_reason(&k, "stuck"), Some(CloseReason::WriteTimeout));
    let m = metrics(admin).await;
    assert_disconnects(&m, &[(CloseReason::WriteTimeout, 1)]);
    assert_eq!(value(&m, "tether_verdict_lateness_seconds_count"), 1.0);
    assert!(value(&m, "tether_sent_bytes_total") > 64.0 * 1024.0, "the bytes that did leave are counted");
    drop(p);

    // A plaintext client on a TLS port: tls_error.
    let pki = tether::DevPki::generate(&["localhost", "127.0.0.1"], "device-1").unwrap();
    let mut cfg = test_config();
    let tls = tether::ServerTls::from_pem(pki.server_cert.as_bytes(), pki.server_key.as_bytes(), None).unwrap();
    cfg.tls = Some(tls);
    let mut s = TestServer::start(cfg).await;
    let admin = start_admin(s.handle.clone(), AdminConfig::default()).await;
    // One plaintext HELLO (a raw peer: the library client would retry once offering v1).
    let mut plain = RawPeer::connect(s.addr).await;
    plain.send(&support::hello_frame(2, "plain", 1)).await;
    s.wait(|k| matches!(k, EventKind::Closed { reason: CloseReason::TlsError, .. })).await;
    assert_disconnects(&metrics(admin).await, &[(CloseReason::TlsError, 1)]);
}

#[tokio::test(start_paused = true)]
async fn a_web_page_cannot_use_an_operators_browser_against_the_listener() {
    let mut s = TestServer::start(test_config()).await;
    let admin = start_admin(s.handle.clone(), AdminConfig::default()).await;
    let _c = Client::connect(s.addr, client_cfg("victim")).await.unwrap();
    s.wait(|k| matches!(k, EventKind::Online { .. })).await;
    let host = format!("Host: {admin}\r\n");
    // Another site's page: a no-cors POST carries its Origin; the browser also says cross-site.
    let evil = format!("{host}Origin: http://evil.example\r\n");
    let r = support_http::request_with(admin, "POST", "/v1/drain", Some("{}"), &evil).await;
    assert_eq!(r.status, 403, "{}", r.body);
    let r = support_http::request_with(admin, "POST", "/v1/sessions/victim/kick", None, &evil).await;
    assert_eq!(r.status, 403, "{}", r.body);
    let sfs = format!("{host}Sec-Fetch-Site: cross-site\r\n");
    assert_eq!(support_http::request_with(admin, "GET", "/v1/sessions", None, &sfs).await.status, 403);
    // DNS rebinding: a page on a name that now resolves to 127.0.0.1 reads with its own Host.
    let rebound = "Host: evil.example:7401\r\nOrigin: http://evil.example:7401\r\n";
    let r = support_http::request_with(admin, "GET", "/v1/sessions", None, rebound).await;
    assert_eq!(r.status, 403, "{}", r.body);
    assert!(r.json()["error"].as_str().unwrap().contains("Host"));
    assert!(s.handle.is_ready() && s.handle.stats().online == 1, "nothing happened");
    // The dashboard's own requests (same origin) and localhost work.
    let same = format!("{host}Origin: http://{admin}\r\nSec-Fetch-Site: same-origin\r\n");
    assert_eq!(support_http::request_with(admin, "GET", "/v1/sessions", None, &same).await.status, 200);
    let local = format!("Host: localhost:{}\r\n", admin.port());
    assert_eq!(support_http::request_with(admin, "GET", "/healthz", None, &local).await.status, 200);
    // Errors from outside the handlers are JSON too: a wrong method, an oversized body.
    let r = request(admin, "PUT", "/v1/drain", Some("{}"), None).await;
    assert_eq!(r.status, 405);
    assert!(r.json()["error"].is_string());
    let big = format!("{{\"retry_after\": \"{}\"}}", "x".repeat(20_000));
    let r = request(admin, "POST", "/v1/sessions/victim/kick", Some(&big), None).await;
    assert_eq!(r.status, 413, "{}", r.body);
    assert!(r.json()["error"].is_string());
}

#[tokio::test]
async fn the_cluster_is_on_the_api_and_in_the_metrics() {
    redis_or_skip!("admin cluster");
    let redis = support::redis::Redis::start();
    let mut cfg = test_config();
    let mut cc = tether::ClusterConfig::new(redis.url());
    cc.node_id = "a".into();
    cfg.cluster = Some(cc);
    let a = TestServer::start(cfg).await;
    let mut cfg = test_config();
    let mut cc = tether::ClusterConfig::new(redis.url());
    cc.node_id = "b".into();
    cfg.cluster = Some(cc);
    let b = TestServer::start(cfg).await;
    let _c = Client::connect(b.addr, client_cfg("dev")).await.unwrap();
    let admin = start_admin(a.handle.clone(), AdminConfig::default()).await;
    // Node a learns of dev on b through Redis.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let v = loop {
        let v = get(admin, "/v1/cluster").await.json();
        if v["remote_sessions"] == 1 || tokio::time::Instant::now() > deadline {
            break v;
        }
        tokio::task::yield_now().await;
    };
    assert_eq!((v["node"].as_str(), v["degraded"].as_bool()), (Some("a"), Some(false)), "{v}");
    assert_eq!(v["remote_sessions"], 1, "{v}");
    let nodes = v["nodes"].as_array().expect("the node table");
    let mut names: Vec<&str> = nodes.iter().map(|n| n["node"].as_str().unwrap()).collect();
    names.sort();
    assert_eq!(names, ["a", "b"], "{v}");
    let b_row = nodes.iter().find(|n| n["node"] == "b").unwrap();
    assert_eq!((b_row["sessions"].as_u64(), b_row["lost"].as_bool()), (Some(1), Some(false)), "{v}");
    let m = metrics(admin).await;
    assert_eq!(value(&m, "tether_cluster_degraded"), 0.0);
    assert!(value(&m, "tether_cluster_nodes") >= 1.0, "at least itself");
    assert_eq!(value(&m, "tether_cluster_remote_sessions"), 1.0);
    assert!(value(&m, "tether_cluster_redis_rtt_seconds_count") >= 1.0, "the lease was renewed and timed");
    // A single node says it is one.
    let single = TestServer::start(test_config()).await;
    let admin = start_admin(single.handle.clone(), AdminConfig::default()).await;
    assert_eq!(get(admin, "/v1/cluster").await.status, 404);
}
