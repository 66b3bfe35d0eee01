//! `ax-bench coordinator [--quick]`: protocol v2 at scale — N simulated hosts, one FT VM each (primary
//! on host i, secondary on host i + 1), every VM a pair of real `failover::role::RoleMachine`s driven
//! here, against a real 3-member etcd on this machine (`failover::coordinator::etcd`).
//!
//! For each scale (100, 1,000, 5,000 hosts) it measures:
//! - the boot: every VM's primary claims generation 1 (a burst of N compare-and-sets);
//! - the steady state: acknowledgements flow and output is released for a few seconds — etcd requests
//!   per second and per VM per second (protocol v2 makes none);
//! - a failure of 10 % of the hosts at once: every VM whose primary died promotes its secondary, every
//!   VM whose secondary died goes solo — all through etcd at the same moment: etcd requests per second
//!   during the storm and the **decision latency** per VM (from the detector's verdict fed to the
//!   machine to its `Promote`, or to the solo primary's won generation), p50 / p99 / max.
//!
//! Simulated agents share a pool of 32 etcd clients (one HTTP/1.1 connection pool each), as 32 busy
//! agents would; the detector's timeout is not part of the latency (it is the same for any
//! coordinator). The JSON goes to `bench/results/coordinator-<unix time>.json`.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use failover::coordinator::etcd::{EtcdConfig, EtcdCoordinator, LocalEtcd};
use failover::coordinator::{CasRequest, Coordinator};
use failover::role::{Action, Event, RoleConfig, RoleMachine};
use serde::Serialize;

use crate::BoxError;

const NAME: &str = "coordinator bench";
const CLIENTS: usize = 32;

#[derive(Serialize, Default, Debug)]
struct Scale {
    hosts: usize,
    vms: usize,
    boot_s: f64,
    boot_requests: u64,
    boot_requests_per_s: f64,
    steady_s: f64,
    steady_requests: u64,
    steady_requests_per_s: f64,
    coord_ops_per_vm_s: f64,
    failed_hosts: usize,
    failover_vms: usize,
    failover_requests: u64,
    failover_requests_per_s: f64,
    failover_s: f64,
    decision_p50_ms: f64,
    decision_p99_ms: f64,
    decision_max_ms: f64,
    decisions_failed: usize,
}

#[derive(Serialize, Default, Debug)]
struct CoordinatorResult {
    quick: bool,
    cpus: usize,
    etcd_members: usize,
    etcd_clients: usize,
    scales: Vec<Scale>,
}

struct Pool {
    clients: Vec<EtcdCoordinator>,
}

impl Pool {
    fn get(&self, i: usize) -> &EtcdCoordinator {
        &self.clients[i % self.clients.len()]
    }
    fn requests(&self) -> u64 {
        self.clients
            .iter()
            .map(|c| c.requests.load(Ordering::Relaxed))
            .sum()
    }
}

fn role_cfg() -> RoleConfig {
    RoleConfig {
        cas_retry: Duration::from_millis(20),
        ..RoleConfig::default()
    }
}

/// Feeds `e` and carries out the coordinator requests that follow (a failed one again at the
/// machine's deadline) until the machine decided (won, fenced, dropped) or waits for nothing; returns
/// every other action, in order.
async fn drive(
    m: &mut RoleMachine,
    e: Event,
    coord: &EtcdCoordinator,
    vm: &str,
    claimant: &str,
    members: &[String],
) -> Vec<Action> {
    let mut out = Vec::new();
    let mut acts = m.handle(tokio::time::Instant::now(), e);
    loop {
        let mut cas = None;
        for a in acts.drain(..) {
            match a {
                Action::Cas { expected, .. } => cas = Some(expected),
                other => out.push(other),
            }
        }
        if let Some(expected) = cas {
            let req = CasRequest {
                vm: vm.to_owned(),
                claimant: claimant.to_owned(),
                expected,
                members: members.to_vec(),
                witness: 0,
            };
            let r = coord.cas(&req).await;
            acts = m.handle(tokio::time::Instant::now(), Event::from_cas(r));
            continue;
        }
        if out.iter().any(is_decision) {
            return out;
        }
        match m.next_deadline() {
            Some(d) => {
                tokio::time::sleep_until(d).await;
                acts = m.handle(tokio::time::Instant::now(), Event::Tick);
            }
            None => return out,
        }
    }
}

fn is_decision(a: &Action) -> bool {
    matches!(
        a,
        Action::Persist { .. } | Action::Fence { .. } | Action::DropReplica { .. }
    )
}

struct Vm {
    name: String,
    primary: RoleMachine,
    secondary: RoleMachine,
    p: usize,
    s: usize,
}

fn claimant(host: usize) -> String {
    format!("host-{host}#1")
}

async fn one_scale(hosts: usize, steady: Duration, etcd: &[String]) -> Result<Scale, BoxError> {
    let pool = Arc::new(Pool {
        clients: (0..CLIENTS)
            .map(|_| EtcdCoordinator::new(EtcdConfig::new(etcd.to_vec())))
            .collect::<Result<_, _>>()?,
    });
    let run = format!("{}-{hosts}", std::process::id());
    let mut s = Scale {
        hosts,
        vms: hosts,
        ..Scale::default()
    };
    // Boot: every primary claims its generation, every secondary takes the replica.
    let before = pool.requests();
    let t = Instant::now();
    let boots: Vec<_> = (0..hosts)
        .map(|i| {
            let pool = Arc::clone(&pool);
            let name = format!("bench-{run}-vm-{i}");
            tokio::spawn(async move {
                let (p, sh) = (i, (i + 1) % hosts);
                let mut primary =
                    RoleMachine::new_primary(role_cfg(), 0).map_err(|e| e.to_string())?;
                let mut secondary =
                    RoleMachine::new_secondary(role_cfg(), 0).map_err(|e| e.to_string())?;
                let members = vec![format!("host-{sh}")];
                let acts = drive(
                    &mut primary,
                    Event::Tick,
                    pool.get(i),
                    &name,
                    &claimant(p),
                    &members,
                )
                .await;
                let g = primary.generation();
                if !acts.contains(&Action::StartResync { generation: g }) {
                    return Err(format!("{name}: boot ended with {acts:?}"));
                }
                primary.handle(tokio::time::Instant::now(), Event::SessionOpened);
                let now = tokio::time::Instant::now();
                secondary.handle(now, Event::SessionOffered { generation: g });
                secondary.handle(
                    now,
                    Event::FrameStaged {
                        generation: g,
                        epoch: 1,
                        restorable: true,
                    },
                );
                Ok::<_, String>(Vm {
                    name,
                    primary,
                    secondary,
                    p,
                    s: sh,
                })
            })
        })
        .collect();
    let mut vms = Vec::with_capacity(hosts);
    for b in boots {
        vms.push(b.await??);
    }
    s.boot_s = t.elapsed().as_secs_f64();
    s.boot_requests = pool.requests() - before;
    s.boot_requests_per_s = s.boot_requests as f64 / s.boot_s;

    // Steady state: epochs captured, acknowledged, released — in rounds, for `steady`.
    let before = pool.requests();
    let t = Instant::now();
    let mut epoch = 1;
    let mut released = 0u64;
    while t.elapsed() < steady {
        epoch += 1;
        for vm in &mut vms {
            let now = tokio::time::Instant::now();
            let g = vm.primary.generation();
            vm.primary.handle(now, Event::EpochCaptured { epoch });
            for a in vm.secondary.handle(
                now,
                Event::FrameStaged {
                    generation: g,
                    epoch,
                    restorable: true,
                },
            ) {
                if let Action::Ack { generation, epoch } = a {
                    for r in vm
                        .primary
                        .handle(now, Event::ReplicaAcked { generation, epoch })
                    {
                        if matches!(r, Action::Release { .. }) {
                            released += 1;
                        }
                    }
                }
            }
            if vm.primary.next_deadline().is_some_and(|d| d <= now) {
                return Err(format!("{}: a coordinator request in steady state", vm.name).into());
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    s.steady_s = t.elapsed().as_secs_f64();
    s.steady_requests = pool.requests() - before;
    s.steady_requests_per_s = s.steady_requests as f64 / s.steady_s;
    s.coord_ops_per_vm_s = s.steady_requests_per_s / hosts as f64;
    if released < vms.len() as u64 {
        return Err(format!("only {released} releases in steady state").into());
    }

    // 10 % of the hosts fail at once (every tenth host).
    let failed: Vec<usize> = (0..hosts).filter(|h| h % 10 == 3).collect();
    s.failed_hosts = failed.len();
    let dead = |h: usize| h % 10 == 3;
    let before = pool.requests();
    let t = Instant::now();
    let mut tasks = Vec::new();
    for (i, vm) in vms.into_iter().enumerate() {
        let Vm {
            name,
            mut primary,
            mut secondary,
            p,
            s: sh,
        } = vm;
        let pool = Arc::clone(&pool);
        let (host, mut m, peer) = if dead(p) && !dead(sh) {
            (
                sh,
                std::mem::replace(&mut secondary, RoleMachine::new_secondary(role_cfg(), 0)?),
                p,
            )
        } else if dead(sh) && !dead(p) {
            (
                p,
                std::mem::replace(&mut primary, RoleMachine::new_secondary(role_cfg(), 0)?),
                sh,
            )
        } else {
            continue;
        };
        tasks.push(tokio::spawn(async move {
            let t0 = Instant::now();
            let members = vec![format!("host-{peer}")];
            let acts = drive(
                &mut m,
                Event::PeerDead,
                pool.get(i),
                &name,
                &claimant(host),
                &members,
            )
            .await;
            let decided = acts.iter().any(|a| matches!(a, Action::Persist { .. }));
            (decided, t0.elapsed())
        }));
    }
    s.failover_vms = tasks.len();
    let mut lat = Vec::with_capacity(tasks.len());
    for task in tasks {
        let (ok, d) = task.await?;
        if ok {
            lat.push(d.as_secs_f64() * 1e3);
        } else {
            s.decisions_failed += 1;
        }
    }
    s.failover_s = t.elapsed().as_secs_f64();
    s.failover_requests = pool.requests() - before;
    s.failover_requests_per_s = s.failover_requests as f64 / s.failover_s;
    lat.sort_by(f64::total_cmp);
    let pct = |q: f64| -> f64 {
        if lat.is_empty() {
            return 0.0;
        }
        lat[((lat.len() as f64 * q).ceil() as usize).clamp(1, lat.len()) - 1]
    };
    s.decision_p50_ms = pct(0.5);
    s.decision_p99_ms = pct(0.99);
    s.decision_max_ms = lat.last().copied().unwrap_or(0.0);
    Ok(s)
}

/// Runs the bench.
pub fn run(quick: bool, out_dir: &Path) -> Result<(), BoxError> {
    if !LocalEtcd::available() {
        println!("SKIPPED: {NAME}: etcd is not installed");
        return Ok(());
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let dir = std::env::temp_dir().join(format!("ax-bench-coordinator-{}", std::process::id()));
        let etcd = LocalEtcd::start(dir, 3, None)?;
        let probe = EtcdCoordinator::new(EtcdConfig::new(etcd.endpoints.clone()))?;
        LocalEtcd::wait_ready(&probe, Duration::from_secs(30)).await?;
        let mut r = CoordinatorResult {
            quick,
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            etcd_members: 3,
            etcd_clients: CLIENTS,
            ..CoordinatorResult::default()
        };
        let steady = if quick {
            Duration::from_secs(2)
        } else {
            Duration::from_secs(10)
        };
        println!("3-member etcd on loopback, {CLIENTS} clients; one FT VM per host; 10 % of the hosts fail at once");
        println!(
            "{:>6} {:>10} {:>12} {:>12} {:>10} {:>12} {:>9} {:>9} {:>9}",
            "hosts", "boot req/s", "steady req/s", "failover VMs", "req", "req/s", "p50 ms", "p99 ms", "max ms"
        );
        for hosts in [100, 1000, 5000] {
            let s = one_scale(hosts, steady, &etcd.endpoints).await?;
            println!(
                "{:>6} {:>10.0} {:>12.1} {:>12} {:>10} {:>12.0} {:>9.1} {:>9.1} {:>9.1}",
                s.hosts,
                s.boot_requests_per_s,
                s.steady_requests_per_s,
                s.failover_vms,
                s.failover_requests,
                s.failover_requests_per_s,
                s.decision_p50_ms,
                s.decision_p99_ms,
                s.decision_max_ms
            );
            r.scales.push(s);
        }
        let json = serde_json::to_string(&r)?;
        println!("{json}");
        std::fs::create_dir_all(out_dir)?;
        let ts = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs();
        std::fs::write(out_dir.join(format!("coordinator-{ts}.json")), &json)?;
        Ok::<(), BoxError>(())
    })
}
