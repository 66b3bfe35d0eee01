//! A lab of simulated hosts, each in its own network namespace, wired to per-network bridges that live in
//! a dedicated "switch" namespace.
//!
//! ```text
//!              switch namespace  <id>-switch
//!         ┌──────────────────────────────────────────┐
//!         │  br0 (network "repl")   br1 (network "hb") │
//!         │   │h0-repl │h1-repl      │h0-hb │h1-hb ..  │
//!         └───┼────────┼─────────────┼──────┼─────────┘
//!     veth    │        │             │      │
//!         ┌───┴──┐  ┌──┴───┐      ┌──┴──┐ ┌─┴───┐
//!         │ repl │  │ repl │      │ hb  │ │ hb  │   (interface named after the network)
//!  <id>-host-a  <id>-host-b   ...  (one namespace per host)
//! ```
//!
//! * Every namespace name is `<prefix><pid>-<starttime>-<counter>-<role>` (`role` = host name or
//!   `switch`), so labs of parallel tests (same process: different counter; different processes: different
//!   pid) never collide, and [`cleanup_stale`] can tell the leftovers of a killed run (its pid is dead, or
//!   was reused by a process with another start time) from a live run's namespaces.
//! * Nothing is created in the root namespace: each veth pair is created inside the switch namespace with
//!   its peer placed straight into the host's namespace, so two labs may use the same addresses and
//!   interface names at once.
//! * Host `i` (0-based, in the order hosts were added) gets the address `<subnet base> + 11 + i` on every
//!   network it is attached to: with [`LabBuilder::ax`], `host-a` is `.11`, `host-b` `.12`, `host-c` `.13`
//!   and `witness` `.14`.
//! * [`Lab`]'s `Drop` (also on panic) SIGKILLs every process found in its namespaces and deletes the
//!   namespaces; deleting the switch namespace destroys the bridges and every veth pair.
//!
//! Commands run inside a host either as child processes that `setns(2)` into the namespace between
//! `fork` and `exec` ([`Lab::command`], [`Lab::exec`], [`Lab::spawn`]) or as closures on a scoped thread
//! that has `setns`'d into it ([`Lab::in_host`]); a socket keeps the namespace it was created in, so sockets
//! created by [`Lab::in_host`] can be used from any thread afterwards.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::fs::{self, File};
use std::io;
use std::net::Ipv4Addr;
use std::ops::{Deref, DerefMut};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Prefix of every namespace a [`Lab`] creates unless [`LabBuilder::prefix`] says otherwise.
pub const DEFAULT_PREFIX: &str = "axt-";
/// Where `ip netns` keeps its named namespaces.
pub const NETNS_DIR: &str = "/run/netns";
/// Offset of the last address octet: host `i` gets `subnet base + HOST_OFFSET + i`.
pub const HOST_OFFSET: u32 = 11;

static COUNTER: AtomicU64 = AtomicU64::new(0);
/// Serialises `ip netns add/del` within this process (they mount and unmount under `/run/netns`).
static NETNS_LOCK: Mutex<()> = Mutex::new(());

/// Errors of the lab. Command failures name the command line and carry its stderr.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// A command ran and exited unsuccessfully.
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        /// The command line (and the namespace it ran in, if any).
        command: String,
        /// Its exit status.
        status: String,
        /// Its trimmed standard error.
        stderr: String,
    },
    /// A command could not be started at all.
    #[error("`{command}` could not be started: {source}")]
    Spawn {
        /// The command line.
        command: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Any other I/O failure.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// Why it failed.
        #[source]
        source: io::Error,
    },
    /// No host by that name in this lab.
    #[error("unknown host `{0}`")]
    UnknownHost(String),
    /// No network by that name in this lab.
    #[error("unknown network `{0}`")]
    UnknownNetwork(String),
    /// The host exists but has no link on that network.
    #[error("host `{host}` is not attached to network `{network}`")]
    NotAttached {
        /// The host.
        host: String,
        /// The network.
        network: String,
    },
    /// The builder was given something unusable.
    #[error("invalid lab specification: {0}")]
    InvalidSpec(String),
    /// This machine cannot run a lab (not root, no `ip`, ...).
    #[error("network namespaces unavailable: {0}")]
    Unavailable(String),
    /// Teardown left something behind.
    #[error("teardown failed: {0}")]
    Teardown(String),
}

/// Result type of this module.
pub type Result<T, E = NetnsError> = std::result::Result<T, E>;

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> NetnsError {
    let context = context.into();
    move |source| NetnsError::Io { context, source }
}

/// Runs `cmd` to completion and turns a non-zero exit into [`NetnsError::Command`] naming `what`.
pub(crate) fn run(cmd: &mut Command, what: String) -> Result<Output> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|source| NetnsError::Spawn {
            command: what.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(NetnsError::Command {
            command: what,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(out)
}

fn render(program: &OsStr, args: &[&OsStr]) -> String {
    let mut s = program.to_string_lossy().into_owned();
    for a in args {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs `ip <args>` in the root namespace (use `-n NS` to target a namespace).
fn ip(args: &[&str]) -> Result<Output> {
    let mut c = Command::new("ip");
    c.args(args);
    run(&mut c, format!("ip {}", args.join(" ")))
}

/// Checks that this machine can run a [`Lab`]: effective uid 0 and a working `ip` binary.
pub fn check_available() -> Result<()> {
    // SAFETY: geteuid(2) has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        return Err(NetnsError::Unavailable(format!(
            "needs root to create network namespaces (euid is {euid})"
        )));
    }
    match Command::new("ip").arg("-V").stdin(Stdio::null()).output() {
        Ok(o) if o.status.success() => {}
        Ok(o) => {
            return Err(NetnsError::Unavailable(format!(
                "`ip -V` failed: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            )))
        }
        Err(e) => {
            return Err(NetnsError::Unavailable(format!(
                "the `ip` command (iproute2) is missing: {e}"
            )))
        }
    }
    if !Path::new("/proc/self/ns/net").exists() {
        return Err(NetnsError::Unavailable(
            "kernel without network namespaces (/proc/self/ns/net missing)".into(),
        ));
    }
    // Root is not always enough (a container without CAP_SYS_ADMIN, a read-only /run): create and
    // delete one namespace, once per process.
    static PROBE: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    PROBE
        .get_or_init(|| {
            let pid = std::process::id();
            let start = proc_start_time(pid).ok_or("cannot read this process's start time")?;
            // Named like a lab's namespaces, so cleanup_stale removes it if this process dies now.
            let name = format!("{DEFAULT_PREFIX}{pid}-{start}-probe");
            add_netns(&name).map_err(|e| e.to_string())?;
            let r = ip(&["-n", &name, "link", "add", "probe0", "type", "bridge"]);
            del_netns(&name).map_err(|e| e.to_string())?;
            r.map(|_| ()).map_err(|e| e.to_string())
        })
        .clone()
        .map_err(NetnsError::Unavailable)
}

/// Checks that `tc` (iproute2) is usable, for [`Lab::rate_limit`].
pub fn check_tc_available() -> Result<()> {
    check_available()?;
    match Command::new("tc").arg("-V").stdin(Stdio::null()).output() {
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => Err(NetnsError::Unavailable(format!(
            "`tc -V` failed: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        ))),
        Err(e) => Err(NetnsError::Unavailable(format!(
            "the `tc` command (iproute2) is missing: {e}"
        ))),
    }
}

/// Path of a named namespace (`/run/netns/<name>`).
pub fn netns_path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

/// Moves the **calling thread** into the network namespace at `path` (`setns(2)` with `CLONE_NEWNET`).
///
/// Only this thread changes namespace; sockets it creates from now on belong to that namespace and keep
/// it wherever they are used later. Use it on a dedicated thread (as [`Lab::in_host`] and the proxies
/// do), never on a thread borrowed from a pool.
pub fn enter_netns(path: &Path) -> io::Result<()> {
    let f = File::open(path)?;
    // SAFETY: `f` is an open file descriptor for the whole call; setns(2) only reads it.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A [`Command`] whose child enters the namespace at `path` between `fork` and `exec`.
pub fn netns_command(path: &Path, program: impl AsRef<OsStr>) -> Result<Command> {
    let f = File::open(path).map_err(io_err(format!("open {}", path.display())))?;
    let mut cmd = Command::new(program);
    let hook = move || -> io::Result<()> {
        // SAFETY: `f` is owned by this closure, so the descriptor is open; setns(2) is a plain system
        // call, async-signal-safe, and only changes the (single-threaded) forked child.
        let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    };
    // SAFETY: the hook runs in the forked child before exec and does nothing but one setns(2) call: it
    // allocates nothing, takes no lock and touches no state shared with the parent.
    unsafe {
        cmd.pre_exec(hook);
    }
    Ok(cmd)
}

/// The start time (clock ticks since boot, field 22 of `/proc/<pid>/stat`) of a live process; with the
/// pid it identifies a process even across pid reuse (it is part of every lab's namespace names).
pub fn proc_start_time(pid: u32) -> Option<u64> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Parses `<prefix><pid>-<starttime>-...` into its owner.
fn parse_owner(name: &str, prefix: &str) -> Option<(u32, u64)> {
    let rest = name.strip_prefix(prefix)?;
    let mut it = rest.splitn(3, '-');
    let pid = it.next()?.parse().ok()?;
    let start = it.next()?.parse().ok()?;
    it.next()?;
    Some((pid, start))
}

/// Names of every namespace in `/run/netns`.
pub fn list_netns() -> Result<Vec<String>> {
    let rd = match fs::read_dir(NETNS_DIR) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err(format!("read {NETNS_DIR}"))(e)),
    };
    let mut names = Vec::new();
    for e in rd {
        let e = e.map_err(io_err(format!("read {NETNS_DIR}")))?;
        names.push(e.file_name().to_string_lossy().into_owned());
    }
    names.sort();
    Ok(names)
}

/// Pids of the processes whose (main thread's) network namespace is the one at `path`.
pub fn pids_in_netns(path: &Path) -> Result<Vec<u32>> {
    let target = fs::metadata(path).map_err(io_err(format!("stat {}", path.display())))?;
    let mut pids = Vec::new();
    let rd = fs::read_dir("/proc").map_err(io_err("read /proc"))?;
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        // Zombies and exited processes have no readable namespace link: they are skipped.
        if let Ok(m) = fs::metadata(format!("/proc/{pid}/ns/net")) {
            if m.ino() == target.ino() && m.dev() == target.dev() {
                pids.push(pid);
            }
        }
    }
    Ok(pids)
}

/// SIGKILLs every process in the namespace (never this process) and waits up to 3 s for them to go.
fn kill_netns_processes(name: &str) -> Result<()> {
    let path = netns_path(name);
    let me = std::process::id();
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let pids: Vec<u32> = match pids_in_netns(&path) {
            Ok(p) => p.into_iter().filter(|&p| p != me).collect(),
            Err(NetnsError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                return Ok(())
            }
            Err(e) => return Err(e),
        };
        if pids.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(NetnsError::Teardown(format!(
                "processes {pids:?} still in namespace {name} after SIGKILL"
            )));
        }
        for &pid in &pids {
            tracing::debug!(pid, netns = name, "SIGKILL process left in namespace");
            // SAFETY: kill(2) with a pid read from /proc and a valid signal number; it has no memory
            // effects on this process.
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGKILL);
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn add_netns(name: &str) -> Result<()> {
    let _g = NETNS_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    ip(&["netns", "add", name])?;
    Ok(())
}

fn del_netns(name: &str) -> Result<()> {
    let _g = NETNS_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    match ip(&["netns", "del", name]) {
        Ok(_) => Ok(()),
        // Someone else (a parallel cleanup_stale) removed it first.
        Err(_) if !netns_path(name).exists() => Ok(()),
        Err(e) => Err(e),
    }
}

/// Removes the namespaces named `<prefix><pid>-<starttime>-...` whose owner process is gone (pid dead,
/// or alive with another start time, i.e. reused). Processes still inside them are SIGKILLed first.
/// Returns the names removed. Namespaces of live labs (any process) are never touched.
pub fn cleanup_stale(prefix: &str) -> Result<Vec<String>> {
    if prefix.is_empty() {
        return Err(NetnsError::InvalidSpec(
            "cleanup_stale needs a non-empty prefix".into(),
        ));
    }
    let mut removed = Vec::new();
    let mut first_err = None;
    for name in list_netns()? {
        let Some((pid, start)) = parse_owner(&name, prefix) else {
            continue;
        };
        if proc_start_time(pid) == Some(start) {
            continue;
        }
        tracing::info!(netns = %name, pid, "removing stale namespace");
        let r = kill_netns_processes(&name).and_then(|_| del_netns(&name));
        match r {
            Ok(()) => removed.push(name),
            Err(e) => {
                tracing::warn!(netns = %name, error = %e, "could not remove stale namespace");
                first_err.get_or_insert(e);
            }
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(removed),
    }
}

/// A network (one bridge in the switch namespace).
#[derive(Debug, Clone)]
pub struct NetworkInfo {
    /// Name (also the host-side interface name).
    pub name: String,
    /// Base address of the subnet.
    pub subnet: Ipv4Addr,
    /// Prefix length.
    pub prefix_len: u8,
    /// Bridge device in the switch namespace.
    pub bridge: String,
}

/// One host link: a veth pair between a host and a network's bridge.
#[derive(Debug, Clone)]
pub struct LinkInfo {
    /// Index into [`Lab::networks`].
    pub network: usize,
    /// Interface in the host's namespace (named after the network).
    pub host_if: String,
    /// Bridge port in the switch namespace (`h<host index>-<network>`).
    pub switch_if: String,
    /// The host's address on that network.
    pub addr: Ipv4Addr,
}

/// A simulated host.
#[derive(Debug, Clone)]
pub struct HostInfo {
    /// Name (`host-a`, `witness`, ...).
    pub name: String,
    /// Its namespace's name.
    pub netns: String,
    /// Its links.
    pub links: Vec<LinkInfo>,
}

/// Which end of a host's link to act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The interface inside the host's namespace (what the host's own admin would touch). Setting it down
    /// also removes the host's connected route, so its sends fail at once (`ENETUNREACH`).
    Host,
    /// The bridge port in the switch namespace (a dead switch port / pulled cable). The host keeps its
    /// address and route; its packets vanish silently, like a real partition.
    Switch,
}

/// A `tc tbf` token-bucket rate limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    /// Rate in bits per second.
    pub rate_bits_per_sec: u64,
    /// Bucket size in bytes (must be at least the MTU plus headers, 1600 or more).
    pub burst_bytes: u32,
    /// Longest a packet may wait in the queue before it is dropped.
    pub latency: Duration,
}

impl RateLimit {
    /// `rate_bits_per_sec` with a 32 KiB bucket and 400 ms of queue.
    pub fn bits_per_sec(rate_bits_per_sec: u64) -> Self {
        Self {
            rate_bits_per_sec,
            burst_bytes: 32 * 1024,
            latency: Duration::from_millis(400),
        }
    }
}

#[derive(Debug, Clone)]
struct NetSpec {
    name: String,
    subnet: String,
}

#[derive(Debug, Clone)]
struct HostSpec {
    name: String,
    networks: Vec<String>,
}

/// Describes a [`Lab`] before it is built.
#[derive(Debug, Clone)]
pub struct LabBuilder {
    prefix: String,
    networks: Vec<NetSpec>,
    hosts: Vec<HostSpec>,
}

impl Default for LabBuilder {
    fn default() -> Self {
        Self {
            prefix: DEFAULT_PREFIX.to_string(),
            networks: Vec::new(),
            hosts: Vec::new(),
        }
    }
}

impl LabBuilder {
    /// The ax topology: networks `repl` (10.77.1.0/24, replication) and `hb` (10.77.2.0/24, heartbeat);
    /// `host-a`, `host-b`, `host-c` on both, `witness` on `hb` only.
    pub fn ax() -> Self {
        Self::default()
            .network("repl", "10.77.1.0/24")
            .network("hb", "10.77.2.0/24")
            .host("host-a", &["repl", "hb"])
            .host("host-b", &["repl", "hb"])
            .host("host-c", &["repl", "hb"])
            .host("witness", &["hb"])
    }

    /// Namespace name prefix (default [`DEFAULT_PREFIX`]); `build` also cleans stale namespaces with it.
    pub fn prefix(mut self, prefix: &str) -> Self {
        self.prefix = prefix.to_string();
        self
    }

    /// Adds a network: `name` is 1–11 characters of `[a-z0-9]` and becomes the host-side interface name;
    /// `subnet` is `a.b.c.d/len` with `len` between 8 and 28.
    pub fn network(mut self, name: &str, subnet: &str) -> Self {
        self.networks.push(NetSpec {
            name: name.to_string(),
            subnet: subnet.to_string(),
        });
        self
    }

    /// Adds a host attached to the named networks. `name` is 1–32 characters of `[a-z0-9-]` (not
    /// `switch`).
    pub fn host(mut self, name: &str, networks: &[&str]) -> Self {
        self.hosts.push(HostSpec {
            name: name.to_string(),
            networks: networks.iter().map(|s| s.to_string()).collect(),
        });
        self
    }

    fn validate(&self) -> Result<Vec<NetworkInfo>> {
        let bad = |s: String| Err(NetnsError::InvalidSpec(s));
        if self.prefix.is_empty()
            || self.prefix.contains('/')
            || self.prefix.chars().any(|c| c.is_whitespace())
        {
            return bad(format!("prefix {:?}", self.prefix));
        }
        let mut nets = Vec::new();
        let mut seen = HashSet::new();
        for (i, n) in self.networks.iter().enumerate() {
            let ok = !n.name.is_empty()
                && n.name.len() <= 11
                && n.name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
                && n.name != "lo";
            if !ok {
                return bad(format!(
                    "network name {:?} (1-11 chars of [a-z0-9])",
                    n.name
                ));
            }
            if !seen.insert(n.name.clone()) {
                return bad(format!("network {:?} declared twice", n.name));
            }
            let (addr, len) = n
                .subnet
                .split_once('/')
                .ok_or_else(|| NetnsError::InvalidSpec(format!("subnet {:?}", n.subnet)))?;
            let addr: Ipv4Addr = addr
                .parse()
                .map_err(|_| NetnsError::InvalidSpec(format!("subnet {:?}", n.subnet)))?;
            let len: u8 = len
                .parse()
                .map_err(|_| NetnsError::InvalidSpec(format!("subnet {:?}", n.subnet)))?;
            if !(8..=28).contains(&len) {
                return bad(format!("subnet {:?}: prefix length 8..=28", n.subnet));
            }
            let mask = u32::MAX << (32 - len);
            let base = Ipv4Addr::from(u32::from(addr) & mask);
            let host_bits = 32 - u32::from(len);
            let capacity = (1u64 << host_bits) - 2;
            if (HOST_OFFSET as u64 + self.hosts.len() as u64) >= capacity {
                return bad(format!("subnet {:?} too small for the hosts", n.subnet));
            }
            nets.push(NetworkInfo {
                name: n.name.clone(),
                subnet: base,
                prefix_len: len,
                bridge: format!("br{i}"),
            });
        }
        let mut seen = HashSet::new();
        for h in &self.hosts {
            let ok = !h.name.is_empty()
                && h.name.len() <= 32
                && h.name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                && h.name != "switch";
            if !ok {
                return bad(format!(
                    "host name {:?} (1-32 chars of [a-z0-9-], not `switch`)",
                    h.name
                ));
            }
            if !seen.insert(h.name.clone()) {
                return bad(format!("host {:?} declared twice", h.name));
            }
            let mut hn = HashSet::new();
            for n in &h.networks {
                if !nets.iter().any(|x| &x.name == n) {
                    return Err(NetnsError::UnknownNetwork(n.clone()));
                }
                if !hn.insert(n) {
                    return bad(format!("host {:?} lists network {n:?} twice", h.name));
                }
            }
        }
        if self.hosts.len() > 99 {
            return bad("at most 99 hosts".into());
        }
        Ok(nets)
    }

    /// Creates the namespaces, bridges, veth pairs and addresses. Cleans stale namespaces of this prefix
    /// first (best effort). On error everything created so far is torn down.
    pub fn build(self) -> Result<Lab> {
        let networks = self.validate()?;
        check_available()?;
        match cleanup_stale(&self.prefix) {
            Ok(removed) if !removed.is_empty() => {
                tracing::info!(?removed, "removed stale namespaces")
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "cleanup of stale namespaces failed"),
        }
        let pid = std::process::id();
        let start = proc_start_time(pid).ok_or_else(|| {
            NetnsError::Unavailable("cannot read this process's start time".into())
        })?;
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let id = format!("{}{pid}-{start}-{n}", self.prefix);

        let mut hosts = Vec::new();
        for (hi, h) in self.hosts.iter().enumerate() {
            let mut links = Vec::new();
            for (ni, net) in networks.iter().enumerate() {
                if h.networks.contains(&net.name) {
                    links.push(LinkInfo {
                        network: ni,
                        host_if: net.name.clone(),
                        switch_if: format!("h{hi}-{}", net.name),
                        addr: Ipv4Addr::from(u32::from(net.subnet) + HOST_OFFSET + hi as u32),
                    });
                }
            }
            hosts.push(HostInfo {
                name: h.name.clone(),
                netns: format!("{id}-{}", h.name),
                links,
            });
        }
        let mut lab = Lab {
            switch_ns: format!("{id}-switch"),
            id,
            networks,
            hosts,
            created: Vec::new(),
            torn_down: false,
        };
        lab.create()?;
        tracing::debug!(lab = %lab.id, "lab up");
        Ok(lab)
    }
}

/// A set of simulated hosts in network namespaces. Torn down on drop (also during a panic).
#[derive(Debug)]
pub struct Lab {
    id: String,
    switch_ns: String,
    networks: Vec<NetworkInfo>,
    hosts: Vec<HostInfo>,
    created: Vec<String>,
    torn_down: bool,
}

/// A child process running inside a host's namespace; SIGKILLed and reaped on drop.
#[derive(Debug)]
pub struct HostChild {
    /// `Some` until [`HostChild::into_inner`] takes it.
    child: Option<Child>,
    host: String,
}

impl HostChild {
    /// The host it runs in.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// Hands over the [`Child`] without killing it (the caller then owns its lifetime; the lab's teardown
    /// still kills it if it is in the lab's namespace).
    pub fn into_inner(mut self) -> Child {
        self.child
            .take()
            .expect("HostChild holds its child until consumed")
    }
}

impl Deref for HostChild {
    type Target = Child;
    fn deref(&self) -> &Child {
        self.child
            .as_ref()
            .expect("HostChild holds its child until consumed")
    }
}

impl DerefMut for HostChild {
    fn deref_mut(&mut self) -> &mut Child {
        self.child
            .as_mut()
            .expect("HostChild holds its child until consumed")
    }
}

impl Drop for HostChild {
    fn drop(&mut self) {
        // A child not yet reaped keeps its pid, so this can never hit another process.
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Lab {
    /// A builder with no networks and no hosts.
    pub fn builder() -> LabBuilder {
        LabBuilder::default()
    }

    /// Builds [`LabBuilder::ax`].
    pub fn ax() -> Result<Lab> {
        LabBuilder::ax().build()
    }

    fn create_ns(&mut self, name: &str) -> Result<()> {
        add_netns(name)?;
        self.created.push(name.to_string());
        ip(&["-n", name, "link", "set", "lo", "up"])?;
        Ok(())
    }

    fn create(&mut self) -> Result<()> {
        let sw = self.switch_ns.clone();
        self.create_ns(&sw)?;
        for net in self.networks.clone() {
            ip(&["-n", &sw, "link", "add", &net.bridge, "type", "bridge"])?;
            ip(&["-n", &sw, "link", "set", &net.bridge, "up"])?;
        }
        for host in self.hosts.clone() {
            self.create_ns(&host.netns)?;
            for l in &host.links {
                let net = &self.networks[l.network];
                ip(&[
                    "-n",
                    &sw,
                    "link",
                    "add",
                    &l.switch_if,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    &l.host_if,
                    "netns",
                    &host.netns,
                ])?;
                ip(&[
                    "-n",
                    &sw,
                    "link",
                    "set",
                    &l.switch_if,
                    "master",
                    &net.bridge,
                ])?;
                ip(&["-n", &sw, "link", "set", &l.switch_if, "up"])?;
                let cidr = format!("{}/{}", l.addr, net.prefix_len);
                ip(&["-n", &host.netns, "addr", "add", &cidr, "dev", &l.host_if])?;
                ip(&["-n", &host.netns, "link", "set", &l.host_if, "up"])?;
            }
        }
        Ok(())
    }

    /// The unique id of this lab (`<prefix><pid>-<starttime>-<counter>`), the prefix of all its
    /// namespace names.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The networks.
    pub fn networks(&self) -> &[NetworkInfo] {
        &self.networks
    }

    /// The hosts.
    pub fn hosts(&self) -> &[HostInfo] {
        &self.hosts
    }

    /// The switch namespace's name.
    pub fn switch_netns(&self) -> &str {
        &self.switch_ns
    }

    /// Every namespace this lab created (switch first).
    pub fn namespaces(&self) -> &[String] {
        &self.created
    }

    /// A host by name.
    pub fn host(&self, host: &str) -> Result<&HostInfo> {
        self.hosts
            .iter()
            .find(|h| h.name == host)
            .ok_or_else(|| NetnsError::UnknownHost(host.to_string()))
    }

    fn link(&self, host: &str, network: &str) -> Result<(&HostInfo, &LinkInfo)> {
        let h = self.host(host)?;
        let ni = self
            .networks
            .iter()
            .position(|n| n.name == network)
            .ok_or_else(|| NetnsError::UnknownNetwork(network.to_string()))?;
        let l =
            h.links
                .iter()
                .find(|l| l.network == ni)
                .ok_or_else(|| NetnsError::NotAttached {
                    host: host.to_string(),
                    network: network.to_string(),
                })?;
        Ok((h, l))
    }

    /// The host's address on a network.
    pub fn addr(&self, host: &str, network: &str) -> Result<Ipv4Addr> {
        Ok(self.link(host, network)?.1.addr)
    }

    /// The host's namespace name.
    pub fn netns_name(&self, host: &str) -> Result<&str> {
        Ok(&self.host(host)?.netns)
    }

    /// The host's namespace path (`/run/netns/<name>`), e.g. for [`enter_netns`] or a proxy.
    pub fn netns_path(&self, host: &str) -> Result<PathBuf> {
        Ok(netns_path(self.netns_name(host)?))
    }

    /// A [`Command`] that runs `program` inside the host's namespace.
    pub fn command(&self, host: &str, program: impl AsRef<OsStr>) -> Result<Command> {
        netns_command(&self.netns_path(host)?, program)
    }

    /// Runs `program args...` inside the host's namespace to completion; a non-zero exit is an error that
    /// names the command and carries its stderr.
    pub fn exec<S: AsRef<OsStr>>(
        &self,
        host: &str,
        program: impl AsRef<OsStr>,
        args: &[S],
    ) -> Result<Output> {
        let mut cmd = self.command(host, program.as_ref())?;
        cmd.args(args);
        let argv: Vec<&OsStr> = args.iter().map(|a| a.as_ref()).collect();
        let what = format!(
            "{} (in {host}, netns {})",
            render(program.as_ref(), &argv),
            self.netns_name(host)?
        );
        run(&mut cmd, what)
    }

    /// Spawns `program args...` inside the host's namespace (stdin null, stdout/stderr inherited).
    pub fn spawn<S: AsRef<OsStr>>(
        &self,
        host: &str,
        program: impl AsRef<OsStr>,
        args: &[S],
    ) -> Result<HostChild> {
        self.spawn_with(host, program, |c| {
            c.args(args);
        })
    }

    /// Spawns `program` inside the host's namespace after `configure` set its arguments, stdio,
    /// environment... (stdin defaults to null).
    pub fn spawn_with(
        &self,
        host: &str,
        program: impl AsRef<OsStr>,
        configure: impl FnOnce(&mut Command),
    ) -> Result<HostChild> {
        let mut cmd = self.command(host, program.as_ref())?;
        cmd.stdin(Stdio::null());
        configure(&mut cmd);
        let what = format!(
            "{} (in {host}, netns {})",
            render(cmd.get_program(), &cmd.get_args().collect::<Vec<_>>()),
            self.netns_name(host)?
        );
        let child = cmd.spawn().map_err(|source| NetnsError::Spawn {
            command: what,
            source,
        })?;
        tracing::debug!(host, pid = child.id(), "spawned child in namespace");
        Ok(HostChild {
            child: Some(child),
            host: host.to_string(),
        })
    }

    /// Runs `f` on a fresh thread that has entered the host's namespace and returns its result. Sockets
    /// created by `f` belong to the host's namespace and may be used from any thread afterwards. A panic
    /// in `f` is propagated.
    pub fn in_host<T: Send, F: FnOnce() -> T + Send>(&self, host: &str, f: F) -> Result<T> {
        let path = self.netns_path(host)?;
        std::thread::scope(|s| {
            let h = std::thread::Builder::new()
                .name(format!("netns-{host}"))
                .spawn_scoped(s, move || {
                    enter_netns(&path)?;
                    Ok::<T, io::Error>(f())
                })
                .map_err(io_err("spawn thread"))?;
            match h.join() {
                Ok(r) => r.map_err(io_err(format!("setns into {host}"))),
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }

    /// Sets one end of a host's link on a network down or up (`ip link set <dev> down|up`).
    pub fn set_link(&self, host: &str, network: &str, side: Side, up: bool) -> Result<()> {
        let (h, l) = self.link(host, network)?;
        let (ns, dev) = match side {
            Side::Host => (h.netns.as_str(), l.host_if.as_str()),
            Side::Switch => (self.switch_ns.as_str(), l.switch_if.as_str()),
        };
        ip(&["-n", ns, "link", "set", dev, if up { "up" } else { "down" }])?;
        tracing::debug!(host, network, ?side, up, "link state set");
        Ok(())
    }

    /// Sets the MTU of every link on `network`, both ends (the switch's bridge follows its ports), as
    /// a network run with jumbo frames would be. Fails on an unknown network or an MTU the kernel
    /// refuses (veth takes 68–65535).
    pub fn set_mtu(&self, network: &str, mtu: u32) -> Result<()> {
        let ni = self
            .networks
            .iter()
            .position(|n| n.name == network)
            .ok_or_else(|| NetnsError::UnknownNetwork(network.to_string()))?;
        let mtu_s = mtu.to_string();
        for h in &self.hosts {
            for l in h.links.iter().filter(|l| l.network == ni) {
                ip(&[
                    "-n",
                    &self.switch_ns,
                    "link",
                    "set",
                    &l.switch_if,
                    "mtu",
                    &mtu_s,
                ])?;
                ip(&["-n", &h.netns, "link", "set", &l.host_if, "mtu", &mtu_s])?;
            }
        }
        tracing::debug!(network, mtu, "MTU set");
        Ok(())
    }

    /// Cuts the host's link on a network at the switch port ([`Side::Switch`]): its packets vanish.
    pub fn link_down(&self, host: &str, network: &str) -> Result<()> {
        self.set_link(host, network, Side::Switch, false)
    }

    /// Restores what [`Lab::link_down`] cut.
    pub fn link_up(&self, host: &str, network: &str) -> Result<()> {
        self.set_link(host, network, Side::Switch, true)
    }

    fn tc(&self, ns: &str, args: &[&str]) -> Result<Output> {
        let mut cmd = netns_command(&netns_path(ns), "tc")?;
        cmd.args(args);
        run(&mut cmd, format!("tc {} (in netns {ns})", args.join(" ")))
    }

    fn side_dev(&self, host: &str, network: &str, side: Side) -> Result<(String, String)> {
        let (h, l) = self.link(host, network)?;
        Ok(match side {
            Side::Host => (h.netns.clone(), l.host_if.clone()),
            Side::Switch => (self.switch_ns.clone(), l.switch_if.clone()),
        })
    }

    /// Installs (or replaces) a `tc tbf` rate limit on the egress of one end of a host's link:
    /// [`Side::Host`] shapes what the host sends, [`Side::Switch`] what it receives.
    pub fn rate_limit(&self, host: &str, network: &str, side: Side, rl: RateLimit) -> Result<()> {
        let (ns, dev) = self.side_dev(host, network, side)?;
        let rate = format!("{}bit", rl.rate_bits_per_sec);
        let burst = rl.burst_bytes.to_string();
        let latency = format!("{}us", rl.latency.as_micros());
        self.tc(
            &ns,
            &[
                "qdisc", "replace", "dev", &dev, "root", "tbf", "rate", &rate, "burst", &burst,
                "latency", &latency,
            ],
        )?;
        tracing::debug!(host, network, ?side, ?rl, "rate limit set");
        Ok(())
    }

    /// Removes a rate limit set by [`Lab::rate_limit`]; no-op if none is installed.
    pub fn clear_rate_limit(&self, host: &str, network: &str, side: Side) -> Result<()> {
        let (ns, dev) = self.side_dev(host, network, side)?;
        let out = self.tc(&ns, &["qdisc", "show", "dev", &dev, "root"])?;
        if !String::from_utf8_lossy(&out.stdout).contains("tbf") {
            return Ok(());
        }
        self.tc(&ns, &["qdisc", "del", "dev", &dev, "root"])?;
        Ok(())
    }

    /// The output of `tc qdisc show dev <dev>` for one end of a host's link.
    pub fn qdisc(&self, host: &str, network: &str, side: Side) -> Result<String> {
        let (ns, dev) = self.side_dev(host, network, side)?;
        let out = self.tc(&ns, &["qdisc", "show", "dev", &dev])?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Pids of the processes currently in the host's namespace.
    pub fn pids(&self, host: &str) -> Result<Vec<u32>> {
        pids_in_netns(&self.netns_path(host)?)
    }

    fn teardown_inner(&mut self) -> Result<()> {
        if self.torn_down {
            return Ok(());
        }
        self.torn_down = true;
        let mut errors = Vec::new();
        // Hosts first (reverse creation order), the switch namespace last.
        for name in self.created.iter().rev() {
            if let Err(e) = kill_netns_processes(name) {
                errors.push(e.to_string());
            }
            if let Err(e) = del_netns(name) {
                errors.push(e.to_string());
            }
        }
        self.created.clear();
        if errors.is_empty() {
            tracing::debug!(lab = %self.id, "lab torn down");
            Ok(())
        } else {
            Err(NetnsError::Teardown(errors.join("; ")))
        }
    }

    /// Kills every process in the lab's namespaces and deletes them, reporting any failure (dropping the
    /// lab does the same but can only log).
    pub fn teardown(mut self) -> Result<()> {
        self.teardown_inner()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Err(e) = self.teardown_inner() {
            tracing::error!(lab = %self.id, error = %e, "lab teardown failed");
            eprintln!("ax-tests: lab {} teardown failed: {e}", self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_owner() {
        assert_eq!(
            parse_owner("axt-123-456-7-host-a", "axt-"),
            Some((123, 456))
        );
        assert_eq!(
            parse_owner("axt-123-456-7-switch", "axt-"),
            Some((123, 456))
        );
        assert_eq!(parse_owner("axt-123-456", "axt-"), None);
        assert_eq!(parse_owner("other-123-456-7-x", "axt-"), None);
        assert_eq!(parse_owner("axt-x-456-7-x", "axt-"), None);
    }

    #[test]
    fn own_start_time_is_readable() {
        assert!(proc_start_time(std::process::id()).is_some());
    }

    #[test]
    fn validates_spec() {
        assert!(LabBuilder::ax().validate().is_ok());
        assert!(Lab::builder()
            .network("Bad", "10.0.0.0/24")
            .validate()
            .is_err());
        assert!(Lab::builder()
            .network("averyveryverylongname", "10.0.0.0/24")
            .validate()
            .is_err());
        assert!(Lab::builder()
            .network("a", "10.0.0.0/24")
            .host("x", &["b"])
            .validate()
            .is_err());
        assert!(Lab::builder()
            .network("a", "10.0.0.0/24")
            .host("switch", &["a"])
            .validate()
            .is_err());
        assert!(Lab::builder()
            .network("a", "10.0.0.0/30")
            .validate()
            .is_err());
    }
}
