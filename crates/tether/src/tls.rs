//! TLS settings: rustls configurations built from PEM, for the server and the client.
//!
//! # Layout
//! [`ServerTls`] holds the server's certificate chain and key and, optionally, the CA that client certificates
//! must chain to (client-certificate authentication: without such a certificate the handshake fails). [`ClientTls`]
//! holds the trust roots (a PEM bundle, or the operating system's store), an optional client certificate, and
//! the name to verify the server's certificate against. Both use rustls's `ring` provider with its safe defaults
//! (TLS 1.2 and 1.3) and offer the ALPN protocol `tether/1`; the server's TLS 1.3 record protection keeps each
//! key as its bytes rather than expanded for the connection's life (`keys`, about 1 KB less per connection).
//! With a PEM bundle the client verifies the server through `PinningVerifier`, which adds certificate pinning
//! (below) to rustls's own verification; with the system store it uses rustls's verifier as is. [`explain`] and
//! `failure_detail` turn a failed handshake into a hint a person can act on. The driver runs the resulting rustls
//! connection; nothing else in tether depends on TLS.
//!
//! # Pinning
//! `openssl req -x509` makes, by default, a self-signed certificate marked `CA:TRUE`. Used as the server's own
//! certificate and given to the client as its CA file, rustls refuses it (`CaUsedAsEndEntity`): a CA certificate
//! may not be a server's leaf. The client instead accepts such a certificate when all of these hold: rustls's
//! verdict is exactly `CaUsedAsEndEntity`; the server presents, as its leaf, a certificate byte-for-byte equal to
//! one in the CA file; that certificate is self-issued (issuer equals subject) and marked `CA:TRUE`; the current
//! time is within its validity period (webpki checks this before it reaches `CaUsedAsEndEntity`, and the pin
//! checks it again itself); its extended key usage, if it has one, lists serverAuth; and it is valid for the
//! server name being verified (rustls's own name check). Any further certificates the server sends are ignored,
//! as they are not needed. The certificate's own signature is not checked: it is trusted as the exact bytes the
//! user gave. The handshake signature is still verified against the pinned
//! certificate's key, so the server must hold its private key. Every other refusal by rustls stands, with
//! rustls's own error. Pinning applies only to a PEM bundle, never to the system store.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};

mod keys;

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
    roots_of(certs(pem, what)?, what)
}

fn roots_of(certs: Vec<CertificateDer<'static>>, what: &str) -> Result<RootCertStore, TlsConfigError> {
    let mut store = RootCertStore::empty();
    for cert in certs {
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
        let builder = rustls::ServerConfig::builder_with_provider(Arc::new(keys::provider()))
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

    /// A server session on rustls's unbuffered API: the driver owns its buffers.
    pub(crate) fn accept(&self) -> Result<rustls::server::UnbufferedServerConnection, rustls::Error> {
        rustls::server::UnbufferedServerConnection::new(self.config.clone())
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
    /// A PEM bundle, e.g. a private CA's certificate, or a self-signed server certificate to pin (see the module
    /// doc, "Pinning").
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
    ///
    /// With [`TrustRoots::Pem`], a self-signed `CA:TRUE` certificate in the bundle is also accepted as the server's
    /// own when the server presents exactly that certificate (see the module doc, "Pinning").
    pub fn new(roots_from: TrustRoots<'_>, client_cert: Option<(&[u8], &[u8])>) -> Result<ClientTls, TlsConfigError> {
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(err)?;
        let builder = match roots_from {
            TrustRoots::Pem(pem) => {
                let verifier = PinningVerifier::new(certs(pem, "CA bundle")?)?;
                builder.dangerous().with_custom_certificate_verifier(Arc::new(verifier))
            }
            TrustRoots::System => {
                let found = rustls_native_certs::load_native_certs();
                let mut store = RootCertStore::empty();
                let (added, _) = store.add_parsable_certificates(found.certs);
                if added == 0 {
                    return Err(err("no usable certificate in the system trust store; give a CA file"));
                }
                builder.with_root_certificates(store)
            }
        };
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

    /// The rustls configuration, for a caller that runs its own TLS handshake (`tether probe` times it).
    pub fn rustls_config(&self) -> Arc<rustls::ClientConfig> {
        self.config.clone()
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

/// The client's verifier for a PEM bundle: rustls's [`WebPkiServerVerifier`] over the bundle, plus pinning of the
/// bundle's self-signed `CA:TRUE` certificates (see the module doc, "Pinning").
#[derive(Debug)]
struct PinningVerifier {
    inner: Arc<WebPkiServerVerifier>,
    pins: Vec<Pin>,
}

/// A certificate from the CA bundle that a server may present as its own, with what the verifier checks itself
/// when it does (rustls stops at `CaUsedAsEndEntity` before its extended key usage and name).
#[derive(Debug)]
struct Pin {
    der: CertificateDer<'static>,
    not_before: UnixTime,
    not_after: UnixTime,
    /// No extended key usage extension, or one that lists serverAuth.
    server_auth: bool,
}

impl PinningVerifier {
    fn new(certs: Vec<CertificateDer<'static>>) -> Result<PinningVerifier, TlsConfigError> {
        let pins = certs.iter().filter_map(Pin::of).collect();
        let inner = WebPkiServerVerifier::builder_with_provider(Arc::new(roots_of(certs, "CA bundle")?), provider())
            .build()
            .map_err(|e| err(format!("CA bundle: {e}")))?;
        Ok(PinningVerifier { inner, pins })
    }
}

impl Pin {
    /// `der` as a pin when it is self-issued (issuer equals subject, byte for byte) and marked `CA:TRUE`. Only
    /// certificates from the user's CA bundle are parsed here, never a peer's: a peer's is only compared byte for
    /// byte. A certificate that x509-parser cannot parse, or whose basicConstraints or extended key usage is
    /// malformed or repeated, is simply not pinned.
    fn of(der: &CertificateDer<'static>) -> Option<Pin> {
        let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
        let ca = cert.basic_constraints().ok()?.is_some_and(|constraints| constraints.value.ca);
        if !ca || cert.issuer().as_raw() != cert.subject().as_raw() {
            return None;
        }
        let server_auth = cert.extended_key_usage().ok()?.is_none_or(|usage| usage.value.server_auth);
        // Times before the Unix epoch count as the epoch itself.
        let unix = |time: x509_parser::time::ASN1Time| {
            UnixTime::since_unix_epoch(std::time::Duration::from_secs(u64::try_from(time.timestamp()).unwrap_or(0)))
        };
        let validity = cert.validity();
        Some(Pin {
            der: der.clone(),
            not_before: unix(validity.not_before),
            not_after: unix(validity.not_after),
            server_auth,
        })
    }

    /// Whether this pinned certificate is acceptable now for `server_name`; rustls's error if not.
    fn check(&self, server_name: &ServerName<'_>, now: UnixTime) -> Result<(), rustls::Error> {
        if now < self.not_before {
            return Err(CertificateError::NotValidYetContext { time: now, not_before: self.not_before }.into());
        }
        if now > self.not_after {
            return Err(CertificateError::ExpiredContext { time: now, not_after: self.not_after }.into());
        }
        if !self.server_auth {
            return Err(CertificateError::InvalidPurpose.into());
        }
        rustls::client::verify_server_name(&ParsedCertificate::try_from(&self.der)?, server_name)
    }
}

impl ServerCertVerifier for PinningVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let refusal = match self.inner.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            Ok(verified) => return Ok(verified),
            Err(e) => e,
        };
        if !ca_used_as_end_entity(&refusal) {
            return Err(refusal);
        }
        match self.pins.iter().find(|pin| pin.der.as_ref() == end_entity.as_ref()) {
            Some(pin) => pin.check(server_name, now).map(|()| ServerCertVerified::assertion()),
            None => Err(refusal),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }

    fn root_hint_subjects(&self) -> Option<&[rustls::DistinguishedName]> {
        self.inner.root_hint_subjects()
    }
}

/// Whether `err` is webpki's refusal of a CA certificate as a server's leaf. rustls has no variant of its own for
/// it and passes webpki's error on as [`CertificateError::Other`], whose text is the variant's name.
fn ca_used_as_end_entity(err: &rustls::Error) -> bool {
    matches!(err, rustls::Error::InvalidCertificate(CertificateError::Other(e)) if e.to_string() == "CaUsedAsEndEntity")
}

/// The hint for a TLS client that read bytes that are not TLS.
pub const NOT_TLS: &str =
    "the server speaks plain tether on this port, not TLS (or it is no tether server); connect without TLS";

/// A hint, in plain words, for a client whose TLS handshake failed with `err`: what is wrong with the server's
/// certificate, or why the server refused the client's, and how to fix it. `None` when there is nothing to add.
/// The hints name the `tether` command's options. On a server they would be wrong (they speak of the server's
/// certificate); see `failure_detail`.
pub fn explain(err: &rustls::Error) -> Option<&'static str> {
    use rustls::AlertDescription as Alert;
    use CertificateError as C;
    let hint = match err {
        _ if ca_used_as_end_entity(err) => {
            "the server presents a CA certificate (CA:TRUE) as its own; pass that exact certificate with --tls-ca to \
             pin it, or make a server certificate with `tether cert`"
        }
        rustls::Error::InvalidCertificate(e) => match e {
            C::UnknownIssuer => {
                "the server's certificate is not signed by a CA you trust: one in the --tls-ca file, or with --tls, \
                 in the system store"
            }
            C::NotValidForName | C::NotValidForNameContext { .. } => {
                "the certificate does not name the host you connected to; use --tls-server-name or a certificate that \
                 names it"
            }
            C::Expired | C::ExpiredContext { .. } => {
                "the server's certificate has expired, or this machine's clock is wrong; renew the certificate"
            }
            C::NotValidYet | C::NotValidYetContext { .. } => {
                "the server's certificate is not valid yet, or this machine's clock is wrong"
            }
            C::InvalidPurpose | C::InvalidPurposeContext { .. } => {
                "the server's certificate is not meant for a TLS server: its extended key usage lacks serverAuth"
            }
            _ => return None,
        },
        rustls::Error::AlertReceived(Alert::CertificateRequired) => {
            "the server requires a client certificate; pass --tls-cert and --tls-key"
        }
        rustls::Error::AlertReceived(Alert::UnknownCA) => {
            "the server does not trust the client certificate; use one signed by the server's --tls-client-ca"
        }
        // What came back is no TLS record: a plain tether server answers a ClientHello with a `BYE` frame.
        rustls::Error::InvalidMessage(rustls::InvalidMessage::InvalidContentType) => NOT_TLS,
        _ => return None,
    };
    Some(hint)
}

/// The detail of a `tls_error` close for `err` on `tls`: `tls: {err}`, followed on a client by `; hint: ` and the
/// [`explain`] hint when there is one.
pub(crate) fn failure_detail(tls: &rustls::Connection, err: &rustls::Error) -> String {
    match (tls, explain(err)) {
        (rustls::Connection::Client(_), Some(hint)) => format!("tls: {err}; hint: {hint}"),
        _ => format!("tls: {err}"),
    }
}

/// The detail of a server's `tls_error` close for `err`: `tls: {err}` (the hints speak to a client's user).
pub(crate) fn server_failure_detail(err: &rustls::Error) -> String {
    format!("tls: {err}")
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

#[cfg(test)]
mod tests {
    use rcgen::{date_time_ymd, BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair};
    use rustls::{AlertDescription, CertificateError, Error};

    use super::*;

    /// A self-signed certificate for `names`, as PEM and its key; `edit` adjusts the parameters first.
    fn self_signed(names: &[&str], edit: impl FnOnce(&mut CertificateParams)) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, "localhost");
        edit(&mut params);
        (params.self_signed(&key).unwrap().pem(), key.serialize_pem())
    }

    fn der_of(pem: &str) -> CertificateDer<'static> {
        CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
    }

    fn unix(year: i32, month: u8, day: u8) -> u64 {
        date_time_ymd(year, month, day).unix_timestamp().try_into().unwrap()
    }

    #[test]
    fn pins_read_what_pinning_needs() {
        let pin = |pem: &str| Pin::of(&der_of(pem));
        let secs = |pin: &Pin| (pin.not_before.as_secs(), pin.not_after.as_secs());
        // rcgen writes dates before 2050 as UTCTime and later ones as GeneralizedTime, as RFC 5280 asks.
        let (pem, _) = self_signed(&["localhost"], |p| {
            p.not_before = date_time_ymd(2024, 2, 29);
            p.not_after = date_time_ymd(2100, 3, 1);
        });
        let found = pin(&pem).unwrap();
        assert_eq!(secs(&found), (unix(2024, 2, 29), unix(2100, 3, 1)));
        assert!(found.server_auth);
        assert_eq!(found.der, der_of(&pem));

        // Before 1970 reads as 0; a 19xx UTCTime is read as such.
        let (pem, _) = self_signed(&["localhost"], |p| {
            p.not_before = date_time_ymd(1960, 1, 1);
            p.not_after = date_time_ymd(1999, 12, 31);
        });
        assert_eq!(secs(&pin(&pem).unwrap()), (0, unix(1999, 12, 31)));

        // An extKeyUsage without serverAuth; then one with it.
        let (pem, _) = self_signed(&["localhost"], |p| {
            p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        });
        assert!(!pin(&pem).unwrap().server_auth);
        let (pem, _) = self_signed(&["localhost"], |p| {
            p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth, ExtendedKeyUsagePurpose::ServerAuth];
        });
        assert!(pin(&pem).unwrap().server_auth);

        // No basicConstraints, or CA:FALSE: not pinned.
        let (pem, _) = self_signed(&["localhost"], |p| p.is_ca = IsCa::NoCa);
        assert!(pin(&pem).is_none());
        let (pem, _) = self_signed(&["localhost"], |p| p.is_ca = IsCa::ExplicitNoCa);
        assert!(pin(&pem).is_none());

        // A certificate signed by a CA is not self-issued, even when it is marked CA:TRUE; its CA is.
        let pki = DevPki::generate(&["localhost"], "c").unwrap();
        assert!(pin(&pki.server_cert).is_none());
        assert!(pin(&pki.ca_cert).is_some());
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(DnType::CommonName, "issuer");
        let issuer = ca_params.self_signed(&ca_key).unwrap();
        let mut params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, "localhost");
        let signed = params.signed_by(&KeyPair::generate().unwrap(), &issuer, &ca_key).unwrap();
        assert!(pin(&signed.pem()).is_none());

        // Truncated or garbled input is not pinned.
        let der = der_of(&pki.ca_cert);
        for cut in [0, 1, 10, der.len() / 2, der.len() - 1] {
            assert!(Pin::of(&CertificateDer::from(der[..cut].to_vec())).is_none(), "cut at {cut}");
        }
        assert!(Pin::of(&CertificateDer::from(b"\x30\x85\x01\x02\x03\x04\x05".to_vec())).is_none());
    }

    /// The server's side in memory, on rustls's unbuffered API as the driver runs it: `wire` from the client is
    /// processed, and what the server answers (its alert too, after a failure) is appended to `out`.
    fn serve(
        s: &mut rustls::server::UnbufferedServerConnection,
        incoming: &mut Vec<u8>,
        wire: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), Error> {
        use rustls::unbuffered::ConnectionState;
        incoming.extend_from_slice(wire);
        let mut failed = None;
        loop {
            let status = s.process_tls_records(incoming);
            let discard = status.discard;
            match status.state {
                Ok(ConnectionState::EncodeTlsData(mut e)) => {
                    let mut buf = vec![0u8; 1 << 16];
                    let n = e.encode(&mut buf).unwrap();
                    out.extend_from_slice(&buf[..n]);
                }
                Ok(ConnectionState::TransmitTlsData(t)) => t.done(),
                Err(e) if failed.is_none() => failed = Some(e),
                _ => break,
            }
            incoming.drain(..discard);
        }
        failed.map_or(Ok(()), Err)
    }

    /// A handshake between `client` and `server` in memory, with rounds to spare for late alerts: each side's
    /// failure detail, if it failed.
    fn handshake(client: &ClientTls, server: &ServerTls) -> (Option<String>, Option<String>) {
        let (mut c, mut s) = (client.connect("127.0.0.1:7400".parse().unwrap()).unwrap(), server.accept().unwrap());
        let (mut client_failed, mut server_failed) = (None, None);
        let (mut incoming, mut to_client) = (Vec::new(), Vec::new());
        for _ in 0..8 {
            if server_failed.is_none() {
                let mut wire = Vec::new();
                while c.wants_write() {
                    c.write_tls(&mut wire).unwrap();
                }
                server_failed =
                    serve(&mut s, &mut incoming, &wire, &mut to_client).err().map(|e| server_failure_detail(&e));
            }
            if client_failed.is_none() {
                let mut wire = &std::mem::take(&mut to_client)[..];
                while !wire.is_empty() {
                    c.read_tls(&mut wire).unwrap();
                    if let Err(e) = c.process_new_packets() {
                        client_failed = Some(failure_detail(&c, &e));
                        break;
                    }
                }
            }
        }
        if client_failed.is_none() && server_failed.is_none() {
            assert!(!c.is_handshaking() && !s.is_handshaking(), "the handshake did not finish");
        }
        (client_failed, server_failed)
    }

    fn server(cert: &str, key: &str) -> ServerTls {
        ServerTls::from_pem(cert.as_bytes(), key.as_bytes(), None).unwrap()
    }

    fn client(ca: &str) -> ClientTls {
        ClientTls::new(TrustRoots::Pem(ca.as_bytes()), None).unwrap()
    }

    #[test]
    fn client_failures_carry_a_hint_and_server_failures_do_not() {
        let (cert, key) = self_signed(&["localhost", "127.0.0.1"], |_| {});
        assert_eq!(handshake(&client(&cert), &server(&cert, &key)), (None, None));

        // Another self-signed CA certificate in the CA file: webpki's own refusal, which only the hint explains.
        let (other, _) = self_signed(&["localhost", "127.0.0.1"], |_| {});
        let (failed, _) = handshake(&client(&other), &server(&cert, &key));
        let failed = failed.unwrap();
        assert!(failed.starts_with("tls: invalid peer certificate: Other(OtherError(CaUsedAsEndEntity)); hint: "));
        assert!(
            failed.ends_with(
                "pass that exact certificate with --tls-ca to pin it, or make a server certificate with `tether cert`"
            ),
            "{failed}"
        );

        // A CA-signed server certificate the client has no CA for.
        let pki = DevPki::generate(&["localhost", "127.0.0.1"], "c").unwrap();
        let ours = server(&pki.server_cert, &pki.server_key);
        let (failed, _) = handshake(&client(&cert), &ours);
        let expected = "tls: invalid peer certificate: UnknownIssuer; hint: the server's certificate is not signed by \
                        a CA you trust: one in the --tls-ca file, or with --tls, in the system store";
        assert_eq!(failed.unwrap(), expected);

        // A name the certificate does not carry.
        let named = client(&pki.ca_cert).with_server_name("example.com").unwrap();
        let failed = handshake(&named, &ours).0.unwrap();
        let expected = "; hint: the certificate does not name the host you connected to; use --tls-server-name or a \
                        certificate that names it";
        assert!(failed.ends_with(expected), "{failed}");

        // The server refuses a client without a certificate: the hint is the client's; the server's own failure,
        // about the client's certificate, gets none (the hints speak of the server's certificate).
        let strict =
            ServerTls::from_pem(pki.server_cert.as_bytes(), pki.server_key.as_bytes(), Some(pki.ca_cert.as_bytes()))
                .unwrap();
        let (failed, server_failed) = handshake(&client(&pki.ca_cert), &strict);
        let expected =
            "tls: received fatal alert: CertificateRequired; hint: the server requires a client certificate; \
                        pass --tls-cert and --tls-key";
        assert_eq!(failed.unwrap(), expected);
        assert_eq!(server_failed.unwrap(), "tls: peer sent no certificates");
        let foreign = DevPki::generate(&["localhost"], "x").unwrap();
        let with_foreign = ClientTls::new(
            TrustRoots::Pem(pki.ca_cert.as_bytes()),
            Some((foreign.client_cert.as_bytes(), foreign.client_key.as_bytes())),
        )
        .unwrap();
        let (failed, server_failed) = handshake(&with_foreign, &strict);
        assert!(failed.unwrap().ends_with(
            "; hint: the server does not trust the client certificate; use one signed by the server's --tls-client-ca"
        ));
        assert_eq!(server_failed.unwrap(), "tls: invalid peer certificate: UnknownIssuer");
    }

    #[test]
    fn every_certificate_problem_a_user_can_fix_has_a_hint() {
        let hint = |e: CertificateError| explain(&Error::InvalidCertificate(e));
        let now = UnixTime::since_unix_epoch(std::time::Duration::from_secs(2_000_000_000));
        let then = UnixTime::since_unix_epoch(std::time::Duration::from_secs(1_000_000_000));
        assert!(hint(CertificateError::ExpiredContext { time: now, not_after: then }).unwrap().contains("expired"));
        assert!(hint(CertificateError::Expired).unwrap().contains("expired"));
        let early = CertificateError::NotValidYetContext { time: then, not_before: now };
        assert!(hint(early).unwrap().contains("not valid yet"));
        assert!(hint(CertificateError::NotValidYet).unwrap().contains("not valid yet"));
        assert!(hint(CertificateError::InvalidPurpose).unwrap().contains("serverAuth"));
        assert!(hint(CertificateError::NotValidForName).unwrap().contains("--tls-server-name"));
        assert_eq!(hint(CertificateError::BadEncoding), None);
        assert_eq!(explain(&Error::AlertReceived(AlertDescription::HandshakeFailure)), None);
        assert_eq!(explain(&Error::DecryptError), None);
        // Bytes that are no TLS record at all: a plain port. Any other malformed message is not named so.
        assert_eq!(explain(&Error::InvalidMessage(rustls::InvalidMessage::InvalidContentType)), Some(NOT_TLS));
        assert_eq!(explain(&Error::InvalidMessage(rustls::InvalidMessage::HandshakePayloadTooLarge)), None);
    }
}
