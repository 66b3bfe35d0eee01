//! `dirtier`: dirties guest memory pages at a chosen rate, with a checkable pattern.
//!
//! Arguments (`BootInfo.args`, 0 = default):
//! - `args[0]`: P, pages dirtied per iteration (default 64);
//! - `args[1]`: W, working-set size in pages (default, and at most: every whole page of
//!   `[free_start, free_end)`); the working set starts at `free_start`;
//! - `args[2]`: K, print the iteration number every K iterations (default 1000);
//! - `args[3]`: busy-wait `pause` spins after each iteration, to set the rate (default 0 = flat out);
//! - `args[4]`: number of iterations, then exit with code 0 (default 0 = forever).
//!
//! The pattern. Iterations are numbered i = 1, 2, 3, …; iteration i writes the pages
//! `p = (i·P + k) mod W` for k = 0..P (page p is the 4 KiB page at `free_start + 4096·p`), and in each of
//! them two little-endian u64 words:
//! - word 0 (byte offset 0) = p, the page's index in the working set;
//! - word `1 + (i mod 511)` (byte offset `8·(1 + i mod 511)`) = i.
//!
//! So after iteration n, for every page p written at least once, word 0 is p, and a word j ≥ 1 holds either 0 or
//! the last iteration i ≤ n with `1 + i mod 511 = j` that wrote p. Only vCPU 0 runs the program; other vCPUs
//! park (`pause` forever). Output: one line with the iteration number every K iterations.
#![no_std]
#![no_main]

use axrt::{BootInfo, PAGE_SIZE};

axrt::entry!(main);

const DEFAULT_PAGES_PER_ITERATION: u64 = 64;
const DEFAULT_REPORT_EVERY: u64 = 1000;
/// u64 words per page.
const WORDS_PER_PAGE: u64 = PAGE_SIZE / 8;

fn main(vcpu: u64, boot: &'static BootInfo) -> ! {
    if vcpu != 0 {
        axrt::park();
    }
    let per_iteration = boot.arg_or(0, DEFAULT_PAGES_PER_ITERATION);
    let available = boot.free_pages();
    let working_set = boot.arg_or(1, available).min(available);
    let report_every = boot.arg_or(2, DEFAULT_REPORT_EVERY);
    let spins = boot.arg(3);
    let iterations = boot.arg(4);
    if working_set == 0 {
        panic!(
            "dirtier: no free memory (free_start {:#x}, free_end {:#x})",
            boot.free_start, boot.free_end
        );
    }
    // The working set is this vCPU's alone: the other vCPUs never touch memory.
    let base = core::ptr::with_exposed_provenance_mut::<u64>(boot.free_start as usize);

    let mut i = 0u64;
    loop {
        i += 1;
        let slot = 1 + i % (WORDS_PER_PAGE - 1);
        // (i·P + k) mod W for k = 0, 1, …: start at (i·P) mod W (exact, in 128 bits), then step by one page.
        let mut page =
            ((u128::from(i) * u128::from(per_iteration)) % u128::from(working_set)) as u64;
        for _ in 0..per_iteration {
            let words = (page * WORDS_PER_PAGE) as usize;
            // SAFETY: `page < working_set ≤ free_pages`, so both words lie in `[free_start, free_end)`, free
            // memory that only this vCPU uses; `free_start` is 4 KiB aligned, so the words are aligned.
            unsafe {
                core::ptr::write_volatile(base.add(words), page);
                core::ptr::write_volatile(base.add(words + slot as usize), i);
            }
            page += 1;
            if page == working_set {
                page = 0;
            }
        }
        for _ in 0..spins {
            axrt::cpu::pause();
        }
        if i % report_every == 0 {
            axrt::console().u64(i).str("\n");
        }
        if i == iterations {
            axrt::exit(0);
        }
    }
}
