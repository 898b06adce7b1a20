//! Reconnection policy: exponential backoff with full jitter, failover over an ordered server list, and the
//! server's hints.
//!
//! # Layout
//! [`Reconnect`] is told what happened ([`Reconnect::connected`], [`Reconnect::lost`], [`Reconnect::failed`])
//! and answers what to do next as a [`Next`]: connect to a [`Target`] after a delay, or give up. It also says when
//! to probe the primary while connected to a backup ([`Reconnect::primary_probe_at`]). Time is passed in; the
//! jitter comes from a seeded generator ([`SplitMix64`]), so tests replay exactly.
//!
//! Rules:
//! - Delay: the server's `retry_after` when its `BYE` gave one; otherwise full jitter, uniform in
//!   `[0, min(max, initial × multiplier^k)]`, where `k` counts the failed attempts since the last success (AWS's
//!   "full jitter": reconnect storms spread out instead of arriving in waves).
//! - Target: an `alternative` address from the server's `BYE` first (once); otherwise the first server in list
//!   order that has not failed within `skip_failed_for`; when all have, the one that failed longest ago.
//! - `kicked` ends reconnection unless `reconnect_after_kick`; `max_attempts` consecutive failures give up.

use std::time::{Duration, Instant};

use crate::reason::CloseReason;

/// Backoff shape.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BackoffConfig {
    pub initial: Duration,
    pub max: Duration,
    pub multiplier: f64,
}

impl Default for BackoffConfig {
    fn default() -> Self {
        BackoffConfig { initial: Duration::from_millis(200), max: Duration::from_secs(30), multiplier: 2.0 }
    }
}

/// Reconnection policy.
#[derive(Debug, Clone, PartialEq)]
pub struct ReconnectConfig {
    pub backoff: BackoffConfig,
    /// Consecutive failed attempts before giving up; `None` retries forever.
    pub max_attempts: Option<u32>,
    /// A server that failed is skipped for this long while others are available.
    pub skip_failed_for: Duration,
    /// While connected to a backup, probe the primary this often and go back when it welcomes us.
    pub return_to_primary: Option<Duration>,
    /// Reconnect even after `BYE(kicked)`.
    pub reconnect_after_kick: bool,
}

impl Default for ReconnectConfig {
    fn default() -> Self {
        ReconnectConfig {
            backoff: BackoffConfig::default(),
            max_attempts: None,
            skip_failed_for: Duration::from_secs(30),
            return_to_primary: Some(Duration::from_secs(30)),
            reconnect_after_kick: false,
        }
    }
}

/// Where to connect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Index into the configured server list (0 is the primary).
    Listed(usize),
    /// An address named by a server's `BYE`.
    Alternative(String),
}

/// What to do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Connect to `target` after `delay`. `attempt` counts attempts since the last success (1 = first retry).
    Connect { target: Target, delay: Duration, attempt: u32 },
    /// Stop: `kicked` without `reconnect_after_kick`, or `max_attempts` reached.
    GiveUp { attempts: u32, last: CloseReason },
}

/// A small seeded generator (SplitMix64): deterministic jitter without OS randomness in the core.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> SplitMix64 {
        SplitMix64(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in `[0, 1)`.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// The reconnection state of one client.
#[derive(Debug, Clone)]
pub struct Reconnect {
    cfg: ReconnectConfig,
    /// When each listed server last failed us.
    failed_at: Vec<Option<Instant>>,
    /// Failed attempts since the last success.
    attempt: u32,
    /// An alternative named by the last `BYE`, tried next.
    alternative: Option<String>,
    /// The server we are connected to, and since when.
    connected: Option<(Target, Instant)>,
    rng: SplitMix64,
}

impl Reconnect {
    /// `servers` is the length of the ordered list (primary first); `seed` drives the jitter.
    pub fn new(servers: usize, cfg: ReconnectConfig, seed: u64) -> Reconnect {
        Reconnect {
            cfg,
            failed_at: vec![None; servers.max(1)],
            attempt: 0,
            alternative: None,
            connected: None,
            rng: SplitMix64::new(seed),
        }
    }

    pub fn config(&self) -> &ReconnectConfig {
        &self.cfg
    }

    /// The first connection: the first usable server, at once.
    pub fn start(&mut self, now: Instant) -> Next {
        Next::Connect { target: self.choose(now), delay: Duration::ZERO, attempt: 0 }
    }

    /// A connection to `target` was established.
    pub fn connected(&mut self, now: Instant, target: Target) {
        if let Target::Listed(i) = target {
            self.failed_at[i] = None;
        }
        self.attempt = 0;
        self.connected = Some((target, now));
    }

    /// An established connection to `target` ended with `reason`; `retry_after` and `alternative` are the
    /// server's `BYE` hints.
    pub fn lost(
        &mut self,
        now: Instant,
        target: Target,
        reason: CloseReason,
        retry_after: Option<Duration>,
        alternative: Option<String>,
    ) -> Next {
        self.connected = None;
        if reason == CloseReason::Kicked && !self.cfg.reconnect_after_kick {
            return Next::GiveUp { attempts: self.attempt, last: reason };
        }
        // Our own goodbye, or an id conflict, says nothing about the server's health.
        if !matches!(reason, CloseReason::Bye | CloseReason::IdConflict) {
            self.mark_failed(now, &target);
        }
        self.alternative = alternative.or(self.alternative.take());
        self.next(now, reason, retry_after)
    }

    /// An attempt to connect to `target` failed: `refused` is the server's `BYE` reason, if it answered one.
    pub fn failed(
        &mut self,
        now: Instant,
        target: Target,
        refused: Option<CloseReason>,
        retry_after: Option<Duration>,
        alternative: Option<String>,
    ) -> Next {
        if refused != Some(CloseReason::IdConflict) {
            self.mark_failed(now, &target);
        }
        self.alternative = alternative;
        let last = refused.unwrap_or(CloseReason::Reset);
        if last == CloseReason::Kicked && !self.cfg.reconnect_after_kick {
            return Next::GiveUp { attempts: self.attempt, last };
        }
        self.next(now, last, retry_after)
    }

    /// While connected to a backup with `return_to_primary` set: when to try the primary next.
    pub fn primary_probe_at(&self, last_probe: Option<Instant>) -> Option<Instant> {
        let every = self.cfg.return_to_primary?;
        match &self.connected {
            Some((Target::Listed(0), _)) | None => None,
            Some((_, since)) => Some(last_probe.unwrap_or(*since).max(*since) + every),
        }
    }

    fn next(&mut self, now: Instant, last: CloseReason, retry_after: Option<Duration>) -> Next {
        self.attempt += 1;
        if self.cfg.max_attempts.is_some_and(|m| self.attempt > m) {
            return Next::GiveUp { attempts: self.attempt - 1, last };
        }
        let delay = retry_after.unwrap_or_else(|| self.jitter());
        let target = match self.alternative.take() {
            Some(a) => Target::Alternative(a),
            None => self.choose(now),
        };
        Next::Connect { target, delay, attempt: self.attempt }
    }

    /// Full jitter over the capped exponential for the current attempt.
    fn jitter(&mut self) -> Duration {
        let b = self.cfg.backoff;
        let exp = b.multiplier.max(1.0).powi(self.attempt.saturating_sub(1).min(64) as i32);
        let cap = b.initial.as_secs_f64() * exp;
        let cap = cap.min(b.max.as_secs_f64());
        Duration::from_secs_f64(cap * self.rng.next_f64())
    }

    fn mark_failed(&mut self, now: Instant, target: &Target) {
        if let Target::Listed(i) = target {
            self.failed_at[*i] = Some(now);
        }
    }

    fn choose(&self, now: Instant) -> Target {
        let healthy = self
            .failed_at
            .iter()
            .position(|f| f.is_none_or(|t| now.saturating_duration_since(t) >= self.cfg.skip_failed_for));
        let index = healthy.unwrap_or_else(|| {
            // Everyone failed recently: the one that failed longest ago.
            (0..self.failed_at.len()).min_by_key(|&i| self.failed_at[i]).unwrap_or(0)
        });
        Target::Listed(index)
    }
}

#[cfg(test)]
mod tests;
