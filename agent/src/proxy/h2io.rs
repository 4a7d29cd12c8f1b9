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

use bytes::{Buf, Bytes};
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

impl AsyncRead for H2Stream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        while this.pending.is_empty() {
            match ready!(this.recv.poll_data(cx)) {
                Some(Ok(chunk)) => this.pending = chunk,
                Some(Err(err)) => return Poll::Ready(Err(to_io(err))),
                // END_STREAM: end of file.
                None => return Poll::Ready(Ok(())),
            }
        }
        let n = this.pending.len().min(buf.remaining());
        buf.put_slice(&this.pending[..n]);
        this.pending.advance(n);
        // The peer may send as much again once these bytes are out of h2's hands.
        let _ = this.recv.flow_control().release_capacity(n);
        Poll::Ready(Ok(()))
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
        let send = &mut self.send;
        // Usually granted at once from the windows; only a stream out of window waits, and only
        // then is this task's waker left with h2.
        send.reserve_capacity(buf.len());
        let mut capacity = send.capacity();
        while capacity == 0 {
            match ready!(send.poll_capacity(cx)) {
                Some(Ok(granted)) => capacity = granted,
                Some(Err(err)) => return Poll::Ready(Err(to_io(err))),
                None => return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
            }
        }
        let n = capacity.min(buf.len());
        send.send_data(Bytes::copy_from_slice(&buf[..n]), false)
            .map_err(to_io)?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        // The connection's task writes frames out as they are queued.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.shut {
            self.shut = true;
            self.send.send_data(Bytes::new(), true).map_err(to_io)?;
        }
        Poll::Ready(Ok(()))
    }
}
