//! The tether v1 wire codec. docs/protocol.md is the byte-level specification; its hex vectors are tested here.
//!
//! # Layout
//! A frame is `len: u32 BE` followed by `len` bytes: one kind byte, then the body. [`check`] looks at a buffer and
//! says whether a whole frame is there, rejecting a bad length from the four header bytes alone (nothing is
//! allocated for a frame that is too large). [`Frame::parse`] turns a complete frame into a [`Frame`];
//! [`Frame::encode`] writes one. Strings are `u8` length + UTF-8; the credential is `u16` length + bytes; DATA's
//! payload is the rest of the frame. Every fixed-layout body must be consumed exactly: trailing bytes are an error.

use bytes::{BufMut, Bytes, BytesMut};

use crate::reason::CloseReason;

/// The protocol version this codec speaks.
pub const PROTOCOL_VERSION: u8 = 1;
/// Bytes in the length prefix.
pub const HEADER_LEN: usize = 4;
/// Longest client id, in UTF-8 bytes.
pub const MAX_ID_LEN: usize = 128;
/// Default bound on `len` (kind byte + body).
pub const DEFAULT_MAX_FRAME: u32 = 64 * 1024;
/// The smallest bound on `len` a peer may configure: room for the largest HELLO without credential.
pub const MIN_MAX_FRAME: u32 = 256;

/// Frame kind bytes.
pub mod kind {
    pub const HELLO: u8 = 0x01;
    pub const WELCOME: u8 = 0x02;
    pub const PING: u8 = 0x03;
    pub const PONG: u8 = 0x04;
    pub const DATA: u8 = 0x05;
    pub const SUBSCRIBE: u8 = 0x06;
    pub const UNSUBSCRIBE: u8 = 0x07;
    pub const PRESENCE: u8 = 0x08;
    pub const BYE: u8 = 0x09;
    pub const UNDELIVERABLE: u8 = 0x0A;
}

/// True when `buf` starts like a TLS record (content type 20..=23, major version 3): a TLS peer on a plaintext
/// connection. Used only to explain a decode error; such bytes never decode as a frame within the default limit.
pub fn looks_like_tls(buf: &[u8]) -> bool {
    matches!(buf, [0x14..=0x17, 0x03, 0x00..=0x04, ..])
}

/// Why bytes could not be decoded. Every variant ends the connection with `protocol_error`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    #[error("frame length {len} exceeds the maximum {max}")]
    TooLarge { len: u32, max: u32 },
    #[error("frame length 0 (a frame has at least a kind byte)")]
    Empty,
    #[error("unknown frame kind 0x{0:02x}")]
    UnknownKind(u8),
    #[error("{kind} frame truncated")]
    Truncated { kind: &'static str },
    #[error("{kind} frame has {extra} trailing bytes")]
    Trailing { kind: &'static str, extra: usize },
    #[error("{field} is not valid UTF-8")]
    BadUtf8 { field: &'static str },
    #[error("client id must be 1..={MAX_ID_LEN} bytes, got {0}")]
    BadId(usize),
    #[error("unknown presence state {0}")]
    BadState(u8),
    #[error("unknown close reason code {0}")]
    BadReason(u8),
}

/// Presence state of a client id, as sent in `PRESENCE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PresenceState {
    Online = 1,
    Suspect = 2,
    Offline = 3,
}

impl PresenceState {
    pub const fn as_str(self) -> &'static str {
        match self {
            PresenceState::Online => "online",
            PresenceState::Suspect => "suspect",
            PresenceState::Offline => "offline",
        }
    }
}

/// Client → server, first frame on every connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub version: u8,
    /// Requested heartbeat interval in ms; 0 asks for the server's default. The server clamps it.
    pub heartbeat_ms: u32,
    /// Random per client process start: a reboot gets a new nonce, a reconnect of the same process keeps it.
    pub nonce: u64,
    pub client_id: String,
    /// Reserved for authentication; empty when none.
    pub credential: Bytes,
}

/// Server → client, the answer to an accepted `HELLO`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Welcome {
    pub version: u8,
    pub heartbeat_ms: u32,
    /// Silence after which either side declares the other dead.
    pub timeout_ms: u32,
    /// Increases with every session the server admits for this id.
    pub epoch: u64,
    pub server_id: String,
}

/// Liveness and presence news about one client id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Presence {
    pub client_id: String,
    pub state: PresenceState,
    /// Why it went offline; `None` for online and suspect.
    pub reason: Option<CloseReason>,
    /// Milliseconds between the last frame the server received from the client and the sending of this frame.
    pub last_seen_ago_ms: u32,
}

/// Goodbye: the sender closes the connection after this frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bye {
    pub reason: CloseReason,
    /// Hint: do not reconnect before this many ms (0 = no hint).
    pub retry_after_ms: u32,
    /// Hint: reconnect to this address instead (empty = none).
    pub alternative: String,
}

/// One decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Hello(Hello),
    Welcome(Welcome),
    Ping {
        seq: u32,
        ts_ms: u64,
    },
    Pong {
        seq: u32,
        ts_ms: u64,
    },
    /// Client → server: `peer` is the target id (empty: for the server application).
    /// Server → client: `peer` is the source id (empty: from the server application).
    Data {
        peer: String,
        payload: Bytes,
    },
    Subscribe(Vec<String>),
    Unsubscribe(Vec<String>),
    Presence(Presence),
    Bye(Bye),
    /// Server → client: a `DATA` addressed to `to` was not delivered because that id is not online.
    Undeliverable {
        to: String,
    },
}

/// Whether `buf` starts with a complete frame: `Ok(Some(total_len))` (header included), `Ok(None)` when more bytes
/// are needed, or an error as soon as the header shows a length outside `1..=max_frame`.
pub fn check(buf: &[u8], max_frame: u32) -> Result<Option<usize>, FrameError> {
    let Some(header) = buf.get(..HEADER_LEN) else {
        return Ok(None);
    };
    let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]);
    if len == 0 {
        return Err(FrameError::Empty);
    }
    if len > max_frame {
        return Err(FrameError::TooLarge { len, max: max_frame });
    }
    let total = HEADER_LEN + len as usize;
    Ok((buf.len() >= total).then_some(total))
}

/// A bounds-checked reader over one frame body.
struct Cursor<'a> {
    buf: &'a [u8],
    kind: &'static str,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], FrameError> {
        if self.buf.len() < n {
            return Err(FrameError::Truncated { kind: self.kind });
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, FrameError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, FrameError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, FrameError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes(b.try_into().expect("4 bytes")))
    }
    fn u64(&mut self) -> Result<u64, FrameError> {
        let b = self.take(8)?;
        Ok(u64::from_be_bytes(b.try_into().expect("8 bytes")))
    }
    fn str8(&mut self, field: &'static str) -> Result<String, FrameError> {
        let n = self.u8()? as usize;
        let b = self.take(n)?;
        std::str::from_utf8(b).map(str::to_owned).map_err(|_| FrameError::BadUtf8 { field })
    }
    fn id(&mut self, field: &'static str) -> Result<String, FrameError> {
        let id = self.str8(field)?;
        if id.is_empty() || id.len() > MAX_ID_LEN {
            return Err(FrameError::BadId(id.len()));
        }
        Ok(id)
    }
    fn ids(&mut self) -> Result<Vec<String>, FrameError> {
        let n = self.u16()? as usize;
        // Each id takes at least two bytes: a count larger than that is a lie, not a reason to reserve memory.
        if n > self.buf.len() / 2 {
            return Err(FrameError::Truncated { kind: self.kind });
        }
        (0..n).map(|_| self.id("subscription id")).collect()
    }
    fn finish<T>(self, value: T) -> Result<T, FrameError> {
        if self.buf.is_empty() {
            Ok(value)
        } else {
            Err(FrameError::Trailing { kind: self.kind, extra: self.buf.len() })
        }
    }
}

fn reason(code: u8) -> Result<CloseReason, FrameError> {
    CloseReason::try_from(code).map_err(|e| FrameError::BadReason(e.0))
}

impl Frame {
    /// The kind's name, for logs and errors.
    pub fn name(&self) -> &'static str {
        match self {
            Frame::Hello(_) => "HELLO",
            Frame::Welcome(_) => "WELCOME",
            Frame::Ping { .. } => "PING",
            Frame::Pong { .. } => "PONG",
            Frame::Data { .. } => "DATA",
            Frame::Subscribe(_) => "SUBSCRIBE",
            Frame::Unsubscribe(_) => "UNSUBSCRIBE",
            Frame::Presence(_) => "PRESENCE",
            Frame::Bye(_) => "BYE",
            Frame::Undeliverable { .. } => "UNDELIVERABLE",
        }
    }

    /// Parse one complete frame (header included), as delimited by [`check`].
    pub fn parse(frame: &[u8]) -> Result<Frame, FrameError> {
        let body = frame.get(HEADER_LEN..).filter(|b| !b.is_empty()).ok_or(FrameError::Empty)?;
        let (k, body) = (body[0], &body[1..]);
        let name = match k {
            kind::HELLO => "HELLO",
            kind::WELCOME => "WELCOME",
            kind::PING => "PING",
            kind::PONG => "PONG",
            kind::DATA => "DATA",
            kind::SUBSCRIBE => "SUBSCRIBE",
            kind::UNSUBSCRIBE => "UNSUBSCRIBE",
            kind::PRESENCE => "PRESENCE",
            kind::BYE => "BYE",
            kind::UNDELIVERABLE => "UNDELIVERABLE",
            other => return Err(FrameError::UnknownKind(other)),
        };
        let mut c = Cursor { buf: body, kind: name };
        match k {
            kind::HELLO => {
                let version = c.u8()?;
                let heartbeat_ms = c.u32()?;
                let nonce = c.u64()?;
                let client_id = c.id("client id")?;
                let cred_len = c.u16()? as usize;
                let credential = Bytes::copy_from_slice(c.take(cred_len)?);
                c.finish(Frame::Hello(Hello { version, heartbeat_ms, nonce, client_id, credential }))
            }
            kind::WELCOME => {
                let version = c.u8()?;
                let heartbeat_ms = c.u32()?;
                let timeout_ms = c.u32()?;
                let epoch = c.u64()?;
                let server_id = c.str8("server id")?;
                c.finish(Frame::Welcome(Welcome { version, heartbeat_ms, timeout_ms, epoch, server_id }))
            }
            kind::PING | kind::PONG => {
                let seq = c.u32()?;
                let ts_ms = c.u64()?;
                let f = if k == kind::PING { Frame::Ping { seq, ts_ms } } else { Frame::Pong { seq, ts_ms } };
                c.finish(f)
            }
            kind::DATA => {
                let peer = c.str8("data peer")?;
                if peer.len() > MAX_ID_LEN {
                    return Err(FrameError::BadId(peer.len()));
                }
                let payload = Bytes::copy_from_slice(c.buf);
                Ok(Frame::Data { peer, payload })
            }
            kind::SUBSCRIBE => {
                let ids = c.ids()?;
                c.finish(Frame::Subscribe(ids))
            }
            kind::UNSUBSCRIBE => {
                let ids = c.ids()?;
                c.finish(Frame::Unsubscribe(ids))
            }
            kind::PRESENCE => {
                let client_id = c.id("presence id")?;
                let state = match c.u8()? {
                    1 => PresenceState::Online,
                    2 => PresenceState::Suspect,
                    3 => PresenceState::Offline,
                    s => return Err(FrameError::BadState(s)),
                };
                let reason = match c.u8()? {
                    0 => None,
                    code => Some(reason(code)?),
                };
                let last_seen_ago_ms = c.u32()?;
                c.finish(Frame::Presence(Presence { client_id, state, reason, last_seen_ago_ms }))
            }
            kind::BYE => {
                let reason = reason(c.u8()?)?;
                let retry_after_ms = c.u32()?;
                let alternative = c.str8("alternative")?;
                c.finish(Frame::Bye(Bye { reason, retry_after_ms, alternative }))
            }
            kind::UNDELIVERABLE => {
                let to = c.id("undeliverable id")?;
                c.finish(Frame::Undeliverable { to })
            }
            _ => unreachable!("kind was matched above"),
        }
    }

    /// Append this frame, header included, to `out`.
    ///
    /// Strings longer than their length field allows are a caller bug and are cut at a character boundary within
    /// the limit rather than corrupting the stream.
    pub fn encode(&self, out: &mut BytesMut) {
        let start = out.len();
        out.put_u32(0); // patched below
        match self {
            Frame::Hello(h) => {
                out.put_u8(kind::HELLO);
                out.put_u8(h.version);
                out.put_u32(h.heartbeat_ms);
                out.put_u64(h.nonce);
                put_str8(out, &h.client_id);
                let cred = &h.credential[..h.credential.len().min(u16::MAX as usize)];
                out.put_u16(cred.len() as u16);
                out.put_slice(cred);
            }
            Frame::Welcome(w) => {
                out.put_u8(kind::WELCOME);
                out.put_u8(w.version);
                out.put_u32(w.heartbeat_ms);
                out.put_u32(w.timeout_ms);
                out.put_u64(w.epoch);
                put_str8(out, &w.server_id);
            }
            Frame::Ping { seq, ts_ms } | Frame::Pong { seq, ts_ms } => {
                out.put_u8(if matches!(self, Frame::Ping { .. }) { kind::PING } else { kind::PONG });
                out.put_u32(*seq);
                out.put_u64(*ts_ms);
            }
            Frame::Data { peer, payload } => {
                out.put_u8(kind::DATA);
                put_str8(out, peer);
                out.put_slice(payload);
            }
            Frame::Subscribe(ids) | Frame::Unsubscribe(ids) => {
                out.put_u8(if matches!(self, Frame::Subscribe(_)) { kind::SUBSCRIBE } else { kind::UNSUBSCRIBE });
                let ids = &ids[..ids.len().min(u16::MAX as usize)];
                out.put_u16(ids.len() as u16);
                for id in ids {
                    put_str8(out, id);
                }
            }
            Frame::Presence(p) => {
                out.put_u8(kind::PRESENCE);
                put_str8(out, &p.client_id);
                out.put_u8(p.state as u8);
                out.put_u8(p.reason.map_or(0, u8::from));
                out.put_u32(p.last_seen_ago_ms);
            }
            Frame::Bye(b) => {
                out.put_u8(kind::BYE);
                out.put_u8(b.reason.into());
                out.put_u32(b.retry_after_ms);
                put_str8(out, &b.alternative);
            }
            Frame::Undeliverable { to } => {
                out.put_u8(kind::UNDELIVERABLE);
                put_str8(out, to);
            }
        }
        let len = (out.len() - start - HEADER_LEN) as u32;
        out[start..start + HEADER_LEN].copy_from_slice(&len.to_be_bytes());
    }

    /// The encoded length, header included.
    pub fn encoded_len(&self) -> usize {
        let body = match self {
            Frame::Hello(h) => 1 + 4 + 8 + 1 + h.client_id.len() + 2 + h.credential.len(),
            Frame::Welcome(w) => 1 + 4 + 4 + 8 + 1 + w.server_id.len(),
            Frame::Ping { .. } | Frame::Pong { .. } => 4 + 8,
            Frame::Data { peer, payload } => 1 + peer.len() + payload.len(),
            Frame::Subscribe(ids) | Frame::Unsubscribe(ids) => 2 + ids.iter().map(|i| 1 + i.len()).sum::<usize>(),
            Frame::Presence(p) => 1 + p.client_id.len() + 1 + 1 + 4,
            Frame::Bye(b) => 1 + 4 + 1 + b.alternative.len(),
            Frame::Undeliverable { to } => 1 + to.len(),
        };
        HEADER_LEN + 1 + body
    }

    /// Encode into a fresh buffer.
    pub fn to_bytes(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(self.encoded_len());
        self.encode(&mut out);
        out.freeze()
    }
}

fn put_str8(out: &mut BytesMut, s: &str) {
    let mut end = s.len().min(u8::MAX as usize);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    out.put_u8(end as u8);
    out.put_slice(&s.as_bytes()[..end]);
}

#[cfg(test)]
mod tests;
