//! Cluster presence and hand-over, with registries standing for nodes and explicit instants.

use super::*;
use std::collections::HashMap;

use crate::registry::{Output, RegistryConfig, SessionEvent};

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// What subscriber connections were told, in order: (to, id, state, reason).
fn told(r: &mut Registry) -> Vec<(ConnId, String, PresenceState, Option<CloseReason>)> {
    std::iter::from_fn(|| r.poll_output())
        .filter_map(|o| match o {
            Output::Notify { to, presence } => Some((to, presence.client_id, presence.state, presence.reason)),
            Output::Event(_) => None,
        })
        .collect()
}

fn watching(t: Instant, ids: &[&str]) -> Registry {
    let mut r = Registry::new(RegistryConfig::default());
    let ids: Vec<String> = ids.iter().map(|s| s.to_string()).collect();
    r.subscribe(t, 100, &ids).unwrap();
    told(&mut r);
    r
}

fn off(epoch: u64, reason: CloseReason) -> RemoteOffline {
    RemoteOffline { epoch, reason, by_client: false, last_seen_ago: ms(1500), grace: false }
}

const NEVER: fn(ConnId) -> Option<Instant> = |_| None;

#[test]
fn a_remote_session_is_online_suspect_and_offline_to_subscribers_here() {
    let t = Instant::now();
    let mut r = watching(t, &["*"]);
    assert_eq!(r.remote_online("x", "node-b", 5), None);
    r.remote_suspect("x", 5, ms(3000));
    r.remote_recovered("x", 5);
    r.remote_offline(t, "x", off(5, CloseReason::HeartbeatTimeout));
    use PresenceState::*;
    assert_eq!(
        told(&mut r),
        vec![
            (100, "x".into(), Online, None),
            (100, "x".into(), Suspect, None),
            (100, "x".into(), Online, None),
            (100, "x".into(), Offline, Some(CloseReason::HeartbeatTimeout)),
        ]
    );
    // A late subscriber learns when and why it left.
    r.subscribe(t + ms(10), 101, &["x".into()]).unwrap();
    let late: Vec<Output> = std::iter::from_fn(|| r.poll_output()).collect();
    let [Output::Notify { to: 101, presence }] = &late[..] else { panic!("{late:?}") };
    assert_eq!((presence.reason, presence.last_seen_ago_ms), (Some(CloseReason::HeartbeatTimeout), 1510));
}

#[test]
fn messages_about_an_older_session_are_ignored_whatever_their_order() {
    let t = Instant::now();
    let mut r = watching(t, &["x"]);
    r.remote_online("x", "node-b", 7);
    told(&mut r);
    // The offline of the session it replaced, and its online, arrive late.
    r.remote_offline(t, "x", off(6, CloseReason::Takeover));
    r.remote_online("x", "node-c", 6);
    r.remote_suspect("x", 6, ms(10));
    assert!(told(&mut r).is_empty());
    assert_eq!(r.remote_holder("x"), Some(("node-b", 7)));
    // A local session with a newer epoch wins over a remote one with an older.
    r.admit_cluster(t, "x", 1, 1, 9, &[], NEVER);
    assert_eq!(r.remote_online("x", "node-b", 8), None);
    assert_eq!(r.lookup("x"), Some(1));
}

#[test]
fn a_cross_node_takeover_is_no_flap_here_there_or_anywhere() {
    let t = Instant::now();
    // Node A holds x; node B gets a HELLO for it; node C only watches.
    let (mut a, mut b, mut c) = (watching(t, &["x"]), watching(t, &["x"]), watching(t, &["*"]));
    assert!(matches!(a.admit_cluster(t, "x", 11, 1, 5, &[], NEVER), Admission::Welcome { epoch: 5, evicted: None }));
    b.remote_online("x", "node-a", 5);
    c.remote_online("x", "node-a", 5);
    assert_eq!(told(&mut a).len() + told(&mut b).len() + told(&mut c).len(), 3, "each saw x come online once");

    // B asks A; the newcomer is another device, the holder alive: no conflict the first time.
    let granted = a.yield_to(t + ms(1), "x", 22, "node-b", |_| Some(t));
    let Yield::Granted { evicted: 1, displaced } = granted else { panic!("{granted:?}") };
    assert_eq!(displaced, vec![(11, ms(0))], "the holder's nonce goes with the id");
    // A closes its connection with takeover: nothing announced.
    a.disconnect(t + ms(2), 1, Some("x"), CloseReason::Takeover, false, t);
    // B admits with the next cluster epoch and publishes; A and C learn it.
    assert!(matches!(b.admit_cluster(t + ms(2), "x", 22, 7, 6, &displaced, NEVER), Admission::Welcome { .. }));
    assert_eq!(a.remote_online("x", "node-b", 6), None);
    c.remote_online("x", "node-b", 6);
    assert!(told(&mut a).is_empty() && told(&mut b).is_empty() && told(&mut c).is_empty(), "no flap");
    assert_eq!(c.remote_holder("x"), Some(("node-b", 6)));
    assert_eq!(a.online(), 0);
}

#[test]
fn id_conflict_holds_across_nodes_with_the_displaced_nonces_handed_over() {
    let t = Instant::now();
    let (mut a, mut b) = (watching(t, &[]), watching(t, &[]));
    // Device 1 holds x on A; device 2 takes it over on A: 1 is displaced.
    a.admit_cluster(t, "x", 1, 1, 1, &[], NEVER);
    a.admit_cluster(t + ms(100), "x", 2, 2, 2, &[], NEVER);
    // Device 1 fights back through node B while device 2 is alive: A says conflict.
    let alive = |now: Instant| move |_| Some(now);
    let t1 = t + ms(1000);
    assert_eq!(
        a.yield_to(t1, "x", 1, "node-b", alive(t1)),
        Yield::Conflict { holder: 2, retry_after: Duration::from_secs(30) }
    );
    assert_eq!(a.lookup("x"), Some(2));
    // Device 2 goes silent; device 1 gets the id through B, with both nonces handed over.
    let t2 = t + Duration::from_secs(20);
    let Yield::Granted { displaced, .. } = a.yield_to(t2, "x", 1, "node-b", |_| Some(t1)) else { panic!() };
    b.admit_cluster(t2, "x", 1, 9, 3, &displaced, NEVER);
    // Device 2 fights back at B while device 1 is alive there: B, not A, now refuses it.
    let t3 = t2 + ms(500);
    assert!(matches!(b.admit_cluster(t3, "x", 2, 10, 4, &[], alive(t3)), Admission::Conflict { holder: 9, .. }));
}

#[test]
fn an_id_claimed_elsewhere_is_closed_here_without_an_offline() {
    let t = Instant::now();
    let mut a = watching(t, &["x"]);
    a.admit_cluster(t, "x", 1, 1, 5, &[], NEVER);
    told(&mut a);
    // Another node claimed x without asking (its view was behind): the newer epoch evicts ours.
    assert_eq!(a.remote_online("x", "node-b", 6), Some(1));
    a.disconnect(t + ms(1), 1, Some("x"), CloseReason::Takeover, false, t);
    assert!(told(&mut a).is_empty());
    let evs: Vec<Output> = std::iter::from_fn(|| a.poll_output()).collect();
    assert!(!evs.iter().any(|o| matches!(o, Output::Event(SessionEvent::Offline { .. }))), "{evs:?}");
    assert_eq!(a.remote_holder("x"), Some(("node-b", 6)));
}

#[test]
fn a_lost_nodes_ids_wait_out_the_grace_and_a_return_cancels_them() {
    let t = Instant::now();
    let cfg = RegistryConfig { presence_grace: ms(2000), ..RegistryConfig::default() };
    let mut r = Registry::new(cfg);
    r.subscribe(t, 100, &["*".into()]).unwrap();
    r.remote_online("back", "dead", 1);
    r.remote_online("gone", "dead", 2);
    told(&mut r);
    let lost = |epoch| RemoteOffline { grace: true, ..off(epoch, CloseReason::NodeLost) };
    r.remote_offline(t, "back", lost(1));
    r.remote_offline(t, "gone", lost(2));
    assert!(told(&mut r).is_empty(), "not before the grace");
    assert_eq!(r.poll_timeout(), Some(t + ms(2000)));
    // One comes back through another node within the grace: no flap for it.
    r.remote_online("back", "alive", 3);
    r.handle_timeout(t + ms(2000));
    assert_eq!(told(&mut r), vec![(100, "gone".into(), PresenceState::Offline, Some(CloseReason::NodeLost))]);
    assert_eq!(r.remote_holder("back"), Some(("alive", 3)));
}

#[test]
fn snapshots_include_ids_online_elsewhere() {
    let t = Instant::now();
    let mut r = Registry::new(RegistryConfig::default());
    r.admit_cluster(t, "here", 1, 1, 1, &[], NEVER);
    r.remote_online("there", "node-b", 2);
    r.remote_suspect("there", 2, ms(100));
    told(&mut r);
    r.subscribe(t, 100, &["*".into()]).unwrap();
    let snap = told(&mut r);
    assert_eq!(
        snap,
        vec![(100, "here".into(), PresenceState::Online, None), (100, "there".into(), PresenceState::Suspect, None)]
    );
}

/// The view's digest of `node`, recomputed from scratch.
fn recomputed(r: &Registry, node: &str) -> NodeDigest {
    let ids = r.remote_ids_of(|n| n == node).remove(node).unwrap_or_default();
    NodeDigest { ids: ids.len(), xor: ids.iter().fold(0, |x, (id, e)| x ^ digest_of(id, *e)) }
}

#[test]
fn each_nodes_digest_follows_every_change_of_the_view() {
    let t = Instant::now();
    let mut r = watching(t, &["*"]);
    r.remote_online("a", "node-b", 1);
    r.remote_online("b", "node-b", 2);
    r.remote_online("c", "node-c", 3);
    // A newer session moves "a" to node-c; "b" ends; "d" is handed to node-c by a local session here.
    r.remote_online("a", "node-c", 4);
    r.remote_offline(t, "b", off(2, CloseReason::Bye));
    r.admit(t, "d", 9, 1, NEVER);
    assert!(matches!(r.yield_to(t, "d", 10, "node-c", NEVER), Yield::Granted { .. }));
    // And a remote id that moves here leaves the view.
    r.admit_cluster(t, "c", 11, 2, 6, &[], NEVER);
    let digests: HashMap<String, NodeDigest> = r.remote_digests().map(|(n, d)| (n.to_owned(), d)).collect();
    assert_eq!(digests.len(), 1, "node-b holds nothing any more: {digests:?}");
    assert_eq!(digests["node-c"], recomputed(&r, "node-c"));
    assert_eq!(digests["node-c"].ids, 2);
    // The share is the first 32 bits of SHA-1("a:4") (`printf a:4 | sha1sum`: 64b537c6...), as Redis's
    // `redis.sha1hex` gives them.
    assert_eq!(digest_of("a", 4), 0x64b5_37c6);
}

/// A node's view holds every id online elsewhere in the cluster: its slot in the map is memory per remote id
/// (BENCHMARKS.md). An id of up to 24 bytes lives in the slot itself, its node is a number: 40 bytes, no other
/// allocation.
#[test]
fn a_remote_id_costs_one_small_slot() {
    assert!(std::mem::size_of::<(compact_str::CompactString, Remote)>() <= 40);
    let id = compact_str::CompactString::from("device-0123456789abcdef");
    assert!(!id.is_heap_allocated(), "a 23-byte id is kept inline");
}

#[test]
fn a_node_whose_last_id_left_gives_its_number_to_the_next_node() {
    let t = Instant::now();
    let mut r = watching(t, &["*"]);
    r.remote_online("a", "node-b", 1);
    r.remote_online("b", "node-c", 2);
    // node-b's only id moves to node-c: node-b's number is free, and node-d takes it.
    r.remote_online("a", "node-c", 3);
    assert_eq!(r.nodes.iter().flatten().count(), 1);
    r.remote_online("d", "node-d", 4);
    assert_eq!(r.nodes.len(), 2, "a freed number is reused");
    assert_eq!(r.remote_holder("a"), Some(("node-c", 3)));
    assert_eq!(r.remote_holder("d"), Some(("node-d", 4)));
    let digests: HashMap<String, NodeDigest> = r.remote_digests().map(|(n, d)| (n.to_owned(), d)).collect();
    assert_eq!(digests.len(), 2);
    assert_eq!(digests["node-c"], recomputed(&r, "node-c"));
    assert_eq!(digests["node-d"], recomputed(&r, "node-d"));
    assert_eq!(r.remote_ids_of(|n| n == "node-c")["node-c"].len(), 2);
}

#[test]
fn an_ended_session_does_not_come_back_but_a_lost_one_does() {
    let t = Instant::now();
    let mut r = watching(t, &["*"]);
    r.remote_online("x", "node-b", 5);
    r.remote_offline(t, "x", off(5, CloseReason::Bye));
    told(&mut r);
    // A late `online` for the session that ended (or a repair that read Redis before it ended) changes nothing.
    r.remote_online("x", "node-b", 5);
    assert_eq!(r.remote_holder("x"), None);
    assert!(told(&mut r).is_empty());
    // A node declared lost comes back and registers the same session again: it is online again.
    r.remote_online("y", "node-c", 7);
    r.remote_offline(t, "y", off(7, CloseReason::NodeLost));
    told(&mut r);
    r.remote_online("y", "node-c", 7);
    assert_eq!(r.remote_holder("y"), Some(("node-c", 7)));
    assert_eq!(told(&mut r), vec![(100, "y".into(), PresenceState::Online, None)]);
}
