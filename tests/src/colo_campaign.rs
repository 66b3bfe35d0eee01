//! `fault-campaign --engine qemu`: random faults against a COLO-protected QEMU VM
//! (`ax-agent colo-node` on host-a and host-b, [`crate::colo::ColoLab`]), the `qudp` guest streaming
//! sequence-numbered datagrams to the client's [`Receiver`] through colo-compare.
//!
//! Faults ([`KINDS`], drawn with a seeded generator, printed for replay): `kill-primary` (SIGKILL of
//! the primary's node and QEMU), `kill-secondary` (the same on the secondary), `cut-replication` (the
//! primary's replication network down 1–2 s: COLO's channels and the session), `stop-primary`
//! (SIGSTOP of the primary's node and QEMU for 1–2.5 s, past the heartbeat timeout), `kill-witness`
//! (SIGKILL, restarted 1–3 s later on its state file). After each fault the campaign lets the pair
//! settle, finds the host the VM runs on (the LAN switch's entry for the VM's MAC, once the stream goes
//! on), restarts dead or fenced nodes as standbys, and — if the pair was broken — waits for the
//! secondary to be in COLO again (re-protection) before the next fault. Every wait is bounded: a VM
//! that does not come back, or a pair not re-protected within [`REPROTECT`], ends the campaign with the
//! reason (the faults not injected are reported).
//!
//! Judged at the client: lost = sequence numbers missing, duplicated = repeats (two QEMUs running the
//! VM unpaired would send the same numbers twice); split brain = the switch's entry for the VM's MAC
//! moving between the hosts after the pair settled (both QEMUs sending), or repeats. The failover time
//! per fault is the longest silence of the stream from the fault's start until it settled.
//!
//! Limitation: a pair only (host-c takes no part: a colo-node re-protects to its peer).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use rand::{RngExt, SeedableRng};

use crate::colo::{lan_vm, ColoLab, CLIENT, VM};
use crate::faults;
use crate::lan::Lan;
use crate::netns::HostChild;
use crate::stream::{Arrival, Receiver};

/// The fault kinds that make sense for a COLO pair.
pub const KINDS: [&str; 5] = [
    "kill-primary",
    "kill-secondary",
    "cut-replication",
    "stop-primary",
    "kill-witness",
];
/// Bound on the pair being in COLO again after a fault that broke it.
pub const REPROTECT: Duration = Duration::from_secs(90);
/// Bound on the stream going on after a fault.
const RESUME: Duration = Duration::from_secs(30);
/// Time a fault's effects are given before the pair is inspected.
const SETTLE: Duration = Duration::from_secs(3);
const RATE: u32 = 100;
const PORT: u16 = 5555;
const HOSTS: [&str; 2] = ["host-a", "host-b"];
const IN_COLO: &str = "in COLO: the replica is restorable";

/// What a campaign is asked to do.
#[derive(Debug, Clone)]
pub struct Options {
    /// Faults to inject.
    pub faults: usize,
    /// The generator's seed.
    pub seed: u64,
    /// Inject only these kinds, in turn.
    pub only: Vec<String>,
}

/// The verdict.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    /// Faults injected.
    pub faults: usize,
    /// Datagrams missing at the client.
    pub lost: u64,
    /// Datagrams received more than once.
    pub duplicated: u64,
    /// Settled states with both hosts sending the VM's frames.
    pub split_brain: u64,
    /// The longest silence of the stream around one fault.
    pub max_failover_ms: u64,
    /// Why the campaign stopped early (e.g. no re-protection), if it did.
    pub stopped: Option<String>,
}

impl Summary {
    /// The campaign's last line.
    pub fn line(&self) -> String {
        format!(
            "faults={} lost={} duplicated={} split_brain={} max_failover_ms={}",
            self.faults, self.lost, self.duplicated, self.split_brain, self.max_failover_ms
        )
    }
}

struct Pair {
    h: ColoLab,
    nodes: BTreeMap<&'static str, HostChild>,
    def: ax_qemu::def::QemuDef,
}

impl Pair {
    fn count(&self, host: &str, needle: &str) -> usize {
        std::fs::read_to_string(self.h.log(host))
            .unwrap_or_default()
            .matches(needle)
            .count()
    }

    fn kill(&mut self, host: &str) {
        if let Some(n) = self.nodes.remove(host) {
            self.h.kill_host(host, n);
        }
    }

    /// Restarts `host`'s node as a standby if it is not running (killed, or exited after a fence).
    fn revive(&mut self, host: &'static str) -> Result<(), String> {
        let running = match self.nodes.get_mut(host) {
            Some(n) => n.try_wait().map(|s| s.is_none()).unwrap_or(false),
            None => false,
        };
        if !running {
            self.nodes.remove(host);
            // A node that exited may have left its QEMU behind (fenced: already killed).
            self.h.kill_qemu(host);
            println!("  {host}: node restarted as a standby");
            let n = self.h.node(host, &self.def, false, &[])?;
            self.nodes.insert(host, n);
        }
        Ok(())
    }

    fn pid(&self, host: &str) -> Option<u32> {
        self.nodes.get(host).map(|n| n.id())
    }

    fn qemu_pid(&self, host: &str) -> Option<u32> {
        ax_qemu::process::alive(&self.h.run_files(host).pid())
    }

    /// The host the switch forwards the VM's MAC to, sampled `n` times over `n × 100 ms`: the
    /// distinct answers.
    fn mac_hosts(&self, n: usize) -> Vec<String> {
        let mac = ax_qemu::def::default_mac(VM, 0);
        let mut seen: Vec<String> = Vec::new();
        for _ in 0..n {
            if let Ok(Some(h)) = self.h.lan.host_of_mac(&self.h.lab, &mac) {
                if !seen.contains(&h) {
                    seen.push(h);
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        seen
    }
}

fn other(host: &str) -> &'static str {
    if host == "host-a" {
        "host-b"
    } else {
        "host-a"
    }
}

/// The longest silence of `arrivals` between `from` and `to` (from `from` to the first arrival too).
fn longest_silence(arrivals: &[Arrival], from: Instant, to: Instant) -> Duration {
    let mut last = from;
    let mut worst = Duration::ZERO;
    let mut at: Vec<Instant> = arrivals
        .iter()
        .map(|a| a.at)
        .filter(|t| *t >= from && *t <= to)
        .collect();
    at.sort();
    for t in at {
        worst = worst.max(t.saturating_duration_since(last));
        last = t;
    }
    worst.max(to.saturating_duration_since(last))
}

/// Runs the campaign under `dir` with `agent` the `ax-agent` binary.
pub fn run(agent: &Path, dir: &Path, opts: &Options) -> Result<Summary, String> {
    let h = ColoLab::start(agent, dir)?;
    let rx = Receiver::start(&h.lab, CLIENT, PORT).map_err(|e| e.to_string())?;
    let kernel = dir.join("qudp.elf");
    ax_guests::qemu::write_image(ax_guests::qemu::QUDP, &kernel)
        .map_err(|e| format!("{}: {e}", kernel.display()))?;
    let def = lan_vm(&kernel, &Lan::qudp_append(PORT, RATE, 100));
    let mut p = Pair {
        h,
        nodes: BTreeMap::new(),
        def,
    };
    let a = p.h.node("host-a", &p.def, true, &[])?;
    p.nodes.insert("host-a", a);
    let b = p.h.node("host-b", &p.def, false, &[])?;
    p.nodes.insert("host-b", b);
    p.h.wait_log("host-b", IN_COLO, 1, REPROTECT)?;
    let start = rx.max_seq().unwrap_or(0);
    rx.wait_above(start + u64::from(RATE), RESUME)
        .ok_or_else(|| format!("the stream does not pass colo-compare: {}", rx.report()))?;
    println!("host-a protected to host-b; stream {}", rx.report());

    let mut rng = rand::rngs::StdRng::seed_from_u64(opts.seed);
    let mut sum = Summary::default();
    let mut primary: &'static str = "host-a";
    for i in 0..opts.faults {
        let kind = match opts.only.len() {
            0 => KINDS[rng.random_range(0..KINDS.len())],
            n => KINDS
                .iter()
                .copied()
                .find(|k| *k == opts.only[i % n])
                .ok_or_else(|| format!("unknown kind {:?}", opts.only[i % n]))?,
        };
        let secondary = other(primary);
        let in_colo_before: BTreeMap<&str, usize> =
            HOSTS.iter().map(|h| (*h, p.count(h, IN_COLO))).collect();
        let ended_before = p.count(secondary, "COLO session ended");
        let t0 = Instant::now();
        let at_seq = rx.max_seq().unwrap_or(0);
        let mut broke = false;
        match kind {
            "kill-primary" => {
                p.kill(primary);
                broke = true;
            }
            "kill-secondary" => {
                p.kill(secondary);
                broke = true;
            }
            "cut-replication" => {
                let d = Duration::from_millis(rng.random_range(1000..2000));
                faults::cut_link_for(&p.h.lab, primary, "repl", d).map_err(|e| e.to_string())?;
            }
            "stop-primary" => {
                let d = Duration::from_millis(rng.random_range(1000..2500));
                let node = p.pid(primary).map(faults::stop).transpose();
                let qemu = p.qemu_pid(primary).map(faults::stop).transpose();
                std::thread::sleep(d);
                for s in [qemu, node] {
                    if let Ok(Some(s)) = s {
                        let _ = s.resume();
                    }
                }
            }
            _ => {
                let d = Duration::from_millis(rng.random_range(1000..3000));
                p.h.kill_witness();
                std::thread::sleep(d);
                p.h.start_witness(false)?;
            }
        }
        println!(
            "fault {}/{}: {kind} (primary {primary}, stream at seq {at_seq})",
            i + 1,
            opts.faults
        );
        sum.faults += 1;
        std::thread::sleep(SETTLE);
        // The stream goes on from somewhere.
        let now = rx.max_seq().unwrap_or(0);
        if rx.wait_above(now, RESUME).is_none() {
            sum.stopped = Some(format!(
                "after fault {} ({kind}) the stream did not go on within {RESUME:?}",
                i + 1
            ));
            break;
        }
        let seen = p.mac_hosts(5);
        if seen.len() > 1 {
            println!("  SPLIT BRAIN: the VM's MAC seen behind {seen:?}");
            sum.split_brain += 1;
        }
        let now_at = seen.first().cloned().unwrap_or_else(|| primary.to_string());
        let new_primary = HOSTS
            .iter()
            .copied()
            .find(|h| *h == now_at)
            .unwrap_or(primary);
        if new_primary != primary {
            broke = true;
        }
        if p.count(secondary, "COLO session ended") > ended_before {
            broke = true;
        }
        let silence = longest_silence(&rx.arrivals(), t0, Instant::now());
        sum.max_failover_ms = sum.max_failover_ms.max(silence.as_millis() as u64);
        println!(
            "  the VM runs on {new_primary}; longest silence {} ms",
            silence.as_millis()
        );
        primary = new_primary;
        let sec = other(primary);
        p.revive(primary)?;
        p.revive(sec)?;
        if broke {
            let t = Instant::now();
            let want = in_colo_before[sec] + 1;
            if let Err(e) = p.h.wait_log(sec, IN_COLO, want, REPROTECT) {
                // The log's last lines, shortened (QEMU's command lines are long).
                let lines: Vec<&str> = e.lines().collect();
                let tail: Vec<String> = lines[lines.len().saturating_sub(6)..]
                    .iter()
                    .map(|l| l.chars().take(200).collect())
                    .collect();
                sum.stopped = Some(format!(
                    "after fault {} ({kind}) {primary} was not re-protected to {sec} within {REPROTECT:?}; {sec}'s log ends:\n{}",
                    i + 1,
                    tail.join("\n")
                ));
                break;
            }
            println!(
                "  re-protected to {sec} after {} ms",
                t.elapsed().as_millis()
            );
        }
    }
    // A last second of stream, then the verdict.
    std::thread::sleep(Duration::from_secs(1));
    let report = rx.finish();
    println!("stream: {report}");
    sum.lost = report.missing;
    sum.duplicated = report.repeats;
    if report.repeats > 0 {
        sum.split_brain = sum.split_brain.max(1);
    }
    drop(p);
    Ok(sum)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn silence_counts_the_edges() {
        let t = Instant::now();
        let a = |ms: u64| Arrival {
            at: t + Duration::from_millis(ms),
            seq: ms,
        };
        let arr = [a(10), a(20), a(200), a(210)];
        let s = longest_silence(&arr, t, t + Duration::from_millis(220));
        assert_eq!(s, Duration::from_millis(180));
        let s = longest_silence(&arr, t, t + Duration::from_millis(600));
        assert_eq!(s, Duration::from_millis(390));
    }
}
