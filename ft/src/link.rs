//! The replication link: checkpoint frames from a primary to its secondary over QUIC with mutual TLS,
//! acknowledgements back.
//!
//! ```mermaid
//! sequenceDiagram
//!     participant P as primary (LinkClient)
//!     participant S as secondary (LinkServer)
//!     P->>S: QUIC handshake, TLS 1.3, both sides present cluster-CA certificates
//!     P->>S: open bidirectional stream; Hello {vm, host, mem_size, disk_bytes, generation, first_epoch}
//!     S-->>P: HelloReply {accepted, reason, next_epoch}
//!     loop every epoch
//!         P->>S: frame N (self-delimiting: the frame header carries its length)
//!         S->>S: validate (frame_len against limits, then the full decode) and store whole
//!         S-->>P: ack N (8 bytes)
//!     end
//! ```
//!
//! One stream carries one VM's frames in order, so QUIC's stream ordering is the epoch ordering; several
//! frames may be in flight (the primary does not wait for ack N before sending N+1).
//!
//! Peer input is hostile even from a certified peer:
//! - every length off the wire is checked against its limit first, and buffers grow with the bytes that
//!   arrived (at most [`READ_CHUNK`] ahead of them), never by what a length prefix declared;
//! - every connection gets its handshake and hello done in its own task within [`HELLO_TIMEOUT`], so a
//!   silent or slow peer delays nobody else; [`LinkServer::accept`] only sees complete hellos;
//! - a hello the server's [`Admission`] refuses (a host that is not a peer) is answered, the connection
//!   closed with [`CLOSE_REFUSED`] and the server goes on accepting.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BufMut as _;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use serde::{Deserialize, Serialize};
use statepoint::frame::{self, FrameError, Limits, FRAME_LEN_PREFIX};
use tokio::io::{AsyncRead, AsyncReadExt as _};
use tokio::sync::mpsc;

use crate::certs::{CertError, TlsIdentity};

/// Magic of the link's hello messages.
pub const HELLO_MAGIC: [u8; 4] = *b"AXRL";
/// Version of the link protocol.
pub const LINK_VERSION: u16 = 1;
/// Largest hello message accepted.
pub const MAX_HELLO: u32 = 64 << 10;
/// How long a connecting peer has, from its first packet, to complete the handshake and send its hello.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// Application close code: the secondary refused the session (the reason names why).
pub const CLOSE_REFUSED: u32 = 1;
/// Application close code: the peer broke the protocol (no hello in time, a malformed hello).
pub const CLOSE_PROTOCOL: u32 = 2;
/// Application close code: the secondary left the pair (it acknowledged an epoch it then could not
/// commit; the reason names the epoch and the error).
pub const CLOSE_LEFT: u32 = 3;

/// Decides whether a hello may open a session: `Err(reason)` refuses it (the reason goes back to the
/// primary and into the log).
pub type Admission = Arc<dyn Fn(&Hello) -> Result<(), String> + Send + Sync>;

/// Most connections at once between their first packet and a complete hello; beyond it new ones are
/// refused outright (each costs a task and TLS state for up to the hello timeout).
const MAX_PENDING_HELLOS: usize = 64;
/// Sessions with a complete hello waiting for [`LinkServer::accept`].
const READY_SESSIONS: usize = 8;
/// How long a refused primary has to read its refusal before the connection is closed.
const REFUSAL_LINGER: Duration = Duration::from_secs(1);
/// Longest a frame may go without a byte arriving once its first byte did.
const FRAME_STALL: Duration = Duration::from_secs(10);
/// Most bytes a frame's buffer grows ahead of what arrived.
pub const READ_CHUNK: usize = 1 << 20;

/// Link errors.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// TLS or QUIC configuration.
    #[error(transparent)]
    Config(#[from] CertError),
    /// The endpoint could not bind.
    #[error("binding {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// Connecting failed (including a refused certificate).
    #[error("connecting to {peer} ({name}): {reason}")]
    Connect {
        /// Peer address.
        peer: SocketAddr,
        /// Expected server name.
        name: String,
        /// Why.
        reason: String,
    },
    /// The connection or stream failed.
    #[error("replication stream: {0}")]
    Stream(String),
    /// The peer sent something malformed.
    #[error("peer protocol error: {0}")]
    Protocol(String),
    /// The secondary refused the session.
    #[error("the secondary refused the session: {0}")]
    Refused(String),
    /// A frame failed validation.
    #[error(transparent)]
    Frame(#[from] FrameError),
}

fn stream_err(e: impl std::fmt::Display) -> LinkError {
    LinkError::Stream(e.to_string())
}

/// First message of a session, primary → secondary.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Always [`HELLO_MAGIC`].
    pub magic: [u8; 4],
    /// Always [`LINK_VERSION`].
    pub version: u16,
    /// The VM.
    pub vm: String,
    /// The primary's host name.
    pub host: String,
    /// Guest memory size.
    pub mem_size: u64,
    /// Disk size in bytes (0: no disk).
    pub disk_bytes: u64,
    /// The primary's output generation (from the witness).
    pub generation: u64,
    /// The first epoch the primary will send.
    pub first_epoch: u64,
}

impl Hello {
    /// A hello for `vm`.
    pub fn new(vm: &str, host: &str, mem_size: u64, disk_bytes: u64, generation: u64) -> Self {
        Hello {
            magic: HELLO_MAGIC,
            version: LINK_VERSION,
            vm: vm.to_owned(),
            host: host.to_owned(),
            mem_size,
            disk_bytes,
            generation,
            first_epoch: 0,
        }
    }
}

/// The secondary's answer to a hello.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelloReply {
    /// Whether the session goes ahead.
    pub accepted: bool,
    /// Why not, when refused.
    pub reason: String,
}

/// Largest UDP payload the link sends or accepts: jumbo frames (9000-byte MTU) less IPv6 and UDP
/// headers. Replication networks often run jumbo frames; QUIC's per-packet cost is most of its CPU, so
/// 6× fewer packets is most of its throughput (see `bench/` failover).
const MAX_UDP_PAYLOAD: u16 = 8952;
/// Most bytes one GSO send may carry (a UDP datagram's 64 KiB, less headers).
const MAX_GSO_BYTES: usize = 65_000;
/// Receive buffer asked for (root may exceed `net.core.rmem_max`): a burst of a few epochs' frames at
/// 10 Gbit/s must fit, or the receiver drops packets and congestion control backs off.
const SOCKET_BUFFER: usize = 16 << 20;

/// QUIC transport settings sized for checkpoint streams (tens of MB/s, bursts of several MB per epoch).
fn transport() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.stream_receive_window(quinn::VarInt::from_u32(64 << 20));
    t.receive_window(quinn::VarInt::from_u32(128 << 20));
    t.send_window(128 << 20);
    t.keep_alive_interval(Some(Duration::from_millis(500)));
    // Probe up to jumbo frames; on a 1500-byte path discovery settles at 1452 after a few lost probes.
    let mut mtud = quinn::MtuDiscoveryConfig::default();
    mtud.upper_bound(MAX_UDP_PAYLOAD);
    t.mtu_discovery_config(Some(mtud));
    if let Ok(idle) = quinn::IdleTimeout::try_from(Duration::from_secs(5)) {
        t.max_idle_timeout(Some(idle));
    }
    t
}

fn endpoint(
    addr: SocketAddr,
    server: Option<quinn::ServerConfig>,
) -> std::io::Result<quinn::Endpoint> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    force_recv_buffer(&socket, SOCKET_BUFFER);
    socket.bind(&addr.into())?;
    let socket: std::net::UdpSocket = socket.into();
    let mut config = quinn::EndpointConfig::default();
    config
        .max_udp_payload_size(MAX_UDP_PAYLOAD)
        .map_err(std::io::Error::other)?;
    let runtime =
        quinn::default_runtime().ok_or_else(|| std::io::Error::other("no async runtime"))?;
    let inner = runtime.wrap_udp_socket(socket)?;
    let socket = Arc::new(SplitGso { inner });
    quinn::Endpoint::new_with_abstract_socket(config, server, socket, runtime)
}

/// The largest UDP payload the kernel's route from `bind` to `peer` carries without fragmenting (its
/// interface MTU less IP and UDP headers), capped at [`MAX_UDP_PAYLOAD`]; `None` if unknown or below
/// QUIC's 1200-byte minimum.
fn route_mtu(bind: SocketAddr, peer: SocketAddr) -> Option<u16> {
    use std::os::fd::AsRawFd as _;
    let probe = std::net::UdpSocket::bind(SocketAddr::new(bind.ip(), 0)).ok()?;
    probe.connect(peer).ok()?;
    let (level, opt, headers) = if peer.is_ipv4() {
        (libc::IPPROTO_IP, libc::IP_MTU, 28)
    } else {
        (libc::IPPROTO_IPV6, libc::IPV6_MTU, 48)
    };
    let mut mtu: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: a connected UDP socket; `mtu` and `len` are valid for the c_int the option returns.
    let rc = unsafe {
        libc::getsockopt(
            probe.as_raw_fd(),
            level,
            opt,
            (&mut mtu as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return None;
    }
    let payload = u16::try_from(mtu.saturating_sub(headers))
        .unwrap_or(u16::MAX)
        .min(MAX_UDP_PAYLOAD);
    (payload >= 1200).then_some(payload)
}

/// Raises the socket's receive buffer to `bytes`: as root past `net.core.rmem_max`
/// (`SO_RCVBUFFORCE`), else as far as that cap allows. The send buffer stays at the default, so a full
/// interface queue slows the sender down (as with TCP) instead of dropping its packets.
fn force_recv_buffer(socket: &socket2::Socket, bytes: usize) {
    use std::os::fd::AsRawFd as _;
    let v = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    // SAFETY: a valid socket and a c_int option value of the right size.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        if let Err(e) = socket.set_recv_buffer_size(bytes) {
            tracing::debug!(error = %e, "replication socket keeps its default receive buffer");
        }
    }
}

/// A UDP socket that splits a GSO batch into sends of at most [`MAX_GSO_BYTES`], the 64 KiB one UDP
/// send can carry. The patched quinn (`vendor/quinn`) batches up to 64 datagrams per transmit, the
/// kernel's segment limit: 93 KB at a 1500-byte MTU, 573 KB with jumbo frames. Large batches are what
/// makes QUIC cheap per byte at 1500 bytes (one `sendmsg` and one receive-side GRO batch per 44
/// datagrams instead of per 10).
#[derive(Debug)]
struct SplitGso {
    inner: Arc<dyn quinn::AsyncUdpSocket>,
}

impl quinn::AsyncUdpSocket for SplitGso {
    fn create_io_poller(self: Arc<Self>) -> std::pin::Pin<Box<dyn quinn::UdpPoller>> {
        Arc::clone(&self.inner).create_io_poller()
    }

    fn try_send(&self, transmit: &quinn::udp::Transmit) -> std::io::Result<()> {
        let Some(seg) = transmit.segment_size.filter(|&s| s > 0) else {
            return self.inner.try_send(transmit);
        };
        let per_send = (MAX_GSO_BYTES / seg).max(1) * seg;
        if transmit.contents.len() <= per_send {
            return self.inner.try_send(transmit);
        }
        for (i, part) in transmit.contents.chunks(per_send).enumerate() {
            let t = quinn::udp::Transmit {
                destination: transmit.destination,
                ecn: transmit.ecn,
                contents: part,
                segment_size: (part.len() > seg).then_some(seg),
                src_ip: transmit.src_ip,
            };
            match self.inner.try_send(&t) {
                Ok(()) => {}
                // Part of the batch went: the rest is lost as on a full queue, and QUIC resends it
                // (quinn checked writability just before, so this is rare).
                Err(e) if i > 0 && e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn poll_recv(
        &self,
        cx: &mut std::task::Context,
        bufs: &mut [std::io::IoSliceMut<'_>],
        meta: &mut [quinn::udp::RecvMeta],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.inner.poll_recv(cx, bufs, meta)
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.inner.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}

async fn write_msg<T: Serialize>(send: &mut quinn::SendStream, msg: &T) -> Result<(), LinkError> {
    let body = postcard::to_stdvec(msg).map_err(|e| LinkError::Protocol(e.to_string()))?;
    let len = u32::try_from(body.len())
        .ok()
        .filter(|&l| l <= MAX_HELLO)
        .ok_or_else(|| LinkError::Protocol(format!("message of {} bytes", body.len())))?;
    send.write_all(&len.to_le_bytes())
        .await
        .map_err(stream_err)?;
    send.write_all(&body).await.map_err(stream_err)
}

async fn read_msg<T: for<'de> Deserialize<'de>, R: AsyncRead + Unpin>(
    recv: &mut R,
) -> Result<T, LinkError> {
    let mut len = [0u8; 4];
    recv.read_exact(&mut len).await.map_err(stream_err)?;
    let len = u32::from_le_bytes(len);
    if len > MAX_HELLO {
        return Err(LinkError::Protocol(format!(
            "message length {len} over the limit {MAX_HELLO}"
        )));
    }
    // The body grows as it arrives (read_to_end), not by the declared length.
    let mut body = Vec::new();
    recv.take(u64::from(len))
        .read_to_end(&mut body)
        .await
        .map_err(stream_err)?;
    if body.len() != len as usize {
        return Err(LinkError::Protocol(format!(
            "message ended after {} of {len} bytes",
            body.len()
        )));
    }
    postcard::from_bytes(&body).map_err(|e| LinkError::Protocol(format!("bad message: {e}")))
}

/// `read` within `stall`, as a link error naming how far into a frame of `of` bytes it was.
async fn within<T>(
    stall: Duration,
    got: usize,
    of: u64,
    read: impl std::future::Future<Output = std::io::Result<T>>,
) -> Result<T, LinkError> {
    tokio::time::timeout(stall, read)
        .await
        .map_err(|_| {
            LinkError::Stream(format!(
                "no byte for {stall:?} at {got} of a {of}-byte frame"
            ))
        })?
        .map_err(stream_err)
}

/// Reads one frame from `recv` into `buf` (cleared first): `Ok(false)` when the stream ended cleanly
/// before a frame began. The header's `total_len` is checked against `limits` (what a frame of this VM
/// can be) before any body byte is read, and `buf` grows with the bytes that arrive, at most
/// [`READ_CHUNK`] ahead of them: a header declaring a huge frame costs nothing until the bytes come.
/// The wait for a frame's first byte is not bounded (frames come when epochs end); once it arrived,
/// `stall` without a byte is an error.
pub async fn read_frame_into<R: AsyncRead + Unpin>(
    recv: &mut R,
    limits: &Limits,
    stall: Duration,
    buf: &mut Vec<u8>,
) -> Result<bool, LinkError> {
    buf.clear();
    let mut header = [0u8; FRAME_LEN_PREFIX];
    let mut got = 0;
    while got < FRAME_LEN_PREFIX {
        let n = if got == 0 {
            recv.read(&mut header).await.map_err(stream_err)?
        } else {
            within(
                stall,
                got,
                FRAME_LEN_PREFIX as u64,
                recv.read(&mut header[got..]),
            )
            .await?
        };
        if n == 0 {
            if got == 0 {
                return Ok(false);
            }
            return Err(LinkError::Stream(format!(
                "the stream ended {got} bytes into a frame header"
            )));
        }
        got += n;
    }
    let declared = frame::frame_len(&header, limits)?;
    let len = usize::try_from(declared).map_err(|_| LinkError::Protocol("frame length".into()))?;
    if len < FRAME_LEN_PREFIX {
        return Err(LinkError::Protocol(format!("frame length {len}")));
    }
    buf.extend_from_slice(&header);
    while buf.len() < len {
        let filled = buf.len();
        if buf.capacity() == filled {
            // Geometric growth (few copies for large frames), bounded by what arrived: to twice
            // it, or it plus one chunk; never past the declared length.
            let target = (filled + READ_CHUNK).max(filled.saturating_mul(2)).min(len);
            buf.reserve_exact(target - filled);
        }
        let room = (buf.capacity() - filled).min(len - filled);
        let n = within(
            stall,
            filled,
            declared,
            recv.read_buf(&mut (&mut *buf).limit(room)),
        )
        .await?;
        if n == 0 {
            return Err(LinkError::Stream(format!(
                "the stream ended {filled} bytes into a {len}-byte frame"
            )));
        }
    }
    Ok(true)
}

/// The secondary's listening endpoint. A task accepts connections; each gets its handshake and hello
/// done in a task of its own within the hello timeout, and only sessions with a complete, admitted
/// hello reach [`LinkServer::accept`].
#[derive(Debug)]
pub struct LinkServer {
    endpoint: quinn::Endpoint,
    ready: tokio::sync::Mutex<mpsc::Receiver<InboundSession>>,
    acceptor: tokio::task::JoinHandle<()>,
}

impl LinkServer {
    /// Listens on `addr` (port 0: any) with `identity`; only peers with a cluster-CA certificate get in.
    /// Every well-formed hello is admitted, and each peer has [`HELLO_TIMEOUT`] to send its hello.
    /// Must be called within a tokio runtime.
    pub fn bind(addr: SocketAddr, identity: &TlsIdentity) -> Result<Self, LinkError> {
        Self::bind_with(addr, identity, Arc::new(|_: &Hello| Ok(())), HELLO_TIMEOUT)
    }

    /// [`LinkServer::bind`] admitting only the hellos `admit` accepts, each peer having `hello_timeout`
    /// from its first packet to complete the handshake and send its hello.
    pub fn bind_with(
        addr: SocketAddr,
        identity: &TlsIdentity,
        admit: Admission,
        hello_timeout: Duration,
    ) -> Result<Self, LinkError> {
        let crypto = QuicServerConfig::try_from(identity.rustls_server()?)
            .map_err(|e| CertError::Quic(e.to_string()))?;
        let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        config.transport_config(Arc::new(transport()));
        let endpoint =
            endpoint(addr, Some(config)).map_err(|source| LinkError::Bind { addr, source })?;
        let (tx, rx) = mpsc::channel(READY_SESSIONS);
        let acceptor = tokio::spawn(accept_loop(endpoint.clone(), admit, hello_timeout, tx));
        Ok(LinkServer {
            endpoint,
            ready: tokio::sync::Mutex::new(rx),
            acceptor,
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> Result<SocketAddr, LinkError> {
        self.endpoint.local_addr().map_err(stream_err)
    }

    /// Waits for the next session: a connection whose TLS handshake succeeded and whose first stream
    /// carried a well-formed, admitted hello in time. Everything else (failed handshakes, peers without
    /// a valid certificate, silent peers, malformed or refused hellos) is logged and dropped without
    /// delaying other peers; sessions whose primary has gone away while they waited are skipped.
    /// `None` when the endpoint is closed.
    pub async fn accept(&self) -> Option<InboundSession> {
        let mut ready = self.ready.lock().await;
        loop {
            let session = ready.recv().await?;
            match session.connection.close_reason() {
                None => return Some(session),
                Some(e) => {
                    tracing::debug!(peer = %session.peer(), error = %e, "a waiting replication session closed");
                }
            }
        }
    }

    /// Stops accepting and closes every connection.
    pub fn close(&self) {
        self.endpoint.close(0u32.into(), b"closing");
    }
}

impl Drop for LinkServer {
    fn drop(&mut self) {
        // Ends the hello tasks too (the acceptor owns them).
        self.acceptor.abort();
    }
}

/// Accepts connections until the endpoint closes, each in a task of its own (at most
/// [`MAX_PENDING_HELLOS`] at once), and hands complete sessions to `ready`.
async fn accept_loop(
    endpoint: quinn::Endpoint,
    admit: Admission,
    hello_timeout: Duration,
    ready: mpsc::Sender<InboundSession>,
) {
    let pending = Arc::new(tokio::sync::Semaphore::new(MAX_PENDING_HELLOS));
    let mut hellos = tokio::task::JoinSet::new();
    loop {
        let incoming = tokio::select! {
            incoming = endpoint.accept() => incoming,
            Some(_) = hellos.join_next(), if !hellos.is_empty() => continue,
        };
        let Some(incoming) = incoming else {
            break; // closed: dropping `hellos` ends the hellos in progress
        };
        let Ok(permit) = Arc::clone(&pending).try_acquire_owned() else {
            tracing::warn!(peer = %incoming.remote_address(), "too many replication handshakes in progress: refused");
            incoming.refuse();
            continue;
        };
        let admit = Arc::clone(&admit);
        let ready = ready.clone();
        hellos.spawn(async move {
            welcome(incoming, admit.as_ref(), hello_timeout, ready).await;
            drop(permit);
        });
    }
}

/// One connection: handshake and hello within `hello_timeout`, admission, then into `ready` (waiting
/// at most `hello_timeout` for room there too).
async fn welcome(
    incoming: quinn::Incoming,
    admit: &(dyn Fn(&Hello) -> Result<(), String> + Send + Sync),
    hello_timeout: Duration,
    ready: mpsc::Sender<InboundSession>,
) {
    let peer = incoming.remote_address();
    let deadline = tokio::time::Instant::now() + hello_timeout;
    let connection = match tokio::time::timeout_at(deadline, incoming).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            tracing::warn!(%peer, error = %e, "replication handshake refused");
            return;
        }
        Err(_) => {
            tracing::warn!(%peer, timeout = ?hello_timeout, "replication handshake did not complete in time");
            return;
        }
    };
    let session = match tokio::time::timeout_at(deadline, InboundSession::open(connection.clone()))
        .await
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::warn!(%peer, error = %e, "replication session without a valid hello: dropped");
            connection.close(CLOSE_PROTOCOL.into(), b"malformed hello");
            return;
        }
        Err(_) => {
            tracing::warn!(%peer, timeout = ?hello_timeout, "no replication hello in time: dropped");
            connection.close(CLOSE_PROTOCOL.into(), b"no hello in time");
            return;
        }
    };
    if let Err(reason) =
        certified_as(&connection, &session.hello.host).and_then(|()| admit(&session.hello))
    {
        tracing::warn!(
            %peer,
            host = %session.hello.host,
            vm = %session.hello.vm,
            %reason,
            "refused a replication session"
        );
        session.refuse(&reason).await;
        return;
    }
    if let Err(e) = ready.send_timeout(session, hello_timeout).await {
        let session = match e {
            mpsc::error::SendTimeoutError::Timeout(s)
            | mpsc::error::SendTimeoutError::Closed(s) => s,
        };
        tracing::warn!(%peer, host = %session.hello.host, "no room for another replication session: refused");
        session.refuse("the secondary is busy").await;
    }
}

/// Checks that the peer's certificate (verified against the cluster CA by the handshake) is `host`'s:
/// one certified host cannot speak for another in its hello.
fn certified_as(connection: &quinn::Connection, host: &str) -> Result<(), String> {
    let names = connection
        .peer_identity()
        .and_then(|id| {
            id.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
                .ok()
        })
        .and_then(|certs| certs.first().map(|c| certificate_names(c.as_ref())))
        .unwrap_or_default();
    if names.iter().any(|n| n == host) {
        Ok(())
    } else {
        Err(format!(
            "the hello names host {host:?} but the peer's certificate is for {names:?}"
        ))
    }
}

/// The DNS names and common names a DER certificate is for.
pub fn certificate_names(der: &[u8]) -> Vec<String> {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return Vec::new();
    };
    let mut names: Vec<String> = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    x509_parser::extensions::GeneralName::DNSName(d) => Some(d.to_string()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    names.extend(
        cert.subject()
            .iter_common_name()
            .filter_map(|cn| cn.as_str().ok().map(str::to_string)),
    );
    names
}

/// One session on the secondary: a VM's frames in, acks out.
#[derive(Debug)]
pub struct InboundSession {
    connection: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    /// The primary's hello.
    pub hello: Hello,
    buf: Vec<u8>,
}

impl InboundSession {
    async fn open(connection: quinn::Connection) -> Result<Self, LinkError> {
        let (send, mut recv) = connection.accept_bi().await.map_err(stream_err)?;
        let hello: Hello = read_msg(&mut recv).await?;
        if hello.magic != HELLO_MAGIC || hello.version != LINK_VERSION {
            return Err(LinkError::Protocol(format!(
                "hello magic {:?} version {} (expected {:?} {LINK_VERSION})",
                hello.magic, hello.version, HELLO_MAGIC
            )));
        }
        Ok(InboundSession {
            connection,
            send,
            recv,
            hello,
            buf: Vec::new(),
        })
    }

    /// The primary's address.
    pub fn peer(&self) -> SocketAddr {
        self.connection.remote_address()
    }

    /// Refuses the session: answers the hello with `reason`, gives the primary a moment to read it,
    /// then closes the connection with [`CLOSE_REFUSED`] and the reason.
    async fn refuse(mut self, reason: &str) {
        let reply = HelloReply {
            accepted: false,
            reason: reason.to_owned(),
        };
        let _ = tokio::time::timeout(REFUSAL_LINGER, async {
            if write_msg(&mut self.send, &reply).await.is_ok() {
                let _ = self.send.finish();
                self.connection.closed().await; // the primary closes once it read the refusal
            }
        })
        .await;
        let mut why = reason.as_bytes();
        why = &why[..why.len().min(256)];
        self.connection.close(CLOSE_REFUSED.into(), why);
    }

    /// Answers the hello.
    pub async fn reply(&mut self, reply: &HelloReply) -> Result<(), LinkError> {
        write_msg(&mut self.send, reply).await
    }

    /// The next frame, validated for length against `limits` (the caller decodes it fully); `None` when
    /// the primary finished the stream cleanly.
    /// Memory is taken as the frame's bytes arrive (see [`read_frame_into`]); a frame that stalls for
    /// 10 s once begun is an error.
    pub async fn next_frame(&mut self, limits: &Limits) -> Result<Option<&[u8]>, LinkError> {
        if read_frame_into(&mut self.recv, limits, FRAME_STALL, &mut self.buf).await? {
            Ok(Some(&self.buf))
        } else {
            Ok(None)
        }
    }

    /// Leaves the pair: closes the connection with [`CLOSE_LEFT`] and `reason` (at most 256 bytes of
    /// it), so the primary stops waiting for acknowledgements at once.
    pub fn leave(&self, reason: &str) {
        let why = reason.as_bytes();
        self.connection
            .close(CLOSE_LEFT.into(), &why[..why.len().min(256)]);
    }

    /// Acknowledges `epoch` (stored whole on this side).
    pub async fn ack(&mut self, epoch: u64) -> Result<(), LinkError> {
        self.send
            .write_all(&epoch.to_le_bytes())
            .await
            .map_err(stream_err)
    }
}

/// The primary's side of the link.
#[derive(Debug)]
pub struct LinkClient {
    endpoint: quinn::Endpoint,
    config: quinn::ClientConfig,
    bind: SocketAddr,
}

impl LinkClient {
    /// A client endpoint bound to `bind` (port 0: any) presenting `identity`.
    pub fn new(bind: SocketAddr, identity: &TlsIdentity) -> Result<Self, LinkError> {
        let crypto = QuicClientConfig::try_from(identity.rustls_client()?)
            .map_err(|e| CertError::Quic(e.to_string()))?;
        let endpoint =
            endpoint(bind, None).map_err(|source| LinkError::Bind { addr: bind, source })?;
        Ok(LinkClient {
            endpoint,
            config: quinn::ClientConfig::new(Arc::new(crypto)),
            bind,
        })
    }

    /// Connects to the secondary `peer`, whose certificate must name `server_name`, and opens a session.
    pub async fn connect(
        &self,
        peer: SocketAddr,
        server_name: &str,
        hello: &Hello,
    ) -> Result<OutboundSession, LinkError> {
        let connect_err = |reason: String| LinkError::Connect {
            peer,
            name: server_name.to_owned(),
            reason,
        };
        // Start at the MTU of the route to the peer rather than QUIC's 1200-byte floor: discovery
        // would take seconds to climb, and the first epochs (the initial sync) are the biggest.
        let mut transport = transport();
        if let Some(mtu) = route_mtu(self.bind, peer) {
            transport.initial_mtu(mtu);
        }
        let mut config = self.config.clone();
        config.transport_config(Arc::new(transport));
        let connection = self
            .endpoint
            .connect_with(config, peer, server_name)
            .map_err(|e| connect_err(e.to_string()))?
            .await
            .map_err(|e| connect_err(e.to_string()))?;
        let (mut send, mut recv) = connection.open_bi().await.map_err(stream_err)?;
        write_msg(&mut send, hello).await?;
        let reply: HelloReply = match read_msg(&mut recv).await {
            Ok(r) => r,
            // Closed with a refusal before the answer was read: the close carries the reason.
            Err(e) => {
                return Err(match connection.close_reason() {
                    Some(quinn::ConnectionError::ApplicationClosed(c))
                        if c.error_code == CLOSE_REFUSED.into() =>
                    {
                        LinkError::Refused(String::from_utf8_lossy(&c.reason).into_owned())
                    }
                    _ => e,
                })
            }
        };
        if !reply.accepted {
            return Err(LinkError::Refused(reply.reason));
        }
        Ok(OutboundSession {
            connection,
            frames: FrameSender { send },
            acks: AckReceiver { recv },
        })
    }
}

/// A session on the primary.
#[derive(Debug)]
pub struct OutboundSession {
    connection: quinn::Connection,
    /// Sends frames.
    pub frames: FrameSender,
    /// Receives acks.
    pub acks: AckReceiver,
}

impl OutboundSession {
    /// The connection's current round-trip estimate.
    pub fn rtt(&self) -> Duration {
        self.connection.rtt()
    }

    /// Splits into the frame half and the ack half (to run in separate tasks).
    pub fn split(self) -> (FrameSender, AckReceiver, quinn::Connection) {
        (self.frames, self.acks, self.connection)
    }
}

/// Sends frames in order.
#[derive(Debug)]
pub struct FrameSender {
    send: quinn::SendStream,
}

impl FrameSender {
    /// Sends one encoded frame. The frame's buffer is handed to QUIC as is (`Vec<u8>` and `Bytes`
    /// convert without a copy).
    pub async fn send(&mut self, frame: impl Into<bytes::Bytes>) -> Result<(), LinkError> {
        self.send
            .write_chunk(frame.into())
            .await
            .map_err(stream_err)
    }

    /// Ends the stream cleanly.
    pub fn finish(&mut self) -> Result<(), LinkError> {
        self.send.finish().map_err(stream_err)
    }
}

/// Receives acks in order.
#[derive(Debug)]
pub struct AckReceiver {
    recv: quinn::RecvStream,
}

impl AckReceiver {
    /// The next acknowledged epoch; `None` when the secondary ended the stream.
    pub async fn next(&mut self) -> Result<Option<u64>, LinkError> {
        let mut b = [0u8; 8];
        match self.recv.read_exact(&mut b).await {
            Ok(()) => Ok(Some(u64::from_le_bytes(b))),
            Err(quinn::ReadExactError::FinishedEarly(0)) => Ok(None),
            Err(e) => Err(stream_err(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::certs::{issue_host, make_ca, CaPem};
    use statepoint::frame::Encoder;
    use statepoint::ranges::MemoryRangeTable;

    fn identity(ca: &CaPem, host: &str) -> TlsIdentity {
        let h = issue_host(ca, host).unwrap();
        TlsIdentity::from_pem(&ca.cert, &h.cert, &h.key, std::path::Path::new(host)).unwrap()
    }

    const MEM: u64 = 4 << 20;

    /// `n` real frames of a 4 MiB guest whose pages change every epoch.
    fn frames(n: u64) -> Vec<Vec<u8>> {
        let mut enc = Encoder::new(MEM, statepoint::frame::DEFAULT_ZSTD_LEVEL).unwrap();
        let pages = 64u64;
        let ranges = MemoryRangeTable::from_bitmap(&[u64::MAX]);
        (0..n)
            .map(|e| {
                let data: Vec<u8> = (0..pages * 4096).map(|i| (i * 7 + e) as u8).collect();
                let mut out = Vec::new();
                enc.encode(e, &ranges, &data, b"state", &[], b"out\n", &mut out)
                    .unwrap();
                out
            })
            .collect()
    }

    fn localhost() -> SocketAddr {
        "127.0.0.1:0".parse().unwrap()
    }

    /// Records the sizes and segment sizes of what it is asked to send.
    #[derive(Debug, Default)]
    struct Recorder(std::sync::Mutex<Vec<(usize, Option<usize>)>>);

    impl quinn::AsyncUdpSocket for Recorder {
        fn create_io_poller(self: Arc<Self>) -> std::pin::Pin<Box<dyn quinn::UdpPoller>> {
            unimplemented!("not polled in the test")
        }
        fn try_send(&self, t: &quinn::udp::Transmit) -> std::io::Result<()> {
            self.0
                .lock()
                .unwrap()
                .push((t.contents.len(), t.segment_size));
            Ok(())
        }
        fn poll_recv(
            &self,
            _: &mut std::task::Context,
            _: &mut [std::io::IoSliceMut<'_>],
            _: &mut [quinn::udp::RecvMeta],
        ) -> std::task::Poll<std::io::Result<usize>> {
            std::task::Poll::Pending
        }
        fn local_addr(&self) -> std::io::Result<SocketAddr> {
            Ok(SocketAddr::from(([127, 0, 0, 1], 1)))
        }
    }

    #[test]
    fn gso_batches_are_split_into_sends_of_at_most_64_kib() {
        let rec = Arc::new(Recorder::default());
        let split = SplitGso {
            inner: Arc::clone(&rec) as Arc<dyn quinn::AsyncUdpSocket>,
        };
        let send = |len: usize, seg: Option<usize>| {
            let data = vec![0u8; len];
            let t = quinn::udp::Transmit {
                destination: SocketAddr::from(([127, 0, 0, 1], 2)),
                ecn: None,
                contents: &data,
                segment_size: seg,
                src_ip: None,
            };
            quinn::AsyncUdpSocket::try_send(&split, &t).unwrap();
            std::mem::take(&mut *rec.0.lock().unwrap())
        };
        // 64 jumbo datagrams, the last one short: nine sends of 7 segments (62.7 KB), then the last.
        let got = send(63 * 8952 + 100, Some(8952));
        assert_eq!(got.len(), 10);
        assert!(got[..9].iter().all(|&s| s == (7 * 8952, Some(8952))));
        assert_eq!(got[9], (100, None));
        // 64 datagrams of 1472 bytes: 44 + 20.
        assert_eq!(
            send(64 * 1472, Some(1472)),
            vec![(44 * 1472, Some(1472)), (20 * 1472, Some(1472))]
        );
        // One datagram left over goes without a segment size; small batches pass as they are.
        assert_eq!(
            send(45 * 1472, Some(1472)),
            vec![(44 * 1472, Some(1472)), (1472, None)]
        );
        assert_eq!(send(3000, Some(1472)), vec![(3000, Some(1472))]);
        assert_eq!(send(1200, None), vec![(1200, None)]);
    }

    #[tokio::test]
    async fn frames_and_acks_cross_a_mutual_tls_link() {
        let ca = make_ca("test CA").unwrap();
        let server = LinkServer::bind(localhost(), &identity(&ca, "host-b")).unwrap();
        let addr = server.local_addr().unwrap();
        let sent = frames(20);
        let expected = sent.clone();
        let secondary = tokio::spawn(async move {
            let mut s = server.accept().await.unwrap();
            assert_eq!(s.hello.vm, "vm1");
            s.reply(&HelloReply {
                accepted: true,
                reason: String::new(),
            })
            .await
            .unwrap();
            let limits = Limits::for_vm(MEM, 0);
            let mut n = 0u64;
            while let Some(f) = s.next_frame(&limits).await.unwrap() {
                assert_eq!(f, expected[n as usize].as_slice());
                let decoded = frame::decode(f, &limits).unwrap();
                assert_eq!(decoded.epoch, n);
                s.ack(decoded.epoch).await.unwrap();
                n += 1;
            }
            n
        });
        let client = LinkClient::new(localhost(), &identity(&ca, "host-a")).unwrap();
        let session = client
            .connect(addr, "host-b", &Hello::new("vm1", "host-a", MEM, 0, 1))
            .await
            .unwrap();
        let (mut tx, mut acks, _conn) = session.split();
        for f in &sent {
            tx.send(f.clone()).await.unwrap(); // pipelined: no wait for the ack
        }
        for want in 0..sent.len() as u64 {
            assert_eq!(acks.next().await.unwrap(), Some(want));
        }
        tx.finish().unwrap();
        assert_eq!(secondary.await.unwrap(), 20);
    }

    #[tokio::test]
    async fn a_peer_from_another_ca_is_refused() {
        let ca = make_ca("cluster CA").unwrap();
        let rogue = make_ca("rogue CA").unwrap();
        let server = LinkServer::bind(localhost(), &identity(&ca, "host-b")).unwrap();
        let addr = server.local_addr().unwrap();
        tokio::spawn(async move { while server.accept().await.is_some() {} });
        // A client whose certificate the server's CA did not sign.
        let client = LinkClient::new(localhost(), &identity(&rogue, "host-x")).unwrap();
        let r = tokio::time::timeout(
            Duration::from_secs(10),
            client.connect(addr, "host-b", &Hello::new("vm1", "host-x", MEM, 0, 1)),
        )
        .await
        .expect("refusal must not hang");
        assert!(r.is_err(), "a rogue client got a session");
        // A server whose certificate the client's CA did not sign.
        let rogue_server = LinkServer::bind(localhost(), &identity(&rogue, "host-b")).unwrap();
        let raddr = rogue_server.local_addr().unwrap();
        tokio::spawn(async move { while rogue_server.accept().await.is_some() {} });
        let honest = LinkClient::new(localhost(), &identity(&ca, "host-a")).unwrap();
        let err = honest
            .connect(raddr, "host-b", &Hello::new("vm1", "host-a", MEM, 0, 1))
            .await
            .unwrap_err();
        assert!(matches!(err, LinkError::Connect { .. }), "{err}");
    }

    #[tokio::test]
    async fn a_client_without_a_certificate_is_refused() {
        let ca = make_ca("cluster CA").unwrap();
        let server = LinkServer::bind(localhost(), &identity(&ca, "host-b")).unwrap();
        let addr = server.local_addr().unwrap();
        let accepted = tokio::spawn(async move {
            tokio::time::timeout(Duration::from_secs(3), server.accept())
                .await
                .ok()
                .flatten()
                .is_some()
        });
        let mut roots = rustls::RootCertStore::empty();
        let ca_der = rustls::pki_types::CertificateDer::from_pem_slice(ca.cert.as_bytes());
        use rustls::pki_types::pem::PemObject as _;
        roots.add(ca_der.unwrap()).unwrap();
        let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        tls.alpn_protocols = vec![crate::certs::ALPN.to_vec()];
        let mut endpoint = quinn::Endpoint::client(localhost()).unwrap();
        endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(
            QuicClientConfig::try_from(tls).unwrap(),
        )));
        let outcome = async {
            let conn = endpoint.connect(addr, "host-b").ok()?.await.ok()?;
            let (mut send, mut recv) = conn.open_bi().await.ok()?;
            write_msg(&mut send, &Hello::new("vm1", "anon", MEM, 0, 1))
                .await
                .ok()?;
            read_msg::<HelloReply, _>(&mut recv).await.ok()
        };
        let reply = tokio::time::timeout(Duration::from_secs(5), outcome)
            .await
            .ok()
            .flatten();
        assert!(reply.is_none(), "an anonymous client got an answer");
        assert!(
            !accepted.await.unwrap(),
            "the server accepted an anonymous client"
        );
    }

    #[tokio::test]
    async fn oversized_and_garbage_frames_are_errors_not_panics() {
        let ca = make_ca("cluster CA").unwrap();
        let server = LinkServer::bind(localhost(), &identity(&ca, "host-b")).unwrap();
        let addr = server.local_addr().unwrap();
        let secondary = tokio::spawn(async move {
            let mut results = Vec::new();
            for _ in 0..2 {
                let mut s = server.accept().await.unwrap();
                s.reply(&HelloReply {
                    accepted: true,
                    reason: String::new(),
                })
                .await
                .unwrap();
                let limits = Limits {
                    max_frame_bytes: 1 << 16,
                    ..Limits::for_vm(MEM, 0)
                };
                results.push(s.next_frame(&limits).await.map(|f| f.map(<[u8]>::len)));
            }
            results
        });
        let client = LinkClient::new(localhost(), &identity(&ca, "host-a")).unwrap();
        // 1: a real frame larger than the secondary's limit.
        let big: Vec<u8> = {
            let mut enc = Encoder::new(MEM, 0).unwrap();
            let ranges = MemoryRangeTable::from_bitmap(&[u64::MAX; 8]);
            let data: Vec<u8> = (0..512 * 4096u64).map(|i| (i * 131 % 251) as u8).collect();
            let mut out = Vec::new();
            enc.encode(0, &ranges, &data, b"", &[], b"", &mut out)
                .unwrap();
            out
        };
        let mut s = client
            .connect(addr, "host-b", &Hello::new("vm1", "host-a", MEM, 0, 1))
            .await
            .unwrap();
        s.frames.send(big.clone()).await.unwrap();
        // 2: garbage.
        let mut g = client
            .connect(addr, "host-b", &Hello::new("vm2", "host-a", MEM, 0, 1))
            .await
            .unwrap();
        g.frames.send(vec![0xAB; 100]).await.unwrap();
        let results = secondary.await.unwrap();
        assert!(
            matches!(
                &results[0],
                Err(LinkError::Frame(FrameError::TooLarge { .. }))
            ),
            "{:?}",
            results[0]
        );
        assert!(
            matches!(&results[1], Err(LinkError::Frame(_))),
            "{:?}",
            results[1]
        );
    }

    /// A real frame's first bytes with `total_len` replaced: what a peer that declares `len` bytes
    /// sends before the body.
    fn header_declaring(len: u64) -> Vec<u8> {
        let mut h = frames(1).remove(0)[..FRAME_LEN_PREFIX].to_vec();
        h[16..24].copy_from_slice(&len.to_le_bytes());
        h
    }

    /// A raw connection from a certified host that sends nothing at all.
    async fn silent_peer(client: &LinkClient, addr: SocketAddr) -> quinn::Connection {
        client
            .endpoint
            .connect_with(client.config.clone(), addr, "host-b")
            .unwrap()
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn a_declared_length_allocates_nothing_before_the_body_arrives() {
        let ca = make_ca("cluster CA").unwrap();
        let server = LinkServer::bind(localhost(), &identity(&ca, "host-b")).unwrap();
        let addr = server.local_addr().unwrap();
        // The limits of a 256 MiB guest: its largest frame is over 500 MB.
        let limits = Limits::for_vm(256 << 20, 0);
        let declared = limits.max_frame_bytes - 1;
        assert!(declared > 500 << 20);
        let secondary = tokio::spawn(async move {
            let mut s = server.accept().await.unwrap();
            s.reply(&HelloReply {
                accepted: true,
                reason: String::new(),
            })
            .await
            .unwrap();
            let r = tokio::time::timeout(Duration::from_secs(2), s.next_frame(&limits)).await;
            assert!(
                !matches!(r, Ok(Ok(Some(_)))),
                "a frame came out of 64 bytes"
            );
            s.buf.capacity()
        });
        let client = LinkClient::new(localhost(), &identity(&ca, "host-a")).unwrap();
        let session = client
            .connect(
                addr,
                "host-b",
                &Hello::new("vm1", "host-a", 256 << 20, 0, 1),
            )
            .await
            .unwrap();
        let (mut tx, _acks, _conn) = session.split();
        let mut bytes = header_declaring(declared);
        bytes.extend_from_slice(&[0u8; 40]);
        tx.send(bytes).await.unwrap();
        let capacity = secondary.await.unwrap();
        assert!(
            capacity <= 2 << 20,
            "a {declared}-byte header made the receiver allocate {capacity} bytes"
        );
    }

    #[tokio::test]
    async fn a_silent_peer_does_not_delay_another() {
        let ca = make_ca("cluster CA").unwrap();
        let server = LinkServer::bind(localhost(), &identity(&ca, "host-b")).unwrap();
        let addr = server.local_addr().unwrap();
        let secondary = tokio::spawn(async move {
            let mut s = server.accept().await.unwrap();
            s.reply(&HelloReply {
                accepted: true,
                reason: String::new(),
            })
            .await
            .unwrap();
            (s.hello.host.clone(), s, server)
        });
        // A certified host that completes the handshake and says nothing.
        let mute = LinkClient::new(localhost(), &identity(&ca, "host-x")).unwrap();
        let silent = silent_peer(&mute, addr).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let client = LinkClient::new(localhost(), &identity(&ca, "host-a")).unwrap();
        let t = std::time::Instant::now();
        let session = tokio::time::timeout(
            Duration::from_secs(2),
            client.connect(addr, "host-b", &Hello::new("vm1", "host-a", MEM, 0, 1)),
        )
        .await
        .expect("a silent peer delayed a legitimate one")
        .unwrap();
        assert!(t.elapsed() < Duration::from_secs(2));
        let (host, _s, _server) = secondary.await.unwrap();
        assert_eq!(host, "host-a");
        // The silent one is dropped once the hello timeout has passed.
        let closed = tokio::time::timeout(HELLO_TIMEOUT + Duration::from_secs(3), silent.closed())
            .await
            .expect("the silent peer was never dropped");
        assert!(
            matches!(closed, quinn::ConnectionError::ApplicationClosed(ref c) if c.error_code == CLOSE_PROTOCOL.into()),
            "{closed}"
        );
        drop(session);
    }

    /// A server on host-b admitting `peers`; a client whose certificate is for `cert` connects saying
    /// it is `says` and must be refused, with `why` in the reason, without hanging; then host-a
    /// connects and is served (accepting went on).
    async fn refused_then_host_a_served(
        peers: &'static [&'static str],
        cert: &str,
        says: &str,
        why: &str,
    ) {
        let ca = make_ca("cluster CA").unwrap();
        let admit: Admission = Arc::new(move |h: &Hello| {
            if peers.contains(&h.host.as_str()) {
                Ok(())
            } else {
                Err(format!("host {:?} is not among this host's peers", h.host))
            }
        });
        let server =
            LinkServer::bind_with(localhost(), &identity(&ca, "host-b"), admit, HELLO_TIMEOUT)
                .unwrap();
        let addr = server.local_addr().unwrap();
        let secondary = tokio::spawn(async move {
            let mut s = server.accept().await.unwrap();
            s.reply(&HelloReply {
                accepted: true,
                reason: String::new(),
            })
            .await
            .unwrap();
            (s.hello.host.clone(), s)
        });
        let liar = LinkClient::new(localhost(), &identity(&ca, cert)).unwrap();
        let err = tokio::time::timeout(
            Duration::from_secs(5),
            liar.connect(addr, "host-b", &Hello::new("vm1", says, MEM, 0, 1)),
        )
        .await
        .expect("a refusal must not hang")
        .unwrap_err();
        assert!(
            matches!(&err, LinkError::Refused(r) if r.contains(why)),
            "{err}"
        );
        let a = LinkClient::new(localhost(), &identity(&ca, "host-a")).unwrap();
        let _session = tokio::time::timeout(
            Duration::from_secs(5),
            a.connect(addr, "host-b", &Hello::new("vm1", "host-a", MEM, 0, 1)),
        )
        .await
        .expect("the server stopped accepting")
        .unwrap();
        let (host, _s) = secondary.await.unwrap();
        assert_eq!(host, "host-a");
    }

    #[tokio::test]
    async fn a_hello_from_an_unknown_host_is_refused_and_accepting_goes_on() {
        // Certified, but not a peer of this host.
        refused_then_host_a_served(&["host-a"], "host-x", "host-x", "\"host-x\"").await;
    }

    #[tokio::test]
    async fn a_certified_host_cannot_speak_for_another_peer() {
        // host-c is a peer, but its certificate says host-c: it may not say it is host-a.
        refused_then_host_a_served(
            &["host-a", "host-c"],
            "host-c",
            "host-a",
            "certificate is for [\"host-c\"",
        )
        .await;
    }

    #[tokio::test]
    async fn read_frame_into_grows_with_the_bytes_that_arrive() {
        let limits = Limits::for_vm(256 << 20, 0);
        let declared = limits.max_frame_bytes;
        // A header declaring the largest frame, then a few bytes, then silence.
        let (mut tx, mut rx) = tokio::io::duplex(1 << 16);
        use tokio::io::AsyncWriteExt as _;
        tx.write_all(&header_declaring(declared)).await.unwrap();
        tx.write_all(&[7u8; 100]).await.unwrap();
        let mut buf = Vec::new();
        let stall = Duration::from_millis(200);
        let err = read_frame_into(&mut rx, &limits, stall, &mut buf)
            .await
            .unwrap_err();
        assert!(matches!(err, LinkError::Stream(_)), "{err}");
        assert_eq!(buf.len(), FRAME_LEN_PREFIX + 100);
        assert!(
            buf.capacity() <= FRAME_LEN_PREFIX + READ_CHUNK,
            "{}",
            buf.capacity()
        );
        // The stream ending inside a frame is an error, too; a header over the limit is refused
        // before anything is read for it.
        let (mut tx, mut rx) = tokio::io::duplex(1 << 16);
        tx.write_all(&header_declaring(declared)).await.unwrap();
        tx.write_all(&[7u8; 10]).await.unwrap();
        drop(tx);
        let err = read_frame_into(&mut rx, &limits, stall, &mut buf)
            .await
            .unwrap_err();
        assert!(
            matches!(&err, LinkError::Stream(m) if m.contains("ended")),
            "{err}"
        );
        let (mut tx, mut rx) = tokio::io::duplex(1 << 16);
        tx.write_all(&header_declaring(declared + 1)).await.unwrap();
        let err = read_frame_into(&mut rx, &limits, stall, &mut buf)
            .await
            .unwrap_err();
        assert!(
            matches!(err, LinkError::Frame(FrameError::TooLarge { .. })),
            "{err}"
        );
        // Real frames, split anywhere, come out whole; a clean end between frames is `false`.
        let sent = frames(3);
        let (mut tx, mut rx) = tokio::io::duplex(4096);
        let all: Vec<u8> = sent.concat();
        let writer = tokio::spawn(async move {
            for piece in all.chunks(1000) {
                tx.write_all(piece).await.unwrap();
            }
        });
        let limits = Limits::for_vm(MEM, 0);
        for f in &sent {
            assert!(read_frame_into(&mut rx, &limits, stall, &mut buf)
                .await
                .unwrap());
            assert_eq!(&buf, f);
        }
        writer.await.unwrap();
        assert!(!read_frame_into(&mut rx, &limits, stall, &mut buf)
            .await
            .unwrap());
    }
}
