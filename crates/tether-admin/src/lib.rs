//! The admin listener of a tether server: Prometheus metrics, the `/v1` JSON API, live events over Server-Sent
//! Events, health checks and the dashboard, over a [`tether::ServerHandle`].
//!
//! # Layout
//! - [`start`] is the one call that runs the admin listener for a server: it checks the address's exposure,
//!   binds, records the bound address in the server ([`ServerHandle::admin_addr`]) and serves, returning an
//!   [`AdminListener`] to read the address from and to stop it by.
//! - [`router`] builds the axum [`Router`] (an embedding application can mount it in its own server);
//!   [`serve`] runs it on a listener with the limits an admin port needs (connection cap, header timeout, and
//!   closing a connection whose event stream was cut off even when the client does not read). [`start`] is
//!   [`bind`], [`ServerHandle::set_admin_addr`], [`router`] and [`serve`] in that order.
//! - [`prom`] renders the server's metrics snapshot for Prometheus; [`json`] holds every JSON shape, the event
//!   objects of `tether serve --events json` included.
//! - `api`: the handlers. Every error is `{"error": "..."}` with its status.
//!
//! The server core knows nothing of HTTP: this crate reads it through `ServerHandle` only, and nothing here runs
//! on a connection's hot path (a scrape reads atomics and takes the session hub's lock once, briefly).
//!
//! # Security
//! On a non-loopback address the API requires `Authorization: Bearer TOKEN` ([`check_exposure`] refuses to start
//! without a token); tokens are compared in constant time. Requests from another site's page (by `Origin` or
//! `Sec-Fetch-Site`) are refused, and without a token only a `Host` that is an address or `localhost` is served,
//! so neither a web page nor DNS rebinding can use an operator's browser against a loopback listener. `/metrics`, `/healthz` and `/readyz` may be left open
//! for scrapers ([`AdminConfig::open_metrics`]). The dashboard page itself carries no data and is always served;
//! it asks for the token when the API answers 401.

mod api;
pub mod json;
pub mod prom;

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tether::ServerHandle;
use tokio::net::TcpListener;
use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinHandle;

/// How the admin listener behaves.
#[derive(Debug, Clone, Default)]
pub struct AdminConfig {
    /// The bearer token every API request must carry. `None`: no authentication (loopback only).
    pub token: Option<String>,
    /// Serve `/metrics`, `/healthz` and `/readyz` without the token.
    pub open_metrics: bool,
}

/// Why the admin listener will not start.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error(
        "the admin address {0} is not loopback: give a token (--admin-token-file FILE or TETHER_ADMIN_TOKEN), \
         or bind the admin listener to 127.0.0.1"
    )]
    NoToken(SocketAddr),
    #[error("cannot listen for the admin API on {0}: {1}")]
    Bind(SocketAddr, io::Error),
}

/// Refuse an admin listener that anyone on the network could reach without a token.
pub fn check_exposure(addr: SocketAddr, token: Option<&str>) -> Result<(), AdminError> {
    if addr.ip().is_loopback() || token.is_some_and(|t| !t.is_empty()) {
        Ok(())
    } else {
        Err(AdminError::NoToken(addr))
    }
}

/// Bind the admin listener after [`check_exposure`].
pub async fn bind(addr: SocketAddr, token: Option<&str>) -> Result<TcpListener, AdminError> {
    check_exposure(addr, token)?;
    TcpListener::bind(addr).await.map_err(|e| AdminError::Bind(addr, e))
}

/// A running admin listener, from [`start`]: where it listens, and how to stop it. Dropping it leaves the listener
/// running, as dropping a task's `JoinHandle` does.
#[derive(Debug)]
pub struct AdminListener {
    addr: SocketAddr,
    stop: Arc<Notify>,
    task: JoinHandle<()>,
}

impl AdminListener {
    /// The bound address (port 0 resolved), as recorded in the server.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stop accepting admin connections, end the ones open (an event stream included: each holds a
    /// `ServerHandle`, which would keep the server's event stream from ending), and wait for the accept loop to end.
    pub async fn stop(self) {
        self.stop.notify_one();
        let _ = self.task.await;
    }
}

/// Run the admin listener for the server behind `handle`: refuse a non-loopback `addr` without a token
/// ([`check_exposure`]), bind it, record the bound address in the server ([`ServerHandle::set_admin_addr`]: the
/// `listening` event names it when this comes before `Server::run`, and `/v1/overview` shows it), and serve
/// [`router`] on it with [`serve`]'s limits on a task of the current tokio runtime.
pub async fn start(addr: SocketAddr, cfg: AdminConfig, handle: ServerHandle) -> Result<AdminListener, AdminError> {
    let listener = bind(addr, cfg.token.as_deref()).await?;
    let bound = listener.local_addr().map_err(|e| AdminError::Bind(addr, e))?;
    handle.set_admin_addr(bound);
    let stop = Arc::new(Notify::new());
    let app = router(handle, cfg);
    let stopped = stop.clone();
    let task = tokio::spawn(serve(listener, app, async move { stopped.notified().await }));
    Ok(AdminListener { addr: bound, stop, task })
}

/// State shared by the handlers.
#[derive(Clone)]
pub(crate) struct AppState {
    handle: ServerHandle,
    cfg: Arc<AdminConfig>,
    /// Event streams open now (bounded by [`MAX_EVENT_STREAMS`]).
    streams: Arc<AtomicUsize>,
}

/// Event streams (SSE) served at once; more get 503.
pub const MAX_EVENT_STREAMS: usize = 64;
/// Admin connections served at once; more wait in the accept queue.
pub const MAX_ADMIN_CONNECTIONS: usize = 256;
/// Events one stream may fall behind before it is cut off.
pub const EVENT_STREAM_BUFFER: usize = 1024;

/// The admin API, metrics, health checks and dashboard as one router.
pub fn router(handle: ServerHandle, cfg: AdminConfig) -> Router {
    api::routes(AppState { handle, cfg: Arc::new(cfg), streams: Arc::new(AtomicUsize::new(0)) })
}

/// Closes one HTTP connection on request: an event stream cut off for falling behind uses it, since a client
/// that does not read would otherwise keep its connection (and hyper's buffer) forever.
#[derive(Clone, Default)]
pub(crate) struct ConnKill(Arc<Notify>);

impl ConnKill {
    pub(crate) fn kill(&self) {
        self.0.notify_one();
    }
}

/// Serve `app` on `listener` until `shutdown` resolves, then end the connections still open: HTTP/1.1, at most
/// [`MAX_ADMIN_CONNECTIONS`] at once (a connection beyond them is closed at once, so idle ones cannot hold the
/// listener's backlog), 10 s to send request headers.
pub async fn serve(listener: TcpListener, app: Router, shutdown: impl Future<Output = ()>) {
    let slots = Arc::new(Semaphore::new(MAX_ADMIN_CONNECTIONS));
    // Open connections, ended with the listener (dropping the set aborts them); finished ones are reaped as they
    // end, so the set holds at most MAX_ADMIN_CONNECTIONS.
    let mut conns = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, _peer) = tokio::select! {
            () = &mut shutdown => return,
            Some(_) = conns.join_next() => continue,
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!("admin accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tracing::debug!("admin: {MAX_ADMIN_CONNECTIONS} connections open; closing a new one");
            continue;
        };
        let kill = ConnKill::default();
        let svc = TowerToHyperService::new(app.clone().layer(axum::Extension(kill.clone())));
        conns.spawn(async move {
            let _permit = permit;
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), svc);
            tokio::select! {
                r = conn => if let Err(e) = r { tracing::debug!("admin connection: {e}") },
                () = kill.0.notified() => {}
            }
        });
    }
}
