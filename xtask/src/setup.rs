//! `cargo xtask setup`: everything Keelson needs on a fresh machine of this kind, installed
//! idempotently (quick when already done), then a check of the kernel features it relies on.

use std::{fs, path::Path, process::Command};

use anyhow::{Context as _, Result, bail};

use crate::cmd::{probe, run, step};

/// Debian packages, with the reason each is needed.
const APT_PACKAGES: &[(&str, &str)] = &[
    (
        "llvm-22-dev",
        "bpf-linker links the eBPF programs against LLVM 22",
    ),
    ("libpolly-22-dev", "bpf-linker (LLVM 22)"),
    ("libzstd-dev", "bpf-linker (LLVM 22)"),
    ("zlib1g-dev", "bpf-linker (LLVM 22)"),
    (
        "iproute2",
        "tests and the demo make network namespaces and links",
    ),
    (
        "util-linux",
        "unshare/nsenter for kernel checks and the demo",
    ),
    ("busybox-static", "test images and the demo's sample app"),
    (
        "nftables",
        "the agent's NAT table (egress masquerade, hostPorts) is written with nft",
    ),
    (
        "runc",
        "the runtime's command line is checked against runc's",
    ),
    ("crun", "`cargo xtask bench runtime` compares with crun"),
    (
        "containerd",
        "a test drives keelson-runtime through containerd's runc shim",
    ),
    (
        "iptables",
        "`cargo xtask bench dataplane` compares with kube-proxy's iptables layout",
    ),
    (
        "ipvsadm",
        "`cargo xtask bench dataplane` compares with IPVS (where the kernel has it)",
    ),
    ("curl", "provisioner tests fetch over HTTP and TFTP"),
    (
        "isc-dhcp-client",
        "provisioner tests get leases with dhclient",
    ),
    ("tftp-hpa", "provisioner tests download with tftp"),
    ("ipxe", "the iPXE binaries the provisioner serves"),
    (
        "cloud-init",
        "`cloud-init schema` checks the generated user-data",
    ),
    (
        "qemu-system-x86",
        "provisioner tests PXE-boot virtual machines",
    ),
    ("ipxe-qemu", "the virtual NICs' iPXE boot ROMs"),
    ("ovmf", "UEFI firmware for the UEFI PXE test"),
    (
        "binutils",
        "`node-image` strips the agent and runtime it puts in the initramfs",
    ),
    ("etcd-server", "`bench store` compares the store with etcd"),
    (
        "protobuf-compiler",
        "the etcd client of `bench store` compiles etcd's protobuf files",
    ),
    (
        "libprotobuf-dev",
        "protobuf's well-known types, imported by etcd's protobuf files",
    ),
    (
        "docker-registry",
        "the agent's image tests pull from a local registry",
    ),
    ("skopeo", "the agent's image tests push test images to it"),
    (
        "apache2-utils",
        "htpasswd for the agent's registry-authentication test",
    ),
];

/// The bpf-linker release that builds with the LLVM above.
const BPF_LINKER_VERSION: &str = "0.13.0";
/// LLVM major version of the nightly toolchain installed here and of bpf-linker's feature.
const LLVM_MAJOR: &str = "22";

/// Runs the whole setup.
///
/// # Errors
/// An installation step fails or a kernel feature is missing.
pub fn all() -> Result<()> {
    apt_packages()?;
    nightly_rust_src()?;
    bpf_linker()?;
    kernel_features()
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn apt_packages() -> Result<()> {
    step("Debian packages");
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .map(|(name, _)| *name)
        .filter(|name| {
            probe(Command::new("dpkg-query").args(["-W", "-f=${db:Status-Status}", name]))
                .is_none_or(|status| status.trim() != "installed")
        })
        .collect();
    if missing.is_empty() {
        println!("all {} packages present", APT_PACKAGES.len());
        return Ok(());
    }
    for name in &missing {
        let why = APT_PACKAGES
            .iter()
            .find(|(n, _)| n == name)
            .map_or("", |(_, why)| *why);
        println!("missing {name}: {why}");
    }
    if !is_root() {
        bail!(
            "installing {} needs root: run `sudo cargo xtask setup`",
            missing.join(" ")
        );
    }
    run(Command::new("apt-get")
        .arg("update")
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

fn nightly_rust_src() -> Result<()> {
    step("nightly toolchain with rust-src (builds the eBPF programs)");
    let installed = probe(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))
    .context(
        "no nightly toolchain: the eBPF programs need one (`rustup toolchain install nightly \
         --component rust-src`)",
    )?;
    if !installed.lines().any(|l| l.starts_with("rust-src")) {
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    } else {
        println!("rust-src present");
    }
    let version = probe(Command::new("rustc").args(["+nightly", "-vV"])).unwrap_or_default();
    let llvm = version
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .unwrap_or("unknown");
    if llvm.split('.').next() != Some(LLVM_MAJOR) {
        bail!(
            "nightly rustc uses LLVM {llvm}, but bpf-linker is built against LLVM {LLVM_MAJOR}: \
             its LLVM must be at least rustc's; update LLVM_MAJOR and the llvm-NN packages in \
             xtask/src/setup.rs"
        );
    }
    println!("nightly LLVM {llvm}");
    Ok(())
}

fn bpf_linker() -> Result<()> {
    step(&format!(
        "bpf-linker {BPF_LINKER_VERSION} (links the eBPF programs)"
    ));
    if probe(Command::new("bpf-linker").arg("--version"))
        .is_some_and(|v| v.contains(BPF_LINKER_VERSION))
    {
        println!("bpf-linker {BPF_LINKER_VERSION} present");
        return Ok(());
    }
    let prefix = format!("/usr/lib/llvm-{LLVM_MAJOR}");
    let path = format!("{prefix}/bin:{}", std::env::var("PATH").unwrap_or_default());
    run(Command::new("cargo")
        .args([
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--no-default-features",
            "--features",
            &format!("llvm-{LLVM_MAJOR}"),
        ])
        .env("LLVM_PREFIX", &prefix)
        .env("PATH", path))
}

/// One kernel capability and how to tell whether this machine has it.
struct Check {
    name: &'static str,
    ok: bool,
    hint: &'static str,
}

fn kernel_features() -> Result<()> {
    step("kernel features");
    let filesystems = fs::read_to_string("/proc/filesystems").unwrap_or_default();
    let has_fs = |fs: &str| {
        filesystems
            .lines()
            .any(|l| l.split_whitespace().last() == Some(fs))
    };
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let checks = [
        Check {
            name: "running as root",
            ok: is_root(),
            hint: "tests and the demo need root (BPF, namespaces, cgroups, mounts)",
        },
        Check {
            name: "bpf() syscall",
            ok: bpf_syscall_works(),
            hint: "kernel without CONFIG_BPF_SYSCALL, or BPF denied to this process",
        },
        Check {
            name: "BTF (/sys/kernel/btf/vmlinux)",
            ok: Path::new("/sys/kernel/btf/vmlinux").exists(),
            hint: "kernel built without CONFIG_DEBUG_INFO_BTF",
        },
        Check {
            name: "bpffs",
            ok: has_fs("bpf"),
            hint: "kernel without bpffs",
        },
        Check {
            name: "cgroup2 mounted",
            ok: mountinfo.lines().any(|l| {
                l.split_once(" - ")
                    .is_some_and(|(_, r)| r.starts_with("cgroup2 "))
            }),
            hint: "mount a cgroup2 hierarchy (/sys/fs/cgroup or /sys/fs/cgroup/unified)",
        },
        Check {
            name: "network namespaces",
            ok: probe(Command::new("unshare").args(["--net", "true"])).is_some(),
            hint: "kernel without CONFIG_NET_NS, or unshare(1) missing",
        },
        Check {
            name: "overlayfs",
            ok: has_fs("overlay") || probe(Command::new("modprobe").arg("overlay")).is_some(),
            hint: "kernel without overlayfs (module `overlay`)",
        },
    ];
    let mut missing = Vec::new();
    for c in &checks {
        println!("{} {}", if c.ok { "ok     " } else { "MISSING" }, c.name);
        if !c.ok {
            missing.push(format!("{}: {}", c.name, c.hint));
        }
    }
    if !missing.is_empty() {
        bail!(
            "this machine lacks what Keelson needs:\n  {}",
            missing.join("\n  ")
        );
    }
    Ok(())
}

/// Creates (and closes) a one-entry array map: proof that this process may use BPF.
fn bpf_syscall_works() -> bool {
    #[repr(C)]
    #[derive(Default)]
    struct MapCreate {
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
        map_flags: u32,
    }
    const BPF_MAP_CREATE: libc::c_long = 0;
    const BPF_MAP_TYPE_ARRAY: u32 = 2;
    // The kernel reads a `union bpf_attr`; zero-padded to its size, as it requires.
    let mut attr = [0u8; 128];
    let create = MapCreate {
        map_type: BPF_MAP_TYPE_ARRAY,
        key_size: 4,
        value_size: 4,
        max_entries: 1,
        ..Default::default()
    };
    // SAFETY: `MapCreate` is plain integers and fits in `attr`.
    unsafe {
        std::ptr::copy_nonoverlapping(
            (&raw const create).cast::<u8>(),
            attr.as_mut_ptr(),
            std::mem::size_of::<MapCreate>(),
        );
    }
    // SAFETY: bpf(BPF_MAP_CREATE) with a valid, fully initialised attribute buffer.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_CREATE,
            attr.as_ptr(),
            attr.len() as libc::c_uint,
        )
    };
    if fd < 0 {
        return false;
    }
    // SAFETY: `fd` is a descriptor we own.
    unsafe { libc::close(fd as libc::c_int) };
    true
}
