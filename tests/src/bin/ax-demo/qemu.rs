//! `ax-demo --engine qemu`: the demo's story with a QEMU VM protected through QEMU's COLO.
//!
//! host-a and host-b run `ax-agent run`; their VMs' bridges (`br0`) and a client share a LAN
//! ([`ax_tests::lan`]). The `qudp` test guest (guest kit, an OS-less multiboot image) is created on
//! host-a as an FT-capable QEMU VM and set to FT through the API; it streams sequence-numbered UDP
//! datagrams to the client, released by COLO's `colo-compare`. Every process of host-a (agent, VM
//! worker, QEMU) is SIGKILLed; host-b takes the VM over (its NIC keeps the MAC: `announce-self` moves
//! it on the LAN); host-a's agent comes back and host-b protects the VM to it again; then host-b is
//! killed and the VM returns to host-a. The client's receiver checks the stream: no datagram twice, and
//! every gap is reported (a gap is possible at a COLO failover: docs/qemu.md, "Network output across a
//! failover"). `demo: ok` only if nothing repeated and the stream went on after both failovers.

use std::path::Path;
use std::time::{Duration, Instant};

use ax_tests::lan::{Lan, VM_BRIDGE};
use ax_tests::netns::LabBuilder;
use ax_tests::stream::Receiver;

use super::{axctl, fail, protection_line, start_agent, start_coordinator, step, wait_api, Coord};

/// The VM's name.
const VM: &str = "qstream";
/// The client's UDP port.
const PORT: u16 = 5555;
/// Datagrams per second.
const RATE: u32 = 100;

pub(crate) fn run(dir: &Path, agent: &Path, axctl_exe: &Path, coord: Coord) -> i32 {
    step("lab: host-a, host-b, witness, and a client on the VMs' LAN, in network namespaces");
    let lab = LabBuilder::ax()
        .host("client", &[])
        .build()
        .unwrap_or_else(|e| fail(&e.to_string()));
    let _lan = Lan::build(&lab, &["host-a", "host-b"], "client")
        .unwrap_or_else(|e| fail(&format!("the LAN: {e}")));
    for h in ["host-a", "host-b", "witness"] {
        println!(
            "  {h:8} repl {:?}  hb {:?}",
            lab.addr(h, "repl").ok(),
            lab.addr(h, "hb").ok()
        );
    }
    println!(
        "  client   {} on the LAN; host-a and host-b each bridge their VMs onto it ({VM_BRIDGE})",
        ax_tests::lan::CLIENT_IP
    );
    let coordinator = start_coordinator(&lab, dir, agent, coord);
    let start =
        |me: &str, other: &str| start_agent(&lab, dir, agent, me, other, &coordinator.etcd_urls);
    let mut agents = vec![start("host-a", "host-b"), start("host-b", "host-a")];
    for h in ["host-a", "host-b"] {
        wait_api(&lab, dir, h);
    }
    let ax =
        |host: &str, args: &[&str], show: bool| axctl(&lab, dir, axctl_exe, host, host, args, show);
    let show = |host: &str| -> serde_json::Value {
        serde_json::from_str(&ax(host, &["--json", "vm", "show", VM], false)).unwrap_or_default()
    };

    step("the client listens; a QEMU VM (the qudp guest) is created FT-capable on host-a and set to FT");
    let rx = Receiver::start(&lab, "client", PORT)
        .unwrap_or_else(|e| fail(&format!("the client's receiver: {e}")));
    let kernel = dir.join("qudp.img");
    ax_guests::qemu::write_image(ax_guests::qemu::QUDP, &kernel)
        .unwrap_or_else(|e| fail(&format!("{}: {e}", kernel.display())));
    let kernel = kernel.display().to_string();
    let append = Lan::qudp_append(PORT, RATE, 100);
    let nic = format!(
        "{VM_BRIDGE},mac={},model=e1000",
        ax_qemu::def::default_mac(VM, 0)
    );
    ax(
        "host-a",
        &[
            "vm",
            "create",
            VM,
            "--engine",
            "qemu",
            "--kernel",
            &kernel,
            "--append",
            &append,
            "--nic",
            &nic,
            "--ft-capable",
        ],
        true,
    );
    if rx.wait_above(0, Duration::from_secs(30)).is_none() {
        fail(&format!(
            "no datagram from the VM at the client within 30 s (logs in {})",
            dir.display()
        ));
    }
    println!("  the client receives the VM's stream");
    ax("host-a", &["vm", "set-level", VM, "ft", "--wait"], true);
    ax("host-a", &["vm", "list"], true);
    ax("host-b", &["vm", "list"], true);

    step("live stats (the client's receiver, and host-a's API)");
    for _ in 0..4 {
        std::thread::sleep(Duration::from_secs(1));
        let v = show("host-a");
        let r = rx.report();
        println!(
            "  client: {} datagrams (last {}), gaps {}, repeats {}   host-a: {} → {}  level {}",
            r.received,
            r.last,
            r.gap_count,
            r.repeats,
            v["host"].as_str().unwrap_or("-"),
            v["peer"].as_str().unwrap_or("-"),
            v["level"].as_str().unwrap_or("-"),
        );
    }

    // SIGKILLs every process of `victim` (agent, VM worker, QEMU); the time to the first datagram
    // above the last one seen before the kill.
    let kill_host = |victim: &str| -> Duration {
        let pids = lab.pids(victim).unwrap_or_default();
        let before = rx.max_seq().unwrap_or(0);
        let killed = Instant::now();
        for pid in &pids {
            // SAFETY: kill(2) on processes inside the lab's namespace of `victim`.
            unsafe {
                libc::kill(*pid as i32, libc::SIGKILL);
            }
        }
        println!("  killed {} processes: {pids:?}", pids.len());
        let Some(first) = rx.wait_above(before, Duration::from_secs(30)) else {
            fail(&format!(
                "no datagram after {victim} was killed (logs in {})",
                dir.display()
            ));
        };
        let rto = first.at.saturating_duration_since(killed);
        println!(
            "  first new datagram ({}) at the client {:.0} ms after the kill",
            first.seq,
            rto.as_secs_f64() * 1e3
        );
        // Let the survivor stream a while.
        let _ = rx.wait_above(first.seq + u64::from(RATE), Duration::from_secs(10));
        rto
    };
    let fenced = |who: &str| {
        std::fs::read_to_string(dir.join("fence.log"))
            .unwrap_or_default()
            .lines()
            .any(|l| l.ends_with(&format!("fenced {who}")))
    };
    let wait_protected = |survivor: &str, peer: &str| {
        let t = Instant::now();
        let mut last = String::new();
        loop {
            let v = show(survivor);
            let now = protection_line(&v);
            if now != last {
                println!("  {:5.1} s  {now}", t.elapsed().as_secs_f64());
                last = now;
            }
            if v["protected"] == true && v["peer"] == peer && v["level"] == "ft" {
                return t.elapsed();
            }
            if t.elapsed() > Duration::from_secs(120) {
                fail(&format!(
                    "{survivor} did not protect the VM to {peer} again (logs in {})",
                    dir.display()
                ));
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    };

    step("kill every process of host-a (agent, VM worker and QEMU) with SIGKILL");
    let first_failover = kill_host("host-a");
    step("host-b took over");
    ax("host-b", &["vm", "list"], true);
    if !fenced("host-a") {
        fail("host-b took over without running its fence command against host-a");
    }
    println!("  host-b ran its fence command against host-a first ([fence] required = true; here a stand-in that logs the call)");

    step("host-a comes back (its agent restarted): host-b protects the VM to it again, live");
    agents[0] = start("host-a", "host-b");
    wait_api(&lab, dir, "host-a");
    let again = wait_protected("host-b", "host-a");
    println!(
        "  protected again {:.1} s after host-a's agent started",
        again.as_secs_f64()
    );
    ax("host-b", &["events", "--vm", VM], true);
    std::thread::sleep(Duration::from_secs(1));

    step("kill every process of host-b: the VM fails over back to host-a");
    let second_failover = kill_host("host-b");
    ax("host-a", &["vm", "list"], true);
    if !fenced("host-b") {
        fail("host-a took over without running its fence command against host-b");
    }
    let report = rx.finish();
    println!(
        "\nclient: {report}\nfailovers: first new datagram after {:.0} ms (host-a → host-b) and {:.0} ms (host-b → host-a)",
        first_failover.as_secs_f64() * 1e3,
        second_failover.as_secs_f64() * 1e3
    );
    drop(agents);
    if report.repeats != 0 || report.received == 0 {
        println!(
            "demo: FAILED: the client's stream repeated datagrams (logs in {})",
            dir.display()
        );
        return 1;
    }
    0
}
