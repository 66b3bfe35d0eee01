//! Host failure recovery of VMs **not under Nova**, for both engines: when a compute host dies, the
//! survivors restart its level-ha VMs from their newest replicated volume version.
//!
//! Prerequisites: `[coordinator] etcd` (the compare-and-set register that decides who runs a VM, and
//! the catalog of VM definitions that survives the host), `[[peers]]` (the hosts watched), a
//! `[fence]` command (no VM is restarted elsewhere without a successful fence), and a volume target
//! (`[swift]` or `[sheepdog]`) for VMs with a disk. Nova servers (`nova_server`) are left to the Nova
//! path ([`crate::ha`]); FT VMs have their secondary.
//!
//! ## What runs
//! - **Catalog** (every 2 s): each agent claims the register of each of its level-ha VMs (generation
//!   `g → g + 1` with itself as holder, once) and writes the VM's definition under
//!   `{catalog_prefix}{vm}` with `home` = itself; it deletes the entries it wrote for VMs that left
//!   level ha or this host.
//! - **Host watch**: heartbeats with every peer on `ports.host_heartbeat` (the failover crate's
//!   detector, as for the Nova path). When a peer is declared dead, the survivor whose name sorts
//!   first among the hosts it still hears acts: it reads the dead host's catalog entries, fences the
//!   host, and places each VM on the survivor with the most free memory that can hold it ([`place`]:
//!   each survivor's `GET /v1/host` says what it offers — `vm_memory_mib` or `MemAvailable` — minus
//!   the memory of the VMs it runs; ties go to the first name), which **takes it over**
//!   (`POST /v1/takeovers/{vm}` on a peer). A VM no survivor has room for is not taken over; the
//!   recovery says so.
//! - **Takeover** ([`adopt`]): compare-and-set of the VM's register from the generation the dead host
//!   holds to the next, with this host as holder; only the winner restores the newest volume version
//!   into its own VM directory and starts the VM at level ha.
//! - **Restart in place** of a crashed level-ha VM is a compare-and-set too (the holder's own
//!   generation to the next), and a VM whose register moved to another host is never run again here:
//!   its worker (and QEMU) is stopped and the VM is `moved`.
//!
//! ## Why a VM never runs on two hosts
//! A host runs a level-ha VM only under a generation it won (creation, restart in place, takeover),
//! and every win is a compare-and-set at the coordinator, so the register orders all of them. A
//! survivor claims a dead host's VM only after the fence command succeeded, i.e. once the old host is
//! powered off: it cannot act any more in that life. When it comes back, its agent compares each
//! VM's register before running it: a newer generation held by another host means the VM moved (its
//! own claim, made before its death, is older), and a restart in place is itself a compare-and-set
//! from the generation it last saw, so a host rebooted by the fence and a survivor taking over cannot
//! both win: one of the two claims loses and does nothing. No step rests on a timer: the detector
//! only decides *when* to fence, and a false suspicion costs a restart elsewhere (fenced), never two
//! copies.
//!
//! Limitations: a native VM running an uploaded guest ELF is not taken over (the ELF stayed on the
//! dead host). The placement counts each VM's defined memory (QEMU's own overhead is not counted), and a
//! host's `MemAvailable` is read when it is asked, so VMs being started elsewhere at that moment are
//! not seen.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use evacuate::fence::{FenceConfig, Fencer};
use evacuate::hostwatch::{self, HostEvent, PeerSpec};
use failover::coordinator::etcd::{EtcdConfig, EtcdCoordinator};
use failover::coordinator::{host_of, CasOutcome, CasRequest, CoordError, Coordinator};
use policy::Level;
use serde::{Deserialize, Serialize};
use tracing::{error, info, warn, Instrument};

use super::{lock, Daemon, LocalRole, OpError, Shared, VmDef, VmRecordLocal};
use crate::config::Config;

/// How often the catalog is brought up to date.
const SYNC_EVERY: Duration = Duration::from_secs(2);
/// Most catalog entries read at once, and their size in all.
const CATALOG_LIMIT: usize = 10_000;
const CATALOG_CAP: usize = 64 << 20;
/// How often a failed fence is tried again while the host stays dead, and how many times.
const FENCE_RETRY: Duration = Duration::from_secs(5);
const FENCE_ROUNDS: u32 = 60;
/// How long a peer may take to take a VM over (it restores the VM's disk first).
const TAKEOVER_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// Host recoveries kept for the API.
const KEEP_RECOVERIES: usize = 32;

/// One VM in the catalog (`{catalog_prefix}{vm}`, JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CatalogEntry {
    /// The host that runs it.
    pub home: String,
    /// The register generation that host won for it.
    pub claim: u64,
    /// Its definition.
    pub def: VmDef,
    /// Whether it should run.
    pub running: bool,
}

/// What happened to one VM of a failed host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TakeoverVm {
    /// The VM.
    pub vm: String,
    /// The host chosen to run it (empty: no survivor had room; `outcome` says why).
    pub target: String,
    /// `restarted`, or why not.
    pub outcome: String,
}

/// The recovery of one failed host (`GET /v1/recoveries`, `host_failures`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostFailure {
    /// The failed host.
    pub host: String,
    /// When it was declared dead (ms since the epoch).
    pub declared_ms: u64,
    /// How long it had been silent then, ms.
    pub silent_ms: u64,
    /// `reading_catalog`, `fencing`, `fence_failed`, `restarting`, `done`, `gave_up`.
    pub state: String,
    /// What the operator should know.
    pub detail: String,
    /// When the fence succeeded (ms since the epoch).
    pub fenced_ms: Option<u64>,
    /// Its VMs.
    pub vms: Vec<TakeoverVm>,
}

/// What `POST /v1/takeovers/{vm}` takes: the failed host the VM is taken from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TakeoverRequest {
    /// The failed (and fenced) host.
    pub from: String,
}

/// Host-failure recovery of one agent.
#[derive(Debug)]
pub struct HostFail {
    coord: EtcdCoordinator,
    catalog_prefix: String,
    claimant: String,
    fencer: Option<Fencer>,
    /// Peers heard now.
    alive: Mutex<BTreeSet<String>>,
    /// Peers declared dead and not heard since.
    dead: Mutex<BTreeSet<String>>,
    /// Dead peers this host recovers (or recovered) since they died.
    recovering: Mutex<BTreeSet<String>>,
    /// Recoveries, newest last.
    failures: Mutex<Vec<HostFailure>>,
    /// VMs whose restart waits for the coordinator (noted once).
    waiting: Mutex<BTreeSet<String>>,
}

/// The etcd client of `[coordinator]`: TLS files default to the cluster PKI when an endpoint is
/// `https://`.
pub fn etcd_config(cfg: &Config) -> Option<EtcdConfig> {
    let c = cfg.coordinator.as_ref()?;
    let tls = c.etcd.iter().any(|u| u.starts_with("https://"));
    let pki = crate::certs::PkiPaths::in_dir(&cfg.pki_dir, &cfg.host);
    let or_pki = |given: &Option<std::path::PathBuf>, default: std::path::PathBuf| {
        given.clone().or_else(|| tls.then_some(default))
    };
    Some(EtcdConfig {
        endpoints: c.etcd.clone(),
        ca: or_pki(&c.ca, pki.ca),
        cert: or_pki(&c.cert, pki.cert),
        key: or_pki(&c.key, pki.key),
        prefix: c.prefix.clone(),
        timeout: Duration::from_millis(c.timeout_ms),
    })
}

impl HostFail {
    /// Host-failure recovery for `cfg`, when it is configured ([`Config::host_recovery`]).
    pub fn from_config(cfg: &Config) -> Result<Option<HostFail>, String> {
        if !cfg.host_recovery() {
            return Ok(None);
        }
        let Some(etcd) = etcd_config(cfg) else {
            return Ok(None);
        };
        let coord = EtcdCoordinator::new(etcd).map_err(|e| format!("[coordinator]: {e}"))?;
        let fencer = cfg.fence.as_ref().map(|f| {
            Fencer::new(FenceConfig {
                command: vec!["sh".into(), "-c".into(), f.command.clone()],
                timeout_secs: f.timeout_ms.div_ceil(1000).max(1),
                attempts: 2,
            })
        });
        if fencer.is_none() {
            warn!(
                "host-failure recovery without a [fence] command: a failed host's VMs will be reported, never restarted elsewhere"
            );
        }
        Ok(Some(HostFail {
            coord,
            catalog_prefix: cfg
                .coordinator
                .as_ref()
                .map(|c| c.catalog_prefix.clone())
                .unwrap_or_default(),
            claimant: format!("{}#{}", cfg.host, failover::heartbeat::new_incarnation()),
            fencer,
            alive: Mutex::new(BTreeSet::new()),
            dead: Mutex::new(BTreeSet::new()),
            recovering: Mutex::new(BTreeSet::new()),
            failures: Mutex::new(Vec::new()),
            waiting: Mutex::new(BTreeSet::new()),
        }))
    }

    /// The host recoveries, oldest first.
    pub fn failures(&self) -> Vec<HostFailure> {
        lock(&self.failures).clone()
    }

    fn key(&self, vm: &str) -> String {
        format!("{}{vm}", self.catalog_prefix)
    }

    async fn catalog(&self) -> Result<Vec<CatalogEntry>, CoordError> {
        let kvs = self
            .coord
            .kv_prefix(&self.catalog_prefix, CATALOG_LIMIT, CATALOG_CAP)
            .await?;
        Ok(kvs
            .into_iter()
            .filter_map(
                |kv| match serde_json::from_slice::<CatalogEntry>(&kv.value) {
                    Ok(e) if kv.key == self.key(&e.def.name) => Some(e),
                    Ok(_) => {
                        warn!(
                            key = kv.key,
                            "catalog entry under another VM's key: ignored"
                        );
                        None
                    }
                    Err(e) => {
                        warn!(key = kv.key, error = %e, "unreadable catalog entry: ignored");
                        None
                    }
                },
            )
            .collect())
    }

    async fn cas(&self, vm: &str, expected: u64) -> Result<CasOutcome, CoordError> {
        self.coord
            .cas(&CasRequest {
                vm: vm.to_string(),
                claimant: self.claimant.clone(),
                expected,
                members: Vec::new(),
                witness: 0,
            })
            .await
    }

    fn record(&self, f: HostFailure) {
        let mut all = lock(&self.failures);
        match all
            .iter_mut()
            .rev()
            .find(|x| x.host == f.host && x.declared_ms == f.declared_ms)
        {
            Some(x) => *x = f,
            None => {
                all.push(f);
                let n = all.len();
                if n > KEEP_RECOVERIES {
                    all.drain(..n - KEEP_RECOVERIES);
                }
            }
        }
    }
}

/// Whether `rec` is one this module looks after: a level-ha VM defined here, not a Nova server's.
fn looked_after(s: &Shared, rec: &VmRecordLocal) -> bool {
    rec.role == LocalRole::Primary
        && rec.def.nova_server.is_none()
        && s.store
            .vm(&rec.def.name)
            .ok()
            .flatten()
            .is_some_and(|p| p.current == Level::Ha && p.desired == Level::Ha)
}

/// What the register says of a VM here.
enum Owner {
    /// This host holds it at this generation.
    Here(u64),
    /// Another host took it over.
    Moved { holder: String, generation: u64 },
}

/// Makes sure this host holds `rec`'s register: claims it when nobody does, or when the VM arrived
/// here without a claim (created, migrated in) — `restart` claims a new generation even when this
/// host holds it already (a restart in place). A VM this host claimed before and another host holds
/// at a newer generation has moved.
async fn claim(
    hf: &HostFail,
    s: &Shared,
    rec: &VmRecordLocal,
    restart: bool,
) -> Result<Owner, CoordError> {
    let vm = rec.def.name.as_str();
    let me = s.cfg.host.as_str();
    for _ in 0..4 {
        let (generation, holder) = hf
            .coord
            .read(vm)
            .await?
            .map_or((0, String::new()), |r| (r.generation, r.holder));
        let mine = generation > 0 && host_of(&holder) == me;
        if !mine && rec.claim > 0 && generation > rec.claim {
            return Ok(Owner::Moved { holder, generation });
        }
        if mine && !restart {
            if rec.claim != generation {
                let _ = s.update(vm, |r| r.claim = generation);
            }
            return Ok(Owner::Here(generation));
        }
        match hf.cas(vm, generation).await? {
            CasOutcome::Won { generation } => {
                let _ = s.update(vm, |r| r.claim = generation);
                return Ok(Owner::Here(generation));
            }
            // Somebody moved it between the read and the claim: read again.
            CasOutcome::Lost { .. } => continue,
            CasOutcome::Relearning { .. } => {
                return Err(CoordError::Relearning(vm.to_string()));
            }
        }
    }
    Err(CoordError::Failed(format!(
        "VM {vm:?}: the register kept changing under this host's claims"
    )))
}

/// The VM moved to `holder`: it never runs here again.
async fn moved(s: &Shared, vm: &str, holder: &str, generation: u64) {
    let host = host_of(holder).to_string();
    s.stop_worker(vm).await;
    s.warn_note(
        vm,
        format!(
            "{host} took this VM over (generation {generation}) while this host was declared dead: it does not run here any more"
        ),
    );
    s.mark_down(
        vm,
        format!("moved: taken over by {host} (generation {generation})"),
    );
}

/// Before a crashed level-ha VM is restarted in place: `true` when this host may (it won the next
/// generation). `false`: the VM moved (now marked so), or the coordinator does not answer yet (the
/// monitor asks again).
pub async fn may_restart(s: &Shared, rec: &VmRecordLocal) -> bool {
    let Some(hf) = &s.hostfail else {
        return true;
    };
    if !looked_after(s, rec) {
        return true;
    }
    let vm = rec.def.name.as_str();
    match claim(hf, s, rec, true).await {
        Ok(Owner::Here(_)) => {
            lock(&hf.waiting).remove(vm);
            true
        }
        Ok(Owner::Moved { holder, generation }) => {
            moved(s, vm, &holder, generation).await;
            false
        }
        Err(e) => {
            if lock(&hf.waiting).insert(vm.to_string()) {
                s.warn_note(
                    vm,
                    format!(
                        "not restarted yet: the coordinator must first confirm that this host still owns the VM ({e})"
                    ),
                );
            }
            false
        }
    }
}

/// Brings the catalog up to date with this host's VMs; stops the VMs that moved away.
async fn sync(d: &Daemon, hf: &HostFail) -> Result<(), CoordError> {
    let s = &d.shared;
    let me = s.cfg.host.as_str();
    let entries: BTreeMap<String, CatalogEntry> = hf
        .catalog()
        .await?
        .into_iter()
        .map(|e| (e.def.name.clone(), e))
        .collect();
    let mut wanted = BTreeSet::new();
    for rec in s.records() {
        let vm = rec.def.name.clone();
        if !looked_after(s, &rec)
            || rec
                .down_reason
                .as_deref()
                .is_some_and(|r| r.starts_with("moved"))
        {
            continue;
        }
        // The register is read only when the catalog does not already list the VM here under the
        // generation this host won: no coordinator request per VM in steady state.
        let listed = entries
            .get(&vm)
            .is_some_and(|e| e.home == me && rec.claim > 0 && e.claim == rec.claim);
        let generation = if listed {
            rec.claim
        } else {
            match claim(hf, s, &rec, false).await? {
                Owner::Here(g) => g,
                Owner::Moved { holder, generation } => {
                    moved(s, &vm, &holder, generation).await;
                    continue;
                }
            }
        };
        wanted.insert(vm.clone());
        let mut def = rec.def.clone();
        def.output_port = 0;
        let entry = CatalogEntry {
            home: me.to_string(),
            claim: generation,
            def,
            running: rec.running,
        };
        if entries.get(&vm) != Some(&entry) {
            let value =
                serde_json::to_vec(&entry).map_err(|e| CoordError::Invalid(e.to_string()))?;
            hf.coord.kv_put(&hf.key(&vm), &value).await?;
            info!(vm, generation, "catalog: published");
        }
    }
    for (vm, e) in &entries {
        if e.home == me && !wanted.contains(vm) {
            // Left level ha or this host (deleted, migrated away, moved): no longer ours to list.
            hf.coord.kv_delete(&hf.key(vm)).await?;
            info!(vm, "catalog: withdrawn");
        }
    }
    Ok(())
}

/// Takes `vm` over from the failed (and fenced) host `from`: wins its register, restores its newest
/// volume version and starts it here at level ha. The VM's view.
pub async fn adopt(d: &Daemon, vm: &str, from: &str) -> Result<VmRecordLocal, OpError> {
    let s = &d.shared;
    let Some(hf) = &s.hostfail else {
        return Err(OpError::Conflict(
            "host-failure recovery is off on this host (it needs [coordinator] and [[peers]])"
                .into(),
        ));
    };
    let unavailable = |e: CoordError| OpError::Unavailable(format!("coordinator: {e}"));
    let _g = s.create.lock().await;
    if let Some(rec) = s.record(vm) {
        return Err(OpError::Conflict(format!(
            "a VM named {vm:?} is defined on this host already ({})",
            rec.down_reason.as_deref().unwrap_or("running")
        )));
    }
    let entry = hf
        .catalog()
        .await
        .map_err(unavailable)?
        .into_iter()
        .find(|e| e.def.name == vm)
        .ok_or_else(|| OpError::NotFound(vm.to_string()))?;
    if entry.home != from {
        return Err(OpError::Conflict(format!(
            "{vm} is listed on {} now, not on {from}",
            entry.home
        )));
    }
    // What this host needs before it claims the VM: a claim it cannot follow with a start would
    // leave the VM nowhere.
    let mut def = entry.def.clone();
    if def.guest_elf_sha256.is_some() {
        return Err(OpError::Conflict(format!(
            "{vm} runs a guest ELF uploaded to {from}: it is not on this host (define it again with its ELF)"
        )));
    }
    if let Some(q) = &mut def.qemu {
        // Every disk is restored into this host's VM directory (`disk<i>.img`).
        let dir = s.vm_dir(vm);
        let paths = q
            .image
            .iter_mut()
            .chain(q.disks.iter_mut().map(|d| &mut d.path));
        for (i, path) in paths.enumerate() {
            *path = dir.join(format!("disk{i}.img"));
        }
        let mut shape = q.clone();
        shape.image = None;
        shape.disks.clear();
        shape
            .check_host()
            .map_err(|e| OpError::Conflict(format!("{vm} cannot run on this host: {e}")))?;
    }
    if def.has_disk() && s.volumes.is_none() {
        return Err(OpError::Conflict(format!(
            "{vm} has a disk and this host has no volume target ([swift] or [sheepdog]) to restore it from"
        )));
    }
    let (generation, holder) = hf
        .coord
        .read(vm)
        .await
        .map_err(unavailable)?
        .map_or((0, String::new()), |r| (r.generation, r.holder));
    if generation > 0 && host_of(&holder) != from {
        return Err(OpError::Conflict(format!(
            "{vm} is held by {holder} at generation {generation}, not by {from}: taken over already"
        )));
    }
    let won = match hf.cas(vm, generation).await.map_err(unavailable)? {
        CasOutcome::Won { generation } => generation,
        CasOutcome::Lost { current, holder } => {
            return Err(OpError::Conflict(format!(
                "{vm}: {holder} won generation {current} first"
            )))
        }
        CasOutcome::Relearning { .. } => {
            return Err(OpError::Unavailable(format!(
                "{vm}: the coordinator is re-learning"
            )))
        }
    };
    // The VM is this host's from here on: whatever fails is recorded on it, nothing is dropped.
    def.output_port = s.free_output_port()?;
    let dir = s.vm_dir(vm);
    std::fs::create_dir_all(&dir)
        .map_err(|e| OpError::Internal(format!("{}: {e}", dir.display())))?;
    let restored = if def.has_disk() {
        let r = match &def.qemu {
            Some(q) => super::volume::restore_qemu_disks(s, vm, &q.clone()).await,
            None => super::volume::restore_disk(s, &mut def).await,
        };
        Some(r)
    } else {
        None
    };
    let mut rec = VmRecordLocal::new(
        def,
        LocalRole::Primary,
        entry.running,
        s.free_slot()?,
        false,
    );
    rec.claim = won;
    let failed = match &restored {
        Some(Err(e)) => Some(format!(
            "crashed: taken over from {from}, but the restore failed: {e}"
        )),
        _ => None,
    };
    rec.down_reason = failed.clone();
    s.insert(rec.clone())?;
    s.counters
        .takeovers
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    // The catalog lists it here at once (the next sync would too): a returning `from` finds it moved.
    let mut listed = rec.def.clone();
    listed.output_port = 0;
    let entry_here = CatalogEntry {
        home: s.cfg.host.clone(),
        claim: won,
        def: listed,
        running: entry.running,
    };
    if let Ok(value) = serde_json::to_vec(&entry_here) {
        if let Err(e) = hf.coord.kv_put(&hf.key(vm), &value).await {
            warn!(vm, error = %e, "catalog: not updated yet (the next sync does it)");
        }
    }
    let from_version = match &restored {
        Some(Ok(v)) => format!(", disk restored from volume version {v}"),
        _ => String::new(),
    };
    s.warn_note(
        vm,
        format!("taken over from {from} after that host failed and was fenced (generation {won}{from_version})"),
    );
    if let Some(why) = failed {
        error!(vm, "{why}");
        s.warn_note(
            vm,
            format!("{why}; start it with `axctl vm start {vm}` once the volume is readable"),
        );
    } else if entry.running {
        s.spawn_worker(vm)?;
        s.note(vm, "started");
    }
    if let Err(e) = d.set_level(vm, Level::Ha) {
        s.warn_note(vm, format!("could not set level ha: {e}"));
    }
    Ok(s.record(vm).unwrap_or(rec))
}

/// A host's memory for placement ([`HostMemory::of`], `GET /v1/host`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostMemory {
    /// What the host offers to VMs, MiB: `vm_memory_mib`, else `MemAvailable`; `None` when unreadable.
    pub offered_mib: Option<u64>,
    /// The memory of the VMs it runs or restarts, MiB.
    pub promised_mib: u64,
}

impl HostMemory {
    /// This host's: the VMs counted are those that should run here (`running`), whatever their
    /// state now (a crashed level-ha VM is restarted in place; its memory stays promised).
    pub fn of(s: &Shared) -> HostMemory {
        let offered_mib = s.cfg.vm_memory_mib.or_else(|| {
            std::fs::read_to_string("/proc/meminfo")
                .ok()
                .and_then(|t| mem_available_mib(&t))
        });
        let promised_mib = s
            .records()
            .iter()
            .filter(|r| r.running)
            .map(|r| r.def.memory_mib)
            .sum();
        HostMemory {
            offered_mib,
            promised_mib,
        }
    }

    /// What is left for another VM, MiB (never below 0).
    pub fn free_mib(&self) -> Option<u64> {
        self.offered_mib
            .map(|o| o.saturating_sub(self.promised_mib))
    }
}

/// `MemAvailable` of a `/proc/meminfo` text, MiB.
fn mem_available_mib(meminfo: &str) -> Option<u64> {
    meminfo.lines().find_map(|l| {
        let rest = l.strip_prefix("MemAvailable:")?;
        let kb: u64 = rest.trim().strip_suffix("kB")?.trim().parse().ok()?;
        Some(kb / 1024)
    })
}

/// Why a VM of a failed host was placed nowhere.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlaceError {
    /// No survivor has the memory.
    #[error("no survivor has room for its {need_mib} MiB of memory ({hosts})")]
    NoRoom {
        /// The VM's memory.
        need_mib: u64,
        /// Each survivor's free memory, or why it is unknown.
        hosts: String,
    },
}

/// Chooses the survivor for a VM of `need_mib` MiB: the one with the most free memory that can hold
/// it, ties by host name. `free` is each survivor's free memory (`None`: it did not say, and is not
/// chosen); the chosen host's entry is reduced by `need_mib`, so that the next VM sees it.
pub fn place(
    free: &mut BTreeMap<String, Option<u64>>,
    need_mib: u64,
) -> Result<String, PlaceError> {
    let chosen = free
        .iter()
        .filter_map(|(h, f)| f.filter(|f| *f >= need_mib).map(|f| (h, f)))
        // The most free memory; among equals the first name (max_by_key keeps the last maximum,
        // so names compare reversed).
        .max_by(|(ha, fa), (hb, fb)| fa.cmp(fb).then_with(|| hb.cmp(ha)))
        .map(|(h, _)| h.clone());
    match chosen {
        Some(h) => {
            if let Some(Some(f)) = free.get_mut(&h) {
                *f -= need_mib;
            }
            Ok(h)
        }
        None => Err(PlaceError::NoRoom {
            need_mib,
            hosts: if free.is_empty() {
                "no survivor answered".into()
            } else {
                free.iter()
                    .map(|(h, f)| match f {
                        Some(f) => format!("{h}: {f} MiB free"),
                        None => format!("{h}: memory unknown"),
                    })
                    .collect::<Vec<_>>()
                    .join(", ")
            },
        }),
    }
}

/// Recovers the VMs of the dead host `host` (this host acts for the survivors).
async fn recover(d: Daemon, hf: Arc<HostFail>, host: String, silent: Duration) {
    let s = &d.shared;
    let mut f = HostFailure {
        host: host.clone(),
        declared_ms: policy::store::now_ms(),
        silent_ms: silent.as_millis() as u64,
        state: "reading_catalog".into(),
        detail: String::new(),
        fenced_ms: None,
        vms: Vec::new(),
    };
    hf.record(f.clone());
    let entries = loop {
        match hf.catalog().await {
            Ok(all) => {
                break all
                    .into_iter()
                    .filter(|e| e.home == host)
                    .collect::<Vec<_>>()
            }
            Err(e) => {
                f.detail = format!("the coordinator does not answer: {e}; trying again");
                hf.record(f.clone());
                warn!(host, error = %e, "host failure: cannot read the catalog yet");
                if !lock(&hf.dead).contains(&host) {
                    f.state = "gave_up".into();
                    f.detail = format!("{host} came back before its catalog could be read");
                    hf.record(f);
                    return;
                }
                tokio::time::sleep(FENCE_RETRY).await;
            }
        }
    };
    if entries.is_empty() {
        f.state = "done".into();
        f.detail =
            format!("{host} had no level-ha VM in the catalog: nothing to restart, not fenced");
        info!(host, "{}", f.detail);
        hf.record(f);
        return;
    }
    let names: Vec<String> = entries.iter().map(|e| e.def.name.clone()).collect();
    let Some(fencer) = &hf.fencer else {
        f.state = "gave_up".into();
        f.detail = format!(
            "{host} failed; its VMs {names:?} are NOT restarted: no [fence] command is configured, and a VM is never started twice"
        );
        error!(host, "{}", f.detail);
        hf.record(f);
        return;
    };
    f.state = "fencing".into();
    hf.record(f.clone());
    let mut round = 0;
    loop {
        round += 1;
        match fencer.fence(&host).await {
            Ok(done) => {
                f.fenced_ms = Some(policy::store::now_ms());
                info!(host, took_ms = done.took.as_millis() as u64, "fenced");
                break;
            }
            Err(e) => {
                f.state = "fence_failed".into();
                f.detail = format!("{e}; its VMs {names:?} wait (round {round}/{FENCE_ROUNDS})");
                error!(host, "{}", f.detail);
                hf.record(f.clone());
                if round >= FENCE_ROUNDS || !lock(&hf.dead).contains(&host) {
                    f.state = "gave_up".into();
                    hf.record(f);
                    return;
                }
                tokio::time::sleep(FENCE_RETRY).await;
            }
        }
    }
    f.state = "restarting".into();
    f.detail = String::new();
    hf.record(f.clone());
    // Placement by free memory: each survivor's (its `GET /v1/host`), minus the VMs placed here.
    let mut free: BTreeMap<String, Option<u64>> = BTreeMap::new();
    free.insert(s.cfg.host.clone(), HostMemory::of(s).free_mib());
    let alive: Vec<String> = lock(&hf.alive).iter().cloned().collect();
    for p in alive {
        if let Some(c) = s.peer(&p) {
            if let Ok(v) = c.get::<super::actuator::HostView>("/v1/host").await {
                free.insert(p, v.mem_free_mib);
            }
        }
    }
    for e in entries {
        let vm = e.def.name.clone();
        let target = match place(&mut free, e.def.memory_mib) {
            Ok(t) => t,
            Err(why) => {
                error!(vm, error = %why, "host failure: VM not taken over");
                f.vms.push(TakeoverVm {
                    vm,
                    target: String::new(),
                    outcome: format!("failed: {why}"),
                });
                hf.record(f.clone());
                continue;
            }
        };
        let outcome = if target == s.cfg.host {
            adopt(&d, &vm, &host)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        } else {
            let req = TakeoverRequest { from: host.clone() };
            match s.peer(&target) {
                // The target restores the disk before it answers.
                Some(c) => c
                    .call_within::<serde_json::Value>(
                        reqwest::Method::POST,
                        &format!("/v1/takeovers/{vm}"),
                        Some(&req),
                        Some(TAKEOVER_TIMEOUT),
                    )
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string()),
                None => Err(format!("{target} is not a peer")),
            }
        };
        let outcome = match outcome {
            Ok(()) => "restarted".to_string(),
            Err(e) => {
                error!(vm, target, error = %e, "host failure: VM not taken over");
                format!("failed: {e}")
            }
        };
        f.vms.push(TakeoverVm {
            vm,
            target,
            outcome,
        });
        hf.record(f.clone());
    }
    f.state = "done".into();
    hf.record(f);
}

/// Runs host-failure recovery until `stop`: the catalog, the host watch, recoveries.
pub async fn run(d: Daemon, mut stop: tokio::sync::watch::Receiver<bool>) {
    let s = Arc::clone(&d.shared);
    let Some(hf) = s.hostfail.clone() else {
        return;
    };
    let cfg = &s.cfg;
    let ports: BTreeMap<String, (u16, u16)> = cfg.host_heartbeat_ports().into_iter().collect();
    let peers: Vec<PeerSpec> = cfg
        .peers
        .iter()
        .map(|p| {
            let (here, there) = ports[&p.name];
            PeerSpec {
                name: p.name.clone(),
                local: std::net::SocketAddr::new(cfg.addresses.hb, here),
                addr: std::net::SocketAddr::new(p.hb, there),
            }
        })
        .collect();
    let (_watch, mut events) = match hostwatch::watch(
        &cfg.host,
        &peers,
        Duration::from_millis(cfg.ha.host_interval_ms),
        Duration::from_millis(cfg.ha.host_timeout_ms),
    ) {
        Ok(w) => w,
        Err(e) => {
            error!(error = %e, "host-failure recovery cannot watch the peers");
            return;
        }
    };
    info!(
        peers = peers.len(),
        "host-failure recovery: watching the peers"
    );
    let mut tick = tokio::time::interval(SYNC_EVERY);
    let mut sync_error = false;
    let stopped = async move {
        let _ = stop.wait_for(|s| *s).await;
    };
    tokio::pin!(stopped);
    loop {
        tokio::select! {
            () = &mut stopped => return,
            _ = tick.tick() => {
                match sync(&d, &hf).await {
                    Ok(()) if sync_error => {
                        sync_error = false;
                        info!("catalog: the coordinator answers again");
                    }
                    Ok(()) => {}
                    Err(e) if !sync_error => {
                        sync_error = true;
                        warn!(error = %e, "catalog: cannot bring it up to date (the coordinator does not answer)");
                    }
                    Err(_) => {}
                }
            }
            ev = events.recv() => {
                let Some(ev) = ev else { return };
                match ev {
                    HostEvent::Up { host } | HostEvent::Back { host } => {
                        lock(&hf.alive).insert(host.clone());
                        lock(&hf.recovering).remove(&host);
                        if lock(&hf.dead).remove(&host) {
                            info!(host, "host heard again");
                        }
                    }
                    HostEvent::NeverHeard { host } => {
                        lock(&hf.alive).remove(&host);
                    }
                    HostEvent::Dead { host, silent_for, .. } => {
                        lock(&hf.alive).remove(&host);
                        lock(&hf.dead).insert(host.clone());
                        // Every dead host nobody here recovers yet is looked at again: the survivor
                        // that was to act for an earlier one may have died since.
                        let alive = lock(&hf.alive).clone();
                        let dead: Vec<String> = lock(&hf.dead).iter().cloned().collect();
                        for h in dead {
                            if lock(&hf.recovering).contains(&h) {
                                continue;
                            }
                            if crate::ha::acts_for(&cfg.host, &alive, &h) {
                                lock(&hf.recovering).insert(h.clone());
                                warn!(host = h, silent_ms = silent_for.as_millis() as u64, "host declared dead: recovering its VMs");
                                tokio::spawn(
                                    recover(d.clone(), Arc::clone(&hf), h, silent_for)
                                        .instrument(tracing::info_span!("host_failure")),
                                );
                            } else if h == host {
                                info!(host, "host declared dead: another survivor recovers its VMs");
                            }
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hosts(v: &[(&str, Option<u64>)]) -> BTreeMap<String, Option<u64>> {
        v.iter().map(|(h, f)| (h.to_string(), *f)).collect()
    }

    #[test]
    fn placement_takes_the_survivor_with_the_most_free_memory_that_holds_the_vm() {
        let mut free = hosts(&[
            ("host-b", Some(1000)),
            ("host-c", Some(3000)),
            ("host-d", None),
        ]);
        // The most free memory wins; what is placed counts for the next VM.
        assert_eq!(place(&mut free, 2000).unwrap(), "host-c");
        assert_eq!(free["host-c"], Some(1000));
        // 1000 and 1000: a tie goes to the first name.
        assert_eq!(place(&mut free, 500).unwrap(), "host-b");
        assert_eq!(place(&mut free, 600).unwrap(), "host-c");
        // host-b 500, host-c 400, host-d unknown: 700 fits nowhere, and the error says why.
        let err = place(&mut free, 700).unwrap_err();
        assert_eq!(
            err.to_string(),
            "no survivor has room for its 700 MiB of memory (host-b: 500 MiB free, host-c: 400 MiB \
             free, host-d: memory unknown)"
        );
        assert_eq!(
            free,
            hosts(&[
                ("host-b", Some(500)),
                ("host-c", Some(400)),
                ("host-d", None)
            ])
        );
        // Exactly full is room.
        assert_eq!(place(&mut free, 500).unwrap(), "host-b");
        assert_eq!(free["host-b"], Some(0));
        assert!(matches!(
            place(&mut BTreeMap::new(), 1),
            Err(PlaceError::NoRoom { hosts, .. }) if hosts == "no survivor answered"
        ));
    }

    #[test]
    fn placement_is_the_same_whatever_order_the_hosts_answered_in() {
        let a = hosts(&[("b", Some(100)), ("a", Some(100)), ("c", Some(100))]);
        let picks = |mut f: BTreeMap<String, Option<u64>>| -> Vec<String> {
            (0..3).map(|_| place(&mut f, 100).unwrap()).collect()
        };
        assert_eq!(picks(a), ["a", "b", "c"]);
    }

    #[test]
    fn free_memory_is_what_is_offered_minus_what_is_promised() {
        let info = "MemTotal:       16318464 kB\nMemFree:         1203400 kB\nMemAvailable:    8388608 kB\n";
        assert_eq!(mem_available_mib(info), Some(8192));
        assert_eq!(mem_available_mib("MemTotal: 1 kB\n"), None);
        assert_eq!(mem_available_mib("MemAvailable: lots\n"), None);
        let m = HostMemory {
            offered_mib: Some(8192),
            promised_mib: 1024,
        };
        assert_eq!(m.free_mib(), Some(7168));
        let over = HostMemory {
            offered_mib: Some(512),
            promised_mib: 1024,
        };
        assert_eq!(over.free_mib(), Some(0));
        let unknown = HostMemory {
            offered_mib: None,
            promised_mib: 0,
        };
        assert_eq!(unknown.free_mib(), None);
    }
}
