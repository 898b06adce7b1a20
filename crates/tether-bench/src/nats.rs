//! A minimal NATS client codec: the few operations of the text protocol the benchmark needs against nats-server,
//! and a reader of its monitoring endpoint's closed connections.
//!
//! # Layout
//! [`connect`] is what a client sends once it has read the server's `INFO`: `CONNECT {json}` and a `PING`, whose
//! `PONG` confirms the connection (any `-ERR` before it refuses it). [`PONG`] answers the server's heartbeat
//! `PING`. [`split`] cuts one server operation off a buffer ([`Op`]: `INFO`, `PING`, `PONG`, `+OK`, `-ERR`):
//! `Ok(None)` while its line is incomplete. The load generator never subscribes, so a `MSG` is a protocol error
//! here. [`closed`] reads `GET /connz?state=closed` from the server's HTTP monitoring listener: each closed
//! connection's name, when it was closed ([`epoch_us`] of the RFC 3339 `stop`) and why. Written here for the same
//! reason as [`crate::mqtt`]: thousands of bare connections per process, no client event loop per connection.

use std::net::SocketAddr;

use anyhow::Context;
use serde_json::Value;

/// The client's answer to a server `PING`.
pub const PONG: &[u8] = b"PONG\r\n";
/// A client `PING` (sent once, after `CONNECT`: its `PONG` ends the handshake).
pub const PING: &[u8] = b"PING\r\n";
/// The longest server line accepted (an `INFO` is a few hundred bytes).
pub const MAX_LINE: usize = 64 * 1024;
/// The `-ERR` text nats-server sends before it closes a connection whose `PING`s went unanswered.
pub const STALE: &str = "Stale Connection";

/// `CONNECT` (no echo, no acknowledgements: `verbose` off) with `name` as the connection's name, then `PING`.
pub fn connect(name: &str) -> Vec<u8> {
    let opts = serde_json::json!({
        "verbose": false, "pedantic": false, "tls_required": false, "name": name,
        "lang": "rust", "version": env!("CARGO_PKG_VERSION"), "protocol": 1, "echo": false,
    });
    let mut out = format!("CONNECT {opts}\r\n").into_bytes();
    out.extend_from_slice(PING);
    out
}

/// One operation from the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op<'a> {
    /// `INFO {json}`: the server's description, first on every connection (and again when it changes).
    Info(&'a str),
    Ping,
    Pong,
    /// `+OK` (only with `verbose`).
    Ok,
    /// `-ERR 'text'`: the text without its quotes.
    Err(&'a str),
}

/// Cut one whole operation off the front of `buf`: `Ok(Some((op, consumed)))`, `Ok(None)` if its line is not
/// complete yet, `Err` for a line no server sends a client that never subscribed.
pub fn split(buf: &[u8]) -> Result<Option<(Op<'_>, usize)>, String> {
    let Some(end) = buf.windows(2).position(|w| w == b"\r\n") else {
        if buf.len() > MAX_LINE {
            return Err(format!("no end of line in {} bytes", buf.len()));
        }
        return Ok(None);
    };
    let line = std::str::from_utf8(&buf[..end]).map_err(|_| "a line that is not UTF-8".to_owned())?;
    let (verb, rest) = line.split_once([' ', '\t']).unwrap_or((line, ""));
    let rest = rest.trim();
    let op = match verb.to_ascii_uppercase().as_str() {
        "INFO" if rest.starts_with('{') => Op::Info(rest),
        "PING" => Op::Ping,
        "PONG" => Op::Pong,
        "+OK" => Op::Ok,
        "-ERR" => Op::Err(rest.trim_matches('\'')),
        _ => return Err(format!("unexpected line {:?}", truncate(line, 80))),
    };
    Ok(Some((op, end + 2)))
}

fn truncate(s: &str, n: usize) -> &str {
    s.char_indices().nth(n).map_or(s, |(i, _)| &s[..i])
}

/// A connection the server closed, from its monitoring endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Closed {
    /// The `name` its `CONNECT` gave (the load generator's id).
    pub name: String,
    /// When the server closed it, epoch µs.
    pub stop_us: u64,
    /// The server's reason, e.g. [`STALE`] or `Client Closed`.
    pub reason: String,
}

/// The closed connections the server still remembers (it keeps the last 10,000), at most `limit` of them.
pub fn closed(monitor: SocketAddr, limit: usize) -> anyhow::Result<Vec<Closed>> {
    let body = crate::scrape::get(monitor, &format!("/connz?state=closed&limit={limit}"))?;
    parse_connz(&body)
}

/// The closed connections in a `/connz` body (those without a parsable `stop` are left out).
pub fn parse_connz(body: &str) -> anyhow::Result<Vec<Closed>> {
    let v: Value = serde_json::from_str(body).context("/connz is not JSON")?;
    let conns = v["connections"].as_array().context("/connz has no connections list")?;
    Ok(conns
        .iter()
        .filter_map(|c| {
            Some(Closed {
                name: c["name"].as_str().unwrap_or("").to_owned(),
                stop_us: epoch_us(c["stop"].as_str()?)?,
                reason: c["reason"].as_str().unwrap_or("").to_owned(),
            })
        })
        .collect())
}

/// Epoch µs of an RFC 3339 time as Go writes it (`2006-01-02T15:04:05.999999999Z07:00`); `None` if malformed.
pub fn epoch_us(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't') || b[13] != b':' || b[16] != b':' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let mut rest = &s[19..];
    let mut micros = 0i64;
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        let f = &frac[..digits.min(6)];
        micros = f.parse::<i64>().ok()? * 10i64.pow(6 - f.len() as u32);
        rest = &frac[digits..];
    }
    let offset_s = match rest.as_bytes() {
        [b'Z' | b'z'] => 0,
        [sign @ (b'+' | b'-'), ..] if rest.len() == 6 && rest.as_bytes()[3] == b':' => {
            let o = num(s.len() - 5..s.len() - 3)? * 3600 + num(s.len() - 2..s.len())? * 60;
            if *sign == b'+' {
                o
            } else {
                -o
            }
        }
        _ => return None,
    };
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    let secs = days_from_civil(y, mo, d) * 86_400 + h * 3600 + mi * 60 + sec - offset_s;
    u64::try_from(secs * 1_000_000 + micros).ok()
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_reads_each_server_operation() {
        let info = br#"INFO {"server_id":"N1","version":"2.9.10","max_payload":1048576}"#;
        let mut buf = info.to_vec();
        buf.extend_from_slice(b"\r\nPING\r\npong\r\n+OK\r\n-ERR 'Stale Connection'\r\n");
        let (op, used) = split(&buf).unwrap().unwrap();
        assert_eq!(op, Op::Info(std::str::from_utf8(&info[5..]).unwrap()));
        assert_eq!(used, info.len() + 2);
        let mut rest = &buf[used..];
        let mut ops = Vec::new();
        while let Some((op, n)) = split(rest).unwrap() {
            ops.push(op);
            rest = &rest[n..];
        }
        assert_eq!(ops, [Op::Ping, Op::Pong, Op::Ok, Op::Err(STALE)]);
        assert!(rest.is_empty());
    }

    #[test]
    fn split_waits_for_a_whole_line() {
        let whole = b"PING\r\nPONG\r\n";
        for cut in 0..6 {
            assert_eq!(split(&whole[..cut]).unwrap(), None, "cut at {cut}");
        }
        assert_eq!(split(&whole[..6]).unwrap(), Some((Op::Ping, 6)));
        assert_eq!(split(b"INFO {\"a\":1}").unwrap(), None);
        assert_eq!(split(b"-ERR 'Authorization Violation'\r").unwrap(), None);
        assert_eq!(
            split(b"-ERR 'Authorization Violation'\r\n").unwrap(),
            Some((Op::Err("Authorization Violation"), 32))
        );
    }

    #[test]
    fn split_refuses_what_a_plain_client_never_gets() {
        assert!(split(b"MSG a 1 2\r\nhi\r\n").is_err());
        assert!(split(b"INFO\r\n").is_err(), "an INFO without its JSON");
        assert!(split(b"\xff\xfe\r\n").is_err());
        assert!(split(&vec![b'x'; MAX_LINE + 1]).is_err(), "a line without an end");
    }

    #[test]
    fn connect_is_one_json_line_and_a_ping() {
        let c = connect("b\"7");
        let text = std::str::from_utf8(&c).unwrap();
        let (line, rest) = text.split_once("\r\n").unwrap();
        assert_eq!(rest, "PING\r\n");
        let json: Value = serde_json::from_str(line.strip_prefix("CONNECT ").unwrap()).unwrap();
        assert_eq!(json["name"], "b\"7");
        assert_eq!(json["verbose"], false);
        assert_eq!(json["echo"], false);
    }

    #[test]
    fn rfc3339_times_as_go_writes_them() {
        assert_eq!(epoch_us("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(epoch_us("2024-02-29T12:34:56.789012345Z"), Some(1_709_210_096_789_012));
        assert_eq!(epoch_us("2024-02-29T12:34:56.5Z"), Some(1_709_210_096_500_000));
        assert_eq!(epoch_us("2024-02-29T14:34:56.5+02:00"), Some(1_709_210_096_500_000));
        assert_eq!(epoch_us("2024-02-29T12:34:56"), None);
        assert_eq!(epoch_us("2024-13-01T00:00:00Z"), None);
        assert_eq!(epoch_us("2024-02-29T12:34:56.Z"), None);
    }

    #[test]
    fn connz_closed_connections() {
        let body = r#"{"server_id":"N","now":"2024-02-29T12:35:00Z","num_connections":2,"connections":[
            {"cid":5,"name":"b4","stop":"2024-02-29T12:34:56.000001Z","reason":"Stale Connection"},
            {"cid":6,"stop":"2024-02-29T12:34:57Z","reason":"Client Closed"},
            {"cid":7,"name":"b9","reason":"Stale Connection"}]}"#;
        let c = parse_connz(body).unwrap();
        assert_eq!(c.len(), 2);
        assert_eq!(c[0], Closed { name: "b4".into(), stop_us: 1_709_210_096_000_001, reason: STALE.into() });
        assert_eq!(c[1].name, "");
        assert!(parse_connz("{}").is_err());
    }
}
