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

use std::sync::{Arc, Mutex};
use std::time::Duration;

use ax_qemu::def::{QemuDef, RunFiles};
use ax_qemu::process::{Ended, Qemu};
use ax_qemu::qmp::{Events, Lifecycle, Qmp};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

use crate::control::{GuestEnd, GuestEndKind, WorkerRequest, WorkerResponse, WorkerStatus};
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
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn end(kind: GuestEndKind) -> GuestEnd {
    GuestEnd {
        kind,
        epoch: None,
        at_ms: policy::store::now_ms(),
    }
}

fn crashed(reason: impl Into<String>) -> GuestEnd {
    end(GuestEndKind::Crashed {
        reason: reason.into(),
    })
}

/// What a run state read from `query-status` says about the guest's end.
fn end_from_status(status: &str) -> Option<GuestEnd> {
    match status {
        "shutdown" => Some(end(GuestEndKind::Exited { code: 0 })),
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
    let shared = Arc::new(Shared {
        state: Mutex::new("starting"),
        ..Shared::default()
    });
    let (stop_tx, mut stop_rx) = tokio::sync::mpsc::channel::<()>(1);
    let served = {
        let (shared, spec, files) = (Arc::clone(&shared), spec.clone(), files.clone());
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (shared, spec, stop, files) = (
                    Arc::clone(&shared),
                    spec.clone(),
                    stop_tx.clone(),
                    files.clone(),
                );
                tokio::spawn(async move {
                    let _ = answer(stream, &shared, &spec, &stop, &files).await;
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
    if result.as_ref().is_ok_and(|(_, end)| end.is_some()) || result.is_err() {
        ax_qemu::process::remove_taps(&spec.vm, &def);
    }
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
            Qemu::launch(def, &spec.vm, spec.mem_mib, spec.vcpus, run, QMP_TIMEOUT)
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
            if st.status == "prelaunch" {
                let _ = qmp.run(&ax_qemu::qmp::Cont).await;
            }
            *lock(&shared.state) = if st.running { "running" } else { "paused" };
        }
        Err(e) => return Err((1, format!("QEMU's status: {e}"))),
    }
    tracing::info!(pid = qemu.pid, reattached = qemu.reattached, "QEMU runs");
    watch(shared, &qmp, &mut qemu, &mut events).await
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
                    "guest-shutdown" => end(GuestEndKind::Exited { code: 0 }),
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
            Lifecycle::Stopped => *lock(&shared.state) = "paused",
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

async fn answer(
    stream: tokio::net::UnixStream,
    shared: &Shared,
    spec: &WorkerSpec,
    stop: &tokio::sync::mpsc::Sender<()>,
    files: &WorkerFiles,
) -> std::io::Result<()> {
    let (r, mut w) = stream.into_split();
    let mut line = String::new();
    tokio::io::BufReader::new(r).read_line(&mut line).await?;
    let resp = match serde_json::from_str::<WorkerRequest>(&line) {
        Err(e) => WorkerResponse::failed(format!("bad request: {e}")),
        Ok(req) => handle(req, shared, spec, stop, files),
    };
    let mut out = serde_json::to_vec(&resp).unwrap_or_default();
    out.push(b'\n');
    w.write_all(&out).await?;
    w.shutdown().await
}

fn handle(
    req: WorkerRequest,
    shared: &Shared,
    spec: &WorkerSpec,
    stop: &tokio::sync::mpsc::Sender<()>,
    files: &WorkerFiles,
) -> WorkerResponse {
    let ok = |status| WorkerResponse {
        ok: true,
        error: None,
        status,
        disk_snapshot: None,
    };
    match req {
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
                ..WorkerStatus::default()
            }))
        }
        WorkerRequest::Stop => {
            crate::worker::finish_stopped(files);
            let _ = stop.try_send(());
            ok(None)
        }
        WorkerRequest::Protect { .. } | WorkerRequest::SetPeers { .. } => {
            WorkerResponse::failed(format!("{}: FT for QEMU VMs is not available yet", spec.vm))
        }
        WorkerRequest::Unprotect => ok(None),
        WorkerRequest::SnapshotDisk { .. } => WorkerResponse::failed(format!(
            "{}: volume replication of QEMU VMs' disks is not available yet",
            spec.vm
        )),
    }
}
