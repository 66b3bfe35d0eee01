//! The dirty set of an epoch: KVM's log of guest writes **OR** the VMM's own writes (vm-memory bitmap)
//! **OR** bits carried over from a capture that failed **OR** the *hot* pages.
//!
//! # Put-back
//! Firecracker once lost pages because a failed snapshot had already cleared `KVM_GET_DIRTY_LOG`. Here a
//! harvest is a two-step transaction: [`DirtyTracker::harvest`] collects the bits, and either
//! [`DirtyTracker::commit`] (capture succeeded: re-arm KVM's log for those pages, forget the carry-over)
//! or [`DirtyTracker::put_back`] (capture failed: keep every harvested bit for the next attempt) ends it.
//!
//! # Hot pages
//! Under write-protection dirty logging, the first guest write to a page in each epoch faults; on the PVM
//! host this was tuned on a fault costs 17–30 µs, a page copy ≈ 0.4 µs (plus ≈ 2 µs of encoding, off the
//! stun). So, in manual-protect mode, pages predicted to be written again become *hot*: their KVM dirty
//! bit is not cleared at commit, so they stay writable (no more faults) and are harvested — copied —
//! every epoch.
//!
//! The prediction looks at a window: every page keeps an 8-epoch write history (one bit per epoch, a
//! `u8` shift register), and a page written in at least `k` of the last 8 epochs is promoted. A page
//! that is written with probability `p` per epoch costs `p · fault` while cold and `copy` while hot, so
//! promotion pays once `k/8 > copy / fault`; the epoch engine measures both costs and sets `k` (at least
//! 2, so one stray write never promotes) and the cap on the hot set ([`DirtyTracker::set_hot_policy`]).
//! A guest that sweeps a working set slower than one pass per epoch (every write faults, so it is slow)
//! still writes each page every few epochs and is caught by the window, where "written in two
//! consecutive epochs" never fires.
//!
//! After each capture the epoch engine reports which hot pages did not change (a comparison with the
//! last sent contents, outside the stun); those count as not written, and a hot page written in fewer
//! than `k` of the last 8 epochs is demoted and re-protected at the next commit (the same window both
//! ways, so a slow sweep does not demote the pages it promoted). The dirty set stays a superset of the pages really written, so checkpoints are
//! exactly as correct; the cost is at most one extra copy of a page that stopped changing.

use crate::memory::GuestRam;
use crate::vstate::{KvmVm, VstateError};

/// Dirty-bit bookkeeping of one VM.
#[derive(Debug)]
pub struct DirtyTracker {
    harvested: Vec<u64>,
    carry: Vec<u64>,
    scratch: Vec<u64>,
    hot: Vec<u64>,
    hot_count: u64,
    hot_limit: u64,
    /// Promote a page written in at least this many of the last [`HISTORY_EPOCHS`] epochs.
    promote_min: u32,
    /// Per page: bit i set = written `i` epochs ago (bit 0: the last epoch).
    history: Vec<u8>,
    /// Write-protect faults of the last epoch: harvested pages that were not hot.
    faults: u64,
}

/// Epochs of write history kept per page.
pub const HISTORY_EPOCHS: u32 = 8;

/// Default promotion threshold (see the module docs).
pub const DEFAULT_PROMOTE_MIN: u32 = 2;

fn popcount(words: &[u64]) -> u64 {
    words.iter().map(|w| u64::from(w.count_ones())).sum()
}

impl DirtyTracker {
    /// A tracker for `words` 64-page words.
    pub fn new(words: usize) -> Self {
        DirtyTracker {
            harvested: vec![0; words],
            carry: vec![0; words],
            scratch: vec![0; words],
            hot: vec![0; words],
            hot_count: 0,
            hot_limit: 0,
            promote_min: DEFAULT_PROMOTE_MIN,
            history: vec![0; words * 64],
            faults: 0,
        }
    }

    /// Allows up to `limit` hot pages (0 disables hot pages). Only honoured in manual-protect mode.
    pub fn set_hot_limit(&mut self, limit: u64) {
        self.hot_limit = limit;
        if limit == 0 {
            // Demote everything: the next commit re-protects them.
            self.hot.fill(0);
            self.hot_count = 0;
            return;
        }
        // Above a lowered cap: demote the highest pages (they are copied inside the stun, which the cap
        // bounds; a page written every epoch would never cool down by itself).
        let mut excess = popcount(&self.hot).saturating_sub(limit);
        for w in self.hot.iter_mut().rev() {
            while excess > 0 && *w != 0 {
                *w &= !(1u64 << (63 - w.leading_zeros()));
                excess -= 1;
            }
            if excess == 0 {
                break;
            }
        }
        self.hot_count = popcount(&self.hot);
    }

    /// Sets the hot-page cap and the promotion threshold `promote_min` of [`HISTORY_EPOCHS`] epochs
    /// (clamped to 2..=8). Pages above a lowered cap are demoted (re-protected at the next commit).
    pub fn set_hot_policy(&mut self, limit: u64, promote_min: u32) {
        self.set_hot_limit(limit);
        self.promote_min = promote_min.clamp(2, HISTORY_EPOCHS);
    }

    /// The promotion threshold.
    pub fn promote_min(&self) -> u32 {
        self.promote_min
    }

    /// Write-protect faults taken in the last captured epoch (pages harvested that were not hot; a VMM
    /// write counts as well, which overestimates slightly).
    pub fn last_faults(&self) -> u64 {
        self.faults
    }

    /// Number of hot pages.
    pub fn hot_count(&self) -> u64 {
        self.hot_count
    }

    /// Reads KVM's log of this epoch without clearing it into a scratch bitmap ([`DirtyTracker::peeked`])
    /// — the guest may run. Manual protect only (the bitmap stays empty otherwise).
    pub fn peek(&mut self, vm: &KvmVm) -> Result<(), VstateError> {
        if !vm.manual_protect() {
            self.scratch.fill(0);
            return Ok(());
        }
        vm.get_dirty_log(&mut self.scratch)
    }

    /// The bits of the last [`DirtyTracker::peek`] (valid until another method changes the tracker) and
    /// the hot pages, one bit per page.
    pub fn peeked(&self) -> (&[u64], &[u64]) {
        (&self.scratch, &self.hot)
    }

    /// Whether `page` is hot.
    pub fn is_hot(&self, page: u64) -> bool {
        let (w, b) = ((page / 64) as usize, page % 64);
        self.hot.get(w).is_some_and(|x| x & (1 << b) != 0)
    }

    /// Collects the epoch's dirty set. Every vCPU must be paused.
    pub fn harvest(&mut self, vm: &KvmVm, ram: &GuestRam) -> Result<&[u64], VstateError> {
        vm.get_dirty_log(&mut self.harvested)?;
        for (h, c) in self.harvested.iter_mut().zip(&self.carry) {
            *h |= *c;
        }
        ram.take_vmm_dirty(&mut self.harvested);
        Ok(&self.harvested)
    }

    /// The bits of the last harvest.
    pub fn harvested(&self) -> &[u64] {
        &self.harvested
    }

    /// The capture succeeded: re-arm the log for the harvested pages that are not hot, and drop the
    /// carry-over.
    pub fn commit(&mut self, vm: &KvmVm) -> Result<(), VstateError> {
        for ((s, h), hot) in self.scratch.iter_mut().zip(&self.harvested).zip(&self.hot) {
            *s = *h & !*hot;
        }
        vm.clear_dirty_log(&mut self.scratch)?;
        self.carry.fill(0);
        Ok(())
    }

    /// The capture failed: keep every harvested bit for the next harvest.
    pub fn put_back(&mut self) {
        for (c, h) in self.carry.iter_mut().zip(&self.harvested) {
            *c |= *h;
        }
    }

    /// After a successful capture and outside the stun: `unchanged_hot` lists the hot pages whose
    /// contents did not change this epoch. Demotes those, records the epoch in every page's history and
    /// promotes pages written in at least `promote_min` of the last epochs (up to the cap). A no-op unless
    /// hot pages are enabled and `manual_protect` holds.
    pub fn feedback(&mut self, manual_protect: bool, unchanged_hot: &[u64]) {
        self.faults = self
            .harvested
            .iter()
            .zip(&self.hot)
            .map(|(h, hot)| u64::from((h & !hot).count_ones()))
            .sum();
        if self.hot_limit == 0 || !manual_protect {
            return;
        }
        // Written this epoch: harvested non-hot pages (write-protected, so a bit means a real write) and hot
        // pages that changed.
        self.scratch.copy_from_slice(&self.harvested);
        for &p in unchanged_hot {
            let (w, b) = ((p / 64) as usize, p % 64);
            if let Some(s) = self.scratch.get_mut(w) {
                *s &= !(1 << b);
            }
        }
        let mut count = popcount(&self.hot);
        let min = self.promote_min;
        for ((hot, written), hist) in self
            .hot
            .iter_mut()
            .zip(&self.scratch)
            .zip(self.history.chunks_exact_mut(64))
        {
            if *written == 0 && hist.iter().all(|&h| h == 0) {
                continue;
            }
            for (bit, h) in hist.iter_mut().enumerate() {
                let w = u8::from(*written & (1 << bit) != 0);
                *h = (*h << 1) | w;
                if *hot & (1 << bit) != 0 && h.count_ones() < min {
                    // Cooled down: written in fewer than `min` of the last epochs.
                    *hot &= !(1 << bit);
                    count -= 1;
                    continue;
                }
                if w != 0
                    && *hot & (1 << bit) == 0
                    && count < self.hot_limit
                    && h.count_ones() >= min
                {
                    *hot |= 1 << bit;
                    count += 1;
                }
            }
        }
        self.hot_count = count;
    }

    /// How many pages are dirty right now, without losing any bit (the vCPUs may be running). With manual
    /// protect this only reads KVM's log; without it, the bits it clears are kept in the carry-over.
    pub fn peek_count(&mut self, vm: &KvmVm, ram: &GuestRam) -> Result<u64, VstateError> {
        vm.get_dirty_log(&mut self.scratch)?;
        ram.take_vmm_dirty(&mut self.carry);
        let manual = vm.manual_protect();
        let mut n = 0u64;
        for (s, c) in self.scratch.iter().zip(self.carry.iter_mut()) {
            if manual {
                n += u64::from((*s | *c).count_ones());
            } else {
                *c |= *s;
                n += u64::from(c.count_ones());
            }
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tracker_with(harvested: &[u64], limit: u64) -> DirtyTracker {
        let mut t = DirtyTracker::new(harvested.len());
        t.harvested.copy_from_slice(harvested);
        t.set_hot_limit(limit);
        t
    }

    #[test]
    fn pages_written_twice_in_a_row_become_hot_and_unchanged_ones_cool_down() {
        let mut t = tracker_with(&[0b1111], 16);
        t.feedback(true, &[]);
        assert_eq!(t.hot_count(), 0, "one epoch is not enough");
        t.harvested[0] = 0b0111;
        t.feedback(true, &[]);
        assert_eq!(t.hot[0], 0b0111);
        // Page 1 stays hot but no longer changes: demoted once written in fewer than 2 of 8 epochs.
        t.harvested[0] = 0b0111;
        for _ in 0..6 {
            t.feedback(true, &[1]);
            assert!(t.is_hot(1));
        }
        t.feedback(true, &[1]);
        assert_eq!(t.hot[0], 0b0101);
        assert!(t.is_hot(0) && !t.is_hot(1) && t.is_hot(2));
        // Classic mode never makes pages hot.
        let mut c = tracker_with(&[0b1], 16);
        c.feedback(false, &[]);
        c.feedback(false, &[]);
        assert_eq!(c.hot_count(), 0);
    }

    #[test]
    fn a_page_written_every_few_epochs_becomes_hot_through_the_window() {
        // A sweep slower than one pass per epoch: page 0 written in epochs 0 and 3, never two in a row.
        let mut t = tracker_with(&[0b1], 16);
        t.feedback(true, &[]);
        for _ in 0..2 {
            t.harvested[0] = 0b10;
            t.feedback(true, &[]);
        }
        assert!(!t.is_hot(0), "one write in three epochs");
        assert!(t.is_hot(1), "two in a row still promote");
        t.harvested[0] = 0b1;
        t.feedback(true, &[]);
        assert!(t.is_hot(0), "written in 2 of the last 4 epochs");
        // A stricter threshold waits for more evidence; faults count the non-hot harvested pages.
        let mut s = tracker_with(&[0b1], 16);
        s.set_hot_policy(16, 3);
        s.feedback(true, &[]);
        s.feedback(true, &[]);
        assert!(!s.is_hot(0));
        assert_eq!(s.last_faults(), 1);
        s.feedback(true, &[]);
        assert!(s.is_hot(0));
        s.feedback(true, &[]);
        assert_eq!(s.last_faults(), 0, "a hot page does not fault");
    }

    #[test]
    fn the_hot_set_is_capped() {
        let mut t = tracker_with(&[u64::MAX, u64::MAX], 10);
        t.feedback(true, &[]);
        t.feedback(true, &[]);
        assert_eq!(t.hot_count(), 10);
        assert_eq!(popcount(&t.hot), 10);
        t.set_hot_limit(4);
        assert_eq!(t.hot_count(), 4, "a lowered cap demotes the excess");
        assert_eq!(popcount(&t.hot), 4);
        t.set_hot_limit(0);
        assert_eq!(t.hot_count(), 0);
    }
}
