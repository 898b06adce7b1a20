//! TLS over real loopback sockets, with certificates generated at test time and tokio's paused clock: the
//! handshake, heartbeats and the main verdicts behave as over plain TCP; every TLS failure is `tls_error` (or a
//! clear `protocol_error` on the plaintext side) and touches no other client. A self-signed `CA:TRUE` certificate
//! given as the client's CA file is pinned: that exact certificate, still checked for its name, validity period,
//! purpose and key. The raw TLS peers are tokio-rustls, an implementation independent of tether's own rustls
//! driver.

mod support;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use support::{hello_frame, next_disconnect, offline_reason, test_config, RawPeer, TestServer};
use tether::proto::frame::PROTOCOL_VERSION;
use tether::proto::Frame;
use tether::{
    Client, ClientConfig, ClientTls, CloseReason, ConnectError, DevPki, EventKind, ServerConfig, ServerTls, TrustRoots,
};
use tokio_rustls::rustls;

fn pki() -> DevPki {
    DevPki::generate(&["localhost", "127.0.0.1"], "device-1").unwrap()
}

fn tls_server_config(pki: &DevPki, client_ca: bool) -> ServerConfig {
    let mut cfg = test_config();
    let ca = client_ca.then_some(pki.ca_cert.as_bytes());
    cfg.tls = Some(ServerTls::from_pem(pki.server_cert.as_bytes(), pki.server_key.as_bytes(), ca).unwrap());
    cfg
}

fn tls_client(id: &str, pki: &DevPki) -> ClientConfig {
    let mut c = ClientConfig::new(id);
    c.heartbeat_interval = Some(Duration::from_secs(1));
    c.tls = Some(ClientTls::new(TrustRoots::Pem(pki.ca_cert.as_bytes()), None).unwrap());
    c
}

fn closed_reason(k: &EventKind) -> Option<(CloseReason, Option<String>)> {
    match k {
        EventKind::Closed { reason, detail, .. } => Some((*reason, detail.clone())),
        _ => None,
    }
}

fn refused(r: Result<Client, ConnectError>) -> tether::Disconnect {
    match r {
        Err(ConnectError::Refused(d)) => d,
        Err(e) => panic!("expected a refusal, got {e:?}"),
        Ok(_) => panic!("expected a refusal, got a connection"),
    }
}

/// A tokio-rustls client trusting the dev CA.
fn raw_connector(pki: &DevPki) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    let ca = rustls::pki_types::CertificateDer::from_pem_slice(pki.ca_cert.as_bytes()).unwrap();
    roots.add(ca).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
}

use rustls::pki_types::pem::PemObject;

/// A self-signed certificate and its key in PEM, as `openssl req -x509` makes by default: `CA:TRUE`, subject
/// `CN=localhost`, valid for `names` (DNS names or IP addresses).
fn self_signed_ca(names: &[&str]) -> (String, String) {
    self_signed_ca_with(names, |_| {})
}

/// [`self_signed_ca`], with `edit` applied to its parameters first.
fn self_signed_ca_with(names: &[&str], edit: impl FnOnce(&mut rcgen::CertificateParams)) -> (String, String) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, "localhost");
    edit(&mut params);
    (params.self_signed(&key).unwrap().pem(), key.serialize_pem())
}

/// The detail of a refusal by the client itself over TLS, after checking the server saw the handshake fail too.
async fn refused_by_client(s: &mut TestServer, cfg: ClientConfig) -> String {
    let d = refused(Client::connect(s.addr, cfg).await);
    assert_eq!((d.reason, d.by_peer), (CloseReason::TlsError, false));
    let (reason, _) = closed_reason(&s.wait(|k| closed_reason(k).is_some()).await).unwrap();
    assert_eq!(reason, CloseReason::TlsError);
    d.detail.unwrap()
}

fn server_with(cert: &str, key: &str) -> ServerConfig {
    let mut cfg = test_config();
    cfg.tls = Some(ServerTls::from_pem(cert.as_bytes(), key.as_bytes(), None).unwrap());
    cfg
}

fn client_trusting(id: &str, ca_pem: &str) -> ClientConfig {
    let mut c = ClientConfig::new(id);
    c.heartbeat_interval = Some(Duration::from_secs(1));
    c.tls = Some(ClientTls::new(TrustRoots::Pem(ca_pem.as_bytes()), None).unwrap());
    c
}

#[tokio::test(start_paused = true)]
async fn tls_handshake_heartbeats_and_data_then_a_clean_bye() {
    let pki = pki();
    let mut s = TestServer::start(tls_server_config(&pki, false)).await;
    let mut a = Client::connect(s.addr, tls_client("a", &pki)).await.unwrap();
    assert_eq!((a.welcome().heartbeat_ms, a.welcome().timeout_ms), (1000, 3000));
    s.wait(|k| matches!(k, EventKind::Online { client, .. } if client == "a")).await;
    // Ten timeouts of virtual time: only heartbeats keep the link, both ways, over TLS.
    let t0 = tokio::time::Instant::now();
    while t0.elapsed() < Duration::from_secs(30) {
        tokio::select! {
            ev = a.next_event() => panic!("client event while idle: {ev:?}"),
            k = s.events.recv() => panic!("server event while idle: {k:?}"),
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
    a.send(Some("a"), Bytes::from_static(b"over tls")).await.unwrap();
    assert_eq!(&support::next_data(&mut a).await[..], b"over tls");
    support::close_cleanly(&mut s, &mut a, "a").await;
}

#[tokio::test(start_paused = true)]
async fn a_silent_tls_peer_is_a_heartbeat_timeout_and_is_told_so_inside_tls() {
    let pki = pki();
    let mut s = TestServer::start(tls_server_config(&pki, false)).await;
    let tcp = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let stream = raw_connector(&pki).connect(name, tcp).await.unwrap();
    let mut p = RawPeer::from_stream(stream);
    p.send(&hello_frame(PROTOCOL_VERSION, "a", 1)).await;
    let Some(Frame::Welcome(w)) = p.next_frame().await else { panic!("no WELCOME") };
    assert_eq!((w.heartbeat_ms, w.timeout_ms), (1000, 3000));
    let t0 = tokio::time::Instant::now();
    let k = s.wait(|k| offline_reason(k, "a").is_some()).await;
    let EventKind::Offline { reason, lateness, .. } = k else { unreachable!() };
    assert_eq!(reason, CloseReason::HeartbeatTimeout);
    assert_eq!(lateness, Some(Duration::ZERO));
    assert_eq!(t0.elapsed(), Duration::from_secs(3));
    let (pings, bye) = p.pings_then_bye().await;
    assert!(pings >= 1);
    assert_eq!(bye.reason, CloseReason::HeartbeatTimeout);
    // The goodbye ends with close_notify, which tokio-rustls reports as a clean end of stream.
    assert_eq!(p.next_frame().await, None);
}

/// TLS 1.3 key updates: the client refreshes its keys and asks the server to refresh its own, before its `HELLO`
/// and again in the session; the server follows both ways and the session carries on.
#[tokio::test(start_paused = true)]
async fn key_updates_both_ways_keep_the_session() {
    let pki = pki();
    let mut s = TestServer::start(tls_server_config(&pki, false)).await;
    let tcp = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut stream = raw_connector(&pki).connect(name, tcp).await.unwrap();
    stream.get_mut().1.refresh_traffic_keys().unwrap();
    let mut p = RawPeer::from_stream(stream);
    p.send(&hello_frame(PROTOCOL_VERSION, "a", 1)).await;
    let Some(Frame::Welcome(_)) = p.next_frame().await else { panic!("no WELCOME after a key update") };
    s.wait(|k| matches!(k, EventKind::Online { client, .. } if client == "a")).await;
    for seq in 1..=2 {
        p.stream_mut().get_mut().1.refresh_traffic_keys().unwrap();
        p.send(&Frame::Ping { seq, ts_ms: 0 }).await;
        loop {
            match p.next_frame().await {
                Some(Frame::Pong { seq: got, .. }) if got == seq => break,
                Some(Frame::Ping { .. } | Frame::Pong { .. }) => {}
                other => panic!("expected the PONG to {seq}, got {other:?}"),
            }
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_tls_client_detects_a_silent_server() {
    let pki = pki();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cert = rustls::pki_types::CertificateDer::pem_slice_iter(pki.server_cert.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(pki.server_key.as_bytes()).unwrap();
    let cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(cert, key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    // A TLS "server" that welcomes and then never says anything again, its socket held open.
    let fake = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        // No Nagle: the WELCOME must not wait behind the unacknowledged session tickets while the paused clock
        // jumps ahead.
        tcp.set_nodelay(true).unwrap();
        let mut p = RawPeer::from_stream(acceptor.accept(tcp).await.unwrap());
        assert!(matches!(p.next_frame().await, Some(Frame::Hello(_))));
        p.send(&Frame::Welcome(support::v1_welcome("fake"))).await;
        tokio::time::sleep(Duration::from_secs(3600)).await;
        drop(p);
    });
    let mut c = Client::connect(addr, tls_client("a", &pki)).await.unwrap();
    let d = next_disconnect(&mut c).await;
    assert_eq!(d.reason, CloseReason::HeartbeatTimeout);
    assert_eq!(d.lateness, Some(Duration::ZERO));
    fake.abort();
}

#[tokio::test(start_paused = true)]
async fn a_plaintext_client_on_a_tls_port_fails_cleanly_and_others_are_unaffected() {
    let pki = pki();
    let mut s = TestServer::start(tls_server_config(&pki, false)).await;
    let mut good = Client::connect(s.addr, tls_client("good", &pki)).await.unwrap();
    s.wait(|k| matches!(k, EventKind::Online { client, .. } if client == "good")).await;

    let mut plain = ClientConfig::new("plain");
    plain.heartbeat_interval = Some(Duration::from_secs(1));
    let d = refused(Client::connect(s.addr, plain).await);
    assert_eq!(d.reason, CloseReason::ProtocolError);
    let detail = d.detail.unwrap();
    assert!(detail.ends_with("the server speaks TLS; connect with TLS"), "{detail}");
    let (reason, detail) = closed_reason(&s.wait(|k| closed_reason(k).is_some()).await).unwrap();
    assert_eq!(reason, CloseReason::TlsError);
    assert!(detail.unwrap().starts_with("tls: "));

    good.send(Some("good"), Bytes::from_static(b"still here")).await.unwrap();
    assert_eq!(&support::next_data(&mut good).await[..], b"still here");
    assert!(s.drain().iter().all(|k| offline_reason(k, "good").is_none()));
}

/// A peer that trickles one large handshake message a byte per record cannot make the server keep its records:
/// past the largest message and one record, the connection ends with `tls_error`.
#[tokio::test(start_paused = true)]
async fn a_handshake_message_trickled_a_byte_per_record_is_refused_past_its_bound() {
    use tokio::io::AsyncWriteExt;
    let pki = pki();
    let mut s = TestServer::start(tls_server_config(&pki, false)).await;
    let mut tcp = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    // A ClientHello announcing 0xffff bytes, each byte in a record of its own (5 bytes of header, 1 of payload):
    // 120,000 bytes on the wire for 20,000 bytes of the message.
    let record = |b: u8| [22u8, 3, 1, 0, 1, b];
    let bytes: Vec<u8> =
        [1u8, 0, 0xff, 0xff].into_iter().chain(std::iter::repeat_n(0, 20_000)).flat_map(record).collect();
    // The server may close before it has read everything.
    let _ = tcp.write_all(&bytes).await;
    let (reason, detail) = closed_reason(&s.wait(|k| closed_reason(k).is_some()).await).unwrap();
    assert_eq!(reason, CloseReason::TlsError);
    let detail = detail.unwrap();
    assert!(detail.starts_with("tls: more than") && detail.ends_with("without a complete message"), "{detail}");
}

/// A drain reaches a connection still in its TLS handshake (accepted, not one byte of TLS yet): its `BYE` waits for
/// the handshake, then comes inside TLS, naming the drain's redirect, and the session ends with close_notify.
#[tokio::test(start_paused = true)]
async fn a_drain_reaching_a_connection_in_its_tls_handshake_says_bye_after_the_handshake() {
    let pki = pki();
    let s = TestServer::start(tls_server_config(&pki, false)).await;
    let tcp = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    // Accepted and handed to its event loop: the server counts its handshake.
    let mut turns = 0;
    while s.handle.stats().handshakes == 0 {
        assert!(turns < 10_000, "the server never took the connection");
        turns += 1;
        tokio::task::yield_now().await;
    }
    let status = s.handle.drain(Some("127.0.0.1:7001".into()), Duration::ZERO).unwrap();
    assert_eq!(status.total, 1, "the drain's list holds the connection in its handshake");
    // The drain has asked it to leave; its loop has taken the request (it is woken by it and runs before this
    // task is polled again) while the handshake has not begun.
    turns = 0;
    while s.handle.drain_status().sent == 0 {
        assert!(turns < 10_000, "the drain never reached the connection");
        turns += 1;
        tokio::task::yield_now().await;
    }
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tls = raw_connector(&pki).connect(name, tcp).await.expect("the handshake completes");
    let mut peer = RawPeer::from_stream(tls);
    let Some(Frame::Bye(bye)) = peer.next_frame().await else { panic!("no BYE after the handshake") };
    assert_eq!((bye.reason, bye.alternative.as_str()), (CloseReason::ServerShutdown, "127.0.0.1:7001"));
    assert!(peer.next_frame().await.is_none(), "the session ends after its BYE");
}

#[tokio::test(start_paused = true)]
async fn a_tls_client_on_a_plaintext_port_fails_cleanly() {
    let pki = pki();
    let mut s = TestServer::start(test_config()).await;
    let d = refused(Client::connect(s.addr, tls_client("a", &pki)).await);
    assert_eq!(d.reason, CloseReason::TlsError);
    let mine = d.detail.unwrap();
    assert!(mine.ends_with(&format!("hint: {}", tether::tls::NOT_TLS)), "the client is told why: {mine}");
    let (reason, detail) = closed_reason(&s.wait(|k| closed_reason(k).is_some()).await).unwrap();
    assert_eq!(reason, CloseReason::ProtocolError);
    let detail = detail.unwrap();
    assert!(detail.ends_with("a TLS handshake arrived on a plaintext port"), "{detail}");
}

#[tokio::test(start_paused = true)]
async fn an_untrusted_or_misnamed_server_certificate_is_refused() {
    let pki = pki();
    let mut s = TestServer::start(tls_server_config(&pki, false)).await;
    // A client that trusts another CA.
    let other = DevPki::generate(&["localhost"], "x").unwrap();
    let d = refused(Client::connect(s.addr, tls_client("a", &other)).await);
    assert_eq!((d.reason, d.by_peer), (CloseReason::TlsError, false));
    let detail = d.detail.unwrap();
    assert!(detail.starts_with("tls: invalid peer certificate: UnknownIssuer"), "{detail}");
    // The right CA, but a name the certificate does not carry.
    let mut cfg = tls_client("a", &pki);
    cfg.tls = Some(cfg.tls.take().unwrap().with_server_name("example.com").unwrap());
    let d = refused(Client::connect(s.addr, cfg).await);
    assert_eq!(d.reason, CloseReason::TlsError);
    let detail = d.detail.unwrap();
    assert!(detail.contains("not valid for name"), "{detail}");
    // The server saw two failed handshakes: the alerts the client sent.
    for _ in 0..2 {
        let (reason, _) = closed_reason(&s.wait(|k| closed_reason(k).is_some()).await).unwrap();
        assert_eq!(reason, CloseReason::TlsError);
    }
    // And a name the certificate carries works.
    let mut cfg = tls_client("a", &pki);
    cfg.tls = Some(cfg.tls.take().unwrap().with_server_name("localhost").unwrap());
    Client::connect(s.addr, cfg).await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn client_certificates_are_required_when_the_server_names_a_client_ca() {
    let pki = pki();
    let mut s = TestServer::start(tls_server_config(&pki, true)).await;
    // No certificate: the server refuses the handshake and says so with an alert.
    let d = refused(Client::connect(s.addr, tls_client("a", &pki)).await);
    assert_eq!(d.reason, CloseReason::TlsError);
    let (reason, detail) = closed_reason(&s.wait(|k| closed_reason(k).is_some()).await).unwrap();
    assert_eq!(reason, CloseReason::TlsError);
    assert!(detail.unwrap().contains("certificate"));
    // A certificate from another CA: refused too.
    let other = DevPki::generate(&["localhost"], "x").unwrap();
    let mut cfg = tls_client("a", &pki);
    let roots = TrustRoots::Pem(pki.ca_cert.as_bytes());
    let foreign = Some((other.client_cert.as_bytes(), other.client_key.as_bytes()));
    cfg.tls = Some(ClientTls::new(roots, foreign).unwrap());
    assert_eq!(refused(Client::connect(s.addr, cfg).await).reason, CloseReason::TlsError);
    // The CA's own client certificate: admitted, and the session works.
    let mut cfg = tls_client("a", &pki);
    let own = Some((pki.client_cert.as_bytes(), pki.client_key.as_bytes()));
    cfg.tls = Some(ClientTls::new(roots, own).unwrap());
    let mut a = Client::connect(s.addr, cfg).await.unwrap();
    a.send(Some("a"), Bytes::from_static(b"mtls")).await.unwrap();
    assert_eq!(&support::next_data(&mut a).await[..], b"mtls");
}

#[tokio::test(start_paused = true)]
async fn a_busy_refusal_over_tls_still_carries_its_retry_hint() {
    let pki = pki();
    let mut cfg = tls_server_config(&pki, false);
    cfg.max_connections = 1;
    cfg.busy_retry_after = Duration::from_secs(7);
    cfg.busy_retry_spread = Duration::ZERO;
    let s = TestServer::start(cfg).await;
    let _a = Client::connect(s.addr, tls_client("a", &pki)).await.unwrap();
    let d = refused(Client::connect(s.addr, tls_client("b", &pki)).await);
    assert_eq!((d.reason, d.retry_after), (CloseReason::Busy, Some(Duration::from_secs(7))));
}

#[tokio::test(start_paused = true)]
async fn a_silent_tls_handshake_times_out() {
    let pki = pki();
    let mut s = TestServer::start(tls_server_config(&pki, false)).await;
    // TCP connected, then not one byte of TLS: the handshake timeout (5 s) covers TLS and HELLO together.
    let p = RawPeer::connect(s.addr).await;
    let t0 = tokio::time::Instant::now();
    let (reason, _) = closed_reason(&s.wait(|k| closed_reason(k).is_some()).await).unwrap();
    assert_eq!(reason, CloseReason::HandshakeTimeout);
    assert_eq!(t0.elapsed(), Duration::from_secs(5));
    drop(p);
}

#[tokio::test(start_paused = true)]
async fn a_self_signed_ca_certificate_given_as_the_ca_file_is_pinned() {
    // openssl's default self-signed certificate: CA:TRUE, used as the server's own and as the client's CA file.
    let (cert, key) = self_signed_ca(&["localhost", "127.0.0.1"]);
    let mut s = TestServer::start(server_with(&cert, &key)).await;
    let mut a = Client::connect(s.addr, client_trusting("a", &cert)).await.unwrap();
    s.wait(|k| matches!(k, EventKind::Online { client, .. } if client == "a")).await;
    a.send(Some("a"), Bytes::from_static(b"pinned")).await.unwrap();
    assert_eq!(&support::next_data(&mut a).await[..], b"pinned");
    support::close_cleanly(&mut s, &mut a, "a").await;
}

#[tokio::test(start_paused = true)]
async fn another_self_signed_ca_certificate_is_not_a_pin_for_this_one() {
    // Same subject and names, another key: only the exact certificate is pinned.
    let (cert, key) = self_signed_ca(&["localhost", "127.0.0.1"]);
    let (other, _) = self_signed_ca(&["localhost", "127.0.0.1"]);
    let mut s = TestServer::start(server_with(&cert, &key)).await;
    let detail = refused_by_client(&mut s, client_trusting("a", &other)).await;
    assert!(detail.starts_with("tls: invalid peer certificate: ") && detail.contains("CaUsedAsEndEntity"), "{detail}");
    // A CA file holding both certificates pins the right one.
    let both = format!("{other}{cert}");
    let mut a = Client::connect(s.addr, client_trusting("a", &both)).await.unwrap();
    support::close_cleanly(&mut s, &mut a, "a").await;
}

#[tokio::test(start_paused = true)]
async fn a_pinned_certificate_must_name_the_server() {
    let (cert, key) = self_signed_ca(&["otherhost"]);
    let mut s = TestServer::start(server_with(&cert, &key)).await;
    // The default name is the address connected to, 127.0.0.1, which the certificate does not carry.
    let detail = refused_by_client(&mut s, client_trusting("a", &cert)).await;
    assert!(
        detail.starts_with("tls: invalid peer certificate: certificate not valid for name \"127.0.0.1\""),
        "{detail}"
    );
    // The name it does carry is accepted.
    let mut cfg = client_trusting("a", &cert);
    cfg.tls = Some(cfg.tls.take().unwrap().with_server_name("otherhost").unwrap());
    let mut a = Client::connect(s.addr, cfg).await.unwrap();
    support::close_cleanly(&mut s, &mut a, "a").await;
}

#[tokio::test(start_paused = true)]
async fn a_pinned_certificate_must_be_current_and_meant_for_a_server() {
    let (cert, key) = self_signed_ca_with(&["127.0.0.1"], |p| p.not_after = rcgen::date_time_ymd(2001, 1, 1));
    let mut s = TestServer::start(server_with(&cert, &key)).await;
    let detail = refused_by_client(&mut s, client_trusting("a", &cert)).await;
    assert!(detail.starts_with("tls: invalid peer certificate: certificate expired"), "{detail}");
    drop(s);

    let (cert, key) = self_signed_ca_with(&["127.0.0.1"], |p| p.not_before = rcgen::date_time_ymd(2999, 1, 1));
    let mut s = TestServer::start(server_with(&cert, &key)).await;
    let detail = refused_by_client(&mut s, client_trusting("a", &cert)).await;
    assert!(detail.starts_with("tls: invalid peer certificate: certificate not valid yet"), "{detail}");
    drop(s);

    let client_only = |p: &mut rcgen::CertificateParams| {
        p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    };
    let (cert, key) = self_signed_ca_with(&["127.0.0.1"], client_only);
    let mut s = TestServer::start(server_with(&cert, &key)).await;
    let detail = refused_by_client(&mut s, client_trusting("a", &cert)).await;
    assert!(detail.starts_with("tls: invalid peer certificate: InvalidPurpose"), "{detail}");
}

/// Serves a fixed certificate chain with a key of the test's choosing, matching or not.
#[derive(Debug)]
struct FixedCert(Arc<rustls::sign::CertifiedKey>);

impl rustls::server::ResolvesServerCert for FixedCert {
    fn resolve(&self, _: rustls::server::ClientHello<'_>) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }
}

#[tokio::test(start_paused = true)]
async fn a_server_presenting_a_pinned_certificate_without_its_key_is_refused() {
    let (cert, _) = self_signed_ca(&["localhost", "127.0.0.1"]);
    let (_, wrong_key) = self_signed_ca(&["localhost", "127.0.0.1"]);
    let chain = vec![rustls::pki_types::CertificateDer::from_pem_slice(cert.as_bytes()).unwrap()];
    let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(wrong_key.as_bytes()).unwrap();
    let signer = rustls::crypto::ring::sign::any_supported_type(&key).unwrap();
    let resolver = Arc::new(FixedCert(Arc::new(rustls::sign::CertifiedKey::new(chain, signer))));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    // An impostor: it copied the pinned certificate but signs the handshake with another key.
    let impostor = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        acceptor.accept(tcp).await.map(drop)
    });
    let d = refused(Client::connect(addr, client_trusting("a", &cert)).await);
    assert_eq!((d.reason, d.by_peer), (CloseReason::TlsError, false));
    let detail = d.detail.unwrap();
    assert_eq!(detail, "tls: invalid peer certificate: BadSignature");
    assert!(impostor.await.unwrap().is_err(), "the impostor's handshake succeeded");
}
