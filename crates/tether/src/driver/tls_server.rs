//! The server's TLS session on rustls's unbuffered API: tether owns the buffers and releases each one when it
//! empties.
//!
//! rustls's buffered `ServerConnection` keeps a 4 KiB receive buffer for as long as the connection lives, even
//! when it is empty. [`TlsServer`] instead keeps three buffers of its own, each empty (no allocation) on an idle
//! connection:
//! - `incoming`: bytes received that rustls has not consumed yet, i.e. an incomplete record or handshake message.
//!   A read is processed in place, in the caller's read buffer, and only such a remainder is copied;
//! - `early`: the core's output taken before the handshake allows encrypting it (a refusal's `BYE`), as rustls's
//!   buffered connection would hold it; sealed as soon as the handshake completes;
//! - `outgoing`: records encoded and not yet written to the socket.
//!
//! What rustls has not consumed is bounded: it keeps every record of a handshake message until the message is
//! complete, so a peer could otherwise make `incoming` hold a 64 KiB message one byte per record; past
//! [`IN_LIMIT`] (the largest handshake message and one more record, as rustls's buffered connection allowed)
//! the connection fails with `tls_error`. What is taken from the core waits only while `outgoing` is under
//! [`OUT_LIMIT`]. The client keeps rustls's buffered connection: it holds one connection.

use std::io::{self, Write};
use std::mem;
use std::time::Instant as StdInstant;

use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{ConnectionState, EncodeError, EncryptError, InsufficientSizeError, UnbufferedStatus};
use socket2::SockRef;
use tether_proto::{CloseReason, Connection};
use tokio::io::Interest;

use super::{wrote, Sock, WRITE_BUDGET};

/// Records waiting to be written beyond which the core's output is left in the core (rustls's default buffer
/// limit for the buffered connection).
const OUT_LIMIT: usize = 64 * 1024;
/// Plaintext taken from the core per record sealed (the largest TLS record payload).
const RECORD: usize = 16 * 1024;
/// Bytes received and not yet consumed by rustls beyond which the peer is refused: the largest handshake message
/// (a 4-byte header and 0xffff bytes) plus the largest record (TLS 1.2's: 5 + 2^14 + 2,048).
const IN_LIMIT: usize = 4 + 0xffff + 5 + 16_384 + 2_048;

/// A server's TLS session with its own buffers (see the module doc).
pub(crate) struct TlsServer {
    tls: UnbufferedServerConnection,
    incoming: Vec<u8>,
    early: Vec<u8>,
    outgoing: Vec<u8>,
    /// rustls refused what the peer sent (the core is told once): nothing more is read.
    failed: bool,
}

/// What [`TlsServer::advance`] does once rustls lets application data be written.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Then {
    /// Nothing: only take what was received.
    Read,
    /// Seal the core's output (and `early`).
    Seal,
    /// Seal `early` (there is no core any more), then queue close_notify.
    CloseNotify,
}

impl TlsServer {
    pub(crate) fn new(tls: UnbufferedServerConnection) -> TlsServer {
        TlsServer { tls, incoming: Vec::new(), early: Vec::new(), outgoing: Vec::new(), failed: false }
    }

    pub(crate) fn is_handshaking(&self) -> bool {
        self.tls.is_handshaking()
    }

    /// Records are waiting for the socket.
    pub(crate) fn wants_write(&self) -> bool {
        !self.outgoing.is_empty()
    }

    /// Bytes read from the socket: their plaintext to the core (`None` after the core closed: dropped), the
    /// handshake's answers to `outgoing`. A TLS error fails the core with `tls_error`, and rustls's alert is put
    /// in `outgoing` for the best-effort write at close. `data` is used in place as rustls's input.
    /// Returns false once rustls refused what the peer sent.
    pub(crate) fn receive(&mut self, data: &mut [u8], mut conn: Option<&mut Connection>) -> bool {
        if self.failed || data.is_empty() {
            return !self.failed;
        }
        if self.incoming.is_empty() {
            let used = self.advance(data, conn.as_deref_mut(), Then::Read);
            if !self.failed {
                self.incoming.extend_from_slice(&data[used..]);
            }
        } else {
            self.incoming.extend_from_slice(data);
            self.advance_incoming(conn.as_deref_mut(), Then::Read);
        }
        if self.incoming.len() > IN_LIMIT && !self.failed {
            self.failed = true;
            self.incoming = Vec::new();
            if let Some(conn) = conn {
                let detail = format!("tls: more than {IN_LIMIT} bytes of records without a complete message");
                conn.fail(super::now(), CloseReason::TlsError, false, detail);
            }
        }
        !self.failed
    }

    /// Take the core's output: sealed into `outgoing` (as far as [`OUT_LIMIT`] allows) once the handshake lets it,
    /// kept in `early` before.
    fn take_output(&mut self, conn: &mut Connection, now: StdInstant) {
        if !self.failed {
            self.advance_incoming(Some(&mut *conn), Then::Seal);
        }
        if self.tls.is_handshaking() && !self.failed && !conn.is_closed() {
            while self.early.len() < OUT_LIMIT && !conn.poll_transmit().is_empty() {
                let n = conn.poll_transmit().len().min(OUT_LIMIT - self.early.len());
                self.early.extend_from_slice(&conn.poll_transmit()[..n]);
                conn.handle_written(now, n);
            }
        }
    }

    /// Queue close_notify (after anything `early` still holds) if the handshake is complete.
    pub(crate) fn send_close_notify(&mut self) {
        if !self.failed {
            self.advance_incoming(None, Then::CloseNotify);
        }
    }

    /// Seal what `early` holds if the handshake now allows it (a refusal's `BYE` once the client finished).
    pub(crate) fn seal_early(&mut self) {
        if !self.failed && !self.early.is_empty() {
            self.advance_incoming(None, Then::Read);
        }
    }

    /// Write the records in `outgoing` once (as much as the socket takes); released when all are written.
    pub(crate) fn write_tls<S: Sock>(&mut self, sock: &S, max: usize) -> io::Result<usize> {
        let len = self.outgoing.len().min(max);
        let n = sock.io(Interest::WRITABLE, || (&*SockRef::from(sock)).write(&self.outgoing[..len]))?;
        if n == self.outgoing.len() {
            self.outgoing = Vec::new();
        } else {
            self.outgoing.drain(..n);
        }
        Ok(n)
    }

    /// Move the core's bytes into TLS records and the records to the socket. Returns the bytes written to the
    /// socket, and whether the socket refused more (`WouldBlock`).
    pub(crate) fn flush<S: Sock>(&mut self, sock: &S, conn: &mut Connection, now: StdInstant) -> (usize, bool) {
        let mut budget = WRITE_BUDGET;
        let mut blocked = false;
        loop {
            if self.outgoing.len() < OUT_LIMIT {
                self.take_output(conn, now);
            }
            if self.outgoing.is_empty() || budget == 0 {
                break;
            }
            let r = self.write_tls(sock, budget);
            match wrote(r, sock, conn, now, &mut blocked) {
                Some(n) => budget -= n.min(budget),
                None => break,
            }
        }
        (WRITE_BUDGET - budget, blocked)
    }

    /// [`advance`](Self::advance) over `incoming`, keeping what rustls did not consume.
    fn advance_incoming(&mut self, conn: Option<&mut Connection>, then: Then) {
        let mut incoming = mem::take(&mut self.incoming);
        let used = self.advance(&mut incoming, conn, then);
        if used >= incoming.len() {
            incoming = Vec::new();
        } else {
            incoming.drain(..used);
        }
        self.incoming = incoming;
    }

    /// Let rustls process `input` until it needs more: application data to the core, handshake records to
    /// `outgoing`, and, once application data may be written, what `then` asks. Returns the bytes of `input`
    /// consumed; the rest (an incomplete record or handshake message) must be given again, first.
    fn advance(&mut self, input: &mut [u8], mut conn: Option<&mut Connection>, then: Then) -> usize {
        let mut used = 0;
        loop {
            let UnbufferedStatus { discard, state } = self.tls.process_tls_records(&mut input[used..]);
            let state = match state {
                Ok(state) => state,
                Err(e) => {
                    used += discard;
                    self.failed = true;
                    if let Some(conn) = conn {
                        let by_peer = matches!(e, rustls::Error::AlertReceived(_));
                        conn.fail(super::now(), CloseReason::TlsError, by_peer, crate::tls::server_failure_detail(&e));
                    }
                    // rustls queued its alert (unless the peer's alert ended the session): the next call returns
                    // the first record it queued before it looks at the input again. Only that one: once its
                    // queue is empty, a call would process the refused input once more (a second fatal alert,
                    // which rustls asserts never happens). A key update rustls owed would come first and take the
                    // alert's place; the alert is best effort, and the connection ends either way.
                    if let Ok(ConnectionState::EncodeTlsData(mut alert)) =
                        self.tls.process_tls_records(&mut input[used..]).state
                    {
                        let _ = encode(&mut self.outgoing, 0, |out| alert.encode(out).map_err(Sizing::Encode));
                    }
                    return used;
                }
            };
            let mut stop = false;
            match state {
                ConnectionState::ReadTraffic(mut traffic) => {
                    // rustls 0.23 decrypts in `process_tls_records`: a record here is never an error, and its
                    // `discard` is 0 (the bytes were counted in the status's).
                    while let Some(Ok(record)) = traffic.next_record() {
                        debug_assert_eq!(record.discard, 0);
                        if let Some(conn) = conn.as_deref_mut() {
                            conn.handle_bytes(super::now(), record.payload);
                        }
                    }
                }
                ConnectionState::EncodeTlsData(mut e) => {
                    if encode(&mut self.outgoing, 0, |out| e.encode(out).map_err(Sizing::Encode)).is_err() {
                        stop = true;
                    }
                }
                ConnectionState::TransmitTlsData(t) => t.done(),
                ConnectionState::PeerClosed => {
                    // close_notify: the end of the peer's data, as TCP's end of stream is.
                    if let Some(conn) = conn.as_deref_mut() {
                        conn.handle_eof(super::now());
                    }
                }
                ConnectionState::WriteTraffic(mut w) => {
                    if !self.early.is_empty() {
                        let early = mem::take(&mut self.early);
                        let mut sealed = 0;
                        for chunk in early.chunks(RECORD) {
                            if encode(&mut self.outgoing, chunk.len(), |out| {
                                w.encrypt(chunk, out).map_err(Sizing::Encrypt)
                            })
                            .is_err()
                            {
                                break;
                            }
                            sealed += chunk.len();
                        }
                        // What could not be sealed (the keys are exhausted) stays, as the core's own output does.
                        if sealed < early.len() {
                            self.early = early[sealed..].to_vec();
                        }
                    }
                    match (then, conn.as_deref_mut()) {
                        (Then::Seal, Some(conn)) => {
                            let now = super::now();
                            while self.outgoing.len() < OUT_LIMIT && !conn.poll_transmit().is_empty() {
                                let n = conn.poll_transmit().len().min(RECORD);
                                let chunk = &conn.poll_transmit()[..n];
                                if encode(&mut self.outgoing, chunk.len(), |out| {
                                    w.encrypt(chunk, out).map_err(Sizing::Encrypt)
                                })
                                .is_err()
                                {
                                    break;
                                }
                                conn.handle_written(now, n);
                            }
                        }
                        (Then::CloseNotify, _) => {
                            let _ =
                                encode(&mut self.outgoing, 0, |out| w.queue_close_notify(out).map_err(Sizing::Encrypt));
                        }
                        _ => {}
                    }
                    stop = true;
                }
                // BlockedHandshake (more input needed) and Closed. Early data never comes: the server's config
                // accepts no 0-RTT data (its `max_early_data_size` is left at 0), so rustls never enters `ReadEarlyData`.
                _ => stop = true,
            }
            used += discard;
            if stop {
                return used;
            }
        }
    }
}

/// Why an encoding call refused a buffer.
enum Sizing {
    Encode(EncodeError),
    Encrypt(EncryptError),
}

impl Sizing {
    fn needs(&self) -> Option<usize> {
        match self {
            Sizing::Encode(EncodeError::InsufficientSize(InsufficientSizeError { required_size }))
            | Sizing::Encrypt(EncryptError::InsufficientSize(InsufficientSizeError { required_size })) => {
                Some(*required_size)
            }
            _ => None,
        }
    }
}

/// Append what `f` encodes to `out`, growing it to the size rustls asks for. `payload`: the plaintext bytes
/// the record carries, if known, so that a record is sealed in one try.
fn encode(out: &mut Vec<u8>, payload: usize, mut f: impl FnMut(&mut [u8]) -> Result<usize, Sizing>) -> Result<(), ()> {
    let at = out.len();
    // Room for the payload and 64 bytes of header, content type, explicit nonce and tag (29 at most): a sealed
    // record, or a small message such as an alert or close_notify, fits the first try.
    out.resize(at + payload + 64, 0);
    let r = f(&mut out[at..]);
    let n = match r {
        Ok(n) => n,
        Err(e) => match e.needs() {
            Some(size) => {
                out.resize(at + size, 0);
                match f(&mut out[at..]) {
                    Ok(n) => n,
                    Err(_) => {
                        out.truncate(at);
                        return Err(());
                    }
                }
            }
            None => {
                out.truncate(at);
                return Err(());
            }
        },
    };
    out.truncate(at + n);
    Ok(())
}
