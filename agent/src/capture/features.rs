//! What capture needs from the kernel, asked of the kernel before anything is loaded.
//!
//! [`FEATURES`] lists every program type, map type, helper and attachment the eBPF programs
//! use, with the first Linux release that has it and what meshlet uses it for
//! (docs/operations.md, "Kernels", is the same table with the kernels it is tested on). [`check`]
//! asks the running kernel for each one it can be asked about, the way libbpf's probes do (aya's
//! `is_program_supported`, `is_map_supported`, `is_helper_supported`: a minimal program loaded,
//! a one-entry map created), and compares the release for the rest (attach types and link
//! operations, not probed; all are older than [`super::MIN_KERNEL`], which is checked first).
//! What is missing comes back as
//! [`super::Error::KernelLacks`], named, where loading would only have printed what the
//! verifier choked on.
//!
//! A unit test reads the embedded object and fails when the programs call a helper or declare a
//! map type the table does not list, so the table cannot fall behind the programs.

use std::{fmt, io};

use ProgramType as P;
use aya::{
    maps::MapType,
    programs::{ProgramError, ProgramType},
    sys::{
        BpfHelper as H, SyscallError, is_helper_supported, is_map_supported, is_program_supported,
    },
};

/// How the kernel is asked whether it has a feature.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Probe {
    /// Load a minimal program of this type.
    Program(ProgramType),
    /// Create a one-entry map of this type.
    Map(MapType),
    /// Load a minimal program of this type that calls the helper.
    Helper(ProgramType, H),
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
        "bpf_ringbuf_reserve, _submit and _discard in sock_ops programs",
        Probe::Helper(P::SockOps, H::BPF_FUNC_ringbuf_reserve),
        (5, 8),
        "the programs' rare events (aya-log)",
    ),
    feature(
        "bpf_ringbuf_reserve, _submit and _discard in sk_lookup programs",
        Probe::Helper(P::SkLookup, H::BPF_FUNC_ringbuf_reserve),
        (5, 9),
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
/// kernel can be asked, by release otherwise. A kernel without the bpf(2) syscall lacks them
/// all; a probe that cannot tell (no privilege: the capabilities check says so) counts as
/// present, and loading the programs has the last word.
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
        Probe::Program(kind) => is_program_supported(kind).map_err(program_errno),
        Probe::Map(kind) => is_map_supported(kind).map_err(|err| err.io_error.raw_os_error()),
        Probe::Helper(kind, helper) => is_helper_supported(kind, helper).map_err(program_errno),
        // An unreadable release is let through to the load.
        Probe::Release => Ok(version.is_none_or(|v| v >= feature.since)),
    };
    match probed {
        Ok(present) => present,
        Err(Some(libc::ENOSYS)) => false,
        Err(_) => true,
    }
}

/// The errno behind a failed probe, if a syscall failed.
fn program_errno(err: ProgramError) -> Option<i32> {
    match err {
        ProgramError::SyscallError(SyscallError { io_error, .. }) => io_error.raw_os_error(),
        ProgramError::IOError(io_error) => io::Error::raw_os_error(&io_error),
        _ => None,
    }
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
        // The program type of each program section; functions elsewhere (`.text`) are
        // subprograms any program may call.
        let mut sections = std::collections::HashMap::new();
        for program in object.programs.values() {
            let kind = program_type(&program.section);
            assert!(
                listed(Probe::Program(kind)),
                "{kind:?} programs are not in FEATURES"
            );
            sections.insert(program.section_index, format!("{kind:?}"));
        }
        let mut helpers = BTreeSet::new();
        for function in object.functions.values() {
            let kind = sections
                .get(&function.section_index.0)
                .cloned()
                .unwrap_or_else(|| "any".to_owned());
            for insn in &function.instructions {
                // A helper call: BPF_JMP | BPF_CALL with src_reg 0 (1 is a bpf-to-bpf call).
                if insn.code == (BPF_JMP | BPF_CALL) as u8 && insn.src_reg() == 0 {
                    helpers.insert((kind.clone(), insn.imm));
                }
            }
        }
        assert!(!helpers.is_empty(), "the programs call no helper?");
        let listed_helpers: BTreeSet<(String, i32)> = FEATURES
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
        for kind in [P::SockOps, P::SkLookup] {
            assert!(
                listed(Probe::Helper(kind, H::BPF_FUNC_ringbuf_reserve)),
                "aya-log's ring buffer helpers in {kind:?} are not in FEATURES"
            );
        }
        let unlisted: Vec<String> = helpers
            .iter()
            .filter(|(kind, helper)| {
                let covered = basic.contains(helper)
                    || ringbuf.contains(helper)
                    || listed_helpers.contains(&(kind.clone(), *helper))
                    // A subprogram's helper: listed for some program type.
                    || (kind == "any"
                        && listed_helpers.iter().any(|(_, listed)| listed == helper));
                !covered
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

    fn listed(probe: Probe) -> bool {
        FEATURES.iter().any(|f| f.probe == probe)
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
