//! Fencing: make sure a host that looks dead really is, before its VMs are started elsewhere — the
//! one fence runner, [`failover::fence`], re-exported here for the recovery engine.

pub use failover::fence::*;
