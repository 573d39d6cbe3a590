use std::collections::BTreeMap;

use openraft::storage::{RaftLogStorage, RaftLogStorageExt};
use openraft::testing::{StoreBuilder, Suite};
use openraft::{CommittedLeaderId, Membership, RaftLogReader, Vote};

use super::*;
use crate::store::mvcc::{Command, Event, Outcome, RangeRequest};

struct TempStoreBuilder;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for TempStoreBuilder {
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, LogStore, StateMachine), StorageError<NodeId>> {
        let dir = tempfile::tempdir().map_err(|e| StorageIOError::write(&e))?;
        let (log, sm) =
            open_with(dir.path(), 100, 1 << 20).map_err(|e| StorageIOError::write(&e))?;
        Ok((dir, log, sm))
    }
}

#[test]
fn openraft_storage_suite() {
    Suite::test_all(TempStoreBuilder).expect("openraft storage suite");
}

fn log_id(index: u64) -> LogId<NodeId> {
    LogId::new(CommittedLeaderId::new(1, 1), index)
}

fn put_entry(index: u64, key: &str, value: &[u8]) -> Entry {
    Entry {
        log_id: log_id(index),
        payload: EntryPayload::Normal(vec![Command::Put {
            key: key.into(),
            value: value.to_vec(),
        }]),
    }
}

fn membership_entry(index: u64) -> Entry {
    let nodes = BTreeMap::from([(1, Node::new("127.0.0.1:1"))]);
    Entry {
        log_id: log_id(index),
        payload: EntryPayload::Membership(Membership::new(vec![[1].into()], nodes)),
    }
}

async fn write_log(log: &mut LogStore, entries: Vec<Entry>) {
    log.blocking_append(entries).await.expect("append");
}

fn segment(dir: &Path, seq: u64) -> PathBuf {
    dir.join(WAL_DIR).join(wal::segment_name(seq))
}

#[tokio::test]
async fn state_survives_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let entries = vec![
        membership_entry(1),
        put_entry(2, "/a", b"1"),
        put_entry(3, "/b", b"2"),
        put_entry(4, "/a", b"3"),
    ];
    {
        let (mut log, mut sm) = open(dir.path(), 2).expect("open");
        write_log(&mut log, entries.clone()).await;
        let results = sm.apply(entries[..3].to_vec()).await.expect("apply");
        assert_eq!(results[0], []);
        let snapshot = sm
            .get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .expect("snapshot");
        assert_eq!(snapshot.meta.last_log_id, Some(log_id(3)));
        let results = sm.apply(entries[3..].to_vec()).await.expect("apply");
        assert!(matches!(
            results[0].as_slice(),
            [WriteResult {
                revision: 3,
                outcome: Outcome::Applied { .. }
            }]
        ));
        log.save_vote(&Vote::new(1, 1)).await.expect("vote");
        log.save_committed(Some(log_id(4)))
            .await
            .expect("committed");
        // The commit index is not synced on its own; the next append makes it durable.
        write_log(&mut log, vec![put_entry(5, "/c", b"4")]).await;
    }
    let (mut log, mut sm) = open(dir.path(), 2).expect("reopen");
    assert_eq!(log.read_vote().await.expect("vote"), Some(Vote::new(1, 1)));
    assert_eq!(
        log.read_committed().await.expect("committed"),
        Some(log_id(4))
    );
    let state = log.get_log_state().await.expect("log state");
    assert_eq!(state.last_log_id, Some(log_id(5)));
    assert_eq!(
        log.try_get_log_entries(1..5).await.expect("entries"),
        entries
    );
    // The state machine comes back from the snapshot; openraft re-applies the rest.
    let (applied, membership) = sm.applied_state().await.expect("applied");
    assert_eq!(applied, Some(log_id(3)));
    assert_eq!(membership.log_id(), &Some(log_id(1)));
    sm.apply(entries[3..].to_vec()).await.expect("re-apply");
    let shared = sm.shared();
    let guard = shared.read();
    assert_eq!(guard.mvcc.revision(), 3);
    assert_eq!(guard.mvcc.compacted_revision(), 1);
    let all = guard.mvcc.range(&RangeRequest::default()).expect("range");
    let values: Vec<_> = all
        .kvs
        .iter()
        .map(|kv| (kv.key.as_str(), kv.value.clone()))
        .collect();
    assert_eq!(values, [("/a", b"3".to_vec()), ("/b", b"2".to_vec())]);
    let revs: Vec<_> = guard
        .mvcc
        .events_after(1)
        .expect("events")
        .iter()
        .map(Event::revision)
        .collect();
    assert_eq!(revs, [2, 3]);
}

#[tokio::test]
async fn snapshot_installs_on_another_member() {
    let source_dir = tempfile::tempdir().expect("tempdir");
    let target_dir = tempfile::tempdir().expect("tempdir");
    let (_log, mut source) = open(source_dir.path(), 10).expect("open");
    source
        .apply(vec![
            membership_entry(1),
            put_entry(2, "/x", b"x"),
            put_entry(3, "/y", b"y"),
        ])
        .await
        .expect("apply");
    let snapshot = source
        .get_snapshot_builder()
        .await
        .build_snapshot()
        .await
        .expect("build");
    assert_eq!(snapshot.meta.last_log_id, Some(log_id(3)));

    let (tlog, mut target) = open(target_dir.path(), 10).expect("open target");
    target
        .apply(vec![put_entry(1, "/stale", b"s")])
        .await
        .expect("apply");
    let mut watch = {
        let shared = target.shared();
        let mut guard = shared.write();
        let backlog = guard.mvcc.events_after(1).expect("events");
        guard.watchers.register(String::new(), 1, backlog, 8)
    };
    target
        .install_snapshot(&snapshot.meta, snapshot.snapshot)
        .await
        .expect("install");
    drop(target);
    drop(tlog);
    // Revision 1 is still inside the new history window: the watcher sees events 2.
    assert_eq!(watch.next().await.map(|e| e.revision()), Some(2));
    let (_tlog, mut target) = open(target_dir.path(), 10).expect("reopen target");
    let (applied, _) = target.applied_state().await.expect("applied");
    assert_eq!(applied, Some(log_id(3)));
    let current = target
        .get_current_snapshot()
        .await
        .expect("snapshot")
        .expect("some");
    assert_eq!(current.meta, snapshot.meta);
    let shared = target.shared();
    let guard = shared.read();
    assert_eq!(guard.mvcc.get("/stale", None), Ok(None));
    assert_eq!(
        guard.mvcc.get("/y", None).expect("get").map(|kv| kv.value),
        Some(b"y".to_vec())
    );
}

fn block_on<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(f)
}

const SAMPLE: &[u8] = b"UNIQUE-PAYLOAD-0123456789-ABCDEFGHIJ";

fn write_sample(dir: &Path) {
    let (mut log, _sm) = open(dir, 10).expect("open");
    block_on(write_log(
        &mut log,
        vec![membership_entry(1), put_entry(2, "/k", SAMPLE)],
    ));
}

fn reopen_err(dir: &Path) -> DiskError {
    open(dir, 10).map(|_| ()).expect_err("damaged store opened")
}

#[test]
fn empty_segment_is_reported() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_sample(dir.path());
    std::fs::write(segment(dir.path(), 1), b"").expect("write");
    let err = reopen_err(dir.path());
    assert!(matches!(err, DiskError::Corrupt { .. }), "{err}");
}

#[test]
fn truncated_segment_is_reported() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_sample(dir.path());
    let path = segment(dir.path(), 1);
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .expect("open");
    let len = file.metadata().expect("metadata").len();
    file.set_len(len / 2).expect("truncate");
    drop(file);
    let err = reopen_err(dir.path());
    assert!(
        matches!(&err, DiskError::Corrupt { what, .. } if what.contains("truncated")),
        "{err}"
    );
}

fn flip_sample(path: &Path) {
    let mut bytes = std::fs::read(path).expect("read");
    let at = bytes
        .windows(SAMPLE.len())
        .position(|w| w == SAMPLE)
        .expect("sample value in the file");
    bytes[at + 3] ^= 0xff;
    std::fs::write(path, &bytes).expect("write");
}

#[test]
fn flipped_bytes_are_reported() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_sample(dir.path());
    flip_sample(&segment(dir.path(), 1));
    let err = reopen_err(dir.path());
    assert!(
        matches!(&err, DiskError::Corrupt { what, .. } if what.contains("checksum")),
        "{err}"
    );
}

#[test]
fn undecodable_record_is_reported() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_sample(dir.path());
    let path = segment(dir.path(), 1);
    let mut bytes = std::fs::read(&path).expect("read");
    let end = {
        // After the last record: the first all-zero record header.
        let mut at = 16usize;
        loop {
            let len = u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
            if len == 0 {
                break at;
            }
            at += 8 + len as usize;
        }
    };
    let payload = [0xffu8, 0xff, 0xff];
    bytes[end..end + 4].copy_from_slice(&3u32.to_le_bytes());
    bytes[end + 4..end + 8].copy_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    bytes[end + 8..end + 11].copy_from_slice(&payload);
    std::fs::write(&path, &bytes).expect("write");
    let err = reopen_err(dir.path());
    assert!(
        matches!(&err, DiskError::Corrupt { what, .. } if what.contains("undecodable")),
        "{err}"
    );
}

#[test]
fn foreign_file_is_reported() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_sample(dir.path());
    let path = segment(dir.path(), 1);
    let mut bytes = std::fs::read(&path).expect("read");
    bytes[..8].copy_from_slice(b"SQLite f");
    std::fs::write(&path, &bytes).expect("write");
    let err = reopen_err(dir.path());
    assert!(
        matches!(&err, DiskError::Corrupt { what, .. } if what.contains("magic")),
        "{err}"
    );
}

#[test]
fn old_format_is_refused_with_an_explanation() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join(OLD_DB_FILE), b"redb").expect("write");
    let err = reopen_err(dir.path());
    assert!(matches!(err, DiskError::OldFormat { .. }), "{err}");
    assert!(err.to_string().contains("older on-disk format"), "{err}");
}

#[test]
fn a_second_opener_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let _open = open(dir.path(), 10).expect("open");
    let err = reopen_err(dir.path());
    assert!(matches!(err, DiskError::Locked { .. }), "{err}");
}

#[test]
fn interrupted_creation_is_set_up_anew() {
    let dir = tempfile::tempdir().expect("tempdir");
    let wal_dir = dir.path().join(WAL_DIR);
    std::fs::create_dir_all(&wal_dir).expect("mkdir");
    std::fs::write(wal_dir.join("0000000000000001.wal.tmp"), b"KLSN").expect("write");
    let (_log, sm) = open(dir.path(), 10).expect("open after an interrupted creation");
    assert_eq!(sm.shared().revision(), 0);
    assert!(!wal_dir.join("0000000000000001.wal.tmp").exists());
}

#[test]
fn torn_tail_is_discarded_and_the_log_goes_on() {
    let dir = tempfile::tempdir().expect("tempdir");
    let big = vec![7u8; 3000];
    {
        let (mut log, _sm) = open(dir.path(), 10).expect("open");
        block_on(write_log(
            &mut log,
            vec![
                membership_entry(1),
                put_entry(2, "/a", b"a"),
                put_entry(3, "/big", &big),
            ],
        ));
    }
    // A crash during the write of entry 3: one sector of it never reached the disk.
    let path = segment(dir.path(), 1);
    let mut bytes = std::fs::read(&path).expect("read");
    let at = bytes
        .windows(64)
        .position(|w| w.iter().all(|&b| b == 7))
        .expect("big value");
    let sector = (at / 512 + 1) * 512;
    bytes[sector..sector + 512].fill(0);
    std::fs::write(&path, &bytes).expect("write");
    {
        let (mut log, _sm) = open(dir.path(), 10).expect("open with a torn tail");
        let state = block_on(log.get_log_state()).expect("state");
        assert_eq!(state.last_log_id, Some(log_id(2)));
        block_on(write_log(&mut log, vec![put_entry(3, "/c", b"c")]));
    }
    let (mut log, _sm) = open(dir.path(), 10).expect("reopen");
    let entries = block_on(log.try_get_log_entries(..)).expect("entries");
    assert_eq!(entries.len(), 3);
    assert_eq!(entries[2], put_entry(3, "/c", b"c"));
}

#[test]
fn damage_in_an_older_segment_is_not_taken_for_a_torn_tail() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let (mut log, _sm) = open_with(dir.path(), 10, 8192).expect("open");
        let mut entries = vec![membership_entry(1), put_entry(2, "/k", SAMPLE)];
        entries.extend((3..40).map(|i| put_entry(i, "/k", &[1u8; 400])));
        block_on(write_log(&mut log, entries));
    }
    assert!(segment(dir.path(), 2).exists(), "the log spans segments");
    let path = segment(dir.path(), 1);
    let mut bytes = std::fs::read(&path).expect("read");
    let at = bytes
        .windows(SAMPLE.len())
        .position(|w| w == SAMPLE)
        .expect("sample");
    // Zero the sector holding the sample: in the last segment this would pass for a torn write.
    let sector = at / 512 * 512;
    bytes[sector..sector + 512].fill(0);
    std::fs::write(&path, &bytes).expect("write");
    let err = reopen_err(dir.path());
    assert!(matches!(err, DiskError::Corrupt { .. }), "{err}");
}

#[test]
fn segments_roll_and_purged_ones_are_removed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let value = [3u8; 500];
    {
        let (mut log, mut sm) = open_with(dir.path(), 10, 8192).expect("open");
        block_on(async {
            log.save_vote(&Vote::new(1, 1)).await.expect("vote");
            let mut entries = vec![membership_entry(1)];
            entries.extend((2..=60).map(|i| put_entry(i, "/k", &value)));
            write_log(&mut log, entries.clone()).await;
            sm.apply(entries).await.expect("apply");
            sm.get_snapshot_builder()
                .await
                .build_snapshot()
                .await
                .expect("snapshot");
            log.purge(log_id(50)).await.expect("purge");
        });
    }
    // The writer removes the emptied segments after the purge is durable; the log closed
    // after the writer drained its queue.
    let wal_dir = dir.path().join(WAL_DIR);
    let segments = std::fs::read_dir(&wal_dir).expect("list").count();
    assert!(segments < 5, "{segments} segments left after the purge");
    assert!(
        !segment(dir.path(), 1).exists(),
        "the first segment holding the vote is gone"
    );
    let (mut log, sm) = open_with(dir.path(), 10, 8192).expect("reopen");
    block_on(async {
        assert_eq!(log.read_vote().await.expect("vote"), Some(Vote::new(1, 1)));
        let state = log.get_log_state().await.expect("state");
        assert_eq!(state.last_purged_log_id, Some(log_id(50)));
        assert_eq!(state.last_log_id, Some(log_id(60)));
        let entries = log.try_get_log_entries(..).await.expect("entries");
        let indexes: Vec<u64> = entries.iter().map(|e| e.log_id.index).collect();
        assert_eq!(indexes, (51..=60).collect::<Vec<_>>());
    });
    assert_eq!(sm.shared().applied_index(), Some(60));
}

#[test]
fn missing_segment_is_reported() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let (mut log, _sm) = open_with(dir.path(), 10, 8192).expect("open");
        let mut entries = vec![membership_entry(1)];
        entries.extend((2..=60).map(|i| put_entry(i, "/k", &[5u8; 500])));
        block_on(write_log(&mut log, entries));
    }
    std::fs::remove_file(segment(dir.path(), 2)).expect("remove");
    let err = reopen_err(dir.path());
    assert!(
        matches!(&err, DiskError::Corrupt { what, .. } if what.contains("missing")),
        "{err}"
    );
}

#[test]
fn log_purged_past_the_snapshot_is_reported() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let (mut log, mut sm) = open(dir.path(), 10).expect("open");
        block_on(async {
            let entries = vec![membership_entry(1), put_entry(2, "/k", b"v")];
            write_log(&mut log, entries.clone()).await;
            sm.apply(entries).await.expect("apply");
            sm.get_snapshot_builder()
                .await
                .build_snapshot()
                .await
                .expect("snapshot");
            log.purge(log_id(2)).await.expect("purge");
        });
    }
    std::fs::remove_file(dir.path().join(SNAPSHOT_FILE)).expect("remove snapshot");
    let err = reopen_err(dir.path());
    assert!(
        matches!(&err, DiskError::Corrupt { what, .. } if what.contains("purged")),
        "{err}"
    );
}

#[test]
fn damaged_snapshot_is_reported() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let (_log, mut sm) = open(dir.path(), 10).expect("open");
        block_on(async {
            sm.apply(vec![membership_entry(1), put_entry(2, "/k", SAMPLE)])
                .await
                .expect("apply");
            sm.get_snapshot_builder()
                .await
                .build_snapshot()
                .await
                .expect("snapshot");
        });
    }
    flip_sample(&dir.path().join(SNAPSHOT_FILE));
    let err = reopen_err(dir.path());
    assert!(
        matches!(&err, DiskError::Corrupt { what, .. } if what.contains("checksum")),
        "{err}"
    );
}
