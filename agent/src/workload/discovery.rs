//! Finding a pod's network namespace: a process of the pod's cgroup (the kubelet names it
//! after the pod UID, `pod<uid>` with the cgroupfs driver, `...-pod<uid_with_underscores>.slice`
//! with systemd) has it at `/proc/<pid>/ns/net`. The `meshlet.io/netns` annotation, when set,
//! names it directly.

use std::{
    fs,
    path::{Path, PathBuf},
};

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
