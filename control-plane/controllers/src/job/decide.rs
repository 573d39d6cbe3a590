//! What a Job needs next, decided from its spec and pods without I/O: how many pods to
//! start or stop, and whether it has completed or failed (backoff limit, deadline).

use k8s_openapi::api::{batch::v1::JobSpec, core::v1::Pod};

use crate::util;

/// A Job's pods, counted.
#[derive(Debug, Default)]
pub(crate) struct Pods<'a> {
    /// Neither finished nor being deleted.
    pub active: Vec<&'a Pod>,
    /// Active and `Ready`.
    pub ready: usize,
    /// Being deleted and not finished.
    pub terminating: usize,
    pub succeeded: usize,
    pub failed: usize,
    /// Container restarts of active pods (what counts against the backoff limit under
    /// `restartPolicy: OnFailure`).
    pub restarts: usize,
}

impl<'a> Pods<'a> {
    /// Counts `pods` (the Job's own).
    pub fn count(pods: impl IntoIterator<Item = &'a Pod>) -> Self {
        let mut c = Pods::default();
        for p in pods {
            match p.status.as_ref().and_then(|s| s.phase.as_deref()) {
                Some("Succeeded") => c.succeeded += 1,
                Some("Failed") => c.failed += 1,
                _ if util::terminating(p) => c.terminating += 1,
                _ => {
                    c.active.push(p);
                    if util::pod_ready(p) {
                        c.ready += 1;
                    }
                    let restarts: i32 = p
                        .status
                        .as_ref()
                        .into_iter()
                        .flat_map(|s| {
                            s.container_statuses
                                .iter()
                                .flatten()
                                .chain(s.init_container_statuses.iter().flatten())
                        })
                        .map(|s| s.restart_count.max(0))
                        .sum();
                    c.restarts += usize::try_from(restarts).unwrap_or(0);
                }
            }
        }
        c
    }
}

/// Why a Job failed: the condition reason and message Kubernetes writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Failure {
    BackoffLimit,
    Deadline,
}

impl Failure {
    pub fn reason(self) -> &'static str {
        match self {
            Failure::BackoffLimit => "BackoffLimitExceeded",
            Failure::Deadline => "DeadlineExceeded",
        }
    }

    pub fn message(self) -> &'static str {
        match self {
            Failure::BackoffLimit => "Job has reached the specified backoff limit",
            Failure::Deadline => "Job was active longer than specified deadline",
        }
    }
}

/// The next step for a Job that has not finished yet.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Step {
    /// Start this many pods (when the failure back-off allows).
    Create(usize),
    /// Stop this many active pods.
    Delete(usize),
    /// Nothing to start or stop.
    Wait,
    /// Enough pods succeeded: stop the rest, then it is complete.
    Succeeded,
    /// Stop every active pod, then it has failed.
    Failed(Failure),
}

/// `spec.backoffLimit` (default 6).
pub(crate) fn backoff_limit(spec: &JobSpec) -> usize {
    usize::try_from(spec.backoff_limit.unwrap_or(6)).unwrap_or(0)
}

/// Decides the next step; `active_for` is how long the Job has been started.
pub(crate) fn decide(spec: &JobSpec, pods: &Pods<'_>, active_for: std::time::Duration) -> Step {
    let limit = backoff_limit(spec);
    let on_failure = spec
        .template
        .spec
        .as_ref()
        .and_then(|s| s.restart_policy.as_deref())
        == Some("OnFailure");
    let past_restarts = on_failure
        && if limit == 0 {
            pods.restarts > 0
        } else {
            pods.restarts >= limit
        };
    if pods.failed > limit || past_restarts {
        return Step::Failed(Failure::BackoffLimit);
    }
    if let Some(d) = spec.active_deadline_seconds
        && active_for.as_secs_f64() >= d.max(0) as f64
    {
        return Step::Failed(Failure::Deadline);
    }
    let parallelism = usize::try_from(spec.parallelism.unwrap_or(1)).unwrap_or(0);
    let active = pods.active.len();
    let want = match spec.completions {
        Some(c) => {
            let c = usize::try_from(c).unwrap_or(0);
            if pods.succeeded >= c {
                return Step::Succeeded;
            }
            (c - pods.succeeded).min(parallelism)
        }
        // A work queue: done when one pod succeeded and the rest have finished.
        None if pods.succeeded > 0 => {
            if active == 0 && pods.terminating == 0 {
                return Step::Succeeded;
            }
            active.min(parallelism)
        }
        None => parallelism,
    };
    match active.cmp(&want) {
        std::cmp::Ordering::Less => Step::Create(want - active),
        std::cmp::Ordering::Greater => Step::Delete(active - want),
        std::cmp::Ordering::Equal => Step::Wait,
    }
}

/// How long to wait before starting a pod after `failures` failures: 10 s doubled per
/// failure up to 6 min in Kubernetes (`initial` and `max` here).
pub(crate) fn failure_backoff(
    failures: usize,
    initial: std::time::Duration,
    max: std::time::Duration,
) -> std::time::Duration {
    if failures == 0 {
        return std::time::Duration::ZERO;
    }
    let shift = u32::try_from(failures - 1).unwrap_or(u32::MAX).min(20);
    initial.saturating_mul(1 << shift).min(max)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::time::Duration;

    fn spec(v: serde_json::Value) -> JobSpec {
        let mut v = v;
        v["template"] = json!({"spec": {"containers": [], "restartPolicy": v.get("rp").cloned().unwrap_or(json!("Never"))}});
        if let Some(o) = v.as_object_mut() {
            o.remove("rp");
        }
        serde_json::from_value(v).expect("spec")
    }

    fn pod(phase: &str, restarts: i32) -> Pod {
        serde_json::from_value(json!({"status": {"phase": phase,
            "containerStatuses": [{"name": "c", "image": "i", "imageID": "", "ready": false,
                "restartCount": restarts}]}}))
        .expect("pod")
    }

    #[test]
    fn completions_and_parallelism_bound_the_active_pods() {
        let s = spec(json!({"completions": 5, "parallelism": 2}));
        let none = Pods::default();
        assert_eq!(decide(&s, &none, Duration::ZERO), Step::Create(2));
        let (ok, run) = (pod("Succeeded", 0), pod("Running", 0));
        let four = Pods::count([&ok, &ok, &ok, &ok, &run, &run]);
        assert_eq!(decide(&s, &four, Duration::ZERO), Step::Delete(1));
        let five = Pods::count([&ok, &ok, &ok, &ok, &ok]);
        assert_eq!(decide(&s, &five, Duration::ZERO), Step::Succeeded);
        // Work queue (no completions): one success ends it once the others finish.
        let q = spec(json!({"parallelism": 3}));
        assert_eq!(decide(&q, &none, Duration::ZERO), Step::Create(3));
        assert_eq!(
            decide(&q, &Pods::count([&ok, &run]), Duration::ZERO),
            Step::Wait
        );
        assert_eq!(
            decide(&q, &Pods::count([&ok, &ok]), Duration::ZERO),
            Step::Succeeded
        );
    }

    #[test]
    fn failures_past_the_backoff_limit_and_the_deadline_fail_it() {
        let s = spec(json!({"completions": 1, "backoffLimit": 2}));
        let bad = pod("Failed", 0);
        assert_eq!(
            decide(&s, &Pods::count([&bad, &bad]), Duration::ZERO),
            Step::Create(1)
        );
        assert_eq!(
            decide(&s, &Pods::count([&bad, &bad, &bad]), Duration::ZERO),
            Step::Failed(Failure::BackoffLimit)
        );
        let restarting = pod("Running", 2);
        let on_failure = spec(json!({"backoffLimit": 2, "rp": "OnFailure"}));
        assert_eq!(
            decide(&on_failure, &Pods::count([&restarting]), Duration::ZERO),
            Step::Failed(Failure::BackoffLimit)
        );
        let deadline = spec(json!({"activeDeadlineSeconds": 5}));
        assert_eq!(
            decide(&deadline, &Pods::default(), Duration::from_secs(5)),
            Step::Failed(Failure::Deadline)
        );
        assert_eq!(
            failure_backoff(3, Duration::from_secs(10), Duration::from_secs(360)),
            Duration::from_secs(40)
        );
        assert_eq!(
            failure_backoff(30, Duration::from_secs(10), Duration::from_secs(360)),
            Duration::from_secs(360)
        );
    }
}
