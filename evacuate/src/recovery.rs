//! The HA recovery engine: a dead host's HA VMs are evacuated through Nova; a crashed VM is restarted.
//!
//! **Host failure** ([`Engine::host_failed`]), in this order and never out of it:
//! 1. *duplicate check*: one recovery per host until an operator re-enables it ([`Engine::reenable_host`]);
//!    a second report of the same failure is recorded and ignored;
//! 2. *fence* ([`crate::fence`]); if fencing fails the engine raises an [`EventKind::Alert`] and does
//!    nothing else (Masakari's `UNKNOWN` trap: never evacuate a host that may still run its VMs);
//! 3. *force the host's nova-compute down* and disable it (Nova refuses to evacuate from a host whose
//!    service is up, and the scheduler must not place VMs there);
//! 4. *evacuate every HA VM* of the host (the caller's [`Classifier`] says which; FT and none VMs are
//!    left alone), at most [`RecoveryConfig::max_parallel`] at a time, with the Masakari policies
//!    ([`Policy`]); each VM is locked while it moves; a VM that was SHUTOFF stays SHUTOFF; with
//!    [`EvacuateMode::Stopped`] (microversion 2.95+) those that ran are started afterwards;
//! 5. the host stays disabled and forced down until an operator re-enables it, and an event says so.
//!
//! **VM crash** ([`Engine::vm_crashed`]) on a live host: stop/start through Nova, up to
//! [`RecoveryConfig::restart_attempts`] attempts; when those fail, or the VM crashed more than that many
//! times within [`RecoveryConfig::crash_window_secs`], escalate: move it to another host (Nova refuses to
//! *evacuate* off a live host, so the move is a cold migration, confirmed).
//!
//! Every step is an [`Event`] (JSON-serialisable, with a Unix time in ms) sent to the caller's channel
//! and kept in [`Engine::history`]; [`Engine::recoveries`] gives the per-host reports.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, Semaphore};
use tokio::time::Instant;
use tracing::{info, info_span, warn, Instrument};

use crate::auth::TokenSource;
use crate::fence::Fencer;
use crate::nova::{EvacuateMode, Evacuated, Microversion, Nova, NovaError, Server, Service};

/// Errors of the operator calls of the engine.
#[derive(Debug, thiserror::Error)]
pub enum RecoveryError {
    /// Nova refused or failed.
    #[error("{host}: {source}")]
    Nova {
        /// The host concerned.
        host: String,
        /// Nova's error.
        source: Box<NovaError>,
    },
    /// A setting is unusable.
    #[error("recovery settings: {0}")]
    Config(String),
}

/// What Nova offers the engine. [`Nova`] implements it; tests use a mock.
pub trait Compute: Send + Sync + 'static {
    /// The `nova-compute` service of `host`.
    fn compute_service(
        &self,
        host: &str,
    ) -> impl Future<Output = Result<Service, NovaError>> + Send;
    /// Sets `forced_down`.
    fn set_forced_down(
        &self,
        id: &str,
        down: bool,
    ) -> impl Future<Output = Result<Service, NovaError>> + Send;
    /// Disables a service.
    fn disable(
        &self,
        id: &str,
        reason: &str,
    ) -> impl Future<Output = Result<Service, NovaError>> + Send;
    /// Enables a service.
    fn enable(&self, id: &str) -> impl Future<Output = Result<Service, NovaError>> + Send;
    /// Servers on a host.
    fn servers_on_host(
        &self,
        host: &str,
    ) -> impl Future<Output = Result<Vec<Server>, NovaError>> + Send;
    /// One server.
    fn server(&self, id: &str) -> impl Future<Output = Result<Server, NovaError>> + Send;
    /// Evacuates a server.
    fn evacuate(
        &self,
        id: &str,
        target: Option<&str>,
    ) -> impl Future<Output = Result<Microversion, NovaError>> + Send;
    /// Locks a server.
    fn lock(&self, id: &str) -> impl Future<Output = Result<(), NovaError>> + Send;
    /// Unlocks a server.
    fn unlock(&self, id: &str) -> impl Future<Output = Result<(), NovaError>> + Send;
    /// Stops a server.
    fn stop(&self, id: &str) -> impl Future<Output = Result<(), NovaError>> + Send;
    /// Starts a server.
    fn start(&self, id: &str) -> impl Future<Output = Result<(), NovaError>> + Send;
    /// Cold-migrates a server.
    fn migrate(&self, id: &str) -> impl Future<Output = Result<(), NovaError>> + Send;
    /// Confirms a cold migration.
    fn confirm_migration(&self, id: &str) -> impl Future<Output = Result<(), NovaError>> + Send;
    /// Waits for a status with no task.
    fn wait_status(
        &self,
        id: &str,
        want: &str,
        timeout: Duration,
    ) -> impl Future<Output = Result<Server, NovaError>> + Send;
    /// Waits for an evacuation to finish.
    fn wait_evacuated(
        &self,
        id: &str,
        source: &str,
        want: &str,
        timeout: Duration,
    ) -> impl Future<Output = Result<Evacuated, NovaError>> + Send;
    /// The evacuation semantics in use.
    fn evacuate_mode(&self) -> EvacuateMode;
}

impl<A: TokenSource + 'static> Compute for Nova<A> {
    async fn compute_service(&self, host: &str) -> Result<Service, NovaError> {
        Nova::compute_service(self, host).await
    }
    async fn set_forced_down(&self, id: &str, down: bool) -> Result<Service, NovaError> {
        Nova::set_forced_down(self, id, down).await
    }
    async fn disable(&self, id: &str, reason: &str) -> Result<Service, NovaError> {
        Nova::disable(self, id, reason).await
    }
    async fn enable(&self, id: &str) -> Result<Service, NovaError> {
        Nova::enable(self, id).await
    }
    async fn servers_on_host(&self, host: &str) -> Result<Vec<Server>, NovaError> {
        Nova::servers_on_host(self, host).await
    }
    async fn server(&self, id: &str) -> Result<Server, NovaError> {
        Nova::server(self, id).await
    }
    async fn evacuate(&self, id: &str, target: Option<&str>) -> Result<Microversion, NovaError> {
        Nova::evacuate(self, id, target).await
    }
    async fn lock(&self, id: &str) -> Result<(), NovaError> {
        Nova::lock(self, id).await
    }
    async fn unlock(&self, id: &str) -> Result<(), NovaError> {
        Nova::unlock(self, id).await
    }
    async fn stop(&self, id: &str) -> Result<(), NovaError> {
        Nova::stop(self, id).await
    }
    async fn start(&self, id: &str) -> Result<(), NovaError> {
        Nova::start(self, id).await
    }
    async fn migrate(&self, id: &str) -> Result<(), NovaError> {
        Nova::migrate(self, id).await
    }
    async fn confirm_migration(&self, id: &str) -> Result<(), NovaError> {
        Nova::confirm_migration(self, id).await
    }
    async fn wait_status(
        &self,
        id: &str,
        want: &str,
        timeout: Duration,
    ) -> Result<Server, NovaError> {
        Nova::wait_status(self, id, want, timeout).await
    }
    async fn wait_evacuated(
        &self,
        id: &str,
        source: &str,
        want: &str,
        timeout: Duration,
    ) -> Result<Evacuated, NovaError> {
        Nova::wait_evacuated(self, id, source, want, timeout).await
    }
    fn evacuate_mode(&self) -> EvacuateMode {
        self.settings().evacuate_mode
    }
}

/// A VM's availability level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Level {
    /// Fault tolerant: the statepoint engine's job, never evacuated here.
    Ft,
    /// Highly available: evacuated on host failure, restarted on crash.
    Ha,
    /// Left alone.
    None,
}

/// The metadata key that carries a VM's level in Nova.
pub const LEVEL_KEY: &str = "ax:level";

impl Level {
    /// The level in a server's metadata (`ax:level` = `ha` / `ft` / `none`); absent or unknown: none.
    pub fn of_metadata(s: &Server) -> Level {
        match s
            .metadata
            .get(LEVEL_KEY)
            .map(|v| v.trim().to_ascii_lowercase())
        {
            Some(v) if v == "ha" => Level::Ha,
            Some(v) if v == "ft" => Level::Ft,
            Some(v) if v == "none" => Level::None,
            None => Level::None,
            Some(v) => {
                warn!(server = %s.id, value = %v, "unknown {LEVEL_KEY}; treated as none");
                Level::None
            }
        }
    }
}

/// Says which level a server has (the caller's knowledge; [`Level::of_metadata`] by default).
pub type Classifier = Arc<dyn Fn(&Server) -> Level + Send + Sync>;

/// Where evacuated VMs go (Masakari's recovery methods).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Policy {
    /// The scheduler picks a host.
    #[default]
    Auto,
    /// To the configured reserved hosts (enabled on use), in order.
    ReservedHost,
    /// The scheduler first; VMs it cannot place go to a reserved host.
    AutoPriority,
    /// Reserved hosts first; VMs they cannot take go where the scheduler says.
    RhPriority,
}

fn d_parallel() -> usize {
    4
}
fn d_evac_timeout() -> u64 {
    300
}
fn d_restart() -> u32 {
    3
}
fn d_window() -> u64 {
    600
}
fn d_true() -> bool {
    true
}
fn d_retries() -> u32 {
    5
}

/// Settings of the engine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecoveryConfig {
    /// Where evacuated VMs go.
    #[serde(default)]
    pub policy: Policy,
    /// Reserved hosts for `reserved_host` / `auto_priority` / `rh_priority`.
    #[serde(default)]
    pub reserved_hosts: Vec<String>,
    /// Evacuations in flight at once (default 4).
    #[serde(default = "d_parallel")]
    pub max_parallel: usize,
    /// How long one VM may take to be running elsewhere, seconds (default 300).
    #[serde(default = "d_evac_timeout")]
    pub evacuate_timeout_secs: u64,
    /// Attempts of an evacuate request that meets a transient refusal (409, 5xx, "still in use").
    #[serde(default = "d_retries")]
    pub evacuate_attempts: u32,
    /// Restart attempts for a crashed VM before escalating (default 3).
    #[serde(default = "d_restart")]
    pub restart_attempts: u32,
    /// Crashes counted within this window, seconds (default 600).
    #[serde(default = "d_window")]
    pub crash_window_secs: u64,
    /// Lock each VM while it is evacuated (default true).
    #[serde(default = "d_true")]
    pub lock_vms: bool,
}

impl Default for RecoveryConfig {
    fn default() -> Self {
        RecoveryConfig {
            policy: Policy::Auto,
            reserved_hosts: Vec::new(),
            max_parallel: d_parallel(),
            evacuate_timeout_secs: d_evac_timeout(),
            evacuate_attempts: d_retries(),
            restart_attempts: d_restart(),
            crash_window_secs: d_window(),
            lock_vms: true,
        }
    }
}

impl RecoveryConfig {
    /// Checks that reserved-host policies have reserved hosts and that the bounds are positive.
    pub fn validate(&self) -> Result<(), RecoveryError> {
        if self.policy != Policy::Auto && self.reserved_hosts.is_empty() {
            return Err(RecoveryError::Config(format!(
                "policy {:?} needs reserved_hosts",
                self.policy
            )));
        }
        if self.max_parallel == 0 {
            return Err(RecoveryError::Config("max_parallel = 0".into()));
        }
        Ok(())
    }
}

/// Unix time in milliseconds.
pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn now_ms() -> u64 {
    unix_ms(SystemTime::now())
}

/// One step of a recovery.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Unix time, ms.
    pub at_ms: u64,
    /// The recovery it belongs to (0 for events outside a host recovery).
    pub recovery: u64,
    /// The host concerned.
    pub host: String,
    /// What happened.
    #[serde(flatten)]
    pub kind: EventKind,
}

/// What happened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum EventKind {
    /// The host was declared dead; `last_heartbeat_ms` is when it was last heard from.
    HostDead {
        /// Unix ms of its last heartbeat.
        last_heartbeat_ms: u64,
    },
    /// A failure report for a host that is already being (or was) recovered.
    DuplicateIgnored {
        /// The recovery in charge.
        existing: u64,
    },
    /// The fence command succeeded.
    Fenced {
        /// How long it took.
        took_ms: u64,
    },
    /// Operator attention needed (fence failure, Nova refused the force-down, …); nothing was evacuated.
    Alert {
        /// Why.
        reason: String,
    },
    /// nova-compute forced down (and disabled).
    ForcedDown {
        /// The service UUID.
        service_id: String,
    },
    /// A VM of the host that this path leaves alone.
    VmSkipped {
        /// Server id.
        vm: String,
        /// Name.
        name: String,
        /// Its level.
        level: Level,
    },
    /// Nova accepted the evacuation of a VM.
    EvacuationAccepted {
        /// Server id.
        vm: String,
        /// Name.
        name: String,
        /// The requested host (`None`: scheduler).
        target: Option<String>,
        /// Microversion used.
        microversion: String,
    },
    /// The VM runs elsewhere (or is SHUTOFF elsewhere, if it was before).
    VmRecovered {
        /// Server id.
        vm: String,
        /// Name.
        name: String,
        /// Its new host.
        to: String,
        /// ACTIVE / SHUTOFF.
        status: String,
        /// The evacuation record's status.
        migration_status: Option<String>,
    },
    /// A VM could not be recovered.
    VmFailed {
        /// Server id.
        vm: String,
        /// Name.
        name: String,
        /// Why (Nova's message).
        error: String,
    },
    /// The host recovery ended.
    RecoveryFinished {
        /// VMs recovered.
        recovered: usize,
        /// VMs that failed.
        failed: usize,
        /// VMs left alone.
        skipped: usize,
        /// From the declaration of death to the end, ms.
        took_ms: u64,
    },
    /// The host stays disabled and forced down until an operator re-enables it.
    HostLeftDisabled {
        /// Explanation.
        message: String,
    },
    /// A dead host is heard from again.
    HostBack {
        /// What the engine does about it.
        message: String,
    },
    /// An operator re-enabled the host.
    HostReenabled,
    /// A VM crash was reported.
    VmCrashed {
        /// Server id.
        vm: String,
        /// Crashes within the window, this one included.
        crashes: u32,
    },
    /// The VM was restarted in place.
    VmRestarted {
        /// Server id.
        vm: String,
        /// Attempt number.
        attempt: u32,
    },
    /// A restart attempt failed.
    RestartFailed {
        /// Server id.
        vm: String,
        /// Attempt number.
        attempt: u32,
        /// Why.
        error: String,
    },
    /// Restarting in place gave up: the VM is moved to another host.
    Escalated {
        /// Server id.
        vm: String,
        /// Why.
        reason: String,
    },
    /// The escalated VM runs on another host.
    VmMoved {
        /// Server id.
        vm: String,
        /// Its new host.
        to: String,
    },
}

/// How a host recovery ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Still running.
    Running,
    /// Another recovery of the host is in charge.
    Duplicate,
    /// Not fenced: alert raised, nothing done.
    Unfenced,
    /// Fenced, but Nova could not be told (force-down or listing failed): alert raised.
    Failed,
    /// Every HA VM recovered.
    Recovered,
    /// Some HA VMs failed.
    Partial,
    /// The engine stopped while it ran (agent restart); run again after the restart.
    Interrupted,
}

/// Per-VM result of a host recovery.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmReport {
    /// Server id.
    pub id: String,
    /// Name.
    pub name: String,
    /// Status before.
    pub was: String,
    /// Unix ms when Nova accepted the evacuation.
    pub accepted_ms: Option<u64>,
    /// Unix ms when it was running (or SHUTOFF) elsewhere.
    pub recovered_ms: Option<u64>,
    /// Its new host.
    pub to: Option<String>,
    /// Its final status.
    pub status: Option<String>,
    /// The error, if it failed.
    pub error: Option<String>,
}

/// One host recovery.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostRecovery {
    /// Recovery id.
    pub id: u64,
    /// The host.
    pub host: String,
    /// Unix ms of its last heartbeat.
    pub last_heartbeat_ms: u64,
    /// Unix ms of the declaration of death.
    pub declared_ms: u64,
    /// Unix ms of the successful fence.
    pub fenced_ms: Option<u64>,
    /// Unix ms of the force-down.
    pub forced_down_ms: Option<u64>,
    /// Unix ms of the end.
    pub finished_ms: Option<u64>,
    /// The outcome.
    pub outcome: Outcome,
    /// The HA VMs.
    pub vms: Vec<VmReport>,
}

struct State {
    /// Recoveries in charge of their host: running, or awaiting the operator's re-enable.
    hosts: HashMap<String, HostRecovery>,
    /// Closed recoveries (host re-enabled, unfenced failure closed, interrupted), newest last.
    past: Vec<HostRecovery>,
    crashes: HashMap<String, Vec<Instant>>,
    history: Vec<Event>,
}

/// How many closed recoveries and events the engine keeps (older ones are dropped first).
pub const KEEP_PAST: usize = 200;
/// How many events the engine keeps.
pub const KEEP_EVENTS: usize = 10_000;

/// What an engine remembers, to be saved and given back after a restart ([`Engine::restore`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// Recoveries in charge of their host (running, or awaiting the operator's re-enable), by id.
    pub in_charge: Vec<HostRecovery>,
    /// Closed recoveries (host re-enabled, unfenced failure closed, interrupted), oldest first.
    pub closed: Vec<HostRecovery>,
    /// The event history.
    pub history: Vec<Event>,
}

struct Inner<C> {
    compute: Arc<C>,
    fencer: Fencer,
    cfg: RecoveryConfig,
    classify: Classifier,
    events: Option<mpsc::UnboundedSender<Event>>,
    state: Mutex<State>,
    next_id: AtomicU64,
}

/// The recovery engine. Cheap to clone (shared state).
pub struct Engine<C: Compute> {
    inner: Arc<Inner<C>>,
}

impl<C: Compute> Clone for Engine<C> {
    fn clone(&self) -> Self {
        Engine {
            inner: self.inner.clone(),
        }
    }
}

impl<C: Compute> std::fmt::Debug for Engine<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("cfg", &self.inner.cfg)
            .field("fencer", &self.inner.fencer)
            .finish_non_exhaustive()
    }
}

impl<C: Compute> Engine<C> {
    /// An engine over `compute`; events go to `events` (if any) and to the history.
    pub fn new(
        compute: Arc<C>,
        fencer: Fencer,
        cfg: RecoveryConfig,
        classify: Classifier,
        events: Option<mpsc::UnboundedSender<Event>>,
    ) -> Result<Self, RecoveryError> {
        cfg.validate()?;
        Ok(Engine {
            inner: Arc::new(Inner {
                compute,
                fencer,
                cfg,
                classify,
                events,
                state: Mutex::new(State {
                    hosts: HashMap::new(),
                    past: Vec::new(),
                    crashes: HashMap::new(),
                    history: Vec::new(),
                }),
                next_id: AtomicU64::new(1),
            }),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn emit(&self, recovery: u64, host: &str, kind: EventKind) {
        let e = Event {
            at_ms: now_ms(),
            recovery,
            host: host.into(),
            kind,
        };
        info!(recovery, host, event = ?e.kind, "ha");
        if let Some(tx) = &self.inner.events {
            let _ = tx.send(e.clone());
        }
        let mut st = self.state();
        st.history.push(e);
        if st.history.len() > KEEP_EVENTS {
            let extra = st.history.len() - KEEP_EVENTS;
            st.history.drain(..extra);
        }
    }

    /// Moves `host`'s recovery to the closed ones; its id (0 if none).
    fn close(&self, host: &str) -> u64 {
        let mut st = self.state();
        let Some(r) = st.hosts.remove(host) else {
            return 0;
        };
        let id = r.id;
        st.past.push(r);
        if st.past.len() > KEEP_PAST {
            let extra = st.past.len() - KEEP_PAST;
            st.past.drain(..extra);
        }
        id
    }

    /// What to save so that a restarted engine remembers (see [`Engine::restore`]).
    pub fn snapshot(&self) -> Snapshot {
        let st = self.state();
        let mut in_charge: Vec<_> = st.hosts.values().cloned().collect();
        in_charge.sort_by_key(|r| r.id);
        Snapshot {
            in_charge,
            closed: st.past.clone(),
            history: st.history.clone(),
        }
    }

    /// Gives a fresh engine what an earlier one saved: closed recoveries and the history as they were,
    /// recoveries awaiting the operator still in charge of their host (a new failure report of it is a
    /// duplicate; `reenable_host` closes them). A recovery that was still running when the engine
    /// stopped is closed as [`Outcome::Interrupted`] and its host returned, with its last heartbeat, so
    /// that the caller runs it again ([`Engine::host_failed`]: each step is safe to repeat — fencing
    /// again, forcing down again, evacuating what is still on the host). Ids continue after the
    /// largest restored one.
    pub fn restore(&self, snap: Snapshot) -> Vec<(String, SystemTime)> {
        let mut resume = Vec::new();
        let mut st = self.state();
        let mut max_id = 0;
        for r in &snap.closed {
            max_id = max_id.max(r.id);
        }
        st.past = snap.closed;
        for mut r in snap.in_charge {
            max_id = max_id.max(r.id);
            if r.outcome == Outcome::Running {
                resume.push((
                    r.host.clone(),
                    UNIX_EPOCH + Duration::from_millis(r.last_heartbeat_ms),
                ));
                r.outcome = Outcome::Interrupted;
                st.past.push(r);
            } else {
                st.hosts.insert(r.host.clone(), r);
            }
        }
        for e in &snap.history {
            max_id = max_id.max(e.recovery);
        }
        st.history = snap.history;
        drop(st);
        self.inner.next_id.fetch_max(max_id + 1, Ordering::Relaxed);
        resume
    }

    fn update(&self, host: &str, f: impl FnOnce(&mut HostRecovery)) {
        if let Some(r) = self.state().hosts.get_mut(host) {
            f(r);
        }
    }

    /// Every event so far.
    pub fn history(&self) -> Vec<Event> {
        self.state().history.clone()
    }

    /// Every host recovery the engine remembers, by id: those in charge of their host (running, or
    /// awaiting the operator) and the last [`KEEP_PAST`] closed ones.
    pub fn recoveries(&self) -> Vec<HostRecovery> {
        let st = self.state();
        let mut v: Vec<_> = st.hosts.values().chain(st.past.iter()).cloned().collect();
        v.sort_by_key(|r| r.id);
        v
    }

    /// Whether a recovery of `host` is running or awaiting the operator.
    pub fn is_recovering(&self, host: &str) -> bool {
        self.state().hosts.contains_key(host)
    }

    /// Recovers the HA VMs of a dead host (see the module docs); `last_heartbeat` is when it was last
    /// heard from. Returns the report (also for a duplicate: `Outcome::Duplicate`).
    pub async fn host_failed(&self, host: &str, last_heartbeat: SystemTime) -> HostRecovery {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let declared_ms = now_ms();
        let t0 = Instant::now();
        let mut rec = HostRecovery {
            id,
            host: host.into(),
            last_heartbeat_ms: unix_ms(last_heartbeat),
            declared_ms,
            fenced_ms: None,
            forced_down_ms: None,
            finished_ms: None,
            outcome: Outcome::Running,
            vms: Vec::new(),
        };
        {
            let mut st = self.state();
            if let Some(existing) = st.hosts.get(host) {
                let existing = existing.id;
                drop(st);
                self.emit(id, host, EventKind::DuplicateIgnored { existing });
                rec.outcome = Outcome::Duplicate;
                return rec;
            }
            st.hosts.insert(host.into(), rec.clone());
        }
        let span = info_span!("host_recovery", id, host);
        self.recover(id, host, rec, t0).instrument(span).await
    }

    async fn recover(
        &self,
        id: u64,
        host: &str,
        mut rec: HostRecovery,
        t0: Instant,
    ) -> HostRecovery {
        let c = &self.inner.compute;
        self.emit(
            id,
            host,
            EventKind::HostDead {
                last_heartbeat_ms: rec.last_heartbeat_ms,
            },
        );
        let finish = |me: &Self, mut rec: HostRecovery, outcome: Outcome| {
            rec.outcome = outcome;
            rec.finished_ms = Some(now_ms());
            let r2 = rec.clone();
            me.update(host, move |r| *r = r2);
            rec
        };
        // 1. Fence.
        match self.inner.fencer.fence(host).await {
            Ok(f) => {
                rec.fenced_ms = Some(now_ms());
                self.emit(
                    id,
                    host,
                    EventKind::Fenced {
                        took_ms: f.took.as_millis() as u64,
                    },
                );
            }
            Err(e) => {
                self.emit(
                    id,
                    host,
                    EventKind::Alert {
                        reason: format!("host not fenced, nothing evacuated: {e}"),
                    },
                );
                return finish(self, rec, Outcome::Unfenced);
            }
        }
        // 2. Force nova-compute down, disable it.
        let svc = match retry(3, || c.compute_service(host)).await {
            Ok(s) => s,
            Err(e) => {
                self.emit(
                    id,
                    host,
                    EventKind::Alert {
                        reason: format!("fenced, but cannot find its nova-compute: {e}"),
                    },
                );
                return finish(self, rec, Outcome::Failed);
            }
        };
        if let Err(e) = retry(3, || c.set_forced_down(&svc.id, true)).await {
            self.emit(
                id,
                host,
                EventKind::Alert {
                    reason: format!("fenced, but Nova refused the force-down: {e}"),
                },
            );
            return finish(self, rec, Outcome::Failed);
        }
        rec.forced_down_ms = Some(now_ms());
        self.emit(
            id,
            host,
            EventKind::ForcedDown {
                service_id: svc.id.clone(),
            },
        );
        let reason = format!("ax: host failure, recovery {id}; re-enable after repair");
        // 3. Its VMs. (Disabling runs alongside: a forced-down service gets no VMs anyway.)
        let (disabled, servers) = tokio::join!(
            c.disable(&svc.id, &reason),
            retry(3, || c.servers_on_host(host))
        );
        if let Err(e) = disabled {
            warn!(host, error = %e, "cannot disable the compute service (it is forced down)");
        }
        let servers = match servers {
            Ok(s) => s,
            Err(e) => {
                self.emit(
                    id,
                    host,
                    EventKind::Alert {
                        reason: format!("cannot list the host's servers: {e}"),
                    },
                );
                return finish(self, rec, Outcome::Failed);
            }
        };
        let mut ha = Vec::new();
        let mut skipped = 0;
        for s in servers {
            match (self.inner.classify)(&s) {
                Level::Ha => ha.push(s),
                level => {
                    skipped += 1;
                    self.emit(
                        id,
                        host,
                        EventKind::VmSkipped {
                            vm: s.id.clone(),
                            name: s.name.clone(),
                            level,
                        },
                    );
                }
            }
        }
        // 4. Targets, then evacuations with a bound.
        let plan = self.plan(id, host).await;
        let sem = Arc::new(Semaphore::new(self.inner.cfg.max_parallel));
        let mut tasks = tokio::task::JoinSet::new();
        for s in ha {
            let me = self.clone();
            let sem = sem.clone();
            let plan = plan.clone();
            let host = host.to_string();
            tasks.spawn(async move {
                let _permit = sem.acquire_owned().await;
                let span = info_span!("evacuate_vm", vm = %s.id);
                me.evacuate_vm(id, &host, s, &plan).instrument(span).await
            });
        }
        while let Some(r) = tasks.join_next().await {
            match r {
                Ok(v) => rec.vms.push(v),
                Err(e) => warn!(error = %e, "evacuation task failed"),
            }
        }
        rec.vms.sort_by(|a, b| a.name.cmp(&b.name));
        let failed = rec.vms.iter().filter(|v| v.error.is_some()).count();
        let recovered = rec.vms.len() - failed;
        self.emit(
            id,
            host,
            EventKind::RecoveryFinished {
                recovered,
                failed,
                skipped,
                took_ms: t0.elapsed().as_millis() as u64,
            },
        );
        self.emit(
            id,
            host,
            EventKind::HostLeftDisabled {
                message: format!(
                    "{host} stays disabled and forced down until an operator re-enables it"
                ),
            },
        );
        let outcome = if failed == 0 {
            Outcome::Recovered
        } else {
            Outcome::Partial
        };
        finish(self, rec, outcome)
    }

    /// The targets to try in order (`None` = scheduler), after enabling usable reserved hosts.
    async fn plan(&self, id: u64, host: &str) -> Vec<Option<String>> {
        let cfg = &self.inner.cfg;
        let mut reserved = Vec::new();
        if cfg.policy != Policy::Auto {
            for h in cfg.reserved_hosts.iter().filter(|h| h.as_str() != host) {
                match self.inner.compute.compute_service(h).await {
                    Ok(s) if s.state == "up" && !s.forced_down => {
                        if s.status != "enabled" {
                            if let Err(e) = self.inner.compute.enable(&s.id).await {
                                warn!(reserved = %h, error = %e, "cannot enable reserved host");
                                continue;
                            }
                        }
                        reserved.push(Some(h.clone()));
                    }
                    Ok(s) => warn!(reserved = %h, state = %s.state, "reserved host not usable"),
                    Err(e) => warn!(reserved = %h, error = %e, "reserved host unknown"),
                }
            }
            if reserved.is_empty() {
                self.emit(
                    id,
                    host,
                    EventKind::Alert {
                        reason: "no reserved host is up".into(),
                    },
                );
            }
        }
        match cfg.policy {
            Policy::Auto => vec![None],
            Policy::ReservedHost => reserved,
            Policy::AutoPriority => std::iter::once(None).chain(reserved).collect(),
            Policy::RhPriority => reserved.into_iter().chain(std::iter::once(None)).collect(),
        }
    }

    async fn evacuate_vm(
        &self,
        id: u64,
        host: &str,
        s: Server,
        plan: &[Option<String>],
    ) -> VmReport {
        let c = &self.inner.compute;
        let mut rep = VmReport {
            id: s.id.clone(),
            name: s.name.clone(),
            was: s.status.clone(),
            accepted_ms: None,
            recovered_ms: None,
            to: None,
            status: None,
            error: None,
        };
        let fail = |me: &Self, mut rep: VmReport, error: String| {
            me.emit(
                id,
                host,
                EventKind::VmFailed {
                    vm: rep.id.clone(),
                    name: rep.name.clone(),
                    error: error.clone(),
                },
            );
            rep.error = Some(error);
            rep
        };
        let locked_here = self.inner.cfg.lock_vms && !s.locked;
        if locked_here {
            if let Err(e) = c.lock(&s.id).await {
                warn!(vm = %s.id, error = %e, "cannot lock; evacuating unlocked");
            }
        }
        let mut errors = Vec::new();
        let mut accepted = None;
        for target in plan {
            let mut attempt = 0;
            loop {
                attempt += 1;
                match c.evacuate(&s.id, target.as_deref()).await {
                    Ok(mv) => {
                        accepted = Some((target.clone(), mv));
                        break;
                    }
                    Err(e)
                        if attempt < self.inner.cfg.evacuate_attempts.max(1)
                            && (e.is_transient() || matches!(e, NovaError::HostInUse { .. })) =>
                    {
                        warn!(vm = %s.id, attempt, error = %e, "evacuate refused for now; retrying");
                        tokio::time::sleep(Duration::from_millis(500 * u64::from(attempt))).await;
                    }
                    Err(e) => {
                        errors.push(format!(
                            "to {}: {e}",
                            target.as_deref().unwrap_or("scheduler's choice")
                        ));
                        break;
                    }
                }
            }
            if accepted.is_some() {
                break;
            }
        }
        let Some((target, mv)) = accepted else {
            if locked_here {
                let _ = c.unlock(&s.id).await;
            }
            let why = if errors.is_empty() {
                "no target host to try".to_string()
            } else {
                errors.join("; ")
            };
            return fail(self, rep, why);
        };
        rep.accepted_ms = Some(now_ms());
        self.emit(
            id,
            host,
            EventKind::EvacuationAccepted {
                vm: s.id.clone(),
                name: s.name.clone(),
                target,
                microversion: mv.to_string(),
            },
        );
        let was_off = s.status == "SHUTOFF";
        let mode = c.evacuate_mode();
        let want = if was_off || mode == EvacuateMode::Stopped {
            "SHUTOFF"
        } else {
            "ACTIVE"
        };
        let timeout = Duration::from_secs(self.inner.cfg.evacuate_timeout_secs);
        let t0 = Instant::now();
        let result = async {
            let mut ev = c.wait_evacuated(&s.id, host, want, timeout).await?;
            if want == "SHUTOFF" && !was_off {
                // 2.95+: Nova leaves it stopped; it ran before, so start it.
                c.start(&s.id).await?;
                let left = timeout.saturating_sub(t0.elapsed());
                let sv = c.wait_status(&s.id, "ACTIVE", left).await?;
                ev.status = sv.status;
            }
            Ok::<_, NovaError>(ev)
        }
        .await;
        if locked_here {
            if let Err(e) = c.unlock(&s.id).await {
                warn!(vm = %s.id, error = %e, "cannot unlock");
            }
        }
        match result {
            Ok(ev) => {
                rep.recovered_ms = Some(now_ms());
                rep.to = Some(ev.host.clone());
                rep.status = Some(ev.status.clone());
                self.emit(
                    id,
                    host,
                    EventKind::VmRecovered {
                        vm: s.id.clone(),
                        name: s.name.clone(),
                        to: ev.host,
                        status: ev.status,
                        migration_status: ev.migration_status,
                    },
                );
                rep
            }
            Err(e) => fail(self, rep, e.to_string()),
        }
    }

    /// A dead host is heard from again. An unfenced failure (nothing was done) is forgotten; a
    /// recovered host stays disabled until [`Engine::reenable_host`], and an event says so.
    pub fn host_back(&self, host: &str) {
        let rec = self.state().hosts.get(host).cloned();
        let Some(rec) = rec else { return };
        match rec.outcome {
            Outcome::Unfenced => {
                self.close(host);
                self.emit(
                    rec.id,
                    host,
                    EventKind::HostBack {
                        message: "heard again; the unfenced failure is closed (nothing was done)"
                            .into(),
                    },
                );
            }
            Outcome::Running => {}
            _ => self.emit(
                rec.id,
                host,
                EventKind::HostBack {
                    message: "heard again; it stays disabled until an operator re-enables it \
                              (its nova-compute must be running first: Nova refuses the force-up \
                              while evacuation records are `done`)"
                        .into(),
                },
            ),
        }
    }

    /// Operator call: force the host's nova-compute up and enable it, and forget its recovery.
    pub async fn reenable_host(&self, host: &str) -> Result<Service, RecoveryError> {
        let c = &self.inner.compute;
        let err = |source| RecoveryError::Nova {
            host: host.into(),
            source: Box::new(source),
        };
        let svc = c.compute_service(host).await.map_err(err)?;
        c.set_forced_down(&svc.id, false).await.map_err(err)?;
        let svc = c.enable(&svc.id).await.map_err(err)?;
        let id = self.close(host);
        self.emit(id, host, EventKind::HostReenabled);
        Ok(svc)
    }

    /// A VM crashed on a live host: restart it in place, escalate to a move after too many failures.
    /// Returns the VM's host afterwards.
    pub async fn vm_crashed(&self, vm: &str) -> Result<String, RecoveryError> {
        let c = &self.inner.compute;
        let s = c.server(vm).await.map_err(|source| RecoveryError::Nova {
            host: "?".into(),
            source: Box::new(source),
        })?;
        let host = s.host.clone().unwrap_or_default();
        let span = info_span!("vm_crash", vm, host = %host);
        async {
            if self.is_recovering(&host) {
                info!("host recovery in charge; crash report ignored");
                return Ok(host.clone());
            }
            let level = (self.inner.classify)(&s);
            if level != Level::Ha {
                self.emit(
                    0,
                    &host,
                    EventKind::VmSkipped {
                        vm: vm.into(),
                        name: s.name.clone(),
                        level,
                    },
                );
                return Ok(host.clone());
            }
            let window = Duration::from_secs(self.inner.cfg.crash_window_secs);
            let crashes = {
                let mut st = self.state();
                let list = st.crashes.entry(vm.to_string()).or_default();
                list.retain(|t| t.elapsed() < window);
                list.push(Instant::now());
                list.len() as u32
            };
            self.emit(
                0,
                &host,
                EventKind::VmCrashed {
                    vm: vm.into(),
                    crashes,
                },
            );
            let limit = self.inner.cfg.restart_attempts;
            let timeout = Duration::from_secs(self.inner.cfg.evacuate_timeout_secs);
            let err = |source| RecoveryError::Nova {
                host: host.clone(),
                source: Box::new(source),
            };
            if crashes <= limit {
                for attempt in 1..=limit.max(1) {
                    let r = async {
                        let cur = c.server(vm).await?;
                        if cur.status != "SHUTOFF" {
                            c.stop(vm).await?;
                            c.wait_status(vm, "SHUTOFF", timeout).await?;
                        }
                        c.start(vm).await?;
                        c.wait_status(vm, "ACTIVE", timeout).await
                    }
                    .await;
                    match r {
                        Ok(_) => {
                            self.emit(
                                0,
                                &host,
                                EventKind::VmRestarted {
                                    vm: vm.into(),
                                    attempt,
                                },
                            );
                            return Ok(host.clone());
                        }
                        Err(e) => self.emit(
                            0,
                            &host,
                            EventKind::RestartFailed {
                                vm: vm.into(),
                                attempt,
                                error: e.to_string(),
                            },
                        ),
                    }
                }
            }
            let reason = if crashes > limit {
                format!("{crashes} crashes within {window:?}")
            } else {
                format!("{limit} restart attempts failed")
            };
            self.emit(
                0,
                &host,
                EventKind::Escalated {
                    vm: vm.into(),
                    reason,
                },
            );
            let cur = c.server(vm).await.map_err(err)?;
            let was_off = cur.status == "SHUTOFF";
            c.migrate(vm).await.map_err(err)?;
            c.wait_status(vm, "VERIFY_RESIZE", timeout)
                .await
                .map_err(err)?;
            c.confirm_migration(vm).await.map_err(err)?;
            let mut sv = c
                .wait_status(vm, if was_off { "SHUTOFF" } else { "ACTIVE" }, timeout)
                .await
                .map_err(err)?;
            if was_off {
                c.start(vm).await.map_err(err)?;
                sv = c.wait_status(vm, "ACTIVE", timeout).await.map_err(err)?;
            }
            let to = sv.host.unwrap_or_default();
            self.emit(
                0,
                &host,
                EventKind::VmMoved {
                    vm: vm.into(),
                    to: to.clone(),
                },
            );
            self.state().crashes.remove(vm);
            Ok(to)
        }
        .instrument(span)
        .await
    }
}

async fn retry<T, F, Fut>(attempts: u32, mut f: F) -> Result<T, NovaError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, NovaError>>,
{
    let mut n = 0;
    loop {
        n += 1;
        match f().await {
            Err(e) if e.is_transient() && n < attempts => {
                tokio::time::sleep(Duration::from_millis(300 * u64::from(n))).await;
            }
            r => return r,
        }
    }
}

#[cfg(test)]
mod tests;
