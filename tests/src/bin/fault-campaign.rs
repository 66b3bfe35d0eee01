//! `fault-campaign`: random faults against an FT VM running on simulated hosts, then a verdict.
//!
//! A lab of network namespaces (host-a, host-b, host-c, witness, and a client host for the observer)
//! runs the coordinator on the witness host — one `ax-agent witness`, or with `--coordinator etcd`
//! three etcd members (every node then gets `--etcd URL` for each) — and three `ax-agent ft-node`s;
//! host-a boots a `counter` VM. The observer reads the VM's output through whichever host serves it,
//! resuming from its offset. Then, `--faults` times, a fault is drawn (seeded, printed for replay):
//! SIGKILL the primary, SIGKILL the secondary, SIGSTOP the primary for a while, cut the primary's
//! heartbeat network or its replication network for a while, degrade the replication stream (delay,
//! jitter, drop, duplicate and corrupt packets through the userspace UDP proxy that stands in front of
//! every host's replication endpoint), SIGKILL the secondary and then its replacement as soon as its
//! initial sync starts, or SIGKILL the witness (restarted at once on its state file; with etcd, one
//! member). Dead or fenced nodes come back as standbys, so a third host always exists for
//! re-protection. With `--guest disk-writer` the VM has a disk and checks every sector it wrote (its
//! batch numbers make the same 1, 2, 3, … stream; a restored disk that disagrees with the guest's view
//! prints `MISMATCH`, which counts as lost).
//!
//! `--gray` adds the gray failures of protocol v2's issue ([`GRAY_KINDS`]; docs/DESIGN.md §3.3):
//! `pause-primary-release` (SIGSTOP of the primary at a random moment for 1–2.5 s, past the detector:
//! the secondary promotes while the old primary is frozen, maybe between a release decision and the
//! release), `cut-witness` (the coordinator's host isolated for 1–3 s), `kill-coordinator` (the witness
//! down 1–3 s; etcd: one member down 1–3 s, or the etcd leader and the primary killed at once),
//! `witness-lost-state` (the witness restarted without its state file and without `--init`; then every
//! member host claims the generation it recorded, as an operator would, since the nodes ask only at a
//! role change), `replay-coordinator` (an old compare-and-set, a stale claimant's claim and a duplicate
//! of the holder's request, sent with the primary's real certificate: `Lost`, `Lost`, the same `Won`,
//! nothing changed) and `partition-pair` (the primary and the secondary blackholed from each other on
//! both networks for 0.3–1 s, both still reaching the coordinator). Checked at the end:
//!
//! - the observer's stream is 1, 2, 3, … — every gap counts as lost lines, every repeat as duplicated;
//! - split brain, from the nodes' release journals: every byte released under a generation lies below
//!   every byte released under a newer one, and no two hosts release overlapping bytes under one
//!   generation ([`judge_journal`]; a paused primary's late release of an acknowledged epoch, below the
//!   newer generation's bytes, is reported as a late release);
//! - what the coordinator answered to the replays and the re-learning claims (a violation fails the
//!   campaign);
//! - the longest interruption of the output around each fault (for faults that take the primary's role
//!   away, that is the failover time the last line reports).
//!
//! The last line is `faults=N lost=L duplicated=D split_brain=B max_failover_ms=M`; the exit code is 0
//! only if nothing was lost, duplicated or split, the coordinator did nothing wrong and the stream never
//! stalled.
//!
//! `--engine qemu` runs the campaign against a COLO pair instead ([`ax_tests::colo_campaign`]:
//! `ax-agent colo-node` on host-a/host-b, the `qudp` guest streaming to the client; kinds
//! `kill-primary`, `kill-secondary`, `cut-replication`, `stop-primary`, `kill-witness`; only
//! `--faults`, `--seed`, `--only` apply), with the same last line.
//!
//! `--only KIND[,KIND…]` injects only those kinds, in turn (to study one, e.g.
//! `cut-primary-replication`, or a sequence, e.g. `witness-lost-state,kill-primary`); the logs and
//! release journals are kept on failure, and also on success with `AX_CAMPAIGN_KEEP=1`.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use ax_agent::certs::{PkiPaths, TlsIdentity};
use ax_agent::coord::{AnyCoordinator, CoordTarget};
use ax_tests::agent;
use ax_tests::colo_campaign;
use ax_tests::faults::{self, FaultError, FaultKind, FaultLog, Injection};
use ax_tests::netns::{HostChild, Lab, LabBuilder};
use ax_tests::proxy::{Faults, ProxyConfig, ProxyError, UdpProxy};
use failover::coordinator::etcd::{EtcdConfig, LocalEtcd};
use failover::coordinator::{CasOutcome, CasRequest, CoordError, Coordinator};
use rand::{RngExt, SeedableRng};

const HOSTS: [&str; 3] = ["host-a", "host-b", "host-c"];

struct Args {
    faults: usize,
    seed: u64,
    guest: String,
    /// Inject only these kinds, in turn (`--only K1,K2,…`).
    only: Vec<String>,
    /// Add the gray-failure kinds ([`GRAY_KINDS`]) to the draw.
    gray: bool,
    /// Where the generations are kept.
    coordinator: Coord,
    /// `native` (ft-nodes) or `qemu` (colo-nodes; [`ax_tests::colo_campaign`]).
    engine: String,
}

/// The coordinator of a campaign (`--coordinator`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Coord {
    /// `ax-agent witness` on the lab's witness host.
    Witness,
    /// Three etcd members on the lab's witness host.
    Etcd,
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

/// The gray failures `--gray` adds to the draw (each may also be chosen with `--only`).
const GRAY_KINDS: [&str; 6] = [
    "pause-primary-release",
    "cut-witness",
    "kill-coordinator",
    "witness-lost-state",
    "replay-coordinator",
    "partition-pair",
];

/// The VM of every node (`ft-node --vm`'s default).
const VM: &str = "vm1";

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        faults: 5,
        seed: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64),
        guest: "counter".into(),
        only: Vec::new(),
        gray: false,
        coordinator: Coord::Witness,
        engine: "native".into(),
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
            for k in text("--only")?.split(',') {
                if !KINDS.contains(&k)
                    && !GRAY_KINDS.contains(&k)
                    && !colo_campaign::KINDS.contains(&k)
                {
                    return Err(format!(
                        "--only {k:?}: expected one of {}, {} (--engine qemu: {})",
                        KINDS.join(", "),
                        GRAY_KINDS.join(", "),
                        colo_campaign::KINDS.join(", ")
                    ));
                }
                a.only.push(k.to_owned());
            }
            continue;
        }
        if arg == "--coordinator" {
            a.coordinator = match text("--coordinator")?.as_str() {
                "witness" => Coord::Witness,
                "etcd" => Coord::Etcd,
                other => return Err(format!("--coordinator {other:?}: expected witness or etcd")),
            };
            continue;
        }
        if arg == "--gray" {
            a.gray = true;
            continue;
        }
        if arg == "--engine" {
            a.engine = text("--engine")?;
            if !["native", "qemu"].contains(&a.engine.as_str()) {
                return Err(format!("--engine {:?}: expected native or qemu", a.engine));
            }
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
                println!("usage: fault-campaign [--engine native|qemu] [--faults N] [--seed S] [--guest counter|disk-writer] [--gray] [--coordinator witness|etcd] [--only KIND[,KIND…]]\n\nRuns N random faults (kill/stop/cut/degrade) against an FT VM on simulated hosts and checks the output stream, split brain and failover times.\n--gray adds the gray failures: {}\n--coordinator etcd keeps the generations in 3 etcd members instead of the witness (no witness-lost-state)\n--only KIND[,KIND…] injects only those faults, in turn: {}, {}", GRAY_KINDS.join(", "), KINDS.join(", "), GRAY_KINDS.join(", "));
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?} (see --help)")),
        }
    }
    if a.engine == "qemu" {
        if let Some(k) = a
            .only
            .iter()
            .find(|k| !colo_campaign::KINDS.contains(&k.as_str()))
        {
            return Err(format!(
                "--engine qemu --only {k:?}: expected one of {}",
                colo_campaign::KINDS.join(", ")
            ));
        }
        if a.gray || a.coordinator == Coord::Etcd || a.guest != "counter" {
            return Err("--engine qemu takes only --faults, --seed and --only".into());
        }
    }
    if a.coordinator == Coord::Etcd && a.only.iter().any(|k| k == "witness-lost-state") {
        return Err("--only witness-lost-state needs --coordinator witness".into());
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
    /// Where the generations are kept.
    mode: Coord,
    /// The etcd members (`--coordinator etcd`).
    etcd: Mutex<Option<LocalEtcd>>,
    /// Every node's coordinator options (`--witness …` or `--etcd …`).
    coord_args: Vec<String>,
    /// What a gray fault found wrong at the coordinator (a replay granted, a register changed).
    violations: Mutex<Vec<String>>,
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

    /// Starts the witness on its state file; `init`: a new cluster (without it, a missing state file
    /// means lost state: the witness re-learns).
    fn start_witness(&self, init: bool) {
        let args = agent::witness_args(
            self.lab,
            &self.dir.join("witness.json"),
            &self.dir.join("pki"),
            init,
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
        // The lab's default is the witness: replaced by this campaign's coordinator.
        if let Some(i) = args.iter().position(|a| a == "--witness") {
            args.drain(i..i + 2);
        }
        args.extend(self.coord_args.iter().cloned());
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

impl Campaign<'_> {
    /// SIGKILLs the witness, waits `down`, and starts it again: on its state file, or, with
    /// `lose_state`, with the file deleted and without `--init` (it re-learns from the hosts' claims).
    fn kill_witness_for(&self, down: Duration, lose_state: bool) -> Result<Injection, FaultError> {
        let start = SystemTime::now();
        let pid = self.witness.lock().unwrap().as_ref().map_or(0, |w| w.id());
        faults::kill(pid)?;
        self.witness.lock().unwrap().take(); // reaps it
        if lose_state {
            let state = self.dir.join("witness.json");
            std::fs::remove_file(&state).map_err(|source| FaultError::File {
                path: state,
                source,
            })?;
        }
        std::thread::sleep(down);
        self.start_witness(false);
        let detail = if lose_state {
            "SIGKILL; state file deleted; restarted without --init"
        } else {
            "SIGKILL; restarted on its state file"
        };
        Ok(Injection::new(
            FaultKind::Kill,
            "witness",
            detail,
            start,
            SystemTime::now(),
        ))
    }

    /// The index of the etcd leader (asked of each member in turn).
    fn etcd_leader(&self) -> Option<usize> {
        let endpoints = self.etcd.lock().unwrap().as_ref()?.endpoints.clone();
        for (i, url) in endpoints.iter().enumerate() {
            let Some(addr) = url
                .strip_prefix("http://")
                .and_then(|a| a.parse::<SocketAddr>().ok())
            else {
                continue;
            };
            let status = self
                .lab
                .in_host("witness", move || etcd_status(addr))
                .ok()
                .flatten();
            if let Some((member, leader)) = status {
                if member == leader {
                    return Some(i);
                }
            }
        }
        None
    }

    /// SIGKILLs etcd member `i` (and, with `with`, that process too, at once), waits `down`, and
    /// starts the member again on its data directory.
    fn kill_etcd_member_for(
        &self,
        i: usize,
        with: Option<u32>,
        down: Duration,
    ) -> Result<Injection, FaultError> {
        let start = SystemTime::now();
        let mut guard = self.etcd.lock().unwrap();
        let etcd = guard.as_mut().ok_or_else(|| {
            FaultError::Coordinator(CoordError::Setup("no etcd in this campaign".into()))
        })?;
        let pid = etcd.pid(i).unwrap_or(0);
        if let Some(p) = with {
            faults::kill(p)?;
        }
        faults::kill(pid)?;
        etcd.kill(i); // reaps it
        drop(guard);
        std::thread::sleep(down);
        let mut guard = self.etcd.lock().unwrap();
        if let Some(etcd) = guard.as_mut() {
            agent::etcd_restart_in_lab(self.lab, "witness", etcd, i)
                .map_err(|e| FaultError::Coordinator(CoordError::Setup(e)))?;
        }
        let detail = match with {
            Some(p) => format!("SIGKILL with pid {p}; restarted after {down:?}"),
            None => format!("SIGKILL; restarted after {down:?}"),
        };
        Ok(Injection::new(
            FaultKind::Kill,
            format!("etcd member m{i} (pid {pid})"),
            detail,
            start,
            SystemTime::now(),
        ))
    }

    /// Runs `f` with a coordinator client holding `host`'s certificate, inside `host`'s namespace
    /// (a current-thread runtime: every socket is the host's).
    fn with_coordinator<T: Send>(
        &self,
        host: &str,
        f: impl FnOnce(&AnyCoordinator, &tokio::runtime::Runtime) -> T + Send,
    ) -> Result<T, FaultError> {
        let target = match self.mode {
            Coord::Witness => CoordTarget::Witness {
                addr: SocketAddr::from((self.ip("witness", "hb"), agent::WITNESS_PORT)),
                name: "witness".into(),
            },
            Coord::Etcd => {
                let endpoints = self
                    .etcd
                    .lock()
                    .unwrap()
                    .as_ref()
                    .map(|e| e.endpoints.clone())
                    .unwrap_or_default();
                CoordTarget::Etcd(EtcdConfig::new(endpoints))
            }
        };
        let pki = PkiPaths::in_dir(&self.dir.join("pki"), host);
        let setup = |what: &str, e: &dyn std::fmt::Display| {
            FaultError::Coordinator(CoordError::Setup(format!("{what}: {e}")))
        };
        self.lab.in_host(host, move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| setup("a runtime", &e))?;
            let identity = TlsIdentity::load(&pki).map_err(|e| setup("TLS identity", &e))?;
            let client = AnyCoordinator::connect(&target, &identity)?;
            Ok(f(&client, &rt))
        })?
    }

    /// Sends the coordinator, with `host`'s real credentials, what a replay or a late duplicate
    /// would carry: an old compare-and-set (`host#1`, expected 0), a claim of the current generation
    /// by a stale claimant (`host#1`, expected current − 1) — both must be answered `Lost` — and an
    /// exact duplicate of the holder's winning request, which must be answered with the same `Won`
    /// (a retry). The register must be unchanged afterwards; anything else is a violation.
    fn replay_coordinator(&self, host: &str) -> Result<Injection, FaultError> {
        let start = SystemTime::now();
        let members: Vec<String> = HOSTS.iter().map(|h| (*h).to_owned()).collect();
        let me = host.to_owned();
        let (answers, violations) = self.with_coordinator(host, move |c, rt| {
            rt.block_on(async {
                let before = c.read(VM).await?.ok_or_else(|| {
                    CoordError::Failed(format!("VM {VM} has no generation at the coordinator"))
                })?;
                let g = before.generation;
                let mut answers = Vec::new();
                let mut violations = Vec::new();
                let stale = format!("{me}#1");
                let mut reqs = vec![
                    (stale.clone(), 0, "an old CAS", false),
                    (stale, g.saturating_sub(1), "a stale claimant of the current generation", false),
                ];
                if failover::coordinator::host_of(&before.holder) == me && before.holder.contains('#') {
                    reqs.push((before.holder.clone(), g - 1, "the holder's own request again", true));
                }
                for (claimant, expected, what, holders) in reqs {
                    let req = CasRequest {
                        vm: VM.into(),
                        claimant: claimant.clone(),
                        expected,
                        members: members.clone(),
                        witness: 0,
                    };
                    let answer = c.cas(&req).await?;
                    answers.push(format!("{what} ({claimant}, expected {expected}): {answer:?}"));
                    let fine = match &answer {
                        CasOutcome::Lost { current, .. } => !holders && *current == g,
                        CasOutcome::Won { generation } => holders && *generation == g,
                        CasOutcome::Relearning { .. } => false,
                    };
                    if !fine {
                        violations.push(format!("replay of {what} ({claimant}, expected {expected}) answered {answer:?} at generation {g}"));
                    }
                }
                let after = c.read(VM).await?;
                if after.as_ref() != Some(&before) {
                    violations.push(format!("the register changed under replays: {before:?} -> {after:?}"));
                }
                Ok::<_, CoordError>((answers, violations))
            })
        })??;
        for a in &answers {
            println!("  replay: {a}");
        }
        for v in &violations {
            println!("  VIOLATION: {v}");
        }
        self.violations.lock().unwrap().extend(violations);
        Ok(Injection::new(
            FaultKind::Coordinator,
            format!("coordinator as {host}"),
            format!("{} replayed requests", answers.len()),
            start,
            SystemTime::now(),
        ))
    }

    /// After the witness lost its state: every member host claims the generation it recorded
    /// (`state-<host>/vm1.generation`), with its own certificate, as an operator would — the nodes
    /// themselves ask only when a role changes, so a standby never would (see docs/DESIGN.md §3.3).
    /// The host that recorded the least claims last, with `expected = 0`: its claim completes the
    /// re-learning (the register starts at the highest recorded generation, which another host
    /// claimed) and, as a compare-and-set, is answered `Lost` and changes nothing.
    fn claim_every_host(&self) -> Result<String, FaultError> {
        let mut recorded: Vec<(u64, &str)> = HOSTS
            .iter()
            .map(|h| {
                let f = self
                    .dir
                    .join(format!("state-{h}"))
                    .join(format!("{VM}.generation"));
                let g = std::fs::read_to_string(&f)
                    .ok()
                    .and_then(|t| t.trim().parse().ok())
                    .unwrap_or(0);
                (g, *h)
            })
            .collect();
        recorded.sort();
        recorded.reverse(); // the least last
        let highest = recorded.first().map_or(0, |r| r.0);
        let members: Vec<String> = HOSTS.iter().map(|h| (*h).to_owned()).collect();
        let mut said = Vec::new();
        for (n, (g, host)) in recorded.iter().enumerate() {
            let last = n + 1 == recorded.len();
            let req = CasRequest {
                vm: VM.into(),
                claimant: format!("{host}#operator"),
                expected: if last { 0 } else { *g },
                members: members.clone(),
                witness: 0,
            };
            // The first answer gives the client the witness's nonce; the second request is the claim.
            let answers = self.with_coordinator(host, |c, rt| {
                rt.block_on(async { Ok::<_, CoordError>((c.cas(&req).await?, c.cas(&req).await?)) })
            })??;
            said.push(format!("{host} claims {} → {:?}", req.expected, answers.1));
            if let CasOutcome::Won { .. } = answers.1 {
                self.violations.lock().unwrap().push(format!(
                    "a claim after the witness's state loss won: {host} expected {}",
                    req.expected
                ));
            }
        }
        let record = self.with_coordinator(HOSTS[0], |c, rt| rt.block_on(c.read(VM)))??;
        if record.as_ref().map(|r| r.generation) != Some(highest) {
            self.violations.lock().unwrap().push(format!(
                "re-learned {record:?}, but the highest generation recorded by a host is {highest}"
            ));
        }
        Ok(format!("{}; re-learned {record:?}", said.join(", ")))
    }
}

/// `(member id, leader id)` from an etcd member's status (its JSON gateway), over a plain TCP
/// connection.
fn etcd_status(addr: SocketAddr) -> Option<(String, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(300)).ok()?;
    s.set_read_timeout(Some(Duration::from_millis(500))).ok()?;
    let body = "{}";
    let req = format!(
        "POST /v3/maintenance/status HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).ok()?;
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    let field = |name: &str| {
        let at = text.find(&format!("\"{name}\":\""))? + name.len() + 4;
        let rest = &text[at..];
        Some(rest[..rest.find('"')?].to_owned())
    };
    Some((field("member_id")?, field("leader")?))
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

/// What the nodes' release journal (`time host generation start end`, byte offsets of the VM's output)
/// says.
#[derive(Debug, Default, PartialEq, Eq)]
struct JournalVerdict {
    /// Releases that break the byte order of generations (an older generation releasing bytes at or
    /// beyond the first byte a newer one released: two hosts released the same bytes, or a
    /// superseded primary released output its successor's history lacks), plus releases of
    /// overlapping bytes by two hosts under one generation.
    splits: u64,
    /// Releases by a host under an older generation after another host had released under a newer
    /// one, each below the newer generation's bytes: a paused or slow primary releasing, late, an
    /// epoch its secondary had acknowledged before promoting (docs/DESIGN.md §3.6 allows it: the
    /// promoted host's history holds the same bytes). Reported, not a split brain.
    late: u64,
}

/// Judges the release journal (see [`JournalVerdict`]).
fn judge_journal(journal: &Path) -> JournalVerdict {
    let text = std::fs::read_to_string(journal).unwrap_or_default();
    let mut recs: Vec<(u128, String, u64, u64, u64)> = text
        .lines()
        .filter_map(|l| {
            // `time host generation start end`; anything else is not a record.
            let f: Vec<&str> = l.split(' ').collect();
            if f.len() != 5 {
                return None;
            }
            Some((
                f[0].parse().ok()?,
                f[1].to_owned(),
                f[2].parse().ok()?,
                f[3].parse().ok()?,
                f[4].parse().ok()?,
            ))
        })
        .collect();
    recs.retain(|r| r.3 < r.4);
    recs.sort();
    let mut v = JournalVerdict::default();
    // The first byte each generation released, and for each generation the byte range of each host.
    let mut first: BTreeMap<u64, u64> = BTreeMap::new();
    let mut ranges: BTreeMap<(u64, &str), (u64, u64)> = BTreeMap::new();
    for (_, host, generation, start, end) in &recs {
        let f = first.entry(*generation).or_insert(*start);
        *f = (*f).min(*start);
        let r = ranges
            .entry((*generation, host.as_str()))
            .or_insert((*start, *end));
        *r = (r.0.min(*start), r.1.max(*end));
    }
    // Byte order of generations: every byte released under g lies below every byte released under
    // a newer generation.
    for (_, _, generation, _, end) in &recs {
        let newer = first
            .range(generation + 1..)
            .map(|(_, s)| *s)
            .min()
            .unwrap_or(u64::MAX);
        if *end > newer {
            v.splits += 1;
        }
    }
    // One generation, two hosts: their bytes must not overlap (the register grants a generation once).
    let keys: Vec<&(u64, &str)> = ranges.keys().collect();
    for (n, a) in keys.iter().enumerate() {
        for b in &keys[n + 1..] {
            let (ra, rb) = (ranges[*a], ranges[*b]);
            if a.0 == b.0 && ra.0 < rb.1 && rb.0 < ra.1 {
                v.splits += 1;
            }
        }
    }
    // Late releases: another host had released under a newer generation before.
    let mut newest = 0u64;
    let mut last_host = "";
    for (_, host, generation, _, _) in &recs {
        if host != last_host && *generation < newest && !last_host.is_empty() {
            v.late += 1;
        }
        newest = newest.max(*generation);
        last_host = host;
    }
    v
}

/// `--engine qemu`: [`colo_campaign::run`]; the exit code.
fn qemu_campaign(args: &Args) -> i32 {
    let agent = match agent_binary() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("fault-campaign: {e}");
            return 2;
        }
    };
    if let Some(why) = tokio::runtime::Runtime::new()
        .expect("tokio runtime")
        .block_on(ax_tests::colo::unavailable())
    {
        println!("SKIPPED: fault-campaign --engine qemu: {why}");
        return 2;
    }
    println!(
        "fault-campaign --engine qemu: {} faults, seed {} (replay with --seed {})",
        args.faults, args.seed, args.seed
    );
    let dir = std::env::temp_dir().join(format!("ax-colo-campaign-{}", std::process::id()));
    let opts = colo_campaign::Options {
        faults: args.faults,
        seed: args.seed,
        only: args.only.clone(),
    };
    let sum = match colo_campaign::run(&agent, &dir, &opts) {
        Ok(s) => s,
        Err(e) => {
            println!(
                "fault-campaign: the COLO pair failed: {e} (logs in {})",
                dir.display()
            );
            return 1;
        }
    };
    if let Some(why) = &sum.stopped {
        println!(
            "fault-campaign: STOPPED after {} of {} faults: {why} (logs in {})",
            sum.faults,
            args.faults,
            dir.display()
        );
    }
    let ok = sum.stopped.is_none() && sum.lost == 0 && sum.duplicated == 0 && sum.split_brain == 0;
    if ok && std::env::var_os("AX_CAMPAIGN_KEEP").is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    println!("{}", sum.line());
    i32::from(!ok)
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
    if args.engine == "qemu" {
        std::process::exit(qemu_campaign(&args));
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
    let (etcd, coord_args) = match args.coordinator {
        Coord::Witness => (
            None,
            vec![
                "--witness".to_owned(),
                format!(
                    "{}:{}",
                    lab.addr("witness", "hb").expect("witness address"),
                    agent::WITNESS_PORT
                ),
            ],
        ),
        Coord::Etcd => {
            let e = agent::etcd_in_lab(&lab, "witness", "hb", 3, &dir.join("etcd")).unwrap_or_else(
                |e| {
                    eprintln!("fault-campaign: etcd: {e}");
                    std::process::exit(2)
                },
            );
            let urls = e
                .endpoints
                .iter()
                .flat_map(|u| ["--etcd".to_owned(), u.clone()])
                .collect();
            println!("  etcd: {}", e.endpoints.join(" "));
            (Some(e), urls)
        }
    };
    let c = Campaign {
        lab: &lab,
        agent,
        dir: dir.clone(),
        nodes: Mutex::new(BTreeMap::new()),
        witness: Mutex::new(None),
        opts,
        proxies,
        mode: args.coordinator,
        etcd: Mutex::new(etcd),
        coord_args,
        violations: Mutex::new(Vec::new()),
    };
    if c.mode == Coord::Witness {
        c.start_witness(true);
    }
    c.start_node("host-b", false);
    c.start_node("host-c", false);
    std::thread::sleep(Duration::from_millis(200));
    c.start_node("host-a", true);

    // The kinds drawn from: without --gray exactly the original eight (same draws for a seed).
    let mut pool: Vec<&str> = KINDS.to_vec();
    if args.gray {
        pool.extend(
            GRAY_KINDS
                .iter()
                .filter(|k| c.mode == Coord::Witness || **k != "witness-lost-state"),
        );
    }
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
            let drawn = pool[rng.random_range(0..pool.len())];
            let kind = match args.only.len() {
                0 => drawn,
                n => args.only[i % n].as_str(),
            };
            let kind = match kind {
                "kill-secondary"
                | "kill-secondary-during-sync"
                | "degrade-replication"
                | "partition-pair"
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
                "pause-primary-release" => {
                    // A stall of the whole primary (its release path included) at a random moment,
                    // longer than the detector's timeout: the secondary promotes while it is frozen;
                    // on waking it must release nothing new (the journal judges).
                    let pause = Duration::from_millis(rng.random_range(1000..2500));
                    std::thread::sleep(Duration::from_millis(rng.random_range(0..40)));
                    faults::stop_for(pid(&primary), pause)
                }
                "cut-witness" => {
                    // Only the coordinator's host: the pair's own paths stay up.
                    let cut = Duration::from_millis(rng.random_range(1000..3000));
                    faults::isolate_for(c.lab, "witness", cut)
                }
                "kill-coordinator" => {
                    let down = Duration::from_millis(rng.random_range(1000..3000));
                    match c.mode {
                        Coord::Witness => c.kill_witness_for(down, false),
                        Coord::Etcd if rng.random_range(0..2) == 0 => {
                            let m = rng.random_range(0..3usize);
                            println!("  etcd member m{m} down for {down:?}");
                            c.kill_etcd_member_for(m, None, down)
                        }
                        Coord::Etcd => {
                            // The leader and the primary at once: the failover's CAS needs a new
                            // etcd leader.
                            let m = c.etcd_leader().unwrap_or(0);
                            println!("  etcd leader m{m} and the primary {primary} killed at once");
                            c.kill_etcd_member_for(m, Some(pid(&primary)), down)
                        }
                    }
                }
                "witness-lost-state" => {
                    let down = Duration::from_millis(rng.random_range(1000..3000));
                    let r = c.kill_witness_for(down, true);
                    // The pair runs on without asking; the witness serves the VM again once every
                    // member host has claimed.
                    std::thread::sleep(Duration::from_millis(rng.random_range(500..1500)));
                    match c.claim_every_host() {
                        Ok(said) => println!("  re-learning: {said}"),
                        Err(e) => println!("  re-learning: the claims failed: {e}"),
                    }
                    r
                }
                "replay-coordinator" => c.replay_coordinator(&primary),
                "partition-pair" => {
                    // The primary and the secondary cannot reach each other on either network (the
                    // secondary's replication path is the proxy in the client host); both still
                    // reach the coordinator.
                    let s = secondary.clone().unwrap_or_default();
                    let hold = Duration::from_millis(rng.random_range(300..1000));
                    let client = c.ip("client", "repl");
                    let routes = [
                        (primary.as_str(), c.ip(&s, "hb")),
                        (primary.as_str(), c.ip(&s, "repl")),
                        (s.as_str(), c.ip(&primary, "hb")),
                        (s.as_str(), c.ip(&primary, "repl")),
                        (s.as_str(), client),
                    ];
                    println!("  {primary} and {s} partitioned for {hold:?}");
                    faults::blackhole_for(c.lab, &routes, hold)
                }
                _ => match c.mode {
                    Coord::Witness => c.kill_witness_for(Duration::ZERO, false),
                    Coord::Etcd => {
                        let m = rng.random_range(0..3usize);
                        c.kill_etcd_member_for(m, None, Duration::ZERO)
                    }
                },
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
    c.etcd.lock().unwrap().take();
    let violations = std::mem::take(&mut *c.violations.lock().unwrap());
    drop(lab);

    let (bytes, _) = seen.into_inner().unwrap();
    let agent::Verdict {
        last: checked,
        lost,
        duplicated,
    } = agent::counter_verdict(&bytes);
    let JournalVerdict {
        splits,
        late: late_releases,
    } = judge_journal(&dir.join("journal"));
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
                    | "cut-witness"
                    | "witness-lost-state"
                    | "replay-coordinator"
                    // The winner's path to the observer is cut as long as the partition lasts.
                    | "partition-pair"
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
    println!(
        "split brains (bytes released under two generations, or out of generation order): {splits}"
    );
    println!(
        "late releases (an older generation's acknowledged epoch released after a newer generation began, below its bytes): {late_releases}"
    );
    if !violations.is_empty() {
        println!("coordinator violations: {}", violations.len());
        for v in &violations {
            println!("  {v}");
        }
    }
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
    let ok = lost == 0
        && duplicated == 0
        && splits == 0
        && stalls == 0
        && unprotected == 0
        && violations.is_empty();
    if ok && std::env::var_os("AX_CAMPAIGN_KEEP").is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    } else {
        eprintln!("logs and release journals kept in {}", dir.display());
    }
    std::process::exit(if ok { 0 } else { 1 });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn judge(lines: &[&str]) -> JournalVerdict {
        let dir = std::env::temp_dir().join(format!("ax-journal-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // One file per call: the tests run in parallel.
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = dir.join(format!("journal-{n}"));
        std::fs::write(&path, lines.join("\n")).unwrap();
        let v = judge_journal(&path);
        let _ = std::fs::remove_file(&path);
        v
    }

    #[test]
    fn a_failover_in_byte_order_is_clean() {
        let v = judge(&["1 host-a 1 0 10", "2 host-a 1 10 20", "5 host-b 2 20 30"]);
        assert_eq!(v, JournalVerdict { splits: 0, late: 0 });
    }

    #[test]
    fn a_late_release_of_an_acknowledged_epoch_is_late_not_split() {
        // host-a paused with 20..25 acknowledged; host-b promoted from 25 and released first.
        let v = judge(&["1 host-a 1 0 20", "5 host-b 2 25 30", "6 host-a 1 20 25"]);
        assert_eq!(v, JournalVerdict { splits: 0, late: 1 });
    }

    #[test]
    fn an_old_generation_releasing_bytes_of_a_newer_one_is_a_split_brain() {
        // Overlap: both released 25..28.
        let v = judge(&["1 host-a 1 0 25", "5 host-b 2 25 30", "6 host-a 1 25 28"]);
        assert_eq!(v.splits, 1);
        // Beyond the newer generation's first byte, even before it released those bytes.
        let v = judge(&["1 host-a 1 0 25", "5 host-a 1 25 40", "6 host-b 2 25 30"]);
        assert_eq!(v.splits, 1);
        // Two hosts under one generation.
        let v = judge(&["1 host-a 1 0 25", "5 host-b 1 20 30"]);
        assert_eq!(v.splits, 1);
    }
}
