//! The stock Linux test guest (`scripts/build-linux-guest.sh`: Debian's kernel + a busybox initramfs
//! that counts and writes its disk) protected by `ax-agent colo-node` on host-a and host-b of a lab
//! (`ax_tests::colo`), the primary SIGKILLed, the secondary taking over: the guest counts on there and
//! no disk write fails. This is what operators run; the no-OS guests of the other COLO tests stand in
//! for it on hosts where it cannot run.
//!
//! **Where it cannot run (this project's development hosts).** COLO in QEMU 7.2 needs KVM (under TCG it
//! deadlocks at the first checkpoint: the COLO thread and the main loop both wait on the global lock),
//! and a nested KVM that emulates the guest's ring-0 code does not boot a Linux kernel at a usable
//! speed. The test decides by a real check, not by host name: it boots the guest under `-accel kvm`
//! alone first and requires `count 3` on its console within [`BOOT_BOUND`]. If that fails it prints
//! `SKIPPED: …` with what the console showed — the one documented exception to "as root with /dev/kvm
//! nothing skips" (docs/qemu.md, "Linux guests under COLO").
//!
//! Also skipped without root and network namespaces, /dev/kvm, `qemu-img`, a QEMU whose COLO works, or
//! the guest's build prerequisites.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use ax_qemu::def::{Accel, Disk, QemuDef, RunFiles};
use ax_qemu::process::{self, Qemu};
use ax_tests::colo::ColoLab;

const AGENT: &str = env!("CARGO_BIN_EXE_ax-agent");
/// How long KVM may take to boot the guest to `count 3` alone (the same guest reaches it in seconds
/// under TCG here; a KVM host that runs guests natively is faster still).
const BOOT_BOUND: Duration = Duration::from_secs(60);
const WAIT: Duration = Duration::from_secs(120);
const MEM_MIB: u64 = 256;
const TEST: &str = "colo_linux";

fn last(console: &Path) -> u64 {
    let n = ax_tests::colo::console_numbers(console, "count ");
    n.last().copied().unwrap_or(0)
}

fn linux_def(kernel: &Path, initrd: &Path, disk: &Path) -> QemuDef {
    let mut def = QemuDef {
        accel: Accel::Kvm,
        colo: true,
        ..QemuDef::default()
    };
    def.kernel = Some(kernel.into());
    def.initrd = Some(initrd.into());
    def.append = Some("quiet ax.tick_ms=100 ax.write_ms=100 ax.span_blocks=64".into());
    def.disks.push(Disk { path: disk.into() });
    def
}

/// Boots the guest under KVM alone; `Err` with what its console showed unless it reached `count 3`
/// within [`BOOT_BOUND`].
async fn kvm_boots_linux(dir: &Path, kernel: &Path, initrd: &Path) -> Result<Duration, String> {
    let files = RunFiles {
        dir: dir.join("boot-check"),
    };
    std::fs::create_dir_all(&files.dir).map_err(|e| e.to_string())?;
    let disk = files.dir.join("disk.raw");
    let out = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "raw"])
        .arg(&disk)
        .arg("16M")
        .output()
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!("qemu-img create: {}", out.status));
    }
    let def = linux_def(kernel, initrd, &disk);
    let t = Instant::now();
    let (_q, _qmp, _ev): (Qemu, _, _) = Qemu::launch(
        &def,
        "boot-check",
        MEM_MIB,
        1,
        &files,
        Duration::from_secs(30),
    )
    .await
    .map_err(|e| format!("QEMU under KVM did not start: {e}"))?;
    let console = files.console();
    while last(&console) < 3 && t.elapsed() < BOOT_BOUND {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let took = t.elapsed();
    process::kill_recorded(&files, Duration::from_secs(5));
    if last(&console) >= 3 {
        return Ok(took);
    }
    let text = std::fs::read_to_string(&console).unwrap_or_default();
    let shown = match text.lines().rev().find(|l| !l.trim().is_empty()) {
        Some(l) => format!("{} bytes, last line {:?}", text.len(), l.trim()),
        None => "nothing".into(),
    };
    Err(format!(
        "KVM here does not boot the Linux test guest at a usable speed: no `count 3` on its console \
         within {}s under -accel kvm (console: {shown}); this nested KVM emulates the guest's ring-0 \
         code, and under TCG QEMU 7.2's COLO deadlocks at the first checkpoint, so this host cannot \
         protect a Linux guest (docs/qemu.md, \"Linux guests under COLO\")",
        BOOT_BOUND.as_secs()
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn linux_guest_under_colo_fails_over() {
    if let Some(why) = ax_tests::colo::unavailable().await {
        println!("SKIPPED: {why}");
        return;
    }
    let Some((kernel, initrd)) = common::linux_guest(TEST) else {
        return;
    };
    let dir = std::env::temp_dir().join(format!("ax-colo-linux-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    match kvm_boots_linux(&dir, &kernel, &initrd).await {
        Ok(took) => println!("KVM boots the Linux guest to count 3 in {took:?}"),
        Err(why) => {
            // Also on the process's real stderr (not captured by the harness): the documented
            // exception shows in every run's log, e.g. scripts/test-all.sh's.
            use std::io::Write;
            println!("SKIPPED: {why}");
            let _ = writeln!(std::io::stderr().lock(), "SKIPPED: {TEST}: {why}");
            let _ = std::fs::remove_dir_all(&dir);
            return;
        }
    }
    tokio::task::spawn_blocking(move || scenario(&dir, &kernel, &initrd))
        .await
        .unwrap();
}

fn scenario(dir: &Path, kernel: &Path, initrd: &Path) {
    let h = ColoLab::start(AGENT.as_ref(), &dir.join("lab")).unwrap();
    let def = linux_def(kernel, initrd, Path::new("disk.raw"));
    let mem = ["--mem-mib", "256"];
    let a = h.node("host-a", &def, true, &mem).unwrap();
    let _b = h.node("host-b", &def, false, &mem).unwrap();
    h.wait_log("host-a", "protection complete: in COLO", 1, WAIT)
        .unwrap();
    h.wait_log("host-b", "in COLO: the replica is restorable", 1, WAIT)
        .unwrap();
    let (ca, cb) = (
        h.run_files("host-a").console(),
        h.run_files("host-b").console(),
    );
    let wait_past = |console: &Path, n: u64| {
        let end = Instant::now() + WAIT;
        while last(console) <= n && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(100));
        }
        last(console)
    };
    let protected = wait_past(&ca, last(&ca) + 3);
    h.kill_host("host-a", a);
    h.wait_log("host-b", "took the VM over", 1, WAIT).unwrap();
    let after = wait_past(&cb, protected + 3);
    println!("host-a killed at count {protected}; host-b counts on: {after}");
    assert!(after > protected + 3, "the guest does not count on host-b");
    let text = std::fs::read_to_string(&cb).unwrap_or_default();
    assert!(
        !text.contains("FAILED"),
        "a disk write failed on host-b: {text}"
    );
}
