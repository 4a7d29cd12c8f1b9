//! The container image `cargo xtask image` builds (`cargo xtask test` builds it before these
//! tests): its OCI archive unpacked into a bundle, as a container runtime would, and run with
//! crun. The image is `FROM scratch`, so the binaries running at all shows they are static.
//! `cargo test` alone does not build the image: this test fails, saying so, when there is none.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use serde_json::Value;

/// The newest image archive of this version under `target/image/` (any profile).
fn archive() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/image");
    let prefix = format!("meshlet-{}", env!("CARGO_PKG_VERSION"));
    let newest = std::fs::read_dir(&dir)
        .ok()
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            let name = p.file_name().unwrap_or_default().to_string_lossy();
            name.starts_with(&prefix) && name.ends_with(".oci.tar")
        })
        .max_by_key(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok());
    newest.unwrap_or_else(|| {
        panic!(
            "no image archive in {}: build it with `cargo xtask image` (`cargo xtask test` does)",
            dir.display()
        )
    })
}

/// A scratch directory, removed on drop.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn run(command: &mut Command) -> String {
    let out = command.output().expect("start");
    assert!(
        out.status.success(),
        "{command:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn json(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).expect("read")).expect("JSON")
}

fn blob(oci: &Path, digest: &Value) -> PathBuf {
    let digest = digest.as_str().expect("digest");
    let hex = digest.strip_prefix("sha256:").expect("a sha256 digest");
    oci.join("blobs/sha256").join(hex)
}

#[test]
fn the_image_holds_the_static_agent_and_runs_it_with_crun() {
    let archive = archive();
    let scratch =
        Scratch(std::env::temp_dir().join(format!("meshlet-image-{}", std::process::id())));
    let (oci, bundle) = (scratch.0.join("oci"), scratch.0.join("bundle"));
    let rootfs = bundle.join("rootfs");
    for dir in [&oci, &rootfs] {
        std::fs::create_dir_all(dir).unwrap();
    }
    run(Command::new("tar")
        .arg("-xf")
        .arg(&archive)
        .arg("-C")
        .arg(&oci));

    // The OCI layout: index -> manifest -> config and layers.
    let index = json(&oci.join("index.json"));
    let manifest = json(&blob(&oci, &index["manifests"][0]["digest"]));
    let config = json(&blob(&oci, &manifest["config"]["digest"]));
    assert_eq!(config["architecture"], "amd64", "{config}");
    assert_eq!(
        config["config"]["Entrypoint"],
        serde_json::json!(["/usr/local/bin/meshlet"]),
        "{config}"
    );
    assert_eq!(
        config["config"]["Cmd"],
        serde_json::json!(["agent", "--source", "kube"]),
        "{config}"
    );
    let layers = manifest["layers"].as_array().expect("layers");
    assert_eq!(layers.len(), 1, "FROM scratch plus one layer: {manifest}");
    run(Command::new("tar")
        .arg("-xf")
        .arg(blob(&oci, &layers[0]["digest"]))
        .arg("-C")
        .arg(&rootfs));
    let mut files: Vec<String> = run(Command::new("find")
        .arg(".")
        .args(["-type", "f"])
        .current_dir(&rootfs))
    .lines()
    .map(str::to_owned)
    .collect();
    files.sort();
    assert_eq!(
        files,
        ["./usr/local/bin/meshlet", "./usr/local/bin/meshlet-cni"],
        "nothing but the two binaries"
    );

    // A container of it, with crun: its own namespaces (network included), read-only root.
    // No cgroup mount or namespace (see below).
    run(Command::new("crun").args(["spec"]).current_dir(&bundle));
    let spec_path = bundle.join("config.json");
    let mut spec = json(&spec_path);
    spec["root"] = serde_json::json!({"path": "rootfs", "readonly": true});
    spec["process"]["terminal"] = Value::Bool(false);
    let keep = |list: &Value, drop: &dyn Fn(&Value) -> bool| {
        Value::Array(
            list.as_array()
                .expect("a list")
                .iter()
                .filter(|v| !drop(v))
                .cloned()
                .collect(),
        )
    };
    spec["mounts"] = keep(&spec["mounts"], &|m| m["type"] == "cgroup");
    spec["linux"]["namespaces"] = keep(&spec["linux"]["namespaces"], &|n| n["type"] == "cgroup");
    spec["linux"]
        .as_object_mut()
        .expect("linux")
        .remove("resources");
    let state = scratch.0.join("state");
    let container = |argv: &[&str], env: &[&str]| {
        let mut spec = spec.clone();
        spec["process"]["args"] = serde_json::json!(argv);
        if let Some(vars) = spec["process"]["env"].as_array_mut() {
            vars.extend(env.iter().map(|v| Value::from(*v)));
        }
        std::fs::write(&spec_path, serde_json::to_vec_pretty(&spec).unwrap()).unwrap();
        let id = format!("meshlet-image-test-{}", std::process::id());
        // No cgroup of its own (`--cgroup-manager=disabled`), and crun started in a mount
        // namespace of its own where /sys/fs/cgroup is the unified hierarchy: these machines
        // mount cgroup v1 and v2 side by side (hybrid), which crun refuses. Nothing of the
        // machine's mounts changes.
        run(Command::new("unshare")
            .args(["--mount", "--propagation", "private", "--", "sh", "-c"])
            .arg(r#"mount -t cgroup2 none /sys/fs/cgroup && exec crun "$@""#)
            .arg("crun")
            .arg("--root")
            .arg(&state)
            .arg("--cgroup-manager=disabled")
            .args(["run", "--bundle"])
            .arg(&bundle)
            .arg(id))
    };
    const AGENT: &str = "/usr/local/bin/meshlet";
    let version = container(&[AGENT, "version"], &[]);
    let expected = format!("meshlet {} (eBPF object ", env!("CARGO_PKG_VERSION"));
    assert!(version.starts_with(&expected), "{version}");
    let help = container(&[AGENT, "agent", "--help"], &[]);
    assert!(
        help.contains("--node-name") && help.contains("--istio-labels"),
        "{help}"
    );
    // The plugin runs too (it is static as well), as a runtime calls it.
    let cni = container(&["/usr/local/bin/meshlet-cni"], &["CNI_COMMAND=VERSION"]);
    let versions: Value = serde_json::from_str(&cni).unwrap_or_else(|err| panic!("{err}: {cni}"));
    assert!(versions["supportedVersions"].is_array(), "{versions}");
}
