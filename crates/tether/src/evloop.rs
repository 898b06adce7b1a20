//! The server's event loops: every connection's state in a slab, driven by a few tasks instead of one task each.
//!
//! # Layout
//! - This file: [`Loops`], the handle the accept loop gives each admitted socket to (round robin, one loop per
//!   runtime worker thread), and [`run`], one loop. A loop is a single tokio task owning an epoll instance of
//!   its own (a mio `Poll`, itself registered with tokio's reactor as one descriptor), a slab of connections,
//!   a timer heap, one read buffer and a list of slots to visit. Each wakeup it gathers what is ready — epoll
//!   events, slots whose commands were woken, new connections, deadlines due — and visits each listed slot once.
//! - `slab`: [`slab::Entry`], one connection's state, and its visit.
//! - `timer`: [`timer::Timers`], the loop's deadlines, at most one live entry per connection.
//! - `wake`: the waker that lists a slot when a command arrives for it, made from the loop's number and the
//!   slot's key (no allocation).
//!
//! Per connection this keeps the socket, the core, the pump and the hooks in one slab entry, and a kernel epoll
//! item: no task, no future, no channel, no waker allocation, no tokio IO registration, no read buffer.
//!
//! # Rules
//! - The sans-IO core decides everything; a loop only carries its decisions out, through the same [`Pump`]
//!   steps the client's driver uses.
//! - Nothing in a loop waits: a visit reads, writes and decides, then returns. Work that waits (a cluster
//!   admission, a delayed refusal) is spawned by the hooks, and comes back as a command that wakes the slot.
//!   The one exception is a closed TLS connection whose last records cannot be written yet: its socket leaves
//!   the loop for a small task of its own ([`finish_tls`]), bounded by `TLS_FINISH_GRACE`.
//! - Time is tokio's: the loop's one `Sleep` is reset to the heap's earliest deadline (so `start_paused` tests
//!   drive it), and timers are exact to the millisecond, as tokio's are.
//! - A panic while visiting a connection (a bug of ours) closes that connection alone: the loop catches it,
//!   tells the hooks ([`Hooks::after_panic`]) and closes the socket. A panic while closing one is caught too. A
//!   loop whose task ends all the same is marked gone: the accept loop hands it nothing more, and what its inbox
//!   held is closed.
//! - Fairness: a visit reads at most one buffer (16 KiB), writes at most one budget (256 KiB) and takes at most
//!   one batch of commands; a connection with more waiting is visited again in the next round, after everyone
//!   else listed in this one. A loop that has run 16 rounds in a row without waiting yields to the runtime's
//!   other tasks, and its epoll is drained even when tokio's budget for the task says not to poll.

mod slab;
mod timer;
mod wake;

use std::future::Future;
use std::io;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant as StdInstant};

use futures_util::task::AtomicWaker;
use tether_proto::Connection;
use tokio::io::unix::AsyncFd;
use tokio::task::JoinSet;

use crate::driver::{close_quietly, finish_tls, now, Finish, Hooks, Pump, Tls, READ_CHUNK};
use slab::{Entry, Visited};

/// epoll events taken per `epoll_wait`.
const EVENTS: usize = 1024;

/// A connection handed to a loop: its socket (non-blocking), its core, its TLS session and its role's hooks.
pub(crate) struct New<H> {
    /// First: dropped unserved, the hooks leave before the socket closes (fields drop in order).
    pub(crate) hooks: H,
    pub(crate) sock: mio::net::TcpStream,
    pub(crate) conn: Connection,
    pub(crate) tls: Option<Box<Tls>>,
}

/// How the rest of the server reaches a loop: slots to visit and new connections, and the loop's waker.
pub(crate) struct Bell {
    /// Keys of slots whose waker fired since the loop last looked.
    woken: Mutex<Vec<usize>>,
    /// Something is waiting in `woken` or in the inbox's new connections.
    rung: AtomicBool,
    /// The loop ends once it holds no connection.
    ending: AtomicBool,
    /// The loop's task has ended: connections go to the other loops.
    gone: AtomicBool,
    waker: AtomicWaker,
}

impl Bell {
    /// List slot `key` and wake the loop.
    pub(crate) fn ring(&self, key: usize) {
        self.woken.lock().expect("bell lock").push(key);
        self.rouse();
    }

    fn rouse(&self) {
        self.rung.store(true, Ordering::Release);
        self.waker.wake();
    }
}

struct Inbox<H> {
    new: Mutex<Vec<New<H>>>,
    bell: Arc<Bell>,
}

/// The server's loops.
pub(crate) struct Loops<H> {
    inboxes: Vec<Arc<Inbox<H>>>,
    next: AtomicUsize,
}

impl<H: Hooks + Send + 'static> Loops<H> {
    /// Start one loop per worker thread of the current runtime, as tasks of `tasks`.
    pub(crate) fn start(tasks: &mut JoinSet<()>) -> io::Result<Loops<H>> {
        let n = tokio::runtime::Handle::current().metrics().num_workers().max(1);
        let mut inboxes = Vec::with_capacity(n);
        for _ in 0..n {
            let bell = Arc::new(Bell {
                woken: Mutex::new(Vec::new()),
                rung: AtomicBool::new(false),
                ending: AtomicBool::new(false),
                gone: AtomicBool::new(false),
                waker: AtomicWaker::new(),
            });
            let registration = wake::Registration::new(bell.clone())?;
            let inbox = Arc::new(Inbox { new: Mutex::new(Vec::new()), bell });
            // SAFETY: the `Poll` owns its epoll descriptor for as long as it lives, and the `AsyncFd` owns the
            // `Poll`: the descriptor stays open and the same until the `AsyncFd` is dropped.
            let poll = unsafe { AsyncFd::register_with_interest(mio::Poll::new()?, tokio::io::Interest::READABLE) }
                .map_err(io::Error::from)?;
            tasks.spawn(run(inbox.clone(), poll, registration));
            inboxes.push(inbox);
        }
        Ok(Loops { inboxes, next: AtomicUsize::new(0) })
    }

    /// Hand a connection to the next loop that still runs. If none does (a bug ended them all), the connection is
    /// dropped: its hooks leave every count, then its socket closes.
    pub(crate) fn add(&self, new: New<H>) {
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let n = self.inboxes.len();
        for inbox in (0..n).map(|i| &self.inboxes[(start + i) % n]) {
            // Checked under the inbox's lock, which a loop that ends takes to mark itself gone and empty its
            // inbox: nothing is pushed after that.
            let mut queue = inbox.new.lock().unwrap_or_else(|p| p.into_inner());
            if !inbox.bell.gone.load(Ordering::Acquire) {
                queue.push(new);
                drop(queue);
                inbox.bell.rouse();
                return;
            }
        }
        tracing::error!("no event loop is running (a bug): closing a new connection");
    }

    /// Let every loop end once it holds no connection (nothing new is added after this).
    pub(crate) fn end(&self) {
        for inbox in &self.inboxes {
            inbox.bell.ending.store(true, Ordering::Release);
            inbox.bell.rouse();
        }
    }
}

/// The bytes one connection takes in its loop's slab, with hooks `H` (a regression guard reads it).
#[cfg(test)]
pub(crate) fn slot_size<H>() -> usize {
    std::mem::size_of::<Entry<H>>()
}

/// What a loop keeps besides its slab.
struct Round {
    /// Slots to visit in this round.
    now: Vec<usize>,
    /// Slots to visit again in the next round without waiting (more readable, more commands).
    next: Vec<usize>,
}

impl Round {
    fn list<H>(&mut self, key: usize, e: &mut Entry<H>) {
        if !e.listed {
            e.listed = true;
            self.now.push(key);
        }
    }
}

/// Rounds a loop may run back to back without waiting (more to read, more commands) before it yields to the
/// runtime's other tasks.
const ROUNDS_BEFORE_YIELD: u32 = 16;

/// One event loop: until told to end and empty.
async fn run<H: Hooks + Send + 'static>(
    inbox: Arc<Inbox<H>>,
    mut poll: AsyncFd<mio::Poll>,
    registration: wake::Registration,
) {
    let _gone = Gone(inbox.clone());
    let mut slab: ::slab::Slab<Entry<H>> = ::slab::Slab::new();
    let mut timers = timer::Timers::default();
    let mut events = mio::Events::with_capacity(EVENTS);
    let mut buf = vec![0u8; READ_CHUNK].into_boxed_slice();
    let mut round = Round { now: Vec::new(), next: Vec::new() };
    let mut finishing: JoinSet<()> = JoinSet::new();
    let far = || tokio::time::Instant::now() + Duration::from_secs(86_400);
    let sleep = tokio::time::sleep_until(far());
    tokio::pin!(sleep);
    let mut sleeping_until: Option<StdInstant> = None;
    let bell = inbox.bell.clone();
    let mut busy_rounds = 0;
    loop {
        if busy_rounds >= ROUNDS_BEFORE_YIELD {
            busy_rounds = 0;
            tokio::task::yield_now().await;
        }
        let empty = slab.is_empty();
        let mut waited = false;
        std::future::poll_fn(|cx| {
            bell.waker.register(cx.waker());
            while let Poll::Ready(Some(_)) = finishing.poll_join_next(cx) {}
            let ending = bell.ending.load(Ordering::Acquire) && empty && finishing.is_empty();
            if !round.next.is_empty() || bell.rung.load(Ordering::Acquire) || ending {
                return Poll::Ready(());
            }
            if poll.poll_read_ready(cx).is_ready() || sleep.as_mut().poll(cx).is_ready() {
                return Poll::Ready(());
            }
            waited = true;
            Poll::Pending
        })
        .await;
        busy_rounds = if waited { 0 } else { busy_rounds + 1 };
        std::mem::swap(&mut round.now, &mut round.next);
        gather_events(&mut poll, &mut events, &mut slab, &mut round);
        if bell.rung.swap(false, Ordering::AcqRel) {
            let new = std::mem::take(&mut *inbox.new.lock().expect("inbox lock"));
            for n in new {
                admit(&poll, &mut slab, &mut round, n);
            }
            let woken = std::mem::take(&mut *bell.woken.lock().expect("bell lock"));
            for key in woken {
                if let Some(e) = slab.get_mut(key) {
                    round.list(key, e);
                }
            }
        }
        let t = now();
        while let Some((key, at)) = timers.pop_due(t) {
            if let Some(e) = slab.get_mut(key) {
                if timers.fire(&mut e.armed, at) {
                    round.list(key, e);
                }
            }
        }
        let mut listed = std::mem::take(&mut round.now);
        for key in listed.drain(..) {
            let Some(e) = slab.get_mut(key) else { continue };
            e.listed = false;
            let waker = registration.slot_waker(key);
            match std::panic::catch_unwind(AssertUnwindSafe(|| e.visit(&mut buf, &waker))) {
                Ok(Visited::Open { deadline, again }) => {
                    timers.arm(key, &mut e.armed, deadline);
                    if again {
                        e.listed = true;
                        round.next.push(key);
                    }
                }
                Ok(Visited::Closed) => {
                    let e = slab.remove(key);
                    // A panic while closing (in the hooks' drop, say) loses this connection, not the loop.
                    let closed = std::panic::catch_unwind(AssertUnwindSafe(|| close(e, &poll, &mut finishing)));
                    if closed.is_err() {
                        tracing::error!("event loop: closing a connection panicked (a bug)");
                    }
                }
                Err(panic) => {
                    let Entry { hooks, sock, conn, .. } = slab.remove(key);
                    let mut hooks = AssertUnwindSafe(hooks);
                    let told = std::panic::catch_unwind(AssertUnwindSafe(|| {
                        hooks.after_panic(&conn, panic.as_ref());
                        drop(hooks);
                    }));
                    if told.is_err() {
                        tracing::error!("event loop: a connection's panic panicked again while it was closed");
                    }
                    drop(sock);
                }
            }
        }
        round.now = listed;
        let next = next_wakeup(&mut timers, &mut slab);
        if next != sleeping_until {
            sleeping_until = next;
            sleep.as_mut().reset(next.map_or_else(far, tokio::time::Instant::from_std));
        }
        // Ending: once nothing is left, and nothing new arrived (`rung` covers the inbox, set after a push).
        if bell.ending.load(Ordering::Acquire)
            && slab.is_empty()
            && finishing.is_empty()
            && !bell.rung.load(Ordering::Acquire)
        {
            return;
        }
    }
}

/// Marks a loop gone when its task ends however it ends (told to, or a bug that escaped every `catch_unwind`),
/// so that no connection is handed to it again, and closes what its inbox still held.
struct Gone<H>(Arc<Inbox<H>>);

impl<H> Drop for Gone<H> {
    fn drop(&mut self) {
        let left = {
            let mut queue = self.0.new.lock().unwrap_or_else(|p| p.into_inner());
            self.0.bell.gone.store(true, Ordering::Release);
            std::mem::take(&mut *queue)
        };
        // Dropped after the lock: each one's hooks leave the server's counts, then its socket closes.
        drop(left);
    }
}

/// The earliest deadline worth waking for. Entries at the top of the heap whose connection's deadline has since
/// moved later (each frame moves it) are re-armed at the new deadline now, and stale ones dropped, so that the
/// loop never wakes for a deadline that no longer exists: a heartbeat costs a heap step, not a wakeup.
fn next_wakeup<H>(timers: &mut timer::Timers, slab: &mut ::slab::Slab<Entry<H>>) -> Option<StdInstant> {
    loop {
        let (key, at) = timers.peek()?;
        let Some(e) = slab.get_mut(key).filter(|e| timers.holds(e.armed, at)) else {
            timers.pop();
            continue;
        };
        let deadline = e.conn.poll_timeout();
        if deadline.is_some_and(|d| d <= at) {
            return Some(at);
        }
        timers.pop();
        timer::Timers::disarm(&mut e.armed);
        timers.arm(key, &mut e.armed, deadline);
    }
}

/// Take every epoll event waiting (without waiting) and list the slots they are for.
fn gather_events<H>(
    poll: &mut AsyncFd<mio::Poll>,
    events: &mut mio::Events,
    slab: &mut ::slab::Slab<Entry<H>>,
    round: &mut Round,
) {
    // The readiness is taken before the epoll is drained and cleared after: an event that arrives in between
    // makes the reactor mark the descriptor ready again, so no wakeup is lost.
    match poll.poll_read_ready_mut(&mut Context::from_waker(std::task::Waker::noop())) {
        Poll::Ready(Ok(mut guard)) => {
            let drained = drain_epoll(guard.get_inner_mut(), events, slab, round);
            if drained {
                guard.clear_ready();
            }
        }
        // Not ready as far as the reactor knows, unless the task's budget for this poll is spent (tokio then
        // answers Pending whatever the readiness): drain the epoll anyway, without clearing anything.
        _ if !tokio::task::coop::has_budget_remaining() => {
            drain_epoll(poll.get_mut(), events, slab, round);
        }
        _ => {}
    }
}

/// Take what the loop's epoll holds, without waiting, and list the slots it is for. True once drained.
fn drain_epoll<H>(
    poll: &mut mio::Poll,
    events: &mut mio::Events,
    slab: &mut ::slab::Slab<Entry<H>>,
    round: &mut Round,
) -> bool {
    loop {
        if let Err(e) = poll.poll(events, Some(Duration::ZERO)) {
            if e.kind() != io::ErrorKind::Interrupted {
                tracing::warn!("event loop: epoll_wait: {e}");
            }
            return false;
        }
        let mut n = 0;
        for ev in events.iter() {
            n += 1;
            let key = ev.token().0;
            if let Some(e) = slab.get_mut(key) {
                if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                    e.readable = true;
                }
                round.list(key, e);
            }
        }
        if n < EVENTS {
            return true;
        }
    }
}

/// Put a new connection in the slab and in its loop's epoll, and list it for its first visit.
fn admit<H: Hooks>(poll: &AsyncFd<mio::Poll>, slab: &mut ::slab::Slab<Entry<H>>, round: &mut Round, new: New<H>) {
    let New { hooks, mut sock, conn, tls } = new;
    let slot = slab.vacant_entry();
    let key = slot.key();
    let interest = mio::Interest::READABLE | mio::Interest::WRITABLE;
    if let Err(e) = poll.get_ref().registry().register(&mut sock, mio::Token(key), interest) {
        // The kernel is out of memory for epoll items: the connection cannot be served. Its hooks are dropped
        // (the connection leaves the server's counts) before the socket closes.
        tracing::warn!("event loop: cannot watch a new connection ({e}); closing it");
        drop(hooks);
        return;
    }
    let e = slot.insert(Entry::new(sock, conn, Pump::new(tls), hooks));
    round.list(key, e);
}

/// A closed connection leaves its loop: its TLS finished and the socket drained, its hooks dropped before the
/// socket closes. TLS that must wait for the socket finishes on a task of its own.
fn close<H: Hooks + Send + 'static>(e: Entry<H>, poll: &AsyncFd<mio::Poll>, finishing: &mut JoinSet<()>) {
    let Entry { hooks, mut sock, conn, mut pump, .. } = e;
    match pump.finish_now(&sock, &conn) {
        Finish::Done => {
            drop(hooks);
            drop(sock);
        }
        Finish::Wait => {
            let _ = poll.get_ref().registry().deregister(&mut sock);
            let reason = conn.close_reason();
            let std = std::net::TcpStream::from(std::os::fd::OwnedFd::from(sock));
            let Ok(stream) = tokio::net::TcpStream::from_std(std) else {
                drop(hooks);
                return;
            };
            finishing.spawn(async move {
                if let Some((mut tls, notified)) = pump.take_tls() {
                    finish_tls(&stream, &mut tls, reason, notified).await;
                }
                close_quietly(&stream);
                drop(hooks);
            });
        }
    }
}
