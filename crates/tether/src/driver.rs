//! The IO pump that carries out one [`Connection`]'s decisions on a tokio `TcpStream`.
//!
//! # Layout
//! [`drive`] is the whole life of a connection after the TCP handshake: it feeds the core the bytes, end of
//! stream, errors and timer expiries, writes what the core queued, shuts down the write half when asked, and hands
//! every core event to the role's [`Hooks`] (server or client), which also supply commands from the rest of the
//! program. One `Sleep` per connection is reset to the core's single deadline; nothing scans connections.
//!
//! Reads go through a stack buffer that lives only between awaits, so an idle connection holds no read buffer:
//! the core keeps bytes only for an incomplete frame. `SO_ERROR` is never read before a read: the read itself
//! reports ETIMEDOUT, and the kernel's count of unacknowledged bytes (TIOCOUTQ) is asked only then, to tell a
//! user timeout from a keepalive timeout. `TCP_INFO` is read only when the core asks for the kernel's queue
//! (`Connection::kernel_check_due`), on a wakeup that happened anyway.
//!
//! # TLS
//! With TLS the same loop drives a rustls connection between the socket and the core (rustls is sans-IO too): raw
//! bytes read from the socket go into rustls, its plaintext into the core; the core's output goes into rustls,
//! and rustls's records to the socket. Readiness, deadlines, socket options and error classification stay those
//! of the TCP socket, so every reason behaves the same over TLS. The TLS handshake runs under the core's
//! handshake timeout. A TLS failure (untrusted certificate, a plaintext peer, a corrupt record) ends the
//! connection with `tls_error` after a best-effort write of rustls's alert.

use std::future::Future;
use std::io;
use std::os::fd::AsRawFd;
use std::task::{Context, Poll};
use std::time::{Duration, Instant as StdInstant};

use rustls::Connection as TlsConn;
use socket2::SockRef;
use tether_proto::{CloseReason, Connection, Event};
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::sockopt;

/// Bytes read per readiness wakeup.
const READ_CHUNK: usize = 16 * 1024;
/// Bytes written per wakeup before letting other branches run (fairness for a peer that reads fast).
const WRITE_BUDGET: usize = 256 * 1024;
/// How long a closed TLS connection may take to finish writing what rustls still holds.
const TLS_FINISH_GRACE: Duration = Duration::from_secs(2);
/// Commands taken from the hooks per wakeup before the connection's output is flushed.
const CMD_BATCH: usize = 64;
/// At close, unread bytes up to this are drained so that close() sends FIN, not RST, and our `BYE` survives.
const CLOSE_DRAIN: usize = 64 * 1024;

/// The clock the core sees: tokio's, so `start_paused` tests drive the core too.
pub(crate) fn now() -> StdInstant {
    Instant::now().into_std()
}

/// What ended a wait.
enum Wake<C> {
    Read,
    Write,
    Timer,
    Cmd(Option<C>),
}

/// [`now`] under another name, for the loop in [`drive`], where a local `now` (the loop's start) shadows it.
fn now_std() -> StdInstant {
    now()
}

/// What the role (server or client) does with core events and where its commands come from.
pub(crate) trait Hooks {
    type Cmd;
    /// Handle one core event; may call back into the connection (accept, reject, send).
    fn on_event(&mut self, conn: &mut Connection, now: StdInstant, event: Event);
    /// Apply a command from the rest of the program.
    fn on_cmd(&mut self, conn: &mut Connection, now: StdInstant, cmd: Self::Cmd);
    /// The next command if one is ready (registering `cx` otherwise); `Ready(None)` when the command source is
    /// gone (the connection keeps running on its own). A poll function rather than a future, so a waiting
    /// connection stores no per-wait future.
    fn poll_cmd(&mut self, cx: &mut Context<'_>) -> Poll<Option<Self::Cmd>>;
    /// Called after each read with the instant of the last frame, for liveness bookkeeping outside the task.
    fn on_progress(&mut self, _conn: &Connection) {}
    /// Called after bytes moved: `read` from the socket, `written` to it (TLS records included), for metrics.
    fn on_io(&mut self, _conn: &Connection, _read: usize, _written: usize) {}
    /// Called after each flush to the socket: the role may queue more output now that some drained.
    fn after_flush(&mut self, _conn: &mut Connection, _now: StdInstant) {}
    /// The socket options whose per-connection part follows the negotiated heartbeat
    /// ([`sockopt::SocketOptions::for_heartbeat`]); `None` leaves the socket as it is.
    fn socket_options(&self) -> Option<&sockopt::SocketOptions> {
        None
    }
}

/// Run the connection until the core says it is closed, then close the socket. `tls`: the rustls connection
/// to run between socket and core, or `None` for plain TCP.
pub(crate) async fn drive<H: Hooks>(
    stream: TcpStream,
    mut tls: Option<Box<TlsConn>>,
    conn: &mut Connection,
    hooks: &mut H,
) {
    let sleep = tokio::time::sleep_until(Instant::now() + Duration::from_secs(86_400));
    tokio::pin!(sleep);
    let mut armed: Option<StdInstant> = None;
    let mut cmds_open = true;
    let mut close_notify_sent = false;
    // The heartbeat interval (ms) the socket's options were last set for; 0 until one is negotiated.
    let mut options_for_ms: u32 = 0;
    loop {
        let now = now();
        while let Some(ev) = conn.poll_event() {
            hooks.on_event(conn, now, ev);
        }
        if let Some((interval, _)) = conn.heartbeat() {
            let ms = u32::try_from(interval.as_millis()).unwrap_or(u32::MAX);
            if ms != options_for_ms {
                let previous = (options_for_ms != 0).then(|| Duration::from_millis(options_for_ms.into()));
                options_for_ms = ms;
                if let Some(options) = hooks.socket_options() {
                    options.for_heartbeat(&stream, interval, previous);
                }
            }
        }
        {
            let written = match tls.as_deref_mut() {
                None => flush(&stream, conn, now),
                Some(tls) => flush_tls(&stream, tls, conn, now),
            };
            hooks.on_io(conn, 0, written);
            hooks.after_flush(conn, now);
        }
        if conn.kernel_check_due(now) {
            conn.handle_kernel_queue(now, sockopt::kernel_queue(stream.as_raw_fd()));
        }
        if conn.poll_shutdown_write() {
            // Over TLS the write half ends with close_notify, and the socket is shut only once rustls has written
            // every record.
            let tls_pending = match tls.as_deref_mut() {
                Some(tls) if !close_notify_sent => {
                    close_notify_sent = true;
                    tls.send_close_notify();
                    flush_tls(&stream, tls, conn, now);
                    tls.wants_write()
                }
                Some(tls) => tls.wants_write(),
                None => false,
            };
            if !tls_pending {
                let _ = SockRef::from(&stream).shutdown(std::net::Shutdown::Write);
                conn.handle_write_shutdown();
            }
        }
        if let Some(ev) = conn.poll_event() {
            hooks.on_event(conn, now, ev);
            continue;
        }
        if conn.is_closed() {
            break;
        }
        let deadline = conn.poll_timeout();
        if deadline != armed {
            armed = deadline;
            let at = deadline.map_or(Instant::now() + Duration::from_secs(86_400), Instant::from_std);
            sleep.as_mut().reset(at);
        }
        let want_read = conn.wants_read();
        // Over TLS, rustls takes the core's bytes as long as it has room, so what waits for the socket is its own.
        let want_write = match tls.as_deref() {
            None => conn.pending_tx() > 0,
            Some(tls) => tls.wants_write(),
        };
        // One wait over every source, polled in priority order. `poll_fn` keeps no state of its own: readiness
        // registers with the IO driver, the timer is the pinned `Sleep`, commands register with the hooks.
        let wake = std::future::poll_fn(|cx| {
            if want_read && stream.poll_read_ready(cx).is_ready() {
                return Poll::Ready(Wake::Read);
            }
            if want_write && stream.poll_write_ready(cx).is_ready() {
                return Poll::Ready(Wake::Write);
            }
            if sleep.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Wake::Timer);
            }
            if cmds_open {
                if let Poll::Ready(c) = hooks.poll_cmd(cx) {
                    return Poll::Ready(Wake::Cmd(c));
                }
            }
            Poll::Pending
        })
        .await;
        match wake {
            Wake::Read => {
                let n = read(&stream, tls.as_deref_mut(), conn);
                hooks.on_progress(conn);
                hooks.on_io(conn, n, 0);
            }
            Wake::Write => {}
            Wake::Timer => {
                armed = None;
                // A timer can fire late (a stalled process, a busy runtime): frames already waiting in the
                // kernel arrived before the verdict would be taken, so they are read first and count as life.
                if want_read {
                    let n = read_pending(&stream, tls.as_deref_mut(), conn);
                    hooks.on_progress(conn);
                    hooks.on_io(conn, n, 0);
                }
                conn.handle_timeout(now_std());
            }
            Wake::Cmd(Some(cmd)) => {
                let now = now_std();
                hooks.on_cmd(conn, now, cmd);
                // Commands already waiting (a burst of relayed frames) are taken before the next flush, so that
                // one write carries them all instead of one write each. Polled without waiting, with a waker
                // that does nothing: the next wait polls the commands again with the task's own waker before it
                // sleeps, so no wake-up is lost (and the connection's future stays the size it was).
                let mut idle = Context::from_waker(std::task::Waker::noop());
                for _ in 1..CMD_BATCH {
                    if conn.is_closed() {
                        break;
                    }
                    match hooks.poll_cmd(&mut idle) {
                        Poll::Ready(Some(cmd)) => hooks.on_cmd(conn, now, cmd),
                        Poll::Ready(None) => {
                            cmds_open = false;
                            break;
                        }
                        Poll::Pending => break,
                    }
                }
            }
            Wake::Cmd(None) => cmds_open = false,
        }
    }
    if let Some(tls) = tls.as_deref_mut() {
        sleep.as_mut().reset(Instant::now() + TLS_FINISH_GRACE);
        // Boxed: its state would otherwise enlarge every connection's task, TLS or not.
        Box::pin(finish_tls(&stream, tls, conn.close_reason(), close_notify_sent, sleep.as_mut())).await;
    }
    close_quietly(&stream);
}

/// After the core has closed a TLS connection, rustls may still hold records the core counts as written (a
/// `BYE` behind a full socket buffer, or a refusal's `BYE` waiting for the handshake to complete). Finish them,
/// bounded by `deadline` ([`TLS_FINISH_GRACE`]), unless the transport is already broken; then end with
/// close_notify. After a TLS error, only rustls's queued alert is written, best effort.
async fn finish_tls(
    stream: &TcpStream,
    tls: &mut TlsConn,
    reason: Option<CloseReason>,
    close_notify_sent: bool,
    mut deadline: std::pin::Pin<&mut tokio::time::Sleep>,
) {
    use std::io::Read;
    use CloseReason::*;
    let sock = SockRef::from(stream);
    let broken = matches!(
        reason,
        None | Some(TlsError | HandshakeTimeout | Reset | WriteTimeout | KeepaliveTimeout | Unreachable)
    );
    if broken {
        while tls.wants_write() && tls.write_tls(&mut &*sock).is_ok_and(|n| n > 0) {}
        return;
    }
    let mut notify_sent = close_notify_sent;
    loop {
        if !tls.is_handshaking() && !notify_sent {
            notify_sent = true;
            tls.send_close_notify();
        }
        while tls.wants_write() {
            match stream.try_io(Interest::WRITABLE, || tls.write_tls(&mut &*sock)) {
                Ok(n) if n > 0 => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                _ => return,
            }
        }
        let handshaking = tls.is_handshaking();
        if !handshaking && !tls.wants_write() {
            return;
        }
        let ready = std::future::poll_fn(|cx| {
            if handshaking && stream.poll_read_ready(cx).is_ready() {
                return Poll::Ready(true);
            }
            if tls.wants_write() && stream.poll_write_ready(cx).is_ready() {
                return Poll::Ready(true);
            }
            deadline.as_mut().poll(cx).map(|_| false)
        })
        .await;
        if !ready {
            return;
        }
        if handshaking {
            // Only the handshake matters now: records are processed, application data is dropped.
            let mut buf = [0u8; READ_CHUNK];
            let r = stream.try_io(Interest::READABLE, || (&*sock).read(&mut buf));
            match r {
                Ok(0) => return,
                Ok(n) => {
                    let mut data = &buf[..n];
                    while !data.is_empty() {
                        if tls.read_tls(&mut data).is_err() || tls.process_new_packets().is_err() {
                            return;
                        }
                        let mut sink = [0u8; 4096];
                        while tls.reader().read(&mut sink).is_ok_and(|n| n > 0) {}
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => return,
            }
        }
    }
}

/// Hand bytes read from the socket to the core, through rustls when the connection uses TLS.
fn deliver(tls: Option<&mut TlsConn>, conn: &mut Connection, data: &[u8]) {
    match tls {
        None => conn.handle_bytes(now(), data),
        Some(tls) => deliver_tls(tls, conn, data),
    }
}

/// The socket reached end of stream.
fn deliver_eof(tls: Option<&mut TlsConn>, conn: &mut Connection) {
    match tls {
        None => conn.handle_eof(now()),
        Some(tls) => {
            // A zero-byte read_tls records the end of stream; plaintext decrypted before it is still delivered.
            let _ = tls.read_tls(&mut io::empty());
            if process_tls(tls, conn) {
                drain_plaintext(tls, conn);
            }
            conn.handle_eof(now());
        }
    }
}

fn deliver_tls(tls: &mut TlsConn, conn: &mut Connection, mut data: &[u8]) {
    while !data.is_empty() && !conn.is_closed() {
        if let Err(e) = tls.read_tls(&mut data) {
            return conn.fail(now(), CloseReason::TlsError, false, format!("tls: {e}"));
        }
        if !process_tls(tls, conn) {
            return;
        }
        drain_plaintext(tls, conn);
    }
}

/// Let rustls decrypt what it holds; false (and the connection failed) on a TLS error.
fn process_tls(tls: &mut TlsConn, conn: &mut Connection) -> bool {
    match tls.process_new_packets() {
        Ok(_) => true,
        Err(e) => {
            let by_peer = matches!(e, rustls::Error::AlertReceived(_));
            conn.fail(now(), CloseReason::TlsError, by_peer, crate::tls::failure_detail(tls, &e));
            false
        }
    }
}

fn drain_plaintext(tls: &mut TlsConn, conn: &mut Connection) {
    use std::io::Read;
    let mut buf = [0u8; READ_CHUNK];
    while conn.wants_read() {
        match tls.reader().read(&mut buf) {
            Ok(0) => return conn.handle_eof(now()),
            Ok(n) => conn.handle_bytes(now(), &buf[..n]),
            // WouldBlock: nothing more decrypted yet. UnexpectedEof (TCP closed without close_notify) is left to
            // the end-of-stream path, where it is an ordinary `eof`: frames carry their own boundaries.
            Err(_) => return,
        }
    }
}

/// Returns the bytes read.
fn read(stream: &TcpStream, tls: Option<&mut TlsConn>, conn: &mut Connection) -> usize {
    let mut buf = [0u8; READ_CHUNK];
    let mut got = 0;
    // A read shorter than the buffer shows the socket drained (epoll reports new data as a new edge), so it is
    // reported to tokio as WouldBlock: tokio then clears the readiness, and the next wait does not cost a
    // second, empty read syscall. tokio's own `poll_read` does the same; `try_read` does not.
    let r = stream.try_io(Interest::READABLE, || {
        use std::io::Read;
        let n = (&*SockRef::from(stream)).read(&mut buf)?;
        got = n;
        if n > 0 && n < buf.len() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    });
    match r {
        Ok(0) => deliver_eof(tls, conn),
        Ok(n) => deliver(tls, conn, &buf[..n]),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
            if got > 0 {
                deliver(tls, conn, &buf[..got]);
            }
        }
        Err(e) => {
            let unacked = sockopt::unacked_bytes(stream.as_raw_fd()).is_some_and(|n| n > 0);
            conn.handle_error(now(), &e, unacked);
        }
    }
    got
}

/// Read everything already waiting in the kernel (bounded), without waiting for readiness. This reads the
/// socket directly: tokio's `try_read` trusts its cached readiness, which lags behind the kernel exactly when a
/// timer fires late (the IO driver has not seen the epoll event yet). The socket is non-blocking either way.
/// Returns the bytes read.
fn read_pending(stream: &TcpStream, mut tls: Option<&mut TlsConn>, conn: &mut Connection) -> usize {
    use std::io::Read;
    let sock = SockRef::from(stream);
    let mut total = 0;
    for _ in 0..16 {
        let before = (conn.pending_rx(), conn.last_rx(), conn.is_closed());
        let mut buf = [0u8; READ_CHUNK];
        match (&*sock).read(&mut buf) {
            Ok(0) => {
                deliver_eof(tls, conn);
                return total;
            }
            Ok(n) => {
                total += n;
                deliver(tls.as_deref_mut(), conn, &buf[..n])
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return total,
            Err(e) => {
                let unacked = sockopt::unacked_bytes(stream.as_raw_fd()).is_some_and(|n| n > 0);
                conn.handle_error(now(), &e, unacked);
                return total;
            }
        }
        // Over TLS a read may complete no frame (handshake records, a partial record) yet be progress.
        if !conn.wants_read() || (tls.is_none() && before == (conn.pending_rx(), conn.last_rx(), conn.is_closed())) {
            return total;
        }
    }
    total
}

/// Returns the bytes written.
fn flush(stream: &TcpStream, conn: &mut Connection, now: StdInstant) -> usize {
    let mut budget = WRITE_BUDGET;
    while budget > 0 && !conn.poll_transmit().is_empty() {
        let chunk = &conn.poll_transmit()[..conn.poll_transmit().len().min(budget)];
        match stream.try_write(chunk) {
            Ok(n) => {
                budget -= n.min(budget);
                conn.handle_written(now, n);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => {
                let unacked = sockopt::unacked_bytes(stream.as_raw_fd()).is_some_and(|n| n > 0);
                conn.handle_error(now, &e, unacked);
                break;
            }
        }
    }
    WRITE_BUDGET - budget
}

/// Move the core's bytes into rustls (as far as its buffer limit allows) and rustls's records to the socket.
/// Returns the bytes written to the socket.
fn flush_tls(stream: &TcpStream, tls: &mut TlsConn, conn: &mut Connection, now: StdInstant) -> usize {
    use std::io::Write;
    let mut budget = WRITE_BUDGET;
    loop {
        while !conn.poll_transmit().is_empty() {
            match tls.writer().write(conn.poll_transmit()) {
                Ok(n) if n > 0 => conn.handle_written(now, n),
                _ => break,
            }
        }
        if !tls.wants_write() || budget == 0 {
            break;
        }
        let r = stream.try_io(Interest::WRITABLE, || tls.write_tls(&mut &*SockRef::from(stream)));
        match r {
            Ok(0) => break,
            Ok(n) => budget -= n.min(budget),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => {
                let unacked = sockopt::unacked_bytes(stream.as_raw_fd()).is_some_and(|n| n > 0);
                conn.handle_error(now, &e, unacked);
                break;
            }
        }
    }
    WRITE_BUDGET - budget
}

/// Drain what the peer already sent (bounded) so that dropping the socket sends FIN rather than RST: a RST can
/// destroy our `BYE` in the peer's receive queue before it is read.
fn close_quietly(stream: &TcpStream) {
    let mut buf = [0u8; 4096];
    let mut drained = 0;
    while drained < CLOSE_DRAIN {
        match stream.try_read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => drained += n,
        }
    }
}
