//! QEMU benches. `ax-bench qemu [--quick]`:
//!
//! **Changed-block tracking** ([`cbt`]): a 1 GiB (quick: 256 MiB) qcow2 disk filled with data, attached
//! to a running QEMU (TCG, no guest OS); a first backup (full: the tracking bitmap is new), then 1 % of
//! the disk rewritten in scattered 64 KiB writes through the disk's virtio device, then a CBT version:
//! a point-in-time view (fleecing), its dirty bitmap, the changed 4 MiB chunks copied into a sparse
//! file. Side by side in the same run and from the same view, the baseline: a full `qemu-img convert
//! -O raw` of the disk over NBD. `cbt_bytes_ratio` = bytes the CBT version read / disk size;
//! `cbt_time_ratio` = CBT version time (start to finish) / `qemu-img convert` time. The copied
//! chunks are checked against the baseline's bytes.
//!
//! The JSON (last line) also goes to `bench/results/qemu-<unix time>.json`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ax_qemu::cbt::{self, Backup, CHUNK_SIZE};
use ax_qemu::qmp::Qmp;
use serde_json::{json, Map, Value};

use crate::BoxError;

const M: u64 = 1 << 20;
const WRITE: u64 = 64 << 10;

struct Vm {
    child: Child,
    qmp: Qmp,
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Vm {
    async fn launch(dir: &Path, img: &Path) -> Result<Vm, BoxError> {
        let sock = dir.join("qmp.sock");
        let _ = std::fs::remove_file(&sock);
        let accel = if std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_ok()
        {
            "kvm:tcg"
        } else {
            "tcg"
        };
        let child = Command::new("qemu-system-x86_64")
            .args(["-machine", &format!("pc,accel={accel}")])
            .args(["-nodefaults", "-display", "none", "-m", "64", "-qmp"])
            .arg(format!("unix:{},server=on,wait=off", sock.display()))
            .arg("-blockdev")
            .arg(format!(
                "driver=file,filename={},node-name=disk0-file,cache.direct=off",
                img.display()
            ))
            .args(["-blockdev", "driver=qcow2,file=disk0-file,node-name=disk0"])
            .args(["-device", "virtio-blk-pci,drive=disk0,id=disk0-dev"])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("qemu.log"))?)
            .spawn()?;
        let mut vm_child = Some(child);
        let t = Instant::now();
        loop {
            if sock.exists() {
                if let Ok((qmp, _events)) = Qmp::connect(&sock, Duration::from_secs(60)).await {
                    let child = vm_child.take().ok_or("no child")?;
                    return Ok(Vm { child, qmp });
                }
            }
            if t.elapsed() > Duration::from_secs(30) {
                if let Some(mut c) = vm_child {
                    let _ = c.kill();
                    let _ = c.wait();
                }
                return Err("QEMU did not start".into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn write(&self, offset: u64, len: u64, pattern: u8) -> Result<(), BoxError> {
        let cmd =
            format!("qemu-io -d disk0-dev/virtio-backend \"write -P {pattern:#x} {offset} {len}\"");
        let out = self
            .qmp
            .execute("human-monitor-command", json!({"command-line": cmd}))
            .await?;
        match out.as_str() {
            Some(s) if s.to_lowercase().contains("error") => Err(format!("{cmd}: {s}").into()),
            _ => Ok(()),
        }
    }
}

fn run_tool(cmd: &mut Command) -> Result<(), BoxError> {
    let out = cmd.output()?;
    if !out.status.success() {
        return Err(format!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr)).into());
    }
    Ok(())
}

fn secs(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e4).round() / 1e4
}

/// The CBT bench; returns its figures.
pub fn cbt(quick: bool) -> Result<Map<String, Value>, BoxError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let dir = std::env::temp_dir().join(format!("ax-bench-qemu-cbt-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let r = rt.block_on(cbt_in(quick, &dir));
    let _ = std::fs::remove_dir_all(&dir);
    r
}

async fn cbt_in(quick: bool, dir: &Path) -> Result<Map<String, Value>, BoxError> {
    let size: u64 = if quick { 256 * M } else { 1024 * M };
    let img = dir.join("disk0.qcow2");
    let p = img.to_str().ok_or("path")?;
    run_tool(Command::new("qemu-img").args(["create", "-q", "-f", "qcow2", p, &size.to_string()]))?;
    // Fill it: 64 MiB stretches of different bytes.
    let mut fill = Command::new("qemu-io");
    for (i, off) in (0..size).step_by(64 * M as usize).enumerate() {
        fill.arg("-c")
            .arg(format!("write -P {:#x} {off} {}", 0x10 + i, 64 * M));
    }
    run_tool(fill.arg(p))?;
    println!(
        "== changed-block tracking: {} MiB qcow2 disk, a running QEMU ==",
        size >> 20
    );

    let vm = Vm::launch(dir, &img).await?;
    let work = dir.join("work");
    let st = cbt::ensure_bitmap(&vm.qmp, "disk0", true).await?;
    if !st.created {
        return Err("the bitmap of a new disk already existed".into());
    }

    // Version 1: full (the bitmap is new).
    let t = Instant::now();
    let mut b = Backup::start(&vm.qmp, "disk0", &work).await?;
    let full = b.copy_to(&dir.join("v1.raw"), None, |_, _| {}).await?;
    b.finish(&vm.qmp, true).await?;
    let full_s = t.elapsed();
    std::fs::remove_file(dir.join("v1.raw"))?;
    println!(
        "version 1 (full)      {:>8.1} MiB read  {:>7.3} s",
        full.bytes_read as f64 / M as f64,
        full_s.as_secs_f64()
    );

    // 1 % of the disk rewritten in scattered 64 KiB writes.
    let writes = (size / 100).div_ceil(WRITE);
    let slots = size / WRITE;
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut offsets = std::collections::BTreeSet::new();
    while (offsets.len() as u64) < writes {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        offsets.insert((x % slots) * WRITE);
    }
    for (i, &off) in offsets.iter().enumerate() {
        vm.write(off, WRITE, 0xa0 + (i % 64) as u8).await?;
    }

    // Version 2: CBT.
    let t0 = Instant::now();
    let mut b = Backup::start(&vm.qmp, "disk0", &work).await?;
    let start_s = t0.elapsed();
    let t1 = Instant::now();
    let dirty = b.dirty_ranges().await?;
    let inc_path = dir.join("v2.raw");
    let inc = b.copy_to(&inc_path, Some(&dirty), |_, _| {}).await?;
    let copy_s = t1.elapsed();

    // The baseline, side by side: a full qemu-img convert of the same view.
    let sock = b.workdir().join("disk0.nbd.sock");
    let full_path = dir.join("full.raw");
    let t2 = Instant::now();
    run_tool(
        Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw"])
            .arg(format!(
                "nbd+unix:///ax-cbt-disk0?socket={}",
                sock.display()
            ))
            .arg(&full_path),
    )?;
    let convert_s = t2.elapsed();

    let t3 = Instant::now();
    b.finish(&vm.qmp, true).await?;
    let finish_s = t3.elapsed();
    let cbt_s = start_s + copy_s + finish_s;

    // The copied chunks equal the baseline's bytes.
    let verified = verify(&inc_path, &full_path, &inc.ranges)?;
    if !verified {
        return Err("the CBT copy differs from qemu-img convert's".into());
    }
    let dirty_bytes: u64 = dirty.iter().map(|r| r.end - r.start).sum();
    let alloc = {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(&inc_path)?.blocks() * 512
    };
    let _ = vm.qmp.execute("quit", Value::Null).await;
    drop(vm);

    let bytes_ratio = inc.bytes_read as f64 / size as f64;
    let time_ratio = cbt_s.as_secs_f64() / convert_s.as_secs_f64();
    println!(
        "rewrite               {writes} x 64 KiB scattered ({:.1} MiB, {:.2} % of the disk)",
        (writes * WRITE) as f64 / M as f64,
        (writes * WRITE) as f64 * 100.0 / size as f64
    );
    println!(
        "dirty (bitmap)        {:>8.1} MiB in {} ranges",
        dirty_bytes as f64 / M as f64,
        dirty.len()
    );
    println!(
        "version 2 (CBT)       {:>8.1} MiB read in {} x 4 MiB chunks  {:>7.3} s  (start {:.3}, copy {:.3}, finish {:.3})",
        inc.bytes_read as f64 / M as f64,
        inc.bytes_read.div_ceil(CHUNK_SIZE),
        cbt_s.as_secs_f64(),
        start_s.as_secs_f64(),
        copy_s.as_secs_f64(),
        finish_s.as_secs_f64()
    );
    println!(
        "qemu-img convert      {:>8.1} MiB read  {:>7.3} s",
        size as f64 / M as f64,
        convert_s.as_secs_f64()
    );
    println!("CBT / full: bytes {bytes_ratio:.3}, time {time_ratio:.3}");

    let mut m = Map::new();
    let mut put = |k: &str, v: Value| {
        m.insert(k.to_string(), v);
    };
    put("disk_mib", json!(size >> 20));
    put("rewrite_writes", json!(writes));
    put("rewrite_bytes", json!(writes * WRITE));
    put("bitmap_granularity", json!(st.granularity));
    put("dirty_bytes", json!(dirty_bytes));
    put("dirty_bytes_ratio", json!(dirty_bytes as f64 / size as f64));
    put("full_version_s", json!(secs(full_s)));
    put("full_version_bytes_read", json!(full.bytes_read));
    put("cbt_chunks", json!(inc.bytes_read.div_ceil(CHUNK_SIZE)));
    put("cbt_bytes_read", json!(inc.bytes_read));
    put("cbt_file_allocated_bytes", json!(alloc));
    put("cbt_start_s", json!(secs(start_s)));
    put("cbt_copy_s", json!(secs(copy_s)));
    put("cbt_finish_s", json!(secs(finish_s)));
    put("cbt_s", json!(secs(cbt_s)));
    put("qemu_img_convert_s", json!(secs(convert_s)));
    put("cbt_bytes_ratio", json!(bytes_ratio));
    put("cbt_time_ratio", json!(time_ratio));
    put("cbt_verified", json!(verified));
    Ok(m)
}

/// Whether `a` and `b` hold the same bytes in `ranges`.
fn verify(a: &Path, b: &Path, ranges: &[std::ops::Range<u64>]) -> Result<bool, BoxError> {
    use std::os::unix::fs::FileExt;
    let (fa, fb) = (std::fs::File::open(a)?, std::fs::File::open(b)?);
    let mut ba = vec![0u8; CHUNK_SIZE as usize];
    let mut bb = vec![0u8; CHUNK_SIZE as usize];
    for r in ranges {
        let mut at = r.start;
        while at < r.end {
            let n = (r.end - at).min(CHUNK_SIZE) as usize;
            fa.read_exact_at(&mut ba[..n], at)?;
            fb.read_exact_at(&mut bb[..n], at)?;
            if ba[..n] != bb[..n] {
                return Ok(false);
            }
            at += n as u64;
        }
    }
    Ok(true)
}

/// `ax-bench qemu`: runs the QEMU benches, prints their JSON as the last line and writes it to
/// `out_dir/qemu-<unix time>.json`.
pub fn run(quick: bool, out_dir: &Path) -> Result<(), BoxError> {
    let have = Command::new("qemu-system-x86_64")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !have {
        println!("SKIPPED: qemu-system-x86_64 not installed");
        return Ok(());
    }
    let mut r = Map::new();
    r.insert("quick".into(), json!(quick));
    r.extend(cbt(quick)?);
    let m = crate::qemu_migrate::migrate(quick);
    if let Some(e) = m.get("error") {
        return Err(format!("qemu migration: {e}").into());
    }
    r.extend(m);
    r.extend(crate::qemu_colo::colo(quick)?);
    let json = serde_json::to_string(&Value::Object(r))?;
    println!("{json}");
    std::fs::create_dir_all(out_dir)?;
    let ts = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let path: PathBuf = out_dir.join(format!("qemu-{ts}.json"));
    std::fs::write(path, &json)?;
    Ok(())
}
