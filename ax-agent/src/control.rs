//! The VM worker's control-socket protocol (the agent daemon ↔ `ax-agent vm-worker`): requests, the
//! status a worker reports, migration and snapshot answers. How the node itself is steered
//! ([`NodeControl`], [`Role`], [`GuestEnd`]) lives in `ax_ft::control`, re-exported here.

pub use ax_ft::control::*;

use serde::{Deserialize, Serialize};

pub use crate::node::Peer;

/// Initial-sync progress as reported.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SyncInfo {
    /// Pre-copy round (0 = the full pass).
    pub round: u32,
    /// Frame bytes sent so far.
    pub bytes_sent: u64,
    /// Disk bytes copied / total.
    pub disk_done: u64,
    /// Disk size.
    pub disk_total: u64,
    /// The first consistent epoch was sent.
    pub done: bool,
    /// Rough fraction done, 0–1 (memory pass, then pre-copy rounds).
    pub fraction: f64,
}

/// A worker's report (`{"op":"status"}` on its control socket).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WorkerStatus {
    /// The VM.
    pub vm: String,
    /// The worker's process id.
    pub pid: u32,
    /// Role (see [`Role`]), flattened: `starting`, `standby`, `secondary`, `solo`, `protected`.
    pub role: String,
    /// The other host of the pair, if any (primary of a secondary, secondary of a primary).
    pub peer: Option<String>,
    /// Generation held (primary).
    pub generation: Option<u64>,
    /// Last epoch sent.
    pub epoch_sent: u64,
    /// Last epoch acknowledged + 1 (0: none).
    pub epoch_acked_plus_one: u64,
    /// Frame bytes sent.
    pub bytes_sent: u64,
    /// Dirty memory captured (pages × 4096).
    pub raw_bytes: u64,
    /// Memory sections as sent (after XOR, zero elision, zstd).
    pub compressed_bytes: u64,
    /// Times the epoch thread waited for acks.
    pub throttled: u64,
    /// Stun histogram counts per bucket of [`crate::ft::STUN_BUCKETS_US`] (+ the overflow bucket).
    pub stun_buckets: Vec<u64>,
    /// Sum of stuns in µs.
    pub stun_sum_us: u64,
    /// Initial sync in progress or done.
    pub sync: Option<SyncInfo>,
    /// Released output bytes (absolute end offset).
    pub output_bytes: Option<u64>,
    /// Heartbeat round-trip time to the peer, µs (not measured yet: always absent).
    pub hb_rtt_us: Option<u64>,
    /// How the guest ended, once it has (the worker ends right after).
    #[serde(default)]
    pub guest_end: Option<GuestEnd>,
    /// A QEMU VM's live migration, on either end.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<MigrationInfo>,
    /// The VM was lost to a double failure while this host followed it: what is left on each host
    /// (the daemon records it as an event).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_lost: Option<String>,
}

/// A QEMU VM's live migration as its worker reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationInfo {
    /// Destination: `incoming` (waiting), `running` (the guest runs here). Source: `running`,
    /// `completed` (the guest's state is on the destination; stopped here), `failed` (the guest runs on
    /// here), `resumed` (a completed migration undone: the guest runs here again).
    pub state: String,
    /// Destination: where it listens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub incoming: Option<ax_qemu::migrate::Incoming>,
    /// Source: the latest progress.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<ax_qemu::migrate::Progress>,
    /// Source: the figures of a completed migration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report: Option<ax_qemu::migrate::MigrateReport>,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl WorkerStatus {
    /// Stun p99 in µs, from the histogram (the bucket's upper bound; `None` without epochs).
    pub fn stun_p99_us(&self) -> Option<u64> {
        let total: u64 = self.stun_buckets.iter().sum();
        if total == 0 {
            return None;
        }
        let want = (total * 99).div_ceil(100);
        let mut seen = 0;
        for (i, n) in self.stun_buckets.iter().enumerate() {
            seen += n;
            if seen >= want {
                return Some(
                    crate::ft::STUN_BUCKETS_US
                        .get(i)
                        .copied()
                        .unwrap_or(u64::MAX),
                );
            }
        }
        None
    }

    /// Epochs sent but not acknowledged.
    pub fn ack_lag(&self) -> u64 {
        (self.epoch_sent + 1).saturating_sub(self.epoch_acked_plus_one)
    }
}

/// A request on a worker's control socket (one JSON line per connection).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum WorkerRequest {
    /// Report [`WorkerStatus`].
    Status,
    /// Protect the VM to this peer (replaces the peers).
    Protect {
        /// The secondary's worker.
        peer: Peer,
    },
    /// Stop protecting: no peers (epochs stop, the VM runs solo).
    Unprotect,
    /// Set the peers a standby accepts sessions from / a promoted primary re-protects to.
    SetPeers {
        /// The peers.
        peers: Vec<Peer>,
    },
    /// Stop the worker (the VM is destroyed).
    Stop,
    /// Copy the VM's disk, crash-consistent, to `to` while the VM runs (for volume replication).
    SnapshotDisk {
        /// Destination file (created or truncated).
        to: std::path::PathBuf,
        /// Pace of the unlocked copy, bytes/s (`None`: full speed).
        #[serde(default)]
        max_bytes_per_s: Option<u64>,
        /// The token of the snapshot the daemon's changed-chunk map is up to date with. A QEMU VM's
        /// worker copies only the changed chunks when its own change chain follows this token (the
        /// daemon then uses the write log), and the whole disk otherwise (the daemon then hashes).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        since: Option<u64>,
        /// Destinations of the VM's further disks (`disk1`, `disk2`, … in order; `to` is `disk0`'s).
        /// A QEMU VM's worker copies all its disks at one instant and needs one per disk.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        more_to: Vec<std::path::PathBuf>,
    },
    /// A QEMU VM's source worker: the disks its migration copies (node, format, size).
    MigrationDisks,
    /// A QEMU VM's source worker: migrate to a prepared destination (runs in the background; followed
    /// through [`WorkerStatus::migration`]).
    MigrateTo {
        /// Where the destination listens.
        to: ax_qemu::migrate::Incoming,
        /// The disks to copy.
        disks: Vec<ax_qemu::migrate::DiskInfo>,
        /// The destination's host name (its certificate's name, checked by TLS).
        tls_hostname: String,
        /// QEMU's `downtime-limit` (ms).
        #[serde(default)]
        downtime_limit_ms: Option<u64>,
        /// QEMU's `max-bandwidth` for the migration stream (bytes/s; QEMU's default without).
        #[serde(default)]
        max_bandwidth: Option<u64>,
    },
    /// A QEMU VM's destination worker: the source confirmed the switch; run the guest here.
    MigrationFinish,
    /// A QEMU VM's source worker after a completed migration whose destination could not run the guest
    /// (and is gone): resume the guest here.
    MigrationResume,
}

/// What a disk snapshot did (`snapshot_disk` answer).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskSnapshotInfo {
    /// Image size.
    pub bytes: u64,
    /// Guest writes during the unlocked copy (copied again under the device lock).
    pub writes_during_copy: u64,
    /// Bytes copied again under the device lock.
    pub recopied_bytes: u64,
    /// How long the guest's block requests were held, µs.
    pub io_held_us: u64,
    /// The whole snapshot, ms.
    pub elapsed_ms: u64,
    /// The 4 MiB chunks the guest wrote since the previous snapshot (the block device's write log).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub changes: Option<DiskChanges>,
    /// The VM's further disks (`disk1`, … in order), copied at the same instant as this one
    /// (`more_to` of the request).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub more: Vec<DiskSnapshotInfo>,
}

/// [`statepoint::devices::ChunkChanges`] on the wire.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskChanges {
    /// Chunk size (4 MiB).
    pub chunk_size: u64,
    /// The previous snapshot's token these changes follow (`None`: the first since the VM started here).
    pub since: Option<u64>,
    /// This snapshot's token.
    pub token: u64,
    /// Indexes of the chunks written, ascending.
    pub chunks: Vec<u64>,
}

impl From<statepoint::devices::DiskSnapshot> for DiskSnapshotInfo {
    fn from(s: statepoint::devices::DiskSnapshot) -> Self {
        DiskSnapshotInfo {
            bytes: s.bytes,
            writes_during_copy: s.writes_during_copy,
            recopied_bytes: s.recopied_bytes,
            io_held_us: u64::try_from(s.io_held.as_micros()).unwrap_or(u64::MAX),
            elapsed_ms: u64::try_from(s.elapsed.as_millis()).unwrap_or(u64::MAX),
            changes: Some(DiskChanges {
                chunk_size: statepoint::devices::CHANGE_CHUNK,
                since: s.changes.since,
                token: s.changes.token,
                chunks: s.changes.chunks,
            }),
            more: Vec::new(),
        }
    }
}

/// The answer on a worker's control socket.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerResponse {
    /// Done.
    pub ok: bool,
    /// Why not.
    #[serde(default)]
    pub error: Option<String>,
    /// For `status`.
    #[serde(default)]
    pub status: Option<WorkerStatus>,
    /// For `snapshot_disk`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_snapshot: Option<DiskSnapshotInfo>,
    /// For `migration_disks`: the disks a QEMU VM's migration copies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disks: Option<Vec<ax_qemu::migrate::DiskInfo>>,
}

impl WorkerResponse {
    /// A refusal saying why.
    pub fn failed(error: String) -> Self {
        WorkerResponse {
            ok: false,
            error: Some(error),
            status: None,
            disk_snapshot: None,
            disks: None,
        }
    }

    /// Done, with nothing to report.
    pub fn done() -> Self {
        WorkerResponse {
            ok: true,
            error: None,
            status: None,
            disk_snapshot: None,
            disks: None,
        }
    }
}

/// The longest request line a worker reads from its control socket.
const MAX_REQUEST_LINE: u64 = 1 << 20;

/// Answers one connection to a worker's control socket: one JSON [`WorkerRequest`] line in (at most
/// [`MAX_REQUEST_LINE`] bytes), `handle`'s [`WorkerResponse`] line out.
pub async fn answer_one<F, Fut>(stream: tokio::net::UnixStream, handle: F) -> std::io::Result<()>
where
    F: FnOnce(WorkerRequest) -> Fut,
    Fut: std::future::Future<Output = WorkerResponse>,
{
    use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _};
    let (r, mut w) = stream.into_split();
    let mut line = String::new();
    tokio::io::BufReader::new(r.take(MAX_REQUEST_LINE))
        .read_line(&mut line)
        .await?;
    let resp = match serde_json::from_str::<WorkerRequest>(&line) {
        Err(e) => WorkerResponse::failed(format!("bad request: {e}")),
        Ok(req) => handle(req).await,
    };
    let mut out = serde_json::to_vec(&resp).unwrap_or_default();
    out.push(b'\n');
    w.write_all(&out).await?;
    w.shutdown().await
}

/// Sends one request to the worker socket at `path` and reads its answer (2 s timeout).
pub async fn call(
    path: &std::path::Path,
    req: &WorkerRequest,
) -> Result<WorkerResponse, std::io::Error> {
    call_within(path, req, std::time::Duration::from_secs(2)).await
}

/// [`call`] with its own timeout (for long requests: a disk snapshot).
pub async fn call_within(
    path: &std::path::Path,
    req: &WorkerRequest,
    timeout: std::time::Duration,
) -> Result<WorkerResponse, std::io::Error> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let fut = async {
        let mut s = tokio::net::UnixStream::connect(path).await?;
        let mut line = serde_json::to_vec(req)?;
        line.push(b'\n');
        s.write_all(&line).await?;
        let mut r = tokio::io::BufReader::new(s);
        let mut answer = String::new();
        r.read_line(&mut answer).await?;
        serde_json::from_str::<WorkerResponse>(&answer).map_err(std::io::Error::other)
    };
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "worker did not answer"))?
}
