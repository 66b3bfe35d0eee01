//! Sets of guest pages as sorted, coalesced runs (in the style of Cloud Hypervisor's
//! `vm-migration` `MemoryRangeTable`).
//!
//! A [`MemoryRangeTable`] is the compact form of a dirty-page bitmap: the list of maximal runs of
//! consecutive dirty pages, counted in guest page frame numbers (page index = guest physical
//! address / 4096). It is what a checkpoint frame carries to say which pages follow
//! (see [`crate::frame`]).
//!
//! Invariants of every table (checked by [`MemoryRangeTable::from_ranges`], guaranteed by
//! [`MemoryRangeTable::from_bitmap`]):
//! * every range has `pages > 0` and `first_page + pages` does not overflow `u64`;
//! * ranges are sorted by `first_page`;
//! * ranges neither overlap nor touch: `ranges[i].end() < ranges[i + 1].first_page`, so the
//!   representation of a page set is unique.

use std::fmt;

/// A run of `pages` consecutive guest pages starting at page frame `first_page`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MemoryRange {
    /// Index of the first page (guest physical address / page size).
    pub first_page: u64,
    /// Number of pages in the run.
    pub pages: u64,
}

impl MemoryRange {
    /// One past the last page of the run, or `None` if that overflows `u64`.
    pub fn checked_end(&self) -> Option<u64> {
        self.first_page.checked_add(self.pages)
    }
}

/// Why a list of ranges is not a valid [`MemoryRangeTable`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RangeError {
    /// A range with `pages == 0`.
    #[error("range {index} (first_page {first_page}) is empty")]
    Empty {
        /// Position of the offending range in the input.
        index: usize,
        /// Its first page.
        first_page: u64,
    },
    /// `first_page + pages` overflows `u64`.
    #[error("range {index}: first_page {first_page} + pages {pages} overflows u64")]
    Overflow {
        /// Position of the offending range in the input.
        index: usize,
        /// Its first page.
        first_page: u64,
        /// Its page count.
        pages: u64,
    },
    /// A range starts before the end of the previous one (unsorted or overlapping input).
    #[error(
        "range {index} starts at page {first_page}, before the end {previous_end} of the previous range (unsorted or overlapping)"
    )]
    Unsorted {
        /// Position of the offending range in the input.
        index: usize,
        /// Its first page.
        first_page: u64,
        /// One past the last page of the previous range.
        previous_end: u64,
    },
}

/// A set of guest pages as sorted, non-overlapping, non-adjacent, non-empty runs.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct MemoryRangeTable {
    ranges: Vec<MemoryRange>,
    page_count: u64,
}

impl fmt::Debug for MemoryRangeTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryRangeTable")
            .field("page_count", &self.page_count)
            .field("ranges", &self.ranges)
            .finish()
    }
}

impl MemoryRangeTable {
    /// Builds the table of a dirty bitmap: bit `b` of word `w` set means page `w * 64 + b` is in
    /// the set. Adjacent pages (also across word boundaries) are coalesced into one range.
    ///
    /// Runs in time proportional to the number of words plus the number of runs: zero and
    /// all-ones words cost one comparison, other words are scanned run by run with
    /// `trailing_zeros`.
    pub fn from_bitmap(bitmap: &[u64]) -> Self {
        let mut ranges = Vec::new();
        let mut page_count = 0u64;
        // Start of the run that is still open at the current position, if any.
        let mut open: Option<u64> = None;
        let mut close = |start: u64, end: u64, ranges: &mut Vec<MemoryRange>| {
            ranges.push(MemoryRange {
                first_page: start,
                pages: end - start,
            });
            page_count += end - start;
        };
        for (w, &word) in bitmap.iter().enumerate() {
            let base = w as u64 * 64;
            if word == 0 {
                if let Some(start) = open.take() {
                    close(start, base, &mut ranges);
                }
                continue;
            }
            if word == u64::MAX {
                open.get_or_insert(base);
                continue;
            }
            // Scan the word: alternately look for the next set bit (no run open) and the next
            // clear bit (run open) at or after `pos`.
            let mut pos = 0u32;
            while pos < 64 {
                let above = u64::MAX << pos;
                match open {
                    Some(start) => {
                        let zeros = !word & above;
                        if zeros == 0 {
                            break; // the run continues into the next word
                        }
                        let z = zeros.trailing_zeros();
                        close(start, base + u64::from(z), &mut ranges);
                        open = None;
                        pos = z;
                    }
                    None => {
                        let ones = word & above;
                        if ones == 0 {
                            break;
                        }
                        let o = ones.trailing_zeros();
                        open = Some(base + u64::from(o));
                        pos = o;
                    }
                }
            }
        }
        if let Some(start) = open {
            close(start, bitmap.len() as u64 * 64, &mut ranges);
        }
        MemoryRangeTable { ranges, page_count }
    }

    /// Builds a table from ranges that must be sorted, non-overlapping and non-empty, and whose
    /// ends must not overflow. Ranges that touch (`a.first_page + a.pages == b.first_page`) are
    /// accepted and coalesced, so the result is canonical.
    pub fn from_ranges(ranges: Vec<MemoryRange>) -> Result<Self, RangeError> {
        let mut out: Vec<MemoryRange> = Vec::with_capacity(ranges.len());
        let mut page_count = 0u64;
        for (index, r) in ranges.into_iter().enumerate() {
            if r.pages == 0 {
                return Err(RangeError::Empty {
                    index,
                    first_page: r.first_page,
                });
            }
            if r.checked_end().is_none() {
                return Err(RangeError::Overflow {
                    index,
                    first_page: r.first_page,
                    pages: r.pages,
                });
            }
            // Page counts cannot overflow: the ranges are disjoint subsets of 0..u64::MAX.
            page_count += r.pages;
            match out.last_mut() {
                Some(prev) => {
                    let previous_end = prev.first_page + prev.pages;
                    if r.first_page < previous_end {
                        return Err(RangeError::Unsorted {
                            index,
                            first_page: r.first_page,
                            previous_end,
                        });
                    }
                    if r.first_page == previous_end {
                        prev.pages += r.pages;
                    } else {
                        out.push(r);
                    }
                }
                None => out.push(r),
            }
        }
        Ok(MemoryRangeTable {
            ranges: out,
            page_count,
        })
    }

    /// Builds a table from ranges already known to satisfy every invariant (strictly increasing,
    /// non-adjacent, non-empty, no overflow), with their total page count.
    pub(crate) fn from_canonical_unchecked(ranges: Vec<MemoryRange>, page_count: u64) -> Self {
        debug_assert_eq!(
            Self::from_ranges(ranges.clone()).map(|t| t.ranges.len()),
            Ok(ranges.len())
        );
        MemoryRangeTable { ranges, page_count }
    }

    /// The ranges, sorted, coalesced and non-empty.
    pub fn ranges(&self) -> &[MemoryRange] {
        &self.ranges
    }

    /// Total number of pages in the set.
    pub fn page_count(&self) -> u64 {
        self.page_count
    }

    /// One past the highest page in the set (0 for an empty set): the set lies in `0..end_page()`.
    pub fn end_page(&self) -> u64 {
        self.ranges.last().map_or(0, |r| r.first_page + r.pages)
    }

    /// Every page of the set, in increasing order.
    pub fn pages(&self) -> impl Iterator<Item = u64> + '_ {
        self.ranges
            .iter()
            .flat_map(|r| r.first_page..r.first_page + r.pages)
    }

    /// Whether the set has no page.
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// Whether `page` is in the set (binary search).
    pub fn contains(&self, page: u64) -> bool {
        let i = self.ranges.partition_point(|r| r.first_page <= page);
        i > 0
            && self
                .ranges
                .get(i - 1)
                .is_some_and(|r| page - r.first_page < r.pages)
    }

    /// The bitmap of the set, the inverse of [`from_bitmap`](Self::from_bitmap): at least
    /// `words` words, more if the set reaches beyond page `words * 64` (no page is ever dropped).
    pub fn to_bitmap(&self, words: usize) -> Vec<u64> {
        let needed = usize::try_from(self.end_page().div_ceil(64)).unwrap_or(usize::MAX);
        let mut bitmap = vec![0u64; words.max(needed)];
        // Cannot fail: the bitmap covers `end_page()`.
        let _ = self.or_into_bitmap(&mut bitmap);
        bitmap
    }

    /// Sets the bit of every page of the set in `bitmap` (bit `b` of word `w` = page `w*64+b`),
    /// e.g. to put dirty bits back after a failed transfer. Returns `false` and changes nothing
    /// if the bitmap is too short to hold the highest page.
    pub fn or_into_bitmap(&self, bitmap: &mut [u64]) -> bool {
        if self.end_page() > bitmap.len() as u64 * 64 {
            return false;
        }
        for r in &self.ranges {
            let end = r.first_page + r.pages;
            let mut p = r.first_page;
            while p < end {
                let bit = p % 64;
                let n = (64 - bit).min(end - p);
                let mask = if n == 64 {
                    u64::MAX
                } else {
                    ((1u64 << n) - 1) << bit
                };
                if let Some(word) = bitmap.get_mut((p / 64) as usize) {
                    *word |= mask;
                }
                p += n;
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn r(first_page: u64, pages: u64) -> MemoryRange {
        MemoryRange { first_page, pages }
    }

    /// Reference implementation: one bit at a time.
    fn naive(bitmap: &[u64]) -> Vec<MemoryRange> {
        let mut out: Vec<MemoryRange> = Vec::new();
        for page in 0..bitmap.len() as u64 * 64 {
            if bitmap[(page / 64) as usize] >> (page % 64) & 1 == 1 {
                match out.last_mut() {
                    Some(last) if last.first_page + last.pages == page => last.pages += 1,
                    _ => out.push(r(page, 1)),
                }
            }
        }
        out
    }

    #[test]
    fn empty() {
        for words in [0, 1, 5] {
            let t = MemoryRangeTable::from_bitmap(&vec![0; words]);
            assert!(t.is_empty());
            assert_eq!(t.page_count(), 0);
            assert_eq!(t.end_page(), 0);
            assert_eq!(t.pages().count(), 0);
            assert_eq!(t.to_bitmap(words), vec![0; words]);
        }
        assert_eq!(
            MemoryRangeTable::from_ranges(vec![]).unwrap(),
            MemoryRangeTable::default()
        );
    }

    #[test]
    fn coalescing_within_and_across_words() {
        // pages 3..6, 62..130 (crosses two word boundaries, includes a full word), 191, 192
        let mut bm = vec![0u64; 4];
        for p in (3..6).chain(62..130).chain([191, 192]) {
            bm[p / 64] |= 1 << (p % 64);
        }
        let t = MemoryRangeTable::from_bitmap(&bm);
        assert_eq!(t.ranges(), &[r(3, 3), r(62, 68), r(191, 2)]);
        assert_eq!(t.page_count(), 73);
        assert_eq!(t.end_page(), 193);
        assert_eq!(t.to_bitmap(4), bm);
        assert!(t.contains(62) && t.contains(129) && !t.contains(130) && !t.contains(2));
    }

    #[test]
    fn full_and_alternating() {
        let t = MemoryRangeTable::from_bitmap(&[u64::MAX; 3]);
        assert_eq!(t.ranges(), &[r(0, 192)]);
        let t = MemoryRangeTable::from_bitmap(&[0xAAAA_AAAA_AAAA_AAAA, 1]);
        assert_eq!(t.ranges().len(), 32);
        assert_eq!(t.ranges()[31], r(63, 2)); // bit 63 of word 0 joins bit 0 of word 1
        assert_eq!(t.page_count(), 33);
    }

    #[test]
    fn from_ranges_validation() {
        let t = MemoryRangeTable::from_ranges(vec![r(0, 2), r(2, 3), r(10, 1)]).unwrap();
        assert_eq!(t.ranges(), &[r(0, 5), r(10, 1)]);
        assert_eq!(t.page_count(), 6);
        assert!(matches!(
            MemoryRangeTable::from_ranges(vec![r(0, 0)]),
            Err(RangeError::Empty { index: 0, .. })
        ));
        assert!(matches!(
            MemoryRangeTable::from_ranges(vec![r(5, 2), r(6, 1)]),
            Err(RangeError::Unsorted { index: 1, .. })
        ));
        assert!(matches!(
            MemoryRangeTable::from_ranges(vec![r(5, 2), r(1, 1)]),
            Err(RangeError::Unsorted { index: 1, .. })
        ));
        assert!(matches!(
            MemoryRangeTable::from_ranges(vec![r(u64::MAX, 2)]),
            Err(RangeError::Overflow { index: 0, .. })
        ));
        // The very last page is representable.
        let t = MemoryRangeTable::from_ranges(vec![r(u64::MAX - 1, 1)]).unwrap();
        assert_eq!(t.end_page(), u64::MAX);
    }

    #[test]
    fn or_into_too_small_changes_nothing() {
        let t = MemoryRangeTable::from_ranges(vec![r(1, 1), r(64, 1)]).unwrap();
        let mut bm = vec![0u64; 1];
        assert!(!t.or_into_bitmap(&mut bm));
        assert_eq!(bm, vec![0]);
        assert_eq!(t.to_bitmap(1), vec![2, 1]);
    }

    proptest! {
        #[test]
        fn bitmap_round_trip(bm in proptest::collection::vec(
            prop_oneof![Just(0u64), Just(u64::MAX), any::<u64>(), (0u32..64).prop_map(|s| u64::MAX << s)],
            0..40,
        )) {
            let t = MemoryRangeTable::from_bitmap(&bm);
            let expected = naive(&bm);
            prop_assert_eq!(t.ranges(), expected.as_slice());
            prop_assert_eq!(t.to_bitmap(bm.len()), bm.clone());
            let ones: u64 = bm.iter().map(|w| u64::from(w.count_ones())).sum();
            prop_assert_eq!(t.page_count(), ones);
            prop_assert_eq!(t.pages().count() as u64, ones);
            prop_assert!(t.pages().all(|p| t.contains(p)));
            // Canonical: from_ranges of the output is the identity.
            prop_assert_eq!(MemoryRangeTable::from_ranges(t.ranges().to_vec()).unwrap(), t);
        }
    }
}
