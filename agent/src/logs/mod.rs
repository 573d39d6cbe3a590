//! Container logs: the CRI log format the supervisors write ([`cri`]) and the agent's HTTP
//! endpoint that serves them to the API server for `kubectl logs` ([`server`]).

pub mod cri;
pub mod server;
