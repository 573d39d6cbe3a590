//! Keelson's control plane: the Kubernetes-compatible API server over a Raft-replicated,
//! revisioned store, the scheduler and the controllers. Under construction: see the README's
//! status table.
#![deny(missing_docs)]

pub mod store;
