//! QEMU's COLO (coarse-grained lock-stepping) driven by ax: probe, setup, failover, measurement.
//!
//! COLO keeps a secondary QEMU in step with a running primary: the primary checkpoints its dirty
//! memory and device state into the secondary every [`ProtectOptions::checkpoint_delay_ms`] (or
//! when the two VMs' network outputs diverge), disk writes are replicated by the `replication` block
//! driver over NBD under each disk's `quorum` node, and `colo-compare` releases the primary's
//! packets once the secondary produced the same ones. This module is QEMU's side only: the
//! heartbeat, the coordinator's decision and fencing are the caller's (the agent).
//!
//! The sequence (QEMU's `docs/system/qemu-colo.rst`, "resume replication", for a primary that already
//! runs):
//!
//! 1. [`probe`] the binary once: version, objects, and a real trial pair.
//! 2. The VM was started with [`QemuDef::colo`] (pc machine, disks under `quorum`).
//! 3. Secondary host: base copies of the disks ([`crate::migrate::create_disk_images`]),
//!    [`launch_secondary`] (overlays, replication secondary, redirectors + rewriter, `-incoming`),
//!    [`prepare_secondary`] (`x-colo`, NBD server exporting each `disk<i>-base` writable).
//! 4. Primary: [`protect`]: `blockdev-mirror` (sync=full) of each disk to the secondary's export
//!    until ready; `stop`; mirrors cancelled (complete, no pivot); the `replication` primary child
//!    `ax-colo-rep-disk<i>` added to each quorum (`x-blockdev-change`); the chardevs, `filter-mirror`,
//!    `filter-redirector`s, an `iothread` and `colo-compare` added per NIC; `x-colo`,
//!    `x-checkpoint-delay`, `migrate`; done at `status: colo` (COLO restarts the vCPUs).
//! 5. Failover: [`take_over`] on the survivor. Level ft → ha: [`unprotect`] on the primary.
//! 6. Re-protection: the survivor (a primary gone solo, an unprotected primary, or a QEMU that took
//!    over as secondary) is protected again by [`protect`] to a fresh secondary, as in step 4. A
//!    former secondary keeps its `disk<i>-rep` (replication secondary, inert after the failover: its
//!    overlays were committed into `disk<i>-base` and it passes I/O through) as the quorum's first
//!    child, so the primary child has another name; its NIC keeps its `filter-rewriter`, so the
//!    primary's filters are inserted before it.
//!
//! Node names (chosen by ax, fixed): `disk<i>` the quorum the device hangs on, `disk<i>-base` the
//! image's format node, `disk<i>-file` its file; on a primary `ax-colo-rep-disk<i>` the replication
//! child (quorum child `children.1`); on a secondary `disk<i>-rep` → `disk<i>-active` →
//! `disk<i>-hidden` → `disk<i>-base`. NIC `i`: netdev `net<i>`, device `net<i>-dev`. Everything else
//! ax adds is named `ax-colo-…`.
//!
//! Channels ([`Addr`]): unix sockets or TCP. Over plain TCP each checkpoint stalls on delayed ACKs;
//! [`crate::relay`] carries unix sockets over TCP with `TCP_NODELAY` and `TCP_QUICKACK`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::def::{DiskLayout, QemuDef, RunFiles};
use crate::migrate::DiskInfo;
use crate::process::{ProcessError, Qemu};
use crate::qmp::{Event, Events, Qmp, QmpError};

/// The prefix of everything ax adds to a QEMU for COLO.
pub const PREFIX: &str = "ax-colo-";

/// Why QEMU 10.0/10.1 are refused.
pub const BROKEN_10: &str =
    "COLO broken upstream in QEMU 10.0/10.1: migration with x-colo ends as a plain migration";

/// A COLO failure.
#[derive(Debug, thiserror::Error)]
pub enum ColoError {
    /// The binary cannot run COLO.
    #[error("COLO is not usable with {binary}: {why}")]
    Unsupported {
        /// The QEMU binary.
        binary: String,
        /// Why.
        why: String,
    },
    /// A QMP command failed.
    #[error("{step}: {source}")]
    Qmp {
        /// What was being done.
        step: String,
        /// The QMP error.
        source: QmpError,
    },
    /// Files, definitions, processes.
    #[error("{what}: {why}")]
    Setup {
        /// Which file or step.
        what: String,
        /// Why.
        why: String,
    },
    /// Launching a QEMU.
    #[error(transparent)]
    Process(#[from] ProcessError),
    /// A wait that reached its bound.
    #[error("{what}: not within {bound:?} (last seen: {last})")]
    Timeout {
        /// What was awaited.
        what: String,
        /// The bound.
        bound: Duration,
        /// The last state seen.
        last: String,
    },
    /// A disk copy failed.
    #[error("disk copy {job} failed: {desc}")]
    Mirror {
        /// The job.
        job: String,
        /// QEMU's error.
        desc: String,
    },
    /// The migration into COLO failed.
    #[error("migration into COLO {status}: {desc}")]
    Failed {
        /// `failed`, `cancelled`, `completed` (a plain migration: no COLO).
        status: String,
        /// QEMU's reason.
        desc: String,
    },
}

fn qerr(step: impl Into<String>) -> impl FnOnce(QmpError) -> ColoError {
    let step = step.into();
    move |source| ColoError::Qmp { step, source }
}

// ---------------------------------------------------------------------------------------------
// Probe

/// A QEMU version `major.minor.micro` from `--version` output (`QEMU emulator version 7.2.22 (…)`)
/// or a bare `10.0.2`.
pub fn parse_version(text: &str) -> Option<(u64, u64, u64)> {
    let word = text
        .split_whitespace()
        .find(|w| w.chars().next().is_some_and(|c| c.is_ascii_digit()) && w.contains('.'))?;
    let mut it = word
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty());
    let major = it.next()?.parse().ok()?;
    let minor = it.next()?.parse().ok()?;
    let micro = it.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    Some((major, minor, micro))
}

/// Whether ax drives COLO on QEMU `v`; the reason when not.
pub fn check_version(v: (u64, u64, u64)) -> Result<(), String> {
    match v {
        (10, 0 | 1, _) => Err(BROKEN_10.to_string()),
        (m, _, _) if m < 7 => Err(format!(
            "QEMU {}.{}.{} is older than 7.0, the oldest release ax drives COLO on",
            v.0, v.1, v.2
        )),
        _ => Ok(()),
    }
}

/// What [`probe`] found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ColoSupport {
    /// The binary probed (resolved on `PATH`).
    pub binary: PathBuf,
    /// Its version.
    pub version: (u64, u64, u64),
    /// The accelerator of the trial (`kvm`; under `tcg` QEMU 7.2's COLO deadlocks at the first
    /// checkpoint, so the trial fails there).
    pub accel: String,
    /// The trial pair's time from `migrate` to `colo` and two checkpoints, ms.
    pub trial_ms: u64,
}

fn resolve(binary: &str) -> Option<PathBuf> {
    if binary.contains('/') {
        return Some(PathBuf::from(binary));
    }
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(binary))
        .find(|p| p.is_file())
}

type Cache = Mutex<HashMap<(PathBuf, std::time::SystemTime), Result<ColoSupport, String>>>;
static CACHE: std::sync::OnceLock<Cache> = std::sync::OnceLock::new();

/// Whether `binary` runs COLO here. Checks the version ([`check_version`]), the objects and block
/// drivers COLO needs, then runs a trial: two QEMUs without a guest (`-machine pc`, 16 MiB, KVM when
/// `/dev/kvm` opens), unix-socket migration with `x-colo`, until `query-migrate` says `colo` and two
/// checkpoints passed (each bounded), then both are killed.
///
/// Cost: about 1 s of wall time and two short-lived QEMU processes (~50 MiB each) on the first call;
/// the result (success or refusal) is cached per binary path and modification time, so later calls
/// are free until the binary changes. A failure to run the trial at all (no temporary directory) is
/// not cached.
pub async fn probe(binary: &str) -> Result<ColoSupport, ColoError> {
    let unsupported = |why: String| ColoError::Unsupported {
        binary: binary.to_string(),
        why,
    };
    let path = resolve(binary).ok_or_else(|| unsupported("not found on PATH".into()))?;
    let mtime = std::fs::metadata(&path)
        .and_then(|m| m.modified())
        .map_err(|e| unsupported(format!("{}: {e}", path.display())))?;
    let key = (path.clone(), mtime);
    let cache = CACHE.get_or_init(Cache::default);
    if let Some(r) = cache.lock().unwrap_or_else(|p| p.into_inner()).get(&key) {
        return r.clone().map_err(unsupported);
    }
    let r = probe_uncached(&path).await;
    let cached = match &r {
        Ok(s) => Ok(s.clone()),
        Err(ColoError::Unsupported { why, .. }) => Err(why.clone()),
        Err(_) => return r,
    };
    cache
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(key, cached);
    r
}

async fn output(path: &Path, args: &[&str]) -> Result<String, String> {
    let out = tokio::time::timeout(
        Duration::from_secs(20),
        tokio::process::Command::new(path)
            .args(args)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .map_err(|_| {
        format!(
            "{} {}: no answer within 20 s",
            path.display(),
            args.join(" ")
        )
    })?
    .map_err(|e| format!("running {}: {e}", path.display()))?;
    Ok(format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    ))
}

async fn probe_uncached(path: &Path) -> Result<ColoSupport, ColoError> {
    let binary = path.display().to_string();
    let unsupported = |why: String| ColoError::Unsupported {
        binary: binary.clone(),
        why,
    };
    let text = output(path, &["--version"]).await.map_err(&unsupported)?;
    let version = parse_version(&text)
        .ok_or_else(|| unsupported(format!("no version in {:?}", text.trim())))?;
    check_version(version).map_err(&unsupported)?;
    let objects = output(path, &["-object", "help"])
        .await
        .map_err(&unsupported)?;
    for o in [
        "colo-compare",
        "filter-mirror",
        "filter-redirector",
        "filter-rewriter",
        "iothread",
    ] {
        if !objects.split_whitespace().any(|w| w == o) {
            return Err(unsupported(format!("this build has no `{o}` object")));
        }
    }
    let formats = output(path, &["-drive", "format=help"])
        .await
        .map_err(&unsupported)?;
    for d in ["quorum", "replication", "nbd"] {
        if !formats.split_whitespace().any(|w| w == d) {
            return Err(unsupported(format!("this build has no `{d}` block driver")));
        }
    }
    let dir = std::env::temp_dir().join(format!(
        "ax-colo-probe-{}-{:08x}",
        std::process::id(),
        rand_u32()
    ));
    std::fs::create_dir_all(&dir).map_err(|e| ColoError::Setup {
        what: format!("probe directory {}", dir.display()),
        why: e.to_string(),
    })?;
    let accel = if crate::def::kvm_usable().is_ok() {
        "kvm"
    } else {
        "tcg"
    };
    let r = trial(path, &dir, accel).await;
    let _ = std::fs::remove_dir_all(&dir);
    let trial_ms = r.map_err(|why| {
        unsupported(format!(
            "the trial pair (accel {accel}) did not run COLO: {why}"
        ))
    })?;
    Ok(ColoSupport {
        binary: path.to_path_buf(),
        version,
        accel: accel.to_string(),
        trial_ms,
    })
}

fn rand_u32() -> u32 {
    let mut b = [0u8; 4];
    // SAFETY: getrandom writes at most 4 bytes into the live buffer.
    unsafe {
        libc::getrandom(b.as_mut_ptr().cast(), 4, 0);
    }
    u32::from_ne_bytes(b)
}

async fn trial(path: &Path, dir: &Path, accel: &str) -> Result<u64, String> {
    let spawn = |name: &str, extra: &[String]| {
        let qmp = dir.join(format!("{name}.qmp"));
        let mut c = tokio::process::Command::new(path);
        c.args([
            "-machine",
            "pc",
            "-accel",
            accel,
            "-m",
            "16",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-qmp",
        ])
        .arg(format!("unix:{},server=on,wait=off", qmp.display()))
        .args(extra)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
        c.spawn()
            .map(|ch| (ch, qmp))
            .map_err(|e| format!("starting {}: {e}", path.display()))
    };
    let mig = dir.join("mig.sock");
    let (mut sec, sq) = spawn(
        "secondary",
        &["-incoming".into(), format!("unix:{}", mig.display())],
    )?;
    let (mut pri, pq) = spawn("primary", &[])?;
    let r = async {
        let bound = Duration::from_secs(10);
        let (s, _se) = connect_retry(&sq, bound).await?;
        let (p, mut pe) = connect_retry(&pq, bound).await?;
        let colo = json!({ "capabilities": [{ "capability": "x-colo", "state": true }] });
        let e = |x: QmpError| x.to_string();
        s.execute("migrate-set-capabilities", colo.clone())
            .await
            .map_err(e)?;
        p.execute("migrate-set-capabilities", colo)
            .await
            .map_err(e)?;
        p.execute(
            "migrate-set-parameters",
            json!({ "x-checkpoint-delay": 100 }),
        )
        .await
        .map_err(e)?;
        let start = Instant::now();
        p.execute(
            "migrate",
            json!({ "uri": format!("unix:{}", mig.display()) }),
        )
        .await
        .map_err(e)?;
        let deadline = start + bound;
        loop {
            let st = p.execute("query-migrate", Value::Null).await.map_err(e)?;
            match st.get("status").and_then(Value::as_str).unwrap_or("") {
                "colo" => break,
                "completed" => return Err(BROKEN_10.to_string()),
                "failed" | "cancelled" => return Err(format!("migration {st}")),
                _ => {}
            }
            if Instant::now() >= deadline {
                return Err(format!("no `colo` status within {bound:?}: {st}"));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Two checkpoints (STOP → RESUME each): the secondary loads them (q35 aborts here on 7.2).
        let mut meter = PauseMeter::default();
        let until = tokio::time::Instant::now() + Duration::from_secs(5);
        while meter.pauses().len() < 2 {
            match tokio::time::timeout_at(until, pe.next()).await {
                Ok(Some(ev)) => {
                    if ev.event == "COLO_EXIT" {
                        return Err(format!("COLO ended at a checkpoint: {}", ev.data));
                    }
                    meter.observe(&ev);
                }
                Ok(None) => return Err("the primary's QMP connection ended".into()),
                Err(_) => {
                    return Err(format!(
                    "{} checkpoints within 5 s (the guest may be stuck: COLO under TCG deadlocks)",
                    meter.pauses().len()
                ))
                }
            }
        }
        let st = s
            .execute("query-colo-status", Value::Null)
            .await
            .map_err(e)?;
        if st.get("mode").and_then(Value::as_str) != Some("secondary") {
            return Err(format!("the secondary is not in COLO: {st}"));
        }
        Ok(start.elapsed().as_millis() as u64)
    }
    .await;
    let _ = pri.start_kill();
    let _ = sec.start_kill();
    let _ = pri.wait().await;
    let _ = sec.wait().await;
    r
}

async fn connect_retry(sock: &Path, bound: Duration) -> Result<(Qmp, Events), String> {
    let deadline = Instant::now() + bound;
    loop {
        match Qmp::connect(sock, bound).await {
            Ok(q) => return Ok(q),
            Err(e) if Instant::now() >= deadline => return Err(format!("QMP: {e}")),
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Addresses and names

/// Where a COLO channel listens or connects.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Addr {
    /// TCP.
    Inet {
        /// Host (IP address or name).
        host: String,
        /// Port.
        port: u16,
    },
    /// A unix socket (same host, or carried by [`crate::relay`]).
    Unix {
        /// The socket's path.
        path: PathBuf,
    },
}

impl Addr {
    /// A TCP address.
    pub fn inet(host: &str, port: u16) -> Addr {
        Addr::Inet {
            host: host.to_string(),
            port,
        }
    }
    /// A unix socket.
    pub fn unix(path: impl Into<PathBuf>) -> Addr {
        Addr::Unix { path: path.into() }
    }
    /// The migration URI (`tcp:H:P`, `unix:PATH`).
    pub fn uri(&self) -> String {
        match self {
            Addr::Inet { host, port } if host.contains(':') => format!("tcp:[{host}]:{port}"),
            Addr::Inet { host, port } => format!("tcp:{host}:{port}"),
            Addr::Unix { path } => format!("unix:{}", path.display()),
        }
    }
    /// QAPI `SocketAddress` (flat, as `blockdev-add`'s NBD `server` takes it).
    fn flat(&self) -> Value {
        match self {
            Addr::Inet { host, port } => {
                json!({ "type": "inet", "host": host, "port": port.to_string() })
            }
            Addr::Unix { path } => json!({ "type": "unix", "path": path.display().to_string() }),
        }
    }
    /// QAPI `SocketAddressLegacy` (as `nbd-server-start` and `chardev-add` take it).
    fn legacy(&self) -> Value {
        match self {
            Addr::Inet { host, port } => {
                json!({ "type": "inet", "data": { "host": host, "port": port.to_string() } })
            }
            Addr::Unix { path } => {
                json!({ "type": "unix", "data": { "path": path.display().to_string() } })
            }
        }
    }
    /// `-chardev socket,…` address options.
    fn chardev_opts(&self) -> String {
        match self {
            Addr::Inet { host, port } => format!("host={host},port={port}"),
            Addr::Unix { path } => {
                format!("path={}", path.display().to_string().replace(',', ",,"))
            }
        }
    }
}

fn n(kind: &str, i: usize) -> String {
    format!("{PREFIX}{kind}{i}")
}

/// The primary's replication child of disk node `node` (`ax-colo-rep-disk<i>`): never `disk<i>-rep`,
/// the secondary's replication node, which a QEMU that took over as secondary keeps in its quorum.
pub fn primary_rep(node: &str) -> String {
    format!("{PREFIX}rep-{node}")
}

/// The primary's local unix sockets for NIC `i` (the compare loops), in `dir`.
fn local_sock(dir: &Path, kind: &str, i: usize) -> PathBuf {
    dir.join(format!("colo-{kind}{i}.sock"))
}

// ---------------------------------------------------------------------------------------------
// Secondary

/// The channels a secondary uses (as addresses on the secondary host).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecondaryChannels {
    /// Where it listens for the migration stream (`-incoming`).
    pub incoming: Addr,
    /// Where its NBD server listens.
    pub nbd: Addr,
    /// Per NIC: the primary's `filter-mirror` chardev it connects to (packets in for the guest).
    pub mirror: Vec<Addr>,
    /// Per NIC: the primary's compare input it connects to (the guest's packets out).
    pub compare: Vec<Addr>,
}

/// A secondary QEMU to start: the VM's definition on the secondary host (with [`QemuDef::colo`]; its
/// disks are the base copies), name, size, run directory and channels.
#[derive(Debug, Clone, Copy)]
pub struct Secondary<'a> {
    /// The definition.
    pub def: &'a QemuDef,
    /// The VM's name.
    pub vm: &'a str,
    /// Its memory, MiB.
    pub mem_mib: u64,
    /// Its vCPUs.
    pub vcpus: u8,
    /// Its run directory (overlays, QMP, console).
    pub files: &'a RunFiles,
    /// Its channels.
    pub channels: &'a SecondaryChannels,
}

/// The secondary QEMU's arguments: the definition with the replication chain over each disk, per NIC
/// the redirectors and the rewriter, and `-incoming` on [`SecondaryChannels::incoming`].
pub fn secondary_args(sec: &Secondary<'_>) -> Result<Vec<String>, ColoError> {
    let (def, ch) = (sec.def, sec.channels);
    if !def.colo {
        return Err(ColoError::Setup {
            what: "secondary definition".into(),
            why: "`colo` is false: the secondary must be started as the primary was".into(),
        });
    }
    if ch.mirror.len() != def.nics.len() || ch.compare.len() != def.nics.len() {
        return Err(ColoError::Setup {
            what: "secondary channels".into(),
            why: format!(
                "{} NICs but {} mirror and {} compare channels",
                def.nics.len(),
                ch.mirror.len(),
                ch.compare.len()
            ),
        });
    }
    let mut tail = Vec::new();
    for i in 0..def.nics.len() {
        let (red0, red1) = (n("red-in", i), n("red-out", i));
        tail.extend([
            "-chardev".into(),
            format!(
                "socket,id={red0},{},reconnect=1",
                ch.mirror[i].chardev_opts()
            ),
            "-chardev".into(),
            format!(
                "socket,id={red1},{},reconnect=1",
                ch.compare[i].chardev_opts()
            ),
            "-object".into(),
            format!(
                "filter-redirector,id={},netdev=net{i},queue=tx,indev={red0}",
                n("f-in", i)
            ),
            "-object".into(),
            format!(
                "filter-redirector,id={},netdev=net{i},queue=rx,outdev={red1}",
                n("f-out", i)
            ),
            "-object".into(),
            format!("filter-rewriter,id={},netdev=net{i},queue=all", n("rew", i)),
        ]);
    }
    tail.extend(["-incoming".into(), ch.incoming.uri()]);
    def.build_args(
        sec.vm,
        sec.mem_mib,
        sec.vcpus,
        sec.files,
        DiskLayout::ColoSecondary,
        &tail,
    )
    .map_err(|e| ColoError::Setup {
        what: "secondary definition".into(),
        why: e.to_string(),
    })
}

/// Creates a secondary's active and hidden overlays (qcow2 of each disk's virtual size, in the run
/// directory; replaced if present) and launches it ([`secondary_args`]). `disks`: the primary's
/// ([`crate::migrate::source_disks`]); the definition's disks must be base copies of the same sizes
/// ([`crate::migrate::create_disk_images`]).
pub async fn launch_secondary(
    sec: &Secondary<'_>,
    disks: &[DiskInfo],
    timeout: Duration,
) -> Result<(Qemu, Qmp, Events), ColoError> {
    let (def, files) = (sec.def, sec.files);
    if disks.len() != def.all_disks().len() {
        return Err(ColoError::Setup {
            what: "secondary disks".into(),
            why: format!(
                "the primary has {} disks, the secondary definition {}",
                disks.len(),
                def.all_disks().len()
            ),
        });
    }
    for d in disks {
        for kind in ["active", "hidden"] {
            let p = crate::def::colo_overlay(files, &d.node, kind);
            let _ = std::fs::remove_file(&p);
            let out = std::process::Command::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2"])
                .arg(&p)
                .arg(d.virtual_size.to_string())
                .output()
                .map_err(|e| ColoError::Setup {
                    what: format!("creating {}", p.display()),
                    why: format!("running qemu-img: {e}"),
                })?;
            if !out.status.success() {
                return Err(ColoError::Setup {
                    what: format!("creating {}", p.display()),
                    why: String::from_utf8_lossy(&out.stderr).trim().to_string(),
                });
            }
        }
    }
    let args = secondary_args(sec)?;
    Ok(Qemu::launch_args(def, sec.vm, files, args, timeout).await?)
}

/// Secondary side, before the primary's [`protect`]: `x-colo` on, the NBD server on
/// [`SecondaryChannels::nbd`], each disk's base (`disk<i>-base`) exported writable under that name.
pub async fn prepare_secondary(
    qmp: &Qmp,
    def: &QemuDef,
    ch: &SecondaryChannels,
) -> Result<(), ColoError> {
    let st = qmp
        .execute("query-status", Value::Null)
        .await
        .map_err(qerr("secondary query-status"))?;
    if st.get("status").and_then(Value::as_str) != Some("inmigrate") {
        return Err(ColoError::Setup {
            what: "secondary".into(),
            why: format!(
                "not waiting for the primary (status {st}): launch it with launch_secondary"
            ),
        });
    }
    qmp.execute(
        "migrate-set-capabilities",
        json!({ "capabilities": [{ "capability": "x-colo", "state": true }] }),
    )
    .await
    .map_err(qerr("secondary migrate-set-capabilities x-colo"))?;
    let disks = def.all_disks();
    if !disks.is_empty() {
        if let Addr::Unix { path } = &ch.nbd {
            let _ = std::fs::remove_file(path);
        }
        qmp.execute("nbd-server-start", json!({ "addr": ch.nbd.legacy() }))
            .await
            .map_err(qerr(format!(
                "secondary nbd-server-start on {}",
                ch.nbd.uri()
            )))?;
        for (node, _) in disks {
            let base = format!("{node}-base");
            qmp.execute(
                "block-export-add",
                json!({ "type": "nbd", "id": format!("{PREFIX}{base}"), "node-name": base,
                        "name": base, "writable": true }),
            )
            .await
            .map_err(qerr(format!("secondary block-export-add {base}")))?;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Primary

/// The channels a primary uses (as addresses on the primary host).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrimaryChannels {
    /// The secondary's migration listener.
    pub migrate: Addr,
    /// The secondary's NBD server.
    pub nbd: Addr,
    /// Per NIC: where this primary's `filter-mirror` chardev listens for the secondary.
    pub mirror: Vec<Addr>,
    /// Per NIC: where this primary's compare input listens for the secondary.
    pub compare: Vec<Addr>,
    /// A directory for the primary's local sockets (the compare loops): its run directory.
    pub dir: PathBuf,
}

/// How to protect.
#[derive(Debug, Clone)]
pub struct ProtectOptions {
    /// `x-checkpoint-delay`: the period of checkpoints when outputs do not diverge (the VM's epoch).
    pub checkpoint_delay_ms: u64,
    /// `max-bandwidth` of the migration stream (bytes/s; COLO's first pass and checkpoints). QEMU's
    /// default (32 MiB/s) keeps a guest dirtying 64 MiB/s from ever entering COLO.
    pub max_bandwidth: Option<u64>,
    /// A phase that makes no progress for this long fails ([`ColoError::Timeout`]).
    pub stall_timeout: Duration,
    /// The secondary's chardevs must connect within this.
    pub connect_timeout: Duration,
    /// How often `query-migrate` / `query-jobs` are polled.
    pub poll: Duration,
}

impl Default for ProtectOptions {
    fn default() -> Self {
        ProtectOptions {
            checkpoint_delay_ms: 100,
            max_bandwidth: Some(1 << 30),
            stall_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(15),
            poll: Duration::from_millis(50),
        }
    }
}

/// The phase of a [`Progress`] report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Disks being copied to the secondary.
    Disks,
    /// The primary stopped; replication, filters and compare being set up.
    Attach,
    /// RAM being sent (first full pass).
    Ram,
    /// In COLO: done.
    Colo,
}

/// Progress, reported at every poll (for `axctl --wait`'s bar).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    /// The phase.
    pub phase: Phase,
    /// QEMU's migration status (`setup`, `active`, `colo`…; empty before `migrate`).
    pub status: String,
    /// Bytes sent (disks in [`Phase::Disks`], RAM after).
    pub transferred: u64,
    /// Bytes left (disk total − done, or RAM remaining).
    pub remaining: u64,
}

/// What [`protect`] measured.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProtectReport {
    /// Disk copy until every mirror was ready, ms.
    pub disks_ms: u64,
    /// The primary stopped for the attach and the first checkpoint: from `stop` to running in COLO, ms.
    pub stopped_ms: u64,
    /// From `migrate` to `colo`, ms.
    pub migrate_ms: u64,
    /// The whole setup, ms.
    pub total_ms: u64,
    /// Disk bytes copied.
    pub disk_bytes: u64,
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

async fn jobs(qmp: &Qmp, prefix: &str) -> Result<Vec<JobInfo>, ColoError> {
    let v = qmp
        .execute("query-jobs", Value::Null)
        .await
        .map_err(qerr("query-jobs"))?;
    let all: Vec<JobInfo> = serde_json::from_value(v).map_err(|e| ColoError::Setup {
        what: "query-jobs".into(),
        why: e.to_string(),
    })?;
    Ok(all
        .into_iter()
        .filter(|j| j.id.starts_with(prefix))
        .collect())
}

async fn running(qmp: &Qmp) -> Result<(bool, String), ColoError> {
    let st = qmp
        .execute("query-status", Value::Null)
        .await
        .map_err(qerr("query-status"))?;
    Ok((
        st.get("running").and_then(Value::as_bool).unwrap_or(false),
        st.get("status")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string(),
    ))
}

/// Protects the running primary behind `qmp` (started with [`QemuDef::colo`] from `def`) with the
/// prepared secondary reachable through `ch`. `disks`: [`crate::migrate::source_disks`]. On `Ok` the
/// pair is in COLO and the primary runs. On `Err` the primary is back to a plain VM
/// ([`unprotect`]) and runs if it ran before; the secondary is the caller's to kill.
pub async fn protect(
    qmp: &Qmp,
    def: &QemuDef,
    disks: &[DiskInfo],
    ch: &PrimaryChannels,
    opts: &ProtectOptions,
    progress: &mut (dyn FnMut(&Progress) + Send),
) -> Result<ProtectReport, ColoError> {
    let (was_running, _) = running(qmp).await?;
    match protect_steps(qmp, def, disks, ch, opts, progress).await {
        Ok(r) => Ok(r),
        Err(e) => {
            tracing::warn!(error = %e, "COLO setup failed: undoing it on the primary");
            let _ = qmp.execute("migrate_cancel", Value::Null).await;
            for d in disks {
                let id = format!("{PREFIX}sync-{}", d.node);
                let _ = qmp
                    .execute("block-job-cancel", json!({ "device": id, "force": true }))
                    .await;
            }
            unprotect(qmp, def).await;
            for d in disks {
                let id = format!("{PREFIX}sync-{}", d.node);
                let _ = qmp.execute("job-dismiss", json!({ "id": id })).await;
                let _ = qmp
                    .execute("blockdev-del", json!({ "node-name": id }))
                    .await;
            }
            if was_running {
                if let Ok((false, _)) = running(qmp).await {
                    let _ = qmp.execute("cont", Value::Null).await;
                }
            }
            Err(e)
        }
    }
}

async fn protect_steps(
    qmp: &Qmp,
    def: &QemuDef,
    disks: &[DiskInfo],
    ch: &PrimaryChannels,
    opts: &ProtectOptions,
    progress: &mut (dyn FnMut(&Progress) + Send),
) -> Result<ProtectReport, ColoError> {
    if !def.colo {
        return Err(ColoError::Setup {
            what: "primary definition".into(),
            why: "`colo` is false: the VM was not started so that it may become FT (restart it with colo)".into(),
        });
    }
    if ch.mirror.len() != def.nics.len() || ch.compare.len() != def.nics.len() {
        return Err(ColoError::Setup {
            what: "primary channels".into(),
            why: format!(
                "{} NICs but {} mirror and {} compare channels",
                def.nics.len(),
                ch.mirror.len(),
                ch.compare.len()
            ),
        });
    }
    let start = Instant::now();
    let mut report = ProtectReport::default();
    // The chardevs first, while the guest runs (they do not touch it): the secondary's redirectors
    // connect during the disk copy.
    for i in 0..def.nics.len() {
        add_chardevs(qmp, i, ch).await?;
    }
    // The secondary's redirectors reconnect every second: wait until both chardevs are connected.
    let deadline = Instant::now() + opts.connect_timeout;
    loop {
        let v = qmp
            .execute("query-chardev", Value::Null)
            .await
            .map_err(qerr("query-chardev"))?;
        let mut waiting = Vec::new();
        for i in 0..def.nics.len() {
            for id in [n("mirror", i), n("sec-in", i)] {
                let connected = v.as_array().into_iter().flatten().any(|c| {
                    c.get("label").and_then(Value::as_str) == Some(id.as_str())
                        && !c
                            .get("filename")
                            .and_then(Value::as_str)
                            .unwrap_or("disconnected")
                            .starts_with("disconnected")
                });
                if !connected {
                    waiting.push(id);
                }
            }
        }
        if waiting.is_empty() {
            break;
        }
        if Instant::now() >= deadline {
            return Err(ColoError::Timeout {
                what: "the secondary's redirectors connecting".into(),
                bound: opts.connect_timeout,
                last: format!("not connected: {}", waiting.join(", ")),
            });
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // 1. Live disk copy to the secondary's base images.
    let sync = format!("{PREFIX}sync-");
    for d in disks {
        let id = format!("{sync}{}", d.node);
        qmp.execute(
            "blockdev-add",
            json!({ "driver": "nbd", "node-name": id, "server": ch.nbd.flat(),
                    "export": format!("{}-base", d.node) }),
        )
        .await
        .map_err(qerr(format!(
            "connecting to the secondary's NBD export {}-base at {}",
            d.node,
            ch.nbd.uri()
        )))?;
        qmp.execute(
            "blockdev-mirror",
            json!({ "job-id": id, "device": d.node, "target": id, "sync": "full",
                    "auto-dismiss": false }),
        )
        .await
        .map_err(qerr(format!("blockdev-mirror {}", d.node)))?;
    }
    let mut stall = (0u64, Instant::now());
    loop {
        let js = jobs(qmp, &sync).await?;
        for j in &js {
            if j.status == "concluded" || j.status == "aborting" || j.error.is_some() {
                return Err(ColoError::Mirror {
                    job: j.id.clone(),
                    desc: j
                        .error
                        .clone()
                        .unwrap_or_else(|| format!("ended early ({})", j.status)),
                });
            }
        }
        let done: u64 = js.iter().map(|j| j.current).sum();
        let total: u64 = js.iter().map(|j| j.total).sum();
        progress(&Progress {
            phase: Phase::Disks,
            status: String::new(),
            transferred: done,
            remaining: total.saturating_sub(done),
        });
        if js.iter().all(|j| j.status == "ready") {
            break;
        }
        if done != stall.0 {
            stall = (done, Instant::now());
        } else if stall.1.elapsed() >= opts.stall_timeout {
            return Err(ColoError::Timeout {
                what: "disk copy to the secondary".into(),
                bound: opts.stall_timeout,
                last: format!("{done} of {total} bytes"),
            });
        }
        tokio::time::sleep(opts.poll).await;
    }
    report.disks_ms = start.elapsed().as_millis() as u64;

    // 2. Stop, end the copies (a ready mirror cancelled completes without pivoting).
    let stopped = Instant::now();
    qmp.execute("stop", Value::Null)
        .await
        .map_err(qerr("stop"))?;
    progress(&Progress {
        phase: Phase::Attach,
        status: String::new(),
        transferred: 0,
        remaining: 0,
    });
    for d in disks {
        let id = format!("{sync}{}", d.node);
        qmp.execute("block-job-cancel", json!({ "device": id }))
            .await
            .map_err(qerr(format!("block-job-cancel {id}")))?;
    }
    let deadline = Instant::now() + opts.stall_timeout;
    loop {
        let js = jobs(qmp, &sync).await?;
        if js.iter().all(|j| j.status == "concluded") {
            for j in &js {
                if let Some(e) = &j.error {
                    return Err(ColoError::Mirror {
                        job: j.id.clone(),
                        desc: format!("at the switch: {e}"),
                    });
                }
                report.disk_bytes += j.current;
            }
            break;
        }
        if Instant::now() >= deadline {
            return Err(ColoError::Timeout {
                what: "flushing the disk copies".into(),
                bound: opts.stall_timeout,
                last: format!("{} jobs", js.len()),
            });
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for d in disks {
        let id = format!("{sync}{}", d.node);
        qmp.execute("job-dismiss", json!({ "id": id }))
            .await
            .map_err(qerr(format!("job-dismiss {id}")))?;
        qmp.execute("blockdev-del", json!({ "node-name": id }))
            .await
            .map_err(qerr(format!("blockdev-del {id}")))?;
    }

    // 3. Replication: each quorum gets its primary replication child (named apart from the
    // `disk<i>-rep` a QEMU that took over as secondary keeps as its first child).
    for d in disks {
        let rep = primary_rep(&d.node);
        qmp.execute(
            "blockdev-add",
            json!({ "driver": "replication", "node-name": rep, "mode": "primary",
                    "file": { "driver": "nbd", "server": ch.nbd.flat(),
                              "export": format!("{}-base", d.node) } }),
        )
        .await
        .map_err(qerr(format!("blockdev-add {rep} (replication, primary)")))?;
        qmp.execute(
            "x-blockdev-change",
            json!({ "parent": d.node, "node": rep }),
        )
        .await
        .map_err(qerr(format!("x-blockdev-change {} + {rep}", d.node)))?;
    }

    // 4. Network: per NIC, the mirror to the secondary and the compare (its chardevs are up and
    // connected already).
    let objects_now = object_ids(qmp).await?;
    for i in 0..def.nics.len() {
        add_compare(qmp, i, &objects_now).await?;
    }

    // 5. COLO.
    qmp.execute(
        "migrate-set-capabilities",
        json!({ "capabilities": [{ "capability": "x-colo", "state": true }] }),
    )
    .await
    .map_err(qerr("migrate-set-capabilities x-colo"))?;
    let mut params = json!({ "x-checkpoint-delay": opts.checkpoint_delay_ms });
    if let Some(bw) = opts.max_bandwidth {
        params["max-bandwidth"] = json!(bw);
    }
    qmp.execute("migrate-set-parameters", params)
        .await
        .map_err(qerr("migrate-set-parameters x-checkpoint-delay"))?;
    let mig = Instant::now();
    qmp.execute("migrate", json!({ "uri": ch.migrate.uri() }))
        .await
        .map_err(qerr(format!("migrate to {}", ch.migrate.uri())))?;
    let mut stall = (u64::MAX, Instant::now());
    loop {
        let v = qmp
            .execute("query-migrate", Value::Null)
            .await
            .map_err(qerr("query-migrate"))?;
        let status = v
            .get("status")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let ram = |k: &str| {
            v.pointer(&format!("/ram/{k}"))
                .and_then(Value::as_u64)
                .unwrap_or(0)
        };
        let (sent, left) = (ram("transferred"), ram("remaining"));
        let colo = status == "colo";
        progress(&Progress {
            phase: if colo { Phase::Colo } else { Phase::Ram },
            status: status.clone(),
            transferred: sent,
            remaining: left,
        });
        match status.as_str() {
            "colo" => break,
            "completed" => {
                return Err(ColoError::Failed {
                    status,
                    desc: "the migration completed without entering COLO (is this QEMU 10.0/10.1?)"
                        .into(),
                })
            }
            "failed" | "cancelled" | "cancelling" => {
                return Err(ColoError::Failed {
                    status,
                    desc: v
                        .get("error-desc")
                        .and_then(Value::as_str)
                        .unwrap_or("QEMU gave no reason")
                        .to_string(),
                })
            }
            _ => {}
        }
        if sent != stall.0 {
            stall = (sent, Instant::now());
        } else if stall.1.elapsed() >= opts.stall_timeout {
            return Err(ColoError::Timeout {
                what: "migration into COLO".into(),
                bound: opts.stall_timeout,
                last: format!("status {status}, {sent} bytes sent, {left} remaining"),
            });
        }
        tokio::time::sleep(opts.poll.min(Duration::from_millis(10))).await;
    }
    report.migrate_ms = mig.elapsed().as_millis() as u64;
    // COLO restarts the vCPUs after the first checkpoint.
    let deadline = Instant::now() + opts.stall_timeout;
    loop {
        let (run, status) = running(qmp).await?;
        if run {
            break;
        }
        if Instant::now() >= deadline {
            return Err(ColoError::Timeout {
                what: "the primary running in COLO".into(),
                bound: opts.stall_timeout,
                last: status,
            });
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    report.stopped_ms = stopped.elapsed().as_millis() as u64;
    report.total_ms = start.elapsed().as_millis() as u64;
    Ok(report)
}

/// NIC `i`'s chardevs on the primary: the two the secondary connects to, the compare loops.
async fn add_chardevs(qmp: &Qmp, i: usize, ch: &PrimaryChannels) -> Result<(), ColoError> {
    let server = |id: String, addr: &Addr| {
        if let Addr::Unix { path } = addr {
            let _ = std::fs::remove_file(path);
        }
        json!({ "id": id, "backend": { "type": "socket", "data": {
            "addr": addr.legacy(), "server": true, "wait": false, "nodelay": true } } })
    };
    let client = |id: String, addr: &Addr| {
        json!({ "id": id, "backend": { "type": "socket", "data": {
            "addr": addr.legacy(), "server": false, "nodelay": true } } })
    };
    let pri = Addr::unix(local_sock(&ch.dir, "pri", i));
    let out = Addr::unix(local_sock(&ch.dir, "out", i));
    for args in [
        server(n("mirror", i), &ch.mirror[i]),
        server(n("sec-in", i), &ch.compare[i]),
        server(n("pri", i), &pri),
        client(n("pri-in", i), &pri),
        server(n("out", i), &out),
        client(n("out-in", i), &out),
    ] {
        let id = args["id"].as_str().unwrap_or_default().to_string();
        qmp.execute("chardev-add", args)
            .await
            .map_err(qerr(format!("chardev-add {id}")))?;
    }
    Ok(())
}

/// The ids of the user-creatable objects of a QEMU (`/objects`).
async fn object_ids(qmp: &Qmp) -> Result<Vec<String>, ColoError> {
    let v = qmp
        .execute("qom-list", json!({ "path": "/objects" }))
        .await
        .map_err(qerr("qom-list /objects"))?;
    Ok(v.as_array()
        .into_iter()
        .flatten()
        .filter(|p| {
            p.get("type")
                .and_then(Value::as_str)
                .is_some_and(|t| t.starts_with("child<"))
        })
        .filter_map(|p| p.get("name").and_then(Value::as_str).map(str::to_string))
        .collect())
}

/// NIC `i`'s filters, iothread and compare on the primary (over [`add_chardevs`]' chardevs). On a
/// QEMU that took over as secondary the NIC still has its `filter-rewriter` (it keeps fixing the
/// sequence numbers of TCP connections opened under COLO): the primary's filters go before it
/// (QEMU's `docs/system/qemu-colo.rst`, "Secondary resume replication").
async fn add_compare(qmp: &Qmp, i: usize, objects_now: &[String]) -> Result<(), ColoError> {
    let rew = n("rew", i);
    let before = |mut o: Value| {
        if objects_now.contains(&rew) {
            o["insert"] = json!("before");
            o["position"] = json!(format!("id={rew}"));
        }
        o
    };
    let objects = [
        before(
            json!({ "qom-type": "filter-mirror", "id": n("m", i), "netdev": format!("net{i}"),
                "queue": "tx", "outdev": n("mirror", i) }),
        ),
        before(
            json!({ "qom-type": "filter-redirector", "id": n("redir-in", i),
                "netdev": format!("net{i}"), "queue": "rx", "indev": n("out", i) }),
        ),
        before(
            json!({ "qom-type": "filter-redirector", "id": n("redir-out", i),
                "netdev": format!("net{i}"), "queue": "rx", "outdev": n("pri", i) }),
        ),
        json!({ "qom-type": "iothread", "id": n("iothread", i) }),
        json!({ "qom-type": "colo-compare", "id": n("compare", i),
                "primary_in": n("pri-in", i), "secondary_in": n("sec-in", i),
                "outdev": n("out-in", i), "iothread": n("iothread", i) }),
    ];
    for o in objects {
        let id = o["id"].as_str().unwrap_or_default().to_string();
        qmp.execute("object-add", o)
            .await
            .map_err(qerr(format!("object-add {id}")))?;
    }
    Ok(())
}

/// Bound on COLO ending in [`unprotect`].
const UNPROTECT_BOUND: Duration = Duration::from_secs(10);

/// Takes a primary out of COLO and removes everything [`protect`] added (level ft → ha): if it is a
/// COLO primary, the replication children, compare objects, filters and chardevs are removed, then
/// `x-colo-lost-heartbeat` ends COLO (the migration completes) and the vCPUs run on; otherwise (a
/// failed setup, a QEMU that already left COLO) only the removal. Best effort and idempotent: each
/// step's failure is logged. The secondary is the caller's to kill (it waits for a failover that will
/// not come). Afterwards [`protect`] may run again, to any prepared secondary.
pub async fn unprotect(qmp: &Qmp, def: &QemuDef) {
    let primary = status(qmp).await.is_ok_and(|s| s.mode == "primary");
    detach(qmp, def).await;
    if !primary {
        return;
    }
    if let Err(e) = qmp.execute("x-colo-lost-heartbeat", Value::Null).await {
        tracing::warn!(error = %e, "unprotect: x-colo-lost-heartbeat");
    }
    if let Err(e) = wait_colo_end(qmp, UNPROTECT_BOUND).await {
        tracing::warn!(error = %e, "unprotect: COLO did not end");
    }
    let deadline = Instant::now() + UNPROTECT_BOUND;
    while let Ok((false, status)) = running(qmp).await {
        if matches!(status.as_str(), "paused" | "colo") {
            let _ = qmp.execute("cont", Value::Null).await;
        }
        if Instant::now() >= deadline {
            tracing::warn!(status, "unprotect: the VM is not running");
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Removes from a primary everything [`protect`] added (replication children, compare objects,
/// filters, chardevs), best effort and idempotent: each step's failure is logged at debug level.
/// The replication child is the quorum's `children.1` (the child added after the VM's own: its base,
/// or on a QEMU that took over as secondary, its `disk<i>-rep`; a quorum never drops below one child).
async fn detach(qmp: &Qmp, def: &QemuDef) {
    for (node, _) in def.all_disks() {
        let rep = primary_rep(&node);
        if qmp
            .execute(
                "x-blockdev-change",
                json!({ "parent": node, "child": "children.1" }),
            )
            .await
            .is_ok()
        {
            tracing::debug!(node, "replication child removed");
        }
        if let Err(e) = qmp
            .execute("blockdev-del", json!({ "node-name": rep }))
            .await
        {
            tracing::debug!(node = rep, error = %e, "blockdev-del");
        }
    }
    for i in 0..def.nics.len() {
        for id in [
            n("compare", i),
            n("iothread", i),
            n("m", i),
            n("redir-in", i),
            n("redir-out", i),
        ] {
            let _ = qmp.execute("object-del", json!({ "id": id })).await;
        }
        for id in [
            n("pri-in", i),
            n("out-in", i),
            n("pri", i),
            n("out", i),
            n("mirror", i),
            n("sec-in", i),
        ] {
            let _ = qmp.execute("chardev-remove", json!({ "id": id })).await;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Runtime

/// `query-colo-status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ColoStatus {
    /// `primary`, `secondary` or `none`.
    pub mode: String,
    /// The mode before the last failover (`none` if there was none).
    #[serde(rename = "last-mode", default)]
    pub last_mode: String,
    /// Why COLO last ended: `none`, `request` (failover asked), `error`.
    #[serde(default)]
    pub reason: String,
}

/// COLO's state on a QEMU.
pub async fn status(qmp: &Qmp) -> Result<ColoStatus, ColoError> {
    let v = qmp
        .execute("query-colo-status", Value::Null)
        .await
        .map_err(qerr("query-colo-status"))?;
    serde_json::from_value(v.clone()).map_err(|e| ColoError::Setup {
        what: "query-colo-status".into(),
        why: format!("{e}: {v}"),
    })
}

/// Changes the checkpoint period of a primary in COLO (applies from the next checkpoint).
pub async fn set_checkpoint_delay(qmp: &Qmp, ms: u64) -> Result<(), ColoError> {
    qmp.execute(
        "migrate-set-parameters",
        json!({ "x-checkpoint-delay": ms }),
    )
    .await
    .map_err(qerr(format!("x-checkpoint-delay {ms}")))?;
    Ok(())
}

/// What [`take_over`] did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TakeOver {
    /// The mode this QEMU had (`primary`, `secondary`; `none`: it was not in COLO any more).
    pub was: String,
    /// The run state after it (`running`).
    pub status: String,
    /// From the call to the VM running as a plain VM, ms.
    pub ms: u64,
}

/// Failover on the surviving QEMU, whichever side it is (its peer is dead or fenced: the caller's
/// decision). On a secondary: `nbd-server-stop`, `x-colo-lost-heartbeat`, wait until COLO ended (the
/// secondary merges its overlays into the base and runs), the redirectors and their chardevs
/// removed (the rewriter stays: it keeps fixing the sequence numbers of TCP connections opened under
/// COLO). On a primary whose secondary died: the replication children, compare and filters removed,
/// then `x-colo-lost-heartbeat`. Then on both: the vCPUs running (`cont` if QEMU left them stopped),
/// `announce-self` (gratuitous ARP / RARP on every NIC). Every wait bounded by `bound`.
pub async fn take_over(qmp: &Qmp, def: &QemuDef, bound: Duration) -> Result<TakeOver, ColoError> {
    let start = Instant::now();
    let st = status(qmp).await?;
    match st.mode.as_str() {
        "secondary" => {
            let _ = qmp.execute("nbd-server-stop", Value::Null).await;
            qmp.execute("x-colo-lost-heartbeat", Value::Null)
                .await
                .map_err(qerr("x-colo-lost-heartbeat (secondary)"))?;
            wait_colo_end(qmp, bound).await?;
            for i in 0..def.nics.len() {
                for id in [n("f-in", i), n("f-out", i)] {
                    let _ = qmp.execute("object-del", json!({ "id": id })).await;
                }
                for id in [n("red-in", i), n("red-out", i)] {
                    let _ = qmp.execute("chardev-remove", json!({ "id": id })).await;
                }
            }
        }
        "primary" => {
            detach(qmp, def).await;
            qmp.execute("x-colo-lost-heartbeat", Value::Null)
                .await
                .map_err(qerr("x-colo-lost-heartbeat (primary)"))?;
            wait_colo_end(qmp, bound).await?;
        }
        _ => {}
    }
    let deadline = Instant::now() + bound;
    let status = loop {
        let (run, status) = running(qmp).await?;
        if run {
            break status;
        }
        match status.as_str() {
            "paused" | "colo" => {
                let _ = qmp.execute("cont", Value::Null).await;
            }
            "inmigrate" | "finish-migrate" | "postmigrate" => {}
            o => {
                return Err(ColoError::Setup {
                    what: "failover".into(),
                    why: format!("the VM is in run state {o:?}, not running"),
                })
            }
        }
        if Instant::now() >= deadline {
            return Err(ColoError::Timeout {
                what: "the VM running after failover".into(),
                bound,
                last: status,
            });
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    if !def.nics.is_empty() {
        qmp.execute(
            "announce-self",
            json!({ "initial": 50, "max": 550, "rounds": 5, "step": 100 }),
        )
        .await
        .map_err(qerr("announce-self"))?;
    }
    Ok(TakeOver {
        was: st.mode,
        status,
        ms: start.elapsed().as_millis() as u64,
    })
}

async fn wait_colo_end(qmp: &Qmp, bound: Duration) -> Result<(), ColoError> {
    let deadline = Instant::now() + bound;
    loop {
        let st = status(qmp).await?;
        if st.mode == "none" {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(ColoError::Timeout {
                what: "COLO ending after x-colo-lost-heartbeat".into(),
                bound,
                last: format!("mode {}", st.mode),
            });
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Measurement

/// Checkpoint pauses, from a primary's `STOP`/`RESUME` events and QEMU's own timestamps on them: in
/// COLO every stop of the vCPUs is a checkpoint (the primary stops, sends its dirty state, waits for
/// the secondary to load it, resumes). The first checkpoint (the full RAM pass) is included; callers
/// that want the steady state drop it.
#[derive(Debug, Clone, Default)]
pub struct PauseMeter {
    stopped: Option<i64>,
    pauses: Vec<Duration>,
}

impl PauseMeter {
    /// Feeds one event (others than `STOP`/`RESUME` are ignored).
    pub fn observe(&mut self, ev: &Event) {
        let Some(t) = ev.timestamp.map(|t| t.micros()) else {
            return;
        };
        match ev.event.as_str() {
            "STOP" => self.stopped = Some(t),
            "RESUME" => {
                if let Some(s) = self.stopped.take() {
                    self.pauses
                        .push(Duration::from_micros(u64::try_from(t - s).unwrap_or(0)));
                }
            }
            _ => {}
        }
    }

    /// The pauses seen so far, in order.
    pub fn pauses(&self) -> &[Duration] {
        &self.pauses
    }
}

/// Reads a primary's events for `window` and returns the checkpoint pauses seen (also the events
/// read, for callers that look for others such as `COLO_EXIT`).
pub async fn checkpoint_pauses(
    events: &mut Events,
    window: Duration,
) -> (Vec<Duration>, Vec<Event>) {
    let mut meter = PauseMeter::default();
    let mut seen = Vec::new();
    let until = tokio::time::Instant::now() + window;
    while let Ok(Some(ev)) = tokio::time::timeout_at(until, events.next()).await {
        meter.observe(&ev);
        seen.push(ev);
    }
    (meter.pauses, seen)
}

/// The `q`-quantile (0..=1) of `d`, nearest rank; zero for none.
pub fn quantile(d: &[Duration], q: f64) -> Duration {
    if d.is_empty() {
        return Duration::ZERO;
    }
    let mut v = d.to_vec();
    v.sort();
    let i = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1;
    v[i]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions() {
        assert_eq!(
            parse_version("QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)\n"),
            Some((7, 2, 22))
        );
        assert_eq!(parse_version("10.0.2"), Some((10, 0, 2)));
        assert_eq!(parse_version("9.1"), Some((9, 1, 0)));
        assert_eq!(parse_version("no digits here"), None);
        assert_eq!(check_version((10, 0, 2)), Err(BROKEN_10.to_string()));
        assert_eq!(check_version((10, 1, 0)), Err(BROKEN_10.to_string()));
        assert!(check_version((6, 2, 0))
            .unwrap_err()
            .contains("older than 7.0"));
        assert!(check_version((7, 2, 22)).is_ok());
        assert!(check_version((10, 2, 0)).is_ok());
    }

    #[test]
    fn pauses_from_stamped_events() {
        let ev = |name: &str, us: i64| Event {
            event: name.into(),
            data: Value::Null,
            timestamp: Some(crate::qmp::Timestamp {
                seconds: us / 1_000_000,
                microseconds: us % 1_000_000,
            }),
        };
        let mut m = PauseMeter::default();
        for e in [
            ev("RESUME", 10),
            ev("STOP", 1_000_000),
            ev("RESUME", 1_007_500),
            ev("STOP", 1_100_000),
            ev("COLO_EXIT", 1_100_100),
            ev("RESUME", 1_112_000),
        ] {
            m.observe(&e);
        }
        assert_eq!(
            m.pauses(),
            &[Duration::from_micros(7_500), Duration::from_micros(12_000)]
        );
        assert_eq!(quantile(m.pauses(), 0.5), Duration::from_micros(7_500));
        assert_eq!(quantile(m.pauses(), 0.99), Duration::from_micros(12_000));
    }

    #[test]
    fn addresses() {
        assert_eq!(Addr::inet("::1", 5).uri(), "tcp:[::1]:5");
        assert_eq!(Addr::unix("/r/m.sock").uri(), "unix:/r/m.sock");
        assert_eq!(Addr::unix("/a,b").chardev_opts(), "path=/a,,b");
    }
}
