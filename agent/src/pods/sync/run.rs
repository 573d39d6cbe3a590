//! The sync loop: the pod watch and every other wake-up (see [`super::dirty`]) mark pods, and
//! the loop syncs the marked ones at once; every `resync` period a sweep goes over every pod
//! of the node and every pod directory on disk (orphans left by deleted pods or by an agent
//! restart), a few pods at a time between marked ones. Memory is checked for eviction every
//! [`super::evict::CHECK_PERIOD`] whatever else happens.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::reflector::Store;
use kube::runtime::{WatchStreamExt as _, reflector, watcher};
use kube::{Api, ResourceExt as _};
use tokio::time::MissedTickBehavior;

use super::PodManager;
use super::dirty::{Queue, Wake};
use super::patches::Answer;

/// After a 409, the pod is synced again this much later (its watch event is usually there).
const CONFLICT_RETRY: Duration = Duration::from_millis(200);

/// The pod's termination grace period, as its deletion set it.
fn grace_seconds(pod: &Pod) -> i64 {
    pod.metadata
        .deletion_grace_period_seconds
        .or(pod
            .spec
            .as_ref()
            .and_then(|s| s.termination_grace_period_seconds))
        .unwrap_or(30)
}

impl PodManager {
    /// Watches the node's pods and reconciles them until `shutdown` completes. Containers keep
    /// running after it returns.
    ///
    /// # Errors
    /// When the pod watch cannot be set up.
    pub async fn run(
        mut self,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> anyhow::Result<()> {
        // Image references are parsed with a regular expression compiled on first use, which
        // took over a second in a debug build: compile it now, not when the first pod comes.
        tokio::task::spawn_blocking(|| {
            let _ = crate::image::parse_reference("keelson.invalid/warm-up:1");
        });
        let Some(mut rx) = self.wakes.take() else {
            anyhow::bail!("the pod manager already ran");
        };
        if let Some(sender) = self.patch_sender.take() {
            tokio::spawn(sender.run());
        }
        let api: Api<Pod> = Api::all(self.client.clone());
        let (reader, writer) = reflector::store();
        let config =
            watcher::Config::default().fields(&format!("spec.nodeName={}", self.cfg.node_name));
        let waker = self.waker.clone();
        let watch = tokio::spawn(async move {
            let mut stream = reflector(writer, watcher(api, config))
                .default_backoff()
                .boxed();
            while let Some(ev) = stream.next().await {
                // The reflector has applied the event to the store by now. Pods of a new
                // list are only in the store at its end (InitDone): a sweep then, never a
                // sync of a pod the store does not have yet (it would look deleted).
                match ev {
                    Ok(watcher::Event::Apply(pod) | watcher::Event::Delete(pod)) => {
                        if let Some(uid) = pod.uid() {
                            waker.pod(&uid);
                        }
                    }
                    Ok(watcher::Event::InitDone) => waker.send(Wake::All),
                    Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => {}
                    Err(e) => tracing::warn!(error = %e, "pod watch"),
                }
            }
        });
        tokio::pin!(shutdown);
        tokio::select! {
            r = reader.wait_until_ready() => r?,
            _ = &mut shutdown => { watch.abort(); return Ok(()); }
        }
        tracing::info!(node = %self.cfg.node_name, "pod sync started");
        let mut queue = Queue::default();
        let mut resync = tokio::time::interval(self.cfg.resync);
        resync.set_missed_tick_behavior(MissedTickBehavior::Delay);
        // The watch's first list (InitDone) queues every pod and pod directory already.
        resync.reset();
        let mut memory = tokio::time::interval(super::evict::CHECK_PERIOD);
        memory.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let evicting = self.eviction.is_some();
        loop {
            // Biased: every wake-up already queued is taken in before the next batch runs.
            tokio::select! {
                biased;
                _ = &mut shutdown => break,
                Some(wake) = rx.recv() => {
                    self.on_wake(wake, &mut queue, &reader);
                    continue;
                }
                _ = resync.tick() => {
                    self.start_sweep(&reader, &mut queue).await;
                    continue;
                }
                _ = memory.tick(), if evicting => {
                    self.check_memory(&reader.state()).await;
                    continue;
                }
                () = std::future::ready(()), if queue.has_work() => {}
            }
            let batch = queue.next_batch();
            let started = Instant::now();
            self.sync_batch(&batch, &reader).await;
            tracing::debug!(
                pods = batch.len(),
                ms = started.elapsed().as_millis() as u64,
                "sync pass"
            );
        }
        watch.abort();
        Ok(())
    }

    fn on_wake(&mut self, wake: Wake, queue: &mut Queue, reader: &Store<Pod>) {
        match wake {
            Wake::Pod(uid) => queue.mark(uid),
            Wake::All => {
                for pod in reader.state() {
                    if let Some(uid) = pod.uid() {
                        queue.mark(uid);
                    }
                }
                for uid in self.pod_dirs() {
                    queue.mark(uid);
                }
            }
            Wake::TornDown(uid) => self.forget(&uid),
            Wake::Sandbox(uid, result) => {
                self.sandbox_done(&uid, result);
                queue.mark(uid);
            }
            Wake::Launched(launched) => {
                let uid = launched.uid.clone();
                self.launch_done(*launched);
                queue.mark(uid);
            }
            Wake::Patched(outcome) => {
                let Some(mem) = self.pods.get_mut(&outcome.uid) else {
                    return;
                };
                if outcome.answer == Answer::Accepted {
                    if outcome.status["phase"] == "Running"
                        && let Some(seen) = mem.first_seen.take()
                    {
                        tracing::debug!(
                            pod = %outcome.name,
                            ms = seen.elapsed().as_millis() as u64,
                            "pod reported Running"
                        );
                    }
                    return;
                }
                // Not stored: the next sync sends it again (unless a newer one went out).
                if mem.last_status.as_ref() == Some(&outcome.status) {
                    mem.last_status = None;
                }
                if outcome.answer == Answer::Conflict {
                    self.requeue(&outcome.uid, Instant::now() + CONFLICT_RETRY);
                }
            }
        }
    }

    /// The uids of the pod directories: the pods' records and, for what a reboot left behind,
    /// their data on disk.
    fn pod_dirs(&self) -> Vec<String> {
        let mut uids: Vec<String> = [self.cfg.layout.pods(), self.cfg.layout.pods_data()]
            .iter()
            .filter_map(|dir| fs::read_dir(dir).ok())
            .flat_map(|d| d.flatten().filter_map(|e| e.file_name().into_string().ok()))
            .collect();
        uids.sort_unstable();
        uids.dedup();
        uids
    }

    /// Queues every pod of the node and every pod directory for a sync, forgets pods that
    /// are gone, and runs what is periodic (image GC).
    async fn start_sweep(&mut self, reader: &Store<Pod>, queue: &mut Queue) {
        let pods = reader.state();
        let mut uids: Vec<String> = pods.iter().filter_map(|p| p.uid()).collect();
        let known: HashSet<String> = uids.iter().cloned().collect();
        let on_disk = self.pod_dirs();
        let on_disk_set: HashSet<&String> = on_disk.iter().collect();
        uids.extend(on_disk.iter().filter(|u| !known.contains(*u)).cloned());
        let gone: Vec<String> = self
            .pods
            .iter()
            .filter(|(uid, m)| !known.contains(*uid) && !on_disk_set.contains(uid) && !m.busy())
            .map(|(uid, _)| uid.clone())
            .collect();
        for uid in gone {
            self.forget(&uid);
        }
        if !queue.start_sweep(uids) {
            tracing::debug!("the last sweep is still going");
        }
        self.image_gc(&pods).await;
    }

    /// Syncs the pods `uids`: the live ones, the deleted ones (graceful stop), and those no
    /// longer bound here (stopped at once and removed).
    async fn sync_batch(&mut self, uids: &[String], reader: &Store<Pod>) {
        let wanted: HashSet<&str> = uids.iter().map(String::as_str).collect();
        let pods: HashMap<String, Arc<Pod>> = reader
            .state()
            .into_iter()
            .filter_map(|p| Some((p.uid()?, p)))
            .filter(|(uid, _)| wanted.contains(uid.as_str()))
            .collect();
        for uid in uids {
            match pods.get(uid) {
                Some(pod) if pod.metadata.deletion_timestamp.is_some() => {
                    self.terminate(uid, Some(pod), grace_seconds(pod)).await;
                }
                Some(pod) => {
                    if let Err(e) = self.sync_pod(pod).await {
                        tracing::warn!(pod = %pod.name_any(), error = %e, "pod sync");
                    }
                }
                None if self.cfg.layout.pod(uid).exists()
                    || self.cfg.layout.pod_data(uid).exists() =>
                {
                    self.terminate(uid, None, 0).await;
                }
                None => {
                    if self.pods.get(uid).is_some_and(|m| !m.busy()) {
                        self.forget(uid);
                    }
                }
            }
        }
    }
}
