//! One connection in an event loop's slab, and what one visit to it does.
//!
//! # Layout
//! [`Entry`] is everything the server keeps for a connection besides its control slot (shared with other tasks)
//! and the registry's view of its id: the socket, the sans-IO core, the [`Pump`]'s IO state, the role's hooks,
//! and the deadline armed in the loop's timer heap. The slab itself is the `slab` crate's
//! (a vector with a free list): a connection's key is its epoll token, its waker's token and its timer entry's
//! slot. [`Entry::visit`] is the only way a connection moves: it reads what is readable, fires a deadline that
//! passed, takes waiting commands, and lets the pump carry out what the core decided.
//!
//! # Rules
//! A visit never waits and never blocks. Readiness is edge-triggered: `readable` stays set until a read shows
//! the socket drained, so a connection that stopped reading (the core holding back a fast sender) is read
//! again as soon as the core wants bytes, without a new edge. Room to write needs no flag: every visit flushes
//! what the core has queued; a socket that refused some brings a visit when it drains, and output it did not
//! refuse (the write budget ran out, or the hooks queued more after the flush) is visited again in the next
//! round.

use std::task::{Context, Waker};

use tether_proto::Connection;

use super::timer::Armed;
use crate::driver::{now, Batch, Hooks, Next, Pump};

/// A connection's state in its loop.
pub(crate) struct Entry<H> {
    /// First, so that however an entry is dropped, its hooks leave (and forget the descriptor) before the socket
    /// closes (fields drop in order).
    pub(super) hooks: H,
    pub(super) sock: mio::net::TcpStream,
    pub(super) conn: Connection,
    pub(super) pump: Pump,
    /// The deadline this entry has in the timer heap.
    pub(super) armed: Armed,
    /// Readable since the last read that drained the socket (edge-triggered readiness).
    pub(super) readable: bool,
    /// The core takes bytes (as of the last visit).
    pub(super) want_read: bool,
    /// Already in this round's list of slots to visit.
    pub(super) listed: bool,
}

/// What a visit left.
pub(crate) enum Visited {
    Closed,
    Open {
        deadline: Option<std::time::Instant>,
        /// Visit again in the next round without waiting: more may be readable, a whole batch of commands was
        /// taken, or output waits that the socket has not refused (no writable event would come for it).
        again: bool,
    },
}

impl<H: Hooks> Entry<H> {
    pub(super) fn new(sock: mio::net::TcpStream, conn: Connection, pump: Pump, hooks: H) -> Self {
        Entry { sock, conn, pump, hooks, armed: Armed::default(), readable: false, want_read: true, listed: false }
    }

    /// Move the connection as far as it goes without waiting. `buf` is the loop's read buffer; `waker` lists this
    /// slot when a command arrives (`wake::Registration::slot_waker`).
    pub(super) fn visit(&mut self, buf: &mut [u8], waker: &Waker) -> Visited {
        let Entry { sock, conn, pump, hooks, readable, want_read, .. } = self;
        if *readable && *want_read && pump.on_readable(sock, buf, conn, hooks) {
            *readable = false;
        }
        if conn.poll_timeout().is_some_and(|d| d <= now()) {
            pump.on_timer(sock, buf, *want_read, conn, hooks);
        }
        // Woken or not, commands are polled on every visit, as the client's driver polls them on every wait: the
        // hooks' sources register this slot's waker only when polled.
        let batch = pump.on_cmds(&mut Context::from_waker(waker), conn, hooks);
        match pump.turn(sock, conn, hooks) {
            Next::Closed => Visited::Closed,
            Next::Wait { read, write: _, more, deadline } => {
                *want_read = read;
                Visited::Open { deadline, again: (*readable && read) || batch == Batch::Full || more }
            }
        }
    }
}
