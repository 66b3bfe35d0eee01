//! The UDP fault proxy.

use std::cmp::Ordering as CmpOrdering;
use std::collections::{BinaryHeap, HashMap};
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::ops::Deref;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use rand::rngs::StdRng;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::{
    inc, rng_for, Direction, ProxyConfig, ProxyError, ProxyHandle, Ready, Shared, Verdict,
};

/// A UDP fault proxy; stops on drop. Derefs to [`ProxyHandle`] for `set_faults`, `stats`, ...
#[derive(Debug)]
pub struct UdpProxy {
    handle: ProxyHandle,
}

impl UdpProxy {
    /// Binds `cfg.listen` (in `cfg.netns` if set) and starts forwarding to `cfg.upstream`.
    pub fn start(cfg: ProxyConfig) -> Result<Self, ProxyError> {
        let (listen, upstream) = (cfg.listen, cfg.upstream);
        let handle = ProxyHandle::start("ax-udp-proxy", &cfg, move |shared, ready| {
            run(shared, listen, upstream, ready)
        })?;
        Ok(Self { handle })
    }

    /// Stops the proxy and waits for its thread.
    pub fn stop(self) {
        self.handle.stop();
    }
}

impl Deref for UdpProxy {
    type Target = ProxyHandle;
    fn deref(&self) -> &ProxyHandle {
        &self.handle
    }
}

/// One datagram waiting for its deadline.
struct Out {
    deadline: Instant,
    seq: u64,
    sock: Arc<UdpSocket>,
    dest: Option<SocketAddr>,
    data: Vec<u8>,
}

impl PartialEq for Out {
    fn eq(&self, o: &Self) -> bool {
        (self.deadline, self.seq) == (o.deadline, o.seq)
    }
}
impl Eq for Out {}
impl PartialOrd for Out {
    fn partial_cmp(&self, o: &Self) -> Option<CmpOrdering> {
        Some(self.cmp(o))
    }
}
impl Ord for Out {
    /// Reversed, so that the max-heap pops the earliest deadline (then the earliest arrival).
    fn cmp(&self, o: &Self) -> CmpOrdering {
        (o.deadline, o.seq).cmp(&(self.deadline, self.seq))
    }
}

/// Sends queued datagrams when their deadline comes, earliest first.
async fn scheduler(mut rx: mpsc::UnboundedReceiver<Out>, shared: Arc<Shared>, dir: Direction) {
    let counters = &shared.lane(dir).counters;
    let mut heap: BinaryHeap<Out> = BinaryHeap::new();
    let mut seq = 0u64;
    let mut closed = false;
    loop {
        let now = Instant::now();
        while heap.peek().is_some_and(|o| o.deadline <= now) {
            let Some(o) = heap.pop() else { break };
            let r = match o.dest {
                Some(d) => o.sock.send_to(&o.data, d).await,
                None => o.sock.send(&o.data).await,
            };
            match r {
                Ok(_) => counters.forwarded(o.data.len()),
                Err(e) => {
                    tracing::trace!(error = %e, ?dir, "udp proxy send failed");
                    counters.send_error();
                }
            }
        }
        if closed && heap.is_empty() {
            return;
        }
        let next = heap.peek().map(|o| o.deadline);
        tokio::select! {
            m = rx.recv(), if !closed => match m {
                Some(mut o) => {
                    o.seq = seq;
                    seq += 1;
                    heap.push(o);
                }
                None => closed = true,
            },
            _ = tokio::time::sleep_until(next.unwrap_or(now)), if next.is_some() => {}
        }
    }
}

fn enqueue(
    tx: &mpsc::UnboundedSender<Out>,
    verdict: Verdict,
    sock: &Arc<UdpSocket>,
    dest: Option<SocketAddr>,
    data: Vec<u8>,
) {
    if let Verdict::Forward { copies, delay } = verdict {
        let deadline = Instant::now() + delay;
        for _ in 1..copies {
            let _ = tx.send(Out {
                deadline,
                seq: 0,
                sock: sock.clone(),
                dest,
                data: data.clone(),
            });
        }
        let _ = tx.send(Out {
            deadline,
            seq: 0,
            sock: sock.clone(),
            dest,
            data,
        });
    }
}

async fn run(shared: Arc<Shared>, listen: SocketAddr, upstream: SocketAddr, ready: Ready) {
    let sock = match UdpSocket::bind(listen).await {
        Ok(s) => s,
        Err(source) => {
            let _ = ready.send(Err(ProxyError::Bind {
                addr: listen,
                source,
            }));
            return;
        }
    };
    let local = match sock.local_addr() {
        Ok(a) => a,
        Err(source) => {
            let _ = ready.send(Err(ProxyError::Io {
                context: "local_addr",
                source,
            }));
            return;
        }
    };
    let _ = ready.send(Ok(local));
    let listen_sock = Arc::new(sock);

    let (up_tx, up_rx) = mpsc::unbounded_channel();
    let (down_tx, down_rx) = mpsc::unbounded_channel();
    tokio::spawn(scheduler(up_rx, shared.clone(), Direction::ToUpstream));
    tokio::spawn(scheduler(down_rx, shared.clone(), Direction::ToClient));
    let up_rng = Mutex::new(rng_for(shared.seed, 0, 0));
    let down_rng = Arc::new(Mutex::new(rng_for(shared.seed, 0, 1)));

    let mut sessions: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
    let mut buf = vec![0u8; 65536];
    loop {
        let (n, client) = match listen_sock.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(e) => {
                tracing::debug!(error = %e, "udp proxy recv failed");
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                continue;
            }
        };
        let sess = match sessions.get(&client) {
            Some(s) => s.clone(),
            None => match new_session(
                &shared,
                upstream,
                client,
                listen_sock.clone(),
                down_tx.clone(),
                down_rng.clone(),
            )
            .await
            {
                Ok(s) => {
                    sessions.insert(client, s.clone());
                    s
                }
                Err(e) => {
                    tracing::warn!(error = %e, %upstream, "udp proxy cannot open upstream socket");
                    inc(&shared.connect_errors, 1);
                    continue;
                }
            },
        };
        let mut data = buf[..n].to_vec();
        let lane = shared.lane(Direction::ToUpstream);
        let f = lane.current();
        let verdict = lane.decide(&f, &mut lock(&up_rng), &mut data);
        enqueue(&up_tx, verdict, &sess, None, data);
    }
}

fn lock(m: &Mutex<StdRng>) -> std::sync::MutexGuard<'_, StdRng> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Opens the upstream socket of a new client and starts relaying its replies.
async fn new_session(
    shared: &Arc<Shared>,
    upstream: SocketAddr,
    client: SocketAddr,
    listen_sock: Arc<UdpSocket>,
    down_tx: mpsc::UnboundedSender<Out>,
    down_rng: Arc<Mutex<StdRng>>,
) -> io::Result<Arc<UdpSocket>> {
    let bind: SocketAddr = if upstream.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let s = UdpSocket::bind(bind).await?;
    s.connect(upstream).await?;
    let s = Arc::new(s);
    shared.sessions.fetch_add(1, Ordering::Relaxed);
    tracing::debug!(%client, local = ?s.local_addr().ok(), "udp proxy session");
    let sess = s.clone();
    let shared = shared.clone();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        loop {
            match sess.recv(&mut buf).await {
                Ok(n) => {
                    let mut data = buf[..n].to_vec();
                    let lane = shared.lane(Direction::ToClient);
                    let f = lane.current();
                    let verdict = lane.decide(&f, &mut lock(&down_rng), &mut data);
                    enqueue(&down_tx, verdict, &listen_sock, Some(client), data);
                }
                // ICMP errors for earlier sends (port/host unreachable: the upstream is not listening yet,
                // or its link is cut) are reported here; the session stays usable, so keep going.
                Err(e) => {
                    tracing::trace!(error = %e, %client, "udp proxy session recv error");
                    tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                }
            }
        }
    });
    Ok(s)
}
