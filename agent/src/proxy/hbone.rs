//! HBONE, wire-compatible with Istio's ztunnel: one HTTP/2 `CONNECT` stream per TCP
//! connection, over mutual TLS 1.3 (ALPN `h2`, SPIFFE identities) to the destination pod's
//! port 15008. `:authority` is the original destination `ip:port`; `Forwarded:
//! for="<src-ip>:<src-port>"` names the client — for the log only: the server never trusts
//! it, policy sees the tunnel's TCP peer, which is the source pod's own address because the
//! client dials from the source pod's namespace. Responses: 200 ok, 400 bad request, 401
//! denied, 503 upstream failure or limit.
//!
//! [`Pool`] is the client: connections pooled per (source pod, destination identity,
//! destination IP) — never shared between two pods, even of one service account — at most
//! [`MAX_STREAMS`] streams each, closed after [`IDLE_TIMEOUT`] idle (all but one per key after
//! [`SPARE_IDLE_TIMEOUT`]; every idle one at once when the node's budget is spent,
//! [`Pool::close_idle`]), with HTTP/2 keepalive pings. The client does not wait for the `200`
//! to send: what the application sends first (at
//! most [`EARLY_DATA`]) goes on the stream with the request, and the server holds it unread in
//! the stream's window until it has admitted the CONNECT and connected the application.
//! [`serve_connection`] is the server side of one accepted 15008 connection, and
//! [`parse_connect`] the validation of one request (pure, fuzzed). Both sides drive `h2`
//! directly, each stream a [`H2Stream`] for the one copy path (why not hyper's upgrades: see
//! [`super::h2io`]).

use std::{
    collections::HashMap,
    future::Future,
    io,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::{BufMut as _, Bytes, BytesMut};
use h2::{client::SendRequest, server::SendResponse};
use http::{Method, Request, Response, StatusCode};
use meshlet_common::INBOUND_HBONE_PORT;
use rustls::pki_types::ServerName;
use tokio::{
    io::{AsyncRead, AsyncReadExt as _},
    net::TcpStream,
};
use tracing::debug;

use super::h2io::{Clocked, H2Stream, ReadClock};
use crate::identity::{self, Identity};

/// Streams per pooled connection before another connection is opened.
pub const MAX_STREAMS: usize = 100;
/// A pooled connection with no stream for this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// An idle pooled connection that is not its key's last used one (a burst opened more than one)
/// is closed after this long.
pub const SPARE_IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the pool looks for idle connections to close: often enough that a burst's spare
/// connections close soon after [`SPARE_IDLE_TIMEOUT`] (at 10 s, a spare could live 20 s, and
/// the memory it held came back only after that), cheap as it only walks the pool.
pub const REAP_INTERVAL: Duration = Duration::from_secs(2);
/// How often at most a spent node budget has the pool look for idle connections to close
/// ([`Pool::close_idle`]): a flood the budget refuses does not walk the pool once per
/// connection.
pub const CLOSE_IDLE_INTERVAL: Duration = Duration::from_millis(100);
/// Interval of HTTP/2 keepalive pings.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// A keepalive ping not answered within this closes the connection.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);
/// Largest HTTP/2 frame this side accepts.
const MAX_FRAME: u32 = 1 << 20;
/// HTTP/2 flow-control windows: the default 64 KiB would cap a stream at one window per round
/// trip.
const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
/// Bytes a stream may queue in h2 ahead of the connection's writes: room for four of the copy
/// path's largest fills (h2's default, 400 KiB, holds one and a half, so a bulk stream's copy
/// task waited on the connection's task for each).
const SEND_BUFFER: usize = 1024 * 1024;

/// A TLS or HTTP/2 handshake that takes longer than this is abandoned.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Client bytes sent with a CONNECT ahead of its answer, at most: see [`Pool::connect`].
pub const EARLY_DATA: usize = 64 * 1024;
/// Bytes read from the client at once while the answer is awaited (one TLS record's worth).
const EARLY_READ: usize = 16 * 1024;

/// Why an HBONE tunnel could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A new connection would take a socket the node's budget does not have.
    #[error("no new connection to {peer}: the node's connection budget is spent")]
    Budget {
        /// The peer's HBONE address.
        peer: SocketAddr,
    },
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
        source: h2::Error,
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
    /// Reading the client's first bytes failed (it reset its connection) before the tunnel
    /// opened.
    #[error("reading the client before {peer} answered: {source}")]
    Client {
        /// The peer's HBONE address.
        peer: SocketAddr,
        /// The underlying error.
        source: io::Error,
    },
}

/// HTTP/2 limits of one HBONE peer connection (server side), each a flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Limits {
    /// Concurrent CONNECT streams per connection (`SETTINGS_MAX_CONCURRENT_STREAMS`).
    pub max_streams: u32,
    /// Largest header list a request may carry (`SETTINGS_MAX_HEADER_LIST_SIZE`).
    pub max_header_list_size: u32,
    /// Streams a peer may open and reset before the server accepted them (the "rapid reset"
    /// guard); past it the connection is closed with `ENHANCE_YOUR_CALM`.
    pub max_pending_accept_reset_streams: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_streams: MAX_STREAMS as u32,
            max_header_list_size: 16 * 1024,
            max_pending_accept_reset_streams: 20,
        }
    }
}

/// Identifies a pool of connections.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    /// The client pod's UID: the connection is dialled from its namespace, so the server sees
    /// its address; no other pod's stream rides it.
    pub source_pod: String,
    /// The client workload's identity (its certificate).
    pub source: Identity,
    /// The identity the server must present.
    pub destination: Identity,
    /// The destination pod's address.
    pub destination_ip: IpAddr,
}

#[derive(Debug)]
struct Pooled {
    sender: SendRequest<Bytes>,
    streams: Arc<AtomicUsize>,
    last_used: Instant,
    /// Cleared when the connection's task ends.
    open: Arc<AtomicBool>,
}

impl Pooled {
    fn is_closed(&self) -> bool {
        !self.open.load(Ordering::Acquire)
    }
}

/// A new HBONE connection's socket, dialled from the source pod's namespace, with the TLS
/// configuration to speak on it and the socket's slot in the node's budget, which the
/// connection holds until it ends.
#[derive(Debug)]
pub struct Dialled {
    /// The socket, connected to the peer's 15008.
    pub tcp: TcpStream,
    /// The source's certificate, expecting the destination's identity.
    pub tls: Arc<rustls::ClientConfig>,
    /// The socket's slot in the node's budget.
    pub slot: super::SocketSlot,
}

/// An open HBONE stream: bytes to and from the destination, and the stream's slot in its
/// pooled connection (released on drop).
#[derive(Debug)]
pub struct Tunnel {
    /// The byte stream.
    pub io: H2Stream,
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
    /// When [`Pool::close_idle`] last walked the pool, and how many connections it closed.
    closed_idle: Mutex<Option<(Instant, usize)>>,
}

impl Pool {
    /// An empty pool.
    pub fn new() -> Self {
        Self::default()
    }

    /// Opens a CONNECT stream to `authority` through the pod at `key.destination_ip`, reusing a
    /// pooled connection with room, or dialing one from `netns` (the source pod's namespace)
    /// with `tls` (the source's certificate, expecting `key.destination`).
    ///
    /// While the answer is awaited, what `client` sends (up to [`EARLY_DATA`] bytes) already
    /// goes on the stream: a client that speaks first, as most do, has its request at the
    /// destination one round trip sooner. The server holds those bytes in the stream's window
    /// until it has admitted the CONNECT and connected the application; a refused CONNECT
    /// (401, 503) never delivers them. The end of `client`'s stream is left for the copy.
    ///
    /// A pooled connection whose peer is going away (it sent GOAWAY: the agent there hands
    /// over to its successor) refuses new streams without processing them; such a stream is
    /// opened again on a new connection, once, with the client's bytes sent again, and the old
    /// connection leaves the pool.
    pub async fn connect<F, Fut, R>(
        &self,
        key: &PoolKey,
        authority: SocketAddr,
        forwarded_for: SocketAddr,
        client: &mut R,
        dial: F,
    ) -> Result<Tunnel, Error>
    where
        F: FnOnce(SocketAddr) -> Fut,
        Fut: Future<Output = Result<Dialled, Error>>,
        R: AsyncRead + Unpin + ?Sized,
    {
        let peer = SocketAddr::new(key.destination_ip, INBOUND_HBONE_PORT);
        let mut early = Early::default();
        let target = Target {
            peer,
            authority,
            forwarded_for,
        };
        if let Some((sender, streams)) = self.checkout(key) {
            match open_stream(sender, Slot(streams.clone()), &target, client, &mut early).await {
                Err(Opening::Unprocessed(source)) => {
                    debug!(%peer, %source, "pooled HBONE connection going away; dialling anew");
                    self.forget(key, &streams);
                }
                done => return done.map_err(|failed| failed.into_error(peer)),
            }
        }
        // Boxed: the dial and the TLS and HTTP/2 handshakes are the largest state of a
        // connection's future, and the task that carries the connection keeps its full size for
        // its whole life (kilobytes per idle connection), though only the first stream of a
        // pooled connection ever needs them.
        let (sender, open) = Box::pin(async {
            let dialled = dial(peer).await?;
            handshake(peer, dialled).await
        })
        .await?;
        let streams = Arc::new(AtomicUsize::new(1));
        self.connections
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key.clone())
            .or_default()
            .push(Pooled {
                sender: sender.clone(),
                streams: streams.clone(),
                last_used: Instant::now(),
                open,
            });
        open_stream(sender, Slot(streams), &target, client, &mut early)
            .await
            .map_err(|failed| failed.into_error(peer))
    }

    /// Drops the pooled connection of `key` counted by `streams` from the pool.
    fn forget(&self, key: &PoolKey, streams: &Arc<AtomicUsize>) {
        let mut connections = self.connections.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(pooled) = connections.get_mut(key) {
            pooled.retain(|p| !Arc::ptr_eq(&p.streams, streams));
        }
    }

    /// A live pooled connection for `key` with room for one more stream (taking it).
    fn checkout(&self, key: &PoolKey) -> Option<(SendRequest<Bytes>, Arc<AtomicUsize>)> {
        let mut connections = self.connections.lock().unwrap_or_else(|p| p.into_inner());
        let pooled = connections.get_mut(key)?;
        pooled.retain(|p| !p.is_closed());
        let found = pooled
            .iter_mut()
            .find(|p| p.streams.load(Ordering::Acquire) < MAX_STREAMS)?;
        found.streams.fetch_add(1, Ordering::AcqRel);
        found.last_used = Instant::now();
        Some((found.sender.clone(), found.streams.clone()))
    }

    /// Closes idle connections and forgets closed ones; returns how many remain. Of a key's
    /// idle connections (no stream), the last used is kept for [`IDLE_TIMEOUT`], the others
    /// (left over from a burst) for [`SPARE_IDLE_TIMEOUT`] only: each holds TLS and HTTP/2
    /// buffers here and on the peer. Run it periodically ([`Pool::run_reaper`]).
    pub fn reap(&self, now: Instant) -> usize {
        let mut connections = self.connections.lock().unwrap_or_else(|p| p.into_inner());
        for pooled in connections.values_mut() {
            pooled.retain(|p| !p.is_closed());
            let usage: Vec<_> = pooled
                .iter()
                .map(|p| (p.streams.load(Ordering::Acquire), p.last_used))
                .collect();
            let mut keep = keep_after_reaping(&usage, now).into_iter();
            pooled.retain(|_| keep.next().unwrap_or(true));
        }
        connections.retain(|_, pooled| !pooled.is_empty());
        connections.values().map(Vec::len).sum()
    }

    /// Closes every idle connection (no stream) now, whatever its key and however recently
    /// used, and returns how many: the node's budget is spent, and an idle pooled connection,
    /// which holds a slot of it, is a cache worth less than a connection the budget would
    /// refuse. Each closes once its task sees its last handle gone (at once: nothing else holds
    /// one), which frees its slot. Walks the pool at most once per [`CLOSE_IDLE_INTERVAL`]; in
    /// between, returns what the last walk closed (slots may still be on their way).
    pub fn close_idle(&self, now: Instant) -> usize {
        {
            let mut last = self.closed_idle.lock().unwrap_or_else(|p| p.into_inner());
            match *last {
                Some((at, closed)) if now.saturating_duration_since(at) < CLOSE_IDLE_INTERVAL => {
                    return closed;
                }
                // Taken before the walk, so that concurrent callers do not walk too.
                _ => *last = Some((now, 0)),
            }
        }
        let mut closing = Vec::new();
        {
            let mut connections = self.connections.lock().unwrap_or_else(|p| p.into_inner());
            for pooled in connections.values_mut() {
                // `checkout` takes a stream under this lock, so none starts on one taken here.
                pooled.retain(|p| !p.is_closed());
                let (idle, busy) = std::mem::take(pooled)
                    .into_iter()
                    .partition(|p| p.streams.load(Ordering::Acquire) == 0);
                *pooled = busy;
                closing.extend(idle);
            }
            connections.retain(|_, pooled| !pooled.is_empty());
        }
        let closed = closing.len();
        self.closed_idle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .replace((now, closed));
        // Dropped outside the pool's lock: each drop wakes its connection's task, maybe on
        // another data-plane thread, and `checkout` on every thread waits on that lock.
        drop(closing);
        closed
    }

    /// Connections pooled now.
    pub fn len(&self) -> usize {
        let connections = self.connections.lock().unwrap_or_else(|p| p.into_inner());
        connections.values().map(Vec::len).sum()
    }

    /// Whether no connection is pooled.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Forgets (and so closes, once their streams end) the connections dialled for the pod
    /// `uid`: its namespace is going away.
    pub fn remove_source(&self, uid: &str) {
        let mut connections = self.connections.lock().unwrap_or_else(|p| p.into_inner());
        connections.retain(|key, _| key.source_pod != uid);
    }

    /// Reaps every [`REAP_INTERVAL`] until the task is dropped.
    pub async fn run_reaper(self: Arc<Self>) {
        let mut tick = tokio::time::interval(REAP_INTERVAL);
        loop {
            tick.tick().await;
            self.reap(Instant::now());
        }
    }
}

/// Which of one key's live connections, given as (streams, last used), a reap keeps: every
/// one with a stream; of the idle ones, the last used until [`IDLE_TIMEOUT`] and the others
/// until [`SPARE_IDLE_TIMEOUT`].
fn keep_after_reaping(usage: &[(usize, Instant)], now: Instant) -> Vec<bool> {
    let last_idle = usage
        .iter()
        .enumerate()
        .filter(|(_, (streams, _))| *streams == 0)
        .max_by_key(|(_, (_, last_used))| *last_used)
        .map(|(i, _)| i);
    usage
        .iter()
        .enumerate()
        .map(|(i, &(streams, last_used))| {
            let timeout = if Some(i) == last_idle {
                IDLE_TIMEOUT
            } else {
                SPARE_IDLE_TIMEOUT
            };
            streams > 0 || now.duration_since(last_used) < timeout
        })
        .collect()
}

/// Why a CONNECT on a pooled connection did not open a tunnel.
#[derive(Debug)]
enum Opening {
    /// The server never processed it (it was never sent, the connection was going away, or
    /// the server refused the stream): safe to send again on another connection.
    Unprocessed(h2::Error),
    /// It failed after the server may have acted on it.
    Failed(Error),
}

impl Opening {
    fn into_error(self, peer: SocketAddr) -> Error {
        match self {
            Self::Unprocessed(source) => Error::Http { peer, source },
            Self::Failed(err) => err,
        }
    }
}

/// Where a CONNECT goes: the peer's HBONE address, the authority asked for, and the client
/// named in `Forwarded`.
#[derive(Debug)]
struct Target {
    peer: SocketAddr,
    authority: SocketAddr,
    forwarded_for: SocketAddr,
}

/// The client bytes sent on a CONNECT stream ahead of its answer, kept until the answer comes:
/// if the server never processed the stream, they are sent again on the next one.
#[derive(Debug, Default)]
struct Early {
    chunks: Vec<Bytes>,
    len: usize,
    /// The client ended its stream (the copy will read that end again and pass it on).
    ended: bool,
}

/// Sends a CONNECT to `to.authority` on `sender` and waits for the tunnel, sending `early`'s
/// bytes and then what `client` sends meanwhile (see [`Pool::connect`]); `slot` is the stream's
/// place in its connection.
async fn open_stream<R>(
    sender: SendRequest<Bytes>,
    slot: Slot,
    to: &Target,
    client: &mut R,
    early: &mut Early,
) -> Result<Tunnel, Opening>
where
    R: AsyncRead + Unpin + ?Sized,
{
    let peer = to.peer;
    // Not yet sent: any failure here leaves the server untouched.
    let mut sender = sender.ready().await.map_err(Opening::Unprocessed)?;
    let request = Request::builder()
        .method(Method::CONNECT)
        .uri(to.authority.to_string())
        .header(
            http::header::FORWARDED,
            format!("for=\"{}\"", to.forwarded_for),
        )
        .body(())
        .expect("a CONNECT request from valid parts");
    let (mut response, mut send) = sender
        .send_request(request, false)
        .map_err(Opening::Unprocessed)?;
    // h2 queues data beyond the stream's send window; EARLY_DATA bounds the queue. A failed send
    // (the stream or connection is gone) stops sending: the answer says what happened.
    let mut sending = early
        .chunks
        .iter()
        .all(|chunk| send.send_data(chunk.clone(), false).is_ok());
    // One allocation per opening: each chunk read is split off it, the rest read into.
    let mut buf = BytesMut::new();
    let response = loop {
        let room = sending && !early.ended && early.len < EARLY_DATA;
        tokio::select! {
            biased;
            response = &mut response => break response,
            read = read_chunk(client, &mut buf, EARLY_DATA - early.len), if room => match read {
                Ok(chunk) if chunk.is_empty() => early.ended = true,
                Ok(chunk) => {
                    early.len += chunk.len();
                    sending = send.send_data(chunk.clone(), false).is_ok();
                    early.chunks.push(chunk);
                }
                Err(source) => return Err(Opening::Failed(Error::Client { peer, source })),
            },
        }
    };
    let response = response.map_err(|source| {
        if never_processed(&source) {
            Opening::Unprocessed(source)
        } else {
            Opening::Failed(Error::Http { peer, source })
        }
    })?;
    if response.status() != StatusCode::OK {
        return Err(Opening::Failed(Error::Refused {
            peer,
            authority: to.authority,
            status: response.status(),
        }));
    }
    Ok(Tunnel {
        io: H2Stream::new(send, response.into_body()),
        _slot: slot,
    })
}

/// Reads what `reader` has, up to `limit` bytes, into `buf`'s spare room ([`EARLY_READ`] when
/// it has none) and splits it off; empty at the reader's end. Cancel-safe: nothing read is
/// lost if the future is dropped before it is ready.
async fn read_chunk<R>(reader: &mut R, buf: &mut BytesMut, limit: usize) -> io::Result<Bytes>
where
    R: AsyncRead + Unpin + ?Sized,
{
    if buf.capacity() == 0 {
        buf.reserve(EARLY_READ);
    }
    reader.read_buf(&mut (&mut *buf).limit(limit)).await?;
    Ok(buf.split().freeze())
}

/// Whether a sent request failed before the server processed it: the connection was going
/// away (GOAWAY) or the server refused the stream. Such a request is safe to send again.
fn never_processed(err: &h2::Error) -> bool {
    // A GOAWAY of our own making (the connection failed here) says nothing of what the server
    // did with the stream; only the peer's, or its REFUSED_STREAM, does.
    (err.is_go_away() && err.is_remote()) || err.reason() == Some(h2::Reason::REFUSED_STREAM)
}

/// Pings the peer when the connection has read nothing for [`KEEPALIVE_INTERVAL`] (a busy
/// connection needs no ping, and its ping would queue behind its data); returns when a ping goes
/// unanswered for [`KEEPALIVE_TIMEOUT`] or the connection is gone.
async fn keepalive(mut ping_pong: h2::PingPong, reads: ReadClock) {
    let mut every = tokio::time::interval_at(
        tokio::time::Instant::now() + KEEPALIVE_INTERVAL,
        KEEPALIVE_INTERVAL,
    );
    loop {
        every.tick().await;
        if reads.idle() < KEEPALIVE_INTERVAL {
            continue;
        }
        match tokio::time::timeout(KEEPALIVE_TIMEOUT, ping_pong.ping(h2::Ping::opaque())).await {
            Ok(Ok(_pong)) => {}
            Ok(Err(_)) | Err(_) => return,
        }
    }
}

async fn handshake(
    peer: SocketAddr,
    Dialled { tcp, tls, slot }: Dialled,
) -> Result<(SendRequest<Bytes>, Arc<AtomicBool>), Error> {
    let connecting = async {
        // No SNI is sent (the config disables it); rustls still wants a name.
        let stream = tokio_rustls::TlsConnector::from(tls)
            .connect(ServerName::IpAddress(peer.ip().into()), tcp)
            .await
            .map_err(|source| Error::Tls { peer, source })?;
        let reads = ReadClock::new();
        let (sender, mut connection) = h2::client::Builder::new()
            .enable_push(false)
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME)
            .max_send_buffer_size(SEND_BUFFER)
            // A peer's answers are a status line: what the server accepts of requests.
            .max_header_list_size(Limits::default().max_header_list_size)
            .initial_max_send_streams(MAX_STREAMS)
            .handshake::<_, Bytes>(Clocked::new(stream, reads.clone()))
            .await
            .map_err(|source| Error::Http { peer, source })?;
        let open = Arc::new(AtomicBool::new(true));
        let pings = connection.ping_pong().expect("taken once, here");
        let ended = open.clone();
        tokio::spawn(async move {
            // The socket's slot in the node's budget goes with the connection, freed after it.
            let _slot = slot;
            let mut connection = connection;
            tokio::select! {
                served = &mut connection => {
                    if let Err(err) = served {
                        debug!(%peer, %err, "HBONE connection ended");
                    }
                }
                () = keepalive(pings, reads) => debug!(%peer, "HBONE peer stopped answering pings"),
            }
            ended.store(false, Ordering::Release);
        });
        Ok((sender, open))
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
/// change comes to deny it, its record and its slot in the pod's connection budget.
#[derive(Debug)]
pub struct Upstream {
    /// The application's stream.
    pub stream: TcpStream,
    /// Closes the connection when a re-check denies it.
    pub live: super::connections::Live,
    /// Its metrics and access log line.
    pub record: super::record::Record,
    /// Its slot in the destination pod's connection budget.
    pub permit: super::Permit,
}

/// A CONNECT the server received.
#[derive(Debug, Clone)]
pub struct Connect {
    /// The client's verified identity.
    pub peer_identity: Identity,
    /// The TCP peer: the client pod's own address (the tunnel is dialled from its namespace).
    pub peer: SocketAddr,
    /// `:authority`, parsed.
    pub authority: SocketAddr,
    /// The raw `Forwarded` header, if any: logged, never trusted.
    pub forwarded: Option<String>,
}

/// Why a request on 15008 is answered 400 before admission.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadRequest {
    /// Only `CONNECT` is served.
    #[error("method {0} is not CONNECT")]
    Method(String),
    /// `:authority` must be `ip:port`.
    #[error("authority {0:?} is not an ip:port")]
    Authority(String),
    /// Port 0 is no destination.
    #[error("authority port 0")]
    PortZero,
    /// A header that cannot be read as text (it is not logged, so not kept).
    #[error("header {0} is not visible ASCII")]
    Header(String),
}

/// The validated parts of a CONNECT request: the authority and the raw `Forwarded` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectRequest {
    /// `:authority`, parsed.
    pub authority: SocketAddr,
    /// `Forwarded`, as sent (at most the first 256 characters): for the log only.
    pub forwarded: Option<String>,
}

/// Validates a request to 15008: a `CONNECT` whose `:authority` is an `ip:port` (port not 0).
/// Whether that address is served here, and whether the client may reach it, is the
/// admission's call. Pure: everything a peer sends passes here first (and the fuzzer does).
pub fn parse_connect<B>(request: &Request<B>) -> Result<ConnectRequest, BadRequest> {
    if request.method() != Method::CONNECT {
        return Err(BadRequest::Method(
            request.method().as_str().chars().take(32).collect(),
        ));
    }
    let uri = request.uri();
    let authority = uri
        .authority()
        .filter(|_| uri.scheme().is_none() && uri.path_and_query().is_none())
        .and_then(|a| a.as_str().parse::<SocketAddr>().ok())
        .ok_or_else(|| BadRequest::Authority(uri.to_string().chars().take(256).collect()))?;
    if authority.port() == 0 {
        return Err(BadRequest::PortZero);
    }
    let forwarded = match request.headers().get(http::header::FORWARDED) {
        Some(value) => Some(
            value
                .to_str()
                .map_err(|_| BadRequest::Header("forwarded".into()))?
                .chars()
                .take(256)
                .collect(),
        ),
        None => None,
    };
    Ok(ConnectRequest {
        authority,
        forwarded,
    })
}

/// What a 15008 listener shares between its connections.
pub struct Server<A> {
    /// TLS with the pod's certificate, client certificates required.
    pub acceptor: tokio_rustls::TlsAcceptor,
    /// Bounds the TLS handshakes in progress on this listener.
    pub handshakes: Arc<tokio::sync::Semaphore>,
    /// HTTP/2 limits.
    pub limits: Limits,
    /// Decides each well-formed CONNECT and opens its upstream.
    pub admit: A,
    /// Counts the limits reached.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// When the agent stops, each connection is told to go away (GOAWAY).
    pub drain: crate::drain::Drain,
}

impl<A> std::fmt::Debug for Server<A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

/// Serves one accepted 15008 connection: TLS (waiting for a handshake slot of the listener,
/// all within [`HANDSHAKE_TIMEOUT`]), then HTTP/2 within [`Limits`]; for each well-formed
/// CONNECT, `admit` decides and opens the upstream. Streams admitted carry on after the
/// listener closes; when the agent drains, the peer is told to go away (GOAWAY).
pub async fn serve_connection<A, Fut>(server: Arc<Server<A>>, tcp: TcpStream, peer: SocketAddr)
where
    A: Fn(Connect) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Admission> + Send + 'static,
{
    let handshake = async {
        let _slot = match server.handshakes.clone().try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => {
                server.metrics.limit_reached("tls_handshakes");
                server
                    .handshakes
                    .clone()
                    .acquire_owned()
                    .await
                    .map_err(io::Error::other)?
            }
        };
        server.acceptor.accept(tcp).await
    };
    let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(err)) => {
            debug!(%peer, %err, "HBONE TLS handshake refused");
            return;
        }
        Err(_) => {
            server.metrics.limit_reached("tls_handshake_timeout");
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
    let limits = server.limits;
    let reads = ReadClock::new();
    let preface = h2::server::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_send_buffer_size(SEND_BUFFER)
        .max_concurrent_streams(limits.max_streams)
        .max_header_list_size(limits.max_header_list_size)
        .max_pending_accept_reset_streams(limits.max_pending_accept_reset_streams)
        .handshake::<_, Bytes>(Clocked::new(stream, reads.clone()));
    // A client that finished TLS but never speaks HTTP/2 holds a socket and a task: as long as
    // a TLS handshake may take, no longer.
    let mut connection = match tokio::time::timeout(HANDSHAKE_TIMEOUT, preface).await {
        Ok(Ok(connection)) => connection,
        Ok(Err(err)) => {
            if broke_protocol(&err) {
                server.metrics.limit_reached("hbone_protocol");
            }
            debug!(%peer, %err, "HBONE connection preface refused");
            return;
        }
        Err(_) => {
            debug!(%peer, "HBONE connection preface timed out");
            return;
        }
    };
    let pings = connection.ping_pong().expect("taken once, here");
    let mut keepalive = std::pin::pin!(keepalive(pings, reads));
    let mut draining = false;
    loop {
        let accepted = tokio::select! {
            accepted = connection.accept() => accepted,
            () = server.drain.stopping(), if !draining => {
                // The agent stops: GOAWAY, so the peer opens new streams elsewhere (on the
                // successor); the ones it has carry on until they end or the drain deadline
                // cuts them.
                debug!(%peer, "draining: HBONE connection told to go away");
                draining = true;
                connection.graceful_shutdown();
                continue;
            }
            () = &mut keepalive => {
                debug!(%peer, "HBONE peer stopped answering pings");
                return;
            }
        };
        match accepted {
            Some(Ok((request, respond))) => {
                tokio::spawn(handle(
                    request,
                    respond,
                    identity.clone(),
                    peer,
                    server.admit.clone(),
                ));
            }
            Some(Err(err)) => {
                // A peer that broke the protocol or a limit (too many resets, a malformed
                // frame) is told with GOAWAY and counted.
                if broke_protocol(&err) {
                    server.metrics.limit_reached("hbone_protocol");
                }
                debug!(%peer, %err, "HBONE connection ended");
                return;
            }
            None => return,
        }
    }
}

/// Whether an HTTP/2 connection ended because the peer broke the protocol or a limit (as
/// opposed to going away).
fn broke_protocol(err: &h2::Error) -> bool {
    !err.is_io() && err.reason().is_some_and(|r| r != h2::Reason::NO_ERROR)
}

/// Answers one CONNECT stream, then carries it: `parse_connect`, `admit`, the response, and the
/// copy between the stream and the application until either side ends or a policy change
/// closes it.
async fn handle<A, Fut>(
    request: Request<h2::RecvStream>,
    mut respond: SendResponse<Bytes>,
    peer_identity: Identity,
    peer: SocketAddr,
    admit: A,
) where
    A: Fn(Connect) -> Fut,
    Fut: Future<Output = Admission>,
{
    let response = |status: StatusCode| {
        Response::builder()
            .status(status)
            .body(())
            .expect("a response from valid parts")
    };
    let ConnectRequest {
        authority,
        forwarded,
    } = match parse_connect(&request) {
        Ok(parsed) => parsed,
        Err(err) => {
            debug!(%peer, %err, "bad HBONE request");
            let _ = respond.send_response(response(StatusCode::BAD_REQUEST), true);
            return;
        }
    };
    let connect = Connect {
        peer_identity,
        peer,
        authority,
        forwarded,
    };
    // Boxed: admission (policy, the dial into the pod) would otherwise size this task, which
    // lives as long as the connection, for its largest step rather than for copying.
    let Upstream {
        stream: mut upstream,
        live,
        mut record,
        permit: _permit,
    } = match Box::pin(admit(connect)).await {
        Admission::Reject(status, reason) => {
            debug!(%peer, %authority, %status, %reason, "CONNECT rejected");
            let _ = respond.send_response(response(status), true);
            return;
        }
        Admission::Upstream(admitted) => *admitted,
    };
    let send = match respond.send_response(response(StatusCode::OK), false) {
        Ok(send) => send,
        Err(err) => {
            record.fail(
                super::record::Flags::Connect,
                format!("CONNECT stream gone before its answer: {err}"),
            );
            return;
        }
    };
    let mut tunnel =
        crate::metrics::Counted::new(H2Stream::new(send, request.into_body()), record.counters());
    let mut live = live;
    tokio::select! {
        copied = super::copy(&mut tunnel, &mut upstream) => {
            if let Err(err) = copied {
                record.copy_failed(&err);
            }
        }
        reason = live.closed() => record.ended(format!("closed by a policy change: {reason}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt as _;

    fn request(method: &str, uri: &str, forwarded: Option<&[u8]>) -> Request<()> {
        let mut builder = Request::builder().method(method).uri(uri);
        if let Some(value) = forwarded {
            builder = builder.header(
                http::header::FORWARDED,
                http::HeaderValue::from_bytes(value).unwrap(),
            );
        }
        builder.body(()).unwrap()
    }

    #[test]
    fn a_reap_keeps_busy_connections_and_one_idle_spare_per_key() {
        let now = Instant::now();
        let ago = |secs: u64| now - Duration::from_secs(secs);
        // After a burst: two still carry streams, three are idle.
        let usage = [
            (3, ago(400)),
            (0, ago(30)),
            (0, ago(20)),
            (1, ago(20)),
            (0, ago(5)),
        ];
        assert_eq!(
            keep_after_reaping(&usage, now),
            [true, false, false, true, true],
            "busy ones stay; of the idle, the last used stays, the others went idle too long ago"
        );
        // The last used idle connection stays up to IDLE_TIMEOUT, then goes too.
        let alone = [(0, ago(60))];
        assert_eq!(keep_after_reaping(&alone, now), [true]);
        let stale = [(0, now - IDLE_TIMEOUT)];
        assert_eq!(keep_after_reaping(&stale, now), [false]);
        // Spares idle for less than SPARE_IDLE_TIMEOUT stay.
        let fresh = [(0, ago(2)), (0, ago(1))];
        assert_eq!(keep_after_reaping(&fresh, now), [true, true]);
    }

    /// A pooled connection over an in-memory pipe, with `streams` streams counted on it, and
    /// the task driving it (it ends when the connection closes, as an agent's frees the
    /// connection's slot in the node's budget).
    async fn pooled(streams: usize) -> (Pooled, tokio::task::JoinHandle<()>) {
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        tokio::spawn(async move {
            let mut connection = h2::server::handshake(server_io).await.unwrap();
            while connection.accept().await.is_some() {}
        });
        let (sender, connection) = h2::client::handshake(client_io).await.unwrap();
        let open = Arc::new(AtomicBool::new(true));
        let driver = tokio::spawn({
            let open = open.clone();
            async move {
                let _ = connection.await;
                open.store(false, Ordering::Release);
            }
        });
        let pooled = Pooled {
            sender,
            streams: Arc::new(AtomicUsize::new(streams)),
            last_used: Instant::now(),
            open,
        };
        (pooled, driver)
    }

    #[tokio::test]
    async fn a_spent_budget_closes_every_idle_connection_and_only_those() {
        let key = |ip: &str| PoolKey {
            source_pod: "client-uid".into(),
            source: Identity::new("cluster.local", "default", "client").unwrap(),
            destination: Identity::new("cluster.local", "default", "server").unwrap(),
            destination_ip: ip.parse().unwrap(),
        };
        let pool = Pool::new();
        let (idle, idle_driver) = pooled(0).await;
        let (spare, spare_driver) = pooled(0).await;
        let (busy, busy_driver) = pooled(1).await;
        let busy_streams = busy.streams.clone();
        {
            let mut connections = pool.connections.lock().unwrap();
            // One key's last used idle connection, which a reap would keep for IDLE_TIMEOUT,
            // and another key's busy connection and idle spare.
            connections.insert(key("10.0.1.1"), vec![idle]);
            connections.insert(key("10.0.1.2"), vec![busy, spare]);
        }
        let now = Instant::now();
        assert_eq!(pool.close_idle(now), 2, "both idle connections close");
        assert_eq!(pool.len(), 1, "the busy one stays pooled");
        // Their tasks end (and with them, in the agent, their slots): waited on, not slept for.
        for driver in [idle_driver, spare_driver] {
            tokio::time::timeout(Duration::from_secs(10), driver)
                .await
                .expect("an idle connection closed")
                .unwrap();
        }
        assert!(
            !busy_driver.is_finished(),
            "the busy connection is still open"
        );

        // A flood refused by the spent budget does not walk the pool for each connection: in
        // between, the last walk's count says slots may still be coming.
        busy_streams.store(0, Ordering::Release);
        assert_eq!(pool.close_idle(now + CLOSE_IDLE_INTERVAL / 2), 2);
        assert_eq!(pool.len(), 1, "not walked again");
        assert_eq!(pool.close_idle(now + CLOSE_IDLE_INTERVAL), 1);
        assert!(pool.is_empty());
        assert_eq!(pool.close_idle(now + CLOSE_IDLE_INTERVAL * 2), 0);
    }

    #[test]
    fn only_a_connect_to_an_ip_and_port_is_a_well_formed_request() {
        let ok = parse_connect(&request("CONNECT", "10.244.1.11:8080", None)).unwrap();
        assert_eq!(ok.authority, "10.244.1.11:8080".parse().unwrap());
        assert_eq!(ok.forwarded, None);
        let v6 = parse_connect(&request("CONNECT", "[fd00::b]:443", None)).unwrap();
        assert_eq!(v6.authority, "[fd00::b]:443".parse().unwrap());

        let cases = [
            ("GET", "10.244.1.11:8080", BadRequest::Method("GET".into())),
            (
                "CONNECT",
                "server.demo:8080",
                BadRequest::Authority("server.demo:8080".into()),
            ),
            (
                "CONNECT",
                "10.244.1.11",
                BadRequest::Authority("10.244.1.11".into()),
            ),
            (
                "CONNECT",
                "http://10.244.1.11:8080/",
                BadRequest::Authority("http://10.244.1.11:8080/".into()),
            ),
            ("CONNECT", "10.244.1.11:0", BadRequest::PortZero),
        ];
        for (method, uri, want) in cases {
            assert_eq!(
                parse_connect(&request(method, uri, None)),
                Err(want),
                "{method} {uri}"
            );
        }
    }

    #[test]
    fn forwarded_is_kept_short_for_the_log_and_must_be_text() {
        let long = format!("for=\"{}\"", "9".repeat(1000));
        let parsed =
            parse_connect(&request("CONNECT", "10.0.0.1:80", Some(long.as_bytes()))).unwrap();
        assert_eq!(parsed.forwarded.unwrap().chars().count(), 256);
        assert_eq!(
            parse_connect(&request("CONNECT", "10.0.0.1:80", Some(b"for=\xff\xfe"))),
            Err(BadRequest::Header("forwarded".into()))
        );
    }

    /// An h2 client over an in-memory pipe to a server whose first stream `serve` handles; the
    /// server keeps driving its connection until the client's end goes.
    async fn client_of<S, Fut>(serve: S) -> SendRequest<Bytes>
    where
        S: FnOnce(Request<h2::RecvStream>, SendResponse<Bytes>) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        tokio::spawn(async move {
            let mut connection = h2::server::handshake(server_io).await.unwrap();
            if let Some(Ok((request, respond))) = connection.accept().await {
                tokio::spawn(serve(request, respond));
            }
            while connection.accept().await.is_some() {}
        });
        let (sender, connection) = h2::client::handshake(client_io).await.unwrap();
        tokio::spawn(connection);
        sender
    }

    /// Reads `len` bytes of a request body, as a server holding its answer would.
    async fn read_body(body: &mut h2::RecvStream, len: usize) -> Vec<u8> {
        let mut read = Vec::new();
        while read.len() < len {
            let chunk = body.data().await.expect("more body").expect("a DATA frame");
            body.flow_control().release_capacity(chunk.len()).unwrap();
            read.extend_from_slice(&chunk);
        }
        read
    }

    fn answer(status: StatusCode) -> Response<()> {
        Response::builder().status(status).body(()).unwrap()
    }

    fn target() -> Target {
        Target {
            peer: "10.0.0.2:15008".parse().unwrap(),
            authority: "10.0.0.2:8080".parse().unwrap(),
            forwarded_for: "10.0.0.1:40000".parse().unwrap(),
        }
    }

    /// Opens a stream on `sender`, the first of its connection, for `client`.
    async fn open(
        sender: SendRequest<Bytes>,
        client: &mut (impl AsyncRead + Unpin),
        early: &mut Early,
    ) -> Result<Tunnel, Opening> {
        let slot = Slot(Arc::new(AtomicUsize::new(1)));
        open_stream(sender, slot, &target(), client, early).await
    }

    /// A client that has written `bytes` and keeps its connection open.
    async fn speaking_client(bytes: &[u8]) -> (tokio::io::DuplexStream, tokio::io::DuplexStream) {
        let (mut app, agent_end) = tokio::io::duplex(bytes.len() + 1024);
        app.write_all(bytes).await.unwrap();
        (app, agent_end)
    }

    #[tokio::test]
    async fn what_the_client_sends_first_goes_ahead_of_the_answer() {
        // The server reads the request's bytes before it answers: a client that waited for
        // the answer to send them would never get one.
        let sender = client_of(|request, mut respond| async move {
            let mut body = request.into_body();
            assert_eq!(read_body(&mut body, 5).await, b"hello");
            let mut send = respond
                .send_response(answer(StatusCode::OK), false)
                .unwrap();
            send.send_data(Bytes::from_static(b"world"), true).unwrap();
        })
        .await;
        let (_app, mut client) = speaking_client(b"hello").await;
        let mut early = Early::default();
        let opened = tokio::time::timeout(
            Duration::from_secs(10),
            open(sender, &mut client, &mut early),
        )
        .await
        .expect("the server answers once it has the client's bytes");
        let mut tunnel = opened.expect("a tunnel");
        assert_eq!(early.chunks.concat(), b"hello");
        let mut back = Vec::new();
        tunnel.io.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"world");
    }

    #[tokio::test]
    async fn a_stream_the_server_never_processed_is_opened_again_with_the_clients_bytes() {
        let refusing = client_of(|request, mut respond| async move {
            let mut body = request.into_body();
            assert_eq!(read_body(&mut body, 5).await, b"hello");
            respond.send_reset(h2::Reason::REFUSED_STREAM);
        })
        .await;
        let (mut app, mut client) = speaking_client(b"hello").await;
        let mut early = Early::default();
        let refused = open(refusing, &mut client, &mut early).await;
        assert!(
            matches!(refused, Err(Opening::Unprocessed(ref err)) if err.reason() == Some(h2::Reason::REFUSED_STREAM)),
            "{refused:?}"
        );
        // What the client sends meanwhile follows the bytes sent again.
        app.write_all(b" again").await.unwrap();
        let (got, heard) = tokio::sync::oneshot::channel();
        let accepting = client_of(|request, mut respond| async move {
            let mut body = request.into_body();
            let _ = got.send(read_body(&mut body, 11).await);
            let _send = respond
                .send_response(answer(StatusCode::OK), false)
                .unwrap();
        })
        .await;
        let opened = open(accepting, &mut client, &mut early).await;
        assert!(opened.is_ok(), "{:?}", opened.err());
        assert_eq!(heard.await.unwrap(), b"hello again");
    }

    /// A client whose connection was reset.
    struct Resetting;

    impl AsyncRead for Resetting {
        fn poll_read(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            _: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::task::Poll::Ready(Err(io::ErrorKind::ConnectionReset.into()))
        }
    }

    #[tokio::test]
    async fn a_client_reset_while_the_answer_is_awaited_fails_as_the_clients() {
        let sender = client_of(|_request, respond| async move {
            // Never answers.
            let _respond = respond;
            std::future::pending::<()>().await;
        })
        .await;
        let failed = open(sender, &mut Resetting, &mut Early::default()).await;
        assert!(
            matches!(
                failed,
                Err(Opening::Failed(Error::Client { ref source, .. }))
                    if source.kind() == io::ErrorKind::ConnectionReset
            ),
            "{failed:?}"
        );
    }

    #[tokio::test]
    async fn a_refused_connect_fails_with_its_status_though_bytes_went_ahead() {
        let sender = client_of(|request, mut respond| async move {
            let mut body = request.into_body();
            assert_eq!(read_body(&mut body, 5).await, b"hello");
            let _ = respond.send_response(answer(StatusCode::UNAUTHORIZED), true);
        })
        .await;
        let (_app, mut client) = speaking_client(b"hello").await;
        let refused = open(sender, &mut client, &mut Early::default()).await;
        assert!(
            matches!(
                refused,
                Err(Opening::Failed(Error::Refused { status, .. })) if status == StatusCode::UNAUTHORIZED
            ),
            "{refused:?}"
        );
    }

    #[tokio::test]
    async fn no_more_than_early_data_goes_ahead_of_the_answer() {
        let (got, heard) = tokio::sync::oneshot::channel();
        let sender = client_of(|request, mut respond| async move {
            let mut body = request.into_body();
            let _ = got.send(read_body(&mut body, EARLY_DATA).await);
            // Only what was sent ahead is in the window now: more arrives after the answer.
            let _send = respond
                .send_response(answer(StatusCode::OK), false)
                .unwrap();
        })
        .await;
        let (_app, mut client) = speaking_client(&vec![7u8; EARLY_DATA + 1000]).await;
        let mut early = Early::default();
        let opened = open(sender, &mut client, &mut early).await;
        assert!(opened.is_ok(), "{:?}", opened.err());
        assert_eq!(early.len, EARLY_DATA);
        assert_eq!(heard.await.unwrap().len(), EARLY_DATA);
        // The rest is still the client's, for the copy.
        let mut rest = vec![0; 1000];
        client.read_exact(&mut rest).await.unwrap();
    }
}
