//! QEMU COLO driven by `ax_qemu::colo`, against real QEMU 7.2 under KVM: two QEMUs on this host, a
//! tiny multiboot guest (below, assembled at test time) that counts on its serial port and rewrites
//! 256 pages per count, one raw disk replicated over NBD, one e1000 NIC on a tap in a test bridge.
//!
//! Skipped (`SKIPPED: …`) without /dev/kvm, without a QEMU whose COLO works ([`colo::probe`]), without
//! `as`/`ld`/`qemu-img`, or when not root (taps and the bridge). One test at a time.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ax_qemu::colo::{self, Addr, PrimaryChannels, ProtectOptions, SecondaryChannels};
use ax_qemu::def::{Accel, Disk, Nic, NicModel, QemuDef, RunFiles};
use ax_qemu::migrate;
use ax_qemu::process::{self, Qemu};
use ax_qemu::qmp::{Events, Qmp};
use ax_qemu::relay::{self, Relay, RelayOptions};

const MEM_MIB: u64 = 64;
const T: Duration = Duration::from_secs(20);

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The guest: a multiboot kernel that, forever, increments a counter, writes it into the first
/// dword of each of 256 pages at 4 MiB, prints `count N` on COM1, and spins a while.
const GUEST: &str = r#"
    .text
    .align 4
    .long 0x1BADB002            # multiboot magic
    .long 0x00000000            # flags: none (QEMU loads the ELF segments)
    .long -(0x1BADB002)         # checksum
    .globl _start
_start:
    mov $0x300000, %esp
    xor %ebx, %ebx
next:
    inc %ebx
    mov $0x400000, %edi         # dirty 256 pages
    mov $256, %ecx
dirty:
    mov %ebx, (%edi)
    add $4096, %edi
    loop dirty
    mov $0x3f8, %dx             # "count " on COM1
    mov $msg, %esi
say:
    movb (%esi), %al
    test %al, %al
    jz number
    outb %al, %dx
    inc %esi
    jmp say
number:                         # the counter in decimal, digits pushed then popped
    mov %ebx, %eax
    xor %ecx, %ecx
    mov $10, %edi
divide:
    xor %edx, %edx
    div %edi
    add $'0', %dl
    push %edx
    inc %ecx
    test %eax, %eax
    jnz divide
    mov $0x3f8, %dx
digits:
    pop %eax
    outb %al, %dx
    loop digits
    mov $'\n', %al
    outb %al, %dx
    mov $20000, %ecx            # spin
spin:
    loop spin
    jmp next
msg:
    .asciz "count "
"#;

fn have(bin: &str, arg: &str) -> bool {
    std::process::Command::new(bin)
        .arg(arg)
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Builds the guest into `dir`; why not otherwise.
fn build_guest(dir: &Path) -> Result<PathBuf, String> {
    let src = dir.join("guest.s");
    let obj = dir.join("guest.o");
    let elf = dir.join("guest.elf");
    std::fs::write(&src, GUEST).map_err(|e| e.to_string())?;
    let run = |cmd: &mut std::process::Command| -> Result<(), String> {
        let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr)))
        }
    };
    run(std::process::Command::new("as")
        .arg("--32")
        .arg("-o")
        .arg(&obj)
        .arg(&src))?;
    run(std::process::Command::new("ld")
        .args(["-m", "elf_i386", "-Ttext=0x100000", "-e", "_start", "-o"])
        .arg(&elf)
        .arg(&obj))?;
    Ok(elf)
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
    for (b, a) in [
        ("as", "--version"),
        ("ld", "--version"),
        ("qemu-img", "--version"),
    ] {
        if !have(b, a) {
            return Some(format!("{b} not installed"));
        }
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
        .filter_map(|l| l.trim().strip_prefix("count "))
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

async fn setup(name: &str, mode: Mode) -> Pair {
    let dir = std::env::temp_dir().join(format!("ax-colo-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (pd, sd) = (dir.join("p"), dir.join("s"));
    std::fs::create_dir_all(&pd).unwrap();
    std::fs::create_dir_all(&sd).unwrap();
    let guest = build_guest(&dir).unwrap();
    let bridge = format!("axcb{:x}{}", std::process::id() & 0xffff, &name[..2]);
    let _ = std::process::Command::new("ip")
        .args(["link", "del", &bridge])
        .output();
    ip(&["link", "add", &bridge, "type", "bridge"]);
    ip(&["link", "set", &bridge, "up"]);
    let pdisk = pd.join("disk.raw");
    let out = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "raw"])
        .arg(&pdisk)
        .arg("16M")
        .output()
        .unwrap();
    assert!(out.status.success());
    let pdef = QemuDef {
        kernel: Some(guest),
        disks: vec![Disk { path: pdisk }],
        nics: vec![Nic {
            bridge: bridge.clone(),
            mac: None,
            model: NicModel::E1000,
        }],
        accel: Accel::Kvm,
        colo: true,
        ..QemuDef::default()
    };
    let mut sdef = pdef.clone();
    sdef.disks = vec![Disk {
        path: sd.join("disk.raw"),
    }];
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
    let (sq, sqmp, _sev) =
        colo::launch_secondary(&sdef, "colo-vm", MEM_MIB, 1, &sf, &disks, &sch, T)
            .await
            .unwrap();
    colo::prepare_secondary(&sqmp, &sdef, &sch).await.unwrap();
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
    // No checkpoints any more: the vCPUs are not stopped again.
    let (pauses, _) = colo::checkpoint_pauses(&mut p.pev, Duration::from_millis(500)).await;
    assert!(pauses.is_empty(), "{pauses:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoint_pauses_relay_vs_plain_tcp() {
    let _g = SERIAL.lock().await;
    skip_unless_ready!();
    for mode in [Mode::Tcp, Mode::Relay] {
        let mut p = setup(if mode == Mode::Tcp { "tcp" } else { "relay" }, mode).await;
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
