//! Raft RPCs and leader forwarding over gRPC (tonic), without generated code.
//!
//! Every message travels through one unary gRPC method, `/keelson.store.v1.Raft/Call`, whose
//! payload is a postcard-encoded [`RpcRequest`] and whose answer is an [`RpcResponse`]. This
//! keeps the build free of `protoc` while using tonic's HTTP/2 transport, framing, deadlines and
//! connection handling. The same channel carries openraft's own RPCs (append entries, vote,
//! snapshot chunks) and the store's requests that only a leader can serve (writes, read index,
//! membership changes), which followers forward.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BufMut};
use openraft::error::{
    InstallSnapshotError, NetworkError as RaftNetworkError, RPCError, RaftError, RemoteError,
    Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http;
use tonic::server::NamedService;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, Endpoint};

use crate::store::mvcc::{Command, MvccError, RangeRequest, RangeResponse, WriteResult};
use crate::store::node::Consistency;
use crate::store::types::{Node, NodeId, TypeConfig};

/// The gRPC service name.
pub const SERVICE_NAME: &str = "keelson.store.v1.Raft";
const CALL_PATH: &str = "/keelson.store.v1.Raft/Call";
/// Largest message accepted or sent (snapshot chunks are far smaller).
const MAX_MESSAGE: usize = 64 * 1024 * 1024;

/// Errors of the RPC transport.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    /// The peer's address is not a valid URI.
    #[error("invalid peer address {addr}: {source}")]
    Address {
        /// The address.
        addr: String,
        /// The cause.
        source: tonic::transport::Error,
    },
    /// The call failed in transport or on the server.
    #[error("rpc to {addr}: {source}")]
    Status {
        /// The peer.
        addr: String,
        /// The gRPC status.
        source: tonic::Status,
    },
    /// The call did not finish in time.
    #[error("rpc to {addr} timed out after {after:?}")]
    Timeout {
        /// The peer.
        addr: String,
        /// The deadline that passed.
        after: Duration,
    },
    /// A message could not be encoded or decoded.
    #[error("rpc to {addr}: bad message: {source}")]
    Codec {
        /// The peer.
        addr: String,
        /// The cause.
        source: postcard::Error,
    },
    /// The peer answered with a response of the wrong kind.
    #[error("rpc to {addr}: unexpected response kind")]
    UnexpectedResponse {
        /// The peer.
        addr: String,
    },
    /// The listener for incoming RPCs failed.
    #[error("rpc server: {source}")]
    Serve {
        /// The cause.
        source: tonic::transport::Error,
    },
}

impl NetworkError {
    /// Whether the request surely never reached the peer (the connection was refused), so that
    /// retrying it elsewhere cannot apply it twice.
    pub fn surely_not_delivered(&self) -> bool {
        let NetworkError::Status { source, .. } = self else {
            return matches!(self, NetworkError::Address { .. });
        };
        let mut cause: Option<&(dyn std::error::Error + 'static)> =
            std::error::Error::source(source);
        while let Some(err) = cause {
            if let Some(io) = err.downcast_ref::<std::io::Error>()
                && io.kind() == std::io::ErrorKind::ConnectionRefused
            {
                return true;
            }
            cause = err.source();
        }
        false
    }
}

/// Local result alias for this module.
pub type Result<T, E = NetworkError> = std::result::Result<T, E>;

/// A request that only the leader can serve.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum LeaderRequest {
    /// Replicate and apply a write.
    Write(Command),
    /// Confirm leadership with a quorum and return the log index a linearizable read must wait
    /// for.
    ReadIndex,
    /// Add a member: first as a learner that catches up, then as a voter.
    AddMember {
        /// The new member's id.
        id: NodeId,
        /// Its gRPC address (`host:port`).
        addr: String,
    },
    /// Remove a member from the voters and from the cluster.
    RemoveMember {
        /// The member's id.
        id: NodeId,
    },
}

/// The leader's answer to a [`LeaderRequest`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum LeaderResponse {
    /// The applied write.
    Write(WriteResult),
    /// The read index.
    ReadIndex(u64),
    /// A membership change was committed.
    MembershipChanged,
}

/// Why a member could not serve a [`LeaderRequest`].
#[derive(Debug, Clone, Serialize, Deserialize, thiserror::Error)]
pub enum LeaderFailure {
    /// This member is not the leader; the leader it knows of, if any.
    #[error("not the leader (leader: {leader:?})")]
    NotLeader {
        /// The leader's id and address.
        leader: Option<(NodeId, String)>,
    },
    /// The leader could not reach a quorum.
    #[error("no quorum: {0}")]
    NoQuorum(String),
    /// Any other failure, as text.
    #[error("{0}")]
    Failed(String),
}

/// Everything sent over the wire.
#[derive(Debug, Serialize, Deserialize)]
#[allow(clippy::large_enum_variant)]
pub enum RpcRequest {
    /// openraft's append-entries (also heartbeats).
    AppendEntries(AppendEntriesRequest<TypeConfig>),
    /// openraft's vote.
    Vote(VoteRequest<NodeId>),
    /// One chunk of a snapshot.
    InstallSnapshot(InstallSnapshotRequest<TypeConfig>),
    /// A request for the leader.
    Leader(LeaderRequest),
    /// A range read served by the receiving member.
    Read {
        /// What to read.
        request: RangeRequest,
        /// Linearizable (read index) or serializable (local state as is).
        consistency: Consistency,
    },
}

/// Answers to [`RpcRequest`]s, variant for variant.
#[derive(Debug, Serialize, Deserialize)]
pub enum RpcResponse {
    /// Answer to [`RpcRequest::AppendEntries`].
    AppendEntries(Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>),
    /// Answer to [`RpcRequest::Vote`].
    Vote(Result<VoteResponse<NodeId>, RaftError<NodeId>>),
    /// Answer to [`RpcRequest::InstallSnapshot`].
    InstallSnapshot(
        Result<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>>,
    ),
    /// Answer to [`RpcRequest::Leader`].
    Leader(Result<LeaderResponse, LeaderFailure>),
    /// Answer to [`RpcRequest::Read`].
    Read(Result<RangeResponse, ReadFailure>),
}

/// Why a member could not serve a [`RpcRequest::Read`].
#[derive(Debug, Clone, Serialize, Deserialize, thiserror::Error)]
pub enum ReadFailure {
    /// A compacted or future revision, or a bad continuation.
    #[error(transparent)]
    Revision(MvccError),
    /// No quorum confirmed the read in time (linearizable reads).
    #[error("unavailable: {0}")]
    Unavailable(String),
}

/// What serves incoming RPCs (the member itself).
pub(crate) trait RpcHandler: Send + Sync + 'static {
    /// Serve one request.
    fn handle(&self, request: RpcRequest)
    -> Pin<Box<dyn Future<Output = RpcResponse> + Send + '_>>;
}

/// A gRPC codec that passes raw bytes through.
#[derive(Debug, Clone, Copy, Default)]
struct BytesCodec;

impl Codec for BytesCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = BytesCodec;
    type Decoder = BytesCodec;

    fn encoder(&mut self) -> Self::Encoder {
        BytesCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        BytesCodec
    }
}

impl Encoder for BytesCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for BytesCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        Ok(Some(src.copy_to_bytes(src.remaining()).to_vec()))
    }
}

/// Client side: one lazily connected channel per peer address.
#[derive(Debug, Clone, Default)]
pub struct RpcClient {
    channels: Arc<Mutex<HashMap<String, Channel>>>,
}

impl RpcClient {
    fn channel(&self, addr: &str) -> Result<Channel> {
        let mut channels = self
            .channels
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(channel) = channels.get(addr) {
            return Ok(channel.clone());
        }
        let endpoint = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|source| NetworkError::Address {
                addr: addr.to_string(),
                source,
            })?
            .connect_timeout(Duration::from_secs(1))
            .tcp_nodelay(true);
        let channel = endpoint.connect_lazy();
        channels.insert(addr.to_string(), channel.clone());
        Ok(channel)
    }

    /// Send `request` to the member at `addr` and wait at most `timeout` for its answer.
    ///
    /// # Errors
    /// [`NetworkError`] for transport failures, timeouts and undecodable answers.
    pub async fn call(
        &self,
        addr: &str,
        request: &RpcRequest,
        timeout: Duration,
    ) -> Result<RpcResponse> {
        let codec_err = |source| NetworkError::Codec {
            addr: addr.to_string(),
            source,
        };
        let payload = postcard::to_allocvec(request).map_err(codec_err)?;
        let channel = self.channel(addr)?;
        let call = async move {
            let mut grpc = tonic::client::Grpc::new(channel)
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE);
            grpc.ready()
                .await
                .map_err(|e| tonic::Status::unavailable(format!("connection not ready: {e}")))?;
            grpc.unary(
                tonic::Request::new(payload),
                http::uri::PathAndQuery::from_static(CALL_PATH),
                BytesCodec,
            )
            .await
        };
        let response = tokio::time::timeout(timeout, call)
            .await
            .map_err(|_| NetworkError::Timeout {
                addr: addr.to_string(),
                after: timeout,
            })?
            .map_err(|source| NetworkError::Status {
                addr: addr.to_string(),
                source,
            })?;
        postcard::from_bytes(&response.into_inner()).map_err(codec_err)
    }
}

/// openraft's network factory over [`RpcClient`].
#[derive(Debug, Clone, Default)]
pub struct Network {
    client: RpcClient,
}

impl Network {
    /// A factory sharing `client`'s connections.
    pub fn new(client: RpcClient) -> Self {
        Network { client }
    }
}

/// A connection to one peer, as openraft uses it.
#[derive(Debug)]
pub struct PeerConnection {
    target: NodeId,
    addr: String,
    client: RpcClient,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerConnection;

    async fn new_client(&mut self, target: NodeId, node: &Node) -> PeerConnection {
        PeerConnection {
            target,
            addr: node.addr.clone(),
            client: self.client.clone(),
        }
    }
}

fn to_rpc_error<E: std::error::Error>(err: NetworkError) -> RPCError<NodeId, Node, E> {
    match &err {
        NetworkError::Status { source, .. } if source.code() == tonic::Code::Unavailable => {
            RPCError::Unreachable(Unreachable::new(&err))
        }
        _ => RPCError::Network(RaftNetworkError::new(&err)),
    }
}

impl PeerConnection {
    async fn call(&self, request: RpcRequest, option: &RPCOption) -> Result<RpcResponse> {
        self.client
            .call(&self.addr, &request, option.hard_ttl())
            .await
    }

    fn unexpected(&self) -> NetworkError {
        NetworkError::UnexpectedResponse {
            addr: self.addr.clone(),
        }
    }
}

impl RaftNetwork<TypeConfig> for PeerConnection {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, Node, RaftError<NodeId>>> {
        match self.call(RpcRequest::AppendEntries(rpc), &option).await {
            Ok(RpcResponse::AppendEntries(result)) => {
                result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            Ok(_) => Err(to_rpc_error(self.unexpected())),
            Err(e) => Err(to_rpc_error(e)),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, Node, RaftError<NodeId, InstallSnapshotError>>,
    > {
        match self.call(RpcRequest::InstallSnapshot(rpc), &option).await {
            Ok(RpcResponse::InstallSnapshot(result)) => {
                result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            Ok(_) => Err(to_rpc_error(self.unexpected())),
            Err(e) => Err(to_rpc_error(e)),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, Node, RaftError<NodeId>>> {
        match self.call(RpcRequest::Vote(rpc), &option).await {
            Ok(RpcResponse::Vote(result)) => {
                result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            Ok(_) => Err(to_rpc_error(self.unexpected())),
            Err(e) => Err(to_rpc_error(e)),
        }
    }

    fn backoff(&self) -> openraft::network::Backoff {
        openraft::network::Backoff::new(std::iter::repeat(Duration::from_millis(100)))
    }
}

/// Server side: the tower service tonic routes `/keelson.store.v1.Raft/*` to.
#[derive(Clone)]
struct RaftService {
    handler: Arc<dyn RpcHandler>,
}

impl NamedService for RaftService {
    const NAME: &'static str = SERVICE_NAME;
}

#[derive(Clone)]
struct CallMethod {
    handler: Arc<dyn RpcHandler>,
}

impl tonic::codegen::Service<tonic::Request<Vec<u8>>> for CallMethod {
    type Response = tonic::Response<Vec<u8>>;
    type Error = tonic::Status;
    type Future =
        Pin<Box<dyn Future<Output = Result<tonic::Response<Vec<u8>>, tonic::Status>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), tonic::Status>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: tonic::Request<Vec<u8>>) -> Self::Future {
        let handler = self.handler.clone();
        Box::pin(async move {
            let request: RpcRequest = postcard::from_bytes(request.get_ref())
                .map_err(|e| tonic::Status::invalid_argument(format!("bad request: {e}")))?;
            let response = handler.handle(request).await;
            let bytes = postcard::to_allocvec(&response)
                .map_err(|e| tonic::Status::internal(format!("encoding response: {e}")))?;
            Ok(tonic::Response::new(bytes))
        })
    }
}

impl<B> tonic::codegen::Service<http::Request<B>> for RaftService
where
    B: tonic::codegen::Body + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if request.uri().path() != CALL_PATH {
            let status = tonic::Status::unimplemented(request.uri().path().to_string());
            return Box::pin(async move { Ok(status.into_http()) });
        }
        let method = CallMethod {
            handler: self.handler.clone(),
        };
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(BytesCodec)
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE);
            Ok(grpc.unary(method, request).await)
        })
    }
}

/// Serve RPCs on `listener` until `shutdown` completes.
pub(crate) async fn serve(
    listener: TcpListener,
    handler: Arc<dyn RpcHandler>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<()> {
    // The builder's `tcp_nodelay` only applies to listeners it binds itself: without it here,
    // Nagle's algorithm held back small answers until the peer's delayed ACK (tens of ms).
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    tonic::transport::Server::builder()
        .add_service(RaftService { handler })
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
        .map_err(|source| NetworkError::Serve { source })
}
