//! Keystone/Nova evacuation and volume replication (Swift, Sheepdog) for ax HA VMs.
//!
//! **Not implemented yet** (issue 5): this crate is a placeholder in the workspace layout and exports
//! nothing, so that no caller can believe HA recovery works.
