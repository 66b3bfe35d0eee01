//! The output gate: the one place where guest output leaves the engine.
//!
//! Devices hand the output of an epoch to the gate when the epoch is captured ([`OutputGate::hold`]);
//! the gate passes it to its sink only when that epoch is committed ([`OutputGate::release_through`]) —
//! by the local replica in a single-host run, by the secondary's acknowledgement under FT. Output of an
//! epoch that is never committed is never seen, so a failover can never show the outside world output
//! that the surviving replica has not also produced.

use std::collections::VecDeque;

/// Receives released output, in epoch order.
pub trait OutputSink: Send {
    /// `bytes` were produced during `epoch`, which is now committed.
    fn release(&mut self, epoch: u64, bytes: &[u8]);
}

impl<F: FnMut(u64, &[u8]) + Send> OutputSink for F {
    fn release(&mut self, epoch: u64, bytes: &[u8]) {
        self(epoch, bytes)
    }
}

/// Holds each epoch's output until the epoch is committed.
pub struct OutputGate {
    held: VecDeque<(u64, Vec<u8>)>,
    sink: Box<dyn OutputSink>,
    released_bytes: u64,
    released_through: Option<u64>,
}

impl std::fmt::Debug for OutputGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutputGate")
            .field("held_epochs", &self.held.len())
            .field("released_bytes", &self.released_bytes)
            .field("released_through", &self.released_through)
            .finish()
    }
}

impl OutputGate {
    /// A gate releasing into `sink`.
    pub fn new(sink: impl OutputSink + 'static) -> Self {
        OutputGate {
            held: VecDeque::new(),
            sink: Box::new(sink),
            released_bytes: 0,
            released_through: None,
        }
    }

    /// Holds the output of `epoch` (epochs must be held in increasing order).
    pub fn hold(&mut self, epoch: u64, bytes: &[u8]) {
        debug_assert!(self.held.back().is_none_or(|(e, _)| *e < epoch));
        self.held.push_back((epoch, bytes.to_vec()));
    }

    /// Releases every held epoch up to and including `epoch`; returns the bytes released.
    pub fn release_through(&mut self, epoch: u64) -> u64 {
        let mut n = 0;
        while self.held.front().is_some_and(|(e, _)| *e <= epoch) {
            if let Some((e, bytes)) = self.held.pop_front() {
                self.sink.release(e, &bytes);
                n += bytes.len() as u64;
            }
        }
        self.released_bytes += n;
        self.released_through = Some(self.released_through.map_or(epoch, |r| r.max(epoch)));
        n
    }

    /// Bytes held back, not yet committed.
    pub fn held_bytes(&self) -> u64 {
        self.held.iter().map(|(_, b)| b.len() as u64).sum()
    }

    /// Bytes released so far.
    pub fn released_bytes(&self) -> u64 {
        self.released_bytes
    }

    /// Takes every held byte, oldest epoch first, leaving the gate empty (the session that would have
    /// committed them is gone; the caller decides their fate).
    pub fn take_held(&mut self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.held_bytes() as usize);
        for (_, b) in self.held.drain(..) {
            out.extend_from_slice(&b);
        }
        out
    }

    /// Drops held output of uncommitted epochs (the primary is being abandoned).
    pub fn discard_held(&mut self) -> u64 {
        let n = self.held_bytes();
        self.held.clear();
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[test]
    fn releases_only_committed_epochs_in_order() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = Arc::clone(&seen);
        let mut gate =
            OutputGate::new(move |e: u64, b: &[u8]| s.lock().unwrap().push((e, b.to_vec())));
        gate.hold(1, b"a");
        gate.hold(2, b"bc");
        gate.hold(3, b"d");
        assert!(seen.lock().unwrap().is_empty());
        assert_eq!(gate.release_through(2), 3);
        assert_eq!(
            *seen.lock().unwrap(),
            vec![(1, b"a".to_vec()), (2, b"bc".to_vec())]
        );
        assert_eq!(gate.held_bytes(), 1);
        assert_eq!(gate.discard_held(), 1);
        assert_eq!(gate.release_through(3), 0);
    }
}
