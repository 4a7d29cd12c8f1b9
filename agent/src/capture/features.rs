//! What capture needs from the kernel, asked of the kernel before anything is loaded.
//!
//! [`FEATURES`] lists every program type, map type, helper and attachment the eBPF programs
//! use, with the first Linux release that has it and what meshlet uses it for
//! (docs/operations.md, "Kernels", is the same table with the kernels it is tested on). [`check`]
//! asks the running kernel for each one it can be asked about, the way libbpf's probes do (aya's
//! `is_program_supported`, `is_map_supported`, `is_helper_supported`: a minimal program loaded,
//! a one-entry map created), and compares the release for the rest (attach types and link
//! operations, which cannot be tried without attaching). What is missing comes back as
//! [`super::Error::KernelLacks`], named, where loading would only have printed what the
//! verifier choked on.
//!
//! A unit test reads the embedded object and fails when the programs call a helper or declare a
//! map type the table does not list, so the table cannot fall behind the programs.

use std::fmt;

use aya::{
    maps::MapType,
    programs::ProgramType,
    sys::{BpfHelper, is_helper_supported, is_map_supported, is_program_supported},
};

/// How the kernel is asked whether it has a feature.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Probe {
    /// Load a minimal program of this type.
    Program(ProgramType),
    /// Create a one-entry map of this type.
    Map(MapType),
    /// Load a minimal program of this type that calls the helper.
    Helper(ProgramType, BpfHelper),
    /// Only the release tells (attach types, link operations, socket options).
    Release,
}

/// Something capture needs from the kernel.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Feature {
    /// What it is, as docs/operations.md names it.
    pub name: &'static str,
    /// How to ask for it.
    pub probe: Probe,
    /// The first Linux release that has it (major, minor).
    pub since: (u32, u32),
    /// What meshlet does with it.
    pub used_for: &'static str,
}

impl fmt::Display for Feature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} (Linux >= {}.{}; for {})",
            self.name, self.since.0, self.since.1, self.used_for
        )
    }
}

use BpfHelper as H;
use ProgramType as P;

const fn feature(
    name: &'static str,
    probe: Probe,
    since: (u32, u32),
    used_for: &'static str,
) -> Feature {
    Feature {
        name,
        probe,
        since,
        used_for,
    }
}

/// Everything capture needs, oldest first within each kind.
pub const FEATURES: &[Feature] = &[
    // Program types and attach points.
    feature(
        "sock_ops programs",
        Probe::Program(P::SockOps),
        (4, 13),
        "recording each redirected connection's original destination",
    ),
    feature(
        "cgroup sock_addr programs at connect4/connect6",
        Probe::Program(P::CgroupSockAddr),
        (4, 17),
        "redirecting outbound connects to the pod's proxy",
    ),
    feature(
        "cgroup sockopt programs (getsockopt)",
        Probe::Program(P::CgroupSockopt),
        (5, 3),
        "answering SO_ORIGINAL_DST",
    ),
    feature(
        "bpf links on cgroups (create, pin, update)",
        Probe::Release,
        (5, 7),
        "attachments that outlive the agent and are upgraded in place",
    ),
    feature(
        "cgroup sock_addr programs at getpeername4/getpeername6",
        Probe::Release,
        (5, 8),
        "showing the application its original peer",
    ),
    feature(
        "sk_lookup programs, on network namespace links",
        Probe::Program(P::SkLookup),
        (5, 9),
        "steering inbound connections to the pod's 15006 listener",
    ),
    // Map types.
    feature(
        "hash and array maps",
        Probe::Map(MapType::Hash),
        (3, 19),
        "enrolled namespaces, excluded ports, settings",
    ),
    feature(
        "per-CPU array maps",
        Probe::Map(MapType::PerCpuArray),
        (4, 6),
        "redirect counters",
    ),
    feature(
        "LRU hash maps",
        Probe::Map(MapType::LruHash),
        (4, 10),
        "per-connection records that evict the oldest when full",
    ),
    feature(
        "LPM trie maps",
        Probe::Map(MapType::LpmTrie),
        (4, 11),
        "excluded CIDRs",
    ),
    feature(
        "sockhash maps",
        Probe::Map(MapType::SockHash),
        (4, 18),
        "the in-pod 15006 listeners sk_lookup hands connections to",
    ),
    feature(
        "ring buffer maps",
        Probe::Map(MapType::RingBuf),
        (5, 8),
        "the programs' rare events (aya-log)",
    ),
    // Helpers, by the program type that calls them.
    feature(
        "bpf_sock_ops_cb_flags_set in sock_ops programs",
        Probe::Helper(P::SockOps, H::BPF_FUNC_sock_ops_cb_flags_set),
        (4, 16),
        "following a connection to its close (STATE_CB)",
    ),
    feature(
        "bpf_get_socket_cookie in sock_addr programs",
        Probe::Helper(P::CgroupSockAddr, H::BPF_FUNC_get_socket_cookie),
        (4, 19),
        "keying a connect's record by its socket",
    ),
    feature(
        "bpf_get_socket_cookie in sock_ops programs",
        Probe::Helper(P::SockOps, H::BPF_FUNC_get_socket_cookie),
        (4, 19),
        "finding a connect's record when it is established",
    ),
    feature(
        "bpf_get_netns_cookie in sock_addr programs",
        Probe::Helper(P::CgroupSockAddr, H::BPF_FUNC_get_netns_cookie),
        (5, 7),
        "telling which pod a connect comes from",
    ),
    feature(
        "bpf_ringbuf_reserve, _submit and _discard in sock_ops and sk_lookup programs",
        Probe::Helper(P::SockOps, H::BPF_FUNC_ringbuf_reserve),
        (5, 8),
        "the programs' rare events (aya-log)",
    ),
    feature(
        "bpf_sk_assign in sk_lookup programs",
        Probe::Helper(P::SkLookup, H::BPF_FUNC_sk_assign),
        (5, 9),
        "handing an inbound connection to the pod's listener",
    ),
    feature(
        "bpf_sk_release in sk_lookup programs",
        Probe::Helper(P::SkLookup, H::BPF_FUNC_sk_release),
        (5, 9),
        "releasing the listener socket looked up in the sockhash",
    ),
    feature(
        "bpf_get_netns_cookie in sock_ops programs",
        Probe::Helper(P::SockOps, H::BPF_FUNC_get_netns_cookie),
        (5, 15),
        "matching the proxy's accepted socket to the client's record",
    ),
    feature(
        "bpf_get_netns_cookie in sockopt programs",
        Probe::Helper(P::CgroupSockopt, H::BPF_FUNC_get_netns_cookie),
        (5, 15),
        "answering SO_ORIGINAL_DST for the right pod",
    ),
];

/// The oldest release that has every feature.
pub fn min_kernel() -> (u32, u32) {
    FEATURES.iter().map(|f| f.since).max().unwrap_or_default()
}

/// The features of [`FEATURES`] the running kernel (release `version`) lacks: probed where the
/// kernel can be asked, by release otherwise. A probe that cannot tell (no privilege, an
/// unexpected error) counts as present; loading the programs has the last word.
pub fn missing(version: Option<(u32, u32)>) -> Vec<&'static Feature> {
    missing_of(FEATURES, version)
}

/// [`missing`], of `features`.
pub fn missing_of(features: &[Feature], version: Option<(u32, u32)>) -> Vec<&Feature> {
    features
        .iter()
        .filter(|feature| !present(feature, version))
        .collect()
}

fn present(feature: &Feature, version: Option<(u32, u32)>) -> bool {
    let probed = match feature.probe {
        Probe::Program(kind) => is_program_supported(kind).ok(),
        Probe::Map(kind) => is_map_supported(kind).ok(),
        Probe::Helper(kind, helper) => is_helper_supported(kind, helper).ok(),
        // Distributions backport; an unreadable release is let through to the load.
        Probe::Release => Some(version.is_none_or(|v| v >= feature.since)),
    };
    probed.unwrap_or(true)
}

/// What the kernel is missing, one feature per line.
pub fn describe(missing: &[&Feature]) -> String {
    missing
        .iter()
        .map(|f| format!("  - {f}"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use aya_obj::{
        Object,
        generated::{BPF_CALL, BPF_JMP},
        obj::ProgramSection,
    };

    use super::*;

    /// The program type of each program section the object has.
    fn program_type(section: &ProgramSection) -> ProgramType {
        match section {
            ProgramSection::SockOps => P::SockOps,
            ProgramSection::CgroupSockAddr { .. } => P::CgroupSockAddr,
            ProgramSection::CgroupSockopt { .. } => P::CgroupSockopt,
            ProgramSection::SkLookup => P::SkLookup,
            other => panic!("the programs have a section FEATURES knows nothing of: {other:?}"),
        }
    }

    #[test]
    fn every_helper_program_type_and_map_type_the_programs_use_is_in_the_table() {
        let object = Object::parse(super::super::EBPF_OBJECT).expect("the embedded object");
        let mut helpers = BTreeSet::new();
        for program in object.programs.values() {
            let kind = program_type(&program.section);
            assert!(
                FEATURES.contains_probe(Probe::Program(kind)),
                "{kind:?} programs are not in FEATURES"
            );
            // Every function of the program's section: the program and what it calls.
            for function in object
                .functions
                .values()
                .filter(|f| f.section_index.0 == program.section_index)
            {
                for insn in &function.instructions {
                    // A helper call: BPF_JMP | BPF_CALL with src_reg 0 (1 is a bpf-to-bpf call).
                    if insn.code == (BPF_JMP | BPF_CALL) as u8 && insn.src_reg() == 0 {
                        helpers.insert((format!("{kind:?}"), insn.imm));
                    }
                }
            }
        }
        assert!(!helpers.is_empty(), "the programs call no helper?");
        let listed: BTreeSet<(String, i32)> = FEATURES
            .iter()
            .filter_map(|f| match f.probe {
                Probe::Helper(kind, helper) => Some((format!("{kind:?}"), helper as i32)),
                _ => None,
            })
            .collect();
        // Helpers every program type has had since eBPF began: map access, time.
        let basic = [
            H::BPF_FUNC_map_lookup_elem,
            H::BPF_FUNC_map_update_elem,
            H::BPF_FUNC_map_delete_elem,
            H::BPF_FUNC_ktime_get_ns,
            H::BPF_FUNC_get_smp_processor_id,
        ]
        .map(|h| h as i32);
        // aya-log's ring buffer calls: one probe stands for the three.
        let ringbuf = [
            H::BPF_FUNC_ringbuf_reserve,
            H::BPF_FUNC_ringbuf_submit,
            H::BPF_FUNC_ringbuf_discard,
        ]
        .map(|h| h as i32);
        assert!(
            FEATURES.contains_probe(Probe::Helper(P::SockOps, H::BPF_FUNC_ringbuf_reserve)),
            "aya-log's ring buffer helpers are not in FEATURES"
        );
        let unlisted: Vec<String> = helpers
            .iter()
            .filter(|(kind, helper)| {
                !basic.contains(helper)
                    && !ringbuf.contains(helper)
                    && !listed.contains(&(kind.clone(), *helper))
            })
            .map(|(kind, helper)| format!("helper #{helper} in {kind} programs"))
            .collect();
        assert!(
            unlisted.is_empty(),
            "the programs call what FEATURES does not list: {unlisted:?}"
        );

        for (name, map) in &object.maps {
            let kind = map.map_type();
            // Arrays (aya's global data, .rodata and .bss, are arrays too) come with hash maps,
            // the first eBPF maps: "hash and array maps".
            let covered = kind == MapType::Array as u32
                || FEATURES
                    .iter()
                    .any(|f| matches!(f.probe, Probe::Map(listed) if listed as u32 == kind));
            assert!(
                covered,
                "map {name} has type {kind}, which FEATURES does not list"
            );
        }
    }

    trait Table {
        fn contains_probe(&self, probe: Probe) -> bool;
    }

    impl Table for [Feature] {
        fn contains_probe(&self, probe: Probe) -> bool {
            self.iter().any(|f| f.probe == probe)
        }
    }

    #[test]
    fn the_minimum_is_the_newest_feature_and_release_only_features_go_by_release() {
        assert_eq!(min_kernel(), super::super::MIN_KERNEL);
        let by_release = |version| -> Vec<&str> {
            missing(Some(version))
                .into_iter()
                .filter(|f| f.probe == Probe::Release)
                .map(|f| f.name)
                .collect()
        };
        assert_eq!(
            by_release((5, 7)),
            ["cgroup sock_addr programs at getpeername4/getpeername6"]
        );
        assert_eq!(by_release((6, 1)), Vec::<&str>::new());
        assert!(
            by_release((5, 4)).contains(&"bpf links on cgroups (create, pin, update)"),
            "{:?}",
            by_release((5, 4))
        );
    }

    #[test]
    fn a_missing_feature_is_named_with_its_release_and_use() {
        let cookie = FEATURES
            .iter()
            .find(|f| f.probe == Probe::Helper(P::SockOps, H::BPF_FUNC_get_netns_cookie))
            .expect("listed");
        let text = describe(&[cookie]);
        assert_eq!(
            text,
            "  - bpf_get_netns_cookie in sock_ops programs (Linux >= 5.15; for matching the \
             proxy's accepted socket to the client's record)"
        );
    }
}
