//! A byte relay between a unix socket and TCP, with Nagle off and delayed ACKs re-disabled after
//! every read: how COLO's channels cross hosts without the delayed-ACK stall.
//!
//! QEMU's COLO channels (the migration stream, NBD, the compare chardevs) are request/response
//! exchanges of small messages at every checkpoint. Over TCP with the kernel's defaults each
//! checkpoint waits on delayed ACKs (~40 ms each on Linux; measured ~88 ms per checkpoint over
//! loopback, whatever the dirty set). QEMU sets neither `TCP_NODELAY` on all of them nor
//! `TCP_QUICKACK`. So ax lets QEMU talk to unix sockets only, and carries the bytes between hosts
//! itself: [`unix_to_tcp`] on the connecting side, [`tcp_to_unix`] on the listening side. Both set
//! `TCP_NODELAY`, and re-arm `TCP_QUICKACK` after every read (Linux clears it again on its own).
//! No host route needs changing (the alternative, `ip route … quickack 1`, touches the host's
//! routing table for every peer).
//!
//! Bounds: each direction of a connection holds at most [`RelayOptions::buffer`] bytes in flight;
//! a write that cannot finish within [`RelayOptions::write_timeout`] ends the connection (a peer
//! that stopped reading); connecting the far side is bounded by [`RelayOptions::connect_timeout`];
//! a listener carries at most [`RelayOptions::max_connections`] at once (more are refused).
//!
//! Break notice: [`RelayOptions::far_break`], when set, is notified whenever a carried connection
//! ends from the TCP (far) side — its read saw EOF or an error, or a write to it failed — as opposed
//! to the local QEMU closing its unix side. A killed peer process's sockets are closed by its kernel
//! at once, so this is the earliest sign of a peer QEMU's death; a dead host sends nothing and is
//! seen only by the heartbeat detector. It is a hint (a peer may also close a channel on purpose),
//! never a failover decision.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};

/// A relay's bounds.
#[derive(Debug, Clone)]
pub struct RelayOptions {
    /// Connecting the far side.
    pub connect_timeout: Duration,
    /// One write of a chunk to either side.
    pub write_timeout: Duration,
    /// Bytes read at once, per direction (the most held in flight).
    pub buffer: usize,
    /// Connections carried at once per listener.
    pub max_connections: usize,
    /// Notified (`notify_one`: one stored permit) when a carried connection ends from the TCP side.
    pub far_break: Option<Arc<tokio::sync::Notify>>,
}

impl Default for RelayOptions {
    fn default() -> Self {
        RelayOptions {
            connect_timeout: Duration::from_secs(5),
            write_timeout: Duration::from_secs(30),
            buffer: 256 << 10,
            max_connections: 16,
            far_break: None,
        }
    }
}

/// A running relay listener; dropping it stops it (connections it carries end with it).
#[derive(Debug)]
pub struct Relay {
    task: tokio::task::JoinHandle<()>,
    conns: Arc<AtomicUsize>,
    /// Where it listens (`unix:PATH` or `tcp:HOST:PORT`).
    pub listen: String,
}

/// Dropping a relay stops its listener and ends every connection it carries (both sockets closed): a
/// COLO channel's peer sees the end at once, even when the network to the far host is cut and TCP
/// alone would wait for minutes.
impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Relay {
    /// Connections being carried now.
    pub fn connections(&self) -> usize {
        self.conns.load(Ordering::Relaxed)
    }
}

fn set_quickack(fd: std::os::fd::RawFd) {
    let one: libc::c_int = 1;
    // SAFETY: setsockopt on a TCP socket the caller holds open, with a pointer to a live c_int and its
    // size.
    unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_QUICKACK,
            std::ptr::addr_of!(one).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

/// Listens on the unix socket `listen` (replacing a stale file) and carries every connection to TCP
/// `to` (`host:port`).
pub async fn unix_to_tcp(listen: &Path, to: String, opts: RelayOptions) -> std::io::Result<Relay> {
    let _ = std::fs::remove_file(listen);
    let l = UnixListener::bind(listen)?;
    let conns = Arc::new(AtomicUsize::new(0));
    let c = Arc::clone(&conns);
    let task = tokio::spawn(async move {
        // The connections' tasks live in this set: aborting the relay drops it, which aborts them.
        let mut carried = tokio::task::JoinSet::new();
        loop {
            let Ok((u, _)) = l.accept().await else {
                return;
            };
            while carried.try_join_next().is_some() {}
            if c.load(Ordering::Relaxed) >= opts.max_connections {
                tracing::warn!(to, "relay: too many connections, refused");
                continue;
            }
            let (to, opts, c) = (to.clone(), opts.clone(), Arc::clone(&c));
            carried.spawn(async move {
                let t = match tokio::time::timeout(opts.connect_timeout, TcpStream::connect(&to))
                    .await
                {
                    Ok(Ok(t)) => t,
                    Ok(Err(e)) => {
                        tracing::debug!(to, error = %e, "relay: connect failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(to, "relay: connect timed out");
                        return;
                    }
                };
                c.fetch_add(1, Ordering::Relaxed);
                carry(u, t, &opts).await;
                c.fetch_sub(1, Ordering::Relaxed);
            });
        }
    });
    Ok(Relay {
        task,
        conns,
        listen: format!("unix:{}", listen.display()),
    })
}

/// Listens on TCP `listen` (`host:port`, port 0: any) and carries every connection to the unix socket
/// `to`; the relay and the bound address.
pub async fn tcp_to_unix(
    listen: &str,
    to: PathBuf,
    opts: RelayOptions,
) -> std::io::Result<(Relay, std::net::SocketAddr)> {
    let l = TcpListener::bind(listen).await?;
    let addr = l.local_addr()?;
    let conns = Arc::new(AtomicUsize::new(0));
    let c = Arc::clone(&conns);
    let task = tokio::spawn(async move {
        // The connections' tasks live in this set: aborting the relay drops it, which aborts them.
        let mut carried = tokio::task::JoinSet::new();
        loop {
            let Ok((t, _)) = l.accept().await else {
                return;
            };
            while carried.try_join_next().is_some() {}
            if c.load(Ordering::Relaxed) >= opts.max_connections {
                tracing::warn!(to = %to.display(), "relay: too many connections, refused");
                continue;
            }
            let (to, opts, c) = (to.clone(), opts.clone(), Arc::clone(&c));
            carried.spawn(async move {
                let u = match tokio::time::timeout(opts.connect_timeout, UnixStream::connect(&to))
                    .await
                {
                    Ok(Ok(u)) => u,
                    _ => {
                        tracing::debug!(to = %to.display(), "relay: unix connect failed");
                        return;
                    }
                };
                c.fetch_add(1, Ordering::Relaxed);
                carry(u, t, &opts).await;
                c.fetch_sub(1, Ordering::Relaxed);
            });
        }
    });
    Ok((
        Relay {
            task,
            conns,
            listen: format!("tcp:{addr}"),
        },
        addr,
    ))
}

/// How one direction of a carried connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PumpEnd {
    /// Its source gave EOF or an error.
    Read,
    /// A write to its destination failed or timed out.
    Write,
}

/// Carries bytes both ways until either side ends (then both are shut); notifies
/// [`RelayOptions::far_break`] when the TCP side ended it.
async fn carry(u: UnixStream, t: TcpStream, opts: &RelayOptions) {
    let _ = t.set_nodelay(true);
    set_quickack(t.as_raw_fd());
    let fd = t.as_raw_fd();
    let (ur, uw) = u.into_split();
    let (tr, tw) = t.into_split();
    let up = pump(ur, tw, opts, None);
    let down = pump(tr, uw, opts, Some(fd));
    // Either direction ending ends the connection: a COLO channel is useless half-open.
    let far = tokio::select! {
        e = up => e == PumpEnd::Write,
        e = down => e == PumpEnd::Read,
    };
    if far {
        if let Some(n) = &opts.far_break {
            n.notify_one();
        }
    }
}

/// Copies `r` to `w` in chunks of at most `opts.buffer`; `quick`: the TCP socket read from, whose
/// `TCP_QUICKACK` is re-armed after each read (its halves keep it open meanwhile).
async fn pump<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    mut r: R,
    mut w: W,
    opts: &RelayOptions,
    quick: Option<std::os::fd::RawFd>,
) -> PumpEnd {
    let mut buf = vec![0u8; opts.buffer.max(4096)];
    let end = loop {
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => break PumpEnd::Read,
            Ok(n) => n,
        };
        if let Some(fd) = quick {
            set_quickack(fd);
        }
        match tokio::time::timeout(opts.write_timeout, w.write_all(&buf[..n])).await {
            Ok(Ok(())) => {}
            _ => break PumpEnd::Write,
        }
    };
    let _ = w.shutdown().await;
    end
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bytes_cross_both_ways() {
        let dir = std::env::temp_dir().join(format!("ax-relay-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let server = dir.join("server.sock");
        let front = dir.join("front.sock");
        let l = UnixListener::bind(&server).unwrap();
        let echo = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            loop {
                let n = s.read(&mut buf).await.unwrap();
                if n == 0 {
                    return;
                }
                s.write_all(&buf[..n]).await.unwrap();
            }
        });
        let (_back, addr) = tcp_to_unix("127.0.0.1:0", server.clone(), RelayOptions::default())
            .await
            .unwrap();
        let _front = unix_to_tcp(&front, addr.to_string(), RelayOptions::default())
            .await
            .unwrap();
        let mut c = UnixStream::connect(&front).await.unwrap();
        for i in 0..100u32 {
            let msg = format!("ping {i}\n");
            c.write_all(msg.as_bytes()).await.unwrap();
            let mut got = vec![0u8; msg.len()];
            tokio::time::timeout(Duration::from_secs(5), c.read_exact(&mut got))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(got, msg.as_bytes());
        }
        drop(c);
        tokio::time::timeout(Duration::from_secs(5), echo)
            .await
            .unwrap()
            .unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn dropping_the_relay_ends_its_connections() {
        let dir = std::env::temp_dir().join(format!("ax-relay-drop-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let front = dir.join("front.sock");
        // A far end that accepts and then neither reads nor closes (a host behind a cut link).
        let far = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = far.local_addr().unwrap();
        let held = tokio::spawn(async move {
            let (s, _) = far.accept().await.unwrap();
            tokio::time::sleep(Duration::from_secs(30)).await;
            drop(s);
        });
        let relay = unix_to_tcp(&front, addr.to_string(), RelayOptions::default())
            .await
            .unwrap();
        let mut c = UnixStream::connect(&front).await.unwrap();
        c.write_all(b"x").await.unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while relay.connections() == 0 {
            assert!(tokio::time::Instant::now() < deadline, "not carried");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        drop(relay);
        let mut b = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(5), c.read(&mut b))
            .await
            .expect("the connection outlived its relay")
            .unwrap_or(0);
        assert_eq!(n, 0);
        held.abort();
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The far (TCP) side closing notifies `far_break`; the local (unix) side closing does not.
    #[tokio::test]
    async fn far_break_only_from_the_tcp_side() {
        let dir = std::env::temp_dir().join(format!("ax-relay-brk-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let front = dir.join("front.sock");
        let far = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = far.local_addr().unwrap();
        let brk = Arc::new(tokio::sync::Notify::new());
        let opts = RelayOptions {
            far_break: Some(Arc::clone(&brk)),
            ..RelayOptions::default()
        };
        let _r = unix_to_tcp(&front, addr.to_string(), opts).await.unwrap();
        // The local side closes: no notice.
        let c = UnixStream::connect(&front).await.unwrap();
        let (t, _) = far.accept().await.unwrap();
        drop(c);
        let mut t = t;
        let mut b = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(5), t.read(&mut b))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(n, 0);
        assert!(
            tokio::time::timeout(Duration::from_millis(200), brk.notified())
                .await
                .is_err(),
            "a local close is not a far break"
        );
        // The far side closes: notice.
        let mut c = UnixStream::connect(&front).await.unwrap();
        let (t, _) = far.accept().await.unwrap();
        drop(t);
        tokio::time::timeout(Duration::from_secs(5), brk.notified())
            .await
            .expect("a far close is a break");
        let n = tokio::time::timeout(Duration::from_secs(5), c.read(&mut b))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(n, 0);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
