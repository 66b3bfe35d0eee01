//! Heartbeat, failure detection, fencing and promotion for ax FT pairs.
//!
//! **Not implemented yet** (issue 3): this crate is a placeholder in the workspace layout and exports
//! nothing, so that no caller can believe failover works.
