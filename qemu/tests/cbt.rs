//! Changed-block tracking against a real QEMU (TCG, no guest OS: the VM sits in its firmware). Writes
//! come through the disk's virtio device (HMP `qemu-io -d <device>`), the way a guest's would.

use std::ops::Range;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ax_qemu::cbt::{self, chunk_ranges, Backup, BITMAP_NEXT};
use ax_qemu::qmp::Qmp;
use serde_json::json;

const M: u64 = 1 << 20;
const SIZE: u64 = 64 * M;

fn have_qemu() -> bool {
    let ok = Command::new("qemu-system-x86_64")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        println!("SKIPPED: qemu-system-x86_64 not installed");
    }
    ok
}

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ax-cbt-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn create_disk(dir: &Path, format: &str) -> PathBuf {
    let img = dir.join(format!("disk0.{format}"));
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", format])
        .arg(&img)
        .arg(SIZE.to_string())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    img
}

/// QEMU with one disk laid out as ax's def.rs does (`disk0-file` → `disk0` → `disk0-dev`).
struct Vm {
    child: Child,
    qmp: Qmp,
}

impl Vm {
    async fn launch(dir: &Path, img: &Path, format: &str) -> Vm {
        Vm::launch_disks(dir, &[(img, format)]).await
    }

    /// QEMU with the disks `diskN` (`diskN-file` → `diskN` → `diskN-dev`), in order.
    async fn launch_disks(dir: &Path, disks: &[(&Path, &str)]) -> Vm {
        let sock = dir.join("qmp.sock");
        let _ = std::fs::remove_file(&sock);
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args([
            "-accel",
            "tcg",
            "-nodefaults",
            "-display",
            "none",
            "-machine",
            "pc",
        ])
        .args(["-m", "32", "-qmp"])
        .arg(format!("unix:{},server=on,wait=off", sock.display()));
        for (i, (img, format)) in disks.iter().enumerate() {
            cmd.arg("-blockdev")
                .arg(format!(
                    "driver=file,filename={},node-name=disk{i}-file,cache.direct=off",
                    img.display()
                ))
                .arg("-blockdev")
                .arg(format!(
                    "driver={format},file=disk{i}-file,node-name=disk{i}"
                ))
                .args([
                    "-device",
                    &format!("virtio-blk-pci,drive=disk{i},id=disk{i}-dev"),
                ]);
        }
        let child = cmd
            .stdout(Stdio::null())
            .spawn()
            .expect("qemu-system-x86_64");
        let t = Instant::now();
        let qmp = loop {
            if sock.exists() {
                if let Ok((q, _events)) = Qmp::connect(&sock, Duration::from_secs(20)).await {
                    break q;
                }
            }
            assert!(t.elapsed() < Duration::from_secs(20), "QEMU did not start");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        Vm { child, qmp }
    }

    /// Writes `len` bytes of `pattern` at `offset` through the disk's device.
    async fn write(&self, offset: u64, len: u64, pattern: u8) {
        self.write_to(0, offset, len, pattern).await
    }

    /// Writes `len` bytes of `pattern` at `offset` through the device of disk `disk`.
    async fn write_to(&self, disk: usize, offset: u64, len: u64, pattern: u8) {
        let cmd = format!(
            "qemu-io -d disk{disk}-dev/virtio-backend \"write -P {pattern:#x} {offset} {len}\""
        );
        let out = self
            .qmp
            .execute("human-monitor-command", json!({"command-line": cmd}))
            .await
            .unwrap();
        let out = out.as_str().unwrap_or_default();
        assert!(!out.to_lowercase().contains("error"), "{cmd}: {out}");
    }

    /// Quits QEMU cleanly (persistent bitmaps are written to the image).
    async fn quit(mut self) {
        let _ = self.qmp.execute("quit", serde_json::Value::Null).await;
        let t = Instant::now();
        while self.child.try_wait().unwrap().is_none() {
            assert!(t.elapsed() < Duration::from_secs(20), "QEMU did not quit");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Kills QEMU (SIGKILL): persistent bitmaps are left "in use".
    fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn dirty_chunks(b: &mut Backup) -> Vec<Range<u64>> {
    let d = b.dirty_ranges().await.unwrap();
    chunk_ranges(&d, b.size())
}

fn file_bytes(p: &Path, r: Range<u64>) -> Vec<u8> {
    let all = std::fs::read(p).unwrap();
    all[r.start as usize..r.end as usize].to_vec()
}

fn all(b: &[u8], v: u8) -> bool {
    b.iter().all(|&x| x == v)
}

#[tokio::test]
async fn backups_read_everything_first_then_only_changed_chunks_at_a_point_in_time() {
    if !have_qemu() {
        return;
    }
    let dir = tmpdir("main");
    let img = create_disk(&dir, "qcow2");
    let vm = Vm::launch(&dir, &img, "qcow2").await;
    let work = dir.join("work");
    vm.write(0, 8 * M, 0x5a).await;

    // A new bitmap: it does not cover the write above, the first version reads everything.
    let st = cbt::ensure_bitmap(&vm.qmp, "disk0", true).await.unwrap();
    assert!(st.created && st.persistent && !st.recovered, "{st:?}");
    let mut b = Backup::start(&vm.qmp, "disk0", &work).await.unwrap();
    assert_eq!(b.size(), SIZE);
    assert!(b.dirty_ranges().await.unwrap().is_empty());
    let full = dir.join("v1.raw");
    let mut last = (0, 0);
    let r = b.copy_to(&full, None, |d, t| last = (d, t)).await.unwrap();
    assert_eq!((r.bytes_read, r.size), (SIZE, SIZE));
    assert_eq!(last, (SIZE, SIZE));
    assert_eq!(r.bytes_written, 8 * M);
    assert!(all(&file_bytes(&full, 0..8 * M), 0x5a));
    assert!(all(&file_bytes(&full, 8 * M..SIZE), 0));
    b.finish(&vm.qmp, true).await.unwrap();

    // Three small writes: the next version's chunks are exactly theirs.
    vm.write(M + 4096, 4096, 0x11).await;
    vm.write(20 * M, 64 << 10, 0x22).await;
    vm.write(48 * M - 512, 1024, 0x33).await; // straddles chunks 11 and 12
    let st = cbt::ensure_bitmap(&vm.qmp, "disk0", true).await.unwrap();
    assert!(!st.created && !st.recovered, "{st:?}");
    let mut b = Backup::start(&vm.qmp, "disk0", &work).await.unwrap();
    let changed = vec![0..4 * M, 20 * M..24 * M, 44 * M..52 * M];
    assert_eq!(dirty_chunks(&mut b).await, changed);

    // A write after the view was taken: the view still shows the old bytes.
    vm.write(30 * M, 64 << 10, 0x44).await;
    vm.write(20 * M, 4096, 0x55).await; // over a changed range
    assert!(all(&b.read(30 * M, 64 << 10).await.unwrap(), 0));
    assert!(all(&b.read(20 * M, 64 << 10).await.unwrap(), 0x22));
    assert_eq!(
        dirty_chunks(&mut b).await,
        changed,
        "the frozen bitmap moved"
    );

    let dirty = b.dirty_ranges().await.unwrap();
    let inc = dir.join("v2.raw");
    let r = b.copy_to(&inc, Some(&dirty), |_, _| {}).await.unwrap();
    assert_eq!(r.ranges, changed);
    assert_eq!(r.bytes_read, 16 * M);
    let meta = std::fs::metadata(&inc).unwrap();
    assert_eq!(meta.len(), SIZE);
    assert!(
        meta.blocks() * 512 < 16 * M,
        "not sparse: {} blocks",
        meta.blocks()
    );

    // Second path: qemu-img reads the same view over NBD; the copied chunks are equal to it.
    let sock = b.workdir().join("disk0.nbd.sock");
    let reference = dir.join("ref.raw");
    let out = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw"])
        .arg(format!(
            "nbd+unix:///ax-cbt-disk0?socket={}",
            sock.display()
        ))
        .arg(&reference)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (a, want) = (
        std::fs::read(&inc).unwrap(),
        std::fs::read(&reference).unwrap(),
    );
    for c in &changed {
        let (s, e) = (c.start as usize, c.end as usize);
        assert!(a[s..e] == want[s..e], "chunk {c:?} differs from the view");
    }
    assert!(all(&want[30 * M as usize..(30 * M + 65536) as usize], 0));
    assert!(all(&want[20 * M as usize..(20 * M + 4096) as usize], 0x22));
    assert!(all(&a[(M + 4096) as usize..(M + 8192) as usize], 0x11));
    assert!(all(&a[0..M as usize], 0x5a));
    assert!(
        all(&a[8 * M as usize..20 * M as usize], 0),
        "outside the ranges: a hole"
    );

    // Not stored: its changes stay for the next run, with the writes made during it.
    b.finish(&vm.qmp, false).await.unwrap();
    let mut b = Backup::start(&vm.qmp, "disk0", &work).await.unwrap();
    assert_eq!(
        dirty_chunks(&mut b).await,
        vec![0..4 * M, 20 * M..24 * M, 28 * M..32 * M, 44 * M..52 * M]
    );
    assert!(all(&b.read(30 * M, 64 << 10).await.unwrap(), 0x44));
    assert!(all(&b.read(20 * M, 4096).await.unwrap(), 0x55));
    b.finish(&vm.qmp, true).await.unwrap();

    // Stored: nothing is left to copy.
    let mut b = Backup::start(&vm.qmp, "disk0", &work).await.unwrap();
    assert!(b.dirty_ranges().await.unwrap().is_empty());
    b.finish(&vm.qmp, true).await.unwrap();

    // Nothing of the backups is left in QEMU or in the work directory.
    let nodes = vm
        .qmp
        .execute("query-named-block-nodes", json!({"flat": true}))
        .await
        .unwrap();
    let names: Vec<_> = nodes
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|n| n["node-name"].as_str())
        .filter(|n| !n.starts_with('#'))
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
    assert!(!nodes.to_string().contains(BITMAP_NEXT));
    assert_eq!(std::fs::read_dir(&work).unwrap().count(), 0);
    vm.quit().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// The disks of one VM are backed up at one instant (one transaction): writes to either disk after
/// the start are in neither view, and each disk's next backup holds exactly its own later writes.
#[tokio::test]
async fn the_disks_of_a_vm_are_backed_up_at_one_instant() {
    if !have_qemu() {
        return;
    }
    let dir = tmpdir("two");
    let img0 = create_disk(&dir, "qcow2");
    let img1 = dir.join("disk1.raw");
    std::fs::File::create(&img1)
        .unwrap()
        .set_len(32 * M)
        .unwrap();
    let vm = Vm::launch_disks(&dir, &[(&img0, "qcow2"), (&img1, "raw")]).await;
    let work = dir.join("work");
    vm.write_to(0, 0, 4 * M, 0x10).await;
    vm.write_to(1, 8 * M, 4 * M, 0x20).await;
    for node in ["disk0", "disk1"] {
        cbt::ensure_bitmap(&vm.qmp, node, true).await.unwrap();
    }
    let mut bs = Backup::start_all(&vm.qmp, &["disk0", "disk1"], &work)
        .await
        .unwrap();
    assert_eq!((bs[0].node(), bs[0].size()), ("disk0", SIZE));
    assert_eq!((bs[1].node(), bs[1].size()), ("disk1", 32 * M));
    // After the instant, both disks change: neither view sees it.
    vm.write_to(0, 0, 4096, 0x11).await;
    vm.write_to(1, 8 * M, 4096, 0x21).await;
    vm.write_to(1, 20 * M, 4096, 0x22).await;
    let copies = [dir.join("c0.raw"), dir.join("c1.raw")];
    for (b, c) in bs.iter_mut().zip(&copies) {
        b.copy_to(c, None, |_, _| {}).await.unwrap();
    }
    assert!(all(&file_bytes(&copies[0], 0..4 * M), 0x10));
    assert!(all(&file_bytes(&copies[1], 8 * M..12 * M), 0x20));
    assert!(all(&file_bytes(&copies[1], 20 * M..21 * M), 0));
    // One NBD server serves both views; it goes with the last backup.
    let sock = work.join("disk0.nbd.sock");
    let mut bs = bs.into_iter();
    let b0 = bs.next().unwrap();
    let mut b1 = bs.next().unwrap();
    b0.finish(&vm.qmp, true).await.unwrap();
    assert!(sock.exists(), "the server still serves disk1");
    assert!(all(&b1.read(8 * M, 4096).await.unwrap(), 0x20));
    b1.finish(&vm.qmp, true).await.unwrap();
    assert_eq!(std::fs::read_dir(&work).unwrap().count(), 0);
    // The next backups: each disk's own writes since the instant, and nothing else.
    let mut bs = Backup::start_all(&vm.qmp, &["disk0", "disk1"], &work)
        .await
        .unwrap();
    assert_eq!(dirty_chunks(&mut bs[0]).await, vec![0..4 * M]);
    assert_eq!(
        dirty_chunks(&mut bs[1]).await,
        vec![8 * M..12 * M, 20 * M..24 * M]
    );
    assert!(all(&bs[0].read(0, 4096).await.unwrap(), 0x11));
    for b in bs {
        b.finish(&vm.qmp, true).await.unwrap();
    }
    // A node named twice, or an unknown one, is refused before anything starts.
    assert!(Backup::start_all(&vm.qmp, &["disk0", "disk0"], &work)
        .await
        .is_err());
    assert!(matches!(
        Backup::start_all(&vm.qmp, &["disk0", "disk9"], &work).await,
        Err(cbt::CbtError::NoNode(n)) if n == "disk9"
    ));
    let nodes = vm
        .qmp
        .execute("query-named-block-nodes", json!({"flat": true}))
        .await
        .unwrap();
    assert!(!nodes.to_string().contains(BITMAP_NEXT));
    assert!(!nodes.to_string().contains("ax-fleece"));
    vm.quit().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_persistent_bitmap_keeps_tracking_across_a_restart_and_a_crash_resets_it() {
    if !have_qemu() {
        return;
    }
    let dir = tmpdir("restart");
    let img = create_disk(&dir, "qcow2");
    let work = dir.join("work");
    let vm = Vm::launch(&dir, &img, "qcow2").await;
    assert!(
        cbt::ensure_bitmap(&vm.qmp, "disk0", true)
            .await
            .unwrap()
            .created
    );
    vm.write(10 * M, 4096, 0x66).await;
    vm.quit().await;

    let vm = Vm::launch(&dir, &img, "qcow2").await;
    let st = cbt::ensure_bitmap(&vm.qmp, "disk0", true).await.unwrap();
    assert!(!st.created && st.persistent, "{st:?}");
    vm.write(40 * M, 4096, 0x67).await;
    let mut b = Backup::start(&vm.qmp, "disk0", &work).await.unwrap();
    assert_eq!(
        dirty_chunks(&mut b).await,
        vec![8 * M..12 * M, 40 * M..44 * M]
    );
    b.finish(&vm.qmp, true).await.unwrap();
    vm.kill();

    // QEMU died with the bitmap in use: it is inconsistent, so it is recreated (read everything).
    let vm = Vm::launch(&dir, &img, "qcow2").await;
    let st = cbt::ensure_bitmap(&vm.qmp, "disk0", true).await.unwrap();
    assert!(st.created, "{st:?}");
    vm.quit().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_backup_interrupted_by_a_crash_of_the_caller_is_folded_back() {
    if !have_qemu() {
        return;
    }
    let dir = tmpdir("recover");
    let img = create_disk(&dir, "qcow2");
    let work = dir.join("work");
    let vm = Vm::launch(&dir, &img, "qcow2").await;
    cbt::ensure_bitmap(&vm.qmp, "disk0", true).await.unwrap();
    vm.write(4 * M, 4096, 0x71).await;
    let b = Backup::start(&vm.qmp, "disk0", &work).await.unwrap();
    vm.write(60 * M, 4096, 0x72).await;
    drop(b); // the caller crashes: export, overlay, job and ax-cbt-next stay in QEMU

    let st = cbt::ensure_bitmap(&vm.qmp, "disk0", true).await.unwrap();
    assert!(st.recovered && !st.created, "{st:?}");
    let mut b = Backup::start(&vm.qmp, "disk0", &work).await.unwrap();
    assert_eq!(
        dirty_chunks(&mut b).await,
        vec![4 * M..8 * M, 60 * M..64 * M]
    );
    b.finish(&vm.qmp, true).await.unwrap();
    // A start without ensure_bitmap also recovers.
    let b = Backup::start(&vm.qmp, "disk0", &work).await.unwrap();
    drop(b);
    vm.write(0, 4096, 0x73).await;
    let mut b = Backup::start(&vm.qmp, "disk0", &work).await.unwrap();
    assert_eq!(dirty_chunks(&mut b).await, vec![0..4 * M]);
    b.finish(&vm.qmp, true).await.unwrap();
    vm.quit().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_raw_disk_gets_a_bitmap_that_is_not_persistent() {
    if !have_qemu() {
        return;
    }
    let dir = tmpdir("raw");
    let img = create_disk(&dir, "raw");
    let work = dir.join("work");
    let vm = Vm::launch(&dir, &img, "raw").await;
    let st = cbt::ensure_bitmap(&vm.qmp, "disk0", true).await.unwrap();
    assert!(st.created && !st.persistent, "{st:?}");
    vm.write(33 * M, 8192, 0x81).await;
    let mut b = Backup::start(&vm.qmp, "disk0", &work).await.unwrap();
    assert_eq!(dirty_chunks(&mut b).await, vec![32 * M..36 * M]);
    assert!(all(&b.read(33 * M, 8192).await.unwrap(), 0x81));
    b.finish(&vm.qmp, true).await.unwrap();
    assert!(matches!(
        Backup::start(&vm.qmp, "nope", &work).await.unwrap_err(),
        cbt::CbtError::NoNode(_)
    ));
    vm.quit().await;
    let _ = std::fs::remove_dir_all(&dir);
}
