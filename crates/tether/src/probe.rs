//! The rule both ends of a round-trip probe judge by: an answer, or its absence, against the kernel's view of the
//! same socket says whether the peer's program, the path, or nothing is at fault.
//!
//! # Layout
//! [`answered`] judges an answer by how long it took, against the kernel's [`TcpInfo`] of the socket the question
//! went out on (when it could be read); [`unanswered`] judges a question that got no answer within the wait by
//! that view alone, and [`unanswered_since`] a heartbeat's silence, where the last `PING` may have just left. The server probing a session's client ([`crate::ProbeReport::verdict`]) and `tether probe`
//! probing a server both call them, each naming the result in its own words (`client_*` on one side, `server_*`
//! on the other); the thresholds [`SLOW_RTT`] and [`SLOW_ANSWER`] are the same for both. Which side is the peer,
//! and what a silence without a kernel view means ([`Unanswered::NoView`]), only the caller knows.

use std::time::Duration;

use crate::sockopt::TcpInfo;

/// A kernel RTT at or above this is a slow network.
pub const SLOW_RTT: Duration = Duration::from_millis(200);
/// An answer later than the kernel's RTT by more than this is a slow program.
pub const SLOW_ANSWER: Duration = Duration::from_millis(100);

/// What an answer says about the peer and the path between us.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answered {
    /// The peer answered in step with its kernel, and the path is not slow.
    InStep,
    /// The peer answered in step with its kernel, whose smoothed RTT is [`SLOW_RTT`] or more: the path is slow,
    /// whatever the program does.
    SlowNetwork(TcpInfo),
    /// The peer answered, but more than [`SLOW_ANSWER`] after the kernel's RTT (taken as zero without a kernel
    /// view): its program is slow to answer.
    Late,
}

/// What a missing answer says about the peer and the path between us: silence is judged by what is
/// unacknowledged, never by a slow RTT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unanswered {
    /// The kernel holds nothing unacknowledged: the peer's kernel took the question and its program did not
    /// answer (hung, stopped, swapping), not the network.
    Stalled(TcpInfo),
    /// Segments unacknowledged: the path or the peer's host is gone.
    PathDown(TcpInfo),
    /// No kernel view to tell the path from the program. The rule cannot decide; each caller does, from what it
    /// knows besides (a connect that just succeeded, a socket that may have closed meanwhile).
    NoView,
}

/// Judge an answer that took `took` against the kernel's view of the same socket. A late answer is judged against
/// the kernel first: a slow path is the verdict only when the program answered in step with it.
pub fn answered(took: Duration, kernel: Option<TcpInfo>) -> Answered {
    let krtt = kernel.map_or(Duration::ZERO, |i| i.rtt);
    match kernel {
        _ if took > krtt + SLOW_ANSWER => Answered::Late,
        Some(i) if i.rtt >= SLOW_RTT => Answered::SlowNetwork(i),
        _ => Answered::InStep,
    }
}

/// Judge a question that got no answer by the kernel's view of the socket it went out on.
pub fn unanswered(kernel: Option<TcpInfo>) -> Unanswered {
    match kernel {
        Some(i) if i.unacked == 0 => Unanswered::Stalled(i),
        Some(i) => Unanswered::PathDown(i),
        None => Unanswered::NoView,
    }
}

/// Judge a verdict of silence (`heartbeat_timeout`, `write_timeout`) on a connection whose heartbeat is
/// `interval` by the kernel's view of its socket, still open. By the verdict our oldest unanswered `PING` left
/// 1.5 intervals ago at least (a client pings every interval; a server sends its own after 1.5 quiet ones). As
/// [`unanswered`], except that unacknowledged segments are the path only when the peer's kernel acknowledged
/// nothing for those 1.5 intervals either: a `PING` sent moments ago is unacknowledged on any path, and a peer
/// whose kernel acknowledged the earlier ones is stalled.
pub fn unanswered_since(kernel: Option<TcpInfo>, interval: Duration) -> Unanswered {
    unanswered_for(kernel, interval * 3 / 2)
}

/// As [`unanswered`], for a question asked `waited` ago: unacknowledged segments are the path only when the
/// peer's kernel acknowledged nothing for that long either (it acknowledged the question otherwise).
pub fn unanswered_for(kernel: Option<TcpInfo>, waited: Duration) -> Unanswered {
    match unanswered(kernel) {
        Unanswered::PathDown(i) if i.since_ack_recv < waited => Unanswered::Stalled(i),
        u => u,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    fn info(rtt_ms: u64, unacked: u32) -> TcpInfo {
        TcpInfo { state: 1, rtt: ms(rtt_ms), unacked, ..TcpInfo::default() }
    }

    #[test]
    fn an_answer_is_judged_against_the_kernel_of_the_same_socket() {
        assert_eq!(answered(ms(1), Some(info(1, 0))), Answered::InStep);
        assert_eq!(answered(ms(101), Some(info(1, 0))), Answered::InStep, "within SLOW_ANSWER of the RTT");
        assert_eq!(answered(ms(102), Some(info(1, 0))), Answered::Late);
        assert_eq!(answered(ms(300), Some(info(250, 0))), Answered::SlowNetwork(info(250, 0)));
        assert_eq!(answered(ms(400), Some(info(250, 0))), Answered::Late, "late even for a slow path");
        assert_eq!(answered(ms(50), None), Answered::InStep, "no kernel view: an RTT of zero");
        assert_eq!(answered(ms(150), None), Answered::Late);
    }

    #[test]
    fn silence_is_judged_by_what_is_unacknowledged() {
        assert_eq!(unanswered(Some(info(1, 0))), Unanswered::Stalled(info(1, 0)));
        assert_eq!(unanswered(Some(info(250, 0))), Unanswered::Stalled(info(250, 0)), "a slow path is no excuse");
        assert_eq!(unanswered(Some(info(1, 2))), Unanswered::PathDown(info(1, 2)));
        assert_eq!(unanswered(None), Unanswered::NoView, "no evidence either way: the caller decides");
    }

    #[test]
    fn a_heartbeat_silence_is_the_path_only_when_nothing_was_acknowledged_for_as_long() {
        let acked = |since: u64| TcpInfo { since_ack_recv: ms(since), ..info(1, 1) };
        // A 4 s heartbeat: nothing acknowledged for 6 s is the path.
        assert_eq!(unanswered_since(Some(acked(7_000)), ms(4_000)), Unanswered::PathDown(acked(7_000)));
        assert_eq!(unanswered_since(Some(acked(900)), ms(4_000)), Unanswered::Stalled(acked(900)), "a PING just left");
        assert_eq!(unanswered_since(Some(info(1, 0)), ms(4_000)), Unanswered::Stalled(info(1, 0)));
        assert_eq!(unanswered_since(None, ms(4_000)), Unanswered::NoView);
    }
}
