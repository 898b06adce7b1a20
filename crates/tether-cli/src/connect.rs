//! `tether connect`: one client id on one server; stdin lines go out as `DATA`, everything heard is printed.
//!
//! # Layout
//! [`run`] resolves the address, connects (a refusal is printed as a `disconnected` event and exits 1),
//! subscribes, then loops over stdin lines, client events and SIGINT/SIGTERM. End of stdin stops sending but keeps
//! the connection. A signal says `BYE` and exits 0; a server that disappears or says `BYE` exits 1.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use serde_json::json;
use tether::proto::Presence;
use tether::{Client, ClientConfig, ClientEvent, ConnectError, Disconnect};
use tokio::io::AsyncBufReadExt;

use crate::duration;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Server address, HOST:PORT.
    addr: String,
    /// This client's id.
    #[arg(long)]
    id: String,
    /// Presence subscriptions: comma-separated ids, or `*`.
    #[arg(long, value_delimiter = ',', value_name = "ID,ID|*")]
    subscribe: Vec<String>,
    /// Send stdin lines to this client id (default: to the server application).
    #[arg(long, value_name = "ID")]
    to: Option<String>,
    /// Requested heartbeat interval (the server clamps it).
    #[arg(long, value_parser = duration::parse, value_name = "DUR")]
    heartbeat_interval: Option<Duration>,
    /// Print one JSON object per line.
    #[arg(long)]
    json: bool,
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let addr = tokio::net::lookup_host(&args.addr)
        .await
        .with_context(|| format!("resolving {}", args.addr))?
        .next()
        .with_context(|| format!("{} resolves to no address", args.addr))?;
    let mut cfg = ClientConfig::new(args.id.clone());
    cfg.heartbeat_interval = args.heartbeat_interval;
    let shutdown = crate::shutdown_signal()?;
    let out = Printer { json: args.json };
    let mut client = match Client::connect(addr, cfg).await {
        Ok(c) => c,
        Err(ConnectError::Refused(d)) => {
            out.disconnected(&d);
            eprintln!("tether: {addr} refused the connection: {}", d.reason);
            return Ok(ExitCode::FAILURE);
        }
        Err(e) => {
            out.line(
                json!({"event": "disconnected", "reason": "connect_failed", "detail": e.to_string()}),
                &format!("cannot connect to {addr}: {e}"),
            );
            eprintln!("tether: cannot connect to {addr}: {e}");
            return Ok(ExitCode::FAILURE);
        }
    };
    let w = client.welcome().clone();
    out.line(
        json!({
            "event": "connected", "server": addr.to_string(), "server_id": w.server_id, "client": args.id,
            "epoch": w.epoch, "heartbeat_ms": w.heartbeat_ms, "timeout_ms": w.timeout_ms,
        }),
        &format!("connected to {addr} as {} (epoch {}, heartbeat {} ms)", args.id, w.epoch, w.heartbeat_ms),
    );
    if !args.subscribe.is_empty() {
        client.subscribe(args.subscribe.clone()).await.context("subscribing")?;
    }
    let mut stdin = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let mut stdin_open = true;
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => {
                if let Some(d) = client.close().await {
                    out.disconnected(&d);
                }
                return Ok(ExitCode::SUCCESS);
            }
            line = stdin.next_line(), if stdin_open => match line {
                Ok(Some(line)) => {
                    if let Err(e) = client.send(args.to.as_deref(), Bytes::from(line)).await {
                        eprintln!("tether: not sent: {e}");
                    }
                }
                Ok(None) | Err(_) => stdin_open = false,
            },
            ev = client.next_event() => match ev {
                Some(ClientEvent::Disconnected(d)) => {
                    out.disconnected(&d);
                    eprintln!("tether: disconnected: {}{}", d.reason, d.detail.map(|x| format!(" ({x})")).unwrap_or_default());
                    return Ok(ExitCode::FAILURE);
                }
                Some(ev) => out.event(&ev),
                None => return Ok(ExitCode::FAILURE),
            },
        }
    }
}

struct Printer {
    json: bool,
}

impl Printer {
    fn line(&self, v: serde_json::Value, human: &str) {
        if self.json {
            crate::emit_json(&v);
        } else {
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{human}");
            let _ = out.flush();
        }
    }

    fn disconnected(&self, d: &Disconnect) {
        self.line(
            json!({
                "event": "disconnected", "reason": d.reason.as_str(), "by_peer": d.by_peer,
                "lateness_ms": d.lateness.map(ms), "retry_after_ms": d.retry_after.map(|r| r.as_millis() as u64),
                "alternative": d.alternative, "detail": d.detail,
            }),
            &format!("disconnected: {}", d.reason),
        );
    }

    fn event(&self, ev: &ClientEvent) {
        match ev {
            ClientEvent::Data { from, payload } => self.line(
                json!({"event": "data", "from": from, "payload": String::from_utf8_lossy(payload)}),
                &format!("{}: {}", from.as_deref().unwrap_or("(server)"), String::from_utf8_lossy(payload)),
            ),
            ClientEvent::Presence(p) => self.presence(p),
            ClientEvent::Undeliverable { to } => {
                self.line(json!({"event": "undeliverable", "to": to}), &format!("not delivered: {to} is offline"))
            }
            ClientEvent::Suspect { silent_for } => self.line(
                json!({"event": "suspect", "silent_ms": ms(*silent_for)}),
                &format!("server suspected (silent {silent_for:?})"),
            ),
            ClientEvent::Recovered => self.line(json!({"event": "recovered"}), "server recovered"),
            ClientEvent::Disconnected(d) => self.disconnected(d),
        }
    }

    fn presence(&self, p: &Presence) {
        let last_seen = (p.last_seen_ago_ms != u32::MAX).then_some(p.last_seen_ago_ms);
        let reason = p.reason.map(|r| r.as_str());
        self.line(
            json!({
                "event": "presence", "client": p.client_id, "state": p.state.as_str(), "reason": reason,
                "last_seen_ms": last_seen,
            }),
            &format!(
                "presence {} {}{}",
                p.client_id,
                p.state.as_str(),
                reason.map(|r| format!(" ({r})")).unwrap_or_default()
            ),
        );
    }
}
