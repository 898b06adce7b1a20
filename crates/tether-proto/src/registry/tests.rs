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
    r.subscribe(100, &["a".into()]).unwrap();
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
    r.subscribe(100, &["*".into()]).unwrap();
    r.admit(t, "a", 1, 1, NEVER);
    drain(&mut r);
    // Same device (same nonce) reconnects from a fresh socket while the old one looks alive.
    let adm = r.admit(t + ms(10), "a", 1, 2, |_| Some(t + ms(9)));
    assert_eq!(adm, Admission::Welcome { epoch: 2, evicted: Some(1) });
    // The old connection now ends with takeover: subscribers hear nothing.
    r.disconnect(t + ms(11), 1, Some("a"), CloseReason::Takeover, t);
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
    r.subscribe(2, &["a".into()]).unwrap();
    drain(&mut r);
    r.disconnect(t + ms(15_000), 1, Some("a"), CloseReason::HeartbeatTimeout, t + ms(3000));
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
    r.subscribe(9, &["*".into()]).unwrap();
    r.admit(t, "a", 1, 1, NEVER);
    drain(&mut r);
    r.disconnect(t + ms(100), 1, Some("a"), CloseReason::Reset, t + ms(100));
    assert_eq!(r.poll_timeout(), Some(t + ms(5100)));
    assert!(notices(&drain(&mut r)).is_empty());
    // Back within the grace: no offline, no second online.
    r.admit(t + ms(2000), "a", 2, 2, NEVER);
    assert!(notices(&drain(&mut r)).is_empty());
    assert_eq!(r.poll_timeout(), None);
    // Lost for real: offline exactly when the grace runs out.
    r.disconnect(t + ms(3000), 2, Some("a"), CloseReason::Eof, t + ms(3000));
    r.handle_timeout(t + ms(7999));
    assert!(notices(&drain(&mut r)).is_empty());
    r.handle_timeout(t + ms(8000));
    assert_eq!(notices(&drain(&mut r)), vec![(9, "a".into(), PresenceState::Offline, Some(CloseReason::Eof))]);
    // A clean BYE is announced at once, grace or not.
    r.admit(t + ms(9000), "b", 1, 3, NEVER);
    drain(&mut r);
    r.disconnect(t + ms(9100), 3, Some("b"), CloseReason::Bye, t + ms(9100));
    assert_eq!(notices(&drain(&mut r)), vec![(9, "b".into(), PresenceState::Offline, Some(CloseReason::Bye))]);
}

#[test]
fn suspect_and_recovery_reach_subscribers() {
    let t = Instant::now();
    let mut r = Registry::new(RegistryConfig::default());
    r.admit(t, "a", 1, 1, NEVER);
    r.subscribe(2, &["a".into()]).unwrap();
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
    r.subscribe(50, &["*".into(), "zz".into()]).unwrap();
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
    let mut r =
        Registry::new(RegistryConfig { max_subscriptions: 2, allow_wildcard: false, ..RegistryConfig::default() });
    assert_eq!(r.subscribe(1, &["*".into()]), Err(SubscribeError::WildcardRefused));
    r.subscribe(1, &["a".into(), "b".into()]).unwrap();
    r.subscribe(1, &["a".into()]).unwrap(); // already held: no new slot
    assert_eq!(r.subscribe(1, &["c".into()]), Err(SubscribeError::TooMany(2)));
    r.disconnect(Instant::now(), 1, None, CloseReason::Eof, Instant::now());
    assert!(r.subscribers.is_empty() && r.subscriptions.is_empty());
}
