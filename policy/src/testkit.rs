//! Test helpers: a simulated world behind the [`Actuator`] trait, and a way to poll futures without a
//! runtime (every step of the simulated world completes at once, except the one that "crashes").

use std::collections::HashMap;
use std::future::Future;
use std::pin::pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use crate::actuator::{Actuator, StepError};
use crate::level::Level;
use crate::placement::{self, HostInfo, Limits};
use crate::plan::Step;
use crate::store::Transition;

/// The primary's host in the simulated world.
pub const PRIMARY: &str = "a";

/// What the world has set up for one VM.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct VmState {
    pub monitoring: bool,
    pub replication: bool,
    pub secondary: Option<String>,
    pub synced: bool,
    pub epochs: bool,
}

impl VmState {
    /// What a VM at rest at `level` has.
    pub fn at(level: Level, secondary: Option<&str>) -> VmState {
        let ha = level >= Level::Ha;
        let ft = level == Level::Ft;
        VmState {
            monitoring: ha,
            replication: ha,
            secondary: secondary.filter(|_| ft).map(str::to_string),
            synced: ft,
            epochs: ft,
        }
    }
}

#[derive(Debug, Default)]
pub struct Inner {
    pub vms: HashMap<String, VmState>,
    pub calls: Vec<(Step, String)>,
    /// Steps that fail their next N calls.
    pub fail: HashMap<Step, u32>,
    /// After this many calls in total, the next call "crashes": it applies its effect if
    /// `hang_applies`, then never completes.
    pub hang_after: Option<usize>,
    pub hang_applies: bool,
    pub hosts: Vec<HostInfo>,
    pub resume_error: Option<String>,
}

/// The simulated world; clones share it, and it outlives engines (as hosts outlive an agent).
#[derive(Debug, Clone)]
pub struct World(pub Arc<Mutex<Inner>>);

impl Default for World {
    fn default() -> Self {
        World::new()
    }
}

impl World {
    /// Hosts `a` (the primary's), `b` and `c` (one FT VM already).
    pub fn new() -> World {
        let inner = Inner {
            hosts: vec![
                HostInfo::up("a", 0),
                HostInfo::up("b", 0),
                HostInfo::up("c", 1),
            ],
            ..Inner::default()
        };
        World(Arc::new(Mutex::new(inner)))
    }

    pub fn lock(&self) -> MutexGuard<'_, Inner> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn state(&self, vm: &str) -> VmState {
        self.lock().vms.get(vm).cloned().unwrap_or_default()
    }

    pub fn fail(&self, step: Step, times: u32) {
        self.lock().fail.insert(step, times);
    }

    /// The next call after `n` more calls crashes.
    pub fn crash_after(&self, n: usize, applies: bool) {
        let mut w = self.lock();
        w.hang_after = Some(w.calls.len() + n);
        w.hang_applies = applies;
    }

    pub fn set_up(&self, host: &str, up: bool) {
        let mut w = self.lock();
        if let Some(h) = w.hosts.iter_mut().find(|h| h.name == host) {
            h.up = up;
        }
    }

    pub fn steps_called(&self) -> Vec<Step> {
        self.lock().calls.iter().map(|(s, _)| *s).collect()
    }

    async fn call<R>(
        &self,
        step: Step,
        vm: &str,
        f: impl FnOnce(&mut VmState, &[HostInfo]) -> Result<R, StepError>,
    ) -> Result<R, StepError> {
        let (result, hang) = {
            let mut w = self.lock();
            w.calls.push((step, vm.to_string()));
            let hang = w.hang_after.is_some_and(|n| w.calls.len() > n);
            if hang {
                w.hang_after = None;
            }
            let fail = w.fail.get_mut(&step).filter(|n| **n > 0).map(|n| *n -= 1);
            if hang && !w.hang_applies {
                (None, true)
            } else if fail.is_some() {
                (
                    Some(Err(StepError::failed(format!("{step}: injected fault")))),
                    hang,
                )
            } else {
                let hosts = w.hosts.clone();
                let st = w.vms.entry(vm.to_string()).or_default();
                (Some(f(st, &hosts)), hang)
            }
        };
        if hang {
            std::future::pending::<()>().await;
        }
        result.expect("a call that does not hang has a result")
    }
}

fn check(ok: bool, what: &str) -> Result<(), StepError> {
    if ok {
        Ok(())
    } else {
        Err(StepError::failed(what.to_string()))
    }
}

impl Actuator for World {
    async fn start_monitoring(&self, vm: &str) -> Result<(), StepError> {
        self.call(Step::StartMonitoring, vm, |s, _| {
            s.monitoring = true;
            Ok(())
        })
        .await
    }

    async fn start_volume_replication(&self, vm: &str) -> Result<(), StepError> {
        self.call(Step::StartVolumeReplication, vm, |s, _| {
            check(s.monitoring, "replication before monitoring")?;
            s.replication = true;
            Ok(())
        })
        .await
    }

    async fn pick_secondary(&self, vm: &str) -> Result<String, StepError> {
        self.call(Step::PickSecondary, vm, |s, hosts| {
            if let Some(h) = &s.secondary {
                return Ok(h.clone());
            }
            let h = placement::pick_secondary(vm, PRIMARY, hosts, Limits::default())?;
            s.secondary = Some(h.clone());
            Ok(h)
        })
        .await
    }

    async fn initial_sync(&self, vm: &str, secondary: &str) -> Result<(), StepError> {
        self.call(Step::InitialSync, vm, |s, _| {
            check(
                s.secondary.as_deref() == Some(secondary),
                "sync to an unreserved host",
            )?;
            s.synced = true;
            Ok(())
        })
        .await
    }

    async fn start_epochs(&self, vm: &str, secondary: &str) -> Result<(), StepError> {
        self.call(Step::StartEpochs, vm, |s, _| {
            check(
                s.synced && s.secondary.as_deref() == Some(secondary),
                "epochs without a synced secondary",
            )?;
            s.epochs = true;
            Ok(())
        })
        .await
    }

    async fn stop_epochs(&self, vm: &str) -> Result<(), StepError> {
        self.call(Step::StopEpochs, vm, |s, _| {
            s.epochs = false;
            Ok(())
        })
        .await
    }

    async fn release_secondary(&self, vm: &str, secondary: Option<&str>) -> Result<(), StepError> {
        self.call(Step::ReleaseSecondary, vm, |s, _| {
            check(!s.epochs, "release while statepointing")?;
            if let (Some(h), Some(mine)) = (secondary, &s.secondary) {
                check(h == mine, "release of another host")?;
            }
            s.secondary = None;
            s.synced = false;
            Ok(())
        })
        .await
    }

    async fn stop_volume_replication(&self, vm: &str) -> Result<(), StepError> {
        self.call(Step::StopVolumeReplication, vm, |s, _| {
            s.replication = false;
            Ok(())
        })
        .await
    }

    async fn stop_monitoring(&self, vm: &str) -> Result<(), StepError> {
        self.call(Step::StopMonitoring, vm, |s, _| {
            check(!s.replication, "monitoring stopped before replication")?;
            s.monitoring = false;
            Ok(())
        })
        .await
    }

    async fn check_resume(&self, _vm: &str, t: &Transition) -> Result<(), StepError> {
        let w = self.lock();
        if let Some(e) = &w.resume_error {
            return Err(StepError::failed(e.clone()));
        }
        if let Some(h) = &t.secondary {
            if w.hosts.iter().any(|x| &x.name == h && !x.up) {
                return Err(StepError::failed(format!("secondary host {h} is gone")));
            }
        }
        Ok(())
    }
}

/// Polls `f` once: `Some` if it completed, `None` if it is stuck (and is then dropped, like a crash).
pub fn poll_once<F: Future>(f: F) -> Option<F::Output> {
    let mut f = pin!(f);
    match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => Some(v),
        Poll::Pending => None,
    }
}

/// Runs `f`, which must complete without waiting.
pub fn block_on<F: Future>(f: F) -> F::Output {
    poll_once(f).expect("the future completes without waiting")
}
