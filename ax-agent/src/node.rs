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
//! primary whose renewal (or acquire) is refused because a newer generation exists destroys its VM: it
//! was superseded. The host itself is healthy, so the node goes on as a standby, ready for the next
//! session (a WARN says so); only a node whose controller asks for it (`NodeControl::exit_when_fenced`,
//! the daemon's workers) ends with `EXIT_FENCED` instead. Renewals and this host's own moves to a newer
//! generation take turns, so a renewal of generation g answered while this host moves to g + 1 cannot
//! fence it.
//!
//! A secondary that acknowledged an epoch and then cannot commit it (after retries, see
//! [`ft::run_secondary_until`]) leaves the pair with an ERROR and never promotes that replica. A
//! secondary whose primary is declared dead before it held a consistent copy (a double failure, e.g.
//! the primary killed during the initial sync of a re-protection) logs an ERROR saying the VM is lost
//! and what is left on each host, and reports it to its controller (`NodeControl::set_lost`, the
//! worker's status, a VM event in the daemon).
//!
//! Heartbeats run on one path, or two with `--hb2` and peers that name a second address: a peer is
//! dead only when every path is silent. A `--fence-cmd` runs against the old primary while the witness
//! lets its lease expire; with `--fence-required` no promotion happens without it succeeding.
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

use failover::detector::{self, DetectorConfig, PeerEvent};
use failover::heartbeat::{self, Heartbeat, HeartbeatConfig, PathConfig};
use failover::witness::{ClientConfig, Coordinator, WitnessClient, WitnessError};
use statepoint::{EpochConfig, Replica, SyncConfig, Vm, VmConfig};
use tokio::net::TcpListener;

use crate::certs::{PkiPaths, TlsIdentity};
use crate::control::{GuestEnd, NodeControl, Role};
use crate::ft::{self, Lease, Primary, PrimaryConfig, Start};
use crate::link::{Admission, Hello, HelloReply, LinkClient, LinkServer, HELLO_TIMEOUT};
use crate::output::OutputLog;

/// Released output a primary hands to a new secondary with the initial sync: all it keeps
/// ([`crate::output::DEFAULT_TAIL`]).
pub const RETAINED_OUTPUT: u64 = crate::output::DEFAULT_TAIL as u64;

/// Exit code of a node that was superseded by a newer generation (it destroyed its VM) when its
/// controller asks it to end then (`NodeControl::exit_when_fenced`); otherwise it stays a standby.
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
    /// Its second heartbeat address (a second, independent path), if it has one.
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
    /// Disk size in MiB of a VM booted here (0: no disk).
    pub disk_mib: u64,
    /// Where disk images live (the VM's own, and replicas' copies).
    pub state_dir: PathBuf,
    /// Fencing of a primary declared dead, before this host promotes.
    pub fence: Option<FenceConfig>,
}

/// A fence command: run through `sh -c` with `{host}` replaced by the host to fence (also in the
/// environment as `AX_FENCE_HOST`); success is exit code 0 within the timeout.
#[derive(Clone, Debug)]
pub struct FenceConfig {
    /// The command line.
    pub command: String,
    /// How long it may take.
    pub timeout: Duration,
    /// Never promote without a successful fence (retry it every second). Without this, a failed fence
    /// is reported and the promotion goes on: the witness lease has already stopped the old primary's
    /// output (see docs/DESIGN.md §3).
    pub required: bool,
}

impl FenceConfig {
    /// Runs the command for `host`; `Ok` when it exited 0 in time.
    pub async fn fence(&self, host: &str) -> Result<(), String> {
        // Host names come from certificates; quote them anyway before they meet a shell.
        let quoted = format!("'{}'", host.replace('\'', "'\\''"));
        let line = self.command.replace("{host}", &quoted);
        let mut child = tokio::process::Command::new("sh")
            .arg("-c")
            .arg(&line)
            .env("AX_FENCE_HOST", host)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("fence command {line:?}: {e}"))?;
        match tokio::time::timeout(self.timeout, child.wait()).await {
            Ok(Ok(status)) if status.success() => Ok(()),
            Ok(Ok(status)) => Err(format!("fence command {line:?} failed: {status}")),
            Ok(Err(e)) => Err(format!("fence command {line:?}: {e}")),
            Err(_) => Err(format!(
                "fence command {line:?} did not finish in {:?}",
                self.timeout
            )),
        }
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
    /// The witness failed.
    #[error("witness: {0}")]
    Witness(#[from] WitnessError),
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
    let witness = WitnessClient::new(
        cfg.witness,
        ClientConfig {
            bind: Some(SocketAddr::new(cfg.hb_listen.ip(), 0)),
            ..ClientConfig::default()
        },
    );
    let witness_id = format!("{}#{}", cfg.host, std::process::id());
    if witness_id.len() > failover::heartbeat::MAX_HOST_ID {
        return Err(NodeError::Setup(format!(
            "host name {:?} is too long (at most {} bytes with the process id)",
            cfg.host,
            failover::heartbeat::MAX_HOST_ID
        )));
    }
    let node = Node {
        cfg,
        client,
        witness,
        witness_id,
        ctl,
    };
    if node.ctl.boot_solo {
        let mut vm = node.build_vm()?;
        vm.start().map_err(ft::FtError::from)?;
        let disk_bytes = node.cfg.disk_mib << 20;
        let known = node.ctl.known_generation;
        let sync = Some(SyncConfig::default());
        let code = node
            .primary(vm, sync, known, Vec::new(), 0, disk_bytes)
            .await?;
        if !node.stays_after(code) {
            return Ok(code);
        }
    } else if node.cfg.boot {
        let vm = node.build_vm()?;
        let disk_bytes = node.cfg.disk_mib << 20;
        let code = node.primary(vm, None, 0, Vec::new(), 0, disk_bytes).await?;
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
                    generation: known,
                    disk_bytes,
                    disk,
                } = *promotion;
                tracing::info!(host = %node.cfg.host, epoch = ?replica.epoch(), "promoting");
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
                    .primary(
                        vm,
                        Some(SyncConfig::default()),
                        known,
                        history,
                        history_base,
                        disk_bytes,
                    )
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
    /// The primary died: take the VM over.
    Promote(Box<Promotion>),
    /// The session ended while the primary lives on (or another host holds the VM): wait for the next.
    Rejoin,
    /// The last committed epoch shows the guest ended there: the VM is over, nothing to take over.
    GuestEnded(GuestEnd),
}

/// What a secondary hands over when it takes the VM: the replica, the generation granted, the disk
/// size and the replica's disk image.
struct Promotion {
    replica: Replica,
    generation: u64,
    disk_bytes: u64,
    disk: Option<PathBuf>,
}

struct Node {
    cfg: NodeConfig,
    client: LinkClient,
    witness: WitnessClient,
    /// Who this process is at the witness: `host#pid`. A restarted agent is a new holder, so "a newer
    /// generation is held by me" can only mean this process's own grant whose answer was lost.
    witness_id: String,
    /// The controller's hooks (peers, roles, counters).
    ctl: Arc<NodeControl>,
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

    /// Heartbeats and a failure detector for `peer`. Binding is retried for a while: the address may
    /// still be held by a session that is closing.
    async fn heartbeat_with(
        &self,
        peer: &Peer,
    ) -> Result<(heartbeat::HeartbeatHandle, detector::DetectorHandle), NodeError> {
        let mut attempt = 0u32;
        loop {
            match self.try_heartbeat_with(peer) {
                Ok(hb) => return Ok(hb),
                Err(e) if attempt < 100 => {
                    attempt += 1;
                    tracing::warn!(error = %e, attempt, "heartbeat setup failed: retrying");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn try_heartbeat_with(
        &self,
        peer: &Peer,
    ) -> Result<(heartbeat::HeartbeatHandle, detector::DetectorHandle), NodeError> {
        let mut paths = vec![PathConfig {
            local: self.cfg.hb_listen,
            peer: peer.hb,
        }];
        if let (Some(local), Some(peer)) = (self.cfg.hb2_listen, peer.hb2) {
            paths.push(PathConfig { local, peer });
        }
        let n_paths = paths.len();
        let mut hb = HeartbeatConfig::new(
            self.cfg.host.clone(),
            heartbeat::new_incarnation(),
            peer.name.clone(),
            paths,
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
                paths: n_paths,
            },
            observations,
        )
        .map_err(setup("detector"))?;
        self.ctl.set_heartbeat(Some(det.status.clone()));
        Ok((handle, det))
    }

    /// Follows a primary; returns the replica and the primary's generation when the primary died, or
    /// `None` when the session ended while the primary is alive (it will reconnect).
    async fn secondary(
        &self,
        mut session: crate::link::InboundSession,
    ) -> Result<SecondaryEnd, NodeError> {
        let hello = session.hello.clone();
        // The link admitted the host (`peers_only`), but the peers may have changed since.
        let Some(peer) = self.ctl.peers().into_iter().find(|p| p.name == hello.host) else {
            // A certified host that is not this standby's primary: refused, never fatal.
            tracing::warn!(host = %hello.host, vm = %hello.vm, "refused a session from a host that is not among the peers");
            let reason = format!("host {:?} is not among this host's peers", hello.host);
            let _ = session
                .reply(&HelloReply {
                    accepted: false,
                    reason,
                })
                .await;
            return Ok(SecondaryEnd::Rejoin);
        };
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
                let _ = session
                    .reply(&HelloReply {
                        accepted: false,
                        reason: e.to_string(),
                    })
                    .await;
                return Ok(SecondaryEnd::Rejoin);
            }
        };
        tracing::info!(primary = %peer.name, vm = %hello.vm, "following as secondary");
        self.ctl.set_role(Role::Secondary {
            primary: peer.name.clone(),
        });
        let (hb, mut det) = self.heartbeat_with(&peer).await?;
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
        // An acknowledged epoch this replica could not commit (ft logged it as an error and left the
        // pair): the replica lacks output the primary may have released, and its disk may hold part of
        // that epoch. It is never promoted, whatever happens to the primary; this host stays a standby.
        if let Err(ft::FtError::CommitFailed { epoch, .. }) = &ended {
            watcher.abort();
            hb.shutdown().await;
            tracing::error!(vm = %hello.vm, primary = %peer.name, epoch, "left the pair: the replica is discarded and never promoted; waiting as a standby");
            drop(replica);
            if let Some(d) = &disk {
                let _ = std::fs::remove_file(d);
            }
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
            if let Some(d) = &disk {
                let _ = std::fs::remove_file(d);
            }
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
            if let Some(d) = &disk {
                let _ = std::fs::remove_file(d);
            }
            return Ok(SecondaryEnd::Rejoin);
        }
        // Fence the old primary while the witness lets its lease run out.
        let fencing = self.cfg.fence.clone().map(|f| {
            let host = peer.name.clone();
            tokio::spawn(async move {
                loop {
                    match f.fence(&host).await {
                        Ok(()) => {
                            tracing::info!(host = %host, "fenced the old primary");
                            return true;
                        }
                        Err(e) if f.required => {
                            tracing::error!(error = %e, "fencing failed: not promoting until it succeeds");
                            tokio::time::sleep(Duration::from_secs(1)).await;
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "fencing failed: promoting on the witness grant alone");
                            return false;
                        }
                    }
                }
            })
        });
        // Take over: a newer generation, granted once the old primary's lease has run out.
        let grant = loop {
            match self
                .witness
                .acquire(&hello.vm, &self.witness_id, hello.generation)
                .await
            {
                Ok(g) => break g,
                Err(WitnessError::Denied { .. }) | Err(WitnessError::Unreachable { .. }) => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                // The primary moved on without this replica (it went solo under a newer generation,
                // or another host took over): this copy is stale. Not a reason to exit: stay a standby.
                Err(e @ (WitnessError::Superseded { .. } | WitnessError::NotHolder { .. })) => {
                    tracing::warn!(error = %e, "not promoting a stale replica: waiting as a standby");
                    if let Some(f) = fencing {
                        f.abort();
                    }
                    if let Some(d) = &disk {
                        let _ = std::fs::remove_file(d);
                    }
                    return Ok(SecondaryEnd::Rejoin);
                }
                Err(e) => return Err(e.into()),
            }
        };
        tracing::info!(generation = grant.generation, "granted the output right");
        if let Some(f) = fencing {
            let _ = f.await;
        }
        Ok(SecondaryEnd::Promote(Box::new(Promotion {
            replica,
            generation: grant.generation,
            disk_bytes: hello.disk_bytes,
            disk,
        })))
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
        disk_bytes: u64,
    ) -> Result<i32, NodeError> {
        let vm_name = self.cfg.vm.clone();
        let t = std::time::Instant::now();
        // The VM may already run (promoted): an unreachable witness is waited out, never fatal.
        let grant = loop {
            match self
                .witness
                .acquire(&vm_name, &self.witness_id, known)
                .await
            {
                Ok(g) => break g,
                Err(e @ WitnessError::Unreachable { .. }) => {
                    tracing::warn!(error = %e, "witness unreachable: retrying");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                // Another host moved the VM on past what this host knows: its copy is stale and was
                // never released from. Destroyed, like any superseded copy.
                Err(e @ (WitnessError::Superseded { .. } | WitnessError::NotHolder { .. })) => {
                    tracing::error!(error = %e, known, "superseded before holding the output right: destroying the VM");
                    drop(vm);
                    return Ok(EXIT_FENCED);
                }
                Err(e) => return Err(e.into()),
            }
        };
        tracing::info!(
            ms = t.elapsed().as_secs_f64() * 1e3,
            generation = grant.generation,
            "holding the output right"
        );
        let generation = Arc::new(AtomicU64::new(grant.generation));
        let lease = Arc::new(Lease::default());
        lease.extend(grant.valid_until);
        let fenced = Arc::new(tokio::sync::Notify::new());
        // One conversation with the witness at a time: a renewal for generation g must not be answered
        // "superseded" while this host itself moves to g + 1 (that would fence the host by itself).
        let witness_turn = Arc::new(tokio::sync::Mutex::new(()));
        // Renew at a quarter of the lease, always for the current generation.
        let renew = {
            let (lease, fenced, generation, turn) = (
                Arc::clone(&lease),
                Arc::clone(&fenced),
                Arc::clone(&generation),
                Arc::clone(&witness_turn),
            );
            let period = grant.lease / 4;
            let witness = WitnessClient::new(
                self.cfg.witness,
                ClientConfig {
                    bind: Some(SocketAddr::new(self.cfg.hb_listen.ip(), 0)),
                    ..ClientConfig::default()
                },
            );
            let (vm, host) = (vm_name.clone(), self.witness_id.clone());
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(period).await;
                    let _turn = turn.lock().await;
                    let g = generation.load(Ordering::Acquire);
                    match witness.renew(&vm, &host, g).await {
                        Ok(grant) => lease.extend(grant.valid_until),
                        // This very process holds the newer generation: the answer to its own
                        // acquire was lost and the acquire is being retried. Not a fence.
                        Err(WitnessError::Superseded { ref holder, .. }) if *holder == host => {
                            tracing::warn!(generation = g, "renewal raced this host's own acquire");
                        }
                        Err(
                            e @ (WitnessError::Superseded { .. } | WitnessError::NotHolder { .. }),
                        ) => {
                            tracing::error!(error = %e, generation = g, "superseded: giving up the output right");
                            lease.revoke();
                            fenced.notify_one();
                            return;
                        }
                        Err(e) => tracing::warn!(error = %e, "lease renewal failed"),
                    }
                }
            })
        };
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
            let mut drain = match (&sync, vm.take()) {
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
                // A guest that ends while solo: its output is out (the output thread released it
                // under the lease); the VM is over, which is a VM event, not a reason to fail.
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
                tokio::select! {
                    () = fenced.notified() => {
                        if let Some(d) = drain {
                            tokio::task::block_in_place(|| d.kill());
                        }
                        return stop_all(EXIT_FENCED);
                    }
                    () = tokio::time::sleep(Duration::from_millis(100)) => {}
                }
            };
            let running = match (drain, vm.take()) {
                // Joins the output thread (it may wait for a lease renewal): off the async workers.
                (Some(d), _) => {
                    let v = tokio::task::block_in_place(|| d.into_vm())?;
                    if lease.is_revoked() {
                        tracing::error!("superseded while solo: destroying the VM");
                        drop(v);
                        return stop_all(EXIT_FENCED);
                    }
                    v
                }
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
            let (hb, mut det) = self.heartbeat_with(&peer).await?;
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
            self.ctl.set_stats(Some(Arc::clone(&primary.stats)));
            self.ctl.set_role(Role::Protected {
                peer: peer.name.clone(),
            });
            let progress = tokio::spawn(report_protection(
                Arc::clone(&primary.stats),
                peer.name.clone(),
                sync.is_some(),
            ));
            tokio::select! {
                () = fenced.notified() => {
                    tracing::error!("superseded by a newer generation: destroying the VM");
                    tokio::task::block_in_place(|| primary.kill());
                    progress.abort();
                    self.ctl.set_stats(None);
                    // This host may go on as a standby, whose next session binds these addresses.
                    hb.shutdown().await;
                    return stop_all(EXIT_FENCED);
                }
                () = primary.wait_link_lost() => {}
                () = self.ctl.peer_removed(&peer.name) => {
                    tracing::info!(secondary = %peer.name, "asked to stop protecting");
                }
                () = peer_dead(&mut det) => {
                    tracing::warn!(secondary = %peer.name, "the failure detector declared the secondary dead");
                }
            }
            // The guest ended: its last epoch (which carries the end) is on its way to the secondary.
            // Once the secondary has acknowledged it, every byte is released and the secondary knows
            // the VM is over (it will not promote). If that does not happen in time (the secondary
            // died, or the link broke), the held output is released solo under a fresh generation
            // below, exactly as when the secondary is lost, and the VM ends here all the same.
            let guest_end = if primary.guest_ended() {
                let deadline = tokio::time::Instant::now()
                    + (self.cfg.hb_timeout * 10).max(Duration::from_secs(2));
                let mut dead = std::pin::pin!(peer_dead(&mut det));
                while !primary.all_acked()
                    && !primary.link_broken()
                    && tokio::time::Instant::now() < deadline
                {
                    tokio::select! {
                        () = &mut dead => break,
                        () = tokio::time::sleep(Duration::from_millis(2)) => {}
                    }
                }
                Some(primary.stats.sent.load(Ordering::Acquire))
            } else {
                None
            };
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
            // The secondary is gone. Keep the VM; move to a fresh generation so that the stale replica
            // can never be promoted over what this host now releases alone, then release what was held.
            tracing::warn!(secondary = %peer.name, held = held.len(), "secondary lost: running solo");
            loop {
                let turn = witness_turn.lock().await;
                let g = generation.load(Ordering::Acquire);
                match self.witness.acquire(&vm_name, &self.witness_id, g).await {
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
                        drop(turn);
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
            while !held.is_empty() && !lease.valid() {
                if lease.is_revoked() {
                    tracing::error!("superseded while solo: destroying the VM");
                    drop(v);
                    return stop_all(EXIT_FENCED);
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            log.release(&held);
            if guest_end.is_some() {
                end_guest(&v);
                return stop_all(0);
            }
            self.ctl.set_role(Role::Solo);
            vm = Some(v);
            sync = Some(SyncConfig::default());
        }
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

/// Resolves when the detector declares the peer dead (or restarted: its previous life is over).
async fn peer_dead(det: &mut detector::DetectorHandle) {
    while let Some(ev) = det.events.recv().await {
        if matches!(ev, PeerEvent::Dead { .. } | PeerEvent::Restarted { .. }) {
            return;
        }
    }
    std::future::pending::<()>().await;
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
        // The host name reaches the command quoted, and in the environment.
        f(
            format!("echo {{host}} $AX_FENCE_HOST > {}", out.display()),
            5000,
        )
        .fence("host-a; rm -rf /")
        .await
        .unwrap();
        assert_eq!(
            std::fs::read_to_string(&out).unwrap(),
            "host-a; rm -rf / host-a; rm -rf /\n"
        );
        let e = f("exit 7".into(), 5000).fence("h").await.unwrap_err();
        assert!(e.contains("exit status: 7"), "{e}");
        let e = f("sleep 5".into(), 50).fence("h").await.unwrap_err();
        assert!(e.contains("did not finish"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
