//! The lab's LAN (`ax_tests::lan`) and the stream receiver (`ax_tests::stream`): each VM host's `br0`
//! reaches the client on layer 2 (a sender on host-a's bridge, then one on host-b's, continue one
//! sequence-numbered stream), the client has its fixed address and MAC, and the receiver reports the
//! stream whole.

use std::net::UdpSocket;
use std::time::Duration;

use ax_tests::lan::{Lan, CLIENT_IP, CLIENT_MAC};
use ax_tests::netns::LabBuilder;
use ax_tests::stream::Receiver;

const PORT: u16 = 5555;

#[test]
fn both_vm_hosts_reach_the_client_on_the_lan() {
    if !ax_tests::require_netns("both_vm_hosts_reach_the_client_on_the_lan") {
        return;
    }
    let lab = LabBuilder::ax().host("client", &[]).build().unwrap();
    Lan::build(&lab, &["host-a", "host-b"], "client").unwrap();
    let link = lab.exec("client", "ip", &["link", "show", "lan"]).unwrap();
    assert!(String::from_utf8_lossy(&link.stdout).contains(CLIENT_MAC));
    let rx = Receiver::start(&lab, "client", PORT).unwrap();
    // A sender on each host's bridge (where a VM's tap would be), 10 datagrams each, one sequence.
    for (i, host) in ["host-a", "host-b"].into_iter().enumerate() {
        let addr = format!("10.77.3.{}/24", 50 + i);
        lab.exec(host, "ip", &["addr", "add", &addr, "dev", "br0"])
            .unwrap();
        let sock = lab
            .in_host(host, || UdpSocket::bind(("0.0.0.0", 0)))
            .unwrap()
            .unwrap();
        let base = 10 * i as u64;
        for seq in base + 1..=base + 10 {
            let mut payload = seq.to_be_bytes().to_vec();
            payload.resize(64, 0);
            sock.send_to(&payload, (CLIENT_IP, PORT)).unwrap();
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(
            rx.wait_above(base + 9, Duration::from_secs(10)).is_some(),
            "{host}: the client did not receive its datagrams: {}",
            rx.report()
        );
    }
    let r = rx.finish();
    assert_eq!((r.received, r.first, r.last), (20, 1, 20), "{r}");
    assert_eq!((r.gap_count, r.repeats, r.reordered), (0, 0, 0), "{r}");
}
