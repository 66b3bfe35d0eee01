//! The client's side of a sequence-numbered UDP stream (the `qudp` test guest's: each datagram's payload
//! starts with its sequence number 1, 2, … as a big-endian u64): a [`Receiver`] on a lab host records
//! every datagram's arrival time and sequence number; [`analyze`] reports gaps, repeats, reordering and
//! the largest silence. Used by the COLO stream test, the demo, the fault campaign and the bench.

use std::collections::HashSet;
use std::fmt;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::netns::{Lab, NetnsError, Result};

/// The most arrivals a [`Receiver`] keeps (later ones are counted in [`StreamReport::dropped`] only):
/// 1 M × 24 bytes, an hour of a 250 packets/s stream.
pub const MAX_ARRIVALS: usize = 1 << 20;
/// The most sequence numbers a report lists per kind (the counts are always exact).
pub const MAX_LISTED: usize = 32;

/// One datagram as the client saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Arrival {
    /// When it was read.
    pub at: Instant,
    /// Its sequence number.
    pub seq: u64,
}

#[derive(Debug, Default)]
struct Log {
    arrivals: Vec<Arrival>,
    malformed: u64,
    dropped: u64,
}

/// A UDP socket on a lab host recording the stream on a thread of its own; stopped on drop.
#[derive(Debug)]
pub struct Receiver {
    log: Arc<Mutex<Log>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    addr: SocketAddr,
}

impl Receiver {
    /// Binds `0.0.0.0:port` inside `host`'s namespace and starts recording.
    pub fn start(lab: &Lab, host: &str, port: u16) -> Result<Receiver> {
        let sock = lab.in_host(host, || UdpSocket::bind(("0.0.0.0", port)))?;
        let sock = sock.map_err(|source| NetnsError::Io {
            context: format!("bind UDP port {port} in {host}"),
            source,
        })?;
        Self::on(sock)
    }

    /// Records what arrives on `sock`.
    pub fn on(sock: UdpSocket) -> Result<Receiver> {
        let io = |context: &str| {
            let context = context.to_string();
            move |source| NetnsError::Io { context, source }
        };
        let addr = sock.local_addr().map_err(io("local_addr"))?;
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .map_err(io("set_read_timeout"))?;
        let log = Arc::new(Mutex::new(Log::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (l, s) = (log.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("stream-rx".into())
            .spawn(move || {
                let mut buf = [0u8; 2048];
                while !s.load(Ordering::Relaxed) {
                    let Ok(n) = sock.recv(&mut buf) else { continue };
                    let at = Instant::now();
                    let mut log = l.lock().unwrap_or_else(|p| p.into_inner());
                    match buf.get(..8).filter(|_| n >= 8) {
                        None => log.malformed += 1,
                        Some(b) if log.arrivals.len() < MAX_ARRIVALS => {
                            let seq = u64::from_be_bytes(b.try_into().unwrap_or_default());
                            log.arrivals.push(Arrival { at, seq });
                        }
                        Some(_) => log.dropped += 1,
                    }
                }
            })
            .map_err(io("spawn the receiver thread"))?;
        Ok(Receiver {
            log,
            stop,
            thread: Some(thread),
            addr,
        })
    }

    /// The socket's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A copy of the arrivals so far.
    pub fn arrivals(&self) -> Vec<Arrival> {
        self.log
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .arrivals
            .clone()
    }

    /// The highest sequence number received so far.
    pub fn max_seq(&self) -> Option<u64> {
        let log = self.log.lock().unwrap_or_else(|p| p.into_inner());
        log.arrivals.iter().map(|a| a.seq).max()
    }

    /// Waits until a datagram with a sequence number above `seq` arrived (or `timeout` passed) and
    /// returns the first such arrival.
    pub fn wait_above(&self, seq: u64, timeout: Duration) -> Option<Arrival> {
        let end = Instant::now() + timeout;
        let mut from = 0;
        loop {
            {
                let log = self.log.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(a) = log.arrivals[from..].iter().find(|a| a.seq > seq) {
                    return Some(*a);
                }
                from = log.arrivals.len();
            }
            if Instant::now() >= end {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The report on everything received so far.
    pub fn report(&self) -> StreamReport {
        let log = self.log.lock().unwrap_or_else(|p| p.into_inner());
        let mut r = analyze(&log.arrivals);
        r.malformed = log.malformed;
        r.dropped = log.dropped;
        r
    }

    /// Stops the thread and returns the final report.
    pub fn finish(mut self) -> StreamReport {
        self.halt();
        self.report()
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.halt();
    }
}

/// Missing sequence numbers between two received ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gap {
    /// The last received before the gap.
    pub after: u64,
    /// The first received after it.
    pub before: u64,
}

impl Gap {
    /// How many sequence numbers are missing.
    pub fn missing(&self) -> u64 {
        self.before - self.after - 1
    }
}

/// What a stream looked like at the client.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StreamReport {
    /// Datagrams recorded.
    pub received: u64,
    /// Distinct sequence numbers.
    pub distinct: u64,
    /// Lowest and highest sequence number (0 if none).
    pub first: u64,
    /// See `first`.
    pub last: u64,
    /// Gaps between `first` and `last`, in order (at most [`MAX_LISTED`]).
    pub gaps: Vec<Gap>,
    /// Number of gaps.
    pub gap_count: u64,
    /// Sequence numbers missing between `first` and `last`.
    pub missing: u64,
    /// Arrivals of a sequence number already seen.
    pub repeats: u64,
    /// The first repeated sequence numbers (at most [`MAX_LISTED`]).
    pub repeated: Vec<u64>,
    /// Arrivals below the highest sequence number seen before them (not repeats).
    pub reordered: u64,
    /// The first of them, each with the highest sequence number seen before it (at most
    /// [`MAX_LISTED`]).
    pub late: Vec<(u64, u64)>,
    /// The longest time between two consecutive arrivals.
    pub largest_silence: Duration,
    /// The sequence numbers on either side of that silence.
    pub silence_between: (u64, u64),
    /// Datagrams shorter than a sequence number.
    pub malformed: u64,
    /// Datagrams not recorded (beyond [`MAX_ARRIVALS`]).
    pub dropped: u64,
}

impl fmt::Display for StreamReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "received {} ({}..={}), gaps {} (missing {}), repeats {}, reordered {}, largest silence {:.0} ms (after {}, before {})",
            self.received,
            self.first,
            self.last,
            self.gap_count,
            self.missing,
            self.repeats,
            self.reordered,
            self.largest_silence.as_secs_f64() * 1e3,
            self.silence_between.0,
            self.silence_between.1
        )?;
        if !self.gaps.is_empty() {
            let g: Vec<String> = self
                .gaps
                .iter()
                .map(|g| format!("{}..{}", g.after + 1, g.before - 1))
                .collect();
            write!(f, "; missing ranges {}", g.join(", "))?;
        }
        if !self.late.is_empty() {
            write!(f, "; late (seq, after max) {:?}", self.late)?;
        }
        if !self.repeated.is_empty() {
            write!(f, "; repeated {:?}", self.repeated)?;
        }
        if self.malformed + self.dropped > 0 {
            write!(
                f,
                "; malformed {}, not recorded {}",
                self.malformed, self.dropped
            )?;
        }
        Ok(())
    }
}

/// Gaps, repeats, reordering and the largest silence of `arrivals` (in arrival order).
pub fn analyze(arrivals: &[Arrival]) -> StreamReport {
    let mut r = StreamReport {
        received: arrivals.len() as u64,
        ..StreamReport::default()
    };
    let mut seen = HashSet::with_capacity(arrivals.len());
    let mut max = None::<u64>;
    for (i, a) in arrivals.iter().enumerate() {
        if !seen.insert(a.seq) {
            r.repeats += 1;
            if r.repeated.len() < MAX_LISTED {
                r.repeated.push(a.seq);
            }
        } else if let Some(m) = max.filter(|&m| a.seq < m) {
            r.reordered += 1;
            if r.late.len() < MAX_LISTED {
                r.late.push((a.seq, m));
            }
        }
        max = max.max(Some(a.seq));
        if let Some(prev) = i.checked_sub(1).map(|p| arrivals[p]) {
            let d = a.at.saturating_duration_since(prev.at);
            if d > r.largest_silence {
                r.largest_silence = d;
                r.silence_between = (prev.seq, a.seq);
            }
        }
    }
    let mut seqs: Vec<u64> = seen.into_iter().collect();
    seqs.sort_unstable();
    r.distinct = seqs.len() as u64;
    r.first = seqs.first().copied().unwrap_or(0);
    r.last = seqs.last().copied().unwrap_or(0);
    for w in seqs.windows(2) {
        if w[1] > w[0] + 1 {
            let g = Gap {
                after: w[0],
                before: w[1],
            };
            r.gap_count += 1;
            r.missing += g.missing();
            if r.gaps.len() < MAX_LISTED {
                r.gaps.push(g);
            }
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(seqs: &[(u64, u64)]) -> Vec<Arrival> {
        let t0 = Instant::now();
        seqs.iter()
            .map(|&(ms, seq)| Arrival {
                at: t0 + Duration::from_millis(ms),
                seq,
            })
            .collect()
    }

    #[test]
    fn a_clean_stream() {
        let r = analyze(&stream(&[(0, 1), (10, 2), (20, 3), (30, 4)]));
        assert_eq!((r.received, r.distinct, r.first, r.last), (4, 4, 1, 4));
        assert_eq!(
            (r.gap_count, r.missing, r.repeats, r.reordered),
            (0, 0, 0, 0)
        );
        assert_eq!(r.largest_silence, Duration::from_millis(10));
    }

    #[test]
    fn gaps_repeats_reordering_and_silence() {
        let r = analyze(&stream(&[
            (0, 1),
            (10, 2),
            (20, 5),
            (180, 9),
            (190, 4),
            (200, 9),
            (210, 10),
        ]));
        assert_eq!(
            r.gaps,
            vec![
                Gap {
                    after: 2,
                    before: 4
                },
                Gap {
                    after: 5,
                    before: 9
                }
            ]
        );
        assert_eq!((r.gap_count, r.missing), (2, 4));
        assert_eq!((r.repeats, r.repeated.clone()), (1, vec![9]));
        assert_eq!((r.reordered, r.late.clone()), (1, vec![(4, 9)]));
        assert_eq!(r.largest_silence, Duration::from_millis(160));
        assert_eq!(r.silence_between, (5, 9));
        let text = r.to_string();
        assert!(text.contains("missing ranges 3..3, 6..8"), "{text}");
    }

    #[test]
    fn empty() {
        assert_eq!(analyze(&[]), StreamReport::default());
    }
}
