//! Keelson's container runtime. Under construction: see the README's status table.
#![deny(missing_docs)]
