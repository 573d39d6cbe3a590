//! Real `kubectl` (1.33 and 1.27, as installed on these machines) against the API server over
//! an in-memory store, on loopback.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::Arc,
    time::Duration,
};

use keelson_apiserver::{
    Config,
    pki::{self, ClusterCa},
    server::{self, ServeOptions},
    storage::memory::MemoryStore,
};

/// An API server on 127.0.0.1 with a kubeconfig for it; stopped on drop.
struct Server {
    dir: tempfile::TempDir,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    /// Starts the server with a fresh cluster CA; writes kubeconfigs for the admin (client
    /// certificate), node `n1` (client certificate) and user `dev` (bearer token).
    fn start() -> Server {
        let dir = tempfile::tempdir().expect("tempdir");
        let tokens = dir.path().join("tokens.csv");
        std::fs::write(&tokens, format!("{DEV_TOKEN},dev,1001,\"developers\"\n")).unwrap();
        let opts = ServeOptions {
            listen: "127.0.0.1:0".parse().unwrap(),
            pki_dir: dir.path().join("pki"),
            extra_sans: vec![],
            admin_kubeconfig: dir.path().join("kubeconfig"),
            token_file: Some(tokens),
            config: Config {
                bookmark_interval: Duration::from_millis(200),
                ..Config::default()
            },
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
            rt.block_on(async move {
                server::run(Arc::new(MemoryStore::default()), opts, async {
                    let _ = stopped.await;
                })
                .await
                .expect("serve");
            });
        });
        // The server writes the admin kubeconfig once it listens.
        let kubeconfig = dir.path().join("kubeconfig");
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !kubeconfig.exists() {
            assert!(
                std::time::Instant::now() < deadline,
                "the server did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let text = std::fs::read_to_string(&kubeconfig).unwrap();
        let server = text
            .lines()
            .find_map(|l| l.trim().strip_prefix("server: "))
            .expect("server in kubeconfig")
            .to_owned();
        let ca = ClusterCa::load_or_create(&dir.path().join("pki")).expect("CA");
        let node = ca
            .issue_client("system:node:n1", &["system:nodes"])
            .expect("node cert");
        std::fs::write(
            dir.path().join("node.kubeconfig"),
            pki::kubeconfig(&server, ca.cert_pem(), &node, "n1"),
        )
        .unwrap();
        std::fs::write(dir.path().join("ca.crt"), ca.cert_pem()).unwrap();
        std::fs::write(dir.path().join("server"), &server).unwrap();
        Server {
            dir,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// An anonymous HTTPS GET (trusting the cluster CA): status code and body.
    fn raw_get(&self, path: &str) -> (u16, String) {
        use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject as _};
        use std::io::{Read as _, Write as _};
        let server = std::fs::read_to_string(self.dir.path().join("server")).unwrap();
        let addr = server.trim_start_matches("https://").to_owned();
        let mut roots = rustls::RootCertStore::empty();
        let ca = std::fs::read(self.dir.path().join("ca.crt")).unwrap();
        for c in CertificateDer::pem_slice_iter(&ca) {
            roots.add(c.unwrap()).unwrap();
        }
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        let conn = rustls::ClientConnection::new(
            Arc::new(config),
            ServerName::try_from("127.0.0.1").unwrap(),
        )
        .unwrap();
        let tcp = std::net::TcpStream::connect(&addr).unwrap();
        let mut tls = rustls::StreamOwned::new(conn, tcp);
        write!(
            tls,
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut resp = Vec::new();
        let _ = tls.read_to_end(&mut resp);
        let resp = String::from_utf8_lossy(&resp).into_owned();
        let code = resp
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = resp
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        // The body may be chunked: keep the JSON or text payload line.
        let body = body
            .lines()
            .find(|l| l.starts_with('{') || *l == "ok")
            .unwrap_or(&body)
            .to_owned();
        (code, body)
    }

    /// kubectl arguments that connect as someone else than the admin.
    fn as_user(&self, who: &str) -> Vec<String> {
        let p = |f: &str| self.dir.path().join(f).to_string_lossy().into_owned();
        let server = std::fs::read_to_string(self.dir.path().join("server")).unwrap();
        match who {
            "node" => vec!["--kubeconfig".into(), p("node.kubeconfig")],
            "dev" => vec![
                "--server".into(),
                server,
                "--certificate-authority".into(),
                p("ca.crt"),
                "--token".into(),
                DEV_TOKEN.into(),
            ],
            "bad-token" => vec![
                "--server".into(),
                server,
                "--certificate-authority".into(),
                p("ca.crt"),
                "--token".into(),
                "wrong".into(),
            ],
            other => panic!("unknown user {other}"),
        }
    }

    fn kubeconfig(&self) -> PathBuf {
        self.dir.path().join("kubeconfig")
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::write(&p, text).expect("write file");
        p
    }

    fn command(&self, version: &str, args: &[&str]) -> Command {
        let bin = kubectl_path(version);
        let mut cmd = Command::new(bin);
        // Explicit credentials (`--server`, `--kubeconfig`) replace the admin kubeconfig.
        if !args
            .iter()
            .any(|a| *a == "--kubeconfig" || *a == "--server")
        {
            cmd.arg("--kubeconfig").arg(self.kubeconfig());
        } else {
            // An empty kubeconfig so that nothing of the admin's leaks in.
            cmd.env("KUBECONFIG", self.dir.path().join("none"));
        }
        cmd.args(args).stdin(Stdio::null());
        // kubectl caches discovery in $HOME; keep each test's cache to itself.
        cmd.env("HOME", self.dir.path());
        cmd
    }

    fn run(&self, version: &str, args: &[&str]) -> Output {
        self.command(version, args)
            .output()
            .expect("running kubectl")
    }

    /// Runs kubectl and returns stdout, failing the test with stderr if it failed.
    fn ok(&self, version: &str, args: &[&str]) -> String {
        let out = self.run(version, args);
        assert!(
            out.status.success(),
            "kubectl {args:?} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs kubectl expecting failure; returns stderr.
    fn fails(&self, version: &str, args: &[&str]) -> String {
        let out = self.run(version, args);
        assert!(!out.status.success(), "kubectl {args:?} should have failed");
        String::from_utf8_lossy(&out.stderr).into_owned()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn kubectl_path(version: &str) -> PathBuf {
    let p = Path::new("/usr/lib/google-cloud-sdk/bin").join(format!("kubectl.{version}"));
    assert!(
        p.is_file(),
        "{} is missing: these tests drive the kubectl releases installed on the project's machines",
        p.display()
    );
    p
}

const DEV_TOKEN: &str = "dev-token-0123456789";

const MANIFEST: &str = r#"apiVersion: v1
kind: Namespace
metadata:
  name: shop
---
apiVersion: v1
kind: ConfigMap
metadata:
  name: web-config
  namespace: shop
data:
  greeting: hello
---
apiVersion: v1
kind: Secret
metadata:
  name: web-secret
  namespace: shop
stringData:
  password: s3cret
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  namespace: shop
  labels: {app: web}
spec:
  replicas: 2
  selector:
    matchLabels: {app: web}
  template:
    metadata:
      labels: {app: web}
    spec:
      containers:
      - name: web
        image: busybox:1.36
        ports:
        - containerPort: 8080
---
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: shop
spec:
  selector: {app: web}
  ports:
  - port: 80
    targetPort: 8080
"#;

#[test]
fn kubectl_applies_and_reapplies_a_multi_document_manifest() {
    let s = Server::start();
    let manifest = s.write("app.yaml", MANIFEST);
    let m = manifest.to_str().unwrap();

    let out = s.ok("1.33", &["apply", "-f", m]);
    for line in [
        "namespace/shop created",
        "configmap/web-config created",
        "secret/web-secret created",
        "deployment.apps/web created",
        "service/web created",
    ] {
        assert!(out.contains(line), "missing {line:?} in:\n{out}");
    }
    let secret_rv = s.ok(
        "1.33",
        &[
            "-n",
            "shop",
            "get",
            "secret",
            "web-secret",
            "-o",
            "jsonpath={.metadata.resourceVersion}",
        ],
    );
    let out = s.ok("1.33", &["apply", "-f", m]);
    // kubectl re-sends `stringData` (the live object only has `data`), so it reports the
    // Secret as configured; the server sees nothing changed and writes nothing.
    assert_eq!(out.matches("unchanged").count(), 4, "{out}");
    assert!(out.contains("secret/web-secret configured"), "{out}");
    let rv = s.ok(
        "1.33",
        &[
            "-n",
            "shop",
            "get",
            "secret",
            "web-secret",
            "-o",
            "jsonpath={.metadata.resourceVersion}",
        ],
    );
    assert_eq!(rv, secret_rv, "a no-op update must not write");

    // A change is applied as a patch; what the manifest does not mention is kept.
    s.ok(
        "1.33",
        &["-n", "shop", "label", "deploy", "web", "team=blue"],
    );
    let changed = s.write("app2.yaml", &MANIFEST.replace("replicas: 2", "replicas: 3"));
    let out = s.ok("1.33", &["apply", "-f", changed.to_str().unwrap()]);
    assert!(out.contains("deployment.apps/web configured"), "{out}");
    let got = s.ok(
        "1.33",
        &[
            "-n",
            "shop",
            "get",
            "deploy",
            "web",
            "-o",
            "jsonpath={.spec.replicas} {.metadata.labels.team} {.metadata.generation}",
        ],
    );
    assert_eq!(got, "3 blue 2");

    // Tables with the familiar columns, and the server's own defaults and allocations.
    let out = s.ok("1.33", &["-n", "shop", "get", "svc", "web"]);
    let header: Vec<&str> = out.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        [
            "NAME",
            "TYPE",
            "CLUSTER-IP",
            "EXTERNAL-IP",
            "PORT(S)",
            "AGE"
        ]
    );
    let ip = s.ok(
        "1.33",
        &[
            "-n",
            "shop",
            "get",
            "svc",
            "web",
            "-o",
            "jsonpath={.spec.clusterIP}",
        ],
    );
    let ip: std::net::Ipv4Addr = ip.parse().expect("a cluster IP");
    assert_eq!(ip.octets()[0], 10);
    let out = s.ok("1.33", &["-n", "shop", "get", "deploy", "-o", "wide"]);
    assert!(out.starts_with("NAME"), "{out}");
    assert!(out.contains("UP-TO-DATE"), "{out}");
    let described = s.ok("1.33", &["-n", "shop", "describe", "deploy", "web"]);
    for line in [
        "Name:",
        "Selector:",
        "app=web",
        "StrategyType:",
        "RollingUpdate",
        "busybox:1.36",
    ] {
        assert!(
            described.contains(line),
            "{line} missing from:\n{described}"
        );
    }
    let described = s.ok("1.33", &["-n", "shop", "describe", "svc", "web"]);
    assert!(
        described.contains("TargetPort:") && described.contains("8080/TCP"),
        "{described}"
    );
    let secret = s.ok(
        "1.33",
        &[
            "-n",
            "shop",
            "get",
            "secret",
            "web-secret",
            "-o",
            "jsonpath={.data.password}",
        ],
    );
    assert_eq!(
        secret, "czNjcmV0",
        "stringData is stored base64-encoded under data"
    );
    let yaml = s.ok(
        "1.33",
        &["-n", "shop", "get", "cm", "web-config", "-o", "yaml"],
    );
    assert!(
        yaml.contains("resourceVersion:") && yaml.contains("uid:"),
        "{yaml}"
    );

    // Deleting the namespace takes everything in it along.
    s.ok("1.33", &["delete", "ns", "shop"]);
    let err = s.fails("1.33", &["-n", "shop", "get", "cm", "web-config"]);
    assert!(err.contains("NotFound"), "{err}");
}

#[test]
fn kubectl_edits_scales_patches_and_watches() {
    let s = Server::start();
    let manifest = s.write("app.yaml", MANIFEST);
    s.ok("1.33", &["apply", "-f", manifest.to_str().unwrap()]);
    let d = ["-n", "shop"];
    let k = |args: &[&str]| s.ok("1.33", &[&d[..], args].concat());

    let mut watch: Child = s
        .command(
            "1.33",
            &["-n", "shop", "get", "cm", "-w", "--output-watch-events"],
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("kubectl get -w");
    std::thread::sleep(Duration::from_millis(1500));

    k(&["annotate", "deploy", "web", "note=hi"]);
    k(&["scale", "deploy", "web", "--replicas=4"]);
    assert_eq!(
        k(&["get", "deploy", "web", "-o", "jsonpath={.spec.replicas}"]),
        "4"
    );
    k(&[
        "patch",
        "deploy",
        "web",
        "--type=merge",
        "-p",
        r#"{"spec":{"replicas":5}}"#,
    ]);
    k(&[
        "patch",
        "deploy",
        "web",
        "--type=json",
        "-p",
        r#"[{"op":"replace","path":"/spec/replicas","value":6}]"#,
    ]);
    k(&[
        "patch",
        "deploy",
        "web",
        "-p",
        r#"{"spec":{"template":{"spec":{"containers":[{"name":"web","image":"busybox:1.37"}]}}}}"#,
    ]);
    let got = k(&[
        "get",
        "deploy",
        "web",
        "-o",
        "jsonpath={.spec.replicas} {.spec.template.spec.containers[0].image} {.spec.template.spec.containers[0].ports[0].containerPort} {.metadata.annotations.note}",
    ]);
    assert_eq!(
        got, "6 busybox:1.37 8080 hi",
        "strategic merge keeps the container's other fields"
    );

    let extra = s.write(
        "cm.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: extra, namespace: shop}\ndata: {a: b}\n",
    );
    k(&["create", "-f", extra.to_str().unwrap()]);
    k(&["label", "cm", "extra", "x=y"]);
    k(&["delete", "cm", "extra"]);
    std::thread::sleep(Duration::from_millis(1500));
    let _ = watch.kill();
    let out = watch.wait_with_output().expect("watch output");
    let events = String::from_utf8_lossy(&out.stdout);
    // EVENT and NAME columns of each row after the header.
    let lines: Vec<String> = events
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().take(2).collect::<Vec<_>>().join(" "))
        .collect();
    assert_eq!(
        lines,
        [
            "ADDED web-config",
            "ADDED extra",
            "MODIFIED extra",
            "DELETED extra",
        ],
        "watch events:\n{events}"
    );
    let out = k(&["get", "deploy", "-l", "app in (web,api)", "-o", "name"]);
    assert_eq!(out.trim(), "deployment.apps/web");
    let out = k(&["get", "deploy", "-l", "app=nope", "-o", "name"]);
    assert_eq!(out.trim(), "");
}

#[test]
fn kubectl_sees_kubernetes_errors() {
    let s = Server::start();
    let err = s.fails("1.33", &["get", "pod", "nope"]);
    assert!(
        err.contains(r#"Error from server (NotFound): pods "nope" not found"#),
        "{err}"
    );

    let bad = s.write(
        "bad.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: Bad_Name}\n",
    );
    let err = s.fails("1.33", &["apply", "-f", bad.to_str().unwrap()]);
    assert!(
        err.contains(
            r#"ConfigMap "Bad_Name" is invalid: metadata.name: Invalid value: "Bad_Name""#
        ),
        "{err}"
    );

    let unknown = s.write(
        "unknown.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: ok}\nbogus: 1\n",
    );
    let err = s.fails("1.33", &["apply", "-f", unknown.to_str().unwrap()]);
    assert!(err.contains(r#"unknown field "bogus""#), "{err}");
    // With validation relaxed the field is dropped with a warning, and the object stored.
    let out = s
        .command(
            "1.33",
            &["apply", "--validate=warn", "-f", unknown.to_str().unwrap()],
        )
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("unknown field"),
        "a warning is shown"
    );

    let malformed = s.write(
        "malformed.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata: [\n",
    );
    let err = s.fails("1.33", &["apply", "-f", malformed.to_str().unwrap()]);
    assert!(err.contains("error"), "{err}");

    let missing = s.write(
        "pod.yaml",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {containers: []}\n",
    );
    let err = s.fails("1.33", &["apply", "-f", missing.to_str().unwrap()]);
    assert!(err.contains("spec.containers: Required value"), "{err}");

    // A write against a stale resourceVersion is a conflict.
    s.ok(
        "1.33",
        &[
            "create",
            "-f",
            s.write(
                "cm.yaml",
                "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\ndata: {v: '1'}\n",
            )
            .to_str()
            .unwrap(),
        ],
    );
    let old = s.ok("1.33", &["get", "cm", "c", "-o", "json"]);
    s.ok(
        "1.33",
        &[
            "patch",
            "cm",
            "c",
            "--type=merge",
            "-p",
            r#"{"data":{"v":"2"}}"#,
        ],
    );
    let stale = s.write("stale.json", &old.replace("\"v\": \"1\"", "\"v\": \"3\""));
    let err = s.fails("1.33", &["replace", "-f", stale.to_str().unwrap()]);
    assert!(err.contains("the object has been modified"), "{err}");
    assert_eq!(
        s.ok("1.33", &["get", "cm", "c", "-o", "jsonpath={.data.v}"]),
        "2",
        "nothing stored was lost"
    );

    let err = s.fails(
        "1.33",
        &[
            "create",
            "-f",
            s.write(
                "dup.yaml",
                "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\n",
            )
            .to_str()
            .unwrap(),
        ],
    );
    assert!(err.contains(r#"configmaps "c" already exists"#), "{err}");
    let err = s.fails(
        "1.33",
        &[
            "-n",
            "missing",
            "create",
            "-f",
            s.write(
                "ns.yaml",
                "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n",
            )
            .to_str()
            .unwrap(),
        ],
    );
    assert!(err.contains(r#"namespaces "missing" not found"#), "{err}");
}

#[test]
fn kubectl_discovery_explain_and_old_clients() {
    let s = Server::start();
    let version = s.ok("1.33", &["version", "-o", "json"]);
    assert!(version.contains("keelson"), "{version}");
    let resources = s.ok("1.33", &["api-resources", "-o", "name"]);
    for r in [
        "pods",
        "deployments.apps",
        "endpointslices.discovery.k8s.io",
        "leases.coordination.k8s.io",
        "jobs.batch",
    ] {
        assert!(
            resources.lines().any(|l| l == r),
            "{r} not in:\n{resources}"
        );
    }
    let explain = s.ok("1.33", &["explain", "deployment.spec.replicas"]);
    assert!(
        explain.contains("replicas") && explain.contains("integer"),
        "{explain}"
    );

    // kubectl 1.27 reads OpenAPI v2 (protobuf): it finds `fieldValidation` on PATCH and
    // leaves strict validation to the server, and explains from the v2 schemas.
    let unknown = s.write(
        "unknown.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: ok}\nbogus: 1\n",
    );
    let err = s.fails("1.27", &["apply", "-f", unknown.to_str().unwrap()]);
    assert!(err.contains(r#"unknown field "bogus""#), "{err}");
    let explain = s.ok(
        "1.27",
        &["explain", "deployment.spec.template.spec.containers.image"],
    );
    assert!(
        explain.contains("FIELD: image <string>") || explain.contains("FIELD:    image <string>"),
        "{explain}"
    );
    let manifest = s.write("app.yaml", MANIFEST);
    let out = s.ok("1.27", &["apply", "-f", manifest.to_str().unwrap()]);
    assert_eq!(out.matches("created").count(), 5, "{out}");
    let out = s.ok(
        "1.27",
        &[
            "-n",
            "shop",
            "get",
            "deploy",
            "web",
            "-o",
            "jsonpath={.spec.replicas}",
        ],
    );
    assert_eq!(out, "2");
    s.ok(
        "1.27",
        &["-n", "shop", "scale", "deploy", "web", "--replicas=1"],
    );
    // The namespace goes first and takes the rest with it, as in Kubernetes.
    s.ok(
        "1.27",
        &[
            "delete",
            "--ignore-not-found",
            "-f",
            manifest.to_str().unwrap(),
        ],
    );
    let names = s.ok("1.27", &["get", "ns", "-o", "name"]);
    assert!(!names.contains("namespace/shop"), "{names}");
    assert!(names.contains("namespace/kube-system"), "{names}");
}

#[test]
fn kubectl_authenticates_and_authorizes() {
    let s = Server::start();
    fn refs(v: &[String]) -> Vec<&str> {
        v.iter().map(String::as_str).collect()
    }
    let with = |who: &str, args: &[&str]| -> Vec<String> {
        let mut v = s.as_user(who);
        v.extend(args.iter().map(|a| a.to_string()));
        v
    };

    // Anonymous requests and unknown tokens are turned away with a 401 Status; health and
    // version stay public. (kubectl answers a 401 without credentials by prompting for a
    // password, so anonymous calls are made directly.)
    let (code, body) = s.raw_get("/api/v1/namespaces/default/pods");
    assert_eq!(code, 401, "{body}");
    assert!(body.contains(r#""reason":"Unauthorized""#), "{body}");
    assert_eq!(s.raw_get("/healthz"), (200, "ok".to_owned()));
    assert_eq!(s.raw_get("/version").0, 200);
    let err = s.fails("1.33", &refs(&with("bad-token", &["get", "pods"])));
    assert!(err.contains("You must be logged in to the server"), "{err}");

    // A token user is authenticated but may do nothing; the message is Kubernetes'.
    let err = s.fails("1.33", &refs(&with("dev", &["get", "pods"])));
    assert!(
        err.contains(
            r#"User "dev" cannot list resource "pods" in API group "" in the namespace "default""#
        ),
        "{err}"
    );
    // `auth can-i` exits 1 when the answer is no.
    let can = |args: Vec<String>| {
        String::from_utf8_lossy(&s.run("1.33", &refs(&args)).stdout)
            .trim()
            .to_owned()
    };
    assert_eq!(can(with("dev", &["auth", "can-i", "list", "pods"])), "no");
    assert_eq!(
        s.ok("1.33", &["auth", "can-i", "delete", "nodes"]).trim(),
        "yes"
    );

    // A node may read, and change only its own Node.
    let node = |name: &str| format!("apiVersion: v1\nkind: Node\nmetadata: {{name: {name}}}\n");
    let n1 = s.write("n1.yaml", &node("n1"));
    let n2 = s.write("n2.yaml", &node("n2"));
    s.ok(
        "1.33",
        &refs(&with("node", &["create", "-f", n1.to_str().unwrap()])),
    );
    let err = s.fails(
        "1.33",
        &refs(&with("node", &["create", "-f", n2.to_str().unwrap()])),
    );
    assert!(err.contains("forbidden"), "{err}");
    s.ok("1.33", &["create", "-f", n2.to_str().unwrap()]);
    s.ok(
        "1.33",
        &refs(&with("node", &["label", "node", "n1", "zone=a"])),
    );
    let err = s.fails(
        "1.33",
        &refs(&with("node", &["label", "node", "n2", "zone=a"])),
    );
    assert!(
        err.contains(r#"User "system:node:n1" cannot patch resource "nodes""#),
        "{err}"
    );
    let names = s.ok(
        "1.33",
        &refs(&with("node", &["get", "nodes", "-o", "name"])),
    );
    assert_eq!(names.lines().collect::<Vec<_>>(), ["node/n1", "node/n2"]);
    assert_eq!(
        can(with("node", &["auth", "can-i", "update", "nodes/n2"])),
        "no"
    );
    assert_eq!(
        can(with("node", &["auth", "can-i", "update", "nodes/n1"])),
        "yes"
    );
}

#[test]
fn kubectl_server_side_apply_owns_fields_and_reports_conflicts() {
    let s = Server::start();
    let deploy = |replicas: u32, image: &str| {
        format!(
            "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: ssa\n  namespace: default\n  labels: {{app: ssa}}\nspec:\n  replicas: {replicas}\n  selector: {{matchLabels: {{app: ssa}}}}\n  template:\n    metadata: {{labels: {{app: ssa}}}}\n    spec:\n      containers:\n      - name: app\n        image: {image}\n"
        )
    };
    let first = s.write("ssa1.yaml", &deploy(2, "busybox:1"));
    let out = s.ok(
        "1.33",
        &["apply", "--server-side", "-f", first.to_str().unwrap()],
    );
    assert!(
        out.contains("deployment.apps/ssa serverside-applied"),
        "{out}"
    );
    let managers = s.ok(
        "1.33",
        &[
            "get",
            "deploy",
            "ssa",
            "--show-managed-fields",
            "-o",
            "jsonpath={.metadata.managedFields[*].manager}/{.metadata.managedFields[*].operation}",
        ],
    );
    assert_eq!(managers, "kubectl/Apply");

    // Applying the same configuration again changes nothing.
    let rv = |s: &Server| {
        s.ok(
            "1.33",
            &[
                "get",
                "deploy",
                "ssa",
                "-o",
                "jsonpath={.metadata.resourceVersion}",
            ],
        )
    };
    let before = rv(&s);
    s.ok(
        "1.33",
        &["apply", "--server-side", "-f", first.to_str().unwrap()],
    );
    assert_eq!(rv(&s), before, "a no-op apply writes nothing");

    // Another manager takes spec.replicas; applying a different count now conflicts.
    s.ok("1.33", &["scale", "deploy", "ssa", "--replicas=5"]);
    let second = s.write("ssa2.yaml", &deploy(3, "busybox:2"));
    let err = s.fails(
        "1.33",
        &["apply", "--server-side", "-f", second.to_str().unwrap()],
    );
    assert!(
        err.contains("conflict") && err.contains(".spec.replicas"),
        "{err}"
    );
    assert_eq!(
        s.ok(
            "1.33",
            &[
                "get",
                "deploy",
                "ssa",
                "-o",
                "jsonpath={.spec.replicas} {.spec.template.spec.containers[0].image}"
            ]
        ),
        "5 busybox:1",
        "a refused apply changes nothing"
    );
    s.ok(
        "1.33",
        &[
            "apply",
            "--server-side",
            "--force-conflicts",
            "-f",
            second.to_str().unwrap(),
        ],
    );
    assert_eq!(
        s.ok(
            "1.33",
            &[
                "get",
                "deploy",
                "ssa",
                "-o",
                "jsonpath={.spec.replicas} {.spec.template.spec.containers[0].image}"
            ]
        ),
        "3 busybox:2"
    );

    // Server-side apply without a manager is refused, as Kubernetes does.
    let cm = s.write(
        "cm.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c1, namespace: default}\ndata: {a: b}\n",
    );
    s.ok(
        "1.33",
        &[
            "apply",
            "--server-side",
            "--field-manager=tool",
            "-f",
            cm.to_str().unwrap(),
        ],
    );
    let cm2 = s.write(
        "cm2.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c1, namespace: default}\ndata: {c: d}\n",
    );
    s.ok(
        "1.33",
        &[
            "apply",
            "--server-side",
            "--field-manager=tool",
            "-f",
            cm2.to_str().unwrap(),
        ],
    );
    assert_eq!(
        s.ok("1.33", &["get", "cm", "c1", "-o", "jsonpath={.data}"]),
        r#"{"c":"d"}"#,
        "fields the manager no longer applies are removed"
    );
}

#[test]
fn kubectl_create_generators_send_protobuf() {
    let s = Server::start();
    let k = |args: &[&str]| s.ok("1.33", args);
    k(&["create", "namespace", "gen"]);
    let n = ["-n", "gen"];
    let kn = |args: &[&str]| s.ok("1.33", &[&n[..], args].concat());
    kn(&[
        "create",
        "configmap",
        "cfg",
        "--from-literal=a=1",
        "--from-literal=b=two",
    ]);
    assert_eq!(
        kn(&["get", "cm", "cfg", "-o", "jsonpath={.data.a} {.data.b}"]),
        "1 two"
    );
    kn(&[
        "create",
        "secret",
        "generic",
        "sec",
        "--from-literal=password=pw",
    ]);
    assert_eq!(
        kn(&[
            "get",
            "secret",
            "sec",
            "-o",
            "jsonpath={.type} {.data.password}"
        ]),
        "Opaque cHc="
    );
    kn(&[
        "create",
        "deployment",
        "web",
        "--image=busybox:1.36",
        "--replicas=0",
        "--port=8080",
    ]);
    assert_eq!(
        kn(&[
            "get",
            "deploy",
            "web",
            "-o",
            "jsonpath={.spec.replicas} {.spec.selector.matchLabels.app} {.spec.template.spec.containers[0].image} {.spec.template.spec.containers[0].ports[0].containerPort}"
        ]),
        "0 web busybox:1.36 8080"
    );
    kn(&["create", "service", "clusterip", "web", "--tcp=80:8080"]);
    assert_eq!(
        kn(&[
            "get",
            "svc",
            "web",
            "-o",
            "jsonpath={.spec.ports[0].port} {.spec.ports[0].targetPort} {.spec.selector.app}"
        ]),
        "80 8080 web"
    );
    kn(&["create", "serviceaccount", "robot"]);
    kn(&["create", "job", "once", "--image=busybox", "--", "true"]);
    assert_eq!(
        kn(&[
            "get",
            "job",
            "once",
            "-o",
            "jsonpath={.spec.template.spec.containers[0].command}"
        ]),
        r#"["true"]"#
    );
    // A dry run through the same path stores nothing.
    kn(&[
        "create",
        "configmap",
        "dry",
        "--from-literal=x=y",
        "--dry-run=server",
    ]);
    let err = s.fails("1.33", &["-n", "gen", "get", "cm", "dry"]);
    assert!(
        err.contains("NotFound") || err.contains("not found"),
        "{err}"
    );
}

#[test]
fn kubectl_delete_cascade_hands_dependents_to_the_collector() {
    let s = Server::start();
    let cm = |name: &str| {
        s.write(
            &format!("{name}.yaml"),
            &format!("apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: {name}}}\n"),
        )
    };
    for name in ["owner", "lonely"] {
        s.ok("1.33", &["create", "-f", cm(name).to_str().unwrap()]);
    }
    let uid = s.ok(
        "1.33",
        &["get", "cm", "owner", "-o", "jsonpath={.metadata.uid}"],
    );
    let dependent = s.write(
        "dep.yaml",
        &format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: dep\n  ownerReferences:\n  \
             - {{apiVersion: v1, kind: ConfigMap, name: owner, uid: {uid}}}\n"
        ),
    );
    s.ok("1.33", &["create", "-f", dependent.to_str().unwrap()]);

    // With dependents, orphan (and foreground) deletion leave the owner terminating with the
    // finalizer the garbage collector acts on.
    s.ok(
        "1.33",
        &["delete", "cm", "owner", "--cascade=orphan", "--wait=false"],
    );
    let meta = s.ok(
        "1.33",
        &[
            "get",
            "cm",
            "owner",
            "-o",
            "jsonpath={.metadata.finalizers} {.metadata.deletionTimestamp}",
        ],
    );
    assert!(meta.starts_with(r#"["orphan"] 20"#), "{meta}");
    // A second delete switches the propagation.
    s.ok(
        "1.33",
        &[
            "delete",
            "cm",
            "owner",
            "--cascade=foreground",
            "--wait=false",
        ],
    );
    let finalizers = s.ok(
        "1.33",
        &[
            "get",
            "cm",
            "owner",
            "-o",
            "jsonpath={.metadata.finalizers}",
        ],
    );
    assert_eq!(finalizers, r#"["foregroundDeletion"]"#);

    // Nothing depends on this one: it goes at once.
    s.ok("1.33", &["delete", "cm", "lonely", "--cascade=foreground"]);
    let err = s.fails("1.33", &["get", "cm", "lonely"]);
    assert!(err.contains("NotFound"), "{err}");

    let err = s.fails(
        "1.33",
        &[
            "delete",
            "--raw",
            "/api/v1/namespaces/default/configmaps/dep?propagationPolicy=Sideways",
        ],
    );
    assert!(
        err.contains(r#"propagationPolicy: Unsupported value: "Sideways""#),
        "{err}"
    );
    let err = s.fails(
        "1.33",
        &[
            "delete",
            "--raw",
            "/api/v1/namespaces/default/configmaps/dep?propagationPolicy=Orphan&orphanDependents=true",
        ],
    );
    assert!(err.contains("cannot be both set"), "{err}");
    s.ok("1.33", &["get", "cm", "dep"]);

    // A delete that names no policy leaves the finalizers the object carries.
    let held = s.write(
        "held.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: held, finalizers: [orphan]}\n",
    );
    s.ok("1.33", &["create", "-f", held.to_str().unwrap()]);
    s.ok(
        "1.33",
        &[
            "delete",
            "--raw",
            "/api/v1/namespaces/default/configmaps/held",
        ],
    );
    let meta = s.ok(
        "1.33",
        &[
            "get",
            "cm",
            "held",
            "-o",
            "jsonpath={.metadata.finalizers} {.metadata.deletionTimestamp}",
        ],
    );
    assert!(meta.starts_with(r#"["orphan"] 20"#), "{meta}");
}
