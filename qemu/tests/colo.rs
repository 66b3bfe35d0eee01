//! QEMU COLO driven by `ax_qemu::colo`, against real QEMU 7.2 under KVM: two or three QEMUs on this
//! host, the guest kit's `qdirtier` (a multiboot guest without an OS that rewrites 256 pages per round
//! and prints `round N` on its serial port), one raw disk replicated over NBD, one e1000 NIC on a tap
//! in a test bridge. Re-protection: a QEMU that took over (as secondary or as a primary gone solo) or
//! was unprotected is protected again to a fresh secondary; disk contents written through the block
//! layer (HMP `qemu-io` on the guest's device) survive each move.
//!
//! Skipped (`SKIPPED: …`) without /dev/kvm, without a QEMU whose COLO works ([`colo::probe`]), without
//! `qemu-img`, or when not root (taps and the bridge). One test at a time.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ax_guests::qemu;
use ax_qemu::colo::{self, Addr, PrimaryChannels, ProtectOptions, SecondaryChannels};
use ax_qemu::def::{Accel, Disk, Nic, NicModel, QemuDef, RunFiles};
use ax_qemu::migrate;
use ax_qemu::process::{self, Qemu};
use ax_qemu::qmp::{Events, Qmp};
use ax_qemu::relay::{self, Relay, RelayOptions};

const MEM_MIB: u64 = 64;
const T: Duration = Duration::from_secs(20);

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The guest's kernel command line: the guest kit's `qdirtier` rewrites 256 pages per round and prints
/// `round N` every [`EVERY`] rounds.
const EVERY: u64 = 200;

/// Writes the guest kit's `qdirtier` into `dir`.
fn build_guest(dir: &Path) {
    qemu::write_image(qemu::QDIRTIER, &dir.join("qdirtier.elf")).unwrap();
}

fn have(bin: &str, arg: &str) -> bool {
    std::process::Command::new(bin)
        .arg(arg)
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Why the tests cannot run here, if they cannot.
async fn skip_reason() -> Option<String> {
    if let Err(e) = ax_qemu::def::kvm_usable() {
        return Some(format!("/dev/kvm {e}"));
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root (taps and a bridge are needed)".into());
    }
    if !have("qemu-img", "--version") {
        return Some("qemu-img not installed".into());
    }
    match colo::probe("qemu-system-x86_64").await {
        Ok(_) => None,
        Err(e) => Some(e.to_string()),
    }
}

macro_rules! skip_unless_ready {
    () => {
        if let Some(why) = skip_reason().await {
            println!("SKIPPED: {why}");
            return;
        }
    };
}

/// How the channels run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// QEMU's own TCP sockets on loopback.
    Tcp,
    /// QEMU on unix sockets, carried over loopback TCP by `ax_qemu::relay`.
    Relay,
    /// QEMU on unix sockets end to end (one host only: the floor the relay is compared with).
    Unix,
}

struct Pair {
    dir: PathBuf,
    bridge: String,
    pf: RunFiles,
    sf: RunFiles,
    pdef: QemuDef,
    sdef: QemuDef,
    pq: Option<Qemu>,
    sq: Option<Qemu>,
    pqmp: Qmp,
    sqmp: Qmp,
    pev: Events,
    _relays: Vec<Relay>,
}

impl Drop for Pair {
    fn drop(&mut self) {
        process::kill_recorded(&self.pf, Duration::from_secs(5));
        process::kill_recorded(&self.sf, Duration::from_secs(5));
        process::remove_taps(&self.pf, &self.pdef);
        process::remove_taps(&self.sf, &self.sdef);
        let _ = std::process::Command::new("ip")
            .args(["link", "del", &self.bridge])
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn ip(args: &[&str]) {
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn free_port() -> u16 {
    migrate::free_port("127.0.0.1").unwrap()
}

fn counts(files: &RunFiles) -> Vec<u64> {
    std::fs::read_to_string(files.console())
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().strip_prefix("round "))
        .filter_map(|n| n.trim().parse().ok())
        .collect()
}

fn last_count(files: &RunFiles) -> u64 {
    counts(files).last().copied().unwrap_or(0)
}

/// Waits (bounded) until the guest behind `files` counts past `above`.
async fn progresses(files: &RunFiles, above: u64, what: &str) -> u64 {
    let deadline = Instant::now() + T;
    loop {
        let c = last_count(files);
        if c > above {
            return c;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: the guest did not count past {above} within {T:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Launches and prepares the VM's secondary QEMU.
async fn start_secondary(
    def: &QemuDef,
    files: &RunFiles,
    ch: &SecondaryChannels,
    disks: &[migrate::DiskInfo],
) -> (Qemu, Qmp, Events) {
    let sec = colo::Secondary {
        def,
        vm: "colo-vm",
        mem_mib: MEM_MIB,
        vcpus: 1,
        files,
        channels: ch,
    };
    let (q, qmp, events) = colo::launch_secondary(&sec, disks, T).await.unwrap();
    colo::prepare_secondary(&qmp, def, ch).await.unwrap();
    (q, qmp, events)
}

/// A fresh test directory (holding the guest) and bridge for test `name`.
fn dir_and_bridge(name: &str) -> (PathBuf, String) {
    let dir = std::env::temp_dir().join(format!("ax-colo-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    build_guest(&dir);
    let bridge = format!("axcb{:x}{}", std::process::id() & 0xffff, &name[..2]);
    let _ = std::process::Command::new("ip")
        .args(["link", "del", &bridge])
        .output();
    ip(&["link", "add", &bridge, "type", "bridge"]);
    ip(&["link", "set", &bridge, "up"]);
    (dir, bridge)
}

/// The VM: the guest in `dir`, one raw disk, one e1000 NIC on `bridge`, `colo`.
fn vm_def(dir: &Path, bridge: &str, disk: PathBuf) -> QemuDef {
    QemuDef {
        kernel: Some(dir.join("qdirtier.elf")),
        append: Some(format!("pages=256 every={EVERY}")),
        disks: vec![Disk { path: disk }],
        nics: vec![Nic {
            bridge: bridge.to_string(),
            mac: None,
            model: NicModel::E1000,
        }],
        accel: Accel::Kvm,
        colo: true,
        ..QemuDef::default()
    }
}

async fn setup(name: &str, mode: Mode) -> Pair {
    let (dir, bridge) = dir_and_bridge(name);
    let (pd, sd) = (dir.join("p"), dir.join("s"));
    std::fs::create_dir_all(&pd).unwrap();
    std::fs::create_dir_all(&sd).unwrap();
    let pdisk = pd.join("disk.raw");
    let out = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "raw"])
        .arg(&pdisk)
        .arg("16M")
        .output()
        .unwrap();
    assert!(out.status.success());
    let pdef = vm_def(&dir, &bridge, pdisk);
    let sdef = vm_def(&dir, &bridge, sd.join("disk.raw"));
    let pf = RunFiles { dir: pd.clone() };
    let sf = RunFiles { dir: sd.clone() };
    let (pq, pqmp, pev) = Qemu::launch(&pdef, "colo-vm", MEM_MIB, 1, &pf, T)
        .await
        .unwrap();
    progresses(&pf, 0, "primary boot").await;
    let disks = migrate::source_disks(&pqmp, &pdef).await.unwrap();
    migrate::create_disk_images(&disks, &sdef).unwrap();

    let mut relays = Vec::new();
    let (sch, pch) = match mode {
        Mode::Tcp => {
            let (mig, nbd, mir, cmp) = (free_port(), free_port(), free_port(), free_port());
            (
                SecondaryChannels {
                    incoming: Addr::inet("127.0.0.1", mig),
                    nbd: Addr::inet("127.0.0.1", nbd),
                    mirror: vec![Addr::inet("127.0.0.1", mir)],
                    compare: vec![Addr::inet("127.0.0.1", cmp)],
                },
                PrimaryChannels {
                    migrate: Addr::inet("127.0.0.1", mig),
                    nbd: Addr::inet("127.0.0.1", nbd),
                    mirror: vec![Addr::inet("127.0.0.1", mir)],
                    compare: vec![Addr::inet("127.0.0.1", cmp)],
                    dir: pd.clone(),
                },
            )
        }
        Mode::Unix => (
            SecondaryChannels {
                incoming: Addr::unix(sd.join("mig.sock")),
                nbd: Addr::unix(sd.join("nbd.sock")),
                mirror: vec![Addr::unix(pd.join("mirror0.sock"))],
                compare: vec![Addr::unix(pd.join("compare0.sock"))],
            },
            PrimaryChannels {
                migrate: Addr::unix(sd.join("mig.sock")),
                nbd: Addr::unix(sd.join("nbd.sock")),
                mirror: vec![Addr::unix(pd.join("mirror0.sock"))],
                compare: vec![Addr::unix(pd.join("compare0.sock"))],
                dir: pd.clone(),
            },
        ),
        Mode::Relay => {
            let o = RelayOptions::default;
            // Listening ends: secondary's migration and NBD, primary's mirror and compare chardevs.
            let back = |to: PathBuf| {
                let to2 = to.clone();
                async move {
                    let (r, a) = relay::tcp_to_unix("127.0.0.1:0", to2, o()).await.unwrap();
                    (r, a.to_string())
                }
            };
            let (r1, mig) = back(sd.join("mig.sock")).await;
            let (r2, nbd) = back(sd.join("nbd.sock")).await;
            let (r3, mir) = back(pd.join("mirror0.sock")).await;
            let (r4, cmp) = back(pd.join("compare0.sock")).await;
            // Connecting ends.
            let r5 = relay::unix_to_tcp(&pd.join("mig-out.sock"), mig, o())
                .await
                .unwrap();
            let r6 = relay::unix_to_tcp(&pd.join("nbd-out.sock"), nbd, o())
                .await
                .unwrap();
            let r7 = relay::unix_to_tcp(&sd.join("mirror0-out.sock"), mir, o())
                .await
                .unwrap();
            let r8 = relay::unix_to_tcp(&sd.join("compare0-out.sock"), cmp, o())
                .await
                .unwrap();
            relays.extend([r1, r2, r3, r4, r5, r6, r7, r8]);
            (
                SecondaryChannels {
                    incoming: Addr::unix(sd.join("mig.sock")),
                    nbd: Addr::unix(sd.join("nbd.sock")),
                    mirror: vec![Addr::unix(sd.join("mirror0-out.sock"))],
                    compare: vec![Addr::unix(sd.join("compare0-out.sock"))],
                },
                PrimaryChannels {
                    migrate: Addr::unix(pd.join("mig-out.sock")),
                    nbd: Addr::unix(pd.join("nbd-out.sock")),
                    mirror: vec![Addr::unix(pd.join("mirror0.sock"))],
                    compare: vec![Addr::unix(pd.join("compare0.sock"))],
                    dir: pd.clone(),
                },
            )
        }
    };
    let (sq, sqmp, _sev) = start_secondary(&sdef, &sf, &sch, &disks).await;
    let mut phases = Vec::new();
    let report = colo::protect(
        &pqmp,
        &pdef,
        &disks,
        &pch,
        &ProtectOptions::default(),
        &mut |p| {
            if phases.last() != Some(&p.phase) {
                phases.push(p.phase);
            }
        },
    )
    .await
    .unwrap();
    println!("{mode:?}: protected: {report:?}, phases {phases:?}");
    assert_eq!(phases.last(), Some(&colo::Phase::Colo));
    assert_eq!(colo::status(&pqmp).await.unwrap().mode, "primary");
    assert_eq!(colo::status(&sqmp).await.unwrap().mode, "secondary");
    Pair {
        dir,
        bridge,
        pf,
        sf,
        pdef,
        sdef,
        pq: Some(pq),
        sq: Some(sq),
        pqmp,
        sqmp,
        pev,
        _relays: relays,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_passes_here_and_refuses_10_0() {
    let _g = SERIAL.lock().await;
    assert_eq!(
        colo::check_version(colo::parse_version("10.0.2").unwrap()),
        Err(colo::BROKEN_10.to_string())
    );
    if ax_qemu::def::kvm_usable().is_err() {
        println!("SKIPPED: no usable /dev/kvm");
        return;
    }
    let t = Instant::now();
    match colo::probe("qemu-system-x86_64").await {
        Ok(s) => {
            println!("probe: {s:?} in {:?}", t.elapsed());
            // Cached: the second call does not run a trial.
            let t2 = Instant::now();
            assert_eq!(colo::probe("qemu-system-x86_64").await.unwrap(), s);
            println!("probe (cached): {:?}", t2.elapsed());
        }
        Err(e) => println!("SKIPPED: {e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setup_reaches_colo_and_checkpoints() {
    let _g = SERIAL.lock().await;
    skip_unless_ready!();
    let mut p = setup("setup", Mode::Relay).await;
    let (pauses, seen) = colo::checkpoint_pauses(&mut p.pev, Duration::from_secs(2)).await;
    assert!(
        !seen.iter().any(|e| e.event == "COLO_EXIT"),
        "COLO ended: {seen:?}"
    );
    println!("{} checkpoints in 2 s", pauses.len());
    assert!(pauses.len() >= 3, "checkpoints: {pauses:?}");
    // Both guests count (the secondary runs in parallel between checkpoints).
    let c = last_count(&p.pf);
    progresses(&p.pf, c, "primary in COLO").await;
    colo::set_checkpoint_delay(&p.pqmp, 200).await.unwrap();
    assert_eq!(colo::status(&p.pqmp).await.unwrap().reason, "none");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primary_killed_secondary_takes_over() {
    let _g = SERIAL.lock().await;
    skip_unless_ready!();
    let mut p = setup("pkill", Mode::Relay).await;
    let (pauses, _) = colo::checkpoint_pauses(&mut p.pev, Duration::from_millis(800)).await;
    assert!(!pauses.is_empty());
    let before = last_count(&p.pf);
    p.pq.take().unwrap().kill().await;
    let t = colo::take_over(&p.sqmp, &p.sdef, T).await.unwrap();
    println!("secondary took over: {t:?}; primary had counted to {before}");
    assert_eq!(t.was, "secondary");
    assert_eq!(t.status, "running");
    assert_eq!(colo::status(&p.sqmp).await.unwrap().mode, "none");
    // It runs on: its guest keeps counting.
    let c = last_count(&p.sf);
    let later = progresses(&p.sf, c, "secondary after take-over").await;
    println!("the secondary's guest counts on: {c} → {later}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secondary_killed_primary_goes_on() {
    let _g = SERIAL.lock().await;
    skip_unless_ready!();
    let mut p = setup("skill", Mode::Relay).await;
    let (pauses, _) = colo::checkpoint_pauses(&mut p.pev, Duration::from_millis(800)).await;
    assert!(!pauses.is_empty());
    p.sq.take().unwrap().kill().await;
    let t = colo::take_over(&p.pqmp, &p.pdef, T).await.unwrap();
    println!("primary goes on alone: {t:?}");
    assert_eq!(t.was, "primary");
    assert_eq!(t.status, "running");
    assert_eq!(colo::status(&p.pqmp).await.unwrap().mode, "none");
    let c = last_count(&p.pf);
    let later = progresses(&p.pf, c, "primary after take-over").await;
    println!("the primary's guest counts on: {c} → {later}");
    // No checkpoints any more: the vCPUs are not stopped again (the events of the failed checkpoint
    // and of the take-over, still queued, are read first).
    let _ = colo::checkpoint_pauses(&mut p.pev, Duration::from_millis(100)).await;
    let (pauses, _) = colo::checkpoint_pauses(&mut p.pev, Duration::from_millis(500)).await;
    assert!(pauses.is_empty(), "{pauses:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoint_pauses_relay_vs_plain_tcp() {
    let _g = SERIAL.lock().await;
    skip_unless_ready!();
    for mode in [Mode::Tcp, Mode::Relay, Mode::Unix] {
        let name = match mode {
            Mode::Tcp => "tcp",
            Mode::Relay => "relay",
            Mode::Unix => "unix",
        };
        let mut p = setup(name, mode).await;
        let (mut pauses, _) = colo::checkpoint_pauses(&mut p.pev, Duration::from_secs(4)).await;
        if !pauses.is_empty() {
            pauses.remove(0);
        }
        println!(
            "COLO checkpoint pause, {mode:?}: {} checkpoints in 4 s, p50 {:.1} ms, p99 {:.1} ms (256 dirty pages, 100 ms period)",
            pauses.len(),
            colo::quantile(&pauses, 0.5).as_secs_f64() * 1e3,
            colo::quantile(&pauses, 0.99).as_secs_f64() * 1e3,
        );
        drop(p);
    }
}

// ---------------------------------------------------------------------------------------------
// Re-protection: a QEMU that took over, went solo or was unprotected is protected again to a fresh
// secondary. QEMU's channels are unix sockets here (the relay is covered above).

/// One QEMU of the re-protection tests.
struct Vm {
    files: RunFiles,
    def: QemuDef,
    qemu: Option<Qemu>,
    qmp: Qmp,
    events: Events,
}

/// QEMUs on one test bridge; every QEMU launched is killed, its taps, the bridge and the directory
/// removed on drop.
struct Lab {
    dir: PathBuf,
    bridge: String,
    launched: Vec<(RunFiles, QemuDef)>,
}

impl Drop for Lab {
    fn drop(&mut self) {
        for (f, d) in &self.launched {
            process::kill_recorded(f, Duration::from_secs(5));
            process::remove_taps(f, d);
        }
        let _ = std::process::Command::new("ip")
            .args(["link", "del", &self.bridge])
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The test's lock and a fresh [`Lab`], or `SKIPPED` and return.
macro_rules! lab_unless_skipped {
    ($name:literal) => {{
        let g = SERIAL.lock().await;
        skip_unless_ready!();
        (g, Lab::new($name))
    }};
}

/// Where the disk patterns go: 64 KiB at `n` MiB, every byte `0xa0 + n`.
const PATTERN_LEN: usize = 64 << 10;

impl Lab {
    fn new(name: &str) -> Lab {
        let (dir, bridge) = dir_and_bridge(name);
        Lab {
            dir,
            bridge,
            launched: Vec::new(),
        }
    }

    fn def(&self, disk: PathBuf) -> QemuDef {
        vm_def(&self.dir, &self.bridge, disk)
    }

    /// Boots the VM in `<dir>/<name>` on a fresh 16 MiB raw disk that holds pattern 1 (written into
    /// the image before the boot); returns once the guest counts.
    async fn boot(&mut self, name: &str) -> Vm {
        let d = self.dir.join(name);
        std::fs::create_dir_all(&d).unwrap();
        let disk = d.join("disk.raw");
        let mut image = vec![0u8; 16 << 20];
        image[1 << 20..(1 << 20) + PATTERN_LEN].fill(0xa1);
        std::fs::write(&disk, image).unwrap();
        let def = self.def(disk);
        let files = RunFiles { dir: d };
        let started = Qemu::launch(&def, "colo-vm", MEM_MIB, 1, &files, T)
            .await
            .unwrap();
        progresses(&files, 0, name).await;
        self.record(files, def, started)
    }

    /// A launched QEMU, recorded for the cleanup.
    fn record(&mut self, files: RunFiles, def: QemuDef, started: (Qemu, Qmp, Events)) -> Vm {
        self.launched.push((files.clone(), def.clone()));
        let (q, qmp, events) = started;
        Vm {
            files,
            def,
            qemu: Some(q),
            qmp,
            events,
        }
    }

    /// A fresh secondary in `<dir>/<name>` for `primary` (base copies of its disks, launched and
    /// prepared), and the channels the primary protects to it with.
    async fn secondary(&mut self, name: &str, primary: &Vm) -> (Vm, PrimaryChannels) {
        let d = self.dir.join(name);
        std::fs::create_dir_all(&d).unwrap();
        let def = self.def(d.join("disk.raw"));
        let disks = migrate::source_disks(&primary.qmp, &primary.def)
            .await
            .unwrap();
        migrate::create_disk_images(&disks, &def).unwrap();
        let pd = &primary.files.dir;
        let sch = SecondaryChannels {
            incoming: Addr::unix(d.join("mig.sock")),
            nbd: Addr::unix(d.join("nbd.sock")),
            mirror: vec![Addr::unix(pd.join("mirror0.sock"))],
            compare: vec![Addr::unix(pd.join("compare0.sock"))],
        };
        let pch = PrimaryChannels {
            migrate: sch.incoming.clone(),
            nbd: sch.nbd.clone(),
            mirror: sch.mirror.clone(),
            compare: sch.compare.clone(),
            dir: pd.clone(),
        };
        let files = RunFiles { dir: d };
        let started = start_secondary(&def, &files, &sch, &disks).await;
        (self.record(files, def, started), pch)
    }
}

/// Protects `primary` through `ch` (its secondary prepared) and checks both sides are in COLO.
async fn protect_to(primary: &Vm, secondary: &Vm, ch: &PrimaryChannels, what: &str) {
    let disks = migrate::source_disks(&primary.qmp, &primary.def)
        .await
        .unwrap();
    let report = colo::protect(
        &primary.qmp,
        &primary.def,
        &disks,
        ch,
        &ProtectOptions::default(),
        &mut |_| {},
    )
    .await
    .unwrap_or_else(|e| panic!("{what}: protect: {e}"));
    println!("{what}: in COLO: {report:?}");
    assert_eq!(colo::status(&primary.qmp).await.unwrap().mode, "primary");
    assert_eq!(
        colo::status(&secondary.qmp).await.unwrap().mode,
        "secondary"
    );
}

/// Waits (bounded) for `n` checkpoints of `primary` that start after this call (events queued
/// earlier, such as a former secondary's, are skipped by QEMU's timestamps).
async fn checkpoints(primary: &mut Vm, n: usize, what: &str) {
    let t0 = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as i64;
    let mut meter = colo::PauseMeter::default();
    let until = tokio::time::Instant::now() + T;
    while meter.pauses().len() < n {
        match tokio::time::timeout_at(until, primary.events.next()).await {
            Ok(Some(ev)) => {
                if ev.timestamp.is_some_and(|t| t.micros() >= t0) {
                    assert_ne!(ev.event, "COLO_EXIT", "{what}: COLO ended: {}", ev.data);
                    meter.observe(&ev);
                }
            }
            Ok(None) => panic!("{what}: the primary's QMP connection ended"),
            Err(_) => panic!(
                "{what}: {} of {n} checkpoints within {T:?}",
                meter.pauses().len()
            ),
        }
    }
}

async fn hmp(vm: &Vm, cmd: &str) -> String {
    let v = vm
        .qmp
        .execute(
            "human-monitor-command",
            serde_json::json!({ "command-line": cmd }),
        )
        .await
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    v.as_str().unwrap_or_default().to_string()
}

/// Writes pattern `n` through the guest's disk device (HMP `qemu-io` on the virtio-blk backend: the
/// quorum, so replicated to a secondary). qemu-io prints its result on QEMU's stdout, not to the
/// monitor: [`check_patterns`] verifies.
async fn write_pattern(vm: &Vm, n: u8) {
    let out = hmp(
        vm,
        &format!(
            "qemu-io -d /machine/peripheral/disk0-dev/virtio-backend \"write -P {:#x} {n}M {PATTERN_LEN}\"",
            0xa0 + n
        ),
    )
    .await;
    assert!(!out.contains("Error"), "{out}");
}

/// Checks patterns `1..=upto` as the guest sees its disk: the quorum node exported read-only over
/// NBD and copied out with `qemu-img convert`.
async fn check_patterns(vm: &Vm, upto: u8, what: &str) {
    let sock = vm.files.dir.join("check.sock");
    let _ = std::fs::remove_file(&sock);
    let legacy =
        serde_json::json!({ "type": "unix", "data": { "path": sock.display().to_string() } });
    vm.qmp
        .execute("nbd-server-start", serde_json::json!({ "addr": legacy }))
        .await
        .unwrap();
    vm.qmp
        .execute(
            "block-export-add",
            serde_json::json!({ "type": "nbd", "id": "check", "node-name": "disk0",
                                "name": "disk0", "writable": false }),
        )
        .await
        .unwrap();
    let copy = vm.files.dir.join("check.raw");
    let out = std::process::Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw"])
        .arg(format!("nbd+unix:///disk0?socket={}", sock.display()))
        .arg(&copy)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "qemu-img convert: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = vm
        .qmp
        .execute("block-export-del", serde_json::json!({ "id": "check" }))
        .await;
    let _ = vm
        .qmp
        .execute("nbd-server-stop", serde_json::Value::Null)
        .await;
    let image = std::fs::read(&copy).unwrap();
    for n in 1..=upto {
        let at = usize::from(n) << 20;
        let bad = image[at..at + PATTERN_LEN]
            .iter()
            .filter(|&&b| b != 0xa0 + n)
            .count();
        assert_eq!(bad, 0, "{what}: pattern {n}: {bad} bytes differ");
    }
    println!("{what}: disk patterns 1..={upto} intact");
}

/// Kills `dead` and takes the VM over on `survivor`; checks the guest counts on there past the
/// count `dead` had reached.
async fn fail_over(dead: &mut Vm, survivor: &Vm, was: &str, what: &str) {
    let before = last_count(&dead.files);
    dead.qemu.take().unwrap().kill().await;
    let t = colo::take_over(&survivor.qmp, &survivor.def, T)
        .await
        .unwrap_or_else(|e| panic!("{what}: take_over: {e}"));
    assert_eq!(t.was, was, "{what}");
    assert_eq!(t.status, "running", "{what}");
    assert_eq!(colo::status(&survivor.qmp).await.unwrap().mode, "none");
    let later = progresses(&survivor.files, before, what).await;
    println!("{what}: took over ({t:?}); the count goes on: {before} → {later}");
}

/// One move: `primary` protected to a fresh secondary `name` (COLO reached, checkpoints flow),
/// pattern `n` written on it and checkpointed, `primary` killed, the secondary takes over; returns it.
async fn protect_write_move(lab: &mut Lab, primary: &mut Vm, name: &str, n: u8, what: &str) -> Vm {
    let (sec, ch) = lab.secondary(name, primary).await;
    protect_to(primary, &sec, &ch, what).await;
    checkpoints(primary, 3, what).await;
    write_pattern(primary, n).await;
    checkpoints(primary, 2, &format!("{what}, after the write")).await;
    fail_over(
        primary,
        &sec,
        "secondary",
        &format!("{what}, primary killed"),
    )
    .await;
    sec
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secondary_that_took_over_is_protected_again() {
    let (_g, mut lab) = lab_unless_skipped!("retake");
    let mut a = lab.boot("a").await;
    let mut b = protect_write_move(&mut lab, &mut a, "b", 2, "A → B").await;
    // B (a former secondary: its quorum's child is disk0-rep, its NIC keeps the rewriter) protects
    // the VM to a fresh C, which takes it over in turn.
    let c = protect_write_move(&mut lab, &mut b, "c", 3, "B → C").await;
    check_patterns(&c, 3, "on C after two moves").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_gone_solo_then_unprotected_is_protected_again() {
    let (_g, mut lab) = lab_unless_skipped!("resolo");
    let mut a = lab.boot("a").await;
    let (mut b, ch) = lab.secondary("b", &a).await;
    protect_to(&a, &b, &ch, "A → B").await;
    checkpoints(&mut a, 2, "A → B").await;
    // The secondary dies: A goes on alone (solo).
    fail_over(&mut b, &a, "primary", "B killed, A solo").await;

    // Solo → protected to C; then ft → ha: A leaves COLO and runs on alone, C is released.
    let (mut c, ch) = lab.secondary("c", &a).await;
    protect_to(&a, &c, &ch, "A → C").await;
    checkpoints(&mut a, 2, "A → C").await;
    write_pattern(&a, 2).await;
    colo::unprotect(&a.qmp, &a.def).await;
    assert_eq!(colo::status(&a.qmp).await.unwrap().mode, "none");
    let count = last_count(&a.files);
    progresses(&a.files, count, "A unprotected").await;
    c.qemu.take().unwrap().kill().await;
    write_pattern(&a, 3).await;

    // ha → ft again, to D, which then takes the VM over.
    let d = protect_write_move(&mut lab, &mut a, "d", 4, "A → D").await;
    check_patterns(&d, 4, "on D").await;
}
