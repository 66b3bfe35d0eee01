//! ax's FT runtime, one crate: everything an FT pair runs between two hosts, used by the agent's VM
//! workers (`ax-agent vm-worker`), by `ax-agent ft-node`, the tests and the benchmarks.
//!
//! | module | concern |
//! |---|---|
//! | [`certs`] | the cluster PKI: development CA, host certificates, mutual-TLS configurations |
//! | [`link`] | the replication link: checkpoint frames over QUIC, acks back; admission of peers |
//! | [`output`] | released output with absolute offsets: the client-facing endpoint and the console log |
//! | [`ft`] | the FT pair's data path: primary epochs → link → secondary replica; promotion |
//! | [`node`] | the FT node: the driver of `failover::role::RoleMachine` (protocol v2) — sessions, heartbeats, claims, failover |
//! | [`driver`] | the decision driver every FT node shares: the role machine, coordinator requests, generation records, heartbeats, fencing |
//! | [`coord`] | where a node claims generations: the witness (mutual TLS) or etcd |
//! | [`control`] | how a controller steers a node (peers, unprotect) and reads it (role, counters, the guest's end) |
//! | [`guest`] | guest images: a kit program by name or a static ELF by path |
//!
//! Decisions are `failover`'s ([`failover::role::RoleMachine`]); the node carries them out. See
//! docs/DESIGN.md §2–§3.

pub mod certs;
pub mod control;
pub mod coord;
pub mod driver;
pub mod ft;
pub mod guest;
pub mod link;
pub mod node;
pub mod output;
