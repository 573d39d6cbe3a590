//! A cpio archive in the "newc" format the kernel unpacks as an initramfs, written from a
//! staging directory (owned by root, mtime 0, sorted: the same tree gives the same bytes) plus
//! device nodes that the staging directory cannot hold without `mknod` on the build host.

use std::{
    fs,
    io::{self, Write},
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    path::Path,
};

use anyhow::{Context as _, Result, bail};

const S_IFMT: u32 = 0o170_000;
const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFCHR: u32 = 0o020_000;

/// A character device to add to the archive.
pub struct CharDevice {
    /// Path inside the archive, without a leading `/`.
    pub path: &'static str,
    /// Permission bits.
    pub mode: u32,
    /// Device major number.
    pub major: u32,
    /// Device minor number.
    pub minor: u32,
}

/// Writes the newc archive of `root` and `devices` to `out`.
///
/// # Errors
/// A file cannot be read, or is of a type an initramfs cannot hold.
pub fn write(root: &Path, devices: &[CharDevice], out: impl Write) -> Result<()> {
    let mut w = Writer {
        out: io::BufWriter::new(out),
        ino: 0,
    };
    w.tree(root, "")?;
    for d in devices {
        w.entry(d.path, S_IFCHR | d.mode, (d.major, d.minor), &[])?;
    }
    w.entry("TRAILER!!!", 0, (0, 0), &[])?;
    w.out.flush()?;
    Ok(())
}

struct Writer<W: Write> {
    out: W,
    ino: u32,
}

impl<W: Write> Writer<W> {
    fn tree(&mut self, dir: &Path, prefix: &str) -> Result<()> {
        let mut entries: Vec<_> = fs::read_dir(dir)
            .with_context(|| format!("listing {}", dir.display()))?
            .collect::<io::Result<_>>()?;
        entries.sort_by_key(fs::DirEntry::file_name);
        for e in entries {
            let name = e.file_name();
            let name = name
                .to_str()
                .with_context(|| format!("{} is not UTF-8", e.path().display()))?;
            let rel = if prefix.is_empty() {
                name.to_owned()
            } else {
                format!("{prefix}/{name}")
            };
            let path = e.path();
            let meta = fs::symlink_metadata(&path)?;
            let perm = meta.permissions().mode() & 0o7777;
            let ft = meta.file_type();
            if ft.is_dir() {
                self.entry(&rel, S_IFDIR | perm, (0, 0), &[])?;
                self.tree(&path, &rel)?;
            } else if ft.is_symlink() {
                let target = fs::read_link(&path)?;
                let target = target.to_str().context("symlink target is not UTF-8")?;
                self.entry(&rel, S_IFLNK | 0o777, (0, 0), target.as_bytes())?;
            } else if ft.is_file() {
                let data =
                    fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
                debug_assert_eq!(data.len() as u64, meta.size());
                self.entry(&rel, S_IFREG | perm, (0, 0), &data)?;
            } else {
                bail!(
                    "{} is neither a file, a directory nor a symlink",
                    path.display()
                );
            }
        }
        Ok(())
    }

    /// One header, name and data, each padded to four bytes.
    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) -> Result<()> {
        self.ino += 1;
        let namesize = name.len() + 1;
        let filesize = u32::try_from(data.len()).context("file too large for cpio newc")?;
        let nlink = if mode & S_IFMT == S_IFDIR { 2 } else { 1 };
        let header = format!(
            "070701{:08x}{mode:08x}{:08x}{:08x}{nlink:08x}{:08x}{filesize:08x}{:08x}{:08x}{:08x}{:08x}{namesize:08x}{:08x}",
            self.ino, 0, 0, 0, 0, 0, rdev.0, rdev.1, 0
        );
        self.out.write_all(header.as_bytes())?;
        self.out.write_all(name.as_bytes())?;
        self.out.write_all(&[0])?;
        self.pad(header.len() + namesize)?;
        self.out.write_all(data)?;
        self.pad(data.len())?;
        Ok(())
    }

    fn pad(&mut self, len: usize) -> Result<()> {
        let n = (4 - len % 4) % 4;
        self.out.write_all(&[0; 3][..n])?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newc_layout() {
        let dir = std::env::temp_dir().join(format!("xtask-cpio-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("bin")).unwrap();
        fs::write(dir.join("bin/hello"), b"hi\n").unwrap();
        std::os::unix::fs::symlink("hello", dir.join("bin/hi")).unwrap();
        let mut out = Vec::new();
        let dev = [CharDevice {
            path: "dev/console",
            mode: 0o600,
            major: 5,
            minor: 1,
        }];
        write(&dir, &dev, &mut out).unwrap();
        fs::remove_dir_all(&dir).unwrap();
        let text = String::from_utf8_lossy(&out);
        // Entries in order, each header 4-byte aligned.
        let names: Vec<usize> = [
            "bin\0",
            "bin/hello\0",
            "bin/hi\0",
            "dev/console\0",
            "TRAILER!!!\0",
        ]
        .iter()
        .map(|n| text.find(n).unwrap_or_else(|| panic!("{n} missing")))
        .collect();
        assert!(names.windows(2).all(|w| w[0] < w[1]));
        for n in &names {
            assert_eq!((n - 110) % 4, 0);
            assert_eq!(&text[n - 110..n - 104], "070701");
        }
        // The console is char 5:1.
        let h = &text[names[3] - 110..names[3]];
        assert_eq!(&h[14..22], "00002180"); // S_IFCHR | 0600
        assert_eq!(&h[78..86], "00000005");
        assert_eq!(&h[86..94], "00000001");
        assert_eq!(out.len() % 4, 0);
    }
}
