//! `tether_config_*`: what a client is started with.

use std::ffi::c_char;
use std::time::Duration;

use tether_core::reliable::{ReliableConfig, ReliableLink};
use tether_core::{ClientConfig, ClientTls, EventQueue, ResilienceConfig, TrustRoots};

use crate::status::*;

/// A client's settings (opaque). Made by `tether_config_new`, freed by `tether_config_free`; a client started from
/// it keeps its own copy, so the configuration may be changed, reused or freed at once. Not for use by two
/// threads at the same time.
pub struct tether_config {
    pub(crate) servers: Vec<String>,
    pub(crate) client: ClientConfig,
    pub(crate) resilience: ResilienceConfig,
    pub(crate) reliable: Option<ReliableConfig>,
}

/// A configuration for client id `client_id` (1 to 128 bytes of UTF-8), with the library's defaults: the server's
/// heartbeat, reconnecting forever with backoff from 200 ms to 30 s, returning to the primary every 30 s, 1,000
/// sends held while disconnected, 16,384 events waiting for the application. On success `*out` is the new
/// configuration, which the caller frees with `tether_config_free`.
#[no_mangle]
pub unsafe extern "C" fn tether_config_new(client_id: *const c_char, out: *mut *mut tether_config) -> i32 {
    guard(|| {
        if out.is_null() {
            return Err(Error::new(TETHER_ERR_NULL, "out is NULL"));
        }
        // SAFETY: the caller's string, for the call.
        let id = unsafe { arg_str(client_id, "client_id") }?;
        check_id(id, "client_id")?;
        let cfg = tether_config {
            servers: Vec::new(),
            client: ClientConfig::new(id),
            resilience: ResilienceConfig::default(),
            reliable: None,
        };
        // SAFETY: checked non-NULL; the caller's slot.
        unsafe { *out = Box::into_raw(Box::new(cfg)) };
        Ok(TETHER_OK)
    })
}

/// Free a configuration (NULL is allowed and does nothing). Clients started from it are not affected.
#[no_mangle]
pub unsafe extern "C" fn tether_config_free(cfg: *mut tether_config) {
    if !cfg.is_null() {
        // SAFETY: a configuration from `tether_config_new`, freed once (the header's rule).
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| drop(unsafe { Box::from_raw(cfg) })));
    }
}

/// The configuration behind `cfg`, for a setter.
unsafe fn cfg_mut<'a>(cfg: *mut tether_config) -> Result<&'a mut tether_config> {
    // SAFETY: a configuration from `tether_config_new`, used by one thread at a time (the header's rule).
    unsafe { cfg.as_mut() }.ok_or_else(|| Error::new(TETHER_ERR_NULL, "cfg is NULL"))
}

/// Add a server, `host:port` (a name, an IPv4 address, or an IPv6 address in brackets). The first added is the
/// primary; the others are backups, tried in order when the primary fails.
#[no_mangle]
pub unsafe extern "C" fn tether_config_add_server(cfg: *mut tether_config, host_port: *const c_char) -> i32 {
    guard(|| {
        // SAFETY: as the header says.
        let (cfg, server) = unsafe { (cfg_mut(cfg)?, arg_str(host_port, "host_port")?) };
        tether_core::config::check_address(server)
            .map_err(|e| Error::new(TETHER_ERR_INVALID, format!("server {server:?} {e}")))?;
        cfg.servers.push(server.to_owned());
        Ok(TETHER_OK)
    })
}

/// The credential sent in `HELLO` (a token from `tether token`); NULL sends none.
#[no_mangle]
pub unsafe extern "C" fn tether_config_set_token(cfg: *mut tether_config, token: *const c_char) -> i32 {
    guard(|| {
        // SAFETY: as the header says.
        let (cfg, token) = unsafe { (cfg_mut(cfg)?, opt_str(token, "token")?) };
        cfg.client.credential = token.unwrap_or_default().as_bytes().to_vec();
        Ok(TETHER_OK)
    })
}

/// Ask for a heartbeat every `interval_ms` (the server bounds it and answers with the interval and the silence
/// after which either side declares the other dead: see `TETHER_EVENT_CONNECTED`); 0 takes the server's default.
#[no_mangle]
pub unsafe extern "C" fn tether_config_set_heartbeat(cfg: *mut tether_config, interval_ms: u32) -> i32 {
    guard(|| {
        // SAFETY: as the header says.
        let cfg = unsafe { cfg_mut(cfg)? };
        cfg.client.heartbeat_interval = (interval_ms > 0).then(|| Duration::from_millis(interval_ms.into()));
        Ok(TETHER_OK)
    })
}

/// Learn the longest heartbeat the path's NATs allow (the adaptive heartbeat, docs/mobile.md): start each network
/// at `floor_ms`, never ask for more than `ceiling_ms`, stay `margin_percent` below the shortest silence the path
/// failed. Replaces `tether_config_set_heartbeat`. `floor_ms` 0 or above `ceiling_ms` is `TETHER_ERR_INVALID`.
#[no_mangle]
pub unsafe extern "C" fn tether_config_set_adaptive_heartbeat(
    cfg: *mut tether_config,
    floor_ms: u32,
    ceiling_ms: u32,
    margin_percent: u32,
) -> i32 {
    guard(|| {
        // SAFETY: as the header says.
        let cfg = unsafe { cfg_mut(cfg)? };
        if floor_ms == 0 || floor_ms > ceiling_ms || margin_percent > 50 {
            let why = "the adaptive heartbeat needs 0 < floor_ms <= ceiling_ms and margin_percent <= 50";
            return Err(Error::new(TETHER_ERR_INVALID, why));
        }
        let ms = |v: u32| Duration::from_millis(v.into());
        let a = tether_core::AdaptiveConfig {
            floor: ms(floor_ms),
            ceiling: ms(ceiling_ms),
            margin: f64::from(margin_percent) / 100.0,
        };
        cfg.client.adaptive_heartbeat = Some(tether_core::AdaptiveHeartbeat::new(a));
        Ok(TETHER_OK)
    })
}

/// Connect with TLS. `ca_file`: a PEM file of the certificate authorities to trust, or the server's own
/// self-signed certificate to pin it; NULL trusts the system's store. `server_name`: the name to check the
/// certificate against; NULL checks the host each server was given as (or its IP address).
#[no_mangle]
pub unsafe extern "C" fn tether_config_set_tls(
    cfg: *mut tether_config,
    ca_file: *const c_char,
    server_name: *const c_char,
) -> i32 {
    guard(|| {
        // SAFETY: as the header says.
        let (cfg, ca_file, server_name) =
            unsafe { (cfg_mut(cfg)?, opt_str(ca_file, "ca_file")?, opt_str(server_name, "server_name")?) };
        let tls_err = |e: &dyn std::fmt::Display| Error::new(TETHER_ERR_TLS, e.to_string());
        let pem = match ca_file {
            Some(path) => Some(std::fs::read(path).map_err(|e| tls_err(&format!("CA file {path}: {e}")))?),
            None => None,
        };
        let roots = pem.as_deref().map_or(TrustRoots::System, TrustRoots::Pem);
        let mut tls = ClientTls::new(roots, None).map_err(|e| tls_err(&e))?;
        if let Some(name) = server_name {
            tls = tls.with_server_name(name).map_err(|e| tls_err(&e))?;
        }
        cfg.client.tls = Some(tls);
        Ok(TETHER_OK)
    })
}

/// Reconnect policy: the backoff starts at `initial_ms` and doubles (with jitter) up to `max_ms`; give up when
/// `max_attempts` retries in a row have failed (0: never; the first attempt, and the first after a connection
/// was lost, are not counted). `return_to_primary_ms`: while on a backup, try the primary
/// this often and move back when it answers (0: stay until the next reconnect).
#[no_mangle]
pub unsafe extern "C" fn tether_config_set_reconnect(
    cfg: *mut tether_config,
    initial_ms: u32,
    max_ms: u32,
    max_attempts: u32,
    return_to_primary_ms: u32,
) -> i32 {
    guard(|| {
        // SAFETY: as the header says.
        let cfg = unsafe { cfg_mut(cfg)? };
        if initial_ms == 0 || max_ms < initial_ms {
            return Err(Error::new(TETHER_ERR_INVALID, "backoff needs 0 < initial_ms <= max_ms"));
        }
        let r = &mut cfg.resilience.reconnect;
        r.backoff.initial = Duration::from_millis(initial_ms.into());
        r.backoff.max = Duration::from_millis(max_ms.into());
        r.max_attempts = (max_attempts > 0).then_some(max_attempts);
        r.return_to_primary = (return_to_primary_ms > 0).then(|| Duration::from_millis(return_to_primary_ms.into()));
        Ok(TETHER_OK)
    })
}

/// Queues: `held_sends`, the sends held while disconnected (0 refuses sends then; the default is 1,000);
/// `max_events`, the events that may wait for the application (at least 1; the default is 16,384), with at
/// most 16 MiB of payload: beyond either, events are dropped and counted, and the application hears
/// `TETHER_EVENT_DROPPED` with the count. Never dropped: connected, disconnected, gave up, not sent, in doubt,
/// and a reliable session's messages, receipts and acknowledgements (the latest position stands for those it
/// covers). For those, a client whose application stops pulling ends its
/// connection (`slow_consumer`) and reconnects once half the queue was pulled; the session's resume brings what
/// it could not take.
#[no_mangle]
pub unsafe extern "C" fn tether_config_set_queues(cfg: *mut tether_config, held_sends: u32, max_events: u32) -> i32 {
    guard(|| {
        // SAFETY: as the header says.
        let cfg = unsafe { cfg_mut(cfg)? };
        if max_events == 0 {
            return Err(Error::new(TETHER_ERR_INVALID, "max_events must be at least 1"));
        }
        cfg.resilience.queue_limit = held_sends as usize;
        cfg.client.event_queue = EventQueue::Bounded(max_events as usize);
        Ok(TETHER_OK)
    })
}

/// Ask for a reliable session: every message is kept until the server acknowledges it, sent again after a
/// reconnect, and reported (`TETHER_EVENT_ACKED`, `_DELIVERED` with `receipts`, `_NOT_DELIVERED`, `_IN_DOUBT`);
/// messages to this client arrive once and in order across reconnects. `window`: messages sent and not yet
/// acknowledged, at most (0: the default, 10,000); a send beyond it returns `TETHER_ERR_FULL`.
#[no_mangle]
pub unsafe extern "C" fn tether_config_set_reliable(cfg: *mut tether_config, window: u32, receipts: i32) -> i32 {
    guard(|| {
        // SAFETY: as the header says.
        let cfg = unsafe { cfg_mut(cfg)? };
        let mut r = ReliableConfig { receipts: receipts != 0, ..ReliableConfig::default() };
        if window > 0 {
            r.window.messages = window as usize;
        }
        cfg.reliable = Some(r);
        Ok(TETHER_OK)
    })
}

impl tether_config {
    /// A client's own copy: a fresh reliable session for each client started.
    pub(crate) fn for_client(&self) -> (Vec<String>, ClientConfig, ResilienceConfig) {
        let mut client = self.client.clone();
        client.reliable = self.reliable.map(ReliableLink::new);
        (self.servers.clone(), client, self.resilience.clone())
    }
}
