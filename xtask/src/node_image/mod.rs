//! `cargo xtask node-image`: the image a worker network-boots — `<target>/node-image/vmlinuz`
//! (Debian's cloud kernel) and `initrd.img` (a gzip'd cpio initramfs that is the whole node:
//! busybox, the kernel modules a node needs, `keelson-agent` and `keelson-runtime` with their
//! shared libraries, a busybox OCI image to run pods without a registry, and an `/init` that
//! brings the machine up and runs `keelson-agent boot`).
//!
//! Idempotent and cached: the kernel package is downloaded once into `node-image/.work/`, and
//! the initramfs is rebuilt only when one of its inputs changed (`--force` rebuilds anyway).
//!
//! `server-user-data.yaml` beside the image is the other way to join: a documented
//! `#cloud-config` for installed Debian/Ubuntu servers that runs the agent under systemd.

mod cpio;
mod kernel;

use std::{
    collections::hash_map::DefaultHasher,
    fs,
    hash::{Hash as _, Hasher as _},
    os::unix::fs::{PermissionsExt as _, symlink},
    path::{Path, PathBuf},
    process::Command,
    time::UNIX_EPOCH,
};

use anyhow::{Context as _, Result, bail, ensure};

use crate::cmd::{cargo, probe, repo_root, run, step};

/// The `/init` of the initramfs.
const INIT: &str = include_str!("init.sh");
/// udhcpc's event script.
const UDHCPC_SCRIPT: &str = include_str!("udhcpc.sh");
/// The example user-data for installed servers.
const SERVER_USER_DATA: &str = include_str!("server-user-data.yaml");
/// The busybox image bundled in the node image, imported at boot.
pub const BUSYBOX_IMAGE: &str = "busybox:1.36";
/// Bumped when the layout of the image changes in a way the inputs do not show.
const FORMAT: u32 = 1;

/// Options of `cargo xtask node-image`.
#[derive(clap::Args, Default)]
pub struct NodeImageArgs {
    /// Rebuild the initramfs even if its inputs did not change.
    #[arg(long)]
    pub force: bool,
    /// Put the debug builds of the agent and runtime in the image instead of release builds
    /// (quicker to build, slower and larger to boot).
    #[arg(long)]
    pub debug: bool,
}

/// Cargo's target directory (`CARGO_TARGET_DIR` or `target/` at the repository root).
fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| repo_root().join("target"), PathBuf::from)
}

/// Where the image is written.
pub fn out_dir() -> PathBuf {
    target_dir().join("node-image")
}

/// Tools the build runs, with the Debian package of each.
const TOOLS: &[(&str, &str)] = &[
    ("apt-get", "apt"),
    ("apt-cache", "apt"),
    ("dpkg-deb", "dpkg"),
    ("gzip", "gzip"),
    ("ldd", "libc-bin"),
    ("strip", "binutils"),
    ("tar", "tar"),
    ("sha256sum", "coreutils"),
];

fn check_tools() -> Result<()> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let missing: Vec<String> = TOOLS
        .iter()
        .filter(|(tool, _)| !std::env::split_paths(&path).any(|d| d.join(tool).is_file()))
        .map(|(tool, pkg)| format!("`{tool}` (Debian package {pkg})"))
        .collect();
    ensure!(
        missing.is_empty(),
        "the node image needs {}: install them (cargo xtask setup installs the packages it knows)",
        missing.join(", ")
    );
    ensure!(
        Path::new(BUSYBOX).is_file(),
        "{BUSYBOX} is missing: apt-get install busybox-static (cargo xtask setup does)"
    );
    Ok(())
}

/// Debian's static busybox.
const BUSYBOX: &str = "/bin/busybox";

/// Builds the node image (or finds it up to date); returns its directory.
///
/// # Errors
/// A tool is missing or a step fails.
pub fn build(args: &NodeImageArgs) -> Result<PathBuf> {
    let out = out_dir();
    let work = out.join(".work");
    step("node image: tools");
    check_tools()?;
    println!("ok");

    step("node image: kernel (Debian's linux-image-cloud-amd64, unpacked, not installed)");
    let kernel = kernel::fetch(&work.join("kernel"))?;
    let modules = kernel::closure(&kernel, kernel::NODE_MODULES)?;
    println!(
        "kernel {}: {} module files for {}",
        kernel.release,
        modules.len(),
        kernel::NODE_MODULES.join(" ")
    );

    let profile = if args.debug { "debug" } else { "release" };
    step(&format!(
        "node image: keelson-agent and keelson-runtime ({profile})"
    ));
    let mut build = cargo();
    build.args([
        "build",
        "--bin",
        "keelson-agent",
        "--bin",
        "keelson-runtime",
    ]);
    if !args.debug {
        build.arg("--release");
    }
    run(&mut build)?;
    let release = target_dir().join(profile);
    let bins = [
        release.join("keelson-agent"),
        release.join("keelson-runtime"),
    ];

    let stamp = fingerprint(&kernel, &bins)?;
    let (vmlinuz, initrd) = (out.join("vmlinuz"), out.join("initrd.img"));
    let stamp_file = out.join(".stamp");
    if !args.force
        && vmlinuz.is_file()
        && initrd.is_file()
        && fs::read_to_string(&stamp_file).is_ok_and(|s| s == stamp)
    {
        step("node image: up to date");
        report(&out)?;
        return Ok(out);
    }

    step("node image: initramfs tree");
    let root = work.join("root");
    if root.exists() {
        fs::remove_dir_all(&root).with_context(|| format!("removing {}", root.display()))?;
    }
    stage(&root, &kernel, &modules, &bins)?;

    step("node image: cpio + gzip");
    let cpio_path = work.join("initrd.cpio");
    let file = fs::File::create(&cpio_path)?;
    cpio::write(
        &root,
        &[
            cpio::CharDevice {
                path: "dev/console",
                mode: 0o600,
                major: 5,
                minor: 1,
            },
            cpio::CharDevice {
                path: "dev/null",
                mode: 0o666,
                major: 1,
                minor: 3,
            },
        ],
        file,
    )?;
    run(Command::new("gzip")
        .args(["-n", "-f", "-6"])
        .arg(&cpio_path))?;
    fs::rename(work.join("initrd.cpio.gz"), &initrd)?;
    fs::copy(kernel.vmlinuz(), &vmlinuz)?;
    fs::write(out.join("server-user-data.yaml"), SERVER_USER_DATA)?;
    fs::write(&stamp_file, &stamp)?;
    report(&out)?;
    Ok(out)
}

fn report(out: &Path) -> Result<()> {
    for name in ["vmlinuz", "initrd.img", "server-user-data.yaml"] {
        let p = out.join(name);
        let len = fs::metadata(&p)
            .with_context(|| format!("{} is missing", p.display()))?
            .len();
        println!("{:>8.1} MiB  {}", len as f64 / 1048576.0, p.display());
    }
    Ok(())
}

/// A digest of everything the initramfs is made from.
fn fingerprint(kernel: &kernel::Kernel, bins: &[PathBuf]) -> Result<String> {
    let mut h = DefaultHasher::new();
    (
        FORMAT,
        &kernel.package,
        kernel::NODE_MODULES,
        INIT,
        UDHCPC_SCRIPT,
    )
        .hash(&mut h);
    (SERVER_USER_DATA, BUSYBOX_IMAGE).hash(&mut h);
    for p in bins
        .iter()
        .map(PathBuf::as_path)
        .chain([Path::new(BUSYBOX)])
    {
        let m = fs::metadata(p).with_context(|| format!("{} is missing", p.display()))?;
        let mtime = m.modified()?.duration_since(UNIX_EPOCH).unwrap_or_default();
        (p, m.len(), mtime.as_nanos()).hash(&mut h);
    }
    Ok(format!("{:016x} {}\n", h.finish(), kernel.package))
}

fn write_mode(path: &Path, text: &str, mode: u32) -> Result<()> {
    fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// Fills the initramfs tree at `root`.
fn stage(
    root: &Path,
    kernel: &kernel::Kernel,
    modules: &[PathBuf],
    bins: &[PathBuf],
) -> Result<()> {
    for dir in [
        "bin",
        "usr/bin",
        "etc/keelson",
        "proc",
        "sys",
        "dev",
        "run",
        "root",
        "var/lib/keelson",
        "usr/share/keelson/images",
    ] {
        fs::create_dir_all(root.join(dir))?;
    }
    fs::create_dir_all(root.join("tmp"))?;
    fs::set_permissions(root.join("tmp"), fs::Permissions::from_mode(0o1777))?;

    // busybox and every applet it has.
    fs::copy(BUSYBOX, root.join("bin/busybox"))?;
    let applets = probe(Command::new(BUSYBOX).arg("--list")).context("busybox --list")?;
    let mut linked = 0;
    for applet in applets.lines().map(str::trim) {
        if applet.is_empty() || applet == "busybox" || applet.contains('/') {
            continue;
        }
        symlink("busybox", root.join("bin").join(applet))?;
        linked += 1;
    }
    println!("busybox with {linked} applets");

    // The agent, the runtime (which the agent finds beside itself) and their libraries.
    let mut libs = std::collections::BTreeSet::new();
    for bin in bins {
        let name = bin.file_name().context("binary without a name")?;
        run(Command::new("strip")
            .arg("-o")
            .arg(root.join("usr/bin").join(name))
            .arg(bin))?;
        libs.extend(shared_libraries(bin)?);
    }
    for lib in &libs {
        let rel = lib.strip_prefix("/").unwrap_or(lib);
        let dst = root.join(rel);
        if let Some(dir) = dst.parent() {
            fs::create_dir_all(dir)?;
        }
        fs::copy(lib, &dst).with_context(|| format!("copying {}", lib.display()))?;
    }
    println!(
        "keelson-agent, keelson-runtime and {}",
        libs.iter()
            .map(|l| l.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );

    // Kernel modules in load order.
    let mut list = String::new();
    for rel in modules {
        let dst = Path::new("lib/modules").join(&kernel.release).join(rel);
        let full = root.join(&dst);
        if let Some(dir) = full.parent() {
            fs::create_dir_all(dir)?;
        }
        fs::copy(kernel.modules_dir().join(rel), &full)?;
        list.push('/');
        list.push_str(&dst.to_string_lossy());
        list.push('\n');
    }
    fs::write(root.join("etc/keelson/modules"), list)?;

    write_mode(&root.join("init"), INIT, 0o755)?;
    write_mode(&root.join("etc/keelson/udhcpc.sh"), UDHCPC_SCRIPT, 0o755)?;
    fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n")?;
    fs::write(root.join("etc/group"), "root:x:0:\n")?;
    fs::write(root.join("etc/hosts"), "127.0.0.1 localhost\n")?;
    fs::write(root.join("etc/resolv.conf"), "")?;

    let image = root.join("usr/share/keelson/images/busybox");
    crate::demo::image::busybox(&image, BUSYBOX_IMAGE)?;
    println!("image {BUSYBOX_IMAGE} (Debian's static busybox), imported at boot");
    Ok(())
}

/// The shared libraries `bin` loads, the dynamic loader included (`ldd`).
fn shared_libraries(bin: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(bin)
        .output()
        .with_context(|| format!("running ldd {}", bin.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        // A static binary needs nothing.
        if text.contains("not a dynamic executable") || text.contains("statically linked") {
            return Ok(Vec::new());
        }
        bail!("ldd {} failed: {text}", bin.display());
    }
    let mut libs = Vec::new();
    for line in text.lines() {
        if line.contains("not found") {
            bail!("{}: {}", bin.display(), line.trim());
        }
        // `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)` or `/lib64/ld-linux… (0x…)`.
        let path = match line.split_once("=>") {
            Some((_, right)) => right.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            libs.push(PathBuf::from(p));
        }
    }
    Ok(libs)
}
