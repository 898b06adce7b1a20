//! The IO pump that carries out one [`Connection`]'s decisions on a socket, for either driver: the server's
//! event loops ([`crate::evloop`]) and the client's task ([`drive`]).
//!
//! # Layout
//! - [`Pump`]: what a connection's IO needs besides the core: the rustls connection under TLS, and what the
//!   pump already did (socket options set for which heartbeat, close_notify sent, commands still open). Its
//!   steps are the whole contract with a driver: [`Pump::turn`] carries out what the core decided (events to the
//!   role's [`Hooks`], output to the socket, the write half shut, the kernel's queue read when due) and says
//!   what to wait for next ([`Next`]); [`Pump::on_readable`], [`Pump::on_timer`] and [`Pump::on_cmds`] feed
//!   the core what the wait brought; [`Pump::finish_now`] ends a closed connection's TLS and drains the socket.
//! - [`Sock`]: the socket under a pump (tokio's `TcpStream` for the client, mio's for the event loops): the
//!   syscalls are the same, only how a `WouldBlock` clears readiness differs.
//! - [`drive`]: the client's driver, one connection on its own task, one `Sleep` reset to the core's deadline.
//!
//! Reads go through a stack buffer (or the event loop's one buffer) that lives only for the read, so an idle
//! connection holds no read buffer: the core keeps bytes only for an incomplete frame. `SO_ERROR` is never read
//! before a read: the read itself reports ETIMEDOUT, and the kernel's count of unacknowledged bytes (TIOCOUTQ)
//! is asked only then, to tell a user timeout from a keepalive timeout. `TCP_INFO` is read only when the core
//! asks for the kernel's queue (`Connection::kernel_check_due`), on a wakeup that happened anyway.
//!
//! # TLS
//! With TLS the same steps drive a rustls connection between the socket and the core (rustls is sans-IO too): raw
//! bytes read from the socket go into rustls, its plaintext into the core; the core's output goes into rustls,
//! and rustls's records to the socket. Readiness, deadlines, socket options and error classification stay those
//! of the TCP socket, so every reason behaves the same over TLS. The TLS handshake runs under the core's
//! handshake timeout. A TLS failure (untrusted certificate, a plaintext peer, a corrupt record) ends the
//! connection with `tls_error` after a best-effort write of rustls's alert. The server's session runs on
//! rustls's unbuffered API with buffers of its own, released when empty ([`tls_server`]); the client's is rustls's
//! buffered connection ([`Tls`]).

use std::future::Future;
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd};
use std::task::{Context, Poll};
use std::time::{Duration, Instant as StdInstant};

use rustls::server::UnbufferedServerConnection;
use socket2::SockRef;
use tether_proto::{CloseReason, Connection, Event};
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::sockopt;

mod tls_server;
use tls_server::TlsServer;

/// Bytes read per readiness wakeup.
pub(crate) const READ_CHUNK: usize = 16 * 1024;
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
    /// Driving the connection panicked (a bug of ours); its socket is closed right after.
    fn after_panic(&mut self, _conn: &Connection, _panic: &(dyn std::any::Any + Send)) {}
}

/// The socket under a [`Pump`].
pub(crate) trait Sock: AsFd + AsRawFd {
    /// Run `f`, a non-blocking syscall on this socket, so that its `WouldBlock` clears the readiness the driver
    /// waits on (tokio caches readiness and must be told; an edge-triggered event loop need not be).
    fn io<R>(&self, interest: Interest, f: impl FnOnce() -> io::Result<R>) -> io::Result<R>;
}

impl Sock for TcpStream {
    fn io<R>(&self, interest: Interest, f: impl FnOnce() -> io::Result<R>) -> io::Result<R> {
        self.try_io(interest, f)
    }
}

impl Sock for mio::net::TcpStream {
    fn io<R>(&self, _interest: Interest, f: impl FnOnce() -> io::Result<R>) -> io::Result<R> {
        f()
    }
}

/// What a connection waits for after a [`Pump::turn`].
pub(crate) enum Next {
    /// The core closed the connection: call [`Pump::finish_now`] and close the socket.
    Closed,
    Wait {
        /// The core takes bytes (it is not holding back a peer that sends faster than it can be answered).
        read: bool,
        /// Output is waiting for room in the socket: the last write was refused (`WouldBlock`), and a writable
        /// event comes when room is made.
        write: bool,
        /// Output is waiting and the socket did not refuse it: the write budget ran out, or the hooks queued more
        /// after the flush. Turn again without waiting for an event (none may come).
        more: bool,
        /// The core's one deadline.
        deadline: Option<StdInstant>,
    },
}

/// What [`Pump::on_cmds`] took.
#[derive(PartialEq, Eq)]
pub(crate) enum Batch {
    /// Nothing: the context is registered with the command source.
    Idle,
    /// Some commands (or the end of the source), and then nothing more: registered as for `Idle`.
    Applied,
    /// A whole batch: more may be waiting, and nothing is registered. Call again after the output is flushed.
    Full,
}

/// How a closed connection's TLS ended on the spot.
pub(crate) enum Finish {
    Done,
    /// rustls still has records to write or a handshake to finish: wait (bounded by [`TLS_FINISH_GRACE`]) with
    /// [`finish_tls`], reading while `handshaking`.
    Wait,
}

/// A connection's TLS session. The server's runs on rustls's unbuffered API with buffers of tether's own, released
/// when empty ([`TlsServer`]); the client's is rustls's buffered connection (a client holds one connection).
// Always boxed (`Box<Tls>`): boxing the server's session inside as well would cost a second allocation per
// connection.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Tls {
    Client(Box<rustls::Connection>),
    Server(TlsServer),
}

impl Tls {
    pub(crate) fn server(tls: UnbufferedServerConnection) -> Box<Tls> {
        Box::new(Tls::Server(TlsServer::new(tls)))
    }

    pub(crate) fn client(tls: Box<rustls::Connection>) -> Box<Tls> {
        Box::new(Tls::Client(tls))
    }

    fn is_handshaking(&self) -> bool {
        match self {
            Tls::Client(tls) => tls.is_handshaking(),
            Tls::Server(tls) => tls.is_handshaking(),
        }
    }

    /// Records are waiting for the socket.
    fn wants_write(&self) -> bool {
        match self {
            Tls::Client(tls) => tls.wants_write(),
            Tls::Server(tls) => tls.wants_write(),
        }
    }

    fn send_close_notify(&mut self) {
        match self {
            Tls::Client(tls) => tls.send_close_notify(),
            Tls::Server(tls) => tls.send_close_notify(),
        }
    }

    /// Write waiting records to the socket once.
    fn write_tls<S: Sock>(&mut self, sock: &S) -> io::Result<usize> {
        match self {
            Tls::Client(tls) => sock.io(Interest::WRITABLE, || tls.write_tls(&mut &*SockRef::from(sock))),
            Tls::Server(tls) => tls.write_tls(sock, usize::MAX),
        }
    }
}

/// A connection's IO state besides its core.
pub(crate) struct Pump {
    tls: Option<Box<Tls>>,
    /// The heartbeat interval (ms) the socket's options were last set for; 0 until one is negotiated.
    options_for_ms: u32,
    /// The hooks still have a command source.
    cmds_open: bool,
    close_notify_sent: bool,
    /// The last write to the socket was refused (`WouldBlock`).
    blocked: bool,
}

impl Pump {
    /// `tls`: the rustls connection to run between socket and core, or `None` for plain TCP.
    pub(crate) fn new(tls: Option<Box<Tls>>) -> Pump {
        Pump { tls, options_for_ms: 0, cmds_open: true, close_notify_sent: false, blocked: false }
    }

    /// Carry out what the core decided: its events to the hooks, its output to the socket, the write half shut
    /// when asked; then say what the connection waits for.
    pub(crate) fn turn<S: Sock, H: Hooks>(&mut self, sock: &S, conn: &mut Connection, hooks: &mut H) -> Next {
        loop {
            let now = now();
            while let Some(ev) = conn.poll_event() {
                hooks.on_event(conn, now, ev);
            }
            if let Some((interval, _)) = conn.heartbeat() {
                let ms = u32::try_from(interval.as_millis()).unwrap_or(u32::MAX);
                if ms != self.options_for_ms {
                    let previous =
                        (self.options_for_ms != 0).then(|| Duration::from_millis(self.options_for_ms.into()));
                    self.options_for_ms = ms;
                    if let Some(options) = hooks.socket_options() {
                        options.for_heartbeat(sock, interval, previous);
                    }
                }
            }
            let (written, blocked) = match self.tls.as_deref_mut() {
                None => flush(sock, conn, now),
                Some(Tls::Client(tls)) => flush_tls(sock, tls, conn, now),
                Some(Tls::Server(tls)) => tls.flush(sock, conn, now),
            };
            self.blocked = blocked;
            hooks.on_io(conn, 0, written);
            hooks.after_flush(conn, now);
            if conn.kernel_check_due(now) {
                conn.handle_kernel_queue(now, sockopt::kernel_queue(sock.as_raw_fd()));
            }
            if conn.poll_shutdown_write() {
                // Over TLS the write half ends with close_notify, and the socket is shut only once rustls has
                // written every record.
                let tls_pending = match self.tls.as_deref_mut() {
                    // The server's handshake is still running: what the core said last (a `BYE`) waits to be
                    // sealed once it completes, and close_notify after it. The drain's grace bounds the wait.
                    Some(Tls::Server(tls)) if tls.is_handshaking() => true,
                    Some(tls) if !self.close_notify_sent => {
                        self.close_notify_sent = true;
                        tls.send_close_notify();
                        self.blocked = match tls {
                            Tls::Client(tls) => flush_tls(sock, tls, conn, now).1,
                            Tls::Server(tls) => tls.flush(sock, conn, now).1,
                        };
                        tls.wants_write()
                    }
                    Some(tls) => tls.wants_write(),
                    None => false,
                };
                if !tls_pending {
                    let _ = SockRef::from(sock).shutdown(std::net::Shutdown::Write);
                    conn.handle_write_shutdown();
                }
            }
            if let Some(ev) = conn.poll_event() {
                hooks.on_event(conn, now, ev);
                continue;
            }
            if conn.is_closed() {
                return Next::Closed;
            }
            // Over TLS, rustls takes the core's bytes as long as it has room, so what waits for the socket is its
            // own.
            let pending = match self.tls.as_deref() {
                None => conn.pending_tx() > 0,
                Some(tls) => tls.wants_write(),
            };
            let (write, more) = (pending && self.blocked, pending && !self.blocked);
            return Next::Wait { read: conn.wants_read(), write, more, deadline: conn.poll_timeout() };
        }
    }

    /// The socket is readable: read once (at most `buf`'s length) into the core. Returns whether the socket is
    /// drained (a short read, `WouldBlock`, the end of the stream or an error): if not, more may be waiting.
    pub(crate) fn on_readable<S: Sock, H: Hooks>(
        &mut self,
        sock: &S,
        buf: &mut [u8],
        conn: &mut Connection,
        hooks: &mut H,
    ) -> bool {
        let (n, drained) = read(sock, buf, self.tls.as_deref_mut(), conn);
        hooks.on_progress(conn);
        hooks.on_io(conn, n, 0);
        drained
    }

    /// The core's deadline passed. A timer can fire late (a stalled process, a busy runtime): frames already
    /// waiting in the kernel arrived before the verdict would be taken, so they are read first and count as life.
    pub(crate) fn on_timer<S: Sock, H: Hooks>(
        &mut self,
        sock: &S,
        buf: &mut [u8],
        want_read: bool,
        conn: &mut Connection,
        hooks: &mut H,
    ) {
        if want_read {
            let n = read_pending(sock, buf, self.tls.as_deref_mut(), conn);
            hooks.on_progress(conn);
            hooks.on_io(conn, n, 0);
        }
        conn.handle_timeout(now());
    }

    /// Take the commands waiting (at most [`CMD_BATCH`], so that one write carries a burst of relayed frames)
    /// and apply them; `cx` is registered with the command source when none is left.
    pub(crate) fn on_cmds<H: Hooks>(&mut self, cx: &mut Context<'_>, conn: &mut Connection, hooks: &mut H) -> Batch {
        if !self.cmds_open {
            return Batch::Idle;
        }
        let now = now();
        let mut taken = Batch::Idle;
        for _ in 0..CMD_BATCH {
            if conn.is_closed() {
                return taken;
            }
            match hooks.poll_cmd(cx) {
                Poll::Ready(Some(cmd)) => {
                    hooks.on_cmd(conn, now, cmd);
                    taken = Batch::Applied;
                }
                Poll::Ready(None) => {
                    self.cmds_open = false;
                    return Batch::Applied;
                }
                Poll::Pending => return taken,
            }
        }
        Batch::Full
    }

    /// The connection is closed: end its TLS as far as possible without waiting, then drain what the peer sent
    /// so that closing the socket sends FIN rather than RST. [`Finish::Wait`]: the TLS end needs the socket again
    /// (drained only after it).
    pub(crate) fn finish_now<S: Sock>(&mut self, sock: &S, conn: &Connection) -> Finish {
        if let Some(tls) = self.tls.as_deref_mut() {
            if let Finish::Wait = finish_tls_now(sock, tls, conn.close_reason(), &mut self.close_notify_sent) {
                return Finish::Wait;
            }
        }
        close_quietly(sock);
        Finish::Done
    }

    /// The TLS connection, for [`finish_tls`] after [`Finish::Wait`].
    pub(crate) fn take_tls(&mut self) -> Option<(Box<Tls>, bool)> {
        self.tls.take().map(|t| (t, self.close_notify_sent))
    }
}

/// Run the connection until the core says it is closed, then close the socket: the client's driver, one
/// connection on its own task. `tls`: the rustls connection to run between socket and core, or `None`.
pub(crate) async fn drive<H: Hooks>(stream: TcpStream, tls: Option<Box<Tls>>, conn: &mut Connection, hooks: &mut H) {
    let sleep = tokio::time::sleep_until(Instant::now() + Duration::from_secs(86_400));
    tokio::pin!(sleep);
    let mut armed: Option<StdInstant> = None;
    let mut pump = Pump::new(tls);
    /// What ended a wait.
    enum Wake {
        Read,
        Write,
        Timer,
        Cmd,
    }
    while let Next::Wait { read: want_read, write, more, deadline } = pump.turn(&stream, conn, hooks) {
        // tokio keeps the socket's write readiness: output that was not refused finds it still set.
        let want_write = write || more;
        if deadline != armed {
            armed = deadline;
            let at = deadline.map_or(Instant::now() + Duration::from_secs(86_400), Instant::from_std);
            sleep.as_mut().reset(at);
        }
        // One wait over every source, polled in priority order. `poll_fn` keeps no state of its own: readiness
        // registers with the IO driver, the timer is the pinned `Sleep`, commands are taken by `on_cmds` with
        // this wait's context.
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
            match pump.on_cmds(cx, conn, hooks) {
                Batch::Idle => Poll::Pending,
                Batch::Applied | Batch::Full => Poll::Ready(Wake::Cmd),
            }
        })
        .await;
        match wake {
            Wake::Read => {
                let mut buf = [0u8; READ_CHUNK];
                pump.on_readable(&stream, &mut buf, conn, hooks);
            }
            Wake::Write | Wake::Cmd => {}
            Wake::Timer => {
                armed = None;
                let mut buf = [0u8; READ_CHUNK];
                pump.on_timer(&stream, &mut buf, want_read, conn, hooks);
            }
        }
    }
    if let Finish::Wait = pump.finish_now(&stream, conn) {
        if let Some((mut tls, notified)) = pump.take_tls() {
            // Boxed: its state would otherwise enlarge every connection's task, TLS or not.
            Box::pin(finish_tls(&stream, &mut tls, conn.close_reason(), notified)).await;
        }
        close_quietly(&stream);
    }
}

/// End a closed connection's TLS as far as the socket allows now. After a broken transport or a TLS error, only
/// rustls's queued alert is written, best effort. Otherwise close_notify follows the records rustls still holds
/// (a `BYE` behind a full socket buffer, or a refusal's `BYE` waiting for the handshake to complete).
fn finish_tls_now<S: Sock>(sock: &S, tls: &mut Tls, reason: Option<CloseReason>, notify_sent: &mut bool) -> Finish {
    use CloseReason::*;
    if let Tls::Server(tls) = tls {
        tls.seal_early();
    }
    let broken = matches!(
        reason,
        None | Some(TlsError | HandshakeTimeout | Reset | WriteTimeout | KeepaliveTimeout | Unreachable)
    );
    if broken {
        while tls.wants_write() && tls.write_tls(sock).is_ok_and(|n| n > 0) {}
        return Finish::Done;
    }
    if !tls.is_handshaking() && !*notify_sent {
        *notify_sent = true;
        tls.send_close_notify();
    }
    while tls.wants_write() {
        match tls.write_tls(sock) {
            Ok(n) if n > 0 => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            _ => return Finish::Done,
        }
    }
    if !tls.is_handshaking() && !tls.wants_write() {
        return Finish::Done;
    }
    Finish::Wait
}

/// [`finish_tls_now`] until done, waiting for the socket in between, bounded by [`TLS_FINISH_GRACE`]. While the
/// handshake is unfinished, only it matters: records are processed, application data is dropped.
pub(crate) async fn finish_tls(stream: &TcpStream, tls: &mut Tls, reason: Option<CloseReason>, notified: bool) {
    let deadline = tokio::time::sleep(TLS_FINISH_GRACE);
    tokio::pin!(deadline);
    let mut notify_sent = notified;
    let sock = SockRef::from(stream);
    while let Finish::Wait = finish_tls_now(stream, tls, reason, &mut notify_sent) {
        let handshaking = tls.is_handshaking();
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
            let mut buf = [0u8; READ_CHUNK];
            match stream.try_io(Interest::READABLE, || (&*sock).read(&mut buf)) {
                Ok(0) => return,
                Ok(n) => match tls {
                    Tls::Client(tls) => {
                        let mut data = &buf[..n];
                        while !data.is_empty() {
                            if tls.read_tls(&mut data).is_err() || tls.process_new_packets().is_err() {
                                return;
                            }
                            let mut sink = [0u8; 4096];
                            while tls.reader().read(&mut sink).is_ok_and(|n| n > 0) {}
                        }
                    }
                    Tls::Server(tls) => {
                        if !tls.receive(&mut buf[..n], None) {
                            // rustls refused it: its alert, best effort, as on the loop's own path.
                            let _ = tls.write_tls(stream, usize::MAX);
                            return;
                        }
                    }
                },
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => return,
            }
        }
    }
}

/// Hand bytes read from the socket to the core, through rustls when the connection uses TLS.
/// `data` is the read buffer: the server's TLS decrypts in place.
fn deliver(tls: Option<&mut Tls>, conn: &mut Connection, data: &mut [u8]) {
    match tls {
        None => conn.handle_bytes(now(), data),
        Some(Tls::Client(tls)) => deliver_tls(tls, conn, data),
        Some(Tls::Server(tls)) => {
            if !conn.is_closed() {
                tls.receive(data, Some(conn));
            }
        }
    }
}

/// The socket reached end of stream.
fn deliver_eof(tls: Option<&mut Tls>, conn: &mut Connection) {
    match tls {
        // The server's TLS has already handed over everything complete it received.
        None | Some(Tls::Server(_)) => conn.handle_eof(now()),
        Some(Tls::Client(tls)) => {
            // A zero-byte read_tls records the end of stream; plaintext decrypted before it is still delivered.
            let _ = tls.read_tls(&mut io::empty());
            if process_tls(tls, conn) {
                drain_plaintext(tls, conn);
            }
            conn.handle_eof(now());
        }
    }
}

fn deliver_tls(tls: &mut rustls::Connection, conn: &mut Connection, mut data: &[u8]) {
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
fn process_tls(tls: &mut rustls::Connection, conn: &mut Connection) -> bool {
    match tls.process_new_packets() {
        Ok(_) => true,
        Err(e) => {
            let by_peer = matches!(e, rustls::Error::AlertReceived(_));
            conn.fail(now(), CloseReason::TlsError, by_peer, crate::tls::failure_detail(tls, &e));
            false
        }
    }
}

fn drain_plaintext(tls: &mut rustls::Connection, conn: &mut Connection) {
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

/// A read or write failed: the core classifies it, told whether the kernel still holds unacknowledged bytes of
/// ours.
fn io_failed<S: Sock>(sock: &S, conn: &mut Connection, now: StdInstant, e: &io::Error) {
    let unacked = sockopt::unacked_bytes(sock.as_raw_fd()).is_some_and(|n| n > 0);
    conn.handle_error(now, e, unacked);
}

/// Read once into `buf` and hand it to the core. Returns the bytes read and whether the socket is drained.
fn read<S: Sock>(sock: &S, buf: &mut [u8], tls: Option<&mut Tls>, conn: &mut Connection) -> (usize, bool) {
    let mut got = 0;
    // A read shorter than the buffer shows the socket drained (epoll reports new data as a new edge), so it is
    // reported to tokio as WouldBlock: tokio then clears the readiness, and the next wait does not cost a
    // second, empty read syscall. tokio's own `poll_read` does the same; `try_read` does not.
    let r = sock.io(Interest::READABLE, || {
        let n = (&*SockRef::from(sock)).read(buf)?;
        got = n;
        if n > 0 && n < buf.len() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    });
    match r {
        Ok(0) => deliver_eof(tls, conn),
        Ok(n) => {
            deliver(tls, conn, &mut buf[..n]);
            return (n, false);
        }
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
            if got > 0 {
                deliver(tls, conn, &mut buf[..got]);
            }
        }
        Err(e) => io_failed(sock, conn, now(), &e),
    }
    (got, true)
}

/// Read everything already waiting in the kernel (bounded), without waiting for readiness. This reads the
/// socket directly: tokio's `try_read` trusts its cached readiness, which lags behind the kernel exactly when a
/// timer fires late (the IO driver has not seen the epoll event yet). The socket is non-blocking either way.
/// Returns the bytes read.
fn read_pending<S: Sock>(sock: &S, buf: &mut [u8], mut tls: Option<&mut Tls>, conn: &mut Connection) -> usize {
    let raw = SockRef::from(sock);
    let mut total = 0;
    for _ in 0..16 {
        let before = (conn.pending_rx(), conn.last_rx(), conn.is_closed());
        match (&*raw).read(buf) {
            Ok(0) => {
                deliver_eof(tls, conn);
                return total;
            }
            Ok(n) => {
                total += n;
                deliver(tls.as_deref_mut(), conn, &mut buf[..n])
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return total,
            Err(e) => {
                io_failed(sock, conn, now(), &e);
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

/// Returns the bytes written, and whether the socket refused more (`WouldBlock`).
fn flush<S: Sock>(sock: &S, conn: &mut Connection, now: StdInstant) -> (usize, bool) {
    use std::io::Write;
    let mut budget = WRITE_BUDGET;
    let mut blocked = false;
    while budget > 0 && !conn.poll_transmit().is_empty() {
        let chunk = &conn.poll_transmit()[..conn.poll_transmit().len().min(budget)];
        match sock.io(Interest::WRITABLE, || (&*SockRef::from(sock)).write(chunk)) {
            Ok(n) => {
                budget -= n.min(budget);
                conn.handle_written(now, n);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                blocked = true;
                break;
            }
            Err(e) => {
                io_failed(sock, conn, now, &e);
                break;
            }
        }
    }
    (WRITE_BUDGET - budget, blocked)
}

/// Move the core's bytes into rustls (as far as its buffer limit allows) and rustls's records to the socket.
/// Returns the bytes written to the socket, and whether the socket refused more (`WouldBlock`).
fn flush_tls<S: Sock>(sock: &S, tls: &mut rustls::Connection, conn: &mut Connection, now: StdInstant) -> (usize, bool) {
    use std::io::Write;
    let mut budget = WRITE_BUDGET;
    let mut blocked = false;
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
        let r = sock.io(Interest::WRITABLE, || tls.write_tls(&mut &*SockRef::from(sock)));
        match wrote(r, sock, conn, now, &mut blocked) {
            Some(n) => budget -= n.min(budget),
            None => break,
        }
    }
    (WRITE_BUDGET - budget, blocked)
}

/// The bytes one write of records to the socket took, or `None` to stop writing: nothing taken, the socket
/// refused (`blocked` set), or it failed (the core is told).
fn wrote<S: Sock>(
    r: io::Result<usize>,
    sock: &S,
    conn: &mut Connection,
    now: StdInstant,
    blocked: &mut bool,
) -> Option<usize> {
    match r {
        Ok(0) => None,
        Ok(n) => Some(n),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
            *blocked = true;
            None
        }
        Err(e) => {
            io_failed(sock, conn, now, &e);
            None
        }
    }
}

/// Drain what the peer already sent (bounded) so that dropping the socket sends FIN rather than RST: a RST can
/// destroy our `BYE` in the peer's receive queue before it is read.
pub(crate) fn close_quietly<S: Sock>(sock: &S) {
    let raw = SockRef::from(sock);
    let mut buf = [0u8; 4096];
    let mut drained = 0;
    while drained < CLOSE_DRAIN {
        match sock.io(Interest::READABLE, || (&*raw).read(&mut buf)) {
            Ok(0) | Err(_) => break,
            Ok(n) => drained += n,
        }
    }
}
