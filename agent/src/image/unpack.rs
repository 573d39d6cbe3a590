//! Unpacking a layer archive (tar, optionally gzip-compressed) into a directory usable as an
//! overlayfs lower layer: OCI whiteouts become overlayfs whiteouts (0/0 character devices) and
//! opaque directories get the `trusted.overlay.opaque` attribute.

use std::ffi::CString;
use std::fs::{self, File};
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use nix::sys::stat::{Mode, SFlag, makedev, mknod};

use super::{ImageError, Result};

const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE: &str = ".wh..wh..opq";

/// Unpacks `blob` into `target` (created).
///
/// # Errors
/// [`ImageError::Io`] for unreadable archives or entries that cannot be written;
/// [`ImageError::Format`] for entries escaping the target.
pub(crate) fn unpack_layer(blob: &Path, target: &Path) -> Result<()> {
    fs::create_dir_all(target).map_err(|e| ImageError::io("create", target, e))?;
    let mut file = File::open(blob).map_err(|e| ImageError::io("open", blob, e))?;
    let mut magic = [0u8; 2];
    let gz = file.read_exact(&mut magic).is_ok() && magic == [0x1f, 0x8b];
    file.seek(SeekFrom::Start(0))
        .map_err(|e| ImageError::io("seek", blob, e))?;
    let reader: Box<dyn Read> = if gz {
        Box::new(flate2::read::GzDecoder::new(BufReader::new(file)))
    } else {
        Box::new(BufReader::new(file))
    };
    let mut archive = tar::Archive::new(reader);
    archive.set_preserve_permissions(true);
    archive.set_preserve_ownerships(true);
    archive.set_preserve_mtime(true);
    archive.set_overwrite(true);
    let entries = archive
        .entries()
        .map_err(|e| ImageError::io("read archive", blob, e))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| ImageError::io("read archive entry", blob, e))?;
        let path = entry
            .path()
            .map_err(|e| ImageError::io("read entry path", blob, e))?
            .into_owned();
        let rel = confined(&path)?;
        let Some(name) = rel.file_name().and_then(|n| n.to_str()) else {
            entry
                .unpack_in(target)
                .map_err(|e| ImageError::io("unpack", target.join(&rel), e))?;
            continue;
        };
        if name == OPAQUE {
            let dir = target.join(rel.parent().unwrap_or(Path::new("")));
            fs::create_dir_all(&dir).map_err(|e| ImageError::io("create", &dir, e))?;
            set_opaque(&dir)?;
        } else if let Some(hidden) = name.strip_prefix(WHITEOUT_PREFIX) {
            let parent = target.join(rel.parent().unwrap_or(Path::new("")));
            fs::create_dir_all(&parent).map_err(|e| ImageError::io("create", &parent, e))?;
            let node = parent.join(hidden);
            let _ = fs::remove_file(&node);
            mknod(&node, SFlag::S_IFCHR, Mode::empty(), makedev(0, 0))
                .map_err(|e| ImageError::io("mknod whiteout", &node, e.into()))?;
        } else {
            entry
                .unpack_in(target)
                .map_err(|e| ImageError::io("unpack", target.join(&rel), e))?;
        }
    }
    Ok(())
}

/// The entry path made relative, refusing `..` components.
fn confined(path: &Path) -> Result<PathBuf> {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::CurDir | Component::RootDir => {}
            _ => {
                return Err(ImageError::Format(format!(
                    "layer entry {} escapes the layer",
                    path.display()
                )));
            }
        }
    }
    Ok(out)
}

fn set_opaque(dir: &Path) -> Result<()> {
    let path = CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| ImageError::Format(format!("bad path {}", dir.display())))?;
    // SAFETY: both strings are NUL-terminated and outlive the call.
    let rc = unsafe {
        libc::lsetxattr(
            path.as_ptr(),
            c"trusted.overlay.opaque".as_ptr(),
            b"y".as_ptr().cast(),
            1,
            0,
        )
    };
    if rc != 0 {
        return Err(ImageError::io(
            "set opaque attribute on",
            dir,
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_cannot_escape() {
        assert!(confined(Path::new("../x")).is_err());
        assert_eq!(
            confined(Path::new("./a/b")).expect("ok"),
            PathBuf::from("a/b")
        );
    }
}
