//! The ax agent as a library: everything the `ax-agent` binary runs, so that tests and benchmarks use
//! the same code. The FT runtime (PKI, replication link, released output, data path, node, coordinator
//! client) is its own crate, `ax_ft`, re-exported here under the same module names.
//!
//! | module | concern |
//! |---|---|
//! | [`certs`], [`link`], [`output`], [`ft`], [`node`], [`coord`], [`guest`] | the FT runtime (`ax_ft`, see its crate docs) |
//! | [`demo`] | the single-host statepoint demo (`ax-agent demo`) |
//! | [`config`] | the agent's TOML configuration, environment overrides, validation |
//! | [`control`] | the worker socket protocol (with `ax_ft::control`: how a node is steered) |
//! | [`worker`] | a VM worker process (`ax-agent vm-worker`): one FT node per VM, steered over a socket |
//! | [`worker_qemu`] | the worker of a QEMU VM: QEMU supervised through QMP, its end as a VM event |
//! | [`colo_node`] | FT for a QEMU VM (`ax-agent colo-node`): QEMU's COLO as the data path, the FT decision driver around it |
//! | [`daemon`] | the agent daemon (`ax-agent run`): VMs, levels, REST API, metrics |
//! | [`client`] | a client of the REST API (axctl, peers) |
//! | [`ha`] | `ax-agent ha-node`: host heartbeats and the HA recovery engine for Nova VMs; its control socket |
//! | [`logging`] | tracing setup: journald under systemd, human or JSON on a terminal |

pub use ax_ft::{certs, coord, ft, guest, link, node, output};

pub mod client;
pub mod colo_node;
pub mod config;
pub mod control;
pub mod daemon;
pub mod demo;
pub mod ha;
pub mod logging;
pub mod worker;
pub mod worker_qemu;
