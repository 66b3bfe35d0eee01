//! Userspace fault proxies (the kernel here has no `netem`): a UDP proxy and a TCP proxy that forward
//! between a listen address and an upstream address and inject delay (fixed + jitter), drop, duplicate,
//! corrupt and blackhole faults, adjustable at run time, deterministic from a seed.
//!
//! Each proxy runs on its **own OS thread** with a current-thread tokio runtime, so it works the same from
//! synchronous tests and from inside another tokio runtime. With [`ProxyConfig::netns`] that thread first
//! `setns(2)`s into the given network namespace (e.g. [`crate::netns::Lab::netns_path`]); every socket it
//! creates afterwards (listen socket, upstream sockets, accepted and connected streams) then lives in that
//! namespace. [`UdpProxy::start`] / [`TcpProxy::start`] return once the listen socket is bound (port 0
//! allowed: see [`ProxyHandle::local_addr`]); dropping the handle stops the thread and closes every socket.
//!
//! Faults are set per [`Direction`]; each packet (UDP datagram, or TCP `read()` chunk of at most 16 KiB)
//! goes through, in this order: blackhole, drop, corrupt (1–3 distinct random bits flipped), duplicate
//! (one extra copy right behind the original), delay (`delay` + uniform `0..=jitter`).
//!
//! * UDP: each client address gets its own upstream socket (a "session", kept for the proxy's life), so
//!   replies are routed back. Packets are released in deadline order: a fixed delay keeps the order,
//!   jitter may reorder (like `netem`). Blackhole discards everything (counted as `blackholed`).
//! * TCP: each accepted connection gets its own upstream connection; the stream is never reordered
//!   (deadlines are monotonic). Blackhole **stalls** the stream (nothing is read or written until it is
//!   lifted, like a partition that TCP rides out by retransmitting). Drop discards a chunk, duplicate
//!   writes it twice and corrupt flips bits in it: these deliberately break TCP's own guarantees, to test
//!   the framing and integrity checks above it. [`TcpProxy::sever_connections`] closes every connection.
//!
//! Determinism: the random decisions of a direction come from a `StdRng` seeded from the proxy's seed (UDP:
//! one generator per direction; TCP: one per connection and direction, seeded from the connection's
//! sequence number), so the same packet sequence meets the same faults on every run.

mod tcp;
mod udp;

pub use tcp::TcpProxy;
pub use udp::UdpProxy;

use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde::Serialize;
use tokio::sync::{oneshot, watch};

/// Errors of the proxies.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// A probability outside `[0, 1]` (or NaN).
    #[error("invalid fault settings: {0}")]
    InvalidFaults(String),
    /// The listen socket could not be bound.
    #[error("bind {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The proxy thread could not enter the namespace.
    #[error("setns into {path}: {source}")]
    Netns {
        /// The namespace path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Thread or runtime creation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: &'static str,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The proxy thread died before reporting its address.
    #[error("proxy thread exited before it was ready")]
    NotReady,
}

/// Which way traffic flows through a proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// From clients (who talk to the listen address) to the upstream.
    ToUpstream,
    /// From the upstream back to the clients.
    ToClient,
}

impl Direction {
    fn index(self) -> usize {
        match self {
            Direction::ToUpstream => 0,
            Direction::ToClient => 1,
        }
    }
}

/// Fault settings of one direction. The default injects nothing.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize)]
pub struct Faults {
    /// Fixed delay added to every packet.
    pub delay: Duration,
    /// Extra delay, uniform in `0..=jitter`, per packet.
    pub jitter: Duration,
    /// Probability that a packet is discarded.
    pub drop: f64,
    /// Probability that a packet is sent twice.
    pub duplicate: f64,
    /// Probability that 1–3 random bits of a packet are flipped.
    pub corrupt: f64,
    /// Discard everything (UDP) / stall the stream (TCP).
    pub blackhole: bool,
}

impl Faults {
    /// No faults.
    pub fn none() -> Self {
        Self::default()
    }

    /// With a fixed delay.
    pub fn with_delay(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }

    /// With jitter.
    pub fn with_jitter(mut self, jitter: Duration) -> Self {
        self.jitter = jitter;
        self
    }

    /// With a drop probability.
    pub fn with_drop(mut self, p: f64) -> Self {
        self.drop = p;
        self
    }

    /// With a duplicate probability.
    pub fn with_duplicate(mut self, p: f64) -> Self {
        self.duplicate = p;
        self
    }

    /// With a corrupt probability.
    pub fn with_corrupt(mut self, p: f64) -> Self {
        self.corrupt = p;
        self
    }

    /// With the blackhole on or off.
    pub fn with_blackhole(mut self, on: bool) -> Self {
        self.blackhole = on;
        self
    }

    /// Checks the probabilities are in `[0, 1]`.
    pub fn validate(&self) -> Result<(), ProxyError> {
        for (name, p) in [
            ("drop", self.drop),
            ("duplicate", self.duplicate),
            ("corrupt", self.corrupt),
        ] {
            if !(0.0..=1.0).contains(&p) {
                return Err(ProxyError::InvalidFaults(format!(
                    "{name} probability {p} is not in [0, 1]"
                )));
            }
        }
        Ok(())
    }

    /// Whether anything is injected at all.
    pub fn is_none(&self) -> bool {
        *self == Self::default()
    }
}

impl fmt::Display for Faults {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_none() {
            return f.write_str("none");
        }
        let mut parts = Vec::new();
        if !self.delay.is_zero() {
            parts.push(format!("delay={:?}", self.delay));
        }
        if !self.jitter.is_zero() {
            parts.push(format!("jitter={:?}", self.jitter));
        }
        if self.drop > 0.0 {
            parts.push(format!("drop={}", self.drop));
        }
        if self.duplicate > 0.0 {
            parts.push(format!("duplicate={}", self.duplicate));
        }
        if self.corrupt > 0.0 {
            parts.push(format!("corrupt={}", self.corrupt));
        }
        if self.blackhole {
            parts.push("blackhole".into());
        }
        f.write_str(&parts.join(" "))
    }
}

/// Counters of one direction (a snapshot). For TCP a "packet" is one `read()` chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct DirStats {
    /// Packets that entered the proxy.
    pub received_packets: u64,
    /// Bytes that entered the proxy.
    pub received_bytes: u64,
    /// Packets sent on (duplicates included).
    pub forwarded_packets: u64,
    /// Bytes sent on (duplicates included).
    pub forwarded_bytes: u64,
    /// Packets discarded by the drop probability.
    pub dropped_packets: u64,
    /// Bytes discarded by the drop probability.
    pub dropped_bytes: u64,
    /// Packets that got an extra copy.
    pub duplicated_packets: u64,
    /// Packets with flipped bits.
    pub corrupted_packets: u64,
    /// Packets discarded by the blackhole (UDP only; TCP stalls instead).
    pub blackholed_packets: u64,
    /// Sends that failed (e.g. upstream port unreachable).
    pub send_errors: u64,
}

/// Counters of a proxy (a snapshot).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct ProxyStats {
    /// Client → upstream.
    pub to_upstream: DirStats,
    /// Upstream → client.
    pub to_client: DirStats,
    /// UDP client sessions created / TCP connections accepted.
    pub sessions: u64,
    /// Upstream sockets that could not be created or connected.
    pub connect_errors: u64,
}

impl ProxyStats {
    /// The counters of one direction.
    pub fn dir(&self, d: Direction) -> &DirStats {
        match d {
            Direction::ToUpstream => &self.to_upstream,
            Direction::ToClient => &self.to_client,
        }
    }
}

#[derive(Debug, Default)]
struct Counters {
    received_packets: AtomicU64,
    received_bytes: AtomicU64,
    forwarded_packets: AtomicU64,
    forwarded_bytes: AtomicU64,
    dropped_packets: AtomicU64,
    dropped_bytes: AtomicU64,
    duplicated_packets: AtomicU64,
    corrupted_packets: AtomicU64,
    blackholed_packets: AtomicU64,
    send_errors: AtomicU64,
}

fn inc(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

impl Counters {
    fn snapshot(&self) -> DirStats {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        DirStats {
            received_packets: g(&self.received_packets),
            received_bytes: g(&self.received_bytes),
            forwarded_packets: g(&self.forwarded_packets),
            forwarded_bytes: g(&self.forwarded_bytes),
            dropped_packets: g(&self.dropped_packets),
            dropped_bytes: g(&self.dropped_bytes),
            duplicated_packets: g(&self.duplicated_packets),
            corrupted_packets: g(&self.corrupted_packets),
            blackholed_packets: g(&self.blackholed_packets),
            send_errors: g(&self.send_errors),
        }
    }

    fn forwarded(&self, bytes: usize) {
        inc(&self.forwarded_packets, 1);
        inc(&self.forwarded_bytes, bytes as u64);
    }

    fn send_error(&self) {
        inc(&self.send_errors, 1);
    }
}

/// What to do with one packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Discard,
    Forward { copies: u8, delay: Duration },
}

/// One direction: its fault settings and counters.
#[derive(Debug)]
struct Lane {
    faults: watch::Sender<Faults>,
    counters: Counters,
}

impl Lane {
    fn new(f: Faults) -> Self {
        Self {
            faults: watch::Sender::new(f),
            counters: Counters::default(),
        }
    }

    fn current(&self) -> Faults {
        *self.faults.borrow()
    }

    /// Applies `f` to one packet: counts it, may corrupt `data` in place, and says whether and when to
    /// send it.
    fn decide(&self, f: &Faults, rng: &mut StdRng, data: &mut [u8]) -> Verdict {
        let c = &self.counters;
        inc(&c.received_packets, 1);
        inc(&c.received_bytes, data.len() as u64);
        if f.blackhole {
            inc(&c.blackholed_packets, 1);
            return Verdict::Discard;
        }
        if f.drop > 0.0 && rng.random_bool(f.drop) {
            inc(&c.dropped_packets, 1);
            inc(&c.dropped_bytes, data.len() as u64);
            return Verdict::Discard;
        }
        if f.corrupt > 0.0 && !data.is_empty() && rng.random_bool(f.corrupt) {
            flip_bits(rng, data);
            inc(&c.corrupted_packets, 1);
        }
        let copies = if f.duplicate > 0.0 && rng.random_bool(f.duplicate) {
            inc(&c.duplicated_packets, 1);
            2
        } else {
            1
        };
        let mut delay = f.delay;
        if !f.jitter.is_zero() {
            let max = u64::try_from(f.jitter.as_nanos()).unwrap_or(u64::MAX);
            delay += Duration::from_nanos(rng.random_range(0..=max));
        }
        Verdict::Forward { copies, delay }
    }
}

/// Flips 1–3 distinct random bits of a non-empty buffer.
fn flip_bits(rng: &mut StdRng, data: &mut [u8]) {
    let bits = data.len() * 8;
    let k = rng.random_range(1..=3usize).min(bits);
    let mut chosen = [usize::MAX; 3];
    let mut m = 0;
    while m < k {
        let b = rng.random_range(0..bits);
        if !chosen[..m].contains(&b) {
            chosen[m] = b;
            m += 1;
        }
    }
    for &b in &chosen[..k] {
        data[b / 8] ^= 1 << (b % 8);
    }
}

/// splitmix64 of a combination, to derive independent seeds.
fn sub_seed(seed: u64, a: u64, b: u64) -> u64 {
    let mut z =
        seed ^ a.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ b.wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn rng_for(seed: u64, a: u64, b: u64) -> StdRng {
    StdRng::seed_from_u64(sub_seed(seed, a, b))
}

/// State shared between a handle and its proxy thread.
#[derive(Debug)]
struct Shared {
    lanes: [Lane; 2],
    sessions: AtomicU64,
    connect_errors: AtomicU64,
    /// Bumped by [`TcpProxy::sever_connections`].
    sever: watch::Sender<u64>,
    seed: u64,
}

impl Shared {
    fn lane(&self, d: Direction) -> &Lane {
        &self.lanes[d.index()]
    }
}

/// How to start a proxy.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// Where clients send / connect (port 0: any free port).
    pub listen: SocketAddr,
    /// Where traffic goes.
    pub upstream: SocketAddr,
    /// Seed of the fault decisions.
    pub seed: u64,
    /// Initial faults client → upstream.
    pub to_upstream: Faults,
    /// Initial faults upstream → client.
    pub to_client: Faults,
    /// Network namespace to run in (a `/run/netns/<name>` path); `None`: the caller's.
    pub netns: Option<PathBuf>,
}

impl ProxyConfig {
    /// No faults, seed 0, this namespace.
    pub fn new(listen: SocketAddr, upstream: SocketAddr) -> Self {
        Self {
            listen,
            upstream,
            seed: 0,
            to_upstream: Faults::none(),
            to_client: Faults::none(),
            netns: None,
        }
    }

    /// Sets the seed.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// Sets the initial faults of both directions.
    pub fn faults(mut self, f: Faults) -> Self {
        self.to_upstream = f;
        self.to_client = f;
        self
    }

    /// Sets the initial faults of one direction.
    pub fn faults_dir(mut self, d: Direction, f: Faults) -> Self {
        match d {
            Direction::ToUpstream => self.to_upstream = f,
            Direction::ToClient => self.to_client = f,
        }
        self
    }

    /// Runs the proxy inside the network namespace at `path`.
    pub fn netns(mut self, path: impl Into<PathBuf>) -> Self {
        self.netns = Some(path.into());
        self
    }
}

type Ready = std::sync::mpsc::SyncSender<Result<SocketAddr, ProxyError>>;

/// The common handle of both proxies: fault settings, counters, stop on drop.
#[derive(Debug)]
pub struct ProxyHandle {
    shared: Arc<Shared>,
    local: SocketAddr,
    upstream: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl ProxyHandle {
    /// Starts the proxy thread: enters the namespace, builds a current-thread runtime and runs `body`
    /// (which must report its bound address on the `Ready` channel) until the handle stops it.
    fn start<F, Fut>(name: &str, cfg: &ProxyConfig, body: F) -> Result<Self, ProxyError>
    where
        F: FnOnce(Arc<Shared>, Ready) -> Fut + Send + 'static,
        Fut: Future<Output = ()>,
    {
        cfg.to_upstream.validate()?;
        cfg.to_client.validate()?;
        let shared = Arc::new(Shared {
            lanes: [Lane::new(cfg.to_upstream), Lane::new(cfg.to_client)],
            sessions: AtomicU64::new(0),
            connect_errors: AtomicU64::new(0),
            sever: watch::Sender::new(0),
            seed: cfg.seed,
        });
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
        let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
        let netns = cfg.netns.clone();
        let sh = shared.clone();
        let thread = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                if let Some(path) = &netns {
                    if let Err(source) = crate::netns::enter_netns(path) {
                        let _ = ready_tx.send(Err(ProxyError::Netns {
                            path: path.clone(),
                            source,
                        }));
                        return;
                    }
                }
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(source) => {
                        let _ = ready_tx.send(Err(ProxyError::Io {
                            context: "build tokio runtime",
                            source,
                        }));
                        return;
                    }
                };
                rt.block_on(async move {
                    tokio::select! {
                        _ = body(sh, ready_tx) => {}
                        _ = shutdown_rx => {}
                    }
                });
                // Dropping the runtime cancels every task and closes every socket.
                drop(rt);
            })
            .map_err(|source| ProxyError::Io {
                context: "spawn proxy thread",
                source,
            })?;
        let mut handle = Self {
            shared,
            local: cfg.listen,
            upstream: cfg.upstream,
            shutdown: Some(shutdown_tx),
            thread: Some(thread),
        };
        match ready_rx.recv() {
            Ok(Ok(addr)) => {
                handle.local = addr;
                tracing::debug!(proxy = name, listen = %addr, upstream = %cfg.upstream, "proxy started");
                Ok(handle)
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Err(ProxyError::NotReady),
        }
    }

    /// The bound listen address (the real port when started with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// The upstream address.
    pub fn upstream(&self) -> SocketAddr {
        self.upstream
    }

    /// Sets the faults of both directions (takes effect for the next packet).
    pub fn set_faults(&self, f: Faults) -> Result<(), ProxyError> {
        f.validate()?;
        for d in [Direction::ToUpstream, Direction::ToClient] {
            self.shared.lane(d).faults.send_replace(f);
        }
        tracing::debug!(listen = %self.local, faults = %f, "proxy faults set");
        Ok(())
    }

    /// Sets the faults of one direction.
    pub fn set_faults_dir(&self, d: Direction, f: Faults) -> Result<(), ProxyError> {
        f.validate()?;
        self.shared.lane(d).faults.send_replace(f);
        tracing::debug!(listen = %self.local, direction = ?d, faults = %f, "proxy faults set");
        Ok(())
    }

    /// Turns the blackhole of both directions on or off, keeping the other settings.
    pub fn set_blackhole(&self, on: bool) {
        for d in [Direction::ToUpstream, Direction::ToClient] {
            self.shared.lane(d).faults.send_modify(|f| f.blackhole = on);
        }
    }

    /// The current faults of one direction.
    pub fn faults(&self, d: Direction) -> Faults {
        self.shared.lane(d).current()
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> ProxyStats {
        ProxyStats {
            to_upstream: self.shared.lanes[0].counters.snapshot(),
            to_client: self.shared.lanes[1].counters.snapshot(),
            sessions: self.shared.sessions.load(Ordering::Relaxed),
            connect_errors: self.shared.connect_errors.load(Ordering::Relaxed),
        }
    }

    /// Stops the proxy and waits for its thread (dropping the handle does the same).
    pub fn stop(mut self) {
        self.stop_inner();
    }

    fn stop_inner(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::error!(listen = %self.local, "proxy thread panicked");
            }
        }
    }
}

impl Drop for ProxyHandle {
    fn drop(&mut self) {
        self.stop_inner();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validates_probabilities() {
        assert!(Faults::none().with_drop(1.0).validate().is_ok());
        assert!(Faults::none().with_drop(1.5).validate().is_err());
        assert!(Faults::none().with_corrupt(-0.1).validate().is_err());
        assert!(Faults::none().with_duplicate(f64::NAN).validate().is_err());
    }

    #[test]
    fn flip_bits_always_changes_data() {
        let mut rng = rng_for(1, 2, 3);
        for len in [1usize, 2, 7, 100] {
            for _ in 0..200 {
                let orig = vec![0xA5u8; len];
                let mut d = orig.clone();
                flip_bits(&mut rng, &mut d);
                let flipped: u32 = orig.iter().zip(&d).map(|(a, b)| (a ^ b).count_ones()).sum();
                assert!((1..=3).contains(&flipped), "{flipped} bits flipped");
            }
        }
    }

    #[test]
    fn decisions_are_deterministic() {
        let lane = Lane::new(Faults::none());
        let f = Faults::none()
            .with_drop(0.3)
            .with_duplicate(0.3)
            .with_corrupt(0.3)
            .with_jitter(Duration::from_millis(5));
        let run = || {
            let mut rng = rng_for(42, 0, 0);
            (0..500)
                .map(|i| {
                    let mut d = vec![i as u8; 32];
                    (lane.decide(&f, &mut rng, &mut d), d)
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(run(), run());
        assert_ne!(sub_seed(1, 0, 0), sub_seed(1, 0, 1));
    }

    #[test]
    fn faults_display() {
        assert_eq!(Faults::none().to_string(), "none");
        let s = Faults::none()
            .with_drop(0.5)
            .with_blackhole(true)
            .to_string();
        assert_eq!(s, "drop=0.5 blackhole");
    }
}
