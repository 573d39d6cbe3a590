//! Starting a container attempt in the background: its bundle (image config, volumes, DNS
//! files, the OCI spec) is written and its supervisor spawned by a task of its own, so that
//! the launches of a wave of pods overlap and the sync loop goes on meanwhile (reporting the
//! containers already started). Until the task is done, the attempt's directory on disk is
//! incomplete and must not be read as a lost attempt: the pod's sync, termination and
//! eviction wait for it ([`ContainerMem::launching`]). The outcome comes back as a
//! [`Wake::Launched`], reported as Events (Pulled, Created, Started or Failed).

use std::fs;
use std::os::unix::process::ExitStatusExt as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Container, Pod};

use super::dirty::{Wake, Waker};
use super::{ContainerMem, PodManager, PodManagerConfig, pulling};
use crate::image::{ImageStore, Pulled};
use crate::pods::bundle::make_spec;
use crate::pods::events::Kind;
use crate::pods::layout::{PodRecord, container_id, write_json};
use crate::pods::supervisor::PID_FILE;

/// How long after a failed launch the container is tried again.
const LAUNCH_RETRY: Duration = Duration::from_secs(1);

/// Why a launch failed.
pub(super) enum LaunchError {
    /// The image could not be resolved from the store.
    Image(String),
    /// Anything else: the waiting reason and message.
    Other(String, String),
}

fn other(reason: &str, e: impl std::fmt::Display) -> LaunchError {
    LaunchError::Other(reason.to_owned(), e.to_string())
}

/// A launch's outcome, for the sync loop.
pub(super) struct Launched {
    pub uid: String,
    container: Container,
    pod: Arc<Pod>,
    pulled: Option<Pulled>,
    result: Result<(), LaunchError>,
}

/// Everything a launch needs, owned by its task.
struct Job {
    cfg: PodManagerConfig,
    client: kube::Client,
    images: ImageStore,
    waker: Waker,
    pod: Arc<Pod>,
    record: PodRecord,
    c: Container,
    n: u32,
    ip: Option<std::net::Ipv4Addr>,
}

impl Job {
    /// Prepares attempt `n`'s bundle and starts its supervisor.
    async fn run(self) -> Result<(), LaunchError> {
        let n = self.n;
        let image_ref = self.c.image.clone().unwrap_or_default();
        let images = self.images.clone();
        let r = image_ref.clone();
        let started = Instant::now();
        let image = match tokio::task::spawn_blocking(move || images.resolve(&r)).await {
            Ok(Ok(image)) => image,
            Ok(Err(e)) => return Err(LaunchError::Image(format!("image {image_ref}: {e}"))),
            Err(e) => return Err(LaunchError::Image(e.to_string())),
        };
        let resolve_ms = started.elapsed().as_millis() as u64;
        let sandbox = self.cfg.layout.pod(&self.record.uid).join("ns");
        let volumes = crate::pods::volumes::prepare(
            &self.client,
            &self.pod,
            &self.cfg.layout.volumes(&self.record.uid),
        )
        .await
        .map_err(|e| other("CreateContainerConfigError", e))?;
        let mut spec = make_spec(&self.pod, &self.c, &image.config, &sandbox, &volumes)
            .map_err(|e| other("CreateContainerConfigError", e))?;
        if let Some(dns) = self.cfg.dns.clone() {
            let ip = self.ip.map(Into::into);
            let dir = self.cfg.layout.pod(&self.record.uid);
            let files = crate::dns::pod_files::write(&dir, &self.pod, ip, &dns)
                .map_err(|e| other("CreateContainerError", e))?;
            crate::dns::pod_files::add_mounts(&mut spec, &self.c, &files)
                .map_err(|e| other("CreateContainerConfigError", e))?;
        }
        let adir = self.cfg.layout.attempt(&self.record.uid, &self.c.name, n);
        let io = |e: std::io::Error| other("CreateContainerError", e);
        fs::create_dir_all(&adir).map_err(io)?;
        spec.save(adir.join("config.json"))
            .map_err(|e| other("CreateContainerError", e))?;
        write_json(&adir.join("layers.json"), &image.layers).map_err(io)?;
        if self.c.stdin == Some(true) {
            // The container's stdin, kept open by its supervisor, written by `attach`.
            let fifo = adir.join(crate::pods::supervisor::STDIN_FIFO);
            if !fifo.exists() {
                nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600))
                    .map_err(|e| io(e.into()))?;
            }
            if self.c.stdin_once == Some(true) {
                fs::write(adir.join(crate::pods::supervisor::STDIN_ONCE), b"").map_err(io)?;
            }
        }
        if self.c.tty == Some(true) {
            // The supervisor keeps the terminal; attach sends window sizes through the FIFO.
            fs::write(adir.join(crate::pods::console::TTY_FILE), b"").map_err(io)?;
            let fifo = adir.join(crate::pods::console::RESIZE_FIFO);
            if !fifo.exists() {
                nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600))
                    .map_err(|e| io(e.into()))?;
            }
        }
        fs::write(
            adir.join("image"),
            format!("{}\n{}", image_ref, image.digest),
        )
        .map_err(io)?;
        let bundle_ms = started.elapsed().as_millis() as u64 - resolve_ms;
        let id = container_id(&self.record.uid, &self.c.name, n);
        let log = self.cfg.layout.log_file(&self.record, &self.c.name, n);
        let cgroup = format!(
            "{}/pod{}/{}-{n}",
            self.cfg.cgroup_parent, self.record.uid, self.c.name
        );
        let mut cmd = tokio::process::Command::new(&self.cfg.agent_exe);
        cmd.arg("supervise")
            .arg("--runtime-root")
            .arg(self.cfg.layout.runtime_root())
            .arg("--id")
            .arg(&id)
            .arg("--bundle")
            .arg(&adir)
            .arg("--writable-layer")
            .arg(
                self.cfg
                    .layout
                    .writable_layer(&self.record.uid, &self.c.name, n),
            )
            .arg("--log")
            .arg(&log)
            .arg("--cgroup-path")
            .arg(&cgroup)
            .arg("--log-max-size")
            .arg(self.cfg.log_limits.max_size.to_string())
            .arg("--log-max-files")
            .arg(self.cfg.log_limits.max_files.to_string())
            .arg("--detach")
            .arg("--started-on-stdout");
        // The supervisor writes into this pipe (its stdout) once the container runs, and it
        // closes when the supervisor ends: the sync loop wakes then, not at its next resync.
        let (started_r, started_w) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK)
                .map_err(|e| io(e.into()))?;
        // No pre_exec hook (the supervisor leaves our session itself): the standard library
        // then spawns with posix_spawn instead of forking the whole agent, which cost tens of
        // milliseconds per container while a wave of pods starts.
        cmd.stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::from(started_w))
            .stderr(std::process::Stdio::null());
        let launched = Instant::now();
        let spawned = cmd.spawn();
        // The command holds our copy of the pipe's write end: drop it, so only the
        // supervisor's copy keeps the pipe open.
        drop(cmd);
        let mut child = spawned.map_err(io)?;
        tracing::debug!(
            pod = %self.record.name,
            container = %self.c.name,
            resolve_ms,
            bundle_ms,
            spawn_ms = launched.elapsed().as_millis() as u64,
            "supervisor spawned"
        );
        let wake = self.waker.clone();
        let uid = self.record.uid.clone();
        let (pod_name, container) = (self.record.name.clone(), self.c.name.clone());
        match tokio::net::unix::pipe::Receiver::from_owned_fd(started_r) {
            Ok(mut started) => {
                let (wake, uid) = (wake.clone(), uid.clone());
                tokio::spawn(async move {
                    use tokio::io::AsyncReadExt as _;
                    let mut byte = [0u8; 1];
                    let _ = started.read(&mut byte).await;
                    tracing::debug!(
                        pod = %pod_name,
                        container = %container,
                        ms = launched.elapsed().as_millis() as u64,
                        "supervisor: container started"
                    );
                    wake.pod(&uid);
                });
            }
            Err(e) => tracing::debug!(error = %e, "supervisor start pipe"),
        }
        let pid = child.id().unwrap_or(0);
        let start = keelson_runtime::state::proc_start_time(pid as i32).map_or(0, |(s, _)| s);
        write_json(&adir.join(PID_FILE), &(pid, start)).map_err(io)?;
        tokio::spawn(async move {
            if let Ok(status) = child.wait().await
                && let Some(sig) = status.signal()
            {
                tracing::debug!(pid, sig, "supervisor killed");
            }
            // The attempt is over: report it (and restart it) without waiting for the resync.
            wake.pod(&uid);
        });
        // Keep the previous attempt (lastState, previous logs); drop older ones.
        if n >= 2 {
            let old = self
                .cfg
                .layout
                .attempt(&self.record.uid, &self.c.name, n - 2);
            let _ = fs::remove_dir_all(old);
            let _ = fs::remove_dir_all(self.cfg.layout.writable_layer(
                &self.record.uid,
                &self.c.name,
                n - 2,
            ));
        }
        tracing::info!(pod = %self.record.name, container = %self.c.name, attempt = n, "starting container");
        Ok(())
    }
}

impl PodManager {
    /// Starts attempt `n` of `c` in the background once its image is there; until then, and
    /// for [`LAUNCH_RETRY`] after a failed launch, the reason it waits.
    pub(super) async fn start_attempt(
        &mut self,
        pod: &Pod,
        record: &PodRecord,
        c: &Container,
        n: u32,
    ) -> Result<(), (String, String)> {
        let mem = self
            .mem(record)
            .containers
            .entry(c.name.clone())
            .or_default();
        if let Some((reason, message, retry_at)) = &mem.launch_failed {
            if Instant::now() < *retry_at {
                return Err((reason.clone(), message.clone()));
            }
            mem.launch_failed = None;
        }
        let pulled = match self.ensure_image(pod, record, c).await {
            pulling::ImageReady::Present => None,
            pulling::ImageReady::Pulled(p) => Some(p),
            pulling::ImageReady::Pending => {
                return Err(("ContainerCreating".to_owned(), String::new()));
            }
            pulling::ImageReady::Failed(reason, message) => return Err((reason, message)),
        };
        let ip = self.mem(record).link.as_ref().map(|l| l.ip);
        let job = Job {
            cfg: self.cfg.clone(),
            client: self.client.clone(),
            images: self.images.clone(),
            waker: self.waker.clone(),
            pod: Arc::new(pod.clone()),
            record: record.clone(),
            c: c.clone(),
            n,
            ip,
        };
        self.mem(record)
            .containers
            .entry(c.name.clone())
            .or_default()
            .launching = Some(n);
        let waker = self.waker.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let (uid, pod, container) =
                (job.record.uid.clone(), Arc::clone(&job.pod), job.c.clone());
            // On the blocking pool: the bundle is written with plain file I/O, which stalls
            // on a busy disk, and must not hold an async worker (the agent has two) meanwhile.
            let runtime = tokio::runtime::Handle::current();
            let result = tokio::task::spawn_blocking(move || runtime.block_on(job.run()))
                .await
                .unwrap_or_else(|e| Err(other("CreateContainerError", e)));
            tracing::debug!(
                pod = %pod.metadata.name.as_deref().unwrap_or_default(),
                container = %container.name,
                ms = started.elapsed().as_millis() as u64,
                "launched"
            );
            waker.send(Wake::Launched(Box::new(Launched {
                uid,
                container,
                pod,
                pulled,
                result,
            })));
        });
        Ok(())
    }

    /// Takes in a launch's outcome and reports it as Events (a failure once per message).
    pub(super) fn launch_done(&mut self, l: Launched) {
        let Some(mem) = self.pods.get_mut(&l.uid) else {
            return;
        };
        let c = &l.container;
        let mem: &mut ContainerMem = mem.containers.entry(c.name.clone()).or_default();
        mem.launching = None;
        let image = c.image.clone().unwrap_or_default();
        let (events, pod, name) = (&self.events, &*l.pod, Some(c.name.as_str()));
        let (reason, message) = match l.result {
            Ok(()) => {
                mem.failure_reported = None;
                let pulled = match l.pulled {
                    Some(p) => format!(
                        "Successfully pulled image {image:?} in {:.3}s. Image size: {} bytes.",
                        p.elapsed.as_secs_f64(),
                        p.size
                    ),
                    None => format!("Container image {image:?} already present on machine"),
                };
                events.emit(pod, name, Kind::Normal, "Pulled", pulled);
                events.emit(
                    pod,
                    name,
                    Kind::Normal,
                    "Created",
                    format!("Created container {}", c.name),
                );
                events.emit(
                    pod,
                    name,
                    Kind::Normal,
                    "Started",
                    format!("Started container {}", c.name),
                );
                return;
            }
            Err(LaunchError::Image(message)) => {
                mem.image_failures += 1;
                let reason = if mem.image_failures == 1 {
                    "ErrImagePull"
                } else {
                    "ImagePullBackOff"
                };
                (reason.to_owned(), message)
            }
            Err(LaunchError::Other(reason, message)) => (reason, message),
        };
        if mem.failure_reported.as_deref() != Some(&message) {
            mem.failure_reported = Some(message.clone());
            let text = if reason.contains("Image") || reason.contains("ErrImage") {
                format!("Failed to pull image {image:?}: {message}")
            } else {
                format!("Error: {message}")
            };
            events.emit(pod, name, Kind::Warning, "Failed", text);
        }
        let retry_at = Instant::now() + LAUNCH_RETRY;
        mem.launch_failed = Some((reason, message, retry_at));
        self.requeue(&l.uid, retry_at);
    }
}
