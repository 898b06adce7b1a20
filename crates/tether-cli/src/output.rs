//! Output that can never stall the runtime: standard output and standard error are written by threads of their
//! own, through bounded queues that count what they have to drop.
//!
//! # Layout
//! - [`init_logging`]: the tracing subscriber writes to stderr through `tracing-appender`'s non-blocking writer
//!   (a bounded, lossy queue and a writer thread). [`report_dropped_logs`] logs how many lines were lost once
//!   the reader catches up.
//! - [`Lines`]: lines for stdout or stderr (`tether connect`'s output and messages) go to a thread of their own
//!   through a bounded queue; when it is full, lines are dropped and counted, and the thread writes how many
//!   before the next line that got through. [`Lines::finish`] waits, bounded, for the thread to write what is
//!   queued before the process exits.
//!
//! A reader that stops reading (a full pipe, `| something-slow`) then blocks only these threads: heartbeats,
//! verdicts and the accept loop go on, and memory stays bounded.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::Duration;

use tracing_appender::non_blocking::{ErrorCounter, NonBlockingBuilder, WorkerGuard};

/// Log lines waiting for stderr at most (about 2.5 MiB of lines at worst).
const LOG_LINES: usize = 16_384;

/// Keep the returned guard until exit: dropping it flushes what is queued (waiting at most about a second for a
/// stalled reader).
pub struct Logging {
    pub _guard: WorkerGuard,
    pub dropped: ErrorCounter,
}

/// Install the tracing subscriber (`RUST_LOG`, default `info`) on a non-blocking stderr writer.
pub fn init_logging() -> Logging {
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(LOG_LINES)
        .thread_name("stderr")
        .finish(std::io::stderr());
    let dropped = writer.error_counter();
    tracing_subscriber::fmt()
        .with_writer(writer)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    // A panic (a bug) is reported through the same non-blocking log: the default hook writes to stderr from the
    // panicking thread, which may be a runtime worker, and would block it while stderr is not read.
    std::panic::set_hook(Box::new(|info| {
        let trace = std::backtrace::Backtrace::capture();
        match trace.status() {
            std::backtrace::BacktraceStatus::Captured => tracing::error!("{info}\n{trace}"),
            _ => tracing::error!("{info} (RUST_BACKTRACE=1 shows where)"),
        }
    }));
    Logging { _guard: guard, dropped }
}

/// Every `every`, log how many log lines were dropped since the last report, if any. The report itself goes
/// through the same queue: while the reader is still stalled it is dropped too and counted for the next one.
pub async fn report_dropped_logs(counter: ErrorCounter, every: Duration) {
    let mut reported = 0;
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        let now = counter.dropped_lines();
        if now > reported {
            tracing::warn!("{} log lines dropped: stderr was not keeping up ({now} in all)", now - reported);
            reported = now;
        }
    }
}

/// Lines written to one stream by a thread of their own.
pub struct Lines {
    tx: SyncSender<String>,
    /// Dropped since the writer last reported.
    unreported: Arc<AtomicU64>,
    /// Signalled (by the sender being dropped) when the writer has written everything and ended.
    done: std::sync::mpsc::Receiver<()>,
}

impl Lines {
    /// Write to `target`; `capacity` lines may wait. `dropped_line(n)` formats the line that reports `n` dropped
    /// lines.
    pub fn spawn(
        name: &str,
        target: impl Write + Send + 'static,
        capacity: usize,
        dropped_line: fn(u64) -> String,
    ) -> Lines {
        let (tx, rx) = sync_channel::<String>(capacity.max(1));
        let (done_tx, done) = std::sync::mpsc::channel::<()>();
        let unreported = Arc::new(AtomicU64::new(0));
        let gap = unreported.clone();
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                let _done = done_tx;
                // Lines that wait are written together, flushed once the queue is empty: one write for a burst
                // rather than one per line, so a burst (a resume's replay) drains at the reader's pace.
                let mut target = std::io::BufWriter::with_capacity(64 * 1024, target);
                while let Ok(first) = rx.recv() {
                    let mut next = Some(first);
                    while let Some(line) = next {
                        let n = gap.swap(0, Ordering::AcqRel);
                        if n > 0 {
                            let _ = writeln!(target, "{}", dropped_line(n));
                        }
                        let _ = writeln!(target, "{line}");
                        next = rx.try_recv().ok();
                    }
                    let _ = target.flush();
                }
                // Lines dropped after the last one that got through are reported too.
                let n = gap.swap(0, Ordering::AcqRel);
                if n > 0 {
                    let _ = writeln!(target, "{}", dropped_line(n));
                    let _ = target.flush();
                }
            })
            .expect("spawn an output thread");
        Lines { tx, unreported, done }
    }

    /// Queue one line; never blocks. A line that does not fit is counted and reported later.
    pub fn line(&self, line: String) {
        if let Err(TrySendError::Full(_)) = self.tx.try_send(line) {
            self.unreported.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// Let the writer finish what is queued, waiting at most `patience` (a stalled reader must not keep the
    /// process from exiting).
    pub fn finish(self, patience: Duration) {
        let Lines { tx, done, .. } = self;
        drop(tx);
        let _ = done.recv_timeout(patience);
    }
}
