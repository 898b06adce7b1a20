//! The admin API's edges over real loopback sockets: parallel kicks of one session.

#[path = "../../tether/tests/support/mod.rs"]
mod support;
mod support_http;

use std::net::SocketAddr;

use support::{test_config, RawPeer, TestServer, PATIENCE};
use support_http::{request, start_admin, Reply};
use tether::proto::Frame;
use tether::CloseReason;
use tether_admin::AdminConfig;

/// One request, failing the test after [`PATIENCE`].
async fn call(admin: SocketAddr, method: &str, path: &str, body: Option<&str>) -> Reply {
    tokio::time::timeout(PATIENCE, request(admin, method, path, body, None)).await.expect("admin request hung")
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
