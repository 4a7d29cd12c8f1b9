//! `cargo xtask`: every piece of meshlet's automation, in one place.
//!
//! - `setup`: install what building and testing need on a Debian machine (idempotent, quiet
//!   when everything is present);
//! - `build`: setup, then build the workspace (the agent embeds the eBPF object);
//! - `test`: setup, preflight checks, fmt, clippy, unit tests, a short run of every fuzz
//!   target, then the root-only end-to-end tests, then a check that they left nothing behind,
//!   then the capture suite again in a guest running Linux 6.1;
//! - `demo`: setup, build, then the walk-through on a simulated cluster;
//! - `bench`: setup, release build, then the benchmarks on a simulated cluster (with
//!   `--ztunnel <path>`, Istio's ztunnel side by side);
//! - `interop`: setup, release build, then meshlet against Istio's ztunnel (`--ztunnel`);
//! - `fuzz`: setup, then the cargo-fuzz targets in `fuzz/` under libFuzzer;
//! - `image`: setup, then the agent's OCI image (static musl binaries `FROM scratch`, by
//!   buildah), written as an archive and optionally pushed;
//! - `vmtest`: setup, build, then the kernel-facing suites in qemu guests running Debian's 6.1
//!   and 6.12 kernels.

mod fuzz;
mod image;
mod preflight;
mod setup;
mod vmtest;

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
    /// Setup, then fmt, clippy, unit tests, every fuzz target for 10 s, the root-only
    /// end-to-end tests, and the capture suite in a Linux 6.1 guest.
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
        /// Istio's ztunnel binary (its directory holds its test root): measured side by side
        /// as paths `ztunnel` and `ztunnel-samenode`, and checked for interop.
        #[arg(long)]
        ztunnel: Option<PathBuf>,
    },
    /// Setup, build (release), then check that meshlet and Istio's ztunnel interoperate:
    /// ztunnel gets its certificate from `meshlet ca`, and each tunnels to the other over HBONE.
    Interop {
        /// Istio's ztunnel binary; its directory holds its test root (root-cert.pem,
        /// ca-key.pem).
        #[arg(long)]
        ztunnel: PathBuf,
    },
    /// Setup, build, then walk through meshlet on a simulated two-node cluster.
    Demo {
        /// Leave the cluster running at the end and print how to poke at it.
        #[arg(long)]
        keep: bool,
    },
    /// Setup, then build the agent's container image without Docker: static
    /// x86_64-unknown-linux-musl binaries FROM scratch, by buildah, written to
    /// target/image/meshlet-<version>.oci.tar.
    Image {
        /// Also push it to this registry reference (`ghcr.io/you/meshlet:0.1.0`), with
        /// buildah's credentials (`buildah login`).
        #[arg(long)]
        push: Option<String>,
        /// The cargo profile the binaries are built with.
        #[arg(long, default_value = "release")]
        profile: String,
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
    /// Setup, build, then run test suites in qemu guests (software emulation) booted from
    /// Debian's kernels: the kernel matrix.
    Vmtest {
        /// The kernel series: the newest Debian linux-image-<series>.*-amd64-unsigned.
        #[arg(long, value_enum, default_value = "6.1")]
        kernel: vmtest::Kernel,
        /// The suites: `capture` (the eBPF programs), `e2e` (the two-node walk-through,
        /// source-address preservation, the agent's lifecycle).
        #[arg(long, value_enum, default_value = "capture")]
        suite: vmtest::Suite,
        /// More kernel command line for the guests (`ipv6.disable=1` makes a kernel without
        /// IPv6, on which the suites must fail).
        #[arg(long)]
        append: Option<String>,
        /// Arguments for the guests' test binaries instead of the suite's skip list: a filter
        /// (`-- a_successor_takes`), `--exact`, `--nocapture`.
        #[arg(last = true)]
        test_args: Vec<String>,
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
            ztunnel,
        } => bench(quick, json, external_proxy, ztunnel),
        Task::Interop { ztunnel } => interop(&ztunnel),
        Task::Demo { keep } => demo(keep),
        Task::Image { push, profile } => {
            setup::run()?;
            image::build(&profile, push.as_deref()).map(drop)
        }
        Task::Fuzz { seconds, target } => {
            setup::run()?;
            match target {
                Some(target) => fuzz::run(&[&target], seconds, fuzz::Build::Fuzzing),
                None => fuzz::run(fuzz::TARGETS, seconds, fuzz::Build::Fuzzing),
            }
        }
        Task::Vmtest {
            kernel,
            suite,
            append,
            test_args,
        } => {
            setup::run()?;
            vmtest::run(&vmtest::Options {
                kernel,
                suite,
                append,
                test_args,
            })
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
        fuzz::run(&fuzz_targets, fuzz::SMOKE_SECONDS, fuzz::Build::Smoke)?;
    }

    step("container image (static musl binaries FROM scratch, buildah)");
    // The image test (tests/tests/image.rs) runs what this builds.
    image::build(IMAGE_TEST_PROFILE, None)?;

    step("end-to-end tests (network namespaces, cgroups, eBPF)");
    // The tests run the real `meshlet` binary, which `cargo test -p meshlet-tests` does not build.
    cargo(&["build", "--workspace", "--bins"])?;
    let variant = variant_ebpf_object()?;
    let mut e2e = vec!["test", "--package", "meshlet-tests", "--"];
    e2e.extend(&filter);
    let outcome = run(
        Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args(&e2e)
            .env("MESHLET_VARIANT_EBPF_OBJECT", &variant),
    );

    step("leftovers");
    let leaks = preflight::leftovers()?;
    outcome?;
    if !leaks.is_empty() {
        bail!("the tests left these behind:\n  {}", leaks.join("\n  "));
    }
    println!("no namespaces, cgroups or bpffs pins left behind");

    step("kernel matrix: the capture suite on Linux 6.1, in a qemu guest");
    if filter.is_empty() {
        vmtest::run(&vmtest::Options {
            kernel: vmtest::Kernel::V6_1,
            suite: vmtest::Suite::Capture,
            append: None,
            test_args: Vec::new(),
        })?;
    } else {
        println!("not with a filter; `cargo xtask vmtest` runs it");
    }
    Ok(())
}

/// Builds the variant of the eBPF programs (`meshlet-ebpf --features variant`: the same
/// programs in other instructions) into `target/ebpf-variant` and returns its absolute path. An
/// agent started on it and then replaced by the real build must upgrade its programs in place
/// (`tests/tests/lifecycle.rs` and the benchmarks' restart scenarios, which find it through
/// `MESHLET_VARIANT_EBPF_OBJECT`).
fn variant_ebpf_object() -> anyhow::Result<PathBuf> {
    let target = std::env::current_dir()?.join("target/ebpf-variant");
    let mut cargo = Command::new("rustup");
    // This is a stable cargo's child: its toolchain must not leak into the nightly build.
    for var in [
        "RUSTUP_TOOLCHAIN",
        "RUSTC",
        "RUSTFLAGS",
        "CARGO",
        "CARGO_TARGET_DIR",
    ] {
        cargo.env_remove(var);
    }
    run(cargo
        .current_dir("ebpf")
        .args([
            "run",
            setup::NIGHTLY,
            "cargo",
            "build",
            "--release",
            "--locked",
        ])
        .args(["--features", "variant", "--target-dir"])
        .arg(&target))
    .context("building the variant eBPF object")?;
    Ok(target.join("bpfel-unknown-none/release/meshlet"))
}

/// The profile of the image `cargo xtask test` builds and tests: `dev`, which compiles in half
/// the time of `release` for the musl target (the image and its checks are the same).
const IMAGE_TEST_PROFILE: &str = "dev";

fn bench(
    quick: bool,
    json: Option<PathBuf>,
    external_proxy: Option<String>,
    ztunnel: Option<PathBuf>,
) -> anyhow::Result<()> {
    setup::run()?;
    preflight::check().context("the benchmarks cannot run on this machine")?;
    cargo(&["build", "--release", "--workspace", "--bins"])?;
    let mut bench = Command::new("target/release/meshlet-bench");
    // The restart scenarios upgrade an agent from the variant eBPF build.
    bench
        .arg("all")
        .env("MESHLET_VARIANT_EBPF_OBJECT", variant_ebpf_object()?);
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
    if let Some(ztunnel) = ztunnel {
        bench
            .arg("--ztunnel")
            .arg(ztunnel.canonicalize().context("--ztunnel")?);
    }
    run(&mut bench)
}

fn interop(ztunnel: &Path) -> anyhow::Result<()> {
    setup::run()?;
    preflight::check().context("the interop check cannot run on this machine")?;
    cargo(&["build", "--release", "--workspace", "--bins"])?;
    run(Command::new("target/release/meshlet-bench")
        .arg("interop")
        .arg("--ztunnel")
        .arg(ztunnel.canonicalize().context("--ztunnel")?))
}

/// Istio's policy CRDs, applied on their own where Istio is not installed.
const CRDS: &str = "deploy/crds";

/// Every kustomization in deploy/.
const KUSTOMIZATIONS: [&str; 3] = [CRDS, "deploy/base", "deploy/overlays/istio-ca"];

/// The CRDs live in their own kustomization, so a cluster with Istio skips them: it renders
/// nothing else, and no other renders one.
fn check_crds(kustomization: &str, rendered: &str) -> anyhow::Result<()> {
    use serde::Deserialize as _;
    let kinds: Vec<String> = serde_yaml::Deserializer::from_str(rendered)
        .map(serde_json::Value::deserialize)
        .filter_map(Result::ok)
        .filter_map(|o| o["kind"].as_str().map(str::to_owned))
        .collect();
    let crds = kinds
        .iter()
        .filter(|k| *k == "CustomResourceDefinition")
        .count();
    match (kustomization == CRDS, crds) {
        (true, 0) => bail!("{kustomization} renders no CRD"),
        (true, n) if n != kinds.len() => {
            bail!("{kustomization} must render CRDs only, not {kinds:?}")
        }
        (false, n) if n > 0 => bail!(
            "{kustomization} renders {n} CRD(s): they would collide with Istio's; they belong in \
             {CRDS}"
        ),
        _ => Ok(()),
    }
}

/// Renders every kustomization in deploy/ and validates each object against the Kubernetes
/// schemas, offline. Fails on an invalid manifest.
fn deploy_manifests() -> anyhow::Result<()> {
    for kustomization in KUSTOMIZATIONS {
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
        let rendered = String::from_utf8_lossy(&out.stdout);
        check_crds(kustomization, &rendered)?;
        if kustomization == CRDS {
            println!("{kustomization}: valid against Kubernetes 1.32, CRDs only");
            continue;
        }
        let objects = check_ca_layout(kustomization, &rendered)?;
        check_rollout(kustomization, &rendered)?;
        println!(
            "{kustomization}: {objects} objects valid against Kubernetes 1.32; the CA layout and \
             the rollout settings hold"
        );
    }
    Ok(())
}

/// What the manifests must say beyond the schemas: `meshlet ca` deployed highly available
/// with exactly the RBAC it needs, the agents pointed at it with a projected token, no CA
/// key mounted into the DaemonSet (with `cacerts`, into the CA only), and the agent installing
/// meshlet-cni on the node. Returns the object count.
fn check_ca_layout(kustomization: &str, rendered: &str) -> anyhow::Result<usize> {
    use serde::Deserialize as _;
    let objects: Vec<serde_json::Value> = serde_yaml::Deserializer::from_str(rendered)
        .map(serde_json::Value::deserialize)
        .collect::<Result<_, _>>()
        .context("parse the rendered manifests")?;
    let find = |kind: &str, name: &str| {
        objects
            .iter()
            .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
            .with_context(|| format!("{kustomization}: no {kind} {name}"))
    };
    let fail = |what: String| anyhow::anyhow!("{kustomization}: {what}");

    let ca = find("Deployment", "meshlet-ca")?;
    if ca["spec"]["replicas"] != 2
        || ca["spec"]["template"]["spec"]["containers"][0]["args"][0] != "ca"
    {
        return Err(fail(
            "meshlet-ca must run `meshlet ca` with 2 replicas".into(),
        ));
    }
    let service = find("Service", "meshlet-ca")?;
    if service["spec"]["ports"][0]["port"] != 15012 {
        return Err(fail("the meshlet-ca Service must expose 15012".into()));
    }
    find("PodDisruptionBudget", "meshlet-ca")?;
    let rules = |role: &serde_json::Value| -> Vec<String> {
        role["rules"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|rule| {
                let verbs: Vec<String> = rule["verbs"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect();
                rule["resources"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|r| r.as_str())
                    .flat_map(move |r| {
                        let verbs = verbs.clone();
                        verbs.into_iter().map(move |v| format!("{v} {r}"))
                    })
                    .collect::<Vec<_>>()
            })
            .collect()
    };
    let mut cluster_rules = rules(find("ClusterRole", "meshlet-ca")?);
    cluster_rules.sort();
    if cluster_rules != ["create tokenreviews", "get pods", "list pods", "watch pods"] {
        return Err(fail(format!(
            "the meshlet-ca ClusterRole grants {cluster_rules:?}"
        )));
    }
    let role = find("Role", "meshlet-ca")?;
    if role["metadata"]["namespace"] != "meshlet-system"
        || !rules(role).contains(&"get secrets".to_owned())
    {
        return Err(fail(
            "the meshlet-ca Role must be in meshlet-system and read its Secret".into(),
        ));
    }

    let agent = &find("DaemonSet", "meshlet")?["spec"]["template"]["spec"];
    let env: Vec<&str> = agent["containers"][0]["env"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["name"].as_str())
        .collect();
    if !env.contains(&"MESHLET_CA_ADDRESS") {
        return Err(fail(
            "the agents are not pointed at the CA (MESHLET_CA_ADDRESS)".into(),
        ));
    }
    if env
        .iter()
        .any(|e| matches!(*e, "MESHLET_CA_KEY" | "MESHLET_CA_CERT"))
    {
        return Err(fail(
            "the DaemonSet must not sign locally (MESHLET_CA_KEY/CERT)".into(),
        ));
    }
    let volumes = agent["volumes"].as_array().cloned().unwrap_or_default();
    if volumes.iter().any(|v| !v["secret"].is_null()) {
        return Err(fail(
            "the DaemonSet must not mount a Secret: no key on the nodes".into(),
        ));
    }
    let audience_ok = volumes.iter().any(|v| {
        v["projected"]["sources"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|s| s["serviceAccountToken"]["audience"] == "istio-ca")
    });
    if !audience_ok {
        return Err(fail(
            "the DaemonSet needs a projected token for audience istio-ca".into(),
        ));
    }
    // meshlet-cni: installed by the agent into the host's CNI directories, and calling the agent
    // at the socket path the host sees (the state directory mounted where it is on the host).
    let value_of = |name: &str| {
        agent["containers"][0]["env"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|e| e["name"] == name)
            .and_then(|e| e["value"].as_str())
    };
    let host_path_at = |host: &str, env: Option<&str>| {
        volumes.iter().any(|v| {
            v["hostPath"]["path"] == host
                && agent["containers"][0]["volumeMounts"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|m| m["name"] == v["name"] && m["mountPath"].as_str() == env)
        })
    };
    if value_of("MESHLET_CNI_INSTALL") != Some("true")
        || !host_path_at("/opt/cni/bin", value_of("MESHLET_CNI_BIN_DIR"))
        || !host_path_at("/etc/cni/net.d", value_of("MESHLET_CNI_CONF_DIR"))
        || !host_path_at("/var/lib/meshlet", Some("/var/lib/meshlet"))
    {
        return Err(fail(
            "the agent must install meshlet-cni (MESHLET_CNI_INSTALL) into the host's \
             /opt/cni/bin and /etc/cni/net.d, with /var/lib/meshlet mounted where it is on the \
             host (the plugin's socket path)"
                .into(),
        ));
    }
    if kustomization.ends_with("istio-ca") {
        let ca_volumes = &ca["spec"]["template"]["spec"]["volumes"];
        let mounts_cacerts = ca_volumes
            .as_array()
            .into_iter()
            .flatten()
            .any(|v| v["secret"]["secretName"] == "cacerts");
        if !mounts_cacerts {
            return Err(fail("meshlet-ca must mount the cacerts Secret".into()));
        }
    }
    Ok(objects.len())
}

/// What an agent rollout needs from the DaemonSet: the new agent starts beside the old one
/// (`maxSurge: 1`, `maxUnavailable: 0`, and no host ports, which would keep the scheduler from
/// placing it), the grace period is the drain deadline plus 5 s, and capture fails closed; and
/// what any install needs: Linux nodes only, and a namespace whose Pod Security level admits
/// the agent.
fn check_rollout(kustomization: &str, rendered: &str) -> anyhow::Result<()> {
    use serde::Deserialize as _;
    let fail = |what: String| anyhow::anyhow!("{kustomization}: {what}");
    let objects: Vec<serde_json::Value> = serde_yaml::Deserializer::from_str(rendered)
        .map(serde_json::Value::deserialize)
        .filter_map(Result::ok)
        .collect();
    let find = |kind: &str, name: &str| {
        objects
            .iter()
            .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
            .ok_or_else(|| fail(format!("no {kind} {name}")))
    };
    let daemonset = find("DaemonSet", "meshlet")?;
    let strategy = &daemonset["spec"]["updateStrategy"];
    if strategy["type"] != "RollingUpdate"
        || strategy["rollingUpdate"]["maxSurge"] != 1
        || strategy["rollingUpdate"]["maxUnavailable"] != 0
    {
        return Err(fail(format!(
            "the DaemonSet must roll with maxSurge 1 and maxUnavailable 0 (the new agent takes \
             the listeners from the running one), not {strategy}"
        )));
    }
    let pod = &daemonset["spec"]["template"]["spec"];
    let containers = pod["containers"].as_array().cloned().unwrap_or_default();
    let host_ports: Vec<String> = containers
        .iter()
        .flat_map(|c| c["ports"].as_array().cloned().unwrap_or_default())
        .filter(|p| pod["hostNetwork"] == true || !p["hostPort"].is_null())
        .map(|p| p.to_string())
        .collect();
    if !host_ports.is_empty() {
        return Err(fail(format!(
            "the DaemonSet declares host ports {host_ports:?}: the surge pod could not be \
             scheduled beside the running one"
        )));
    }
    let env = |name: &str| {
        containers[0]["env"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|e| e["name"] == name)
            .and_then(|e| e["value"].as_str().map(str::to_owned))
    };
    let deadline = env("MESHLET_DRAIN_DEADLINE")
        .and_then(|d| d.strip_suffix('s')?.parse::<u64>().ok())
        .ok_or_else(|| fail("MESHLET_DRAIN_DEADLINE must be set in seconds (25s)".into()))?;
    let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap_or(30);
    if grace != deadline + 5 {
        return Err(fail(format!(
            "terminationGracePeriodSeconds ({grace}) must be MESHLET_DRAIN_DEADLINE ({deadline}s) \
             plus 5 s"
        )));
    }
    if env("MESHLET_FAIL_MODE").is_some_and(|mode| mode != "closed") {
        return Err(fail(
            "the agents must fail closed: a rollout hands the listeners over, nothing needs to \
             bypass the mesh"
                .into(),
        ));
    }
    if pod["nodeSelector"]["kubernetes.io/os"] != "linux" {
        return Err(fail(
            "the DaemonSet must select Linux nodes (kubernetes.io/os: linux)".into(),
        ));
    }
    let namespace = find("Namespace", "meshlet-system")?;
    if namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] != "privileged" {
        return Err(fail(
            "meshlet-system needs the privileged Pod Security level (hostNetwork, hostPID, \
             capabilities)"
                .into(),
        ));
    }
    let agent = &containers[0];
    let preflight = pod["initContainers"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["args"].get(0) == Some(&serde_json::json!("preflight")));
    // What preflight looks at must be what the agent uses.
    let node_env = |container: &serde_json::Value| -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> = container["env"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|e| {
                matches!(
                    e["name"].as_str(),
                    Some(
                        "MESHLET_BPFFS_DIR"
                            | "MESHLET_CGROUP_ROOT"
                            | "MESHLET_ALLOW_CGROUP_PROGRAMS"
                    )
                )
            })
            .map(|e| (e["name"].to_string(), e["value"].to_string()))
            .collect();
        env.sort();
        env
    };
    match preflight {
        Some(init) if node_env(init) != node_env(agent) => {
            return Err(fail(format!(
                "the preflight init container must check what the agent uses: {:?} against the \
                 agent's {:?}",
                node_env(init),
                node_env(agent)
            )));
        }
        Some(init) if init["securityContext"] == agent["securityContext"] => {}
        Some(_) => {
            return Err(fail(
                "the preflight init container must run with the agent's securityContext (it \
                 checks what the agent will have)"
                    .into(),
            ));
        }
        None => {
            return Err(fail(
                "the DaemonSet must run `meshlet preflight` as an init container".into(),
            ));
        }
    }
    if agent["livenessProbe"]["httpGet"]["path"] != "/healthz/live" {
        return Err(fail(
            "the agent needs a liveness probe on /healthz/live (readiness is not liveness: an \
             agent waiting for the API server must not be restarted)"
                .into(),
        ));
    }
    let security = &agent["securityContext"];
    if security["seccompProfile"]["type"] != "RuntimeDefault"
        || security["appArmorProfile"]["type"] != "Unconfined"
        || security["privileged"] == true
    {
        return Err(fail(format!(
            "the agent runs unprivileged with seccomp RuntimeDefault and AppArmor Unconfined \
             (bpffs pins), not {security}"
        )));
    }
    if env("MESHLET_CGROUP_ROOT").is_some() {
        return Err(fail(
            "no hard-coded MESHLET_CGROUP_ROOT: the agent finds the host's cgroup2 root".into(),
        ));
    }
    let pod_name = agent["env"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|e| e["name"] == "MESHLET_POD_NAME");
    if pod_name.map(|e| &e["valueFrom"]["fieldRef"]["fieldPath"])
        != Some(&serde_json::json!("metadata.name"))
    {
        return Err(fail(
            "MESHLET_POD_NAME must come from the downward API (metadata.name): without it a \
             deleted DaemonSet leaves capture behind"
                .into(),
        ));
    }
    if containers[0]["lifecycle"]["preStop"].is_object() {
        return Err(fail(
            "no preStop hook: it would only eat into the drain deadline".into(),
        ));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vmtest_refuses_kernels_and_suites_it_does_not_know() {
        for bad in [
            &["xtask", "vmtest", "--kernel", "5.15"][..],
            &["xtask", "vmtest", "--kernel", "6"],
            &["xtask", "vmtest", "--suite", "everything"],
        ] {
            let err = Cli::try_parse_from(bad).expect_err("refused");
            assert_eq!(err.kind(), clap::error::ErrorKind::InvalidValue, "{bad:?}");
        }
        let Cli {
            command:
                Task::Vmtest {
                    kernel,
                    suite,
                    test_args,
                    ..
                },
        } = Cli::try_parse_from([
            "xtask", "vmtest", "--kernel", "all", "--suite", "e2e", "--", "a_test", "--exact",
        ])
        .expect("parsed")
        else {
            panic!("not vmtest");
        };
        assert_eq!((kernel, suite), (vmtest::Kernel::All, vmtest::Suite::E2e));
        assert_eq!(test_args, ["a_test", "--exact"]);
    }

    fn render(kustomization: &str) -> String {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let out = Command::new("kubectl")
            .args(["kustomize", kustomization])
            .current_dir(root)
            .output()
            .expect("kubectl (cargo xtask setup installs it)");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    #[test]
    fn the_manifests_deploy_the_ca_and_keep_keys_off_the_nodes() {
        for kustomization in ["deploy/base", "deploy/overlays/istio-ca"] {
            let rendered = render(kustomization);
            check_ca_layout(kustomization, &rendered).unwrap();
        }
        // A key mounted into the DaemonSet, as the old istio-ca overlay did, is caught.
        let rendered = render("deploy/base").replace(
            "      - configMap:\n          name: meshlet-ca-root",
            "      - secret:\n          secretName: cacerts\n        name: cacerts\n      - configMap:\n          name: meshlet-ca-root",
        );
        let err = check_ca_layout("deploy/base", &rendered).unwrap_err();
        assert!(err.to_string().contains("must not mount a Secret"), "{err}");
        let widened = render("deploy/base").replacen(
            "  - tokenreviews\n  verbs:\n  - create",
            "  - tokenreviews\n  verbs:\n  - create\n  - delete",
            1,
        );
        assert!(
            check_ca_layout("deploy/base", &widened).is_err(),
            "widened RBAC is caught"
        );
        let no_cni = render("deploy/base").replace("path: /etc/cni/net.d", "path: /etc/cni");
        let err = check_ca_layout("deploy/base", &no_cni).unwrap_err();
        assert!(err.to_string().contains("meshlet-cni"), "{err}");
    }

    #[test]
    fn the_crds_are_applied_on_their_own() {
        for kustomization in KUSTOMIZATIONS {
            check_crds(kustomization, &render(kustomization)).unwrap();
        }
        let crds = render(CRDS);
        let base = render("deploy/base");
        let err = check_crds("deploy/base", &format!("{base}---\n{crds}")).unwrap_err();
        assert!(err.to_string().contains("collide with Istio's"), "{err}");
        let err = check_crds(CRDS, &format!("{crds}---\n{base}")).unwrap_err();
        assert!(err.to_string().contains("CRDs only"), "{err}");
        assert!(check_crds(CRDS, "").is_err());
    }

    #[test]
    fn the_daemonset_rolls_agent_beside_agent_and_fails_closed() {
        for kustomization in ["deploy/base", "deploy/overlays/istio-ca"] {
            check_rollout(kustomization, &render(kustomization)).unwrap();
        }
        let base = render("deploy/base");
        let broken = [
            (
                base.replace("maxSurge: 1", "maxSurge: 0")
                    .replace("maxUnavailable: 0", "maxUnavailable: 1"),
                "maxSurge 1",
            ),
            (
                base.replace(
                    "        name: meshlet\n        readinessProbe:",
                    "        name: meshlet\n        ports:\n        - containerPort: 15020\n        readinessProbe:",
                ),
                "host ports",
            ),
            (
                base.replace("kubernetes.io/os: linux", "kubernetes.io/os: windows"),
                "Linux nodes",
            ),
            (
                base.replace(
                    "pod-security.kubernetes.io/enforce: privileged",
                    "pod-security.kubernetes.io/enforce: baseline",
                ),
                "privileged Pod Security",
            ),
            (
                base.replace("terminationGracePeriodSeconds: 30", "terminationGracePeriodSeconds: 60"),
                "terminationGracePeriodSeconds (60)",
            ),
            (
                base.replace(
                    "        - name: MESHLET_DRAIN_DEADLINE\n          value: 25s\n",
                    "        - name: MESHLET_DRAIN_DEADLINE\n          value: 25s\n        - name: MESHLET_FAIL_MODE\n          value: open\n",
                ),
                "fail closed",
            ),
            (
                base.replace("path: /healthz/live", "path: /healthz/ready"),
                "liveness probe",
            ),
            (
                base.replace("- preflight\n", "- version\n"),
                "meshlet preflight",
            ),
            (
                base.replacen("- SYS_RESOURCE\n", "", 1),
                "agent's securityContext",
            ),
            (
                base.replacen("value: /sys/fs/bpf/meshlet", "value: /sys/fs/bpf/other", 1),
                "must check what the agent uses",
            ),
            (
                base.replace("type: Unconfined", "type: RuntimeDefault"),
                "AppArmor Unconfined",
            ),
            (
                base.replace(
                    "        - name: MESHLET_DRAIN_DEADLINE\n",
                    "        - name: MESHLET_CGROUP_ROOT\n          value: /sys/fs/cgroup\n        - name: MESHLET_DRAIN_DEADLINE\n",
                ),
                "MESHLET_CGROUP_ROOT",
            ),
            (
                base.replace("fieldPath: metadata.name", "fieldPath: spec.nodeName"),
                "MESHLET_POD_NAME",
            ),
        ];
        for (rendered, want) in broken {
            assert_ne!(rendered, base, "the test's edit for {want:?} applied");
            let err = check_rollout("deploy/base", &rendered).unwrap_err();
            assert!(err.to_string().contains(want), "want {want:?}: {err}");
        }
    }
}
