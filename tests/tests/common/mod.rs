//! Helpers shared by the integration tests (each test binary uses a subset).
#![allow(dead_code)]

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ax_tests::netns::Lab;

/// A UDP socket bound to `host`'s address on `network` (port 0), created inside the host's namespace.
pub fn host_udp(lab: &Lab, host: &str, network: &str) -> UdpSocket {
    let addr = lab.addr(host, network).expect("host address");
    let s = lab
        .in_host(host, move || UdpSocket::bind((addr, 0)))
        .expect("enter host namespace")
        .expect("bind UDP socket in host");
    s.set_read_timeout(Some(Duration::from_millis(100)))
        .expect("set read timeout");
    s
}

/// Sends a fresh token from `from` to `to` every 100 ms until `to` receives one or `within` passes.
pub fn delivers(from: &UdpSocket, to: &UdpSocket, within: Duration) -> bool {
    let dest = to.local_addr().expect("local addr");
    let deadline = Instant::now() + within;
    let mut buf = [0u8; 64];
    // Tokens are unique per call, so a late token of an earlier call never counts.
    static CALL: AtomicU64 = AtomicU64::new(0);
    let call = format!(
        "tok-{}-{}-",
        std::process::id(),
        CALL.fetch_add(1, Ordering::Relaxed)
    );
    let mut n = 0u32;
    while Instant::now() < deadline {
        n += 1;
        let token = format!("{call}{n}");
        // Sends may fail while a link is down (ENETUNREACH, EHOSTUNREACH): that is "not delivered".
        let _ = from.send_to(token.as_bytes(), dest);
        let until = Instant::now() + Duration::from_millis(100);
        while Instant::now() < until {
            match to.recv_from(&mut buf) {
                Ok((len, _)) if buf[..len].starts_with(call.as_bytes()) => return true,
                _ => {}
            }
        }
    }
    false
}

/// Drains whatever is queued on `s` (read timeout must be set).
pub fn drain(s: &UdpSocket) {
    let mut buf = [0u8; 2048];
    while s.recv_from(&mut buf).is_ok() {}
}

/// `true` when a namespace of that name is listed by `ip netns list`.
pub fn ip_netns_list_contains(name: &str) -> bool {
    let out = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("run ip netns list");
    assert!(out.status.success(), "ip netns list failed");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| l.split_whitespace().next() == Some(name))
}

/// Polls `f` every 10 ms until it is true or `within` passes.
pub fn wait_until(within: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The state letter (field 3 of `/proc/<pid>/stat`): `R`, `S`, `T` (stopped), `Z`...
pub fn proc_state(pid: u32) -> Option<char> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 1..];
    rest.split_whitespace().next()?.chars().next()
}

/// Loopback address with port 0.
pub fn loopback0() -> SocketAddr {
    "127.0.0.1:0".parse().expect("loopback")
}
