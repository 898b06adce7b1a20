//! The CLI contract, driven the way scripts drive it: real `tether serve` and `tether connect` processes on
//! loopback, JSON lines on stdout, signals. These run on the real clock (separate processes), with short
//! heartbeats and generous bounds; waits are for output lines, never fixed sleeps.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{event, Proc, PATIENCE};
use serde_json::Value;

fn serve(extra: &[&str]) -> (Proc, String) {
    let mut args = vec!["serve", "--listen", "127.0.0.1:0", "--events", "json"];
    args.extend_from_slice(extra);
    let p = Proc::spawn(&args);
    let first = p.expect("listening", |_| true);
    assert_eq!(event(&first), "listening", "the first line is the listening event");
    assert!(first["ts"].as_str().unwrap().ends_with('Z'));
    let addr = first["addr"].as_str().unwrap().to_owned();
    (p, addr)
}

fn connect(addr: &str, id: &str, extra: &[&str]) -> Proc {
    let mut args = vec!["connect", addr, "--id", id, "--json"];
    args.extend_from_slice(extra);
    let p = Proc::spawn(&args);
    p.expect("connected", |v| event(v) == "connected");
    p
}

#[test]
fn sigstopped_client_is_declared_dead_by_heartbeat_and_watchers_are_told() {
    let (srv, addr) = serve(&["--heartbeat-interval", "300ms", "--heartbeat-timeout", "900ms"]);
    let alice = connect(&addr, "alice", &["--subscribe", "bob"]);
    alice.expect("bob offline snapshot", |v| event(v) == "presence" && v["state"] == "offline");
    let bob = connect(&addr, "bob", &[]);
    srv.expect("bob online", |v| event(v) == "online" && v["client"] == "bob");
    alice.expect("bob online", |v| event(v) == "presence" && v["state"] == "online");
    // The hung process: its kernel still ACKs, only the application heartbeat can tell.
    bob.signal(libc::SIGSTOP);
    let stopped = Instant::now();
    let off = srv.expect("bob offline", |v| event(v) == "offline" && v["client"] == "bob");
    let elapsed = stopped.elapsed();
    assert_eq!(off["reason"], "heartbeat_timeout");
    assert!(off["lateness_ms"].as_f64().unwrap() >= 0.0);
    assert!(off["peer"].as_str().unwrap().starts_with("127.0.0.1:"));
    assert!(off["conn"].as_u64().is_some());
    assert!(elapsed >= Duration::from_millis(600) && elapsed < Duration::from_secs(5), "{elapsed:?}");
    let p = alice.expect("presence offline", |v| event(v) == "presence" && v["state"] == "offline");
    assert_eq!((p["client"].as_str(), p["reason"].as_str()), (Some("bob"), Some("heartbeat_timeout")));
    // Resumed, bob first reads what waited in its socket: the server's BYE telling it why.
    bob.signal(libc::SIGCONT);
    let d = bob.expect("bob disconnected", |v| event(v) == "disconnected");
    assert_eq!((d["reason"].as_str(), d["by_peer"].as_bool()), (Some("heartbeat_timeout"), Some(true)));
    let mut bob = bob;
    assert!(!bob.wait_exit().success(), "a client whose server dropped it exits non-zero");
}

#[test]
fn stdin_lines_are_relayed_and_offline_targets_reported() {
    let (_srv, addr) = serve(&[]);
    let bob = connect(&addr, "bob", &[]);
    let mut alice = connect(&addr, "alice", &["--to", "bob"]);
    alice.send_line("hello bob");
    let d = bob.expect("data", |v| event(v) == "data");
    assert_eq!((d["from"].as_str(), d["payload"].as_str()), (Some("alice"), Some("hello bob")));
    let mut carol = connect(&addr, "carol", &["--to", "nobody"]);
    carol.send_line("anyone?");
    let u = carol.expect("undeliverable", |v| event(v) == "undeliverable");
    assert_eq!(u["to"], "nobody");
}

#[test]
fn client_exits_nonzero_when_the_server_is_killed() {
    let (mut srv, addr) = serve(&[]);
    let mut c = connect(&addr, "a", &[]);
    srv.signal(libc::SIGKILL);
    let d = c.expect("disconnected", |v| event(v) == "disconnected");
    let reason = d["reason"].as_str().unwrap().to_owned();
    assert!(reason == "eof" || reason == "reset", "{reason}");
    assert!(!c.wait_exit().success());
    let _ = srv.wait_exit();
}

#[test]
fn refused_client_prints_the_reason_and_exits_nonzero() {
    let (srv, addr) = serve(&["--max-connections", "1"]);
    let _first = connect(&addr, "first", &[]);
    srv.expect("first online", |v| event(v) == "online");
    let mut second = Proc::spawn(&["connect", &addr, "--id", "second", "--json"]);
    let d = second.expect("disconnected", |v| event(v) == "disconnected");
    assert_eq!(d["reason"], "busy");
    assert!(d["retry_after_ms"].as_u64().unwrap() > 0);
    assert!(!second.wait_exit().success());
}

#[test]
fn sigterm_shuts_down_gracefully_and_clients_hear_why() {
    let (mut srv, addr) = serve(&[]);
    let c = connect(&addr, "a", &[]);
    srv.expect("online", |v| event(v) == "online");
    srv.signal(libc::SIGTERM);
    let d = c.expect("disconnected", |v| event(v) == "disconnected");
    assert_eq!(d["reason"], "server_shutdown");
    assert!(d["retry_after_ms"].as_u64().unwrap() > 0);
    let off = srv.expect("offline", |v| event(v) == "offline");
    assert_eq!(off["reason"], "server_shutdown");
    assert!(srv.wait_exit().success());
}

#[test]
fn sigterm_ends_a_server_that_prints_stats() {
    let (mut srv, _addr) = serve(&["--stats-interval", "100ms"]);
    srv.expect("stats", |v| event(v) == "stats" && v["connections"] == 0);
    srv.signal(libc::SIGTERM);
    assert!(srv.wait_exit().success(), "the stats task must not keep the server alive");
}

#[test]
fn ctrl_c_on_connect_says_bye() {
    let (srv, addr) = serve(&[]);
    let mut c = connect(&addr, "a", &[]);
    srv.expect("online", |v| event(v) == "online");
    c.signal(libc::SIGINT);
    let off = srv.expect("offline", |v| event(v) == "offline");
    assert_eq!(off["reason"], "bye");
    assert!(c.wait_exit().success());
}

#[test]
fn bad_flags_and_config_are_refused_clearly() {
    let out =
        Command::new(env!("CARGO_BIN_EXE_tether")).args(["serve", "--heartbeat-interval", "soon"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid duration"));
    let dir = std::env::temp_dir().join(format!("tether-cli-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("bad.toml");
    std::fs::write(&file, "heartbeat_timeout = \"1s\"\nheartbeat_interval = \"2s\"\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tether"))
        .args(["serve", "--listen", "127.0.0.1:0", "--config", file.to_str().unwrap()])
        .output()
        .unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("must be longer than the interval"));
    // A shutdown redirect is checked as the admin API checks a drain's: clients would be sent there in BYE.
    for (bad, why) in [("http://evil.example:80", "has a scheme"), ("999.1.1.1:80", "not an IPv4 address")] {
        let out = Command::new(env!("CARGO_BIN_EXE_tether"))
            .args(["serve", "--listen", "127.0.0.1:0", "--shutdown-redirect", bad])
            .output()
            .unwrap();
        assert!(!out.status.success(), "{bad} was accepted");
        assert!(String::from_utf8_lossy(&out.stderr).contains(why), "{}", String::from_utf8_lossy(&out.stderr));
    }
}

/// Wait until process `pid` runs `n` threads named `tokio-rt-worker`: the runtime's workers, one event loop each.
/// (tokio starts them before `serve` runs, but each takes its name only once it runs; `serve` starts no blocking
/// task, which would have the same name, before it stops.) Panics with the count seen if that does not happen.
fn expect_worker_threads(pid: u32, n: usize, what: &str) {
    let count = || {
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
            .filter(|name| name.trim_end() == "tokio-rt-worker")
            .count()
    };
    let deadline = Instant::now() + PATIENCE;
    while count() != n {
        assert!(Instant::now() < deadline, "{what}: {} worker threads, not {n}", count());
        std::thread::sleep(Duration::from_millis(10)); // polling /proc: nothing to wait on
    }
}

#[test]
fn threads_sets_how_many_event_loops_serve_and_bad_counts_are_refused() {
    // tether's default is one per CPU: counts other than that show the setting was taken.
    let cpus = std::thread::available_parallelism().unwrap().get();
    for n in [1, cpus + 2] {
        let (server, addr) = serve(&["--threads", &n.to_string()]);
        expect_worker_threads(server.child.id(), n, &format!("--threads {n}"));
        // Round robin puts the two on different loops when there are several.
        let b = connect(&addr, "b", &[]);
        let mut a = connect(&addr, "a", &["--to", "b"]);
        a.send_line("hello");
        b.expect("the relayed data", |v| event(v) == "data" && v["payload"] == "hello");
    }
    let dir = std::env::temp_dir().join(format!("tether-cli-threads-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("threads.toml");
    let zero = dir.join("zero.toml");
    std::fs::write(&file, format!("threads = {}\n", cpus + 1)).unwrap();
    std::fs::write(&zero, "threads = 0\n").unwrap();
    let (from_file, _) = serve(&["--config", file.to_str().unwrap()]);
    expect_worker_threads(from_file.child.id(), cpus + 1, "threads in the file");
    let (flag_wins, _) = serve(&["--config", file.to_str().unwrap(), "--threads", "1"]);
    expect_worker_threads(flag_wins.child.id(), 1, "--threads 1 over the file's");
    let refused = |args: &[&str], why: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_tether"))
            .args(["serve", "--listen", "127.0.0.1:0"])
            .args(args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && stderr.contains(why), "{args:?}: {stderr}");
    };
    refused(&["--threads", "0"], "threads must be at least 1");
    refused(&["--config", zero.to_str().unwrap()], "threads must be at least 1");
    refused(&["--threads", "5000"], "threads must be at most 1024");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The error that ends `tether serve` is its last line on stderr, after what it logged on the way (the log's
/// writer is a thread of its own, flushed before the error is printed).
#[test]
fn the_error_that_stops_serve_comes_after_its_log_lines() {
    let (_first, addr) = serve(&[]);
    let stderr_of = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_tether")).arg("serve").args(args).output().unwrap();
        assert!(!out.status.success(), "{args:?} did not fail");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    // Failing on the runtime: the address is taken. (The order was a race: tried a few times.)
    for _ in 0..5 {
        let taken = stderr_of(&["--listen", &addr, "--admin", "off", "--insecure-no-auth"]);
        assert!(taken.contains("event loops"), "the start-up lines are logged: {taken}");
        assert!(taken.trim_end().lines().last().unwrap().starts_with("tether: binding"), "{taken}");
    }
    // Failing before it: a name resolved (and logged), then a key file that is not there.
    let missing = stderr_of(&[
        "--listen",
        "localhost:0",
        "--tls-cert",
        "/nonexistent/tether-cert.pem",
        "--tls-key",
        "/nonexistent/tether-key.pem",
    ]);
    assert!(missing.contains("localhost is"), "the resolution is logged: {missing}");
    let last = missing.trim_end().lines().last().unwrap().to_owned();
    assert!(last.starts_with("tether: reading /nonexistent/"), "{missing}");
}

#[test]
fn python_client_written_from_the_spec_talks_to_a_real_server() {
    let (srv, addr) = serve(&["--heartbeat-interval", "300ms", "--heartbeat-timeout", "900ms"]);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/spec_client.py");
    let out = Command::new("python3").args([script, &addr, "py"]).output().expect("python3 (scripts/test installs it)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "python client failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("welcome version=1 heartbeat_ms=500 timeout_ms=1500"), "{stdout}");
    assert!(stdout.contains("closed cleanly"));
    let off = srv.expect("py offline", |v| event(v) == "offline" && v["client"] == "py");
    assert_eq!(off["reason"], "bye");
}

/// The same from a second outside implementation, written from the document alone for protocol version 2:
/// limits and extensions in WELCOME, presence flags, the relay limit at its exact edge, UNDELIVERABLE reasons.
#[test]
fn python_v2_client_written_from_the_spec_talks_to_a_real_server() {
    let (srv, addr) = serve(&["--heartbeat-interval", "300ms", "--heartbeat-timeout", "900ms"]);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/spec_client_v2.py");
    let out =
        Command::new("python3").args([script, &addr, "py2"]).output().expect("python3 (scripts/test installs it)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "python v2 client failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("welcome version=2 heartbeat_ms=500 timeout_ms=1500 max_frame=65536"), "{stdout}");
    assert!(stdout.contains("relay too-large ok") && stdout.contains("bye ok"), "{stdout}");
    let too_large = srv.expect("undeliverable", |v| event(v) == "undeliverable" && v["why"] == "too_large");
    assert_eq!(too_large["len"], 65_407);
    let off = srv.expect("py2 offline", |v| event(v) == "offline" && v["client"] == "py2");
    assert_eq!((off["reason"].as_str(), off["by"].as_str()), (Some("bye"), Some("client")));
}

/// CPU seconds (user + system) a process has used, from /proc.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after_comm = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

#[test]
fn a_flood_at_the_descriptor_limit_is_refused_without_spinning_and_the_server_recovers() {
    // A server limited to 40 descriptors, flooded with 60 connections that never say HELLO.
    let bin = env!("CARGO_BIN_EXE_tether");
    let mut child = Command::new("sh")
        .args([
            "-c",
            &format!("ulimit -n 40 && exec {bin} serve --listen 127.0.0.1:0 --events json --handshake-timeout 3s"),
        ])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let (tx, rx) = mpsc::channel::<(bool, String)>();
    for (is_err, pipe) in [
        (false, Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>),
        (true, Box::new(child.stderr.take().unwrap())),
    ] {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                let _ = tx.send((is_err, line));
            }
        });
    }
    let wait_for = |want_err: bool, needle: &str| {
        let deadline = Instant::now() + PATIENCE;
        loop {
            match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok((e, line)) if e == want_err && line.contains(needle) => return line,
                Ok(_) => continue,
                Err(_) => panic!("never saw {needle:?}"),
            }
        }
    };
    let listening: Value = serde_json::from_str(&wait_for(false, "listening")).unwrap();
    let addr = listening["addr"].as_str().unwrap().to_owned();
    let flood: Vec<std::net::TcpStream> = (0..60).map(|_| std::net::TcpStream::connect(&addr).unwrap()).collect();
    // Beyond the capacity the limit leaves, newcomers are refused `busy` (with a reserved descriptor when the
    // process is out of them; by backing off when even that is taken).
    wait_for(false, "\"busy\"");
    // While descriptors are exhausted the accept loop must not spin (a spinning loop burns ~1 CPU-s/s).
    let before = cpu_seconds(pid);
    std::thread::sleep(Duration::from_millis(1000));
    let used = cpu_seconds(pid) - before;
    assert!(used < 0.3, "accept loop used {used:.2} CPU-s in 1 s while out of descriptors");
    // Descriptors come back (the flood closes, handshakes time out): the server serves again.
    drop(flood);
    let c = Proc::spawn(&["connect", &addr, "--id", "after", "--json"]);
    c.expect("connected after the flood", |v| event(v) == "connected");
    wait_for(false, "\"after\"");
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
    let _ = child.wait();
}

#[test]
fn tokens_minted_by_the_cli_open_the_door_and_nothing_else_does() {
    let dir = std::env::temp_dir().join(format!("tether-auth-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let secret = dir.join("secret");
    std::fs::write(&secret, "a test secret of more than 16 bytes\n").unwrap();
    let secret = secret.to_str().unwrap().to_owned();
    let mint = |id: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_tether"))
            .args(["token", "--secret-file", &secret, "--id", id, "--ttl", "10m"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let file = dir.join(format!("{id}.token"));
        std::fs::write(&file, &out.stdout).unwrap();
        file.to_str().unwrap().to_owned()
    };
    let alice_token = mint("alice");
    let (srv, addr) = serve(&["--auth-secret-file", &secret, "--auth-fail-delay", "200ms"]);
    let _alice = connect(&addr, "alice", &["--token-file", &alice_token]);
    srv.expect("alice online", |v| event(v) == "online" && v["client"] == "alice");
    // Mallory presents alice's token for id "bob", then no token at all: refused both times.
    for extra in [vec!["--token-file", alice_token.as_str()], vec![]] {
        let mut args = vec!["connect", addr.as_str(), "--id", "bob", "--json"];
        args.extend(extra);
        let mut m = Proc::spawn(&args);
        let d = m.expect("refusal", |v| event(v) == "disconnected");
        assert_eq!(d["reason"], "auth_failed");
        assert!(!m.wait_exit().success());
        let closed = srv.expect("server saw it", |v| event(v) == "closed");
        assert_eq!(closed["reason"], "auth_failed");
    }
    // A secret and --insecure-no-auth together are refused as contradictory.
    let out = Command::new(env!("CARGO_BIN_EXE_tether"))
        .args(["serve", "--listen", "127.0.0.1:0", "--auth-secret-file", &secret, "--insecure-no-auth"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("choose one"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn tls_with_client_certificates_and_tokens_from_the_cli() {
    let dir = std::env::temp_dir().join(format!("tether-tls-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let out = Command::new(env!("CARGO_BIN_EXE_tether")).args(["cert", "--out"]).arg(&dir).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let f = |name: &str| dir.join(name).to_str().unwrap().to_owned();
    let secret = f("secret");
    std::fs::write(&secret, "a test secret of more than 16 bytes\n").unwrap();
    let token = Command::new(env!("CARGO_BIN_EXE_tether"))
        .args(["token", "--secret-file", &secret, "--id", "alice", "--ttl", "10m"])
        .output()
        .unwrap();
    std::fs::write(f("alice.token"), &token.stdout).unwrap();
    let (ca, cert, key, ccert, ckey) =
        (f("ca.pem"), f("server.pem"), f("server.key"), f("client.pem"), f("client.key"));
    let (srv, addr) = serve(&[
        "--auth-secret-file",
        &secret,
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
        "--tls-client-ca",
        &ca,
        "--heartbeat-interval",
        "200ms",
        "--heartbeat-timeout",
        "600ms",
    ]);
    let tls_flags = ["--tls-ca", &ca, "--tls-cert", &ccert, "--tls-key", &ckey];
    // Certificate checked against the IP (a SAN of `tether cert`), then against an explicit name.
    let mut alice = connect(&addr, "alice", &[&tls_flags[..], &["--token-file", &f("alice.token")]].concat());
    srv.expect("alice online", |v| event(v) == "online" && v["client"] == "alice");
    alice.send_line("hello over tls");
    let data = srv.expect("data", |v| event(v) == "data");
    assert_eq!(data["payload"], "hello over tls");
    // Heartbeats keep it: several timeouts pass with no verdict on alice.
    let later = srv.try_expect(Duration::from_secs(2), |v| event(v) == "offline");
    assert!(later.is_none(), "{later:?}");

    // Plain TCP against the TLS port: a clear refusal, non-zero exit; the server names it tls_error.
    let mut plain = Proc::spawn(&["connect", &addr, "--id", "bob", "--json"]);
    let d = plain.expect("refusal", |v| event(v) == "disconnected");
    assert_eq!(d["reason"], "protocol_error");
    assert!(d["detail"].as_str().unwrap().contains("the server speaks TLS"), "{d}");
    assert!(!plain.wait_exit().success());
    let closed = srv.expect("server saw it", |v| event(v) == "closed");
    assert_eq!(closed["reason"], "tls_error");

    // TLS without a client certificate: refused at the handshake.
    let mut anon =
        Proc::spawn(&["connect", &addr, "--id", "carol", "--json", "--tls-ca", &ca, "--tls-server-name", "localhost"]);
    let d = anon.expect("refusal", |v| event(v) == "disconnected");
    assert_eq!(d["reason"], "tls_error");
    assert!(!anon.wait_exit().success());

    // The right certificate but no token: the auth layer still refuses.
    let mut tokenless = Proc::spawn(&[&["connect", &addr, "--id", "dave", "--json"][..], &tls_flags].concat());
    let d = tokenless.expect("refusal", |v| event(v) == "disconnected");
    assert_eq!(d["reason"], "auth_failed");
    assert!(!tokenless.wait_exit().success());
    assert!(srv.drain().iter().all(|v| !(event(v) == "offline" && v["client"] == "alice")));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_tls_client_on_a_plain_port_is_told_the_server_speaks_plain_tether() {
    let dir = std::env::temp_dir().join(format!("tether-cli-plain-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let out = Command::new(env!("CARGO_BIN_EXE_tether")).args(["cert", "--out"]).arg(&dir).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let ca = dir.join("ca.pem").to_str().unwrap().to_owned();
    let (_srv, addr) = serve(&["--insecure-no-auth"]);
    let hint = "the server speaks plain tether on this port, not TLS";
    let mut once = Proc::spawn(&["connect", &addr, "--id", "a", "--json", "--tls-ca", &ca]);
    let d = once.expect("refusal", |v| event(v) == "disconnected");
    assert_eq!(d["reason"], "tls_error", "{d}");
    assert!(d["detail"].as_str().unwrap().contains(hint), "{d}");
    assert!(!once.wait_exit().success());
    let args = ["connect", &addr, "--id", "b", "--json", "--tls-ca", &ca, "--reconnect", "--max-attempts", "1"];
    let mut again = Proc::spawn(&args);
    let f = again.expect("connect_failed", |v| event(v) == "connect_failed");
    assert_eq!(f["reason"], "tls_error", "{f}");
    assert!(f["detail"].as_str().unwrap().contains(hint), "{f}");
    assert!(!again.wait_exit().success());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn listen_takes_a_host_name_and_says_what_it_bound() {
    let srv = Proc::spawn(&["serve", "--listen", "localhost:0", "--insecure-no-auth", "--events", "json"]);
    let l = srv.expect("listening", |v| event(v) == "listening");
    let addr: std::net::SocketAddr = l["addr"].as_str().unwrap().parse().unwrap();
    assert!(addr.ip().is_loopback() && addr.port() != 0, "{l}");
    let _c = connect(&addr.to_string(), "a", &[]);
    let out = Command::new(env!("CARGO_BIN_EXE_tether")).args(["serve", "--listen", "localhost"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("neither IP:PORT nor HOST:PORT"), "{out:?}");
}
