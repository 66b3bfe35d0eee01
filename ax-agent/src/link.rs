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
//! frames may be in flight (the primary does not wait for ack N before sending N+1). Every message that
//! comes off the wire is length-checked before anything is allocated for it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use serde::{Deserialize, Serialize};
use statepoint::frame::{self, FrameError, Limits, FRAME_LEN_PREFIX};

use crate::certs::{CertError, TlsIdentity};

/// Magic of the link's hello messages.
pub const HELLO_MAGIC: [u8; 4] = *b"AXRL";
/// Version of the link protocol.
pub const LINK_VERSION: u16 = 1;
/// Largest hello message accepted.
pub const MAX_HELLO: u32 = 64 << 10;

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
    let socket = Arc::new(CappedGso {
        max_segments: MAX_GSO_BYTES / usize::from(MAX_UDP_PAYLOAD),
        inner,
    });
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

/// A UDP socket whose GSO batches stay under the 64 KiB one UDP send can carry: quinn batches up to 10
/// datagrams per send, which at jumbo-frame sizes the kernel would refuse.
#[derive(Debug)]
struct CappedGso {
    inner: Arc<dyn quinn::AsyncUdpSocket>,
    max_segments: usize,
}

impl quinn::AsyncUdpSocket for CappedGso {
    fn create_io_poller(self: Arc<Self>) -> std::pin::Pin<Box<dyn quinn::UdpPoller>> {
        Arc::clone(&self.inner).create_io_poller()
    }

    fn try_send(&self, transmit: &quinn::udp::Transmit) -> std::io::Result<()> {
        self.inner.try_send(transmit)
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
        self.inner.max_transmit_segments().min(self.max_segments)
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

async fn read_msg<T: for<'de> Deserialize<'de>>(
    recv: &mut quinn::RecvStream,
) -> Result<T, LinkError> {
    let mut len = [0u8; 4];
    recv.read_exact(&mut len).await.map_err(stream_err)?;
    let len = u32::from_le_bytes(len);
    if len > MAX_HELLO {
        return Err(LinkError::Protocol(format!(
            "message length {len} over the limit {MAX_HELLO}"
        )));
    }
    let mut body = vec![0u8; len as usize];
    recv.read_exact(&mut body).await.map_err(stream_err)?;
    postcard::from_bytes(&body).map_err(|e| LinkError::Protocol(format!("bad message: {e}")))
}

/// The secondary's listening endpoint.
#[derive(Debug)]
pub struct LinkServer {
    endpoint: quinn::Endpoint,
}

impl LinkServer {
    /// Listens on `addr` (port 0: any) with `identity`; only peers with a cluster-CA certificate get in.
    pub fn bind(addr: SocketAddr, identity: &TlsIdentity) -> Result<Self, LinkError> {
        let crypto = QuicServerConfig::try_from(identity.rustls_server()?)
            .map_err(|e| CertError::Quic(e.to_string()))?;
        let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        config.transport_config(Arc::new(transport()));
        let endpoint =
            endpoint(addr, Some(config)).map_err(|source| LinkError::Bind { addr, source })?;
        Ok(LinkServer { endpoint })
    }

    /// The bound address.
    pub fn local_addr(&self) -> Result<SocketAddr, LinkError> {
        self.endpoint.local_addr().map_err(stream_err)
    }

    /// Waits for the next session: a connection whose TLS handshake succeeded and whose first stream
    /// carried a well-formed hello. Handshakes that fail (a peer without a valid certificate) are logged
    /// and skipped. `None` when the endpoint is closed.
    pub async fn accept(&self) -> Option<Result<InboundSession, LinkError>> {
        loop {
            let incoming = self.endpoint.accept().await?;
            let connection = match incoming.await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "replication handshake refused");
                    continue;
                }
            };
            return Some(InboundSession::open(connection).await);
        }
    }

    /// Stops accepting and closes every connection.
    pub fn close(&self) {
        self.endpoint.close(0u32.into(), b"closing");
    }
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

    /// Answers the hello.
    pub async fn reply(&mut self, reply: &HelloReply) -> Result<(), LinkError> {
        write_msg(&mut self.send, reply).await
    }

    /// The next frame, validated for length against `limits` (the caller decodes it fully); `None` when
    /// the primary finished the stream cleanly.
    pub async fn next_frame(&mut self, limits: &Limits) -> Result<Option<&[u8]>, LinkError> {
        self.buf.clear();
        self.buf.resize(FRAME_LEN_PREFIX, 0);
        match self.recv.read_exact(&mut self.buf).await {
            Ok(()) => {}
            Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
            Err(e) => return Err(stream_err(e)),
        }
        let len = frame::frame_len(&self.buf, limits)?;
        let len = usize::try_from(len).map_err(|_| LinkError::Protocol("frame length".into()))?;
        if len < FRAME_LEN_PREFIX {
            return Err(LinkError::Protocol(format!("frame length {len}")));
        }
        self.buf.resize(len, 0);
        self.recv
            .read_exact(&mut self.buf[FRAME_LEN_PREFIX..])
            .await
            .map_err(stream_err)?;
        Ok(Some(&self.buf))
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
        let reply: HelloReply = read_msg(&mut recv).await?;
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

    #[tokio::test]
    async fn frames_and_acks_cross_a_mutual_tls_link() {
        let ca = make_ca("test CA").unwrap();
        let server = LinkServer::bind(localhost(), &identity(&ca, "host-b")).unwrap();
        let addr = server.local_addr().unwrap();
        let sent = frames(20);
        let expected = sent.clone();
        let secondary = tokio::spawn(async move {
            let mut s = server.accept().await.unwrap().unwrap();
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
                .is_some_and(|s| s.is_ok())
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
            read_msg::<HelloReply>(&mut recv).await.ok()
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
                let mut s = server.accept().await.unwrap().unwrap();
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
}
