//! meshlet's eBPF programs: capture without iptables.
//!
//! Built with nightly for `bpfel-unknown-none` and linked by `bpf-linker`; the agent embeds the
//! object (see `agent/build.rs`) and loads it with aya. Map layouts and names come from
//! `meshlet-common`, the only contract between this crate and the agent.
//!
//! Outbound, for sockets of enrolled network namespaces (cgroup programs at the cgroup root):
//! `connect4/6` rewrite a TCP connect to the in-pod listener `127.0.0.1:15001` (`[::1]:15001`)
//! and remember the original destination by socket cookie; `sock_ops` re-keys it by the
//! client end of the established connection; `getsockopt` answers `SO_ORIGINAL_DST` on the
//! proxy's accepted socket from that record; `getpeername4/6` show the application the original.
//!
//! Inbound (`sk_lookup`, attached to each enrolled namespace): TCP connections to a pod address
//! on any port but 15008 are handed to the pod's 15006 listener, whose accepted socket keeps the
//! original destination as its local address. The proxy's own connections to the application
//! from the client's address (transparent sockets, `TRANSPARENT_MARK`) are recorded by
//! `sock_ops` when they connect and let through.
//!
//! Kubelet's health probes (`probe_ops`, a `sock_ops` program attached to kubelet's cgroup only):
//! each connection kubelet opens is recorded by 4-tuple from connect until close, and
//! `sk_lookup` lets exactly those through to the application. Nothing is exempt for coming from
//! a node address: hostNetwork pods and SNATed traffic are captured like any other client.
//!
//! Rare events go to the agent's log through aya-log (`AYA_LOGS`, pinned with the other maps so
//! that programs adopted from an earlier agent report to the running one): a record that could
//! not be inserted, a socket of an unexpected family, an inbound connection refused because its
//! pod has no listener. Nothing is logged for a connection that goes as it should.
#![no_std]
#![no_main]

use core::ptr::{read_volatile, write_volatile};

use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_TCP_CLOSE, sk_action,
    },
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::{cgroup_sock_addr, cgroup_sockopt, map, sk_lookup, sock_ops},
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, SockHash, lpm_trie::Key},
    programs::{SkLookupContext, SockAddrContext, SockOpsContext, SockoptContext},
};
use aya_log_ebpf::warn;
use meshlet_common::{
    ConnKey, Direction, Enrollment, INBOUND_HBONE_PORT, Ip, MAX_CONNECTIONS, MAX_EXCLUSIONS,
    MAX_NETNS, MESH_MARK, OUTBOUND_PORT, ProbeKey, SO_ORIGINAL_DST, SockAddr, TRANSPARENT_MARK,
    is_v4_mapped, v4_mapped,
};

#[map]
static ENROLLED: HashMap<u64, Enrollment> = HashMap::with_max_entries(MAX_NETNS, 0);
#[map]
static ORIG_BY_SOCKET: LruHashMap<u64, SockAddr> = LruHashMap::with_max_entries(MAX_CONNECTIONS, 0);
#[map]
static ORIG_BY_PEER: LruHashMap<ConnKey, SockAddr> =
    LruHashMap::with_max_entries(MAX_CONNECTIONS, 0);
#[map]
static INBOUND_LISTENERS: SockHash<Ip> = SockHash::with_max_entries(2 * MAX_NETNS, 0);
#[map]
static KUBELET_PROBES: LruHashMap<ProbeKey, u8> = LruHashMap::with_max_entries(MAX_CONNECTIONS, 0);
#[map]
static EXCLUDED_CIDRS: LpmTrie<Ip, u8> = LpmTrie::with_max_entries(MAX_EXCLUSIONS, 0);
#[map]
static EXCLUDED_PORTS: HashMap<u16, u8> = HashMap::with_max_entries(MAX_EXCLUSIONS, 0);
#[map]
static SETTINGS: Array<u32> = Array::with_max_entries(1, 0);
#[map]
static REDIRECTS: PerCpuArray<u64> = PerCpuArray::with_max_entries(2, 0);
#[map]
static PROBES_PASSED: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);
#[map]
static TRANSPARENT_UPSTREAMS: LruHashMap<ProbeKey, u8> =
    LruHashMap::with_max_entries(MAX_CONNECTIONS, 0);

const SOCK_STREAM: u32 = 1;
const IPPROTO_TCP: u32 = 6;
const AF_INET: u32 = 2;
const AF_INET6: u16 = 10;
const SOL_IP: i32 = 0;
const SOL_IPV6: i32 = 41;

/// Verdict of a cgroup socket program that lets the call proceed.
const PROCEED: i32 = 1;

/// 127.0.0.1 and ::1, as network-order bytes read as native words.
const LOOPBACK4: u32 = u32::from_ne_bytes([127, 0, 0, 1]);
const LOOPBACK6: Ip = [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])];

/// The upgrade tests' variant build (`--features variant`): the same behaviour in other
/// instructions, so that its programs' kernel tags differ from the real build's.
#[inline(always)]
fn variant_marker() {
    #[cfg(feature = "variant")]
    // SAFETY: bpf_ktime_get_ns takes no argument and changes nothing.
    unsafe {
        aya_ebpf::helpers::bpf_ktime_get_ns();
    }
}

/// `cgroup/connect4`: redirects TCP connects of enrolled namespaces to 127.0.0.1:15001.
#[cgroup_sock_addr(connect4)]
pub fn meshlet_connect4(ctx: SockAddrContext) -> i32 {
    variant_marker();
    let sa = ctx.sock_addr;
    // SAFETY: the kernel hands the program a valid `bpf_sock_addr` for its whole run, and
    // `user_ip4`/`user_port` are writable in connect4.
    unsafe {
        let dst = v4_mapped((*sa).user_ip4);
        if (*sa).type_ == SOCK_STREAM && redirect(&ctx, &dst, (*sa).user_port as u16) {
            (*sa).user_ip4 = LOOPBACK4;
            (*sa).user_port = u32::from(OUTBOUND_PORT.to_be());
        }
    }
    PROCEED
}

/// `cgroup/connect6`: the same for IPv6 sockets: v4-mapped destinations go to
/// `::ffff:127.0.0.1:15001`, IPv6 ones to `[::1]:15001`.
#[cgroup_sock_addr(connect6)]
pub fn meshlet_connect6(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: as in connect4; `user_ip6` words are writable in connect6.
    unsafe {
        let dst = read_ip6(&(*sa).user_ip6);
        if (*sa).type_ == SOCK_STREAM && redirect(&ctx, &dst, (*sa).user_port as u16) {
            let to = if is_v4_mapped(&dst) {
                v4_mapped(LOOPBACK4)
            } else {
                LOOPBACK6
            };
            (*sa).user_ip6[0] = to[0];
            (*sa).user_ip6[1] = to[1];
            (*sa).user_ip6[2] = to[2];
            (*sa).user_ip6[3] = to[3];
            (*sa).user_port = u32::from(OUTBOUND_PORT.to_be());
        }
    }
    PROCEED
}

/// Decides whether a TCP connect to `dst:port_be` is redirected, and if so records the
/// original destination and counts it.
#[inline(always)]
fn redirect(ctx: &SockAddrContext, dst: &Ip, port_be: u16) -> bool {
    // SAFETY: `sk` of a sock_addr context is a valid, non-null socket.
    let mark = unsafe { (*(*ctx.sock_addr).__bindgen_anon_1.sk).mark };
    if mark == MESH_MARK || is_loopback(dst) {
        return false;
    }
    // SAFETY: `bpf_get_netns_cookie` accepts a sock_addr context (Linux >= 5.7).
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let Some(enrollment) = ENROLLED.get_ptr(netns) else {
        return false;
    };
    // SAFETY: a non-null pointer from a map lookup is valid for the value's size.
    let enrollment = unsafe { &*enrollment };
    if fail_open() && enrollment.flags & Enrollment::READY == 0 {
        return false;
    }
    if *dst == enrollment.ipv4 || *dst == enrollment.ipv6 || excluded(dst, u16::from_be(port_be)) {
        return false;
    }
    // SAFETY: `bpf_get_socket_cookie` accepts a sock_addr context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let orig = SockAddr {
        ip: *dst,
        port_be,
        _pad: 0,
    };
    if ORIG_BY_SOCKET.insert(cookie, orig, 0).is_err() {
        // Without a record the proxy could not learn the destination: leave the connect alone.
        warn!(
            ctx,
            "ORIG_BY_SOCKET: insert failed (map full?); a connect of netns {} is not captured",
            netns
        );
        return false;
    }
    count(Direction::Outbound);
    true
}

/// `cgroup/getpeername4`: a redirected socket's peer is its original destination.
#[cgroup_sock_addr(getpeername4)]
pub fn meshlet_getpeername4(ctx: SockAddrContext) -> i32 {
    if let Some(orig) = original_of(&ctx)
        && is_v4_mapped(&orig.ip)
    {
        // SAFETY: `user_ip4`/`user_port` are writable in getpeername4.
        unsafe {
            (*ctx.sock_addr).user_ip4 = orig.ip[3];
            (*ctx.sock_addr).user_port = u32::from(orig.port_be);
        }
    }
    PROCEED
}

/// `cgroup/getpeername6`.
#[cgroup_sock_addr(getpeername6)]
pub fn meshlet_getpeername6(ctx: SockAddrContext) -> i32 {
    if let Some(orig) = original_of(&ctx) {
        // SAFETY: `user_ip6` words and `user_port` are writable in getpeername6.
        unsafe {
            let sa = ctx.sock_addr;
            (*sa).user_ip6[0] = orig.ip[0];
            (*sa).user_ip6[1] = orig.ip[1];
            (*sa).user_ip6[2] = orig.ip[2];
            (*sa).user_ip6[3] = orig.ip[3];
            (*sa).user_port = u32::from(orig.port_be);
        }
    }
    PROCEED
}

#[inline(always)]
fn original_of(ctx: &SockAddrContext) -> Option<SockAddr> {
    // SAFETY: `bpf_get_socket_cookie` accepts a sock_addr context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: a non-null pointer from a map lookup is valid for the value's size.
    ORIG_BY_SOCKET.get_ptr(cookie).map(|orig| unsafe { *orig })
}

/// `sockops`: when a redirected connect has been established (to the proxy), records the
/// original destination under the client end (netns, local address, local port): the peer the
/// proxy sees on its accepted socket.
///
/// It also records the proxy's transparent connections to applications (their mark) by 4-tuple
/// from connect until close, in `TRANSPARENT_UPSTREAMS`, so that `sk_lookup` lets them through.
#[sock_ops]
pub fn meshlet_sock_ops(ctx: SockOpsContext) -> u32 {
    let op = ctx.op();
    if op == BPF_SOCK_OPS_TCP_CONNECT_CB {
        // SAFETY: on connect `sk` is the full socket (or null, checked); `mark` is readable in
        // `bpf_sock`.
        let transparent = unsafe {
            let sk = (*ctx.ops).__bindgen_anon_2.sk;
            !sk.is_null() && (*sk).mark == TRANSPARENT_MARK
        };
        if transparent {
            remember_until_close(&ctx, &TRANSPARENT_UPSTREAMS, "TRANSPARENT_UPSTREAMS");
        }
        return 1;
    }
    if op == BPF_SOCK_OPS_STATE_CB {
        forget_when_closed(&ctx, &TRANSPARENT_UPSTREAMS);
        return 1;
    }
    if op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
        return 1;
    }
    // SAFETY: `bpf_get_socket_cookie` accepts a sock_ops context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(orig) = ORIG_BY_SOCKET.get_ptr(cookie) else {
        return 1;
    };
    // SAFETY: the kernel hands the program a valid `bpf_sock_ops`; each field is read with the
    // access size the kernel allows.
    let (ip, port) = unsafe {
        let ops = ctx.ops;
        let port = read_volatile(&raw const (*ops).local_port) as u16;
        let family = read_volatile(&raw const (*ops).family);
        let ip = pick(
            family,
            read_volatile(&raw const (*ops).local_ip4),
            &(*ops).local_ip6,
        );
        (ip, port)
    };
    // SAFETY: `bpf_get_netns_cookie` accepts a sock_ops context (Linux >= 5.15).
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let key = ConnKey {
        netns_cookie,
        ip,
        port,
        _pad: [0; 6],
    };
    // SAFETY: a non-null pointer from a map lookup is valid for the value's size.
    if ORIG_BY_PEER.insert(key, unsafe { *orig }, 0).is_err() {
        warn!(
            &ctx,
            "ORIG_BY_PEER: insert failed (map full?); the proxy cannot learn the destination of \
             a connection from port {} of netns {}",
            port,
            netns_cookie
        );
    }
    1
}

/// Records a connecting socket's 4-tuple in `map` and asks for the TCP state callback on it, to
/// see it close ([`forget_when_closed`]). If the callback cannot be had (the socket is not a
/// full one, never the case on connect), the entry ages out of the LRU instead.
#[inline(always)]
fn remember_until_close(ctx: &SockOpsContext, map: &LruHashMap<ProbeKey, u8>, name: &str) {
    if map.insert(probe_key(ctx), 1, 0).is_ok() {
        let _ = ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG as i32);
    } else {
        warn!(ctx, "{}: insert failed (map full?)", name);
    }
}

/// On a TCP state callback: forgets the socket's 4-tuple in `map` once it reaches `TCP_CLOSE`.
#[inline(always)]
fn forget_when_closed(ctx: &SockOpsContext, map: &LruHashMap<ProbeKey, u8>) {
    // SAFETY: the context is valid for the program's run and `args` is readable in sock_ops
    // with 4-byte loads; on STATE_CB, `args[0]` is the old state and `args[1]` the new one.
    let new_state = unsafe { read_volatile(&raw const (*ctx.ops).__bindgen_anon_1.args[1]) };
    if new_state == BPF_TCP_CLOSE {
        let _ = map.remove(probe_key(ctx));
    }
}

/// `sockops`, attached to kubelet's cgroup only: records each TCP connection kubelet opens (its
/// HTTP, TCP and gRPC probes among them) by 4-tuple when it sends its SYN, and forgets it when the
/// connection reaches `TCP_CLOSE`, so the 4-tuple stops being exempt the moment kubelet is done
/// with it. (Named unlike its section: a function called `sockops` fails in bpf-linker.)
#[sock_ops]
pub fn meshlet_probe_ops(ctx: SockOpsContext) -> u32 {
    let op = ctx.op();
    if op == BPF_SOCK_OPS_TCP_CONNECT_CB {
        remember_until_close(&ctx, &KUBELET_PROBES, "KUBELET_PROBES");
    } else if op == BPF_SOCK_OPS_STATE_CB {
        forget_when_closed(&ctx, &KUBELET_PROBES);
    }
    1
}

/// The 4-tuple of a sock_ops socket, the connecting end as the source. The kernel's TCP state
/// callback runs before the socket gives up its addresses and port, so close sees the same key
/// connect recorded.
#[inline(always)]
fn probe_key(ctx: &SockOpsContext) -> ProbeKey {
    // SAFETY: the kernel hands the program a valid `bpf_sock_ops`; each field is read with the
    // access size the kernel allows (4 bytes).
    unsafe {
        let ops = ctx.ops;
        let family = read_volatile(&raw const (*ops).family);
        ProbeKey {
            src_ip: pick(
                family,
                read_volatile(&raw const (*ops).local_ip4),
                &(*ops).local_ip6,
            ),
            dst_ip: pick(
                family,
                read_volatile(&raw const (*ops).remote_ip4),
                &(*ops).remote_ip6,
            ),
            // `local_port` is in host order; `remote_port` is a network-order word whose value
            // is the port (the kernel shifts the `__be16` into the high half), so `ntohl`.
            src_port: read_volatile(&raw const (*ops).local_port) as u16,
            dst_port: u32::from_be(read_volatile(&raw const (*ops).remote_port)) as u16,
        }
    }
}

/// `cgroup/getsockopt`: answers `SO_ORIGINAL_DST` (`SOL_IP`) and `IP6T_SO_ORIGINAL_DST`
/// (`SOL_IPV6`) on the proxy's accepted socket from the record `sock_ops` made.
#[cgroup_sockopt(getsockopt)]
pub fn meshlet_getsockopt(ctx: SockoptContext) -> i32 {
    let so = ctx.sockopt;
    // SAFETY: the kernel hands the program a valid `bpf_sockopt`; `sk` is checked for null,
    // and every store to `optval` is bounds-checked against `optval_end` first.
    unsafe {
        let (level, optname) = ((*so).level, (*so).optname);
        if optname != SO_ORIGINAL_DST || (level != SOL_IP && level != SOL_IPV6) {
            return PROCEED;
        }
        let sk = (*so).__bindgen_anon_1.sk;
        if sk.is_null() {
            return PROCEED;
        }
        let family = read_volatile(&raw const (*sk).family);
        let ip = pick(
            family,
            read_volatile(&raw const (*sk).dst_ip4),
            &(*sk).dst_ip6,
        );
        let key = ConnKey {
            netns_cookie: bpf_get_netns_cookie(ctx.as_ptr()),
            ip,
            port: u16::from_be((*sk).dst_port),
            _pad: [0; 6],
        };
        let Some(orig) = ORIG_BY_PEER.get_ptr(key) else {
            return PROCEED;
        };
        let orig = *orig;
        let optval = (*so).__bindgen_anon_2.optval as *mut u8;
        let end = (*so).__bindgen_anon_3.optval_end as *mut u8;
        let len: i32 = if level == SOL_IP {
            if !is_v4_mapped(&orig.ip) || optval.wrapping_add(16) > end {
                return PROCEED;
            }
            // struct sockaddr_in { family, port, addr, zero[8] }
            *(optval as *mut u16) = AF_INET as u16;
            *(optval.wrapping_add(2) as *mut u16) = orig.port_be;
            *(optval.wrapping_add(4) as *mut u32) = orig.ip[3];
            *(optval.wrapping_add(8) as *mut u64) = 0;
            16
        } else {
            if optval.wrapping_add(28) > end {
                return PROCEED;
            }
            // struct sockaddr_in6 { family, port, flowinfo, addr[16], scope_id }
            *(optval as *mut u16) = AF_INET6;
            *(optval.wrapping_add(2) as *mut u16) = orig.port_be;
            *(optval.wrapping_add(4) as *mut u32) = 0;
            *(optval.wrapping_add(8) as *mut u32) = orig.ip[0];
            *(optval.wrapping_add(12) as *mut u32) = orig.ip[1];
            *(optval.wrapping_add(16) as *mut u32) = orig.ip[2];
            *(optval.wrapping_add(20) as *mut u32) = orig.ip[3];
            *(optval.wrapping_add(24) as *mut u32) = 0;
            28
        };
        // Two separate 4-byte stores: a merged 8-byte store is an invalid context access.
        write_volatile(&raw mut (*so).optlen, len);
        write_volatile(&raw mut (*so).retval, 0);
    }
    PROCEED
}

/// `sk_lookup`, attached to each enrolled namespace: steers inbound TCP to the pod's 15006
/// listener, except to 15008 (HBONE), loopback, the pod's own connections (the proxy reaching
/// the application from the pod's address), the proxy's transparent connections (reaching it
/// from the client's address: `TRANSPARENT_UPSTREAMS`), excluded ports, and connections kubelet
/// opened (its probes: the 4-tuple is
/// in `KUBELET_PROBES`, recorded by `probe_ops` in kubelet's cgroup).
#[sk_lookup]
pub fn meshlet_sk_lookup(ctx: SkLookupContext) -> u32 {
    variant_marker();
    let l = ctx.lookup;
    // SAFETY: the kernel hands the program a valid `bpf_sk_lookup` for its whole run.
    let (protocol, family, port) = unsafe { ((*l).protocol, (*l).family, (*l).local_port) };
    if protocol != IPPROTO_TCP || port == u32::from(INBOUND_HBONE_PORT) {
        return sk_action::SK_PASS;
    }
    if family != AF_INET && family != u32::from(AF_INET6) {
        warn!(
            &ctx,
            "sk_lookup: unexpected socket family {}; let through", family
        );
        return sk_action::SK_PASS;
    }
    // SAFETY: as above; each address field is read with the access size the kernel allows;
    // `remote_port` is a network-order `__be16` (a 2-byte load is allowed since Linux 5.9).
    let (local, remote, remote_port) = unsafe {
        (
            pick(
                family,
                read_volatile(&raw const (*l).local_ip4),
                &(*l).local_ip6,
            ),
            pick(
                family,
                read_volatile(&raw const (*l).remote_ip4),
                &(*l).remote_ip6,
            ),
            u16::from_be(read_volatile(&raw const (*l).remote_port)),
        )
    };
    if is_loopback(&local) || local == remote || EXCLUDED_PORTS.get_ptr(port as u16).is_some() {
        return sk_action::SK_PASS;
    }
    let probe = ProbeKey {
        src_ip: remote,
        dst_ip: local,
        src_port: remote_port,
        // `local_port` is in host order.
        dst_port: port as u16,
    };
    if TRANSPARENT_UPSTREAMS.get_ptr(probe).is_some() {
        // The proxy reaching the application from the client's address.
        return sk_action::SK_PASS;
    }
    if KUBELET_PROBES.get_ptr(probe).is_some() {
        if let Some(counter) = PROBES_PASSED.get_ptr_mut(0) {
            // SAFETY: per-CPU values are only touched by this CPU while the program runs.
            unsafe { *counter += 1 };
        }
        return sk_action::SK_PASS;
    }
    match INBOUND_LISTENERS.redirect_sk_lookup(&ctx, local, 0) {
        Ok(()) => {
            count(Direction::Inbound);
            sk_action::SK_PASS
        }
        // No listener: the proxy is not (or no longer) up in this namespace.
        Err(_) if fail_open() => {
            let ip = ip_bytes(&local);
            warn!(
                &ctx,
                "sk_lookup: no listener for [{:i}]:{}; let through (fail open)", ip, port
            );
            sk_action::SK_PASS
        }
        Err(_) => {
            let ip = ip_bytes(&local);
            warn!(
                &ctx,
                "sk_lookup: no listener for [{:i}]:{}; dropped (fail closed)", ip, port
            );
            sk_action::SK_DROP
        }
    }
}

/// An address as its 16 bytes in network order (v4-mapped for IPv4), for the log.
#[inline(always)]
fn ip_bytes(ip: &Ip) -> [u8; 16] {
    let mut bytes = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        let word = ip[i].to_ne_bytes();
        bytes[4 * i] = word[0];
        bytes[4 * i + 1] = word[1];
        bytes[4 * i + 2] = word[2];
        bytes[4 * i + 3] = word[3];
        i += 1;
    }
    bytes
}

#[inline(always)]
fn read_ip6(words: &[u32; 4]) -> Ip {
    [words[0], words[1], words[2], words[3]]
}

/// The address of a context that carries both an IPv4 and an IPv6 field, by `family`.
///
/// Both are loaded unconditionally, each with a volatile read at its fixed offset: the verifier
/// refuses a context access whose offset is computed at run time, which is what the compiler
/// makes of "load this field or that one" otherwise.
///
/// # Safety
/// `ip6` must point to the IPv6 field of a context the kernel handed the program.
#[inline(always)]
unsafe fn pick(family: u32, ip4: u32, ip6: *const [u32; 4]) -> Ip {
    // SAFETY: the caller passes a valid context field; each word is a 4-byte aligned load.
    let ip6 = unsafe {
        let words = ip6 as *const u32;
        [
            read_volatile(words),
            read_volatile(words.wrapping_add(1)),
            read_volatile(words.wrapping_add(2)),
            read_volatile(words.wrapping_add(3)),
        ]
    };
    if family == AF_INET {
        v4_mapped(ip4)
    } else {
        ip6
    }
}

#[inline(always)]
fn is_loopback(ip: &Ip) -> bool {
    (is_v4_mapped(ip) && ip[3].to_ne_bytes()[0] == 127) || *ip == LOOPBACK6
}

#[inline(always)]
fn excluded(dst: &Ip, port: u16) -> bool {
    EXCLUDED_PORTS.get_ptr(port).is_some() || EXCLUDED_CIDRS.get(Key::new(128, *dst)).is_some()
}

#[inline(always)]
fn fail_open() -> bool {
    SETTINGS
        .get(meshlet_common::SETTING_FAIL_OPEN)
        .is_some_and(|fail_open| *fail_open != 0)
}

#[inline(always)]
fn count(direction: Direction) {
    if let Some(counter) = REDIRECTS.get_ptr_mut(direction as u32) {
        // SAFETY: per-CPU values are only touched by this CPU while the program runs.
        unsafe { *counter += 1 };
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
