//! OCI lifecycle hooks: programs the spec's `hooks` names, run with the
//! container's state JSON on stdin. `prestart`/`createRuntime` run in the
//! runtime's namespaces once the init is set up (after its `pivot_root`:
//! runc runs them just before it), `createContainer` in the container's
//! namespaces before `pivot_root` and `startContainer` in the container
//! right before the user process; `poststart` and `poststop` in the runtime
//! after `start` and `delete`, where failures are only logged.

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use oci_spec::runtime::Hook;

use crate::state::OciState;

/// A hook that failed.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    /// The hook could not be started or fed.
    #[error("hook {path}: {source}")]
    Spawn {
        /// The hook's program.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The hook exited unsuccessfully.
    #[error("hook {path} failed: {status}")]
    Failed {
        /// The hook's program.
        path: PathBuf,
        /// How it ended.
        status: std::process::ExitStatus,
    },
    /// The hook ran past its `timeout`.
    #[error("hook {path} timed out after {seconds} s")]
    Timeout {
        /// The hook's program.
        path: PathBuf,
        /// The timeout.
        seconds: i64,
    },
}

/// Runs `hooks` in order, each with `state` as JSON on its stdin, and stops
/// at the first failure.
///
/// # Errors
/// [`HookError`] for the first hook that cannot start, fails or times out.
pub fn run(hooks: &[Hook], state: &OciState) -> Result<(), HookError> {
    let json = serde_json::to_vec(state).unwrap_or_default();
    for hook in hooks {
        run_one(hook, &json)?;
    }
    Ok(())
}

fn run_one(hook: &Hook, state: &[u8]) -> Result<(), HookError> {
    let path = hook.path().clone();
    let spawn_err = |source| HookError::Spawn {
        path: path.clone(),
        source,
    };
    let mut command = Command::new(&path);
    if let Some((argv0, rest)) = hook.args().as_deref().and_then(<[String]>::split_first) {
        command.arg0(argv0).args(rest);
    }
    command.env_clear();
    for entry in hook.env().iter().flatten() {
        if let Some((k, v)) = entry.split_once('=') {
            command.env(k, v);
        }
    }
    let mut child = command.stdin(Stdio::piped()).spawn().map_err(spawn_err)?;
    if let Some(mut stdin) = child.stdin.take() {
        // A hook that does not read its stdin is fine.
        let _ = stdin.write_all(state);
    }
    let deadline = hook
        .timeout()
        .filter(|t| *t > 0)
        .map(|t| (t, Instant::now() + Duration::from_secs(t as u64)));
    loop {
        if let Some(status) = child.try_wait().map_err(spawn_err)? {
            return if status.success() {
                Ok(())
            } else {
                Err(HookError::Failed { path, status })
            };
        }
        if let Some((seconds, at)) = deadline
            && Instant::now() >= at
        {
            let _ = child.kill();
            let _ = child.wait();
            return Err(HookError::Timeout { path, seconds });
        }
        thread::sleep(Duration::from_millis(5));
    }
}
