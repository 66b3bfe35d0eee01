//! An FT pair end to end over real sockets: two hosts, each with heartbeats, a detector, a role
//! machine and a witness client, and a UDP witness server. Replication is simulated (epochs captured
//! on the primary, committed on the secondary, acknowledged back). The primary is killed; the
//! secondary must promote under a newer generation, and never release while the old primary could.
//!
//! The `run_node` loop below is also the reference for how an agent drives the crate.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use failover::detector::{self, DetectorConfig, DetectorHandle};
use failover::heartbeat::{Heartbeat, HeartbeatConfig, HeartbeatHandle, PathConfig};
use failover::role::{Action, Event, Role, RoleConfig, RoleMachine};
use failover::witness::{ClientConfig, Coordinator, WitnessClient, WitnessConfig, WitnessServer};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

const VM: &str = "vm-7";
const LEASE: Duration = Duration::from_millis(400);

fn lo0() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// What a node did, as the test sees it.
type Log = mpsc::UnboundedSender<(Instant, &'static str, Action)>;

/// A node's connections to the world.
struct Io {
    hb: HeartbeatHandle,
    det: DetectorHandle,
    witness: Arc<WitnessClient>,
    inputs: mpsc::UnboundedReceiver<Event>,
    status: watch::Sender<(Role, u64)>,
    log: Log,
}

/// The agent's loop for one VM: detector events, witness results and replication events in; role
/// machine actions out; ticks at the machine's deadline; heartbeat status kept current.
async fn run_node(host: &'static str, mut m: RoleMachine, io: Io) {
    let Io {
        hb,
        mut det,
        witness,
        mut inputs,
        status,
        log,
    } = io;
    let (wtx, mut wrx) = mpsc::unbounded_channel();
    let mut actions = m.start(Instant::now());
    loop {
        for a in actions.drain(..) {
            let _ = log.send((Instant::now(), host, a));
            match a {
                Action::Acquire { known } => {
                    let (w, tx) = (witness.clone(), wtx.clone());
                    tokio::spawn(async move {
                        tx.send(Event::from_witness(w.acquire(VM, host, known).await))
                    });
                }
                Action::Renew { generation } => {
                    let (w, tx) = (witness.clone(), wtx.clone());
                    tokio::spawn(async move {
                        tx.send(Event::from_witness(w.renew(VM, host, generation).await))
                    });
                }
                // The agent would drive the output gate, the VMM and replication here.
                _ => {}
            }
        }
        let (role, generation) = m.heartbeat_status();
        hb.set_status(role, generation);
        status.send_replace((m.role(), m.generation()));
        let deadline = m.next_deadline();
        let event = tokio::select! {
            Some(e) = det.events.recv() => match Event::from_peer(&e) {
                Some(ev) => ev,
                None => continue,
            },
            Some(e) = wrx.recv() => e,
            Some(e) = inputs.recv() => e,
            _ = async {
                match deadline {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            } => Event::Tick,
        };
        actions = m.handle(Instant::now(), event);
    }
}

struct Node {
    task: JoinHandle<()>,
    inputs: mpsc::UnboundedSender<Event>,
    status: watch::Receiver<(Role, u64)>,
}

fn spawn_node(
    host: &'static str,
    m: RoleMachine,
    hb: Heartbeat,
    witness: SocketAddr,
    log: Log,
) -> Node {
    let dcfg = DetectorConfig {
        paths: 2,
        ..DetectorConfig::default()
    };
    let (hb, obs) = hb.start().unwrap();
    let det = detector::spawn(dcfg, obs).unwrap();
    let client = Arc::new(WitnessClient::new(witness, ClientConfig::default()));
    let (itx, irx) = mpsc::unbounded_channel();
    let (stx, srx) = watch::channel((m.role(), m.generation()));
    let io = Io {
        hb,
        det,
        witness: client,
        inputs: irx,
        status: stx,
        log,
    };
    let task = tokio::spawn(run_node(host, m, io));
    Node {
        task,
        inputs: itx,
        status: srx,
    }
}

fn heartbeats(incarnation_a: u64) -> (Heartbeat, Heartbeat, Vec<SocketAddr>, Vec<SocketAddr>) {
    let p = PathConfig {
        local: lo0(),
        peer: "127.0.0.1:9".parse().unwrap(),
    };
    let mut a = Heartbeat::bind(HeartbeatConfig::new(
        "host-a",
        incarnation_a,
        "host-b",
        vec![p; 2],
    ))
    .unwrap();
    let mut b = Heartbeat::bind(HeartbeatConfig::new("host-b", 1, "host-a", vec![p; 2])).unwrap();
    let (la, lb) = (a.local_addrs().unwrap(), b.local_addrs().unwrap());
    for i in 0..2 {
        a.set_peer(i, lb[i]).unwrap();
        b.set_peer(i, la[i]).unwrap();
    }
    (a, b, la, lb)
}

/// Plays replication while host A is a primary with a generation: every 10 ms an epoch is captured on
/// A, committed on B under A's generation, and acknowledged to A.
fn replicate(a: &Node, b: &Node) -> JoinHandle<()> {
    let (ain, bin, ast) = (a.inputs.clone(), b.inputs.clone(), a.status.clone());
    tokio::spawn(async move {
        let mut epoch = 0;
        loop {
            tokio::time::sleep(Duration::from_millis(10)).await;
            let (role, generation) = *ast.borrow();
            if role != Role::Primary || generation == 0 {
                continue;
            }
            epoch += 1;
            let _ = ain.send(Event::EpochCaptured { epoch });
            let _ = bin.send(Event::ReplicaCommitted { generation, epoch });
            let _ = ain.send(Event::ReplicaAcked { generation, epoch });
        }
    })
}

async fn wait_for(
    rx: &mut mpsc::UnboundedReceiver<(Instant, &'static str, Action)>,
    all: &mut Vec<(Instant, &'static str, Action)>,
    what: &str,
    f: impl Fn(&'static str, &Action) -> bool,
) -> Instant {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (t, h, a) = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for {what}; log: {all:#?}"))
            .unwrap();
        all.push((t, h, a));
        if f(h, &a) {
            return t;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primary_dies_secondary_promotes_old_primary_comes_back_and_demotes() {
    let dir = std::env::temp_dir().join(format!("ax-failover-pair-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let w = WitnessServer::bind(WitnessConfig {
        listen: lo0(),
        state_path: dir.join("w.json"),
        lease: LEASE,
    })
    .unwrap()
    .spawn();
    let (log_tx, mut log) = mpsc::unbounded_channel();
    let mut all = Vec::new();
    let cfg = RoleConfig {
        renew_every: LEASE / 4,
        ..RoleConfig::default()
    };

    let (hba, hbb, addrs_a, addrs_b) = heartbeats(1);
    let a = spawn_node(
        "host-a",
        RoleMachine::new_primary(cfg, 0).unwrap(),
        hba,
        w.local_addr(),
        log_tx.clone(),
    );
    let b = spawn_node(
        "host-b",
        RoleMachine::new_secondary(cfg).unwrap(),
        hbb,
        w.local_addr(),
        log_tx.clone(),
    );
    let repl = replicate(&a, &b);

    // A acquires generation 1, resyncs B, and releases output protected by B's acks.
    wait_for(&mut log, &mut all, "A's resync", |h, a| {
        h == "host-a" && *a == Action::StartResync { generation: 1 }
    })
    .await;
    wait_for(&mut log, &mut all, "A releasing epoch 20", |h, a| {
        h == "host-a" && matches!(a, Action::ReleaseOutputUpTo { epoch, .. } if *epoch >= 20)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await; // a few renewals
    assert_eq!(b.status.borrow().0, Role::Secondary);
    // Normally 1; a loaded machine may have made A suspect B and move to a fresh generation.
    let a_generation = a.status.borrow().1;

    // Kill A: its loop, heartbeats and replication stop at once.
    let killed = Instant::now();
    a.task.abort();
    repl.abort();
    let _ = a.task.await;

    let promote_at = wait_for(&mut log, &mut all, "B's promotion", |h, a| {
        h == "host-b" && matches!(a, Action::Promote { .. })
    })
    .await;
    let Some((_, _, Action::Promote { generation, epoch })) = all.last().copied() else {
        unreachable!()
    };
    assert!(
        generation > a_generation,
        "promoted to {generation}, A had {a_generation}"
    );
    assert!(
        epoch >= 20,
        "promoted from the last committed epoch {epoch}"
    );
    eprintln!(
        "failover: promotion {:?} after the primary died (detection ≈ 100 ms + the rest of a {LEASE:?} lease)",
        promote_at - killed
    );

    // A's last permission to release ended before B was granted anything.
    let a_last_until = all
        .iter()
        .filter_map(|(_, h, a)| match a {
            Action::ReleaseOutputUpTo { until, .. } if *h == "host-a" => Some(*until),
            _ => None,
        })
        .max()
        .unwrap();
    assert!(
        a_last_until <= promote_at,
        "A could release until {a_last_until:?}, B promoted at {promote_at:?}"
    );
    // B releases its own epochs once the promoted VM runs.
    b.inputs
        .send(Event::EpochCaptured { epoch: epoch + 1 })
        .unwrap();
    let b_release = wait_for(&mut log, &mut all, "B releasing", |h, a| {
        h == "host-b" && matches!(a, Action::ReleaseOutputUpTo { .. })
    })
    .await;
    assert!(b_release >= a_last_until);

    // A comes back (new incarnation, same addresses) believing it is the primary: the witness says a
    // newer generation exists, so it demotes; B sees the restart and resyncs it.
    let p = |i: usize| PathConfig {
        local: addrs_a[i],
        peer: addrs_b[i],
    };
    let mut hba2 = None;
    for _ in 0..50 {
        match Heartbeat::bind(HeartbeatConfig::new(
            "host-a",
            2,
            "host-b",
            vec![p(0), p(1)],
        )) {
            Ok(h) => {
                hba2 = Some(h);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    let a2 = spawn_node(
        "host-a",
        RoleMachine::new_primary(cfg, 0).unwrap(),
        hba2.unwrap(),
        w.local_addr(),
        log_tx,
    );
    // Both happen, in either order.
    let demoted = |h: &str, a: &Action| h == "host-a" && matches!(a, Action::Demote { .. });
    let resync = |h: &str, a: &Action| h == "host-b" && *a == Action::StartResync { generation };
    let mark = all.len();
    let seen = |all: &[(Instant, &'static str, Action)], f: &dyn Fn(&str, &Action) -> bool| {
        all[mark..].iter().any(|(_, h, a)| f(h, a))
    };
    while !(seen(&all, &demoted) && seen(&all, &resync)) {
        wait_for(
            &mut log,
            &mut all,
            "A's demotion and B resyncing A",
            |h, a| demoted(h, a) || resync(h, a),
        )
        .await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    while let Ok(x) = log.try_recv() {
        all.push(x);
    }
    let a2_released = all.iter().any(|(t, h, a)| {
        *h == "host-a" && *t > killed && matches!(a, Action::ReleaseOutputUpTo { .. })
    });
    assert!(!a2_released, "the restarted old primary released output");
    assert_eq!(a2.status.borrow().0, Role::Secondary);
    assert_eq!(*b.status.borrow(), (Role::Primary, generation));

    let h = WitnessClient::new(w.local_addr(), ClientConfig::default())
        .current(VM)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((h.host.as_str(), h.generation), ("host-b", generation));
    a2.task.abort();
    b.task.abort();
    let _ = std::fs::remove_dir_all(&dir);
}
