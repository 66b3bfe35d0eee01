//! A VM worker (`ax-agent vm-worker --dir DIR`): one process per VM, like QEMU under libvirt, so that
//! the agent daemon can restart (drain, upgrade, crash) while its VMs run on and stay protected.
//!
//! The worker is an FT node ([`crate::node::run_controlled`]) steered through a unix control socket:
//!
//! | file in `DIR` | what |
//! |---|---|
//! | `worker.json` | the [`WorkerSpec`] the daemon wrote: VM, addresses, mode (primary / standby) |
//! | `worker.pid` | `PID STARTTIME` (the start time tells a reused pid from the worker) |
//! | `ctl.sock` | the control socket: one JSON [`WorkerRequest`] line in, one [`WorkerResponse`] line out |
//! | `worker.exit` | written when the worker ends: `{"code": N, "reason": "…"}` |
//! | `worker.log` | its stdout and stderr (opened by the daemon) |
//!
//! A primary-mode worker first asks the coordinator (the witness or etcd) who holds the VM's
//! generation: its own host's previous worker (a restart in place) → it claims past that generation;
//! another host at a newer generation than the daemon knows → the VM runs elsewhere (a failover
//! happened): it refuses to boot and exits [`EXIT_RUNS_ELSEWHERE`]. The claim itself (a
//! compare-and-set, [`crate::node`]) is what makes a restart in place safe; the read only avoids a
//! doomed boot.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use failover::coordinator::Coordinator;
use serde::{Deserialize, Serialize};

use crate::control::{
    GuestEnd, NodeControl, Peer, Role, SyncInfo, WorkerRequest, WorkerResponse, WorkerStatus,
};

/// Exit code of a worker that refused to boot because another host holds the VM's output right at a
/// newer generation.
pub const EXIT_RUNS_ELSEWHERE: i32 = 4;

/// How a worker starts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "snake_case")]
pub enum Mode {
    /// Boot the VM here and run it (solo until told to protect it).
    Primary {
        /// The generation the daemon last saw this VM's worker hold.
        known_generation: u64,
    },
    /// Wait for the primary's replication session (a standby for an FT VM).
    Standby,
}

/// What the daemon tells a worker (`worker.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerSpec {
    /// The VM.
    pub vm: String,
    /// This host.
    pub host: String,
    /// PKI directory.
    pub pki: PathBuf,
    /// Guest program from the guest kit.
    pub guest: String,
    /// Guest arguments.
    pub guest_args: Vec<u64>,
    /// Memory, MiB.
    pub mem_mib: u64,
    /// vCPUs.
    pub vcpus: u8,
    /// Disk, MiB (0: none).
    pub disk_mib: u64,
    /// Replication link listen address (a QEMU VM's COLO session).
    pub link: SocketAddr,
    /// A QEMU VM's first COLO data relay port on the link address (`[ports] colo`; 0: link port + 1).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub colo_port: u16,
    /// Heartbeat address.
    pub hb: SocketAddr,
    /// Second heartbeat path's address.
    #[serde(default)]
    pub hb2: Option<SocketAddr>,
    /// Output endpoint address.
    pub output: SocketAddr,
    /// Where the VM's generations are kept.
    pub coordinator: crate::coord::CoordSpec,
    /// Epoch length, ms.
    pub epoch_ms: u64,
    /// Heartbeat interval, ms.
    pub hb_interval_ms: u64,
    /// Heartbeat timeout, ms.
    pub hb_timeout_ms: u64,
    /// Primary or standby.
    pub mode: Mode,
    /// Peers at start (a standby's primary).
    pub peers: Vec<Peer>,
    /// The fence a secondary runs before it promotes (`[fence]` of the agent's config).
    #[serde(default)]
    pub fence: Option<crate::config::Fence>,
    /// A QEMU VM's definition: the worker supervises QEMU ([`crate::worker_qemu`]) instead of running
    /// the native FT node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qemu: Option<ax_qemu::def::QemuDef>,
    /// A QEMU VM started as the destination of a live migration (its disks are created empty, QEMU
    /// waits for the source's stream).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub incoming: Option<IncomingSpec>,
}

fn is_zero(p: &u16) -> bool {
    *p == 0
}

/// How a migration's destination worker starts (`worker.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IncomingSpec {
    /// The disks the source copies (their images are created here first).
    pub disks: Vec<ax_qemu::migrate::DiskInfo>,
    /// The address QEMU listens on for the migration stream and the disks' NBD exports.
    pub listen: String,
}

/// Paths of a worker directory.
#[derive(Debug, Clone)]
pub struct WorkerFiles {
    /// The directory.
    pub dir: PathBuf,
}

impl WorkerFiles {
    /// The files in `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        WorkerFiles { dir: dir.into() }
    }
    /// `worker.json`.
    pub fn spec(&self) -> PathBuf {
        self.dir.join("worker.json")
    }
    /// `worker.pid`.
    pub fn pid(&self) -> PathBuf {
        self.dir.join("worker.pid")
    }
    /// `ctl.sock`.
    pub fn socket(&self) -> PathBuf {
        self.dir.join("ctl.sock")
    }
    /// `worker.exit`.
    pub fn exit(&self) -> PathBuf {
        self.dir.join("worker.exit")
    }
    /// `worker.log`.
    pub fn log(&self) -> PathBuf {
        self.dir.join("worker.log")
    }
}

/// How a worker ended (`worker.exit`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerExit {
    /// Exit code.
    pub code: i32,
    /// Why.
    pub reason: String,
    /// How the guest ended, when the worker ended because it did (a VM event, not a failure).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_end: Option<GuestEnd>,
}

pub use ax_qemu::process::{alive, proc_start_time, write_atomic, write_pid_file};

/// Runs the worker in `dir` until its VM ends; returns the exit code.
pub fn run(dir: &Path) -> i32 {
    let files = WorkerFiles::new(dir);
    let (code, reason, guest_end) = match run_inner(&files) {
        Ok((code, Some(end))) => (code, format!("the guest {}", end.describe()), Some(end)),
        Ok((code, None)) => (code, format!("node ended with code {code}"), None),
        Err((code, e)) => {
            tracing::error!(error = %e, "worker failed");
            (code, e, None)
        }
    };
    finish(&files, code, &reason, guest_end);
    code
}

fn finish(files: &WorkerFiles, code: i32, reason: &str, guest_end: Option<GuestEnd>) {
    let exit = WorkerExit {
        code,
        reason: reason.to_string(),
        guest_end,
    };
    let _ = write_atomic(
        &files.exit(),
        &serde_json::to_vec(&exit).unwrap_or_default(),
    );
    let _ = std::fs::remove_file(files.socket());
}

/// A worker failure: exit code and reason.
type Failure = (i32, String);

fn fail(e: String) -> Failure {
    (1, e)
}

fn run_inner(files: &WorkerFiles) -> Result<(i32, Option<GuestEnd>), Failure> {
    let text = std::fs::read(files.spec())
        .map_err(|e| fail(format!("reading {}: {e}", files.spec().display())))?;
    let spec: WorkerSpec = serde_json::from_slice(&text)
        .map_err(|e| fail(format!("{}: {e}", files.spec().display())))?;
    let _ = std::fs::remove_file(files.exit());
    write_pid_file(&files.pid()).map_err(|e| fail(format!("pid file: {e}")))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| fail(format!("async runtime: {e}")))?;
    match spec.qemu.clone() {
        Some(def) => rt.block_on(crate::worker_qemu::serve(files.clone(), spec, def)),
        None => rt.block_on(serve(files.clone(), spec)),
    }
}

/// Records that the agent stopped the worker (before it ends).
pub(crate) fn finish_stopped(files: &WorkerFiles) {
    finish(files, 0, "stopped by the agent", None);
}

async fn serve(files: WorkerFiles, spec: WorkerSpec) -> Result<(i32, Option<GuestEnd>), Failure> {
    let _ = std::fs::remove_file(files.socket());
    let listener = tokio::net::UnixListener::bind(files.socket())
        .map_err(|e| fail(format!("control socket {}: {e}", files.socket().display())))?;
    let peers: Vec<crate::node::Peer> = spec.peers.clone();
    let mut control = NodeControl::new(peers.clone());
    control.vcpus = spec.vcpus;
    // A superseded worker exits EXIT_FENCED: the daemon records the move and makes this host the VM's
    // standby through its own API when the new primary asks.
    control.exit_when_fenced = true;
    if let Mode::Primary { known_generation } = spec.mode {
        control.boot_solo = true;
        control.known_generation = known_generation;
    }
    let (stop_tx, mut stop_rx) = tokio::sync::mpsc::channel::<()>(1);
    // The control socket answers from the start (status `starting` while the witness is asked).
    let ctl_holder: Arc<tokio::sync::OnceCell<Arc<NodeControl>>> = Arc::default();
    let served = {
        let (holder, spec, files) = (Arc::clone(&ctl_holder), spec.clone(), files.clone());
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (holder, spec, stop, files) = (
                    Arc::clone(&holder),
                    spec.clone(),
                    stop_tx.clone(),
                    files.clone(),
                );
                tokio::spawn(async move {
                    let _ = answer(stream, &holder, &spec, &stop, &files).await;
                });
            }
        })
    };
    if let Mode::Primary { known_generation } = spec.mode {
        control.known_generation = known_before_boot(&spec, known_generation, &files.dir).await?;
    }
    let ctl = Arc::new(control);
    let _ = ctl_holder.set(Arc::clone(&ctl));
    let cfg = crate::node::NodeConfig {
        host: spec.host.clone(),
        pki: spec.pki.clone(),
        vm: spec.vm.clone(),
        guest: spec.guest.clone(),
        guest_args: spec.guest_args.clone(),
        mem_mib: spec.mem_mib,
        link_listen: spec.link,
        hb_listen: spec.hb,
        hb2_listen: spec.hb2,
        output_listen: spec.output,
        peers,
        coordinator: spec.coordinator.target(),
        boot: false,
        epoch: Duration::from_millis(spec.epoch_ms),
        hb_interval: Duration::from_millis(spec.hb_interval_ms),
        hb_timeout: Duration::from_millis(spec.hb_timeout_ms),
        release_journal: None,
        disk_mib: spec.disk_mib,
        state_dir: files.dir.clone(),
        fence: spec.fence.as_ref().map(|f| crate::node::FenceConfig {
            command: f.command.clone(),
            timeout: Duration::from_millis(f.timeout_ms),
            required: f.required,
        }),
    };
    let result = tokio::select! {
        r = crate::node::run_controlled(cfg, Arc::clone(&ctl)) => r.map_err(|e| fail(e.to_string())),
        _ = stop_rx.recv() => Ok(0),
    };
    served.abort();
    result.map(|code| (code, ctl.guest_end()))
}

/// The generation to claim past (protocol v2): the larger of what the daemon knows and what this
/// host recorded; if the coordinator says another host holds a newer generation, the VM runs elsewhere
/// (a failover happened): the worker refuses to boot. A coordinator that is re-learning or
/// unreachable is not waited for: the claim itself settles it (a restart in place must not hang on it).
pub(crate) async fn known_before_boot(
    spec: &WorkerSpec,
    known: u64,
    dir: &Path,
) -> Result<u64, Failure> {
    let recorded = crate::coord::read_generation(&crate::coord::generation_file(dir, &spec.vm));
    let known = known.max(recorded);
    let identity =
        crate::certs::TlsIdentity::load(&crate::certs::PkiPaths::in_dir(&spec.pki, &spec.host))
            .map_err(|e| fail(format!("PKI: {e}")))?;
    let coord = crate::coord::AnyCoordinator::connect(&spec.coordinator.target(), &identity)
        .map_err(|e| fail(format!("coordinator: {e}")))?;
    let own = format!("{}#", spec.host);
    match tokio::time::timeout(Duration::from_secs(2), coord.read(&spec.vm)).await {
        Ok(Ok(Some(r))) if r.holder.starts_with(&own) || r.holder == spec.host => {
            // This host's previous worker (a crash, or the daemon's restart): go on from its
            // generation.
            Ok(known.max(r.generation))
        }
        Ok(Ok(Some(r))) if r.generation > known => Err((
            EXIT_RUNS_ELSEWHERE,
            format!(
                "refusing to boot {}: {} holds its output right at generation {} (newer than the \
                 {known} this host knows): the VM runs elsewhere",
                spec.vm, r.holder, r.generation
            ),
        )),
        Ok(Ok(_)) => Ok(known),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "coordinator: cannot read the VM's generation; the claim will settle it");
            Ok(known)
        }
        Err(_) => {
            tracing::warn!("coordinator: no answer to a read; the claim will settle it");
            Ok(known)
        }
    }
}

async fn answer(
    stream: tokio::net::UnixStream,
    ctl: &tokio::sync::OnceCell<Arc<NodeControl>>,
    spec: &WorkerSpec,
    stop: &tokio::sync::mpsc::Sender<()>,
    files: &WorkerFiles,
) -> std::io::Result<()> {
    crate::control::answer_one(stream, |req| handle(req, ctl.get(), spec, stop, files)).await
}

async fn handle(
    req: WorkerRequest,
    ctl: Option<&Arc<NodeControl>>,
    spec: &WorkerSpec,
    stop: &tokio::sync::mpsc::Sender<()>,
    files: &WorkerFiles,
) -> WorkerResponse {
    let ok = |status| WorkerResponse {
        ok: true,
        error: None,
        status,
        disk_snapshot: None,
        disks: None,
    };
    match (req, ctl) {
        (WorkerRequest::Status, ctl) => ok(Some(status(spec, ctl))),
        (WorkerRequest::Stop, _) => {
            finish_stopped(files);
            let _ = stop.try_send(());
            ok(None)
        }
        (
            WorkerRequest::MigrationDisks
            | WorkerRequest::MigrateTo { .. }
            | WorkerRequest::MigrationFinish
            | WorkerRequest::MigrationResume,
            _,
        ) => WorkerResponse::failed(format!(
            "{} is a native VM: live migration is for QEMU VMs",
            spec.vm
        )),
        (_, None) => WorkerResponse::failed("the worker is starting".into()),
        (WorkerRequest::Protect { peer }, Some(c)) => {
            c.set_peers(vec![peer]);
            ok(None)
        }
        (WorkerRequest::Unprotect, Some(c)) => {
            c.set_peers(Vec::new());
            ok(None)
        }
        (WorkerRequest::SetPeers { peers }, Some(c)) => {
            c.set_peers(peers);
            ok(None)
        }
        (
            WorkerRequest::SnapshotDisk {
                to,
                max_bytes_per_s,
                ..
            },
            Some(c),
        ) => {
            let Some(disk) = c.disk() else {
                return WorkerResponse::failed(format!(
                    "{} has no running VM with a disk here",
                    spec.vm
                ));
            };
            match tokio::task::spawn_blocking(move || disk.snapshot_to(&to, max_bytes_per_s)).await
            {
                Ok(Ok(report)) => WorkerResponse {
                    disk_snapshot: Some(report.into()),
                    ..ok(None)
                },
                Ok(Err(e)) => WorkerResponse::failed(format!("disk snapshot: {e}")),
                Err(e) => WorkerResponse::failed(format!("disk snapshot: {e}")),
            }
        }
    }
}

pub(crate) fn status(spec: &WorkerSpec, ctl: Option<&Arc<NodeControl>>) -> WorkerStatus {
    use std::sync::atomic::Ordering::Acquire;
    let mut s = WorkerStatus {
        vm: spec.vm.clone(),
        pid: std::process::id(),
        role: "starting".into(),
        ..WorkerStatus::default()
    };
    let Some(c) = ctl else { return s };
    let (role, peer) = match c.role() {
        Role::Starting => ("starting", None),
        Role::Standby => ("standby", None),
        Role::Secondary { primary } => ("secondary", Some(primary)),
        Role::Solo => ("solo", None),
        Role::Protected { peer } => ("protected", Some(peer)),
    };
    s.role = role.into();
    s.peer = peer;
    s.guest_end = c.guest_end();
    s.vm_lost = c.lost();
    s.generation = c.generation();
    s.output_bytes = c.output_len();
    s.hb_rtt_us = c
        .heartbeat_rtt()
        .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
    if let Some(st) = c.stats() {
        s.epoch_sent = st.sent.load(Acquire);
        s.epoch_acked_plus_one = st.acked_plus_one.load(Acquire);
        s.bytes_sent = st.bytes.load(Acquire);
        s.raw_bytes = st.raw_bytes.load(Acquire);
        s.compressed_bytes = st.compressed_bytes.load(Acquire);
        s.throttled = st.throttled.load(Acquire);
        s.stun_buckets = st.stun_hist.iter().map(|b| b.load(Acquire)).collect();
        s.stun_sum_us = st.stun_sum_us.load(Acquire);
        let sync = st.sync.lock().unwrap_or_else(|p| p.into_inner()).clone();
        s.sync = sync.map(|p| {
            // The full pass sends every non-zero page once; pre-copy rounds follow. Without a page
            // total, the fraction is the bytes sent against the memory size, capped below 1 until
            // the first consistent epoch is acknowledged.
            let mem = (spec.mem_mib << 20).max(1) as f64;
            let synced = p.done && s.epoch_acked_plus_one > s.epoch_sent.saturating_sub(1);
            let fraction = if synced {
                1.0
            } else {
                ((p.bytes_sent as f64 / mem) * 0.9).min(0.95)
            };
            SyncInfo {
                round: p.round,
                bytes_sent: p.bytes_sent,
                disk_done: p.disk_done,
                disk_total: p.disk_total,
                done: synced,
                fraction,
            }
        });
    }
    s
}
