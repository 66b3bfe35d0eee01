//! The replica: a VM image built only from checkpoint frames, and the way back to a running VM.
//!
//! Frames are applied strictly in epoch order, each **whole or not at all**. Applying is two steps,
//! double-buffered: [`Replica::receive`] decodes and validates a frame completely into a staging slot
//! (CRC, every length, ranges inside memory, writes inside the disk, epoch order, the state decodes),
//! touching nothing committed; [`Replica::commit`] then makes it the current epoch — disk writes first
//! (idempotent, so a commit that fails on I/O can be retried), then the memory deltas and the state, which
//! cannot fail. A frame that fails validation leaves the replica exactly at its last good epoch.
//!
//! A frame whose state section is empty is a *sync frame* of an initial sync (a running VM being
//! protected): its memory deltas and disk writes are applied like any other, but the replica has nothing
//! to restore until the first frame with a state arrives ([`Replica::is_restorable`]).
//!
//! [`Replica::restore`] turns the committed image into a paused [`Vm`]: same memory (no copy: the
//! replica's RAM becomes the VM's RAM), vCPU and device state, and the replica's disk image.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::devices::SECTOR;
use crate::frame::{self, DecodedFrame, FrameError, Limits};
use crate::memory::{GuestRam, MemoryError};
use crate::vm::{Vm, VmError, VmState};

/// Replica errors.
#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    /// The frame is corrupt, truncated or over a limit.
    #[error("frame rejected: {0}")]
    Frame(#[from] FrameError),
    /// The frame is not the next epoch.
    #[error("frame for epoch {got} rejected: the replica is at {at}, expecting epoch {expected}")]
    OutOfOrder {
        /// The epoch the replica needs next.
        expected: u64,
        /// The frame's epoch.
        got: u64,
        /// Last committed epoch, as text ("none" before epoch 0).
        at: String,
    },
    /// The state section does not decode.
    #[error("frame for epoch {epoch}: state section does not decode: {source}")]
    State {
        /// The epoch.
        epoch: u64,
        /// postcard's error.
        #[source]
        source: postcard::Error,
    },
    /// The state does not describe this replica's VM.
    #[error("frame for epoch {epoch}: {why}")]
    StateMismatch {
        /// The epoch.
        epoch: u64,
        /// What differs.
        why: String,
    },
    /// A frame is already staged.
    #[error("epoch {0} is staged and not yet committed")]
    AlreadyStaged(u64),
    /// `commit` without a staged frame.
    #[error("no staged epoch to commit")]
    NothingStaged,
    /// Nothing committed yet.
    #[error("the replica has no committed epoch yet")]
    Empty,
    /// The replica's disk image failed.
    #[error("replica disk {path}: {source}")]
    Disk {
        /// The image.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Memory could not be mapped.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// The VM could not be rebuilt.
    #[error("restoring the VM: {0}")]
    Restore(#[from] VmError),
}

struct Staged {
    frame: DecodedFrame,
    /// `None` for a sync frame.
    state: Option<VmState>,
}

/// A replica of one VM.
pub struct Replica {
    ram: GuestRam,
    limits: Limits,
    committed: Option<u64>,
    state: Option<VmState>,
    staged: Option<Staged>,
    disk: Option<(PathBuf, File)>,
    output: Vec<u8>,
}

impl std::fmt::Debug for Replica {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replica")
            .field("mem_size", &self.ram.size())
            .field("committed", &self.committed)
            .field("staged", &self.staged.as_ref().map(|s| s.frame.epoch))
            .field("disk", &self.disk.as_ref().map(|d| &d.0))
            .finish()
    }
}

impl Replica {
    /// An empty replica (all-zero memory) of a VM with `mem_size` bytes of memory. `disk` is the
    /// replica's own copy of the VM's disk image as it was at boot.
    pub fn new(mem_size: u64, disk: Option<&Path>) -> Result<Self, ReplicaError> {
        let ram = GuestRam::new(mem_size)?;
        let (disk, disk_bytes) = match disk {
            Some(path) => {
                let disk_err = |source| ReplicaError::Disk {
                    path: path.to_owned(),
                    source,
                };
                let f = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(path)
                    .map_err(disk_err)?;
                let len = f.metadata().map_err(disk_err)?.len();
                (Some((path.to_owned(), f)), len)
            }
            None => (None, 0),
        };
        Ok(Replica {
            ram,
            limits: Limits::for_vm(mem_size, disk_bytes),
            committed: None,
            state: None,
            staged: None,
            disk,
            output: Vec::new(),
        })
    }

    /// Overrides the decoding limits.
    pub fn set_limits(&mut self, limits: Limits) {
        self.limits = limits;
    }

    /// The decoding limits.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Last committed epoch.
    pub fn epoch(&self) -> Option<u64> {
        self.committed
    }

    /// Whether the replica holds a consistent epoch it can be restored from (not only sync frames).
    pub fn is_restorable(&self) -> bool {
        self.state.is_some()
    }

    /// The committed state.
    pub fn state(&self) -> Option<&VmState> {
        self.state.as_ref()
    }

    /// The committed guest output, from boot to the committed epoch.
    pub fn output(&self) -> &[u8] {
        &self.output
    }

    /// Absolute stream offset of the first byte of [`Replica::output`]: 0 for a replica that followed the
    /// VM from boot, later for one that joined through an initial sync (it holds only the output of its
    /// consistent epochs). Derived from the console's byte count in the committed state.
    pub fn output_base(&self) -> u64 {
        self.state.as_ref().map_or(0, |s| {
            s.devices
                .console
                .total_bytes
                .saturating_sub(self.output.len() as u64)
        })
    }

    /// The committed memory.
    pub fn memory(&self) -> &[u8] {
        // SAFETY: the replica's RAM is written only by `commit`, which takes `&mut self`; no VM runs on it
        // until `restore` consumes the replica.
        unsafe { self.ram.as_slice() }
    }

    fn expected(&self) -> u64 {
        self.committed.map_or(0, |e| e + 1)
    }

    /// Decodes and validates a frame into the staging slot. On error nothing changes.
    pub fn receive(&mut self, bytes: &[u8]) -> Result<u64, ReplicaError> {
        if let Some(s) = &self.staged {
            return Err(ReplicaError::AlreadyStaged(s.frame.epoch));
        }
        let frame = frame::decode(bytes, &self.limits)?;
        let expected = self.expected();
        if frame.epoch != expected {
            return Err(ReplicaError::OutOfOrder {
                expected,
                got: frame.epoch,
                at: self
                    .committed
                    .map_or_else(|| "no epoch".to_owned(), |e| format!("epoch {e}")),
            });
        }
        let mismatch = |why: String| ReplicaError::StateMismatch {
            epoch: frame.epoch,
            why,
        };
        // A frame without state is a sync frame (initial sync: memory and disk only). It is only valid
        // before the first consistent epoch.
        if frame.state.is_empty() {
            if self.state.is_some() {
                return Err(mismatch(
                    "a sync frame (no state) after a consistent epoch".into(),
                ));
            }
            let epoch = frame.epoch;
            self.staged = Some(Staged { frame, state: None });
            return Ok(epoch);
        }
        let state: VmState =
            postcard::from_bytes(&frame.state).map_err(|source| ReplicaError::State {
                epoch: frame.epoch,
                source,
            })?;
        if state.mem_size != self.ram.size() {
            return Err(mismatch(format!(
                "state is for {} bytes of memory, the replica has {}",
                state.mem_size,
                self.ram.size()
            )));
        }
        if state.vcpus.is_empty() || state.vcpus.len() > usize::from(u8::MAX) {
            return Err(mismatch(format!("{} vCPUs", state.vcpus.len())));
        }
        if state.devices.blk.is_some() != self.disk.is_some() {
            return Err(mismatch(
                "the VM's disk configuration differs from the replica's".into(),
            ));
        }
        let epoch = frame.epoch;
        self.staged = Some(Staged {
            frame,
            state: Some(state),
        });
        Ok(epoch)
    }

    /// Makes the staged epoch the committed one.
    pub fn commit(&mut self) -> Result<u64, ReplicaError> {
        let staged = self.staged.as_ref().ok_or(ReplicaError::NothingStaged)?;
        if let Some((path, file)) = &self.disk {
            for w in &staged.frame.disk_writes {
                file.write_all_at(&w.data, w.sector * SECTOR)
                    .map_err(|source| ReplicaError::Disk {
                        path: path.clone(),
                        source,
                    })?;
            }
        }
        let Some(staged) = self.staged.take() else {
            return Err(ReplicaError::NothingStaged);
        };
        // SAFETY: exclusive access through `&mut self` (see `memory`).
        let mem = unsafe { self.ram.as_mut_slice() };
        frame::apply_deltas(mem, &staged.frame.ranges, &staged.frame.deltas)?;
        self.output.extend_from_slice(&staged.frame.console);
        if staged.state.is_some() {
            self.state = staged.state;
        }
        self.committed = Some(staged.frame.epoch);
        Ok(staged.frame.epoch)
    }

    /// Whether the replica will be restorable once the staged epoch is committed (it is already, or
    /// the staged frame is a consistent epoch rather than a sync frame).
    pub fn restorable_with_staged(&self) -> bool {
        self.state.is_some() || self.staged.as_ref().is_some_and(|s| s.state.is_some())
    }

    /// Drops a staged, uncommitted epoch.
    pub fn discard_staged(&mut self) -> Option<u64> {
        self.staged.take().map(|s| s.frame.epoch)
    }

    /// `receive` then `commit`.
    pub fn apply(&mut self, bytes: &[u8]) -> Result<u64, ReplicaError> {
        self.receive(bytes)?;
        self.commit()
    }

    /// Flushes the replica's disk image to stable storage.
    pub fn sync_disk(&self) -> Result<(), ReplicaError> {
        if let Some((path, file)) = &self.disk {
            file.sync_data().map_err(|source| ReplicaError::Disk {
                path: path.clone(),
                source,
            })?;
        }
        Ok(())
    }

    /// Builds a paused VM from the committed epoch; [`Vm::start`] resumes the guest where the primary
    /// was at that checkpoint.
    pub fn restore(self) -> Result<Vm, ReplicaError> {
        let state = self.state.ok_or(ReplicaError::Empty)?;
        let disk = self.disk.map(|(path, file)| {
            let _ = file.sync_data();
            path
        });
        Ok(Vm::restore(self.ram, &state, disk)?)
    }
}
