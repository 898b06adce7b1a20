//! The `tether` command: a thin shell of clap and tracing over the `tether` library.
//!
//! # Layout
//! - `serve`: [`serve::prepare`] builds a [`tether::ServerConfig`] from defaults, then the TOML file, then flags,
//!   before the runtime starts; [`serve::run`] serves it and prints events (JSON lines on stdout with
//!   `--events json`, human lines on stderr otherwise).
//! - `connect`: [`connect::run`] connects a [`tether::Client`], sends stdin lines as `DATA`, prints what arrives.
//! - `bench` / `bench-worker`: [`mod@bench`], flags over the `tether-bench` crate (coordinator and load generator).
//! - `token`: [`token`], mints client tokens; also loads the auth secret for `serve`.
//! - `cert`: [`cert`], writes a throwaway CA, server and client certificate for TLS tests and demos.
//! - [`duration`]: `500ms` / `1.5s` / `30s` parsing for flags and the file.
//! - [`sd_notify`]: `serve` tells a service manager (systemd's `Type=notify`) when it is ready and stopping.

mod bench;
mod cert;
mod cluster;
mod connect;
mod duration;
mod output;
mod probe;
mod sd_notify;
mod serve;
mod sockets;
mod token;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "tether", version, about = "Keep long-lived TCP connections honest")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a server (in-memory single node).
    Serve(Box<serve::Args>),
    /// Connect to a server as one client id; stdin lines are sent as DATA.
    Connect(Box<connect::Args>),
    /// Measure a server under load: idle cost, connect rate, detection, takeover, restart storm, message relay.
    Bench(Box<bench::Args>),
    /// Mint a client token for a server started with an auth secret.
    Token(token::Args),
    /// Write a throwaway CA, server certificate and client certificate (PEM) for TLS tests and demos.
    Cert(cert::Args),
    /// The kernel's TCP sockets of the server's port beside tether's sessions; flags the ones tether does not hold.
    Sockets(sockets::Args),
    /// Is it the network or the program? ICMP, TCP, TLS, HELLO and round trips to a server, then one verdict.
    Probe(Box<probe::Args>),
    /// The cluster as Redis holds it.
    #[command(subcommand)]
    Cluster(cluster::Command),
    /// One load-generator process of `tether bench` (started by it).
    #[command(hide = true)]
    BenchWorker(bench::WorkerArgs),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let logging = output::init_logging();
    // What runs on the runtime. Everything that reads files or answers at once is done before it starts.
    enum Job {
        Command(Command),
        Probe(Box<probe::Prepared>),
        Connect(Box<connect::Prepared>),
        Serve(Box<serve::Prepared>),
    }
    // `tether serve --threads`: the runtime's worker threads, one event loop each.
    let mut threads = None;
    // `Err`: the command has run (or failed) before the runtime, with this result.
    let job = match cli.command {
        Command::Bench(args) => Err(bench::run(*args)),
        Command::Token(args) => Err(token::run(args)),
        Command::Cert(args) => Err(cert::run(args)),
        Command::Sockets(args) => Err(sockets::run(args)),
        Command::Cluster(cmd) => Err(cluster::run(cmd)),
        Command::Probe(args) if args.is_from_server() => Err(probe::from_server(&args)),
        Command::Probe(args) => probe::prepare(*args).map(|p| Job::Probe(Box::new(p))).map_err(Err),
        Command::Serve(args) => serve::prepare(*args)
            .map(|p| {
                threads = p.threads;
                Job::Serve(Box::new(p))
            })
            .map_err(Err),
        Command::Connect(args) => connect::prepare(*args).map(|p| Job::Connect(Box::new(p))).map_err(Err),
        other => Ok(Job::Command(other)),
    };
    let job = match job {
        Ok(job) => job,
        Err(result) => {
            // What was logged comes out before the error that ends the command.
            drop(logging);
            return finish(result);
        }
    };
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    if let Some(n) = threads {
        builder.worker_threads(n);
    }
    let rt = match builder.build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tether: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let dropped_logs = logging.dropped.clone();
    let result = rt.block_on(async {
        tokio::spawn(output::report_dropped_logs(dropped_logs, std::time::Duration::from_secs(1)));
        match job {
            Job::Probe(p) => probe::run(*p).await,
            Job::Serve(p) => serve::run(*p).await,
            Job::Connect(p) => connect::run(*p).await,
            Job::Command(Command::BenchWorker(args)) => bench::worker(args).await,
            Job::Command(_) => unreachable!("handled before the runtime starts"),
        }
    });
    // A pending stdin read lives on a blocking thread; do not wait for it.
    rt.shutdown_background();
    // What was logged comes out before the error that ends the command.
    drop(logging);
    finish(result)
}

fn finish(result: anyhow::Result<std::process::ExitCode>) -> std::process::ExitCode {
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("tether: {}", causes(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

/// An error and its causes, `: `-separated, without a cause that only repeats what the message before it already
/// says (the redis crate's errors, say, print their I/O error and then give it again as their source).
fn causes(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.ends_with(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

/// Install the SIGINT and SIGTERM handlers now, and return a future that resolves when either arrives.
/// The handlers are installed before the caller prints its first line, so a script that signals as soon as it
/// sees output never hits the default action (which would skip the goodbye).
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    Ok(async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
    })
}

/// Print one JSON line on stdout and flush it at once. Only off the runtime (the benchmark coordinator): on a
/// runtime thread, output goes through [`output`]'s writer threads.
fn emit_json(v: &serde_json::Value) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{v}");
    let _ = out.flush();
}

/// Print one line on stdout and flush it. Only off the runtime, as [`emit_json`].
fn emit_line(line: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// A file's bytes, with its path in the error.
fn read_file(path: &std::path::Path) -> anyhow::Result<Vec<u8>> {
    use anyhow::Context;
    std::fs::read(path).with_context(|| format!("reading {}", path.display()))
}
