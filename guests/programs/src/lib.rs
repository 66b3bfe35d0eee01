//! `axrt`: the runtime of the ax guest programs.
//!
//! An ax guest is a static ELF64 executable that the statepoint VMM runs in long mode at CPL3 with IOPL=3,
//! without any kernel (the contract is `docs/guest-abi.md` in the ax repository). This crate is everything
//! such a program needs:
//!
//! - [`entry!`]: defines the ELF entry point `_start`, checks the [`BootInfo`] magic and calls your `main`;
//! - [`BootInfo`]: the block the VMM writes at [`BOOT_INFO_ADDR`] (memory layout, vCPU count, arguments);
//! - the devices: [`console_write`] / [`console`] / [`println!`] (port `0x500`), [`exit`] (port `0x501`),
//!   [`blk_read`] / [`blk_write`] / [`blk_flush`] / [`blk_capacity`] (ports `0x510` / `0x511`);
//! - [`SpinLock`] (the console lock keeps multi-vCPU lines whole), [`fmt_u64`] (decimal without `alloc`),
//!   [`FreeMem`] (a bump allocator over the guest's free memory), [`park`];
//! - the `#[panic_handler]`: prints `panic: <message> at <file>:<line>:<col>` and exits with code
//!   [`PANIC_EXIT_CODE`];
//! - `memcpy`, `memmove`, `memset`, `memcmp` and `bcmp`, which the compiler calls and which no libc provides
//!   here.
//!
//! There is no IDT in the guest: any CPU exception (page fault, #GP, #UD, …) ends the guest as crashed.
#![no_std]

use core::cell::UnsafeCell;
use core::fmt;
use core::ops::{Deref, DerefMut};
use core::sync::atomic::{AtomicBool, Ordering};

/// Guest-physical (= virtual) address of the [`BootInfo`] block.
pub const BOOT_INFO_ADDR: u64 = 0x20_0000;
/// [`BootInfo::magic`]: the bytes `AXBOOT01` read as a little-endian `u64`.
pub const BOOT_MAGIC: u64 = u64::from_le_bytes(*b"AXBOOT01");
/// Number of argument slots in [`BootInfo::args`].
pub const MAX_ARGS: usize = 8;
/// Size of a page (the unit the VMM tracks dirty memory in).
pub const PAGE_SIZE: u64 = 4096;
/// Size of a disk sector.
pub const SECTOR_SIZE: usize = 512;
/// Largest `len` of one block request (1 MiB).
pub const BLK_MAX_LEN: usize = 1 << 20;
/// Size of each vCPU's stack.
pub const STACK_SIZE: u64 = 256 * 1024;
/// Exit code of a guest that panicked.
pub const PANIC_EXIT_CODE: u32 = 101;

/// The I/O ports of the ax devices.
pub mod ports {
    /// Console: `out` 8 bits, one byte of guest output.
    pub const CONSOLE: u16 = 0x500;
    /// Exit: `out` 32 bits, the guest ends with this exit code; every vCPU stops.
    pub const EXIT: u16 = 0x501;
    /// Block device doorbell: `out` 32 bits, guest-physical address of a [`BlkRequest`](crate::BlkRequest).
    pub const BLK_DOORBELL: u16 = 0x510;
    /// Block device capacity: `in` 32 bits, disk size in 512-byte sectors (saturates at `u32::MAX`).
    pub const BLK_CAPACITY: u16 = 0x511;
}

/// Port I/O and the other CPU instructions a guest uses.
pub mod cpu {
    use core::arch::asm;

    /// `out port, al`.
    ///
    /// # Safety
    /// The write must not make a device touch memory the caller does not own (the console and exit ports are
    /// always fine).
    #[inline(always)]
    pub unsafe fn outb(port: u16, value: u8) {
        // SAFETY: the ABI runs guests with IOPL=3, so `out` is allowed at CPL3; the caller vouches for what the
        // device does with the value.
        unsafe {
            asm!("out dx, al", in("dx") port, in("al") value, options(nostack, preserves_flags))
        }
    }

    /// `out port, eax`. The asm is a compiler memory barrier (no `nomem`): memory written before the call is
    /// in place when the device looks at it, and memory the device writes is re-read after it.
    ///
    /// # Safety
    /// The write must not make a device touch memory the caller does not own: for the block doorbell, the
    /// value must be the address of a valid [`BlkRequest`](crate::BlkRequest) whose buffer the caller owns.
    #[inline(always)]
    pub unsafe fn outl(port: u16, value: u32) {
        // SAFETY: as in `outb`; no `nomem`, so the compiler treats this as reading and writing memory.
        unsafe {
            asm!("out dx, eax", in("dx") port, in("eax") value, options(nostack, preserves_flags))
        }
    }

    /// `in eax, port`.
    ///
    /// # Safety
    /// Reading the port must have no side effect the caller is not prepared for (the ax ports have none).
    #[inline(always)]
    pub unsafe fn inl(port: u16) -> u32 {
        let value: u32;
        // SAFETY: IOPL=3 allows `in` at CPL3; the caller vouches for the port.
        unsafe {
            asm!("in eax, dx", in("dx") port, out("eax") value, options(nostack, preserves_flags))
        }
        value
    }

    /// `pause`: the spin-wait hint.
    #[inline(always)]
    pub fn pause() {
        core::hint::spin_loop();
    }

    /// `rdtsc`: the time-stamp counter (allowed at CPL3 by the ABI).
    #[inline(always)]
    pub fn rdtsc() -> u64 {
        // SAFETY: `rdtsc` only reads the TSC; the ABI leaves CR4.TSD clear so it does not fault at CPL3.
        unsafe { core::arch::x86_64::_rdtsc() }
    }
}

/// The block the VMM writes at [`BOOT_INFO_ADDR`] before starting the vCPUs (read it, do not write it).
#[repr(C)]
#[derive(Debug)]
pub struct BootInfo {
    /// [`BOOT_MAGIC`].
    pub magic: u64,
    /// Bytes of guest memory: `[0, mem_size)` is identity-mapped with 2 MiB pages.
    pub mem_size: u64,
    /// Number of vCPUs; each one starts at `_start` with its index `0..nr_vcpus`.
    pub nr_vcpus: u64,
    /// First free byte after the ELF image, 4 KiB aligned.
    pub free_start: u64,
    /// End of the free memory, which is also the base of the stacks.
    pub free_end: u64,
    /// How many of `args` the VMM set (at most 8); the rest are zero.
    pub nr_args: u64,
    /// Program arguments from the VM definition. By convention 0 means "use the default".
    pub args: [u64; MAX_ARGS],
}

const _: () = assert!(core::mem::size_of::<BootInfo>() == 6 * 8 + MAX_ARGS * 8);

impl BootInfo {
    /// Argument `i`, or 0 if the VMM did not set it.
    pub fn arg(&self, i: usize) -> u64 {
        if i < MAX_ARGS && (i as u64) < self.nr_args {
            self.args[i]
        } else {
            0
        }
    }

    /// Argument `i`, or `default` if it is 0 or unset.
    pub fn arg_or(&self, i: usize, default: u64) -> u64 {
        match self.arg(i) {
            0 => default,
            value => value,
        }
    }

    /// Number of whole 4 KiB pages in `[free_start, free_end)`.
    pub fn free_pages(&self) -> u64 {
        self.free_end.saturating_sub(self.free_start) / PAGE_SIZE
    }

    /// The stack of vCPU `vcpu`: `[mem_size - (vcpu+1)·256 KiB, mem_size - vcpu·256 KiB)`.
    pub fn stack_range(&self, vcpu: u64) -> (u64, u64) {
        let top = self.mem_size - vcpu * STACK_SIZE;
        (top - STACK_SIZE, top)
    }
}

/// Defines the ELF entry point `_start` of a guest program, which calls `$main(vcpu, boot)` on every vCPU.
///
/// `$main` must be a `fn(u64, &'static BootInfo) -> !`: it gets this vCPU's index (`0..boot.nr_vcpus`) and
/// the boot block. It never returns: end the guest with [`exit`], or [`park`] the vCPUs that have nothing to
/// do.
///
/// ```ignore
/// #![no_std]
/// #![no_main]
/// axrt::entry!(main);
/// fn main(vcpu: u64, boot: &'static axrt::BootInfo) -> ! {
///     if vcpu != 0 { axrt::park() }
///     axrt::println!("hello, {} MiB", boot.mem_size >> 20);
///     axrt::exit(0)
/// }
/// ```
#[macro_export]
macro_rules! entry {
    ($main:path) => {
        /// The ELF entry point. Per the ax guest ABI the VMM starts every vCPU here with `rdi` = the vCPU
        /// index, `rsi` = the address of the `BootInfo` block and `rsp + 8` 16-byte aligned, which is exactly
        /// the state after a System V `call`.
        #[no_mangle]
        pub extern "sysv64" fn _start(vcpu: u64, boot: &'static $crate::BootInfo) -> ! {
            $crate::start(vcpu, boot, $main)
        }
    };
}

/// The body of [`entry!`]'s `_start`: checks the boot block, then runs `main`.
pub fn start(vcpu: u64, boot: &'static BootInfo, main: fn(u64, &'static BootInfo) -> !) -> ! {
    if boot.magic != BOOT_MAGIC {
        panic!(
            "bad BootInfo magic {:#x} (want {:#x})",
            boot.magic, BOOT_MAGIC
        );
    }
    if vcpu >= boot.nr_vcpus {
        panic!("vCPU index {} >= nr_vcpus {}", vcpu, boot.nr_vcpus);
    }
    main(vcpu, boot)
}

/// Ends the guest with `code` (every vCPU stops).
pub fn exit(code: u32) -> ! {
    // SAFETY: the exit device touches no guest memory.
    unsafe { cpu::outl(ports::EXIT, code) };
    // The VMM does not resume a vCPU after an exit; if it ever did, stay put.
    park()
}

/// Spins on `pause` forever: what a vCPU with nothing (more) to do runs.
pub fn park() -> ! {
    loop {
        cpu::pause();
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Spin lock
// ---------------------------------------------------------------------------------------------------------------

/// A test-and-test-and-set spin lock (an [`AtomicBool`]) protecting a `T`.
pub struct SpinLock<T> {
    locked: AtomicBool,
    value: UnsafeCell<T>,
}

// SAFETY: the lock gives at most one vCPU at a time access to the value, so sharing the lock is as safe as
// sending the value from one vCPU to another.
unsafe impl<T: Send> Sync for SpinLock<T> {}

impl<T> fmt::Debug for SpinLock<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpinLock")
            .field("locked", &self.locked.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl<T> SpinLock<T> {
    /// A new, unlocked lock.
    pub const fn new(value: T) -> Self {
        SpinLock {
            locked: AtomicBool::new(false),
            value: UnsafeCell::new(value),
        }
    }

    /// Spins until the lock is ours.
    pub fn lock(&self) -> SpinGuard<'_, T> {
        loop {
            if let Some(guard) = self.try_lock() {
                return guard;
            }
            while self.locked.load(Ordering::Relaxed) {
                cpu::pause();
            }
        }
    }

    /// Takes the lock if it is free.
    pub fn try_lock(&self) -> Option<SpinGuard<'_, T>> {
        self.locked
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .ok()
            .map(|_| SpinGuard { lock: self })
    }
}

/// Access to the value of a locked [`SpinLock`]; unlocks when dropped.
pub struct SpinGuard<'a, T> {
    lock: &'a SpinLock<T>,
}

impl<T> fmt::Debug for SpinGuard<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SpinGuard")
    }
}

impl<T> Deref for SpinGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: this guard holds the lock, so no other reference to the value exists.
        unsafe { &*self.lock.value.get() }
    }
}

impl<T> DerefMut for SpinGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: this guard holds the lock, so no other reference to the value exists.
        unsafe { &mut *self.lock.value.get() }
    }
}

impl<T> Drop for SpinGuard<'_, T> {
    fn drop(&mut self) {
        self.lock.locked.store(false, Ordering::Release);
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Console
// ---------------------------------------------------------------------------------------------------------------

/// The lock that keeps console lines of different vCPUs whole. [`console`] and [`println!`] take it.
pub static CONSOLE_LOCK: SpinLock<()> = SpinLock::new(());

/// Writes bytes to the console, one `out` per byte, without taking [`CONSOLE_LOCK`].
pub fn console_write(bytes: &[u8]) {
    for &byte in bytes {
        // SAFETY: the console device touches no guest memory.
        unsafe { cpu::outb(ports::CONSOLE, byte) };
    }
}

/// Writes `n` in decimal to the console, without taking [`CONSOLE_LOCK`].
pub fn console_write_u64(n: u64) {
    let mut buf = [0; U64_DIGITS];
    console_write(fmt_u64(n, &mut buf));
}

/// Most decimal digits of a `u64` (`18446744073709551615`).
pub const U64_DIGITS: usize = 20;

/// Formats `n` in decimal into the end of `buf` and returns the digits.
pub fn fmt_u64(mut n: u64, buf: &mut [u8; U64_DIGITS]) -> &[u8] {
    let mut start = buf.len();
    loop {
        start -= 1;
        buf[start] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    &buf[start..]
}

/// Takes [`CONSOLE_LOCK`] and returns a writer for one whole line (or several): nothing another vCPU prints
/// through the lock lands in the middle. The lock is released when the writer is dropped, so
/// `axrt::console().str("cpu").u64(i).str("\n");` is one atomic line.
pub fn console() -> ConsoleWriter<'static> {
    ConsoleWriter {
        _guard: CONSOLE_LOCK.lock(),
    }
}

/// A console writer that holds [`CONSOLE_LOCK`]; see [`console`]. Also a [`fmt::Write`].
#[derive(Debug)]
pub struct ConsoleWriter<'a> {
    _guard: SpinGuard<'a, ()>,
}

impl ConsoleWriter<'_> {
    /// Writes raw bytes.
    pub fn bytes(&mut self, bytes: &[u8]) -> &mut Self {
        console_write(bytes);
        self
    }

    /// Writes a string.
    pub fn str(&mut self, s: &str) -> &mut Self {
        self.bytes(s.as_bytes())
    }

    /// Writes `n` in decimal.
    pub fn u64(&mut self, n: u64) -> &mut Self {
        console_write_u64(n);
        self
    }
}

impl fmt::Write for ConsoleWriter<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        console_write(s.as_bytes());
        Ok(())
    }
}

/// The console without the lock, for the panic handler.
struct RawConsole;

impl fmt::Write for RawConsole {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        console_write(s.as_bytes());
        Ok(())
    }
}

/// Prints to the console under [`CONSOLE_LOCK`] (`core::fmt` syntax).
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => {{
        use ::core::fmt::Write as _;
        let _ = ::core::write!($crate::console(), $($arg)*);
    }};
}

/// Prints a line to the console under [`CONSOLE_LOCK`] (`core::fmt` syntax): the whole line is written while
/// holding the lock.
#[macro_export]
macro_rules! println {
    () => {{
        $crate::console().str("\n");
    }};
    ($($arg:tt)*) => {{
        use ::core::fmt::Write as _;
        let _ = ::core::writeln!($crate::console(), $($arg)*);
    }};
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    use core::fmt::Write as _;
    // Keep the panic line whole if we can, but never wait forever: this vCPU may itself hold the lock.
    let mut guard = None;
    for _ in 0..1_000_000 {
        guard = CONSOLE_LOCK.try_lock();
        if guard.is_some() {
            break;
        }
        cpu::pause();
    }
    let mut out = RawConsole;
    let _ = write!(out, "panic: {}", info.message());
    if let Some(location) = info.location() {
        let _ = write!(
            out,
            " at {}:{}:{}",
            location.file(),
            location.line(),
            location.column()
        );
    }
    let _ = out.write_str("\n");
    drop(guard);
    exit(PANIC_EXIT_CODE)
}

// ---------------------------------------------------------------------------------------------------------------
// Free memory
// ---------------------------------------------------------------------------------------------------------------

/// A bump allocator over `[free_start, free_end)`. Memory is never given back.
#[derive(Debug)]
pub struct FreeMem {
    next: u64,
    end: u64,
}

impl FreeMem {
    /// An allocator over all of the boot block's free memory.
    ///
    /// # Safety
    /// The caller owns the free memory: at most one `FreeMem` exists in the guest (or several over disjoint
    /// parts, see [`FreeMem::from_range`]), and nothing else uses that memory.
    pub unsafe fn new(boot: &BootInfo) -> Self {
        // SAFETY: passed on to the caller.
        unsafe { Self::from_range(boot.free_start, boot.free_end) }
    }

    /// An allocator over `[start, end)`, a part of the free memory.
    ///
    /// # Safety
    /// `[start, end)` lies in `[free_start, free_end)` and nothing else in the guest uses it.
    pub unsafe fn from_range(start: u64, end: u64) -> Self {
        FreeMem { next: start, end }
    }

    /// Bytes still available (ignoring alignment).
    pub fn remaining(&self) -> u64 {
        self.end.saturating_sub(self.next)
    }

    /// `len` bytes aligned to `align` (a power of two), or `None` if they do not fit. The memory is zero if
    /// it was never written since boot.
    pub fn alloc(&mut self, len: usize, align: u64) -> Option<&'static mut [u8]> {
        assert!(
            align.is_power_of_two(),
            "alignment {} is not a power of two",
            align
        );
        let start = self.next.checked_add(align - 1)? & !(align - 1);
        let end = start.checked_add(len as u64)?;
        if end > self.end {
            return None;
        }
        self.next = end;
        let ptr = core::ptr::with_exposed_provenance_mut::<u8>(start as usize);
        // SAFETY: `[start, end)` is guest memory in the range this allocator owns (see `new`), identity-mapped
        // and writable at CPL3, and the allocator hands it out only once.
        Some(unsafe { core::slice::from_raw_parts_mut(ptr, len) })
    }

    /// `pages` whole 4 KiB pages, page-aligned.
    pub fn alloc_pages(&mut self, pages: u64) -> Option<&'static mut [u8]> {
        self.alloc(
            usize::try_from(pages.checked_mul(PAGE_SIZE)?).ok()?,
            PAGE_SIZE,
        )
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Block device
// ---------------------------------------------------------------------------------------------------------------

/// Block request operations ([`BlkRequest::op`]).
pub mod blk_op {
    /// Read `len` bytes from `sector` into `buf`.
    pub const READ: u32 = 0;
    /// Write `len` bytes from `buf` to `sector`.
    pub const WRITE: u32 = 1;
    /// Make earlier writes durable.
    pub const FLUSH: u32 = 2;
}

/// Block request status codes ([`BlkRequest::status`]).
pub mod blk_status {
    /// The request succeeded.
    pub const OK: u32 = 0;
    /// I/O error.
    pub const IO_ERROR: u32 = 1;
    /// Unsupported `op`.
    pub const UNSUPPORTED: u32 = 2;
    /// Bad request: range outside the disk, `len` not a multiple of 512 or over 1 MiB, buffer outside guest
    /// memory.
    pub const BAD_REQUEST: u32 = 3;
    /// Not part of the ABI: the value [`blk_submit`](crate::blk_submit) puts in `status` before ringing the
    /// doorbell, so a request the device never completed shows up as this status.
    pub const NOT_COMPLETED: u32 = u32::MAX;
}

/// A block request, 32 bytes, as the device reads it from guest memory. It must lie below 4 GiB, 8-byte
/// aligned.
#[repr(C, align(8))]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BlkRequest {
    /// [`blk_op`]: read, write or flush.
    pub op: u32,
    /// [`blk_status`], written by the device.
    pub status: u32,
    /// First sector (512-byte units).
    pub sector: u64,
    /// Length in bytes: a multiple of 512, at most 1 MiB; ignored for flush.
    pub len: u32,
    /// Reserved, 0.
    pub reserved: u32,
    /// Guest-physical address of the data buffer.
    pub buf: u64,
}

const _: () = assert!(core::mem::size_of::<BlkRequest>() == 32);

/// A block request that did not succeed: the non-zero [`blk_status`] the device returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlkError {
    /// The status ([`blk_status`]).
    pub status: u32,
}

/// Submits `request` to the block device and returns the status the device wrote.
///
/// The request is stored with a volatile write, its `status` set to [`blk_status::NOT_COMPLETED`] first; the
/// doorbell is synchronous, so the request is complete when this returns, and `status` is read back with a
/// volatile read.
///
/// # Safety
/// For a read, `[buf, buf + len)` must be guest memory the caller may write (the device fills it); for a
/// write, memory the caller may read. No reference to that memory may be alive across the call except the
/// one the caller derived `buf` from.
///
/// # Panics
/// If `request` is not below 4 GiB or not 8-byte aligned.
pub unsafe fn blk_submit(request: &mut BlkRequest) -> u32 {
    let addr = request as *mut BlkRequest as usize;
    let doorbell =
        u32::try_from(addr).unwrap_or_else(|_| panic!("BlkRequest at {:#x} is above 4 GiB", addr));
    assert!(
        addr % 8 == 0,
        "BlkRequest at {:#x} is not 8-byte aligned",
        addr
    );
    let fields = BlkRequest {
        status: blk_status::NOT_COMPLETED,
        ..*request
    };
    // SAFETY: `request` is a valid, exclusive reference.
    unsafe { core::ptr::write_volatile(request, fields) };
    // SAFETY: the doorbell makes the device access the request (ours) and `[buf, buf + len)`, which the caller
    // vouches for.
    unsafe { cpu::outl(ports::BLK_DOORBELL, doorbell) };
    // SAFETY: `request` is a valid reference; the device wrote `status` during the `out`.
    unsafe { core::ptr::read_volatile(&request.status) }
}

/// The request slot the `blk_*` helpers use: in `.bss`, so below 4 GiB (the ELF is linked low), and behind a
/// lock so that vCPUs can share it.
static BLK_REQUEST: SpinLock<BlkRequest> = SpinLock::new(BlkRequest {
    op: 0,
    status: 0,
    sector: 0,
    len: 0,
    reserved: 0,
    buf: 0,
});

fn blk_rw(op: u32, sector: u64, buf: *const u8, len: usize) -> Result<(), BlkError> {
    let mut request = BLK_REQUEST.lock();
    *request = BlkRequest {
        op,
        status: 0,
        sector,
        // An oversized length is passed as a length the device rejects (not a multiple of 512).
        len: u32::try_from(len).unwrap_or(u32::MAX),
        reserved: 0,
        buf: buf as usize as u64,
    };
    // SAFETY: the callers (`blk_read` / `blk_write` / `blk_flush`) pass a buffer they hold the right reference
    // to for the whole call.
    match unsafe { blk_submit(&mut request) } {
        blk_status::OK => Ok(()),
        status => Err(BlkError { status }),
    }
}

/// Reads `buf.len()` bytes (a multiple of 512, at most 1 MiB) from the disk, starting at `sector`.
pub fn blk_read(sector: u64, buf: &mut [u8]) -> Result<(), BlkError> {
    blk_rw(blk_op::READ, sector, buf.as_mut_ptr(), buf.len())
}

/// Writes `buf` (a multiple of 512 bytes, at most 1 MiB) to the disk, starting at `sector`.
pub fn blk_write(sector: u64, buf: &[u8]) -> Result<(), BlkError> {
    blk_rw(blk_op::WRITE, sector, buf.as_ptr(), buf.len())
}

/// Makes earlier writes durable.
pub fn blk_flush() -> Result<(), BlkError> {
    blk_rw(blk_op::FLUSH, 0, core::ptr::null(), 0)
}

/// Disk capacity in 512-byte sectors (0: no disk; saturates at `u32::MAX`).
pub fn blk_capacity() -> u32 {
    // SAFETY: reading the capacity port has no side effect.
    unsafe { cpu::inl(ports::BLK_CAPACITY) }
}

// ---------------------------------------------------------------------------------------------------------------
// The memory functions the compiler calls
// ---------------------------------------------------------------------------------------------------------------

/// `memcpy`, `memmove`, `memset`, `memcmp`, `bcmp`. Code generation emits calls to these (struct copies,
/// `core::fmt`, slice copies) and expects the C library to provide them; a guest has none. The copies and
/// fills are single string instructions (`rep movsb` / `rep stosb`, fast on every recent x86), which also
/// guarantees the compiler cannot turn their bodies back into calls to themselves. The direction flag is
/// clear on entry (System V ABI; the VMM starts vCPUs with RFLAGS.DF = 0). The comparisons are plain byte
/// loops: the compiler rewrites loops into `memset`/`memcpy` calls, never into `memcmp`/`bcmp` calls.
mod mem {
    use core::arch::asm;

    /// # Safety
    /// The C `memcpy` contract: `[dest, dest+n)` writable, `[src, src+n)` readable, no overlap.
    #[no_mangle]
    pub unsafe extern "C" fn memcpy(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
        // SAFETY: the caller guarantees both ranges; `rep movsb` copies exactly `n` bytes upwards.
        unsafe {
            asm!("rep movsb", inout("rcx") n => _, inout("rdi") dest => _, inout("rsi") src => _,
                 options(nostack, preserves_flags));
        }
        dest
    }

    /// # Safety
    /// The C `memmove` contract: `[dest, dest+n)` writable, `[src, src+n)` readable; they may overlap.
    #[no_mangle]
    pub unsafe extern "C" fn memmove(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
        if (dest as usize).wrapping_sub(src as usize) >= n {
            // `dest` is below `src` or past the end of the source: copying upwards never overwrites a source
            // byte before it is read.
            // SAFETY: as for `memcpy`; the overlap (if any) is safe for an upward copy.
            unsafe { memcpy(dest, src, n) };
        } else {
            // `dest` is inside `(src, src+n)`: copy downwards, from the last byte, with the direction flag set
            // for the one instruction and cleared again.
            // SAFETY: the caller guarantees both ranges; `std; rep movsb` copies `n` bytes from the last one
            // down, and `cld` restores the ABI's DF = 0.
            unsafe {
                asm!("std", "rep movsb", "cld", inout("rcx") n => _,
                     inout("rdi") dest.wrapping_add(n).wrapping_sub(1) => _,
                     inout("rsi") src.wrapping_add(n).wrapping_sub(1) => _,
                     options(nostack));
            }
        }
        dest
    }

    /// # Safety
    /// The C `memset` contract: `[dest, dest+n)` writable.
    #[no_mangle]
    pub unsafe extern "C" fn memset(dest: *mut u8, c: i32, n: usize) -> *mut u8 {
        // SAFETY: the caller guarantees the range; `rep stosb` stores `al` (the low byte of `c`, as C's
        // `memset` specifies) `n` times upwards.
        unsafe {
            asm!("rep stosb", inout("rcx") n => _, inout("rdi") dest => _, in("al") c as u8,
                 options(nostack, preserves_flags));
        }
        dest
    }

    /// # Safety
    /// The C `memcmp` contract: `[a, a+n)` and `[b, b+n)` readable.
    #[no_mangle]
    pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
        let mut i = 0;
        while i < n {
            // SAFETY: `i < n` and the caller guarantees both ranges are readable.
            let (x, y) = unsafe { (*a.add(i), *b.add(i)) };
            if x != y {
                return i32::from(x) - i32::from(y);
            }
            i += 1;
        }
        0
    }

    /// # Safety
    /// The C `bcmp` contract: `[a, a+n)` and `[b, b+n)` readable.
    #[no_mangle]
    pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
        // SAFETY: same contract as `memcmp`.
        unsafe { memcmp(a, b, n) }
    }
}
