//! Fault-injection building blocks. Every injection returns an [`Injection`] record (kind, target,
//! detail, start, end) for campaign summaries; a [`FaultLog`] collects them.
//!
//! Faults that last (a stopped process, a cut link, an isolated host) are guards: [`Stopped`],
//! [`LinkCut`], [`Isolation`]. Ending them explicitly returns the record; dropping them (also during a
//! panic) ends the fault anyway, so a failed test never leaves a process stopped or a link down.

use std::fmt;
use std::io;
use std::net::Ipv4Addr;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::netns::{Lab, NetnsError, Side};
use crate::proxy::{Direction, Faults, ProxyError, ProxyHandle};

/// Errors of fault injection.
#[derive(Debug, thiserror::Error)]
pub enum FaultError {
    /// `kill(2)` failed (no such process, permission...).
    #[error("kill({pid}, {signal}) failed: {source}")]
    Signal {
        /// Target pid.
        pid: u32,
        /// Signal name.
        signal: &'static str,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A lab operation failed.
    #[error(transparent)]
    Netns(#[from] NetnsError),
    /// A proxy rejected the settings.
    #[error(transparent)]
    Proxy(#[from] ProxyError),
    /// A coordinator (witness, etcd) could not be reached, restarted or asked.
    #[error("coordinator: {0}")]
    Coordinator(#[from] failover::coordinator::CoordError),
    /// A file of the fault's target (a state file) could not be read or removed.
    #[error("{path}: {source}")]
    File {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// What was injected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    /// SIGKILL of a process.
    Kill,
    /// SIGSTOP ... SIGCONT of a process.
    Stop,
    /// One host link down, then up.
    LinkCut,
    /// Every link of a host down, then up.
    Isolate,
    /// A `tc tbf` rate limit.
    RateLimit,
    /// Fault settings of a userspace proxy (delay, drop, ...).
    Proxy,
    /// Blackhole routes between hosts whose links stay up (a partition of some paths only).
    Partition,
    /// Requests sent to a coordinator by the harness (a replay, late duplicates).
    Coordinator,
}

impl fmt::Display for FaultKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FaultKind::Kill => "kill",
            FaultKind::Stop => "stop",
            FaultKind::LinkCut => "link-cut",
            FaultKind::Isolate => "isolate",
            FaultKind::RateLimit => "rate-limit",
            FaultKind::Proxy => "proxy",
            FaultKind::Partition => "partition",
            FaultKind::Coordinator => "coordinator",
        })
    }
}

/// One injected fault.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Injection {
    /// What.
    pub kind: FaultKind,
    /// On what (`pid 1234`, `host-a/repl`, `host-b`, ...).
    pub target: String,
    /// Free-form parameters (`SIGKILL`, `side=switch`, `drop=0.3 delay=5ms`, ...).
    pub detail: String,
    /// When it began (wall clock).
    #[serde(serialize_with = "ser_time")]
    pub start: SystemTime,
    /// When it ended (equal to `start` for instantaneous faults such as a kill).
    #[serde(serialize_with = "ser_time")]
    pub end: SystemTime,
}

fn ser_time<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    s.serialize_f64(d.as_secs_f64())
}

impl Injection {
    /// A record of a fault injected by other means (e.g. proxy settings applied by hand).
    pub fn new(
        kind: FaultKind,
        target: impl Into<String>,
        detail: impl Into<String>,
        start: SystemTime,
        end: SystemTime,
    ) -> Self {
        Self {
            kind,
            target: target.into(),
            detail: detail.into(),
            start,
            end,
        }
    }

    /// How long the fault lasted.
    pub fn duration(&self) -> Duration {
        self.end.duration_since(self.start).unwrap_or_default()
    }
}

impl fmt::Display for Injection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let start = self
            .start
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64();
        write!(
            f,
            "{} {} [{}] at {start:.3} for {:.3}s",
            self.kind,
            self.target,
            self.detail,
            self.duration().as_secs_f64()
        )
    }
}

/// A thread-safe list of injections, for a campaign's summary.
#[derive(Debug, Default)]
pub struct FaultLog {
    records: Mutex<Vec<Injection>>,
}

impl FaultLog {
    /// An empty log.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends a record and returns it.
    pub fn record(&self, i: Injection) -> Injection {
        tracing::info!(fault = %i, "fault injected");
        self.records
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(i.clone());
        i
    }

    /// A copy of every record so far, in order.
    pub fn records(&self) -> Vec<Injection> {
        self.records
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// One line per record, then a count per kind.
    pub fn summary(&self) -> String {
        let recs = self.records();
        let mut out = String::new();
        for r in &recs {
            out.push_str(&r.to_string());
            out.push('\n');
        }
        let mut counts: Vec<(FaultKind, usize)> = Vec::new();
        for r in &recs {
            match counts.iter_mut().find(|(k, _)| *k == r.kind) {
                Some((_, n)) => *n += 1,
                None => counts.push((r.kind, 1)),
            }
        }
        let parts: Vec<String> = counts.iter().map(|(k, n)| format!("{k}={n}")).collect();
        out.push_str(&format!("{} faults: {}\n", recs.len(), parts.join(" ")));
        out
    }
}

fn signal(pid: u32, sig: libc::c_int, name: &'static str) -> Result<(), FaultError> {
    if pid == 0 || pid > i32::MAX as u32 {
        return Err(FaultError::Signal {
            pid,
            signal: name,
            source: io::Error::from(io::ErrorKind::InvalidInput),
        });
    }
    // SAFETY: kill(2) with a positive pid (never 0 or -1, which would target groups) and a valid signal;
    // it does not touch this process's memory.
    let rc = unsafe { libc::kill(pid as libc::pid_t, sig) };
    if rc != 0 {
        return Err(FaultError::Signal {
            pid,
            signal: name,
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// `kill(pid, SIGKILL)`. If `pid` is your own unreaped child, reap it afterwards (`Child::wait`).
pub fn kill(pid: u32) -> Result<Injection, FaultError> {
    let start = SystemTime::now();
    signal(pid, libc::SIGKILL, "SIGKILL")?;
    Ok(Injection::new(
        FaultKind::Kill,
        format!("pid {pid}"),
        "SIGKILL",
        start,
        SystemTime::now(),
    ))
}

/// A process stopped by [`stop`]; SIGCONT on [`Stopped::resume`] or on drop.
#[derive(Debug)]
#[must_use = "dropping it resumes the process at once"]
pub struct Stopped {
    pid: u32,
    start: SystemTime,
    resumed: bool,
}

impl Stopped {
    /// The stopped pid.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// SIGCONT and the record.
    pub fn resume(mut self) -> Result<Injection, FaultError> {
        self.resumed = true;
        signal(self.pid, libc::SIGCONT, "SIGCONT")?;
        Ok(Injection::new(
            FaultKind::Stop,
            format!("pid {}", self.pid),
            "SIGSTOP..SIGCONT",
            self.start,
            SystemTime::now(),
        ))
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        if !self.resumed {
            if let Err(e) = signal(self.pid, libc::SIGCONT, "SIGCONT") {
                tracing::warn!(pid = self.pid, error = %e, "could not resume stopped process");
            }
        }
    }
}

/// `kill(pid, SIGSTOP)`; the process resumes when the guard is resumed or dropped.
pub fn stop(pid: u32) -> Result<Stopped, FaultError> {
    let start = SystemTime::now();
    signal(pid, libc::SIGSTOP, "SIGSTOP")?;
    Ok(Stopped {
        pid,
        start,
        resumed: false,
    })
}

/// SIGSTOP, sleep `duration` (blocking this thread), SIGCONT.
pub fn stop_for(pid: u32, duration: Duration) -> Result<Injection, FaultError> {
    let s = stop(pid)?;
    std::thread::sleep(duration);
    s.resume()
}

/// SIGSTOP, `tokio::time::sleep(duration)`, SIGCONT. If the future is dropped early the process is
/// resumed then.
pub async fn stop_for_async(pid: u32, duration: Duration) -> Result<Injection, FaultError> {
    let s = stop(pid)?;
    tokio::time::sleep(duration).await;
    s.resume()
}

/// One host link cut by [`cut_link`]; restored on [`LinkCut::restore`] or on drop.
#[derive(Debug)]
#[must_use = "dropping it restores the link at once"]
pub struct LinkCut<'a> {
    lab: &'a Lab,
    host: String,
    network: String,
    side: Side,
    start: SystemTime,
    restored: bool,
}

impl LinkCut<'_> {
    /// Brings the link back up and returns the record.
    pub fn restore(mut self) -> Result<Injection, FaultError> {
        self.restored = true;
        self.lab
            .set_link(&self.host, &self.network, self.side, true)?;
        Ok(Injection::new(
            FaultKind::LinkCut,
            format!("{}/{}", self.host, self.network),
            format!("side={}", side_name(self.side)),
            self.start,
            SystemTime::now(),
        ))
    }
}

impl Drop for LinkCut<'_> {
    fn drop(&mut self) {
        if !self.restored {
            if let Err(e) = self
                .lab
                .set_link(&self.host, &self.network, self.side, true)
            {
                tracing::warn!(host = %self.host, network = %self.network, error = %e, "could not restore link");
            }
        }
    }
}

fn side_name(side: Side) -> &'static str {
    match side {
        Side::Host => "host",
        Side::Switch => "switch",
    }
}

/// Cuts a host's link on a network at the switch port (packets vanish silently); see
/// [`cut_link_side`] to choose the end.
pub fn cut_link<'a>(lab: &'a Lab, host: &str, network: &str) -> Result<LinkCut<'a>, FaultError> {
    cut_link_side(lab, host, network, Side::Switch)
}

/// Cuts one end of a host's link on a network (`ip link set <dev> down`).
pub fn cut_link_side<'a>(
    lab: &'a Lab,
    host: &str,
    network: &str,
    side: Side,
) -> Result<LinkCut<'a>, FaultError> {
    let start = SystemTime::now();
    lab.set_link(host, network, side, false)?;
    Ok(LinkCut {
        lab,
        host: host.to_string(),
        network: network.to_string(),
        side,
        start,
        restored: false,
    })
}

/// Cuts a link for `duration` (blocking this thread), then restores it.
pub fn cut_link_for(
    lab: &Lab,
    host: &str,
    network: &str,
    duration: Duration,
) -> Result<Injection, FaultError> {
    let cut = cut_link(lab, host, network)?;
    std::thread::sleep(duration);
    cut.restore()
}

/// Every link of a host cut by [`isolate`]; restored on [`Isolation::restore`] or on drop.
#[derive(Debug)]
#[must_use = "dropping it reconnects the host at once"]
pub struct Isolation<'a> {
    lab: &'a Lab,
    host: String,
    networks: Vec<String>,
    start: SystemTime,
    restored: bool,
}

impl Isolation<'_> {
    /// Brings every link back up and returns the record.
    pub fn restore(mut self) -> Result<Injection, FaultError> {
        self.restored = true;
        let mut first = None;
        for n in &self.networks {
            if let Err(e) = self.lab.link_up(&self.host, n) {
                first.get_or_insert(e);
            }
        }
        if let Some(e) = first {
            return Err(e.into());
        }
        Ok(Injection::new(
            FaultKind::Isolate,
            self.host.clone(),
            format!("networks={}", self.networks.join(",")),
            self.start,
            SystemTime::now(),
        ))
    }
}

impl Drop for Isolation<'_> {
    fn drop(&mut self) {
        if !self.restored {
            for n in &self.networks {
                if let Err(e) = self.lab.link_up(&self.host, n) {
                    tracing::warn!(host = %self.host, network = %n, error = %e, "could not restore link");
                }
            }
        }
    }
}

/// Cuts every link of a host at the switch ports: it keeps running but can reach nobody.
pub fn isolate<'a>(lab: &'a Lab, host: &str) -> Result<Isolation<'a>, FaultError> {
    let h = lab.host(host)?;
    let networks: Vec<String> = h
        .links
        .iter()
        .map(|l| lab.networks()[l.network].name.clone())
        .collect();
    let start = SystemTime::now();
    let mut iso = Isolation {
        lab,
        host: host.to_string(),
        networks: Vec::new(),
        start,
        restored: false,
    };
    for n in networks {
        lab.link_down(host, &n)?; // on error, `iso` restores what was cut so far
        iso.networks.push(n);
    }
    Ok(iso)
}

/// Isolates a host for `duration` (blocking this thread), then reconnects it.
pub fn isolate_for(lab: &Lab, host: &str, duration: Duration) -> Result<Injection, FaultError> {
    let iso = isolate(lab, host)?;
    std::thread::sleep(duration);
    iso.restore()
}

/// Blackhole routes added by [`blackhole`] (`host` drops what it sends to each address); removed on
/// [`Blackholes::restore`] or on drop.
#[derive(Debug)]
#[must_use = "dropping it removes the routes at once"]
pub struct Blackholes<'a> {
    lab: &'a Lab,
    routes: Vec<(String, Ipv4Addr)>,
    start: SystemTime,
    restored: bool,
}

impl Blackholes<'_> {
    fn remove_all(&mut self) -> Result<(), NetnsError> {
        let mut first = None;
        for (host, addr) in &self.routes {
            let route = format!("{addr}/32");
            if let Err(e) = self
                .lab
                .exec(host, "ip", &["route", "del", "blackhole", &route])
            {
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// Removes every route and returns the record.
    pub fn restore(mut self) -> Result<Injection, FaultError> {
        self.restored = true;
        self.remove_all()?;
        let target: Vec<String> = self
            .routes
            .iter()
            .map(|(h, a)| format!("{h}-x->{a}"))
            .collect();
        Ok(Injection::new(
            FaultKind::Partition,
            target.join(" "),
            "blackhole routes",
            self.start,
            SystemTime::now(),
        ))
    }
}

impl Drop for Blackholes<'_> {
    fn drop(&mut self) {
        if !self.restored {
            if let Err(e) = self.remove_all() {
                tracing::warn!(error = %e, "could not remove a blackhole route");
            }
        }
    }
}

/// For each `(host, addr)`, makes `host` drop everything it sends to `addr` (`ip route add blackhole
/// addr/32` in its namespace): a partition of chosen paths while every link stays up.
pub fn blackhole<'a>(
    lab: &'a Lab,
    routes: &[(&str, Ipv4Addr)],
) -> Result<Blackholes<'a>, FaultError> {
    let mut b = Blackholes {
        lab,
        routes: Vec::new(),
        start: SystemTime::now(),
        restored: false,
    };
    for (host, addr) in routes {
        let route = format!("{addr}/32");
        lab.exec(host, "ip", &["route", "add", "blackhole", &route])?; // on error, `b` removes the rest
        b.routes.push(((*host).to_owned(), *addr));
    }
    Ok(b)
}

/// [`blackhole`] for `duration` (blocking this thread), then the routes are removed.
pub fn blackhole_for(
    lab: &Lab,
    routes: &[(&str, Ipv4Addr)],
    duration: Duration,
) -> Result<Injection, FaultError> {
    let b = blackhole(lab, routes)?;
    std::thread::sleep(duration);
    b.restore()
}

/// Applies a `tc tbf` rate limit for `duration` (blocking this thread), then removes it.
pub fn rate_limit_for(
    lab: &Lab,
    host: &str,
    network: &str,
    side: Side,
    rl: crate::netns::RateLimit,
    duration: Duration,
) -> Result<Injection, FaultError> {
    let start = SystemTime::now();
    lab.rate_limit(host, network, side, rl)?;
    let t = Instant::now();
    std::thread::sleep(duration.saturating_sub(t.elapsed()));
    lab.clear_rate_limit(host, network, side)?;
    Ok(Injection::new(
        FaultKind::RateLimit,
        format!("{host}/{network}"),
        format!(
            "side={} rate={}bit/s burst={}B",
            side_name(side),
            rl.rate_bits_per_sec,
            rl.burst_bytes
        ),
        start,
        SystemTime::now(),
    ))
}

fn set_proxy(proxy: &ProxyHandle, faults: Faults) -> Result<[Faults; 2], FaultError> {
    let before = [
        proxy.faults(Direction::ToUpstream),
        proxy.faults(Direction::ToClient),
    ];
    proxy.set_faults(faults)?;
    Ok(before)
}

fn restore_proxy(proxy: &ProxyHandle, before: [Faults; 2]) -> Result<(), FaultError> {
    proxy.set_faults_dir(Direction::ToUpstream, before[0])?;
    proxy.set_faults_dir(Direction::ToClient, before[1])?;
    Ok(())
}

fn proxy_record(proxy: &ProxyHandle, faults: Faults, start: SystemTime) -> Injection {
    Injection::new(
        FaultKind::Proxy,
        format!("proxy {} -> {}", proxy.local_addr(), proxy.upstream()),
        faults.to_string(),
        start,
        SystemTime::now(),
    )
}

/// Applies `faults` to both directions of a proxy for `duration` (blocking this thread), then puts
/// the previous settings back. Pass a `UdpProxy`/`TcpProxy` by deref (`&proxy`).
pub fn proxy_faults_for(
    proxy: &ProxyHandle,
    faults: Faults,
    duration: Duration,
) -> Result<Injection, FaultError> {
    let start = SystemTime::now();
    let before = set_proxy(proxy, faults)?;
    std::thread::sleep(duration);
    restore_proxy(proxy, before)?;
    Ok(proxy_record(proxy, faults, start))
}

/// Like [`proxy_faults_for`], sleeping with `tokio::time::sleep`.
pub async fn proxy_faults_for_async(
    proxy: &ProxyHandle,
    faults: Faults,
    duration: Duration,
) -> Result<Injection, FaultError> {
    let start = SystemTime::now();
    let before = set_proxy(proxy, faults)?;
    tokio::time::sleep(duration).await;
    restore_proxy(proxy, before)?;
    Ok(proxy_record(proxy, faults, start))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_summary_counts_kinds() {
        let log = FaultLog::new();
        let t = SystemTime::now();
        log.record(Injection::new(FaultKind::Kill, "pid 1", "SIGKILL", t, t));
        log.record(Injection::new(
            FaultKind::Stop,
            "pid 2",
            "",
            t,
            t + Duration::from_millis(5),
        ));
        log.record(Injection::new(FaultKind::Kill, "pid 3", "SIGKILL", t, t));
        let s = log.summary();
        assert!(s.contains("3 faults: kill=2 stop=1"), "{s}");
        assert_eq!(log.records()[1].duration(), Duration::from_millis(5));
    }

    #[test]
    fn refuses_pid_zero() {
        assert!(kill(0).is_err());
    }
}
