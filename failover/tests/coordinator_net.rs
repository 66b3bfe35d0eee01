//! The protocol v2 coordinators over real sockets: the mutual-TLS witness (forged and replayed
//! requests refused, durable across restarts, safe after losing its state) and etcd v3 (a real etcd,
//! a 3-member cluster on loopback: races, a member killed, quorum lost, TLS with client
//! certificates).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use failover::coordinator::etcd::{EtcdConfig, EtcdCoordinator, LocalEtcd, LocalEtcdTls};
use failover::coordinator::witness::{WitnessConfig, WitnessCoordinator, WitnessServer};
use failover::coordinator::{CasOutcome, CasRequest, CoordError, Coordinator, Record};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

// ---------------------------------------------------------------------------------------------------
// A test PKI.
// ---------------------------------------------------------------------------------------------------

struct Ca {
    pem: String,
    der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

struct Host {
    cert_pem: String,
    key_pem: String,
    chain: Vec<CertificateDer<'static>>,
    key: Vec<u8>,
}

fn ca(name: &str) -> Ca {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name.push(DnType::CommonName, name);
    let cert = p.self_signed(&key).unwrap();
    let pem = cert.pem();
    Ca {
        der: cert.der().clone(),
        issuer: Issuer::from_ca_cert_pem(&pem, key).unwrap(),
        pem,
    }
}

fn host(ca: &Ca, names: &[&str]) -> Host {
    let key = KeyPair::generate().unwrap();
    let mut p =
        CertificateParams::new(names.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>()).unwrap();
    p.distinguished_name.push(DnType::CommonName, names[0]);
    let cert = p.signed_by(&key, &ca.issuer).unwrap();
    Host {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        chain: vec![cert.der().clone()],
        key: key.serialize_der(),
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(ca: &Ca) -> Arc<rustls::RootCertStore> {
    let mut r = rustls::RootCertStore::empty();
    r.add(ca.der.clone()).unwrap();
    Arc::new(r)
}

fn key_der(h: &Host) -> PrivateKeyDer<'static> {
    PrivatePkcs8KeyDer::from(h.key.clone()).into()
}

fn server_tls(ca: &Ca, h: &Host) -> rustls::ServerConfig {
    let v = rustls::server::WebPkiClientVerifier::builder_with_provider(roots(ca), provider())
        .build()
        .unwrap();
    rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_client_cert_verifier(v)
        .with_single_cert(h.chain.clone(), key_der(h))
        .unwrap()
}

fn client_tls(ca: &Ca, h: &Host) -> rustls::ClientConfig {
    rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots(ca))
        .with_client_auth_cert(h.chain.clone(), key_der(h))
        .unwrap()
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ax-coord-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn req(claimant: &str, expected: u64, members: &[&str]) -> CasRequest {
    CasRequest {
        vm: "vm-1".into(),
        claimant: claimant.into(),
        expected,
        members: members.iter().map(|s| (*s).to_owned()).collect(),
        witness: 0,
    }
}

fn lo0() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

// ---------------------------------------------------------------------------------------------------
// The witness.
// ---------------------------------------------------------------------------------------------------

struct Lab {
    ca: Ca,
    witness: Host,
    a: Host,
    b: Host,
}

fn lab() -> Lab {
    let ca = ca("test cluster");
    Lab {
        witness: host(&ca, &["witness"]),
        a: host(&ca, &["host-a"]),
        b: host(&ca, &["host-b"]),
        ca,
    }
}

async fn serve(
    lab: &Lab,
    state: &Path,
    init: bool,
    listen: SocketAddr,
) -> failover::coordinator::witness::WitnessHandle {
    WitnessServer::bind(
        WitnessConfig {
            listen,
            state_path: state.to_owned(),
            init,
        },
        server_tls(&lab.ca, &lab.witness),
    )
    .await
    .unwrap()
    .spawn()
    .unwrap()
}

fn client(lab: &Lab, h: &Host, addr: SocketAddr) -> WitnessCoordinator {
    WitnessCoordinator::new(
        addr,
        "witness",
        client_tls(&lab.ca, h),
        Duration::from_secs(3),
    )
    .unwrap()
}

#[tokio::test]
async fn witness_compare_and_set_is_durable_and_refuses_forged_claims() {
    let lab = lab();
    let dir = tmp("witness-cas");
    let state = dir.join("state.json");
    let w = serve(&lab, &state, true, lo0()).await;
    let a = client(&lab, &lab.a, w.local_addr());
    let b = client(&lab, &lab.b, w.local_addr());
    assert_eq!(
        a.cas(&req("host-a#1", 0, &["host-b"])).await.unwrap(),
        CasOutcome::Won { generation: 1 }
    );
    // Idempotent for the winner (its answer lost), a loss for anyone else.
    assert_eq!(
        a.cas(&req("host-a#1", 0, &["host-b"])).await.unwrap(),
        CasOutcome::Won { generation: 1 }
    );
    assert_eq!(
        b.cas(&req("host-b#1", 0, &["host-a"])).await.unwrap(),
        CasOutcome::Lost {
            current: 1,
            holder: "host-a#1".into()
        }
    );
    // Forged: host-b's certificate claiming for host-a.
    let e = b.cas(&req("host-a#1", 1, &[])).await.unwrap_err();
    assert!(matches!(e, CoordError::Refused(_)), "{e}");
    // Forged: a certificate from another CA (named host-a) does not get through the handshake.
    let rogue_ca = ca("rogue");
    let rogue = host(&rogue_ca, &["host-a"]);
    // It trusts the real witness, but presents the rogue certificate.
    let tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots(&lab.ca))
        .with_client_auth_cert(rogue.chain.clone(), key_der(&rogue))
        .unwrap();
    let r =
        WitnessCoordinator::new(w.local_addr(), "witness", tls, Duration::from_secs(3)).unwrap();
    assert!(r.cas(&req("host-a#1", 1, &[])).await.is_err());
    assert_eq!(
        a.read("vm-1").await.unwrap(),
        Some(Record {
            generation: 1,
            holder: "host-a#1".into()
        })
    );
    // Durable: a restarted witness (same state file) knows generation 1.
    let addr = w.local_addr();
    drop(w);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let w = serve(&lab, &state, false, addr).await;
    assert_eq!(
        b.cas(&req("host-b#1", 0, &[])).await.unwrap(),
        CasOutcome::Lost {
            current: 1,
            holder: "host-a#1".into()
        }
    );
    assert_eq!(
        b.cas(&req("host-b#1", 1, &[])).await.unwrap(),
        CasOutcome::Won { generation: 2 }
    );
    drop(w);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A TCP relay that records what the client sent.
async fn recording_relay(to: SocketAddr) -> (SocketAddr, tokio::sync::oneshot::Receiver<Vec<u8>>) {
    let l = TcpListener::bind(lo0()).await.unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (mut c, _) = l.accept().await.unwrap();
        let mut s = TcpStream::connect(to).await.unwrap();
        let mut sent = Vec::new();
        let (mut cbuf, mut sbuf) = (vec![0u8; 65536], vec![0u8; 65536]);
        loop {
            tokio::select! {
                n = c.read(&mut cbuf) => {
                    let n = n.unwrap_or(0);
                    if n == 0 { break; }
                    sent.extend_from_slice(&cbuf[..n]);
                    if s.write_all(&cbuf[..n]).await.is_err() { break; }
                }
                n = s.read(&mut sbuf) => {
                    let n = n.unwrap_or(0);
                    if n == 0 { break; }
                    if c.write_all(&sbuf[..n]).await.is_err() { break; }
                }
            }
        }
        let _ = tx.send(sent);
    });
    (addr, rx)
}

#[tokio::test]
async fn witness_refuses_a_replayed_request() {
    let lab = lab();
    let dir = tmp("witness-replay");
    let w = serve(&lab, &dir.join("state.json"), true, lo0()).await;
    // host-a's request goes through a relay that records it.
    let (relay, recorded) = recording_relay(w.local_addr()).await;
    let a = client(&lab, &lab.a, relay);
    assert_eq!(
        a.cas(&req("host-a#1", 0, &[])).await.unwrap(),
        CasOutcome::Won { generation: 1 }
    );
    drop(a); // closes the connection: the relay hands over what it recorded
    let captured = tokio::time::timeout(Duration::from_secs(5), recorded)
        .await
        .unwrap()
        .unwrap();
    assert!(captured.len() > 100);
    // A fresh witness (nothing granted yet): replaying the captured bytes must not grant anything.
    let dir2 = tmp("witness-replay-2");
    let w2 = serve(&lab, &dir2.join("state.json"), true, lo0()).await;
    let mut s = TcpStream::connect(w2.local_addr()).await.unwrap();
    let _ = s.write_all(&captured).await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(3), s.read_to_end(&mut answer)).await;
    let b = client(&lab, &lab.b, w2.local_addr());
    assert_eq!(
        b.read("vm-1").await.unwrap(),
        None,
        "the replay was applied"
    );
    // Inside one authenticated connection, a repeated sequence number is refused too.
    let tls = tokio_rustls::TlsConnector::from(Arc::new({
        let mut c = client_tls(&lab.ca, &lab.a);
        c.alpn_protocols = vec![failover::coordinator::witness::ALPN.to_vec()];
        c
    }));
    let tcp = TcpStream::connect(w2.local_addr()).await.unwrap();
    let mut t = tls
        .connect(
            rustls::pki_types::ServerName::try_from("witness").unwrap(),
            tcp,
        )
        .await
        .unwrap();
    let msg = serde_json::json!({"seq": 5, "op": {"read": {"vm": "vm-1"}}}).to_string();
    let frame = |m: &str| {
        let mut f = (m.len() as u32).to_le_bytes().to_vec();
        f.extend_from_slice(m.as_bytes());
        f
    };
    t.write_all(&frame(&msg)).await.unwrap();
    let mut len = [0u8; 4];
    t.read_exact(&mut len).await.unwrap();
    let mut body = vec![0u8; u32::from_le_bytes(len) as usize];
    t.read_exact(&mut body).await.unwrap();
    assert!(String::from_utf8_lossy(&body).contains("\"read\""));
    t.write_all(&frame(&msg)).await.unwrap();
    t.read_exact(&mut len).await.unwrap();
    let mut body = vec![0u8; u32::from_le_bytes(len) as usize];
    t.read_exact(&mut body).await.unwrap();
    let body = String::from_utf8_lossy(&body).to_string();
    assert!(body.contains("refused"), "{body}");
    drop((w, w2));
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&dir2);
}

#[tokio::test]
async fn a_witness_without_state_relearns_and_never_grants_below_a_grant() {
    let lab = lab();
    let dir = tmp("witness-relearn");
    let state = dir.join("state.json");
    let w = serve(&lab, &state, true, lo0()).await;
    let addr = w.local_addr();
    let a = client(&lab, &lab.a, addr);
    let b = client(&lab, &lab.b, addr);
    // a boots (1), b promotes (2), a is fenced; b goes solo (3): b holds 3, a replica of 2 is stale.
    assert_eq!(
        a.cas(&req("host-a#1", 0, &["host-b"])).await.unwrap(),
        CasOutcome::Won { generation: 1 }
    );
    assert_eq!(
        b.cas(&req("host-b#1", 1, &["host-a"])).await.unwrap(),
        CasOutcome::Won { generation: 2 }
    );
    assert_eq!(
        b.cas(&req("host-b#1", 2, &["host-a"])).await.unwrap(),
        CasOutcome::Won { generation: 3 }
    );
    // The witness loses its state file and restarts (not as a new cluster).
    drop(w);
    std::fs::remove_file(&state).unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let _w = serve(&lab, &state, false, addr).await;
    // a (stale, knows 2) asks first: "re-learning", never a grant.
    let ra = req("host-a#1", 2, &["host-b"]);
    let rb = req("host-b#1", 3, &["host-a"]);
    for _ in 0..3 {
        assert!(matches!(
            a.cas(&ra).await.unwrap(),
            CasOutcome::Relearning { .. }
        ));
    }
    // The healthy holder b is never told it lost: "re-learning" until both have claimed, then its
    // claim wins 4 — above every generation ever granted.
    let first = b.cas(&rb).await.unwrap();
    assert!(matches!(first, CasOutcome::Relearning { .. }), "{first:?}");
    assert_eq!(b.cas(&rb).await.unwrap(), CasOutcome::Won { generation: 4 });
    assert!(matches!(
        a.cas(&ra).await.unwrap(),
        CasOutcome::Lost { current: 4, .. }
    ));
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------------------------------------------
// etcd.
// ---------------------------------------------------------------------------------------------------

/// Waits until the cluster answers a read (at most 20 s).
async fn ready(c: &EtcdCoordinator) {
    LocalEtcd::wait_ready(c, Duration::from_secs(20))
        .await
        .unwrap();
}

fn start_etcd(name: &str, n: usize, tls: Option<&LocalEtcdTls>) -> LocalEtcd {
    LocalEtcd::start(
        std::env::temp_dir().join(format!("ax-etcd-{name}-{}", std::process::id())),
        n,
        tls,
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_compare_and_set_races_member_loss_and_quorum_loss() {
    if !LocalEtcd::available() {
        eprintln!("SKIPPED: etcd is not installed");
        return;
    }
    let mut etcd = start_etcd("cas", 3, None);
    let c = Arc::new(EtcdCoordinator::new(EtcdConfig::new(etcd.endpoints.clone())).unwrap());
    ready(&c).await;
    assert_eq!(c.read("vm-1").await.unwrap(), None);
    // Eight claimants race for generation 1: exactly one wins, every other loses to it.
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let c = Arc::clone(&c);
            tokio::spawn(async move { c.cas(&req(&format!("h{i}#1"), 0, &[])).await.unwrap() })
        })
        .collect();
    let mut winners = Vec::new();
    let mut holders = Vec::new();
    for (i, t) in tasks.into_iter().enumerate() {
        match t.await.unwrap() {
            CasOutcome::Won { generation } => {
                assert_eq!(generation, 1);
                winners.push(format!("h{i}#1"));
            }
            CasOutcome::Lost { current, holder } => {
                assert_eq!(current, 1);
                holders.push(holder);
            }
            o => panic!("{o:?}"),
        }
    }
    assert_eq!(winners.len(), 1, "{winners:?}");
    assert!(holders.iter().all(|h| *h == winners[0]));
    // The winner's retry (its answer lost) is the same win.
    assert_eq!(
        c.cas(&req(&winners[0], 0, &[])).await.unwrap(),
        CasOutcome::Won { generation: 1 }
    );
    // Kill the member the client talks to: the next claim goes to another and succeeds.
    etcd.kill(0);
    assert_eq!(
        c.cas(&req("h9#1", 1, &[])).await.unwrap(),
        CasOutcome::Won { generation: 2 }
    );
    // Lose the quorum: no answer at all (never a wrong one).
    etcd.kill(1);
    let r = c.cas(&req("h8#1", 2, &[])).await;
    assert!(
        matches!(r, Err(CoordError::Unreachable(_))),
        "without a quorum: {r:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_over_tls_with_client_certificates() {
    if !LocalEtcd::available() {
        eprintln!("SKIPPED: etcd is not installed");
        return;
    }
    let ca = ca("etcd test");
    let server = host(&ca, &["localhost", "127.0.0.1"]);
    let clientc = host(&ca, &["host-a"]);
    let dir = tmp("etcd-tls-pki");
    let w = |n: &str, s: &str| {
        let p = dir.join(n);
        std::fs::write(&p, s).unwrap();
        p
    };
    let (ca_p, sc, sk, cc, ck) = (
        w("ca.pem", &ca.pem),
        w("server.pem", &server.cert_pem),
        w("server.key", &server.key_pem),
        w("client.pem", &clientc.cert_pem),
        w("client.key", &clientc.key_pem),
    );
    let etcd = start_etcd(
        "tls",
        1,
        Some(&LocalEtcdTls {
            ca: ca_p.clone(),
            cert: sc,
            key: sk,
        }),
    );
    let mut cfg = EtcdConfig::new(etcd.endpoints.clone());
    cfg.ca = Some(ca_p.clone());
    cfg.cert = Some(cc);
    cfg.key = Some(ck);
    let c = EtcdCoordinator::new(cfg).unwrap();
    ready(&c).await;
    assert_eq!(
        c.cas(&req("host-a#1", 0, &[])).await.unwrap(),
        CasOutcome::Won { generation: 1 }
    );
    // Without a client certificate: refused by etcd.
    let mut cfg = EtcdConfig::new(etcd.endpoints.clone());
    cfg.ca = Some(ca_p);
    let anon = EtcdCoordinator::new(cfg).unwrap();
    assert!(anon.cas(&req("host-b#1", 1, &[])).await.is_err());
    assert_eq!(
        c.read("vm-1").await.unwrap(),
        Some(Record {
            generation: 1,
            holder: "host-a#1".into()
        })
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_plain_keys_beside_the_registers() {
    if !LocalEtcd::available() {
        eprintln!("SKIPPED: etcd is not installed");
        return;
    }
    let _etcd = start_etcd("kv", 1, None);
    let c = EtcdCoordinator::new(EtcdConfig::new(_etcd.endpoints.clone())).unwrap();
    ready(&c).await;
    c.kv_put("/ax/catalog/b", b"two").await.unwrap();
    c.kv_put("/ax/catalog/a", b"one").await.unwrap();
    c.kv_put("/ax/catalog0", b"outside").await.unwrap();
    c.kv_put("/ax/catalog/a", b"one again").await.unwrap();
    let all = c.kv_prefix("/ax/catalog/", 100, 1 << 20).await.unwrap();
    let got: Vec<(&str, &[u8])> = all
        .iter()
        .map(|kv| (kv.key.as_str(), kv.value.as_slice()))
        .collect();
    assert_eq!(
        got,
        vec![
            ("/ax/catalog/a", &b"one again"[..]),
            ("/ax/catalog/b", &b"two"[..])
        ]
    );
    // Bounded: a listing over the cap is an error, not an allocation.
    assert!(matches!(
        c.kv_prefix("/ax/catalog/", 100, 8).await,
        Err(CoordError::Malformed(_))
    ));
    c.kv_delete("/ax/catalog/a").await.unwrap();
    c.kv_delete("/ax/catalog/missing").await.unwrap();
    let left = c.kv_prefix("/ax/catalog/", 100, 1 << 20).await.unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].key, "/ax/catalog/b");
    // The registers are untouched by plain keys.
    assert_eq!(c.read("a").await.unwrap(), None);
}
