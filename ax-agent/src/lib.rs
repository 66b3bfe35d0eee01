//! The ax agent as a library: everything the `ax-agent` binary runs, so that tests and benchmarks use
//! the same code.
//!
//! | module | concern |
//! |---|---|
//! | [`certs`] | the cluster PKI: development CA, host certificates, mutual-TLS configurations |
//! | [`link`] | the replication link: checkpoint frames over QUIC, acks back |
//! | [`output`] | the client-facing output endpoint: released output with absolute offsets |
//! | [`ft`] | the FT pair's data path: primary epochs → link → secondary replica; promotion |
//! | [`node`] | an FT node process: standby / secondary / primary, heartbeats, witness lease, failover |
//! | [`demo`] | the single-host statepoint demo (`ax-agent demo`) |

pub mod certs;
pub mod demo;
pub mod ft;
pub mod link;
pub mod node;
pub mod output;
