//! Stun-time statistics.

use std::time::Duration;

/// Every stun of a run, for percentiles.
#[derive(Clone, Debug, Default)]
pub struct StunStats {
    samples_ns: Vec<u64>,
}

impl StunStats {
    /// Records one stun.
    pub fn record(&mut self, d: Duration) {
        self.samples_ns
            .push(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    }

    /// Number of stuns.
    pub fn count(&self) -> usize {
        self.samples_ns.len()
    }

    /// The `p`-th percentile (0..=100), or zero without samples.
    pub fn percentile(&self, p: f64) -> Duration {
        percentile(&self.samples_ns, p)
    }

    /// Longest stun.
    pub fn max(&self) -> Duration {
        Duration::from_nanos(self.samples_ns.iter().copied().max().unwrap_or(0))
    }

    /// Forgets all samples.
    pub fn clear(&mut self) {
        self.samples_ns.clear();
    }
}

/// Nearest-rank percentile of nanosecond samples.
pub fn percentile(samples_ns: &[u64], p: f64) -> Duration {
    if samples_ns.is_empty() {
        return Duration::ZERO;
    }
    let mut v = samples_ns.to_vec();
    v.sort_unstable();
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    Duration::from_nanos(v[rank.clamp(1, v.len()) - 1])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), Duration::from_nanos(50));
        assert_eq!(percentile(&v, 99.0), Duration::from_nanos(99));
        assert_eq!(percentile(&v, 100.0), Duration::from_nanos(100));
        assert_eq!(percentile(&[], 50.0), Duration::ZERO);
    }
}
