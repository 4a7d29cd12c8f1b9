//! `cargo xtask fuzz`: the cargo-fuzz targets in `fuzz/` under libFuzzer (docs/testing.md,
//! "Fuzzing").
//!
//! Every target is built with AddressSanitizer and debug assertions into `fuzz/target`, which
//! every run shares, so only the first build of each kind is slow. `cargo xtask fuzz` builds them
//! optimized (many more executions per second, for the long runs); the short run in
//! `cargo xtask test` builds them unoptimized ([`Build::Smoke`]: a third of the build time,
//! which a fresh CI clone pays every time, for a run that only has to replay the corpus and
//! explore for a few seconds). Each then runs for a while on its corpus, `fuzz/corpus/<target>/`:
//! the committed `seed-*` files plus what earlier runs found (not committed). A run's output
//! goes to `fuzz/target/<target>.log`; one line sums it up. A crash fails the run and names the
//! input libFuzzer saved, `fuzz/artifacts/<target>/crash-*`, which becomes a unit test.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::SystemTime,
};

use anyhow::{Context as _, bail};

use crate::setup::NIGHTLY;

/// The targets, as `fuzz/Cargo.toml` names them.
pub const TARGETS: &[&str] = &[
    "workload_file",
    "policy_compile",
    "hbone_request",
    "spiffe_identity",
];

/// How long each target runs in `cargo xtask fuzz` unless told.
pub const DEFAULT_SECONDS: u64 = 60;

/// How long each target runs in `cargo xtask test`: catches what a change broke on the way
/// in, not what takes hours to find.
pub const SMOKE_SECONDS: u64 = 10;

/// The fuzz crate's target directory, shared by every build of the targets.
const TARGET_DIR: &str = "fuzz/target";

/// An input that runs longer than this (seconds) is a hang: libFuzzer saves it and fails.
const INPUT_TIMEOUT: u64 = 30;

/// How the targets are built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Build {
    /// Optimized (cargo-fuzz's release profile), for fuzzing that finds things.
    Fuzzing,
    /// Unoptimized (`--dev`), for the short run of `cargo xtask test`.
    Smoke,
}

/// Builds the targets, then runs each of `targets` for `seconds`. Fails after running them all
/// if any crashed, naming the inputs that crashed them.
pub fn run(targets: &[&str], seconds: u64, build: Build) -> anyhow::Result<()> {
    if let Some(unknown) = targets.iter().find(|t| !TARGETS.contains(t)) {
        bail!(
            "there is no fuzz target {unknown:?}; the targets are {}",
            TARGETS.join(", ")
        );
    }
    crate::run(&mut cargo_fuzz(&["build"], build))
        .context("building the fuzz targets (`cargo xtask setup` installs cargo-fuzz)")?;
    let mut failures = Vec::new();
    for target in targets {
        if let Err(err) = run_one(target, seconds, build) {
            println!("fuzz: {target}: {err:#}");
            failures.push(format!("{err:#}"));
        }
    }
    if !failures.is_empty() {
        bail!(
            "{} of {} fuzz targets failed; add each crashing input as a unit test next to the \
             code that crashed (docs/testing.md, \"Fuzzing\"):\n  {}",
            failures.len(),
            targets.len(),
            failures.join("\n  ")
        );
    }
    Ok(())
}

fn run_one(target: &str, seconds: u64, build: Build) -> anyhow::Result<()> {
    println!("fuzz: {target} for {seconds} s");
    let log_path = Path::new(TARGET_DIR).join(format!("{target}.log"));
    let log =
        fs::File::create(&log_path).with_context(|| format!("create {}", log_path.display()))?;
    let started = SystemTime::now();
    let mut command = cargo_fuzz(&["run", target], build);
    command
        .args(["--", &format!("-max_total_time={seconds}")])
        .arg(format!("-timeout={INPUT_TIMEOUT}"))
        .arg("-print_final_stats=1")
        .stdout(log.try_clone()?)
        .stderr(log);
    let status = command
        .status()
        .with_context(|| format!("cannot start {command:?}"))?;
    let output = fs::read_to_string(&log_path).unwrap_or_default();
    if status.success() {
        // libFuzzer's last status line: `#<runs>  DONE  cov: .. corp: .. exec/s: .. rss: ..`.
        let done = output
            .lines()
            .rev()
            .find(|line| line.starts_with('#') && line.contains("DONE"))
            .unwrap_or("(no summary; see the log)");
        let done: Vec<&str> = done.split_whitespace().collect();
        println!("fuzz: {target}: {}", done.join(" "));
        return Ok(());
    }
    let lines: Vec<&str> = output.lines().collect();
    for line in &lines[lines.len().saturating_sub(60)..] {
        println!("    {line}");
    }
    let artifacts = artifacts_since(target, started);
    if artifacts.is_empty() {
        bail!(
            "{target} failed ({status}) without saving an input; the whole output is in {}",
            log_path.display()
        );
    }
    let artifacts: Vec<String> = artifacts.iter().map(|a| a.display().to_string()).collect();
    bail!(
        "{target} crashed on {} (reproduce: cargo +{NIGHTLY} fuzz run{} --debug-assertions --codegen-units 16 {target} \
         {}; the whole output is in {})",
        artifacts.join(", "),
        if build == Build::Smoke { " --dev" } else { "" },
        artifacts[0],
        log_path.display()
    )
}

/// `cargo +nightly fuzz <args> --debug-assertions --codegen-units 16 --target-dir fuzz/target`
/// (and `--dev` for [`Build::Smoke`]), so that every build of the targets has the same flags
/// and shares one target directory.
fn cargo_fuzz(args: &[&str], build: Build) -> Command {
    let mut command = Command::new("rustup");
    // This is a stable cargo's child: its toolchain must not leak into the nightly build.
    for var in ["RUSTUP_TOOLCHAIN", "CARGO", "RUSTC"] {
        command.env_remove(var);
    }
    command
        .args(["run", NIGHTLY, "cargo", "fuzz"])
        .args(args)
        // 16 codegen units: the cold build (the agent and all its dependencies) takes about
        // half as long, for somewhat fewer executions per second; a fresh CI clone pays it on
        // every run.
        .args(["--debug-assertions", "--codegen-units", "16"])
        .args(["--target-dir", TARGET_DIR])
        .stdin(Stdio::null());
    if build == Build::Smoke {
        command.arg("--dev");
    }
    command
}

/// The inputs libFuzzer saved for `target` (crashes, leaks, timeouts, out-of-memory) since
/// `since`.
fn artifacts_since(target: &str, since: SystemTime) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(Path::new("fuzz/artifacts").join(target)) else {
        return Vec::new();
    };
    let mut artifacts: Vec<PathBuf> = entries
        .flatten()
        .filter(|entry| {
            entry
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|modified| modified >= since)
        })
        .map(|entry| entry.path())
        .collect();
    artifacts.sort();
    artifacts
}
