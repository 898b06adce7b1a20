//! Authenticated HELLO over loopback with tokio's paused clock: forged, expired and wrong-id tokens are refused
//! (after the delay), a token for one id cannot take over another, takeover with a valid token works, and
//! subscriptions stay within the token.

mod support;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use support::{test_config, TestServer};
use tether::proto::PresenceState;
use tether::{Auth, Client, ClientConfig, ClientEvent, CloseReason, ConnectError, EventKind, HmacTokens, ServerConfig};

const SECRET: &[u8] = b"test secret, at least 16 bytes";

fn secured() -> (ServerConfig, Arc<HmacTokens>) {
    let tokens = Arc::new(HmacTokens::new(SECRET.to_vec()).unwrap());
    let mut cfg = test_config();
    cfg.auth = Some(Auth(tokens.clone()));
    cfg.auth_fail_delay = Duration::from_secs(1);
    (cfg, tokens)
}

fn with_token(id: &str, token: &str, nonce: u64) -> ClientConfig {
    ClientConfig { credential: token.as_bytes().to_vec(), nonce: Some(nonce), ..ClientConfig::new(id) }
}

async fn refused(addr: std::net::SocketAddr, cfg: ClientConfig) -> (CloseReason, Duration) {
    let t0 = tokio::time::Instant::now();
    match Client::connect(addr, cfg).await {
        Err(ConnectError::Refused(d)) => (d.reason, t0.elapsed()),
        Err(e) => panic!("expected a refusal, got {e}"),
        Ok(_) => panic!("admitted"),
    }
}

#[tokio::test(start_paused = true)]
async fn bad_credentials_are_refused_after_the_delay() {
    let (cfg, tokens) = secured();
    let mut s = TestServer::start(cfg).await;
    let now = SystemTime::now();
    let forged =
        HmacTokens::new(b"not the server's secret".to_vec()).unwrap().mint("a", now, Duration::from_secs(60), None);
    let expired = tokens.mint("a", now - Duration::from_secs(120), Duration::from_secs(60), None);
    let wrong_id = tokens.mint("b", now, Duration::from_secs(60), None);
    for (what, token) in [("none", String::new()), ("forged", forged), ("expired", expired), ("wrong id", wrong_id)] {
        let (reason, took) = refused(s.addr, with_token("a", &token, 1)).await;
        assert_eq!(reason, CloseReason::AuthFailed, "{what}");
        assert!(took >= Duration::from_secs(1), "{what}: refused after {took:?}, before the delay");
        let k = s.wait(|k| matches!(k, EventKind::Closed { .. })).await;
        assert!(matches!(k, EventKind::Closed { reason: CloseReason::AuthFailed, client: None, .. }), "{what}: {k:?}");
    }
    assert_eq!(s.handle.stats().online, 0);
}

#[tokio::test(start_paused = true)]
async fn a_token_for_one_id_cannot_take_over_another_but_its_own_holder_can() {
    let (cfg, tokens) = secured();
    let mut s = TestServer::start(cfg).await;
    let now = SystemTime::now();
    let tok_b = tokens.mint("b", now, Duration::from_secs(600), None);
    let tok_a = tokens.mint("a", now, Duration::from_secs(600), None);
    let mut b = Client::connect(s.addr, with_token("b", &tok_b, 1)).await.unwrap();
    // A's valid token, presented for id b: refused, and b keeps its session.
    let (reason, _) = refused(s.addr, with_token("b", &tok_a, 2)).await;
    assert_eq!(reason, CloseReason::AuthFailed);
    assert_eq!(s.handle.stats().online, 1);
    // b's own token from a fresh socket (a rebooted device): takeover.
    let _b2 = Client::connect(s.addr, with_token("b", &tok_b, 3)).await.unwrap();
    loop {
        match b.next_event().await.unwrap() {
            ClientEvent::Disconnected(d) => break assert_eq!(d.reason, CloseReason::Takeover),
            _ => continue,
        }
    }
    s.wait(|k| matches!(k, EventKind::Takeover { client, .. } if client == "b")).await;
}

#[tokio::test(start_paused = true)]
async fn subscriptions_stay_within_the_token() {
    let (cfg, tokens) = secured();
    let s = TestServer::start(cfg).await;
    let now = SystemTime::now();
    let tok = tokens.mint("w", now, Duration::from_secs(600), Some(&["x".to_string()]));
    let mut w = Client::connect(s.addr, with_token("w", &tok, 1)).await.unwrap();
    w.subscribe(vec!["x".into()]).await.unwrap();
    match w.next_event().await.unwrap() {
        ClientEvent::Presence(p) => assert_eq!((p.client_id.as_str(), p.state), ("x", PresenceState::Offline)),
        other => panic!("{other:?}"),
    }
    w.subscribe(vec!["*".into()]).await.unwrap();
    match w.next_event().await.unwrap() {
        ClientEvent::Disconnected(d) => assert_eq!(d.reason, CloseReason::AuthFailed),
        other => panic!("{other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn without_an_authenticator_the_server_is_open() {
    let s = TestServer::start(test_config()).await;
    Client::connect(s.addr, ClientConfig::new("anyone")).await.unwrap();
}
