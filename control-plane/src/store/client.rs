//! A client of a store cluster from outside its members (other processes, tests, benchmarks):
//! it talks to the members' gRPC endpoints, follows leader hints for writes and moves on to
//! another member when one is down.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use crate::store::mvcc::{
    Command, KeyValue, MvccError, RangeRequest, RangeResponse, Revision, WriteResult,
};
use crate::store::network::{
    LeaderFailure, LeaderRequest, LeaderResponse, ReadFailure, RpcClient, RpcRequest, RpcResponse,
};
use crate::store::node::Consistency;

/// How long to wait before trying again when no member could serve a request.
const RETRY_DELAY: Duration = Duration::from_millis(25);

/// Errors of [`StoreClient`].
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No member served the request before the deadline; a write was not applied.
    #[error("{op}: no member could serve the request within {after:?} ({reason})")]
    Unavailable {
        /// The operation.
        op: &'static str,
        /// The deadline.
        after: Duration,
        /// The last obstacle seen.
        reason: String,
    },
    /// A write reached a leader but its outcome is unknown.
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
    /// A compacted or future revision, or a bad continuation.
    #[error(transparent)]
    Revision(#[from] MvccError),
}

/// Local result alias for this module.
pub type Result<T, E = ClientError> = std::result::Result<T, E>;

/// A client of a store cluster, given the members' gRPC addresses.
#[derive(Debug)]
pub struct StoreClient {
    rpc: RpcClient,
    members: Vec<String>,
    timeout: Duration,
    preferred: Mutex<Option<String>>,
}

impl StoreClient {
    /// A client of the cluster whose members serve at `members` (`host:port`), with a deadline
    /// of `timeout` per request, retries included.
    pub fn new(members: Vec<String>, timeout: Duration) -> Self {
        StoreClient {
            rpc: RpcClient::default(),
            members,
            timeout,
            preferred: Mutex::new(None),
        }
    }

    /// The member this client last found to be the leader.
    pub fn leader_hint(&self) -> Option<String> {
        self.preferred
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    fn set_hint(&self, addr: Option<String>) {
        *self
            .preferred
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = addr;
    }

    /// The member to send attempt number `attempt` to: the known leader, else round robin.
    fn target(&self, attempt: usize) -> String {
        if let Some(addr) = self.leader_hint() {
            return addr;
        }
        self.members[attempt % self.members.len().max(1)].clone()
    }

    /// Apply `command` on the leader.
    ///
    /// # Errors
    /// [`ClientError::Unavailable`] (not applied), [`ClientError::Indeterminate`],
    /// [`ClientError::Refused`].
    pub async fn write(&self, op: &'static str, command: Command) -> Result<WriteResult> {
        let deadline = Instant::now() + self.timeout;
        let request = RpcRequest::Leader(LeaderRequest::Write(command));
        let mut obstacle = String::from("no member tried");
        for attempt in 0.. {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining < RETRY_DELAY || self.members.is_empty() {
                break;
            }
            let addr = self.target(attempt);
            match self.rpc.call(&addr, &request, remaining).await {
                Ok(RpcResponse::Leader(Ok(LeaderResponse::Write(result)))) => {
                    self.set_hint(Some(addr));
                    return Ok(result);
                }
                Ok(RpcResponse::Leader(Err(LeaderFailure::NotLeader { leader }))) => {
                    obstacle = format!("{addr} is not the leader");
                    let next = leader.map(|(_, a)| a);
                    let redirected = next.is_some();
                    self.set_hint(next);
                    if redirected {
                        continue;
                    }
                }
                Ok(RpcResponse::Leader(Err(LeaderFailure::NoQuorum(reason)))) => {
                    self.set_hint(None);
                    obstacle = reason;
                }
                Ok(RpcResponse::Leader(Err(failure))) => {
                    return Err(ClientError::Refused { op, failure });
                }
                Ok(_) => {
                    return Err(ClientError::Refused {
                        op,
                        failure: LeaderFailure::Failed("unexpected response kind".into()),
                    });
                }
                Err(err) if err.surely_not_delivered() => {
                    self.set_hint(None);
                    obstacle = err.to_string();
                }
                Err(err) => {
                    self.set_hint(None);
                    return Err(ClientError::Indeterminate {
                        op,
                        reason: err.to_string(),
                    });
                }
            }
            tokio::time::sleep(RETRY_DELAY).await;
        }
        Err(ClientError::Unavailable {
            op,
            after: self.timeout,
            reason: obstacle,
        })
    }

    crate::store::verbs::write_verbs!(
        "As [`StoreClient::write`]: [`ClientError::Unavailable`] (not applied), \
         [`ClientError::Indeterminate`], [`ClientError::Refused`]."
    );

    /// Read a range from any member that can serve it.
    ///
    /// # Errors
    /// [`ClientError::Revision`], [`ClientError::Unavailable`].
    pub async fn range(
        &self,
        request: &RangeRequest,
        consistency: Consistency,
    ) -> Result<RangeResponse> {
        let deadline = Instant::now() + self.timeout;
        let rpc = RpcRequest::Read {
            request: request.clone(),
            consistency,
        };
        let mut obstacle = String::from("no member tried");
        for attempt in 0.. {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining < RETRY_DELAY || self.members.is_empty() {
                break;
            }
            let addr = self.members[attempt % self.members.len()].clone();
            match self.rpc.call(&addr, &rpc, remaining).await {
                Ok(RpcResponse::Read(Ok(response))) => return Ok(response),
                Ok(RpcResponse::Read(Err(ReadFailure::Revision(e)))) => return Err(e.into()),
                Ok(RpcResponse::Read(Err(ReadFailure::Unavailable(reason)))) => obstacle = reason,
                Ok(_) => obstacle = format!("{addr}: unexpected response kind"),
                Err(err) => obstacle = err.to_string(),
            }
            if attempt % self.members.len() == self.members.len() - 1 {
                tokio::time::sleep(RETRY_DELAY).await;
            }
        }
        Err(ClientError::Unavailable {
            op: "read",
            after: self.timeout,
            reason: obstacle,
        })
    }

    /// The key, read from any member.
    ///
    /// # Errors
    /// As [`StoreClient::range`].
    pub async fn get(
        &self,
        key: &str,
        revision: Option<Revision>,
        consistency: Consistency,
    ) -> Result<Option<KeyValue>> {
        // Keys sort before their extensions, so the first key with this prefix is the key.
        let request = RangeRequest {
            prefix: key.to_string(),
            limit: 1,
            revision,
            continue_from: None,
        };
        let response = self.range(&request, consistency).await?;
        Ok(response.kvs.into_iter().next().filter(|kv| kv.key == key))
    }
}
