//! Keelson's own API kinds, shared by the API server (which serves them) and by kube-rs
//! clients such as the provisioner (which read and write them). I/O-free: types, constants
//! and their wire form only.
//!
//! Each kind implements `k8s_openapi::Resource`, `ListableResource` and `Metadata`, so that
//! `kube::Api<Machine>` works as for the built-in types; with the `schemars` feature it also
//! has the JSON schema the API server publishes in its OpenAPI documents.
#![deny(missing_docs)]

pub mod bootstrap_token;
pub mod machine;

pub use machine::{Machine, MachineSpec, MachineState, MachineStatus};

/// The API group of Keelson's provisioning kinds.
pub const PROVISIONING_GROUP: &str = "provisioning.keelson.dev";
