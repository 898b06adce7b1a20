//! `tether_client_start`, sends, subscriptions, `tether_close`, `tether_free`.
//!
//! Each client is a task on the library's thread that owns its [`ReconnectingClient`]: it carries out the
//! caller's commands and moves events into a small hand-off queue that `tether_next_event` pulls from. When the
//! caller stops pulling, the hand-off fills, the task stops taking events, and the reconnecting client's own
//! bounded queue applies its rule (drop and count, `TETHER_EVENT_DROPPED`), so memory stays bounded; commands are
//! served all the while.

use std::collections::VecDeque;
use std::ffi::{c_char, c_void};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tether_core::{LinkError, LinkEvent, ReconnectingClient, Sent};
use tokio::runtime::Handle;
use tokio::sync::{mpsc, oneshot, Notify};

use crate::config::tether_config;
use crate::event::Taken;
use crate::runtime;
use crate::status::*;

/// A running client (opaque). Made by `tether_client_start`; closed by `tether_close`; freed by `tether_free`.
pub struct tether_client {
    io: Handle,
    cmds: mpsc::Sender<Cmd>,
    pub(crate) handoff: Arc<Handoff>,
    /// What the last `tether_next_event` handed out (its strings and bytes live here), and the consumer's lock.
    pub(crate) taken: Mutex<Taken>,
    closed: AtomicBool,
    /// The largest frame this client accepts: a payload above it is refused before it is copied.
    max_frame: usize,
}

/// Called on the library's thread when an event is queued and none was waiting (edge-triggered: read with
/// timeout 0 until `TETHER_TIMEOUT`), and once when the client has ended. It must return quickly and must not
/// call into the library: post to the application's own event loop (write to a pipe, signal a condition).
pub type tether_wakeup_fn = Option<unsafe extern "C" fn(user: *mut c_void)>;

/// Events taken from the reconnecting client and not yet pulled: a few, so the bound that counts is the client's.
const HANDOFF: usize = 16;

pub(crate) struct Handoff {
    state: Mutex<HandoffState>,
    /// Held while the wake-up callback runs, so that `tether_free` and `tether_set_wakeup` can wait for a call
    /// under way before they return.
    calling: Mutex<()>,
    /// The reconnecting client gave up: later commands are refused.
    gave_up: AtomicBool,
    /// Signalled when an event is queued or the client ends (for `tether_next_event`).
    ready: Condvar,
    /// Notified when an event was pulled (for the task, which stops taking events while the hand-off is full).
    room: Notify,
}

#[derive(Default)]
struct HandoffState {
    queue: VecDeque<LinkEvent>,
    /// The reconnecting client ended and everything it said is in `queue`.
    ended: bool,
    wakeup: Option<Wakeup>,
}

#[derive(Clone, Copy)]
struct Wakeup {
    f: unsafe extern "C" fn(*mut c_void),
    user: *mut c_void,
}

// SAFETY: the caller hands the pointer over to be passed back on the library's thread (the header's contract for
// `tether_set_wakeup`); the library never dereferences it.
unsafe impl Send for Wakeup {}

impl Wakeup {
    fn call(self) {
        // SAFETY: the function the caller registered, with its own pointer.
        unsafe { (self.f)(self.user) }
    }
}

/// What `Handoff::pop` found.
pub(crate) enum Popped {
    Event(LinkEvent),
    Timeout,
    Ended,
}

impl Handoff {
    fn new() -> Handoff {
        Handoff {
            state: Mutex::new(HandoffState::default()),
            calling: Mutex::new(()),
            gave_up: AtomicBool::new(false),
            ready: Condvar::new(),
            room: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HandoffState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn has_room(&self) -> bool {
        self.lock().queue.len() < HANDOFF
    }

    fn push(&self, ev: LinkEvent) {
        if matches!(ev, LinkEvent::GaveUp { .. }) {
            self.gave_up.store(true, Ordering::Release);
        }
        let was_empty = {
            let mut st = self.lock();
            let was_empty = st.queue.is_empty();
            st.queue.push_back(ev);
            was_empty
        };
        self.ready.notify_one();
        if was_empty {
            self.wake();
        }
    }

    fn end(&self) {
        self.lock().ended = true;
        self.ready.notify_all();
        self.wake();
    }

    /// Call the wake-up callback, if one is registered (read under `calling`, so that one cleared is never called
    /// after `clear_wakeup` returned).
    fn wake(&self) {
        let _calling = self.calling.lock().unwrap_or_else(|p| p.into_inner());
        let wakeup = self.lock().wakeup;
        if let Some(w) = wakeup {
            w.call();
        }
    }

    /// Register `wakeup` in place of the callback, and wait for a call of the old one under way (unless this is
    /// the library's thread, where that call is running).
    fn set_wakeup(&self, wakeup: Option<Wakeup>) {
        self.lock().wakeup = wakeup;
        if !runtime::on_runtime() {
            drop(self.calling.lock().unwrap_or_else(|p| p.into_inner()));
        }
    }

    /// The next event, waiting up to `timeout` (`None`: for ever).
    pub(crate) fn pop(&self, timeout: Option<Duration>) -> Popped {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut st = self.lock();
        loop {
            if let Some(ev) = st.queue.pop_front() {
                drop(st);
                self.room.notify_one();
                return Popped::Event(ev);
            }
            if st.ended {
                return Popped::Ended;
            }
            st = match deadline {
                None => self.ready.wait(st).unwrap_or_else(|p| p.into_inner()),
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Popped::Timeout;
                    }
                    self.ready.wait_timeout(st, left).unwrap_or_else(|p| p.into_inner()).0
                }
            };
        }
    }
}

enum Cmd {
    Send { to: Option<String>, payload: Bytes, reply: oneshot::Sender<std::result::Result<Sent, LinkError>> },
    Subscribe { ids: Vec<String>, on: bool, reply: oneshot::Sender<std::result::Result<(), LinkError>> },
    Close(oneshot::Sender<()>),
}

/// The client's task: commands in, events out, until the handle is freed.
async fn serve(mut client: ReconnectingClient, mut cmds: mpsc::Receiver<Cmd>, handoff: Arc<Handoff>) {
    let mut events = true;
    let mut closed = false;
    loop {
        let room = events && handoff.has_room();
        tokio::select! {
            ev = client.next_event(), if room => match ev {
                Some(ev) => handoff.push(ev),
                None => {
                    events = false;
                    handoff.end();
                }
            },
            () = handoff.room.notified(), if events && !room => {}
            cmd = cmds.recv() => match cmd {
                Some(Cmd::Send { to, payload, reply }) => {
                    let _ = reply.send(client.send(to.as_deref(), payload).await);
                }
                Some(Cmd::Subscribe { ids, on, reply }) => {
                    let r = match on {
                        true => client.subscribe(ids).await,
                        false => client.unsubscribe(ids).await,
                    };
                    let _ = reply.send(r);
                }
                Some(Cmd::Close(done)) => {
                    client.close().await;
                    closed = true;
                    let _ = done.send(());
                }
                None => {
                    if !closed {
                        client.close().await;
                    }
                    return;
                }
            },
        }
    }
}

/// Start a client from `cfg` (which needs at least one server): it connects, and reconnects, in the background;
/// `tether_next_event` tells what happens. On success `*out` is the client; close it with `tether_close` and free
/// it with `tether_free`.
#[no_mangle]
pub unsafe extern "C" fn tether_client_start(cfg: *const tether_config, out: *mut *mut tether_client) -> i32 {
    guard(|| {
        // SAFETY: a configuration from `tether_config_new` (the header's rule).
        let cfg = unsafe { arg_ref(cfg, "cfg") }?;
        if out.is_null() {
            return Err(Error::new(TETHER_ERR_NULL, "out is NULL"));
        }
        if cfg.servers.is_empty() {
            return Err(Error::new(TETHER_ERR_INVALID, "no server: add one with tether_config_add_server"));
        }
        let io = runtime::handle()?;
        let (servers, client_cfg, resilience) = cfg.for_client();
        let max_frame = client_cfg.conn.max_frame as usize;
        let client = {
            let _rt = io.enter();
            ReconnectingClient::start(servers, client_cfg, resilience)
        };
        let (cmds, cmd_rx) = mpsc::channel(64);
        let handoff = Arc::new(Handoff::new());
        io.spawn(serve(client, cmd_rx, handoff.clone()));
        let c = tether_client {
            io,
            cmds,
            handoff,
            taken: Mutex::new(Taken::default()),
            closed: AtomicBool::new(false),
            max_frame,
        };
        // SAFETY: checked non-NULL; the caller's slot.
        unsafe { *out = Box::into_raw(Box::new(c)) };
        Ok(TETHER_OK)
    })
}

impl tether_client {
    fn open(&self) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::new(TETHER_ERR_CLOSED, "the client is closed"));
        }
        if self.handoff.gave_up.load(Ordering::Acquire) {
            return Err(Error::new(TETHER_ERR_CLOSED, "the client gave up reconnecting"));
        }
        Ok(())
    }

    /// Hand `cmd` to the task and wait for its answer.
    fn call<T>(&self, what: &str, cmd: Cmd, reply: oneshot::Receiver<T>) -> Result<T> {
        runtime::not_on_runtime(what)?;
        let stopped = || Error::new(TETHER_ERR_CLOSED, "the client has stopped");
        self.io.block_on(async {
            self.cmds.send(cmd).await.map_err(|_| stopped())?;
            reply.await.map_err(|_| stopped())
        })
    }
}

fn link_error(e: LinkError) -> Error {
    let code = match e {
        LinkError::QueueFull(_) | LinkError::Full(_) => TETHER_ERR_FULL,
        LinkError::TooLarge { .. } => TETHER_ERR_TOO_LARGE,
        LinkError::Stopped => TETHER_ERR_CLOSED,
    };
    Error::new(code, e.to_string())
}

/// Send `len` bytes at `data` to client `to`, or to the server's application when `to` is NULL or "". Connected:
/// handed to the connection; disconnected: held for the next one (bounded, see `tether_config_set_queues`); on a
/// reliable session, kept in its outbox either way and `*seq` (when not NULL) is its sequence number, else 0. The
/// bytes are copied: the caller may reuse its buffer at once. An empty message may be given as `data` NULL with
/// `len` 0. Thread-safe.
#[no_mangle]
pub unsafe extern "C" fn tether_send(
    client: *mut tether_client,
    to: *const c_char,
    data: *const u8,
    len: usize,
    seq: *mut u64,
) -> i32 {
    guard(|| {
        // SAFETY: a client from `tether_client_start`, not freed (the header's rule).
        let c = unsafe { arg_ref(client, "client") }?;
        c.open()?;
        // SAFETY: the caller's string.
        let to = unsafe { opt_str(to, "to") }?.filter(|t| !t.is_empty());
        if let Some(t) = to {
            check_id(t, "to")?;
        }
        if data.is_null() && len > 0 {
            return Err(Error::new(TETHER_ERR_NULL, "data is NULL"));
        }
        if len > c.max_frame {
            return Err(Error::new(
                TETHER_ERR_TOO_LARGE,
                format!("payload of {len} bytes exceeds the largest frame ({} bytes)", c.max_frame),
            ));
        }
        let payload = match len {
            0 => Bytes::new(),
            // SAFETY: `len` readable bytes at `data` (the header's rule); checked non-NULL.
            _ => Bytes::copy_from_slice(unsafe { std::slice::from_raw_parts(data, len) }),
        };
        let (reply, rx) = oneshot::channel();
        let sent = c.call("tether_send", Cmd::Send { to: to.map(str::to_owned), payload, reply }, rx)?;
        let n = match sent.map_err(link_error)? {
            Sent::Held(n) => n,
            Sent::Now | Sent::Queued => 0,
        };
        if !seq.is_null() {
            // SAFETY: the caller's slot, checked non-NULL.
            unsafe { *seq = n };
        }
        Ok(TETHER_OK)
    })
}

fn subscription(client: *mut tether_client, id: *const c_char, on: bool) -> i32 {
    guard(|| {
        // SAFETY: a client from `tether_client_start`, not freed (the header's rule).
        let c = unsafe { arg_ref(client, "client") }?;
        c.open()?;
        // SAFETY: the caller's string.
        let id = unsafe { arg_str(id, "id") }?;
        check_id(id, "id")?;
        let (reply, rx) = oneshot::channel();
        let what = if on { "tether_subscribe" } else { "tether_unsubscribe" };
        c.call(what, Cmd::Subscribe { ids: vec![id.to_owned()], on, reply }, rx)?.map_err(link_error)?;
        Ok(TETHER_OK)
    })
}

/// Follow the presence of client `id` ("*" for everyone, where the server allows it): `TETHER_EVENT_PRESENCE`
/// events. Kept across reconnects. Thread-safe.
#[no_mangle]
pub unsafe extern "C" fn tether_subscribe(client: *mut tether_client, id: *const c_char) -> i32 {
    subscription(client, id, true)
}

/// Stop following the presence of `id` (an id not followed is not an error). Thread-safe.
#[no_mangle]
pub unsafe extern "C" fn tether_unsubscribe(client: *mut tether_client, id: *const c_char) -> i32 {
    subscription(client, id, false)
}

/// Register `cb` (NULL: none) to be called with `user` when an event becomes available (see `tether_wakeup_fn`),
/// in place of any earlier one; if events are already waiting, it is called once at once, on this thread. A call
/// of the earlier callback already under way on the library's thread may still finish after this returns;
/// after `tether_free` none is made.
#[no_mangle]
pub unsafe extern "C" fn tether_set_wakeup(client: *mut tether_client, cb: tether_wakeup_fn, user: *mut c_void) -> i32 {
    guard(|| {
        // SAFETY: a client from `tether_client_start`, not freed (the header's rule).
        let c = unsafe { arg_ref(client, "client") }?;
        let wakeup = cb.map(|f| Wakeup { f, user });
        c.handoff.set_wakeup(wakeup);
        let waiting = {
            let st = c.handoff.lock();
            !st.queue.is_empty() || st.ended
        };
        if let (Some(w), true) = (wakeup, waiting) {
            w.call();
        }
        Ok(TETHER_OK)
    })
}

/// Say goodbye to the server (if connected) and stop reconnecting, waiting up to `timeout_ms` for it to finish:
/// `TETHER_OK` when it has, `TETHER_TIMEOUT` when it goes on in the background. The events still queued, the last
/// `TETHER_EVENT_DISCONNECTED` among them, can be pulled afterwards, until `TETHER_CLOSED`. Every later call but
/// `tether_next_event`, `tether_set_wakeup` and `tether_free` returns `TETHER_ERR_CLOSED`, and so does a second
/// `tether_close`.
#[no_mangle]
pub unsafe extern "C" fn tether_close(client: *mut tether_client, timeout_ms: u32) -> i32 {
    guard(|| {
        // SAFETY: a client from `tether_client_start`, not freed (the header's rule).
        let c = unsafe { arg_ref(client, "client") }?;
        runtime::not_on_runtime("tether_close")?;
        if c.closed.swap(true, Ordering::AcqRel) {
            return Err(Error::new(TETHER_ERR_CLOSED, "the client is already closed"));
        }
        let (done, rx) = oneshot::channel();
        // Queued by the library's thread, so that the goodbye happens even when the wait below times out first.
        let cmds = c.cmds.clone();
        c.io.spawn(async move {
            let _ = cmds.send(Cmd::Close(done)).await;
        });
        let wait = Duration::from_millis(timeout_ms.into());
        let finished = c.io.block_on(async { tokio::time::timeout(wait, rx).await });
        Ok(if finished.is_ok() { TETHER_OK } else { TETHER_TIMEOUT })
    })
}

/// Free a client (NULL is allowed and does nothing). One not closed is closed first, without waiting: its goodbye
/// goes on in the background (call `tether_close` first to wait for it). No other call on this client may be in
/// progress or come after; the pointers in an event pulled from it are no longer valid.
#[no_mangle]
pub unsafe extern "C" fn tether_free(client: *mut tether_client) {
    if client.is_null() {
        return;
    }
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        // SAFETY: a client from `tether_client_start`, freed once (the header's rule).
        let c = unsafe { Box::from_raw(client) };
        // The task may outlive the handle for its goodbye: it must not call back into a caller that freed it.
        c.handoff.set_wakeup(None);
        if !c.closed.swap(true, Ordering::AcqRel) {
            let (done, _) = oneshot::channel();
            let _ = c.cmds.try_send(Cmd::Close(done));
        }
    }));
}
