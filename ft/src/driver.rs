//! The decision driver shared by every FT node: this host's [`RoleMachine`] for one VM behind a lock
//! ([`Decider`]), and the I/O its decisions need — compare-and-set requests to the coordinator until
//! the machine has decided ([`Driver::settle`]), the durable record of every generation won
//! ([`Driver::persist`]), heartbeats and a failure detector per peer ([`Driver::heartbeat_with`]),
//! and the fence of an old primary ([`Driver::start_fence`]).
//!
//! Two data paths drive it: the native engine's node ([`crate::node`]) and the QEMU COLO node of the
//! agent (`ax_agent::colo_node`). Whatever the data path, the same machine decides who may run the VM.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use failover::coordinator::{CasRequest, CoordError, Coordinator};
use failover::detector::{self, DetectorConfig, PeerEvent};
use failover::heartbeat::{self, Heartbeat, HeartbeatConfig, PathConfig};
use failover::role::{Action, Event, Mode, RoleConfig, RoleMachine};
use tokio::time::Instant;

use crate::certs::TlsIdentity;
use crate::control::NodeControl;
use crate::coord::{AnyCoordinator, CoordTarget};
use crate::node::{FenceConfig, NodeError, Peer};

fn setup<E: std::fmt::Display>(what: &str) -> impl FnOnce(E) -> NodeError + '_ {
    move |e| NodeError::Setup(format!("{what}: {e}"))
}

/// What a [`Driver`] needs to know of its node.
#[derive(Clone, Debug)]
pub struct DriverConfig {
    /// This host's name.
    pub host: String,
    /// The VM's name.
    pub vm: String,
    /// Where the VM's generations are kept (the witness or etcd).
    pub coordinator: CoordTarget,
    /// Heartbeat address.
    pub hb_listen: SocketAddr,
    /// Second heartbeat path's local address (used with peers that have one).
    pub hb2_listen: Option<SocketAddr>,
    /// Heartbeat interval.
    pub hb_interval: Duration,
    /// Heartbeat timeout (dead after this much silence).
    pub hb_timeout: Duration,
    /// Where the VM's generation record lives (`<state-dir>/<vm>.generation`).
    pub state_dir: PathBuf,
}

/// The decision driver of one node (see the module doc).
#[allow(missing_debug_implementations)]
pub struct Driver {
    /// What it was built with.
    pub cfg: DriverConfig,
    coord: AnyCoordinator,
    /// Who this process is at the coordinator: `host#incarnation`. A restarted agent is a new
    /// claimant, so "the newer generation is yours" is only ever said to the process that asked.
    claimant: String,
    /// Where the highest generation won or learned is recorded ([`Action::Persist`]).
    known_file: PathBuf,
    /// The controller's hooks (peers, roles, counters).
    pub ctl: Arc<NodeControl>,
    /// The role machine.
    pub d: Decider,
}

impl Driver {
    /// A driver whose machine starts as a primary (`primary`: it boots or already runs the VM) or as a
    /// secondary, knowing the generation recorded in the state dir (or the controller's, if higher).
    pub fn new(
        cfg: DriverConfig,
        identity: &TlsIdentity,
        ctl: Arc<NodeControl>,
        primary: bool,
        role: RoleConfig,
    ) -> Result<Driver, NodeError> {
        let coord = AnyCoordinator::connect(&cfg.coordinator, identity)?;
        let claimant = format!("{}#{}", cfg.host, heartbeat::new_incarnation());
        if claimant.len() > failover::coordinator::MAX_CLAIMANT {
            return Err(NodeError::Setup(format!(
                "host name {:?} is too long (at most {} bytes with the incarnation)",
                cfg.host,
                failover::coordinator::MAX_CLAIMANT
            )));
        }
        let known_file = crate::coord::generation_file(&cfg.state_dir, &cfg.vm);
        let known = crate::coord::read_generation(&known_file).max(ctl.known_generation);
        let machine = if primary {
            RoleMachine::new_primary(role, known)?
        } else {
            RoleMachine::new_secondary(role, known)?
        };
        Ok(Driver {
            cfg,
            coord,
            claimant,
            known_file,
            ctl,
            d: Decider(Arc::new(Mutex::new(machine))),
        })
    }

    /// Records `generation` durably before anything that follows the win is done.
    pub fn persist(&self, generation: u64) {
        if let Err(e) = crate::coord::write_generation(&self.known_file, generation) {
            tracing::error!(error = %e, file = %self.known_file.display(), generation, "cannot record the generation won: if the witness also loses its state, this host may claim too low after a restart");
        }
    }

    /// Carries out the coordinator requests and records among `acts` until the machine has no claim
    /// left to decide; returns the other actions, in order. A coordinator that does not answer is
    /// asked again (the same request) for as long as it takes: a decision is never taken back, only
    /// resolved by the coordinator.
    pub async fn settle(&self, acts: Vec<Action>) -> Vec<Action> {
        let mut out = Vec::new();
        let mut pending = acts;
        let mut failures = 0u64;
        loop {
            let mut ask = None;
            for a in pending.drain(..) {
                match a {
                    Action::Persist { generation } => self.persist(generation),
                    Action::Cas { expected, reason } => ask = Some((expected, reason)),
                    other => out.push(other),
                }
            }
            if let Some((expected, reason)) = ask {
                let mut members = vec![self.cfg.host.clone()];
                members.extend(self.ctl.peers().into_iter().map(|p| p.name));
                members.truncate(failover::coordinator::MAX_MEMBERS);
                let req = CasRequest {
                    vm: self.cfg.vm.clone(),
                    claimant: self.claimant.clone(),
                    expected,
                    members,
                    witness: 0,
                };
                // Unanswered in time: the role machine asks again, unchanged.
                let limit = self.cfg.coordinator.request_limit();
                let r = match tokio::time::timeout(limit, self.coord.cas(&req)).await {
                    Ok(r) => r,
                    Err(_) => Err(CoordError::Unreachable(format!("no answer in {limit:?}"))),
                };
                match &r {
                    Ok(o) => tracing::info!(expected, ?reason, outcome = ?o, "coordinator"),
                    Err(e) => {
                        failures += 1;
                        if failures == 1 || failures.is_multiple_of(20) {
                            tracing::warn!(error = %e, expected, ?reason, failures, "coordinator: no answer; asking again (output that needs the answer stays held)");
                        }
                    }
                }
                pending = self.d.handle(Event::from_cas(r));
                continue;
            }
            if !self.d.claiming() {
                return out;
            }
            let at = self
                .d
                .next_deadline()
                .unwrap_or_else(|| Instant::now() + Duration::from_millis(50));
            tokio::time::sleep_until(at).await;
            pending = self.d.handle(Event::Tick);
        }
    }

    /// Heartbeats and a failure detector for `peer`. Binding is retried for a while: the address may
    /// still be held by a session that is closing.
    pub async fn heartbeat_with(
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

    /// Fences the old primary `host` in a task while the claim is decided: with `required`, retried
    /// every second until it succeeds (the task's answer is `true` then); otherwise one attempt.
    pub fn start_fence(
        &self,
        fence: Option<FenceConfig>,
        host: String,
    ) -> Option<tokio::task::JoinHandle<bool>> {
        fence.map(|f| {
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
                            tracing::error!(error = %e, "fencing failed: promoting on the coordinator's answer alone");
                            return false;
                        }
                    }
                }
            })
        })
    }
}

/// The node's decision-maker: this host's [`RoleMachine`] for the VM, behind a lock, fed by the driver
/// (coordinator answers, detector verdicts, sessions) and by the data path (captured and acknowledged
/// epochs, staged frames). Every decision — release, acknowledge, claim, promote, fence — is the
/// machine's; the node carries the actions out.
#[derive(Clone, Debug)]
pub struct Decider(pub Arc<Mutex<RoleMachine>>);

impl Decider {
    pub fn lock(&self) -> std::sync::MutexGuard<'_, RoleMachine> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn handle(&self, ev: Event) -> Vec<Action> {
        self.lock().handle(Instant::now(), ev)
    }

    pub fn start(&self) -> Vec<Action> {
        self.lock().start(Instant::now())
    }

    pub fn generation(&self) -> u64 {
        self.lock().generation()
    }

    pub fn claiming(&self) -> bool {
        self.lock().claiming()
    }

    pub fn mode(&self) -> Option<Mode> {
        self.lock().mode()
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        self.lock().next_deadline()
    }

    /// Where the next session's epochs start in the machine's numbering: after every epoch released.
    pub fn next_base(&self) -> u64 {
        self.lock().released().map_or(0, |e| e + 1)
    }

    pub fn advertise(&self, hb: &heartbeat::HeartbeatHandle) {
        let (role, generation) = self.lock().heartbeat_status();
        hb.set_status(role, generation);
    }
}

/// Resolves when the detector declares the peer dead (or restarted: its previous life is over).
pub async fn peer_dead(det: &mut detector::DetectorHandle) {
    while let Some(ev) = det.events.recv().await {
        if matches!(ev, PeerEvent::Dead { .. } | PeerEvent::Restarted { .. }) {
            return;
        }
    }
    std::future::pending::<()>().await;
}
