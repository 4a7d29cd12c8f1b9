//! A raw HBONE client for tests: speaks to an agent's 15008 exactly as a peer could, including
//! what a well-behaved agent never sends (forged `Forwarded`, reserved ports, garbage), and
//! says which refusal it met.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::Empty;
use hyper_util::rt::{TokioExecutor, TokioIo};
use meshlet::{
    identity::{self, Ca, Identity},
    sys::{Netns, socket},
};
use tokio::net::{TcpSocket, TcpStream};

use crate::Cluster;

/// Connects to `peer` from a marked socket made in `netns` (like the proxy's sockets: capture
/// leaves it alone).
pub async fn connect_in(netns: &Arc<Netns>, peer: SocketAddr) -> std::io::Result<TcpStream> {
    let keepalive = meshlet::proxy::Limits::default().tcp_keepalive;
    let socket = socket::marked_socket_in(netns, peer.is_ipv6(), keepalive).await?;
    socket.set_nonblocking(true)?;
    TcpSocket::from_std_stream(socket.into())
        .connect(peer)
        .await
}

/// How a TLS handshake (or the first request after it: with TLS 1.3 the client finishes
/// before the server has checked its certificate) was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The peer sent this TLS alert (rustls's name for it, e.g. `CertificateRequired`).
    Alert(String),
    /// The connection was reset.
    Reset,
    /// The connection was closed without an alert.
    Closed,
    /// Something else, with the error text.
    Other(String),
}

/// A raw HBONE client dialling from a network namespace with certificates of the cluster's CA.
#[derive(Debug)]
pub struct RawHbone {
    /// Where it dials from.
    pub netns: Arc<Netns>,
    /// The mesh roots.
    pub roots: Arc<rustls::RootCertStore>,
    /// The cluster's CA.
    pub ca: Ca,
}

impl RawHbone {
    /// A client in `netns`, with the cluster's CA.
    pub fn new(cluster: &Cluster, netns: Netns) -> Self {
        let ca =
            Ca::load_or_generate(&cluster.state_dir(), identity::DEFAULT_TRUST_DOMAIN).unwrap();
        Self {
            netns: Arc::new(netns),
            roots: ca.roots(),
            ca,
        }
    }

    /// A client config with a certificate for `as_identity`, expecting the server to be
    /// `expect`.
    pub fn config(&self, as_identity: &str, expect: &str) -> Arc<rustls::ClientConfig> {
        let certified = self
            .ca
            .issue(
                &Identity::parse(as_identity).unwrap(),
                std::time::SystemTime::now(),
                Duration::from_secs(3600),
            )
            .unwrap();
        identity::client_config(
            &certified,
            Identity::parse(expect).unwrap(),
            self.roots.clone(),
        )
        .unwrap()
    }

    /// A client config that presents no certificate (and takes any server's): what an
    /// outsider would try.
    pub fn config_without_certificate(&self) -> Arc<rustls::ClientConfig> {
        let mut config = rustls::ClientConfig::builder_with_provider(identity::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyServer))
            .with_no_client_auth();
        config.alpn_protocols = vec![b"h2".to_vec()];
        Arc::new(config)
    }

    /// TLS to `peer` with `config`.
    pub async fn tls(
        &self,
        peer: SocketAddr,
        config: Arc<rustls::ClientConfig>,
    ) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let tcp = connect_in(&self.netns, peer).await?;
        tokio_rustls::TlsConnector::from(config)
            .connect(
                rustls::pki_types::ServerName::IpAddress(peer.ip().into()),
                tcp,
            )
            .await
    }

    /// CONNECTs to `authority` (any text) over one new connection; returns the status.
    pub async fn connect(
        &self,
        peer: SocketAddr,
        config: Arc<rustls::ClientConfig>,
        authority: &str,
    ) -> StatusCode {
        self.connect_with(peer, config, authority, &[]).await
    }

    /// [`RawHbone::connect`] with extra request headers.
    pub async fn connect_with(
        &self,
        peer: SocketAddr,
        config: Arc<rustls::ClientConfig>,
        authority: &str,
        headers: &[(&str, &str)],
    ) -> StatusCode {
        let tls = self.tls(peer, config).await.expect("TLS");
        let (mut sender, connection) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                .await
                .expect("h2");
        tokio::spawn(connection);
        let mut request = Request::builder().method(Method::CONNECT).uri(authority);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        sender
            .send_request(request.body(Empty::<Bytes>::new()).unwrap())
            .await
            .expect("response")
            .status()
    }

    /// Tries a handshake with `config` and reads the server's first bytes before sending any
    /// (so a refusal cannot be lost to a reset): `Ok` when the server took the client (it
    /// sent its HTTP/2 settings), else how it refused. With TLS 1.3 the client's handshake
    /// finishes before the server has checked the client's certificate, so a refusal shows
    /// on this first read.
    pub async fn try_handshake(
        &self,
        peer: SocketAddr,
        config: Arc<rustls::ClientConfig>,
    ) -> Result<(), Refusal> {
        use tokio::io::AsyncReadExt as _;
        let mut tls = self.tls(peer, config).await.map_err(|e| refusal(&e))?;
        let mut first = [0u8; 1];
        match tokio::time::timeout(Duration::from_secs(10), tls.read(&mut first)).await {
            Ok(Ok(0)) => Err(Refusal::Closed),
            Ok(Ok(_)) => Ok(()),
            Ok(Err(err)) => Err(refusal(&err)),
            Err(_) => Err(Refusal::Other("the server said nothing for 10 s".into())),
        }
    }
}

/// A CONNECT tunnel held open, with every byte the server sent on its connection kept (to read
/// its HTTP/2 frames: [`frame_types`]).
#[derive(Debug)]
pub struct HeldTunnel {
    /// The tunnel's bytes.
    pub io: TokioIo<hyper::upgrade::Upgraded>,
    /// What the server sent on the connection, decrypted.
    pub received: Arc<std::sync::Mutex<Vec<u8>>>,
    /// Ends when the connection does.
    pub connection: tokio::task::JoinHandle<Result<(), hyper::Error>>,
}

impl RawHbone {
    /// CONNECTs to `authority` over a new connection to `peer` and holds the tunnel; panics
    /// unless the server answers 200.
    pub async fn tunnel(
        &self,
        peer: SocketAddr,
        config: Arc<rustls::ClientConfig>,
        authority: &str,
    ) -> HeldTunnel {
        let tls = self.tls(peer, config).await.expect("TLS");
        let received = Arc::new(std::sync::Mutex::new(Vec::new()));
        let tap = Tap {
            inner: tls,
            received: received.clone(),
        };
        let (mut sender, connection) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tap))
                .await
                .expect("h2");
        let connection = tokio::spawn(connection);
        let response = sender
            .send_request(
                Request::builder()
                    .method(Method::CONNECT)
                    .uri(authority)
                    .body(Empty::<Bytes>::new())
                    .unwrap(),
            )
            .await
            .expect("response");
        assert_eq!(response.status(), StatusCode::OK, "CONNECT {authority}");
        let upgraded = hyper::upgrade::on(response).await.expect("upgrade");
        HeldTunnel {
            io: TokioIo::new(upgraded),
            received,
            connection,
        }
    }
}

/// The types of the HTTP/2 frames in `bytes`, what a server sent from the start of a
/// connection (`0x7` is GOAWAY).
pub fn frame_types(bytes: &[u8]) -> Vec<u8> {
    let mut types = Vec::new();
    let mut at = 0;
    while bytes.len() >= at + 9 {
        let length = (usize::from(bytes[at]) << 16)
            | (usize::from(bytes[at + 1]) << 8)
            | usize::from(bytes[at + 2]);
        types.push(bytes[at + 3]);
        at += 9 + length;
    }
    types
}

/// A stream that keeps a copy of everything read through it.
struct Tap<T> {
    inner: T,
    received: Arc<std::sync::Mutex<Vec<u8>>>,
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Tap<T> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        if let std::task::Poll::Ready(Ok(())) = polled {
            let new = buf.filled()[before..].to_vec();
            self.received.lock().unwrap().extend_from_slice(&new);
        }
        polled
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Tap<T> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Classifies an error by its cause chain: a TLS alert, a reset, a close.
pub fn refusal(err: &(dyn std::error::Error + 'static)) -> Refusal {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(err);
    let mut text = String::new();
    while let Some(current) = cause {
        if let Some(tls) = current.downcast_ref::<rustls::Error>()
            && let rustls::Error::AlertReceived(alert) = tls
        {
            return Refusal::Alert(format!("{alert:?}"));
        }
        if let Some(io) = current.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::ConnectionReset {
                return Refusal::Reset;
            }
            if let Some(inner) = io.get_ref()
                && let Some(rustls::Error::AlertReceived(alert)) =
                    inner.downcast_ref::<rustls::Error>()
            {
                return Refusal::Alert(format!("{alert:?}"));
            }
            if matches!(
                io.kind(),
                std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::BrokenPipe
            ) {
                return Refusal::Closed;
            }
        }
        text = current.to_string();
        // rustls's alert inside an error type that does not expose it as a source.
        if let Some(alert) = text.strip_prefix("received fatal alert: ") {
            return Refusal::Alert(alert.to_owned());
        }
        cause = current.source();
    }
    Refusal::Other(text)
}

/// Takes any server certificate (the outsider's client does not care who answers).
#[derive(Debug)]
struct AnyServer;

impl rustls::client::danger::ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &identity::provider().signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &identity::provider().signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        identity::provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}
