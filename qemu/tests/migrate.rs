//! Live migration between two real QEMUs on loopback, with the stock Linux test guest
//! (`scripts/build-linux-guest.sh`) under TCG and a 64 MiB qcow2 disk copied by NBD mirror.
//!
//! Skipped (`SKIPPED: …`) when `qemu-system-x86_64`/`qemu-img` are not installed or the guest cannot be
//! built. The tests run one at a time (each boots a guest under TCG).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ax_qemu::def::{Accel, Disk, LaunchOptions, QemuDef, RunFiles};
use ax_qemu::migrate::{
    self, Destination, Listen, MigrateError, MigrateOptions, Phase, Progress, Source, TlsFiles,
};
use ax_qemu::process::Qemu;
use ax_qemu::qmp::{Qmp, QueryStatus, Quit};

const MEM_MIB: u64 = 256;
const QMP_TIMEOUT: Duration = Duration::from_secs(30);

/// One test at a time (each boots a guest under TCG); an async mutex, held across the test's awaits.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn have(bin: &str) -> bool {
    std::process::Command::new(bin)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The guest's kernel and initrd, or why the test is skipped.
fn guest() -> Result<(PathBuf, PathBuf), String> {
    if !have("qemu-system-x86_64") {
        return Err("qemu-system-x86_64 not installed".into());
    }
    if !have("qemu-img") {
        return Err("qemu-img not installed".into());
    }
    let out = std::process::Command::new(repo().join("scripts/build-linux-guest.sh"))
        .output()
        .map_err(|e| format!("scripts/build-linux-guest.sh: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "scripts/build-linux-guest.sh failed: {}",
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .last()
                .unwrap_or("")
        ));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut lines = text.lines();
    match (lines.next(), lines.next()) {
        (Some(k), Some(i)) => Ok((PathBuf::from(k), PathBuf::from(i))),
        _ => Err(format!("scripts/build-linux-guest.sh printed {text:?}")),
    }
}

macro_rules! guest_or_skip {
    () => {
        match guest() {
            Ok(g) => g,
            Err(why) => {
                println!("SKIPPED: {why}");
                return;
            }
        }
    };
}

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ax-migrate-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(d.join("src")).unwrap();
    std::fs::create_dir_all(d.join("dst")).unwrap();
    d
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

fn qemu_img(args: &[&str]) -> std::process::Output {
    std::process::Command::new("qemu-img")
        .args(args)
        .output()
        .unwrap()
}

fn console(files: &RunFiles) -> String {
    std::fs::read_to_string(files.console()).unwrap_or_default()
}

/// Waits until the console satisfies `pred` (bounded).
async fn wait_console(files: &RunFiles, what: &str, secs: u64, pred: impl Fn(&str) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let c = console(files);
        if pred(&c) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not within {secs} s; console:\n{}",
            tail(&c, 30)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn tail(s: &str, n: usize) -> String {
    let v: Vec<&str> = s.lines().collect();
    v[v.len().saturating_sub(n)..].join("\n")
}

/// The `count N` values in order.
fn counts(text: &str) -> Vec<u64> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("count "))
        .filter_map(|n| n.trim().parse().ok())
        .collect()
}

fn last_count(text: &str) -> Option<u64> {
    counts(text).last().copied()
}

/// Checks that the counter runs without a gap across the two consoles (a line may be split by the
/// switch: the serial port's state moves with the guest), and returns (last on the source, first on the
/// destination).
fn assert_continuous(src: &str, dst: &str) -> (u64, u64) {
    let all = counts(&format!("{src}{dst}"));
    for w in all.windows(2) {
        assert_eq!(
            w[1],
            w[0] + 1,
            "the counter jumped from {} to {}; source tail:\n{}\ndestination head:\n{}",
            w[0],
            w[1],
            tail(src, 10),
            dst.lines().take(10).collect::<Vec<_>>().join("\n")
        );
    }
    let src_last = last_count(src).expect("counts on the source");
    let dst_counts = counts(dst);
    let dst_first = *dst_counts.first().expect("counts on the destination");
    (src_last, dst_first)
}

struct Vm {
    qemu: Qemu,
    qmp: Qmp,
    files: RunFiles,
}

impl Drop for Vm {
    /// QEMU runs in its own session: a failed test must not leave it running.
    fn drop(&mut self) {
        if Path::new(&format!("/proc/{}", self.qemu.pid)).exists() {
            // SAFETY: kill takes a pid and a signal; the Qemu's pidfd keeps the pid from being reused.
            unsafe {
                libc::kill(self.qemu.pid as libc::pid_t, libc::SIGKILL);
            }
        }
    }
}

async fn boot(d: &QemuDef, name: &str, dir: &Path) -> Vm {
    let files = RunFiles {
        dir: dir.to_path_buf(),
    };
    let (qemu, qmp, _events) = Qemu::launch(d, name, MEM_MIB, 1, &files, QMP_TIMEOUT)
        .await
        .expect("launch the source");
    wait_console(&files, "the guest's disk writer", 120, |c| {
        c.contains("ax-guest: up") && c.matches("disk-write seq=").count() >= 3
    })
    .await;
    Vm { qemu, qmp, files }
}

async fn destination(d: &QemuDef, dir: &Path) -> Vm {
    let files = RunFiles {
        dir: dir.to_path_buf(),
    };
    let (qemu, qmp, _events) = Qemu::launch_with(
        d,
        "mig-dst",
        MEM_MIB,
        1,
        &files,
        QMP_TIMEOUT,
        &LaunchOptions { incoming: true },
    )
    .await
    .expect("launch the destination");
    Vm { qemu, qmp, files }
}

async fn status(qmp: &Qmp) -> String {
    qmp.run(&QueryStatus).await.unwrap().status
}

async fn quit(vm: &mut Vm) {
    let _ = vm.qmp.run(&Quit).await;
    let _ = tokio::time::timeout(Duration::from_secs(10), vm.qemu.ended()).await;
    vm.qemu.kill().await;
}

/// A CA and two host certificates made like `ax-agent certs` makes them (rcgen, ECDSA P-256; the host
/// certificates: SAN = the host name, key usage digitalSignature (critical), EKU serverAuth + clientAuth),
/// written as `ca.pem`, `<host>.pem`, `<host>-key.pem`.
fn ax_certs(dir: &Path, hosts: &[&str]) {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };
    std::fs::create_dir_all(dir).unwrap();
    let ca_key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name.push(DnType::CommonName, "ax test CA");
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca = p.self_signed(&ca_key).unwrap();
    std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
    let issuer = Issuer::from_ca_cert_pem(&ca.pem(), ca_key).unwrap();
    for h in hosts {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(vec![h.to_string()]).unwrap();
        p.distinguished_name.push(DnType::CommonName, *h);
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let cert = p.signed_by(&key, &issuer).unwrap();
        std::fs::write(dir.join(format!("{h}.pem")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{h}-key.pem")), key.serialize_pem()).unwrap();
    }
}

/// Migrates a booted guest with its disk, checks the counter, the disk copy, and a reboot from it.
async fn migrate_and_check(name: &str, tls: bool) {
    let (kernel, initrd) = guest_or_skip!();
    let dir = tmpdir(name);
    let src_disk = dir.join("src/disk.qcow2");
    let dst_disk = dir.join("dst/disk.qcow2");
    let o = qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        src_disk.to_str().unwrap(),
        "64M",
    ]);
    assert!(o.status.success(), "{o:?}");
    let src_def = def(&kernel, &initrd, &src_disk);
    let dst_def = def(&kernel, &initrd, &dst_disk);
    let mut src = boot(&src_def, "mig-src", &dir.join("src")).await;

    let disks = migrate::source_disks(&src.qmp, &src_def).await.unwrap();
    assert_eq!(disks.len(), 1);
    assert_eq!(disks[0].virtual_size, 64 << 20);
    migrate::create_disk_images(&disks, &dst_def).unwrap();
    let mut dst = destination(&dst_def, &dir.join("dst")).await;
    assert_eq!(status(&dst.qmp).await, "inmigrate");

    let (src_tls, dst_tls) = if tls {
        ax_certs(&dir.join("pki"), &["host-a", "host-b"]);
        (
            Some(TlsFiles::from_ax_certs(
                &dir.join("pki"),
                "host-a",
                &dir.join("src/tls"),
            )),
            Some(TlsFiles::from_ax_certs(
                &dir.join("pki"),
                "host-b",
                &dir.join("dst/tls"),
            )),
        )
    } else {
        (None, None)
    };
    let opts = MigrateOptions {
        // Both copies stay stopped after the switch, so the disks can be compared as they were then.
        start_destination: false,
        tls_hostname: tls.then(|| "host-b".to_string()),
        timeout: Some(Duration::from_secs(300)),
        ..MigrateOptions::default()
    };
    let mut phases = Vec::new();
    let mut last = Progress::default();
    let mut on_progress = |p: &Progress| {
        if phases.last() != p.phase.as_ref() {
            phases.push(p.phase.unwrap());
        }
        last = p.clone();
    };
    let report = migrate::migrate(
        Source {
            qmp: &src.qmp,
            events: None,
            tls: src_tls,
        },
        Destination {
            qemu: &mut dst.qemu,
            qmp: &dst.qmp,
            listen: Listen {
                host: "127.0.0.1".into(),
                migrate_port: 0,
                nbd_port: 0,
            },
            tls: dst_tls,
        },
        &disks,
        &opts,
        &mut on_progress,
    )
    .await
    .expect("the migration");
    println!("{name}: {report:?}");
    println!("{name}: phases {phases:?}, last progress {last:?}");
    assert_eq!(phases, vec![Phase::Disks, Phase::Ram, Phase::Switchover]);
    assert!(report.tls == tls);
    assert!(report.total_ms > 0 && report.downtime_ms > 0, "{report:?}");
    assert!(report.disk_bytes >= 64 << 20, "{report:?}");
    assert!(report.ram_transferred > 0, "{report:?}");
    assert_eq!(status(&src.qmp).await, "postmigrate");
    assert_eq!(status(&dst.qmp).await, "paused");

    // Both stopped: the copy is identical to the source as it was at the switch.
    let o = qemu_img(&[
        "compare",
        "-U",
        src_disk.to_str().unwrap(),
        dst_disk.to_str().unwrap(),
    ]);
    assert!(
        o.status.success(),
        "qemu-img compare: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    println!(
        "{name}: qemu-img compare: {}",
        String::from_utf8_lossy(&o.stdout).trim()
    );

    // The source is quit by the caller; the guest goes on at the destination.
    quit(&mut src).await;
    dst.qmp.run(&ax_qemu::qmp::Cont).await.unwrap();
    assert_eq!(status(&dst.qmp).await, "running");
    wait_console(&dst.files, "counting on the destination", 60, |c| {
        counts(c).len() >= 10 && c.matches("disk-write seq=").count() >= 3
    })
    .await;
    let dst_console = console(&dst.files);
    assert!(
        !dst_console.contains("FAILED"),
        "destination console:\n{dst_console}"
    );
    let (src_last, dst_first) = assert_continuous(&console(&src.files), &dst_console);
    println!("{name}: counter: source's last {src_last}, destination's first {dst_first}");
    assert!(dst_first <= src_last + 1);
    quit(&mut dst).await;

    // A reboot from the copied disk: the guest's own check of every block passes.
    let reboot_dir = dir.join("reboot");
    std::fs::create_dir_all(&reboot_dir).unwrap();
    let mut again = boot(&dst_def, "mig-reboot", &reboot_dir).await;
    let c = console(&again.files);
    let check = c
        .lines()
        .find(|l| l.starts_with("disk-check"))
        .unwrap_or("")
        .to_string();
    println!("{name}: reboot from the copy: {check}");
    assert!(check.starts_with("disk-check ok"), "console:\n{c}");
    assert!(!check.contains("maxseq=-1"), "{check}");
    quit(&mut again).await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn linux_guest_migrates_with_its_disk() {
    let _g = SERIAL.lock().await;
    migrate_and_check("plain", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn linux_guest_migrates_over_tls() {
    let _g = SERIAL.lock().await;
    migrate_and_check("tls", true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destination_killed_mid_migration_leaves_the_source_running() {
    let _g = SERIAL.lock().await;
    let (kernel, initrd) = guest_or_skip!();
    let dir = tmpdir("kill");
    let src_disk = dir.join("src/disk.qcow2");
    let dst_disk = dir.join("dst/disk.qcow2");
    let o = qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        src_disk.to_str().unwrap(),
        "64M",
    ]);
    assert!(o.status.success(), "{o:?}");
    let src_def = def(&kernel, &initrd, &src_disk);
    let dst_def = def(&kernel, &initrd, &dst_disk);
    let mut src = boot(&src_def, "mig-src", &dir.join("src")).await;
    let disks = migrate::source_disks(&src.qmp, &src_def).await.unwrap();
    migrate::create_disk_images(&disks, &dst_def).unwrap();
    let mut dst = destination(&dst_def, &dir.join("dst")).await;
    let dst_pid = dst.qemu.pid;
    let opts = MigrateOptions {
        // Slow enough that the RAM phase lasts seconds: the destination dies in the middle of it.
        max_bandwidth: Some(4 << 20),
        ..MigrateOptions::default()
    };
    let mut killed_at = None;
    let mut on_progress = |p: &Progress| {
        if killed_at.is_none() && p.phase == Some(Phase::Ram) && p.ram_transferred > 8 << 20 {
            // SAFETY: kill takes a pid and a signal; the destination QEMU is our child, not reaped yet.
            unsafe {
                libc::kill(dst_pid as libc::pid_t, libc::SIGKILL);
            }
            killed_at = Some(p.clone());
        }
    };
    let err = migrate::migrate(
        Source {
            qmp: &src.qmp,
            events: None,
            tls: None,
        },
        Destination {
            qemu: &mut dst.qemu,
            qmp: &dst.qmp,
            listen: Listen {
                host: "127.0.0.1".into(),
                migrate_port: 0,
                nbd_port: 0,
            },
            tls: None,
        },
        &disks,
        &opts,
        &mut on_progress,
    )
    .await
    .expect_err("the destination was killed");
    println!("killed at {killed_at:?}");
    println!("error: {err}");
    assert!(killed_at.is_some(), "never reached the RAM phase");
    assert!(!err.after_switch());
    assert!(
        matches!(err, MigrateError::DestinationGone { .. }),
        "the error names the destination's end: {err}"
    );
    assert!(err.to_string().contains("signal 9"), "{err}");
    // The source runs on, its mirrors and NBD nodes gone, and the counter goes on.
    assert_eq!(status(&src.qmp).await, "running");
    let jobs = src.qmp.execute("query-jobs", serde_json::Value::Null).await;
    assert_eq!(jobs.unwrap(), serde_json::json!([]));
    let before = last_count(&console(&src.files)).unwrap();
    wait_console(&src.files, "the source counting on", 30, |c| {
        last_count(c).is_some_and(|n| n >= before + 10)
    })
    .await;
    let c = console(&src.files);
    let all = counts(&c);
    assert!(all.windows(2).all(|w| w[1] == w[0] + 1), "{}", tail(&c, 20));
    assert!(!c.contains("FAILED"), "{}", tail(&c, 20));
    quit(&mut src).await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_foreign_ca_is_refused() {
    let _g = SERIAL.lock().await;
    let (kernel, initrd) = guest_or_skip!();
    let dir = tmpdir("foreign-ca");
    let src_disk = dir.join("src/disk.qcow2");
    let dst_disk = dir.join("dst/disk.qcow2");
    let o = qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        src_disk.to_str().unwrap(),
        "64M",
    ]);
    assert!(o.status.success(), "{o:?}");
    let src_def = def(&kernel, &initrd, &src_disk);
    let dst_def = def(&kernel, &initrd, &dst_disk);
    let mut src = boot(&src_def, "mig-src", &dir.join("src")).await;
    let disks = migrate::source_disks(&src.qmp, &src_def).await.unwrap();
    migrate::create_disk_images(&disks, &dst_def).unwrap();
    let mut dst = destination(&dst_def, &dir.join("dst")).await;
    // Two clusters: the destination's certificate is signed by another CA.
    ax_certs(&dir.join("pki-a"), &["host-a"]);
    ax_certs(&dir.join("pki-b"), &["host-b"]);
    let opts = MigrateOptions {
        tls_hostname: Some("host-b".into()),
        ..MigrateOptions::default()
    };
    let err = migrate::migrate(
        Source {
            qmp: &src.qmp,
            events: None,
            tls: Some(TlsFiles::from_ax_certs(
                &dir.join("pki-a"),
                "host-a",
                &dir.join("src/tls"),
            )),
        },
        Destination {
            qemu: &mut dst.qemu,
            qmp: &dst.qmp,
            listen: Listen {
                host: "127.0.0.1".into(),
                migrate_port: 0,
                nbd_port: 0,
            },
            tls: Some(TlsFiles::from_ax_certs(
                &dir.join("pki-b"),
                "host-b",
                &dir.join("dst/tls"),
            )),
        },
        &disks,
        &opts,
        &mut |_| {},
    )
    .await
    .expect_err("a certificate of another CA");
    println!("error: {err}");
    assert!(err.to_string().contains("NBD export disk0"), "{err}");
    assert!(
        err.to_string().to_lowercase().contains("certificate")
            || err.to_string().to_lowercase().contains("tls"),
        "{err}"
    );
    assert_eq!(status(&src.qmp).await, "running");
    // The destination QEMU was killed.
    let ended = tokio::time::timeout(Duration::from_secs(5), dst.qemu.ended()).await;
    assert!(ended.is_ok(), "the destination QEMU still runs");
    let before = last_count(&console(&src.files)).unwrap();
    wait_console(&src.files, "the source counting on", 30, |c| {
        last_count(c).is_some_and(|n| n >= before + 5)
    })
    .await;
    quit(&mut src).await;
    let _ = std::fs::remove_dir_all(&dir);
}
