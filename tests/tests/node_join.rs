//! Nodes joining with a bootstrap token, against a real `keelson-server`: `keelson token
//! create` makes a token, `keelson-agent node` with only a bootstrap kubeconfig gets its
//! credentials through the TLS-bootstrap flow (a CertificateSigningRequest the control plane
//! approves and signs), its Node turns Ready and runs a pod. Bootstrap tokens get 403 for
//! anything but discovery and their own CSRs, and 401 once expired or deleted (and expired
//! ones are cleaned up). `Machine` objects work with kubectl, and the provisioner in API
//! mode records an unknown MAC (a real `dhclient` in a test namespace) as a Discovered
//! Machine, serves it user-data with a fresh join token, and follows it to Joined.

use std::{
    ffi::OsString,
    path::Path,
    process::{Child, Command, Output, Stdio},
    time::Duration,
};

use anyhow::{Context as _, Result, ensure};
use keelson_e2e::{
    Netns,
    cluster::{ControlPlane, KUBECTL},
    node::{AgentOptions, ApiRelay, NodeEnv, wait_for},
    oci_image::busybox_layout,
    place, require_root, run_ok, unique_name, workspace_bin,
};
use serde_json::Value;

const IMAGE: &str = "keelson.test/busybox:1";

/// A child process killed on drop.
struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `keelson …` with the admin kubeconfig; stdout.
fn keelson(cp: &ControlPlane, args: &[&str]) -> Result<String> {
    let out = run_ok(
        Command::new(workspace_bin("keelson")?)
            .arg("--kubeconfig")
            .arg(cp.kubeconfig())
            .args(args),
    )?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Creates a token valid for `ttl`, writing its bootstrap kubeconfig to `kubeconfig`.
fn create_token(cp: &ControlPlane, ttl: &str, kubeconfig: &Path) -> Result<String> {
    let out = keelson(
        cp,
        &[
            "token",
            "create",
            "--ttl",
            ttl,
            "--description",
            "e2e join",
            "--write-kubeconfig",
            &kubeconfig.to_string_lossy(),
        ],
    )?;
    let token = out.trim().to_owned();
    let ok = token.len() == 23
        && token.as_bytes()[6] == b'.'
        && token
            .bytes()
            .enumerate()
            .all(|(i, b)| i == 6 || b.is_ascii_lowercase() || b.is_ascii_digit());
    ensure!(
        ok,
        "`keelson token create` printed {out:?}, not <id>.<secret>"
    );
    Ok(token)
}

/// kubectl with another kubeconfig; its whole output, whatever the exit status.
fn kubectl_as(cp: &ControlPlane, kubeconfig: &Path, args: &[&str]) -> Result<Output> {
    Ok(Command::new(KUBECTL)
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .env("HOME", cp.dir())
        .stdin(Stdio::null())
        .output()?)
}

/// Asserts that kubectl failed with `what` (e.g. `Forbidden`, `Unauthorized`).
fn refused(cp: &ControlPlane, kubeconfig: &Path, args: &[&str], what: &str) -> Result<()> {
    let out = kubectl_as(cp, kubeconfig, args)?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && err.contains(what),
        "kubectl {args:?} should fail with {what}; status {}, stderr: {err}",
        out.status
    );
    Ok(())
}

fn allowed(cp: &ControlPlane, kubeconfig: &Path, args: &[&str]) -> Result<String> {
    let out = kubectl_as(cp, kubeconfig, args)?;
    ensure!(
        out.status.success(),
        "kubectl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn get_json(cp: &ControlPlane, args: &[&str]) -> Result<Option<Value>> {
    let mut all = vec!["get"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["-o", "json"]);
    match cp.kubectl(&all) {
        Ok(text) => Ok(Some(serde_json::from_str(&text)?)),
        Err(e) if e.to_string().contains("NotFound") || e.to_string().contains("not found") => {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

fn condition(o: &Value, kind: &str) -> Option<String> {
    o.pointer("/status/conditions")?
        .as_array()?
        .iter()
        .find(|c| c["type"] == kind)
        .and_then(|c| c["status"].as_str().map(str::to_owned))
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let start = text.len().saturating_sub(4000);
    text.get(start..).unwrap_or_default().to_owned()
}

#[test]
fn a_node_joins_with_only_a_bootstrap_token_and_runs_a_pod() -> Result<()> {
    require_root()?;
    let cp = ControlPlane::start()?;
    let bootstrap = cp.dir().join("bootstrap.kubeconfig");
    let token = create_token(&cp, "10m", &bootstrap)?;
    let id = &token[..6];
    let list = keelson(&cp, &["token", "list"])?;
    ensure!(
        list.contains(id) && list.contains("e2e join") && list.contains("authentication,signing"),
        "token list: {list}"
    );
    ensure!(
        !list.contains(&token[7..]),
        "token list shows the secret: {list}"
    );

    // The token reads discovery, and nothing else.
    allowed(&cp, &bootstrap, &["get", "--raw", "/apis"])?;
    refused(
        &cp,
        &bootstrap,
        &["get", "secrets", "-n", "kube-system"],
        "Forbidden",
    )?;
    refused(&cp, &bootstrap, &["get", "nodes"], "Forbidden")?;
    refused(&cp, &bootstrap, &["get", "csr"], "Forbidden")?;

    let node = NodeEnv::new(&unique_name("join"))?;
    let layout = tempfile::tempdir()?;
    busybox_layout(layout.path(), IMAGE)?;
    node.import_image(layout.path(), IMAGE)?;
    let node_kubeconfig = node.state_dir().join("node.kubeconfig");
    let _agent = node.start_agent_with(
        &cp,
        &AgentOptions {
            credentials: vec![
                OsString::from("--bootstrap-kubeconfig"),
                bootstrap.clone().into_os_string(),
                OsString::from("--kubeconfig"),
                node_kubeconfig.clone().into_os_string(),
            ],
            ..AgentOptions::default()
        },
    )?;
    let agent_log = cp.dir().join("agent.log");
    wait_for(
        "the joined node to be Ready",
        Duration::from_secs(90),
        || {
            Ok(get_json(&cp, &["node", node.name()])?
                .filter(|n| condition(n, "Ready").as_deref() == Some("True")))
        },
    )
    .with_context(|| format!("agent log:\n{}", log_tail(&agent_log)))?;

    // The node's own credentials: a client certificate, private to root.
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(&node_kubeconfig)?.permissions().mode();
    ensure!(mode & 0o777 == 0o600, "node kubeconfig mode {mode:o}");
    let text = std::fs::read_to_string(&node_kubeconfig)?;
    ensure!(
        text.contains("client-certificate-data") && !text.contains(&token),
        "node kubeconfig:\n{text}"
    );

    // The CSR: requested by the token, approved and issued.
    let csrs = get_json(&cp, &["csr"])?.context("no CSR list")?;
    let csr = csrs["items"]
        .as_array()
        .and_then(|i| i.first())
        .context("no CSR")?
        .clone();
    let csr_name = csr["metadata"]["name"]
        .as_str()
        .context("CSR name")?
        .to_owned();
    ensure!(
        csr["spec"]["username"] == format!("system:bootstrap:{id}")
            && csr["spec"]["signerName"] == "kubernetes.io/kube-apiserver-client-kubelet"
            && condition(&csr, "Approved").as_deref() == Some("True")
            && csr["status"]["certificate"]
                .as_str()
                .is_some_and(|c| !c.is_empty()),
        "CSR: {csr:#}"
    );
    let table = cp.kubectl(&["get", "csr"])?;
    ensure!(table.contains("Approved,Issued"), "{table}");

    // The token reads its own CSR; another token does not.
    allowed(&cp, &bootstrap, &["get", "csr", &csr_name])?;
    let other = cp.dir().join("other.kubeconfig");
    create_token(&cp, "10m", &other)?;
    refused(&cp, &other, &["get", "csr", &csr_name], "Forbidden")?;
    refused(&cp, &bootstrap, &["delete", "csr", &csr_name], "Forbidden")?;

    // The node runs a pod.
    cp.apply(&format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: joined, namespace: default}}\nspec:\n  \
         nodeName: {}\n  containers:\n  - name: c\n    image: {IMAGE}\n    command: [sleep, '3600']\n",
        node.name()
    ))?;
    wait_for(
        "the pod on the joined node to run",
        Duration::from_secs(60),
        || {
            Ok(get_json(&cp, &["pod", "joined"])?
                .filter(|p| p.pointer("/status/phase").and_then(Value::as_str) == Some("Running")))
        },
    )
    .with_context(|| format!("agent log:\n{}", log_tail(&agent_log)))?;
    cp.kubectl(&[
        "delete",
        "pod",
        "joined",
        "--grace-period=1",
        "--wait=false",
    ])?;
    Ok(())
}

#[test]
fn expired_and_deleted_tokens_are_refused_and_expired_ones_cleaned_up() -> Result<()> {
    require_root()?;
    let cp = ControlPlane::start()?;
    let short = cp.dir().join("short.kubeconfig");
    let short_token = create_token(&cp, "2s", &short)?;
    let deleted = cp.dir().join("deleted.kubeconfig");
    let deleted_token = create_token(&cp, "10m", &deleted)?;

    allowed(&cp, &deleted, &["get", "--raw", "/apis"])?;
    let out = keelson(&cp, &["token", "delete", &deleted_token[..6]])?;
    ensure!(out.contains("deleted"), "{out}");
    refused(&cp, &deleted, &["get", "--raw", "/apis"], "Unauthorized")?;

    std::thread::sleep(Duration::from_secs(3));
    refused(&cp, &short, &["get", "--raw", "/apis"], "Unauthorized")?;
    let secret = format!("bootstrap-token-{}", &short_token[..6]);
    wait_for(
        "the token cleaner to delete the expired token",
        Duration::from_secs(45),
        || {
            Ok(get_json(&cp, &["secret", "-n", "kube-system", &secret])?
                .is_none()
                .then_some(()))
        },
    )?;
    Ok(())
}

#[test]
fn machines_work_with_kubectl() -> Result<()> {
    require_root()?;
    let cp = ControlPlane::start()?;
    let resources = cp.kubectl(&["api-resources", "--api-group=provisioning.keelson.dev"])?;
    ensure!(
        resources.contains("machines") && resources.contains("mach") && resources.contains("false"),
        "{resources}"
    );
    cp.apply(
        "apiVersion: provisioning.keelson.dev/v1\nkind: Machine\nmetadata:\n  name: rack1-1\n\
         spec:\n  macs: ['52:54:00:12:34:56']\n  smbiosUUID: 4c4c4544-0042-3510-8051-b2c04f4c4e31\n  \
         profile: worker\n  hostname: rack1-1\n  ip: 192.0.2.10\n",
    )?;
    let table = cp.kubectl(&["get", "machines"])?;
    let header: Vec<&str> = table
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    ensure!(
        header == ["NAME", "MAC", "PROFILE", "STATE", "NODE", "AGE"],
        "{table}"
    );
    ensure!(
        table.contains("rack1-1")
            && table.contains("52:54:00:12:34:56")
            && table.contains("worker"),
        "{table}"
    );
    cp.kubectl(&[
        "patch",
        "machine",
        "rack1-1",
        "--subresource=status",
        "--type=merge",
        "-p",
        r#"{"status":{"state":"Joined","nodeName":"rack1-1"}}"#,
    ])?;
    let m = get_json(&cp, &["mach", "rack1-1"])?.context("machine gone")?;
    ensure!(
        m["status"]["state"] == "Joined"
            && m["spec"]["smbiosUUID"] == "4c4c4544-0042-3510-8051-b2c04f4c4e31",
        "{m:#}"
    );
    // Re-applying the manifest keeps the status (a status subresource).
    cp.apply(
        "apiVersion: provisioning.keelson.dev/v1\nkind: Machine\nmetadata:\n  name: rack1-1\n\
         spec:\n  macs: ['52:54:00:12:34:56']\n  profile: worker\n  hostname: rack1-1\n",
    )?;
    let table = cp.kubectl(&["get", "machines"])?;
    ensure!(table.contains("Joined"), "{table}");
    let explain = cp.kubectl(&["explain", "machine.spec"])?;
    ensure!(
        explain.contains("macs") && explain.contains("hostname"),
        "{explain}"
    );
    let describe = cp.kubectl(&["describe", "machine", "rack1-1"])?;
    ensure!(describe.contains("52:54:00:12:34:56"), "{describe}");
    Ok(())
}

/// A veth pair between the provisioner's namespace (`192.0.2.1/24`) and a client
/// namespace whose end has `mac` (and `192.0.2.2/24`); both ends go away with the
/// namespaces.
fn lab(server: &Netns, client: &Netns, mac: &str) -> Result<String> {
    let tag = std::process::id() % 100_000;
    let (s_if, c_if) = (format!("ktj{tag}s"), format!("ktj{tag}c"));
    let ip = |ns: &Netns, args: &[&str]| -> Result<()> {
        let mut cmd = Command::new("ip");
        cmd.args(args);
        let _fds = place(&mut cmd, ns, None)?;
        run_ok(&mut cmd).map(drop)
    };
    ip(
        server,
        &["link", "add", &s_if, "type", "veth", "peer", "name", &c_if],
    )?;
    // `ip link set … netns` takes a PID: a placeholder process in the client namespace.
    let mut holder = Command::new("sleep");
    holder.arg("60");
    let fds = place(&mut holder, client, None)?;
    let holder = Kill(holder.spawn().context("starting sleep")?);
    drop(fds);
    ip(
        server,
        &["link", "set", &c_if, "netns", &holder.0.id().to_string()],
    )?;
    drop(holder);
    ip(server, &["addr", "add", "192.0.2.1/24", "dev", &s_if])?;
    ip(server, &["link", "set", &s_if, "up"])?;
    ip(client, &["link", "set", &c_if, "address", mac])?;
    // dhclient runs with `-sf /bin/true` and configures nothing: HTTP needs an address.
    ip(client, &["addr", "add", "192.0.2.2/24", "dev", &c_if])?;
    ip(client, &["link", "set", &c_if, "up"])?;
    Ok(format!("{s_if} {c_if}"))
}

/// `dhclient` once on `iface` in `ns` with config `conf`, configuring nothing (`-sf
/// /bin/true`); its lease file is `<dir>/<name>.leases`. Killed on drop.
fn start_dhclient(ns: &Netns, iface: &str, conf: &Path, dir: &Path, name: &str) -> Result<Kill> {
    let mut dh = Command::new("dhclient");
    dh.args(["-d", "-1", "-sf", "/bin/true", "-cf"])
        .arg(conf)
        .arg("-lf")
        .arg(dir.join(format!("{name}.leases")))
        .arg("-pf")
        .arg(dir.join(format!("{name}.pid")))
        .arg(iface)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let fds = place(&mut dh, ns, None)?;
    let child = Kill(dh.spawn().context("starting dhclient")?);
    drop(fds);
    Ok(child)
}

fn require_tools(tools: &[(&str, &str)]) -> Result<()> {
    for (tool, package) in tools {
        let found = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
            .unwrap_or(false);
        ensure!(
            found,
            "{tool} is missing: install the Debian package `{package}`"
        );
    }
    for f in ["undionly.kpxe", "ipxe.efi"] {
        ensure!(
            Path::new("/usr/lib/ipxe").join(f).is_file(),
            "/usr/lib/ipxe/{f} is missing: install the Debian package `ipxe`"
        );
    }
    Ok(())
}

#[test]
fn provisioner_in_api_mode_records_unknown_macs_and_hands_out_join_tokens() -> Result<()> {
    require_root()?;
    require_tools(&[
        ("dhclient", "isc-dhcp-client"),
        ("curl", "curl"),
        ("ip", "iproute2"),
    ])?;
    let cp = ControlPlane::start()?;
    let server_ns = Netns::new()?;
    let client_ns = Netns::new()?;
    let _relay = ApiRelay::start(&server_ns, &cp)?;
    const MAC: &str = "52:54:00:ab:cd:ef";
    const MACHINE: &str = "mac-525400abcdef";
    let ifaces = lab(&server_ns, &client_ns, MAC)?;
    let (s_if, c_if) = ifaces.split_once(' ').context("interfaces")?;

    let dir = tempfile::tempdir()?;
    let profiles = dir.path().join("profiles.toml");
    std::fs::write(
        &profiles,
        "default_profile = \"worker\"\n\n[dhcp]\npool_start = \"192.0.2.100\"\n\
         pool_end = \"192.0.2.150\"\nprefix_len = 24\n\n[profiles.worker]\nkernel = \"vmlinuz\"\n\
         user_data = { packages = [\"curl\"] }\n",
    )?;
    let log_path = cp.dir().join("provisioner.log");
    let log = std::fs::File::create(&log_path)?;
    let mut cmd = Command::new(workspace_bin("keelson-provisioner")?);
    cmd.args(["serve", "--inventory", "api", "--profiles"])
        .arg(&profiles)
        .arg("--kubeconfig")
        .arg(cp.kubeconfig())
        .args([
            "--interface",
            s_if,
            "--listen",
            "192.0.2.1",
            "--http-port",
            "8080",
        ])
        .arg("--lease-file")
        .arg(dir.path().join("leases.json"))
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    let fds = place(&mut cmd, &server_ns, None)?;
    let _provisioner = Kill(cmd.spawn().context("starting keelson-provisioner")?);
    drop(fds);

    // An unknown client asks for an address.
    let conf = dir.path().join("dhclient.conf");
    std::fs::write(&conf, "timeout 20;\n")?;
    let dhclient = start_dhclient(&client_ns, c_if, &conf, dir.path(), "client")?;
    let machine = wait_for("the Discovered machine", Duration::from_secs(40), || {
        Ok(get_json(&cp, &["machine", MACHINE])?.filter(|m| m["status"]["state"] == "Discovered"))
    })
    .with_context(|| format!("provisioner log:\n{}", log_tail(&log_path)))?;
    drop(dhclient);
    ensure!(
        machine["spec"]["macs"][0] == MAC
            && machine["spec"]["profile"] == "worker"
            && machine["spec"]["hostname"] == MACHINE
            && machine["status"]["lastSeen"].is_string(),
        "{machine:#}"
    );

    // Its user-data carries a fresh join token for it.
    let url = format!("http://192.0.2.1:8080/nocloud/{MACHINE}/user-data");
    let user_data = wait_for("the machine's user-data", Duration::from_secs(20), || {
        let mut curl = Command::new("curl");
        curl.args(["-sf", "--max-time", "5", &url]);
        let _fds = place(&mut curl, &client_ns, None)?;
        let out = curl.output()?;
        Ok(out
            .status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned()))
    })
    .with_context(|| format!("provisioner log:\n{}", log_tail(&log_path)))?;
    for want in [
        "#cloud-config",
        &format!("hostname: {MACHINE}"),
        "/etc/keelson/bootstrap-kubeconfig",
        &format!(
            "--node-name {MACHINE} --bootstrap-kubeconfig /etc/keelson/bootstrap-kubeconfig \
             --kubeconfig /var/lib/keelson/kubeconfig"
        ),
        "certificate-authority-data",
        "curl",
    ] {
        ensure!(
            user_data.contains(want),
            "user-data lacks {want:?}:\n{user_data}"
        );
    }
    let token = user_data
        .lines()
        .find_map(|l| l.trim().strip_prefix("token: "))
        .context("no token in the user-data")?
        .trim()
        .to_owned();
    let list = keelson(&cp, &["token", "list"])?;
    ensure!(list.contains(&token[..6]), "{token} not in\n{list}");
    wait_for(
        "the machine to be Provisioning",
        Duration::from_secs(20),
        || {
            Ok(get_json(&cp, &["machine", MACHINE])?
                .filter(|m| m["status"]["state"] == "Provisioning"))
        },
    )?;

    // Its Node turns Ready: Joined.
    cp.apply(&format!(
        "apiVersion: v1\nkind: Node\nmetadata: {{name: {MACHINE}}}\n"
    ))?;
    cp.kubectl(&[
        "patch",
        "node",
        MACHINE,
        "--subresource=status",
        "--type=merge",
        "-p",
        r#"{"status":{"conditions":[{"type":"Ready","status":"True","reason":"KubeletReady"}]}}"#,
    ])?;
    let joined = wait_for("the machine to be Joined", Duration::from_secs(20), || {
        Ok(get_json(&cp, &["machine", MACHINE])?.filter(|m| m["status"]["state"] == "Joined"))
    })
    .with_context(|| format!("provisioner log:\n{}", log_tail(&log_path)))?;
    ensure!(joined["status"]["nodeName"] == MACHINE, "{joined:#}");

    // A machine known only by its SMBIOS UUID: a DHCP client sending that UUID (option 97)
    // from a MAC nobody knows gets the machine's reserved address, and the Machine gets the
    // MAC added instead of a new Discovered machine being made.
    const UUID: &str = "6b5e1f2a-9c3d-4e7f-8a1b-2c3d4e5f6a7b";
    const MAC2: &str = "52:54:00:ab:cd:02";
    cp.apply(&format!(
        "apiVersion: provisioning.keelson.dev/v1\nkind: Machine\nmetadata:\n  name: blade-1\n\
         spec:\n  smbiosUUID: {UUID}\n  profile: worker\n  hostname: blade-1\n  ip: 192.0.2.140\n"
    ))?;
    let mut set_mac = Command::new("ip");
    set_mac.args(["link", "set", c_if, "address", MAC2]);
    let fds = place(&mut set_mac, &client_ns, None)?;
    run_ok(&mut set_mac)?;
    drop(fds);
    let option_97: Vec<String> =
        std::iter::once(0u8)
            .chain(UUID.replace('-', "").as_bytes().chunks(2).map(|h| {
                u8::from_str_radix(std::str::from_utf8(h).unwrap_or("zz"), 16).unwrap_or(0)
            }))
            .map(|b| format!("{b:02x}"))
            .collect();
    std::fs::write(
        &conf,
        format!(
            "option keelson-uuid code 97 = string;\nsend keelson-uuid {};\ntimeout 20;\n",
            option_97.join(":")
        ),
    )?;
    let leases = dir.path().join("client2.leases");
    let dhclient = start_dhclient(&client_ns, c_if, &conf, dir.path(), "client2")?;
    wait_for("the UUID machine's lease", Duration::from_secs(40), || {
        Ok(std::fs::read_to_string(&leases)
            .unwrap_or_default()
            .contains("fixed-address 192.0.2.140;")
            .then_some(()))
    })
    .with_context(|| format!("provisioner log:\n{}", log_tail(&log_path)))?;
    drop(dhclient);
    let blade = wait_for(
        "the MAC recorded on blade-1",
        Duration::from_secs(20),
        || {
            Ok(get_json(&cp, &["machine", "blade-1"])?.filter(|m| {
                m["spec"]["macs"]
                    .as_array()
                    .is_some_and(|a| a.iter().any(|x| x == MAC2))
            }))
        },
    )
    .with_context(|| format!("provisioner log:\n{}", log_tail(&log_path)))?;
    ensure!(blade["spec"]["smbiosUUID"] == UUID, "{blade:#}");
    ensure!(
        get_json(&cp, &["machine", "mac-525400abcd02"])?.is_none(),
        "a Discovered machine was made for a MAC matched by UUID"
    );
    Ok(())
}
