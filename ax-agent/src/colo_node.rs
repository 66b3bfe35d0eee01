//! The COLO node: FT for a QEMU VM (`ax-agent colo-node`) — QEMU's COLO as the data path, driven by the
//! same decision driver as the native FT node ([`crate::driver::Driver`]: the role machine of
//! protocol v2, the coordinator's compare-and-set, generation records, heartbeats, fencing).
//!
//! COLO keeps a secondary QEMU in step with the primary (checkpoints every epoch, disk writes
//! replicated over NBD, the primary's packets released by `colo-compare`; [`ax_qemu::colo`]). What
//! COLO lacks is decided here:
//!
//! - **Sessions.** A primary in solo mode offers a session to a peer over a mutually authenticated TLS
//!   connection (the cluster PKI) on the peer's link address: `Offer { generation, disks, … }`. The
//!   peer's machine accepts it (never a generation older than one it knows) or refuses; on accept the
//!   peer launches its secondary QEMU (`-incoming`, replication over overlays of base copies of the
//!   disks) and answers `Ready`. The primary feeds `SessionOpened` to its machine *before* any byte of
//!   the VM can reach the peer, runs COLO's setup ([`ax_qemu::colo::protect`]: live disk copy, filters,
//!   compare, `migrate`) and, once the pair is in COLO, tells the peer (`InColo`): from then on the
//!   secondary's replica is restorable (`FrameStaged`) and the primary's machine counts the session's
//!   epoch as acknowledged. The session lives as long as that TLS connection.
//! - **Channels.** QEMU talks to unix sockets only; ax carries them between hosts with
//!   [`ax_qemu::relay`] (TCP with `TCP_NODELAY` and quick ACKs: no delayed-ACK stall per checkpoint).
//!   Ports: the session's TLS connection on the node's link address; from the node's data port `D`
//!   (told to the other side in `Offer`/`Ready`; `ax-agent colo-node`: link port + 1, a daemon's
//!   worker: `[ports] colo` + 16 · slot), on the secondary `D` the migration stream and `D+1` NBD, on
//!   the primary `D+2+2i` the `filter-mirror` of NIC `i` and `D+3+2i` its compare input. The data
//!   relays exist only while a session is accepted.
//! - **Failover.** A secondary whose session ended and whose primary the detector declares dead claims
//!   the next generation (after the session is over, so nothing follows the decision); only if it wins
//!   does it take the VM over ([`ax_qemu::colo::take_over`]: `x-colo-lost-heartbeat`, filters removed,
//!   `announce-self`) and run it as primary (solo), then protect it again to the next peer that
//!   accepts. A primary that loses its secondary claims too: won, it takes over its own QEMU and runs
//!   solo; lost (the secondary promoted), it kills its QEMU (fenced) and stays a standby. A primary
//!   whose peer is removed (the daemon's `unprotect`) claims the next generation *before* it closes the
//!   session and leaves COLO: the secondary can only take the VM over by winning the generation it
//!   followed at the coordinator, which that claim already took — or, if the secondary's claim came
//!   first, this primary is fenced. Which one runs the VM is the coordinator's compare-and-set, never a
//!   race of timeouts.
//! - **Re-protection.** A node restarted without `--boot` is a standby: it never runs the VM on its
//!   own (its generation record is older than the running primary's) and becomes that primary's next
//!   secondary when offered a session; a primary gone solo (its secondary lost, or itself a former
//!   secondary that took over) offers sessions again until one is accepted.
//! - **Replication link lost** (heartbeats on another path alive): the session's TCP keepalive ends the
//!   session on both hosts; the primary claims and runs solo, the secondary (its primary alive) kills
//!   its QEMU — exactly one host runs the VM.
//!
//! Two hosts run it: `ax-agent colo-node` ([`run`], standalone) and the VM worker of a QEMU VM created
//! FT-capable ([`run_controlled`]: peers, role, generation and checkpoint counters through the worker's
//! `NodeControl`, the daemon's `protect`/`unprotect` as for a native worker; QMP events and the running
//! QEMU reported to the worker through [`ColoHooks`]).
//!
//! Output commit is COLO's: the primary's packets leave when the secondary produced the same ones, or at
//! a checkpoint. The serial console is not compared (each host writes its own console log).
//!
//! Once in COLO, a secondary whose relay toward the primary's colo-compare breaks (the primary's
//! QEMU or node died: its kernel closed the sockets) stops its VM until the decision, so its guest
//! sends nothing into the dead compare (`hold_stopped`; a hint, never a decision).
//!
//! Limitations: the data relays are plain TCP between the hosts (the session's TLS connection
//! authenticates who asked for them, not each byte); one QEMU per node.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ax_ft::certs::{PkiPaths, TlsIdentity};
use ax_ft::control::{NodeControl, Role};
use ax_ft::coord::CoordTarget;
use ax_ft::driver::{peer_dead, Driver, DriverConfig};
use ax_ft::node::{FenceConfig, NodeError, Peer, EXIT_FENCED};
use ax_qemu::colo::{self, Addr, PrimaryChannels, ProtectOptions, SecondaryChannels};
use ax_qemu::def::{QemuDef, RunFiles};
use ax_qemu::migrate::DiskInfo;
use ax_qemu::process::Qemu;
use ax_qemu::qmp::{Events, Lifecycle, Qmp};
use ax_qemu::relay::{self, Relay, RelayOptions};
use failover::role::{Action, Event, Mode, RoleConfig};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

/// How often a stopped secondary is checked for a checkpoint that restarted it ([`hold_stopped`]).
const HOLD_POLL: Duration = Duration::from_millis(10);
/// Largest session message (an offer lists the disks).
const MAX_MESSAGE: usize = 64 << 10;
/// Bound on the TLS handshake and on each answer of the session's setup.
const HANDSHAKE: Duration = Duration::from_secs(10);
/// Bound on the secondary's QEMU start and on QMP answers.
const QEMU_TIMEOUT: Duration = Duration::from_secs(20);
/// Bound on COLO's setup (the disk copy and the first checkpoint) as seen by the secondary.
const SETUP_TIMEOUT: Duration = Duration::from_secs(600);
/// Bound on the take-over's QMP waits.
const TAKE_OVER: Duration = Duration::from_secs(10);
/// A protected primary stopped this long (at least; 50 checkpoint periods if longer) is taken as a COLO
/// that failed: QEMU's COLO thread waits for a failover after an error in a checkpoint (e.g. "Can't
/// receive COLO message") with the guest stopped, while the session and heartbeats look healthy.
const COLO_STALL: Duration = Duration::from_secs(10);

/// What a COLO node runs with.
#[derive(Clone, Debug)]
pub struct ColoNodeConfig {
    /// This host's name.
    pub host: String,
    /// PKI directory (`ax-agent certs`).
    pub pki: PathBuf,
    /// The VM's name.
    pub vm: String,
    /// The VM's QEMU definition on this host (`colo` is set by the node); its disks are this host's
    /// copies (a secondary creates them as base copies of the primary's).
    pub def: QemuDef,
    /// Guest memory in MiB.
    pub mem_mib: u64,
    /// vCPUs.
    pub vcpus: u8,
    /// The session's TLS listen address.
    pub link_listen: SocketAddr,
    /// This node's first data relay port `D` (on the link address): a secondary listens on `D` (the
    /// migration stream) and `D+1` (NBD), a primary on `D+2+2i` and `D+3+2i` (NIC `i`'s mirror and
    /// compare input). Each side tells the other its `D` in the session's messages.
    pub data_port: u16,
    /// Heartbeat address.
    pub hb_listen: SocketAddr,
    /// Second heartbeat path's local address.
    pub hb2_listen: Option<SocketAddr>,
    /// The other hosts (their link address is their session address).
    pub peers: Vec<Peer>,
    /// Where the VM's generations are kept.
    pub coordinator: CoordTarget,
    /// Boot the VM here as its first primary.
    pub boot: bool,
    /// The checkpoint period (COLO's `x-checkpoint-delay`).
    pub epoch: Duration,
    /// Heartbeat interval.
    pub hb_interval: Duration,
    /// Heartbeat timeout.
    pub hb_timeout: Duration,
    /// Where the generation record is kept.
    pub state_dir: PathBuf,
    /// QEMU's run directory (QMP socket, pid, console, overlays, the relays' unix sockets).
    pub run_dir: PathBuf,
    /// Fencing of a primary declared dead, before this host promotes.
    pub fence: Option<FenceConfig>,
    /// `max-bandwidth` of COLO's migration stream, bytes/s.
    pub max_bandwidth: Option<u64>,
}

/// A message of the session connection.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
enum Msg {
    /// Primary → peer: protect `vm` under `generation`.
    Offer {
        vm: String,
        host: String,
        generation: u64,
        mem_mib: u64,
        vcpus: u8,
        disks: Vec<DiskInfo>,
        nics: usize,
        /// The primary's first data relay port (absent: its link port + 1).
        #[serde(default)]
        data_port: Option<u16>,
    },
    /// Peer → primary: the secondary QEMU waits for the stream.
    Ready {
        /// The secondary's first data relay port (absent: its link port + 1).
        #[serde(default)]
        data_port: Option<u16>,
    },
    /// Peer → primary: no.
    Refused { reason: String },
    /// Primary → peer: the pair is in COLO (the replica is restorable).
    InColo,
}

async fn read_msg<R: AsyncRead + Unpin>(r: &mut R) -> std::io::Result<Msg> {
    let len = r.read_u32_le().await? as usize;
    if len == 0 || len > MAX_MESSAGE {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("session message of {len} bytes (1..={MAX_MESSAGE})"),
        ));
    }
    // Bounded by MAX_MESSAGE, checked above.
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf).await?;
    serde_json::from_slice(&buf)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))
}

async fn write_msg<W: AsyncWrite + Unpin>(w: &mut W, m: &Msg) -> std::io::Result<()> {
    let body = serde_json::to_vec(m)?;
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&u32::try_from(body.len()).unwrap_or(u32::MAX).to_le_bytes());
    out.extend_from_slice(&body);
    w.write_all(&out).await?;
    w.flush().await
}

fn io_setup<E: std::fmt::Display>(what: &str) -> impl FnOnce(E) -> NodeError + '_ {
    move |e| NodeError::Setup(format!("{what}: {e}"))
}

/// Keepalive probes on a session's TCP connection: when the replication network is cut (packets
/// vanish, heartbeats on another path go on) the idle session fails on both hosts within about
/// `4 × max(hb_timeout, 1 s)` (Linux counts keepalive in whole seconds): the primary then claims the
/// next generation and goes solo, the secondary — its primary alive — discards its replica and kills
/// its QEMU. Without it each end would wait on the session for ever (no FIN crosses a cut link), the
/// primary's vCPUs held at a checkpoint the secondary never acknowledges.
fn session_keepalive(tcp: &TcpStream, hb_timeout: Duration) {
    let every = hb_timeout.max(Duration::from_secs(1));
    let ka = socket2::TcpKeepalive::new()
        .with_time(every)
        .with_interval(every)
        .with_retries(3);
    if let Err(e) = socket2::SockRef::from(tcp).set_tcp_keepalive(&ka) {
        tracing::warn!(error = %e, "session: TCP keepalive not set");
    }
}

/// The relay ports of a node whose link port is `base`.
fn port(base: SocketAddr, offset: u16) -> SocketAddr {
    SocketAddr::new(base.ip(), base.port().wrapping_add(offset))
}

/// A running QEMU of this node and its QMP.
#[allow(missing_debug_implementations)]
pub struct Running {
    /// The process.
    pub qemu: Qemu,
    /// Its QMP (shared with whoever else asks QEMU things, e.g. a worker's control socket).
    pub qmp: Arc<Qmp>,
    /// Its events.
    pub events: Events,
}

/// What the node tells its host process about the VM's QEMU (a daemon's worker: its status, its
/// disk snapshots). Called from the node's task; keep them short.
pub trait ColoHooks: Send + Sync {
    /// Every QMP event of the QEMU that runs the VM here (as primary).
    fn event(&self, _ev: &ax_qemu::qmp::Event) {}
    /// This host's QEMU runs the VM (booted, found again, or taken over as secondary).
    fn running(&self, _qmp: &Arc<Qmp>, _pid: u32) {}
}

/// No hooks (`ax-agent colo-node`).
#[derive(Debug)]
pub struct NoHooks;
impl ColoHooks for NoHooks {}

/// How a controlled node starts.
#[allow(missing_debug_implementations)]
pub enum Start {
    /// Boot the VM here (its first primary).
    Boot,
    /// The VM's QEMU already runs here (launched or found again by the caller): primary, solo.
    Running(Running),
    /// Wait for a primary's session (a standby).
    Standby,
}

/// How a controlled node ended.
#[derive(Debug)]
pub enum NodeEnd {
    /// The VM ended on this host (the guest shut down, panicked, or QEMU died).
    Vm(VmEnd),
    /// Superseded: a newer generation runs elsewhere; this host's QEMU was killed (only with
    /// `NodeControl::exit_when_fenced`; otherwise the node goes on as a standby).
    Fenced,
}

/// Runs the node until its VM ends (exit code 0) or it fails.
pub async fn run(cfg: ColoNodeConfig) -> Result<i32, NodeError> {
    let ctl = Arc::new(NodeControl::new(cfg.peers.clone()));
    let start = if cfg.boot {
        Start::Boot
    } else {
        Start::Standby
    };
    Ok(
        match run_controlled(cfg, ctl, start, Arc::new(NoHooks)).await? {
            NodeEnd::Vm(end) => end.code(),
            NodeEnd::Fenced => EXIT_FENCED,
        },
    )
}

/// Runs the node steered through `ctl` (a daemon's VM worker): its peers are the hosts it protects
/// the VM to (`set_peers`; none: solo — a primary protected to a host removed from the peers leaves
/// COLO under a fresh generation and runs solo), its role, generation and checkpoint counters are
/// published there. Ends when the VM ends here, or when superseded with `ctl.exit_when_fenced`.
pub async fn run_controlled(
    mut cfg: ColoNodeConfig,
    ctl: Arc<NodeControl>,
    start: Start,
    hooks: Arc<dyn ColoHooks>,
) -> Result<NodeEnd, NodeError> {
    cfg.def.colo = true;
    let identity =
        TlsIdentity::load(&PkiPaths::in_dir(&cfg.pki, &cfg.host)).map_err(io_setup("PKI"))?;
    let server_tls = tokio_rustls::TlsAcceptor::from(Arc::new(
        identity.rustls_server().map_err(io_setup("TLS"))?,
    ));
    let client_tls = tokio_rustls::TlsConnector::from(Arc::new(
        identity.rustls_client().map_err(io_setup("TLS"))?,
    ));
    let listener = TcpListener::bind(cfg.link_listen)
        .await
        .map_err(io_setup("session listen"))?;
    std::fs::create_dir_all(&cfg.state_dir).map_err(io_setup("state dir"))?;
    let primary = !matches!(start, Start::Standby);
    let drv = Driver::new(
        DriverConfig {
            host: cfg.host.clone(),
            vm: cfg.vm.clone(),
            coordinator: cfg.coordinator.clone(),
            hb_listen: cfg.hb_listen,
            hb2_listen: cfg.hb2_listen,
            hb_interval: cfg.hb_interval,
            hb_timeout: cfg.hb_timeout,
            state_dir: cfg.state_dir.clone(),
        },
        &identity,
        Arc::clone(&ctl),
        primary,
        RoleConfig::default(),
    )?;
    let node = ColoNode {
        run: RunFiles {
            dir: cfg.run_dir.clone(),
        },
        cfg,
        drv,
        client_tls,
        hooks,
        generation: Arc::new(AtomicU64::new(0)),
    };
    std::fs::create_dir_all(&node.run.dir).map_err(io_setup("run dir"))?;
    let booted = match start {
        Start::Standby => None,
        Start::Running(r) => Some(r),
        Start::Boot => {
            let (qemu, qmp, events) = Qemu::launch(
                &node.cfg.def,
                &node.cfg.vm,
                node.cfg.mem_mib,
                node.cfg.vcpus,
                &node.run,
                QEMU_TIMEOUT,
            )
            .await
            .map_err(io_setup("starting QEMU"))?;
            Some(Running {
                qemu,
                qmp: Arc::new(qmp),
                events,
            })
        }
    };
    if let Some(vm) = booted {
        let first = node.drv.d.start();
        match node.primary(vm, first).await? {
            Some(end) => return Ok(NodeEnd::Vm(end)),
            None if node.drv.ctl.exit_when_fenced => return Ok(NodeEnd::Fenced),
            None => {}
        }
    }
    loop {
        node.drv.ctl.set_role(Role::Standby);
        if let Some((vm, after)) = node.standby(&listener, &server_tls).await? {
            match node.primary(vm, after).await? {
                Some(end) => return Ok(NodeEnd::Vm(end)),
                None if node.drv.ctl.exit_when_fenced => return Ok(NodeEnd::Fenced),
                None => {}
            }
        }
    }
}

struct ColoNode {
    cfg: ColoNodeConfig,
    run: RunFiles,
    drv: Driver,
    client_tls: tokio_rustls::TlsConnector,
    hooks: Arc<dyn ColoHooks>,
    /// The generation this host runs the VM under, published through the control
    /// (`NodeControl::generation`) while primary.
    generation: Arc<AtomicU64>,
}

/// How the VM's QEMU on this host ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmEnd {
    /// The guest shut down (or QEMU quit by a request): the VM is over. QEMU's `SHUTDOWN` reason.
    Shutdown(String),
    /// The guest panicked (`GUEST_PANICKED`; QEMU runs with `-action panic=pause`).
    Panicked(Option<String>),
    /// QEMU died.
    Died(String),
}

impl VmEnd {
    /// The exit code of `ax-agent colo-node` for it (0: the guest shut down).
    pub fn code(&self) -> i32 {
        match self {
            VmEnd::Shutdown(r) => {
                tracing::info!(reason = %r, "the VM shut down");
                0
            }
            VmEnd::Panicked(i) => {
                tracing::error!(info = ?i, "the guest panicked");
                1
            }
            VmEnd::Died(r) => {
                tracing::error!(reason = %r, "QEMU died on the primary");
                1
            }
        }
    }
}

impl ColoNode {
    fn sock(&self, name: &str) -> PathBuf {
        self.run.dir.join(name)
    }

    /// Kills this host's QEMU of the VM (fenced, or a secondary whose session ended).
    async fn kill(&self) {
        let run = self.run.clone();
        let _ = tokio::task::spawn_blocking(move || {
            ax_qemu::process::kill_recorded(&run, Duration::from_secs(5))
        })
        .await;
        ax_qemu::process::remove_taps(&self.run, &self.cfg.def);
    }

    /// Waits for a primary's session and follows it; `Some` (with the machine's actions after the
    /// promotion) when this host won the VM and took it over, `None` when the session ended otherwise (wait for the next).
    async fn standby(
        &self,
        listener: &TcpListener,
        tls: &tokio_rustls::TlsAcceptor,
    ) -> Result<Option<(Running, Vec<Action>)>, NodeError> {
        let (tcp, from) = listener
            .accept()
            .await
            .map_err(io_setup("session accept"))?;
        let _ = tcp.set_nodelay(true);
        session_keepalive(&tcp, self.cfg.hb_timeout);
        let mut conn = match tokio::time::timeout(HANDSHAKE, tls.accept(tcp)).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                tracing::warn!(%from, error = %e, "session: TLS handshake failed");
                return Ok(None);
            }
            Err(_) => {
                tracing::warn!(%from, "session: TLS handshake timed out");
                return Ok(None);
            }
        };
        let names = conn
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| ax_ft::link::certificate_names(c.as_ref()))
            .unwrap_or_default();
        let offer = match tokio::time::timeout(HANDSHAKE, read_msg(&mut conn)).await {
            Ok(Ok(m)) => m,
            _ => {
                tracing::warn!(%from, "session: no offer");
                return Ok(None);
            }
        };
        let Msg::Offer {
            vm,
            host,
            generation,
            mem_mib,
            vcpus,
            disks,
            nics,
            data_port: primary_data,
        } = offer
        else {
            tracing::warn!(%from, "session: the first message is not an offer");
            return Ok(None);
        };
        let refuse = |reason: String| Msg::Refused { reason };
        let peer = self
            .drv
            .ctl
            .peers()
            .into_iter()
            .find(|p| p.name == host && names.contains(&host));
        let mismatch = if peer.is_none() {
            Some(format!(
                "host {host:?} (certificate for {names:?}) is not among this host's peers"
            ))
        } else if vm != self.cfg.vm {
            Some(format!("this node serves VM {:?}, not {vm:?}", self.cfg.vm))
        } else if mem_mib != self.cfg.mem_mib || vcpus != self.cfg.vcpus {
            Some(format!(
                "the VM has {mem_mib} MiB and {vcpus} vCPUs there, {} MiB and {} vCPUs here",
                self.cfg.mem_mib, self.cfg.vcpus
            ))
        } else if nics != self.cfg.def.nics.len() || disks.len() != self.cfg.def.all_disks().len() {
            Some(format!(
                "the VM has {nics} NICs and {} disks there, {} and {} here",
                disks.len(),
                self.cfg.def.nics.len(),
                self.cfg.def.all_disks().len()
            ))
        } else {
            None
        };
        if let Some(why) = mismatch {
            tracing::warn!(%from, "session refused: {why}");
            let _ = write_msg(&mut conn, &refuse(why)).await;
            return Ok(None);
        }
        let peer = peer.unwrap_or_else(|| unreachable!("checked above"));
        let offered = self.drv.d.handle(Event::SessionOffered { generation });
        if !offered
            .iter()
            .any(|a| matches!(a, Action::AcceptSession { .. }))
        {
            let known = self.drv.d.lock().known();
            let why =
                format!("generation {generation} is older than generation {known} known here");
            tracing::warn!(host = %host, "session refused: {why}");
            let _ = write_msg(&mut conn, &refuse(why)).await;
            return Ok(None);
        }
        // The secondary QEMU and the relays that feed it.
        let primary_data = primary_data.unwrap_or(peer.link.port().wrapping_add(1));
        let brk = Arc::new(tokio::sync::Notify::new());
        let (relays, mut sec) = match self
            .launch_secondary(&peer, primary_data, &disks, &brk)
            .await
        {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(host = %host, error = %e, "session refused: the secondary cannot start");
                self.drv.d.handle(Event::ReplicaDiscarded);
                self.kill().await;
                let _ = write_msg(&mut conn, &refuse(e.to_string())).await;
                return Ok(None);
            }
        };
        let ready = Msg::Ready {
            data_port: Some(self.cfg.data_port),
        };
        if write_msg(&mut conn, &ready).await.is_err() {
            self.drv.d.handle(Event::ReplicaDiscarded);
            self.kill().await;
            return Ok(None);
        }
        tracing::info!(primary = %host, generation, "following as COLO secondary");
        self.drv.ctl.set_role(Role::Secondary {
            primary: host.clone(),
        });
        let (hb, mut det) = self.drv.heartbeat_with(&peer).await?;
        self.drv.d.advertise(&hb);
        let (dead_tx, dead_rx) = tokio::sync::oneshot::channel::<()>();
        let watcher = tokio::spawn(async move {
            peer_dead(&mut det).await;
            let _ = dead_tx.send(());
            true
        });
        // Once in COLO, a break of the relay toward the primary's colo-compare stops this VM
        // until the decision (`hold_stopped`): its output would go to a dead compare.
        let mut hold = Box::pin(hold_stopped(&sec.qmp, &brk));
        // The session: `InColo` (within the setup's bound), then nothing until it ends.
        let mut synced = false;
        let ended = {
            let mut dead_rx = dead_rx;
            let setup_deadline = Instant::now() + SETUP_TIMEOUT;
            loop {
                tokio::select! {
                    m = read_msg(&mut conn) => match m {
                        Ok(Msg::InColo) if !synced => {
                            synced = true;
                            // A break before COLO (setup) is no sign of the primary's death.
                            let _ = tokio::time::timeout(Duration::ZERO, brk.notified()).await;
                            self.drv.d.handle(Event::FrameStaged { generation, epoch: 0, restorable: true });
                            self.drv.d.advertise(&hb);
                            tracing::info!(primary = %host, "in COLO: the replica is restorable");
                        }
                        Ok(other) => break format!("unexpected {other:?}"),
                        Err(e) => break format!("session ended: {e}"),
                    },
                    _ = &mut dead_rx => break "the primary is declared dead".to_string(),
                    e = sec.qemu.ended() => break format!("the secondary QEMU ended: {e}"),
                    n = &mut hold, if synced => match n {},
                    () = tokio::time::sleep_until(setup_deadline), if !synced => {
                        break format!("not in COLO within {SETUP_TIMEOUT:?}");
                    }
                }
            }
        };
        drop(conn);
        self.drv.d.handle(Event::LinkLost);
        tracing::info!(reason = %ended, synced, "COLO session ended");
        let dead = if watcher.is_finished() {
            watcher.await.unwrap_or(false)
        } else {
            let w = tokio::time::timeout(self.cfg.hb_timeout * 3, watcher);
            match holding(hold.as_mut(), synced, w).await {
                Ok(r) => r.unwrap_or(false),
                Err(_) => false,
            }
        };
        hb.shutdown().await;
        let qemu_alive = ax_qemu::process::alive(&self.run.pid()).is_some();
        if !dead || !synced || !qemu_alive {
            if dead && !synced {
                tracing::error!(vm = %self.cfg.vm, primary = %host, "VM lost to a double failure: the primary died before this host's secondary was in COLO");
            }
            drop(relays);
            self.kill().await;
            self.drv.d.handle(Event::ReplicaDiscarded);
            return Ok(None);
        }
        let decided = self.drv.d.handle(Event::PeerDead);
        let fencing = self.drv.start_fence(self.cfg.fence.clone(), host.clone());
        let outcome = holding(hold.as_mut(), synced, self.drv.settle(decided)).await;
        drop(relays);
        if !outcome.iter().any(|a| matches!(a, Action::Promote { .. })) {
            tracing::warn!(
                generation,
                "not promoting a stale secondary: waiting as a standby"
            );
            if let Some(f) = fencing {
                f.abort();
            }
            self.kill().await;
            return Ok(None);
        }
        if let Some(f) = fencing {
            let _ = holding(hold.as_mut(), synced, f).await;
        }
        drop(hold);
        // `take_over` ends with the VM running (`cont` from a stop).
        let t = std::time::Instant::now();
        match colo::take_over(&sec.qmp, &self.cfg.def, TAKE_OVER).await {
            Ok(r) => {
                tracing::info!(ms = t.elapsed().as_secs_f64() * 1e3, was = %r.was, status = %r.status, generation = self.drv.d.generation(), "took the VM over")
            }
            Err(e) => {
                // The generation is ours: the VM runs here or nowhere. Report it; QEMU's state decides.
                tracing::error!(error = %e, "COLO take-over failed");
            }
        }
        // The machine's orders after the promotion (the first resync) are the primary's to carry out.
        let after = outcome
            .into_iter()
            .filter(|a| !matches!(a, Action::Promote { .. }))
            .collect();
        Ok(Some((sec, after)))
    }

    /// Creates the base copies of the primary's disks, launches the secondary QEMU and its relays.
    async fn launch_secondary(
        &self,
        peer: &Peer,
        primary_data: u16,
        disks: &[DiskInfo],
        compare_break: &Arc<tokio::sync::Notify>,
    ) -> Result<(Vec<Relay>, Running), NodeError> {
        self.kill().await;
        // This host accepted a session of the generation that runs the VM: whatever copy of the
        // disks it kept (from a time it ran the VM, or an earlier session) is superseded.
        for (node, path) in self.cfg.def.all_disks() {
            if path.exists() {
                tracing::info!(node, path = %path.display(), "replacing this host's stale copy of the disk");
                std::fs::remove_file(&path).map_err(io_setup("removing a stale disk"))?;
            }
        }
        ax_qemu::migrate::create_disk_images(disks, &self.cfg.def)
            .map_err(io_setup("secondary disks"))?;
        let o = RelayOptions::default;
        let mut relays = Vec::new();
        let mine = SocketAddr::new(self.cfg.link_listen.ip(), self.cfg.data_port);
        let theirs = SocketAddr::new(peer.link.ip(), primary_data);
        let (r, _) = relay::tcp_to_unix(&port(mine, 0).to_string(), self.sock("mig.sock"), o())
            .await
            .map_err(io_setup("migration relay"))?;
        relays.push(r);
        let (r, _) = relay::tcp_to_unix(&port(mine, 1).to_string(), self.sock("nbd.sock"), o())
            .await
            .map_err(io_setup("NBD relay"))?;
        relays.push(r);
        let mut mirror = Vec::new();
        let mut compare = Vec::new();
        for i in 0..self.cfg.def.nics.len() {
            let k = 2 + 2 * i as u16;
            let (m, c) = (
                self.sock(&format!("mirror{i}-out.sock")),
                self.sock(&format!("compare{i}-out.sock")),
            );
            relays.push(
                relay::unix_to_tcp(&m, port(theirs, k).to_string(), o())
                    .await
                    .map_err(io_setup("mirror relay"))?,
            );
            let oc = RelayOptions {
                far_break: Some(Arc::clone(compare_break)),
                ..o()
            };
            relays.push(
                relay::unix_to_tcp(&c, port(theirs, k + 1).to_string(), oc)
                    .await
                    .map_err(io_setup("compare relay"))?,
            );
            mirror.push(Addr::unix(m));
            compare.push(Addr::unix(c));
        }
        let ch = SecondaryChannels {
            incoming: Addr::unix(self.sock("mig.sock")),
            nbd: Addr::unix(self.sock("nbd.sock")),
            mirror,
            compare,
        };
        let sec = colo::Secondary {
            def: &self.cfg.def,
            vm: &self.cfg.vm,
            mem_mib: self.cfg.mem_mib,
            vcpus: self.cfg.vcpus,
            files: &self.run,
            channels: &ch,
        };
        let (qemu, qmp, events) = colo::launch_secondary(&sec, disks, QEMU_TIMEOUT)
            .await
            .map_err(io_setup("secondary QEMU"))?;
        colo::prepare_secondary(&qmp, &self.cfg.def, &ch)
            .await
            .map_err(io_setup("secondary QMP"))?;
        Ok((
            relays,
            Running {
                qemu,
                qmp: Arc::new(qmp),
                events,
            },
        ))
    }

    /// Runs the VM as primary: solo until a peer accepts a session, protected while it lasts; when
    /// the secondary is lost (or removed from the peers) the machine claims a fresh generation — won:
    /// this QEMU leaves COLO and runs solo; lost: it is killed (fenced) and `None` is returned (the
    /// host stays a standby). `Some`: the VM ended here.
    async fn primary(
        &self,
        mut vm: Running,
        first: Vec<Action>,
    ) -> Result<Option<VmEnd>, NodeError> {
        self.hooks.running(&vm.qmp, vm.qemu.pid);
        self.drv.ctl.set_primary(
            ax_ft::output::OutputLog::new(Vec::new()),
            Arc::clone(&self.generation),
        );
        let mut acts = self.drv.settle(first).await;
        loop {
            self.generation
                .store(self.drv.d.generation(), Ordering::Release);
            if acts.iter().any(|a| matches!(a, Action::Fence { .. })) {
                self.fenced().await;
                return Ok(None);
            }
            if self.drv.d.mode() == Some(Mode::Solo) {
                self.drv.ctl.set_role(Role::Solo);
            }
            let resync = acts
                .iter()
                .find_map(|a| match a {
                    Action::StartResync { generation } => Some(*generation),
                    _ => None,
                })
                .filter(|_| self.drv.d.mode() == Some(Mode::Solo));
            if let Some(generation) = resync {
                match self.protect(&mut vm, generation).await? {
                    SessionEnd::VmEnded(end) => return Ok(Some(end)),
                    SessionEnd::Over(next) => {
                        acts = next;
                        continue;
                    }
                }
            }
            // Solo, waiting for the machine's next resync (or the VM's end).
            let wake = self
                .drv
                .d
                .next_deadline()
                .unwrap_or_else(|| Instant::now() + Duration::from_millis(200));
            tokio::select! {
                end = vm_end(&mut vm, &*self.hooks, None) => return Ok(Some(end)),
                () = tokio::time::sleep_until(wake) => {}
            }
            acts = self.drv.settle(self.drv.d.handle(Event::Tick)).await;
        }
    }

    async fn fenced(&self) {
        tracing::warn!(host = %self.cfg.host, vm = %self.cfg.vm, "superseded: a newer generation runs elsewhere; this host's QEMU is killed and it stays a standby");
        self.drv.ctl.set_stats(None);
        self.kill().await;
    }

    /// One protection session to the first peer that accepts, until it ends; returns the machine's
    /// actions after it.
    ///
    /// Checkpoints are counted from the primary's `RESUME` events while in COLO (ax sees no epochs of
    /// COLO's): the primary resumes after the secondary reported the checkpoint loaded, so each one
    /// is an acknowledged epoch (`PrimaryStats::acked_plus_one`); the sync is done at `InColo`.
    async fn protect(&self, vm: &mut Running, generation: u64) -> Result<SessionEnd, NodeError> {
        let disks = ax_qemu::migrate::source_disks(&vm.qmp, &self.cfg.def)
            .await
            .map_err(io_setup("the VM's disks"))?;
        let Some((mut conn, peer, peer_data)) = self.offer(generation, &disks).await else {
            let acts = self.drv.d.handle(Event::ResyncFailed);
            return Ok(SessionEnd::Over(self.drv.settle(acts).await));
        };
        // From here a replica of this generation may exist.
        let acts = self.drv.d.handle(Event::SessionOpened);
        let _ = self.drv.settle(acts).await;
        let (hb, mut det) = self.drv.heartbeat_with(&peer).await?;
        self.drv.d.advertise(&hb);
        self.drv.ctl.set_role(Role::Protected {
            peer: peer.name.clone(),
        });
        let stats = Arc::new(ax_ft::ft::PrimaryStats::default());
        *stats.sync.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(statepoint::epoch::SyncProgress::default());
        self.drv.ctl.set_stats(Some(Arc::clone(&stats)));
        let relays = self.primary_relays(&peer, peer_data).await;
        let mut leaving = Vec::new();
        let mut relays = match relays {
            Err(e) => {
                tracing::warn!(error = %e, "COLO relays");
                leaving.extend(self.drv.d.handle(Event::LinkLost));
                Vec::new()
            }
            Ok((relays, ch)) => {
                let opts = ProtectOptions {
                    checkpoint_delay_ms: self.cfg.epoch.as_millis().max(1) as u64,
                    max_bandwidth: self
                        .cfg
                        .max_bandwidth
                        .or(ProtectOptions::default().max_bandwidth),
                    ..ProtectOptions::default()
                };
                let mut last_phase = None;
                let r = colo::protect(&vm.qmp, &self.cfg.def, &disks, &ch, &opts, &mut |p| {
                    if last_phase != Some(p.phase) {
                        last_phase = Some(p.phase);
                        tracing::info!(phase = ?p.phase, status = %p.status, transferred = p.transferred, remaining = p.remaining, "COLO setup");
                    }
                    if let Some(sync) = stats.sync.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
                        sync.bytes_sent = p.transferred;
                    }
                })
                .await;
                match r {
                    Err(e) => {
                        tracing::warn!(secondary = %peer.name, error = %e, "COLO setup failed");
                        leaving.extend(self.drv.d.handle(Event::LinkLost));
                    }
                    Ok(report) => {
                        tracing::info!(secondary = %peer.name, ?report, "protection complete: in COLO");
                        let _ = write_msg(&mut conn, &Msg::InColo).await;
                        let mut a = self.drv.d.handle(Event::EpochCaptured { epoch: 0 });
                        a.extend(self.drv.d.handle(Event::ReplicaAcked {
                            generation,
                            epoch: 0,
                        }));
                        let _ = self.drv.settle(a).await;
                        if let Some(sync) = stats
                            .sync
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .as_mut()
                        {
                            sync.done = true;
                        }
                        stats.acked_plus_one.store(1, Ordering::Release);
                        // Protected: until the session, the peer or the VM ends, the peer is
                        // removed, or COLO stalls.
                        let mut buf = [0u8; 1];
                        let stall = COLO_STALL.max(self.cfg.epoch * 50);
                        let mut watch = ColoWatch {
                            stats: Arc::clone(&stats),
                            stopped_since: None,
                        };
                        loop {
                            let second = Instant::now() + Duration::from_secs(1);
                            let wake = self.drv.d.next_deadline().map_or(second, |d| d.min(second));
                            let mut acts = tokio::select! {
                                end = vm_end(vm, &*self.hooks, Some(&mut watch)) => {
                                    drop(relays);
                                    hb.shutdown().await;
                                    self.drv.ctl.set_stats(None);
                                    return Ok(SessionEnd::VmEnded(end));
                                }
                                r = conn.read(&mut buf) => {
                                    tracing::warn!(secondary = %peer.name, result = ?r.map_err(|e| e.to_string()), "COLO session ended");
                                    self.drv.d.handle(Event::LinkLost)
                                }
                                () = self.drv.ctl.peer_removed(&peer.name) => {
                                    tracing::info!(secondary = %peer.name, "asked to stop protecting");
                                    self.drv.d.handle(Event::LinkLost)
                                }
                                ev = det.events.recv() => match ev.as_ref().and_then(Event::from_peer) {
                                    Some(e) => self.drv.d.handle(e),
                                    None => Vec::new(),
                                },
                                () = tokio::time::sleep_until(wake) => self.drv.d.handle(Event::Tick),
                            };
                            if let Some(t) = watch.stopped_since.filter(|t| t.elapsed() > stall) {
                                if self.drv.d.mode() == Some(Mode::Protected) {
                                    tracing::warn!(secondary = %peer.name, stopped_s = t.elapsed().as_secs_f64(), "COLO stalled: the VM has been stopped since a checkpoint; leaving COLO");
                                    acts.extend(self.drv.d.handle(Event::LinkLost));
                                }
                            }
                            let lost = self.drv.d.mode() != Some(Mode::Protected);
                            leaving.extend(acts);
                            if lost {
                                break;
                            }
                        }
                    }
                }
                relays
            }
        };
        if !self.drv.d.claiming() && self.drv.d.mode() == Some(Mode::Protected) {
            leaving.extend(self.drv.d.handle(Event::LinkLost));
        }
        // The claim is decided while the session and COLO's channels are still up: a secondary that
        // is alive sees the session end only after this host holds the fresh generation (a
        // secondary's claim of the old one then fails at the coordinator whatever the timing).
        let acts = self.drv.settle(leaving).await;
        self.drv.ctl.set_stats(None);
        let fenced = acts.iter().any(|a| matches!(a, Action::Fence { .. }));
        // The claim is settled: COLO's channels go first. Over a cut link QEMU's NBD client and
        // migration stream would block its main loop (and `x-colo-lost-heartbeat` with it) until
        // their sockets close; dropping the relays closes them at once.
        relays.clear();
        if !fenced {
            // Won: this QEMU leaves COLO and runs on its own.
            match colo::take_over(&vm.qmp, &self.cfg.def, TAKE_OVER).await {
                Ok(r) => {
                    tracing::info!(was = %r.was, ms = r.ms, generation = self.drv.d.generation(), "running solo")
                }
                Err(e) => {
                    tracing::warn!(error = %e, "leaving COLO on the primary");
                    colo::unprotect(&vm.qmp, &self.cfg.def).await;
                }
            }
        }
        drop(conn);
        hb.shutdown().await;
        Ok(SessionEnd::Over(acts))
    }

    /// Offers a session under `generation` to each peer in turn; the first that answers `Ready`.
    async fn offer(
        &self,
        generation: u64,
        disks: &[DiskInfo],
    ) -> Option<(tokio_rustls::client::TlsStream<TcpStream>, Peer, u16)> {
        for peer in self.drv.ctl.peers() {
            let attempt = async {
                let tcp = TcpStream::connect(peer.link).await.ok()?;
                let _ = tcp.set_nodelay(true);
                session_keepalive(&tcp, self.cfg.hb_timeout);
                let name = rustls::pki_types::ServerName::try_from(peer.name.clone()).ok()?;
                let mut conn = self.client_tls.connect(name, tcp).await.ok()?;
                write_msg(
                    &mut conn,
                    &Msg::Offer {
                        vm: self.cfg.vm.clone(),
                        host: self.cfg.host.clone(),
                        generation,
                        mem_mib: self.cfg.mem_mib,
                        vcpus: self.cfg.vcpus,
                        disks: disks.to_vec(),
                        nics: self.cfg.def.nics.len(),
                        data_port: Some(self.cfg.data_port),
                    },
                )
                .await
                .ok()?;
                Some(conn)
            };
            let Ok(Some(mut conn)) = tokio::time::timeout(HANDSHAKE, attempt).await else {
                continue;
            };
            // The peer launches its QEMU before it answers.
            match tokio::time::timeout(QEMU_TIMEOUT * 2, read_msg(&mut conn)).await {
                Ok(Ok(Msg::Ready { data_port })) => {
                    let d = data_port.unwrap_or(peer.link.port().wrapping_add(1));
                    return Some((conn, peer, d));
                }
                Ok(Ok(Msg::Refused { reason })) => {
                    tracing::warn!(peer = %peer.name, reason = %reason, "COLO session refused")
                }
                other => {
                    tracing::warn!(peer = %peer.name, answer = ?other.map(|r| r.map_err(|e| e.to_string())), "COLO session: no answer")
                }
            }
        }
        None
    }

    /// The primary's relays (migration and NBD out to the secondary; the NICs' mirror and compare
    /// listeners) and the channels QEMU uses.
    async fn primary_relays(
        &self,
        peer: &Peer,
        peer_data: u16,
    ) -> Result<(Vec<Relay>, PrimaryChannels), std::io::Error> {
        let theirs = SocketAddr::new(peer.link.ip(), peer_data);
        let mine = SocketAddr::new(self.cfg.link_listen.ip(), self.cfg.data_port);
        let o = RelayOptions::default;
        let mut relays = Vec::new();
        relays.push(
            relay::unix_to_tcp(&self.sock("mig-out.sock"), port(theirs, 0).to_string(), o())
                .await?,
        );
        relays.push(
            relay::unix_to_tcp(&self.sock("nbd-out.sock"), port(theirs, 1).to_string(), o())
                .await?,
        );
        let mut mirror = Vec::new();
        let mut compare = Vec::new();
        for i in 0..self.cfg.def.nics.len() {
            let k = 2 + 2 * i as u16;
            let (m, c) = (
                self.sock(&format!("mirror{i}.sock")),
                self.sock(&format!("compare{i}.sock")),
            );
            let (r, _) = relay::tcp_to_unix(&port(mine, k).to_string(), m.clone(), o()).await?;
            relays.push(r);
            let (r, _) = relay::tcp_to_unix(&port(mine, k + 1).to_string(), c.clone(), o()).await?;
            relays.push(r);
            mirror.push(Addr::unix(m));
            compare.push(Addr::unix(c));
        }
        Ok((
            relays,
            PrimaryChannels {
                migrate: Addr::unix(self.sock("mig-out.sock")),
                nbd: Addr::unix(self.sock("nbd-out.sock")),
                mirror,
                compare,
                dir: self.run.dir.clone(),
            },
        ))
    }
}

/// How a protection session ended.
enum SessionEnd {
    /// The VM ended.
    VmEnded(VmEnd),
    /// The session is over; the machine's actions after it.
    Over(Vec<Action>),
}

/// What a protected primary follows of its QEMU's events while in COLO.
struct ColoWatch {
    /// Checkpoints: each `RESUME` is one acknowledged.
    stats: Arc<ax_ft::ft::PrimaryStats>,
    /// Since when the VM is stopped (a checkpoint under way, or COLO stalled).
    stopped_since: Option<Instant>,
}

/// Resolves when the VM's QEMU ends, the guest shuts down or panics. Every event goes to the hooks;
/// with `watch` (protected, in COLO) each `RESUME` counts one acknowledged checkpoint and `STOP`s are
/// timed.
async fn vm_end(
    vm: &mut Running,
    hooks: &dyn ColoHooks,
    mut watch: Option<&mut ColoWatch>,
) -> VmEnd {
    loop {
        tokio::select! {
            e = vm.qemu.ended() => return VmEnd::Died(e.to_string()),
            ev = vm.events.next() => match ev {
                Some(e) => {
                    hooks.event(&e);
                    match e.lifecycle() {
                        Some(Lifecycle::Shutdown { reason, .. })
                            if reason != "host-qmp-system-reset" =>
                        {
                            return VmEnd::Shutdown(reason);
                        }
                        Some(Lifecycle::Panicked { info, .. }) => {
                            return VmEnd::Panicked(info);
                        }
                        Some(Lifecycle::Resumed) => {
                            if let Some(w) = watch.as_deref_mut() {
                                w.stopped_since = None;
                                let n = w.stats.sent.fetch_add(1, Ordering::AcqRel) + 1;
                                w.stats.acked_plus_one.store(n + 1, Ordering::Release);
                            }
                        }
                        Some(Lifecycle::Stopped) => {
                            if let Some(w) = watch.as_deref_mut() {
                                w.stopped_since.get_or_insert_with(Instant::now);
                            }
                        }
                        _ => {}
                    }
                }
                None => {
                    // The QMP connection closed: QEMU is going.
                    return VmEnd::Died(vm.qemu.ended().await.to_string());
                }
            },
        }
    }
}

/// Keeps the secondary's VM stopped once `brk` fires: the relay toward the primary's colo-compare
/// broke (its QEMU died, or the host's kernel reset the connection), so whatever the guest sends now
/// reaches no compare and no client. `stop` at once, then again whenever the VM runs (a checkpoint
/// that was in flight ends with QEMU's own `vm_start`), every [`HOLD_POLL`]. Never resolves: the
/// caller drops it before the take-over (which ends with `cont`) or the kill. Safety does not rest on
/// it: a stop is no decision, and a stopped secondary that loses is killed like a running one.
async fn hold_stopped(qmp: &Qmp, brk: &tokio::sync::Notify) -> std::convert::Infallible {
    brk.notified().await;
    let t = std::time::Instant::now();
    let r = qmp.execute("stop", serde_json::Value::Null).await;
    tracing::info!(
        ok = r.is_ok(),
        ms = t.elapsed().as_secs_f64() * 1e3,
        "the relay to the primary's colo-compare broke: the VM is stopped until the decision"
    );
    loop {
        tokio::time::sleep(HOLD_POLL).await;
        let running = qmp
            .execute("query-status", serde_json::Value::Null)
            .await
            .ok()
            .and_then(|v| v.get("running").and_then(serde_json::Value::as_bool));
        if running == Some(true) {
            let _ = qmp.execute("stop", serde_json::Value::Null).await;
            tracing::info!("a checkpoint restarted the VM: stopped again");
        }
    }
}

/// Runs `f`, meanwhile polling `hold` when `armed`.
async fn holding<F: std::future::Future>(
    hold: std::pin::Pin<&mut impl std::future::Future<Output = std::convert::Infallible>>,
    armed: bool,
    f: F,
) -> F::Output {
    if !armed {
        return f.await;
    }
    tokio::select! {
        r = f => r,
        n = hold => match n {},
    }
}

/// The directory a node keeps QEMU's files in.
pub fn run_dir(state_dir: &Path, vm: &str) -> PathBuf {
    state_dir.join(format!("{vm}.run"))
}
