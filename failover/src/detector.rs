//! The failure detector: one peer's liveness as a state machine, fed by heartbeat observations from
//! any path.
//!
//! ```text
//!            fresh packet                 silent ≥ suspect_after            silent ≥ timeout
//!  Unknown ───────────────▶ Alive ─────────────────────────▶ Suspect ─────────────────────▶ Dead
//!     │                      ▲ ▲                                │                             │
//!     │ silent ≥ timeout     │ └──────── fresh packet ──────────┘                             │
//!     └─────────▶ Dead ──────┴──────────────────── fresh packet ─────────────────────────────┘
//! ```
//! - A packet is **fresh** if its incarnation is the peer's current one and its sequence is larger than
//!   any seen before on the same path for the same kind (beat, echo). Duplicated or replayed packets do
//!   not refresh anything. A packet of an *older* incarnation is ignored.
//! - A packet of a **newer incarnation** means the peer restarted: the detector reports
//!   [`PeerEvent::Restarted`] (also when no death was noticed in between) and the peer is Alive.
//! - A peer never heard from becomes Dead `timeout` after the detector started, so a host that starts
//!   while its peer is down still fails over.
//! - Each path is tracked too ([`PeerEvent::PathDown`], [`PeerEvent::PathUp`]): the host is alive while
//!   *any* path delivers.
//! - The role and generation the peer advertises are reported ([`PeerEvent::Report`]) whenever they
//!   change, from fresh packets only.
//!
//! [`Detector`] is pure: it is given the current time with every call and says when it next needs a
//! [`Detector::tick`] ([`Detector::next_deadline`]), so it is tested with a fake clock. [`spawn`] runs it
//! on a thread of its own (`ax-detector`, `SCHED_FIFO` when the process may, see [`crate::rt`]; a
//! current-thread tokio runtime there for its timer): it reads the heartbeat's observations, sleeps
//! exactly until the next deadline, and publishes a [`PeerStatus`] on a `watch` channel and every
//! [`PeerEvent`] on an unbounded `mpsc` channel (events are transitions, at most a few per heartbeat).
//! [`spawn_task`] runs the same loop as a task of the caller's runtime (tests on a paused clock).
//!
//! **Silence is judged by this host's own scheduling too.** Observations carry the time the heartbeat
//! thread received them, and the driver takes in every queued observation before it judges a
//! deadline. A deadline that fires more than [`Detector::stall_threshold`] (timeout / 5, 20 ms by
//! default) late means this host was not running — the silence may be its own — so the detector
//! declares nothing until `stall_threshold` after it runs again ([`Detector::late_wakeup`]). On a
//! host that schedules the detector on time this never triggers and detection time is unchanged.
//!
//! Detection bound: a peer that dies is reported Dead at most `timeout` after the last fresh packet
//! from it, i.e. within `timeout + interval` (+ path latency) of its death.

use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, info};

use crate::heartbeat::{HeartbeatConfig, Kind, Observation, MAX_PATHS};
use crate::rt::{self, Realtime};

/// Detector errors.
#[derive(Debug, thiserror::Error)]
pub enum DetectorError {
    /// The configuration is unusable.
    #[error("bad detector configuration: {0}")]
    Config(String),
    /// The detector's thread or its timer could not be started.
    #[error("cannot start the detector thread: {0}")]
    Thread(#[source] std::io::Error),
}

/// Detector timing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DetectorConfig {
    /// Silence after which an Alive peer is Suspect (default 50 ms).
    pub suspect_after: Duration,
    /// Silence after which the peer (or a path) is Dead (default 100 ms).
    pub timeout: Duration,
    /// Number of paths (1 or 2).
    pub paths: usize,
}

impl Default for DetectorConfig {
    fn default() -> Self {
        DetectorConfig {
            suspect_after: Duration::from_millis(50),
            timeout: HeartbeatConfig::DEFAULT_TIMEOUT,
            paths: 1,
        }
    }
}

impl DetectorConfig {
    /// The detector matching a heartbeat configuration: same timeout and path count, Suspect after
    /// half the timeout (but never before two intervals).
    pub fn from_heartbeat(hb: &HeartbeatConfig) -> Self {
        DetectorConfig {
            suspect_after: (hb.timeout / 2).max(hb.interval * 2).min(hb.timeout),
            timeout: hb.timeout,
            paths: hb.paths.len(),
        }
    }

    /// Checks the timing and the path count.
    pub fn validate(&self) -> Result<(), DetectorError> {
        if self.timeout.is_zero()
            || self.suspect_after.is_zero()
            || self.suspect_after > self.timeout
        {
            return Err(DetectorError::Config(format!(
                "need 0 < suspect_after ({:?}) <= timeout ({:?})",
                self.suspect_after, self.timeout
            )));
        }
        if self.paths == 0 || self.paths > MAX_PATHS {
            return Err(DetectorError::Config(format!(
                "{} paths; need 1..={MAX_PATHS}",
                self.paths
            )));
        }
        Ok(())
    }
}

/// The peer's liveness.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Liveness {
    /// Never heard from (yet).
    Unknown,
    /// Heard from within `suspect_after`.
    Alive,
    /// Silent for `suspect_after` or more.
    Suspect,
    /// Silent for `timeout` or more (or never heard from within `timeout` of the start).
    Dead,
}

/// A change in the peer's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerEvent {
    /// The peer is alive: first heard from, or heard again (same incarnation) after Suspect or Dead.
    Alive {
        /// Its incarnation.
        incarnation: u64,
    },
    /// No fresh packet for `suspect_after`.
    Suspect {
        /// Time since the last fresh packet.
        silent_for: Duration,
    },
    /// No fresh packet for `timeout`.
    Dead {
        /// Time since the last fresh packet (or since the start, if never heard from).
        silent_for: Duration,
    },
    /// A packet of a newer incarnation: the peer restarted (it is alive, its previous life is over).
    Restarted {
        /// The incarnation it had.
        previous: u64,
        /// The new one.
        incarnation: u64,
    },
    /// The role and generation the peer advertises changed (or were first seen).
    Report {
        /// Its role (opaque here; see [`crate::role::PeerRole`]).
        role: u64,
        /// Its generation.
        generation: u64,
    },
    /// A path has been silent for `timeout`.
    PathDown {
        /// Path index.
        path: usize,
    },
    /// A path delivers again after being down (or delivers for the first time, once the peer was
    /// already heard on another path).
    PathUp {
        /// Path index.
        path: usize,
    },
}

/// Per-path state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PathStatus {
    /// Last fresh packet on this path.
    pub last_heard: Option<Instant>,
    /// Whether the path is up (heard within `timeout`).
    pub up: bool,
    /// Smoothed RTT (RFC 6298 weights), from echoes.
    pub srtt: Option<Duration>,
    /// Last RTT sample.
    pub last_rtt: Option<Duration>,
    max_beat: u64,
    max_echo: u64,
}

impl PathStatus {
    fn new() -> Self {
        PathStatus {
            last_heard: None,
            up: false,
            srtt: None,
            last_rtt: None,
            max_beat: 0,
            max_echo: 0,
        }
    }
}

/// Snapshot of the peer's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerStatus {
    /// Liveness.
    pub liveness: Liveness,
    /// The peer's current incarnation, once heard from.
    pub incarnation: Option<u64>,
    /// Last fresh packet from any path.
    pub last_heard: Option<Instant>,
    /// The (role, generation) it last advertised.
    pub report: Option<(u64, u64)>,
    /// Per-path state.
    pub paths: Vec<PathStatus>,
    /// The longest time between two consecutive fresh packets (any path) so far: how close to
    /// `timeout` the peer's silences came.
    pub longest_silence: Duration,
    /// Times the detector itself woke late ([`Detector::late_wakeup`]): local stalls that were not
    /// held against the peer.
    pub local_stalls: u64,
    /// The longest of those local stalls.
    pub longest_local_stall: Duration,
}

/// The pure detector for one peer.
#[derive(Debug, Clone)]
pub struct Detector {
    cfg: DetectorConfig,
    started: Instant,
    status: PeerStatus,
    /// After a local stall, nothing is declared before this time.
    hold_until: Option<Instant>,
}

impl Detector {
    /// A detector started at `now` (the peer is Unknown).
    pub fn new(cfg: DetectorConfig, now: Instant) -> Result<Self, DetectorError> {
        cfg.validate()?;
        Ok(Detector {
            cfg,
            started: now,
            status: PeerStatus {
                liveness: Liveness::Unknown,
                incarnation: None,
                last_heard: None,
                report: None,
                paths: vec![PathStatus::new(); cfg.paths],
                longest_silence: Duration::ZERO,
                local_stalls: 0,
                longest_local_stall: Duration::ZERO,
            },
            hold_until: None,
        })
    }

    /// How late a wake-up may be before it counts as a local stall, and how long after a stall the
    /// detector waits before it judges: a fifth of the timeout (20 ms, one default interval).
    pub fn stall_threshold(&self) -> Duration {
        self.cfg.timeout / 5
    }

    /// Tells the detector that the caller, which meant to call [`Detector::tick`] at `scheduled`
    /// ([`Detector::next_deadline`]), runs only at `now`. If it is late by more than
    /// [`Detector::stall_threshold`], this host was not scheduled: the silence it is about to judge
    /// may be its own (the receiving thread was starved too, and the peer's packets may be waiting in
    /// a socket buffer). The detector then declares nothing (no Suspect, Dead or PathDown) until
    /// `stall_threshold` after `now`, which gives the receiver time to take in what arrived. On time,
    /// nothing changes. Returns whether the wake-up counted as a stall.
    ///
    /// Cost: a peer that dies during a local stall is declared dead at most the stall plus
    /// `stall_threshold` later than it would have been; a host that is never scheduled on time never
    /// judges — it could not act on a verdict in time either.
    pub fn late_wakeup(&mut self, scheduled: Instant, now: Instant) -> bool {
        let late = now.saturating_duration_since(scheduled);
        if late <= self.stall_threshold() {
            return false;
        }
        self.status.local_stalls += 1;
        self.status.longest_local_stall = self.status.longest_local_stall.max(late);
        self.hold_until = Some(now + self.stall_threshold());
        debug!(?late, "detector: woke late, holding verdicts");
        true
    }

    /// The current state.
    pub fn status(&self) -> &PeerStatus {
        &self.status
    }

    /// Feeds one observation received at `now`; appends the resulting events to `out`.
    pub fn observe(&mut self, now: Instant, o: &Observation, out: &mut Vec<PeerEvent>) {
        if o.path >= self.status.paths.len() {
            debug!(path = o.path, "detector: observation on an unknown path");
            return;
        }
        match self.status.incarnation {
            Some(cur) if o.incarnation < cur => {
                debug!(
                    old = o.incarnation,
                    cur, "detector: packet of an older incarnation ignored"
                );
                return;
            }
            Some(cur) if o.incarnation > cur => {
                info!(
                    previous = cur,
                    incarnation = o.incarnation,
                    "detector: peer restarted"
                );
                for p in &mut self.status.paths {
                    p.max_beat = 0;
                    p.max_echo = 0;
                }
                self.status.incarnation = Some(o.incarnation);
                self.status.liveness = Liveness::Alive;
                out.push(PeerEvent::Restarted {
                    previous: cur,
                    incarnation: o.incarnation,
                });
            }
            Some(_) => {}
            None => {
                self.status.incarnation = Some(o.incarnation);
            }
        }
        let p = &mut self.status.paths[o.path];
        let max = match o.kind {
            Kind::Beat => &mut p.max_beat,
            Kind::Echo => &mut p.max_echo,
        };
        if o.sequence <= *max {
            return; // duplicate or replay: proves nothing about now
        }
        *max = o.sequence;
        if let Some(rtt) = o.rtt {
            p.last_rtt = Some(rtt);
            p.srtt = Some(match p.srtt {
                None => rtt,
                Some(s) => s.mul_f64(0.875) + rtt.mul_f64(0.125),
            });
        }
        p.last_heard = Some(now);
        if let Some(prev) = self.status.last_heard {
            let gap = now.saturating_duration_since(prev);
            self.status.longest_silence = self.status.longest_silence.max(gap);
        }
        if !p.up {
            p.up = true;
            if self.status.last_heard.is_some() {
                out.push(PeerEvent::PathUp { path: o.path });
            }
        }
        self.status.last_heard = Some(now);
        if self.status.liveness != Liveness::Alive {
            self.status.liveness = Liveness::Alive;
            out.push(PeerEvent::Alive {
                incarnation: o.incarnation,
            });
        }
        if self.status.report != Some((o.role, o.generation)) {
            self.status.report = Some((o.role, o.generation));
            out.push(PeerEvent::Report {
                role: o.role,
                generation: o.generation,
            });
        }
    }

    /// Advances time to `now`; appends the resulting events to `out`.
    pub fn tick(&mut self, now: Instant, out: &mut Vec<PeerEvent>) {
        match self.hold_until {
            Some(h) if now < h => return,
            Some(_) => self.hold_until = None,
            None => {}
        }
        for (i, p) in self.status.paths.iter_mut().enumerate() {
            if p.up
                && p.last_heard
                    .is_some_and(|t| now.saturating_duration_since(t) >= self.cfg.timeout)
            {
                p.up = false;
                out.push(PeerEvent::PathDown { path: i });
            }
        }
        let since = self.status.last_heard.unwrap_or(self.started);
        let silent = now.saturating_duration_since(since);
        let next = match self.status.liveness {
            Liveness::Dead => return,
            _ if silent >= self.cfg.timeout => Liveness::Dead,
            Liveness::Alive if silent >= self.cfg.suspect_after => Liveness::Suspect,
            _ => return,
        };
        self.status.liveness = next;
        out.push(match next {
            Liveness::Dead => PeerEvent::Dead { silent_for: silent },
            _ => PeerEvent::Suspect { silent_for: silent },
        });
    }

    /// The next time at which [`Detector::tick`] may change something, if any.
    pub fn next_deadline(&self) -> Option<Instant> {
        let since = self.status.last_heard.unwrap_or(self.started);
        let own = match self.status.liveness {
            Liveness::Dead => None,
            Liveness::Alive => Some(since + self.cfg.suspect_after),
            Liveness::Unknown | Liveness::Suspect => Some(since + self.cfg.timeout),
        };
        let paths = self
            .status
            .paths
            .iter()
            .filter(|p| p.up)
            .filter_map(|p| p.last_heard.map(|t| t + self.cfg.timeout));
        let next = own.into_iter().chain(paths).min()?;
        Some(self.hold_until.map_or(next, |h| next.max(h)))
    }
}

/// A running detector.
#[derive(Debug)]
pub struct DetectorHandle {
    /// The latest state.
    pub status: watch::Receiver<PeerStatus>,
    /// Every event, in order.
    pub events: mpsc::UnboundedReceiver<PeerEvent>,
    /// Dropped with the handle: the driver stops.
    _stop: oneshot::Sender<()>,
    task: Option<JoinHandle<()>>,
}

impl Drop for DetectorHandle {
    fn drop(&mut self) {
        if let Some(t) = &self.task {
            t.abort();
        }
    }
}

/// Runs a [`Detector`] on its own thread (`ax-detector`, real-time as [`Realtime::from_env`] says:
/// `SCHED_FIFO` priority 10 by default, see [`crate::rt`]), fed by `observations` (from
/// [`crate::heartbeat::Heartbeat::start`]), with a timer of its own (a current-thread tokio runtime
/// on that thread), so a busy or starved runtime of the caller cannot delay a verdict or make one.
/// Keeps ticking after the observation channel closes (the peer then goes Dead). Stops when the handle
/// is dropped. Needs no tokio runtime.
pub fn spawn(
    cfg: DetectorConfig,
    observations: mpsc::Receiver<Observation>,
) -> Result<DetectorHandle, DetectorError> {
    spawn_with(cfg, observations, Realtime::from_env())
}

/// [`spawn`] with explicit real-time settings.
pub fn spawn_with(
    cfg: DetectorConfig,
    observations: mpsc::Receiver<Observation>,
    realtime: Realtime,
) -> Result<DetectorHandle, DetectorError> {
    let d = Detector::new(cfg, Instant::now())?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .map_err(DetectorError::Thread)?;
    let (status_tx, status) = watch::channel(d.status().clone());
    let (events_tx, events) = mpsc::unbounded_channel();
    let (stop, stopped) = oneshot::channel();
    rt::spawn_thread("ax-detector", realtime, move |_| {
        runtime.block_on(drive(d, observations, status_tx, events_tx, stopped));
    })
    .map_err(DetectorError::Thread)?;
    Ok(DetectorHandle {
        status,
        events,
        _stop: stop,
        task: None,
    })
}

/// Runs a [`Detector`] as a task of the current tokio runtime, on its clock (tests with a paused
/// clock use this); [`spawn`] is what production uses.
pub fn spawn_task(
    cfg: DetectorConfig,
    observations: mpsc::Receiver<Observation>,
) -> Result<DetectorHandle, DetectorError> {
    let d = Detector::new(cfg, Instant::now())?;
    let (status_tx, status) = watch::channel(d.status().clone());
    let (events_tx, events) = mpsc::unbounded_channel();
    let (stop, stopped) = oneshot::channel();
    let task = tokio::spawn(drive(d, observations, status_tx, events_tx, stopped));
    Ok(DetectorHandle {
        status,
        events,
        _stop: stop,
        task: Some(task),
    })
}

/// The driver loop: observations first (each stamped with its arrival), then deadlines; a deadline
/// that fires late is reported to [`Detector::late_wakeup`] after taking in every observation that
/// is already queued.
async fn drive(
    mut d: Detector,
    mut observations: mpsc::Receiver<Observation>,
    status_tx: watch::Sender<PeerStatus>,
    events_tx: mpsc::UnboundedSender<PeerEvent>,
    mut stopped: oneshot::Receiver<()>,
) {
    let mut out = Vec::new();
    let mut open = true;
    loop {
        let deadline = d.next_deadline();
        tokio::select! {
            biased;
            _ = &mut stopped => return,
            o = observations.recv(), if open => match o {
                Some(o) => {
                    // Tick first, so that a packet arriving after a long silence is seen as a
                    // recovery from Dead rather than skipping the death.
                    d.tick(o.at, &mut out);
                    d.observe(o.at, &o, &mut out);
                }
                None => open = false,
            },
            _ = sleep_until_opt(deadline) => {
                let now = Instant::now();
                while open {
                    match observations.try_recv() {
                        Ok(o) => {
                            d.tick(o.at, &mut out);
                            d.observe(o.at, &o, &mut out);
                        }
                        Err(mpsc::error::TryRecvError::Empty) => break,
                        Err(mpsc::error::TryRecvError::Disconnected) => open = false,
                    }
                }
                if let Some(t) = deadline {
                    d.late_wakeup(t, now);
                }
                d.tick(now, &mut out);
            }
        }
        for e in out.drain(..) {
            debug!(event = ?e, "detector");
            let _ = events_tx.send(e);
        }
        // Also when no event: last-heard times and RTTs change with every packet.
        status_tx.send_replace(d.status().clone());
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn obs(at: Instant, path: usize, kind: Kind, incarnation: u64, sequence: u64) -> Observation {
        Observation {
            path,
            at,
            kind,
            incarnation,
            sequence,
            role: 1,
            generation: 0,
            rtt: None,
        }
    }

    /// (path, incarnation, sequence) of a beat.
    type Beat = (usize, u64, u64);

    fn cfg(paths: usize) -> DetectorConfig {
        DetectorConfig {
            suspect_after: 50 * MS,
            timeout: 100 * MS,
            paths,
        }
    }

    /// Feeds beats every `every` on `path` from `from` for `n` beats, starting at sequence `seq`.
    fn run(d: &mut Detector, t0: Instant, steps: &[(u64, Option<Beat>)]) -> Vec<(u64, PeerEvent)> {
        let mut all = Vec::new();
        for &(ms, o) in steps {
            let now = t0 + Duration::from_millis(ms);
            let mut out = Vec::new();
            d.tick(now, &mut out);
            if let Some((path, inc, seq)) = o {
                d.observe(now, &obs(now, path, Kind::Beat, inc, seq), &mut out);
            }
            all.extend(out.into_iter().map(|e| (ms, e)));
        }
        all
    }

    #[test]
    fn alive_suspect_dead_and_back() {
        let t0 = Instant::now();
        let mut d = Detector::new(cfg(1), t0).unwrap();
        let ev = run(
            &mut d,
            t0,
            &[
                (10, Some((0, 5, 1))),
                (30, Some((0, 5, 2))),
                (79, None),
                (80, None),
                (129, None),
                (130, None),
                (200, Some((0, 5, 3))),
            ],
        );
        assert_eq!(
            ev,
            vec![
                (10, PeerEvent::Alive { incarnation: 5 }),
                (
                    10,
                    PeerEvent::Report {
                        role: 1,
                        generation: 0
                    }
                ),
                (
                    80,
                    PeerEvent::Suspect {
                        silent_for: 50 * MS
                    }
                ),
                (130, PeerEvent::PathDown { path: 0 }),
                (
                    130,
                    PeerEvent::Dead {
                        silent_for: 100 * MS
                    }
                ),
                (200, PeerEvent::PathUp { path: 0 }),
                (200, PeerEvent::Alive { incarnation: 5 }),
            ]
        );
        assert_eq!(d.status().liveness, Liveness::Alive);
    }

    #[test]
    fn suspect_recovers_without_death() {
        let t0 = Instant::now();
        let mut d = Detector::new(cfg(1), t0).unwrap();
        let ev = run(
            &mut d,
            t0,
            &[(0, Some((0, 1, 1))), (60, None), (90, Some((0, 1, 2)))],
        );
        assert_eq!(
            ev[2],
            (
                60,
                PeerEvent::Suspect {
                    silent_for: 60 * MS
                }
            )
        );
        assert_eq!(ev[3], (90, PeerEvent::Alive { incarnation: 1 }));
        assert_eq!(ev.len(), 4);
    }

    #[test]
    fn restart_is_reported_and_old_incarnation_ignored() {
        let t0 = Instant::now();
        let mut d = Detector::new(cfg(1), t0).unwrap();
        let ev = run(
            &mut d,
            t0,
            &[
                (0, Some((0, 1, 100))),
                (10, Some((0, 2, 1))), // restarted without being noticed dead: sequence starts over
                (20, Some((0, 1, 101))), // a late packet of the old life
                (70, None),
            ],
        );
        assert_eq!(
            ev[2],
            (
                10,
                PeerEvent::Restarted {
                    previous: 1,
                    incarnation: 2
                }
            )
        );
        // The late packet did not refresh: Suspect comes 50 ms after the new life's first beat.
        assert_eq!(
            ev[3],
            (
                70,
                PeerEvent::Suspect {
                    silent_for: 60 * MS
                }
            )
        );
        assert_eq!(ev.len(), 4);
        assert_eq!(d.status().incarnation, Some(2));
    }

    #[test]
    fn restart_after_death() {
        let t0 = Instant::now();
        let mut d = Detector::new(cfg(1), t0).unwrap();
        let ev = run(
            &mut d,
            t0,
            &[(0, Some((0, 1, 9))), (150, None), (300, Some((0, 3, 1)))],
        );
        let kinds: Vec<_> = ev.iter().map(|(_, e)| *e).collect();
        assert!(kinds.contains(&PeerEvent::Dead {
            silent_for: 150 * MS
        }));
        assert!(kinds.contains(&PeerEvent::Restarted {
            previous: 1,
            incarnation: 3
        }));
        assert!(
            !kinds.contains(&PeerEvent::Alive { incarnation: 3 }),
            "a restart is reported once, as Restarted"
        );
        assert_eq!(d.status().liveness, Liveness::Alive);
    }

    #[test]
    fn duplicates_do_not_refresh() {
        let t0 = Instant::now();
        let mut d = Detector::new(cfg(1), t0).unwrap();
        let ev = run(
            &mut d,
            t0,
            &[
                (0, Some((0, 1, 5))),
                (40, Some((0, 1, 5))),
                (50, Some((0, 1, 4))),
                (100, None),
            ],
        );
        assert_eq!(
            ev.last().unwrap(),
            &(
                100,
                PeerEvent::Dead {
                    silent_for: 100 * MS
                }
            )
        );
    }

    #[test]
    fn never_heard_from_becomes_dead_after_timeout() {
        let t0 = Instant::now();
        let mut d = Detector::new(cfg(1), t0).unwrap();
        assert_eq!(d.next_deadline(), Some(t0 + 100 * MS));
        let ev = run(&mut d, t0, &[(99, None), (100, None)]);
        assert_eq!(
            ev,
            vec![(
                100,
                PeerEvent::Dead {
                    silent_for: 100 * MS
                }
            )]
        );
        assert_eq!(d.next_deadline(), None);
    }

    #[test]
    fn either_path_keeps_the_peer_alive() {
        let t0 = Instant::now();
        let mut d = Detector::new(cfg(2), t0).unwrap();
        let mut steps = vec![(0, Some((0, 1, 1))), (0, Some((1, 1, 1)))];
        // Path 0 goes silent; path 1 keeps beating (its own sequence space).
        for i in 1..10u64 {
            steps.push((i * 20, Some((1, 1, i + 1))));
        }
        let ev = run(&mut d, t0, &steps);
        let kinds: Vec<_> = ev.iter().map(|(_, e)| *e).collect();
        assert!(kinds.contains(&PeerEvent::PathDown { path: 0 }));
        assert!(!kinds
            .iter()
            .any(|e| matches!(e, PeerEvent::Suspect { .. } | PeerEvent::Dead { .. })));
        assert!(!d.status().paths[0].up && d.status().paths[1].up);
    }

    #[test]
    fn echoes_refresh_and_give_rtt() {
        let t0 = Instant::now();
        let mut d = Detector::new(cfg(1), t0).unwrap();
        let mut out = Vec::new();
        let mut o = obs(t0, 0, Kind::Echo, 1, 1);
        o.rtt = Some(800 * Duration::from_micros(1));
        d.observe(t0, &o, &mut out);
        o.sequence = 2;
        o.rtt = Some(1600 * Duration::from_micros(1));
        d.observe(t0 + MS, &o, &mut out);
        let p = d.status().paths[0];
        assert_eq!(p.last_rtt, Some(Duration::from_micros(1600)));
        assert_eq!(p.srtt, Some(Duration::from_micros(900)));
        assert_eq!(out[0], PeerEvent::Alive { incarnation: 1 });
    }

    #[test]
    fn report_changes_are_events() {
        let t0 = Instant::now();
        let mut d = Detector::new(cfg(1), t0).unwrap();
        let mut out = Vec::new();
        let mut o = obs(t0, 0, Kind::Beat, 1, 1);
        d.observe(t0, &o, &mut out);
        o.sequence = 2;
        d.observe(t0, &o, &mut out);
        o.sequence = 3;
        o.role = 4;
        o.generation = 7;
        d.observe(t0, &o, &mut out);
        let reports: Vec<_> = out
            .iter()
            .filter(|e| matches!(e, PeerEvent::Report { .. }))
            .collect();
        assert_eq!(
            reports,
            [
                &PeerEvent::Report {
                    role: 1,
                    generation: 0
                },
                &PeerEvent::Report {
                    role: 4,
                    generation: 7
                }
            ]
        );
    }

    /// A one-path detector that heard one beat at its start.
    fn heard_at_start() -> (Instant, Detector, Vec<PeerEvent>) {
        let t0 = Instant::now();
        let mut d = Detector::new(cfg(1), t0).unwrap();
        let mut out = Vec::new();
        d.observe(t0, &obs(t0, 0, Kind::Beat, 1, 1), &mut out);
        out.clear();
        (t0, d, out)
    }

    #[test]
    fn a_late_wakeup_holds_verdicts_until_the_receiver_caught_up() {
        let (t0, mut d, mut out) = heard_at_start();
        // Meant to tick at 50 ms (Suspect), scheduled only at 200 ms: this host stalled.
        assert_eq!(d.next_deadline(), Some(t0 + 50 * MS));
        assert!(d.late_wakeup(t0 + 50 * MS, t0 + 200 * MS));
        d.tick(t0 + 200 * MS, &mut out);
        assert!(out.is_empty(), "{out:?}");
        assert_eq!(d.next_deadline(), Some(t0 + 220 * MS));
        // The receiver takes in the backlog: the peer was alive all along.
        d.tick(t0 + 205 * MS, &mut out);
        d.observe(t0 + 205 * MS, &obs(t0, 0, Kind::Beat, 1, 2), &mut out);
        assert!(out.is_empty(), "{out:?}");
        assert_eq!(d.status().liveness, Liveness::Alive);
        assert_eq!(d.status().local_stalls, 1);
        assert_eq!(d.status().longest_local_stall, 150 * MS);
        assert_eq!(d.status().longest_silence, 205 * MS);
    }

    #[test]
    fn a_peer_silent_after_the_hold_is_still_declared_dead() {
        let (t0, mut d, mut out) = heard_at_start();
        assert!(
            !d.late_wakeup(t0 + 50 * MS, t0 + 70 * MS),
            "20 ms late is on time"
        );
        assert!(d.late_wakeup(t0 + 50 * MS, t0 + 300 * MS));
        d.tick(t0 + 300 * MS, &mut out);
        assert!(out.is_empty());
        d.tick(t0 + 320 * MS, &mut out);
        assert_eq!(
            out,
            vec![
                PeerEvent::PathDown { path: 0 },
                PeerEvent::Dead {
                    silent_for: 320 * MS
                }
            ]
        );
    }

    #[test]
    fn config() {
        assert!(Detector::new(DetectorConfig { paths: 3, ..cfg(1) }, Instant::now()).is_err());
        assert!(Detector::new(
            DetectorConfig {
                suspect_after: 200 * MS,
                ..cfg(1)
            },
            Instant::now()
        )
        .is_err());
        let hb = HeartbeatConfig::new("a", 1, "b", vec![]);
        assert_eq!(DetectorConfig::from_heartbeat(&hb).suspect_after, 50 * MS);
    }

    /// The async driver with tokio's paused clock: deterministic timing.
    #[tokio::test(start_paused = true)]
    async fn spawned_detector_on_a_paused_clock() {
        let (tx, rx) = mpsc::channel(16);
        let mut h = spawn_task(cfg(1), rx).unwrap();
        let t0 = Instant::now();
        for seq in 1..=5u64 {
            tx.send(obs(Instant::now(), 0, Kind::Beat, 9, seq))
                .await
                .unwrap();
            tokio::time::sleep(20 * MS).await;
        }
        // The last beat was at t0 + 80 ms.
        assert_eq!(
            h.events.recv().await,
            Some(PeerEvent::Alive { incarnation: 9 })
        );
        assert_eq!(
            h.events.recv().await,
            Some(PeerEvent::Report {
                role: 1,
                generation: 0
            })
        );
        assert_eq!(
            h.events.recv().await,
            Some(PeerEvent::Suspect {
                silent_for: 50 * MS
            })
        );
        assert_eq!(Instant::now() - t0, 130 * MS);
        assert_eq!(h.events.recv().await, Some(PeerEvent::PathDown { path: 0 }));
        assert_eq!(
            h.events.recv().await,
            Some(PeerEvent::Dead {
                silent_for: 100 * MS
            })
        );
        assert_eq!(Instant::now() - t0, 180 * MS);
        assert_eq!(h.status.borrow().liveness, Liveness::Dead);
        // Closing the channel is not a heartbeat: the detector stays Dead and quiet.
        drop(tx);
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(h.events.try_recv().is_err());
    }
}
