//! Client resilience against real server processes: `kill -9` and SIGSTOP of the primary, failover to the
//! backup, and the return to the primary. Real clock; waits are for output lines.

mod common;

use std::time::{Duration, Instant};

use common::{event, Proc};

fn serve(extra: &[&str]) -> (Proc, String) {
    let mut args = vec!["serve", "--listen", "127.0.0.1:0", "--events", "json"];
    args.extend_from_slice(extra);
    let p = Proc::spawn(&args);
    let first = p.expect("listening", |v| event(v) == "listening");
    let addr = first["addr"].as_str().unwrap().to_owned();
    (p, addr)
}

#[test]
fn killed_primary_is_detected_at_once_and_the_client_fails_over() {
    let (primary, p) = serve(&[]);
    let (backup, b) = serve(&[]);
    let servers = format!("{p},{b}");
    let c = Proc::spawn(&["connect", &servers, "--id", "dev", "--json", "--reconnect", "--backoff-initial", "100ms"]);
    let v = c.expect("connected to primary", |v| event(v) == "connected");
    assert_eq!((v["server"].as_str(), v["primary"].as_bool()), (Some(p.as_str()), Some(true)));
    primary.signal(libc::SIGKILL);
    let killed = Instant::now();
    let d = c.expect("disconnected", |v| event(v) == "disconnected");
    let detected = killed.elapsed();
    let reason = d["reason"].as_str().unwrap();
    assert!(reason == "eof" || reason == "reset", "{d}");
    assert!(detected < Duration::from_secs(1), "a killed server's kernel closes at once: {detected:?}");
    let r = c.expect("reconnecting", |v| event(v) == "reconnecting");
    assert_eq!((r["server"].as_str(), r["attempt"].as_u64()), (Some(b.as_str()), Some(1)));
    assert!(r["delay_ms"].as_u64().unwrap() <= 100);
    let v = c.expect("connected to backup", |v| event(v) == "connected");
    assert_eq!((v["server"].as_str(), v["primary"].as_bool()), (Some(b.as_str()), Some(false)));
    backup.expect("online on backup", |v| event(v) == "online" && v["client"] == "dev");
    println!(
        "kill -9: detected {reason} after {:.3}s, on the backup after {:.3}s",
        detected.as_secs_f64(),
        killed.elapsed().as_secs_f64()
    );
}

#[test]
fn hung_primary_is_a_heartbeat_timeout_then_failover_then_return() {
    let hb = ["--heartbeat-interval", "300ms", "--heartbeat-timeout", "900ms"];
    let (primary, p) = serve(&hb);
    let (backup, b) = serve(&hb);
    let servers = format!("{p},{b}");
    let c = Proc::spawn(&[
        "connect",
        &servers,
        "--id",
        "dev",
        "--json",
        "--reconnect",
        "--backoff-initial",
        "100ms",
        "--return-to-primary",
        "1s",
    ]);
    c.expect("connected to primary", |v| event(v) == "connected" && v["primary"] == true);
    primary.signal(libc::SIGSTOP);
    let stopped = Instant::now();
    let d = c.expect("disconnected", |v| event(v) == "disconnected");
    let detected = stopped.elapsed();
    assert_eq!(d["reason"], "heartbeat_timeout", "{d}");
    assert!(detected >= Duration::from_millis(500) && detected < Duration::from_millis(900 + 1000), "{detected:?}");
    let v = c.expect("connected to backup", |v| event(v) == "connected");
    assert_eq!(v["server"].as_str(), Some(b.as_str()));
    let on_backup = stopped.elapsed();
    // The primary comes back: the client probes it and returns, leaving the backup with a goodbye.
    primary.signal(libc::SIGCONT);
    let resumed = Instant::now();
    let v = c.expect("back on primary", |v| event(v) == "connected");
    assert_eq!((v["server"].as_str(), v["primary"].as_bool()), (Some(p.as_str()), Some(true)));
    let returned = resumed.elapsed();
    let off = backup.expect("left the backup", |v| event(v) == "offline" && v["client"] == "dev");
    assert_eq!(off["reason"], "bye");
    assert!(returned < Duration::from_secs(8), "probe every 1 s, handshake timeout 5 s: {returned:?}");
    println!(
        "SIGSTOP: heartbeat_timeout after {:.3}s (timeout 0.9s), on the backup after {:.3}s, back on the primary {:.3}s after SIGCONT",
        detected.as_secs_f64(),
        on_backup.as_secs_f64(),
        returned.as_secs_f64()
    );
}

#[test]
fn reconnecting_client_queues_stdin_during_an_outage() {
    let (mut server, addr) = serve(&[]);
    let mut c = Proc::spawn(&[
        "connect",
        &addr,
        "--id",
        "dev",
        "--json",
        "--reconnect",
        "--backoff-initial",
        "100ms",
        "--backoff-max",
        "200ms",
    ]);
    c.expect("connected", |v| event(v) == "connected");
    server.signal(libc::SIGKILL);
    let _ = server.wait_exit();
    c.expect("disconnected", |v| event(v) == "disconnected");
    c.send_line("while away");
    c.expect("queued", |v| event(v) == "queued");
    // A new server on the same port: the client returns and the queued line is delivered first.
    let port_free = addr.clone();
    let server2 = Proc::spawn(&["serve", "--listen", &port_free, "--events", "json"]);
    server2.expect("listening", |v| event(v) == "listening");
    c.expect("reconnected", |v| event(v) == "connected");
    let d = server2.expect("queued data", |v| event(v) == "data");
    assert_eq!((d["client"].as_str(), d["payload"].as_str()), (Some("dev"), Some("while away")));
}
