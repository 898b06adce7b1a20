//! The reliable rules in virtual time: explicit instants, no IO.

use super::*;

const LIMITS: Limits = Limits { messages: 4, bytes: 1 << 20 };

fn t0() -> Instant {
    Instant::now()
}

fn cfg() -> HoldConfig {
    HoldConfig {
        expiry: Duration::from_secs(120),
        per_session: Limits { messages: 3, bytes: 1 << 20 },
        total_bytes: 1 << 20,
        remember_ended: 2,
    }
}

fn table() -> Sessions<u32> {
    Sessions::new(cfg(), *b"store-01")
}

fn fresh() -> Offer {
    Offer { receipts: true, resume: None }
}

fn resume(token: Token, received: u64) -> Offer {
    Offer { receipts: true, resume: Some(Resume { token, received }) }
}

fn seqs_of(frames: &[Frame]) -> Vec<u64> {
    frames
        .iter()
        .map(|f| match f {
            Frame::Sdata { seq, .. } => *seq,
            Frame::Report(r) => r.seq,
            other => panic!("unexpected {other:?}"),
        })
        .collect()
}

#[test]
fn offers_and_grants_round_trip_and_wrong_lengths_are_ignored() {
    for offer in [fresh(), resume([7; 16], 42), Offer { receipts: false, resume: None }] {
        assert_eq!(Offer::find(&[offer.to_extension()]), Some(offer));
    }
    let grant = Grant { token: [9; 16], status: Status::Fresh, why: Some(LostWhy::Expired), received: 0, lost: 12 };
    assert_eq!(Grant::find(&[grant.to_extension()]), Some(grant));
    let odd = Extension { kind: ext::RELIABLE, value: Bytes::from_static(&[1, 2]) };
    assert_eq!(Offer::find(std::slice::from_ref(&odd)), None);
    assert_eq!(Grant::find(&[odd]), None);
    let mut bad_status = grant.to_extension().value.to_vec();
    bad_status[16] = 9;
    assert_eq!(Grant::find(&[Extension { kind: ext::RELIABLE, value: bad_status.into() }]), None);
}

#[test]
fn an_inbox_takes_the_next_drops_duplicates_and_refuses_gaps() {
    let now = t0();
    let mut inbox = Inbox::new(5);
    assert_eq!(inbox.accept(now, 6), Accept::New);
    assert_eq!(inbox.accept(now, 6), Accept::Duplicate);
    assert_eq!(inbox.accept(now, 3), Accept::Duplicate);
    assert_eq!(inbox.accept(now, 8), Accept::Gap { expected: 7 });
    assert_eq!(inbox.last(), 6);
}

#[test]
fn only_what_the_owner_confirmed_is_ever_acknowledged() {
    let now = t0();
    let mut inbox = Inbox::new(0);
    for seq in 1..=40 {
        inbox.accept(now, seq);
    }
    assert_eq!((inbox.ack_pending(), inbox.ack_due(now + ACK_DELAY * 10)), (None, None));
    inbox.confirm(now, 20);
    assert_eq!(inbox.ack_due(now), Some(20), "20 confirmed at once: due at once");
    inbox.confirm(now, 99);
    assert_eq!(inbox.taken(), 40, "never more than was received");
}

#[test]
fn acks_come_after_sixteen_messages_or_the_delay_never_one_per_message() {
    let now = t0();
    let mut inbox = Inbox::new(0);
    for seq in 1..ACK_EVERY as u64 {
        inbox.accept(now, seq);
        inbox.confirm(now, seq);
        assert_eq!(inbox.ack_due(now), None, "no ack before the 16th message");
    }
    inbox.accept(now, 16);
    assert_eq!(inbox.ack_due(now), None, "received, not yet taken by its owner");
    inbox.confirm(now, 16);
    assert_eq!(inbox.ack_due(now), Some(16));
    assert_eq!(inbox.poll_timeout(), None);
    // A lone message is acknowledged after the delay, exactly.
    inbox.accept(now, 17);
    inbox.confirm(now, 17);
    assert_eq!(inbox.poll_timeout(), Some(now + ACK_DELAY));
    assert_eq!(inbox.ack_due(now + ACK_DELAY - Duration::from_millis(1)), None);
    assert_eq!(inbox.ack_due(now + ACK_DELAY), Some(17));
    // Or earlier, riding with a frame sent anyway.
    inbox.accept(now, 18);
    inbox.confirm(now, 18);
    assert_eq!(inbox.ack_pending(), Some(18));
    assert_eq!(inbox.ack_pending(), None);
    // A duplicate is acknowledged again, so the sender stops replaying it.
    inbox.accept(now, 18);
    assert_eq!(inbox.ack_pending(), Some(18));
}

#[test]
fn an_outbox_refuses_at_its_bound_releases_on_ack_and_replays_after_a_resume() {
    let mut out: Outbox<&str> = Outbox::default();
    for (i, m) in ["a", "b", "c", "d"].into_iter().enumerate() {
        assert_eq!(out.push(m, 10, LIMITS), Ok(i as u64 + 1));
    }
    assert_eq!(out.push("e", 10, LIMITS), Err(Full { messages: 4, bytes: 40 }));
    let byte_bound = Limits { messages: 100, bytes: 45 };
    assert!(out.push("e", 10, byte_bound).is_err(), "bytes bound too");
    assert_eq!(out.next_unsent(), Some((1, &"a")));
    assert_eq!(out.next_unsent(), Some((2, &"b")));
    assert_eq!(out.ack(3), Err(AckError::Unsent { acked: 3, sent: 2 }), "3 was never sent");
    assert_eq!(out.ack(1), Ok(vec![(1, "a")]));
    assert_eq!(out.ack(1), Ok(vec![]), "acks are cumulative and idempotent");
    // The link dies; the peer had taken 2. Everything after it goes again, in order.
    assert_eq!(out.resume(2), Ok(vec![(2, "b")]));
    assert_eq!(out.next_unsent(), Some((3, &"c")));
    assert_eq!(out.next_unsent(), Some((4, &"d")));
    assert_eq!(out.next_unsent(), None);
    assert_eq!(out.resume(9), Err(AckError::Unsent { acked: 9, sent: 4 }), "a peer cannot have more than was sent");
    assert_eq!((out.len(), out.bytes()), (2, 20));
}

#[test]
fn a_resume_with_the_token_replays_what_the_client_did_not_receive() {
    let now = t0();
    let mut t = table();
    let opened = t.open("b", fresh(), [1; 8], 10);
    assert_eq!(opened.grant.status, Status::New);
    let token = opened.grant.token;
    assert_eq!(&token[..8], b"store-01");
    for p in ["x", "y"] {
        assert_eq!(t.push("b", "a", Bytes::from(p), None), Ok(Some(10)));
    }
    let (frames, more) = t.next_frames("b", &10, 1 << 16);
    assert_eq!((seqs_of(&frames), more), (vec![1, 2], false));
    assert!(t.received("b", &10, 7));
    // The link dies after the client took 1; the session waits, offline.
    t.detach(now, "b", &10);
    assert_eq!(t.hold_of("b").map(|h| h.online), Some(false));
    t.push("b", "a", Bytes::from("z"), None).unwrap();
    let opened = t.open("b", resume(token, 1), [2; 8], 11);
    assert_eq!(opened.grant, Grant { token, status: Status::Resumed, why: None, received: 7, lost: 0 });
    let (frames, _) = t.next_frames("b", &11, 1 << 16);
    assert_eq!(seqs_of(&frames), vec![2, 3]);
    assert_eq!(t.poll_timeout(), None, "a resumed session does not expire");
    assert_eq!(t.stats().replayed, 2);
}

#[test]
fn a_forged_or_stale_token_gets_a_fresh_session_never_the_stream() {
    let mut t = table();
    let real = t.open("b", fresh(), [1; 8], 10).grant.token;
    t.push("b", "a", Bytes::from("secret"), None).unwrap();
    let mut forged = real;
    forged[15] ^= 1;
    let opened = t.open("b", resume(forged, 0), [2; 8], 11);
    assert_eq!(opened.grant.status, Status::Fresh);
    assert_eq!(opened.grant.why, Some(LostWhy::Unknown));
    assert_eq!(opened.detached, Some(10), "the old session's connection no longer carries it");
    assert!(t.next_frames("b", &11, 1 << 16).0.is_empty(), "the newcomer gets nothing of the old stream");
    // The device that held the real token comes back: its session was replaced, and it is told so.
    let back = t.open("b", resume(real, 0), [3; 8], 12);
    assert_eq!((back.grant.status, back.grant.why, back.grant.lost), (Status::Fresh, Some(LostWhy::Replaced), 1));
    // A token from another run of the server.
    let mut other = real;
    other[0] ^= 1;
    let opened = t.open("c", resume(other, 3), [4; 8], 13);
    assert_eq!((opened.grant.why, opened.grant.lost), (Some(LostWhy::Restarted), u32::MAX));
}

#[test]
fn expiry_tells_every_sender_and_the_late_resume_says_how_many_were_lost() {
    let now = t0();
    let mut t = table();
    let a = t.open("a", fresh(), [1; 8], 1).grant.token;
    let b = t.open("b", fresh(), [2; 8], 2).grant.token;
    t.detach(now, "b", &2);
    let origin = |seq| Some(Origin::Client { id: "a".into(), token: a, seq });
    assert_eq!(t.push("b", "a", Bytes::from("1"), origin(1)), Ok(None), "held for an offline session");
    t.push("b", "a", Bytes::from("2"), origin(2)).unwrap();
    t.push("b", "", Bytes::from("3"), Some(Origin::App(77))).unwrap();
    assert_eq!(t.poll_timeout(), Some(now + Duration::from_secs(120)));
    assert!(t.expire(now + Duration::from_secs(119)).wake.is_empty());
    let fx = t.expire(now + Duration::from_secs(120));
    assert_eq!(fx.wake, vec![1]);
    assert_eq!(fx.app, vec![(77, Some(Undeliverable::Expired))]);
    let (frames, _) = t.next_frames("a", &1, 1 << 16);
    assert_eq!(
        frames,
        vec![Frame::Report(Report {
            seq: 1,
            peer: "b".into(),
            outcome: Some(Undeliverable::Expired),
            seqs: vec![1, 2]
        })]
    );
    let back = t.open("b", resume(b, 0), [3; 8], 3);
    assert_eq!((back.grant.status, back.grant.why, back.grant.lost), (Status::Fresh, Some(LostWhy::Expired), 3));
    assert_eq!(t.totals().2, held_size(16, 1), "only a's report is held");
}

#[test]
fn a_full_hold_refuses_counts_and_the_resume_says_continuity_was_lost() {
    let now = t0();
    let mut t = table();
    let b = t.open("b", fresh(), [2; 8], 2).grant.token;
    t.detach(now, "b", &2);
    for i in 0..3 {
        t.push("b", "a", Bytes::from(vec![i]), None).unwrap();
    }
    assert_eq!(t.push("b", "a", Bytes::from("x"), None), Err(PushError::Full));
    assert_eq!(t.push("b", "a", Bytes::from("y"), None), Err(PushError::Full));
    let back = t.open("b", resume(b, 0), [3; 8], 3);
    assert_eq!(back.grant.status, Status::ResumedWithLoss);
    assert_eq!((back.grant.why, back.grant.lost), (Some(LostWhy::HoldOverflow), 2));
    assert_eq!(seqs_of(&t.next_frames("b", &3, 1 << 16).0), vec![1, 2, 3], "what was held still arrives");
    assert_eq!(t.stats().overflows, 2);
}

#[test]
fn the_total_bound_refuses_even_below_the_per_session_bound() {
    let mut t: Sessions<u32> = Sessions::new(HoldConfig { total_bytes: 300, ..cfg() }, *b"store-01");
    t.open("b", fresh(), [2; 8], 2);
    t.push("b", "a", Bytes::from(vec![0; 100]), None).unwrap();
    assert_eq!(t.push("b", "a", Bytes::from(vec![0; 200]), None), Err(PushError::Full));
}

#[test]
fn receipts_reach_the_sender_when_the_receiver_acknowledges() {
    let mut t = table();
    let a = t.open("a", fresh(), [1; 8], 1).grant.token;
    t.open("b", Offer { receipts: false, resume: None }, [2; 8], 2);
    for seq in [5, 6] {
        let origin = Some(Origin::Client { id: "a".into(), token: a, seq });
        assert_eq!(t.push("b", "a", Bytes::from("m"), origin), Ok(Some(2)));
    }
    t.push("b", "", Bytes::from("app"), Some(Origin::App(9))).unwrap();
    t.next_frames("b", &2, 1 << 16);
    assert!(t.ack("b", &2, 4).is_err(), "only 3 were sent");
    let fx = t.ack("b", &2, 3).unwrap();
    assert_eq!((fx.wake, fx.app), (vec![1], vec![(9, None)]));
    let (frames, _) = t.next_frames("a", &1, 1 << 16);
    assert_eq!(frames, vec![Frame::Report(Report { seq: 1, peer: "b".into(), outcome: None, seqs: vec![5, 6] })]);
    // b did not ask for receipts: a's acknowledgement of the report sends it none.
    assert!(t.ack("a", &1, 1).unwrap().wake.is_empty());
    assert_eq!(t.totals(), (2, 0, 0));
}

#[test]
fn a_connection_that_no_longer_carries_the_session_does_not_detach_it() {
    let now = t0();
    let mut t = table();
    let token = t.open("b", fresh(), [2; 8], 2).grant.token;
    let opened = t.open("b", resume(token, 0), [3; 8], 3);
    assert_eq!(opened.detached, Some(2));
    t.detach(now, "b", &2);
    assert_eq!(t.hold_of("b").map(|h| h.online), Some(true));
    // Nor take messages, acknowledgements or items: the client sends them again on the new connection.
    t.push("b", "a", Bytes::from("m"), None).unwrap();
    assert!(!t.received("b", &2, 1));
    assert!(t.next_frames("b", &2, 1 << 16).0.is_empty());
    assert!(t.ack("b", &2, 1).unwrap().wake.is_empty());
    assert_eq!(seqs_of(&t.next_frames("b", &3, 1 << 16).0), vec![1]);
    assert_eq!(t.poll_timeout(), None);
}

#[test]
fn ended_tokens_are_remembered_within_a_bound() {
    let mut t = table();
    let mut tokens = Vec::new();
    for (i, id) in ["a", "b", "c"].into_iter().enumerate() {
        tokens.push(t.open(id, fresh(), [i as u8; 8], i as u32).grant.token);
        t.replace(id);
    }
    let why = |t: &mut Sessions<u32>, tok| t.open("z", resume(tok, 0), [9; 8], 9).grant.why;
    assert_eq!(why(&mut t, tokens[0]), Some(LostWhy::Unknown), "the oldest was forgotten (bound 2)");
    assert_eq!(why(&mut t, tokens[2]), Some(LostWhy::Replaced));
}

#[test]
fn reports_are_never_refused_but_a_sender_that_lets_them_pile_up_is_named_slow() {
    let mut t = table();
    let a = t.open("a", fresh(), [1; 8], 1).grant.token;
    t.open("b", fresh(), [2; 8], 2);
    t.detach(t0(), "b", &2);
    for seq in 1..=3 {
        t.push("b", "a", Bytes::from("m"), Some(Origin::Client { id: "a".into(), token: a, seq })).unwrap();
    }
    // a's own hold (bound 3) fills with reports it does not acknowledge.
    for seq in 4..=7 {
        assert_eq!(t.report("a", None, "b", Some(Undeliverable::HoldFull), vec![seq]), Some(1));
    }
    assert!(t.over_bound("a"));
    let fx = t.expire(t0() + Duration::from_secs(200));
    assert_eq!((fx.wake, fx.slow), (vec![1], vec![1]));
    assert_eq!(t.hold_of("a").map(|h| h.messages), Some(5), "every report is kept");
}

#[test]
fn reports_are_split_to_fit_the_frame_limit() {
    let now = t0();
    let cfg = HoldConfig { per_session: Limits { messages: 10_000, bytes: 4 << 20 }, ..cfg() };
    let mut t: Sessions<u32> = Sessions::new(cfg, *b"store-01").with_max_frame(crate::frame::MIN_MAX_FRAME);
    let a = t.open("a", fresh(), [1; 8], 1).grant.token;
    t.open("b", fresh(), [2; 8], 2);
    t.detach(now, "b", &2);
    for seq in 1..=1_000 {
        let origin = Some(Origin::Client { id: "a".into(), token: a, seq });
        t.push("b", "a", Bytes::from_static(b"m"), origin).unwrap();
    }
    t.expire(now + Duration::from_secs(120));
    let (frames, _) = t.next_frames("a", &1, 1 << 20);
    let mut told: Vec<u64> = Vec::new();
    for f in &frames {
        let len = f.encoded_len() - crate::frame::HEADER_LEN;
        assert!(len <= crate::frame::MIN_MAX_FRAME as usize, "a {len}-byte {}", f.name());
        let Frame::Report(r) = f else { panic!("{f:?}") };
        told.extend(&r.seqs);
    }
    assert_eq!(told, (1..=1_000).collect::<Vec<_>>(), "every message reported, once, in order");
}

#[test]
fn a_message_that_would_need_a_larger_frame_is_refused_not_held() {
    let mut t: Sessions<u32> = Sessions::new(cfg(), *b"store-01").with_max_frame(300);
    t.open("b", fresh(), [2; 8], 2);
    let fits = 300 - (1 + 8 + 1 + 1);
    assert!(t.push("b", "a", Bytes::from(vec![0; fits]), None).is_ok());
    assert_eq!(t.push("b", "a", Bytes::from(vec![0; fits + 1]), None), Err(PushError::TooLarge));
    // The largest relay a client may send as SDATA always fits, whatever the ids.
    for max in [crate::frame::MIN_MAX_FRAME, crate::frame::DEFAULT_MAX_FRAME, crate::frame::MAX_MAX_FRAME] {
        let payload = Bytes::from(vec![0; crate::frame::max_reliable_relay_payload(max)]);
        let relayed = Frame::Sdata { seq: u64::MAX, peer: "x".repeat(crate::frame::MAX_ID_LEN), payload };
        assert!(relayed.encoded_len() - crate::frame::HEADER_LEN <= max as usize);
    }
}

#[test]
fn a_resume_below_what_the_peer_acknowledged_is_refused_never_a_gap() {
    let mut out: Outbox<&str> = Outbox::default();
    for m in ["a", "b", "c", "d"] {
        out.push(m, 1, LIMITS).unwrap();
    }
    for _ in 0..3 {
        out.next_unsent();
    }
    out.ack(3).unwrap();
    assert_eq!(out.resume(1), Err(AckError::Behind { received: 1, acked: 3 }));
    // The server's table gives such a client a fresh session instead of a stream with a hole in it.
    let mut t = table();
    let token = t.open("b", fresh(), [2; 8], 2).grant.token;
    for p in ["x", "y", "z"] {
        t.push("b", "a", Bytes::from(p), None).unwrap();
    }
    t.next_frames("b", &2, 1 << 16);
    t.ack("b", &2, 2).unwrap();
    let opened = t.open("b", resume(token, 1), [3; 8], 3);
    assert_eq!((opened.grant.status, opened.grant.why), (Status::Fresh, Some(LostWhy::Unknown)));
}

#[test]
fn expiry_ends_a_bounded_batch_per_call_and_stays_due_for_the_rest() {
    let now = t0();
    let mut t = table();
    for i in 0..EXPIRE_BATCH + 3 {
        let id = format!("s{i}");
        t.open(&id, fresh(), [i as u8; 8], i as u32);
        t.detach(now, &id, &(i as u32));
    }
    let later = now + Duration::from_secs(120);
    t.expire(later);
    assert_eq!((t.totals().0, t.poll_timeout()), (3, Some(later)), "three left, still due");
    t.expire(later);
    assert_eq!((t.totals().0, t.poll_timeout()), (0, None));
}
