//! Keelson's provisioner: network boot (DHCP/proxyDHCP, TFTP, iPXE over HTTP) and cloud-init
//! NoCloud seeds, so that workers boot and join by themselves.
//!
//! The pieces are libraries that each take their sockets/listeners and a shutdown future:
//! - [`dhcp`]: a full DHCP server (pool + reservations, persisted leases) or a proxyDHCP
//!   server that only answers PXE clients, with PXE/iPXE boot selection from [`boot`];
//! - [`tftp`]: a read-only TFTP server (RFC 1350, options of RFC 2347–2349) confined to a root;
//! - [`http`]: per-machine iPXE scripts, boot assets and NoCloud seeds;
//! - [`inventory`]: machines (by MAC or SMBIOS UUID, [`smbios`]) and profiles read from a TOML
//!   file;
//! - [`live`]: the inventory as the servers use it, replaceable at run time;
//! - [`machines`]: API mode — machines from `Machine` objects, their state written back,
//!   and join tokens for their user-data.
#![deny(missing_docs)]

pub mod boot;
pub mod confine;
pub mod dhcp;
pub mod http;
pub mod inventory;
pub mod live;
pub mod mac;
pub mod machines;
pub mod net;
pub mod nocloud;
pub mod smbios;
pub mod tftp;

/// Errors of the provisioner library, one variant per module.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The inventory could not be read or is invalid.
    #[error(transparent)]
    Inventory(#[from] inventory::Error),
    /// The DHCP server failed.
    #[error(transparent)]
    Dhcp(#[from] dhcp::Error),
    /// The TFTP server failed.
    #[error(transparent)]
    Tftp(#[from] tftp::Error),
    /// The HTTP server failed.
    #[error(transparent)]
    Http(#[from] http::Error),
    /// Socket setup failed.
    #[error(transparent)]
    Net(#[from] net::Error),
}

/// Result alias for [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
