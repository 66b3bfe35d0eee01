//! The agent's configuration: a TOML file (`/etc/ax/agent.toml` by default), environment overrides for
//! the common keys, defaults that run on one machine with nothing else installed, and validation that
//! refuses a bad file naming the key, the value and why.
//!
//! Parsing is strict (`deny_unknown_fields` everywhere: a misspelt key is an error, not a silently
//! ignored line); [`Config::validate`] then checks what types cannot (names, ranges, unique peers, port
//! ranges that fit). The sample with every key is `systemd/agent.toml`.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Default config file.
pub const DEFAULT_PATH: &str = "/etc/ax/agent.toml";

/// Environment overrides: variable → key.
pub const ENV_OVERRIDES: &[(&str, &str)] = &[
    ("AX_HOST", "host"),
    ("AX_API_LISTEN", "api.listen"),
    ("AX_STORAGE_DIR", "storage_dir"),
    ("AX_TOKEN_FILE", "token_file"),
    ("AX_PKI_DIR", "pki_dir"),
    ("AX_WITNESS", "witness"),
];

/// A configuration error: which key, which value, why.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("config {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema (unknown key, wrong type, …).
    #[error("config {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message (names the key and the line).
        message: String,
    },
    /// A key has a value that is not allowed.
    #[error("config {origin}: key `{key}` = {value}: {why}")]
    Invalid {
        /// The file, or the environment variable that set it.
        origin: String,
        /// The key.
        key: String,
        /// The value, as written.
        value: String,
        /// Why it is refused.
        why: String,
    },
}

fn d_api_listen() -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, 7600))
}
fn d_loopback() -> IpAddr {
    IpAddr::V4(Ipv4Addr::LOCALHOST)
}
fn d_pki() -> PathBuf {
    PathBuf::from("/etc/ax/pki")
}
fn d_token() -> PathBuf {
    PathBuf::from("/etc/ax/token")
}
fn d_true() -> bool {
    true
}

/// The whole configuration.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// This host's name (its certificate's name). Default: the machine's host name.
    #[serde(default)]
    pub host: String,
    /// Where the agent keeps its store, VM definitions, worker sockets and disks. Default:
    /// `/var/lib/ax` as root, `$XDG_STATE_HOME/ax` (or `~/.local/state/ax`) otherwise.
    #[serde(default)]
    pub storage_dir: PathBuf,
    /// PKI directory (`ax-agent certs`): `ca.pem`, `<host>.pem`, `<host>-key.pem`.
    #[serde(default = "d_pki")]
    pub pki_dir: PathBuf,
    /// The API bearer token, one line; the file must be readable by its owner only.
    #[serde(default = "d_token")]
    pub token_file: PathBuf,
    /// The witness (mutual TLS over TCP) shared by the hosts of FT pairs, when `[coordinator]` does not
    /// name etcd. Absent: the agent runs a local witness for its own VMs ([`Ports::local_witness`]),
    /// which is enough without peers.
    #[serde(default)]
    pub witness: Option<SocketAddr>,
    /// The name the shared witness's certificate is valid for (default `witness`).
    #[serde(default = "d_witness_name")]
    pub witness_name: String,
    /// The most FT VMs (primaries plus secondaries) this host may hold.
    #[serde(default = "Placement::default_max")]
    pub max_ft_vms_per_host: u32,
    /// The memory this host offers to VMs, MiB, for the placement of taken-over VMs (host-failure
    /// recovery). Absent: the kernel's `MemAvailable` when asked. Either way the memory of the VMs
    /// this host runs is subtracted.
    #[serde(default)]
    pub vm_memory_mib: Option<u64>,
    /// The REST API.
    #[serde(default)]
    pub api: Api,
    /// This host's addresses.
    #[serde(default)]
    pub addresses: Addresses,
    /// Ports of per-VM endpoints.
    #[serde(default)]
    pub ports: Ports,
    /// Epoch settings of FT VMs.
    #[serde(default)]
    pub epoch: Epoch,
    /// Heartbeats between FT pairs.
    #[serde(default)]
    pub heartbeat: Heartbeat,
    /// HA monitoring (crash restarts).
    #[serde(default)]
    pub ha: Ha,
    /// `[fence]`: how a secondary fences its dead primary's host before it takes an FT VM over.
    #[serde(default)]
    pub fence: Option<Fence>,
    /// The other hosts.
    #[serde(default)]
    pub peers: Vec<PeerConfig>,
    /// OpenStack (Keystone, Nova): parsed and validated; used by HA evacuation and Nova tagging.
    #[serde(default)]
    pub openstack: Option<OpenStack>,
    /// Swift as the volume replication target of HA and FT VMs' disks.
    #[serde(default)]
    pub swift: Option<Swift>,
    /// Sheepdog as the volume replication target.
    #[serde(default)]
    pub sheepdog: Option<Sheepdog>,
    /// How volumes are replicated (when `[swift]` or `[sheepdog]` is enabled).
    #[serde(default)]
    pub volume: Volume,
    /// `[coordinator]`: where FT generations are kept (protocol v2). Absent: the embedded witness.
    #[serde(default)]
    pub coordinator: Option<CoordinatorConfig>,
    /// `[qemu]`: host-wide settings of QEMU VMs.
    #[serde(default)]
    pub qemu: QemuConfig,
}

/// `[qemu]`: host-wide settings of QEMU VMs (`engine = "qemu"`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct QemuConfig {
    /// The QEMU binary of VMs that name none (default `qemu-system-x86_64` on `PATH`).
    pub binary: Option<String>,
    /// Arguments appended verbatim to every QEMU VM's command line on this host: the escape hatch for
    /// what ax does not model (e.g. `["-cpu", "host"]`). The API never takes free-form arguments.
    pub extra_args: Vec<String>,
    /// COLO's checkpoint period of FT QEMU VMs (`x-checkpoint-delay`), ms (default 100).
    pub colo_checkpoint_ms: Option<u64>,
}

/// `[coordinator]`: an etcd v3 cluster keeping the FT VMs' generations
/// (`failover::coordinator::etcd`), instead of the embedded witness.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CoordinatorConfig {
    /// Client URLs of the etcd members, e.g. `["https://10.0.0.1:2379", "https://10.0.0.2:2379"]`.
    pub etcd: Vec<String>,
    /// CA certificate (PEM) of etcd's server certificates. Default: the cluster CA (`pki_dir`).
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// Client certificate (PEM) presented to etcd. Default: this host's certificate (`pki_dir`).
    #[serde(default)]
    pub cert: Option<PathBuf>,
    /// Its key (PEM). Default: this host's key (`pki_dir`).
    #[serde(default)]
    pub key: Option<PathBuf>,
    /// Key prefix of the generations (default `/ax/generation/`).
    #[serde(default = "d_coordinator_prefix")]
    pub prefix: String,
    /// Per-request timeout, ms (default 1000).
    #[serde(default = "d_coordinator_timeout")]
    pub timeout_ms: u64,
    /// Key prefix of the HA catalog: the definitions of HA VMs, so that the survivors of a host can
    /// restart them (default `/ax/catalog/`).
    #[serde(default = "d_catalog_prefix")]
    pub catalog_prefix: String,
}

fn d_witness_name() -> String {
    "witness".into()
}

fn d_catalog_prefix() -> String {
    "/ax/catalog/".into()
}

fn d_coordinator_prefix() -> String {
    "/ax/generation/".into()
}

fn d_coordinator_timeout() -> u64 {
    1000
}

/// `[volume]`: replication of the disks of VMs at level ha and ft to the enabled target.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Volume {
    /// Seconds between two replications of one VM's disk (a new version each time).
    #[serde(default = "d_volume_interval")]
    pub interval_s: u64,
    /// Versions kept per VM; older ones are pruned after each replication.
    #[serde(default = "d_volume_keep")]
    pub keep: usize,
    /// Pace of the local snapshot copy in MB/s (0: full speed).
    #[serde(default)]
    pub snapshot_mb_s: u64,
    /// Uploads in flight per replication.
    #[serde(default = "d_volume_concurrency")]
    pub concurrency: usize,
}

impl Default for Volume {
    fn default() -> Self {
        Volume {
            interval_s: d_volume_interval(),
            keep: d_volume_keep(),
            snapshot_mb_s: 0,
            concurrency: d_volume_concurrency(),
        }
    }
}

fn d_volume_interval() -> u64 {
    300
}
fn d_volume_keep() -> usize {
    3
}
fn d_volume_concurrency() -> usize {
    4
}

struct Placement;
impl Placement {
    fn default_max() -> u32 {
        policy::Limits::default().max_ft_vms_per_host
    }
}

/// `[api]`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Api {
    /// Listen address. Default 127.0.0.1:7600; peers must reach it for FT pairs.
    #[serde(default = "d_api_listen")]
    pub listen: SocketAddr,
    /// Serve HTTPS with this host's certificate from `pki_dir` (and call peers over HTTPS, verified
    /// against the cluster CA: set it on every host of a cluster alike). Default false (HTTP).
    #[serde(default)]
    pub tls: bool,
}

impl Default for Api {
    fn default() -> Self {
        Api {
            listen: d_api_listen(),
            tls: false,
        }
    }
}

/// `[addresses]`: this host's IP addresses (ports come from `[ports]`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Addresses {
    /// Replication links (QUIC) and output endpoints.
    #[serde(default = "d_loopback")]
    pub link: IpAddr,
    /// Heartbeats and the witness.
    #[serde(default = "d_loopback")]
    pub hb: IpAddr,
    /// A second heartbeat path (another network), used with peers that have one too: a peer is
    /// declared dead only when both paths are silent. Same ports as `hb`.
    #[serde(default)]
    pub hb2: Option<IpAddr>,
}

impl Default for Addresses {
    fn default() -> Self {
        Addresses {
            link: d_loopback(),
            hb: d_loopback(),
            hb2: None,
        }
    }
}

/// `[ports]`: each worker (one per VM, primary or standby) takes a slot `i` in `0..slots` and listens
/// on `link + i` and `heartbeat + i`; each VM's output endpoint is `output + n` (chosen at definition,
/// the same on both hosts of a pair).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Ports {
    /// First replication-link port.
    pub link: u16,
    /// First heartbeat port.
    pub heartbeat: u16,
    /// First output-endpoint port.
    pub output: u16,
    /// Workers (and output ports) per host.
    pub slots: u16,
    /// Port of the local witness (when `witness` is not set), on 127.0.0.1.
    pub local_witness: u16,
    /// First port of the host heartbeats (UDP, on `addresses.hb`) between agents, for host-failure
    /// recovery of VMs not under Nova (`[coordinator]` set and peers listed). With the cluster's
    /// hosts (this one and its peers) sorted by name, host x hears host y on `host_heartbeat +
    /// rank(y)`: every host must use the same value and list the same cluster.
    pub host_heartbeat: u16,
    /// First port of the COLO data relays of QEMU VMs that are FT (`engine = "qemu"`, `ft_capable`):
    /// slot `i` uses [`COLO_PORTS_PER_SLOT`] ports from `colo + i · COLO_PORTS_PER_SLOT` (migration
    /// stream and NBD on a secondary, each NIC's mirror and compare input on a primary).
    pub colo: u16,
}

/// Ports of one worker slot's COLO data relays (`[ports] colo`): 2 for the secondary, 2 per NIC (up
/// to 7) for the primary.
pub const COLO_PORTS_PER_SLOT: u16 = 16;

impl Default for Ports {
    fn default() -> Self {
        Ports {
            link: 23400,
            heartbeat: 23600,
            output: 23500,
            slots: 64,
            local_witness: 23701,
            host_heartbeat: 23800,
            colo: 24000,
        }
    }
}

/// `[epoch]`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Epoch {
    /// Epoch length in milliseconds (1–1000).
    pub interval_ms: u64,
}

impl Default for Epoch {
    fn default() -> Self {
        Epoch { interval_ms: 5 }
    }
}

/// `[heartbeat]`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Heartbeat {
    /// Beat period in milliseconds.
    pub interval_ms: u64,
    /// Silence after which the peer is dead, in milliseconds (at least 2 × interval).
    pub timeout_ms: u64,
}

impl Default for Heartbeat {
    fn default() -> Self {
        Heartbeat {
            interval_ms: 20,
            timeout_ms: 100,
        }
    }
}

/// `[fence]`: the command a secondary runs (through `sh -c`, `{host}` replaced by the dead primary's
/// host name, also in `$AX_FENCE_HOST`) before it promotes; success is exit status 0 within
/// `timeout_ms`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Fence {
    /// The command line, e.g. `fence_ipmilan --ip {host}-ipmi --username ax --password-file /etc/ax/ipmi -o off`.
    pub command: String,
    /// How long it may take, ms (default 10000).
    #[serde(default = "d_fence_timeout")]
    pub timeout_ms: u64,
    /// Never promote without a successful fence (retried every second) — safest with a real power
    /// fence. Default false: a failed fence is logged and the promotion goes on on the coordinator's
    /// answer alone (output needs no fence: the old primary cannot release what the promoted replica
    /// lacks, docs/DESIGN.md §3.6).
    #[serde(default)]
    pub required: bool,
}

fn d_fence_timeout() -> u64 {
    10_000
}

/// `[ha]`: what monitoring (level ha and ft) does when a VM's worker dies on this host.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Ha {
    /// Restarts in place allowed within `restart_window_s`; beyond that the VM stays down (`crashed`).
    pub restart_limit: u32,
    /// The window, in seconds.
    pub restart_window_s: u64,
    /// The control socket of this host's `ax-agent ha-node` (HA evacuation of Nova VMs): when set, the
    /// API serves its host recoveries (`GET /v1/recoveries`) and re-enables hosts through it.
    #[serde(default)]
    pub node_socket: Option<PathBuf>,
    /// Run the HA engine (host heartbeats, fencing, Nova evacuation of `ax:level=ha` servers) inside
    /// this daemon, configured by this `ha-node` file (`docs/ha-evacuation.md`), instead of a separate
    /// `ax-agent ha-node`. Exclusive with `node_socket`.
    #[serde(default)]
    pub node_config: Option<PathBuf>,
    /// With `node_config`: where the engine's events go, one JSON line each (default
    /// `storage_dir/ha-events.jsonl`).
    #[serde(default)]
    pub events_file: Option<PathBuf>,
    /// Host heartbeat period for host-failure recovery of VMs not under Nova, ms (default 200).
    pub host_interval_ms: u64,
    /// Silence after which a peer host is dead and fenced, ms (default 1000; at least twice
    /// `host_interval_ms`). Longer than the FT heartbeat's: a false verdict here fences a host.
    pub host_timeout_ms: u64,
}

impl Default for Ha {
    fn default() -> Self {
        Ha {
            restart_limit: 3,
            restart_window_s: 600,
            node_socket: None,
            node_config: None,
            events_file: None,
            host_interval_ms: 200,
            host_timeout_ms: 1000,
        }
    }
}

/// `[[peers]]`: another ax host.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    /// Its host name (its certificate's name).
    pub name: String,
    /// Its API address.
    pub api: SocketAddr,
    /// Its replication-link address (IP).
    pub link: IpAddr,
    /// Its heartbeat address (IP).
    pub hb: IpAddr,
    /// Its second heartbeat path's address (IP), if it has one.
    #[serde(default)]
    pub hb2: Option<IpAddr>,
}

/// `[openstack]`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OpenStack {
    /// Keystone v3 URL (`http://…/v3`).
    pub auth_url: String,
    /// User name.
    pub username: String,
    /// File holding the password (one line).
    pub password_file: PathBuf,
    /// Project name.
    pub project: String,
    /// User domain.
    #[serde(default = "d_default_domain")]
    pub user_domain: String,
    /// Project domain.
    #[serde(default = "d_default_domain")]
    pub project_domain: String,
    /// Region.
    #[serde(default)]
    pub region: Option<String>,
    /// Read `ax:level` from the Nova server metadata of the VMs that name a `nova_server`, and set their
    /// level from it (the daemon's `nova_tags` subsystem; see docs/daemon.md).
    #[serde(default)]
    pub nova_tagging: bool,
    /// How often to read the tags, in seconds (1–86400).
    #[serde(default = "d_tag_poll")]
    pub tag_poll_s: u64,
}

impl OpenStack {
    /// The Keystone v3 settings of this section, with `password` (read from `password_file`).
    /// Requests time out after 10 s, so that an unresponsive service delays a poll, never blocks it.
    pub fn keystone_settings(&self, password: String) -> evacuate::keystone::KeystoneSettings {
        evacuate::keystone::KeystoneSettings {
            auth_url: self.auth_url.clone(),
            username: self.username.clone(),
            password,
            user_domain_name: self.user_domain.clone(),
            project_name: self.project.clone(),
            project_domain_name: self.project_domain.clone(),
            region_name: self.region.clone(),
            interface: "public".into(),
            cacert: None,
            insecure: false,
            renew_before_secs: 300,
            request_timeout_secs: 10,
        }
    }
}

/// Reads a secret file — the API token, the OpenStack password: it must exist, be readable by its owner
/// only (mode `0600` or stricter) and hold one non-empty line (surrounding white space is dropped).
/// `what` names the file in messages; `hint` is added when it does not exist.
pub fn read_secret_file(what: &str, path: &Path, hint: &str) -> Result<String, String> {
    use std::os::unix::fs::PermissionsExt;
    let p = path.display();
    let meta = std::fs::metadata(path).map_err(|e| format!("{what} {p}: {e}{hint}"))?;
    if !meta.is_file() {
        return Err(format!("{what} {p} is not a regular file{hint}"));
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "{what} {p} has mode {mode:04o}: it must be readable by its owner only (chmod 600 {p})"
        ));
    }
    let text = std::fs::read_to_string(path).map_err(|e| format!("{what} {p}: {e}"))?;
    let line = text.trim();
    if line.is_empty() {
        return Err(format!("{what} {p} is empty"));
    }
    Ok(line.to_string())
}

fn d_default_domain() -> String {
    "Default".into()
}
fn d_tag_poll() -> u64 {
    30
}

/// `[swift]`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Swift {
    /// Container for volume replicas.
    pub container: String,
    /// Use the Keystone catalogue's endpoint (default) or this URL.
    #[serde(default)]
    pub url: Option<String>,
    /// Whether volume replication uses Swift.
    #[serde(default = "d_true")]
    pub enabled: bool,
    /// Authenticate with Swift's TempAuth at this URL (`http://…/auth/v1.0`) instead of Keystone.
    #[serde(default)]
    pub tempauth_url: Option<String>,
    /// TempAuth user (`account:user`).
    #[serde(default)]
    pub user: Option<String>,
    /// File holding the TempAuth key (one line, owner-only).
    #[serde(default)]
    pub key_file: Option<PathBuf>,
}

/// `[sheepdog]`: the gateways (any sheep of the cluster is one), tried in order: when the one in use
/// fails, replication moves to the next.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Sheepdog {
    /// One sheep's address (the single-gateway form; listed first when `addresses` is set too).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<SocketAddr>,
    /// The sheep addresses, e.g. `["127.0.0.1:7000", "127.0.0.1:7001"]`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<SocketAddr>,
    /// Whether volume replication uses Sheepdog.
    #[serde(default = "d_true")]
    pub enabled: bool,
}

impl Sheepdog {
    /// Every gateway, in order, each once: `address` then `addresses`.
    pub fn gateways(&self) -> Vec<SocketAddr> {
        let mut out: Vec<SocketAddr> = Vec::new();
        for a in self.address.iter().chain(&self.addresses) {
            if !out.contains(a) {
                out.push(*a);
            }
        }
        out
    }
}

/// Where a value came from, for error messages.
fn origin_of(key: &str, file: &str, env: &[(String, String)]) -> String {
    env.iter().find(|(_, k)| k == key).map_or_else(
        || file.to_string(),
        |(var, _)| format!("(environment {var})"),
    )
}

/// The default storage directory: `/var/lib/ax` as root, else `$XDG_STATE_HOME/ax`, else
/// `$HOME/.local/state/ax`.
pub fn default_storage_dir() -> PathBuf {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return PathBuf::from("/var/lib/ax");
    }
    if let Some(x) = std::env::var_os("XDG_STATE_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(x).join("ax");
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/tmp".into());
    PathBuf::from(home).join(".local/state/ax")
}

fn machine_host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

impl Default for Config {
    fn default() -> Self {
        toml::from_str("").expect("an empty file is a valid configuration")
    }
}

impl Config {
    /// Loads `path` (a missing file at the default path means "all defaults"; a missing file named
    /// explicitly is an error), applies the environment overrides and validates.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let env: Vec<(String, String)> = ENV_OVERRIDES
            .iter()
            .filter_map(|(var, _)| std::env::var(var).ok().map(|v| (var.to_string(), v)))
            .collect();
        Self::load_with_env(path, &env)
    }

    /// [`Config::load`] with the environment given (`(variable, value)` pairs).
    pub fn load_with_env(
        path: Option<&Path>,
        env: &[(String, String)],
    ) -> Result<Config, ConfigError> {
        let (file, text) = match path {
            Some(p) => (
                p.to_path_buf(),
                std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                    path: p.to_path_buf(),
                    source,
                })?,
            ),
            None => {
                let p = PathBuf::from(DEFAULT_PATH);
                match std::fs::read_to_string(&p) {
                    Ok(t) => (p, t),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => (p, String::new()),
                    Err(source) => return Err(ConfigError::Read { path: p, source }),
                }
            }
        };
        Self::from_toml(&text, &file, env)
    }

    /// Parses `text` (from `file`, for messages), applies `env` overrides, fills the defaults that
    /// depend on the machine, validates.
    pub fn from_toml(
        text: &str,
        file: &Path,
        env: &[(String, String)],
    ) -> Result<Config, ConfigError> {
        let mut cfg: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: file.to_path_buf(),
            // The parser's caret diagram needs its own lines.
            message: e.to_string().trim_end().to_string(),
        })?;
        // (variable, key, value) for the variables that override a key.
        let env: Vec<(&str, &str, &str)> = env
            .iter()
            .filter_map(|(var, value)| {
                ENV_OVERRIDES
                    .iter()
                    .find(|(v, _)| v == var)
                    .map(|(v, key)| (*v, *key, value.as_str()))
            })
            .collect();
        let mut origins = Vec::new();
        for &(var, key, value) in &env {
            origins.push((var.to_string(), key.to_string()));
            let bad = |why: String| ConfigError::Invalid {
                origin: format!("(environment {var})"),
                key: key.to_string(),
                value: format!("{value:?}"),
                why,
            };
            match key {
                "host" => cfg.host = value.to_string(),
                "api.listen" => {
                    cfg.api.listen = value
                        .parse()
                        .map_err(|e| bad(format!("not an IP:port address ({e})")))?
                }
                "storage_dir" => cfg.storage_dir = PathBuf::from(value),
                "token_file" => cfg.token_file = PathBuf::from(value),
                "pki_dir" => cfg.pki_dir = PathBuf::from(value),
                "witness" => {
                    cfg.witness = if value.is_empty() {
                        None
                    } else {
                        Some(
                            value
                                .parse()
                                .map_err(|e| bad(format!("not an IP:port address ({e})")))?,
                        )
                    }
                }
                _ => {}
            }
        }
        if cfg.host.is_empty() {
            cfg.host = machine_host_name();
        }
        if cfg.storage_dir.as_os_str().is_empty() {
            cfg.storage_dir = default_storage_dir();
        }
        cfg.validate(&file.display().to_string(), &origins)?;
        Ok(cfg)
    }

    /// Checks, at daemon start, that the ports this host's workers will listen on are free: for every
    /// worker slot not in `used_slots`, `ports.link + slot` (QUIC/UDP, and TCP: a TCP service there,
    /// such as a sheep on 7000, is a clash waiting to confuse) on `addresses.link` and
    /// `ports.heartbeat + slot` (UDP) on `addresses.hb` (and `hb2`); every output port not in
    /// `used_outputs` (TCP on `addresses.link`). The slots and outputs of existing VMs are skipped:
    /// their workers may be running and hold them. The error names the key, the port and who refused.
    pub fn check_ports_free(&self, used_slots: &[u16], used_outputs: &[u16]) -> Result<(), String> {
        let p = &self.ports;
        let a = &self.addresses;
        let busy = |key: &str, addr: SocketAddr, proto: &str, e: std::io::Error| {
            format!(
                "{key}: port {} ({proto} on {}) is in use: {e} — another service listens there; move \
                 [ports] {key} (the range {key}..+ports.slots = {}) elsewhere",
                addr.port(),
                addr.ip(),
                p.slots
            )
        };
        let udp = |key: &str, addr: SocketAddr| {
            std::net::UdpSocket::bind(addr)
                .map(drop)
                .map_err(|e| busy(key, addr, "UDP", e))
        };
        let tcp = |key: &str, addr: SocketAddr| {
            std::net::TcpListener::bind(addr)
                .map(drop)
                .map_err(|e| busy(key, addr, "TCP", e))
        };
        for slot in (0..p.slots).filter(|s| !used_slots.contains(s)) {
            let link = SocketAddr::new(a.link, p.link + slot);
            udp("link", link)?;
            tcp("link", link)?;
            for hb in std::iter::once(a.hb).chain(a.hb2) {
                udp("heartbeat", SocketAddr::new(hb, p.heartbeat + slot))?;
            }
        }
        for port in (p.output..p.output + p.slots).filter(|o| !used_outputs.contains(o)) {
            tcp("output", SocketAddr::new(a.link, port))?;
        }
        if self.host_recovery() {
            for (peer, port) in self.host_heartbeat_ports() {
                udp(
                    &format!("host_heartbeat (with {peer})"),
                    SocketAddr::new(a.hb, port.0),
                )?;
            }
        }
        Ok(())
    }

    /// Host heartbeat ports, per peer: (the port this host hears it on, the port it hears this host
    /// on). See [`Ports::host_heartbeat`].
    pub fn host_heartbeat_ports(&self) -> Vec<(String, (u16, u16))> {
        let mut all: Vec<&str> = self.peers.iter().map(|p| p.name.as_str()).collect();
        all.push(&self.host);
        all.sort_unstable();
        let port = |name: &str| {
            let rank = all.iter().position(|h| *h == name).unwrap_or(0);
            self.ports.host_heartbeat + rank as u16
        };
        self.peers
            .iter()
            .map(|p| (p.name.clone(), (port(&p.name), port(&self.host))))
            .collect()
    }

    /// Whether this agent recovers peers' VMs when their host fails (and has its own recovered):
    /// a `[coordinator]` decides who runs each VM, and there are peers to watch.
    pub fn host_recovery(&self) -> bool {
        self.coordinator.is_some() && !self.peers.is_empty()
    }

    /// Checks what types cannot. `env` names the keys set from the environment (for messages).
    pub fn validate(&self, file: &str, env: &[(String, String)]) -> Result<(), ConfigError> {
        let bad = |key: &str, value: String, why: &str| ConfigError::Invalid {
            origin: origin_of(key, file, env),
            key: key.to_string(),
            value,
            why: why.to_string(),
        };
        if let Err(e) = crate::certs::check_host_name(&self.host) {
            return Err(bad("host", format!("{:?}", self.host), &e.to_string()));
        }
        if self.host.len() > 40 {
            return Err(bad(
                "host",
                format!("{:?}", self.host),
                "longer than 40 bytes (the witness identifies holders as host#pid)",
            ));
        }
        if !self.storage_dir.is_absolute() {
            return Err(bad(
                "storage_dir",
                format!("{:?}", self.storage_dir),
                "must be an absolute path",
            ));
        }
        for (key, p) in [("pki_dir", &self.pki_dir), ("token_file", &self.token_file)] {
            if !p.is_absolute() {
                return Err(bad(key, format!("{p:?}"), "must be an absolute path"));
            }
        }
        if self.max_ft_vms_per_host == 0 {
            return Err(bad(
                "max_ft_vms_per_host",
                "0".into(),
                "must be at least 1 (use level ha or none to have no FT VMs)",
            ));
        }
        let e = &self.epoch;
        if !(1..=1000).contains(&e.interval_ms) {
            return Err(bad(
                "epoch.interval_ms",
                e.interval_ms.to_string(),
                "must be between 1 and 1000",
            ));
        }
        let h = &self.heartbeat;
        if !(1..=10_000).contains(&h.interval_ms) {
            return Err(bad(
                "heartbeat.interval_ms",
                h.interval_ms.to_string(),
                "must be between 1 and 10000",
            ));
        }
        if h.timeout_ms < 2 * h.interval_ms {
            return Err(bad(
                "heartbeat.timeout_ms",
                h.timeout_ms.to_string(),
                &format!(
                    "must be at least twice heartbeat.interval_ms ({})",
                    h.interval_ms
                ),
            ));
        }
        if self.ha.host_interval_ms == 0 || self.ha.host_timeout_ms < 2 * self.ha.host_interval_ms {
            return Err(bad(
                "ha.host_timeout_ms",
                self.ha.host_timeout_ms.to_string(),
                &format!(
                    "must be at least twice ha.host_interval_ms ({}), which must not be 0",
                    self.ha.host_interval_ms
                ),
            ));
        }
        if let Some(c) = &self.coordinator {
            if c.etcd.is_empty() {
                return Err(bad(
                    "coordinator.etcd",
                    "[]".into(),
                    "name at least one etcd client URL",
                ));
            }
            for u in &c.etcd {
                if !(u.starts_with("https://") || u.starts_with("http://")) {
                    return Err(bad(
                        "coordinator.etcd",
                        format!("{u:?}"),
                        "must be an http:// or https:// URL",
                    ));
                }
            }
            for (key, path) in [
                ("coordinator.ca", &c.ca),
                ("coordinator.cert", &c.cert),
                ("coordinator.key", &c.key),
            ] {
                if let Some(p) = path.as_ref().filter(|p| !p.is_absolute()) {
                    return Err(bad(key, format!("{p:?}"), "must be an absolute path"));
                }
            }
            if c.cert.is_some() != c.key.is_some() {
                return Err(bad(
                    "coordinator.cert",
                    format!("{:?}", c.cert),
                    "give coordinator.cert and coordinator.key together",
                ));
            }
            if !(1..=60_000).contains(&c.timeout_ms) {
                return Err(bad(
                    "coordinator.timeout_ms",
                    c.timeout_ms.to_string(),
                    "must be between 1 and 60000",
                ));
            }
        }
        if self.ha.restart_window_s == 0 {
            return Err(bad("ha.restart_window_s", "0".into(), "must be at least 1"));
        }
        for (key, path) in [
            ("ha.node_socket", &self.ha.node_socket),
            ("ha.node_config", &self.ha.node_config),
            ("ha.events_file", &self.ha.events_file),
        ] {
            if let Some(p) = path.as_ref().filter(|p| !p.is_absolute()) {
                return Err(bad(key, format!("{p:?}"), "must be an absolute path"));
            }
        }
        if let (Some(_), Some(c)) = (&self.ha.node_socket, &self.ha.node_config) {
            return Err(bad(
                "ha.node_config",
                format!("{c:?}"),
                "set node_config (the HA engine runs in this daemon) or node_socket (it runs in `ax-agent ha-node`), not both",
            ));
        }
        if let (Some(e), None) = (&self.ha.events_file, &self.ha.node_config) {
            return Err(bad(
                "ha.events_file",
                format!("{e:?}"),
                "only used with ha.node_config",
            ));
        }
        if self.addresses.hb2 == Some(self.addresses.hb) {
            return Err(bad(
                "addresses.hb2",
                self.addresses.hb.to_string(),
                "must differ from addresses.hb (the second path uses the same ports)",
            ));
        }
        if let Some(f) = &self.fence {
            if f.command.trim().is_empty() {
                return Err(bad(
                    "fence.command",
                    format!("{:?}", f.command),
                    "must not be empty (leave out [fence] to promote on the coordinator's answer alone)",
                ));
            }
            if !(1..=600_000).contains(&f.timeout_ms) {
                return Err(bad(
                    "fence.timeout_ms",
                    f.timeout_ms.to_string(),
                    "must be between 1 and 600000",
                ));
            }
        }
        let p = &self.ports;
        if p.slots == 0 {
            return Err(bad("ports.slots", "0".into(), "must be at least 1"));
        }
        let ranges = [
            ("ports.link", p.link),
            ("ports.heartbeat", p.heartbeat),
            ("ports.output", p.output),
        ];
        for (key, base) in ranges {
            if base == 0 || u32::from(base) + u32::from(p.slots) > 65_536 {
                return Err(bad(
                    key,
                    base.to_string(),
                    &format!("the range {base}..{base}+ports.slots must fit in 1..=65535"),
                ));
            }
        }
        if u32::from(p.colo) + u32::from(p.slots) * u32::from(COLO_PORTS_PER_SLOT) > 65_536 {
            return Err(bad(
                "ports.colo",
                p.colo.to_string(),
                &format!(
                    "the range {0}..{0}+{1}·{COLO_PORTS_PER_SLOT} (COLO relays per slot) must fit in 1..=65535",
                    p.colo, p.slots
                ),
            ));
        }
        let hosts = self.peers.len() as u32 + 1;
        if p.host_heartbeat == 0 || u32::from(p.host_heartbeat) + hosts > 65_536 {
            return Err(bad(
                "ports.host_heartbeat",
                p.host_heartbeat.to_string(),
                &format!(
                    "the range {0}..{0}+{hosts} (one port per host) must fit in 1..=65535",
                    p.host_heartbeat
                ),
            ));
        }
        let hb_range = u32::from(p.host_heartbeat)..u32::from(p.host_heartbeat) + hosts;
        for (key, base) in ranges {
            let r = u32::from(base)..u32::from(base) + u32::from(p.slots);
            if r.start < hb_range.end && hb_range.start < r.end {
                return Err(bad(
                    "ports.host_heartbeat",
                    p.host_heartbeat.to_string(),
                    &format!(
                        "its range (one port per host: {hosts}) overlaps {key} = {base} (which spans ports.slots = {})",
                        p.slots
                    ),
                ));
            }
        }
        if self.witness.is_none() && hb_range.contains(&u32::from(p.local_witness)) {
            return Err(bad(
                "ports.host_heartbeat",
                p.host_heartbeat.to_string(),
                &format!(
                    "its range (one port per host: {hosts}) holds ports.local_witness = {}",
                    p.local_witness
                ),
            ));
        }
        for (i, (ka, a)) in ranges.iter().enumerate() {
            for (kb, b) in &ranges[i + 1..] {
                if a.max(b) - a.min(b) < p.slots {
                    return Err(bad(
                        kb,
                        b.to_string(),
                        &format!(
                            "overlaps {ka} = {a} (each range spans ports.slots = {})",
                            p.slots
                        ),
                    ));
                }
            }
        }
        let mut names = std::collections::BTreeSet::new();
        for (i, peer) in self.peers.iter().enumerate() {
            let key = format!("peers[{i}].name");
            if let Err(e) = crate::certs::check_host_name(&peer.name) {
                return Err(bad(&key, format!("{:?}", peer.name), &e.to_string()));
            }
            if peer.name == self.host {
                return Err(bad(
                    &key,
                    format!("{:?}", peer.name),
                    "is this host's own name",
                ));
            }
            if !names.insert(peer.name.clone()) {
                return Err(bad(&key, format!("{:?}", peer.name), "appears twice"));
            }
            if peer.api.port() == 0 || peer.api.ip().is_unspecified() {
                return Err(bad(
                    &format!("peers[{i}].api"),
                    peer.api.to_string(),
                    "must be a reachable address (not port 0, not 0.0.0.0)",
                ));
            }
        }
        if let Some(o) = &self.openstack {
            if !(o.auth_url.starts_with("http://") || o.auth_url.starts_with("https://")) {
                return Err(bad(
                    "openstack.auth_url",
                    format!("{:?}", o.auth_url),
                    "must be an http:// or https:// URL",
                ));
            }
            if o.username.is_empty() {
                return Err(bad(
                    "openstack.username",
                    "\"\"".into(),
                    "must not be empty",
                ));
            }
            if o.project.is_empty() {
                return Err(bad("openstack.project", "\"\"".into(), "must not be empty"));
            }
            if !o.password_file.is_absolute() {
                return Err(bad(
                    "openstack.password_file",
                    format!("{:?}", o.password_file),
                    "must be an absolute path",
                ));
            }
            for (key, v) in [
                ("openstack.user_domain", &o.user_domain),
                ("openstack.project_domain", &o.project_domain),
            ] {
                if v.trim().is_empty() {
                    return Err(bad(key, format!("{v:?}"), "must not be empty"));
                }
            }
            if let Some(r) = o.region.as_ref().filter(|r| r.trim().is_empty()) {
                return Err(bad(
                    "openstack.region",
                    format!("{r:?}"),
                    "must not be empty (leave it out for any region)",
                ));
            }
            if !(1..=86_400).contains(&o.tag_poll_s) {
                return Err(bad(
                    "openstack.tag_poll_s",
                    o.tag_poll_s.to_string(),
                    "must be between 1 and 86400",
                ));
            }
        }
        if let Some(s) = &self.swift {
            if s.container.is_empty() || s.container.contains('/') {
                return Err(bad(
                    "swift.container",
                    format!("{:?}", s.container),
                    "must be a non-empty name without '/'",
                ));
            }
            if let Some(u) = &s.url {
                if !(u.starts_with("http://") || u.starts_with("https://")) {
                    return Err(bad(
                        "swift.url",
                        format!("{u:?}"),
                        "must be an http:// or https:// URL",
                    ));
                }
            }
            match &s.tempauth_url {
                Some(u) => {
                    if !(u.starts_with("http://") || u.starts_with("https://")) {
                        return Err(bad(
                            "swift.tempauth_url",
                            format!("{u:?}"),
                            "must be an http:// or https:// URL",
                        ));
                    }
                    if s.user.as_deref().is_none_or(|u| !u.contains(':')) {
                        return Err(bad(
                            "swift.user",
                            format!("{:?}", s.user.as_deref().unwrap_or("")),
                            "TempAuth needs `account:user`",
                        ));
                    }
                    if s.key_file.as_deref().is_none_or(|p| !p.is_absolute()) {
                        return Err(bad(
                            "swift.key_file",
                            format!("{:?}", s.key_file.as_deref().unwrap_or(Path::new(""))),
                            "TempAuth needs the absolute path of a file holding the key",
                        ));
                    }
                }
                None if s.enabled && self.openstack.is_none() => {
                    return Err(bad(
                        "swift.enabled",
                        "true".into(),
                        "Swift needs the [openstack] section (Keystone tokens) or swift.tempauth_url",
                    ));
                }
                None => {}
            }
        }
        if self.volume.interval_s == 0 {
            return Err(bad("volume.interval_s", "0".into(), "must be at least 1"));
        }
        if self.volume.keep == 0 {
            return Err(bad(
                "volume.keep",
                "0".into(),
                "must be at least 1 (the newest version is always kept)",
            ));
        }
        if self.volume.concurrency == 0 || self.volume.concurrency > 64 {
            return Err(bad(
                "volume.concurrency",
                self.volume.concurrency.to_string(),
                "must be 1–64",
            ));
        }
        if let Some(d) = &self.sheepdog {
            if d.gateways().is_empty() {
                return Err(bad(
                    "sheepdog.addresses",
                    "[]".into(),
                    "name at least one sheep (address = \"host:7000\" or addresses = [...])",
                ));
            }
        }
        if let (Some(s), Some(d)) = (&self.swift, &self.sheepdog) {
            if s.enabled && d.enabled {
                return Err(bad(
                    "sheepdog.enabled",
                    "true".into(),
                    "only one volume replication target may be enabled (swift.enabled is true)",
                ));
            }
        }
        Ok(())
    }

    /// With `[openstack] nova_tagging = true`: the Keystone password, read from `openstack.password_file`
    /// by the rules of [`read_secret_file`] (a file others can read, a missing or an empty one is refused,
    /// naming the key). `None` when tags are not read. `file` is the configuration file, for messages.
    pub fn nova_tagging_password(&self, file: &str) -> Result<Option<String>, ConfigError> {
        let Some(o) = self.openstack.as_ref().filter(|o| o.nova_tagging) else {
            return Ok(None);
        };
        read_secret_file("password file", &o.password_file, "")
            .map(Some)
            .map_err(|why| ConfigError::Invalid {
                origin: file.to_string(),
                key: "openstack.password_file".into(),
                value: format!("{:?}", o.password_file),
                why: format!("openstack.nova_tagging = true needs the Keystone password: {why}"),
            })
    }

    /// The peer named `name`.
    pub fn peer(&self, name: &str) -> Option<&PeerConfig> {
        self.peers.iter().find(|p| p.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml(text, Path::new("/etc/ax/agent.toml"), &[])
    }

    fn err(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    #[test]
    fn empty_file_gives_single_machine_defaults() {
        let c = parse("").unwrap();
        assert_eq!(c.api.listen, "127.0.0.1:7600".parse().unwrap());
        assert!(c.storage_dir.is_absolute());
        assert!(!c.host.is_empty());
        assert!(c.peers.is_empty() && c.witness.is_none());
    }

    #[test]
    fn sheepdog_takes_one_address_or_a_list_of_gateways() {
        let one = parse("[sheepdog]\naddress = \"127.0.0.1:7000\"").unwrap();
        let gw = |c: &Config| c.sheepdog.as_ref().unwrap().gateways();
        assert_eq!(gw(&one), vec!["127.0.0.1:7000".parse().unwrap()]);
        let many = parse(
            "[sheepdog]\naddresses = [\"127.0.0.1:7000\", \"127.0.0.1:7001\", \"10.0.0.3:7000\"]",
        )
        .unwrap();
        assert_eq!(gw(&many).len(), 3);
        let both = parse(
            "[sheepdog]\naddress = \"127.0.0.1:7001\"\naddresses = [\"127.0.0.1:7000\", \"127.0.0.1:7001\"]",
        )
        .unwrap();
        assert_eq!(
            gw(&both),
            vec![
                "127.0.0.1:7001".parse().unwrap(),
                "127.0.0.1:7000".parse().unwrap()
            ]
        );
    }

    #[test]
    fn default_ports_clash_with_nothing_common() {
        let p = Ports::default();
        // Sheepdog 7000, Cassandra 7000/7001/7199, Spark 7077, Neo4j 7474/7687, Serf/Swarm 7946,
        // memcached 11211, RabbitMQ 15672, Redis 6379/16379, Minecraft 25565, HTTP alternates 8000–8999.
        let common = [
            6379, 7000, 7001, 7077, 7199, 7474, 7687, 7946, 8000, 8080, 8443, 8888, 9000, 9090,
            9200, 11211, 15672, 16379, 25565,
        ];
        for base in [p.link, p.heartbeat, p.output] {
            let range = base..base + p.slots;
            assert!(!common.iter().any(|c| range.contains(c)), "{range:?}");
            assert!(base + p.slots < 32768, "below the ephemeral range");
        }
        assert!(!common.contains(&p.local_witness));
    }

    #[test]
    fn host_heartbeat_ports_follow_the_ranks_of_the_cluster_and_fit_between_the_ranges() {
        let peers = "[[peers]]\nname = \"host-c\"\napi = \"10.0.0.3:7600\"\nlink = \"10.0.0.3\"\nhb = \"10.0.0.3\"\n\
                     [[peers]]\nname = \"host-a\"\napi = \"10.0.0.1:7600\"\nlink = \"10.0.0.1\"\nhb = \"10.0.0.1\"\n";
        let c = parse(&format!("host = \"host-b\"\n{peers}")).unwrap();
        let p = c.ports.host_heartbeat;
        // Ranks: host-a 0, host-b 1, host-c 2. (port heard on here, port the peer hears us on).
        assert_eq!(
            c.host_heartbeat_ports(),
            vec![
                ("host-c".to_string(), (p + 2, p + 1)),
                ("host-a".to_string(), (p, p + 1)),
            ]
        );
        assert!(
            !c.host_recovery(),
            "no [coordinator]: no host-failure recovery"
        );
        let e = parse(&format!(
            "host = \"host-b\"\n[ports]\nhost_heartbeat = 23662\n{peers}"
        ))
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("ports.host_heartbeat") && e.contains("overlaps ports.heartbeat"),
            "{e}"
        );
        let e = parse(&format!(
            "host = \"host-b\"\n[ports]\nhost_heartbeat = 23699\n{peers}"
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("ports.local_witness"), "{e}");
    }

    #[test]
    fn a_port_in_use_at_start_is_an_error_naming_it() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = taken.local_addr().unwrap().port();
        let base = port - 2;
        let away = |d: u16| if base > 40000 { base - d } else { base + d };
        let text = format!(
            "[ports]\nlink = {base}\nheartbeat = {}\noutput = {}\nslots = 4\nlocal_witness = 9\n",
            away(20000),
            away(21000)
        );
        let c = parse(&text).unwrap();
        let e = c.check_ports_free(&[], &[]).unwrap_err();
        assert!(e.starts_with("link: port"), "{e}");
        assert!(
            e.contains(&format!("port {port} (TCP on 127.0.0.1) is in use")),
            "{e}"
        );
        // The slot of an existing VM (its worker may hold the port) is not checked.
        if let Err(e) = c.check_ports_free(&[2], &[]) {
            assert!(!e.contains(&format!("port {port} ")), "{e}");
        }
    }

    #[test]
    fn the_sample_file_is_valid() {
        let text = include_str!("../../systemd/agent.toml");
        let c = parse(text).unwrap();
        assert_eq!(c.host, "host-a");
        assert_eq!(c.peers.len(), 1);
    }

    #[test]
    fn each_bad_key_is_named_with_its_value_and_why() {
        let cases: &[(&str, &[&str])] = &[
            ("hots = \"a\"", &["unknown field", "hots"]),
            ("[api]\nlisten = \"nope\"", &["listen", "nope"]),
            ("host = \"bad name!\"", &["`host`", "bad name!"]),
            ("storage_dir = \"rel/dir\"", &["`storage_dir`", "rel/dir", "absolute"]),
            ("token_file = \"token\"", &["`token_file`", "absolute"]),
            ("pki_dir = \"pki\"", &["`pki_dir`", "absolute"]),
            ("max_ft_vms_per_host = 0", &["`max_ft_vms_per_host`", "at least 1"]),
            ("[epoch]\ninterval_ms = 0", &["`epoch.interval_ms`", "= 0", "between 1 and 1000"]),
            ("[epoch]\ninterval_ms = \"5\"", &["interval_ms", "invalid type"]),
            ("[heartbeat]\ninterval_ms = 20\ntimeout_ms = 30", &["`heartbeat.timeout_ms`", "30", "twice"]),
            ("[heartbeat]\ninterval_ms = 0\ntimeout_ms = 30", &["`heartbeat.interval_ms`"]),
            ("[ports]\nlink = 7000\nheartbeat = 7010\noutput = 7100\nslots = 64\nlocal_witness = 7401", &["`ports.heartbeat`", "overlaps ports.link"]),
            ("[ports]\nlink = 65500\nheartbeat = 7200\noutput = 7100\nslots = 64\nlocal_witness = 7401", &["`ports.link`", "65500"]),
            ("[ports]\nlink = 7000\nheartbeat = 7200\noutput = 7100\nslots = 0\nlocal_witness = 7401", &["`ports.slots`"]),
            ("[ports]\ncolo = 65000", &["`ports.colo`", "65000", "COLO relays"]),
            ("[ha]\nrestart_limit = 1\nrestart_window_s = 0", &["`ha.restart_window_s`"]),
            ("[ha]\nrestart_limit = 1\nrestart_window_s = 60\nnode_config = \"ha.toml\"", &["`ha.node_config`", "absolute"]),
            ("[ha]\nrestart_limit = 1\nrestart_window_s = 60\nnode_config = \"/h.toml\"\nnode_socket = \"/s\"", &["`ha.node_config`", "not both"]),
            ("[ha]\nrestart_limit = 1\nrestart_window_s = 60\nevents_file = \"/e\"", &["`ha.events_file`", "node_config"]),
            ("[fence]\ncommand = \"  \"", &["`fence.command`", "must not be empty"]),
            ("[addresses]\nhb = \"10.0.1.2\"\nhb2 = \"10.0.1.2\"", &["`addresses.hb2`", "must differ"]),
            ("[fence]\ncommand = \"true\"\ntimeout_ms = 0", &["`fence.timeout_ms`", "between 1 and 600000"]),
            ("host = \"a\"\n[[peers]]\nname = \"a\"\napi = \"10.0.0.2:7600\"\nlink = \"10.0.0.2\"\nhb = \"10.0.1.2\"", &["`peers[0].name`", "own name"]),
            ("host = \"a\"\n[[peers]]\nname = \"b\"\napi = \"10.0.0.2:7600\"\nlink = \"10.0.0.2\"\nhb = \"10.0.1.2\"\n[[peers]]\nname = \"b\"\napi = \"10.0.0.3:7600\"\nlink = \"10.0.0.3\"\nhb = \"10.0.1.3\"", &["`peers[1].name`", "twice"]),
            ("[[peers]]\nname = \"b\"\napi = \"0.0.0.0:7600\"\nlink = \"10.0.0.2\"\nhb = \"10.0.1.2\"", &["`peers[0].api`", "0.0.0.0:7600"]),
            ("[[peers]]\nname = \"b\"\napi = \"10.0.0.2:7600\"\nlink = \"10.0.0.2\"", &["missing field", "hb"]),
            ("[[peers]]\nname = \"b\"\napi = \"10.0.0.2:7600\"\nlink = \"10.0.0.2\"\nhb = \"10.0.1.2\"\ncolour = 1", &["unknown field", "colour"]),
            ("[openstack]\nauth_url = \"keystone:5000\"\nusername = \"ax\"\npassword_file = \"/etc/ax/os\"\nproject = \"p\"", &["`openstack.auth_url`", "keystone:5000"]),
            ("[openstack]\nauth_url = \"http://k/v3\"\nusername = \"\"\npassword_file = \"/etc/ax/os\"\nproject = \"p\"", &["`openstack.username`"]),
            ("[openstack]\nauth_url = \"http://k/v3\"\nusername = \"u\"\npassword_file = \"os\"\nproject = \"p\"", &["`openstack.password_file`"]),
            ("[openstack]\nauth_url = \"http://k/v3\"\nusername = \"u\"\npassword_file = \"/etc/ax/os\"\nproject = \"p\"\nnova_tagging = true\ntag_poll_s = 0", &["`openstack.tag_poll_s`", "= 0", "between 1 and 86400"]),
            ("[openstack]\nauth_url = \"http://k/v3\"\nusername = \"u\"\npassword_file = \"/etc/ax/os\"\nproject = \"p\"\nuser_domain = \"\"", &["`openstack.user_domain`", "must not be empty"]),
            ("[openstack]\nauth_url = \"http://k/v3\"\nusername = \"u\"\npassword_file = \"/etc/ax/os\"\nproject = \"p\"\nregion = \" \"", &["`openstack.region`"]),
            ("[openstack]\nnova_tagging = true\ntag_poll_s = 5", &["missing field", "auth_url"]),
            ("[swift]\ncontainer = \"a/b\"", &["`swift.container`", "a/b"]),
            ("[swift]\ncontainer = \"ax\"", &["`swift.enabled`", "[openstack]"]),
            ("[swift]\ncontainer = \"ax\"\ntempauth_url = \"swift:8080\"", &["`swift.tempauth_url`"]),
            ("[swift]\ncontainer = \"ax\"\ntempauth_url = \"http://s/auth/v1.0\"\nuser = \"tester\"", &["`swift.user`", "account:user"]),
            ("[swift]\ncontainer = \"ax\"\ntempauth_url = \"http://s/auth/v1.0\"\nuser = \"t:t\"\nkey_file = \"key\"", &["`swift.key_file`"]),
            ("[volume]\ninterval_s = 0", &["`volume.interval_s`"]),
            ("[volume]\nkeep = 0", &["`volume.keep`"]),
            ("[volume]\nconcurrency = 100", &["`volume.concurrency`", "100"]),
            ("[sheepdog]\naddress = \"nope\"", &["address", "nope"]),
            ("[sheepdog]\naddresses = [\"127.0.0.1:7000\", \"x\"]", &["addresses", "x"]),
            ("[sheepdog]\nenabled = true", &["`sheepdog.addresses`", "at least one"]),
            ("witness = \"10.0.0.1\"", &["witness"]),
        ];
        for (text, needles) in cases {
            let e = err(text);
            assert!(e.starts_with("config /etc/ax/agent.toml"), "{text:?}: {e}");
            for n in *needles {
                assert!(e.contains(n), "{text:?}: {e:?} does not mention {n:?}");
            }
        }
    }

    #[test]
    fn environment_overrides_win_and_are_named_when_bad() {
        let env = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
            pairs
                .iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect()
        };
        let c = Config::from_toml(
            "host = \"a\"",
            Path::new("/x.toml"),
            &env(&[
                ("AX_HOST", "b"),
                ("AX_API_LISTEN", "127.0.0.1:9000"),
                ("AX_STORAGE_DIR", "/tmp/axs"),
                ("AX_WITNESS", "127.0.0.1:7400"),
                ("UNRELATED", "x"),
            ]),
        )
        .unwrap();
        assert_eq!(c.host, "b");
        assert_eq!(c.api.listen.port(), 9000);
        assert_eq!(c.storage_dir, PathBuf::from("/tmp/axs"));
        assert!(c.witness.is_some());
        let e = Config::from_toml("", Path::new("/x.toml"), &env(&[("AX_API_LISTEN", "x")]))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("AX_API_LISTEN") && e.contains("api.listen") && e.contains("\"x\""),
            "{e}"
        );
        let e = Config::from_toml("", Path::new("/x.toml"), &env(&[("AX_STORAGE_DIR", "rel")]))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("environment AX_STORAGE_DIR") && e.contains("absolute"),
            "{e}"
        );
    }

    #[test]
    fn nova_tagging_needs_a_password_file_only_its_owner_reads() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("ax-cfg-pw-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let pw = dir.join("os-password");
        let cfg = |tagging: bool| {
            parse(&format!(
                "[openstack]\nauth_url = \"http://k:5000/v3\"\nusername = \"ax\"\npassword_file = \"{}\"\nproject = \"p\"\nnova_tagging = {tagging}",
                pw.display()
            ))
            .unwrap()
        };
        let file = "/etc/ax/agent.toml";
        // Tags not read: the password is not needed (nor read).
        assert_eq!(cfg(false).nova_tagging_password(file).unwrap(), None);
        let e = cfg(true)
            .nova_tagging_password(file)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`openstack.password_file`")
                && e.contains("nova_tagging")
                && e.contains(file),
            "{e}"
        );
        for (text, mode, want) in [
            ("s3cret\n", 0o644, Err("0644")),
            ("  \n", 0o600, Err("is empty")),
            (" s3cret \n", 0o600, Ok("s3cret")),
            ("s3cret", 0o400, Ok("s3cret")),
        ] {
            std::fs::write(&pw, text).unwrap();
            std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(mode)).unwrap();
            match (cfg(true).nova_tagging_password(file), want) {
                (Ok(got), Ok(w)) => assert_eq!(got.as_deref(), Some(w)),
                (Err(e), Err(w)) => {
                    let e = e.to_string();
                    assert!(
                        e.contains("openstack.password_file") && e.contains(w),
                        "{e}"
                    );
                }
                (got, w) => panic!("{text:?} mode {mode:o}: {got:?}, wanted {w:?}"),
            }
        }
        let ks = cfg(true).openstack.unwrap().keystone_settings("pw".into());
        assert_eq!(
            (ks.project_name.as_str(), ks.user_domain_name.as_str()),
            ("p", "Default")
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_explicit_missing_file_is_an_error() {
        let e = Config::load_with_env(Some(Path::new("/nonexistent/agent.toml")), &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("/nonexistent/agent.toml"), "{e}");
    }

    #[test]
    fn the_coordinator_section_names_etcd_and_its_tls_files() {
        let c = parse("[coordinator]\netcd = [\"https://10.0.0.1:2379\", \"https://10.0.0.2:2379\"]\nca = \"/etc/ax/etcd-ca.pem\"").unwrap();
        let k = c.coordinator.unwrap();
        assert_eq!(k.etcd.len(), 2);
        assert_eq!((k.prefix.as_str(), k.timeout_ms), ("/ax/generation/", 1000));
        assert!(parse("").unwrap().coordinator.is_none());
        for (text, want) in [
            ("[coordinator]\netcd = []", "`coordinator.etcd`"),
            (
                "[coordinator]\netcd = [\"10.0.0.1:2379\"]",
                "http:// or https://",
            ),
            (
                "[coordinator]\netcd = [\"https://e:2379\"]\nca = \"ca.pem\"",
                "`coordinator.ca`",
            ),
            (
                "[coordinator]\netcd = [\"https://e:2379\"]\ncert = \"/c.pem\"",
                "together",
            ),
            (
                "[coordinator]\netcd = [\"https://e:2379\"]\ntimeout_ms = 0",
                "`coordinator.timeout_ms`",
            ),
            (
                "[coordinator]\netcd = [\"https://e:2379\"]\nleases = true",
                "unknown field",
            ),
        ] {
            let e = err(text);
            assert!(e.contains(want), "{text}: {e}");
        }
    }
}
