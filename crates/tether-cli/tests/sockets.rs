//! `tether sockets` against real kernel sockets: an accept queue nobody drains, a CLOSE_WAIT nobody closes, an
//! established socket no session holds, a real tether server whose sockets all belong to sessions, a port with
//! no server, and a stalled server whose admin listener does not answer.

mod common;

use std::io::Read;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::process::Command;

use common::{event, Proc};
use serde_json::Value;

/// `tether sockets ARGS --json`: its exit status and one object per socket.
fn sockets(args: &[&str]) -> (i32, Vec<Value>) {
    let (code, rows, _) = sockets_stderr(args);
    (code, rows)
}

/// [`sockets`], with what it said on stderr.
fn sockets_stderr(args: &[&str]) -> (i32, Vec<Value>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tether")).arg("sockets").args(args).arg("--json").output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let rows = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    (out.status.code().unwrap_or(-1), rows, stderr)
}

fn flags(rows: &[Value]) -> Vec<&str> {
    rows.iter().filter_map(|r| r["flag"].as_str()).collect()
}

#[test]
fn connections_nobody_accepted_are_flagged_with_the_listeners_queue() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap(); // never accepts
    let port = listener.local_addr().unwrap().port().to_string();
    let waiting: Vec<TcpStream> = (0..3).map(|_| TcpStream::connect(listener.local_addr().unwrap()).unwrap()).collect();
    let (code, rows) = sockets(&["--port", &port, "--admin", "off"]);
    assert_eq!(code, 0);
    let listen = rows.iter().find(|r| r["state"] == "listen").expect("the LISTEN socket");
    assert_eq!(listen["recv_q"], 3, "the accept queue holds the three: {listen}");
    let (code, ghosts) = sockets(&["--port", &port, "--admin", "off", "--ghosts"]);
    assert_eq!(code, 1, "ghosts found: a failing health check");
    assert_eq!(flags(&ghosts), ["unaccepted"; 3]);
    assert!(ghosts.iter().all(|g| g["inode"] == 0 && g["state"] == "established"));
    drop(waiting);
}

#[test]
fn a_close_wait_nobody_closes_is_flagged() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port().to_string();
    let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (held, _) = listener.accept().unwrap();
    client.shutdown(Shutdown::Both).unwrap();
    drop(client);
    // Our side read the FIN (end of stream) and keeps the socket open: CLOSE_WAIT, with no kernel timer.
    let mut buf = [0u8; 8];
    assert_eq!((&held).read(&mut buf).unwrap(), 0);
    let (code, ghosts) = sockets(&["--port", &port, "--admin", "off", "--ghosts"]);
    assert_eq!(code, 1);
    assert_eq!(flags(&ghosts), ["close_wait"]);
    assert_eq!(ghosts[0]["timer"], Value::Null, "CLOSE_WAIT has no kernel timer: {}", ghosts[0]);
    drop(held);
}

#[test]
fn sockets_are_joined_with_sessions_and_one_no_session_holds_is_an_orphan() {
    let (srv, addr, admin) = common::serve_with_admin(&[]);
    let port = addr.rsplit(':').next().unwrap().to_owned();
    let _dev = Proc::spawn(&["connect", &addr, "--id", "dev-1", "--json"]);
    srv.expect("dev-1 online", |v| event(v) == "online" && v["client"] == "dev-1");
    // Every established socket of the server's port belongs to a session: nothing flagged.
    let (code, rows) = sockets(&["--port", &port, "--admin", &admin, "--orphan-after", "0s"]);
    assert_eq!(code, 0);
    let est: Vec<&Value> = rows.iter().filter(|r| r["state"] == "established").collect();
    assert_eq!(est.len(), 1, "{rows:?}");
    assert_eq!((est[0]["client"].as_str(), est[0]["epoch"].as_u64()), (Some("dev-1"), Some(1)));
    assert!(est[0]["verdict_in_ms"].as_f64().unwrap() > 0.0 && est[0]["flag"].is_null());
    let (code, _) = sockets(&["--port", &port, "--admin", &admin, "--orphan-after", "0s", "--ghosts"]);
    assert_eq!(code, 0, "a healthy server passes the health check");
    // A socket held past any session (a program that accepted and forgot it), checked against the same sessions.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let other = listener.local_addr().unwrap().port().to_string();
    let _peer = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (_held, _) = listener.accept().unwrap();
    let (code, ghosts) = sockets(&["--port", &other, "--admin", &admin, "--orphan-after", "0s", "--ghosts"]);
    assert_eq!((code, flags(&ghosts)), (1, vec!["orphan"]));
}

#[test]
fn a_port_nothing_listens_on_fails_the_health_check() {
    // A port that was free a moment ago: nothing listens on it.
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port().to_string();
    let (code, rows, stderr) = sockets_stderr(&["--port", &port, "--ghosts"]);
    assert_eq!((code, rows.len()), (1, 0), "a dead server is not a healthy one: {stderr}");
    assert!(stderr.contains(&format!("nothing listens on port {port}")), "{stderr}");
    assert!(!stderr.contains("admin"), "no admin API is asked about a port with no server: {stderr}");
}

#[test]
fn a_stalled_servers_admin_listener_is_named_as_not_answering() {
    let (srv, addr, admin) = common::serve_with_admin(&[]);
    let port = addr.rsplit(':').next().unwrap().to_owned();
    srv.signal(libc::SIGSTOP);
    let (code, rows, stderr) = sockets_stderr(&["--port", &port, "--admin", &admin]);
    srv.signal(libc::SIGCONT);
    assert_eq!(code, 0, "{stderr}");
    assert!(rows.iter().any(|r| r["state"] == "listen"), "the kernel's view is printed all the same: {rows:?}");
    assert!(stderr.contains(&format!("the admin listener at {admin} did not answer")), "{stderr}");
    assert!(!stderr.contains("give --admin"), "the address was right: {stderr}");
    // An address where nothing listens is named as such.
    let free = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();
    let (_, _, stderr) = sockets_stderr(&["--port", &port, "--admin", &free]);
    assert!(stderr.contains(&format!("nothing listens at {free}")), "{stderr}");
}
