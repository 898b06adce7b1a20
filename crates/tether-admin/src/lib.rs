//! The admin listener of a tether server: Prometheus metrics, the `/v1` JSON API, live events over Server-Sent
//! Events, health checks and the dashboard, over a [`tether::ServerHandle`].
//!
//! # Layout
//! - [`start`] is the one call that runs the admin listener for a server: it checks the address's exposure,
//!   binds, records the bound address in the server ([`ServerHandle::admin_addr`]) and serves on a thread of its
//!   own, returning an [`AdminListener`] to read the address from and to stop it by.
//! - [`router`] builds the axum [`Router`] (an embedding application can mount it in its own server);
//!   [`serve`] runs it on a listener, on whatever runtime polls it, with the limits an admin port needs
//!   (connection cap, request deadline, body size, and closing a connection whose event stream was cut off even
//!   when the client does not read). [`start`] is [`bind`], [`ServerHandle::set_admin_addr`], [`router`] and
//!   [`serve`] in that order.
//! - [`prom`] renders the server's metrics snapshot for Prometheus; [`json`] holds every JSON shape, the event
//!   objects of `tether serve --events json` included.
//! - `api`: the handlers. Every error is `{"error": "..."}` with its status.
//!
//! # Isolation
//! The admin layer cannot take the devices' CPU. [`start`] serves on a thread of its own (`tether-admin`), a
//! current-thread tokio runtime that on Linux runs at nice 19: however many admin requests arrive, their work
//! (a 2 MB `/v1/disconnects` answer, a scrape storm) uses at most one core and only what the server's runtime
//! leaves of it. The handlers reach the server through `ServerHandle` alone (atomics, tokio channels, a lock
//! held for a copy), which works from any runtime; the one request that starts a task on the server, `POST
//! /v1/drain`, is run on the runtime `start` was called on (the server's), so the paced goodbyes do not run at the
//! admin thread's priority nor end with the listener.
//!
//! Per request, [`serve`] bounds what a client can hold: headers within [`REQUEST_TIMEOUT`] (also the longest
//! a keep-alive connection stays idle), then the body within as long again (`408` and the connection closed
//! when it is late), at most [`MAX_BODY`] bytes of it (`413`), copied into one buffer as it arrives so that no
//! segmentation of it pins more; answers written within as long again (a connection whose writes make no
//! progress for [`REQUEST_TIMEOUT`], a client reading none of its answers, is closed); at most
//! [`MAX_ADMIN_CONNECTIONS`] connections and [`MAX_EVENT_STREAMS`] event streams at once.
//!
//! The server core knows nothing of HTTP: this crate reads it through `ServerHandle` only, and nothing here runs
//! on a connection's hot path. A scrape reads atomics and takes the session hub's lock once, briefly; the longest
//! hold is a `/v1/sessions` page, which walks the online ids under the hub's lock (0.27 ms at 19,000 sessions).
//!
//! # Security
//! On a non-loopback address the API requires `Authorization: Bearer TOKEN` ([`check_exposure`] refuses to start
//! without a token); tokens are compared in constant time. Requests from another site's page (by `Origin` or
//! `Sec-Fetch-Site`) are refused, and without a token only a `Host` that is an address or `localhost` is served,
//! so neither a web page nor DNS rebinding can use an operator's browser against a loopback listener. `/metrics`, `/healthz` and `/readyz` may be left open
//! for scrapers ([`AdminConfig::open_metrics`]). The dashboard page itself carries no data and is always served;
//! it asks for the token when the API answers 401, and again (saying the token is not valid) on a 403 for a wrong one.

mod api;
pub mod json;
pub mod prom;

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tether::ServerHandle;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, Notify, Semaphore};
use tower::ServiceExt as _;

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
    #[error("cannot start the admin listener's thread: {0}")]
    Thread(io::Error),
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

/// A running admin listener, from [`start`]: where it listens, and how to stop it. Dropping it stops it too,
/// without waiting: its thread ends the open connections and exits on its own.
#[derive(Debug)]
pub struct AdminListener {
    addr: SocketAddr,
    /// Sending (or dropping) it ends the listener's serve loop, and with it the thread.
    stop: Option<oneshot::Sender<()>>,
    /// The listener's thread, joined by [`AdminListener::stop`].
    thread: Option<std::thread::JoinHandle<()>>,
}

impl AdminListener {
    /// The bound address (port 0 resolved), as recorded in the server.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stop accepting admin connections, end the ones open (an event stream included: each holds a
    /// `ServerHandle`, which would keep the server's event stream from ending), and wait for the listener's thread
    /// to exit (on the blocking pool, not on a runtime thread).
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            match tokio::task::spawn_blocking(move || thread.join()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => tracing::error!("the admin listener's thread panicked"),
                Err(e) => tracing::error!("waiting for the admin listener's thread: {e}"),
            }
        }
    }
}

impl Drop for AdminListener {
    fn drop(&mut self) {
        // Dropping the sender ends the serve loop; the thread is left to exit by itself (detached).
        self.stop.take();
    }
}

/// Run the admin listener for the server behind `handle`: refuse a non-loopback `addr` without a token
/// ([`check_exposure`]), bind it, record the bound address in the server ([`ServerHandle::set_admin_addr`]: the
/// `listening` event names it when this comes before `Server::run`, and `/v1/overview` shows it), and serve
/// [`router`] on it with [`serve`]'s limits on a thread of its own: a current-thread tokio runtime at the lowest
/// CPU priority (see the crate docs). A drain started through the API runs its paced goodbyes on the caller's
/// runtime (the server's), not on the admin thread.
pub async fn start(addr: SocketAddr, cfg: AdminConfig, handle: ServerHandle) -> Result<AdminListener, AdminError> {
    let listener = bind(addr, cfg.token.as_deref()).await?;
    let bound = listener.local_addr().map_err(|e| AdminError::Bind(addr, e))?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(AdminError::Thread)?;
    // Move the socket from the caller's runtime to the admin runtime's reactor.
    let listener = listener.into_std().and_then(|l| {
        let _in_rt = rt.enter();
        TcpListener::from_std(l)
    });
    let listener = listener.map_err(|e| AdminError::Bind(addr, e))?;
    handle.set_admin_addr(bound);
    let server_rt = tokio::runtime::Handle::current();
    let app = router(handle, cfg)
        .layer(axum::middleware::from_fn(move |req, next| drain_on_server_runtime(server_rt.clone(), req, next)));
    let (stop, stopped) = oneshot::channel::<()>();
    let thread = std::thread::Builder::new()
        .name("tether-admin".into())
        .spawn(move || {
            lower_this_threads_priority();
            rt.block_on(serve(listener, app, async move {
                let _ = stopped.await;
            }));
            // Dropping the runtime drops every task left: no connection outlives the thread.
            drop(rt);
        })
        .map_err(AdminError::Thread)?;
    Ok(AdminListener { addr: bound, stop: Some(stop), thread: Some(thread) })
}

/// `POST /v1/drain` spawns the paced goodbyes on the runtime it is called from: run that request on the
/// server's runtime, where the goodbyes belong (not at the admin thread's priority, and not ended with the
/// listener).
async fn drain_on_server_runtime(
    server: tokio::runtime::Handle,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    if !(req.method() == axum::http::Method::POST && req.uri().path() == "/v1/drain") {
        return next.run(req).await;
    }
    match server.spawn(next.run(req)).await {
        Ok(res) => res,
        Err(_) => error_response(StatusCode::SERVICE_UNAVAILABLE, "the server is stopping".into()),
    }
}

/// The admin thread runs at the lowest priority, so that admin work (a 2 MB answer, a scrape storm) only gets
/// the CPU the server's own threads leave. Linux: nice 19 for this thread alone (`setpriority` on its thread id),
/// which still gets a small share beside busy nice-0 threads (weight 15 against 1024), so a scrape is answered,
/// slowly, even when the devices keep every core busy. Not `SCHED_IDLE`: its share is a fifth of that (weight 3),
/// and any waking normal thread preempts it at once, which makes it likelier to be preempted while it holds one
/// of the server's locks for a copy (the disconnect history), with a device's task then waiting on that lock.
#[cfg(target_os = "linux")]
fn lower_this_threads_priority() {
    // SAFETY: gettid(2) takes no arguments; setpriority(2) with this thread's own id and a valid priority.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, 19) };
    if rc != 0 {
        tracing::warn!("cannot lower the admin thread's priority: {}", io::Error::last_os_error());
    }
}

/// Elsewhere the admin thread keeps the default priority: it is still one thread, so it takes at most one core.
#[cfg(not(target_os = "linux"))]
fn lower_this_threads_priority() {}

/// State shared by the handlers.
#[derive(Clone)]
pub(crate) struct AppState {
    handle: ServerHandle,
    cfg: Arc<AdminConfig>,
    /// Event streams open now (bounded by [`MAX_EVENT_STREAMS`]).
    streams: Arc<AtomicUsize>,
}

/// The largest request body, in bytes: request bodies are small JSON objects. Larger ones get `413`.
pub const MAX_BODY: usize = 16 * 1024;
/// How long a client has to send a request's headers, and then its body (`408` when the body is late); also the
/// longest a keep-alive connection may stay idle between requests.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Event streams (SSE) served at once; more get 503.
pub const MAX_EVENT_STREAMS: usize = 64;
/// Admin connections served at once; more are closed at once.
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
/// listener's backlog), [`REQUEST_TIMEOUT`] to send request headers (also the most a keep-alive connection stays
/// idle between requests) and as much again for the body, which is read here, frame by frame, into one buffer of
/// at most [`MAX_BODY`] bytes before `app` sees the request. Runs on whatever tokio runtime polls it.
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
        let app = app.clone();
        let killer = kill.clone();
        let svc = hyper::service::service_fn(move |req| respond(app.clone(), killer.clone(), req));
        conns.spawn(async move {
            let _permit = permit;
            let stream = Watched { io: stream, blocked_since: Arc::default() };
            let blocked_since = stream.blocked_since.clone();
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(REQUEST_TIMEOUT)
                .serve_connection(TokioIo::new(stream), svc);
            tokio::select! {
                r = conn => if let Err(e) = r { tracing::debug!("admin connection: {e}") },
                () = kill.0.notified() => {}
                () = write_stalled(blocked_since) => tracing::debug!("admin: a client read nothing for {REQUEST_TIMEOUT:?}; closing it"),
            }
        });
    }
}

/// An admin connection's socket, noting when a write first could not go on (the client does not read and the
/// kernel's send buffer is full) and clearing it at the next write that does: see [`write_stalled`].
struct Watched {
    io: tokio::net::TcpStream,
    blocked_since: Arc<std::sync::Mutex<Option<tokio::time::Instant>>>,
}

impl Watched {
    fn note<T>(&self, r: &std::task::Poll<io::Result<T>>) {
        let mut since = self.blocked_since.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match r {
            std::task::Poll::Pending => {
                since.get_or_insert_with(tokio::time::Instant::now);
            }
            std::task::Poll::Ready(_) => *since = None,
        }
    }
}

impl tokio::io::AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, buf);
        self.note(&r);
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> std::task::Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.note(&r);
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Resolves once a write has been unable to go on for [`REQUEST_TIMEOUT`]: a client that sends requests (or
/// holds an event stream) and reads no answer would otherwise keep its connection slot, and the answers queued
/// for it, for good.
async fn write_stalled(blocked_since: Arc<std::sync::Mutex<Option<tokio::time::Instant>>>) {
    loop {
        let since = *blocked_since.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match since {
            Some(t) if t.elapsed() >= REQUEST_TIMEOUT => return,
            Some(t) => tokio::time::sleep_until(t + REQUEST_TIMEOUT).await,
            None => tokio::time::sleep(REQUEST_TIMEOUT).await,
        }
    }
}

/// One request: its body read within [`REQUEST_TIMEOUT`] and at most [`MAX_BODY`] bytes (else `408` or `413`,
/// and the connection is closed), then `app`'s answer.
async fn respond(app: Router, kill: ConnKill, req: hyper::Request<Incoming>) -> Result<Response, Infallible> {
    let (parts, body) = req.into_parts();
    let body = match tokio::time::timeout(REQUEST_TIMEOUT, read_body(body)).await {
        Ok(Ok(body)) => body,
        Ok(Err(BodyError::TooLarge)) => {
            return Ok(closing(StatusCode::PAYLOAD_TOO_LARGE, format!("the request body is over {MAX_BODY} bytes")))
        }
        Ok(Err(BodyError::Read(e))) => {
            return Ok(closing(StatusCode::BAD_REQUEST, format!("cannot read the request body: {e}")))
        }
        Err(_) => {
            let msg = format!("the request body did not arrive within {}s", REQUEST_TIMEOUT.as_secs());
            return Ok(closing(StatusCode::REQUEST_TIMEOUT, msg));
        }
    };
    let mut req = axum::extract::Request::from_parts(parts, axum::body::Body::from(body));
    req.extensions_mut().insert(kill);
    app.oneshot(req).await
}

/// Why a request body was not read whole.
enum BodyError {
    TooLarge,
    Read(hyper::Error),
}

/// The body, copied frame by frame into one buffer: a frame is dropped as soon as it is copied, so however the
/// client cuts the body up (a byte per TCP segment: each of hyper's chunks would otherwise keep its own read
/// buffer alive), a request holds at most [`MAX_BODY`] bytes plus one frame.
async fn read_body(mut body: Incoming) -> Result<Bytes, BodyError> {
    use hyper::body::Body as _;
    if body.is_end_stream() {
        return Ok(Bytes::new());
    }
    let hint = body.size_hint();
    if hint.lower() > MAX_BODY as u64 {
        return Err(BodyError::TooLarge);
    }
    let mut buf = Vec::with_capacity(hint.exact().unwrap_or(0) as usize);
    while let Some(frame) = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
        let Ok(data) = frame.map_err(BodyError::Read)?.into_data() else { continue };
        if buf.len() + data.len() > MAX_BODY {
            return Err(BodyError::TooLarge);
        }
        buf.extend_from_slice(&data);
    }
    Ok(buf.into())
}

/// An error as the API reports it (`{"error": message}`), closing the connection: a request whose body was
/// not read whole leaves the stream mid-message.
fn closing(status: StatusCode, msg: String) -> Response {
    let mut res = error_response(status, msg);
    res.headers_mut().insert(header::CONNECTION, header::HeaderValue::from_static("close"));
    res
}

fn error_response(status: StatusCode, msg: String) -> Response {
    api::ApiError(status, msg).into_response()
}
