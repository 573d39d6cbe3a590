//! The inventory as the servers use it: a handle to the current [`Inventory`], which the API
//! mode replaces as Machine objects change, plus the two ways the servers talk back to the
//! API side — [`Sighting`]s (a MAC asked for DHCP, fetched its iPXE script or its seed) and
//! a [`JoinIssuer`] that hands out the join credentials written into a machine's user-data.
//! In file mode it is just the file's inventory, with neither.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, RwLock};

use tokio::sync::mpsc;
use uuid::Uuid;

use crate::inventory::Inventory;
use crate::mac::Mac;

/// Something the network side saw a machine do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sighting {
    /// A DHCP request from this MAC, with the SMBIOS UUID it sent (option 97), if any.
    Dhcp(Mac, Option<Uuid>),
    /// The machine fetched its iPXE script (MAC, and UUID if the URL carried one).
    Script(Mac, Option<Uuid>),
    /// The machine fetched a NoCloud seed document (`id` is the target id).
    Seed {
        /// The target id in the URL.
        id: String,
        /// The document, e.g. `user-data`.
        doc: String,
    },
    /// Serving a machine failed.
    Failed {
        /// The target id.
        id: String,
        /// Why.
        message: String,
    },
}

/// What a joining node needs: the API's URL, its CA and a bootstrap token.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinInfo {
    /// The API server URL as nodes reach it.
    pub server: String,
    /// The cluster CA, PEM.
    pub ca_pem: String,
    /// A bootstrap token, `<id>.<secret>`.
    pub token: String,
}

impl std::fmt::Debug for JoinInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JoinInfo")
            .field("server", &self.server)
            .finish_non_exhaustive()
    }
}

/// A boxed future, for [`JoinIssuer`].
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Issues join credentials for a machine (a fresh, short-lived bootstrap token).
pub trait JoinIssuer: Send + Sync + std::fmt::Debug {
    /// Credentials for the machine with this host name.
    fn issue<'a>(&'a self, hostname: &'a str) -> BoxFuture<'a, Result<JoinInfo, String>>;
}

/// A cheap, clonable handle to the current inventory.
#[derive(Clone, Debug)]
pub struct InventoryHandle {
    current: Arc<RwLock<Arc<Inventory>>>,
    sightings: Option<mpsc::UnboundedSender<Sighting>>,
    join: Option<Arc<dyn JoinIssuer>>,
}

impl From<Arc<Inventory>> for InventoryHandle {
    fn from(inv: Arc<Inventory>) -> Self {
        InventoryHandle {
            current: Arc::new(RwLock::new(inv)),
            sightings: None,
            join: None,
        }
    }
}

impl From<Inventory> for InventoryHandle {
    fn from(inv: Inventory) -> Self {
        Arc::new(inv).into()
    }
}

impl InventoryHandle {
    /// Reports sightings to `tx`.
    pub fn with_sightings(mut self, tx: mpsc::UnboundedSender<Sighting>) -> Self {
        self.sightings = Some(tx);
        self
    }

    /// Puts join credentials from `issuer` into every user-data.
    pub fn with_join(mut self, issuer: Arc<dyn JoinIssuer>) -> Self {
        self.join = Some(issuer);
        self
    }

    /// The inventory now.
    pub fn current(&self) -> Arc<Inventory> {
        match self.current.read() {
            Ok(g) => Arc::clone(&g),
            // A writer panicked mid-swap; the Arc inside is still whole.
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    /// Replaces the inventory for every holder of this handle.
    pub fn replace(&self, inv: Inventory) {
        let inv = Arc::new(inv);
        match self.current.write() {
            Ok(mut g) => *g = inv,
            Err(poisoned) => *poisoned.into_inner() = inv,
        }
    }

    /// Tells the API side what was seen (nothing in file mode).
    pub fn saw(&self, s: Sighting) {
        if let Some(tx) = &self.sightings {
            let _ = tx.send(s);
        }
    }

    /// The join-credential issuer, in API mode.
    pub fn join(&self) -> Option<&Arc<dyn JoinIssuer>> {
        self.join.as_ref()
    }
}
