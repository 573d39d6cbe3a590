//! Pod lifecycle on this node: the pods bound to it (watched through the API) become sandboxes
//! and containers run by per-container supervisors; restarts follow the restart policy with
//! back-off; deletion stops containers gracefully; status goes back through `pods/status`.

pub mod bundle;
pub mod console;
pub mod events;
pub mod layout;
pub mod probe;
mod quantity;
pub mod sandbox;
pub(crate) mod status;
pub mod supervisor;
mod sync;
pub mod volumes;

pub use layout::{ExitRecord, PodRecord, StateLayout};
pub use quantity::memory_bytes;
pub use supervisor::{SuperviseSpec, supervise};
pub use sync::{PodManager, PodManagerConfig, PodNetwork};
