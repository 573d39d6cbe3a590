//! Builds the kernel-side programs (`ebpf/programs`) for `bpfel-unknown-none` with the nightly
//! toolchain and places the object in `OUT_DIR`, where `lb::loader` embeds it.
//!
//! Needs the nightly toolchain with `rust-src` and `bpf-linker` on `PATH`: `cargo xtask setup`
//! installs both.

use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    let programs = aya_build::Package {
        name: "keelson-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../ebpf/programs"),
        ..Default::default()
    };
    aya_build::build_ebpf([programs], aya_build::Toolchain::default()).context(
        "building the eBPF programs failed; `cargo xtask setup` installs the nightly \
         toolchain's rust-src and bpf-linker that this needs",
    )
}
