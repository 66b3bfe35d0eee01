//! `ax-bench detector [--secs N] [--quiet-secs M] [--kills K]`: the heartbeat failure detector under
//! CPU load, two endpoints in two processes over real UDP on loopback, with the default settings
//! (`failover::heartbeat` 20 ms beats, 100 ms timeout; `failover::rt` defaults: `SCHED_FIFO` 10 and a
//! locked stack when the process may).
//!
//! In one run, side by side:
//! 1. **quiet soak**: two endpoints (`ax-bench detector-endpoint`, this binary) beat at each other for
//!    M seconds; no fault is injected, so every `Dead` or `Restarted` verdict either one reaches is a
//!    false failover (`false_dead`). Each reports the longest silence its detector saw between two
//!    fresh packets and how often its detector woke late (`local_stalls`).
//! 2. **quiet detection time**: K times, a fresh pair runs for a second, one endpoint is SIGKILLed,
//!    and the time from the kill to the other's `Dead` verdict is measured (the verdict's time is
//!    the detector's: last packet + silence, not when the endpoint printed it).
//! 3. the same two under load: `stress-ng --cpu 4` (or, without stress-ng, four `sh` busy loops),
//!    started before and stopped after, soak of N seconds.
//!
//! The result is printed as a table and one JSON line (also `bench/results/detector-<unix time>.json`).
//! `AX_HB_RT=off` in the environment shows the detector without real-time scheduling.

use std::io::{BufRead as _, BufReader, Write as _};
use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use failover::detector::{self, DetectorConfig, PeerEvent};
use failover::heartbeat::{new_incarnation, Heartbeat, HeartbeatConfig, PathConfig};
use failover::rt::Realtime;
use serde::{Deserialize, Serialize};

type BoxError = Box<dyn std::error::Error>;

/// Arguments of the hidden `detector-endpoint` subcommand.
#[derive(clap::Args, Debug)]
pub struct EndpointArgs {
    /// This endpoint's host id.
    #[arg(long)]
    me: String,
    /// The peer's host id.
    #[arg(long)]
    peer: String,
    /// Local heartbeat address.
    #[arg(long)]
    local: SocketAddr,
    /// The peer's heartbeat address.
    #[arg(long)]
    peer_addr: SocketAddr,
    /// Run this long, then print the summary and exit.
    #[arg(long)]
    secs: u64,
}

/// What one endpoint saw.
#[derive(Serialize, Deserialize, Debug, Default, Clone, Copy)]
struct EndpointSummary {
    dead: u64,
    restarted: u64,
    suspect: u64,
    longest_silence_ms: f64,
    local_stalls: u64,
    longest_local_stall_ms: f64,
    fifo: bool,
}

/// One soak phase.
#[derive(Serialize, Debug, Default, Clone, Copy)]
pub struct Soak {
    /// Seconds of soak.
    pub secs: u64,
    /// Dead or Restarted verdicts, both endpoints (no fault was injected).
    pub false_dead: u64,
    /// Suspect verdicts (silence ≥ 50 ms), both endpoints.
    pub suspect: u64,
    /// The longest silence between two fresh packets either detector saw.
    pub max_silence_ms: f64,
    /// Late wake-ups of either detector (not held against the peer).
    pub local_stalls: u64,
    /// The longest of them.
    pub longest_local_stall_ms: f64,
    /// 1-minute load average at the end of the phase.
    pub load_avg_1m: f64,
    /// Both endpoints' heartbeat threads ran SCHED_FIFO.
    pub fifo: bool,
}

/// Detection times after SIGKILL.
#[derive(Serialize, Debug, Default, Clone)]
pub struct Detection {
    /// Kills whose Dead verdict was seen.
    pub runs: usize,
    /// Median kill → Dead.
    pub p50_ms: f64,
    /// Longest kill → Dead.
    pub max_ms: f64,
    /// Shortest kill → Dead.
    pub min_ms: f64,
}

#[derive(Serialize, Debug, Default)]
struct DetectorResult {
    cpus: usize,
    load: String,
    hb_interval_ms: u64,
    hb_timeout_ms: u64,
    realtime_env: String,
    quiet: Soak,
    loaded: Soak,
    detect_quiet: Detection,
    detect_loaded: Detection,
    /// Same as `loaded.false_dead`: the figure of issue 10 (target 0).
    false_dead: u64,
    /// Same as `loaded.max_silence_ms`.
    max_silence_ms: f64,
}

fn unix_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

fn load_avg() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

/// `ax-bench detector-endpoint`: one heartbeat endpoint with a detector, default settings.
pub fn endpoint(a: &EndpointArgs) -> Result<(), BoxError> {
    let fifo = std::thread::scope(|s| {
        s.spawn(|| Realtime::from_env().apply_to_current_thread("probe").fifo)
            .join()
            .unwrap_or(false)
    });
    let cfg = HeartbeatConfig::new(
        a.me.clone(),
        new_incarnation(),
        a.peer.clone(),
        vec![PathConfig {
            local: a.local,
            peer: a.peer_addr,
        }],
    );
    let dcfg = DetectorConfig::from_heartbeat(&cfg);
    let (_hb, obs) = Heartbeat::bind(cfg)?.start()?;
    let mut det = detector::spawn(dcfg, obs)?;
    // Detector instants → wall clock, for the verdict times.
    let (i0, u0) = (tokio::time::Instant::now(), unix_ns());
    let to_unix = |t: tokio::time::Instant| u0 + t.saturating_duration_since(i0).as_nanos();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()?;
    let mut sum = EndpointSummary {
        fifo,
        ..EndpointSummary::default()
    };
    let mut out = std::io::stdout().lock();
    let end = tokio::time::Instant::now() + Duration::from_secs(a.secs);
    rt.block_on(async {
        let mut alive = false;
        loop {
            let e = tokio::select! {
                e = det.events.recv() => e,
                _ = tokio::time::sleep_until(end) => None,
            };
            let Some(e) = e else { break };
            let status = det.status.borrow().clone();
            match e {
                PeerEvent::Alive { .. } if !alive => {
                    alive = true;
                    let _ = writeln!(out, "alive");
                }
                PeerEvent::Dead { silent_for } => {
                    sum.dead += 1;
                    let at = status.last_heard.map_or(0, |t| to_unix(t + silent_for));
                    let _ = writeln!(out, "dead {at} {}", silent_for.as_secs_f64() * 1e3);
                }
                PeerEvent::Restarted { .. } => {
                    sum.restarted += 1;
                    let _ = writeln!(out, "restarted");
                }
                PeerEvent::Suspect { .. } => sum.suspect += 1,
                _ => {}
            }
            let _ = out.flush();
        }
    });
    let s = det.status.borrow().clone();
    sum.longest_silence_ms = s.longest_silence.as_secs_f64() * 1e3;
    sum.local_stalls = s.local_stalls;
    sum.longest_local_stall_ms = s.longest_local_stall.as_secs_f64() * 1e3;
    writeln!(out, "summary {}", serde_json::to_string(&sum)?)?;
    out.flush()?;
    Ok(())
}

/// A pair of endpoint processes; lines of their stdout arrive on `lines` as (endpoint, line).
struct Pair {
    children: [Option<Child>; 2],
    lines: mpsc::Receiver<(usize, String)>,
}

impl Pair {
    fn start(secs: u64) -> Result<Pair, BoxError> {
        let exe = std::env::current_exe()?;
        // Two free loopback ports (bound and released: the endpoints bind them at once).
        let ports: Vec<SocketAddr> = (0..2)
            .map(|_| UdpSocket::bind("127.0.0.1:0").and_then(|s| s.local_addr()))
            .collect::<Result<_, _>>()?;
        let (tx, lines) = mpsc::channel();
        let mut children = [None, None];
        for i in 0..2 {
            let mut c = Command::new(&exe)
                .args([
                    "detector-endpoint",
                    "--me",
                    ["end-a", "end-b"][i],
                    "--peer",
                    ["end-b", "end-a"][i],
                    "--local",
                    &ports[i].to_string(),
                    "--peer-addr",
                    &ports[1 - i].to_string(),
                    "--secs",
                    &secs.to_string(),
                ])
                .stdout(Stdio::piped())
                .stdin(Stdio::null())
                .spawn()?;
            let stdout = c.stdout.take().ok_or("no stdout")?;
            let tx = tx.clone();
            std::thread::spawn(move || {
                for l in BufReader::new(stdout).lines().map_while(Result::ok) {
                    if tx.send((i, l)).is_err() {
                        return;
                    }
                }
            });
            children[i] = Some(c);
        }
        Ok(Pair { children, lines })
    }

    /// Waits for a line matching `f` until `limit`.
    fn wait_line(
        &self,
        limit: Duration,
        mut f: impl FnMut(usize, &str) -> bool,
    ) -> Option<(usize, String)> {
        let end = Instant::now() + limit;
        loop {
            let left = end.checked_duration_since(Instant::now())?;
            match self.lines.recv_timeout(left) {
                Ok((i, l)) if f(i, &l) => return Some((i, l)),
                Ok(_) => {}
                Err(_) => return None,
            }
        }
    }

    fn kill(&mut self, i: usize) {
        if let Some(c) = &mut self.children[i] {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.children[i] = None;
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        self.kill(0);
        self.kill(1);
    }
}

/// CPU hogs: `stress-ng --cpu 4`, or four shell busy loops without it.
pub struct Load {
    children: Vec<Child>,
    /// What runs.
    pub what: String,
}

impl Load {
    /// Starts the hogs.
    pub fn start() -> Result<Load, BoxError> {
        let stress = Command::new("stress-ng")
            .args(["--cpu", "4", "--quiet"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .stdin(Stdio::null())
            .spawn();
        if let Ok(c) = stress {
            return Ok(Load {
                children: vec![c],
                what: "stress-ng --cpu 4".into(),
            });
        }
        let children = (0..4)
            .map(|_| {
                Command::new("sh")
                    .args(["-c", "while :; do :; done"])
                    .stdin(Stdio::null())
                    .spawn()
            })
            .collect::<Result<_, _>>()?;
        Ok(Load {
            children,
            what: "4 × sh busy loop (stress-ng not found)".into(),
        })
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        for c in &mut self.children {
            // stress-ng's workers follow their parent (SIGTERM); the shells die with SIGKILL.
            // SAFETY: kill() on the pid of a child we spawned and have not reaped yet.
            unsafe {
                libc::kill(c.id() as libc::pid_t, libc::SIGTERM);
            }
        }
        std::thread::sleep(Duration::from_millis(300));
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Runs a pair for `secs` without a fault and sums up what both endpoints saw.
pub fn soak(secs: u64) -> Result<Soak, BoxError> {
    let pair = Pair::start(secs)?;
    let mut sums = Vec::new();
    let mut false_lines = 0;
    while sums.len() < 2 {
        let Some((_, l)) = pair.wait_line(Duration::from_secs(secs + 30), |_, l| {
            l.starts_with("summary ") || l.starts_with("dead ") || l == "restarted"
        }) else {
            return Err("an endpoint did not report".into());
        };
        if let Some(j) = l.strip_prefix("summary ") {
            sums.push(serde_json::from_str::<EndpointSummary>(j)?);
        } else {
            false_lines += 1;
            eprintln!("  false verdict: {l}");
        }
    }
    let mut s = Soak {
        secs,
        load_avg_1m: load_avg(),
        fifo: true,
        ..Soak::default()
    };
    for e in &sums {
        s.false_dead += e.dead + e.restarted;
        s.suspect += e.suspect;
        s.max_silence_ms = s.max_silence_ms.max(e.longest_silence_ms);
        s.local_stalls += e.local_stalls;
        s.longest_local_stall_ms = s.longest_local_stall_ms.max(e.longest_local_stall_ms);
        s.fifo &= e.fifo;
    }
    debug_assert!(false_lines <= s.false_dead);
    Ok(s)
}

/// `kills` times: a fresh pair, SIGKILL endpoint a once both are alive, time to b's Dead verdict.
fn detection(kills: usize) -> Result<Detection, BoxError> {
    let mut times = Vec::new();
    for _ in 0..kills {
        let mut pair = Pair::start(30)?;
        let mut alive = [false; 2];
        while !(alive[0] && alive[1]) {
            let (i, _) = pair
                .wait_line(Duration::from_secs(10), |_, l| l == "alive")
                .ok_or("endpoints never saw each other")?;
            alive[i] = true;
        }
        std::thread::sleep(Duration::from_millis(500));
        let killed = unix_ns();
        pair.kill(0);
        let Some((_, l)) = pair.wait_line(Duration::from_secs(5), |i, l| {
            i == 1 && l.starts_with("dead ")
        }) else {
            eprintln!("  no Dead verdict within 5 s of a kill");
            continue;
        };
        let at: u128 = l
            .split_whitespace()
            .nth(1)
            .and_then(|t| t.parse().ok())
            .ok_or("bad dead line")?;
        times.push(at.saturating_sub(killed) as f64 / 1e6);
    }
    times.sort_by(f64::total_cmp);
    Ok(Detection {
        runs: times.len(),
        p50_ms: times.get(times.len() / 2).copied().unwrap_or(0.0),
        max_ms: times.last().copied().unwrap_or(0.0),
        min_ms: times.first().copied().unwrap_or(0.0),
    })
}

fn print_soak(name: &str, s: &Soak) {
    println!(
        "{name:>7}: {:>4} s   false Dead/Restarted {}   Suspect {}   longest silence {:.1} ms   late detector wake-ups {} (longest {:.1} ms)   load {:.1}   SCHED_FIFO {}",
        s.secs,
        s.false_dead,
        s.suspect,
        s.max_silence_ms,
        s.local_stalls,
        s.longest_local_stall_ms,
        s.load_avg_1m,
        s.fifo
    );
}

fn print_detection(name: &str, d: &Detection) {
    println!(
        "{name:>7}: SIGKILL → Dead over {} runs: p50 {:.1} ms   min {:.1}   max {:.1}",
        d.runs, d.p50_ms, d.min_ms, d.max_ms
    );
}

/// Runs the detector benchmark (see the module docs).
pub fn run(secs: u64, quiet_secs: u64, kills: usize, out_dir: &Path) -> Result<(), BoxError> {
    // This thread times the kills: keep it on time under load too (the children reset to normal).
    let _ = Realtime::from_env().apply_to_current_thread("ax-bench");
    let mut r = DetectorResult {
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        hb_interval_ms: HeartbeatConfig::DEFAULT_INTERVAL.as_millis() as u64,
        hb_timeout_ms: HeartbeatConfig::DEFAULT_TIMEOUT.as_millis() as u64,
        realtime_env: format!(
            "AX_HB_RT={} AX_HB_MLOCK={}",
            std::env::var(failover::rt::ENV_RT).unwrap_or_default(),
            std::env::var(failover::rt::ENV_MLOCK).unwrap_or_default()
        ),
        ..DetectorResult::default()
    };
    println!("== heartbeat detector, two processes over loopback UDP, default settings ==");
    println!("quiet soak ({quiet_secs} s)…");
    r.quiet = soak(quiet_secs)?;
    print_soak("quiet", &r.quiet);
    r.detect_quiet = detection(kills)?;
    print_detection("quiet", &r.detect_quiet);
    let load = Load::start()?;
    r.load = load.what.clone();
    println!("load: {} — loaded soak ({secs} s)…", load.what);
    std::thread::sleep(Duration::from_secs(2));
    r.loaded = soak(secs)?;
    print_soak("loaded", &r.loaded);
    r.detect_loaded = detection(kills)?;
    print_detection("loaded", &r.detect_loaded);
    drop(load);
    r.false_dead = r.loaded.false_dead;
    r.max_silence_ms = r.loaded.max_silence_ms;
    crate::emit_result(out_dir, "detector", &r)
}
