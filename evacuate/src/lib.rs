//! Keystone/Nova evacuation and volume replication (Swift, Sheepdog) for ax HA VMs.
//!
//! Modules (issue 5):
//! - [`auth`]: the token source trait shared by every OpenStack client here (Keystone v3, Swift TempAuth).
//! - [`volume`]: incremental replication of disk images in 4 MiB chunks to Swift or Sheepdog, restore, retention.
//!
//! Work in progress: modules are added as they become real; nothing here pretends to work before it does.

pub mod auth;
pub mod volume;
