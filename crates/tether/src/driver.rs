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
//! user timeout from a keepalive timeout.

use std::future::Future;
use std::io;
use std::os::fd::AsRawFd;
use std::task::{Context, Poll};
use std::time::{Duration, Instant as StdInstant};

use socket2::SockRef;
use tether_proto::{Connection, Event};
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::sockopt;

/// Bytes read per readiness wakeup.
const READ_CHUNK: usize = 16 * 1024;
/// Bytes written per wakeup before letting other branches run (fairness for a peer that reads fast).
const WRITE_BUDGET: usize = 256 * 1024;
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
}

/// Run the connection until the core says it is closed, then close the socket.
pub(crate) async fn drive<H: Hooks>(stream: TcpStream, conn: &mut Connection, hooks: &mut H) {
    let sleep = tokio::time::sleep_until(Instant::now() + Duration::from_secs(86_400));
    tokio::pin!(sleep);
    let mut armed: Option<StdInstant> = None;
    let mut cmds_open = true;
    loop {
        let now = now();
        while let Some(ev) = conn.poll_event() {
            hooks.on_event(conn, now, ev);
        }
        flush(&stream, conn, now);
        if conn.poll_shutdown_write() {
            let _ = SockRef::from(&stream).shutdown(std::net::Shutdown::Write);
            conn.handle_write_shutdown();
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
        let want_write = conn.pending_tx() > 0;
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
                read(&stream, conn);
                hooks.on_progress(conn);
            }
            Wake::Write => {}
            Wake::Timer => {
                armed = None;
                // A timer can fire late (a stalled process, a busy runtime): frames already waiting in the
                // kernel arrived before the verdict would be taken, so they are read first and count as life.
                if want_read {
                    read_pending(&stream, conn);
                    hooks.on_progress(conn);
                }
                conn.handle_timeout(now_std());
            }
            Wake::Cmd(Some(cmd)) => hooks.on_cmd(conn, now_std(), cmd),
            Wake::Cmd(None) => cmds_open = false,
        }
    }
    close_quietly(&stream);
}

fn read(stream: &TcpStream, conn: &mut Connection) {
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
        Ok(0) => conn.handle_eof(now()),
        Ok(n) => conn.handle_bytes(now(), &buf[..n]),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
            if got > 0 {
                conn.handle_bytes(now(), &buf[..got]);
            }
        }
        Err(e) => {
            let unacked = sockopt::unacked_bytes(stream.as_raw_fd()).is_some_and(|n| n > 0);
            conn.handle_error(now(), &e, unacked);
        }
    }
}

/// Read everything already waiting in the kernel (bounded), without waiting for readiness. This reads the
/// socket directly: tokio's `try_read` trusts its cached readiness, which lags behind the kernel exactly when a
/// timer fires late (the IO driver has not seen the epoll event yet). The socket is non-blocking either way.
fn read_pending(stream: &TcpStream, conn: &mut Connection) {
    use std::io::Read;
    let sock = SockRef::from(stream);
    for _ in 0..16 {
        let before = (conn.pending_rx(), conn.last_rx(), conn.is_closed());
        let mut buf = [0u8; READ_CHUNK];
        match (&*sock).read(&mut buf) {
            Ok(0) => return conn.handle_eof(now()),
            Ok(n) => conn.handle_bytes(now(), &buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e) => {
                let unacked = sockopt::unacked_bytes(stream.as_raw_fd()).is_some_and(|n| n > 0);
                return conn.handle_error(now(), &e, unacked);
            }
        }
        if !conn.wants_read() || before == (conn.pending_rx(), conn.last_rx(), conn.is_closed()) {
            return;
        }
    }
}

fn flush(stream: &TcpStream, conn: &mut Connection, now: StdInstant) {
    let mut budget = WRITE_BUDGET;
    while budget > 0 && !conn.poll_transmit().is_empty() {
        let chunk = &conn.poll_transmit()[..conn.poll_transmit().len().min(budget)];
        match stream.try_write(chunk) {
            Ok(n) => {
                budget -= n.min(budget);
                conn.handle_written(now, n);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e) => {
                let unacked = sockopt::unacked_bytes(stream.as_raw_fd()).is_some_and(|n| n > 0);
                conn.handle_error(now, &e, unacked);
                return;
            }
        }
    }
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
