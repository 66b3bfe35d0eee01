//! An FT node: the agent process of one host for one FT VM (`ax-agent ft-node`) — a driver of
//! [`failover::role::RoleMachine`] (protocol v2, docs/DESIGN.md §3.6).
//!
//! The machine decides; the node does the I/O and feeds the results back. Every node listens for
//! replication sessions. A node started with `--boot` claims the VM's first generation at the
//! coordinator (the witness or etcd: [`crate::coord`]), boots the VM and protects it to the first peer
//! that accepts a session. A node that accepts a session becomes that VM's secondary: the machine
//! acknowledges each staged epoch; when the detector declares the primary dead (after the session is
//! over, so no acknowledgement can follow the decision) it claims the next generation by
//! compare-and-set, and only if it wins does the node restore the VM from its last acknowledged epoch,
//! serve the output endpoint, and protect the VM again to another peer by a live initial sync.
//!
//! **Release rule, no clock.** In steady state a protected primary releases an epoch's output when its
//! secondary acknowledged it — no coordinator request, no lease. When the secondary is lost (detector,
//! session ended, an epoch unacknowledged for `RoleConfig::ack_timeout`) the machine claims a fresh
//! generation first; it releases what it holds only if it wins, and if it loses, a secondary promoted:
//! the node destroys its VM (fenced) and stays a standby. A standby refuses sessions of generations
//! older than one it recorded, and records every generation it wins or learns before acting on it
//! (`<state-dir>/<vm>.generation`), so a coordinator that lost its state re-learns from the hosts'
//! claims and never hands out a generation below one already won.
//!
//! A secondary that acknowledged an epoch and then cannot commit it (after retries, see
//! [`ft::run_secondary_with`]) leaves the pair with an ERROR and never promotes that replica. A
//! secondary whose primary is declared dead before it held a consistent copy (a double failure, e.g.
//! the primary killed during the initial sync of a re-protection) logs an ERROR saying the VM is lost
//! and what is left on each host, and reports it to its controller (`NodeControl::set_lost`, the
//! worker's status, a VM event in the daemon).
//!
//! Heartbeats run on one path, or two with `--hb2` and peers that name a second address: a peer is
//! dead only when every path is silent. A `--fence-cmd` runs against the old primary while the claim
//! is decided; with `--fence-required` no promotion happens without it succeeding.
//!
//! A VM booted with `--disk-mib` has a raw disk under `--state-dir`; each replication session gives the
//! secondary its own replica disk there, which becomes the VM's disk if it promotes.
//!
//! Blocking joins (the epoch thread, the solo output thread) run under `block_in_place`, never on a
//! bare async worker: the link tasks they may wait for need the workers.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use failover::coordinator::CoordError;
use failover::detector;
use failover::role::{Action, Event, Mode, RoleConfig};
use statepoint::{EpochConfig, Replica, SyncConfig, Vm, VmConfig};
use tokio::net::TcpListener;
use tokio::time::Instant;

use crate::certs::{PkiPaths, TlsIdentity};
use crate::control::{GuestEnd, NodeControl, Role};
use crate::coord::CoordTarget;
use crate::driver::{peer_dead, Decider, Driver, DriverConfig};
use crate::ft::{self, Primary, PrimaryConfig, Start};
use crate::link::{Admission, Hello, HelloReply, LinkClient, LinkServer, HELLO_TIMEOUT};
use crate::output::OutputLog;

/// Released output a primary hands to a new secondary with the initial sync: all it keeps
/// ([`crate::output::DEFAULT_TAIL`]).
pub const RETAINED_OUTPUT: u64 = crate::output::DEFAULT_TAIL as u64;

/// Exit code of a node that was superseded by a newer generation (it destroyed its VM) when its
/// controller asks it to end then (`NodeControl::exit_when_fenced`); otherwise it stays a standby.
pub const EXIT_FENCED: i32 = 3;

/// A peer host of an FT node: the one peer type (the CLI's `--peer`, the worker spec, the control
/// socket's `protect` request).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Peer {
    /// Host name (as in its certificate).
    pub name: String,
    /// Its replication link address.
    pub link: SocketAddr,
    /// Its heartbeat address.
    pub hb: SocketAddr,
    /// Its second heartbeat address (a second, independent path), if it has one.
    #[serde(default)]
    pub hb2: Option<SocketAddr>,
}

impl std::str::FromStr for Peer {
    type Err = String;
    /// `NAME=LINK_ADDR,HB_ADDR[,HB2_ADDR]`, e.g. `host-b=10.77.1.12:7000,10.77.2.12:7001`.
    fn from_str(s: &str) -> Result<Self, String> {
        let shape = || format!("peer {s:?}: expected NAME=LINK_ADDR,HB_ADDR[,HB2_ADDR]");
        let (name, addrs) = s.split_once('=').ok_or_else(shape)?;
        if name.is_empty() {
            return Err(shape());
        }
        let addrs: Vec<&str> = addrs.split(',').collect();
        if !(2..=3).contains(&addrs.len()) {
            return Err(shape());
        }
        let parse = |a: &str, what: &str| {
            a.parse::<SocketAddr>()
                .map_err(|e| format!("peer {s:?}: {what} address {a:?}: {e}"))
        };
        Ok(Peer {
            name: name.to_owned(),
            link: parse(addrs[0], "link")?,
            hb: parse(addrs[1], "heartbeat")?,
            hb2: addrs
                .get(2)
                .map(|a| parse(a, "second heartbeat"))
                .transpose()?,
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
    /// Second heartbeat path's local address (used with peers that have one).
    pub hb2_listen: Option<SocketAddr>,
    /// Output endpoint address (served while primary).
    pub output_listen: SocketAddr,
    /// The other hosts.
    pub peers: Vec<Peer>,
    /// Where the VM's generations are kept (the witness or etcd).
    pub coordinator: CoordTarget,
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
    /// Disk size in MiB of a VM booted here (0: no disk).
    pub disk_mib: u64,
    /// Where disk images live (the VM's own, and replicas' copies).
    pub state_dir: PathBuf,
    /// Fencing of a primary declared dead, before this host promotes.
    pub fence: Option<FenceConfig>,
}

impl NodeConfig {
    /// What the node's decision driver needs.
    pub fn driver_config(&self) -> DriverConfig {
        DriverConfig {
            host: self.host.clone(),
            vm: self.vm.clone(),
            coordinator: self.coordinator.clone(),
            hb_listen: self.hb_listen,
            hb2_listen: self.hb2_listen,
            hb_interval: self.hb_interval,
            hb_timeout: self.hb_timeout,
            state_dir: self.state_dir.clone(),
        }
    }
}

/// The fence an FT node runs against an old primary while it claims the VM: a shell command line (the
/// agent's `[fence] command`, `ft-node --fence-cmd`) with `{host}` standing for the host to fence, run by
/// the one fence runner ([`failover::fence::Fencer::shell`]: the host name is the script's `"$1"` and
/// `$AX_FENCE_HOST`, never pasted into it); success is exit code 0 within the timeout.
#[derive(Clone, Debug)]
pub struct FenceConfig {
    /// The command line.
    pub command: String,
    /// How long it may take.
    pub timeout: Duration,
    /// Never promote without a successful fence (retry it every second). Without this, a failed fence
    /// is reported and the promotion goes on: output needs no fence (the old primary cannot release
    /// anything the promoted replica lacks, docs/DESIGN.md §3.6); the fence is for its devices.
    pub required: bool,
}

impl FenceConfig {
    /// Runs the command for `host`; `Ok` when it exited 0 in time.
    pub async fn fence(&self, host: &str) -> Result<(), String> {
        failover::fence::Fencer::shell(&self.command, self.timeout)
            .fence(host)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
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
    /// The coordinator client could not be set up.
    #[error("coordinator: {0}")]
    Coordinator(#[from] CoordError),
    /// The role machine refused its configuration.
    #[error(transparent)]
    Role(#[from] failover::role::RoleError),
}

fn setup<E: std::fmt::Display>(what: &str) -> impl FnOnce(E) -> NodeError + '_ {
    move |e| NodeError::Setup(format!("{what}: {e}"))
}

/// Runs the node until its VM ends (exit code 0) or it fails. A superseded node stays a standby.
pub async fn run(cfg: NodeConfig) -> Result<i32, NodeError> {
    let ctl = Arc::new(NodeControl::new(cfg.peers.clone()));
    run_controlled(cfg, ctl).await
}

/// [`run`] steered by a controller (the agent daemon's VM worker): the peers are `ctl`'s, which may
/// change while the node runs; with `ctl.boot_solo` the VM boots at once and runs solo until a peer is
/// given; roles and counters are published in `ctl`. `cfg.peers` is not used.
pub async fn run_controlled(cfg: NodeConfig, ctl: Arc<NodeControl>) -> Result<i32, NodeError> {
    let identity =
        TlsIdentity::load(&PkiPaths::in_dir(&cfg.pki, &cfg.host)).map_err(setup("PKI"))?;
    let server = LinkServer::bind_with(
        cfg.link_listen,
        &identity,
        peers_only(Arc::clone(&ctl)),
        HELLO_TIMEOUT,
    )
    .map_err(setup("link listen"))?;
    let client = LinkClient::new(SocketAddr::new(cfg.link_listen.ip(), 0), &identity)
        .map_err(setup("link client"))?;
    let boots = ctl.boot_solo || cfg.boot;
    let drv = Driver::new(
        cfg.driver_config(),
        &identity,
        Arc::clone(&ctl),
        boots,
        RoleConfig::default(),
    )?;
    let node = Node { cfg, client, drv };
    if boots {
        let mut vm = node.build_vm()?;
        // A VM booted by its controller runs solo at once; one booted with `--boot` waits for its
        // first secondary (epoch 0 is its boot image).
        let running = node.ctl.boot_solo;
        if running {
            vm.start().map_err(ft::FtError::from)?;
        }
        let disk_bytes = node.cfg.disk_mib << 20;
        let first = node.d.start();
        let code = node
            .primary(vm, running, Vec::new(), 0, disk_bytes, first)
            .await?;
        if !node.stays_after(code) {
            return Ok(code);
        }
    }
    // Standby: wait for a primary to open a session, then follow it.
    loop {
        node.ctl.set_role(Role::Standby);
        let Some(session) = server.accept().await else {
            return Err(NodeError::Setup("the link endpoint closed".into()));
        };
        match node.secondary(session).await? {
            SecondaryEnd::GuestEnded(end) => {
                tracing::info!(end = %end.describe(), "the VM ended on its primary: not promoting");
                node.ctl.set_guest_end(end);
                return Ok(0);
            }
            SecondaryEnd::Rejoin => continue,
            SecondaryEnd::Promote(promotion) => {
                let Promotion {
                    replica,
                    disk_bytes,
                    disk,
                } = *promotion;
                tracing::info!(host = %node.cfg.host, epoch = ?replica.epoch(), generation = node.d.generation(), "promoting");
                let history_base = replica.output_base();
                let history = replica.output().to_vec();
                let t = std::time::Instant::now();
                let mut vm = replica.restore().map_err(ft::FtError::from)?;
                vm.start().map_err(ft::FtError::from)?;
                tracing::info!(ms = t.elapsed().as_secs_f64() * 1e3, "restored and resumed");
                // The replica's disk is the VM's disk now: under the VM's own name, so that a
                // restart in place on this host continues from it (the VM keeps its open file).
                if let Some(d) = &disk {
                    let own = node.disk_path();
                    if let Err(e) = std::fs::rename(d, &own) {
                        tracing::warn!(error = %e, from = %d.display(), to = %own.display(), "the promoted disk keeps its replica name");
                    }
                }
                let code = node
                    .primary(vm, true, history, history_base, disk_bytes, Vec::new())
                    .await?;
                if !node.stays_after(code) {
                    return Ok(code);
                }
            }
        }
    }
}

/// Admits the hellos of the hosts among `ctl`'s peers (as they are when the hello arrives); any other
/// certified host is refused on the link, never fatal.
fn peers_only(ctl: Arc<NodeControl>) -> Admission {
    Arc::new(move |hello: &Hello| {
        if ctl.peers().iter().any(|p| p.name == hello.host) {
            Ok(())
        } else {
            Err(format!(
                "host {:?} is not among this host's peers",
                hello.host
            ))
        }
    })
}

/// How following a primary ended.
enum SecondaryEnd {
    /// The primary died and this host won the VM's next generation: take the VM over.
    Promote(Box<Promotion>),
    /// The session ended while the primary lives on (or another host holds the VM): wait for the next.
    Rejoin,
    /// The last committed epoch shows the guest ended there: the VM is over, nothing to take over.
    GuestEnded(GuestEnd),
}

/// What a secondary hands over when it takes the VM: the replica, the disk size and the replica's
/// disk image.
struct Promotion {
    replica: Replica,
    disk_bytes: u64,
    disk: Option<PathBuf>,
}

/// How a protected session's data path asks the role machine (epochs shifted into the machine's
/// numbering, which runs on across sessions); actions other than releases go to the node's loop.
struct SessionRule {
    d: Decider,
    base: u64,
    generation: u64,
    others: tokio::sync::mpsc::UnboundedSender<Action>,
}

impl SessionRule {
    fn forward(&self, acts: Vec<Action>) -> Option<u64> {
        let mut through = None;
        for a in acts {
            match a {
                Action::Release { epoch, .. } => {
                    through = through.max(epoch.checked_sub(self.base));
                }
                other => {
                    let _ = self.others.send(other);
                }
            }
        }
        through
    }
}

impl ft::ReleaseRule for SessionRule {
    fn captured(&self, epoch: u64) {
        let acts = self.d.handle(Event::EpochCaptured {
            epoch: self.base + epoch,
        });
        if let Some(e) = self.forward(acts) {
            // Nothing held can be released from here (the epoch thread holds its output after this
            // call); the node's loop releases it.
            let _ = self.others.send(Action::Release {
                generation: self.generation,
                epoch: self.base + e,
            });
        }
    }

    fn acked(&self, epoch: u64) -> Option<u64> {
        let acts = self.d.handle(Event::ReplicaAcked {
            generation: self.generation,
            epoch: self.base + epoch,
        });
        self.forward(acts)
    }
}

struct Node {
    cfg: NodeConfig,
    client: LinkClient,
    /// The decisions: the role machine and the coordinator, heartbeats and records around it.
    drv: Driver,
}

impl std::ops::Deref for Node {
    type Target = Driver;
    fn deref(&self) -> &Driver {
        &self.drv
    }
}

impl Node {
    /// Whether the node goes on as a standby after its primary role ended with `code`: a host that was
    /// superseded ([`EXIT_FENCED`]: its copy of the VM is destroyed, a newer generation runs elsewhere)
    /// is still a healthy host, so it waits for the next session — unless its controller wants the exit
    /// (`NodeControl::exit_when_fenced`: the daemon makes it a standby its own way).
    fn stays_after(&self, code: i32) -> bool {
        if code != EXIT_FENCED || self.ctl.exit_when_fenced {
            return false;
        }
        tracing::warn!(
            host = %self.cfg.host,
            vm = %self.cfg.vm,
            "superseded: this host's copy of the VM is destroyed and a newer generation runs elsewhere; staying available as a standby"
        );
        self.ctl.set_stats(None);
        true
    }

    fn build_vm(&self) -> Result<Vm, NodeError> {
        let image = crate::guest::image(&self.cfg.guest).map_err(NodeError::Setup)?;
        let disk = if self.cfg.disk_mib > 0 {
            // The VM's disk image: all-zero the first time (like the replica a Boot session
            // creates), kept as it is when the VM boots again here (a restart in place, or after
            // a failover promoted it here: see `Promotion`).
            let path = self.disk_path();
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .map_err(setup("opening the disk image"))?;
            let want = self.cfg.disk_mib << 20;
            let have = f.metadata().map_err(setup("reading the disk image"))?.len();
            if have != want {
                if have != 0 {
                    return Err(NodeError::Setup(format!(
                        "disk image {} is {have} bytes, the VM's disk is {want}",
                        path.display()
                    )));
                }
                f.set_len(want).map_err(setup("sizing the disk image"))?;
            }
            Some(path)
        } else {
            None
        };
        Vm::try_from(VmConfig {
            mem_size: self.cfg.mem_mib << 20,
            image,
            args: self.cfg.guest_args.clone(),
            disk,
            vcpus: self.ctl.vcpus,
            ..VmConfig::default()
        })
        .map_err(setup("building the VM"))
    }

    /// The VM's console log in the state dir (see [`OutputLog::console_to`]).
    fn console_path(&self) -> PathBuf {
        self.cfg.state_dir.join("console.log")
    }

    /// The VM's own disk image in the state dir.
    fn disk_path(&self) -> PathBuf {
        self.cfg.state_dir.join(format!("{}.disk", self.cfg.vm))
    }

    /// A fresh all-zero disk image for a replica of a session (its own file per session).
    fn replica_disk(&self, hello: &Hello) -> Result<Option<PathBuf>, NodeError> {
        if hello.disk_bytes == 0 {
            return Ok(None);
        }
        let path = self.cfg.state_dir.join(format!(
            "{}.replica-{}-{}.disk",
            self.cfg.vm, hello.host, hello.generation
        ));
        let f = std::fs::File::create(&path).map_err(setup("creating the replica disk"))?;
        f.set_len(hello.disk_bytes)
            .map_err(setup("sizing the replica disk"))?;
        Ok(Some(path))
    }

    /// Follows a primary. The machine decides whether to follow it (a session of a generation older
    /// than one this host knows is refused), acknowledges each staged epoch, and — once the session is
    /// over and the detector declared the primary dead — claims the next generation; this host
    /// promotes only if it wins.
    async fn secondary(
        &self,
        mut session: crate::link::InboundSession,
    ) -> Result<SecondaryEnd, NodeError> {
        let hello = session.hello.clone();
        let refuse = |reason: String| HelloReply {
            accepted: false,
            reason,
        };
        // The link admitted the host (`peers_only`), but the peers may have changed since.
        let Some(peer) = self.ctl.peers().into_iter().find(|p| p.name == hello.host) else {
            // A certified host that is not this standby's primary: refused, never fatal.
            tracing::warn!(host = %hello.host, vm = %hello.vm, "refused a session from a host that is not among the peers");
            let why = format!("host {:?} is not among this host's peers", hello.host);
            let _ = session.reply(&refuse(why)).await;
            return Ok(SecondaryEnd::Rejoin);
        };
        let offered = self.d.handle(Event::SessionOffered {
            generation: hello.generation,
        });
        if !offered
            .iter()
            .any(|a| matches!(a, Action::AcceptSession { .. }))
        {
            let known = self.d.lock().known();
            tracing::warn!(host = %hello.host, generation = hello.generation, known, "refused a session of a stale generation");
            let why = format!(
                "generation {} is older than generation {known} known here",
                hello.generation
            );
            let _ = session.reply(&refuse(why)).await;
            return Ok(SecondaryEnd::Rejoin);
        }
        // The replica is sized by the hello: a size this host cannot hold refuses the session, it
        // does not end the standby.
        let replica = self.replica_disk(&hello).and_then(|disk| {
            Replica::new(hello.mem_size, disk.as_deref())
                .map(|r| (r, disk.clone()))
                .map_err(|e| {
                    if let Some(d) = &disk {
                        let _ = std::fs::remove_file(d);
                    }
                    setup("replica")(e)
                })
        });
        let (replica, disk) = match replica {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(host = %hello.host, vm = %hello.vm, mem_size = hello.mem_size, disk_bytes = hello.disk_bytes, error = %e, "refused a session: no replica for its hello");
                self.d.handle(Event::ReplicaDiscarded);
                let _ = session.reply(&refuse(e.to_string())).await;
                return Ok(SecondaryEnd::Rejoin);
            }
        };
        let discard = |disk: &Option<PathBuf>| {
            self.d.handle(Event::ReplicaDiscarded);
            if let Some(d) = disk {
                let _ = std::fs::remove_file(d);
            }
        };
        tracing::info!(primary = %peer.name, vm = %hello.vm, generation = hello.generation, "following as secondary");
        self.ctl.set_role(Role::Secondary {
            primary: peer.name.clone(),
        });
        let (hb, mut det) = self.heartbeat_with(&peer).await?;
        self.d.advertise(&hb);
        let (dead_tx, dead_rx) = tokio::sync::oneshot::channel::<()>();
        let watcher = tokio::spawn(async move {
            peer_dead(&mut det).await;
            let _ = dead_tx.send(());
            true
        });
        let generation = hello.generation;
        let mut synced = false;
        let (replica, ended) = ft::run_secondary_with(
            session,
            replica,
            async {
                let _ = dead_rx.await;
            },
            |epoch, restorable| {
                let acts = self.d.handle(Event::FrameStaged {
                    generation,
                    epoch,
                    restorable,
                });
                if restorable && !synced {
                    synced = true;
                    self.d.advertise(&hb);
                }
                acts.iter().any(|a| matches!(a, Action::Ack { .. }))
            },
        )
        .await;
        // From here on nothing is acknowledged: the session is over.
        self.d.handle(Event::LinkLost);
        tracing::info!(?ended, epoch = ?replica.epoch(), "replication session ended");
        // An acknowledged epoch this replica could not commit (ft logged it as an error and left the
        // pair): the replica lacks output the primary may have released, and its disk may hold part of
        // that epoch. It is never promoted, whatever happens to the primary; this host stays a standby.
        if let Err(ft::FtError::CommitFailed { epoch, .. }) = &ended {
            watcher.abort();
            hb.shutdown().await;
            tracing::error!(vm = %hello.vm, primary = %peer.name, epoch, "left the pair: the replica is discarded and never promoted; waiting as a standby");
            drop(replica);
            discard(&disk);
            return Ok(SecondaryEnd::Rejoin);
        }
        // The watcher owns the detector; the heartbeat sockets close now, whatever happens next.
        let dead = if watcher.is_finished() {
            watcher.await.unwrap_or(false)
        } else {
            // The session ended first: give the detector its timeout to decide.
            match tokio::time::timeout(self.cfg.hb_timeout * 3, watcher).await {
                Ok(r) => r.unwrap_or(false),
                Err(_) => false,
            }
        };
        hb.shutdown().await;
        // The guest ended in the last committed epoch: whatever happened to the primary since, the VM
        // is over. It is never resurrected here; its committed output (everything it printed, through
        // its last epoch) goes to this host's console log, so it can be read here too.
        if let Some(exit) = replica.state().and_then(|st| st.exit.clone()) {
            let end = GuestEnd::from_exit(&exit, replica.epoch());
            let log = OutputLog::with_base(replica.output_base(), replica.output().to_vec());
            if let Err(e) = log.console_to(&self.console_path()) {
                tracing::warn!(error = %e, "console log");
            }
            drop(replica);
            discard(&disk);
            return Ok(SecondaryEnd::GuestEnded(end));
        }
        if dead && !replica.is_restorable() {
            // The primary died while this host held no consistent copy (it was joining through an
            // initial sync): a double failure, the VM is lost unless its primary is alive after all.
            let what = loss_report(
                &hello.vm,
                &peer.name,
                &self.cfg.host,
                replica.epoch(),
                hello.disk_bytes,
            );
            tracing::error!(vm = %hello.vm, primary = %peer.name, epoch = ?replica.epoch(), "{what}");
            self.ctl.set_lost(what);
        }
        if !dead || !replica.is_restorable() {
            drop(replica);
            discard(&disk);
            return Ok(SecondaryEnd::Rejoin);
        }
        // The decision: the machine claims the next generation (the session is over, so no
        // acknowledgement can follow it).
        let decided = self.d.handle(Event::PeerDead);
        // Fence the old primary meanwhile (its disk and devices; output needs no fence: it cannot
        // release anything this replica lacks).
        let fencing = self.start_fence(self.cfg.fence.clone(), peer.name.clone());
        let outcome = self.settle(decided).await;
        if outcome.iter().any(|a| matches!(a, Action::Promote { .. })) {
            if replica
                .epoch()
                .is_some_and(|e| self.d.lock().released().is_some_and(|m| m != e))
            {
                tracing::warn!(replica = ?replica.epoch(), "the replica's epoch differs from the machine's");
            }
            if let Some(f) = fencing {
                let _ = f.await;
            }
            return Ok(SecondaryEnd::Promote(Box::new(Promotion {
                replica,
                disk_bytes: hello.disk_bytes,
                disk,
            })));
        }
        // The primary moved on without this replica (it went solo under a newer generation, or
        // another host took over): this copy is stale. Not a reason to exit: stay a standby.
        tracing::warn!(
            generation,
            "not promoting a stale replica: waiting as a standby"
        );
        if let Some(f) = fencing {
            f.abort();
        }
        drop(replica);
        if let Some(d) = &disk {
            let _ = std::fs::remove_file(d);
        }
        Ok(SecondaryEnd::Rejoin)
    }

    /// Runs the VM as primary: serves output and protects the VM to a peer — and when that secondary is
    /// lost, claims a fresh generation, runs solo and protects it again to the next peer. `first`: the
    /// machine's pending actions (a boot's claim; nothing after a promotion, which is already won).
    /// `running`: the VM runs (restored, or booted solo); otherwise it boots with its first secondary.
    async fn primary(
        &self,
        vm: Vm,
        running: bool,
        history: Vec<u8>,
        history_base: u64,
        disk_bytes: u64,
        first: Vec<Action>,
    ) -> Result<i32, NodeError> {
        let t = std::time::Instant::now();
        let decided = self.settle(first).await;
        if let Some(current) = fenced_at(&decided) {
            let known = self.d.lock().known();
            if current < known {
                tracing::error!(
                    current,
                    known,
                    coordinator = %self.cfg.coordinator,
                    "the coordinator's generation is older than the one this host recorded: it lost its state or is another cluster's; not running the VM (restore its state, or restart the witness without --init so that it re-learns from the hosts)"
                );
            } else {
                tracing::error!(
                    current,
                    "another host holds the VM at a newer generation: not running it here"
                );
            }
            drop(vm);
            return Ok(EXIT_FENCED);
        }
        let generation = Arc::new(AtomicU64::new(self.d.generation()));
        tracing::info!(
            ms = t.elapsed().as_secs_f64() * 1e3,
            generation = self.d.generation(),
            "holding the output right"
        );
        let fresh_boot = history.is_empty() && history_base == 0;
        let log = OutputLog::with_base(history_base, history);
        if let Some(path) = &self.cfg.release_journal {
            log.journal_to(path, &self.cfg.host, Arc::clone(&generation))
                .map_err(setup("release journal"))?;
        }
        let listener = TcpListener::bind(self.cfg.output_listen)
            .await
            .map_err(setup("output listen"))?;
        // The console log: the released stream, readable once the VM has ended. A previous boot's is
        // kept beside it.
        let console = self.console_path();
        if fresh_boot && console.exists() {
            let _ = std::fs::rename(&console, console.with_extension("log.1"));
        }
        if let Err(e) = log.console_to(&console) {
            tracing::warn!(error = %e, path = %console.display(), "console log");
        }
        let serve = tokio::spawn(Arc::clone(&log).serve(listener));
        self.ctl
            .set_primary(Arc::clone(&log), Arc::clone(&generation));
        self.ctl.set_role(Role::Solo);
        self.ctl.set_disk(vm.disk_handle());
        tracing::info!(host = %self.cfg.host, generation = self.d.generation(), "primary");
        let stop_all = |code: i32| {
            serve.abort();
            Ok(code)
        };

        let mut vm = Some(vm);
        let mut running = running;
        loop {
            // Solo: no replica of this generation exists (it was won for that), so a running VM's
            // output leaves as it is produced. A VM that is to boot waits for its first secondary.
            let mut drain = match (running, vm.take()) {
                (true, Some(v)) => Some(ft::SoloOutput::start(v, Arc::clone(&log))?),
                (_, v) => {
                    vm = v;
                    None
                }
            };
            let (session, peer) = loop {
                // A guest that ends while solo: its output is out; the VM is over, which is a VM
                // event, not a reason to fail.
                if drain.as_ref().is_some_and(ft::SoloOutput::guest_ended) {
                    if let Some(d) = drain.take() {
                        let v = tokio::task::block_in_place(|| d.into_vm())?;
                        if let Some(exit) = v.exit() {
                            let end = GuestEnd::from_exit(&exit, None);
                            tracing::info!(end = %end.describe(), "the guest ended");
                            self.ctl.set_guest_end(end);
                        }
                    }
                    return stop_all(0);
                }
                if let Some(found) = self
                    .connect_any(generation.load(Ordering::Acquire), disk_bytes)
                    .await
                {
                    break found;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            };
            // A replica of this generation may exist from now on: releases follow acknowledgements.
            self.d.handle(Event::SessionOpened);
            let running_vm = match (drain, vm.take()) {
                // Joins the output thread: everything it took is released before the sync starts, so
                // the sync's history holds it.
                (Some(d), _) => tokio::task::block_in_place(|| d.into_vm())?,
                (None, Some(v)) => v,
                (None, None) => return Err(NodeError::Setup("no VM".into())),
            };
            // The sync carries the retained released output (at most the last 8 MiB), so the new
            // secondary can serve clients that lag behind; nothing is released during the sync itself.
            let start = if running {
                let keep = log.len().saturating_sub(RETAINED_OUTPUT).max(log.base());
                Start::Sync(
                    SyncConfig::default(),
                    log.read_from(keep).unwrap_or_default(),
                )
            } else {
                Start::Boot
            };
            let (hb, mut det) = self.heartbeat_with(&peer).await?;
            self.d.advertise(&hb);
            let (others_tx, mut others) = tokio::sync::mpsc::unbounded_channel();
            let base = self.d.next_base();
            let rule = Arc::new(SessionRule {
                d: self.d.clone(),
                base,
                generation: generation.load(Ordering::Acquire),
                others: others_tx,
            });
            let config = PrimaryConfig {
                epochs: EpochConfig {
                    interval: self.cfg.epoch,
                    ..EpochConfig::default()
                },
                release: Some(rule),
                ..PrimaryConfig::default()
            };
            let mut primary =
                Primary::start_with(running_vm, start, config, session, Arc::clone(&log))?;
            tracing::info!(secondary = %peer.name, "protected");
            self.ctl.set_stats(Some(Arc::clone(&primary.stats)));
            self.ctl.set_role(Role::Protected {
                peer: peer.name.clone(),
            });
            let progress = tokio::spawn(report_protection(
                Arc::clone(&primary.stats),
                peer.name.clone(),
                running,
            ));
            // Protected: the machine decides from acknowledgements, the detector, the session and its
            // ack timer; the loop feeds it and carries out what it says.
            let mut leaving: Vec<Action> = Vec::new();
            let mut guest_end = None;
            'protected: loop {
                let wake = self
                    .d
                    .next_deadline()
                    .unwrap_or_else(|| Instant::now() + Duration::from_millis(50))
                    .min(Instant::now() + Duration::from_millis(50));
                let acts = tokio::select! {
                    Some(a) = others.recv() => vec![a],
                    () = primary.wait_link_lost() => {
                        if primary.guest_ended() {
                            guest_end = Some(self.wait_last_acks(&mut primary, &mut det).await);
                            break 'protected;
                        }
                        self.d.handle(Event::LinkLost)
                    }
                    () = self.ctl.peer_removed(&peer.name) => {
                        tracing::info!(secondary = %peer.name, "asked to stop protecting");
                        self.d.handle(Event::LinkLost)
                    }
                    ev = det.events.recv() => match ev.as_ref().and_then(Event::from_peer) {
                        Some(e) => {
                            if matches!(e, Event::PeerDead | Event::PeerRestarted) {
                                tracing::warn!(secondary = %peer.name, "the failure detector declared the secondary dead");
                            }
                            self.d.handle(e)
                        }
                        None => Vec::new(),
                    },
                    () = tokio::time::sleep_until(wake) => self.d.handle(Event::Tick),
                };
                for a in acts {
                    match a {
                        Action::Release { epoch, .. } => {
                            if let Some(e) = epoch.checked_sub(base) {
                                primary.release_through(e);
                            }
                        }
                        Action::Fence { current } => {
                            tracing::error!(
                                current,
                                "superseded by a newer generation: destroying the VM"
                            );
                            tokio::task::block_in_place(|| primary.kill());
                            progress.abort();
                            self.ctl.set_stats(None);
                            // This host may go on as a standby, whose next session binds these addresses.
                            hb.shutdown().await;
                            return stop_all(EXIT_FENCED);
                        }
                        Action::EndSession => leaving.push(a),
                        Action::Persist { generation } => self.persist(generation),
                        other => leaving.push(other),
                    }
                }
                if leaving.iter().any(|a| matches!(a, Action::EndSession)) {
                    break;
                }
            }
            hb.shutdown().await;
            drop(det);
            progress.abort();
            // Joins the epoch thread: off the async workers, which the link tasks it may wait for need.
            let (v, held) = tokio::task::block_in_place(|| primary.stop())?;
            self.ctl.set_stats(None);
            let end_guest = |v: &Vm| {
                if let Some(exit) = v.exit() {
                    let end = GuestEnd::from_exit(&exit, guest_end);
                    tracing::info!(end = %end.describe(), epoch = ?guest_end, "the guest ended");
                    self.ctl.set_guest_end(end);
                }
            };
            if guest_end.is_some() && held.is_empty() {
                end_guest(&v);
                return stop_all(0);
            }
            // The secondary is gone (or the guest ended without every epoch acknowledged). The
            // machine claims a fresh generation, so that the stale replica can never be promoted
            // over what this host now releases alone; output stays held until it wins.
            if !self.d.claiming() {
                leaving.extend(self.d.handle(Event::LinkLost));
            }
            tracing::warn!(secondary = %peer.name, held = held.len(), "secondary lost: claiming a fresh generation to run solo");
            let decided = self.settle(leaving).await;
            if let Some(current) = fenced_at(&decided) {
                tracing::error!(
                    current,
                    "superseded while claiming to go solo: destroying the VM"
                );
                drop(v);
                return stop_all(EXIT_FENCED);
            }
            generation.store(self.d.generation(), Ordering::Release);
            tracing::info!(
                generation = self.d.generation(),
                "solo under a fresh generation"
            );
            if self.d.mode() == Some(Mode::Solo) {
                log.release(&held);
            }
            if guest_end.is_some() {
                end_guest(&v);
                return stop_all(0);
            }
            self.ctl.set_role(Role::Solo);
            vm = Some(v);
            running = true;
        }
    }

    /// The guest ended: its last epoch (which carries the end) is on its way to the secondary. Waits
    /// until the secondary acknowledged every epoch (then every byte is released and the secondary
    /// knows the VM is over: it will not promote), the link broke, the secondary died, or a deadline
    /// passed; what is still held is then released solo under a fresh generation. Returns the last
    /// epoch sent.
    async fn wait_last_acks(
        &self,
        primary: &mut Primary,
        det: &mut detector::DetectorHandle,
    ) -> u64 {
        let deadline =
            tokio::time::Instant::now() + (self.cfg.hb_timeout * 10).max(Duration::from_secs(2));
        let mut dead = std::pin::pin!(peer_dead(det));
        while !primary.all_acked()
            && !primary.link_broken()
            && tokio::time::Instant::now() < deadline
        {
            tokio::select! {
                () = &mut dead => break,
                () = tokio::time::sleep(Duration::from_millis(2)) => {}
            }
        }
        primary.stats.sent.load(Ordering::Acquire)
    }

    async fn connect_any(
        &self,
        generation: u64,
        disk_bytes: u64,
    ) -> Option<(crate::link::OutboundSession, Peer)> {
        for peer in &self.ctl.peers() {
            let hello = Hello::new(
                &self.cfg.vm,
                &self.cfg.host,
                self.cfg.mem_mib << 20,
                disk_bytes,
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

/// The generation that won over this host, if the machine ordered a fence.
fn fenced_at(acts: &[Action]) -> Option<u64> {
    acts.iter().find_map(|a| match a {
        Action::Fence { current } => Some(*current),
        _ => None,
    })
}

/// What a secondary reports when its primary died before it held a consistent copy of the VM (a
/// double failure: e.g. the primary killed during a re-protection's initial sync): the VM is lost, and
/// this says what is left on each host. `synced`: the last sync epoch this host committed.
fn loss_report(
    vm: &str,
    primary: &str,
    here: &str,
    synced: Option<u64>,
    disk_bytes: u64,
) -> String {
    let received = match synced {
        Some(e) => format!("sync epochs 0..={e} of the initial sync, no consistent epoch"),
        None => "no epoch at all".to_owned(),
    };
    let disk = if disk_bytes > 0 {
        format!(", its replica disk of {disk_bytes} bytes")
    } else {
        String::new()
    };
    let there = if disk_bytes > 0 {
        format!("the VM's disk image ({vm}.disk) and console log in its state dir")
    } else {
        "the console log in its state dir".to_owned()
    };
    format!(
        "VM {vm} lost to a double failure: its primary {primary} was declared dead while {here} held \
         no complete copy. Left on {here}: {received}{disk} — not restorable, discarded. Left on \
         {primary}: only what its host kept ({there}); the VM runs again only if {primary} is alive \
         after all (a false suspicion: it then runs the VM solo) or it is booted again from that disk"
    )
}

/// Logs the progress of an initial sync (each round as it starts), and "protection complete" once the
/// secondary has acknowledged the first consistent epoch: from then on the VM survives this host.
async fn report_protection(stats: Arc<ft::PrimaryStats>, secondary: String, sync: bool) {
    let t = std::time::Instant::now();
    let mut round = None;
    let mut done_epoch = None;
    loop {
        tokio::time::sleep(Duration::from_millis(20)).await;
        if !sync {
            // A booted VM: epoch 0 is its boot image; once it is acknowledged the replica can restore.
            if stats.acked_plus_one.load(Ordering::Acquire) > 0 {
                tracing::info!(
                    secondary = %secondary,
                    ms = t.elapsed().as_secs_f64() * 1e3,
                    "protection complete"
                );
                return;
            }
            continue;
        }
        let Some(p) = stats.sync.lock().unwrap_or_else(|e| e.into_inner()).clone() else {
            continue;
        };
        if round != Some(p.round) && !p.done {
            round = Some(p.round);
            tracing::info!(
                secondary = %secondary,
                round = p.round,
                sent_mb = p.bytes_sent as f64 / 1e6,
                disk_done = p.disk_done,
                disk_total = p.disk_total,
                "initial sync"
            );
        }
        if p.done && done_epoch.is_none() {
            // The last sync frame was handed to the link at or before the epoch sent now.
            done_epoch = Some(stats.sent.load(Ordering::Acquire));
        }
        let acked = stats.acked_plus_one.load(Ordering::Acquire);
        if done_epoch.is_some_and(|e| acked > e) {
            tracing::info!(
                secondary = %secondary,
                ms = t.elapsed().as_secs_f64() * 1e3,
                sent_mb = p.bytes_sent as f64 / 1e6,
                "protection complete"
            );
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_parse_with_one_or_two_heartbeat_paths() {
        let p: Peer = "host-b=10.77.1.12:7000,10.77.2.12:7001".parse().unwrap();
        assert_eq!((p.name.as_str(), p.hb2), ("host-b", None));
        let p: Peer = "host-b=10.77.1.12:7000,10.77.2.12:7001,10.77.1.12:7002"
            .parse()
            .unwrap();
        assert_eq!(p.hb2, Some("10.77.1.12:7002".parse().unwrap()));
        for bad in [
            "host-b",
            "=1.2.3.4:1,1.2.3.4:2",
            "host-b=1.2.3.4:1",
            "host-b=1.2.3.4:1,1.2.3.4:2,1.2.3.4:3,1.2.3.4:4",
            "host-b=1.2.3.4:1,nope",
        ] {
            let e = bad.parse::<Peer>().unwrap_err();
            assert!(e.contains(bad), "{e}");
        }
    }

    #[test]
    fn a_vm_lost_during_an_initial_sync_says_what_is_left_on_each_host() {
        let r = loss_report("vm1", "host-a", "host-c", Some(4), 1 << 20);
        for part in [
            "VM vm1 lost",
            "host-a was declared dead",
            "Left on host-c: sync epochs 0..=4",
            "replica disk of 1048576 bytes",
            "Left on host-a",
            "vm1.disk",
        ] {
            assert!(r.contains(part), "{part:?} not in {r}");
        }
        let r = loss_report("vm1", "host-a", "host-c", None, 0);
        assert!(r.contains("Left on host-c: no epoch at all —"), "{r}");
        assert!(!r.contains(".disk"), "{r}");
        // The report reaches the daemon through the worker's status.
        let ctl = NodeControl::new(Vec::new());
        assert_eq!(ctl.lost(), None);
        ctl.set_lost(r.clone());
        assert_eq!(ctl.lost(), Some(r));
    }

    #[tokio::test]
    async fn fence_commands_succeed_fail_and_time_out() {
        let dir = std::env::temp_dir().join(format!("ax-fence-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let out = dir.join("fenced");
        let f = |command: String, ms| FenceConfig {
            command,
            timeout: Duration::from_millis(ms),
            required: false,
        };
        // The host name reaches the command as an argument, and in the environment.
        f(
            format!("echo {{host}} $AX_FENCE_HOST > {}", out.display()),
            5000,
        )
        .fence("host-a")
        .await
        .unwrap();
        assert_eq!(std::fs::read_to_string(&out).unwrap(), "host-a host-a\n");
        // A name that is not a host name never meets a shell.
        let e = f("true".into(), 5000)
            .fence("host-a; rm -rf /")
            .await
            .unwrap_err();
        assert!(e.contains("not a host name"), "{e}");
        let e = f("exit 7".into(), 5000).fence("h").await.unwrap_err();
        assert!(e.contains("exit status: 7"), "{e}");
        let e = f("sleep 5".into(), 50).fence("h").await.unwrap_err();
        assert!(e.contains("did not finish"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
