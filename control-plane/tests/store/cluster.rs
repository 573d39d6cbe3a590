//! Multi-member store clusters in one process, over gRPC on 127.0.0.1: forwarding, read
//! index, leader failure under load, restart from disk, membership changes, snapshot install,
//! watches resuming across a leader change, and behaviour without a quorum.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use keelson_server::store::{
    Consistency, EventKind, Outcome, RangeRequest, Revision, Store, StoreConfig, StoreError,
};
use tokio::time::Instant;

use crate::support::{Cluster, WAIT, applied_revision, value, wait_for};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn single_member_serves_the_whole_api() {
    let mut cluster = Cluster::bootstrap(|c| c, &[1]).await;
    let store = cluster.member(1);
    let created = store
        .create("/pods/a", b"1".to_vec())
        .await
        .expect("create");
    let rev_a = applied_revision(&created);
    let again = store
        .create("/pods/a", b"x".to_vec())
        .await
        .expect("create again");
    assert!(matches!(again.outcome, Outcome::AlreadyExists { .. }));
    store.put("/pods/b", b"2".to_vec()).await.expect("put");
    let stale = store
        .update("/pods/a", b"y".to_vec(), Some(rev_a + 100))
        .await
        .expect("cas");
    assert!(matches!(stale.outcome, Outcome::RevisionMismatch { .. }));
    let swapped = store
        .update("/pods/a", b"3".to_vec(), Some(rev_a))
        .await
        .expect("cas");
    let rev_swap = applied_revision(&swapped);
    let deleted = store.delete("/pods/b", None).await.expect("delete");
    assert!(matches!(deleted.outcome, Outcome::Applied { .. }));

    assert_eq!(
        value(&store, "/pods/a", Consistency::Linearizable).await,
        Some(b"3".to_vec())
    );
    assert_eq!(
        value(&store, "/pods/b", Consistency::Serializable).await,
        None
    );
    let old = store
        .get("/pods/a", Some(rev_a), Consistency::Linearizable)
        .await
        .expect("get old")
        .map(|kv| kv.value);
    assert_eq!(old, Some(b"1".to_vec()));
    let page = store
        .range(
            &RangeRequest {
                prefix: "/pods/".into(),
                limit: 1,
                revision: Some(rev_swap - 1),
                continue_from: None,
            },
            Consistency::Linearizable,
        )
        .await
        .expect("range");
    assert_eq!(page.kvs.len(), 1);
    assert!(page.continue_token.is_some());

    let mut watch = store.watch("/pods/", 0).await.expect("watch");
    let kinds: Vec<(Revision, EventKind)> = {
        let mut seen = Vec::new();
        for _ in 0..4 {
            let event = watch.next().await.expect("event");
            seen.push((event.revision(), event.kind));
        }
        seen
    };
    assert_eq!(
        kinds.iter().map(|(_, k)| *k).collect::<Vec<_>>(),
        [
            EventKind::Put,
            EventKind::Put,
            EventKind::Put,
            EventKind::Delete
        ]
    );
    store.put("/pods/c", b"live".to_vec()).await.expect("put");
    let live = watch.next().await.expect("live event");
    assert_eq!(live.kv.key, "/pods/c");
    cluster.stop_all().await;
    assert!(watch.next().await.is_none(), "watch ends at shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn followers_forward_writes_and_read_linearizably() {
    let mut cluster = Cluster::bootstrap(|c| c, &[1, 2, 3]).await;
    let leader = cluster.leader().await;
    let followers: Vec<u64> = [1, 2, 3].into_iter().filter(|id| *id != leader).collect();
    let writer = cluster.member(followers[0]);
    let reader = cluster.member(followers[1]);
    for i in 0..20 {
        let result = writer
            .put(format!("/k/{i:02}"), format!("v{i}").into_bytes())
            .await
            .expect("forwarded put");
        // A linearizable read on another follower sees the acknowledged write at once.
        let seen = reader
            .get(&format!("/k/{i:02}"), None, Consistency::Linearizable)
            .await
            .expect("read")
            .expect("key present");
        assert_eq!(seen.mod_revision, applied_revision(&result));
    }
    let all = reader
        .range(
            &RangeRequest {
                prefix: "/k/".into(),
                ..Default::default()
            },
            Consistency::Linearizable,
        )
        .await
        .expect("range");
    assert_eq!(all.kvs.len(), 20);
    cluster.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_acknowledged_write_is_lost_when_the_leader_dies_under_load() {
    let mut cluster = Cluster::bootstrap(
        |c| c.with_request_timeout(Duration::from_secs(3)),
        &[1, 2, 3],
    )
    .await;
    let leader = cluster.leader().await;
    let stores: Vec<Arc<Store>> = cluster.members.values().cloned().collect();
    let mut writers = Vec::new();
    for w in 0..6u64 {
        let stores = stores.clone();
        writers.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            let mut failed = 0;
            for i in 0..40u64 {
                // Spread writes over all members; those sent to the dead one fail.
                let store = &stores[((w + i) % stores.len() as u64) as usize];
                let key = format!("/load/{w}/{i}");
                match store.put(key.clone(), i.to_le_bytes().to_vec()).await {
                    Ok(result) => acked.push((key, applied_revision(&result))),
                    Err(_) => failed += 1,
                }
            }
            (acked, failed)
        }));
    }
    // Kill the leader while writes are flowing.
    let survivor = cluster.member(if leader == 1 { 2 } else { 1 });
    wait_for("some writes applied", || async {
        (survivor.local_revision() >= 30).then_some(())
    })
    .await;
    cluster.kill(leader).await;
    let killed_at = survivor.local_revision();
    let mut acked = Vec::new();
    let mut failed = 0;
    for writer in writers {
        let (a, f) = writer.await.expect("writer task");
        acked.extend(a);
        failed += f;
    }
    let new_leader = cluster.leader().await;
    assert_ne!(new_leader, leader);
    assert!(
        acked.len() > 100,
        "too few acknowledged writes: {} (failed {failed})",
        acked.len()
    );
    assert!(
        acked.iter().any(|(_, revision)| *revision > killed_at + 10),
        "writes continued under the new leader"
    );
    for store in cluster.members.values() {
        for (key, revision) in &acked {
            let kv = store
                .get(key, None, Consistency::Linearizable)
                .await
                .expect("read")
                .unwrap_or_else(|| {
                    panic!("acknowledged write {key} lost on member {}", store.id())
                });
            assert_eq!(kv.mod_revision, *revision, "{key}");
        }
    }
    // Revisions of acknowledged writes are unique.
    let unique: BTreeSet<Revision> = acked.iter().map(|(_, r)| *r).collect();
    assert_eq!(unique.len(), acked.len());
    cluster.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn whole_cluster_restarts_from_disk() {
    let mut cluster = Cluster::bootstrap(|c| c, &[1, 2, 3]).await;
    let store = cluster.member(1);
    let mut last = 0;
    for i in 0..30 {
        last = applied_revision(
            &store
                .put(format!("/r/{i}"), vec![i as u8])
                .await
                .expect("put"),
        );
    }
    store.delete("/r/0", None).await.expect("delete");
    cluster.stop_all().await;
    for id in [1, 2, 3] {
        cluster.start(id).await;
    }
    cluster.leader().await;
    let store = cluster.member(3);
    let page = store
        .range(
            &RangeRequest {
                prefix: "/r/".into(),
                ..Default::default()
            },
            Consistency::Linearizable,
        )
        .await
        .expect("range after restart");
    assert_eq!(page.kvs.len(), 29);
    assert_eq!(page.revision, last + 1);
    let next = store
        .put("/r/new", b"x".to_vec())
        .await
        .expect("write after restart");
    assert_eq!(applied_revision(&next), last + 2);
    // History survived too: a watch from before the restart replays it.
    let mut watch = store.watch("/r/", last).await.expect("watch");
    let event = watch.next().await.expect("event");
    assert_eq!(
        (event.revision(), event.kind),
        (last + 1, EventKind::Delete)
    );
    cluster.stop_all().await;
}

fn snapshot_often(config: StoreConfig) -> StoreConfig {
    config.with_snapshots(20, 5).with_history_limit(50)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn members_join_by_snapshot_and_leave() {
    let mut cluster = Cluster::bootstrap(snapshot_often, &[1]).await;
    let first = cluster.member(1);
    for i in 0..100 {
        first
            .put(format!("/s/{i:03}"), vec![1; 32])
            .await
            .expect("put");
    }
    // The log is purged behind a snapshot, so a new member can only catch up by snapshot.
    wait_for("log purged on member 1", || async {
        first
            .raft()
            .metrics()
            .borrow()
            .purged
            .is_some_and(|p| p.index > 50)
            .then_some(())
    })
    .await;
    for id in [2, 3] {
        let joining = cluster.start(id).await;
        first
            .add_member(id, joining.addr().to_string())
            .await
            .expect("add member");
    }
    let second = cluster.member(2);
    let installed = second.raft().metrics().borrow().snapshot;
    assert!(installed.is_some(), "member 2 caught up without a snapshot");
    assert_eq!(
        value(&second, "/s/000", Consistency::Serializable).await,
        Some(vec![1; 32])
    );
    let voters: BTreeSet<u64> = first
        .raft()
        .metrics()
        .borrow()
        .membership_config
        .membership()
        .voter_ids()
        .collect();
    assert_eq!(voters, BTreeSet::from([1, 2, 3]));
    // Writes through the new member, reads everywhere.
    second
        .put("/s/after-join", b"j".to_vec())
        .await
        .expect("put via member 2");
    let third = cluster.member(3);
    assert_eq!(
        value(&third, "/s/after-join", Consistency::Linearizable).await,
        Some(b"j".to_vec())
    );

    // Remove member 3 through a follower; the rest keeps working.
    second.remove_member(3).await.expect("remove member");
    cluster.kill(3).await;
    let voters: BTreeSet<u64> = first
        .raft()
        .metrics()
        .borrow()
        .membership_config
        .membership()
        .voter_ids()
        .collect();
    assert_eq!(voters, BTreeSet::from([1, 2]));
    first
        .put("/s/after-remove", b"r".to_vec())
        .await
        .expect("put after remove");
    assert_eq!(
        value(&second, "/s/after-remove", Consistency::Linearizable).await,
        Some(b"r".to_vec())
    );
    cluster.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lagging_member_catches_up_by_snapshot() {
    let mut cluster = Cluster::bootstrap(snapshot_often, &[1, 2, 3]).await;
    let leader = cluster.leader().await;
    let lagging = if leader == 3 { 2 } else { 3 };
    cluster.kill(lagging).await;
    let writer = cluster.member(leader);
    for i in 0..120 {
        writer
            .put(format!("/lag/{i:03}"), vec![2; 16])
            .await
            .expect("put");
    }
    wait_for("log purged on the leader", || async {
        writer
            .raft()
            .metrics()
            .borrow()
            .purged
            .is_some_and(|p| p.index > 60)
            .then_some(())
    })
    .await;
    let restarted = cluster.start(lagging).await;
    let target = writer
        .raft()
        .metrics()
        .borrow()
        .last_applied
        .map(|l| l.index);
    wait_for("lagging member applied the leader's log", || async {
        (restarted
            .raft()
            .metrics()
            .borrow()
            .last_applied
            .map(|l| l.index)
            >= target)
            .then_some(())
    })
    .await;
    assert!(restarted.raft().metrics().borrow().snapshot.is_some());
    assert_eq!(
        value(&restarted, "/lag/119", Consistency::Serializable).await,
        Some(vec![2; 16])
    );
    cluster.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn watch_resumes_on_another_member_after_the_leader_dies() {
    let mut cluster = Cluster::bootstrap(|c| c, &[1, 2, 3]).await;
    let leader = cluster.leader().await;
    let on_leader = cluster.member(leader);
    let mut watch = on_leader.watch("/w/", 0).await.expect("watch");
    for i in 0..10 {
        on_leader
            .put(format!("/w/{i}"), vec![i])
            .await
            .expect("put");
    }
    let mut seen = Vec::new();
    for _ in 0..10 {
        seen.push(watch.next().await.expect("event").revision());
    }
    cluster.kill(leader).await;
    assert!(
        watch.next().await.is_none(),
        "watch on the dead member ends"
    );
    let new_leader = cluster.leader().await;
    let other = cluster.member(new_leader);
    for i in 10..20 {
        other
            .put(format!("/w/{i}"), vec![i])
            .await
            .expect("put on new leader");
    }
    let survivor = cluster
        .members
        .keys()
        .copied()
        .find(|id| *id != new_leader)
        .expect("a follower");
    let last = *seen.last().expect("some events");
    let mut resumed = cluster
        .member(survivor)
        .watch("/w/", last)
        .await
        .expect("resume");
    while seen.len() < 20 {
        let event = tokio::time::timeout(WAIT, resumed.next())
            .await
            .expect("event in time")
            .expect("event");
        seen.push(event.revision());
    }
    let expected: Vec<Revision> = (1..=20).collect();
    assert_eq!(seen, expected, "no event missed or repeated");
    cluster.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn watch_from_compacted_revision_is_refused() {
    let mut cluster = Cluster::bootstrap(|c| c.with_history_limit(5), &[1]).await;
    let store = cluster.member(1);
    for i in 0..10 {
        store.put("/c", vec![i]).await.expect("put");
    }
    let err = store.watch("/", 2).await.expect_err("compacted");
    assert!(err.is_compacted(), "{err}");
    let mut ok = store.watch("/", 5).await.expect("inside the window");
    assert_eq!(ok.next().await.map(|e| e.revision()), Some(6));
    cluster.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn member_without_quorum_answers_with_an_error() {
    let mut cluster = Cluster::bootstrap(
        |c| c.with_request_timeout(Duration::from_secs(1)),
        &[1, 2, 3],
    )
    .await;
    let store = cluster.member(1);
    store.put("/q", b"before".to_vec()).await.expect("put");
    cluster.kill(2).await;
    cluster.kill(3).await;
    let started = Instant::now();
    let err = store
        .put("/q", b"after".to_vec())
        .await
        .expect_err("no quorum");
    assert!(
        matches!(
            err,
            StoreError::Unavailable { .. } | StoreError::Indeterminate { .. }
        ),
        "{err}"
    );
    let err = store
        .get("/q", None, Consistency::Linearizable)
        .await
        .expect_err("no linearizable read without quorum");
    assert!(matches!(err, StoreError::Unavailable { .. }), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "answered in time"
    );
    // Serializable reads still answer from local state.
    assert_eq!(
        value(&store, "/q", Consistency::Serializable).await,
        Some(b"before".to_vec())
    );
    cluster.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writes_share_log_entries() {
    let mut cluster = Cluster::bootstrap(|c| c, &[1, 2, 3]).await;
    let leader = cluster.member(cluster.leader().await);
    let before = leader.raft().metrics().borrow().last_log_index.unwrap_or(0);
    let mut tasks = Vec::new();
    for i in 0..300 {
        let store = leader.clone();
        tasks.push(tokio::spawn(async move {
            store.put(format!("/batch/{i}"), vec![0; 64]).await
        }));
    }
    let mut revisions = BTreeSet::new();
    for task in tasks {
        let result = task.await.expect("task").expect("put");
        revisions.insert(applied_revision(&result));
    }
    assert_eq!(revisions.len(), 300, "every write got its own revision");
    let entries = leader.raft().metrics().borrow().last_log_index.unwrap_or(0) - before;
    assert!(
        entries < 300,
        "300 concurrent writes took {entries} log entries"
    );
    cluster.stop_all().await;
}
