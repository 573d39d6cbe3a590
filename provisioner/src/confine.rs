//! Opening files by client-supplied names, confined to a root directory: no `..`, no absolute
//! escapes, and no symlink that leads outside the root (checked on the opened descriptor, so
//! there is no check-then-open race). Shared by TFTP and the HTTP asset routes.

use std::fs::File;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Component, Path, PathBuf};

/// Why a name could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ConfineError {
    /// The name is not acceptable (`..`, NUL, empty).
    #[error("refused file name {0:?}")]
    BadName(String),
    /// The name resolves outside the root (through a symlink).
    #[error("{0:?} resolves outside the served root")]
    Escape(String),
    /// No such file.
    #[error("{0:?} not found")]
    NotFound(String),
    /// Not a regular file.
    #[error("{0:?} is not a regular file")]
    NotAFile(String),
    /// Any other I/O failure.
    #[error("opening {path}: {source}")]
    Io {
        /// The path opened.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// Turns a client-supplied name into a relative path: `\` counts as `/` (some PXE clients use
/// it), leading `/` and `.` components are dropped, `..` and NUL are refused.
///
/// # Errors
/// [`ConfineError::BadName`].
pub fn clean_name(name: &str) -> Result<PathBuf, ConfineError> {
    let bad = || ConfineError::BadName(name.to_string());
    if name.contains('\0') {
        return Err(bad());
    }
    let unified = name.replace('\\', "/");
    let mut out = PathBuf::new();
    for c in Path::new(&unified).components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir | Component::Prefix(_) => return Err(bad()),
        }
    }
    if out.as_os_str().is_empty() {
        return Err(bad());
    }
    Ok(out)
}

/// Opens `name` under `root` for reading and returns it with its size.
///
/// # Errors
/// [`ConfineError`]: a bad name, an escape through a symlink, a missing file, a directory or
/// special file, or another I/O error.
pub fn open(root: &Path, name: &str) -> Result<(File, u64), ConfineError> {
    let rel = clean_name(name)?;
    let root = root.canonicalize().map_err(|source| ConfineError::Io {
        path: root.to_path_buf(),
        source,
    })?;
    let path = root.join(&rel);
    let file = std::fs::OpenOptions::new()
        .read(true)
        // Never block on a FIFO, never take a controlling terminal.
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(&path)
        .map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound => ConfineError::NotFound(name.to_string()),
            _ => ConfineError::Io {
                path: path.clone(),
                source,
            },
        })?;
    verify_opened(&file, &root, name)?;
    let meta = file.metadata().map_err(|source| ConfineError::Io {
        path: path.clone(),
        source,
    })?;
    if !meta.is_file() {
        return Err(ConfineError::NotAFile(name.to_string()));
    }
    Ok((file, meta.len()))
}

/// Opens an explicitly configured file (not client-chosen; symlinks are followed).
///
/// # Errors
/// [`ConfineError::NotFound`], [`ConfineError::NotAFile`] or [`ConfineError::Io`].
pub fn open_configured(path: &Path) -> Result<(File, u64), ConfineError> {
    let shown = path.display().to_string();
    let file = File::open(path).map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => ConfineError::NotFound(shown.clone()),
        _ => ConfineError::Io {
            path: path.to_path_buf(),
            source,
        },
    })?;
    let meta = file.metadata().map_err(|source| ConfineError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    if !meta.is_file() {
        return Err(ConfineError::NotAFile(shown));
    }
    Ok((file, meta.len()))
}

fn verify_opened(file: &File, root: &Path, name: &str) -> Result<(), ConfineError> {
    use std::os::fd::AsRawFd as _;
    let link = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
    let real =
        std::fs::read_link(&link).map_err(|source| ConfineError::Io { path: link, source })?;
    if real.starts_with(root) {
        Ok(())
    } else {
        Err(ConfineError::Escape(name.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_cleaned_or_refused() {
        assert_eq!(clean_name("/a/./b").unwrap(), PathBuf::from("a/b"));
        assert_eq!(
            clean_name("\\boot\\x.efi").unwrap(),
            PathBuf::from("boot/x.efi")
        );
        for bad in [
            "",
            "/",
            "../etc/passwd",
            "a/../../b",
            "..\\..\\etc",
            "a\0b",
            "./",
        ] {
            assert!(
                matches!(clean_name(bad), Err(ConfineError::BadName(_))),
                "{bad:?} accepted"
            );
        }
    }

    #[test]
    fn opens_inside_and_refuses_escapes() {
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), b"s").unwrap();
        let root = tempfile::tempdir().unwrap();
        std::fs::write(root.path().join("ok.txt"), b"hello").unwrap();
        std::fs::create_dir(root.path().join("dir")).unwrap();
        std::os::unix::fs::symlink(outside.path().join("secret"), root.path().join("evil"))
            .unwrap();
        std::os::unix::fs::symlink(outside.path(), root.path().join("evildir")).unwrap();
        std::os::unix::fs::symlink("ok.txt", root.path().join("alias")).unwrap();
        let (_, len) = open(root.path(), "/ok.txt").unwrap();
        assert_eq!(len, 5);
        assert!(
            open(root.path(), "alias").is_ok(),
            "symlink inside the root"
        );
        assert!(matches!(
            open(root.path(), "evil"),
            Err(ConfineError::Escape(_))
        ));
        assert!(matches!(
            open(root.path(), "evildir/secret"),
            Err(ConfineError::Escape(_))
        ));
        assert!(matches!(
            open(root.path(), "../secret"),
            Err(ConfineError::BadName(_))
        ));
        assert!(matches!(
            open(root.path(), "dir"),
            Err(ConfineError::NotAFile(_))
        ));
        assert!(matches!(
            open(root.path(), "missing"),
            Err(ConfineError::NotFound(_))
        ));
    }
}
