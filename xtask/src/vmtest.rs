//! `cargo xtask vmtest`: the kernel-facing suites on other kernels than the host's, each in a
//! qemu guest (docs/testing.md, "Kernel matrix").
//!
//! For each kernel series asked for (`6.1`, `6.12`), the newest Debian
//! `linux-image-<release>-amd64-unsigned` package that `apt-cache` knows is downloaded once into
//! `target/vmtest/`, and its kernel and the modules the tests need (veth, bridge and what they
//! depend on) are kept. The guest is a busybox initramfs that holds the suites' test binaries,
//! the workspace binaries they start, the host tools they call (iproute2, bpftool) and every
//! shared library those need, each at its host path. Its `/init` mounts what a node has (proc,
//! sysfs, cgroup2, bpffs), loads the modules, runs each suite's binaries and powers off.
//!
//! qemu runs under software emulation (TCG: nested KVM is not available where this runs), and
//! the guest's serial console is echoed with the kernel's name in front. Marker lines that
//! `/init` prints delimit each suite and carry its exit status; with libtest's summaries they
//! make the table printed at the end: per kernel and suite, passed, failed and time. A suite
//! fails when a test fails, when no test ran, or when the guest died or hung before its end
//! marker; then `cargo xtask vmtest` exits non-zero with the guest's own failure report.

use std::{
    collections::VecDeque,
    fmt,
    fs::{self, File},
    io::{BufRead as _, BufReader, Write as _},
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::setup::output;

/// Where kernels, the guest's root and its initramfs are kept (under the workspace).
const DIR: &str = "target/vmtest";

/// Modules the suites need that Debian builds as modules (their dependencies come along).
const MODULES: &[&str] = &["veth", "bridge"];

/// Host tools the tests and the demo run, copied into the guest with their libraries.
const TOOLS: &[&str] = &["ip", "bpftool", "nsenter", "tcpdump"];

/// How much longer than on the host the guests' tests wait for an event before they call it a
/// hang (`MESHLET_TEST_PATIENCE`): emulated, a guest runs the same code several times slower.
const PATIENCE: u32 = 6;

/// The workspace binaries the test binaries start (found one or two directories above them).
const WORKSPACE_BINARIES: &[&str] = &["meshlet", "meshlet-cni", "meshlet-testpod", "meshlet-demo"];

/// How long a guest may take per suite (the slowest, `e2e` on 6.12, takes under 4 minutes)
/// before it counts as hung, on top of [`BOOT_TIMEOUT`].
const SUITE_TIMEOUT: Duration = Duration::from_secs(15 * 60);

/// How long a guest may take to boot and power off.
const BOOT_TIMEOUT: Duration = Duration::from_secs(2 * 60);

/// What `/init` prints in front of its own lines.
const MARKER: &str = "meshlet-vmtest:";

/// A kernel series, tested with the newest Debian package of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Kernel {
    /// Linux 6.1 (Debian 12's kernel, Amazon Linux 2023's).
    #[value(name = "6.1")]
    V6_1,
    /// Linux 6.12 (Debian 13's kernel, in Debian 12's security updates).
    #[value(name = "6.12")]
    V6_12,
    /// Both.
    All,
}

impl Kernel {
    fn series(self) -> Vec<(u32, u32)> {
        match self {
            Self::V6_1 => vec![(6, 1)],
            Self::V6_12 => vec![(6, 12)],
            Self::All => vec![(6, 1), (6, 12)],
        }
    }
}

/// A group of test binaries of `meshlet-tests`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Suite {
    /// The eBPF capture programs, loaded into the kernel, with connections between namespaces.
    Capture,
    /// The two-node walk-through (capture, mTLS, policy, metrics), source-address preservation
    /// (transparent sockets, policy routing) and the agent's lifecycle (handoff, link updates).
    E2e,
    /// Both.
    All,
}

impl Suite {
    fn expand(self) -> Vec<Self> {
        match self {
            Self::All => vec![Self::Capture, Self::E2e],
            one => vec![one],
        }
    }

    /// Tests of the suite's files that the guests skip (libtest `--skip`, by name): those that
    /// hold a load at a fixed connection rate, which an emulated guest cannot keep up, so that
    /// they measure the emulator. They run on the host.
    fn skipped(self) -> &'static [&'static str] {
        match self {
            Self::E2e => &[
                "a_successor_takes_the_listeners_over_under_load_and_the_old_agent_drains",
                "an_upgrade_replaces_the_programs_in_place_on_the_same_links_under_load",
                "the_proxy_never_reuses_the_4_tuple_of_a_connection_the_client_holds_open",
            ],
            Self::Capture | Self::All => &[],
        }
    }

    /// The `tests/tests/*.rs` files the suite runs.
    fn test_files(self) -> &'static [&'static str] {
        match self {
            Self::Capture => &["capture"],
            Self::E2e => &["demo", "source_address", "lifecycle"],
            Self::All => &[],
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Capture => "capture",
            Self::E2e => "e2e",
            Self::All => "all",
        }
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct Options {
    /// Kernel series.
    pub kernel: Kernel,
    /// Suites.
    pub suite: Suite,
    /// Extra kernel command line (e.g. `ipv6.disable=1`, to see a guest fail).
    pub append: Option<String>,
    /// Arguments for the test binaries, instead of each suite's skip list.
    pub test_args: Vec<String>,
}

/// One suite's outcome on one kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Outcome {
    kernel: String,
    suite: &'static str,
    passed: u32,
    failed: u32,
    time: Option<Duration>,
    /// Why the suite failed, if it did.
    failure: Option<String>,
}

/// Runs `options`; fails when any suite failed on any kernel.
pub fn run(options: &Options) -> anyhow::Result<()> {
    let suites = options.suite.expand();
    let kernels = options
        .kernel
        .series()
        .into_iter()
        .map(Guest::fetch)
        .collect::<anyhow::Result<Vec<_>>>()?;
    let binaries = build(&suites)?;
    let root = Path::new(DIR).join("root");
    let common = stage_root(&root, &binaries, &options.test_args)?;
    let mut outcomes = Vec::new();
    for kernel in &kernels {
        let initrd = kernel.initramfs(&common)?;
        outcomes.extend(kernel.boot(
            &initrd,
            &suites,
            options.append.as_deref(),
            !options.test_args.is_empty(),
        )?);
    }
    println!("\n{}", Table(&outcomes));
    let failed: Vec<&Outcome> = outcomes.iter().filter(|o| o.failure.is_some()).collect();
    if failed.is_empty() {
        return Ok(());
    }
    for outcome in &failed {
        println!(
            "\nvmtest: {} on {} failed: {}",
            outcome.suite,
            outcome.kernel,
            outcome.failure.as_deref().unwrap_or_default()
        );
    }
    bail!(
        "{} of {} suite runs failed in the guests (their output is above, and under {DIR}/)",
        failed.len(),
        outcomes.len()
    )
}

/// Builds the workspace binaries and the suites' test binaries; returns the test binaries per
/// suite.
fn build(suites: &[Suite]) -> anyhow::Result<Vec<(Suite, Vec<PathBuf>)>> {
    crate::cargo(&["build", "--workspace", "--bins"])?;
    let mut result = Vec::new();
    for &suite in suites {
        let mut args = vec![
            "test",
            "--package",
            "meshlet-tests",
            "--no-run",
            "--message-format=json-render-diagnostics",
        ];
        for file in suite.test_files() {
            args.extend(["--test", file]);
        }
        let messages = output(
            Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
                .args(&args)
                .stderr(Stdio::inherit()),
        )
        .with_context(|| format!("building the {} suite", suite.name()))?;
        let executables = test_executables(&messages);
        if executables.len() != suite.test_files().len() {
            bail!(
                "cargo built {} test binaries for the {} suite, expected {}",
                executables.len(),
                suite.name(),
                suite.test_files().len()
            );
        }
        result.push((suite, executables));
    }
    Ok(result)
}

/// The test executables in cargo's JSON messages (`--message-format=json`).
fn test_executables(messages: &str) -> Vec<PathBuf> {
    messages
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["profile"]["test"] == true)
        .filter_map(|m| m["executable"].as_str().map(PathBuf::from))
        .collect()
}

/// Lays out the guest's root in `root` (everything but the modules) and packs it; returns the
/// archive.
fn stage_root(
    root: &Path,
    tests: &[(Suite, Vec<PathBuf>)],
    test_args: &[String],
) -> anyhow::Result<PathBuf> {
    if root.exists() {
        fs::remove_dir_all(root).with_context(|| format!("remove {}", root.display()))?;
    }
    for dir in [
        "bin", "dev", "proc", "sys", "tmp", "run", "root", "etc", "var",
    ] {
        fs::create_dir_all(root.join(dir))?;
    }
    std::os::unix::fs::symlink("../run", root.join("var/run"))?;
    // The console must exist before /init runs: the kernel opens it for init's output.
    crate::run(
        Command::new("mknod")
            .arg(root.join("dev/console"))
            .args(["c", "5", "1"]),
    )
    .context("the guest's /dev/console (vmtest needs root)")?;
    copy_into(root, Path::new("/bin/busybox"), Path::new("/bin/busybox"))
        .context("busybox (cargo xtask setup installs busybox-static)")?;
    std::os::unix::fs::symlink("busybox", root.join("bin/sh"))?;
    // The host's users and groups: tcpdump drops to its own user.
    for file in ["/etc/passwd", "/etc/group"] {
        copy_into(root, Path::new(file), Path::new(file))?;
    }
    fs::write(
        root.join("etc/hosts"),
        "127.0.0.1 localhost\n::1 localhost\n",
    )?;
    // The Kubernetes client loads the system's roots even for a plain-HTTP API server.
    let roots = Path::new("/etc/ssl/certs/ca-certificates.crt");
    if roots.exists() {
        copy_into(root, roots, roots)?;
    }
    // The lifecycle suite upgrades the agent from a variant build of the eBPF programs, which
    // the guest has no toolchain to build.
    let variant = if tests.iter().any(|(suite, _)| *suite == Suite::E2e) {
        let variant = crate::variant_ebpf_object()?;
        copy_into(root, &variant, &variant)?;
        Some(variant)
    } else {
        None
    };

    let mut elves: Vec<PathBuf> = Vec::new();
    for tool in TOOLS {
        elves.push(which(tool)?);
    }
    let ip = which("ip")?;
    let workspace = std::env::current_dir()?;
    // The guest mounts fresh filesystems on these, which would hide a workspace below them
    // (/tmp stays the initramfs's own, already in memory).
    if ["/proc", "/sys", "/dev", "/run"]
        .iter()
        .any(|mounted| workspace.starts_with(mounted))
    {
        bail!(
            "the workspace {} is below a directory the guest mounts over; move it",
            workspace.display()
        );
    }
    // target/<profile>/deps/<test>: the binaries are in target/<profile>, as the tests look.
    let bin_dir = tests
        .iter()
        .flat_map(|(_, binaries)| binaries.first())
        .find_map(|test| test.parent()?.parent())
        .context("no test binary")?
        .to_owned();
    for name in WORKSPACE_BINARIES {
        elves.push(bin_dir.join(name));
    }
    for (_, binaries) in tests {
        elves.extend(binaries.iter().cloned());
    }
    let mut libraries = Vec::new();
    for elf in &elves {
        copy_into(root, elf, elf)?;
        for library in shared_libraries(elf)? {
            if !libraries.contains(&library) {
                libraries.push(library);
            }
        }
    }
    for library in &libraries {
        copy_into(root, library, library)?;
    }
    fs::create_dir_all(root.join(workspace.strip_prefix("/").unwrap_or(&workspace)))?;

    let init = root.join("init");
    fs::write(
        &init,
        init_script(&workspace, &ip, variant.as_deref(), tests, test_args),
    )?;
    fs::set_permissions(&init, fs::Permissions::from_mode(0o755))?;
    let archive = Path::new(DIR).join("root.cpio");
    cpio(root, &archive)?;
    Ok(archive)
}

/// `/init`: mount what a node has, load the modules, run each suite, power off. Every line it
/// prints itself carries [`MARKER`]; every path in it is quoted.
fn init_script(
    workspace: &Path,
    ip: &Path,
    variant: Option<&Path>,
    tests: &[(Suite, Vec<PathBuf>)],
    test_args: &[String],
) -> String {
    let mut script = format!(
        r#"#!/bin/sh
# The guest's init, written by `cargo xtask vmtest`.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export LD_LIBRARY_PATH=/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu
export HOME=/root RUST_BACKTRACE=1 MESHLET_TEST_PATIENCE={PATIENCE}
fail() {{ echo "{MARKER} guest-error $*"; /bin/busybox poweroff -f; }}
/bin/busybox --install -s /bin
mount -t proc proc /proc || fail "mount proc"
mount -t sysfs sysfs /sys || fail "mount sysfs"
mount -t devtmpfs devtmpfs /dev || fail "mount devtmpfs"
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /run || fail "mount /run"
mount -t cgroup2 cgroup2 /sys/fs/cgroup || fail "mount cgroup2"
mount -t bpf bpf /sys/fs/bpf || fail "mount bpffs"
while read -r module; do
    insmod "/lib/modules/meshlet/$module.ko" || fail "insmod $module"
done < /lib/modules/meshlet/order
{ip} link set lo up || fail "lo up"
echo "{MARKER} kernel $(uname -r), $(nproc) CPUs"
cd {workspace} || fail "cd to the workspace"
"#,
        ip = sh_quote(ip),
        workspace = sh_quote(workspace),
    );
    if let Some(variant) = variant {
        script.push_str(&format!(
            "export MESHLET_VARIANT_EBPF_OBJECT={}\n",
            sh_quote(variant)
        ));
    }
    for (suite, binaries) in tests {
        let name = suite.name();
        script.push_str(&format!("echo \"{MARKER} begin {name}\"\nstatus=0\n"));
        let args: String = if test_args.is_empty() {
            suite
                .skipped()
                .iter()
                .map(|test| format!(" --skip {test}"))
                .collect()
        } else {
            test_args
                .iter()
                .map(|arg| format!(" {}", sh_quote(Path::new(arg))))
                .collect()
        };
        for binary in binaries {
            script.push_str(&format!("{}{args} || status=1\n", sh_quote(binary)));
        }
        script.push_str(&format!("echo \"{MARKER} end {name} exit=$status\"\n"));
    }
    script.push_str(&format!(
        "echo \"{MARKER} done\"\n/bin/busybox poweroff -f\n"
    ));
    script
}

/// `path` as one single-quoted shell word.
fn sh_quote(path: &Path) -> String {
    format!("'{}'", path.display().to_string().replace('\'', r"'\''"))
}

/// A kernel package, unpacked: its kernel image, and the modules the guest loads.
#[derive(Debug)]
struct Guest {
    /// The package's release (`6.1.0-57`).
    release: String,
    /// Where its kernel, modules and initramfs are kept.
    dir: PathBuf,
}

impl Guest {
    /// The newest `linux-image-<release>-amd64-unsigned` of `series`, downloaded and unpacked
    /// unless it already is.
    fn fetch(series: (u32, u32)) -> anyhow::Result<Self> {
        let names = output(Command::new("apt-cache").args([
            "search",
            "--names-only",
            r"^linux-image-.*-amd64-unsigned$",
        ]))?;
        let release = newest_release(
            names.lines().filter_map(|l| l.split_whitespace().next()),
            series,
        )
        .with_context(|| {
            format!(
                "apt-cache knows no linux-image-{}.{}.*-amd64-unsigned package (apt-get update?)",
                series.0, series.1
            )
        })?;
        let dir = Path::new(DIR).join(format!("kernel-{release}"));
        let guest = Self { release, dir };
        // Unpacked before, with the same modules?
        let wanted = fs::read_to_string(guest.dir.join("modules-wanted")).unwrap_or_default();
        if !guest.dir.join("vmlinuz").exists() || wanted != MODULES.join(",") {
            guest.unpack()?;
        }
        Ok(guest)
    }

    fn package(&self) -> String {
        format!("linux-image-{}-amd64-unsigned", self.release)
    }

    fn unpack(&self) -> anyhow::Result<()> {
        let download = Path::new(DIR).join("download");
        if download.exists() {
            fs::remove_dir_all(&download)?;
        }
        fs::create_dir_all(&download)?;
        println!("vmtest: downloading {}", self.package());
        crate::run(Command::new("apt-get").current_dir(&download).args([
            "download",
            "-q",
            &self.package(),
        ]))?;
        let deb = fs::read_dir(&download)?
            .flatten()
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|e| e == "deb"))
            .context("apt-get download wrote no .deb")?;
        let unpacked = download.join("unpacked");
        crate::run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpacked))?;
        let staging = PathBuf::from(format!("{}.partial", self.dir.display()));
        if staging.exists() {
            fs::remove_dir_all(&staging)?;
        }
        let modules_dir = staging.join("lib/modules/meshlet");
        fs::create_dir_all(&modules_dir)?;
        let vmlinuz = find_file(&unpacked.join("boot"), |name| name.starts_with("vmlinuz-"))?
            .context("the package holds no boot/vmlinuz-*")?;
        fs::copy(&vmlinuz, staging.join("vmlinuz"))?;
        let tree = find_file(&unpacked.join("lib/modules"), |_| true)?
            .or(find_file(&unpacked.join("usr/lib/modules"), |_| true)?)
            .context("the package holds no lib/modules/<release>")?;
        let order = module_order(&tree, MODULES)?;
        for (name, path) in &order {
            let target = modules_dir.join(format!("{name}.ko"));
            if path.extension().is_some_and(|e| e == "xz") {
                unxz(path, &target)?;
            } else {
                fs::copy(path, &target)?;
            }
        }
        let names: Vec<&str> = order.iter().map(|(n, _)| n.as_str()).collect();
        fs::write(modules_dir.join("order"), names.join("\n") + "\n")?;
        fs::write(staging.join("modules-wanted"), MODULES.join(","))?;
        if self.dir.exists() {
            fs::remove_dir_all(&self.dir)?;
        }
        fs::rename(&staging, &self.dir)?;
        fs::remove_dir_all(&download)?;
        Ok(())
    }

    /// The guest's initramfs: the common root, then this kernel's modules (the kernel unpacks
    /// concatenated archives in turn).
    fn initramfs(&self, common: &Path) -> anyhow::Result<PathBuf> {
        let modules = self.dir.join("modules.cpio");
        let root = self.dir.join("root");
        if root.exists() {
            fs::remove_dir_all(&root)?;
        }
        fs::create_dir_all(root.join("lib/modules"))?;
        copy_tree(
            &self.dir.join("lib/modules/meshlet"),
            &root.join("lib/modules/meshlet"),
        )?;
        cpio(&root, &modules)?;
        fs::remove_dir_all(&root)?;
        let initrd = self.dir.join("initrd.cpio");
        let mut out = File::create(&initrd)?;
        for part in [common, modules.as_path()] {
            std::io::copy(&mut File::open(part)?, &mut out)?;
        }
        Ok(initrd)
    }

    /// Boots the guest, echoes its console, and reads each suite's outcome from it.
    fn boot(
        &self,
        initrd: &Path,
        suites: &[Suite],
        append: Option<&str>,
        filtered: bool,
    ) -> anyhow::Result<Vec<Outcome>> {
        let name = format!("linux {}", self.release);
        println!("\nvmtest: booting {name} (qemu, software emulation)");
        let log_path = self.dir.join("console.log");
        let mut log = File::create(&log_path)?;
        let mut cmdline = String::from("console=ttyS0 panic=-1 quiet");
        if let Some(extra) = append {
            cmdline.push(' ');
            cmdline.push_str(extra);
        }
        let mut qemu = Command::new("qemu-system-x86_64")
            .args([
                "-machine",
                "q35",
                "-accel",
                "tcg,thread=multi",
                "-cpu",
                "max",
            ])
            .args(["-m", "4G", "-smp", "2", "-nic", "none", "-no-reboot"])
            .args(["-display", "none", "-monitor", "none", "-serial", "stdio"])
            .arg("-kernel")
            .arg(self.dir.join("vmlinuz"))
            .arg("-initrd")
            .arg(initrd)
            .args(["-append", &cmdline])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("start qemu-system-x86_64 (cargo xtask setup installs qemu-system-x86)")?;
        let stdout = qemu.stdout.take().expect("piped");
        let (lines, received) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).split(b'\n').map_while(Result::ok) {
                let line = String::from_utf8_lossy(&line).trim_end().to_owned();
                if lines.send((Instant::now(), line)).is_err() {
                    break;
                }
            }
        });
        let started = Instant::now();
        let timeout = BOOT_TIMEOUT + SUITE_TIMEOUT * suites.len() as u32;
        let mut console = Console {
            filtered,
            ..Console::default()
        };
        let prefix = format!("{:>12} | ", self.release);
        loop {
            let left = timeout.saturating_sub(started.elapsed());
            match received.recv_timeout(left) {
                Ok((at, line)) => {
                    println!("{prefix}{line}");
                    writeln!(log, "{line}")?;
                    console.feed(at, &line);
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    let _ = qemu.kill();
                    console.hung = Some(timeout);
                    break;
                }
            }
        }
        let status = qemu.wait()?;
        if !status.success() && console.hung.is_none() {
            console.qemu_failed = Some(status.to_string());
        }
        println!(
            "vmtest: {name}: guest ran {:.0?}; its console is in {}",
            started.elapsed(),
            log_path.display()
        );
        Ok(suites
            .iter()
            .map(|suite| console.outcome(&self.release, suite.name()))
            .collect())
    }
}

/// What the guest's console said, read line by line.
#[derive(Debug, Default)]
struct Console {
    suites: Vec<SuiteRun>,
    guest_error: Option<String>,
    /// Killed after this long without powering off.
    hung: Option<Duration>,
    qemu_failed: Option<String>,
    /// What the kernel reported going wrong outside any suite.
    faults: Vec<String>,
    /// The tests were filtered by hand (`-- <filter>`): a binary may match none.
    filtered: bool,
    /// The last lines seen, for a guest that died without saying why.
    tail: Tail,
}

#[derive(Debug)]
struct SuiteRun {
    name: String,
    began: Instant,
    ended: Option<(Instant, bool)>,
    passed: u32,
    failed: u32,
    /// Test binaries that ran no test (a libtest summary of 0 passed, 0 failed).
    empty: u32,
    /// libtest's failure reports (`---- name stdout ----` ...) and summary lines.
    report: Vec<String>,
    /// What the kernel reported going wrong while the suite ran.
    faults: Vec<String>,
    /// The suite's last lines.
    tail: Tail,
    in_failures: bool,
}

/// The last [`Tail::LINES`] lines.
#[derive(Debug, Default)]
struct Tail(VecDeque<String>);

impl Tail {
    const LINES: usize = 40;

    fn push(&mut self, line: &str) {
        if self.0.len() == Self::LINES {
            self.0.pop_front();
        }
        self.0.push_back(line.to_owned());
    }

    fn text(&self) -> String {
        Vec::from(self.0.clone()).join("\n")
    }
}

/// Whether a console line is the kernel reporting a bug in itself: a warning, a BUG, an oops,
/// a stall, a panic. A kernel matrix has to fail on these even when every test passed.
fn kernel_fault(line: &str) -> bool {
    let Some((_, message)) = line.split_once("] ") else {
        return false;
    };
    line.starts_with('[')
        && [
            "WARNING:",
            "BUG:",
            "Oops",
            "Kernel panic",
            "rcu: INFO:",
            "watchdog: BUG",
        ]
        .iter()
        .any(|fault| message.starts_with(fault))
}

impl Console {
    fn feed(&mut self, at: Instant, line: &str) {
        self.tail.push(line);
        // A marker can follow kernel output on the same line: the console is shared.
        if let Some((_, rest)) = line.split_once(MARKER) {
            self.marker(at, rest.trim());
            return;
        }
        let run = self.suites.last_mut().filter(|r| r.ended.is_none());
        if kernel_fault(line) {
            match run {
                Some(run) => run.faults.push(line.to_owned()),
                None => self.faults.push(line.to_owned()),
            }
            return;
        }
        let Some(run) = run else {
            return;
        };
        run.tail.push(line);
        if let Some((passed, failed)) = libtest_summary(line) {
            run.passed += passed;
            run.failed += failed;
            if passed + failed == 0 {
                run.empty += 1;
            }
            if failed > 0 {
                run.report.push(line.to_owned());
            }
            run.in_failures = false;
        } else if line == "failures:" || line.starts_with("---- ") {
            run.in_failures = true;
        }
        if run.in_failures && run.report.len() < 200 {
            run.report.push(line.to_owned());
        }
    }

    fn marker(&mut self, at: Instant, marker: &str) {
        if let Some(name) = marker.strip_prefix("begin ") {
            self.suites.push(SuiteRun {
                name: name.to_owned(),
                began: at,
                ended: None,
                passed: 0,
                failed: 0,
                empty: 0,
                report: Vec::new(),
                faults: Vec::new(),
                tail: Tail::default(),
                in_failures: false,
            });
        } else if let Some(end) = marker.strip_prefix("end ") {
            if let Some(run) = self.suites.last_mut() {
                run.ended = Some((at, end.ends_with("exit=0")));
            }
        } else if let Some(error) = marker.strip_prefix("guest-error ") {
            self.guest_error = Some(error.to_owned());
        }
    }

    fn outcome(&self, kernel: &str, suite: &'static str) -> Outcome {
        let run = self.suites.iter().find(|r| r.name == suite);
        let (passed, failed) = run.map_or((0, 0), |r| (r.passed, r.failed));
        let time = run.and_then(|r| r.ended.map(|(end, _)| end - r.began));
        let faults: Vec<&String> = self
            .faults
            .iter()
            .chain(run.iter().flat_map(|r| &r.faults))
            .collect();
        let failure = match run {
            _ if !faults.is_empty() => Some(format!(
                "the kernel reported a fault:\n{}",
                faults
                    .iter()
                    .map(|f| f.as_str())
                    .collect::<Vec<_>>()
                    .join("\n")
            )),
            Some(
                run @ SuiteRun {
                    ended: Some((_, false)),
                    ..
                },
            ) if run.failed > 0 => Some(format!(
                "{} test(s) failed:\n{}",
                run.failed,
                run.report.join("\n")
            )),
            Some(
                run @ SuiteRun {
                    ended: Some((_, false)),
                    ..
                },
            ) => Some(format!(
                "a test binary failed without a failing test; its last lines:\n{}",
                run.tail.text()
            )),
            Some(SuiteRun { ended: Some(_), .. }) if passed == 0 => Some("no test ran".to_owned()),
            Some(run @ SuiteRun { ended: Some(_), .. }) if run.empty > 0 && !self.filtered => {
                Some(format!(
                    "{} test binary(ies) ran no test (were they all skipped?)",
                    run.empty
                ))
            }
            Some(SuiteRun { ended: Some(_), .. }) => None,
            _ if self.hung.is_some() => Some(format!(
                "the guest hung (killed after {:?}); its last lines:\n{}",
                self.hung.unwrap_or_default(),
                self.tail.text()
            )),
            Some(_) => Some(format!(
                "the guest stopped in the middle of the suite; its last lines:\n{}",
                self.tail.text()
            )),
            None => Some(match (&self.guest_error, &self.qemu_failed) {
                (Some(error), _) => format!("the guest's init failed: {error}"),
                (None, Some(status)) => format!("qemu failed ({status})"),
                (None, None) => format!(
                    "the guest never began the suite; its last lines:\n{}",
                    self.tail.text()
                ),
            }),
        };
        Outcome {
            kernel: kernel.to_owned(),
            suite,
            passed,
            failed,
            time,
            failure,
        }
    }
}

/// `test result: ok. 9 passed; 0 failed; ...` -> (9, 0).
fn libtest_summary(line: &str) -> Option<(u32, u32)> {
    let rest = line.trim().strip_prefix("test result: ")?;
    let count = |what: &str| -> Option<u32> {
        rest.split(';')
            .find_map(|part| part.trim().strip_suffix(what))?
            .trim()
            .rsplit(' ')
            .next()?
            .parse()
            .ok()
    };
    Some((count(" passed")?, count(" failed")?))
}

/// The results as a table.
struct Table<'a>(&'a [Outcome]);

impl fmt::Display for Table<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{:<20} {:<8} {:>6} {:>6} {:>8}  result",
            "kernel", "suite", "passed", "failed", "time"
        )?;
        for o in self.0 {
            let time = o
                .time
                .map_or_else(|| "-".to_owned(), |t| format!("{:.0}s", t.as_secs_f64()));
            writeln!(
                f,
                "{:<20} {:<8} {:>6} {:>6} {:>8}  {}",
                o.kernel,
                o.suite,
                o.passed,
                o.failed,
                time,
                if o.failure.is_some() { "FAILED" } else { "ok" }
            )?;
        }
        Ok(())
    }
}

/// The newest release of `series` among package names `linux-image-<release>-amd64-unsigned`
/// (other flavours, `-cloud-amd64`, `-rt-amd64`, are not the generic kernel).
fn newest_release<'a>(
    packages: impl Iterator<Item = &'a str>,
    series: (u32, u32),
) -> Option<String> {
    packages
        .filter_map(|name| {
            name.strip_prefix("linux-image-")?
                .strip_suffix("-amd64-unsigned")
        })
        .filter(|release| {
            release
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || ".-+".contains(c))
        })
        .filter(|release| !release.ends_with("-cloud") && !release.ends_with("-rt"))
        .filter_map(|release| {
            let numbers: Vec<u32> = release
                .split(|c: char| !c.is_ascii_digit())
                .filter(|s| !s.is_empty())
                .filter_map(|s| s.parse().ok())
                .collect();
            (numbers.len() >= 2 && (numbers[0], numbers[1]) == series)
                .then(|| (numbers, release.to_owned()))
        })
        .max()
        .map(|(_, release)| release)
}

/// `names` and the modules they depend on (`modinfo -F depends`), in an order `insmod` can
/// load them: each after its dependencies.
fn module_order(tree: &Path, names: &[&str]) -> anyhow::Result<Vec<(String, PathBuf)>> {
    fn visit(
        tree: &Path,
        name: &str,
        order: &mut Vec<(String, PathBuf)>,
        depth: usize,
    ) -> anyhow::Result<()> {
        if order.iter().any(|(n, _)| n == name) {
            return Ok(());
        }
        if depth > 16 {
            bail!("module dependencies of {name} nest too deep");
        }
        let path = find_module(tree, name)?
            .with_context(|| format!("the kernel package has no module {name}"))?;
        let depends = output(Command::new("modinfo").args(["-F", "depends"]).arg(&path))?;
        for dependency in depends.trim().split(',').filter(|d| !d.is_empty()) {
            visit(tree, dependency, order, depth + 1)?;
        }
        order.push((name.to_owned(), path));
        Ok(())
    }
    let mut order = Vec::new();
    for name in names {
        visit(tree, name, &mut order, 0)?;
    }
    Ok(order)
}

/// The file of module `name` (`name.ko`, or `.ko.xz` as Debian compresses them since 6.12; `-`
/// and `_` alike) under `tree`.
fn find_module(tree: &Path, name: &str) -> anyhow::Result<Option<PathBuf>> {
    let wanted = name.replace('-', "_");
    let mut stack = vec![tree.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).with_context(|| format!("read {}", dir.display()))? {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let file = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default();
            let stem = ["ko", "ko.xz"]
                .iter()
                .find_map(|ext| file.strip_suffix(ext)?.strip_suffix('.'));
            if stem.is_some_and(|stem| stem.replace('-', "_") == wanted) {
                return Ok(Some(path));
            }
        }
    }
    Ok(None)
}

/// The first entry of `dir` whose file name passes `matches`.
fn find_file(dir: &Path, matches: impl Fn(&str) -> bool) -> anyhow::Result<Option<PathBuf>> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Ok(None);
    };
    Ok(entries
        .flatten()
        .map(|e| e.path())
        .find(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(&matches)))
}

/// Decompresses the `.xz` file `from` into `to`.
fn unxz(from: &Path, to: &Path) -> anyhow::Result<()> {
    crate::run(
        Command::new("xz")
            .args(["-d", "-c"])
            .arg(from)
            .stdout(File::create(to)?),
    )
}

/// The shared libraries `elf` loads, the dynamic loader included (`ldd`); none for a static
/// binary.
fn shared_libraries(elf: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let out = Command::new("ldd").arg(elf).output().context("run ldd")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if let Some(missing) = text.lines().find(|line| line.contains("not found")) {
        bail!(
            "{}: a library is missing: {}",
            elf.display(),
            missing.trim()
        );
    }
    Ok(text
        .lines()
        .filter_map(|line| {
            let path = match line.split_once("=>") {
                Some((_, right)) => right.split_whitespace().next()?,
                None => line.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect())
}

/// The path of `tool` on the host's PATH (with the sbin directories).
fn which(tool: &str) -> anyhow::Result<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    path.split(':')
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"])
        .map(|dir| Path::new(dir).join(tool))
        .find(|candidate| candidate.is_file())
        .with_context(|| format!("{tool} is not installed (cargo xtask setup installs it)"))
}

/// Copies the host file `from` to `to` inside `root` (its directories made), following
/// symlinks. A copy, not a hard link: the archive must not tie the guest's files to the host's
/// inodes.
fn copy_into(root: &Path, from: &Path, to: &Path) -> anyhow::Result<()> {
    let target = root.join(to.strip_prefix("/").unwrap_or(to));
    if let Some(parent) = target.parent() {
        fs::create_dir_all(parent)?;
    }
    // The file a symlink names, not the link (`/lib64/ld-linux-x86-64.so.2` is one).
    let from = fs::canonicalize(from).with_context(|| format!("resolve {}", from.display()))?;
    fs::copy(&from, &target).with_context(|| format!("copy {}", from.display()))?;
    Ok(())
}

fn copy_tree(from: &Path, to: &Path) -> anyhow::Result<()> {
    fs::create_dir_all(to)?;
    for entry in fs::read_dir(from)? {
        let entry = entry?;
        fs::copy(entry.path(), to.join(entry.file_name()))?;
    }
    Ok(())
}

/// Packs the tree `root` into the newc cpio archive `archive` (the initramfs format).
fn cpio(root: &Path, archive: &Path) -> anyhow::Result<()> {
    let archive = std::path::absolute(archive)?;
    let mut list = Vec::new();
    let mut stack = vec![PathBuf::from(".")];
    while let Some(dir) = stack.pop() {
        list.push(dir.clone());
        let mut entries: Vec<PathBuf> = fs::read_dir(root.join(&dir))?
            .flatten()
            .map(|e| dir.join(e.file_name()))
            .collect();
        entries.sort();
        for entry in entries {
            if fs::symlink_metadata(root.join(&entry))?.is_dir() {
                stack.push(entry);
            } else {
                list.push(entry);
            }
        }
    }
    let mut cpio = Command::new("cpio")
        .args(["--quiet", "--null", "-o", "-H", "newc", "-O"])
        .arg(&archive)
        .current_dir(root)
        .stdin(Stdio::piped())
        .spawn()
        .context("run cpio (cargo xtask setup installs it)")?;
    {
        let mut stdin = cpio.stdin.take().expect("piped");
        for path in &list {
            stdin.write_all(path.as_os_str().as_encoded_bytes())?;
            stdin.write_all(b"\0")?;
        }
    }
    let status = cpio.wait()?;
    if !status.success() {
        bail!("cpio failed ({status})");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_generic_kernel_of_a_series_is_chosen() {
        let packages = [
            "linux-image-6.1.0-47-amd64-unsigned",
            "linux-image-6.1.0-57-cloud-amd64-unsigned",
            "linux-image-6.1.0-9-amd64-unsigned",
            "linux-image-6.1.0-57-rt-amd64-unsigned",
            "linux-image-6.1.0-50-amd64-unsigned",
            "linux-image-6.12.107+deb12-amd64-unsigned",
            "linux-image-6.12.118+deb12-amd64-unsigned",
            "linux-image-6.12.99+deb12-amd64-unsigned",
            "linux-image-amd64",
        ];
        assert_eq!(
            newest_release(packages.into_iter(), (6, 1)).as_deref(),
            Some("6.1.0-50")
        );
        assert_eq!(
            newest_release(packages.into_iter(), (6, 12)).as_deref(),
            Some("6.12.118+deb12")
        );
        assert_eq!(newest_release(packages.into_iter(), (5, 15)), None);
    }

    #[test]
    fn libtest_summaries_are_counted() {
        assert_eq!(
            libtest_summary(
                "test result: ok. 9 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 80.1s"
            ),
            Some((9, 0))
        );
        assert_eq!(
            libtest_summary("test result: FAILED. 8 passed; 1 failed; 0 ignored; 0 measured"),
            Some((8, 1))
        );
        assert_eq!(libtest_summary("test foo ... ok"), None);
    }

    fn console(lines: &[&str]) -> Console {
        let mut console = Console::default();
        let now = Instant::now();
        for line in lines {
            console.feed(now, line);
        }
        console
    }

    #[test]
    fn a_failing_test_in_the_guest_fails_the_suite_with_its_report() {
        let console = console(&[
            "meshlet-vmtest: begin capture",
            "test a ... ok",
            "test b ... FAILED",
            "failures:",
            "---- b stdout ----",
            "thread 'b' panicked at tests/tests/capture.rs:1:1:",
            "veth: Operation not supported",
            "failures:",
            "    b",
            "test result: FAILED. 1 passed; 1 failed; 0 ignored",
            "meshlet-vmtest: end capture exit=1",
            "meshlet-vmtest: done",
        ]);
        let outcome = console.outcome("6.1.0-57", "capture");
        assert_eq!((outcome.passed, outcome.failed), (1, 1));
        let failure = outcome.failure.expect("failed");
        assert!(
            failure.contains("veth: Operation not supported"),
            "{failure}"
        );
    }

    #[test]
    fn a_kernel_warning_fails_the_suite_it_came_in_and_markers_survive_interleaving() {
        let console = console(&[
            "meshlet-vmtest: begin capture",
            "[   12.345678] WARNING: CPU: 1 PID: 99 at net/core/filter.c:123 bpf_foo+0x1/0x2",
            "test result: ok. 9 passed; 0 failed; 0 ignored",
            "[   13.1] veth0: renamed from eth0meshlet-vmtest: end capture exit=0",
            "meshlet-vmtest: begin e2e",
            "test result: ok. 4 passed; 0 failed; 0 ignored",
            "test result: ok. 0 passed; 0 failed; 0 ignored; 0 measured; 3 filtered out",
            "meshlet-vmtest: end e2e exit=0",
        ]);
        let capture = console.outcome("6.1", "capture");
        assert_eq!(capture.passed, 9);
        assert!(capture.time.is_some(), "the end marker was read");
        let failure = capture.failure.expect("failed");
        assert!(failure.contains("WARNING: CPU: 1"), "{failure}");
        assert_eq!(
            console.outcome("6.1", "e2e").failure.as_deref(),
            Some("1 test binary(ies) ran no test (were they all skipped?)")
        );
        assert!(!kernel_fault("test warning_is_logged ... ok"));
    }

    #[test]
    fn a_hung_guest_fails_the_suite_it_was_in_and_not_those_it_finished() {
        let mut hung = console(&[
            "meshlet-vmtest: begin capture",
            "test result: ok. 9 passed; 0 failed; 0 ignored",
            "meshlet-vmtest: end capture exit=0",
            "meshlet-vmtest: begin e2e",
            "test the_demo ... ",
        ]);
        hung.hung = Some(Duration::from_secs(60));
        assert_eq!(hung.outcome("6.1", "capture").failure, None);
        let failure = hung.outcome("6.1", "e2e").failure.expect("failed");
        assert!(
            failure.starts_with("the guest hung (killed after 60s)"),
            "{failure}"
        );
        assert!(failure.contains("test the_demo"), "{failure}");
    }

    #[test]
    fn a_guest_that_dies_or_runs_nothing_fails() {
        let died = console(&[
            "meshlet-vmtest: begin capture",
            "test a ... ok",
            "Kernel panic",
        ]);
        let failure = died.outcome("6.1", "capture").failure.expect("failed");
        assert!(failure.contains("Kernel panic"), "{failure}");

        let init = console(&["meshlet-vmtest: guest-error insmod veth"]);
        let failure = init.outcome("6.1", "capture").failure.expect("failed");
        assert!(failure.contains("insmod veth"), "{failure}");

        let nothing = console(&[
            "meshlet-vmtest: begin capture",
            "test result: ok. 0 passed; 0 failed; 0 ignored",
            "meshlet-vmtest: end capture exit=0",
        ]);
        assert_eq!(
            nothing.outcome("6.1", "capture").failure.as_deref(),
            Some("no test ran")
        );

        let passed = console(&[
            "meshlet-vmtest: begin capture",
            "test result: ok. 9 passed; 0 failed; 0 ignored",
            "meshlet-vmtest: end capture exit=0",
        ]);
        assert_eq!(passed.outcome("6.1", "capture").failure, None);
    }
}
