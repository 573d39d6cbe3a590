//! What a container attempt looks like on disk, and the pod status built from it.

use std::path::Path;

use serde_json::{Value, json};

use super::layout::{ExitRecord, process_alive, read_json};
use super::supervisor::{EXIT_FILE, PID_FILE, STARTED_FILE};

/// The state of one attempt, read from its directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttemptState {
    /// The supervisor is setting the container up.
    Starting,
    /// The container's process runs since this time.
    Running(String),
    /// It ended.
    Exited(ExitRecord),
    /// The supervisor is gone without a record (killed): the attempt is lost.
    Lost,
}

/// Reads the state of the attempt in `dir`.
pub fn attempt_state(dir: &Path) -> AttemptState {
    if let Some(rec) = read_json::<ExitRecord>(&dir.join(EXIT_FILE)) {
        return AttemptState::Exited(rec);
    }
    let alive = read_json::<(u32, u64)>(&dir.join(PID_FILE))
        .is_some_and(|(pid, start)| process_alive(pid as i32, start));
    if !alive {
        // The supervisor records the exit before it ends: it may have done both between the
        // first read and the liveness check.
        return match read_json::<ExitRecord>(&dir.join(EXIT_FILE)) {
            Some(rec) => AttemptState::Exited(rec),
            None => AttemptState::Lost,
        };
    }
    match std::fs::read_to_string(dir.join(STARTED_FILE)) {
        Ok(t) => AttemptState::Running(t.trim().to_owned()),
        Err(_) => AttemptState::Starting,
    }
}

/// A `terminated` container state.
pub fn terminated(rec: &ExitRecord, container_id: &str) -> Value {
    let mut t = json!({
        "exitCode": rec.exit_code,
        "reason": rec.reason,
        "finishedAt": rfc3339_seconds(&rec.finished_at),
        "containerID": format!("keelson://{container_id}"),
    });
    if let Some(s) = &rec.started_at {
        t["startedAt"] = json!(rfc3339_seconds(s));
    }
    if !rec.message.is_empty() {
        t["message"] = json!(rec.message);
    }
    json!({"terminated": t})
}

/// Kubernetes' `Time` has second precision: drop the fraction.
pub fn rfc3339_seconds(t: &str) -> String {
    t.parse::<jiff::Timestamp>()
        .map(|ts| ts.strftime("%Y-%m-%dT%H:%M:%SZ").to_string())
        .unwrap_or_else(|_| t.to_owned())
}

/// A pod condition, keeping `since` as its transition time.
pub fn condition(kind: &str, on: bool, since: &str) -> Value {
    json!({
        "type": kind,
        "status": if on { "True" } else { "False" },
        "lastTransitionTime": since,
        "lastProbeTime": null,
    })
}
