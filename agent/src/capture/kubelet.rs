//! Finding kubelet's cgroup: the one cgroup whose TCP connections to pods (its health probes)
//! capture lets through to the application unsteered (`meshlet_probe_ops` records them).
//!
//! `--kubelet-cgroup` names it; without the flag the agent looks for the kubelet process in
//! `/proc` (the DaemonSet runs with `hostPID`) and reads its cgroup v2 path from
//! `/proc/<pid>/cgroup` (the `0::<path>` line), joined under the cgroup2 mount.
//!
//! A process name is no proof: any container can call itself `kubelet`, and the host's PID
//! namespace shows every container's processes. So a candidate counts only if it runs as the
//! user of PID 1 (root) in the mount namespace of PID 1 (the host's, which no container shares),
//! and all candidates must agree on one cgroup. A cgroup that is not strictly below `--cgroup-root` is not used either
//! (on a node the root is the cgroup2 mount, so kubelet is below it; in the tests it keeps the
//! agent off the machine's own kubelet).
//!
//! An agent in a cgroup namespace of its own sees other processes' cgroups relative to its
//! namespace's root (`/../../system.slice/kubelet.service`); PID 1's entry tells how many levels
//! that root is below the host's, which turns such a path back into one under the host's
//! cgroup2 mount (the DaemonSet mounts the host's `/sys/fs/cgroup`).

use std::{
    fs, io,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use super::mounts;

/// What the process is called (`/proc/<pid>/comm`).
const KUBELET: &str = "kubelet";

/// Why kubelet's cgroup was not found.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No process that can be kubelet runs in this PID namespace.
    #[error(
        "no kubelet process found (a process named kubelet, running as PID 1's user in PID 1's \
         mount namespace; the agent needs hostPID)"
    )]
    NotRunning,
    /// Processes named kubelet run in different cgroups.
    #[error(
        "processes named kubelet run in different cgroups ({0:?}): pass --kubelet-cgroup to say \
         which one is kubelet's"
    )]
    Ambiguous(Vec<String>),
    /// Kubelet's cgroup path cannot be placed under the cgroup2 mount this process sees.
    #[error(
        "kubelet (pid {pid}) is in cgroup {path}, which this process cannot locate under its \
         cgroup2 mount (a cgroup namespace?): pass --kubelet-cgroup"
    )]
    Unresolvable {
        /// Kubelet's process id.
        pid: u32,
        /// Its cgroup as `/proc/<pid>/cgroup` shows it.
        path: String,
    },
    /// The resolved directory does not exist.
    #[error(
        "kubelet (pid {pid}) is in cgroup {}, which is not a directory here: is the host's \
         cgroup2 filesystem mounted? Or pass --kubelet-cgroup", path.display()
    )]
    Missing {
        /// Kubelet's process id.
        pid: u32,
        /// Where its cgroup should be.
        path: PathBuf,
    },
    /// Kubelet's cgroup is not below the cgroup root capture is attached to.
    #[error(
        "kubelet runs in cgroup {}, which is not below --cgroup-root {}: not exempting it \
         (pass --kubelet-cgroup to use it anyway)", path.display(), root.display()
    )]
    OutsideRoot {
        /// Kubelet's cgroup.
        path: PathBuf,
        /// The cgroup root.
        root: PathBuf,
    },
    /// Another process's namespaces or cgroup could not be read.
    #[error(
        "cannot inspect process {pid}: {source} (the agent needs CAP_SYS_PTRACE to compare \
         mount namespaces); pass --kubelet-cgroup"
    )]
    Inspect {
        /// The process.
        pid: u32,
        /// The underlying error.
        source: io::Error,
    },
    /// A process has no cgroup v2 entry: the unified hierarchy is not in use.
    #[error("process {pid} is in no cgroup v2 cgroup (no `0::` line in /proc/{pid}/cgroup)")]
    NoUnifiedCgroup {
        /// The process.
        pid: u32,
    },
    /// No cgroup2 filesystem is mounted.
    #[error("no cgroup2 filesystem is mounted")]
    NoCgroup2,
    /// `/proc` could not be read.
    #[error("read {}: {source}", path.display())]
    Io {
        /// The path.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
}

/// Kubelet's cgroup on this machine, strictly below `cgroup_root`.
pub fn detect(cgroup_root: &Path) -> Result<PathBuf, Error> {
    let mounts = mounts::mounts().map_err(|source| Error::Io {
        path: "/proc/self/mountinfo".into(),
        source,
    })?;
    let mount = mounts::find(&mounts, "cgroup2").ok_or(Error::NoCgroup2)?;
    let path = find(Path::new("/proc"), &mount)?;
    if path == cgroup_root || !path.starts_with(cgroup_root) {
        return Err(Error::OutsideRoot {
            path,
            root: cgroup_root.to_owned(),
        });
    }
    Ok(path)
}

/// Kubelet's cgroup directory under `cgroup2_mount`, from the process table at `proc`.
pub fn find(proc: &Path, cgroup2_mount: &Path) -> Result<PathBuf, Error> {
    let mut named: Vec<u32> = fs::read_dir(proc)
        .map_err(|source| Error::Io {
            path: proc.to_owned(),
            source,
        })?
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse().ok())
        .filter(|pid: &u32| {
            // A process may exit while we look: whatever cannot be read is not kubelet.
            fs::read_to_string(proc.join(pid.to_string()).join("comm"))
                .is_ok_and(|comm| comm.trim_end_matches('\n') == KUBELET)
        })
        .collect();
    if named.is_empty() {
        return Err(Error::NotRunning);
    }
    named.sort_unstable();

    let inspect = |pid: u32| move |source| Error::Inspect { pid, source };
    let init = proc.join("1");
    let init_mnt = fs::read_link(init.join("ns/mnt")).map_err(inspect(1))?;
    let init_uid = fs::metadata(&init).map_err(inspect(1))?.uid();
    let init_cgroup = fs::read_to_string(init.join("cgroup"))
        .map_err(inspect(1))
        .map(|text| unified_path(&text).map(str::to_owned))?
        .ok_or(Error::NoUnifiedCgroup { pid: 1 })?;

    let mut found: Option<(u32, String)> = None;
    let mut seen = Vec::new();
    for pid in named {
        let dir = proc.join(pid.to_string());
        let trusted = fs::metadata(&dir).is_ok_and(|m| m.uid() == init_uid)
            && fs::read_link(dir.join("ns/mnt")).is_ok_and(|mnt| mnt == init_mnt);
        if !trusted {
            continue;
        }
        let Some(path) = fs::read_to_string(dir.join("cgroup"))
            .ok()
            .and_then(|text| unified_path(&text).map(str::to_owned))
        else {
            continue;
        };
        if !seen.contains(&path) {
            seen.push(path.clone());
        }
        found.get_or_insert((pid, path));
    }
    if seen.len() > 1 {
        return Err(Error::Ambiguous(seen));
    }
    let (pid, path) = found.ok_or(Error::NotRunning)?;
    let relative = resolve(&path, &init_cgroup).ok_or_else(|| Error::Unresolvable {
        pid,
        path: path.clone(),
    })?;
    let full = cgroup2_mount.join(relative);
    if !full.is_dir() {
        return Err(Error::Missing { pid, path: full });
    }
    Ok(full)
}

/// The path of the cgroup v2 line (`0::<path>`) of a `/proc/<pid>/cgroup` file.
fn unified_path(text: &str) -> Option<&str> {
    text.lines()
        .find_map(|line| line.strip_prefix("0::"))
        .map(str::trim_end)
        .filter(|path| path.starts_with('/'))
}

/// `path` (as this process sees another's cgroup) relative to the top of the hierarchy, given
/// how this process sees PID 1's (`init`, which lives at the top): in a cgroup namespace both
/// start with one `..` per level the namespace's root is below the top.
fn resolve(path: &str, init: &str) -> Option<PathBuf> {
    let ups = |p: &str| {
        p.split('/')
            .filter(|c| !c.is_empty())
            .take_while(|c| *c == "..")
            .count()
    };
    let depth = ups(init);
    if ups(path) != depth {
        return None;
    }
    let rest: Vec<&str> = path
        .split('/')
        .filter(|c| !c.is_empty())
        .skip(depth)
        .collect();
    if rest.iter().any(|c| *c == ".." || *c == ".") {
        return None;
    }
    Some(rest.iter().collect())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    /// A fake `/proc` and cgroup2 mount in a temporary directory, removed on drop.
    struct Fake {
        root: PathBuf,
    }

    impl Fake {
        fn new(name: &str) -> Self {
            let root =
                std::env::temp_dir().join(format!("meshlet-kubelet-{name}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&root);
            fs::create_dir_all(root.join("proc")).unwrap();
            fs::create_dir_all(root.join("cgroup")).unwrap();
            Self { root }
        }

        fn proc(&self) -> PathBuf {
            self.root.join("proc")
        }

        fn mount(&self) -> PathBuf {
            self.root.join("cgroup")
        }

        /// A process: its name, cgroup line and mount namespace.
        fn process(&self, pid: u32, comm: &str, cgroup: &str, mnt: &str) {
            let dir = self.proc().join(pid.to_string());
            fs::create_dir_all(dir.join("ns")).unwrap();
            fs::write(dir.join("comm"), format!("{comm}\n")).unwrap();
            fs::write(
                dir.join("cgroup"),
                format!("12:cpu,cpuacct:/whatever\n0::{cgroup}\n"),
            )
            .unwrap();
            symlink(mnt, dir.join("ns/mnt")).unwrap();
        }

        fn cgroup(&self, path: &str) -> PathBuf {
            let dir = self.mount().join(path);
            fs::create_dir_all(&dir).unwrap();
            dir
        }
    }

    impl Drop for Fake {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.root);
        }
    }

    const HOST_MNT: &str = "mnt:[4026531841]";

    #[test]
    fn finds_kubelet_and_ignores_impostors_in_containers() {
        let fake = Fake::new("found");
        fake.process(1, "systemd", "/init.scope", HOST_MNT);
        // A pod's process calling itself kubelet: another mount namespace.
        fake.process(
            40,
            "kubelet",
            "/kubepods.slice/kubepods-besteffort.slice/cri-containerd-1.scope",
            "mnt:[4026532999]",
        );
        fake.process(
            812,
            "containerd",
            "/system.slice/containerd.service",
            HOST_MNT,
        );
        fake.process(901, "kubelet", "/system.slice/kubelet.service", HOST_MNT);
        let want = fake.cgroup("system.slice/kubelet.service");
        assert_eq!(find(&fake.proc(), &fake.mount()).unwrap(), want);
    }

    #[test]
    fn resolves_paths_seen_from_a_cgroup_namespace() {
        let fake = Fake::new("cgroupns");
        // The agent's cgroup namespace root is three levels below the top.
        fake.process(1, "systemd", "/../../../init.scope", HOST_MNT);
        fake.process(
            77,
            "kubelet",
            "/../../../system.slice/kubelet.service",
            HOST_MNT,
        );
        let want = fake.cgroup("system.slice/kubelet.service");
        assert_eq!(find(&fake.proc(), &fake.mount()).unwrap(), want);

        assert_eq!(
            resolve("/system.slice/kubelet.service", "/init.scope"),
            Some(PathBuf::from("system.slice/kubelet.service"))
        );
        // Fewer levels up than the namespace is deep: a path through unknown ancestors.
        assert_eq!(resolve("/../x", "/../../init.scope"), None);
        assert_eq!(resolve("/a/../b", "/"), None);
    }

    #[test]
    fn says_why_when_there_is_no_single_kubelet() {
        let fake = Fake::new("missing");
        // No kubelet: nothing else is looked at (PID 1 is not even there).
        fake.process(5, "kubelet-wannabe", "/system.slice/k.service", HOST_MNT);
        assert!(matches!(
            find(&fake.proc(), &fake.mount()),
            Err(Error::NotRunning)
        ));

        fake.process(6, "kubelet", "/system.slice/kubelet.service", HOST_MNT);
        let err = find(&fake.proc(), &fake.mount()).unwrap_err();
        assert!(
            matches!(err, Error::Inspect { pid: 1, .. }),
            "PID 1 cannot be compared with: {err}"
        );

        fake.process(1, "systemd", "/init.scope", HOST_MNT);
        let err = find(&fake.proc(), &fake.mount()).unwrap_err();
        assert!(
            matches!(err, Error::Missing { pid: 6, .. }),
            "the cgroup directory does not exist: {err}"
        );

        fake.process(7, "kubelet", "/user.slice/session-1.scope", HOST_MNT);
        let err = find(&fake.proc(), &fake.mount()).unwrap_err();
        assert!(err.to_string().contains("--kubelet-cgroup"), "{err}");
        assert!(matches!(err, Error::Ambiguous(ref seen) if seen.len() == 2));
    }

    #[test]
    fn cgroup_v2_line_is_picked_out() {
        assert_eq!(
            unified_path("1:name=systemd:/x\n0::/system.slice/kubelet.service\n"),
            Some("/system.slice/kubelet.service")
        );
        assert_eq!(unified_path("1:name=systemd:/x\n"), None);
    }
}
