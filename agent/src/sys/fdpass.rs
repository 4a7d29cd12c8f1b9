//! Passing file descriptors over unix sockets (`SCM_RIGHTS`): how `meshlet-cni` hands a new
//! pod's network namespace to the agent, so the agent holds the namespace itself rather than a
//! path that may mean something else in its mount namespace (or by the time it is opened).

use std::{
    io::{self, IoSlice, IoSliceMut, Write as _},
    os::{
        fd::{AsFd as _, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd},
        unix::net::UnixStream,
    },
};

use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};

/// The most descriptors one message may carry; more are closed on arrival.
pub const MAX_FDS: usize = 8;

/// Writes `data` to `stream`, with `fds` attached to its first byte.
pub fn send(stream: &UnixStream, data: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    let sent = send_once(stream.as_fd(), data, fds)?;
    let mut stream = stream;
    stream.write_all(&data[sent..])
}

/// One `sendmsg` of `data` with `fds` attached (retried on EINTR); returns the bytes sent.
fn send_once(fd: BorrowedFd<'_>, data: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<usize> {
    let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    let control = [ControlMessage::ScmRights(&raw)];
    let control: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &control };
    loop {
        match sendmsg::<()>(
            fd.as_raw_fd(),
            &[IoSlice::new(data)],
            control,
            MsgFlags::MSG_NOSIGNAL,
            None,
        ) {
            Err(nix::errno::Errno::EINTR) => continue,
            other => return other.map_err(io::Error::from),
        }
    }
}

/// Reads what is available on the socket `fd` into `buf` (one `recvmsg`), with the descriptors
/// attached to it, owned (close-on-exec). `Ok((0, _))` is end of stream. Descriptors past
/// [`MAX_FDS`] are closed.
pub fn recv(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    let (bytes, fds, _) = recv_with(fd, buf, MsgFlags::MSG_DONTWAIT)?;
    Ok((bytes, fds))
}

/// Reads one whole message of a `SOCK_SEQPACKET` socket (blocking, within the socket's receive
/// timeout) with its descriptors. A message longer than `buf`, or with more than [`MAX_FDS`]
/// descriptors, is an error: nothing of it is kept. `Ok((0, _))` is end of stream.
pub fn recv_message(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    let (bytes, fds, flags) = recv_with(fd, buf, MsgFlags::empty())?;
    if flags.intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "message truncated (more than {} bytes or {MAX_FDS} descriptors)",
                buf.len()
            ),
        ));
    }
    Ok((bytes, fds))
}

/// Sends `data` as one message of a `SOCK_SEQPACKET` socket, with `fds` attached.
pub fn send_message(fd: BorrowedFd<'_>, data: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    match send_once(fd, data, fds)? {
        sent if sent == data.len() => Ok(()),
        sent => Err(io::Error::new(
            io::ErrorKind::WriteZero,
            format!("sent {sent} of a {}-byte message", data.len()),
        )),
    }
}

/// Accepts a connection on the listening socket `fd`, close-on-exec.
pub fn accept(fd: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    let raw = nix::sys::socket::accept4(fd.as_raw_fd(), nix::sys::socket::SockFlag::SOCK_CLOEXEC)
        .map_err(io::Error::from)?;
    // SAFETY: accept4 just installed `raw` in this process; nothing else refers to it.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

fn recv_with(
    fd: BorrowedFd<'_>,
    buf: &mut [u8],
    flags: MsgFlags,
) -> io::Result<(usize, Vec<OwnedFd>, MsgFlags)> {
    let mut control = nix::cmsg_space!([RawFd; MAX_FDS]);
    let mut iov = [IoSliceMut::new(buf)];
    let message = loop {
        match recvmsg::<()>(
            fd.as_raw_fd(),
            &mut iov,
            Some(&mut control),
            MsgFlags::MSG_CMSG_CLOEXEC | flags,
        ) {
            Err(nix::errno::Errno::EINTR) => continue,
            other => break other.map_err(io::Error::from)?,
        }
    };
    let mut fds = Vec::new();
    for control in message.cmsgs().map_err(io::Error::from)? {
        if let ControlMessageOwned::ScmRights(received) = control {
            for raw in received {
                // SAFETY: the kernel just installed `raw` in this process for this message
                // (SCM_RIGHTS); nothing else refers to it, so it is ours to own and close.
                fds.push(unsafe { OwnedFd::from_raw_fd(raw) });
            }
        }
    }
    fds.truncate(MAX_FDS);
    Ok((message.bytes, fds, message.flags))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read as _;

    #[test]
    fn a_descriptor_arrives_with_the_message_and_refers_to_the_same_file() {
        let (a, b) = UnixStream::pair().unwrap();
        let file = std::fs::File::open("/proc/self/ns/net").unwrap();
        let payload = vec![7u8; 100_000];
        let sender = std::thread::spawn(move || {
            send(&a, &payload, &[file.as_fd()]).unwrap();
            drop(a);
            file
        });
        let mut buf = vec![0u8; 4096];
        let (n, fds) = loop {
            match recv(b.as_fd(), &mut buf) {
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => std::thread::yield_now(),
                other => break other.unwrap(),
            }
        };
        assert!(n > 0);
        assert_eq!(fds.len(), 1);
        let mut rest = Vec::new();
        (&b).read_to_end(&mut rest).unwrap();
        assert_eq!(n + rest.len(), 100_000, "the whole message arrives");
        let file = sender.join().unwrap();
        use std::os::unix::fs::MetadataExt as _;
        let received = std::fs::File::from(fds.into_iter().next().unwrap());
        assert_eq!(
            received.metadata().unwrap().ino(),
            file.metadata().unwrap().ino()
        );
    }
}
