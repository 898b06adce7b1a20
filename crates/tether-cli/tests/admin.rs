//! `tether serve`'s admin listener from the outside: the live event stream over SSE carries exactly the objects
//! `--events json` prints, and the listener's start-up errors are clear.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::process::Command;
use std::sync::mpsc;

use common::{event, Proc, PATIENCE};
use serde_json::Value;

/// `tether serve` on ephemeral loopback ports with JSON events; returns it, its address and its admin address.
fn serve(extra: &[&str]) -> (Proc, String, Option<String>) {
    let mut args = vec!["serve", "--listen", "127.0.0.1:0", "--events", "json", "--insecure-no-auth"];
    args.extend_from_slice(extra);
    let p = Proc::spawn(&args);
    let first = p.expect("listening", |v| event(v) == "listening");
    let addr = first["addr"].as_str().unwrap().to_owned();
    let admin = first["admin"].as_str().map(str::to_owned);
    (p, addr, admin)
}

/// Open `/v1/events` and hand every SSE message's JSON to the returned channel (a reader thread).
fn event_stream(admin: &str) -> mpsc::Receiver<Value> {
    let mut s = TcpStream::connect(admin).unwrap();
    write!(s, "GET /v1/events HTTP/1.1\r\nHost: {admin}\r\n\r\n").unwrap();
    let mut r = BufReader::new(s);
    let mut status = String::new();
    r.read_line(&mut status).unwrap();
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        while r.read_line(&mut line).is_ok_and(|n| n > 0) {
            // Chunked framing lines are hex sizes; SSE data lines carry the events.
            if let Some(json) = line.trim_end().strip_prefix("data: ") {
                if tx.send(serde_json::from_str(json).expect("SSE data is JSON")).is_err() {
                    break;
                }
            }
            line.clear();
        }
    });
    rx
}

#[test]
fn the_event_stream_carries_the_same_objects_as_events_json() {
    let (srv, addr, admin) = serve(&["--admin", "127.0.0.1:0", "--heartbeat-interval", "1s"]);
    let admin = admin.expect("the listening event names the admin address");
    let sse = event_stream(&admin);
    // The stream is open before the first client: from here on both outputs see the same events.
    let a = Proc::spawn(&["connect", &addr, "--id", "a", "--json"]);
    srv.expect("a online", |v| event(v) == "online" && v["client"] == "a");
    let b = Proc::spawn(&["connect", &addr, "--id", "b", "--json", "--subscribe", "a"]);
    srv.expect("b online", |v| event(v) == "online" && v["client"] == "b");
    drop(a); // killed: eof
    let last = srv.expect("a offline", |v| event(v) == "offline" && v["client"] == "a");
    let mut streamed = Vec::new();
    while streamed.last() != Some(&last) {
        streamed.push(sse.recv_timeout(PATIENCE).expect("the stream fell silent"));
    }
    let printed: Vec<Value> = streamed
        .iter()
        .map(|v| if v["event"] == "online" || v["event"] == "offline" { v.clone() } else { Value::Null })
        .filter(|v| !v.is_null())
        .collect();
    assert_eq!(printed.len(), 3, "{streamed:?}");
    assert_eq!(printed[0]["client"], "a");
    assert_eq!(printed[1]["client"], "b");
    assert_eq!(printed[2], last, "the same object, timestamp included");
    assert_eq!(last["reason"], "eof");
    drop(b);
}

#[test]
fn the_admin_listener_is_named_refused_when_exposed_and_its_errors_are_clear() {
    let bin = env!("CARGO_BIN_EXE_tether");
    let base = ["serve", "--listen", "127.0.0.1:0", "--insecure-no-auth"];
    // A non-loopback admin address without a token: refused before anything listens.
    let out = Command::new(bin).args(base).args(["--admin", "0.0.0.0:0"]).env_remove("TETHER_ADMIN_TOKEN").output();
    let out = out.unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not loopback") && err.contains("--admin-token-file"), "{err}");
    // A taken admin port is a start-up error naming it.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().to_string();
    let out = Command::new(bin).args(base).args(["--admin", &port]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("cannot listen for the admin API on {port}")), "{err}");
    // `off`: no admin listener, and the listening event says so.
    let (_srv, _, admin) = serve(&["--admin", "off"]);
    assert_eq!(admin, None);
    // With --listen and no --admin: an ephemeral loopback port, so servers on one machine never collide.
    let (_srv, _, admin) = serve(&[]);
    let admin = admin.expect("an admin address");
    assert!(admin.starts_with("127.0.0.1:") && !admin.ends_with(":7401"), "{admin}");
    let body = tether_bench::scrape::get(admin.parse().unwrap(), "/metrics").unwrap();
    assert!(body.contains("tether_disconnects_total{reason=\"heartbeat_timeout\"} 0"), "{body}");
}

/// POST `path` with a JSON `body` to the admin listener; the reply's status and JSON body.
fn post(admin: &str, path: &str, body: &str) -> (u16, Value) {
    let (status, body) = tether_bench::scrape::request(admin.parse().unwrap(), "POST", path, Some(body)).unwrap();
    (status, serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}")))
}

#[test]
fn a_probe_from_the_server_tells_a_stalled_client_program_from_the_network() {
    let (srv, addr, admin) = serve(&["--admin", "127.0.0.1:0", "--heartbeat-interval", "5s"]);
    let admin = admin.unwrap();
    let c = Proc::spawn(&["connect", &addr, "--id", "dev", "--json"]);
    srv.expect("dev online", |v| event(v) == "online" && v["client"] == "dev");
    let (status, ok) = post(&admin, "/v1/sessions/dev/probe", "{}");
    assert_eq!(status, 200, "{ok}");
    assert_eq!(ok["verdict"], "ok", "{ok}");
    assert!(ok["app_rtt_ms"].as_f64().unwrap() < 100.0, "{ok}");
    // The client's process stops; its kernel still acknowledges what we send.
    c.signal(libc::SIGSTOP);
    let (status, stalled) = post(&admin, "/v1/sessions/dev/probe", r#"{"timeout": "1s"}"#);
    c.signal(libc::SIGCONT);
    assert_eq!(status, 200, "{stalled}");
    assert_eq!(stalled["verdict"], "client_stalled", "{stalled}");
    assert_eq!(stalled["app_rtt_ms"], Value::Null);
    assert_eq!(stalled["kernel"]["unacked"], 0, "its kernel acknowledged the PING: {stalled}");
    assert!(stalled["kernel"]["rtt_ms"].as_f64().unwrap() < 50.0, "the kernel RTT stays normal: {stalled}");
    assert!(stalled["evidence"].as_str().unwrap().contains("acknowledged everything"), "{stalled}");
    let (status, gone) = post(&admin, "/v1/sessions/nobody/probe", "{}");
    assert_eq!((status, gone["error"].as_str().is_some()), (404, true));
}

/// A probe that waits longer than the session's own heartbeat timeout: the server convicts the stopped client
/// meanwhile, and the probe still judges it by its socket as it closed, not by the socket's absence.
#[test]
fn a_probe_outlasting_the_heartbeat_timeout_still_tells_a_stalled_client() {
    let hb = ["--heartbeat-interval", "500ms", "--heartbeat-timeout", "1500ms"];
    let (srv, addr, admin) = serve(&["--admin", "127.0.0.1:0", hb[0], hb[1], hb[2], hb[3]]);
    let admin = admin.unwrap();
    let c = Proc::spawn(&["connect", &addr, "--id", "dev", "--json"]);
    srv.expect("dev online", |v| event(v) == "online" && v["client"] == "dev");
    c.signal(libc::SIGSTOP);
    let (status, v) = post(&admin, "/v1/sessions/dev/probe", r#"{"timeout": "10s"}"#);
    c.signal(libc::SIGCONT);
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["verdict"], "client_stalled", "{v}");
    assert_eq!(v["ended"]["reason"], "heartbeat_timeout", "{v}");
    assert_eq!(v["ended"]["by"], "server", "{v}");
    assert_eq!(v["kernel"]["unacked"], 0, "its kernel had acknowledged the PING: {v}");
    assert!(v["evidence"].as_str().unwrap().contains("meanwhile (heartbeat_timeout)"), "{v}");
    assert!(v["waited_ms"].as_f64().unwrap() < 10_000.0, "the probe ends with the session: {v}");
    srv.expect("dev offline", |v| event(v) == "offline" && v["reason"] == "heartbeat_timeout");
}
