//! The tether wire codec, versions 1 and 2. docs/protocol.md is the byte-level specification; its hex vectors are
//! tested here.
//!
//! # Layout
//! A frame is `len: u32 BE` followed by `len` bytes: one kind byte, then the body. [`check`] looks at a buffer and
//! says whether a whole frame is there, rejecting a bad length from the four header bytes alone (nothing is
//! allocated for a frame that is too large). [`Frame::parse_v`] turns a complete frame into a [`Frame`];
//! [`Frame::encode_v`] writes one. Strings are `u8` length + UTF-8; the credential is `u16` length + bytes; DATA's
//! payload is the rest of the frame. Every fixed-layout body must be consumed exactly: trailing bytes are an error.
//!
//! # Versions
//! `HELLO` and `WELCOME` carry their own version and are laid out by it. Version 2 adds, to `HELLO`, an extension
//! block; to `WELCOME`, the server's maximum frame and an extension block; to `PRESENCE`, a flags byte; to
//! `UNDELIVERABLE`, why. Extensions are type-length-value entries a receiver skips when it does not know the type,
//! and v2 receivers keep unknown close reason codes ([`CloseReason::Unknown`]) instead of failing: that is how the
//! protocol grows without another layout change. Every other frame is the same in both versions. The `_v`
//! functions take the version a connection negotiated; [`Frame::parse`] and [`Frame::to_bytes`] are version 1.
//! [`sniff`] names the protocol of bytes that are not tether frames (TLS, HTTP, MQTT, SSH).

use bytes::{BufMut, Bytes, BytesMut};

use crate::reason::CloseReason;

/// Protocol version 1: the original, strict layout.
pub const V1: u8 = 1;
/// Protocol version 2: limits advertised, extensions, presence flags, unknown reason codes tolerated.
pub const V2: u8 = 2;
/// The highest protocol version this codec speaks (what a client offers and a server accepts).
pub const PROTOCOL_VERSION: u8 = V2;
/// Bytes in the length prefix.
pub const HEADER_LEN: usize = 4;
/// Longest client id, in UTF-8 bytes.
pub const MAX_ID_LEN: usize = 128;
/// Default bound on `len` (kind byte + body).
pub const DEFAULT_MAX_FRAME: u32 = 64 * 1024;
/// The smallest bound on `len` a peer may configure: room for the largest HELLO without credential.
pub const MIN_MAX_FRAME: u32 = 256;
/// The largest bound on `len` a peer may configure or be told to accept (16 MiB).
pub const MAX_MAX_FRAME: u32 = 16 << 20;
/// `DATA` bytes around the payload when the peer id is the longest allowed: kind, `str8` length, 128-byte id.
pub const RELAY_OVERHEAD: u32 = 2 + MAX_ID_LEN as u32;

/// The largest `DATA` payload the server relays to another client under a `max_frame` limit: whatever the
/// sender's and receiver's ids, the relayed frame (`peer` rewritten to the sender's id) then fits the limit.
pub const fn max_relay_payload(max_frame: u32) -> usize {
    max_frame.saturating_sub(RELAY_OVERHEAD) as usize
}

/// Bytes a sequence number adds to a frame (`SDATA`, the `reliable` extension).
pub const SEQ_LEN: u32 = 8;

/// [`max_relay_payload`] for `SDATA` (the `reliable` extension), whose sequence number takes 8 bytes more: the
/// largest payload a reliable session relays or holds for a client under a `max_frame` limit.
pub const fn max_reliable_relay_payload(max_frame: u32) -> usize {
    max_frame.saturating_sub(RELAY_OVERHEAD + SEQ_LEN) as usize
}

/// [`max_payload`] for `SDATA`: 8 bytes less, for the sequence number.
pub const fn max_reliable_payload(max_frame: u32, to_client: bool) -> usize {
    max_payload(max_frame, to_client).saturating_sub(SEQ_LEN as usize)
}

/// The largest `DATA` payload a client may send under the server's `max_frame`: to another client
/// ([`max_relay_payload`]) or to the server application (the whole frame but the kind byte and an empty `peer`).
pub const fn max_payload(max_frame: u32, to_client: bool) -> usize {
    if to_client {
        max_relay_payload(max_frame)
    } else {
        max_frame.saturating_sub(2) as usize
    }
}

/// The largest frame a peer that announced `max_frame` is held to: at most [`MAX_MAX_FRAME`], whatever it says.
pub const fn peer_max_frame(max_frame: u32) -> u32 {
    if max_frame < MAX_MAX_FRAME {
        max_frame
    } else {
        MAX_MAX_FRAME
    }
}

/// Entries an extension block may hold; more is an error (the duplicate check stays cheap, whatever a peer sends).
pub const MAX_EXTENSIONS: usize = 64;

/// Extension types (v2). A receiver skips types it does not know.
pub mod ext {
    /// In `WELCOME`: `u32`, presence subscriptions one connection may hold.
    pub const MAX_SUBSCRIPTIONS: u16 = 0x0001;
    /// In `WELCOME`: `u32`, `DATA` payload bytes per second one connection may send (absent: no limit).
    pub const MAX_DATA_RATE: u16 = 0x0002;
    /// In `HELLO` and `WELCOME`: acknowledged delivery and resume ([`crate::reliable`]).
    pub const RELIABLE: u16 = 0x0003;
    /// In `HELLO` (empty): the client may ask for a new heartbeat during the session. In `WELCOME` (two `u32`s,
    /// the shortest and longest interval in ms the server grants): it may, with `HEARTBEAT` frames
    /// ([`HeartbeatRange`](super::HeartbeatRange)).
    pub const HEARTBEAT_UPDATE: u16 = 0x0004;
}

/// `PRESENCE` flag bits (v2). A receiver ignores bits it does not know.
pub mod presence_flags {
    /// Offline: the client ended its connection itself (its `BYE`, its FIN, or a reset from its side), as
    /// opposed to a verdict or command of the server.
    pub const BY_CLIENT: u8 = 0x01;
}

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
    /// `reliable` extension only: sequenced `DATA`, acknowledgements, and the server's reports on messages.
    pub const SDATA: u8 = 0x0B;
    pub const ACK: u8 = 0x0C;
    pub const REPORT: u8 = 0x0D;
    /// `heartbeat_update` extension only: a new heartbeat asked for (client) or in effect (server).
    pub const HEARTBEAT: u8 = 0x0E;
}

/// A protocol that is not tether, recognised from the first bytes a peer sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Foreign {
    /// A TLS record (content type 20..=23, major version 3).
    Tls,
    /// An HTTP/1.x request, or a response starting `HTTP/`.
    Http,
    /// An MQTT `CONNECT` (protocol name `MQTT` or `MQIsdp`), with its protocol level.
    Mqtt { level: u8 },
    /// An SSH identification string (`SSH-`).
    Ssh,
}

impl Foreign {
    /// The protocol's usual name.
    pub const fn name(self) -> &'static str {
        match self {
            Foreign::Tls => "TLS",
            Foreign::Http => "HTTP",
            Foreign::Mqtt { .. } => "MQTT",
            Foreign::Ssh => "SSH",
        }
    }
}

/// Which foreign protocol `buf` (the first bytes of a connection) speaks, if it is one we can tell cheaply. Used
/// only to explain a decode error: none of these decode as a frame within any allowed limit (their first four
/// bytes read as a length far above [`MAX_MAX_FRAME`]), except an MQTT `CONNECT`, which is checked by name.
pub fn sniff(buf: &[u8]) -> Option<Foreign> {
    const METHODS: [&[u8]; 9] =
        [b"GET ", b"POST ", b"PUT ", b"HEAD ", b"DELETE ", b"OPTIONS ", b"PATCH ", b"CONNECT ", b"HTTP/"];
    if matches!(buf, [0x14..=0x17, 0x03, 0x00..=0x04, ..]) {
        return Some(Foreign::Tls);
    }
    if METHODS.iter().any(|m| buf.starts_with(m)) {
        return Some(Foreign::Http);
    }
    if buf.starts_with(b"SSH-") {
        return Some(Foreign::Ssh);
    }
    // MQTT CONNECT: type 0x10, a 1-4 byte remaining length, then the protocol name as a u16-prefixed string and
    // the protocol level.
    if buf.first() == Some(&0x10) {
        let len_bytes = buf[1..].iter().take(4).position(|b| b & 0x80 == 0)? + 1;
        let rest = &buf[1 + len_bytes..];
        for name in [&b"\x00\x04MQTT"[..], &b"\x00\x06MQIsdp"[..]] {
            if rest.starts_with(name) {
                return Some(Foreign::Mqtt { level: rest.get(name.len()).copied().unwrap_or(0) });
            }
        }
    }
    None
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
    #[error("unsupported protocol version {0}")]
    BadVersion(u8),
    #[error("extension 0x{0:04x} appears twice")]
    DuplicateExtension(u16),
    #[error("more than {MAX_EXTENSIONS} extensions")]
    TooManyExtensions,
    #[error("sequence number 0 (sequences start at 1)")]
    ZeroSeq,
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

/// One type-length-value entry of a v2 extension block (`type: u16`, `len: u16`, `value`). Unknown types are
/// kept, so a frame re-encodes to its exact bytes, and otherwise ignored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extension {
    pub kind: u16,
    pub value: Bytes,
}

impl Extension {
    /// An extension holding one `u32`.
    pub fn u32(kind: u16, v: u32) -> Extension {
        Extension { kind, value: Bytes::copy_from_slice(&v.to_be_bytes()) }
    }

    /// The `u32` held by the extension of type `kind` in `list`: `None` when absent or not four bytes long.
    pub fn find_u32(list: &[Extension], kind: u16) -> Option<u32> {
        let e = list.iter().find(|e| e.kind == kind)?;
        Some(u32::from_be_bytes(e.value.as_ref().try_into().ok()?))
    }
}

/// The `heartbeat_update` extension's value in `WELCOME`: the intervals the server grants when a client asks for a
/// new one during the session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeartbeatRange {
    pub min_ms: u32,
    pub max_ms: u32,
}

impl HeartbeatRange {
    /// The range a `WELCOME`'s extensions grant: `None` when absent or not eight bytes long.
    pub fn find(list: &[Extension]) -> Option<HeartbeatRange> {
        let e = list.iter().find(|e| e.kind == ext::HEARTBEAT_UPDATE)?;
        let v: [u8; 8] = e.value.as_ref().try_into().ok()?;
        let (min, max) = v.split_at(4);
        Some(HeartbeatRange {
            min_ms: u32::from_be_bytes(min.try_into().ok()?),
            max_ms: u32::from_be_bytes(max.try_into().ok()?),
        })
    }

    /// The `WELCOME` extension granting this range.
    pub fn extension(self) -> Extension {
        let mut v = Vec::with_capacity(8);
        v.extend_from_slice(&self.min_ms.to_be_bytes());
        v.extend_from_slice(&self.max_ms.to_be_bytes());
        Extension { kind: ext::HEARTBEAT_UPDATE, value: Bytes::from(v) }
    }

    /// The `HELLO` extension asking for it (empty).
    pub fn offer() -> Extension {
        Extension { kind: ext::HEARTBEAT_UPDATE, value: Bytes::new() }
    }

    /// Whether a `HELLO`'s extensions ask for it.
    pub fn offered(list: &[Extension]) -> bool {
        list.iter().any(|e| e.kind == ext::HEARTBEAT_UPDATE)
    }
}

/// Client → server, first frame on every connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// The highest protocol version the client speaks; it also selects this frame's layout (2 and above: the v2
    /// layout, with extensions).
    pub version: u8,
    /// Requested heartbeat interval in ms; 0 asks for the server's default. The server clamps it.
    pub heartbeat_ms: u32,
    /// Random per client process start: a reboot gets a new nonce, a reconnect of the same process keeps it.
    pub nonce: u64,
    pub client_id: String,
    /// The client's token when the server requires authentication; empty when none.
    pub credential: Bytes,
    /// v2: extensions (`reliable` is the one defined for `HELLO`; a server skips what it does not know). Not sent
    /// in v1.
    pub extensions: Vec<Extension>,
}

impl Hello {
    /// A `HELLO` offering `version` as `client_id`: the server's default heartbeat, no credential, no extensions.
    pub fn new(version: u8, client_id: impl Into<String>, nonce: u64) -> Hello {
        Hello {
            version,
            heartbeat_ms: 0,
            nonce,
            client_id: client_id.into(),
            credential: Bytes::new(),
            extensions: Vec::new(),
        }
    }
}

/// Server → client, the answer to an accepted `HELLO`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Welcome {
    /// The version of the session: the lower of the client's and the server's highest.
    pub version: u8,
    pub heartbeat_ms: u32,
    /// Silence after which either side declares the other dead.
    pub timeout_ms: u32,
    /// Increases with every session the server admits.
    pub epoch: u64,
    pub server_id: String,
    /// v2: the largest `len` the server accepts and ever sends. `None` in v1, where it is not said.
    pub max_frame: Option<u32>,
    /// v2: limits and other facts as extensions ([`ext`]). Empty in v1.
    pub extensions: Vec<Extension>,
}

/// Liveness and presence news about one client id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Presence {
    pub client_id: String,
    pub state: PresenceState,
    /// Why it went offline; `None` for online and suspect, and for an id the server knows nothing about.
    pub reason: Option<CloseReason>,
    /// Milliseconds between the last frame the server received from the client and the sending of this frame;
    /// `u32::MAX` when unknown.
    pub last_seen_ago_ms: u32,
    /// v2: [`presence_flags`] bits (who ended the connection). Always 0 in v1.
    pub flags: u8,
}

impl Presence {
    /// Offline because the client ended its connection itself (v2; always false in v1).
    pub fn by_client(&self) -> bool {
        self.flags & presence_flags::BY_CLIENT != 0
    }
}

/// Why a relayed `DATA` was not delivered (v2 `UNDELIVERABLE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Undeliverable {
    /// Not said: always so in v1, where `UNDELIVERABLE` covers every reason.
    Unspecified,
    /// The target id is not online.
    NotOnline,
    /// The payload is larger than the server relays ([`max_relay_payload`]).
    TooLarge,
    /// The target's reliable session expired (offline longer than the server keeps sessions) before it took the
    /// message.
    Expired,
    /// The target's reliable session holds as many messages or bytes as the server allows.
    HoldFull,
    /// The target's reliable session ended because a connection without its resume token took the id.
    Replaced,
    /// For the server application: its event queue was full.
    AppBusy,
    /// A code this build does not know (a newer server).
    Other(u8),
}

impl Undeliverable {
    pub fn code(self) -> u8 {
        match self {
            Undeliverable::Unspecified => 0,
            Undeliverable::NotOnline => 1,
            Undeliverable::TooLarge => 2,
            Undeliverable::Expired => 3,
            Undeliverable::HoldFull => 4,
            Undeliverable::Replaced => 5,
            Undeliverable::AppBusy => 6,
            Undeliverable::Other(c) => c,
        }
    }

    pub fn from_code(code: u8) -> Undeliverable {
        match code {
            0 => Undeliverable::Unspecified,
            1 => Undeliverable::NotOnline,
            2 => Undeliverable::TooLarge,
            3 => Undeliverable::Expired,
            4 => Undeliverable::HoldFull,
            5 => Undeliverable::Replaced,
            6 => Undeliverable::AppBusy,
            c => Undeliverable::Other(c),
        }
    }

    pub const fn as_str(self) -> &'static str {
        match self {
            Undeliverable::Unspecified => "unspecified",
            Undeliverable::NotOnline => "not_online",
            Undeliverable::TooLarge => "too_large",
            Undeliverable::Expired => "expired",
            Undeliverable::HoldFull => "hold_full",
            Undeliverable::Replaced => "replaced",
            Undeliverable::AppBusy => "app_busy",
            Undeliverable::Other(_) => "unknown",
        }
    }
}

/// The server's word on messages a reliable client sent (`REPORT`, `reliable` extension): sequenced in the
/// server's stream like `SDATA`, so it is held and replayed too.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// Its place in the server's stream to this client.
    pub seq: u64,
    /// The client the messages were sent to (empty: the server application).
    pub peer: String,
    /// `None`: the receiving application took them (a delivery receipt). `Some(why)`: they will never arrive.
    pub outcome: Option<Undeliverable>,
    /// The sender's own sequence numbers of those messages.
    pub seqs: Vec<u64>,
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
    /// Server → client: a `DATA` addressed to `to` was not delivered (the id is not online, or, in v2 said
    /// explicitly, the payload is too large to relay).
    Undeliverable {
        to: String,
        why: Undeliverable,
    },
    /// `reliable` extension, both directions: `DATA` with the sender's sequence number (1, 2, 3, … per session
    /// and direction).
    Sdata {
        seq: u64,
        peer: String,
        payload: Bytes,
    },
    /// `reliable` extension, both directions: every sequenced frame up to `seq` was received.
    Ack {
        seq: u64,
    },
    /// `reliable` extension, server → client.
    Report(Report),
    /// `heartbeat_update` extension. Client → server: the interval asked for (`timeout_ms` 0). Server → client:
    /// the interval and timeout both sides keep from now on.
    Heartbeat {
        interval_ms: u32,
        timeout_ms: u32,
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
    fn seq(&mut self) -> Result<u64, FrameError> {
        match self.u64()? {
            0 => Err(FrameError::ZeroSeq),
            n => Ok(n),
        }
    }
    fn peer(&mut self, field: &'static str) -> Result<String, FrameError> {
        let peer = self.str8(field)?;
        if peer.len() > MAX_ID_LEN {
            return Err(FrameError::BadId(peer.len()));
        }
        Ok(peer)
    }
    fn seqs(&mut self) -> Result<Vec<u64>, FrameError> {
        let n = self.u16()? as usize;
        // As for ids: a count the frame has no room for is refused before anything is reserved.
        if n > self.buf.len() / 8 {
            return Err(FrameError::Truncated { kind: self.kind });
        }
        (0..n).map(|_| self.seq()).collect()
    }
    /// A v2 extension block: `bytes16` of `type: u16, len: u16, value` entries, each type at most once, at most
    /// [`MAX_EXTENSIONS`] of them.
    fn extensions(&mut self) -> Result<Vec<Extension>, FrameError> {
        let n = self.u16()? as usize;
        let mut block = Cursor { buf: self.take(n)?, kind: self.kind };
        let mut out: Vec<Extension> = Vec::new();
        while !block.buf.is_empty() {
            if out.len() == MAX_EXTENSIONS {
                return Err(FrameError::TooManyExtensions);
            }
            let kind = block.u16()?;
            let len = block.u16()? as usize;
            let value = Bytes::copy_from_slice(block.take(len)?);
            if out.iter().any(|e| e.kind == kind) {
                return Err(FrameError::DuplicateExtension(kind));
            }
            out.push(Extension { kind, value });
        }
        Ok(out)
    }
    fn finish<T>(self, value: T) -> Result<T, FrameError> {
        if self.buf.is_empty() {
            Ok(value)
        } else {
            Err(FrameError::Trailing { kind: self.kind, extra: self.buf.len() })
        }
    }
}

/// A close reason code: unknown codes (and codes defined after v1) are an error in v1 and kept as
/// [`CloseReason::Unknown`] from v2 on. Code 0 names no reason in any version.
fn reason(code: u8, version: u8) -> Result<CloseReason, FrameError> {
    match CloseReason::try_from(code) {
        Ok(_) if version < V2 && code > CloseReason::V1_CODES => Err(FrameError::BadReason(code)),
        Ok(r) => Ok(r),
        Err(_) if version >= V2 && code != 0 => Ok(CloseReason::Unknown(code)),
        Err(e) => Err(FrameError::BadReason(e.0)),
    }
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
            Frame::Sdata { .. } => "SDATA",
            Frame::Ack { .. } => "ACK",
            Frame::Report(_) => "REPORT",
            Frame::Heartbeat { .. } => "HEARTBEAT",
        }
    }

    /// Parse one complete version 1 frame (header included), as delimited by [`check`]. `HELLO` and `WELCOME` are
    /// laid out by their own version field whatever the version given.
    pub fn parse(frame: &[u8]) -> Result<Frame, FrameError> {
        Frame::parse_v(frame, V1)
    }

    /// Parse one complete frame (header included) of a session of protocol `version`.
    pub fn parse_v(frame: &[u8], version: u8) -> Result<Frame, FrameError> {
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
            kind::SDATA => "SDATA",
            kind::ACK => "ACK",
            kind::REPORT => "REPORT",
            kind::HEARTBEAT => "HEARTBEAT",
            other => return Err(FrameError::UnknownKind(other)),
        };
        let mut c = Cursor { buf: body, kind: name };
        match k {
            kind::HELLO => {
                let version = c.u8()?;
                if version == 0 {
                    return Err(FrameError::BadVersion(0));
                }
                let heartbeat_ms = c.u32()?;
                let nonce = c.u64()?;
                let client_id = c.id("client id")?;
                let cred_len = c.u16()? as usize;
                let credential = Bytes::copy_from_slice(c.take(cred_len)?);
                let extensions = if version >= V2 { c.extensions()? } else { Vec::new() };
                c.finish(Frame::Hello(Hello { version, heartbeat_ms, nonce, client_id, credential, extensions }))
            }
            kind::WELCOME => {
                let version = c.u8()?;
                if version == 0 {
                    return Err(FrameError::BadVersion(0));
                }
                let heartbeat_ms = c.u32()?;
                let timeout_ms = c.u32()?;
                let epoch = c.u64()?;
                let server_id = c.str8("server id")?;
                let (max_frame, extensions) =
                    if version >= V2 { (Some(c.u32()?), c.extensions()?) } else { (None, Vec::new()) };
                c.finish(Frame::Welcome(Welcome {
                    version,
                    heartbeat_ms,
                    timeout_ms,
                    epoch,
                    server_id,
                    max_frame,
                    extensions,
                }))
            }
            kind::PING | kind::PONG => {
                let seq = c.u32()?;
                let ts_ms = c.u64()?;
                let f = if k == kind::PING { Frame::Ping { seq, ts_ms } } else { Frame::Pong { seq, ts_ms } };
                c.finish(f)
            }
            kind::DATA => {
                let peer = c.peer("data peer")?;
                let payload = Bytes::copy_from_slice(c.buf);
                Ok(Frame::Data { peer, payload })
            }
            kind::SDATA => {
                let seq = c.seq()?;
                let peer = c.peer("data peer")?;
                let payload = Bytes::copy_from_slice(c.buf);
                Ok(Frame::Sdata { seq, peer, payload })
            }
            kind::ACK => {
                let seq = c.u64()?;
                c.finish(Frame::Ack { seq })
            }
            kind::HEARTBEAT => {
                let interval_ms = c.u32()?;
                let timeout_ms = c.u32()?;
                c.finish(Frame::Heartbeat { interval_ms, timeout_ms })
            }
            kind::REPORT => {
                let seq = c.seq()?;
                let peer = c.peer("report peer")?;
                let outcome = match c.u8()? {
                    0 => None,
                    code => Some(Undeliverable::from_code(code)),
                };
                let seqs = c.seqs()?;
                c.finish(Frame::Report(Report { seq, peer, outcome, seqs }))
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
                    code => Some(reason(code, version)?),
                };
                let last_seen_ago_ms = c.u32()?;
                let flags = if version >= V2 { c.u8()? } else { 0 };
                c.finish(Frame::Presence(Presence { client_id, state, reason, last_seen_ago_ms, flags }))
            }
            kind::BYE => {
                let reason = reason(c.u8()?, version)?;
                let retry_after_ms = c.u32()?;
                let alternative = c.str8("alternative")?;
                c.finish(Frame::Bye(Bye { reason, retry_after_ms, alternative }))
            }
            kind::UNDELIVERABLE => {
                let to = c.id("undeliverable id")?;
                let why = if version >= V2 { Undeliverable::from_code(c.u8()?) } else { Undeliverable::Unspecified };
                c.finish(Frame::Undeliverable { to, why })
            }
            _ => unreachable!("kind was matched above"),
        }
    }

    /// Append this frame, header included, to `out`, in version 1.
    pub fn encode(&self, out: &mut BytesMut) {
        self.encode_v(out, V1)
    }

    /// Append this frame, header included, to `out`, for a session of protocol `version`. `HELLO` and `WELCOME`
    /// follow their own version field.
    ///
    /// Strings longer than their length field allows are a caller bug and are cut at a character boundary within
    /// the limit rather than corrupting the stream.
    pub fn encode_v(&self, out: &mut BytesMut, version: u8) {
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
                if h.version >= V2 {
                    put_extensions(out, &h.extensions);
                }
            }
            Frame::Welcome(w) => {
                out.put_u8(kind::WELCOME);
                out.put_u8(w.version);
                out.put_u32(w.heartbeat_ms);
                out.put_u32(w.timeout_ms);
                out.put_u64(w.epoch);
                put_str8(out, &w.server_id);
                if w.version >= V2 {
                    out.put_u32(w.max_frame.unwrap_or(DEFAULT_MAX_FRAME));
                    put_extensions(out, &w.extensions);
                }
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
                out.put_u8(p.reason.map_or(0, |r| reason_code(r, version)));
                out.put_u32(p.last_seen_ago_ms);
                if version >= V2 {
                    out.put_u8(p.flags);
                }
            }
            Frame::Bye(b) => {
                out.put_u8(kind::BYE);
                out.put_u8(reason_code(b.reason, version));
                out.put_u32(b.retry_after_ms);
                put_str8(out, &b.alternative);
            }
            Frame::Undeliverable { to, why } => {
                out.put_u8(kind::UNDELIVERABLE);
                put_str8(out, to);
                if version >= V2 {
                    out.put_u8(why.code());
                }
            }
            Frame::Sdata { seq, peer, payload } => {
                out.put_u8(kind::SDATA);
                out.put_u64(*seq);
                put_str8(out, peer);
                out.put_slice(payload);
            }
            Frame::Ack { seq } => {
                out.put_u8(kind::ACK);
                out.put_u64(*seq);
            }
            Frame::Heartbeat { interval_ms, timeout_ms } => {
                out.put_u8(kind::HEARTBEAT);
                out.put_u32(*interval_ms);
                out.put_u32(*timeout_ms);
            }
            Frame::Report(r) => {
                out.put_u8(kind::REPORT);
                out.put_u64(r.seq);
                put_str8(out, &r.peer);
                out.put_u8(r.outcome.map_or(0, report_code));
                let seqs = &r.seqs[..r.seqs.len().min(u16::MAX as usize)];
                out.put_u16(seqs.len() as u16);
                for s in seqs {
                    out.put_u64(*s);
                }
            }
        }
        let len = (out.len() - start - HEADER_LEN) as u32;
        out[start..start + HEADER_LEN].copy_from_slice(&len.to_be_bytes());
    }

    /// The encoded length in version 1, header included.
    pub fn encoded_len(&self) -> usize {
        self.encoded_len_v(V1)
    }

    /// The encoded length for a session of protocol `version`, header included.
    pub fn encoded_len_v(&self, version: u8) -> usize {
        let v2 = |v: u8| usize::from(v >= V2);
        let body = match self {
            Frame::Hello(h) => {
                1 + 4 + 8 + 1 + h.client_id.len() + 2 + h.credential.len() + v2(h.version) * ext_len(&h.extensions)
            }
            Frame::Welcome(w) => 1 + 4 + 4 + 8 + 1 + w.server_id.len() + v2(w.version) * (4 + ext_len(&w.extensions)),
            Frame::Ping { .. } | Frame::Pong { .. } => 4 + 8,
            Frame::Data { peer, payload } => 1 + peer.len() + payload.len(),
            Frame::Subscribe(ids) | Frame::Unsubscribe(ids) => 2 + ids.iter().map(|i| 1 + i.len()).sum::<usize>(),
            Frame::Presence(p) => 1 + p.client_id.len() + 1 + 1 + 4 + v2(version),
            Frame::Bye(b) => 1 + 4 + 1 + b.alternative.len(),
            Frame::Undeliverable { to, .. } => 1 + to.len() + v2(version),
            Frame::Sdata { peer, payload, .. } => 8 + 1 + peer.len() + payload.len(),
            Frame::Ack { .. } => 8,
            Frame::Heartbeat { .. } => 8,
            Frame::Report(r) => 8 + 1 + r.peer.len() + 1 + 2 + 8 * r.seqs.len().min(u16::MAX as usize),
        };
        HEADER_LEN + 1 + body
    }

    /// Encode into a fresh buffer, in version 1.
    pub fn to_bytes(&self) -> Bytes {
        self.to_bytes_v(V1)
    }

    /// Encode into a fresh buffer for a session of protocol `version`.
    pub fn to_bytes_v(&self, version: u8) -> Bytes {
        let mut out = BytesMut::with_capacity(self.encoded_len_v(version));
        self.encode_v(&mut out, version);
        out.freeze()
    }
}

/// The wire code of `reason` for a peer of `version`: a v1 peer treats a code it does not know as an error, so a
/// reason it cannot know (one a newer peer told us) is sent to it as `bye`, the peer having ended the connection,
/// and `node_lost` (defined after v1) as `unreachable`.
fn reason_code(reason: CloseReason, version: u8) -> u8 {
    match reason {
        // Code 0 names no reason, in every version (a cluster node that knows an id ended but not how).
        CloseReason::Unknown(0) => 0,
        CloseReason::Unknown(_) if version < V2 => CloseReason::Bye.code(),
        CloseReason::NodeLost if version < V2 => CloseReason::Unreachable.code(),
        r => r.code(),
    }
}

/// `REPORT.outcome` for an undeliverable outcome: never 0, which means delivered (a `why` of "not said" is sent
/// as 255, an unknown reason).
fn report_code(why: Undeliverable) -> u8 {
    match why.code() {
        0 => u8::MAX,
        c => c,
    }
}

/// Bytes of an extension block, its `u16` length included.
fn ext_len(list: &[Extension]) -> usize {
    2 + list.iter().map(|e| 4 + e.value.len()).sum::<usize>()
}

/// Write an extension block. Entries that would not fit its `u16` lengths are a caller bug and are left out
/// rather than corrupting the stream.
fn put_extensions(out: &mut BytesMut, list: &[Extension]) {
    let at = out.len();
    out.put_u16(0); // patched below
    let mut total = 0usize;
    for e in list.iter().filter(|e| e.value.len() <= u16::MAX as usize) {
        if total + 4 + e.value.len() > u16::MAX as usize {
            break;
        }
        total += 4 + e.value.len();
        out.put_u16(e.kind);
        out.put_u16(e.value.len() as u16);
        out.put_slice(&e.value);
    }
    out[at..at + 2].copy_from_slice(&(total as u16).to_be_bytes());
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
