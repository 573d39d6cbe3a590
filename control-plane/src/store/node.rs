//! One store member: the Raft instance wired to its disk storage, its gRPC network and the
//! client API ([`Store`]).
//!
//! Writes go to the leader: a member that is not the leader forwards them over the same gRPC
//! channel the Raft RPCs use, and retries while the leader is unknown or changing, until the
//! request deadline. Reads are either linearizable (read index: the leader confirms its
//! leadership with a quorum and names a log index, and this member waits until it has applied
//! that index before reading locally) or serializable (straight from the local state, possibly
//! stale). Without a quorum, every call fails with [`StoreError::Unavailable`] after the
//! deadline instead of hanging.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::error::{CheckIsLeaderError, RaftError};
use openraft::{ChangeMembers, SnapshotPolicy};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::store::batch::{WriteBatcher, not_leader, write_error};
use crate::store::mvcc::{
    Command, KeyValue, MvccError, RangeRequest, RangeResponse, Revision, WriteResult,
};
use crate::store::network::{
    self, LeaderFailure, LeaderRequest, LeaderResponse, Network, NetworkError, ReadFailure,
    RpcClient, RpcHandler, RpcRequest, RpcResponse,
};
use crate::store::storage::{self, DiskError, OpenGuard, SharedState};
use crate::store::types::{Node, NodeId, Raft};
use crate::store::watch::{DEFAULT_WATCH_BUFFER, WatchStream};

/// How long to wait before asking again while no leader is known.
const RETRY_DELAY: Duration = Duration::from_millis(25);

/// Errors of the store's client API.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The on-disk state could not be opened or is corrupt.
    #[error(transparent)]
    Disk(#[from] DiskError),
    /// The Raft configuration is invalid.
    #[error("invalid raft configuration: {0}")]
    Config(#[source] Box<openraft::ConfigError>),
    /// The listener's address could not be read.
    #[error("reading the listen address: {0}")]
    Listen(#[source] std::io::Error),
    /// The Raft core stopped (shut down or a fatal storage error).
    #[error("member {id} stopped: {reason}")]
    Stopped {
        /// This member.
        id: NodeId,
        /// Why.
        reason: String,
    },
    /// A read or watch asked for a compacted or future revision (compacted: HTTP 410 Gone).
    #[error(transparent)]
    Revision(#[from] MvccError),
    /// No leader with a quorum answered before the deadline; nothing was written.
    #[error("{op}: no leader with a quorum reachable within {after:?} ({reason})")]
    Unavailable {
        /// The operation.
        op: &'static str,
        /// The deadline.
        after: Duration,
        /// The last obstacle seen.
        reason: String,
    },
    /// A write was handed to a leader but its outcome is unknown (the leader failed or the
    /// deadline passed): it may or may not have been applied.
    #[error("{op}: outcome unknown: {reason}")]
    Indeterminate {
        /// The operation.
        op: &'static str,
        /// What happened.
        reason: String,
    },
    /// The leader refused the request.
    #[error("{op}: {failure}")]
    Refused {
        /// The operation.
        op: &'static str,
        /// The leader's answer.
        failure: LeaderFailure,
    },
    /// The cluster could not be initialized.
    #[error("initializing the cluster: {0}")]
    Initialize(String),
}

impl StoreError {
    /// Whether this is a read or watch of a compacted revision (HTTP 410 Gone).
    pub fn is_compacted(&self) -> bool {
        matches!(self, StoreError::Revision(MvccError::Compacted { .. }))
    }
}

/// Local result alias for this module.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// How a read is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum Consistency {
    /// Sees every write acknowledged before the read started (read index through the leader).
    #[default]
    Linearizable,
    /// Served from this member's applied state at once; may miss the latest writes.
    Serializable,
}

/// Settings of one member. Every member of a cluster must use the same `history_limit`.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    id: NodeId,
    data_dir: PathBuf,
    history_limit: usize,
    request_timeout: Duration,
    heartbeat: Duration,
    election_timeout: (Duration, Duration),
    snapshot_every: u64,
    logs_to_keep: u64,
}

impl StoreConfig {
    /// Defaults for member `id` storing its data under `data_dir`.
    pub fn new(id: NodeId, data_dir: impl Into<PathBuf>) -> Self {
        StoreConfig {
            id,
            data_dir: data_dir.into(),
            history_limit: 10_000,
            request_timeout: Duration::from_secs(5),
            heartbeat: Duration::from_millis(100),
            election_timeout: (Duration::from_millis(400), Duration::from_millis(800)),
            snapshot_every: 10_000,
            logs_to_keep: 1_000,
        }
    }

    /// Past events kept for watches that resume (default 10 000).
    pub fn with_history_limit(mut self, events: usize) -> Self {
        self.history_limit = events;
        self
    }

    /// Deadline of one client call, retries included (default 5 s).
    pub fn with_request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// Build a snapshot every `entries` applied log entries and keep `keep` entries behind it
    /// for followers that lag a little (defaults 10 000 and 1 000).
    pub fn with_snapshots(mut self, entries: u64, keep: u64) -> Self {
        self.snapshot_every = entries;
        self.logs_to_keep = keep;
        self
    }

    /// Heartbeat interval and election timeout range (defaults 100 ms, 400–800 ms).
    pub fn with_timing(mut self, heartbeat: Duration, election: (Duration, Duration)) -> Self {
        self.heartbeat = heartbeat;
        self.election_timeout = election;
        self
    }

    fn raft_config(&self) -> Result<openraft::Config> {
        let millis = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        let config = openraft::Config {
            cluster_name: "keelson".into(),
            heartbeat_interval: millis(self.heartbeat),
            election_timeout_min: millis(self.election_timeout.0),
            election_timeout_max: millis(self.election_timeout.1),
            snapshot_policy: SnapshotPolicy::LogsSinceLast(self.snapshot_every),
            max_in_snapshot_log_to_keep: self.logs_to_keep,
            ..Default::default()
        };
        config
            .validate()
            .map_err(|e| StoreError::Config(Box::new(e)))
    }
}

struct Inner {
    id: NodeId,
    raft: Raft,
    batcher: WriteBatcher,
    state: SharedState,
    client: RpcClient,
    timeout: Duration,
}

impl Inner {
    fn stopped(&self, reason: impl ToString) -> StoreError {
        StoreError::Stopped {
            id: self.id,
            reason: reason.to_string(),
        }
    }

    /// Serve a leader-only request here, or say who the leader is.
    async fn execute_as_leader(
        &self,
        request: LeaderRequest,
    ) -> Result<LeaderResponse, LeaderFailure> {
        match request {
            LeaderRequest::Write(command) => {
                self.batcher.write(command).await.map(LeaderResponse::Write)
            }
            LeaderRequest::ReadIndex => match self.raft.get_read_log_id().await {
                Ok((read, _applied)) => Ok(LeaderResponse::ReadIndex(read.map_or(0, |l| l.index))),
                Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f))) => {
                    Err(not_leader(f))
                }
                Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(q))) => {
                    Err(LeaderFailure::NoQuorum(q.to_string()))
                }
                Err(other) => Err(LeaderFailure::Failed(other.to_string())),
            },
            LeaderRequest::AddMember { id, addr } => {
                self.raft
                    .add_learner(id, Node::new(addr), true)
                    .await
                    .map_err(write_error)?;
                self.raft
                    .change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), false)
                    .await
                    .map_err(write_error)?;
                Ok(LeaderResponse::MembershipChanged)
            }
            LeaderRequest::RemoveMember { id } => {
                self.raft
                    .change_membership(ChangeMembers::RemoveVoters(BTreeSet::from([id])), false)
                    .await
                    .map_err(write_error)?;
                Ok(LeaderResponse::MembershipChanged)
            }
        }
    }

    /// Run `request` on the leader, wherever it is, within `timeout`.
    async fn on_leader(
        &self,
        op: &'static str,
        request: LeaderRequest,
        timeout: Duration,
    ) -> Result<LeaderResponse> {
        let deadline = Instant::now() + timeout;
        let mutating = !matches!(request, LeaderRequest::ReadIndex);
        let unavailable = |reason: String| StoreError::Unavailable {
            op,
            after: timeout,
            reason,
        };
        let mut obstacle = String::from("no leader known");
        loop {
            let local = tokio::time::timeout_at(deadline, self.execute_as_leader(request.clone()));
            let failure = match local.await {
                // A follower answers at once; only a proposal in flight on this member can run
                // into the deadline, and it may still commit.
                Err(_) if mutating => {
                    return Err(StoreError::Indeterminate {
                        op,
                        reason: format!("not committed within {timeout:?}"),
                    });
                }
                Err(_) => return Err(unavailable(obstacle)),
                Ok(Ok(response)) => return Ok(response),
                Ok(Err(failure)) => failure,
            };
            match failure {
                LeaderFailure::NotLeader {
                    leader: Some((leader, addr)),
                } if leader != self.id => {
                    let remaining = deadline.saturating_duration_since(Instant::now());
                    let rpc = RpcRequest::Leader(request.clone());
                    match self.client.call(&addr, &rpc, remaining).await {
                        Ok(RpcResponse::Leader(Ok(response))) => return Ok(response),
                        Ok(RpcResponse::Leader(Err(LeaderFailure::NotLeader { .. }))) => {
                            obstacle = format!("member {leader} is no longer the leader");
                        }
                        Ok(RpcResponse::Leader(Err(LeaderFailure::NoQuorum(reason)))) => {
                            obstacle = reason;
                        }
                        Ok(RpcResponse::Leader(Err(failure))) => {
                            return Err(StoreError::Refused { op, failure });
                        }
                        Ok(_) => {
                            return Err(StoreError::Refused {
                                op,
                                failure: LeaderFailure::Failed("unexpected response kind".into()),
                            });
                        }
                        Err(err) if !mutating || err.surely_not_delivered() => {
                            obstacle = err.to_string();
                        }
                        Err(NetworkError::Timeout { .. }) if Instant::now() >= deadline => {
                            return Err(StoreError::Indeterminate {
                                op,
                                reason: format!(
                                    "leader {leader} did not answer within {timeout:?}"
                                ),
                            });
                        }
                        Err(err) => {
                            return Err(StoreError::Indeterminate {
                                op,
                                reason: err.to_string(),
                            });
                        }
                    }
                }
                LeaderFailure::NotLeader { .. } => obstacle = "no leader known".into(),
                LeaderFailure::NoQuorum(reason) => obstacle = reason,
                LeaderFailure::Failed(reason) if self.raft.is_initialized().await.is_err() => {
                    return Err(self.stopped(reason));
                }
                failure => return Err(StoreError::Refused { op, failure }),
            }
            if Instant::now() + RETRY_DELAY >= deadline {
                return Err(unavailable(obstacle));
            }
            tokio::time::sleep(RETRY_DELAY).await;
        }
    }
}

impl Inner {
    async fn read_barrier(&self) -> Result<()> {
        let started = Instant::now();
        let timeout = self.timeout;
        let index = match self
            .on_leader("read", LeaderRequest::ReadIndex, timeout)
            .await?
        {
            LeaderResponse::ReadIndex(index) => index,
            _ => {
                return Err(StoreError::Refused {
                    op: "read",
                    failure: LeaderFailure::Failed("unexpected response kind".into()),
                });
            }
        };
        let remaining = timeout.saturating_sub(started.elapsed());
        self.raft
            .wait(Some(remaining))
            .applied_index_at_least(Some(index), "read index")
            .await
            .map_err(|e| StoreError::Unavailable {
                op: "read",
                after: timeout,
                reason: format!("waiting to apply index {index}: {e}"),
            })?;
        Ok(())
    }

    async fn prepare_read(&self, consistency: Consistency) -> Result<()> {
        match consistency {
            Consistency::Linearizable => self.read_barrier().await,
            Consistency::Serializable => Ok(()),
        }
    }

    async fn range(
        &self,
        request: &RangeRequest,
        consistency: Consistency,
    ) -> Result<RangeResponse> {
        self.prepare_read(consistency).await?;
        Ok(self.state.read().mvcc.range(request)?)
    }
}

impl RpcHandler for Inner {
    fn handle(
        &self,
        request: RpcRequest,
    ) -> Pin<Box<dyn Future<Output = RpcResponse> + Send + '_>> {
        Box::pin(async move {
            match request {
                RpcRequest::AppendEntries(rpc) => {
                    RpcResponse::AppendEntries(self.raft.append_entries(rpc).await)
                }
                RpcRequest::Vote(rpc) => RpcResponse::Vote(self.raft.vote(rpc).await),
                RpcRequest::InstallSnapshot(rpc) => {
                    RpcResponse::InstallSnapshot(self.raft.install_snapshot(rpc).await)
                }
                RpcRequest::Leader(request) => {
                    RpcResponse::Leader(self.execute_as_leader(request).await)
                }
                RpcRequest::Read {
                    request,
                    consistency,
                } => RpcResponse::Read(self.range(&request, consistency).await.map_err(
                    |e| match e {
                        StoreError::Revision(e) => ReadFailure::Revision(e),
                        other => ReadFailure::Unavailable(other.to_string()),
                    },
                )),
            }
        })
    }
}

/// A running store member and the client API of the replicated store.
pub struct Store {
    inner: Arc<Inner>,
    addr: SocketAddr,
    open: OpenGuard,
    server: Mutex<Option<(oneshot::Sender<()>, JoinHandle<()>)>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("id", &self.inner.id)
            .field("addr", &self.addr)
            .finish()
    }
}

impl Store {
    /// Open the member's data, start Raft and serve RPCs on `listener` (bind port 0 in tests).
    /// A member with existing data resumes its place in the cluster; a new one waits to be
    /// initialized ([`Store::initialize`]) or added by a leader ([`Store::add_member`]).
    ///
    /// # Errors
    /// [`StoreError::Disk`] for unreadable or corrupt data, [`StoreError::Config`],
    /// [`StoreError::Listen`], [`StoreError::Stopped`] if Raft fails to start.
    pub async fn start(config: StoreConfig, listener: TcpListener) -> Result<Store> {
        let addr = listener.local_addr().map_err(StoreError::Listen)?;
        let raft_config = Arc::new(config.raft_config()?);
        let data_dir = config.data_dir.clone();
        let history_limit = config.history_limit;
        let (log, sm) =
            tokio::task::spawn_blocking(move || storage::open(&data_dir, history_limit))
                .await
                .map_err(|e| StoreError::Stopped {
                    id: config.id,
                    reason: format!("opening storage panicked: {e}"),
                })??;
        let state = sm.shared();
        let open = sm.open_guard();
        let client = RpcClient::default();
        let raft = Raft::new(
            config.id,
            raft_config,
            Network::new(client.clone()),
            log,
            sm,
        )
        .await
        .map_err(|e| StoreError::Stopped {
            id: config.id,
            reason: e.to_string(),
        })?;
        let inner = Arc::new(Inner {
            id: config.id,
            batcher: WriteBatcher::start(raft.clone()),
            raft,
            state,
            client,
            timeout: config.request_timeout,
        });
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let handler: Arc<dyn RpcHandler> = inner.clone();
        let id = config.id;
        let server = tokio::spawn(async move {
            let shutdown = async {
                let _ = stop_rx.await;
            };
            if let Err(e) = network::serve(listener, handler, shutdown).await {
                tracing::error!(member = id, error = %e, "rpc server failed");
            }
        });
        tracing::info!(member = id, %addr, "store member started");
        Ok(Store {
            inner,
            addr,
            open,
            server: Mutex::new(Some((stop_tx, server))),
        })
    }

    /// This member's id.
    pub fn id(&self) -> NodeId {
        self.inner.id
    }

    /// The address this member serves RPCs on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The underlying Raft instance (metrics, waits).
    pub fn raft(&self) -> &Raft {
        &self.inner.raft
    }

    /// The last revision applied on this member.
    pub fn local_revision(&self) -> Revision {
        self.inner.state.revision()
    }

    /// The leader this member knows of.
    pub async fn leader(&self) -> Option<NodeId> {
        self.inner.raft.current_leader().await
    }

    /// Bootstrap a new cluster with `members` (id → `host:port`), which must include this
    /// member. Does nothing if this member already belongs to an initialized cluster.
    ///
    /// # Errors
    /// [`StoreError::Initialize`] if Raft refuses (e.g. this member is not in `members`).
    pub async fn initialize(&self, members: BTreeMap<NodeId, String>) -> Result<()> {
        if self
            .inner
            .raft
            .is_initialized()
            .await
            .map_err(|e| self.inner.stopped(e))?
        {
            return Ok(());
        }
        let nodes: BTreeMap<NodeId, Node> = members
            .into_iter()
            .map(|(id, addr)| (id, Node::new(addr)))
            .collect();
        self.inner
            .raft
            .initialize(nodes)
            .await
            .map_err(|e| StoreError::Initialize(e.to_string()))
    }

    /// Add member `id` serving at `addr`: it catches up as a learner (by snapshot if needed),
    /// then becomes a voter. Forwarded to the leader.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`], [`StoreError::Refused`] (e.g. a change already in
    /// progress), [`StoreError::Indeterminate`].
    pub async fn add_member(&self, id: NodeId, addr: impl Into<String>) -> Result<()> {
        let request = LeaderRequest::AddMember {
            id,
            addr: addr.into(),
        };
        self.inner
            .on_leader("add member", request, self.inner.timeout * 6)
            .await
            .map(|_| ())
    }

    /// Ask the cluster that the member at `via` (`host:port`) belongs to to add this member,
    /// advertised at `advertise` (`host:port`); follows the leader hints until the leader has
    /// added it. Does nothing if this member already belongs to a cluster.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] if no leader accepted the request in time;
    /// [`StoreError::Refused`] if the leader refused it.
    pub async fn join(&self, via: &str, advertise: &str) -> Result<()> {
        if self
            .inner
            .raft
            .is_initialized()
            .await
            .map_err(|e| self.inner.stopped(e))?
        {
            return Ok(());
        }
        let timeout = self.inner.timeout * 6;
        let deadline = Instant::now() + timeout;
        let request = RpcRequest::Leader(LeaderRequest::AddMember {
            id: self.inner.id,
            addr: advertise.to_string(),
        });
        let mut target = via.to_string();
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            let obstacle = match self.inner.client.call(&target, &request, remaining).await {
                Ok(RpcResponse::Leader(Ok(_))) => return Ok(()),
                Ok(RpcResponse::Leader(Err(LeaderFailure::NotLeader {
                    leader: Some((_, addr)),
                }))) => {
                    target = addr;
                    format!("redirected to {target}")
                }
                Ok(RpcResponse::Leader(Err(LeaderFailure::NotLeader { leader: None }))) => {
                    target = via.to_string();
                    "no leader known".to_string()
                }
                Ok(RpcResponse::Leader(Err(LeaderFailure::NoQuorum(reason)))) => reason,
                Ok(RpcResponse::Leader(Err(failure))) => {
                    return Err(StoreError::Refused {
                        op: "join",
                        failure,
                    });
                }
                Ok(_) => "unexpected response kind".to_string(),
                Err(e) => e.to_string(),
            };
            if Instant::now() + RETRY_DELAY >= deadline {
                return Err(StoreError::Unavailable {
                    op: "join",
                    after: timeout,
                    reason: obstacle,
                });
            }
            tokio::time::sleep(RETRY_DELAY).await;
        }
    }

    /// Remove member `id` from the cluster. Forwarded to the leader.
    ///
    /// # Errors
    /// As [`Store::add_member`].
    pub async fn remove_member(&self, id: NodeId) -> Result<()> {
        self.inner
            .on_leader(
                "remove member",
                LeaderRequest::RemoveMember { id },
                self.inner.timeout * 2,
            )
            .await
            .map(|_| ())
    }

    async fn write(&self, op: &'static str, command: Command) -> Result<WriteResult> {
        match self
            .inner
            .on_leader(op, LeaderRequest::Write(command), self.inner.timeout)
            .await?
        {
            LeaderResponse::Write(result) => Ok(result),
            _ => Err(StoreError::Refused {
                op,
                failure: LeaderFailure::Failed("unexpected response kind".into()),
            }),
        }
    }

    crate::store::verbs::write_verbs!(
        "[`StoreError::Unavailable`] without a reachable quorum; \
         [`StoreError::Indeterminate`] when the leader failed while the write was in flight."
    );

    /// Wait until this member has applied everything committed before this call (read index).
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] without a reachable quorum.
    pub async fn read_barrier(&self) -> Result<()> {
        self.inner.read_barrier().await
    }

    async fn prepare_read(&self, consistency: Consistency) -> Result<()> {
        self.inner.prepare_read(consistency).await
    }

    /// The key at `revision` (current if None).
    ///
    /// # Errors
    /// [`StoreError::Revision`] for a compacted or future revision;
    /// [`StoreError::Unavailable`] for a linearizable read without a quorum.
    pub async fn get(
        &self,
        key: &str,
        revision: Option<Revision>,
        consistency: Consistency,
    ) -> Result<Option<KeyValue>> {
        self.prepare_read(consistency).await?;
        Ok(self.inner.state.read().mvcc.get(key, revision)?)
    }

    /// A page of keys by prefix (see [`RangeRequest`]).
    ///
    /// # Errors
    /// As [`Store::get`], plus [`MvccError::InvalidContinue`].
    pub async fn range(
        &self,
        request: &RangeRequest,
        consistency: Consistency,
    ) -> Result<RangeResponse> {
        self.inner.range(request, consistency).await
    }

    /// Watch keys under `prefix` for changes after revision `after`: first the retained events
    /// this member has already applied, then new ones as they are applied, in revision order.
    /// When the stream ends, watch again after the last revision received.
    ///
    /// # Errors
    /// [`StoreError::Revision`] ([`StoreError::is_compacted`]: HTTP 410 Gone) when events
    /// after `after` are no longer retained; [`StoreError::Unavailable`] if `after` is ahead of
    /// this member and no quorum confirms it.
    pub async fn watch(&self, prefix: &str, after: Revision) -> Result<WatchStream> {
        if after > self.inner.state.revision() {
            self.read_barrier().await?;
        }
        let mut state = self.inner.state.write();
        let backlog = state.mvcc.events_after(after)?;
        Ok(state
            .watchers
            .register(prefix.to_string(), after, backlog, DEFAULT_WATCH_BUFFER))
    }

    /// Stop serving RPCs and stop Raft. Watches end. Data stays on disk; when this returns, the
    /// data directory is closed (unless closing took more than 10 s, which is logged), so the
    /// member can be started again in the same process.
    pub async fn shutdown(&self) {
        let server = self
            .server
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
        if let Some((stop, task)) = server {
            let _ = stop.send(());
            task.abort();
            let _ = task.await;
        }
        if let Err(e) = self.inner.raft.shutdown().await {
            tracing::warn!(member = self.inner.id, error = %e, "raft shutdown");
        }
        self.inner.state.write().watchers = Default::default();
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.open.is_open() {
            if Instant::now() >= deadline {
                tracing::warn!(member = self.inner.id, "storage still open after shutdown");
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}
