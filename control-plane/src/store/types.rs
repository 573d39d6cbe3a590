//! The one Raft type configuration of the store, shared by storage, network and service.

use std::io::Cursor;

use crate::store::mvcc::{Command, WriteResult};

/// Identifies a store member.
pub type NodeId = u64;

/// A member's address as Raft knows it: `addr` is the member's gRPC `host:port`.
pub type Node = openraft::BasicNode;

openraft::declare_raft_types!(
    /// The Raft type configuration of the control-plane store: a log entry carries a batch of
    /// [`Command`]s (concurrent writes grouped by the leader, so that one fsync covers them
    /// all), applying it yields one [`WriteResult`] per command (none for blank and membership
    /// entries), snapshots are an encoded [`crate::store::mvcc::MvccState`] in memory.
    pub TypeConfig:
        D = Vec<Command>,
        R = Vec<WriteResult>,
        NodeId = NodeId,
        Node = Node,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

/// The Raft instance of the store.
pub type Raft = openraft::Raft<TypeConfig>;

/// A log entry of the store.
pub type Entry = openraft::Entry<TypeConfig>;
