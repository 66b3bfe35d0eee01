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
//!   Ports, from the node's link port `P`: `P` the session's TLS connection; on the secondary `P+1` the
//!   migration stream and `P+2` NBD; on the primary `P+3+2i` the `filter-mirror` of NIC `i` and
//!   `P+4+2i` its compare input. The data relays exist only while a session is accepted.
//! - **Failover.** A secondary whose session ended and whose primary the detector declares dead claims
//!   the next generation (after the session is over, so nothing follows the decision); only if it wins
//!   does it take the VM over ([`ax_qemu::colo::take_over`]: `x-colo-lost-heartbeat`, filters removed,
//!   `announce-self`) and run it as primary (solo), then protect it again to the next peer that
//!   accepts. A primary that loses its secondary claims too: won, it takes over its own QEMU and runs
//!   solo; lost (the secondary promoted), it kills its QEMU (fenced) and stays a standby.
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
    /// The session's TLS listen address; the data relays use the ports after it.
    pub link_listen: SocketAddr,
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
    /// The generation record and QEMU's run directory (`<state-dir>/<vm>.run`).
    pub state_dir: PathBuf,
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
    },
    /// Peer → primary: the secondary QEMU waits for the stream.
    Ready,
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

/// The relay ports of a node whose link port is `base`.
fn port(base: SocketAddr, offset: u16) -> SocketAddr {
    SocketAddr::new(base.ip(), base.port().wrapping_add(offset))
}

/// A running QEMU of this node and its QMP.
struct Running {
    qemu: Qemu,
    qmp: Qmp,
    events: Events,
}

/// Runs the node until its VM ends (exit code 0) or it fails.
pub async fn run(mut cfg: ColoNodeConfig) -> Result<i32, NodeError> {
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
    let ctl = Arc::new(NodeControl::new(cfg.peers.clone()));
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
        cfg.boot,
        RoleConfig::default(),
    )?;
    let node = ColoNode {
        run: RunFiles {
            dir: run_dir(&cfg.state_dir, &cfg.vm),
        },
        cfg,
        drv,
        client_tls,
    };
    std::fs::create_dir_all(&node.run.dir).map_err(io_setup("run dir"))?;
    if node.cfg.boot {
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
        let first = node.drv.d.start();
        let code = node.primary(Running { qemu, qmp, events }, first).await?;
        if code != EXIT_FENCED {
            return Ok(code);
        }
    }
    loop {
        node.drv.ctl.set_role(Role::Standby);
        match node.standby(&listener, &server_tls).await? {
            Some((vm, after)) => {
                let code = node.primary(vm, after).await?;
                if code != EXIT_FENCED {
                    return Ok(code);
                }
            }
            None => continue,
        }
    }
}

struct ColoNode {
    cfg: ColoNodeConfig,
    run: RunFiles,
    drv: Driver,
    client_tls: tokio_rustls::TlsConnector,
}

/// How the VM's QEMU on this host ended, if it did.
enum VmEnd {
    /// The guest shut down (or QEMU quit by a request): the VM is over.
    Shutdown(String),
    /// QEMU died.
    Died(String),
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
        let brk = Arc::new(tokio::sync::Notify::new());
        let (relays, mut sec) = match self.launch_secondary(&peer, &disks, &brk).await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(host = %host, error = %e, "session refused: the secondary cannot start");
                self.drv.d.handle(Event::ReplicaDiscarded);
                self.kill().await;
                let _ = write_msg(&mut conn, &refuse(e.to_string())).await;
                return Ok(None);
            }
        };
        if write_msg(&mut conn, &Msg::Ready).await.is_err() {
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
        let link = self.cfg.link_listen;
        let (r, _) = relay::tcp_to_unix(&port(link, 1).to_string(), self.sock("mig.sock"), o())
            .await
            .map_err(io_setup("migration relay"))?;
        relays.push(r);
        let (r, _) = relay::tcp_to_unix(&port(link, 2).to_string(), self.sock("nbd.sock"), o())
            .await
            .map_err(io_setup("NBD relay"))?;
        relays.push(r);
        let mut mirror = Vec::new();
        let mut compare = Vec::new();
        for i in 0..self.cfg.def.nics.len() {
            let k = 3 + 2 * i as u16;
            let (m, c) = (
                self.sock(&format!("mirror{i}-out.sock")),
                self.sock(&format!("compare{i}-out.sock")),
            );
            relays.push(
                relay::unix_to_tcp(&m, port(peer.link, k).to_string(), o())
                    .await
                    .map_err(io_setup("mirror relay"))?,
            );
            let oc = RelayOptions {
                far_break: Some(Arc::clone(compare_break)),
                ..o()
            };
            relays.push(
                relay::unix_to_tcp(&c, port(peer.link, k + 1).to_string(), oc)
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
        Ok((relays, Running { qemu, qmp, events }))
    }

    /// Runs the VM as primary: solo until a peer accepts a session, protected while it lasts; when
    /// the secondary is lost the machine claims a fresh generation — won: this QEMU leaves COLO and
    /// runs solo; lost: it is killed (fenced) and the node returns [`EXIT_FENCED`] to stay a standby.
    async fn primary(&self, mut vm: Running, first: Vec<Action>) -> Result<i32, NodeError> {
        let mut acts = self.drv.settle(first).await;
        let mut epoch = 0u64;
        loop {
            if acts.iter().any(|a| matches!(a, Action::Fence { .. })) {
                return Ok(self.fenced().await);
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
                match self.protect(&mut vm, generation, &mut epoch).await? {
                    SessionEnd::VmEnded(end) => return Ok(self.vm_ended(end)),
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
                end = vm_end(&mut vm) => return Ok(self.vm_ended(end)),
                () = tokio::time::sleep_until(wake) => {}
            }
            acts = self.drv.settle(self.drv.d.handle(Event::Tick)).await;
        }
    }

    async fn fenced(&self) -> i32 {
        tracing::warn!(host = %self.cfg.host, vm = %self.cfg.vm, "superseded: a newer generation runs elsewhere; this host's QEMU is killed and it stays a standby");
        self.kill().await;
        EXIT_FENCED
    }

    fn vm_ended(&self, end: VmEnd) -> i32 {
        match end {
            VmEnd::Shutdown(r) => {
                tracing::info!(reason = %r, "the VM shut down");
                0
            }
            VmEnd::Died(r) => {
                tracing::error!(reason = %r, "QEMU died on the primary");
                1
            }
        }
    }

    /// One protection session to the first peer that accepts, until it ends; returns the machine's
    /// actions after it.
    async fn protect(
        &self,
        vm: &mut Running,
        generation: u64,
        epoch: &mut u64,
    ) -> Result<SessionEnd, NodeError> {
        let disks = ax_qemu::migrate::source_disks(&vm.qmp, &self.cfg.def)
            .await
            .map_err(io_setup("the VM's disks"))?;
        let Some((mut conn, peer)) = self.offer(generation, &disks).await else {
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
        let relays = self.primary_relays(&peer).await;
        let mut leaving = Vec::new();
        match relays {
            Err(e) => {
                tracing::warn!(error = %e, "COLO relays");
                leaving.extend(self.drv.d.handle(Event::LinkLost));
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
                        let e = *epoch;
                        *epoch += 1;
                        let mut a = self.drv.d.handle(Event::EpochCaptured { epoch: e });
                        a.extend(self.drv.d.handle(Event::ReplicaAcked {
                            generation,
                            epoch: e,
                        }));
                        let _ = self.drv.settle(a).await;
                        // Protected: until the session, the peer or the VM ends.
                        let mut buf = [0u8; 1];
                        loop {
                            let wake = self
                                .drv
                                .d
                                .next_deadline()
                                .unwrap_or_else(|| Instant::now() + Duration::from_secs(1));
                            let acts = tokio::select! {
                                end = vm_end(vm) => {
                                    drop(relays);
                                    hb.shutdown().await;
                                    return Ok(SessionEnd::VmEnded(end));
                                }
                                r = conn.read(&mut buf) => {
                                    tracing::warn!(secondary = %peer.name, result = ?r.map_err(|e| e.to_string()), "COLO session ended");
                                    self.drv.d.handle(Event::LinkLost)
                                }
                                ev = det.events.recv() => match ev.as_ref().and_then(Event::from_peer) {
                                    Some(e) => self.drv.d.handle(e),
                                    None => Vec::new(),
                                },
                                () = tokio::time::sleep_until(wake) => self.drv.d.handle(Event::Tick),
                            };
                            let lost = self.drv.d.mode() != Some(Mode::Protected);
                            leaving.extend(acts);
                            if lost {
                                break;
                            }
                        }
                    }
                }
                drop(relays);
            }
        }
        drop(conn);
        hb.shutdown().await;
        if !self.drv.d.claiming() && self.drv.d.mode() == Some(Mode::Protected) {
            leaving.extend(self.drv.d.handle(Event::LinkLost));
        }
        let acts = self.drv.settle(leaving).await;
        if acts.iter().any(|a| matches!(a, Action::Fence { .. })) {
            return Ok(SessionEnd::Over(acts));
        }
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
        Ok(SessionEnd::Over(acts))
    }

    /// Offers a session under `generation` to each peer in turn; the first that answers `Ready`.
    async fn offer(
        &self,
        generation: u64,
        disks: &[DiskInfo],
    ) -> Option<(tokio_rustls::client::TlsStream<TcpStream>, Peer)> {
        for peer in self.drv.ctl.peers() {
            let attempt = async {
                let tcp = TcpStream::connect(peer.link).await.ok()?;
                let _ = tcp.set_nodelay(true);
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
                Ok(Ok(Msg::Ready)) => return Some((conn, peer)),
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
    ) -> Result<(Vec<Relay>, PrimaryChannels), std::io::Error> {
        let o = RelayOptions::default;
        let mut relays = Vec::new();
        relays.push(
            relay::unix_to_tcp(
                &self.sock("mig-out.sock"),
                port(peer.link, 1).to_string(),
                o(),
            )
            .await?,
        );
        relays.push(
            relay::unix_to_tcp(
                &self.sock("nbd-out.sock"),
                port(peer.link, 2).to_string(),
                o(),
            )
            .await?,
        );
        let mut mirror = Vec::new();
        let mut compare = Vec::new();
        for i in 0..self.cfg.def.nics.len() {
            let k = 3 + 2 * i as u16;
            let (m, c) = (
                self.sock(&format!("mirror{i}.sock")),
                self.sock(&format!("compare{i}.sock")),
            );
            let (r, _) =
                relay::tcp_to_unix(&port(self.cfg.link_listen, k).to_string(), m.clone(), o())
                    .await?;
            relays.push(r);
            let (r, _) = relay::tcp_to_unix(
                &port(self.cfg.link_listen, k + 1).to_string(),
                c.clone(),
                o(),
            )
            .await?;
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

/// Resolves when the VM's QEMU ends or the guest shuts down.
async fn vm_end(vm: &mut Running) -> VmEnd {
    loop {
        tokio::select! {
            e = vm.qemu.ended() => return VmEnd::Died(e.to_string()),
            ev = vm.events.next() => match ev {
                Some(e) => {
                    if let Some(Lifecycle::Shutdown { reason, .. }) = e.lifecycle() {
                        return VmEnd::Shutdown(reason);
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
