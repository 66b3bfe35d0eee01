//! The TCP fault proxy.

use std::io;
use std::net::SocketAddr;
use std::ops::Deref;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use rand::rngs::StdRng;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::{
    inc, rng_for, Direction, ProxyConfig, ProxyError, ProxyHandle, Ready, Shared, Verdict,
};

/// Largest chunk read (and so corrupted, dropped or duplicated) at once.
const CHUNK: usize = 16 * 1024;
/// Chunks in flight per direction and connection (bounds memory under a long delay).
const QUEUE: usize = 1024;

/// A TCP fault proxy; stops on drop (closing every connection). Derefs to [`ProxyHandle`].
#[derive(Debug)]
pub struct TcpProxy {
    handle: ProxyHandle,
}

impl TcpProxy {
    /// Listens on `cfg.listen` (in `cfg.netns` if set); each accepted connection gets its own connection
    /// to `cfg.upstream`.
    pub fn start(cfg: ProxyConfig) -> Result<Self, ProxyError> {
        let (listen, upstream) = (cfg.listen, cfg.upstream);
        let handle = ProxyHandle::start("ax-tcp-proxy", &cfg, move |shared, ready| {
            run(shared, listen, upstream, ready)
        })?;
        Ok(Self { handle })
    }

    /// Closes every connection open now (both sides see EOF or a reset); later connections work.
    pub fn sever_connections(&self) {
        self.handle.shared.sever.send_modify(|g| *g += 1);
    }

    /// Stops the proxy and waits for its thread.
    pub fn stop(self) {
        self.handle.stop();
    }
}

impl Deref for TcpProxy {
    type Target = ProxyHandle;
    fn deref(&self) -> &ProxyHandle {
        &self.handle
    }
}

async fn run(shared: Arc<Shared>, listen: SocketAddr, upstream: SocketAddr, ready: Ready) {
    let listener = match TcpListener::bind(listen).await {
        Ok(l) => l,
        Err(source) => {
            let _ = ready.send(Err(ProxyError::Bind {
                addr: listen,
                source,
            }));
            return;
        }
    };
    match listener.local_addr() {
        Ok(a) => {
            let _ = ready.send(Ok(a));
        }
        Err(source) => {
            let _ = ready.send(Err(ProxyError::Io {
                context: "local_addr",
                source,
            }));
            return;
        }
    }
    let mut id = 0u64;
    loop {
        match listener.accept().await {
            Ok((client, peer)) => {
                id += 1;
                shared.sessions.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%peer, id, "tcp proxy accepted");
                tokio::spawn(connection(shared.clone(), client, upstream, id));
            }
            Err(e) => {
                tracing::debug!(error = %e, "tcp proxy accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        }
    }
}

async fn connection(shared: Arc<Shared>, client: TcpStream, upstream: SocketAddr, id: u64) {
    let mut sever = shared.sever.subscribe();
    let up = tokio::select! {
        r = TcpStream::connect(upstream) => r,
        _ = sever.changed() => return,
    };
    let up = match up {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(error = %e, %upstream, "tcp proxy cannot connect upstream");
            inc(&shared.connect_errors, 1);
            return;
        }
    };
    let _ = client.set_nodelay(true);
    let _ = up.set_nodelay(true);
    let (cr, cw) = client.into_split();
    let (ur, uw) = up.into_split();
    let a = pump(
        cr,
        uw,
        shared.clone(),
        Direction::ToUpstream,
        rng_for(shared.seed, id, 0),
    );
    let b = pump(
        ur,
        cw,
        shared.clone(),
        Direction::ToClient,
        rng_for(shared.seed, id, 1),
    );
    tokio::select! {
        r = async { tokio::try_join!(a, b) } => {
            if let Err(e) = r {
                tracing::debug!(error = %e, id, "tcp proxy connection ends with an error");
            }
        }
        _ = sever.changed() => tracing::debug!(id, "tcp proxy connection severed"),
    }
}

/// Copies `r` to `w` through the lane's faults; finishes after forwarding EOF as a write shutdown.
async fn pump<R, W>(
    mut r: R,
    mut w: W,
    shared: Arc<Shared>,
    dir: Direction,
    mut rng: StdRng,
) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    // `None` is the EOF marker.
    let (tx, mut rx) = mpsc::channel::<(Instant, Option<Vec<u8>>)>(QUEUE);
    let sh = shared.clone();
    let reader = async move {
        let lane = sh.lane(dir);
        let mut faults = lane.faults.subscribe();
        let mut buf = vec![0u8; CHUNK];
        let mut last = Instant::now();
        loop {
            // Blackhole: stall before reading.
            if faults.wait_for(|f| !f.blackhole).await.is_err() {
                return Ok(());
            }
            let n = r.read(&mut buf).await?;
            if n == 0 {
                let _ = tx.send((last, None)).await;
                return Ok::<(), io::Error>(());
            }
            let mut data = buf[..n].to_vec();
            let mut f = lane.current();
            f.blackhole = false; // a stall, not a discard, for a stream
            if let Verdict::Forward { copies, delay } = lane.decide(&f, &mut rng, &mut data) {
                // Never reorder a stream: deadlines only grow.
                last = last.max(Instant::now() + delay);
                for _ in 0..copies {
                    if tx.send((last, Some(data.clone()))).await.is_err() {
                        return Err(io::Error::from(io::ErrorKind::BrokenPipe));
                    }
                }
            }
        }
    };
    let writer = async move {
        let lane = shared.lane(dir);
        let mut faults = lane.faults.subscribe();
        while let Some((deadline, data)) = rx.recv().await {
            tokio::time::sleep_until(deadline).await;
            // Blackhole: stall before writing.
            if faults.wait_for(|f| !f.blackhole).await.is_err() {
                return Ok(());
            }
            match data {
                Some(d) => {
                    if let Err(e) = w.write_all(&d).await {
                        lane.counters.send_error();
                        return Err(e);
                    }
                    lane.counters.forwarded(d.len());
                }
                None => {
                    w.shutdown().await?;
                    return Ok(());
                }
            }
        }
        Ok::<(), io::Error>(())
    };
    tokio::try_join!(reader, writer)?;
    Ok(())
}
