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
//!
//! # Pre-protection: the stun protects only what changed since the last pass
//! Write-protecting costs ≈ 0.25–0.35 µs per page on the PVM host, so protecting the whole dirty set in
//! the stun makes the stun grow with it. [`Cow::pre_protect`] runs *during* the epoch (the epoch loop calls
//! it at its dirty-count polls): it write-protects the pages KVM has logged as dirty so far and marks them
//! *armed*. A guest (or VMM) write to an armed page faults; the handler disarms the page (clears its bit)
//! and un-protects it — no copy, the epoch has not ended. At the stun, [`Cow::arm`] protects only the dirty
//! pages that are not armed; an armed page is still protected, so it still holds the memory at the stun.
//!
//! Why an armed page is really protected at the stun (safety does not rest on timing): the armed bit is
//! set *before* the page is protected and cleared *before* it is un-protected, both under `arm_lock`; the
//! handler holds the job's read lock while it disarms, and [`Cow::arm`] activates the job under the write
//! lock, so a disarm is either finished before the stun reads the bits (then the stun protects the page)
//! or starts after the job is active (then the page is in the job and the handler copies it before
//! un-protecting it). An armed page is dirty in KVM's log (the pre-pass only protects logged pages and
//! never clears the log), so it is in the stun's harvest and therefore in the job.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::ranges::MemoryRangeTable;
use crate::uffd::{Uffd, UffdError, WpFault};
use crate::PAGE_SIZE;

/// Most pages the controller copies and un-protects at once.
pub const BATCH: u64 = 64;

/// Epochs a page written again after its pre-protection stays out of pre-protection.
pub const REWRITTEN_EPOCHS: u64 = 32;

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
    /// Pre-protected pages (see the module docs), one bit per page; changed only under `arm_lock`.
    armed: Vec<AtomicU64>,
    arm_lock: Mutex<()>,
    /// Armed pages the guest (or the VMM) wrote again before the stun (each a fault).
    pre_faults: AtomicU64,
    /// Pages disarmed by a write (written again after their pre-protection, before the stun): left out of
    /// pre-protection for [`REWRITTEN_EPOCHS`] epochs (a page written several times per epoch would fault
    /// at every pass). Changed only under `arm_lock`.
    rewritten: Vec<AtomicU64>,
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
                // The other copier holds the page; it may run at a lower priority than this thread (the
                // handler runs SCHED_FIFO), so stop spinning after a while and let it run.
                let mut spins = 0u32;
                while state.load(Ordering::Acquire) != COPIED {
                    spins += 1;
                    if spins < 1000 {
                        std::hint::spin_loop();
                    } else {
                        std::thread::sleep(Duration::from_micros(20));
                    }
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

    fn arm_lock(&self) -> std::sync::MutexGuard<'_, ()> {
        self.arm_lock.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn handle(&self, fault: WpFault) {
        let addr = fault.address & !(PAGE_SIZE as u64 - 1);
        if addr < self.base || addr >= self.base + self.size {
            return;
        }
        let page = (addr - self.base) / PAGE_SIZE as u64;
        // The job's read lock is held until the page is un-protected (see the module docs).
        let job = self.job();
        let _disarming = match job.slot_of(page) {
            Some(slot) => {
                self.claim_and_copy(&job, slot, page);
                self.faults.fetch_add(1, Ordering::Relaxed);
                None
            }
            None => {
                // Not in a job: a pre-protected page written again before the stun. Disarm it first.
                let guard = self.arm_lock();
                let (w, bit) = ((page / 64) as usize, 1u64 << (page % 64));
                if let Some(word) = self.armed.get(w) {
                    if word.load(Ordering::Relaxed) & bit != 0 {
                        word.fetch_and(!bit, Ordering::Relaxed);
                        self.rewritten[w].fetch_or(bit, Ordering::Relaxed);
                        self.pre_faults.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Some(guard)
            }
        };
        // Copied (or disarmed, or not ours): un-protecting wakes the writer.
        if let Err(e) = self.unprotect(page, 1) {
            tracing::warn!(page, error = %e, "un-protecting a faulting page failed; waking it");
            let _ = self.uffd.wake(addr, PAGE_SIZE as u64);
        }
    }

    /// Un-protects every armed page and clears the bits. Call with `arm_lock` held and no job active.
    fn disarm_all(&self) -> Result<(), UffdError> {
        let mut first_err = None;
        for_each_run(
            self.armed.iter().map(|w| w.swap(0, Ordering::Relaxed)),
            |first, n| {
                if let Err(e) = self.unprotect(first, n) {
                    first_err.get_or_insert(e);
                }
            },
        );
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
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
    pre_protected: u64,
    /// Hot pages the last [`Cow::arm`] copied inside the stun, and how long that took.
    hot: (u64, Duration),
    /// Stuns so far.
    epochs: u64,
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
            armed: (0..(size / PAGE_SIZE as u64).div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
            arm_lock: Mutex::new(()),
            pre_faults: AtomicU64::new(0),
            rewritten: (0..(size / PAGE_SIZE as u64).div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
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
            pre_protected: 0,
            hot: (0, Duration::ZERO),
            epochs: 0,
        })
    }

    /// Whether a job waits for [`Cow::finish`].
    pub fn pending(&self) -> bool {
        self.shared.job().active
    }

    /// The dirty pages of `dirty` (a bitmap of KVM's log, read while the guest runs) that are neither
    /// armed nor `hot`: what [`Cow::pre_protect`] would protect.
    pub fn unarmed(&self, dirty: &[u64], hot: &[u64]) -> u64 {
        dirty
            .iter()
            .zip(self.shared.armed.iter().zip(&self.shared.rewritten))
            .enumerate()
            .map(|(i, (d, (a, w)))| {
                let h = hot.get(i).copied().unwrap_or(0);
                let skip = a.load(Ordering::Relaxed) | w.load(Ordering::Relaxed) | h;
                u64::from((d & !skip).count_ones())
            })
            .sum()
    }

    /// During the epoch, the guest running: write-protects the pages of `dirty` that are neither armed,
    /// `hot`, nor written again after a pre-protection since the last stun, and arms them (see the module docs); returns how many. `dirty` must come from KVM's log of
    /// this epoch, not yet cleared. On error every armed page is un-protected again and the error
    /// returned (the caller stops pre-protecting; the stun then protects everything, as without it).
    pub fn pre_protect(&self, dirty: &[u64], hot: &[u64]) -> Result<u64, UffdError> {
        let job = self.shared.job();
        if job.active {
            return Ok(0); // a copy after resume still runs: its pages are protected anyway
        }
        let _arming = self.shared.arm_lock();
        let mut count = 0u64;
        let mut new = Vec::with_capacity(dirty.len());
        let words = self.shared.armed.iter().zip(&self.shared.rewritten);
        for (i, (d, (a, w))) in dirty.iter().zip(words).enumerate() {
            let h = hot.get(i).copied().unwrap_or(0);
            let n = d & !(a.load(Ordering::Relaxed) | w.load(Ordering::Relaxed) | h);
            // Armed before protected: a fault in between finds the bit and disarms the page.
            a.fetch_or(n, Ordering::Relaxed);
            count += u64::from(n.count_ones());
            new.push(n);
        }
        let mut failed = None;
        for_each_run(new.into_iter(), |first, n| {
            if failed.is_none() {
                if let Err(e) = self.shared.uffd.write_protect(
                    self.shared.base + first * PAGE_SIZE as u64,
                    n * PAGE_SIZE as u64,
                    true,
                ) {
                    failed = Some(e);
                }
            }
        });
        if let Some(e) = failed {
            let _ = self.shared.disarm_all();
            return Err(e);
        }
        Ok(count)
    }

    /// Un-protects every pre-protected page (a capture that copies inside the stun, or that failed, or a
    /// live capture that clears KVM's log, would otherwise leave armed pages outside any job).
    pub fn disarm(&self) -> Result<(), UffdError> {
        let job = self.shared.job();
        if job.active {
            return Ok(());
        }
        let _arming = self.shared.arm_lock();
        self.shared.disarm_all()
    }

    /// Armed pages written again before their stun (faults taken for pre-protection), since the last call.
    pub fn take_pre_faults(&self) -> u64 {
        self.shared.pre_faults.swap(0, Ordering::Relaxed)
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
        let t_hot = std::time::Instant::now();
        let mut hot = 0u64;
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
                    hot += n;
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
        self.hot = (hot, t_hot.elapsed());
        // Armed pages are protected already (see the module docs): protect only the others, then hand
        // the armed ones over to the job (which un-protects every page after its copy).
        let mut pre_protected = 0u64;
        {
            let _arming = self.shared.arm_lock();
            let armed = &self.shared.armed;
            let is_armed = |p: u64| {
                armed
                    .get((p / 64) as usize)
                    .is_some_and(|w| w.load(Ordering::Relaxed) & (1 << (p % 64)) != 0)
            };
            let mut split = Vec::with_capacity(protect.len());
            for (first, n) in protect {
                let mut p = first;
                while p < first + n {
                    let a = is_armed(p);
                    let start = p;
                    while p < first + n && is_armed(p) == a {
                        p += 1;
                    }
                    if a {
                        pre_protected += p - start;
                    } else {
                        split.push((start, p - start));
                    }
                }
            }
            protect = split;
            for w in armed {
                w.store(0, Ordering::Relaxed);
            }
            // Pages written again after their pre-protection are written more than once per epoch: they
            // are left out of pre-protection for `REWRITTEN_EPOCHS` epochs.
            self.epochs += 1;
            if self.epochs.is_multiple_of(REWRITTEN_EPOCHS) {
                for w in &self.shared.rewritten {
                    w.store(0, Ordering::Relaxed);
                }
            }
        }
        self.pre_protected = pre_protected;
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

    /// Hot pages the last [`Cow::arm`] copied inside the stun, and the time that took.
    pub fn last_hot_copy(&self) -> (u64, Duration) {
        self.hot
    }

    /// Pages of the last [`Cow::arm`] that were pre-protected (armed) and so not protected in its stun.
    pub fn last_pre_protected(&self) -> u64 {
        self.pre_protected
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

/// Calls `f(first_page, pages)` for every run of set bits of a bitmap given word by word.
fn for_each_run(words: impl Iterator<Item = u64>, mut f: impl FnMut(u64, u64)) {
    let mut run: Option<(u64, u64)> = None;
    for (i, mut w) in words.enumerate() {
        let base = i as u64 * 64;
        if w == 0 {
            if let Some((first, n)) = run.take() {
                f(first, n);
            }
            continue;
        }
        let mut bit = 0u64;
        while bit < 64 {
            if w == 0 {
                if let Some((first, n)) = run.take() {
                    f(first, n);
                }
                break;
            }
            let zeros = u64::from(w.trailing_zeros());
            if zeros > 0 {
                if let Some((first, n)) = run.take() {
                    f(first, n);
                }
                bit += zeros;
                w >>= zeros;
                continue;
            }
            let ones = u64::from((!w).trailing_zeros()).min(64 - bit);
            let page = base + bit;
            run = match run {
                Some((first, n)) if first + n == page => Some((first, n + ones)),
                Some((first, n)) => {
                    f(first, n);
                    Some((page, ones))
                }
                None => Some((page, ones)),
            };
            bit += ones;
            w = if ones >= 64 { 0 } else { w >> ones };
        }
    }
    if let Some((first, n)) = run {
        f(first, n);
    }
}

fn handler_loop(shared: &Shared, stop: i32) {
    // A faulting vCPU waits for this thread: under load a normal thread is scheduled milliseconds later
    // (measured: pre-protection then halved the guest's progress), so it runs SCHED_FIFO when allowed
    // (root). It only sleeps in `poll` or does bounded work per fault.
    if let Err(e) = crate::cpu::set_boost(0, true) {
        tracing::debug!(error = %e, "userfaultfd handler stays SCHED_OTHER");
    }
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

#[cfg(test)]
mod tests {
    use super::for_each_run;

    fn runs(words: &[u64]) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        for_each_run(words.iter().copied(), |first, n| out.push((first, n)));
        out
    }

    #[test]
    fn runs_of_set_bits_span_words() {
        assert_eq!(runs(&[0, 0]), vec![]);
        assert_eq!(runs(&[0b1011]), vec![(0, 2), (3, 1)]);
        assert_eq!(runs(&[1 << 63, 1]), vec![(63, 2)]);
        assert_eq!(runs(&[u64::MAX, u64::MAX, 0b10]), vec![(0, 128), (129, 1)]);
        assert_eq!(runs(&[u64::MAX, 0, u64::MAX]), vec![(0, 64), (128, 64)]);
        assert_eq!(runs(&[0x8000_0000_0000_0001]), vec![(0, 1), (63, 1)]);
    }
}
