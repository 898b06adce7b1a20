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
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum TargetArg {
    Tether,
    Mosquitto,
}

#[derive(clap::Args, Debug)]
pub struct Args {
    /// What to measure.
    #[arg(value_enum)]
    scenario: ScenarioArg,
    /// Server to measure: tether (started by this run) or mosquitto (started by this run, for comparison).
    #[arg(long, value_enum, default_value = "tether")]
    target: TargetArg,
    /// Connections to open.
    #[arg(long, default_value_t = 1000)]
    connections: usize,
    /// Heartbeat interval (MQTT keepalive for mosquitto; whole seconds there).
    #[arg(long, value_parser = duration::parse, default_value = "5s", value_name = "DUR")]
    heartbeat_interval: Duration,
    /// idle: how long to hold the connections while measuring.
    #[arg(long, value_parser = duration::parse, default_value = "10s", value_name = "DUR")]
    hold: Duration,
    /// idle: wait this long after the connections are up before the hold [default: one heartbeat interval + 1s,
    /// past the server's first round-trip probe].
    #[arg(long, value_parser = duration::parse, value_name = "DUR")]
    settle: Option<Duration>,
    /// detect: connections that go silent [default: a tenth].
    #[arg(long)]
    silent: Option<usize>,
    /// takeover: live ids that reconnect [default: a tenth].
    #[arg(long)]
    takeovers: Option<usize>,
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
}

fn target(t: TargetArg) -> Target {
    match t {
        TargetArg::Tether => Target::Tether,
        TargetArg::Mosquitto => Target::Mosquitto,
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
    };
    if args.target == TargetArg::Mosquitto && args.heartbeat_interval < Duration::from_secs(1) {
        anyhow::bail!("MQTT keepalive is in whole seconds: use --heartbeat-interval 1s or more for mosquitto");
    }
    let opts = Opts {
        scenario,
        target: target(args.target),
        connections: args.connections.max(1),
        heartbeat_interval: args.heartbeat_interval,
        hold: args.hold,
        settle: args.settle.unwrap_or(args.heartbeat_interval + Duration::from_secs(1)),
        silent: args.silent.unwrap_or(args.connections / 10).max(1),
        takeovers: args.takeovers.unwrap_or(args.connections / 10).max(1),
        per_worker: args.per_worker.clamp(1, 19_000),
        concurrency: args.concurrency.max(1),
        server: args.server,
        server_pid: args.server_pid,
        exe: std::env::current_exe().context("locating the tether executable")?,
        server_args: args.server_args,
        nodes: args.nodes,
    };
    let report = tether_bench::run(&opts)?;
    let width = report.rows.iter().map(|(k, _)| k.chars().count()).max().unwrap_or(0);
    match opts.variant() {
        Some(v) => println!("tether bench {} ({:?}, {v})", scenario.name(), opts.target),
        None => println!("tether bench {} ({:?})", scenario.name(), opts.target),
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
    let opts = WorkerOpts {
        target: target(args.target),
        addr: args.addr,
        source_ip: args.source_ip.as_deref().map(tether_bench::parse_ip).transpose()?,
        count: args.count,
        first: args.first,
        prefix: args.prefix,
        interval: args.interval,
        concurrency: args.concurrency,
        reconnect: args.reconnect,
        max_seconds: args.max_seconds,
    };
    tether_bench::worker::run(opts).await?;
    Ok(ExitCode::SUCCESS)
}
