//! A UDP stream out of a COLO-protected QEMU VM across a failover: the `qudp` guest (e1000, one
//! sequence-numbered datagram every 10 ms) runs on host-a, protected by `ax-agent colo-node` to host-b;
//! its NIC is on the lab's LAN (`ax_tests::lan`: a `br0` on each host, one switch, a client), so its
//! datagrams reach the client only once host-a's `colo-compare` released them. host-a's node and QEMU
//! are SIGKILLed; host-b wins the next generation, takes the VM over (its NIC now sends to its own tap;
//! `announce-self` moves the MAC) and the stream goes on from there.
//!
//! What the client checks, and why:
//! - **No repeat** (asserted). A datagram leaves the primary only when colo-compare
//!   released it: either the secondary produced the same datagram (so the secondary's state is already
//!   past it), or at a checkpoint, after the secondary acknowledged loading the primary's state (which
//!   is past it too). The secondary never rolls back behind a checkpoint, so after the take-over it can
//!   only send datagrams the client has not had.
//! - **Reordering** is reported, not asserted: QEMU 7.2's colo-compare releases a datagram whose
//!   secondary copy has arrived before an earlier one still waiting for its copy (seen here: about one
//!   datagram in ten arrives one or two places late while in COLO).
//! - **At most one gap, at the failover** (asserted; its size is printed, not asserted). Between the
//!   primary's last release and the take-over, the secondary's copies of the datagrams its guest sends
//!   go to its redirector toward the dead primary's compare: they were the only copies left, and they
//!   are lost. The gap is about (detection + decision + take-over time) × the stream's rate. A datagram
//!   protocol sees a loss; TCP retransmits it (its sender's state moved over with the VM). Closing the
//!   gap would need the secondary's output held and replayed after the take-over, minus what the
//!   primary released: that is not knowable on the secondary (the released set died with the primary's
//!   compare), so replaying would trade the gap for repeats. See docs/qemu.md.
//!
//! Skipped (`SKIPPED: …`) without root and network namespaces, /dev/kvm, `qemu-img`, or a QEMU whose
//! COLO works (`ax_qemu::colo::probe`).

use std::time::{Duration, Instant};

use ax_tests::colo::{lan_vm, ColoLab, CLIENT};
use ax_tests::lan::Lan;
use ax_tests::stream::Receiver;

const AGENT: &str = env!("CARGO_BIN_EXE_ax-agent");
const PORT: u16 = 5555;
/// Datagrams per second.
const RATE: u32 = 100;
const WAIT: Duration = Duration::from_secs(90);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_stream_across_a_failover_has_no_repeat_and_at_most_one_gap() {
    if let Some(why) = ax_tests::colo::unavailable().await {
        println!("SKIPPED: {why}");
        return;
    }
    tokio::task::spawn_blocking(scenario).await.unwrap();
}

fn scenario() {
    let dir = std::env::temp_dir().join(format!("ax-colo-stream-{}", std::process::id()));
    let h = ColoLab::start(AGENT.as_ref(), &dir).unwrap();
    let rx = Receiver::start(&h.lab, CLIENT, PORT).unwrap();
    let kernel = dir.join("qudp.elf");
    ax_guests::qemu::write_image(ax_guests::qemu::QUDP, &kernel).unwrap();
    let def = lan_vm(&kernel, &Lan::qudp_append(PORT, RATE, 100));

    let a = h.node("host-a", &def, true, &[]).unwrap();
    let _b = h.node("host-b", &def, false, &[]).unwrap();
    h.wait_log("host-a", "protection complete: in COLO", 1, WAIT)
        .unwrap();
    h.wait_log("host-b", "in COLO: the replica is restorable", 1, WAIT)
        .unwrap();
    // A second of the stream through colo-compare.
    let in_colo = rx.max_seq().unwrap_or(0);
    let got = rx.wait_above(in_colo + u64::from(RATE), WAIT);
    assert!(
        got.is_some(),
        "the stream does not pass colo-compare: {}",
        rx.report()
    );
    let protected = rx.report();
    println!("in COLO from seq {in_colo}: {protected}");

    // host-a dies: its node and its QEMU.
    h.kill_host("host-a", a);
    let killed = Instant::now();
    let before = rx.max_seq().unwrap_or(0);
    h.wait_log("host-b", "took the VM over", 1, WAIT).unwrap();
    let first = rx.wait_above(before, WAIT);
    let Some(first) = first else {
        panic!(
            "no new datagram after the failover (last before: {before}): {}",
            rx.report()
        );
    };
    let rto = first.at.saturating_duration_since(killed);
    // Another second on host-b.
    assert!(
        rx.wait_above(first.seq + u64::from(RATE), WAIT).is_some(),
        "the stream does not go on from host-b: {}",
        rx.report()
    );
    let r = rx.finish();
    println!("stream: {r}");
    let gap = r.gaps.first().map(|g| g.missing()).unwrap_or(0);
    println!(
        "failover: primary killed after seq {before}; first new datagram {} at {:.0} ms; gap {gap} datagrams ({:.0} ms of stream)",
        first.seq,
        rto.as_secs_f64() * 1e3,
        gap as f64 * 1e3 / f64::from(RATE)
    );

    assert_eq!(
        protected.gap_count, 0,
        "gap before the failover: {protected}"
    );
    assert_eq!(r.repeats, 0, "a datagram arrived twice: {r}");
    assert!(r.gap_count <= 1, "more than one gap: {r}");
    if let Some(g) = r.gaps.first() {
        assert!(
            g.after >= before,
            "the gap is not at the failover (last datagram before the kill: {before}): {r}"
        );
    }
    assert_eq!((r.malformed, r.dropped), (0, 0), "{r}");
    drop(h);
    let _ = std::fs::remove_dir_all(&dir);
}
