//! The witness: who may release a VM's output, under which **generation**, until when.
//!
//! A witness is a small process on a third host. For every VM it keeps the highest generation it ever
//! handed out, the host holding it and that host's lease. The [`Coordinator`] trait is the whole
//! contract the promotion state machine ([`crate::role`]) relies on, so the UDP witness here can later
//! be replaced by etcd (a compare-and-swap on a key with a lease) without touching the state machine.
//!
//! ## The contract
//! - [`Coordinator::acquire`]`(vm, host, known)` returns a **new** generation, larger than `known` and
//!   than any generation handed out before for `vm`, with a fresh lease — granted only if
//!   - `host` is the current holder (a holder may always move itself to a newer generation), or
//!   - the current holder's lease has expired **and** `known` is at least the current generation: the
//!     caller has seen the latest generation (it holds a replica made under it). A caller with an older
//!     `known` gets [`WitnessError::Superseded`]: someone moved on without it, its state is stale.
//!
//!   Otherwise it fails with [`WitnessError::Denied`] (holder, generation, remaining lease).
//! - [`Coordinator::renew`]`(vm, host, generation)` extends the lease of the current holder at its
//!   current generation; [`WitnessError::Superseded`] if a newer generation exists,
//!   [`WitnessError::NotHolder`] for any other mismatch. Renewing a lease that expired is allowed as long
//!   as nobody acquired since (the generation is still current).
//! - [`Coordinator::current`] tells the current holder, if any.
//!
//! ## Why no two hosts release output for the same VM at once
//! Let *L* be the lease, *ρ* a bound on the relative rate difference of the holder's and the witness's
//! monotonic clocks ([`ClientConfig::max_drift_ppm`]).
//! 1. A host releases output only while it holds an unexpired lease for the VM's generation that it
//!    acquired or renewed itself (protocol v1; v2 is [`crate::role`]).
//! 2. The holder measures its lease from the moment it **sent** the request (the start of the call, even
//!    when the reply answers a retry): [`Grant::valid_until`] = send time + *L*·(1 − ρ). The witness
//!    extends the lease to *receive time* + *L*, and receive time ≥ send time. So in real time the
//!    holder's view of its lease always ends no later than the witness's.
//! 3. The witness hands a *newer* generation to another host only after the current lease expired on
//!    the witness's clock (an acquire by the holder itself supersedes only its own lease).
//! 4. Therefore, when the second host obtains the newer generation, the first host's view of its lease
//!    has already ended and it no longer releases; and it can never renew again, because renewals are
//!    only granted for the current generation. The releasing intervals of two hosts are disjoint.
//!
//! Two more things keep this true across failures:
//! - **A restarted witness never hands out an old generation**: the generation (and holder, and lease
//!   length) of every VM is persisted — written to a temporary file, fsynced, renamed over the state
//!   file, directory fsynced — *before* a grant is answered. A grant whose write failed is not answered
//!   (the client sees [`WitnessError::Failed`]).
//! - **A restarted witness forgets lease timers, so it assumes the worst**: every persisted holder is
//!   treated as holding a lease that runs for a full lease length from the witness's start.
//!
//! Retried or duplicated acquire requests carry the same request id; the witness answers a repeat of the
//! request that produced the current grant with that same grant instead of moving to yet another
//! generation (which would make the caller's first answer stale).
//!
//! ## Transport: UDP
//! The server speaks a tiny request/response protocol over UDP (like the heartbeats). UDP because each
//! exchange is one small datagram each way and the client must control its timing exactly: a lease is
//! measured from the send time and a renewal that takes too long is worth nothing, so the client uses
//! short per-attempt timeouts and a few retries instead of TCP's connection set-up and retransmission
//! timers (hundreds of ms to seconds); the witness keeps no per-client connection state; and losses,
//! duplicates and reordering are harmless because requests carry ids, renewals are idempotent and
//! acquires are deduplicated. Requests are **not authenticated**: run the witness on a trusted management
//! network. A forged request can delay a failover or take the right away from a holder (it then stops
//! releasing), but cannot make two hosts release at once, because every host releases only under a
//! grant it received itself.
//!
//! ### Request (little endian)
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | magic `AXWQ` |
//! | 4 | 1 | version = 1 |
//! | 5 | 1 | op: 1 acquire, 2 renew, 3 current |
//! | 6 | 1 | `v` = VM id length, 1..=128 |
//! | 7 | 1 | `h` = host id length, 1..=64 (0 for current) |
//! | 8 | 8 | request id |
//! | 16 | 8 | acquire: `known`; renew: the generation; current: 0 |
//! | 24 | `v` | VM id, UTF-8 without control characters |
//! | 24+`v` | `h` | host id, same rules |
//!
//! ### Response
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | magic `AXWA` |
//! | 4 | 1 | version = 1 |
//! | 5 | 1 | status: 1 granted, 2 denied, 3 superseded, 4 not holder, 5 current, 6 failed, 7 bad request |
//! | 6 | 1 | `h` = holder length, 0..=64 |
//! | 7 | 1 | reserved, 0 |
//! | 8 | 8 | request id (echoed) |
//! | 16 | 8 | generation (granted: the new/renewed one; denied, superseded, current: the current one) |
//! | 24 | 8 | µs: granted: lease length; denied, current: remaining lease (0 = expired) |
//! | 32 | `h` | holder host id (denied, superseded, current) |
//!
//! Both sides check every length, code and name and the exact total size; garbage is dropped (the server
//! answers "bad request" only when the magic, version and request id are readable).

use std::collections::hash_map::RandomState;
use std::collections::BTreeMap;
use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use tokio::net::UdpSocket;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::heartbeat::MAX_HOST_ID;
use crate::wire::{get_u64, micros, put_u64};

/// Longest VM id, in bytes.
pub const MAX_VM_ID: usize = 128;
/// Default lease length.
pub const DEFAULT_LEASE: Duration = Duration::from_millis(500);
const REQ_MAGIC: [u8; 4] = *b"AXWQ";
const RESP_MAGIC: [u8; 4] = *b"AXWA";
const VERSION: u8 = 1;
const REQ_HEADER: usize = 24;
const RESP_HEADER: usize = 32;
const MAX_REQUEST: usize = REQ_HEADER + MAX_VM_ID + MAX_HOST_ID;
const MAX_RESPONSE: usize = RESP_HEADER + MAX_HOST_ID;
const STATE_FORMAT: &str = "ax-witness-1";

/// Witness errors: refusals (the protocol's answers), transport and state-file failures.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WitnessError {
    /// Another host holds an unexpired lease.
    #[error("denied: {holder} holds generation {generation} for another {remaining:?}")]
    Denied {
        /// The holder.
        holder: String,
        /// Its generation.
        generation: u64,
        /// What is left of its lease, on the witness's clock.
        remaining: Duration,
    },
    /// A newer generation exists than the one the caller holds or knows.
    #[error("superseded: generation {current} is held by {holder}")]
    Superseded {
        /// The current generation.
        current: u64,
        /// Its holder.
        holder: String,
    },
    /// The caller does not hold this generation (and it is not older than the current one).
    #[error("not the holder of generation {generation}")]
    NotHolder {
        /// The generation asked about.
        generation: u64,
    },
    /// No answer after every attempt.
    #[error("witness {server} unreachable after {attempts} attempts")]
    Unreachable {
        /// The witness address.
        server: SocketAddr,
        /// Attempts made.
        attempts: u32,
    },
    /// The witness could not carry out the request (e.g. it could not persist the generation).
    #[error("witness failed to serve the request")]
    Failed,
    /// The request is invalid (names, generation overflow); also what a witness says to a malformed
    /// request.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// A datagram that is not a valid message.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// A socket operation failed.
    #[error("{what}: {message}")]
    Io {
        /// The operation.
        what: String,
        /// The error text.
        message: String,
    },
    /// The state file cannot be read, parsed or written.
    #[error("witness state {path}: {why}")]
    State {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        why: String,
    },
}

fn io_err(what: impl Into<String>, e: std::io::Error) -> WitnessError {
    WitnessError::Io {
        what: what.into(),
        message: e.to_string(),
    }
}

/// The right to release a VM's output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    /// The generation held.
    pub generation: u64,
    /// The lease length the witness granted.
    pub lease: Duration,
    /// The holder's own end of the lease: measured from the *send* time of the request, minus the
    /// drift allowance. Output may be released only strictly before this instant.
    pub valid_until: Instant,
}

impl Grant {
    /// What is left of the lease at `now` (zero once expired).
    pub fn remaining(&self, now: Instant) -> Duration {
        self.valid_until.saturating_duration_since(now)
    }
}

/// The current holder of a VM's generation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    /// The host.
    pub host: String,
    /// The generation it holds.
    pub generation: u64,
    /// What is left of its lease on the coordinator's clock (`None` once expired).
    pub expires_in: Option<Duration>,
}

/// A source of generations and leases: the UDP witness ([`WitnessClient`]), an in-memory one
/// ([`LocalCoordinator`]), later etcd. See the module docs for the exact contract.
pub trait Coordinator: Send + Sync {
    /// Asks for the output right for `vm` at a generation newer than `known` (and than any before).
    /// Granted if `host` is the current holder, or if the current lease expired and `known` is not
    /// older than the current generation.
    fn acquire(
        &self,
        vm: &str,
        host: &str,
        known: u64,
    ) -> impl Future<Output = Result<Grant, WitnessError>> + Send;

    /// Extends `host`'s lease on `generation`; [`WitnessError::Superseded`] if a newer one exists.
    fn renew(
        &self,
        vm: &str,
        host: &str,
        generation: u64,
    ) -> impl Future<Output = Result<Grant, WitnessError>> + Send;

    /// The current holder of `vm`, if any generation was ever handed out.
    fn current(
        &self,
        vm: &str,
    ) -> impl Future<Output = Result<Option<Holder>, WitnessError>> + Send;
}

/// Checks a VM or host id: 1..=`max` bytes, no control characters.
fn check_name(kind: &str, s: &str, max: usize) -> Result<(), WitnessError> {
    if s.is_empty() || s.len() > max || s.chars().any(char::is_control) {
        return Err(WitnessError::Invalid(format!(
            "{kind} id {s:?}: need 1..={max} bytes without control characters"
        )));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------------
// The lease table: the witness's logic, without I/O.
// ---------------------------------------------------------------------------------------------------

/// What is persisted per VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// The highest generation handed out.
    pub generation: u64,
    /// Its holder.
    pub holder: String,
    /// The lease length granted with it, in µs.
    pub lease_us: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Live {
    rec: Record,
    expires: Instant,
    /// The request id of the acquire that produced this generation.
    acquire_id: Option<u64>,
}

/// The result of a successful request on a [`LeaseTable`], before it is applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    vm: String,
    update: Option<Live>,
    durable: bool,
    /// The generation granted or renewed.
    pub generation: u64,
    /// The lease length granted.
    pub lease: Duration,
}

impl Step {
    /// Whether applying this step changes what is persisted (generation, holder or lease length).
    pub fn durable(&self) -> bool {
        self.durable
    }
}

/// The witness's decisions for every VM, on an explicit clock.
///
/// Used by [`WitnessServer`] (which persists a durable [`Step`] before applying it) and by
/// [`LocalCoordinator`].
#[derive(Debug, Clone)]
pub struct LeaseTable {
    lease: Duration,
    vms: BTreeMap<String, Live>,
}

#[derive(Debug, Serialize, Deserialize)]
struct StateFile {
    format: String,
    vms: BTreeMap<String, Record>,
}

impl LeaseTable {
    /// An empty table granting leases of `lease`.
    pub fn new(lease: Duration) -> Self {
        LeaseTable {
            lease,
            vms: BTreeMap::new(),
        }
    }

    /// A table restored from persisted records at `now`: every holder is assumed to hold a lease for
    /// a full lease length (the longer of its recorded one and `lease`) from `now`.
    pub fn restore(lease: Duration, records: BTreeMap<String, Record>, now: Instant) -> Self {
        let vms = records
            .into_iter()
            .map(|(vm, rec)| {
                let held = Duration::from_micros(rec.lease_us).max(lease);
                (
                    vm,
                    Live {
                        rec,
                        expires: now + held,
                        acquire_id: None,
                    },
                )
            })
            .collect();
        LeaseTable { lease, vms }
    }

    /// The lease length granted.
    pub fn lease(&self) -> Duration {
        self.lease
    }

    /// The persisted part of the table.
    pub fn records(&self) -> BTreeMap<String, Record> {
        self.vms
            .iter()
            .map(|(k, v)| (k.clone(), v.rec.clone()))
            .collect()
    }

    /// The persisted part of the table as it will be once `step` is applied.
    pub fn records_with(&self, step: &Step) -> BTreeMap<String, Record> {
        let mut r = self.records();
        if let Some(u) = &step.update {
            r.insert(step.vm.clone(), u.rec.clone());
        }
        r
    }

    /// Decides an acquire at `now`. `request_id` deduplicates retries (see the module docs).
    pub fn acquire(
        &self,
        now: Instant,
        vm: &str,
        host: &str,
        known: u64,
        request_id: Option<u64>,
    ) -> Result<Step, WitnessError> {
        check_name("VM", vm, MAX_VM_ID)?;
        check_name("host", host, MAX_HOST_ID)?;
        let current = self.vms.get(vm);
        let mut base = known;
        let mut expires = now + self.lease;
        if let Some(l) = current {
            if l.rec.holder == host {
                if request_id.is_some() && l.acquire_id == request_id {
                    // A repeat of the request that produced this generation: same answer, no change.
                    return Ok(Step {
                        vm: vm.into(),
                        update: None,
                        durable: false,
                        generation: l.rec.generation,
                        lease: Duration::from_micros(l.rec.lease_us),
                    });
                }
            } else {
                if known < l.rec.generation {
                    return Err(WitnessError::Superseded {
                        current: l.rec.generation,
                        holder: l.rec.holder.clone(),
                    });
                }
                if now < l.expires {
                    return Err(WitnessError::Denied {
                        holder: l.rec.holder.clone(),
                        generation: l.rec.generation,
                        remaining: l.expires - now,
                    });
                }
            }
            base = base.max(l.rec.generation);
            if l.rec.holder == host {
                // Never shorten the witness's view of a lease its holder may still be using.
                expires = expires.max(l.expires);
            }
        }
        let generation = base
            .checked_add(1)
            .ok_or_else(|| WitnessError::Invalid(format!("generation {base} cannot grow")))?;
        Ok(Step {
            vm: vm.into(),
            update: Some(Live {
                rec: Record {
                    generation,
                    holder: host.into(),
                    lease_us: micros(self.lease),
                },
                expires,
                acquire_id: request_id,
            }),
            durable: true,
            generation,
            lease: self.lease,
        })
    }

    /// Decides a renewal at `now`.
    pub fn renew(
        &self,
        now: Instant,
        vm: &str,
        host: &str,
        generation: u64,
    ) -> Result<Step, WitnessError> {
        check_name("VM", vm, MAX_VM_ID)?;
        check_name("host", host, MAX_HOST_ID)?;
        let Some(l) = self.vms.get(vm) else {
            return Err(WitnessError::NotHolder { generation });
        };
        if l.rec.generation > generation {
            return Err(WitnessError::Superseded {
                current: l.rec.generation,
                holder: l.rec.holder.clone(),
            });
        }
        if l.rec.generation != generation || l.rec.holder != host {
            return Err(WitnessError::NotHolder { generation });
        }
        let mut u = l.clone();
        u.expires = u.expires.max(now + self.lease);
        let lease_us = micros(self.lease);
        let durable = u.rec.lease_us != lease_us;
        u.rec.lease_us = u.rec.lease_us.max(lease_us);
        Ok(Step {
            vm: vm.into(),
            update: Some(u),
            durable,
            generation,
            lease: self.lease,
        })
    }

    /// The current holder at `now`.
    pub fn current(&self, now: Instant, vm: &str) -> Result<Option<Holder>, WitnessError> {
        check_name("VM", vm, MAX_VM_ID)?;
        Ok(self.vms.get(vm).map(|l| Holder {
            host: l.rec.holder.clone(),
            generation: l.rec.generation,
            expires_in: (now < l.expires).then(|| l.expires - now),
        }))
    }

    /// Applies a step returned by [`LeaseTable::acquire`] or [`LeaseTable::renew`] on this table.
    pub fn apply(&mut self, step: Step) {
        if let Some(u) = step.update {
            self.vms.insert(step.vm, u);
        }
    }
}

/// Loads the persisted records (none if the file does not exist). A file that exists but does not
/// parse or validate is an error: a witness must not start from a guess.
pub fn load_state(path: &Path) -> Result<BTreeMap<String, Record>, WitnessError> {
    let bad = |why: String| WitnessError::State {
        path: path.into(),
        why,
    };
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
        Err(e) => return Err(bad(e.to_string())),
    };
    let state: StateFile = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    if state.format != STATE_FORMAT {
        return Err(bad(format!(
            "format {:?}, expected {STATE_FORMAT:?}",
            state.format
        )));
    }
    for (vm, r) in &state.vms {
        check_name("VM", vm, MAX_VM_ID).map_err(|e| bad(e.to_string()))?;
        check_name("host", &r.holder, MAX_HOST_ID).map_err(|e| bad(e.to_string()))?;
        if r.generation == 0 {
            return Err(bad(format!("VM {vm:?} has generation 0")));
        }
    }
    Ok(state.vms)
}

/// Writes the records durably: temporary file, fsync, rename over `path`, fsync of the directory.
pub fn save_state(path: &Path, records: &BTreeMap<String, Record>) -> Result<(), WitnessError> {
    let bad = |why: String| WitnessError::State {
        path: path.into(),
        why,
    };
    let state = StateFile {
        format: STATE_FORMAT.into(),
        vms: records.clone(),
    };
    let text = serde_json::to_vec_pretty(&state).map_err(|e| bad(e.to_string()))?;
    crate::coordinator::write_durably(path, &text).map_err(|e| bad(e.to_string()))
}

// ---------------------------------------------------------------------------------------------------
// Wire format.
// ---------------------------------------------------------------------------------------------------

/// Request operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Acquire = 1,
    Renew = 2,
    Current = 3,
}

/// One request.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Request {
    op: Op,
    id: u64,
    value: u64,
    vm: String,
    host: String,
}

fn malformed(why: impl Into<String>) -> WitnessError {
    WitnessError::Malformed(why.into())
}

fn decode_name(bytes: &[u8], kind: &str, max: usize) -> Result<String, WitnessError> {
    let s = std::str::from_utf8(bytes).map_err(|_| malformed(format!("{kind} id is not UTF-8")))?;
    check_name(kind, s, max).map_err(|e| malformed(e.to_string()))?;
    Ok(s.to_owned())
}

impl Request {
    fn encode(&self) -> Result<Vec<u8>, WitnessError> {
        check_name("VM", &self.vm, MAX_VM_ID)?;
        if self.op == Op::Current {
            if !self.host.is_empty() {
                return Err(WitnessError::Invalid("current takes no host".into()));
            }
        } else {
            check_name("host", &self.host, MAX_HOST_ID)?;
        }
        let mut b = vec![0u8; REQ_HEADER + self.vm.len() + self.host.len()];
        b[..4].copy_from_slice(&REQ_MAGIC);
        b[4] = VERSION;
        b[5] = self.op as u8;
        b[6] = self.vm.len() as u8; // ≤ 128, checked
        b[7] = self.host.len() as u8; // ≤ 64, checked
        put_u64(&mut b, 8, self.id);
        put_u64(&mut b, 16, self.value);
        b[REQ_HEADER..REQ_HEADER + self.vm.len()].copy_from_slice(self.vm.as_bytes());
        b[REQ_HEADER + self.vm.len()..].copy_from_slice(self.host.as_bytes());
        Ok(b)
    }

    /// The request id of a datagram whose magic and version are right, for answering "bad request".
    fn peek_id(b: &[u8]) -> Option<u64> {
        (b.len() >= REQ_HEADER && b[..4] == REQ_MAGIC && b[4] == VERSION).then(|| get_u64(b, 8))
    }

    fn decode(b: &[u8]) -> Result<Request, WitnessError> {
        if b.len() < REQ_HEADER {
            return Err(malformed(format!(
                "request of {} bytes is shorter than its header",
                b.len()
            )));
        }
        if b[..4] != REQ_MAGIC {
            return Err(malformed("bad request magic"));
        }
        if b[4] != VERSION {
            return Err(malformed(format!("unsupported version {}", b[4])));
        }
        let op = match b[5] {
            1 => Op::Acquire,
            2 => Op::Renew,
            3 => Op::Current,
            o => return Err(malformed(format!("unknown op {o}"))),
        };
        let (v, h) = (usize::from(b[6]), usize::from(b[7]));
        if b.len() != REQ_HEADER + v + h {
            return Err(malformed(format!(
                "request length {} does not match its header ({})",
                b.len(),
                REQ_HEADER + v + h
            )));
        }
        let vm = decode_name(&b[REQ_HEADER..REQ_HEADER + v], "VM", MAX_VM_ID)?;
        let host = if op == Op::Current {
            if h != 0 {
                return Err(malformed("current with a host id"));
            }
            String::new()
        } else {
            decode_name(&b[REQ_HEADER + v..], "host", MAX_HOST_ID)?
        };
        let value = get_u64(b, 16);
        if op == Op::Current && value != 0 {
            return Err(malformed("current with a value"));
        }
        Ok(Request {
            op,
            id: get_u64(b, 8),
            value,
            vm,
            host,
        })
    }
}

/// Response statuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Granted = 1,
    Denied = 2,
    Superseded = 3,
    NotHolder = 4,
    Current = 5,
    Failed = 6,
    BadRequest = 7,
}

/// One response.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Response {
    status: Status,
    id: u64,
    generation: u64,
    micros: u64,
    holder: String,
}

impl Response {
    fn new(status: Status, id: u64) -> Self {
        Response {
            status,
            id,
            generation: 0,
            micros: 0,
            holder: String::new(),
        }
    }

    fn from_error(id: u64, e: &WitnessError) -> Self {
        match e {
            WitnessError::Denied {
                holder,
                generation,
                remaining,
            } => Response {
                status: Status::Denied,
                id,
                generation: *generation,
                micros: micros(*remaining),
                holder: holder.clone(),
            },
            WitnessError::Superseded { current, holder } => Response {
                status: Status::Superseded,
                id,
                generation: *current,
                micros: 0,
                holder: holder.clone(),
            },
            WitnessError::NotHolder { generation } => Response {
                generation: *generation,
                ..Response::new(Status::NotHolder, id)
            },
            WitnessError::Invalid(_) | WitnessError::Malformed(_) => {
                Response::new(Status::BadRequest, id)
            }
            _ => Response::new(Status::Failed, id),
        }
    }

    fn encode(&self) -> Vec<u8> {
        // Holders come from validated requests or the validated state file: ≤ 64 bytes.
        let holder = &self.holder.as_bytes()[..self.holder.len().min(MAX_HOST_ID)];
        let mut b = vec![0u8; RESP_HEADER + holder.len()];
        b[..4].copy_from_slice(&RESP_MAGIC);
        b[4] = VERSION;
        b[5] = self.status as u8;
        b[6] = holder.len() as u8;
        put_u64(&mut b, 8, self.id);
        put_u64(&mut b, 16, self.generation);
        put_u64(&mut b, 24, self.micros);
        b[RESP_HEADER..].copy_from_slice(holder);
        b
    }

    fn decode(b: &[u8]) -> Result<Response, WitnessError> {
        if b.len() < RESP_HEADER {
            return Err(malformed(format!(
                "response of {} bytes is shorter than its header",
                b.len()
            )));
        }
        if b[..4] != RESP_MAGIC {
            return Err(malformed("bad response magic"));
        }
        if b[4] != VERSION {
            return Err(malformed(format!("unsupported version {}", b[4])));
        }
        let status = match b[5] {
            1 => Status::Granted,
            2 => Status::Denied,
            3 => Status::Superseded,
            4 => Status::NotHolder,
            5 => Status::Current,
            6 => Status::Failed,
            7 => Status::BadRequest,
            s => return Err(malformed(format!("unknown status {s}"))),
        };
        let h = usize::from(b[6]);
        if b[7] != 0 {
            return Err(malformed("reserved byte is not 0"));
        }
        if b.len() != RESP_HEADER + h {
            return Err(malformed(format!(
                "response length {} does not match its header ({})",
                b.len(),
                RESP_HEADER + h
            )));
        }
        let holder = if h == 0 {
            String::new()
        } else {
            decode_name(&b[RESP_HEADER..], "holder", MAX_HOST_ID)?
        };
        let needs_holder = matches!(status, Status::Denied | Status::Superseded);
        if needs_holder && holder.is_empty() {
            return Err(malformed("denied or superseded without a holder"));
        }
        Ok(Response {
            status,
            id: get_u64(b, 8),
            generation: get_u64(b, 16),
            micros: get_u64(b, 24),
            holder,
        })
    }
}

// ---------------------------------------------------------------------------------------------------
// Server.
// ---------------------------------------------------------------------------------------------------

/// Witness server configuration.
#[derive(Debug, Clone)]
pub struct WitnessConfig {
    /// UDP address to listen on.
    pub listen: SocketAddr,
    /// The state file (created on the first grant).
    pub state_path: PathBuf,
    /// Lease length granted (default 500 ms).
    pub lease: Duration,
}

impl WitnessConfig {
    /// A configuration with the default lease.
    pub fn new(listen: SocketAddr, state_path: impl Into<PathBuf>) -> Self {
        WitnessConfig {
            listen,
            state_path: state_path.into(),
            lease: DEFAULT_LEASE,
        }
    }
}

/// The UDP witness server. Requests are served one at a time, in arrival order; a grant is persisted
/// before it is answered.
#[derive(Debug)]
pub struct WitnessServer {
    socket: UdpSocket,
    table: LeaseTable,
    state_path: PathBuf,
    local: SocketAddr,
}

fn udp_socket(bind: SocketAddr, connect: Option<SocketAddr>) -> Result<UdpSocket, WitnessError> {
    let s = Socket::new(Domain::for_address(bind), Type::DGRAM, Some(Protocol::UDP))
        .map_err(|e| io_err(format!("socket for {bind}"), e))?;
    s.set_nonblocking(true)
        .map_err(|e| io_err("non-blocking", e))?;
    s.bind(&SockAddr::from(bind))
        .map_err(|e| io_err(format!("bind {bind}"), e))?;
    if let Some(peer) = connect {
        s.connect(&SockAddr::from(peer))
            .map_err(|e| io_err(format!("connect to {peer}"), e))?;
    }
    let std_socket: std::net::UdpSocket = s.into();
    UdpSocket::from_std(std_socket).map_err(|e| io_err("register socket", e))
}

impl WitnessServer {
    /// Loads the state file and binds the socket (inside a tokio runtime). Refuses to start on a state
    /// file it cannot read or parse.
    pub fn bind(cfg: WitnessConfig) -> Result<WitnessServer, WitnessError> {
        if cfg.lease.is_zero() {
            return Err(WitnessError::Invalid("lease is zero".into()));
        }
        let records = load_state(&cfg.state_path)?;
        info!(vms = records.len(), path = %cfg.state_path.display(), "witness: state loaded");
        let table = LeaseTable::restore(cfg.lease, records, Instant::now());
        let socket = udp_socket(cfg.listen, None)?;
        let local = socket
            .local_addr()
            .map_err(|e| io_err("local address", e))?;
        Ok(WitnessServer {
            socket,
            table,
            state_path: cfg.state_path,
            local,
        })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Serves forever.
    pub async fn run(mut self) {
        let mut buf = [0u8; MAX_REQUEST + 1];
        loop {
            let (n, from) = match self.socket.recv_from(&mut buf).await {
                Ok(r) => r,
                Err(e) => {
                    debug!(error = %e, "witness: receive error");
                    continue;
                }
            };
            let resp = match Request::decode(&buf[..n]) {
                Ok(req) => self.serve(req).await,
                Err(e) => {
                    debug!(%from, error = %e, "witness: malformed request");
                    match Request::peek_id(&buf[..n]) {
                        Some(id) => Response::new(Status::BadRequest, id),
                        None => continue,
                    }
                }
            };
            if let Err(e) = self.socket.send_to(&resp.encode(), from).await {
                debug!(%from, error = %e, "witness: send error");
            }
        }
    }

    /// Runs the server on a task; dropping the handle stops it.
    pub fn spawn(self) -> WitnessHandle {
        let local = self.local;
        WitnessHandle {
            local,
            task: tokio::spawn(self.run()),
        }
    }

    async fn serve(&mut self, req: Request) -> Response {
        let now = Instant::now();
        let step = match req.op {
            Op::Current => {
                return match self.table.current(now, &req.vm) {
                    Ok(None) => Response::new(Status::Current, req.id),
                    Ok(Some(h)) => Response {
                        status: Status::Current,
                        id: req.id,
                        generation: h.generation,
                        micros: h.expires_in.map_or(0, micros),
                        holder: h.host,
                    },
                    Err(e) => Response::from_error(req.id, &e),
                }
            }
            Op::Acquire => self
                .table
                .acquire(now, &req.vm, &req.host, req.value, Some(req.id)),
            Op::Renew => self.table.renew(now, &req.vm, &req.host, req.value),
        };
        let step = match step {
            Ok(s) => s,
            Err(e) => {
                debug!(vm = %req.vm, host = %req.host, error = %e, "witness: refused");
                return Response::from_error(req.id, &e);
            }
        };
        if step.durable() {
            let records = self.table.records_with(&step);
            let path = self.state_path.clone();
            let saved = tokio::task::spawn_blocking(move || save_state(&path, &records)).await;
            match saved {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    warn!(error = %e, "witness: cannot persist; request not granted");
                    return Response::new(Status::Failed, req.id);
                }
                Err(e) => {
                    warn!(error = %e, "witness: persist task failed; request not granted");
                    return Response::new(Status::Failed, req.id);
                }
            }
        }
        let (generation, lease) = (step.generation, step.lease);
        if req.op == Op::Acquire {
            info!(vm = %req.vm, host = %req.host, generation, "witness: granted");
        }
        self.table.apply(step);
        Response {
            status: Status::Granted,
            id: req.id,
            generation,
            micros: micros(lease),
            holder: String::new(),
        }
    }
}

/// A running witness server.
#[derive(Debug)]
pub struct WitnessHandle {
    local: SocketAddr,
    task: JoinHandle<()>,
}

impl WitnessHandle {
    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }
}

impl Drop for WitnessHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// ---------------------------------------------------------------------------------------------------
// Client.
// ---------------------------------------------------------------------------------------------------

/// Witness client configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientConfig {
    /// How long to wait for an answer to one attempt (default 50 ms).
    pub attempt_timeout: Duration,
    /// Attempts per call (default 3).
    pub attempts: u32,
    /// Bound on the relative clock-rate difference between this host and the witness, in parts per
    /// million (default 1000 = 0.1 %); the holder's lease is shortened by that fraction.
    pub max_drift_ppm: u32,
    /// Local address to send from (default: the unspecified address of the server's family).
    pub bind: Option<SocketAddr>,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            attempt_timeout: Duration::from_millis(50),
            attempts: 3,
            max_drift_ppm: 1000,
            bind: None,
        }
    }
}

/// A [`Coordinator`] that talks to a [`WitnessServer`] over UDP. Each call uses its own socket, so
/// calls may run concurrently.
#[derive(Debug)]
pub struct WitnessClient {
    server: SocketAddr,
    cfg: ClientConfig,
    next_id: AtomicU64,
}

impl WitnessClient {
    /// A client of the witness at `server`.
    pub fn new(server: SocketAddr, cfg: ClientConfig) -> Self {
        // A random starting request id, so that a restarted client does not repeat old ids.
        let seed = RandomState::new().build_hasher().finish();
        WitnessClient {
            server,
            cfg,
            next_id: AtomicU64::new(seed),
        }
    }

    /// The holder's end of a lease of `lease` requested at `sent`.
    fn valid_until(&self, sent: Instant, lease: Duration) -> Instant {
        let drift = lease.mul_f64(f64::from(self.cfg.max_drift_ppm) / 1e6);
        sent + lease.saturating_sub(drift)
    }

    /// Sends `req` until an answer with its id arrives; returns it with the time the call started.
    async fn call(&self, mut req: Request) -> Result<(Response, Instant), WitnessError> {
        req.id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let bytes = req.encode()?;
        let started = Instant::now();
        let bind = self.cfg.bind.unwrap_or(match self.server {
            SocketAddr::V4(_) => SocketAddr::from(([0, 0, 0, 0], 0)),
            SocketAddr::V6(_) => SocketAddr::from(([0u16; 8], 0)),
        });
        let socket = udp_socket(bind, Some(self.server))?;
        let mut buf = [0u8; MAX_RESPONSE + 1];
        for attempt in 1..=self.cfg.attempts.max(1) {
            let deadline = Instant::now() + self.cfg.attempt_timeout;
            if let Err(e) = socket.send(&bytes).await {
                debug!(attempt, error = %e, "witness client: send error");
            }
            loop {
                match tokio::time::timeout_at(deadline, socket.recv(&mut buf)).await {
                    Err(_) => break, // attempt timed out
                    Ok(Err(e)) => {
                        // ECONNREFUSED: nobody listens. Wait out the attempt rather than spin.
                        debug!(attempt, error = %e, "witness client: receive error");
                        tokio::time::sleep_until(deadline).await;
                        break;
                    }
                    Ok(Ok(n)) => match Response::decode(&buf[..n]) {
                        Ok(r) if r.id == req.id => return Ok((r, started)),
                        Ok(r) => debug!(id = r.id, "witness client: stale response ignored"),
                        Err(e) => debug!(error = %e, "witness client: malformed response ignored"),
                    },
                }
            }
        }
        Err(WitnessError::Unreachable {
            server: self.server,
            attempts: self.cfg.attempts.max(1),
        })
    }

    /// Interprets the answer to an acquire or a renew.
    fn grant(
        &self,
        r: Response,
        started: Instant,
        min_generation: u64,
        exact: bool,
    ) -> Result<Grant, WitnessError> {
        match r.status {
            Status::Granted => {
                if r.generation < min_generation
                    || (exact && r.generation != min_generation)
                    || r.generation == 0
                {
                    return Err(malformed(format!(
                        "granted generation {} does not answer the request (expected {}{min_generation})",
                        r.generation,
                        if exact { "" } else { "at least " }
                    )));
                }
                let lease = Duration::from_micros(r.micros);
                Ok(Grant {
                    generation: r.generation,
                    lease,
                    valid_until: self.valid_until(started, lease),
                })
            }
            Status::Denied => Err(WitnessError::Denied {
                holder: r.holder,
                generation: r.generation,
                remaining: Duration::from_micros(r.micros),
            }),
            Status::Superseded => Err(WitnessError::Superseded {
                current: r.generation,
                holder: r.holder,
            }),
            Status::NotHolder => Err(WitnessError::NotHolder {
                generation: r.generation,
            }),
            Status::Failed => Err(WitnessError::Failed),
            Status::BadRequest => Err(WitnessError::Invalid(
                "the witness rejected the request".into(),
            )),
            Status::Current => Err(malformed("a current-holder answer to an acquire or renew")),
        }
    }
}

impl Coordinator for WitnessClient {
    async fn acquire(&self, vm: &str, host: &str, known: u64) -> Result<Grant, WitnessError> {
        let min = known
            .checked_add(1)
            .ok_or_else(|| WitnessError::Invalid(format!("generation {known} cannot grow")))?;
        let req = Request {
            op: Op::Acquire,
            id: 0,
            value: known,
            vm: vm.into(),
            host: host.into(),
        };
        let (r, started) = self.call(req).await?;
        self.grant(r, started, min, false)
    }

    async fn renew(&self, vm: &str, host: &str, generation: u64) -> Result<Grant, WitnessError> {
        let req = Request {
            op: Op::Renew,
            id: 0,
            value: generation,
            vm: vm.into(),
            host: host.into(),
        };
        let (r, started) = self.call(req).await?;
        self.grant(r, started, generation, true)
    }

    async fn current(&self, vm: &str) -> Result<Option<Holder>, WitnessError> {
        let req = Request {
            op: Op::Current,
            id: 0,
            value: 0,
            vm: vm.into(),
            host: String::new(),
        };
        let (r, _) = self.call(req).await?;
        match r.status {
            Status::Current if r.holder.is_empty() => Ok(None),
            Status::Current => Ok(Some(Holder {
                host: r.holder,
                generation: r.generation,
                expires_in: (r.micros > 0).then(|| Duration::from_micros(r.micros)),
            })),
            Status::Failed => Err(WitnessError::Failed),
            Status::BadRequest => Err(WitnessError::Invalid(
                "the witness rejected the request".into(),
            )),
            _ => Err(malformed("not a current-holder answer")),
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// In-memory coordinator.
// ---------------------------------------------------------------------------------------------------

/// An in-memory [`Coordinator`] with the witness's exact rules, for tests and single-process setups.
/// Besides the trait (which reads tokio's clock) it offers `*_at` methods on an explicit clock.
#[derive(Debug)]
pub struct LocalCoordinator {
    table: Mutex<LeaseTable>,
}

impl LocalCoordinator {
    /// A coordinator granting leases of `lease`.
    pub fn new(lease: Duration) -> Self {
        LocalCoordinator {
            table: Mutex::new(LeaseTable::new(lease)),
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut LeaseTable) -> T) -> T {
        f(&mut self.table.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// [`Coordinator::acquire`] at `now` (the request is also received at `now`).
    pub fn acquire_at(
        &self,
        now: Instant,
        vm: &str,
        host: &str,
        known: u64,
    ) -> Result<Grant, WitnessError> {
        self.with(|t| {
            let step = t.acquire(now, vm, host, known, None)?;
            let g = Grant {
                generation: step.generation,
                lease: step.lease,
                valid_until: now + step.lease,
            };
            t.apply(step);
            Ok(g)
        })
    }

    /// [`Coordinator::renew`] at `now`.
    pub fn renew_at(
        &self,
        now: Instant,
        vm: &str,
        host: &str,
        generation: u64,
    ) -> Result<Grant, WitnessError> {
        self.with(|t| {
            let step = t.renew(now, vm, host, generation)?;
            let g = Grant {
                generation: step.generation,
                lease: step.lease,
                valid_until: now + step.lease,
            };
            t.apply(step);
            Ok(g)
        })
    }

    /// [`Coordinator::current`] at `now`.
    pub fn current_at(&self, now: Instant, vm: &str) -> Result<Option<Holder>, WitnessError> {
        self.with(|t| t.current(now, vm))
    }
}

impl Coordinator for LocalCoordinator {
    async fn acquire(&self, vm: &str, host: &str, known: u64) -> Result<Grant, WitnessError> {
        self.acquire_at(Instant::now(), vm, host, known)
    }

    async fn renew(&self, vm: &str, host: &str, generation: u64) -> Result<Grant, WitnessError> {
        self.renew_at(Instant::now(), vm, host, generation)
    }

    async fn current(&self, vm: &str) -> Result<Option<Holder>, WitnessError> {
        self.current_at(Instant::now(), vm)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MS: Duration = Duration::from_millis(1);
    const L: Duration = Duration::from_millis(500);

    #[test]
    fn first_acquire_then_renew() {
        let t0 = Instant::now();
        let c = LocalCoordinator::new(L);
        let g = c.acquire_at(t0, "vm", "a", 0).unwrap();
        assert_eq!((g.generation, g.lease, g.valid_until), (1, L, t0 + L));
        let r = c.renew_at(t0 + 100 * MS, "vm", "a", 1).unwrap();
        assert_eq!((r.generation, r.valid_until), (1, t0 + 600 * MS));
        let h = c.current_at(t0 + 200 * MS, "vm").unwrap().unwrap();
        assert_eq!(
            (h.host.as_str(), h.generation, h.expires_in),
            ("a", 1, Some(400 * MS))
        );
        assert_eq!(c.current_at(t0, "other").unwrap(), None);
    }

    #[test]
    fn other_host_waits_for_expiry() {
        let t0 = Instant::now();
        let c = LocalCoordinator::new(L);
        c.acquire_at(t0, "vm", "a", 0).unwrap();
        let e = c.acquire_at(t0 + 499 * MS, "vm", "b", 1).unwrap_err();
        assert_eq!(
            e,
            WitnessError::Denied {
                holder: "a".into(),
                generation: 1,
                remaining: MS
            }
        );
        let g = c.acquire_at(t0 + L, "vm", "b", 1).unwrap();
        assert_eq!(g.generation, 2);
        // The old holder is superseded for good.
        assert_eq!(
            c.renew_at(t0 + L, "vm", "a", 1).unwrap_err(),
            WitnessError::Superseded {
                current: 2,
                holder: "b".into()
            }
        );
        assert_eq!(
            c.acquire_at(t0 + 2 * L, "vm", "a", 1).unwrap_err(),
            WitnessError::Superseded {
                current: 2,
                holder: "b".into()
            }
        );
    }

    #[test]
    fn stale_known_is_superseded_even_after_expiry() {
        let t0 = Instant::now();
        let c = LocalCoordinator::new(L);
        c.acquire_at(t0, "vm", "a", 0).unwrap();
        c.acquire_at(t0, "vm", "a", 1).unwrap(); // holder moves to 2
        let e = c.acquire_at(t0 + 10 * L, "vm", "b", 1).unwrap_err();
        assert_eq!(
            e,
            WitnessError::Superseded {
                current: 2,
                holder: "a".into()
            }
        );
        assert_eq!(
            c.acquire_at(t0 + 10 * L, "vm", "b", 2).unwrap().generation,
            3
        );
    }

    #[test]
    fn holder_may_always_move_on_and_known_raises_the_floor() {
        let t0 = Instant::now();
        let c = LocalCoordinator::new(L);
        assert_eq!(c.acquire_at(t0, "vm", "a", 0).unwrap().generation, 1);
        assert_eq!(c.acquire_at(t0, "vm", "a", 0).unwrap().generation, 2);
        assert_eq!(c.acquire_at(t0, "vm", "a", 10).unwrap().generation, 11);
        assert_eq!(
            c.renew_at(t0, "vm", "a", 2).unwrap_err(),
            WitnessError::Superseded {
                current: 11,
                holder: "a".into()
            }
        );
        assert_eq!(
            c.renew_at(t0, "vm", "a", 12).unwrap_err(),
            WitnessError::NotHolder { generation: 12 }
        );
        assert_eq!(
            c.renew_at(t0, "vm", "b", 11).unwrap_err(),
            WitnessError::NotHolder { generation: 11 }
        );
        assert_eq!(
            c.renew_at(t0, "nope", "a", 1).unwrap_err(),
            WitnessError::NotHolder { generation: 1 }
        );
        assert!(matches!(
            c.acquire_at(t0, "vm", "a", u64::MAX),
            Err(WitnessError::Invalid(_))
        ));
    }

    #[test]
    fn renewing_an_expired_but_current_lease_is_allowed() {
        let t0 = Instant::now();
        let c = LocalCoordinator::new(L);
        c.acquire_at(t0, "vm", "a", 0).unwrap();
        let g = c.renew_at(t0 + 3 * L, "vm", "a", 1).unwrap();
        assert_eq!(g.valid_until, t0 + 4 * L);
        // And it blocks others again.
        assert!(matches!(
            c.acquire_at(t0 + 3 * L, "vm", "b", 1),
            Err(WitnessError::Denied { .. })
        ));
    }

    #[test]
    fn names_are_validated() {
        let c = LocalCoordinator::new(L);
        let t0 = Instant::now();
        for (vm, host) in [
            ("", "a"),
            ("vm", ""),
            ("v\nm", "a"),
            ("vm", &*"h".repeat(65)),
            (&*"v".repeat(129), "a"),
        ] {
            assert!(
                matches!(c.acquire_at(t0, vm, host, 0), Err(WitnessError::Invalid(_))),
                "{vm:?} {host:?}"
            );
        }
        c.acquire_at(t0, &"v".repeat(128), &"h".repeat(64), 0)
            .unwrap();
    }

    #[test]
    fn dedup_of_a_repeated_acquire() {
        let t0 = Instant::now();
        let mut t = LeaseTable::new(L);
        let s = t.acquire(t0, "vm", "a", 0, Some(77)).unwrap();
        t.apply(s);
        let again = t.acquire(t0 + MS, "vm", "a", 0, Some(77)).unwrap();
        assert_eq!((again.generation, again.durable()), (1, false));
        let other = t.acquire(t0 + MS, "vm", "a", 0, Some(78)).unwrap();
        assert_eq!(other.generation, 2);
    }

    #[test]
    fn restore_assumes_a_full_lease() {
        let t0 = Instant::now();
        let mut records = BTreeMap::new();
        records.insert(
            "vm".to_string(),
            Record {
                generation: 7,
                holder: "a".into(),
                lease_us: 2_000_000,
            },
        );
        let t = LeaseTable::restore(L, records, t0);
        assert!(matches!(
            t.acquire(t0 + 1999 * MS, "vm", "b", 7, None),
            Err(WitnessError::Denied { .. })
        ));
        assert_eq!(
            t.acquire(t0 + 2000 * MS, "vm", "b", 7, None)
                .unwrap()
                .generation,
            8
        );
        assert_eq!(t.acquire(t0, "vm", "a", 0, None).unwrap().generation, 8);
    }

    #[test]
    fn state_file_round_trip_and_corruption() {
        let dir = std::env::temp_dir().join(format!("ax-witness-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("state.json");
        let _ = std::fs::remove_file(&p);
        assert!(load_state(&p).unwrap().is_empty());
        let mut r = BTreeMap::new();
        r.insert(
            "vm-1".to_string(),
            Record {
                generation: 3,
                holder: "b".into(),
                lease_us: 500_000,
            },
        );
        save_state(&p, &r).unwrap();
        assert_eq!(load_state(&p).unwrap(), r);
        assert!(!dir.join("state.json.tmp").exists());
        std::fs::write(&p, "{\"format\":\"ax-witness-1\",\"vms\":{\"vm\":{\"generation\":0,\"holder\":\"a\",\"lease_us\":1}}}").unwrap();
        assert!(matches!(load_state(&p), Err(WitnessError::State { .. })));
        std::fs::write(&p, "garbage").unwrap();
        assert!(matches!(load_state(&p), Err(WitnessError::State { .. })));
        std::fs::write(&p, "{\"format\":\"other\",\"vms\":{}}").unwrap();
        assert!(matches!(load_state(&p), Err(WitnessError::State { .. })));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn wire_round_trips() {
        let reqs = [
            Request {
                op: Op::Acquire,
                id: 1,
                value: 5,
                vm: "vm-1".into(),
                host: "a".into(),
            },
            Request {
                op: Op::Renew,
                id: u64::MAX,
                value: 9,
                vm: "v".repeat(128),
                host: "h".repeat(64),
            },
            Request {
                op: Op::Current,
                id: 3,
                value: 0,
                vm: "vm".into(),
                host: String::new(),
            },
        ];
        for r in reqs {
            let b = r.encode().unwrap();
            assert_eq!(Request::decode(&b).unwrap(), r);
            assert_eq!(Request::peek_id(&b), Some(r.id));
        }
        let resps = [
            Response {
                status: Status::Granted,
                id: 1,
                generation: 2,
                micros: 500_000,
                holder: String::new(),
            },
            Response {
                status: Status::Denied,
                id: 1,
                generation: 2,
                micros: 5,
                holder: "a".into(),
            },
            Response {
                status: Status::Current,
                id: 1,
                generation: 2,
                micros: 0,
                holder: "h".repeat(64),
            },
        ];
        for r in resps {
            assert_eq!(Response::decode(&r.encode()).unwrap(), r);
        }
        // Errors map to responses and back.
        let e = WitnessError::Superseded {
            current: 4,
            holder: "b".into(),
        };
        let r = Response::decode(&Response::from_error(9, &e).encode()).unwrap();
        assert_eq!(
            (r.status, r.generation, r.holder.as_str()),
            (Status::Superseded, 4, "b")
        );
    }

    #[test]
    fn wire_rejects_bad_fields() {
        let good = Request {
            op: Op::Acquire,
            id: 1,
            value: 5,
            vm: "vm".into(),
            host: "a".into(),
        }
        .encode()
        .unwrap();
        let with = |i: usize, v: u8| {
            let mut b = good.clone();
            b[i] = v;
            Request::decode(&b)
        };
        assert!(with(0, 0).is_err());
        assert!(with(4, 9).is_err());
        assert!(with(5, 4).is_err());
        assert!(with(6, 3).is_err());
        assert!(with(7, 0).is_err());
        assert!(with(REQ_HEADER, 0).is_err()); // control character in the VM id
        assert!(with(REQ_HEADER, 0xff).is_err()); // not UTF-8
        assert!(Request::decode(&good[..REQ_HEADER - 1]).is_err());
        let mut cur = Request {
            op: Op::Current,
            id: 1,
            value: 0,
            vm: "vm".into(),
            host: String::new(),
        }
        .encode()
        .unwrap();
        cur[16] = 1;
        assert!(Request::decode(&cur).is_err());
        let resp = Response {
            status: Status::Denied,
            id: 1,
            generation: 2,
            micros: 5,
            holder: "a".into(),
        }
        .encode();
        let mut bad = resp.clone();
        bad[6] = 0; // denied without a holder (and a length mismatch)
        assert!(Response::decode(&bad).is_err());
        let mut bad = resp.clone();
        bad[7] = 1;
        assert!(Response::decode(&bad).is_err());
        let mut bad = resp;
        bad[5] = 8;
        assert!(Response::decode(&bad).is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..260)) {
            let _ = Request::decode(&bytes);
            let _ = Request::peek_id(&bytes);
            let _ = Response::decode(&bytes);
        }

        #[test]
        fn mutated_requests_decode_or_fail_cleanly(
            op in 1u8..=3,
            vm in "[a-z0-9-]{1,128}",
            host in "[a-z0-9.-]{1,64}",
            id in any::<u64>(),
            value in any::<u64>(),
            flips in proptest::collection::vec((0usize..220, any::<u8>()), 0..6),
        ) {
            let op = match op { 1 => Op::Acquire, 2 => Op::Renew, _ => Op::Current };
            let (host, value) = if op == Op::Current { (String::new(), 0) } else { (host, value) };
            let r = Request { op, id, value, vm, host };
            let mut b = r.encode().unwrap();
            prop_assert_eq!(Request::decode(&b).unwrap(), r);
            for (i, v) in flips {
                if let Some(x) = b.get_mut(i) { *x = v; }
            }
            if let Ok(q) = Request::decode(&b) {
                prop_assert_eq!(q.encode().unwrap(), b);
            }
        }

        /// Generations handed out for a VM only grow, and a grant to a different host than the
        /// previous grant happens only once the previous lease expired.
        #[test]
        fn table_generations_grow_and_handover_waits_for_expiry(
            ops in proptest::collection::vec((0u8..3, 0u8..3, 0u64..6, 0u64..400), 1..80),
        ) {
            let t0 = Instant::now();
            let c = LocalCoordinator::new(L);
            let mut now = t0;
            let mut max_gen = 0u64;
            let mut last: Option<(String, Instant)> = None; // holder, its witness-side expiry
            for (op, host, val, dt) in ops {
                now += Duration::from_millis(dt);
                let host = ["a", "b", "c"][usize::from(host)];
                let res = match op {
                    0 => c.acquire_at(now, "vm", host, val.min(max_gen + 1)),
                    1 => c.renew_at(now, "vm", host, val.min(max_gen)),
                    _ => { let _ = c.current_at(now, "vm"); continue; }
                };
                if let Ok(g) = res {
                    prop_assert!(g.generation >= max_gen);
                    if op == 0 { prop_assert!(g.generation > max_gen); }
                    if let Some((h, exp)) = &last {
                        if h != host { prop_assert!(now >= *exp, "handover before expiry"); }
                    }
                    let exp = match &last { Some((h, e)) if h == host => (*e).max(now + L), _ => now + L };
                    last = Some((host.to_string(), exp));
                    max_gen = g.generation;
                }
            }
        }
    }
}
