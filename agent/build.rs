//! Builds the eBPF programs in `../ebpf` (nightly, `bpfel-unknown-none`, `bpf-linker`) and
//! leaves the object in `OUT_DIR/meshlet.bpf.o`, which `capture` embeds with `include_bytes!`.
//!
//! `ebpf/` is its own workspace with its own `rust-toolchain.toml` (nightly), so the nested cargo
//! runs in that directory, under `rustup run nightly`, with the toolchain variables of this
//! (stable) build removed. Its target directory is shared by every profile of the outer
//! build (`target/ebpf`), so `check`, `clippy`, `build` and `test` build the programs once.
//! `cargo xtask setup` installs what this needs.
//!
//! It also generates the tonic client and server of Istio's certificate service
//! (`istio.v1.auth.IstioCertificateService`, see `proto/istio/v1/auth/ca.proto`) from a Rust
//! description with `tonic_build::manual`, so the build needs no `protoc`; the messages are
//! prost types in `src/proto.rs`.

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

fn main() {
    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let workspace = manifest_dir
        .parent()
        .expect("agent/ lives in the workspace root");
    let ebpf_dir = workspace.join("ebpf");
    let target_dir = env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace.join("target"))
        .join("ebpf");
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    generate_ca_service();

    for watched in [
        "ebpf/src",
        "ebpf/Cargo.toml",
        "ebpf/Cargo.lock",
        "ebpf/rust-toolchain.toml",
        "ebpf/.cargo/config.toml",
        "common/src",
        "common/Cargo.toml",
    ] {
        println!(
            "cargo:rerun-if-changed={}",
            workspace.join(watched).display()
        );
    }

    // `rustup run` names the toolchain explicitly: a `cargo` found on PATH may be the stable
    // toolchain's own binary rather than rustup's proxy.
    let mut cargo = Command::new("rustup");
    cargo
        .current_dir(&ebpf_dir)
        .args([
            "run",
            "nightly",
            "cargo",
            "build",
            "--release",
            "--locked",
            "--target-dir",
        ])
        .arg(&target_dir);
    // The outer build's toolchain and flags must not leak into the nightly BPF build.
    for var in [
        "RUSTUP_TOOLCHAIN",
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTDOC",
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_BUILD_TARGET",
        "CARGO_TARGET_DIR",
        "CARGO_MAKEFLAGS",
        "CARGO",
    ] {
        cargo.env_remove(var);
    }
    let status = cargo.status().unwrap_or_else(|err| {
        panic!("cannot run cargo to build the eBPF programs ({err}); run `cargo xtask setup`")
    });
    if !status.success() {
        panic!(
            "building the eBPF programs in {} failed ({status}); `cargo xtask setup` installs \
             the nightly toolchain, rust-src and bpf-linker they need",
            ebpf_dir.display()
        );
    }
    let object = target_dir.join("bpfel-unknown-none/release/meshlet");
    copy(&object, &out_dir.join("meshlet.bpf.o"));
}

fn copy(from: &Path, to: &Path) {
    std::fs::copy(from, to)
        .unwrap_or_else(|err| panic!("copy {} -> {}: {err}", from.display(), to.display()));
}

/// Generates `istio.v1.auth.IstioCertificateService.rs` in `OUT_DIR`: Istio's `IstioCertificateService` with its one
/// method, `CreateCertificate`, over the prost codec.
fn generate_ca_service() {
    let method = tonic_build::manual::Method::builder()
        .name("create_certificate")
        .route_name("CreateCertificate")
        .input_type("crate::proto::IstioCertificateRequest")
        .output_type("crate::proto::IstioCertificateResponse")
        .codec_path("tonic_prost::ProstCodec")
        .build();
    let service = tonic_build::manual::Service::builder()
        .name("IstioCertificateService")
        .package("istio.v1.auth")
        .method(method)
        .build();
    tonic_build::manual::Builder::new().compile(&[service]);
}
