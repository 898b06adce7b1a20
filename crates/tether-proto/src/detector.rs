//! Failure detectors: when is a silent peer suspected, and when is it dead?
//!
//! # Layout
//! [`Detector`] is fed the arrival instant of every frame ([`Detector::heartbeat`]) and answers with exact instants
//! ([`Detector::deadlines`]): when to raise `suspect` (phi only) and when to convict. Nothing is polled: the
//! connection arms one timer at the earliest instant and moves it forward as frames arrive.
//!
//! - `fixed`: convict when nothing arrived for `timeout`.
//! - `phi`: phi-accrual (Hayashibara et al., 2004) over a window of inter-arrival times. phi(t) is
//!   `-log10(P(next arrival is later than t))` under a normal model of the inter-arrival times (the logistic
//!   approximation of the normal CDF, as in Akka/Pekko). The instant at which phi reaches a threshold is solved in
//!   closed form; the convict instant is then clamped to `[min_timeout, max_timeout]` after the last arrival.
//!   Frames closer together than interval/8 count as one arrival: phi models the heartbeat cadence, not bursts.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Which detector a connection uses, with its parameters.
#[derive(Debug, Clone, PartialEq)]
pub enum DetectorConfig {
    Fixed,
    Phi(PhiConfig),
}

/// Phi-accrual parameters. `min_timeout` and `max_timeout` bound the verdict whatever the history says.
#[derive(Debug, Clone, PartialEq)]
pub struct PhiConfig {
    /// phi at which `suspect` is raised.
    pub suspect_threshold: f64,
    /// phi at which the peer is declared dead.
    pub convict_threshold: f64,
    /// Floor on the standard deviation, so a very regular peer is not convicted by a tiny delay.
    pub min_std_dev: Duration,
    /// Inter-arrival samples kept.
    pub window: usize,
    /// Never convict sooner than this after the last arrival (0: derived as 1.5 × heartbeat interval).
    pub min_timeout: Duration,
    /// Always convict by this long after the last arrival (0: the negotiated heartbeat timeout).
    pub max_timeout: Duration,
}

impl Default for PhiConfig {
    fn default() -> Self {
        PhiConfig {
            suspect_threshold: 3.0,
            convict_threshold: 8.0,
            min_std_dev: Duration::from_millis(100),
            window: 100,
            min_timeout: Duration::ZERO,
            max_timeout: Duration::ZERO,
        }
    }
}

/// Instants derived from the arrival history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadlines {
    /// When to raise `suspect`; `None` for detectors without a suspect stage.
    pub suspect_at: Option<Instant>,
    /// When to declare the peer dead.
    pub convict_at: Instant,
}

/// A running detector for one connection.
#[derive(Debug, Clone)]
pub struct Detector {
    kind: Kind,
    /// The expected gap between arrivals (the negotiated heartbeat interval), in nanoseconds; seeds phi before it
    /// has samples. Nanoseconds rather than a `Duration`: exact, and half the size on every connection.
    interval_ns: u64,
    /// The fixed detector's timeout, and phi's default upper bound, in nanoseconds.
    timeout_ns: u64,
    last_arrival: Option<Instant>,
}

#[derive(Debug, Clone)]
enum Kind {
    Fixed,
    /// Boxed: a connection on the fixed detector pays nothing for phi's window.
    Phi(Box<PhiState>),
}

#[derive(Debug, Clone)]
struct PhiState {
    cfg: PhiConfig,
    stats: Window,
    /// The standardised delays at which phi reaches the suspect and convict thresholds: fixed by the config,
    /// so solved once here rather than on every arrival.
    y_suspect: f64,
    y_convict: f64,
}

impl Detector {
    pub fn new(cfg: &DetectorConfig, interval: Duration, timeout: Duration) -> Detector {
        let kind = match cfg {
            DetectorConfig::Fixed => Kind::Fixed,
            DetectorConfig::Phi(p) => {
                let mut p = p.clone();
                if p.min_timeout.is_zero() {
                    p.min_timeout = interval.mul_f64(1.5);
                }
                if p.max_timeout.is_zero() {
                    p.max_timeout = timeout;
                }
                p.max_timeout = p.max_timeout.max(p.min_timeout);
                Kind::Phi(Box::new(PhiState {
                    stats: Window::new(p.window.max(2)),
                    y_suspect: y_for_phi(p.suspect_threshold),
                    y_convict: y_for_phi(p.convict_threshold),
                    cfg: p,
                }))
            }
        };
        let ns = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        Detector { kind, interval_ns: ns(interval), timeout_ns: ns(timeout), last_arrival: None }
    }

    fn interval(&self) -> Duration {
        Duration::from_nanos(self.interval_ns)
    }

    /// Record that a frame arrived at `now`.
    pub fn heartbeat(&mut self, now: Instant) {
        if let (Some(last), Kind::Phi(phi)) = (self.last_arrival, &mut self.kind) {
            let stats = &mut phi.stats;
            // Frames closer together than an eighth of the interval are one burst (a PONG riding with a PING, a
            // run of DATA): they prove life but are not samples of the heartbeat cadence, which phi models.
            let gap = now.saturating_duration_since(last);
            if gap < Duration::from_nanos(self.interval_ns) / 8 {
                self.last_arrival = Some(last.max(now));
                return;
            }
            stats.push(gap.as_secs_f64());
        }
        self.last_arrival = Some(self.last_arrival.map_or(now, |l| l.max(now)));
    }

    /// The instant of the last arrival, if any.
    pub fn last_arrival(&self) -> Option<Instant> {
        self.last_arrival
    }

    /// Suspect and convict instants, counted from the last arrival (or from `origin` if nothing arrived yet).
    pub fn deadlines(&self, origin: Instant) -> Deadlines {
        let base = self.last_arrival.unwrap_or(origin);
        match &self.kind {
            Kind::Fixed => Deadlines { suspect_at: None, convict_at: base + Duration::from_nanos(self.timeout_ns) },
            Kind::Phi(phi) => {
                let (cfg, stats) = (&phi.cfg, &phi.stats);
                let (mean, std) = stats.mean_std().unwrap_or_else(|| {
                    // Bootstrap like Pekko: expect the negotiated interval, std a quarter of it.
                    let m = self.interval().as_secs_f64();
                    (m, m / 4.0)
                });
                let std = std.max(cfg.min_std_dev.as_secs_f64());
                let after = |y: f64| {
                    let after = (mean + std * y).max(0.0);
                    Duration::try_from_secs_f64(after).unwrap_or(cfg.max_timeout).min(cfg.max_timeout)
                };
                // Only the verdict has a floor; suspicion is a warning and may come before it.
                let convict = after(phi.y_convict).max(cfg.min_timeout);
                let suspect = after(phi.y_suspect).min(convict);
                Deadlines { suspect_at: (suspect < convict).then_some(base + suspect), convict_at: base + convict }
            }
        }
    }

    /// phi at `now` (for logs and tests); `None` for the fixed detector.
    pub fn phi(&self, now: Instant) -> Option<f64> {
        let Kind::Phi(phi) = &self.kind else {
            return None;
        };
        let (cfg, stats) = (&phi.cfg, &phi.stats);
        let (mean, std) = stats.mean_std().unwrap_or_else(|| {
            let m = self.interval().as_secs_f64();
            (m, m / 4.0)
        });
        let std = std.max(cfg.min_std_dev.as_secs_f64());
        let elapsed = now.saturating_duration_since(self.last_arrival?).as_secs_f64();
        Some(phi_of_y((elapsed - mean) / std))
    }
}

/// `phi` for a standardised delay `y`, with the logistic approximation of the normal CDF.
fn phi_of_y(y: f64) -> f64 {
    let g = y * (1.5976 + 0.070566 * y * y);
    // 1 - F = 1 / (1 + e^g), so phi = log10(1 + e^g); computed without overflow for large g.
    if g > 30.0 {
        g * std::f64::consts::LOG10_E
    } else {
        (1.0 + g.exp()).log10()
    }
}

/// The standardised delay `y` at which phi reaches `phi`: invert `log10(1 + e^g) = phi`, then solve the cubic
/// `0.070566 y^3 + 1.5976 y - g = 0` (one real root, Cardano).
fn y_for_phi(phi: f64) -> f64 {
    let g = (10f64.powf(phi) - 1.0).max(f64::MIN_POSITIVE).ln();
    let p = 1.5976 / 0.070566;
    let q = -g / 0.070566;
    let disc = (q * q / 4.0 + p * p * p / 27.0).sqrt();
    (-q / 2.0 + disc).cbrt() + (-q / 2.0 - disc).cbrt()
}

/// A sliding window of inter-arrival samples (seconds) with running sums.
#[derive(Debug, Clone)]
struct Window {
    cap: usize,
    samples: VecDeque<f64>,
    sum: f64,
    sum_sq: f64,
}

impl Window {
    fn new(cap: usize) -> Window {
        Window { cap, samples: VecDeque::new(), sum: 0.0, sum_sq: 0.0 }
    }
    fn push(&mut self, x: f64) {
        if self.samples.len() == self.cap {
            let old = self.samples.pop_front().expect("non-empty");
            self.sum -= old;
            self.sum_sq -= old * old;
        }
        self.samples.push_back(x);
        self.sum += x;
        self.sum_sq += x * x;
    }
    /// Mean and standard deviation, once there are at least two samples.
    fn mean_std(&self) -> Option<(f64, f64)> {
        let n = self.samples.len();
        if n < 2 {
            return None;
        }
        let mean = self.sum / n as f64;
        let var = (self.sum_sq / n as f64 - mean * mean).max(0.0);
        Some((mean, var.sqrt()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn inverse_matches_forward() {
        for phi in [0.5, 1.0, 3.0, 8.0, 12.0, 16.0] {
            let y = y_for_phi(phi);
            assert!((phi_of_y(y) - phi).abs() < 1e-6, "phi {phi}: y {y} gives {}", phi_of_y(y));
        }
    }

    #[test]
    fn fixed_convicts_exactly_timeout_after_last_arrival() {
        let t0 = Instant::now();
        let mut d = Detector::new(&DetectorConfig::Fixed, ms(1000), ms(3000));
        assert_eq!(d.deadlines(t0).convict_at, t0 + ms(3000));
        d.heartbeat(t0 + ms(700));
        let dl = d.deadlines(t0);
        assert_eq!(dl.convict_at, t0 + ms(3700));
        assert_eq!(dl.suspect_at, None);
        // An arrival reported out of order never moves the deadline back.
        d.heartbeat(t0 + ms(500));
        assert_eq!(d.deadlines(t0).convict_at, t0 + ms(3700));
    }

    /// A deterministic jitter source (xorshift), so the test needs no OS randomness.
    fn jitter(state: &mut u64, spread_ms: u64) -> u64 {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        *state % (2 * spread_ms + 1)
    }

    #[test]
    fn phi_does_not_convict_a_jittery_but_alive_peer() {
        // Heartbeats every 1 s ± 400 ms for 10 minutes: phi must never pass its convict deadline between arrivals.
        let cfg = DetectorConfig::Phi(PhiConfig::default());
        let mut d = Detector::new(&cfg, ms(1000), ms(5000));
        let t0 = Instant::now();
        let mut t = t0;
        d.heartbeat(t);
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        let mut suspects = 0;
        for _ in 0..600 {
            let gap = ms(600 + jitter(&mut rng, 400));
            let dl = d.deadlines(t0);
            let next = t + gap;
            assert!(next < dl.convict_at, "convicted a live peer: gap {gap:?}, deadline {:?}", dl.convict_at - t);
            if dl.suspect_at.is_some_and(|s| s <= next) {
                suspects += 1;
            }
            t = next;
            d.heartbeat(t);
        }
        // With gaps up to 1.4 s the suspect stage may fire now and then, but rarely.
        assert!(suspects < 30, "too many suspects: {suspects}");
    }

    #[test]
    fn phi_convicts_a_silent_regular_peer_before_the_fixed_timeout() {
        let cfg = DetectorConfig::Phi(PhiConfig::default());
        let mut d = Detector::new(&cfg, ms(1000), ms(5000));
        let t0 = Instant::now();
        for i in 0..50 {
            d.heartbeat(t0 + ms(1000 * i));
        }
        let last = t0 + ms(49_000);
        let dl = d.deadlines(t0);
        let suspect = dl.suspect_at.expect("phi has a suspect stage") - last;
        let convict = dl.convict_at - last;
        // Perfectly regular: std is the 100 ms floor, so phi 8 is reached at mean + 5.23 σ ≈ 1.523 s, well before
        // the fixed 5 s timeout and just after the 1.5 s floor.
        assert!(convict > ms(1520) && convict < ms(1525), "{convict:?}");
        assert!(suspect < convict);
        assert!(d.phi(last + ms(1600)).unwrap() > 8.0);
        assert!(d.phi(last + ms(1000)).unwrap() < 1.0);
    }

    #[test]
    fn phi_is_bounded_by_max_timeout() {
        let cfg = DetectorConfig::Phi(PhiConfig { max_timeout: ms(4000), ..PhiConfig::default() });
        let mut d = Detector::new(&cfg, ms(1000), ms(10_000));
        let t0 = Instant::now();
        // Wildly irregular history: 200 ms and 3 s gaps alternate, std is huge.
        let mut t = t0;
        for i in 0..40 {
            t += if i % 2 == 0 { ms(200) } else { ms(3000) };
            d.heartbeat(t);
        }
        assert_eq!(d.deadlines(t0).convict_at - t, ms(4000));
    }

    #[test]
    fn phi_bootstraps_from_the_interval() {
        let cfg = DetectorConfig::Phi(PhiConfig::default());
        let d = Detector::new(&cfg, ms(1000), ms(5000));
        let t0 = Instant::now();
        // No arrivals yet: mean 1 s, std 250 ms; phi 8 is ~1 s + 5.6 * 0.25 s ≈ 2.4 s.
        let after = d.deadlines(t0).convict_at - t0;
        assert!(after > ms(2000) && after < ms(3000), "{after:?}");
    }
}
