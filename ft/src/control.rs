//! How a controller (the agent daemon, through a VM worker's control socket) steers an FT node and
//! reads its state: the node's peers can change while it runs, a primary can be told to stop
//! protecting its VM, and every role change and the primary's counters are published here.
//!
//! [`NodeControl`] is what [`crate::node::run_controlled`] reads; [`Role`] and [`GuestEnd`] are what
//! the node reports (the agent's worker passes them on over its socket).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::ft::PrimaryStats;
use crate::node::Peer;
use crate::output::OutputLog;

/// What a node is doing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "role", rename_all = "snake_case")]
pub enum Role {
    /// Starting.
    Starting,
    /// Waiting for a primary to open a replication session.
    Standby,
    /// Following `primary` as its secondary.
    Secondary {
        /// The primary's host.
        primary: String,
    },
    /// Running the VM without a secondary (output released under the lease as produced).
    Solo,
    /// Running the VM protected to `peer` (initial sync first, then epochs).
    Protected {
        /// The secondary's host.
        peer: String,
    },
}

/// Hooks between a node and its controller. Share it with an `Arc`.
#[derive(Debug)]
pub struct NodeControl {
    peers: Mutex<Vec<Peer>>,
    changed: Notify,
    role: Mutex<Role>,
    stats: Mutex<Option<Arc<PrimaryStats>>>,
    log: Mutex<Option<Arc<OutputLog>>>,
    generation: Mutex<Option<Arc<AtomicU64>>>,
    heartbeat: Mutex<Option<tokio::sync::watch::Receiver<failover::detector::PeerStatus>>>,
    disk: Mutex<Option<statepoint::vm::DiskHandle>>,
    guest_end: Mutex<Option<GuestEnd>>,
    lost: Mutex<Option<String>>,
    /// Boot the VM at once and run it solo (no secondary needed to start), instead of waiting for a
    /// secondary (`--boot`) or waiting as a standby.
    pub boot_solo: bool,
    /// The generation this VM's output right was last held under (a restart in place acquires past it).
    pub known_generation: u64,
    /// vCPUs of a VM this node boots.
    pub vcpus: u8,
    /// End the node with `EXIT_FENCED` when it is superseded (the daemon's workers: the daemon makes
    /// the host a standby its own way) instead of going on as a standby in the same process.
    pub exit_when_fenced: bool,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl NodeControl {
    /// A control with these peers that neither boots solo nor knows a generation, for a 1-vCPU VM, that
    /// stays a standby when superseded.
    pub fn new(peers: Vec<Peer>) -> Self {
        NodeControl {
            peers: Mutex::new(peers),
            changed: Notify::new(),
            role: Mutex::new(Role::Starting),
            stats: Mutex::new(None),
            log: Mutex::new(None),
            generation: Mutex::new(None),
            heartbeat: Mutex::new(None),
            disk: Mutex::new(None),
            guest_end: Mutex::new(None),
            lost: Mutex::new(None),
            boot_solo: false,
            known_generation: 0,
            vcpus: 1,
            exit_when_fenced: false,
        }
    }

    /// The peers now.
    pub fn peers(&self) -> Vec<Peer> {
        lock(&self.peers).clone()
    }

    /// Replaces the peers. A primary protected to a host that is no longer a peer stops protecting
    /// (cleanly: epochs stop, held output is released under a fresh generation) and runs solo.
    pub fn set_peers(&self, peers: Vec<Peer>) {
        *lock(&self.peers) = peers;
        self.changed.notify_waiters();
    }

    /// Resolves once `name` is no longer among the peers.
    pub async fn peer_removed(&self, name: &str) {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if !lock(&self.peers).iter().any(|p| p.name == name) {
                return;
            }
            changed.await;
        }
    }

    /// Records the node's role.
    pub fn set_role(&self, role: Role) {
        *lock(&self.role) = role;
    }

    /// Publishes the running VM's disk (`None`: no VM runs here, or it has no disk).
    pub fn set_disk(&self, disk: Option<statepoint::vm::DiskHandle>) {
        *lock(&self.disk) = disk;
    }

    /// The running VM's disk, if any.
    pub fn disk(&self) -> Option<statepoint::vm::DiskHandle> {
        lock(&self.disk).clone()
    }

    /// Records how the guest ended (the first report wins: a VM ends once).
    pub fn set_guest_end(&self, end: GuestEnd) {
        let mut g = lock(&self.guest_end);
        if g.is_none() {
            *g = Some(end);
        }
    }

    /// How the guest ended, once it has.
    pub fn guest_end(&self) -> Option<GuestEnd> {
        lock(&self.guest_end).clone()
    }

    /// Records that the VM was lost to a double failure while this host followed it (`what`: what is
    /// left on each host); the latest report is kept.
    pub fn set_lost(&self, what: String) {
        *lock(&self.lost) = Some(what);
    }

    /// The last loss reported ([`NodeControl::set_lost`]), if any.
    pub fn lost(&self) -> Option<String> {
        lock(&self.lost).clone()
    }

    /// The node's role.
    pub fn role(&self) -> Role {
        lock(&self.role).clone()
    }

    /// Records the running primary's counters (`None` when not protected).
    pub fn set_stats(&self, stats: Option<Arc<PrimaryStats>>) {
        *lock(&self.stats) = stats;
    }

    /// The running primary's counters.
    pub fn stats(&self) -> Option<Arc<PrimaryStats>> {
        lock(&self.stats).clone()
    }

    /// Records the failure detector of the current peer (`None`: no peer).
    pub fn set_heartbeat(
        &self,
        status: Option<tokio::sync::watch::Receiver<failover::detector::PeerStatus>>,
    ) {
        *lock(&self.heartbeat) = status;
    }

    /// The smoothed heartbeat round-trip time to the current peer (the lowest over its paths) while
    /// the peer is alive and once measured.
    pub fn heartbeat_rtt(&self) -> Option<Duration> {
        let hb = lock(&self.heartbeat);
        let status = hb.as_ref()?.borrow();
        if status.liveness != failover::detector::Liveness::Alive {
            return None;
        }
        status.paths.iter().filter_map(|p| p.srtt).min()
    }

    /// Records the released-output log and the generation of a primary.
    pub fn set_primary(&self, log: Arc<OutputLog>, generation: Arc<AtomicU64>) {
        *lock(&self.log) = Some(log);
        *lock(&self.generation) = Some(generation);
    }

    /// Released output so far (absolute offset of its end), when primary.
    pub fn output_len(&self) -> Option<u64> {
        lock(&self.log).as_ref().map(|l| l.len())
    }

    /// The generation held, when primary.
    pub fn generation(&self) -> Option<u64> {
        lock(&self.generation)
            .as_ref()
            .map(|g| g.load(Ordering::Acquire))
    }
}

/// How a guest ended: a VM event, never a host event. Reported by the worker (status and `worker.exit`),
/// kept in the daemon's record, shown by the API as `state` `exited` / `crashed`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestEnd {
    /// Exited (with a code) or crashed (with a reason).
    #[serde(flatten)]
    pub kind: GuestEndKind,
    /// The last epoch the guest ran in, when it was protected (the epoch whose frame carried the end).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<u64>,
    /// When the end was seen (ms since the Unix epoch).
    pub at_ms: u64,
}

/// Exit or crash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum GuestEndKind {
    /// The guest ended by itself with an exit code (native: the exit port; QEMU: a clean shutdown).
    Exited {
        /// The exit code.
        code: i64,
    },
    /// The guest crashed (native: a fatal exception, e.g. `#UD at 0x4001a3`; QEMU: a panic).
    Crashed {
        /// What happened, for the operator.
        reason: String,
    },
}

impl GuestEnd {
    /// From the VMM's report, seen now.
    pub fn from_exit(exit: &statepoint::vm::GuestExit, epoch: Option<u64>) -> Self {
        let kind = match exit {
            statepoint::vm::GuestExit::Code(code) => GuestEndKind::Exited {
                code: i64::from(*code),
            },
            statepoint::vm::GuestExit::Crash { vcpu, reason } => GuestEndKind::Crashed {
                reason: format!("{reason} (vCPU {vcpu})"),
            },
        };
        GuestEnd {
            kind,
            epoch,
            at_ms: policy::store::now_ms(),
        }
    }

    /// Whether it crashed.
    pub fn crashed(&self) -> bool {
        matches!(self.kind, GuestEndKind::Crashed { .. })
    }

    /// `exited (code 7)` / `crashed (#UD at 0x4001a3)`.
    pub fn describe(&self) -> String {
        match &self.kind {
            GuestEndKind::Exited { code } => format!("exited (code {code})"),
            GuestEndKind::Crashed { reason } => format!("crashed ({reason})"),
        }
    }
}
