//! Host-side stub of Keelson's eBPF programs crate.
//!
//! The programs themselves live in `main.rs` and only build for `bpfel-unknown-none`. This
//! library exists so that the agent can declare a build-dependency on the crate, which makes
//! cargo rebuild the agent (and re-embed the object) whenever the programs change.
#![no_std]
