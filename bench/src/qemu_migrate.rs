//! `ax-bench qemu-migrate [--quick]`: QEMU live migration through `ax_qemu::migrate`, measured on this
//! host: the stock Linux test guest (`scripts/build-linux-guest.sh`; TCG, 256 MiB, one vCPU, counter every
//! 100 ms, a disk write every 100 ms) with a 64 MiB qcow2 disk copied by NBD mirror, migrated between two
//! QEMUs on loopback (plain TCP), with QEMU's default `downtime-limit` (300 ms) and with `downtime-limit`
//! 1 ms, in one run; everything else at QEMU's defaults (`max-bandwidth` 128 MiB/s in 7.2).
//!
//! Keys: `migrate_downtime_ms`, `migrate_total_ms` (QEMU's own `downtime` and `total-time` from the
//! source's `query-migrate` at completion: the RAM migration, the switch included), the same with
//! `_limit1`; and per case the median of: `observed_stop_ms` (source seen stopped → destination `cont`
//! answered), `wall_ms` (mirrors + RAM), `mirror_ms`, `ram_mb`, `passes`. Median of 3 migrations per case,
//! 1 with `--quick`. Prints `SKIPPED: …` (and a JSON with `skipped`) when QEMU or the guest is missing.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ax_qemu::def::{Accel, Disk, LaunchOptions, QemuDef, RunFiles};
use ax_qemu::migrate::{self, Destination, Listen, MigrateOptions, MigrateReport, Source};
use ax_qemu::process::Qemu;
use ax_qemu::qmp::Quit;
use serde_json::{json, Map, Value};

const MEM_MIB: u64 = 256;
const QMP_TIMEOUT: Duration = Duration::from_secs(30);

type BoxError = Box<dyn std::error::Error>;

fn guest() -> Result<(PathBuf, PathBuf), String> {
    for bin in ["qemu-system-x86_64", "qemu-img"] {
        let ok = std::process::Command::new(bin)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        if !ok {
            return Err(format!("{bin} not installed"));
        }
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/build-linux-guest.sh");
    let out = std::process::Command::new(&script)
        .output()
        .map_err(|e| format!("{}: {e}", script.display()))?;
    if !out.status.success() {
        return Err(format!(
            "scripts/build-linux-guest.sh failed: {}",
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .last()
                .unwrap_or("")
        ));
    }
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let mut l = text.lines();
    match (l.next(), l.next()) {
        (Some(k), Some(i)) => Ok((k.into(), i.into())),
        _ => Err(format!("scripts/build-linux-guest.sh printed {text:?}")),
    }
}

fn def(kernel: &Path, initrd: &Path, disk: &Path) -> QemuDef {
    QemuDef {
        kernel: Some(kernel.to_path_buf()),
        initrd: Some(initrd.to_path_buf()),
        append: Some("quiet ax.tick_ms=100 ax.write_ms=100 ax.span_blocks=64".into()),
        disks: vec![Disk {
            path: disk.to_path_buf(),
        }],
        accel: Accel::Tcg,
        ..QemuDef::default()
    }
}

/// One migration of a freshly booted guest.
async fn one(
    kernel: &Path,
    initrd: &Path,
    dir: &Path,
    limit: Option<u64>,
) -> Result<MigrateReport, BoxError> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir.join("src"))?;
    std::fs::create_dir_all(dir.join("dst"))?;
    let src_disk = dir.join("src/disk.qcow2");
    let out = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&src_disk)
        .arg("64M")
        .output()?;
    if !out.status.success() {
        return Err(format!("qemu-img create: {}", String::from_utf8_lossy(&out.stderr)).into());
    }
    let src_def = def(kernel, initrd, &src_disk);
    let dst_def = def(kernel, initrd, &dir.join("dst/disk.qcow2"));
    let src_files = RunFiles {
        dir: dir.join("src"),
    };
    let (mut src, src_qmp, mut src_events) =
        Qemu::launch(&src_def, "bench-src", MEM_MIB, 1, &src_files, QMP_TIMEOUT).await?;
    // The guest counts and writes its disk before the migration starts.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let c = std::fs::read_to_string(src_files.console()).unwrap_or_default();
        if c.contains("ax-guest: up") && c.matches("disk-write seq=").count() >= 3 {
            break;
        }
        if Instant::now() > deadline {
            src.kill().await;
            return Err("the guest did not come up within 120 s".into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let disks = migrate::source_disks(&src_qmp, &src_def).await?;
    migrate::create_disk_images(&disks, &dst_def)?;
    let dst_files = RunFiles {
        dir: dir.join("dst"),
    };
    let (mut dst, dst_qmp, _dst_events) = Qemu::launch_with(
        &dst_def,
        "bench-dst",
        MEM_MIB,
        1,
        &dst_files,
        QMP_TIMEOUT,
        &LaunchOptions { incoming: true },
    )
    .await?;
    let opts = MigrateOptions {
        downtime_limit_ms: limit,
        timeout: Some(Duration::from_secs(300)),
        ..MigrateOptions::default()
    };
    let r = migrate::migrate(
        Source {
            qmp: &src_qmp,
            events: Some(&mut src_events),
            tls: None,
        },
        Destination {
            qemu: &mut dst,
            qmp: &dst_qmp,
            listen: Listen {
                host: "127.0.0.1".into(),
                migrate_port: 0,
                nbd_port: 0,
            },
            tls: None,
        },
        &disks,
        &opts,
        &mut |_| {},
    )
    .await;
    for (q, p) in [(&src_qmp, &mut src), (&dst_qmp, &mut dst)] {
        let _ = q.run(&Quit).await;
        if tokio::time::timeout(Duration::from_secs(10), p.ended())
            .await
            .is_err()
        {
            p.kill().await;
        }
    }
    let _ = std::fs::remove_dir_all(dir);
    Ok(r?)
}

fn median(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

async fn run(quick: bool) -> Result<Map<String, Value>, BoxError> {
    let (kernel, initrd) = guest().map_err(|e| format!("SKIPPED: {e}"))?;
    let runs = if quick { 1 } else { 3 };
    let mut m = Map::new();
    m.insert("quick".into(), json!(quick));
    m.insert("runs".into(), json!(runs));
    m.insert("mem_mib".into(), json!(MEM_MIB));
    m.insert("disk_mib".into(), json!(64));
    m.insert("accel".into(), json!("tcg"));
    println!("Linux guest, TCG, {MEM_MIB} MiB, 64 MiB qcow2 disk mirrored over NBD; loopback; {runs} run(s) per case (median)");
    println!(
        "{:>14} {:>12} {:>10} {:>16} {:>9} {:>11} {:>8} {:>7}",
        "downtime-limit",
        "downtime ms",
        "total ms",
        "observed stop ms",
        "wall ms",
        "mirror ms",
        "RAM MB",
        "passes"
    );
    for (suffix, limit) in [("", None), ("_limit1", Some(1))] {
        let mut reps = Vec::new();
        for i in 0..runs {
            let dir = std::env::temp_dir().join(format!(
                "ax-bench-qemu-migrate-{}-{i}{suffix}",
                std::process::id()
            ));
            reps.push(one(&kernel, &initrd, &dir, limit).await?);
        }
        let med = |f: fn(&MigrateReport) -> u64| median(reps.iter().map(f).collect());
        let downtime = med(|r| r.downtime_ms);
        let total = med(|r| r.total_ms);
        let stop = med(|r| r.observed_stop_ms);
        let wall = med(|r| r.wall_ms);
        let mirror = med(|r| r.mirror_ms);
        let ram_mb = med(|r| r.ram_transferred >> 20);
        let passes = med(|r| r.passes);
        println!(
            "{:>14} {downtime:>12} {total:>10} {stop:>16} {wall:>9} {mirror:>11} {ram_mb:>8} {passes:>7}",
            limit.map_or("default".to_string(), |l| format!("{l} ms"))
        );
        m.insert(format!("migrate_downtime_ms{suffix}"), json!(downtime));
        m.insert(format!("migrate_total_ms{suffix}"), json!(total));
        m.insert(format!("migrate_observed_stop_ms{suffix}"), json!(stop));
        m.insert(format!("migrate_wall_ms{suffix}"), json!(wall));
        m.insert(format!("migrate_mirror_ms{suffix}"), json!(mirror));
        m.insert(format!("migrate_ram_mb{suffix}"), json!(ram_mb));
        m.insert(format!("migrate_passes{suffix}"), json!(passes));
        m.insert(
            format!("migrate_downtime_ms_all{suffix}"),
            json!(reps.iter().map(|r| r.downtime_ms).collect::<Vec<_>>()),
        );
    }
    Ok(m)
}

/// Runs the bench: the JSON object's fields (`skipped` or `error` when it could not run).
pub fn migrate(quick: bool) -> Map<String, Value> {
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let mut m = Map::new();
            m.insert("error".into(), json!(format!("tokio runtime: {e}")));
            return m;
        }
    };
    match rt.block_on(run(quick)) {
        Ok(m) => m,
        Err(e) => {
            let mut m = Map::new();
            let e = e.to_string();
            match e.strip_prefix("SKIPPED: ") {
                Some(why) => {
                    println!("SKIPPED: qemu-migrate bench: {why}");
                    m.insert("skipped".into(), json!(why));
                }
                None => {
                    m.insert("error".into(), json!(e));
                }
            }
            m
        }
    }
}
