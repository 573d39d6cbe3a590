//! Store members as real `keelson-server` processes on 127.0.0.1: bootstrap and join, the
//! leader killed with SIGKILL under concurrent writes, then every member killed and restarted
//! from disk, with no acknowledged write lost.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;

use keelson_server::store::{Consistency, Outcome, Revision, StoreClient};

const WAIT: Duration = Duration::from_secs(20);

struct Member {
    child: Child,
    addr: String,
    lines: mpsc::Receiver<String>,
}

impl Member {
    fn spawn(id: u64, dir: &Path, listen: &str, extra: &[&str]) -> Member {
        let mut child = Command::new(env!("CARGO_BIN_EXE_keelson-server"))
            .args([
                "--id",
                &id.to_string(),
                "--listen",
                listen,
                "--request-timeout-ms",
                "3000",
            ])
            .arg("--data-dir")
            .arg(dir)
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn keelson-server");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut member = Member {
            child,
            addr: String::new(),
            lines,
        };
        let line = member.expect_line("listening on ");
        member.addr = line.trim_start_matches("listening on ").to_string();
        member
    }

    fn expect_line(&mut self, prefix: &str) -> String {
        loop {
            match self.lines.recv_timeout(WAIT) {
                Ok(line) if line.starts_with(prefix) => return line,
                Ok(_) => {}
                Err(e) => panic!("member printed no {prefix:?}: {e}"),
            }
        }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        self.kill();
    }
}

fn applied(outcome: &Outcome) -> Option<Revision> {
    match outcome {
        Outcome::Applied { kv, .. } => Some(kv.mod_revision),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_of_leader_and_of_all_members_loses_no_acknowledged_write() {
    let root = tempfile::tempdir().expect("tempdir");
    let dir = |id: u64| -> PathBuf { root.path().join(format!("m{id}")) };
    let mut members: BTreeMap<u64, Member> = BTreeMap::new();
    let mut first = Member::spawn(1, &dir(1), "127.0.0.1:0", &["--init"]);
    first.expect_line("member 1 ready");
    let seed = first.addr.clone();
    members.insert(1, first);
    for id in [2, 3] {
        let mut member = Member::spawn(id, &dir(id), "127.0.0.1:0", &["--join", &seed]);
        member.expect_line(&format!("member {id} ready"));
        members.insert(id, member);
    }
    let addrs: BTreeMap<u64, String> = members
        .iter()
        .map(|(id, m)| (*id, m.addr.clone()))
        .collect();
    let client = Arc::new(StoreClient::new(
        addrs.values().cloned().collect(),
        Duration::from_secs(10),
    ));
    client
        .put("/warmup", b"w".to_vec())
        .await
        .expect("first write");
    let leader_addr = client.leader_hint().expect("leader known after a write");
    let leader = *addrs
        .iter()
        .find(|(_, a)| **a == leader_addr)
        .map(|(id, _)| id)
        .expect("leader is a member");

    let mut writers = Vec::new();
    for w in 0..4u64 {
        let client = client.clone();
        writers.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            for i in 0..60u64 {
                let key = format!("/p/{w}/{i}");
                if let Ok(result) = client.put(key.clone(), i.to_le_bytes().to_vec()).await
                    && let Some(revision) = applied(&result.outcome)
                {
                    acked.push((key, revision));
                }
            }
            acked
        }));
    }
    // SIGKILL the leader once writes are flowing.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let seen = client
            .get("/p/0/10", None, Consistency::Serializable)
            .await
            .ok()
            .flatten();
        if seen.is_some() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "writes did not flow"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    members.get_mut(&leader).expect("leader").kill();
    let mut acked = Vec::new();
    for writer in writers {
        acked.extend(writer.await.expect("writer"));
    }
    assert!(
        acked.len() > 150,
        "only {} writes acknowledged",
        acked.len()
    );

    // SIGKILL everyone, restart everyone from disk on the same addresses.
    for member in members.values_mut() {
        member.kill();
    }
    members.clear();
    for (id, addr) in &addrs {
        let extra: &[&str] = if *id == 1 {
            &["--init"]
        } else {
            &["--join", &seed]
        };
        let mut member = Member::spawn(*id, &dir(*id), addr, extra);
        member.expect_line(&format!("member {id} ready"));
        members.insert(*id, member);
    }
    let client = StoreClient::new(addrs.values().cloned().collect(), Duration::from_secs(10));
    for (key, revision) in &acked {
        let kv = client
            .get(key, None, Consistency::Linearizable)
            .await
            .expect("read after restart")
            .unwrap_or_else(|| panic!("acknowledged write {key} lost"));
        assert_eq!(kv.mod_revision, *revision, "{key}");
    }
    client
        .put("/after", b"a".to_vec())
        .await
        .expect("write after restart");
}
