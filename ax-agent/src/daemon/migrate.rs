//! Planned live migration of QEMU VMs between two agents (`axctl vm migrate NAME --to HOST`).
//!
//! ```mermaid
//! sequenceDiagram
//!     participant A as source agent
//!     participant WA as source worker (QEMU)
//!     participant B as destination agent
//!     participant WB as destination worker (QEMU -incoming defer -S)
//!     A->>WA: migration_disks
//!     A->>B: PUT /v1/incoming/{vm} (definition, level, disks)
//!     B->>WB: spawn (empty disk images in B's storage, NBD exports, migrate-incoming, TLS)
//!     B-->>A: where it listens
//!     A->>WA: migrate_to (NBD mirror of the disks, then RAM; the source stops at the switch)
//!     WA-->>A: completed (downtime, total time)
//!     A->>B: POST /v1/incoming/{vm}/finish
//!     B->>WB: migration_finish (cont): the guest runs on B, B sets its level
//!     A->>WA: stop (quit QEMU); A forgets the VM
//! ```
//!
//! Never two running copies: the destination's QEMU starts paused (`-S`) and runs only once the source
//! reports `completed` (QEMU has stopped the source at the switch). If the destination cannot then run
//! the guest, the source resumes it only after the destination's copy is confirmed gone (deleted);
//! when that cannot be confirmed the guest stays paused on the source and the error says so. A failure
//! before the switch leaves the guest running on the source (QEMU resumes it) and the destination's
//! copy is deleted.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::{lock, Daemon, LocalRole, OpError, VmDef, VmRecordLocal};
use crate::control::{MigrationInfo, WorkerRequest};
use crate::worker::IncomingSpec;
use policy::Level;

/// `PUT /v1/incoming/{vm}`: what the source's agent sends the destination's.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IncomingRequest {
    /// The source host.
    pub source: String,
    /// The VM's definition as the source runs it (disk paths are the source's).
    pub def: VmDef,
    /// The level to keep.
    pub level: Level,
    /// The disks the source copies.
    pub disks: Vec<ax_qemu::migrate::DiskInfo>,
}

/// A migration away from this host, as `GET /v1/vms/{vm}` shows it (`migration`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationView {
    /// The destination host.
    pub to: String,
    /// `preparing`, `running`, `finishing`, `done`, `failed` (a migration that succeeded takes the VM,
    /// and this view, away from this host).
    pub state: String,
    /// When it started (ms since the Unix epoch).
    pub started_ms: u64,
    /// The source worker's report (progress, figures, error).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<MigrationInfo>,
    /// Why it failed, and where the guest runs then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Set when this agent took the migration over from a previous one (`resumed after an agent
    /// restart …`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// How far a migration away from this host got, persisted in the VM's record (`vm.json`) at each step
/// so that the next agent goes on from there after a restart ([`resume_all`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MigrationStep {
    /// The destination is (being) asked to prepare (`PUT /v1/incoming/{vm}`); the source QEMU has not
    /// been asked to migrate.
    Preparing,
    /// The source's worker may have been asked to migrate (its QEMU sends the disks, then RAM).
    Running,
    /// The source QEMU reported `completed` (the guest is stopped here at the switch); the destination
    /// is (being) asked to run the guest.
    Finishing,
    /// The destination runs the guest: what is left here is removed.
    Done,
}

impl MigrationStep {
    /// The name `GET /v1/vms/{vm}` shows.
    pub fn as_str(self) -> &'static str {
        match self {
            MigrationStep::Preparing => "preparing",
            MigrationStep::Running => "running",
            MigrationStep::Finishing => "finishing",
            MigrationStep::Done => "done",
        }
    }
}

/// A migration's persisted cursor (`VmRecordLocal::migration`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationCursor {
    /// The destination host.
    pub to: String,
    /// The last step reached.
    pub step: MigrationStep,
    /// When it started (ms since the Unix epoch).
    pub started_ms: u64,
    /// The level the destination keeps.
    pub level: Level,
    /// The operator's tuning.
    #[serde(default)]
    pub tuning: Tuning,
}

/// Optional knobs of `POST /v1/vms/{vm}/migrate`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tuning {
    /// QEMU's `downtime-limit` (ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_limit_ms: Option<u64>,
    /// QEMU's `max-bandwidth` of the migration stream (bytes/s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bandwidth: Option<u64>,
}

/// A migration arriving here (destination side, in memory).
#[derive(Debug, Clone)]
pub struct IncomingEntry {
    /// What the destination's worker is started with.
    pub spec: IncomingSpec,
    /// The level to set once the guest runs here.
    pub level: Level,
    /// The source host (a repeated `PUT` from it is answered with the copy already prepared).
    pub source: String,
}

/// How long the destination may take to be ready (QEMU started, exports up).
const PREPARE_TIMEOUT: Duration = Duration::from_secs(60);
/// The whole migration's bound (QEMU's own stall detection ends a migration that makes no progress
/// sooner).
const MIGRATE_TIMEOUT: Duration = Duration::from_secs(1800);

fn set_view(d: &Daemon, vm: &str, f: impl FnOnce(&mut MigrationView)) {
    let mut m = lock(&d.shared.migrations);
    if let Some(v) = m.get_mut(vm) {
        f(v);
    }
}

/// Checks that `vm` can be migrated to `to` now and starts the migration in the background.
pub fn start(d: &Daemon, vm: &str, to: &str, tuning: Tuning) -> Result<(), OpError> {
    let sh = &d.shared;
    let rec = sh
        .record(vm)
        .ok_or_else(|| OpError::NotFound(vm.to_string()))?;
    if to == sh.cfg.host {
        return Err(OpError::Invalid {
            field: "to".into(),
            message: format!("{vm} already runs on {to}"),
        });
    }
    if sh.peer(to).is_none() {
        let known: Vec<&str> = sh.cfg.peers.iter().map(|p| p.name.as_str()).collect();
        return Err(OpError::Invalid {
            field: "to".into(),
            message: format!("unknown host {to:?}: the peers are {known:?}"),
        });
    }
    if rec.def.qemu.is_none() {
        return Err(OpError::Conflict(format!(
            "{vm} is a native VM: live migration is for QEMU VMs"
        )));
    }
    if let Some(c) = &rec.migration {
        return Err(OpError::Conflict(format!(
            "{vm} is being migrated to {} already ({})",
            c.to,
            c.step.as_str()
        )));
    }
    if rec.role != LocalRole::Primary || !rec.running || rec.down_reason.is_some() {
        return Err(OpError::Conflict(format!(
            "{vm} is not running here: only a running VM can be migrated"
        )));
    }
    if sh.status(vm).is_none_or(|s| s.role != "solo") {
        return Err(OpError::Conflict(format!(
            "{vm} is not running (starting, paused or ending): try again when it runs"
        )));
    }
    let pol = sh.store.vm(vm)?.unwrap_or_default();
    if pol.transition.is_some() {
        return Err(OpError::Conflict(format!(
            "{vm} is changing level: migrate it once the transition is over"
        )));
    }
    let cursor = MigrationCursor {
        to: to.to_string(),
        step: MigrationStep::Preparing,
        started_ms: policy::store::now_ms(),
        level: pol.current,
        tuning,
    };
    {
        let mut m = lock(&sh.migrations);
        if m.get(vm).is_some_and(|v| v.state != "failed") {
            return Err(OpError::Conflict(format!("{vm} is being migrated already")));
        }
        m.insert(
            vm.to_string(),
            MigrationView {
                to: to.to_string(),
                state: cursor.step.as_str().into(),
                started_ms: cursor.started_ms,
                ..MigrationView::default()
            },
        );
    }
    // Persisted before anything is asked of the destination: a restart from here on finds it.
    if let Err(e) = sh.update(vm, |r| r.migration = Some(cursor.clone())) {
        lock(&sh.migrations).remove(vm);
        return Err(e);
    }
    sh.note(vm, format!("live migration to {to} started"));
    spawn_drive(d, vm, cursor);
    Ok(())
}

/// Goes on with the migrations away from this host that a previous agent left unfinished (their cursor
/// in the VM's record): each from where it was, checked against what the source's worker reports.
pub fn resume_all(d: &Daemon) {
    for rec in d.shared.records() {
        let Some(cursor) = rec.migration.clone() else {
            continue;
        };
        let vm = rec.def.name.clone();
        let note = format!(
            "resumed after an agent restart (the previous agent left it {})",
            cursor.step.as_str()
        );
        lock(&d.shared.migrations).insert(
            vm.clone(),
            MigrationView {
                to: cursor.to.clone(),
                state: cursor.step.as_str().into(),
                started_ms: cursor.started_ms,
                note: Some(note.clone()),
                ..MigrationView::default()
            },
        );
        d.shared
            .note(&vm, format!("live migration to {}: {note}", cursor.to));
        spawn_drive(d, &vm, cursor);
    }
}

/// Drives the migration in the background and records how it ended.
fn spawn_drive(d: &Daemon, vm: &str, cursor: MigrationCursor) {
    let (d, vm) = (d.clone(), vm.to_string());
    tokio::spawn(async move {
        let to = cursor.to.clone();
        match drive(&d, &vm, cursor).await {
            Ok(report) => {
                // The VM is gone from this host, and its migration view with it.
                lock(&d.shared.migrations).remove(&vm);
                d.shared.note(
                    &vm,
                    format!(
                        "migrated to {to}: downtime {} ms, total {} ms, {} MB of memory and {} MB of disk sent",
                        report.downtime_ms,
                        report.total_ms,
                        report.ram_transferred >> 20,
                        report.disk_bytes >> 20
                    ),
                );
            }
            Err(e) => {
                warn!(vm, error = %e, "live migration failed");
                // Over: the next agent has nothing to resume.
                let _ = d.shared.update(&vm, |r| r.migration = None);
                set_view(&d, &vm, |v| {
                    v.state = "failed".into();
                    v.error = Some(e.clone());
                });
                d.shared
                    .warn_note(&vm, format!("live migration to {to} failed: {e}"));
            }
        }
    });
}

async fn worker(
    d: &Daemon,
    vm: &str,
    req: &WorkerRequest,
) -> Result<crate::control::WorkerResponse, String> {
    d.shared.worker_call(vm, req).await
}

/// The source worker's migration as it reports it now (`None`: none, or the worker does not answer).
async fn worker_migration(d: &Daemon, vm: &str) -> Option<MigrationInfo> {
    worker(d, vm, &WorkerRequest::Status)
        .await
        .ok()
        .and_then(|r| r.status)
        .and_then(|s| s.migration)
}

/// Records that the migration reached `step` (persisted for the next agent, shown by the API). A
/// failure to persist is logged: the next agent checks the worker's own state before it acts, and a
/// cursor one step behind only repeats an idempotent step.
fn advance(d: &Daemon, vm: &str, cursor: &mut MigrationCursor, step: MigrationStep) {
    cursor.step = step;
    if let Err(e) = d.shared.update(vm, |r| r.migration = Some(cursor.clone())) {
        warn!(vm, error = %e, step = step.as_str(), "could not record the migration's progress");
    }
    set_view(d, vm, |v| v.state = step.as_str().into());
}

/// Deletes the destination's copy; whether it is confirmed gone.
async fn delete_destination(d: &Daemon, vm: &str, to: &str) -> bool {
    let Some(c) = d.shared.peer(to) else {
        return false;
    };
    let r: Result<serde_json::Value, _> = c
        .call(
            reqwest::Method::DELETE,
            &format!("/v1/incoming/{vm}"),
            None::<&()>,
        )
        .await;
    match r {
        Ok(_) => true,
        // 404: the destination has no VM of this name at all (a VM the migration finished there
        // answers 409).
        Err(e) if e.status() == Some(404) => true,
        Err(e) => {
            warn!(vm, to, error = %e, "could not delete the destination's copy");
            false
        }
    }
}

/// The migration from `cursor.step` on, to its end: `Ok` once the guest runs on the destination and
/// this host forgot the VM; `Err` (why, and where the guest is) otherwise.
async fn drive(
    d: &Daemon,
    vm: &str,
    mut cursor: MigrationCursor,
) -> Result<ax_qemu::migrate::MigrateReport, String> {
    let sh = &d.shared;
    let to = cursor.to.clone();
    let peer = sh.peer(&to).ok_or_else(|| format!("unknown host {to}"))?;
    if cursor.step == MigrationStep::Preparing {
        let rec = sh
            .record(vm)
            .ok_or_else(|| format!("{vm} is no longer on this host"))?;
        let disks = worker(d, vm, &WorkerRequest::MigrationDisks)
            .await?
            .disks
            .unwrap_or_default();
        let req = IncomingRequest {
            source: sh.cfg.host.clone(),
            def: rec.def.clone(),
            level: cursor.level,
            disks: disks.clone(),
        };
        // Asked again after a restart, the destination answers with the copy it prepared already.
        let incoming: ax_qemu::migrate::Incoming = tokio::time::timeout(
            PREPARE_TIMEOUT,
            peer.call(
                reqwest::Method::PUT,
                &format!("/v1/incoming/{vm}"),
                Some(&req),
            ),
        )
        .await
        .map_err(|_| format!("{to} did not prepare the destination within {PREPARE_TIMEOUT:?}"))?
        .map_err(|e| format!("{to}: preparing the destination: {e}"))?;
        // Recorded before the worker is asked: a restart from here on follows the worker.
        advance(d, vm, &mut cursor, MigrationStep::Running);
        let started = worker(
            d,
            vm,
            &WorkerRequest::MigrateTo {
                to: incoming,
                disks,
                tls_hostname: to.clone(),
                downtime_limit_ms: cursor.tuning.downtime_limit_ms,
                max_bandwidth: cursor.tuning.max_bandwidth,
            },
        )
        .await;
        if let Err(e) = started {
            delete_destination(d, vm, &to).await;
            return Err(e);
        }
    }
    let mut report = None;
    if cursor.step == MigrationStep::Running {
        let info = follow(d, vm, &to).await?;
        if info.state != "completed" {
            delete_destination(d, vm, &to).await;
            return Err(format!(
                "{}; the guest runs on here",
                info.error.unwrap_or_default()
            ));
        }
        report = info.report;
        // The guest's newest state is on the destination, paused there; this end is stopped.
        advance(d, vm, &mut cursor, MigrationStep::Finishing);
    }
    if cursor.step == MigrationStep::Finishing {
        let finished: Result<serde_json::Value, _> = peer
            .call(
                reqwest::Method::POST,
                &format!("/v1/incoming/{vm}/finish"),
                None::<&()>,
            )
            .await;
        if let Err(e) = finished {
            // Resume here only once the destination's copy is known to be gone.
            if delete_destination(d, vm, &to).await {
                worker(d, vm, &WorkerRequest::MigrationResume).await?;
                return Err(format!(
                    "{to} could not run the guest ({e}): its copy was deleted and the guest resumed here"
                ));
            }
            return Err(format!(
                "{to} could not confirm the guest runs there ({e}) nor that its copy is gone: the guest \
                 stays paused here; check {to} (`axctl vm show {vm}` there) before resuming it"
            ));
        }
        advance(d, vm, &mut cursor, MigrationStep::Done);
    }
    // Done: the VM is the destination's now.
    if report.is_none() {
        report = worker_migration(d, vm).await.and_then(|m| m.report);
    }
    sh.stop_worker(vm).await;
    if let Err(e) = d.engine.forget(vm) {
        warn!(vm, error = %e, "forgetting the migrated VM's level");
    }
    sh.remove(vm);
    info!(vm, to, "migrated");
    Ok(report.unwrap_or_default())
}

/// Follows the source's worker until its migration ends (`completed` or `failed`). An error once the
/// destination's copy was deleted (the guest runs on here, or its worker is gone).
async fn follow(d: &Daemon, vm: &str, to: &str) -> Result<MigrationInfo, String> {
    let sh = &d.shared;
    let deadline = Instant::now() + MIGRATE_TIMEOUT;
    loop {
        let st = worker_migration(d, vm).await;
        if let Some(m) = &st {
            set_view(d, vm, |v| v.worker = Some(m.clone()));
            match m.state.as_str() {
                "completed" | "failed" => return Ok(m.clone()),
                "running" => {}
                // `resumed`: a previous migration undone; the worker was not asked (again) since.
                _ => {
                    delete_destination(d, vm, to).await;
                    return Err(format!(
                        "the source's worker is not migrating ({}): the guest runs on here",
                        m.state
                    ));
                }
            }
        }
        let alive = sh.worker_alive(vm).is_some();
        if alive && st.is_none() && worker(d, vm, &WorkerRequest::Status).await.is_ok() {
            // The worker answers but has no migration: the request to start never reached it (the
            // agent was stopped in between).
            delete_destination(d, vm, to).await;
            return Err(
                "the source's worker was never asked to migrate (the agent restarted first): the \
                 guest runs on here"
                    .into(),
            );
        }
        if !alive {
            delete_destination(d, vm, to).await;
            return Err("the source's worker ended during the migration".into());
        }
        if Instant::now() > deadline {
            // The worker's own bounds end a stalled migration; this is the last resort.
            delete_destination(d, vm, to).await;
            return Err(format!("no end within {MIGRATE_TIMEOUT:?}"));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The destination's side of `PUT /v1/incoming/{vm}`: the VM's record here, its worker started as the
/// migration's destination, and where it listens once ready.
pub async fn prepare(
    d: &Daemon,
    req: IncomingRequest,
) -> Result<ax_qemu::migrate::Incoming, OpError> {
    let sh = &d.shared;
    let vm = req.def.name.clone();
    let Some(q) = &req.def.qemu else {
        return Err(OpError::Invalid {
            field: "def".into(),
            message: format!("{vm} is not a QEMU VM"),
        });
    };
    let _g = sh.create.lock().await;
    if sh.record(&vm).is_some() {
        let repeated = lock(&sh.incoming)
            .get(&vm)
            .is_some_and(|e| e.source == req.source);
        if repeated {
            // The source's agent asks again (it restarted while preparing): the copy prepared for it
            // is the answer.
            info!(vm, source = req.source, "incoming migration asked again");
            return ready(d, &vm).await;
        }
        return Err(OpError::Conflict(format!(
            "a VM named {vm:?} exists on {}",
            sh.cfg.host
        )));
    }
    // The disks are copies in this host's storage; kernel, initrd and bridges are the same on every host.
    let dir = sh.vm_dir(&vm);
    std::fs::create_dir_all(&dir)
        .map_err(|e| OpError::Internal(format!("{}: {e}", dir.display())))?;
    let mut def = req.def.clone();
    let mut dq = q.clone();
    let local = |i: usize, d: &ax_qemu::migrate::DiskInfo| {
        dir.join(format!("disk{i}.{}", d.format.driver()))
    };
    let mut it = req.disks.iter().enumerate();
    if dq.image.is_some() {
        if let Some((i, d)) = it.next() {
            dq.image = Some(local(i, d));
        }
    }
    dq.disks = it
        .map(|(i, d)| ax_qemu::def::Disk { path: local(i, d) })
        .collect();
    for (i, d) in req.disks.iter().enumerate() {
        let _ = std::fs::remove_file(local(i, d));
    }
    def.qemu = Some(dq.clone());
    def.output_port = sh.free_output_port()?;
    let mut check = dq.clone();
    check.image = None;
    check.disks.clear();
    if check.kernel.is_some() {
        check.check_host().map_err(|e| OpError::Invalid {
            field: "def".into(),
            message: format!("{vm} cannot run on {}: {e}", sh.cfg.host),
        })?;
    }
    let rec = VmRecordLocal::new(def, LocalRole::Primary, true, sh.free_slot()?, false);
    lock(&sh.incoming).insert(
        vm.clone(),
        IncomingEntry {
            spec: IncomingSpec {
                disks: req.disks.clone(),
                listen: sh.cfg.addresses.link.to_string(),
            },
            level: req.level,
            source: req.source.clone(),
        },
    );
    sh.insert(rec)?;
    sh.note(
        &vm,
        format!("arriving by live migration from {}", req.source),
    );
    if let Err(e) = sh.spawn_worker(&vm) {
        return Err(cleanup(d, &vm, format!("starting the destination's worker: {e}")).await);
    }
    ready(d, &vm).await
}

/// Waits until the destination's worker listens; where it does. A worker that does not get ready is
/// removed with the VM's copy.
async fn ready(d: &Daemon, vm: &str) -> Result<ax_qemu::migrate::Incoming, OpError> {
    let sh = &d.shared;
    let vm = vm.to_string();
    let deadline = Instant::now() + PREPARE_TIMEOUT;
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let st = sh
            .worker_call(&vm, &WorkerRequest::Status)
            .await
            .ok()
            .and_then(|r| r.status);
        if let Some(inc) = st.and_then(|s| s.migration).and_then(|m| m.incoming) {
            return Ok(inc);
        }
        if sh.worker_alive(&vm).is_none() || Instant::now() > deadline {
            let log =
                std::fs::read_to_string(crate::worker::WorkerFiles::new(sh.vm_dir(&vm)).log())
                    .unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(3).collect();
            return Err(cleanup(
                d,
                &vm,
                format!(
                    "the destination's worker did not get ready: {}",
                    tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
                ),
            )
            .await);
        }
    }
}

/// Removes a destination that did not get ready; the error to answer.
async fn cleanup(d: &Daemon, vm: &str, why: String) -> OpError {
    let sh = &d.shared;
    sh.stop_worker(vm).await;
    lock(&sh.incoming).remove(vm);
    sh.remove(vm);
    let _ = std::fs::remove_dir_all(sh.vm_dir(vm));
    OpError::Internal(why)
}

/// The destination's side of `POST /v1/incoming/{vm}/finish`: the guest runs here, at the level it had.
pub async fn finish(d: &Daemon, vm: &str) -> Result<(), OpError> {
    let sh = &d.shared;
    // One finish or delete at a time (a source's agent that restarted may ask again while its
    // previous request still runs).
    let _g = sh.create.lock().await;
    let Some(level) = lock(&sh.incoming).get(vm).map(|e| e.level) else {
        // Asked again after it finished (the source's agent restarted): the guest runs here, in the
        // worker that received it.
        let arrived = sh.record(vm).is_some()
            && sh
                .worker_call(vm, &WorkerRequest::Status)
                .await
                .ok()
                .and_then(|r| r.status)
                .and_then(|s| s.migration)
                .is_some_and(|m| m.state == "running");
        if arrived {
            return Ok(());
        }
        return Err(OpError::NotFound(format!("{vm} (no incoming migration)")));
    };
    sh.worker_call(vm, &WorkerRequest::MigrationFinish)
        .await
        .map_err(OpError::Internal)?;
    lock(&sh.incoming).remove(vm);
    sh.note(vm, "live migration done: the guest runs here");
    if level != Level::None {
        d.set_level(vm, level).map(|_| ())?;
    }
    Ok(())
}

/// The destination's side of `DELETE /v1/incoming/{vm}`: an incoming copy that will not run is removed.
pub async fn abandon(d: &Daemon, vm: &str) -> Result<(), OpError> {
    let sh = &d.shared;
    let _g = sh.create.lock().await;
    if !lock(&sh.incoming).contains_key(vm) {
        if sh.record(vm).is_some() {
            // Never deleted here: the source would take 404 for "gone" and resume its copy.
            return Err(OpError::Conflict(format!(
                "{vm} runs on {} (no incoming migration): not deleted",
                sh.cfg.host
            )));
        }
        return Err(OpError::NotFound(format!("{vm} (no incoming migration)")));
    }
    sh.stop_worker(vm).await;
    lock(&sh.incoming).remove(vm);
    let _ = d.engine.forget(vm);
    sh.remove(vm);
    let _ = std::fs::remove_dir_all(sh.vm_dir(vm));
    sh.note(
        vm,
        "incoming live migration abandoned: the copy here was deleted",
    );
    Ok(())
}
