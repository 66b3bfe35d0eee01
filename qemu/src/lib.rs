//! QEMU VMs under ax.
//!
//! | module | what |
//! |---|---|
//! | [`qmp`] | a typed QMP client over the VM's unix socket (commands, replies, events) |
//! | [`def`] | a QEMU VM's definition and the command line ax builds from it |
//! | [`migrate`] | live migration between two QEMUs, local disks copied by NBD mirror, optional TLS |
//! | [`process`] | launching QEMU, finding it again after a restart (pid + start time), its end |
//! | [`nbd`] | an async NBD client (structured reads, block status, dirty-bitmap contexts) |
//! | [`colo`] | FT under QEMU's COLO: probe, secondary and primary setup, failover, checkpoint pauses |
//! | [`relay`] | unix socket ↔ TCP relay with `TCP_NODELAY`/`TCP_QUICKACK` for COLO's channels |
//! | [`cbt`] | changed-block tracking of a running QEMU's disk: dirty bitmaps, fleecing, sparse copies |

pub mod cbt;
pub mod colo;
pub mod def;
pub mod migrate;
pub mod nbd;
pub mod process;
pub mod qmp;
pub mod relay;
