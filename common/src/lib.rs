//! Types and constants shared by the eBPF programs (`meshlet-ebpf`) and the agent.
//!
//! Everything here is `#[repr(C)]` plain data or a constant: the layout of every map key and
//! value is the contract between kernel and userspace, so it lives in one place and carries no
//! logic beyond constructors. With the `user` feature the types implement `aya::Pod`.
//!
//! Addresses are kept as four `u32` words holding the bytes of an IPv6 address in network
//! order, exactly like `bpf_sock_addr::user_ip6`; IPv4 addresses use the v4-mapped form
//! `::ffff:a.b.c.d`, so one key type serves both families.
#![no_std]

/// Mark carried by every socket the proxy creates (`SO_MARK`); capture never redirects them.
pub const MESH_MARK: u32 = 0x539;

/// Mark of the proxy's connections to an application from its client's address (transparent
/// sockets): the application's accepted socket inherits it (`tcp_fwmark_accept`), and a policy
/// rule in the pod's namespace routes what carries it back to the proxy.
pub const TRANSPARENT_MARK: u32 = 0x53a;

/// In-pod outbound capture listener (loopback).
pub const OUTBOUND_PORT: u16 = 15001;
/// In-pod inbound plaintext capture listener.
pub const INBOUND_PLAINTEXT_PORT: u16 = 15006;
/// In-pod inbound HBONE listener.
pub const INBOUND_HBONE_PORT: u16 = 15008;

/// `SO_ORIGINAL_DST` (level `SOL_IP`) and `IP6T_SO_ORIGINAL_DST` (level `SOL_IPV6`).
pub const SO_ORIGINAL_DST: i32 = 80;

/// Capacity of the per-netns maps: the most network namespaces one node can enroll.
pub const MAX_NETNS: u32 = 16_384;
/// Capacity of the per-connection maps (LRU: the oldest entries make room).
pub const MAX_CONNECTIONS: u32 = 65_536;
/// Capacity of the exclusion maps.
pub const MAX_EXCLUSIONS: u32 = 1_024;

/// Names of the maps, as the agent looks them up and pins them.
pub mod maps {
    /// `HashMap<u64 netns cookie, Enrollment>`: the network namespaces whose traffic is captured.
    pub const ENROLLED: &str = "ENROLLED";
    /// `LruHashMap<u64 socket cookie, SockAddr>`: original destination of a redirected socket.
    pub const ORIG_BY_SOCKET: &str = "ORIG_BY_SOCKET";
    /// `LruHashMap<ConnKey, SockAddr>`: original destination by the client end of the
    /// redirected connection, as the proxy's accepted socket sees its peer.
    pub const ORIG_BY_PEER: &str = "ORIG_BY_PEER";
    /// `SockHash<Ip>`: the inbound plaintext listener (15006) of each enrolled pod address.
    pub const INBOUND_LISTENERS: &str = "INBOUND_LISTENERS";
    /// `LruHashMap<ProbeKey, u8>`: the open connections kubelet made (its health probes), by
    /// 4-tuple, from connect until close; inbound connections that match one are not steered.
    pub const KUBELET_PROBES: &str = "KUBELET_PROBES";
    /// `LpmTrie<Ip, u8>`: destinations never redirected.
    pub const EXCLUDED_CIDRS: &str = "EXCLUDED_CIDRS";
    /// `HashMap<u16 port, u8>`: ports never redirected, in either direction.
    pub const EXCLUDED_PORTS: &str = "EXCLUDED_PORTS";
    /// `Array<u32>`: index [`SETTING_FAIL_OPEN`](crate::SETTING_FAIL_OPEN) non-zero means
    /// fail open (a namespace whose proxy is not ready is not captured).
    pub const SETTINGS: &str = "SETTINGS";
    /// `PerCpuArray<u64>`: redirected connections, indexed by [`Direction`](crate::Direction).
    pub const REDIRECTS: &str = "REDIRECTS";
    /// `PerCpuArray<u64>`, one slot: inbound connections let through unsteered because they
    /// were kubelet's (a map of its own, so the pinned `REDIRECTS` of an older agent fits).
    pub const PROBES_PASSED: &str = "PROBES_PASSED";
    /// `LruHashMap<ProbeKey, u8>`: the proxy's transparent connections to applications (from
    /// the client's address), by 4-tuple, from connect until close; `sk_lookup` lets them
    /// through to the application instead of steering them back to 15006.
    pub const TRANSPARENT_UPSTREAMS: &str = "TRANSPARENT_UPSTREAMS";
    /// aya-log's `RingBuf`: the programs' rare events, read by the agent
    /// (`capture::events`). Pinned like the others, so that programs adopted from an earlier
    /// agent report to the running one.
    pub const AYA_LOGS: &str = "AYA_LOGS";

    /// Every map, for pinning and cleanup.
    pub const ALL: &[&str] = &[
        ENROLLED,
        ORIG_BY_SOCKET,
        ORIG_BY_PEER,
        INBOUND_LISTENERS,
        KUBELET_PROBES,
        EXCLUDED_CIDRS,
        EXCLUDED_PORTS,
        SETTINGS,
        REDIRECTS,
        PROBES_PASSED,
        TRANSPARENT_UPSTREAMS,
        AYA_LOGS,
    ];
}

/// Names of the programs (their function names in `meshlet-ebpf`).
pub mod programs {
    /// `cgroup/connect4`: outbound IPv4 redirection.
    pub const CONNECT4: &str = "meshlet_connect4";
    /// `cgroup/connect6`: outbound IPv6 (and v4-mapped) redirection.
    pub const CONNECT6: &str = "meshlet_connect6";
    /// `cgroup/getpeername4`: the original destination for the application.
    pub const GETPEERNAME4: &str = "meshlet_getpeername4";
    /// `cgroup/getpeername6`.
    pub const GETPEERNAME6: &str = "meshlet_getpeername6";
    /// `sockops`: records a redirected connection's client end once it is established.
    pub const SOCK_OPS: &str = "meshlet_sock_ops";
    /// `cgroup/getsockopt`: answers `SO_ORIGINAL_DST` for the proxy.
    pub const GETSOCKOPT: &str = "meshlet_getsockopt";
    /// `sk_lookup`, one attachment per enrolled network namespace: inbound steering.
    pub const SK_LOOKUP: &str = "meshlet_sk_lookup";
    /// `sockops`, attached to kubelet's cgroup only: records kubelet's connections (its
    /// probes) in [`KUBELET_PROBES`](crate::maps::KUBELET_PROBES) from connect until close.
    pub const PROBE_OPS: &str = "meshlet_probe_ops";
}

/// An IPv6 address (IPv4 as `::ffff:a.b.c.d`), four words of network-order bytes.
pub type Ip = [u32; 4];

/// The third word of a v4-mapped address (`00 00 ff ff`) read as a little-endian `u32`.
pub const V4_MAPPED_WORD: u32 = u32::from_le_bytes([0, 0, 0xff, 0xff]);

/// `ip4` (network-order bytes read as a native `u32`, like `bpf_sock_addr::user_ip4`) in
/// v4-mapped form.
#[inline(always)]
pub const fn v4_mapped(ip4: u32) -> Ip {
    [0, 0, V4_MAPPED_WORD, ip4]
}

/// Whether `ip` is a v4-mapped IPv4 address.
#[inline(always)]
pub const fn is_v4_mapped(ip: &Ip) -> bool {
    ip[0] == 0 && ip[1] == 0 && ip[2] == V4_MAPPED_WORD
}

/// Per-namespace enrollment state (value of [`maps::ENROLLED`]).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Enrollment {
    /// [`Enrollment::READY`] and friends.
    pub flags: u32,
    /// Padding; zero.
    pub _pad: u32,
    /// The pod's IPv4 address (v4-mapped), or zeros.
    pub ipv4: Ip,
    /// The pod's IPv6 address, or zeros.
    pub ipv6: Ip,
}

impl Enrollment {
    /// The pod's proxy listeners are up: in fail-open mode only ready namespaces are redirected.
    pub const READY: u32 = 1;
}

/// An address and port (value of [`maps::ORIG_BY_SOCKET`] and [`maps::ORIG_BY_PEER`]).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SockAddr {
    /// The address.
    pub ip: Ip,
    /// The port, network byte order.
    pub port_be: u16,
    /// Padding; zero.
    pub _pad: u16,
}

/// One end of a connection inside a network namespace (key of [`maps::ORIG_BY_PEER`]).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnKey {
    /// The namespace's cookie.
    pub netns_cookie: u64,
    /// The address.
    pub ip: Ip,
    /// The port, host byte order.
    pub port: u16,
    /// Padding; zero.
    pub _pad: [u8; 6],
}

/// A TCP connection by its 4-tuple, as kubelet's end saw it when it connected (key of
/// [`maps::KUBELET_PROBES`]): the source is kubelet's end, the destination the pod's.
///
/// 36 bytes, no padding: every byte of a hash key is compared.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeKey {
    /// The source address (kubelet's end).
    pub src_ip: Ip,
    /// The destination address (the pod's).
    pub dst_ip: Ip,
    /// The source port, host byte order.
    pub src_port: u16,
    /// The destination port, host byte order.
    pub dst_port: u16,
}

const _: () = assert!(size_of::<ProbeKey>() == 36, "ProbeKey has padding");

/// Index in [`maps::SETTINGS`] of the fail-open switch.
pub const SETTING_FAIL_OPEN: u32 = 0;

/// Index into [`maps::REDIRECTS`].
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Connects from an enrolled pod redirected to its 15001 listener.
    Outbound = 0,
    /// Connections to an enrolled pod steered to its 15006 listener.
    Inbound = 1,
}

#[cfg(feature = "user")]
#[allow(unsafe_code, reason = "aya::Pod is an unsafe marker trait")]
mod pod {
    // SAFETY: each type is `#[repr(C)]`, `Copy`, made only of integers, with explicit padding
    // fields, so every bit pattern is valid and there are no implicit padding bytes.
    unsafe impl aya::Pod for super::Enrollment {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SockAddr {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ConnKey {}
    // SAFETY: as above (two `Ip`s and two `u16`s: no padding at all).
    unsafe impl aya::Pod for super::ProbeKey {}
}
