//! The two clusters under test, each three processes on loopback with data under a temporary
//! directory: Keelson's `keelson-server` members and etcd members.
//!
//! Every process is a child that is killed when its guard drops (and by the kernel if this
//! driver dies first), in a process group of its own so that a Ctrl-C reaches only the driver,
//! which then stops them in order.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::process::{Child, Command};
use tokio::time::Instant;

/// How long a cluster may take to come up.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A command whose process is killed with its guard, and when this process dies.
fn guarded(program: &Path) -> Command {
    let mut cmd = Command::new(program);
    cmd.kill_on_drop(true).process_group(0).stdin(Stdio::null());
    // SAFETY: prctl is async-signal-safe and touches only the calling (child) process.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd
}

/// The last lines of a process's log, to explain why it did not come up.
fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(15)..].join("\n");
    format!("{}:\n{tail}", log.display())
}

fn log_file(path: &Path) -> Result<std::fs::File> {
    std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))
}

/// A free TCP port on 127.0.0.1 (free when asked; etcd needs its ports up front).
fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0")?;
    Ok(listener
        .local_addr()
        .context("reading a bound port")?
        .port())
}

/// Three `keelson-server` members: member 1 bootstraps, 2 and 3 join it.
pub struct KeelsonCluster {
    /// The members' gRPC addresses.
    pub addrs: Vec<String>,
    _members: Vec<Child>,
}

impl KeelsonCluster {
    /// Start the members of `server` with data under `root`.
    ///
    /// # Errors
    /// A member fails to start or to report ready in time.
    pub async fn start(server: &Path, root: &Path) -> Result<Self> {
        let mut members = Vec::new();
        let mut addrs: Vec<String> = Vec::new();
        for id in 1..=3u64 {
            let data = root.join(format!("keelson-{id}"));
            let log = root.join(format!("keelson-{id}.log"));
            let mut cmd = guarded(server);
            cmd.args(["--id", &id.to_string(), "--listen", "127.0.0.1:0"])
                .arg("--data-dir")
                .arg(&data)
                .env("RUST_LOG", "warn,openraft=error")
                .stdout(Stdio::piped())
                .stderr(log_file(&log)?);
            match addrs.first() {
                None => cmd.arg("--init"),
                Some(first) => cmd.args(["--join", first]),
            };
            let mut child = cmd
                .spawn()
                .with_context(|| format!("starting {}", server.display()))?;
            let addr = wait_ready(&mut child, id, &log)
                .await
                .with_context(|| format!("keelson member {id}: {}", log_tail(&log)))?;
            addrs.push(addr);
            members.push(child);
        }
        Ok(KeelsonCluster {
            addrs,
            _members: members,
        })
    }
}

/// Read a member's stdout until it is ready, then keep copying it into its log.
async fn wait_ready(child: &mut Child, id: u64, log: &Path) -> Result<String> {
    let stdout = child.stdout.take().context("stdout not captured")?;
    let mut lines = BufReader::new(stdout).lines();
    let ready = format!("member {id} ready");
    let mut addr = None;
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        let line = tokio::time::timeout_at(deadline, lines.next_line())
            .await
            .context("not ready in time")?
            .context("reading its output")?;
        let Some(line) = line else {
            bail!("exited before it was ready");
        };
        if let Some(a) = line.strip_prefix("listening on ") {
            addr = Some(a.trim().to_string());
        }
        if line.trim() == ready {
            break;
        }
    }
    let mut out = tokio::fs::OpenOptions::new()
        .append(true)
        .open(log)
        .await
        .with_context(|| format!("opening {}", log.display()))?;
    let mut rest = lines.into_inner();
    tokio::spawn(async move {
        let _ = tokio::io::copy(&mut rest, &mut out).await;
    });
    addr.context("ready without saying where it listens")
}

/// Three etcd members on loopback.
pub struct EtcdCluster {
    /// The client URL of the member that was leader once the cluster was up.
    pub leader_url: String,
    /// `etcd --version`, first line.
    pub version: String,
    _members: Vec<Child>,
}

impl EtcdCluster {
    /// Start `etcd` members with data under `root` and wait for a leader.
    ///
    /// # Errors
    /// etcd is missing, a member fails to start or no leader shows up in time.
    pub async fn start(etcd: &Path, root: &Path) -> Result<Self> {
        let version = std::process::Command::new(etcd)
            .arg("--version")
            .output()
            .with_context(|| format!("running {} --version", etcd.display()))?;
        let version = String::from_utf8_lossy(&version.stdout)
            .lines()
            .next()
            .unwrap_or("unknown")
            .to_string();
        let mut client_urls = Vec::new();
        let mut peer_urls = Vec::new();
        for _ in 0..3 {
            client_urls.push(format!("http://127.0.0.1:{}", free_port()?));
            peer_urls.push(format!("http://127.0.0.1:{}", free_port()?));
        }
        let initial: Vec<String> = peer_urls
            .iter()
            .enumerate()
            .map(|(i, url)| format!("e{}={url}", i + 1))
            .collect();
        let initial = initial.join(",");
        let mut members = Vec::new();
        let mut logs: Vec<PathBuf> = Vec::new();
        for (i, (client, peer)) in client_urls.iter().zip(&peer_urls).enumerate() {
            let name = format!("e{}", i + 1);
            let log = root.join(format!("etcd-{}.log", i + 1));
            let out = log_file(&log)?;
            let child = guarded(etcd)
                .args(["--name", &name])
                .arg("--data-dir")
                .arg(root.join(format!("etcd-{}", i + 1)))
                .args([
                    "--listen-client-urls",
                    client,
                    "--advertise-client-urls",
                    client,
                ])
                .args(["--listen-peer-urls", peer])
                .args(["--initial-advertise-peer-urls", peer])
                .args(["--initial-cluster", &initial])
                .args(["--initial-cluster-state", "new"])
                .args(["--initial-cluster-token", "keelson-bench"])
                .args(["--logger", "zap", "--log-level", "warn"])
                .stdout(out.try_clone().context("duplicating a log handle")?)
                .stderr(out)
                .spawn()
                .with_context(|| format!("starting {}", etcd.display()))?;
            members.push(child);
            logs.push(log);
        }
        let leader_url = match wait_for_leader(&client_urls).await {
            Ok(url) => url,
            Err(e) => {
                let tails: Vec<String> = logs.iter().map(|l| log_tail(l)).collect();
                return Err(e.context(tails.join("\n")));
            }
        };
        Ok(EtcdCluster {
            leader_url,
            version,
            _members: members,
        })
    }
}

/// Poll every member's status until all agree on a leader; return the leader's client URL.
async fn wait_for_leader(urls: &[String]) -> Result<String> {
    let deadline = Instant::now() + START_TIMEOUT;
    let mut last = String::from("no answer yet");
    while Instant::now() < deadline {
        match leader_of(urls).await {
            Ok(Some(url)) => return Ok(url),
            Ok(None) => last = "no leader yet".into(),
            Err(e) => last = format!("{e:#}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("etcd has no leader after {START_TIMEOUT:?} ({last})")
}

async fn leader_of(urls: &[String]) -> Result<Option<String>> {
    let options = etcd_client::ConnectOptions::new().with_timeout(Duration::from_secs(1));
    let mut leaders = Vec::new();
    for url in urls {
        let mut client = etcd_client::Client::connect([url], Some(options.clone())).await?;
        let status = client.status().await?;
        let me = status.header().map(|h| h.member_id());
        leaders.push((url, status.leader(), me));
    }
    let leader = leaders[0].1;
    if leader == 0 || leaders.iter().any(|(_, l, _)| *l != leader) {
        return Ok(None);
    }
    Ok(leaders
        .into_iter()
        .find(|(_, _, me)| *me == Some(leader))
        .map(|(url, _, _)| url.clone()))
}
