//! Epochs: run the guest, stun, capture, resume, encode — the statepoint loop on the primary.
//!
//! Epoch 0 is captured before the first instruction runs ([`Statepointer::boot`]): it carries every page
//! the loader wrote and the boot state of each vCPU, so a replica that starts from all-zero memory can
//! follow from the very start. Every later epoch ends when its interval has passed, when the dirty set
//! has reached `dirty_limit_pages` (checked every `poll_interval` by reading KVM's log without clearing
//! it), or when the guest ends; the stun lasts from the pause request until the vCPUs are released, and
//! encoding (XOR-delta + zstd) happens after the guest is running again.
//!
//! # Adaptation: the epoch length is a target, the guest's progress a floor
//! Write-protect faults and stuns cost the guest time in every epoch. The engine measures what the guest
//! gets (see `cpu`): over windows of ≥ 50 ms of wall time and ≥ 30 ms of vCPU CPU time, the *guest share*
//! `guest time / vCPU CPU time × run time / (run time + stun time)`. When the share falls below
//! `min_guest_share`, the effective epoch doubles (quadruples below half the floor; up to `max_interval`): the faults an epoch costs are
//! bounded by the pages the guest writes (each faults at most once per epoch) and the stun by the dirty
//! set, so a longer epoch dilutes both. It halves back towards the configured `interval` only when the
//! share would stay above the floor even if the lost time per epoch did not shrink with the epoch
//! (`1 - 2·(1 - share) ≥ min_guest_share + 0.05`), so it does not oscillate.
//!
//! The guest-time counter alone over-reports on the PVM host: part of a write-protect fault is accounted
//! as guest time. So the share used is the smaller of the measured one and a model,
//! `(1 - faults · fault_cost / vCPU CPU time) · run / (run + stun)`, where `faults` is exact (non-hot pages harvested:
//! each faulted once) and `fault_cost` is the larger of the measured `stime` per fault and a 15 µs prior
//! (the low end measured on this host, 17–30 µs). The same windows measure the cost of a hot page (its
//! copy in the stun, per page); with the fault cost they set the hot-page promotion threshold
//! (`k = ⌈8 · copy / fault⌉`, at least 2) and cap (hot copies ≤ `hot_copy_budget` of the interval).

use std::time::{Duration, Instant};

use crate::frame::{EncodeStats, Encoder, FrameError};
use crate::output::OutputGate;
use crate::stats::StunStats;
use crate::vm::{Capture, CaptureTiming, GuestExit, Pausable, Snapshottable, Vm, VmError};
use crate::PAGE_SIZE;

/// Epoch settings.
#[derive(Clone, Debug)]
pub struct EpochConfig {
    /// Target epoch length.
    pub interval: Duration,
    /// End an epoch early once this many pages are dirty (0 = never).
    pub dirty_limit_pages: u64,
    /// How often to look at the dirty count during an epoch.
    pub poll_interval: Duration,
    /// zstd level of the page payload.
    pub zstd_level: i32,
    /// Most pages kept *hot* — writable and copied every epoch instead of write-protected (see
    /// `statepoint::dirty`). 0 disables. The engine may use fewer (its copy budget, see below).
    pub hot_page_limit: u64,
    /// Longest effective epoch the progress adaptation may choose (never below `interval`).
    pub max_interval: Duration,
    /// The guest share below which epochs are lengthened (0 disables the adaptation).
    pub min_guest_share: f64,
    /// Share of the target interval that copying hot pages in the stun may take (caps the hot set).
    pub hot_copy_budget: f64,
    /// Raise the controller and the vCPU threads to `SCHED_FIFO` during the stun (needs root).
    pub stun_boost: bool,
    /// Copy the dirty pages after the resume, copy-before-write under userfaultfd write-protection
    /// (`statepoint::cow`), when this host allows it; `false` forces the copy inside the stun.
    pub copy_after_resume: bool,
    /// Pre-protection (with copy after resume; `statepoint::cow`): at each dirty-count poll during the
    /// epoch, write-protect the pages dirtied so far once at least this many are unprotected, so the stun
    /// only protects the rest. 0 disables (the stun protects the whole dirty set).
    pub pre_protect_pages: u64,
    /// Most time copying hot pages may add to a stun (caps the hot set with the measured copy cost, next
    /// to `hot_copy_budget`); zero means no absolute cap.
    pub hot_stun_budget: Duration,
}

impl Default for EpochConfig {
    fn default() -> Self {
        EpochConfig {
            interval: Duration::from_millis(5),
            dirty_limit_pages: 16384,
            poll_interval: Duration::from_millis(1),
            zstd_level: crate::frame::DEFAULT_ZSTD_LEVEL,
            hot_page_limit: 4096,
            max_interval: Duration::from_millis(100),
            min_guest_share: 0.6,
            hot_copy_budget: 0.1,
            stun_boost: true,
            copy_after_resume: true,
            pre_protect_pages: 512,
            hot_stun_budget: Duration::from_micros(150),
        }
    }
}

/// Why an epoch ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EpochEnd {
    /// Epoch 0, before the guest started.
    Boot,
    /// The interval passed.
    Interval,
    /// The dirty set reached the limit.
    DirtyLimit,
    /// The guest ended.
    GuestExit,
}

/// What one epoch did.
#[derive(Clone, Debug)]
pub struct EpochReport {
    /// Epoch number.
    pub epoch: u64,
    /// Why it ended.
    pub end: EpochEnd,
    /// Guest run time of the epoch.
    pub ran: Duration,
    /// Dirty pages captured.
    pub dirty_pages: u64,
    /// Stun: from the pause request until the vCPUs were released.
    pub stun: Duration,
    /// Breakdown of the capture inside the stun.
    pub capture: CaptureTiming,
    /// Encoder figures.
    pub encode: EncodeStats,
    /// Console bytes produced in the epoch.
    pub console_bytes: usize,
    /// Block writes in the epoch.
    pub disk_writes: usize,
    /// Set when the guest has ended.
    pub exit: Option<GuestExit>,
    /// The effective epoch length after this epoch (the adaptation's choice for the next one).
    pub interval: Duration,
    /// Write-protect faults taken in the epoch.
    pub faults: u64,
}

/// What the progress adaptation sees and decided (see the module docs).
#[derive(Clone, Copy, Debug, Default)]
pub struct Progress {
    /// Guest share of the last complete window (`None` before the first).
    pub guest_share: Option<f64>,
    /// Measured cost of one write-protect fault (`None` until enough faults were seen).
    pub fault_cost: Option<Duration>,
    /// Measured cost of one hot page per epoch: copy in the stun + encode.
    pub hot_page_cost: Option<Duration>,
    /// Of which in the stun.
    pub hot_page_stun_cost: Option<Duration>,
    /// Current hot-page promotion threshold (epochs out of `dirty::HISTORY_EPOCHS`).
    pub promote_min: u32,
    /// Current cap on hot pages.
    pub hot_cap: u64,
    /// Current effective epoch length.
    pub interval: Duration,
    /// Times the epoch was lengthened / shortened.
    pub lengthened: u64,
    /// See `lengthened`.
    pub shortened: u64,
    /// Whether the stun boost is in effect.
    pub stun_boost: bool,
}

/// A measurement window of the adaptation.
#[derive(Debug, Default)]
struct Window {
    start: Option<crate::cpu::CpuTimes>,
    opened: Option<Instant>,
    ran: Duration,
    stun: Duration,
    faults: u64,
    copied_pages: u64,
    copy: Duration,
    encode: Duration,
}

/// Initial-sync settings (protecting a VM that already runs).
#[derive(Clone, Debug)]
pub struct SyncConfig {
    /// Most pre-copy rounds after the first full pass.
    pub max_rounds: u32,
    /// Stop pre-copying once a round finds at most this many dirty pages.
    pub converged_pages: u64,
    /// Disk bytes per sync frame.
    pub disk_chunk: u64,
}

impl Default for SyncConfig {
    fn default() -> Self {
        SyncConfig {
            max_rounds: 8,
            converged_pages: 256,
            disk_chunk: 4 << 20,
        }
    }
}

/// Where [`Statepointer::sync`] sends its frames, in order, each with the console output it carries
/// (empty but for the last, consistent epoch) and the progress; an `Err` aborts the sync with its reason.
pub type FrameSink<'a> = dyn FnMut(&[u8], &[u8], &SyncProgress) -> Result<(), String> + 'a;

/// Progress of an initial sync, reported with every frame.
#[derive(Clone, Debug, Default)]
pub struct SyncProgress {
    /// 0: the full pass (every non-zero page, then the disk); 1..: pre-copy rounds; the last report is
    /// the first consistent epoch.
    pub round: u32,
    /// Pages in this frame.
    pub pages: u64,
    /// Disk bytes copied so far.
    pub disk_done: u64,
    /// Disk size.
    pub disk_total: u64,
    /// Frame bytes sent so far.
    pub bytes_sent: u64,
    /// Set on the last frame: the replica holds a consistent epoch once it has it.
    pub done: bool,
}

/// Epoch-engine errors.
#[derive(Debug, thiserror::Error)]
pub enum EpochError {
    /// The VM failed.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// Encoding failed.
    #[error("encoding epoch {epoch}: {source}")]
    Encode {
        /// The epoch.
        epoch: u64,
        /// Why.
        #[source]
        source: FrameError,
    },
    /// The state could not be serialised.
    #[error("serialising the VM state: {0}")]
    State(#[from] postcard::Error),
    /// `boot` was not called first, or was called twice.
    #[error("{0}")]
    Sequence(&'static str),
    /// The caller's frame sink failed during an initial sync.
    #[error("initial sync: shipping frame {epoch} failed: {reason}")]
    Ship {
        /// The frame's epoch.
        epoch: u64,
        /// The sink's reason.
        reason: String,
    },
}

/// Drives the epochs of one VM.
#[derive(Debug)]
pub struct Statepointer {
    vm: Vm,
    encoder: Encoder,
    config: EpochConfig,
    next_epoch: u64,
    capture: Capture,
    state_buf: Vec<u8>,
    stun: StunStats,
    gate: Option<OutputGate>,
    resumed_at: Option<Instant>,
    unchanged_buf: Vec<u64>,
    progress: Progress,
    window: Window,
    tick_ns: u64,
}

/// Windows close after this much wall time and vCPU CPU time (the counters are tick-sampled).
const WINDOW_WALL: Duration = Duration::from_millis(50);
/// See [`WINDOW_WALL`].
const WINDOW_CPU: Duration = Duration::from_millis(30);
/// Prior for the fault cost until measured (the low end measured on the PVM host).
const PRIOR_FAULT_COST: Duration = Duration::from_micros(15);

impl Statepointer {
    /// Takes a VM that is built (or restored) but not started.
    pub fn new(mut vm: Vm, config: EpochConfig) -> Result<Self, EpochError> {
        // Hot pages count as dirty in every epoch; keep them well below the early-end threshold or every
        // epoch would end at its first poll.
        let hot_limit = match config.dirty_limit_pages {
            0 => config.hot_page_limit,
            limit => config.hot_page_limit.min(limit / 2),
        };
        vm.set_hot_page_limit(hot_limit);
        let stun_boost = config.stun_boost && vm.set_stun_boost(true);
        let interval = config.interval;
        if config.copy_after_resume {
            if let Err(e) = vm.enable_copy_after_resume() {
                tracing::warn!(error = %e, "copy after resume unavailable; the pages are copied inside the stun");
            }
        }
        vm.set_pre_protect(config.pre_protect_pages);
        let encoder = Encoder::new(vm.mem_size(), config.zstd_level)
            .map_err(|source| EpochError::Encode { epoch: 0, source })?;
        Ok(Statepointer {
            vm,
            encoder,
            config,
            next_epoch: 0,
            capture: Capture::default(),
            state_buf: Vec::new(),
            stun: StunStats::default(),
            gate: None,
            resumed_at: None,
            unchanged_buf: Vec::new(),
            progress: Progress {
                promote_min: crate::dirty::DEFAULT_PROMOTE_MIN,
                hot_cap: hot_limit,
                interval,
                stun_boost,
                ..Progress::default()
            },
            window: Window::default(),
            tick_ns: crate::cpu::tick_ns(),
        })
    }

    /// What the progress adaptation measured and chose.
    pub fn progress(&self) -> Progress {
        self.progress
    }

    /// The effective epoch length [`Statepointer::next_epoch`] uses.
    pub fn effective_interval(&self) -> Duration {
        self.progress.interval
    }

    /// Routes the epochs' console output through `gate` (held until [`Statepointer::commit`]).
    pub fn with_output_gate(mut self, gate: OutputGate) -> Self {
        self.gate = Some(gate);
        self
    }

    /// The VM.
    pub fn vm(&self) -> &Vm {
        &self.vm
    }

    /// The VM, mutably.
    pub fn vm_mut(&mut self) -> &mut Vm {
        &mut self.vm
    }

    /// Gives the VM back (it keeps running).
    pub fn into_vm(self) -> Vm {
        self.vm
    }

    /// Epoch settings.
    pub fn config(&self) -> &EpochConfig {
        &self.config
    }

    /// Whether the epochs' pages are copied after the resume (userfaultfd copy-before-write) rather than
    /// inside the stun: chosen at [`Statepointer::new`] from `EpochConfig::copy_after_resume` and what this
    /// host allows.
    pub fn copy_after_resume(&self) -> bool {
        self.vm.copy_after_resume()
    }

    /// Whether the dirty pages are write-protected during the epoch (pre-protection, see
    /// `statepoint::cow`): chosen at [`Statepointer::new`] from `EpochConfig::pre_protect_pages`, copy after
    /// resume and manual dirty-log protection; turned off if it ever fails.
    pub fn pre_protect(&self) -> bool {
        self.vm.pre_protect_enabled()
    }

    /// Every stun so far.
    pub fn stun_stats(&self) -> &StunStats {
        &self.stun
    }

    /// The last capture (its pages, state and output), for tests and benchmarks.
    pub fn last_capture(&self) -> &Capture {
        &self.capture
    }

    /// The number the next epoch will get.
    pub fn next_epoch_number(&self) -> u64 {
        self.next_epoch
    }

    /// Captures epoch 0 (loader pages, boot state) into `frame`, then starts the guest.
    pub fn boot(&mut self, frame: &mut Vec<u8>) -> Result<EpochReport, EpochError> {
        if self.next_epoch != 0 {
            return Err(EpochError::Sequence("boot() was already called"));
        }
        let t = Instant::now();
        self.vm.capture(&mut self.capture)?;
        let stun = t.elapsed();
        let report = self.encode(EpochEnd::Boot, Duration::ZERO, stun, frame)?;
        self.vm.start()?;
        self.resumed_at = Some(Instant::now());
        Ok(report)
    }

    /// Protects a guest that is already running (a VM started without epochs, or a promoted replica):
    /// an initial sync to a replica that starts from zero memory and a copy of nothing. Frames go to
    /// `ship` in order, with progress:
    ///
    /// 1. the full pass — every non-zero page, then the disk in `disk_chunk` pieces — taken while the guest
    ///    runs (sync frames: no state);
    /// 2. pre-copy rounds of the pages dirtied meanwhile, until a round is small (`converged_pages`) or
    ///    `max_rounds` have run;
    /// 3. one ordinary stunned capture: the first consistent, restorable epoch.
    ///
    /// Afterwards [`Statepointer::next_epoch`] continues as usual. A sync must start from a fresh
    /// encoder: call it once, right after [`Statepointer::new`], or after [`Statepointer::reset_sync`].
    ///
    /// `history` is the output already released before the sync (the tail the primary retains): it
    /// travels in the first frame's console section, so the new replica's output stream starts with it
    /// and clients that lag behind can be served by that replica after a failover. It must end exactly
    /// where the guest's console stream stands (nothing released or drained during the sync).
    pub fn sync(
        &mut self,
        sync: &SyncConfig,
        history: &[u8],
        ship: &mut FrameSink<'_>,
    ) -> Result<EpochReport, EpochError> {
        if self.next_epoch != 0 {
            return Err(EpochError::Sequence(
                "sync() must start from a fresh encoder (reset_sync first)",
            ));
        }
        if !self.vm.is_running() {
            return Err(EpochError::Sequence("sync() needs a running guest"));
        }
        let mut frame = Vec::new();
        let disk_total = self.vm.disk_bytes();
        let mut progress = SyncProgress {
            disk_total,
            ..SyncProgress::default()
        };
        let mut history = Some(history);
        let mut send =
            |sp: &mut Self, all: bool, chunk: Option<(u64, u64)>, p: &mut SyncProgress| {
                let disk = sp.vm.capture_live(&mut sp.capture, all, chunk)?;
                p.disk_done += disk;
                p.pages = sp.capture.ranges.page_count();
                let epoch = sp.next_epoch;
                frame.clear();
                let c = &sp.capture;
                let stats = sp
                    .encoder
                    .encode(
                        epoch,
                        &c.ranges,
                        &c.pages,
                        &[],
                        &c.disk_writes,
                        history.take().unwrap_or_default(),
                        &mut frame,
                    )
                    .map_err(|source| EpochError::Encode { epoch, source })?;
                p.bytes_sent += stats.frame_bytes;
                ship(&frame, &[], p).map_err(|reason| EpochError::Ship { epoch, reason })?;
                sp.next_epoch += 1;
                Ok::<u64, EpochError>(p.pages)
            };
        // 1. Full pass: every non-zero page with the first disk chunk, then the rest of the disk.
        let chunk = sync.disk_chunk.max(crate::devices::SECTOR);
        send(self, true, Some((0, chunk)), &mut progress)?;
        let mut offset = chunk;
        while offset < disk_total {
            send(self, false, Some((offset, chunk)), &mut progress)?;
            offset += chunk;
        }
        // 2. Pre-copy rounds.
        for round in 1..=sync.max_rounds {
            progress.round = round;
            if send(self, false, None, &mut progress)? <= sync.converged_pages {
                break;
            }
        }
        // 3. The first consistent epoch.
        progress.round += 1;
        let t = Instant::now();
        self.vm.pause()?;
        let captured = self.vm.capture_deferred(&mut self.capture);
        let resumed = self.vm.resume();
        let stun = t.elapsed();
        captured?;
        resumed?;
        self.resumed_at = Some(Instant::now());
        self.vm.complete_capture(&mut self.capture)?;
        let report = self.encode(EpochEnd::Interval, Duration::ZERO, stun, &mut frame)?;
        progress.pages = report.dirty_pages;
        progress.bytes_sent += report.encode.frame_bytes;
        progress.done = true;
        ship(&frame, &self.capture.console, &progress).map_err(|reason| EpochError::Ship {
            epoch: report.epoch,
            reason,
        })?;
        Ok(report)
    }

    /// Forgets what the replica was sent (the secondary restarted or changed): the next
    /// [`Statepointer::sync`] starts over from zero.
    pub fn reset_sync(&mut self) {
        self.encoder.reset();
        self.next_epoch = 0;
    }

    /// Runs one epoch of the effective interval (the configured one, lengthened while the guest's
    /// progress is below its floor) and encodes it into `frame`.
    pub fn next_epoch(&mut self, frame: &mut Vec<u8>) -> Result<EpochReport, EpochError> {
        self.run_epoch(self.progress.interval, frame)
    }

    /// Runs the guest for up to `length` (less if the dirty limit is reached or the guest ends), then
    /// stuns it, captures, resumes and encodes the epoch into `frame`.
    pub fn run_epoch(
        &mut self,
        length: Duration,
        frame: &mut Vec<u8>,
    ) -> Result<EpochReport, EpochError> {
        self.epoch_inner(length, frame, true)
    }

    /// Like [`Statepointer::run_epoch`], but leaves the guest paused at the checkpoint (to compare it with
    /// a replica, or to stop a primary exactly at an epoch boundary). `vm_mut().resume()` continues it.
    pub fn run_epoch_and_hold(
        &mut self,
        length: Duration,
        frame: &mut Vec<u8>,
    ) -> Result<EpochReport, EpochError> {
        self.epoch_inner(length, frame, false)
    }

    fn epoch_inner(
        &mut self,
        length: Duration,
        frame: &mut Vec<u8>,
        resume: bool,
    ) -> Result<EpochReport, EpochError> {
        if self.next_epoch == 0 {
            return Err(EpochError::Sequence("call boot() before the first epoch"));
        }
        if self.vm.is_paused() {
            self.vm.resume()?;
            self.resumed_at = None;
        }
        // An epoch is measured from the moment the guest was resumed at the end of the previous stun, so
        // the time spent encoding (while the guest already runs) counts towards it.
        let start = self.resumed_at.unwrap_or_else(Instant::now);
        let end = self.wait_epoch_end(start, length)?;
        let ran = start.elapsed();
        let boost = self.progress.stun_boost && crate::cpu::set_boost(0, true).is_ok();
        let t = Instant::now();
        self.vm.pause()?;
        let captured = self.vm.capture_deferred(&mut self.capture);
        let resumed = if resume || captured.is_err() {
            self.vm.resume()
        } else {
            Ok(())
        };
        let stun = t.elapsed();
        if boost {
            let _ = crate::cpu::set_boost(0, false);
        }
        self.resumed_at = (resume && captured.is_ok()).then(Instant::now);
        captured?;
        resumed?;
        // The guest runs again (unless held): copy the write-protected pages, each one the guest is about
        // to write first.
        self.vm.complete_capture(&mut self.capture)?;
        let end = if self.vm.exit().is_some() {
            EpochEnd::GuestExit
        } else {
            end
        };
        let report = self.encode(end, ran, stun, frame)?;
        self.adapt(&report);
        Ok(EpochReport {
            interval: self.progress.interval,
            ..report
        })
    }

    /// Accounts one epoch in the window; at the window's end, updates the costs, the hot-page policy
    /// and the effective interval (see the module docs).
    fn adapt(&mut self, rep: &EpochReport) {
        let w = &mut self.window;
        let Some(start) = w.start else {
            // First epoch after start: open the window.
            w.start = self.vm.vcpu_times();
            w.opened = Some(Instant::now());
            return;
        };
        w.ran += rep.ran;
        w.stun += rep.stun;
        w.faults += rep.faults;
        if rep.capture.copy_after_resume {
            // Only hot pages are copied inside the stun.
            w.copied_pages += rep.capture.hot_copied;
            w.copy += rep.capture.hot_copy;
        } else {
            w.copied_pages += rep.dirty_pages;
            w.copy += rep.capture.copy;
        }
        w.encode += rep.encode.elapsed;
        if w.opened.is_some_and(|o| o.elapsed() < WINDOW_WALL) {
            return;
        }
        let Some(now) = self.vm.vcpu_times() else {
            return;
        };
        let d = now.since(&start);
        if d.cpu() * self.tick_ns < WINDOW_CPU.as_nanos() as u64 {
            return; // not enough CPU time yet (a loaded host); keep accumulating
        }
        let w = std::mem::take(&mut self.window);
        self.window.start = Some(now);
        self.window.opened = Some(Instant::now());
        let p = &mut self.progress;
        let ran_share = w.ran.as_secs_f64() / (w.ran + w.stun).as_secs_f64().max(1e-9);
        let measured_share = (d.guest as f64 / d.cpu() as f64).min(1.0) * ran_share;
        if w.faults >= 64 && d.stime > 0 {
            let measured = Duration::from_nanos(d.stime * self.tick_ns / w.faults);
            p.fault_cost = Some(match p.fault_cost {
                Some(old) => (old + measured) / 2,
                None => measured,
            });
        }
        // Part of a fault may be accounted as guest time (PVM handles it inside the guest-time window):
        // `stime` per fault is a lower bound, and the guest-time share an upper bound on progress. The
        // model share charges every fault at least the prior cost, and the smaller share wins.
        let fault = p
            .fault_cost
            .unwrap_or(PRIOR_FAULT_COST)
            .max(PRIOR_FAULT_COST);
        // Faults are charged against the CPU time the vCPUs got (a loaded host gives them less).
        let cpu = (d.cpu() * self.tick_ns) as f64 * 1e-9;
        let model_share =
            (1.0 - fault.as_secs_f64() * w.faults as f64 / cpu.max(1e-9)).max(0.0) * ran_share;
        let share = measured_share.min(model_share);
        p.guest_share = Some(share);
        if w.copied_pages > 0 {
            let pages = u32::try_from(w.copied_pages).unwrap_or(u32::MAX);
            p.hot_page_stun_cost = Some(w.copy / pages);
            p.hot_page_cost = Some((w.copy + w.encode) / pages);
        }
        // Hot-page policy: promote at k of 8 epochs once k/8 · fault > copy; cap the hot set so that its
        // copy fits the stun budget.
        // The guest loses a hot page's copy in the stun; its encoding runs beside the guest.
        let fault = fault.as_secs_f64();
        if let Some(stun_cost) = p.hot_page_stun_cost {
            let k =
                (f64::from(crate::dirty::HISTORY_EPOCHS) * stun_cost.as_secs_f64() / fault).ceil();
            p.promote_min = (k as u32).clamp(2, crate::dirty::HISTORY_EPOCHS);
            let budget = self.config.interval.as_secs_f64() * self.config.hot_copy_budget;
            let mut by_budget = (budget / stun_cost.as_secs_f64().max(1e-8)) as u64;
            if !self.config.hot_stun_budget.is_zero() {
                let abs =
                    self.config.hot_stun_budget.as_secs_f64() / stun_cost.as_secs_f64().max(1e-8);
                by_budget = by_budget.min(abs as u64);
            }
            let configured = match self.config.dirty_limit_pages {
                0 => self.config.hot_page_limit,
                limit => self.config.hot_page_limit.min(limit / 2),
            };
            p.hot_cap = configured.min(by_budget.max(64));
            if configured > 0 {
                self.vm.set_hot_policy(p.hot_cap, p.promote_min);
            }
        }
        // Epoch length.
        let floor = self.config.min_guest_share;
        if floor <= 0.0 {
            return;
        }
        let max = self.config.max_interval.max(self.config.interval);
        if share < floor && p.interval < max {
            // A collapse (below half the floor) quadruples at once.
            let factor = if share < floor / 2.0 { 4 } else { 2 };
            p.interval = (p.interval * factor).min(max);
            p.lengthened += 1;
        } else if p.interval > self.config.interval && 1.0 - 2.0 * (1.0 - share) >= floor + 0.05 {
            p.interval = (p.interval / 2).max(self.config.interval);
            p.shortened += 1;
        }
    }

    fn wait_epoch_end(&mut self, start: Instant, length: Duration) -> Result<EpochEnd, VmError> {
        let deadline = start + length;
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Ok(EpochEnd::Interval);
            }
            let polling = self.config.dirty_limit_pages > 0 || self.vm.pre_protect_enabled();
            let nap = (deadline - now).min(if polling {
                self.config.poll_interval
            } else {
                length
            });
            if self.vm.wait_exit(nap).is_some() {
                return Ok(EpochEnd::GuestExit);
            }
            if self.config.dirty_limit_pages > 0
                && self.vm.dirty_pages_now()? >= self.config.dirty_limit_pages
            {
                return Ok(EpochEnd::DirtyLimit);
            }
            // Between polls the guest runs: protect what it dirtied so far, so the stun protects less.
            self.vm.pre_protect()?;
        }
    }

    fn encode(
        &mut self,
        end: EpochEnd,
        ran: Duration,
        stun: Duration,
        frame: &mut Vec<u8>,
    ) -> Result<EpochReport, EpochError> {
        let epoch = self.next_epoch;
        self.stun.record(stun);
        self.cool_hot_pages();
        let c = &self.capture;
        let state = c
            .state
            .as_ref()
            .ok_or(EpochError::Sequence("capture produced no state"))?;
        self.state_buf.clear();
        self.state_buf = postcard::to_extend(state, std::mem::take(&mut self.state_buf))?;
        frame.clear();
        let encode = self
            .encoder
            .encode(
                epoch,
                &c.ranges,
                &c.pages,
                &self.state_buf,
                &c.disk_writes,
                &c.console,
                frame,
            )
            .map_err(|source| EpochError::Encode { epoch, source })?;
        if let Some(gate) = &mut self.gate {
            gate.hold(epoch, &c.console);
        }
        self.next_epoch += 1;
        Ok(EpochReport {
            epoch,
            end,
            ran,
            dirty_pages: c.ranges.page_count(),
            stun,
            capture: c.timing,
            encode,
            console_bytes: c.console.len(),
            disk_writes: c.disk_writes.len(),
            exit: state.exit.clone(),
            interval: self.progress.interval,
            faults: self.vm.last_faults() + c.timing.pre_faults,
        })
    }

    /// Tells the dirty tracker which hot pages did not change in the last capture (compared with the
    /// contents last sent, i.e. the encoder's shadow, before this epoch is encoded). Runs after the stun.
    fn cool_hot_pages(&mut self) {
        if self.vm.hot_pages() == 0 {
            self.vm.dirty_feedback(&[]);
            return;
        }
        let shadow = self.encoder.shadow();
        let mut unchanged = std::mem::take(&mut self.unchanged_buf);
        unchanged.clear();
        let mut offset = 0usize;
        for r in self.capture.ranges.ranges() {
            for page in r.first_page..r.first_page + r.pages {
                if self.vm.is_hot_page(page) {
                    let now = self.capture.pages.get(offset..offset + PAGE_SIZE);
                    let start = page as usize * PAGE_SIZE;
                    let sent = shadow.get(start..start + PAGE_SIZE);
                    if now.is_some() && now == sent {
                        unchanged.push(page);
                    }
                }
                offset += PAGE_SIZE;
            }
        }
        self.vm.dirty_feedback(&unchanged);
        self.unchanged_buf = unchanged;
    }

    /// Epoch `epoch` is committed (by the local replica or the secondary): release its output.
    pub fn commit(&mut self, epoch: u64) -> u64 {
        self.gate.as_mut().map_or(0, |g| g.release_through(epoch))
    }
}
