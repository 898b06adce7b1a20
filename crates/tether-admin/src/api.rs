//! The admin API's handlers: `/v1/*`, `/metrics`, `/healthz`, `/readyz` and the dashboard at `/`.
//!
//! # Layout
//! [`routes`] wires paths to handlers behind the request checks ([`authorize`]: duplicate `Host`, other sites'
//! pages, DNS rebinding, the token). Each route is declared with the query parameters it takes ([`Routes::at`]),
//! and a parameter it does not take is refused before its handler runs. Query strings are parsed by hand from a
//! map so that a bad value gets a JSON 400 naming the parameter (axum's own rejection is plain text). Handlers
//! only call `ServerHandle` methods, which never block: the session hub's lock is held for a copy at most.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post, MethodRouter};
use axum::{Extension, Json, Router};
use serde_json::json;
use subtle::ConstantTimeEq;
use tether::{CloseReason, KickError};

use crate::json::{
    disconnect_json, drain_json, event_json, hold_json, kernel_json, overview_json, probe_json, rfc3339, session_json,
};
use crate::{AppState, ConnKill, EVENT_STREAM_BUFFER, MAX_BODY, MAX_EVENT_STREAMS};

const DASHBOARD: &str = include_str!("dashboard.html");

/// An error as the API reports it: `{"error": message}` with a status.
pub(crate) struct ApiError(pub(crate) StatusCode, pub(crate) String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

fn not_online(id: &str) -> ApiError {
    ApiError(StatusCode::NOT_FOUND, format!("client {id} is not online"))
}

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, msg.into())
}

type Params = Query<HashMap<String, String>>;

/// The query parameters one route takes.
type Known = &'static [&'static str];

/// A router under construction whose every route says which query parameters it takes.
struct Routes(Router<AppState>);

impl Routes {
    /// Route `path` to `handlers`, refusing any query parameter but `known` before they run ([`known_params`]).
    fn at(self, path: &str, known: Known, handlers: MethodRouter<AppState>) -> Routes {
        Routes(self.0.route(path, handlers.layer(middleware::from_fn_with_state(known, known_params))))
    }
}

pub(crate) fn routes(state: AppState) -> Router {
    Routes(Router::new())
        .at("/", &[], get(dashboard))
        .at("/metrics", &[], get(metrics))
        .at("/healthz", &[], get(healthz))
        .at("/readyz", &[], get(readyz))
        .at("/v1/overview", &[], get(overview))
        .at("/v1/sessions", &["prefix", "limit", "after"], get(sessions))
        .at("/v1/sessions/{id}", &[], get(session))
        .at("/v1/sessions/{id}/kick", &[], post(kick))
        .at("/v1/sessions/{id}/probe", &[], post(probe))
        .at("/v1/disconnects", &["reason", "limit"], get(disconnects))
        .at("/v1/events", &["snapshots"], get(events))
        .at("/v1/drain", &[], get(drain_status).post(drain).delete(undrain))
        .at("/v1/cluster", &[], get(cluster))
        .0
        .fallback(|| async { ApiError(StatusCode::NOT_FOUND, "no such endpoint".into()) })
        .method_not_allowed_fallback(|| async {
            ApiError(StatusCode::METHOD_NOT_ALLOWED, "this endpoint does not take that method".into())
        })
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(middleware::map_response(json_errors))
        .layer(middleware::from_fn_with_state(state.clone(), authorize))
        .with_state(state)
}

/// What `/metrics` is: `prometheus-client` encodes the OpenMetrics text format (`# EOF` last, `_total` counters).
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A route's gate: a query parameter the route does not take is a 400 naming it, before anything is done.
async fn known_params(State(known): State<Known>, req: Request, next: Next) -> Response {
    let checked = match Params::try_from_uri(req.uri()) {
        Ok(Query(q)) => only_known(&q, known),
        Err(e) => Err(bad(format!("the query string is not valid: {}", e.body_text()))),
    };
    match checked {
        Ok(()) => next.run(req).await,
        Err(e) => e.into_response(),
    }
}

/// Errors produced outside the handlers (an extractor's rejection, an oversized body) become JSON too.
async fn json_errors(res: Response) -> Response {
    let is_json = res
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if res.status().as_u16() < 400 || is_json {
        return res;
    }
    let status = res.status();
    let body = axum::body::to_bytes(res.into_body(), 4096).await.unwrap_or_default();
    let text = String::from_utf8_lossy(&body).trim().to_owned();
    let msg = if text.is_empty() { status.canonical_reason().unwrap_or("error").to_owned() } else { text };
    ApiError(status, msg).into_response()
}

/// Whether `host` (a `Host` header: name or address, maybe with a port) names this machine by address or as
/// `localhost`: anything else reaching a listener without a token is a DNS-rebinding page.
fn local_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(h, _)| h),
    };
    name.eq_ignore_ascii_case("localhost") || name.parse::<std::net::IpAddr>().is_ok()
}

fn sha256(b: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(b).into()
}

/// The host a request names: the authority of an absolute-form target (`GET http://host/path`), which
/// overrides `Host` (RFC 9112, section 3.2.2), userinfo left out; otherwise its `Host`.
fn named_host<'a>(req: &'a Request, host_header: Option<&'a str>) -> &'a str {
    match req.uri().authority() {
        Some(a) => a.as_str().rsplit_once('@').map_or(a.as_str(), |(_, host)| host),
        None => host_header.unwrap_or(""),
    }
}

/// First the request itself: more than one `Host` is a 400 (RFC 9112, section 3.2: which one a proxy believed is
/// unknowable). Then browsers: a request another site's page makes (its `Origin` is not the host the request
/// names, or the browser says `Sec-Fetch-Site: cross-site`) is refused, so a page cannot drain or kick through an
/// operator's browser; and without a token only a host that is an address or `localhost` is served (DNS
/// rebinding), judged by [`named_host`]. Then the bearer token: 401 without credentials, 403 with a wrong one
/// (compared as SHA-256 digests in constant time, so neither its bytes nor its length leak through timing),
/// marked `WWW-Authenticate: Bearer error="invalid_token"` so that the dashboard asks for another.
async fn authorize(State(st): State<AppState>, headers: HeaderMap, req: Request, next: Next) -> Response {
    if headers.get_all(header::HOST).iter().nth(1).is_some() {
        return bad("more than one Host header").into_response();
    }
    // RFC 9112, section 3.2: an HTTP/1.1 request without Host is a 400 (HTTP/1.0 may omit it).
    if !headers.contains_key(header::HOST) && req.version() == axum::http::Version::HTTP_11 {
        return bad("an HTTP/1.1 request needs a Host header").into_response();
    }
    let header = |name: header::HeaderName| headers.get(name).and_then(|v| v.to_str().ok());
    let host = named_host(&req, header(header::HOST));
    let cross_origin = header(header::ORIGIN)
        .is_some_and(|o| o.split_once("://").is_none_or(|(_, authority)| !authority.eq_ignore_ascii_case(host)));
    let cross_site = headers.get("sec-fetch-site").is_some_and(|v| v.as_bytes() == b"cross-site");
    if cross_origin || cross_site {
        return ApiError(StatusCode::FORBIDDEN, "requests from another site's page are refused".into()).into_response();
    }
    let Some(token) = st.cfg.token.as_deref().filter(|t| !t.is_empty()) else {
        if !local_host(host) {
            let named = if req.uri().authority().is_some() { "the request line's host" } else { "Host" };
            let msg =
                format!("{named} {host:?} is not this machine's address; without a token only addresses are served");
            return ApiError(StatusCode::FORBIDDEN, msg).into_response();
        }
        return next.run(req).await;
    };
    let path = req.uri().path();
    let open = path == "/" || (st.cfg.open_metrics && matches!(path, "/metrics" | "/healthz" | "/readyz"));
    if open {
        return next.run(req).await;
    }
    let given = header(header::AUTHORIZATION)
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, t)| t.trim());
    match given {
        None => {
            let mut r =
                ApiError(StatusCode::UNAUTHORIZED, "a bearer token is required (Authorization: Bearer TOKEN)".into())
                    .into_response();
            r.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
            r
        }
        Some(g) if bool::from(sha256(g.as_bytes()).ct_eq(&sha256(token.as_bytes()))) => next.run(req).await,
        Some(_) => {
            let mut r = ApiError(StatusCode::FORBIDDEN, "the bearer token is not valid".into()).into_response();
            let invalid = header::HeaderValue::from_static("Bearer error=\"invalid_token\"");
            r.headers_mut().insert(header::WWW_AUTHENTICATE, invalid);
            r
        }
    }
}

async fn dashboard() -> impl IntoResponse {
    ([(header::CACHE_CONTROL, "no-store")], Html(DASHBOARD))
}

async fn metrics(State(st): State<AppState>) -> Response {
    match crate::prom::render(&st.handle) {
        Ok(body) => ([(header::CONTENT_TYPE, OPENMETRICS)], body).into_response(),
        Err(_) => ApiError(StatusCode::INTERNAL_SERVER_ERROR, "metrics encoding failed".into()).into_response(),
    }
}

async fn healthz() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok" }))
}

async fn readyz(State(st): State<AppState>) -> Response {
    if st.handle.is_ready() {
        Json(json!({ "ready": true })).into_response()
    } else {
        let why = if st.handle.drain_status().draining { "draining" } else { "shutting down" };
        (StatusCode::SERVICE_UNAVAILABLE, Json(json!({ "ready": false, "reason": why }))).into_response()
    }
}

fn server_json(st: &AppState) -> serde_json::Value {
    let uptime = st.handle.started().elapsed().unwrap_or_default();
    json!({
        "listen": st.handle.local_addr().to_string(), "admin": st.handle.admin_addr().map(|a| a.to_string()),
        "server_id": st.handle.server_id(), "started": rfc3339(st.handle.started()),
        "uptime_s": uptime.as_secs_f64(), "draining": !st.handle.is_ready(),
    })
}

async fn overview(State(st): State<AppState>) -> Json<serde_json::Value> {
    Json(overview_json(&st.handle.metrics(), server_json(&st)))
}

/// Cluster mode: this node's view and the node table from Redis.
async fn cluster(State(st): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    let snap = st.handle.metrics().cluster.ok_or_else(|| {
        ApiError(StatusCode::NOT_FOUND, "this server is a single node (start it with --cluster)".into())
    })?;
    let nodes = st.handle.cluster_nodes().await.unwrap_or_else(|| Ok(Vec::new()));
    Ok(Json(crate::json::cluster_json(&snap, nodes)))
}

/// `limit` from the query: `default` when absent, 1..=`max`.
fn limit(q: &HashMap<String, String>, default: usize, max: usize) -> Result<usize, ApiError> {
    match q.get("limit") {
        None => Ok(default),
        Some(v) => match v.parse::<usize>() {
            Ok(n) if (1..=max).contains(&n) => Ok(n),
            _ => Err(bad(format!("limit must be a whole number from 1 to {max}, not {v:?}"))),
        },
    }
}

fn only_known(q: &HashMap<String, String>, known: &[&str]) -> Result<(), ApiError> {
    match q.keys().find(|k| !known.contains(&k.as_str())) {
        Some(k) if known.is_empty() => Err(bad(format!("unknown query parameter {k:?} (this endpoint takes none)"))),
        Some(k) => Err(bad(format!("unknown query parameter {k:?} (known: {})", known.join(", ")))),
        None => Ok(()),
    }
}

async fn sessions(State(st): State<AppState>, Query(q): Params) -> Result<Json<serde_json::Value>, ApiError> {
    let limit = limit(&q, 100, 1000)?;
    let prefix = q.get("prefix").map_or("", String::as_str);
    let after = q.get("after").map(String::as_str);
    let page = st.handle.sessions(prefix, after, limit);
    // The cursor for the next page: the last id of a full page.
    let next = (page.len() == limit).then(|| page.last().map(|s| s.client.clone())).flatten();
    let list: Vec<_> = page.iter().map(session_json).collect();
    Ok(Json(json!({ "sessions": list, "next": next })))
}

/// One session: online, with the kernel's view of its socket; or offline but holding messages for a resume (a
/// reliable session), with `session` and `kernel` null. 404 when neither.
async fn session(State(st): State<AppState>, Path(id): Path<String>) -> Result<Json<serde_json::Value>, ApiError> {
    let hold = st.handle.hold_anywhere(&id).await;
    let online = st.handle.session(&id);
    if online.is_none() && hold.is_none() {
        return Err(not_online(&id));
    }
    let (info, kernel) = online.unzip();
    Ok(Json(json!({
        "session": info.as_ref().map(session_json),
        "kernel": kernel.flatten().as_ref().map(kernel_json),
        "hold": hold.as_ref().map(hold_json),
    })))
}

/// A duration from JSON: a number of milliseconds, or a string such as `"30s"` or `"1m 30s"`.
fn duration_field(v: Option<&serde_json::Value>, name: &str) -> Result<Option<Duration>, ApiError> {
    match v {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::Number(n)) => n
            .as_u64()
            .map(|ms| Some(Duration::from_millis(ms)))
            .ok_or_else(|| bad(format!("{name} must be a whole number of milliseconds or a string like \"30s\""))),
        Some(serde_json::Value::String(s)) => humantime::parse_duration(s)
            .map(Some)
            .map_err(|e| bad(format!("{name}: {e} (write it like \"30s\" or \"500ms\")"))),
        Some(_) => Err(bad(format!("{name} must be a number of milliseconds or a string like \"30s\""))),
    }
}

/// An optional JSON object body (empty means `{}`) with no fields but `known`.
fn json_body(body: &[u8], known: &[&str]) -> Result<serde_json::Map<String, serde_json::Value>, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(serde_json::Map::new());
    }
    let map = match serde_json::from_slice(body) {
        Ok(serde_json::Value::Object(m)) => m,
        Ok(_) => return Err(bad("the body must be a JSON object")),
        Err(e) => return Err(bad(format!("the body is not valid JSON: {e}"))),
    };
    match map.keys().find(|k| !known.contains(&k.as_str())) {
        Some(k) => Err(bad(format!("unknown field {k:?} (known: {})", known.join(", ")))),
        None => Ok(map),
    }
}

/// `BYE` carries retry-after in milliseconds as a u32.
const MAX_RETRY_AFTER: Duration = Duration::from_millis(u32::MAX as u64);

async fn kick(
    State(st): State<AppState>,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    let body = json_body(&body, &["retry_after"])?;
    let retry = duration_field(body.get("retry_after"), "retry_after")?.unwrap_or_default();
    if retry > MAX_RETRY_AFTER {
        return Err(bad("retry_after is at most 49 days (a u32 of milliseconds)"));
    }
    match st.handle.kick_with(&id, retry) {
        Ok(()) => Ok(Json(json!({ "kicked": id, "retry_after_ms": retry.as_millis() as u64 }))),
        Err(KickError::Offline(_)) => Err(not_online(&id)),
        Err(e @ KickError::Leaving(_)) => Err(ApiError(StatusCode::CONFLICT, e.to_string())),
    }
}

/// Ping one client now and say whether the network or its program is slow: `{"timeout": "2s"}` at most 30 s.
async fn probe(
    State(st): State<AppState>,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    let body = json_body(&body, &["timeout"])?;
    let wait = duration_field(body.get("timeout"), "timeout")?.unwrap_or(Duration::from_secs(2));
    if wait.is_zero() || wait > Duration::from_secs(30) {
        return Err(bad("timeout is more than zero and at most 30 s"));
    }
    let report = st.handle.probe(&id, wait).await.ok_or_else(|| not_online(&id))?;
    Ok(Json(probe_json(&report)))
}

async fn disconnects(State(st): State<AppState>, Query(q): Params) -> Result<Json<serde_json::Value>, ApiError> {
    let limit = limit(&q, 100, 10_000)?;
    let reason = match q.get("reason").map(String::as_str) {
        None | Some("") => None,
        Some(r) => Some(CloseReason::from_name(r).ok_or_else(|| {
            let names: Vec<&str> = CloseReason::ALL.iter().map(|r| r.as_str()).collect();
            bad(format!("unknown reason {r:?} (known: {})", names.join(", ")))
        })?),
    };
    let list: Vec<_> = st.handle.disconnects(reason, limit).iter().map(|r| disconnect_json(r)).collect();
    Ok(Json(json!({ "disconnects": list })))
}

async fn drain_status(State(st): State<AppState>) -> Json<serde_json::Value> {
    Json(drain_json(&st.handle.drain_status()))
}

async fn drain(State(st): State<AppState>, body: axum::body::Bytes) -> Result<Response, ApiError> {
    let body = json_body(&body, &["redirect", "spread"])?;
    let redirect = match body.get("redirect") {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::String(s)) => {
            tether::config::check_address(s).map_err(|what| bad(format!("redirect {s:?} {what}")))?;
            Some(s.clone())
        }
        Some(v) => return Err(bad(format!("redirect must be a string like \"host:7400\", not {v}"))),
    };
    let spread = duration_field(body.get("spread"), "spread")?.unwrap_or(Duration::from_secs(30));
    if spread > Duration::from_secs(3600) {
        return Err(bad("spread is at most 1 hour"));
    }
    match st.handle.drain(redirect, spread) {
        Ok(status) => Ok((StatusCode::ACCEPTED, Json(drain_json(&status))).into_response()),
        Err(e) => Err(ApiError(StatusCode::CONFLICT, e.to_string())),
    }
}

async fn undrain(State(st): State<AppState>) -> Json<serde_json::Value> {
    Json(drain_json(&st.handle.undrain()))
}

/// How long a cut-off stream's client has to read what was queued for it before its connection is closed.
const CUT_GRACE: Duration = Duration::from_secs(5);

/// Ends a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Releases an event-stream slot when the stream ends, however it ends.
struct StreamSlot(std::sync::Arc<std::sync::atomic::AtomicUsize>);

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The live event stream: each server event as one SSE message (the `--events json` object), and with
/// `snapshots=1` an `event: snapshot` message with the overview every second. A stream that falls
/// [`EVENT_STREAM_BUFFER`] events behind gets `event: cut` (if it still reads) and its connection is closed.
async fn events(
    State(st): State<AppState>,
    kill: Option<Extension<ConnKill>>,
    Query(q): Params,
) -> Result<Response, ApiError> {
    let snapshots = match q.get("snapshots").map(String::as_str) {
        None | Some("0") | Some("false") => false,
        Some("1") | Some("true") => true,
        Some(v) => return Err(bad(format!("snapshots must be 1 or 0, not {v:?}"))),
    };
    if st.streams.fetch_add(1, Ordering::Relaxed) >= MAX_EVENT_STREAMS {
        st.streams.fetch_sub(1, Ordering::Relaxed);
        return Err(ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("at most {MAX_EVENT_STREAMS} event streams at once"),
        ));
    }
    let slot = StreamSlot(st.streams.clone());
    let watch = st.handle.watch_events(EVENT_STREAM_BUFFER);
    // A stream cut off for falling behind: a client still reading gets the queued events and `event: cut`
    // within the grace; one that does not read has its connection closed then. The watchdog ends with the
    // stream.
    let watchdog = kill.map(|Extension(kill)| {
        let cut = watch.cut_off();
        AbortOnDrop(tokio::spawn(async move {
            cut.await;
            tokio::time::sleep(CUT_GRACE).await;
            kill.kill();
        }))
    });
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    struct S {
        st: AppState,
        watch: tether::EventWatch,
        tick: tokio::time::Interval,
        snapshots: bool,
        done: bool,
        _slot: StreamSlot,
        _watchdog: Option<AbortOnDrop>,
    }
    let init = S { st, watch, tick, snapshots, done: false, _slot: slot, _watchdog: watchdog };
    let stream = futures_util::stream::unfold(init, |mut s| async move {
        if s.done {
            return None;
        }
        let msg = tokio::select! {
            ev = s.watch.recv() => match ev {
                Some(ev) => SseEvent::default().data(event_json(&ev).to_string()),
                None => {
                    s.done = true;
                    let why = if s.watch.is_cut() { "fell behind" } else { "server stopped" };
                    SseEvent::default().event("cut").data(json!({ "reason": why }).to_string())
                }
            },
            _ = s.tick.tick(), if s.snapshots => {
                let started = Instant::now();
                let v = overview_json(&s.st.handle.metrics(), server_json(&s.st));
                tracing::trace!("snapshot in {:?}", started.elapsed());
                SseEvent::default().event("snapshot").data(v.to_string())
            }
        };
        Some((Ok::<_, Infallible>(msg), s))
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()).into_response())
}
