//! The client-facing output endpoint of an FT VM.
//!
//! Released guest output is an append-only byte stream with absolute offsets (offset 0 = the guest's first
//! byte). A client connects over TCP, sends the offset it has already seen (8 bytes, little-endian), and
//! receives every released byte from there on, as it is released. After a failover the client reconnects
//! to the new primary with its offset and reads on: the new primary's log starts from the replica's
//! committed output, which contains everything the old primary could have released, so nothing is lost
//! and nothing is repeated. A host that joined through an initial sync holds the stream only from the
//! offset where it joined ([`OutputLog::base`]); a client asking for older output is disconnected.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// The released output of one VM.
#[derive(Debug)]
pub struct OutputLog {
    base: u64,
    bytes: Mutex<Vec<u8>>,
    released: watch::Sender<u64>,
    journal: Mutex<Option<Journal>>,
    console: Mutex<Option<std::fs::File>>,
}

/// An append-only record of every release (for the fault campaign's split-brain check): one line per
/// release, `<unix time ns> <host> <generation> <first offset> <end offset>`.
#[derive(Debug)]
struct Journal {
    file: std::fs::File,
    host: String,
    generation: Arc<std::sync::atomic::AtomicU64>,
}

impl OutputLog {
    /// A log that starts with `history` (the committed output so far) at stream offset 0.
    pub fn new(history: Vec<u8>) -> Arc<Self> {
        Self::with_base(0, history)
    }

    /// A log whose `history` starts at stream offset `base` (a host that joined after the VM booted
    /// holds only the output from then on). Clients asking for an earlier offset are refused.
    pub fn with_base(base: u64, history: Vec<u8>) -> Arc<Self> {
        let len = base + history.len() as u64;
        Arc::new(OutputLog {
            base,
            bytes: Mutex::new(history),
            released: watch::channel(len).0,
            journal: Mutex::new(None),
            console: Mutex::new(None),
        })
    }

    /// Records every release from now on in `path` (appending), tagged with `host` and the current
    /// value of `generation`.
    pub fn journal_to(
        &self,
        path: &std::path::Path,
        host: &str,
        generation: Arc<std::sync::atomic::AtomicU64>,
    ) -> std::io::Result<()> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        *self.journal.lock().unwrap_or_else(|p| p.into_inner()) = Some(Journal {
            file,
            host: host.to_owned(),
            generation,
        });
        Ok(())
    }

    /// Keeps a copy of the released stream in the file `path` (the console log the daemon serves, also
    /// once the VM has ended): the file holds the stream from [`OutputLog::base`] on, and `path` with
    /// the extension `base` holds that offset in decimal. An older file at `path` is replaced.
    pub fn console_to(&self, path: &std::path::Path) -> std::io::Result<()> {
        use std::io::Write as _;
        let b = self.bytes.lock().unwrap_or_else(|p| p.into_inner());
        crate::worker::write_atomic(
            &path.with_extension("base"),
            format!("{}\n", self.base).as_bytes(),
        )?;
        let mut file = std::fs::File::create(path)?;
        file.write_all(&b)?;
        *self.console.lock().unwrap_or_else(|p| p.into_inner()) = Some(file);
        Ok(())
    }

    /// The first stream offset this log holds.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// Releases `bytes` (their epoch is committed).
    pub fn release(&self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        let mut b = self.bytes.lock().unwrap_or_else(|p| p.into_inner());
        let start = self.base + b.len() as u64;
        b.extend_from_slice(bytes);
        let len = b.len() as u64;
        if let Some(f) = self
            .console
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_mut()
        {
            use std::io::Write as _;
            if let Err(e) = f.write_all(bytes) {
                tracing::warn!(error = %e, "console log: write failed");
            }
        }
        if let Some(j) = self
            .journal
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_mut()
        {
            use std::io::Write as _;
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos());
            let g = j.generation.load(std::sync::atomic::Ordering::Acquire);
            // One write(2) per line: with O_APPEND, lines of hosts sharing the journal never tear.
            let line = format!("{now} {} {g} {start} {}\n", j.host, self.base + len);
            let _ = j.file.write_all(line.as_bytes());
        }
        drop(b);
        self.released.send_replace(self.base + len);
    }

    /// Stream offset one past the last released byte.
    pub fn len(&self) -> u64 {
        *self.released.borrow()
    }

    /// Whether nothing was released yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A copy of the bytes from stream offset `offset` on; `None` if `offset` is before [`OutputLog::base`].
    pub fn read_from(&self, offset: u64) -> Option<Vec<u8>> {
        let rel = offset.checked_sub(self.base)?;
        let b = self.bytes.lock().unwrap_or_else(|p| p.into_inner());
        Some(
            b.get(rel as usize..)
                .map(<[u8]>::to_vec)
                .unwrap_or_default(),
        )
    }

    /// Serves clients on `listener` until the task is dropped.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        loop {
            let Ok((stream, peer)) = listener.accept().await else {
                continue;
            };
            let log = Arc::clone(&self);
            tokio::spawn(async move {
                if let Err(e) = log.serve_client(stream).await {
                    tracing::debug!(%peer, error = %e, "output client gone");
                }
            });
        }
    }

    async fn serve_client(&self, mut stream: TcpStream) -> std::io::Result<()> {
        let _ = stream.set_nodelay(true);
        let mut offset = stream.read_u64_le().await?;
        let mut released = self.released.subscribe();
        loop {
            let Some(chunk) = self.read_from(offset) else {
                tracing::info!(
                    offset,
                    base = self.base,
                    "output client asked for output this host never held"
                );
                return Ok(());
            };
            if !chunk.is_empty() {
                stream.write_all(&chunk).await?;
                offset += chunk.len() as u64;
                continue;
            }
            if released.changed().await.is_err() {
                return Ok(());
            }
        }
    }
}

/// A piece of a console log ([`read_console`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsoleChunk {
    /// The first stream offset the log holds.
    pub base: u64,
    /// The stream offset after its last byte (now).
    pub end: u64,
    /// The offset of `bytes`.
    pub offset: u64,
    /// The bytes read.
    pub bytes: Vec<u8>,
}

/// Reads at most `max` bytes of the console log at `path` (written by [`OutputLog::console_to`]) from
/// stream `offset` (default and below the base: the base; past the end: nothing). `None` when there is
/// no console log.
pub fn read_console(
    path: &std::path::Path,
    offset: Option<u64>,
    max: u64,
) -> std::io::Result<Option<ConsoleChunk>> {
    use std::io::{Read as _, Seek as _};
    let mut file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let base: u64 = std::fs::read_to_string(path.with_extension("base"))
        .ok()
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or(0);
    let len = file.metadata()?.len();
    let end = base + len;
    let offset = offset.unwrap_or(base).clamp(base, end);
    file.seek(std::io::SeekFrom::Start(offset - base))?;
    let mut bytes = Vec::new();
    file.take(max.min(end - offset)).read_to_end(&mut bytes)?;
    Ok(Some(ConsoleChunk {
        base,
        end,
        offset,
        bytes,
    }))
}

/// Binds the output endpoint.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// A client of the output endpoint: reads from `offset` and appends to `into` until `stop` says enough
/// or the connection ends. Returns the number of bytes read.
pub async fn read_stream(
    addr: SocketAddr,
    offset: u64,
    into: &mut Vec<u8>,
    mut stop: impl FnMut(&[u8]) -> bool,
) -> std::io::Result<u64> {
    let mut stream = TcpStream::connect(addr).await?;
    stream.write_u64_le(offset).await?;
    let mut buf = [0u8; 4096];
    let mut n_total = 0u64;
    loop {
        if stop(into) {
            return Ok(n_total);
        }
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Ok(n_total);
        }
        into.extend_from_slice(&buf[..n]);
        n_total += n as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn clients_read_from_their_offset_as_output_is_released() {
        let log = OutputLog::new(b"1\n2\n".to_vec());
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(Arc::clone(&log).serve(listener));
        let writer = Arc::clone(&log);
        tokio::spawn(async move {
            for i in 3..=5 {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                writer.release(format!("{i}\n").as_bytes());
            }
        });
        let mut got = Vec::new();
        read_stream(addr, 2, &mut got, |b| b.ends_with(b"5\n"))
            .await
            .unwrap();
        assert_eq!(got, b"2\n3\n4\n5\n");
        assert_eq!(log.len(), 10);
        let late = OutputLog::with_base(6, b"4\n5\n".to_vec());
        assert_eq!(late.read_from(8).unwrap(), b"5\n");
        assert_eq!(late.read_from(5), None);
        assert_eq!(late.len(), 10);
    }
}
