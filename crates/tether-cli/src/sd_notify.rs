//! The service manager's readiness protocol (`sd_notify(3)`): `READY=1`, `STOPPING=1` and `STATUS=` messages to
//! the datagram socket that `$NOTIFY_SOCKET` names.
//!
//! # Layout
//! [`Notifier::from_env`] reads `$NOTIFY_SOCKET` once: an absolute path, or an abstract name written with a
//! leading '@'. Without the variable the notifier does nothing. [`Notifier::ready`] and [`Notifier::stopping`]
//! each send one datagram; once stopping, `ready` says nothing (a signal can arrive before the server accepts).
//!
//! A send never blocks: the socket is non-blocking, so a receiver whose queue is full (a manager that stopped
//! reading) costs a dropped message and a warning instead of a stalled thread. A datagram to a unix socket is
//! copied into the receiver's queue by the kernel within the call, so it can be sent from a runtime thread.

use std::io;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::Mutex;

/// Sends readiness and shutdown to the service manager, if one asked for them.
pub struct Notifier {
    /// The socket and where to send; `None` without `$NOTIFY_SOCKET` (not run by a service manager).
    target: Option<(UnixDatagram, SocketAddr)>,
    /// Set by [`Notifier::stopping`]; under the lock, so that a `READY=1` never follows a `STOPPING=1`.
    stopping: Mutex<bool>,
}

impl Notifier {
    /// From `$NOTIFY_SOCKET`. A value that cannot be used is logged and ignored: the server runs all the same.
    pub fn from_env() -> Notifier {
        let target = match std::env::var_os("NOTIFY_SOCKET") {
            None => None,
            Some(name) => match open(&name) {
                Ok(t) => Some(t),
                Err(e) => {
                    tracing::warn!("NOTIFY_SOCKET={name:?}: {e}; the service manager will not hear that we are ready");
                    None
                }
            },
        };
        Notifier { target, stopping: Mutex::new(false) }
    }

    /// `READY=1` with a status line, unless shutdown has begun.
    pub fn ready(&self, status: &str) {
        let stopping = self.stopping.lock().expect("notify lock");
        if !*stopping {
            self.send(&format!("READY=1\nSTATUS={}\n", one_line(status)));
        }
    }

    /// `STOPPING=1` with a status line.
    pub fn stopping(&self, status: &str) {
        let mut stopping = self.stopping.lock().expect("notify lock");
        *stopping = true;
        self.send(&format!("STOPPING=1\nSTATUS={}\n", one_line(status)));
    }

    fn send(&self, msg: &str) {
        let Some((socket, addr)) = &self.target else { return };
        if let Err(e) = socket.send_to_addr(msg.as_bytes(), addr) {
            let what = msg.lines().next().unwrap_or_default();
            tracing::warn!("could not tell the service manager {what}: {e}");
        }
    }
}

/// An unbound, non-blocking datagram socket and the address `name` stands for.
fn open(name: &std::ffi::OsStr) -> io::Result<(UnixDatagram, SocketAddr)> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = name.as_bytes();
    let addr = match bytes.first() {
        Some(b'/') => SocketAddr::from_pathname(name)?,
        Some(b'@') => {
            use std::os::linux::net::SocketAddrExt;
            SocketAddr::from_abstract_name(&bytes[1..])?
        }
        _ => {
            let why = "neither an absolute path nor an abstract name ('@name')";
            return Err(io::Error::new(io::ErrorKind::InvalidInput, why));
        }
    };
    let socket = UnixDatagram::unbound()?;
    socket.set_nonblocking(true)?;
    Ok((socket, addr))
}

/// A `STATUS=` value is one line.
fn one_line(s: &str) -> String {
    s.replace(['\n', '\r'], " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn notifier_to(name: &str) -> Notifier {
        Notifier { target: Some(open(std::ffi::OsStr::new(name)).unwrap()), stopping: Mutex::new(false) }
    }

    fn recv(rx: &UnixDatagram) -> String {
        let mut buf = [0u8; 512];
        let n = rx.recv(&mut buf).expect("a message");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[test]
    fn ready_and_stopping_reach_an_abstract_socket_and_ready_never_follows_stopping() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("tether-notify-unit-{}", std::process::id());
        let rx = UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap()).unwrap();
        rx.set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
        let n = notifier_to(&format!("@{name}"));
        n.ready("listening on 127.0.0.1:1\nand more");
        assert_eq!(recv(&rx), "READY=1\nSTATUS=listening on 127.0.0.1:1 and more\n");
        n.stopping("shutting down");
        assert_eq!(recv(&rx), "STOPPING=1\nSTATUS=shutting down\n");
        n.ready("late");
        rx.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 64];
        assert_eq!(rx.recv(&mut buf).unwrap_err().kind(), io::ErrorKind::WouldBlock, "no READY after STOPPING");
    }

    #[test]
    fn a_relative_path_is_refused_with_a_reason() {
        let err = open(std::ffi::OsStr::new("run/notify")).unwrap_err();
        assert!(err.to_string().contains("absolute path"), "{err}");
    }

    #[test]
    fn a_full_receiver_costs_a_message_not_a_blocked_thread() {
        let dir = std::env::temp_dir().join(format!("tether-notify-full-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify");
        let _ = std::fs::remove_file(&path);
        let _rx = UnixDatagram::bind(&path).unwrap();
        let n = notifier_to(path.to_str().unwrap());
        // The receiver never reads: its queue fills after a few hundred datagrams at most (net.unix.max_dgram_qlen
        // and the socket buffer); every send after that must return at once.
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for _ in 0..5000 {
                n.ready("filling the queue");
            }
            let _ = done.send(());
        });
        let patience = std::time::Duration::from_secs(10);
        assert!(finished.recv_timeout(patience).is_ok(), "a send to a full receiver blocked");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
