//! Types and constants shared by the eBPF programs (`meshlet-ebpf`) and the agent.
//!
//! Everything here is `#[repr(C)]` plain data or a constant: the layout of every map key and
//! value is the contract between kernel and userspace, so it lives in one place and carries no
//! logic. With the `user` feature the types implement `aya::Pod`.
#![no_std]

/// Mark carried by every socket the proxy creates (`SO_MARK`); capture never redirects them.
pub const MESH_MARK: u32 = 0x539;

/// In-pod outbound capture listener (loopback).
pub const OUTBOUND_PORT: u16 = 15001;
/// In-pod inbound plaintext capture listener.
pub const INBOUND_PLAINTEXT_PORT: u16 = 15006;
/// In-pod inbound HBONE listener.
pub const INBOUND_HBONE_PORT: u16 = 15008;

/// Names of the maps, as the agent looks them up and pins them.
pub mod maps {
    /// `PerCpuHashMap<u64 netns cookie, u64>`: TCP connects seen per network namespace.
    pub const CONNECTS: &str = "CONNECTS";
}

/// Names of the programs, as the agent looks them up and pins their links.
pub mod programs {
    /// `cgroup/connect4`.
    pub const CONNECT4: &str = "meshlet_connect4";
}

/// Capacity of the per-netns maps: the most network namespaces one node can enroll.
pub const MAX_NETNS: u32 = 16_384;
