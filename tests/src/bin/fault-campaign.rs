//! `fault-campaign`: random faults against an FT VM running on simulated hosts, then a verdict.
//!
//! A lab of network namespaces (host-a, host-b, host-c, witness, and a client host for the observer)
//! runs one `ax-agent witness` and three `ax-agent ft-node`s; host-a boots a `counter` VM. The observer
//! reads the VM's output through whichever host serves it, resuming from its offset. Then, `--faults`
//! times, a fault is drawn (seeded, printed for replay): SIGKILL the primary, SIGKILL the secondary,
//! SIGSTOP the primary for a while, cut the primary's heartbeat network or its replication network for a
//! while, degrade the replication stream (delay, jitter, drop, duplicate and corrupt packets through the
//! userspace UDP proxy that stands in front of every host's replication endpoint), SIGKILL the secondary
//! and then its replacement as soon as its initial sync starts, or SIGKILL the witness (restarted at
//! once on its state file). Dead or fenced nodes come back as standbys, so a third host always exists
//! for re-protection. With `--guest disk-writer` the VM has a disk and checks every sector it wrote
//! (its batch numbers make the same 1, 2, 3, … stream; a restored disk that disagrees with the guest's
//! view prints `MISMATCH`, which counts as lost). Checked at the end:
//!
//! - the observer's stream is 1, 2, 3, … — every gap counts as lost lines, every repeat as duplicated;
//! - no two hosts ever released output in interleaved fashion (from the nodes' release journals);
//! - the longest interruption of the output around each fault (for faults that take the primary's role
//!   away, that is the failover time the last line reports).
//!
//! The last line is `faults=N lost=L duplicated=D split_brain=B max_failover_ms=M`; the exit code is 0
//! only if nothing was lost, duplicated or split and the stream never stalled.
//!
//! `--only KIND` draws every fault of one kind (to study one, e.g. `cut-primary-replication`); the logs
//! and release journals are kept on failure, and also on success with `AX_CAMPAIGN_KEEP=1`.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ax_tests::agent;
use ax_tests::faults::{self, FaultLog};
use ax_tests::netns::{HostChild, Lab, LabBuilder};
use ax_tests::proxy::{Faults, ProxyConfig, ProxyError, UdpProxy};
use rand::{RngExt, SeedableRng};

const HOSTS: [&str; 3] = ["host-a", "host-b", "host-c"];

struct Args {
    faults: usize,
    seed: u64,
    guest: String,
    /// Draw only this kind of fault.
    only: Option<String>,
}

/// The faults a campaign draws from.
const KINDS: [&str; 8] = [
    "kill-primary",
    "kill-secondary",
    "stop-primary",
    "cut-primary-heartbeat",
    "cut-primary-replication",
    "degrade-replication",
    "kill-secondary-during-sync",
    "kill-witness",
];

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        faults: 5,
        seed: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64),
        guest: "counter".into(),
        only: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut text = |name: &str| it.next().ok_or_else(|| format!("{name} needs a value"));
        if arg == "--guest" {
            a.guest = text("--guest")?;
            if !["counter", "disk-writer"].contains(&a.guest.as_str()) {
                return Err(format!(
                    "--guest {:?}: expected counter or disk-writer",
                    a.guest
                ));
            }
            continue;
        }
        if arg == "--only" {
            let k = text("--only")?;
            if !KINDS.contains(&k.as_str()) {
                return Err(format!(
                    "--only {k:?}: expected one of {}",
                    KINDS.join(", ")
                ));
            }
            a.only = Some(k);
            continue;
        }
        let mut value = |name: &str| {
            text(name)?
                .parse::<u64>()
                .map_err(|e| format!("{name}: {e}"))
        };
        match arg.as_str() {
            "--faults" => a.faults = value("--faults")? as usize,
            "--seed" => a.seed = value("--seed")?,
            "-h" | "--help" => {
                println!("usage: fault-campaign [--faults N] [--seed S] [--guest counter|disk-writer] [--only KIND]\n\nRuns N random faults (kill/stop/cut/degrade) against an FT VM on simulated hosts and checks the output stream, split brain and failover times.\n--only KIND draws only that fault: {}", KINDS.join(", "));
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?} (see --help)")),
        }
    }
    Ok(a)
}

/// The `ax-agent` binary: next to this one, or built on the spot.
fn agent_binary() -> Result<PathBuf, String> {
    let me = std::env::current_exe().map_err(|e| e.to_string())?;
    let sibling = me.with_file_name("ax-agent");
    if !sibling.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        eprintln!("fault-campaign: building ax-agent ({})", sibling.display());
        let status = std::process::Command::new(cargo)
            .args(["build", "--release", "-p", "ax-agent", "--bin", "ax-agent"])
            .status()
            .map_err(|e| format!("running cargo: {e}"))?;
        if !status.success() || !sibling.exists() {
            return Err(format!("could not build {}", sibling.display()));
        }
    }
    Ok(sibling)
}

struct Campaign<'a> {
    lab: &'a Lab,
    agent: PathBuf,
    dir: PathBuf,
    nodes: Mutex<BTreeMap<String, HostChild>>,
    witness: Mutex<Option<HostChild>>,
    opts: agent::NodeOptions,
    /// The fault proxy in front of each host's replication endpoint (in the client host).
    proxies: BTreeMap<String, UdpProxy>,
}

impl Campaign<'_> {
    fn ip(&self, host: &str, net: &str) -> Ipv4Addr {
        self.lab.addr(host, net).expect("address")
    }

    fn log_file(&self, name: &str) -> std::fs::File {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("{name}.log")))
            .expect("log file")
    }

    fn start_witness(&self) {
        let args = agent::witness_args(
            self.lab,
            &self.dir.join("witness.json"),
            &self.dir.join("pki"),
            true,
        )
        .expect("witness args");
        let (out, err) = (self.log_file("witness"), self.log_file("witness"));
        let child = self
            .lab
            .spawn_with("witness", &self.agent, |c| {
                c.args(&args).stdout(out).stderr(err);
            })
            .expect("witness");
        *self.witness.lock().unwrap() = Some(child);
    }

    fn start_node(&self, host: &str, boot: bool) {
        let mut args = agent::ft_node_args_with(
            self.lab,
            host,
            &HOSTS,
            &self.dir.join("pki"),
            boot,
            &self.opts,
        )
        .expect("node args");
        args.push("--release-journal".into());
        args.push(self.dir.join("journal").display().to_string());
        let (out, err) = (self.log_file(host), self.log_file(host));
        let child = self
            .lab
            .spawn_with(host, &self.agent, |c| {
                c.args(&args)
                    .env("RUST_LOG", "info")
                    .stdout(out)
                    .stderr(err);
            })
            .expect("node");
        self.nodes.lock().unwrap().insert(host.to_owned(), child);
    }

    /// Restarts, as standbys, the nodes whose process ended (killed, fenced or failed), and says which
    /// and how each ended.
    fn revive(&self) {
        let dead: Vec<(String, String)> = {
            let mut nodes = self.nodes.lock().unwrap();
            let mut dead = Vec::new();
            for (h, c) in nodes.iter_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    dead.push((h.clone(), status.to_string()));
                }
            }
            for (h, _) in &dead {
                nodes.remove(h);
            }
            dead
        };
        for (h, _) in &dead {
            self.start_node(h, false);
        }
        if !dead.is_empty() {
            let how: Vec<String> = dead.iter().map(|(h, s)| format!("{h} ({s})")).collect();
            println!("  restarted as standby: {}", how.join(", "));
        }
    }

    /// Writes every live node's thread stacks (gdb, when installed) to `stacks-<host>.txt` in the work
    /// directory, to see where a stalled node waits.
    fn dump_stacks(&self) {
        for h in HOSTS {
            let Some(pid) = self.pid(h) else { continue };
            let out = std::process::Command::new("gdb")
                .args([
                    "-batch",
                    "-p",
                    &pid.to_string(),
                    "-ex",
                    "thread apply all bt",
                ])
                .output();
            match out {
                Ok(o) => {
                    let path = self.dir.join(format!("stacks-{h}.txt"));
                    let _ = std::fs::write(&path, &o.stdout);
                    println!("  stacks of {h} (pid {pid}) in {}", path.display());
                }
                Err(e) => {
                    println!("  no stacks (gdb: {e})");
                    return;
                }
            }
        }
    }

    /// The last lines of every node's and the witness's log (printed when the stream stalls, so that a
    /// CI log says why).
    fn log_tails(&self, lines: usize) -> String {
        let mut out = String::new();
        for name in HOSTS.iter().chain(&["witness"]) {
            let text =
                std::fs::read_to_string(self.dir.join(format!("{name}.log"))).unwrap_or_default();
            let all: Vec<&str> = text.lines().collect();
            out.push_str(&format!("  --- {name}.log (last {lines} lines) ---\n"));
            for l in &all[all.len().saturating_sub(lines)..] {
                out.push_str(&format!("  {l}\n"));
            }
        }
        out
    }

    /// The lines of `primary`'s log that say it began protecting to a secondary.
    fn protections(&self, primary: &str) -> usize {
        std::fs::read_to_string(self.dir.join(format!("{primary}.log")))
            .unwrap_or_default()
            .matches("protected secondary=")
            .count()
    }

    /// Waits until `primary` logs a protection beyond the first `before`; returns that secondary.
    fn wait_new_protection(&self, primary: &str, before: usize, limit: Duration) -> Option<String> {
        let end = Instant::now() + limit;
        while Instant::now() < end {
            let log = std::fs::read_to_string(self.dir.join(format!("{primary}.log"))).ok()?;
            let found: Vec<String> = log.lines().filter_map(protected_to).collect();
            if found.len() > before {
                return found.last().cloned();
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        None
    }

    /// Waits until the current primary reports its latest protection complete (the secondary holds a
    /// consistent epoch: the VM survives the primary). Returns the time it took, `None` on timeout.
    fn wait_protected(&self, limit: Duration) -> Option<Duration> {
        let t = Instant::now();
        while t.elapsed() < limit {
            // A node fenced after the fault's revive round (a slow restore under load delays the
            // supersession) must come back too, or the primary has nobody to protect to.
            self.revive();
            if let (Some(p), _) = self.roles() {
                let log =
                    std::fs::read_to_string(self.dir.join(format!("{p}.log"))).unwrap_or_default();
                let last = |what: &str| {
                    log.lines()
                        .enumerate()
                        .filter(|(_, l)| l.contains(what))
                        .map(|(i, _)| i)
                        .last()
                };
                // Protected: the latest protection completed, and since then no secondary was lost
                // and no new primary life began (the log spans every process of the host).
                let began = last("protected secondary=")
                    .max(last("secondary lost"))
                    .max(last("primary host="));
                if let (Some(began), Some(done)) = (began, last("protection complete")) {
                    if done > began {
                        return Some(t.elapsed());
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }

    fn pid(&self, host: &str) -> Option<u32> {
        self.nodes.lock().unwrap().get(host).map(|c| c.id())
    }

    /// (primary, secondary) from the journal (latest releaser) and that host's log.
    fn roles(&self) -> (Option<String>, Option<String>) {
        let journal = std::fs::read_to_string(self.dir.join("journal")).unwrap_or_default();
        let primary = journal
            .lines()
            .last()
            .and_then(|l| l.split(' ').nth(1))
            .map(str::to_owned);
        let secondary = primary.as_ref().and_then(|p| {
            let log = std::fs::read_to_string(self.dir.join(format!("{p}.log"))).ok()?;
            log.lines().rev().find_map(protected_to)
        });
        (primary, secondary)
    }
}

/// The secondary named by a node's "protected secondary=NAME" log line.
fn protected_to(line: &str) -> Option<String> {
    let rest = line.split("protected secondary=").nth(1)?;
    rest.split_whitespace().next().map(str::to_owned)
}

fn lines(b: &[u8]) -> usize {
    b.iter().filter(|&&c| c == b'\n').count()
}

/// The observer: follows the stream through whichever host serves it.
fn observe(c: &Campaign<'_>, seen: &Mutex<(Vec<u8>, Vec<Instant>)>, stop: &AtomicBool) {
    while !stop.load(Ordering::Acquire) {
        // The host that released last first: a stopped or superseded host may still accept connections.
        let mut order: Vec<&str> = HOSTS.to_vec();
        if let (Some(p), _) = c.roles() {
            order.sort_by_key(|h| *h != p);
        }
        for host in order {
            let offset = seen.lock().unwrap().0.len() as u64;
            let addr = SocketAddr::from((c.ip(host, "repl"), agent::OUTPUT_PORT));
            let stream = c
                .lab
                .in_host("client", move || {
                    let mut s =
                        TcpStream::connect_timeout(&addr, Duration::from_millis(100)).ok()?;
                    s.write_all(&offset.to_le_bytes()).ok()?;
                    s.set_read_timeout(Some(Duration::from_millis(50))).ok()?;
                    Some(s)
                })
                .ok()
                .flatten();
            let Some(mut s) = stream else { continue };
            let mut buf = [0u8; 4096];
            let mut idle = 0;
            while !stop.load(Ordering::Acquire) && idle < 2 {
                match s.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        idle = 0;
                        let mut g = seen.lock().unwrap();
                        g.0.extend_from_slice(&buf[..n]);
                        let now = Instant::now();
                        let new_lines = lines(&buf[..n]);
                        g.1.extend(std::iter::repeat_n(now, new_lines));
                    }
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) =>
                    {
                        idle += 1; // a silent host may be a stopped or superseded one: try the others
                    }
                    Err(_) => break,
                }
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Interleaved releases by different hosts, from the journal (`time host generation start end`).
fn split_brains(journal: &Path) -> u64 {
    let text = std::fs::read_to_string(journal).unwrap_or_default();
    let mut recs: Vec<(u128, String, u64)> = text
        .lines()
        .filter_map(|l| {
            // `time host generation start end`; anything else is not a record.
            let f: Vec<&str> = l.split(' ').collect();
            if f.len() != 5 {
                return None;
            }
            Some((f[0].parse().ok()?, f[1].to_owned(), f[2].parse().ok()?))
        })
        .collect();
    recs.sort();
    // Each host's releases must form one block per generation: once another host has released, a host
    // releasing again under an older or equal generation than the newest seen is a split brain.
    let mut newest = 0u64;
    let mut last_host = String::new();
    let mut splits = 0;
    for (_, host, generation) in recs {
        if host != last_host && generation <= newest && !last_host.is_empty() {
            splits += 1;
        }
        newest = newest.max(generation);
        last_host = host;
    }
    splits
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("fault-campaign: {e}");
            std::process::exit(2);
        }
    };
    if !ax_tests::require_netns("fault-campaign") {
        std::process::exit(2);
    }
    if !Path::new("/dev/kvm").exists() {
        println!("SKIPPED: fault-campaign needs /dev/kvm");
        std::process::exit(2);
    }
    println!(
        "fault-campaign: {} faults, seed {} (replay with --seed {})",
        args.faults, args.seed, args.seed
    );
    let agent = agent_binary().unwrap_or_else(|e| {
        eprintln!("fault-campaign: {e}");
        std::process::exit(2)
    });
    let dir = std::env::temp_dir().join(format!("ax-campaign-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("work dir");
    let pki = std::process::Command::new(&agent)
        .args(["certs", "--out"])
        .arg(dir.join("pki"))
        .args(HOSTS)
        .arg("witness")
        .status()
        .expect("ax-agent certs");
    assert!(pki.success(), "ax-agent certs failed");
    let lab = LabBuilder::ax()
        .host("client", &["repl"])
        .build()
        .expect("lab");
    // Every replication session goes through a fault proxy in the client host (port 7200 + i for host i),
    // idle until a `degrade-replication` fault.
    let client_ip = lab.addr("client", "repl").expect("client address");
    let mut proxies = BTreeMap::new();
    let mut opts = if args.guest == "disk-writer" {
        agent::NodeOptions::disk_writer(16)
    } else {
        agent::NodeOptions::default()
    };
    for (i, h) in HOSTS.iter().enumerate() {
        let listen = SocketAddr::from((client_ip, 7200 + i as u16));
        let upstream = SocketAddr::from((lab.addr(h, "repl").expect("address"), agent::LINK_PORT));
        let proxy = UdpProxy::start(
            ProxyConfig::new(listen, upstream)
                .seed(args.seed ^ i as u64)
                .netns(lab.netns_path("client").expect("client netns")),
        )
        .expect("replication proxy");
        opts.link_of.insert((*h).to_owned(), listen);
        proxies.insert((*h).to_owned(), proxy);
    }
    let c = Campaign {
        lab: &lab,
        agent,
        dir: dir.clone(),
        nodes: Mutex::new(BTreeMap::new()),
        witness: Mutex::new(None),
        opts,
        proxies,
    };
    c.start_witness();
    c.start_node("host-b", false);
    c.start_node("host-c", false);
    std::thread::sleep(Duration::from_millis(200));
    c.start_node("host-a", true);

    let mut rng = rand::rngs::StdRng::seed_from_u64(args.seed);
    let log = FaultLog::new();
    let seen = Mutex::new((Vec::new(), Vec::new()));
    let stop = AtomicBool::new(false);
    let mut failovers: Vec<(String, Duration)> = Vec::new();
    let mut stalls = 0u32;
    let mut unprotected = 0u32;
    let mut reprotect: Vec<Duration> = Vec::new();
    let mut by_kind: BTreeMap<&str, u32> = BTreeMap::new();
    let wait_progress = |from: usize, more: usize, limit: Duration| -> bool {
        let end = Instant::now() + limit;
        while Instant::now() < end {
            if seen.lock().unwrap().1.len() >= from + more {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    };
    std::thread::scope(|s| {
        s.spawn(|| observe(&c, &seen, &stop));
        if !wait_progress(0, 20, Duration::from_secs(30)) {
            stalls += 1;
        }
        if c.wait_protected(Duration::from_secs(20)).is_none() {
            unprotected += 1;
            println!("  the VM was not protected within 20 s of its boot");
        }
        for i in 0..args.faults {
            let (primary, secondary) = c.roles();
            let Some(primary) = primary else {
                stalls += 1;
                break;
            };
            let drawn = KINDS[rng.random_range(0..KINDS.len())];
            let kind = args.only.as_deref().unwrap_or(drawn);
            let kind = match kind {
                "kill-secondary" | "kill-secondary-during-sync" | "degrade-replication"
                    if secondary.is_none() =>
                {
                    "kill-primary"
                }
                k => k,
            };
            let hold = Duration::from_millis(rng.random_range(300..700));
            let before = seen.lock().unwrap().1.len();
            let t0 = Instant::now();
            let pid = |h: &str| c.pid(h).unwrap_or(0);
            let injected = match kind {
                "kill-primary" => faults::kill(pid(&primary)),
                "kill-secondary" => faults::kill(pid(secondary.as_deref().unwrap_or("host-c"))),
                "stop-primary" => faults::stop_for(pid(&primary), hold),
                "cut-primary-heartbeat" => faults::cut_link_for(c.lab, &primary, "hb", hold),
                "cut-primary-replication" => faults::cut_link_for(c.lab, &primary, "repl", hold),
                "degrade-replication" => {
                    let target = secondary.clone().unwrap_or_default();
                    let bad = Faults::none()
                        .with_delay(Duration::from_millis(rng.random_range(1..20)))
                        .with_jitter(Duration::from_millis(rng.random_range(0..10)))
                        .with_drop(rng.random_range(0.0..0.1))
                        .with_duplicate(rng.random_range(0.0..0.1))
                        .with_corrupt(rng.random_range(0.0..0.05));
                    println!("  proxy in front of {target}: {bad} for {hold:?}");
                    match c.proxies.get(&target) {
                        Some(p) => faults::proxy_faults_for(p, bad, hold),
                        None => Err(faults::FaultError::Proxy(ProxyError::InvalidFaults(
                            format!("no replication proxy in front of {target:?}"),
                        ))),
                    }
                }
                "kill-secondary-during-sync" => {
                    // Kill the secondary; the primary re-protects to the next standby; kill that one as
                    // soon as the primary says it started protecting to it (its initial sync runs).
                    let first = secondary.clone().unwrap_or_default();
                    let before = c.protections(&primary);
                    let r = faults::kill(pid(&first));
                    match c.wait_new_protection(&primary, before, Duration::from_secs(5)) {
                        Some(next) => {
                            println!("  {first} killed; killing {next} during its initial sync");
                            faults::kill(pid(&next))
                        }
                        None => {
                            println!("  {first} killed; no new secondary within 5 s");
                            r
                        }
                    }
                }
                _ => {
                    let w = c.witness.lock().unwrap().as_ref().map_or(0, |w| w.id());
                    let r = faults::kill(w);
                    c.witness.lock().unwrap().take();
                    c.start_witness();
                    r
                }
            };
            match injected {
                Ok(inj) => {
                    log.record(inj);
                }
                Err(e) => eprintln!("fault {i}: {kind} could not be injected: {e}"),
            }
            *by_kind.entry(kind).or_default() += 1;
            println!(
                "fault {}/{}: {kind} (primary {primary}, secondary {secondary:?})",
                i + 1,
                args.faults
            );
            // Progress must resume. The interruption is the longest silence between two lines (or between
            // the fault and the first line after it) in the window of the fault.
            if wait_progress(before, 20, Duration::from_secs(30)) {
                let g = seen.lock().unwrap();
                let arrivals = &g.1[before.saturating_sub(1)..];
                let mut prev = t0;
                let mut gap = Duration::ZERO;
                for &t in arrivals {
                    if t > t0 {
                        gap = gap.max(t.saturating_duration_since(prev));
                        prev = t;
                    }
                }
                failovers.push((kind.to_owned(), gap));
            } else {
                stalls += 1;
                println!("  the output stream stalled after {kind}");
                if stalls == 1 {
                    print!("{}", c.log_tails(12));
                    c.dump_stacks();
                }
            }
            std::thread::sleep(Duration::from_millis(300));
            c.revive();
            // The next fault hits a protected VM (a primary killed before its new secondary holds a
            // consistent epoch takes the only copy with it: that is a double failure, not a test).
            match c.wait_protected(Duration::from_secs(20)) {
                Some(d) => reprotect.push(d),
                None => {
                    unprotected += 1;
                    println!("  not protected again within 20 s");
                    if unprotected == 1 {
                        print!("{}", c.log_tails(12));
                    }
                }
            }
        }
        let so_far = seen.lock().unwrap().1.len();
        if !wait_progress(so_far, 20, Duration::from_secs(30)) {
            stalls += 1;
        }
        stop.store(true, Ordering::Release);
    });
    c.nodes.lock().unwrap().clear();
    c.witness.lock().unwrap().take();
    drop(lab);

    let (bytes, _) = seen.into_inner().unwrap();
    let agent::Verdict {
        last: checked,
        lost,
        duplicated,
    } = agent::counter_verdict(&bytes);
    let splits = split_brains(&dir.join("journal"));
    // Failover time: the longest output interruption caused by a fault that took the primary's role away.
    let max_failover = failovers
        .iter()
        .filter(|(k, _)| {
            !matches!(
                k.as_str(),
                "kill-secondary"
                    | "kill-witness"
                    | "cut-primary-replication"
                    | "degrade-replication"
                    | "kill-secondary-during-sync"
            )
        })
        .map(|(_, d)| d.as_millis())
        .max()
        .unwrap_or(0);
    println!("\n== summary ==");
    println!("faults injected by kind: {by_kind:?}");
    println!("{}", log.summary());
    println!(
        "output lines checked: {checked} (lost {lost}, duplicated {duplicated}), stalls: {stalls}"
    );
    println!("split brains (interleaved releases by different hosts): {splits}");
    let slowest = reprotect.iter().max().map_or(0, Duration::as_millis);
    println!(
        "protected again after every fault: {} of {} (slowest {slowest} ms)",
        reprotect.len(),
        reprotect.len() + unprotected as usize
    );
    println!("longest output interruption per fault:");
    for (k, d) in &failovers {
        println!("  {k}: {} ms", d.as_millis());
    }
    println!(
        "faults={} lost={lost} duplicated={duplicated} split_brain={splits} max_failover_ms={max_failover}",
        args.faults
    );
    let ok = lost == 0 && duplicated == 0 && splits == 0 && stalls == 0 && unprotected == 0;
    if ok && std::env::var_os("AX_CAMPAIGN_KEEP").is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    } else {
        eprintln!("logs and release journals kept in {}", dir.display());
    }
    std::process::exit(if ok { 0 } else { 1 });
}
