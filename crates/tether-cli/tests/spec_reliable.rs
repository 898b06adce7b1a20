//! A reliable client written in Python from docs/protocol.md alone (`spec_client_reliable.py`), run against a
//! real `tether serve`: proof that the document is enough to build acknowledged delivery, resume and the
//! session rules without reading the server.
//!
//! # Layout
//!
//! `serve` starts the server with JSON events, `run` runs the script in one of its modes and returns its output
//! once it succeeded; each test then checks the script's step lines and, in order, the server's events for the
//! same story. Every wait is on an output line with a deadline ([`common::PATIENCE`]); ports are ephemeral.

mod common;

use std::process::Command;

use common::{event, Proc};
use serde_json::Value;

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/spec_client_reliable.py");

fn serve() -> (Proc, String) {
    let p = Proc::spawn(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--events",
        "json",
        "--heartbeat-interval",
        "500ms",
        "--heartbeat-timeout",
        "1500ms",
        "--session-expiry",
        "10s",
    ]);
    let first = p.expect("listening", |v| event(v) == "listening");
    (p, first["addr"].as_str().expect("the listening address").to_owned())
}

/// Run the script's `mode` against `addr`; its stdout, once it exited zero.
fn run(addr: &str, mode: &str) -> String {
    let out = Command::new("python3").args([SCRIPT, addr, mode]).output().expect("python3 (scripts/test installs it)");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "python reliable client failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    stdout
}

/// The next server event about `client` of kind `kind`, checked field by field against `fields`.
fn next(srv: &Proc, kind: &str, client: &str, fields: &[(&str, &str)]) -> Value {
    let v = srv.expect(&format!("{kind} {client}"), |v| event(v) == kind && v["client"] == client);
    for (k, want) in fields {
        assert_eq!(v[*k].as_str(), Some(*want), "{k} of {v}");
    }
    v
}

/// The scenario: grant, 100 acknowledged messages with receipts, `b` reset mid-stream and resumed (no loss, no
/// duplicate, its own unacknowledged messages sent again), a forged token for `b`'s id, the real `b` taking the
/// id back from the forger, and a clean goodbye.
#[test]
fn python_reliable_client_from_the_spec_resumes_without_loss_and_resists_a_forged_token() {
    let (srv, addr) = serve();
    let out = run(&addr, "scenario");
    for line in [
        "step 1 ok: a and b granted reliable, status new; version=2 heartbeat_ms=500 timeout_ms=1500 max_frame=65536",
        "step 2 ok: b took 1..100 in order once",
        "got 161..250 once in order, no duplicates",
        "a got receipts for 1..250",
        "step 4 ok: forged token got fresh/unknown_token lost=unknown and nothing of b's",
        "b's resume (forger online) got fresh/replaced lost=3, the forger BYE(takeover)",
        "step 5 ok: bye, both closed cleanly",
    ] {
        assert!(out.contains(line), "missing {line:?} in:\n{out}");
    }
    let a = next(&srv, "online", "a", &[]);
    let b1 = next(&srv, "online", "b", &[]);
    next(&srv, "offline", "b", &[("reason", "reset"), ("by", "client")]);
    let b2 = next(&srv, "online", "b", &[]);
    assert!(a["epoch"].as_u64() < b1["epoch"].as_u64() && b1["epoch"].as_u64() < b2["epoch"].as_u64());
    next(&srv, "offline", "b", &[("reason", "eof"), ("by", "client")]);
    let forger = next(&srv, "online", "b", &[]);
    let back = next(&srv, "takeover", "b", &[]);
    assert_eq!(back["old_conn"], forger["conn"], "the real b took the id from the forger: {back}");
    assert_eq!(back["same_device"], false);
    next(&srv, "offline", "a", &[("reason", "bye"), ("by", "client")]);
    let gone = next(&srv, "offline", "b", &[("reason", "bye"), ("by", "client")]);
    assert_eq!(gone["conn"], back["conn"]);
}

/// The two resume rules the scenario does not reach: receipts follow the sender's latest `HELLO`, and a resume
/// offering less than the client acknowledged gets a fresh session.
#[test]
fn python_reliable_client_from_the_spec_confirms_receipt_flags_and_below_acked_resume() {
    let (srv, addr) = serve();
    let out = run(&addr, "edges");
    assert!(out.contains("edges 1 ok") && out.contains("edges 2 ok") && out.contains("edges ok"), "{out}");
    // Both were dropped and resumed along the way; each ends with its own BYE.
    for id in ["x", "y"] {
        srv.expect(&format!("{id} offline by its BYE"), |v| {
            event(v) == "offline" && v["client"] == id && v["reason"] == "bye" && v["by"] == "client"
        });
    }
}
