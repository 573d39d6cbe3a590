//! Group commit: concurrent writes on the leader are gathered into one Raft log entry, so that
//! one append (one fsync on every member) and one replication round trip cover all of them.
//!
//! A single task takes the first waiting write, waits for one of a few in-flight slots, then
//! drains whatever else queued up meanwhile (up to [`MAX_BATCH`]) and proposes the batch. Under
//! low load a write goes out alone at once; under high load batches grow while earlier ones are
//! being committed.

use std::sync::Arc;

use openraft::error::{ClientWriteError, ForwardToLeader, RaftError};
use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::store::mvcc::{Command, WriteResult};
use crate::store::network::LeaderFailure;
use crate::store::types::{Node, NodeId, Raft};

/// Most commands in one log entry.
pub const MAX_BATCH: usize = 512;
/// Batches proposed but not yet committed at once.
const MAX_IN_FLIGHT: usize = 2;
/// Writes waiting to be batched before submitters wait.
const QUEUE: usize = 4096;

type Reply = oneshot::Sender<Result<WriteResult, LeaderFailure>>;

/// The leader hint carried by openraft's forward-to-leader error, as a [`LeaderFailure`].
pub(crate) fn not_leader(f: ForwardToLeader<NodeId, Node>) -> LeaderFailure {
    LeaderFailure::NotLeader {
        leader: f.leader_id.zip(f.leader_node.map(|n| n.addr)),
    }
}

/// A failed client write or membership change, as a [`LeaderFailure`].
pub(crate) fn write_error(e: RaftError<NodeId, ClientWriteError<NodeId, Node>>) -> LeaderFailure {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => not_leader(f),
        other => LeaderFailure::Failed(other.to_string()),
    }
}

/// Submits writes to Raft in batches.
#[derive(Debug, Clone)]
pub(crate) struct WriteBatcher {
    tx: mpsc::Sender<(Command, Reply)>,
}

impl WriteBatcher {
    /// Start the batching task for `raft`; it ends when every handle is dropped.
    pub(crate) fn start(raft: Raft) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(run(raft, rx));
        WriteBatcher { tx }
    }

    /// Propose `command` (as part of a batch) and wait for its result.
    pub(crate) async fn write(&self, command: Command) -> Result<WriteResult, LeaderFailure> {
        let (reply, result) = oneshot::channel();
        self.tx
            .send((command, reply))
            .await
            .map_err(|_| LeaderFailure::Failed("write batcher stopped".into()))?;
        result
            .await
            .map_err(|_| LeaderFailure::Failed("write dropped before commit".into()))?
    }
}

async fn run(raft: Raft, mut rx: mpsc::Receiver<(Command, Reply)>) {
    let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    while let Some(first) = rx.recv().await {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            break;
        };
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        let raft = raft.clone();
        tokio::spawn(async move {
            let (commands, replies): (Vec<Command>, Vec<Reply>) = batch.into_iter().unzip();
            let count = commands.len();
            match raft.client_write(commands).await {
                Ok(response) if response.data.len() == count => {
                    for (reply, result) in replies.into_iter().zip(response.data) {
                        let _ = reply.send(Ok(result));
                    }
                }
                Ok(response) => {
                    let failure = LeaderFailure::Failed(format!(
                        "batch of {count} writes produced {} results",
                        response.data.len()
                    ));
                    for reply in replies {
                        let _ = reply.send(Err(failure.clone()));
                    }
                }
                Err(e) => {
                    let failure = write_error(e);
                    for reply in replies {
                        let _ = reply.send(Err(failure.clone()));
                    }
                }
            }
            drop(slot);
        });
    }
}
