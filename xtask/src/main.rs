//! `cargo xtask`: every piece of meshlet's automation, in one place.
//!
//! - `setup`: install what building and testing need on a Debian machine (idempotent, quiet
//!   when everything is present);
//! - `build`: setup, then build the workspace (the agent embeds the eBPF object);
//! - `test`: setup, preflight checks, fmt, clippy, unit tests, a short run of every fuzz
//!   target, then the root-only end-to-end tests, then a check that they left nothing behind;
//! - `demo`: setup, build, then the walk-through on a simulated cluster;
//! - `bench`: setup, release build, then the benchmarks on a simulated cluster;
//! - `fuzz`: setup, then the cargo-fuzz targets in `fuzz/` under libFuzzer.

mod fuzz;
mod preflight;
mod setup;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "cargo xtask", about = "meshlet's automation")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Install missing prerequisites (apt packages, nightly rust-src, bpf-linker, cargo-fuzz).
    /// Needs root.
    Setup,
    /// Setup, then build the workspace and the embedded eBPF programs.
    Build {
        /// Build with the release profile.
        #[arg(long)]
        release: bool,
    },
    /// Setup, then fmt, clippy, unit tests, every fuzz target for 10 s and the root-only
    /// end-to-end tests.
    Test {
        /// Only run tests (and fuzz targets) whose name contains this filter (lints still run).
        filter: Option<String>,
    },
    /// Setup, build (release), then run the benchmarks on the simulated cluster.
    Bench {
        /// Fewer repetitions: a regression check in well under two minutes.
        #[arg(long)]
        quick: bool,
        /// Also write every figure as JSON to this file.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Measure another proxy the same way (path `external`): a shell command run in a pod
        /// outside the mesh, with `{listen}`, `{listen_port}` and `{upstream}` filled in.
        #[arg(long)]
        external_proxy: Option<String>,
    },
    /// Setup, build, then walk through meshlet on a simulated two-node cluster.
    Demo {
        /// Leave the cluster running at the end and print how to poke at it.
        #[arg(long)]
        keep: bool,
    },
    /// Setup, then run the fuzz targets in fuzz/ (nightly, libFuzzer, AddressSanitizer); a
    /// crash fails with the path of the input that caused it.
    Fuzz {
        /// How long each target runs, in seconds.
        #[arg(long, default_value_t = fuzz::DEFAULT_SECONDS)]
        seconds: u64,
        /// Run only this target (workload_file, policy_compile, hbone_request,
        /// spiffe_identity).
        #[arg(long)]
        target: Option<String>,
    },
}

fn main() -> anyhow::Result<()> {
    let root = workspace_root();
    std::env::set_current_dir(&root).with_context(|| format!("cd {}", root.display()))?;
    match Cli::parse().command {
        Task::Setup => setup::run(),
        Task::Build { release } => {
            setup::run()?;
            build(release)
        }
        Task::Test { filter } => test(filter.as_deref()),
        Task::Bench {
            quick,
            json,
            external_proxy,
        } => bench(quick, json, external_proxy),
        Task::Demo { keep } => demo(keep),
        Task::Fuzz { seconds, target } => {
            setup::run()?;
            match target {
                Some(target) => fuzz::run(&[&target], seconds),
                None => fuzz::run(fuzz::TARGETS, seconds),
            }
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_owned()
}

fn build(release: bool) -> anyhow::Result<()> {
    let mut args = vec!["build", "--workspace", "--bins"];
    if release {
        args.push("--release");
    }
    cargo(&args)
}

fn test(filter: Option<&str>) -> anyhow::Result<()> {
    setup::run()?;
    preflight::check().context("the end-to-end tests cannot run on this machine")?;
    preflight::remove_leftovers()?;

    step("format");
    cargo(&["fmt", "--all", "--", "--check"])?;
    run(Command::new("rustfmt").args(["--edition", "2024", "--check", "ebpf/src/main.rs"]))?;
    run(Command::new("rustfmt")
        .args(["--edition", "2024", "--check"])
        .args(
            fuzz::TARGETS
                .iter()
                .map(|t| format!("fuzz/fuzz_targets/{t}.rs")),
        ))?;

    step("clippy");
    cargo(&[
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ])?;
    run(Command::new("rustup")
        .current_dir("ebpf")
        .env_remove("RUSTUP_TOOLCHAIN")
        .args([
            "run",
            setup::NIGHTLY,
            "cargo",
            "clippy",
            "--release",
            "--locked",
            "--target-dir",
            "../target/ebpf",
            "--",
            "-D",
            "warnings",
        ]))?;

    step("deploy manifests (kustomize, Kubernetes schemas)");
    deploy_manifests()?;

    let filter: Vec<&str> = filter.into_iter().collect();
    step("unit tests");
    let mut unit = vec!["test", "--workspace", "--exclude", "meshlet-tests", "--"];
    unit.extend(&filter);
    cargo(&unit)?;

    let fuzz_targets: Vec<&str> = fuzz::TARGETS
        .iter()
        .copied()
        .filter(|target| filter.iter().all(|f| target.contains(f)))
        .collect();
    if !fuzz_targets.is_empty() {
        step(&format!(
            "fuzz targets ({} s each, libFuzzer)",
            fuzz::SMOKE_SECONDS
        ));
        fuzz::run(&fuzz_targets, fuzz::SMOKE_SECONDS)?;
    }

    step("end-to-end tests (network namespaces, cgroups, eBPF)");
    // The tests run the real `meshlet` binary, which `cargo test -p meshlet-tests` does not build.
    cargo(&["build", "--workspace", "--bins"])?;
    let mut e2e = vec!["test", "--package", "meshlet-tests", "--"];
    e2e.extend(&filter);
    let outcome = cargo(&e2e);

    step("leftovers");
    let leaks = preflight::leftovers()?;
    outcome?;
    if !leaks.is_empty() {
        bail!("the tests left these behind:\n  {}", leaks.join("\n  "));
    }
    println!("no namespaces, cgroups or bpffs pins left behind");
    Ok(())
}

fn bench(quick: bool, json: Option<PathBuf>, external_proxy: Option<String>) -> anyhow::Result<()> {
    setup::run()?;
    preflight::check().context("the benchmarks cannot run on this machine")?;
    cargo(&["build", "--release", "--workspace", "--bins"])?;
    let mut bench = Command::new("target/release/meshlet-bench");
    bench.arg("all");
    if let Ok(out) = Command::new("git").args(["rev-parse", "HEAD"]).output() {
        bench.env(
            "MESHLET_BENCH_COMMIT",
            String::from_utf8_lossy(&out.stdout).trim(),
        );
    }
    if quick {
        bench.arg("--quick");
    }
    if let Some(json) = json {
        bench.arg("--json").arg(json);
    }
    if let Some(command) = external_proxy {
        bench.arg("--external-proxy").arg(command);
    }
    run(&mut bench)
}

/// Renders every kustomization in deploy/ and validates each object against the Kubernetes
/// schemas, offline. Fails on an invalid manifest.
fn deploy_manifests() -> anyhow::Result<()> {
    for kustomization in ["deploy/base", "deploy/overlays/istio-ca"] {
        let out = Command::new("kubectl")
            .args(["kustomize", kustomization])
            .output()
            .context("run kubectl kustomize")?;
        if !out.status.success() {
            bail!(
                "kubectl kustomize {kustomization}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let rendered =
            std::env::temp_dir().join(format!("meshlet-{}.yaml", kustomization.replace('/', "-")));
        std::fs::write(&rendered, &out.stdout)?;
        let validated = Command::new("python3")
            .args([
                "-m",
                "kubernetes_validate",
                "-k",
                "1.32.0",
                "--strict",
                "--quiet",
            ])
            .arg(&rendered)
            .output()
            .context("run kubernetes-validate (cargo xtask setup installs it)")?;
        let _ = std::fs::remove_file(&rendered);
        if !validated.status.success() {
            bail!(
                "{kustomization} does not validate:\n{}{}",
                String::from_utf8_lossy(&validated.stdout),
                String::from_utf8_lossy(&validated.stderr)
            );
        }
        let objects = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.starts_with("kind:"))
            .count();
        println!("{kustomization}: {objects} objects valid against Kubernetes 1.32");
    }
    Ok(())
}

fn demo(keep: bool) -> anyhow::Result<()> {
    setup::run()?;
    preflight::check().context("the demo cannot run on this machine")?;
    cargo(&["build", "--workspace", "--bins"])?;
    let mut demo = Command::new("target/debug/meshlet-demo");
    if keep {
        demo.arg("--keep");
    }
    run(&mut demo)
}

fn step(name: &str) {
    println!("\n==> {name}");
}

fn cargo(args: &[&str]) -> anyhow::Result<()> {
    run(Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())).args(args))
}

fn run(command: &mut Command) -> anyhow::Result<()> {
    let status = command
        .status()
        .with_context(|| format!("cannot start {command:?}"))?;
    if !status.success() {
        bail!("{command:?} failed: {status}");
    }
    Ok(())
}
