//! FT for a QEMU VM through QEMU's COLO, driven by `ax-agent colo-node` on simulated hosts (network
//! namespaces host-a, host-b and the witness): host-a boots the VM (a multiboot guest without an OS,
//! under KVM, counting on its serial port, one raw disk) and protects it to host-b; host-a's node and
//! QEMU are SIGKILLed; host-b's detector declares it dead, host-b wins the next generation at the
//! witness, takes the VM over and the guest counts on there from the last checkpoint; host-a comes
//! back as a standby and does not run the VM. (Re-protection of a VM that took over as secondary is
//! not built yet: see docs/qemu.md.)
//!
//! Skipped (`SKIPPED: …`) without root, network namespaces, /dev/kvm, `as`/`ld`/`qemu-img`, or a QEMU
//! whose COLO works (`ax_qemu::colo::probe`: QEMU 7.2 here; 10.0/10.1 are refused).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ax_qemu::def::{Accel, Disk, QemuDef};
use ax_tests::agent;
use ax_tests::netns::{HostChild, Lab, LabBuilder};

const AGENT: &str = env!("CARGO_BIN_EXE_ax-agent");
const LINK_PORT: u16 = 7600;
const HB_PORT: u16 = 7001;
const WAIT: Duration = Duration::from_secs(60);

async fn skip_reason() -> Option<String> {
    if let Err(e) = ax_tests::netns::check_available() {
        return Some(format!("network namespaces: {e}"));
    }
    if let Err(e) = ax_qemu::def::kvm_usable() {
        return Some(format!("/dev/kvm {e}"));
    }
    for (b, a) in [
        ("as", "--version"),
        ("ld", "--version"),
        ("qemu-img", "--version"),
    ] {
        let ok = std::process::Command::new(b)
            .arg(a)
            .output()
            .is_ok_and(|o| o.status.success());
        if !ok {
            return Some(format!("{b} not installed"));
        }
    }
    match ax_qemu::colo::probe("qemu-system-x86_64").await {
        Ok(_) => None,
        Err(e) => Some(e.to_string()),
    }
}

struct Hosts {
    lab: Lab,
    dir: PathBuf,
    guest: PathBuf,
}

impl Hosts {
    fn state(&self, host: &str) -> PathBuf {
        self.dir.join(format!("state-{host}"))
    }

    fn console(&self, host: &str) -> PathBuf {
        ax_agent::colo_node::run_dir(&self.state(host), "vm1").join("console.log")
    }

    fn log(&self, host: &str) -> PathBuf {
        self.dir.join(format!("{host}.log"))
    }

    fn node(&self, host: &str, boot: bool) -> HostChild {
        let state = self.state(host);
        std::fs::create_dir_all(&state).unwrap();
        let disk = state.join("disk.raw");
        if boot {
            let out = std::process::Command::new("qemu-img")
                .args(["create", "-q", "-f", "raw"])
                .arg(&disk)
                .arg("16M")
                .output()
                .unwrap();
            assert!(out.status.success());
        }
        let def = QemuDef {
            kernel: Some(self.guest.clone()),
            disks: vec![Disk { path: disk }],
            accel: Accel::Kvm,
            colo: true,
            ..QemuDef::default()
        };
        let def_file = state.join("def.json");
        std::fs::write(&def_file, serde_json::to_vec(&def).unwrap()).unwrap();
        let me = self.lab.addr(host, "repl").unwrap();
        let hb = self.lab.addr(host, "hb").unwrap();
        let other = if host == "host-a" { "host-b" } else { "host-a" };
        let mut args: Vec<String> = vec![
            "colo-node".into(),
            "--host".into(),
            host.into(),
            "--pki".into(),
            self.dir.join("pki").display().to_string(),
            "--def".into(),
            def_file.display().to_string(),
            "--link".into(),
            format!("{me}:{LINK_PORT}"),
            "--hb".into(),
            format!("{hb}:{HB_PORT}"),
            "--witness".into(),
            format!(
                "{}:{}",
                self.lab.addr("witness", "hb").unwrap(),
                agent::WITNESS_PORT
            ),
            "--state-dir".into(),
            state.display().to_string(),
            "--peer".into(),
            format!(
                "{other}={}:{LINK_PORT},{}:{HB_PORT}",
                self.lab.addr(other, "repl").unwrap(),
                self.lab.addr(other, "hb").unwrap()
            ),
        ];
        if boot {
            args.push("--boot".into());
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log(host))
            .unwrap();
        self.lab
            .spawn_with(host, AGENT, |c| {
                c.args(&args)
                    .env("RUST_LOG", "info")
                    .stdout(log.try_clone().unwrap())
                    .stderr(log);
            })
            .unwrap()
    }

    fn counts(&self, host: &str) -> Vec<u64> {
        std::fs::read_to_string(self.console(host))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().strip_prefix("count "))
            .filter_map(|n| n.trim().parse().ok())
            .collect()
    }

    fn last(&self, host: &str) -> u64 {
        self.counts(host).last().copied().unwrap_or(0)
    }

    /// Waits until `host`'s log has had `needle` `times` times.
    fn wait_log(&self, host: &str, needle: &str, times: usize) {
        let end = Instant::now() + WAIT;
        loop {
            let text = std::fs::read_to_string(self.log(host)).unwrap_or_default();
            if text.matches(needle).count() >= times {
                return;
            }
            assert!(
                Instant::now() < end,
                "{host}: no {needle:?} within {WAIT:?}; its log:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills the QEMU recorded in `host`'s run directory.
    fn kill_qemu(&self, host: &str) {
        let run = ax_qemu::def::RunFiles {
            dir: ax_agent::colo_node::run_dir(&self.state(host), "vm1"),
        };
        ax_qemu::process::kill_recorded(&run, Duration::from_secs(5));
    }
}

/// A multiboot guest without an OS: counts forever, printing `count N` on COM1 (assembled here).
const GUEST: &str = r#"
    .text
    .align 4
    .long 0x1BADB002
    .long 0x00000000
    .long -(0x1BADB002)
    .globl _start
_start:
    mov $0x300000, %esp
    xor %ebx, %ebx
next:
    inc %ebx
    mov $0x3f8, %dx
    mov $'c', %al
    outb %al, %dx
    mov $'o', %al
    outb %al, %dx
    mov $'u', %al
    outb %al, %dx
    mov $'n', %al
    outb %al, %dx
    mov $'t', %al
    outb %al, %dx
    mov $' ', %al
    outb %al, %dx
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
    mov $200000, %ecx
spin:
    loop spin
    jmp next
"#;

fn build_guest(dir: &Path) -> PathBuf {
    let (src, obj, elf) = (
        dir.join("guest.s"),
        dir.join("guest.o"),
        dir.join("guest.elf"),
    );
    std::fs::write(&src, GUEST).unwrap();
    let ok = |c: &mut std::process::Command| assert!(c.status().unwrap().success(), "{c:?}");
    ok(std::process::Command::new("as")
        .arg("--32")
        .arg("-o")
        .arg(&obj)
        .arg(&src));
    ok(std::process::Command::new("ld")
        .args(["-m", "elf_i386", "-Ttext=0x100000", "-e", "_start", "-o"])
        .arg(&elf)
        .arg(&obj));
    elf
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_secondary_takes_over_a_killed_primary() {
    if let Some(why) = skip_reason().await {
        println!("SKIPPED: {why}");
        return;
    }
    tokio::task::spawn_blocking(scenario).await.unwrap();
}

fn scenario() {
    let dir = std::env::temp_dir().join(format!("ax-colo-netns-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let pki = std::process::Command::new(AGENT)
        .args(["certs", "--out"])
        .arg(dir.join("pki"))
        .args(["host-a", "host-b", "witness"])
        .status()
        .unwrap();
    assert!(pki.success());
    let lab = LabBuilder::ax().build().unwrap();
    let guest = build_guest(&dir);
    let h = Hosts { lab, dir, guest };
    let wargs = agent::witness_args(
        &h.lab,
        &h.dir.join("witness.json"),
        &h.dir.join("pki"),
        true,
    )
    .unwrap();
    let _witness = h
        .lab
        .spawn_with("witness", AGENT, |c| {
            c.args(&wargs);
        })
        .unwrap();

    let mut a = h.node("host-a", true);
    let _b = h.node("host-b", false);
    h.wait_log("host-a", "protection complete: in COLO", 1);
    h.wait_log("host-b", "in COLO: the replica is restorable", 1);
    let t = Instant::now();
    while h.last("host-a") < 3 && t.elapsed() < WAIT {
        std::thread::sleep(Duration::from_millis(50));
    }

    // host-a dies: its node and its QEMU.
    let before = h.last("host-a");
    let _ = a.kill();
    let _ = a.wait();
    h.kill_qemu("host-a");
    let killed = Instant::now();
    h.wait_log("host-b", "took the VM over", 1);
    let took = killed.elapsed();
    let end = Instant::now() + WAIT;
    while h.last("host-b") <= before + 2 && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(50));
    }
    let after = h.last("host-b");
    println!(
        "host-a killed at count {before}; host-b took the VM over in {:.0} ms and counts on: {after}",
        took.as_secs_f64() * 1e3
    );
    assert!(
        after > before + 2,
        "the guest does not count on host-b: {after} after {before}"
    );

    // host-a comes back as a standby; the VM runs on at host-b (generation 2).
    // Re-protection from a QEMU that took over as secondary is not built yet (its disk graph keeps the
    // secondary's replication chain; see docs/qemu.md), so host-b stays solo.
    let _a2 = h.node("host-a", false);
    let c = h.last("host-b");
    let end = Instant::now() + WAIT;
    while h.last("host-b") <= c && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(h.last("host-b") > c, "the VM does not run on host-b");
    h.kill_qemu("host-a");
    h.kill_qemu("host-b");
    let _ = std::fs::remove_dir_all(&h.dir);
}
