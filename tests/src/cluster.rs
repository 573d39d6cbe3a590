//! A control plane for end-to-end tests: one `keelson-server` member serving the Kubernetes
//! API on loopback, with its admin kubeconfig, and kubectl against it. Killed on drop.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::workspace_bin;

/// The kubectl release the tests drive (installed on the project's machines).
pub const KUBECTL: &str = "/usr/lib/google-cloud-sdk/bin/kubectl.1.33";

/// A running single-member control plane.
pub struct ControlPlane {
    dir: tempfile::TempDir,
    server: Child,
    /// For a control plane inside a namespace: its API relayed to the host's loopback.
    _relay: Option<crate::node::Relay>,
}

impl ControlPlane {
    /// Starts `keelson-server --init --api-listen 127.0.0.1:0` in a temporary directory and
    /// waits for its API.
    ///
    /// # Errors
    /// The binary is missing or the API does not come up.
    pub fn start() -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("kt-cp-").tempdir()?;
        let server = Command::new(workspace_bin("keelson-server")?)
            .args([
                "--id",
                "1",
                "--listen",
                "127.0.0.1:0",
                "--init",
                "--api-listen",
                "127.0.0.1:0",
            ])
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .arg("--admin-kubeconfig")
            .arg(dir.path().join("admin.kubeconfig"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting keelson-server")?;
        let cp = ControlPlane {
            dir,
            server,
            _relay: None,
        };
        cp.wait_ready()?;
        Ok(cp)
    }

    /// Starts `keelson-server` inside `netns`, serving the API on every address of that
    /// namespace (its certificate also valid for `api_ip`, where nodes reach it), relayed to
    /// the same port on the host's loopback so that [`ControlPlane::kubectl`] works as usual.
    ///
    /// # Errors
    /// The binary is missing or the API does not come up.
    pub fn start_in(netns: &crate::Netns, api_ip: std::net::Ipv4Addr) -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("kt-cp-").tempdir()?;
        let host = std::net::TcpListener::bind(("127.0.0.1", 0))?;
        let port = host.local_addr()?.port();
        let mut cmd = Command::new(workspace_bin("keelson-server")?);
        cmd.args(["--id", "1", "--listen", "127.0.0.1:0", "--init"])
            .args(["--api-listen", &format!("0.0.0.0:{port}")])
            .args(["--api-san", &api_ip.to_string()])
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .arg("--admin-kubeconfig")
            .arg(dir.path().join("admin.kubeconfig"))
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let fds = crate::place(&mut cmd, netns, None)?;
        let server = cmd.spawn().context("starting keelson-server")?;
        drop(fds);
        let relay = crate::node::Relay::agent(netns, host)?;
        let cp = ControlPlane {
            dir,
            server,
            _relay: Some(relay),
        };
        cp.wait_ready()?;
        Ok(cp)
    }

    /// A copy of the admin kubeconfig that reaches the API at `ip` (same port).
    ///
    /// # Errors
    /// The kubeconfig cannot be read or written.
    pub fn kubeconfig_via(&self, ip: std::net::Ipv4Addr) -> Result<PathBuf> {
        let text = std::fs::read_to_string(self.kubeconfig())?;
        let out = text.replace("https://127.0.0.1:", &format!("https://{ip}:"));
        let path = self.dir.path().join(format!("via-{ip}.kubeconfig"));
        std::fs::write(&path, out)?;
        Ok(path)
    }

    fn wait_ready(&self) -> Result<()> {
        let cp = self;
        let deadline = Instant::now() + Duration::from_secs(60);
        while cp.kubectl(&["get", "--raw", "/readyz"]).is_err() {
            if Instant::now() > deadline {
                bail!("keelson-server's API did not come up");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    /// The admin kubeconfig.
    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.path().join("admin.kubeconfig")
    }

    /// A scratch directory of this control plane.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Runs kubectl as the admin; stdout on success.
    ///
    /// # Errors
    /// kubectl fails (its stderr is in the error).
    pub fn kubectl(&self, args: &[&str]) -> Result<String> {
        let out = Command::new(KUBECTL)
            .arg("--kubeconfig")
            .arg(self.kubeconfig())
            .args(args)
            .env("HOME", self.dir.path())
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {KUBECTL}"))?;
        if !out.status.success() {
            bail!("kubectl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs kubectl as the admin with `input` on its stdin; the whole output, whatever the
    /// exit status.
    ///
    /// # Errors
    /// kubectl cannot be run.
    pub fn kubectl_with_stdin(&self, args: &[&str], input: &[u8]) -> Result<std::process::Output> {
        use std::io::Write as _;
        let mut child = Command::new(KUBECTL)
            .arg("--kubeconfig")
            .arg(self.kubeconfig())
            .args(args)
            .env("HOME", self.dir.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("running {KUBECTL}"))?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(input)?;
        }
        Ok(child.wait_with_output()?)
    }

    /// Runs kubectl as the admin on a pseudo-terminal (util-linux `script`), as a user at a
    /// shell would (`kubectl exec -it` needs one); what it printed.
    ///
    /// # Errors
    /// `script` cannot be run or fails.
    pub fn kubectl_in_terminal(&self, args: &[&str]) -> Result<String> {
        let mut line = format!("{KUBECTL} --kubeconfig {}", self.kubeconfig().display());
        for a in args {
            line.push_str(&format!(" '{}'", a.replace('\'', "'\\''")));
        }
        let out = Command::new("script")
            .args(["-q", "-e", "-c", &line, "/dev/null"])
            .env("HOME", self.dir.path())
            .stdin(Stdio::null())
            .output()
            .context("running script(1) from util-linux")?;
        if !out.status.success() {
            bail!(
                "kubectl {args:?} on a terminal: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Applies a manifest given as text.
    ///
    /// # Errors
    /// kubectl fails.
    pub fn apply(&self, manifest: &str) -> Result<String> {
        let path = self.dir.path().join("apply.yaml");
        std::fs::write(&path, manifest)?;
        self.kubectl(&["apply", "-f", &path.to_string_lossy()])
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
    }
}
