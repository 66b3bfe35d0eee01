//! `counter`: prints `1`, `2`, `3`, … one line at a time, doing real work in memory between lines.
//!
//! Arguments (`BootInfo.args`, 0 = default):
//! - `args[0]`: iterations between two lines (default 1 000 000);
//! - `args[1]`: number of lines, then end (default 0 = forever);
//! - `args[2]`: how it ends after those lines: 0 = exit code 0, 1–255 = that exit code, 256 = a crash
//!   (`ud2`: a fatal #UD, which the VMM reports with its address).
//!
//! Each iteration mixes the iteration number into one word of a 64-word array in `.bss` (a load, a rotate, an
//! xor with a multiplicative hash, a store) and adds the result to a running checksum (kept computed with
//! `black_box` at every line). Only vCPU 0 runs the program; other vCPUs park (`pause` forever).
#![no_std]
#![no_main]

use axrt::BootInfo;
use core::sync::atomic::{AtomicU64, Ordering::Relaxed};

axrt::entry!(main);

const DEFAULT_ITERATIONS: u64 = 1_000_000;
const WORDS: usize = 64;
/// ⌊2^64 / φ⌋ (φ the golden ratio): the Fibonacci-hashing multiplier, which spreads consecutive integers over
/// all 64 bits.
const FIB_HASH: u64 = 0x9E37_79B9_7F4A_7C15;

/// The work array. Atomics with `Relaxed` ordering compile to plain loads and stores but, unlike plain
/// memory, the compiler keeps every one of them.
static WORK: [AtomicU64; WORDS] = [const { AtomicU64::new(0) }; WORDS];

fn main(vcpu: u64, boot: &'static BootInfo) -> ! {
    if vcpu != 0 {
        axrt::park();
    }
    let iterations = boot.arg_or(0, DEFAULT_ITERATIONS);
    let lines = boot.arg(1);
    let mut sum = 0u64;
    let mut i = 0u64;
    let mut line = 0u64;
    loop {
        for _ in 0..iterations {
            let word = &WORK[i as usize % WORDS];
            let value = word.load(Relaxed).rotate_left(7) ^ i.wrapping_mul(FIB_HASH);
            word.store(value, Relaxed);
            sum = sum.wrapping_add(value);
            i += 1;
        }
        // Nothing reads the checksum: without this the compiler would drop its computation.
        sum = core::hint::black_box(sum);
        line += 1;
        axrt::console().u64(line).str("\n");
        if line == lines {
            match boot.arg(2) {
                // SAFETY: `ud2` raises #UD on purpose: a guest crash, which is the point of this mode.
                256 => unsafe { core::arch::asm!("ud2", options(noreturn)) },
                code => axrt::exit(code.min(255) as u32),
            }
        }
    }
}
