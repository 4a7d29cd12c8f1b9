//! HBONE, wire-compatible with Istio's ztunnel: one HTTP/2 `CONNECT` stream per TCP
//! connection, over mutual TLS 1.3 (ALPN `h2`, SPIFFE identities) to the destination pod's
//! port 15008. `:authority` is the original destination `ip:port`; `Forwarded:
//! for="<src-ip>:<src-port>"` names the client. Responses: 200 ok, 400 bad request, 401
//! denied, 503 upstream failure.
//!
//! [`Pool`] is the client: connections pooled per (source identity, destination identity,
//! destination IP), at most [`MAX_STREAMS`] streams each, closed after [`IDLE_TIMEOUT`] idle,
//! with HTTP/2 keepalive pings. [`serve`] is the server side of one in-pod 15008 listener.

use std::{
    collections::HashMap,
    future::Future,
    io,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Empty;
use hyper::{client::conn::http2::SendRequest, upgrade::Upgraded};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use meshlet_common::INBOUND_HBONE_PORT;
use rustls::pki_types::ServerName;
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, warn};

use crate::{
    identity::{self, Identity},
    sys::Netns,
};

/// Streams per pooled connection before another connection is opened.
pub const MAX_STREAMS: usize = 100;
/// A pooled connection with no stream for this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// Interval of HTTP/2 keepalive pings.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// HTTP/2 flow-control windows: the default 64 KiB would cap a stream at one window per round
/// trip.
const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;

/// A TLS or HTTP/2 handshake that takes longer than this is abandoned.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why an HBONE tunnel could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// TCP to the peer's 15008 failed.
    #[error("connect to {peer}: {source} (is a NetworkPolicy blocking port 15008?)")]
    Connect {
        /// The peer's HBONE address.
        peer: SocketAddr,
        /// The underlying error.
        source: io::Error,
    },
    /// The TLS handshake failed (wrong identity, untrusted root, ...).
    #[error("TLS with {peer}: {source}")]
    Tls {
        /// The peer's HBONE address.
        peer: SocketAddr,
        /// The underlying error.
        source: io::Error,
    },
    /// The handshake did not finish in time.
    #[error("handshake with {peer} timed out after {HANDSHAKE_TIMEOUT:?}")]
    Timeout {
        /// The peer's HBONE address.
        peer: SocketAddr,
    },
    /// HTTP/2 failed.
    #[error("HTTP/2 with {peer}: {source}")]
    Http {
        /// The peer's HBONE address.
        peer: SocketAddr,
        /// The underlying error.
        source: hyper::Error,
    },
    /// The peer answered the CONNECT with an error status.
    #[error("{peer} refused CONNECT {authority}: {status}")]
    Refused {
        /// The peer's HBONE address.
        peer: SocketAddr,
        /// What was asked for.
        authority: SocketAddr,
        /// Its answer.
        status: StatusCode,
    },
    /// No certificate for the source identity.
    #[error(transparent)]
    Identity(#[from] identity::Error),
}

/// Identifies a pool of connections.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    /// The client workload's identity (its certificate).
    pub source: Identity,
    /// The identity the server must present.
    pub destination: Identity,
    /// The destination pod's address.
    pub destination_ip: IpAddr,
}

#[derive(Debug)]
struct Pooled {
    sender: SendRequest<Empty<Bytes>>,
    streams: Arc<AtomicUsize>,
    last_used: Instant,
}

/// An open HBONE stream: bytes to and from the destination, and the stream's slot in its
/// pooled connection (released on drop).
#[derive(Debug)]
pub struct Tunnel {
    /// The byte stream.
    pub io: TokioIo<Upgraded>,
    _slot: Slot,
}

#[derive(Debug)]
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The HBONE client: pooled mTLS HTTP/2 connections.
#[derive(Debug, Default)]
pub struct Pool {
    connections: Mutex<HashMap<PoolKey, Vec<Pooled>>>,
}

impl Pool {
    /// An empty pool.
    pub fn new() -> Self {
        Self::default()
    }

    /// Opens a CONNECT stream to `authority` through the pod at `key.destination_ip`, reusing a
    /// pooled connection with room, or dialing one from `netns` (the source pod's namespace)
    /// with `tls` (the source's certificate, expecting `key.destination`).
    pub async fn connect<F, Fut>(
        &self,
        key: &PoolKey,
        authority: SocketAddr,
        forwarded_for: SocketAddr,
        dial: F,
    ) -> Result<Tunnel, Error>
    where
        F: FnOnce(SocketAddr) -> Fut,
        Fut: Future<Output = Result<(TcpStream, Arc<rustls::ClientConfig>), Error>>,
    {
        let peer = SocketAddr::new(key.destination_ip, INBOUND_HBONE_PORT);
        let (mut sender, streams) = match self.checkout(key) {
            Some(found) => found,
            None => {
                let (tcp, tls) = dial(peer).await?;
                let sender = handshake(peer, tcp, tls).await?;
                let streams = Arc::new(AtomicUsize::new(1));
                let mut connections = self.connections.lock().unwrap_or_else(|p| p.into_inner());
                connections.entry(key.clone()).or_default().push(Pooled {
                    sender: sender.clone(),
                    streams: streams.clone(),
                    last_used: Instant::now(),
                });
                (sender, streams)
            }
        };
        let slot = Slot(streams);
        sender
            .ready()
            .await
            .map_err(|source| Error::Http { peer, source })?;
        let request = Request::builder()
            .method(Method::CONNECT)
            .uri(authority.to_string())
            .header("forwarded", format!("for=\"{forwarded_for}\""))
            .body(Empty::new())
            .expect("a CONNECT request from valid parts");
        let response = sender
            .send_request(request)
            .await
            .map_err(|source| Error::Http { peer, source })?;
        if response.status() != StatusCode::OK {
            return Err(Error::Refused {
                peer,
                authority,
                status: response.status(),
            });
        }
        let upgraded = hyper::upgrade::on(response)
            .await
            .map_err(|source| Error::Http { peer, source })?;
        Ok(Tunnel {
            io: TokioIo::new(upgraded),
            _slot: slot,
        })
    }

    /// A live pooled connection for `key` with room for one more stream (taking it).
    fn checkout(&self, key: &PoolKey) -> Option<(SendRequest<Empty<Bytes>>, Arc<AtomicUsize>)> {
        let mut connections = self.connections.lock().unwrap_or_else(|p| p.into_inner());
        let pooled = connections.get_mut(key)?;
        pooled.retain(|p| !p.sender.is_closed());
        let found = pooled
            .iter_mut()
            .find(|p| p.streams.load(Ordering::Acquire) < MAX_STREAMS)?;
        found.streams.fetch_add(1, Ordering::AcqRel);
        found.last_used = Instant::now();
        Some((found.sender.clone(), found.streams.clone()))
    }

    /// Closes connections idle for [`IDLE_TIMEOUT`] and forgets closed ones; returns how many
    /// remain. Run it periodically ([`Pool::run_reaper`]).
    pub fn reap(&self, now: Instant) -> usize {
        let mut connections = self.connections.lock().unwrap_or_else(|p| p.into_inner());
        for pooled in connections.values_mut() {
            pooled.retain(|p| {
                !p.sender.is_closed()
                    && (p.streams.load(Ordering::Acquire) > 0
                        || now.duration_since(p.last_used) < IDLE_TIMEOUT)
            });
        }
        connections.retain(|_, pooled| !pooled.is_empty());
        connections.values().map(Vec::len).sum()
    }

    /// Reaps every 10 s until the task is dropped.
    pub async fn run_reaper(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_secs(10));
        loop {
            tick.tick().await;
            self.reap(Instant::now());
        }
    }
}

async fn handshake(
    peer: SocketAddr,
    tcp: TcpStream,
    tls: Arc<rustls::ClientConfig>,
) -> Result<SendRequest<Empty<Bytes>>, Error> {
    let connecting = async {
        // No SNI is sent (the config disables it); rustls still wants a name.
        let stream = tokio_rustls::TlsConnector::from(tls)
            .connect(ServerName::IpAddress(peer.ip().into()), tcp)
            .await
            .map_err(|source| Error::Tls { peer, source })?;
        let (sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(1 << 20)
            .keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(Duration::from_secs(10))
            .keep_alive_while_idle(true)
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|source| Error::Http { peer, source })?;
        tokio::spawn(async move {
            if let Err(err) = connection.await {
                debug!(%peer, %err, "HBONE connection ended");
            }
        });
        Ok(sender)
    };
    tokio::time::timeout(HANDSHAKE_TIMEOUT, connecting)
        .await
        .map_err(|_| Error::Timeout { peer })?
}

/// What the server decided for one CONNECT.
#[derive(Debug)]
pub enum Admission {
    /// Carry it: the application's stream, and the registration that closes it if a policy
    /// change comes to deny it.
    Upstream(Box<Upstream>),
    /// Answer with this status (400, 401, 503) and close the stream.
    Reject(StatusCode, String),
}

/// An admitted CONNECT's application stream, the registration that closes it if a policy
/// change comes to deny it, and its metrics.
#[derive(Debug)]
pub struct Upstream {
    /// The application's stream.
    pub stream: TcpStream,
    /// Closes the connection when a re-check denies it.
    pub live: super::connections::Live,
    /// Where to count it, and as what.
    pub metrics: (
        Arc<crate::metrics::Metrics>,
        crate::metrics::ConnectionLabels,
    ),
}

/// A CONNECT the server received.
#[derive(Debug, Clone)]
pub struct Connect {
    /// The client's verified identity.
    pub peer_identity: Identity,
    /// The TCP peer (the client pod, or its node).
    pub peer: SocketAddr,
    /// `:authority`, parsed.
    pub authority: SocketAddr,
    /// The `Forwarded: for=` address, if given and well formed.
    pub forwarded_for: Option<SocketAddr>,
}

/// Serves one in-pod 15008 listener: TLS with `tls` (the pod's certificate, client
/// certificates required), HTTP/2 with at most [`MAX_STREAMS`] concurrent streams, and for each
/// well-formed CONNECT, `admit` decides and opens the upstream. Runs until the task is dropped;
/// streams already admitted carry on.
pub async fn serve<A, Fut>(listener: TcpListener, tls: Arc<rustls::ServerConfig>, admit: A)
where
    A: Fn(Connect) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Admission> + Send + 'static,
{
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(err) => {
                warn!(%err, "accept on 15008 failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let admit = admit.clone();
        tokio::spawn(async move {
            let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(stream)) => stream,
                Ok(Err(err)) => {
                    debug!(%peer, %err, "HBONE TLS handshake refused");
                    return;
                }
                Err(_) => {
                    debug!(%peer, "HBONE TLS handshake timed out");
                    return;
                }
            };
            let identity = match stream
                .get_ref()
                .1
                .peer_certificates()
                .map(identity::peer_identity)
            {
                Some(Ok(identity)) => identity,
                other => {
                    debug!(%peer, ?other, "HBONE peer without a usable identity");
                    return;
                }
            };
            let service = hyper::service::service_fn(move |request| {
                let admit = admit.clone();
                let identity = identity.clone();
                async move {
                    Ok::<_, std::convert::Infallible>(handle(request, identity, peer, admit).await)
                }
            });
            let served = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .initial_stream_window_size(STREAM_WINDOW)
                .initial_connection_window_size(CONNECTION_WINDOW)
                .max_frame_size(1 << 20)
                .max_concurrent_streams(MAX_STREAMS as u32)
                .keep_alive_interval(KEEPALIVE_INTERVAL)
                .serve_connection(TokioIo::new(stream), service)
                .await;
            if let Err(err) = served {
                debug!(%peer, %err, "HBONE connection ended");
            }
        });
    }
}

async fn handle<A, Fut>(
    request: Request<hyper::body::Incoming>,
    peer_identity: Identity,
    peer: SocketAddr,
    admit: A,
) -> Response<Empty<Bytes>>
where
    A: Fn(Connect) -> Fut,
    Fut: Future<Output = Admission>,
{
    let reply = |status: StatusCode| {
        Response::builder()
            .status(status)
            .body(Empty::new())
            .expect("a response from valid parts")
    };
    if request.method() != Method::CONNECT {
        return reply(StatusCode::BAD_REQUEST);
    }
    let Some(authority) = request
        .uri()
        .authority()
        .and_then(|a| a.as_str().parse::<SocketAddr>().ok())
    else {
        debug!(%peer, uri = %request.uri(), "CONNECT without an ip:port authority");
        return reply(StatusCode::BAD_REQUEST);
    };
    if authority.port() == INBOUND_HBONE_PORT || authority.port() == 0 {
        return reply(StatusCode::BAD_REQUEST);
    }
    let forwarded_for = request
        .headers()
        .get("forwarded")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.split(';')
                .find_map(|part| part.trim().strip_prefix("for="))
        })
        .and_then(|v| v.trim_matches('"').parse().ok());
    let connect = Connect {
        peer_identity,
        peer,
        authority,
        forwarded_for,
    };
    match admit(connect).await {
        Admission::Reject(status, reason) => {
            debug!(%peer, %authority, %status, %reason, "CONNECT rejected");
            reply(status)
        }
        Admission::Upstream(admitted) => {
            let Upstream {
                stream: mut upstream,
                live,
                metrics,
            } = *admitted;
            tokio::spawn(async move {
                match hyper::upgrade::on(request).await {
                    Ok(upgraded) => {
                        let counters = metrics.0.open(&metrics.1);
                        let _closed = CloseOnDrop(metrics.0, metrics.1);
                        let mut tunnel =
                            crate::metrics::Counted::new(TokioIo::new(upgraded), counters);
                        let mut live = live;
                        tokio::select! {
                            _ = super::copy(&mut tunnel, &mut upstream) => {}
                            reason = live.closed() => debug!(%peer, %reason, "live connection closed by a policy change"),
                        }
                    }
                    Err(err) => debug!(%peer, %err, "CONNECT stream upgrade failed"),
                }
            });
            reply(StatusCode::OK)
        }
    }
}

/// Counts a connection closed when dropped (however its task ends).
struct CloseOnDrop(
    Arc<crate::metrics::Metrics>,
    crate::metrics::ConnectionLabels,
);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.0.close(&self.1);
    }
}

/// Dials `peer` from a marked socket in `netns` (the source pod's namespace).
pub async fn dial_in(netns: &Arc<Netns>, peer: SocketAddr) -> Result<TcpStream, Error> {
    super::passthrough::connect_in(netns, peer)
        .await
        .map_err(|source| Error::Connect { peer, source })
}
