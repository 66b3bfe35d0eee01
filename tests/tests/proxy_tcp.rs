//! The TCP fault proxy on loopback: pass-through, corrupt, drop, duplicate, delay, blackhole stall,
//! severing, connect errors, stop on drop.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use ax_tests::proxy::{Direction, Faults, ProxyConfig, TcpProxy};
use common::loopback0;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::time::{timeout, Instant};

fn pattern(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[1])
        .collect()
}

/// An upstream that echoes every connection.
async fn echo_server() -> SocketAddr {
    let l = TcpListener::bind(loopback0()).await.expect("bind");
    let a = l.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            tokio::spawn(async move {
                let (mut r, mut w) = s.into_split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    a
}

/// An upstream that reads one connection to EOF and reports the bytes.
async fn sink_server() -> (SocketAddr, oneshot::Receiver<Vec<u8>>) {
    let l = TcpListener::bind(loopback0()).await.expect("bind");
    let a = l.local_addr().expect("addr");
    let (tx, rx) = oneshot::channel();
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.expect("accept");
        let mut v = Vec::new();
        let _ = s.read_to_end(&mut v).await;
        let _ = tx.send(v);
    });
    (a, rx)
}

fn start(up: SocketAddr, cfg: impl FnOnce(ProxyConfig) -> ProxyConfig) -> TcpProxy {
    TcpProxy::start(cfg(ProxyConfig::new(loopback0(), up))).expect("start proxy")
}

/// Writes `data` through the proxy to a sink and returns what the sink got.
async fn through_sink(f: Faults, data: &[u8]) -> (Vec<u8>, TcpProxy) {
    let (up, got) = sink_server().await;
    let p = start(up, |c| c.seed(11).faults_dir(Direction::ToUpstream, f));
    let mut c = TcpStream::connect(p.local_addr()).await.expect("connect");
    c.write_all(data).await.expect("write");
    c.shutdown().await.expect("shutdown");
    let got = timeout(Duration::from_secs(20), got)
        .await
        .expect("sink finishes")
        .expect("sink result");
    (got, p)
}

#[tokio::test]
async fn passes_a_byte_stream_both_ways() {
    let up = echo_server().await;
    let p = start(up, |c| c);
    let data = pattern(1 << 20);
    let c = TcpStream::connect(p.local_addr()).await.expect("connect");
    let (mut r, mut w) = c.into_split();
    let to_send = data.clone();
    let writer = tokio::spawn(async move {
        w.write_all(&to_send).await.expect("write");
        w.shutdown().await.expect("shutdown");
    });
    let mut back = Vec::new();
    timeout(Duration::from_secs(20), r.read_to_end(&mut back))
        .await
        .expect("echo finishes")
        .expect("read");
    writer.await.expect("writer");
    assert!(back == data, "echoed stream differs");
    let st = p.stats();
    assert_eq!(st.to_upstream.forwarded_bytes, 1 << 20);
    assert_eq!(st.to_client.forwarded_bytes, 1 << 20);
    assert_eq!(st.sessions, 1);
}

#[tokio::test]
async fn corrupt_changes_bytes_but_not_length() {
    let data = pattern(256 * 1024);
    let (got, p) = through_sink(Faults::none().with_corrupt(1.0), &data).await;
    assert_eq!(got.len(), data.len());
    assert!(got != data, "corrupt=1.0 delivered the stream intact");
    let flipped: u32 = got
        .iter()
        .zip(&data)
        .map(|(a, b)| (a ^ b).count_ones())
        .sum();
    let st = p.stats().to_upstream;
    assert_eq!(st.corrupted_packets, st.received_packets);
    // 1–3 bits per chunk.
    assert!(flipped as u64 >= st.corrupted_packets && flipped as u64 <= 3 * st.corrupted_packets);
}

#[tokio::test]
async fn drop_and_duplicate_change_the_length() {
    let data = pattern(64 * 1024);
    let (got, p) = through_sink(Faults::none().with_drop(1.0), &data).await;
    assert!(got.is_empty(), "drop=1.0 delivered {} bytes", got.len());
    assert_eq!(p.stats().to_upstream.dropped_bytes, data.len() as u64);

    let (got, p) = through_sink(Faults::none().with_duplicate(1.0), &data).await;
    assert_eq!(got.len(), 2 * data.len());
    let st = p.stats().to_upstream;
    assert_eq!(st.duplicated_packets, st.received_packets);
    assert_eq!(st.forwarded_bytes, 2 * data.len() as u64);
}

#[tokio::test]
async fn delay_holds_bytes_back_and_jitter_never_reorders() {
    let up = echo_server().await;
    let delay = Duration::from_millis(200);
    let p = start(up, |c| {
        c.faults_dir(Direction::ToUpstream, Faults::none().with_delay(delay))
    });
    let mut c = TcpStream::connect(p.local_addr()).await.expect("connect");
    let t0 = Instant::now();
    c.write_all(b"ping").await.expect("write");
    let mut buf = [0u8; 4];
    timeout(Duration::from_secs(5), c.read_exact(&mut buf))
        .await
        .expect("echo")
        .expect("read");
    assert_eq!(&buf, b"ping");
    assert!(t0.elapsed() >= delay, "echo after {:?}", t0.elapsed());

    // Many small writes with jitter arrive complete and in order.
    p.set_faults(
        Faults::none()
            .with_delay(Duration::from_millis(5))
            .with_jitter(Duration::from_millis(30)),
    )
    .expect("set");
    let (mut r, mut w) = c.into_split();
    let data = pattern(200 * 97);
    let chunks: Vec<Vec<u8>> = data.chunks(97).map(|c| c.to_vec()).collect();
    let writer = tokio::spawn(async move {
        for ch in chunks {
            w.write_all(&ch).await.expect("write");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        w.shutdown().await.expect("shutdown");
    });
    let mut back = Vec::new();
    timeout(Duration::from_secs(30), r.read_to_end(&mut back))
        .await
        .expect("finishes")
        .expect("read");
    writer.await.expect("writer");
    assert!(back == data, "jittered stream reordered or damaged");
}

#[tokio::test]
async fn blackhole_stalls_the_stream_until_lifted() {
    let up = echo_server().await;
    let p = start(up, |c| c);
    let mut c = TcpStream::connect(p.local_addr()).await.expect("connect");
    c.write_all(b"one").await.expect("write");
    let mut buf = [0u8; 3];
    c.read_exact(&mut buf).await.expect("read");
    assert_eq!(&buf, b"one");

    p.set_blackhole(true);
    c.write_all(b"two").await.expect("write is buffered");
    assert!(
        timeout(Duration::from_millis(400), c.read_exact(&mut buf))
            .await
            .is_err(),
        "data crossed a blackhole"
    );
    p.set_blackhole(false);
    timeout(Duration::from_secs(5), c.read_exact(&mut buf))
        .await
        .expect("released after the blackhole")
        .expect("read");
    assert_eq!(&buf, b"two", "stalled bytes must arrive intact");
}

#[tokio::test]
async fn sever_closes_open_connections_only() {
    let up = echo_server().await;
    let p = start(up, |c| c);
    let mut c = TcpStream::connect(p.local_addr()).await.expect("connect");
    c.write_all(b"x").await.expect("write");
    let mut b = [0u8; 1];
    c.read_exact(&mut b).await.expect("read");

    p.sever_connections();
    let mut rest = Vec::new();
    let r = timeout(Duration::from_secs(5), c.read_to_end(&mut rest))
        .await
        .expect("connection closed by sever");
    assert!(r.is_err() || rest.is_empty(), "{r:?} {rest:?}");

    let mut c2 = TcpStream::connect(p.local_addr()).await.expect("reconnect");
    c2.write_all(b"y").await.expect("write");
    timeout(Duration::from_secs(5), c2.read_exact(&mut b))
        .await
        .expect("new connection works")
        .expect("read");
    assert_eq!(&b, b"y");
    assert_eq!(p.stats().sessions, 2);
}

#[tokio::test]
async fn upstream_refusal_is_counted_and_closes_the_client() {
    // A port nobody listens on.
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let dead = l.local_addr().expect("addr");
    drop(l);
    let p = start(dead, |c| c);
    let mut c = TcpStream::connect(p.local_addr()).await.expect("connect");
    let mut v = Vec::new();
    let r = timeout(Duration::from_secs(5), c.read_to_end(&mut v))
        .await
        .expect("client closed");
    assert!(r.is_err() || v.is_empty());
    assert_eq!(p.stats().connect_errors, 1);
}

#[tokio::test]
async fn stops_on_drop() {
    let up = echo_server().await;
    let p = start(up, |c| c);
    let addr = p.local_addr();
    let mut c = TcpStream::connect(addr).await.expect("connect");
    p.stop();
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "still accepting after stop"
    );
    // Open connections are closed too.
    let mut v = Vec::new();
    let r = timeout(Duration::from_secs(5), c.read_to_end(&mut v))
        .await
        .expect("closed");
    assert!(r.is_err() || v.is_empty());
}
