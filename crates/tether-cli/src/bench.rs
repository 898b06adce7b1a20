//! `tether bench` and the hidden `tether bench-worker`: flags over the `tether-bench` crate.
//!
//! # Layout
//! [`Args`] → [`tether_bench::Opts`], then a human table on stdout and, with `--json`, one JSON object as the last
//! line. [`WorkerArgs`] → [`tether_bench::WorkerOpts`] for the load-generator processes the coordinator spawns.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::ValueEnum;
use tether_bench::{Opts, Scenario, Target, WorkerOpts};

use crate::duration;

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum ScenarioArg {
    Idle,
    Connect,
    Detect,
    Takeover,
    Storm,
    /// Several nodes on one Redis (started by this run): rest, a reconnect wave, cross-node takeover, presence
    /// propagation, node loss.
    Cluster,
    /// Messages relayed between pairs of clients at full speed within a window: throughput, latency, server CPU,
    /// bytes and acknowledgements per message (at most once, or acknowledged with --reliable).
    Relay,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum TargetArg {
    Tether,
    Mosquitto,
    Rumqttd,
    Nats,
}

#[derive(clap::Args, Debug)]
pub struct Args {
    /// What to measure.
    #[arg(value_enum)]
    scenario: ScenarioArg,
    /// Server to measure, started by this run: tether, or a peer for comparison (mosquitto, rumqttd, nats; a
    /// generated config in a temp dir). rumqttd comes from $TETHER_BENCH_RUMQTTD, PATH, or the cache
    /// scripts/install-rumqttd builds it into.
    #[arg(long, value_enum, default_value = "tether")]
    target: TargetArg,
    /// Connections to open.
    #[arg(long, default_value_t = 1000)]
    connections: usize,
    /// Heartbeat interval (MQTT keepalive for mosquitto and rumqttd, whole seconds there; ping_interval for
    /// nats).
    #[arg(long, value_parser = duration::parse, default_value = "5s", value_name = "DUR")]
    heartbeat_interval: Duration,
    /// idle: how long to hold the connections while measuring; relay: how long to measure the flow.
    #[arg(long, value_parser = duration::parse, default_value = "10s", value_name = "DUR")]
    hold: Duration,
    /// idle: wait this long after the connections are up before the hold [default: one heartbeat interval + 1s,
    /// past the server's first round-trip probe]; relay: let the flow run this long before measuring [default: 2s].
    #[arg(long, value_parser = duration::parse, value_name = "DUR")]
    settle: Option<Duration>,
    /// detect: connections that go silent [default: a tenth].
    #[arg(long)]
    silent: Option<usize>,
    /// takeover: live ids that reconnect [default: a tenth].
    #[arg(long)]
    takeovers: Option<usize>,
    /// idle against tether: serve TLS (a certificate from a CA this run makes) and have every connection make a
    /// full TLS 1.3 handshake first, then heartbeat inside TLS. Reported as the scenario `idle_tls`.
    #[arg(long)]
    tls: bool,
    /// Connections per load-generator process (one process may hold at most 20,000 descriptors).
    #[arg(long, default_value_t = 5000)]
    per_worker: usize,
    /// Handshakes each load-generator process keeps in flight while connecting.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Measure this already running server instead of starting one (needs --server-pid).
    #[arg(long, value_name = "ADDR", requires = "server_pid")]
    server: Option<SocketAddr>,
    /// The process id of --server, to read its RSS and CPU.
    #[arg(long, value_name = "PID")]
    server_pid: Option<u32>,
    /// One more argument for the tether server this run starts (repeat it: `--server-arg --admin --server-arg
    /// off` measures with metrics off). The result is labelled "metrics off" or "metrics on".
    #[arg(long = "server-arg", value_name = "ARG", allow_hyphen_values = true, conflicts_with = "server")]
    server_args: Vec<String>,
    /// cluster: how many nodes (at least 4).
    #[arg(long, default_value_t = 5)]
    nodes: usize,
    #[command(flatten)]
    flow: FlowArgs,
    /// relay --reliable, tether: first hold this many messages in offline sessions (10,000 each) and report the
    /// server's RSS per held message.
    #[arg(long, default_value_t = 0, value_name = "K")]
    held: usize,
    /// The tether executable for the server this run starts [default: this one]: an older build measured under
    /// this load generator.
    #[arg(long, value_name = "PATH", conflicts_with = "server")]
    server_exe: Option<std::path::PathBuf>,
    /// Print the result as one JSON object on the last line.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args, Debug)]
pub struct WorkerArgs {
    #[arg(long)]
    addr: SocketAddr,
    #[arg(long, value_enum, default_value = "tether")]
    target: TargetArg,
    #[arg(long)]
    source_ip: Option<String>,
    #[arg(long)]
    count: usize,
    #[arg(long, default_value_t = 0)]
    first: usize,
    #[arg(long, default_value = "b")]
    prefix: String,
    #[arg(long, value_parser = duration::parse)]
    interval: Duration,
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    #[arg(long)]
    reconnect: bool,
    #[arg(long, default_value_t = 900)]
    max_seconds: u64,
    /// tether over TLS, trusting this CA (PEM).
    #[arg(long, value_name = "FILE")]
    tls_ca: Option<std::path::PathBuf>,
    /// The relay scenario's load generator: --pairs sender → receiver pairs instead of --count connections.
    #[arg(long)]
    relay: bool,
    #[command(flatten)]
    flow: FlowArgs,
}

/// The relay scenario's pairs and delivery, for `tether bench relay` and its load generator alike.
#[derive(clap::Args, Debug)]
pub struct FlowArgs {
    /// relay: sender → receiver pairs, two connections each.
    #[arg(long, default_value_t = 8)]
    pairs: usize,
    /// relay: each sender's window with --reliable, 1 to 1000 messages unacknowledged by the server (tether's
    /// client window, MQTT's PUBLISHes without PUBACK); every sender also keeps at most 4 windows sent and not yet
    /// received, the only bound at most once.
    #[arg(long, default_value_t = 100)]
    window: u64,
    /// relay: acknowledged delivery, tether's `reliable` extension (SDATA, ACK) or MQTT QoS 1 (PUBACK) [default: at
    /// most once, tether DATA or MQTT QoS 0].
    #[arg(long)]
    reliable: bool,
    /// relay --reliable, tether: the senders do not ask for delivery receipts.
    #[arg(long)]
    no_receipts: bool,
}

fn target(t: TargetArg) -> Target {
    match t {
        TargetArg::Tether => Target::Tether,
        TargetArg::Mosquitto => Target::Mosquitto,
        TargetArg::Rumqttd => Target::Rumqttd,
        TargetArg::Nats => Target::Nats,
    }
}

/// Runs without a tokio runtime: the coordinator only waits on processes and pipes.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let scenario = match args.scenario {
        ScenarioArg::Idle => Scenario::Idle,
        ScenarioArg::Connect => Scenario::Connect,
        ScenarioArg::Detect => Scenario::Detect,
        ScenarioArg::Takeover => Scenario::Takeover,
        ScenarioArg::Storm => Scenario::Storm,
        ScenarioArg::Cluster => Scenario::Cluster,
        ScenarioArg::Relay => Scenario::Relay,
    };
    if target(args.target).is_mqtt() && args.heartbeat_interval < Duration::from_secs(1) {
        anyhow::bail!("MQTT keepalive is in whole seconds: use --heartbeat-interval 1s or more for an MQTT broker");
    }
    let opts = Opts {
        scenario,
        target: target(args.target),
        connections: args.connections.max(1),
        heartbeat_interval: args.heartbeat_interval,
        hold: args.hold,
        settle: args.settle.unwrap_or(match scenario {
            Scenario::Relay => Duration::from_secs(2),
            _ => args.heartbeat_interval + Duration::from_secs(1),
        }),
        silent: args.silent.unwrap_or(args.connections / 10).max(1),
        takeovers: args.takeovers.unwrap_or(args.connections / 10).max(1),
        per_worker: args.per_worker.clamp(1, 19_000),
        concurrency: args.concurrency.max(1),
        server: args.server,
        server_pid: args.server_pid,
        exe: std::env::current_exe().context("locating the tether executable")?,
        server_args: args.server_args,
        nodes: args.nodes,
        pairs: args.flow.pairs.max(1),
        window: args.flow.window,
        reliable: args.flow.reliable,
        receipts: !args.flow.no_receipts,
        held: args.held,
        server_exe: args.server_exe,
        tls: args.tls,
    };
    let report = tether_bench::run(&opts)?;
    let width = report.rows.iter().map(|(k, _)| k.chars().count()).max().unwrap_or(0);
    let tls = if opts.tls { ", TLS 1.3" } else { "" };
    match opts.variant() {
        Some(v) => println!("tether bench {} ({}, {v}{tls})", scenario.name(), opts.target.name()),
        None => println!("tether bench {} ({}{tls})", scenario.name(), opts.target.name()),
    }
    for (k, v) in &report.rows {
        println!("  {k:<width$}  {v}");
    }
    if args.json {
        crate::emit_json(&report.json);
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn worker(args: WorkerArgs) -> anyhow::Result<ExitCode> {
    let source_ip = args.source_ip.as_deref().map(tether_bench::parse_ip).transpose()?;
    if args.relay {
        let opts = tether_bench::relay::load::RelayOpts {
            target: target(args.target),
            addr: args.addr,
            source_ip,
            pairs: args.flow.pairs,
            window: args.flow.window,
            reliable: args.flow.reliable,
            receipts: !args.flow.no_receipts,
            interval: args.interval,
            limit: u64::MAX,
            max_seconds: args.max_seconds,
        };
        tether_bench::relay::load::run(opts).await?;
        return Ok(ExitCode::SUCCESS);
    }
    let opts = WorkerOpts {
        target: target(args.target),
        addr: args.addr,
        source_ip,
        count: args.count,
        first: args.first,
        prefix: args.prefix,
        interval: args.interval,
        concurrency: args.concurrency,
        reconnect: args.reconnect,
        max_seconds: args.max_seconds,
        tls: args.tls_ca.as_deref().map(tether_bench::tls::client_config).transpose()?,
    };
    tether_bench::worker::run(opts).await?;
    Ok(ExitCode::SUCCESS)
}
