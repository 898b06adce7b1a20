//! The server's TLS 1.3 record protection, with each direction's key kept as its bytes.
//!
//! # Why
//! rustls's `ring` provider keeps each direction's key expanded: ring's AES key schedule and GHASH table, 544 bytes
//! whatever the suite (ring's key type is one enum for every algorithm), in a 560-byte allocation, two per
//! connection for its whole life. An idle connection seals and opens a record or two per heartbeat, so the server
//! keeps the 16- or 32-byte key instead and expands it for each record: about 110 ns per AES-GCM record on this
//! machine (17 ns for ChaCha20-Poly1305), against the 1,048 bytes each idle TLS connection saves.
//!
//! # Rules
//! The same TLS 1.3 suites as rustls's `ring` provider, in its order, with the same hash, key derivation, limits
//! and QUIC algorithms; only the [`Tls13AeadAlgorithm`] differs, and the cryptography is still ring's (the same
//! `seal_in_place_append_tag` / `open_in_place` calls rustls makes, with rustls's own nonce and additional data).
//! TLS 1.2 suites are rustls's unchanged. The key stays in rustls's [`AeadKey`], which wipes it when dropped; the
//! expansion made for a record is not wiped (ring does not), as rustls's provider never wipes the one it keeps.
//! Only the server uses it: the client keeps rustls's provider, so every TLS test is also a test against an
//! independent implementation of the record layer.

use std::sync::OnceLock;

use ring::aead;
use rustls::crypto::cipher::{
    make_tls13_aad, AeadKey, InboundOpaqueMessage, InboundPlainMessage, Iv, MessageDecrypter, MessageEncrypter, Nonce,
    OutboundOpaqueMessage, OutboundPlainMessage, PrefixedPayload, Tls13AeadAlgorithm, UnsupportedOperationError,
};
use rustls::crypto::CryptoProvider;
use rustls::{CipherSuite, ConnectionTrafficSecrets, ContentType, Error, ProtocolVersion, SupportedCipherSuite};

/// rustls's `ring` provider with its TLS 1.3 suites' record protection replaced by [`Lean`].
pub(super) fn provider() -> CryptoProvider {
    let mut p = rustls::crypto::ring::default_provider();
    let lean = suites();
    for s in &mut p.cipher_suites {
        if let SupportedCipherSuite::Tls13(t) = s {
            if let Some(l) = lean.iter().find(|l| l.common.suite == t.common.suite) {
                *s = SupportedCipherSuite::Tls13(l);
            }
        }
    }
    p
}

/// ring's TLS 1.3 suites with [`Lean`] record protection, made once per process.
fn suites() -> &'static [rustls::Tls13CipherSuite] {
    static SUITES: OnceLock<Vec<rustls::Tls13CipherSuite>> = OnceLock::new();
    SUITES.get_or_init(|| {
        rustls::crypto::ring::DEFAULT_CIPHER_SUITES
            .iter()
            .filter_map(|s| match s {
                SupportedCipherSuite::Tls13(t) => Some(rustls::Tls13CipherSuite {
                    common: rustls::CipherSuiteCommon {
                        suite: t.common.suite,
                        hash_provider: t.common.hash_provider,
                        confidentiality_limit: t.common.confidentiality_limit,
                    },
                    hkdf_provider: t.hkdf_provider,
                    aead_alg: Lean::of(t.common.suite)?,
                    quic: t.quic,
                }),
                SupportedCipherSuite::Tls12(_) => None,
            })
            .collect()
    })
}

/// A TLS 1.3 AEAD whose encrypters and decrypters keep the key's bytes and expand them per record.
struct Lean {
    alg: &'static aead::Algorithm,
    suite: CipherSuite,
}

static AES_128_GCM: Lean = Lean { alg: &aead::AES_128_GCM, suite: CipherSuite::TLS13_AES_128_GCM_SHA256 };
static AES_256_GCM: Lean = Lean { alg: &aead::AES_256_GCM, suite: CipherSuite::TLS13_AES_256_GCM_SHA384 };
static CHACHA20_POLY1305: Lean =
    Lean { alg: &aead::CHACHA20_POLY1305, suite: CipherSuite::TLS13_CHACHA20_POLY1305_SHA256 };

impl Lean {
    fn of(suite: CipherSuite) -> Option<&'static Lean> {
        [&AES_128_GCM, &AES_256_GCM, &CHACHA20_POLY1305].into_iter().find(|l| l.suite == suite)
    }
}

impl Tls13AeadAlgorithm for Lean {
    fn encrypter(&self, key: AeadKey, iv: Iv) -> Box<dyn MessageEncrypter> {
        debug_assert_eq!(key.as_ref().len(), self.alg.key_len(), "rustls sizes the key by key_len()");
        Box::new(Keyed { alg: self.alg, key, iv })
    }

    fn decrypter(&self, key: AeadKey, iv: Iv) -> Box<dyn MessageDecrypter> {
        debug_assert_eq!(key.as_ref().len(), self.alg.key_len(), "rustls sizes the key by key_len()");
        Box::new(Keyed { alg: self.alg, key, iv })
    }

    fn key_len(&self) -> usize {
        self.alg.key_len()
    }

    fn extract_keys(&self, key: AeadKey, iv: Iv) -> Result<ConnectionTrafficSecrets, UnsupportedOperationError> {
        match self.suite {
            CipherSuite::TLS13_AES_128_GCM_SHA256 => Ok(ConnectionTrafficSecrets::Aes128Gcm { key, iv }),
            CipherSuite::TLS13_AES_256_GCM_SHA384 => Ok(ConnectionTrafficSecrets::Aes256Gcm { key, iv }),
            CipherSuite::TLS13_CHACHA20_POLY1305_SHA256 => Ok(ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv }),
            _ => Err(UnsupportedOperationError),
        }
    }

    fn fips(&self) -> bool {
        false
    }
}

/// One direction's key (its bytes) and IV.
struct Keyed {
    alg: &'static aead::Algorithm,
    key: AeadKey,
    iv: Iv,
}

impl Keyed {
    /// The key expanded for one record. rustls made `key` `key_len()` bytes long, so ring accepts it.
    fn expand(&self) -> Result<aead::LessSafeKey, ()> {
        aead::UnboundKey::new(self.alg, self.key.as_ref()).map(aead::LessSafeKey::new).map_err(|_| ())
    }

    fn nonce(&self, seq: u64) -> aead::Nonce {
        aead::Nonce::assume_unique_for_key(Nonce::new(&self.iv, seq).0)
    }
}

impl MessageEncrypter for Keyed {
    fn encrypt(&mut self, msg: OutboundPlainMessage<'_>, seq: u64) -> Result<OutboundOpaqueMessage, Error> {
        let total = self.encrypted_payload_len(msg.payload.len());
        let mut payload = PrefixedPayload::with_capacity(total);
        payload.extend_from_chunks(&msg.payload);
        payload.extend_from_slice(&msg.typ.to_array());
        let key = self.expand().map_err(|()| Error::EncryptError)?;
        key.seal_in_place_append_tag(self.nonce(seq), aead::Aad::from(make_tls13_aad(total)), &mut payload)
            .map_err(|_| Error::EncryptError)?;
        // Every TLS 1.3 record is sent as application data with the legacy version 1.2 (RFC 8446, 5.1 and 5.2).
        Ok(OutboundOpaqueMessage::new(ContentType::ApplicationData, ProtocolVersion::TLSv1_2, payload))
    }

    fn encrypted_payload_len(&self, payload_len: usize) -> usize {
        payload_len + 1 + self.alg.tag_len()
    }
}

impl MessageDecrypter for Keyed {
    fn decrypt<'a>(&mut self, mut msg: InboundOpaqueMessage<'a>, seq: u64) -> Result<InboundPlainMessage<'a>, Error> {
        let payload = &mut msg.payload;
        if payload.len() < self.alg.tag_len() {
            return Err(Error::DecryptError);
        }
        let key = self.expand().map_err(|()| Error::DecryptError)?;
        let aad = aead::Aad::from(make_tls13_aad(payload.len()));
        let plain = key.open_in_place(self.nonce(seq), aad, payload).map_err(|_| Error::DecryptError)?.len();
        payload.truncate(plain);
        msg.into_tls13_unpadded_message()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_tls13_suite_of_the_ring_provider_is_replaced_and_nothing_else() {
        let ours = provider();
        let ring = rustls::crypto::ring::default_provider();
        assert_eq!(ours.cipher_suites.len(), ring.cipher_suites.len());
        for (a, b) in ours.cipher_suites.iter().zip(&ring.cipher_suites) {
            assert_eq!(a.suite(), b.suite(), "same suites, same order");
            match (a, b) {
                (SupportedCipherSuite::Tls13(a), SupportedCipherSuite::Tls13(b)) => {
                    assert!(!std::ptr::eq(*a, *b), "{:?} keeps ring's record protection", a.common.suite);
                    assert_eq!(a.aead_alg.key_len(), b.aead_alg.key_len());
                }
                (SupportedCipherSuite::Tls12(a), SupportedCipherSuite::Tls12(b)) => assert!(std::ptr::eq(*a, *b)),
                _ => panic!("a suite changed its protocol version"),
            }
        }
    }

    /// A TLS 1.3 session with each suite: the server with these keys, the client with rustls's own; data both ways,
    /// a key update each way; a record altered in flight is refused; extracted secrets name the suite.
    #[test]
    fn every_suite_talks_to_rustls_own_record_protection_and_refuses_an_altered_record() {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
        use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
        use std::io::{Read, Write};
        use std::sync::Arc;

        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = ca.self_signed(&ca_key).unwrap();
        let leaf_key = KeyPair::generate().unwrap();
        let leaf =
            CertificateParams::new(vec!["localhost".to_owned()]).unwrap().signed_by(&leaf_key, &ca, &ca_key).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(CertificateDer::from(ca.der().to_vec())).unwrap();
        let roots = Arc::new(roots);

        // Move what `from` wrote to `to`; whether there was anything.
        fn carry<A, B>(
            from: &mut rustls::ConnectionCommon<A>,
            to: &mut rustls::ConnectionCommon<B>,
        ) -> Result<bool, Error> {
            let moved = from.wants_write();
            while from.wants_write() {
                let mut buf = Vec::new();
                from.write_tls(&mut buf).unwrap();
                to.read_tls(&mut &buf[..]).unwrap();
                to.process_new_packets()?;
            }
            Ok(moved)
        }
        // Until neither side has anything to send.
        fn pump(c: &mut rustls::ClientConnection, s: &mut rustls::ServerConnection) -> Result<(), Error> {
            while carry(c, s)? | carry(s, c)? {}
            Ok(())
        }
        fn read_all(r: &mut impl Read) -> Vec<u8> {
            let mut out = vec![0; 4096];
            let n = r.read(&mut out).unwrap();
            out.truncate(n);
            out
        }

        // A handshaken session with `suite`: the server with these keys, the client with rustls's own; both allow
        // their secrets to be extracted.
        let session = |suite: &rustls::Tls13CipherSuite| {
            let mut server = rustls::ServerConfig::builder_with_provider(Arc::new(provider()))
                .with_protocol_versions(&[&rustls::version::TLS13])
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(
                    vec![CertificateDer::from(leaf.der().to_vec())],
                    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der())),
                )
                .unwrap();
            server.enable_secret_extraction = true;
            let mut ring = rustls::crypto::ring::default_provider();
            ring.cipher_suites.retain(|s| s.suite() == suite.common.suite);
            let mut client = rustls::ClientConfig::builder_with_provider(Arc::new(ring))
                .with_protocol_versions(&[&rustls::version::TLS13])
                .unwrap()
                .with_root_certificates(roots.clone())
                .with_no_client_auth();
            client.enable_secret_extraction = true;
            let mut c = rustls::ClientConnection::new(Arc::new(client), "localhost".try_into().unwrap()).unwrap();
            let mut s = rustls::ServerConnection::new(Arc::new(server)).unwrap();
            pump(&mut c, &mut s).unwrap();
            assert_eq!(s.negotiated_cipher_suite().map(|n| n.suite()), Some(suite.common.suite));
            (c, s)
        };

        for suite in suites() {
            let name = suite.common.suite;
            let (mut c, mut s) = session(suite);
            for round in 0..2u8 {
                c.writer().write_all(&[b'c', round]).unwrap();
                let body = [b's' ^ round; 300];
                s.writer().write_all(&body).unwrap();
                pump(&mut c, &mut s).unwrap();
                assert_eq!(read_all(&mut s.reader()), [b'c', round], "{name:?}");
                assert_eq!(read_all(&mut c.reader()), body.to_vec(), "{name:?}");
                // New keys both ways before the second round.
                c.refresh_traffic_keys().unwrap();
                s.refresh_traffic_keys().unwrap();
            }
            // A record altered in flight, in its tag (its last byte) or its ciphertext (the byte after its header),
            // is refused; each in a session of its own, since the refusal ends it.
            for at in [usize::MAX, 5] {
                let (mut c, mut s) = session(suite);
                c.writer().write_all(b"altered").unwrap();
                let mut wire = Vec::new();
                c.write_tls(&mut wire).unwrap();
                let i = at.min(wire.len() - 1);
                wire[i] ^= 1;
                s.read_tls(&mut &wire[..]).unwrap();
                assert_eq!(s.process_new_packets().err(), Some(Error::DecryptError), "{name:?}, byte {i}");
            }
            // The secrets extracted are named for the suite, and each side's sending key is the other's receiving one.
            let (c, s) = session(suite);
            let (s, c) = (s.dangerous_extract_secrets().unwrap(), c.dangerous_extract_secrets().unwrap());
            let key = |t: &ConnectionTrafficSecrets| match t {
                ConnectionTrafficSecrets::Aes128Gcm { key, .. } => {
                    (CipherSuite::TLS13_AES_128_GCM_SHA256, key.as_ref().to_vec())
                }
                ConnectionTrafficSecrets::Aes256Gcm { key, .. } => {
                    (CipherSuite::TLS13_AES_256_GCM_SHA384, key.as_ref().to_vec())
                }
                ConnectionTrafficSecrets::Chacha20Poly1305 { key, .. } => {
                    (CipherSuite::TLS13_CHACHA20_POLY1305_SHA256, key.as_ref().to_vec())
                }
                _ => panic!("{name:?}: an unexpected kind of secret"),
            };
            let (sent, received) = (key(&s.tx.1), key(&s.rx.1));
            assert_eq!(sent.0, name);
            assert_eq!(sent, key(&c.rx.1), "{name:?}: the server's sending key is the client's receiving key");
            assert_eq!(received, key(&c.tx.1), "{name:?}: and the other way round");
        }
    }
}
