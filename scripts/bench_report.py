#!/usr/bin/env python3
"""Turn `tether bench --json` result lines into BENCHMARKS.md (tether against each peer, goals, plot, metrics on
against off, relay).

Usage: bench_report.py RESULTS.jsonl COMMANDS.txt OUT.md OUT_DIR
       bench_report.py --check RESULTS.jsonl     (exit 1 unless every scenario reported its keys)
"""
import json
import os
import platform
import subprocess
import sys
from datetime import datetime, timezone

KEYS = {
    "idle": ["connections", "rss_per_conn_bytes", "slab_per_conn_bytes", "cpu_s_per_10k_heartbeats", "heartbeats_per_s"],
    # `idle --tls`: tether only, a full TLS 1.3 handshake per connection, then the same heartbeats inside TLS.
    "idle_tls": [
        "connections", "rss_per_conn_bytes", "slab_per_conn_bytes", "cpu_s_per_10k_heartbeats", "heartbeats_per_s",
        "tls",
    ],
    "connect": ["handshakes_per_s", "handshake_ms_p50", "handshake_ms_p99"],
    "detect": [
        "silenced", "declared", "false_verdicts", "lateness_ms_p50", "lateness_ms_p99", "lateness_ms_max",
        "timeout_ms", "detection_rule",
    ],
    "takeover": ["latency_ms_p50", "latency_ms_p99", "ghosts"],
    "storm": ["all_back_s", "peak_handshakes_in_flight"],
    "cluster": [
        "nodes", "connections", "node_rss_bytes", "rss_per_conn_bytes", "node_cpu_s", "cpu_s_per_10k_heartbeats",
        "redis_bytes_per_session", "redis_commands_per_s_at_rest", "redis_commands_per_s_wave", "wave_s",
        "cross_takeover_ms_p50", "cross_takeover_ms_p99", "presence_ms_p50", "presence_ms_p99",
        "loss_last_offline_s", "loss_reaped_s", "late_node_view_s", "full_repair_s",
    ],
    "relay": [
        "pairs", "window", "msgs_per_s", "latency_ms_p50", "latency_ms_p99", "cpu_us_per_msg", "load_cpu_us_per_msg",
        "wire_bytes_per_msg", "wire_bytes_per_msg_with_headers", "ack_frames_per_msg",
    ],
}
# A tether reliable relay run with --held reports the server's memory per held message.
HELD_KEYS = ["held_messages", "held_sessions", "rss_per_held_msg_bytes"]
# An owned tether server with its admin listener (metrics on) is scraped after the idle hold.
SCRAPE_KEYS = ["metrics_scrapes", "metrics_scrape_ms_p50", "metrics_scrape_ms_max", "metrics_scrape_cpu_ms", "metrics_bytes"]
OFF = "metrics off"
# The systems tether is compared with (`--target`), in the report's column order.
PEERS = ["mosquitto", "rumqttd", "nats"]
TARGETS = ["tether"] + PEERS
LABEL = {"tether": "tether", "mosquitto": "Mosquitto", "rumqttd": "rumqttd", "nats": "NATS"}
TLS_LABEL = "tether, TLS 1.3"
# Scenarios each target has: NATS has no session takeover; storm and cluster restart tether's own nodes.
TAKEOVER = ["tether", "mosquitto", "rumqttd"]
# A peer's results carry the config it was started with and its version.
PEER_KEYS = ["server_version", "server_config"]
# tether's idle runs count the connections whose own PING was answered during the hold.
ALIVE_KEYS = ["alive_connections"]


def is_off(r):
    return r.get("variant") == OFF


def load(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def check(rows):
    seen = set()
    for r in rows:
        keys = KEYS[r["scenario"]]
        if r["scenario"] == "idle" and r["target"] == "tether" and not is_off(r):
            keys = keys + SCRAPE_KEYS
        if r["scenario"] == "relay" and r.get("held_messages"):
            keys = keys + HELD_KEYS
        if r["target"] in PEERS and r["scenario"] != "relay":
            keys = keys + PEER_KEYS
        if r["target"] == "tether" and r["scenario"] in ("idle", "idle_tls"):
            keys = keys + ALIVE_KEYS
        missing = [k for k in keys if r.get(k) is None]
        if missing:
            print(f"{r['scenario']} ({r['target']}, {r.get('variant')}): missing {missing}", file=sys.stderr)
            return 1
        seen.add((r["scenario"], r["target"]))
        if r["scenario"] == "relay":
            seen.add(("relay", r["target"], r["delivery"]))
    want = {(s, t) for s in ("idle", "connect", "detect") for t in TARGETS}
    want |= {("takeover", t) for t in TAKEOVER}
    want |= {("storm", "tether"), ("cluster", "tether"), ("idle_tls", "tether")}
    want |= {("relay", "tether", "at_most_once"), ("relay", "tether", "reliable"), ("relay", "mosquitto", "qos1")}
    if not want <= seen:
        print(f"scenarios missing: {sorted(want - seen)}", file=sys.stderr)
        return 1
    on, off = on_off(rows)
    if on is None or off is None:
        print("idle (tether): no metrics on / metrics off pair at the largest size", file=sys.stderr)
        return 1
    dead = [r for r in rows if r["scenario"] in ("idle", "idle_tls") and r["target"] == "tether"
            and r["alive_connections"] < r["connections"]]
    if dead:
        print(f"idle (tether): PINGs left unanswered in {[(r['scenario'], r['connections']) for r in dead]}",
              file=sys.stderr)
        return 1
    tls = [r for r in rows if r["scenario"] == "idle_tls"][-1]
    print(f"bench smoke: {len(rows)} results, every scenario reported for {', '.join(TARGETS)}, "
          f"metrics on and off at {on['connections']:,}, TLS at {tls['connections']:,}")
    return 0


def on_off(rows):
    """The tether idle results at the largest size: (metrics on, metrics off), each the last of its kind."""
    idle = [r for r in rows if r["scenario"] == "idle" and r["target"] == "tether"]
    if not idle:
        return None, None
    n = max(r["connections"] for r in idle)
    pick = lambda off: next((r for r in reversed(idle) if r["connections"] == n and is_off(r) == off), None)
    return pick(False), pick(True)


def pct_diff(a, b):
    if not isinstance(a, (int, float)) or not isinstance(b, (int, float)) or not b:
        return "—"
    return f"{(a - b) / b * 100:+.1f}%"


def on_off_table(rows):
    on, off = on_off(rows)
    if on is None or off is None:
        return "(no metrics on / metrics off pair in this run)"
    lines = [
        f"| figure, idle, {on['connections']:,} connections | metrics on (default) | metrics off (`--admin off`) | on against off |",
        "|---|---|---|---|",
    ]
    for label, key in [
        ("server CPU per 10k heartbeats (s)", "cpu_s_per_10k_heartbeats"),
        ("server RSS per idle connection (bytes)", "rss_per_conn_bytes"),
        ("heartbeats handled per second", "heartbeats_per_s"),
        ("server PINGs answered during the hold", "server_pings"),
    ]:
        a, b = on.get(key), off.get(key)
        lines.append(f"| {label} | {fmt(a)} | {fmt(b)} | {pct_diff(a, b)} |")
    lines.append("")
    lines.append(f"| `GET /metrics`, {fmt(on.get('metrics_scrapes'))} scrapes after the metrics-on hold | |")
    lines.append("|---|---|")
    lines.append(f"| latency p50 / max (ms) | {fmt(on.get('metrics_scrape_ms_p50'))} / {fmt(on.get('metrics_scrape_ms_max'))} |")
    lines.append(f"| server CPU per scrape (ms) | {fmt(on.get('metrics_scrape_cpu_ms'))} |")
    lines.append(f"| body (bytes) | {fmt(on.get('metrics_bytes'))} |")
    return "\n".join(lines)


def sh(cmd):
    try:
        return subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=10).stdout.strip()
    except Exception:
        return "?"


def fmt(v, unit=""):
    if v is None:
        return "—"
    if isinstance(v, float) and v != int(v):
        return f"{v:,.3f}{unit}"
    return f"{int(v):,}{unit}"


def main():
    if sys.argv[1] == "--check":
        sys.exit(check(load(sys.argv[2])))
    results, commands, out_md, out_dir = sys.argv[1:5]
    rows = load(results)
    by = {}
    for r in rows:
        # The metrics-off runs have their own table; everything else compares the default (metrics on).
        if not is_off(r):
            by.setdefault((r["scenario"], r["target"]), []).append(r)
    idle_max = {t: max(by.get(("idle", t), []), key=lambda r: r["connections"], default=None) for t in TARGETS}
    tls_max = max(by.get(("idle_tls", "tether"), []), key=lambda r: r["connections"], default=None)

    def pick(scenario, target, key):
        if scenario == "idle":
            r = idle_max[target]
        elif scenario == "idle_tls":
            r = tls_max if target == "tether" else None
        else:
            r = (by.get((scenario, target)) or [None])[-1]
        return None if r is None else r.get(key)

    figures = [
        ("idle", "server RSS per idle connection (bytes)", "rss_per_conn_bytes", "lower"),
        ("idle", "kernel slab per connection, both ends (bytes)", "slab_per_conn_bytes", "lower"),
        ("idle", "server CPU per 10k heartbeats (s)", "cpu_s_per_10k_heartbeats", "lower"),
        ("idle", "heartbeats handled per second", "heartbeats_per_s", "—"),
        ("idle_tls", "TLS 1.3: server RSS per idle connection (bytes)", "rss_per_conn_bytes", "—"),
        ("idle_tls", "TLS 1.3: server CPU per 10k heartbeats (s)", "cpu_s_per_10k_heartbeats", "—"),
        ("connect", "handshakes per second", "handshakes_per_s", "higher"),
        ("connect", "handshake latency p50 (ms)", "handshake_ms_p50", "lower"),
        ("connect", "handshake latency p99 (ms)", "handshake_ms_p99", "lower"),
        ("detect", "silenced / declared / false verdicts", None, "—"),
        ("detect", "deadline after the last frame heard (ms)", "timeout_ms", "—"),
        ("detect", "verdict lateness p50 (ms)", "lateness_ms_p50", "lower"),
        ("detect", "verdict lateness p99 (ms)", "lateness_ms_p99", "lower"),
        ("detect", "verdict lateness max (ms)", "lateness_ms_max", "lower"),
        ("takeover", "takeover handshake p50 (ms)", "latency_ms_p50", "lower"),
        ("takeover", "takeover handshake p99 (ms)", "latency_ms_p99", "lower"),
        ("takeover", "ghosts after the takeovers", "ghosts", "—"),
        ("storm", "restart: all clients back after (s)", "all_back_s", "—"),
        ("storm", "restart: peak handshakes in flight (cap 512)", "peak_handshakes_in_flight", "—"),
    ]
    lines = []
    n = idle_max["tether"]["connections"] if idle_max["tether"] else "?"
    lines.append("| scenario | figure | " + " | ".join(LABEL[t] for t in TARGETS) + " | tether / best peer |")
    lines.append("|---|---|" + "---|" * len(TARGETS) + "---|")
    for scenario, label, key, better in figures:
        has = lambda t: bool(by.get((scenario, t))) or (scenario == "takeover" and t in TAKEOVER)
        if key is None:
            cells = ["/".join(fmt(pick(scenario, t, k)) for k in ("silenced", "declared", "false_verdicts")) for t in TARGETS]
            lines.append(f"| {scenario} | {label} | " + " | ".join(cells) + " | |")
            continue
        cells = [fmt(pick(scenario, t, key)) if has(t) else "n/a" for t in TARGETS]
        ratio = ""
        if better in ("lower", "higher"):
            r = best_peer(lambda t: pick(scenario, t, key), better)
            ratio = ratio_cell(pick(scenario, "tether", key), r)
        lines.append(f"| {scenario} | {label} | " + " | ".join(cells) + f" | {ratio} |")
    table = "\n".join(lines)

    # RSS against connections, every system.
    plot_note = ""
    png = os.path.join(out_dir, "rss.png")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        # Logarithmic: the peers span two orders of magnitude, and tether and Mosquitto would otherwise overlap.
        fig, (ax, per) = plt.subplots(1, 2, figsize=(10, 4), dpi=110)
        series = [(("idle", t), LABEL[t], style) for t, style in zip(TARGETS, ("o-", "s--", "^-.", "d:"))]
        series.append((("idle_tls", "tether"), TLS_LABEL, "x-"))
        for kind, label, style in series:
            runs = sorted(by.get(kind, []), key=lambda r: r["connections"])
            if runs:
                xs = [r["connections"] for r in runs]
                ax.plot(xs, [(r.get("rss_bytes") or 0) / 2**20 for r in runs], style, label=label)
                per.plot(xs, [r.get("rss_per_conn_bytes") or 0 for r in runs], style, label=label)
        ax.set_yscale("log")
        ax.set_ylabel("server RSS (MiB, log scale)")
        ax.set_title("Server memory against idle connections")
        per.set_yscale("log")
        per.set_ylabel("RSS per connection (bytes, log scale)")
        per.set_title("Per connection")
        for a in (ax, per):
            a.set_xlabel("idle connections")
            a.grid(alpha=0.3, which="both")
        ax.legend()
        fig.tight_layout()
        fig.savefig(png)
        plot_note = f"![Server RSS against idle connections]({os.path.relpath(png, os.path.dirname(out_md) or '.')})"
    except ImportError:
        plot_note = "(matplotlib is not installed: no plot in this run)"

    idle_rows = ["| system | connections | server RSS (MiB) | RSS per connection (bytes) |", "|---|---|---|---|"]
    for kind, label in [(("idle", t), LABEL[t]) for t in TARGETS] + [(("idle_tls", "tether"), TLS_LABEL)]:
        for r in sorted(by.get(kind, []), key=lambda r: r["connections"]):
            idle_rows.append(
                f"| {label} | {r['connections']:,} | {fmt((r.get('rss_bytes') or 0) / 2**20)} | {fmt(r.get('rss_per_conn_bytes'))} |"
            )

    machine = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": sh("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2").strip(),
        "cores": str(os.cpu_count()),
        "memory": sh("free -h | awk '/Mem:/ {print $2}'"),
        "kernel": platform.release(),
        "rustc": sh("rustc --version"),
        "open files": sh("ulimit -n"),
    }
    for t in PEERS:
        machine[LABEL[t]] = next((r["server_version"] for r in rows if r["target"] == t and r.get("server_version")), "?")
    with open(commands) as f:
        cmds = f.read().strip()
    cluster = (by.get(("cluster", "tether")) or [None])[-1]
    relay = [r for r in rows if r["scenario"] == "relay" and not is_off(r)]
    with open(out_md, "w") as f:
        f.write(BENCH_DOC.format(
            machine="\n".join(f"- {k}: {v}" for k, v in machine.items()),
            n=fmt(n) if isinstance(n, int) else n,
            table=table,
            on_off=on_off_table(rows),
            plot=plot_note,
            idle="\n".join(idle_rows),
            commands=cmds,
            findings=open(os.path.join(os.path.dirname(__file__), "bench_findings.md")).read().strip(),
            cluster=cluster_table(cluster),
            relay=relay_table(relay),
            goals=goals_table(pick),
            peers=peers_section(rows),
        ))


def num(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v


def best_peer(get, better):
    """(value, peer) of the best peer on a figure (`lower` or `higher` is better), or None if none has it."""
    vals = [(get(t), t) for t in PEERS if num(get(t))]
    if not vals:
        return None
    return min(vals) if better == "lower" else max(vals)


def ratio_cell(t, best):
    """tether's figure against the best peer's, naming that peer; a ratio only between two positive figures."""
    if best is None or not num(t) or t <= 0 or best[0] <= 0:
        return "—"
    return f"{t / best[0]:.2f} ({LABEL[best[1]]})"


# (what, scenario, key, which is better, goal): ratios of tether against the best peer, or tether's own figure.
GOALS = [
    ("server RSS per idle connection, tether ÷ best peer", "idle", "rss_per_conn_bytes", "lower", ("≤", 0.6)),
    ("server CPU per 10k heartbeats, tether ÷ best peer", "idle", "cpu_s_per_10k_heartbeats", "lower", ("≤", 0.8)),
    ("handshakes per second, tether ÷ best peer", "connect", "handshakes_per_s", "higher", ("≥", 1.5)),
    ("tether detection lateness p99 (ms)", "detect", "lateness_ms_p99", None, ("≤", 5)),
    ("tether detection lateness max (ms)", "detect", "lateness_ms_max", None, ("≤", 20)),
    ("tether takeover p99 (ms)", "takeover", "latency_ms_p99", None, ("≤", 1)),
    ("server RSS per idle TLS 1.3 connection (bytes)", "idle_tls", "rss_per_conn_bytes", None, ("≤", 4096)),
]


def goals_table(pick):
    """Each goal computed from this run's figures (tether with metrics on, at the largest idle size): met or missed."""
    lines = ["| goal | measured | target | verdict |", "|---|---|---|---|"]
    for label, scenario, key, better, (op, bound) in GOALS:
        t = pick(scenario, "tether", key)
        if better:
            best = best_peer(lambda p: pick(scenario, p, key), better)
            if best is None or not num(t) or not best[0]:
                lines.append(f"| {label} | not measured | {op} {bound:g} | — |")
                continue
            value = t / best[0]
            shown = f"{value:.2f} ({fmt(t)} against {LABEL[best[1]]}'s {fmt(best[0])})"
        else:
            if not num(t):
                lines.append(f"| {label} | not measured | {op} {bound:g} | — |")
                continue
            value, shown = t, fmt(t)
        met = value <= bound if op == "≤" else value >= bound
        lines.append(f"| {label} | {shown} | {op} {bound:g} | {'**met**' if met else '**missed**'} |")
    return "\n".join(lines)


def peers_section(rows):
    """How each system was started (the config of its detect run, whose limits scale with N) and its death rule."""
    out = []
    install = os.environ.get("BENCH_RUMQTTD_INSTALL")
    for t in TARGETS:
        mine = [r for r in rows if r["target"] == t and r["scenario"] != "relay" and not is_off(r)]
        if not mine:
            continue
        det = next((r for r in reversed(mine) if r["scenario"] == "detect"), mine[-1])
        version = next((r["server_version"] for r in mine if r.get("server_version")), None)
        out.append(f"### {LABEL[t]}" + (f" ({version})" if version else ""))
        out.append("")
        if det.get("detection_rule"):
            rule = det["detection_rule"]
            out.append(f"- **Death rule.** {rule[:1].upper()}{rule[1:]}.")
        if t == "rumqttd" and install:
            out.append(f"- **Install.** {install}")
        conf = det.get("server_config")
        if conf:
            what = "Command" if t == "tether" else "Config"
            out.append(f"- **{what}** of the detect run ({fmt(det['connections'])} connections):")
            out.append("")
            out.append("  ```")
            out.extend("  " + line for line in conf.strip().splitlines())
            out.append("  ```")
        out.append("")
    return "\n".join(out).strip() or "(no results)"


RELAY_KINDS = [
    (("tether", "at_most_once", False), "tether, at most once (`DATA`)"),
    (("tether", "reliable", True), "tether, `reliable` with receipts"),
    (("tether", "reliable", False), "tether, `reliable` without receipts"),
    (("mosquitto", "qos1", False), "Mosquitto, QoS 1"),
    (("mosquitto", "qos0", False), "Mosquitto, QoS 0"),
]


def relay_table(relay):
    """The relay runs side by side (the last of each kind), their ratios, and memory per held message."""
    if not relay:
        return "(no relay run in this suite)"
    last = {(r["target"], r["delivery"], bool(r.get("receipts"))): r for r in relay}
    first = relay[0]
    lines = [
        f"{first['pairs']} pairs, window {first['window']}, {first['payload_bytes']}-byte payloads, "
        f"{fmt(first.get('measured_s'))} s measured per run.",
        "",
        "| system, delivery | messages/s | latency p50 / p99 (ms) | server CPU per message (µs) "
        "| load generator CPU per message (µs) | server TCP payload per message, both ways (B) "
        "| with TCP/IP headers, estimate (B) | ack frames per message (to senders + from receivers + of REPORTs) "
        "| REPORTs per message |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key, label in RELAY_KINDS:
        r = last.get(key)
        if r is None:
            continue
        lines.append(
            f"| {label} | {fmt(r['msgs_per_s'])} | {fmt(r['latency_ms_p50'])} / {fmt(r['latency_ms_p99'])} "
            f"| {fmt(r['cpu_us_per_msg'])} | {fmt(r['load_cpu_us_per_msg'])} | {fmt(r['wire_bytes_per_msg'])} "
            f"| {fmt(r['wire_bytes_per_msg_with_headers'])} | {r['ack_frames_per_msg']:.4f} "
            f"({r['acks_to_senders_per_msg']:.4f} + {r['acks_from_receivers_per_msg']:.4f} + "
            f"{r['acks_of_reports_per_msg']:.4f}) | {r['reports_per_msg']:.4f} |"
        )
    rel, once, q1 = last.get(("tether", "reliable", True)), last.get(("tether", "at_most_once", False)), last.get(
        ("mosquitto", "qos1", False))
    lines.append("")
    if rel and q1:
        lines.append(f"- tether `reliable` against Mosquitto QoS 1: {rel['msgs_per_s'] / q1['msgs_per_s']:.2f}× the "
                     f"messages per second, {rel['cpu_us_per_msg'] / q1['cpu_us_per_msg']:.2f}× the server CPU per message.")
    if rel and once:
        lines.append(f"- tether `reliable` against at most once: {rel['cpu_us_per_msg'] / once['cpu_us_per_msg']:.2f}× "
                     f"the server CPU per message, {rel['msgs_per_s'] / once['msgs_per_s']:.2f}× the messages per second.")
    held = next((r for r in reversed(relay) if r.get("held_messages")), None)
    if held:
        by_server = held.get("held_messages_by_server")
        lines.append(
            f"- Memory per held message: {fmt(held['rss_per_held_msg_bytes'])} B of server RSS for "
            f"{fmt(held['held_messages'])} messages of {held['payload_bytes']} bytes in {fmt(held['held_sessions'])} "
            f"offline sessions" + (f" (the server's own count: {fmt(by_server)} held)." if by_server else ".")
        )
    return "\n".join(lines)


def cluster_table(r):
    if r is None:
        return "(no cluster run in this suite)"
    mib = lambda b: f"{b / 2**20:.1f}"
    per_conn = r["rss_per_conn_bytes"]
    rows = [
        ("nodes × connections", f"{r['nodes']} × {r['connections'] // r['nodes']:,} = {r['connections']:,}"),
        ("heartbeat interval", f"{r['heartbeat_interval_ms'] / 1000:g} s"),
        ("node RSS (MiB, each)", ", ".join(mib(b) for b in r["node_rss_bytes"])),
        ("node RSS per connection (bytes, each)", ", ".join(fmt(b) for b in per_conn)),
        ("node CPU over the hold (s, each)", ", ".join(fmt(c) for c in r["node_cpu_s"]) + f" in {fmt(r['held_s'])} s"),
        ("CPU per 10k heartbeats, all nodes (s)", fmt(r["cpu_s_per_10k_heartbeats"])),
        ("Redis memory per session (bytes)", fmt(r["redis_bytes_per_session"])),
        ("Redis memory in all (MiB)", mib(r["redis_used_memory_bytes"])),
        ("Redis commands per second at rest", fmt(r["redis_commands_per_s_at_rest"])),
        ("reconnect wave (a tenth of the ids)", f"{fmt(r['wave_reconnects'])} ids in {fmt(r['wave_s'])} s"),
        ("Redis commands per second during the wave", fmt(r["redis_commands_per_s_wave"])),
        ("cross-node takeover HELLO→WELCOME p50 / p99 (ms; goal p99 ≤ 5)",
         f"{fmt(r['cross_takeover_ms_p50'])} / {fmt(r['cross_takeover_ms_p99'])} ({fmt(r['cross_takeovers'])} takeovers)"),
        ("presence propagation p50 / p99 (ms; goal p99 ≤ 10)",
         f"{fmt(r['presence_ms_p50'])} / {fmt(r['presence_ms_p99'])} ({fmt(r['presence_received'])} of {fmt(r['presence_samples'])})"),
        ("node loss: kill -9 → last watched offline (s; goal ≤ 4)",
         f"{fmt(r['loss_last_offline_s'])} ({fmt(r['loss_node_lost'])} of {fmt(r['loss_watched'])} `node_lost`)"),
        ("node loss: kill -9 → the reaping node's `node_lost` event (s)",
         f"{fmt(r['loss_reaped_s'])} ({fmt(r['loss_reaped_sessions'])} sessions)"),
    ]
    if "late_node_view_s" in r:
        rows += [
            ("a late node: start → its view holds every other node's ids (s)",
             f"{fmt(r['late_node_view_s'])} ({fmt(r['late_node_ids'])} ids; {fmt(r['late_node_redis_commands'])} Redis commands)"),
            ("a full repair: all pub/sub connections killed → the late node's view checked (s)",
             f"{fmt(r['full_repair_s'])} ({fmt(r['full_repair_changed_ids'])} ids changed; "
             f"{fmt(r['full_repair_redis_commands'])} Redis commands, all nodes)"),
        ]
    return "\n".join(["| figure | measured |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows])


BENCH_DOC = """# Benchmarks: tether against Mosquitto, rumqttd and NATS, one run

Written by `scripts/bench` (do not edit by hand: edit `scripts/bench_findings.md` for the analysis). Every figure
comes from one run of every system on this machine: tether and its three peers, each started by the run on
127.0.0.1 with the config shown under "The peers". The load generator (`tether bench`) spreads connections over
worker processes of at most 5,000 connections each, each on its own 127.0.1.x source address, and talks only
to the loopback server the run started. Every system gets the same load generator, connections and heartbeat
interval.

## Machine

{machine}

## Results at {n} connections

{table}

The last column is tether's figure divided by the best peer's on that row (the lowest, or the highest where more
is better), and which peer that is.

How each figure is taken:
- **RSS per connection.** The server process's VmRSS after the connections are up and held, minus before, ÷ N.
- **Slab per connection.** The whole machine's `Slab:` from /proc/meminfo, same delta ÷ N. Both ends of every
  connection live on this machine.
- **CPU per 10k heartbeats.** The server's user+system time during the hold ÷ heartbeat exchanges, one exchange
  per connection per interval in every system. tether, Mosquitto, rumqttd: the client's ping and its answer
  (tether's `PING`/`PONG`, MQTT's `PINGREQ`/`PINGRESP`), each connection at its own phase in the interval.
  NATS: the server's `PING` and the client's `PONG` (nats-server drives the heartbeat; its clients only answer),
  at the phase of the server's timer for that connection: it first fires 1 to 1.2 × min(interval, 2 s) after
  `CONNECT`, then every interval, and sends a `PING` once the client has sent no message for an interval. The
  hold starts one interval + 1 s after the last connection is up. A tether server with metrics on sends one round-trip probe (a `PING` of its own) per connection one interval
  after `WELCOME`, then every 60 intervals. So the hold falls between probes; the probes' share is measured
  apart (see the findings). Probes answered are counted as server work, not as heartbeats.
- **Handshakes per second.** N ÷ the slowest worker's time to open all of its connections, with 64 handshakes
  in flight per worker. The latency runs from connect to `WELCOME` (tether), `CONNACK` (MQTT) or, for NATS, the
  `PONG` that answers the client's `CONNECT` + `PING` (sent once the server's `INFO` is read).
- **Detection.** A tenth of the clients go silent at once, with their sockets left open. Every system uses the
  same interval; each declares death by its own rule (under "The peers"), and lateness is measured against that
  rule's deadline after the client's last frame:
  - tether: the server's own `lateness_ms` (declared − deadline), its timeout set to 1.5 × the interval;
  - Mosquitto and rumqttd: Will delivery at a subscriber minus (last PINGREQ + 1.5 × keepalive);
  - NATS: the `stop` time `/connz?state=closed` gives for each connection closed as `Stale Connection`, minus
    (last `PONG` + 2 × ping_interval). The last `PONG` left the client a delivery time after the server's
    `PING` went out, so this figure reads early by that delay (loopback: tens of µs when idle).
- **Takeover.** Live ids reconnect from fresh sockets one at a time (tether by id and nonce, MQTT by client id,
  which closes the older connection); the latency is `HELLO` → `WELCOME` or `CONNECT` → `CONNACK`. Ghosts are
  ESTABLISHED sockets on the server port beyond N, plus any CLOSE_WAIT. NATS has no takeover: a second
  connection with the same name is a second client.
- **Storm.** The server is killed and restarted on the same port under N reconnecting clients (backoff
  200 ms / 5 s, full jitter). tether only.
- **TLS 1.3** (`idle --tls`, tether only, at N). The run makes a throwaway CA and a server certificate (ECDSA
  P-256) and starts `tether serve` with `--tls-cert`/`--tls-key`. Each connection makes a full TLS 1.3 handshake
  with rustls (`ring`, tether's own client configuration, session resumption off: no two devices share a
  ticket), then `HELLO` and the same heartbeats inside TLS. RSS and CPU are taken as for plain idle; no scrapes.
- **Alive.** In every tether idle run each connection must have had a `PONG` to one of its own `PING`s during
  the hold, or the run fails.

Every tether figure above is taken with metrics on, the default: the admin listener, per-frame counting and
round-trip probes.

## Goals

Computed from the figures above (tether with metrics on, at the largest idle size), against the best peer:

{goals}

## The peers

How the run started each system, and when each declares a silent client dead. The detect scenario waits before
it silences clients: one interval (at most 2 s), and for NATS until every client has answered a `PING` of the
server's (1.2 × min(interval, 2 s) + the interval + 0.5 s), so that each silent client is declared by the rule
and not by its timer's first phase.

{peers}

## Metrics on and off, same run

The tether idle scenario at the largest size, run twice back to back: as above (metrics on), then with
`--server-arg --admin --server-arg off`. That server has no admin listener, counts no frames and sends no
round-trip probes.

{on_off}

- **Scrapes.** After the metrics-on hold, while the heartbeats go on, the load generator sends `GET /metrics`
  50 times over loopback HTTP/1.1, one connection each (`Connection: close`). Each body must carry
  `tether_disconnects_total{{reason="heartbeat_timeout"}}`.
  - Latency: request to the end of the body.
  - CPU: the server's CPU time over the 50 scrapes minus its rate during the hold, ÷ 50.

## Cluster on Redis

`tether bench cluster`: a `redis-server` and tether nodes of its own (`--cluster`), every node on this machine,
the connections spread evenly, then in order:
- **at rest**, over the hold: each node's RSS and CPU, Redis's memory per session (`used_memory` after the
  connections, minus before, ÷ N) and commands per second (`total_commands_processed`);
- **a reconnect wave**: a tenth of the ids reconnect to their node from fresh sockets while their old connection
  is live (each a takeover: one read and one claim script in Redis), one at a time per load generator;
- **cross-node takeover**: ids of node 0 say `HELLO` on node 4 (which asks node 0, then claims), one at a time;
  `HELLO` → `WELCOME`. Node 4 first closes as many of its own clients, to stay under the descriptor limit;
- **presence propagation**: a watcher on node 1 subscribed to ids of node 2, whose clients say `BYE` one at a
  time; from the `BYE` to the watcher's `PRESENCE`;
- **node loss**: `kill -9` of node 3 (lease 3 s); from the kill to the last of 1,000 of its ids that a watcher on
  node 1 sees offline, and to the reaping node's `node_lost` event;
- **a late node**: a node started now (with an admin listener) reads every other node's sessions from Redis before
  it accepts; from its start to its view (`remote_sessions` in `GET /v1/cluster`) holding all of them;
- **a full repair**: `CLIENT KILL TYPE pubsub` drops every node's pub/sub connection; each reconnects and checks
  its whole view against Redis; from the kill to the late node's repair, and Redis's commands meanwhile.

{cluster}

## Reliable delivery

`tether bench relay`: messages relayed between pairs of clients over loopback, a sender and its receiver per pair,
all in one load-generator process that speaks both protocols (bare sockets: tether's sans-IO core in client role,
MQTT packets as bytes), against a server the run started. Each sender sends at full speed:
- **windows**: with acknowledged delivery, at most `window` messages unacknowledged by the server (tether's client
  window; MQTT PUBLISHes without their PUBACK); in every mode, at most 4 windows sent and not yet received, the
  only bound at most once;
- **tether**: `tether serve` with its defaults (a single node, metrics on). At most once is plain `DATA`: nothing
  is acknowledged. `reliable` is protocol v2 with the `reliable` extension: `SDATA` with sequence numbers; the
  server acknowledges a sender's messages once it holds them for the receiver, the receiver acknowledges the
  server's stream, each with one cumulative `ACK` per 16 messages or 20 ms (riding along with `PING`/`PONG`); with
  receipts the server tells the sender of each released batch in a sequenced `REPORT`, which the sender
  acknowledges by the same rule;
- **Mosquitto**: `persistence false`, `set_tcp_nodelay true`, otherwise its defaults (at most 20 QoS 1 messages in
  flight to each subscriber), and `max_queued_messages` above the load generator's end-to-end bound, so that no
  QoS 1 message is dropped from a subscriber's queue. QoS 1: the broker answers every PUBLISH with a PUBACK once
  received and delivers at QoS 1 to the subscriber, which answers each with a PUBACK. QoS 0: nothing is
  acknowledged.

Figures between two marks (after the flow ran for `--settle`): messages delivered per second; latency from the
send instant in the payload to the receiver's read; CPU time of the server process (and of the load generator)
per message; the bytes the clients wrote and read (the server's TCP payload, both directions) per message, and
with 52 bytes of TCP/IP header per segment counted by the clients' `TCP_INFO`; acknowledgement frames per
message on each leg. Every message is checked by its number at the receiver: an acknowledged mode that lost,
skipped or duplicated one fails the run. With `--held K` the run first fills offline sessions with K messages and
reports the server's RSS after, minus before, per message.

{relay}

## Memory against connections

{plot}

{idle}

## Findings

{findings}

## Exact commands

```
{commands}
```
"""

if __name__ == "__main__":
    main()
