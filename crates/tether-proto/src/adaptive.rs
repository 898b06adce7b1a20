//! The adaptive heartbeat's learner: the longest heartbeat interval a path's middleboxes allow, per network.
//!
//! A NAT or stateful firewall forgets a TCP connection that stays silent longer than its idle timeout (often a
//! few minutes on cellular paths). A heartbeat slower than that loses the connection; one much faster spends the
//! battery for nothing. The learner finds the timeout from what the connection itself shows, with no traffic of
//! its own:
//! - a `PING` sent after a silence of `idle` and answered proves the path keeps a silent connection that long
//!   ([`Learner::held`]);
//! - a `PING` the path lost after a silence, while a new connection to the same server went through, proves the
//!   path forgot it ([`Learner::forgot`]).
//!
//! Each network starts at the floor and doubles after every proof, up to the ceiling. The first loss bounds the
//! timeout from above; from then on the learner tries halfway between the longest silence that held and the
//! shortest that failed, never above `failed × (1 − margin)`. It stops after [`MAX_LOSSES`] losses or once the
//! next try would be less than 5 % longer than what held, and settles on the longest silence that held less the
//! margin. A loss after a silence no longer than one that held says the path changed (the NAT's timeout shrank,
//! or this is another NAT behind the same address), or that something else ended the connection (a server that
//! rebooted answers with a reset too): the search restarts from half the failed silence, below the shortest
//! silence that failed before, so a path that changed finds its new bound and a false alarm climbs back. Nothing
//! is asked above the ceiling or the maximum of the server connected to ([`Learner::connected`]). Networks are told apart by a key the caller chooses
//! (the tokio client uses the connection's local address); the learner keeps [`MAX_NETWORKS`], least recently
//! used first out.

use std::time::Duration;

/// Networks remembered at once.
pub const MAX_NETWORKS: usize = 16;
/// Losses one search may cost: the first, which bounds the timeout, and two to narrow it down.
pub const MAX_LOSSES: u8 = 3;

/// What the learner may choose from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdaptiveConfig {
    /// The interval a new network starts at, and the shortest the learner asks for.
    pub floor: Duration,
    /// The longest interval it asks for (the server's maximum applies too).
    pub ceiling: Duration,
    /// How far below the shortest silence the path failed the learner stays (0.1: 10 %).
    pub margin: f64,
}

impl Default for AdaptiveConfig {
    fn default() -> Self {
        AdaptiveConfig { floor: Duration::from_secs(30), ceiling: Duration::from_secs(15 * 60), margin: 0.1 }
    }
}

/// What is known of one network.
#[derive(Debug, Clone, PartialEq)]
struct Net {
    key: String,
    /// The longest silence a `PING` was answered after (zero: none yet).
    held: Duration,
    /// The shortest silence after which the path forgot the connection.
    failed: Option<Duration>,
    /// The interval in use.
    current: Duration,
    /// Losses since the search started (or restarted after a loss at a silence that had held).
    losses: u8,
    /// The most the server of the current connection grants ([`Learner::connected`]).
    cap: Duration,
}

/// The per-network state of the adaptive heartbeat. Sans-IO: the caller reports what each `PING` showed and asks
/// for the interval to use.
#[derive(Debug, Clone)]
pub struct Learner {
    cfg: AdaptiveConfig,
    /// Most recently used last.
    nets: Vec<Net>,
}

impl Learner {
    pub fn new(cfg: AdaptiveConfig) -> Learner {
        let floor = cfg.floor.max(Duration::from_millis(1));
        let cfg = AdaptiveConfig {
            floor,
            ceiling: cfg.ceiling.max(floor),
            margin: if cfg.margin.is_finite() { cfg.margin.clamp(0.0, 0.5) } else { 0.1 },
        };
        Learner { cfg, nets: Vec::new() }
    }

    pub fn config(&self) -> &AdaptiveConfig {
        &self.cfg
    }

    /// The interval to use on `network` now (a network seen for the first time starts at the floor).
    pub fn interval(&mut self, network: &str) -> Duration {
        self.net(network).current
    }

    /// A connection on `network` was welcomed with a heartbeat of `granted` (the server may have clamped what was
    /// asked), and its server grants at most `max` during it: the search goes on from there, and asks for no
    /// more than `max` while that connection lasts.
    pub fn connected(&mut self, network: &str, granted: Duration, max: Duration) {
        let net = self.net(network);
        net.current = granted;
        net.cap = max;
    }

    /// The server granted `interval` during the session (it may have clamped what was asked).
    pub fn granted(&mut self, network: &str, interval: Duration) {
        self.net(network).current = interval;
    }

    /// Whether the search on `network` is over: an interval at the ceiling (or the server's maximum) held, or the
    /// longest silence that held and the shortest that failed are within 5 % (margin applied), or it cost
    /// [`MAX_LOSSES`] losses.
    pub fn settled(&self, network: &str) -> bool {
        self.nets
            .iter()
            .find(|n| n.key == network)
            .is_some_and(|n| self.candidate(n).is_none() && (n.failed.is_some() || n.held >= n.current.mul_f64(0.9)))
    }

    /// A `PING` sent after `idle` of silence on `network` was answered. Returns the interval to use from now on
    /// when it changed. A silence much shorter than the interval in use (data kept the path busy) proves nothing
    /// new and changes nothing.
    pub fn held(&mut self, network: &str, idle: Duration) -> Option<Duration> {
        let i = self.index(network);
        let net = &mut self.nets[i];
        if idle < net.current.mul_f64(0.9) {
            return None;
        }
        net.held = net.held.max(idle);
        let next = self.next(&self.nets[i]);
        let net = &mut self.nets[i];
        (next != net.current).then(|| {
            net.current = next;
            next
        })
    }

    /// The path forgot the connection after `idle` of silence on `network`. Returns the interval to use next,
    /// shorter than `idle` unless that is the floor; `None`, and nothing learned, for a silence both much shorter
    /// than the interval in use and no longer than one that held (something else ended that connection). A
    /// shorter silence that is still longer than any that held (a connection's first `PING` comes early, at a
    /// random phase) bounds the timeout like any other.
    ///
    /// A loss after a silence no longer than one that held restarts the search from half of it, keeping the
    /// shortest silence that failed before as its upper bound: if the path really changed, the search finds the
    /// new bound; if the loss was something else (a server that rebooted, a misjudged path), it climbs back.
    pub fn forgot(&mut self, network: &str, idle: Duration) -> Option<Duration> {
        let (floor, i) = (self.cfg.floor, self.index(network));
        let ceiling = self.ceiling(&self.nets[i]);
        let net = &mut self.nets[i];
        if idle < net.current.mul_f64(0.9) && idle <= net.held {
            return None;
        }
        let next = if idle <= net.held {
            net.held = Duration::ZERO;
            net.losses = 0;
            idle / 2
        } else {
            net.failed = Some(net.failed.map_or(idle, |f| f.min(idle)));
            net.losses = net.losses.saturating_add(1);
            if net.held.is_zero() {
                idle / 2
            } else {
                self.next(&self.nets[i]).min(idle)
            }
        };
        let net = &mut self.nets[i];
        net.current = next.min(ceiling).max(floor);
        Some(net.current)
    }

    /// The longest interval `net` may use: the ceiling, and the maximum of the server it is connected to.
    fn ceiling(&self, net: &Net) -> Duration {
        self.cfg.ceiling.min(net.cap).max(self.cfg.floor)
    }

    /// The interval to use after what is known of `net`: the next to try, or where the search ended.
    fn next(&self, net: &Net) -> Duration {
        self.candidate(net).unwrap_or_else(|| self.settle(net))
    }

    /// The next interval to try, or `None` when the search is over: doubling until the first loss (up to the
    /// ceiling), then halfway between the longest silence that held and the shortest that failed, never above
    /// `failed × (1 − margin)`, for at most [`MAX_LOSSES`] losses, and while that is 5 % more than what held.
    fn candidate(&self, net: &Net) -> Option<Duration> {
        let ceiling = self.ceiling(net);
        match net.failed {
            // Doubling what is in use, not the silence measured (a round trip shorter).
            None => (net.current < ceiling).then(|| (net.current.max(net.held) * 2).min(ceiling)),
            Some(_) if net.held.is_zero() || net.losses >= MAX_LOSSES => None,
            Some(failed) => {
                let next = ((net.held + failed) / 2).min(failed.mul_f64(1.0 - self.cfg.margin)).min(ceiling);
                (next > net.held.mul_f64(1.05)).then_some(next)
            }
        }
    }

    /// The interval a finished search keeps: the ceiling when nothing failed; else the longest silence that held
    /// less the margin (a `PING` that comes a little late must still find the connection).
    fn settle(&self, net: &Net) -> Duration {
        match net.failed {
            None => net.current.max(net.held),
            Some(failed) => net.held.min(failed).mul_f64(1.0 - self.cfg.margin),
        }
        .min(self.ceiling(net))
        .max(self.cfg.floor)
    }

    fn net(&mut self, key: &str) -> &mut Net {
        let i = self.index(key);
        &mut self.nets[i]
    }

    /// The network's place, created at the floor if new, and made the most recently used.
    fn index(&mut self, key: &str) -> usize {
        let net = match self.nets.iter().position(|n| n.key == key) {
            Some(i) => self.nets.remove(i),
            None => {
                if self.nets.len() >= MAX_NETWORKS {
                    self.nets.remove(0);
                }
                Net {
                    key: key.to_owned(),
                    held: Duration::ZERO,
                    failed: None,
                    current: self.cfg.floor,
                    losses: 0,
                    cap: Duration::MAX,
                }
            }
        };
        self.nets.push(net);
        self.nets.len() - 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: fn(u64) -> Duration = Duration::from_secs;

    /// Run the learner against a NAT that forgets connections silent for `nat` or longer, for `steps` intervals:
    /// the intervals used, and the ones the path forgot. A `PING` goes out `rtt` before the interval's end after
    /// the last exchange.
    fn against(learner: &mut Learner, net: &str, nat: Duration, steps: usize) -> (Vec<Duration>, Vec<Duration>) {
        let rtt = Duration::from_millis(20);
        let (mut used, mut lost) = (Vec::new(), Vec::new());
        for _ in 0..steps {
            let interval = learner.interval(net);
            used.push(interval);
            let idle = interval - rtt;
            if idle < nat {
                learner.held(net, idle);
            } else {
                lost.push(interval);
                learner.forgot(net, idle);
            }
        }
        (used, lost)
    }

    fn cfg(floor: u64, ceiling: u64) -> AdaptiveConfig {
        AdaptiveConfig { floor: S(floor), ceiling: S(ceiling), margin: 0.1 }
    }

    #[test]
    fn converges_below_a_120_s_nat_within_ten_intervals_and_stays() {
        let mut l = Learner::new(cfg(30, 900));
        let (used, lost) = against(&mut l, "lte", S(120), 10);
        let settled_at = used.iter().rposition(|i| *i >= S(120)).map_or(0, |p| p + 1);
        assert!(settled_at < 10, "still losing the connection in the tenth interval: {used:?}");
        assert!(l.settled("lte"), "not settled after 10 intervals: {used:?}");
        let last = *used.last().unwrap();
        assert!(last < S(120) && last >= S(90), "settled at {last:?}: {used:?}");
        assert!(lost.len() <= usize::from(MAX_LOSSES), "lost {} times: {used:?}", lost.len());
        eprintln!("120 s NAT, from 30 s: {used:?}");
        // After converging: a hundred more intervals, no loss, no change.
        let (more, lost) = against(&mut l, "lte", S(120), 100);
        assert!(lost.is_empty(), "lost after converging: {more:?}");
        assert!(more.iter().all(|i| *i == last), "{more:?}");
    }

    #[test]
    fn a_shrunk_nat_timeout_restarts_the_search_below_the_failure() {
        let mut l = Learner::new(cfg(2, 30));
        against(&mut l, "wifi", S(12), 12);
        let before = l.interval("wifi");
        assert!(l.settled("wifi") && before < S(12) && before >= S(10), "{before:?}");
        let (used, lost) = against(&mut l, "wifi", S(6), 12);
        eprintln!("shrink 12 s -> 6 s: {used:?}");
        assert_eq!(used[0], before);
        assert!(used[1] < S(6), "the interval after the loss must hold: {used:?}");
        assert!(l.settled("wifi"), "{used:?}");
        let after = l.interval("wifi");
        assert!(after < S(6) && after >= Duration::from_millis(4_500), "{after:?} from {used:?}");
        assert!(lost.len() <= 4, "{used:?}");
        let (_, lost) = against(&mut l, "wifi", S(6), 50);
        assert!(lost.is_empty());
    }

    #[test]
    fn a_path_that_keeps_everything_stops_at_the_ceiling() {
        let mut l = Learner::new(cfg(30, 300));
        let (used, lost) = against(&mut l, "lan", Duration::MAX, 8);
        assert!(lost.is_empty());
        assert_eq!(used[..5], [S(30), S(60), S(120), S(240), S(300)]);
        assert!(l.settled("lan") && used[5..].iter().all(|i| *i == S(300)));
    }

    #[test]
    fn networks_are_learned_apart_and_remembered() {
        let mut l = Learner::new(cfg(2, 60));
        against(&mut l, "wifi", S(40), 12);
        against(&mut l, "lte", S(8), 12);
        let (wifi, lte) = (l.interval("wifi"), l.interval("lte"));
        assert!(wifi >= S(30) && wifi < S(40), "{wifi:?}");
        assert!(lte >= S(6) && lte < S(8), "{lte:?}");
        // Back on the first network: its interval at once, no relearning.
        let (used, lost) = against(&mut l, "wifi", S(40), 5);
        assert!(lost.is_empty() && used.iter().all(|i| *i == wifi));
    }

    #[test]
    fn the_memory_is_bounded_and_forgets_the_least_recently_used() {
        let mut l = Learner::new(cfg(2, 60));
        against(&mut l, "home", S(40), 12);
        for n in 0..MAX_NETWORKS {
            l.interval(&format!("net{n}"));
        }
        assert_eq!(l.nets.len(), MAX_NETWORKS);
        assert_eq!(l.interval("home"), S(2), "the oldest network is forgotten");
    }

    #[test]
    fn busy_silences_prove_nothing() {
        let mut l = Learner::new(cfg(10, 60));
        assert_eq!(l.held("x", S(1)), None);
        assert_eq!(l.interval("x"), S(10));
        assert_eq!(l.held("x", Duration::from_millis(9_980)), Some(S(20)));
    }

    #[test]
    fn every_loss_backs_off_below_the_silence_that_failed() {
        let mut l = Learner::new(cfg(1, 100));
        for _ in 0..8 {
            let idle = l.interval("x");
            let next = l.forgot("x", idle).expect("a loss after a whole interval counts");
            assert!(next < idle || next == S(1), "{next:?} after losing at {idle:?}");
        }
        assert_eq!(l.interval("x"), S(1));
    }

    #[test]
    fn a_loss_after_a_short_silence_teaches_nothing() {
        let mut l = Learner::new(cfg(30, 900));
        against(&mut l, "lte", S(120), 12);
        let settled = l.interval("lte");
        // The server spoke just before our PING: a second of silence, then the connection ended for another
        // reason. Nothing about the NAT in that.
        assert_eq!(l.forgot("lte", S(1)), None);
        assert_eq!(l.interval("lte"), settled);
        // A connection's first PING, early at a random phase, lost after a silence longer than any that held:
        // that bounds the timeout.
        let mut l = Learner::new(cfg(2, 60));
        l.held("wifi", Duration::from_millis(1990));
        l.held("wifi", Duration::from_millis(3990));
        assert_eq!(l.interval("wifi"), S(8));
        assert_eq!(l.forgot("wifi", S(6)), Some(Duration::from_millis(4995)), "halfway between 3.99 s and 6 s");
    }

    #[test]
    fn false_alarms_do_not_ratchet_the_interval_down() {
        let mut l = Learner::new(cfg(30, 900));
        against(&mut l, "lte", S(120), 12);
        let first = l.interval("lte");
        for round in 0..5 {
            // A loss the NAT did not cause (a server that rebooted resets the connection), at the settled
            // interval, then the same path as before.
            let idle = l.interval("lte") - Duration::from_millis(20);
            l.forgot("lte", idle).unwrap();
            let (used, lost) = against(&mut l, "lte", S(120), 15);
            let now = l.interval("lte");
            assert!(l.settled("lte"), "round {round}: {used:?}");
            assert!(now >= first.mul_f64(0.85) && now < S(120), "round {round}: {now:?} after {first:?}: {used:?}");
            assert!(lost.len() <= usize::from(MAX_LOSSES), "round {round}: {used:?}");
        }
    }

    #[test]
    fn nothing_is_asked_above_the_ceiling_or_the_servers_maximum() {
        let mut l = Learner::new(cfg(30, 900));
        // A phone asleep for an hour: its next PING went out after 3,000 s of silence and was lost.
        l.connected("lte", S(900), Duration::MAX);
        assert!(l.forgot("lte", S(3000)).unwrap() <= S(900));
        // A server that grants at most 60 s: the search stops there, and that is settled once it held.
        let mut l = Learner::new(cfg(30, 900));
        l.connected("wifi", S(30), S(60));
        let (used, lost) = against(&mut l, "wifi", Duration::MAX, 6);
        assert!(lost.is_empty() && used[1..].iter().all(|i| *i == S(60)), "{used:?}");
        assert!(l.settled("wifi"));
        assert!(!Learner::new(cfg(30, 900)).settled("new"), "nothing is settled before anything held");
    }
}
