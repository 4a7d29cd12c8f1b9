//! Where the kernel filesystems capture needs are mounted, read from `/proc/self/mountinfo`.
//!
//! The cgroup2 mount is not always `/sys/fs/cgroup` (hybrid layouts put it at
//! `/sys/fs/cgroup/unified`), and bpffs may be mounted anywhere, so neither is assumed.

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
