//! `cargo xtask image`: the agent's container image, built without Docker.
//!
//! The binaries (`meshlet`, and `meshlet-cni`, which the agent copies onto the node) are built
//! statically for `x86_64-unknown-linux-musl`, with Debian's `musl-gcc` for the C parts, and put
//! `FROM scratch` by Debian's `buildah`: the image holds the two files and nothing else. It is
//! written as an OCI archive (`target/image/meshlet-<version>.oci.tar`) and, with `--push`,
//! pushed to a registry. buildah keeps its storage under `target/image/`, with the `vfs`
//! driver: nothing of the machine's own container storage is touched.
//!
//! `deploy/Dockerfile` runs the same `cargo build` for people who have Docker, so both give the
//! same binary.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

/// The target the image's binaries are built for.
pub const TARGET: &str = "x86_64-unknown-linux-musl";
/// The image's name in buildah's storage and in the archive.
const NAME: &str = "localhost/meshlet";
/// Where the agent lives in the image.
const AGENT: &str = "/usr/local/bin/meshlet";

/// The archive `build` writes for `profile`.
pub fn archive_path(profile: &str) -> PathBuf {
    let name = match profile {
        "release" => format!("meshlet-{}.oci.tar", version()),
        other => format!("meshlet-{}-{other}.oci.tar", version()),
    };
    Path::new("target/image").join(name)
}

fn version() -> &'static str {
    env!("CARGO_PKG_VERSION")
}

/// Builds the binaries with `profile` (`release`, or `dev` for the tests) and the image, writes
/// the archive, and pushes it to `push` (`registry/name:tag`) if given. Returns the archive.
pub fn build(profile: &str, push: Option<&str>) -> anyhow::Result<PathBuf> {
    let mut cargo = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cargo
        .args(["build", "--locked", "--package", "meshlet", "--bins"])
        .args(["--target", TARGET, "--profile", profile])
        .env(format!("CC_{}", TARGET.replace('-', "_")), "musl-gcc");
    crate::run(&mut cargo)?;
    let out =
        Path::new("target")
            .join(TARGET)
            .join(if profile == "dev" { "debug" } else { profile });

    let work = Path::new("target/image");
    let staging = work.join("rootfs");
    if staging.exists() {
        std::fs::remove_dir_all(&staging)?;
    }
    std::fs::create_dir_all(&staging)?;
    let mut size = 0;
    for binary in ["meshlet", "meshlet-cni"] {
        let to = staging.join(binary);
        std::fs::copy(out.join(binary), &to)
            .with_context(|| format!("copy {}", out.join(binary).display()))?;
        if binary == "meshlet-cni" {
            // The agent copies the plugin onto every node: without line tables it is under 1 MB.
            crate::run(Command::new("strip").arg(&to))?;
        } else {
            // The agent keeps its line tables for backtraces, compressed (a third of the size).
            crate::run(
                Command::new("objcopy")
                    .arg("--compress-debug-sections=zlib")
                    .arg(&to),
            )?;
        }
        size += std::fs::metadata(&to)?.len();
    }

    let reference = format!("{NAME}:{}", version());
    let container = format!("meshlet-image-{}", std::process::id());
    buildah(work, &["from", "--name", &container, "scratch"])?;
    let built = (|| {
        for binary in ["meshlet", "meshlet-cni"] {
            let from = staging.join(binary);
            let from = from.to_str().context("a UTF-8 path")?;
            buildah(
                work,
                &[
                    "copy",
                    "--chmod",
                    "0755",
                    &container,
                    from,
                    &format!("/usr/local/bin/{binary}"),
                ],
            )?;
        }
        buildah(
            work,
            &[
                "config",
                "--entrypoint",
                &format!("[\"{AGENT}\"]"),
                "--cmd",
                "agent --source kube",
                "--label",
                &format!("org.opencontainers.image.version={}", version()),
                "--label",
                "org.opencontainers.image.title=meshlet",
                &container,
            ],
        )?;
        buildah(work, &["commit", "--quiet", &container, &reference])
    })();
    let _ = buildah(work, &["rm", &container]);
    built?;

    let archive = archive_path(profile);
    if archive.exists() {
        std::fs::remove_file(&archive)?;
    }
    let to = format!("oci-archive:{}:{reference}", archive.display());
    buildah(work, &["push", "--quiet", &reference, &to])?;
    if let Some(destination) = push {
        buildah(
            work,
            &["push", &reference, &format!("docker://{destination}")],
        )?;
        println!("image: pushed {reference} to {destination}");
    }
    println!(
        "image: {reference}, {} MB of binaries, written to {} ({} MB)",
        size / 1_000_000,
        archive.display(),
        std::fs::metadata(&archive)?.len() / 1_000_000
    );
    Ok(archive)
}

/// Runs buildah with its storage under `work` (vfs: no overlay mounts, no machine state).
fn buildah(work: &Path, args: &[&str]) -> anyhow::Result<()> {
    let root = std::fs::canonicalize(work)?;
    let mut command = Command::new("buildah");
    command
        .arg("--root")
        .arg(root.join("storage"))
        .arg("--runroot")
        .arg(root.join("run"))
        .args(["--storage-driver", "vfs"])
        .args(args);
    let status = command
        .status()
        .context("run buildah (cargo xtask setup installs it)")?;
    if !status.success() {
        bail!("buildah {} failed: {status}", args.join(" "));
    }
    Ok(())
}
