//! meshlet's eBPF programs.
//!
//! Built with nightly for `bpfel-unknown-none` and linked by `bpf-linker`; the agent embeds the
//! object (see `agent/build.rs`) and loads it with aya. Map layouts and names come from
//! `meshlet-common`, the only contract between this crate and the agent.
#![no_std]
#![no_main]

use aya_ebpf::{
    EbpfContext as _,
    bindings::BPF_NOEXIST,
    helpers::bpf_get_netns_cookie,
    macros::{cgroup_sock_addr, map},
    maps::PerCpuHashMap,
    programs::SockAddrContext,
};
use meshlet_common::MAX_NETNS;

/// TCP connects seen per network namespace (keyed by netns cookie), per CPU.
#[map]
static CONNECTS: PerCpuHashMap<u64, u64> = PerCpuHashMap::with_max_entries(MAX_NETNS, 0);

const SOCK_STREAM: u32 = 1;

/// Verdict of a `cgroup/connect*` program that lets the connect proceed.
const ALLOW: i32 = 1;

/// `cgroup/connect4`: counts TCP connects per network namespace. Never blocks a connect.
#[cgroup_sock_addr(connect4)]
pub fn meshlet_connect4(ctx: SockAddrContext) -> i32 {
    // SAFETY: the kernel hands the program a valid `bpf_sock_addr` for its whole run.
    let sock_type = unsafe { (*ctx.sock_addr).type_ };
    if sock_type != SOCK_STREAM {
        return ALLOW;
    }
    // SAFETY: `bpf_get_netns_cookie` accepts a `bpf_sock_addr` context (kernel >= 5.7).
    let cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    count(&CONNECTS, cookie);
    ALLOW
}

/// Adds one to `map[key]` on this CPU, creating the entry on first use.
#[inline(always)]
fn count(map: &PerCpuHashMap<u64, u64>, key: u64) {
    match map.get_ptr_mut(key) {
        // SAFETY: per-CPU values are only touched by this CPU while the program runs.
        Some(value) => unsafe { *value += 1 },
        None => {
            // Losing a count when the map is full is preferable to failing the connect.
            let _ = map.insert(key, 1, u64::from(BPF_NOEXIST));
        }
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
