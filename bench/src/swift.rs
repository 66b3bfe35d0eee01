//! `ax-bench swift`: ax's volume replication to Swift next to a plain upload of the same bytes with
//! python-swiftclient (`swift upload --use-slo --segment-size 4194304`), in the same run, against the same
//! proxy. Rounds are interleaved (ax, swiftclient, ax, …) and the medians compared.
//!
//! Also measured: an incremental replication after 1/32 of the chunks changed, and a restore.
//! The last line printed is one JSON object, also written to `bench/results/swift-<unix time>.json`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use evacuate::volume::swift::{SwiftBackend, SwiftConfig, TempAuth};
use evacuate::volume::{replicate, restore, Changes, Progress, ReplicateOptions, CHUNK_SIZE};
use serde::Serialize;

/// Settings of the Swift benchmark.
#[derive(clap::Args, Debug)]
pub struct SwiftArgs {
    /// TempAuth URL, e.g. http://127.0.0.1:8080/auth/v1.0 (tests/e2e/swift.sh starts such a Swift).
    #[arg(long)]
    auth_url: String,
    /// TempAuth user (`account:user`).
    #[arg(long, default_value = "test:tester")]
    user: String,
    /// TempAuth key.
    #[arg(long, default_value = "testing")]
    key: String,
    /// The python-swiftclient command line tool.
    #[arg(long, default_value = "swift")]
    swift_cli: PathBuf,
    /// Image size in MiB.
    #[arg(long, default_value_t = 256)]
    mib: u64,
    /// Rounds of each (interleaved).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// ax uploads in flight.
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// Where to write the JSON result.
    #[arg(long, default_value = "bench/results")]
    out_dir: PathBuf,
}

#[derive(Serialize)]
struct SwiftResult {
    bench: &'static str,
    image_mib: u64,
    rounds: usize,
    concurrency: usize,
    ax_mb_s: Vec<f64>,
    swiftclient_mb_s: Vec<f64>,
    ax_mb_s_median: f64,
    swiftclient_mb_s_median: f64,
    ratio_vs_swiftclient: f64,
    incremental_changed_chunks: u64,
    incremental_uploaded_chunks: u64,
    incremental_s: f64,
    full_s_median: f64,
    restore_mb_s: f64,
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s.get(s.len() / 2).copied().unwrap_or(0.0)
}

fn pattern_file(path: &Path, bytes: u64, seed: u64) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut buf = vec![0u8; 1 << 20];
    for _ in 0..bytes.div_ceil(1 << 20) {
        for w in buf.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.copy_from_slice(&x.to_le_bytes());
        }
        f.write_all(&buf)?;
    }
    f.flush()?;
    f.get_ref().set_len(bytes)
}

fn swift_cli(args: &SwiftArgs, rest: &[&str]) -> Result<(), super::BoxError> {
    let out = Command::new(&args.swift_cli)
        .args(["-A", &args.auth_url, "-U", &args.user, "-K", &args.key])
        .args(rest)
        .output()
        .map_err(|e| format!("running {}: {e}", args.swift_cli.display()))?;
    if !out.status.success() {
        return Err(format!(
            "{} {:?}: {}\n{}",
            args.swift_cli.display(),
            rest,
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    Ok(())
}

/// Runs the benchmark.
pub fn run(args: &SwiftArgs) -> Result<(), super::BoxError> {
    let rt = tokio::runtime::Runtime::new()?;
    let dir = std::env::temp_dir().join(format!("ax-bench-swift-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = rt.block_on(bench(args, &dir));
    std::fs::remove_dir_all(&dir).ok();
    let r = result?;
    println!();
    println!("| what | MB/s |");
    println!("|---|---|");
    println!(
        "| ax replication, full (median of {}) | {:.1} |",
        r.rounds, r.ax_mb_s_median
    );
    println!(
        "| swift upload --use-slo (median of {}) | {:.1} |",
        r.rounds, r.swiftclient_mb_s_median
    );
    println!("| ax restore | {:.1} |", r.restore_mb_s);
    println!(
        "incremental: {} of {} chunks changed, {} uploaded, {:.2} s (full: {:.2} s)",
        r.incremental_changed_chunks,
        r.image_mib / 4,
        r.incremental_uploaded_chunks,
        r.incremental_s,
        r.full_s_median
    );
    let json = serde_json::to_string(&r)?;
    std::fs::create_dir_all(&args.out_dir)?;
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    std::fs::write(args.out_dir.join(format!("swift-{stamp}.json")), &json)?;
    println!("{json}");
    Ok(())
}

async fn bench(args: &SwiftArgs, dir: &Path) -> Result<SwiftResult, super::BoxError> {
    let bytes = args.mib << 20;
    let img = dir.join("disk.img");
    pattern_file(&img, bytes, 7)?;
    let container = format!("ax-bench-{}", std::process::id());
    let sc_container = format!("ax-bench-sc-{}", std::process::id());
    let backend = Arc::new(SwiftBackend::new(
        TempAuth::new(&args.auth_url, &args.user, &args.key),
        SwiftConfig::new(&container),
    )?);
    let opts = ReplicateOptions {
        changes: Changes::Hashes,
        concurrency: args.concurrency,
    };
    let quiet = |_: Progress| {};
    let img_str = img.to_str().ok_or("temp path is not UTF-8")?;
    let mut ax = Vec::new();
    let mut sc = Vec::new();
    let mut full_s = Vec::new();
    for round in 0..args.rounds {
        // A fresh image name per round: every chunk is uploaded (segments are per image).
        let r = replicate(backend.clone(), &format!("r{round}"), &img, &opts, &quiet).await?;
        if r.uploaded * CHUNK_SIZE < bytes {
            return Err(format!("round {round}: only {} chunks uploaded", r.uploaded).into());
        }
        ax.push(r.image_mb_s());
        full_s.push(r.elapsed.as_secs_f64());
        println!("round {round}: ax {:.1} MB/s", r.image_mb_s());

        let t = Instant::now();
        let name = format!("r{round}");
        swift_cli(
            args,
            &[
                "upload",
                "--use-slo",
                "--segment-size",
                "4194304",
                "--object-name",
                &name,
                &sc_container,
                img_str,
            ],
        )?;
        let s = bytes as f64 / t.elapsed().as_secs_f64() / 1e6;
        sc.push(s);
        println!("round {round}: swiftclient {s:.1} MB/s");
    }

    // Incremental: change one chunk in 32 and replicate the last image again.
    let last = format!("r{}", args.rounds.saturating_sub(1));
    {
        use std::os::unix::fs::FileExt as _;
        let f = std::fs::OpenOptions::new().write(true).open(&img)?;
        for i in (0..bytes / CHUNK_SIZE).step_by(32) {
            f.write_all_at(b"changed by ax-bench", i * CHUNK_SIZE + 4096)?;
        }
    }
    let inc = replicate(backend.clone(), &last, &img, &opts, &quiet).await?;
    let out = dir.join("restored.img");
    let rr = restore(backend.as_ref(), &last, inc.version, &out, &quiet).await?;

    // Leave nothing behind.
    swift_cli(args, &["delete", &container])?;
    swift_cli(args, &["delete", &sc_container])?;

    let ax_med = median(&ax);
    let sc_med = median(&sc);
    Ok(SwiftResult {
        bench: "swift",
        image_mib: args.mib,
        rounds: args.rounds,
        concurrency: args.concurrency,
        ax_mb_s_median: ax_med,
        swiftclient_mb_s_median: sc_med,
        ratio_vs_swiftclient: if sc_med > 0.0 { ax_med / sc_med } else { 0.0 },
        ax_mb_s: ax,
        swiftclient_mb_s: sc,
        incremental_changed_chunks: inc.changed,
        incremental_uploaded_chunks: inc.uploaded,
        incremental_s: inc.elapsed.as_secs_f64(),
        full_s_median: median(&full_s),
        restore_mb_s: rr.mb_s(),
    })
}
