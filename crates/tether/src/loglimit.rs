//! Summarising repeated log lines: a storm of one kind of line about one client is logged a few times, then
//! counted, and the count is logged once the storm's window ends.
//!
//! # Layout
//! [`LogLimiter::check`] answers whether a line of some kind (a `&'static str`, e.g. `"closed"`) about some key
//! (a client id, or a peer address) may be written now: the first `burst` ([`LogLimiter::new`]) per key and
//! window are, later ones are counted. [`LogLimiter::flush`] returns the counts of windows that have ended, for
//! the caller to log as one summary line each; [`LogLimiter::next_flush`] says when the next one is due. Keys
//! are bounded ([`LogLimiter::new`]'s `max_keys`): when that many are active, lines about new keys are let
//! through untracked rather than dropped, and the table is swept of finished windows at most once per window
//! (a mass disconnect of distinct clients costs one lookup per line, not a sweep per line). Nothing here writes a
//! log line itself, and nothing blocks.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Per-key, per-window log line budget.
#[derive(Debug)]
pub struct LogLimiter {
    window: Duration,
    burst: u32,
    max_keys: usize,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Entries by kind, then key (so that a lookup needs no owned key).
    kinds: HashMap<&'static str, HashMap<String, Entry>>,
    /// Entries in all kinds.
    len: usize,
    /// When the table was last swept of finished windows because it was full.
    swept: Option<Instant>,
}

impl Inner {
    /// Drop entries whose window has ended with nothing held back.
    fn sweep(&mut self, now: Instant, window: Duration) {
        for keys in self.kinds.values_mut() {
            keys.retain(|_, e| e.suppressed > 0 || now.saturating_duration_since(e.since) < window);
        }
        self.kinds.retain(|_, keys| !keys.is_empty());
        self.len = self.kinds.values().map(HashMap::len).sum();
        self.swept = Some(now);
    }
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    /// When this key's current window started.
    since: Instant,
    logged: u32,
    suppressed: u64,
}

/// Lines of one kind about one key that were counted instead of written during one window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    pub kind: &'static str,
    pub key: String,
    pub suppressed: u64,
    pub window: Duration,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Summary { kind, key, suppressed, window } = self;
        write!(f, "{kind} ({key}): {suppressed} more in {window:?}, not logged one by one")
    }
}

impl LogLimiter {
    /// `burst` lines per key per `window`; at most `max_keys` keys tracked at once.
    pub fn new(window: Duration, burst: u32, max_keys: usize) -> LogLimiter {
        LogLimiter { window, burst: burst.max(1), max_keys, inner: Mutex::new(Inner::default()) }
    }

    /// Whether a line of `kind` about `key` may be written now. A `false` is counted for [`flush`](Self::flush).
    pub fn check(&self, now: Instant, kind: &'static str, key: &str) -> bool {
        let mut inner = self.inner.lock().expect("log limiter lock");
        if let Some(e) = inner.kinds.get_mut(kind).and_then(|keys| keys.get_mut(key)) {
            if now.saturating_duration_since(e.since) >= self.window && e.suppressed == 0 {
                *e = Entry { since: now, logged: 0, suppressed: 0 };
            }
            if e.logged < self.burst {
                e.logged += 1;
                return true;
            }
            e.suppressed += 1;
            return false;
        }
        if inner.len >= self.max_keys {
            if inner.swept.is_some_and(|t| now.saturating_duration_since(t) < self.window) {
                return true;
            }
            inner.sweep(now, self.window);
            if inner.len >= self.max_keys {
                return true;
            }
        }
        inner.kinds.entry(kind).or_default().insert(key.to_owned(), Entry { since: now, logged: 1, suppressed: 0 });
        inner.len += 1;
        true
    }

    /// The windows that ended with lines counted instead of written; their keys start afresh.
    pub fn flush(&self, now: Instant) -> Vec<Summary> {
        let mut inner = self.inner.lock().expect("log limiter lock");
        let mut out = Vec::new();
        let window = self.window;
        for (kind, keys) in inner.kinds.iter_mut() {
            keys.retain(|key, e| {
                if now.saturating_duration_since(e.since) < window {
                    return true;
                }
                if e.suppressed > 0 {
                    out.push(Summary { kind, key: key.clone(), suppressed: e.suppressed, window });
                }
                false
            });
        }
        inner.kinds.retain(|_, keys| !keys.is_empty());
        inner.len = inner.kinds.values().map(HashMap::len).sum();
        out.sort_by(|a, b| (a.kind, &a.key).cmp(&(b.kind, &b.key)));
        out
    }

    /// When the earliest window holding counted lines ends.
    pub fn next_flush(&self) -> Option<Instant> {
        let inner = self.inner.lock().expect("log limiter lock");
        let entries = inner.kinds.values().flat_map(HashMap::values);
        entries.filter(|e| e.suppressed > 0).map(|e| e.since + self.window).min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_storm_about_one_key_is_logged_a_few_times_then_summarised() {
        let t = Instant::now();
        let l = LogLimiter::new(Duration::from_secs(10), 3, 100);
        let allowed =
            (0..6500).filter(|i| l.check(t + Duration::from_micros(i * 150), "closed: takeover", "dev")).count();
        assert_eq!(allowed, 3);
        // Other keys and kinds are not affected.
        assert!(l.check(t, "closed: takeover", "other"));
        assert!(l.check(t, "closed: eof", "dev"));
        assert_eq!(l.next_flush(), Some(t + Duration::from_secs(10)));
        assert!(l.flush(t + Duration::from_secs(9)).is_empty());
        let s = l.flush(t + Duration::from_secs(10));
        assert_eq!(s.len(), 1);
        assert_eq!((s[0].kind, s[0].key.as_str(), s[0].suppressed), ("closed: takeover", "dev", 6497));
        assert!(s[0].to_string().contains("6497 more in 10s"));
        // A new window starts afresh.
        assert!(l.check(t + Duration::from_secs(11), "closed: takeover", "dev"));
        assert_eq!(l.next_flush(), None);
    }

    #[test]
    fn keys_are_bounded_and_new_keys_are_never_silenced_by_the_bound() {
        let t = Instant::now();
        let l = LogLimiter::new(Duration::from_secs(10), 1, 4);
        for k in 0..10 {
            assert!(l.check(t, "closed: eof", &k.to_string()), "key {k}");
        }
        assert!(l.inner.lock().unwrap().len <= 4);
        // Once the windows have ended, the table makes room again (one sweep, not one per line).
        assert!(l.check(t + Duration::from_secs(11), "closed: eof", "late"));
        assert_eq!(l.inner.lock().unwrap().len, 1);
    }
}
