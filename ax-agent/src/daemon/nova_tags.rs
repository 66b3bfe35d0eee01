//! Nova tagging (`[openstack] nova_tagging = true`): a VM that names a Nova server (`nova_server` in its
//! definition) takes its level from that server's `ax:level` metadata, so that operators can tag with
//! `openstack server set --property ax:level=ha <server>`.
//!
//! Every `tag_poll_s` seconds this subsystem (span `nova_tags`) reads the server of each local primary
//! that names one and, per VM:
//! - `ax:level` present, valid (`none`, `ha`, `ft`, any case), different from the VM's desired level, no
//!   transition running: asks for that level exactly as `PUT /v1/vms/{vm}/level` does
//!   ([`Daemon::set_level`]: same checks, same policy engine), and records the origin in an event
//!   (`level set from Nova metadata ax:level=ha of server <id>`). A refusal (e.g. `ft` on a stopped VM)
//!   is a warning event, once per tag and reason; the request is made again at every poll.
//! - an invalid value (`ax:level=gold`): one warning event per distinct value, the level unchanged;
//! - absent: nothing changes;
//! - unreadable (Keystone or Nova unreachable, the server gone): a warning event, repeated at most every
//!   [`WARN_AGAIN`] while it lasts, a note when the server reads again; polling goes on.
//!
//! What was read is kept per VM ([`NovaTag`], shown as `nova_tag` by `GET /v1/vms/{vm}`); while the
//! latest read found a valid tag, `PUT /v1/vms/{vm}/level` refuses a contradicting level (409 naming the
//! tag), so the tag and the API never fight.
//!
//! One `GET /servers/{id}` per VM (up to [`PARALLEL`] at a time) rather than one list per host: the
//! VMs are native ones, not instances of this host's nova-compute, so a host filter would not find
//! them; a server GET needs no admin role (`all_tenants`), only a user that sees the server; a deleted
//! server shows as its own VM's 404; and the count is bounded by the worker slots (64 by default:
//! about 2 requests a second at the default 30 s poll).

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use evacuate::keystone::{Keystone, KeystoneSettings};
use evacuate::nova::{Nova, NovaSettings};
use evacuate::recovery::LEVEL_KEY;
use policy::Level;
use serde::Serialize;
use tracing::{debug, info, warn};

use super::{Daemon, LocalRole};

/// A warning about a server that cannot be read is repeated at most this often while it lasts.
pub const WARN_AGAIN: Duration = Duration::from_secs(600);
/// Server reads in flight at once.
pub const PARALLEL: usize = 8;
/// The first poll waits this long after the start, so that transitions a previous agent left are
/// resumed first.
const FIRST_POLL_AFTER: Duration = Duration::from_secs(1);

/// A server's metadata.
pub type Metadata = HashMap<String, String>;
/// One read of a server's metadata.
pub type Read = Result<Metadata, String>;

/// What the poller last read of a VM's Nova server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NovaTag {
    /// The server.
    pub server: String,
    /// `ax:level` as last read (`None`: absent, or never read).
    pub value: Option<String>,
    /// When the server was last read (ms since the epoch).
    pub read_ms: Option<u64>,
    /// Why the latest read failed (`None`: it succeeded).
    pub error: Option<String>,
}

impl NovaTag {
    /// The level the tag sets: found by the latest read (which succeeded), and valid.
    pub fn level(&self) -> Option<Level> {
        if self.error.is_some() {
            return None;
        }
        self.value.as_deref()?.parse().ok()
    }
}

/// Reads a Nova server's metadata (the daemon's is [`NovaMetadata`]; tests use a fake).
pub trait ServerMetadata: Send + Sync + 'static {
    /// Gets ready for a round of reads (connects); an error fails every read of the round.
    fn ready(&self) -> impl Future<Output = Result<(), String>> + Send {
        async { Ok(()) }
    }

    /// The metadata of server `id`.
    fn metadata(&self, id: &str) -> impl Future<Output = Read> + Send;
}

/// What the poller needs of the daemon (implemented by [`Daemon`]; tests use a fake).
pub trait Target {
    /// The local primaries that name a Nova server: (VM, server).
    fn tagged(&self) -> Vec<(String, String)>;
    /// `vm`'s desired level and whether a transition of it is recorded; `None` if unknown.
    fn desired(&self, vm: &str) -> Option<(Level, bool)>;
    /// Asks for `vm` at `level`, as `PUT /v1/vms/{vm}/level` does.
    fn request(&self, vm: &str, level: Level) -> Result<(), String>;
    /// Appends a note to `vm`'s history.
    fn note(&self, vm: &str, detail: String);
    /// Appends a warning to `vm`'s history.
    fn warn(&self, vm: &str, detail: String);
    /// Publishes what was read of `vm`'s server (the API shows it and checks `PUT /level` against it).
    fn seen(&self, vm: &str, tag: NovaTag);
    /// Forgets what was read for every VM not in `vms`.
    fn retain(&self, vms: &[String]);
}

/// A server that cannot be read.
#[derive(Debug, Clone)]
struct Failing {
    /// When the last warning was recorded.
    warned: Instant,
    /// Failed reads so far.
    reads: u32,
}

/// The poll logic and what it remembers between polls (per VM).
#[derive(Debug, Default)]
pub struct Poller {
    /// What was read.
    tags: BTreeMap<String, NovaTag>,
    /// The invalid value last warned about.
    bad: BTreeMap<String, String>,
    /// The tag whose request was refused, and why (warned about once).
    refused: BTreeMap<String, (Level, String)>,
    /// Servers that cannot be read.
    failing: BTreeMap<String, Failing>,
}

impl Poller {
    /// One round: reads the server of every tagged VM and acts on what it finds. `now` paces the
    /// repeated warnings.
    pub async fn poll<S: ServerMetadata>(
        &mut self,
        now: Instant,
        src: &Arc<S>,
        target: &impl Target,
    ) {
        let vms = target.tagged();
        let names: Vec<String> = vms.iter().map(|(vm, _)| vm.clone()).collect();
        target.retain(&names);
        self.tags.retain(|vm, _| names.contains(vm));
        self.bad.retain(|vm, _| names.contains(vm));
        self.refused.retain(|vm, _| names.contains(vm));
        self.failing.retain(|vm, _| names.contains(vm));
        if vms.is_empty() {
            return;
        }
        let read = match src.ready().await {
            Ok(()) => read_all(src, vms).await,
            Err(e) => vms
                .into_iter()
                .map(|(vm, server)| (vm, server, Err(e.clone())))
                .collect(),
        };
        for (vm, server, r) in read {
            self.apply(now, target, &vm, &server, r);
        }
    }

    /// Acts on one read of `vm`'s server.
    fn apply(&mut self, now: Instant, target: &impl Target, vm: &str, server: &str, read: Read) {
        let mut tag = self
            .tags
            .get(vm)
            .filter(|t| t.server == server)
            .cloned()
            .unwrap_or(NovaTag {
                server: server.to_string(),
                value: None,
                read_ms: None,
                error: None,
            });
        let meta = match read {
            Ok(m) => m,
            Err(e) => {
                tag.error = Some(e.clone());
                self.publish(target, vm, tag);
                self.read_failed(now, target, vm, server, &e);
                return;
            }
        };
        if let Some(f) = self.failing.remove(vm) {
            target.note(
                vm,
                format!(
                    "Nova server {server} read again (after {} failed read(s))",
                    f.reads
                ),
            );
        }
        let value = meta.get(LEVEL_KEY).cloned();
        tag.value.clone_from(&value);
        tag.read_ms = Some(policy::store::now_ms());
        tag.error = None;
        self.publish(target, vm, tag);
        let Some(value) = value else {
            self.bad.remove(vm);
            self.refused.remove(vm);
            return;
        };
        let level = match value.parse::<Level>() {
            Ok(l) => l,
            Err(_) => {
                self.refused.remove(vm);
                if self.bad.get(vm) != Some(&value) {
                    target.warn(
                        vm,
                        format!(
                            "Nova metadata {LEVEL_KEY}={value:?} of server {server} ignored: not none, \
                             ha or ft (level unchanged)"
                        ),
                    );
                    self.bad.insert(vm.to_string(), value);
                }
                return;
            }
        };
        self.bad.remove(vm);
        let Some((desired, busy)) = target.desired(vm) else {
            return;
        };
        if desired == level {
            self.refused.remove(vm);
            return;
        }
        if busy {
            debug!(vm, %level, "a transition runs: the tag is looked at again next time");
            return;
        }
        match target.request(vm, level) {
            Ok(()) => {
                self.refused.remove(vm);
                target.note(
                    vm,
                    format!("level set from Nova metadata {LEVEL_KEY}={level} of server {server}"),
                );
            }
            Err(e) => {
                if self.refused.get(vm) != Some(&(level, e.clone())) {
                    target.warn(
                        vm,
                        format!(
                            "Nova metadata {LEVEL_KEY}={level} of server {server} not applied: {e} \
                             (asked again at every poll)"
                        ),
                    );
                    self.refused.insert(vm.to_string(), (level, e));
                }
            }
        }
    }

    fn publish(&mut self, target: &impl Target, vm: &str, tag: NovaTag) {
        target.seen(vm, tag.clone());
        self.tags.insert(vm.to_string(), tag);
    }

    /// A warning for the first failed read, then at most every [`WARN_AGAIN`] while reads fail.
    fn read_failed(&mut self, now: Instant, target: &impl Target, vm: &str, server: &str, e: &str) {
        match self.failing.get_mut(vm) {
            None => {
                target.warn(
                    vm,
                    format!(
                        "cannot read {LEVEL_KEY} of Nova server {server}: {e} (level unchanged; \
                         read again at every poll)"
                    ),
                );
                self.failing.insert(
                    vm.to_string(),
                    Failing {
                        warned: now,
                        reads: 1,
                    },
                );
            }
            Some(f) => {
                f.reads += 1;
                if now.saturating_duration_since(f.warned) >= WARN_AGAIN {
                    target.warn(
                        vm,
                        format!(
                            "still cannot read {LEVEL_KEY} of Nova server {server} ({} failed reads): {e}",
                            f.reads
                        ),
                    );
                    f.warned = now;
                } else {
                    debug!(
                        vm,
                        server,
                        error = e,
                        "Nova server unreadable (warned already)"
                    );
                }
            }
        }
    }
}

/// Reads every VM's server, [`PARALLEL`] at a time; (VM, server, result), by VM name.
async fn read_all<S: ServerMetadata>(
    src: &Arc<S>,
    vms: Vec<(String, String)>,
) -> Vec<(String, String, Read)> {
    let mut set = tokio::task::JoinSet::new();
    let mut out = Vec::with_capacity(vms.len());
    for (vm, server) in vms {
        while set.len() >= PARALLEL {
            if let Some(Ok(r)) = set.join_next().await {
                out.push(r);
            }
        }
        let src = Arc::clone(src);
        set.spawn(async move {
            let r = src.metadata(&server).await;
            (vm, server, r)
        });
    }
    while let Some(r) = set.join_next().await {
        if let Ok(r) = r {
            out.push(r);
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Server metadata from Nova, through a Keystone session. The Nova client is made at the first read
/// that Keystone and Nova answer (version discovery), and kept.
#[derive(Debug)]
pub struct NovaMetadata {
    ks: Arc<Keystone>,
    nova: tokio::sync::Mutex<Option<Arc<Nova<Keystone>>>>,
}

impl NovaMetadata {
    /// A source for `settings` (no request is made yet).
    pub fn new(settings: KeystoneSettings) -> Result<Self, String> {
        Ok(NovaMetadata {
            ks: Arc::new(Keystone::new(settings).map_err(|e| e.to_string())?),
            nova: tokio::sync::Mutex::new(None),
        })
    }

    async fn client(&self) -> Result<Arc<Nova<Keystone>>, String> {
        let mut g = self.nova.lock().await;
        if let Some(n) = g.as_ref() {
            return Ok(Arc::clone(n));
        }
        let settings = NovaSettings {
            request_timeout_secs: self.ks.settings().request_timeout_secs,
            ..NovaSettings::default()
        };
        let n = Arc::new(
            Nova::from_keystone(Arc::clone(&self.ks), settings)
                .await
                .map_err(|e| e.to_string())?,
        );
        *g = Some(Arc::clone(&n));
        Ok(n)
    }
}

impl ServerMetadata for NovaMetadata {
    async fn ready(&self) -> Result<(), String> {
        self.client().await.map(|_| ())
    }

    async fn metadata(&self, id: &str) -> Read {
        let nova = self.client().await?;
        nova.server(id)
            .await
            .map(|s| s.metadata)
            .map_err(|e| e.to_string())
    }
}

impl Target for Daemon {
    fn tagged(&self) -> Vec<(String, String)> {
        self.shared
            .records()
            .into_iter()
            .filter(|r| {
                matches!(r.role, LocalRole::Primary)
                    && !r
                        .down_reason
                        .as_deref()
                        .is_some_and(|d| d.starts_with("moved"))
            })
            .filter_map(|r| Some((r.def.name, r.def.nova_server?)))
            .collect()
    }

    fn desired(&self, vm: &str) -> Option<(Level, bool)> {
        let rec = self.shared.store.vm(vm).ok()?.unwrap_or_default();
        Some((rec.desired, rec.transition.is_some()))
    }

    fn request(&self, vm: &str, level: Level) -> Result<(), String> {
        if self.shared.draining.load(Ordering::Acquire) {
            return Err("the agent is shutting down".into());
        }
        self.set_level(vm, level)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    fn note(&self, vm: &str, detail: String) {
        self.shared.note(vm, detail);
    }

    fn warn(&self, vm: &str, detail: String) {
        self.shared.warn_note(vm, detail);
    }

    fn seen(&self, vm: &str, tag: NovaTag) {
        // Not for a VM deleted (or defined again for another server) while its server was read.
        let current = self.shared.record(vm).and_then(|r| r.def.nova_server);
        if current.as_deref() == Some(tag.server.as_str()) {
            self.shared.set_nova_tag(vm, tag);
        }
    }

    fn retain(&self, vms: &[String]) {
        self.shared.retain_nova_tags(vms);
    }
}

/// The subsystem: polls every `every` until `stop`.
pub async fn run(
    d: Daemon,
    settings: KeystoneSettings,
    every: Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let src = match NovaMetadata::new(settings) {
        Ok(s) => Arc::new(s),
        Err(e) => {
            warn!(error = %e, "Nova tagging is off: the Keystone settings are unusable");
            return;
        }
    };
    info!(
        every_s = every.as_secs(),
        "reading {LEVEL_KEY} from the Nova metadata of VMs that name a nova_server"
    );
    let mut wait = FIRST_POLL_AFTER;
    let mut poller = Poller::default();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        tokio::select! {
            _ = poller.poll(Instant::now(), &src, &d) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        wait = every;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Servers' metadata, or the error reading them gives.
    #[derive(Default)]
    struct FakeNova {
        servers: Mutex<HashMap<String, Read>>,
        down: Mutex<Option<String>>,
    }

    impl FakeNova {
        fn tag(&self, server: &str, value: Option<&str>) {
            let meta = value
                .map(|v| HashMap::from([(LEVEL_KEY.to_string(), v.to_string())]))
                .unwrap_or_default();
            self.servers.lock().unwrap().insert(server.into(), Ok(meta));
        }
        fn fail(&self, server: &str, e: &str) {
            self.servers
                .lock()
                .unwrap()
                .insert(server.into(), Err(e.into()));
        }
    }

    impl ServerMetadata for FakeNova {
        async fn ready(&self) -> Result<(), String> {
            self.down.lock().unwrap().clone().map_or(Ok(()), Err)
        }
        async fn metadata(&self, id: &str) -> Read {
            self.servers
                .lock()
                .unwrap()
                .get(id)
                .cloned()
                .unwrap_or_else(|| Err(format!("nova show server: not found: {id}")))
        }
    }

    /// The daemon as the poller sees it: VMs (server, desired level, busy), what it was told.
    #[derive(Default)]
    struct FakeDaemon {
        vms: Mutex<BTreeMap<String, (String, Level, bool)>>,
        refuse: Mutex<Option<String>>,
        requests: Mutex<Vec<(String, Level)>>,
        events: Mutex<Vec<String>>,
        seen: Mutex<BTreeMap<String, NovaTag>>,
    }

    impl FakeDaemon {
        fn vm(&self, vm: &str, server: &str, desired: Level) {
            self.vms
                .lock()
                .unwrap()
                .insert(vm.into(), (server.into(), desired, false));
        }
        fn busy(&self, vm: &str, busy: bool) {
            self.vms.lock().unwrap().get_mut(vm).unwrap().2 = busy;
        }
        fn take_events(&self) -> Vec<String> {
            std::mem::take(&mut *self.events.lock().unwrap())
        }
        fn take_requests(&self) -> Vec<(String, Level)> {
            std::mem::take(&mut *self.requests.lock().unwrap())
        }
    }

    impl Target for FakeDaemon {
        fn tagged(&self) -> Vec<(String, String)> {
            let vms = self.vms.lock().unwrap();
            vms.iter()
                .map(|(vm, v)| (vm.clone(), v.0.clone()))
                .collect()
        }
        fn desired(&self, vm: &str) -> Option<(Level, bool)> {
            self.vms.lock().unwrap().get(vm).map(|v| (v.1, v.2))
        }
        fn request(&self, vm: &str, level: Level) -> Result<(), String> {
            if let Some(e) = self.refuse.lock().unwrap().clone() {
                return Err(e);
            }
            self.requests.lock().unwrap().push((vm.into(), level));
            self.vms.lock().unwrap().get_mut(vm).unwrap().1 = level;
            Ok(())
        }
        fn note(&self, vm: &str, detail: String) {
            self.events.lock().unwrap().push(format!("{vm}: {detail}"));
        }
        fn warn(&self, vm: &str, detail: String) {
            self.events
                .lock()
                .unwrap()
                .push(format!("{vm}: warning: {detail}"));
        }
        fn seen(&self, vm: &str, tag: NovaTag) {
            self.seen.lock().unwrap().insert(vm.into(), tag);
        }
        fn retain(&self, vms: &[String]) {
            self.seen.lock().unwrap().retain(|vm, _| vms.contains(vm));
        }
    }

    fn setup() -> (Arc<FakeNova>, FakeDaemon, Poller, Instant) {
        let nova = Arc::new(FakeNova::default());
        let d = FakeDaemon::default();
        d.vm("web1", "s1", Level::None);
        (nova, d, Poller::default(), Instant::now())
    }

    /// Asserts that the last poll asked for web1 at `level`, with the event naming the tag.
    fn assert_set(d: &FakeDaemon, level: Level) {
        assert_eq!(d.take_requests(), vec![("web1".to_string(), level)]);
        assert_eq!(
            d.take_events(),
            vec![format!(
                "web1: level set from Nova metadata ax:level={level} of server s1"
            )]
        );
    }

    #[tokio::test]
    async fn a_valid_tag_sets_the_level_once_with_its_origin() {
        let (nova, d, mut p, now) = setup();
        nova.tag("s1", Some("ha"));
        p.poll(now, &nova, &d).await;
        assert_set(&d, Level::Ha);
        let seen = d.seen.lock().unwrap()["web1"].clone();
        assert_eq!(seen.value.as_deref(), Some("ha"));
        assert_eq!(seen.level(), Some(Level::Ha));
        // Reached: nothing more, poll after poll.
        for _ in 0..3 {
            p.poll(now, &nova, &d).await;
        }
        assert!(d.take_requests().is_empty() && d.take_events().is_empty());
        // Changed by the operator, in any case: followed.
        nova.tag("s1", Some(" NONE "));
        p.poll(now, &nova, &d).await;
        assert_set(&d, Level::None);
    }

    #[tokio::test]
    async fn an_absent_tag_changes_nothing() {
        let (nova, d, mut p, now) = setup();
        d.vm("web1", "s1", Level::Ha);
        nova.tag("s1", None);
        p.poll(now, &nova, &d).await;
        assert!(d.take_requests().is_empty() && d.take_events().is_empty());
        let seen = d.seen.lock().unwrap()["web1"].clone();
        assert_eq!((seen.level(), seen.value, seen.error), (None, None, None));
        assert!(seen.read_ms.is_some());
    }

    #[tokio::test]
    async fn an_invalid_tag_is_one_warning_per_distinct_value() {
        let (nova, d, mut p, now) = setup();
        nova.tag("s1", Some("gold"));
        for _ in 0..3 {
            p.poll(now, &nova, &d).await;
        }
        assert!(d.take_requests().is_empty());
        let ev = d.take_events();
        assert_eq!(ev.len(), 1, "{ev:?}");
        assert!(
            ev[0]
                .starts_with("web1: warning: Nova metadata ax:level=\"gold\" of server s1 ignored"),
            "{ev:?}"
        );
        assert_eq!(d.seen.lock().unwrap()["web1"].level(), None);
        nova.tag("s1", Some("silver"));
        p.poll(now, &nova, &d).await;
        p.poll(now, &nova, &d).await;
        let ev = d.take_events();
        assert!(ev.len() == 1 && ev[0].contains("\"silver\""), "{ev:?}");
        // Fixed, then the same bad value again: warned again.
        nova.tag("s1", Some("ha"));
        p.poll(now, &nova, &d).await;
        assert_eq!(d.take_requests(), vec![("web1".to_string(), Level::Ha)]);
        nova.tag("s1", Some("gold"));
        p.poll(now, &nova, &d).await;
        let ev = d.take_events();
        assert!(ev.iter().any(|e| e.contains("\"gold\"")), "{ev:?}");
        assert!(
            d.take_requests().is_empty(),
            "an invalid tag leaves the level"
        );
    }

    #[tokio::test]
    async fn unreadable_servers_warn_at_first_then_every_ten_minutes_and_polling_goes_on() {
        let (nova, d, mut p, now) = setup();
        *nova.down.lock().unwrap() = Some("keystone: connection refused".into());
        for s in 0..5 {
            p.poll(now + Duration::from_secs(s), &nova, &d).await;
        }
        let ev = d.take_events();
        assert_eq!(ev.len(), 1, "{ev:?}");
        assert!(
            ev[0].starts_with("web1: warning: cannot read ax:level of Nova server s1: keystone"),
            "{ev:?}"
        );
        let seen = d.seen.lock().unwrap()["web1"].clone();
        assert!(seen.error.is_some() && seen.level().is_none());
        p.poll(now + WARN_AGAIN + Duration::from_secs(4), &nova, &d)
            .await;
        let ev = d.take_events();
        assert!(
            ev.len() == 1 && ev[0].contains("still cannot read") && ev[0].contains("6 failed"),
            "{ev:?}"
        );
        // Back: a note, and the tag is acted on.
        *nova.down.lock().unwrap() = None;
        nova.tag("s1", Some("ha"));
        p.poll(now + WARN_AGAIN * 2, &nova, &d).await;
        let ev = d.take_events();
        assert_eq!(
            ev,
            vec![
                "web1: Nova server s1 read again (after 6 failed read(s))",
                "web1: level set from Nova metadata ax:level=ha of server s1"
            ]
        );
        // One server gone: its VM alone warns; the tag last read is kept but no longer binds.
        d.vm("db1", "s2", Level::None);
        nova.tag("s2", Some("ha"));
        nova.fail("s1", "nova show server: not found: s1");
        p.poll(now + WARN_AGAIN * 2, &nova, &d).await;
        let ev = d.take_events();
        assert_eq!(ev.len(), 2, "{ev:?}");
        assert!(ev[0].starts_with("db1: level set from"), "{ev:?}");
        assert!(ev[1].starts_with("web1: warning: cannot read"), "{ev:?}");
        let seen = d.seen.lock().unwrap()["web1"].clone();
        assert_eq!(
            (seen.value.as_deref(), seen.level()),
            (Some("ha"), None),
            "{seen:?}"
        );
    }

    #[tokio::test]
    async fn a_running_transition_or_a_refusal_waits() {
        let (nova, d, mut p, now) = setup();
        nova.tag("s1", Some("ft"));
        d.busy("web1", true);
        p.poll(now, &nova, &d).await;
        assert!(d.take_requests().is_empty() && d.take_events().is_empty());
        d.busy("web1", false);
        *d.refuse.lock().unwrap() =
            Some("web1 is not running: start it before setting level ft".into());
        for _ in 0..3 {
            p.poll(now, &nova, &d).await;
        }
        let ev = d.take_events();
        assert_eq!(ev.len(), 1, "{ev:?}");
        assert!(
            ev[0].contains("ax:level=ft of server s1 not applied: web1 is not running"),
            "{ev:?}"
        );
        *d.refuse.lock().unwrap() = None;
        p.poll(now, &nova, &d).await;
        assert_eq!(d.take_requests(), vec![("web1".to_string(), Level::Ft)]);
    }

    #[tokio::test]
    async fn deleted_vms_are_forgotten() {
        let (nova, d, mut p, now) = setup();
        nova.tag("s1", Some("gold"));
        p.poll(now, &nova, &d).await;
        assert_eq!(d.take_events().len(), 1);
        d.vms.lock().unwrap().clear();
        p.poll(now, &nova, &d).await;
        assert!(d.seen.lock().unwrap().is_empty());
        // Defined again (same name, same server): a fresh start, warned again.
        d.vm("web1", "s1", Level::None);
        p.poll(now, &nova, &d).await;
        assert_eq!(d.take_events().len(), 1);
    }

    #[test]
    fn a_tag_binds_only_when_read_and_valid() {
        let tag = |value: Option<&str>, error: Option<&str>| NovaTag {
            server: "s1".into(),
            value: value.map(str::to_string),
            read_ms: Some(1),
            error: error.map(str::to_string),
        };
        assert_eq!(tag(Some("FT"), None).level(), Some(Level::Ft));
        assert_eq!(tag(Some("gold"), None).level(), None);
        assert_eq!(tag(None, None).level(), None);
        assert_eq!(tag(Some("ha"), Some("down")).level(), None);
    }
}
