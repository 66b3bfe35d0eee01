//! Every KVM ioctl of the statepoint engine lives in this module (Firecracker's `vstate` rule): the rest of
//! the crate sees [`KvmVm`] and [`KvmVcpu`], never a raw file descriptor.
//!
//! # Dirty logging
//! The single memory slot is registered with `KVM_MEM_LOG_DIRTY_PAGES`. When the kernel offers
//! `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` we enable it: `KVM_GET_DIRTY_LOG` then only *reads* the log and
//! `KVM_CLEAR_DIRTY_LOG` re-arms it for exactly the pages we copied. That gives us two things: the epoch
//! engine can look at the dirty count mid-epoch for free (to end an epoch early), and a capture that fails
//! before its clear leaves the kernel's log intact. Without the capability `KVM_GET_DIRTY_LOG` clears as it
//! reads, and the caller must put the bits back itself on failure (see `dirty::DirtyTracker`).
//!
//! # Kicking a vCPU out of `KVM_RUN`
//! A vCPU thread spends its life inside the `KVM_RUN` ioctl. To stun it, the controller sends the thread a
//! real-time signal ([`kick_signal`]). The handler does one thing: it sets `kvm_run.immediate_exit = 1`
//! through a thread-local pointer to the thread's own `kvm_run` page. Whatever the thread was doing, it
//! then leaves `KVM_RUN` with `EINTR`: if the signal arrives while the guest runs, the kernel exits to
//! deliver it; if it arrives while the thread is in user space handling an exit, the next `KVM_RUN`
//! returns at once because `immediate_exit` is set. No wake-up can be lost between "check the pause
//! flag" and "enter the guest".
//!
//! A vCPU that left on a port-I/O exit has the access only half done (an `in` has not yet received its
//! data). Before its state is saved, the vCPU therefore runs `KVM_RUN` once more with `immediate_exit = 1`
//! ([`KvmVcpu::complete_pending_io`]): the kernel completes the access and returns without entering the
//! guest.

use std::cell::Cell;
use std::os::fd::AsRawFd;
use std::sync::Once;

use kvm_bindings::{
    kvm_clear_dirty_log, kvm_clear_dirty_log__bindgen_ty_1, kvm_debugregs, kvm_dirty_log,
    kvm_dirty_log__bindgen_ty_1, kvm_enable_cap, kvm_fpu, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_regs, kvm_run, kvm_segment, kvm_sregs, kvm_userspace_memory_region,
    kvm_vcpu_events, kvm_xcrs, CpuId, Msrs, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
    KVM_MAX_CPUID_ENTRIES, KVM_MEM_LOG_DIRTY_PAGES, KVM_MP_STATE_RUNNABLE,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};
use vmm_sys_util::errno;
use vmm_sys_util::ioctl::ioctl_with_ref;
use vmm_sys_util::{ioctl_iow_nr, ioctl_iowr_nr};

use crate::PAGE_SIZE;

const KVMIO: u32 = 0xAE;
ioctl_iow_nr!(KVM_GET_DIRTY_LOG, KVMIO, 0x42, kvm_dirty_log);
ioctl_iowr_nr!(KVM_CLEAR_DIRTY_LOG, KVMIO, 0xc0, kvm_clear_dirty_log);

/// `KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE` from `linux/kvm.h`.
const MANUAL_PROTECT_ENABLE: u64 = 1;

/// Errors of the KVM layer; each names the ioctl that failed.
#[derive(Debug, thiserror::Error)]
pub enum VstateError {
    /// `/dev/kvm` could not be opened.
    #[error("cannot open /dev/kvm: {0}")]
    OpenKvm(#[source] errno::Error),
    /// A KVM ioctl failed.
    #[error("{ioctl} failed: {source}")]
    Ioctl {
        /// The ioctl's name.
        ioctl: &'static str,
        /// The kernel's error.
        #[source]
        source: errno::Error,
    },
    /// A vCPU state did not fit back into the vCPU.
    #[error("KVM_SET_MSRS accepted {set} of {expected} MSRs")]
    PartialMsrs {
        /// How many MSRs the kernel accepted.
        set: usize,
        /// How many were given.
        expected: usize,
    },
    /// The kick signal handler could not be installed.
    #[error("cannot install the vCPU kick signal handler: {0}")]
    Signal(#[source] errno::Error),
}

fn ioctl_err(ioctl: &'static str) -> impl FnOnce(errno::Error) -> VstateError {
    move |source| VstateError::Ioctl { ioctl, source }
}

type Result<T> = std::result::Result<T, VstateError>;

/// The process-wide KVM handle plus what we learned from it once.
#[derive(Debug)]
pub struct KvmSystem {
    kvm: Kvm,
    manual_protect: bool,
    cpuid: CpuId,
}

impl KvmSystem {
    /// Opens `/dev/kvm` and reads the supported CPUID.
    pub fn open() -> Result<Self> {
        let kvm = Kvm::new().map_err(VstateError::OpenKvm)?;
        let manual = kvm.check_extension_raw(u64::from(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2));
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(ioctl_err("KVM_GET_SUPPORTED_CPUID"))?;
        Ok(KvmSystem {
            kvm,
            manual_protect: manual & (MANUAL_PROTECT_ENABLE as i32) != 0,
            cpuid,
        })
    }

    /// Whether `/dev/kvm` can be opened on this machine (used by tests to print `SKIPPED`).
    pub fn available() -> std::result::Result<(), String> {
        Kvm::new().map(|_| ()).map_err(|e| format!("/dev/kvm: {e}"))
    }

    /// Creates a VM with one memory slot `[0, mem_size)` backed by `host_addr`, dirty logging on.
    ///
    /// # Safety
    /// `host_addr` must point to `mem_size` bytes of mapped memory that outlive the VM.
    /// `manual_protect` asks for `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` (used when the kernel has it).
    pub unsafe fn create_vm(
        &self,
        host_addr: *mut u8,
        mem_size: u64,
        manual_protect: bool,
    ) -> Result<KvmVm> {
        let vm = self.kvm.create_vm().map_err(ioctl_err("KVM_CREATE_VM"))?;
        let manual_protect = if manual_protect && self.manual_protect {
            let cap = kvm_enable_cap {
                cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
                args: [MANUAL_PROTECT_ENABLE, 0, 0, 0],
                ..Default::default()
            };
            vm.enable_cap(&cap).is_ok()
        } else {
            false
        };
        // The in-kernel LAPIC is part of every vCPU's saved state; it needs the in-kernel irqchip.
        vm.create_irq_chip()
            .map_err(ioctl_err("KVM_CREATE_IRQCHIP"))?;
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: KVM_MEM_LOG_DIRTY_PAGES,
            guest_phys_addr: 0,
            memory_size: mem_size,
            userspace_addr: host_addr as u64,
        };
        // SAFETY: the caller guarantees the mapping is valid for `mem_size` bytes for the VM's lifetime.
        unsafe { vm.set_user_memory_region(region) }
            .map_err(ioctl_err("KVM_SET_USER_MEMORY_REGION"))?;
        let msr_index_list = self
            .kvm
            .get_msr_index_list()
            .map_err(ioctl_err("KVM_GET_MSR_INDEX_LIST"))?
            .as_slice()
            .to_vec();
        Ok(KvmVm {
            vm,
            mem_size,
            manual_protect,
            cpuid: self.cpuid.clone(),
            msr_index_list,
            run_size: self.kvm.get_vcpu_mmap_size().unwrap_or(0),
        })
    }
}

/// A KVM VM with one dirty-logged memory slot.
#[derive(Debug)]
pub struct KvmVm {
    vm: VmFd,
    mem_size: u64,
    manual_protect: bool,
    cpuid: CpuId,
    msr_index_list: Vec<u32>,
    run_size: usize,
}

impl KvmVm {
    /// Whether `KVM_GET_DIRTY_LOG` leaves the log armed until [`KvmVm::clear_dirty_log`].
    pub fn manual_protect(&self) -> bool {
        self.manual_protect
    }

    /// Size of the `kvm_run` mapping (for diagnostics).
    pub fn run_size(&self) -> usize {
        self.run_size
    }

    /// Number of u64 words in this VM's dirty bitmap.
    pub fn bitmap_words(&self) -> usize {
        (self.mem_size as usize / PAGE_SIZE).div_ceil(64)
    }

    /// `KVM_GET_DIRTY_LOG` into a caller-owned buffer of [`KvmVm::bitmap_words`] words (no allocation on
    /// the stun path). In manual-protect mode this only reads the log.
    pub fn get_dirty_log(&self, bitmap: &mut [u64]) -> Result<()> {
        assert_eq!(bitmap.len(), self.bitmap_words(), "dirty bitmap size");
        let log = kvm_dirty_log {
            slot: 0,
            padding1: 0,
            __bindgen_anon_1: kvm_dirty_log__bindgen_ty_1 {
                dirty_bitmap: bitmap.as_mut_ptr().cast(),
            },
        };
        // SAFETY: `self.vm` is a VM fd; the bitmap holds one bit per page of slot 0 and outlives the call.
        let ret = unsafe { ioctl_with_ref(&self.vm, KVM_GET_DIRTY_LOG(), &log) };
        if ret != 0 {
            return Err(ioctl_err("KVM_GET_DIRTY_LOG")(errno::Error::last()));
        }
        Ok(())
    }

    /// `KVM_CLEAR_DIRTY_LOG` for every page set in `bitmap` (re-arms write protection on them). A no-op
    /// without manual protect, where `KVM_GET_DIRTY_LOG` already cleared the log.
    pub fn clear_dirty_log(&self, bitmap: &mut [u64]) -> Result<()> {
        if !self.manual_protect {
            return Ok(());
        }
        assert_eq!(bitmap.len(), self.bitmap_words(), "dirty bitmap size");
        let pages = self.mem_size / PAGE_SIZE as u64;
        let clear = kvm_clear_dirty_log {
            slot: 0,
            num_pages: u32::try_from(pages).unwrap_or(u32::MAX),
            first_page: 0,
            __bindgen_anon_1: kvm_clear_dirty_log__bindgen_ty_1 {
                dirty_bitmap: bitmap.as_mut_ptr().cast(),
            },
        };
        // SAFETY: `self.vm` is a VM fd; the bitmap covers `num_pages` pages and outlives the call.
        let ret = unsafe { ioctl_with_ref(&self.vm, KVM_CLEAR_DIRTY_LOG(), &clear) };
        if ret != 0 {
            return Err(ioctl_err("KVM_CLEAR_DIRTY_LOG")(errno::Error::last()));
        }
        Ok(())
    }

    /// Creates vCPU `index` with the host's supported CPUID and discovers which MSRs it can save.
    pub fn create_vcpu(&self, index: u8) -> Result<KvmVcpu> {
        let fd = self
            .vm
            .create_vcpu(u64::from(index))
            .map_err(ioctl_err("KVM_CREATE_VCPU"))?;
        fd.set_cpuid2(&self.cpuid)
            .map_err(ioctl_err("KVM_SET_CPUID2"))?;
        // Keep only the MSRs this vCPU accepts one by one (some listed ones fail on PVM).
        let mut saved = Vec::with_capacity(self.msr_index_list.len());
        for &index in &self.msr_index_list {
            let mut one = Msrs::from_entries(&[kvm_msr_entry {
                index,
                ..Default::default()
            }])
            .expect("one MSR entry fits");
            if fd.get_msrs(&mut one).map_err(ioctl_err("KVM_GET_MSRS"))? == 1 {
                saved.push(kvm_msr_entry {
                    index,
                    ..Default::default()
                });
            }
        }
        let msrs = Msrs::from_entries(&saved).expect("MSR list fits in a kvm_msrs");
        Ok(KvmVcpu { fd, msrs, index })
    }
}

/// The complete architectural state of one vCPU, as plain serde data.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VcpuState {
    /// vCPU index.
    pub index: u8,
    /// General-purpose registers, rip, rflags.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers, EFER, APIC base.
    pub sregs: kvm_sregs,
    /// x87 and SSE state (`kvm_fpu`, kept as its raw bytes: kvm-bindings has no serde for it).
    pub fpu: Vec<u8>,
    /// Extended control registers.
    pub xcrs: kvm_xcrs,
    /// Local APIC registers.
    pub lapic: kvm_lapic_state,
    /// Model-specific registers (every MSR this vCPU accepts).
    pub msrs: Vec<kvm_msr_entry>,
    /// Multiprocessing state (runnable, halted, …).
    pub mp_state: kvm_mp_state,
    /// Pending exceptions, interrupts, NMIs.
    pub events: kvm_vcpu_events,
    /// Debug registers.
    pub debug_regs: kvm_debugregs,
}

impl VcpuState {
    /// Instruction pointer (for diagnostics).
    pub fn rip(&self) -> u64 {
        self.regs.rip
    }
}

fn fpu_to_bytes(fpu: &kvm_fpu) -> Vec<u8> {
    // SAFETY: `kvm_fpu` is a plain `repr(C)` struct of integers and byte arrays with no padding-sensitive
    // invariants; reading its bytes is sound.
    unsafe {
        std::slice::from_raw_parts(
            (fpu as *const kvm_fpu).cast::<u8>(),
            std::mem::size_of::<kvm_fpu>(),
        )
    }
    .to_vec()
}

fn fpu_from_bytes(bytes: &[u8]) -> Option<kvm_fpu> {
    if bytes.len() != std::mem::size_of::<kvm_fpu>() {
        return None;
    }
    let mut fpu = kvm_fpu::default();
    // SAFETY: the length matches and every bit pattern is a valid `kvm_fpu` (integers and byte arrays).
    unsafe {
        std::ptr::copy_nonoverlapping(
            bytes.as_ptr(),
            (&mut fpu as *mut kvm_fpu).cast::<u8>(),
            bytes.len(),
        )
    };
    Some(fpu)
}

/// Where a vCPU stopped.
#[derive(Debug, PartialEq, Eq)]
pub enum Exit<'a> {
    /// `out` to `port`; `data` is what the guest wrote.
    IoOut(u16, &'a [u8]),
    /// `in` from `port`; fill `data`.
    IoIn(u16, &'a mut [u8]),
    /// The kick signal interrupted `KVM_RUN` (or `immediate_exit` was set).
    Interrupted,
    /// The guest triple-faulted (the CPL3 ABI has no IDT: every exception ends here).
    Shutdown,
    /// The guest executed `hlt` (not possible at CPL3; reported as a crash).
    Hlt,
    /// Any other exit, by name, for the error message.
    Other(String),
}

thread_local! {
    /// The `kvm_run` page of the vCPU owned by this thread, for the kick signal handler.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// The real-time signal used to kick vCPU threads out of `KVM_RUN`.
pub fn kick_signal() -> i32 {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // `try_with` fails only while the thread-local is being destroyed; there is nothing to kick then.
    let _ = KVM_RUN.try_with(|run| {
        let run = run.get();
        if !run.is_null() {
            // SAFETY: the pointer was set by this thread from its own live `VcpuFd` and is cleared before
            // that fd is dropped; a volatile byte store is async-signal-safe.
            unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
        }
    });
    std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
}

/// Installs the kick handler once per process.
pub fn install_kick_handler() -> Result<()> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = vmm_sys_util::signal::register_signal_handler(kick_signal(), kick_handler)
            .map_err(VstateError::Signal);
    });
    result
}

/// While alive, the kick signal reaches this thread's vCPU; dropping it forgets the `kvm_run` pointer.
#[derive(Debug)]
pub struct KickBinding(std::marker::PhantomData<*const ()>);

impl Drop for KickBinding {
    fn drop(&mut self) {
        let _ = KVM_RUN.try_with(|c| c.set(std::ptr::null_mut()));
    }
}

/// One vCPU.
#[derive(Debug)]
pub struct KvmVcpu {
    fd: VcpuFd,
    /// MSR indices this vCPU accepts; reused as the buffer of every save.
    msrs: Msrs,
    index: u8,
}

impl KvmVcpu {
    /// This vCPU's index.
    pub fn index(&self) -> u8 {
        self.index
    }

    /// Registers this vCPU's `kvm_run` page for the kick handler of the *calling* thread (the thread that
    /// runs the vCPU). The returned guard clears the registration when dropped; declare it after the vCPU
    /// so that it is dropped first, also when unwinding.
    #[must_use = "the binding ends when the guard is dropped"]
    pub fn bind_thread(&mut self) -> KickBinding {
        let run: *mut kvm_run = self.fd.get_kvm_run();
        KVM_RUN.with(|c| c.set(run));
        KickBinding(std::marker::PhantomData)
    }

    /// Sets or clears `kvm_run.immediate_exit`.
    pub fn set_immediate_exit(&mut self, on: bool) {
        self.fd.set_kvm_immediate_exit(u8::from(on));
    }

    /// `KVM_RUN` until the next exit.
    pub fn run(&mut self) -> Result<Exit<'_>> {
        match self.fd.run() {
            Ok(VcpuExit::IoOut(port, data)) => Ok(Exit::IoOut(port, data)),
            Ok(VcpuExit::IoIn(port, data)) => Ok(Exit::IoIn(port, data)),
            Ok(VcpuExit::Shutdown) => Ok(Exit::Shutdown),
            Ok(VcpuExit::Hlt) => Ok(Exit::Hlt),
            Ok(other) => Ok(Exit::Other(format!("{other:?}"))),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                Ok(Exit::Interrupted)
            }
            Err(e) => Err(ioctl_err("KVM_RUN")(e)),
        }
    }

    /// Completes a half-done port-I/O exit without entering the guest (see the module docs).
    pub fn complete_pending_io(&mut self) -> Result<()> {
        self.set_immediate_exit(true);
        let r = match self.fd.run() {
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Ok(()),
            Err(e) => Err(ioctl_err("KVM_RUN(immediate_exit)")(e)),
            Ok(_) => Ok(()),
        };
        self.set_immediate_exit(false);
        r
    }

    /// Sets the boot state: long mode at CPL3 (see `layout`).
    pub fn set_boot_state(&self, sregs: &BootSregs, regs: &kvm_regs) -> Result<()> {
        let mut s = self.fd.get_sregs().map_err(ioctl_err("KVM_GET_SREGS"))?;
        s.cs = sregs.cs;
        s.ds = sregs.ds;
        s.es = sregs.ds;
        s.fs = sregs.ds;
        s.gs = sregs.ds;
        s.ss = sregs.ss;
        s.gdt.base = sregs.gdt_base;
        s.gdt.limit = sregs.gdt_limit;
        s.cr0 = sregs.cr0;
        s.cr3 = sregs.cr3;
        s.cr4 = sregs.cr4;
        s.efer = sregs.efer;
        self.fd.set_sregs(&s).map_err(ioctl_err("KVM_SET_SREGS"))?;
        let fpu = kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            ..Default::default()
        };
        self.fd.set_fpu(&fpu).map_err(ioctl_err("KVM_SET_FPU"))?;
        // With the in-kernel LAPIC, application processors would wait for INIT/SIPI: every vCPU starts
        // runnable at the entry point instead.
        self.fd
            .set_mp_state(kvm_mp_state {
                mp_state: KVM_MP_STATE_RUNNABLE,
            })
            .map_err(ioctl_err("KVM_SET_MP_STATE"))?;
        self.fd.set_regs(regs).map_err(ioctl_err("KVM_SET_REGS"))
    }

    /// Where the guest stood when it stopped for good (after a `KVM_EXIT_SHUTDOWN`): `rip` and `cr2`, for the
    /// crash report. `None` if the registers cannot be read.
    pub fn fault_regs(&self) -> Option<(u64, u64)> {
        let regs = self.fd.get_regs().ok()?;
        let sregs = self.fd.get_sregs().ok()?;
        Some((regs.rip, sregs.cr2))
    }

    /// Saves the whole vCPU state. Call [`KvmVcpu::complete_pending_io`] first.
    pub fn save_state(&mut self) -> Result<VcpuState> {
        let n = self
            .fd
            .get_msrs(&mut self.msrs)
            .map_err(ioctl_err("KVM_GET_MSRS"))?;
        let msrs = self.msrs.as_slice();
        if n != msrs.len() {
            return Err(VstateError::PartialMsrs {
                set: n,
                expected: msrs.len(),
            });
        }
        Ok(VcpuState {
            index: self.index,
            regs: self.fd.get_regs().map_err(ioctl_err("KVM_GET_REGS"))?,
            sregs: self.fd.get_sregs().map_err(ioctl_err("KVM_GET_SREGS"))?,
            fpu: fpu_to_bytes(&self.fd.get_fpu().map_err(ioctl_err("KVM_GET_FPU"))?),
            xcrs: self.fd.get_xcrs().map_err(ioctl_err("KVM_GET_XCRS"))?,
            lapic: self.fd.get_lapic().map_err(ioctl_err("KVM_GET_LAPIC"))?,
            msrs: msrs.to_vec(),
            mp_state: self
                .fd
                .get_mp_state()
                .map_err(ioctl_err("KVM_GET_MP_STATE"))?,
            events: self
                .fd
                .get_vcpu_events()
                .map_err(ioctl_err("KVM_GET_VCPU_EVENTS"))?,
            debug_regs: self
                .fd
                .get_debug_regs()
                .map_err(ioctl_err("KVM_GET_DEBUGREGS"))?,
        })
    }

    /// Loads a saved state into this (fresh) vCPU. The order follows what KVM needs: registers and
    /// extended control registers before `sregs` (which may enable features they depend on), MSRs before
    /// the LAPIC and events.
    pub fn restore_state(&self, s: &VcpuState) -> Result<()> {
        let fpu = fpu_from_bytes(&s.fpu)
            .ok_or_else(|| ioctl_err("KVM_SET_FPU")(errno::Error::new(libc::EINVAL)))?;
        self.fd
            .set_regs(&s.regs)
            .map_err(ioctl_err("KVM_SET_REGS"))?;
        self.fd
            .set_xcrs(&s.xcrs)
            .map_err(ioctl_err("KVM_SET_XCRS"))?;
        self.fd
            .set_sregs(&s.sregs)
            .map_err(ioctl_err("KVM_SET_SREGS"))?;
        self.fd.set_fpu(&fpu).map_err(ioctl_err("KVM_SET_FPU"))?;
        let msrs = Msrs::from_entries(&s.msrs)
            .map_err(|_| ioctl_err("KVM_SET_MSRS")(errno::Error::new(libc::E2BIG)))?;
        let set = self.fd.set_msrs(&msrs).map_err(ioctl_err("KVM_SET_MSRS"))?;
        if set != s.msrs.len() {
            return Err(VstateError::PartialMsrs {
                set,
                expected: s.msrs.len(),
            });
        }
        self.fd
            .set_mp_state(s.mp_state)
            .map_err(ioctl_err("KVM_SET_MP_STATE"))?;
        self.fd
            .set_lapic(&s.lapic)
            .map_err(ioctl_err("KVM_SET_LAPIC"))?;
        self.fd
            .set_vcpu_events(&s.events)
            .map_err(ioctl_err("KVM_SET_VCPU_EVENTS"))?;
        self.fd
            .set_debug_regs(&s.debug_regs)
            .map_err(ioctl_err("KVM_SET_DEBUGREGS"))
    }

    /// Raw fd, for diagnostics only.
    pub fn raw_fd(&self) -> i32 {
        self.fd.as_raw_fd()
    }
}

/// The segment and control registers of the boot state, computed by `layout`.
#[derive(Clone, Copy, Debug)]
pub struct BootSregs {
    /// Code segment (64-bit, DPL 3).
    pub cs: kvm_segment,
    /// Data segments (DPL 3).
    pub ds: kvm_segment,
    /// Stack segment (DPL 3).
    pub ss: kvm_segment,
    /// GDT base (guest-physical).
    pub gdt_base: u64,
    /// GDT limit.
    pub gdt_limit: u16,
    /// CR0.
    pub cr0: u64,
    /// CR3 (PML4 address).
    pub cr3: u64,
    /// CR4.
    pub cr4: u64,
    /// EFER.
    pub efer: u64,
}
