//! FT for a QEMU VM through QEMU's COLO, driven by `ax-agent colo-node` on simulated hosts (network
//! namespaces host-a, host-b and the witness; the guest kit's `qcounter`, a multiboot guest without an
//! OS under KVM counting on its serial port, one raw disk). host-a boots the VM and protects it to
//! host-b, then:
//!
//! - host-a's node and QEMU are SIGKILLed: host-b wins the next generation at the witness, takes the VM
//!   over and the guest counts on; host-a's node restarted without `--boot` does not run the VM (its
//!   generation is stale) and becomes host-b's new secondary (re-protection); host-b killed in turn,
//!   the VM moves back to host-a and counts on;
//! - host-b's node and QEMU are SIGKILLed: host-a goes on alone, and is protected again to host-b
//!   when its node is restarted;
//! - the replication network between the hosts is cut (heartbeats and the witness on the other
//!   network go on): exactly one host runs the VM afterwards, the other's QEMU is killed.
//!
//! Skipped (`SKIPPED: …`) without root, network namespaces, /dev/kvm, `qemu-img`, or a QEMU whose
//! COLO works (`ax_qemu::colo::probe`: QEMU 7.2 here; 10.0/10.1 are refused). One scenario at a time.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use ax_guests::qemu;
use ax_qemu::def::{Accel, Disk, QemuDef, RunFiles};
use ax_tests::agent;
use ax_tests::netns::{HostChild, Lab, LabBuilder};

const AGENT: &str = env!("CARGO_BIN_EXE_ax-agent");
const LINK_PORT: u16 = 7600;
const HB_PORT: u16 = 7001;
const WAIT: Duration = Duration::from_secs(60);

/// One scenario at a time (each runs two QEMUs under KVM).
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

async fn skip_reason() -> Option<String> {
    if let Err(e) = ax_tests::netns::check_available() {
        return Some(format!("network namespaces: {e}"));
    }
    if let Err(e) = ax_qemu::def::kvm_usable() {
        return Some(format!("/dev/kvm {e}"));
    }
    let ok = std::process::Command::new("qemu-img")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        return Some("qemu-img not installed".into());
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
            // ~20 lines/s on this host's nested KVM (qcounter makes ~43 000 iterations/s here).
            append: Some("every=2000".into()),
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

    fn run(&self, host: &str) -> RunFiles {
        RunFiles {
            dir: ax_agent::colo_node::run_dir(&self.state(host), "vm1"),
        }
    }

    /// Kills the QEMU recorded in `host`'s run directory.
    fn kill_qemu(&self, host: &str) {
        ax_qemu::process::kill_recorded(&self.run(host), Duration::from_secs(5));
    }

    /// Whether `host`'s QEMU runs.
    fn qemu_alive(&self, host: &str) -> bool {
        ax_qemu::process::alive(&self.run(host).pid()).is_some()
    }

    /// How often `host`'s log has had `needle`.
    fn log_count(&self, host: &str, needle: &str) -> usize {
        std::fs::read_to_string(self.log(host))
            .unwrap_or_default()
            .matches(needle)
            .count()
    }

    /// Kills `host`: its node (SIGKILL) and its QEMU.
    fn kill_host(&self, node: &mut HostChild, host: &str) {
        let _ = node.kill();
        let _ = node.wait();
        self.kill_qemu(host);
    }

    /// Waits until the guest on `host` counts past `above`; returns the count.
    fn counts_past(&self, host: &str, above: u64, what: &str) -> u64 {
        let end = Instant::now() + WAIT;
        while self.last(host) <= above && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(50));
        }
        let c = self.last(host);
        assert!(
            c > above,
            "{what}: the guest does not count on {host}: {c} after {above}; its log:\n{}",
            std::fs::read_to_string(self.log(host)).unwrap_or_default()
        );
        c
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        self.kill_qemu("host-a");
        self.kill_qemu("host-b");
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The lab, the witness, host-a booting the VM and protecting it to host-b (both in COLO, the guest
/// counting); the nodes are host-a's and host-b's.
fn protected_pair(name: &str) -> (Hosts, HostChild, HostChild, HostChild) {
    let dir = std::env::temp_dir().join(format!("ax-colo-{name}-{}", std::process::id()));
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
    let guest = dir.join("qcounter.elf");
    qemu::write_image(qemu::QCOUNTER, &guest).unwrap();
    let h = Hosts { lab, dir, guest };
    let wargs = agent::witness_args(
        &h.lab,
        &h.dir.join("witness.json"),
        &h.dir.join("pki"),
        true,
    )
    .unwrap();
    let witness = h
        .lab
        .spawn_with("witness", AGENT, |c| {
            c.args(&wargs);
        })
        .unwrap();
    let a = h.node("host-a", true);
    let b = h.node("host-b", false);
    h.wait_log("host-a", "protection complete: in COLO", 1);
    h.wait_log("host-b", "in COLO: the replica is restorable", 1);
    h.counts_past("host-a", 2, "host-a protected");
    (h, witness, a, b)
}

/// Runs `scenario` (blocking) unless the test cannot run here; one at a time.
async fn run(scenario: fn()) {
    if let Some(why) = skip_reason().await {
        println!("SKIPPED: {why}");
        return;
    }
    tokio::task::spawn_blocking(move || {
        let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
        scenario()
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_primary_is_taken_over_then_its_restarted_node_is_the_new_secondary() {
    run(primary_killed).await;
}

fn primary_killed() {
    let (h, _w, mut a, mut b) = protected_pair("pkill");
    // host-a dies: its node and its QEMU.
    let before = h.last("host-a");
    h.kill_host(&mut a, "host-a");
    let killed = Instant::now();
    h.wait_log("host-b", "took the VM over", 1);
    let took = killed.elapsed();
    let after = h.counts_past("host-b", before + 2, "host-b took over");
    println!(
        "host-a killed at count {before}; host-b took the VM over in {:.0} ms and counts on: {after}",
        took.as_secs_f64() * 1e3
    );

    // host-a's node comes back without --boot: it must not run the VM on its own (generation 1 is
    // stale; host-b runs generation 2) and becomes host-b's secondary.
    let _a2 = h.node("host-a", false);
    h.wait_log("host-b", "protection complete: in COLO", 1);
    h.wait_log("host-a", "in COLO: the replica is restorable", 1);
    assert_eq!(
        h.log_count("host-a", "took the VM over"),
        0,
        "host-a ran the VM on its own"
    );
    println!("host-b (the former secondary) is protected again, to host-a");

    // host-b dies in turn: the VM moves back to host-a and counts on.
    let c = h.counts_past("host-b", h.last("host-b"), "host-b protected");
    h.kill_host(&mut b, "host-b");
    h.wait_log("host-a", "took the VM over", 1);
    let back = h.counts_past("host-a", c, "host-a took the VM back");
    println!("host-b killed at count ≥ {c}; host-a took the VM back and counts on: {back}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_secondary_leaves_the_primary_alone_then_is_protected_again() {
    run(secondary_killed).await;
}

fn secondary_killed() {
    let (h, _w, _a, mut b) = protected_pair("skill");
    h.kill_host(&mut b, "host-b");
    h.wait_log("host-a", "running solo", 1);
    let c = h.counts_past("host-a", h.last("host-a"), "host-a solo");
    assert!(h.qemu_alive("host-a"));
    println!("host-b killed; host-a runs solo and counts on: {c}");
    let _b2 = h.node("host-b", false);
    h.wait_log("host-a", "protection complete: in COLO", 2);
    h.wait_log("host-b", "in COLO: the replica is restorable", 2);
    let c2 = h.counts_past("host-a", c, "host-a protected again");
    println!("host-b's node restarted: host-a protected again, counting on: {c2}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_replication_network_leaves_exactly_one_host_running_the_vm() {
    run(link_cut).await;
}

fn link_cut() {
    let (h, _w, _a, _b) = protected_pair("cut");
    // host-b's port on the replication network goes down at the switch: its packets vanish there;
    // heartbeats and the witness are on the other network.
    h.lab.link_down("host-b", "repl").unwrap();
    let cut = Instant::now();
    let end = Instant::now() + WAIT;
    let alive = || [h.qemu_alive("host-a"), h.qemu_alive("host-b")];
    while alive() != [true, false] && alive() != [false, true] && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(100));
    }
    let state = alive();
    let settled = cut.elapsed();
    assert!(
        state == [true, false] || state == [false, true],
        "QEMU alive on [host-a, host-b]: {state:?} {:?} after the cut",
        cut.elapsed()
    );
    let survivor = if state[0] { "host-a" } else { "host-b" };
    let c = h.counts_past(survivor, h.last(survivor), "the survivor");
    // And it stays so.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(alive(), state, "after the cut");
    println!(
        "replication network cut: {survivor} alone runs the VM ({:.1} s after the cut), counting on: {c}",
        settled.as_secs_f64()
    );
}
