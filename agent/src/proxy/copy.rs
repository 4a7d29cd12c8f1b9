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
//! Between two plain TCP sockets (plaintext passthrough, the same-node path) a direction that
//! has grown its buffer to [`LARGE`] is a bulk transfer, and from then on its bytes never reach
//! user space: the kernel moves them through a pipe with `splice(2)` ([`Splice`]).
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

use std::os::fd::OwnedFd;

use bytes::{Buf as _, BufMut as _, Bytes, BytesMut};
use nix::fcntl::{FcntlArg, OFlag, SpliceFFlags};
use tokio::{
    io::{AsyncRead, AsyncWrite, Interest},
    net::TcpStream,
    sync::{Semaphore, SemaphorePermit},
};

/// Bytes a direction starts with.
pub const INITIAL: usize = 1024;
/// Bytes a direction grows to by reads that fill it.
pub const LARGE: usize = 64 * 1024;
/// Bytes a direction grows to at most, once it has carried [`JUMBO_AFTER`].
pub const MAX: usize = 256 * 1024;
/// Bytes a direction carries before it may grow past [`LARGE`] (as ztunnel does, at 10 MB): a
/// burst of medium transfers keeps 64 KiB buffers.
pub const JUMBO_AFTER: u64 = 8 * 1024 * 1024;

/// The pipe a spliced direction's bytes pass through: as large as the largest buffer, so a
/// wake-up moves as much as a buffered one would.
pub const PIPE_SIZE: usize = MAX;

/// Pipes that may exist at once, each two descriptors: an eighth of what the connection
/// budget keeps back for the agent's own descriptors
/// ([`crate::proxy::Budgets::RESERVED_DESCRIPTORS`]; the pods' listeners and the sockets made
/// ahead for them hold slots of the budget instead). A direction that finds none free copies,
/// as it would without splicing.
pub const MAX_PIPES: usize = (crate::proxy::Budgets::RESERVED_DESCRIPTORS / 16) as usize;

/// The pipes of every spliced direction in the agent: a permit each.
static PIPES: Semaphore = Semaphore::const_new(MAX_PIPES);

/// An end of a proxied connection, which may be a plain TCP socket. Between two sockets the
/// copy path splices a bulk direction instead of copying it: the kernel moves the bytes from
/// one socket to the other through a pipe, without copying them to user space and back.
pub trait Splice {
    /// The socket, if this end is one and its bytes may be spliced.
    fn socket(&self) -> Option<&TcpStream> {
        None
    }

    /// Bytes spliced from this end (`Moved::Received`) or to it (`Moved::Sent`), for whoever
    /// counts what crosses it.
    fn spliced(self: Pin<&mut Self>, _moved: Moved) {}
}

/// What a splice moved, seen from the end it crossed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Moved {
    /// Read from this end.
    Received(u64),
    /// Written to this end.
    Sent(u64),
}

impl Splice for TcpStream {
    fn socket(&self) -> Option<&TcpStream> {
        Some(self)
    }
}

impl<T: Splice + Unpin + ?Sized> Splice for &mut T {
    fn socket(&self) -> Option<&TcpStream> {
        (**self).socket()
    }

    fn spliced(mut self: Pin<&mut Self>, moved: Moved) {
        Pin::new(&mut **self).spliced(moved);
    }
}

/// A writer the copy path hands its buffered bytes to. By default the bytes are written from
/// the buffer (a socket copies them into the kernel); an HTTP/2 stream takes them as they are
/// ([`super::h2io::H2Stream`]), sparing the copy into a frame of its own.
pub trait WriteOwned: AsyncWrite + Splice {
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

impl WriteOwned for TcpStream {}

/// A reader the copy path takes bytes from. By default they are read into the copy path's
/// buffer; an HTTP/2 stream, which holds each DATA frame it received in a buffer of its own,
/// hands the frame over as it is ([`super::h2io::H2Stream`]), sparing its copy.
pub trait ReadOwned: AsyncRead + Splice {
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

impl ReadOwned for TcpStream {}

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
    /// Spliced from here on: both ends are sockets and the direction is a bulk transfer.
    pipe: Option<Pipe>,
    /// Whether splicing was considered (once, when the buffer reached [`LARGE`]).
    splice_considered: bool,
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
            pipe: None,
            splice_considered: false,
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
            if let Some(pipe) = &mut self.pipe {
                ready!(pipe.poll_splice(
                    cx,
                    reader.as_mut(),
                    writer.as_mut(),
                    &mut self.read_done,
                    &mut self.amount
                ))?;
                ready!(writer.as_mut().poll_flush(cx))?;
                return Poll::Ready(Ok(self.amount));
            }
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
            // Everything read is written: a bulk direction between two sockets splices on.
            if self.size >= LARGE && !self.splice_considered && !self.read_done {
                self.splice_considered = true;
                if reader.as_ref().get_ref().socket().is_some()
                    && writer.as_ref().get_ref().socket().is_some()
                {
                    match Pipe::new() {
                        Ok(pipe) => {
                            self.pipe = Some(pipe);
                            self.buf = BytesMut::new();
                            continue;
                        }
                        // Out of descriptors, say: the buffer carries on.
                        Err(err) => tracing::debug!(%err, "no pipe to splice through: copying"),
                    }
                }
            }
            if self.read_done {
                ready!(writer.as_mut().poll_flush(cx))?;
                return Poll::Ready(Ok(self.amount));
            }
        }
    }
}

/// A spliced direction's pipe and what it holds: bytes spliced from the reader's socket into
/// the pipe and from the pipe into the writer's, page references moved by the kernel, never
/// copied to user space.
#[derive(Debug)]
struct Pipe {
    _slot: SemaphorePermit<'static>,
    read: OwnedFd,
    write: OwnedFd,
    /// Bytes the pipe takes.
    capacity: usize,
    /// Bytes in the pipe: spliced from the reader, not yet to the writer.
    held: usize,
}

impl Pipe {
    fn new() -> io::Result<Self> {
        let slot = PIPES
            .try_acquire()
            .map_err(|_| io::Error::other(format!("all {MAX_PIPES} pipes are in use")))?;
        let (read, write) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        // A pipe takes 64 KiB unless told otherwise, and the kernel may refuse more (its
        // per-user budget of pipe memory): the size it has is what it takes.
        let capacity = nix::fcntl::fcntl(&write, FcntlArg::F_SETPIPE_SZ(PIPE_SIZE as i32))
            .or_else(|_| nix::fcntl::fcntl(&write, FcntlArg::F_GETPIPE_SZ))?;
        Ok(Self {
            _slot: slot,
            read,
            write,
            capacity: usize::try_from(capacity).unwrap_or(0).max(1),
            held: 0,
        })
    }

    /// Splices from `reader`'s socket to `writer`'s until the reader's end has been read
    /// (`read_done`) and the pipe is empty; `amount` counts what reached the writer.
    fn poll_splice<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut reader: Pin<&mut R>,
        mut writer: Pin<&mut W>,
        read_done: &mut bool,
        amount: &mut u64,
    ) -> Poll<io::Result<()>>
    where
        R: ReadOwned + ?Sized,
        W: WriteOwned + ?Sized,
    {
        loop {
            // Whether to go round again: bytes moved, or a socket's readiness was found stale
            // and must be polled again (which registers this task's waker).
            let mut again = false;
            if !*read_done && self.held < self.capacity {
                let source = reader.as_ref().get_ref().socket().ok_or_else(not_socket)?;
                if let Poll::Ready(ready) = source.poll_read_ready(cx) {
                    ready?;
                    let room = self.capacity - self.held;
                    let splice = || splice(source, &self.write, room);
                    // With the pipe empty, EAGAIN can only mean the socket has nothing, and
                    // tokio forgets its readiness; with bytes in the pipe it may mean the pipe
                    // has no free slot, and the readiness stands.
                    let spliced = if self.held == 0 {
                        source.try_io(Interest::READABLE, splice)
                    } else {
                        splice()
                    };
                    match spliced {
                        Ok(0) => {
                            *read_done = true;
                            again = true;
                        }
                        Ok(n) => {
                            self.held += n;
                            reader.as_mut().spliced(Moved::Received(n as u64));
                            again = true;
                        }
                        Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                            again = self.held == 0;
                        }
                        Err(err) => return Poll::Ready(Err(err)),
                    }
                }
            }
            if self.held > 0 {
                let sink = writer.as_ref().get_ref().socket().ok_or_else(not_socket)?;
                if let Poll::Ready(ready) = sink.poll_write_ready(cx) {
                    ready?;
                    match sink.try_io(Interest::WRITABLE, || splice(&self.read, sink, self.held)) {
                        // The pipe holds bytes and only we write to it: nothing can empty it
                        // but us, so the kernel never answers 0 here; if it ever did, going
                        // round again would spin.
                        Ok(0) => {
                            return Poll::Ready(Err(io::Error::new(
                                io::ErrorKind::WriteZero,
                                "splice moved nothing out of a pipe that holds bytes",
                            )));
                        }
                        Ok(n) => {
                            self.held -= n;
                            *amount += n as u64;
                            writer.as_mut().spliced(Moved::Sent(n as u64));
                        }
                        Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
                        Err(err) => return Poll::Ready(Err(err)),
                    }
                    again = true;
                }
            }
            if *read_done && self.held == 0 {
                return Poll::Ready(Ok(()));
            }
            if !again {
                return Poll::Pending;
            }
        }
    }
}

/// One non-blocking `splice(2)` of at most `len` bytes, moving pages rather than copying them.
/// Into a socket the peer has reset it raises `SIGPIPE` (splice has no `MSG_NOSIGNAL`), which
/// Rust's runtime ignores from `main` on: the call fails with `EPIPE` instead.
fn splice(
    from: impl std::os::fd::AsFd,
    to: impl std::os::fd::AsFd,
    len: usize,
) -> io::Result<usize> {
    let flags = SpliceFFlags::SPLICE_F_NONBLOCK | SpliceFFlags::SPLICE_F_MOVE;
    Ok(nix::fcntl::splice(from, None, to, None, len, flags)?)
}

fn not_socket() -> io::Error {
    io::Error::other("a spliced end is no longer a socket")
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
    impl Splice for tokio::io::DuplexStream {}
    impl WriteOwned for Vec<u8> {}
    impl Splice for Vec<u8> {}
    impl ReadOwned for &[u8] {}
    impl Splice for &[u8] {}
    impl ReadOwned for Trickle {}
    impl Splice for Trickle {}
    impl Splice for Keeper {}
    impl Splice for Holder {}
    impl Splice for Noter {}

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

    /// Two ends of a loopback TCP connection.
    async fn socket_pair() -> (TcpStream, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (connected, accepted) = tokio::join!(
            TcpStream::connect(listener.local_addr().unwrap()),
            listener.accept()
        );
        (connected.unwrap(), accepted.unwrap().0)
    }

    /// A socket end that notes what was spliced across it.
    struct Watched {
        stream: TcpStream,
        received: u64,
        sent: u64,
    }

    impl AsyncRead for Watched {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Pin::new(&mut self.stream).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for Watched {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            Pin::new(&mut self.stream).poll_write(cx, buf)
        }
        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.stream).poll_flush(cx)
        }
        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.stream).poll_shutdown(cx)
        }
    }

    impl ReadOwned for Watched {}
    impl WriteOwned for Watched {}
    impl Splice for Watched {
        fn socket(&self) -> Option<&TcpStream> {
            Some(&self.stream)
        }
        fn spliced(mut self: Pin<&mut Self>, moved: Moved) {
            match moved {
                Moved::Received(n) => self.received += n,
                Moved::Sent(n) => self.sent += n,
            }
        }
    }

    /// A relay between two loopback connections, its near end watched: the far ends and the
    /// relay's task, which returns the copy's outcome and the watched end.
    async fn socket_relay() -> (
        TcpStream,
        TcpStream,
        tokio::task::JoinHandle<(io::Result<(u64, u64)>, Watched)>,
    ) {
        let ((client, near_a), (near_b, server)) = tokio::join!(socket_pair(), socket_pair());
        let relay = tokio::spawn(async move {
            let mut near_a = Watched {
                stream: near_a,
                received: 0,
                sent: 0,
            };
            let mut near_b = near_b;
            let copied = bidirectional(&mut near_a, &mut near_b).await;
            (copied, near_a)
        });
        (client, server, relay)
    }

    #[tokio::test]
    async fn bulk_between_sockets_is_spliced_intact_both_ways_and_half_closes_pass_on() {
        let (mut client, mut server, relay) = socket_relay().await;
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let back: Vec<u8> = data.iter().rev().copied().collect();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&sent).await.unwrap();
            client.shutdown().await.unwrap();
            let mut got = Vec::new();
            client.read_to_end(&mut got).await.unwrap();
            got
        });
        let mut received = Vec::new();
        server.read_to_end(&mut received).await.unwrap();
        assert!(received == data, "a to b changed, after a's half-close");
        server.write_all(&back).await.unwrap();
        server.shutdown().await.unwrap();
        assert!(writer.await.unwrap() == back, "b to a changed");
        let (copied, watched) = relay.await.unwrap();
        assert_eq!(copied.unwrap(), (3_000_000, 3_000_000));
        // Past the first fills (the buffer growing to LARGE), the bytes went through the pipe.
        let by_buffer = 100_000;
        assert!(
            watched.received > 3_000_000 - by_buffer && watched.sent > 3_000_000 - by_buffer,
            "spliced: {} received, {} sent of 3,000,000 each way",
            watched.received,
            watched.sent
        );
    }

    #[tokio::test]
    async fn small_messages_between_sockets_are_not_spliced() {
        let (mut client, mut server, relay) = socket_relay().await;
        for _ in 0..100 {
            client.write_all(b"ping").await.unwrap();
            let mut got = [0u8; 4];
            server.read_exact(&mut got).await.unwrap();
            server.write_all(b"pong").await.unwrap();
            client.read_exact(&mut got).await.unwrap();
            assert_eq!(&got, b"pong");
        }
        drop((client, server));
        let (_, watched) = relay.await.unwrap();
        assert_eq!((watched.received, watched.sent), (0, 0));
    }

    #[tokio::test]
    async fn a_reset_during_a_spliced_transfer_ends_the_copy_with_an_error() {
        let (mut client, server, relay) = socket_relay().await;
        let mut server = server;
        // Enough to be spliced, then the server resets its connection.
        client.write_all(&vec![1u8; 1_000_000]).await.unwrap();
        let mut got = vec![0u8; 1_000_000];
        server.read_exact(&mut got).await.unwrap();
        socket2::SockRef::from(&server)
            .set_linger(Some(std::time::Duration::ZERO))
            .unwrap();
        drop(server);
        let (copied, watched) = relay.await.unwrap();
        assert!(watched.received > 0, "nothing was spliced");
        let err = copied.unwrap_err();
        assert!(
            matches!(
                err.kind(),
                io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
            ),
            "{err:?}"
        );
        drop(client);
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
