//! Human durations for flags and the config file: `500ms`, `1.5s`, `30s`, `2m`, `1h`; a bare number is seconds.
//!
//! # Layout
//! [`parse`] reads them ([`rto_max`] also `auto` and `off`); [`human`] and [`ms`] print them (a table cell, a JSON number of milliseconds). Written here rather than taken from a crate because the common ones (humantime)
//! do not accept fractions such as `1.5s`, which the CLI contract requires.

use std::time::Duration;

/// A duration as people read it: µs, ms or s.
pub fn human(d: Duration) -> String {
    let us = d.as_micros();
    if us < 1000 {
        format!("{us}µs")
    } else if us < 1_000_000 {
        format!("{:.1}ms", us as f64 / 1000.0)
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}

/// Milliseconds with microsecond precision, for JSON.
pub fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

pub fn parse(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num.parse().map_err(|_| format!("invalid duration {text:?}: expected e.g. 500ms, 1.5s, 30s"))?;
    let secs = match unit.trim() {
        "ms" => value / 1000.0,
        "" | "s" => value,
        "m" | "min" => value * 60.0,
        "h" => value * 3600.0,
        other => return Err(format!("invalid duration {text:?}: unknown unit {other:?} (use ms, s, m or h)")),
    };
    Duration::try_from_secs_f64(secs).map_err(|_| format!("invalid duration {text:?}: out of range"))
}

/// `--rto-max`: `auto` (a fifth of the heartbeat interval, at least 1s), `off` (the kernel's own backoff), or a
/// ceiling from 1s to 120s (the range the kernel accepts).
pub fn rto_max(text: &str) -> Result<tether::RtoMax, String> {
    match text.trim() {
        "auto" => Ok(tether::RtoMax::Auto),
        "off" => Ok(tether::RtoMax::Off),
        t => {
            let d = parse(t)?;
            if !(tether::sockopt::RTO_MAX_FLOOR..=tether::sockopt::KERNEL_RTO_MAX).contains(&d) {
                return Err(format!("rto_max {text:?}: the kernel accepts 1s to 120s (or say auto or off)"));
            }
            Ok(tether::RtoMax::Fixed(d))
        }
    }
}

/// `FLOOR..CEILING` (two durations, the floor above zero and not above the ceiling), for the adaptive heartbeat.
pub fn range(text: &str) -> Result<(Duration, Duration), String> {
    let (lo, hi) = text.split_once("..").ok_or_else(|| format!("{text:?}: give FLOOR..CEILING, e.g. 30s..15m"))?;
    let (lo, hi) = (parse(lo)?, parse(hi)?);
    if lo.is_zero() || lo > hi {
        return Err(format!("{text:?}: the floor must be above zero and not above the ceiling"));
    }
    Ok((lo, hi))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_need_a_floor_under_the_ceiling() {
        assert_eq!(range("30s..15m"), Ok((Duration::from_secs(30), Duration::from_secs(900))));
        assert!(range("0s..1m").is_err());
        assert!(range("2m..1m").is_err());
        assert!(range("30s").is_err());
    }

    #[test]
    fn accepts_the_documented_forms() {
        assert_eq!(parse("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse("0.25"), Ok(Duration::from_millis(250)));
    }

    #[test]
    fn rejects_nonsense_clearly() {
        assert!(parse("fast").unwrap_err().contains("expected e.g."));
        assert!(parse("5 parsecs").unwrap_err().contains("unknown unit"));
        assert!(parse("").is_err());
        assert!(parse("1e400s").is_err());
    }

    #[test]
    fn rto_max_takes_auto_off_or_a_ceiling_the_kernel_accepts() {
        assert_eq!(rto_max("auto"), Ok(tether::RtoMax::Auto));
        assert_eq!(rto_max("off"), Ok(tether::RtoMax::Off));
        assert_eq!(rto_max("2s"), Ok(tether::RtoMax::Fixed(Duration::from_secs(2))));
        assert!(rto_max("500ms").unwrap_err().contains("1s to 120s"));
        assert!(rto_max("5m").unwrap_err().contains("1s to 120s"));
    }
}
