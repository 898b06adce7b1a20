//! The `cluster` scenario: `--nodes` tether nodes on one Redis, the connections spread evenly over them.
//!
//! # What it measures, in order
//! 1. **At rest** (after the settle, over the hold): each node's RSS and CPU, RSS per connection, Redis's memory
//!    per session and commands per second.
//! 2. **A reconnect wave**: a tenth of the ids reconnect (each to its own node) while their old connection is
//!    live; the wave's duration and Redis's commands per second during it.
//! 3. **Cross-node takeover**: `--takeovers` ids of node 0 say `HELLO` on node 4 (which first closes as many of
//!    its own, for descriptor room); `HELLO` → `WELCOME`.
//! 4. **Presence propagation**: a watcher on node 1 subscribed to 200 ids of node 2; those clients say `BYE`, one
//!    at a time; from the `BYE` to the watcher's `PRESENCE`.
//! 5. **Node loss**: the watcher subscribes to 1,000 ids of node 3, which is killed (`kill -9`); from the kill
//!    to the last of those offlines at the watcher, and to the reaping node's `node_lost` event.
//! 6. **A late node**: a node started now (with an admin listener) reads every other node's sessions from Redis
//!    before it serves: from its start to its view holding all of them (`remote_sessions`), and Redis's commands
//!    meanwhile.
//! 7. **A full repair**: Redis drops every node's pub/sub connection (`CLIENT KILL TYPE pubsub`); each node
//!    reconnects and checks its whole view against Redis. From the kill to the late node's repair, and Redis's
//!    commands meanwhile.
//!
//! Redis is a `redis-server` this run starts on a free loopback port (no persistence) and stops. Everything is
//! read with `redis-cli`; nothing else talks to it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Value};

use super::{ask, connected, event, exchanges, ms3, pct, sorted_ms, spawn_tether, sys, Child2, Opts, Report};
use crate::redis::Redis;

/// Subscriptions one watcher connection may hold by default.
const WATCHED: usize = 1000;

struct Node {
    addr: SocketAddr,
    pid: u32,
    proc: Child2,
}

fn spawn_node(opts: &Opts, redis: &Redis, i: usize, per_node: usize) -> anyhow::Result<Node> {
    Ok(spawn_node_with(opts, redis, i, per_node, "off")?.0)
}

/// A node with its admin listener on `admin` (`off`, or an address), and that listener's address.
fn spawn_node_with(
    opts: &Opts,
    redis: &Redis,
    i: usize,
    per_node: usize,
    admin: &str,
) -> anyhow::Result<(Node, Option<SocketAddr>)> {
    let mut o = opts.clone();
    o.connections = per_node + WATCHED;
    let id = format!("n{i}");
    o.server_args.extend(["--cluster", &redis.url(), "--node-id", &id].map(String::from));
    o.server_args.extend(["--admin", admin].map(String::from));
    let proc = spawn_tether(&o, "127.0.0.1:0", &[])?;
    let l = proc.expect("listening", Duration::from_secs(20), |v| event(v) == "listening")?;
    let addr = l["addr"].as_str().context("listening addr")?.parse()?;
    let admin = l["admin"].as_str().map(str::parse).transpose().context("listening admin")?;
    Ok((Node { addr, pid: proc.child.id(), proc }, admin))
}

/// A node's `GET /v1/cluster`.
fn cluster_json(admin: SocketAddr) -> anyhow::Result<Value> {
    Ok(serde_json::from_str(&crate::scrape::get(admin, "/v1/cluster")?)?)
}

/// Workers for node `i`: ids `c{first}` .. for its share, each worker on its own source address.
fn spawn_node_workers(opts: &Opts, node: &Node, i: usize, per_node: usize) -> anyhow::Result<Vec<Child2>> {
    let per = opts.per_worker.max(1);
    let n = per_node.div_ceil(per).max(1);
    let mut out = Vec::new();
    for w in 0..n {
        let first = i * per_node + w * per;
        let count = per.min(per_node - w * per);
        let mut cmd = Command::new(&opts.exe);
        cmd.args(["bench-worker", "--addr", &node.addr.to_string(), "--count", &count.to_string()])
            .args(["--first", &first.to_string(), "--prefix", "c"])
            .args(["--interval", &format!("{}ms", opts.heartbeat_interval.as_millis())])
            .args(["--concurrency", &opts.concurrency.to_string(), "--max-seconds", "1800"])
            .args(["--source-ip", &format!("127.0.{}.{}", 2 + i, w + 1)])
            .env("RUST_LOG", "warn");
        out.push(Child2::spawn(&mut cmd)?);
    }
    Ok(out)
}

/// A tether client watching presence, on a thread with its own runtime: (id, state, reason, arrival µs) lines.
/// Both channels are bounded: when the coordinator stops reading, the watcher's thread waits, stops reading its
/// socket, and the server cuts it off as a slow consumer.
struct Watcher {
    events: std::sync::mpsc::Receiver<(String, String, Option<String>, u64)>,
    subscribe: tokio::sync::mpsc::Sender<Vec<String>>,
}

/// Presence lines waiting for the coordinator: a snapshot and the changes of the watched ids, several times over.
const WATCHER_LINES: usize = 4 * WATCHED;

impl Watcher {
    fn start(addr: SocketAddr, id: &str) -> anyhow::Result<Watcher> {
        let id = id.to_owned();
        let (tx, events) = std::sync::mpsc::sync_channel(WATCHER_LINES);
        let (subscribe, mut subs) = tokio::sync::mpsc::channel::<Vec<String>>(1);
        let (ready_tx, ready) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            rt.block_on(async move {
                let mut cfg = tether::ClientConfig::new(id);
                cfg.heartbeat_interval = Some(Duration::from_secs(5));
                let mut c = match tether::Client::connect(addr, cfg).await {
                    Ok(c) => c,
                    Err(e) => return drop(ready_tx.send(Err(e.to_string()))),
                };
                let _ = ready_tx.send(Ok(()));
                loop {
                    tokio::select! {
                        ev = c.next_event() => match ev {
                            Some(tether::ClientEvent::Presence(p)) => {
                                let reason = p.reason.map(|r| r.as_str().to_owned());
                                let line = (p.client_id, p.state.as_str().to_owned(), reason, sys::epoch_us());
                                if tx.send(line).is_err() {
                                    return;
                                }
                            }
                            Some(tether::ClientEvent::Disconnected(_)) | None => return,
                            Some(_) => {}
                        },
                        ids = subs.recv() => match ids {
                            Some(ids) => {
                                let _ = c.subscribe(ids).await;
                            }
                            None => return,
                        },
                    }
                }
            });
        });
        match ready.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(())) => Ok(Watcher { events, subscribe }),
            Ok(Err(e)) => bail!("the watcher could not connect: {e}"),
            Err(_) => bail!("the watcher did not connect"),
        }
    }

    /// Subscribe to `ids` and wait for their snapshot.
    fn watch(&self, ids: &[String]) -> anyhow::Result<()> {
        // The coordinator has no runtime: a blocking send is right here.
        self.subscribe.blocking_send(ids.to_vec()).ok().context("watcher gone")?;
        let mut left: std::collections::HashSet<&String> = ids.iter().collect();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !left.is_empty() {
            let (id, ..) = self
                .events
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .context("no snapshot for the watched ids")?;
            left.remove(&id);
        }
        Ok(())
    }

    /// Offlines of `ids` until every one arrived or `within` passed: id -> (arrival µs, reason).
    fn offlines(&self, ids: &[String], within: Duration) -> HashMap<String, (u64, Option<String>)> {
        let wanted: std::collections::HashSet<&String> = ids.iter().collect();
        let mut got = HashMap::new();
        let deadline = Instant::now() + within;
        while got.len() < wanted.len() {
            let Ok((id, state, reason, at)) =
                self.events.recv_timeout(deadline.saturating_duration_since(Instant::now()))
            else {
                break;
            };
            if state == "offline" && wanted.contains(&id) {
                got.entry(id).or_insert((at, reason));
            }
        }
        got
    }
}

fn rss_and_cpu(nodes: &[Node]) -> Vec<(Option<u64>, Option<Duration>)> {
    nodes.iter().map(|n| (sys::rss_bytes(n.pid), sys::cpu_time(n.pid))).collect()
}

pub fn run(opts: &Opts) -> anyhow::Result<Report> {
    let k = opts.nodes.max(4);
    let per_node = opts.connections / k;
    let n = per_node * k;
    sys::wait_quiet(Duration::from_secs(60));
    let redis = Redis::try_start().context("starting redis-server (apt-get install redis-server)")?;
    let mut nodes = Vec::new();
    for i in 0..k {
        nodes.push(spawn_node(opts, &redis, i, per_node)?);
    }
    let empty = rss_and_cpu(&nodes);
    let mem0 = redis.info("used_memory").context("INFO used_memory")?;
    let mut workers: Vec<Vec<Child2>> = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        workers.push(spawn_node_workers(opts, node, i, per_node)?);
    }
    let limit = Duration::from_secs(120) + Duration::from_millis(n as u64 * 5);
    let mut failed = 0;
    for ws in &workers {
        failed += connected(ws, limit)?.2;
    }
    if failed > 0 {
        bail!("{failed} of {n} connections could not be opened");
    }
    let mut rows =
        vec![("nodes".to_owned(), k.to_string()), ("connections".to_owned(), format!("{n} ({per_node} per node)"))];
    let mut out = json!({
        "scenario": "cluster", "target": "tether", "nodes": k, "connections": n,
        "heartbeat_interval_ms": opts.heartbeat_interval.as_millis() as u64,
    });

    // 1. At rest.
    std::thread::sleep(opts.settle);
    let ex0 = exchanges(workers.iter_mut().flatten())?.heartbeats;
    let before = rss_and_cpu(&nodes);
    let cmd0 = redis.info("total_commands_processed").context("INFO total_commands_processed")?;
    let t0 = Instant::now();
    std::thread::sleep(opts.hold);
    let held = t0.elapsed().as_secs_f64();
    let cmd1 = redis.info("total_commands_processed").context("INFO total_commands_processed")?;
    let after = rss_and_cpu(&nodes);
    let ex1 = exchanges(workers.iter_mut().flatten())?.heartbeats;
    let mem1 = redis.info("used_memory").context("INFO used_memory")?;
    let keys = redis.cli(&["DBSIZE"]).parse::<u64>().unwrap_or(0);
    let hb = ex1.saturating_sub(ex0) as f64;
    let rss: Vec<u64> = after.iter().map(|(r, _)| r.unwrap_or(0)).collect();
    let rss_per_conn: Vec<f64> =
        rss.iter().zip(&empty).map(|(r, (e, _))| (*r as f64 - e.unwrap_or(0) as f64) / per_node as f64).collect();
    let cpu: Vec<f64> = before
        .iter()
        .zip(&after)
        .map(|((_, a), (_, b))| a.zip(*b).map_or(f64::NAN, |(a, b)| (b - a).as_secs_f64()))
        .collect();
    let cpu_total: f64 = cpu.iter().sum();
    let redis_per_session = (mem1 as f64 - mem0 as f64) / n as f64;
    let rest_cps = (cmd1 - cmd0) as f64 / held;
    out["node_rss_bytes"] = json!(rss);
    out["rss_per_conn_bytes"] = json!(rss_per_conn.iter().map(|x| x.round()).collect::<Vec<_>>());
    out["node_cpu_s"] = json!(cpu.iter().map(|c| ms3(*c)).collect::<Vec<_>>());
    out["cpu_s_per_10k_heartbeats"] = json!(ms3(cpu_total / hb.max(1.0) * 1e4));
    out["heartbeats_per_s"] = json!((hb / held).round());
    out["held_s"] = json!(ms3(held));
    out["redis_used_memory_bytes"] = json!(mem1);
    out["redis_keys"] = json!(keys);
    out["redis_bytes_per_session"] = json!(redis_per_session.round());
    out["redis_commands_per_s_at_rest"] = json!(ms3(rest_cps));
    let mb = |b: u64| b as f64 / (1 << 20) as f64;
    rows.push((
        "node RSS (each)".into(),
        rss.iter().map(|r| format!("{:.1} MB", mb(*r))).collect::<Vec<_>>().join(", "),
    ));
    let avg_per_conn = rss_per_conn.iter().sum::<f64>() / k as f64;
    rows.push(("node RSS per connection (mean)".into(), format!("{avg_per_conn:.0} B")));
    rows.push((
        "node CPU over the hold (each)".into(),
        cpu.iter().map(|c| format!("{c:.2} s")).collect::<Vec<_>>().join(", "),
    ));
    rows.push(("CPU per 10k heartbeats (all nodes)".into(), format!("{:.3} s", cpu_total / hb.max(1.0) * 1e4)));
    rows.push(("Redis memory per session".into(), format!("{redis_per_session:.0} B ({:.1} MB in all)", mb(mem1))));
    rows.push(("Redis commands per second at rest".into(), format!("{rest_cps:.1}")));

    // 2. A reconnect wave: a tenth of the ids, each to its own node.
    let wave = n / 10;
    let c0 = redis.info("total_commands_processed").context("INFO total_commands_processed")?;
    let t0 = Instant::now();
    let per_worker = wave.div_ceil(workers.iter().map(Vec::len).sum::<usize>());
    let done =
        ask(workers.iter_mut().flatten(), &format!("takeover {per_worker}"), "takeover", Duration::from_secs(300))?;
    let wave_done: usize = done.iter().map(|v| v["latencies_us"].as_array().map_or(0, Vec::len)).sum();
    let wave_s = t0.elapsed().as_secs_f64();
    let wave_cps =
        (redis.info("total_commands_processed").context("INFO total_commands_processed")? - c0) as f64 / wave_s;
    out["wave_reconnects"] = json!(wave_done);
    out["wave_s"] = json!(ms3(wave_s));
    out["redis_commands_per_s_wave"] = json!(ms3(wave_cps));
    rows.push(("reconnect wave".into(), format!("{wave_done} ids in {wave_s:.2} s")));
    rows.push(("Redis commands per second during the wave".into(), format!("{wave_cps:.0}")));

    // 3. Cross-node takeover: ids of node 0 say HELLO on node 4. The workers' last ids took part in the wave:
    //    the takeovers use those (they are live on node 0 again). Node 4 first makes room (each process may hold
    //    at most 20,000 descriptors): as many of its clients say BYE.
    let takeovers = opts.takeovers.min(per_node / 10).max(1);
    let room = takeovers.div_ceil(workers[4].len());
    ask(&mut workers[4], &format!("close {room}"), "closed", Duration::from_secs(30))?;
    let share = takeovers.div_ceil(workers[0].len());
    let cmd = format!("takeover {share} {}", nodes[4].addr);
    let done = ask(&mut workers[0], &cmd, "takeover", Duration::from_secs(120))?;
    let lat: Vec<u64> = done
        .iter()
        .flat_map(|v| v["latencies_us"].as_array().into_iter().flatten().filter_map(Value::as_u64))
        .collect();
    let l = sorted_ms(&lat);
    out["cross_takeovers"] = json!(l.len());
    out["cross_takeover_ms_p50"] = json!(ms3(pct(&l, 0.5)));
    out["cross_takeover_ms_p99"] = json!(ms3(pct(&l, 0.99)));
    rows.push((
        "cross-node takeover HELLO→WELCOME p50 / p99".into(),
        format!("{:.3} / {:.3} ms ({} takeovers)", pct(&l, 0.5), pct(&l, 0.99), l.len()),
    ));

    // 4. Presence propagation: BYE on node 2 -> PRESENCE at a watcher on node 1, one close at a time (the
    //    latency of one change, not of a queue of them).
    let watcher = Watcher::start(nodes[1].addr, "bench-watcher-presence")?;
    let samples = 200.min(per_node / 4);
    let first2 = 2 * per_node;
    let ids2: Vec<String> = (0..samples).map(|j| format!("c{}", first2 + j)).collect();
    watcher.watch(&ids2)?;
    let ws2 = &mut workers[2];
    let mut prop = Vec::new();
    for _ in 0..samples {
        let w = &mut ws2[0];
        w.send("close 1")?;
        let v = w.expect("closed", Duration::from_secs(10), |v| event(v) == "closed")?;
        let at = v["at_us"].as_u64().unwrap_or(0);
        let Some(id) = v["ids"].as_array().and_then(|a| a.first()).and_then(Value::as_str) else { continue };
        let got = watcher.offlines(&[id.to_owned()], Duration::from_secs(10));
        if let Some((seen, _)) = got.get(id) {
            prop.push(seen.saturating_sub(at) as f64 / 1000.0);
        }
    }
    prop.sort_by(f64::total_cmp);
    out["presence_samples"] = json!(samples);
    out["presence_received"] = json!(prop.len());
    out["presence_ms_p50"] = json!(ms3(pct(&prop, 0.5)));
    out["presence_ms_p99"] = json!(ms3(pct(&prop, 0.99)));
    rows.push((
        "presence propagation (BYE on one node → PRESENCE on another) p50 / p99".into(),
        format!("{:.3} / {:.3} ms ({} of {samples})", pct(&prop, 0.5), pct(&prop, 0.99), prop.len()),
    ));

    // 5. Node loss: kill -9 of node 3; its ids watched from node 1.
    let first3 = 3 * per_node;
    let stride = (per_node / WATCHED.min(per_node)).max(1);
    let ids3: Vec<String> = (0..WATCHED.min(per_node)).map(|j| format!("c{}", first3 + j * stride)).collect();
    let watcher = Watcher::start(nodes[1].addr, "bench-watcher-loss")?;
    watcher.watch(&ids3)?;
    let killed = nodes.remove(3);
    let t_kill = sys::epoch_us();
    drop(killed.proc); // SIGKILL
    let offs = watcher.offlines(&ids3, Duration::from_secs(60));
    let last = offs.values().map(|(at, _)| *at).max().unwrap_or(t_kill);
    let lost = offs.values().filter(|(_, r)| r.as_deref() == Some("node_lost")).count();
    let loss_s = last.saturating_sub(t_kill) as f64 / 1e6;
    // The reaping node says when it finished.
    let mut reaped_s = f64::NAN;
    let mut reaped = 0;
    let deadline = Instant::now() + Duration::from_secs(30);
    'outer: while Instant::now() < deadline {
        for node in &nodes {
            while let Ok(v) = node.proc.lines.try_recv() {
                if event(&v) == "node_lost" {
                    reaped = v["sessions"].as_u64().unwrap_or(0);
                    reaped_s = (sys::epoch_us().saturating_sub(t_kill)) as f64 / 1e6;
                    break 'outer;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    out["loss_watched"] = json!(ids3.len());
    out["loss_node_lost"] = json!(lost);
    out["loss_last_offline_s"] = json!(ms3(loss_s));
    out["loss_reaped_sessions"] = json!(reaped);
    out["loss_reaped_s"] = json!(ms3(reaped_s));
    rows.push((
        "node loss: kill -9 → last watched offline".into(),
        format!("{loss_s:.3} s ({lost} of {} node_lost; lease 3 s)", ids3.len()),
    ));
    rows.push((
        "node loss: kill -9 → reaping finished (its node_lost event)".into(),
        format!("{reaped_s:.3} s ({reaped} sessions)"),
    ));

    // 6. A late node reads every other node's sessions before it serves.
    let held_elsewhere: u64 =
        redis.cli(&["EVAL", "return #redis.call('KEYS', 'tether:id:*')", "0"]).parse().context("counting ids")?;
    let c0 = redis.info("total_commands_processed").context("INFO total_commands_processed")?;
    let t0 = Instant::now();
    let (late, late_admin) = spawn_node_with(opts, &redis, k, per_node, "127.0.0.1:0")?;
    let late_admin = late_admin.context("the late node's admin listener")?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut view = 0;
    while view < held_elsewhere && Instant::now() < deadline {
        view = cluster_json(late_admin)?["remote_sessions"].as_u64().unwrap_or(0);
        std::thread::sleep(Duration::from_millis(5));
    }
    let join_s = t0.elapsed().as_secs_f64();
    let join_cmds = redis.info("total_commands_processed").context("INFO total_commands_processed")? - c0;
    out["late_node_ids"] = json!(view);
    out["late_node_view_s"] = json!(ms3(join_s));
    out["late_node_redis_commands"] = json!(join_cmds);
    rows.push((
        "a late node: start → its view holds every other node's ids".into(),
        format!("{join_s:.3} s ({view} of {held_elsewhere} ids; {join_cmds} Redis commands)"),
    ));

    // 7. A full repair: every node's pub/sub connection dropped at once; each checks its whole view.
    let before = cluster_json(late_admin)?;
    let repairs0 = before["repairs"].as_u64().unwrap_or(0);
    let repaired0 = before["repaired"].as_u64().unwrap_or(0);
    let c0 = redis.info("total_commands_processed").context("INFO total_commands_processed")?;
    let t0 = Instant::now();
    redis.client_kill_pubsub();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut after = cluster_json(late_admin)?;
    while after["repairs"].as_u64().unwrap_or(0) <= repairs0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
        after = cluster_json(late_admin)?;
    }
    let repair_s = t0.elapsed().as_secs_f64();
    let repair_cmds = redis.info("total_commands_processed").context("INFO total_commands_processed")? - c0;
    let repaired = after["repaired"].as_u64().unwrap_or(0) - repaired0;
    out["full_repair_s"] = json!(ms3(repair_s));
    out["full_repair_redis_commands"] = json!(repair_cmds);
    out["full_repair_changed_ids"] = json!(repaired);
    rows.push((
        "a full repair (all pub/sub connections killed): kill → the late node's view checked".into(),
        format!(
            "{repair_s:.3} s ({view} ids in its view, {repaired} changed; {repair_cmds} Redis commands, all nodes)"
        ),
    ));
    drop(late);

    for w in workers.iter_mut().flatten() {
        let _ = w.send("stop");
    }
    Ok(Report { json: out, rows })
}
