//! Reliable sessions on a server: the `reliable` extension's table of sessions (`tether_proto::reliable::Sessions`)
//! behind one lock, how its decisions reach connections, and the timer that expires offline sessions.
//!
//! # Layout
//! - [`Held`]: the table, the expiry timer's wake-up, and the server application's receipts waiting for an
//!   outcome ([`crate::ServerHandle::send_with_receipt`]).
//! - [`Attached`]: how the table names a connection (its control slot, compared by identity).
//! - [`Held::carry_out`]: what the table asks for after an operation: wake connections that have new items to
//!   send, resolve the application's receipts.
//!
//! # Rules
//! The table's lock comes after the hub's and before a control slot's; it is held for table operations only, and
//! connections are woken after it is released. A single node keeps sessions in memory: a restart loses them, and
//! a resume then says so (`server_restarted`). Cluster nodes keep sessions in Redis instead
//! (`crate::cluster::reliable`), and this table stays empty there.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use tether_proto::reliable::{Effects, HoldConfig, Origin, PushError, Sessions};
use tether_proto::Undeliverable;
use tokio::sync::{oneshot, Notify};

use super::control::Control;

/// Bytes of a session's held items handed to its connection at once; more follow as the connection's output
/// drains below this.
pub(super) const PULL_BUDGET: usize = 64 * 1024;

/// A connection as the table knows it: its control slot, the same connection only if the same slot.
#[derive(Clone)]
pub(super) struct Attached(pub(super) Arc<Control>);

impl PartialEq for Attached {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl std::fmt::Debug for Attached {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Attached({})", self.0.peer)
    }
}

/// What became of a message the server application sent with a receipt: `None` delivered (the client's
/// application took it), or why it never will be.
pub type Delivery = Option<Undeliverable>;

pub(super) struct Held {
    table: Mutex<Sessions<Attached>>,
    /// Wakes the expiry timer (in the server's file) when the next expiry may have moved.
    pub(super) wake: Notify,
    /// The application's messages waiting for their outcome, by the number the table carries for them.
    receipts: Mutex<HashMap<u64, oneshot::Sender<Delivery>>>,
    next_receipt: AtomicU64,
    /// Whether the table has any session: while it has none, a plain relay does not take its lock.
    any: AtomicBool,
}

impl Held {
    /// A table for connections that accept frames up to `max_frame`.
    pub(super) fn new(cfg: HoldConfig, max_frame: u32) -> Held {
        Held {
            table: Mutex::new(Sessions::new(cfg, rand::random()).with_max_frame(max_frame)),
            wake: Notify::new(),
            receipts: Mutex::new(HashMap::new()),
            next_receipt: AtomicU64::new(1),
            any: AtomicBool::new(false),
        }
    }

    /// Record whether `table` (this one's, locked) has sessions; called under its lock after every change of
    /// their number.
    pub(super) fn note_sessions(&self, table: &Sessions<Attached>) {
        self.any.store(table.totals().0 > 0, Ordering::Release);
    }

    /// The table, locked (a panic elsewhere while holding it does not poison it for everyone, as for the hub).
    pub(super) fn table(&self) -> MutexGuard<'_, Sessions<Attached>> {
        self.table.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A receipt for an application message: its number in the table, and the future's other end.
    pub(super) fn new_receipt(&self) -> (u64, oneshot::Receiver<Delivery>) {
        let n = self.next_receipt.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.receipts.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(n, tx);
        (n, rx)
    }

    /// A receipt whose message was never held: forget it.
    pub(super) fn drop_receipt(&self, n: u64) {
        self.receipts.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(&n);
    }

    /// Do what the table asked: wake connections with items to send, resolve the application's receipts. Called
    /// with the table's lock released.
    pub(super) fn carry_out(&self, fx: Effects<Attached>) {
        for a in fx.wake {
            a.0.wake_pull();
        }
        for a in fx.slow {
            a.0.request(super::control::CloseCmd::Abort(tether_proto::CloseReason::SlowConsumer));
        }
        if fx.app.is_empty() {
            return;
        }
        let mut receipts = self.receipts.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for (n, outcome) in fx.app {
            if let Some(tx) = receipts.remove(&n) {
                let _ = tx.send(outcome);
            }
        }
    }

    /// Hold a message from `from` (empty: the server application, with its receipt number) for `client`'s
    /// reliable session, and wake its connection. `Err(payload)` when the client has none (deliver it another
    /// way); `Ok(Err(why))` when its hold is full, or the message too large to send as `SDATA`.
    pub(super) fn push_from(
        &self,
        client: &str,
        from: &str,
        payload: Bytes,
        receipt: Option<u64>,
    ) -> Result<Result<(), Undeliverable>, Bytes> {
        if !self.any.load(Ordering::Acquire) {
            return Err(payload);
        }
        let origin = receipt.map(Origin::App);
        let pushed = {
            let mut table = self.table();
            // Asked first, so that the payload is handed over, not copied, and comes back when there is none.
            if !table.contains(client) {
                return Err(payload);
            }
            table.push(client, from, payload, origin)
        };
        match pushed {
            Ok(wake) => {
                if let Some(a) = wake {
                    a.0.wake_pull();
                }
                Ok(Ok(()))
            }
            Err(PushError::Full) => Ok(Err(Undeliverable::HoldFull)),
            Err(PushError::TooLarge) => Ok(Err(Undeliverable::TooLarge)),
            // Not under the same lock as `contains`: cannot happen.
            Err(PushError::NoSession) => Ok(Err(Undeliverable::NotOnline)),
        }
    }
}
