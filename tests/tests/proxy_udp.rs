//! The UDP fault proxy on loopback: every fault kind, per-direction settings, determinism, stop on drop.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ax_tests::proxy::{Direction, Faults, ProxyConfig, UdpProxy};
use common::loopback0;
use tokio::net::UdpSocket;
use tokio::time::{timeout, Instant};

/// A receiving socket standing for the upstream.
async fn upstream() -> (UdpSocket, SocketAddr) {
    let s = UdpSocket::bind(loopback0()).await.expect("bind upstream");
    let a = s.local_addr().expect("addr");
    (s, a)
}

async fn client() -> UdpSocket {
    UdpSocket::bind(loopback0()).await.expect("bind client")
}

fn start(up: SocketAddr, seed: u64, f: Faults) -> UdpProxy {
    UdpProxy::start(ProxyConfig::new(loopback0(), up).seed(seed).faults(f)).expect("start proxy")
}

/// Receives datagrams until `quiet` passes with nothing new.
async fn recv_all(s: &UdpSocket, quiet: Duration) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 65536];
    while let Ok(Ok((n, _))) = timeout(quiet, s.recv_from(&mut buf)).await {
        out.push(buf[..n].to_vec());
    }
    out
}

/// Receives exactly `n` datagrams (failing after 10 s), then checks nothing more comes within 200 ms.
async fn recv_n(s: &UdpSocket, n: usize) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 65536];
    while out.len() < n {
        let (len, _) = timeout(Duration::from_secs(10), s.recv_from(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("only {} of {n} datagrams arrived", out.len()))
            .expect("recv");
        out.push(buf[..len].to_vec());
    }
    let extra = recv_all(s, Duration::from_millis(200)).await;
    assert!(extra.is_empty(), "{} datagrams more than {n}", extra.len());
    out
}

fn msg(i: u32) -> Vec<u8> {
    format!("datagram-{i:05}").into_bytes()
}

fn id_of(d: &[u8]) -> u32 {
    std::str::from_utf8(d)
        .ok()
        .and_then(|s| s.strip_prefix("datagram-"))
        .and_then(|s| s.parse().ok())
        .unwrap_or(u32::MAX)
}

/// Waits until the proxy has taken in `n` datagrams (it has made every decision then).
async fn wait_received(p: &UdpProxy, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while p.stats().to_upstream.received_packets < n {
        assert!(Instant::now() < deadline, "proxy got only {:?}", p.stats());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn passes_datagrams_both_ways_in_order() {
    let (up, up_addr) = upstream().await;
    let up = Arc::new(up);
    let echo = {
        let up = up.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65536];
            loop {
                let (n, from) = up.recv_from(&mut buf).await.expect("recv");
                up.send_to(&buf[..n], from).await.expect("echo");
            }
        })
    };
    let p = start(up_addr, 1, Faults::none());
    let c = client().await;
    for i in 0..100 {
        c.send_to(&msg(i), p.local_addr()).await.expect("send");
    }
    let got = recv_n(&c, 100).await;
    let ids: Vec<u32> = got.iter().map(|d| id_of(d)).collect();
    assert_eq!(ids, (0..100).collect::<Vec<_>>());
    let st = p.stats();
    assert_eq!(st.to_upstream.forwarded_packets, 100);
    assert_eq!(st.to_client.forwarded_packets, 100);
    assert_eq!(st.to_upstream.forwarded_bytes, 100 * 14);
    assert_eq!(st.sessions, 1);
    // A second client gets its own session and its own replies.
    let c2 = client().await;
    c2.send_to(&msg(7), p.local_addr()).await.expect("send");
    assert_eq!(
        recv_all(&c2, Duration::from_millis(300)).await,
        vec![msg(7)]
    );
    assert_eq!(p.stats().sessions, 2);
    echo.abort();
}

#[tokio::test]
async fn drop_all_delivers_nothing() {
    let (up, up_addr) = upstream().await;
    let p = start(up_addr, 1, Faults::none().with_drop(1.0));
    let c = client().await;
    for i in 0..50 {
        c.send_to(&msg(i), p.local_addr()).await.expect("send");
    }
    wait_received(&p, 50).await;
    assert!(recv_all(&up, Duration::from_millis(300)).await.is_empty());
    let st = p.stats().to_upstream;
    assert_eq!(st.dropped_packets, 50);
    assert_eq!(st.dropped_bytes, 50 * 14);
    assert_eq!(st.forwarded_packets, 0);
}

/// The ids that survive `drop=0.5` with `seed`.
async fn survivors(seed: u64) -> BTreeSet<u32> {
    let (up, up_addr) = upstream().await;
    let p = start(up_addr, seed, Faults::none().with_drop(0.5));
    let c = client().await;
    for i in 0..200 {
        c.send_to(&msg(i), p.local_addr()).await.expect("send");
    }
    wait_received(&p, 200).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while {
        let st = p.stats().to_upstream;
        st.dropped_packets + st.forwarded_packets < 200
    } {
        assert!(Instant::now() < deadline, "{:?}", p.stats());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let forwarded = p.stats().to_upstream.forwarded_packets as usize;
    let got: BTreeSet<u32> = recv_n(&up, forwarded)
        .await
        .iter()
        .map(|d| id_of(d))
        .collect();
    let st = p.stats().to_upstream;
    assert_eq!(st.dropped_packets + st.forwarded_packets, 200);
    assert_eq!(got.len() as u64, st.forwarded_packets);
    got
}

#[tokio::test]
async fn drop_decisions_are_deterministic_from_the_seed() {
    let a = survivors(7).await;
    let b = survivors(7).await;
    let c = survivors(8).await;
    assert_eq!(a, b, "same seed, different drops");
    assert_ne!(a, c, "different seeds, same drops");
    assert!((50..=150).contains(&a.len()), "{} of 200 survived", a.len());
}

#[tokio::test]
async fn duplicate_all_delivers_each_datagram_twice() {
    let (up, up_addr) = upstream().await;
    let p = start(up_addr, 1, Faults::none().with_duplicate(1.0));
    let c = client().await;
    for i in 0..50 {
        c.send_to(&msg(i), p.local_addr()).await.expect("send");
    }
    let got = recv_n(&up, 100).await;
    let mut counts: HashMap<u32, usize> = HashMap::new();
    for d in &got {
        *counts.entry(id_of(d)).or_default() += 1;
    }
    assert_eq!(got.len(), 100);
    assert!((0..50).all(|i| counts.get(&i) == Some(&2)), "{counts:?}");
    // Copies travel back to back.
    for pair in got.chunks(2) {
        assert_eq!(pair[0], pair[1]);
    }
    let st = p.stats().to_upstream;
    assert_eq!(st.duplicated_packets, 50);
    assert_eq!(st.forwarded_packets, 100);
}

#[tokio::test]
async fn corrupt_all_flips_bits_but_keeps_length() {
    let (up, up_addr) = upstream().await;
    let p = start(up_addr, 3, Faults::none().with_corrupt(1.0));
    let c = client().await;
    let sent: Vec<Vec<u8>> = (0..50u8).map(|i| vec![i; 64]).collect();
    for d in &sent {
        c.send_to(d, p.local_addr()).await.expect("send");
    }
    let got = recv_n(&up, 50).await;
    // No delay: order is kept, so the i-th arrival is the i-th datagram.
    for (s, g) in sent.iter().zip(&got) {
        assert_eq!(s.len(), g.len());
        let flipped: u32 = s.iter().zip(g).map(|(a, b)| (a ^ b).count_ones()).sum();
        assert!((1..=3).contains(&flipped), "{flipped} bits flipped");
    }
    assert_eq!(p.stats().to_upstream.corrupted_packets, 50);
}

#[tokio::test]
async fn delay_adds_at_least_the_delay_and_keeps_order() {
    let (up, up_addr) = upstream().await;
    let delay = Duration::from_millis(150);
    let p = start(up_addr, 1, Faults::none().with_delay(delay));
    let c = client().await;
    let mut sent_at = Vec::new();
    for i in 0..20 {
        sent_at.push(Instant::now());
        c.send_to(&msg(i), p.local_addr()).await.expect("send");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut buf = vec![0u8; 256];
    let mut ids = Vec::new();
    for _ in 0..20 {
        let (n, _) = timeout(Duration::from_secs(5), up.recv_from(&mut buf))
            .await
            .expect("arrives")
            .expect("recv");
        let id = id_of(&buf[..n]);
        assert!(
            sent_at[id as usize].elapsed() >= delay,
            "datagram {id} arrived after {:?}",
            sent_at[id as usize].elapsed()
        );
        ids.push(id);
    }
    assert_eq!(ids, (0..20).collect::<Vec<_>>(), "fixed delay reordered");
}

#[tokio::test]
async fn jitter_delivers_everything_no_earlier_than_the_base_delay() {
    let (up, up_addr) = upstream().await;
    let base = Duration::from_millis(50);
    let p = start(
        up_addr,
        5,
        Faults::none()
            .with_delay(base)
            .with_jitter(Duration::from_millis(100)),
    );
    let c = client().await;
    let t0 = Instant::now();
    for i in 0..50 {
        c.send_to(&msg(i), p.local_addr()).await.expect("send");
    }
    let mut buf = vec![0u8; 256];
    let mut ids = BTreeSet::new();
    for _ in 0..50 {
        let (n, _) = timeout(Duration::from_secs(5), up.recv_from(&mut buf))
            .await
            .expect("arrives")
            .expect("recv");
        assert!(t0.elapsed() >= base);
        ids.insert(id_of(&buf[..n]));
    }
    assert_eq!(ids.len(), 50);
}

#[tokio::test]
async fn blackhole_toggles_at_run_time() {
    let (up, up_addr) = upstream().await;
    let p = start(up_addr, 1, Faults::none());
    let c = client().await;
    c.send_to(&msg(1), p.local_addr()).await.expect("send");
    assert_eq!(
        recv_all(&up, Duration::from_millis(300)).await,
        vec![msg(1)]
    );

    p.set_blackhole(true);
    assert!(p.faults(Direction::ToUpstream).blackhole);
    for i in 2..12 {
        c.send_to(&msg(i), p.local_addr()).await.expect("send");
    }
    wait_received(&p, 11).await;
    assert!(recv_all(&up, Duration::from_millis(300)).await.is_empty());
    assert_eq!(p.stats().to_upstream.blackholed_packets, 10);

    p.set_blackhole(false);
    c.send_to(&msg(20), p.local_addr()).await.expect("send");
    assert_eq!(
        recv_all(&up, Duration::from_millis(300)).await,
        vec![msg(20)]
    );

    // set_faults replaces every setting.
    p.set_faults(Faults::none().with_blackhole(true))
        .expect("set");
    c.send_to(&msg(21), p.local_addr()).await.expect("send");
    assert!(recv_all(&up, Duration::from_millis(300)).await.is_empty());
    assert!(p.set_faults(Faults::none().with_drop(2.0)).is_err());
}

#[tokio::test]
async fn directions_have_separate_faults() {
    let (up, up_addr) = upstream().await;
    let p = UdpProxy::start(
        ProxyConfig::new(loopback0(), up_addr)
            .faults_dir(Direction::ToClient, Faults::none().with_drop(1.0)),
    )
    .expect("start");
    let c = client().await;
    let mut buf = vec![0u8; 256];
    for i in 0..10 {
        c.send_to(&msg(i), p.local_addr()).await.expect("send");
        let (n, from) = timeout(Duration::from_secs(5), up.recv_from(&mut buf))
            .await
            .expect("upstream receives")
            .expect("recv");
        assert_eq!(&buf[..n], &msg(i)[..]);
        up.send_to(b"reply", from).await.expect("reply");
    }
    assert!(recv_all(&c, Duration::from_millis(300)).await.is_empty());
    let st = p.stats();
    assert_eq!(st.to_upstream.forwarded_packets, 10);
    assert_eq!(st.to_client.dropped_packets, 10);

    // Lift it for the reply path only.
    p.set_faults_dir(Direction::ToClient, Faults::none())
        .expect("set");
    c.send_to(&msg(99), p.local_addr()).await.expect("send");
    let (_, from) = up.recv_from(&mut buf).await.expect("recv");
    up.send_to(b"reply", from).await.expect("reply");
    assert_eq!(recv_n(&c, 1).await, vec![b"reply".to_vec()]);
}

#[tokio::test]
async fn stops_on_drop_and_frees_the_port() {
    let (_up, up_addr) = upstream().await;
    let p = start(up_addr, 1, Faults::none());
    let addr = p.local_addr();
    drop(p);
    // The listen socket is closed: the same port can be bound again.
    UdpSocket::bind(addr).await.expect("port freed");
}

#[test]
fn start_reports_bind_errors() {
    let taken = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr");
    let e = UdpProxy::start(ProxyConfig::new(addr, addr)).expect_err("port taken");
    assert!(e.to_string().contains(&addr.to_string()), "{e}");
}

#[tokio::test]
async fn timed_proxy_faults_are_recorded_and_undone() {
    let (up, up_addr) = upstream().await;
    let p = start(
        up_addr,
        1,
        Faults::none().with_delay(Duration::from_millis(1)),
    );
    let rec = ax_tests::faults::proxy_faults_for_async(
        &p,
        Faults::none().with_drop(1.0),
        Duration::from_millis(100),
    )
    .await
    .expect("timed faults");
    assert_eq!(rec.kind, ax_tests::faults::FaultKind::Proxy);
    assert_eq!(rec.detail, "drop=1");
    assert!(rec.target.contains(&p.local_addr().to_string()));
    assert!(rec.duration() >= Duration::from_millis(100));
    // The previous settings are back.
    assert_eq!(
        p.faults(Direction::ToUpstream),
        Faults::none().with_delay(Duration::from_millis(1))
    );
    let c = client().await;
    c.send_to(&msg(1), p.local_addr()).await.expect("send");
    assert_eq!(recv_n(&up, 1).await, vec![msg(1)]);
}
