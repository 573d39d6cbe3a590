//! A busybox test image built in Rust: one gzip layer holding Debian's static `/bin/busybox`
//! and its applet links, written as an OCI image layout (`oci-layout`, `index.json`,
//! `blobs/sha256/…`) that `keelson-agent image import` reads.

use std::{
    fs,
    io::Write as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, ensure};
use serde_json::json;
use sha2::{Digest as _, Sha256};

/// Where Debian's `busybox-static` puts the binary.
pub const BUSYBOX: &str = "/bin/busybox";

/// Applets linked into `/bin` of the image.
const APPLETS: &[&str] = &[
    "sh", "ash", "cat", "echo", "env", "false", "hostname", "httpd", "id", "kill", "ls", "mkdir",
    "nc", "ps", "rm", "sleep", "test", "touch", "true", "wget", "seq", "head", "dd", "yes",
];

fn sha256(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn dir_entry(b: &mut tar::Builder<Vec<u8>>, path: &str, mode: u32) -> Result<()> {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Directory);
    h.set_mode(mode);
    h.set_size(0);
    h.set_mtime(0);
    h.set_uid(0);
    h.set_gid(0);
    b.append_data(&mut h, path, std::io::empty())?;
    Ok(())
}

fn file_entry(b: &mut tar::Builder<Vec<u8>>, path: &str, mode: u32, data: &[u8]) -> Result<()> {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_mode(mode);
    h.set_size(data.len() as u64);
    h.set_mtime(0);
    h.set_uid(0);
    h.set_gid(0);
    b.append_data(&mut h, path, data)?;
    Ok(())
}

/// The layer's tar (uncompressed).
fn layer_tar() -> Result<Vec<u8>> {
    let busybox = fs::read(BUSYBOX)
        .with_context(|| format!("reading {BUSYBOX} (apt-get install busybox-static)"))?;
    let mut b = tar::Builder::new(Vec::new());
    for (dir, mode) in [
        ("bin", 0o755),
        ("etc", 0o755),
        ("tmp", 0o1777),
        ("proc", 0o555),
        ("sys", 0o555),
        ("dev", 0o755),
        ("root", 0o700),
        ("www", 0o755),
    ] {
        dir_entry(&mut b, dir, mode)?;
    }
    file_entry(&mut b, "bin/busybox", 0o755, &busybox)?;
    for applet in APPLETS {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_mode(0o777);
        h.set_size(0);
        h.set_mtime(0);
        h.set_uid(0);
        h.set_gid(0);
        b.append_link(&mut h, format!("bin/{applet}"), "busybox")?;
    }
    file_entry(
        &mut b,
        "etc/passwd",
        0o644,
        b"root:x:0:0:root:/root:/bin/sh\n",
    )?;
    file_entry(&mut b, "etc/group", 0o644, b"root:x:0:\n")?;
    Ok(b.into_inner()?)
}

/// Writes an OCI image layout of the busybox image named `name` (e.g.
/// `keelson.test/busybox:1`) into `dir`; returns `dir`.
///
/// # Errors
/// busybox is missing, or a file cannot be written.
pub fn busybox_layout(dir: &Path, name: &str) -> Result<PathBuf> {
    let blobs = dir.join("blobs/sha256");
    fs::create_dir_all(&blobs)?;
    let put = |bytes: &[u8]| -> Result<(String, usize)> {
        let digest = sha256(bytes);
        fs::write(blobs.join(&digest), bytes)?;
        Ok((format!("sha256:{digest}"), bytes.len()))
    };
    let tar = layer_tar()?;
    let diff_id = format!("sha256:{}", sha256(&tar));
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar)?;
    let (layer, layer_size) = put(&gz.finish()?)?;
    let config = json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "Cmd": ["sh"],
            "WorkingDir": "/",
        },
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
    });
    let (config, config_size) = put(&serde_json::to_vec(&config)?)?;
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": config, "size": config_size},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": layer, "size": layer_size}],
    });
    let (manifest, manifest_size) = put(&serde_json::to_vec(&manifest)?)?;
    let index = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                       "digest": manifest, "size": manifest_size,
                       "annotations": {"org.opencontainers.image.ref.name": name}}],
    });
    fs::write(dir.join("index.json"), serde_json::to_vec(&index)?)?;
    fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    ensure!(dir.join("index.json").is_file(), "layout not written");
    Ok(dir.to_owned())
}
