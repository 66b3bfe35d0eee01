//! ax benchmarks. Every figure is measured side by side with its baseline in the same run, and the
//! result is a ratio as much as a time: machines differ, ratios travel.
//!
//! `ax-bench statepoint [--quick]` prints a table and, as its last line, one JSON object; the same JSON
//! is written to `bench/results/statepoint-<unix time>.json`.
//!
//! `ax-bench failover [--quick]` does the same for FT across simulated hosts (see `failover.rs`):
//! failover time, QUIC vs TCP throughput, epochs/s and slowdown, output latency (`--only throughput`:
//! QUIC vs TCP alone);
//! `bench/results/failover-<unix time>.json`.
//!
//! `ax-bench detector [--secs N] [--quiet-secs M] [--kills K]`: the heartbeat failure detector in two
//! processes over loopback UDP, quiet and under `stress-ng --cpu 4`: false verdicts, longest silence,
//! SIGKILL → Dead (see `detector.rs`); `bench/results/detector-<unix time>.json`.
//!
//! `ax-bench coordinator [--quick]`: protocol v2 against a 3-member etcd at 100, 1,000 and 5,000
//! simulated hosts (see `coordinator.rs`); `bench/results/coordinator-<unix time>.json`.
//!
//! `ax-bench swift --auth-url URL` compares volume replication to Swift with python-swiftclient (see
//! `swift.rs`; `tests/e2e/swift.sh` starts a Swift and runs it); `bench/results/swift-<unix time>.json`.
//!
//! `ax-bench qemu [--quick]`: changed-block tracking of a running QEMU's disk vs a full `qemu-img
//! convert` of the same point-in-time view (see `qemu.rs`), and live migration of the Linux test guest
//! with its disk through `ax_qemu::migrate`, QEMU's default downtime limit vs 1 ms (see
//! `qemu_migrate.rs`), and COLO (checkpoint pause vs the native stun, guest slowdown, RTO of a streaming
//! VM; see `qemu_colo.rs`), in one run; `bench/results/qemu-<unix time>.json`.

mod coordinator;
mod detector;
mod failover;
mod qemu;
mod qemu_colo;
mod qemu_migrate;
mod swift;

use std::io::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use serde::Serialize;
use statepoint::frame::{workload, Encoder};
use statepoint::ranges::MemoryRangeTable;
use statepoint::stats::percentile;
use statepoint::{EpochConfig, Statepointer, Vm, VmConfig, PAGE_SIZE};

#[derive(Parser, Debug)]
#[command(
    name = "ax-bench",
    about = "ax benchmarks: ratios measured side by side in one run"
)]
struct Cli {
    #[command(subcommand)]
    bench: Bench,
}

#[derive(Subcommand, Debug)]
enum Bench {
    /// Stun vs the scan+memcpy floor, encode throughput vs memcpy, guest slowdown under epochs.
    Statepoint {
        /// Fewer samples: finishes in well under a minute.
        #[arg(long)]
        quick: bool,
        /// Where to write the JSON result.
        #[arg(long, default_value = "bench/results")]
        out_dir: PathBuf,
    },
    /// FT on simulated hosts: failover time, QUIC vs TCP, epochs/s and slowdown, output latency.
    Failover {
        /// 20 failovers and short rounds: about two minutes.
        #[arg(long)]
        quick: bool,
        /// Run only this part (the JSON keeps every key; the parts not run stay 0).
        #[arg(long, value_enum)]
        only: Option<failover::Part>,
        /// Where to write the JSON result.
        #[arg(long, default_value = "bench/results")]
        out_dir: PathBuf,
    },
    /// The heartbeat detector under CPU load: two endpoint processes over loopback UDP, quiet and
    /// with `stress-ng --cpu 4`, false Dead verdicts, longest silence, SIGKILL → Dead.
    Detector {
        /// Seconds of the loaded soak.
        #[arg(long, default_value_t = 600)]
        secs: u64,
        /// Seconds of the quiet soak.
        #[arg(long, default_value_t = 60)]
        quiet_secs: u64,
        /// SIGKILLs timed, quiet and loaded each.
        #[arg(long, default_value_t = 10)]
        kills: usize,
        /// Where to write the JSON result.
        #[arg(long, default_value = "bench/results")]
        out_dir: PathBuf,
    },
    /// One endpoint of `ax-bench detector` (started by it).
    #[command(hide = true)]
    DetectorEndpoint(detector::EndpointArgs),
    /// Volume replication to Swift vs a plain python-swiftclient upload of the same bytes.
    Swift(swift::SwiftArgs),
    /// Protocol v2 at scale: 100, 1,000 and 5,000 simulated hosts against a 3-member etcd — etcd
    /// requests/s (boot, steady state, a 10 % host failure) and failover decision latency.
    Coordinator {
        /// 2-second steady state per scale instead of 10.
        #[arg(long)]
        quick: bool,
        /// Where to write the JSON result.
        #[arg(long, default_value = "bench/results")]
        out_dir: PathBuf,
    },
    /// QEMU: a changed-block-tracking version (dirty bitmap, fleecing, changed chunks over NBD) vs a
    /// full `qemu-img convert` of the same disk; live migration downtime and total time (default
    /// downtime limit and 1 ms).
    Qemu {
        /// A 256 MiB disk instead of 1 GiB.
        #[arg(long)]
        quick: bool,
        /// Where to write the JSON result.
        #[arg(long, default_value = "bench/results")]
        out_dir: PathBuf,
    },
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.bench {
        Bench::Statepoint { quick, out_dir } => statepoint_bench(quick, &out_dir),
        Bench::Failover {
            quick,
            only,
            out_dir,
        } => failover::run(quick, only, &out_dir),
        Bench::Detector {
            secs,
            quiet_secs,
            kills,
            out_dir,
        } => detector::run(secs, quiet_secs, kills, &out_dir),
        Bench::DetectorEndpoint(args) => detector::endpoint(&args),
        Bench::Swift(args) => swift::run(&args),
        Bench::Coordinator { quick, out_dir } => coordinator::run(quick, &out_dir),
        Bench::Qemu { quick, out_dir } => qemu::run(quick, &out_dir),
    };
    if let Err(e) = result {
        eprintln!("ax-bench: {e}");
        std::process::exit(1);
    }
}

type BoxError = Box<dyn std::error::Error>;

#[derive(Serialize, Default)]
struct StatepointResult {
    quick: bool,
    mem_mib: u64,
    stun: Vec<StunRow>,
    stun_p50_us_1024: f64,
    stun_p99_us_1024: f64,
    /// The same with two CPU hogs (busy threads of this process) running.
    stun_p99_us_1024_loaded: f64,
    stun_p50_us_1024_loaded: f64,
    kick_go_p50_us_1024: f64,
    kick_go_p50_us_1024_loaded: f64,
    /// Whether the stun ran with the SCHED_FIFO boost.
    stun_boost: bool,
    floor_p50_us_1024: f64,
    stun_ratio_1024: f64,
    stun_p50_us_16384: f64,
    stun_p99_us_16384: f64,
    /// The epochs' pages are copied after the resume (userfaultfd copy-before-write).
    copy_after_resume: bool,
    /// Dirty pages are write-protected during the epoch (pre-protection), so the stun protects only the
    /// rest; the `stun_p*_us_*` keys above are taken with it (the engine's default).
    pre_protect: bool,
    /// The same stuns, copy after resume without pre-protection (the whole dirty set protected in the stun).
    stun_no_pre: Vec<StunRow>,
    stun_p99_us_1024_no_pre: f64,
    stun_p99_us_16384_no_pre: f64,
    /// Guest slowdown under 10 ms epochs without pre-protection (next to `slowdown_10ms`).
    slowdown_10ms_no_pre: f64,
    iterations_per_s_10ms_no_pre: f64,
    /// The same stuns with the copy forced inside the stun (`EpochConfig::copy_after_resume: false`).
    stun_in_stun_copy: Vec<StunRow>,
    stun_p99_us_1024_in_stun_copy: f64,
    stun_p99_us_16384_in_stun_copy: f64,
    /// Write-protect faults per epoch at 16384 dirty pages (pages the guest wrote before their copy).
    wp_faults_per_epoch_16384: f64,
    /// Guest slowdown under 10 ms epochs with the copy inside the stun (next to `slowdown_10ms`).
    slowdown_10ms_in_stun_copy: f64,
    iterations_per_s_10ms_in_stun_copy: f64,
    encode_mb_s: f64,
    memcpy_mb_s: f64,
    encode_ratio_to_memcpy: f64,
    compression_ratio: f64,
    slowdown_10ms: f64,
    slowdown_10ms_no_hot: f64,
    iterations_per_s_unprotected: f64,
    iterations_per_s_10ms_no_hot: f64,
    iterations_per_s_10ms: f64,
    epochs_per_s_10ms: f64,
    dirty_pages_per_epoch_10ms: f64,
    /// Effective epoch (ms) the adaptation chose at the end of the 10 ms runs, and the guest share.
    effective_epoch_ms_10ms: f64,
    guest_share_10ms: f64,
    hot_cap_10ms: f64,
    fault_cost_us: f64,
    /// Under two CPU hogs: unprotected vs 10 ms epochs, both loaded.
    slowdown_10ms_loaded: f64,
    iterations_per_s_unprotected_loaded: f64,
    iterations_per_s_10ms_loaded: f64,
    effective_epoch_ms_10ms_loaded: f64,
    guest_share_10ms_loaded: f64,
    load_avg: String,
    manual_dirty_protect: bool,
}

#[derive(Serialize, Clone, Default)]
struct StunRow {
    dirty_pages: u64,
    samples: usize,
    mean_dirty: f64,
    stun_p50_us: f64,
    stun_p99_us: f64,
    floor_p50_us: f64,
    floor_p99_us: f64,
    ratio_p50: f64,
    ratio_p99: f64,
    harvest_p50_us: f64,
    copy_p50_us: f64,
    vcpu_wait_p50_us: f64,
    pause_resume_p50_us: f64,
    /// Copy after resume: write-protecting the pages, inside the stun.
    write_protect_p50_us: f64,
    /// Write-protect faults per epoch.
    wp_faults_mean: f64,
    copy_after_resume: bool,
    /// Pre-protection: pages per epoch protected during the epoch and still protected at the stun, and
    /// pre-protected pages written again before it (faults).
    pre_protect: bool,
    pre_protected_mean: f64,
    pre_faults_mean: f64,
    /// Hot pages (copied inside the stun) at the end of the row.
    hot_pages: u64,
}

const MEM: u64 = 256 << 20;

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn ns(d: Duration) -> u64 {
    d.as_nanos() as u64
}

fn statepoint_bench(quick: bool, out_dir: &std::path::Path) -> Result<(), BoxError> {
    statepoint::kvm_available().map_err(|e| format!("SKIPPED: needs /dev/kvm: {e}"))?;
    let mut r = StatepointResult {
        quick,
        mem_mib: MEM >> 20,
        ..Default::default()
    };
    let samples = if quick { 40 } else { 200 };
    println!(
        "== stun vs scan+memcpy floor ({} MiB guest, {samples} epochs per size) ==",
        MEM >> 20
    );
    println!(
        "{:>5} {:>7} {:>8} {:>9} {:>9} {:>9} {:>9} {:>7} {:>7} {:>8} {:>8} {:>8} {:>8} {:>8} {:>7} {:>7} {:>6}",
        "path",
        "pages",
        "dirty",
        "stun p50",
        "stun p99",
        "floor50",
        "floor99",
        "x p50",
        "x p99",
        "harvest",
        "copy",
        "vcpu",
        "kick+go",
        "wprot",
        "faults",
        "pre",
        "hot"
    );
    r.load_avg = load_avg();
    // The three paths side by side, size by size: copy after resume with pre-protection (pre, the
    // default), without it (uffd), and copy inside the stun (stun); then the 1024-page row again with two
    // CPU hogs (pages 0), default path only.
    let pre_default = EpochConfig::default().pre_protect_pages;
    for pages in [256u64, 1024, 4096, 16384, 0] {
        let loaded = pages == 0;
        let _hogs = loaded.then(|| Hogs::start(2));
        let pages = if loaded { 1024 } else { pages };
        let paths: &[(bool, u64)] = if loaded {
            &[(true, pre_default)]
        } else {
            &[(true, pre_default), (true, 0), (false, 0)]
        };
        for &(after_resume, pre) in paths {
            let row = stun_row(
                pages,
                samples,
                after_resume,
                pre,
                &mut r.manual_dirty_protect,
                &mut r.stun_boost,
            )?;
            if loaded {
                println!(
                    "+2 hogs {:>7.0} {:>8.0}u {:>8.0}u {:>62.0}u",
                    row.mean_dirty, row.stun_p50_us, row.stun_p99_us, row.pause_resume_p50_us
                );
                r.stun_p50_us_1024_loaded = row.stun_p50_us;
                r.stun_p99_us_1024_loaded = row.stun_p99_us;
                r.kick_go_p50_us_1024_loaded = row.pause_resume_p50_us;
                r.stun.push(row);
                continue;
            }
            println!(
                "{:>5} {:>7} {:>8.0} {:>8.0}u {:>8.0}u {:>8.0}u {:>8.0}u {:>7.2} {:>7.2} {:>7.0}u {:>7.0}u {:>7.0}u {:>7.0}u {:>7.0}u {:>7.0} {:>7.0} {:>6}",
                match (row.copy_after_resume, row.pre_protect) {
                    (true, true) => "pre",
                    (true, false) => "uffd",
                    _ => "stun",
                },
                row.dirty_pages,
                row.mean_dirty,
                row.stun_p50_us,
                row.stun_p99_us,
                row.floor_p50_us,
                row.floor_p99_us,
                row.ratio_p50,
                row.ratio_p99,
                row.harvest_p50_us,
                row.copy_p50_us,
                row.vcpu_wait_p50_us,
                row.pause_resume_p50_us,
                row.write_protect_p50_us,
                row.wp_faults_mean,
                row.pre_protected_mean,
                row.hot_pages
            );
            // The comparison paths: their rows and p99 keys at 1024 and 16384 pages.
            let other = match (after_resume, pre) {
                (true, 0) => Some((
                    &mut r.stun_no_pre,
                    &mut r.stun_p99_us_1024_no_pre,
                    &mut r.stun_p99_us_16384_no_pre,
                )),
                (false, _) => Some((
                    &mut r.stun_in_stun_copy,
                    &mut r.stun_p99_us_1024_in_stun_copy,
                    &mut r.stun_p99_us_16384_in_stun_copy,
                )),
                _ => None,
            };
            if let Some((rows, p99_1024, p99_16384)) = other {
                match pages {
                    1024 => *p99_1024 = row.stun_p99_us,
                    16384 => *p99_16384 = row.stun_p99_us,
                    _ => {}
                }
                rows.push(row);
                continue;
            }
            r.copy_after_resume = row.copy_after_resume;
            r.pre_protect = row.pre_protect;
            match pages {
                1024 => {
                    r.stun_p50_us_1024 = row.stun_p50_us;
                    r.stun_p99_us_1024 = row.stun_p99_us;
                    r.floor_p50_us_1024 = row.floor_p50_us;
                    r.stun_ratio_1024 = row.ratio_p50;
                    r.kick_go_p50_us_1024 = row.pause_resume_p50_us;
                }
                16384 => {
                    r.stun_p50_us_16384 = row.stun_p50_us;
                    r.stun_p99_us_16384 = row.stun_p99_us;
                    r.wp_faults_per_epoch_16384 = row.wp_faults_mean;
                }
                _ => {}
            }
            r.stun.push(row);
        }
    }

    println!("\n== encode (XOR-delta + zstd) vs memcpy, realistic rewrite pattern ==");
    encode_bench(quick, &mut r)?;
    println!(
        "encode {:.0} MB/s   memcpy {:.0} MB/s   encode/memcpy {:.2}   compression {:.1}x",
        r.encode_mb_s, r.memcpy_mb_s, r.encode_ratio_to_memcpy, r.compression_ratio
    );

    println!("\n== guest slowdown: dirtier (1024-page working set) unprotected vs 10 ms epochs ==");
    slowdown_bench(quick, &mut r)?;
    println!(
        "unprotected {:.0} it/s   10 ms epochs {:.0} it/s ({:.0} epochs/s, {:.0} dirty pages/epoch)   slowdown {:.1} %",
        r.iterations_per_s_unprotected,
        r.iterations_per_s_10ms,
        r.epochs_per_s_10ms,
        r.dirty_pages_per_epoch_10ms,
        r.slowdown_10ms * 100.0
    );
    println!(
        "  same, hot pages off (every dirty page write-protected each epoch): {:.0} it/s   slowdown {:.1} %",
        r.iterations_per_s_10ms_no_hot,
        r.slowdown_10ms_no_hot * 100.0
    );
    println!(
        "  same, pre-protection off: {:.0} it/s   slowdown {:.1} %",
        r.iterations_per_s_10ms_no_pre,
        r.slowdown_10ms_no_pre * 100.0
    );
    println!(
        "  adaptation: effective epoch {:.0} ms, guest share {:.2}, hot cap {:.0}, fault {:.1} us",
        r.effective_epoch_ms_10ms, r.guest_share_10ms, r.hot_cap_10ms, r.fault_cost_us
    );
    {
        let _hogs = Hogs::start(2);
        slowdown_loaded(quick, &mut r)?;
    }
    println!(
        "  two CPU hogs: unprotected {:.0} it/s   10 ms epochs {:.0} it/s   slowdown {:.1} %   effective epoch {:.0} ms, guest share {:.2}",
        r.iterations_per_s_unprotected_loaded,
        r.iterations_per_s_10ms_loaded,
        r.slowdown_10ms_loaded * 100.0,
        r.effective_epoch_ms_10ms_loaded,
        r.guest_share_10ms_loaded
    );
    println!(
        "  same, copy inside the stun (copy after resume {}): {:.0} it/s   slowdown {:.1} %",
        if r.copy_after_resume {
            "off"
        } else {
            "unavailable anyway"
        },
        r.iterations_per_s_10ms_in_stun_copy,
        r.slowdown_10ms_in_stun_copy * 100.0
    );
    r.load_avg = format!("{} .. {}", r.load_avg, load_avg());

    emit_result(out_dir, "statepoint", &r)
}

/// Writes a bench's result to `<out_dir>/<bench>-<unix time>.json` and prints it as the last line.
fn emit_result(out_dir: &std::path::Path, bench: &str, r: &impl Serialize) -> Result<(), BoxError> {
    let json = serde_json::to_string(r)?;
    std::fs::create_dir_all(out_dir)?;
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let path = out_dir.join(format!("{bench}-{stamp}.json"));
    std::fs::write(&path, format!("{json}\n"))?;
    eprintln!("wrote {}", path.display());
    println!("{json}");
    std::io::stdout().flush()?;
    Ok(())
}

/// A `dirtier` VM whose working set is exactly `pages` pages, rewritten continuously.
fn dirtier(pages: u64, per_iteration: u64, report_every: u64) -> Result<Vm, BoxError> {
    Ok(Vm::try_from(VmConfig {
        mem_size: MEM,
        image: ax_guests::DIRTIER.to_vec(),
        args: vec![per_iteration, pages, report_every],
        ..VmConfig::default()
    })?)
}

/// Stun with `pages` dirty pages, next to the floor: scanning the same bitmap and copying the same pages
/// into a warm buffer, measured right after each epoch on the same memory.
pub(crate) fn stun_row(
    pages: u64,
    samples: usize,
    copy_after_resume: bool,
    pre_protect_pages: u64,
    manual: &mut bool,
    boost: &mut bool,
) -> Result<StunRow, BoxError> {
    // Each epoch lasts until the whole working set is dirty (the dirty limit), at most 1 s.
    let vm = dirtier(pages, 64.min(pages), 1 << 40)?;
    *manual = vm.manual_dirty_protect();
    let config = EpochConfig {
        interval: Duration::from_secs(1),
        dirty_limit_pages: pages,
        poll_interval: Duration::from_micros(500),
        copy_after_resume,
        pre_protect_pages,
        ..EpochConfig::default()
    };
    let mut sp = Statepointer::new(vm, config)?;
    *boost = sp.progress().stun_boost;
    let mut frame = Vec::new();
    sp.boot(&mut frame)?;
    for _ in 0..3 {
        sp.next_epoch(&mut frame)?; // warm-up: page-table splits, buffer first touch
    }
    let words = (MEM as usize / PAGE_SIZE).div_ceil(64);
    let mut floor_buf: Vec<u8> = Vec::with_capacity((pages as usize + 256) * PAGE_SIZE);
    // Touch every page of the buffer once (a calloc'd `vec![0; n]` would stay untouched), so the floor
    // copies into warm memory as the engine's reused staging buffer does.
    floor_buf.resize(floor_buf.capacity(), 1);
    floor_buf.clear();
    let (mut stun, mut floor, mut harvest, mut copy, mut wait, mut other) = (
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
    );
    let mut dirty_total = 0u64;
    let (mut wprot, mut faults) = (Vec::new(), 0u64);
    let (mut pre_protected, mut pre_faults) = (0u64, 0u64);
    for _ in 0..samples {
        let rep = sp.next_epoch(&mut frame)?;
        wprot.push(ns(rep.capture.write_protect));
        faults += rep.capture.wp_faults;
        pre_protected += rep.capture.pre_protected;
        pre_faults += rep.capture.pre_faults;
        stun.push(ns(rep.stun));
        harvest.push(ns(rep.capture.harvest));
        copy.push(ns(rep.capture.copy));
        wait.push(ns(rep.capture.vcpu_wait));
        other.push(ns(rep.stun.saturating_sub(rep.capture.total)));
        dirty_total += rep.dirty_pages;
        let bitmap = sp.last_capture().ranges.to_bitmap(words);
        // SAFETY: the floor only reads guest memory; a concurrent guest write can change the bytes copied
        // but not the time it takes, which is all that is measured here.
        let mem = unsafe { sp.vm().ram().as_slice() };
        let t = Instant::now();
        let table = MemoryRangeTable::from_bitmap(&bitmap);
        floor_buf.clear();
        for r in table.ranges() {
            let s = r.first_page as usize * PAGE_SIZE;
            floor_buf.extend_from_slice(&mem[s..s + r.pages as usize * PAGE_SIZE]);
        }
        floor.push(ns(t.elapsed()));
        std::hint::black_box(&floor_buf);
    }
    let p = |v: &[u64], q: f64| us(percentile(v, q));
    let row = StunRow {
        dirty_pages: pages,
        samples,
        mean_dirty: dirty_total as f64 / samples as f64,
        stun_p50_us: p(&stun, 50.0),
        stun_p99_us: p(&stun, 99.0),
        floor_p50_us: p(&floor, 50.0),
        floor_p99_us: p(&floor, 99.0),
        ratio_p50: p(&stun, 50.0) / p(&floor, 50.0).max(1e-3),
        ratio_p99: p(&stun, 99.0) / p(&floor, 99.0).max(1e-3),
        harvest_p50_us: p(&harvest, 50.0),
        copy_p50_us: p(&copy, 50.0),
        vcpu_wait_p50_us: p(&wait, 50.0),
        pause_resume_p50_us: p(&other, 50.0),
        write_protect_p50_us: p(&wprot, 50.0),
        wp_faults_mean: faults as f64 / samples as f64,
        copy_after_resume: sp.copy_after_resume(),
        pre_protect: sp.pre_protect(),
        pre_protected_mean: pre_protected as f64 / samples as f64,
        pre_faults_mean: pre_faults as f64 / samples as f64,
        hot_pages: sp.vm().hot_pages(),
    };
    Ok(row)
}

/// Encode throughput on `workload::synthetic_rewrite` (see its docs), next to a memcpy of the same bytes.
fn encode_bench(quick: bool, r: &mut StatepointResult) -> Result<(), BoxError> {
    let pages = if quick { 8192 } else { 16384 };
    let rounds = if quick { 5 } else { 15 };
    let (old, new) = workload::synthetic_rewrite(42, pages);
    let mem = (pages * PAGE_SIZE) as u64;
    let ranges = MemoryRangeTable::from_bitmap(&vec![u64::MAX; pages / 64]);
    let mut dst = vec![0u8; new.len()];
    let mut frame = Vec::with_capacity(new.len() * 2);
    let (mut enc_ns, mut cpy_ns) = (Vec::new(), Vec::new());
    let mut compressed = 0u64;
    for _ in 0..rounds {
        // A fresh encoder whose shadow holds `old`, as if it had been sent in the previous epoch.
        let mut enc = Encoder::new(mem, statepoint::frame::DEFAULT_ZSTD_LEVEL)?;
        enc.encode(0, &ranges, &old, &[], &[], &[], &mut frame)?;
        frame.clear();
        let t = Instant::now();
        let stats = enc.encode(1, &ranges, &new, &[], &[], &[], &mut frame)?;
        enc_ns.push(ns(t.elapsed()));
        compressed = stats.frame_bytes;
        let t = Instant::now();
        dst.copy_from_slice(&new);
        cpy_ns.push(ns(t.elapsed()));
        std::hint::black_box(&dst);
    }
    let mb_s = |v: &[u64]| new.len() as f64 / 1e6 / percentile(v, 50.0).as_secs_f64();
    r.encode_mb_s = mb_s(&enc_ns);
    r.memcpy_mb_s = mb_s(&cpy_ns);
    r.encode_ratio_to_memcpy = r.encode_mb_s / r.memcpy_mb_s;
    r.compression_ratio = new.len() as f64 / compressed.max(1) as f64;
    Ok(())
}

/// The last complete report line of a `dirtier`'s output (its iteration count).
fn last_report(out: &[u8]) -> u64 {
    let text = String::from_utf8_lossy(out);
    let complete = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
    complete
        .lines()
        .last()
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or(0)
}

/// Iterations per second of a 1024-page `dirtier`, from its own report lines: unprotected, with 10 ms
/// epochs, and with 10 ms epochs but hot pages off. The three runs alternate, round after round, and
/// the medians are compared, so drift of the machine's speed hits all three alike.
fn slowdown_bench(quick: bool, r: &mut StatepointResult) -> Result<(), BoxError> {
    let (rounds, run) = if quick {
        (3, Duration::from_millis(1000))
    } else {
        (7, Duration::from_millis(2000))
    };
    let hot = EpochConfig::default().hot_page_limit;
    let pre = EpochConfig::default().pre_protect_pages;
    let (mut plain, mut prot, mut prot_cold) = (Vec::new(), Vec::new(), Vec::new());
    let (mut epochs_s, mut dirty, mut prot_stun) = (Vec::new(), Vec::new(), Vec::new());
    let mut prot_no_pre = Vec::new();
    let mut last = None;
    for _ in 0..rounds {
        plain.push(unprotected_run(run)?);
        let (it, e, d, p) = protected_run(run, hot, true, pre)?;
        prot.push(it);
        epochs_s.push(e);
        dirty.push(d);
        last = Some(p);
        prot_cold.push(protected_run(run, 0, true, pre)?.0);
        prot_stun.push(protected_run(run, hot, false, 0)?.0);
        prot_no_pre.push(protected_run(run, hot, true, 0)?.0);
    }
    if let Some(p) = last {
        r.effective_epoch_ms_10ms = p.interval.as_secs_f64() * 1e3;
        r.guest_share_10ms = p.guest_share.unwrap_or(0.0);
        r.hot_cap_10ms = p.hot_cap as f64;
        r.fault_cost_us = p.fault_cost.map_or(0.0, us);
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    r.iterations_per_s_unprotected = median(&mut plain);
    r.iterations_per_s_10ms = median(&mut prot);
    r.iterations_per_s_10ms_no_hot = median(&mut prot_cold);
    r.iterations_per_s_10ms_in_stun_copy = median(&mut prot_stun);
    r.iterations_per_s_10ms_no_pre = median(&mut prot_no_pre);
    r.slowdown_10ms_no_pre =
        1.0 - r.iterations_per_s_10ms_no_pre / r.iterations_per_s_unprotected.max(1.0);
    r.slowdown_10ms_in_stun_copy =
        1.0 - r.iterations_per_s_10ms_in_stun_copy / r.iterations_per_s_unprotected.max(1.0);
    r.epochs_per_s_10ms = median(&mut epochs_s);
    r.dirty_pages_per_epoch_10ms = median(&mut dirty);
    r.slowdown_10ms = 1.0 - r.iterations_per_s_10ms / r.iterations_per_s_unprotected.max(1.0);
    r.slowdown_10ms_no_hot =
        1.0 - r.iterations_per_s_10ms_no_hot / r.iterations_per_s_unprotected.max(1.0);
    Ok(())
}

/// Unprotected vs 10 ms epochs, both with the caller's CPU hogs running.
fn slowdown_loaded(quick: bool, r: &mut StatepointResult) -> Result<(), BoxError> {
    let (rounds, run) = if quick {
        (3, Duration::from_millis(2000))
    } else {
        (5, Duration::from_millis(4000))
    };
    let hot = EpochConfig::default().hot_page_limit;
    let (mut plain, mut prot) = (Vec::new(), Vec::new());
    let mut last = None;
    for _ in 0..rounds {
        plain.push(unprotected_run(run)?);
        let (it, _, _, p) =
            protected_run(run, hot, true, EpochConfig::default().pre_protect_pages)?;
        prot.push(it);
        last = Some(p);
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    r.iterations_per_s_unprotected_loaded = median(&mut plain);
    r.iterations_per_s_10ms_loaded = median(&mut prot);
    r.slowdown_10ms_loaded =
        1.0 - r.iterations_per_s_10ms_loaded / r.iterations_per_s_unprotected_loaded.max(1.0);
    if let Some(p) = last {
        r.effective_epoch_ms_10ms_loaded = p.interval.as_secs_f64() * 1e3;
        r.guest_share_10ms_loaded = p.guest_share.unwrap_or(0.0);
    }
    Ok(())
}

/// Busy threads competing for the CPUs while alive.
struct Hogs {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Hogs {
    fn start(n: usize) -> Hogs {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let threads = (0..n)
            .map(|_| {
                let stop = std::sync::Arc::clone(&stop);
                std::thread::spawn(move || {
                    let mut x = 0u64;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        x = std::hint::black_box(
                            x.wrapping_mul(6364136223846793005).wrapping_add(1),
                        );
                    }
                })
            })
            .collect();
        Hogs { stop, threads }
    }
}

impl Drop for Hogs {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// The 1/5/15-minute load averages.
fn load_avg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

const REPORT_EVERY: u64 = 1000;

/// The dirtier with no epochs at all.
fn unprotected_run(run: Duration) -> Result<f64, BoxError> {
    let mut vm = dirtier(1024, 64, REPORT_EVERY)?;
    vm.start()?;
    let t = Instant::now();
    let mut out = Vec::new();
    while t.elapsed() < run {
        std::thread::sleep(Duration::from_millis(10));
        out.extend(vm.take_console());
    }
    let elapsed = t.elapsed();
    out.extend(vm.take_console());
    Ok(last_report(&out) as f64 / elapsed.as_secs_f64())
}

/// The dirtier under 10 ms epochs with the primary's whole job — stun, capture, encode — but not the
/// replica's decode, which a secondary does on its own host. Returns (iterations/s, epochs/s, dirty
/// pages per epoch).
fn protected_run(
    run: Duration,
    hot_page_limit: u64,
    copy_after_resume: bool,
    pre_protect_pages: u64,
) -> Result<(f64, f64, f64, statepoint::Progress), BoxError> {
    let vm = dirtier(1024, 64, REPORT_EVERY)?;
    let config = EpochConfig {
        interval: Duration::from_millis(10),
        dirty_limit_pages: 0,
        hot_page_limit,
        copy_after_resume,
        pre_protect_pages,
        ..EpochConfig::default()
    };
    let mut sp = Statepointer::new(vm, config)?;
    let mut frame = Vec::new();
    sp.boot(&mut frame)?;
    let mut out = Vec::new();
    let t = Instant::now();
    let (mut epochs, mut dirty) = (0u64, 0u64);
    while t.elapsed() < run {
        let rep = sp.next_epoch(&mut frame)?;
        out.extend_from_slice(&sp.last_capture().console);
        epochs += 1;
        dirty += rep.dirty_pages;
    }
    let elapsed = t.elapsed();
    Ok((
        last_report(&out) as f64 / elapsed.as_secs_f64(),
        epochs as f64 / elapsed.as_secs_f64(),
        dirty as f64 / epochs.max(1) as f64,
        sp.progress(),
    ))
}
