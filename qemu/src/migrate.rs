//! QEMU live migration between two QEMUs, with a live copy of the VM's local disks (NBD mirror).
//!
//! The standard pattern for non-shared storage (libvirt's NBD migration):
//!
//! 1. Destination: started from the same [`QemuDef`] (its disks at its own paths, created empty and of the
//!    same virtual size and format by [`create_disk_images`]) with `-incoming defer`
//!    ([`crate::def::LaunchOptions`]). [`prepare_incoming`]: `nbd-server-start` + `block-export-add`
//!    (writable) for each disk node, then `migrate-incoming` on a TCP address.
//! 2. Source ([`run_source`]): `blockdev-add` an NBD client node per disk and `blockdev-mirror` (sync=full)
//!    each disk to it; wait until every mirror is ready (in sync, guest writes mirrored); set the
//!    capabilities (`events`, `pause-before-switchover`) and parameters (`downtime-limit`,
//!    `max-bandwidth`, TLS) and `migrate`. At `pre-switchover` (the source's vCPUs are stopped):
//!    `block-job-cancel` the mirrors (a ready mirror then completes without pivoting: the destination
//!    holds a point-in-time copy), drop the NBD nodes, `migrate-continue`. At `completed` the source stays
//!    stopped (`postmigrate`): the caller quits it.
//! 3. Destination ([`finish_incoming`]): wait until the guest runs, `nbd-server-stop`.
//!
//! Failure before the switch ([`abort_source`]): `migrate_cancel`, the mirrors cancelled, the NBD nodes
//! dropped, the source resumed if it was running before; [`migrate`] also kills the destination QEMU.
//! There are never two running copies: QEMU stops the source at the switch, and the destination runs only
//! once the source has sent its last state.
//!
//! TLS ([`TlsFiles`]): QEMU's `tls-creds-x509` object on both ends (server on the destination with
//! `verify-peer`, client on the source), for the migration stream (`tls-creds`, `tls-hostname`) and the NBD
//! connections alike. ax's PKI files (`ca.pem`, `<host>.pem`, `<host>-key.pem`) are linked into the
//! directory layout QEMU wants ([`lay_out_tls_dir`]).
//!
//! Every wait is bounded: a phase that makes no progress for [`MigrateOptions::stall_timeout`] is cancelled
//! with [`MigrateError::Stalled`]. See `docs/qemu-migration.md`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::{json, Value};

use crate::def::{Format, QemuDef};
use crate::process::Qemu;
use crate::qmp::{Events, Qmp, QmpError};

/// The id of the `tls-creds-x509` object ax adds on each end.
pub const TLS_OBJECT: &str = "ax-migrate-tls";

/// The prefix of the mirror jobs and NBD client nodes on the source (`ax-mig-disk0`).
const MIG_PREFIX: &str = "ax-mig-";

/// A migration failure.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// A QMP command failed.
    #[error("{step}: {source}")]
    Qmp {
        /// What was being done.
        step: String,
        /// The QMP error.
        source: QmpError,
    },
    /// Creating or inspecting a disk image, or laying out the TLS files.
    #[error("{what}: {why}")]
    Setup {
        /// Which file or step.
        what: String,
        /// Why.
        why: String,
    },
    /// A disk mirror failed.
    #[error("disk mirror {job} failed: {desc}")]
    Mirror {
        /// The job (`ax-mig-disk0`).
        job: String,
        /// QEMU's error.
        desc: String,
    },
    /// QEMU reported the migration as failed (or it was cancelled under us).
    #[error("migration {status}: {desc}")]
    Failed {
        /// `failed` or `cancelled`.
        status: String,
        /// QEMU's `error-desc`, when it gave one.
        desc: String,
    },
    /// No progress for too long: cancelled.
    #[error("{phase}: no progress for {secs} s ({what}): cancelled")]
    Stalled {
        /// `disk mirror`, `RAM migration`, `switchover`, `destination start`.
        phase: &'static str,
        /// The bound, in seconds.
        secs: u64,
        /// The last state seen.
        what: String,
    },
    /// The destination QEMU ended before the guest ran there.
    #[error("the destination QEMU ended during the migration ({how}); the source keeps running; what the source saw: {during}")]
    DestinationGone {
        /// How it ended (`killed by signal 9`).
        how: String,
        /// The source's view of the failure (or `nothing yet`).
        during: String,
    },
    /// The switch happened (the source sent its final state and stays stopped) but the destination did
    /// not report running: neither copy runs; the caller decides.
    #[error("after the switch: {0}")]
    AfterSwitch(String),
}

impl MigrateError {
    /// Whether the failure came after the switch, when the source must not simply be resumed.
    pub fn after_switch(&self) -> bool {
        matches!(self, MigrateError::AfterSwitch(_))
    }
}

fn qmp_err(step: impl Into<String>) -> impl FnOnce(QmpError) -> MigrateError {
    let step = step.into();
    move |source| MigrateError::Qmp { step, source }
}

/// One host's certificate files for QEMU's TLS (ax's PKI: `ax-agent certs --out DIR HOST…`).
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The cluster CA (`ca.pem`).
    pub ca: PathBuf,
    /// This host's certificate (`<host>.pem`), used as QEMU's server certificate on the destination and
    /// client certificate on the source.
    pub cert: PathBuf,
    /// Its key (`<host>-key.pem`).
    pub key: PathBuf,
    /// Where to lay out the directory QEMU reads (created; links to the files above).
    pub dir: PathBuf,
}

impl TlsFiles {
    /// The files of `host` in a directory written by `ax-agent certs --out DIR`, laid out for QEMU in
    /// `qemu_dir`.
    pub fn from_ax_certs(certs: &Path, host: &str, qemu_dir: &Path) -> TlsFiles {
        TlsFiles {
            ca: certs.join("ca.pem"),
            cert: certs.join(format!("{host}.pem")),
            key: certs.join(format!("{host}-key.pem")),
            dir: qemu_dir.to_path_buf(),
        }
    }
}

/// Lays out `files.dir` as QEMU's `tls-creds-x509` wants it: `ca-cert.pem`, `server-cert.pem`,
/// `server-key.pem`, `client-cert.pem`, `client-key.pem`, each a symbolic link to the absolute path of
/// ax's file (the same certificate serves as server and client: ax's host certificates allow both).
pub fn lay_out_tls_dir(files: &TlsFiles) -> Result<(), MigrateError> {
    let err = |what: &Path, e: std::io::Error| MigrateError::Setup {
        what: format!("TLS file {}", what.display()),
        why: e.to_string(),
    };
    std::fs::create_dir_all(&files.dir).map_err(|e| err(&files.dir, e))?;
    for (name, src) in [
        ("ca-cert.pem", &files.ca),
        ("server-cert.pem", &files.cert),
        ("server-key.pem", &files.key),
        ("client-cert.pem", &files.cert),
        ("client-key.pem", &files.key),
    ] {
        let src = std::fs::canonicalize(src).map_err(|e| err(src, e))?;
        let link = files.dir.join(name);
        match std::fs::remove_file(&link) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(err(&link, e)),
        }
        std::os::unix::fs::symlink(&src, &link).map_err(|e| err(&link, e))?;
    }
    Ok(())
}

/// Adds (replacing any earlier one) the `tls-creds-x509` object [`TLS_OBJECT`] to a QEMU.
async fn add_tls_object(qmp: &Qmp, files: &TlsFiles, server: bool) -> Result<(), MigrateError> {
    lay_out_tls_dir(files)?;
    let _ = qmp.execute("object-del", json!({ "id": TLS_OBJECT })).await;
    qmp.execute(
        "object-add",
        json!({
            "qom-type": "tls-creds-x509",
            "id": TLS_OBJECT,
            "dir": files.dir.display().to_string(),
            "endpoint": if server { "server" } else { "client" },
            "verify-peer": true,
        }),
    )
    .await
    .map_err(qmp_err(format!(
        "loading the TLS credentials from {} (object-add tls-creds-x509)",
        files.dir.display()
    )))?;
    Ok(())
}

/// A disk to copy: its node on both QEMUs (`disk0`…, [`QemuDef::all_disks`]) and its shape.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, Deserialize)]
pub struct DiskInfo {
    /// The format node's name.
    pub node: String,
    /// Its format.
    pub format: Format,
    /// Its virtual size in bytes.
    pub virtual_size: u64,
}

#[derive(Debug, Deserialize)]
struct NamedNode {
    #[serde(rename = "node-name", default)]
    node_name: String,
    #[serde(default)]
    drv: String,
    #[serde(default)]
    image: Option<ImageInfo>,
}

#[derive(Debug, Deserialize)]
struct ImageInfo {
    #[serde(rename = "virtual-size", default)]
    virtual_size: u64,
}

/// The disks of a running source QEMU started from `def` (from `query-named-block-nodes`).
pub async fn source_disks(src: &Qmp, def: &QemuDef) -> Result<Vec<DiskInfo>, MigrateError> {
    let nodes = src
        .execute("query-named-block-nodes", json!({ "flat": true }))
        .await
        .map_err(qmp_err(
            "listing the source's disks (query-named-block-nodes)",
        ))?;
    let nodes: Vec<NamedNode> = serde_json::from_value(nodes).map_err(|e| MigrateError::Setup {
        what: "query-named-block-nodes".into(),
        why: e.to_string(),
    })?;
    def.all_disks()
        .into_iter()
        .map(|(node, path)| {
            let find = |name: &str| {
                nodes
                    .iter()
                    .find(|n| n.node_name == name)
                    .ok_or_else(|| MigrateError::Setup {
                        what: format!("disk {name} ({})", path.display()),
                        why: "no such block node in the source QEMU".into(),
                    })
            };
            let mut n = find(&node)?;
            // A VM that may become FT (`QemuDef::colo`): the device's node is a quorum over the image's
            // format node `<node>-base`.
            if n.drv == "quorum" {
                n = find(&format!("{node}-base"))?;
            }
            let format = match n.drv.as_str() {
                "qcow2" => Format::Qcow2,
                "raw" => Format::Raw,
                o => {
                    return Err(MigrateError::Setup {
                        what: format!("disk {node}"),
                        why: format!("format {o:?} cannot be migrated (qcow2 or raw only)"),
                    })
                }
            };
            Ok(DiskInfo {
                node,
                format,
                virtual_size: n.image.as_ref().map_or(0, |i| i.virtual_size),
            })
        })
        .collect()
}

/// Creates the destination's empty disk images (`qemu-img create`), one per disk of `disks`, at the paths
/// of `dst_def`'s disks in order: run before launching the destination QEMU (its definition must name
/// existing files). Refuses to overwrite an existing file.
pub fn create_disk_images(disks: &[DiskInfo], dst_def: &QemuDef) -> Result<(), MigrateError> {
    let paths = dst_def.all_disks();
    if paths.len() != disks.len() {
        return Err(MigrateError::Setup {
            what: "destination disks".into(),
            why: format!(
                "the destination definition has {} disks, the source {}",
                paths.len(),
                disks.len()
            ),
        });
    }
    for (d, (_, path)) in disks.iter().zip(paths) {
        let what = || format!("creating {} ({})", path.display(), d.node);
        if path.exists() {
            return Err(MigrateError::Setup {
                what: what(),
                why: "the file exists already".into(),
            });
        }
        let out = std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", d.format.driver()])
            .arg(&path)
            .arg(d.virtual_size.to_string())
            .output()
            .map_err(|e| MigrateError::Setup {
                what: what(),
                why: format!("running qemu-img: {e}"),
            })?;
        if !out.status.success() {
            return Err(MigrateError::Setup {
                what: what(),
                why: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
    }
    Ok(())
}

/// Where the destination listens.
#[derive(Debug, Clone)]
pub struct Listen {
    /// The address to listen on and for the source to connect to (an IP address or a host name the
    /// source resolves; `127.0.0.1` on one host).
    pub host: String,
    /// The migration stream's port (0: any free one, read back from QEMU).
    pub migrate_port: u16,
    /// The NBD server's port (0: a free one, picked here).
    pub nbd_port: u16,
}

/// What the source needs to reach a prepared destination.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, Deserialize)]
pub struct Incoming {
    /// The host the source connects to.
    pub host: String,
    /// The migration stream's port.
    pub migrate_port: u16,
    /// The NBD server's port (exports named after the disk nodes); `None` without disks.
    pub nbd_port: Option<u16>,
}

fn tcp_uri(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("tcp:[{host}]:{port}")
    } else {
        format!("tcp:{host}:{port}")
    }
}

/// A free TCP port on `host` (bound and released: another process could take it in between).
pub fn free_port(host: &str) -> std::io::Result<u16> {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    Ok(std::net::TcpListener::bind((host, 0))?.local_addr()?.port())
}

/// Destination side: NBD server with a writable export per disk, then `migrate-incoming`. `dst` must
/// have been launched with `-incoming defer` from a definition whose disks were made by
/// [`create_disk_images`]. `tls`: the destination host's files (server end, peers verified).
pub async fn prepare_incoming(
    dst: &Qmp,
    disks: &[DiskInfo],
    listen: &Listen,
    tls: Option<&TlsFiles>,
) -> Result<Incoming, MigrateError> {
    let st = dst
        .execute("query-status", Value::Null)
        .await
        .map_err(qmp_err("destination query-status"))?;
    if st.get("status").and_then(Value::as_str) != Some("inmigrate") {
        return Err(MigrateError::Setup {
            what: "destination".into(),
            why: format!("not waiting for a migration (status {st}): launch it with LaunchOptions {{ incoming: true }}"),
        });
    }
    if let Some(t) = tls {
        add_tls_object(dst, t, true).await?;
    }
    dst.execute(
        "migrate-set-capabilities",
        json!({ "capabilities": [{ "capability": "events", "state": true }] }),
    )
    .await
    .map_err(qmp_err("destination migrate-set-capabilities"))?;
    dst.execute(
        "migrate-set-parameters",
        json!({ "tls-creds": if tls.is_some() { TLS_OBJECT } else { "" } }),
    )
    .await
    .map_err(qmp_err("destination migrate-set-parameters tls-creds"))?;
    let mut nbd_port = None;
    if !disks.is_empty() {
        let port = if listen.nbd_port == 0 {
            free_port(&listen.host).map_err(|e| MigrateError::Setup {
                what: format!("a free port on {}", listen.host),
                why: e.to_string(),
            })?
        } else {
            listen.nbd_port
        };
        let mut args = json!({
            "addr": { "type": "inet", "data": { "host": listen.host, "port": port.to_string() } },
        });
        if tls.is_some() {
            args["tls-creds"] = json!(TLS_OBJECT);
        }
        dst.execute("nbd-server-start", args)
            .await
            .map_err(qmp_err(format!(
                "destination nbd-server-start on {}:{port}",
                listen.host
            )))?;
        for d in disks {
            dst.execute(
                "block-export-add",
                json!({
                    "type": "nbd",
                    "id": format!("{MIG_PREFIX}{}", d.node),
                    "node-name": d.node,
                    "name": d.node,
                    "writable": true,
                }),
            )
            .await
            .map_err(qmp_err(format!(
                "destination block-export-add {} (does the destination define the same disks?)",
                d.node
            )))?;
        }
        nbd_port = Some(port);
    }
    dst.execute(
        "migrate-incoming",
        json!({ "uri": tcp_uri(&listen.host, listen.migrate_port) }),
    )
    .await
    .map_err(qmp_err("destination migrate-incoming"))?;
    let mut migrate_port = listen.migrate_port;
    if migrate_port == 0 {
        let info = dst
            .execute("query-migrate", Value::Null)
            .await
            .map_err(qmp_err("destination query-migrate"))?;
        migrate_port = info
            .get("socket-address")
            .and_then(Value::as_array)
            .and_then(|a| a.first())
            .and_then(|a| a.get("port"))
            .and_then(|p| {
                p.as_str()
                    .and_then(|s| s.parse().ok())
                    .or(p.as_u64().map(|p| p as u16))
            })
            .ok_or_else(|| MigrateError::Setup {
                what: "destination query-migrate".into(),
                why: format!("no listening port in {info}"),
            })?;
    }
    Ok(Incoming {
        host: listen.host.clone(),
        migrate_port,
        nbd_port,
    })
}

/// Destination side, after the source reported `completed`: waits (bounded by `timeout`) until the
/// incoming migration has ended on the destination, stops the NBD server and, when `start`, resumes the
/// guest (`cont`; a destination launched with `-incoming defer -S` waits `paused` for it) and waits until it
/// runs. With `start` false the guest stays `paused` (the caller sends `cont`).
pub async fn finish_incoming(
    dst: &Qmp,
    start: bool,
    timeout: Duration,
) -> Result<(), MigrateError> {
    let deadline = Instant::now() + timeout;
    let status = |st: &Value| {
        st.get("status")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string()
    };
    let mut st;
    loop {
        st = dst
            .execute("query-status", Value::Null)
            .await
            .map_err(qmp_err("destination query-status"))?;
        match status(&st).as_str() {
            "running" | "paused" => break,
            "inmigrate" | "prelaunch" | "finish-migrate" | "restore-vm" => {}
            o => {
                return Err(MigrateError::Setup {
                    what: "destination".into(),
                    why: format!("run state {o:?} after the migration"),
                })
            }
        }
        if Instant::now() >= deadline {
            return Err(MigrateError::Stalled {
                phase: "destination start",
                secs: timeout.as_secs(),
                what: format!("status {st}"),
            });
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    if start && status(&st) == "paused" {
        dst.execute("cont", Value::Null)
            .await
            .map_err(qmp_err("destination cont"))?;
    }
    match dst.execute("nbd-server-stop", Value::Null).await {
        Ok(_) => Ok(()),
        // No disks: no server.
        Err(QmpError::Command { desc, .. }) if desc.contains("not running") => Ok(()),
        Err(e) => Err(qmp_err("destination nbd-server-stop")(e)),
    }
}

/// How to migrate.
#[derive(Debug, Clone)]
pub struct MigrateOptions {
    /// `downtime-limit` (ms): the longest stop QEMU plans for at the switch (QEMU's default: 300).
    pub downtime_limit_ms: Option<u64>,
    /// `max-bandwidth` (bytes/s) of the RAM stream (QEMU's default: 32 MiB/s).
    pub max_bandwidth: Option<u64>,
    /// The `auto-converge` capability: QEMU throttles the guest's vCPUs when RAM does not converge.
    pub auto_converge: bool,
    /// A phase that makes no progress for this long is cancelled ([`MigrateError::Stalled`]).
    pub stall_timeout: Duration,
    /// The whole migration's bound (mirrors + RAM), `None`: none beyond [`Self::stall_timeout`]. A
    /// migration that does not converge (the guest dirties memory faster than it is sent) keeps making
    /// progress: only this ends it.
    pub timeout: Option<Duration>,
    /// `tls-hostname`: the name in the destination's certificate (default: the destination host).
    pub tls_hostname: Option<String>,
    /// How often `query-migrate` / `query-jobs` are polled (events wake the loop earlier when given).
    pub poll: Duration,
    /// Whether [`migrate`] resumes the guest on the destination (`cont`) once the migration completed;
    /// `false` leaves it `paused` there (both copies stopped) for the caller to inspect and `cont`.
    pub start_destination: bool,
}

impl Default for MigrateOptions {
    fn default() -> Self {
        MigrateOptions {
            downtime_limit_ms: None,
            max_bandwidth: None,
            auto_converge: false,
            stall_timeout: Duration::from_secs(30),
            timeout: None,
            tls_hostname: None,
            poll: Duration::from_millis(50),
            start_destination: true,
        }
    }
}

/// The phase a [`Progress`] report is from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Mirrors copying the disks, before the RAM migration.
    Disks,
    /// RAM being sent (the guest runs; disks mirrored as they are written).
    Ram,
    /// The source is stopped; mirrors flushed, final state sent.
    Switchover,
}

/// Progress, reported to the caller's callback at every poll.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, Deserialize)]
pub struct Progress {
    /// The phase (`None` before the first).
    pub phase: Option<Phase>,
    /// Milliseconds since the start.
    pub elapsed_ms: u64,
    /// Disk bytes copied so far (sum over the mirrors).
    pub disk_done: u64,
    /// Disk bytes to copy (sum; grows as the guest writes).
    pub disk_total: u64,
    /// QEMU's migration status (`setup`, `active`, `pre-switchover`, `device`, `completed`…).
    pub status: String,
    /// RAM bytes sent.
    pub ram_transferred: u64,
    /// RAM bytes still dirty.
    pub ram_remaining: u64,
    /// The guest's RAM.
    pub ram_total: u64,
    /// Passes over RAM so far (`dirty-sync-count`).
    pub passes: u64,
}

/// The result of a completed migration, from the source's `query-migrate` at completion.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, Deserialize)]
pub struct MigrateReport {
    /// The guest's stop at the switch, as QEMU measured it (includes flushing the mirrors).
    pub downtime_ms: u64,
    /// The RAM migration's time, as QEMU measured it (`migrate` to `completed`).
    pub total_ms: u64,
    /// QEMU's setup time (before the first RAM pass).
    pub setup_ms: u64,
    /// The disk mirrors' time until all were in sync (before the RAM migration).
    pub mirror_ms: u64,
    /// Wall time of the whole migration, mirrors included, until the source reported `completed`.
    pub wall_ms: u64,
    /// Until the guest ran on the destination, from the start (filled by [`migrate`] when it starts the
    /// destination; 0 from [`run_source`]).
    pub until_running_ms: u64,
    /// The guest's stop as seen from here: from the source reaching `pre-switchover` (its vCPUs stopped)
    /// to the destination's `cont` answered (filled by [`migrate`] when it starts the destination); it
    /// includes `downtime_ms` and the destination's start.
    pub observed_stop_ms: u64,
    /// RAM bytes sent.
    pub ram_transferred: u64,
    /// The guest's RAM.
    pub ram_total: u64,
    /// Pages found all zero (sent as a marker).
    pub ram_duplicate_pages: u64,
    /// Passes over RAM.
    pub passes: u64,
    /// Disk bytes the mirrors copied (the disks' sizes plus writes mirrored during the migration).
    pub disk_bytes: u64,
    /// The disks copied.
    pub disks: usize,
    /// Whether the streams were TLS.
    pub tls: bool,
    /// When the source was seen stopped at `pre-switchover`.
    #[serde(skip)]
    pub(crate) stopped_at: Option<Instant>,
}

#[derive(Debug, Deserialize, Default)]
struct MigInfo {
    #[serde(default)]
    status: String,
    #[serde(default)]
    ram: Option<RamInfo>,
    #[serde(rename = "total-time", default)]
    total_time: Option<u64>,
    #[serde(default)]
    downtime: Option<u64>,
    #[serde(rename = "setup-time", default)]
    setup_time: Option<u64>,
    #[serde(rename = "error-desc", default)]
    error_desc: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
struct RamInfo {
    #[serde(default)]
    transferred: u64,
    #[serde(default)]
    remaining: u64,
    #[serde(default)]
    total: u64,
    #[serde(default)]
    duplicate: u64,
    #[serde(rename = "dirty-sync-count", default)]
    dirty_sync_count: u64,
}

#[derive(Debug, Deserialize)]
struct JobInfo {
    id: String,
    status: String,
    #[serde(rename = "current-progress", default)]
    current: u64,
    #[serde(rename = "total-progress", default)]
    total: u64,
    #[serde(default)]
    error: Option<String>,
}

async fn query_migrate(qmp: &Qmp) -> Result<MigInfo, MigrateError> {
    let v = qmp
        .execute("query-migrate", Value::Null)
        .await
        .map_err(qmp_err("source query-migrate"))?;
    serde_json::from_value(v.clone()).map_err(|e| MigrateError::Setup {
        what: "source query-migrate".into(),
        why: format!("{e}: {v}"),
    })
}

/// Our jobs on the source (`ax-mig-…`).
async fn our_jobs(qmp: &Qmp) -> Result<Vec<JobInfo>, MigrateError> {
    let v = qmp
        .execute("query-jobs", Value::Null)
        .await
        .map_err(qmp_err("source query-jobs"))?;
    let jobs: Vec<JobInfo> = serde_json::from_value(v).map_err(|e| MigrateError::Setup {
        what: "source query-jobs".into(),
        why: e.to_string(),
    })?;
    Ok(jobs
        .into_iter()
        .filter(|j| j.id.starts_with(MIG_PREFIX))
        .collect())
}

/// Waits for the next poll: `poll`, or earlier when an event arrives.
async fn tick(events: &mut Option<&mut Events>, poll: Duration) {
    match events {
        Some(ev) => {
            let _ = tokio::time::timeout(poll, ev.next()).await;
        }
        None => tokio::time::sleep(poll).await,
    }
}

/// A watchdog on one number that must keep changing.
struct Stall {
    last: Option<(u64, Instant)>,
    bound: Duration,
}

impl Stall {
    fn new(bound: Duration) -> Self {
        Stall { last: None, bound }
    }
    /// Whether `value` has not changed for the bound.
    fn stuck(&mut self, value: u64) -> bool {
        let now = Instant::now();
        match self.last {
            Some((v, at)) if v == value => now.duration_since(at) >= self.bound,
            _ => {
                self.last = Some((value, now));
                false
            }
        }
    }
    fn reset(&mut self) {
        self.last = None;
    }
}

/// Source side: mirrors the disks to the destination's NBD exports, migrates RAM, flushes the mirrors at
/// the switch. On `Ok` the source is stopped (`postmigrate`) and the guest runs (or is about to) on the
/// destination: quit the source. On `Err` (other than [`MigrateError::AfterSwitch`]) everything was undone
/// on the source ([`abort_source`]): it runs as before; the destination must be killed by the caller.
///
/// `events`: the source's event stream, when the caller can lend it (wakes the loop at once on state
/// changes; polling alone adds up to [`MigrateOptions::poll`] to the downtime). `tls`: the source host's
/// files (client end).
pub async fn run_source(
    src: &Qmp,
    events: Option<&mut Events>,
    disks: &[DiskInfo],
    to: &Incoming,
    opts: &MigrateOptions,
    tls: Option<&TlsFiles>,
    progress: &mut (dyn FnMut(&Progress) + Send),
) -> Result<MigrateReport, MigrateError> {
    let was_running = src
        .execute("query-status", Value::Null)
        .await
        .map_err(qmp_err("source query-status"))?
        .get("running")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    match source_steps(src, events, disks, to, opts, tls, progress).await {
        Ok(r) => Ok(r),
        Err(e) if e.after_switch() => Err(e),
        Err(e) => {
            tracing::warn!(error = %e, "migration failed: undoing it on the source");
            abort_source(src, disks, was_running).await;
            Err(e)
        }
    }
}

async fn source_steps(
    src: &Qmp,
    mut events: Option<&mut Events>,
    disks: &[DiskInfo],
    to: &Incoming,
    opts: &MigrateOptions,
    tls: Option<&TlsFiles>,
    progress: &mut (dyn FnMut(&Progress) + Send),
) -> Result<MigrateReport, MigrateError> {
    let start = Instant::now();
    let deadline = opts.timeout.map(|t| start + t);
    let over = |phase: &'static str, what: String| -> Result<(), MigrateError> {
        match deadline {
            Some(d) if Instant::now() >= d => Err(MigrateError::Stalled {
                phase,
                secs: opts.timeout.unwrap_or_default().as_secs(),
                what: format!("the whole migration's bound is reached; {what}"),
            }),
            _ => Ok(()),
        }
    };
    let hostname = opts.tls_hostname.clone().unwrap_or_else(|| to.host.clone());
    if let Some(t) = tls {
        add_tls_object(src, t, false).await?;
    }
    let mut report = MigrateReport {
        disks: disks.len(),
        tls: tls.is_some(),
        ..MigrateReport::default()
    };

    // 1. Mirrors.
    if !disks.is_empty() {
        let port = to.nbd_port.ok_or_else(|| MigrateError::Setup {
            what: "destination".into(),
            why: "no NBD server for the disks".into(),
        })?;
        for d in disks {
            let name = format!("{MIG_PREFIX}{}", d.node);
            let mut node = json!({
                "driver": "nbd",
                "node-name": name,
                "server": { "type": "inet", "host": to.host, "port": port.to_string() },
                "export": d.node,
            });
            if tls.is_some() {
                node["tls-creds"] = json!(TLS_OBJECT);
                node["tls-hostname"] = json!(hostname);
            }
            src.execute("blockdev-add", node)
                .await
                .map_err(qmp_err(format!(
                    "connecting to the destination's NBD export {} at {}:{port} (blockdev-add)",
                    d.node, to.host
                )))?;
            src.execute(
                "blockdev-mirror",
                json!({
                    "job-id": name,
                    "device": d.node,
                    "target": name,
                    "sync": "full",
                    "auto-dismiss": false,
                }),
            )
            .await
            .map_err(qmp_err(format!("blockdev-mirror {}", d.node)))?;
        }
        let mut stall = Stall::new(opts.stall_timeout);
        loop {
            let jobs = our_jobs(src).await?;
            for j in &jobs {
                if j.status == "concluded" || j.status == "aborting" || j.error.is_some() {
                    return Err(MigrateError::Mirror {
                        job: j.id.clone(),
                        desc: j
                            .error
                            .clone()
                            .unwrap_or_else(|| format!("ended early ({})", j.status)),
                    });
                }
            }
            if jobs.len() < disks.len() {
                return Err(MigrateError::Mirror {
                    job: MIG_PREFIX.to_string(),
                    desc: "a mirror job vanished".into(),
                });
            }
            let done: u64 = jobs.iter().map(|j| j.current).sum();
            let total: u64 = jobs.iter().map(|j| j.total).sum();
            progress(&Progress {
                phase: Some(Phase::Disks),
                elapsed_ms: start.elapsed().as_millis() as u64,
                disk_done: done,
                disk_total: total,
                ..Progress::default()
            });
            if jobs.iter().all(|j| j.status == "ready") {
                break;
            }
            if stall.stuck(done) {
                return Err(MigrateError::Stalled {
                    phase: "disk mirror",
                    secs: opts.stall_timeout.as_secs(),
                    what: format!("{done} of {total} bytes copied"),
                });
            }
            over("disk mirror", format!("{done} of {total} bytes copied"))?;
            tick(&mut events, opts.poll).await;
        }
        report.mirror_ms = start.elapsed().as_millis() as u64;
    }

    // 2. RAM.
    let mut caps = vec![
        json!({ "capability": "events", "state": true }),
        json!({ "capability": "pause-before-switchover", "state": true }),
    ];
    caps.push(json!({ "capability": "auto-converge", "state": opts.auto_converge }));
    src.execute("migrate-set-capabilities", json!({ "capabilities": caps }))
        .await
        .map_err(qmp_err("source migrate-set-capabilities"))?;
    let mut params = json!({
        "tls-creds": if tls.is_some() { TLS_OBJECT } else { "" },
        "tls-hostname": if tls.is_some() { hostname.as_str() } else { "" },
    });
    if let Some(ms) = opts.downtime_limit_ms {
        params["downtime-limit"] = json!(ms);
    }
    if let Some(bw) = opts.max_bandwidth {
        params["max-bandwidth"] = json!(bw);
    }
    src.execute("migrate-set-parameters", params)
        .await
        .map_err(qmp_err("source migrate-set-parameters"))?;
    src.execute(
        "migrate",
        json!({ "uri": tcp_uri(&to.host, to.migrate_port) }),
    )
    .await
    .map_err(qmp_err(format!(
        "migrate to {}",
        tcp_uri(&to.host, to.migrate_port)
    )))?;
    let mut stall = Stall::new(opts.stall_timeout);
    let mut switched = false;
    loop {
        let info = query_migrate(src).await?;
        let ram = info.ram.as_ref();
        let p = Progress {
            phase: Some(if switched || info.status == "device" {
                Phase::Switchover
            } else {
                Phase::Ram
            }),
            elapsed_ms: start.elapsed().as_millis() as u64,
            status: info.status.clone(),
            ram_transferred: ram.map_or(0, |r| r.transferred),
            ram_remaining: ram.map_or(0, |r| r.remaining),
            ram_total: ram.map_or(0, |r| r.total),
            passes: ram.map_or(0, |r| r.dirty_sync_count),
            ..Progress::default()
        };
        progress(&p);
        match info.status.as_str() {
            "completed" => {
                // QEMU sets the status before it computes the times: read them again until they are
                // there (bounded).
                let mut info = info;
                let until = Instant::now() + Duration::from_secs(2);
                while info.total_time.unwrap_or(0) == 0 && Instant::now() < until {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    info = query_migrate(src).await?;
                }
                let ram = info.ram.as_ref();
                report.downtime_ms = info.downtime.unwrap_or(0);
                report.total_ms = info.total_time.unwrap_or(0);
                report.setup_ms = info.setup_time.unwrap_or(0);
                if let Some(r) = ram {
                    report.ram_transferred = r.transferred;
                    report.ram_total = r.total;
                    report.ram_duplicate_pages = r.duplicate;
                    report.passes = r.dirty_sync_count;
                }
                report.wall_ms = start.elapsed().as_millis() as u64;
                break;
            }
            "failed" | "cancelled" | "cancelling" => {
                return Err(MigrateError::Failed {
                    status: info.status.clone(),
                    desc: info
                        .error_desc
                        .clone()
                        .unwrap_or_else(|| "QEMU gave no reason".into()),
                });
            }
            "pre-switchover" if !switched => {
                report.stopped_at = Some(Instant::now());
                // The source's vCPUs are stopped: flush the mirrors (a ready mirror cancelled completes
                // without pivoting, once source and target are identical), then let QEMU switch.
                report.disk_bytes = flush_mirrors(src, disks, opts.stall_timeout).await?;
                src.execute("migrate-continue", json!({ "state": "pre-switchover" }))
                    .await
                    .map_err(qmp_err("migrate-continue"))?;
                switched = true;
                stall.reset();
                continue;
            }
            _ => {}
        }
        // Mirrors must stay healthy while RAM is sent.
        if !switched {
            for j in our_jobs(src).await? {
                if j.status != "ready" && j.status != "running" {
                    return Err(MigrateError::Mirror {
                        job: j.id.clone(),
                        desc: j
                            .error
                            .unwrap_or_else(|| format!("left sync ({})", j.status)),
                    });
                }
            }
        }
        // Progress: bytes sent, or a change of status.
        let mark = p.ram_transferred ^ (u64::from(switched) << 63);
        if stall.stuck(mark) {
            let _ = src.execute("migrate_cancel", Value::Null).await;
            return Err(MigrateError::Stalled {
                phase: if switched {
                    "switchover"
                } else {
                    "RAM migration"
                },
                secs: opts.stall_timeout.as_secs(),
                what: format!(
                    "status {}, {} bytes sent, {} remaining",
                    info.status, p.ram_transferred, p.ram_remaining
                ),
            });
        }
        if !switched {
            over(
                "RAM migration",
                format!(
                    "status {}, pass {}, {} bytes remaining",
                    info.status, p.passes, p.ram_remaining
                ),
            )?;
        }
        tick(&mut events, opts.poll).await;
    }
    Ok(report)
}

/// Cancels the (ready) mirrors on a stopped source, waits until each completed, dismisses them and drops
/// the NBD nodes; the bytes they copied.
async fn flush_mirrors(
    src: &Qmp,
    disks: &[DiskInfo],
    bound: Duration,
) -> Result<u64, MigrateError> {
    let mut bytes = 0;
    if disks.is_empty() {
        return Ok(0);
    }
    for d in disks {
        let id = format!("{MIG_PREFIX}{}", d.node);
        src.execute("block-job-cancel", json!({ "device": id }))
            .await
            .map_err(qmp_err(format!("block-job-cancel {id}")))?;
    }
    let deadline = Instant::now() + bound;
    loop {
        let jobs = our_jobs(src).await?;
        if jobs.iter().all(|j| j.status == "concluded") {
            for j in &jobs {
                if let Some(e) = &j.error {
                    // A cancel of a mirror that was not in sync reports "Operation canceled".
                    return Err(MigrateError::Mirror {
                        job: j.id.clone(),
                        desc: format!("at the switch: {e}"),
                    });
                }
                bytes += j.current;
            }
            break;
        }
        if Instant::now() >= deadline {
            return Err(MigrateError::Stalled {
                phase: "switchover",
                secs: bound.as_secs(),
                what: "flushing the disk mirrors".into(),
            });
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for d in disks {
        let id = format!("{MIG_PREFIX}{}", d.node);
        src.execute("job-dismiss", json!({ "id": id }))
            .await
            .map_err(qmp_err(format!("job-dismiss {id}")))?;
        src.execute("blockdev-del", json!({ "node-name": id }))
            .await
            .map_err(qmp_err(format!("blockdev-del {id}")))?;
    }
    Ok(bytes)
}

/// Undoes a migration on the source, best effort and idempotent: `migrate_cancel`, the mirrors cancelled
/// and dismissed, the NBD nodes dropped, the vCPUs resumed when `resume` and they are stopped. Each step's
/// failure is logged, never returned: the source must end up running whatever else failed.
pub async fn abort_source(src: &Qmp, disks: &[DiskInfo], resume: bool) {
    let _ = src.execute("migrate_cancel", Value::Null).await;
    // A cancelled migration goes `cancelling` → `cancelled` (QEMU resumes a guest it stopped itself).
    for _ in 0..200 {
        match query_migrate(src).await {
            Ok(i) if i.status == "cancelling" || i.status == "device" => {}
            _ => break,
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    for d in disks {
        let id = format!("{MIG_PREFIX}{}", d.node);
        let _ = src
            .execute("block-job-cancel", json!({ "device": id, "force": true }))
            .await;
    }
    for _ in 0..400 {
        match our_jobs(src).await {
            Ok(jobs) if jobs.iter().any(|j| j.status != "concluded") => {}
            _ => break,
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    for d in disks {
        let id = format!("{MIG_PREFIX}{}", d.node);
        let _ = src.execute("job-dismiss", json!({ "id": id })).await;
        let _ = src
            .execute("blockdev-del", json!({ "node-name": id }))
            .await;
    }
    if resume {
        match src.execute("query-status", Value::Null).await {
            Ok(st) if st.get("running").and_then(Value::as_bool) == Some(false) => {
                if let Err(e) = src.execute("cont", Value::Null).await {
                    tracing::error!(error = %e, "migration undone but the source could not be resumed");
                }
            }
            Ok(_) => {}
            Err(e) => tracing::error!(error = %e, "migration undone: source query-status failed"),
        }
    }
}

/// The source of [`migrate`].
#[derive(Debug)]
pub struct Source<'a> {
    /// Its QMP connection.
    pub qmp: &'a Qmp,
    /// Its events, when the caller can lend them ([`run_source`]).
    pub events: Option<&'a mut Events>,
    /// The source host's TLS files (with [`Destination::tls`]).
    pub tls: Option<TlsFiles>,
}

/// The destination of [`migrate`]: a QEMU launched with `-incoming defer`.
#[derive(Debug)]
pub struct Destination<'a> {
    /// The process (killed when the migration fails).
    pub qemu: &'a mut Qemu,
    /// Its QMP connection.
    pub qmp: &'a Qmp,
    /// Where it listens.
    pub listen: Listen,
    /// The destination host's TLS files (with [`Source::tls`]).
    pub tls: Option<TlsFiles>,
}

/// Migrates a running VM from `src` to `dst` (both driven from here, as on one host or from a coordinator
/// holding both QMP connections), copying `disks` ([`source_disks`]; their images already created for
/// `dst` by [`create_disk_images`]).
///
/// On `Ok` the guest runs on the destination and the source is stopped (`postmigrate`): the caller quits
/// it. On `Err` before the switch the source runs as before and the destination QEMU has been killed; on
/// [`MigrateError::AfterSwitch`] neither is touched.
pub async fn migrate(
    src: Source<'_>,
    dst: Destination<'_>,
    disks: &[DiskInfo],
    opts: &MigrateOptions,
    progress: &mut (dyn FnMut(&Progress) + Send),
) -> Result<MigrateReport, MigrateError> {
    if src.tls.is_some() != dst.tls.is_some() {
        return Err(MigrateError::Setup {
            what: "TLS".into(),
            why: "give TLS files for both ends or for neither".into(),
        });
    }
    let start = Instant::now();
    let was_running = src
        .qmp
        .execute("query-status", Value::Null)
        .await
        .map_err(qmp_err("source query-status"))?
        .get("running")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let incoming = match prepare_incoming(dst.qmp, disks, &dst.listen, dst.tls.as_ref()).await {
        Ok(i) => i,
        Err(e) => {
            dst.qemu.kill().await;
            return Err(e);
        }
    };
    let qemu = dst.qemu;
    let result = {
        let run = run_source(
            src.qmp,
            src.events,
            disks,
            &incoming,
            opts,
            src.tls.as_ref(),
            progress,
        );
        tokio::pin!(run);
        tokio::select! {
            r = &mut run => r.map_err(|e| (e, None)),
            how = qemu.ended() => {
                // The destination died: the source's own view ends soon (a broken stream or NBD
                // connection); give it a moment so the error names both.
                match tokio::time::timeout(Duration::from_secs(5), &mut run).await {
                    Ok(Ok(_)) => Err((
                        MigrateError::AfterSwitch(format!(
                            "the destination QEMU ended ({how}) as the source completed"
                        )),
                        Some(()),
                    )),
                    Ok(Err(e)) => Err((
                        MigrateError::DestinationGone { how: how.to_string(), during: e.to_string() },
                        Some(()),
                    )),
                    Err(_) => Err((
                        MigrateError::DestinationGone { how: how.to_string(), during: "nothing yet".into() },
                        Some(()),
                    )),
                }
            }
        }
    };
    match result {
        Ok(mut report) => {
            match finish_incoming(dst.qmp, opts.start_destination, opts.stall_timeout).await {
                Ok(()) => {
                    if opts.start_destination {
                        report.until_running_ms = start.elapsed().as_millis() as u64;
                        report.observed_stop_ms = report
                            .stopped_at
                            .map_or(0, |t| t.elapsed().as_millis() as u64);
                    }
                    Ok(report)
                }
                Err(e) => Err(MigrateError::AfterSwitch(format!(
                    "the source sent its final state but the destination did not run: {e}"
                ))),
            }
        }
        Err((e, dst_gone)) => {
            if e.after_switch() {
                return Err(e);
            }
            if dst_gone.is_some() {
                // run_source was interrupted: undo on the source here.
                abort_source(src.qmp, disks, was_running).await;
            } else {
                qemu.kill().await;
            }
            Err(e)
        }
    }
}
