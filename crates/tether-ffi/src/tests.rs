use std::ffi::{CStr, CString};
use std::ptr;

use super::*;

/// The header as cbindgen makes it from this crate now.
fn generated() -> String {
    let dir = env!("CARGO_MANIFEST_DIR");
    let config = cbindgen::Config::from_file(format!("{dir}/cbindgen.toml")).expect("cbindgen.toml");
    let mut out = Vec::new();
    cbindgen::Builder::new()
        .with_crate(dir)
        .with_config(config)
        .generate()
        .expect("cbindgen generates the header")
        .write(&mut out);
    c89(&String::from_utf8(out).expect("UTF-8"))
}

/// cbindgen's output made C89-clean: its `//` comments become `/* */`, and negative constants are parenthesized.
fn c89(header: &str) -> String {
    let mut out = String::with_capacity(header.len());
    for line in header.lines() {
        let line = match line.split_once("  // ").or_else(|| line.split_once(" // ")) {
            Some((code, comment)) if code.starts_with('#') || code.starts_with('}') => {
                format!("{code} /* {comment} */")
            }
            _ => line.to_owned(),
        };
        let line = match line.strip_prefix("#define ").and_then(|r| r.split_once(' ')) {
            Some((name, value)) if value.starts_with('-') => format!("#define {name} ({value})"),
            _ => line,
        };
        out.push_str(&line);
        out.push('\n');
    }
    out
}

#[test]
fn the_header_is_current() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tether.h");
    let now = generated();
    if std::env::var_os("TETHER_BLESS").is_some() {
        std::fs::write(path, &now).expect("write tether.h");
        return;
    }
    let checked_in = std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        checked_in == now,
        "crates/tether-ffi/tether.h is stale: the ABI changed. Rewrite it with `TETHER_BLESS=1 cargo test -p \
         tether-ffi the_header_is_current` and commit it"
    );
}

fn last_error() -> String {
    // SAFETY: the library's string, valid until the next failing call on this thread.
    unsafe { CStr::from_ptr(tether_last_error()) }.to_string_lossy().into_owned()
}

/// A configuration for `id` with one server that nothing listens on (a port just released).
fn config(id: &str) -> *mut tether_config {
    let mut cfg = ptr::null_mut();
    let id = CString::new(id).unwrap();
    // SAFETY: valid arguments.
    assert_eq!(unsafe { tether_config_new(id.as_ptr(), &mut cfg) }, TETHER_OK);
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let server = CString::new(format!("127.0.0.1:{port}")).unwrap();
    // SAFETY: valid arguments.
    assert_eq!(unsafe { tether_config_add_server(cfg, server.as_ptr()) }, TETHER_OK);
    cfg
}

#[test]
fn bad_arguments_are_errors_with_a_message() {
    let mut cfg = ptr::null_mut();
    // SAFETY: the library's contract is tested with the arguments it must refuse.
    unsafe {
        assert_eq!(tether_config_new(ptr::null(), &mut cfg), TETHER_ERR_NULL);
        assert_eq!(last_error(), "client_id is NULL");
        let bad = [0x66u8, 0xff, 0];
        assert_eq!(tether_config_new(bad.as_ptr().cast(), &mut cfg), TETHER_ERR_UTF8);
        assert!(last_error().starts_with("client_id is not valid UTF-8"), "{}", last_error());
        let long = CString::new("x".repeat(129)).unwrap();
        assert_eq!(tether_config_new(long.as_ptr(), &mut cfg), TETHER_ERR_INVALID);
        assert_eq!(last_error(), "client_id must be 1 to 128 bytes, got 129");
        assert!(cfg.is_null());
        let id = CString::new("x".repeat(128)).unwrap();
        assert_eq!(tether_config_new(id.as_ptr(), ptr::null_mut()), TETHER_ERR_NULL);

        let cfg = config("alice");
        let scheme = CString::new("tcp://127.0.0.1:1").unwrap();
        assert_eq!(tether_config_add_server(cfg, scheme.as_ptr()), TETHER_ERR_INVALID);
        assert!(last_error().contains("tcp://"), "{}", last_error());
        let missing = CString::new("/nonexistent/ca.pem").unwrap();
        assert_eq!(tether_config_set_tls(cfg, missing.as_ptr(), ptr::null()), TETHER_ERR_TLS);
        assert!(last_error().contains("/nonexistent/ca.pem"), "{}", last_error());
        assert_eq!(tether_config_set_reconnect(cfg, 0, 10, 0, 0), TETHER_ERR_INVALID);
        assert_eq!(tether_config_set_queues(cfg, 10, 0), TETHER_ERR_INVALID);
        assert_eq!(tether_config_set_heartbeat(ptr::null_mut(), 1000), TETHER_ERR_NULL);
        assert_eq!(tether_config_set_adaptive_heartbeat(cfg, 0, 1000, 10), TETHER_ERR_INVALID);
        assert_eq!(tether_config_set_adaptive_heartbeat(cfg, 2000, 1000, 10), TETHER_ERR_INVALID);
        assert_eq!(tether_config_set_adaptive_heartbeat(cfg, 1000, 2000, 51), TETHER_ERR_INVALID);
        assert!(last_error().contains("floor_ms"), "{}", last_error());
        assert_eq!(tether_config_set_adaptive_heartbeat(ptr::null_mut(), 1000, 2000, 10), TETHER_ERR_NULL);

        let empty = {
            let mut c = ptr::null_mut();
            let id = CString::new("bob").unwrap();
            assert_eq!(tether_config_new(id.as_ptr(), &mut c), TETHER_OK);
            c
        };
        let mut client = ptr::null_mut();
        assert_eq!(tether_client_start(empty, &mut client), TETHER_ERR_INVALID);
        assert!(last_error().starts_with("no server"), "{}", last_error());
        tether_config_free(empty);
        tether_config_free(cfg);
        tether_config_free(ptr::null_mut());
    }
}

#[test]
fn a_closed_client_refuses_calls_and_a_second_close_and_ends_its_events() {
    let cfg = config("carol");
    let mut client = ptr::null_mut();
    // SAFETY: the library's contract, with valid and invalid arguments.
    unsafe {
        assert_eq!(tether_config_set_reconnect(cfg, 50, 100, 0, 0), TETHER_OK);
        assert_eq!(tether_client_start(cfg, &mut client), TETHER_OK);
        tether_config_free(cfg);
        let to = CString::new("dave").unwrap();
        let big = vec![0u8; 2 << 20];
        assert_eq!(tether_send(client, to.as_ptr(), big.as_ptr(), big.len(), ptr::null_mut()), TETHER_ERR_TOO_LARGE);
        assert_eq!(tether_send(client, to.as_ptr(), ptr::null(), 5, ptr::null_mut()), TETHER_ERR_NULL);
        let long = CString::new("y".repeat(129)).unwrap();
        assert_eq!(tether_send(client, long.as_ptr(), b"hi".as_ptr(), 2, ptr::null_mut()), TETHER_ERR_INVALID);
        assert_eq!(tether_subscribe(client, long.as_ptr()), TETHER_ERR_INVALID);
        // Disconnected (nothing listens): held for the next connection.
        let mut seq = 7;
        assert_eq!(tether_send(client, to.as_ptr(), b"hi".as_ptr(), 2, &mut seq), TETHER_OK);
        assert_eq!(seq, 0);
        let mut ev = std::mem::zeroed::<tether_event>();
        assert_eq!(tether_next_event(client, -2, &mut ev), TETHER_ERR_INVALID);
        assert_eq!(tether_next_event(client, 0, ptr::null_mut()), TETHER_ERR_NULL);
        // The connection attempt to a closed port fails and is reported.
        let mut failed = false;
        for _ in 0..100 {
            if tether_next_event(client, 100, &mut ev) == TETHER_OK && ev.kind == TETHER_EVENT_CONNECT_FAILED {
                failed = true;
                assert_ne!(CStr::from_ptr(ev.server).to_bytes(), b"");
                break;
            }
        }
        assert!(failed, "no TETHER_EVENT_CONNECT_FAILED");

        assert_eq!(tether_close(client, 2000), TETHER_OK);
        assert_eq!(tether_close(client, 2000), TETHER_ERR_CLOSED);
        assert_eq!(last_error(), "the client is already closed");
        assert_eq!(tether_send(client, to.as_ptr(), b"hi".as_ptr(), 2, ptr::null_mut()), TETHER_ERR_CLOSED);
        assert_eq!(tether_subscribe(client, to.as_ptr()), TETHER_ERR_CLOSED);
        let mut end = TETHER_OK;
        for _ in 0..1000 {
            end = tether_next_event(client, 1000, &mut ev);
            if end != TETHER_OK {
                break;
            }
        }
        assert_eq!(end, TETHER_CLOSED);
        assert_eq!(tether_next_event(client, 0, &mut ev), TETHER_CLOSED);
        tether_free(client);
        tether_free(ptr::null_mut());
    }
}

#[test]
fn a_client_that_gives_up_ends_its_events() {
    let cfg = config("erin");
    let mut client = ptr::null_mut();
    // SAFETY: valid arguments.
    unsafe {
        assert_eq!(tether_config_set_reconnect(cfg, 10, 20, 1, 0), TETHER_OK);
        assert_eq!(tether_client_start(cfg, &mut client), TETHER_OK);
        tether_config_free(cfg);
        let mut ev = std::mem::zeroed::<tether_event>();
        let mut kinds = Vec::new();
        let end = loop {
            match tether_next_event(client, 5000, &mut ev) {
                TETHER_OK => kinds.push(ev.kind),
                other => break other,
            }
        };
        assert_eq!(end, TETHER_CLOSED, "events: {kinds:?}");
        assert_eq!(kinds.last(), Some(&TETHER_EVENT_GAVE_UP), "{kinds:?}");
        let to = CString::new("x").unwrap();
        assert_eq!(tether_send(client, to.as_ptr(), ptr::null(), 0, ptr::null_mut()), TETHER_ERR_CLOSED);
        assert_eq!(tether_subscribe(client, to.as_ptr()), TETHER_ERR_CLOSED);
        assert_eq!(last_error(), "the client gave up reconnecting");
        tether_free(client);
    }
}

/// Against a real server on loopback: each interval the adaptive heartbeat asks for and the server grants is a
/// `TETHER_EVENT_HEARTBEAT`, with the timeout the server keeps from then on.
#[test]
fn the_adaptive_heartbeat_reports_each_granted_interval() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (addr, stop) = rt.block_on(async {
        let mut cfg = tether_core::ServerConfig { listen: "127.0.0.1:0".parse().unwrap(), ..Default::default() };
        cfg.heartbeat.interval = std::time::Duration::from_millis(100);
        cfg.heartbeat.timeout = std::time::Duration::from_millis(300);
        let server = tether_core::Server::bind(cfg).await.unwrap();
        let addr = server.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(server.run(async move {
            let _ = stopped.await;
        }));
        (addr, stop)
    });
    let mut cfg = ptr::null_mut();
    let (id, server) = (CString::new("frank").unwrap(), CString::new(addr.to_string()).unwrap());
    let mut client = ptr::null_mut();
    // SAFETY: valid arguments.
    unsafe {
        assert_eq!(tether_config_new(id.as_ptr(), &mut cfg), TETHER_OK);
        assert_eq!(tether_config_add_server(cfg, server.as_ptr()), TETHER_OK);
        assert_eq!(tether_config_set_adaptive_heartbeat(cfg, 100, 400, 10), TETHER_OK);
        assert_eq!(tether_client_start(cfg, &mut client), TETHER_OK);
        tether_config_free(cfg);
        let mut ev = std::mem::zeroed::<tether_event>();
        let mut granted = Vec::new();
        for _ in 0..100 {
            if tether_next_event(client, 100, &mut ev) == TETHER_OK && ev.kind == TETHER_EVENT_HEARTBEAT {
                assert_eq!(ev.timeout_ms, 3 * ev.heartbeat_ms, "the server's ratio");
                granted.push(ev.heartbeat_ms);
                if ev.heartbeat_ms == 400 {
                    break;
                }
            }
        }
        assert_eq!(granted, [200, 400], "doubling from the floor to the ceiling");
        assert_eq!(tether_close(client, 2000), TETHER_OK);
        tether_free(client);
    }
    let _ = stop.send(());
}

#[test]
fn every_status_has_a_name() {
    for code in -9..=2 {
        // SAFETY: static strings.
        let name = unsafe { CStr::from_ptr(tether_status_text(code)) }.to_str().unwrap();
        assert_ne!(name, "unknown status", "{code}");
    }
    // SAFETY: a static string.
    assert_eq!(unsafe { CStr::from_ptr(tether_version()) }.to_str().unwrap(), env!("CARGO_PKG_VERSION"));
}
