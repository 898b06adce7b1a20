//! What nodes tell each other over Redis pub/sub, byte by byte.
//!
//! A message is a run of fields, each `LEN:BYTES` (the length in ASCII decimal, a colon, then exactly that many
//! bytes; no separator after). The first field names the kind, the second is the sender's clock in Unix
//! milliseconds (Redis's own clock for what the Lua scripts publish), the rest depend on the kind. Numbers are
//! ASCII decimal. The Lua scripts in `store` build `online` and `lost` messages with the same rule, so a client id
//! may hold any byte. [`Msg::decode`] refuses anything malformed; nothing here can panic on input.

use bytes::Bytes;

/// One message between nodes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Msg {
    /// Presence channel: `client` is online on `node` in session `epoch` (published by the claim script).
    Online { client: String, node: String, epoch: u64 },
    /// Presence channel: the holder suspects `client` (silent for `silent_ms`).
    Suspect { client: String, epoch: u64, silent_ms: u32 },
    /// Presence channel: a suspected `client` was heard from again.
    Recovered { client: String, epoch: u64 },
    /// Presence channel: `client`'s session `epoch` ended (published by the release script).
    Offline { client: String, epoch: u64, reason: u8, by_client: bool, last_seen_ms: u32 },
    /// Presence channel: `node` was lost; these sessions of it were declared offline (`node_lost`).
    Lost { node: String, sessions: Vec<(String, u64)> },
    /// To one node: may a `HELLO` with `nonce` on node `from` have `client`? Answered with [`Msg::Answer`].
    Ask { req: u64, client: String, nonce: u64, from: String },
    /// To the asking node.
    Answer { req: u64, answer: AskAnswer },
    /// To one node: relay `payload` from `from` (connected to `origin`) to `to`.
    Data { from: String, to: String, origin: String, payload: Bytes },
    /// To a sender's node: `to` was online nowhere when its `DATA` from `from` arrived.
    Undeliverable { from: String, to: String },
    /// To one node: close `client` with `BYE(kicked)`.
    Kick { client: String, retry_after_ms: u32 },
    /// To one node: deliver `payload` from the server application to `client`.
    Send { client: String, payload: Bytes },
    /// To a node's own inbox: the proof that its pub/sub connection still delivers.
    Beat,
    /// To the node whose connection carries `client`'s reliable session: its stream has new items (published by
    /// the scripts that add them).
    Wake { client: String },
    /// To a node's own inbox, from a script, in order with every ownership change: each live member's node, whether
    /// it is synced, and its node's digest (published by the checkpoint script).
    Checkpoint { nodes: Vec<CheckpointNode> },
}

/// One live member in a [`Msg::Checkpoint`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointNode {
    pub node: String,
    /// Every session it holds is registered under its current incarnation.
    pub synced: bool,
    /// The XOR of `digest_of` over the ids Redis says the node holds.
    pub digest: u32,
    /// How long ago it last renewed its lease (lease clock): when it was last known alive.
    pub renewed_ago_ms: u64,
}

/// A reason code as nodes exchange it (an `offline`, a tombstone): 0 names none (`eof`); one this version does
/// not know is kept as such (v2 watchers get it, v1 ones `bye`).
pub fn reason_of(code: u8) -> tether_proto::CloseReason {
    use tether_proto::CloseReason;
    match code {
        0 => CloseReason::Eof,
        r => CloseReason::try_from(r).unwrap_or(CloseReason::Unknown(r)),
    }
}

/// The holding node's answer to [`Msg::Ask`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AskAnswer {
    /// No session here any more: claim it.
    NotHere,
    /// Two live devices: the newcomer backs off this long.
    Conflict { retry_after_ms: u32 },
    /// Claim it; the holder is closed. The displaced nonces (nonce, age in ms) go with the id.
    Granted { displaced: Vec<(u64, u32)> },
}

/// A message with the sender's clock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stamped {
    pub sent_ms: u64,
    pub msg: Msg,
}

struct Out(Vec<u8>);

impl Out {
    fn field(&mut self, b: &[u8]) -> &mut Out {
        self.0.extend_from_slice(b.len().to_string().as_bytes());
        self.0.push(b':');
        self.0.extend_from_slice(b);
        self
    }
    fn str(&mut self, s: &str) -> &mut Out {
        self.field(s.as_bytes())
    }
    fn num(&mut self, n: u64) -> &mut Out {
        self.field(n.to_string().as_bytes())
    }
}

struct In<'a>(&'a [u8]);

impl<'a> In<'a> {
    fn field(&mut self) -> Option<&'a [u8]> {
        let colon = self.0.iter().take(11).position(|b| *b == b':')?;
        let len: usize = std::str::from_utf8(&self.0[..colon]).ok()?.parse().ok()?;
        let rest = &self.0[colon + 1..];
        let (field, rest) = (rest.get(..len)?, rest.get(len..)?);
        self.0 = rest;
        Some(field)
    }
    fn str(&mut self) -> Option<String> {
        String::from_utf8(self.field()?.to_vec()).ok()
    }
    fn num<T: std::str::FromStr>(&mut self) -> Option<T> {
        std::str::from_utf8(self.field()?).ok()?.parse().ok()
    }
    fn flag(&mut self) -> Option<bool> {
        match self.field()? {
            b"0" => Some(false),
            b"1" => Some(true),
            _ => None,
        }
    }
}

impl Msg {
    /// The message, stamped with `sent_ms`.
    pub fn encode(&self, sent_ms: u64) -> Vec<u8> {
        let mut o = Out(Vec::with_capacity(64));
        let kind = match self {
            Msg::Online { .. } => "on",
            Msg::Suspect { .. } => "su",
            Msg::Recovered { .. } => "re",
            Msg::Offline { .. } => "of",
            Msg::Lost { .. } => "lo",
            Msg::Ask { .. } => "as",
            Msg::Answer { .. } => "an",
            Msg::Data { .. } => "da",
            Msg::Undeliverable { .. } => "un",
            Msg::Kick { .. } => "ki",
            Msg::Send { .. } => "se",
            Msg::Beat => "be",
            Msg::Wake { .. } => "rw",
            Msg::Checkpoint { .. } => "ck",
        };
        o.str(kind).num(sent_ms);
        match self {
            Msg::Online { client, node, epoch } => {
                o.str(client).str(node).num(*epoch);
            }
            Msg::Suspect { client, epoch, silent_ms } => {
                o.str(client).num(*epoch).num((*silent_ms).into());
            }
            Msg::Recovered { client, epoch } => {
                o.str(client).num(*epoch);
            }
            Msg::Offline { client, epoch, reason, by_client, last_seen_ms } => {
                o.str(client).num(*epoch).num((*reason).into()).num((*by_client).into()).num((*last_seen_ms).into());
            }
            Msg::Lost { node, sessions } => {
                o.str(node);
                for (client, epoch) in sessions {
                    o.str(client).num(*epoch);
                }
            }
            Msg::Ask { req, client, nonce, from } => {
                o.num(*req).str(client).num(*nonce).str(from);
            }
            Msg::Answer { req, answer } => {
                o.num(*req);
                match answer {
                    AskAnswer::NotHere => {
                        o.str("n");
                    }
                    AskAnswer::Conflict { retry_after_ms } => {
                        o.str("c").num((*retry_after_ms).into());
                    }
                    AskAnswer::Granted { displaced } => {
                        o.str("g");
                        for (nonce, age) in displaced {
                            o.num(*nonce).num((*age).into());
                        }
                    }
                }
            }
            Msg::Data { from, to, origin, payload } => {
                o.str(from).str(to).str(origin).field(payload);
            }
            Msg::Undeliverable { from, to } => {
                o.str(from).str(to);
            }
            Msg::Kick { client, retry_after_ms } => {
                o.str(client).num((*retry_after_ms).into());
            }
            Msg::Send { client, payload } => {
                o.str(client).field(payload);
            }
            Msg::Beat => {}
            Msg::Wake { client } => {
                o.str(client);
            }
            Msg::Checkpoint { nodes } => {
                for n in nodes {
                    // As Lua writes it: a signed 32-bit decimal.
                    o.str(&n.node).num(n.synced.into()).field((n.digest as i32).to_string().as_bytes());
                    o.num(n.renewed_ago_ms);
                }
            }
        }
        o.0
    }

    /// A message as received; `None` for anything that is not one, whole.
    pub fn decode(b: &[u8]) -> Option<Stamped> {
        let mut i = In(b);
        let kind = i.field()?;
        let sent_ms = i.num()?;
        let msg = match kind {
            b"on" => Msg::Online { client: i.str()?, node: i.str()?, epoch: i.num()? },
            b"su" => Msg::Suspect { client: i.str()?, epoch: i.num()?, silent_ms: i.num()? },
            b"re" => Msg::Recovered { client: i.str()?, epoch: i.num()? },
            b"of" => Msg::Offline {
                client: i.str()?,
                epoch: i.num()?,
                reason: i.num()?,
                by_client: i.flag()?,
                last_seen_ms: i.num()?,
            },
            b"lo" => {
                let node = i.str()?;
                let mut sessions = Vec::new();
                while !i.0.is_empty() {
                    sessions.push((i.str()?, i.num()?));
                }
                Msg::Lost { node, sessions }
            }
            b"as" => Msg::Ask { req: i.num()?, client: i.str()?, nonce: i.num()?, from: i.str()? },
            b"an" => {
                let req = i.num()?;
                let answer = match i.field()? {
                    b"n" => AskAnswer::NotHere,
                    b"c" => AskAnswer::Conflict { retry_after_ms: i.num()? },
                    b"g" => {
                        let mut displaced = Vec::new();
                        while !i.0.is_empty() {
                            displaced.push((i.num()?, i.num()?));
                        }
                        AskAnswer::Granted { displaced }
                    }
                    _ => return None,
                };
                Msg::Answer { req, answer }
            }
            b"da" => Msg::Data {
                from: i.str()?,
                to: i.str()?,
                origin: i.str()?,
                payload: Bytes::copy_from_slice(i.field()?),
            },
            b"un" => Msg::Undeliverable { from: i.str()?, to: i.str()? },
            b"ki" => Msg::Kick { client: i.str()?, retry_after_ms: i.num()? },
            b"se" => Msg::Send { client: i.str()?, payload: Bytes::copy_from_slice(i.field()?) },
            b"be" => Msg::Beat,
            b"rw" => Msg::Wake { client: i.str()? },
            b"ck" => {
                let mut nodes = Vec::new();
                while !i.0.is_empty() {
                    let (node, synced) = (i.str()?, i.flag()?);
                    // Lua's bit library works in signed 32 bits.
                    let digest = i.num::<i64>()? as u32;
                    nodes.push(CheckpointNode { node, synced, digest, renewed_ago_ms: i.num()? });
                }
                Msg::Checkpoint { nodes }
            }
            _ => return None,
        };
        i.0.is_empty().then_some(Stamped { sent_ms, msg })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all() -> Vec<Msg> {
        vec![
            Msg::Online { client: "a:b\n".into(), node: "n1".into(), epoch: 7 },
            Msg::Suspect { client: "a".into(), epoch: 7, silent_ms: 3000 },
            Msg::Recovered { client: "a".into(), epoch: 7 },
            Msg::Wake { client: "a:b\n".into() },
            Msg::Offline { client: "a".into(), epoch: 7, reason: 4, by_client: true, last_seen_ms: 15000 },
            Msg::Lost { node: "n2".into(), sessions: vec![("x".into(), 1), ("y".into(), 2)] },
            Msg::Lost { node: "n2".into(), sessions: vec![] },
            Msg::Ask { req: 9, client: "a".into(), nonce: u64::MAX, from: "n1".into() },
            Msg::Answer { req: 9, answer: AskAnswer::NotHere },
            Msg::Answer { req: 9, answer: AskAnswer::Conflict { retry_after_ms: 30000 } },
            Msg::Answer { req: 9, answer: AskAnswer::Granted { displaced: vec![(1, 20), (2, 0)] } },
            Msg::Data { from: "a".into(), to: "b".into(), origin: "n1".into(), payload: Bytes::from_static(b"\0\xff") },
            Msg::Undeliverable { from: "a".into(), to: "b".into() },
            Msg::Kick { client: "a".into(), retry_after_ms: 0 },
            Msg::Send { client: "a".into(), payload: Bytes::new() },
            Msg::Beat,
            Msg::Checkpoint {
                nodes: vec![
                    CheckpointNode { node: "n1".into(), synced: true, digest: 0xdead_beef, renewed_ago_ms: 250 },
                    CheckpointNode { node: "n#2".into(), synced: false, digest: 0, renewed_ago_ms: 0 },
                ],
            },
            Msg::Checkpoint { nodes: vec![] },
        ]
    }

    #[test]
    fn every_message_round_trips() {
        for m in all() {
            let b = m.encode(1_764_000_000_123);
            assert_eq!(Msg::decode(&b), Some(Stamped { sent_ms: 1_764_000_000_123, msg: m.clone() }), "{m:?}");
        }
    }

    #[test]
    fn what_the_lua_scripts_build_decodes() {
        // tok(s) = #s .. ':' .. s, as in store.rs.
        let b = b"2:on13:17640000001235:dev-12:n11:5";
        let m = Msg::decode(b).unwrap();
        assert_eq!(m.msg, Msg::Online { client: "dev-1".into(), node: "n1".into(), epoch: 5 });
    }

    #[test]
    fn malformed_input_is_refused_never_a_panic() {
        for m in all() {
            let b = m.encode(1);
            for cut in 0..b.len() {
                // Every strict prefix is incomplete (a Lost or a Granted cut between whole fields is a shorter
                // valid message of its kind; those may decode, but never to the original).
                assert_ne!(Msg::decode(&b[..cut]).map(|s| s.msg), Some(m.clone()));
            }
        }
        for junk in [&b""[..], b"xx", b"2:zz1:1", b"99999999999:x", b"2:on1:x", b"2:su1:11:a1:11:x"] {
            assert_eq!(Msg::decode(junk), None, "{junk:?}");
        }
        let mut trailing = Msg::Kick { client: "a".into(), retry_after_ms: 0 }.encode(1);
        trailing.extend_from_slice(b"1:x");
        assert_eq!(Msg::decode(&trailing), None);
    }
}
