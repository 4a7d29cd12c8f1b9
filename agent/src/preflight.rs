//! Preflight: whether this node can run the agent, found out the way the agent itself would
//! find it, with each failure named and its fix said.
//!
//! `meshlet preflight` prints the [`Report`] (a DaemonSet init container runs it too); the
//! agent calls [`gate`] before it touches the kernel, and stops with every failure at once
//! rather than the first one it trips on. The checks, in the order they run:
//!
//! - `kernel`: the running release is at least [`capture::MIN_KERNEL`], and the kernel has
//!   every program type, map type and helper the programs use (probed, and named when missing:
//!   [`capture::features`]).
//! - `capabilities`: the effective set holds what capture needs; a missing optional one warns.
//! - `lsm`: the AppArmor profile, SELinux context and seccomp mode this process runs under,
//!   and whether they block what the agent does: entering a network namespace (`setns` into
//!   this process's own, a no-op) and writing to bpffs.
//! - `cgroup2`: the cgroup root (`--cgroup-root`, or found as capture finds it: the cgroup2
//!   mount that shows the whole hierarchy, never a container's namespaced view).
//! - `bpffs`: the pin directory is on a bpffs, and a directory can be made there.
//! - `bpf programs`: every program of the eBPF object loads (the verifier and the kernel agree
//!   to every BPF feature meshlet uses); nothing is attached.
//! - `cgroup programs`: no program but meshlet's runs at the cgroup root's hooks that capture
//!   uses (another mesh, Cilium's socket load balancer), unless allowed by name.
//!
//! Checks only read, except two probes that undo themselves: a directory made and removed on
//! bpffs, and the programs loaded and unloaded.

use std::{
    fmt, fs, io,
    os::fd::AsFd as _,
    path::{Path, PathBuf},
};

use serde::ser::SerializeStruct as _;

use crate::{
    capture::{self, mounts, pins},
    sys::{Netns, bpf},
};

/// The name of the kernel version check.
pub const KERNEL: &str = "kernel";
/// The name of the capabilities check.
pub const CAPABILITIES: &str = "capabilities";
/// The name of the confinement (AppArmor, SELinux, seccomp) check.
pub const LSM: &str = "lsm";
/// The name of the cgroup root check.
pub const CGROUP2: &str = "cgroup2";
/// The name of the pin directory check.
pub const BPFFS: &str = "bpffs";
/// The name of the program load check.
pub const BPF_PROGRAMS: &str = "bpf programs";
/// The name of the check for other programs at capture's cgroup hooks.
pub const CGROUP_PROGRAMS: &str = "cgroup programs";

/// What to check: the agent's own settings, so that preflight looks where the agent will.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Config {
    /// `--cgroup-root`; `None`: found from `/proc/self/mountinfo`, as capture finds it.
    pub cgroup_root: Option<PathBuf>,
    /// `--bpffs-dir`; `None`: `<bpffs mount>/meshlet`.
    pub bpffs_dir: Option<PathBuf>,
    /// Names of programs of others allowed at capture's cgroup hooks
    /// (`--allow-cgroup-program`).
    pub allowed_programs: Vec<String>,
    /// Load the eBPF programs into the kernel (the `bpf programs` check); when off, that check
    /// is skipped (the agent, which loads them right after, can save the time).
    pub load_programs: bool,
    /// The eBPF object to load instead of the built-in one (`--ebpf-object`).
    pub object: Option<PathBuf>,
}

/// How one check came out.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "status", rename_all = "lowercase")]
pub enum Outcome {
    /// Fine.
    Pass {
        /// What was found.
        detail: String,
    },
    /// The agent runs, with less than it could do.
    Warn {
        /// What is missing and what it costs.
        detail: String,
        /// What to change.
        fix: String,
    },
    /// The agent cannot run as it should.
    Fail {
        /// What is wrong.
        reason: String,
        /// What to change.
        fix: String,
    },
    /// Not run: an earlier check failed for what this one needs, or it was not asked for.
    Skip {
        /// Why.
        reason: String,
    },
}

impl Outcome {
    fn fail(reason: impl Into<String>, fix: impl Into<String>) -> Self {
        Self::Fail {
            reason: reason.into(),
            fix: fix.into(),
        }
    }

    fn pass(detail: impl Into<String>) -> Self {
        Self::Pass {
            detail: detail.into(),
        }
    }
}

/// One check and how it came out.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Check {
    /// The check's name ([`KERNEL`], [`CGROUP2`], ...).
    pub name: &'static str,
    /// Its outcome.
    #[serde(flatten)]
    pub outcome: Outcome,
}

/// Every check, in the order they ran.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// The checks.
    pub checks: Vec<Check>,
}

impl Report {
    /// Whether no check failed (warnings and skipped checks pass).
    pub fn passed(&self) -> bool {
        self.failures().next().is_none()
    }

    /// The checks that failed.
    pub fn failures(&self) -> impl Iterator<Item = &Check> {
        self.checks
            .iter()
            .filter(|c| matches!(c.outcome, Outcome::Fail { .. }))
    }

    /// The checks that warned.
    pub fn warnings(&self) -> impl Iterator<Item = &Check> {
        self.checks
            .iter()
            .filter(|c| matches!(c.outcome, Outcome::Warn { .. }))
    }

    /// The check named `name`.
    pub fn check(&self, name: &str) -> Option<&Check> {
        self.checks.iter().find(|c| c.name == name)
    }
}

/// One line per check (`ok`, `warn`, `FAIL`, `skip`, its name, what was found), the fix
/// indented below each warning and failure, and a closing verdict.
impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const NAME: usize = 16;
        let indent = " ".repeat(6 + NAME + 1);
        for check in &self.checks {
            let (status, text, fix) = match &check.outcome {
                Outcome::Pass { detail } => ("ok", detail, None),
                Outcome::Warn { detail, fix } => ("warn", detail, Some(fix)),
                Outcome::Fail { reason, fix } => ("FAIL", reason, Some(fix)),
                Outcome::Skip { reason } => ("skip", reason, None),
            };
            let mut lines = text.lines();
            writeln!(
                f,
                "{status:<5} {:<NAME$} {}",
                check.name,
                lines.next().unwrap_or_default()
            )?;
            for line in lines {
                writeln!(f, "{indent}{line}")?;
            }
            if let Some(fix) = fix {
                writeln!(f, "{:6}fix: {fix}", "")?;
            }
        }
        let failed: Vec<&str> = self.failures().map(|c| c.name).collect();
        let warned = self.warnings().count();
        if failed.is_empty() {
            write!(
                f,
                "preflight passed: {} checks, {warned} warning(s)",
                self.checks.len()
            )
        } else {
            write!(
                f,
                "preflight FAILED: {} of {} checks ({}): this node cannot run the agent",
                failed.len(),
                self.checks.len(),
                failed.join(", ")
            )
        }
    }
}

/// `{"passed": bool, "checks": [{"name", "status", "detail" | "reason", "fix"?}]}`.
impl serde::Serialize for Report {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut report = serializer.serialize_struct("Report", 2)?;
        report.serialize_field("passed", &self.passed())?;
        report.serialize_field("checks", &self.checks)?;
        report.end()
    }
}

/// What [`gate`] returns when a check fails: every failure, with its reason and fix.
#[derive(Debug, thiserror::Error)]
#[error("{}", failures(.report))]
pub struct Failed {
    /// The whole report, passed checks included.
    pub report: Report,
}

fn failures(report: &Report) -> String {
    let mut text = format!(
        "this node cannot run the agent ({} preflight check(s) failed; `meshlet preflight` \
         shows them all):",
        report.failures().count()
    );
    for check in report.failures() {
        if let Outcome::Fail { reason, fix } = &check.outcome {
            text.push_str(&format!(
                "\n  {}: {}\n    fix: {fix}",
                check.name,
                reason.replace('\n', "\n    ")
            ));
        }
    }
    text
}

/// Runs every check; see the module's documentation for what each looks at.
pub fn run(config: &Config) -> Report {
    let mounts = mounts::mounts();
    let status = fs::read_to_string("/proc/self/status")
        .map_err(|err| format!("cannot read /proc/self/status: {err}"));
    let (cgroup2, cgroup_root) = cgroup2(config, &mounts);
    let (bpffs_dir, bpffs_probe, bpffs) = bpffs(config, &mounts);
    let lsm = lsm(&status, bpffs_probe.as_ref());
    let bpf_programs = if config.load_programs {
        bpf_programs(config.object.as_deref())
    } else {
        Outcome::Skip {
            reason: "not asked for".into(),
        }
    };
    let cgroup_programs = match (&cgroup_root, &bpffs_dir) {
        (Some(root), Some(dir)) => cgroup_programs(root, Some(dir), &config.allowed_programs),
        (None, _) => Outcome::Skip {
            reason: "no cgroup root to look at (see cgroup2)".into(),
        },
        // Without the pins, meshlet's own programs would pass for another mesh's.
        (Some(_), None) => Outcome::Skip {
            reason: "meshlet's own programs cannot be told apart without its pins (see bpffs)"
                .into(),
        },
    };
    let checks = [
        (KERNEL, kernel()),
        (CAPABILITIES, capabilities(&status)),
        (LSM, lsm),
        (CGROUP2, cgroup2),
        (BPFFS, bpffs),
        (BPF_PROGRAMS, bpf_programs),
        (CGROUP_PROGRAMS, cgroup_programs),
    ];
    Report {
        checks: checks
            .into_iter()
            .map(|(name, outcome)| Check { name, outcome })
            .collect(),
    }
}

/// [`run`], for the agent's start: the report when no check failed (it may hold warnings to
/// log), else every failure.
pub fn gate(config: &Config) -> Result<Report, Failed> {
    let report = run(config);
    if report.passed() {
        Ok(report)
    } else {
        Err(Failed { report })
    }
}

// ---- kernel ----

fn kernel() -> Outcome {
    match nix::sys::utsname::uname() {
        Ok(uts) => {
            let release = uts.release().to_string_lossy();
            match kernel_outcome(&release) {
                failed @ Outcome::Fail { .. } => failed,
                fine => features_outcome(
                    &release,
                    &capture::features::missing(capture::kernel_version(&release)),
                )
                .unwrap_or(fine),
            }
        }
        Err(err) => Outcome::fail(
            format!("uname(2) failed: {err}"),
            "this is not a Linux meshlet can run on",
        ),
    }
}

/// The `kernel` outcome when the kernel, of a release new enough, lacks `missing` features
/// (probed): `None` when it lacks none.
fn features_outcome(release: &str, missing: &[&capture::features::Feature]) -> Option<Outcome> {
    (!missing.is_empty()).then(|| {
        Outcome::fail(
            format!(
                "Linux {release} lacks what meshlet needs:\n{}",
                capture::features::describe(missing)
            ),
            "run the node on a kernel built with these (docs/operations.md, Kernels)",
        )
    })
}

/// The `kernel` outcome for the release `uname -r` prints.
fn kernel_outcome(release: &str) -> Outcome {
    let (major, minor) = capture::MIN_KERNEL;
    match capture::kernel_version(release) {
        Some(version) if version >= capture::MIN_KERNEL => Outcome::pass(format!(
            "Linux {release} (meshlet needs >= {major}.{minor})"
        )),
        Some(_) => Outcome::fail(
            format!(
                "Linux {release} is older than {major}.{minor}, the oldest meshlet runs on \
                 (it needs {})",
                capture::MIN_KERNEL_REASON
            ),
            format!(
                "run the node on Linux >= {major}.{minor} (docs/operations.md, Kernels, says \
                 which feature needs which kernel)"
            ),
        ),
        None => Outcome::Warn {
            detail: format!(
                "cannot read a version from the kernel release {release:?}; the bpf programs \
                 check is the one that tells"
            ),
            fix: format!("make sure the kernel is Linux >= {major}.{minor}"),
        },
    }
}

// ---- capabilities ----

/// A capability: its bit in the masks of `/proc/PID/status`, name, and what the agent needs it
/// for.
struct Capability {
    bit: u32,
    name: &'static str,
    why: &'static str,
}

/// What the agent cannot run without.
const REQUIRED: &[Capability] = &[
    Capability {
        bit: 39,
        name: "CAP_BPF",
        why: "load programs and create maps",
    },
    Capability {
        bit: 38,
        name: "CAP_PERFMON",
        why: "programs that read socket pointers",
    },
    Capability {
        bit: 12,
        name: "CAP_NET_ADMIN",
        why: "attach cgroup and sk_lookup programs, set socket marks",
    },
    Capability {
        bit: 21,
        name: "CAP_SYS_ADMIN",
        why: "enter pod network namespaces, pin to bpffs",
    },
    Capability {
        bit: 19,
        name: "CAP_SYS_PTRACE",
        why: "open other processes' network namespaces in /proc",
    },
];

/// What the agent runs without, with less.
const OPTIONAL: &[Capability] = &[
    Capability {
        bit: 24,
        name: "CAP_SYS_RESOURCE",
        why: "raise the open-files limit past its hard limit for many connections",
    },
    Capability {
        bit: 10,
        name: "CAP_NET_BIND_SERVICE",
        why: "serve metrics, readiness or admin on a port below 1024",
    },
];

/// The effective capability mask (`CapEff:`, hexadecimal) of a `/proc/PID/status` text.
pub fn effective_capabilities(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
}

fn capabilities(status: &Result<String, String>) -> Outcome {
    let status = match status {
        Ok(status) => status,
        Err(err) => return Outcome::fail(err.clone(), "run the agent with /proc mounted"),
    };
    match effective_capabilities(status) {
        Some(mask) => capabilities_outcome(mask),
        None => Outcome::fail(
            "no CapEff line in /proc/self/status",
            "run the agent on Linux with /proc mounted",
        ),
    }
}

/// The `capabilities` outcome for the effective mask `mask`.
fn capabilities_outcome(mask: u64) -> Outcome {
    let missing = |caps: &'static [Capability]| -> Vec<&'static Capability> {
        caps.iter().filter(|c| mask & (1 << c.bit) == 0).collect()
    };
    let describe = |caps: &[&Capability]| {
        caps.iter()
            .map(|c| format!("{} ({})", c.name, c.why))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let fix = |caps: &[&Capability]| {
        let names: Vec<&str> = caps
            .iter()
            .map(|c| c.name.trim_start_matches("CAP_"))
            .collect();
        format!(
            "add them to the agent's container: securityContext.capabilities.add: [{}] (or \
             run it privileged)",
            names.join(", ")
        )
    };
    let (required, optional) = (missing(REQUIRED), missing(OPTIONAL));
    if !required.is_empty() {
        let mut reason = format!("missing {}", describe(&required));
        if !optional.is_empty() {
            reason.push_str(&format!("; also missing {}", describe(&optional)));
        }
        let all: Vec<_> = required.iter().chain(&optional).copied().collect();
        return Outcome::fail(reason, fix(&all));
    }
    if !optional.is_empty() {
        return Outcome::Warn {
            detail: format!(
                "CapEff {mask:016x}: every required capability; missing {}",
                describe(&optional)
            ),
            fix: fix(&optional),
        };
    }
    Outcome::pass(format!(
        "CapEff {mask:016x}: every required and optional capability"
    ))
}

// ---- lsm ----

/// One confinement mechanism and its state for this process.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Confinement {
    /// `AppArmor`, `SELinux`, `seccomp`.
    mechanism: &'static str,
    /// Its state, for people (`unconfined`, `profile "x" (enforce)`, `not enabled`).
    state: String,
    /// Whether it may refuse what the agent does.
    enforcing: bool,
    /// How to lift it for the agent's container.
    fix: &'static str,
}

const APPARMOR_FIX: &str = "run the agent unconfined by AppArmor: securityContext.appArmorProfile: \
     {type: Unconfined} (Kubernetes < 1.30: the annotation \
     container.apparmor.security.beta.kubernetes.io/<container>: unconfined)";
const SELINUX_FIX: &str =
    "run the agent as a super-privileged container: securityContext.seLinuxOptions: {type: spc_t}";
const SECCOMP_FIX: &str = "run the agent without a seccomp filter: securityContext.seccompProfile: \
     {type: Unconfined}";

/// The AppArmor confinement of a label read from `/proc/self/attr/apparmor/current`
/// (`unconfined`, `name (enforce)`, `name (complain)`, ...).
fn apparmor(label: &str) -> Confinement {
    let label = label.trim_matches(|c: char| c == '\0' || c.is_whitespace());
    let (state, enforcing) = if label.is_empty() || label == "unconfined" {
        ("unconfined".to_owned(), false)
    } else {
        let (name, mode) = match label.rsplit_once(" (") {
            Some((name, mode)) => (name, mode.trim_end_matches(')')),
            None => (label, "enforce"),
        };
        (
            format!("profile {name:?} ({mode})"),
            !matches!(mode, "complain" | "unconfined"),
        )
    };
    Confinement {
        mechanism: "AppArmor",
        state,
        enforcing,
        fix: APPARMOR_FIX,
    }
}

/// The SELinux confinement of the `enforce` file's text and the process context
/// (`user:role:type:level`): enforcing confines unless the type is unconfined (`spc_t`,
/// `unconfined_t`).
fn selinux(enforce: &str, context: &str) -> Confinement {
    let context = context.trim_matches(|c: char| c == '\0' || c.is_whitespace());
    let kind = context.split(':').nth(2).unwrap_or_default();
    let mode = if enforce.trim() == "1" {
        "enforcing"
    } else {
        "permissive"
    };
    Confinement {
        mechanism: "SELinux",
        state: format!("context {context:?} ({mode})"),
        enforcing: mode == "enforcing" && !matches!(kind, "spc_t" | "unconfined_t"),
        fix: SELINUX_FIX,
    }
}

/// The seccomp confinement from a `/proc/PID/status` text (`Seccomp: 0|1|2`).
fn seccomp(status: &str) -> Confinement {
    let mode = status
        .lines()
        .find_map(|line| line.strip_prefix("Seccomp:"))
        .map(str::trim);
    let (state, enforcing) = match mode {
        Some("0") | None => ("off", false),
        Some("1") => ("strict", true),
        Some(_) => ("filter", true),
    };
    Confinement {
        mechanism: "seccomp",
        state: state.to_owned(),
        enforcing,
        fix: SECCOMP_FIX,
    }
}

/// This process's confinement, read from /proc and /sys.
fn confinement(status: &str) -> Vec<Confinement> {
    let read = |path: &str| fs::read_to_string(path).ok();
    let selinux_enforce = read("/sys/fs/selinux/enforce");
    let apparmor_label = read("/proc/self/attr/apparmor/current").or_else(|| {
        // Before Linux 5.8 only the shared file says it, and it is SELinux's when that is on.
        (selinux_enforce.is_none() && Path::new("/sys/module/apparmor").exists())
            .then(|| read("/proc/self/attr/current"))
            .flatten()
    });
    let mut found = vec![match apparmor_label {
        Some(label) => apparmor(&label),
        None => Confinement {
            mechanism: "AppArmor",
            state: "not enabled".into(),
            enforcing: false,
            fix: APPARMOR_FIX,
        },
    }];
    found.push(match &selinux_enforce {
        Some(enforce) => selinux(
            enforce,
            &read("/proc/self/attr/current").unwrap_or_default(),
        ),
        None => Confinement {
            mechanism: "SELinux",
            state: "not enabled".into(),
            enforcing: false,
            fix: SELINUX_FIX,
        },
    });
    found.push(seccomp(status));
    found
}

/// A probe of the bpffs directory: a directory made and removed in it (in its nearest existing
/// ancestor while it does not exist yet).
#[derive(Debug)]
struct BpffsProbe {
    at: PathBuf,
    result: io::Result<()>,
}

fn probe_bpffs(dir: &Path) -> BpffsProbe {
    let at = dir
        .ancestors()
        .find(|p| p.is_dir())
        .unwrap_or(dir)
        .to_owned();
    // No dot in the name: bpffs refuses names with one (EPERM).
    let probe = at.join(format!("meshlet-preflight-{}", std::process::id()));
    let _ = fs::remove_dir(&probe);
    let result = fs::create_dir(&probe).and_then(|()| fs::remove_dir(&probe));
    BpffsProbe { at, result }
}

fn denied(err: &io::Error) -> bool {
    err.kind() == io::ErrorKind::PermissionDenied
        || matches!(err.raw_os_error(), Some(libc::EPERM | libc::EACCES))
}

fn lsm(status: &Result<String, String>, bpffs: Option<&BpffsProbe>) -> Outcome {
    let confinement = confinement(status.as_deref().unwrap_or_default());
    let mut attempts = vec![(
        "setns into this process's own network namespace".to_owned(),
        Netns::open("/proc/self/ns/net").and_then(|netns| netns.run(|| ())),
    )];
    if let Some(probe) = bpffs {
        let result = match &probe.result {
            Ok(()) => Ok(()),
            Err(err) => Err(io::Error::new(err.kind(), err.to_string())),
        };
        attempts.push((format!("mkdir in {}", probe.at.display()), result));
    }
    lsm_outcome(&confinement, &attempts)
}

/// The `lsm` outcome: what confines this process, and how the operations it tried fared.
fn lsm_outcome(confinement: &[Confinement], attempts: &[(String, io::Result<()>)]) -> Outcome {
    let states = confinement
        .iter()
        .map(|c| format!("{}: {}", c.mechanism, c.state))
        .collect::<Vec<_>>()
        .join("; ");
    let failed: Vec<(&str, &io::Error)> = attempts
        .iter()
        .filter_map(|(what, result)| result.as_ref().err().map(|err| (what.as_str(), err)))
        .collect();
    if failed.is_empty() {
        let tried: Vec<&str> = attempts.iter().map(|(what, _)| what.as_str()).collect();
        return Outcome::pass(format!("{states}; allowed: {}", tried.join(", ")));
    }
    let errors = failed
        .iter()
        .map(|(what, err)| format!("{what}: {err}"))
        .collect::<Vec<_>>()
        .join("; ");
    if !failed.iter().any(|(_, err)| denied(err)) {
        return Outcome::fail(
            format!("{errors} ({states})"),
            "see the error: the agent needs both",
        );
    }
    let enforcing: Vec<&Confinement> = confinement.iter().filter(|c| c.enforcing).collect();
    if enforcing.is_empty() {
        return Outcome::fail(
            format!(
                "{errors}, and no AppArmor profile, SELinux policy or seccomp filter confines \
                 this process ({states}): a capability is missing (see capabilities)"
            ),
            "add SYS_ADMIN to securityContext.capabilities.add (or run the agent privileged)",
        );
    }
    let by = enforcing
        .iter()
        .map(|c| format!("{} {}", c.mechanism, c.state))
        .collect::<Vec<_>>()
        .join(" and ");
    Outcome::fail(
        format!("{errors}: denied under {by}"),
        enforcing
            .iter()
            .map(|c| c.fix)
            .collect::<Vec<_>>()
            .join("; "),
    )
}

// ---- cgroup2, bpffs ----

fn mountinfo_failure(err: &io::Error) -> Outcome {
    Outcome::fail(
        format!("cannot read /proc/self/mountinfo: {err}"),
        "run the agent with /proc mounted",
    )
}

fn cgroup2(config: &Config, mounts: &io::Result<Vec<mounts::Mount>>) -> (Outcome, Option<PathBuf>) {
    let mounts = match mounts {
        Ok(mounts) => mounts,
        Err(err) => return (mountinfo_failure(err), None),
    };
    let given = config.cgroup_root.is_some();
    match capture::resolve_cgroup_root(mounts, config.cgroup_root.clone()) {
        Ok(root) if !root.is_dir() => (
            Outcome::fail(
                format!("cgroup {} does not exist", root.display()),
                "pass an existing cgroup2 directory to --cgroup-root: the host's cgroup2 mount",
            ),
            None,
        ),
        Ok(root) => {
            let detail = if given {
                format!("{}: a cgroup2 directory (--cgroup-root)", root.display())
            } else {
                format!(
                    "{}: the root of the cgroup2 hierarchy (found in /proc/self/mountinfo)",
                    root.display()
                )
            };
            (Outcome::pass(detail), Some(root))
        }
        Err(err) => (cgroup2_failure(err), None),
    }
}

fn cgroup2_failure(err: capture::Error) -> Outcome {
    match err {
        capture::Error::NoCgroup2 => Outcome::fail(
            "no cgroup2 filesystem is mounted (a cgroup v1-only node?)",
            "boot the node with the unified hierarchy (systemd.unified_cgroup_hierarchy=1), or \
             mount it (mount -t cgroup2 none /sys/fs/cgroup) and mount the host's into the pod",
        ),
        capture::Error::CgroupNotRoot { mount_points } => Outcome::fail(
            format!(
                "the cgroup2 filesystem at {} shows a cgroup, not the root of the hierarchy \
                 (it has cgroup.events): the agent runs in a container with a cgroup namespace \
                 of its own and would only capture its own container",
                mount_points
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            "mount the host's /sys/fs/cgroup into the pod (a hostPath volume) or pass \
             --cgroup-root",
        ),
        capture::Error::NotCgroup2 { .. } => Outcome::fail(
            err.to_string(),
            "pass a cgroup2 directory to --cgroup-root: the host's cgroup2 mount (found in \
             /proc/self/mountinfo; on hybrid layouts /sys/fs/cgroup/unified)",
        ),
        other => Outcome::fail(other.to_string(), "see the error"),
    }
}

fn bpffs(
    config: &Config,
    mounts: &io::Result<Vec<mounts::Mount>>,
) -> (Option<PathBuf>, Option<BpffsProbe>, Outcome) {
    let mounts = match mounts {
        Ok(mounts) => mounts,
        Err(err) => return (None, None, mountinfo_failure(err)),
    };
    let dir = match capture::resolve_bpffs_dir(mounts, config.bpffs_dir.clone()) {
        Ok(dir) => dir,
        Err(capture::Error::NoBpffs) => {
            let outcome = Outcome::fail(
                "no bpf filesystem is mounted: pins, which keep capture in place across agent \
                 restarts, have nowhere to go",
                "mount the host's /sys/fs/bpf into the pod (a hostPath volume; on the host: mount \
                 -t bpf bpf /sys/fs/bpf), or pass --bpffs-dir on a bpffs",
            );
            return (None, None, outcome);
        }
        Err(err) => {
            let outcome = Outcome::fail(
                err.to_string(),
                "pass a --bpffs-dir on a bpf filesystem (such as /sys/fs/bpf/meshlet): the \
                 host's /sys/fs/bpf mounted into the pod",
            );
            return (None, None, outcome);
        }
    };
    if dir.exists() && !dir.is_dir() {
        let outcome = Outcome::fail(
            format!("{} exists and is not a directory", dir.display()),
            "pass a --bpffs-dir that is a directory, or remove what is there",
        );
        return (None, None, outcome);
    }
    let probe = probe_bpffs(&dir);
    let outcome = match &probe.result {
        Ok(()) => Outcome::pass(format!(
            "{}: on a bpf filesystem, writable (a directory made and removed in {})",
            dir.display(),
            probe.at.display()
        )),
        Err(err) => Outcome::fail(
            format!("cannot make a directory in {}: {err}", probe.at.display()),
            if denied(err) {
                "mount the host's /sys/fs/bpf read-write into the pod; when it is, see lsm"
            } else {
                "mount the host's /sys/fs/bpf read-write into the pod"
            },
        ),
    };
    (Some(dir), Some(probe), outcome)
}

// ---- bpf programs ----

fn bpf_programs(object: Option<&Path>) -> Outcome {
    const FIX: &str = "meshlet's programs need Linux >= 5.15 with BPF links for cgroups, \
        sk_lookup and bpf_get_netns_cookie (docs/operations.md, Kernels); on such a kernel, see \
        capabilities and lsm";
    match capture::load_programs(object) {
        Ok(names) => Outcome::pass(format!(
            "{} programs loaded (verified) and unloaded: {}",
            names.len(),
            names.join(", ")
        )),
        Err(capture::Error::Program { name, message }) => Outcome::fail(
            format!(
                "the kernel refused program {name}: {}",
                kernel_error_excerpt(&message)
            ),
            FIX,
        ),
        Err(err) => Outcome::fail(err.to_string(), FIX),
    }
}

/// A kernel error with its verifier log, cut to what a person reads: the error and the first
/// lines of the log, then its last lines (where the verifier says why it stopped).
fn kernel_error_excerpt(message: &str) -> String {
    const HEAD: usize = 4;
    const TAIL: usize = 8;
    let lines: Vec<&str> = message.lines().filter(|l| !l.trim().is_empty()).collect();
    if lines.len() <= HEAD + TAIL {
        return lines.join("\n");
    }
    let mut excerpt = lines[..HEAD].to_vec();
    let left_out = format!(
        "... ({} lines of the verifier log left out)",
        lines.len() - HEAD - TAIL
    );
    excerpt.push(&left_out);
    excerpt.extend_from_slice(&lines[lines.len() - TAIL..]);
    excerpt.join("\n")
}

// ---- cgroup programs ----

/// The hooks capture attaches to at the cgroup root: `enum bpf_attach_type`, and its name.
const HOOKS: &[(u32, &str)] = &[
    (bpf::BPF_CGROUP_INET4_CONNECT, "cgroup/connect4"),
    (bpf::BPF_CGROUP_INET6_CONNECT, "cgroup/connect6"),
    (bpf::BPF_CGROUP_INET4_GETPEERNAME, "cgroup/getpeername4"),
    (bpf::BPF_CGROUP_INET6_GETPEERNAME, "cgroup/getpeername6"),
    (bpf::BPF_CGROUP_SOCK_OPS, "cgroup/sock_ops"),
    (bpf::BPF_CGROUP_GETSOCKOPT, "cgroup/getsockopt"),
];

/// The kernel keeps 15 bytes of a program's name (`BPF_OBJ_NAME_LEN` - 1).
const KERNEL_NAME_LEN: usize = 15;

/// A program that is not meshlet's, found at a hook of the cgroup root.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Other {
    hook: &'static str,
    id: u32,
    name: String,
    /// Attached to an ancestor of the cgroup root, not to the root itself.
    inherited: bool,
}

/// Whether `name` is allowed by `allowed`; a name the kernel cut to 15 bytes (a program
/// without BTF) is allowed by any name it starts.
fn is_allowed(name: &str, allowed: &[String]) -> bool {
    allowed
        .iter()
        .any(|a| a == name || (name.len() == KERNEL_NAME_LEN && a.starts_with(name)))
}

fn cgroup_programs(root: &Path, bpffs_dir: Option<&Path>, allowed: &[String]) -> Outcome {
    let ours = match bpffs_dir.map(|dir| pins::Layout::new(dir).cgroup_program_ids()) {
        Some(Ok(ids)) => ids,
        Some(Err(err)) => {
            return Outcome::fail(
                format!("cannot read meshlet's pinned links: {err}"),
                "see bpffs and lsm",
            );
        }
        None => Vec::new(),
    };
    let cgroup = match fs::File::open(root) {
        Ok(cgroup) => cgroup,
        Err(err) => {
            return Outcome::fail(
                format!("cannot open {}: {err}", root.display()),
                "see cgroup2 and lsm",
            );
        }
    };
    let mut others = Vec::new();
    let mut own = 0;
    for &(attach_type, hook) in HOOKS {
        let query = |effective| bpf::prog_query(cgroup.as_fd(), attach_type, effective);
        let (effective, direct) = match query(true).and_then(|e| Ok((e, query(false)?))) {
            Ok(ids) => ids,
            Err(err) => {
                return Outcome::fail(
                    format!(
                        "cannot list the programs at {hook} on {}: {err}",
                        root.display()
                    ),
                    "the agent needs CAP_NET_ADMIN to list them (see capabilities)",
                );
            }
        };
        for id in effective {
            if ours.contains(&id) {
                own += 1;
                continue;
            }
            let name = match bpf::prog_by_id(id).and_then(|fd| bpf::prog_info(fd.as_fd())) {
                Ok(info) => info.name,
                // Detached and unloaded since it was listed.
                Err(err) if err.raw_os_error() == Some(libc::ENOENT) => continue,
                Err(err) => format!("<name unknown: {err}>"),
            };
            others.push(Other {
                hook,
                id,
                name,
                inherited: !direct.contains(&id),
            });
        }
    }
    cgroup_programs_outcome(root, bpffs_dir, own, &others, allowed)
}

/// The `cgroup programs` outcome, from what was found at the hooks of `root`: `own` of
/// meshlet's, and `others`.
fn cgroup_programs_outcome(
    root: &Path,
    bpffs_dir: Option<&Path>,
    own: usize,
    others: &[Other],
    allowed: &[String],
) -> Outcome {
    let (allowed_found, foreign): (Vec<&Other>, Vec<&Other>) =
        others.iter().partition(|o| is_allowed(&o.name, allowed));
    if !foreign.is_empty() {
        let reason = foreign
            .iter()
            .map(|o| {
                format!(
                    "{} on {}{}: program {:?} (id {}) is not meshlet's",
                    o.hook,
                    root.display(),
                    if o.inherited {
                        " (attached to an ancestor cgroup)"
                    } else {
                        ""
                    },
                    o.name,
                    o.id
                )
            })
            .collect::<Vec<_>>()
            .join("\n");
        return Outcome::fail(
            reason,
            "another mesh or Cilium's socket load balancer: set Cilium's \
             socketLB.hostNamespaceOnly=true and allow its programs with \
             --allow-cgroup-program, or remove the other mesh",
        );
    }
    let mut detail = format!("no other program at capture's hooks on {}", root.display());
    if let Some(dir) = bpffs_dir {
        detail.push_str(&format!(
            "; meshlet's own: {own} (links pinned under {})",
            dir.display()
        ));
    }
    if !allowed_found.is_empty() {
        let list = allowed_found
            .iter()
            .map(|o| format!("{} ({}, id {})", o.name, o.hook, o.id))
            .collect::<Vec<_>>()
            .join(", ");
        detail.push_str(&format!("; allowed: {list}"));
    }
    Outcome::pass(detail)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kernel_lacking_a_feature_fails_naming_it() {
        assert_eq!(features_outcome("6.1.0", &[]), None);
        let sock_ops_cookie = capture::features::FEATURES
            .iter()
            .find(|f| f.name == "bpf_get_netns_cookie in sock_ops programs")
            .expect("listed");
        let (reason, fix) = failure(features_outcome("5.15.0-custom", &[sock_ops_cookie]).unwrap());
        assert_eq!(
            reason,
            "Linux 5.15.0-custom lacks what meshlet needs:\n  - bpf_get_netns_cookie in sock_ops \
             programs (Linux >= 5.15; for matching the proxy's accepted socket to the client's \
             record)"
        );
        assert!(fix.contains("Kernels"), "{fix}");
    }

    fn is_pass(outcome: &Outcome) -> bool {
        matches!(outcome, Outcome::Pass { .. })
    }

    fn failure(outcome: Outcome) -> (String, String) {
        match outcome {
            Outcome::Fail { reason, fix } => (reason, fix),
            other => panic!("not a failure: {other:?}"),
        }
    }

    #[test]
    fn kernel_releases_parse_and_old_ones_fail_with_both_versions() {
        for release in [
            "6.18.0-1-cloud-amd64",
            "5.15.0-1051-azure",
            "6.18.44-fc-v657",
        ] {
            assert!(is_pass(&kernel_outcome(release)), "{release}");
        }
        let (reason, fix) = failure(kernel_outcome("5.4.0"));
        assert!(
            reason.contains("5.4.0") && reason.contains("5.15"),
            "{reason}"
        );
        assert!(fix.contains(">= 5.15"), "{fix}");
        for garbage in ["garbage", "", "x.y.z", "6"] {
            assert!(
                matches!(kernel_outcome(garbage), Outcome::Warn { .. }),
                "{garbage:?}"
            );
        }
    }

    const STATUS: &str = "Name:\tmeshlet\nCapInh:\t0000000000000000\nCapPrm:\t000001ffffffffff\n\
                          CapEff:\t000001fffeffffff\nCapBnd:\t000001ffffffffff\nSeccomp:\t2\n";

    #[test]
    fn capabilities_come_from_capeff_and_missing_ones_are_named() {
        assert_eq!(effective_capabilities(STATUS), Some(0x1fffeffffff));
        assert_eq!(effective_capabilities("CapEff:\tzz\n"), None);
        assert_eq!(effective_capabilities("Name: x\n"), None);

        assert!(is_pass(&capabilities_outcome(0x1ffffffffff)));
        // Root in a container without CAP_SYS_RESOURCE (this kind of machine): a warning.
        match capabilities_outcome(0x1fffeffffff) {
            Outcome::Warn { detail, fix } => {
                assert!(detail.contains("CAP_SYS_RESOURCE"), "{detail}");
                assert!(fix.contains("capabilities.add: [SYS_RESOURCE]"), "{fix}");
            }
            other => panic!("{other:?}"),
        }
        // Docker's default set: no BPF, PERFMON, NET_ADMIN, SYS_ADMIN, SYS_PTRACE.
        let (reason, fix) = failure(capabilities_outcome(0xa80425fb));
        for name in [
            "CAP_BPF",
            "CAP_PERFMON",
            "CAP_NET_ADMIN",
            "CAP_SYS_ADMIN",
            "CAP_SYS_PTRACE",
            "CAP_SYS_RESOURCE",
        ] {
            assert!(reason.contains(name), "{name}: {reason}");
        }
        assert!(!reason.contains("CAP_NET_BIND_SERVICE"), "{reason}");
        assert!(
            fix.contains("[BPF, PERFMON, NET_ADMIN, SYS_ADMIN, SYS_PTRACE, SYS_RESOURCE]"),
            "{fix}"
        );
        // CAP_SYS_ADMIN alone does not stand in for CAP_BPF.
        let (reason, _) = failure(capabilities_outcome(0x1ffffffffff & !(1 << 39)));
        assert!(reason.starts_with("missing CAP_BPF"), "{reason}");
    }

    #[test]
    fn confinement_labels_parse() {
        let profile = apparmor("cri-containerd.apparmor.d (enforce)\n");
        assert_eq!(
            profile.state,
            "profile \"cri-containerd.apparmor.d\" (enforce)"
        );
        assert!(profile.enforcing);
        assert!(!apparmor("unconfined\n").enforcing);
        assert!(!apparmor("docker-default (complain)").enforcing);
        assert!(apparmor("bare-name").enforcing);

        assert!(selinux("1\n", "system_u:system_r:container_t:s0:c1,c2\0").enforcing);
        assert!(!selinux("1", "system_u:system_r:spc_t:s0").enforcing);
        assert!(!selinux("0", "system_u:system_r:container_t:s0").enforcing);

        assert!(seccomp(STATUS).enforcing);
        assert_eq!(seccomp(STATUS).state, "filter");
        assert!(!seccomp("Seccomp:\t0\n").enforcing);
    }

    fn denied_attempt() -> Vec<(String, io::Result<()>)> {
        vec![
            (
                "setns into this process's own network namespace".into(),
                Err(io::Error::from_raw_os_error(libc::EPERM)),
            ),
            ("mkdir in /sys/fs/bpf".into(), Ok(())),
        ]
    }

    #[test]
    fn a_denial_under_an_enforcing_profile_names_the_profile_and_its_fix() {
        let confined = [
            apparmor("cri-containerd.apparmor.d (enforce)"),
            selinux("0", "system_u:system_r:container_t:s0"),
            seccomp("Seccomp:\t0\n"),
        ];
        let (reason, fix) = failure(lsm_outcome(&confined, &denied_attempt()));
        assert!(reason.contains("setns"), "{reason}");
        assert!(reason.contains("cri-containerd.apparmor.d"), "{reason}");
        assert!(fix.contains("appArmorProfile: {type: Unconfined}"), "{fix}");
        assert!(!fix.contains("seLinuxOptions"), "{fix}");

        let selinux_confined = [
            apparmor("unconfined"),
            selinux("1", "system_u:system_r:container_t:s0"),
        ];
        let (_, fix) = failure(lsm_outcome(&selinux_confined, &denied_attempt()));
        assert!(fix.contains("seLinuxOptions: {type: spc_t}"), "{fix}");
    }

    #[test]
    fn unconfined_passes_and_a_denial_without_a_profile_points_at_capabilities() {
        let free = [
            apparmor("unconfined"),
            selinux("1", "system_u:system_r:spc_t:s0"),
            seccomp("Seccomp:\t0\n"),
        ];
        let allowed = vec![("setns".to_owned(), Ok(()))];
        match lsm_outcome(&free, &allowed) {
            Outcome::Pass { detail } => {
                assert!(detail.contains("AppArmor: unconfined"), "{detail}");
                assert!(detail.contains("allowed: setns"), "{detail}");
            }
            other => panic!("{other:?}"),
        }
        let (reason, fix) = failure(lsm_outcome(&free, &denied_attempt()));
        assert!(reason.contains("see capabilities"), "{reason}");
        assert!(fix.contains("SYS_ADMIN"), "{fix}");
    }

    #[test]
    fn foreign_programs_fail_by_hook_and_name_and_allowed_ones_pass() {
        let root = Path::new("/sys/fs/cgroup");
        let others = [
            Other {
                hook: "cgroup/connect4",
                id: 812,
                name: "cil_sock4_connect".into(),
                inherited: false,
            },
            Other {
                hook: "cgroup/getpeername6",
                id: 815,
                name: "cil_sock6_getpe".into(), // no BTF: cut by the kernel
                inherited: true,
            },
        ];
        let (reason, fix) = failure(cgroup_programs_outcome(root, None, 0, &others, &[]));
        assert!(
            reason.contains(
                "cgroup/connect4 on /sys/fs/cgroup: program \"cil_sock4_connect\" (id 812) is \
                 not meshlet's"
            ),
            "{reason}"
        );
        assert!(
            reason.contains("(attached to an ancestor cgroup)"),
            "{reason}"
        );
        assert!(fix.contains("socketLB.hostNamespaceOnly=true"), "{fix}");

        let allowed = [
            "cil_sock4_connect".to_owned(),
            "cil_sock6_getpeername".to_owned(),
        ];
        let bpffs = Path::new("/sys/fs/bpf/meshlet");
        match cgroup_programs_outcome(root, Some(bpffs), 6, &others, &allowed) {
            Outcome::Pass { detail } => {
                assert!(detail.contains("meshlet's own: 6"), "{detail}");
                assert!(
                    detail.contains("cil_sock4_connect (cgroup/connect4, id 812)"),
                    "{detail}"
                );
            }
            other => panic!("{other:?}"),
        }
        // One allowed, one not: still a failure, naming only the other.
        let (reason, _) = failure(cgroup_programs_outcome(
            root,
            None,
            0,
            &others,
            &allowed[..1],
        ));
        assert!(
            !reason.contains("812") && reason.contains("815"),
            "{reason}"
        );
    }

    #[test]
    fn verifier_logs_are_cut_to_their_head_and_tail() {
        let short = "the kernel rejected it: Permission denied\nverifier log:\n0: r0 = 1";
        assert_eq!(kernel_error_excerpt(short), short);
        let log: String = (0..100).map(|i| format!("{i}: insn\n")).collect();
        let excerpt = kernel_error_excerpt(&format!(
            "the kernel rejected it: Invalid argument\nverifier log:\n{log}R1 invalid mem access"
        ));
        let lines: Vec<&str> = excerpt.lines().collect();
        assert_eq!(lines[0], "the kernel rejected it: Invalid argument");
        assert!(
            lines.contains(&"... (91 lines of the verifier log left out)"),
            "{excerpt}"
        );
        assert_eq!(lines.last(), Some(&"R1 invalid mem access"));
    }

    #[test]
    fn the_report_reads_as_a_table_and_fails_on_any_failure() {
        let report = Report {
            checks: vec![
                Check {
                    name: KERNEL,
                    outcome: Outcome::pass("Linux 6.18.0 (meshlet needs >= 5.15)"),
                },
                Check {
                    name: BPFFS,
                    outcome: Outcome::fail("/tmp/x is on tmpfs\nsecond line", "mount bpffs"),
                },
                Check {
                    name: CGROUP_PROGRAMS,
                    outcome: Outcome::Skip {
                        reason: "no cgroup root".into(),
                    },
                },
            ],
        };
        assert!(!report.passed());
        let text = report.to_string();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "ok    kernel           Linux 6.18.0 (meshlet needs >= 5.15)"
        );
        assert_eq!(lines[1], "FAIL  bpffs            /tmp/x is on tmpfs");
        assert_eq!(lines[2], "                       second line");
        assert_eq!(lines[3], "      fix: mount bpffs");
        assert_eq!(lines[4], "skip  cgroup programs  no cgroup root");
        assert!(
            lines[5].starts_with("preflight FAILED: 1 of 3 checks (bpffs)"),
            "{text}"
        );

        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["passed"], false);
        assert_eq!(json["checks"][1]["name"], "bpffs");
        assert_eq!(json["checks"][1]["status"], "fail");
        assert_eq!(json["checks"][1]["fix"], "mount bpffs");
        assert_eq!(
            json["checks"][0]["detail"],
            "Linux 6.18.0 (meshlet needs >= 5.15)"
        );

        let failed = Failed { report }.to_string();
        assert!(failed.contains("\n  bpffs: /tmp/x is on tmpfs"), "{failed}");
        assert!(failed.contains("\n    fix: mount bpffs"), "{failed}");
    }
}
