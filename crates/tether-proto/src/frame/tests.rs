//! Codec tests. The hex vectors are read from docs/protocol.md itself, so the document and the codec cannot drift.

use super::*;

const SPEC: &str = include_str!("../../../../docs/protocol.md");

/// `(name, bytes)` of every line `vector NAME: HEX` in the spec.
fn vectors(prefix: &str) -> Vec<(String, Vec<u8>)> {
    SPEC.lines()
        .filter_map(|l| l.trim().strip_prefix(prefix))
        .map(|rest| {
            let (name, hex) = rest.split_once(':').expect("vector line has a colon");
            let hex: String = hex.chars().filter(|c| !c.is_whitespace()).collect();
            let bytes = (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap()).collect();
            (name.trim().to_owned(), bytes)
        })
        .collect()
}

fn expected(name: &str) -> Frame {
    match name {
        "hello" => Frame::Hello(Hello {
            version: 1,
            heartbeat_ms: 5000,
            nonce: 0x0102_0304_0506_0708,
            client_id: "dev-1".into(),
            credential: Bytes::new(),
        }),
        "hello-credential" => Frame::Hello(Hello {
            version: 1,
            heartbeat_ms: 0,
            nonce: 42,
            client_id: "a".into(),
            credential: Bytes::from_static(b"tok"),
        }),
        "welcome" => Frame::Welcome(Welcome {
            version: 1,
            heartbeat_ms: 5000,
            timeout_ms: 15000,
            epoch: 3,
            server_id: "s1".into(),
        }),
        "ping" => Frame::Ping { seq: 7, ts_ms: 1000 },
        "pong" => Frame::Pong { seq: 7, ts_ms: 1000 },
        "data-to" => Frame::Data { peer: "b".into(), payload: Bytes::from_static(b"hi") },
        "data-server" => Frame::Data { peer: String::new(), payload: Bytes::from_static(b"x") },
        "subscribe" => Frame::Subscribe(vec!["a".into(), "*".into()]),
        "unsubscribe" => Frame::Unsubscribe(vec!["a".into()]),
        "presence-offline" => Frame::Presence(Presence {
            client_id: "a".into(),
            state: PresenceState::Offline,
            reason: Some(CloseReason::HeartbeatTimeout),
            last_seen_ago_ms: 15000,
        }),
        "presence-online" => Frame::Presence(Presence {
            client_id: "a".into(),
            state: PresenceState::Online,
            reason: None,
            last_seen_ago_ms: 0,
        }),
        "bye-shutdown" => {
            Frame::Bye(Bye { reason: CloseReason::ServerShutdown, retry_after_ms: 2500, alternative: String::new() })
        }
        "bye-alternative" => {
            Frame::Bye(Bye { reason: CloseReason::Busy, retry_after_ms: 1000, alternative: "127.0.0.2:7401".into() })
        }
        "undeliverable" => Frame::Undeliverable { to: "b".into() },
        other => panic!("spec has vector {other} that the test does not know"),
    }
}

#[test]
fn spec_vectors_parse_and_encode_exactly() {
    let ok = vectors("vector ");
    assert!(ok.len() >= 14, "spec lost vectors: {}", ok.len());
    for (name, bytes) in ok {
        let frame = expected(&name);
        assert_eq!(check(&bytes, DEFAULT_MAX_FRAME), Ok(Some(bytes.len())), "{name}: check");
        assert_eq!(Frame::parse(&bytes).as_ref(), Ok(&frame), "{name}: parse");
        assert_eq!(&frame.to_bytes()[..], &bytes[..], "{name}: encode");
        assert_eq!(frame.encoded_len(), bytes.len(), "{name}: encoded_len");
        // Every strict prefix is incomplete, never an error.
        for cut in 0..bytes.len() {
            assert_eq!(check(&bytes[..cut], DEFAULT_MAX_FRAME), Ok(None), "{name}: prefix {cut}");
        }
    }
}

#[test]
fn spec_rejections_are_rejected() {
    let bad = vectors("reject ");
    assert!(bad.len() >= 8, "spec lost rejection vectors: {}", bad.len());
    for (name, bytes) in bad {
        let err = match check(&bytes, DEFAULT_MAX_FRAME) {
            Err(e) => e,
            Ok(Some(n)) => Frame::parse(&bytes[..n]).expect_err(&name),
            Ok(None) => panic!("{name}: rejection vector is incomplete"),
        };
        let expect_ok = match name.as_str() {
            "huge-length" => matches!(err, FrameError::TooLarge { len: u32::MAX, .. }),
            "zero-length" => err == FrameError::Empty,
            "unknown-kind" => err == FrameError::UnknownKind(0x7f),
            "truncated-ping" => matches!(err, FrameError::Truncated { kind: "PING" }),
            "trailing-pong" => matches!(err, FrameError::Trailing { kind: "PONG", extra: 1 }),
            "empty-id" => err == FrameError::BadId(0),
            "bad-utf8-id" => matches!(err, FrameError::BadUtf8 { .. }),
            "bad-reason" => err == FrameError::BadReason(0xee),
            "bad-state" => err == FrameError::BadState(9),
            "lying-count" => matches!(err, FrameError::Truncated { kind: "SUBSCRIBE" }),
            other => panic!("unknown rejection vector {other}"),
        };
        assert!(expect_ok, "{name}: got {err:?}");
    }
}

#[test]
fn length_is_rejected_from_the_header_alone() {
    // Only the four header bytes of a 4 GiB frame: rejected without waiting for (or allocating) the body.
    assert_eq!(check(&[0xff, 0xff, 0xff, 0xff], 1024), Err(FrameError::TooLarge { len: u32::MAX, max: 1024 }));
    assert_eq!(check(&[0, 0, 4, 1], 1024), Err(FrameError::TooLarge { len: 1025, max: 1024 }));
    assert_eq!(check(&[0, 0, 4, 0], 1024), Ok(None));
}

#[test]
fn overlong_strings_are_cut_on_char_boundaries() {
    let long = "é".repeat(200); // 400 bytes
    let f = Frame::Bye(Bye { reason: CloseReason::Busy, retry_after_ms: 0, alternative: long });
    let bytes = f.to_bytes();
    let Frame::Bye(b) = Frame::parse(&bytes).unwrap() else { panic!() };
    assert_eq!(b.alternative.len(), 254);
}
