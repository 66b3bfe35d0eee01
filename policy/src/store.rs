//! The policy store: one redb file, `policy.redb`, under the agent's storage directory.
//!
//! It holds, per VM, a [`VmRecord`] (desired level, current level, secondary, the transition in progress
//! with its cursor) and an append-only history of [`Event`]s with monotonic ids. Every change of a
//! record is committed in the same transaction as the events that describe it, so the history and the
//! state never disagree, even across a crash.
//!
//! Tables (schema version [`SCHEMA_VERSION`]): `meta` (`&str → u64`: `schema_version`), `vms`
//! (`vm → JSON VmRecord`), `events` (`id → JSON Event`), `vm_events` (`(vm, id) → ()`, the per-VM index).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::level::Level;
use crate::plan::Step;

/// The schema version this code reads and writes.
pub const SCHEMA_VERSION: u64 = 1;

/// The store's file name inside the storage directory.
pub const FILE_NAME: &str = "policy.redb";

const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const VMS: TableDefinition<&str, &[u8]> = TableDefinition::new("vms");
const EVENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("events");
const VM_EVENTS: TableDefinition<(&str, u64), ()> = TableDefinition::new("vm_events");
const SCHEMA_KEY: &str = "schema_version";

/// Where a transition is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Running the transition's steps, heading to `to`.
    Forward,
    /// Running the rollback steps, heading back to `from`.
    RollingBack,
    /// A rollback step failed: the VM is between `from` and `to` and says so until an operator asks
    /// for `from` or `to` again.
    Failed,
}

/// A transition in progress, with its persisted cursor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transition {
    /// The level the VM had when the transition started.
    pub from: Level,
    /// The level asked for.
    pub to: Level,
    /// The steps from `from` to `to`, fixed when the transition started.
    pub steps: Vec<Step>,
    /// How many of `steps` are done.
    pub cursor: usize,
    /// Forward, rolling back, or failed.
    pub phase: Phase,
    /// The rollback steps (empty unless the transition rolled back or failed).
    pub rollback: Vec<Step>,
    /// How many of `rollback` are done.
    pub rollback_cursor: usize,
    /// The secondary's host: the one picked (towards FT) or the one to release (away from FT).
    pub secondary: Option<String>,
    /// Why the transition is rolling back or failed.
    pub reason: Option<String>,
    /// When it started, in milliseconds since the Unix epoch.
    pub started_ms: u64,
}

impl Transition {
    /// The level this transition is heading to now: `to` when going forward, `from` when rolling back,
    /// none when failed.
    pub fn heading_to(&self) -> Option<Level> {
        match self.phase {
            Phase::Forward => Some(self.to),
            Phase::RollingBack => Some(self.from),
            Phase::Failed => None,
        }
    }

    /// The next step to run, if any.
    pub fn next_step(&self) -> Option<Step> {
        match self.phase {
            Phase::Forward => self.steps.get(self.cursor).copied(),
            Phase::RollingBack => self.rollback.get(self.rollback_cursor).copied(),
            Phase::Failed => None,
        }
    }

    /// `"ha→ft"`.
    pub fn arrow(&self) -> String {
        format!("{}→{}", self.from, self.to)
    }

    /// A one-line description: `ha→ft at step 2/3 (initial_sync)`, `ha→ft rolling back at step 1/2
    /// (release_secondary)`, `ha→ft failed: reason`.
    pub fn describe(&self) -> String {
        let at = |plan: &[Step], cursor: usize| match plan.get(cursor) {
            Some(s) => format!("step {}/{} ({s})", cursor + 1, plan.len()),
            None => format!("the end ({} steps)", plan.len()),
        };
        match self.phase {
            Phase::Forward => format!("{} at {}", self.arrow(), at(&self.steps, self.cursor)),
            Phase::RollingBack => format!(
                "{} rolling back at {}",
                self.arrow(),
                at(&self.rollback, self.rollback_cursor)
            ),
            Phase::Failed => format!(
                "{} failed: {}",
                self.arrow(),
                self.reason.as_deref().unwrap_or("unknown reason")
            ),
        }
    }
}

/// What the store keeps about one VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRecord {
    /// The level last asked for.
    pub desired: Level,
    /// The level the VM has: it changes only when a transition ends (done: `to`; rolled back: `from`).
    pub current: Level,
    /// The secondary's host while the VM is FT.
    pub secondary: Option<String>,
    /// The transition in progress, rolling back, or failed.
    pub transition: Option<Transition>,
    /// Why the last transition did not reach its level, if it did not.
    pub last_error: Option<String>,
}

impl VmRecord {
    /// A VM the store has never seen: level none, nothing running.
    pub fn new() -> Self {
        VmRecord {
            desired: Level::None,
            current: Level::None,
            secondary: None,
            transition: None,
            last_error: None,
        }
    }
}

impl Default for VmRecord {
    fn default() -> Self {
        VmRecord::new()
    }
}

/// What an event records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// A transition started (detail: `from→to` and its steps).
    TransitionStarted,
    /// A transition found in progress at start is resumed.
    TransitionResumed,
    /// A step finished (forward or rollback).
    StepDone,
    /// A step failed (detail: the reason).
    StepFailed,
    /// The transition is being rolled back (detail: why and the rollback steps).
    RollbackStarted,
    /// The VM reached the level asked for.
    TransitionDone,
    /// The VM is back at its old level.
    TransitionRolledBack,
    /// The rollback failed too: the VM is half-way and the record says so.
    TransitionFailed,
    /// Anything else the daemon wants in the history (see [`Store::append`]).
    Note,
}

/// One entry of the history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Monotonic, starting at 1.
    pub id: u64,
    /// Milliseconds since the Unix epoch.
    pub time_ms: u64,
    /// The VM.
    pub vm: String,
    /// What happened.
    pub kind: EventKind,
    /// The step, for step events.
    pub step: Option<Step>,
    /// Human-readable detail.
    pub detail: String,
}

/// An event about to be appended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEvent {
    /// What happened.
    pub kind: EventKind,
    /// The step, for step events.
    pub step: Option<Step>,
    /// Human-readable detail.
    pub detail: String,
}

impl NewEvent {
    /// An event without a step.
    pub fn new(kind: EventKind, detail: impl Into<String>) -> Self {
        NewEvent {
            kind,
            step: None,
            detail: detail.into(),
        }
    }

    /// An event about `step`.
    pub fn step(kind: EventKind, step: Step, detail: impl Into<String>) -> Self {
        NewEvent {
            kind,
            step: Some(step),
            detail: detail.into(),
        }
    }
}

/// Which events to list: those with an id greater than `since`, optionally of one VM, oldest first,
/// at most `limit`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventQuery {
    /// Only events with `id > since` (0: from the start).
    pub since: u64,
    /// Only this VM's events.
    pub vm: Option<String>,
    /// At most this many (`None`: all).
    pub limit: Option<usize>,
}

/// Errors of this module; each names the store's file.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The storage directory could not be created.
    #[error("cannot create the storage directory {}: {source}", path.display())]
    Io {
        /// The directory.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The file is not a readable policy store. It is left as it is.
    #[error("policy store {} is corrupt: {reason} (the file was left untouched; move it away to start with an empty store)", path.display())]
    Corrupt {
        /// The store's file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The file was written by a version of the agent with another schema.
    #[error("policy store {} has schema version {found}, this agent reads version {supported}", path.display())]
    SchemaVersion {
        /// The store's file.
        path: PathBuf,
        /// The version in the file.
        found: u64,
        /// The version this code reads.
        supported: u64,
    },
    /// Another process or handle has the store open.
    #[error("policy store {} is already open (another agent running?)", path.display())]
    Locked {
        /// The store's file.
        path: PathBuf,
    },
    /// Any other failure of the database.
    #[error("policy store {}: {source}", path.display())]
    Db {
        /// The store's file.
        path: PathBuf,
        /// The cause.
        source: redb::Error,
    },
}

/// The policy store. Cheap to clone; clones share one open database.
#[derive(Debug, Clone)]
pub struct Store {
    db: Arc<Database>,
    path: PathBuf,
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Store {
    /// Opens `dir/policy.redb`, creating the directory and an empty store if needed. A file that is
    /// not a valid store, or fails redb's integrity check, is refused with [`StoreError::Corrupt`]; a
    /// store of another schema version with [`StoreError::SchemaVersion`].
    pub fn open(dir: impl AsRef<Path>) -> Result<Store, StoreError> {
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir).map_err(|source| StoreError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let path = dir.join(FILE_NAME);
        // redb panics on some corrupt pages instead of returning an error: that is a corrupt store
        // too, and must not take the agent down.
        let opened = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| open_checked(&path)));
        let db = match opened {
            Ok(r) => r?,
            Err(panic) => {
                let msg = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "no message".into());
                return Err(StoreError::Corrupt {
                    path,
                    reason: format!("redb failed while reading it: {msg}"),
                });
            }
        };
        let store = Store {
            db: Arc::new(db),
            path,
        };
        store.init_schema()?;
        Ok(store)
    }

    /// The store's file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn err(&self, e: impl Into<redb::Error>) -> StoreError {
        match e.into() {
            redb::Error::Corrupted(reason) => StoreError::Corrupt {
                path: self.path.clone(),
                reason,
            },
            source => StoreError::Db {
                path: self.path.clone(),
                source,
            },
        }
    }

    fn corrupt(&self, reason: String) -> StoreError {
        StoreError::Corrupt {
            path: self.path.clone(),
            reason,
        }
    }

    fn init_schema(&self) -> Result<(), StoreError> {
        let tables = {
            let r = self.db.begin_read().map_err(|e| self.err(e))?;
            let n = r.list_tables().map_err(|e| self.err(e))?.count();
            n
        };
        let w = self.db.begin_write().map_err(|e| self.err(e))?;
        {
            let mut meta = w.open_table(META).map_err(|e| self.err(e))?;
            let found = meta
                .get(SCHEMA_KEY)
                .map_err(|e| self.err(e))?
                .map(|v| v.value());
            match found {
                Some(SCHEMA_VERSION) => {}
                Some(found) => {
                    return Err(StoreError::SchemaVersion {
                        path: self.path.clone(),
                        found,
                        supported: SCHEMA_VERSION,
                    })
                }
                None if tables == 0 => {
                    meta.insert(SCHEMA_KEY, SCHEMA_VERSION)
                        .map_err(|e| self.err(e))?;
                }
                None => return Err(self.corrupt("no schema version recorded".into())),
            }
            w.open_table(VMS).map_err(|e| self.err(e))?;
            w.open_table(EVENTS).map_err(|e| self.err(e))?;
            w.open_table(VM_EVENTS).map_err(|e| self.err(e))?;
        }
        w.commit().map_err(|e| self.err(e))
    }

    /// The record of `vm`, if the store knows it.
    pub fn vm(&self, vm: &str) -> Result<Option<VmRecord>, StoreError> {
        let r = self.db.begin_read().map_err(|e| self.err(e))?;
        let t = r.open_table(VMS).map_err(|e| self.err(e))?;
        let found = t.get(vm).map_err(|e| self.err(e))?;
        found.map(|v| self.decode_vm(vm, v.value())).transpose()
    }

    /// Every VM the store knows, by name.
    pub fn vms(&self) -> Result<Vec<(String, VmRecord)>, StoreError> {
        let r = self.db.begin_read().map_err(|e| self.err(e))?;
        let t = r.open_table(VMS).map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for row in t.iter().map_err(|e| self.err(e))? {
            let (k, v) = row.map_err(|e| self.err(e))?;
            let name = k.value().to_string();
            let rec = self.decode_vm(&name, v.value())?;
            out.push((name, rec));
        }
        Ok(out)
    }

    fn decode_vm(&self, vm: &str, bytes: &[u8]) -> Result<VmRecord, StoreError> {
        serde_json::from_slice(bytes)
            .map_err(|e| self.corrupt(format!("the record of VM {vm} does not decode: {e}")))
    }

    /// In one transaction: sets the record of `vm` (`None` removes it) and appends `events` about it.
    /// Returns the events as stored.
    pub fn update(
        &self,
        vm: &str,
        record: Option<&VmRecord>,
        events: &[NewEvent],
    ) -> Result<Vec<Event>, StoreError> {
        self.write(vm, Some(record), events)
    }

    /// Appends one event about `vm` without touching its record.
    pub fn append(&self, vm: &str, event: NewEvent) -> Result<Event, StoreError> {
        let mut evs = self.write(vm, None, std::slice::from_ref(&event))?;
        Ok(evs.pop().expect("one event in, one out"))
    }

    /// One write transaction: the record change, if any, and the events.
    fn write(
        &self,
        vm: &str,
        record: Option<Option<&VmRecord>>,
        events: &[NewEvent],
    ) -> Result<Vec<Event>, StoreError> {
        let w = self.db.begin_write().map_err(|e| self.err(e))?;
        let out = {
            let mut vms = w.open_table(VMS).map_err(|e| self.err(e))?;
            match record {
                Some(Some(rec)) => {
                    let bytes = serde_json::to_vec(rec).expect("a VmRecord always serialises");
                    vms.insert(vm, bytes.as_slice()).map_err(|e| self.err(e))?;
                }
                Some(None) => {
                    vms.remove(vm).map_err(|e| self.err(e))?;
                }
                None => {}
            }
            let mut table = w.open_table(EVENTS).map_err(|e| self.err(e))?;
            let mut index = w.open_table(VM_EVENTS).map_err(|e| self.err(e))?;
            let mut id = table
                .last()
                .map_err(|e| self.err(e))?
                .map_or(0, |(k, _)| k.value());
            let time_ms = now_ms();
            let mut out = Vec::with_capacity(events.len());
            for e in events {
                id += 1;
                let ev = Event {
                    id,
                    time_ms,
                    vm: vm.to_string(),
                    kind: e.kind,
                    step: e.step,
                    detail: e.detail.clone(),
                };
                let bytes = serde_json::to_vec(&ev).expect("an Event always serialises");
                table
                    .insert(id, bytes.as_slice())
                    .map_err(|e| self.err(e))?;
                index.insert((vm, id), ()).map_err(|e| self.err(e))?;
                out.push(ev);
            }
            out
        };
        w.commit().map_err(|e| self.err(e))?;
        Ok(out)
    }

    /// The events `q` selects, oldest first.
    pub fn events(&self, q: &EventQuery) -> Result<Vec<Event>, StoreError> {
        let limit = q.limit.unwrap_or(usize::MAX);
        let r = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = r.open_table(EVENTS).map_err(|e| self.err(e))?;
        let Some(from) = q.since.checked_add(1) else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        match &q.vm {
            None => {
                for row in table.range(from..).map_err(|e| self.err(e))?.take(limit) {
                    let (k, v) = row.map_err(|e| self.err(e))?;
                    out.push(self.decode_event(k.value(), v.value())?);
                }
            }
            Some(vm) => {
                let index = r.open_table(VM_EVENTS).map_err(|e| self.err(e))?;
                let ids = index
                    .range((vm.as_str(), from)..=(vm.as_str(), u64::MAX))
                    .map_err(|e| self.err(e))?;
                for row in ids.take(limit) {
                    let id = row.map_err(|e| self.err(e))?.0.value().1;
                    let v = table
                        .get(id)
                        .map_err(|e| self.err(e))?
                        .ok_or_else(|| self.corrupt(format!("indexed event {id} is missing")))?;
                    out.push(self.decode_event(id, v.value())?);
                }
            }
        }
        Ok(out)
    }

    fn decode_event(&self, id: u64, bytes: &[u8]) -> Result<Event, StoreError> {
        serde_json::from_slice(bytes)
            .map_err(|e| self.corrupt(format!("event {id} does not decode: {e}")))
    }

    /// The id of the newest event (0 when there is none).
    pub fn last_event_id(&self) -> Result<u64, StoreError> {
        let r = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = r.open_table(EVENTS).map_err(|e| self.err(e))?;
        let last = table.last().map_err(|e| self.err(e))?;
        Ok(last.map_or(0, |(k, _)| k.value()))
    }
}

/// Opens the file and runs redb's integrity check (it verifies the checksums of every page).
fn open_checked(path: &Path) -> Result<Database, StoreError> {
    let mut db = Database::create(path).map_err(|e| open_error(path, e))?;
    match db.check_integrity() {
        Ok(true) => Ok(db),
        Ok(false) => Err(StoreError::Corrupt {
            path: path.to_path_buf(),
            reason: "redb's integrity check failed".into(),
        }),
        Err(e) => Err(open_error(path, e)),
    }
}

fn open_error(path: &Path, e: redb::DatabaseError) -> StoreError {
    let path = path.to_path_buf();
    match e {
        redb::DatabaseError::DatabaseAlreadyOpen => StoreError::Locked { path },
        redb::DatabaseError::Storage(redb::StorageError::Corrupted(reason)) => {
            StoreError::Corrupt { path, reason }
        }
        redb::DatabaseError::Storage(redb::StorageError::Io(e))
            if e.kind() == std::io::ErrorKind::InvalidData =>
        {
            StoreError::Corrupt {
                path,
                reason: e.to_string(),
            }
        }
        redb::DatabaseError::UpgradeRequired(v) => StoreError::Corrupt {
            path,
            reason: format!("redb file format {v} is not supported"),
        },
        e => StoreError::Db {
            path,
            source: e.into(),
        },
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A directory removed when dropped.
    #[derive(Debug)]
    pub(crate) struct TempDir(pub PathBuf);

    impl TempDir {
        pub(crate) fn new(tag: &str) -> TempDir {
            use std::sync::atomic::{AtomicU64, Ordering};
            static N: AtomicU64 = AtomicU64::new(0);
            // tmpfs when there is one: the store fsyncs every commit.
            let shm = Path::new("/dev/shm");
            let base = if shm.is_dir() {
                shm.to_path_buf()
            } else {
                std::env::temp_dir()
            };
            let p = base.join(format!(
                "policy-test-{tag}-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = std::fs::remove_dir_all(&p);
            TempDir(p)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn ev(kind: EventKind, detail: &str) -> NewEvent {
        NewEvent::new(kind, detail)
    }

    fn sample() -> VmRecord {
        VmRecord {
            desired: Level::Ft,
            current: Level::Ha,
            secondary: None,
            transition: Some(Transition {
                from: Level::Ha,
                to: Level::Ft,
                steps: crate::plan::steps(Level::Ha, Level::Ft),
                cursor: 2,
                phase: Phase::Forward,
                rollback: vec![],
                rollback_cursor: 0,
                secondary: Some("b".into()),
                reason: None,
                started_ms: 5,
            }),
            last_error: None,
        }
    }

    #[test]
    fn round_trip_across_reopen() {
        let dir = TempDir::new("roundtrip");
        {
            let s = Store::open(&dir.0).unwrap();
            assert!(s.vms().unwrap().is_empty());
            assert_eq!(s.last_event_id().unwrap(), 0);
            let evs = s
                .update(
                    "vm1",
                    Some(&sample()),
                    &[
                        ev(EventKind::TransitionStarted, "a"),
                        ev(EventKind::StepDone, "b"),
                    ],
                )
                .unwrap();
            assert_eq!(evs.iter().map(|e| e.id).collect::<Vec<_>>(), [1, 2]);
            s.update("vm2", Some(&VmRecord::new()), &[]).unwrap();
            s.append("vm2", ev(EventKind::Note, "c")).unwrap();
        }
        let s = Store::open(&dir.0).unwrap();
        assert_eq!(s.vm("vm1").unwrap(), Some(sample()));
        assert_eq!(s.vm("nope").unwrap(), None);
        let names: Vec<String> = s.vms().unwrap().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["vm1", "vm2"]);
        let all = s.events(&EventQuery::default()).unwrap();
        assert_eq!(all.len(), 3);
        assert_eq!(all[2].vm, "vm2");
        assert_eq!(all[2].detail, "c");
        // Ids continue after a reopen.
        let e = s.append("vm1", ev(EventKind::Note, "d")).unwrap();
        assert_eq!(e.id, 4);
        s.update("vm2", None, &[]).unwrap();
        assert_eq!(s.vm("vm2").unwrap(), None);
    }

    #[test]
    fn event_queries() {
        let dir = TempDir::new("events");
        let s = Store::open(&dir.0).unwrap();
        for i in 0..10 {
            let vm = if i % 2 == 0 { "even" } else { "odd" };
            s.append(vm, ev(EventKind::Note, &i.to_string())).unwrap();
        }
        let ids = |q: EventQuery| -> Vec<u64> {
            s.events(&q).unwrap().into_iter().map(|e| e.id).collect()
        };
        assert_eq!(ids(EventQuery::default()), (1..=10).collect::<Vec<_>>());
        let since = |since| EventQuery {
            since,
            ..Default::default()
        };
        assert_eq!(ids(since(7)), [8, 9, 10]);
        assert_eq!(ids(since(10)), Vec::<u64>::new());
        assert_eq!(ids(since(u64::MAX)), Vec::<u64>::new());
        assert_eq!(
            ids(EventQuery {
                since: 2,
                limit: Some(3),
                vm: None
            }),
            [3, 4, 5]
        );
        assert_eq!(
            ids(EventQuery {
                since: 0,
                limit: None,
                vm: Some("odd".into())
            }),
            [2, 4, 6, 8, 10]
        );
        assert_eq!(
            ids(EventQuery {
                since: 4,
                limit: Some(2),
                vm: Some("even".into())
            }),
            [5, 7]
        );
        assert_eq!(
            ids(EventQuery {
                since: 0,
                limit: None,
                vm: Some("ev".into())
            }),
            Vec::<u64>::new()
        );
        assert_eq!(s.last_event_id().unwrap(), 10);
    }

    #[test]
    fn garbled_file_is_reported_not_reset() {
        let dir = TempDir::new("garbled");
        {
            let s = Store::open(&dir.0).unwrap();
            s.update("vm1", Some(&sample()), &[ev(EventKind::Note, "x")])
                .unwrap();
        }
        let path = dir.0.join(FILE_NAME);
        let mut bytes = std::fs::read(&path).unwrap();
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = (i as u8).wrapping_mul(31).wrapping_add(7);
        }
        std::fs::write(&path, &bytes).unwrap();
        let e = Store::open(&dir.0).unwrap_err();
        assert!(matches!(e, StoreError::Corrupt { .. }), "{e:?}");
        let msg = e.to_string();
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        // Not reset: the garbage is still there.
        assert_eq!(std::fs::read(&path).unwrap(), bytes);
    }

    #[test]
    fn garbled_pages_are_reported() {
        let dir = TempDir::new("pages");
        {
            let s = Store::open(&dir.0).unwrap();
            for i in 0..50 {
                s.update(
                    &format!("vm{i}"),
                    Some(&sample()),
                    &[ev(EventKind::Note, &"x".repeat(200))],
                )
                .unwrap();
            }
        }
        let path = dir.0.join(FILE_NAME);
        let mut bytes = std::fs::read(&path).unwrap();
        // Keep redb's header (the first 4 KiB page), garble the rest.
        for b in bytes.iter_mut().skip(4096) {
            *b ^= 0x5a;
        }
        std::fs::write(&path, &bytes).unwrap();
        let e = Store::open(&dir.0).unwrap_err();
        assert!(matches!(e, StoreError::Corrupt { .. }), "{e:?}");
        assert!(e.to_string().contains(FILE_NAME), "{e}");
    }

    #[test]
    fn schema_version_is_checked() {
        let dir = TempDir::new("schema");
        drop(Store::open(&dir.0).unwrap());
        {
            let db = Database::create(dir.0.join(FILE_NAME)).unwrap();
            let w = db.begin_write().unwrap();
            w.open_table(META).unwrap().insert(SCHEMA_KEY, 99).unwrap();
            w.commit().unwrap();
        }
        let e = Store::open(&dir.0).unwrap_err();
        assert!(
            matches!(
                e,
                StoreError::SchemaVersion {
                    found: 99,
                    supported: SCHEMA_VERSION,
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(e.to_string().contains(FILE_NAME), "{e}");
    }

    #[test]
    fn a_store_without_schema_version_is_refused() {
        let dir = TempDir::new("noschema");
        std::fs::create_dir_all(&dir.0).unwrap();
        {
            let db = Database::create(dir.0.join(FILE_NAME)).unwrap();
            let w = db.begin_write().unwrap();
            w.open_table(VMS)
                .unwrap()
                .insert("vm1", &b"{}"[..])
                .unwrap();
            w.commit().unwrap();
        }
        let e = Store::open(&dir.0).unwrap_err();
        assert!(matches!(e, StoreError::Corrupt { .. }), "{e:?}");
    }

    #[test]
    fn undecodable_record_is_corrupt_and_names_the_vm() {
        let dir = TempDir::new("badrecord");
        let s = Store::open(&dir.0).unwrap();
        {
            let w = s.db.begin_write().unwrap();
            w.open_table(VMS)
                .unwrap()
                .insert("vm7", &b"not json"[..])
                .unwrap();
            w.commit().unwrap();
        }
        let e = s.vm("vm7").unwrap_err();
        assert!(e.to_string().contains("vm7"), "{e}");
        assert!(s.vms().is_err());
    }

    #[test]
    fn second_open_is_locked() {
        let dir = TempDir::new("locked");
        let _s = Store::open(&dir.0).unwrap();
        let e = Store::open(&dir.0).unwrap_err();
        assert!(matches!(e, StoreError::Locked { .. }), "{e:?}");
    }

    #[test]
    fn unusable_directory_is_an_io_error() {
        let dir = TempDir::new("file");
        std::fs::write(&dir.0, b"a file, not a directory").unwrap();
        let e = Store::open(dir.0.join("sub")).unwrap_err();
        assert!(matches!(e, StoreError::Io { .. }), "{e:?}");
        let _ = std::fs::remove_file(&dir.0);
    }
}
