//! Guest RAM: one anonymous mapping managed by vm-memory, with vm-memory's `AtomicBitmap` recording every
//! write the VMM itself makes (loader, block-device reads and status words). The dirty set of an epoch is
//! the KVM log of guest writes **OR** this bitmap.

use std::sync::Arc;

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{
    GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap,
    MmapRegion,
};

use crate::PAGE_SIZE;

/// Guest memory with the VMM's own dirty bitmap.
pub type Memory = GuestMemoryMmap<AtomicBitmap>;

/// Errors creating guest RAM.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The mapping could not be created.
    #[error("cannot map {size} bytes of guest memory: {reason}")]
    Map {
        /// Bytes asked for.
        size: u64,
        /// vm-memory's error.
        reason: String,
    },
}

/// The whole-region bitmap of a region (not the `BaseSlice` view `GuestMemoryRegion::bitmap` gives).
fn vmm_bitmap(region: &GuestRegionMmap<AtomicBitmap>) -> &AtomicBitmap {
    MmapRegion::bitmap(region)
}

/// Guest RAM `[0, size)`.
#[derive(Debug, Clone)]
pub struct GuestRam {
    mem: Arc<Memory>,
    host: HostPtr,
    size: u64,
}

#[derive(Debug, Clone, Copy)]
struct HostPtr(*mut u8);
// SAFETY: the pointer addresses the mapping owned by `GuestRam::mem` (an `Arc`), which is itself Send and
// Sync; all accesses through it are either atomic-free bulk copies done while every vCPU is paused or
// through vm-memory's volatile API.
unsafe impl Send for HostPtr {}
// SAFETY: see above.
unsafe impl Sync for HostPtr {}

impl GuestRam {
    /// Maps `size` bytes of zeroed anonymous memory.
    pub fn new(size: u64) -> Result<Self, MemoryError> {
        let map_err = |e: &dyn std::fmt::Display| MemoryError::Map {
            size,
            reason: e.to_string(),
        };
        let mem =
            Memory::from_ranges(&[(GuestAddress(0), size as usize)]).map_err(|e| map_err(&e))?;
        let host = mem
            .get_host_address(GuestAddress(0))
            .map_err(|e| map_err(&e))?;
        Ok(GuestRam {
            mem: Arc::new(mem),
            host: HostPtr(host),
            size,
        })
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Number of 4 KiB pages.
    pub fn pages(&self) -> u64 {
        self.size / PAGE_SIZE as u64
    }

    /// The vm-memory view (use it for every VMM write so the write is counted dirty).
    pub fn memory(&self) -> &Memory {
        &self.mem
    }

    /// Host address of guest-physical 0.
    pub fn host_addr(&self) -> *mut u8 {
        self.host.0
    }

    /// The whole memory as bytes.
    ///
    /// # Safety
    /// Nothing may write guest memory while the slice lives: every vCPU paused or not yet started, and no
    /// device request in flight.
    pub unsafe fn as_slice(&self) -> &[u8] {
        // SAFETY: the mapping is `size` bytes long and lives as long as `self`; the caller excludes writers.
        unsafe { std::slice::from_raw_parts(self.host.0, self.size as usize) }
    }

    /// The whole memory as mutable bytes.
    ///
    /// # Safety
    /// As [`GuestRam::as_slice`], and no other slice of this memory may be alive.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn as_mut_slice(&self) -> &mut [u8] {
        // SAFETY: the mapping is `size` bytes long and lives as long as `self`; the caller guarantees
        // exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.host.0, self.size as usize) }
    }

    /// Copies `buf.len()` bytes at guest-physical `addr` with volatile reads (the guest may be writing).
    pub fn read_volatile_slice(&self, buf: &mut [u8], addr: u64) -> Result<(), String> {
        use vm_memory::Bytes;
        self.mem
            .read_slice(buf, GuestAddress(addr))
            .map_err(|e| e.to_string())
    }

    /// ORs the VMM's own dirty bits into `bitmap` (one bit per page) and resets them.
    pub fn take_vmm_dirty(&self, bitmap: &mut [u64]) {
        for region in self.mem.iter() {
            let first = (region.start_addr().0 / PAGE_SIZE as u64 / 64) as usize;
            for (i, word) in vmm_bitmap(region).get_and_reset().into_iter().enumerate() {
                if let Some(slot) = bitmap.get_mut(first + i) {
                    *slot |= word;
                }
            }
        }
    }

    /// Marks every page in `bitmap` dirty in the VMM bitmap again (used to put bits back).
    pub fn mark_vmm_dirty(&self, page: u64) {
        for region in self.mem.iter() {
            let start = region.start_addr().0;
            let addr = page * PAGE_SIZE as u64;
            if addr >= start && addr < start + region.len() {
                vmm_bitmap(region).set_addr_range((addr - start) as usize, PAGE_SIZE);
            }
        }
    }
}
