//! Backoff and failover policy with explicit instants and seeded jitter.

use super::*;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn cfg() -> ReconnectConfig {
    ReconnectConfig {
        backoff: BackoffConfig { initial: ms(100), max: ms(3200), multiplier: 2.0 },
        max_attempts: None,
        skip_failed_for: Duration::from_secs(30),
        return_to_primary: Some(Duration::from_secs(10)),
        reconnect_after_kick: false,
    }
}

fn delay(n: &Next) -> Duration {
    match n {
        Next::Connect { delay, .. } => *delay,
        other => panic!("{other:?}"),
    }
}

fn target(n: &Next) -> Target {
    match n {
        Next::Connect { target, .. } => target.clone(),
        other => panic!("{other:?}"),
    }
}

#[test]
fn full_jitter_stays_under_a_doubling_capped_ceiling() {
    let t = Instant::now();
    for seed in 0..200 {
        let mut r = Reconnect::new(1, cfg(), seed);
        r.connected(t, Target::Listed(0));
        let mut next = r.lost(t, Target::Listed(0), CloseReason::Reset, None, None);
        for k in 1..=10u32 {
            let ceiling = ms(100 * 2u64.pow(k - 1)).min(ms(3200));
            assert!(delay(&next) <= ceiling, "seed {seed} attempt {k}: {:?} > {ceiling:?}", delay(&next));
            assert!(matches!(next, Next::Connect { attempt, .. } if attempt == k));
            next = r.failed(t, Target::Listed(0), None, None, None);
        }
    }
}

#[test]
fn jitter_is_seeded_and_spreads_a_herd_evenly() {
    let t = Instant::now();
    let first = |seed| {
        let mut r = Reconnect::new(1, cfg(), seed);
        r.connected(t, Target::Listed(0));
        delay(&r.lost(t, Target::Listed(0), CloseReason::Eof, None, None))
    };
    assert_eq!(first(7), first(7), "same seed, same delay");
    // 10,000 clients lose their server at once: their first retries spread uniformly over [0, 100 ms).
    let mut buckets = [0u32; 10];
    for seed in 0..10_000 {
        let d = first(seed);
        buckets[(d.as_micros() / 10_000).min(9) as usize] += 1;
    }
    for (i, b) in buckets.iter().enumerate() {
        assert!((800..1200).contains(b), "bucket {i} has {b} of 10000: {buckets:?}");
    }
}

#[test]
fn failover_skips_recently_failed_servers_and_returns_later() {
    let t = Instant::now();
    let mut r = Reconnect::new(3, cfg(), 1);
    assert_eq!(target(&r.start(t)), Target::Listed(0));
    r.connected(t, Target::Listed(0));
    // The primary dies: the backup is next.
    let n = r.lost(t + ms(10), Target::Listed(0), CloseReason::HeartbeatTimeout, None, None);
    assert_eq!(target(&n), Target::Listed(1));
    // The backup refuses to connect: the third server.
    let n = r.failed(t + ms(20), Target::Listed(1), None, None, None);
    assert_eq!(target(&n), Target::Listed(2));
    // All three failed recently: the one that failed longest ago (the primary).
    let n = r.failed(t + ms(30), Target::Listed(2), None, None, None);
    assert_eq!(target(&n), Target::Listed(0));
    // Connected to the backup later; once the skip window passes, a loss goes to the primary first again.
    r.connected(t + ms(40), Target::Listed(1));
    let n = r.lost(t + Duration::from_secs(31), Target::Listed(1), CloseReason::Reset, None, None);
    assert_eq!(target(&n), Target::Listed(0));
}

#[test]
fn server_hints_override_delay_and_target() {
    let t = Instant::now();
    let mut r = Reconnect::new(2, cfg(), 1);
    r.connected(t, Target::Listed(0));
    let n = r.lost(t, Target::Listed(0), CloseReason::ServerShutdown, Some(ms(4321)), Some("127.0.0.9:7400".into()));
    assert_eq!(delay(&n), ms(4321), "retry_after overrides the backoff");
    assert_eq!(target(&n), Target::Alternative("127.0.0.9:7400".into()));
    // The alternative is tried once; then the list again (primary marked failed: the backup).
    let n = r.failed(t + ms(10), Target::Alternative("127.0.0.9:7400".into()), None, None, None);
    assert_eq!(target(&n), Target::Listed(1));
    // busy with retry_after, on connect.
    let n = r.failed(t + ms(20), Target::Listed(1), Some(CloseReason::Busy), Some(ms(7000)), None);
    assert_eq!(delay(&n), ms(7000));
}

#[test]
fn id_conflict_backs_off_as_told_without_blaming_the_server() {
    let t = Instant::now();
    let mut r = Reconnect::new(2, cfg(), 1);
    let n = r.failed(t, Target::Listed(0), Some(CloseReason::IdConflict), Some(ms(30_000)), None);
    assert_eq!(delay(&n), ms(30_000));
    assert_eq!(target(&n), Target::Listed(0), "the primary is still healthy");
}

#[test]
fn kicked_stops_unless_configured() {
    let t = Instant::now();
    let mut r = Reconnect::new(1, cfg(), 1);
    r.connected(t, Target::Listed(0));
    let n = r.lost(t, Target::Listed(0), CloseReason::Kicked, None, None);
    assert_eq!(n, Next::GiveUp { attempts: 0, last: CloseReason::Kicked });
    let mut r = Reconnect::new(1, ReconnectConfig { reconnect_after_kick: true, ..cfg() }, 1);
    r.connected(t, Target::Listed(0));
    assert!(matches!(r.lost(t, Target::Listed(0), CloseReason::Kicked, None, None), Next::Connect { .. }));
}

#[test]
fn max_attempts_gives_up_and_success_resets_the_count() {
    let t = Instant::now();
    let mut r = Reconnect::new(1, ReconnectConfig { max_attempts: Some(3), ..cfg() }, 1);
    r.connected(t, Target::Listed(0));
    assert!(matches!(r.lost(t, Target::Listed(0), CloseReason::Eof, None, None), Next::Connect { attempt: 1, .. }));
    assert!(matches!(r.failed(t, Target::Listed(0), None, None, None), Next::Connect { attempt: 2, .. }));
    assert!(matches!(r.failed(t, Target::Listed(0), None, None, None), Next::Connect { attempt: 3, .. }));
    r.connected(t, Target::Listed(0));
    assert!(matches!(r.lost(t, Target::Listed(0), CloseReason::Eof, None, None), Next::Connect { attempt: 1, .. }));
    r.failed(t, Target::Listed(0), None, None, None);
    r.failed(t, Target::Listed(0), None, None, None);
    let n = r.failed(t, Target::Listed(0), None, None, None);
    assert_eq!(n, Next::GiveUp { attempts: 3, last: CloseReason::Reset });
}

#[test]
fn primary_is_probed_only_from_a_backup() {
    let t = Instant::now();
    let mut r = Reconnect::new(2, cfg(), 1);
    r.connected(t, Target::Listed(0));
    assert_eq!(r.primary_probe_at(None), None);
    r.connected(t, Target::Listed(1));
    assert_eq!(r.primary_probe_at(None), Some(t + Duration::from_secs(10)));
    assert_eq!(r.primary_probe_at(Some(t + Duration::from_secs(12))), Some(t + Duration::from_secs(22)));
    let mut off = Reconnect::new(2, ReconnectConfig { return_to_primary: None, ..cfg() }, 1);
    off.connected(t, Target::Listed(1));
    assert_eq!(off.primary_probe_at(None), None);
}
