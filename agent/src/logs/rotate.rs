//! Size-based rotation of a container's CRI log, as the kubelet's `containerLogMaxSize` and
//! `containerLogMaxFiles` do: when the next line would take the file over the limit, it is
//! renamed `<n>.log.<UTC timestamp>` and a fresh `<n>.log` started; only the newest
//! `max_files - 1` rotated files are kept. `kubectl logs` reads the current file.

use std::{
    fs::{self, File, OpenOptions},
    io::{self, Write as _},
    path::{Path, PathBuf},
};

/// Limits of one log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Rotate before the file would grow past this many bytes (0: never).
    pub max_size: u64,
    /// Files kept, the current one included (at least 1).
    pub max_files: usize,
}

impl Default for Limits {
    /// The kubelet's defaults: 10 MiB, 5 files.
    fn default() -> Self {
        Limits {
            max_size: 10 * 1024 * 1024,
            max_files: 5,
        }
    }
}

/// An append-only log file that rotates itself.
pub struct RotatingLog {
    path: PathBuf,
    file: File,
    size: u64,
    limits: Limits,
}

fn open(path: &Path) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

impl RotatingLog {
    /// Opens (or creates) the log at `path`, appending.
    ///
    /// # Errors
    /// The file cannot be opened.
    pub fn open(path: &Path, limits: Limits) -> io::Result<Self> {
        let file = open(path)?;
        let size = file.metadata()?.len();
        Ok(RotatingLog {
            path: path.to_owned(),
            file,
            size,
            limits,
        })
    }

    /// Appends one whole entry, rotating first if it would not fit.
    ///
    /// # Errors
    /// Writing, renaming or reopening fails.
    pub fn write_entry(&mut self, entry: &[u8]) -> io::Result<()> {
        if self.limits.max_size > 0
            && self.size > 0
            && self.size + entry.len() as u64 > self.limits.max_size
        {
            self.rotate()?;
        }
        self.file.write_all(entry)?;
        self.size += entry.len() as u64;
        Ok(())
    }

    fn rotate(&mut self) -> io::Result<()> {
        let stamp = jiff::Timestamp::now().strftime("%Y%m%d-%H%M%S%.6f");
        let mut rotated = self.path.as_os_str().to_owned();
        rotated.push(format!(".{stamp}"));
        fs::rename(&self.path, &rotated)?;
        self.file = open(&self.path)?;
        self.size = 0;
        self.prune();
        Ok(())
    }

    /// Removes the oldest rotated files beyond `max_files - 1`.
    fn prune(&self) {
        let (Some(dir), Some(name)) = (
            self.path.parent(),
            self.path.file_name().and_then(|n| n.to_str()),
        ) else {
            return;
        };
        let prefix = format!("{name}.");
        let mut rotated: Vec<PathBuf> = fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| {
                e.file_name()
                    .to_str()
                    .is_some_and(|n| n.starts_with(&prefix))
            })
            .map(|e| e.path())
            .collect();
        // The timestamps sort in time order.
        rotated.sort();
        let keep = self.limits.max_files.saturating_sub(1);
        let excess = rotated.len().saturating_sub(keep);
        for old in rotated.into_iter().take(excess) {
            let _ = fs::remove_file(old);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotates_before_the_limit_and_keeps_the_newest_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("0.log");
        let limits = Limits {
            max_size: 100,
            max_files: 3,
        };
        let mut log = RotatingLog::open(&path, limits).unwrap();
        for i in 0..50 {
            log.write_entry(format!("line {i:04} ........\n").as_bytes())
                .unwrap();
        }
        let files: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(files.len(), 3, "{files:?}");
        let current = fs::read_to_string(&path).unwrap();
        assert!(current.len() <= 100, "{current}");
        assert!(current.ends_with("line 0049 ........\n"), "{current}");
        assert!(!current.contains("line 0000"));
        // An entry larger than the limit still goes in, alone.
        log.write_entry(&[b'x'; 300]).unwrap();
        assert_eq!(fs::metadata(&path).unwrap().len(), 300);
    }
}
