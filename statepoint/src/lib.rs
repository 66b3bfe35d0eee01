//! # statepoint — a KVM micro-VMM whose guests are checkpointed every epoch
//!
//! The heart of ax's FT level. A [`Vm`] runs a CPL3 long-mode guest (`docs/guest-abi.md`) on KVM; a
//! [`Statepointer`] cuts its execution into *epochs* of a few milliseconds and captures each into a
//! checkpoint frame (dirty pages as XOR-delta + zstd, vCPU and device state via serde, the epoch's block
//! writes and console output); a [`Replica`] built only from those frames can be turned back into a
//! running VM that continues exactly where the original was at the last committed epoch.
//!
//! ## Modules, one concern each
//! | module | concern |
//! |---|---|
//! | [`vstate`] | every KVM ioctl (VM, vCPUs, dirty log, vCPU state, the kick signal) |
//! | [`memory`] | guest RAM, with vm-memory's bitmap of the VMM's own writes |
//! | [`layout`], [`loader`] | page tables, GDT, `BootInfo`, stacks; the ELF loader |
//! | [`devices`] | console, blk, exit — port I/O, each with save/restore ([`devices::Persist`]) |
//! | [`uffd`], [`cow`] | userfaultfd write-protection; copy after resume (copy-before-write) |
//! | [`dirty`] | the dirty set = KVM log ∪ VMM writes ∪ carry-over, with put-back on failure |
//! | [`vm`] | vCPU threads, [`Pausable`], [`Snapshottable`] |
//! | [`epoch`] | the epoch loop: when to stun, stun statistics, encoding after resume |
//! | [`ranges`], [`frame`] | `MemoryRangeTable` and the checkpoint wire format |
//! | [`replica`] | double-buffered application of frames; restore into a fresh VM |
//! | [`output`] | the output gate: guest output leaves only when its epoch is committed |
//!
//! ## One epoch
//! ```mermaid
//! sequenceDiagram
//!     participant G as guest (vCPU threads)
//!     participant P as Statepointer (primary)
//!     participant R as Replica (secondary)
//!     participant O as outside world
//!     Note over G: epoch N runs; console bytes and block writes are held in the devices
//!     P->>G: pause flag + kick signal (immediate_exit)
//!     G-->>P: parked (pending port I/O completed)
//!     P->>P: harvest dirty set (KVM log ∪ VMM bitmap ∪ carry-over)
//!     par vCPU state
//!         P->>G: save state
//!         G-->>P: regs, sregs, fpu, xcrs, lapic, MSRs, mp_state, events, debug regs
//!     and pages
//!         P->>P: copy dirty runs into the staging buffer
//!     end
//!     P->>P: re-arm dirty log, take epoch output, save device state
//!     P->>G: resume (stun ends)
//!     Note over G: epoch N+1 runs
//!     P->>P: encode frame N (XOR vs shadow, zstd, CRC); hold output N
//!     P->>R: frame N
//!     R->>R: decode + validate into staging (whole or nothing)
//!     R->>R: commit: disk writes, memory deltas, state
//!     R-->>P: committed N
//!     P->>O: release output N
//! ```
//! In this crate the replica lives in the same process (the local demo and the tests); the FT pair of
//! ax-agent ships frames to a secondary host over QUIC with the same frames and the same commit rule.

pub mod cow;
pub mod cpu;
pub mod devices;
pub mod dirty;
pub mod epoch;
pub mod frame;
pub mod layout;
pub mod loader;
pub mod memory;
pub mod output;
pub mod ranges;
pub mod replica;
pub mod stats;
pub mod uffd;
pub mod vm;
pub mod vstate;

/// Guest page size in bytes (the granularity of dirty tracking and of frames).
pub const PAGE_SIZE: usize = 4096;

pub use epoch::{
    EpochConfig, EpochEnd, EpochReport, Progress, Statepointer, SyncConfig, SyncProgress,
};
pub use output::{OutputGate, OutputSink};
pub use replica::{Replica, ReplicaError};
pub use vm::{Capture, GuestExit, Pausable, Snapshottable, Vm, VmConfig, VmError, VmState};

/// Whether this machine can run the KVM tests: `Err(reason)` when `/dev/kvm` is missing or unusable.
pub fn kvm_available() -> Result<(), String> {
    vstate::KvmSystem::available()
}
