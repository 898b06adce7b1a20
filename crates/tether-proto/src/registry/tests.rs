//! Registry tests with explicit instants.

use super::*;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn drain(r: &mut Registry) -> Vec<Output> {
    std::iter::from_fn(|| r.poll_output()).collect()
}

fn notices(out: &[Output]) -> Vec<(ConnId, String, PresenceState, Option<CloseReason>)> {
    out.iter()
        .filter_map(|o| match o {
            Output::Notify { to, presence } => Some((*to, presence.client_id.clone(), presence.state, presence.reason)),
            _ => None,
        })
        .collect()
}

fn events(out: &[Output]) -> Vec<SessionEvent> {
    out.iter().filter_map(|o| if let Output::Event(e) = o { Some(e.clone()) } else { None }).collect()
}

const NEVER: fn(ConnId) -> Option<Instant> = |_| None;

#[test]
fn first_hello_is_welcomed_and_announced() {
    let t = Instant::now();
    let mut r = Registry::new(RegistryConfig::default());
    r.subscribe(t, 100, &["a".into()]).unwrap();
    let snap = notices(&drain(&mut r));
    assert_eq!(snap, vec![(100, "a".into(), PresenceState::Offline, None)]);
    assert_eq!(r.admit(t, "a", 1, 1, NEVER), Admission::Welcome { epoch: 1, evicted: None });
    let out = drain(&mut r);
    assert_eq!(notices(&out), vec![(100, "a".into(), PresenceState::Online, None)]);
    assert_eq!(events(&out), vec![SessionEvent::Online { client: "a".into(), conn: 1, epoch: 1 }]);
    assert_eq!(r.lookup("a"), Some(1));
}

#[test]
fn takeover_evicts_at_once_with_a_new_epoch_and_no_flap() {
    let t = Instant::now();
    let mut r = Registry::new(RegistryConfig::default());
    r.subscribe(t, 100, &["*".into()]).unwrap();
    r.admit(t, "a", 1, 1, NEVER);
    drain(&mut r);
    // Same device (same nonce) reconnects from a fresh socket while the old one looks alive.
    let adm = r.admit(t + ms(10), "a", 1, 2, |_| Some(t + ms(9)));
    assert_eq!(adm, Admission::Welcome { epoch: 2, evicted: Some(1) });
    // The old connection now ends with takeover: subscribers hear nothing.
    r.disconnect(t + ms(11), 1, Some("a"), CloseReason::Takeover, false, t);
    let out = drain(&mut r);
    assert!(notices(&out).is_empty(), "no flap: {out:?}");
    assert!(matches!(&events(&out)[..], [SessionEvent::Takeover { old: 1, new: 2, epoch: 2, same_device: true, .. }]));
    assert_eq!(r.lookup("a"), Some(2));
    assert_eq!(r.online(), 1);
}

#[test]
fn reboot_with_new_nonce_takes_over_a_silent_holder() {
    let t = Instant::now();
    let mut r = Registry::new(RegistryConfig::default());
    r.admit(t, "dev", 1, 1, NEVER);
    // Reboot loop: every round a new nonce and connection; the previous one went silent 10 s before.
    for round in 1..=5u64 {
        let now = t + Duration::from_secs(20 * round);
        let silent_since = now - Duration::from_secs(10);
        let adm = r.admit(now, "dev", 1 + round, round + 1, |_| Some(silent_since));
        assert_eq!(adm, Admission::Welcome { epoch: 1 + round, evicted: Some(round) }, "round {round}");
    }
    assert!(!events(&drain(&mut r)).iter().any(|e| matches!(e, SessionEvent::IdConflict { .. })));
}

#[test]
fn two_live_devices_on_one_id_are_a_conflict_not_an_eviction_war() {
    let t = Instant::now();
    let mut r = Registry::new(RegistryConfig::default());
    let alive = |now: Instant| move |_| Some(now);
    r.admit(t, "x", 1, 1, NEVER); // device A
                                  // Device B (other nonce) arrives while A is alive: the first time, B wins (it may be A rebooted).
    let t1 = t + Duration::from_secs(1);
    assert_eq!(r.admit(t1, "x", 2, 2, alive(t1)), Admission::Welcome { epoch: 2, evicted: Some(1) });
    // A comes straight back while B is alive, within the window: conflict, A must back off.
    let t2 = t + Duration::from_secs(2);
    let adm = r.admit(t2, "x", 1, 3, alive(t2));
    assert_eq!(adm, Admission::Conflict { holder: 2, retry_after: Duration::from_secs(30) });
    assert!(events(&drain(&mut r)).contains(&SessionEvent::IdConflict { client: "x".into(), holder: 2, newcomer: 3 }));
    assert_eq!(r.lookup("x"), Some(2));
    // If B is silent (not alive) A may take over even within the window.
    let t3 = t + Duration::from_secs(20);
    assert!(matches!(r.admit(t3, "x", 1, 4, |_| Some(t1)), Admission::Welcome { evicted: Some(2), .. }));
    // B fights back at once while A is alive: now B is the one refused.
    let t4 = t3 + Duration::from_secs(1);
    assert!(matches!(r.admit(t4, "x", 2, 5, alive(t4)), Admission::Conflict { holder: 4, .. }));
    // After the window, the displaced nonce is forgotten: a plain takeover again (the two take turns).
    let t5 = t3 + Duration::from_secs(31);
    assert!(matches!(r.admit(t5, "x", 2, 6, alive(t5)), Admission::Welcome { evicted: Some(4), .. }));
}

#[test]
fn crash_looping_device_with_a_live_looking_holder_is_never_a_conflict() {
    // The device reboots every 2 s; each time its old connection was heard from just before (it looks alive),
    // but every boot brings a new nonce: always a takeover, never a conflict.
    let t = Instant::now();
    let mut r = Registry::new(RegistryConfig::default());
    r.admit(t, "dev", 100, 1, NEVER);
    for boot in 1..=20u64 {
        let now = t + Duration::from_secs(2 * boot);
        let adm = r.admit(now, "dev", 100 + boot, boot + 1, |_| Some(now - ms(100)));
        assert_eq!(adm, Admission::Welcome { epoch: boot + 1, evicted: Some(boot) }, "boot {boot}");
    }
}

#[test]
fn offline_is_announced_with_reason_and_last_seen() {
    let t = Instant::now();
    let mut r = Registry::new(RegistryConfig::default());
    r.admit(t, "a", 1, 1, NEVER);
    r.subscribe(t, 2, &["a".into()]).unwrap();
    drain(&mut r);
    r.disconnect(t + ms(15_000), 1, Some("a"), CloseReason::HeartbeatTimeout, false, t + ms(3000));
    let out = drain(&mut r);
    let [Output::Event(SessionEvent::Offline { reason: CloseReason::HeartbeatTimeout, .. }), Output::Notify { to: 2, presence }] =
        &out[..]
    else {
        panic!("{out:?}")
    };
    assert_eq!(presence.state, PresenceState::Offline);
    assert_eq!(presence.reason, Some(CloseReason::HeartbeatTimeout));
    assert_eq!(presence.last_seen_ago_ms, 12_000);
    assert_eq!(r.online(), 0);
}

#[test]
fn presence_grace_hides_a_quick_return_and_announces_a_real_loss() {
    let t = Instant::now();
    let cfg = RegistryConfig { presence_grace: ms(5000), ..RegistryConfig::default() };
    let mut r = Registry::new(cfg);
    r.subscribe(t, 9, &["*".into()]).unwrap();
    r.admit(t, "a", 1, 1, NEVER);
    drain(&mut r);
    r.disconnect(t + ms(100), 1, Some("a"), CloseReason::Reset, false, t + ms(100));
    assert_eq!(r.poll_timeout(), Some(t + ms(5100)));
    assert!(notices(&drain(&mut r)).is_empty());
    // Back within the grace: no offline, no second online.
    r.admit(t + ms(2000), "a", 2, 2, NEVER);
    assert!(notices(&drain(&mut r)).is_empty());
    assert_eq!(r.poll_timeout(), None);
    // Lost for real: offline exactly when the grace runs out.
    r.disconnect(t + ms(3000), 2, Some("a"), CloseReason::Eof, false, t + ms(3000));
    r.handle_timeout(t + ms(7999));
    assert!(notices(&drain(&mut r)).is_empty());
    r.handle_timeout(t + ms(8000));
    assert_eq!(notices(&drain(&mut r)), vec![(9, "a".into(), PresenceState::Offline, Some(CloseReason::Eof))]);
    // A clean BYE is announced at once, grace or not.
    r.admit(t + ms(9000), "b", 1, 3, NEVER);
    drain(&mut r);
    r.disconnect(t + ms(9100), 3, Some("b"), CloseReason::Bye, false, t + ms(9100));
    assert_eq!(notices(&drain(&mut r)), vec![(9, "b".into(), PresenceState::Offline, Some(CloseReason::Bye))]);
}

#[test]
fn suspect_and_recovery_reach_subscribers() {
    let t = Instant::now();
    let mut r = Registry::new(RegistryConfig::default());
    r.admit(t, "a", 1, 1, NEVER);
    r.subscribe(t, 2, &["a".into()]).unwrap();
    drain(&mut r);
    r.suspect(1, "a", ms(1400));
    r.suspect(1, "a", ms(1500)); // once only
    r.recovered(1, "a");
    let n = notices(&drain(&mut r));
    assert_eq!(n, vec![(2, "a".into(), PresenceState::Suspect, None), (2, "a".into(), PresenceState::Online, None)]);
}

#[test]
fn wildcard_snapshot_lists_everyone_online_sorted() {
    let t = Instant::now();
    let mut r = Registry::new(RegistryConfig::default());
    for (i, id) in ["c", "a", "b"].iter().enumerate() {
        r.admit(t, id, 1, i as u64 + 1, NEVER);
    }
    drain(&mut r);
    r.subscribe(t, 50, &["*".into(), "zz".into()]).unwrap();
    let snap = notices(&drain(&mut r));
    let ids: Vec<_> = snap.iter().map(|n| (n.1.as_str(), n.2)).collect();
    assert_eq!(
        ids,
        [
            ("a", PresenceState::Online),
            ("b", PresenceState::Online),
            ("c", PresenceState::Online),
            ("zz", PresenceState::Offline)
        ]
    );
}

#[test]
fn subscriptions_are_bounded_and_cleaned_up() {
    let t = Instant::now();
    let mut r =
        Registry::new(RegistryConfig { max_subscriptions: 2, allow_wildcard: false, ..RegistryConfig::default() });
    assert_eq!(r.subscribe(t, 1, &["*".into()]), Err(SubscribeError::WildcardRefused));
    r.subscribe(t, 1, &["a".into(), "b".into()]).unwrap();
    r.subscribe(t, 1, &["a".into()]).unwrap(); // already held: no new slot
    assert_eq!(r.subscribe(t, 1, &["c".into()]), Err(SubscribeError::TooMany(2)));
    r.disconnect(t, 1, None, CloseReason::Eof, false, t);
    assert!(r.subscribers.is_empty() && r.subscriptions.is_empty());
}

#[test]
fn id_conflict_holds_for_any_number_of_devices() {
    // 40 live devices share one id and keep fighting for it. Each may take it over once (it might be a rebooted
    // device); after that, every one that comes back within the window is refused while the holder is alive.
    let t = Instant::now();
    let mut r = Registry::new(RegistryConfig::default());
    let mut conn = 0;
    let mut next = || {
        conn += 1;
        conn
    };
    r.admit(t, "x", 1000, next(), NEVER);
    let (mut holder, mut changes) = (1000, 0);
    for round in 0..5u64 {
        for device in 0..40u64 {
            let now = t + ms(100 * (round * 40 + device + 1));
            match r.admit(now, "x", 1000 + device, next(), |_| Some(now)) {
                Admission::Welcome { evicted: Some(_), .. } => {
                    changes += usize::from(holder != 1000 + device);
                    holder = 1000 + device;
                }
                Admission::Welcome { evicted: None, .. } => panic!("the id is always held"),
                Admission::Conflict { .. } => {}
            }
        }
    }
    // Each of the 39 other devices took it once; 200 attempts within 20 s of one window changed the holder 39
    // times, and never again (with an exact memory of 16 nonces, the oldest ones used to evict the holder). The
    // holder's own reconnects (same nonce) are takeovers of its ghost, not changes.
    assert_eq!(changes, 39);
    // Memory per id is bounded: 16 exact nonces and one fixed-size filter.
    let s = r.sessions.get("x").unwrap();
    assert_eq!(s.displaced.exact().len(), DISPLACED_EXACT);
    assert!(s.displaced.0.as_ref().is_some_and(|n| n.overflow.is_some()));
    // After the window, the forgotten nonces take turns again, and the filter is released.
    let later = t + Duration::from_secs(60);
    assert!(matches!(r.admit(later, "x", 1001, next(), |_| Some(later)), Admission::Welcome { .. }));
    assert!(r.sessions.get("x").unwrap().displaced.0.as_ref().is_none_or(|n| n.overflow.is_none()));
}

#[test]
fn the_conflict_filter_never_forgets_early_and_rarely_errs() {
    let t = Instant::now();
    let window = Duration::from_secs(30);
    let mut f = StampFilter::new(t);
    for n in 0..100u64 {
        f.insert(n * 7919, t + ms(n * 10));
    }
    // Everything inserted is found for the whole window (later insertions may only keep a slot fresh longer),
    // and everything is gone a window after the last insertion.
    for n in 0..100u64 {
        assert!(f.contains(n * 7919, t + ms(n * 10) + window - ms(1), window), "nonce {n}");
        assert!(!f.contains(n * 7919, t + ms(990) + window + ms(200), window), "nonce {n} lingers");
    }
    // 100 devices in the window: other nonces are rarely mistaken for them.
    let false_positives = (1_000_000..1_010_000u64).filter(|n| f.contains(*n, t + ms(1000), window)).count();
    assert!(false_positives < 300, "{false_positives} in 10,000");
}

#[test]
fn a_late_subscriber_learns_when_and_why_an_id_left() {
    let t = Instant::now();
    let cfg =
        RegistryConfig { remember_offline: 2, remember_offline_for: Duration::from_secs(60), ..Default::default() };
    let mut r = Registry::new(cfg);
    r.admit(t, "a", 1, 1, NEVER);
    r.disconnect(t + ms(500), 1, Some("a"), CloseReason::HeartbeatTimeout, false, t + ms(200));
    drain(&mut r);
    // Subscribed 0.2 s after the verdict: offline, with the reason and the time since its last frame.
    r.subscribe(t + ms(700), 9, &["a".into(), "never".into()]).unwrap();
    let out = drain(&mut r);
    let presences: Vec<&Presence> = out
        .iter()
        .filter_map(|o| if let Output::Notify { presence, .. } = o { Some(presence) } else { None })
        .collect();
    assert_eq!((presences[0].reason, presences[0].last_seen_ago_ms), (Some(CloseReason::HeartbeatTimeout), 500));
    assert!(!presences[0].by_client());
    // An id never seen: offline, no reason, last seen unknown.
    assert_eq!((presences[1].reason, presences[1].last_seen_ago_ms), (None, u32::MAX));
    // A client that left by itself says so.
    r.admit(t + ms(800), "b", 1, 2, NEVER);
    r.disconnect(t + ms(900), 2, Some("b"), CloseReason::Bye, true, t + ms(900));
    r.subscribe(t + ms(1000), 9, &["b".into()]).unwrap();
    let out = drain(&mut r);
    let by_client = out
        .iter()
        .any(|o| matches!(o, Output::Notify { presence, .. } if presence.client_id == "b" && presence.by_client()));
    assert!(by_client, "{out:?}");
    // Coming back online forgets the record; the count bound forgets the oldest; the age bound forgets the rest.
    r.admit(t + ms(1100), "c", 1, 3, NEVER);
    r.disconnect(t + ms(1200), 3, Some("c"), CloseReason::Eof, true, t + ms(1200));
    assert!(!r.gone.contains_key("a") && r.gone.len() == 2, "the oldest of three is forgotten");
    r.admit(t + ms(1300), "b", 1, 4, NEVER);
    assert!(!r.gone.contains_key("b"));
    r.subscribe(t + Duration::from_secs(62), 9, &["c".into()]).unwrap();
    assert!(r.gone.is_empty(), "older than a minute: forgotten");
    assert_eq!(r.gone_order.len(), 0);
}

#[test]
fn subscription_count_follows_subscribe_unsubscribe_and_disconnect() {
    let t = Instant::now();
    let mut r = Registry::new(RegistryConfig::default());
    r.subscribe(t, 100, &["a".into(), "b".into(), "a".into()]).unwrap();
    r.subscribe(t, 100, &["b".into(), "c".into()]).unwrap();
    r.subscribe(t, 101, &["*".into()]).unwrap();
    assert_eq!(r.subscriptions(), 4);
    r.unsubscribe(100, &["a".into(), "zzz".into()]);
    assert_eq!(r.subscriptions(), 3);
    r.disconnect(t, 100, None, CloseReason::Eof, true, t);
    assert_eq!(r.subscriptions(), 1);
    r.admit(t, "a", 1, 7, NEVER);
    let online: Vec<_> = r.sessions().collect();
    assert_eq!(online, vec![("a", 7, false)]);
}
