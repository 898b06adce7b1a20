//! [`tether_admin::start`] serves on a thread of its own at the lowest priority, and everything the API does works
//! from there: the event stream, a probe and its timeout, a drain (whose paced goodbyes run on the server's
//! runtime and outlive the listener), the cluster's node table from Redis. Stopping or dropping the listener ends
//! its connections. Real clock: the listener's runtime is not the test's.

#[path = "../../tether/tests/support/mod.rs"]
mod support;
mod support_http;

use std::net::SocketAddr;
use std::time::Duration;

use support::{next_disconnect, test_config, RawPeer, TestServer, PATIENCE};
use support_http::{get, request};
use tether::{Client, ClientConfig, CloseReason, EventKind};
use tether_admin::{AdminConfig, AdminListener};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

async fn start(s: &TestServer) -> AdminListener {
    tether_admin::start("127.0.0.1:0".parse().unwrap(), AdminConfig::default(), s.handle.clone()).await.unwrap()
}

/// The nice value of every thread of this process named `name`, from `/proc/self/task/*/stat`.
fn nice_of_threads(name: &str) -> Vec<i64> {
    let tasks = std::fs::read_dir("/proc/self/task").expect("this process's threads");
    tasks
        .flatten()
        .filter(|t| std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim_end() == name))
        .filter_map(|t| {
            let stat = std::fs::read_to_string(t.path().join("stat")).ok()?;
            // After the command (in parentheses): state is field 3 and nice field 19 (1-based).
            stat.rsplit_once(')')?.1.split_whitespace().nth(16)?.parse().ok()
        })
        .collect()
}

/// Connecting to `addr` is refused, within [`PATIENCE`]: a child process another test forks at that moment
/// holds a copy of the listening socket until it execs.
async fn nothing_listens(addr: SocketAddr) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while TcpStream::connect(addr).await.is_ok() {
        assert!(tokio::time::Instant::now() < deadline, "{addr} still accepts connections");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// `GET /v1/events` on a fresh connection: the lines after the response head.
async fn event_stream(admin: SocketAddr) -> BufReader<TcpStream> {
    let mut s = TcpStream::connect(admin).await.unwrap();
    s.write_all(format!("GET /v1/events HTTP/1.1\r\nHost: {admin}\r\n\r\n").as_bytes()).await.unwrap();
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).await.unwrap();
    assert!(line.starts_with("HTTP/1.1 200"), "{line}");
    r
}

/// The next SSE data line containing `needle`, within [`PATIENCE`]; `None` when the stream ends first.
async fn event_with(stream: &mut BufReader<TcpStream>, needle: &str) -> Option<String> {
    let find = async {
        let mut line = String::new();
        loop {
            line.clear();
            if stream.read_line(&mut line).await.unwrap_or(0) == 0 {
                return None;
            }
            if line.starts_with("data: ") && line.contains(needle) {
                return Some(line.clone());
            }
        }
    };
    tokio::time::timeout(PATIENCE, find).await.expect("the event stream fell silent")
}

#[tokio::test]
async fn the_listener_runs_on_its_own_low_priority_thread_and_every_handler_works_there() {
    let mut s = TestServer::start(test_config()).await;
    let admin = start(&s).await;
    let addr = admin.addr();
    let mut events = event_stream(addr).await;
    #[cfg(target_os = "linux")]
    {
        // The stream's answer came from the admin thread, which lowers its priority before it serves.
        let nice = nice_of_threads("tether-admin");
        assert!(!nice.is_empty() && nice.iter().all(|n| *n == 19), "admin threads' nice values: {nice:?}");
    }

    // The event stream sees the server's events.
    let mut c = Client::connect(s.addr, ClientConfig::new("dev")).await.unwrap();
    assert!(event_with(&mut events, r#""client":"dev""#).await.is_some(), "no online event");

    // A probe answered, and one left unanswered ends at its timeout, on the admin runtime's clock.
    let r = request(addr, "POST", "/v1/sessions/dev/probe", Some("{}"), None).await;
    assert_eq!((r.status, r.json()["verdict"].as_str()), (200, Some("ok")), "{}", r.body);
    let (_mute, _) = RawPeer::hello(s.addr, "mute", 1).await;
    s.wait(|k| matches!(k, EventKind::Online { client, .. } if client == "mute")).await;
    let r = request(addr, "POST", "/v1/sessions/mute/probe", Some(r#"{"timeout": "300ms"}"#), None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    assert_eq!(v["app_rtt_ms"], serde_json::Value::Null, "{v}");
    assert!((300.0..PATIENCE.as_millis() as f64).contains(&v["waited_ms"].as_f64().unwrap()), "{v}");

    // A drain's goodbyes are paced on the server's runtime: they all go out though the listener stops at once.
    let r = request(addr, "POST", "/v1/drain", Some(r#"{"spread": "1s"}"#), None).await;
    assert_eq!(r.status, 202, "{}", r.body);
    admin.stop().await;
    assert_eq!(next_disconnect(&mut c).await.reason, CloseReason::ServerShutdown);
    s.wait(|k| matches!(k, EventKind::Offline { client, reason: CloseReason::ServerShutdown, .. } if client == "mute"))
        .await;
    // Stopped: its connections ended, nothing listens.
    assert_eq!(event_with(&mut events, "never").await, None, "the event stream outlived stop()");
    nothing_listens(addr).await;
}

#[tokio::test]
async fn dropping_the_listener_stops_it_without_waiting() {
    let s = TestServer::start(test_config()).await;
    let admin = start(&s).await;
    let addr = admin.addr();
    assert_eq!(get(addr, "/healthz").await.status, 200);
    let mut events = event_stream(addr).await;
    drop(admin);
    assert_eq!(event_with(&mut events, "never").await, None, "the event stream outlived the listener");
    nothing_listens(addr).await;
}

#[tokio::test]
async fn the_cluster_node_table_is_read_from_the_admin_thread() {
    redis_or_skip!("admin cluster from the admin thread");
    let redis = support::redis::Redis::start();
    let mut cfg = test_config();
    let mut cc = tether::ClusterConfig::new(redis.url());
    cc.node_id = "solo".into();
    cfg.cluster = Some(cc);
    let s = TestServer::start(cfg).await;
    let admin = start(&s).await;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let v = loop {
        let v = get(admin.addr(), "/v1/cluster").await.json();
        if v["nodes"].as_array().is_some_and(|n| !n.is_empty()) || tokio::time::Instant::now() > deadline {
            break v;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(v["node"], "solo", "{v}");
    let nodes = v["nodes"].as_array().expect("the node table");
    assert_eq!(nodes[0]["node"], "solo", "{v}");
    admin.stop().await;
}
