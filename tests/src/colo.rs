//! A COLO pair in a lab: `ax-agent colo-node` on `host-a` and `host-b`, the witness, and a client on the
//! VMs' LAN ([`crate::lan`]). Shared by the COLO stream test, the bench and the demo tools.
//!
//! Each host's node keeps its generation record and QEMU's files under `<dir>/state-<host>`, logs to
//! `<dir>/<host>.log`, and runs the VM from the same [`QemuDef`] except the disk, which is that host's
//! copy (`state-<host>/disk.raw`, created on the host that boots the VM).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use ax_qemu::def::{Accel, Disk, Nic, NicModel, QemuDef, RunFiles};

use crate::agent;
use crate::lan::{Lan, VM_BRIDGE};
use crate::netns::{HostChild, Lab, LabBuilder};
use crate::stream::{Receiver, StreamReport};

/// The nodes' session port (COLO's relays use the ports above it).
pub const LINK_PORT: u16 = 7600;
/// The nodes' heartbeat port.
pub const HB_PORT: u16 = agent::HB_PORT;
/// The VM's name.
pub const VM: &str = "vm1";
/// The client host on the LAN.
pub const CLIENT: &str = "client";

/// Why COLO pairs cannot run here, if they cannot: not root / no namespaces, no usable /dev/kvm, no
/// `qemu-img`, or a QEMU whose COLO does not work (`ax_qemu::colo::probe`).
pub async fn unavailable() -> Option<String> {
    if let Err(e) = crate::netns::check_available() {
        return Some(format!("network namespaces: {e}"));
    }
    if let Err(e) = ax_qemu::def::kvm_usable() {
        return Some(format!("/dev/kvm {e}"));
    }
    let img = Command::new("qemu-img").arg("--version").output();
    if !img.is_ok_and(|o| o.status.success()) {
        return Some("qemu-img not installed".into());
    }
    ax_qemu::colo::probe("qemu-system-x86_64")
        .await
        .err()
        .map(|e| e.to_string())
}

/// A VM that may become FT, for a COLO pair on the lab's LAN: the multiboot `kernel` with `append`,
/// 64 MiB… (the node's defaults), one e1000 NIC on [`VM_BRIDGE`], one 16 MiB raw disk, under KVM.
pub fn lan_vm(kernel: &Path, append: &str) -> QemuDef {
    QemuDef {
        kernel: Some(kernel.to_path_buf()),
        append: Some(append.to_string()),
        disks: vec![Disk {
            path: PathBuf::from("disk.raw"),
        }],
        nics: vec![Nic {
            bridge: VM_BRIDGE.into(),
            mac: None,
            model: NicModel::E1000,
        }],
        accel: Accel::Kvm,
        colo: true,
        ..QemuDef::default()
    }
}

/// The lab, its LAN, the PKI and the witness; torn down on drop (every process in it SIGKILLed).
#[derive(Debug)]
pub struct ColoLab {
    /// The hosts (`host-a`, `host-b`, `host-c`, `witness`, [`CLIENT`]).
    pub lab: Lab,
    /// The VMs' LAN.
    pub lan: Lan,
    /// Working directory (PKI, logs, state directories).
    pub dir: PathBuf,
    agent: PathBuf,
    witness: Option<HostChild>,
}

impl ColoLab {
    /// Builds the lab under a fresh `dir`, with `agent` the `ax-agent` binary.
    pub fn start(agent: &Path, dir: &Path) -> Result<ColoLab, String> {
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let pki = dir.join("pki");
        let ok = Command::new(agent)
            .args(["certs", "--out"])
            .arg(&pki)
            .args(["host-a", "host-b", "witness"])
            .status()
            .map_err(|e| format!("ax-agent certs: {e}"))?;
        if !ok.success() {
            return Err(format!("ax-agent certs: {ok}"));
        }
        let lab = LabBuilder::ax()
            .host(CLIENT, &[])
            .build()
            .map_err(|e| e.to_string())?;
        let lan = Lan::build(&lab, &["host-a", "host-b"], CLIENT).map_err(|e| e.to_string())?;
        let mut h = ColoLab {
            lab,
            lan,
            dir: dir.to_path_buf(),
            agent: agent.to_path_buf(),
            witness: None,
        };
        h.start_witness(true)?;
        Ok(h)
    }

    /// Starts the witness on its state file (`init`: create it); a running one is killed first.
    pub fn start_witness(&mut self, init: bool) -> Result<(), String> {
        self.kill_witness();
        let wargs = agent::witness_args(
            &self.lab,
            &self.dir.join("witness.json"),
            &self.dir.join("pki"),
            init,
        )
        .map_err(|e| e.to_string())?;
        let log = log_file(&self.dir.join("witness.log"))?;
        let witness = self
            .lab
            .spawn_with("witness", &self.agent, |c| {
                c.args(&wargs).stdout(log.try_clone().unwrap()).stderr(log);
            })
            .map_err(|e| e.to_string())?;
        self.witness = Some(witness);
        Ok(())
    }

    /// SIGKILLs the witness, if it runs.
    pub fn kill_witness(&mut self) {
        if let Some(mut w) = self.witness.take() {
            let _ = w.kill();
            let _ = w.wait();
        }
    }

    /// The node's state directory on `host`.
    pub fn state(&self, host: &str) -> PathBuf {
        self.dir.join(format!("state-{host}"))
    }

    /// QEMU's files on `host`.
    pub fn run_files(&self, host: &str) -> RunFiles {
        RunFiles {
            dir: ax_agent::colo_node::run_dir(&self.state(host), VM),
        }
    }

    /// The node's log on `host`.
    pub fn log(&self, host: &str) -> PathBuf {
        self.dir.join(format!("{host}.log"))
    }

    /// Starts `host`'s node for `def` (its disk replaced by this host's copy, created if `boot`), the
    /// other of `host-a`/`host-b` as its peer, with `extra` arguments (e.g. `--epoch-ms`).
    pub fn node(
        &self,
        host: &str,
        def: &QemuDef,
        boot: bool,
        extra: &[&str],
    ) -> Result<HostChild, String> {
        let state = self.state(host);
        std::fs::create_dir_all(&state).map_err(|e| format!("{}: {e}", state.display()))?;
        let disk = state.join("disk.raw");
        if boot {
            let out = Command::new("qemu-img")
                .args(["create", "-q", "-f", "raw"])
                .arg(&disk)
                .arg("16M")
                .output()
                .map_err(|e| format!("qemu-img: {e}"))?;
            if !out.status.success() {
                return Err(format!("qemu-img create: {}", out.status));
            }
        }
        let mut def = def.clone();
        def.disks = vec![Disk { path: disk }];
        let def_file = state.join("def.json");
        let json = serde_json::to_vec(&def).map_err(|e| e.to_string())?;
        std::fs::write(&def_file, json).map_err(|e| format!("{}: {e}", def_file.display()))?;
        let addr = |h: &str, net: &str| self.lab.addr(h, net).map_err(|e| e.to_string());
        let other = if host == "host-a" { "host-b" } else { "host-a" };
        let mut args: Vec<String> = vec![
            "colo-node".into(),
            "--host".into(),
            host.into(),
            "--vm".into(),
            VM.into(),
            "--pki".into(),
            self.dir.join("pki").display().to_string(),
            "--def".into(),
            def_file.display().to_string(),
            "--link".into(),
            format!("{}:{LINK_PORT}", addr(host, "repl")?),
            "--hb".into(),
            format!("{}:{HB_PORT}", addr(host, "hb")?),
            "--witness".into(),
            format!("{}:{}", addr("witness", "hb")?, agent::WITNESS_PORT),
            "--state-dir".into(),
            state.display().to_string(),
            "--peer".into(),
            format!(
                "{other}={}:{LINK_PORT},{}:{HB_PORT}",
                addr(other, "repl")?,
                addr(other, "hb")?
            ),
        ];
        if boot {
            args.push("--boot".into());
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let log = log_file(&self.log(host))?;
        // Through `ip netns exec` (which execs the node): its private mount of /sys shows the host's
        // own interfaces, where QEMU's tap setup looks for the bridge (`/sys/class/net/br0`).
        let ns = self.lab.netns_name(host).map_err(|e| e.to_string())?;
        self.lab
            .spawn_with(host, "ip", |c| {
                c.args(["netns", "exec", ns])
                    .arg(&self.agent)
                    .args(&args)
                    .env("RUST_LOG", "info")
                    .stdout(log.try_clone().unwrap())
                    .stderr(log);
            })
            .map_err(|e| e.to_string())
    }

    /// Waits until `host`'s log has had `needle` at least `times` times, at most `within`.
    pub fn wait_log(
        &self,
        host: &str,
        needle: &str,
        times: usize,
        within: Duration,
    ) -> Result<(), String> {
        let end = Instant::now() + within;
        loop {
            let text = std::fs::read_to_string(self.log(host)).unwrap_or_default();
            if text.matches(needle).count() >= times {
                return Ok(());
            }
            if Instant::now() >= end {
                let tail: Vec<&str> = text.lines().rev().take(30).collect();
                return Err(format!(
                    "{host}: no {needle:?} within {within:?}; its log ends:\n{}",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILLs `host`'s node and then the QEMU it recorded (a host dying).
    pub fn kill_host(&self, host: &str, node: HostChild) {
        let mut node = node;
        let _ = node.kill();
        let _ = node.wait();
        self.kill_qemu(host);
    }

    /// SIGKILLs the QEMU recorded in `host`'s run directory, if any.
    pub fn kill_qemu(&self, host: &str) {
        ax_qemu::process::kill_recorded(&self.run_files(host), Duration::from_secs(5));
    }
}

impl Drop for ColoLab {
    fn drop(&mut self) {
        self.kill_qemu("host-a");
        self.kill_qemu("host-b");
    }
}

fn log_file(path: &Path) -> Result<std::fs::File, String> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// What the client saw of a `qudp` stream across one failover ([`stream_failover`]).
#[derive(Debug, Clone)]
pub struct StreamFailover {
    /// The stream up to the kill (a second of it through colo-compare at least).
    pub protected: StreamReport,
    /// The whole stream, up to a second after the take-over.
    pub report: StreamReport,
    /// The highest sequence number received when the primary was killed.
    pub before: u64,
    /// The first sequence number above it received afterwards.
    pub first: u64,
    /// From the kill to that datagram's arrival at the client.
    pub rto: Duration,
    /// The VM host the LAN switch forwards the VM's MAC to after the take-over.
    pub mac_at: Option<String>,
}

/// One failover of a streaming VM, in a fresh [`ColoLab`] under `dir`: the `qudp` guest (`rate`
/// datagrams/s to the client) boots on host-a, is protected to host-b, streams a second through
/// colo-compare; host-a's node and QEMU are SIGKILLed; host-b takes over; a second more of the stream.
/// Every wait is bounded by `wait`.
pub fn stream_failover(
    agent: &Path,
    dir: &Path,
    rate: u32,
    wait: Duration,
) -> Result<StreamFailover, String> {
    let h = ColoLab::start(agent, dir)?;
    let port = 5555;
    let rx = Receiver::start(&h.lab, CLIENT, port).map_err(|e| e.to_string())?;
    let kernel = dir.join("qudp.elf");
    ax_guests::qemu::write_image(ax_guests::qemu::QUDP, &kernel)
        .map_err(|e| format!("{}: {e}", kernel.display()))?;
    let def = lan_vm(&kernel, &Lan::qudp_append(port, rate, 100));
    let a = h.node("host-a", &def, true, &[])?;
    let _b = h.node("host-b", &def, false, &[])?;
    h.wait_log("host-a", "protection complete: in COLO", 1, wait)?;
    h.wait_log("host-b", "in COLO: the replica is restorable", 1, wait)?;
    let in_colo = rx.max_seq().unwrap_or(0);
    rx.wait_above(in_colo + u64::from(rate), wait)
        .ok_or_else(|| format!("the stream does not pass colo-compare: {}", rx.report()))?;
    let protected = rx.report();

    h.kill_host("host-a", a);
    let killed = Instant::now();
    let before = rx.max_seq().unwrap_or(0);
    h.wait_log("host-b", "took the VM over", 1, wait)?;
    let first = rx.wait_above(before, wait).ok_or_else(|| {
        format!(
            "no new datagram after the failover (last before: {before}): {}",
            rx.report()
        )
    })?;
    rx.wait_above(first.seq + u64::from(rate), wait)
        .ok_or_else(|| format!("the stream does not go on from host-b: {}", rx.report()))?;
    let report = rx.finish();
    let mac = ax_qemu::def::default_mac(VM, 0);
    let mac_at = h.lan.host_of_mac(&h.lab, &mac).map_err(|e| e.to_string())?;
    drop(h);
    let _ = std::fs::remove_dir_all(dir);
    Ok(StreamFailover {
        protected,
        report,
        before,
        first: first.seq,
        rto: first.at.saturating_duration_since(killed),
        mac_at,
    })
}

/// The numbers after `prefix` on the lines of a guest's console (`count N`, `round N`, …), in order.
pub fn console_numbers(console: &Path, prefix: &str) -> Vec<u64> {
    std::fs::read_to_string(console)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().strip_prefix(prefix))
        .filter_map(|n| n.trim().parse().ok())
        .collect()
}
