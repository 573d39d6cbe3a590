//! Container logs: the CRI log format the supervisors write ([`cri`]), rotated by size
//! ([`rotate`]), and the agent's HTTP
//! endpoint that serves them to the API server for `kubectl logs` ([`server`]), which also
//! runs `kubectl exec` sessions ([`exec`]) and `kubectl attach` sessions ([`attach`]).

pub mod attach;
pub mod cri;
pub mod exec;
pub mod rotate;
pub mod server;
