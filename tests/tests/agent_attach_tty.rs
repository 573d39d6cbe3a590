//! `kubectl attach -it` to a container with `tty: true` and `stdin: true`, against a real
//! control plane and `keelson-agent node` in a network namespace and cgroup subtree of the
//! test: kubectl runs on a pseudo-terminal (util-linux `script`), a command typed into the
//! container's `sh` runs there and its output comes back, `exit` ends the container, and
//! `kubectl logs` shows the terminal's output. Attach without a terminal (`-i`, a pipe) keeps
//! working beside it.

use std::{
    io::{Read as _, Write as _},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use keelson_e2e::{
    cluster::{ControlPlane, KUBECTL},
    node::{NodeEnv, wait_for},
    oci_image::busybox_layout,
    require_root, unique_name,
};
use serde_json::Value;

const IMAGE: &str = "keelson.test/busybox:1";

fn phase(cp: &ControlPlane, pod: &str) -> Result<String> {
    let out = cp.kubectl(&["get", "pod", pod, "-o", "json"])?;
    let p: Value = serde_json::from_str(&out)?;
    Ok(p.pointer("/status/phase")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned())
}

fn pod_yaml(node: &str, name: &str, command: &str, extra: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\nspec:\n  nodeName: {node}\n  \
         restartPolicy: Never\n  terminationGracePeriodSeconds: 0\n  containers:\n  - name: main\n    \
         image: {IMAGE}\n    command: {command}\n    stdin: true\n{extra}"
    )
}

/// `kubectl attach -it` on a pseudo-terminal of `script`, whose input the test types and
/// whose output it collects as it comes; killed on drop.
struct Terminal {
    child: Child,
    output: Arc<Mutex<Vec<u8>>>,
}

impl Terminal {
    /// kubectl's terminal is `columns`×`rows`: kubectl sends that size to the container.
    fn attach(cp: &ControlPlane, pod: &str, columns: u16, rows: u16) -> Result<Self> {
        let line = format!(
            "stty cols {columns} rows {rows}; \
             {KUBECTL} --kubeconfig '{}' attach -it {pod} -c main",
            cp.kubeconfig().display()
        );
        let mut child = Command::new("script")
            .args(["-q", "-e", "-c", &line, "/dev/null"])
            .env("HOME", cp.dir())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("running script(1) from util-linux")?;
        let output = Arc::new(Mutex::new(Vec::new()));
        for stream in [
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let output = Arc::clone(&output);
            std::thread::spawn(move || {
                let mut stream = stream;
                let mut buf = [0u8; 4096];
                while let Ok(n) = stream.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    if let Ok(mut o) = output.lock() {
                        o.extend_from_slice(&buf[..n]);
                    }
                }
            });
        }
        Ok(Terminal { child, output })
    }

    fn type_line(&mut self, text: &str) -> Result<()> {
        let stdin = self.child.stdin.as_mut().context("script's stdin")?;
        stdin.write_all(format!("{text}\r").as_bytes())?;
        stdin.flush()?;
        Ok(())
    }

    fn output(&self) -> String {
        let o = self.output.lock().map(|o| o.clone()).unwrap_or_default();
        String::from_utf8_lossy(&o).into_owned()
    }

    /// Types `line` (again every second, in case the attach was not connected yet) until
    /// `expected` shows up.
    fn run_until(&mut self, line: &str, expected: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while !self.output().contains(expected) {
            if Instant::now() > deadline {
                bail!(
                    "{expected:?} not seen after typing {line:?}; the terminal showed: {:?}",
                    self.output()
                );
            }
            self.type_line(line)?;
            let until = Instant::now() + Duration::from_secs(1);
            while Instant::now() < until && !self.output().contains(expected) {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(())
    }

    fn wait_exit(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while self.child.try_wait()?.is_none() {
            ensure!(
                Instant::now() < deadline,
                "kubectl attach did not end; it showed: {:?}",
                self.output()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }
}

impl Drop for Terminal {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn attach_with_a_terminal() -> Result<()> {
    require_root()?;
    let started = Instant::now();
    let cp = ControlPlane::start()?;
    let env = NodeEnv::new(&unique_name("tty"))?;
    let layout_dir = tempfile::tempdir()?;
    busybox_layout(layout_dir.path(), IMAGE)?;
    env.import_image(layout_dir.path(), IMAGE)?;
    let agent = env.start_agent(&cp)?;
    let result = run(&cp, env.name());
    drop(agent);
    if result.is_err() {
        let log = std::fs::read_to_string(cp.dir().join("agent.log")).unwrap_or_default();
        eprintln!("--- agent log ---\n{log}");
    }
    eprintln!("tty attach test took {:?}", started.elapsed());
    result
}

fn run(cp: &ControlPlane, node: &str) -> Result<()> {
    let t = Duration::from_secs(60);
    let mut manifest = pod_yaml(node, "shell", "[sh]", "    tty: true\n");
    manifest.push_str("---\n");
    manifest.push_str(&pod_yaml(
        node,
        "piped",
        "[sh, -c, 'echo ready; while read l; do echo got:$l; done; echo bye']",
        "    stdinOnce: true\n",
    ));
    cp.apply(&manifest)?;
    for pod in ["shell", "piped"] {
        wait_for(&format!("{pod} to run"), t, || {
            Ok((phase(cp, pod)? == "Running").then_some(()))
        })?;
    }

    // On a terminal: the typed command runs in the container's shell (its result, not the
    // echoed command line, shows it ran there), the container's terminal has the size of
    // kubectl's, and `exit` ends the shell and the attach.
    let mut term = Terminal::attach(cp, "shell", 111, 33)?;
    term.run_until(
        "echo tty-$((6*7)) $([ -t 0 ] && echo term-$((1+1)))",
        "tty-42 term-2",
        t,
    )?;
    term.run_until("echo size-$(stty size | tr ' ' x)", "size-33x111", t)?;
    term.type_line("exit")?;
    term.wait_exit(t)?;
    wait_for("the shell pod to succeed", t, || {
        Ok((phase(cp, "shell")? == "Succeeded").then_some(()))
    })?;
    let logs = cp.kubectl(&["logs", "shell"])?;
    ensure!(
        logs.contains("tty-42 term-2\r\n") && logs.contains("size-33x111"),
        "kubectl logs of the terminal: {logs:?}"
    );

    // Without a terminal: input through the pipe, output from the log, stdinOnce ends it.
    let out = cp.kubectl_with_stdin(&["attach", "-i", "piped", "-c", "main"], b"hello\n")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        stdout.contains("got:hello") && stdout.contains("bye"),
        "attach without a terminal: {out:?}"
    );
    wait_for("the piped pod to succeed", t, || {
        Ok((phase(cp, "piped")? == "Succeeded").then_some(()))
    })?;
    Ok(())
}
