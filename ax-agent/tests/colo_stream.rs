//! A UDP stream out of a COLO-protected QEMU VM across a failover: the `qudp` guest (e1000, one
//! sequence-numbered datagram every 10 ms) runs on host-a, protected by `ax-agent colo-node` to host-b;
//! its NIC is on the lab's LAN (`ax_tests::lan`: a `br0` on each host, one switch, a client), so its
//! datagrams reach the client only once host-a's `colo-compare` released them. host-a's node and QEMU
//! are SIGKILLed; host-b wins the next generation, takes the VM over (its NIC now sends to its own tap;
//! `announce-self` moves the MAC: the LAN switch then forwards the VM's MAC to host-b, checked) and the
//! stream goes on from there.
//!
//! What the client checks, and why:
//! - **No repeat** (asserted). A datagram leaves the primary only when colo-compare
//!   released it: either the secondary produced the same datagram (so the secondary's state is already
//!   past it), or at a checkpoint, after the secondary acknowledged loading the primary's state (which
//!   is past it too). The secondary never rolls back behind a checkpoint, so after the take-over it can
//!   only send datagrams the client has not had.
//! - **Reordering** is reported, not asserted: QEMU 7.2's colo-compare takes the oldest held primary
//!   packet, and if the secondary's copy has not arrived puts it back at the newest end of the queue, so
//!   datagrams whose copies were late leave after newer ones (seen here: 13–43 of ~100 datagrams while
//!   in COLO arrive up to 14 places late, runs of them in reverse order).
//! - **At most one gap, at the failover** (asserted; its size is printed, not asserted). Between the
//!   primary's last release and the take-over, the secondary's copies of the datagrams its guest sends
//!   go to its redirector toward the dead primary's compare: they were the only copies left, and they
//!   are lost. The secondary's node stops its VM as soon as its relay toward the primary's compare
//!   breaks (a killed process's sockets close at once), so for this process kill the gap is 0–1
//!   datagram (a secondary ahead of its primary); for a host death without FIN it would be about
//!   (detection + decision + take-over time) × the stream's rate. A datagram
//!   protocol sees a loss; TCP retransmits it (its sender's state moved over with the VM). Closing the
//!   gap would need the secondary's output held and replayed after the take-over, minus what the
//!   primary released: that is not knowable on the secondary (the released set died with the primary's
//!   compare), so replaying would trade the gap for repeats. See docs/qemu.md.
//!
//! Skipped (`SKIPPED: …`) without root and network namespaces, /dev/kvm, `qemu-img`, or a QEMU whose
//! COLO works (`ax_qemu::colo::probe`).

use std::time::Duration;

const AGENT: &str = env!("CARGO_BIN_EXE_ax-agent");
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
    let run = ax_tests::colo::stream_failover(AGENT.as_ref(), &dir, RATE, WAIT).unwrap();
    let (p, r, before) = (&run.protected, &run.report, run.before);
    println!("in COLO: {p}");
    println!("stream: {r}");
    let gap = r.gaps.first().map(|g| g.missing()).unwrap_or(0);
    println!(
        "failover: primary killed after seq {before}; first new datagram {} at {:.0} ms; gap {gap} datagrams ({:.0} ms of stream)",
        run.first,
        run.rto.as_secs_f64() * 1e3,
        gap as f64 * 1e3 / f64::from(RATE)
    );
    assert_eq!(p.gap_count, 0, "gap before the failover: {p}");
    assert_eq!(r.repeats, 0, "a datagram arrived twice: {r}");
    assert!(r.gap_count <= 1, "more than one gap: {r}");
    if let Some(g) = r.gaps.first() {
        assert!(
            g.after >= before,
            "the gap is not at the failover (last datagram before the kill: {before}): {r}"
        );
    }
    assert_eq!((r.malformed, r.dropped), (0, 0), "{r}");
    assert_eq!(
        run.mac_at.as_deref(),
        Some("host-b"),
        "the LAN does not deliver the VM's MAC to host-b"
    );
}
