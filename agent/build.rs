//! Builds the kernel-side programs (`ebpf/programs`) for `bpfel-unknown-none` with the nightly
//! toolchain and `-Z build-std=core`, and leaves the object at `$OUT_DIR/keelson-ebpf`, where
//! `lb::loader` embeds it into the agent.
//!
//! Needs the nightly toolchain with `rust-src` and `bpf-linker` on `PATH`; `cargo xtask setup`
//! installs both.
//!
//! This does what `aya-build` does, written out because `aya-build` forwards every line of the
//! nested build as a `cargo:warning`, which cargo then replays on every build of the workspace;
//! here the nested output is shown only when it fails.

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

fn main() {
    if let Err(e) = build() {
        eprintln!("{e}");
        std::process::exit(1);
    }
}

fn var(name: &str) -> Result<String, String> {
    env::var(name).map_err(|_| format!("{name} is not set"))
}

fn build() -> Result<(), String> {
    let manifest_dir = PathBuf::from(var("CARGO_MANIFEST_DIR")?);
    let workspace = manifest_dir
        .parent()
        .ok_or("agent crate has no parent directory")?;
    for dir in ["ebpf/programs", "ebpf/common"] {
        println!("cargo:rerun-if-changed={}", workspace.join(dir).display());
    }
    let out_dir = PathBuf::from(var("OUT_DIR")?);
    let target = match var("CARGO_CFG_TARGET_ENDIAN")?.as_str() {
        "big" => "bpfeb-unknown-none",
        _ => "bpfel-unknown-none",
    };
    let arch = var("CARGO_CFG_TARGET_ARCH")?;
    let target_dir = out_dir.join("ebpf-target");

    let mut cmd = Command::new("rustup");
    cmd.current_dir(workspace)
        .args([
            "run",
            "nightly",
            "cargo",
            "build",
            "--package",
            "keelson-ebpf",
        ])
        .args([
            "--bins",
            "--release",
            "--target",
            target,
            "-Z",
            "build-std=core",
        ])
        .arg("--target-dir")
        .arg(&target_dir)
        // Tells aya-ebpf which architecture's context layouts to use; BTF for the loader.
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            format!("--cfg=bpf_target_arch=\"{arch}\"\x1f-Cdebuginfo=2\x1f-Clink-arg=--btf"),
        )
        // The outer build's compiler settings must not leak into the nightly build.
        .env_remove("RUSTC")
        .env_remove("RUSTC_WRAPPER")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("RUSTFLAGS");
    let out = cmd.output().map_err(|e| {
        format!("cannot run rustup to build the eBPF programs ({e}); run `cargo xtask setup`")
    })?;
    if !out.status.success() {
        return Err(format!(
            "building the eBPF programs failed ({}); `cargo xtask setup` installs the nightly \
             rust-src and bpf-linker this needs.\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    copy(
        &target_dir.join(target).join("release/keelson-ebpf"),
        &out_dir.join("keelson-ebpf"),
    )
}

fn copy(from: &Path, to: &Path) -> Result<(), String> {
    std::fs::copy(from, to)
        .map(drop)
        .map_err(|e| format!("copying {} to {}: {e}", from.display(), to.display()))
}
