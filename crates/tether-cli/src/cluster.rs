//! `tether cluster status`: the cluster as Redis holds it: nodes, their leases, sessions per node, Redis's round
//! trip and memory. A one-shot command: its own small runtime for the Redis requests, the output printed after.
//! [`redacted`] hides a Redis URL's password wherever the CLI prints one (here, and in `tether serve`'s log).

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use serde_json::json;

use crate::duration::{human, ms};

#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// Nodes, their lease age, sessions per node, Redis's round trip.
    Status(StatusArgs),
}

#[derive(clap::Args, Debug)]
pub struct StatusArgs {
    /// The cluster's Redis: redis://HOST:PORT/DB.
    #[arg(long, value_name = "URL")]
    redis: String,
    /// One JSON object instead of the table.
    #[arg(long)]
    json: bool,
}

pub fn run(cmd: Command) -> anyhow::Result<ExitCode> {
    let Command::Status(args) = cmd;
    check_url("--redis", &args.redis)?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let report = rt
        .block_on(tether::cluster::status(&args.redis))
        .with_context(|| format!("reading the cluster from {}", redacted(&args.redis)))?;
    drop(rt);
    let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    let sessions: u64 = report.nodes.iter().map(|n| n.sessions).sum();
    let rtt = &report.redis_rtts;
    if args.json {
        let nodes: Vec<_> = report
            .nodes
            .iter()
            .map(|n| {
                let mut v = tether_admin::json::node_json(n);
                v["uptime_ms"] = json!(now_ms.saturating_sub(n.started_ms));
                v
            })
            .collect();
        let v = json!({
            "nodes": nodes, "sessions": sessions, "epoch": report.epoch, "redis_used_memory": report.redis_used_memory,
            "redis_rtt_ms": {"min": ms(rtt[0]), "median": ms(rtt[rtt.len() / 2]), "max": ms(rtt[rtt.len() - 1])},
            "conflicts": report.conflicts.iter().map(|(node, what)| json!({"node": node, "detail": what}))
                .collect::<Vec<_>>(),
        });
        crate::emit_line(&v.to_string());
        return Ok(ExitCode::SUCCESS);
    }
    let mut rows = vec![["NODE", "LEASE", "SESSIONS", "ADDR", "ADMIN", "UP"].map(String::from)];
    for n in &report.nodes {
        let lease = if n.lease_left_ms < 0 {
            format!("lost {} ago", human(Duration::from_millis(n.lease_left_ms.unsigned_abs())))
        } else {
            let age = n.lease_ms.saturating_sub(n.lease_left_ms as u64);
            format!("renewed {} ago", human(Duration::from_millis(age)))
        };
        let up = human(Duration::from_millis(now_ms.saturating_sub(n.started_ms)));
        rows.push([n.node.clone(), lease, n.sessions.to_string(), n.addr.clone(), n.admin.clone(), up]);
    }
    let widths: Vec<usize> = (0..6).map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for r in &rows {
        let cells: Vec<String> = r.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out.push_str(&format!(
        "{}, {}, epoch {}; Redis: round trip {} (best of 5), {:.1} MiB used",
        count(report.nodes.len() as u64, "node"),
        count(sessions, "session"),
        report.epoch,
        human(rtt[0]),
        report.redis_used_memory as f64 / (1 << 20) as f64
    ));
    for (node, what) in &report.conflicts {
        out.push_str(&format!("\nwarning: node id {node}: a second process was refused in the last minute ({what})"));
    }
    crate::emit_line(&out);
    Ok(ExitCode::SUCCESS)
}

/// `n thing`, or `n things` unless n is 1.
fn count(n: u64, thing: &str) -> String {
    if n == 1 {
        format!("1 {thing}")
    } else {
        format!("{n} {thing}s")
    }
}

/// Refuse what is not a Redis URL, with the URL a bare `HOST:PORT` was meant to be (`flag` names where it came
/// from). The URL is printed without its password.
pub fn check_url(flag: &str, url: &str) -> anyhow::Result<()> {
    let Err(why) = tether::ClusterConfig::new(url.to_owned()).check_url() else { return Ok(()) };
    let shown = redacted(url);
    if !url.contains("://") {
        anyhow::bail!("{flag} {shown}: a Redis URL starts with redis:// (or rediss:// for TLS): write redis://{shown}");
    }
    anyhow::bail!("{flag} {shown}: {why}")
}

/// A Redis URL with its password (everything between the scheme and the last `@`) replaced by `***`, for logs
/// and error messages; a URL without credentials is returned as it is.
pub fn redacted(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => format!("{}***{}", &url[..scheme + 3], &url[at..]),
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::{check_url, count, redacted};

    #[test]
    fn a_redis_url_loses_its_password_and_nothing_else() {
        assert_eq!(redacted("redis://user:s3cret@10.0.0.5:6379/2"), "redis://***@10.0.0.5:6379/2");
        assert_eq!(redacted("rediss://:p@ss@redis.internal:6380"), "rediss://***@redis.internal:6380");
        assert_eq!(redacted("redis://127.0.0.1:6379/0"), "redis://127.0.0.1:6379/0");
        assert_eq!(redacted("not a url @ all"), "not a url @ all");
    }

    #[test]
    fn a_bare_host_and_port_is_told_the_url_to_write() {
        let e = check_url("--redis", "127.0.0.1:6379").unwrap_err().to_string();
        assert!(e.contains("write redis://127.0.0.1:6379"), "{e}");
        let e = check_url("--redis", "http://127.0.0.1:6379").unwrap_err().to_string();
        assert!(e.contains("not a Redis URL"), "{e}");
        assert!(check_url("--redis", "redis://127.0.0.1:6379/0").is_ok());
        assert_eq!(
            (count(1, "node"), count(2, "node"), count(0, "session")),
            ("1 node".into(), "2 nodes".into(), "0 sessions".into())
        );
    }
}
