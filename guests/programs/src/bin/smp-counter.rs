//! `smp-counter`: every vCPU counts, and prints whole lines under the console lock.
//!
//! Arguments (`BootInfo.args`, 0 = default):
//! - `args[0]`: N, iterations between two lines of one vCPU (default 1 000 000);
//! - `args[1]`: lines per vCPU, after which that vCPU stops; when every vCPU has stopped, vCPU 0 checks the
//!   shared total and exits with code 0 (default 0 = forever).
//!
//! Each iteration of vCPU i increments vCPU i's own counter, a u64 at the start of its own 4 KiB page of free
//! memory (`free_start + 4096·i`, so no two vCPUs share a cache line), and a shared atomic counter. Every N
//! iterations vCPU i prints `cpu<i> <n>` where n = 1, 2, 3, … is its own line number; the line is written under
//! the console lock, so lines of different vCPUs never mix. If the shared total at the end is not
//! `nr_vcpus · lines · N` the program panics (exit code 101).
#![no_std]
#![no_main]

use axrt::{BootInfo, PAGE_SIZE};
use core::sync::atomic::{AtomicU64, Ordering};

axrt::entry!(main);

const DEFAULT_ITERATIONS: u64 = 1_000_000;

/// Increments of all vCPUs together.
static TOTAL: AtomicU64 = AtomicU64::new(0);
/// vCPUs that have printed all their lines.
static FINISHED: AtomicU64 = AtomicU64::new(0);

fn main(vcpu: u64, boot: &'static BootInfo) -> ! {
    let iterations = boot.arg_or(0, DEFAULT_ITERATIONS);
    let lines = boot.arg(1);
    if vcpu >= boot.free_pages() {
        panic!("smp-counter: no free page for vCPU {}'s counter", vcpu);
    }
    let own = core::ptr::with_exposed_provenance_mut::<u64>(
        (boot.free_start + vcpu * PAGE_SIZE) as usize,
    );

    let mut line = 0u64;
    loop {
        for _ in 0..iterations {
            // SAFETY: `own` is the first word of page `vcpu` of the free memory (checked above to exist), which
            // no other vCPU touches; it is 8-byte aligned as `free_start` is page aligned.
            unsafe { core::ptr::write_volatile(own, core::ptr::read_volatile(own) + 1) };
            TOTAL.fetch_add(1, Ordering::Relaxed);
        }
        line += 1;
        axrt::console()
            .str("cpu")
            .u64(vcpu)
            .str(" ")
            .u64(line)
            .str("\n");
        if line == lines {
            break;
        }
    }

    FINISHED.fetch_add(1, Ordering::AcqRel);
    if vcpu != 0 {
        axrt::park();
    }
    while FINISHED.load(Ordering::Acquire) < boot.nr_vcpus {
        axrt::cpu::pause();
    }
    let expected = boot.nr_vcpus * lines * iterations;
    let total = TOTAL.load(Ordering::Relaxed);
    if total != expected {
        panic!("smp-counter: shared total {} != {}", total, expected);
    }
    axrt::exit(0)
}
