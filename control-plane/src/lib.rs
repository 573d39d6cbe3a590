//! Keelson's control plane: the Raft-replicated, revisioned store ([`store`]) and the
//! Kubernetes-compatible API server (`keelson-apiserver`) over it ([`api_storage`]). The
//! scheduler and the controllers join them as they land (see the README's status table).
#![deny(missing_docs)]

pub mod api_storage;
pub mod store;
pub mod tokens;
