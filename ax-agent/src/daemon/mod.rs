//! The agent daemon (`ax-agent run`): VM definitions, VM workers, availability levels through the
//! policy engine, the REST API, metrics, systemd notification.
//!
//! ```text
//!  ax-agent run ──┬─ API (axum) ── /v1/vms, /v1/events, /v1/hosts, /v1/standbys (peers), /metrics
//!                 ├─ policy::Engine<Act> ── transitions, persisted in storage_dir/policy.redb
//!                 ├─ monitor ── polls every worker's control socket; restarts, failovers, adoption
//!                 ├─ nova_tags ── (nova_tagging) ax:level of each VM's Nova server → its level
//!                 └─ local witness process (when no shared witness is configured)
//!  ax-agent vm-worker --dir storage_dir/vms/<vm>   (one process per VM, survives daemon restarts)
//! ```
//!
//! See docs/daemon.md for the design (why workers, how the daemon re-attaches, what each level does).

pub mod actuator;
pub mod api;
pub mod hostfail;
pub mod metrics;
pub mod migrate;
pub mod nova_tags;
pub mod tls;
pub mod volume;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use policy::store::NewEvent;
use policy::{EventKind, Level, Store};
use serde::{Deserialize, Serialize};
use tracing::{info, warn, Instrument};

use crate::client::ApiClient;
use crate::config::Config;
use crate::control::{self, GuestEnd, SyncInfo, WorkerRequest, WorkerStatus};
use crate::worker::{self, Mode, WorkerExit, WorkerFiles, WorkerSpec};

/// A native VM's definition (what `POST /v1/vms` takes, with the output port chosen).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmDef {
    /// Name.
    pub name: String,
    /// Guest program from the guest kit.
    pub guest: String,
    /// Memory, MiB.
    pub memory_mib: u64,
    /// vCPUs.
    pub vcpus: u8,
    /// Disk, MiB (0: none).
    pub disk_mib: u64,
    /// Guest arguments.
    pub guest_args: Vec<u64>,
    /// Output endpoint port (the same on both hosts of an FT pair).
    pub output_port: u16,
    /// The Nova server this VM stands for: with `[openstack] nova_tagging`, its `ax:level` metadata
    /// sets the VM's level (see [`nova_tags`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nova_server: Option<String>,
    /// The SHA-256 (hex) of the guest ELF uploaded with the VM (`guest_elf`), stored as `guest.elf`
    /// in the VM's directory; `guest` is then `elf`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_elf_sha256: Option<String>,
    /// What happens when the guest exits by itself at level ha (a crash is always restarted there).
    #[serde(default)]
    pub on_exit: OnExit,
    /// A QEMU VM's definition (`engine` `qemu`); absent for a native VM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qemu: Option<ax_qemu::def::QemuDef>,
}

impl VmDef {
    /// Whether it has a disk to replicate (a native VM's disk; a QEMU VM's disks).
    pub fn has_disk(&self) -> bool {
        match &self.qemu {
            Some(q) => !q.all_disks().is_empty(),
            None => self.disk_mib > 0,
        }
    }

    /// The VMM it runs under: `native` or `qemu`.
    pub fn engine(&self) -> &'static str {
        if self.qemu.is_some() {
            "qemu"
        } else {
            "native"
        }
    }
}

/// What a guest's own exit leads to at level ha, like libvirt's `on_poweroff` (a crash at level ha is
/// always restarted within the restart limits, like `on_crash = restart`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnExit {
    /// The VM stays stopped (`exited`) until started again.
    #[default]
    Stop,
    /// The VM is started again, within the restart limits.
    Restart,
}

impl std::str::FromStr for OnExit {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "stop" => Ok(OnExit::Stop),
            "restart" => Ok(OnExit::Restart),
            _ => Err(format!("on_exit {s:?}: expected stop or restart")),
        }
    }
}

/// Checks a Nova server ID (`nova_server`): 1 to 64 ASCII letters, digits and '-' (a UUID fits).
pub fn check_nova_server(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > 64 || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
    {
        return Err(format!(
            "nova_server {id:?}: 1 to 64 letters, digits and '-' (a Nova server ID, e.g. 3f0c5a5e-8d7b-4b8e-9a61-2f1d3c4b5a69)"
        ));
    }
    Ok(())
}

/// This host's part in a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum LocalRole {
    /// The VM is defined here and runs here.
    Primary,
    /// A standby (secondary) for `primary`'s VM.
    Standby {
        /// The primary's host.
        primary: String,
        /// The primary worker's link address.
        primary_link: SocketAddr,
        /// The primary worker's heartbeat address.
        primary_hb: SocketAddr,
    },
}

/// What the daemon keeps about one VM (`vms/<name>/vm.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmRecordLocal {
    /// The definition.
    pub def: VmDef,
    /// Primary or standby.
    pub role: LocalRole,
    /// Whether its worker should run.
    pub running: bool,
    /// Worker slot (link and heartbeat ports).
    pub slot: u16,
    /// Generation last seen held by its worker.
    pub generation: u64,
    /// Monitored (levels ha and ft): a crashed worker is restarted in place.
    pub monitored: bool,
    /// The secondary reserved for it (between pick_secondary and release_secondary).
    pub secondary: Option<String>,
    /// Why it is not running although it should: `crashed: …`, `moved: …`.
    pub down_reason: Option<String>,
    /// Restart times (ms since the epoch) within the window.
    pub restarts: Vec<u64>,
    /// When this host last took the VM over from its primary (ms).
    pub last_failover_ms: Option<u64>,
    /// Created (ms).
    pub created_ms: u64,
    /// Its disk is replicated to the volume target (levels ha and ft, with a target configured).
    #[serde(default)]
    pub volume: bool,
    /// How the guest last ended (kept after a restart, for the record).
    #[serde(default)]
    pub guest_end: Option<GuestEnd>,
    /// The generation of the VM's register at the coordinator this host last won (0: none), with
    /// host-failure recovery ([`hostfail`]): a register held by another host at a newer generation
    /// means the VM was taken over elsewhere.
    #[serde(default)]
    pub claim: u64,
    /// A live migration away from this host, as far as it got ([`migrate`]): resumed by the next agent
    /// after a restart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<migrate::MigrationCursor>,
}

impl VmRecordLocal {
    /// A new record, created now: no generation, reservation, restarts or failover yet.
    pub fn new(def: VmDef, role: LocalRole, running: bool, slot: u16, monitored: bool) -> Self {
        VmRecordLocal {
            def,
            role,
            running,
            slot,
            generation: 0,
            monitored,
            secondary: None,
            down_reason: None,
            restarts: Vec::new(),
            last_failover_ms: None,
            created_ms: policy::store::now_ms(),
            volume: false,
            guest_end: None,
            claim: 0,
            migration: None,
        }
    }
}

/// A transition's live progress (not persisted: the engine's cursor is).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Progress {
    /// The step running.
    pub step: Option<String>,
    /// Initial sync progress.
    pub sync: Option<SyncInfo>,
}

/// Counters for /metrics.
#[derive(Debug, Default)]
pub struct Counters {
    /// Failovers taken over by this host.
    pub failovers: AtomicU64,
    /// Worker restarts in place.
    pub restarts: AtomicU64,
    /// Transitions done.
    pub transitions_done: AtomicU64,
    /// Transitions rolled back.
    pub transitions_rolled_back: AtomicU64,
    /// Transitions failed.
    pub transitions_failed: AtomicU64,
    /// Guests that exited by themselves.
    pub guest_exits: AtomicU64,
    /// Guests that crashed.
    pub guest_crashes: AtomicU64,
    /// VMs of failed hosts taken over here ([`hostfail`]).
    pub takeovers: AtomicU64,
}

/// Everything the daemon's parts share (the engine excepted).
#[derive(Debug)]
pub struct Shared {
    /// The configuration.
    pub cfg: Config,
    /// The policy store.
    pub store: Store,
    /// Where workers keep their VMs' generations (the witness or etcd).
    pub coordinator: crate::coord::CoordSpec,
    /// VM records by name.
    vms: Mutex<BTreeMap<String, VmRecordLocal>>,
    /// Last status of each VM's worker.
    status: Mutex<BTreeMap<String, WorkerStatus>>,
    /// Progress of running transitions.
    progress: Mutex<BTreeMap<String, Progress>>,
    /// Worker children spawned by this process (reaped by the monitor).
    children: Mutex<Vec<std::process::Child>>,
    /// Peer clients by name.
    peers: BTreeMap<String, ApiClient>,
    /// Counters.
    pub counters: Counters,
    /// Set once workers are re-attached and the API listens.
    pub ready: AtomicBool,
    /// Set on SIGTERM.
    pub draining: AtomicBool,
    /// Serialises creations (name, slot and port choice).
    create: tokio::sync::Mutex<()>,
    /// Automatic re-protections started per VM since its last failover, and when the next may start.
    reprotections: Mutex<BTreeMap<String, (u32, std::time::Instant)>>,
    /// When each FT primary whose worker died last asked its secondary whether the guest had ended.
    end_asked: Mutex<BTreeMap<String, std::time::Instant>>,
    /// Volume replication, when a target is configured.
    pub volumes: Option<volume::Volumes>,
    /// What the Nova tag poller last read, per VM (empty unless `nova_tagging`).
    nova_tags: Mutex<BTreeMap<String, nova_tags::NovaTag>>,
    /// The in-process HA engine (`ha.node_config`) once it runs.
    ha_engine: Mutex<Option<crate::ha::HaEngine>>,
    /// Why the in-process HA engine does not run (yet).
    ha_error: Mutex<Option<String>>,
    /// QEMU VMs arriving here by live migration (their worker starts as the destination).
    incoming: Mutex<BTreeMap<String, migrate::IncomingEntry>>,
    /// Live migrations of QEMU VMs away from this host, as last seen.
    pub migrations: Mutex<BTreeMap<String, migrate::MigrationView>>,
    /// Host-failure recovery of VMs not under Nova (`[coordinator]` and peers).
    pub hostfail: Option<Arc<hostfail::HostFail>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The daemon's engine type.
pub type Engine = policy::Engine<actuator::Act>;

/// Errors of daemon operations, mapped to HTTP statuses by the API.
#[derive(Debug, thiserror::Error)]
pub enum OpError {
    /// Bad input (400), naming the field.
    #[error("{message}")]
    Invalid {
        /// The field.
        field: String,
        /// Why.
        message: String,
    },
    /// Unknown VM (404).
    #[error("no VM named {0:?}")]
    NotFound(String),
    /// Conflict with the VM's state (409).
    #[error("{0}")]
    Conflict(String),
    /// Something failed on our side (500).
    #[error("{0}")]
    Internal(String),
    /// A service this operation needs does not answer (503).
    #[error("{0}")]
    Unavailable(String),
}

impl From<policy::StoreError> for OpError {
    fn from(e: policy::StoreError) -> Self {
        OpError::Internal(e.to_string())
    }
}

impl Shared {
    /// `storage_dir/vms/<vm>`.
    pub fn vm_dir(&self, vm: &str) -> PathBuf {
        self.cfg.storage_dir.join("vms").join(vm)
    }

    /// The record of `vm`.
    pub fn record(&self, vm: &str) -> Option<VmRecordLocal> {
        lock(&self.vms).get(vm).cloned()
    }

    /// Every record.
    pub fn records(&self) -> Vec<VmRecordLocal> {
        lock(&self.vms).values().cloned().collect()
    }

    /// The last status of `vm`'s worker.
    pub fn status(&self, vm: &str) -> Option<WorkerStatus> {
        lock(&self.status).get(vm).cloned()
    }

    /// The progress of `vm`'s transition.
    pub fn progress(&self, vm: &str) -> Option<Progress> {
        lock(&self.progress).get(vm).cloned()
    }

    /// Sets (or clears) the progress of `vm`'s transition.
    pub fn set_progress(&self, vm: &str, p: Option<Progress>) {
        let mut m = lock(&self.progress);
        match p {
            Some(p) => {
                m.insert(vm.to_string(), p);
            }
            None => {
                m.remove(vm);
            }
        }
    }

    /// Changes `vm`'s record with `f` and persists it.
    pub fn update<R>(
        &self,
        vm: &str,
        f: impl FnOnce(&mut VmRecordLocal) -> R,
    ) -> Result<R, OpError> {
        let mut m = lock(&self.vms);
        let rec = m
            .get_mut(vm)
            .ok_or_else(|| OpError::NotFound(vm.to_string()))?;
        let r = f(rec);
        save_record(&self.vm_dir(vm), rec).map_err(|e| OpError::Internal(e.to_string()))?;
        Ok(r)
    }

    /// Appends a note to `vm`'s event history (logged too).
    pub fn note(&self, vm: &str, detail: impl Into<String>) {
        let detail = detail.into();
        info!(vm, "{detail}");
        self.append_note(vm, detail);
    }

    /// Appends a warning to `vm`'s event history: a note whose detail starts with `warning: ` (logged
    /// as a warning).
    pub fn warn_note(&self, vm: &str, detail: impl Into<String>) {
        let detail = detail.into();
        warn!(vm, "{detail}");
        self.append_note(vm, format!("warning: {detail}"));
    }

    /// Appends an error to `vm`'s event history: a note whose detail starts with `error: ` (logged as
    /// an error).
    pub fn error_note(&self, vm: &str, detail: impl Into<String>) {
        let detail = detail.into();
        tracing::error!(vm, "{detail}");
        self.append_note(vm, format!("error: {detail}"));
    }

    fn append_note(&self, vm: &str, detail: String) {
        if let Err(e) = self
            .store
            .append(vm, NewEvent::new(EventKind::Note, detail))
        {
            warn!(vm, error = %e, "could not record an event");
        }
    }

    /// What the Nova tag poller last read for `vm`.
    pub fn nova_tag(&self, vm: &str) -> Option<nova_tags::NovaTag> {
        lock(&self.nova_tags).get(vm).cloned()
    }

    /// Remembers what the Nova tag poller read for `vm`.
    pub fn set_nova_tag(&self, vm: &str, tag: nova_tags::NovaTag) {
        lock(&self.nova_tags).insert(vm.to_string(), tag);
    }

    /// Forgets the Nova tags of every VM but `keep`.
    pub fn retain_nova_tags(&self, keep: &[String]) {
        lock(&self.nova_tags).retain(|vm, _| keep.contains(vm));
    }

    /// The in-process HA engine (`ha.node_config`): `Ok(None)` when the HA engine is not this daemon's,
    /// `Err(why)` while it does not run.
    pub fn ha_engine(&self) -> Result<Option<crate::ha::HaEngine>, String> {
        if self.cfg.ha.node_config.is_none() {
            return Ok(None);
        }
        match lock(&self.ha_engine).clone() {
            Some(e) => Ok(Some(e)),
            None => Err(lock(&self.ha_error)
                .clone()
                .unwrap_or_else(|| "the HA engine is starting".into())),
        }
    }

    /// The client of peer `name`.
    pub fn peer(&self, name: &str) -> Option<&ApiClient> {
        self.peers.get(name)
    }

    /// FT VMs on this host (primaries at level ft or in a transition touching ft, and standbys).
    pub fn ft_vms(&self) -> u32 {
        let recs = self.records();
        recs.iter()
            .filter(|r| {
                matches!(r.role, LocalRole::Standby { .. })
                    || r.secondary.is_some()
                    || self
                        .store
                        .vm(&r.def.name)
                        .ok()
                        .flatten()
                        .is_some_and(|v| v.current == Level::Ft)
            })
            .count() as u32
    }

    /// The worker addresses of `slot`: (link, heartbeat, output for `port`).
    pub fn worker_addrs(
        &self,
        slot: u16,
        output_port: u16,
    ) -> (SocketAddr, SocketAddr, SocketAddr) {
        let a = &self.cfg.addresses;
        let p = &self.cfg.ports;
        (
            SocketAddr::new(a.link, p.link + slot),
            SocketAddr::new(a.hb, p.heartbeat + slot),
            SocketAddr::new(a.link, output_port),
        )
    }

    /// A free worker slot.
    pub fn free_slot(&self) -> Result<u16, OpError> {
        let used: Vec<u16> = lock(&self.vms).values().map(|r| r.slot).collect();
        (0..self.cfg.ports.slots)
            .find(|s| !used.contains(s))
            .ok_or_else(|| {
                OpError::Conflict(format!(
                    "every worker slot is taken (ports.slots = {})",
                    self.cfg.ports.slots
                ))
            })
    }

    /// A free output port.
    pub fn free_output_port(&self) -> Result<u16, OpError> {
        let used: Vec<u16> = lock(&self.vms)
            .values()
            .map(|r| r.def.output_port)
            .collect();
        let base = self.cfg.ports.output;
        (base..base + self.cfg.ports.slots)
            .find(|p| !used.contains(p))
            .ok_or_else(|| OpError::Conflict("every output port is taken".into()))
    }

    /// Inserts a new record (persisted).
    pub fn insert(&self, rec: VmRecordLocal) -> Result<(), OpError> {
        let dir = self.vm_dir(&rec.def.name);
        std::fs::create_dir_all(&dir)
            .map_err(|e| OpError::Internal(format!("{}: {e}", dir.display())))?;
        save_record(&dir, &rec).map_err(|e| OpError::Internal(e.to_string()))?;
        lock(&self.vms).insert(rec.def.name.clone(), rec);
        Ok(())
    }

    /// Removes a record and its directory (the volume versions at the target stay).
    pub fn remove(&self, vm: &str) {
        if let Some(v) = &self.volumes {
            v.forget(vm);
        }
        lock(&self.vms).remove(vm);
        lock(&self.status).remove(vm);
        lock(&self.nova_tags).remove(vm);
        let _ = std::fs::remove_dir_all(self.vm_dir(vm));
    }

    /// Starts `vm`'s worker (primary or standby per its record). Its stdout and stderr go to
    /// `worker.log`; it gets its own process group, so that neither a signal to the daemon's group
    /// nor the daemon's exit reaches it.
    pub fn spawn_worker(&self, vm: &str) -> Result<(), OpError> {
        let rec = self
            .record(vm)
            .ok_or_else(|| OpError::NotFound(vm.to_string()))?;
        let files = WorkerFiles::new(self.vm_dir(vm));
        let (link, hb, output) = self.worker_addrs(rec.slot, rec.def.output_port);
        let (mode, peers) = match &rec.role {
            LocalRole::Primary => (
                Mode::Primary {
                    known_generation: rec.generation,
                },
                Vec::new(),
            ),
            LocalRole::Standby {
                primary,
                primary_link,
                primary_hb,
            } => (
                Mode::Standby,
                vec![control::Peer {
                    name: primary.clone(),
                    link: *primary_link,
                    hb: *primary_hb,
                    hb2: self
                        .cfg
                        .peer(primary)
                        .and_then(|p| p.hb2)
                        .map(|ip| SocketAddr::new(ip, primary_hb.port())),
                }],
            ),
        };
        let spec = WorkerSpec {
            vm: vm.to_string(),
            host: self.cfg.host.clone(),
            pki: self.cfg.pki_dir.clone(),
            guest: match rec.def.guest_elf_sha256 {
                Some(_) => files.dir.join(GUEST_ELF).display().to_string(),
                None => rec.def.guest.clone(),
            },
            guest_args: rec.def.guest_args.clone(),
            mem_mib: rec.def.memory_mib,
            vcpus: rec.def.vcpus,
            disk_mib: rec.def.disk_mib,
            link,
            colo_port: if rec.def.qemu.as_ref().is_some_and(|q| q.colo) {
                self.cfg.ports.colo + rec.slot * crate::config::COLO_PORTS_PER_SLOT
            } else {
                0
            },
            hb,
            hb2: self
                .cfg
                .addresses
                .hb2
                .map(|ip| SocketAddr::new(ip, hb.port())),
            output,
            coordinator: self.coordinator.clone(),
            // A QEMU VM's epoch is COLO's checkpoint period.
            epoch_ms: match &rec.def.qemu {
                Some(_) => self.cfg.qemu.colo_checkpoint_ms.unwrap_or(100),
                None => self.cfg.epoch.interval_ms,
            },
            hb_interval_ms: self.cfg.heartbeat.interval_ms,
            hb_timeout_ms: self.cfg.heartbeat.timeout_ms,
            mode,
            peers,
            fence: self.cfg.fence.clone(),
            incoming: lock(&self.incoming).get(vm).map(|e| e.spec.clone()),
            qemu: rec.def.qemu.clone().map(|mut q| {
                if q.binary.is_none() {
                    q.binary = self.cfg.qemu.binary.clone();
                }
                q.extra_args = self.cfg.qemu.extra_args.clone();
                q
            }),
        };
        let internal = |what: &str, e: std::io::Error| OpError::Internal(format!("{what}: {e}"));
        worker::write_atomic(
            &files.spec(),
            &serde_json::to_vec_pretty(&spec).map_err(|e| OpError::Internal(e.to_string()))?,
        )
        .map_err(|e| internal("worker.json", e))?;
        let _ = std::fs::remove_file(files.exit());
        let _ = std::fs::remove_file(files.pid());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(files.log())
            .map_err(|e| internal("worker.log", e))?;
        let log2 = log.try_clone().map_err(|e| internal("worker.log", e))?;
        let exe = worker_exe();
        let child = std::process::Command::new(&exe)
            .arg("vm-worker")
            .arg("--dir")
            .arg(&files.dir)
            .stdin(std::process::Stdio::null())
            .stdout(log)
            .stderr(log2)
            .env(
                "RUST_LOG",
                std::env::var("AX_WORKER_LOG").unwrap_or_else(|_| "info".into()),
            )
            .env_remove("NOTIFY_SOCKET")
            .env_remove("JOURNAL_STREAM")
            .process_group(0)
            .spawn()
            .map_err(|e| internal(&format!("starting {}", exe.display()), e))?;
        // The pid file exists from now on (the worker rewrites the same line), so that the monitor
        // never mistakes a worker that is still starting for a dead one.
        let pid = child.id();
        let start = worker::proc_start_time(pid).unwrap_or(0);
        worker::write_atomic(&files.pid(), format!("{pid} {start}\n").as_bytes())
            .map_err(|e| internal("worker.pid", e))?;
        info!(vm, pid, "worker started");
        lock(&self.children).push(child);
        Ok(())
    }

    /// Sends `req` to `vm`'s worker.
    pub async fn worker_call(
        &self,
        vm: &str,
        req: &WorkerRequest,
    ) -> Result<control::WorkerResponse, String> {
        let sock = WorkerFiles::new(self.vm_dir(vm)).socket();
        let resp = control::call(&sock, req)
            .await
            .map_err(|e| format!("worker of {vm}: {e}"))?;
        if !resp.ok {
            return Err(format!(
                "worker of {vm}: {}",
                resp.error.clone().unwrap_or_default()
            ));
        }
        Ok(resp)
    }

    /// Whether this host runs COLO with `q`'s QEMU binary ([`ax_qemu::colo::probe`], cached per
    /// binary): its version (`7.2.0`), or why not.
    pub async fn colo_support(&self, q: &ax_qemu::def::QemuDef) -> Result<String, String> {
        let binary = q
            .binary
            .clone()
            .or_else(|| self.cfg.qemu.binary.clone())
            .unwrap_or_else(|| "qemu-system-x86_64".to_string());
        ax_qemu::colo::probe(&binary)
            .await
            .map(|s| format!("{}.{}.{}", s.version.0, s.version.1, s.version.2))
            .map_err(|e| e.to_string())
    }

    /// Whether `vm`'s worker process is alive.
    pub fn worker_alive(&self, vm: &str) -> Option<u32> {
        worker::alive(&WorkerFiles::new(self.vm_dir(vm)).pid())
    }

    /// Stops `vm`'s worker (destroying the VM) and waits until it is gone (5 s, then SIGKILL).
    pub async fn stop_worker(&self, vm: &str) {
        let _ = self.worker_call(vm, &WorkerRequest::Stop).await;
        for _ in 0..100 {
            if self.worker_alive(vm).is_none() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if let Some(pid) = self.worker_alive(vm) {
            warn!(vm, pid, "worker did not stop: killing it");
            // SAFETY: kill(2) with a pid we recorded for this worker and checked (start time) above.
            unsafe {
                libc::kill(pid as i32, libc::SIGKILL);
            }
        }
        // A QEMU VM's QEMU outlives its worker by design (re-attach): one the worker did not quit goes
        // with it here.
        let run = ax_qemu::def::RunFiles {
            dir: self.vm_dir(vm),
        };
        if ax_qemu::process::alive(&run.pid()).is_some() {
            warn!(vm, "QEMU outlived its stopped worker: killing it");
            let _ = tokio::task::spawn_blocking(move || {
                ax_qemu::process::kill_recorded(&run, Duration::from_secs(5))
            })
            .await;
        }
        self.reap();
    }

    fn reap(&self) {
        lock(&self.children).retain_mut(|c| !matches!(c.try_wait(), Ok(Some(_))));
    }

    /// Records `vm` as down for `reason`.
    fn mark_down(&self, vm: &str, reason: String) {
        let _ = self.update(vm, |r| r.down_reason = Some(reason));
    }
}

/// Whether a QEMU VM can become FT: only if created FT-capable (`qemu.ft_capable`).
pub fn check_colo_capable(vm: &str, q: &ax_qemu::def::QemuDef) -> Result<(), String> {
    if q.colo {
        return Ok(());
    }
    Err(format!(
        "{vm} is a QEMU VM created without ft_capable (axctl vm create --ft-capable): COLO needs the \
         pc machine, quorum-wrapped disks and taps without vnet_hdr from QEMU's start; it can run at \
         levels none and ha (create it again FT-capable for ft)"
    ))
}

/// A COLO secondary's definition on this host: the primary's, with each disk a file of this host in
/// the VM's directory `dir` (`disk<i>.img`; the node creates it as a base copy of the primary's at
/// each session, as a live migration's destination does). Kernel, initrd and bridges are the same
/// on every host.
pub fn colo_standby_disks(q: &ax_qemu::def::QemuDef, dir: &Path) -> ax_qemu::def::QemuDef {
    let mut out = q.clone();
    let mut i = 0;
    let mut next = || {
        let p = dir.join(format!("disk{i}.img"));
        i += 1;
        p
    };
    if out.image.is_some() {
        out.image = Some(next());
    }
    for d in &mut out.disks {
        d.path = next();
    }
    out
}

/// The uploaded guest ELF in a VM's directory.
pub const GUEST_ELF: &str = "guest.elf";

/// The binary that runs workers: this executable (`ax-agent`), or `AX_AGENT_EXE` when set (tests).
fn worker_exe() -> PathBuf {
    std::env::var_os("AX_AGENT_EXE")
        .map(PathBuf::from)
        .or_else(|| std::env::current_exe().ok())
        .unwrap_or_else(|| PathBuf::from("ax-agent"))
}

fn save_record(dir: &Path, rec: &VmRecordLocal) -> std::io::Result<()> {
    let bytes = serde_json::to_vec_pretty(rec).map_err(std::io::Error::other)?;
    worker::write_atomic(&dir.join("vm.json"), &bytes)
}

fn load_records(dir: &Path) -> Result<BTreeMap<String, VmRecordLocal>, String> {
    let mut out = BTreeMap::new();
    let vms = dir.join("vms");
    let entries = match std::fs::read_dir(&vms) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(format!("{}: {e}", vms.display())),
    };
    for entry in entries.flatten() {
        let path = entry.path().join("vm.json");
        let Ok(bytes) = std::fs::read(&path) else {
            continue;
        };
        let rec: VmRecordLocal = serde_json::from_slice(&bytes)
            .map_err(|e| format!("{} is corrupt: {e}", path.display()))?;
        out.insert(rec.def.name.clone(), rec);
    }
    Ok(out)
}

/// The daemon: shared state plus the engine.
#[derive(Debug, Clone)]
pub struct Daemon {
    /// Shared state.
    pub shared: Arc<Shared>,
    /// The policy engine.
    pub engine: Arc<Engine>,
}

/// Options of `ax-agent run`.
#[derive(clap::Args, Debug, Clone)]
pub struct RunArgs {
    /// Configuration file (default /etc/ax/agent.toml; all defaults if it does not exist).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Check the configuration and the token file, print the effective configuration, exit.
    #[arg(long)]
    pub check: bool,
}

/// Checks the token file: exists, owner-only permissions, one non-empty line. Returns the token.
pub fn check_token_file(path: &Path) -> Result<String, String> {
    let hint = format!(
        " (write one line, e.g. `head -c 32 /dev/urandom | base64 > {0}; chmod 600 {0}`)",
        path.display()
    );
    crate::config::read_secret_file("token file", path, &hint)
}

/// `ax-agent run`: returns the exit code.
pub fn run(args: &RunArgs) -> i32 {
    let cfg = match Config::load(args.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ax-agent run: {e}");
            return 2;
        }
    };
    let token = match check_token_file(&cfg.token_file) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("ax-agent run: {e}");
            return 2;
        }
    };
    if let Some(path) = &cfg.ha.node_config {
        if let Err(e) = crate::ha::HaNodeConfig::load(path) {
            eprintln!("ax-agent run: ha.node_config: {e}");
            return 2;
        }
    }
    // The volume target and its secrets, before anything starts.
    let volumes = match volume::Volumes::from_config(&cfg) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("ax-agent run: {e}");
            return 2;
        }
    };
    let file = args
        .config
        .clone()
        .unwrap_or_else(|| PathBuf::from(crate::config::DEFAULT_PATH));
    let nova_password = match cfg.nova_tagging_password(&file.display().to_string()) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("ax-agent run: {e}");
            return 2;
        }
    };
    if args.check {
        match toml::to_string_pretty(&cfg) {
            Ok(t) => {
                println!("{t}");
                return 0;
            }
            Err(e) => {
                eprintln!("ax-agent run: {e}");
                return 1;
            }
        }
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ax-agent run: cannot start the async runtime: {e}");
            return 1;
        }
    };
    let span = tracing::info_span!("agent", host = %cfg.host);
    match rt.block_on(serve(cfg, token, nova_password, volumes).instrument(span)) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("ax-agent run: {e}");
            tracing::error!(error = %e, "the agent failed");
            1
        }
    }
}

/// Starts (or re-attaches to) the local witness; returns its address. It serves with this host's
/// certificate. It starts fresh only the first time (its directory is new); a witness whose state file
/// is missing later re-learns the generations from the workers' claims.
fn local_witness(cfg: &Config) -> Result<SocketAddr, String> {
    let addr = SocketAddr::from(([127, 0, 0, 1], cfg.ports.local_witness));
    let dir = cfg.storage_dir.join("witness");
    let new = !dir.exists();
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let pid_file = dir.join("witness.pid");
    if let Some(pid) = worker::alive(&pid_file) {
        info!(pid, %addr, "re-attached to the local witness");
        return Ok(addr);
    }
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("witness.log"))
        .map_err(|e| format!("witness.log: {e}"))?;
    let log2 = log.try_clone().map_err(|e| format!("witness.log: {e}"))?;
    let child = std::process::Command::new(worker_exe())
        .arg("witness")
        .arg("--listen")
        .arg(addr.to_string())
        .arg("--state")
        .arg(dir.join("witness.json"))
        .arg("--pki")
        .arg(&cfg.pki_dir)
        .arg("--name")
        .arg(&cfg.host)
        .args(new.then_some("--init"))
        .stdin(std::process::Stdio::null())
        .stdout(log)
        .stderr(log2)
        .env_remove("NOTIFY_SOCKET")
        .process_group(0)
        .spawn()
        .map_err(|e| format!("starting the local witness: {e}"))?;
    let pid = child.id();
    let start = worker::proc_start_time(pid).unwrap_or(0);
    worker::write_atomic(&pid_file, format!("{pid} {start}\n").as_bytes())
        .map_err(|e| format!("witness.pid: {e}"))?;
    // Reaped by a thread; if the daemon exits first, init reaps it.
    std::thread::spawn(move || {
        let mut child = child;
        let _ = child.wait();
    });
    info!(pid, %addr, "started the local witness");
    Ok(addr)
}

/// Builds the daemon from `cfg` (store, records, witness) and its volume replication, without serving.
pub fn build(cfg: Config, token: &str, volumes: Option<volume::Volumes>) -> Result<Daemon, String> {
    std::fs::create_dir_all(&cfg.storage_dir)
        .map_err(|e| format!("storage dir {}: {e}", cfg.storage_dir.display()))?;
    let store = Store::open(&cfg.storage_dir).map_err(|e| e.to_string())?;
    let records = load_records(&cfg.storage_dir)?;
    let (slots, outputs): (Vec<u16>, Vec<u16>) = records
        .values()
        .map(|r| (r.slot, r.def.output_port))
        .unzip();
    cfg.check_ports_free(&slots, &outputs)?;
    let coordinator = match (hostfail::etcd_config(&cfg), cfg.witness) {
        (Some(etcd), _) => crate::coord::CoordSpec::etcd(&etcd),
        (None, Some(addr)) => crate::coord::CoordSpec::Witness {
            addr,
            name: cfg.witness_name.clone(),
        },
        (None, None) => crate::coord::CoordSpec::Witness {
            addr: local_witness(&cfg)?,
            name: cfg.host.clone(),
        },
    };
    let peer_tls = if cfg.api.tls {
        Some(
            crate::certs::TlsIdentity::load(&crate::certs::PkiPaths::in_dir(
                &cfg.pki_dir,
                &cfg.host,
            ))
            .and_then(|id| id.https_client())
            .map_err(|e| format!("API TLS (api.tls = true): {e}"))?,
        )
    } else {
        None
    };
    let peers = cfg
        .peers
        .iter()
        .map(|p| {
            let client = match &peer_tls {
                // Peers' certificates name the peer: the URL uses its name, resolved to `api`.
                Some(tls) => {
                    ApiClient::https(p.api, &p.name, tls.clone(), token, Duration::from_secs(5))
                        .map_err(|e| format!("peer {}: {e}", p.name))?
                }
                None => ApiClient::new(&format!("http://{}", p.api), token, Duration::from_secs(5)),
            };
            Ok((p.name.clone(), client))
        })
        .collect::<Result<_, String>>()?;
    let hostfail = hostfail::HostFail::from_config(&cfg)?.map(Arc::new);
    let shared = Arc::new(Shared {
        cfg,
        store: store.clone(),
        coordinator,
        vms: Mutex::new(records),
        status: Mutex::new(BTreeMap::new()),
        progress: Mutex::new(BTreeMap::new()),
        children: Mutex::new(Vec::new()),
        peers,
        counters: Counters::default(),
        ready: AtomicBool::new(false),
        draining: AtomicBool::new(false),
        create: tokio::sync::Mutex::new(()),
        reprotections: Mutex::new(BTreeMap::new()),
        end_asked: Mutex::new(BTreeMap::new()),
        volumes,
        nova_tags: Mutex::new(BTreeMap::new()),
        ha_engine: Mutex::new(None),
        ha_error: Mutex::new(None),
        incoming: Mutex::new(BTreeMap::new()),
        migrations: Mutex::new(BTreeMap::new()),
        hostfail,
    });
    let engine = Arc::new(policy::Engine::new(
        store,
        actuator::Act(Arc::clone(&shared)),
        shared.cfg.host.clone(),
    ));
    Ok(Daemon { shared, engine })
}

/// Serves `app` on `listener` (plain or TLS) until `stopped`, in the `api` span.
fn spawn_api<L>(
    listener: L,
    app: axum::Router,
    stopped: impl std::future::Future<Output = ()> + Send + 'static,
) -> tokio::task::JoinHandle<std::io::Result<()>>
where
    L: axum::serve::Listener,
    L::Addr: std::fmt::Debug,
{
    tokio::spawn(
        async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(stopped)
                .await
        }
        .instrument(tracing::info_span!("api")),
    )
}

/// Serves until SIGTERM. `nova_password`: the Keystone password when Nova tags are read.
async fn serve(
    cfg: Config,
    token: String,
    nova_password: Option<String>,
    volumes: Option<volume::Volumes>,
) -> Result<(), String> {
    let daemon = build(cfg, &token, volumes)?;
    let shared = Arc::clone(&daemon.shared);
    // Re-attach: every worker that should run and is alive is polled from now on; the dead ones are
    // handled by the monitor like any crash.
    for rec in shared.records() {
        let vm = &rec.def.name;
        match shared.worker_alive(vm) {
            Some(pid) => info!(vm, pid, "re-attached to the worker"),
            None if rec.running => info!(vm, "worker not running: the monitor decides"),
            None => {}
        }
    }
    let listener = tokio::net::TcpListener::bind(shared.cfg.api.listen)
        .await
        .map_err(|e| format!("API listen {}: {e}", shared.cfg.api.listen))?;
    let bound = listener.local_addr().map_err(|e| e.to_string())?;
    worker::write_atomic(
        &shared.cfg.storage_dir.join("api.addr"),
        format!("{bound}\n").as_bytes(),
    )
    .map_err(|e| format!("api.addr: {e}"))?;
    info!(%bound, tls = shared.cfg.api.tls, "API listening");
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let app = api::router(daemon.clone(), token);
    let mut stop_api = stop_rx.clone();
    let stopped = async move {
        let _ = stop_api.wait_for(|s| *s).await;
    };
    let api_task = if shared.cfg.api.tls {
        let id = crate::certs::TlsIdentity::load(&crate::certs::PkiPaths::in_dir(
            &shared.cfg.pki_dir,
            &shared.cfg.host,
        ))
        .and_then(|id| id.https_server())
        .map_err(|e| format!("API TLS (api.tls = true): {e}"))?;
        let listener = tls::TlsListener::new(listener, id).map_err(|e| e.to_string())?;
        spawn_api(listener, app, stopped)
    } else {
        spawn_api(listener, app, stopped)
    };
    let monitor = tokio::spawn(
        monitor(daemon.clone(), stop_rx.clone()).instrument(tracing::info_span!("monitor")),
    );
    let volumes = tokio::spawn(
        volume::run(Arc::clone(&shared), stop_rx.clone()).instrument(tracing::info_span!("volume")),
    );
    let hostfail = tokio::spawn(
        hostfail::run(daemon.clone(), stop_rx.clone()).instrument(tracing::info_span!("hostfail")),
    );
    let ha = shared.cfg.ha.node_config.clone().map(|path| {
        tokio::spawn(
            run_ha_engine(Arc::clone(&shared), path, stop_rx.clone())
                .instrument(tracing::info_span!("ha")),
        )
    });
    let tags = match (&shared.cfg.openstack, nova_password) {
        (Some(o), Some(password)) => Some(tokio::spawn(
            nova_tags::run(
                daemon.clone(),
                o.keystone_settings(password),
                Duration::from_secs(o.tag_poll_s),
                stop_rx.clone(),
            )
            .instrument(tracing::info_span!("nova_tags")),
        )),
        _ => None,
    };
    // Transitions a previous life left in progress: resumed (or rolled back) in the background.
    let recovering = {
        let d = daemon.clone();
        tokio::spawn(
            async move {
                // Let the monitor read every worker's status first.
                tokio::time::sleep(Duration::from_millis(600)).await;
                // Live migrations away from here that a previous agent left unfinished.
                migrate::resume_all(&d);
                let vms: Vec<String> = match d.shared.store.vms() {
                    Ok(v) => v
                        .into_iter()
                        .filter(|(_, r)| r.transition.is_some())
                        .map(|(n, _)| n)
                        .collect(),
                    Err(e) => {
                        warn!(error = %e, "store");
                        return;
                    }
                };
                for vm in vms {
                    let d = d.clone();
                    tokio::spawn(async move {
                        info!(
                            vm,
                            "resuming the transition a previous agent left in progress"
                        );
                        let r = d.engine.resume(&vm).await;
                        d.finished(&vm, r);
                    });
                }
            }
            .instrument(tracing::info_span!("recovery")),
        )
    };
    shared.ready.store(true, Ordering::Release);
    notify(&[sd_notify::NotifyState::Ready]);
    notify_status(&shared);
    let watchdog = tokio::spawn(watchdog(Arc::clone(&shared)));

    wait_for_signal().await;
    info!("SIGTERM: draining (workers keep running)");
    shared.draining.store(true, Ordering::Release);
    notify(&[
        sd_notify::NotifyState::Stopping,
        sd_notify::NotifyState::Status("draining"),
    ]);
    // Readiness probes see 503 for a moment before the listener closes.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _ = stop_tx.send(true);
    // Transitions reach a safe point: a step that ends in the next seconds is recorded; whatever
    // still runs then is resumed from its persisted cursor by the next agent.
    for _ in 0..100 {
        if lock(&shared.progress).is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let left: Vec<String> = lock(&shared.progress).keys().cloned().collect();
    if !left.is_empty() {
        warn!(
            ?left,
            "transitions still running: the next agent resumes them"
        );
    }
    recovering.abort();
    watchdog.abort();
    let _ = tokio::time::timeout(Duration::from_secs(5), api_task).await;
    let _ = monitor.await;
    let _ = hostfail.await;
    // A replication cut short is taken again by the next agent (the version was not listed).
    volumes.abort();
    if let Some(tags) = tags {
        let _ = tags.await;
    }
    if let Some(ha) = ha {
        let _ = ha.await;
    }
    info!("drained");
    Ok(())
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

fn notify(state: &[sd_notify::NotifyState<'_>]) {
    let _ = sd_notify::notify(state);
}

fn notify_status(shared: &Shared) {
    let recs = shared.records();
    let running = recs
        .iter()
        .filter(|r| r.running && r.down_reason.is_none())
        .count();
    let s = format!(
        "{} VMs ({running} running), {} FT",
        recs.len(),
        shared.ft_vms()
    );
    notify(&[sd_notify::NotifyState::Status(&s)]);
}

async fn watchdog(shared: Arc<Shared>) {
    let Some(timeout) = sd_notify::watchdog_enabled() else {
        return;
    };
    let period = (timeout / 2).max(Duration::from_millis(100));
    loop {
        tokio::time::sleep(period).await;
        notify(&[sd_notify::NotifyState::Watchdog]);
        notify_status(&shared);
    }
}

impl From<policy::EngineError> for OpError {
    fn from(e: policy::EngineError) -> Self {
        match e {
            policy::EngineError::Busy { .. } | policy::EngineError::AlreadyDriving { .. } => {
                OpError::Conflict(e.to_string())
            }
            _ => OpError::Internal(e.to_string()),
        }
    }
}

impl Daemon {
    /// Asks for `vm` at `level` through the policy engine and drives the transition that starts: the
    /// checks and the request of `PUT /v1/vms/{vm}/level`, which the Nova tag poller shares. Returns the
    /// engine's answer and the VM's level before it.
    pub fn set_level(&self, vm: &str, level: Level) -> Result<(policy::Request, Level), OpError> {
        let rec = self
            .shared
            .record(vm)
            .ok_or_else(|| OpError::NotFound(vm.to_string()))?;
        if let LocalRole::Standby { primary, .. } = &rec.role {
            return Err(OpError::Conflict(format!(
                "{vm} is a standby for {primary}: change its level on {primary}"
            )));
        }
        let pol = self.shared.store.vm(vm)?.unwrap_or_default();
        let running = rec.running && rec.down_reason.is_none();
        if let Some(q) = rec.def.qemu.as_ref().filter(|_| level == Level::Ft) {
            check_colo_capable(vm, q).map_err(OpError::Conflict)?;
        }
        if level == Level::Ft && !running && pol.current != Level::Ft {
            return Err(OpError::Conflict(format!(
                "{vm} is not running: start it before setting level ft"
            )));
        }
        let r = self.engine.request(vm, level)?;
        if let policy::Request::Started(_) = &r {
            self.drive(vm);
        }
        Ok((r, pol.current))
    }

    /// Records how a transition driven by this process ended (metrics, progress).
    pub fn finished(&self, vm: &str, r: Result<policy::Outcome, policy::EngineError>) {
        let c = &self.shared.counters;
        match &r {
            Ok(policy::Outcome::Done { .. }) => c.transitions_done.fetch_add(1, Ordering::Relaxed),
            Ok(policy::Outcome::RolledBack { .. }) => {
                c.transitions_rolled_back.fetch_add(1, Ordering::Relaxed)
            }
            Ok(policy::Outcome::Failed { .. }) => {
                c.transitions_failed.fetch_add(1, Ordering::Relaxed)
            }
            Err(_) => 0,
        };
        match r {
            Ok(o) => info!(vm, outcome = ?o, "transition ended"),
            Err(e) => warn!(vm, error = %e, "transition"),
        }
        self.shared.set_progress(vm, None);
    }

    /// Refuses level ft for a QEMU VM whose host cannot run COLO ([`Shared::colo_support`]) or that
    /// was not created FT-capable; nothing for a native VM.
    pub async fn check_qemu_ft(&self, vm: &str) -> Result<(), OpError> {
        let Some(rec) = self.shared.record(vm) else {
            return Err(OpError::NotFound(vm.to_string()));
        };
        let Some(q) = &rec.def.qemu else {
            return Ok(());
        };
        check_colo_capable(vm, q).map_err(OpError::Conflict)?;
        self.shared
            .colo_support(q)
            .await
            .map(|_| ())
            .map_err(|e| OpError::Conflict(format!("{vm}: level ft needs COLO: {e}")))
    }

    /// Starts driving `vm`'s transition in a task of its own.
    pub fn drive(&self, vm: &str) {
        let d = self.clone();
        let vm = vm.to_string();
        self.shared.set_progress(&vm, Some(Progress::default()));
        tokio::spawn(
            async move {
                let r = d.engine.drive(&vm).await;
                d.finished(&vm, r);
            }
            .instrument(tracing::info_span!("transition")),
        );
    }
}

/// Polls every worker; restarts crashed ones (monitored VMs, within the limit), notices failovers
/// (a standby that became primary) and VMs that moved away.
async fn monitor(d: Daemon, mut stop: tokio::sync::watch::Receiver<bool>) {
    let mut reprotect_checked: BTreeMap<String, std::time::Instant> = BTreeMap::new();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        d.shared.reap();
        for rec in d.shared.records() {
            let vm = rec.def.name.clone();
            check_vm(&d, rec).await;
            if awaits_reprotection(&d, &vm)
                && reprotect_checked
                    .get(&vm)
                    .is_none_or(|t| t.elapsed() >= REPROTECT_EVERY)
            {
                reprotect_checked.insert(vm.clone(), std::time::Instant::now());
                let d = d.clone();
                tokio::spawn(
                    async move { reprotect(&d, &vm).await }
                        .instrument(tracing::info_span!("reprotect")),
                );
            }
        }
    }
}

/// How often a VM that failed over to this host is checked for a host that can hold its new secondary.
const REPROTECT_EVERY: Duration = Duration::from_secs(2);

/// Whether `vm` failed over to this host and waits to be protected again: a running primary here, no
/// secondary, wanted at level ft but at ha, no transition running.
fn awaits_reprotection(d: &Daemon, vm: &str) -> bool {
    let s = &d.shared;
    if s.draining.load(Ordering::Acquire) {
        return false;
    }
    let Some(rec) = s.record(vm) else {
        return false;
    };
    if !matches!(rec.role, LocalRole::Primary)
        || !rec.running
        || rec.down_reason.is_some()
        || rec.secondary.is_some()
        || (rec.last_failover_ms.is_none() && rec.guest_end.is_none())
    {
        return false;
    }
    s.store
        .vm(vm)
        .ok()
        .flatten()
        .is_some_and(|p| p.desired == Level::Ft && p.current == Level::Ha && p.transition.is_none())
}

/// Protects a failed-over VM again (ha→ft: placement, live initial sync, epochs) once a peer can hold
/// its secondary — the old primary back, or another host. Silent while none can.
async fn reprotect(d: &Daemon, vm: &str) {
    let s = &d.shared;
    let me = s.cfg.host.clone();
    let act = d.engine.actuator();
    let Ok(hosts) = tokio::time::timeout(Duration::from_millis(1500), act.placement_hosts()).await
    else {
        return;
    };
    let limits = act.limits();
    let host = match policy::pick_secondary(vm, &me, &hosts, limits) {
        Ok(h) => h,
        Err(e) => {
            tracing::debug!(vm, reason = %e, "no host for a new secondary yet");
            return;
        }
    };
    if !awaits_reprotection(d, vm) {
        return;
    }
    // A failed attempt (rolled back to ha) is retried, later each time: 2 s, 4 s, … up to 5 minutes.
    let attempt = {
        let mut r = lock(&s.reprotections);
        let (n, not_before) = r
            .entry(vm.to_string())
            .or_insert((0, std::time::Instant::now()));
        if std::time::Instant::now() < *not_before {
            return;
        }
        *n += 1;
        *not_before = std::time::Instant::now()
            + (REPROTECT_EVERY * 2u32.saturating_pow(*n)).min(Duration::from_secs(300));
        *n
    };
    s.note(
        vm,
        format!(
            "re-protecting after the failover (attempt {attempt}): {host} can hold the secondary"
        ),
    );
    match d.engine.request(vm, Level::Ft) {
        Ok(policy::Request::Started(_)) => d.drive(vm),
        Ok(_) => {}
        Err(e) => warn!(vm, error = %e, "re-protection not started"),
    }
}

async fn check_vm(d: &Daemon, rec: VmRecordLocal) {
    let s = &d.shared;
    let vm = rec.def.name.clone();
    if !rec.running || rec.down_reason.is_some() {
        lock(&s.status).remove(&vm);
        if rec
            .down_reason
            .as_deref()
            .is_some_and(|r| r.starts_with(DIED_WHILE_FT))
        {
            // Asked every 2 s, off the monitor's loop (the peer may not answer).
            let due = {
                let mut asked = lock(&s.end_asked);
                let due = asked
                    .get(&vm)
                    .is_none_or(|t| t.elapsed() >= Duration::from_secs(2));
                if due {
                    asked.insert(vm.clone(), std::time::Instant::now());
                }
                due
            };
            if due {
                let d = d.clone();
                tokio::spawn(async move { learn_end_from_secondary(&d, &rec).await });
            }
        }
        return;
    }
    if s.worker_alive(&vm).is_some() {
        if let Ok(resp) = s.worker_call(&vm, &WorkerRequest::Status).await {
            if let Some(st) = resp.status {
                observe(d, &rec, st).await;
            }
        }
        return;
    }
    // Dead. Why?
    lock(&s.status).remove(&vm);
    let exit: Option<WorkerExit> = std::fs::read(WorkerFiles::new(s.vm_dir(&vm)).exit())
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    let why = exit.as_ref().map_or_else(
        || "killed".to_string(),
        |e| format!("exit {}: {}", e.code, e.reason),
    );
    if exit
        .as_ref()
        .is_some_and(|e| e.code == worker::EXIT_RUNS_ELSEWHERE)
    {
        s.note(
            &vm,
            format!("the VM runs on another host now: not restarting it here ({why})"),
        );
        s.mark_down(&vm, format!("moved: {why}"));
        return;
    }
    if exit
        .as_ref()
        .is_some_and(|e| e.code == crate::node::EXIT_FENCED)
    {
        s.note(
            &vm,
            format!("this host was superseded (fenced): the VM runs elsewhere ({why})"),
        );
        s.mark_down(&vm, format!("moved: {why}"));
        return;
    }
    if let Some(end) = exit.and_then(|e| e.guest_end) {
        guest_ended(d, &rec, end);
        return;
    }
    // A QEMU VM's worker died but QEMU runs on (its own session): the guest is fine. A new worker
    // re-attaches to it; nothing restarts, at any level.
    let run = ax_qemu::def::RunFiles { dir: s.vm_dir(&vm) };
    if rec.def.qemu.is_some() && ax_qemu::process::alive(&run.pid()).is_some() {
        s.warn_note(
            &vm,
            format!("the worker died ({why}); QEMU runs on: re-attaching a new worker"),
        );
        if let Err(e) = s.spawn_worker(&vm) {
            s.mark_down(&vm, format!("worker died: {why}; re-attach failed: {e}"));
        }
        return;
    }
    match &rec.role {
        LocalRole::Standby { primary, .. } => {
            s.note(
                &vm,
                format!("the standby worker for {primary} died ({why}): restarting it"),
            );
            if let Err(e) = s.spawn_worker(&vm) {
                s.mark_down(&vm, format!("crashed: {why}; restart failed: {e}"));
            }
        }
        LocalRole::Primary => {
            // An FT VM whose secondary holds a copy is taken over by the secondary: restarting it
            // here from its boot image would race that promotion (the witness would let only one
            // win, but the loser's copy would be the newer one).
            if rec.secondary.is_some() {
                s.note(
                    &vm,
                    format!(
                        "worker died ({why}) while FT: the secondary on {} takes over",
                        rec.secondary.clone().unwrap_or_default()
                    ),
                );
                s.mark_down(&vm, format!("{DIED_WHILE_FT} ({why})"));
                return;
            }
            if !rec.monitored {
                s.note(&vm, format!("crashed ({why}); level none: not restarted"));
                s.mark_down(&vm, format!("crashed: {why}"));
                return;
            }
            // With host-failure recovery, only under a generation won from the coordinator: the VM
            // may have been taken over while this host was down.
            if !hostfail::may_restart(s, &rec).await {
                return;
            }
            restart_in_place(s, &rec, &format!("crashed ({why})"), None);
        }
    }
}

/// The down reason of an FT primary whose worker died: its secondary takes over — or, if the guest had
/// ended in the last epoch the secondary committed, the VM is over on both hosts.
const DIED_WHILE_FT: &str = "moved: worker died while FT";

/// An FT primary whose worker died: asks its secondary's agent how that host sees the VM. If the guest
/// ended (the secondary committed the epoch that carries the end, and did not promote), this host takes
/// the same end: the VM is `exited`/`crashed` here too, not `moved`.
async fn learn_end_from_secondary(d: &Daemon, rec: &VmRecordLocal) {
    let s = &d.shared;
    let vm = rec.def.name.as_str();
    let Some(client) = rec.secondary.as_deref().and_then(|h| s.peer(h)) else {
        return;
    };
    let Ok(Ok(v)) = tokio::time::timeout(
        Duration::from_secs(2),
        client.get::<serde_json::Value>(&format!("/v1/vms/{vm}")),
    )
    .await
    else {
        return;
    };
    let Some(end) = v
        .get("last_guest_end")
        .cloned()
        .and_then(|e| serde_json::from_value::<GuestEnd>(e).ok())
        .filter(|_| {
            v["role"] == "secondary" && (v["state"] == "exited" || v["state"] == "crashed")
        })
    else {
        return;
    };
    s.note(
        vm,
        format!(
            "the guest {} (seen by the secondary {} in its last committed epoch): the VM ended on both \
             hosts, no failover",
            end.describe(),
            rec.secondary.clone().unwrap_or_default()
        ),
    );
    let _ = s.update(vm, |r| {
        r.down_reason = None;
        r.running = false;
        r.guest_end = Some(end);
    });
}

/// Restarts `rec`'s worker in place for `why`, within `[ha] restart_limit` per `restart_window_s`;
/// past the limit the VM stays down and the record says why. `end`: how the guest ended, when that is
/// the reason (the VM then shows `exited`/`crashed` if it is not restarted).
fn restart_in_place(s: &Shared, rec: &VmRecordLocal, why: &str, end: Option<GuestEnd>) {
    let vm = rec.def.name.as_str();
    let now = policy::store::now_ms();
    let window = s.cfg.ha.restart_window_s * 1000;
    let recent: Vec<u64> = rec
        .restarts
        .iter()
        .copied()
        .filter(|t| now.saturating_sub(*t) < window)
        .collect();
    if recent.len() as u32 >= s.cfg.ha.restart_limit {
        s.warn_note(
            vm,
            format!(
                "{why}; {} restarts within {} s already: giving up (start it again with `axctl vm start {vm}`)",
                recent.len(),
                s.cfg.ha.restart_window_s
            ),
        );
        match end {
            Some(end) => {
                let _ = s.update(vm, |r| {
                    r.running = false;
                    r.guest_end = Some(end);
                });
            }
            None => s.mark_down(vm, format!("crashed: {why}; restart limit reached")),
        }
        return;
    }
    let n = recent.len() + 1;
    let _ = s.update(vm, |r| {
        r.restarts = recent.clone();
        r.restarts.push(now);
        if end.is_some() {
            r.guest_end = end.clone();
        }
    });
    s.counters.restarts.fetch_add(1, Ordering::Relaxed);
    s.note(
        vm,
        format!(
            "{why}: restarting in place ({n}/{})",
            s.cfg.ha.restart_limit
        ),
    );
    if let Err(e) = s.spawn_worker(vm) {
        s.mark_down(vm, format!("{why}; restart failed: {e}"));
    }
}

/// A worker ended because its guest did: a VM event, never a host event. Recorded and counted; at
/// level ha a crash is restarted in place (and an exit too with `on_exit = restart`); an FT pair ends
/// on both hosts together (the secondary saw the end in its last committed epoch and does not promote).
fn guest_ended(d: &Daemon, rec: &VmRecordLocal, end: GuestEnd) {
    let s = &d.shared;
    let vm = rec.def.name.as_str();
    let what = end.describe();
    if end.crashed() {
        s.counters.guest_crashes.fetch_add(1, Ordering::Relaxed);
    } else {
        s.counters.guest_exits.fetch_add(1, Ordering::Relaxed);
    }
    let at = end
        .epoch
        .map(|e| format!(" in epoch {e}"))
        .unwrap_or_default();
    let stay = |note: String| {
        if end.crashed() {
            s.warn_note(vm, note);
        } else {
            s.note(vm, note);
        }
        let _ = s.update(vm, |r| {
            r.running = false;
            r.guest_end = Some(end.clone());
        });
    };
    match &rec.role {
        LocalRole::Standby { primary, .. } => stay(format!(
            "the guest {what}{at} on its primary {primary}: this standby ends with it (no failover)"
        )),
        LocalRole::Primary if rec.secondary.is_some() => stay(format!(
            "the guest {what}{at} while FT: the VM ended on both hosts (no failover); start it again with `axctl vm start {vm}`"
        )),
        LocalRole::Primary if !rec.monitored => stay(format!(
            "the guest {what}; level none: not restarted"
        )),
        LocalRole::Primary if end.crashed() || rec.def.on_exit == OnExit::Restart => {
            restart_in_place(s, rec, &format!("the guest {what}"), Some(end.clone()));
        }
        LocalRole::Primary => stay(format!(
            "the guest {what}; on_exit = stop: it stays stopped (start it again with `axctl vm start {vm}`)"
        )),
    }
}

/// Runs the HA engine of `ha.node_config` in this daemon until `stop`; a start that fails (Keystone or
/// Nova unreachable) is retried, 2 s doubling up to a minute, and its error served meanwhile.
async fn run_ha_engine(
    s: Arc<Shared>,
    path: PathBuf,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let events_file = s
        .cfg
        .ha
        .events_file
        .clone()
        .unwrap_or_else(|| s.cfg.storage_dir.join("ha-events.jsonl"));
    let mut backoff = Duration::from_secs(2);
    loop {
        let cfg = match crate::ha::HaNodeConfig::load(&path) {
            Ok(c) => c,
            Err(e) => {
                *lock(&s.ha_error) = Some(e.to_string());
                warn!(error = %e, "the HA engine's configuration");
                return;
            }
        };
        let options = crate::ha::ServeOptions {
            events_file: Some(events_file.clone()),
            print_events: false,
        };
        let mut stopped = stop.clone();
        let until = async move {
            let _ = stopped.wait_for(|s| *s).await;
        };
        let shared = Arc::clone(&s);
        let ready = move |engine| {
            info!("the HA engine runs in this daemon");
            *lock(&shared.ha_error) = None;
            *lock(&shared.ha_engine) = Some(engine);
        };
        let result = crate::ha::serve_until(cfg, options, until, ready).await;
        *lock(&s.ha_engine) = None;
        match result {
            Ok(()) => return,
            Err(e) => {
                let why = format!("the HA engine does not run: {e} (retrying in {backoff:?})");
                warn!("{why}");
                *lock(&s.ha_error) = Some(why);
            }
        }
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(60));
    }
}

/// Takes in a worker's status: remembers it, follows its generation, adopts a promoted standby.
async fn observe(d: &Daemon, rec: &VmRecordLocal, st: WorkerStatus) {
    let s = &d.shared;
    let vm = rec.def.name.clone();
    if let Some(g) = st.generation {
        if g != rec.generation {
            let _ = s.update(&vm, |r| r.generation = g);
        }
    }
    if let LocalRole::Standby { primary, .. } = &rec.role {
        if st.role == "solo" || st.role == "protected" {
            // The standby promoted: the primary's host died. The VM is ours now, unprotected.
            let primary = primary.clone();
            s.counters.failovers.fetch_add(1, Ordering::Relaxed);
            lock(&s.reprotections).remove(&vm);
            let now = policy::store::now_ms();
            let _ = s.update(&vm, |r| {
                r.role = LocalRole::Primary;
                r.last_failover_ms = Some(now);
                r.monitored = true;
                r.secondary = None;
                // Level ha from now on: its disk is replicated like any HA VM's.
                r.volume = s.volumes.is_some();
            });
            // It should not try to reconnect to the dead primary's worker.
            let _ = s
                .worker_call(&vm, &WorkerRequest::SetPeers { peers: Vec::new() })
                .await;
            let mut record = s.store.vm(&vm).ok().flatten().unwrap_or_default();
            record.current = Level::Ha;
            record.desired = Level::Ft;
            record.secondary = None;
            record.transition = None;
            record.last_error = Some(format!(
                "failed over from {primary}: running here without a secondary until a peer can \
                 hold one (then protected again automatically)"
            ));
            let detail = format!(
                "failover: {primary} was declared dead; this host promoted its standby at generation \
                 {} and runs the VM (level ha until protected again: automatic once a peer can \
                 hold the secondary)",
                st.generation.unwrap_or(0)
            );
            warn!(vm, "{detail}");
            if let Err(e) = s.store.update(
                &vm,
                Some(&record),
                &[NewEvent::new(EventKind::Note, detail)],
            ) {
                warn!(vm, error = %e, "recording the failover");
            }
        }
    }
    let previous = lock(&s.status).get(&vm).cloned();
    if let Some(what) = loss_to_record(previous.as_ref(), &st) {
        s.error_note(&vm, what.to_owned());
    }
    lock(&s.status).insert(vm, st);
}

/// A loss a worker reports (`WorkerStatus::vm_lost`) that is not recorded yet: one event per report.
fn loss_to_record<'a>(previous: Option<&WorkerStatus>, st: &'a WorkerStatus) -> Option<&'a str> {
    let lost = st.vm_lost.as_deref()?;
    let seen = previous.is_some_and(|p| p.pid == st.pid && p.vm_lost.as_deref() == Some(lost));
    (!seen).then_some(lost)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_loss_a_worker_reports_is_recorded_once() {
        let st = |pid, lost: Option<&str>| WorkerStatus {
            pid,
            vm_lost: lost.map(str::to_owned),
            ..WorkerStatus::default()
        };
        assert_eq!(loss_to_record(None, &st(1, None)), None);
        assert_eq!(loss_to_record(None, &st(1, Some("lost"))), Some("lost"));
        assert_eq!(
            loss_to_record(Some(&st(1, None)), &st(1, Some("lost"))),
            Some("lost")
        );
        assert_eq!(
            loss_to_record(Some(&st(1, Some("lost"))), &st(1, Some("lost"))),
            None
        );
        assert_eq!(
            loss_to_record(Some(&st(1, Some("lost"))), &st(1, Some("lost again"))),
            Some("lost again")
        );
        // A new worker (another process) reporting the same words is a new loss.
        assert_eq!(
            loss_to_record(Some(&st(1, Some("lost"))), &st(2, Some("lost"))),
            Some("lost")
        );
    }
}
