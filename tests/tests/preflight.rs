//! `meshlet preflight`, the real binary, on this machine: it passes on a cgroup and a bpffs
//! directory of the test's own, and each thing it checks, broken on purpose, fails by name
//! with exit status 1: a pin directory off bpffs, a cgroup root off cgroup2, another program
//! at capture's hooks (until allowed), a container's namespaced cgroup view taken for the
//! host's. Everything is made under the test's own cgroup and bpffs directory, never the
//! machine's.

use std::{
    ffi::OsStr,
    fs,
    path::{Path, PathBuf},
    process::{Command, Output},
};

use meshlet::capture::{self, Capture};
use meshlet_tests::{
    BpffsGuard, CgroupGuard,
    bpf::{Attach, ForeignProgram},
    process, require_root,
};
use serde_json::Value;

/// What one run of `meshlet preflight` said.
#[derive(Debug)]
struct Run {
    /// The exit status.
    code: Option<i32>,
    /// The report (`-o json`).
    report: Value,
}

impl Run {
    /// The check named `name`.
    fn check(&self, name: &str) -> &Value {
        self.report["checks"]
            .as_array()
            .expect("checks")
            .iter()
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("no check {name:?} in {:#}", self.report))
    }

    /// Asserts that the check `name` failed with a reason containing `want`, and that it is
    /// the only failure.
    fn assert_fails(&self, name: &str, want: &str) -> &Value {
        assert_eq!(self.code, Some(1), "{:#}", self.report);
        assert_eq!(self.report["passed"], false);
        let failed: Vec<&Value> = self.report["checks"]
            .as_array()
            .expect("checks")
            .iter()
            .filter(|c| c["status"] == "fail")
            .map(|c| &c["name"])
            .collect();
        assert_eq!(failed, [name], "{:#}", self.report);
        let check = self.check(name);
        let reason = check["reason"].as_str().expect("a failure has a reason");
        assert!(reason.contains(want), "want {want:?} in: {reason}");
        assert!(!check["fix"].as_str().unwrap_or_default().is_empty());
        check
    }

    /// Asserts that every check passed (the capabilities check may warn, see
    /// [`capabilities_status`]).
    fn assert_passes(&self) {
        assert_eq!(self.code, Some(0), "{:#}", self.report);
        assert_eq!(self.report["passed"], true);
        for check in self.report["checks"].as_array().expect("checks") {
            let want = if check["name"] == "capabilities" {
                capabilities_status()
            } else {
                "pass"
            };
            assert_eq!(check["status"], want, "{check:#}");
        }
    }
}

/// What the capabilities check must say of this process's capabilities: `warn` when an
/// optional one is missing (CAP_SYS_RESOURCE or CAP_NET_BIND_SERVICE; root in a container
/// often lacks the first), else `pass`.
fn capabilities_status() -> &'static str {
    let status = fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    let mask = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|m| u64::from_str_radix(m.trim(), 16).ok())
        .expect("CapEff");
    if mask & (1 << 24) != 0 && mask & (1 << 10) != 0 {
        "pass"
    } else {
        "warn"
    }
}

/// `meshlet preflight` with `args`, with none of its settings taken from the environment.
fn command(args: &[&OsStr]) -> Command {
    let mut command = Command::new(process::meshlet_binary());
    strip_env(&mut command);
    command.arg("preflight").args(args);
    command
}

fn strip_env(command: &mut Command) {
    for var in [
        "MESHLET_CGROUP_ROOT",
        "MESHLET_BPFFS_DIR",
        "MESHLET_ALLOW_CGROUP_PROGRAMS",
    ] {
        command.env_remove(var);
    }
}

fn parse(output: Output) -> Run {
    let stdout = String::from_utf8_lossy(&output.stdout);
    let report = serde_json::from_str(&stdout).unwrap_or_else(|err| {
        panic!(
            "preflight -o json printed no JSON ({err}): {stdout}\nstderr: {}",
            String::from_utf8_lossy(&output.stderr)
        )
    });
    Run {
        code: output.status.code(),
        report,
    }
}

/// Runs `meshlet preflight -o json` with `args`.
fn preflight(args: &[&OsStr]) -> Run {
    let mut command = command(args);
    command.args(["-o", "json"]);
    parse(command.output().expect("run meshlet preflight"))
}

/// Runs `meshlet preflight` with `args` and returns its exit status and table.
fn preflight_text(args: &[&OsStr]) -> (Option<i32>, String) {
    let output = command(args).output().expect("run meshlet preflight");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
    )
}

/// `--cgroup-root <cgroup> --bpffs-dir <bpffs>`.
fn at<'a>(cgroup: &'a Path, bpffs: &'a Path) -> Vec<&'a OsStr> {
    vec![
        OsStr::new("--cgroup-root"),
        cgroup.as_os_str(),
        OsStr::new("--bpffs-dir"),
        bpffs.as_os_str(),
    ]
}

/// An ordinary directory under the temporary directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(what: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("mlt-{}-{what}", std::process::id()));
        fs::create_dir_all(&dir).unwrap_or_else(|err| panic!("create {}: {err}", dir.display()));
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

#[test]
fn passes_on_this_machine_with_a_cgroup_and_bpffs_dir_of_its_own() {
    require_root();
    let (cgroup, bpffs) = (CgroupGuard::new("preflight"), BpffsGuard::new("preflight"));
    let run = preflight(&at(cgroup.path(), bpffs.path()));
    run.assert_passes();
    let loaded = run.check("bpf programs")["detail"].as_str().unwrap();
    assert!(
        loaded.contains("meshlet_connect4") && loaded.contains("meshlet_sk_lookup"),
        "{loaded}"
    );
    assert!(!bpffs.path().exists(), "the bpffs probe leaves nothing");

    let (code, table) = preflight_text(&at(cgroup.path(), bpffs.path()));
    assert_eq!(code, Some(0), "{table}");
    for name in [
        "kernel",
        "lsm",
        "cgroup2",
        "bpffs",
        "bpf programs",
        "cgroup programs",
    ] {
        assert!(
            table
                .lines()
                .any(|l| l.starts_with(&format!("ok    {name:<16} "))),
            "no ok line for {name}:\n{table}"
        );
    }
    assert!(table.contains("preflight passed: 7 checks"), "{table}");
}

#[test]
fn meshlets_own_pinned_programs_pass_and_the_same_programs_unpinned_here_do_not() {
    require_root();
    let cgroup = CgroupGuard::new("preflight-own");
    let (ours, elsewhere) = (
        BpffsGuard::new("preflight-own"),
        BpffsGuard::new("preflight-elsewhere"),
    );
    let config =
        capture::Config::resolve(Some(cgroup.path().into()), Some(ours.path().into())).unwrap();
    // An agent that stopped leaves its capture attached and pinned, like one still draining
    // during an upgrade.
    drop(Capture::install(config).expect("install capture"));

    let run = preflight(&at(cgroup.path(), ours.path()));
    run.assert_passes();
    let detail = run.check("cgroup programs")["detail"].as_str().unwrap();
    assert!(detail.contains("meshlet's own: 6"), "{detail}");

    // Pins elsewhere (another agent's): its programs are someone else's here, named in full
    // from their BTF although the kernel keeps only 15 bytes of a name.
    let run = preflight(&at(cgroup.path(), elsewhere.path()));
    let check = run.assert_fails(
        "cgroup programs",
        &format!(
            "cgroup/connect4 on {}: program \"meshlet_connect4\"",
            cgroup.path().display()
        ),
    );
    let reason = check["reason"].as_str().unwrap();
    for hook in [
        "cgroup/connect6",
        "cgroup/getpeername4",
        "cgroup/getpeername6",
        "cgroup/sock_ops",
        "cgroup/getsockopt",
    ] {
        assert!(reason.contains(hook), "{hook}: {reason}");
    }
}

#[test]
fn a_bpffs_dir_off_bpffs_fails_by_name() {
    require_root();
    let (cgroup, tmp) = (CgroupGuard::new("preflight-nobpffs"), TempDir::new("pins"));
    let run = preflight(&at(cgroup.path(), &tmp.0));
    let check = run.assert_fails("bpffs", "is not on a bpf filesystem");
    assert!(
        check["reason"]
            .as_str()
            .unwrap()
            .contains(&tmp.0.display().to_string())
    );
    assert!(check["fix"].as_str().unwrap().contains("--bpffs-dir"));
}

#[test]
fn a_cgroup_root_off_cgroup2_fails_by_name() {
    require_root();
    let (tmp, bpffs) = (
        TempDir::new("cgroup"),
        BpffsGuard::new("preflight-nocgroup"),
    );
    let run = preflight(&at(&tmp.0, bpffs.path()));
    let check = run.assert_fails("cgroup2", "is not on a cgroup2 filesystem");
    assert!(check["fix"].as_str().unwrap().contains("--cgroup-root"));
    assert_eq!(run.check("cgroup programs")["status"], "skip");
}

#[test]
fn another_program_at_capture_hooks_fails_by_hook_and_name_until_allowed() {
    require_root();
    let cgroup = CgroupGuard::new("preflight-foreign");
    let bpffs = BpffsGuard::new("preflight-foreign");
    let child = cgroup.path().join("child");
    fs::create_dir(&child).unwrap();
    for attach in [Attach::Link, Attach::Multi] {
        let foreign = ForeignProgram::connect4(cgroup.path(), "foreign_conn4", attach);
        let named = format!(
            "cgroup/connect4 on {}: program \"foreign_conn4\" (id {}) is not meshlet's",
            cgroup.path().display(),
            foreign.id()
        );
        let (code, table) = preflight_text(&at(cgroup.path(), bpffs.path()));
        assert_eq!(code, Some(1), "{attach:?}: {table}");
        assert!(
            table.contains(&format!("FAIL  cgroup programs  {named}")),
            "{attach:?}: {table}"
        );
        assert!(
            table.contains("fix: another mesh or Cilium's socket load balancer"),
            "{table}"
        );

        // Passed down to a child cgroup: it runs for the child's sockets too.
        preflight(&at(&child, bpffs.path())).assert_fails(
            "cgroup programs",
            &format!(
                "cgroup/connect4 on {} (attached to an ancestor cgroup): program \
                 \"foreign_conn4\"",
                child.display()
            ),
        );

        let mut args = at(cgroup.path(), bpffs.path());
        args.extend(["--allow-cgroup-program", "foreign_conn4"].map(OsStr::new));
        let run = preflight(&args);
        run.assert_passes();
        let detail = run.check("cgroup programs")["detail"].as_str().unwrap();
        let allowed = format!(
            "allowed: foreign_conn4 (cgroup/connect4, id {})",
            foreign.id()
        );
        assert!(detail.contains(&allowed), "{detail}");

        // The DaemonSet's way: comma-separated in the environment.
        let mut command = command(&at(cgroup.path(), bpffs.path()));
        command
            .env(
                "MESHLET_ALLOW_CGROUP_PROGRAMS",
                "cil_sock4_connect,foreign_conn4",
            )
            .args(["-o", "json"]);
        parse(command.output().unwrap()).assert_passes();

        drop(foreign);
        preflight(&at(cgroup.path(), bpffs.path())).assert_passes();
    }
}

#[test]
fn a_containers_own_cgroup_namespace_is_not_taken_for_the_host_cgroup_root() {
    require_root();
    let cgroup = CgroupGuard::new("preflight-cgroupns");
    let bpffs = BpffsGuard::new("preflight-cgroupns");
    let container = cgroup.path().join("container");
    fs::create_dir(&container).unwrap();
    let cgroup2 = meshlet_tests::cgroup2_mount();
    // A container with a cgroup namespace of its own, whose cgroup2 mount shows its own cgroup
    // (as the runtime mounts it when the host's is not mounted in): a mount namespace and a
    // cgroup namespace of a process in `container`, the host's cgroup2 mount replaced there by
    // a fresh one. Nothing outside that process's namespaces changes.
    let mut command = process::in_pod("unshare", Path::new("/proc/self/ns/net"), &container);
    strip_env(&mut command);
    command
        .args(["--cgroup", "--mount", "--propagation", "private", "sh", "-c"])
        .arg(r#"umount -l "$2" && mount -t cgroup2 none "$2" && exec "$1" preflight --bpffs-dir "$3" -o json"#)
        .arg("sh")
        .args([
            process::meshlet_binary().as_os_str(),
            cgroup2.as_os_str(),
            bpffs.path().as_os_str(),
        ]);
    let run = parse(command.output().expect("run unshare"));
    let check = run.assert_fails("cgroup2", "would only capture its own container");
    let reason = check["reason"].as_str().unwrap();
    assert!(reason.contains(&cgroup2.display().to_string()), "{reason}");
    let fix = check["fix"].as_str().unwrap();
    assert!(
        fix.contains("/sys/fs/cgroup") && fix.contains("--cgroup-root"),
        "{fix}"
    );
    assert_eq!(run.check("cgroup programs")["status"], "skip");
}
