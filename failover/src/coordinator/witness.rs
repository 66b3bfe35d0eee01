//! The embedded witness of protocol v2: [`Registers`] served over mutual TLS, persisted before every
//! answer that changed them.
//!
//! - **Authenticated.** TLS 1.3 over TCP; the server requires a client certificate chained to the
//!   cluster CA (the caller passes the `rustls::ServerConfig` built from the cluster PKI), and a
//!   [`CasRequest`]'s claimant must be `host#…` with `host` a name the client's certificate is valid
//!   for: a host cannot claim for another. A request without a valid certificate never gets past the
//!   handshake (a forged one is refused), and a captured request replayed on a new connection cannot
//!   complete one (TLS keys are fresh per connection: a replay is refused). Inside a connection every
//!   request carries a sequence number that must grow (a replayed or reordered record is refused
//!   even if TLS let one through).
//! - **Durable.** A change is written with [`super::write_durably`] (fsync, rename, directory fsync)
//!   before it is answered; if the write fails, the change is undone and the answer is "failed".
//! - **Safe when its state is lost.** Started without its state file (and without `init`), it
//!   re-learns (see [`Registers::relearning`]): "unknown", never "lost", until every member host of a
//!   VM has claimed what it knows.
//!
//! ## Wire format
//! Each message is a 4-byte little-endian length (at most [`MAX_MESSAGE`]) and that many bytes of
//! JSON: requests `{"seq": N, "op": {"cas": CasRequest} | {"read": {"vm": …}}}`, responses
//! `{"seq": N, "result": {"cas": CasOutcome} | {"read": Record|null} | {"error": CoordError text and
//! kind}}`. ALPN `ax-coordinator/1`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::pki_types::{CertificateDer, ServerName};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use super::{CasOutcome, CasRequest, CoordError, Coordinator, Record, Registers};

/// ALPN protocol id of the witness.
pub const ALPN: &[u8] = b"ax-coordinator/1";
/// Largest message, in bytes.
pub const MAX_MESSAGE: usize = 4096;
/// A client must finish the TLS handshake and send its first request within this time.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);
/// An idle connection is closed after this time.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Op {
    Cas(CasRequest),
    Read { vm: String },
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct WireRequest {
    seq: u64,
    op: Op,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
enum ErrorKind {
    Invalid,
    Refused,
    Relearning,
    Failed,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum WireResult {
    Cas(CasOutcome),
    Read(Option<Record>),
    Error { kind: ErrorKind, message: String },
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct WireResponse {
    seq: u64,
    result: WireResult,
}

async fn read_message<R: AsyncRead + Unpin>(r: &mut R) -> Result<Vec<u8>, CoordError> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len)
        .await
        .map_err(|e| CoordError::Unreachable(format!("reading a message: {e}")))?;
    let len = u32::from_le_bytes(len) as usize;
    if len == 0 || len > MAX_MESSAGE {
        return Err(CoordError::Malformed(format!(
            "message of {len} bytes (1..={MAX_MESSAGE})"
        )));
    }
    // Bounded by MAX_MESSAGE, checked above.
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf)
        .await
        .map_err(|e| CoordError::Unreachable(format!("reading a message: {e}")))?;
    Ok(buf)
}

async fn write_message<W: AsyncWrite + Unpin, T: Serialize>(
    w: &mut W,
    msg: &T,
) -> Result<(), CoordError> {
    let body = serde_json::to_vec(msg).map_err(|e| CoordError::Malformed(e.to_string()))?;
    if body.len() > MAX_MESSAGE {
        return Err(CoordError::Invalid(format!(
            "message of {} bytes (at most {MAX_MESSAGE})",
            body.len()
        )));
    }
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&u32::try_from(body.len()).unwrap_or(u32::MAX).to_le_bytes());
    out.extend_from_slice(&body);
    w.write_all(&out)
        .await
        .map_err(|e| CoordError::Unreachable(format!("writing a message: {e}")))?;
    w.flush()
        .await
        .map_err(|e| CoordError::Unreachable(format!("writing a message: {e}")))
}

/// Whether the end-entity certificate `cert` is valid for host name `host`.
fn cert_names_host(cert: &CertificateDer<'_>, host: &str) -> bool {
    let Ok(name) = ServerName::try_from(host) else {
        return false;
    };
    webpki::EndEntityCert::try_from(cert)
        .map(|c| c.verify_is_valid_for_subject_name(&name).is_ok())
        .unwrap_or(false)
}

/// Witness settings.
#[derive(Debug, Clone)]
pub struct WitnessConfig {
    /// Listen address.
    pub listen: SocketAddr,
    /// State file.
    pub state_path: PathBuf,
    /// A new cluster: a missing state file starts fresh instead of re-learning.
    pub init: bool,
}

/// A bound witness, not yet serving.
pub struct WitnessServer {
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    regs: Arc<Mutex<Registers>>,
    state_path: PathBuf,
}

impl std::fmt::Debug for WitnessServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WitnessServer")
            .field("listener", &self.listener)
            .field("state_path", &self.state_path)
            .finish_non_exhaustive()
    }
}

/// A serving witness; dropping it stops it.
#[derive(Debug)]
pub struct WitnessHandle {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl WitnessHandle {
    /// The address it serves on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for WitnessHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl WitnessServer {
    /// Loads (or creates) the state and binds. `tls` must require client certificates chained to
    /// the cluster CA (e.g. the agent's `TlsIdentity::rustls_server`); its ALPN is set here.
    pub async fn bind(
        cfg: WitnessConfig,
        mut tls: rustls::ServerConfig,
    ) -> Result<WitnessServer, CoordError> {
        let regs = Registers::load(&cfg.state_path, cfg.init)?;
        if regs.is_relearning() {
            warn!(state = %cfg.state_path.display(), "coordinator witness started without its state: re-learning generations from the hosts' claims");
        }
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let listener = TcpListener::bind(cfg.listen)
            .await
            .map_err(|e| CoordError::Setup(format!("binding {}: {e}", cfg.listen)))?;
        Ok(WitnessServer {
            listener,
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(tls)),
            regs: Arc::new(Mutex::new(regs)),
            state_path: cfg.state_path,
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> Result<SocketAddr, CoordError> {
        self.listener
            .local_addr()
            .map_err(|e| CoordError::Setup(format!("local address: {e}")))
    }

    /// Serves until the handle is dropped. Each connection is served on its own task, so a client
    /// that stalls in its handshake delays nobody.
    pub fn spawn(self) -> Result<WitnessHandle, CoordError> {
        let addr = self.local_addr()?;
        let task = tokio::spawn(async move {
            // Connections live in this set: stopping the witness stops them all.
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let accepted = tokio::select! {
                    a = self.listener.accept() => a,
                    Some(_) = conns.join_next(), if !conns.is_empty() => continue,
                };
                let (tcp, peer) = match accepted {
                    Ok(c) => c,
                    Err(e) => {
                        warn!(error = %e, "coordinator witness: accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let (acceptor, regs, path) = (
                    self.acceptor.clone(),
                    Arc::clone(&self.regs),
                    self.state_path.clone(),
                );
                conns.spawn(async move {
                    if let Err(e) = serve_conn(tcp, acceptor, regs, path).await {
                        debug!(%peer, error = %e, "coordinator witness: connection ended");
                    }
                });
            }
        });
        Ok(WitnessHandle { addr, task })
    }
}

async fn serve_conn(
    tcp: TcpStream,
    acceptor: tokio_rustls::TlsAcceptor,
    regs: Arc<Mutex<Registers>>,
    path: PathBuf,
) -> Result<(), CoordError> {
    let _ = tcp.set_nodelay(true);
    let mut tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp))
        .await
        .map_err(|_| CoordError::Refused("TLS handshake timed out".into()))?
        .map_err(|e| CoordError::Refused(format!("TLS handshake: {e}")))?;
    let cert = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .cloned()
        .ok_or_else(|| CoordError::Refused("no client certificate".into()))?;
    let mut last_seq = 0u64;
    let mut first = true;
    loop {
        let limit = if first {
            HANDSHAKE_TIMEOUT
        } else {
            IDLE_TIMEOUT
        };
        first = false;
        let msg = match tokio::time::timeout(limit, read_message(&mut tls)).await {
            Err(_) => return Ok(()),
            Ok(Err(e @ CoordError::Malformed(_))) => return Err(e),
            Ok(Err(_)) => return Ok(()),
            Ok(Ok(m)) => m,
        };
        let req: WireRequest =
            serde_json::from_slice(&msg).map_err(|e| CoordError::Malformed(e.to_string()))?;
        let seq = req.seq;
        let result = if seq <= last_seq {
            // A replayed or reordered record: refuse it and end the connection.
            let r = WireResult::Error {
                kind: ErrorKind::Refused,
                message: format!("sequence {seq} after {last_seq}"),
            };
            let _ = write_message(&mut tls, &WireResponse { seq, result: r }).await;
            return Err(CoordError::Refused(format!("replayed sequence {seq}")));
        } else {
            last_seq = seq;
            match req.op {
                Op::Cas(c) if !cert_names_host(&cert, c.host()) => WireResult::Error {
                    kind: ErrorKind::Refused,
                    message: format!(
                        "claimant {:?}: the client certificate is not valid for host {:?}",
                        c.claimant,
                        c.host()
                    ),
                },
                Op::Cas(c) => {
                    let (regs, path) = (Arc::clone(&regs), path.clone());
                    // Persisting blocks (fsync): off the async workers, one change at a time.
                    let r = tokio::task::spawn_blocking(move || {
                        let mut g = regs.lock().unwrap_or_else(|e| e.into_inner());
                        let before = g.clone();
                        let (out, changed) = g.cas(&c)?;
                        if changed {
                            if let Err(e) = g.save(&path) {
                                *g = before;
                                return Err(CoordError::Failed(e.to_string()));
                            }
                            info!(vm = %c.vm, claimant = %c.claimant, outcome = ?out, "coordinator witness: register changed");
                        }
                        Ok(out)
                    })
                    .await
                    .map_err(|e| CoordError::Failed(e.to_string()))
                    .and_then(|r| r);
                    match r {
                        Ok(o) => WireResult::Cas(o),
                        Err(e) => error_result(&e),
                    }
                }
                Op::Read { vm } => {
                    let g = regs.lock().unwrap_or_else(|e| e.into_inner());
                    match g.read(&vm) {
                        Ok(r) => WireResult::Read(r),
                        Err(e) => error_result(&e),
                    }
                }
            }
        };
        write_message(&mut tls, &WireResponse { seq, result }).await?;
    }
}

fn error_result(e: &CoordError) -> WireResult {
    let kind = match e {
        CoordError::Invalid(_) | CoordError::Malformed(_) => ErrorKind::Invalid,
        CoordError::Refused(_) => ErrorKind::Refused,
        CoordError::Relearning(_) => ErrorKind::Relearning,
        _ => ErrorKind::Failed,
    };
    WireResult::Error {
        kind,
        message: e.to_string(),
    }
}

type ClientStream = tokio_rustls::client::TlsStream<TcpStream>;

/// A client of the witness. Keeps one connection open (re-opened when it fails); requests are
/// serialized on it.
pub struct WitnessCoordinator {
    addr: SocketAddr,
    server_name: ServerName<'static>,
    connector: tokio_rustls::TlsConnector,
    timeout: Duration,
    conn: tokio::sync::Mutex<Option<(ClientStream, u64)>>,
    /// The re-learning nonce last heard (see [`CasRequest::witness`]).
    nonce: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for WitnessCoordinator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WitnessCoordinator")
            .field("addr", &self.addr)
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

impl WitnessCoordinator {
    /// A client of the witness at `addr`, whose certificate must be valid for `server_name`; `tls`
    /// presents this host's certificate (e.g. the agent's `TlsIdentity::rustls_client`); its ALPN is
    /// set here. `timeout` bounds each request (connect, handshake, answer).
    pub fn new(
        addr: SocketAddr,
        server_name: &str,
        mut tls: rustls::ClientConfig,
        timeout: Duration,
    ) -> Result<Self, CoordError> {
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let server_name = ServerName::try_from(server_name.to_owned())
            .map_err(|e| CoordError::Setup(format!("witness name {server_name:?}: {e}")))?;
        Ok(WitnessCoordinator {
            addr,
            server_name,
            connector: tokio_rustls::TlsConnector::from(Arc::new(tls)),
            timeout,
            conn: tokio::sync::Mutex::new(None),
            nonce: std::sync::atomic::AtomicU64::new(0),
        })
    }

    async fn connect(&self) -> Result<ClientStream, CoordError> {
        let tcp = TcpStream::connect(self.addr)
            .await
            .map_err(|e| CoordError::Unreachable(format!("connecting to {}: {e}", self.addr)))?;
        let _ = tcp.set_nodelay(true);
        self.connector
            .connect(self.server_name.clone(), tcp)
            .await
            .map_err(|e| CoordError::Unreachable(format!("TLS to {}: {e}", self.addr)))
    }

    async fn exchange(
        &self,
        conn: &mut Option<(ClientStream, u64)>,
        op: &Op,
    ) -> Result<WireResult, CoordError> {
        if conn.is_none() {
            *conn = Some((self.connect().await?, 0));
        }
        let Some((stream, seq)) = conn.as_mut() else {
            return Err(CoordError::Unreachable("no connection".into()));
        };
        *seq += 1;
        let s = *seq;
        #[derive(Serialize)]
        struct Out<'a> {
            seq: u64,
            op: &'a Op,
        }
        write_message(stream, &Out { seq: s, op }).await?;
        let msg = read_message(stream).await?;
        let resp: WireResponse =
            serde_json::from_slice(&msg).map_err(|e| CoordError::Malformed(e.to_string()))?;
        if resp.seq != s {
            return Err(CoordError::Malformed(format!(
                "answer to sequence {} for request {s}",
                resp.seq
            )));
        }
        Ok(resp.result)
    }

    async fn call(&self, op: Op) -> Result<WireResult, CoordError> {
        let mut conn = self.conn.lock().await;
        // A kept connection may have died with a restarted witness: one more try on a fresh one.
        for attempt in 0..2 {
            let had = conn.is_some();
            match tokio::time::timeout(self.timeout, self.exchange(&mut conn, &op)).await {
                Ok(Ok(r)) => return Ok(r),
                Ok(Err(e)) => {
                    *conn = None;
                    if !(had && attempt == 0) {
                        return Err(e);
                    }
                }
                Err(_) => {
                    *conn = None;
                    return Err(CoordError::Unreachable(format!(
                        "no answer from {} in {:?}",
                        self.addr, self.timeout
                    )));
                }
            }
        }
        Err(CoordError::Unreachable(format!(
            "{} failed twice",
            self.addr
        )))
    }
}

fn from_error(kind: ErrorKind, message: String, vm: &str) -> CoordError {
    match kind {
        ErrorKind::Invalid => CoordError::Invalid(message),
        ErrorKind::Refused => CoordError::Refused(message),
        ErrorKind::Relearning => CoordError::Relearning(vm.to_owned()),
        ErrorKind::Failed => CoordError::Failed(message),
    }
}

impl Coordinator for WitnessCoordinator {
    async fn cas(&self, req: &CasRequest) -> Result<CasOutcome, CoordError> {
        req.validate()?;
        let mut req = req.clone();
        req.witness = self.nonce.load(std::sync::atomic::Ordering::Acquire);
        match self.call(Op::Cas(req.clone())).await? {
            WireResult::Cas(o) => {
                if let CasOutcome::Relearning { witness } = o {
                    self.nonce
                        .store(witness, std::sync::atomic::Ordering::Release);
                }
                Ok(o)
            }
            WireResult::Error { kind, message } => Err(from_error(kind, message, &req.vm)),
            WireResult::Read(_) => Err(CoordError::Malformed("a read answer to a CAS".into())),
        }
    }

    async fn read(&self, vm: &str) -> Result<Option<Record>, CoordError> {
        match self.call(Op::Read { vm: vm.to_owned() }).await? {
            WireResult::Read(r) => Ok(r),
            WireResult::Error { kind, message } => Err(from_error(kind, message, vm)),
            WireResult::Cas(_) => Err(CoordError::Malformed("a CAS answer to a read".into())),
        }
    }
}
