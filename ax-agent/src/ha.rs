//! The HA engine of one compute host: `ax-agent ha-node` on its own, or inside the daemon (`ax-agent
//! run` with `[ha] node_config`, which calls [`serve_until`]).
//!
//! It exchanges heartbeats with its peer compute hosts (the failover crate, through
//! [`evacuate::hostwatch`]) and, when a peer is declared dead, runs the recovery engine
//! ([`evacuate::recovery`]) for that host: fence, force nova-compute down, evacuate the VMs whose Nova
//! metadata says `ax:level = ha` (`ft` and `none` — the default — are left alone).
//!
//! Which survivor acts: the one whose name sorts first among the hosts it still hears (itself
//! included). Every survivor sees the same set unless the network is partitioned; fencing keeps a
//! partition from running a VM twice, and the engine's duplicate check keeps one survivor from
//! recovering a host twice.
//!
//! Every engine event is printed as one JSON line on stdout (and appended to `--events FILE`). A control
//! socket (`control = "/run/ax/ha.sock"` in the config) takes one command per connection, one line:
//! `crashed <server-id>` (a VM crash report, e.g. from a hypervisor hook), `reenable <host>` (the
//! operator's call after repairing a host), `recoveries`, `history`; the answer is one JSON line.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use evacuate::fence::{FenceConfig, Fencer};
use evacuate::hostwatch::{self, HostEvent, PeerSpec};
use evacuate::keystone::{Keystone, KeystoneSettings};
use evacuate::nova::{Nova, NovaSettings};
use evacuate::recovery::{Engine, Event, Level, RecoveryConfig, Snapshot};
use serde::Deserialize;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tracing::{info, warn};

/// Options of `ax-agent ha-node`.
#[derive(clap::Args, Debug)]
pub struct HaNodeArgs {
    /// The node's TOML configuration.
    #[arg(long)]
    pub config: PathBuf,
    /// Also append every event as a JSON line to this file.
    #[arg(long)]
    pub events: Option<PathBuf>,
}

fn d_interval() -> u64 {
    200
}
fn d_timeout() -> u64 {
    1000
}

/// Heartbeat timing.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeartbeatSettings {
    /// Beat period, ms (default 200).
    #[serde(default = "d_interval")]
    pub interval_ms: u64,
    /// Silence after which a peer host is dead, ms (default 1000).
    #[serde(default = "d_timeout")]
    pub timeout_ms: u64,
}

impl Default for HeartbeatSettings {
    fn default() -> Self {
        HeartbeatSettings {
            interval_ms: d_interval(),
            timeout_ms: d_timeout(),
        }
    }
}

/// The `ha-node` configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HaNodeConfig {
    /// This host's name (its Nova compute host name).
    pub host: String,
    /// Heartbeat timing.
    #[serde(default)]
    pub heartbeat: HeartbeatSettings,
    /// The peer compute hosts.
    #[serde(default)]
    pub peers: Vec<PeerSpec>,
    /// The fence command.
    pub fence: FenceConfig,
    /// Recovery policy and bounds.
    #[serde(default)]
    pub recovery: RecoveryConfig,
    /// Nova options.
    #[serde(default)]
    pub nova: NovaSettings,
    /// Keystone credentials; if absent, `OS_*` variables, else `clouds.yaml` for `$OS_CLOUD`.
    #[serde(default)]
    pub keystone: Option<KeystoneSettings>,
    /// Control socket path.
    #[serde(default)]
    pub control: Option<PathBuf>,
    /// Where the engine's recoveries and history are kept across restarts (JSON, rewritten after
    /// every event). A recovery cut short by a restart is run again at start. Absent: nothing is kept.
    #[serde(default)]
    pub state: Option<PathBuf>,
}

/// Errors of `ha-node`.
#[derive(Debug, thiserror::Error)]
pub enum HaNodeError {
    /// The configuration file.
    #[error("config {path}: {message}")]
    Config {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// Keystone settings or auth.
    #[error(transparent)]
    Keystone(#[from] evacuate::keystone::KeystoneError),
    /// Nova.
    #[error(transparent)]
    Nova(#[from] evacuate::nova::NovaError),
    /// The engine.
    #[error(transparent)]
    Recovery(#[from] evacuate::recovery::RecoveryError),
    /// Heartbeats.
    #[error(transparent)]
    Watch(#[from] hostwatch::WatchError),
    /// The control socket or the events file.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path.
        path: String,
        /// The error.
        source: std::io::Error,
    },
}

impl HaNodeConfig {
    /// Reads and checks a configuration file.
    pub fn load(path: &std::path::Path) -> Result<Self, HaNodeError> {
        let bad = |message: String| HaNodeError::Config {
            path: path.display().to_string(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
        let cfg: HaNodeConfig = toml::from_str(&text).map_err(|e| bad(e.to_string()))?;
        if cfg.peers.iter().any(|p| p.name == cfg.host) {
            return Err(bad(format!("{} is listed as its own peer", cfg.host)));
        }
        cfg.recovery.validate().map_err(|e| bad(e.to_string()))?;
        if cfg.fence.command.is_empty() {
            warn!("no fence command: every host failure will raise an alert and evacuate nothing");
        }
        Ok(cfg)
    }
}

/// Whether `me` is the survivor that recovers `dead`: the first by name among the hosts `me` still
/// hears, itself included.
pub fn acts_for(me: &str, alive: &BTreeSet<String>, dead: &str) -> bool {
    alive
        .iter()
        .map(String::as_str)
        .chain(std::iter::once(me))
        .filter(|h| *h != dead)
        .min()
        == Some(me)
}

/// Runs `ax-agent ha-node`; the exit code.
pub fn run(args: &HaNodeArgs) -> i32 {
    let cfg = match HaNodeConfig::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ax-agent ha-node: {e}");
            return 2;
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ax-agent ha-node: cannot start the async runtime: {e}");
            return 1;
        }
    };
    let stop = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(e) => {
                warn!(error = %e, "no SIGTERM handler: stopping on Ctrl-C only");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    };
    let options = ServeOptions {
        events_file: args.events.clone(),
        print_events: true,
    };
    match rt.block_on(serve_until(cfg, options, stop, |_| {})) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("ax-agent ha-node: {e}");
            1
        }
    }
}

/// The engine type of an HA node.
pub type HaEngine = Engine<Nova<Keystone>>;

/// How [`serve_until`] reports events.
#[derive(Debug, Clone, Default)]
pub struct ServeOptions {
    /// Also append every event as a JSON line to this file.
    pub events_file: Option<PathBuf>,
    /// Print every event as a JSON line on stdout (`ax-agent ha-node`); otherwise they are logged.
    pub print_events: bool,
}

/// Runs an HA node from `cfg` until `stop` resolves: Keystone and Nova clients, the recovery engine
/// (state restored, interrupted recoveries run again), the control socket if configured, and the host
/// watch. `ready` gets the engine once it is built (the agent daemon answers its API from it).
pub async fn serve_until(
    cfg: HaNodeConfig,
    options: ServeOptions,
    stop: impl std::future::Future<Output = ()>,
    ready: impl FnOnce(HaEngine),
) -> Result<(), HaNodeError> {
    let events_file = options.events_file;
    let ks_settings = match cfg.keystone.clone() {
        Some(s) => s,
        None => KeystoneSettings::discover()?,
    };
    let ks = Arc::new(Keystone::new(ks_settings)?);
    let nova = Arc::new(Nova::from_keystone(ks, cfg.nova.clone()).await?);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Event>();
    let engine = Engine::new(
        nova,
        Fencer::new(cfg.fence.clone()),
        cfg.recovery.clone(),
        Arc::new(Level::of_metadata),
        Some(tx),
    )?;
    let resume = match &cfg.state {
        Some(path) => engine.restore(load_state(path)?),
        None => Vec::new(),
    };
    let mut file = match &events_file {
        Some(p) => Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|source| HaNodeError::Io {
                    what: "open events file",
                    path: p.display().to_string(),
                    source,
                })?,
        ),
        None => None,
    };
    let saver = engine.clone();
    let state_path = cfg.state.clone();
    tokio::spawn(async move {
        while let Some(e) = rx.recv().await {
            let line = serde_json::to_string(&e).unwrap_or_default();
            if options.print_events {
                println!("{line}");
            } else {
                info!(event = %line, "HA event");
            }
            if let Some(f) = file.as_mut() {
                if let Err(err) = writeln!(f, "{line}") {
                    warn!(error = %err, "cannot append to the events file");
                }
            }
            if let Some(p) = &state_path {
                if let Err(err) = save_state(p, &saver.snapshot()) {
                    warn!(error = %err, "cannot save the HA state");
                }
            }
        }
    });
    for (host, last_heard) in resume {
        warn!(%host, "running again the recovery a restart cut short");
        let engine = engine.clone();
        tokio::spawn(async move { engine.host_failed(&host, last_heard).await });
    }
    if let Some(path) = &cfg.control {
        let _ = std::fs::remove_file(path);
        let listener = tokio::net::UnixListener::bind(path).map_err(|source| HaNodeError::Io {
            what: "bind control socket",
            path: path.display().to_string(),
            source,
        })?;
        let engine = engine.clone();
        tokio::spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((s, _)) => {
                        tokio::spawn(control(engine.clone(), s));
                    }
                    Err(e) => {
                        warn!(error = %e, "control socket accept");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        });
    }
    ready(engine.clone());
    let (_watch, mut hosts) = hostwatch::watch(
        &cfg.host,
        &cfg.peers,
        Duration::from_millis(cfg.heartbeat.interval_ms),
        Duration::from_millis(cfg.heartbeat.timeout_ms),
    )?;
    info!(host = %cfg.host, peers = cfg.peers.len(), "HA node watching its peers");
    let mut alive = BTreeSet::new();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            ev = hosts.recv() => match ev {
                Some(HostEvent::Dead { host, last_heard, .. }) => {
                    alive.remove(&host);
                    if acts_for(&cfg.host, &alive, &host) {
                        let engine = engine.clone();
                        tokio::spawn(async move { engine.host_failed(&host, last_heard).await });
                    } else {
                        info!(%host, "peer dead; another survivor recovers it");
                    }
                }
                Some(HostEvent::Back { host }) => {
                    alive.insert(host.clone());
                    engine.host_back(&host);
                }
                Some(HostEvent::Up { host }) => {
                    alive.insert(host);
                }
                Some(HostEvent::NeverHeard { host }) => {
                    warn!(%host, "peer never heard from: not treated as a failure");
                }
                // No peer to watch: the engine still answers its control socket until stopped.
                None => {
                    stop.await;
                    break;
                }
            },
            () = &mut stop => break,
        }
    }
    if let Some(p) = &cfg.control {
        let _ = std::fs::remove_file(p);
    }
    Ok(())
}

/// The saved state at `path`; empty if the file does not exist. A file that cannot be read or parsed is
/// an error (the operator decides: it is never silently reset).
pub fn load_state(path: &std::path::Path) -> Result<Snapshot, HaNodeError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Snapshot::default()),
        Err(source) => {
            return Err(HaNodeError::Io {
                what: "read the HA state",
                path: path.display().to_string(),
                source,
            })
        }
    };
    serde_json::from_str(&text).map_err(|e| HaNodeError::Config {
        path: path.display().to_string(),
        message: format!(
            "the HA state is corrupt ({e}); move it away to start with no memory of past recoveries"
        ),
    })
}

/// Writes `snap` to `path` atomically (a temporary file renamed over it, synced).
pub fn save_state(path: &std::path::Path, snap: &Snapshot) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&serde_json::to_vec(snap).map_err(std::io::Error::other)?)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)
}

/// Sends one command line to an ha-node's control socket and returns its JSON answer (60 s timeout:
/// a crash report waits for the restart).
pub fn control_request(
    socket: &std::path::Path,
    line: &str,
) -> Result<serde_json::Value, HaNodeError> {
    control_request_within(socket, line, Duration::from_secs(60))
}

/// [`control_request`] with its own timeout.
pub fn control_request_within(
    socket: &std::path::Path,
    line: &str,
    timeout: Duration,
) -> Result<serde_json::Value, HaNodeError> {
    use std::io::BufRead as _;
    let io = |what: &'static str| {
        let path = socket.display().to_string();
        move |source| HaNodeError::Io { what, path, source }
    };
    let mut s = std::os::unix::net::UnixStream::connect(socket)
        .map_err(io("connect to the ha-node control socket"))?;
    s.set_read_timeout(Some(timeout))
        .map_err(io("set a timeout on the control socket"))?;
    s.write_all(format!("{line}\n").as_bytes())
        .map_err(io("write to the control socket"))?;
    let mut answer = String::new();
    std::io::BufReader::new(s)
        .read_line(&mut answer)
        .map_err(io("read the control socket"))?;
    serde_json::from_str(&answer).map_err(|e| HaNodeError::Io {
        what: "parse the control socket's answer",
        path: socket.display().to_string(),
        source: std::io::Error::other(e),
    })
}

async fn control(engine: HaEngine, s: tokio::net::UnixStream) {
    let (r, mut w) = s.into_split();
    let mut line = String::new();
    if BufReader::new(r).read_line(&mut line).await.is_err() {
        return;
    }
    let answer = answer(&engine, &line).await;
    let _ = w.write_all(format!("{answer}\n").as_bytes()).await;
}

/// The answer to one control line (`crashed <server-id>`, `reenable <host>`, `recoveries`, `history`):
/// what the control socket sends back, and what the agent daemon's API serves from an in-process engine.
pub async fn answer(engine: &HaEngine, line: &str) -> serde_json::Value {
    let mut words = line.split_whitespace();
    match (words.next(), words.next()) {
        (Some("crashed"), Some(vm)) => match engine.vm_crashed(vm).await {
            Ok(host) => serde_json::json!({"ok": true, "host": host}),
            Err(e) => serde_json::json!({"ok": false, "error": e.to_string()}),
        },
        (Some("reenable"), Some(host)) => match engine.reenable_host(host).await {
            Ok(svc) => serde_json::json!({"ok": true, "service": svc}),
            Err(e) => serde_json::json!({"ok": false, "error": e.to_string()}),
        },
        (Some("recoveries"), None) => {
            serde_json::json!({"ok": true, "recoveries": engine.recoveries()})
        }
        (Some("history"), None) => serde_json::json!({"ok": true, "history": engine.history()}),
        _ => {
            serde_json::json!({"ok": false, "error": format!("unknown command {:?}", line.trim())})
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_survivor_acts() {
        let alive: BTreeSet<String> = ["compute3".to_string()].into();
        assert!(acts_for("compute2", &alive, "compute1"));
        assert!(!acts_for(
            "compute3",
            &["compute2".to_string()].into(),
            "compute1"
        ));
        assert!(acts_for("compute3", &BTreeSet::new(), "compute1"));
    }

    #[test]
    fn the_sample_config_loads() {
        let sample =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd/ha-node.toml");
        let c = HaNodeConfig::load(&sample).unwrap();
        assert_eq!(
            c.control.as_deref(),
            Some(std::path::Path::new("/run/ax/ha.sock"))
        );
        assert_eq!(c.peers.len(), 1);
        assert!(!c.fence.command.is_empty());
    }

    #[test]
    fn config_file() {
        let dir = std::env::temp_dir().join(format!("ax-ha-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("ha.toml");
        std::fs::write(
            &p,
            r#"host = "compute2"
control = "/tmp/x.sock"
[heartbeat]
interval_ms = 100
[[peers]]
name = "compute1"
local = "127.0.0.1:27102"
addr = "127.0.0.1:27101"
[fence]
command = ["/usr/local/bin/fence", "{host}"]
[recovery]
policy = "auto"
max_parallel = 8
[nova]
evacuate_mode = "stopped"
"#,
        )
        .unwrap();
        let c = HaNodeConfig::load(&p).unwrap();
        assert_eq!(c.heartbeat.timeout_ms, 1000);
        assert_eq!(c.peers[0].name, "compute1");
        assert_eq!(c.recovery.max_parallel, 8);
        std::fs::write(&p, "host = \"a\"\n[fence]\n[[peers]]\nname = \"a\"\nlocal = \"127.0.0.1:1\"\naddr = \"127.0.0.1:2\"\n").unwrap();
        assert!(HaNodeConfig::load(&p)
            .unwrap_err()
            .to_string()
            .contains("own peer"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
