//! `cargo xtask setup`: installs what building and testing meshlet need on a Debian machine.
//!
//! Idempotent and quiet: each prerequisite is checked first and only what is missing is
//! installed, with one line saying so. Installing needs root.

use std::process::{Command, Stdio};

use anyhow::{Context as _, bail};

/// Debian packages: LLVM 22 for bpf-linker, bpftool and iproute2 for the tests and demo,
/// tcpdump for the demo's look at the wire, kubectl to render the kustomizations in deploy/,
/// iptables for ztunnel's capture when the benchmarks run it beside meshlet; musl-tools,
/// buildah and crun for the container image (`cargo xtask image`) and its test; qemu,
/// busybox-static and cpio for the kernel matrix (`cargo xtask vmtest`: guests booted from
/// Debian's kernels, with a busybox initramfs).
const APT_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    "bpftool",
    "iproute2",
    "tcpdump",
    "kubectl",
    "iptables",
    "musl-tools",
    "buildah",
    "crun",
    "qemu-system-x86",
    "busybox-static",
    "cpio",
    "xz-utils",
    "kmod",
];

/// The offline Kubernetes schema validator `cargo xtask test` runs on `deploy/` (PyPI).
const KUBERNETES_VALIDATE: &str = "kubernetes-validate==1.37.0";

/// The nightly toolchain that builds `ebpf/`, and the components it needs.
pub const NIGHTLY: &str = "nightly";
const NIGHTLY_COMPONENTS: &[&str] = &["rust-src", "clippy"];

/// bpf-linker release series known to work with LLVM 22 and aya 0.14.
const BPF_LINKER_VERSION: &str = "0.13";

/// cargo-fuzz release series `cargo xtask fuzz` drives (its flags, `fuzz/` layout).
const CARGO_FUZZ_VERSION: &str = "0.13";

/// Installs whatever is missing.
pub fn run() -> anyhow::Result<()> {
    apt()?;
    nightly()?;
    musl_target()?;
    bpf_linker()?;
    cargo_fuzz()?;
    kubernetes_validate()?;
    Ok(())
}

fn apt() -> anyhow::Result<()> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|pkg| !dpkg_installed(pkg))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    println!("setup: installing apt packages: {}", missing.join(" "));
    require_root("install apt packages")?;
    quiet(Command::new("apt-get").args(["update", "-q"]))?;
    quiet(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing),
    )
}

fn dpkg_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .stderr(Stdio::null())
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).contains("install ok installed"))
}

fn nightly() -> anyhow::Result<()> {
    let installed = output(Command::new("rustup").args(["toolchain", "list"])).context(
        "rustup is needed to manage the nightly toolchain that builds the eBPF programs",
    )?;
    if !installed.lines().any(|line| line.starts_with(NIGHTLY)) {
        println!("setup: installing the {NIGHTLY} toolchain");
        quiet(Command::new("rustup").args([
            "toolchain",
            "install",
            NIGHTLY,
            "--profile",
            "minimal",
        ]))?;
    }
    let components = output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        NIGHTLY,
    ]))?;
    for component in NIGHTLY_COMPONENTS {
        if !components.lines().any(|line| line.starts_with(component)) {
            println!("setup: adding {component} to the {NIGHTLY} toolchain");
            quiet(Command::new("rustup").args([
                "component",
                "add",
                component,
                "--toolchain",
                NIGHTLY,
            ]))?;
        }
    }
    Ok(())
}

/// The standard library for the image's static binaries, on the pinned toolchain
/// (`rust-toolchain.toml`, which rustup reads in the workspace).
fn musl_target() -> anyhow::Result<()> {
    let installed = output(Command::new("rustup").args(["target", "list", "--installed"]))?;
    if !installed.lines().any(|line| line == crate::image::TARGET) {
        println!("setup: adding the {} target", crate::image::TARGET);
        quiet(Command::new("rustup").args(["target", "add", crate::image::TARGET]))?;
    }
    Ok(())
}

fn bpf_linker() -> anyhow::Result<()> {
    let version = Command::new("bpf-linker").arg("--version").output();
    if let Ok(out) = &version
        && String::from_utf8_lossy(&out.stdout)
            .contains(&format!("bpf-linker {BPF_LINKER_VERSION}."))
    {
        return Ok(());
    }
    println!(
        "setup: building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (a few minutes, once)"
    );
    quiet(
        Command::new("cargo")
            .env("LLVM_PREFIX", "/usr/lib/llvm-22")
            .env_remove("RUSTUP_TOOLCHAIN")
            .args([
                "install",
                "bpf-linker",
                "--force",
                "--version",
                &format!("~{BPF_LINKER_VERSION}"),
            ])
            .args(["--no-default-features", "--features", "llvm-22"]),
    )
}

fn cargo_fuzz() -> anyhow::Result<()> {
    let version = Command::new("cargo")
        .env_remove("RUSTUP_TOOLCHAIN")
        .args(["fuzz", "--version"])
        .output();
    if let Ok(out) = &version
        && String::from_utf8_lossy(&out.stdout)
            .contains(&format!("cargo-fuzz {CARGO_FUZZ_VERSION}."))
    {
        return Ok(());
    }
    println!("setup: building cargo-fuzz {CARGO_FUZZ_VERSION} (a minute, once)");
    quiet(
        Command::new("cargo")
            .env_remove("RUSTUP_TOOLCHAIN")
            .args(["install", "cargo-fuzz", "--locked", "--force", "--version"])
            .arg(format!("~{CARGO_FUZZ_VERSION}")),
    )
}

/// Whether `python3 -m kubernetes_validate` runs (the interpreter first on PATH).
pub fn kubernetes_validate_present() -> bool {
    Command::new("python3")
        .args(["-m", "kubernetes_validate", "--version"])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn kubernetes_validate() -> anyhow::Result<()> {
    if kubernetes_validate_present() {
        return Ok(());
    }
    println!("setup: installing {KUBERNETES_VALIDATE} (pip)");
    let pip = |extra: &[&str]| {
        quiet(
            Command::new("python3")
                .args(["-m", "pip", "install", "-q", "--root-user-action=ignore"])
                .args(extra)
                .arg(KUBERNETES_VALIDATE),
        )
    };
    if Command::new("python3")
        .args(["-m", "pip", "--version"])
        .output()
        .map_or(true, |o| !o.status.success())
    {
        // Debian's own python3 comes without pip.
        require_root("install python3-pip")?;
        quiet(
            Command::new("apt-get")
                .env("DEBIAN_FRONTEND", "noninteractive")
                .args(["install", "-y", "-q", "python3-pip"]),
        )?;
    }
    // Debian's python3 refuses system-wide installs unless told (PEP 668); a pyenv one does not.
    pip(&[]).or_else(|_| pip(&["--break-system-packages"]))?;
    if !kubernetes_validate_present() {
        bail!(
            "installed {KUBERNETES_VALIDATE}, but `python3 -m kubernetes_validate` still does not run"
        );
    }
    Ok(())
}

fn require_root(what: &str) -> anyhow::Result<()> {
    if !crate::preflight::is_root() {
        bail!("cannot {what}: setup must run as root");
    }
    Ok(())
}

/// Runs a command and returns what it printed; fails with its stderr if it fails.
pub fn output(command: &mut Command) -> anyhow::Result<String> {
    let out = command
        .output()
        .with_context(|| format!("cannot start {command:?}"))?;
    if !out.status.success() {
        bail!(
            "{command:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs a command, showing its output only if it fails.
fn quiet(command: &mut Command) -> anyhow::Result<()> {
    let out = command
        .output()
        .with_context(|| format!("cannot start {command:?}"))?;
    if !out.status.success() {
        bail!(
            "{command:?} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}
