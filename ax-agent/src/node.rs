//! An FT node: the agent process of one host for one FT VM (`ax-agent ft-node`).
//!
//! Every node listens for replication sessions. A node started with `--boot` acquires the output right
//! from the witness, boots the VM and protects it to the first peer that accepts a session. A node that
//! accepts a session becomes that VM's secondary: it follows the primary's heartbeats, and when the
//! detector declares the primary dead it ends the session, asks the witness for a newer generation
//! (granted only once the old primary's lease has run out), restores the VM from its last committed
//! epoch, serves the output endpoint, and protects the VM again to another peer by a live initial sync.
//!
//! Output is released only while the node holds an unexpired lease that it renewed at the witness. A
//! primary whose renewal is refused because a newer generation exists destroys its VM and exits
//! (`EXIT_FENCED`): it was superseded.
//!
//! Not yet handled (issue 3): a secondary that dies while the primary runs (the primary keeps running
//! but its output stays held until a new secondary is in place — no automatic resync yet), a second
//! heartbeat path, and fencing commands.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use failover::detector::{self, DetectorConfig, PeerEvent};
use failover::heartbeat::{self, Heartbeat, HeartbeatConfig, PathConfig};
use failover::witness::{ClientConfig, Coordinator, WitnessClient, WitnessError};
use statepoint::{EpochConfig, Replica, SyncConfig, Vm, VmConfig};
use tokio::net::TcpListener;

use crate::certs::{PkiPaths, TlsIdentity};
use crate::ft::{self, Lease, Primary, PrimaryConfig, Start};
use crate::link::{Hello, LinkClient, LinkServer};
use crate::output::OutputLog;

/// Released output a primary hands to a new secondary with the initial sync.
pub const RETAINED_OUTPUT: u64 = 8 << 20;

/// Exit code of a node that was superseded by a newer generation (it destroyed its VM).
pub const EXIT_FENCED: i32 = 3;

/// A peer host.
#[derive(Clone, Debug)]
pub struct Peer {
    /// Host name (as in its certificate).
    pub name: String,
    /// Its replication link address.
    pub link: SocketAddr,
    /// Its heartbeat address.
    pub hb: SocketAddr,
}

impl std::str::FromStr for Peer {
    type Err = String;
    /// `NAME=LINK_ADDR,HB_ADDR`, e.g. `host-b=10.77.1.12:7000,10.77.2.12:7001`.
    fn from_str(s: &str) -> Result<Self, String> {
        let (name, addrs) = s
            .split_once('=')
            .ok_or_else(|| format!("peer {s:?}: expected NAME=LINK_ADDR,HB_ADDR"))?;
        let (link, hb) = addrs
            .split_once(',')
            .ok_or_else(|| format!("peer {s:?}: expected NAME=LINK_ADDR,HB_ADDR"))?;
        let parse = |a: &str, what: &str| {
            a.parse::<SocketAddr>()
                .map_err(|e| format!("peer {s:?}: {what} address {a:?}: {e}"))
        };
        Ok(Peer {
            name: name.to_owned(),
            link: parse(link, "link")?,
            hb: parse(hb, "heartbeat")?,
        })
    }
}

/// What a node runs with.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// This host's name.
    pub host: String,
    /// PKI directory (`ax-agent certs`).
    pub pki: PathBuf,
    /// The VM's name.
    pub vm: String,
    /// Guest program from the guest kit.
    pub guest: String,
    /// Guest arguments.
    pub guest_args: Vec<u64>,
    /// Guest memory in MiB.
    pub mem_mib: u64,
    /// Replication link listen address.
    pub link_listen: SocketAddr,
    /// Heartbeat address.
    pub hb_listen: SocketAddr,
    /// Output endpoint address (served while primary).
    pub output_listen: SocketAddr,
    /// The other hosts.
    pub peers: Vec<Peer>,
    /// The witness.
    pub witness: SocketAddr,
    /// Boot the VM here as its first primary.
    pub boot: bool,
    /// Epoch length.
    pub epoch: Duration,
    /// Heartbeat interval.
    pub hb_interval: Duration,
    /// Heartbeat timeout (dead after this much silence).
    pub hb_timeout: Duration,
    /// Record every output release here (for split-brain checks).
    pub release_journal: Option<PathBuf>,
}

/// Node errors.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// Setup failed.
    #[error("{0}")]
    Setup(String),
    /// The FT data path failed.
    #[error(transparent)]
    Ft(#[from] ft::FtError),
    /// The witness failed.
    #[error("witness: {0}")]
    Witness(#[from] WitnessError),
}

fn setup<E: std::fmt::Display>(what: &str) -> impl FnOnce(E) -> NodeError + '_ {
    move |e| NodeError::Setup(format!("{what}: {e}"))
}

/// Runs the node until its VM ends (exit code 0), it is fenced ([`EXIT_FENCED`]) or it fails.
pub async fn run(cfg: NodeConfig) -> Result<i32, NodeError> {
    let identity =
        TlsIdentity::load(&PkiPaths::in_dir(&cfg.pki, &cfg.host)).map_err(setup("PKI"))?;
    let server = LinkServer::bind(cfg.link_listen, &identity).map_err(setup("link listen"))?;
    let client = LinkClient::new(SocketAddr::new(cfg.link_listen.ip(), 0), &identity)
        .map_err(setup("link client"))?;
    let witness = WitnessClient::new(
        cfg.witness,
        ClientConfig {
            bind: Some(SocketAddr::new(cfg.hb_listen.ip(), 0)),
            ..ClientConfig::default()
        },
    );
    let node = Node {
        cfg,
        client,
        witness,
    };
    if node.cfg.boot {
        let vm = node.build_vm()?;
        return node.primary(vm, None, 0, Vec::new(), 0).await;
    }
    // Standby: wait for a primary to open a session, then follow it.
    loop {
        let Some(session) = server.accept().await else {
            return Err(NodeError::Setup("the link endpoint closed".into()));
        };
        let session = match session {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "refused a replication session");
                continue;
            }
        };
        match node.secondary(session).await? {
            Some((replica, known)) => {
                tracing::info!(host = %node.cfg.host, epoch = ?replica.epoch(), "promoting");
                let history_base = replica.output_base();
                let history = replica.output().to_vec();
                let mut vm = replica.restore().map_err(ft::FtError::from)?;
                vm.start().map_err(ft::FtError::from)?;
                return node
                    .primary(
                        vm,
                        Some(SyncConfig::default()),
                        known,
                        history,
                        history_base,
                    )
                    .await;
            }
            None => continue,
        }
    }
}

struct Node {
    cfg: NodeConfig,
    client: LinkClient,
    witness: WitnessClient,
}

impl Node {
    fn build_vm(&self) -> Result<Vm, NodeError> {
        let image = ax_guests::by_name(&self.cfg.guest)
            .ok_or_else(|| {
                NodeError::Setup(format!(
                    "unknown guest {:?} (have {:?})",
                    self.cfg.guest,
                    ax_guests::NAMES
                ))
            })?
            .to_vec();
        Vm::try_from(VmConfig {
            mem_size: self.cfg.mem_mib << 20,
            image,
            args: self.cfg.guest_args.clone(),
            ..VmConfig::default()
        })
        .map_err(setup("building the VM"))
    }

    fn heartbeat_with(
        &self,
        peer: &Peer,
    ) -> Result<(heartbeat::HeartbeatHandle, detector::DetectorHandle), NodeError> {
        let mut hb = HeartbeatConfig::new(
            self.cfg.host.clone(),
            heartbeat::new_incarnation(),
            peer.name.clone(),
            vec![PathConfig {
                local: self.cfg.hb_listen,
                peer: peer.hb,
            }],
        );
        hb.interval = self.cfg.hb_interval;
        hb.timeout = self.cfg.hb_timeout;
        let (handle, observations) = Heartbeat::bind(hb)
            .and_then(Heartbeat::start)
            .map_err(setup("heartbeat"))?;
        let det = detector::spawn(
            DetectorConfig {
                suspect_after: self.cfg.hb_timeout / 2,
                timeout: self.cfg.hb_timeout,
                paths: 1,
            },
            observations,
        )
        .map_err(setup("detector"))?;
        Ok((handle, det))
    }

    /// Follows a primary; returns the replica and the primary's generation when the primary died, or
    /// `None` when the session ended while the primary is alive (it will reconnect).
    async fn secondary(
        &self,
        session: crate::link::InboundSession,
    ) -> Result<Option<(Replica, u64)>, NodeError> {
        let hello = session.hello.clone();
        let peer = self
            .cfg
            .peers
            .iter()
            .find(|p| p.name == hello.host)
            .cloned()
            .ok_or_else(|| NodeError::Setup(format!("session from unknown host {}", hello.host)))?;
        tracing::info!(primary = %peer.name, vm = %hello.vm, "following as secondary");
        let (_hb, mut det) = self.heartbeat_with(&peer)?;
        let replica = Replica::new(hello.mem_size, None).map_err(setup("replica"))?;
        let (dead_tx, dead_rx) = tokio::sync::oneshot::channel::<()>();
        let watcher = tokio::spawn(async move {
            peer_dead(&mut det).await;
            let _ = dead_tx.send(());
            true
        });
        let (replica, ended) = ft::run_secondary_until(session, replica, async {
            let _ = dead_rx.await;
        })
        .await;
        tracing::info!(?ended, epoch = ?replica.epoch(), "replication session ended");
        let dead = if watcher.is_finished() {
            watcher.await.unwrap_or(false)
        } else {
            // The session ended first: give the detector its timeout to decide.
            match tokio::time::timeout(self.cfg.hb_timeout * 3, watcher).await {
                Ok(r) => r.unwrap_or(false),
                Err(_) => false,
            }
        };
        if !dead || !replica.is_restorable() {
            return Ok(None);
        }
        // Take over: a newer generation, granted once the old primary's lease has run out.
        let grant = loop {
            match self
                .witness
                .acquire(&hello.vm, &self.cfg.host, hello.generation)
                .await
            {
                Ok(g) => break g,
                Err(WitnessError::Denied { .. }) | Err(WitnessError::Unreachable { .. }) => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(e) => return Err(e.into()),
            }
        };
        tracing::info!(generation = grant.generation, "granted the output right");
        Ok(Some((replica, grant.generation)))
    }

    /// Runs the VM as primary: holds the lease, serves output, protects the VM to a peer.
    /// Runs the VM as primary: holds the lease, serves output, protects the VM to a peer — and when that
    /// secondary is lost, runs solo under a fresh generation and protects it again to the next peer.
    /// `sync`: `None` to boot the VM (built, not started), `Some` to protect a running VM by initial sync.
    async fn primary(
        &self,
        vm: Vm,
        sync: Option<SyncConfig>,
        known: u64,
        history: Vec<u8>,
        history_base: u64,
    ) -> Result<i32, NodeError> {
        let vm_name = self.cfg.vm.clone();
        let grant = self
            .witness
            .acquire(&vm_name, &self.cfg.host, known)
            .await?;
        let generation = Arc::new(AtomicU64::new(grant.generation));
        let lease = Arc::new(Lease::default());
        lease.extend(grant.valid_until);
        let fenced = Arc::new(tokio::sync::Notify::new());
        // Renew at a quarter of the lease, always for the current generation.
        let renew = {
            let (lease, fenced, generation) = (
                Arc::clone(&lease),
                Arc::clone(&fenced),
                Arc::clone(&generation),
            );
            let period = grant.lease / 4;
            let witness = WitnessClient::new(
                self.cfg.witness,
                ClientConfig {
                    bind: Some(SocketAddr::new(self.cfg.hb_listen.ip(), 0)),
                    ..ClientConfig::default()
                },
            );
            let (vm, host) = (vm_name.clone(), self.cfg.host.clone());
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(period).await;
                    let g = generation.load(Ordering::Acquire);
                    match witness.renew(&vm, &host, g).await {
                        Ok(grant) => lease.extend(grant.valid_until),
                        Err(WitnessError::Superseded { .. })
                        | Err(WitnessError::NotHolder { .. })
                            if generation.load(Ordering::Acquire) == g =>
                        {
                            lease.revoke();
                            fenced.notify_one();
                            return;
                        }
                        Err(e) => tracing::warn!(error = %e, "lease renewal failed"),
                    }
                }
            })
        };
        let log = OutputLog::with_base(history_base, history);
        if let Some(path) = &self.cfg.release_journal {
            log.journal_to(path, &self.cfg.host, Arc::clone(&generation))
                .map_err(setup("release journal"))?;
        }
        let listener = TcpListener::bind(self.cfg.output_listen)
            .await
            .map_err(setup("output listen"))?;
        let serve = tokio::spawn(Arc::clone(&log).serve(listener));
        tracing::info!(host = %self.cfg.host, generation = grant.generation, "primary");
        let stop_all = |code: i32| {
            serve.abort();
            renew.abort();
            Ok(code)
        };

        let mut vm = Some(vm);
        let mut sync = sync;
        loop {
            // Find a secondary. A VM that already runs keeps running meanwhile, its output released
            // directly under the lease (solo); a VM that is to boot waits.
            let drain = match (&sync, vm.take()) {
                (Some(_), Some(v)) => Some(ft::SoloOutput::start(
                    v,
                    Arc::clone(&log),
                    Some(Arc::clone(&lease)),
                )?),
                (_, v) => {
                    vm = v;
                    None
                }
            };
            let (session, peer) = loop {
                if let Some(found) = self.connect_any(generation.load(Ordering::Acquire)).await {
                    break found;
                }
                tokio::select! {
                    () = fenced.notified() => {
                        drop(drain);
                        return stop_all(EXIT_FENCED);
                    }
                    () = tokio::time::sleep(Duration::from_millis(100)) => {}
                }
            };
            let running = match (drain, vm.take()) {
                (Some(d), _) => d.into_vm()?,
                (None, Some(v)) => v,
                (None, None) => return Err(NodeError::Setup("no VM".into())),
            };
            // The sync carries the retained released output (at most the last 8 MiB), so the new
            // secondary can serve clients that lag behind; nothing is released during the sync itself.
            let start = match sync.clone() {
                None => Start::Boot,
                Some(cfg) => {
                    let keep = log.len().saturating_sub(RETAINED_OUTPUT).max(log.base());
                    Start::Sync(cfg, log.read_from(keep).unwrap_or_default())
                }
            };
            let (hb, mut det) = self.heartbeat_with(&peer)?;
            let config = PrimaryConfig {
                epochs: EpochConfig {
                    interval: self.cfg.epoch,
                    ..EpochConfig::default()
                },
                lease: Some(Arc::clone(&lease)),
                ..PrimaryConfig::default()
            };
            let mut primary =
                Primary::start_with(running, start, config, session, Arc::clone(&log))?;
            tracing::info!(secondary = %peer.name, "protected");
            tokio::select! {
                () = fenced.notified() => {
                    tracing::error!("superseded by a newer generation: destroying the VM");
                    primary.kill();
                    return stop_all(EXIT_FENCED);
                }
                () = primary.wait_link_lost() => {}
                () = peer_dead(&mut det) => {
                    tracing::warn!(secondary = %peer.name, "the failure detector declared the secondary dead");
                }
            }
            drop((hb, det));
            if primary.guest_ended() {
                tracing::info!("the guest ended");
                let _ = primary.stop();
                return stop_all(0);
            }
            // The secondary is gone. Keep the VM; move to a fresh generation so that the stale replica
            // can never be promoted over what this host now releases alone, then release what was held.
            let (v, held) = primary.stop()?;
            tracing::warn!(secondary = %peer.name, held = held.len(), "secondary lost: running solo");
            loop {
                let g = generation.load(Ordering::Acquire);
                match self.witness.acquire(&vm_name, &self.cfg.host, g).await {
                    Ok(grant) => {
                        generation.store(grant.generation, Ordering::Release);
                        lease.extend(grant.valid_until);
                        tracing::info!(
                            generation = grant.generation,
                            "solo under a fresh generation"
                        );
                        break;
                    }
                    Err(WitnessError::Superseded { .. }) | Err(WitnessError::NotHolder { .. }) => {
                        tracing::error!("superseded while solo: destroying the VM");
                        drop(v);
                        return stop_all(EXIT_FENCED);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "witness unreachable: output stays held");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
            while !held.is_empty() && !lease.valid() {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            log.release(&held);
            vm = Some(v);
            sync = Some(SyncConfig::default());
        }
    }

    async fn connect_any(&self, generation: u64) -> Option<(crate::link::OutboundSession, Peer)> {
        for peer in &self.cfg.peers {
            let hello = Hello::new(
                &self.cfg.vm,
                &self.cfg.host,
                self.cfg.mem_mib << 20,
                0,
                generation,
            );
            let attempt = tokio::time::timeout(
                Duration::from_millis(300),
                self.client.connect(peer.link, &peer.name, &hello),
            )
            .await;
            if let Ok(Ok(session)) = attempt {
                return Some((session, peer.clone()));
            }
        }
        None
    }
}

/// Resolves when the detector declares the peer dead (or restarted: its previous life is over).
async fn peer_dead(det: &mut detector::DetectorHandle) {
    while let Some(ev) = det.events.recv().await {
        if matches!(ev, PeerEvent::Dead { .. } | PeerEvent::Restarted { .. }) {
            return;
        }
    }
    std::future::pending::<()>().await;
}
