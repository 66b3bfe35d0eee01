//! Volume replication of the daemon's VMs (levels ha and ft) to Swift or Sheepdog.
//!
//! `none → ha` starts it (`start_volume_replication` marks the VM's record), `→ none` stops it. A
//! replicator task (span `volume`) takes each marked VM in turn every `[volume] interval_s`, or at once
//! when asked (`POST /v1/vms/{vm}/volume/replicate`, and right after the level change):
//!
//! 1. the VM's worker copies the disk, crash-consistent, to `vms/<vm>/volume.snap` while the guest runs
//!    (the block device logs the writes that land during the copy and the worker copies those again under
//!    the device lock: the guest's I/O waits only for that re-copy);
//! 2. [`evacuate::volume::replicate`] uploads the chunks that changed since the previous version (4 MiB,
//!    SHA-256 and MD5 per chunk, Swift static large objects with ETags checked, or a Sheepdog VDI) and
//!    then the version's manifest: a listed version is always whole;
//! 3. versions beyond `[volume] keep` are pruned.
//!
//! The status (last version, when, what it cost, the last error, live progress) is kept in
//! `vms/<vm>/volume.json` and shown by `GET /v1/vms/{vm}` and `axctl vm show`. A VM created with
//! `restore_volume` starts from the newest version instead of an empty disk (another host's replica of
//! a lost host's VM).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use evacuate::auth::{AuthError, Token, TokenSource};
use evacuate::keystone::{Keystone, KeystoneSettings};
use evacuate::volume::sheepdog::SheepdogBackend;
use evacuate::volume::swift::{SwiftBackend, SwiftConfig, TempAuth};
use evacuate::volume::{self, Changes, Progress, ReplicateOptions};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::{LocalRole, OpError, Shared};
use crate::config::Config;
use crate::control::{DiskChanges, DiskSnapshotInfo, WorkerRequest};

/// A VM's volume replication, as the API shows it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct VolumeStatus {
    /// Where versions go (`swift:<container>`, `sheepdog:<gateway>,<gateway>…`).
    pub target: String,
    /// The image name at the target (the VM's name).
    pub image: String,
    /// Newest version stored.
    pub version: Option<u64>,
    /// When it was taken (ms since the Unix epoch).
    pub last_ok_ms: Option<u64>,
    /// What the last successful replication did.
    pub last: Option<LastReplication>,
    /// Why the last attempt failed (cleared by the next success).
    pub last_error: Option<String>,
    /// The replication running now.
    pub running: Option<RunningReplication>,
    /// Replications tried (each ends in a new version or in `last_error`).
    #[serde(default)]
    pub attempts: u64,
}

/// What one replication did.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct LastReplication {
    /// Disk size.
    pub bytes: u64,
    /// Chunks in the image.
    pub chunks: u64,
    /// Chunks that changed since the previous version.
    pub changed: u64,
    /// Bytes sent to the target.
    pub bytes_uploaded: u64,
    /// The whole replication (snapshot, upload, prune), ms.
    pub elapsed_ms: u64,
    /// The local snapshot.
    pub snapshot: DiskSnapshotInfo,
    /// Versions pruned after it.
    pub pruned: Vec<u64>,
    /// How the changed chunks were found: `write log: N chunks since version V` or `hashes: why`
    /// (for a VM of several disks, each disk's, `disk<i>: …` joined by `; `).
    #[serde(default)]
    pub change_tracking: String,
    /// A VM of several disks: the version of each disk's image that makes this VM version (the
    /// totals above are over all disks). Empty for one disk.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<DiskVersion>,
}

/// The image name of disk `i` of `vm` at the target: disk 0 keeps the VM's name (what ax used before
/// it replicated more than one disk, so those versions stay valid), disk `i` ≥ 1 is
/// `<vm>.AX-disk<i>` — upper case, which no VM name has, so it is never another VM's image.
pub fn disk_image(vm: &str, i: usize) -> String {
    if i == 0 {
        vm.to_string()
    } else {
        format!("{vm}.AX-disk{i}")
    }
}

/// The image whose versions are the versions of a VM of several disks: version N's content is a
/// [`VersionSet`] (JSON).
pub fn set_image(vm: &str) -> String {
    format!("{vm}.AX-set")
}

/// One version of a VM of several disks: the version of each disk's image, all taken at the same
/// instant (one QMP transaction). Stored only after every disk's version is: a listed set is whole.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct VersionSet {
    /// Disk `i`'s image and version, in disk order.
    pub disks: Vec<DiskVersion>,
}

/// One disk's part of a VM version.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct DiskVersion {
    /// The disk's image at the target ([`disk_image`]).
    pub image: String,
    /// Its version.
    pub version: u64,
}

/// How many disks of `def` are replicated: every disk of a QEMU VM, the one disk of a native VM.
fn disk_count(def: &super::VmDef) -> usize {
    match &def.qemu {
        Some(q) => q.all_disks().len().max(1),
        None => 1,
    }
}

/// Disk `i`'s local files in the VM's directory: its snapshot and its changed-chunk map (disk 0's
/// are the names ax always used).
fn disk_files(dir: &Path, i: usize) -> (PathBuf, PathBuf) {
    if i == 0 {
        (dir.join("volume.snap"), dir.join("volume.changes"))
    } else {
        (
            dir.join(format!("volume.disk{i}.snap")),
            dir.join(format!("volume.disk{i}.changes")),
        )
    }
}

/// The `since` token of a snapshot request: the maps' common token when every disk's map is up to
/// date with it and holds no chunk still pending from a version that was not stored (those are not
/// in a copy of the changed chunks alone); otherwise none, and the worker copies every disk whole.
fn common_token(maps: &[Option<ChangeMap>]) -> Option<u64> {
    let first = maps.first()?.as_ref()?;
    maps.iter()
        .all(|m| {
            m.as_ref()
                .is_some_and(|m| m.pending.is_empty() && m.token == first.token)
        })
        .then_some(first.token)
}

/// The persistent changed-chunk map of a VM, `vms/<vm>/volume.changes`: the 4 MiB chunks written since
/// version `base_version` was taken, as the worker's block device reported them up to the disk snapshot
/// whose token is `token`. It survives agent restarts (the worker, which keeps the live write log,
/// survives them too); a worker that restarted (VM restarted or moved) starts a new log, which no
/// longer follows the map, and the next version hashes the whole disk.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ChangeMap {
    /// The version the pending chunks are relative to.
    pub base_version: u64,
    /// The token of the snapshot the map is up to date with.
    pub token: u64,
    /// Chunk size (4 MiB).
    pub chunk_size: u64,
    /// Chunks written since `base_version`, ascending.
    pub pending: Vec<u64>,
}

/// How the next version finds its changed chunks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChangePlan {
    /// Read only `pending`, relative to version `base` (when it is still the newest).
    WriteLog {
        /// The version the chunks are relative to.
        base: u64,
        /// The chunks to read.
        pending: Vec<u64>,
    },
    /// Read and hash the whole snapshot.
    Hashes {
        /// Why the write log cannot be used.
        why: String,
    },
}

/// Decides from the stored map and the snapshot's write log how the next version finds its changes.
pub fn plan_changes(map: Option<&ChangeMap>, snap: Option<&DiskChanges>) -> ChangePlan {
    let hashes = |why: &str| ChangePlan::Hashes { why: why.into() };
    let Some(c) = snap else {
        return hashes("the worker reported no write log");
    };
    if c.chunk_size != volume::CHUNK_SIZE {
        return hashes("the write log's chunk size is not the replication's");
    }
    let Some(m) = map else {
        return hashes("no changed-chunk map (a first version, or the map was lost)");
    };
    if m.chunk_size != volume::CHUNK_SIZE {
        return hashes("the changed-chunk map has another chunk size");
    }
    if c.since != Some(m.token) {
        return hashes(
            "the block device's write log does not follow the changed-chunk map (the VM's worker \
             restarted or the VM moved since)",
        );
    }
    let mut pending: Vec<u64> = m.pending.iter().chain(&c.chunks).copied().collect();
    pending.sort_unstable();
    pending.dedup();
    ChangePlan::WriteLog {
        base: m.base_version,
        pending,
    }
}

fn read_change_map(path: &Path) -> Option<ChangeMap> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            warn!(path = %path.display(), error = %e, "changed-chunk map unreadable");
            return None;
        }
    };
    serde_json::from_slice(&bytes)
        .map_err(|e| warn!(path = %path.display(), error = %e, "changed-chunk map unparsable"))
        .ok()
}

fn write_change_map(path: &Path, map: Option<&ChangeMap>) -> Result<(), String> {
    match map {
        Some(m) => serde_json::to_vec(m)
            .map_err(std::io::Error::other)
            .and_then(|b| crate::worker::write_atomic(path, &b)),
        None => match std::fs::remove_file(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        },
    }
    .map_err(|e| format!("changed-chunk map {}: {e}", path.display()))
}

/// Live progress.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct RunningReplication {
    /// What it does now.
    pub phase: Phase,
    /// Image bytes processed.
    pub bytes_done: u64,
    /// Image bytes in all.
    pub bytes_total: u64,
}

/// A replication's phase.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// The worker copies the disk.
    Snapshot,
    /// Changed chunks go to the target.
    Upload,
    /// Old versions are deleted.
    Prune,
}

/// Tokens for Swift: Keystone's (the `[openstack]` section) or TempAuth's.
#[derive(Debug)]
pub enum SwiftTokens {
    /// A Keystone v3 session.
    Keystone(Arc<Keystone>),
    /// Swift TempAuth.
    TempAuth(TempAuth),
}

impl TokenSource for SwiftTokens {
    async fn token(&self) -> Result<Token, AuthError> {
        match self {
            SwiftTokens::Keystone(k) => k.token().await,
            SwiftTokens::TempAuth(t) => t.token().await,
        }
    }
    fn invalidate(&self) {
        match self {
            SwiftTokens::Keystone(k) => k.invalidate(),
            SwiftTokens::TempAuth(t) => t.invalidate(),
        }
    }
}

/// The target, built at the first replication (Keystone or the sheep may be down when the agent
/// starts; that is an error of the replication, retried at the next, not of the agent).
#[derive(Debug)]
enum Remote {
    Swift(Arc<SwiftBackend<SwiftTokens>>),
    Sheepdog(Arc<SheepdogBackend>),
}

/// How to build the target.
#[derive(Debug)]
enum Recipe {
    SwiftKeystone {
        settings: Box<KeystoneSettings>,
        container: String,
        url: Option<String>,
    },
    SwiftTempAuth {
        auth_url: String,
        user: String,
        key: String,
        container: String,
        url: Option<String>,
    },
    /// The gateways, in order.
    Sheepdog(Vec<String>),
}

/// Counters for /metrics.
#[derive(Debug, Default)]
pub struct VolumeCounters {
    /// Versions stored.
    pub ok: std::sync::atomic::AtomicU64,
    /// Replications that failed.
    pub failed: std::sync::atomic::AtomicU64,
    /// Bytes sent to the target.
    pub bytes_uploaded: std::sync::atomic::AtomicU64,
}

/// The daemon's volume replication.
#[derive(Debug)]
pub struct Volumes {
    recipe: Recipe,
    backend: tokio::sync::OnceCell<Remote>,
    /// `swift:<container>` or `sheepdog:<gateway>,<gateway>…`.
    pub target: String,
    settings: crate::config::Volume,
    storage_dir: PathBuf,
    status: Mutex<BTreeMap<String, VolumeStatus>>,
    /// VMs to replicate at once.
    asked: Mutex<Vec<String>>,
    wake: tokio::sync::Notify,
    /// Counters.
    pub counters: VolumeCounters,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn secret(path: &Path, key: &str) -> Result<String, String> {
    crate::config::read_secret_file(key, path, "")
}

impl Volumes {
    /// The replication the configuration asks for; `None` when no target is enabled. Secrets are
    /// read now, so that a missing key file refuses the start.
    pub fn from_config(cfg: &Config) -> Result<Option<Volumes>, String> {
        let (recipe, target) = match (&cfg.swift, &cfg.sheepdog) {
            (Some(s), _) if s.enabled => {
                let target = format!("swift:{}", s.container);
                let recipe = match (&s.tempauth_url, &cfg.openstack) {
                    (Some(auth_url), _) => Recipe::SwiftTempAuth {
                        auth_url: auth_url.clone(),
                        user: s.user.clone().unwrap_or_default(),
                        key: secret(
                            s.key_file.as_deref().unwrap_or(Path::new("")),
                            "swift.key_file",
                        )?,
                        container: s.container.clone(),
                        url: s.url.clone(),
                    },
                    (None, Some(o)) => Recipe::SwiftKeystone {
                        settings: Box::new(o.keystone_settings(secret(
                            &o.password_file,
                            "openstack.password_file",
                        )?)),
                        container: s.container.clone(),
                        url: s.url.clone(),
                    },
                    (None, None) => return Err("[swift] needs [openstack] or tempauth_url".into()),
                };
                (recipe, target)
            }
            (_, Some(d)) if d.enabled => {
                let gateways: Vec<String> = d.gateways().iter().map(|a| a.to_string()).collect();
                let target = format!("sheepdog:{}", gateways.join(","));
                (Recipe::Sheepdog(gateways), target)
            }
            _ => return Ok(None),
        };
        let storage_dir = cfg.storage_dir.clone();
        let mut status = BTreeMap::new();
        if let Ok(entries) = std::fs::read_dir(storage_dir.join("vms")) {
            for e in entries.flatten() {
                let path = e.path().join("volume.json");
                if let Ok(bytes) = std::fs::read(&path) {
                    match serde_json::from_slice::<VolumeStatus>(&bytes) {
                        Ok(mut st) => {
                            st.running = None;
                            status.insert(e.file_name().to_string_lossy().into_owned(), st);
                        }
                        Err(err) => {
                            warn!(path = %path.display(), error = %err, "unreadable volume status: starting it over")
                        }
                    }
                }
            }
        }
        Ok(Some(Volumes {
            recipe,
            backend: tokio::sync::OnceCell::new(),
            target,
            settings: cfg.volume.clone(),
            storage_dir,
            status: Mutex::new(status),
            asked: Mutex::new(Vec::new()),
            wake: tokio::sync::Notify::new(),
            counters: VolumeCounters::default(),
        }))
    }

    async fn backend(&self) -> Result<&Remote, String> {
        self.backend
            .get_or_try_init(|| async {
                Ok(match &self.recipe {
                    Recipe::Sheepdog(gateways) => Remote::Sheepdog(Arc::new(
                        SheepdogBackend::with_gateways(gateways, self.settings.concurrency),
                    )),
                    Recipe::SwiftTempAuth {
                        auth_url,
                        user,
                        key,
                        container,
                        url,
                    } => {
                        let tokens = SwiftTokens::TempAuth(TempAuth::new(auth_url, user, key));
                        swift(tokens, container, url.clone())?
                    }
                    Recipe::SwiftKeystone {
                        settings,
                        container,
                        url,
                    } => {
                        let ks = Arc::new(
                            Keystone::new((**settings).clone()).map_err(|e| e.to_string())?,
                        );
                        let url = match url {
                            Some(u) => u.clone(),
                            None => ks
                                .endpoint("object-store")
                                .await
                                .map_err(|e| format!("Swift endpoint from Keystone: {e}"))?,
                        };
                        swift(SwiftTokens::Keystone(ks), container, Some(url))?
                    }
                })
            })
            .await
    }

    /// The status of `vm`'s replication.
    pub fn status(&self, vm: &str) -> Option<VolumeStatus> {
        lock(&self.status).get(vm).cloned()
    }

    fn set_status(&self, vm: &str, f: impl FnOnce(&mut VolumeStatus)) {
        let mut m = lock(&self.status);
        let st = m.entry(vm.to_string()).or_insert_with(|| VolumeStatus {
            target: self.target.clone(),
            image: vm.to_string(),
            ..VolumeStatus::default()
        });
        f(st);
    }

    fn save_status(&self, vm: &str) {
        let Some(st) = self.status(vm) else { return };
        let dir = self.storage_dir.join("vms").join(vm);
        let saved = serde_json::to_vec_pretty(&st)
            .map_err(std::io::Error::other)
            .and_then(|b| crate::worker::write_atomic(&dir.join("volume.json"), &b));
        if let Err(e) = saved {
            warn!(vm, error = %e, "cannot save the volume status");
        }
    }

    /// Forgets `vm` (deleted).
    pub fn forget(&self, vm: &str) {
        lock(&self.status).remove(vm);
    }

    /// Asks for a replication of `vm` now.
    pub fn ask(&self, vm: &str) {
        let mut a = lock(&self.asked);
        if !a.iter().any(|v| v == vm) {
            a.push(vm.to_string());
        }
        drop(a);
        self.wake.notify_one();
    }

    /// Restores the newest version of VM `vm` of several disks into `dsts` (disk `i` into `dsts[i]`,
    /// created): every disk at the version its newest [`VersionSet`] names. Returns the VM version.
    pub async fn restore_set(&self, vm: &str, dsts: &[PathBuf]) -> Result<u64, OpError> {
        let backend = self.backend().await.map_err(OpError::Unavailable)?;
        let target = &self.target;
        let scratch = self.storage_dir.join(format!(".{vm}.set.restore"));
        let version = match backend {
            Remote::Swift(b) => restore_set_from(b.as_ref(), vm, dsts, target, &scratch).await,
            Remote::Sheepdog(b) => restore_set_from(b.as_ref(), vm, dsts, target, &scratch).await,
        }?;
        info!(
            vm,
            version,
            disks = dsts.len(),
            "disks restored from {target}"
        );
        Ok(version)
    }

    /// Stores `set` as the next version of VM `vm` (its files in `dir`) and prunes
    /// ([`store_set_to`]). Returns the VM version, the versions pruned and the bytes sent.
    async fn store_set(
        &self,
        vm: &str,
        dir: &Path,
        set: &VersionSet,
    ) -> Result<(u64, Vec<u64>, u64), String> {
        let path = dir.join("volume.set");
        let json = serde_json::to_vec(set).map_err(|e| e.to_string())?;
        crate::worker::write_atomic(&path, &json)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let n = set.disks.len();
        let r = match self.backend().await {
            Ok(Remote::Swift(b)) => store_set_to(b, vm, &path, n, &self.settings).await,
            Ok(Remote::Sheepdog(b)) => store_set_to(b, vm, &path, n, &self.settings).await,
            Err(e) => Err(e),
        };
        let _ = std::fs::remove_file(&path);
        r.map_err(|e| format!("version set ({}): {e}", set_image(vm)))
    }

    /// Restores the newest version of `image` into `dst` (created); returns the version.
    pub async fn restore(&self, image: &str, dst: &Path) -> Result<u64, OpError> {
        let backend = self.backend().await.map_err(OpError::Unavailable)?;
        let target = &self.target;
        let report = match backend {
            Remote::Swift(b) => restore_from(b.as_ref(), image, dst, target).await,
            Remote::Sheepdog(b) => restore_from(b.as_ref(), image, dst, target).await,
        }?;
        info!(
            vm = image,
            version = report.version,
            mb_s = report.mb_s(),
            "disk restored from {target}"
        );
        Ok(report.version)
    }
}

/// Reads version `version` of `vm`'s [`set_image`] (through the file `scratch`, removed after).
async fn read_set<B: volume::Backend>(
    b: &B,
    vm: &str,
    version: u64,
    scratch: &Path,
) -> Result<VersionSet, String> {
    let image = set_image(vm);
    let read = volume::restore(b, &image, version, scratch, &|_| {}).await;
    let bytes = read
        .map_err(|e| e.to_string())
        .and_then(|_| std::fs::read(scratch).map_err(|e| format!("{}: {e}", scratch.display())));
    let _ = std::fs::remove_file(scratch);
    serde_json::from_slice(&bytes?)
        .map_err(|e| format!("version {version} of {image} is not a version set: {e}"))
}

/// Stores the set (a VM version) at `path` as the next version of `vm`'s [`set_image`], then
/// prunes: the sets to `keep`, and each disk's image down to the oldest version a kept set names
/// (never fewer than `keep`). Returns the VM version, the set versions pruned and the bytes sent.
async fn store_set_to<B: volume::Backend + 'static>(
    b: &Arc<B>,
    vm: &str,
    path: &Path,
    disks: usize,
    settings: &crate::config::Volume,
) -> Result<(u64, Vec<u64>, u64), String> {
    let err = |e: volume::VolumeError| e.to_string();
    let image = set_image(vm);
    let options = ReplicateOptions {
        changes: Changes::Hashes,
        concurrency: settings.concurrency,
    };
    let r = volume::replicate(Arc::clone(b), &image, path, &options, &|_| {})
        .await
        .map_err(err)?;
    let p = volume::prune(b.as_ref(), &image, settings.keep)
        .await
        .map_err(err)?;
    // The oldest version of each disk that a kept set names: the disks keep at least that far.
    let mut oldest: Vec<Option<u64>> = vec![None; disks];
    let scratch = path.with_extension("read");
    let kept = b
        .list_versions(&image)
        .await
        .map_err(|e| format!("{image}: {e}"))?;
    for version in kept {
        let set = read_set(b.as_ref(), vm, version, &scratch).await?;
        for (o, d) in oldest.iter_mut().zip(&set.disks) {
            *o = Some(o.map_or(d.version, |o| o.min(d.version)));
        }
    }
    for (i, o) in oldest.iter().enumerate() {
        let disk = disk_image(vm, i);
        let versions = b
            .list_versions(&disk)
            .await
            .map_err(|e| format!("{disk}: {e}"))?;
        let named = o.map_or(0, |o| versions.iter().filter(|&&v| v >= o).count());
        volume::prune(b.as_ref(), &disk, named.max(settings.keep))
            .await
            .map_err(err)?;
    }
    Ok((r.version, p.deleted_versions, r.bytes_uploaded))
}

/// Restores the newest VM version ([`VersionSet`]) of `vm` into `dsts` (disk `i` into `dsts[i]`).
async fn restore_set_from<B: volume::Backend>(
    b: &B,
    vm: &str,
    dsts: &[PathBuf],
    target: &str,
    scratch: &Path,
) -> Result<u64, OpError> {
    let unavailable = |e: volume::VolumeError| OpError::Unavailable(format!("{target}: {e}"));
    let image = set_image(vm);
    let Some(m) = volume::latest(b, &image).await.map_err(unavailable)? else {
        return Err(OpError::Conflict(format!(
            "restore_volume: {target} holds no complete version of the {} disks of {vm:?} (no version of {image:?})",
            dsts.len()
        )));
    };
    let set = read_set(b, vm, m.version, scratch)
        .await
        .map_err(|e| OpError::Unavailable(format!("{target}: {e}")))?;
    if set.disks.len() != dsts.len() {
        return Err(OpError::Conflict(format!(
            "restore_volume: version {} of {vm:?} has {} disks and the definition names {}",
            m.version,
            set.disks.len(),
            dsts.len()
        )));
    }
    for (d, dst) in set.disks.iter().zip(dsts) {
        volume::restore(b, &d.image, d.version, dst, &|_| {})
            .await
            .map_err(unavailable)?;
    }
    Ok(m.version)
}

async fn restore_from<B: volume::Backend>(
    b: &B,
    image: &str,
    dst: &Path,
    target: &str,
) -> Result<volume::RestoreReport, OpError> {
    let unavailable = |e: volume::VolumeError| OpError::Unavailable(format!("{target}: {e}"));
    let Some(m) = volume::latest(b, image).await.map_err(unavailable)? else {
        return Err(OpError::Conflict(format!(
            "restore_volume: {target} holds no version of volume {image:?}"
        )));
    };
    volume::restore(b, image, m.version, dst, &|_| {})
        .await
        .map_err(unavailable)
}

/// Restores the newest replicated version of QEMU VM `vm`'s volume into the files its definition
/// names as its disks (checked not to exist by the API), as raw images: every disk of one VM version
/// ([`VersionSet`]) for a VM of several disks. On failure no restored file is left.
pub async fn restore_qemu_disks(
    sh: &Shared,
    vm: &str,
    q: &ax_qemu::def::QemuDef,
) -> Result<u64, OpError> {
    let Some(v) = &sh.volumes else {
        return Err(OpError::Conflict(
            "restore_volume: no volume replication target is configured ([swift] or [sheepdog])"
                .into(),
        ));
    };
    let dsts: Vec<PathBuf> = q.all_disks().into_iter().map(|(_, p)| p).collect();
    if dsts.is_empty() {
        return Err(OpError::Invalid {
            field: "restore_volume".into(),
            message: "no disk to restore into".into(),
        });
    }
    let restored = if dsts.len() == 1 {
        v.restore(vm, &dsts[0]).await
    } else {
        v.restore_set(vm, &dsts).await
    };
    if restored.is_err() {
        for d in &dsts {
            let _ = std::fs::remove_file(d);
        }
    }
    restored
}

/// Restores the newest replicated version of `def`'s volume into its disk file, before the VM exists.
/// `disk_mib` 0 takes the image's size; another size must match it.
pub async fn restore_disk(sh: &Shared, def: &mut super::VmDef) -> Result<u64, OpError> {
    let Some(v) = &sh.volumes else {
        return Err(OpError::Conflict(
            "restore_volume: no volume replication target is configured ([swift] or [sheepdog])"
                .into(),
        ));
    };
    let dir = sh.vm_dir(&def.name);
    std::fs::create_dir_all(&dir)
        .map_err(|e| OpError::Internal(format!("{}: {e}", dir.display())))?;
    let disk = dir.join(format!("{}.disk", def.name));
    let checked = async {
        let version = v.restore(&def.name, &disk).await?;
        let size = std::fs::metadata(&disk)
            .map_err(|e| OpError::Internal(format!("{}: {e}", disk.display())))?
            .len();
        let want = def.disk_mib << 20;
        if size % (1 << 20) != 0 || (want != 0 && size != want) {
            return Err(OpError::Invalid {
                field: "disk_mib".into(),
                message: format!(
                    "disk_mib is {} but version {version} of the volume is {size} bytes",
                    def.disk_mib
                ),
            });
        }
        def.disk_mib = size >> 20;
        Ok(version)
    };
    match checked.await {
        Ok(version) => Ok(version),
        Err(e) => {
            let _ = std::fs::remove_dir_all(&dir);
            Err(e)
        }
    }
}

fn swift(tokens: SwiftTokens, container: &str, url: Option<String>) -> Result<Remote, String> {
    let config = SwiftConfig {
        storage_url: url,
        ..SwiftConfig::new(container)
    };
    SwiftBackend::new(tokens, config)
        .map(|b| Remote::Swift(Arc::new(b)))
        .map_err(|e| e.to_string())
}

/// Whether `vm` is one this host replicates now: a primary here, marked, running, with a disk.
fn replicated_here(s: &Shared, vm: &str) -> bool {
    s.record(vm).is_some_and(|r| {
        r.volume
            && r.role == LocalRole::Primary
            && r.running
            && r.down_reason.is_none()
            && r.def.has_disk()
    })
}

/// The replicator task: runs until `stop`.
pub async fn run(s: Arc<Shared>, mut stop: tokio::sync::watch::Receiver<bool>) {
    let Some(v) = s.volumes.as_ref() else { return };
    let interval = Duration::from_secs(v.settings.interval_s);
    let mut tried: BTreeMap<String, Instant> = BTreeMap::new();
    loop {
        let asked: Vec<String> = std::mem::take(&mut *lock(&v.asked));
        let due: Vec<String> = s
            .records()
            .into_iter()
            .map(|r| r.def.name)
            .filter(|vm| replicated_here(&s, vm))
            .filter(|vm| {
                asked.contains(vm) || tried.get(vm).is_none_or(|t| t.elapsed() >= interval)
            })
            .collect();
        for vm in due {
            if *stop.borrow() {
                return;
            }
            tried.insert(vm.clone(), Instant::now());
            replicate_one(&s, v, &vm).await;
        }
        tried.retain(|vm, _| s.record(vm).is_some());
        tokio::select! {
            () = v.wake.notified() => {}
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = stop.changed() => return,
        }
    }
}

async fn replicate_one(s: &Shared, v: &Volumes, vm: &str) {
    let started = Instant::now();
    let result = replicate_steps(s, v, vm, started).await;
    let now = policy::store::now_ms();
    v.set_status(vm, |st| st.attempts += 1);
    match result {
        Ok((version, last)) => {
            v.counters.ok.fetch_add(1, Ordering::Relaxed);
            v.counters
                .bytes_uploaded
                .fetch_add(last.bytes_uploaded, Ordering::Relaxed);
            info!(
                vm,
                version,
                changed = last.changed,
                chunks = last.chunks,
                uploaded = last.bytes_uploaded,
                ms = last.elapsed_ms,
                io_held_us = last.snapshot.io_held_us,
                "volume replicated to {}",
                v.target
            );
            v.set_status(vm, |st| {
                st.version = Some(version);
                st.last_ok_ms = Some(now);
                st.last = Some(last);
                st.last_error = None;
                st.running = None;
            });
        }
        Err(e) => {
            v.counters.failed.fetch_add(1, Ordering::Relaxed);
            // A VM that stopped or moved meanwhile is not a replication failure worth an event.
            if replicated_here(s, vm) {
                warn!(vm, error = %e, "volume replication failed");
                s.note(
                    vm,
                    format!("volume replication to {} failed: {e}", v.target),
                );
            }
            v.set_status(vm, |st| {
                st.last_error = Some(e);
                st.running = None;
            });
        }
    }
    v.save_status(vm);
}

async fn replicate_steps(
    s: &Shared,
    v: &Volumes,
    vm: &str,
    started: Instant,
) -> Result<(u64, LastReplication), String> {
    // A QEMU VM's disk size is learnt from the snapshot.
    let (bytes_total, disks) = s
        .record(vm)
        .map_or((0, 1), |r| (r.def.disk_mib << 20, disk_count(&r.def)));
    let phase = |phase: Phase, bytes_done: u64| {
        v.set_status(vm, |st| {
            st.running = Some(RunningReplication {
                phase,
                bytes_done,
                bytes_total,
            })
        })
    };
    phase(Phase::Snapshot, 0);
    let dir = s.vm_dir(vm);
    let files: Vec<(PathBuf, PathBuf)> = (0..disks).map(|i| disk_files(&dir, i)).collect();
    let pace = (v.settings.snapshot_mb_s > 0).then(|| v.settings.snapshot_mb_s * 1_000_000);
    // Time for the copy: at its pace, or at a slow disk's 20 MB/s, plus a minute.
    let rate = pace.unwrap_or(20_000_000).max(1);
    let timeout = Duration::from_secs(60 + bytes_total / rate);
    let sock = crate::worker::WorkerFiles::new(dir.clone()).socket();
    let maps: Vec<Option<ChangeMap>> = files.iter().map(|(_, m)| read_change_map(m)).collect();
    let req = WorkerRequest::SnapshotDisk {
        to: files[0].0.clone(),
        max_bytes_per_s: pace,
        since: common_token(&maps),
        more_to: files[1..].iter().map(|(snap, _)| snap.clone()).collect(),
    };
    let remove_snaps = || {
        for (snap, _) in &files {
            let _ = std::fs::remove_file(snap);
        }
    };
    let resp = crate::control::call_within(&sock, &req, timeout)
        .await
        .map_err(|e| format!("disk snapshot by the worker: {e}"))?;
    if !resp.ok {
        remove_snaps();
        return Err(format!(
            "disk snapshot by the worker: {}",
            resp.error.unwrap_or_default()
        ));
    }
    let mut snapshot = resp.disk_snapshot.unwrap_or_default();
    let more = std::mem::take(&mut snapshot.more);
    if more.len() + 1 != disks {
        remove_snaps();
        return Err(format!(
            "the worker copied {} disk(s) and the VM has {disks}: no version (restart the VM's worker \
             after an upgrade)",
            more.len() + 1
        ));
    }
    // Every disk's plan and interim map first: until a disk's version is stored its map must hold
    // every change since its base — or nothing.
    let mut plans = Vec::with_capacity(disks);
    let mut changes_of = Vec::with_capacity(disks);
    let mut infos: Vec<DiskSnapshotInfo> = std::iter::once(snapshot.clone()).chain(more).collect();
    for (i, info) in infos.iter_mut().enumerate() {
        let map_path = &files[i].1;
        let changes = info.changes.take();
        let mut plan = plan_changes(maps[i].as_ref(), changes.as_ref());
        let interim = match (&plan, &changes) {
            (ChangePlan::WriteLog { base, pending }, Some(c)) => Some(ChangeMap {
                base_version: *base,
                token: c.token,
                chunk_size: volume::CHUNK_SIZE,
                pending: pending.clone(),
            }),
            _ => None,
        };
        if let Err(e) = write_change_map(map_path, interim.as_ref()) {
            warn!(vm, disk = i, error = %e, "cannot keep the changed-chunk map: hashing");
            let _ = write_change_map(map_path, None);
            plan = ChangePlan::Hashes { why: e };
        }
        plans.push(plan);
        changes_of.push(changes);
    }
    snapshot.changes = None;
    // One version per disk, each stored whole; a VM of several disks is listed (its set) only once
    // every disk's version is.
    let mut done: Vec<(volume::ReplicateReport, Vec<u64>, String)> = Vec::with_capacity(disks);
    let mut failed = None;
    let mut offset = 0;
    for (i, plan) in plans.into_iter().enumerate() {
        let (snap, map_path) = &files[i];
        if failed.is_none() {
            let image = disk_image(vm, i);
            let base = offset;
            let phase_i = |p: Phase, n: u64| phase(p, base + n);
            match upload(v, &image, snap, &phase_i, plan, disks == 1).await {
                Ok(r) => {
                    if let Some(c) = &changes_of[i] {
                        let stored = ChangeMap {
                            base_version: r.0.version,
                            token: c.token,
                            chunk_size: volume::CHUNK_SIZE,
                            pending: Vec::new(),
                        };
                        if let Err(e) = write_change_map(map_path, Some(&stored)) {
                            warn!(vm, disk = i, error = %e, "cannot store the changed-chunk map: the next version hashes");
                        }
                    }
                    offset += r.0.size;
                    done.push(r);
                }
                Err(e) if disks == 1 => failed = Some(e),
                Err(e) => failed = Some(format!("disk{i} ({image}): {e}")),
            }
        }
        let _ = std::fs::remove_file(snap);
    }
    if let Some(e) = failed {
        return Err(e);
    }
    for (i, (report, _, how)) in done.iter().enumerate() {
        if how.starts_with("hashes") && report.version > 1 {
            warn!(vm, disk = i, how = %how, "volume change tracking fell back to hashing the whole disk");
            s.note(
                vm,
                format!(
                    "volume version {} of {}: change tracking fell back to {how}",
                    report.version,
                    disk_image(vm, i)
                ),
            );
        }
    }
    let sum = |f: fn(&volume::ReplicateReport) -> u64| done.iter().map(|(r, ..)| f(r)).sum::<u64>();
    let mut last = LastReplication {
        bytes: sum(|r| r.size),
        chunks: sum(|r| r.chunks),
        changed: sum(|r| r.changed),
        bytes_uploaded: sum(|r| r.bytes_uploaded),
        elapsed_ms: 0,
        snapshot,
        pruned: Vec::new(),
        change_tracking: String::new(),
        disks: Vec::new(),
    };
    let version = if disks == 1 {
        let (r, pruned, how) = done.remove(0);
        last.pruned = pruned;
        last.change_tracking = how;
        r.version
    } else {
        last.change_tracking = done
            .iter()
            .enumerate()
            .map(|(i, (_, _, how))| format!("disk{i}: {how}"))
            .collect::<Vec<_>>()
            .join("; ");
        last.disks = done
            .iter()
            .enumerate()
            .map(|(i, (r, ..))| DiskVersion {
                image: disk_image(vm, i),
                version: r.version,
            })
            .collect();
        phase(Phase::Prune, offset);
        let set = VersionSet {
            disks: last.disks.clone(),
        };
        let (version, pruned, bytes) = v.store_set(vm, &dir, &set).await?;
        last.pruned = pruned;
        last.bytes_uploaded += bytes;
        version
    };
    last.elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    Ok((version, last))
}

/// Uploads `snap` as the next version of `image`; prunes it to `[volume] keep` versions when `prune`
/// (a VM of several disks prunes after its set: [`Volumes::store_set`]).
async fn upload(
    v: &Volumes,
    image: &str,
    snap: &Path,
    phase: &(dyn Fn(Phase, u64) + Sync),
    plan: ChangePlan,
    prune: bool,
) -> Result<(volume::ReplicateReport, Vec<u64>, String), String> {
    let progress = |p: Progress| phase(Phase::Upload, p.bytes_done);
    let job = Job {
        vm: image,
        snap,
        plan,
        concurrency: v.settings.concurrency,
        keep: prune.then_some(v.settings.keep),
    };
    match v.backend().await? {
        Remote::Swift(b) => upload_to(b, &job, &progress, phase).await,
        Remote::Sheepdog(b) => upload_to(b, &job, &progress, phase).await,
    }
}

/// One replication's inputs.
struct Job<'a> {
    /// The image.
    vm: &'a str,
    snap: &'a Path,
    plan: ChangePlan,
    concurrency: usize,
    /// Versions kept after it (`None`: no pruning now).
    keep: Option<usize>,
}

async fn upload_to<B: volume::Backend + 'static>(
    b: &Arc<B>,
    job: &Job<'_>,
    progress: &(dyn Fn(Progress) + Sync),
    phase: &(dyn Fn(Phase, u64) + Sync),
) -> Result<(volume::ReplicateReport, Vec<u64>, String), String> {
    let err = |e: volume::VolumeError| e.to_string();
    let vm = job.vm;
    let (changes, how) = match &job.plan {
        ChangePlan::WriteLog { base, pending } => {
            let newest = volume::latest(b.as_ref(), vm)
                .await
                .map_err(err)?
                .map(|m| m.version);
            if newest == Some(*base) {
                let size = std::fs::metadata(job.snap)
                    .map_err(|e| format!("{}: {e}", job.snap.display()))?
                    .len();
                let ranges = pending
                    .iter()
                    .map(|&i| i * volume::CHUNK_SIZE)
                    .filter(|&start| start < size)
                    .map(|start| start..(start + volume::CHUNK_SIZE).min(size))
                    .collect();
                (
                    Changes::WriteLog(ranges),
                    format!("write log: {} chunks since version {base}", pending.len()),
                )
            } else {
                (
                    Changes::Hashes,
                    format!(
                        "hashes: the changed-chunk map is relative to version {base}, the newest stored is {newest:?}"
                    ),
                )
            }
        }
        ChangePlan::Hashes { why } => (Changes::Hashes, format!("hashes: {why}")),
    };
    let options = ReplicateOptions {
        changes,
        concurrency: job.concurrency,
    };
    let r = volume::replicate(Arc::clone(b), vm, job.snap, &options, progress)
        .await
        .map_err(err)?;
    let Some(keep) = job.keep else {
        return Ok((r, Vec::new(), how));
    };
    phase(Phase::Prune, r.size);
    let p = volume::prune(b.as_ref(), vm, keep).await.map_err(err)?;
    Ok((r, p.deleted_versions, how))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log(since: Option<u64>, token: u64, chunks: &[u64]) -> DiskChanges {
        DiskChanges {
            chunk_size: volume::CHUNK_SIZE,
            since,
            token,
            chunks: chunks.to_vec(),
        }
    }

    #[test]
    fn the_write_log_is_used_only_when_it_follows_the_map() {
        let hashes = |p: ChangePlan| matches!(p, ChangePlan::Hashes { .. });
        // First snapshot of a worker, no map: hash.
        assert!(hashes(plan_changes(None, Some(&log(None, 1, &[0])))));
        let map = ChangeMap {
            base_version: 4,
            token: 7,
            chunk_size: volume::CHUNK_SIZE,
            pending: vec![3, 9],
        };
        // The log follows the map: its chunks join the pending ones (a failed run's are kept).
        assert_eq!(
            plan_changes(Some(&map), Some(&log(Some(7), 8, &[1, 3]))),
            ChangePlan::WriteLog {
                base: 4,
                pending: vec![1, 3, 9]
            }
        );
        // A worker that restarted (new log), a lost map, another chunk size: hash, saying why.
        match plan_changes(Some(&map), Some(&log(None, 8, &[1]))) {
            ChangePlan::Hashes { why } => assert!(why.contains("restarted"), "{why}"),
            p => panic!("{p:?}"),
        }
        assert!(hashes(plan_changes(
            Some(&map),
            Some(&log(Some(6), 8, &[1]))
        )));
        assert!(hashes(plan_changes(Some(&map), None)));
        let mut odd = log(Some(7), 8, &[1]);
        odd.chunk_size = 1 << 20;
        assert!(hashes(plan_changes(Some(&map), Some(&odd))));
    }

    #[test]
    fn disks_have_their_own_images_and_a_snapshot_asks_for_changes_only_when_all_maps_agree() {
        assert_eq!(
            disk_image("web", 0),
            "web",
            "disk 0 keeps the name of older versions"
        );
        assert_eq!(disk_image("web", 2), "web.AX-disk2");
        assert_eq!(set_image("web"), "web.AX-set");
        assert!(
            crate::daemon::api::check_vm_name(&disk_image("web", 1)).is_err(),
            "no VM can be named like another VM's disk image"
        );
        let map = |token, pending: &[u64]| {
            Some(ChangeMap {
                base_version: 3,
                token,
                chunk_size: volume::CHUNK_SIZE,
                pending: pending.to_vec(),
            })
        };
        assert_eq!(common_token(&[map(7, &[]), map(7, &[])]), Some(7));
        assert_eq!(common_token(&[map(7, &[]), map(6, &[])]), None);
        assert_eq!(common_token(&[map(7, &[]), map(7, &[2])]), None);
        assert_eq!(common_token(&[map(7, &[]), None]), None);
        assert_eq!(common_token(&[]), None);
    }

    #[test]
    fn the_map_survives_in_its_file() {
        let dir = std::env::temp_dir().join(format!("ax-changemap-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("volume.changes");
        assert_eq!(read_change_map(&path), None);
        let m = ChangeMap {
            base_version: 2,
            token: 5,
            chunk_size: volume::CHUNK_SIZE,
            pending: vec![0, 8],
        };
        write_change_map(&path, Some(&m)).unwrap();
        assert_eq!(read_change_map(&path), Some(m));
        write_change_map(&path, None).unwrap();
        assert_eq!(read_change_map(&path), None);
        std::fs::write(&path, b"{not json").unwrap();
        assert_eq!(read_change_map(&path), None, "a damaged map is a lost map");
        std::fs::remove_dir_all(&dir).ok();
    }
}
