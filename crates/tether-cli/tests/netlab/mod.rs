//! The fault lab: real network paths in network namespaces that can go silent, unreachable, or reboot.
//!
//! # Layout
//! [`Lab::new`] builds four namespaces joined through a router:
//!
//! ```text
//!   server 198.18.1.2 ── router (forwarding) ── devices 198.18.2.2
//!                               └────────────── watchers 198.18.3.2
//! ```
//!
//! Faults are applied in the router: [`Lab::cut`] blackholes a host in both directions with `ip rule` (a pulled
//! cable, a phone out of signal: nothing is dropped loudly), [`Lab::unreachable`] / [`Lab::prohibit`] answer with
//! ICMP, [`Lab::link`] takes an interface down. [`Lab::forget_sockets`] makes a namespace's kernel forget its TCP
//! sockets (`ss -K`), as a rebooted host does. [`Lab::serve`] runs the real `tether serve` inside the server
//! namespace; [`in_ns`] runs test code on a thread that joined a namespace, so sockets it opens live there.
//! [`Lab::nat`] turns the router into a carrier NAT for the devices, one that forgets idle connections.
//!
//! Addresses come from 198.18.0.0/15 (RFC 2544, set aside for network test labs) and exist only inside the
//! namespaces a lab creates. Everything is torn down on drop, also when a test fails; namespaces left by a run
//! that was killed are swept away by the next one (their names carry the owning pid).

#![allow(dead_code)]

use std::fs::File;
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::common::{event, Proc};

pub const SERVER_IP: &str = "198.18.1.2";
pub const DEVICE_IP: &str = "198.18.2.2";
pub const WATCHER_IP: &str = "198.18.3.2";
pub const PORT: u16 = 7400;
/// The router's address on the server's side: behind [`Lab::nat`], the server sees every device as this.
pub const NAT_IP: &str = "198.18.1.1";

/// What the NAT of [`Lab::nat`] does with a segment of a connection it forgot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forgotten {
    /// Drops it: the connection goes silent both ways (most carriers).
    Dropped,
    /// Answers it with a TCP reset, whichever side sent it.
    Reset,
}

static SEQ: AtomicUsize = AtomicUsize::new(0);

/// Why a lab test did not run.
pub fn unavailable() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("needs root (network namespaces)".into());
    }
    match Command::new("ip").arg("-V").output() {
        Ok(o) if o.status.success() => None,
        _ => Some("needs iproute2 (`ip`); scripts/test installs it".into()),
    }
}

/// Why a NAT lab test did not run: the lab's reasons, or no `nft`.
pub fn nat_unavailable() -> Option<String> {
    unavailable().or_else(|| match Command::new("nft").arg("--version").output() {
        Ok(o) if o.status.success() => None,
        _ => Some("needs nftables (`nft`); scripts/test installs it".into()),
    })
}

/// Skip the calling test loudly when the lab cannot run here (`unavailable` by default; a test that needs more
/// names its own check, e.g. [`nat_unavailable`]).
#[macro_export]
macro_rules! lab_or_skip {
    ($name:expr) => {
        $crate::lab_or_skip!($name, $crate::netlab::unavailable)
    };
    ($name:expr, $unavailable:path) => {
        match $unavailable() {
            Some(why) => {
                eprintln!("\n*** SKIPPED fault-lab test {}: {why} ***\n", $name);
                println!("SKIPPED: {} ({why})", $name);
                return;
            }
            None => $crate::netlab::Lab::new($name),
        }
    };
}

pub struct Lab {
    pub server: String,
    pub router: String,
    pub devices: String,
    pub watchers: String,
    procs: Vec<Proc>,
    /// Router rules currently installed, removed on drop.
    rules: Vec<Vec<String>>,
}

fn run(args: &[&str]) -> String {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn run_quiet(args: &[&str]) {
    let _ = Command::new(args[0]).args(&args[1..]).output();
}

/// SIGKILL every pid in a whitespace-separated list.
fn kill_all(pids: &str) {
    for pid in pids.split_whitespace().filter_map(|p| p.parse::<libc::pid_t>().ok()) {
        // SAFETY: kill(2) has no memory preconditions; the pid comes from `ip netns pids` for our namespace.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

fn pid_alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// Remove namespaces of earlier runs whose owning process is gone (e.g. an interrupted `cargo test`).
fn sweep_stale() {
    let list = run(&["ip", "netns", "list"]);
    for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
        let Some(rest) = name.strip_prefix("tlab-") else { continue };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else { continue };
        if pid_alive(pid) {
            continue;
        }
        kill_all(&run(&["ip", "netns", "pids", name]));
        run_quiet(&["ip", "netns", "del", name]);
    }
}

impl Lab {
    pub fn new(test: &str) -> Lab {
        sweep_stale();
        let id = format!("tlab-{}-{}", std::process::id(), SEQ.fetch_add(1, Ordering::Relaxed));
        let ns = |role: &str| format!("{id}-{role}");
        let lab = Lab {
            server: ns("srv"),
            router: ns("rtr"),
            devices: ns("dev"),
            watchers: ns("wat"),
            procs: Vec::new(),
            rules: Vec::new(),
        };
        for n in [&lab.server, &lab.router, &lab.devices, &lab.watchers] {
            run(&["ip", "netns", "add", n]);
            run(&["ip", "-n", n, "link", "set", "lo", "up"]);
        }
        let (r, s, d, w) = (&lab.router, &lab.server, &lab.devices, &lab.watchers);
        for (host, rif, net) in [(s, "to-srv", "1"), (d, "to-dev", "2"), (w, "to-wat", "3")] {
            run(&["ip", "link", "add", "eth0", "netns", host, "type", "veth", "peer", "name", rif, "netns", r]);
            run(&["ip", "-n", host, "addr", "add", &format!("198.18.{net}.2/24"), "dev", "eth0"]);
            run(&["ip", "-n", r, "addr", "add", &format!("198.18.{net}.1/24"), "dev", rif]);
            run(&["ip", "-n", host, "link", "set", "eth0", "up"]);
            run(&["ip", "-n", r, "link", "set", rif, "up"]);
            run(&["ip", "-n", host, "route", "add", "default", "via", &format!("198.18.{net}.1")]);
        }
        run(&["ip", "netns", "exec", r, "sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward"]);
        eprintln!("lab {test}: namespaces {id}-{{srv,rtr,dev,wat}}");
        lab
    }

    /// Start `tether serve` in the server namespace on SERVER_IP:PORT with `--events json` and `extra` flags;
    /// returns once it is listening.
    pub fn serve(&mut self, extra: &[&str]) -> &Proc {
        let listen = format!("{SERVER_IP}:{PORT}");
        let mut args = vec!["netns", "exec", &self.server, env!("CARGO_BIN_EXE_tether"), "serve"];
        args.extend_from_slice(&["--listen", &listen, "--events", "json"]);
        args.extend_from_slice(extra);
        let p = Proc::spawn_cmd("ip", &args);
        p.expect("listening", |v| event(v) == "listening");
        self.procs.push(p);
        self.procs.last().unwrap()
    }

    pub fn server_proc(&self) -> &Proc {
        &self.procs[0]
    }

    fn rule(&mut self, args: &[&str]) {
        let mut cmd = vec!["ip", "-n", &self.router, "rule", "add"];
        cmd.extend_from_slice(args);
        run(&cmd);
        self.rules.push(args.iter().map(|s| s.to_string()).collect());
    }

    fn clear_rules(&mut self, host: &str) {
        let router = self.router.clone();
        self.rules.retain(|r| {
            if r.iter().any(|a| a == &format!("{host}/32")) {
                let mut cmd = vec!["ip", "-n", &router, "rule", "del"];
                cmd.extend(r.iter().map(String::as_str));
                run(&cmd);
                false
            } else {
                true
            }
        });
    }

    /// Silent cable pull: the router drops everything to and from `host`, without telling anyone.
    pub fn cut(&mut self, host: &str) {
        let h = format!("{host}/32");
        self.rule(&["to", &h, "blackhole", "priority", "100"]);
        self.rule(&["from", &h, "blackhole", "priority", "101"]);
    }

    /// ICMP failure: the router answers packets to and from `host` with "host unreachable".
    pub fn unreachable(&mut self, host: &str) {
        let h = format!("{host}/32");
        self.rule(&["to", &h, "unreachable", "priority", "100"]);
        self.rule(&["from", &h, "unreachable", "priority", "101"]);
    }

    /// ICMP failure: the router answers with "administratively prohibited".
    pub fn prohibit(&mut self, host: &str) {
        let h = format!("{host}/32");
        self.rule(&["to", &h, "prohibit", "priority", "100"]);
        self.rule(&["from", &h, "prohibit", "priority", "101"]);
    }

    /// Silence between two hosts only (a partition: each still reaches everyone else).
    pub fn cut_between(&mut self, a: &str, b: &str) {
        let (a, b) = (format!("{a}/32"), format!("{b}/32"));
        self.rule(&["from", &a, "to", &b, "blackhole", "priority", "100"]);
        self.rule(&["from", &b, "to", &a, "blackhole", "priority", "101"]);
    }

    /// Undo `cut`, `cut_between`, `unreachable` or `prohibit` for `host`.
    pub fn restore(&mut self, host: &str) {
        self.clear_rules(host);
    }

    /// A carrier NAT in the router: connections from the devices leave towards the server from [`NAT_IP`] with a
    /// random port per mapping (nftables `masquerade random`), and a mapping idle for `idle` (whole seconds:
    /// conntrack's established timeout, set in the router's namespace only) is forgotten. A segment of a
    /// forgotten connection is not taken as a new one (`nf_conntrack_tcp_loose = 0`): it is dropped or answered
    /// with a reset, from either side, as `forgotten` says. A new connection gets a new mapping. Needs `nft`.
    pub fn nat(&self, idle: Duration, forgotten: Forgotten) {
        let stray = match forgotten {
            Forgotten::Dropped => "ct state invalid drop",
            Forgotten::Reset => "ct state invalid meta l4proto tcp reject with tcp reset",
        };
        let rules = format!(
            "table ip tlab_nat {{\n\
               chain masq {{ type nat hook postrouting priority srcnat; policy accept; \
                 oifname \"to-srv\" ip saddr 198.18.2.0/24 masquerade random; }}\n\
               chain strays_through {{ type filter hook forward priority filter; policy accept; {stray}; }}\n\
               chain strays_to_me {{ type filter hook input priority filter; policy accept; {stray}; }}\n\
             }}\n"
        );
        let mut nft = Command::new("ip")
            .args(["netns", "exec", &self.router, "nft", "-f", "-"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("nft (scripts/test installs nftables)");
        use std::io::Write;
        nft.stdin.take().unwrap().write_all(rules.as_bytes()).unwrap();
        assert!(nft.wait().unwrap().success(), "nft refused the NAT rules:\n{rules}");
        self.set_nat_idle(idle);
        run(&["ip", "netns", "exec", &self.router, "sysctl", "-qw", "net.netfilter.nf_conntrack_tcp_loose=0"]);
    }

    /// The NAT's idle timeout from now on (whole seconds), for mappings old and new: conntrack applies the
    /// timeout at each packet, so an existing mapping gets the new one from its next packet on.
    pub fn set_nat_idle(&self, idle: Duration) {
        let secs = idle.as_secs().max(1);
        let sysctl = format!("net.netfilter.nf_conntrack_tcp_timeout_established={secs}");
        run(&["ip", "netns", "exec", &self.router, "sysctl", "-qw", &sysctl]);
    }

    /// Take the router's interface towards `ns_role` ("srv", "dev", "wat") down or up.
    pub fn link(&self, ns_role: &str, up: bool) {
        run(&["ip", "-n", &self.router, "link", "set", &format!("to-{ns_role}"), if up { "up" } else { "down" }]);
    }

    /// A host goes off its network (powered off, unplugged at its own port): its interface goes down and the
    /// router forgets its neighbour entry, so the router's next lookup fails and it answers "host unreachable".
    pub fn host_off(&self, ns_role: &str) {
        let ns = [&self.server, &self.devices, &self.watchers]
            .into_iter()
            .find(|n| n.ends_with(&format!("-{ns_role}")))
            .unwrap_or_else(|| panic!("no namespace {ns_role}"));
        run(&["ip", "-n", ns, "link", "set", "eth0", "down"]);
        run(&["ip", "-n", &self.router, "neigh", "flush", "dev", &format!("to-{ns_role}")]);
    }

    /// Host reboot: the namespace's kernel forgets every TCP socket to `dst` (no FIN; an RST at most, which a
    /// cut path swallows).
    pub fn forget_sockets(&self, ns: &str, dst: &str) {
        run(&["ip", "netns", "exec", ns, "ss", "-K", "dst", dst]);
    }

    /// A device host reboots while its path is down: cut, its kernel forgets every socket to the server (the
    /// RST is swallowed by the cut), the path comes back. The test drops its dead sockets itself.
    pub fn reboot_devices(&mut self) {
        self.cut(DEVICE_IP);
        self.forget_sockets(&self.devices.clone(), SERVER_IP);
        self.restore(DEVICE_IP);
    }

    /// TCP states of the sockets on the server's port, from the server namespace's kernel table.
    pub fn server_sockets(&self) -> Vec<String> {
        let out = run(&["ip", "netns", "exec", &self.server, "ss", "-Htan", "sport", "=", &format!(":{PORT}")]);
        out.lines().filter_map(|l| l.split_whitespace().next().map(str::to_owned)).collect()
    }

    /// Poll the server's socket table until every established connection on the server port has all its sent
    /// bytes acknowledged (Send-Q 0): the precondition of an *idle* link. Bounded by `patience`.
    pub fn until_server_idle(&self, patience: Duration) {
        let deadline = Instant::now() + patience;
        loop {
            let out = run(&[
                "ip",
                "netns",
                "exec",
                &self.server,
                "ss",
                "-Htn",
                "state",
                "established",
                "sport",
                "=",
                &format!(":{PORT}"),
            ]);
            // Columns without a state filter header: Recv-Q Send-Q Local Peer.
            let busy = out.lines().any(|l| l.split_whitespace().nth(1).is_some_and(|q| q != "0"));
            if !busy {
                return;
            }
            assert!(Instant::now() < deadline, "server sockets never went idle:\n{out}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Poll the server's socket table until `pred` holds or `patience` passes; returns the last table.
    pub fn until_server_sockets(&self, patience: Duration, pred: impl Fn(&[String]) -> bool) -> Vec<String> {
        let deadline = Instant::now() + patience;
        loop {
            let s = self.server_sockets();
            if pred(&s) || Instant::now() >= deadline {
                return s;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.procs.clear();
        for n in [&self.server, &self.router, &self.devices, &self.watchers] {
            if let Ok(pids) = Command::new("ip").args(["netns", "pids", n]).output() {
                kill_all(&String::from_utf8_lossy(&pids.stdout));
            }
            run_quiet(&["ip", "netns", "del", n]);
        }
    }
}

/// Run `f` on a new thread that has joined network namespace `ns`: every socket it opens lives there.
pub fn in_ns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> std::thread::JoinHandle<T> {
    let path = format!("/var/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        // SAFETY: setns on a valid namespace fd affects only this thread's network namespace.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
        f()
    })
}

/// The IP packets crossing one interface of a namespace, both ways, with the time each was seen: for counting the
/// segments and bytes a connection puts on the wire (the IP packet's length: IP and TCP headers included, no
/// link header). An `AF_PACKET` socket of the test's own, so no capture tool is needed.
pub struct Capture {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<Vec<(Instant, usize)>>,
}

impl Capture {
    pub fn start(ns: &str, ifname: &str) -> Capture {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (ready_tx, ready) = std::sync::mpsc::channel();
        let (flag, ifname) = (stop.clone(), std::ffi::CString::new(ifname).unwrap());
        let thread = in_ns(ns, move || {
            let all = (libc::ETH_P_ALL as u16).to_be();
            // SAFETY: plain socket calls on a descriptor this thread owns; every pointer is valid for its call.
            let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_DGRAM, all.into()) };
            assert!(fd >= 0, "AF_PACKET socket: {}", std::io::Error::last_os_error());
            // SAFETY: as above.
            let index = unsafe { libc::if_nametoindex(ifname.as_ptr()) };
            assert!(index > 0, "no interface {ifname:?}");
            // SAFETY: sockaddr_ll is plain old data; all-zero is valid.
            let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            addr.sll_family = libc::AF_PACKET as u16;
            addr.sll_protocol = all;
            addr.sll_ifindex = index as i32;
            let len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
            // SAFETY: as above.
            let rc = unsafe { libc::bind(fd, (&addr as *const libc::sockaddr_ll).cast(), len) };
            assert_eq!(rc, 0, "bind AF_PACKET: {}", std::io::Error::last_os_error());
            let tv = libc::timeval { tv_sec: 0, tv_usec: 50_000 };
            let tv_len = std::mem::size_of::<libc::timeval>() as libc::socklen_t;
            // SAFETY: as above.
            unsafe {
                libc::setsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVTIMEO, (&tv as *const libc::timeval).cast(), tv_len)
            };
            let _ = ready_tx.send(());
            let mut seen = Vec::new();
            let mut buf = vec![0u8; 65536];
            while !flag.load(Ordering::Relaxed) {
                // SAFETY: sockaddr_ll is plain old data; recvfrom writes at most the lengths given.
                let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
                let mut from_len = len;
                // SAFETY: as above.
                let n = unsafe {
                    libc::recvfrom(
                        fd,
                        buf.as_mut_ptr().cast(),
                        buf.len(),
                        0,
                        (&mut from as *mut libc::sockaddr_ll).cast(),
                        &mut from_len,
                    )
                };
                if n > 0 && from.sll_protocol == (libc::ETH_P_IP as u16).to_be() {
                    seen.push((Instant::now(), n as usize));
                }
            }
            // SAFETY: fd is this thread's own.
            unsafe { libc::close(fd) };
            seen
        });
        ready.recv_timeout(Duration::from_secs(5)).expect("capture started");
        Capture { stop, thread }
    }

    /// Stop, and every packet seen: its time and its IP length.
    pub fn stop(self) -> Vec<(Instant, usize)> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("capture thread")
    }
}

/// A `Command` for the `tether` binary, run inside namespace `ns` when given (`ip netns exec` replaces itself with
/// `tether`, so the child's pid is `tether`'s own for signals).
pub fn tether(ns: Option<&str>) -> Command {
    let bin = env!("CARGO_BIN_EXE_tether");
    match ns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, bin]);
            c
        }
        None => Command::new(bin),
    }
}

/// A current-thread tokio runtime for code running inside a namespace thread.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}
