//! TLS for the `idle` scenario against tether (`tether bench idle --tls`).
//!
//! # Layout
//! - [`Pki`]: the run's throwaway CA and server certificate ([`tether::DevPki`]), written to a scratch directory:
//!   the tether server the run starts gets `--tls-cert`/`--tls-key`, each load generator `--tls-ca`.
//! - [`client_config`]: the load generator's TLS client. It is tether's own ([`tether::tls::ClientTls`]: rustls
//!   with the `ring` provider, ALPN `tether/1`) with session resumption turned off, so that every connection makes
//!   a full handshake, as a device's first connection does: thousands of devices share no tickets.
//! - [`handshake`]: that handshake over a connected socket; anything but TLS 1.3 is refused.
//! - [`Io`]: a load-generator connection's bytes, plain TCP or TLS over it.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use anyhow::Context as _;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::TempDir;

/// The run's CA and server certificate, as files in a directory removed when this is dropped.
pub(crate) struct Pki {
    pub(crate) ca: PathBuf,
    pub(crate) cert: PathBuf,
    pub(crate) key: PathBuf,
    /// Holds the files (removed on drop).
    _dir: TempDir,
}

impl Pki {
    /// A fresh CA, and a certificate signed by it for the loopback server (`127.0.0.1`, `localhost`).
    pub(crate) fn generate() -> anyhow::Result<Pki> {
        let pki =
            tether::DevPki::generate(&["127.0.0.1", "localhost"], "tether-bench").context("making certificates")?;
        let dir = std::env::temp_dir().join(format!("tether-bench-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let dir = TempDir(dir);
        let write = |name: &str, text: &str| -> anyhow::Result<PathBuf> {
            let path = dir.0.join(name);
            std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
            Ok(path)
        };
        let ca = write("ca.pem", &pki.ca_cert)?;
        let cert = write("server.pem", &pki.server_cert)?;
        let key = write("server.key", &pki.server_key)?;
        Ok(Pki { ca, cert, key, _dir: dir })
    }
}

/// The load generator's client configuration, trusting the CA in the PEM file `ca`.
pub fn client_config(ca: &Path) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let pem = std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?;
    let tls = tether::tls::ClientTls::new(tether::tls::TrustRoots::Pem(&pem), None)?;
    let mut config = (*tls.rustls_config()).clone();
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(config))
}

/// A full TLS 1.3 handshake over `stream`, verifying the server's certificate for `addr`'s IP address.
pub(crate) async fn handshake(
    config: &Arc<rustls::ClientConfig>,
    stream: TcpStream,
    addr: SocketAddr,
) -> anyhow::Result<Io> {
    let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
    let tls = tokio_rustls::TlsConnector::from(config.clone()).connect(name, stream).await.context("TLS handshake")?;
    let version = tls.get_ref().1.protocol_version();
    if version != Some(rustls::ProtocolVersion::TLSv1_3) {
        anyhow::bail!("the server negotiated {version:?}, not TLS 1.3");
    }
    Ok(Io::Tls(Box::new(tls)))
}

/// One connection's byte stream. The TLS state is boxed: a plain connection's task stays as small as before.
pub(crate) enum Io {
    Tcp(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for Io {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Tcp(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
