//! TLS settings: rustls configurations built from PEM, for the server and the client.
//!
//! # Layout
//! [`ServerTls`] holds the server's certificate chain and key and, optionally, the CA that client certificates
//! must chain to (client-certificate authentication: without such a certificate the handshake fails). [`ClientTls`]
//! holds the trust roots (a PEM bundle, or the operating system's store), an optional client certificate, and
//! the name to verify the server's certificate against. Both use rustls's `ring` provider with its safe defaults
//! (TLS 1.2 and 1.3) and offer the ALPN protocol `tether/1`. The driver runs the resulting rustls connection;
//! nothing else in tether depends on TLS.

use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;

/// The ALPN protocol name both sides offer.
pub const ALPN: &[u8] = b"tether/1";

/// A TLS configuration that could not be built; the message names what was wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("tls: {0}")]
pub struct TlsConfigError(String);

fn err(what: impl std::fmt::Display) -> TlsConfigError {
    TlsConfigError(what.to_string())
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certs(pem: &[u8], what: &str) -> Result<Vec<CertificateDer<'static>>, TlsConfigError> {
    let certs =
        CertificateDer::pem_slice_iter(pem).collect::<Result<Vec<_>, _>>().map_err(|e| err(format!("{what}: {e}")))?;
    if certs.is_empty() {
        return Err(err(format!("{what}: no PEM certificate found")));
    }
    Ok(certs)
}

fn key(pem: &[u8], what: &str) -> Result<PrivateKeyDer<'static>, TlsConfigError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| err(format!("{what}: no usable PEM private key ({e})")))
}

fn roots(pem: &[u8], what: &str) -> Result<RootCertStore, TlsConfigError> {
    let mut store = RootCertStore::empty();
    for cert in certs(pem, what)? {
        store.add(cert).map_err(|e| err(format!("{what}: {e}")))?;
    }
    Ok(store)
}

/// The server side: certificate chain, key, and optionally the CA client certificates must chain to.
#[derive(Clone)]
pub struct ServerTls {
    config: Arc<rustls::ServerConfig>,
    client_auth: bool,
}

impl ServerTls {
    /// `cert_pem`: the server's chain, leaf first. `key_pem`: its private key (PKCS#8, PKCS#1 or SEC1).
    /// `client_ca_pem`: when given, every client must present a certificate that chains to one of these.
    pub fn from_pem(
        cert_pem: &[u8],
        key_pem: &[u8],
        client_ca_pem: Option<&[u8]>,
    ) -> Result<ServerTls, TlsConfigError> {
        let chain = certs(cert_pem, "server certificate")?;
        let key = key(key_pem, "server key")?;
        let builder = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(err)?;
        let builder = match client_ca_pem {
            Some(pem) => {
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots(pem, "client CA")?), provider())
                        .build()
                        .map_err(|e| err(format!("client CA: {e}")))?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let mut config =
            builder.with_single_cert(chain, key).map_err(|e| err(format!("server certificate and key: {e}")))?;
        config.alpn_protocols = vec![ALPN.to_vec()];
        Ok(ServerTls { config: Arc::new(config), client_auth: client_ca_pem.is_some() })
    }

    /// Whether clients must present a certificate.
    pub fn requires_client_cert(&self) -> bool {
        self.client_auth
    }

    pub(crate) fn accept(&self) -> Result<Box<rustls::Connection>, rustls::Error> {
        Ok(Box::new(rustls::ServerConnection::new(self.config.clone())?.into()))
    }
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls").field("client_auth", &self.client_auth).finish_non_exhaustive()
    }
}

impl PartialEq for ServerTls {
    fn eq(&self, other: &ServerTls) -> bool {
        Arc::ptr_eq(&self.config, &other.config)
    }
}

/// Where a client's trusted certificate authorities come from.
#[derive(Debug, Clone, Copy)]
pub enum TrustRoots<'a> {
    /// A PEM bundle, e.g. a private CA's certificate.
    Pem(&'a [u8]),
    /// The operating system's store (on Linux, the distribution's CA bundle).
    System,
}

/// The client side: whom to trust, whether to present a certificate, and the name to check.
#[derive(Clone)]
pub struct ClientTls {
    config: Arc<rustls::ClientConfig>,
    /// Set by [`ClientTls::with_server_name`]; wins over everything.
    server_name: Option<ServerName<'static>>,
    /// The host name the address was given as, set per connection by [`crate::Client::connect_to`].
    host_name: Option<ServerName<'static>>,
}

impl ClientTls {
    /// `client_cert`: a PEM chain and key to present when the server asks for one.
    pub fn new(roots_from: TrustRoots<'_>, client_cert: Option<(&[u8], &[u8])>) -> Result<ClientTls, TlsConfigError> {
        let store = match roots_from {
            TrustRoots::Pem(pem) => roots(pem, "CA bundle")?,
            TrustRoots::System => {
                let found = rustls_native_certs::load_native_certs();
                let mut store = RootCertStore::empty();
                let (added, _) = store.add_parsable_certificates(found.certs);
                if added == 0 {
                    return Err(err("no usable certificate in the system trust store; give a CA file"));
                }
                store
            }
        };
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(err)?
            .with_root_certificates(store);
        let mut config = match client_cert {
            Some((cert_pem, key_pem)) => builder
                .with_client_auth_cert(certs(cert_pem, "client certificate")?, key(key_pem, "client key")?)
                .map_err(|e| err(format!("client certificate and key: {e}")))?,
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![ALPN.to_vec()];
        Ok(ClientTls { config: Arc::new(config), server_name: None, host_name: None })
    }

    /// Verify the server's certificate against `name` (a DNS name or an IP address). Without it, the host name
    /// the address was given as is checked ([`crate::Client::connect_to`]), else the IP address connected to.
    pub fn with_server_name(mut self, name: &str) -> Result<ClientTls, TlsConfigError> {
        let name = ServerName::try_from(name.to_owned()).map_err(|e| err(format!("server name {name:?}: {e}")))?;
        self.server_name = Some(name);
        Ok(self)
    }

    /// This configuration for a server given as `host` (a DNS name, or an IP address which changes nothing).
    pub(crate) fn for_host(mut self, host: &str) -> ClientTls {
        if host.parse::<std::net::IpAddr>().is_err() {
            self.host_name = ServerName::try_from(host.to_owned()).ok();
        }
        self
    }

    /// The name the server's certificate is checked against when connecting to `addr`.
    pub fn server_name_for(&self, addr: std::net::SocketAddr) -> ServerName<'static> {
        (self.server_name.clone().or_else(|| self.host_name.clone()))
            .unwrap_or_else(|| ServerName::IpAddress(addr.ip().into()))
    }

    pub(crate) fn connect(&self, addr: std::net::SocketAddr) -> Result<Box<rustls::Connection>, rustls::Error> {
        let conn = rustls::ClientConnection::new(self.config.clone(), self.server_name_for(addr))?;
        Ok(Box::new(conn.into()))
    }
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("server_name", &self.server_name)
            .field("host_name", &self.host_name)
            .finish_non_exhaustive()
    }
}

impl PartialEq for ClientTls {
    fn eq(&self, other: &ClientTls) -> bool {
        Arc::ptr_eq(&self.config, &other.config)
            && self.server_name == other.server_name
            && self.host_name == other.host_name
    }
}

/// A throwaway PKI for tests and local demos (`tether cert`): a CA, a server certificate for the given names,
/// and a client certificate, all signed by that CA, in PEM. Never for production: the keys live in memory and in
/// whatever files the caller writes.
#[derive(Debug, Clone)]
pub struct DevPki {
    pub ca_cert: String,
    pub server_cert: String,
    pub server_key: String,
    pub client_cert: String,
    pub client_key: String,
}

impl DevPki {
    /// `server_names`: DNS names or IP addresses the server certificate is valid for (e.g. `localhost`,
    /// `127.0.0.1`). `client_name`: the client certificate's common name.
    pub fn generate(server_names: &[&str], client_name: &str) -> Result<DevPki, TlsConfigError> {
        use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair};
        let ca_key = KeyPair::generate().map_err(err)?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(err)?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        // A distinct name per CA, so that two dev CAs are never mistaken for each other's issuer.
        let ca_name = format!("tether dev CA {:016x}", rand::random::<u64>());
        ca_params.distinguished_name.push(DnType::CommonName, ca_name);
        let ca = ca_params.self_signed(&ca_key).map_err(err)?;

        let leaf = |names: Vec<String>, cn: &str, usage: ExtendedKeyUsagePurpose| {
            let key = KeyPair::generate().map_err(err)?;
            let mut params = CertificateParams::new(names).map_err(err)?;
            params.distinguished_name.push(DnType::CommonName, cn);
            params.extended_key_usages = vec![usage];
            let cert = params.signed_by(&key, &ca, &ca_key).map_err(err)?;
            Ok::<_, TlsConfigError>((cert.pem(), key.serialize_pem()))
        };
        let names: Vec<String> = server_names.iter().map(|n| n.to_string()).collect();
        let cn = server_names.first().copied().unwrap_or("tether server");
        let (server_cert, server_key) = leaf(names, cn, ExtendedKeyUsagePurpose::ServerAuth)?;
        let (client_cert, client_key) =
            leaf(vec![client_name.to_string()], client_name, ExtendedKeyUsagePurpose::ClientAuth)?;
        Ok(DevPki { ca_cert: ca.pem(), server_cert, server_key, client_cert, client_key })
    }
}
