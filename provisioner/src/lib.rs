//! Keelson's provisioner: network boot (DHCP/proxyDHCP, TFTP, iPXE over HTTP) and cloud-init
//! NoCloud seeds, so that workers boot and join by themselves. Under construction: see the
//! README's status table.
#![deny(missing_docs)]
