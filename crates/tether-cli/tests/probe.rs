//! `tether probe`: each verdict from the real thing. On loopback (no root needed): a healthy server, an HTTP
//! server on the port (one that answers at once, and one that waits for the client to finish its request), a
//! stopped server, and the server-side probe of a stopped client. In the fault lab (root, network
//! namespaces; `scripts/test` runs them with `--ignored`): a healthy path, a stopped server, a closed port, an HTTP
//! listener, a blackholed path and a host that went off its network.

mod common;
#[macro_use]
mod netlab;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{event, serve_with_admin, Proc};
use netlab::{DEVICE_IP, PORT, SERVER_IP};
use serde_json::Value;

/// Run `tether ARGS` (under `ip netns exec NS` when `ns` is given); its exit code and its last stdout line as JSON.
fn probe_in(ns: Option<&str>, args: &[&str]) -> (i32, Value) {
    let out = netlab::tether(ns).arg("probe").args(args).arg("--json").env("RUST_LOG", "warn").output().unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    let last = stdout
        .lines()
        .last()
        .unwrap_or_else(|| panic!("no output from probe {args:?}; stderr: {}", String::from_utf8_lossy(&out.stderr)));
    let v: Value = serde_json::from_str(last).unwrap_or_else(|e| panic!("{e}: {last}"));
    (out.status.code().unwrap_or(-1), v)
}

fn probe(args: &[&str]) -> (i32, Value) {
    probe_in(None, args)
}

fn verdict(v: &Value) -> &str {
    v["verdict"].as_str().unwrap_or("")
}

/// A healthy probe: every layer answered, with application and kernel round trips side by side.
fn assert_ok(code: i32, v: &Value, count: u64) {
    assert_eq!((code, verdict(v)), (0, "ok"), "{v}");
    let l = &v["layers"];
    assert_eq!(l["transport"]["result"], "connected", "{v}");
    assert_eq!(l["app"]["result"], "welcome", "{v}");
    assert_eq!(l["round_trips"]["answered"], count, "{v}");
    let rtt = &l["round_trips"]["app_rtt_ms"];
    assert!(rtt["min"].as_f64().unwrap() <= rtt["median"].as_f64().unwrap(), "{v}");
    assert!(rtt["median"].as_f64().unwrap() <= rtt["max"].as_f64().unwrap(), "{v}");
    assert!(l["kernel"]["rtt_ms"].as_f64().unwrap() > 0.0, "{v}");
    assert_eq!(l["kernel"]["unacked"], 0, "{v}");
}

#[test]
fn loopback_verdicts_and_the_server_side_probe() {
    let (server, addr, admin) = serve_with_admin(&[]);

    let (code, v) = probe(&[&addr, "--count", "3", "--interval", "10ms"]);
    assert_ok(code, &v, 3);
    // The probe said goodbye: its session ended with `bye`, not a timeout.
    let id = v["id"].as_str().unwrap().to_owned();
    let off = server.expect("the probe's session ended", |e| event(e) == "offline" && e["client"] == id.as_str());
    assert_eq!(off["reason"], "bye", "{off}");

    // The admin listener is HTTP: something answers, but not tether.
    let (code, v) = probe(&[&admin]);
    assert_eq!((code, verdict(&v)), (14, "not_tether"), "{v}");
    assert_eq!(v["layers"]["app"]["protocol"], "HTTP", "{v}");

    // From the server's side: a running client answers; a stopped one is acknowledged by its kernel, not its
    // program.
    let client = Proc::spawn(&["connect", &addr, "--id", "dev", "--json"]);
    client.expect("connected", |e| event(e) == "connected");
    let (code, v) = probe(&["--server", &admin, "--id", "dev", "--timeout", "2s"]);
    assert_eq!((code, verdict(&v), v["exit_code"].as_u64()), (0, "ok", Some(0)), "{v}");
    // The human form: one duration style in every line, the server's evidence's own (`{:.1?}`).
    let out =
        Command::new(env!("CARGO_BIN_EXE_tether")).args(["probe", "--server", &admin, "--id", "dev"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("PONG in ") && !text.contains(" ms"), "{text}");
    client.signal(libc::SIGSTOP);
    let (code, v) = probe(&["--server", &admin, "--id", "dev", "--timeout", "1s"]);
    client.signal(libc::SIGCONT);
    assert_eq!((code, verdict(&v), v["exit_code"].as_u64()), (20, "client_stalled", Some(20)), "{v}");
    assert_eq!(v["kernel"]["unacked"], 0, "{v}");
    assert!(v["kernel"]["rtt_ms"].as_f64().unwrap() < 200.0, "the kernel's RTT stays normal: {v}");

    let out = Command::new(env!("CARGO_BIN_EXE_tether"))
        .args(["probe", "--server", &admin, "--id", "nobody"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not online"), "{out:?}");
}

#[test]
fn loopback_refusals_tls_and_pacing() {
    // A full server answers BYE(busy) with its hint: the probe reports the reason.
    let (_full, addr, _) = serve_with_admin(&["--max-connections", "1"]);
    let holder = Proc::spawn(&["connect", &addr, "--id", "holder", "--json"]);
    holder.expect("connected", |e| event(e) == "connected");
    let (code, v) = probe(&[&addr]);
    assert_eq!((code, verdict(&v)), (15, "refused"), "{v}");
    assert_eq!(v["layers"]["app"]["reason"], "busy", "{v}");

    // More PINGs than the allowance, and an interval longer than the heartbeat: paced and cut, never punished.
    let (_fast, addr, _) = serve_with_admin(&["--heartbeat-interval", "100ms", "--heartbeat-timeout", "300ms"]);
    let (code, v) = probe(&[&addr, "--count", "12", "--interval", "0ms"]);
    assert_ok(code, &v, 12);
    assert!(v["layers"]["round_trips"]["interval_ms"].as_f64().unwrap() > 0.0, "paced: {v}");
    let (code, v) = probe(&[&addr, "--count", "3", "--interval", "1s"]);
    assert_ok(code, &v, 3);
    assert_eq!(v["layers"]["round_trips"]["interval_ms"], 100.0, "cut to the heartbeat: {v}");

    // TLS: a good handshake, an untrusted certificate, plain TCP against TLS and TLS against plain TCP.
    let dir = std::env::temp_dir().join(format!("tether-probe-tls-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let out = Command::new(env!("CARGO_BIN_EXE_tether")).args(["cert", "--out"]).arg(&dir).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let f = |n: &str| dir.join(n).to_str().unwrap().to_owned();
    let (_tls, tls_addr, _) = serve_with_admin(&["--tls-cert", &f("server.pem"), "--tls-key", &f("server.key")]);
    let (code, v) = probe(&[&tls_addr, "--tls-ca", &f("ca.pem")]);
    assert_ok(code, &v, 5);
    assert_eq!(v["layers"]["tls"]["result"], "done", "{v}");
    let (code, v) = probe(&[&tls_addr, "--tls-ca", &f("client.pem")]);
    assert_eq!((code, verdict(&v)), (16, "tls_failed"), "{v}");
    assert!(v["explanation"].as_str().unwrap().contains("not signed by a CA you trust"), "{v}");
    let (code, v) = probe(&[&tls_addr]);
    assert_eq!((code, verdict(&v)), (14, "not_tether"), "{v}");
    assert!(v["explanation"].as_str().unwrap().contains("add --tls"), "{v}");
    let (code, v) = probe(&[&addr, "--tls-ca", &f("ca.pem")]);
    assert_eq!((code, verdict(&v)), (16, "tls_failed"), "{v}");
    assert!(v["explanation"].as_str().unwrap().contains("plain tether on this port, not TLS"), "{v}");
    let _ = std::fs::remove_dir_all(&dir);

    // An id the server could not accept is a usage error, not the server's fault.
    let out = Command::new(env!("CARGO_BIN_EXE_tether")).args(["probe", &addr, "--id", ""]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}

/// `python3 -m http.server` on a free loopback port: it reads what a client sends and waits for the end of a
/// request line. The probe's own `HELLO` alone gets no answer from it, which must not pass for a stalled tether
/// server.
struct HttpServer {
    child: std::process::Child,
    addr: String,
}

impl HttpServer {
    /// On a free port of `ip` (in the network namespace `ns` when given: `ip netns exec` runs it in place).
    fn start(ns: Option<&str>, ip: &str) -> HttpServer {
        use std::io::BufRead;
        let mut cmd = match ns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "python3"]);
                c
            }
            None => Command::new("python3"),
        };
        let mut child = cmd
            .args(["-u", "-m", "http.server", "0", "--bind", ip])
            .current_dir(std::env::temp_dir())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("python3 (scripts/test installs it)");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        // "Serving HTTP on 127.0.0.1 port 41234 (http://127.0.0.1:41234/) ..."
        let line = rx.recv_timeout(common::PATIENCE).expect("http.server says where it listens");
        let port = line.split_whitespace().skip_while(|w| *w != "port").nth(1).expect("a port").to_owned();
        HttpServer { child, addr: format!("{ip}:{port}") }
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_listener_that_waits_for_the_client_is_not_a_stalled_server() {
    let http = HttpServer::start(None, "127.0.0.1");
    let (code, v) = probe(&[&http.addr, "--timeout", "1s"]);
    assert_eq!((code, verdict(&v)), (14, "not_tether"), "{v}");
    let app = &v["layers"]["app"];
    assert_eq!((app["result"].as_str(), app["nudged"].as_bool()), (Some("foreign"), Some(true)), "{v}");
    assert_eq!(app["protocol"], "HTML", "http.server answers a line it cannot parse with a bare page: {v}");

    // A stopped tether server on this host: its kernel took HELLO, its process never read it.
    let (server, addr, _) = serve_with_admin(&[]);
    server.signal(libc::SIGSTOP);
    let (code, v) = probe(&[&addr, "--timeout", "1s"]);
    server.signal(libc::SIGCONT);
    assert_eq!((code, verdict(&v)), (17, "server_stalled"), "{v}");
    assert!(v["layers"]["app"]["peer_unread_bytes"].as_u64().unwrap() > 0, "HELLO waits unread: {v}");
    assert_eq!(v["layers"]["app"]["nudge_ms"], Value::Null, "no nudge once the stall is certain: {v}");
    assert!(v["explanation"].as_str().unwrap().contains("has not read it"), "{v}");
    let (code, v) = probe(&[&addr, "--count", "1"]);
    assert_eq!((code, verdict(&v)), (0, "ok"), "resumed: {v}");
}

/// The verdicts that need a real path: run from the devices' namespace against the server's.
#[test]
#[ignore = "fault lab: needs root and network namespaces; scripts/test runs it"]
fn lab_probe_tells_each_fault_apart() {
    let mut lab = lab_or_skip!("probe");
    let token = std::env::temp_dir().join(format!("tether-probe-lab-{}", std::process::id()));
    std::fs::write(&token, "lab-admin-token\n").unwrap();
    let http = format!("{SERVER_IP}:8080");
    let tok = token.to_str().unwrap().to_owned();
    lab.serve(&["--admin", &http, "--admin-token-file", &tok]);
    let dev = lab.devices.clone();
    let target = format!("{SERVER_IP}:{PORT}");
    let run = |args: &[&str]| probe_in(Some(&dev), args);

    // Healthy: ICMP answers through a raw socket (we are root), every layer answers.
    let (code, v) = run(&[&target]);
    assert_ok(code, &v, 5);
    assert_eq!(v["layers"]["path"]["result"], "reply", "{v}");
    assert_eq!(v["layers"]["transport"]["local"].as_str().unwrap().split(':').next(), Some(DEVICE_IP));

    // Nothing listens on this port: the host resets the connect.
    let (code, v) = run(&[&format!("{SERVER_IP}:7999")]);
    assert_eq!((code, verdict(&v)), (12, "port_closed"), "{v}");

    // The admin API is an HTTP server: not tether.
    let (code, v) = run(&[&http]);
    assert_eq!((code, verdict(&v)), (14, "not_tether"), "{v}");
    // So is one that reads HELLO and waits for the rest of its request line, seen from another host (no view of
    // its socket): it answers the nudge after HELLO.
    let waiting = HttpServer::start(Some(&lab.server), SERVER_IP);
    let (code, v) = run(&[&waiting.addr, "--timeout", "1s"]);
    assert_eq!((code, verdict(&v)), (14, "not_tether"), "{v}");
    assert_eq!(v["layers"]["app"]["nudged"], true, "{v}");
    drop(waiting);

    // The server process stopped: its kernel still completes the connect and acknowledges HELLO.
    lab.server_proc().signal(libc::SIGSTOP);
    let (code, v) = run(&[&target, "--timeout", "2s"]);
    lab.server_proc().signal(libc::SIGCONT);
    assert_eq!((code, verdict(&v)), (17, "server_stalled"), "{v}");
    assert_eq!(v["layers"]["transport"]["result"], "connected", "{v}");
    assert_eq!(v["layers"]["app"]["result"], "no_answer", "{v}");
    assert_eq!(v["layers"]["kernel"]["unacked"], 0, "HELLO was acknowledged: {v}");
    assert!(v["explanation"].as_str().unwrap().contains("not tether looks the same"), "{v}");
    let (code, v) = run(&[&target]);
    assert_eq!((code, verdict(&v)), (0, "ok"), "resumed: {v}");

    // A silent cut between the two: no SYN-ACK, no ICMP answer. Nothing tells the path from the host.
    lab.cut(SERVER_IP);
    let t0 = Instant::now();
    let (code, v) = run(&[&target, "--timeout", "2s"]);
    let took = t0.elapsed();
    lab.restore(SERVER_IP);
    assert_eq!((code, verdict(&v)), (10, "path_down"), "{v}");
    assert_eq!(v["layers"]["path"]["result"], "no_answer", "{v}");
    assert_eq!(v["layers"]["transport"]["result"], "timed_out", "{v}");
    assert!(took < Duration::from_secs(5), "ICMP 1 s + connect 2 s, took {took:?}");
    println!("MEASURED probe path_down: {:.2}s (ICMP wait 1 s + connect timeout 2 s)", took.as_secs_f64());

    // The server's host went off its network: the router's neighbour lookup fails and it answers "host
    // unreachable".
    lab.host_off("srv");
    let t0 = Instant::now();
    let (code, v) = run(&[&target, "--timeout", "6s"]);
    let took = t0.elapsed();
    assert_eq!((code, verdict(&v)), (11, "host_down"), "{v}");
    assert_eq!(v["layers"]["transport"]["result"], "host_unreachable", "{v}");
    println!(
        "MEASURED probe host_down: {:.2}s (the router's neighbour lookup gives up after ~3 s)",
        took.as_secs_f64()
    );
    let _ = std::fs::remove_file(&token);
}

/// `--idle` against a server that stops while the probe's connection idles: the `PING` after the idle goes
/// unanswered and a new connection still goes through (the stopped server's kernel accepts it), but its kernel
/// acknowledged the `PING`: the server is stalled, not a middlebox that forgot the connection.
#[test]
fn a_server_stopped_during_the_idle_is_stalled_not_a_forgotten_connection() {
    use std::io::BufRead;
    let (server, addr, _) = serve_with_admin(&[]);
    let mut child = Command::new(env!("CARGO_BIN_EXE_tether"))
        .args(["probe", &addr, "--idle", "2s", "--timeout", "1s", "--count", "1"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines().map_while(Result::ok);
    // The round trips are done when their line is printed: the idle begins.
    assert!(lines.by_ref().any(|l| l.starts_with("round trip")), "the probe reached its round trips");
    server.signal(libc::SIGSTOP);
    let rest: Vec<String> = lines.collect();
    let status = child.wait().unwrap();
    server.signal(libc::SIGCONT);
    let verdict = rest.iter().find(|l| l.starts_with("verdict")).expect("a verdict line");
    assert_eq!(status.code(), Some(17), "{rest:#?}");
    assert!(
        verdict.contains("server_stalled") && verdict.contains("acknowledged the PING after 2.0s idle"),
        "{verdict}"
    );
}
