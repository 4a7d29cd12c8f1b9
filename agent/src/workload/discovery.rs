//! Finding a pod's network namespace, and checking that it is the pod's own.
//!
//! A process of the pod's cgroup (the kubelet names it after the pod UID, `pod<uid>` with the
//! cgroupfs driver, `...-pod<uid_with_underscores>.slice` with systemd) has it at
//! `/proc/<pid>/ns/net`. With the file source only, the `meshlet.io/netns` annotation may name
//! it directly. Either way, [`verify`] checks what the node itself observes before the agent
//! binds a socket or attaches a program there: the namespace is not the agent's own, not the
//! host's, and every process in it belongs to the pod's cgroup (so neither a hostNetwork pod's
//! nor another pod's namespace). Nothing a pod's spec or metadata says can widen that.

use std::{
    fs,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

/// Why a network namespace is refused for a pod.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The agent's own namespace (the node's, under a DaemonSet).
    #[error("it is the agent's own network namespace")]
    OwnNetns,
    /// The namespace of PID 1: the host's.
    #[error("it is the host's network namespace (/proc/1/ns/net)")]
    HostNetns,
    /// A process of a hostNetwork pod lives there.
    #[error("process {pid} of hostNetwork pod {uid} lives in it")]
    HostNetworkPod {
        /// The process.
        pid: u32,
        /// The hostNetwork pod's UID.
        uid: String,
    },
    /// A process that is not the pod's lives there.
    #[error("process {pid} lives in it but is not in the pod's cgroup")]
    ForeignProcess {
        /// The process.
        pid: u32,
    },
    /// `meshlet.io/netns` names a namespace directly; only the file source may.
    #[error(
        "the meshlet.io/netns annotation is honoured only with the file source; \
         the namespace is found from the pod's processes instead"
    )]
    Annotation,
    /// The namespace cannot be inspected.
    #[error("cannot inspect {path}: {error}")]
    Unreadable {
        /// What could not be read.
        path: PathBuf,
        /// Why.
        error: String,
    },
}

impl Refusal {
    /// The metric label of the refusal (`meshlet_enrollment_refused_total{reason}`).
    pub fn reason(&self) -> &'static str {
        match self {
            Self::OwnNetns => "own_netns",
            Self::HostNetns => "host_netns",
            Self::HostNetworkPod { .. } => "host_network_pod_netns",
            Self::ForeignProcess { .. } => "foreign_process",
            Self::Annotation => "netns_annotation",
            Self::Unreadable { .. } => "unreadable",
        }
    }
}

/// The inode of the network namespace at `path` (what `/proc/<pid>/ns/net` links compare by).
pub fn netns_inode(path: &Path) -> std::io::Result<u64> {
    fs::metadata(path).map(|m| m.ino())
}

/// Checks that the network namespace with inode `inode` (read from the handle the agent
/// holds, so what is checked is what will be entered) may be captured as the pod `uid`'s own:
/// it is neither the agent's (`/proc/self`) nor the host's (`/proc/1`), and every process in
/// it is in the pod's cgroup. `host_network_uids` names this node's hostNetwork pods, so a
/// refusal can say whose process it met.
pub fn verify(
    proc_root: &Path,
    inode: u64,
    uid: &str,
    host_network_uids: &[String],
) -> Result<(), Refusal> {
    let unreadable = |path: &Path, err: std::io::Error| Refusal::Unreadable {
        path: path.to_owned(),
        error: err.to_string(),
    };
    let own = proc_root.join("self/ns/net");
    if netns_inode(&own).map_err(|err| unreadable(&own, err))? == inode {
        return Err(Refusal::OwnNetns);
    }
    if netns_inode(&proc_root.join("1/ns/net")).is_ok_and(|host| host == inode) {
        return Err(Refusal::HostNetns);
    }
    let entries = fs::read_dir(proc_root).map_err(|err| unreadable(proc_root, err))?;
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        // A process that exited meanwhile, or a kernel thread without a namespace link, is
        // no evidence either way.
        if netns_inode(&entry.path().join("ns/net")).ok() != Some(inode) {
            continue;
        }
        let Ok(cgroup) = fs::read_to_string(entry.path().join("cgroup")) else {
            continue;
        };
        if cgroup.lines().any(|line| cgroup_line_is_pod(line, uid)) {
            continue;
        }
        if let Some(other) = host_network_uids
            .iter()
            .find(|other| cgroup.lines().any(|line| cgroup_line_is_pod(line, other)))
        {
            return Err(Refusal::HostNetworkPod {
                pid,
                uid: other.clone(),
            });
        }
        return Err(Refusal::ForeignProcess { pid });
    }
    Ok(())
}

/// Whether a line of `/proc/<pid>/cgroup` places the process in the pod with UID `uid`.
pub fn cgroup_line_is_pod(line: &str, uid: &str) -> bool {
    let Some(path) = line.splitn(3, ':').nth(2) else {
        return false;
    };
    let systemd_uid = uid.replace('-', "_");
    path.split('/').any(|component| {
        component
            .strip_prefix("pod")
            .is_some_and(|rest| rest == uid)
            || component
                .strip_suffix(".slice")
                .and_then(|slice| slice.rsplit('-').next())
                .and_then(|last| last.strip_prefix("pod"))
                .is_some_and(|rest| rest == systemd_uid)
    })
}

/// The network namespace path of a process of the pod `uid`, scanning `proc_root` (normally
/// `/proc`). `None` while the pod has no process (not started yet, or gone).
pub fn find_pod_netns(proc_root: &Path, uid: &str) -> Option<PathBuf> {
    let entries = fs::read_dir(proc_root).ok()?;
    for entry in entries.flatten() {
        let name = entry.file_name();
        if !name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(cgroup) = fs::read_to_string(entry.path().join("cgroup")) else {
            continue;
        };
        if cgroup.lines().any(|line| cgroup_line_is_pod(line, uid)) {
            return Some(entry.path().join("ns/net"));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "6e2a1c3b-0000-4d5e-8f90-000000000000";

    #[test]
    fn recognises_cgroupfs_and_systemd_layouts() {
        let cases = [
            (
                "0::/kubepods/besteffort/pod6e2a1c3b-0000-4d5e-8f90-000000000000/abc123",
                true,
            ),
            (
                "0::/kubepods/pod6e2a1c3b-0000-4d5e-8f90-000000000000/abc123",
                true,
            ),
            (
                "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod6e2a1c3b_0000_4d5e_8f90_000000000000.slice/cri-containerd-abc.scope",
                true,
            ),
            (
                "0::/kubepods.slice/kubepods-pod6e2a1c3b_0000_4d5e_8f90_000000000000.slice/x.scope",
                true,
            ),
            (
                "12:memory:/kubepods/besteffort/pod6e2a1c3b-0000-4d5e-8f90-000000000000/abc",
                true,
            ),
            (
                "0::/kubepods/besteffort/pod6e2a1c3b-0000-4d5e-8f90-000000000001/abc",
                false,
            ),
            (
                "0::/kubepods/besteffort/pod6e2a1c3b-0000-4d5e-8f90-0000000000001/abc",
                false,
            ),
            ("0::/user.slice/user-0.slice/session-1.scope", false),
            ("garbage", false),
        ];
        for (line, want) in cases {
            assert_eq!(cgroup_line_is_pod(line, UID), want, "{line}");
        }
    }

    /// A fake /proc: each process gets a `cgroup` file and an `ns/net` that is a regular file
    /// standing for a namespace (processes that share one get hard links, so the same inode).
    fn fake_proc(name: &str, processes: &[(&str, &str, &str)]) -> PathBuf {
        let root = std::env::temp_dir().join(format!("meshlet-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        let namespaces = root.join("namespaces");
        fs::create_dir_all(&namespaces).unwrap();
        for (pid, cgroup, netns) in processes {
            let dir = root.join(pid);
            fs::create_dir_all(dir.join("ns")).unwrap();
            fs::write(dir.join("cgroup"), cgroup).unwrap();
            let ns = namespaces.join(netns);
            if !ns.exists() {
                fs::write(&ns, "").unwrap();
            }
            fs::hard_link(&ns, dir.join("ns/net")).unwrap();
        }
        root
    }

    #[test]
    fn verify_refuses_the_agents_the_hosts_and_shared_namespaces() {
        const HOST_POD: &str = "11111111-2222-3333-4444-555555555555";
        const OTHER: &str = "99999999-2222-3333-4444-555555555555";
        let pod = format!("0::/kubepods/besteffort/pod{UID}/c1\n");
        let root = fake_proc(
            "verify",
            &[
                ("1", "0::/init.scope\n", "host"),
                ("self", "0::/meshlet\n", "node"),
                ("7", "0::/meshlet\n", "node"),
                ("42", &pod, "pod"),
                ("43", &pod, "pod"),
                ("50", &format!("0::/kubepods/pod{HOST_POD}/c\n"), "node"),
                ("60", &pod, "shared"),
                ("61", &format!("0::/kubepods/pod{OTHER}/c\n"), "shared"),
                ("70", &format!("0::/kubepods/pod{HOST_POD}/c\n"), "hostpod"),
                ("71", &pod, "hostpod"),
            ],
        );
        let host_pods = [HOST_POD.to_owned()];
        let check = |netns: &str| {
            let inode = netns_inode(&root.join(netns).join("ns/net")).unwrap();
            verify(&root, inode, UID, &host_pods)
        };
        assert_eq!(check("42"), Ok(()), "every process is the pod's");
        assert_eq!(check("7"), Err(Refusal::OwnNetns));
        assert_eq!(check("1"), Err(Refusal::HostNetns));
        assert_eq!(check("60"), Err(Refusal::ForeignProcess { pid: 61 }));
        assert_eq!(
            check("71"),
            Err(Refusal::HostNetworkPod {
                pid: 70,
                uid: HOST_POD.into()
            })
        );
        assert!(matches!(
            verify(&root.join("missing"), 1, UID, &host_pods),
            Err(Refusal::Unreadable { .. })
        ));
        assert_eq!(Refusal::OwnNetns.reason(), "own_netns");
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn finds_a_process_of_the_pod_in_a_proc_tree() {
        let root = std::env::temp_dir().join(format!("meshlet-proc-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        for (pid, cgroup) in [
            ("1", "0::/init.scope\n"),
            ("42", &format!("0::/kubepods/besteffort/pod{UID}/c1\n")),
            ("self", "0::/\n"),
        ] {
            fs::create_dir_all(root.join(pid)).unwrap();
            fs::write(root.join(pid).join("cgroup"), cgroup).unwrap();
        }
        assert_eq!(find_pod_netns(&root, UID), Some(root.join("42/ns/net")));
        assert_eq!(find_pod_netns(&root, "other"), None);
        fs::remove_dir_all(&root).unwrap();
    }
}
