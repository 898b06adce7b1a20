//! The admin API's edges over real loopback sockets: parallel kicks of one session, drain redirects that are not
//! addresses, query parameters no route knows, requests that name another host twice or in the request line, and
//! the content type of `/metrics`.

#[path = "../../tether/tests/support/mod.rs"]
mod support;
mod support_http;

use std::net::SocketAddr;
use std::time::Duration;

use support::{test_config, RawPeer, TestServer, PATIENCE};
use support_http::{get, request, request_with, start_admin, Reply};
use tether::proto::Frame;
use tether::{Client, ClientConfig, CloseReason};
use tether_admin::AdminConfig;

/// One request, failing the test after [`PATIENCE`].
async fn call(admin: SocketAddr, method: &str, path: &str, body: Option<&str>) -> Reply {
    tokio::time::timeout(PATIENCE, request(admin, method, path, body, None)).await.expect("admin request hung")
}

/// The `error` of a JSON error reply.
fn error_of(r: &Reply) -> String {
    r.json()["error"].as_str().unwrap_or_else(|| panic!("no error message: {}", r.body)).to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn parallel_kicks_of_one_session_have_exactly_one_winner() {
    const ROUNDS: usize = 20;
    const KICKS: usize = 16;
    let s = TestServer::start(test_config()).await;
    let admin = start_admin(s.handle.clone(), AdminConfig::default()).await;
    for round in 0..ROUNDS {
        let id = format!("k{round}");
        // A peer that does not read: the session stays registered while the server lingers after its BYE, so
        // the losers find it still online but already leaving.
        let (mut peer, _) = RawPeer::hello(s.addr, &id, 1).await;
        let mut kicks = tokio::task::JoinSet::new();
        for _ in 0..KICKS {
            let path = format!("/v1/sessions/{id}/kick");
            kicks.spawn(async move { call(admin, "POST", &path, Some(r#"{"retry_after": "2s"}"#)).await });
        }
        let mut replies = Vec::new();
        while let Some(r) = kicks.join_next().await {
            let r = r.unwrap();
            replies.push((r.status, r.body));
        }
        let won: Vec<_> = replies.iter().filter(|(status, _)| *status == 200).collect();
        assert_eq!(won.len(), 1, "round {round}: {} kicks answered 200: {replies:?}", won.len());
        for (status, body) in &replies {
            assert!(matches!(status, 200 | 409 | 404), "round {round}: {status} {body}");
            if *status == 409 {
                assert!(body.contains("already being disconnected"), "{body}");
            }
        }
        // The one kick that won is the one the client hears.
        let bye = loop {
            match peer.next_frame().await {
                Some(Frame::Bye(b)) => break b,
                Some(_) => continue,
                None => panic!("round {round}: no BYE"),
            }
        };
        assert_eq!((bye.reason, bye.retry_after_ms), (CloseReason::Kicked, 2000));
    }
}

/// `POST /v1/drain` with `redirect`; undone at once when it was accepted.
async fn drain_to(admin: SocketAddr, redirect: &str) -> Reply {
    let body = serde_json::json!({ "redirect": redirect, "spread": 0 }).to_string();
    let r = call(admin, "POST", "/v1/drain", Some(&body)).await;
    if r.status == 202 {
        assert_eq!(call(admin, "DELETE", "/v1/drain", None).await.status, 200);
    }
    r
}

#[tokio::test(start_paused = true)]
async fn drain_redirects_must_be_addresses() {
    let s = TestServer::start(test_config()).await;
    let admin = start_admin(s.handle.clone(), AdminConfig::default()).await;
    let refused: &[(&str, &str)] = &[
        ("http://evil.example:80", "scheme"),
        ("[zz]:80", "IPv6"),
        ("999.1.1.1:80", "IPv4"),
        ("1.2.3:80", "IPv4"),
        ("evil.example:80/path", "path"),
        ("user@evil.example:80", "userinfo"),
        ("evil example:80", "space"),
        ("evil.example", "port"),
        ("evil.example:0", "port"),
        ("evil.example:65536", "port"),
        ("evil.example:+80", "port"),
        (":80", "host"),
        ("-evil.example:80", "hyphen"),
        ("evil-.example:80", "hyphen"),
        ("evil..example:80", "label"),
        ("evil.example.:80", "label"),
        ("ev!l.example:80", "letters, digits"),
        ("2001:db8::1:80", "brackets"),
    ];
    let long_label = format!("{}.example:80", "a".repeat(64));
    // 254 bytes of name: with its port, longer than `BYE.alternative` carries (so a name is at most 253 bytes).
    let long_name = format!("{}:1", ["a".repeat(63), "a".repeat(63), "a".repeat(63), "a".repeat(62)].join("."));
    let mut cases: Vec<(&str, &str)> = refused.to_vec();
    cases.push((&long_label, "63"));
    cases.push((&long_name, "255 bytes"));
    for (redirect, needle) in cases {
        let r = drain_to(admin, redirect).await;
        assert_eq!(r.status, 400, "{redirect:?} was accepted: {}", r.body);
        let msg = error_of(&r);
        assert!(msg.contains(needle), "{redirect:?}: {msg:?} does not name {needle:?}");
        assert!(s.handle.is_ready(), "{redirect:?} started a drain");
    }
    let max_name = format!("{}:1", ["a".repeat(63), "a".repeat(63), "a".repeat(63), "a".repeat(61)].join("."));
    assert_eq!(max_name.len(), 255);
    for redirect in [
        "other.example:7400",
        "127.0.0.2:7401",
        "[::1]:7400",
        "[2001:db8::1]:1",
        "localhost:65535",
        "x1-2.a:9",
        &max_name,
    ] {
        let r = drain_to(admin, redirect).await;
        assert_eq!(r.status, 202, "{redirect:?}: {}", r.body);
    }
}

#[tokio::test(start_paused = true)]
async fn every_route_refuses_query_parameters_it_does_not_know() {
    let s = TestServer::start(test_config()).await;
    let admin = start_admin(s.handle.clone(), AdminConfig::default()).await;
    // A client that answers heartbeats: paused time runs ahead while the test waits on sockets.
    let mut present = ClientConfig::new("present");
    present.heartbeat_interval = Some(Duration::from_secs(1));
    let _present = Client::connect(s.addr, present).await.unwrap();
    let routes: &[(&str, &str, Option<&str>)] = &[
        ("GET", "/", None),
        ("GET", "/metrics", None),
        ("GET", "/healthz", None),
        ("GET", "/readyz", None),
        ("GET", "/v1/overview", None),
        ("GET", "/v1/sessions", None),
        ("GET", "/v1/sessions/present", None),
        ("POST", "/v1/sessions/present/kick", Some("{}")),
        ("POST", "/v1/sessions/present/probe", Some("{}")),
        ("GET", "/v1/disconnects", None),
        ("GET", "/v1/events", None),
        ("GET", "/v1/drain", None),
        ("POST", "/v1/drain", Some("{}")),
        ("DELETE", "/v1/drain", None),
        ("GET", "/v1/cluster", None),
    ];
    for (method, path, body) in routes {
        let r = call(admin, method, &format!("{path}?bogus=1"), *body).await;
        assert_eq!(r.status, 400, "{method} {path}?bogus=1: {}", r.body);
        let msg = error_of(&r);
        assert!(msg.contains("\"bogus\""), "{method} {path}: {msg:?} does not name the parameter");
    }
    // Refused before anything was done: the session is still here, and no drain began.
    assert_eq!(s.handle.stats().online, 1);
    assert!(s.handle.is_ready());
    // The parameters a route knows are still taken.
    assert_eq!(call(admin, "GET", "/v1/sessions?prefix=pr&limit=5", None).await.status, 200);
    assert_eq!(call(admin, "GET", "/v1/disconnects?reason=kicked&limit=5", None).await.status, 200);
    let r = call(admin, "GET", "/v1/sessions?prefix=pr&bogus=1&limit=5", None).await;
    assert!(error_of(&r).contains("known: prefix, limit, after"), "{}", r.body);
}

#[tokio::test(start_paused = true)]
async fn a_second_host_or_another_host_in_the_request_line_is_refused() {
    let s = TestServer::start(test_config()).await;
    let admin = start_admin(s.handle.clone(), AdminConfig::default()).await;
    let raw = |method: &'static str, target: String, headers: String| async move {
        tokio::time::timeout(PATIENCE, request_with(admin, method, &target, None, &headers)).await.expect("hung")
    };
    // Two Host headers: which one a proxy or this server believes is unknowable.
    let twice = format!("Host: {admin}\r\nHost: evil.example\r\n");
    let r = raw("GET", "/v1/overview".into(), twice).await;
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(error_of(&r).contains("Host"), "{}", r.body);
    let twice = format!("Host: evil.example\r\nHost: {admin}\r\n");
    assert_eq!(raw("GET", "/v1/overview".into(), twice).await.status, 400);
    // The absolute form's authority overrides Host (RFC 9112): another host there is a rebinding page's request.
    let r = raw("GET", "http://other.example/v1/overview".into(), format!("Host: {admin}\r\n")).await;
    assert_eq!(r.status, 403, "{}", r.body);
    assert!(error_of(&r).contains("other.example"), "{}", r.body);
    let r = raw("POST", "http://other.example:80/v1/drain".into(), format!("Host: {admin}\r\n")).await;
    assert_eq!(r.status, 403, "{}", r.body);
    assert!(s.handle.is_ready(), "a refused request started a drain");
    // The same by address is served, and so is an Origin that names it.
    let r = raw("GET", format!("http://{admin}/v1/overview"), format!("Host: {admin}\r\n")).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let origin = format!("Host: evil.example\r\nOrigin: http://{admin}\r\n");
    let r = raw("GET", format!("http://{admin}/v1/overview"), origin).await;
    assert_eq!(r.status, 200, "{}", r.body);

    // With a token the Host rule does not apply, but a second Host is still refused.
    let token = AdminConfig { token: Some("t0ken".into()), open_metrics: false };
    let admin = start_admin(s.handle.clone(), token).await;
    let twice = format!("Host: {admin}\r\nHost: {admin}\r\nAuthorization: Bearer t0ken\r\n");
    let r = tokio::time::timeout(PATIENCE, request_with(admin, "GET", "/v1/overview", None, &twice)).await.unwrap();
    assert_eq!(r.status, 400, "{}", r.body);
    // And so is an HTTP/1.1 request without one (RFC 9112).
    let none = "Authorization: Bearer t0ken\r\n";
    let r = tokio::time::timeout(PATIENCE, request_with(admin, "GET", "/v1/overview", None, none)).await.unwrap();
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(error_of(&r).contains("needs a Host header"), "{}", r.body);
}

#[tokio::test(start_paused = true)]
async fn metrics_are_labelled_as_the_openmetrics_they_are() {
    let s = TestServer::start(test_config()).await;
    let admin = start_admin(s.handle.clone(), AdminConfig::default()).await;
    let r = get(admin, "/metrics").await;
    assert_eq!(r.status, 200);
    let content_type = r
        .headers
        .lines()
        .find_map(|l| l.split_once(':').filter(|(k, _)| k.eq_ignore_ascii_case("content-type")))
        .map(|(_, v)| v.trim().to_owned());
    assert_eq!(content_type.as_deref(), Some("application/openmetrics-text; version=1.0.0; charset=utf-8"));
    assert!(r.body.ends_with("# EOF\n"), "not OpenMetrics: {:?}", &r.body[r.body.len().saturating_sub(40)..]);
}
