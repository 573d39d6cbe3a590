//! Startup, liveness and readiness probes of one container attempt: exec (through the
//! runtime's `exec`), httpGet and tcpSocket (connected from inside the pod's network
//! namespace), with Kubernetes' timing fields. Results land in a [`ProbeStatus`] the pod sync
//! reads; a callback tells it when they change, so that readiness and restarts do not wait for
//! its next periodic pass.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use nix::sched::{CloneFlags, setns};

/// What the probes of one attempt found so far.
#[derive(Debug)]
pub struct ProbeStatus {
    /// Readiness (true from the start if there is no readiness probe).
    pub ready: AtomicBool,
    /// The startup probe succeeded (or there is none).
    pub started: AtomicBool,
    /// Liveness or startup failed past its threshold: the container must be restarted.
    pub failed: AtomicBool,
}

/// The probes of one attempt; they stop when this is dropped.
#[derive(Debug)]
pub struct ProbeSet {
    /// Shared results.
    pub status: Arc<ProbeStatus>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ProbeSet {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Where and how probes run for one attempt.
#[derive(Debug, Clone)]
pub struct ProbeTarget {
    /// The `keelson-runtime` binary (for exec probes).
    pub runtime_bin: PathBuf,
    /// Its state root.
    pub runtime_root: PathBuf,
    /// The runtime container id.
    pub container_id: String,
    /// The pod's network namespace file.
    pub netns: PathBuf,
}

#[derive(Clone, Copy)]
struct Timing {
    initial: Duration,
    period: Duration,
    timeout: Duration,
    success: u32,
    failure: u32,
}

fn timing(p: &Probe) -> Timing {
    let secs = |v: Option<i32>, d: i32| Duration::from_secs(v.unwrap_or(d).max(0) as u64);
    Timing {
        initial: secs(p.initial_delay_seconds, 0),
        period: secs(p.period_seconds, 10).max(Duration::from_secs(1)),
        timeout: secs(p.timeout_seconds, 1).max(Duration::from_secs(1)),
        success: p.success_threshold.unwrap_or(1).max(1) as u32,
        failure: p.failure_threshold.unwrap_or(3).max(1) as u32,
    }
}

fn port_of(port: &IntOrString, container: &Container) -> Option<u16> {
    match port {
        IntOrString::Int(p) => u16::try_from(*p).ok(),
        IntOrString::String(name) => container
            .ports
            .as_ref()?
            .iter()
            .find(|p| p.name.as_deref() == Some(name.as_str()))
            .and_then(|p| u16::try_from(p.container_port).ok()),
    }
}

/// Runs `f` on a fresh thread inside the network namespace `netns` (the thread ends after, so
/// no other task ever runs in the pod's namespace).
async fn in_netns<T: Send + 'static>(
    netns: &Path,
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> std::io::Result<T> {
    let ns = std::fs::File::open(netns)?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let result = setns(&ns, CloneFlags::CLONE_NEWNET)
            .map_err(std::io::Error::from)
            .and_then(|()| f());
        let _ = tx.send(result);
    });
    rx.await
        .unwrap_or_else(|_| Err(std::io::Error::other("probe thread died")))
}

fn connect(host: &str, port: u16, timeout: Duration) -> std::io::Result<TcpStream> {
    let addrs: Vec<SocketAddr> = (host, port).to_socket_addrs()?.collect();
    let mut last = std::io::Error::other("no address");
    for a in addrs {
        match TcpStream::connect_timeout(&a, timeout) {
            Ok(s) => return Ok(s),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// One probe run: true on success.
async fn run_once(probe: &Probe, container: &Container, target: &ProbeTarget, t: Timing) -> bool {
    if let Some(exec) = &probe.exec {
        let command = exec.command.clone().unwrap_or_default();
        if command.is_empty() {
            return false;
        }
        let mut cmd = tokio::process::Command::new(&target.runtime_bin);
        cmd.arg("--root")
            .arg(&target.runtime_root)
            .arg("exec")
            .arg(&target.container_id)
            .args(&command)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true);
        return matches!(
            tokio::time::timeout(t.timeout, cmd.status()).await,
            Ok(Ok(status)) if status.success()
        );
    }
    if let Some(tcp) = &probe.tcp_socket {
        let Some(port) = port_of(&tcp.port, container) else {
            return false;
        };
        let host = tcp.host.clone().unwrap_or_else(|| "127.0.0.1".to_owned());
        let timeout = t.timeout;
        return in_netns(&target.netns, move || {
            connect(&host, port, timeout).map(drop)
        })
        .await
        .is_ok();
    }
    if let Some(http) = &probe.http_get {
        let Some(port) = port_of(&http.port, container) else {
            return false;
        };
        let host = http.host.clone().unwrap_or_else(|| "127.0.0.1".to_owned());
        let path = http.path.clone().unwrap_or_else(|| "/".to_owned());
        let headers: Vec<(String, String)> = http
            .http_headers
            .clone()
            .unwrap_or_default()
            .into_iter()
            .map(|h| (h.name, h.value))
            .collect();
        let timeout = t.timeout;
        let status = in_netns(&target.netns, move || {
            let mut s = connect(&host, port, timeout)?;
            s.set_read_timeout(Some(timeout))?;
            s.set_write_timeout(Some(timeout))?;
            let mut req = format!(
                "GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: kube-probe/1.33\r\n\
                 Connection: close\r\n"
            );
            for (k, v) in headers {
                req.push_str(&format!("{k}: {v}\r\n"));
            }
            req.push_str("\r\n");
            s.write_all(req.as_bytes())?;
            let mut buf = [0u8; 64];
            let n = s.read(&mut buf)?;
            let head = String::from_utf8_lossy(&buf[..n]).into_owned();
            head.split_whitespace()
                .nth(1)
                .and_then(|c| c.parse::<u16>().ok())
                .ok_or_else(|| std::io::Error::other("no HTTP status"))
        })
        .await;
        return matches!(status, Ok(code) if (200..400).contains(&code));
    }
    if let Some(grpc) = &probe.grpc {
        // A gRPC health check needs a gRPC client: count an open port as healthy.
        let port = u16::try_from(grpc.port).unwrap_or(0);
        let timeout = t.timeout;
        return in_netns(&target.netns, move || {
            connect("127.0.0.1", port, timeout).map(drop)
        })
        .await
        .is_ok();
    }
    false
}

/// Runs `probe` until it crosses a threshold that `on` handles; `on(true)` after `success`
/// consecutive successes, `on(false)` after `failure` consecutive failures. Returns when `on`
/// returns false.
async fn probe_loop(
    probe: &Probe,
    container: &Container,
    target: &ProbeTarget,
    mut on: impl FnMut(bool) -> bool,
) {
    let t = timing(probe);
    tokio::time::sleep(t.initial).await;
    let (mut ok, mut bad) = (0u32, 0u32);
    loop {
        if run_once(probe, container, target, t).await {
            ok += 1;
            bad = 0;
            if ok >= t.success && !on(true) {
                return;
            }
        } else {
            bad += 1;
            ok = 0;
            if bad >= t.failure && !on(false) {
                return;
            }
        }
        tokio::time::sleep(t.period).await;
    }
}

/// Starts the probes of `container` for the attempt at `target`; `on_change` runs whenever the
/// results in [`ProbeStatus`] change.
pub fn start(
    container: &Container,
    target: ProbeTarget,
    on_change: impl Fn() + Send + Sync + 'static,
) -> ProbeSet {
    let status = Arc::new(ProbeStatus {
        ready: AtomicBool::new(container.readiness_probe.is_none()),
        started: AtomicBool::new(container.startup_probe.is_none()),
        failed: AtomicBool::new(false),
    });
    let st = Arc::clone(&status);
    let container = container.clone();
    let task = tokio::spawn(async move {
        if let Some(p) = &container.startup_probe {
            let mut passed = false;
            probe_loop(p, &container, &target, |ok| {
                passed = ok;
                false
            })
            .await;
            if !passed {
                st.failed.store(true, Ordering::SeqCst);
                on_change();
                return;
            }
            st.started.store(true, Ordering::SeqCst);
            on_change();
        }
        let readiness = async {
            if let Some(p) = &container.readiness_probe {
                probe_loop(p, &container, &target, |ok| {
                    if st.ready.swap(ok, Ordering::SeqCst) != ok {
                        on_change();
                    }
                    true
                })
                .await;
            }
        };
        let liveness = async {
            if let Some(p) = &container.liveness_probe {
                probe_loop(p, &container, &target, |ok| {
                    if !ok {
                        st.failed.store(true, Ordering::SeqCst);
                        on_change();
                    }
                    ok
                })
                .await;
            }
        };
        tokio::join!(readiness, liveness);
    });
    ProbeSet { status, task }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;
    use std::time::Instant;

    use super::*;

    /// Polls `f` every 20 ms for up to `within`.
    async fn eventually(within: Duration, f: impl Fn() -> bool) -> bool {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if f() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        f()
    }

    #[tokio::test]
    async fn readiness_changes_are_reported_once_each() {
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test needs root: probes enter the pod's network namespace with setns(2)"
        );
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("listener");
        let port = listener.local_addr().expect("address").port();
        let container: Container = serde_json::from_value(serde_json::json!({
            "name": "c",
            "readinessProbe": {
                "tcpSocket": {"port": port},
                "periodSeconds": 1,
                "failureThreshold": 1,
            },
        }))
        .expect("container");
        let target = ProbeTarget {
            runtime_bin: PathBuf::from("/nonexistent"),
            runtime_root: PathBuf::from("/nonexistent"),
            container_id: "c".into(),
            // The test's own network namespace, where the listener is.
            netns: PathBuf::from("/proc/self/ns/net"),
        };
        let changes = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&changes);
        let set = start(&container, target, move || {
            counted.fetch_add(1, Ordering::SeqCst);
        });
        let status = Arc::clone(&set.status);
        assert!(
            !status.ready.load(Ordering::SeqCst),
            "not ready before a probe"
        );
        assert!(
            eventually(Duration::from_secs(3), || status
                .ready
                .load(Ordering::SeqCst))
            .await,
            "the probe never passed"
        );
        // Further successes change nothing and are not reported.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(changes.load(Ordering::SeqCst), 1);
        drop(listener);
        assert!(
            eventually(Duration::from_secs(3), || !status
                .ready
                .load(Ordering::SeqCst))
            .await,
            "the probe never failed"
        );
        assert_eq!(changes.load(Ordering::SeqCst), 2);
        assert!(
            !status.failed.load(Ordering::SeqCst),
            "readiness never restarts"
        );
    }
}
