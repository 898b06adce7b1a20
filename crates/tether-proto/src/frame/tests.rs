//! Codec tests. The hex vectors are read from docs/protocol.md itself, so the document and the codec cannot drift.

use std::collections::HashMap;

use super::*;
use crate::reliable::{Grant, LostWhy, Offer, Resume, Status};

const SPEC: &str = include_str!("../../../../docs/protocol.md");

/// `(name, bytes)` of every line `PREFIX NAME: BYTES` in the spec. `BYTES` are hex groups separated by spaces; a
/// group `HH*N` is the byte `HH` repeated `N` times.
fn vectors(prefix: &str) -> Vec<(String, Vec<u8>)> {
    SPEC.lines()
        .filter_map(|l| l.trim().strip_prefix(prefix))
        .map(|rest| {
            let (name, groups) = rest.split_once(':').expect("vector line has a colon");
            let mut bytes = Vec::new();
            for group in groups.split_whitespace() {
                match group.split_once('*') {
                    Some((b, n)) => bytes.extend(std::iter::repeat_n(hex(b)[0], n.parse().unwrap())),
                    None => bytes.extend(hex(group)),
                }
            }
            (name.trim().to_owned(), bytes)
        })
        .collect()
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
}

fn hello(version: u8, heartbeat_ms: u32, nonce: u64, id: &str, credential: &'static [u8]) -> Frame {
    Frame::Hello(Hello {
        version,
        heartbeat_ms,
        nonce,
        client_id: id.into(),
        credential: Bytes::from_static(credential),
        extensions: vec![],
    })
}

fn welcome(version: u8, max_frame: Option<u32>, extensions: Vec<Extension>) -> Frame {
    Frame::Welcome(Welcome {
        version,
        heartbeat_ms: 5000,
        timeout_ms: 15000,
        epoch: 3,
        server_id: "s1".into(),
        max_frame,
        extensions,
    })
}

/// The session token of the spec's `reliable` vectors.
const TOKEN: crate::reliable::Token = *b"\x00\x11\x22\x33\x44\x55\x66\x77\x88\x99\xaa\xbb\xcc\xdd\xee\xff";

/// The spec's v2 `hello` with `extensions`.
fn hello_v2(extensions: Vec<Extension>) -> Frame {
    let Frame::Hello(h) = hello(2, 5000, 0x0102_0304_0506_0708, "dev-1", b"") else { unreachable!() };
    Frame::Hello(Hello { extensions, ..h })
}

/// The spec's v2 `welcome` with `max_subscriptions` = 1024 and the `reliable` grant `status`, `why`, `received`,
/// `lost` for [`TOKEN`].
fn welcome_reliable(status: Status, why: Option<LostWhy>, received: u64, lost: u32) -> Frame {
    let grant = Grant { token: TOKEN, status, why, received, lost };
    welcome(2, Some(65_536), vec![Extension::u32(ext::MAX_SUBSCRIPTIONS, 1024), grant.to_extension()])
}

fn presence(state: PresenceState, reason: Option<CloseReason>, last_seen_ago_ms: u32, flags: u8) -> Frame {
    Frame::Presence(Presence { client_id: "a".into(), state, reason, last_seen_ago_ms, flags })
}

fn expected(name: &str) -> Frame {
    match name {
        "hello" => hello(1, 5000, 0x0102_0304_0506_0708, "dev-1", b""),
        "hello-credential" => hello(1, 0, 42, "a", b"tok"),
        "hello-id-128" => hello(1, 5000, 0x0102_0304_0506_0708, &"a".repeat(128), b""),
        "welcome" => welcome(1, None, vec![]),
        "ping" => Frame::Ping { seq: 7, ts_ms: 1000 },
        "pong" => Frame::Pong { seq: 7, ts_ms: 1000 },
        "data-to" => Frame::Data { peer: "b".into(), payload: Bytes::from_static(b"hi") },
        "data-server" => Frame::Data { peer: String::new(), payload: Bytes::from_static(b"x") },
        "subscribe" => Frame::Subscribe(vec!["a".into(), "*".into()]),
        "unsubscribe" => Frame::Unsubscribe(vec!["a".into()]),
        "data-max" => Frame::Data { peer: String::new(), payload: Bytes::from(vec![0; 65_534]) },
        "presence-offline" => presence(PresenceState::Offline, Some(CloseReason::HeartbeatTimeout), 15000, 0),
        "presence-online" => presence(PresenceState::Online, None, 0, 0),
        "bye-shutdown" => {
            Frame::Bye(Bye { reason: CloseReason::ServerShutdown, retry_after_ms: 2500, alternative: String::new() })
        }
        "bye-alternative" => {
            Frame::Bye(Bye { reason: CloseReason::Busy, retry_after_ms: 1000, alternative: "127.0.0.2:7401".into() })
        }
        "undeliverable" => Frame::Undeliverable { to: "b".into(), why: Undeliverable::Unspecified },
        other => panic!("spec has vector {other} that the test does not know"),
    }
}

/// The frames of the spec's `vector2` lines (protocol version 2).
fn expected_v2(name: &str) -> Frame {
    match name {
        "hello" => hello(2, 5000, 0x0102_0304_0506_0708, "dev-1", b""),
        "hello-extension" => hello_v2(vec![Extension { kind: 0x7abc, value: Bytes::from_static(b"hi") }]),
        "welcome" => welcome(
            2,
            Some(65_536),
            vec![
                Extension::u32(ext::MAX_SUBSCRIPTIONS, 1024),
                Extension { kind: 0x7f00, value: Bytes::from_static(b"ab") },
            ],
        ),
        "presence-offline-by-client" => {
            presence(PresenceState::Offline, Some(CloseReason::Eof), 15000, presence_flags::BY_CLIENT)
        }
        "presence-online" => presence(PresenceState::Online, None, 0, 0),
        "undeliverable-too-large" => Frame::Undeliverable { to: "b".into(), why: Undeliverable::TooLarge },
        "undeliverable-not-online" => Frame::Undeliverable { to: "b".into(), why: Undeliverable::NotOnline },
        "bye-unknown-reason" => {
            Frame::Bye(Bye { reason: CloseReason::Unknown(0xee), retry_after_ms: 0, alternative: String::new() })
        }
        "hello-reliable" => hello_v2(vec![Offer { receipts: true, resume: None }.to_extension()]),
        "hello-resume" => {
            let resume = Some(Resume { token: TOKEN, received: 7 });
            hello_v2(vec![Offer { receipts: true, resume }.to_extension()])
        }
        "welcome-reliable" => welcome_reliable(Status::New, None, 0, 0),
        "welcome-resumed-with-loss" => welcome_reliable(Status::ResumedWithLoss, Some(LostWhy::HoldOverflow), 9, 3),
        "welcome-fresh-restarted" => welcome_reliable(Status::Fresh, Some(LostWhy::Restarted), 0, u32::MAX),
        "sdata" => Frame::Sdata { seq: 1, peer: "b".into(), payload: Bytes::from_static(b"hi") },
        "sdata-server" => Frame::Sdata { seq: 2, peer: String::new(), payload: Bytes::from_static(b"x") },
        "ack" => Frame::Ack { seq: 16 },
        "report-delivered" => Frame::Report(Report { seq: 3, peer: "b".into(), outcome: None, seqs: vec![1, 2] }),
        "report-hold-full" => {
            Frame::Report(Report { seq: 4, peer: "b".into(), outcome: Some(Undeliverable::HoldFull), seqs: vec![5] })
        }
        "hello-heartbeat-update" => hello_v2(vec![HeartbeatRange::offer()]),
        "welcome-heartbeat-update" => welcome(
            2,
            Some(65_536),
            vec![
                Extension::u32(ext::MAX_SUBSCRIPTIONS, 1024),
                HeartbeatRange { min_ms: 1000, max_ms: 300_000 }.extension(),
            ],
        ),
        "heartbeat-request" => Frame::Heartbeat { interval_ms: 10_000, timeout_ms: 0 },
        "heartbeat-grant" => Frame::Heartbeat { interval_ms: 10_000, timeout_ms: 30_000 },
        other => panic!("spec has vector2 {other} that the test does not know"),
    }
}

#[test]
fn spec_v2_vectors_parse_and_encode_exactly() {
    let ok = vectors("vector2 ");
    assert!(ok.len() >= 6, "spec lost v2 vectors: {}", ok.len());
    for (name, bytes) in ok {
        let frame = expected_v2(&name);
        assert_eq!(check(&bytes, DEFAULT_MAX_FRAME), Ok(Some(bytes.len())), "{name}: check");
        assert_eq!(Frame::parse_v(&bytes, V2).as_ref(), Ok(&frame), "{name}: parse");
        assert_eq!(&frame.to_bytes_v(V2)[..], &bytes[..], "{name}: encode");
        assert_eq!(frame.encoded_len_v(V2), bytes.len(), "{name}: encoded_len");
    }
    let Frame::Welcome(w) = expected_v2("welcome") else { unreachable!() };
    assert_eq!(Extension::find_u32(&w.extensions, ext::MAX_SUBSCRIPTIONS), Some(1024));
    assert_eq!(Extension::find_u32(&w.extensions, ext::MAX_DATA_RATE), None);
}

/// The `reliable` values of the spec's vectors, as `Offer::find` and `Grant::find` read them from the bytes.
#[test]
fn spec_reliable_vectors_carry_the_offers_and_grants_they_describe() {
    let frames: HashMap<String, Frame> =
        vectors("vector2 ").into_iter().map(|(name, bytes)| (name, Frame::parse_v(&bytes, V2).unwrap())).collect();
    let offer = |name: &str| match &frames[name] {
        Frame::Hello(h) => Offer::find(&h.extensions),
        other => panic!("{name}: {other:?}"),
    };
    let grant = |name: &str| match &frames[name] {
        Frame::Welcome(w) => Grant::find(&w.extensions),
        other => panic!("{name}: {other:?}"),
    };
    assert_eq!(offer("hello"), None);
    assert_eq!(offer("hello-reliable"), Some(Offer { receipts: true, resume: None }));
    let resume = Some(Resume { token: TOKEN, received: 7 });
    assert_eq!(offer("hello-resume"), Some(Offer { receipts: true, resume }));
    assert_eq!(grant("welcome"), None);
    let g = grant("welcome-reliable").unwrap();
    assert_eq!((g.token, g.status, g.why, g.received, g.lost), (TOKEN, Status::New, None, 0, 0));
    let g = grant("welcome-resumed-with-loss").unwrap();
    assert_eq!((g.status, g.why, g.received, g.lost), (Status::ResumedWithLoss, Some(LostWhy::HoldOverflow), 9, 3));
    assert!(g.continues());
    let g = grant("welcome-fresh-restarted").unwrap();
    assert_eq!((g.status, g.why, g.received, g.lost), (Status::Fresh, Some(LostWhy::Restarted), 0, u32::MAX));
    assert!(!g.continues());
}

#[test]
fn spec_v2_rejections_are_rejected() {
    let bad = vectors("reject2 ");
    assert!(bad.len() >= 2, "spec lost v2 rejection vectors: {}", bad.len());
    for (name, bytes) in bad {
        let n = check(&bytes, DEFAULT_MAX_FRAME).unwrap().expect("complete");
        let err = Frame::parse_v(&bytes[..n], V2).expect_err(&name);
        let expect_ok = match name.as_str() {
            "presence-without-flags" => matches!(err, FrameError::Truncated { kind: "PRESENCE" }),
            "duplicate-extension" => err == FrameError::DuplicateExtension(1),
            "extension-overruns-block" => matches!(err, FrameError::Truncated { kind: "WELCOME" }),
            "sdata-seq-0" | "report-seq-0-in-list" => err == FrameError::ZeroSeq,
            "report-lying-count" => matches!(err, FrameError::Truncated { kind: "REPORT" }),
            "ack-truncated" => matches!(err, FrameError::Truncated { kind: "ACK" }),
            "heartbeat-short" => matches!(err, FrameError::Truncated { kind: "HEARTBEAT" }),
            other => panic!("unknown v2 rejection vector {other}"),
        };
        assert!(expect_ok, "{name}: got {err:?}");
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
            "over-max" => matches!(err, FrameError::TooLarge { len: 65_537, max: 65_536 }),
            "hello-id-129" => err == FrameError::BadId(129),
            "hello-version-0" => err == FrameError::BadVersion(0),
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
fn an_extension_block_holds_at_most_64_entries() {
    let with = |n: u16| {
        let ext: Vec<Extension> = (0..n).map(|k| Extension { kind: k, value: Bytes::new() }).collect();
        let Frame::Hello(h) = hello(2, 0, 1, "a", b"") else { unreachable!() };
        Frame::Hello(Hello { extensions: ext, ..h }).to_bytes()
    };
    assert!(Frame::parse(&with(64)).is_ok());
    assert_eq!(Frame::parse(&with(65)), Err(FrameError::TooManyExtensions));
}

#[test]
fn a_reason_a_v1_peer_cannot_know_is_sent_to_it_as_bye() {
    let p = Presence {
        client_id: "a".into(),
        state: PresenceState::Offline,
        reason: Some(CloseReason::Unknown(0xee)),
        last_seen_ago_ms: 1,
        flags: 0,
    };
    let v1 = Frame::parse(&Frame::Presence(p.clone()).to_bytes_v(V1)).unwrap();
    assert!(matches!(v1, Frame::Presence(Presence { reason: Some(CloseReason::Bye), .. })), "{v1:?}");
    let v2 = Frame::parse_v(&Frame::Presence(p.clone()).to_bytes_v(V2), V2).unwrap();
    assert_eq!(v2, Frame::Presence(p));
}

#[test]
fn node_lost_is_unreachable_to_a_v1_peer_and_a_v1_decoder_refuses_its_code() {
    let p = Presence {
        client_id: "a".into(),
        state: PresenceState::Offline,
        reason: Some(CloseReason::NodeLost),
        last_seen_ago_ms: 1,
        flags: 0,
    };
    let v1_bytes = Frame::Presence(p.clone()).to_bytes_v(V1);
    let v1 = Frame::parse(&v1_bytes).unwrap();
    assert!(matches!(v1, Frame::Presence(Presence { reason: Some(CloseReason::Unreachable), .. })), "{v1:?}");
    let v2_bytes = Frame::Presence(p.clone()).to_bytes_v(V2);
    assert_eq!(Frame::parse_v(&v2_bytes, V2), Ok(Frame::Presence(p)));
    assert_eq!(CloseReason::NodeLost.code(), 22);
    // The same code in a v1 frame is one no v1 peer knows.
    let mut forged = v1_bytes.to_vec();
    let at = forged.len() - 5; // reason, then last_seen_ago_ms (u32)
    forged[at] = 22;
    assert_eq!(Frame::parse(&forged), Err(FrameError::BadReason(22)));
}

#[test]
fn foreign_protocols_are_recognised_from_their_first_bytes() {
    assert_eq!(sniff(b"GET / HTTP/1.1\r\n"), Some(Foreign::Http));
    assert_eq!(sniff(b"HTTP/1.1 200 OK"), Some(Foreign::Http));
    assert_eq!(sniff(b"SSH-2.0-x"), Some(Foreign::Ssh));
    assert_eq!(sniff(&[0x16, 0x03, 0x01, 0x02, 0x00]), Some(Foreign::Tls));
    assert_eq!(sniff(b"\x10\x0c\x00\x04MQTT\x04"), Some(Foreign::Mqtt { level: 4 }));
    assert_eq!(sniff(b"\x10\x81\x01\x00\x06MQIsdp\x03"), Some(Foreign::Mqtt { level: 3 }), "two-byte length");
    assert_eq!(sniff(b"\x10\x0c\x00\x04MQTX"), None);
    assert_eq!(sniff(&[0x10]), None);
    // A tether frame is none of them.
    assert_eq!(sniff(&Frame::Ping { seq: 1, ts_ms: 2 }.to_bytes()), None);
}

#[test]
fn relayed_payloads_fit_the_frame_limit_whatever_the_ids() {
    for max in [MIN_MAX_FRAME, DEFAULT_MAX_FRAME, MAX_MAX_FRAME] {
        let payload = Bytes::from(vec![0; max_relay_payload(max)]);
        let relayed = Frame::Data { peer: "x".repeat(MAX_ID_LEN), payload };
        assert_eq!(relayed.encoded_len_v(V2) - HEADER_LEN, max as usize);
    }
}

#[test]
fn overlong_strings_are_cut_on_char_boundaries() {
    let long = "é".repeat(200); // 400 bytes
    let f = Frame::Bye(Bye { reason: CloseReason::Busy, retry_after_ms: 0, alternative: long });
    let bytes = f.to_bytes();
    let Frame::Bye(b) = Frame::parse(&bytes).unwrap() else { panic!() };
    assert_eq!(b.alternative.len(), 254);
}
