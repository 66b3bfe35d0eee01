//! A running guest: vCPU threads, pause/resume ([`Pausable`]) and capture ([`Snapshottable`]).
//!
//! # vCPU threads
//! Each vCPU runs on its own thread, in a loop around `KVM_RUN`, handling its port-I/O exits itself. The
//! controller stuns the VM by raising a pause flag and kicking every thread that is inside `KVM_RUN` (see
//! `vstate`); a thread outside it — parked, or handling an exit in user space — needs no signal: it
//! announces `KVM_RUN` in a per-vCPU flag *before* it checks the pause flag, and the controller raises
//! the pause flag *before* it reads the vCPU flags (both sequentially consistent), so either the thread
//! sees the pause or the controller sees the thread entering and kicks it. Each thread completes any
//! half-done I/O, then *parks*. While parked, a thread obeys commands: save your state (all
//! vCPUs save in parallel, while the controller copies dirty pages), resume, or stop.
//!
//! # Capture
//! With every vCPU parked, [`Snapshottable::capture`] harvests the dirty set, asks the vCPUs to save their
//! state, copies the dirty pages into a compact staging buffer (one `memcpy` per run of contiguous pages),
//! collects the device state and the epoch's output, then re-arms dirty logging. If anything fails the
//! harvested bits are put back and the epoch's output stays in the devices: the next capture includes all
//! of it.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::cow::Cow;
use crate::devices::{DeviceError, Devices, DevicesState, IoAction};
use crate::dirty::DirtyTracker;
use crate::frame::DiskWrite;
use crate::layout::{Layout, LayoutError};
use crate::loader::{self, LoaderError};
use crate::memory::{GuestRam, MemoryError};
use crate::ranges::MemoryRangeTable;
use crate::vstate::{self, Exit, KvmSystem, KvmVcpu, KvmVm, VcpuState, VstateError};
use crate::PAGE_SIZE;

/// Default guest memory: 256 MiB.
pub const DEFAULT_MEM_SIZE: u64 = 256 << 20;

/// What a VM is made of.
#[derive(Clone, Debug)]
pub struct VmConfig {
    /// Guest memory in bytes (multiple of 2 MiB).
    pub mem_size: u64,
    /// Number of vCPUs.
    pub vcpus: u8,
    /// The guest program: a static ELF64 executable.
    pub image: Vec<u8>,
    /// Program arguments (`BootInfo.args`, at most 8).
    pub args: Vec<u64>,
    /// Raw disk image for the block device, if any.
    pub disk: Option<PathBuf>,
    /// Use KVM's manual dirty-log protection when the kernel has it (the default). `false` forces the
    /// classic mode where reading the log clears it (tests use it to exercise both put-back paths).
    pub manual_dirty_protect: bool,
}

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig {
            mem_size: DEFAULT_MEM_SIZE,
            vcpus: 1,
            image: Vec::new(),
            args: Vec::new(),
            disk: None,
            manual_dirty_protect: true,
        }
    }
}

/// VM errors.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// KVM refused something.
    #[error(transparent)]
    Kvm(#[from] VstateError),
    /// Bad VM shape.
    #[error(transparent)]
    Layout(#[from] LayoutError),
    /// Bad guest image.
    #[error("guest image: {0}")]
    Loader(#[from] LoaderError),
    /// Memory could not be mapped.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// A device could not be created or restored.
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// An operation needs the VM paused.
    #[error("the VM must be paused for {0}")]
    NotPaused(&'static str),
    /// An operation needs the VM started.
    #[error("the VM is not started")]
    NotStarted,
    /// A vCPU thread failed.
    #[error("vCPU {vcpu}: {reason}")]
    Vcpu {
        /// vCPU index.
        vcpu: u8,
        /// What happened.
        reason: String,
    },
    /// A saved state does not fit this VM.
    #[error("saved state does not match the VM: {0}")]
    StateMismatch(String),
    /// A capture was made to fail on purpose (tests of the put-back path).
    #[error("injected capture failure at {0:?}")]
    Injected(FailPoint),
    /// Copy after resume (userfaultfd write-protection) failed.
    #[error("copy after resume: {0}")]
    Uffd(#[from] crate::uffd::UffdError),
}

/// How a guest ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum GuestExit {
    /// Wrote the exit port.
    Code(u32),
    /// Triple fault or another fatal exit.
    Crash {
        /// vCPU that crashed.
        vcpu: u8,
        /// Why.
        reason: String,
    },
}

/// The whole saved state of a VM (everything but memory and disk), as plain serde data.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmState {
    /// Guest memory size.
    pub mem_size: u64,
    /// One entry per vCPU, in index order.
    pub vcpus: Vec<VcpuState>,
    /// Devices.
    pub devices: DevicesState,
    /// Set when the guest had already ended at this checkpoint.
    pub exit: Option<GuestExit>,
}

/// Where an injected capture failure strikes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailPoint {
    /// After the dirty log was harvested (and, without manual protect, cleared).
    AfterHarvest,
    /// After half of the dirty pages were copied.
    MidCopy,
}

/// One capture: what an epoch checkpoint is made of, before encoding. Reused across epochs so that the
/// stun path does not allocate.
#[derive(Debug, Default)]
pub struct Capture {
    /// Dirty pages.
    pub ranges: MemoryRangeTable,
    /// Their contents, `ranges.page_count() * 4096` bytes, in range order.
    pub pages: Vec<u8>,
    /// vCPU and device state.
    pub state: Option<VmState>,
    /// Console output of the epoch.
    pub console: Vec<u8>,
    /// Block writes of the epoch.
    pub disk_writes: Vec<DiskWrite>,
    /// Time spent in each step.
    pub timing: CaptureTiming,
}

/// Time spent in each step of a capture.
#[derive(Clone, Copy, Debug, Default)]
pub struct CaptureTiming {
    /// `KVM_GET_DIRTY_LOG` + OR with the VMM bitmap.
    pub harvest: Duration,
    /// Copying the dirty pages.
    pub copy: Duration,
    /// Waiting for the vCPU state saves (they overlap the copy).
    pub vcpu_wait: Duration,
    /// The whole capture inside the stun.
    pub total: Duration,
    /// Copy after resume: write-protecting the dirty pages (inside the stun).
    pub write_protect: Duration,
    /// Copy after resume: write-protect faults of the guest (or the VMM) resolved by copying the page
    /// first, while the copy after the resume ran.
    pub wp_faults: u64,
    /// Whether the pages were copied after the resume (`copy` then lies outside the stun).
    pub copy_after_resume: bool,
    /// Pre-protection: dirty pages protected during the epoch and still protected at the stun (the stun
    /// did not have to protect them).
    pub pre_protected: u64,
    /// Pre-protection: faults of pre-protected pages written again before the stun.
    pub pre_faults: u64,
    /// Copy after resume: hot pages copied inside the stun, and the time that took (part of
    /// `write_protect`).
    pub hot_copied: u64,
    /// See `hot_copied`.
    pub hot_copy: Duration,
}

/// Stop and restart the guest.
pub trait Pausable {
    /// Stuns every vCPU; returns once all are parked.
    fn pause(&mut self) -> Result<(), VmError>;
    /// Lets the vCPUs run again.
    fn resume(&mut self) -> Result<(), VmError>;
}

/// Capture a checkpoint of a paused guest.
pub trait Snapshottable: Pausable {
    /// Captures the dirty pages, state and epoch output since the previous successful capture.
    fn capture(&mut self, into: &mut Capture) -> Result<(), VmError>;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cmd {
    Run,
    Save,
    Stop,
}

#[derive(Debug)]
struct Ctl {
    cmd: Cmd,
    parked: usize,
    alive: usize,
    saves: Vec<Option<Result<VcpuState, String>>>,
    exit: Option<GuestExit>,
}

#[derive(Debug)]
struct Control {
    pause: AtomicBool,
    /// Mirror of `Ctl::parked - Ctl::alive` readiness, for the controller to spin on during a stun.
    parked_now: AtomicUsize,
    alive_now: AtomicUsize,
    state: Mutex<Ctl>,
    to_vcpus: Condvar,
    to_ctl: Condvar,
    threads: OnceLock<Vec<libc::pthread_t>>,
    /// Kernel thread ids of the vCPU threads (CPU-time counters, stun boost).
    tids: OnceLock<Vec<libc::pid_t>>,
    /// Per vCPU: the thread is in (or about to enter) `KVM_RUN`.
    in_run: Vec<AtomicBool>,
    /// Raise kicked vCPU threads to `SCHED_FIFO` for the stun (see `cpu`).
    boost: AtomicBool,
    /// Signals sent by `kick_all` (kick-path statistics).
    signals: AtomicUsize,
}

impl Control {
    fn lock(&self) -> MutexGuard<'_, Ctl> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Kicks the vCPU threads that are in `KVM_RUN`; the pause flag must already be raised.
    fn kick_all(&self) {
        let boost = self.boost.load(Ordering::Relaxed);
        if boost {
            if let Some(tids) = self.tids.get() {
                for &tid in tids {
                    // A failure (no CAP_SYS_NICE) only costs the boost.
                    let _ = crate::cpu::set_boost(tid, true);
                }
            }
        }
        if let Some(threads) = self.threads.get() {
            for (&t, running) in threads.iter().zip(&self.in_run) {
                if !running.load(Ordering::SeqCst) {
                    continue;
                }
                self.signals.fetch_add(1, Ordering::Relaxed);
                // SAFETY: `t` is a live vCPU thread of this VM: threads only end on `Cmd::Stop`, after which
                // the VM no longer kicks them (`Vm::drop` joins them last).
                unsafe { libc::pthread_kill(t, vstate::kick_signal()) };
            }
        }
    }

    /// Raises the pause flag and kicks every vCPU.
    fn request_pause(&self) {
        self.pause.store(true, Ordering::SeqCst);
        self.kick_all();
    }

    fn record_exit(&self, exit: GuestExit) {
        let mut g = self.lock();
        if g.exit.is_none() {
            g.exit = Some(exit);
        }
        drop(g);
        self.request_pause();
        self.to_ctl.notify_all();
    }
}

/// A VM of the statepoint engine.
#[derive(Debug)]
pub struct Vm {
    /// Copy after resume, when enabled. Declared first: dropped (its last copy done, its handler stopped)
    /// while guest RAM is still mapped.
    cow: Option<Cow>,
    /// Pre-protect during the epoch once this many dirty pages are unprotected (0: never; see `cow`).
    pre_protect_pages: u64,
    /// Pre-protection backs off while it does more harm than good: epochs left to skip, and the length
    /// of the next back-off.
    pre_skip: u32,
    pre_backoff: u32,
    /// Test hook: a full copy of guest memory taken during the next stuns.
    stun_snapshots: bool,
    stun_snapshot: Option<Vec<u8>>,
    layout: Layout,
    kvm_vm: Arc<KvmVm>,
    ram: GuestRam,
    devices: Arc<Devices>,
    ctl: Arc<Control>,
    /// vCPUs not yet handed to their threads.
    idle_vcpus: Vec<KvmVcpu>,
    threads: Vec<JoinHandle<()>>,
    dirty: DirtyTracker,
    paused: bool,
    fail_next: Option<FailPoint>,
    disk: Option<PathBuf>,
}

impl TryFrom<VmConfig> for Vm {
    type Error = VmError;

    /// Builds a VM and loads its guest; vCPUs are created but not started.
    fn try_from(config: VmConfig) -> Result<Self, VmError> {
        let layout = Layout::new(config.mem_size, config.vcpus)?;
        let ram = GuestRam::new(layout.mem_size)?;
        let image = loader::load(&config.image, &layout, &ram)?;
        layout.write_boot_structures(&ram, image.free_start, &config.args)?;
        let devices = Devices::new(config.disk.as_deref())?;
        let mut vm = Vm::assemble(
            layout,
            ram,
            devices,
            config.disk,
            config.manual_dirty_protect,
        )?;
        let sregs = layout.boot_sregs();
        for vcpu in &vm.idle_vcpus {
            vcpu.set_boot_state(&sregs, &layout.boot_regs(vcpu.index(), image.entry))?;
        }
        vm.paused = true;
        Ok(vm)
    }
}

impl Vm {
    fn assemble(
        layout: Layout,
        ram: GuestRam,
        devices: Devices,
        disk: Option<PathBuf>,
        manual_protect: bool,
    ) -> Result<Self, VmError> {
        let kvm = KvmSystem::open()?;
        vstate::install_kick_handler()?;
        // SAFETY: `ram` maps `mem_size` bytes; the returned `Vm` owns a handle to that mapping, and its field
        // order drops the KVM VM (`kvm_vm`) before the memory (`ram`).
        let kvm_vm = unsafe { kvm.create_vm(ram.host_addr(), layout.mem_size, manual_protect)? };
        let idle_vcpus = (0..layout.vcpus)
            .map(|i| kvm_vm.create_vcpu(i))
            .collect::<Result<Vec<_>, _>>()?;
        let words = kvm_vm.bitmap_words();
        Ok(Vm {
            cow: None,
            pre_protect_pages: 0,
            pre_skip: 0,
            pre_backoff: 0,
            stun_snapshots: false,
            stun_snapshot: None,
            layout,
            kvm_vm: Arc::new(kvm_vm),
            ram,
            devices: Arc::new(devices),
            ctl: Arc::new(Control {
                pause: AtomicBool::new(true),
                parked_now: AtomicUsize::new(0),
                alive_now: AtomicUsize::new(0),
                state: Mutex::new(Ctl {
                    cmd: Cmd::Run,
                    parked: 0,
                    alive: 0,
                    saves: Vec::new(),
                    exit: None,
                }),
                to_vcpus: Condvar::new(),
                to_ctl: Condvar::new(),
                threads: OnceLock::new(),
                tids: OnceLock::new(),
                in_run: (0..layout.vcpus).map(|_| AtomicBool::new(false)).collect(),
                boost: AtomicBool::new(false),
                signals: AtomicUsize::new(0),
            }),
            idle_vcpus,
            threads: Vec::new(),
            dirty: DirtyTracker::new(words),
            paused: true,
            fail_next: None,
            disk,
        })
    }

    /// Rebuilds a VM from a checkpoint: `ram` holds the memory, `state` the vCPUs and devices, `disk` the
    /// disk image as of the checkpoint. The VM is returned paused; [`Vm::start`] resumes the guest.
    pub fn restore(ram: GuestRam, state: &VmState, disk: Option<PathBuf>) -> Result<Self, VmError> {
        let vcpus = u8::try_from(state.vcpus.len())
            .map_err(|_| VmError::StateMismatch(format!("{} vCPUs", state.vcpus.len())))?;
        if ram.size() != state.mem_size {
            return Err(VmError::StateMismatch(format!(
                "memory is {} bytes, the state says {}",
                ram.size(),
                state.mem_size
            )));
        }
        let layout = Layout::new(state.mem_size, vcpus)?;
        let devices = Devices::restore(&state.devices, disk.clone())?;
        let vm = Vm::assemble(layout, ram, devices, disk, true)?;
        for (vcpu, saved) in vm.idle_vcpus.iter().zip(&state.vcpus) {
            if saved.index != vcpu.index() {
                return Err(VmError::StateMismatch(format!(
                    "vCPU state {} at position {}",
                    saved.index,
                    vcpu.index()
                )));
            }
            vcpu.restore_state(saved)?;
        }
        if let Some(exit) = &state.exit {
            vm.ctl.lock().exit = Some(exit.clone());
        }
        Ok(vm)
    }

    /// Starts the vCPU threads (the guest runs from here on).
    pub fn start(&mut self) -> Result<(), VmError> {
        if self.idle_vcpus.is_empty() {
            return self.resume();
        }
        let n = self.idle_vcpus.len();
        {
            let mut g = self.ctl.lock();
            g.alive = n;
            g.parked = 0;
            g.cmd = Cmd::Run;
            self.ctl.alive_now.store(n, Ordering::Release);
            self.ctl.parked_now.store(0, Ordering::Release);
        }
        let exited = self.ctl.lock().exit.is_some();
        self.ctl.pause.store(exited, Ordering::SeqCst);
        let (tx, rx) = std::sync::mpsc::channel();
        for vcpu in self.idle_vcpus.drain(..) {
            let ctl = Arc::clone(&self.ctl);
            let devices = Arc::clone(&self.devices);
            let ram = self.ram.clone();
            let tx = tx.clone();
            let index = vcpu.index();
            let handle = std::thread::Builder::new()
                .name(format!("vcpu{index}"))
                .spawn(move || {
                    // SAFETY: `pthread_self` has no preconditions.
                    let _ = tx.send((index, unsafe { libc::pthread_self() }, crate::cpu::gettid()));
                    vcpu_thread(vcpu, &ctl, &devices, &ram);
                })
                .map_err(|e| VmError::Vcpu {
                    vcpu: index,
                    reason: format!("cannot spawn thread: {e}"),
                })?;
            self.threads.push(handle);
        }
        let mut ids: Vec<(u8, libc::pthread_t, libc::pid_t)> = Vec::with_capacity(n);
        for _ in 0..n {
            if let Ok(id) = rx.recv() {
                ids.push(id);
            }
        }
        // By vCPU index, as `Control::in_run` is.
        ids.sort_unstable_by_key(|&(index, _, _)| index);
        let _ = self
            .ctl
            .threads
            .set(ids.iter().map(|&(_, t, _)| t).collect());
        let _ = self
            .ctl
            .tids
            .set(ids.iter().map(|&(_, _, tid)| tid).collect());
        self.paused = exited;
        if exited {
            self.wait_parked();
        }
        Ok(())
    }

    /// Guest memory size.
    pub fn mem_size(&self) -> u64 {
        self.layout.mem_size
    }

    /// Number of vCPUs.
    pub fn vcpus(&self) -> u8 {
        self.layout.vcpus
    }

    /// The guest RAM (the benchmark and tests read it while paused).
    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }

    /// The disk image path, if any.
    pub fn disk(&self) -> Option<&std::path::Path> {
        self.disk.as_deref()
    }

    /// Whether the VM is paused.
    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// Whether KVM's log is read without clearing (manual protect).
    pub fn manual_dirty_protect(&self) -> bool {
        self.kvm_vm.manual_protect()
    }

    /// How the guest ended, if it has.
    pub fn exit(&self) -> Option<GuestExit> {
        self.ctl.lock().exit.clone()
    }

    /// Blocks until the guest ends or `timeout` passes.
    pub fn wait_exit(&self, timeout: Duration) -> Option<GuestExit> {
        let deadline = Instant::now() + timeout;
        let mut g = self.ctl.lock();
        while g.exit.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            g = self
                .ctl
                .to_ctl
                .wait_timeout(g, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        g.exit.clone()
    }

    /// Copy of the whole guest memory; the VM must be paused.
    pub fn memory_snapshot(&self) -> Result<Vec<u8>, VmError> {
        if !self.paused {
            return Err(VmError::NotPaused("a memory snapshot"));
        }
        // SAFETY: every vCPU is parked (or never started), so nothing writes guest memory.
        Ok(unsafe { self.ram.as_slice() }.to_vec())
    }

    /// Dirty pages since the last capture, read without disturbing the log (for early epoch ends).
    pub fn dirty_pages_now(&mut self) -> Result<u64, VmError> {
        Ok(self.dirty.peek_count(&self.kvm_vm, &self.ram)?)
    }

    /// Takes the console bytes written since the last capture or take — for VMs run without epochs.
    pub fn take_console(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let mut writes = Vec::new();
        self.devices.take_epoch_output(&mut out, &mut writes);
        out
    }

    /// Allows up to `limit` hot pages (see `dirty`): pages written epoch after epoch stay writable and are
    /// copied every epoch instead of faulting every epoch. 0 disables. Needs manual dirty-log protection.
    pub fn set_hot_page_limit(&mut self, limit: u64) {
        self.dirty.set_hot_limit(limit);
    }

    /// Number of hot pages.
    pub fn hot_pages(&self) -> u64 {
        self.dirty.hot_count()
    }

    /// Whether `page` is hot.
    pub fn is_hot_page(&self, page: u64) -> bool {
        self.dirty.is_hot(page)
    }

    /// After a capture: the hot pages that did not change this epoch (they count as not written).
    pub fn dirty_feedback(&mut self, unchanged_hot: &[u64]) {
        self.dirty
            .feedback(self.kvm_vm.manual_protect(), unchanged_hot);
    }

    /// Sets the hot-page cap and promotion threshold (see `dirty`).
    pub fn set_hot_policy(&mut self, limit: u64, promote_min: u32) {
        self.dirty.set_hot_policy(limit, promote_min);
    }

    /// Write-protect faults taken in the last captured epoch (see `dirty`).
    pub fn last_faults(&self) -> u64 {
        self.dirty.last_faults()
    }

    /// The CPU-time counters of the vCPU threads, summed (see `cpu`); `None` before [`Vm::start`] or when
    /// `/proc` cannot be read.
    pub fn vcpu_times(&self) -> Option<crate::cpu::CpuTimes> {
        let tids = self.ctl.tids.get()?;
        let mut sum = crate::cpu::CpuTimes::default();
        for &tid in tids {
            sum.add(&crate::cpu::thread_times(tid).ok()?);
        }
        Some(sum)
    }

    /// Raises kicked vCPU threads to `SCHED_FIFO` for the stun (see `cpu`); returns whether this process
    /// may do so (the setting stays off otherwise).
    pub fn set_stun_boost(&mut self, on: bool) -> bool {
        let allowed = on && crate::cpu::set_boost(0, true).is_ok();
        if allowed {
            let _ = crate::cpu::set_boost(0, false);
        }
        self.ctl.boost.store(allowed, Ordering::Relaxed);
        allowed
    }

    /// Kick signals sent so far (a vCPU outside `KVM_RUN` is stunned without one).
    pub fn kick_signals(&self) -> usize {
        self.ctl.signals.load(Ordering::Relaxed)
    }

    /// Switches captures made through the epoch loop to *copy after resume* (see `statepoint::cow`):
    /// the stun only write-protects the dirty pages with userfaultfd, and the pages are copied once the
    /// guest runs again, each page the guest is about to write first. Fails — and the VM keeps copying
    /// inside the stun — when userfaultfd write-protection is unavailable (kernel, permissions).
    pub fn enable_copy_after_resume(&mut self) -> Result<(), VmError> {
        if self.cow.is_none() {
            self.cow = Some(Cow::new(self.ram.host_addr(), self.ram.size())?);
        }
        Ok(())
    }

    /// Whether captures copy the pages after the resume.
    pub fn copy_after_resume(&self) -> bool {
        self.cow.is_some()
    }

    /// Pre-protection (see `statepoint::cow`): [`Vm::pre_protect`] write-protects the pages dirtied so far
    /// once at least `min_pages` of them are unprotected (0 disables). Needs copy after resume and manual
    /// dirty-log protection (the pre-pass reads KVM's log without clearing it); returns whether it is on.
    pub fn set_pre_protect(&mut self, min_pages: u64) -> bool {
        let on = min_pages > 0 && self.cow.is_some() && self.kvm_vm.manual_protect();
        self.pre_protect_pages = if on { min_pages } else { 0 };
        on
    }

    /// Whether pre-protection is on.
    pub fn pre_protect_enabled(&self) -> bool {
        self.pre_protect_pages > 0 && self.cow.is_some()
    }

    /// While the guest runs (between stuns): write-protects the pages dirtied so far in this epoch, if at
    /// least the configured number are unprotected, so the stun has fewer left to protect. Returns the
    /// pages protected. A failure turns pre-protection off (the stun protects every page, as without it).
    pub fn pre_protect(&mut self) -> Result<u64, VmError> {
        if self.pre_protect_pages == 0
            || self.paused
            || self.threads.is_empty()
            || self.pre_skip > 0
        {
            return Ok(0);
        }
        let Some(cow) = self.cow.as_ref() else {
            return Ok(0);
        };
        self.dirty.peek(&self.kvm_vm)?;
        let (dirty, hot) = self.dirty.peeked();
        if cow.unarmed(dirty, hot) < self.pre_protect_pages {
            return Ok(0);
        }
        match cow.pre_protect(dirty, hot) {
            Ok(n) => Ok(n),
            Err(e) => {
                tracing::warn!(error = %e, "pre-protection failed; the stun protects every page from now on");
                self.pre_protect_pages = 0;
                Ok(0)
            }
        }
    }

    /// After a stun: if more pre-protected pages were written again (a fault each, on top of KVM's) than
    /// stayed protected until the stun (what pre-protection saves the stun), pre-protection skips the next
    /// epochs — 1, 2, 4, … up to 64 while it keeps losing; an epoch where it pays resets the back-off.
    fn pre_protect_backoff(&mut self, kept: u64, rewritten: u64) {
        if self.pre_skip > 0 {
            self.pre_skip -= 1;
            return;
        }
        if rewritten > kept && rewritten >= 16 {
            self.pre_backoff = (self.pre_backoff * 2).clamp(1, 64);
            self.pre_skip = self.pre_backoff;
        } else if kept > 0 {
            self.pre_backoff = 0;
        }
    }

    fn disarm(&mut self) {
        if let Some(cow) = self.cow.as_ref() {
            if let Err(e) = cow.disarm() {
                tracing::warn!(error = %e, "un-protecting pre-protected pages failed");
            }
        }
    }

    /// Test hook: while `on`, every capture also takes a full copy of guest memory inside the stun,
    /// returned by [`Vm::take_stun_snapshot`].
    pub fn snapshot_at_stuns(&mut self, on: bool) {
        self.stun_snapshots = on;
        self.stun_snapshot = None;
    }

    /// The full memory copy the last capture took inside its stun (see [`Vm::snapshot_at_stuns`]).
    pub fn take_stun_snapshot(&mut self) -> Option<Vec<u8>> {
        self.stun_snapshot.take()
    }

    /// Like [`Snapshottable::capture`], but with copy after resume enabled the pages are only
    /// write-protected: the caller resumes the guest, then calls [`Vm::complete_capture`], which copies
    /// them. Without copy after resume this is a plain capture.
    pub fn capture_deferred(&mut self, into: &mut Capture) -> Result<(), VmError> {
        if !self.paused {
            return Err(VmError::NotPaused("a capture"));
        }
        if let Some(cow) = self.cow.as_mut() {
            // A capture whose copy was never completed (its epoch failed): finish it, discard it.
            cow.finish(&mut Vec::new())?;
        }
        let r = self.capture_inner(into, true);
        if r.is_err() {
            self.dirty.put_back();
            self.disarm();
        }
        r
    }

    /// Completes a [`Vm::capture_deferred`]: copies the pages not yet copied (the guest may run) into
    /// `into.pages`. A no-op when the capture copied them already.
    pub fn complete_capture(&mut self, into: &mut Capture) -> Result<(), VmError> {
        let Some(cow) = self.cow.as_mut() else {
            return Ok(());
        };
        if !into.timing.copy_after_resume || !cow.pending() {
            return Ok(());
        }
        let t = Instant::now();
        into.timing.wp_faults = cow.finish(&mut into.pages)?;
        into.timing.copy = t.elapsed();
        Ok(())
    }

    /// Makes the next capture fail at `point` (tests of the put-back path).
    pub fn fail_next_capture(&mut self, point: FailPoint) {
        self.fail_next = Some(point);
    }

    fn wait_parked(&self) {
        // A stun is short: spin for a while (the controller's core has nothing else to do) before
        // sleeping on the condition variable, whose wake-up alone costs tens of microseconds here.
        let spin_until = Instant::now() + Duration::from_micros(500);
        while Instant::now() < spin_until {
            if self.ctl.parked_now.load(Ordering::Acquire)
                >= self.ctl.alive_now.load(Ordering::Acquire)
            {
                return;
            }
            std::hint::spin_loop();
        }
        let mut g = self.ctl.lock();
        while g.parked < g.alive {
            g = self.ctl.to_ctl.wait(g).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Saves every vCPU: on their threads (in parallel) once started, directly before.
    fn request_saves(&mut self) {
        if self.threads.is_empty() {
            return;
        }
        let mut g = self.ctl.lock();
        g.saves = (0..self.layout.vcpus).map(|_| None).collect();
        g.cmd = Cmd::Save;
        drop(g);
        self.ctl.to_vcpus.notify_all();
    }

    fn collect_saves(&mut self) -> Result<Vec<VcpuState>, VmError> {
        if self.threads.is_empty() {
            return self
                .idle_vcpus
                .iter_mut()
                .map(|v| v.save_state().map_err(VmError::from))
                .collect();
        }
        let mut g = self.ctl.lock();
        while g.saves.iter().any(Option::is_none) {
            g = self.ctl.to_ctl.wait(g).unwrap_or_else(|p| p.into_inner());
        }
        let saves = std::mem::take(&mut g.saves);
        g.cmd = Cmd::Run; // parked threads wait for the pause flag to drop
        drop(g);
        saves
            .into_iter()
            .enumerate()
            .map(|(i, s)| match s {
                Some(Ok(state)) => Ok(state),
                Some(Err(reason)) => Err(VmError::Vcpu {
                    vcpu: i as u8,
                    reason,
                }),
                None => Err(VmError::Vcpu {
                    vcpu: i as u8,
                    reason: "state was not saved".into(),
                }),
            })
            .collect()
    }

    fn capture_inner(&mut self, into: &mut Capture, deferred: bool) -> Result<(), VmError> {
        let t0 = Instant::now();
        let fail = self.fail_next.take();
        if self.stun_snapshots {
            // SAFETY: every vCPU is parked (the callers check `paused`), so guest memory is quiescent.
            self.stun_snapshot = Some(unsafe { self.ram.as_slice() }.to_vec());
        }
        self.dirty.harvest(&self.kvm_vm, &self.ram)?;
        let t_harvest = t0.elapsed();
        self.request_saves();
        if fail == Some(FailPoint::AfterHarvest) {
            let _ = self.collect_saves();
            return Err(VmError::Injected(FailPoint::AfterHarvest));
        }
        into.ranges = MemoryRangeTable::from_bitmap(self.dirty.harvested());
        if deferred && self.cow.is_some() && !self.threads.is_empty() {
            if fail == Some(FailPoint::MidCopy) {
                let _ = self.collect_saves();
                return Err(VmError::Injected(FailPoint::MidCopy));
            }
            let t1 = Instant::now();
            let dirty = &self.dirty;
            let armed = match self.cow.as_mut() {
                Some(cow) => cow.arm(&into.ranges, &mut into.pages, &|p| dirty.is_hot(p)),
                None => Ok(()),
            };
            self.pre_protect_pages = match &armed {
                Ok(()) => self.pre_protect_pages,
                Err(_) => 0,
            };
            match armed {
                Ok(()) => return self.capture_write_protect(into, t0, t_harvest, t1.elapsed()),
                Err(e) => {
                    // Nothing stays protected; copy inside the stun from now on.
                    tracing::warn!(error = %e, "copy after resume failed; copying inside the stun from now on");
                    self.cow = None;
                }
            }
        }
        let t1 = Instant::now();
        into.pages.clear();
        let total_pages = into.ranges.page_count() as usize;
        into.pages.reserve(total_pages * PAGE_SIZE);
        // SAFETY: every vCPU is parked and no device request is in flight, so guest memory is quiescent;
        // the ranges come from a bitmap sized to this memory.
        let mem = unsafe { self.ram.as_slice() };
        let mut copied = 0usize;
        for r in into.ranges.ranges() {
            let start = r.first_page as usize * PAGE_SIZE;
            let len = r.pages as usize * PAGE_SIZE;
            if fail == Some(FailPoint::MidCopy) && copied * 2 >= total_pages {
                let _ = self.collect_saves();
                return Err(VmError::Injected(FailPoint::MidCopy));
            }
            into.pages.extend_from_slice(&mem[start..start + len]);
            copied += r.pages as usize;
        }
        let t_copy = t1.elapsed();
        let t2 = Instant::now();
        let vcpus = self.collect_saves()?;
        let vcpu_wait = t2.elapsed();
        self.dirty.commit(&self.kvm_vm)?;
        // Nothing can fail from here on: take the epoch's output out of the devices.
        self.devices
            .take_epoch_output(&mut into.console, &mut into.disk_writes);
        into.state = Some(VmState {
            mem_size: self.layout.mem_size,
            vcpus,
            devices: self.devices.save(),
            exit: self.ctl.lock().exit.clone(),
        });
        into.timing = CaptureTiming {
            harvest: t_harvest,
            copy: t_copy,
            vcpu_wait,
            total: t0.elapsed(),
            ..CaptureTiming::default()
        };
        Ok(())
    }

    /// The rest of a capture with copy after resume: write-protect the harvested pages instead of
    /// copying them.
    fn capture_write_protect(
        &mut self,
        into: &mut Capture,
        t0: Instant,
        t_harvest: Duration,
        t_wp: Duration,
    ) -> Result<(), VmError> {
        let t2 = Instant::now();
        let vcpus = self.collect_saves();
        let vcpu_wait = t2.elapsed();
        let vcpus = match vcpus {
            Ok(v) => v,
            Err(e) => {
                // Nothing was copied: release the protection (the copies are dropped with the epoch).
                if let Some(cow) = self.cow.as_mut() {
                    let _ = cow.finish(&mut Vec::new());
                }
                return Err(e);
            }
        };
        let hot = self
            .cow
            .as_ref()
            .map_or((0, Duration::ZERO), Cow::last_hot_copy);
        // From here on nothing fails: the protected pages hold the epoch's memory until they are copied.
        if let Err(e) = self.dirty.commit(&self.kvm_vm) {
            if let Some(cow) = self.cow.as_mut() {
                let _ = cow.finish(&mut Vec::new());
            }
            return Err(e.into());
        }
        self.devices
            .take_epoch_output(&mut into.console, &mut into.disk_writes);
        into.state = Some(VmState {
            mem_size: self.layout.mem_size,
            vcpus,
            devices: self.devices.save(),
            exit: self.ctl.lock().exit.clone(),
        });
        into.timing = CaptureTiming {
            harvest: t_harvest,
            copy: Duration::ZERO,
            vcpu_wait,
            total: t0.elapsed(),
            write_protect: t_wp,
            wp_faults: 0,
            copy_after_resume: true,
            pre_protected: self.cow.as_ref().map_or(0, Cow::last_pre_protected),
            pre_faults: self.cow.as_ref().map_or(0, Cow::take_pre_faults),
            hot_copied: hot.0,
            hot_copy: hot.1,
        };
        self.pre_protect_backoff(into.timing.pre_protected, into.timing.pre_faults);
        Ok(())
    }
}

impl Vm {
    /// Initial sync: captures *while the guest runs* the pages written since the previous harvest — or,
    /// with `all`, every non-zero page (a replica starts from zero memory) — plus the block writes logged
    /// so far and, if asked, a chunk of the disk. The result has no state: it is not a consistent
    /// checkpoint, only a step that brings a replica's memory and disk close to the guest's; whatever the
    /// guest changes meanwhile is dirty again and travels in a later step. Dirty logging is re-armed before
    /// the pages are read, so no write can fall between two steps. Pages are read with volatile copies,
    /// since the guest may be writing them.
    pub fn capture_live(
        &mut self,
        into: &mut Capture,
        all: bool,
        disk_chunk: Option<(u64, u64)>,
    ) -> Result<u64, VmError> {
        // Clearing KVM's log below would leave pre-protected pages outside any later job.
        self.disarm();
        self.dirty.harvest(&self.kvm_vm, &self.ram)?;
        self.dirty.commit(&self.kvm_vm)?;
        let bitmap: Vec<u64> = if all {
            self.nonzero_pages()
        } else {
            self.dirty.harvested().to_vec()
        };
        into.ranges = MemoryRangeTable::from_bitmap(&bitmap);
        into.pages.clear();
        into.pages
            .resize(into.ranges.page_count() as usize * PAGE_SIZE, 0);
        let mut offset = 0usize;
        for r in into.ranges.ranges() {
            let len = r.pages as usize * PAGE_SIZE;
            self.ram
                .read_volatile_slice(
                    &mut into.pages[offset..offset + len],
                    r.first_page * PAGE_SIZE as u64,
                )
                .map_err(|e| VmError::Vcpu {
                    vcpu: 0,
                    reason: format!("reading guest memory: {e}"),
                })?;
            offset += len;
        }
        let (off, len) = disk_chunk.unwrap_or((0, 0));
        let disk = self
            .devices
            .take_writes_and_chunk(off, len, &mut into.disk_writes)
            .map_err(|e| {
                VmError::Device(DeviceError::Disk {
                    path: self.disk.clone().unwrap_or_default(),
                    source: e,
                })
            })?;
        into.console.clear();
        into.state = None;
        Ok(disk)
    }

    /// Bitmap of the pages that are not all zero, read while the guest may run.
    fn nonzero_pages(&self) -> Vec<u64> {
        let pages = self.ram.pages() as usize;
        let mut bitmap = vec![0u64; pages.div_ceil(64)];
        let mut page = [0u8; PAGE_SIZE];
        for p in 0..pages {
            let addr = (p * PAGE_SIZE) as u64;
            if self.ram.read_volatile_slice(&mut page, addr).is_err()
                || page.iter().any(|&b| b != 0)
            {
                bitmap[p / 64] |= 1 << (p % 64);
            }
        }
        bitmap
    }

    /// Disk size in bytes (0 without a disk).
    pub fn disk_bytes(&self) -> u64 {
        self.devices.disk_bytes()
    }

    /// A handle that takes point-in-time copies of the disk while the VM runs, wherever the VM moves
    /// (into an epoch thread, a solo-output thread); `None` without a disk.
    pub fn disk_handle(&self) -> Option<DiskHandle> {
        self.devices.blk.as_ref()?;
        Some(DiskHandle(Arc::clone(&self.devices)))
    }

    /// Whether the vCPU threads are running (started and not paused).
    pub fn is_running(&self) -> bool {
        !self.threads.is_empty() && !self.paused
    }
}

impl Pausable for Vm {
    fn pause(&mut self) -> Result<(), VmError> {
        if self.paused {
            return Ok(());
        }
        self.ctl.request_pause();
        self.wait_parked();
        self.paused = true;
        Ok(())
    }

    fn resume(&mut self) -> Result<(), VmError> {
        if self.threads.is_empty() {
            return Err(VmError::NotStarted);
        }
        let mut g = self.ctl.lock();
        if g.exit.is_some() {
            // An ended guest stays parked; resuming it is a no-op.
            return Ok(());
        }
        g.cmd = Cmd::Run;
        self.ctl.pause.store(false, Ordering::SeqCst);
        drop(g);
        self.ctl.to_vcpus.notify_all();
        self.paused = false;
        Ok(())
    }
}

impl Snapshottable for Vm {
    fn capture(&mut self, into: &mut Capture) -> Result<(), VmError> {
        if !self.paused {
            return Err(VmError::NotPaused("a capture"));
        }
        if let Some(cow) = self.cow.as_mut() {
            cow.finish(&mut Vec::new())?;
        }
        self.disarm();
        let r = self.capture_inner(into, false);
        if r.is_err() {
            self.dirty.put_back();
        }
        r
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if self.threads.is_empty() {
            return;
        }
        self.ctl.request_pause();
        {
            let mut g = self.ctl.lock();
            g.cmd = Cmd::Stop;
        }
        self.ctl.to_vcpus.notify_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

static EXIT_WARNED: AtomicU8 = AtomicU8::new(0);

/// The body of one vCPU thread. A panic in the loop (a bug) must not leave the controller waiting for a
/// vCPU that will never park: the guest is recorded as crashed and the thread stays parked as a husk that
/// answers every save request with an error until it is told to stop.
fn vcpu_thread(vcpu: KvmVcpu, ctl: &Control, devices: &Devices, ram: &GuestRam) {
    let index = vcpu.index();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        vcpu_loop(vcpu, ctl, devices, ram)
    }));
    if let Err(panic) = result {
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".to_owned());
        let reason = format!("vCPU thread panicked: {what}");
        tracing::error!(vcpu = index, %reason);
        ctl.record_exit(GuestExit::Crash {
            vcpu: index,
            reason: reason.clone(),
        });
        // A husk: parked for good, every save request fails with the reason, leaves on stop.
        park(index, ctl, &mut || Err(reason.clone()), false);
    }
}

/// What a triple fault at `rip` was, for the operator: `#UD at 0x4001a3` when the instruction there is
/// `ud2`, `#PF at 0x… (address 0x…)` when CR2 holds a fault address, else `fatal exception at 0x…`.
fn crash_reason(regs: Option<(u64, u64)>, ram: &GuestRam) -> String {
    let Some((rip, cr2)) = regs else {
        return "fatal exception (triple fault)".into();
    };
    let mut insn = [0u8; 2];
    let ud2 = ram.read_volatile_slice(&mut insn, rip).is_ok() && insn == [0x0f, 0x0b];
    if ud2 {
        format!("#UD at {rip:#x}")
    } else if cr2 != 0 {
        format!("#PF at {rip:#x} (address {cr2:#x})")
    } else {
        format!("fatal exception at {rip:#x}")
    }
}

/// The loop of one vCPU thread.
fn vcpu_loop(mut vcpu: KvmVcpu, ctl: &Control, devices: &Devices, ram: &GuestRam) {
    let index = vcpu.index();
    let span = tracing::debug_span!("vcpu", index);
    let _enter = span.enter();
    let _binding = vcpu.bind_thread();
    // Set after a port-I/O exit was handled: the access completes only at the next KVM_RUN, so a vCPU that
    // parks now must complete it first (see `vstate`). A vCPU kicked out of guest mode has nothing pending.
    let mut io_pending = false;
    loop {
        if ctl.pause.load(Ordering::SeqCst) {
            if io_pending {
                if let Err(e) = vcpu.complete_pending_io() {
                    ctl.record_exit(GuestExit::Crash {
                        vcpu: index,
                        reason: e.to_string(),
                    });
                }
                io_pending = false;
            }
            if !park(
                index,
                ctl,
                &mut || vcpu.save_state().map_err(|e| e.to_string()),
                true,
            ) {
                break;
            }
            continue;
        }
        // Announce KVM_RUN before the last look at the pause flag (see the module docs).
        let running = &ctl.in_run[usize::from(index)];
        running.store(true, Ordering::SeqCst);
        if ctl.pause.load(Ordering::SeqCst) {
            running.store(false, Ordering::SeqCst);
            continue;
        }
        let result = vcpu.run();
        running.store(false, Ordering::SeqCst);
        io_pending = matches!(result, Ok(Exit::IoOut(..) | Exit::IoIn(..)));
        let action = match result {
            Ok(Exit::Interrupted) => {
                vcpu.set_immediate_exit(false);
                continue;
            }
            Ok(Exit::IoOut(port, data)) => devices.io_out(port, data, ram),
            Ok(Exit::IoIn(port, data)) => devices.io_in(port, data),
            Ok(Exit::Shutdown) => {
                // The CPL3 ABI has no IDT: a fatal exception triple-faults. Say which, where possible.
                let reason = crash_reason(vcpu.fault_regs(), ram);
                ctl.record_exit(GuestExit::Crash {
                    vcpu: index,
                    reason,
                });
                continue;
            }
            Ok(exit) => {
                ctl.record_exit(GuestExit::Crash {
                    vcpu: index,
                    reason: format!("{exit:?}"),
                });
                continue;
            }
            Err(e) => {
                ctl.record_exit(GuestExit::Crash {
                    vcpu: index,
                    reason: e.to_string(),
                });
                continue;
            }
        };
        match action {
            IoAction::Continue => {}
            IoAction::Exit(code) => ctl.record_exit(GuestExit::Code(code)),
            IoAction::Unhandled => {
                if EXIT_WARNED.fetch_add(1, Ordering::Relaxed) < 8 {
                    tracing::warn!(vcpu = index, "guest accessed an unhandled port");
                }
            }
        }
    }
}

/// Parks a paused vCPU and obeys commands: `save` answers save requests; with `may_resume` the vCPU
/// leaves when the pause ends (returns `true`), otherwise only on stop (a dead vCPU's husk). Returns
/// `false` when told to stop.
fn park(
    index: u8,
    ctl: &Control,
    save: &mut dyn FnMut() -> Result<VcpuState, String>,
    may_resume: bool,
) -> bool {
    let index = usize::from(index);
    let mut g = ctl.lock();
    g.parked += 1;
    ctl.parked_now.store(g.parked, Ordering::Release);
    ctl.to_ctl.notify_all();
    loop {
        match g.cmd {
            Cmd::Stop => {
                g.parked -= 1;
                g.alive -= 1;
                ctl.parked_now.store(g.parked, Ordering::Release);
                ctl.alive_now.store(g.alive, Ordering::Release);
                return false;
            }
            Cmd::Save if matches!(g.saves.get(index), Some(None)) => {
                drop(g);
                let saved = save();
                g = ctl.lock();
                if let Some(slot) = g.saves.get_mut(index) {
                    *slot = Some(saved);
                }
                ctl.to_ctl.notify_all();
                continue;
            }
            Cmd::Run if may_resume && !ctl.pause.load(Ordering::SeqCst) => {
                g.parked -= 1;
                ctl.parked_now.store(g.parked, Ordering::Release);
                drop(g);
                if ctl.boost.load(Ordering::Relaxed) {
                    // Back to the ordinary scheduler before the guest runs again.
                    let _ = crate::cpu::set_boost(0, false);
                }
                return true;
            }
            _ => {}
        }
        g = ctl.to_vcpus.wait(g).unwrap_or_else(|p| p.into_inner());
    }
}

/// See [`Vm::disk_handle`].
#[derive(Clone, Debug)]
pub struct DiskHandle(Arc<Devices>);

impl DiskHandle {
    /// Copies the disk, crash-consistent, to `dst`, the unlocked pass paced at `max_bytes_per_s`
    /// ([`Devices::snapshot_disk`]).
    pub fn snapshot_to(
        &self,
        dst: &std::path::Path,
        max_bytes_per_s: Option<u64>,
    ) -> std::io::Result<crate::devices::DiskSnapshot> {
        self.0
            .snapshot_disk(dst, max_bytes_per_s)?
            .ok_or_else(|| std::io::Error::other("the VM has no disk"))
    }
}
