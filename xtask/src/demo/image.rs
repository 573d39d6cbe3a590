//! The demo's container image: Debian's static busybox as a one-layer OCI image layout, made
//! with `tar`, `gzip` and `sha256sum` so that the demo needs no registry (and xtask no extra
//! crates). `keelson-agent image import` reads the layout.

use std::{fs, os::unix::fs::symlink, path::Path, process::Command};

use anyhow::{Context as _, Result};

use crate::cmd::run;

/// Where Debian's `busybox-static` puts the binary.
const BUSYBOX: &str = "/bin/busybox";

/// Applets linked in `/bin`.
const APPLETS: &[&str] = &[
    "sh", "cat", "echo", "env", "hostname", "httpd", "id", "kill", "ls", "mkdir", "ps", "sleep",
    "wget", "date", "uname",
];

fn sha256(path: &Path) -> Result<String> {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .context("running sha256sum")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let hex = text.split_whitespace().next().unwrap_or_default();
    anyhow::ensure!(hex.len() == 64, "sha256sum {}: {text}", path.display());
    Ok(hex.to_owned())
}

/// Writes `bytes` as a blob of the layout; its digest and size.
fn blob(layout: &Path, bytes: &[u8]) -> Result<(String, usize)> {
    let tmp = layout.join("blob.tmp");
    fs::write(&tmp, bytes)?;
    let hex = sha256(&tmp)?;
    fs::rename(&tmp, layout.join("blobs/sha256").join(&hex))?;
    Ok((format!("sha256:{hex}"), bytes.len()))
}

/// Builds the layout in `layout` (emptied first), naming the image `name`.
///
/// # Errors
/// busybox is missing, or a tool fails.
pub fn busybox(layout: &Path, name: &str) -> Result<()> {
    anyhow::ensure!(
        Path::new(BUSYBOX).is_file(),
        "{BUSYBOX} is missing: apt-get install busybox-static (cargo xtask setup does)"
    );
    if layout.exists() {
        fs::remove_dir_all(layout)?;
    }
    let rootfs = layout.join("rootfs");
    for dir in ["bin", "etc", "tmp", "proc", "sys", "dev", "root"] {
        fs::create_dir_all(rootfs.join(dir))?;
    }
    fs::copy(BUSYBOX, rootfs.join("bin/busybox"))?;
    for applet in APPLETS {
        symlink("busybox", rootfs.join("bin").join(applet))?;
    }
    fs::write(rootfs.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n")?;
    fs::write(rootfs.join("etc/group"), "root:x:0:\n")?;
    run(Command::new("chmod").arg("1777").arg(rootfs.join("tmp")))?;
    let tar = layout.join("layer.tar");
    run(Command::new("tar")
        .args([
            "--numeric-owner",
            "--owner=0",
            "--group=0",
            "--sort=name",
            "-C",
        ])
        .arg(&rootfs)
        .arg("-cf")
        .arg(&tar)
        .arg("."))?;
    let diff_id = format!("sha256:{}", sha256(&tar)?);
    run(Command::new("gzip").args(["-n", "-f"]).arg(&tar))?;
    let gz = layout.join("layer.tar.gz");
    let layer_hex = sha256(&gz)?;
    let layer_size = fs::metadata(&gz)?.len();
    fs::create_dir_all(layout.join("blobs/sha256"))?;
    fs::rename(&gz, layout.join("blobs/sha256").join(&layer_hex))?;
    fs::remove_dir_all(&rootfs)?;

    let config = format!(
        r#"{{"architecture":"amd64","os":"linux","config":{{"Env":["PATH=/bin"],"Cmd":["sh"]}},"rootfs":{{"type":"layers","diff_ids":["{diff_id}"]}}}}"#
    );
    let (config_digest, config_size) = blob(layout, config.as_bytes())?;
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config_digest}","size":{config_size}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:{layer_hex}","size":{layer_size}}}]}}"#
    );
    let (manifest_digest, manifest_size) = blob(layout, manifest.as_bytes())?;
    fs::write(
        layout.join("index.json"),
        format!(
            r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{manifest_digest}","size":{manifest_size},"annotations":{{"io.containerd.image.name":"{name}"}}}}]}}"#
        ),
    )?;
    fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )?;
    Ok(())
}
