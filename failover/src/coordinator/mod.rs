//! Protocol v2 coordinators: one compare-and-set register per VM, asked only when *who may release*
//! the VM's output changes (docs/DESIGN.md §3.6).
//!
//! A VM's **generation** is a number kept by the coordinator. A host may release the VM's output only
//! under a generation it *won* by a compare-and-set ([`Coordinator::cas`]): `expected → expected + 1`,
//! recorded with the claimant's identity. Nothing else is asked of the coordinator: no leases, no
//! renewals, no clocks. In steady state a primary releases an epoch's output once its secondary
//! acknowledged that epoch ([`crate::role`]); the coordinator is asked when a secondary promotes, a
//! primary goes solo, or a VM is booted or restarted in place.
//!
//! ## The contract
//! - [`Coordinator::cas`] with `expected = g`: if the VM's generation is `g`, it becomes `g + 1`, held by
//!   the claimant, **durably**, and the answer is [`CasOutcome::Won`]. If it already is `g + 1` held by
//!   the same claimant (a retry whose first answer was lost, or a duplicate), the answer is the same
//!   `Won` and nothing changes. Otherwise [`CasOutcome::Lost`] with the current generation and holder;
//!   nothing changes. A VM never seen has generation 0.
//! - A coordinator that lost its state answers [`CasOutcome::Relearning`] ("unknown") for a VM until it
//!   has re-learned the VM's generation from the claims of the hosts that may hold it — never "lost":
//!   a healthy host is never told to give up its VM by a coordinator that does not know.
//! - [`Coordinator::read`] returns the current record (diagnostics, the scale bench).
//!
//! Implementations: [`witness`] (embedded, mutual TLS, one state file) and [`etcd`] (etcd v3, a
//! transaction comparing the key's `mod_revision`). [`Registers`] is the witness's decision logic,
//! also used in memory by [`MemCoordinator`] (unit tests, the simulation).
//!
//! ## Claimants
//! A claimant is `host#incarnation` (e.g. `host-a#4242`, the incarnation changing at every agent
//! start): a restarted agent is a different claimant, so "generation g + 1 is yours" is never said to a
//! process that did not ask for it. The witness checks that `host` is a name the caller's certificate
//! is valid for.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

pub mod etcd;
pub mod witness;

/// Longest VM id, in bytes.
pub const MAX_VM_ID: usize = 128;
/// Longest claimant (`host#incarnation`), in bytes.
pub const MAX_CLAIMANT: usize = 96;
/// Most member hosts a request may name.
pub const MAX_MEMBERS: usize = 8;

/// Coordinator errors: transport, authentication, state; refusals of the protocol are
/// [`CasOutcome`]s, not errors.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CoordError {
    /// No answer (the request may or may not have been applied: retry the same request).
    #[error("coordinator unreachable: {0}")]
    Unreachable(String),
    /// The request is invalid (names, generation overflow).
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The coordinator refused the caller (authentication, a claimant not matching the certificate,
    /// a replayed sequence number).
    #[error("refused: {0}")]
    Refused(String),
    /// The coordinator has not re-learned this VM yet (reads only; a CAS answers
    /// [`CasOutcome::Relearning`]).
    #[error("coordinator is re-learning VM {0:?}")]
    Relearning(String),
    /// The coordinator could not carry out the request (e.g. could not persist it): nothing changed.
    #[error("coordinator failed: {0}")]
    Failed(String),
    /// A message that does not parse.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// The state file cannot be read, parsed or written.
    #[error("coordinator state {path}: {why}")]
    State {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        why: String,
    },
    /// Setup (TLS, sockets, client).
    #[error("{0}")]
    Setup(String),
}

/// One compare-and-set of a VM's generation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CasRequest {
    /// The VM.
    pub vm: String,
    /// Who asks: `host#incarnation`.
    pub claimant: String,
    /// The generation the claimant holds or replicates; the new one is `expected + 1`.
    pub expected: u64,
    /// The hosts that may hold a generation of this VM (the claimant's host and its peers): a
    /// re-learning coordinator waits for a claim from each.
    #[serde(default)]
    pub members: Vec<String>,
    /// The re-learning coordinator's nonce from its last [`CasOutcome::Relearning`] answer to this
    /// client (0: none). A request counts as a claim only with the current nonce, so a late
    /// duplicate of a request sent before the coordinator lost its state (carrying what the host
    /// knew *then*) is never taken for what the host knows now. Clients fill it in; callers leave 0.
    #[serde(default)]
    pub witness: u64,
}

impl CasRequest {
    /// Checks names and bounds.
    pub fn validate(&self) -> Result<(), CoordError> {
        check_name("VM", &self.vm, MAX_VM_ID)?;
        check_name("claimant", &self.claimant, MAX_CLAIMANT)?;
        if self.expected == u64::MAX {
            return Err(CoordError::Invalid("generation overflow".into()));
        }
        if self.members.len() > MAX_MEMBERS {
            return Err(CoordError::Invalid(format!(
                "{} members, at most {MAX_MEMBERS}",
                self.members.len()
            )));
        }
        for m in &self.members {
            check_name("member", m, MAX_CLAIMANT)?;
            if m.contains('#') {
                return Err(CoordError::Invalid(format!(
                    "member {m:?} is a host name, without '#'"
                )));
            }
        }
        Ok(())
    }

    /// The claimant's host name (before `#`).
    pub fn host(&self) -> &str {
        host_of(&self.claimant)
    }
}

/// The host part of a claimant `host#incarnation`.
pub fn host_of(claimant: &str) -> &str {
    claimant.split_once('#').map_or(claimant, |(h, _)| h)
}

/// Checks a name: non-empty, at most `max` bytes, no control characters or spaces.
pub fn check_name(what: &str, s: &str, max: usize) -> Result<(), CoordError> {
    if s.is_empty() || s.len() > max || s.chars().any(|c| c.is_control() || c == ' ') {
        return Err(CoordError::Invalid(format!(
            "{what} {s:?}: 1..={max} bytes without spaces or control characters"
        )));
    }
    Ok(())
}

/// The answer to a [`CasRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CasOutcome {
    /// The claimant holds `generation` (= expected + 1).
    Won {
        /// The generation now held.
        generation: u64,
    },
    /// Someone else moved the register: the claimant's view is stale.
    Lost {
        /// The current generation.
        current: u64,
        /// Its holder.
        holder: String,
    },
    /// The coordinator lost its state and has not re-learned this VM yet: ask again later, with
    /// `witness` in [`CasRequest::witness`] (nothing about the claimant's right follows from this
    /// answer).
    Relearning {
        /// The nonce of this re-learning coordinator.
        witness: u64,
    },
}

/// A VM's register.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Record {
    /// The current generation.
    pub generation: u64,
    /// Who won it (`host#incarnation`; a bare host name after re-learning).
    pub holder: String,
}

/// A compare-and-set register of VM generations.
pub trait Coordinator: Send + Sync {
    /// One compare-and-set (see the module documentation). An `Err` means no answer: the request may
    /// have been applied, so the caller retries **the same** request (it is idempotent).
    fn cas(&self, req: &CasRequest) -> impl Future<Output = Result<CasOutcome, CoordError>> + Send;

    /// The current record of `vm` (`None`: never set).
    fn read(&self, vm: &str) -> impl Future<Output = Result<Option<Record>, CoordError>> + Send;
}

// ---------------------------------------------------------------------------------------------------
// The register table (the witness's logic).
// ---------------------------------------------------------------------------------------------------

const STATE_FORMAT: &str = "ax-coordinator-1";

/// Claims gathered for one VM by a re-learning coordinator.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Learning {
    /// Highest generation each host claimed.
    claims: BTreeMap<String, u64>,
    /// Every host named as a member.
    members: BTreeSet<String>,
}

/// The registers of every VM, with the re-learning rule: pure, no I/O (the witness persists
/// [`Registers::to_state`] before answering any request that changed it).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Registers {
    vms: BTreeMap<String, Record>,
    /// Started without its state: VMs not in `vms` are re-learned before they are served.
    relearning: bool,
    /// The nonce claims must carry (chosen at start).
    nonce: u64,
    learning: BTreeMap<String, Learning>,
}

/// The persisted form of [`Registers`].
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateFile {
    format: String,
    relearning: bool,
    vms: BTreeMap<String, Record>,
}

impl Registers {
    /// A coordinator for a new cluster: every VM starts at generation 0.
    pub fn fresh() -> Self {
        Registers::default()
    }

    /// A coordinator that lost its state: a VM is served once every member host named in requests
    /// for it has claimed the generation it knows (a request carrying `nonce`, which the first
    /// answer gives out); the register then starts at the highest claim. `nonce` must differ from
    /// the nonce of any earlier life of this coordinator (random, non-zero).
    pub fn relearning(nonce: u64) -> Self {
        Registers {
            relearning: true,
            nonce: nonce.max(1),
            ..Registers::default()
        }
    }

    /// A random non-zero nonce (for [`Registers::relearning`]).
    pub fn random_nonce() -> u64 {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
        );
        h.write_u32(std::process::id());
        h.finish().max(1)
    }

    /// Whether unknown VMs are re-learned.
    pub fn is_relearning(&self) -> bool {
        self.relearning
    }

    /// One compare-and-set; also returns whether the registers changed (persist before answering).
    pub fn cas(&mut self, req: &CasRequest) -> Result<(CasOutcome, bool), CoordError> {
        req.validate()?;
        let mut changed = false;
        if self.relearning && !self.vms.contains_key(&req.vm) {
            let l = self.learning.entry(req.vm.clone()).or_default();
            let host = req.host().to_owned();
            l.members.insert(host.clone());
            l.members.extend(req.members.iter().cloned());
            if req.witness == self.nonce {
                let c = l.claims.entry(host).or_insert(0);
                *c = (*c).max(req.expected);
            }
            if !l.members.iter().all(|m| l.claims.contains_key(m)) {
                return Ok((
                    CasOutcome::Relearning {
                        witness: self.nonce,
                    },
                    false,
                ));
            }
            // Every member claimed: the register starts at the highest generation any of them knows.
            let (holder, generation) = l
                .claims
                .iter()
                .max_by_key(|(_, g)| **g)
                .map(|(h, g)| (h.clone(), *g))
                .unwrap_or_default();
            self.learning.remove(&req.vm);
            self.vms
                .insert(req.vm.clone(), Record { generation, holder });
            changed = true;
        }
        let (current, holder) = self
            .vms
            .get(&req.vm)
            .map_or((0, String::new()), |r| (r.generation, r.holder.clone()));
        if current == req.expected {
            let generation = req.expected + 1;
            self.vms.insert(
                req.vm.clone(),
                Record {
                    generation,
                    holder: req.claimant.clone(),
                },
            );
            return Ok((CasOutcome::Won { generation }, true));
        }
        if current == req.expected + 1 && holder == req.claimant {
            return Ok((
                CasOutcome::Won {
                    generation: current,
                },
                changed,
            ));
        }
        Ok((CasOutcome::Lost { current, holder }, changed))
    }

    /// The record of `vm`.
    pub fn read(&self, vm: &str) -> Result<Option<Record>, CoordError> {
        match self.vms.get(vm) {
            Some(r) => Ok(Some(r.clone())),
            None if self.relearning => Err(CoordError::Relearning(vm.to_owned())),
            None => Ok(None),
        }
    }

    /// The persisted form.
    pub fn to_state(&self) -> StateFile {
        StateFile {
            format: STATE_FORMAT.into(),
            relearning: self.relearning,
            vms: self.vms.clone(),
        }
    }

    /// From the persisted form (checked); a re-learning coordinator gets a fresh nonce.
    pub fn from_state(s: StateFile) -> Result<Self, String> {
        if s.format != STATE_FORMAT {
            return Err(format!("format {:?}, expected {STATE_FORMAT:?}", s.format));
        }
        for (vm, r) in &s.vms {
            check_name("VM", vm, MAX_VM_ID).map_err(|e| e.to_string())?;
            check_name("holder", &r.holder, MAX_CLAIMANT).map_err(|e| e.to_string())?;
        }
        Ok(Registers {
            vms: s.vms,
            relearning: s.relearning,
            nonce: Registers::random_nonce(),
            learning: BTreeMap::new(),
        })
    }

    /// Loads the registers from `path`. A missing file means the state was lost — unless `init`
    /// (a new cluster), the registers re-learn; either way the new state is written at once, so a
    /// restart keeps re-learning until the file says otherwise. A file that does not parse is an
    /// error: a coordinator must not start from a guess.
    pub fn load(path: &Path, init: bool) -> Result<Self, CoordError> {
        let bad = |why: String| CoordError::State {
            path: path.into(),
            why,
        };
        match std::fs::read_to_string(path) {
            Ok(text) => {
                let s: StateFile = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
                Registers::from_state(s).map_err(bad)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let r = if init {
                    Registers::fresh()
                } else {
                    Registers::relearning(Registers::random_nonce())
                };
                r.save(path)?;
                Ok(r)
            }
            Err(e) => Err(bad(e.to_string())),
        }
    }

    /// Writes the registers durably (see [`write_durably`]).
    pub fn save(&self, path: &Path) -> Result<(), CoordError> {
        let text = serde_json::to_vec_pretty(&self.to_state()).map_err(|e| CoordError::State {
            path: path.into(),
            why: e.to_string(),
        })?;
        write_durably(path, &text).map_err(|e| CoordError::State {
            path: path.into(),
            why: e.to_string(),
        })
    }
}

/// Writes `data` to `path` durably: a temporary file next to it, fsync, rename over `path`, fsync of
/// the directory. Either the old or the new content survives a crash, never a mix.
pub fn write_durably(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = PathBuf::from(tmp_name);
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::File::open(dir)?.sync_all()
}

/// An in-memory coordinator: [`Registers`] behind a mutex (tests, the simulation).
#[derive(Debug, Default)]
pub struct MemCoordinator {
    regs: Mutex<Registers>,
}

impl MemCoordinator {
    /// A fresh register table.
    pub fn new() -> Self {
        MemCoordinator::default()
    }

    /// Runs `f` on the registers.
    pub fn with<T>(&self, f: impl FnOnce(&mut Registers) -> T) -> T {
        f(&mut self.regs.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

impl Coordinator for MemCoordinator {
    async fn cas(&self, req: &CasRequest) -> Result<CasOutcome, CoordError> {
        self.with(|r| r.cas(req)).map(|(o, _)| o)
    }

    async fn read(&self, vm: &str) -> Result<Option<Record>, CoordError> {
        self.with(|r| r.read(vm))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(claimant: &str, expected: u64, members: &[&str]) -> CasRequest {
        CasRequest {
            vm: "vm".into(),
            claimant: claimant.into(),
            expected,
            members: members.iter().map(|s| (*s).to_owned()).collect(),
            witness: 7,
        }
    }

    const RELEARNING: CasOutcome = CasOutcome::Relearning { witness: 7 };

    fn won(g: u64) -> CasOutcome {
        CasOutcome::Won { generation: g }
    }

    #[test]
    fn compare_and_set_is_idempotent_for_the_winner_only() {
        let mut r = Registers::fresh();
        assert_eq!(r.cas(&req("a#1", 0, &[])).unwrap(), (won(1), true));
        // The same request again (its answer was lost): the same answer, nothing changes.
        assert_eq!(r.cas(&req("a#1", 0, &[])).unwrap(), (won(1), false));
        // Another claimant with the same view lost the race.
        let lost = CasOutcome::Lost {
            current: 1,
            holder: "a#1".into(),
        };
        assert_eq!(r.cas(&req("b#1", 0, &[])).unwrap(), (lost, false));
        // A restarted agent (new incarnation) is another claimant.
        assert!(matches!(
            r.cas(&req("a#2", 0, &[])).unwrap().0,
            CasOutcome::Lost { .. }
        ));
        assert_eq!(r.cas(&req("b#1", 1, &[])).unwrap(), (won(2), true));
        // A late duplicate of a's first request changes nothing and is not a win.
        assert!(matches!(
            r.cas(&req("a#1", 0, &[])).unwrap().0,
            CasOutcome::Lost { current: 2, .. }
        ));
        assert_eq!(
            r.read("vm").unwrap(),
            Some(Record {
                generation: 2,
                holder: "b#1".into()
            })
        );
        assert!(r.cas(&req("a#1", u64::MAX, &[])).is_err());
        assert!(r.cas(&req("a b", 1, &[])).is_err());
        assert!(r.cas(&req("a#1", 1, &["x#1"])).is_err());
    }

    #[test]
    fn a_relearning_register_waits_for_every_member_and_starts_at_the_highest_claim() {
        let mut r = Registers::relearning(7);
        assert!(matches!(r.read("vm"), Err(CoordError::Relearning(_))));
        // A request without the current nonce (a late duplicate from before the loss) is no claim.
        let stale = CasRequest {
            witness: 3,
            ..req("a#9", 1, &["b"])
        };
        assert_eq!(r.cas(&stale).unwrap(), (RELEARNING, false));
        // b (a stale replica of generation 3) asks first: unknown, not lost.
        assert_eq!(r.cas(&req("b#1", 3, &["a"])).unwrap(), (RELEARNING, false));
        assert_eq!(r.cas(&req("b#1", 3, &["a"])).unwrap().0, RELEARNING);
        // a (went solo under 4 before the state was lost) claims 4 and wins 5: never below a grant.
        assert_eq!(r.cas(&req("a#9", 4, &["b"])).unwrap(), (won(5), true));
        assert!(matches!(
            r.cas(&req("b#1", 3, &["a"])).unwrap().0,
            CasOutcome::Lost { current: 5, .. }
        ));
        // The other order: the stale claim comes last, and still loses.
        let mut r = Registers::relearning(7);
        assert_eq!(r.cas(&req("a#9", 4, &["b"])).unwrap().0, RELEARNING);
        assert_eq!(
            r.cas(&req("b#1", 3, &["a"])).unwrap(),
            (
                CasOutcome::Lost {
                    current: 4,
                    holder: "a".into()
                },
                true
            )
        );
        assert_eq!(r.cas(&req("a#9", 4, &["b"])).unwrap(), (won(5), true));
    }

    #[test]
    fn state_round_trips_and_a_missing_file_relearns_unless_init() {
        let dir = std::env::temp_dir().join(format!("ax-coord-state-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("state.json");
        let _ = std::fs::remove_file(&p);
        let mut r = Registers::load(&p, true).unwrap();
        assert!(!r.is_relearning());
        r.cas(&req("a#1", 0, &[])).unwrap();
        r.save(&p).unwrap();
        assert_eq!(
            Registers::load(&p, false).unwrap().to_state().vms,
            r.to_state().vms
        );
        std::fs::remove_file(&p).unwrap();
        let r = Registers::load(&p, false).unwrap();
        assert!(r.is_relearning());
        // The re-learning mode itself is persisted.
        assert!(Registers::load(&p, false).unwrap().is_relearning());
        std::fs::write(&p, "{").unwrap();
        assert!(matches!(
            Registers::load(&p, false),
            Err(CoordError::State { .. })
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
