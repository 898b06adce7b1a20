//! The comparison servers a run starts: Mosquitto, rumqttd and nats-server (the peers), each on 127.0.0.1 and
//! free ports, with a config of its own in a scratch directory.
//!
//! # Layout
//! [`start`] finds the executable ([`executable`]), writes [`config`], starts the process and waits for its
//! listeners; the [`Server`] it returns owns the process (killed on drop, so also when the run fails) and the
//! directory (removed on drop). [`version`] is the executable's own version line and [`detection_rule`] says how
//! each system declares a silent client dead, as the `detect` scenario measures it; both go into the results.
//!
//! The settings every peer gets, and why:
//! - **Mosquitto**: `persistence false`, no logging, `max_keepalive 65535`, `set_tcp_nodelay true`; the rest
//!   its defaults (no connection limit).
//! - **rumqttd** (MQTT 3.1.1 listener only; no v5, websocket, console or metrics listeners): `max_connections`
//!   the run's connections + 1,000 (it refuses beyond that); `next_connection_delay_ms = 0`, the least there
//!   is (it sleeps that long after every accept, its sample config 1 ms; even 0 is a timer wait, so accepts stay
//!   near 1,000 a second); `connection_timeout_ms = 10000` for
//!   the `CONNECT` after accept; the sample config's payload, in-flight and segment sizes.
//! - **nats-server**: `ping_interval` = the heartbeat interval and `ping_max = 1` (see [`detection_rule`]),
//!   `max_connections` the run's connections + 1,000, and its HTTP monitoring listener on 127.0.0.1 (the
//!   `detect` scenario reads closed connections there); the rest its defaults.
//!
//! Each one inherits the run's open-file limit, raised to the hard limit by [`crate::sys::raise_nofile`].

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::{relay, scrape, Child2, Opts, Scenario, Server, Target, TempDir};

/// Where `scripts/bench` installs rumqttd (`cargo install --root`): `${XDG_CACHE_HOME:-$HOME/.cache}/tether-bench`,
/// outside the workspace so that `cargo clean` keeps it.
pub fn cache_root() -> Option<PathBuf> {
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache")))?;
    Some(cache.join("tether-bench"))
}

/// The environment variable that names the rumqttd executable, before `PATH` and the cache.
pub const RUMQTTD_ENV: &str = "TETHER_BENCH_RUMQTTD";

fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).chain([PathBuf::from("/usr/sbin")]).map(|d| d.join(name)).find(|p| p.is_file())
}

/// The peer's executable: Mosquitto and nats-server from `PATH` (or /usr/sbin, where Debian puts them);
/// rumqttd from `$TETHER_BENCH_RUMQTTD`, else `PATH`, else the cache `scripts/bench` installs it into.
pub fn executable(target: Target) -> anyhow::Result<PathBuf> {
    let (name, hint) = match target {
        Target::Tether => bail!("tether is not a peer"),
        Target::Mosquitto => ("mosquitto", "apt-get install mosquitto"),
        Target::Nats => ("nats-server", "apt-get install nats-server"),
        Target::Rumqttd => {
            if let Some(p) = std::env::var_os(RUMQTTD_ENV).filter(|v| !v.is_empty()) {
                return Ok(PathBuf::from(p));
            }
            let cached = cache_root().map(|c| c.join("bin/rumqttd")).filter(|p| p.is_file());
            return on_path("rumqttd").or(cached).context(
                "no rumqttd: set TETHER_BENCH_RUMQTTD, put it on PATH, or run scripts/bench (it installs one with \
                 cargo install rumqttd --version 0.20.0)",
            );
        }
    };
    on_path(name).with_context(|| format!("no {name} on PATH ({hint})"))
}

/// The executable's version line (`mosquitto -h`'s first line, `rumqttd --version`, `nats-server --version`).
pub fn version(target: Target, exe: &Path) -> Option<String> {
    let flag = if target == Target::Mosquitto { "-h" } else { "--version" };
    let out = Command::new(exe).arg(flag).stdin(Stdio::null()).output().ok()?;
    let text = [out.stdout, out.stderr].concat();
    String::from_utf8_lossy(&text).lines().map(str::trim).find(|l| !l.is_empty()).map(str::to_owned)
}

/// The config file a peer is started with: listening on `port` (and nats-server's monitoring on `monitor`).
pub fn config(target: Target, opts: &Opts, port: u16, monitor: u16) -> String {
    let max = opts.connections + 1000;
    match target {
        Target::Tether => String::new(),
        Target::Mosquitto => {
            let mut text = format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nlog_dest none\n\
                 max_keepalive 65535\nset_tcp_nodelay true\n"
            );
            if opts.scenario == Scenario::Relay {
                // QoS 1 messages beyond a subscriber's 20 in flight wait in its queue, which by default drops
                // beyond 1,000; the load generator's end-to-end bound keeps it below this, so none is dropped.
                text.push_str(&format!("max_queued_messages {}\n", opts.window * relay::load::GUARD + 100));
            }
            text
        }
        Target::Rumqttd => format!(
            "id = 0\n\n[router]\nid = 0\nmax_connections = {max}\nmax_outgoing_packet_count = 200\n\
             max_segment_size = 104857600\nmax_segment_count = 10\n\n\
             [v4.1]\nname = \"v4-1\"\nlisten = \"127.0.0.1:{port}\"\nnext_connection_delay_ms = 0\n\n\
             [v4.1.connections]\nconnection_timeout_ms = 10000\nmax_payload_size = 20480\n\
             max_inflight_count = 100\ndynamic_filters = true\n"
        ),
        Target::Nats => format!(
            "listen: \"127.0.0.1:{port}\"\nhttp: \"127.0.0.1:{monitor}\"\nping_interval: \"{}ms\"\nping_max: 1\n\
             max_connections: {max}\n",
            opts.heartbeat_interval.as_millis()
        ),
    }
}

/// How the target declares a silent client dead, and the deadline after its last frame that the `detect`
/// scenario measures lateness against.
pub fn detection_rule(target: Target, interval: Duration) -> (String, Duration) {
    let s = |d: Duration| format!("{:.3} s", d.as_secs_f64());
    match target {
        Target::Tether => {
            let t = interval.mul_f64(1.5);
            (
                format!(
                    "offline when nothing is heard for 1.5 × the heartbeat interval ({}): the server's verdict",
                    s(t)
                ),
                t,
            )
        }
        Target::Mosquitto | Target::Rumqttd => {
            let t = interval.mul_f64(1.5);
            (
                format!(
                    "disconnected when no packet arrives for 1.5 × the keepalive ({}), and the Will published: \
                     lateness is the Will's arrival at a subscriber",
                    s(t)
                ),
                t,
            )
        }
        Target::Nats => {
            let t = interval * 2;
            (
                format!(
                    "the server PINGs each client every ping_interval ({}) on a timer of the connection's own; a tick \
                     that finds ping_max (1) PING unanswered closes it (`Stale Connection`): 2 × ping_interval ({}) \
                     after the last PONG; lateness is the closed connection's `stop` in /connz",
                    s(interval),
                    s(t)
                ),
                t,
            )
        }
    }
}

fn free_port() -> anyhow::Result<TcpListener> {
    TcpListener::bind("127.0.0.1:0").context("finding a free port")
}

/// Wait (at most 10 s) until `addr` accepts a connection.
fn wait_listening(addr: SocketAddr, what: &str, proc: &mut Child2) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        if let Ok(Some(status)) = proc.child.try_wait() {
            bail!("{what} exited ({status}) before listening on {addr}");
        }
        if Instant::now() > deadline {
            bail!("{what} did not start listening on {addr}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Start the peer `opts.target` on 127.0.0.1 with a generated config.
pub(crate) fn start(opts: &Opts) -> anyhow::Result<Server> {
    let target = opts.target;
    let exe = executable(target)?;
    // Both ports are held until the config is written, so the two are distinct.
    let (l1, l2) = (free_port()?, free_port()?);
    let (port, monitor) = (l1.local_addr()?.port(), l2.local_addr()?.port());
    drop((l1, l2));
    let dir = std::env::temp_dir().join(format!("tether-bench-{}-{}", target.name(), std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let dir = TempDir(dir);
    let text = config(target, opts, port, monitor);
    let mut cmd = Command::new(&exe);
    match target {
        Target::Tether => bail!("tether is not a peer"),
        Target::Mosquitto => {
            let conf = dir.0.join("mosquitto.conf");
            std::fs::write(&conf, &text)?;
            cmd.arg("-c").arg(conf);
        }
        Target::Rumqttd => {
            // The extension tells its config loader the format.
            let conf = dir.0.join("rumqttd.toml");
            std::fs::write(&conf, &text)?;
            cmd.arg("-q").arg("-c").arg(conf);
        }
        Target::Nats => {
            let conf = dir.0.join("nats-server.conf");
            std::fs::write(&conf, &text)?;
            cmd.arg("-c").arg(conf);
        }
    }
    // rumqttd logs every disconnection on stdout at its quietest level: the reader thread drains it.
    cmd.stderr(Stdio::null());
    let mut p = Child2::spawn(&mut cmd).with_context(|| format!("starting {}", exe.display()))?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    wait_listening(addr, target.name(), &mut p)?;
    let monitor = if target == Target::Nats {
        let m = SocketAddr::from(([127, 0, 0, 1], monitor));
        wait_listening(m, "nats-server's monitoring", &mut p)?;
        scrape::get(m, "/healthz").context("nats-server's /healthz")?;
        Some(m)
    } else {
        None
    };
    Ok(Server {
        addr,
        pid: p.child.id(),
        admin: None,
        monitor,
        version: version(target, &exe),
        config: Some(text),
        proc: Some(p),
        _dir: Some(dir),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(target: Target) -> Opts {
        Opts {
            scenario: Scenario::Idle,
            target,
            connections: 19_000,
            heartbeat_interval: Duration::from_secs(5),
            hold: Duration::from_secs(1),
            settle: Duration::from_secs(1),
            silent: 1,
            takeovers: 1,
            per_worker: 5000,
            concurrency: 64,
            server: None,
            server_pid: None,
            exe: PathBuf::from("tether"),
            server_args: Vec::new(),
            nodes: 4,
            pairs: 1,
            window: 100,
            reliable: false,
            receipts: false,
            held: 0,
            server_exe: None,
            tls: false,
        }
    }

    #[test]
    fn configs_listen_on_loopback_with_room_for_every_connection() {
        let r = config(Target::Rumqttd, &opts(Target::Rumqttd), 4100, 0);
        assert!(r.contains("listen = \"127.0.0.1:4100\""));
        assert!(r.contains("max_connections = 20000"));
        assert!(r.contains("next_connection_delay_ms = 0"));
        assert!(!r.contains("[v5") && !r.contains("[ws") && !r.contains("[console") && !r.contains("[prometheus"));
        let n = config(Target::Nats, &opts(Target::Nats), 4200, 4201);
        assert!(n.contains("listen: \"127.0.0.1:4200\"") && n.contains("http: \"127.0.0.1:4201\""));
        assert!(n.contains("ping_interval: \"5000ms\"") && n.contains("ping_max: 1"));
        let m = config(Target::Mosquitto, &opts(Target::Mosquitto), 4300, 0);
        assert!(m.starts_with("listener 4300 127.0.0.1\n"));
    }

    #[test]
    fn deadlines_follow_each_rule() {
        let i = Duration::from_secs(2);
        assert_eq!(detection_rule(Target::Tether, i).1, Duration::from_secs(3));
        assert_eq!(detection_rule(Target::Rumqttd, i).1, Duration::from_secs(3));
        assert_eq!(detection_rule(Target::Nats, i).1, Duration::from_secs(4));
    }
}
