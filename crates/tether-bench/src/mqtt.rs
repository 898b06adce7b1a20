//! A minimal MQTT 3.1.1 codec: exactly the packets the benchmark needs against Mosquitto.
//!
//! # Layout
//! Encoders for CONNECT (with a Will), PINGREQ, SUBSCRIBE and DISCONNECT; [`split`] cuts one packet off a buffer
//! (type nibble + body); [`publish_topic`] reads a QoS 0 PUBLISH's topic. Written here rather than taken from a
//! client crate because the load generator holds thousands of bare connections per process and needs only five
//! packet types: a full client's event loop per connection would measure the client, not the broker.

/// Packet type nibbles (the high four bits of the first byte).
pub const CONNACK: u8 = 2;
pub const PUBLISH: u8 = 3;
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

/// SUBSCRIBE to one topic filter at QoS 0.
pub fn subscribe(packet_id: u16, filter: &str) -> Vec<u8> {
    let mut body = packet_id.to_be_bytes().to_vec();
    string(&mut body, filter.as_bytes());
    body.push(0);
    let mut out = vec![0x82];
    remaining_length(&mut out, body.len());
    out.extend_from_slice(&body);
    out
}

/// One packet cut off a buffer: its type nibble, its body, and the bytes it took.
pub type Packet<'a> = (u8, &'a [u8], usize);

/// Cut one whole packet off the front of `buf`: `Ok(Some((type, body, consumed)))`, `Ok(None)` if incomplete.
pub fn split(buf: &[u8]) -> Result<Option<Packet<'_>>, &'static str> {
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
    Ok(Some((first >> 4, &buf[i..i + len], i + len)))
}

/// The topic of a QoS 0 PUBLISH body, and its payload.
pub fn publish_topic(body: &[u8]) -> Option<(&str, &[u8])> {
    let n = u16::from_be_bytes([*body.first()?, *body.get(1)?]) as usize;
    let topic = std::str::from_utf8(body.get(2..2 + n)?).ok()?;
    Some((topic, &body[2 + n..]))
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
}
