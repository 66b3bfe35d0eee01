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
//! Under write-protection dirty logging, the first guest write to a page in each epoch faults (≈ 4.5 µs
//! on the PVM machines this was built on) — at 100 epochs/s with 1024 pages rewritten per epoch that
//! alone costs the guest half its time. Copying a page costs ≈ 0.4 µs. So, in manual-protect mode, a page
//! written in two consecutive epochs becomes *hot*: its KVM dirty bit is not cleared at commit, so it
//! stays writable (no more faults) and is harvested — copied — every epoch. After each capture the epoch
//! engine reports which hot pages did not change (a comparison with the last sent contents, outside the
//! stun); those are demoted and re-protected at the next commit. The dirty set stays a superset of the
//! pages really written, so checkpoints are exactly as correct; the cost is at most one extra copy of a
//! page that stopped changing. The number of hot pages is capped.

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
    prev_written: Vec<u64>,
}

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
            prev_written: vec![0; words],
        }
    }

    /// Allows up to `limit` hot pages (0 disables hot pages). Only honoured in manual-protect mode.
    pub fn set_hot_limit(&mut self, limit: u64) {
        self.hot_limit = limit;
        if limit == 0 {
            // Demote everything: the next commit re-protects them.
            self.hot.fill(0);
            self.hot_count = 0;
        }
    }

    /// Number of hot pages.
    pub fn hot_count(&self) -> u64 {
        self.hot_count
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
    /// contents did not change this epoch. Demotes those, and promotes pages written in this epoch and the
    /// previous one (up to the limit). A no-op unless hot pages are enabled and `manual_protect` holds.
    pub fn feedback(&mut self, manual_protect: bool, unchanged_hot: &[u64]) {
        if self.hot_limit == 0 || !manual_protect {
            return;
        }
        // Written this epoch: harvested non-hot pages (write-protected, so a bit means a real write) and hot
        // pages that changed.
        self.scratch.copy_from_slice(&self.harvested);
        for &p in unchanged_hot {
            let (w, b) = ((p / 64) as usize, p % 64);
            if let (Some(s), Some(hot)) = (self.scratch.get_mut(w), self.hot.get_mut(w)) {
                *s &= !(1 << b);
                *hot &= !(1 << b);
            }
        }
        let mut count = popcount(&self.hot);
        for ((hot, written), prev) in self
            .hot
            .iter_mut()
            .zip(&self.scratch)
            .zip(self.prev_written.iter_mut())
        {
            let promote = *written & *prev & !*hot;
            if promote != 0 && count < self.hot_limit {
                let room = self.hot_limit - count;
                let promote = if u64::from(promote.count_ones()) <= room {
                    promote
                } else {
                    // Keep the lowest `room` bits.
                    let mut p = promote;
                    let mut kept = 0u64;
                    for _ in 0..room {
                        let low = p & p.wrapping_neg();
                        kept |= low;
                        p &= p - 1;
                    }
                    kept
                };
                *hot |= promote;
                count += u64::from(promote.count_ones());
            }
            *prev = *written;
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
        // Page 1 stayed hot but did not change: demoted.
        t.harvested[0] = 0b0111;
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
    fn the_hot_set_is_capped() {
        let mut t = tracker_with(&[u64::MAX, u64::MAX], 10);
        t.feedback(true, &[]);
        t.feedback(true, &[]);
        assert_eq!(t.hot_count(), 10);
        assert_eq!(popcount(&t.hot), 10);
        t.set_hot_limit(0);
        assert_eq!(t.hot_count(), 0);
    }
}
