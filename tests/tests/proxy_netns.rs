//! The fault proxies running inside a lab host's namespace.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::Duration;

use ax_tests::netns::Lab;
use ax_tests::proxy::{Faults, ProxyConfig, ProxyError, TcpProxy, UdpProxy};
use common::{drain, host_udp};

const SEC: Duration = Duration::from_secs(1);

fn recv_token(s: &UdpSocket, token: &[u8]) -> Option<SocketAddr> {
    let mut buf = [0u8; 256];
    let deadline = std::time::Instant::now() + 3 * SEC;
    while std::time::Instant::now() < deadline {
        if let Ok((n, from)) = s.recv_from(&mut buf) {
            if &buf[..n] == token {
                return Some(from);
            }
        }
    }
    None
}

#[test]
fn udp_proxy_in_a_host_relays_between_hosts() {
    if !ax_tests::require_netns("udp_proxy_in_a_host_relays_between_hosts") {
        return;
    }
    let lab = Lab::ax().expect("lab");
    // host-a -> proxy on host-b (repl) -> host-c.
    let c = host_udp(&lab, "host-c", "repl");
    let a = host_udp(&lab, "host-a", "repl");
    let b_addr = lab.addr("host-b", "repl").expect("addr");
    let p = UdpProxy::start(
        ProxyConfig::new(
            SocketAddr::new(b_addr.into(), 0),
            c.local_addr().expect("addr"),
        )
        .netns(lab.netns_path("host-b").expect("path")),
    )
    .expect("start proxy in host-b");
    assert_eq!(p.local_addr().ip(), std::net::IpAddr::from(b_addr));

    let mut from = None;
    for i in 0..30 {
        // The first datagrams may wait for ARP; retry a few times.
        let tok = format!("hello-{i}");
        a.send_to(tok.as_bytes(), p.local_addr()).expect("send");
        if let Some(f) = recv_token(&c, tok.as_bytes()) {
            from = Some(f);
            break;
        }
    }
    let from = from.expect("host-c received through the proxy");
    assert_eq!(
        from.ip(),
        std::net::IpAddr::from(b_addr),
        "source is host-b"
    );
    c.send_to(b"reply", from).expect("reply");
    assert!(
        recv_token(&a, b"reply").is_some(),
        "reply relayed to host-a"
    );

    p.set_faults(Faults::none().with_drop(1.0)).expect("set");
    drain(&c);
    for _ in 0..5 {
        a.send_to(b"lost", p.local_addr()).expect("send");
    }
    std::thread::sleep(Duration::from_millis(300));
    assert!(recv_token(&c, b"lost").is_none(), "drop=1.0 delivered");
    assert_eq!(p.stats().to_upstream.dropped_packets, 5);
}

#[test]
fn tcp_proxy_in_a_host_passes_and_corrupts_streams() {
    if !ax_tests::require_netns("tcp_proxy_in_a_host_passes_and_corrupts_streams") {
        return;
    }
    let lab = Lab::ax().expect("lab");
    // host-a -> proxy on host-b (hb) -> witness.
    let w_addr = lab.addr("witness", "hb").expect("addr");
    let listener = lab
        .in_host("witness", move || TcpListener::bind((w_addr, 0)))
        .expect("ns")
        .expect("listen");
    let upstream = listener.local_addr().expect("addr");
    let sink = std::thread::spawn(move || {
        let mut got = Vec::new();
        for _ in 0..2 {
            let (mut s, _) = listener.accept().expect("accept");
            let mut v = Vec::new();
            s.read_to_end(&mut v).expect("read");
            got.push(v);
        }
        got
    });
    let b_addr = lab.addr("host-b", "hb").expect("addr");
    let p = TcpProxy::start(
        ProxyConfig::new(SocketAddr::new(b_addr.into(), 0), upstream)
            .netns(lab.netns_path("host-b").expect("path")),
    )
    .expect("start proxy in host-b");
    let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let send = |data: Vec<u8>| {
        let dest = p.local_addr();
        let mut s = lab
            .in_host("host-a", move || TcpStream::connect(dest))
            .expect("ns")
            .expect("connect");
        s.write_all(&data).expect("write");
        s.shutdown(std::net::Shutdown::Write).expect("shutdown");
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
    };
    send(data.clone());
    p.set_faults(Faults::none().with_corrupt(1.0)).expect("set");
    send(data.clone());
    let got = sink.join().expect("sink");
    assert!(got[0] == data, "clean stream damaged");
    assert_eq!(got[1].len(), data.len());
    assert!(got[1] != data, "corrupt=1.0 left the stream intact");
}

#[test]
fn proxy_on_a_hosts_loopback_is_not_the_root_loopback() {
    if !ax_tests::require_netns("proxy_on_a_hosts_loopback_is_not_the_root_loopback") {
        return;
    }
    let lab = Lab::ax().expect("lab");
    let up = lab
        .in_host("host-a", || UdpSocket::bind("127.0.0.1:0"))
        .expect("ns")
        .expect("bind");
    up.set_read_timeout(Some(Duration::from_millis(100)))
        .expect("timeout");
    let p = UdpProxy::start(
        ProxyConfig::new(
            "127.0.0.1:0".parse().expect("addr"),
            up.local_addr().expect("addr"),
        )
        .netns(lab.netns_path("host-a").expect("path")),
    )
    .expect("start");
    let client = lab
        .in_host("host-a", || UdpSocket::bind("127.0.0.1:0"))
        .expect("ns")
        .expect("bind");
    client.send_to(b"local", p.local_addr()).expect("send");
    assert!(recv_token(&up, b"local").is_some());
    // The proxy's port is free on the root namespace's loopback: its socket lives in host-a.
    UdpSocket::bind(p.local_addr()).expect("port is free in the root namespace");
}

#[test]
fn proxy_reports_a_missing_namespace() {
    let e = UdpProxy::start(
        ProxyConfig::new(
            "127.0.0.1:0".parse().expect("addr"),
            "127.0.0.1:9".parse().expect("addr"),
        )
        .netns("/run/netns/ax-no-such-namespace"),
    )
    .expect_err("no such namespace");
    assert!(matches!(e, ProxyError::Netns { .. }), "{e}");
    assert!(e.to_string().contains("ax-no-such-namespace"), "{e}");
}
