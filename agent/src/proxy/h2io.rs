//! One HTTP/2 stream as a byte stream (`AsyncRead + AsyncWrite`), for the copy path: an HBONE
//! CONNECT tunnel, driven on `h2` directly by the client ([`super::hbone::Pool`]) and the
//! server ([`super::hbone::serve_connection`]).
//!
//! hyper's upgraded stream, used before, hands each write over a channel to a task of hyper's,
//! which registers itself as the stream's sender and then, in the same poll, reserves capacity,
//! which wakes that sender: itself. tokio runs a task woken during its own poll again as a
//! yield and wakes a parked worker to take it, so every message through the agent cost a futex
//! and two context switches. Here the copy task writes into h2 itself, and registers its waker
//! with h2 only when it has to wait for flow-control capacity.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll, ready},
};

use bytes::Bytes;
use h2::{RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Both halves of one HTTP/2 stream. Dropped before the stream ended, h2 resets it (`CANCEL`).
#[derive(Debug)]
pub struct H2Stream {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// Received and not read yet (one DATA frame at most).
    pending: Bytes,
    /// `END_STREAM` sent.
    shut: bool,
}

impl H2Stream {
    /// The stream whose request (client) or response (server) half is `send`, and whose other
    /// half's body is `recv`.
    pub fn new(send: SendStream<Bytes>, recv: RecvStream) -> Self {
        Self {
            send,
            recv,
            pending: Bytes::new(),
            shut: false,
        }
    }
}

/// An h2 error as an I/O error: a reset stream reads as a reset connection.
fn to_io(err: h2::Error) -> io::Error {
    if err.is_io() {
        return err
            .into_io()
            .unwrap_or_else(|| io::Error::other("h2 I/O error"));
    }
    let kind = if err.is_reset() || err.is_go_away() {
        io::ErrorKind::ConnectionReset
    } else {
        io::ErrorKind::Other
    };
    io::Error::new(kind, err)
}

impl H2Stream {
    /// Waits for received bytes in `pending`; leaves it empty at the end of the stream.
    fn poll_pending(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.pending.is_empty() {
            match ready!(self.recv.poll_data(cx)) {
                Some(Ok(chunk)) => self.pending = chunk,
                // A peer that is done resets with NO_ERROR or CANCEL rather than END_STREAM
                // (hyper, and so the tunnel before, read both as the end).
                Some(Err(err))
                    if matches!(
                        err.reason(),
                        Some(h2::Reason::NO_ERROR | h2::Reason::CANCEL)
                    ) =>
                {
                    return Poll::Ready(Ok(()));
                }
                Some(Err(err)) => return Poll::Ready(Err(to_io(err))),
                // END_STREAM: end of file.
                None => return Poll::Ready(Ok(())),
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Takes `n` bytes off `pending`: the peer may send as much again once they are out of h2's
    /// hands.
    fn take_pending(&mut self, n: usize) -> Bytes {
        let _ = self.recv.flow_control().release_capacity(n);
        self.pending.split_to(n)
    }
}

impl AsyncRead for H2Stream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        ready!(self.poll_pending(cx))?;
        let n = self.pending.len().min(buf.remaining());
        buf.put_slice(&self.take_pending(n));
        Poll::Ready(Ok(()))
    }
}

/// An HTTP/2 stream is no socket: its bytes are framed, never spliced.
impl super::copy::Splice for H2Stream {}

/// Received DATA goes to the writer from h2's buffer as it is, not through the copy path's.
impl super::copy::ReadOwned for H2Stream {
    fn poll_read_owned(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut bytes::BytesMut,
        limit: usize,
        held: &mut Bytes,
    ) -> Poll<io::Result<usize>> {
        ready!(self.poll_pending(cx))?;
        if buf.is_empty() {
            let n = self.pending.len();
            *held = self.take_pending(n);
            return Poll::Ready(Ok(n));
        }
        let n = self.pending.len().min(limit);
        buf.extend_from_slice(&self.take_pending(n));
        Poll::Ready(Ok(n))
    }
}

impl H2Stream {
    /// Waits for room in the stream's window; returns how many of `wanted` bytes it may send.
    fn poll_send_capacity(
        &mut self,
        cx: &mut Context<'_>,
        wanted: usize,
    ) -> Poll<io::Result<usize>> {
        let send = &mut self.send;
        // Usually granted at once from the windows; only a stream out of window waits, and only
        // then is this task's waker left with h2.
        send.reserve_capacity(wanted);
        let mut capacity = send.capacity();
        while capacity == 0 {
            match ready!(send.poll_capacity(cx)) {
                Some(Ok(granted)) => capacity = granted,
                Some(Err(err)) => return Poll::Ready(Err(to_io(err))),
                // The stream can take no more: say why.
                None => return Poll::Ready(Err(reset_reason(send, cx))),
            }
        }
        Poll::Ready(Ok(capacity.min(wanted)))
    }

    fn send(&mut self, cx: &mut Context<'_>, data: Bytes) -> io::Result<usize> {
        let n = data.len();
        if self.send.send_data(data, false).is_err() {
            return Err(reset_reason(&mut self.send, cx));
        }
        Ok(n)
    }
}

/// The copy path's bytes go into DATA frames as they are: h2 holds the buffer's block until it
/// has framed them, and the copy path reads on into a new one.
impl super::copy::WriteOwned for H2Stream {
    fn poll_write_owned(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut bytes::BytesMut,
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let n = ready!(self.poll_send_capacity(cx, buf.len()))?;
        Poll::Ready(self.send(cx, buf.split_to(n).freeze()))
    }
}

impl AsyncWrite for H2Stream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let n = ready!(self.poll_send_capacity(cx, buf.len()))?;
        Poll::Ready(self.send(cx, Bytes::copy_from_slice(&buf[..n])))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        // The connection's task writes frames out as they are queued.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.shut {
            self.shut = true;
            if self.send.send_data(Bytes::new(), true).is_err() {
                // A stream the peer already closed with NO_ERROR is shut down.
                if let Poll::Ready(Ok(h2::Reason::NO_ERROR)) = self.send.poll_reset(cx) {
                    return Poll::Ready(Ok(()));
                }
                return Poll::Ready(Err(reset_reason(&mut self.send, cx)));
            }
        }
        Poll::Ready(Ok(()))
    }
}

/// Why a stream refuses data: the peer's reset reason when it sent one.
fn reset_reason(send: &mut SendStream<Bytes>, cx: &mut Context<'_>) -> io::Error {
    match send.poll_reset(cx) {
        Poll::Ready(Ok(reason)) => io::Error::new(
            io::ErrorKind::ConnectionReset,
            format!("HTTP/2 stream reset by the peer: {reason:?}"),
        ),
        Poll::Ready(Err(err)) => to_io(err),
        Poll::Pending => io::ErrorKind::BrokenPipe.into(),
    }
}

/// When a connection last read anything, shared between the connection's I/O and its keepalive:
/// a connection that is reading needs no ping (hyper's rule, kept), so a ping never queues
/// behind a busy connection's data and times out there.
#[derive(Debug, Clone)]
pub struct ReadClock {
    start: std::time::Instant,
    /// Milliseconds from `start` to the last read.
    last: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl ReadClock {
    /// A clock that read just now.
    pub fn new() -> Self {
        Self {
            start: std::time::Instant::now(),
            last: Default::default(),
        }
    }

    fn tick(&self) {
        let now = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last.store(now, std::sync::atomic::Ordering::Relaxed);
    }

    /// How long since the last read.
    pub fn idle(&self) -> std::time::Duration {
        let last = self.last.load(std::sync::atomic::Ordering::Relaxed);
        self.start
            .elapsed()
            .saturating_sub(std::time::Duration::from_millis(last))
    }
}

impl Default for ReadClock {
    fn default() -> Self {
        Self::new()
    }
}

/// A connection's byte stream that ticks its [`ReadClock`] on every read.
#[derive(Debug)]
pub struct Clocked<S> {
    inner: S,
    clock: ReadClock,
}

impl<S> Clocked<S> {
    /// `inner`, reads timed by `clock`.
    pub fn new(inner: S, clock: ReadClock) -> Self {
        Self { inner, clock }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Clocked<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.clock.tick();
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Clocked<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    /// An h2 client and server over an in-memory pipe, with small windows (so that a bulk
    /// transfer must wait for capacity), and one stream opened: the client's and the server's
    /// ends as [`H2Stream`]s.
    async fn stream_pair() -> (H2Stream, H2Stream) {
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let server = tokio::spawn(async move {
            let mut connection = h2::server::Builder::new()
                .initial_window_size(16 * 1024)
                .handshake::<_, Bytes>(server_io)
                .await
                .unwrap();
            let (request, mut respond) = connection.accept().await.unwrap().unwrap();
            let send = respond
                .send_response(http::Response::new(()), false)
                .unwrap();
            // Keep driving the connection for the stream's life.
            tokio::spawn(async move { while connection.accept().await.is_some() {} });
            H2Stream::new(send, request.into_body())
        });
        let (sender, connection) = h2::client::Builder::new()
            .initial_window_size(16 * 1024)
            .handshake::<_, Bytes>(client_io)
            .await
            .unwrap();
        tokio::spawn(connection);
        let mut sender = sender.ready().await.unwrap();
        let request = http::Request::builder()
            .method(http::Method::CONNECT)
            .uri("10.0.0.1:80")
            .body(())
            .unwrap();
        let (response, send) = sender.send_request(request, false).unwrap();
        let server = server.await.unwrap();
        let response = response.await.unwrap();
        (H2Stream::new(send, response.into_body()), server)
    }

    /// Sends `len` bytes from `client` (then its half-close) to `server`, which checks them
    /// and answers `bye` (then its half-close), which `client` reads to the end.
    async fn send_and_answer<C, S>(mut client: C, server: &mut S, len: u32)
    where
        C: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let data: Vec<u8> = (0..len).map(|i| (i % 253) as u8).collect();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&sent).await.unwrap();
            client.shutdown().await.unwrap();
            let mut back = Vec::new();
            client.read_to_end(&mut back).await.unwrap();
            back
        });
        let mut received = Vec::new();
        server.read_to_end(&mut received).await.unwrap();
        assert_eq!(received.len(), data.len());
        assert!(received == data, "the bytes arrived changed");
        server.write_all(b"bye").await.unwrap();
        server.shutdown().await.unwrap();
        assert_eq!(writer.await.unwrap(), b"bye");
    }

    #[tokio::test]
    async fn bulk_beyond_the_window_arrives_whole_and_a_shutdown_is_the_end_of_the_stream() {
        let (client, mut server) = stream_pair().await;
        send_and_answer(client, &mut server, 1_000_000).await;
    }

    #[tokio::test]
    async fn the_copy_path_hands_its_buffers_to_the_stream_and_the_bytes_arrive_whole() {
        let (mut client, mut server) = stream_pair().await;
        let (application, mut accepted) = tokio::io::duplex(256 * 1024);
        let relay = tokio::spawn(async move {
            crate::proxy::copy::bidirectional(&mut accepted, &mut client).await
        });
        // Enough for the buffers to grow to 64 KiB, through a window of 16 KiB.
        send_and_answer(application, &mut server, 3_000_000).await;
        assert_eq!(relay.await.unwrap().unwrap(), (3_000_000, 3));
    }

    #[tokio::test]
    async fn received_data_goes_from_the_stream_to_the_socket_whole() {
        let (mut client, server) = stream_pair().await;
        let (mut application, mut accepted) = tokio::io::duplex(256 * 1024);
        let relay = tokio::spawn(async move {
            crate::proxy::copy::bidirectional(&mut client, &mut accepted).await
        });
        // DATA frames through a 16 KiB window, each handed to the socket side as h2 holds it.
        send_and_answer(server, &mut application, 3_000_000).await;
        assert_eq!(relay.await.unwrap().unwrap(), (3_000_000, 3));
    }

    #[tokio::test]
    async fn a_dropped_end_reads_as_the_end_and_refuses_writes_with_the_reason() {
        let (mut client, server) = stream_pair().await;
        // Dropped without END_STREAM: h2 resets the stream (CANCEL), which the other end reads
        // as the end of the stream, as hyper did.
        drop(server);
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
        let mut refused = None;
        for _ in 0..64 {
            if let Err(err) = client.write_all(&[0u8; 16 * 1024]).await {
                refused = Some(err);
                break;
            }
        }
        let err = refused.expect("writes into a reset stream kept succeeding");
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset, "{err}");
        assert!(err.to_string().contains("CANCEL"), "{err}");
    }

    #[tokio::test]
    async fn the_clock_ticks_only_when_bytes_are_read() {
        let clock = ReadClock::new();
        let (mut far, near) = tokio::io::duplex(1024);
        let mut clocked = Clocked::new(near, clock.clone());
        clock
            .last
            .store(u64::MAX / 2, std::sync::atomic::Ordering::Relaxed);
        far.write_all(b"x").await.unwrap();
        let mut byte = [0u8; 1];
        clocked.read_exact(&mut byte).await.unwrap();
        // Ticked just now: the stored time is the clock's age, not the planted one.
        let last = clock.last.load(std::sync::atomic::Ordering::Relaxed);
        assert!(last < 60_000, "{last}");
        assert!(clock.idle() < std::time::Duration::from_secs(60));
    }
}
