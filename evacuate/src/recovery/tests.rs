//! Logic tests of the recovery engine against a mock Nova (the real-service test is tests/e2e/nova.sh).

use super::*;
use crate::fence::FenceConfig;

#[derive(Default)]
struct MockState {
    services: HashMap<String, Service>,
    servers: HashMap<String, Server>,
    calls: Vec<String>,
    refuse_targets: Vec<Option<String>>,
    start_failures: u32,
    pre_migrate: HashMap<String, String>,
    in_flight: usize,
    max_in_flight: usize,
}

struct Mock {
    st: Mutex<MockState>,
    mode: EvacuateMode,
}

fn svc(host: &str, status: &str) -> Service {
    Service {
        id: format!("svc-{host}"),
        binary: "nova-compute".into(),
        host: host.into(),
        status: status.into(),
        state: "up".into(),
        forced_down: false,
        disabled_reason: None,
        zone: None,
    }
}

fn server(id: &str, host: &str, status: &str, level: Option<&str>) -> Server {
    Server {
        id: id.into(),
        name: format!("name-{id}"),
        status: status.into(),
        host: Some(host.into()),
        task_state: None,
        vm_state: None,
        locked: false,
        metadata: level
            .map(|l| HashMap::from([(LEVEL_KEY.to_string(), l.to_string())]))
            .unwrap_or_default(),
        fault: None,
    }
}

impl Mock {
    fn new(mode: EvacuateMode) -> Arc<Self> {
        let m = Mock {
            st: Mutex::new(MockState::default()),
            mode,
        };
        {
            let mut st = m.st.lock().unwrap();
            for h in ["compute1", "compute2"] {
                st.services.insert(h.into(), svc(h, "enabled"));
            }
            st.services.insert("spare".into(), svc("spare", "disabled"));
        }
        Arc::new(m)
    }
    fn add(&self, s: Server) {
        self.st.lock().unwrap().servers.insert(s.id.clone(), s);
    }
    fn calls(&self) -> Vec<String> {
        self.st.lock().unwrap().calls.clone()
    }
    fn get(&self, id: &str) -> Server {
        self.st.lock().unwrap().servers[id].clone()
    }
    fn call(&self, c: String) {
        self.st.lock().unwrap().calls.push(c);
    }
    /// Records `call`, then changes the service `id`.
    fn service(
        &self,
        call: &str,
        id: &str,
        f: impl FnOnce(&mut Service),
    ) -> Result<Service, NovaError> {
        self.call(call.to_string());
        let mut st = self.st.lock().unwrap();
        let s = st
            .services
            .values_mut()
            .find(|s| s.id == id)
            .ok_or_else(|| nf("service"))?;
        f(s);
        Ok(s.clone())
    }
}

fn nf(what: &str) -> NovaError {
    NovaError::NotFound {
        what: what.into(),
        message: "no such thing".into(),
    }
}

impl Compute for Mock {
    async fn compute_service(&self, host: &str) -> Result<Service, NovaError> {
        let st = self.st.lock().unwrap();
        st.services
            .get(host)
            .cloned()
            .ok_or(NovaError::NoService { host: host.into() })
    }
    async fn set_forced_down(&self, id: &str, down: bool) -> Result<Service, NovaError> {
        self.service(&format!("forced_down {id} {down}"), id, |s| {
            s.forced_down = down;
            s.state = if down { "down" } else { "up" }.into();
        })
    }
    async fn disable(&self, id: &str, _reason: &str) -> Result<Service, NovaError> {
        self.service(&format!("disable {id}"), id, |s| {
            s.status = "disabled".into()
        })
    }
    async fn enable(&self, id: &str) -> Result<Service, NovaError> {
        self.service(&format!("enable {id}"), id, |s| s.status = "enabled".into())
    }
    async fn servers_on_host(&self, host: &str) -> Result<Vec<Server>, NovaError> {
        let st = self.st.lock().unwrap();
        let mut v: Vec<_> = st
            .servers
            .values()
            .filter(|s| s.host.as_deref() == Some(host))
            .cloned()
            .collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(v)
    }
    async fn server(&self, id: &str) -> Result<Server, NovaError> {
        self.st
            .lock()
            .unwrap()
            .servers
            .get(id)
            .cloned()
            .ok_or_else(|| nf("server"))
    }
    async fn evacuate(&self, id: &str, target: Option<&str>) -> Result<Microversion, NovaError> {
        self.call(format!("evacuate {id} {target:?}"));
        let mut st = self.st.lock().unwrap();
        if st.refuse_targets.contains(&target.map(str::to_string)) {
            return Err(NovaError::BadRequest {
                what: "evacuate".into(),
                message: "No valid host was found.".into(),
            });
        }
        let src = st.servers[id].host.clone().unwrap_or_default();
        if !st.services[&src].forced_down {
            return Err(NovaError::HostInUse {
                what: "evacuate".into(),
                message: format!("Compute service of {src} is still in use."),
            });
        }
        let mode = self.mode;
        let s = st.servers.get_mut(id).ok_or_else(|| nf("server"))?;
        s.host = Some(target.unwrap_or("compute2").into());
        if mode == EvacuateMode::Stopped {
            s.status = "SHUTOFF".into();
        }
        st.in_flight += 1;
        st.max_in_flight = st.max_in_flight.max(st.in_flight);
        Ok(if mode == EvacuateMode::Stopped {
            Microversion(2, 95)
        } else {
            Microversion(2, 94)
        })
    }
    async fn lock(&self, id: &str) -> Result<(), NovaError> {
        self.call(format!("lock {id}"));
        Ok(())
    }
    async fn unlock(&self, id: &str) -> Result<(), NovaError> {
        self.call(format!("unlock {id}"));
        Ok(())
    }
    async fn stop(&self, id: &str) -> Result<(), NovaError> {
        self.call(format!("stop {id}"));
        let mut st = self.st.lock().unwrap();
        st.servers.get_mut(id).ok_or_else(|| nf("server"))?.status = "SHUTOFF".into();
        Ok(())
    }
    async fn start(&self, id: &str) -> Result<(), NovaError> {
        self.call(format!("start {id}"));
        let mut st = self.st.lock().unwrap();
        if st.start_failures > 0 {
            st.start_failures -= 1;
            return Err(NovaError::Conflict {
                what: "start".into(),
                message: "Instance is in task_state powering-on".into(),
            });
        }
        st.servers.get_mut(id).ok_or_else(|| nf("server"))?.status = "ACTIVE".into();
        Ok(())
    }
    async fn migrate(&self, id: &str) -> Result<(), NovaError> {
        self.call(format!("migrate {id}"));
        let mut st = self.st.lock().unwrap();
        let s = st.servers.get_mut(id).ok_or_else(|| nf("server"))?;
        let was = std::mem::replace(&mut s.status, "VERIFY_RESIZE".into());
        s.host = Some("compute2".into());
        st.pre_migrate.insert(id.into(), was);
        Ok(())
    }
    async fn confirm_migration(&self, id: &str) -> Result<(), NovaError> {
        self.call(format!("confirm {id}"));
        let mut st = self.st.lock().unwrap();
        let was = st.pre_migrate.remove(id).unwrap_or_default();
        st.servers.get_mut(id).ok_or_else(|| nf("server"))?.status = was;
        Ok(())
    }
    async fn wait_status(&self, id: &str, want: &str, _t: Duration) -> Result<Server, NovaError> {
        let s = self.server(id).await?;
        if s.status == want {
            Ok(s)
        } else {
            Err(NovaError::Timeout {
                what: format!("{id} to be {want}"),
                waited: Duration::ZERO,
                last: s.status,
            })
        }
    }
    async fn wait_evacuated(
        &self,
        id: &str,
        source: &str,
        want: &str,
        _t: Duration,
    ) -> Result<Evacuated, NovaError> {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let s = self.server(id).await?;
        self.st.lock().unwrap().in_flight -= 1;
        assert_ne!(s.host.as_deref(), Some(source));
        assert_eq!(s.status, want, "{id}");
        Ok(Evacuated {
            host: s.host.unwrap_or_default(),
            status: s.status,
            migration_status: Some("done".into()),
        })
    }
    fn evacuate_mode(&self) -> EvacuateMode {
        self.mode
    }
}

fn fencer(ok: bool) -> Fencer {
    Fencer::new(FenceConfig {
        command: vec![
            "sh".into(),
            "-c".into(),
            if ok {
                "exit 0"
            } else {
                "echo no BMC >&2; exit 1"
            }
            .into(),
        ],
        timeout_secs: 5,
        attempts: 1,
    })
}

fn engine(
    m: &Arc<Mock>,
    fence_ok: bool,
    cfg: RecoveryConfig,
) -> (Engine<Mock>, mpsc::UnboundedReceiver<Event>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let e = Engine::new(
        m.clone(),
        fencer(fence_ok),
        cfg,
        Arc::new(Level::of_metadata),
        Some(tx),
    )
    .unwrap();
    (e, rx)
}

fn kinds(e: &Engine<Mock>) -> Vec<String> {
    e.history()
        .iter()
        .map(|e| {
            serde_json::to_value(e).unwrap()["event"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect()
}

fn populate(m: &Mock) {
    m.add(server("a", "compute1", "ACTIVE", Some("ha")));
    m.add(server("b", "compute1", "ACTIVE", Some("HA")));
    m.add(server("c", "compute1", "SHUTOFF", Some("ha")));
    m.add(server("f", "compute1", "ACTIVE", Some("ft")));
    m.add(server("n", "compute1", "ACTIVE", None));
    m.add(server("o", "compute2", "ACTIVE", Some("ha")));
}

#[tokio::test]
async fn host_failure_fences_forces_down_then_evacuates_only_ha() {
    let m = Mock::new(EvacuateMode::Active);
    populate(&m);
    let (e, mut rx) = engine(&m, true, RecoveryConfig::default());
    let r = e.host_failed("compute1", SystemTime::now()).await;
    assert_eq!(r.outcome, Outcome::Recovered);
    assert_eq!(r.vms.len(), 3);
    assert!(r.fenced_ms.is_some() && r.forced_down_ms.is_some());
    let calls = m.calls();
    let fd = calls
        .iter()
        .position(|c| c == "forced_down svc-compute1 true")
        .unwrap();
    let first_evac = calls
        .iter()
        .position(|c| c.starts_with("evacuate"))
        .unwrap();
    assert!(fd < first_evac, "{calls:?}");
    assert!(!calls
        .iter()
        .any(|c| c.contains("evacuate f") || c.contains("evacuate n") || c.contains("evacuate o")));
    for id in ["a", "b"] {
        assert_eq!(m.get(id).status, "ACTIVE");
        assert_eq!(m.get(id).host.as_deref(), Some("compute2"));
        assert!(calls.contains(&format!("lock {id}")) && calls.contains(&format!("unlock {id}")));
    }
    assert_eq!(m.get("c").status, "SHUTOFF", "a stopped VM stays stopped");
    assert_eq!(m.get("f").host.as_deref(), Some("compute1"));
    assert_eq!(m.get("n").host.as_deref(), Some("compute1"));
    let k = kinds(&e);
    assert_eq!(&k[..3], ["host_dead", "fenced", "forced_down"]);
    assert_eq!(k.iter().filter(|k| *k == "vm_skipped").count(), 2);
    assert_eq!(k.iter().filter(|k| *k == "evacuation_accepted").count(), 3);
    assert_eq!(k.iter().filter(|k| *k == "vm_recovered").count(), 3);
    assert_eq!(
        &k[k.len() - 2..],
        ["recovery_finished", "host_left_disabled"]
    );
    let mut n = 0;
    while rx.try_recv().is_ok() {
        n += 1;
    }
    assert_eq!(n, k.len());
    assert_eq!(m.st.lock().unwrap().services["compute1"].status, "disabled");
}

#[tokio::test]
async fn one_failure_one_recovery() {
    let m = Mock::new(EvacuateMode::Active);
    populate(&m);
    let (e, _rx) = engine(&m, true, RecoveryConfig::default());
    let (r1, r2) = tokio::join!(
        e.host_failed("compute1", SystemTime::now()),
        e.host_failed("compute1", SystemTime::now())
    );
    let outcomes = [r1.outcome, r2.outcome];
    assert!(outcomes.contains(&Outcome::Recovered) && outcomes.contains(&Outcome::Duplicate));
    let again = e.host_failed("compute1", SystemTime::now()).await;
    assert_eq!(again.outcome, Outcome::Duplicate);
    assert_eq!(
        m.calls()
            .iter()
            .filter(|c| c.starts_with("forced_down"))
            .count(),
        1
    );
    assert_eq!(
        kinds(&e)
            .iter()
            .filter(|k| *k == "duplicate_ignored")
            .count(),
        2
    );
    // The operator re-enables the host: the next failure is a new recovery.
    let s = e.reenable_host("compute1").await.unwrap();
    assert_eq!(s.status, "enabled");
    assert!(!m.st.lock().unwrap().services["compute1"].forced_down);
    assert!(kinds(&e).contains(&"host_reenabled".to_string()));
    assert!(!e.is_recovering("compute1"));
}

#[tokio::test]
async fn unfenced_host_raises_an_alert_and_nothing_else() {
    let m = Mock::new(EvacuateMode::Active);
    populate(&m);
    let (e, _rx) = engine(&m, false, RecoveryConfig::default());
    let r = e.host_failed("compute1", SystemTime::now()).await;
    assert_eq!(r.outcome, Outcome::Unfenced);
    assert!(m.calls().is_empty(), "{:?}", m.calls());
    let h = e.history();
    let alert = h.iter().find_map(|e| match &e.kind {
        EventKind::Alert { reason } => Some(reason.clone()),
        _ => None,
    });
    assert!(alert.unwrap().contains("no BMC"));
    // Still one recovery in charge until the host is heard again.
    assert_eq!(
        e.host_failed("compute1", SystemTime::now()).await.outcome,
        Outcome::Duplicate
    );
    e.host_back("compute1");
    assert!(!e.is_recovering("compute1"));
}

#[tokio::test]
async fn parallel_evacuations_are_bounded() {
    let m = Mock::new(EvacuateMode::Active);
    for i in 0..10 {
        m.add(server(&format!("v{i}"), "compute1", "ACTIVE", Some("ha")));
    }
    let cfg = RecoveryConfig {
        max_parallel: 3,
        ..RecoveryConfig::default()
    };
    let (e, _rx) = engine(&m, true, cfg);
    let r = e.host_failed("compute1", SystemTime::now()).await;
    assert_eq!(r.outcome, Outcome::Recovered);
    assert_eq!(r.vms.len(), 10);
    let max = m.st.lock().unwrap().max_in_flight;
    assert!((1..=3).contains(&max), "{max}");
}

#[tokio::test]
async fn reserved_host_policies() {
    // reserved_host: to the (disabled, then enabled) reserved host.
    let m = Mock::new(EvacuateMode::Active);
    m.add(server("a", "compute1", "ACTIVE", Some("ha")));
    let cfg = RecoveryConfig {
        policy: Policy::ReservedHost,
        reserved_hosts: vec!["spare".into()],
        ..RecoveryConfig::default()
    };
    let (e, _rx) = engine(&m, true, cfg.clone());
    e.host_failed("compute1", SystemTime::now()).await;
    assert_eq!(m.get("a").host.as_deref(), Some("spare"));
    assert!(m.calls().contains(&"enable svc-spare".to_string()));

    // rh_priority: the reserved host refuses → the scheduler.
    let m = Mock::new(EvacuateMode::Active);
    m.add(server("a", "compute1", "ACTIVE", Some("ha")));
    m.st.lock().unwrap().refuse_targets = vec![Some("spare".into())];
    let (e, _rx) = engine(
        &m,
        true,
        RecoveryConfig {
            policy: Policy::RhPriority,
            ..cfg.clone()
        },
    );
    let r = e.host_failed("compute1", SystemTime::now()).await;
    assert_eq!(r.outcome, Outcome::Recovered);
    assert_eq!(m.get("a").host.as_deref(), Some("compute2"));

    // auto_priority: the scheduler refuses → the reserved host.
    let m = Mock::new(EvacuateMode::Active);
    m.add(server("a", "compute1", "ACTIVE", Some("ha")));
    m.st.lock().unwrap().refuse_targets = vec![None];
    let (e, _rx) = engine(
        &m,
        true,
        RecoveryConfig {
            policy: Policy::AutoPriority,
            ..cfg.clone()
        },
    );
    e.host_failed("compute1", SystemTime::now()).await;
    assert_eq!(m.get("a").host.as_deref(), Some("spare"));

    // reserved_host only, and it refuses: the VM fails with Nova's message.
    let m = Mock::new(EvacuateMode::Active);
    m.add(server("a", "compute1", "ACTIVE", Some("ha")));
    m.st.lock().unwrap().refuse_targets = vec![Some("spare".into())];
    let (e, _rx) = engine(&m, true, cfg);
    let r = e.host_failed("compute1", SystemTime::now()).await;
    assert_eq!(r.outcome, Outcome::Partial);
    assert!(r.vms[0].error.as_ref().unwrap().contains("No valid host"));
}

#[tokio::test]
async fn stopped_mode_starts_what_ran_and_keeps_stopped_what_was() {
    let m = Mock::new(EvacuateMode::Stopped);
    populate(&m);
    let (e, _rx) = engine(&m, true, RecoveryConfig::default());
    let r = e.host_failed("compute1", SystemTime::now()).await;
    assert_eq!(r.outcome, Outcome::Recovered);
    assert_eq!(m.get("a").status, "ACTIVE");
    assert_eq!(m.get("c").status, "SHUTOFF");
    assert!(m.calls().contains(&"start a".to_string()));
    assert!(!m.calls().contains(&"start c".to_string()));
}

#[tokio::test]
async fn crash_restarts_in_place_then_escalates() {
    let m = Mock::new(EvacuateMode::Active);
    populate(&m);
    let cfg = RecoveryConfig {
        restart_attempts: 2,
        ..RecoveryConfig::default()
    };
    let (e, _rx) = engine(&m, true, cfg);
    // Restart in place.
    assert_eq!(e.vm_crashed("a").await.unwrap(), "compute1");
    assert_eq!(m.get("a").status, "ACTIVE");
    assert!(m
        .calls()
        .ends_with(&["stop a".to_string(), "start a".to_string()]));
    // A none-level VM is left alone.
    e.vm_crashed("n").await.unwrap();
    assert!(!m.calls().iter().any(|c| c.ends_with(" n")));
    // Start fails twice: two failed attempts, then the move.
    m.st.lock().unwrap().start_failures = 2;
    assert_eq!(e.vm_crashed("b").await.unwrap(), "compute2");
    let k = kinds(&e);
    assert_eq!(k.iter().filter(|k| *k == "restart_failed").count(), 2);
    assert!(k.contains(&"escalated".to_string()) && k.contains(&"vm_moved".to_string()));
    // Too many crashes within the window: straight to the move.
    e.vm_crashed("a").await.unwrap();
    assert_eq!(e.vm_crashed("a").await.unwrap(), "compute2");
    assert!(m.calls().contains(&"migrate a".to_string()));
}

#[test]
fn config_checks_and_toml() {
    let c: RecoveryConfig =
        toml::from_str("policy = \"rh_priority\"\nreserved_hosts = [\"spare\"]\nmax_parallel = 8")
            .unwrap();
    assert_eq!(c.policy, Policy::RhPriority);
    c.validate().unwrap();
    let bad = RecoveryConfig {
        policy: Policy::ReservedHost,
        ..RecoveryConfig::default()
    };
    assert!(bad
        .validate()
        .unwrap_err()
        .to_string()
        .contains("reserved_hosts"));
    assert!(toml::from_str::<RecoveryConfig>("policy = \"sometimes\"").is_err());
    let ev = Event {
        at_ms: 1,
        recovery: 2,
        host: "compute1".into(),
        kind: EventKind::Fenced { took_ms: 3 },
    };
    assert_eq!(
        serde_json::to_string(&ev).unwrap(),
        r#"{"at_ms":1,"recovery":2,"host":"compute1","event":"fenced","took_ms":3}"#
    );
}

#[tokio::test]
async fn a_restarted_engine_remembers_and_reruns_what_was_cut_short() {
    let m = Mock::new(EvacuateMode::Active);
    populate(&m);
    let (e, _rx) = engine(&m, true, RecoveryConfig::default());
    let done = e.host_failed("compute1", SystemTime::now()).await;
    assert_eq!(done.outcome, Outcome::Recovered);
    // A second host whose recovery was running when the engine stopped.
    let mut snap = e.snapshot();
    let cut = HostRecovery {
        id: 7,
        host: "compute3".into(),
        last_heartbeat_ms: 1_000,
        declared_ms: 2_000,
        fenced_ms: Some(2_500),
        forced_down_ms: None,
        finished_ms: None,
        outcome: Outcome::Running,
        vms: Vec::new(),
    };
    snap.in_charge.push(cut);
    // Through JSON, as the agent saves it.
    let snap: Snapshot = serde_json::from_str(&serde_json::to_string(&snap).unwrap()).unwrap();

    let (e2, _rx2) = engine(&m, true, RecoveryConfig::default());
    let resume = e2.restore(snap);
    assert_eq!(
        resume,
        vec![(
            "compute3".to_string(),
            UNIX_EPOCH + Duration::from_millis(1_000)
        )]
    );
    assert_eq!(e2.history(), e.history(), "the history survives");
    let recs = e2.recoveries();
    assert_eq!(recs.len(), 2, "{recs:?}");
    assert_eq!(recs[0], done, "the finished recovery, as it was");
    assert_eq!(recs[1].outcome, Outcome::Interrupted);
    // compute1 still awaits the operator: a new report of it is a duplicate.
    let again = e2.host_failed("compute1", SystemTime::now()).await;
    assert_eq!(again.outcome, Outcome::Duplicate);
    // The cut-short recovery runs again under a new id, after the restored ones.
    let rerun = e2.host_failed("compute3", UNIX_EPOCH).await;
    assert!(rerun.id > 7, "id {}", rerun.id);
    assert_ne!(rerun.outcome, Outcome::Duplicate);
    // Re-enabling closes compute1's recovery; it stays listed.
    e2.reenable_host("compute1").await.unwrap();
    assert!(!e2.is_recovering("compute1"));
    assert!(e2.recoveries().iter().any(|r| r.id == done.id));
    // Restarted again: the closed recovery is remembered as closed, so compute1's next failure is a
    // new recovery, not a duplicate.
    let (e3, _rx3) = engine(&m, true, RecoveryConfig::default());
    assert!(e3.restore(e2.snapshot()).is_empty());
    assert!(e3.recoveries().iter().any(|r| r.id == done.id));
    assert!(!e3.is_recovering("compute1"));
    m.add(server("z", "compute1", "ACTIVE", Some("ha")));
    let next = e3.host_failed("compute1", SystemTime::now()).await;
    assert_ne!(next.outcome, Outcome::Duplicate);
    assert!(next.id > rerun.id, "id {} after {}", next.id, rerun.id);
}
