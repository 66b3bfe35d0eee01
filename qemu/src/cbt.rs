//! Changed-block tracking of a running QEMU's disk, the way incremental-backup tools for QEMU do it
//! (QEMU's `docs/interop/bitmaps.rst` and image fleecing, `tests/qemu-iotests/222`).
//!
//! - A dirty bitmap [`BITMAP`] on the disk's format node (`diskN`) records every write since the last
//!   stored version ([`ensure_bitmap`]); persistent in qcow2, so it survives a clean QEMU restart.
//! - [`Backup::start`] takes a point-in-time view while the guest runs (image fleecing): a temporary
//!   qcow2 overlay in the work directory whose backing is the disk, filled by a `blockdev-backup
//!   sync=none` job (copy-before-write: before the guest overwrites a cluster, its old content is
//!   copied into the overlay). In the same `transaction` a new bitmap [`BITMAP_NEXT`] starts
//!   recording and [`BITMAP`] is disabled: frozen, it holds exactly the changes between the last
//!   stored version and this view. The overlay is exported over NBD (a unix socket in the work
//!   directory) together with [`BITMAP`] as the `qemu:dirty-bitmap:ax-cbt` metadata context.
//! - [`Backup::dirty_ranges`], [`Backup::read`] and [`Backup::copy_to`] read the view through
//!   [`crate::nbd`].
//! - [`Backup::finish`] tears the view down and folds the bitmaps in one transaction: when the version
//!   was stored, [`BITMAP`] restarts from [`BITMAP_NEXT`] (the writes since the view); when it was
//!   not, [`BITMAP_NEXT`] is merged into [`BITMAP`]. No write is lost either way.
//! - [`recover`] finds what a caller that crashed mid-backup left (export, job, overlay,
//!   [`BITMAP_NEXT`]) and folds it back the "not stored" way; [`ensure_bitmap`] and [`Backup::start`]
//!   run it first.
//!
//! QEMU 7.2 also has the `copy-before-write` filter and the `snapshot-access` driver (7.0+), but
//! using them for a disk already attached to a device needs the filter inserted above the device's
//! node, which 7.2 cannot do at run time (`blockdev-replace` came later); `blockdev-backup
//! sync=none`, which inserts a copy-before-write filter itself, is what works on a running 7.2.
//!
//! Every QMP wait is bounded by [`Qmp::timeout`]; jobs, exports and nodes going away are watched by
//! polling `query-block-jobs`, `query-jobs`, `query-block-exports` and `query-named-block-nodes`.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncSeekExt, AsyncWriteExt};
use tokio::net::UnixStream;

use crate::nbd::{self, ConnectOptions, Extent, Nbd, NbdError, ReadChunk};
use crate::qmp::{Qmp, QmpError};

/// The bitmap recording the writes since the last stored version.
pub const BITMAP: &str = "ax-cbt";
/// The bitmap recording the writes during a backup (between its view and its end).
pub const BITMAP_NEXT: &str = "ax-cbt-next";
/// The chunk a copy is rounded out to: `evacuate::volume::CHUNK_SIZE` (4 MiB), repeated here so that
/// this crate does not depend on `evacuate`; the two must stay equal.
pub const CHUNK_SIZE: u64 = 4 << 20;

const POLL: Duration = Duration::from_millis(10);

/// A changed-block tracking failure.
#[derive(Debug, thiserror::Error)]
pub enum CbtError {
    /// QMP failed.
    #[error(transparent)]
    Qmp(#[from] QmpError),
    /// Reading the view over NBD failed.
    #[error(transparent)]
    Nbd(#[from] NbdError),
    /// A file in the work directory.
    #[error("{what}: {source}")]
    Io {
        /// What was done.
        what: String,
        /// Why it failed.
        source: std::io::Error,
    },
    /// No such block node.
    #[error("no block node {0:?} in QEMU")]
    NoNode(String),
    /// The node has no usable tracking bitmap: call [`ensure_bitmap`] first.
    #[error("node {0:?} has no usable {BITMAP} bitmap (call ensure_bitmap)")]
    NoBitmap(String),
    /// A node name too long for the names derived from it.
    #[error("node name {0:?}: at most 20 characters")]
    BadNode(String),
    /// Something QEMU did not do in time.
    #[error("{0}: not done within {1:?}")]
    Timeout(String, Duration),
    /// A job QEMU ran failed.
    #[error("QEMU job {job}: {error}")]
    Job {
        /// The job.
        job: String,
        /// QEMU's message.
        error: String,
    },
    /// QEMU answered with something unexpected.
    #[error("QEMU: {0}")]
    Unexpected(String),
}

type Result<T> = std::result::Result<T, CbtError>;

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> CbtError {
    let what = what.into();
    move |source| CbtError::Io { what, source }
}

/// The tracking bitmap after [`ensure_bitmap`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BitmapState {
    /// The bitmap was created now (it was absent, or inconsistent after QEMU died): it does not
    /// cover earlier writes, so the next version must read everything.
    pub created: bool,
    /// It is stored in the image (qcow2) and survives a clean QEMU restart.
    pub persistent: bool,
    /// Its granularity in bytes.
    pub granularity: u64,
    /// A backup interrupted by a crash of the caller was folded back first.
    pub recovered: bool,
}

/// A dirty bitmap as `query-named-block-nodes` shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct BitmapInfo {
    name: String,
    recording: bool,
    persistent: bool,
    busy: bool,
    inconsistent: bool,
    granularity: u64,
}

#[derive(Debug, Clone)]
struct NodeInfo {
    drv: String,
    size: u64,
    bitmaps: Vec<BitmapInfo>,
}

impl NodeInfo {
    fn bitmap(&self, name: &str) -> Option<&BitmapInfo> {
        self.bitmaps.iter().find(|b| b.name == name)
    }
}

async fn nodes(qmp: &Qmp) -> Result<Vec<Value>> {
    match qmp
        .execute("query-named-block-nodes", json!({"flat": true}))
        .await?
    {
        Value::Array(a) => Ok(a),
        v => Err(CbtError::Unexpected(format!(
            "query-named-block-nodes: {v}"
        ))),
    }
}

async fn node_exists(qmp: &Qmp, node: &str) -> Result<bool> {
    Ok(nodes(qmp)
        .await?
        .iter()
        .any(|n| n["node-name"].as_str() == Some(node)))
}

async fn node_info(qmp: &Qmp, node: &str) -> Result<NodeInfo> {
    let all = nodes(qmp).await?;
    let n = all
        .iter()
        .find(|n| n["node-name"].as_str() == Some(node))
        .ok_or_else(|| CbtError::NoNode(node.to_string()))?;
    let bitmaps = n["dirty-bitmaps"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|b| BitmapInfo {
                    name: b["name"].as_str().unwrap_or_default().to_string(),
                    recording: b["recording"].as_bool().unwrap_or(false),
                    persistent: b["persistent"].as_bool().unwrap_or(false),
                    busy: b["busy"].as_bool().unwrap_or(false),
                    inconsistent: b["inconsistent"].as_bool().unwrap_or(false),
                    granularity: b["granularity"].as_u64().unwrap_or(0),
                })
                .collect()
        })
        .unwrap_or_default();
    Ok(NodeInfo {
        drv: n["drv"].as_str().unwrap_or_default().to_string(),
        size: n["image"]["virtual-size"]
            .as_u64()
            .ok_or_else(|| CbtError::Unexpected(format!("node {node} without a virtual size")))?,
        bitmaps,
    })
}

/// The names of a node's backup objects in QEMU.
#[derive(Debug, Clone)]
struct Names {
    fleece: String,
    fleece_file: String,
    job: String,
    create_job: String,
    export: String,
}

fn names(node: &str) -> Result<Names> {
    // QEMU node names: at most 31 characters, starting with a letter.
    if node.is_empty()
        || node.len() > 20
        || !node.starts_with(|c: char| c.is_ascii_alphabetic())
        || !node
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        return Err(CbtError::BadNode(node.to_string()));
    }
    Ok(Names {
        fleece: format!("ax-fleece-{node}"),
        fleece_file: format!("ax-fleece-{node}-f"),
        job: format!("ax-fleece-{node}"),
        create_job: format!("ax-fleece-create-{node}"),
        export: format!("ax-cbt-{node}"),
    })
}

async fn bitmap_add(qmp: &Qmp, node: &str, name: &str, persistent: bool) -> Result<()> {
    qmp.execute(
        "block-dirty-bitmap-add",
        json!({"node": node, "name": name, "persistent": persistent}),
    )
    .await?;
    Ok(())
}

fn action(kind: &str, data: Value) -> Value {
    json!({"type": kind, "data": data})
}

/// The transaction actions that fold [`BITMAP_NEXT`] (the writes since a backup's point in time) back
/// into [`BITMAP`], enable it and drop [`BITMAP_NEXT`].
fn fold_next(node: &str) -> [Value; 3] {
    [
        action(
            "block-dirty-bitmap-merge",
            json!({"node": node, "target": BITMAP, "bitmaps": [BITMAP_NEXT]}),
        ),
        action(
            "block-dirty-bitmap-enable",
            json!({"node": node, "name": BITMAP}),
        ),
        action(
            "block-dirty-bitmap-remove",
            json!({"node": node, "name": BITMAP_NEXT}),
        ),
    ]
}

/// Polls `done` every 10 ms until it is true, at most `qmp.timeout`.
async fn wait_for<F, Fut>(qmp: &Qmp, what: &str, mut done: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool>>,
{
    let deadline = Instant::now() + qmp.timeout;
    loop {
        if done().await? {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(CbtError::Timeout(what.to_string(), qmp.timeout));
        }
        tokio::time::sleep(POLL).await;
    }
}

async fn list(qmp: &Qmp, cmd: &str) -> Result<Vec<Value>> {
    match qmp.execute(cmd, Value::Null).await? {
        Value::Array(a) => Ok(a),
        v => Err(CbtError::Unexpected(format!("{cmd}: {v}"))),
    }
}

async fn export_exists(qmp: &Qmp, id: &str) -> Result<bool> {
    Ok(list(qmp, "query-block-exports")
        .await?
        .iter()
        .any(|e| e["id"].as_str() == Some(id)))
}

async fn block_job_exists(qmp: &Qmp, id: &str) -> Result<bool> {
    Ok(list(qmp, "query-block-jobs")
        .await?
        .iter()
        .any(|j| j["device"].as_str() == Some(id)))
}

/// A `query-jobs` job's status and error, when it exists.
async fn job_status(qmp: &Qmp, id: &str) -> Result<Option<(String, Option<String>)>> {
    Ok(list(qmp, "query-jobs")
        .await?
        .iter()
        .find(|j| j["id"].as_str() == Some(id))
        .map(|j| {
            (
                j["status"].as_str().unwrap_or_default().to_string(),
                j["error"].as_str().map(str::to_string),
            )
        }))
}

/// Runs `blockdev-create` with `options` and waits for it to conclude; the job is dismissed.
async fn blockdev_create(qmp: &Qmp, job: &str, options: Value) -> Result<()> {
    qmp.execute(
        "blockdev-create",
        json!({"job-id": job, "options": options}),
    )
    .await?;
    let deadline = Instant::now() + qmp.timeout;
    let result = loop {
        match job_status(qmp, job).await? {
            Some((s, e)) if s == "concluded" => break e,
            Some(_) => {}
            None => break Some("vanished".to_string()),
        }
        if Instant::now() >= deadline {
            return Err(CbtError::Timeout(format!("job {job}"), qmp.timeout));
        }
        tokio::time::sleep(POLL).await;
    };
    let _ = qmp.execute("job-dismiss", json!({"id": job})).await;
    match result {
        Some(error) => Err(CbtError::Job {
            job: job.to_string(),
            error,
        }),
        None => Ok(()),
    }
}

/// Removes what a backup of `node` put into QEMU (export, NBD server when it serves nothing else,
/// job, overlay nodes); the bitmaps are left alone. Returns whether anything was found.
async fn teardown(qmp: &Qmp, n: &Names) -> Result<bool> {
    let mut found = false;
    if export_exists(qmp, &n.export).await? {
        found = true;
        qmp.execute("block-export-del", json!({"id": n.export, "mode": "hard"}))
            .await?;
        wait_for(qmp, &format!("export {} removed", n.export), || async {
            Ok(!export_exists(qmp, &n.export).await?)
        })
        .await?;
    }
    if list(qmp, "query-block-exports").await?.is_empty() {
        // Serving nothing: ours, or nobody's. "not running" is fine.
        let _ = qmp.execute("nbd-server-stop", Value::Null).await;
    }
    if block_job_exists(qmp, &n.job).await? {
        found = true;
        qmp.execute("block-job-cancel", json!({"device": n.job, "force": true}))
            .await?;
    }
    // A cancelled job may linger as concluded when auto-dismiss is off; a create job of a crashed
    // start too.
    for id in [&n.job, &n.create_job] {
        if let Some((status, _)) = job_status(qmp, id).await? {
            found = true;
            if status == "concluded" {
                let _ = qmp.execute("job-dismiss", json!({"id": id})).await;
            } else if id == &n.create_job {
                // A create job cannot be cancelled: let it conclude, then dismiss it.
                wait_for(qmp, &format!("job {id}"), || async {
                    Ok(job_status(qmp, id)
                        .await?
                        .is_none_or(|(s, _)| s == "concluded"))
                })
                .await?;
                let _ = qmp.execute("job-dismiss", json!({"id": id})).await;
            }
        }
    }
    wait_for(qmp, &format!("job {} gone", n.job), || async {
        Ok(!block_job_exists(qmp, &n.job).await? && job_status(qmp, &n.job).await?.is_none())
    })
    .await?;
    for node in [&n.fleece, &n.fleece_file] {
        if node_exists(qmp, node).await? {
            found = true;
            qmp.execute("blockdev-del", json!({"node-name": node}))
                .await?;
        }
    }
    Ok(found)
}

/// Folds what a backup of `node` interrupted by a crash of its caller left back in, the "not
/// stored" way: the export, job and overlay are removed, [`BITMAP_NEXT`] is merged into [`BITMAP`],
/// which records again. Returns whether anything was found. A no-op on a clean node.
pub async fn recover(qmp: &Qmp, node: &str) -> Result<bool> {
    let n = names(node)?;
    let mut found = teardown(qmp, &n).await?;
    let info = node_info(qmp, node).await?;
    let cbt = info.bitmap(BITMAP);
    match info.bitmap(BITMAP_NEXT) {
        Some(next) if next.inconsistent => {
            // QEMU died with it in use: what it recorded is unknown. Remove it; `ax-cbt` is then
            // inconsistent too and ensure_bitmap recreates it.
            found = true;
            qmp.execute(
                "block-dirty-bitmap-remove",
                json!({"node": node, "name": BITMAP_NEXT}),
            )
            .await?;
        }
        Some(next) => {
            found = true;
            let mut actions = Vec::new();
            if cbt.is_none() {
                actions.push(action(
                    "block-dirty-bitmap-add",
                    json!({"node": node, "name": BITMAP, "persistent": next.persistent,
                           "granularity": next.granularity, "disabled": true}),
                ));
            }
            if cbt.is_some_and(|c| c.inconsistent) {
                // Nothing to merge into: ensure_bitmap will start afresh.
                actions.push(action(
                    "block-dirty-bitmap-remove",
                    json!({"node": node, "name": BITMAP_NEXT}),
                ));
            } else {
                actions.extend(fold_next(node));
            }
            qmp.execute("transaction", json!({"actions": actions}))
                .await?;
        }
        None => {
            if let Some(c) = cbt.filter(|c| !c.recording && !c.inconsistent) {
                found = true;
                tracing::warn!(node, bitmap = %c.name, "a disabled tracking bitmap: enabled again");
                qmp.execute(
                    "block-dirty-bitmap-enable",
                    json!({"node": node, "name": BITMAP}),
                )
                .await?;
            }
        }
    }
    if found {
        tracing::warn!(node, "an interrupted backup was folded back (not stored)");
    }
    Ok(found)
}

/// Makes sure [`BITMAP`] tracks the writes to format node `node` (`diskN`): persistent when
/// `persistent` and the format allows it (qcow2). An interrupted backup is [`recover`]ed first.
pub async fn ensure_bitmap(qmp: &Qmp, node: &str, persistent: bool) -> Result<BitmapState> {
    let recovered = recover(qmp, node).await?;
    let info = node_info(qmp, node).await?;
    let persistent_ok = persistent && info.drv == "qcow2";
    let existing = info.bitmap(BITMAP).cloned();
    let created = match existing {
        Some(b) if !b.inconsistent => false,
        Some(_) => {
            tracing::warn!(
                node,
                "the tracking bitmap is inconsistent (QEMU did not close the image): recreated"
            );
            qmp.execute(
                "block-dirty-bitmap-remove",
                json!({"node": node, "name": BITMAP}),
            )
            .await?;
            bitmap_add(qmp, node, BITMAP, persistent_ok).await?;
            true
        }
        None => {
            bitmap_add(qmp, node, BITMAP, persistent_ok).await?;
            true
        }
    };
    let info = node_info(qmp, node).await?;
    let b = info
        .bitmap(BITMAP)
        .ok_or_else(|| CbtError::NoBitmap(node.to_string()))?;
    Ok(BitmapState {
        created,
        persistent: b.persistent,
        granularity: b.granularity,
        recovered,
    })
}

/// What [`Backup::copy_to`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CopyReport {
    /// The disk's virtual size (the file's length).
    pub size: u64,
    /// The chunk-aligned ranges copied (for `Changes::WriteLog`).
    pub ranges: Vec<Range<u64>>,
    /// Bytes asked of the view (the ranges' total).
    pub bytes_read: u64,
    /// Bytes that came as data (not holes).
    pub bytes_data: u64,
    /// Bytes written to the file (data that is not all zeros).
    pub bytes_written: u64,
}

/// A point-in-time view of a running QEMU's disk, with the changes since the last stored version.
///
/// End it with [`Backup::finish`]; a `Backup` dropped without it (its caller crashed) leaves its
/// export, overlay and [`BITMAP_NEXT`] in QEMU until the next [`recover`] folds them back.
#[derive(Debug)]
pub struct Backup {
    node: String,
    names: Names,
    workdir: PathBuf,
    fleece_path: PathBuf,
    socket: PathBuf,
    nbd: Nbd<UnixStream>,
    bitmap_ctx: u32,
    alloc_ctx: u32,
    size: u64,
}

/// One disk of a [`Backup::start_all`] before it starts.
struct Prep {
    node: String,
    names: Names,
    cbt: BitmapInfo,
    size: u64,
    fleece_path: PathBuf,
}

/// Rounds `ranges` out to [`CHUNK_SIZE`] chunks within `size`, sorted and merged.
pub fn chunk_ranges(ranges: &[Range<u64>], size: u64) -> Vec<Range<u64>> {
    let mut v: Vec<Range<u64>> = ranges
        .iter()
        .filter(|r| r.start < r.end && r.start < size)
        .map(|r| {
            (r.start / CHUNK_SIZE * CHUNK_SIZE)
                ..(r.end.min(size).div_ceil(CHUNK_SIZE) * CHUNK_SIZE).min(size)
        })
        .collect();
    v.sort_by_key(|r| r.start);
    merge(v)
}

fn merge(v: Vec<Range<u64>>) -> Vec<Range<u64>> {
    let mut out: Vec<Range<u64>> = Vec::with_capacity(v.len());
    for r in v {
        match out.last_mut() {
            Some(l) if r.start <= l.end => l.end = l.end.max(r.end),
            _ => out.push(r),
        }
    }
    out
}

impl Backup {
    /// Takes a point-in-time view of format node `node` while the guest runs and exports it over
    /// NBD on a unix socket in `workdir` (which QEMU must be able to write). [`ensure_bitmap`] must
    /// have been called. On failure nothing is left behind.
    pub async fn start(qmp: &Qmp, node: &str, workdir: &Path) -> Result<Backup> {
        Self::start_all(qmp, &[node], workdir)
            .await?
            .pop()
            .ok_or_else(|| CbtError::Unexpected("no backup started".into()))
    }

    /// [`Backup::start`] of several format nodes (the disks of one VM) at **one instant**: their
    /// copy-before-write jobs start and their bitmaps freeze in a single QMP `transaction`, so the
    /// views are the same point in time for every disk. One NBD server (on the socket of the first
    /// node) exports every view; each [`Backup`] reads its own over its own connection and is
    /// finished on its own (the server stops with the last export). On failure nothing is left
    /// behind.
    pub async fn start_all(qmp: &Qmp, nodes: &[&str], workdir: &Path) -> Result<Vec<Backup>> {
        let Some(first) = nodes.first() else {
            return Err(CbtError::Unexpected("no disk to back up".into()));
        };
        let mut prep = Vec::with_capacity(nodes.len());
        for (i, node) in nodes.iter().enumerate() {
            if nodes[..i].contains(node) {
                return Err(CbtError::Unexpected(format!("node {node:?} named twice")));
            }
            let n = names(node)?;
            recover(qmp, node).await?;
            let info = node_info(qmp, node).await?;
            let cbt = info
                .bitmap(BITMAP)
                .filter(|b| b.recording && !b.inconsistent && !b.busy)
                .ok_or_else(|| CbtError::NoBitmap(node.to_string()))?
                .clone();
            prep.push(Prep {
                node: node.to_string(),
                names: n,
                cbt,
                size: info.size,
                fleece_path: PathBuf::new(),
            });
        }
        std::fs::create_dir_all(workdir)
            .map_err(io_err(format!("creating {}", workdir.display())))?;
        let workdir = workdir
            .canonicalize()
            .map_err(io_err(format!("resolving {}", workdir.display())))?;
        let socket = workdir.join(format!("{first}.nbd.sock"));
        for p in &mut prep {
            p.fleece_path = workdir.join(format!("{}.fleece.qcow2", p.node));
        }
        let files: Vec<&PathBuf> = prep
            .iter()
            .map(|p| &p.fleece_path)
            .chain(std::iter::once(&socket))
            .collect();
        for f in &files {
            match std::fs::remove_file(f) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(io_err(format!("removing {}", f.display()))(e))
                }
                _ => {}
            }
        }
        let conns = match Self::start_in_qemu(qmp, &prep, &socket).await {
            Ok(v) => v,
            Err(e) => {
                for p in &prep {
                    if let Err(e2) = recover(qmp, &p.node).await {
                        tracing::warn!(node = p.node, error = %e2, "cleaning up a failed backup start");
                    }
                }
                for f in files {
                    let _ = std::fs::remove_file(f);
                }
                return Err(e);
            }
        };
        Ok(prep
            .into_iter()
            .zip(conns)
            .map(|(p, (nbd, bitmap_ctx, alloc_ctx))| Backup {
                node: p.node,
                names: p.names,
                workdir: workdir.clone(),
                fleece_path: p.fleece_path,
                socket: socket.clone(),
                nbd,
                bitmap_ctx,
                alloc_ctx,
                size: p.size,
            })
            .collect())
    }

    async fn start_in_qemu(
        qmp: &Qmp,
        prep: &[Prep],
        socket: &Path,
    ) -> Result<Vec<(Nbd<UnixStream>, u32, u32)>> {
        for p in prep {
            let (n, fleece) = (&p.names, p.fleece_path.display().to_string());
            // The overlay: an empty qcow2 made by QEMU itself (blockdev-create), its backing the disk.
            blockdev_create(
                qmp,
                &n.create_job,
                json!({"driver": "file", "filename": fleece, "size": 0}),
            )
            .await?;
            qmp.execute(
                "blockdev-add",
                json!({"driver": "file", "node-name": n.fleece_file, "filename": fleece}),
            )
            .await?;
            blockdev_create(
                qmp,
                &n.create_job,
                json!({"driver": "qcow2", "file": n.fleece_file, "size": p.size}),
            )
            .await?;
            qmp.execute(
                "blockdev-add",
                json!({"driver": "qcow2", "node-name": n.fleece, "file": n.fleece_file,
                       "backing": p.node, "discard": "unmap"}),
            )
            .await?;
        }
        // The point in time, for every disk at once: copy-before-write starts, the next bitmaps
        // start, the ax-cbt bitmaps freeze.
        let actions: Vec<Value> = prep
            .iter()
            .flat_map(|p| {
                let (node, n) = (&p.node, &p.names);
                [
                    action(
                        "blockdev-backup",
                        json!({"job-id": n.job, "device": node,
                            "target": n.fleece, "sync": "none"}),
                    ),
                    action(
                        "block-dirty-bitmap-add",
                        json!({"node": node, "name": BITMAP_NEXT,
                            "persistent": p.cbt.persistent, "granularity": p.cbt.granularity}),
                    ),
                    action(
                        "block-dirty-bitmap-disable",
                        json!({"node": node, "name": BITMAP}),
                    ),
                ]
            })
            .collect();
        qmp.execute("transaction", json!({ "actions": actions }))
            .await?;
        qmp.execute(
            "nbd-server-start",
            json!({"addr": {"type": "unix", "data": {"path": socket.display().to_string()}}}),
        )
        .await?;
        let mut conns = Vec::with_capacity(prep.len());
        for p in prep {
            let n = &p.names;
            qmp.execute(
                "block-export-add",
                json!({"type": "nbd", "id": n.export, "node-name": n.fleece, "name": n.export,
                       "writable": false, "bitmaps": [BITMAP]}),
            )
            .await?;
            let ctx = format!("qemu:dirty-bitmap:{BITMAP}");
            let opts = ConnectOptions {
                timeout: qmp.timeout,
                ..ConnectOptions::new(&n.export)
                    .context("base:allocation")
                    .context(&ctx)
            };
            let nbd = nbd::connect_unix(socket, &opts).await?;
            let bitmap_ctx = nbd
                .context_id(&ctx)
                .ok_or_else(|| CbtError::Unexpected(format!("the export has no {ctx} context")))?;
            let alloc_ctx = nbd
                .context_id("base:allocation")
                .ok_or_else(|| CbtError::Unexpected("the export has no base:allocation".into()))?;
            if nbd.size() != p.size {
                return Err(CbtError::Unexpected(format!(
                    "the export of {} is {} bytes, the disk {}",
                    p.node,
                    nbd.size(),
                    p.size
                )));
            }
            conns.push((nbd, bitmap_ctx, alloc_ctx));
        }
        Ok(conns)
    }

    /// The disk's virtual size.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The format node backed up.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The byte ranges written between the last stored version and this view (the frozen
    /// [`BITMAP`]), sorted and merged; at the bitmap's granularity.
    pub async fn dirty_ranges(&mut self) -> Result<Vec<Range<u64>>> {
        let extents = self.nbd.extents(self.bitmap_ctx, 0..self.size).await?;
        Ok(merge(
            extents
                .into_iter()
                .filter(|e| e.flags & nbd::STATE_DIRTY != 0)
                .map(|e| e.offset..e.offset + e.len)
                .collect(),
        ))
    }

    /// The view's allocation (`base:allocation` extents: `STATE_HOLE`, `STATE_ZERO`).
    pub async fn allocation(&mut self) -> Result<Vec<Extent>> {
        Ok(self.nbd.extents(self.alloc_ctx, 0..self.size).await?)
    }

    /// Reads `len` bytes of the view at `offset`.
    pub async fn read(&mut self, offset: u64, len: u64) -> Result<Vec<u8>> {
        Ok(self.nbd.read(offset, len).await?)
    }

    /// Writes the view into a sparse file at `path` of the disk's full size: the chunks of `ranges`
    /// rounded out to [`CHUNK_SIZE`], or everything when `None`; the rest of the file is a hole.
    /// `progress(done, total)` follows the bytes read.
    pub async fn copy_to(
        &mut self,
        path: &Path,
        ranges: Option<&[Range<u64>]>,
        mut progress: impl FnMut(u64, u64),
    ) -> Result<CopyReport> {
        let ranges = match ranges {
            Some(r) => chunk_ranges(r, self.size),
            None if self.size == 0 => Vec::new(),
            None => std::iter::once(0..self.size).collect(),
        };
        let total: u64 = ranges.iter().map(|r| r.end - r.start).sum();
        let what = || format!("writing {}", path.display());
        let mut f = tokio::fs::File::create(path)
            .await
            .map_err(io_err(what()))?;
        f.set_len(self.size).await.map_err(io_err(what()))?;
        let mut report = CopyReport {
            size: self.size,
            ranges: ranges.clone(),
            ..Default::default()
        };
        let step = CHUNK_SIZE.min(u64::from(self.nbd.info().max_block));
        progress(0, total);
        for r in &ranges {
            let mut at = r.start;
            while at < r.end {
                let n = step.min(r.end - at) as u32;
                for c in self.nbd.read_chunks(at, n).await? {
                    if let ReadChunk::Data { offset, data } = c {
                        report.bytes_data += data.len() as u64;
                        if data.iter().all(|&b| b == 0) {
                            continue; // stays a hole
                        }
                        f.seek(std::io::SeekFrom::Start(offset))
                            .await
                            .map_err(io_err(what()))?;
                        f.write_all(&data).await.map_err(io_err(what()))?;
                        report.bytes_written += data.len() as u64;
                    }
                }
                at += u64::from(n);
                report.bytes_read += u64::from(n);
                progress(report.bytes_read, total);
            }
        }
        f.flush().await.map_err(io_err(what()))?;
        f.sync_all().await.map_err(io_err(what()))?;
        Ok(report)
    }

    /// Ends the backup: the export and the overlay go, and the bitmaps are folded in one
    /// transaction. `stored`: the version made from this view was stored, so [`BITMAP`] restarts
    /// from the writes made since the view; otherwise those writes are merged into it and the next
    /// backup reads this one's changes again.
    pub async fn finish(self, qmp: &Qmp, stored: bool) -> Result<()> {
        let Backup {
            node,
            names: n,
            fleece_path,
            socket,
            nbd,
            ..
        } = self;
        if let Err(e) = nbd.disconnect().await {
            tracing::debug!(node, error = %e, "NBD disconnect");
        }
        teardown(qmp, &n).await?;
        let _ = std::fs::remove_file(&fleece_path);
        // The socket is shared by the backups of one `start_all`: it goes with the last export.
        if list(qmp, "query-block-exports").await?.is_empty() {
            let _ = std::fs::remove_file(&socket);
        }
        let mut actions = Vec::new();
        if stored {
            actions.push(action(
                "block-dirty-bitmap-clear",
                json!({"node": node, "name": BITMAP}),
            ));
        }
        actions.extend(fold_next(&node));
        qmp.execute("transaction", json!({"actions": actions}))
            .await?;
        Ok(())
    }

    /// The work directory.
    pub fn workdir(&self) -> &Path {
        &self.workdir
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_round_out_to_chunks() {
        let m = 1 << 20;
        let size = 64 * m;
        assert_eq!(
            chunk_ranges(&[m..m + 1, 5 * m..6 * m, 3 * m..4 * m], size),
            vec![0..8 * m]
        );
        assert_eq!(
            chunk_ranges(&[20 * m..20 * m + 65536, 60 * m..70 * m], size),
            vec![20 * m..24 * m, 60 * m..64 * m]
        );
        // A last partial chunk ends at the size.
        assert_eq!(
            chunk_ranges(&[9 * m..9 * m + 1, 9 * m..9 * m + 2], 10 * m),
            vec![8 * m..10 * m]
        );
        assert!(chunk_ranges(&[5..5, 7..7], size).is_empty());
    }

    #[test]
    fn node_names_are_checked() {
        assert!(names("disk0").is_ok());
        assert!(names("0disk").is_err());
        assert!(names("a-very-long-node-name-xx").is_err());
        assert!(names("disk 0").is_err());
        let n = names("disk0").unwrap();
        assert!(n.fleece_file.len() <= 31);
    }
}
