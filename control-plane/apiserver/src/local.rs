//! A client inside the API server's own process: requests go straight to the router, with the
//! caller's identity attached, instead of through TLS, HTTP and loopback sockets.
//!
//! `keelson-server` runs the scheduler and controllers on the member that serves the API;
//! with this transport they keep the API's semantics (authentication and authorization,
//! admission, optimistic concurrency, watches) without paying for encryption and framing
//! twice per request, which dominated their cost at thousands of bindings per second.

use std::sync::Arc;

use crate::{
    Api,
    auth::{PeerIdentity, User},
};

impl Api {
    /// A kube-rs client whose requests this API serves in-process, as `user`.
    ///
    /// Needs a Tokio runtime (the client's request buffer runs as a task).
    pub fn local_client(self: &Arc<Self>, user: User) -> kube::Client {
        let identity = PeerIdentity(Some(user));
        let service = tower::ServiceExt::map_request(
            self.router(),
            move |mut req: axum::http::Request<kube::client::Body>| {
                req.extensions_mut().insert(identity.clone());
                req
            },
        );
        kube::Client::new(service, "default")
    }
}
