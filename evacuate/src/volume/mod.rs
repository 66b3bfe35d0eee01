//! Incremental replication of a raw disk image in 4 MiB chunks, with point-in-time versions.
//!
//! A **version** is a [`Manifest`]: the image size, the chunk size and, for every chunk in order, its
//! length, MD5 and SHA-256. Chunks are stored by a [`Backend`]; a version becomes visible only when its
//! manifest is stored, after every chunk it names, so a listed version is always whole.
//!
//! [`replicate`] finds the chunks that changed since the previous version — from the caller's write log
//! ([`Changes::WriteLog`], the byte ranges the block device wrote) or by hashing every chunk and comparing
//! with the previous manifest ([`Changes::Hashes`]) — and uploads only those. On a content-addressed backend
//! (Swift) a changed chunk that is already stored (uploaded by a crashed run, or equal to another chunk) is
//! not sent again. [`restore`] writes a version back to a file and checks every chunk's SHA-256, so a
//! corrupted object is an error, never silent. [`prune`] keeps the newest versions and deletes the chunks that
//! no remaining version references.
//!
//! Backends: [`swift`] (static large objects) and [`sheepdog`] (a VDI over the sheepdog wire protocol).
//!
//! One replication or prune per image at a time: the caller serialises them (the agent runs one task per
//! volume).

pub mod sheepdog;
pub mod swift;

use std::collections::{BTreeSet, HashSet};
use std::future::Future;
use std::io::{Seek, SeekFrom, Write};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use md5::Md5;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::task::JoinSet;

/// The chunk size: 4 MiB, Sheepdog's data object size and a good Swift segment size.
pub const CHUNK_SIZE: u64 = 4 << 20;

/// An error a backend returns; kept whole as the source of [`VolumeError::Backend`].
pub type BackendError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Errors of replication, restore and prune.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    /// Reading or writing a local image file.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The local file.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// A backend operation failed.
    #[error("backend {op} for image {image}: {source}")]
    Backend {
        /// The operation (`put_chunk`, `get_manifest`, …).
        op: &'static str,
        /// The image.
        image: String,
        /// The backend's error.
        source: BackendError,
    },
    /// A chunk read back does not have the content its manifest records.
    #[error("image {image} version {version} chunk {index}: {what} mismatch: manifest {expected}, stored {got}")]
    ChunkMismatch {
        /// The image.
        image: String,
        /// The version being restored.
        version: u64,
        /// The chunk index.
        index: u64,
        /// `length` or `sha256`.
        what: &'static str,
        /// What the manifest says.
        expected: String,
        /// What the backend returned.
        got: String,
    },
    /// A manifest that does not describe a whole image.
    #[error("manifest of image {image} version {version} is invalid: {reason}")]
    BadManifest {
        /// The image.
        image: String,
        /// The version.
        version: u64,
        /// What is wrong.
        reason: String,
    },
    /// A write log names bytes outside the image.
    #[error("write log range {start}..{end} is outside image {path} of {size} bytes")]
    BadWriteLog {
        /// The image file.
        path: String,
        /// Range start.
        start: u64,
        /// Range end.
        end: u64,
        /// The image size.
        size: u64,
    },
    /// A task of the upload pipeline panicked or was cancelled.
    #[error("upload task for image {image}: {message}")]
    Task {
        /// The image.
        image: String,
        /// The join error.
        message: String,
    },
    /// A setting out of range.
    #[error("invalid setting {name} = {value}: {reason}")]
    BadSetting {
        /// The setting.
        name: &'static str,
        /// Its value.
        value: String,
        /// Why it is refused.
        reason: &'static str,
    },
}

/// One chunk of a version.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ChunkRef {
    /// Chunk index: the chunk covers bytes `index * chunk_size ..` of the image.
    pub index: u64,
    /// Length in bytes (`chunk_size`, except for the last chunk).
    pub len: u64,
    /// MD5 of the content, lowercase hex (Swift's ETag).
    pub md5: String,
    /// SHA-256 of the content, lowercase hex: the chunk's identity and integrity check.
    pub sha256: String,
}

impl ChunkRef {
    /// Hashes `data` as chunk `index`.
    pub fn of(index: u64, data: &[u8]) -> ChunkRef {
        ChunkRef {
            index,
            len: data.len() as u64,
            md5: hex(&Md5::digest(data)),
            sha256: hex(&Sha256::digest(data)),
        }
    }
}

/// One version of an image: a consistent point in time.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// The image name.
    pub image: String,
    /// The version number, increasing from 1.
    pub version: u64,
    /// Image size in bytes.
    pub size: u64,
    /// Chunk size in bytes.
    pub chunk_size: u64,
    /// When the version was taken, milliseconds since the Unix epoch.
    pub created_unix_ms: u64,
    /// Every chunk, in index order.
    pub chunks: Vec<ChunkRef>,
}

impl Manifest {
    /// Checks that the chunks cover exactly `size` bytes in order, with well-formed hashes.
    pub fn validate(&self) -> Result<(), VolumeError> {
        let bad = |reason: String| VolumeError::BadManifest {
            image: self.image.clone(),
            version: self.version,
            reason,
        };
        if self.chunk_size == 0 {
            return Err(bad("chunk_size is 0".into()));
        }
        let want = self.size.div_ceil(self.chunk_size);
        if self.chunks.len() as u64 != want {
            return Err(bad(format!(
                "{} chunks for {} bytes in chunks of {} (want {want})",
                self.chunks.len(),
                self.size,
                self.chunk_size
            )));
        }
        for (i, c) in self.chunks.iter().enumerate() {
            let i = i as u64;
            let len = self.chunk_size.min(self.size - i * self.chunk_size);
            if c.index != i || c.len != len {
                return Err(bad(format!(
                    "chunk #{i} has index {} length {} (want index {i} length {len})",
                    c.index, c.len
                )));
            }
            if !is_hex(&c.md5, 32) || !is_hex(&c.sha256, 64) {
                return Err(bad(format!(
                    "chunk {i} has malformed hashes {:?} {:?}",
                    c.md5, c.sha256
                )));
            }
        }
        Ok(())
    }
}

/// Where chunks and manifests are stored.
///
/// Methods return futures that are `Send`, so replication can run them on tokio tasks.
pub trait Backend: Send + Sync + std::fmt::Debug {
    /// True when chunks are stored by content (SHA-256): equal chunks are stored once and a chunk already
    /// present need not be sent. False when stored by position (a Sheepdog VDI): every changed chunk is
    /// written.
    fn content_addressed(&self) -> bool;
    /// Called once before the chunks of a new version of `image` (of `size` bytes) are stored. A backend
    /// that stores by position (Sheepdog) opens or creates its volume here. It never withdraws a listed
    /// version: the last complete version stays restorable until the new one is complete.
    ///
    /// Returns the chunk indexes whose stored bytes may differ from the newest listed version (written by
    /// a run that did not complete): the engine rewrites them even when their content did not change.
    /// A content-addressed backend returns none.
    fn begin(
        &self,
        image: &str,
        size: u64,
    ) -> impl Future<Output = Result<BTreeSet<u64>, BackendError>> + Send {
        let _ = (image, size);
        async { Ok(BTreeSet::new()) }
    }
    /// Whether `chunk` of `image` is stored intact (checked by the backend, e.g. a Swift `HEAD` and ETag).
    fn has_chunk(
        &self,
        image: &str,
        chunk: &ChunkRef,
    ) -> impl Future<Output = Result<bool, BackendError>> + Send;
    /// Stores one chunk; `data` has `chunk.len` bytes hashing to `chunk`'s hashes.
    fn put_chunk(
        &self,
        image: &str,
        chunk: &ChunkRef,
        data: Vec<u8>,
    ) -> impl Future<Output = Result<(), BackendError>> + Send;
    /// Reads one chunk of `version` back (the caller checks its hash).
    fn get_chunk(
        &self,
        image: &str,
        version: u64,
        chunk: &ChunkRef,
    ) -> impl Future<Output = Result<Vec<u8>, BackendError>> + Send;
    /// Stores a manifest after all its chunks: from now on the version is listed.
    fn put_manifest(
        &self,
        manifest: &Manifest,
    ) -> impl Future<Output = Result<(), BackendError>> + Send;
    /// Reads the manifest of one version.
    fn get_manifest(
        &self,
        image: &str,
        version: u64,
    ) -> impl Future<Output = Result<Manifest, BackendError>> + Send;
    /// The versions of `image`, ascending; empty when there is none.
    fn list_versions(
        &self,
        image: &str,
    ) -> impl Future<Output = Result<Vec<u64>, BackendError>> + Send;
    /// Deletes a version's manifest and then `orphans`, its chunks that no remaining version references.
    fn delete_version(
        &self,
        manifest: &Manifest,
        orphans: &[ChunkRef],
    ) -> impl Future<Output = Result<(), BackendError>> + Send;
}

/// How [`replicate`] finds the changed chunks.
#[derive(Clone, Debug)]
pub enum Changes {
    /// Read and hash every chunk; upload those whose hash differs from the previous version.
    Hashes,
    /// Byte ranges written since the previous version (the block device's write log). Only chunks that
    /// overlap a range are read; the others are taken from the previous version. Falls back to
    /// [`Changes::Hashes`] when there is no previous version or its chunk size or image size differs.
    WriteLog(Vec<Range<u64>>),
}

/// Progress of a replication or restore.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Progress {
    /// Image bytes processed so far (read and hashed, and uploaded when changed).
    pub bytes_done: u64,
    /// Image bytes in all.
    pub bytes_total: u64,
    /// Bytes sent to or received from the backend so far.
    pub bytes_transferred: u64,
}

/// Settings of a replication.
#[derive(Clone, Debug)]
pub struct ReplicateOptions {
    /// How to find changed chunks.
    pub changes: Changes,
    /// Uploads in flight at once (≥ 1).
    pub concurrency: usize,
}

impl Default for ReplicateOptions {
    fn default() -> Self {
        ReplicateOptions {
            changes: Changes::Hashes,
            concurrency: 4,
        }
    }
}

/// What a replication did.
#[derive(Clone, Debug, PartialEq)]
pub struct ReplicateReport {
    /// The version created.
    pub version: u64,
    /// Image size in bytes.
    pub size: u64,
    /// Chunks in the image.
    pub chunks: u64,
    /// Chunks that differ from the previous version (all of them for a first version).
    pub changed: u64,
    /// Chunks actually sent to the backend.
    pub uploaded: u64,
    /// Changed chunks not sent because the backend already had them (resume, or equal content).
    pub already_stored: u64,
    /// Bytes sent to the backend.
    pub bytes_uploaded: u64,
    /// Wall time of the whole replication.
    pub elapsed: Duration,
}

impl ReplicateReport {
    /// Image bytes per second over the whole replication (MB/s = 10⁶ bytes/s).
    pub fn image_mb_s(&self) -> f64 {
        mb_s(self.size, self.elapsed)
    }
    /// Bytes sent per second (MB/s).
    pub fn upload_mb_s(&self) -> f64 {
        mb_s(self.bytes_uploaded, self.elapsed)
    }
}

/// What a restore did.
#[derive(Clone, Debug, PartialEq)]
pub struct RestoreReport {
    /// The version restored.
    pub version: u64,
    /// Bytes written.
    pub size: u64,
    /// Wall time.
    pub elapsed: Duration,
}

impl RestoreReport {
    /// Bytes restored per second (MB/s).
    pub fn mb_s(&self) -> f64 {
        mb_s(self.size, self.elapsed)
    }
}

fn mb_s(bytes: u64, elapsed: Duration) -> f64 {
    bytes as f64 / elapsed.as_secs_f64().max(1e-9) / 1e6
}

fn be<'a, E: Into<BackendError>>(
    op: &'static str,
    image: &'a str,
) -> impl FnOnce(E) -> VolumeError + 'a {
    move |e| VolumeError::Backend {
        op,
        image: image.to_string(),
        source: e.into(),
    }
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> VolumeError + 'a {
    move |source| VolumeError::Io {
        op,
        path: path.display().to_string(),
        source,
    }
}

/// The newest version of `image`, if any.
pub async fn latest<B: Backend>(backend: &B, image: &str) -> Result<Option<Manifest>, VolumeError> {
    let versions = backend
        .list_versions(image)
        .await
        .map_err(be("list_versions", image))?;
    match versions.last() {
        None => Ok(None),
        Some(&v) => {
            let m = backend
                .get_manifest(image, v)
                .await
                .map_err(be("get_manifest", image))?;
            m.validate()?;
            Ok(Some(m))
        }
    }
}

/// Replicates the image file at `path` as the next version of `image`.
///
/// The caller keeps the file still during the call (a consistent point in time: the VM paused, or a
/// snapshot of its disk). `progress` is called after every chunk.
pub async fn replicate<B: Backend + 'static>(
    backend: std::sync::Arc<B>,
    image: &str,
    path: &Path,
    options: &ReplicateOptions,
    progress: &(dyn Fn(Progress) + Sync),
) -> Result<ReplicateReport, VolumeError> {
    let started = Instant::now();
    if options.concurrency == 0 {
        return Err(VolumeError::BadSetting {
            name: "concurrency",
            value: "0".into(),
            reason: "at least one upload must be in flight",
        });
    }
    let previous = latest(backend.as_ref(), image).await?;
    let file = std::sync::Arc::new(std::fs::File::open(path).map_err(io_err("open", path))?);
    let size = file.metadata().map_err(io_err("stat", path))?.len();
    let n_chunks = size.div_ceil(CHUNK_SIZE);

    // Chunks whose stored bytes may differ from the previous version (a run that did not complete wrote
    // them): rewritten whatever their content.
    let stale = backend
        .begin(image, size)
        .await
        .map_err(be("begin", image))?;

    // Which chunks must be read: all, or those the write log touches (and the stale ones).
    let same_shape = previous
        .as_ref()
        .is_some_and(|p| p.chunk_size == CHUNK_SIZE && p.size == size);
    let to_read: Option<BTreeSet<u64>> = match (&options.changes, same_shape) {
        (Changes::WriteLog(ranges), true) => {
            let mut set = BTreeSet::new();
            for r in ranges {
                if r.start > r.end || r.end > size {
                    return Err(VolumeError::BadWriteLog {
                        path: path.display().to_string(),
                        start: r.start,
                        end: r.end,
                        size,
                    });
                }
                if r.start < r.end {
                    set.extend(r.start / CHUNK_SIZE..=(r.end - 1) / CHUNK_SIZE);
                }
            }
            Some(set)
        }
        _ => None,
    };

    // Chunks known to be stored: those of the previous version (and, as we go, those uploaded now).
    let mut known: HashSet<String> = HashSet::new();
    if let Some(p) = &previous {
        known.extend(p.chunks.iter().map(|c| c.sha256.clone()));
    }
    let content_addressed = backend.content_addressed();

    let mut chunks = Vec::with_capacity(n_chunks as usize);
    let mut report = ReplicateReport {
        version: previous.as_ref().map_or(1, |p| p.version + 1),
        size,
        chunks: n_chunks,
        changed: 0,
        uploaded: 0,
        already_stored: 0,
        bytes_uploaded: 0,
        elapsed: Duration::ZERO,
    };
    let mut done = 0u64;
    let mut tasks: JoinSet<Result<(bool, u64), VolumeError>> = JoinSet::new();
    let mut buf = Vec::new();

    for index in 0..n_chunks {
        let offset = index * CHUNK_SIZE;
        let len = CHUNK_SIZE.min(size - offset);
        let prev_chunk = previous
            .as_ref()
            .and_then(|p| p.chunks.get(index as usize))
            .filter(|c| c.len == len);
        if let (Some(set), Some(pc)) = (&to_read, prev_chunk) {
            if !set.contains(&index) && !stale.contains(&index) {
                chunks.push(pc.clone());
                done += len;
                progress(Progress {
                    bytes_done: done,
                    bytes_total: size,
                    bytes_transferred: report.bytes_uploaded,
                });
                continue;
            }
        }
        let mut data = std::mem::take(&mut buf);
        data.resize(len as usize, 0);
        let f = file.clone();
        let (chunk, data) = tokio::task::spawn_blocking(move || {
            f.read_exact_at(&mut data, offset)
                .map(|()| (ChunkRef::of(index, &data), data))
        })
        .await
        .map_err(|e| VolumeError::Task {
            image: image.to_string(),
            message: e.to_string(),
        })?
        .map_err(io_err("read", path))?;
        let unchanged =
            prev_chunk.is_some_and(|pc| pc.sha256 == chunk.sha256) && !stale.contains(&index);
        if !unchanged {
            report.changed += 1;
            if content_addressed && known.contains(&chunk.sha256) {
                // Equal to a chunk stored before or earlier in this run.
                report.already_stored += 1;
            } else {
                known.insert(chunk.sha256.clone());
                while tasks.len() >= options.concurrency {
                    let (sent, bytes) = join_next(&mut tasks, image).await?;
                    account(&mut report, sent, bytes);
                }
                let backend = backend.clone();
                let image_owned = image.to_string();
                let c = chunk.clone();
                tasks.spawn(async move {
                    if content_addressed
                        && backend
                            .has_chunk(&image_owned, &c)
                            .await
                            .map_err(be("has_chunk", &image_owned))?
                    {
                        return Ok((false, 0));
                    }
                    let n = data.len() as u64;
                    backend
                        .put_chunk(&image_owned, &c, data)
                        .await
                        .map_err(be("put_chunk", &image_owned))?;
                    Ok((true, n))
                });
            }
        } else {
            buf = data;
        }
        chunks.push(chunk);
        done += len;
        progress(Progress {
            bytes_done: done,
            bytes_total: size,
            bytes_transferred: report.bytes_uploaded,
        });
    }
    while !tasks.is_empty() {
        let (sent, bytes) = join_next(&mut tasks, image).await?;
        account(&mut report, sent, bytes);
    }
    progress(Progress {
        bytes_done: size,
        bytes_total: size,
        bytes_transferred: report.bytes_uploaded,
    });

    let manifest = Manifest {
        image: image.to_string(),
        version: report.version,
        size,
        chunk_size: CHUNK_SIZE,
        created_unix_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
        chunks,
    };
    manifest.validate()?;
    backend
        .put_manifest(&manifest)
        .await
        .map_err(be("put_manifest", image))?;
    report.elapsed = started.elapsed();
    tracing::info!(
        image,
        version = report.version,
        changed = report.changed,
        uploaded = report.uploaded,
        mb_s = report.image_mb_s(),
        "replicated"
    );
    Ok(report)
}

fn account(report: &mut ReplicateReport, sent: bool, bytes: u64) {
    if sent {
        report.uploaded += 1;
        report.bytes_uploaded += bytes;
    } else {
        report.already_stored += 1;
    }
}

async fn join_next(
    tasks: &mut JoinSet<Result<(bool, u64), VolumeError>>,
    image: &str,
) -> Result<(bool, u64), VolumeError> {
    match tasks.join_next().await {
        Some(Ok(r)) => r,
        Some(Err(e)) => Err(VolumeError::Task {
            image: image.to_string(),
            message: e.to_string(),
        }),
        None => Ok((false, 0)),
    }
}

/// Restores `version` of `image` into the file at `path` (created or truncated), bit-exact.
///
/// Every chunk is checked against the manifest's length and SHA-256; a mismatch is
/// [`VolumeError::ChunkMismatch`] and the file is left incomplete. Equal chunks are fetched once.
pub async fn restore<B: Backend>(
    backend: &B,
    image: &str,
    version: u64,
    path: &Path,
    progress: &(dyn Fn(Progress) + Sync),
) -> Result<RestoreReport, VolumeError> {
    let started = Instant::now();
    let manifest = backend
        .get_manifest(image, version)
        .await
        .map_err(be("get_manifest", image))?;
    manifest.validate()?;
    let mut file = std::fs::File::create(path).map_err(io_err("create", path))?;
    file.set_len(manifest.size)
        .map_err(io_err("truncate", path))?;
    let mut done = 0;
    let mut transferred = 0;
    let mut last: Option<(String, Vec<u8>)> = None;
    for c in &manifest.chunks {
        let data = match &last {
            Some((sha, data)) if *sha == c.sha256 => data.clone(),
            _ => {
                let data = backend
                    .get_chunk(image, version, c)
                    .await
                    .map_err(be("get_chunk", image))?;
                transferred += data.len() as u64;
                let mismatch = |what, expected: String, got: String| VolumeError::ChunkMismatch {
                    image: image.to_string(),
                    version,
                    index: c.index,
                    what,
                    expected,
                    got,
                };
                if data.len() as u64 != c.len {
                    return Err(mismatch(
                        "length",
                        c.len.to_string(),
                        data.len().to_string(),
                    ));
                }
                let sha = hex(&Sha256::digest(&data));
                if sha != c.sha256 {
                    return Err(mismatch("sha256", c.sha256.clone(), sha));
                }
                last = Some((sha, data.clone()));
                data
            }
        };
        file.seek(SeekFrom::Start(c.index * manifest.chunk_size))
            .map_err(io_err("seek", path))?;
        file.write_all(&data).map_err(io_err("write", path))?;
        done += c.len;
        progress(Progress {
            bytes_done: done,
            bytes_total: manifest.size,
            bytes_transferred: transferred,
        });
    }
    file.sync_all().map_err(io_err("fsync", path))?;
    Ok(RestoreReport {
        version,
        size: manifest.size,
        elapsed: started.elapsed(),
    })
}

/// What [`prune`] deleted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PruneReport {
    /// Versions deleted, oldest first.
    pub deleted_versions: Vec<u64>,
    /// Chunks deleted (referenced by no remaining version).
    pub deleted_chunks: u64,
}

/// Keeps the newest `retain` versions of `image` and deletes the older ones, oldest first.
///
/// A chunk is deleted only when no remaining version references it, and a version's manifest is deleted
/// before its chunks, so every listed version stays restorable at every moment (a crash can leak chunks,
/// never break a version).
pub async fn prune<B: Backend>(
    backend: &B,
    image: &str,
    retain: usize,
) -> Result<PruneReport, VolumeError> {
    if retain == 0 {
        return Err(VolumeError::BadSetting {
            name: "retain",
            value: "0".into(),
            reason: "keep at least the newest version",
        });
    }
    let versions = backend
        .list_versions(image)
        .await
        .map_err(be("list_versions", image))?;
    let mut report = PruneReport::default();
    if versions.len() <= retain {
        return Ok(report);
    }
    let mut manifests = Vec::with_capacity(versions.len());
    for &v in &versions {
        let m = backend
            .get_manifest(image, v)
            .await
            .map_err(be("get_manifest", image))?;
        m.validate()?;
        manifests.push(m);
    }
    let n_delete = versions.len() - retain;
    for i in 0..n_delete {
        let still: HashSet<&str> = manifests[i + 1..]
            .iter()
            .flat_map(|m| m.chunks.iter().map(|c| c.sha256.as_str()))
            .collect();
        let mut seen = HashSet::new();
        let orphans: Vec<ChunkRef> = manifests[i]
            .chunks
            .iter()
            .filter(|c| !still.contains(c.sha256.as_str()) && seen.insert(c.sha256.clone()))
            .cloned()
            .collect();
        backend
            .delete_version(&manifests[i], &orphans)
            .await
            .map_err(be("delete_version", image))?;
        report.deleted_versions.push(manifests[i].version);
        report.deleted_chunks += orphans.len() as u64;
    }
    Ok(report)
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

/// True when `s` is `len` lowercase hex digits.
pub fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// An in-memory content-addressed backend, for tests and as the reference behaviour.
#[derive(Debug, Default)]
pub struct MemoryBackend {
    inner: std::sync::Mutex<MemoryInner>,
}

#[derive(Debug, Default)]
struct MemoryInner {
    chunks: std::collections::HashMap<(String, String), Vec<u8>>,
    manifests: std::collections::BTreeMap<(String, u64), Manifest>,
    puts: u64,
}

/// Errors of [`MemoryBackend`].
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// No such chunk or version.
    #[error("{what} not found")]
    NotFound {
        /// What was looked for.
        what: String,
    },
}

impl MemoryBackend {
    /// How many chunks were stored by `put_chunk` so far.
    pub fn puts(&self) -> u64 {
        self.lock().puts
    }
    /// How many distinct chunks are stored.
    pub fn stored_chunks(&self) -> usize {
        self.lock().chunks.len()
    }
    /// Replaces a stored chunk's bytes (a corruption, for tests).
    pub fn corrupt(&self, image: &str, sha256: &str, data: Vec<u8>) {
        self.lock()
            .chunks
            .insert((image.to_string(), sha256.to_string()), data);
    }
    fn lock(&self) -> std::sync::MutexGuard<'_, MemoryInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Backend for MemoryBackend {
    fn content_addressed(&self) -> bool {
        true
    }
    async fn has_chunk(&self, image: &str, chunk: &ChunkRef) -> Result<bool, BackendError> {
        Ok(self
            .lock()
            .chunks
            .contains_key(&(image.to_string(), chunk.sha256.clone())))
    }
    async fn put_chunk(
        &self,
        image: &str,
        chunk: &ChunkRef,
        data: Vec<u8>,
    ) -> Result<(), BackendError> {
        let mut inner = self.lock();
        inner.puts += 1;
        inner
            .chunks
            .insert((image.to_string(), chunk.sha256.clone()), data);
        Ok(())
    }
    async fn get_chunk(
        &self,
        image: &str,
        _version: u64,
        chunk: &ChunkRef,
    ) -> Result<Vec<u8>, BackendError> {
        self.lock()
            .chunks
            .get(&(image.to_string(), chunk.sha256.clone()))
            .cloned()
            .ok_or_else(|| {
                MemoryError::NotFound {
                    what: format!("chunk {}", chunk.sha256),
                }
                .into()
            })
    }
    async fn put_manifest(&self, manifest: &Manifest) -> Result<(), BackendError> {
        self.lock()
            .manifests
            .insert((manifest.image.clone(), manifest.version), manifest.clone());
        Ok(())
    }
    async fn get_manifest(&self, image: &str, version: u64) -> Result<Manifest, BackendError> {
        self.lock()
            .manifests
            .get(&(image.to_string(), version))
            .cloned()
            .ok_or_else(|| {
                MemoryError::NotFound {
                    what: format!("version {version} of {image}"),
                }
                .into()
            })
    }
    async fn list_versions(&self, image: &str) -> Result<Vec<u64>, BackendError> {
        Ok(self
            .lock()
            .manifests
            .keys()
            .filter(|(i, _)| i == image)
            .map(|(_, v)| *v)
            .collect())
    }
    async fn delete_version(
        &self,
        manifest: &Manifest,
        orphans: &[ChunkRef],
    ) -> Result<(), BackendError> {
        let mut inner = self.lock();
        inner
            .manifests
            .remove(&(manifest.image.clone(), manifest.version));
        for c in orphans {
            inner
                .chunks
                .remove(&(manifest.image.clone(), c.sha256.clone()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// Incompressible test bytes: SHA-256 in counter mode.
    fn pattern(size: usize, seed: u64) -> Vec<u8> {
        let mut out = Vec::with_capacity(size + 32);
        let mut n = 0u64;
        while out.len() < size {
            out.extend_from_slice(&Sha256::digest(
                [seed.to_le_bytes(), n.to_le_bytes()].concat(),
            ));
            n += 1;
        }
        out.truncate(size);
        out
    }

    fn tmp(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("ax-volume-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        dir
    }

    fn quiet(_: Progress) {}

    #[tokio::test]
    async fn replicate_changes_restore_prune() {
        let dir = tmp("basic");
        let img = dir.join("disk.img");
        let size = 10 * CHUNK_SIZE as usize + 12345; // partial last chunk
        let mut data = pattern(size, 1);
        data[CHUNK_SIZE as usize * 3..CHUNK_SIZE as usize * 5].fill(0); // two equal chunks
        std::fs::write(&img, &data).expect("write image");
        let backend = Arc::new(MemoryBackend::default());
        let opts = ReplicateOptions::default();

        let r1 = replicate(backend.clone(), "vm1", &img, &opts, &quiet)
            .await
            .expect("v1");
        assert_eq!((r1.version, r1.chunks, r1.changed), (1, 11, 11));
        assert_eq!(r1.uploaded, 10, "the two zero chunks are stored once");
        assert_eq!(backend.puts(), 10);

        // Change bytes in chunks 2 and 10 (the partial one), and declare them by write log.
        data[2 * CHUNK_SIZE as usize + 7] ^= 0xff;
        data[size - 1] ^= 0x55;
        std::fs::write(&img, &data).expect("write image");
        let log = vec![
            2 * CHUNK_SIZE + 7..2 * CHUNK_SIZE + 8,
            size as u64 - 1..size as u64,
        ];
        let opts2 = ReplicateOptions {
            changes: Changes::WriteLog(log),
            concurrency: 2,
        };
        let r2 = replicate(backend.clone(), "vm1", &img, &opts2, &quiet)
            .await
            .expect("v2");
        assert_eq!((r2.version, r2.changed, r2.uploaded), (2, 2, 2));

        // Hash mode finds the same change set (one more chunk changed).
        data[7 * CHUNK_SIZE as usize] ^= 1;
        std::fs::write(&img, &data).expect("write image");
        let r3 = replicate(backend.clone(), "vm1", &img, &opts, &quiet)
            .await
            .expect("v3");
        assert_eq!((r3.version, r3.changed, r3.uploaded), (3, 1, 1));

        let out = dir.join("restored.img");
        restore(backend.as_ref(), "vm1", 3, &out, &quiet)
            .await
            .expect("restore v3");
        assert!(std::fs::read(&out).expect("read") == data);
        let v1 = restore(backend.as_ref(), "vm1", 1, &out, &quiet)
            .await
            .expect("restore v1");
        assert_eq!(v1.size, size as u64);

        let before = backend.stored_chunks();
        let p = prune(backend.as_ref(), "vm1", 1).await.expect("prune");
        assert_eq!(p.deleted_versions, vec![1, 2]);
        // v1 and v2's versions of chunks 2, 7 and 10 are gone; shared chunks stay.
        // v1's chunks 2 and 10 (v2 still had v1's chunk 7 then), and v2's chunk 7.
        assert_eq!(p.deleted_chunks, 3);
        assert_eq!(backend.stored_chunks(), before - 3);
        restore(backend.as_ref(), "vm1", 3, &out, &quiet)
            .await
            .expect("restore v3 after prune");
        assert!(std::fs::read(&out).expect("read") == data);
        std::fs::remove_dir_all(&dir).ok();
    }

    #[tokio::test]
    async fn corruption_is_detected() {
        let dir = tmp("corrupt");
        let img = dir.join("disk.img");
        std::fs::write(&img, pattern(3 * CHUNK_SIZE as usize, 2)).expect("write");
        let backend = Arc::new(MemoryBackend::default());
        replicate(
            backend.clone(),
            "vm",
            &img,
            &ReplicateOptions::default(),
            &quiet,
        )
        .await
        .expect("v1");
        let m = backend.get_manifest("vm", 1).await.expect("manifest");
        backend.corrupt("vm", &m.chunks[1].sha256, vec![0; CHUNK_SIZE as usize]);
        let err = restore(backend.as_ref(), "vm", 1, &dir.join("out"), &quiet)
            .await
            .expect_err("corrupt");
        assert!(
            matches!(
                err,
                VolumeError::ChunkMismatch {
                    index: 1,
                    what: "sha256",
                    ..
                }
            ),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn manifest_validation_names_the_problem() {
        let m = Manifest {
            image: "x".into(),
            version: 1,
            size: CHUNK_SIZE + 1,
            chunk_size: CHUNK_SIZE,
            created_unix_ms: 0,
            chunks: vec![ChunkRef::of(0, &[0; 4])],
        };
        let e = m.validate().expect_err("one chunk short").to_string();
        assert!(e.contains("1 chunks") && e.contains("want 2"), "{e}");
        assert_eq!(hex(&[0x0f, 0xa0]), "0fa0");
        assert!(is_hex("0fa0", 4) && !is_hex("0FA0", 4) && !is_hex("0fa", 4));
    }
}
