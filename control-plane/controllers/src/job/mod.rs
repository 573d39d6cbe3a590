//! The Job controller: runs pods from the template until `completions` of them succeeded
//! (or, without `completions`, until one succeeded and the rest finished), at most
//! `parallelism` at once; pods that fail are replaced after a growing back-off until more
//! than `backoffLimit` failed, and `activeDeadlineSeconds` bounds the whole run. It writes
//! the counts and the conditions Kubernetes 1.33 writes (`SuccessCriteriaMet`/`Complete`,
//! `FailureTarget`/`Failed`, `Suspended`), labels pods with the Job's name and uid as
//! Kubernetes does, and deletes finished Jobs after `ttlSecondsAfterFinished`.
//!
//! Counts come from the pods that exist: finished pods are never deleted by this
//! controller, but one deleted by someone else is no longer counted (Kubernetes' pod
//! tracking finalizers are not used).

mod decide;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use k8s_openapi::api::{
    batch::v1::{Job, JobCondition},
    core::v1::Pod,
};
use kube::{
    Api, Client,
    api::{DeleteParams, ObjectMeta, Patch, PatchParams, Preconditions},
    runtime::reflector::{ObjectRef, Store},
};
use serde_json::json;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::{
    Options, Result,
    error::ApiContext as _,
    events::{Recorder, Type},
    expectations::Expectations,
    informer::{Change, Informer},
    podwrites::Writer,
    util::{self, Key},
    workqueue::WorkQueue,
};
use decide::{Failure, Pods, Step};

/// The label holding the uid of a pod's Job (also the generated selector).
pub const CONTROLLER_UID: &str = "batch.kubernetes.io/controller-uid";
/// The label holding the name of a pod's Job.
pub const JOB_NAME: &str = "batch.kubernetes.io/job-name";
/// Labels Kubernetes still sets beside the two above.
const LEGACY_LABELS: [&str; 2] = ["controller-uid", "job-name"];
/// Pods created per reconcile at most.
const BURST: usize = 500;

/// The Job controller.
pub(crate) struct Jobs {
    client: Client,
    jobs: Store<Job>,
    pods: Store<Pod>,
    queue: WorkQueue<Key>,
    expectations: Expectations<Key>,
    /// Per Job: the failed pods seen last and when their number last grew.
    failures: Mutex<HashMap<Key, (usize, Instant)>>,
    backoff_initial: Duration,
    backoff_max: Duration,
    recorder: Recorder,
}

fn condition_true(job: &Job, type_: &str) -> Option<JobCondition> {
    job.status
        .as_ref()?
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == type_ && c.status == "True")
        .cloned()
}

/// The condition that finished the Job, if it has finished.
fn finished(job: &Job) -> Option<JobCondition> {
    condition_true(job, "Complete").or_else(|| condition_true(job, "Failed"))
}

impl Jobs {
    /// Registers the controller's handlers.
    pub fn register(
        client: Client,
        opts: &Options,
        jobs: &mut Informer<Job>,
        pods: &mut Informer<Pod>,
    ) -> Arc<Self> {
        let queue = WorkQueue::new();
        let store = jobs.store();
        jobs.queue_keys(&queue);
        {
            let (queue, store) = (queue.clone(), store.clone());
            pods.on(move |c| match c {
                Change::Applied(p) | Change::Deleted(p) => {
                    if let Some(r) = util::controller_of(&p.metadata).filter(|r| r.kind == "Job") {
                        queue.add(Key::new(
                            p.metadata.namespace.as_deref().unwrap_or_default(),
                            &r.name,
                        ));
                    }
                }
                Change::Relisted => store
                    .state()
                    .iter()
                    .for_each(|j| queue.add(Key::of(j.as_ref()))),
            });
        }
        Arc::new(Jobs {
            recorder: Recorder::new(client.clone(), "job-controller"),
            client,
            jobs: store,
            pods: pods.store(),
            queue,
            expectations: Expectations::new(),
            failures: Mutex::new(HashMap::new()),
            backoff_initial: opts.job_backoff_initial,
            backoff_max: opts.job_backoff_max,
        })
    }

    /// Reconciles until `cancel`.
    pub async fn run(self: Arc<Self>, cancel: CancellationToken) {
        if !crate::informer::ready(&self.jobs, &cancel).await
            || !crate::informer::ready(&self.pods, &cancel).await
        {
            return;
        }
        let this = Arc::clone(&self);
        self.queue
            .clone()
            .run(cancel, "job", move |key| {
                let this = Arc::clone(&this);
                async move { this.reconcile(key).await }
            })
            .await;
    }

    /// How long new pods must still wait after the Job's latest failure.
    fn backoff_left(&self, key: &Key, failed: usize) -> Duration {
        let mut all = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        let entry = all.entry(key.clone()).or_insert((0, Instant::now()));
        if failed > entry.0 {
            *entry = (failed, Instant::now());
        }
        decide::failure_backoff(failed, self.backoff_initial, self.backoff_max)
            .saturating_sub(entry.1.elapsed())
    }

    async fn reconcile(&self, key: Key) -> Result<Option<Duration>> {
        let Some(job) = self.jobs.get(&ObjectRef::new(&key.name).within(&key.ns)) else {
            self.expectations.forget(&key);
            self.failures
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&key);
            return Ok(None);
        };
        if util::terminating(job.as_ref()) {
            return Ok(None);
        }
        let Some(spec) = job.spec.as_ref() else {
            return Ok(None);
        };
        let uid = util::uid(job.as_ref()).to_owned();
        let in_ns = self
            .pods
            .state_filter(|p| p.metadata.namespace.as_deref() == Some(key.ns.as_str()));
        let owned: Vec<&Pod> = in_ns
            .iter()
            .filter(|p| util::controller_of(&p.metadata).is_some_and(|r| r.uid == uid))
            .map(AsRef::as_ref)
            .collect();
        let pods = Pods::count(owned.iter().copied());
        let by_name: HashMap<&str, &Pod> = in_ns
            .iter()
            .filter_map(|p| Some((p.metadata.name.as_deref()?, p.as_ref())))
            .collect();
        let met = self.expectations.met(&key, &by_name);

        if let Some(done) = finished(&job) {
            if met && !pods.active.is_empty() {
                self.delete_pods(&key, &job, &pods.active).await?;
            }
            return self
                .expire(&job, spec.ttl_seconds_after_finished, &done)
                .await;
        }

        let now = util::now();
        let suspended = spec.suspend == Some(true);
        // A suspended Job has no start time, so a resumed one is timed from its resumption.
        let start = if suspended {
            None
        } else {
            Some(
                job.status
                    .as_ref()
                    .and_then(|s| s.start_time.clone())
                    .unwrap_or_else(|| now.clone()),
            )
        };
        let active_for = start.as_ref().map_or(Duration::ZERO, |s| {
            Duration::try_from(now.0.duration_since(s.0)).unwrap_or(Duration::ZERO)
        });
        // An outcome once recorded stands, even when the pods that decided it are gone.
        let decided = if condition_true(&job, "SuccessCriteriaMet").is_some() {
            Some(Step::Succeeded)
        } else {
            condition_true(&job, "FailureTarget").map(|c| {
                Step::Failed(if c.reason.as_deref() == Some(Failure::Deadline.reason()) {
                    Failure::Deadline
                } else {
                    Failure::BackoffLimit
                })
            })
        };
        let step = if let Some(step) = decided {
            step
        } else if suspended {
            if pods.active.is_empty() {
                Step::Wait
            } else {
                Step::Delete(pods.active.len())
            }
        } else {
            decide::decide(spec, &pods, active_for)
        };

        let mut requeue: Option<Duration> = None;
        let mut soonest = |d: Duration| {
            requeue = Some(requeue.map_or(d, |r: Duration| r.min(d)));
        };
        let mut failure = None;
        if met {
            let r = match &step {
                Step::Create(n) => {
                    let wait = self.backoff_left(&key, pods.failed);
                    if wait.is_zero() {
                        self.create_pods(&key, &job, (*n).min(BURST)).await
                    } else {
                        soonest(wait);
                        Ok(())
                    }
                }
                Step::Delete(n) => {
                    let victims = pick_victims(&pods.active, *n);
                    self.delete_pods(&key, &job, &victims).await
                }
                Step::Succeeded | Step::Failed(_) => {
                    self.delete_pods(&key, &job, &pods.active).await
                }
                Step::Wait => Ok(()),
            };
            failure = r.err();
        } else {
            soonest(Duration::from_secs(1));
        }

        // Conditions: the interim one as soon as the outcome is known, the final one when
        // no pod of the Job is running any more.
        let mut conditions = job
            .status
            .as_ref()
            .and_then(|s| s.conditions.clone())
            .unwrap_or_default();
        let quiet = pods.active.is_empty() && pods.terminating == 0;
        let mut completion_time = None;
        match step {
            Step::Succeeded => {
                let msg = "Reached expected number of succeeded pods";
                set_condition(
                    &mut conditions,
                    "SuccessCriteriaMet",
                    "CompletionsReached",
                    msg,
                );
                if quiet {
                    set_condition(&mut conditions, "Complete", "CompletionsReached", msg);
                    completion_time = Some(now.clone());
                    self.recorder.record(
                        job.as_ref(),
                        Type::Normal,
                        "Completed",
                        "Job completed".into(),
                    );
                }
            }
            Step::Failed(f) => {
                set_condition(&mut conditions, "FailureTarget", f.reason(), f.message());
                if quiet {
                    set_condition(&mut conditions, "Failed", f.reason(), f.message());
                    self.recorder.record(
                        job.as_ref(),
                        Type::Warning,
                        f.reason(),
                        f.message().into(),
                    );
                }
            }
            _ => {}
        }
        if suspended {
            set_condition(
                &mut conditions,
                "Suspended",
                "JobSuspended",
                "Job suspended",
            );
        } else if let Some(c) = conditions
            .iter_mut()
            .find(|c| c.type_ == "Suspended" && c.status == "True")
        {
            *c = condition("Suspended", "False", "JobResumed", "Job resumed");
        }
        let mut status = json!({
            "active": pods.active.len(),
            "ready": pods.ready,
            "succeeded": pods.succeeded,
            "failed": pods.failed,
            "terminating": pods.terminating,
            "startTime": start,
            "conditions": conditions,
        });
        if let Some(t) = &completion_time {
            status["completionTime"] = json!(t);
        }
        let current = job.status.as_ref().map(|s| {
            json!({
                "active": s.active.unwrap_or(0),
                "ready": s.ready.unwrap_or(0),
                "succeeded": s.succeeded.unwrap_or(0),
                "failed": s.failed.unwrap_or(0),
                "terminating": s.terminating.unwrap_or(0),
                "startTime": s.start_time,
                "conditions": s.conditions.clone().unwrap_or_default(),
            })
        });
        if current.as_ref() != Some(&status) {
            let api: Api<Job> = Api::namespaced(self.client.clone(), &key.ns);
            api.patch_status(
                &key.name,
                &PatchParams::default(),
                &Patch::Merge(json!({"status": status})),
            )
            .await
            .ctx(|| format!("updating the status of job {key}"))?;
        }
        if let Some(e) = failure {
            return Err(e);
        }
        if let (Some(d), false) = (spec.active_deadline_seconds, suspended) {
            let deadline = Duration::from_secs(u64::try_from(d).unwrap_or(0));
            soonest(deadline.saturating_sub(active_for) + Duration::from_millis(10));
        }
        if matches!(step, Step::Succeeded | Step::Failed(_)) && !quiet {
            soonest(Duration::from_secs(1));
        }
        Ok(requeue)
    }

    /// Deletes a finished Job once its `ttlSecondsAfterFinished` has passed since it
    /// finished, as Kubernetes' TTL-after-finished controller does.
    async fn expire(
        &self,
        job: &Job,
        ttl: Option<i32>,
        done: &JobCondition,
    ) -> Result<Option<Duration>> {
        let (Some(ttl), Some(at)) = (ttl, done.last_transition_time.as_ref()) else {
            return Ok(None);
        };
        let expires = at.0 + jiff::SignedDuration::from_secs(i64::from(ttl.max(0)));
        let left = jiff::Timestamp::now().duration_until(expires);
        if left.is_positive() {
            let left = Duration::try_from(left).unwrap_or(Duration::from_secs(1));
            return Ok(Some(left + Duration::from_millis(10)));
        }
        let ns = job.metadata.namespace.clone().unwrap_or_default();
        let name = job.metadata.name.clone().unwrap_or_default();
        let api: Api<Job> = Api::namespaced(self.client.clone(), &ns);
        let dp = DeleteParams {
            preconditions: Some(Preconditions {
                uid: job.metadata.uid.clone(),
                resource_version: None,
            }),
            ..DeleteParams::foreground()
        };
        match api.delete(&name, &dp).await {
            Ok(_) => {
                tracing::debug!(job = %format!("{ns}/{name}"), "deleted after its TTL");
                Ok(None)
            }
            Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => Ok(None),
            Err(e) => Err(e).ctx(|| format!("deleting finished job {ns}/{name}")),
        }
    }

    fn writer<'a>(&'a self, key: &'a Key, job: &'a Job) -> Writer<'a, Job> {
        Writer {
            key,
            owner: job,
            recorder: &self.recorder,
            expectations: &self.expectations,
        }
    }

    async fn create_pods(&self, key: &Key, job: &Job, n: usize) -> Result<()> {
        let template = job
            .spec
            .as_ref()
            .map(|s| s.template.clone())
            .unwrap_or_default();
        let meta = template.metadata.unwrap_or_default();
        let mut labels = meta.labels.unwrap_or_default();
        let uid = util::uid(job).to_owned();
        for (k, v) in [
            (CONTROLLER_UID, &uid),
            (JOB_NAME, &key.name),
            (LEGACY_LABELS[0], &uid),
            (LEGACY_LABELS[1], &key.name),
        ] {
            labels.entry(k.to_owned()).or_insert_with(|| v.clone());
        }
        let pod = Pod {
            metadata: ObjectMeta {
                generate_name: Some(format!("{}-", key.name)),
                namespace: Some(key.ns.clone()),
                labels: Some(labels),
                annotations: meta.annotations,
                owner_references: Some(vec![util::controller_ref(job)]),
                ..ObjectMeta::default()
            },
            spec: template.spec,
            status: None,
        };
        self.writer(key, job).create(vec![pod; n]).await
    }

    async fn delete_pods(&self, key: &Key, job: &Job, victims: &[&Pod]) -> Result<()> {
        let names: Vec<String> = victims
            .iter()
            .filter_map(|p| p.metadata.name.clone())
            .collect();
        if names.is_empty() {
            return Ok(());
        }
        self.writer(key, job)
            .delete(names, &DeleteParams::background())
            .await
    }
}

fn condition(type_: &str, status: &str, reason: &str, message: &str) -> JobCondition {
    let now = util::now();
    JobCondition {
        type_: type_.into(),
        status: status.into(),
        reason: Some(reason.into()),
        message: Some(message.into()),
        last_probe_time: Some(now.clone()),
        last_transition_time: Some(now),
    }
}

/// Sets a condition to True unless it already is.
fn set_condition(conditions: &mut Vec<JobCondition>, type_: &str, reason: &str, message: &str) {
    match conditions.iter_mut().find(|c| c.type_ == type_) {
        Some(c) if c.status == "True" => {}
        Some(c) => *c = condition(type_, "True", reason, message),
        None => conditions.push(condition(type_, "True", reason, message)),
    }
}

/// The active pods to stop first: unscheduled, then not ready, then the youngest.
fn pick_victims<'a>(active: &[&'a Pod], n: usize) -> Vec<&'a Pod> {
    let mut ranked = active.to_vec();
    ranked.sort_by_key(|p| {
        (
            util::pod_node(p).is_some(),
            util::pod_ready(p),
            std::cmp::Reverse(p.metadata.creation_timestamp.as_ref().map(|t| t.0)),
        )
    });
    ranked.truncate(n);
    ranked
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conditions_turn_true_once() {
        let mut c = vec![condition("Suspended", "False", "JobResumed", "Job resumed")];
        set_condition(&mut c, "Suspended", "JobSuspended", "Job suspended");
        set_condition(&mut c, "Complete", "CompletionsReached", "m");
        let first = c[1].last_transition_time.clone();
        set_condition(&mut c, "Complete", "CompletionsReached", "m");
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].status, "True");
        assert_eq!(c[1].last_transition_time, first);
    }
}
