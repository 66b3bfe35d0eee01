//! The ax agent as a library: everything the `ax-agent` binary runs, so that tests and benchmarks use
//! the same code.
//!
//! | module | concern |
//! |---|---|
//! | [`certs`] | the cluster PKI: development CA, host certificates, mutual-TLS configurations |
//! | [`link`] | the replication link: checkpoint frames over QUIC, acks back |
//! | [`output`] | the client-facing output endpoint: released output with absolute offsets |
//! | [`ft`] | the FT pair's data path: primary epochs → link → secondary replica; promotion |
//! | [`node`] | an FT node process: the driver of the role machine (protocol v2), heartbeats, failover |
//! | [`coord`] | where a node claims generations: the witness (mutual TLS) or etcd |
//! | [`demo`] | the single-host statepoint demo (`ax-agent demo`) |
//! | [`config`] | the agent's TOML configuration, environment overrides, validation |
//! | [`control`] | how a controller steers a node: peers, roles, counters; the worker socket protocol |
//! | [`worker`] | a VM worker process (`ax-agent vm-worker`): one FT node per VM, steered over a socket |
//! | [`worker_qemu`] | the worker of a QEMU VM: QEMU supervised through QMP, its end as a VM event |
//! | [`daemon`] | the agent daemon (`ax-agent run`): VMs, levels, REST API, metrics |
//! | [`client`] | a client of the REST API (axctl, peers) |
//! | [`ha`] | `ax-agent ha-node`: host heartbeats and the HA recovery engine for Nova VMs; its control socket |
//! | [`logging`] | tracing setup: journald under systemd, human or JSON on a terminal |

pub mod certs;
pub mod client;
pub mod config;
pub mod control;
pub mod coord;
pub mod daemon;
pub mod demo;
pub mod ft;
pub mod guest;
pub mod ha;
pub mod link;
pub mod logging;
pub mod node;
pub mod output;
pub mod worker;
pub mod worker_qemu;
