//! `keelson-server` as users run it: one store member serving the Kubernetes API, driven by
//! real kubectl; objects survive `kill -9` and a restart from disk; Secrets can be encrypted
//! at rest.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

const KUBECTL: &str = "/usr/lib/google-cloud-sdk/bin/kubectl.1.33";

/// A `keelson-server` process; killed on drop.
struct Member(Child);

impl Member {
    fn start_with(data: &Path, init: bool, extra: &[&str]) -> Member {
        let kubeconfig = data.join("admin.kubeconfig");
        let _ = std::fs::remove_file(&kubeconfig);
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_keelson-server"));
        cmd.args([
            "--id",
            "1",
            "--listen",
            "127.0.0.1:0",
            "--api-listen",
            "127.0.0.1:0",
        ])
        .arg("--data-dir")
        .arg(data)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        if init {
            cmd.arg("--init");
        }
        cmd.args(extra);
        let member = Member(cmd.spawn().expect("starting keelson-server"));
        let deadline = Instant::now() + Duration::from_secs(60);
        while !kubeconfig.exists() {
            assert!(
                Instant::now() < deadline,
                "keelson-server did not serve the API"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        member
    }

    fn kill9(mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn kubectl(data: &Path, args: &[&str]) -> String {
    assert!(Path::new(KUBECTL).is_file(), "{KUBECTL} is missing");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = Command::new(KUBECTL)
            .arg("--kubeconfig")
            .arg(data.join("admin.kubeconfig"))
            .args(args)
            .env("HOME", data)
            .stdin(Stdio::null())
            .output()
            .expect("running kubectl");
        if out.status.success() {
            return String::from_utf8_lossy(&out.stdout).into_owned();
        }
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        // Right after a start the listener may not accept yet.
        assert!(
            Instant::now() < deadline && err.contains("connect"),
            "kubectl {args:?} failed:\n{err}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn manifest(dir: &Path) -> PathBuf {
    let p = dir.join("app.yaml");
    std::fs::write(
        &p,
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n---\n\
         apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web, namespace: shop}\n\
         spec:\n  replicas: 2\n  selector: {matchLabels: {app: web}}\n  template:\n    metadata: {labels: {app: web}}\n\
         \x20   spec: {containers: [{name: web, image: busybox}]}\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\n\
         spec: {selector: {app: web}, ports: [{port: 80}]}\n",
    )
    .unwrap();
    p
}

#[test]
fn kubectl_state_survives_kill_9_and_restart() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("member-1");
    let app = manifest(dir.path());

    // Without controllers, nothing else writes between the reads compared below.
    let quiet = ["--no-controllers"];
    let member = Member::start_with(&data, true, &quiet);
    let out = kubectl(&data, &["apply", "-f", app.to_str().unwrap()]);
    assert_eq!(out.matches("created").count(), 3, "{out}");
    kubectl(
        &data,
        &["-n", "shop", "scale", "deploy", "web", "--replicas=5"],
    );
    let before = kubectl(
        &data,
        &[
            "-n",
            "shop",
            "get",
            "deploy,svc",
            "-o",
            "jsonpath={range .items[*]}{.metadata.uid} {.metadata.resourceVersion}{\"\\n\"}{end}",
        ],
    );
    let ip = kubectl(
        &data,
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
    member.kill9();

    let _member = Member::start_with(&data, false, &quiet);
    let after = kubectl(
        &data,
        &[
            "-n",
            "shop",
            "get",
            "deploy,svc",
            "-o",
            "jsonpath={range .items[*]}{.metadata.uid} {.metadata.resourceVersion}{\"\\n\"}{end}",
        ],
    );
    assert_eq!(after, before, "objects, uids and resourceVersions survive");
    assert_eq!(
        kubectl(
            &data,
            &[
                "-n",
                "shop",
                "get",
                "deploy",
                "web",
                "-o",
                "jsonpath={.spec.replicas}"
            ]
        ),
        "5"
    );
    // The allocated cluster IP stays taken: a second Service gets another one.
    let other = dir.path().join("svc.yaml");
    std::fs::write(&other, "apiVersion: v1\nkind: Service\nmetadata: {name: api, namespace: shop}\nspec: {ports: [{port: 80}]}\n").unwrap();
    kubectl(&data, &["apply", "-f", other.to_str().unwrap()]);
    let ip2 = kubectl(
        &data,
        &[
            "-n",
            "shop",
            "get",
            "svc",
            "api",
            "-o",
            "jsonpath={.spec.clusterIP}",
        ],
    );
    assert_ne!(ip, ip2);
    let out = kubectl(&data, &["get", "--raw", "/readyz"]);
    assert_eq!(out, "ok");
}

/// Whether any file under `dir` contains `needle`.
fn files_contain(dir: &Path, needle: &[u8]) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return false;
    };
    entries.flatten().any(|e| {
        let p = e.path();
        if p.is_dir() {
            files_contain(&p, needle)
        } else {
            std::fs::read(&p).is_ok_and(|b| b.windows(needle.len()).any(|w| w == needle))
        }
    })
}

#[test]
fn secrets_are_encrypted_at_rest() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("member-1");
    let config = dir.path().join("encryption.yaml");
    // A 32-byte key, base64.
    std::fs::write(
        &config,
        "apiVersion: apiserver.config.k8s.io/v1\nkind: EncryptionConfiguration\nresources:\n\
         - resources: [secrets]\n  providers:\n  - aesgcm:\n      keys:\n      \
         - {name: key1, secret: MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=}\n  - identity: {}\n",
    )
    .unwrap();
    let flag = ["--encryption-provider-config", config.to_str().unwrap()];
    let member = Member::start_with(&data, true, &flag);
    let objects = dir.path().join("objects.yaml");
    std::fs::write(
        &objects,
        "apiVersion: v1\nkind: Secret\nmetadata: {name: db, namespace: default}\n\
         stringData: {password: hunter2-at-rest}\n---\n\
         apiVersion: v1\nkind: ConfigMap\nmetadata: {name: plain, namespace: default}\n\
         data: {note: visible-at-rest}\n",
    )
    .unwrap();
    kubectl(&data, &["apply", "-f", objects.to_str().unwrap()]);
    let got = kubectl(
        &data,
        &["get", "secret", "db", "-o", "jsonpath={.data.password}"],
    );
    assert_eq!(got, "aHVudGVyMi1hdC1yZXN0", "base64 of the password");
    member.kill9();
    // The ConfigMap's text is on disk (so the scan works); the Secret's is not.
    assert!(files_contain(&data, b"visible-at-rest"));
    assert!(!files_contain(&data, b"aHVudGVyMi1hdC1yZXN0"));
    assert!(!files_contain(&data, b"hunter2-at-rest"));
    assert!(files_contain(&data, b"k8s:enc:aesgcm:v1:key1:"));

    // Restarted with the same key, the Secret reads back.
    let _member = Member::start_with(&data, false, &flag);
    let got = kubectl(
        &data,
        &["get", "secret", "db", "-o", "jsonpath={.data.password}"],
    );
    assert_eq!(got, "aHVudGVyMi1hdC1yZXN0");
}

/// Polls `kubectl get -o name` with `args` until it prints `want` lines, for up to 30 s.
fn wait_names(data: &Path, args: &[&str], want: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let names: Vec<String> = kubectl(data, args).lines().map(str::to_owned).collect();
        if names.len() == want {
            return names;
        }
        assert!(
            Instant::now() < deadline,
            "kubectl {args:?}: expected {want} objects, have {names:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn kubectl_delete_cascades_through_the_garbage_collector() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("member-1");
    let _member = Member::start_with(&data, true, &[]);
    let app = manifest(dir.path());
    kubectl(&data, &["apply", "-f", app.to_str().unwrap()]);
    let ns = ["-n", "shop"];
    fn get<'a>(ns: &[&'a str], what: &'a str) -> Vec<&'a str> {
        [ns, &["get", what, "-o", "name"]].concat()
    }
    let rs = wait_names(&data, &get(&ns, "rs"), 1).remove(0);
    wait_names(&data, &get(&ns, "pods"), 2);

    // Orphan: the Deployment goes, its ReplicaSet stays without the owner reference.
    kubectl(
        &data,
        &[&ns[..], &["delete", "deploy", "web", "--cascade=orphan"]].concat(),
    );
    wait_names(&data, &get(&ns, "deploy"), 0);
    let owners = kubectl(
        &data,
        &[
            &ns[..],
            &["get", &rs, "-o", "jsonpath={.metadata.ownerReferences}"],
        ]
        .concat(),
    );
    assert!(
        !owners.contains("Deployment"),
        "the orphaned ReplicaSet keeps no owner: {owners}"
    );
    wait_names(&data, &get(&ns, "pods"), 2);

    // Foreground: kubectl waits until the ReplicaSet is gone, which needs its pods gone first.
    kubectl(
        &data,
        &[
            &ns[..],
            &["delete", &rs, "--cascade=foreground", "--timeout=30s"],
        ]
        .concat(),
    );
    wait_names(&data, &get(&ns, "rs"), 0);
    assert_eq!(
        wait_names(&data, &get(&ns, "pods"), 0).len(),
        0,
        "the pods went before their ReplicaSet"
    );
}
