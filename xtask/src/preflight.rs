//! Checks that the end-to-end tests can run here, and finds what a test run left behind.
//!
//! The tests need root, cgroup v2, a bpffs, and a kernel with the eBPF features meshlet uses.
//! When any is missing the test command fails and says which: it never skips.

use std::{fs, path::PathBuf, process::Command};

use anyhow::{Context as _, bail};

/// Prefix of every network namespace, cgroup and bpffs directory a test creates.
/// Must match `meshlet_tests::TEST_PREFIX`.
const TEST_PREFIX: &str = "mlt-";

/// Minimum kernel: see docs/operations.md for which feature needs which version.
const MIN_KERNEL: (u32, u32) = (5, 15);

pub fn is_root() -> bool {
    // The effective uid owns /proc/self; no libc call needed.
    fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        .unwrap_or(false)
}

/// Fails with a readable reason when the end-to-end tests cannot run here.
pub fn check() -> anyhow::Result<()> {
    if !is_root() {
        bail!("the end-to-end tests load eBPF programs and create network namespaces: run as root");
    }
    let release =
        fs::read_to_string("/proc/sys/kernel/osrelease").context("read kernel release")?;
    let version = parse_kernel(release.trim())
        .with_context(|| format!("cannot parse kernel release {release:?}"))?;
    if version < MIN_KERNEL {
        bail!(
            "kernel {} is too old: meshlet needs >= {}.{} (bpf links on cgroups, SO_NETNS_COOKIE, sk_lookup)",
            release.trim(),
            MIN_KERNEL.0,
            MIN_KERNEL.1
        );
    }
    let mountinfo =
        fs::read_to_string("/proc/self/mountinfo").context("read /proc/self/mountinfo")?;
    if !mountinfo.lines().any(|l| l.contains(" - cgroup2 ")) {
        bail!("no cgroup2 filesystem is mounted: the tests need the unified cgroup hierarchy");
    }
    if !mountinfo.lines().any(|l| l.contains(" - bpf ")) {
        println!("mounting bpffs at /sys/fs/bpf");
        let status = Command::new("mount")
            .args(["-t", "bpf", "bpf", "/sys/fs/bpf"])
            .status()?;
        if !status.success() {
            bail!("no bpffs is mounted and `mount -t bpf bpf /sys/fs/bpf` failed");
        }
    }
    for tool in ["ip", "bpftool"] {
        if Command::new(tool).arg("-V").output().is_err() {
            bail!("{tool} is not installed (cargo xtask setup installs it)");
        }
    }
    Ok(())
}

fn parse_kernel(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// Everything with the test prefix: network namespaces, cgroups, bpffs directories.
pub fn leftovers() -> anyhow::Result<Vec<String>> {
    let mut found = Vec::new();
    if let Ok(entries) = fs::read_dir("/var/run/netns") {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(TEST_PREFIX) {
                found.push(format!("network namespace {name}"));
            }
        }
    }
    for dir in mount_points(&["cgroup2", "bpf"])? {
        for entry in fs::read_dir(&dir).into_iter().flatten().flatten() {
            if entry.file_name().to_string_lossy().starts_with(TEST_PREFIX) {
                found.push(entry.path().display().to_string());
            }
        }
    }
    Ok(found)
}

/// Removes what an earlier, killed test run left behind (a run that ends normally leaves
/// nothing: its guards clean up).
pub fn remove_leftovers() -> anyhow::Result<()> {
    let leftovers = leftovers()?;
    if leftovers.is_empty() {
        return Ok(());
    }
    println!(
        "removing leftovers of an earlier, interrupted test run:\n  {}",
        leftovers.join("\n  ")
    );
    if let Ok(entries) = fs::read_dir("/var/run/netns") {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(TEST_PREFIX) {
                let _ = Command::new("ip").args(["netns", "del", &name]).status();
            }
        }
    }
    for dir in mount_points(&["cgroup2", "bpf"])? {
        for entry in fs::read_dir(&dir).into_iter().flatten().flatten() {
            if entry.file_name().to_string_lossy().starts_with(TEST_PREFIX) {
                remove_tree(&entry.path());
            }
        }
    }
    Ok(())
}

/// Removes a cgroup or bpffs tree bottom-up: cgroups only go with `rmdir`, after their
/// processes are killed (`cgroup.kill`).
fn remove_tree(path: &std::path::Path) {
    let kill = path.join("cgroup.kill");
    if kill.exists() {
        let _ = fs::write(&kill, "1");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    if let Ok(entries) = fs::read_dir(path) {
        for entry in entries.flatten() {
            let child = entry.path();
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_tree(&child);
            } else {
                // bpffs pins go with unlink; cgroupfs files refuse it and go with their rmdir.
                let _ = fs::remove_file(&child);
            }
        }
    }
    let _ = fs::remove_dir(path);
}

fn mount_points(types: &[&str]) -> anyhow::Result<Vec<PathBuf>> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo")?;
    Ok(mountinfo
        .lines()
        .filter_map(|line| {
            let (before, after) = line.split_once(" - ")?;
            let fs_type = after.split(' ').next()?;
            if !types.contains(&fs_type) {
                return None;
            }
            Some(PathBuf::from(before.split(' ').nth(4)?))
        })
        .collect())
}
