//! The FT pair's data path: a primary that statepoints its VM and ships every epoch over the replication
//! link, a secondary that stores each epoch whole, acknowledges it and commits it, and the promotion of
//! the secondary into a running primary.
//!
//! ```mermaid
//! sequenceDiagram
//!     participant E as epoch thread (primary)
//!     participant T as sender / ack tasks (primary)
//!     participant S as secondary
//!     participant C as output clients
//!     E->>E: epoch N: stun, capture, resume, encode
//!     E->>T: frame N + console bytes of N
//!     T->>T: hold output N
//!     T->>S: frame N (N+1 is already running)
//!     S->>S: receive: validate + stage whole
//!     S-->>T: ack N
//!     S->>S: commit N
//!     T->>C: release output N
//!     Note over E,T: if (epochs sent − epochs acked) reaches max_in_flight, the epoch thread waits<br/>before its next stun while the guest keeps running: epochs lengthen, none is dropped
//! ```
//!
//! What is not here yet (issue 3): failure detection, the witness and fencing decide *when* to promote;
//! the caller does today.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use statepoint::{EpochConfig, OutputGate, Replica, Statepointer, SyncConfig, SyncProgress, Vm};
use tokio::sync::mpsc;

use crate::link::{HelloReply, InboundSession, LinkError, OutboundSession};
use crate::output::OutputLog;

/// Primary settings.
#[derive(Clone)]
pub struct PrimaryConfig {
    /// Epoch settings.
    pub epochs: EpochConfig,
    /// Most epochs sent but not yet acknowledged before the epoch thread waits.
    pub max_in_flight: u64,
    /// Who decides when held output leaves (the node's role machine); `None`: an epoch's output
    /// leaves as soon as the secondary acknowledged it (single-process tests, benchmarks).
    pub release: Option<Arc<dyn ReleaseRule>>,
}

impl std::fmt::Debug for PrimaryConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrimaryConfig")
            .field("epochs", &self.epochs)
            .field("max_in_flight", &self.max_in_flight)
            .field("release", &self.release.is_some())
            .finish()
    }
}

impl Default for PrimaryConfig {
    fn default() -> Self {
        PrimaryConfig {
            epochs: EpochConfig::default(),
            max_in_flight: 8,
            release: None,
        }
    }
}

/// The data path's questions to whoever decides releases (protocol v2: the node's
/// `failover::role::RoleMachine`). Epochs are this session's own numbers (0 = the first frame).
pub trait ReleaseRule: Send + Sync {
    /// The epoch thread captured `epoch` (called on that thread before its output is held and its
    /// frame leaves).
    fn captured(&self, epoch: u64);
    /// The secondary acknowledged `epoch`: returns the last epoch whose output may leave now, if any.
    fn acked(&self, epoch: u64) -> Option<u64>;
}

/// How a primary begins protecting its VM.
#[derive(Clone, Debug)]
pub enum Start {
    /// The VM is built but not started: epoch 0 is its boot image.
    Boot,
    /// The VM already runs: initial sync (pre-copy) first, carrying `history`, the output already
    /// released (see `Statepointer::sync`).
    Sync(SyncConfig, Vec<u8>),
}

/// FT errors.
#[derive(Debug, thiserror::Error)]
pub enum FtError {
    /// The link failed.
    #[error(transparent)]
    Link(#[from] LinkError),
    /// The epoch engine failed.
    #[error("epoch engine: {0}")]
    Epoch(String),
    /// The replica refused a frame or failed to commit.
    #[error(transparent)]
    Replica(#[from] statepoint::ReplicaError),
    /// An epoch was acknowledged (its output may be released) but could not be committed, even after
    /// retries: this replica cannot restore it and must never be promoted.
    #[error("epoch {epoch} was acknowledged but its commit failed {attempts} times: {source}")]
    CommitFailed {
        /// The epoch.
        epoch: u64,
        /// Attempts made.
        attempts: u32,
        /// The last error.
        source: statepoint::ReplicaError,
    },
    /// The VM failed.
    #[error(transparent)]
    Vm(#[from] statepoint::VmError),
}

/// Counters of a running primary.
#[derive(Debug, Default)]
pub struct PrimaryStats {
    /// Last epoch handed to the link.
    pub sent: AtomicU64,
    /// Last epoch acknowledged (+1; 0 = none yet).
    pub acked_plus_one: AtomicU64,
    /// Bytes of frames sent.
    pub bytes: AtomicU64,
    /// Times the epoch thread waited for acks (the secondary lagged).
    pub throttled: AtomicU64,
    /// Progress of the initial sync (when started with [`Start::Sync`]).
    pub sync: Mutex<Option<SyncProgress>>,
    /// The guest ended.
    pub guest_exited: AtomicBool,
    /// Stun histogram: epochs per bucket of [`STUN_BUCKETS_US`], the last one for longer stuns.
    pub stun_hist: [AtomicU64; STUN_BUCKETS_US.len() + 1],
    /// Sum of the stuns in µs.
    pub stun_sum_us: AtomicU64,
    /// Dirty memory captured (pages × 4096), for the compression ratio.
    pub raw_bytes: AtomicU64,
    /// Memory sections as sent (XOR, zero-word elision, zstd).
    pub compressed_bytes: AtomicU64,
}

/// Upper bounds, in µs, of the stun histogram's buckets ([`PrimaryStats::stun_hist`]).
pub const STUN_BUCKETS_US: [u64; 12] = [
    100, 250, 500, 1_000, 2_000, 5_000, 10_000, 20_000, 50_000, 100_000, 250_000, 1_000_000,
];

impl PrimaryStats {
    /// Counts one epoch's stun and encoder figures.
    pub fn record_epoch(&self, report: &statepoint::epoch::EpochReport) {
        let us = report.stun.as_micros() as u64;
        let bucket = STUN_BUCKETS_US
            .iter()
            .position(|&b| us <= b)
            .unwrap_or(STUN_BUCKETS_US.len());
        self.stun_hist[bucket].fetch_add(1, Ordering::Relaxed);
        self.stun_sum_us.fetch_add(us, Ordering::Relaxed);
        self.raw_bytes
            .fetch_add(report.encode.raw_bytes, Ordering::Relaxed);
        self.compressed_bytes
            .fetch_add(report.encode.compressed_bytes, Ordering::Relaxed);
    }
}

/// Why the epoch thread stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoopEnd {
    /// Asked to stop.
    Stopped,
    /// The link is gone.
    LinkLost,
    /// The guest ended.
    GuestExited,
}

/// A running primary.
#[derive(Debug)]
pub struct Primary {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<(Vm, LoopEnd), FtError>>>,
    gate: Arc<Mutex<OutputGate>>,
    sender: tokio::task::JoinHandle<Result<(), LinkError>>,
    acker: tokio::task::JoinHandle<Result<(), LinkError>>,
    connection: quinn::Connection,
    /// Counters.
    pub stats: Arc<PrimaryStats>,
}

struct Shipment {
    frame: Vec<u8>,
}

impl Primary {
    /// Boots `vm` (built, not started) under epochs and ships every epoch over `session`; output goes to
    /// `log` as epochs are acknowledged. Must be called inside a tokio runtime.
    pub fn start(
        vm: Vm,
        config: PrimaryConfig,
        session: OutboundSession,
        log: Arc<OutputLog>,
    ) -> Result<Self, FtError> {
        Self::start_with(vm, Start::Boot, config, session, log)
    }

    /// Like [`Primary::start`], for a VM that is built ([`Start::Boot`]) or already running
    /// ([`Start::Sync`]: the secondary receives an initial sync first; progress in `stats.sync`).
    pub fn start_with(
        vm: Vm,
        start: Start,
        config: PrimaryConfig,
        session: OutboundSession,
        log: Arc<OutputLog>,
    ) -> Result<Self, FtError> {
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(PrimaryStats::default());
        let (tx, mut rx) = mpsc::channel::<Shipment>(config.max_in_flight.max(1) as usize * 2);
        let (mut frames, mut acks, connection) = session.split();
        let sink_log = Arc::clone(&log);
        let gate = Arc::new(Mutex::new(OutputGate::new(move |_e: u64, b: &[u8]| {
            sink_log.release(b)
        })));
        let held_gate = Arc::clone(&gate);

        let sender_stats = Arc::clone(&stats);
        let sender = tokio::spawn(async move {
            while let Some(s) = rx.recv().await {
                let len = s.frame.len() as u64;
                frames.send(s.frame).await?;
                sender_stats.bytes.fetch_add(len, Ordering::Relaxed);
            }
            frames.finish()
        });
        let ack_stats = Arc::clone(&stats);
        let rule = config.release.clone();
        let ack_gate = Arc::clone(&gate);
        let acker = tokio::spawn(async move {
            // An acknowledged epoch's output leaves when the rule says so (at once without one).
            while let Some(epoch) = acks.next().await? {
                ack_stats.acked_plus_one.store(epoch + 1, Ordering::Release);
                let through = match &rule {
                    None => Some(epoch),
                    Some(r) => r.acked(epoch),
                };
                if let Some(e) = through {
                    ack_gate
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .release_through(e);
                }
            }
            Ok(())
        });

        let thread_stop = Arc::clone(&stop);
        let thread_stats = Arc::clone(&stats);
        let thread = std::thread::Builder::new()
            .name("epochs".into())
            .spawn(move || epoch_loop(vm, start, config, tx, &gate, &thread_stop, &thread_stats))
            .map_err(|e| FtError::Epoch(format!("cannot spawn the epoch thread: {e}")))?;
        Ok(Primary {
            stop,
            thread: Some(thread),
            gate: held_gate,
            sender,
            acker,
            connection,
            stats,
        })
    }

    /// Stops epochs (the VM keeps running) and returns the VM with every byte of output not yet
    /// released (held for epochs the secondary never acknowledged, or whose release the rule did not
    /// allow yet), oldest first. Nothing is lost: the caller releases them when it may.
    pub fn stop(mut self) -> Result<(Vm, Vec<u8>), FtError> {
        self.stop.store(true, Ordering::Release);
        self.sender.abort();
        self.acker.abort();
        let r = match self.thread.take().map(JoinHandle::join) {
            Some(Ok(r)) => r.map(|(vm, _)| vm),
            Some(Err(_)) => Err(FtError::Epoch("the epoch thread panicked".into())),
            None => Err(FtError::Epoch("already stopped".into())),
        };
        let held = self
            .gate
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take_held();
        r.map(|vm| (vm, held))
    }

    /// Releases the held output of every epoch up to and including `epoch` (this session's numbers).
    pub fn release_through(&self, epoch: u64) {
        self.gate
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .release_through(epoch);
    }

    /// Resolves when the replication session is gone (the secondary died or the link broke) or the
    /// epoch thread ended (the guest exited).
    pub async fn wait_link_lost(&mut self) {
        loop {
            if self.acker.is_finished()
                || self.sender.is_finished()
                || self.thread.as_ref().is_none_or(JoinHandle::is_finished)
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Whether the guest has ended (the epoch thread stopped after its exit).
    pub fn guest_ended(&self) -> bool {
        self.stats.guest_exited.load(Ordering::Acquire)
    }

    /// Whether the secondary has acknowledged every epoch sent.
    pub fn all_acked(&self) -> bool {
        self.stats.acked_plus_one.load(Ordering::Acquire) > self.stats.sent.load(Ordering::Acquire)
    }

    /// Whether the replication session is gone (no more acks can come).
    pub fn link_broken(&self) -> bool {
        self.acker.is_finished() || self.sender.is_finished()
    }

    /// Dies like a crashed host: the link is cut and the VM destroyed, whatever epoch was running, and
    /// its held output is never released.
    pub fn kill(mut self) {
        // A dropped stream would be finished cleanly; a dead host's connection is simply gone.
        self.connection.close(1u32.into(), b"primary killed");
        self.sender.abort();
        self.acker.abort();
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join(); // drops the VM (the epoch thread exits at its next check)
        }
    }
}

fn epoch_loop(
    vm: Vm,
    start: Start,
    config: PrimaryConfig,
    tx: mpsc::Sender<Shipment>,
    gate: &Mutex<OutputGate>,
    stop: &AtomicBool,
    stats: &PrimaryStats,
) -> Result<(Vm, LoopEnd), FtError> {
    let epoch_err = |e: statepoint::epoch::EpochError| FtError::Epoch(e.to_string());
    let mut sp = Statepointer::new(vm, config.epochs.clone()).map_err(epoch_err)?;
    let mut frame = Vec::new();
    // The epoch's output is held before its frame leaves (an ack can only follow the frame), here on the
    // epoch thread, so the gate always holds every unreleased byte — also when the link dies with
    // frames still queued.
    let rule = config.release.clone();
    let ship = |epoch: u64, frame: &[u8], console: &[u8]| {
        if let Some(r) = &rule {
            r.captured(epoch);
        }
        gate.lock()
            .unwrap_or_else(|p| p.into_inner())
            .hold(epoch, console);
        tx.blocking_send(Shipment {
            frame: frame.to_vec(),
        })
        .map_err(|_| FtError::Epoch("the link sender is gone".into()))
    };
    // A broken link never costs the VM: the loop hands it back with the reason.
    let lost = |sp: Statepointer| Ok((sp.into_vm(), LoopEnd::LinkLost));
    match start {
        Start::Boot => {
            let report = sp.boot(&mut frame).map_err(epoch_err)?;
            if ship(report.epoch, &frame, &sp.last_capture().console).is_err() {
                return lost(sp);
            }
            stats.sent.store(report.epoch, Ordering::Release);
        }
        Start::Sync(sync, history) => {
            let mut epoch = 0u64;
            let synced = sp.sync(&sync, &history, &mut |f, console, progress| {
                ship(epoch, f, console).map_err(|e| e.to_string())?;
                stats.sent.store(epoch, Ordering::Release);
                *stats.sync.lock().unwrap_or_else(|p| p.into_inner()) = Some(progress.clone());
                epoch += 1;
                Ok(())
            });
            match synced {
                Ok(_) => {}
                Err(statepoint::epoch::EpochError::Ship { .. }) => return lost(sp),
                Err(e) => return Err(epoch_err(e)),
            }
        }
    }
    while !stop.load(Ordering::Acquire) {
        // Flow control: never drop an epoch; if the secondary lags, let the guest run on (the next
        // epoch grows) until acknowledgements catch up.
        let mut waited = false;
        while sp.next_epoch_number()
            >= stats.acked_plus_one.load(Ordering::Acquire) + config.max_in_flight
            && !stop.load(Ordering::Acquire)
        {
            if tx.is_closed() {
                return lost(sp);
            }
            waited = true;
            std::thread::sleep(Duration::from_micros(500));
        }
        if waited {
            stats.throttled.fetch_add(1, Ordering::Relaxed);
        }
        if stop.load(Ordering::Acquire) {
            break;
        }
        let report = sp.next_epoch(&mut frame).map_err(epoch_err)?;
        stats.record_epoch(&report);
        if ship(report.epoch, &frame, &sp.last_capture().console).is_err() {
            return lost(sp);
        }
        stats.sent.store(report.epoch, Ordering::Release);
        if report.exit.is_some() {
            stats.guest_exited.store(true, Ordering::Release);
            return Ok((sp.into_vm(), LoopEnd::GuestExited));
        }
    }
    Ok((sp.into_vm(), LoopEnd::Stopped))
}

/// How many times a secondary tries to commit an acknowledged epoch before it leaves the pair.
pub const COMMIT_ATTEMPTS: u32 = 5;

/// Pause before the second commit attempt; doubled before each further one.
const COMMIT_RETRY_PAUSE: Duration = Duration::from_millis(10);

/// Commits the staged, already acknowledged `epoch`. A failed disk write is retried (the writes are
/// idempotent, and a failed commit leaves the epoch staged), at most [`COMMIT_ATTEMPTS`] times in all.
async fn commit_acked(replica: &mut Replica, epoch: u64) -> Result<(), FtError> {
    let mut pause = COMMIT_RETRY_PAUSE;
    let mut attempts = 0;
    loop {
        attempts += 1;
        match replica.commit() {
            Ok(_) => return Ok(()),
            Err(e @ statepoint::ReplicaError::Disk { .. }) if attempts < COMMIT_ATTEMPTS => {
                tracing::warn!(epoch, attempt = attempts, error = %e, "commit of an acknowledged epoch failed: retrying");
                tokio::time::sleep(pause).await;
                pause *= 2;
            }
            Err(source) => {
                return Err(FtError::CommitFailed {
                    epoch,
                    attempts,
                    source,
                })
            }
        }
    }
}

/// Runs the secondary side of one session until the primary goes away; returns the replica (at its last
/// committed epoch) and why the session ended.
///
/// An epoch is acknowledged as soon as it is stored whole, then committed; a commit that fails is
/// retried ([`COMMIT_ATTEMPTS`]). If it still fails, the secondary leaves the pair loudly: an error
/// naming the VM, the epoch and the cause, the connection closed with [`crate::link::CLOSE_LEFT`] (the
/// primary goes solo), and [`FtError::CommitFailed`] as the result — such a replica must never be
/// promoted (it lacks an epoch whose output may have been released, and its disk may hold part of it).
pub async fn run_secondary(
    session: InboundSession,
    replica: Replica,
) -> (Replica, Result<(), FtError>) {
    run_secondary_until(session, replica, std::future::pending()).await
}

/// [`run_secondary`] that also ends when `cancel` completes (the failure detector declared the primary
/// dead: there is no point waiting for the transport to time out).
pub async fn run_secondary_until(
    session: InboundSession,
    replica: Replica,
    cancel: impl std::future::Future<Output = ()>,
) -> (Replica, Result<(), FtError>) {
    run_secondary_with(session, replica, cancel, |_, _| true).await
}

/// [`run_secondary_until`] that asks `may_ack(epoch, restorable)` before acknowledging each staged
/// epoch (`restorable`: the replica can be restored once it is committed). The node's role machine
/// answers: it never allows an acknowledgement after it decided to promote. A refusal ends the
/// session (the staged epoch is dropped: its output was never released).
pub async fn run_secondary_with(
    mut session: InboundSession,
    mut replica: Replica,
    cancel: impl std::future::Future<Output = ()>,
    mut may_ack: impl FnMut(u64, bool) -> bool,
) -> (Replica, Result<(), FtError>) {
    let refuse = |why: String| HelloReply {
        accepted: false,
        reason: why,
    };
    let hello = session.hello.clone();
    let state_mem = replica.memory().len() as u64;
    let reply = if hello.mem_size != state_mem {
        refuse(format!(
            "memory size {} differs from the replica's {}",
            hello.mem_size, state_mem
        ))
    } else {
        HelloReply {
            accepted: true,
            reason: String::new(),
        }
    };
    let accepted = reply.accepted;
    if let Err(e) = session.reply(&reply).await {
        return (replica, Err(e.into()));
    }
    if !accepted {
        return (replica, Err(LinkError::Refused(reply.reason).into()));
    }
    let limits = replica.limits().clone();
    tokio::pin!(cancel);
    let result = async {
        loop {
            let frame = tokio::select! {
                f = session.next_frame(&limits) => f?,
                () = &mut cancel => return Err(FtError::Epoch("the primary was declared dead".into())),
            };
            let Some(frame) = frame else {
                return Ok(());
            };
            let epoch = replica.receive(frame)?;
            // Stored whole: acknowledge (if allowed), then commit.
            if !may_ack(epoch, replica.restorable_with_staged()) {
                return Err(FtError::Epoch(
                    "no longer acknowledging: this host decided to promote".into(),
                ));
            }
            session.ack(epoch).await?;
            commit_acked(&mut replica, epoch).await?;
        }
    }
    .await;
    if let Err(e @ FtError::CommitFailed { epoch, .. }) = &result {
        tracing::error!(vm = %hello.vm, primary = %hello.host, epoch, error = %e, "an acknowledged epoch cannot be committed: leaving the pair (this replica is not restorable)");
        session.leave(&format!("secondary left the pair: {e}"));
    }
    // An epoch staged but not acknowledged never had its output released: drop it.
    replica.discard_staged();
    (replica, result)
}

/// Turns a replica into a running VM that continues from the last committed epoch, with an output log
/// that starts from the committed output. Until it is protected again, its output is released as it is
/// produced ([`SoloOutput`]).
pub fn promote(replica: Replica) -> Result<(Promoted, Arc<OutputLog>), FtError> {
    let log = OutputLog::with_base(replica.output_base(), replica.output().to_vec());
    let from_epoch = replica.epoch();
    let mut vm = replica.restore()?;
    vm.start()?;
    let solo = SoloOutput::start(vm, Arc::clone(&log))?;
    Ok((Promoted { solo, from_epoch }, log))
}

/// A promoted secondary: the VM runs unprotected from its last committed epoch.
#[derive(Debug)]
pub struct Promoted {
    solo: SoloOutput,
    /// The epoch it resumed from.
    pub from_epoch: Option<u64>,
}

impl Promoted {
    /// Stops releasing output directly and hands the (still running) VM back, to be protected again
    /// with [`Start::Sync`] (see [`SoloOutput::into_vm`]).
    pub fn into_vm(self) -> Result<Vm, FtError> {
        self.solo.into_vm()
    }
}

/// A running VM without a secondary — promoted and not yet protected again, or a primary that lost its
/// secondary and won a fresh generation — whose output is released as it is produced: every few
/// milliseconds a thread moves the console bytes into the log. The caller starts it only once its
/// role machine is solo (no replica of its generation can exist), so no check is needed here.
#[derive(Debug)]
pub struct SoloOutput {
    stop: Arc<AtomicBool>,
    abandon: Arc<AtomicBool>,
    /// Set once the guest has ended and everything it printed was released.
    ended: Arc<AtomicBool>,
    thread: Option<JoinHandle<Vm>>,
}

impl SoloOutput {
    /// Starts releasing `vm`'s output into `log`.
    pub fn start(vm: Vm, log: Arc<OutputLog>) -> Result<Self, FtError> {
        let stop = Arc::new(AtomicBool::new(false));
        let abandon = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let abandoned = Arc::clone(&abandon);
        let ended = Arc::new(AtomicBool::new(false));
        let ended_flag = Arc::clone(&ended);
        let thread = std::thread::Builder::new()
            .name("solo-output".into())
            .spawn(move || {
                while !flag.load(Ordering::Acquire) {
                    // Read the end before the console: bytes printed before the end are then taken.
                    let over = vm.exit().is_some();
                    let bytes = vm.take_console();
                    if !bytes.is_empty() {
                        log.release(&bytes);
                    }
                    if over {
                        ended_flag.store(true, Ordering::Release);
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
                // Everything printed so far goes out before the VM is handed back, unless it is
                // abandoned (destroyed with it).
                let bytes = vm.take_console();
                if !abandoned.load(Ordering::Acquire) && !bytes.is_empty() {
                    log.release(&bytes);
                }
                vm
            })
            .map_err(|e| FtError::Epoch(format!("cannot spawn the output thread: {e}")))?;
        Ok(SoloOutput {
            stop,
            abandon,
            ended,
            thread: Some(thread),
        })
    }

    /// Whether the guest has ended and everything it printed was released.
    pub fn guest_ended(&self) -> bool {
        self.ended.load(Ordering::Acquire)
    }

    /// Destroys the VM without releasing what it printed since the last release. Blocks until the
    /// output thread ended.
    pub fn kill(mut self) {
        self.abandon.store(true, Ordering::Release);
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join(); // the VM is dropped here
        }
    }

    /// Stops and hands the (still running) VM back. Everything it printed so far is released; what it
    /// prints from now on stays in the VM until an epoch captures it and a secondary acknowledges it.
    pub fn into_vm(mut self) -> Result<Vm, FtError> {
        self.stop.store(true, Ordering::Release);
        self.thread
            .take()
            .ok_or_else(|| FtError::Epoch("the VM was already handed back".into()))?
            .join()
            .map_err(|_| FtError::Epoch("the output thread panicked".into()))
    }
}

impl Drop for SoloOutput {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::certs::{issue_host, make_ca, TlsIdentity};
    use crate::link::{Hello, LinkClient, LinkServer};
    use statepoint::frame::{DiskWrite, Encoder};
    use statepoint::ranges::MemoryRangeTable;
    use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};

    const MEM: u64 = 1 << 20;
    const DISK: u64 = 1 << 20;

    /// A disk image whose writes always fail (EPERM): a sealed memfd, reached through /proc.
    fn failing_disk() -> (OwnedFd, std::path::PathBuf) {
        // SAFETY: the name is a NUL-terminated C string literal; the flags are valid.
        let fd =
            unsafe { libc::memfd_create(c"ax-failing-disk".as_ptr(), libc::MFD_ALLOW_SEALING) };
        assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
        // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let file = std::fs::File::from(fd.try_clone().unwrap());
        file.set_len(DISK).unwrap();
        let seals = libc::F_SEAL_WRITE | libc::F_SEAL_GROW | libc::F_SEAL_SHRINK;
        // SAFETY: F_ADD_SEALS on a memfd we own, with valid seal flags; no pointer is passed.
        let r = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals) };
        assert_eq!(r, 0, "F_ADD_SEALS: {}", std::io::Error::last_os_error());
        let path = std::path::PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()));
        (fd, path)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_acknowledged_epoch_that_cannot_be_committed_is_retried_then_the_secondary_leaves() {
        let ca = make_ca("test CA").unwrap();
        let id = |h: &str| {
            let p = issue_host(&ca, h).unwrap();
            TlsIdentity::from_pem(&ca.cert, &p.cert, &p.key, std::path::Path::new(h)).unwrap()
        };
        let any = "127.0.0.1:0".parse().unwrap();
        let server = LinkServer::bind(any, &id("host-b")).unwrap();
        let addr = server.local_addr().unwrap();
        let (_fd, disk) = failing_disk();
        let replica = Replica::new(MEM, Some(&disk)).unwrap();
        let secondary = tokio::spawn(async move {
            let session = server.accept().await.unwrap();
            run_secondary(session, replica).await
        });
        let client = LinkClient::new(any, &id("host-a")).unwrap();
        let session = client
            .connect(addr, "host-b", &Hello::new("vm1", "host-a", MEM, DISK, 1))
            .await
            .unwrap();
        let (mut frames, mut acks, _conn) = session.split();
        // A sync frame (no state) that writes the first sector of the disk.
        let mut frame = Vec::new();
        let write = DiskWrite {
            sector: 0,
            data: vec![7; 512],
        };
        Encoder::new(MEM, 1)
            .unwrap()
            .encode(
                0,
                &MemoryRangeTable::default(),
                &[],
                &[],
                &[write],
                &[],
                &mut frame,
            )
            .unwrap();
        frames.send(frame).await.unwrap();
        // Stored whole, so acknowledged; then the commit fails for good and the secondary leaves: the
        // primary's ack stream ends (it would go solo).
        assert_eq!(acks.next().await.unwrap(), Some(0));
        let after = tokio::time::timeout(Duration::from_secs(30), acks.next())
            .await
            .expect("the secondary did not leave");
        assert!(!matches!(after, Ok(Some(_))), "{after:?}");
        let (replica, ended) = secondary.await.unwrap();
        let e = ended.unwrap_err();
        assert!(
            matches!(
                e,
                FtError::CommitFailed {
                    epoch: 0,
                    attempts: COMMIT_ATTEMPTS,
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("epoch 0"), "{e}");
        assert_eq!(replica.epoch(), None);
    }
}
