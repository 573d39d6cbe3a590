//! The `keelson-agent node` command line of a booted node: the extra arguments the seed wrote
//! to `/etc/keelson/agent-args` (one line, split at white space; no shell quoting), plus the
//! node image's defaults for what the seed left out.

use std::path::Path;

use super::{Error, Result};

/// Where the seed's `write_files` put the node's extra arguments.
pub const AGENT_ARGS: &str = "/etc/keelson/agent-args";

/// Reads the extra arguments from `path`; a missing file means none. Blank lines and lines
/// starting with `#` are skipped, so the file may carry a comment.
///
/// # Errors
/// [`Error::Io`] when the file exists but cannot be read.
pub fn read(path: &Path) -> Result<Vec<String>> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(split(&text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(source) => Err(Error::Io {
            op: "reading",
            path: path.to_path_buf(),
            source,
        }),
    }
}

fn split(text: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .flat_map(str::split_whitespace)
        .map(str::to_owned)
        .collect()
}

/// Whether `args` already sets the long option `flag` (`--flag value` or `--flag=value`).
fn has(args: &[String], flag: &str) -> bool {
    args.iter().any(|a| {
        a == flag
            || a.strip_prefix(flag)
                .is_some_and(|rest| rest.starts_with('='))
    })
}

/// The value of the long option `flag` in `args`, if set.
pub fn value<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
    args.iter().enumerate().find_map(|(i, a)| {
        if a == flag {
            return args.get(i + 1).map(String::as_str);
        }
        a.strip_prefix(flag)?.strip_prefix('=')
    })
}

/// `args` followed by each `(flag, value)` default whose flag `args` does not set.
pub fn with_defaults(mut args: Vec<String>, defaults: &[(&str, String)]) -> Vec<String> {
    let missing: Vec<String> = defaults
        .iter()
        .filter(|(flag, _)| !has(&args, flag))
        .flat_map(|(flag, value)| [(*flag).to_owned(), value.clone()])
        .collect();
    args.extend(missing);
    args
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_the_line_and_skips_comments() {
        assert_eq!(
            split("# written by the provisioner\n--node-name n1  --kubeconfig /k\n\n"),
            ["--node-name", "n1", "--kubeconfig", "/k"]
        );
        assert!(split("").is_empty());
    }

    #[test]
    fn missing_file_is_no_arguments() {
        let dir = tempfile::tempdir().unwrap();
        assert!(read(&dir.path().join("agent-args")).unwrap().is_empty());
        std::fs::write(dir.path().join("agent-args"), "--node-name n1\n").unwrap();
        assert_eq!(
            read(&dir.path().join("agent-args")).unwrap(),
            ["--node-name", "n1"]
        );
    }

    #[test]
    fn defaults_only_fill_gaps() {
        let defaults = [
            ("--state-dir", "/var/lib/keelson".to_owned()),
            ("--cgroup2", "/sys/fs/cgroup/keelson".to_owned()),
        ];
        let args = with_defaults(
            vec![
                "--node-name".into(),
                "n1".into(),
                "--state-dir=/data".into(),
            ],
            &defaults,
        );
        assert_eq!(
            args,
            [
                "--node-name",
                "n1",
                "--state-dir=/data",
                "--cgroup2",
                "/sys/fs/cgroup/keelson"
            ]
        );
        assert_eq!(value(&args, "--state-dir"), Some("/data"));
        assert_eq!(value(&args, "--cgroup2"), Some("/sys/fs/cgroup/keelson"));
        assert_eq!(value(&args, "--kubeconfig"), None);
        // `--state-dirx` is another flag.
        assert!(!has(&["--state-dirx".into()], "--state-dir"));
    }
}
