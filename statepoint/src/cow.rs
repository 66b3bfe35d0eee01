//! Copy after resume: the pages of an epoch are copied *while the guest runs again*, copy-before-write.
//!
//! During the stun the capture only write-protects the harvested pages with userfaultfd
//! ([`Cow::arm`], one `UFFDIO_WRITEPROTECT` per run of contiguous pages) and resumes. Then:
//! - the controller copies every page into the staging buffer and un-protects it ([`Cow::finish`], runs of
//!   up to [`BATCH`] pages per `UFFDIO_WRITEPROTECT`);
//! - a handler thread reads the write-protect faults of the guest (and of the VMM's own writes): a page
//!   that is about to be written is copied first, then un-protected, which wakes the writer.
//!
//! Every page has a state — *pending*, *copying*, *copied* — changed by compare-and-set, so exactly one of
//! the two copies it, and a page is un-protected only once it is copied. A protected page cannot change, so
//! whichever copies it copies its contents at the stun: the epoch is exactly the memory at the stun.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::ranges::MemoryRangeTable;
use crate::uffd::{Uffd, UffdError, WpFault};
use crate::PAGE_SIZE;

/// Most pages the controller copies and un-protects at once.
pub const BATCH: u64 = 64;

const PENDING: u8 = 0;
const COPYING: u8 = 1;
const COPIED: u8 = 2;

#[derive(Debug, Clone, Copy)]
struct Run {
    first_page: u64,
    pages: u64,
    /// Index of the run's first page in the staging buffer (in pages).
    slot: u64,
}

#[derive(Debug, Clone, Copy)]
struct Dst(*mut u8);
// SAFETY: the pointer addresses the staging buffer owned by `Cow::buf`, which is neither moved nor resized
// while a job is active; disjoint pages of it are written by whoever wins the page's compare-and-set.
unsafe impl Send for Dst {}
// SAFETY: see above.
unsafe impl Sync for Dst {}

#[derive(Debug)]
struct Job {
    runs: Vec<Run>,
    state: Vec<AtomicU8>,
    dst: Dst,
    active: bool,
}

impl Job {
    fn slot_of(&self, page: u64) -> Option<usize> {
        if !self.active {
            return None;
        }
        let i = self
            .runs
            .partition_point(|r| r.first_page + r.pages <= page);
        let r = self.runs.get(i)?;
        (page >= r.first_page).then(|| (r.slot + page - r.first_page) as usize)
    }
}

#[derive(Debug)]
struct Shared {
    uffd: Uffd,
    base: u64,
    size: u64,
    job: RwLock<Job>,
    faults: AtomicU64,
    stop: AtomicBool,
}

impl Shared {
    fn job(&self) -> std::sync::RwLockReadGuard<'_, Job> {
        self.job.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Copies page `slot` (guest page `page`) if nobody has; returns once it is copied.
    fn claim_and_copy(&self, job: &Job, slot: usize, page: u64) {
        let Some(state) = job.state.get(slot) else {
            return;
        };
        match state.compare_exchange(PENDING, COPYING, Ordering::Acquire, Ordering::Acquire) {
            Ok(_) => {
                self.copy_pages(job, slot, page, 1);
                state.store(COPIED, Ordering::Release);
            }
            Err(_) => {
                while state.load(Ordering::Acquire) != COPIED {
                    std::hint::spin_loop();
                }
            }
        }
    }

    fn copy_pages(&self, job: &Job, slot: usize, page: u64, pages: u64) {
        let len = pages as usize * PAGE_SIZE;
        // SAFETY: `page..page + pages` lies inside guest RAM (the job's runs come from a bitmap of this
        // memory), and is write-protected, so nothing writes it; the destination slots lie inside the
        // staging buffer (sized for the job) and were claimed by this thread alone.
        unsafe {
            std::ptr::copy_nonoverlapping(
                (self.base + page * PAGE_SIZE as u64) as *const u8,
                job.dst.0.add(slot * PAGE_SIZE),
                len,
            );
        }
    }

    fn unprotect(&self, page: u64, pages: u64) -> Result<(), UffdError> {
        self.uffd.write_protect(
            self.base + page * PAGE_SIZE as u64,
            pages * PAGE_SIZE as u64,
            false,
        )
    }

    fn handle(&self, fault: WpFault) {
        let addr = fault.address & !(PAGE_SIZE as u64 - 1);
        if addr < self.base || addr >= self.base + self.size {
            return;
        }
        let page = (addr - self.base) / PAGE_SIZE as u64;
        {
            let job = self.job();
            if let Some(slot) = job.slot_of(page) {
                self.claim_and_copy(&job, slot, page);
                self.faults.fetch_add(1, Ordering::Relaxed);
            }
        }
        // Copied (or not ours): un-protecting wakes the writer.
        if let Err(e) = self.unprotect(page, 1) {
            tracing::warn!(page, error = %e, "un-protecting a faulting page failed; waking it");
            let _ = self.uffd.wake(addr, PAGE_SIZE as u64);
        }
    }
}

/// Copy-after-resume state of one VM: the userfaultfd registration of its RAM, the fault handler thread,
/// the staging buffer.
#[derive(Debug)]
pub struct Cow {
    shared: Arc<Shared>,
    stop_fd: OwnedFd,
    handler: Option<JoinHandle<()>>,
    buf: Vec<u8>,
    pages: u64,
}

impl Cow {
    /// Registers guest RAM `[base, base + size)` for write-protect faults and starts the handler thread.
    pub fn new(base: *mut u8, size: u64) -> Result<Self, UffdError> {
        let uffd = Uffd::open()?;
        let base = base as u64;
        uffd.register_wp(base, size)?;
        // SAFETY: eventfd takes an initial value and flags and returns a new descriptor or -1.
        let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if raw < 0 {
            return Err(UffdError::Sys {
                op: "eventfd (handler stop)",
                source: std::io::Error::last_os_error(),
            });
        }
        // SAFETY: `raw` is a new descriptor we own.
        let stop_fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let shared = Arc::new(Shared {
            uffd,
            base,
            size,
            job: RwLock::new(Job {
                runs: Vec::new(),
                state: Vec::new(),
                dst: Dst(std::ptr::null_mut()),
                active: false,
            }),
            faults: AtomicU64::new(0),
            stop: AtomicBool::new(false),
        });
        let handler = {
            let shared = Arc::clone(&shared);
            let stop = stop_fd.as_raw_fd();
            std::thread::Builder::new()
                .name("uffd-wp".into())
                .spawn(move || handler_loop(&shared, stop))
                .map_err(|e| UffdError::Sys {
                    op: "spawning the fault handler",
                    source: e,
                })?
        };
        Ok(Cow {
            shared,
            stop_fd,
            handler: Some(handler),
            buf: Vec::new(),
            pages: 0,
        })
    }

    /// Whether a job waits for [`Cow::finish`].
    pub fn pending(&self) -> bool {
        self.shared.job().active
    }

    /// During the stun (every vCPU paused): prepares the copy of `ranges` into a staging buffer, copies
    /// the pages for which `copy_now` holds at once (the hot pages: the guest is about to write them again,
    /// so a fault would cost more than the copy) and write-protects the others. On error nothing stays
    /// protected.
    pub fn arm(
        &mut self,
        ranges: &MemoryRangeTable,
        spare: &mut Vec<u8>,
        copy_now: &dyn Fn(u64) -> bool,
    ) -> Result<(), UffdError> {
        let pages = ranges.page_count();
        // Reuse the larger of our buffer and the caller's spare one (the previous epoch's pages).
        if spare.capacity() > self.buf.capacity() {
            std::mem::swap(&mut self.buf, spare);
        }
        self.buf.clear();
        self.buf.reserve(pages as usize * PAGE_SIZE);
        self.pages = pages;
        {
            let mut job = self.shared.job.write().unwrap_or_else(|p| p.into_inner());
            job.runs.clear();
            let mut slot = 0;
            for r in ranges.ranges() {
                job.runs.push(Run {
                    first_page: r.first_page,
                    pages: r.pages,
                    slot,
                });
                slot += r.pages;
            }
            if job.state.len() < pages as usize {
                job.state
                    .resize_with(pages as usize, || AtomicU8::new(PENDING));
            }
            for s in &job.state[..pages as usize] {
                s.store(PENDING, Ordering::Relaxed);
            }
            job.dst = Dst(self.buf.as_mut_ptr());
            job.active = true;
        }
        self.shared.faults.store(0, Ordering::Relaxed);
        let job = self.shared.job();
        let mut protect = Vec::new();
        for r in &job.runs {
            // Split the run into sub-runs copied now and sub-runs protected.
            let mut p = 0;
            while p < r.pages {
                let now = copy_now(r.first_page + p);
                let start = p;
                while p < r.pages && copy_now(r.first_page + p) == now {
                    p += 1;
                }
                let (first, n) = (r.first_page + start, p - start);
                if now {
                    self.shared
                        .copy_pages(&job, (r.slot + start) as usize, first, n);
                    for i in start..p {
                        job.state[(r.slot + i) as usize].store(COPIED, Ordering::Relaxed);
                    }
                } else {
                    protect.push((first, n));
                }
            }
        }
        drop(job);
        for (first, n) in protect {
            let start = self.shared.base + first * PAGE_SIZE as u64;
            if let Err(e) = self
                .shared
                .uffd
                .write_protect(start, n * PAGE_SIZE as u64, true)
            {
                let _ = self
                    .shared
                    .uffd
                    .write_protect(self.shared.base, self.shared.size, false);
                self.shared
                    .job
                    .write()
                    .unwrap_or_else(|p| p.into_inner())
                    .active = false;
                return Err(e);
            }
        }
        Ok(())
    }

    /// After the resume: copies every page the fault handler has not, un-protecting each after its copy,
    /// and swaps the finished staging buffer into `pages`. Returns the number of write-protect faults the
    /// handler resolved. Every page is copied even if un-protecting fails; such a failure un-protects the
    /// whole RAM and is reported.
    pub fn finish(&mut self, pages: &mut Vec<u8>) -> Result<u64, UffdError> {
        let mut failed = None;
        {
            let job = self.shared.job();
            if !job.active {
                return Ok(0);
            }
            for r in &job.runs {
                let mut p = 0;
                while p < r.pages {
                    // Claim a batch of consecutive pending pages.
                    let start = p;
                    while p < r.pages && p - start < BATCH {
                        let s = &job.state[(r.slot + p) as usize];
                        if s.compare_exchange(
                            PENDING,
                            COPYING,
                            Ordering::Acquire,
                            Ordering::Acquire,
                        )
                        .is_err()
                        {
                            break;
                        }
                        p += 1;
                    }
                    let n = p - start;
                    if n == 0 {
                        // The handler has it (or had it): make sure it is copied before going on.
                        let slot = (r.slot + p) as usize;
                        self.shared.claim_and_copy(&job, slot, r.first_page + p);
                        p += 1;
                        continue;
                    }
                    let first = r.first_page + start;
                    self.shared
                        .copy_pages(&job, (r.slot + start) as usize, first, n);
                    for i in start..p {
                        job.state[(r.slot + i) as usize].store(COPIED, Ordering::Release);
                    }
                    if let Err(e) = self.shared.unprotect(first, n) {
                        failed.get_or_insert(e);
                    }
                }
            }
        }
        let mut job = self.shared.job.write().unwrap_or_else(|p| p.into_inner());
        job.active = false;
        drop(job);
        // SAFETY: every one of the job's `pages` pages was written above (by this thread or the handler,
        // which finished before marking the page copied), so the first `pages * PAGE_SIZE` bytes are
        // initialised; the capacity was reserved in `arm`.
        unsafe { self.buf.set_len(self.pages as usize * PAGE_SIZE) };
        std::mem::swap(&mut self.buf, pages);
        let faults = self.shared.faults.load(Ordering::Relaxed);
        if let Some(e) = failed {
            self.shared
                .uffd
                .write_protect(self.shared.base, self.shared.size, false)?;
            tracing::warn!(error = %e, "un-protecting copied pages failed; un-protected all guest RAM");
        }
        Ok(faults)
    }
}

impl Drop for Cow {
    fn drop(&mut self) {
        let _ = self.finish(&mut Vec::new());
        self.shared.stop.store(true, Ordering::SeqCst);
        let one = 1u64;
        // SAFETY: writes 8 bytes from `one` to our eventfd.
        unsafe { libc::write(self.stop_fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
        if let Some(h) = self.handler.take() {
            let _ = h.join();
        }
        let _ = self
            .shared
            .uffd
            .unregister(self.shared.base, self.shared.size);
    }
}

fn handler_loop(shared: &Shared, stop: i32) {
    let mut faults = Vec::new();
    while !shared.stop.load(Ordering::SeqCst) {
        match shared.uffd.wait(stop, Duration::from_millis(100)) {
            Ok(false) => continue,
            Ok(true) => {}
            Err(e) => {
                tracing::error!(error = %e, "userfaultfd handler: poll failed");
                std::thread::sleep(Duration::from_millis(1));
                continue;
            }
        }
        if let Err(e) = shared.uffd.read_faults(&mut faults) {
            tracing::error!(error = %e, "userfaultfd handler: read failed");
            continue;
        }
        for &f in &faults {
            shared.handle(f);
        }
    }
}
