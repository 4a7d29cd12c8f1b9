//! The one copy path of every proxied connection: both directions at once, half-closes passed
//! on, with buffers that start small and grow only for bulk transfers.
//!
//! Most proxied connections are idle or carry small messages, and a fixed 64 KiB buffer per
//! direction made every idle tunnel cost ~48 KiB of touched memory. Here each direction starts
//! with [`INITIAL`] bytes; a read that fills the whole buffer says more is waiting, and the buffer
//! grows fourfold (once drained) up to [`LARGE`]. A direction that has carried [`JUMBO_AFTER`]
//! is a long bulk transfer: it grows on to [`MAX`], so that each wake-up of the agent moves four
//! times as much (one stream across nodes: 15% less CPU per byte, half the context switches,
//! see docs/performance.md). It never shrinks: a connection that was bulk once is likely to be
//! again.
//!
//! The state machine follows tokio's `copy_bidirectional` (read while there is room, write
//! what was read, flush when the reader has nothing, shut the writer down after EOF), which it
//! replaces.

use std::{
    future::poll_fn,
    io,
    pin::Pin,
    task::{Context, Poll, ready},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bytes a direction starts with.
pub const INITIAL: usize = 1024;
/// Bytes a direction grows to by reads that fill it.
pub const LARGE: usize = 64 * 1024;
/// Bytes a direction grows to at most, once it has carried [`JUMBO_AFTER`].
pub const MAX: usize = 256 * 1024;
/// Bytes a direction carries before it may grow past [`LARGE`] (as ztunnel does, at 10 MB): a
/// burst of medium transfers keeps 64 KiB buffers.
pub const JUMBO_AFTER: u64 = 8 * 1024 * 1024;

/// One direction's buffer and progress.
#[derive(Debug)]
struct Buffer {
    buf: Box<[u8]>,
    /// Written out up to here.
    pos: usize,
    /// Filled up to here.
    cap: usize,
    read_done: bool,
    need_flush: bool,
    /// Grow once the buffer is drained (the last read filled it).
    grow: bool,
    amount: u64,
}

impl Buffer {
    fn new() -> Self {
        Self {
            buf: vec![0; INITIAL].into_boxed_slice(),
            pos: 0,
            cap: 0,
            read_done: false,
            need_flush: false,
            grow: false,
            amount: 0,
        }
    }

    fn poll_fill<R: AsyncRead + ?Sized>(
        &mut self,
        cx: &mut Context<'_>,
        reader: Pin<&mut R>,
    ) -> Poll<io::Result<()>> {
        let mut buf = ReadBuf::new(&mut self.buf);
        buf.set_filled(self.cap);
        let polled = reader.poll_read(cx, &mut buf);
        if let Poll::Ready(Ok(())) = polled {
            let filled = buf.filled().len();
            self.read_done = self.cap == filled;
            self.grow |= filled == self.buf.len();
            self.cap = filled;
        }
        polled
    }

    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut reader: Pin<&mut R>,
        mut writer: Pin<&mut W>,
    ) -> Poll<io::Result<u64>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        loop {
            // Room left: read more first, so that writes are as large as they can be.
            if self.cap < self.buf.len() && !self.read_done {
                match self.poll_fill(cx, reader.as_mut()) {
                    Poll::Ready(Ok(())) => {}
                    Poll::Ready(Err(err)) => return Poll::Ready(Err(err)),
                    Poll::Pending if self.pos == self.cap => {
                        // Nothing to write either: flush what the writer holds (a TLS record,
                        // an HTTP/2 frame), since the other side may wait for it to answer.
                        if self.need_flush {
                            ready!(writer.as_mut().poll_flush(cx))?;
                            self.need_flush = false;
                        }
                        return Poll::Pending;
                    }
                    Poll::Pending => {}
                }
            }
            while self.pos < self.cap {
                let written = ready!(
                    writer
                        .as_mut()
                        .poll_write(cx, &self.buf[self.pos..self.cap])
                )?;
                if written == 0 {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "the writer took no bytes",
                    )));
                }
                self.pos += written;
                self.amount += written as u64;
                self.need_flush = true;
            }
            self.pos = 0;
            self.cap = 0;
            let limit = if self.amount >= JUMBO_AFTER {
                MAX
            } else {
                LARGE
            };
            if self.grow && self.buf.len() < limit {
                self.buf = vec![0; (self.buf.len() * 4).min(limit)].into_boxed_slice();
            }
            self.grow = false;
            if self.read_done {
                ready!(writer.as_mut().poll_flush(cx))?;
                return Poll::Ready(Ok(self.amount));
            }
        }
    }
}

/// Where one direction stands.
#[derive(Debug)]
enum Direction {
    Running(Buffer),
    ShuttingDown(u64),
    Done(u64),
}

impl Direction {
    fn poll<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut reader: Pin<&mut R>,
        mut writer: Pin<&mut W>,
    ) -> Poll<io::Result<u64>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        loop {
            match self {
                Self::Running(buffer) => {
                    let amount = ready!(buffer.poll_copy(cx, reader.as_mut(), writer.as_mut()))?;
                    *self = Self::ShuttingDown(amount);
                }
                Self::ShuttingDown(amount) => {
                    ready!(writer.as_mut().poll_shutdown(cx))?;
                    *self = Self::Done(*amount);
                }
                Self::Done(amount) => return Poll::Ready(Ok(*amount)),
            }
        }
    }
}

/// Copies both ways between `a` and `b` until both directions have ended (EOF read, the other
/// side's writer shut down); returns the bytes copied a to b and b to a.
pub async fn bidirectional<A, B>(a: &mut A, b: &mut B) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let mut a_to_b = Direction::Running(Buffer::new());
    let mut b_to_a = Direction::Running(Buffer::new());
    poll_fn(|cx| {
        let a_to_b = a_to_b.poll(cx, Pin::new(&mut *a), Pin::new(&mut *b))?;
        let b_to_a = b_to_a.poll(cx, Pin::new(&mut *b), Pin::new(&mut *a))?;
        let a_to_b = ready!(a_to_b);
        let b_to_a = ready!(b_to_a);
        Poll::Ready(Ok((a_to_b, b_to_a)))
    })
    .await
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    /// Runs `bidirectional` between two in-memory pipes and returns the far ends.
    fn relay() -> (
        tokio::io::DuplexStream,
        tokio::io::DuplexStream,
        tokio::task::JoinHandle<io::Result<(u64, u64)>>,
    ) {
        let (client, mut near_a) = tokio::io::duplex(256 * 1024);
        let (mut near_b, server) = tokio::io::duplex(256 * 1024);
        let relay = tokio::spawn(async move { bidirectional(&mut near_a, &mut near_b).await });
        (client, server, relay)
    }

    #[tokio::test]
    async fn bulk_moves_intact_both_ways_and_half_closes_pass_on() {
        let (mut client, mut server, relay) = relay();
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
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
        assert_eq!(received, data, "a to b, after a's half-close");
        server.write_all(b"done").await.unwrap();
        server.shutdown().await.unwrap();
        assert_eq!(writer.await.unwrap(), b"done");
        assert_eq!(relay.await.unwrap().unwrap(), (3_000_000, 4));
    }

    #[test]
    fn a_buffer_grows_only_when_reads_fill_it() {
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        let mut buffer = Buffer::new();
        // Small messages: the buffer stays at its first size.
        let mut small: &[u8] = b"ping";
        let mut sink = Vec::new();
        let polled = buffer.poll_copy(&mut cx, Pin::new(&mut small), Pin::new(&mut sink));
        assert!(matches!(polled, Poll::Ready(Ok(4))));
        assert_eq!(buffer.buf.len(), INITIAL);
        // A bulk read fills it each time: it grows fourfold per drain, up to LARGE.
        let mut buffer = Buffer::new();
        let bulk = vec![1u8; 1 << 20];
        let mut reader: &[u8] = &bulk;
        let mut sink = Vec::new();
        let polled = buffer.poll_copy(&mut cx, Pin::new(&mut reader), Pin::new(&mut sink));
        assert!(matches!(polled, Poll::Ready(Ok(n)) if n == 1 << 20));
        assert_eq!(buffer.buf.len(), LARGE);
        assert_eq!(sink, bulk);
        // Past JUMBO_AFTER, a long transfer: up to MAX.
        let mut buffer = Buffer::new();
        let long = vec![2u8; JUMBO_AFTER as usize + (1 << 20)];
        let mut reader: &[u8] = &long;
        let mut sink = Vec::new();
        let polled = buffer.poll_copy(&mut cx, Pin::new(&mut reader), Pin::new(&mut sink));
        assert!(matches!(polled, Poll::Ready(Ok(n)) if n == long.len() as u64));
        assert_eq!(buffer.buf.len(), MAX);
        assert_eq!(sink.len(), long.len());
    }

    #[tokio::test]
    async fn an_error_on_one_side_ends_the_copy_with_it() {
        let (client, server, relay) = relay();
        drop(server);
        let mut client = client;
        // The write towards the dropped side fails: the relay reports it.
        let _ = client.write_all(&[0u8; 8192]).await;
        let outcome = relay.await.unwrap();
        assert!(outcome.is_err(), "{outcome:?}");
    }
}
