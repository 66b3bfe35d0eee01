//! UDP heartbeats between the two hosts of an FT pair, on one or two network paths.
//!
//! Each path is a pair (local bind address, peer address). Its socket is made with socket2 (bound,
//! non-blocking, IPv4 TOS set to DSCP CS6 "network control" unless disabled), *connected* to the peer —
//! so the kernel drops datagrams from any other address — and served by one OS thread per heartbeat
//! (`ax-heartbeat`, `ppoll` over every path's socket), not by tokio: the thread runs `SCHED_FIFO`
//! with a locked stack when the process may ([`crate::rt`], [`HeartbeatConfig::realtime`]), so CPU
//! hogs at normal priority and a busy async runtime cannot delay a beat or an echo. Every `interval`
//! (default 20 ms) each path sends a **beat**; a host that receives a beat from its configured peer
//! answers at once with an **echo** on the same path. An echo carries the beat's sequence and send time
//! back to its sender, which turns it into an RTT sample (both times are the sender's own monotonic
//! clock: no clock comparison between hosts).
//!
//! Every packet that is accepted becomes an [`Observation`] on a bounded tokio channel, for the
//! [`crate::detector`]. If the channel is full the observation is dropped and counted: a lost
//! observation can only make a peer look *less* alive, never more.
//!
//! ## Wire format (version 1, little endian)
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | magic `AXHB` |
//! | 4 | 1 | version = 1 |
//! | 5 | 1 | kind: 1 = beat, 2 = echo |
//! | 6 | 1 | `n` = length of the sender's host id, 1..=64 |
//! | 7 | 1 | reserved, 0 |
//! | 8 | 8 | sender incarnation (changes — increases — on every restart of the sender) |
//! | 16 | 8 | sender sequence (per path, starts at 1) |
//! | 24 | 8 | sender monotonic send time, ns since the sender's own origin |
//! | 32 | 8 | sender role (opaque to this module: [`crate::role::RoleMachine::heartbeat_status`]) |
//! | 40 | 8 | sender generation (opaque) |
//! | 48 | 8 | echo: the sequence of the beat answered (0 in a beat) |
//! | 56 | 8 | echo: the send time of the beat answered (0 in a beat) |
//! | 64 | `n` | sender host id, UTF-8 |
//!
//! [`Packet::decode`] checks every field and the exact total length and never panics (property-tested
//! with random and mutated input). Packets from a host id other than the configured peer are counted
//! and ignored. Heartbeats are not authenticated: a forged beat can at worst keep a dead peer looking
//! alive (delaying failover); it cannot make two hosts release output, which only the
//! [`crate::witness`] lease allows.
//!
//! ## Timing
//! With the defaults (interval 20 ms, timeout 100 ms) the detector declares a silent peer dead at most
//! `timeout` after the last packet it received, which itself was at most one `interval` (plus the path's
//! latency) after the peer's last beat: a dead host is detected within ≈ 120 ms, under 150 ms.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use std::io::Read as _;
use std::os::fd::AsRawFd as _;
use std::os::unix::net::UnixStream;

use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tracing::{debug, trace, warn};

use crate::rt::{self, Realtime};
use crate::wire::{get_u64, put_u64};

/// First four bytes of every heartbeat packet.
pub const MAGIC: [u8; 4] = *b"AXHB";
/// The wire version this build speaks.
pub const VERSION: u8 = 1;
/// Longest host id, in bytes.
pub const MAX_HOST_ID: usize = 64;
/// Length of the fixed header.
pub const HEADER_LEN: usize = 64;
/// Longest valid packet.
pub const MAX_PACKET: usize = HEADER_LEN + MAX_HOST_ID;
/// At most this many paths per peer.
pub const MAX_PATHS: usize = 2;
/// DSCP CS6 ("network control") in the IPv4 TOS byte: the default for heartbeat sockets.
pub const TOS_CS6: u8 = 0xC0;
/// Capacity of the observation channel.
pub const OBSERVATION_CAPACITY: usize = 1024;

/// Heartbeat errors: malformed packets, bad configuration, socket failures.
#[derive(Debug, thiserror::Error)]
pub enum HeartbeatError {
    /// Shorter than the fixed header.
    #[error("packet of {len} bytes is shorter than the {HEADER_LEN}-byte header")]
    Truncated {
        /// Bytes received.
        len: usize,
    },
    /// Not a heartbeat.
    #[error("bad magic {0:02x?}")]
    BadMagic([u8; 4]),
    /// A version this build does not speak.
    #[error("unsupported version {0} (this build speaks {VERSION})")]
    Version(u8),
    /// Neither beat nor echo.
    #[error("unknown packet kind {0}")]
    Kind(u8),
    /// The reserved byte is not zero.
    #[error("reserved byte is {0}, must be 0")]
    Reserved(u8),
    /// Host id empty or too long (in a packet or in the configuration).
    #[error("host id length {len} outside 1..={MAX_HOST_ID}")]
    HostIdLength {
        /// The length found.
        len: usize,
    },
    /// The datagram is not exactly header + host id.
    #[error("packet length {got} does not match its header ({expected})")]
    Length {
        /// Header + host id length.
        expected: usize,
        /// Bytes received.
        got: usize,
    },
    /// The host id is not UTF-8.
    #[error("host id is not UTF-8")]
    HostIdUtf8,
    /// A beat with non-zero echo fields.
    #[error("a beat carries echo fields")]
    EchoOnBeat,
    /// An echo of a beat this host never sent (sequence or time in the future).
    #[error("echo of sequence {sequence} (sent so far: {sent}) or of a future send time")]
    BogusEcho {
        /// The echoed sequence.
        sequence: u64,
        /// The last sequence sent on the path.
        sent: u64,
    },
    /// The configuration is unusable.
    #[error("bad heartbeat configuration: {0}")]
    Config(String),
    /// A socket operation failed.
    #[error("{what} {addr}: {source}")]
    Socket {
        /// The operation.
        what: &'static str,
        /// The address involved.
        addr: SocketAddr,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

/// The two kinds of packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// Sent every interval.
    Beat = 1,
    /// Sent in answer to a beat.
    Echo = 2,
}

/// One decoded heartbeat packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet {
    /// Beat or echo.
    pub kind: Kind,
    /// The sender's host id (1..=64 bytes of UTF-8).
    pub host_id: String,
    /// The sender's incarnation.
    pub incarnation: u64,
    /// The sender's sequence on this path.
    pub sequence: u64,
    /// The sender's monotonic send time, ns since its own origin.
    pub send_time_ns: u64,
    /// The sender's role (opaque).
    pub role: u64,
    /// The sender's generation (opaque).
    pub generation: u64,
    /// Echo only: the sequence of the beat answered.
    pub echo_sequence: u64,
    /// Echo only: the send time of the beat answered.
    pub echo_send_time_ns: u64,
}

fn check_host_id(id: &str) -> Result<(), HeartbeatError> {
    if id.is_empty() || id.len() > MAX_HOST_ID {
        return Err(HeartbeatError::HostIdLength { len: id.len() });
    }
    Ok(())
}

impl Packet {
    /// Encodes into `buf`, returning the packet length.
    pub fn encode(&self, buf: &mut [u8; MAX_PACKET]) -> Result<usize, HeartbeatError> {
        check_host_id(&self.host_id)?;
        if self.kind == Kind::Beat && (self.echo_sequence != 0 || self.echo_send_time_ns != 0) {
            return Err(HeartbeatError::EchoOnBeat);
        }
        let n = self.host_id.len();
        buf[..4].copy_from_slice(&MAGIC);
        buf[4] = VERSION;
        buf[5] = self.kind as u8;
        buf[6] = n as u8; // ≤ 64, checked above
        buf[7] = 0;
        put_u64(buf, 8, self.incarnation);
        put_u64(buf, 16, self.sequence);
        put_u64(buf, 24, self.send_time_ns);
        put_u64(buf, 32, self.role);
        put_u64(buf, 40, self.generation);
        put_u64(buf, 48, self.echo_sequence);
        put_u64(buf, 56, self.echo_send_time_ns);
        buf[HEADER_LEN..HEADER_LEN + n].copy_from_slice(self.host_id.as_bytes());
        Ok(HEADER_LEN + n)
    }

    /// Decodes and validates one datagram. Never panics, whatever the input.
    pub fn decode(buf: &[u8]) -> Result<Packet, HeartbeatError> {
        if buf.len() < HEADER_LEN {
            return Err(HeartbeatError::Truncated { len: buf.len() });
        }
        let magic = [buf[0], buf[1], buf[2], buf[3]];
        if magic != MAGIC {
            return Err(HeartbeatError::BadMagic(magic));
        }
        if buf[4] != VERSION {
            return Err(HeartbeatError::Version(buf[4]));
        }
        let kind = match buf[5] {
            1 => Kind::Beat,
            2 => Kind::Echo,
            k => return Err(HeartbeatError::Kind(k)),
        };
        let n = usize::from(buf[6]);
        if n == 0 || n > MAX_HOST_ID {
            return Err(HeartbeatError::HostIdLength { len: n });
        }
        if buf[7] != 0 {
            return Err(HeartbeatError::Reserved(buf[7]));
        }
        if buf.len() != HEADER_LEN + n {
            return Err(HeartbeatError::Length {
                expected: HEADER_LEN + n,
                got: buf.len(),
            });
        }
        let host_id = std::str::from_utf8(&buf[HEADER_LEN..])
            .map_err(|_| HeartbeatError::HostIdUtf8)?
            .to_owned();
        let p = Packet {
            kind,
            host_id,
            incarnation: get_u64(buf, 8),
            sequence: get_u64(buf, 16),
            send_time_ns: get_u64(buf, 24),
            role: get_u64(buf, 32),
            generation: get_u64(buf, 40),
            echo_sequence: get_u64(buf, 48),
            echo_send_time_ns: get_u64(buf, 56),
        };
        if p.kind == Kind::Beat && (p.echo_sequence != 0 || p.echo_send_time_ns != 0) {
            return Err(HeartbeatError::EchoOnBeat);
        }
        Ok(p)
    }
}

/// A fresh incarnation number: wall-clock nanoseconds since the Unix epoch.
///
/// The detector treats a *larger* incarnation as a restart and ignores packets of a smaller one, so a
/// host's incarnation must increase across restarts; wall-clock time does unless the clock is stepped
/// back by more than the restart took. A host with a persistent counter may use that instead.
pub fn new_incarnation() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(1, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// One network path: where to bind, where the peer is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PathConfig {
    /// Local address to bind (port 0: any free port). Prefer a specific address to `0.0.0.0`, so
    /// that replies leave from the address the peer expects.
    pub local: SocketAddr,
    /// The peer's address on this path (may have port 0 until [`Heartbeat::set_peer`]).
    pub peer: SocketAddr,
}

/// Heartbeat configuration.
#[derive(Debug, Clone)]
pub struct HeartbeatConfig {
    /// This host's id, 1..=64 bytes.
    pub host_id: String,
    /// This host's incarnation ([`new_incarnation`]).
    pub incarnation: u64,
    /// The peer's host id; packets from any other id are ignored.
    pub peer_id: String,
    /// One or two paths.
    pub paths: Vec<PathConfig>,
    /// Time between beats (default 20 ms).
    pub interval: Duration,
    /// Silence after which the peer is dead (default 100 ms); used by the detector
    /// ([`crate::detector::DetectorConfig::from_heartbeat`]), checked here against `interval`.
    pub timeout: Duration,
    /// IPv4 TOS byte for the sockets (default [`TOS_CS6`]); `None` leaves the system default.
    pub tos: Option<u8>,
    /// Scheduling and memory locking of the heartbeat thread (default [`Realtime::from_env`]:
    /// `SCHED_FIFO` priority 10 and a locked stack, unless `AX_HB_RT` / `AX_HB_MLOCK` say otherwise).
    pub realtime: Realtime,
}

impl HeartbeatConfig {
    /// Default time between beats.
    pub const DEFAULT_INTERVAL: Duration = Duration::from_millis(20);
    /// Default silence after which a peer is dead.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(100);

    /// A configuration with the default timing.
    pub fn new(
        host_id: impl Into<String>,
        incarnation: u64,
        peer_id: impl Into<String>,
        paths: Vec<PathConfig>,
    ) -> Self {
        HeartbeatConfig {
            host_id: host_id.into(),
            incarnation,
            peer_id: peer_id.into(),
            paths,
            interval: Self::DEFAULT_INTERVAL,
            timeout: Self::DEFAULT_TIMEOUT,
            tos: Some(TOS_CS6),
            realtime: Realtime::from_env(),
        }
    }

    /// Checks ids, path count and timing.
    pub fn validate(&self) -> Result<(), HeartbeatError> {
        check_host_id(&self.host_id)?;
        check_host_id(&self.peer_id)?;
        if self.host_id == self.peer_id {
            return Err(HeartbeatError::Config(format!(
                "host id and peer id are both {:?}",
                self.host_id
            )));
        }
        if self.paths.is_empty() || self.paths.len() > MAX_PATHS {
            return Err(HeartbeatError::Config(format!(
                "{} paths; need 1..={MAX_PATHS}",
                self.paths.len()
            )));
        }
        if self.interval.is_zero() {
            return Err(HeartbeatError::Config("interval is zero".into()));
        }
        if self.timeout <= self.interval {
            return Err(HeartbeatError::Config(format!(
                "timeout {:?} must exceed the interval {:?}",
                self.timeout, self.interval
            )));
        }
        Ok(())
    }
}

/// One accepted packet, as seen by the receiving host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Observation {
    /// Index of the path it arrived on.
    pub path: usize,
    /// When it arrived (receiver's clock).
    pub at: Instant,
    /// Beat or echo.
    pub kind: Kind,
    /// The peer's incarnation.
    pub incarnation: u64,
    /// The *freshness* sequence: for a beat the peer's sequence, for an echo the sequence of our own
    /// beat it answers. Within one incarnation, path and kind it only grows for fresh packets.
    pub sequence: u64,
    /// The peer's role (opaque).
    pub role: u64,
    /// The peer's generation (opaque).
    pub generation: u64,
    /// Echo only: round-trip time of the beat it answers.
    pub rtt: Option<Duration>,
}

/// Counters of one path.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PathStats {
    /// Beats sent.
    pub beats_sent: u64,
    /// Echoes sent.
    pub echoes_sent: u64,
    /// Valid beats received from the peer.
    pub beats_received: u64,
    /// Valid echoes received from the peer.
    pub echoes_received: u64,
    /// Malformed datagrams.
    pub rejected: u64,
    /// Well-formed packets from a host id other than the peer's.
    pub unknown_host: u64,
    /// Send or receive errors (e.g. `ECONNREFUSED` while the peer is down).
    pub io_errors: u64,
    /// Observations dropped because the channel was full.
    pub dropped: u64,
}

#[derive(Debug, Default)]
struct PathCounters {
    beats_sent: AtomicU64,
    echoes_sent: AtomicU64,
    beats_received: AtomicU64,
    echoes_received: AtomicU64,
    rejected: AtomicU64,
    unknown_host: AtomicU64,
    io_errors: AtomicU64,
    dropped: AtomicU64,
}

impl PathCounters {
    fn snapshot(&self) -> PathStats {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        PathStats {
            beats_sent: g(&self.beats_sent),
            echoes_sent: g(&self.echoes_sent),
            beats_received: g(&self.beats_received),
            echoes_received: g(&self.echoes_received),
            rejected: g(&self.rejected),
            unknown_host: g(&self.unknown_host),
            io_errors: g(&self.io_errors),
            dropped: g(&self.dropped),
        }
    }
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

#[derive(Debug)]
struct Shared {
    host_id: String,
    incarnation: u64,
    peer_id: String,
    interval: Duration,
    origin: Instant,
    /// (role, generation) advertised in every packet.
    status: Mutex<(u64, u64)>,
    counters: Vec<PathCounters>,
}

impl Shared {
    fn now_ns(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    fn status(&self) -> (u64, u64) {
        *self.status.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Bound but not yet running heartbeat sockets.
#[derive(Debug)]
pub struct Heartbeat {
    config: HeartbeatConfig,
    sockets: Vec<Socket>,
}

impl Heartbeat {
    /// Validates the configuration and binds every path's local address (socket2: non-blocking,
    /// TOS). Nothing is sent until [`Heartbeat::start`].
    pub fn bind(config: HeartbeatConfig) -> Result<Heartbeat, HeartbeatError> {
        config.validate()?;
        let mut sockets = Vec::with_capacity(config.paths.len());
        for p in &config.paths {
            let err = |what| {
                move |source| HeartbeatError::Socket {
                    what,
                    addr: p.local,
                    source,
                }
            };
            let s = Socket::new(
                Domain::for_address(p.local),
                Type::DGRAM,
                Some(Protocol::UDP),
            )
            .map_err(err("socket for"))?;
            s.set_nonblocking(true).map_err(err("non-blocking"))?;
            if let (Some(tos), true) = (config.tos, p.local.is_ipv4()) {
                // Best effort: some environments refuse TOS changes; heartbeats work without.
                if let Err(e) = s.set_tos_v4(u32::from(tos)) {
                    debug!(addr = %p.local, error = %e, "heartbeat: cannot set IP_TOS");
                }
            }
            s.bind(&SockAddr::from(p.local)).map_err(err("bind"))?;
            sockets.push(s);
        }
        Ok(Heartbeat { config, sockets })
    }

    /// The bound local addresses, one per path (real ports when bound to port 0).
    pub fn local_addrs(&self) -> Result<Vec<SocketAddr>, HeartbeatError> {
        self.sockets
            .iter()
            .zip(&self.config.paths)
            .map(|(s, p)| {
                s.local_addr()
                    .ok()
                    .and_then(|a| a.as_socket())
                    .ok_or_else(|| HeartbeatError::Socket {
                        what: "local address of",
                        addr: p.local,
                        source: std::io::Error::other("not an inet socket"),
                    })
            })
            .collect()
    }

    /// Sets the peer address of path `path` (for peers bound to port 0, as in tests).
    pub fn set_peer(&mut self, path: usize, peer: SocketAddr) -> Result<(), HeartbeatError> {
        let n = self.config.paths.len();
        let p = self
            .config
            .paths
            .get_mut(path)
            .ok_or_else(|| HeartbeatError::Config(format!("no path {path} (have {n})")))?;
        p.peer = peer;
        Ok(())
    }

    /// Connects each path to its peer and starts the heartbeat thread, which sends, receives and
    /// answers on every path (see [`crate::rt`]: `SCHED_FIFO` and a locked stack when the process may,
    /// as configured by [`HeartbeatConfig::realtime`]). Needs no tokio runtime. Returns the handle and
    /// the observations of accepted packets.
    pub fn start(self) -> Result<(HeartbeatHandle, mpsc::Receiver<Observation>), HeartbeatError> {
        let local = self.local_addrs()?;
        let cfg = self.config;
        let shared = Arc::new(Shared {
            host_id: cfg.host_id.clone(),
            incarnation: cfg.incarnation,
            peer_id: cfg.peer_id.clone(),
            interval: cfg.interval,
            origin: Instant::now(),
            status: Mutex::new((0, 0)),
            counters: cfg.paths.iter().map(|_| PathCounters::default()).collect(),
        });
        let (tx, rx) = mpsc::channel(OBSERVATION_CAPACITY);
        let mut sockets = Vec::with_capacity(self.sockets.len());
        for (s, p) in self.sockets.into_iter().zip(&cfg.paths) {
            if p.peer.port() == 0 {
                return Err(HeartbeatError::Config(format!(
                    "peer address {} has port 0",
                    p.peer
                )));
            }
            let err = |what| {
                move |source| HeartbeatError::Socket {
                    what,
                    addr: p.peer,
                    source,
                }
            };
            s.connect(&SockAddr::from(p.peer))
                .map_err(err("connect to"))?;
            let std_socket: std::net::UdpSocket = s.into();
            sockets.push(std_socket);
        }
        let first = local.first().copied().unwrap_or(cfg.paths[0].local);
        let io_err = |what| {
            move |source| HeartbeatError::Socket {
                what,
                addr: first,
                source,
            }
        };
        // Dropping `stop` (with the handle) wakes the thread: its end reads EOF.
        let (stop, wake) = UnixStream::pair().map_err(io_err("stop pipe for"))?;
        wake.set_nonblocking(true)
            .map_err(io_err("stop pipe for"))?;
        let (done_tx, done) = oneshot::channel();
        let thread_shared = shared.clone();
        let thread = rt::spawn_thread("ax-heartbeat", cfg.realtime, move |_| {
            run_paths(&sockets, &wake, &thread_shared, &tx);
            drop(sockets);
            let _ = done_tx.send(());
        })
        .map_err(io_err("heartbeat thread for"))?;
        Ok((
            HeartbeatHandle {
                shared,
                stop: Some(stop),
                done: Some(done),
                thread: Some(thread),
                local,
            },
            rx,
        ))
    }
}

/// A running heartbeat. Dropping it stops every path.
#[derive(Debug)]
pub struct HeartbeatHandle {
    shared: Arc<Shared>,
    stop: Option<UnixStream>,
    done: Option<oneshot::Receiver<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    local: Vec<SocketAddr>,
}

impl HeartbeatHandle {
    /// Sets the (role, generation) advertised from the next packet on.
    pub fn set_status(&self, role: u64, generation: u64) {
        *self.shared.status.lock().unwrap_or_else(|p| p.into_inner()) = (role, generation);
    }

    /// Counters of each path.
    pub fn stats(&self) -> Vec<PathStats> {
        self.shared
            .counters
            .iter()
            .map(PathCounters::snapshot)
            .collect()
    }

    /// The local addresses, one per path.
    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.local
    }

    /// Stops sending and answering (same as dropping the handle). The thread closes the sockets
    /// within microseconds; use [`HeartbeatHandle::shutdown`] to bind the same addresses again.
    pub fn stop(self) {}

    /// Stops every path and waits until its socket is closed, so that the same local addresses can be
    /// bound again at once (a new session with the next peer).
    pub async fn shutdown(mut self) {
        self.stop = None;
        if let Some(done) = self.done.take() {
            let _ = done.await;
        }
    }
}

impl Drop for HeartbeatHandle {
    fn drop(&mut self) {
        // Closing our end of the pair wakes the thread, which closes the sockets and exits; it is not
        // joined (a drop must not block), it holds nothing but its sockets and the shared counters.
        self.stop = None;
        drop(self.thread.take());
    }
}

/// The heartbeat thread: beats every interval on every path, answers beats, reports observations.
/// Returns when `wake` reads EOF (the handle was dropped).
fn run_paths(
    sockets: &[std::net::UdpSocket],
    mut wake: &UnixStream,
    shared: &Shared,
    tx: &mpsc::Sender<Observation>,
) {
    let mut fds: Vec<libc::pollfd> = sockets
        .iter()
        .map(|s| s.as_raw_fd())
        .chain(std::iter::once(wake.as_raw_fd()))
        .map(|fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let mut sequences = vec![0u64; sockets.len()];
    let mut out = [0u8; MAX_PACKET];
    // One byte more than the longest valid packet, so an oversized datagram is seen as such.
    let mut inb = [0u8; MAX_PACKET + 1];
    let mut next_beat = Instant::now();
    loop {
        let now = Instant::now();
        if now >= next_beat {
            let (role, generation) = shared.status();
            for (path, socket) in sockets.iter().enumerate() {
                let Some(counters) = shared.counters.get(path) else {
                    continue;
                };
                sequences[path] += 1;
                let beat = Packet {
                    kind: Kind::Beat,
                    host_id: shared.host_id.clone(),
                    incarnation: shared.incarnation,
                    sequence: sequences[path],
                    send_time_ns: shared.now_ns(),
                    role,
                    generation,
                    echo_sequence: 0,
                    echo_send_time_ns: 0,
                };
                send(socket, &beat, &mut out, counters, &counters.beats_sent);
            }
            // A late wake-up delays the next beat rather than sending a burst.
            next_beat += shared.interval;
            if next_beat <= now {
                next_beat = now + shared.interval;
            }
        }
        let wait = next_beat.saturating_duration_since(Instant::now());
        let ts = libc::timespec {
            tv_sec: libc::time_t::try_from(wait.as_secs()).unwrap_or(libc::time_t::MAX),
            tv_nsec: libc::c_long::from(wait.subsec_nanos()),
        };
        for f in &mut fds {
            f.revents = 0;
        }
        // SAFETY: `fds` is a valid array of `fds.len()` initialised pollfds that lives across the
        // call; `ts` is a valid timespec; a null sigmask leaves the signal mask as it is.
        let r = unsafe {
            libc::ppoll(
                fds.as_mut_ptr(),
                fds.len() as libc::nfds_t,
                &ts,
                std::ptr::null(),
            )
        };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                warn!(error = %e, "heartbeat: poll failed");
                std::thread::sleep(Duration::from_millis(1));
            }
            continue;
        }
        if fds.last().is_some_and(|f| f.revents != 0) {
            let mut b = [0u8; 1];
            match wake.read(&mut b) {
                Ok(0) => return,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                _ => return,
            }
        }
        for (path, socket) in sockets.iter().enumerate() {
            if fds[path].revents == 0 {
                continue;
            }
            let Some(counters) = shared.counters.get(path) else {
                continue;
            };
            // Drain the socket: a backlog (after a stall) is taken in at once.
            loop {
                match socket.recv(&mut inb) {
                    Ok(n) => {
                        let Some(echo) =
                            receive(path, &inb[..n], sequences[path], shared, counters, tx)
                        else {
                            continue;
                        };
                        send(socket, &echo, &mut out, counters, &counters.echoes_sent);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        // ECONNREFUSED (ICMP port unreachable) is routine while the peer is down.
                        bump(&counters.io_errors);
                        trace!(path, error = %e, "heartbeat: receive error");
                        break;
                    }
                }
            }
        }
    }
}

fn send(
    socket: &std::net::UdpSocket,
    p: &Packet,
    out: &mut [u8; MAX_PACKET],
    counters: &PathCounters,
    sent: &AtomicU64,
) {
    let n = match p.encode(out) {
        Ok(n) => n,
        Err(e) => {
            // Unreachable: the configuration was validated.
            warn!(error = %e, "heartbeat: cannot encode");
            return;
        }
    };
    match socket.send(&out[..n]) {
        Ok(_) => bump(sent),
        Err(e) => {
            bump(&counters.io_errors);
            trace!(error = %e, "heartbeat: send error");
        }
    }
}

/// Handles one datagram; returns the echo to send for a valid beat.
fn receive(
    path: usize,
    datagram: &[u8],
    sent: u64,
    shared: &Shared,
    counters: &PathCounters,
    tx: &mpsc::Sender<Observation>,
) -> Option<Packet> {
    let at = Instant::now();
    let p = match Packet::decode(datagram) {
        Ok(p) => p,
        Err(e) => {
            bump(&counters.rejected);
            debug!(path, error = %e, "heartbeat: rejected datagram");
            return None;
        }
    };
    if p.host_id != shared.peer_id {
        bump(&counters.unknown_host);
        debug!(path, host = %p.host_id, "heartbeat: packet from an unknown host id");
        return None;
    }
    let now_ns = shared.now_ns();
    let (obs, echo) = match p.kind {
        Kind::Beat => {
            bump(&counters.beats_received);
            let (role, generation) = shared.status();
            let echo = Packet {
                kind: Kind::Echo,
                host_id: shared.host_id.clone(),
                incarnation: shared.incarnation,
                sequence: sent,
                send_time_ns: now_ns,
                role,
                generation,
                echo_sequence: p.sequence,
                echo_send_time_ns: p.send_time_ns,
            };
            (observation(path, at, &p, p.sequence, None), Some(echo))
        }
        Kind::Echo => {
            if p.echo_sequence == 0 || p.echo_sequence > sent || p.echo_send_time_ns > now_ns {
                bump(&counters.rejected);
                let e = HeartbeatError::BogusEcho {
                    sequence: p.echo_sequence,
                    sent,
                };
                debug!(path, error = %e, "heartbeat: rejected echo");
                return None;
            }
            bump(&counters.echoes_received);
            let rtt = Duration::from_nanos(now_ns - p.echo_send_time_ns);
            (observation(path, at, &p, p.echo_sequence, Some(rtt)), None)
        }
    };
    match tx.try_send(obs) {
        Ok(()) => {}
        Err(mpsc::error::TrySendError::Full(_)) => bump(&counters.dropped),
        // Nobody listens: keep answering, the peer still wants its echoes.
        Err(mpsc::error::TrySendError::Closed(_)) => {}
    }
    echo
}

fn observation(
    path: usize,
    at: Instant,
    p: &Packet,
    sequence: u64,
    rtt: Option<Duration>,
) -> Observation {
    Observation {
        path,
        at,
        kind: p.kind,
        incarnation: p.incarnation,
        sequence,
        role: p.role,
        generation: p.generation,
        rtt,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample(kind: Kind) -> Packet {
        Packet {
            kind,
            host_id: "host-a".into(),
            incarnation: 7,
            sequence: 42,
            send_time_ns: 1_000_000,
            role: 4,
            generation: 3,
            echo_sequence: if kind == Kind::Echo { 41 } else { 0 },
            echo_send_time_ns: if kind == Kind::Echo { 999 } else { 0 },
        }
    }

    fn encoded(p: &Packet) -> Vec<u8> {
        let mut b = [0u8; MAX_PACKET];
        let n = p.encode(&mut b).unwrap();
        b[..n].to_vec()
    }

    #[test]
    fn round_trip() {
        for k in [Kind::Beat, Kind::Echo] {
            let p = sample(k);
            let b = encoded(&p);
            assert_eq!(b.len(), HEADER_LEN + 6);
            assert_eq!(Packet::decode(&b).unwrap(), p);
        }
    }

    #[test]
    fn rejects_each_bad_field() {
        let good = encoded(&sample(Kind::Beat));
        let with = |i: usize, v: u8| {
            let mut b = good.clone();
            b[i] = v;
            Packet::decode(&b).unwrap_err()
        };
        assert!(matches!(
            Packet::decode(&good[..10]),
            Err(HeartbeatError::Truncated { len: 10 })
        ));
        assert!(matches!(with(0, b'X'), HeartbeatError::BadMagic(_)));
        assert!(matches!(with(4, 2), HeartbeatError::Version(2)));
        assert!(matches!(with(5, 3), HeartbeatError::Kind(3)));
        assert!(matches!(
            with(6, 0),
            HeartbeatError::HostIdLength { len: 0 }
        ));
        assert!(matches!(
            with(6, 65),
            HeartbeatError::HostIdLength { len: 65 }
        ));
        assert!(matches!(
            with(6, 7),
            HeartbeatError::Length {
                expected: 71,
                got: 70
            }
        ));
        assert!(matches!(with(7, 1), HeartbeatError::Reserved(1)));
        assert!(matches!(with(48, 1), HeartbeatError::EchoOnBeat));
        assert!(matches!(with(HEADER_LEN, 0xff), HeartbeatError::HostIdUtf8));
        let mut long = good.clone();
        long.push(0);
        assert!(matches!(
            Packet::decode(&long),
            Err(HeartbeatError::Length { .. })
        ));
    }

    #[test]
    fn encode_refuses_bad_packets() {
        let mut b = [0u8; MAX_PACKET];
        let mut p = sample(Kind::Beat);
        p.host_id = "x".repeat(65);
        assert!(matches!(
            p.encode(&mut b),
            Err(HeartbeatError::HostIdLength { len: 65 })
        ));
        p.host_id = String::new();
        assert!(p.encode(&mut b).is_err());
        let mut p = sample(Kind::Beat);
        p.echo_sequence = 1;
        assert!(matches!(p.encode(&mut b), Err(HeartbeatError::EchoOnBeat)));
        let mut p = sample(Kind::Echo);
        p.host_id = "é".repeat(32); // 64 bytes: the longest valid id
        let n = p.encode(&mut b).unwrap();
        assert_eq!(n, MAX_PACKET);
        assert_eq!(Packet::decode(&b[..n]).unwrap(), p);
    }

    #[test]
    fn config_validation() {
        let path = PathConfig {
            local: "127.0.0.1:0".parse().unwrap(),
            peer: "127.0.0.1:1".parse().unwrap(),
        };
        let ok = HeartbeatConfig::new("a", 1, "b", vec![path]);
        ok.validate().unwrap();
        let bad = |f: &dyn Fn(&mut HeartbeatConfig)| {
            let mut c = ok.clone();
            f(&mut c);
            c.validate().unwrap_err()
        };
        bad(&|c| c.paths.clear());
        bad(&|c| c.paths = vec![path; 3]);
        bad(&|c| c.peer_id = "a".into());
        bad(&|c| c.host_id = "h".repeat(65));
        bad(&|c| c.interval = Duration::ZERO);
        bad(&|c| c.timeout = c.interval);
        assert!(new_incarnation() > 1_600_000_000_000_000_000);
    }

    #[tokio::test]
    async fn shutdown_frees_the_address_at_once() {
        // A node that loses its peer binds the same heartbeat address for the next session right away.
        let first = Heartbeat::bind(HeartbeatConfig::new(
            "a",
            1,
            "b",
            vec![PathConfig {
                local: "127.0.0.1:0".parse().unwrap(),
                peer: "127.0.0.1:9".parse().unwrap(),
            }],
        ))
        .unwrap();
        let local = first.local_addrs().unwrap()[0];
        let again = || {
            Heartbeat::bind(HeartbeatConfig::new(
                "a",
                2,
                "c",
                vec![PathConfig {
                    local,
                    peer: "127.0.0.1:9".parse().unwrap(),
                }],
            ))
        };
        let (handle, _rx) = first.start().unwrap();
        assert!(again().is_err(), "the address is still in use");
        handle.shutdown().await;
        again().expect("bound again right after shutdown");
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = Packet::decode(&bytes);
        }

        #[test]
        fn mutated_packets_decode_or_fail_cleanly(
            echo in any::<bool>(),
            id in "[a-z0-9.-]{1,64}",
            fields in any::<[u64; 5]>(),
            flips in proptest::collection::vec((0usize..140, any::<u8>()), 0..6),
            cut in 0usize..140,
        ) {
            let kind = if echo { Kind::Echo } else { Kind::Beat };
            let p = Packet {
                kind,
                host_id: id,
                incarnation: fields[0],
                sequence: fields[1],
                send_time_ns: fields[2],
                role: fields[3],
                generation: fields[4],
                echo_sequence: if echo { fields[1] ^ 1 } else { 0 },
                echo_send_time_ns: if echo { fields[2] ^ 1 } else { 0 },
            };
            let mut b = encoded(&p);
            prop_assert_eq!(Packet::decode(&b).unwrap(), p.clone());
            for (i, v) in flips {
                if let Some(x) = b.get_mut(i) {
                    *x = v;
                }
            }
            b.truncate(cut.max(1).min(b.len()));
            if let Ok(q) = Packet::decode(&b) {
                // Whatever decodes is internally consistent and re-encodes to the same bytes.
                prop_assert_eq!(encoded(&q), b);
                prop_assert!(!q.host_id.is_empty() && q.host_id.len() <= MAX_HOST_ID);
            }
        }
    }
}
