//! A deterministic simulation of protocol v2: [`RoleMachine`]s on two or three hosts, a driver per
//! host (what the agent's node does: replication sessions, heartbeats and a detector, coordinator
//! requests with timeouts and retries), and a coordinator ([`Registers`], the witness's own logic),
//! over a simulated network and clock driven by one seeded random generator.
//!
//! Faults: partitions (one or both ways, host–host and host–coordinator), pauses (a host stops
//! processing and acting, e.g. between a decision and its effect), reordering, duplication and loss
//! of datagrams (heartbeats, coordinator requests and answers), broken replication sessions, host
//! crashes and restarts, coordinator outages and loss of the coordinator's state, false detector
//! verdicts.
//!
//! Checked at every step:
//! - **one releaser per epoch**: no epoch's output is released twice, by two hosts or under two
//!   generations, and every release is of the content that epoch has in the releasing host's VM;
//! - **no released output lost**: a promotion restores a replica whose history contains every epoch
//!   released so far, with the same content.
//!
//! [`run`] with the same seed and configuration replays exactly (no real clock, no hash order, no
//! threads). `AX_SIM_SEED=N cargo test -p failover --test sim` replays one seed with a trace.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, VecDeque};
use std::fmt::Write as _;
use std::time::Duration;

use tokio::time::Instant;

use crate::coordinator::{CasOutcome, CasRequest, Registers};
use crate::role::{Action, Event, PeerRole, Role, RoleConfig, RoleMachine};

/// A deliberately broken driver, to show the checks catch what they claim to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bug {
    /// The secondary's driver acknowledges every staged frame itself, also after the machine decided
    /// to promote.
    AckAfterDecision,
    /// The primary's driver releases output as it is captured, without waiting for acknowledgements.
    ReleaseUnacked,
}

/// What a run does.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Simulated time of a run, in ms.
    pub duration_ms: u64,
    /// Hosts (2 or 3; `None`: drawn from the seed).
    pub hosts: Option<usize>,
    /// Mean time between faults, in ms.
    pub fault_every_ms: u64,
    /// Keep a trace of every step (for replaying a seed).
    pub trace: bool,
    /// A broken driver (tests of the checker).
    pub bug: Option<Bug>,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            duration_ms: 3000,
            hosts: None,
            fault_every_ms: 150,
            trace: false,
            bug: None,
        }
    }
}

/// What happened in a run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SimStats {
    /// Promotions.
    pub promotions: u64,
    /// Primaries that fenced themselves.
    pub fences: u64,
    /// Claims won by a primary going solo (or booting).
    pub solo_wins: u64,
    /// Stale replicas dropped.
    pub stale_drops: u64,
    /// "Re-learning" answers.
    pub relearning: u64,
    /// Coordinator requests received.
    pub coordinator_requests: u64,
    /// Epochs released.
    pub releases: u64,
    /// Faults injected.
    pub faults: u64,
    /// Coordinator state losses.
    pub state_losses: u64,
}

/// The result of one run.
#[derive(Debug, Clone)]
pub struct SimReport {
    /// The seed.
    pub seed: u64,
    /// The first violated property, if any.
    pub violation: Option<String>,
    /// Counters.
    pub stats: SimStats,
    /// The trace (with [`SimConfig::trace`]).
    pub trace: String,
}

/// xorshift64*: small, fast, deterministic.
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }
    fn chance(&mut self, per_mille: u64) -> bool {
        self.below(1000) < per_mille
    }
}

const VM: &str = "vm";
const EPOCH_MS: u64 = 10;
const HB_MS: u64 = 20;
const DEAD_MS: u64 = 100;
const CAS_TIMEOUT_MS: u64 = 40;

#[derive(Debug, Clone)]
enum Msg {
    Hello {
        sid: u64,
        generation: u64,
        history: Vec<u64>,
    },
    Frame {
        sid: u64,
        generation: u64,
        epoch: u64,
        content: u64,
    },
    Ack {
        sid: u64,
        generation: u64,
        epoch: u64,
    },
    Refused {
        sid: u64,
    },
    End {
        sid: u64,
    },
    Heartbeat {
        incarnation: u64,
        role: u64,
        generation: u64,
    },
    CasReq {
        id: u64,
        req: CasRequest,
    },
    CasResp {
        id: u64,
        outcome: CasOutcome,
    },
}

impl Msg {
    /// Session messages ride a reliable ordered stream (QUIC): never lost, duplicated or reordered
    /// one by one; the session breaks as a whole instead.
    fn session(&self) -> Option<u64> {
        match self {
            Msg::Hello { sid, .. }
            | Msg::Frame { sid, .. }
            | Msg::Ack { sid, .. }
            | Msg::Refused { sid }
            | Msg::End { sid } => Some(*sid),
            _ => None,
        }
    }
}

#[derive(Debug, Clone)]
enum Ev {
    Deliver { from: usize, to: usize, msg: Msg },
    Capture(usize),
    HbSend(usize),
    DetectorCheck(usize),
    Exec(usize),
    Tick(usize),
    CasTimeout(usize, u64),
    LinkLost(usize, u64),
    Restart(usize),
    Fault,
}

/// A session as one end sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Session {
    sid: u64,
    peer: usize,
}

#[derive(Debug)]
struct Host {
    name: String,
    up: bool,
    incarnation: u64,
    paused_until: u64,
    m: RoleMachine,
    actions: VecDeque<Action>,
    exec_scheduled: bool,
    /// Durable: the highest generation recorded (survives crashes).
    known_durable: u64,
    /// The VM: content of each epoch (index 0 = boot image).
    vm: Option<Vec<u64>>,
    released: Option<u64>,
    /// Replica: (generation, history), acked through the machine.
    replica: Option<(u64, Vec<u64>)>,
    session: Option<Session>,
    /// Whom the detector watches.
    partner: Option<usize>,
    last_heard: u64,
    partner_incarnation: Option<u64>,
    partner_dead: bool,
    pending_cas: Option<u64>,
    tick_at: Option<u64>,
    /// The coordinator client's last re-learning nonce.
    witness_nonce: u64,
}

struct World {
    cfg: SimConfig,
    rng: Rng,
    now: u64,
    base: Instant,
    seq: u64,
    queue: BinaryHeap<Reverse<(u64, u64, usize)>>,
    events: Vec<Option<Ev>>,
    hosts: Vec<Host>,
    coord: Registers,
    coord_down_until: u64,
    /// blocked[a][b] until: messages from a to b are dropped (index `n` is the coordinator).
    blocked: Vec<Vec<u64>>,
    next_sid: u64,
    next_content: u64,
    next_req: u64,
    /// Live sessions: sid → (primary, secondary).
    sessions: BTreeMap<u64, (usize, usize)>,
    /// epoch → (content, host, generation).
    journal: BTreeMap<u64, (u64, usize, u64)>,
    violation: Option<String>,
    stats: SimStats,
    trace: String,
}

/// The machines' timing in the simulation (scaled to its 10 ms epochs and 100 ms detector).
fn role_config() -> RoleConfig {
    RoleConfig {
        cas_retry: Duration::from_millis(30),
        ack_timeout: Duration::from_millis(300),
        resync_retry: Duration::from_millis(100),
        max_lag_epochs: Some(20),
    }
}

/// Runs one seeded simulation.
pub fn run(seed: u64, cfg: &SimConfig) -> SimReport {
    let mut rng = Rng::new(seed);
    let n = cfg.hosts.unwrap_or(2 + rng.below(2) as usize).clamp(2, 3);
    let role_cfg = role_config();
    let hosts = (0..n)
        .map(|i| {
            let m = if i == 0 {
                RoleMachine::new_primary(role_cfg, 0)
            } else {
                RoleMachine::new_secondary(role_cfg, 0)
            }
            .unwrap_or_else(|e| unreachable!("valid config: {e}"));
            Host {
                name: format!("h{i}"),
                up: true,
                incarnation: 1,
                paused_until: 0,
                m,
                actions: VecDeque::new(),
                exec_scheduled: false,
                known_durable: 0,
                vm: (i == 0).then(|| vec![0]),
                released: None,
                replica: None,
                session: None,
                partner: None,
                last_heard: 0,
                partner_incarnation: None,
                partner_dead: false,
                pending_cas: None,
                tick_at: None,
                witness_nonce: 0,
            }
        })
        .collect();
    let mut w = World {
        cfg: cfg.clone(),
        rng,
        now: 0,
        base: Instant::now(),
        seq: 0,
        queue: BinaryHeap::new(),
        events: Vec::new(),
        hosts,
        coord: Registers::fresh(),
        coord_down_until: 0,
        blocked: vec![vec![0; n + 1]; n + 1],
        next_sid: 1,
        next_content: 1,
        next_req: 1,
        sessions: BTreeMap::new(),
        journal: BTreeMap::new(),
        violation: None,
        stats: SimStats::default(),
        trace: String::new(),
    };
    for i in 0..n {
        w.at(i as u64, Ev::HbSend(i));
        w.at(5 + i as u64, Ev::DetectorCheck(i));
    }
    w.at(1, Ev::Capture(0));
    w.handle(0, Event::Tick);
    let first_fault = w.rng.range(50, 2 * w.cfg.fault_every_ms);
    w.at(first_fault, Ev::Fault);
    while let Some(Reverse((t, _, idx))) = w.queue.pop() {
        if t > w.cfg.duration_ms || w.violation.is_some() {
            break;
        }
        w.now = t;
        if let Some(ev) = w.events.get_mut(idx).and_then(Option::take) {
            w.dispatch(ev);
        }
    }
    SimReport {
        seed,
        violation: w.violation,
        stats: w.stats,
        trace: w.trace,
    }
}

impl World {
    fn at(&mut self, t: u64, ev: Ev) {
        self.seq += 1;
        self.events.push(Some(ev));
        self.queue
            .push(Reverse((t, self.seq, self.events.len() - 1)));
    }

    fn log(&mut self, s: impl FnOnce() -> String) {
        if self.cfg.trace {
            let _ = writeln!(self.trace, "{:>5} {}", self.now, s());
        }
    }

    fn fail(&mut self, why: String) {
        self.log(|| format!("VIOLATION: {why}"));
        if self.violation.is_none() {
            self.violation = Some(format!("t={} ms: {why}", self.now));
        }
    }

    fn instant(&self) -> Instant {
        self.base + Duration::from_millis(self.now)
    }

    fn coord_id(&self) -> usize {
        self.hosts.len()
    }

    fn reachable(&self, a: usize, b: usize) -> bool {
        self.blocked[a][b] <= self.now
    }

    /// A host's node id is `i`; the coordinator is `n`.
    fn send(&mut self, from: usize, to: usize, msg: Msg) {
        if !self.reachable(from, to) {
            if let Some(sid) = msg.session() {
                self.break_session(sid);
            }
            return;
        }
        let session = msg.session().is_some();
        let delay = if session {
            self.rng.range(1, 3)
        } else {
            if self.rng.chance(20) {
                return; // lost
            }
            // Datagrams: reordered by random delays, sometimes much later.
            if self.rng.chance(10) {
                self.rng.range(20, 200)
            } else {
                self.rng.range(1, 4)
            }
        };
        if !session && self.rng.chance(20) {
            let late = self.now + delay + self.rng.range(1, 100);
            self.at(
                late,
                Ev::Deliver {
                    from,
                    to,
                    msg: msg.clone(),
                },
            );
        }
        self.at(self.now + delay, Ev::Deliver { from, to, msg });
    }

    /// A replication session breaks: each live end learns it after a while.
    fn break_session(&mut self, sid: u64) {
        if let Some((p, s)) = self.sessions.remove(&sid) {
            self.log(|| format!("session {sid} h{p}->h{s} breaks"));
            for h in [p, s] {
                let t = self.now + self.rng.range(5, 150);
                self.at(t, Ev::LinkLost(h, sid));
            }
        }
    }

    fn paused(&self, i: usize) -> bool {
        self.hosts[i].paused_until > self.now
    }

    fn dispatch(&mut self, ev: Ev) {
        // A paused host processes nothing: its events wait (a stopped process).
        let host = match &ev {
            Ev::Deliver { to, .. } if *to < self.hosts.len() => Some(*to),
            Ev::Capture(i)
            | Ev::HbSend(i)
            | Ev::DetectorCheck(i)
            | Ev::Exec(i)
            | Ev::Tick(i)
            | Ev::CasTimeout(i, _)
            | Ev::LinkLost(i, _) => Some(*i),
            _ => None,
        };
        if let Some(i) = host {
            if self.paused(i) {
                let t = self.hosts[i].paused_until;
                self.at(t, ev);
                return;
            }
            if !self.hosts[i].up && !matches!(ev, Ev::Restart(_)) {
                return;
            }
        }
        match ev {
            Ev::Deliver { from, to, msg } => self.deliver(from, to, msg),
            Ev::Capture(i) => self.capture(i),
            Ev::HbSend(i) => {
                let (role, generation) = self.hosts[i].m.heartbeat_status();
                let incarnation = self.hosts[i].incarnation;
                for j in 0..self.hosts.len() {
                    if j != i {
                        self.send(
                            i,
                            j,
                            Msg::Heartbeat {
                                incarnation,
                                role,
                                generation,
                            },
                        );
                    }
                }
                self.at(self.now + HB_MS, Ev::HbSend(i));
            }
            Ev::DetectorCheck(i) => {
                self.detector_check(i);
                self.at(self.now + 10, Ev::DetectorCheck(i));
            }
            Ev::Exec(i) => self.exec(i),
            Ev::Tick(i) => {
                if self.hosts[i].tick_at == Some(self.now) {
                    self.hosts[i].tick_at = None;
                    self.handle(i, Event::Tick);
                }
            }
            Ev::CasTimeout(i, id) => {
                if self.hosts[i].pending_cas == Some(id) {
                    self.hosts[i].pending_cas = None;
                    self.handle(i, Event::CasFailed);
                }
            }
            Ev::LinkLost(i, sid) => {
                if self.hosts[i].session.map(|s| s.sid) == Some(sid) {
                    self.hosts[i].session = None;
                    self.handle(i, Event::LinkLost);
                }
            }
            Ev::Restart(i) => self.restart(i),
            Ev::Fault => {
                self.fault();
                let next = self.now + self.rng.range(1, 2 * self.cfg.fault_every_ms);
                self.at(next, Ev::Fault);
            }
        }
    }

    fn capture(&mut self, i: usize) {
        let h = &mut self.hosts[i];
        if let Some(vm) = &mut h.vm {
            let content = self.next_content;
            self.next_content += 1;
            vm.push(content);
            let epoch = (vm.len() - 1) as u64;
            let generation = h.m.generation();
            let to = h.session;
            self.handle(i, Event::EpochCaptured { epoch });
            if let Some(s) = to {
                if self.hosts[i].session == Some(s) {
                    self.send(
                        i,
                        s.peer,
                        Msg::Frame {
                            sid: s.sid,
                            generation,
                            epoch,
                            content,
                        },
                    );
                }
            }
            if self.cfg.bug == Some(Bug::ReleaseUnacked) && self.hosts[i].m.role() == Role::Primary
            {
                let g = self.hosts[i].m.generation();
                if g > 0 {
                    self.release(i, g, epoch);
                }
            }
            self.at(self.now + EPOCH_MS, Ev::Capture(i));
        }
    }

    fn detector_check(&mut self, i: usize) {
        let Some(p) = self.hosts[i].partner else {
            return;
        };
        let h = &self.hosts[i];
        let silent = self.now.saturating_sub(h.last_heard) > DEAD_MS;
        // A false verdict now and then (a loaded host).
        let false_alarm = self.rng.chance(1);
        if (silent || false_alarm) && !h.partner_dead {
            self.hosts[i].partner_dead = true;
            self.log(|| {
                format!(
                    "h{i}: detector: h{p} dead{}",
                    if silent { "" } else { " (false)" }
                )
            });
            self.handle(i, Event::PeerDead);
        }
    }

    fn heard(&mut self, i: usize, from: usize, incarnation: u64, role: u64, generation: u64) {
        if self.hosts[i].partner != Some(from) {
            return;
        }
        let h = &mut self.hosts[i];
        h.last_heard = self.now;
        let restarted = h.partner_incarnation.is_some_and(|x| x != incarnation);
        let was_dead = h.partner_dead;
        h.partner_incarnation = Some(incarnation);
        if restarted {
            h.partner_dead = false;
            self.handle(i, Event::PeerRestarted);
        } else if was_dead {
            self.hosts[i].partner_dead = false;
            self.handle(i, Event::PeerAlive);
        }
        self.handle(
            i,
            Event::PeerReport {
                role: PeerRole::from_wire(role),
                generation,
            },
        );
    }

    fn watch(&mut self, i: usize, partner: usize) {
        let h = &mut self.hosts[i];
        if h.partner != Some(partner) {
            h.partner = Some(partner);
            h.last_heard = self.now;
            h.partner_incarnation = None;
            h.partner_dead = false;
        }
    }

    fn deliver(&mut self, from: usize, to: usize, msg: Msg) {
        if to == self.coord_id() {
            return self.coordinator(from, msg);
        }
        if let Some(sid) = msg.session() {
            if !self.sessions.contains_key(&sid) && !matches!(msg, Msg::End { .. }) {
                return; // the stream is gone
            }
        }
        match msg {
            Msg::Heartbeat {
                incarnation,
                role,
                generation,
            } => self.heard(to, from, incarnation, role, generation),
            Msg::CasResp { id, outcome } => {
                if self.hosts[to].pending_cas == Some(id) {
                    self.hosts[to].pending_cas = None;
                    if let CasOutcome::Relearning { witness } = outcome {
                        self.stats.relearning += 1;
                        self.hosts[to].witness_nonce = witness;
                    }
                    self.handle(to, Event::Cas(outcome));
                }
            }
            Msg::Hello {
                sid,
                generation,
                history,
            } => {
                let now = self.instant();
                let acts = self.hosts[to]
                    .m
                    .handle(now, Event::SessionOffered { generation });
                let accepted = acts.contains(&Action::AcceptSession { generation });
                if accepted {
                    // The new session replaces the one followed so far (ended).
                    if let Some(old) = self.hosts[to].session.take() {
                        self.end_session(to, old);
                    }
                    self.hosts[to].session = Some(Session { sid, peer: from });
                    self.hosts[to].replica = Some((generation, history.clone()));
                    self.watch(to, from);
                } else {
                    self.send(to, from, Msg::Refused { sid });
                    self.sessions.remove(&sid);
                }
                self.queue_actions(to, acts);
                if accepted {
                    let epoch = (history.len() - 1) as u64;
                    self.staged(to, generation, epoch);
                }
            }
            Msg::Frame {
                sid,
                generation,
                epoch,
                content,
            } => {
                let h = &mut self.hosts[to];
                if h.session.map(|s| s.sid) != Some(sid) {
                    return;
                }
                if let Some((g, hist)) = &mut h.replica {
                    if *g == generation && hist.len() as u64 == epoch {
                        hist.push(content);
                        self.staged(to, generation, epoch);
                    }
                }
            }
            Msg::Ack {
                sid,
                generation,
                epoch,
            } => {
                if self.hosts[to].session.map(|s| s.sid) == Some(sid) {
                    self.handle(to, Event::ReplicaAcked { generation, epoch });
                }
            }
            Msg::Refused { sid } | Msg::End { sid } => {
                self.sessions.remove(&sid);
                if self.hosts[to].session.map(|s| s.sid) == Some(sid) {
                    self.hosts[to].session = None;
                    self.handle(to, Event::LinkLost);
                }
            }
            Msg::CasReq { .. } => {}
        }
    }

    /// Sends an acknowledgement on host `i`'s session, if it has one.
    fn send_ack(&mut self, i: usize, generation: u64, epoch: u64) {
        if let Some(s) = self.hosts[i].session {
            let ack = Msg::Ack {
                sid: s.sid,
                generation,
                epoch,
            };
            self.send(i, s.peer, ack);
        }
    }

    fn staged(&mut self, i: usize, generation: u64, epoch: u64) {
        if self.cfg.bug == Some(Bug::AckAfterDecision) {
            self.send_ack(i, generation, epoch);
        }
        self.handle(
            i,
            Event::FrameStaged {
                generation,
                epoch,
                restorable: true,
            },
        );
    }

    fn end_session(&mut self, i: usize, s: Session) {
        self.send(i, s.peer, Msg::End { sid: s.sid });
        if self.hosts[i].session == Some(s) {
            self.hosts[i].session = None;
        }
    }

    fn coordinator(&mut self, from: usize, msg: Msg) {
        let Msg::CasReq { id, req } = msg else {
            return;
        };
        if self.coord_down_until > self.now {
            return;
        }
        self.stats.coordinator_requests += 1;
        // Requests are authenticated (mutual TLS): only the host's own claims arrive.
        if req.claimant.split('#').next() != Some(self.hosts[from].name.as_str()) {
            return;
        }
        match self.coord.cas(&req) {
            Ok((outcome, _)) => {
                self.log(|| {
                    format!(
                        "coordinator: {} expects {} -> {outcome:?}",
                        req.claimant, req.expected
                    )
                });
                let c = self.coord_id();
                self.send(c, from, Msg::CasResp { id, outcome });
            }
            Err(e) => self.fail(format!("coordinator refused a driver request: {e}")),
        }
    }

    /// Feeds an event to host `i`'s machine and queues the actions.
    fn handle(&mut self, i: usize, e: Event) {
        let now = self.instant();
        self.log(|| format!("h{i}: {e:?}"));
        let acts = self.hosts[i].m.handle(now, e);
        self.queue_actions(i, acts);
    }

    fn queue_actions(&mut self, i: usize, acts: Vec<Action>) {
        if !acts.is_empty() {
            self.log(|| format!("h{i}: -> {acts:?}"));
        }
        let h = &mut self.hosts[i];
        h.actions.extend(acts);
        if !h.actions.is_empty() && !h.exec_scheduled {
            h.exec_scheduled = true;
            // Acting follows deciding after a moment, and a pause may fall in between.
            let t = self.now + self.rng.below(3);
            self.at(t, Ev::Exec(i));
        }
        // The machine's next deadline.
        if let Some(d) = self.hosts[i].m.next_deadline() {
            let ms = d.saturating_duration_since(self.base).as_millis() as u64;
            let ms = ms.max(self.now);
            if self.hosts[i].tick_at.is_none_or(|t| ms < t) {
                self.hosts[i].tick_at = Some(ms);
                self.at(ms, Ev::Tick(i));
            }
        }
    }

    fn exec(&mut self, i: usize) {
        self.hosts[i].exec_scheduled = false;
        while let Some(a) = self.hosts[i].actions.pop_front() {
            self.act(i, a);
            if self.violation.is_some() || self.paused(i) || !self.hosts[i].up {
                break;
            }
        }
        if !self.hosts[i].actions.is_empty() && !self.hosts[i].exec_scheduled {
            self.hosts[i].exec_scheduled = true;
            self.at(self.now, Ev::Exec(i));
        }
    }

    fn release(&mut self, i: usize, generation: u64, epoch: u64) {
        let from = self.hosts[i].released.map_or(1, |r| r + 1);
        for e in from..=epoch {
            let Some(content) = self.hosts[i]
                .vm
                .as_ref()
                .and_then(|vm| vm.get(e as usize).copied())
            else {
                self.fail(format!(
                    "h{i} releases epoch {e} under generation {generation}, which its VM never ran"
                ));
                return;
            };
            match self.journal.get(&e) {
                Some(&(c, h, g)) if c != content || g != generation || h != i => {
                    self.fail(format!(
                        "epoch {e} released twice: by h{h} under generation {g} (content {c}) and by h{i} under generation {generation} (content {content})"
                    ));
                    return;
                }
                Some(_) => {}
                None => {
                    self.journal.insert(e, (content, i, generation));
                    self.stats.releases += 1;
                }
            }
        }
        let h = &mut self.hosts[i];
        h.released = h.released.max(Some(epoch));
    }

    fn act(&mut self, i: usize, a: Action) {
        match a {
            Action::Persist { generation } => {
                let h = &mut self.hosts[i];
                h.known_durable = h.known_durable.max(generation);
            }
            Action::Cas { expected, .. } => {
                let id = self.next_req;
                self.next_req += 1;
                let h = &self.hosts[i];
                let req = CasRequest {
                    vm: VM.into(),
                    claimant: format!("{}#{}", h.name, h.incarnation),
                    expected,
                    members: (0..self.hosts.len())
                        .filter(|j| *j != i)
                        .map(|j| format!("h{j}"))
                        .collect(),
                    witness: h.witness_nonce,
                };
                self.hosts[i].pending_cas = Some(id);
                let c = self.coord_id();
                self.send(i, c, Msg::CasReq { id, req });
                self.at(self.now + CAS_TIMEOUT_MS, Ev::CasTimeout(i, id));
            }
            Action::Release { generation, epoch } => {
                if self.cfg.bug != Some(Bug::ReleaseUnacked) {
                    self.release(i, generation, epoch);
                }
            }
            Action::Ack { generation, epoch } => {
                if self.cfg.bug == Some(Bug::AckAfterDecision) {
                    return; // the broken driver acked already
                }
                self.send_ack(i, generation, epoch);
            }
            Action::AcceptSession { .. } | Action::RefuseSession => {}
            Action::EndSession => {
                if let Some(s) = self.hosts[i].session {
                    self.end_session(i, s);
                }
            }
            Action::Promote { generation, epoch } => {
                self.stats.promotions += 1;
                let Some((g, hist)) = self.hosts[i].replica.take() else {
                    return self.fail(format!("h{i} promotes without a replica"));
                };
                if hist.len() as u64 <= epoch {
                    return self.fail(format!(
                        "h{i} promotes to epoch {epoch} but its replica of generation {g} ends at {}",
                        hist.len() - 1
                    ));
                }
                let vm: Vec<u64> = hist[..=epoch as usize].to_vec();
                for (&e, &(c, h, rg)) in &self.journal {
                    if vm.get(e as usize) != Some(&c) {
                        let why = format!(
                            "h{i} promotes under generation {generation} from epoch {epoch}, losing epoch {e} released by h{h} under generation {rg}"
                        );
                        return self.fail(why);
                    }
                }
                let h = &mut self.hosts[i];
                h.vm = Some(vm);
                h.released = Some(epoch);
                self.at(self.now + EPOCH_MS, Ev::Capture(i));
            }
            Action::StartResync { generation } => {
                let n = self.hosts.len();
                let candidates: Vec<usize> = (0..n).filter(|j| *j != i).collect();
                let j = candidates[self.rng.below(candidates.len() as u64) as usize];
                let Some(vm) = self.hosts[i].vm.clone() else {
                    return;
                };
                if !self.hosts[j].up || !self.reachable(i, j) {
                    self.handle(i, Event::ResyncFailed);
                    return;
                }
                let sid = self.next_sid;
                self.next_sid += 1;
                self.sessions.insert(sid, (i, j));
                self.hosts[i].session = Some(Session { sid, peer: j });
                self.watch(i, j);
                self.send(
                    i,
                    j,
                    Msg::Hello {
                        sid,
                        generation,
                        history: vm,
                    },
                );
                self.handle(i, Event::SessionOpened);
            }
            Action::Fence { .. } => {
                // The session was ended before the claim (EndSession); a session accepted since
                // (this host is a standby now) is not this VM's.
                self.stats.fences += 1;
                let h = &mut self.hosts[i];
                h.vm = None;
                h.released = None;
            }
            Action::DropReplica { generation } => {
                self.stats.stale_drops += 1;
                if self.hosts[i]
                    .replica
                    .as_ref()
                    .is_some_and(|r| r.0 == generation)
                {
                    self.hosts[i].replica = None;
                }
            }
        }
        if let Action::Persist { .. } = a {
            if self.hosts[i].m.role() == Role::Primary {
                self.stats.solo_wins += 1;
            }
        }
    }

    fn restart(&mut self, i: usize) {
        let n = self.hosts.len();
        let h = &mut self.hosts[i];
        h.up = true;
        h.incarnation += 1;
        h.m = RoleMachine::new_secondary(role_config(), h.known_durable)
            .unwrap_or_else(|e| unreachable!("valid config: {e}"));
        h.paused_until = 0;
        h.witness_nonce = 0;
        self.log(|| format!("h{i} restarts"));
        let _ = n;
        self.at(self.now, Ev::HbSend(i));
        self.at(self.now + 5, Ev::DetectorCheck(i));
    }

    fn crash(&mut self, i: usize) {
        self.log(|| format!("h{i} crashes"));
        let sessions: Vec<u64> = self
            .sessions
            .iter()
            .filter(|(_, (p, s))| *p == i || *s == i)
            .map(|(k, _)| *k)
            .collect();
        for sid in sessions {
            self.break_session(sid);
        }
        let h = &mut self.hosts[i];
        h.up = false;
        h.vm = None;
        h.replica = None;
        h.session = None;
        h.partner = None;
        h.actions.clear();
        h.exec_scheduled = false;
        h.pending_cas = None;
        h.tick_at = None;
        h.released = None;
        let t = self.now + self.rng.range(100, 800);
        self.at(t, Ev::Restart(i));
    }

    fn fault(&mut self) {
        let n = self.hosts.len();
        self.stats.faults += 1;
        let i = self.rng.below(n as u64) as usize;
        match self.rng.below(100) {
            0..=19 => {
                // Partition a pair (maybe one way), hosts or host–coordinator.
                let j = self.rng.below(n as u64 + 1) as usize;
                if j == i {
                    return;
                }
                let until = self.now + self.rng.range(50, 600);
                self.log(|| format!("partition h{i} / node {j} until {until}"));
                self.blocked[i][j] = until;
                if self.rng.chance(700) {
                    self.blocked[j][i] = until;
                }
                let cut: Vec<u64> = self
                    .sessions
                    .iter()
                    .filter(|(_, (p, s))| (*p == i && *s == j) || (*p == j && *s == i))
                    .map(|(k, _)| *k)
                    .collect();
                for sid in cut {
                    self.break_session(sid);
                }
            }
            20..=39 => {
                // Pause a host (SIGSTOP, a long stall): it neither processes nor acts.
                let d = self.rng.range(20, 700);
                self.log(|| format!("h{i} paused for {d} ms"));
                self.hosts[i].paused_until = self.now + d;
            }
            40..=54 => {
                if self.hosts[i].up {
                    self.crash(i);
                }
            }
            55..=64 => {
                let d = self.rng.range(50, 1000);
                self.log(|| format!("coordinator down for {d} ms"));
                self.coord_down_until = self.now + d;
            }
            65..=72 => {
                self.log(|| "coordinator loses its state".into());
                self.stats.state_losses += 1;
                let nonce = self.rng.next();
                self.coord = Registers::relearning(nonce);
            }
            73..=84 => {
                // Break a replication session (the replication network alone).
                if let Some(&sid) = self.sessions.keys().next() {
                    self.break_session(sid);
                }
            }
            _ => {
                // A false detector verdict at a random host.
                if self.hosts[i].up && self.hosts[i].partner.is_some() && !self.paused(i) {
                    self.hosts[i].partner_dead = true;
                    self.log(|| format!("h{i}: false dead verdict"));
                    self.handle(i, Event::PeerDead);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_replays_exactly() {
        let cfg = SimConfig {
            trace: true,
            ..SimConfig::default()
        };
        let a = run(42, &cfg);
        let b = run(42, &cfg);
        assert_eq!(a.trace, b.trace);
        assert_eq!(a.stats, b.stats);
        assert!(a.trace.len() > 1000);
    }
}
