//! The transition engine: starts transitions, runs their steps through an [`Actuator`], persists the
//! cursor after every step, rolls back on failure, and resumes what a crash interrupted.
//!
//! Use: [`Engine::recover`] once at start; then, per API request, [`Engine::request`] (quick, gives the
//! answer for the API: unchanged / started / already running / [`EngineError::Busy`]) followed, when a
//! transition started, by [`Engine::drive`] in a task of its own.

use std::collections::HashSet;
use std::sync::Mutex;

use tracing::{info, warn};

use crate::actuator::{Actuator, StepError};
use crate::level::Level;
use crate::plan::{self, Step};
use crate::store::{now_ms, EventKind, NewEvent, Phase, Store, StoreError, Transition, VmRecord};

/// The answer to [`Engine::request`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// The VM is already at this level and nothing runs: nothing to do.
    Unchanged {
        /// The level.
        level: Level,
    },
    /// A transition was recorded; run it with [`Engine::drive`]. Also returned when a failed
    /// transition is retried (asking for its `to` again runs its steps again from the start; asking
    /// for its `from` runs its rollback again).
    Started(Transition),
    /// A transition heading to this level is already running: nothing new was started.
    AlreadyRunning(Transition),
}

/// How a transition ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The VM reached the level asked for.
    Done {
        /// The VM's level now.
        level: Level,
    },
    /// A step failed (or the transition could not be resumed) and the steps done were undone.
    RolledBack {
        /// The VM's level now (the transition's `from`).
        level: Level,
        /// Why.
        reason: String,
    },
    /// A rollback step failed too: the VM is between two levels and its record says so.
    Failed {
        /// Why.
        reason: String,
    },
}

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// Another transition of this VM is running (the API answers 409).
    #[error("VM {vm} is busy: transition {running} (asked for {requested})")]
    Busy {
        /// The VM.
        vm: String,
        /// The transition in the way, described.
        running: String,
        /// The level asked for.
        requested: Level,
    },
    /// Another task of this process is already driving this VM's transition.
    #[error("VM {vm}: its transition is already being driven")]
    AlreadyDriving {
        /// The VM.
        vm: String,
    },
    /// There is no transition to drive.
    #[error("VM {vm} has no transition in progress")]
    NoTransition {
        /// The VM.
        vm: String,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What [`Engine::recover`] did with one VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovered {
    /// The VM.
    pub vm: String,
    /// How its transition ended (a transition that had already failed is reported as `Failed`).
    pub outcome: Outcome,
}

/// Runs transitions through an [`Actuator`], persisting every step in a [`Store`]. Share it with an
/// `Arc`; all methods take `&self`.
#[derive(Debug)]
pub struct Engine<A> {
    store: Store,
    actuator: A,
    local_host: String,
    /// Serialises read-modify-write of VM records (never held across an await).
    write: Mutex<()>,
    /// VMs whose transition a task of this process is driving.
    driving: Mutex<HashSet<String>>,
}

/// Removes its VM from `driving` when dropped, also when the driving future is dropped.
struct Claim<'a> {
    driving: &'a Mutex<HashSet<String>>,
    vm: String,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        lock(self.driving).remove(&self.vm);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl<A: Actuator> Engine<A> {
    /// An engine for the primaries of `local_host` (a secondary is never placed there).
    pub fn new(store: Store, actuator: A, local_host: impl Into<String>) -> Self {
        Engine {
            store,
            actuator,
            local_host: local_host.into(),
            write: Mutex::new(()),
            driving: Mutex::new(HashSet::new()),
        }
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The actuator.
    pub fn actuator(&self) -> &A {
        &self.actuator
    }

    /// The record of `vm` (`None` if never seen: level none).
    pub fn vm(&self, vm: &str) -> Result<Option<VmRecord>, EngineError> {
        Ok(self.store.vm(vm)?)
    }

    /// Reads `vm`'s record, lets `f` change it and say which events describe the change, and commits
    /// both in one store transaction.
    fn modify<R>(
        &self,
        vm: &str,
        f: impl FnOnce(&mut VmRecord) -> Result<(R, Vec<NewEvent>), EngineError>,
    ) -> Result<R, EngineError> {
        let _w = lock(&self.write);
        let mut rec = self.store.vm(vm)?.unwrap_or_default();
        let before = rec.clone();
        let (r, events) = f(&mut rec)?;
        if rec != before || !events.is_empty() {
            self.store.update(vm, Some(&rec), &events)?;
        }
        Ok(r)
    }

    /// Asks for `vm` to be at `to`. Records the desired level and, if needed, a new transition (with
    /// a `transition_started` event); does not run it: call [`Engine::drive`].
    ///
    /// Idempotent: asking for the current level when nothing runs gives [`Request::Unchanged`];
    /// asking for the level a running transition is heading to gives [`Request::AlreadyRunning`].
    /// Asking for another level while a transition runs gives [`EngineError::Busy`].
    pub fn request(&self, vm: &str, to: Level) -> Result<Request, EngineError> {
        self.modify(vm, |rec| {
            let Some(t) = rec.transition.as_mut() else {
                rec.desired = to;
                if rec.current == to {
                    return Ok((Request::Unchanged { level: to }, vec![]));
                }
                let from = rec.current;
                let steps = plan::steps(from, to);
                let t = Transition {
                    from,
                    to,
                    cursor: 0,
                    phase: Phase::Forward,
                    rollback: Vec::new(),
                    rollback_cursor: 0,
                    secondary: if from == Level::Ft {
                        rec.secondary.clone()
                    } else {
                        None
                    },
                    reason: None,
                    started_ms: now_ms(),
                    steps,
                };
                let ev = NewEvent::new(
                    EventKind::TransitionStarted,
                    format!("{}: {}", t.arrow(), plan::describe(&t.steps)),
                );
                info!(vm, transition = %t.arrow(), "transition started");
                rec.transition = Some(t.clone());
                rec.last_error = None;
                return Ok((Request::Started(t), vec![ev]));
            };
            if t.heading_to() == Some(to) {
                let t = t.clone();
                rec.desired = to;
                return Ok((Request::AlreadyRunning(t), vec![]));
            }
            if t.phase == Phase::Failed && (to == t.to || to == t.from) {
                let (what, steps) = if to == t.to {
                    t.phase = Phase::Forward;
                    t.cursor = 0;
                    ("", &t.steps)
                } else {
                    t.phase = Phase::RollingBack;
                    t.rollback_cursor = 0;
                    ("rollback ", &t.rollback)
                };
                let detail = format!(
                    "{} {what}retried after failure: {}",
                    t.arrow(),
                    plan::describe(steps)
                );
                info!(vm, "{detail}");
                let t = t.clone();
                rec.desired = to;
                let ev = NewEvent::new(EventKind::TransitionStarted, detail);
                return Ok((Request::Started(t), vec![ev]));
            }
            Err(EngineError::Busy {
                vm: vm.to_string(),
                running: t.describe(),
                requested: to,
            })
        })
    }

    fn claim(&self, vm: &str) -> Result<Claim<'_>, EngineError> {
        if !lock(&self.driving).insert(vm.to_string()) {
            return Err(EngineError::AlreadyDriving { vm: vm.to_string() });
        }
        Ok(Claim {
            driving: &self.driving,
            vm: vm.to_string(),
        })
    }

    /// Runs `vm`'s transition from its persisted cursor to its end: every step's completion is
    /// committed (cursor + `step_done` event) before the next starts. A failing step starts the
    /// rollback; a failing rollback step marks the transition failed. Dropping the future midway is
    /// like a crash: the transition stays in the store, to be resumed.
    pub async fn drive(&self, vm: &str) -> Result<Outcome, EngineError> {
        let _claim = self.claim(vm)?;
        self.drive_claimed(vm).await
    }

    async fn drive_claimed(&self, vm: &str) -> Result<Outcome, EngineError> {
        loop {
            let t = self.transition(vm)?;
            if t.phase == Phase::Failed {
                return Ok(Outcome::Failed {
                    reason: t.reason.unwrap_or_default(),
                });
            }
            let Some(step) = t.next_step() else {
                return self.finish(vm);
            };
            let result = self.run_step(vm, step, t.secondary.as_deref()).await;
            if let Some(outcome) = self.record_step(vm, &t, step, result)? {
                return Ok(outcome);
            }
        }
    }

    fn transition(&self, vm: &str) -> Result<Transition, EngineError> {
        self.store
            .vm(vm)?
            .and_then(|r| r.transition)
            .ok_or_else(|| EngineError::NoTransition { vm: vm.to_string() })
    }

    async fn run_step(
        &self,
        vm: &str,
        step: Step,
        secondary: Option<&str>,
    ) -> Result<Option<String>, StepError> {
        let a = &self.actuator;
        let need =
            || secondary.ok_or_else(|| StepError::failed(format!("{step}: no secondary recorded")));
        match step {
            Step::StartMonitoring => a.start_monitoring(vm).await,
            Step::StartVolumeReplication => a.start_volume_replication(vm).await,
            Step::PickSecondary => {
                let host = a.pick_secondary(vm).await?;
                if host == self.local_host {
                    return Err(StepError::failed(format!(
                        "pick_secondary chose {host}, the primary's own host"
                    )));
                }
                return Ok(Some(host));
            }
            Step::InitialSync => a.initial_sync(vm, need()?).await,
            Step::StartEpochs => a.start_epochs(vm, need()?).await,
            Step::StopEpochs => a.stop_epochs(vm).await,
            Step::ReleaseSecondary => a.release_secondary(vm, secondary).await,
            Step::StopVolumeReplication => a.stop_volume_replication(vm).await,
            Step::StopMonitoring => a.stop_monitoring(vm).await,
        }
        .map(|()| None)
    }

    /// Commits the result of `step`, run from transition `seen`. Returns the outcome if the
    /// transition ended in failure.
    fn record_step(
        &self,
        vm: &str,
        seen: &Transition,
        step: Step,
        result: Result<Option<String>, StepError>,
    ) -> Result<Option<Outcome>, EngineError> {
        self.modify(vm, |rec| {
            let t = match rec.transition.as_mut() {
                Some(t) if t == seen => t,
                _ => return Err(EngineError::NoTransition { vm: vm.to_string() }),
            };
            match (result, t.phase) {
                (Ok(picked), phase) => {
                    if phase == Phase::Forward {
                        t.cursor += 1;
                    } else {
                        t.rollback_cursor += 1;
                    }
                    if let Some(host) = picked {
                        t.secondary = Some(host);
                    }
                    if step == Step::ReleaseSecondary {
                        t.secondary = None;
                    }
                    let detail = match (&t.secondary, step) {
                        (Some(h), Step::PickSecondary) => format!("{step} done: {h}"),
                        _ => format!("{step} done"),
                    };
                    Ok((
                        None,
                        vec![NewEvent::step(EventKind::StepDone, step, detail)],
                    ))
                }
                (Err(e), Phase::Forward) => {
                    warn!(vm, %step, error = %e, "step failed, rolling back");
                    let failed = NewEvent::step(EventKind::StepFailed, step, e.to_string());
                    let start = begin_rollback(t, format!("{step} failed: {e}"));
                    Ok((None, vec![failed, start]))
                }
                (Err(e), _) => {
                    warn!(vm, %step, error = %e, "rollback step failed");
                    let reason = format!(
                        "rollback step {step} failed: {e} (rolling back because: {})",
                        t.reason.as_deref().unwrap_or("unknown")
                    );
                    let (arrow, from, to) = (t.arrow(), t.from, t.to);
                    t.phase = Phase::Failed;
                    t.reason = Some(reason.clone());
                    rec.last_error = Some(reason.clone());
                    let evs = vec![
                        NewEvent::step(EventKind::StepFailed, step, e.to_string()),
                        NewEvent::new(
                            EventKind::TransitionFailed,
                            format!("{arrow} failed, the VM is between {from} and {to}: {reason}"),
                        ),
                    ];
                    Ok((Some(Outcome::Failed { reason }), evs))
                }
            }
        })
    }

    /// Ends `vm`'s transition, all of whose steps (forward or rollback) are done.
    fn finish(&self, vm: &str) -> Result<Outcome, EngineError> {
        self.modify(vm, |rec| {
            let t = rec
                .transition
                .take()
                .ok_or_else(|| EngineError::NoTransition { vm: vm.to_string() })?;
            let level = if t.phase == Phase::Forward {
                t.to
            } else {
                t.from
            };
            rec.current = level;
            rec.secondary = if level == Level::Ft {
                t.secondary.clone()
            } else {
                None
            };
            let at = match &rec.secondary {
                Some(h) => format!("{level} (secondary on {h})"),
                None => level.to_string(),
            };
            if t.phase == Phase::Forward {
                info!(vm, transition = %t.arrow(), "transition done");
                rec.last_error = None;
                let ev = NewEvent::new(
                    EventKind::TransitionDone,
                    format!("{} done: the VM is {at}", t.arrow()),
                );
                Ok((Outcome::Done { level }, vec![ev]))
            } else {
                let reason = t.reason.clone().unwrap_or_default();
                warn!(vm, transition = %t.arrow(), %reason, "transition rolled back");
                rec.last_error = Some(reason.clone());
                let ev = NewEvent::new(
                    EventKind::TransitionRolledBack,
                    format!("{} rolled back, the VM is {at}: {reason}", t.arrow()),
                );
                Ok((Outcome::RolledBack { level, reason }, vec![ev]))
            }
        })
    }

    /// Resumes `vm`'s transition after a restart: records a `transition_resumed` event, asks
    /// [`Actuator::check_resume`] whether a forward transition can go on (rolls it back if not) and
    /// drives it to its end. A failed transition is left as it is and reported as
    /// [`Outcome::Failed`].
    pub async fn resume(&self, vm: &str) -> Result<Outcome, EngineError> {
        let _claim = self.claim(vm)?;
        let t = self.transition(vm)?;
        match t.phase {
            Phase::Failed => {
                return Ok(Outcome::Failed {
                    reason: t.reason.unwrap_or_default(),
                })
            }
            Phase::RollingBack => {}
            Phase::Forward if t.cursor >= t.steps.len() => {}
            Phase::Forward => {
                let check = self.actuator.check_resume(vm, &t).await;
                if let Err(e) = check {
                    warn!(vm, error = %e, "transition cannot be resumed, rolling back");
                    self.modify(vm, |rec| {
                        let Some(t) = rec.transition.as_mut().filter(|c| **c == t) else {
                            return Err(EngineError::NoTransition { vm: vm.to_string() });
                        };
                        let resumed = NewEvent::new(
                            EventKind::TransitionResumed,
                            format!("{} after a restart", t.describe()),
                        );
                        let start = begin_rollback(t, format!("cannot resume: {e}"));
                        Ok(((), vec![resumed, start]))
                    })?;
                    return self.drive_claimed(vm).await;
                }
            }
        }
        info!(vm, transition = %t.describe(), "resuming transition");
        self.store.append(
            vm,
            NewEvent::new(
                EventKind::TransitionResumed,
                format!("{} after a restart", t.describe()),
            ),
        )?;
        self.drive_claimed(vm).await
    }

    /// At agent start: resumes (or rolls back) every transition the store holds in progress, one
    /// after the other, and reports each, failed ones included.
    pub async fn recover(&self) -> Result<Vec<Recovered>, EngineError> {
        let mut out = Vec::new();
        for (vm, rec) in self.store.vms()? {
            if rec.transition.is_none() {
                continue;
            }
            let outcome = self.resume(&vm).await?;
            out.push(Recovered { vm, outcome });
        }
        Ok(out)
    }

    /// Forgets `vm` (it was deleted): removes its record, keeps its history. Refused with
    /// [`EngineError::Busy`] while a transition exists.
    pub fn forget(&self, vm: &str) -> Result<(), EngineError> {
        let _w = lock(&self.write);
        let Some(rec) = self.store.vm(vm)? else {
            return Ok(());
        };
        if let Some(t) = &rec.transition {
            return Err(EngineError::Busy {
                vm: vm.to_string(),
                running: t.describe(),
                requested: Level::None,
            });
        }
        self.store.update(
            vm,
            None,
            &[NewEvent::new(
                EventKind::Note,
                format!("forgotten at level {}", rec.current),
            )],
        )?;
        Ok(())
    }
}

/// Switches `t` to rolling back the steps it started (the one at the cursor included, since it may
/// have been in flight); returns the `rollback_started` event.
fn begin_rollback(t: &mut Transition, reason: String) -> NewEvent {
    let started = (t.cursor + 1).min(t.steps.len());
    t.rollback = plan::rollback(&t.steps[..started]);
    t.rollback_cursor = 0;
    t.phase = Phase::RollingBack;
    let ev = NewEvent::new(
        EventKind::RollbackStarted,
        format!(
            "{} rolling back ({reason}): {}",
            t.arrow(),
            plan::describe(&t.rollback)
        ),
    );
    t.reason = Some(reason);
    ev
}

#[cfg(test)]
mod tests;
