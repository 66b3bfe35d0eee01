use super::*;
use crate::store::tests::TempDir;
use crate::store::{Event, EventQuery};
use crate::testkit::{block_on, poll_once, VmState, World};

struct Rig {
    dir: TempDir,
    world: World,
    engine: Option<Engine<World>>,
}

impl Rig {
    fn new(tag: &str) -> Rig {
        let dir = TempDir::new(tag);
        let world = World::new();
        let engine = Engine::new(Store::open(&dir.0).unwrap(), world.clone(), "a");
        Rig {
            dir,
            world,
            engine: Some(engine),
        }
    }

    fn e(&self) -> &Engine<World> {
        self.engine.as_ref().unwrap()
    }

    /// Drops the engine and its store (a crash: whatever was not committed is gone), reopens both.
    fn restart(&mut self) {
        self.engine = None;
        let store = Store::open(&self.dir.0).unwrap();
        self.engine = Some(Engine::new(store, self.world.clone(), "a"));
    }

    fn set(&self, vm: &str, to: Level) -> Outcome {
        match self.e().request(vm, to).unwrap() {
            Request::Started(_) => block_on(self.e().drive(vm)).unwrap(),
            Request::Unchanged { level } => Outcome::Done { level },
            r => panic!("unexpected {r:?}"),
        }
    }

    fn rec(&self, vm: &str) -> VmRecord {
        self.e().vm(vm).unwrap().unwrap_or_default()
    }

    fn events(&self, vm: &str) -> Vec<Event> {
        self.e()
            .store()
            .events(&EventQuery {
                vm: Some(vm.into()),
                ..Default::default()
            })
            .unwrap()
    }

    fn kinds(&self, vm: &str) -> Vec<EventKind> {
        self.events(vm).into_iter().map(|e| e.kind).collect()
    }

    /// The VM is at rest at `level` and the world agrees.
    fn assert_at(&self, vm: &str, level: Level) {
        let rec = self.rec(vm);
        assert_eq!(rec.current, level, "{rec:?}");
        assert_eq!(rec.transition, None);
        assert_eq!(
            self.world.state(vm),
            VmState::at(level, rec.secondary.as_deref()),
            "{rec:?}"
        );
        assert_eq!(rec.secondary.is_some(), level == Level::Ft);
    }
}

fn pairs() -> Vec<(Level, Level)> {
    let mut v = Vec::new();
    for from in Level::ALL {
        for to in Level::ALL {
            if from != to {
                v.push((from, to));
            }
        }
    }
    v
}

#[test]
fn every_transition_path() {
    for (from, to) in pairs() {
        let rig = Rig::new("path");
        assert_eq!(rig.set("vm1", from), Outcome::Done { level: from });
        let before = rig.world.steps_called().len();
        let n_events = rig.events("vm1").len();
        assert_eq!(rig.set("vm1", to), Outcome::Done { level: to });
        rig.assert_at("vm1", to);
        assert_eq!(rig.rec("vm1").desired, to);
        assert_eq!(
            rig.world.steps_called()[before..],
            plan::steps(from, to),
            "{from}→{to}"
        );
        let kinds = rig.kinds("vm1")[n_events..].to_vec();
        let mut want = vec![EventKind::TransitionStarted];
        want.extend(plan::steps(from, to).iter().map(|_| EventKind::StepDone));
        want.push(EventKind::TransitionDone);
        assert_eq!(kinds, want, "{from}→{to}");
        if to == Level::Ft {
            assert_eq!(rig.rec("vm1").secondary.as_deref(), Some("b"));
        }
    }
}

#[test]
fn setting_the_current_level_is_a_no_op() {
    let rig = Rig::new("noop");
    assert_eq!(
        rig.e().request("vm1", Level::None).unwrap(),
        Request::Unchanged { level: Level::None }
    );
    rig.set("vm1", Level::Ha);
    let n = rig.events("vm1").len();
    let calls = rig.world.steps_called().len();
    assert_eq!(
        rig.e().request("vm1", Level::Ha).unwrap(),
        Request::Unchanged { level: Level::Ha }
    );
    assert_eq!(rig.events("vm1").len(), n);
    assert_eq!(rig.world.steps_called().len(), calls);
}

#[test]
fn same_request_while_running_returns_the_running_one_and_another_is_busy() {
    let rig = Rig::new("busy");
    let Request::Started(t) = rig.e().request("vm1", Level::Ft).unwrap() else {
        panic!()
    };
    assert_eq!(
        rig.e().request("vm1", Level::Ft).unwrap(),
        Request::AlreadyRunning(t.clone())
    );
    for other in [Level::Ha, Level::None] {
        let e = rig.e().request("vm1", other).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, EngineError::Busy { .. }), "{e:?}");
        assert!(
            msg.contains("vm1") && msg.contains("none→ft") && msg.contains(other.as_str()),
            "{msg}"
        );
    }
    // Another VM is not affected.
    assert_eq!(
        rig.set("vm2", Level::Ha),
        Outcome::Done { level: Level::Ha }
    );
    assert_eq!(
        block_on(rig.e().drive("vm1")).unwrap(),
        Outcome::Done { level: Level::Ft }
    );
    rig.assert_at("vm1", Level::Ft);
    assert!(matches!(
        block_on(rig.e().drive("vm1")),
        Err(EngineError::NoTransition { .. })
    ));
}

#[test]
fn one_driver_per_vm() {
    let rig = Rig::new("driver");
    rig.e().request("vm1", Level::Ha).unwrap();
    rig.world.crash_after(0, false);
    let e = rig.e();
    {
        let mut first = std::pin::pin!(e.drive("vm1"));
        assert!(poll_once(first.as_mut()).is_none());
        assert!(matches!(
            block_on(e.drive("vm1")),
            Err(EngineError::AlreadyDriving { .. })
        ));
    }
    // The stuck driver was dropped: its claim is gone.
    assert_eq!(
        block_on(e.drive("vm1")).unwrap(),
        Outcome::Done { level: Level::Ha }
    );
}

#[test]
fn failing_step_rolls_back() {
    let rig = Rig::new("rollback");
    rig.set("vm1", Level::Ha);
    rig.world.fail(Step::InitialSync, 1);
    let out = rig.set("vm1", Level::Ft);
    let Outcome::RolledBack { level, reason } = out else {
        panic!("{out:?}")
    };
    assert_eq!(level, Level::Ha);
    assert!(reason.contains("initial_sync"), "{reason}");
    rig.assert_at("vm1", Level::Ha);
    let rec = rig.rec("vm1");
    assert_eq!(rec.desired, Level::Ft);
    assert!(rec.last_error.unwrap().contains("injected"));
    let kinds = rig.kinds("vm1");
    assert_eq!(
        kinds[kinds.len() - 6..],
        [
            EventKind::TransitionStarted,
            EventKind::StepDone, // pick_secondary
            EventKind::StepFailed,
            EventKind::RollbackStarted,
            EventKind::StepDone, // release_secondary
            EventKind::TransitionRolledBack,
        ]
    );
    // Asking again works once the fault is gone.
    assert_eq!(
        rig.set("vm1", Level::Ft),
        Outcome::Done { level: Level::Ft }
    );
    assert_eq!(rig.rec("vm1").last_error, None);
}

#[test]
fn every_step_failure_rolls_back_to_from() {
    for (from, to) in pairs() {
        for (i, step) in plan::steps(from, to).into_iter().enumerate() {
            let rig = Rig::new("eachfail");
            rig.set("vm1", from);
            rig.world.fail(step, 1);
            let out = rig.set("vm1", to);
            assert!(
                matches!(out, Outcome::RolledBack { level, .. } if level == from),
                "{from}→{to} step {i} {step}: {out:?}"
            );
            rig.assert_at("vm1", from);
        }
    }
}

#[test]
fn no_secondary_host_is_refused_with_a_reason() {
    let rig = Rig::new("nohost");
    rig.world.set_up("b", false);
    rig.world.lock().hosts[2].ft_vms = 8;
    let out = rig.set("vm1", Level::Ft);
    let Outcome::RolledBack { level, reason } = out else {
        panic!("{out:?}")
    };
    assert_eq!(level, Level::None);
    assert!(
        reason.contains("no secondary host for VM vm1")
            && reason.contains("b is down")
            && reason.contains("c is full (8/8 FT VMs)"),
        "{reason}"
    );
    rig.assert_at("vm1", Level::None);
}

#[test]
fn a_secondary_on_the_local_host_is_refused() {
    let dir = TempDir::new("local");
    let world = World::new();
    // The world places primaries on `a`; an engine that believes it runs on `b` must refuse `b`.
    let e = Engine::new(Store::open(&dir.0).unwrap(), world.clone(), "b");
    e.request("vm1", Level::Ft).unwrap();
    let out = block_on(e.drive("vm1")).unwrap();
    assert!(
        matches!(&out, Outcome::RolledBack { reason, .. } if reason.contains("primary's own host")),
        "{out:?}"
    );
}

#[test]
fn failing_rollback_is_reported_and_can_be_retried() {
    let rig = Rig::new("failed");
    rig.set("vm1", Level::Ha);
    rig.world.fail(Step::StartEpochs, 1);
    rig.world.fail(Step::ReleaseSecondary, 1);
    let out = rig.set("vm1", Level::Ft);
    let Outcome::Failed { reason } = out else {
        panic!("{out:?}")
    };
    assert!(
        reason.contains("release_secondary") && reason.contains("start_epochs"),
        "{reason}"
    );
    let rec = rig.rec("vm1");
    let t = rec.transition.clone().unwrap();
    assert_eq!(t.phase, Phase::Failed);
    assert_eq!(rec.current, Level::Ha);
    assert!(rec.last_error.is_some());
    assert_eq!(
        *rig.kinds("vm1").last().unwrap(),
        EventKind::TransitionFailed
    );
    // Nothing runs, and a level other than from/to is refused.
    assert!(matches!(
        rig.e().request("vm1", Level::None),
        Err(EngineError::Busy { .. })
    ));
    assert!(matches!(
        block_on(rig.e().drive("vm1")).unwrap(),
        Outcome::Failed { .. }
    ));
    // Retrying the rollback brings it back to ha.
    assert!(matches!(
        rig.e().request("vm1", Level::Ha).unwrap(),
        Request::Started(_)
    ));
    assert!(matches!(
        block_on(rig.e().drive("vm1")).unwrap(),
        Outcome::RolledBack {
            level: Level::Ha,
            ..
        }
    ));
    rig.assert_at("vm1", Level::Ha);
}

#[test]
fn failed_transition_retried_forward() {
    let rig = Rig::new("retryfwd");
    rig.world.fail(Step::StartVolumeReplication, 1);
    rig.world.fail(Step::StopMonitoring, 1);
    assert!(matches!(rig.set("vm1", Level::Ha), Outcome::Failed { .. }));
    assert!(matches!(
        rig.e().request("vm1", Level::Ha).unwrap(),
        Request::Started(_)
    ));
    assert_eq!(
        block_on(rig.e().drive("vm1")).unwrap(),
        Outcome::Done { level: Level::Ha }
    );
    rig.assert_at("vm1", Level::Ha);
}

/// Crash after K steps of every transition (with and without the K+1-th step's effect applied), drop
/// the engine, reopen the store, recover: the transition completes and the world matches.
#[test]
fn crash_midway_resumes_every_transition() {
    for (from, to) in pairs() {
        let n = plan::steps(from, to).len();
        for k in 0..=n {
            for applies in [false, true] {
                let mut rig = Rig::new("crash");
                rig.set("vm1", from);
                rig.e().request("vm1", to).unwrap();
                rig.world.crash_after(k, applies);
                let done = poll_once(rig.e().drive("vm1"));
                if k < n {
                    assert!(done.is_none(), "{from}→{to} k={k}");
                    let t = rig.rec("vm1").transition.unwrap();
                    assert_eq!(t.cursor, k);
                }
                rig.restart();
                let rec = block_on(rig.e().recover()).unwrap();
                if k < n {
                    assert_eq!(
                        rec,
                        [Recovered {
                            vm: "vm1".into(),
                            outcome: Outcome::Done { level: to }
                        }],
                        "{from}→{to} k={k}"
                    );
                    assert!(rig.kinds("vm1").contains(&EventKind::TransitionResumed));
                } else {
                    assert!(rec.is_empty());
                }
                rig.assert_at("vm1", to);
                assert_eq!(*rig.kinds("vm1").last().unwrap(), EventKind::TransitionDone);
            }
        }
    }
}

#[test]
fn crash_then_secondary_gone_rolls_back() {
    let mut rig = Rig::new("gone");
    rig.set("vm1", Level::Ha);
    rig.e().request("vm1", Level::Ft).unwrap();
    rig.world.crash_after(1, true); // pick_secondary done, crash in initial_sync
    assert!(poll_once(rig.e().drive("vm1")).is_none());
    assert_eq!(
        rig.rec("vm1").transition.unwrap().secondary.as_deref(),
        Some("b")
    );
    rig.world.set_up("b", false);
    rig.restart();
    let rec = block_on(rig.e().recover()).unwrap();
    let Outcome::RolledBack { level, reason } = &rec[0].outcome else {
        panic!("{rec:?}")
    };
    assert_eq!(*level, Level::Ha);
    assert!(
        reason.contains("cannot resume") && reason.contains("secondary host b is gone"),
        "{reason}"
    );
    rig.assert_at("vm1", Level::Ha);
    let kinds = rig.kinds("vm1");
    assert!(kinds.contains(&EventKind::TransitionResumed));
    assert!(kinds.contains(&EventKind::RollbackStarted));
    assert_eq!(*kinds.last().unwrap(), EventKind::TransitionRolledBack);
}

#[test]
fn crash_during_rollback_resumes_the_rollback() {
    for applies in [false, true] {
        let mut rig = Rig::new("crashrb");
        rig.world.fail(Step::InitialSync, 1);
        rig.e().request("vm1", Level::Ft).unwrap();
        // start_monitoring, start_volume_replication, pick_secondary, initial_sync (fails),
        // release_secondary (crash).
        rig.world.crash_after(4, applies);
        assert!(poll_once(rig.e().drive("vm1")).is_none());
        assert_eq!(rig.rec("vm1").transition.unwrap().phase, Phase::RollingBack);
        rig.restart();
        let rec = block_on(rig.e().recover()).unwrap();
        assert!(
            matches!(
                rec[0].outcome,
                Outcome::RolledBack {
                    level: Level::None,
                    ..
                }
            ),
            "{rec:?}"
        );
        rig.assert_at("vm1", Level::None);
    }
}

#[test]
fn recover_reports_failed_transitions_and_leaves_them() {
    let mut rig = Rig::new("recfailed");
    rig.world.fail(Step::StartVolumeReplication, 1);
    rig.world.fail(Step::StopMonitoring, 1);
    assert!(matches!(rig.set("vm1", Level::Ha), Outcome::Failed { .. }));
    rig.restart();
    let calls = rig.world.steps_called().len();
    let rec = block_on(rig.e().recover()).unwrap();
    assert!(matches!(rec[0].outcome, Outcome::Failed { .. }));
    assert_eq!(rig.world.steps_called().len(), calls);
    assert_eq!(rig.rec("vm1").transition.unwrap().phase, Phase::Failed);
}

#[test]
fn state_survives_restart() {
    let mut rig = Rig::new("survive");
    rig.set("vm1", Level::Ft);
    rig.set("vm2", Level::Ha);
    let before = rig.e().store().events(&EventQuery::default()).unwrap();
    rig.restart();
    rig.assert_at("vm1", Level::Ft);
    rig.assert_at("vm2", Level::Ha);
    assert_eq!(
        rig.e().store().events(&EventQuery::default()).unwrap(),
        before
    );
    assert!(block_on(rig.e().recover()).unwrap().is_empty());
    assert_eq!(
        rig.set("vm1", Level::None),
        Outcome::Done { level: Level::None }
    );
}

#[test]
fn futures_are_send_for_spawning() {
    fn send<T: Send>(_: &T) {}
    let rig = Rig::new("send");
    send(&rig.e().drive("vm1"));
    send(&rig.e().resume("vm1"));
    send(&rig.e().recover());
}

#[test]
fn forget() {
    let rig = Rig::new("forget");
    rig.set("vm1", Level::Ha);
    rig.e().request("vm1", Level::None).unwrap();
    assert!(matches!(
        rig.e().forget("vm1"),
        Err(EngineError::Busy { .. })
    ));
    block_on(rig.e().drive("vm1")).unwrap();
    rig.e().forget("vm1").unwrap();
    assert_eq!(rig.e().vm("vm1").unwrap(), None);
    assert_eq!(rig.kinds("vm1").last(), Some(&EventKind::Note));
    rig.e().forget("never-seen").unwrap();
}

mod props {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Op {
        Request(usize, Level),
        Drive(usize),
        /// Drive, crashing after `n` more actuator calls, then restart and recover.
        Crash(usize, usize, bool),
        Fail(Step, u32),
        HostUp(bool),
    }

    const VMS: [&str; 2] = ["vm0", "vm1"];

    fn level() -> impl Strategy<Value = Level> {
        prop_oneof![Just(Level::None), Just(Level::Ha), Just(Level::Ft)]
    }

    fn step() -> impl Strategy<Value = Step> {
        proptest::sample::select(vec![
            Step::StartMonitoring,
            Step::StartVolumeReplication,
            Step::PickSecondary,
            Step::InitialSync,
            Step::StartEpochs,
            Step::StopEpochs,
            Step::ReleaseSecondary,
            Step::StopVolumeReplication,
            Step::StopMonitoring,
        ])
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0..VMS.len(), level()).prop_map(|(v, l)| Op::Request(v, l)),
            3 => (0..VMS.len()).prop_map(Op::Drive),
            3 => (0..VMS.len(), 0..6usize, any::<bool>()).prop_map(|(v, n, a)| Op::Crash(v, n, a)),
            1 => (step(), 1..3u32).prop_map(|(s, n)| Op::Fail(s, n)),
            1 => any::<bool>().prop_map(Op::HostUp),
        ]
    }

    /// The invariants that hold between operations.
    fn check(rig: &Rig) -> Result<(), TestCaseError> {
        let all = rig.e().store().events(&EventQuery::default()).unwrap();
        for (i, e) in all.iter().enumerate() {
            prop_assert_eq!(e.id, i as u64 + 1, "history ids are 1, 2, 3, …");
        }
        for vm in VMS {
            let rec = rig.rec(vm);
            match &rec.transition {
                None => {
                    prop_assert_eq!(
                        rig.world.state(vm),
                        VmState::at(rec.current, rec.secondary.as_deref()),
                        "{} at rest: {:?}",
                        vm,
                        rec
                    );
                }
                Some(t) => {
                    prop_assert_eq!(rec.current, t.from);
                    prop_assert!(t.cursor <= t.steps.len());
                    prop_assert!(t.rollback_cursor <= t.rollback.len());
                }
            }
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        #[test]
        fn random_requests_and_crashes(ops in proptest::collection::vec(op(), 1..32)) {
            let mut rig = Rig::new("prop");
            for op in ops {
                match op {
                    Op::Request(v, to) => {
                        let vm = VMS[v];
                        let before = rig.rec(vm);
                        let r = rig.e().request(vm, to);
                        let desired = if r.is_ok() { to } else { before.desired };
                        prop_assert_eq!(rig.rec(vm).desired, desired);
                        match (&before.transition, r) {
                            (None, Ok(Request::Unchanged { level })) => {
                                prop_assert_eq!(level, before.current);
                                prop_assert_eq!(to, before.current);
                            }
                            (None, Ok(Request::Started(t))) => {
                                prop_assert_eq!((t.from, t.to), (before.current, to));
                            }
                            (Some(t), Ok(Request::AlreadyRunning(r))) => {
                                prop_assert_eq!(t.heading_to(), Some(to));
                                prop_assert_eq!(t, &r);
                            }
                            (Some(t), Ok(Request::Started(_))) => {
                                prop_assert_eq!(t.phase, Phase::Failed);
                                prop_assert!(to == t.from || to == t.to);
                            }
                            (Some(t), Err(EngineError::Busy { .. })) => {
                                // Never a second transition while one exists.
                                prop_assert_ne!(t.heading_to(), Some(to));
                            }
                            (t, r) => prop_assert!(false, "{:?} → {:?}", t, r),
                        }
                    }
                    Op::Drive(v) => {
                        let vm = VMS[v];
                        let before = rig.rec(vm).transition;
                        let out = block_on(rig.e().drive(vm));
                        let rec = rig.rec(vm);
                        match (before, out) {
                            (None, Err(EngineError::NoTransition { .. })) => {}
                            (Some(t), Ok(Outcome::Done { level })) => {
                                prop_assert_eq!(level, t.to);
                                prop_assert_eq!(rec.current, t.to);
                            }
                            (Some(t), Ok(Outcome::RolledBack { level, .. })) => {
                                prop_assert_eq!(level, t.from);
                                prop_assert_eq!(rec.current, t.from);
                            }
                            (Some(_), Ok(Outcome::Failed { .. })) => {
                                prop_assert_eq!(rec.transition.unwrap().phase, Phase::Failed);
                            }
                            (t, out) => prop_assert!(false, "{:?} → {:?}", t, out),
                        }
                    }
                    Op::Crash(v, n, applies) => {
                        let vm = VMS[v];
                        rig.world.crash_after(n, applies);
                        let _ = poll_once(rig.e().drive(vm));
                        rig.world.lock().hang_after = None;
                        let pending: Vec<(String, Transition)> = rig
                            .e()
                            .store()
                            .vms()
                            .unwrap()
                            .into_iter()
                            .filter_map(|(vm, r)| r.transition.map(|t| (vm, t)))
                            .collect();
                        rig.restart();
                        let recovered = block_on(rig.e().recover()).unwrap();
                        prop_assert_eq!(recovered.len(), pending.len());
                        for (vm, t) in pending {
                            let rec = rig.rec(&vm);
                            // After resume the level is the transition's from or to.
                            prop_assert!(rec.current == t.from || rec.current == t.to);
                            if let Some(t) = rec.transition {
                                prop_assert_eq!(t.phase, Phase::Failed);
                            }
                        }
                    }
                    Op::Fail(s, n) => rig.world.fail(s, n),
                    Op::HostUp(up) => rig.world.set_up("b", up),
                }
                check(&rig)?;
            }
        }
    }
}
