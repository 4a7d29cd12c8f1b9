//! Sockets of the proxy: marked listeners made inside a pod's network namespace, the
//! congestion control of the legs that stay on the node, and the original destination of a
//! captured connection.

use std::{
    io,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, TcpListener, TcpStream},
    os::fd::{AsRawFd as _, BorrowedFd, OwnedFd},
    time::Duration,
};

use meshlet_common::{MESH_MARK, SO_ORIGINAL_DST};
use socket2::{Domain, Protocol, Socket, Type};

use super::Netns;

/// A TCP listener on `addr`, created inside `netns` and carrying the mesh mark (capture never
/// redirects marked sockets, nor connections the proxy makes from them). IPv6 listeners are
/// IPv6-only, so each family has its own. Non-blocking, ready for tokio.
pub fn listen_in(netns: &Netns, addr: SocketAddr) -> io::Result<TcpListener> {
    netns.run(|| listen(addr))?
}

/// [`listen_in`] for the calling thread's namespace.
pub fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket
        .set_mark(MESH_MARK)
        .map_err(|err| context(err, "set SO_MARK (needs CAP_NET_ADMIN)"))?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket
        .bind(&addr.into())
        .map_err(|err| context(err, &format!("bind {addr}")))?;
    socket.listen(1024)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// A TCP socket created inside `netns` with the mesh mark, not yet connected: the proxy's
/// connections leave from the pod's namespace, with the pod's address. Made on the
/// namespace's long-lived thread ([`Netns::run_async`]), one ahead of need: the caller takes
/// the socket made for it last time and queues the next one, so a new connection crosses no
/// thread (one unconnected socket per family and namespace waits in between).
/// It is non-blocking and has `TCP_NODELAY` and keepalive already ([`tune`]), set on that
/// thread too, off the connection's path.
pub async fn marked_socket_in(
    netns: &Netns,
    ipv6: bool,
    keepalive: Duration,
) -> io::Result<Socket> {
    let slot = usize::from(ipv6);
    let socket = match netns.take_ahead(slot) {
        Some(fd) => Socket::from(fd),
        None => {
            netns
                .run_async(move || marked_socket(ipv6, keepalive))
                .await??
        }
    };
    netns.make_ahead(slot, move || {
        marked_socket(ipv6, keepalive).map(OwnedFd::from)
    });
    Ok(socket)
}

/// A TCP socket of the calling thread's namespace, with the mesh mark, tuned, and
/// non-blocking from `socket(2)` on (no `fcntl(2)` pair on the connection's path).
fn marked_socket(ipv6: bool, keepalive: Duration) -> io::Result<Socket> {
    let domain = if ipv6 { Domain::IPV6 } else { Domain::IPV4 };
    let socket = Socket::new(domain, Type::STREAM.nonblocking(), Some(Protocol::TCP))?;
    socket
        .set_mark(MESH_MARK)
        .map_err(|err| context(err, "set SO_MARK (needs CAP_NET_ADMIN)"))?;
    tune(socket2::SockRef::from(&socket), keepalive);
    Ok(socket)
}

/// The options of every proxied TCP socket, accepted or connected: `TCP_NODELAY` (the proxy
/// forwards small writes as they come: Nagle would hold a request's bytes, or an HTTP/2 frame,
/// until the peer acknowledged the previous ones) and keepalive probes after `keepalive` idle
/// (none if zero), then 3 probes 1/3 of it apart, so a peer that vanished is noticed. Set on a
/// listener, they are inherited by every connection it accepts; set on a socket before it
/// connects, they hold once it has.
pub fn tune(socket: socket2::SockRef<'_>, keepalive: Duration) {
    let _ = socket.set_tcp_nodelay(true);
    if !keepalive.is_zero() {
        let probes = socket2::TcpKeepalive::new()
            .with_time(keepalive)
            .with_interval((keepalive / 3).max(Duration::from_secs(1)))
            .with_retries(3);
        let _ = socket.set_tcp_keepalive(&probes);
    }
}

/// Congestion controls for the proxy's legs that never leave the node, in order of preference;
/// neither paces. `reno` is built into every kernel.
pub const NODE_LOCAL_CONGESTION_CONTROL: [&str; 2] = ["cubic", "reno"];

/// Gives `socket`, whose traffic never leaves the node, a congestion control that does not pace
/// ([`NODE_LOCAL_CONGESTION_CONTROL`]); returns its name. Such legs are the pod's connection to
/// its outbound listener (set on the listener, which its accepted sockets inherit) and the
/// proxy's connection to a pod's application.
///
/// A pod's namespace starts with the node's default congestion control, and where that is BBR
/// (which paces), TCP paces each socket itself unless the `fq` qdisc does it, arming a
/// high-resolution timer per burst it holds back. Pacing fits a flow to a network's bottleneck;
/// loopback has none, and on a virtual machine each timer armed is a trap to the hypervisor:
/// on the bench's two-vCPU nodes that was the largest single cost of a bulk transfer. The
/// tunnel between nodes crosses a real network: its algorithm is the operator's
/// (`--tunnel-congestion-control`, by default the namespace's).
///
/// The first algorithm the kernel takes is remembered: later sockets (one per proxied
/// connection) cost one `setsockopt`, not a failed one (and a module load attempted) first.
pub fn unpace(socket: socket2::SockRef<'_>) -> io::Result<&'static str> {
    static CHOSEN: std::sync::OnceLock<&'static str> = std::sync::OnceLock::new();
    if let Some(name) = CHOSEN.get() {
        socket
            .set_tcp_congestion(name.as_bytes())
            .map_err(|err| context(err, "set TCP_CONGESTION"))?;
        return Ok(name);
    }
    let mut last = None;
    for name in NODE_LOCAL_CONGESTION_CONTROL {
        match socket.set_tcp_congestion(name.as_bytes()) {
            Ok(()) => return Ok(CHOSEN.get_or_init(|| name)),
            Err(err) => last = Some(err),
        }
    }
    Err(last.map_or_else(
        || io::Error::other("no congestion control to set"),
        |err| context(err, "set TCP_CONGESTION"),
    ))
}

/// Checks that the kernel can give a socket congestion control `name` (loading its module if
/// need be, as the agent may): a typo in `--tunnel-congestion-control` stops the agent at
/// start, naming what the kernel has, rather than leaving every tunnel on the default.
pub fn check_congestion_control(name: &str) -> io::Result<()> {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    socket.set_tcp_congestion(name.as_bytes()).map_err(|err| {
        let available =
            std::fs::read_to_string("/proc/sys/net/ipv4/tcp_available_congestion_control")
                .unwrap_or_default();
        io::Error::new(
            err.kind(),
            format!(
                "congestion control {name:?}: {err} (this kernel has: {})",
                available.trim()
            ),
        )
    })
}

/// The destination a captured connection was originally addressed to, read with
/// `getsockopt(SO_ORIGINAL_DST)` (`IP6T_SO_ORIGINAL_DST` on IPv6 sockets) from the accepted
/// socket. Answered by meshlet's `cgroup/getsockopt` program, or by conntrack when the
/// connection was captured by iptables: the proxy does not care which.
pub fn original_dst(stream: &TcpStream) -> io::Result<SocketAddr> {
    original_dst_fd(
        std::os::fd::AsFd::as_fd(stream),
        stream.local_addr()?.is_ipv6(),
    )
}

/// [`original_dst`] on a raw descriptor of a socket of the given family.
pub fn original_dst_fd(fd: BorrowedFd<'_>, ipv6: bool) -> io::Result<SocketAddr> {
    if ipv6 {
        // SAFETY: sockaddr_in6 is plain data; all-zero is a valid value.
        let mut addr: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
        getsockopt(fd, libc::SOL_IPV6, &mut addr)?;
        let ip = Ipv6Addr::from(addr.sin6_addr.s6_addr);
        Ok(match ip.to_ipv4_mapped() {
            Some(v4) => SocketAddr::V4(SocketAddrV4::new(v4, u16::from_be(addr.sin6_port))),
            None => SocketAddr::V6(SocketAddrV6::new(ip, u16::from_be(addr.sin6_port), 0, 0)),
        })
    } else {
        // SAFETY: sockaddr_in is plain data; all-zero is a valid value.
        let mut addr: libc::sockaddr_in = unsafe { std::mem::zeroed() };
        getsockopt(fd, libc::SOL_IP, &mut addr)?;
        let ip = Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr));
        Ok(SocketAddr::V4(SocketAddrV4::new(
            ip,
            u16::from_be(addr.sin_port),
        )))
    }
}

fn getsockopt<T>(fd: BorrowedFd<'_>, level: libc::c_int, value: &mut T) -> io::Result<()> {
    let mut len = size_of::<T>() as libc::socklen_t;
    // SAFETY: `value` is valid for writes of `len` bytes and outlives the call; the kernel
    // writes at most `len` bytes and updates `len`.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            SO_ORIGINAL_DST,
            (value as *mut T).cast(),
            &raw mut len,
        )
    };
    if rc != 0 {
        let err = io::Error::last_os_error();
        return Err(context(
            err,
            "getsockopt(SO_ORIGINAL_DST): the connection was not captured",
        ));
    }
    if len as usize != size_of::<T>() {
        return Err(io::Error::other(format!(
            "getsockopt(SO_ORIGINAL_DST) returned {len} bytes"
        )));
    }
    Ok(())
}

fn context(err: io::Error, what: &str) -> io::Error {
    io::Error::new(err.kind(), format!("{what}: {err}"))
}

/// Who listens on TCP `port` in this network namespace: `pid (comm)` of a process holding the
/// listening socket, read from `/proc/net/tcp{,6}` and `/proc/*/fd` (for a bind that failed
/// with "address in use": the error names the holder). `None` if it cannot be told.
pub fn port_holder(port: u16) -> Option<String> {
    let inode = ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .find_map(|table| {
            let text = std::fs::read_to_string(table).ok()?;
            text.lines().skip(1).find_map(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                let local_port = fields.get(1)?.rsplit(':').next()?;
                let listening = fields.get(3)? == &"0A";
                (listening && u16::from_str_radix(local_port, 16).ok()? == port)
                    .then(|| fields.get(9)?.parse::<u64>().ok())
                    .flatten()
            })
        })?;
    let wanted = format!("socket:[{inode}]");
    for process in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = process
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(process.path().join("fd")) else {
            continue;
        };
        let holds = fds.flatten().any(|fd| {
            std::fs::read_link(fd.path()).is_ok_and(|target| target.as_os_str() == wanted.as_str())
        });
        if holds {
            let comm = std::fs::read_to_string(process.path().join("comm")).unwrap_or_default();
            return Some(format!("pid {pid} ({})", comm.trim()));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_accepted_inherit_the_listeners_socket_options() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        tune(socket2::SockRef::from(&listener), Duration::from_secs(180));
        let _client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        let accepted = socket2::SockRef::from(&accepted);
        assert!(accepted.tcp_nodelay().unwrap(), "TCP_NODELAY");
        assert!(accepted.keepalive().unwrap(), "SO_KEEPALIVE");
        assert_eq!(
            accepted.tcp_keepalive_time().unwrap(),
            Duration::from_secs(180)
        );
        assert_eq!(
            accepted.tcp_keepalive_interval().unwrap(),
            Duration::from_secs(60)
        );
        assert_eq!(accepted.tcp_keepalive_retries().unwrap(), 3);
        // The control: a listener left alone hands out sockets without them.
        let plain = TcpListener::bind("127.0.0.1:0").unwrap();
        let _client = TcpStream::connect(plain.local_addr().unwrap()).unwrap();
        let (accepted, _) = plain.accept().unwrap();
        let accepted = socket2::SockRef::from(&accepted);
        assert!(!accepted.tcp_nodelay().unwrap() && !accepted.keepalive().unwrap());
        // A socket tuned before it connects (made ahead) keeps them once connected.
        let early = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).unwrap();
        tune(socket2::SockRef::from(&early), Duration::from_secs(30));
        early.connect(&plain.local_addr().unwrap().into()).unwrap();
        assert!(early.tcp_nodelay().unwrap() && early.keepalive().unwrap());
        assert_eq!(early.tcp_keepalive_time().unwrap(), Duration::from_secs(30));
    }

    #[test]
    fn an_unpaced_socket_has_cubic_where_the_kernel_has_it_else_reno() {
        let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).unwrap();
        let name = unpace(socket2::SockRef::from(&socket)).unwrap();
        let available =
            std::fs::read_to_string("/proc/sys/net/ipv4/tcp_available_congestion_control").unwrap();
        let expected = if available.split_whitespace().any(|a| a == "cubic") {
            "cubic"
        } else {
            "reno"
        };
        assert_eq!(name, expected, "available: {available}");
        let set = socket.tcp_congestion().unwrap();
        assert_eq!(
            String::from_utf8_lossy(&set).trim_end_matches('\0'),
            name,
            "the socket says {set:?}"
        );
    }
}
