//! A minimal MQTT 3.1.1 codec: exactly the packets the benchmark needs against Mosquitto.
//!
//! # Layout
//! Encoders for CONNECT (with a Will), PINGREQ, SUBSCRIBE (QoS 0 or 1), PUBLISH (QoS 0 or 1), PUBACK and
//! DISCONNECT; [`split`] cuts one packet off a buffer (type nibble + body), [`split_raw`] keeps the whole first
//! byte (a PUBLISH's QoS is in its flags); [`publish_topic`] reads a QoS 0 PUBLISH's topic and [`publish_parts`]
//! any PUBLISH. Written here rather than taken from a client crate because the load generator holds thousands of
//! bare connections per process and needs only these packet types: a full client's event loop per connection
//! would measure the client, not the broker.

/// Packet type nibbles (the high four bits of the first byte).
pub const CONNACK: u8 = 2;
pub const PUBLISH: u8 = 3;
pub const PUBACK: u8 = 4;
pub const SUBACK: u8 = 9;
pub const PINGRESP: u8 = 13;

pub const PINGREQ: [u8; 2] = [0xC0, 0x00];
pub const DISCONNECT: [u8; 2] = [0xE0, 0x00];

fn remaining_length(out: &mut Vec<u8>, mut n: usize) {
    loop {
        let mut byte = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if n == 0 {
            return;
        }
    }
}

fn string(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s);
}

/// CONNECT with a clean session, `keepalive_s`, and (optionally) a QoS 0 Will on `will_topic`.
pub fn connect(client_id: &str, keepalive_s: u16, will: Option<(&str, &[u8])>) -> Vec<u8> {
    let mut body = Vec::new();
    string(&mut body, b"MQTT");
    body.push(4); // protocol level 3.1.1
    body.push(0x02 | if will.is_some() { 0x04 } else { 0 }); // clean session, will flag
    body.extend_from_slice(&keepalive_s.to_be_bytes());
    string(&mut body, client_id.as_bytes());
    if let Some((topic, message)) = will {
        string(&mut body, topic.as_bytes());
        string(&mut body, message);
    }
    let mut out = vec![0x10];
    remaining_length(&mut out, body.len());
    out.extend_from_slice(&body);
    out
}

/// SUBSCRIBE to one topic filter at `qos` (0 or 1).
pub fn subscribe(packet_id: u16, filter: &str, qos: u8) -> Vec<u8> {
    let mut body = packet_id.to_be_bytes().to_vec();
    string(&mut body, filter.as_bytes());
    body.push(qos);
    let mut out = vec![0x82];
    remaining_length(&mut out, body.len());
    out.extend_from_slice(&body);
    out
}

/// Append a PUBLISH of `payload` to `topic`: QoS 1 with `packet_id`, or QoS 0 without one.
pub fn publish_into(out: &mut Vec<u8>, topic: &str, packet_id: Option<u16>, payload: &[u8]) {
    out.push(if packet_id.is_some() { 0x32 } else { 0x30 });
    remaining_length(out, 2 + topic.len() + packet_id.map_or(0, |_| 2) + payload.len());
    string(out, topic.as_bytes());
    if let Some(id) = packet_id {
        out.extend_from_slice(&id.to_be_bytes());
    }
    out.extend_from_slice(payload);
}

/// Append a PUBACK of `packet_id` (a QoS 1 PUBLISH received).
pub fn puback_into(out: &mut Vec<u8>, packet_id: u16) {
    out.extend_from_slice(&[PUBACK << 4, 2]);
    out.extend_from_slice(&packet_id.to_be_bytes());
}

/// One packet cut off a buffer: its type nibble (its whole first byte from [`split_raw`]), its body, and the bytes
/// it took.
pub type Packet<'a> = (u8, &'a [u8], usize);

/// Cut one whole packet off the front of `buf`: `Ok(Some((type, body, consumed)))`, `Ok(None)` if incomplete.
pub fn split(buf: &[u8]) -> Result<Option<Packet<'_>>, &'static str> {
    Ok(split_raw(buf)?.map(|(first, body, used)| (first >> 4, body, used)))
}

/// [`split`], with the packet's whole first byte (type and flags) instead of its type.
pub fn split_raw(buf: &[u8]) -> Result<Option<Packet<'_>>, &'static str> {
    let Some(&first) = buf.first() else { return Ok(None) };
    let (mut len, mut mult, mut i) = (0usize, 1usize, 1usize);
    loop {
        let Some(&b) = buf.get(i) else { return Ok(None) };
        len += (b & 0x7f) as usize * mult;
        i += 1;
        if b & 0x80 == 0 {
            break;
        }
        mult *= 128;
        if i > 4 {
            return Err("remaining length longer than 4 bytes");
        }
    }
    if buf.len() < i + len {
        return Ok(None);
    }
    Ok(Some((first, &buf[i..i + len], i + len)))
}

/// The topic of a QoS 0 PUBLISH body, and its payload.
pub fn publish_topic(body: &[u8]) -> Option<(&str, &[u8])> {
    let n = u16::from_be_bytes([*body.first()?, *body.get(1)?]) as usize;
    let topic = std::str::from_utf8(body.get(2..2 + n)?).ok()?;
    Some((topic, &body[2 + n..]))
}

/// A PUBLISH as received: its QoS, topic, packet id (QoS 1 and 2) and payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Publish<'a> {
    pub qos: u8,
    pub topic: &'a str,
    pub packet_id: Option<u16>,
    pub payload: &'a [u8],
}

/// The parts of a PUBLISH from its first byte and body (as [`split_raw`] cuts them); `None` if malformed.
pub fn publish_parts(first: u8, body: &[u8]) -> Option<Publish<'_>> {
    let qos = (first >> 1) & 3;
    let (topic, rest) = publish_topic(body)?;
    let (packet_id, payload) = match qos {
        0 => (None, rest),
        _ => (Some(u16::from_be_bytes([*rest.first()?, *rest.get(1)?])), &rest[2..]),
    };
    Some(Publish { qos, topic, packet_id, payload })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_matches_the_spec_layout() {
        let c = connect("c1", 5, Some(("w/c1", b"c1")));
        // 0x10, remaining 24: "MQTT" header (6) + level + flags + keepalive (4) + id (4) + will topic (6) + msg (4).
        assert_eq!(&c[..2], &[0x10, 24]);
        assert_eq!(&c[2..10], &[0, 4, b'M', b'Q', b'T', b'T', 4, 0x06]);
        assert_eq!(&c[10..12], &[0, 5]);
        assert_eq!(split(&c).unwrap().unwrap().2, c.len());
    }

    #[test]
    fn split_handles_partial_and_long_lengths() {
        assert_eq!(split(&[0x20]).unwrap(), None);
        assert_eq!(split(&[0x20, 0x02, 0x00]).unwrap(), None);
        assert_eq!(split(&[0x20, 0x02, 0x00, 0x00]).unwrap(), Some((CONNACK, &[0u8, 0][..], 4)));
        let mut big = vec![0x30, 0xC8, 0x01]; // 200 bytes
        big.extend(std::iter::repeat_n(0, 200));
        assert_eq!(split(&big).unwrap().unwrap().2, 203);
        assert!(split(&[0x30, 0xff, 0xff, 0xff, 0xff, 0x01]).is_err());
        let p = [0, 3, b'a', b'/', b'b', b'x'];
        assert_eq!(publish_topic(&p), Some(("a/b", &b"x"[..])));
    }

    #[test]
    fn qos1_publish_puback_and_subscribe_match_the_spec_layout() {
        let mut out = Vec::new();
        publish_into(&mut out, "rr0", Some(0x0102), b"hi");
        // PUBLISH, QoS 1 (flags 0b0010), remaining 9: topic (2 + 3), packet id (2), payload (2).
        assert_eq!(out, [0x32, 9, 0, 3, b'r', b'r', b'0', 1, 2, b'h', b'i']);
        let (first, body, used) = split_raw(&out).unwrap().unwrap();
        assert_eq!(used, out.len());
        let p = publish_parts(first, body).unwrap();
        assert_eq!(p, Publish { qos: 1, topic: "rr0", packet_id: Some(0x0102), payload: b"hi" });
        out.clear();
        publish_into(&mut out, "t", None, b"x");
        assert_eq!(out, [0x30, 4, 0, 1, b't', b'x']);
        let (first, body, _) = split_raw(&out).unwrap().unwrap();
        assert_eq!(publish_parts(first, body).unwrap().packet_id, None);
        // A QoS 1 PUBLISH cut before its packet id is malformed, not a panic.
        assert_eq!(publish_parts(0x32, &[0, 1, b't', 9]), None);
        out.clear();
        puback_into(&mut out, 0xBEEF);
        assert_eq!(out, [0x40, 2, 0xBE, 0xEF]);
        assert_eq!(split(&out).unwrap(), Some((PUBACK, &[0xBE, 0xEF][..], 4)));
        assert_eq!(subscribe(7, "rr0", 1), [0x82, 8, 0, 7, 0, 3, b'r', b'r', b'0', 1]);
    }
}
