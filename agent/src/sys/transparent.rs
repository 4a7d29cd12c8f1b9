//! The application sees its real client: the proxy connects to it from the client's address.
//!
//! The proxy's upstream socket to an application is made in the pod's network namespace with
//! `IP_TRANSPARENT` (`IPV6_TRANSPARENT`), bound to the client's address with a port of
//! [`SOURCE_PORTS`] (kept apart from the ports clients pick themselves), and marked
//! [`TRANSPARENT_MARK`]. Three things in the pod's namespace bring the application's replies
//! back to that socket instead of sending them out to the client's address, without iptables:
//!
//! - `net.ipv4.tcp_fwmark_accept=1` (it covers IPv6 too): the application's accepted socket
//!   takes the mark of the SYN, the transparent socket's;
//! - a policy rule per family, `fwmark 0x53a lookup 15006`, at priority [`RULE_PRIORITY`];
//! - in table [`TABLE`], `local 0.0.0.0/0 dev lo` and `local ::/0 dev lo`: whatever carries the
//!   mark is delivered locally, to the transparent socket.
//!
//! `sk_lookup` would steer the transparent connection itself back to the pod's 15006 listener
//! (it comes from an address that is not the pod's): `sock_ops` records its 4-tuple when it
//! connects (by its mark), and `sk_lookup` lets it through (see `meshlet-ebpf`).
//!
//! [`prepare`] and [`remove`] are idempotent: an agent that restarts prepares again, and an
//! unenrolled pod's namespace is left as it was found (the sysctl back at its default, 0).
//! [`Prepared`] orders them per namespace: a removal that waited for an unenrolled pod's last
//! connection does not undo the namespace's enrollment since.

use std::{
    collections::{HashMap, HashSet},
    fs, io,
    net::SocketAddr,
    ops::RangeInclusive,
    os::unix::fs::MetadataExt as _,
    path::Path,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU32, Ordering},
    },
};

use meshlet_common::TRANSPARENT_MARK;
use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REQUEST, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::{
    AddressFamily, RouteNetlinkMessage,
    route::{
        RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope,
        RouteType,
    },
    rule::{RuleAction, RuleAttribute, RuleMessage},
};
use netlink_sys::{Socket as NetlinkSocket, SocketAddr as NetlinkAddr, protocols::NETLINK_ROUTE};
use socket2::Socket;

use super::Netns;

/// The routing table, in each prepared pod namespace, that delivers marked packets locally.
pub const TABLE: u32 = 15006;
/// The priority of the policy rule that sends marked packets to [`TABLE`] (before `main`,
/// 32766).
pub const RULE_PRIORITY: u32 = 32000;
/// The sysctl that makes an accepted socket take the mark of its SYN (per namespace).
const FWMARK_ACCEPT: &str = "/proc/sys/net/ipv4/tcp_fwmark_accept";
/// The loopback interface's index: 1 in every network namespace.
const LOOPBACK_INDEX: u32 = 1;

/// The namespaces this agent prepared, by inode, each with the enrollment that prepared it
/// last. Preparing and removing hold its lock, so the two never interleave in one namespace.
#[derive(Clone, Debug, Default)]
pub struct Prepared(Arc<Mutex<Enrollments>>);

#[derive(Debug, Default)]
struct Enrollments {
    issued: u64,
    latest: HashMap<u64, u64>,
}

/// One enrollment's preparation of one namespace, to hand back to [`Prepared::remove`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ticket {
    inode: u64,
    enrollment: u64,
}

impl Prepared {
    /// [`prepare`]s `netns` (whose inode is `inode`) for an enrollment.
    pub fn prepare(&self, netns: &Netns, inode: u64) -> io::Result<Ticket> {
        let mut enrollments = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        prepare(netns)?;
        enrollments.issued += 1;
        let enrollment = enrollments.issued;
        enrollments.latest.insert(inode, enrollment);
        Ok(Ticket { inode, enrollment })
    }

    /// [`remove`]s what `ticket`'s enrollment prepared, unless the namespace was prepared again
    /// since (the pod enrolled anew: its routing stays). Returns whether it removed anything.
    /// The caller holds `netns` open until this returns, so its inode names no other namespace.
    pub fn remove(&self, netns: &Netns, ticket: Ticket) -> io::Result<bool> {
        let mut enrollments = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if enrollments.latest.get(&ticket.inode) != Some(&ticket.enrollment) {
            return Ok(false);
        }
        enrollments.latest.remove(&ticket.inode);
        remove(netns)?;
        Ok(true)
    }
}

/// Prepares `netns` for transparent connections: the sysctl, the rules and the routes. IPv6
/// parts are skipped where the namespace has no IPv6.
pub fn prepare(netns: &Netns) -> io::Result<()> {
    netns.run(prepare_here)?
}

/// Removes what [`prepare`] added to `netns`; what is not there is not an error.
pub fn remove(netns: &Netns) -> io::Result<()> {
    netns.run(remove_here)?
}

fn prepare_here() -> io::Result<()> {
    fs::write(FWMARK_ACCEPT, "1").map_err(|err| with_context(err, FWMARK_ACCEPT))?;
    let rtnl = Rtnl::open()?;
    for family in [AddressFamily::Inet, AddressFamily::Inet6] {
        let added = rtnl
            .create(RouteNetlinkMessage::NewRule(rule(family)))
            .and_then(|()| rtnl.create(RouteNetlinkMessage::NewRoute(route(family))));
        match added {
            Ok(()) => {}
            Err(err) if family == AddressFamily::Inet6 && no_ipv6(&err) => {}
            Err(err) => return Err(with_context(err, &format!("{family:?} rule and route"))),
        }
    }
    Ok(())
}

fn remove_here() -> io::Result<()> {
    let rtnl = Rtnl::open()?;
    remove_rules(&rtnl)?;
    remove_routes_and_sysctl(&rtnl)
}

/// Removes meshlet's rules (both families); returns whether there was one.
fn remove_rules(rtnl: &Rtnl) -> io::Result<bool> {
    let mut found = false;
    for family in [AddressFamily::Inet, AddressFamily::Inet6] {
        match rtnl.request(RouteNetlinkMessage::DelRule(rule(family)), 0) {
            Ok(()) => found = true,
            Err(err) if gone(&err) || no_ipv6(&err) => {}
            Err(err) => return Err(with_context(err, &format!("remove the {family:?} rule"))),
        }
    }
    Ok(found)
}

fn remove_routes_and_sysctl(rtnl: &Rtnl) -> io::Result<()> {
    for family in [AddressFamily::Inet, AddressFamily::Inet6] {
        match rtnl.request(RouteNetlinkMessage::DelRoute(route(family)), 0) {
            Ok(()) => {}
            Err(err) if gone(&err) || no_ipv6(&err) => {}
            Err(err) => return Err(with_context(err, &format!("remove the {family:?} route"))),
        }
    }
    fs::write(FWMARK_ACCEPT, "0").map_err(|err| with_context(err, FWMARK_ACCEPT))
}

/// Removes what an agent that is gone left in the namespaces of the pods it captured (`meshlet
/// uninstall`): every network namespace of a process under `proc_root` whose cookie is in
/// `captured` and that holds meshlet's rule. Returns how many it cleaned; a namespace that
/// cannot be reached (its processes exited) is skipped.
pub fn remove_left_behind(proc_root: &Path, captured: &HashSet<u64>) -> io::Result<usize> {
    let mut seen = HashSet::new();
    let mut cleaned = 0;
    for entry in fs::read_dir(proc_root).map_err(|err| with_context(err, "list /proc"))? {
        let Ok(entry) = entry else { continue };
        if !entry
            .file_name()
            .to_str()
            .is_some_and(|name| name.bytes().all(|b| b.is_ascii_digit()))
        {
            continue;
        }
        let path = entry.path().join("ns/net");
        let Ok(inode) = fs::metadata(&path).map(|meta| meta.ino()) else {
            continue;
        };
        if !seen.insert(inode) {
            continue;
        }
        let Ok(netns) = Netns::open(&path) else {
            continue;
        };
        if !netns
            .cookie()
            .is_ok_and(|cookie| captured.contains(&cookie))
        {
            continue;
        }
        let removed = netns.run(|| {
            let rtnl = Rtnl::open()?;
            let ours = remove_rules(&rtnl)?;
            if ours {
                remove_routes_and_sysctl(&rtnl)?;
            }
            Ok::<_, io::Error>(ours)
        });
        match removed.and_then(|removed| removed) {
            Ok(ours) => cleaned += usize::from(ours),
            Err(err) => {
                tracing::warn!(netns = %path.display(), %err, "cannot remove the transparent routing")
            }
        }
    }
    Ok(cleaned)
}

/// `fwmark TRANSPARENT_MARK lookup TABLE`, at [`RULE_PRIORITY`].
fn rule(family: AddressFamily) -> RuleMessage {
    let mut rule = RuleMessage::default();
    rule.header.family = family;
    rule.header.table = RouteHeader::RT_TABLE_UNSPEC;
    rule.header.action = RuleAction::ToTable;
    rule.attributes = vec![
        RuleAttribute::Priority(RULE_PRIORITY),
        RuleAttribute::FwMark(TRANSPARENT_MARK),
        RuleAttribute::FwMask(u32::MAX),
        RuleAttribute::Table(TABLE),
    ];
    rule
}

/// `local 0.0.0.0/0 dev lo table TABLE` (`local ::/0` for IPv6).
fn route(family: AddressFamily) -> RouteMessage {
    let mut route = RouteMessage::default();
    route.header.address_family = family;
    route.header.destination_prefix_length = 0;
    route.header.table = RouteHeader::RT_TABLE_UNSPEC;
    route.header.protocol = RouteProtocol::Static;
    route.header.scope = RouteScope::Host;
    route.header.kind = RouteType::Local;
    let any = if family == AddressFamily::Inet {
        RouteAddress::Inet(std::net::Ipv4Addr::UNSPECIFIED)
    } else {
        RouteAddress::Inet6(std::net::Ipv6Addr::UNSPECIFIED)
    };
    route.attributes = vec![
        RouteAttribute::Table(TABLE),
        RouteAttribute::Destination(any),
        RouteAttribute::Oif(LOOPBACK_INDEX),
    ];
    route
}

/// A route netlink socket of the calling thread's namespace, one request at a time.
struct Rtnl {
    socket: NetlinkSocket,
}

impl Rtnl {
    fn open() -> io::Result<Self> {
        let mut socket = NetlinkSocket::new(NETLINK_ROUTE)?;
        socket.bind_auto()?;
        socket.connect(&NetlinkAddr::new(0, 0))?;
        Ok(Self { socket })
    }

    /// Creates an object; one that is already there is fine.
    fn create(&self, message: RouteNetlinkMessage) -> io::Result<()> {
        match self.request(message, NLM_F_CREATE | NLM_F_EXCL) {
            Err(err) if err.raw_os_error() == Some(libc::EEXIST) => Ok(()),
            other => other,
        }
    }

    /// Sends `message` and waits for the kernel's acknowledgement.
    fn request(&self, message: RouteNetlinkMessage, flags: u16) -> io::Result<()> {
        let mut request = NetlinkMessage::from(message);
        request.header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
        request.header.sequence_number = 1;
        request.finalize();
        let mut buf = vec![0; request.header.length as usize];
        request.serialize(&mut buf);
        self.socket.send(&buf, 0)?;
        let mut reply = Vec::with_capacity(8192);
        self.socket.recv(&mut reply, 0)?;
        let reply = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&reply)
            .map_err(|err| io::Error::other(format!("netlink reply: {err}")))?;
        match reply.payload {
            NetlinkPayload::Error(error) if error.code.is_some() => Err(error.to_io()),
            NetlinkPayload::Error(_) => Ok(()),
            other => Err(io::Error::other(format!(
                "netlink: unexpected reply {}",
                other.message_type()
            ))),
        }
    }
}

/// The ports transparent connections leave from: below the ephemeral ranges clients draw their
/// own ports from (Linux 32768-60999; Windows, macOS and IANA 49152-65535). In the pod's
/// namespace the proxy's connection `client:port -> pod:port` must not have the 4-tuple of a
/// connection the client itself has open to that pod port (the one the proxy accepted on
/// 15006): its SYN would land on that established socket, and the exchange that follows resets
/// the client's connection. The kernel only keeps 4-tuples unique per direction, so the ports
/// are kept apart instead.
pub const SOURCE_PORTS: RangeInclusive<u16> = 16384..=32767;

/// How many ports [`Proxy::connect_in`](crate::proxy::Proxy::connect_in) tries for one
/// transparent connection before it gives up (each taken one is rare: the next is far away).
pub const PORT_TRIES: usize = 8;

/// A port of [`SOURCE_PORTS`] other than `avoid` (the client's own), a different one at each
/// call, spread over the range (a Weyl sequence: consecutive calls land far apart, and every
/// port comes round).
pub fn source_port(avoid: u16) -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let span = u32::from(SOURCE_PORTS.end() - SOURCE_PORTS.start()) + 1;
    loop {
        // 10007 is prime, so coprime with the span: the sequence visits every port.
        let n = NEXT.fetch_add(10_007, Ordering::Relaxed) % span;
        let port = SOURCE_PORTS.start() + u16::try_from(n).expect("below the span");
        if port != avoid {
            return port;
        }
    }
}

/// Whether `err`, from binding or connecting a transparent socket, says its port is taken
/// (towards that destination): another port may do.
pub fn port_taken(err: &io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(libc::EADDRINUSE | libc::EADDRNOTAVAIL)
    )
}

/// Turns the proxy's socket `socket` (made in the pod's namespace, not yet connected) into a
/// transparent one bound to `source` (the client's address and a port of [`SOURCE_PORTS`]).
/// Several connections to different destinations share a port (`SO_REUSEADDR`); connect then
/// fails with `EADDRNOTAVAIL` if the 4-tuple is taken ([`port_taken`]).
pub fn make_transparent(socket: &Socket, source: SocketAddr) -> io::Result<()> {
    socket.set_mark(TRANSPARENT_MARK)?;
    if source.is_ipv6() {
        socket.set_ip_transparent_v6(true)?;
    } else {
        socket.set_ip_transparent_v4(true)?;
    }
    socket.set_reuse_address(true)?;
    socket.bind(&source.into())
}

fn gone(err: &io::Error) -> bool {
    matches!(err.raw_os_error(), Some(libc::ENOENT | libc::ESRCH))
}

fn no_ipv6(err: &io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(libc::EAFNOSUPPORT | libc::EOPNOTSUPP)
    )
}

fn with_context(err: io::Error, what: &str) -> io::Error {
    io::Error::new(err.kind(), format!("{what}: {err}"))
}
