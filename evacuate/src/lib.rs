//! Keystone/Nova evacuation and volume replication (Swift, Sheepdog) for ax HA VMs.
//!
//! Modules (issue 5):
//! - [`auth`]: the token source trait shared by every OpenStack client here (Keystone v3, Swift TempAuth).
//! - [`keystone`]: Keystone v3 password auth, token renewal, service catalog; settings from TOML, `OS_*`, clouds.yaml.
//! - [`volume`]: incremental replication of disk images in 4 MiB chunks to Swift or Sheepdog, restore, retention.
//! - [`nova`]: the Nova client with explicit microversions: services, servers, evacuate, migrations.
//! - [`fence`]: the fence command (argv template, timeout, attempts).
//! - [`recovery`]: the HA recovery engine: fence → force down → evacuate HA VMs; VM crash → restart.
//! - [`hostwatch`]: host deaths from the failover crate's heartbeats, for the recovery engine.
//!
//! Work in progress: modules are added as they become real; nothing here pretends to work before it does.

pub mod auth;
pub mod fence;
pub mod hostwatch;
pub mod keystone;
pub mod nova;
pub mod recovery;
pub mod volume;
