//! Measures checkpoint encode throughput on the synthetic rewrite workload
//! (`statepoint::frame::workload`), against a plain memcpy of the same bytes.
//!
//! ```text
//! cargo run --release -p statepoint --example encode_speed -- [--pages N] [--mem-mib M] [--iters I] [--levels 1,-1,-3]
//! ```
//!
//! For each zstd level it prints encode MB/s (dirty input bytes per second of `Encoder::encode`),
//! decode + apply MB/s, the sparse and compressed sizes and the compression ratio.

use std::hint::black_box;
use std::time::{Duration, Instant};

use statepoint::frame::{self, workload, Decoder, Encoder, Limits};

fn arg<T: std::str::FromStr>(args: &[String], name: &str, default: T) -> T {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn mbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e6
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let pages: usize = arg(&args, "--pages", 16384);
    let mem_mib: u64 = arg(&args, "--mem-mib", 256);
    let iters: u32 = arg(&args, "--iters", 20);
    let seed: u64 = arg(&args, "--seed", 1);
    let no_decode = args.iter().any(|a| a == "--no-decode");
    let dense_level: i32 = arg(&args, "--dense-level", frame::STORE);
    let levels: Vec<i32> = arg(&args, "--levels", "0,1,-1,-3,-5,-10,3".to_string())
        .split(',')
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    let mem_size = mem_mib << 20;
    let ranges = workload::synthetic_ranges(seed, pages as u64, mem_size / 4096);
    let (old, new) = workload::synthetic_rewrite(seed, ranges.page_count() as usize);
    let raw = new.len() as u64;
    println!(
        "workload: {} dirty pages ({} MiB) in {} ranges, guest {} MiB, {} iterations",
        ranges.page_count(),
        raw >> 20,
        ranges.ranges().len(),
        mem_mib,
        iters
    );

    // memcpy of the same bytes (destination pre-faulted).
    let mut dst = vec![1u8; new.len()];
    let t = Instant::now();
    for i in 0..iters {
        let src = if i % 2 == 0 { &new } else { &old };
        dst.copy_from_slice(src);
        black_box(&mut dst);
    }
    println!(
        "memcpy:            {:8.0} MB/s",
        mbps(raw * u64::from(iters), t.elapsed())
    );

    let limits = Limits::for_vm(mem_size, 1 << 30);
    for level in levels {
        let mut enc = Encoder::new(mem_size, level)?;
        enc.set_dense_level(dense_level)?;
        let mut dec = Decoder::new()?;
        let mut replica = vec![0u8; mem_size as usize];
        let mut out = Vec::new();
        // Epoch 0 sends `old` (faults the shadow in); the measured epochs alternate new/old,
        // which gives the same deltas every time.
        enc.encode(0, &ranges, &old, &[], &[], &[], &mut out)?;
        let f = dec.decode(&out, &limits)?;
        frame::apply_deltas(&mut replica, &f.ranges, &f.deltas)?;
        let mut enc_time = Duration::ZERO;
        let mut delta_time = Duration::ZERO;
        let mut zstd_time = Duration::ZERO;
        let mut dec_time = Duration::ZERO;
        let mut stats = None;
        for i in 0..iters {
            let src = if i % 2 == 0 { &new } else { &old };
            out.clear();
            let t = Instant::now();
            let s = enc.encode(
                u64::from(i) + 1,
                &ranges,
                src,
                &[0u8; 4096],
                &[],
                b"",
                &mut out,
            )?;
            enc_time += t.elapsed();
            delta_time += s.delta_elapsed;
            zstd_time += s.compress_elapsed;
            stats = Some(s);
            if no_decode {
                continue;
            }
            let t = Instant::now();
            let f = dec.decode(&out, &limits)?;
            frame::apply_deltas(&mut replica, &f.ranges, &f.deltas)?;
            dec_time += t.elapsed();
        }
        assert!(no_decode || replica == enc.shadow(), "replica diverged");
        if let Some(s) = stats {
            println!(
                "level {level:>3}: encode {:6.0} MB/s (delta pass {:6.0} MB/s, zstd {:6.0} MB/s of its input)   decode+apply {:6.0} MB/s   sparse {:5.1} MiB  dense {:5.1} MiB  sent {:5.1} MiB  ratio {:5.2}x",
                mbps(raw * u64::from(iters), enc_time),
                mbps(raw * u64::from(iters), delta_time),
                mbps(
                    (if level == frame::STORE { 0 } else { s.sparse_bytes } + if dense_level != frame::STORE { s.dense_bytes } else { 0 })
                        * u64::from(iters),
                    zstd_time
                ),
                mbps(raw * u64::from(iters), dec_time),
                s.sparse_bytes as f64 / 1048576.0,
                s.dense_bytes as f64 / 1048576.0,
                s.compressed_bytes as f64 / 1048576.0,
                raw as f64 / s.compressed_bytes as f64,
            );
        }
    }
    Ok(())
}
