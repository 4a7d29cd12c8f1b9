//! Where the kernel filesystems capture needs are mounted, read from `/proc/self/mountinfo`.
//!
//! The cgroup2 mount is not always `/sys/fs/cgroup` (hybrid layouts put it at
//! `/sys/fs/cgroup/unified`), and bpffs may be mounted anywhere, so neither is assumed.
//!
//! Not every cgroup2 mount shows the whole hierarchy: in a container with a cgroup namespace of
//! its own, `/sys/fs/cgroup` shows the container's cgroup as if it were the root. Programs
//! attached there would see only the container's own sockets, so [`find_cgroup2`] tells the
//! root of the hierarchy from such a view: the root cgroup is the only one without a
//! `cgroup.events` file.

use std::path::{Path, PathBuf};

/// One line of `/proc/self/mountinfo`, the fields capture cares about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// Where the filesystem is mounted.
    pub mount_point: PathBuf,
    /// Its type (`cgroup2`, `bpf`, ...).
    pub fs_type: String,
}

/// Parses the text of a `mountinfo` file. Malformed lines are skipped.
pub fn parse_mountinfo(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            // "36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue"
            let (before, after) = line.split_once(" - ")?;
            let mount_point = before.split(' ').nth(4)?;
            let fs_type = after.split(' ').next()?;
            Some(Mount {
                mount_point: PathBuf::from(unescape(mount_point)),
                fs_type: fs_type.to_owned(),
            })
        })
        .collect()
}

/// The mounts of the calling process.
pub fn mounts() -> std::io::Result<Vec<Mount>> {
    Ok(parse_mountinfo(&std::fs::read_to_string(
        "/proc/self/mountinfo",
    )?))
}

/// The first mount point of a filesystem of type `fs_type`.
pub fn find(mounts: &[Mount], fs_type: &str) -> Option<PathBuf> {
    mounts
        .iter()
        .find(|m| m.fs_type == fs_type)
        .map(|m| m.mount_point.clone())
}

/// What [`find_cgroup2`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cgroup2 {
    /// A mount that shows the root of the cgroup2 hierarchy: every cgroup of the machine is
    /// below it.
    Root(PathBuf),
    /// cgroup2 is mounted, but every mount shows a cgroup below the root (a container's own
    /// cgroup namespace, or a bind mount of a subtree): these mount points.
    Nested(Vec<PathBuf>),
    /// No cgroup2 filesystem is mounted.
    Missing,
}

/// The cgroup2 mount that shows the whole hierarchy, preferred over any other cgroup2 mount
/// (a container may see the host's hierarchy and its own namespaced view side by side).
pub fn find_cgroup2(mounts: &[Mount]) -> Cgroup2 {
    let cgroup2: Vec<&Path> = mounts
        .iter()
        .filter(|m| m.fs_type == "cgroup2")
        .map(|m| m.mount_point.as_path())
        .collect();
    if cgroup2.is_empty() {
        return Cgroup2::Missing;
    }
    match cgroup2.iter().find(|dir| is_hierarchy_root(dir)) {
        Some(root) => Cgroup2::Root(root.to_path_buf()),
        None => Cgroup2::Nested(cgroup2.iter().map(|dir| dir.to_path_buf()).collect()),
    }
}

/// Whether the cgroup2 directory `dir` is the root of its hierarchy: the kernel gives every
/// cgroup but the root a `cgroup.events` file. A directory that cannot be read counts as not
/// the root.
pub fn is_hierarchy_root(dir: &Path) -> bool {
    dir.is_dir()
        && matches!(
            std::fs::symlink_metadata(dir.join("cgroup.events")),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound
        )
}

/// The type of the filesystem that holds `path` (the longest mount point that is a prefix).
pub fn fs_type_of<'a>(mounts: &'a [Mount], path: &Path) -> Option<&'a str> {
    mounts
        .iter()
        .filter(|m| path.starts_with(&m.mount_point))
        .max_by_key(|m| m.mount_point.components().count())
        .map(|m| m.fs_type.as_str())
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo` octal.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let octal = std::str::from_utf8(&bytes[i + 1..i + 4]).unwrap_or("0");
            out.push(u8::from_str_radix(octal, 8).unwrap_or(b'?'));
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
25 30 0:23 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
31 25 0:26 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
42 31 0:39 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
50 25 0:40 / /sys/fs/bpf rw,relatime - bpf bpf rw,mode=700
51 30 0:41 / /mnt/with\\040space rw - tmpfs tmpfs rw
garbage line without separator
";

    #[test]
    fn finds_cgroup2_in_a_hybrid_layout() {
        let mounts = parse_mountinfo(HYBRID);
        assert_eq!(
            find(&mounts, "cgroup2"),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(find(&mounts, "bpf"), Some(PathBuf::from("/sys/fs/bpf")));
        assert_eq!(find(&mounts, "nfs"), None);
    }

    #[test]
    fn type_of_a_path_is_its_deepest_mount() {
        let mounts = parse_mountinfo(HYBRID);
        assert_eq!(
            fs_type_of(&mounts, Path::new("/sys/fs/bpf/meshlet/maps")),
            Some("bpf")
        );
        assert_eq!(
            fs_type_of(&mounts, Path::new("/sys/fs/cgroup/unified/x")),
            Some("cgroup2")
        );
        assert_eq!(fs_type_of(&mounts, Path::new("/sys/kernel")), Some("sysfs"));
        assert_eq!(fs_type_of(&mounts, Path::new("/etc")), None);
    }

    /// Two directories standing in for cgroup2 mounts: `root/` (no `cgroup.events`, like the
    /// root cgroup) and `nested/` (with one, like a container's namespaced view). Removed on
    /// drop.
    struct FakeCgroups(PathBuf);

    impl FakeCgroups {
        fn new(name: &str) -> Self {
            let dir = std::env::temp_dir().join(format!("meshlet-{name}-{}", std::process::id()));
            std::fs::create_dir_all(dir.join("root")).unwrap();
            std::fs::create_dir_all(dir.join("nested")).unwrap();
            std::fs::write(dir.join("nested/cgroup.events"), "populated 1\nfrozen 0\n").unwrap();
            Self(dir)
        }

        fn mountinfo(&self, dirs: &[&str]) -> Vec<Mount> {
            let text: String = dirs
                .iter()
                .enumerate()
                .map(|(i, dir)| {
                    format!(
                        "{} 31 0:{} / {} rw,relatime - cgroup2 cgroup2 rw\n",
                        40 + i,
                        38 + i,
                        self.0.join(dir).display()
                    )
                })
                .collect();
            parse_mountinfo(&format!("25 30 0:23 / /sys rw - sysfs sysfs rw\n{text}"))
        }
    }

    impl Drop for FakeCgroups {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn the_hierarchy_root_is_preferred_over_a_namespaced_view() {
        let fake = FakeCgroups::new("cgroup2-prefer");
        assert!(is_hierarchy_root(&fake.0.join("root")));
        assert!(!is_hierarchy_root(&fake.0.join("nested")));
        assert!(!is_hierarchy_root(&fake.0.join("missing")));
        for order in [["nested", "root"], ["root", "nested"]] {
            assert_eq!(
                find_cgroup2(&fake.mountinfo(&order)),
                Cgroup2::Root(fake.0.join("root")),
                "{order:?}"
            );
        }
    }

    #[test]
    fn a_namespaced_cgroup_view_alone_is_not_taken_for_the_root() {
        let fake = FakeCgroups::new("cgroup2-nested");
        assert_eq!(
            find_cgroup2(&fake.mountinfo(&["nested"])),
            Cgroup2::Nested(vec![fake.0.join("nested")])
        );
        assert_eq!(find_cgroup2(&fake.mountinfo(&[])), Cgroup2::Missing);
    }

    #[test]
    fn unescapes_octal_in_mount_points() {
        let mounts = parse_mountinfo(HYBRID);
        assert!(
            mounts
                .iter()
                .any(|m| m.mount_point == Path::new("/mnt/with space"))
        );
        assert_eq!(mounts.len(), 6);
    }
}
