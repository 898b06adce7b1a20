//! The rule both ends of a round-trip probe judge by: an answer, or its absence, against the kernel's view of the
//! same socket says whether the peer's program, the path, or nothing is at fault.
//!
//! # Layout
//! [`judge`] takes how long the peer took to answer (`None`: no answer within the wait) and the kernel's
//! [`TcpInfo`] of the socket the question went out on, when it could be read, and returns a [`Judgement`] about
//! "the peer". The server probing a session's client ([`crate::ProbeReport::verdict`]) and `tether probe` probing
//! a server both call it, each naming the judgement in its own words (`client_*` on one side, `server_*` on the
//! other); the thresholds [`SLOW_RTT`] and [`SLOW_ANSWER`] are the same for both. Which side is the peer, and
//! what a silence without a kernel view means ([`Judgement::Silent`]), only the caller knows.

use std::time::Duration;

use crate::sockopt::TcpInfo;

/// A kernel RTT at or above this is a slow network.
pub const SLOW_RTT: Duration = Duration::from_millis(200);
/// An answer later than the kernel's RTT by more than this is a slow program.
pub const SLOW_ANSWER: Duration = Duration::from_millis(100);

/// What one answer, or its absence, says about the peer and the path between us.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Judgement {
    /// The peer answered in step with its kernel, and the path is not slow.
    PeerAnswered,
    /// The peer answered in step with its kernel, whose smoothed RTT is [`SLOW_RTT`] or more: the path is slow,
    /// whatever the program does.
    SlowNetwork(TcpInfo),
    /// The peer answered, but more than [`SLOW_ANSWER`] after the kernel's RTT (taken as zero without a kernel
    /// view): its program is slow to answer.
    PeerSlow,
    /// No answer, yet the kernel holds nothing unacknowledged: the peer's kernel took the question and its
    /// program did not answer (hung, stopped, swapping), not the network.
    PeerStalled(TcpInfo),
    /// No answer, and segments unacknowledged: the path or the peer's host is gone.
    PathDown(TcpInfo),
    /// No answer, and no kernel view to tell the path from the program. The rule cannot decide; each caller does,
    /// from what it knows besides (a connect that just succeeded, a socket that may have closed meanwhile).
    Silent,
}

/// Judge one answer (`answer`: how long it took; `None`: none came) against the kernel's view of the same socket.
/// A late answer is judged against the kernel first: a slow path is the verdict only when the program answered in
/// step with it, and a slow RTT never explains a missing answer (silence is judged by what is unacknowledged).
pub fn judge(answer: Option<Duration>, kernel: Option<TcpInfo>) -> Judgement {
    let krtt = kernel.map_or(Duration::ZERO, |i| i.rtt);
    match (answer, kernel) {
        (Some(took), _) if took > krtt + SLOW_ANSWER => Judgement::PeerSlow,
        (Some(_), Some(i)) if i.rtt >= SLOW_RTT => Judgement::SlowNetwork(i),
        (Some(_), _) => Judgement::PeerAnswered,
        (None, Some(i)) if i.unacked == 0 => Judgement::PeerStalled(i),
        (None, Some(i)) => Judgement::PathDown(i),
        (None, None) => Judgement::Silent,
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
        assert_eq!(judge(Some(ms(1)), Some(info(1, 0))), Judgement::PeerAnswered);
        assert_eq!(judge(Some(ms(101)), Some(info(1, 0))), Judgement::PeerAnswered, "within SLOW_ANSWER of the RTT");
        assert_eq!(judge(Some(ms(102)), Some(info(1, 0))), Judgement::PeerSlow);
        assert_eq!(judge(Some(ms(300)), Some(info(250, 0))), Judgement::SlowNetwork(info(250, 0)));
        assert_eq!(judge(Some(ms(400)), Some(info(250, 0))), Judgement::PeerSlow, "late even for a slow path");
        assert_eq!(judge(Some(ms(50)), None), Judgement::PeerAnswered, "no kernel view: an RTT of zero");
        assert_eq!(judge(Some(ms(150)), None), Judgement::PeerSlow);
    }

    #[test]
    fn silence_is_judged_by_what_is_unacknowledged() {
        assert_eq!(judge(None, Some(info(1, 0))), Judgement::PeerStalled(info(1, 0)));
        assert_eq!(judge(None, Some(info(250, 0))), Judgement::PeerStalled(info(250, 0)), "a slow path is no excuse");
        assert_eq!(judge(None, Some(info(1, 2))), Judgement::PathDown(info(1, 2)));
        assert_eq!(judge(None, None), Judgement::Silent, "no evidence either way: the caller decides");
    }
}
