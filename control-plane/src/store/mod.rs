//! The control plane's store: a revisioned key-value model ([`mvcc`]) replicated with Raft
//! (one type configuration in [`types`]), persisted on disk ([`storage`]), talking gRPC
//! ([`network`]), with watches ([`watch`]). [`Store`] ([`node`]) is a running member and the
//! API for code in the same process; [`StoreClient`] ([`client`]) reaches a cluster from
//! another process.

mod batch;
pub mod client;
mod log;
pub mod mvcc;
pub mod network;
pub mod node;
mod snapshot;
pub mod storage;
pub mod types;
mod verbs;
mod wal;
pub mod watch;
mod writer;

pub use client::{ClientError, StoreClient};
pub use mvcc::{
    Command, Continue, Event, EventKind, KeyValue, Outcome, RangeRequest, RangeResponse, Revision,
    WriteResult,
};
pub use node::{Consistency, Store, StoreConfig, StoreError};
pub use watch::WatchStream;
