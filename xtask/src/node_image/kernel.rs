//! The node's kernel: Debian's `linux-image-cloud-amd64`, downloaded with `apt-get download` and
//! unpacked with `dpkg-deb -x` into a scratch directory (never installed on the build host), and
//! the modules a node needs with everything they depend on, in load order.
//!
//! The package ships no `modules.dep` (its post-install script runs depmod), so dependencies
//! are read from each module's own `.modinfo` section (`depends=a,b`).

use std::{
    collections::{BTreeMap, HashSet},
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::cmd::{probe, run};

/// The metapackage that names the current cloud kernel.
const METAPACKAGE: &str = "linux-image-cloud-amd64";

/// Modules a node loads at boot: the NIC, the pod network (veth, bridge, VXLAN), container
/// roots (overlay), NAT and the tc hooks the service proxy uses.
pub const NODE_MODULES: &[&str] = &[
    "virtio_pci",
    "virtio_net",
    "veth",
    "bridge",
    "br_netfilter",
    "overlay",
    "vxlan",
    "nf_conntrack",
    "nf_nat",
    "sch_ingress",
    "cls_bpf",
];

/// An unpacked kernel package.
pub struct Kernel {
    /// The versioned package, e.g. `linux-image-6.1.0-56-cloud-amd64`.
    pub package: String,
    /// The kernel release, e.g. `6.1.0-56-cloud-amd64`.
    pub release: String,
    /// The unpacked package's root.
    pub root: PathBuf,
}

impl Kernel {
    /// The compressed kernel image.
    pub fn vmlinuz(&self) -> PathBuf {
        self.root
            .join("boot")
            .join(format!("vmlinuz-{}", self.release))
    }

    /// `lib/modules/<release>` inside the package.
    pub fn modules_dir(&self) -> PathBuf {
        self.root.join("lib/modules").join(&self.release)
    }
}

/// The versioned kernel package the metapackage depends on now.
fn current_package() -> Result<String> {
    let out = probe(Command::new("apt-cache").args(["depends", METAPACKAGE])).with_context(|| {
        format!("`apt-cache depends {METAPACKAGE}` failed: is this Debian with apt lists (apt-get update)?")
    })?;
    out.lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .map(str::trim)
        .find(|p| p.starts_with("linux-image-"))
        .map(str::to_owned)
        .with_context(|| format!("{METAPACKAGE} depends on no linux-image package:\n{out}"))
}

/// Downloads and unpacks the kernel under `scratch` unless it is there already.
///
/// # Errors
/// apt or dpkg-deb fails, or the package does not hold a kernel.
pub fn fetch(scratch: &Path) -> Result<Kernel> {
    let package = current_package()?;
    let dir = scratch.join(&package);
    let root = dir.join("root");
    let done = dir.join("unpacked");
    if done.is_file() {
        println!(
            "kernel package {package}: already unpacked in {}",
            dir.display()
        );
    } else {
        if dir.exists() {
            fs::remove_dir_all(&dir)?;
        }
        fs::create_dir_all(&dir)?;
        run(Command::new("apt-get")
            .args(["download", &package])
            .current_dir(&dir))?;
        let deb = fs::read_dir(&dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.extension().is_some_and(|x| x == "deb"))
            .with_context(|| format!("apt-get download left no .deb in {}", dir.display()))?;
        run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root))?;
        fs::remove_file(&deb)?;
        fs::write(&done, &package)?;
    }
    let release = package
        .strip_prefix("linux-image-")
        .unwrap_or(&package)
        .to_owned();
    let kernel = Kernel {
        package,
        release,
        root,
    };
    if !kernel.vmlinuz().is_file() || !kernel.modules_dir().is_dir() {
        bail!(
            "{} holds no {} or no {}",
            kernel.package,
            kernel.vmlinuz().display(),
            kernel.modules_dir().display()
        );
    }
    Ok(kernel)
}

/// The `depends=` of a module file's `.modinfo`.
fn depends(ko: &[u8]) -> Vec<String> {
    const KEY: &[u8] = b"\0depends=";
    let Some(at) = ko.windows(KEY.len()).position(|w| w == KEY) else {
        return Vec::new();
    };
    let rest = &ko[at + KEY.len()..];
    let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
    String::from_utf8_lossy(&rest[..end])
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Every module file under `dir` by module name (`-` and `_` are the same in module names).
fn module_files(dir: &Path, rel: &Path, out: &mut BTreeMap<String, PathBuf>) -> Result<()> {
    for e in fs::read_dir(dir.join(rel))? {
        let e = e?;
        let rel = rel.join(e.file_name());
        if e.file_type()?.is_dir() {
            module_files(dir, &rel, out)?;
        } else if let Some(stem) = e.file_name().to_str().and_then(|n| n.strip_suffix(".ko")) {
            out.insert(stem.replace('-', "_"), rel);
        }
    }
    Ok(())
}

/// The module files (relative to `lib/modules/<release>`) that load `wanted`, dependencies
/// first; modules built into the kernel are left out.
///
/// # Errors
/// A wanted module or a dependency is neither a module file nor built in.
pub fn closure(kernel: &Kernel, wanted: &[&str]) -> Result<Vec<PathBuf>> {
    let dir = kernel.modules_dir();
    let mut files = BTreeMap::new();
    module_files(&dir, Path::new(""), &mut files)?;
    let builtin: HashSet<String> = fs::read_to_string(dir.join("modules.builtin"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.rsplit('/').next()?.strip_suffix(".ko"))
        .map(|n| n.replace('-', "_"))
        .collect();
    let mut order = Vec::new();
    let mut seen = HashSet::new();
    for m in wanted {
        visit(&dir, &files, &builtin, m, &mut seen, &mut order)?;
    }
    Ok(order)
}

fn visit(
    dir: &Path,
    files: &BTreeMap<String, PathBuf>,
    builtin: &HashSet<String>,
    name: &str,
    seen: &mut HashSet<String>,
    order: &mut Vec<PathBuf>,
) -> Result<()> {
    let name = name.replace('-', "_");
    if !seen.insert(name.clone()) {
        return Ok(());
    }
    let Some(rel) = files.get(&name) else {
        if builtin.contains(&name) {
            return Ok(());
        }
        bail!("kernel module {name} is neither in lib/modules nor built in");
    };
    let bytes = fs::read(dir.join(rel)).with_context(|| format!("reading module {name}"))?;
    for dep in depends(&bytes) {
        visit(dir, files, builtin, &dep, seen, order)?;
    }
    order.push(rel.clone());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_depends_from_modinfo() {
        let ko = b"\x7fELF...\0license=GPL\0depends=llc,stp\0retpoline=Y\0";
        assert_eq!(depends(ko), ["llc", "stp"]);
        assert!(depends(b"\0depends=\0intree=Y\0").is_empty());
        assert!(depends(b"no modinfo").is_empty());
    }

    #[test]
    fn closure_orders_dependencies_first() {
        let tmp = std::env::temp_dir().join(format!("xtask-mods-{}", std::process::id()));
        let _ = fs::remove_dir_all(&tmp);
        let kernel = Kernel {
            package: "linux-image-x".into(),
            release: "x".into(),
            root: tmp.clone(),
        };
        let dir = kernel.modules_dir();
        fs::create_dir_all(dir.join("kernel/net")).unwrap();
        fs::write(dir.join("kernel/net/llc.ko"), b"\0depends=\0").unwrap();
        fs::write(dir.join("kernel/net/stp.ko"), b"\0depends=llc\0").unwrap();
        fs::write(dir.join("kernel/net/bridge.ko"), b"\0depends=llc,stp\0").unwrap();
        fs::write(
            dir.join("kernel/net/br_netfilter.ko"),
            b"\0depends=bridge\0",
        )
        .unwrap();
        fs::write(dir.join("modules.builtin"), "kernel/fs/overlay.ko\n").unwrap();
        let order = closure(&kernel, &["br_netfilter", "overlay", "bridge"]).unwrap();
        let names: Vec<_> = order
            .iter()
            .map(|p| p.file_name().unwrap().to_str().unwrap())
            .collect();
        assert_eq!(names, ["llc.ko", "stp.ko", "bridge.ko", "br_netfilter.ko"]);
        let err = closure(&kernel, &["nope"]).unwrap_err();
        assert!(err.to_string().contains("nope"), "{err}");
        fs::remove_dir_all(&tmp).unwrap();
    }
}
