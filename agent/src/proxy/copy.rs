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
//! Bytes change hands without a copy where one side holds them in a buffer of its own: the copy
//! path hands its buffer to an HTTP/2 stream to frame ([`WriteOwned`]), and a stream's received
//! DATA is written to the socket from h2's buffer ([`ReadOwned`]), as ztunnel's copy does.
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

use bytes::{Buf as _, BufMut as _, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite};

/// Bytes a direction starts with.
pub const INITIAL: usize = 1024;
/// Bytes a direction grows to by reads that fill it.
pub const LARGE: usize = 64 * 1024;
/// Bytes a direction grows to at most, once it has carried [`JUMBO_AFTER`].
pub const MAX: usize = 256 * 1024;
/// Bytes a direction carries before it may grow past [`LARGE`] (as ztunnel does, at 10 MB): a
/// burst of medium transfers keeps 64 KiB buffers.
pub const JUMBO_AFTER: u64 = 8 * 1024 * 1024;

/// A writer the copy path hands its buffered bytes to. By default the bytes are written from
/// the buffer (a socket copies them into the kernel); an HTTP/2 stream takes them as they are
/// ([`super::h2io::H2Stream`]), sparing the copy into a frame of its own.
pub trait WriteOwned: AsyncWrite {
    /// Writes the front of `buf` and removes it from `buf`; returns how many bytes that was.
    fn poll_write_owned(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
    ) -> Poll<io::Result<usize>> {
        let written = ready!(self.poll_write(cx, buf))?;
        buf.advance(written);
        Poll::Ready(Ok(written))
    }
}

impl WriteOwned for tokio::net::TcpStream {}

/// A reader the copy path takes bytes from. By default they are read into the copy path's
/// buffer; an HTTP/2 stream, which holds each DATA frame it received in a buffer of its own,
/// hands the frame over as it is ([`super::h2io::H2Stream`]), sparing its copy.
pub trait ReadOwned: AsyncRead {
    /// Reads the next bytes: into `buf` (at most `limit` of them), or, only when `buf` is empty,
    /// as `held`, bytes the reader already holds. Returns how many bytes; 0 is the end.
    fn poll_read_owned(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
        limit: usize,
        _held: &mut Bytes,
    ) -> Poll<io::Result<usize>> {
        tokio_util::io::poll_read_buf(self, cx, &mut buf.limit(limit))
    }
}

impl ReadOwned for tokio::net::TcpStream {}

impl<T: ReadOwned + Unpin + ?Sized> ReadOwned for &mut T {
    fn poll_read_owned(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
        limit: usize,
        held: &mut Bytes,
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut **self).poll_read_owned(cx, buf, limit, held)
    }
}

impl<T: WriteOwned + Unpin + ?Sized> WriteOwned for &mut T {
    fn poll_write_owned(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut **self).poll_write_owned(cx, buf)
    }
}

/// One direction's buffer and progress.
#[derive(Debug)]
struct Buffer {
    /// Read and not written yet.
    buf: BytesMut,
    /// Read and not written yet, in the reader's own buffer: written before `buf` is filled
    /// again (it is taken only while `buf` is empty).
    held: Bytes,
    /// The most one fill holds.
    size: usize,
    read_done: bool,
    need_flush: bool,
    /// Grow once the buffer is drained (the last read filled it).
    grow: bool,
    amount: u64,
}

impl Buffer {
    fn new() -> Self {
        Self {
            buf: BytesMut::with_capacity(INITIAL),
            held: Bytes::new(),
            size: INITIAL,
            read_done: false,
            need_flush: false,
            grow: false,
            amount: 0,
        }
    }

    fn poll_fill<R: ReadOwned + ?Sized>(
        &mut self,
        cx: &mut Context<'_>,
        reader: Pin<&mut R>,
    ) -> Poll<io::Result<()>> {
        let room = self.size - self.buf.len();
        let spare = self.buf.capacity() - self.buf.len();
        // Room for a whole fill where it is (a block the writer copied from, or whose pieces it
        // has all let go, is taken back). Else what is left of the block, if that is a fair part
        // of a fill: a block handed out in pieces (an HTTP/2 stream holds each until it is
        // framed) is then used whole, not pinned by a few bytes per fill. Else a new block.
        let limit = if self.buf.try_reclaim(room) {
            room
        } else if spare >= self.size / 4 {
            spare
        } else {
            self.buf.reserve(room);
            room
        };
        let read = ready!(reader.poll_read_owned(cx, &mut self.buf, limit, &mut self.held))?;
        self.read_done = read == 0;
        // Bytes the reader held say nothing about this buffer's size: it stays as it is (an
        // HTTP/2 stream's reads never need it).
        self.grow |= self.held.is_empty() && read == limit;
        Poll::Ready(Ok(()))
    }

    fn wrote(&mut self, written: usize) -> io::Result<()> {
        if written == 0 {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "the writer took no bytes",
            ));
        }
        self.amount += written as u64;
        self.need_flush = true;
        Ok(())
    }

    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut reader: Pin<&mut R>,
        mut writer: Pin<&mut W>,
    ) -> Poll<io::Result<u64>>
    where
        R: ReadOwned + ?Sized,
        W: WriteOwned + ?Sized,
    {
        loop {
            // Room left: read more first, so that writes are as large as they can be.
            if self.held.is_empty() && self.buf.len() < self.size && !self.read_done {
                match self.poll_fill(cx, reader.as_mut()) {
                    Poll::Ready(Ok(())) => {}
                    Poll::Ready(Err(err)) => return Poll::Ready(Err(err)),
                    Poll::Pending if self.buf.is_empty() => {
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
            while !self.held.is_empty() {
                let written = ready!(writer.as_mut().poll_write(cx, &self.held))?;
                self.held.advance(written);
                self.wrote(written)?;
            }
            while !self.buf.is_empty() {
                let written = ready!(writer.as_mut().poll_write_owned(cx, &mut self.buf))?;
                self.wrote(written)?;
            }
            let limit = if self.amount >= JUMBO_AFTER {
                MAX
            } else {
                LARGE
            };
            if self.grow && self.size < limit {
                self.size = (self.size * 4).min(limit);
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
        R: ReadOwned + ?Sized,
        W: WriteOwned + ?Sized,
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
    A: ReadOwned + WriteOwned + Unpin + ?Sized,
    B: ReadOwned + WriteOwned + Unpin + ?Sized,
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

    impl WriteOwned for tokio::io::DuplexStream {}
    impl ReadOwned for tokio::io::DuplexStream {}
    impl WriteOwned for Vec<u8> {}
    impl ReadOwned for &[u8] {}
    impl ReadOwned for Trickle {}

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
        assert_eq!(buffer.size, INITIAL);
        // A bulk read fills it each time: it grows fourfold per drain, up to LARGE.
        let mut buffer = Buffer::new();
        let bulk = vec![1u8; 1 << 20];
        let mut reader: &[u8] = &bulk;
        let mut sink = Vec::new();
        let polled = buffer.poll_copy(&mut cx, Pin::new(&mut reader), Pin::new(&mut sink));
        assert!(matches!(polled, Poll::Ready(Ok(n)) if n == 1 << 20));
        assert_eq!(buffer.size, LARGE);
        assert_eq!(sink, bulk);
        // Past JUMBO_AFTER, a long transfer: up to MAX.
        let mut buffer = Buffer::new();
        let long = vec![2u8; JUMBO_AFTER as usize + (1 << 20)];
        let mut reader: &[u8] = &long;
        let mut sink = Vec::new();
        let polled = buffer.poll_copy(&mut cx, Pin::new(&mut reader), Pin::new(&mut sink));
        assert!(matches!(polled, Poll::Ready(Ok(n)) if n == long.len() as u64));
        assert_eq!(buffer.size, MAX);
        assert_eq!(sink.len(), long.len());
    }

    /// A reader that yields `piece` bytes per read, `count` times.
    struct Trickle {
        piece: usize,
        count: usize,
    }

    impl AsyncRead for Trickle {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            if self.count > 0 {
                self.count -= 1;
                let n = self.piece.min(buf.remaining());
                buf.put_slice(&vec![7u8; n]);
            }
            Poll::Ready(Ok(()))
        }
    }

    /// A writer that keeps every piece it is handed, as an HTTP/2 stream does until it frames
    /// them.
    #[derive(Default)]
    struct Keeper(Vec<Bytes>);

    impl AsyncWrite for Keeper {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &[u8],
        ) -> Poll<io::Result<usize>> {
            unreachable!("the copy path hands its buffer over")
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    impl WriteOwned for Keeper {
        fn poll_write_owned(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut BytesMut,
        ) -> Poll<io::Result<usize>> {
            let n = buf.len();
            self.0.push(buf.split_to(n).freeze());
            Poll::Ready(Ok(n))
        }
    }

    #[test]
    fn small_pieces_handed_out_share_blocks_rather_than_pinning_one_each() {
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        let mut buffer = Buffer::new();
        buffer.size = MAX;
        let (pieces, piece) = (2_000, 100);
        let mut reader = Trickle {
            piece,
            count: pieces,
        };
        let mut keeper = Keeper::default();
        let polled = buffer.poll_copy(&mut cx, Pin::new(&mut reader), Pin::new(&mut keeper));
        assert!(matches!(polled, Poll::Ready(Ok(n)) if n == (pieces * piece) as u64));
        // Every piece is still held; count where a piece does not follow the one before in
        // memory: a new block.
        let blocks = 1 + keeper
            .0
            .windows(2)
            .filter(|w| w[0].as_ptr().wrapping_add(w[0].len()) != w[1].as_ptr())
            .count();
        let most = pieces * piece / (MAX / 4) + 2;
        assert!(
            blocks <= most,
            "{blocks} blocks for {pieces} pieces (at most {most})"
        );
    }

    /// A reader that holds its bytes in pieces of its own, as an HTTP/2 stream holds frames.
    struct Holder(std::collections::VecDeque<Bytes>);

    impl AsyncRead for Holder {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &mut tokio::io::ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            unreachable!("the copy path takes held bytes over")
        }
    }

    impl ReadOwned for Holder {
        fn poll_read_owned(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut BytesMut,
            limit: usize,
            held: &mut Bytes,
        ) -> Poll<io::Result<usize>> {
            let Some(mut piece) = self.0.pop_front() else {
                return Poll::Ready(Ok(0));
            };
            if buf.is_empty() {
                let n = piece.len();
                *held = piece;
                return Poll::Ready(Ok(n));
            }
            // Behind bytes already in the buffer, a piece is copied after them.
            let n = piece.len().min(limit);
            buf.extend_from_slice(&piece.split_to(n));
            if !piece.is_empty() {
                self.0.push_front(piece);
            }
            Poll::Ready(Ok(n))
        }
    }

    /// A writer that takes at most `most` bytes a write and notes where each write's bytes were.
    #[derive(Default)]
    struct Noter {
        most: usize,
        got: Vec<u8>,
        from: Vec<(usize, usize)>,
    }

    impl AsyncWrite for Noter {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let n = buf.len().min(self.most);
            self.got.extend_from_slice(&buf[..n]);
            self.from.push((buf.as_ptr() as usize, n));
            Poll::Ready(Ok(n))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    impl WriteOwned for Noter {}

    #[test]
    fn held_bytes_are_written_from_where_the_reader_holds_them_in_order() {
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        let pieces: Vec<Bytes> = (0..50u8)
            .map(|i| Bytes::from(vec![i; 1000 + usize::from(i) * 997]))
            .collect();
        let expected: Vec<u8> = pieces.iter().flat_map(|p| p.iter().copied()).collect();
        let within = |(at, n): (usize, usize)| {
            pieces
                .iter()
                .any(|p| at >= p.as_ptr() as usize && at + n <= p.as_ptr() as usize + p.len())
        };
        let mut reader = Holder(pieces.iter().cloned().collect());
        // Partial writes: a held piece is written on from where the last write stopped.
        let mut writer = Noter {
            most: 7_000,
            ..Noter::default()
        };
        let mut buffer = Buffer::new();
        let polled = buffer.poll_copy(&mut cx, Pin::new(&mut reader), Pin::new(&mut writer));
        assert!(matches!(polled, Poll::Ready(Ok(n)) if n == expected.len() as u64));
        assert!(writer.got == expected, "the bytes arrived changed");
        let copied = writer.from.iter().filter(|w| !within(**w)).count();
        assert_eq!(
            copied, 0,
            "{copied} writes were not from the reader's own pieces"
        );
        // Nothing went through the buffer, so it did not grow.
        assert_eq!((buffer.size, buffer.buf.capacity()), (INITIAL, INITIAL));
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
