//! Integration tests of the control-plane store: in-process clusters over gRPC on 127.0.0.1,
//! a linearizability check of a client history, and real `keelson-server` processes killed
//! with SIGKILL.

mod cluster;
mod linearizability;
mod processes;
mod support;
