//! The VM worker of a QEMU VM: QEMU supervised through QMP instead of the native FT node.
//!
//! Same process model and files as a native VM's worker (see [`crate::worker`]): one process per VM,
//! steered through `ctl.sock`, ending with `worker.exit`. QEMU itself runs in its own session with its
//! files beside the worker's (`qmp.sock`, `qemu.pid`, `qemu.log`, `console.log`), so a worker that dies
//! leaves the guest running and the next worker finds it again ([`Qemu::find`]) instead of booting a
//! second copy.
//!
//! The guest's end comes from QEMU's own signals, each a VM event ([`GuestEnd`]), never a host event:
//!
//! | QEMU says | the VM is |
//! |---|---|
//! | `SHUTDOWN` reason `guest-shutdown` (or status `shutdown` when found again) | `exited` (code 0) |
//! | `GUEST_PANICKED`, `SHUTDOWN` reason `guest-panic`, status `guest-panicked` | `crashed` (the guest panicked) |
//! | the QEMU process ended without a shutdown (killed, aborted) | `crashed` (QEMU died: how) |
//! | `STOP` / `RESUME` | `paused` / `running` |
//! | `RESET` | still running (a reboot), logged |
//!
//! QEMU runs with `-no-shutdown` and `-action panic=pause`, so an end that happened while no worker
//! listened is still read from `query-status` when the next worker attaches; the worker then quits it.
//!
//! A VM created FT-capable (`QemuDef::colo`) runs the COLO node ([`crate::colo_node::run_controlled`])
//! in its worker: in primary mode around the QEMU launched (or found again) here, solo until the daemon
//! asks `protect`; in standby mode (the daemon's `PUT /v1/standbys`) waiting for the primary's session,
//! the secondary QEMU launched by the node. Its status is the node's (role, peer, generation, sync,
//! checkpoints as epochs), as a native worker's.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use ax_qemu::def::{QemuDef, RunFiles};
use ax_qemu::process::{Ended, Qemu};
use ax_qemu::qmp::{Events, Lifecycle, Qmp};

use crate::control::{
    GuestEnd, GuestEndKind, MigrationInfo, NodeControl, WorkerRequest, WorkerResponse, WorkerStatus,
};
use crate::worker::Mode;
use crate::worker::{WorkerFiles, WorkerSpec};

/// Bound on QMP answers and on QEMU's start until its QMP socket answers.
const QMP_TIMEOUT: Duration = Duration::from_secs(20);

/// A worker failure: exit code and reason.
type Failure = (i32, String);

/// What the control socket reports.
#[derive(Debug, Default)]
struct Shared {
    /// `starting`, `running`, `paused`.
    state: Mutex<&'static str>,
    pid: Mutex<Option<u32>>,
    guest_end: Mutex<Option<GuestEnd>>,
    qmp: tokio::sync::OnceCell<Arc<Qmp>>,
    /// The tracking bitmap of every disk (`disk0`, `disk1`, … in order), once all are in place.
    cbt: Mutex<Option<Vec<ax_qemu::cbt::BitmapState>>>,
    /// One disk snapshot at a time.
    snapshot: tokio::sync::Mutex<()>,
    /// A live migration, on either end.
    migration: Mutex<Option<MigrationInfo>>,
    /// An FT-capable VM's COLO node control ([`crate::colo_node::run_controlled`]): peers, role,
    /// generation, checkpoints.
    ctl: Option<Arc<NodeControl>>,
    /// The COLO node runs (not for a VM that arrived by live migration, until its worker restarts).
    colo_runs: std::sync::atomic::AtomicBool,
}

/// What the COLO node tells the worker about the VM's QEMU.
struct Hooks(Arc<Shared>);

impl crate::colo_node::ColoHooks for Hooks {
    fn event(&self, ev: &ax_qemu::qmp::Event) {
        match ev.lifecycle() {
            Some(Lifecycle::Stopped) => *lock(&self.0.state) = "paused",
            Some(Lifecycle::Resumed) => *lock(&self.0.state) = "running",
            _ => {}
        }
    }
    fn running(&self, qmp: &Arc<Qmp>, pid: u32) {
        *lock(&self.0.pid) = Some(pid);
        let _ = self.0.qmp.set(Arc::clone(qmp));
        *lock(&self.0.state) = "running";
    }
}

/// The token of the last disk snapshot whose changes the bitmaps no longer hold (`cbt.token` in the
/// worker's directory): the next snapshot's changes follow it. One chain for all the VM's disks (they
/// are snapshotted together). Absent: no chain (a new bitmap, or a snapshot that did not complete),
/// and the next version reads every disk whole.
const CBT_TOKEN: &str = "cbt.token";

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn end_of(kind: GuestEndKind) -> GuestEnd {
    GuestEnd {
        kind,
        epoch: None,
        at_ms: policy::store::now_ms(),
    }
}

fn crashed(reason: impl Into<String>) -> GuestEnd {
    end_of(GuestEndKind::Crashed {
        reason: reason.into(),
    })
}

/// What a run state read from `query-status` says about the guest's end.
fn end_from_status(status: &str) -> Option<GuestEnd> {
    match status {
        "shutdown" => Some(end_of(GuestEndKind::Exited { code: 0 })),
        "guest-panicked" => Some(crashed("the guest panicked (reported by pvpanic)")),
        "internal-error" => Some(crashed("QEMU stopped the VM on an internal error")),
        "io-error" => None,
        _ => None,
    }
}

/// Runs a QEMU VM's worker until the guest ends or the agent stops it.
pub async fn serve(
    files: WorkerFiles,
    spec: WorkerSpec,
    def: QemuDef,
) -> Result<(i32, Option<GuestEnd>), Failure> {
    let _ = std::fs::remove_file(files.socket());
    let listener = tokio::net::UnixListener::bind(files.socket()).map_err(|e| {
        (
            1,
            format!("control socket {}: {e}", files.socket().display()),
        )
    })?;
    // An FT-capable VM runs under the COLO node (steered like a native VM's FT node).
    let ctl = if def.colo {
        let mut c = NodeControl::new(spec.peers.clone());
        c.vcpus = spec.vcpus;
        c.exit_when_fenced = true;
        if let Mode::Primary { known_generation } = spec.mode {
            c.boot_solo = true;
            c.known_generation =
                crate::worker::known_before_boot(&spec, known_generation, &files.dir).await?;
        }
        Some(Arc::new(c))
    } else {
        None
    };
    let shared = Arc::new(Shared {
        state: Mutex::new("starting"),
        ctl,
        ..Shared::default()
    });
    let (stop_tx, mut stop_rx) = tokio::sync::mpsc::channel::<()>(1);
    let served = {
        let (shared, spec, files, def) = (
            Arc::clone(&shared),
            spec.clone(),
            files.clone(),
            def.clone(),
        );
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (shared, spec, stop, files, def) = (
                    Arc::clone(&shared),
                    spec.clone(),
                    stop_tx.clone(),
                    files.clone(),
                    def.clone(),
                );
                tokio::spawn(async move {
                    let _ = answer(stream, &shared, &spec, &def, &stop, &files).await;
                });
            }
        })
    };
    let run = RunFiles {
        dir: files.dir.clone(),
    };
    let result = tokio::select! {
        r = supervise(&run, &spec, &def, &shared) => r,
        _ = stop_rx.recv() => {
            stop_qemu(&run, &shared).await;
            Ok((0, None))
        }
    };
    served.abort();
    // QEMU is gone whichever way the worker ends (stopped, the guest's end, a failed start).
    ax_qemu::process::remove_taps(&run, &def);
    result
}

/// Quits QEMU through QMP (bounded), else kills it.
async fn stop_qemu(run: &RunFiles, shared: &Shared) {
    if let Some(qmp) = shared.qmp.get() {
        if qmp.run(&ax_qemu::qmp::Quit).await.is_ok() {
            // `quit` answers before QEMU is gone: give it a moment to exit by itself.
            for _ in 0..100 {
                if ax_qemu::process::alive(&run.pid()).is_none() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    let run = run.clone();
    let _ = tokio::task::spawn_blocking(move || {
        ax_qemu::process::kill_recorded(&run, Duration::from_secs(5))
    })
    .await;
}

async fn supervise(
    run: &RunFiles,
    spec: &WorkerSpec,
    def: &QemuDef,
    shared: &Arc<Shared>,
) -> Result<(i32, Option<GuestEnd>), Failure> {
    if shared.ctl.is_some() && spec.mode == Mode::Standby {
        // A COLO standby: the node launches the secondary QEMU when a primary's session comes.
        return colo(run, spec, def, shared, crate::colo_node::Start::Standby).await;
    }
    let found = Qemu::find(run, QMP_TIMEOUT)
        .await
        .map_err(|e| (1, format!("finding the running QEMU: {e}")))?;
    let (mut qemu, qmp, mut events) = match found {
        Some(f) => {
            tracing::info!(pid = f.0.pid, "re-attached to the running QEMU");
            f
        }
        None => {
            // A fresh boot: keep the previous boot's console beside the new one.
            let console = run.console();
            if console.exists() {
                let _ = std::fs::rename(&console, console.with_extension("log.1"));
            }
            let opts = ax_qemu::def::LaunchOptions {
                incoming: spec.incoming.is_some(),
            };
            if let Some(inc) = &spec.incoming {
                ax_qemu::migrate::create_disk_images(&inc.disks, def)
                    .map_err(|e| (1, format!("creating the migration's disk images: {e}")))?;
            }
            Qemu::launch_with(
                def,
                &spec.vm,
                spec.mem_mib,
                spec.vcpus,
                run,
                QMP_TIMEOUT,
                &opts,
            )
            .await
            .map_err(|e| (1, format!("starting QEMU: {e}")))?
        }
    };
    *lock(&shared.pid) = Some(qemu.pid);
    let qmp = Arc::new(qmp);
    let _ = shared.qmp.set(Arc::clone(&qmp));
    // The state now, and an end that happened while nobody listened.
    match qmp.run(&ax_qemu::qmp::QueryStatus).await {
        Ok(st) => {
            if let Some(e) = end_from_status(&st.status) {
                return Ok(ended(shared, &qmp, &mut qemu, e).await);
            }
            if st.status == "inmigrate" {
                let Some(inc) = &spec.incoming else {
                    return Err((1, "QEMU waits for a migration nobody sends".into()));
                };
                let tls = tls_files(spec, &run.dir).map_err(|e| (1, e))?;
                let listen = ax_qemu::migrate::Listen {
                    host: inc.listen.clone(),
                    migrate_port: 0,
                    nbd_port: 0,
                };
                let incoming =
                    ax_qemu::migrate::prepare_incoming(&qmp, &inc.disks, &listen, Some(&tls))
                        .await
                        .map_err(|e| (1, format!("preparing the incoming migration: {e}")))?;
                tracing::info!(?incoming, "waiting for the migration");
                *lock(&shared.migration) = Some(MigrationInfo {
                    state: "incoming".into(),
                    incoming: Some(incoming),
                    ..MigrationInfo::default()
                });
                *lock(&shared.state) = "incoming";
            } else {
                if st.status == "prelaunch" {
                    let _ = qmp.run(&ax_qemu::qmp::Cont).await;
                }
                *lock(&shared.state) = if st.running { "running" } else { "paused" };
            }
        }
        Err(e) => return Err((1, format!("QEMU's status: {e}"))),
    }
    if spec.incoming.is_none() {
        let disks = def.all_disks();
        if !disks.is_empty() {
            track_changes(&run.dir, &qmp, &disks, shared).await;
        }
    }
    tracing::info!(pid = qemu.pid, reattached = qemu.reattached, "QEMU runs");
    if shared.ctl.is_some() && spec.incoming.is_none() {
        let vm = crate::colo_node::Running { qemu, qmp, events };
        return colo(run, spec, def, shared, crate::colo_node::Start::Running(vm)).await;
    }
    watch(shared, &qmp, &mut qemu, &mut events).await
}

/// Runs the COLO node of an FT-capable VM until the VM ends here (or this host is superseded).
async fn colo(
    run: &RunFiles,
    spec: &WorkerSpec,
    def: &QemuDef,
    shared: &Arc<Shared>,
    start: crate::colo_node::Start,
) -> Result<(i32, Option<GuestEnd>), Failure> {
    let Some(ctl) = shared.ctl.clone() else {
        return Err((1, "not an FT-capable VM".into()));
    };
    let cfg = crate::colo_node::ColoNodeConfig {
        host: spec.host.clone(),
        pki: spec.pki.clone(),
        vm: spec.vm.clone(),
        def: def.clone(),
        mem_mib: spec.mem_mib,
        vcpus: spec.vcpus,
        link_listen: spec.link,
        data_port: if spec.colo_port == 0 {
            spec.link.port().wrapping_add(1)
        } else {
            spec.colo_port
        },
        hb_listen: spec.hb,
        hb2_listen: spec.hb2,
        peers: spec.peers.clone(),
        coordinator: spec.coordinator.target(),
        boot: false,
        epoch: Duration::from_millis(spec.epoch_ms.max(1)),
        hb_interval: Duration::from_millis(spec.hb_interval_ms),
        hb_timeout: Duration::from_millis(spec.hb_timeout_ms),
        state_dir: run.dir.clone(),
        run_dir: run.dir.clone(),
        fence: spec.fence.as_ref().map(|f| crate::node::FenceConfig {
            command: f.command.clone(),
            timeout: Duration::from_millis(f.timeout_ms),
            required: f.required,
        }),
        max_bandwidth: None,
    };
    let hooks = Arc::new(Hooks(Arc::clone(shared)));
    shared
        .colo_runs
        .store(true, std::sync::atomic::Ordering::Release);
    let end = crate::colo_node::run_controlled(cfg, ctl, start, hooks)
        .await
        .map_err(|e| (1, e.to_string()))?;
    use crate::colo_node::{NodeEnd, VmEnd};
    let e = match end {
        NodeEnd::Fenced => return Ok((crate::node::EXIT_FENCED, None)),
        NodeEnd::Vm(VmEnd::Shutdown(reason)) => match reason.as_str() {
            "guest-shutdown" | "host-qmp-quit" => end_of(GuestEndKind::Exited { code: 0 }),
            "guest-panic" => crashed("the guest panicked (reported by pvpanic)"),
            "host-signal" => crashed("QEMU was ended by a signal"),
            other => crashed(format!("QEMU shut the VM down ({other})")),
        },
        NodeEnd::Vm(VmEnd::Panicked(info)) => crashed(match info {
            Some(i) => format!("the guest panicked (reported by pvpanic: {i})"),
            None => "the guest panicked (reported by pvpanic)".to_string(),
        }),
        NodeEnd::Vm(VmEnd::Died(how)) => crashed(format!("the QEMU process died ({how})")),
    };
    tracing::info!(end = %e.describe(), "the guest ended");
    *lock(&shared.guest_end) = Some(e.clone());
    stop_qemu(run, shared).await;
    Ok((0, Some(e)))
}

/// Puts the change-tracking bitmap on every disk (persistent on qcow2). A bitmap created now does not
/// cover earlier writes: the change chain starts over (for all disks: they share it).
async fn track_changes(
    dir: &std::path::Path,
    qmp: &Qmp,
    disks: &[(String, std::path::PathBuf)],
    shared: &Shared,
) {
    let mut states = Vec::with_capacity(disks.len());
    for (node, path) in disks {
        let persistent =
            ax_qemu::def::Format::detect(path).is_ok_and(|f| f == ax_qemu::def::Format::Qcow2);
        match ax_qemu::cbt::ensure_bitmap(qmp, node, persistent).await {
            Ok(state) => {
                tracing::info!(?state, "changed-block tracking on {node}");
                states.push(state);
            }
            Err(e) => {
                tracing::warn!(error = %e, "no changed-block tracking on {node}: no volume versions");
                return;
            }
        }
    }
    if states.iter().any(|s| s.created) {
        let _ = std::fs::remove_file(dir.join(CBT_TOKEN));
    }
    *lock(&shared.cbt) = Some(states);
}

/// A point-in-time copy of every disk while the guest runs, all at one instant: disk `i` into `to[i]`
/// (a sparse file of the disk's size); only the changed chunks when the worker's change chain follows
/// `since`, else everything. The answer is disk 0's, the others' in its `more`.
async fn snapshot_disks(
    shared: &Shared,
    dir: &std::path::Path,
    to: &[std::path::PathBuf],
    since: Option<u64>,
) -> Result<crate::control::DiskSnapshotInfo, String> {
    let _one = shared.snapshot.lock().await;
    let qmp = shared.qmp.get().ok_or("QEMU is starting")?;
    let Some(disks) = lock(&shared.cbt).as_ref().map(Vec::len) else {
        return Err("the disks have no change-tracking bitmap (see the worker's log)".into());
    };
    if to.len() != disks {
        return Err(format!(
            "the VM has {disks} disk(s) and {} destination(s) were given (an agent older than its worker?)",
            to.len()
        ));
    }
    let started = std::time::Instant::now();
    let token_path = dir.join(CBT_TOKEN);
    let chain: Option<u64> = std::fs::read_to_string(&token_path)
        .ok()
        .and_then(|t| t.trim().parse().ok());
    let work = dir.join("cbt");
    let nodes: Vec<String> = (0..disks).map(|i| format!("disk{i}")).collect();
    let node_refs: Vec<&str> = nodes.iter().map(String::as_str).collect();
    let mut backups = ax_qemu::cbt::Backup::start_all(qmp, &node_refs, &work)
        .await
        .map_err(|e| format!("disk snapshot: {e}"))?;
    let delta = since.is_some() && since == chain;
    let mut copies = Vec::with_capacity(disks);
    let mut failed = None;
    for (b, path) in backups.iter_mut().zip(to) {
        let copied = async {
            let dirty = b.dirty_ranges().await?;
            let report = b
                .copy_to(path, delta.then_some(dirty.as_slice()), |_, _| {})
                .await?;
            Ok::<_, ax_qemu::cbt::CbtError>((dirty, report))
        }
        .await;
        match copied {
            Ok(c) => copies.push(c),
            Err(e) => {
                failed = Some(format!("disk snapshot of {}: {e}", b.node()));
                break;
            }
        }
    }
    if let Some(e) = failed {
        // Nothing is lost: the changes are folded back for the next snapshot.
        for b in backups {
            let _ = b.finish(qmp, false).await;
        }
        return Err(e);
    }
    // The chain breaks before the bitmaps restart, so that a crash in between leaves no chain (the
    // next version then reads everything) rather than a chain that misses these changes.
    let _ = std::fs::remove_file(&token_path);
    for b in backups {
        let node = b.node().to_string();
        b.finish(qmp, true)
            .await
            .map_err(|e| format!("disk snapshot: ending the backup of {node}: {e}"))?;
    }
    let token = policy::store::now_ms().max(chain.map_or(0, |c| c + 1));
    crate::worker::write_atomic(&token_path, token.to_string().as_bytes())
        .map_err(|e| format!("{}: {e}", token_path.display()))?;
    let elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    let chunk = ax_qemu::cbt::CHUNK_SIZE;
    let mut infos = copies.into_iter().map(|(dirty, report)| {
        let mut chunks: Vec<u64> = ax_qemu::cbt::chunk_ranges(&dirty, report.size)
            .iter()
            .flat_map(|r| r.start / chunk..r.end.div_ceil(chunk))
            .collect();
        chunks.dedup();
        crate::control::DiskSnapshotInfo {
            bytes: report.size,
            elapsed_ms,
            changes: Some(crate::control::DiskChanges {
                chunk_size: chunk,
                since: chain,
                token,
                chunks,
            }),
            ..Default::default()
        }
    });
    let mut first = infos.next().ok_or("no disk")?;
    first.more = infos.collect();
    Ok(first)
}

/// Follows QEMU's events until the guest ends.
async fn watch(
    shared: &Arc<Shared>,
    qmp: &Arc<Qmp>,
    qemu: &mut Qemu,
    events: &mut Events,
) -> Result<(i32, Option<GuestEnd>), Failure> {
    loop {
        let ev = tokio::select! {
            ev = events.next() => ev,
            how = qemu.ended() => {
                return Ok(died(shared, how));
            }
        };
        let Some(ev) = ev else {
            // QMP closed: QEMU is ending (or wedged): wait a bounded time for the process.
            let how = tokio::time::timeout(Duration::from_secs(10), qemu.ended())
                .await
                .unwrap_or_else(|_| {
                    tracing::warn!("QMP closed but QEMU still runs: killing it");
                    Ended::Unknown
                });
            if let Some(pid) = *lock(&shared.pid) {
                // SAFETY: kill takes a pid and a signal; a stale pid is harmless next to a dead QEMU.
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            }
            return Ok(died(shared, how));
        };
        let Some(lc) = ev.lifecycle() else {
            tracing::debug!(event = %ev.event, "QMP event");
            continue;
        };
        tracing::info!(event = ?lc, "QEMU");
        match lc {
            Lifecycle::Shutdown { reason, .. } => {
                let e = match reason.as_str() {
                    "guest-shutdown" => end_of(GuestEndKind::Exited { code: 0 }),
                    "guest-panic" => crashed("the guest panicked (reported by pvpanic)"),
                    "host-qmp-quit" | "host-qmp-system-reset" => continue,
                    "host-signal" => crashed("QEMU was ended by a signal"),
                    other => crashed(format!("QEMU shut the VM down ({other})")),
                };
                return Ok(ended(shared, qmp, qemu, e).await);
            }
            Lifecycle::Panicked { info, .. } => {
                let reason = match info {
                    Some(i) => format!("the guest panicked (reported by pvpanic: {i})"),
                    None => "the guest panicked (reported by pvpanic)".to_string(),
                };
                return Ok(ended(shared, qmp, qemu, crashed(reason)).await);
            }
            Lifecycle::Stopped => {
                let mut st = lock(&shared.state);
                if *st != "incoming" {
                    *st = "paused";
                }
            }
            Lifecycle::Resumed => *lock(&shared.state) = "running",
            Lifecycle::Reset { guest, reason } => {
                tracing::info!(guest, reason = %reason, "the VM was reset (a reboot): it runs on");
            }
        }
    }
}

/// The guest ended: record it, quit QEMU, report it.
async fn ended(
    shared: &Shared,
    qmp: &Qmp,
    qemu: &mut Qemu,
    e: GuestEnd,
) -> (i32, Option<GuestEnd>) {
    tracing::info!(end = %e.describe(), "the guest ended");
    *lock(&shared.guest_end) = Some(e.clone());
    if qmp.run(&ax_qemu::qmp::Quit).await.is_err()
        || tokio::time::timeout(Duration::from_secs(10), qemu.ended())
            .await
            .is_err()
    {
        qemu.kill().await;
    }
    (0, Some(e))
}

/// QEMU's process ended without a shutdown: a crash of the VM (not of the host).
fn died(shared: &Shared, how: Ended) -> (i32, Option<GuestEnd>) {
    let e = crashed(format!("the QEMU process died ({how})"));
    tracing::warn!(end = %e.describe(), "QEMU ended");
    *lock(&shared.guest_end) = Some(e.clone());
    (0, Some(e))
}

/// The cluster PKI's files laid out for QEMU's `tls-creds-x509` (in `dir/tls`).
fn tls_files(
    spec: &WorkerSpec,
    dir: &std::path::Path,
) -> Result<ax_qemu::migrate::TlsFiles, String> {
    let tls = ax_qemu::migrate::TlsFiles::from_ax_certs(&spec.pki, &spec.host, &dir.join("tls"));
    ax_qemu::migrate::lay_out_tls_dir(&tls).map_err(|e| format!("TLS files for QEMU: {e}"))?;
    Ok(tls)
}

fn set_migration(shared: &Shared, f: impl FnOnce(&mut MigrationInfo)) {
    let mut m = lock(&shared.migration);
    f(m.get_or_insert_with(MigrationInfo::default));
}

/// The live-migration requests (both ends).
async fn migration_request(
    req: WorkerRequest,
    shared: &Arc<Shared>,
    spec: &WorkerSpec,
    def: &QemuDef,
    files: &WorkerFiles,
) -> WorkerResponse {
    let Some(qmp) = shared.qmp.get().cloned() else {
        return WorkerResponse::failed("QEMU is starting".into());
    };
    match req {
        WorkerRequest::MigrationDisks => match ax_qemu::migrate::source_disks(&qmp, def).await {
            Ok(d) => WorkerResponse {
                disks: Some(d),
                ..WorkerResponse::done()
            },
            Err(e) => WorkerResponse::failed(format!("{}: {e}", spec.vm)),
        },
        WorkerRequest::MigrateTo {
            to,
            disks,
            tls_hostname,
            downtime_limit_ms,
            max_bandwidth,
        } => {
            if lock(&shared.migration)
                .as_ref()
                .is_some_and(|m| m.state == "running" || m.state == "completed")
            {
                return WorkerResponse::failed(format!("{}: a migration is under way", spec.vm));
            }
            let tls = match tls_files(spec, &files.dir) {
                Ok(t) => t,
                Err(e) => return WorkerResponse::failed(e),
            };
            *lock(&shared.migration) = Some(MigrationInfo {
                state: "running".into(),
                ..MigrationInfo::default()
            });
            let shared = Arc::clone(shared);
            tokio::spawn(async move {
                let opts = ax_qemu::migrate::MigrateOptions {
                    downtime_limit_ms,
                    max_bandwidth,
                    tls_hostname: Some(tls_hostname),
                    ..ax_qemu::migrate::MigrateOptions::default()
                };
                let mut progress = |p: &ax_qemu::migrate::Progress| {
                    set_migration(&shared, |m| m.progress = Some(p.clone()));
                };
                let r = ax_qemu::migrate::run_source(
                    &qmp,
                    None,
                    &disks,
                    &to,
                    &opts,
                    Some(&tls),
                    &mut progress,
                )
                .await;
                match r {
                    Ok(report) => {
                        tracing::info!(
                            ?report,
                            "migration completed: the guest's state is on the destination"
                        );
                        set_migration(&shared, |m| {
                            m.state = "completed".into();
                            m.report = Some(report);
                        });
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "migration failed");
                        // After the switch the guest's newest state is on the destination: this end
                        // stays stopped until the agent decides (finish there, or resume here).
                        let state = if e.after_switch() {
                            "completed"
                        } else {
                            "failed"
                        };
                        set_migration(&shared, |m| {
                            m.state = state.into();
                            m.error = Some(e.to_string());
                        });
                    }
                }
            });
            WorkerResponse::done()
        }
        WorkerRequest::MigrationFinish => {
            let state = lock(&shared.migration).as_ref().map(|m| m.state.clone());
            match state.as_deref() {
                Some("incoming") => {}
                // Asked again (the source's agent restarted): the guest already runs here.
                Some("running") => return WorkerResponse::done(),
                _ => {
                    return WorkerResponse::failed(format!(
                        "{}: no incoming migration here",
                        spec.vm
                    ))
                }
            }
            match ax_qemu::migrate::finish_incoming(&qmp, true, QMP_TIMEOUT).await {
                Ok(()) => {
                    set_migration(shared, |m| m.state = "running".into());
                    *lock(&shared.state) = "running";
                    let disks = def.all_disks();
                    if !disks.is_empty() {
                        track_changes(&files.dir, &qmp, &disks, shared).await;
                    }
                    WorkerResponse::done()
                }
                Err(e) => WorkerResponse::failed(format!("{}: {e}", spec.vm)),
            }
        }
        WorkerRequest::MigrationResume => {
            let disks = match ax_qemu::migrate::source_disks(&qmp, def).await {
                Ok(d) => d,
                Err(e) => return WorkerResponse::failed(format!("{}: {e}", spec.vm)),
            };
            ax_qemu::migrate::abort_source(&qmp, &disks, true).await;
            set_migration(shared, |m| m.state = "resumed".into());
            WorkerResponse::done()
        }
        _ => WorkerResponse::failed("not a migration request".into()),
    }
}

async fn answer(
    stream: tokio::net::UnixStream,
    shared: &Arc<Shared>,
    spec: &WorkerSpec,
    def: &QemuDef,
    stop: &tokio::sync::mpsc::Sender<()>,
    files: &WorkerFiles,
) -> std::io::Result<()> {
    crate::control::answer_one(stream, |req| async move {
        match req {
            WorkerRequest::SnapshotDisk {
                to, more_to, since, ..
            } => {
                let to: Vec<_> = std::iter::once(to).chain(more_to).collect();
                match snapshot_disks(shared, &files.dir, &to, since).await {
                    Ok(info) => WorkerResponse {
                        disk_snapshot: Some(info),
                        ..WorkerResponse::done()
                    },
                    Err(e) => WorkerResponse::failed(format!("{}: {e}", spec.vm)),
                }
            }
            req @ (WorkerRequest::MigrationDisks
            | WorkerRequest::MigrateTo { .. }
            | WorkerRequest::MigrationFinish
            | WorkerRequest::MigrationResume) => {
                migration_request(req, shared, spec, def, files).await
            }
            req => handle(req, shared, spec, stop, files),
        }
    })
    .await
}

fn handle(
    req: WorkerRequest,
    shared: &Shared,
    spec: &WorkerSpec,
    stop: &tokio::sync::mpsc::Sender<()>,
    files: &WorkerFiles,
) -> WorkerResponse {
    let ok = |status| WorkerResponse {
        status,
        ..WorkerResponse::done()
    };
    match req {
        WorkerRequest::Status if shared.ctl.is_some() => {
            // Role, peer, generation, sync and checkpoints from the COLO node (as a native VM's).
            let mut st = crate::worker::status(spec, shared.ctl.as_ref());
            st.guest_end = lock(&shared.guest_end).clone();
            st.migration = lock(&shared.migration).clone();
            ok(Some(st))
        }
        WorkerRequest::Status => {
            let state = *lock(&shared.state);
            ok(Some(WorkerStatus {
                vm: spec.vm.clone(),
                pid: std::process::id(),
                // `solo`: running unprotected, as a native primary without a secondary.
                role: match state {
                    "running" => "solo".into(),
                    s => s.into(),
                },
                guest_end: lock(&shared.guest_end).clone(),
                migration: lock(&shared.migration).clone(),
                ..WorkerStatus::default()
            }))
        }
        WorkerRequest::Stop => {
            crate::worker::finish_stopped(files);
            let _ = stop.try_send(());
            ok(None)
        }
        WorkerRequest::Protect { peer } => match &shared.ctl {
            Some(_) if !shared.colo_runs.load(std::sync::atomic::Ordering::Acquire) => {
                WorkerResponse::failed(format!(
                    "{}: its COLO node does not run in this worker (the VM arrived by live \
                     migration, or is starting): FT after the worker restarts",
                    spec.vm
                ))
            }
            Some(c) => {
                c.set_peers(vec![peer]);
                ok(None)
            }
            None => WorkerResponse::failed(format!(
                "{}: not created FT-capable (qemu.ft_capable): it cannot become FT",
                spec.vm
            )),
        },
        WorkerRequest::SetPeers { peers } => {
            if let Some(c) = &shared.ctl {
                c.set_peers(peers);
            }
            ok(None)
        }
        WorkerRequest::Unprotect => {
            if let Some(c) = &shared.ctl {
                c.set_peers(Vec::new());
            }
            ok(None)
        }
        WorkerRequest::SnapshotDisk { .. }
        | WorkerRequest::MigrationDisks
        | WorkerRequest::MigrateTo { .. }
        | WorkerRequest::MigrationFinish
        | WorkerRequest::MigrationResume => WorkerResponse::failed("answered by `answer`".into()),
    }
}
