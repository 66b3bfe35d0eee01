//! The UDP witness server and client over real sockets on 127.0.0.1, with a real state file.

use std::net::{SocketAddr, UdpSocket as StdUdp};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use failover::witness::{
    load_state, ClientConfig, Coordinator, WitnessClient, WitnessConfig, WitnessError,
    WitnessServer,
};
use tokio::time::Instant;

const LEASE: Duration = Duration::from_millis(300);

fn lo0() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let d = std::env::temp_dir().join(format!("ax-failover-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        TempDir(d)
    }

    fn state(&self) -> PathBuf {
        self.0.join("witness.json")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn server(state: PathBuf) -> failover::witness::WitnessHandle {
    let cfg = WitnessConfig {
        listen: lo0(),
        state_path: state,
        lease: LEASE,
    };
    WitnessServer::bind(cfg).unwrap().spawn()
}

fn client(addr: SocketAddr) -> WitnessClient {
    WitnessClient::new(addr, ClientConfig::default())
}

#[tokio::test]
async fn acquire_renew_deny_supersede_over_udp() {
    let dir = TempDir::new("basic");
    let w = server(dir.state());
    let c = client(w.local_addr());
    assert_eq!(c.current("vm-1").await.unwrap(), None);

    let before = Instant::now();
    let g = c.acquire("vm-1", "host-a", 0).await.unwrap();
    assert_eq!((g.generation, g.lease), (1, LEASE));
    // The holder's lease is measured from the send time and shortened for drift.
    assert!(
        g.valid_until <= before + LEASE,
        "{:?} > {:?}",
        g.valid_until,
        before + LEASE
    );
    assert!(g.valid_until > Instant::now());

    let h = c.current("vm-1").await.unwrap().unwrap();
    assert_eq!((h.host.as_str(), h.generation), ("host-a", 1));
    assert!(h.expires_in.is_some_and(|d| d <= LEASE));

    let e = c.acquire("vm-1", "host-b", 1).await.unwrap_err();
    assert!(
        matches!(&e, WitnessError::Denied { holder, generation: 1, remaining } if holder == "host-a" && *remaining <= LEASE),
        "{e:?}"
    );
    let r = c.renew("vm-1", "host-a", 1).await.unwrap();
    assert_eq!(r.generation, 1);

    tokio::time::sleep(LEASE + Duration::from_millis(20)).await;
    assert!(c
        .current("vm-1")
        .await
        .unwrap()
        .unwrap()
        .expires_in
        .is_none());
    let stale = c.acquire("vm-1", "host-b", 0).await.unwrap_err();
    assert_eq!(
        stale,
        WitnessError::Superseded {
            current: 1,
            holder: "host-a".into()
        }
    );
    let g2 = c.acquire("vm-1", "host-b", 1).await.unwrap();
    assert_eq!(g2.generation, 2);
    assert_eq!(
        c.renew("vm-1", "host-a", 1).await.unwrap_err(),
        WitnessError::Superseded {
            current: 2,
            holder: "host-b".into()
        }
    );
    assert_eq!(
        c.renew("vm-1", "host-a", 2).await.unwrap_err(),
        WitnessError::NotHolder { generation: 2 }
    );
    assert!(matches!(
        c.acquire("bad\nvm", "host-a", 0).await,
        Err(WitnessError::Invalid(_))
    ));

    // Persisted before answering.
    let rec = load_state(&dir.state()).unwrap();
    assert_eq!(
        (rec["vm-1"].generation, rec["vm-1"].holder.as_str()),
        (2, "host-b")
    );
}

#[tokio::test]
async fn a_restarted_witness_never_hands_out_an_old_generation() {
    let dir = TempDir::new("restart");
    let w = server(dir.state());
    let c = client(w.local_addr());
    for expect in 1..=3 {
        assert_eq!(
            c.acquire("vm", "host-a", 0).await.unwrap().generation,
            expect
        );
    }
    drop(w);

    let started = Instant::now();
    let w2 = server(dir.state());
    let c2 = client(w2.local_addr());
    let h = c2.current("vm").await.unwrap().unwrap();
    assert_eq!((h.host.as_str(), h.generation), ("host-a", 3));
    // The restarted witness assumes host-a's lease runs a full lease from its start.
    assert!(matches!(
        c2.acquire("vm", "host-b", 3).await,
        Err(WitnessError::Denied { .. })
    ));
    // The holder itself continues above the persisted generation.
    assert_eq!(c2.acquire("vm", "host-a", 0).await.unwrap().generation, 4);
    tokio::time::sleep_until(started + LEASE + Duration::from_millis(50)).await;
    tokio::time::sleep(LEASE).await;
    assert_eq!(c2.acquire("vm", "host-b", 4).await.unwrap().generation, 5);
}

#[tokio::test]
async fn a_grant_that_cannot_be_persisted_is_not_given() {
    let dir = TempDir::new("nopersist");
    let w = server(dir.0.join("missing-dir").join("witness.json"));
    let c = client(w.local_addr());
    assert_eq!(
        c.acquire("vm", "host-a", 0).await.unwrap_err(),
        WitnessError::Failed
    );
    assert_eq!(c.current("vm").await.unwrap(), None);
}

#[tokio::test]
async fn unreachable_witness_times_out_after_every_attempt() {
    // A bound socket that never answers.
    let silent = StdUdp::bind(lo0()).unwrap();
    let cfg = ClientConfig {
        attempt_timeout: Duration::from_millis(40),
        attempts: 3,
        ..ClientConfig::default()
    };
    let c = WitnessClient::new(silent.local_addr().unwrap(), cfg);
    let t = Instant::now();
    let e = c.acquire("vm", "host-a", 0).await.unwrap_err();
    assert!(
        matches!(e, WitnessError::Unreachable { attempts: 3, .. }),
        "{e:?}"
    );
    assert!(t.elapsed() >= Duration::from_millis(120));
    // Three attempts arrived, with the same request id (so the witness can deduplicate).
    silent.set_nonblocking(true).unwrap();
    let mut ids = Vec::new();
    let mut buf = [0u8; 512];
    while let Ok(n) = silent.recv(&mut buf) {
        assert!(n >= 24);
        ids.push(u64::from_le_bytes(buf[8..16].try_into().unwrap()));
    }
    assert_eq!(ids.len(), 3);
    assert!(ids.windows(2).all(|w| w[0] == w[1]));
    // Nobody listening at all (ICMP port unreachable) is the same error.
    let closed = {
        let s = StdUdp::bind(lo0()).unwrap();
        s.local_addr().unwrap()
    };
    let c = WitnessClient::new(closed, cfg);
    assert!(matches!(
        c.renew("vm", "host-a", 1).await,
        Err(WitnessError::Unreachable { .. })
    ));
}

#[tokio::test]
async fn garbage_does_not_disturb_the_server() {
    let dir = TempDir::new("garbage");
    let w = server(dir.state());
    let raw = tokio::net::UdpSocket::bind(lo0()).await.unwrap();
    let mut x = 0xdead_beef_cafe_f00du64;
    for len in [0usize, 1, 23, 24, 25, 100, 300, 1400] {
        let v: Vec<u8> = (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        raw.send_to(&v, w.local_addr()).await.unwrap();
    }
    // A request with the right magic and version but a bad op gets "bad request" with its id.
    let mut bad = vec![0u8; 26];
    bad[..4].copy_from_slice(b"AXWQ");
    bad[4] = 1;
    bad[5] = 9;
    bad[6] = 1;
    bad[7] = 1;
    bad[8..16].copy_from_slice(&42u64.to_le_bytes());
    bad[24] = b'v';
    bad[25] = b'h';
    raw.send_to(&bad, w.local_addr()).await.unwrap();
    let mut buf = [0u8; 512];
    let n = tokio::time::timeout(Duration::from_secs(5), raw.recv(&mut buf))
        .await
        .expect("an answer to the well-framed bad request")
        .unwrap();
    assert_eq!(&buf[..4], b"AXWA");
    assert_eq!((buf[5], n), (7, 32));
    assert_eq!(u64::from_le_bytes(buf[8..16].try_into().unwrap()), 42);
    let more = tokio::time::timeout(Duration::from_millis(200), raw.recv(&mut buf)).await;
    assert!(more.is_err(), "garbage gets no answer");
    // Still serving.
    let c = client(w.local_addr());
    assert_eq!(c.acquire("vm", "host-a", 0).await.unwrap().generation, 1);
}

#[tokio::test]
async fn concurrent_acquires_grant_exactly_one() {
    let dir = TempDir::new("race");
    let w = server(dir.state());
    let c = Arc::new(client(w.local_addr()));
    let hosts: [&'static str; 6] = ["h1", "h2", "h3", "h4", "h5", "h6"];
    let tasks: Vec<_> = hosts
        .into_iter()
        .map(|h| {
            let c = c.clone();
            tokio::spawn(async move { c.acquire("vm", h, 0).await })
        })
        .collect();
    let mut granted = Vec::new();
    for t in tasks {
        match t.await.unwrap() {
            Ok(g) => granted.push(g.generation),
            Err(WitnessError::Denied { .. } | WitnessError::Superseded { .. }) => {}
            Err(e) => panic!("{e:?}"),
        }
    }
    assert_eq!(granted, vec![1]);
}
