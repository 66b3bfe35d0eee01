//! The client-facing output endpoint of an FT VM.
//!
//! Released guest output is an append-only byte stream with absolute offsets (offset 0 = the guest's first
//! byte). A client connects over TCP, sends the offset it has already seen (8 bytes, little-endian), and
//! receives every released byte from there on, as it is released. After a failover the client reconnects
//! to the new primary with its offset and reads on: the new primary's log starts from the replica's
//! committed output, which contains everything the old primary could have released, so nothing is lost
//! and nothing is repeated. A host that joined through an initial sync holds the stream only from the
//! offset where it joined; a client asking for older output than that is disconnected.
//!
//! **The log is bounded.** A host keeps only the last [`DEFAULT_TAIL`] bytes (8 MiB; another bound with
//! [`OutputLog::with_base_and_tail`]) of the released stream in memory; older bytes are dropped as new
//! ones are released, and [`OutputLog::base`] moves up with them. A client that asks for (or falls
//! behind to) an offset that was dropped gets one line in its stream instead of the missing bytes —
//! `[ax: output dropped: offsets X..Y (N bytes) are no longer kept (this host keeps the last M bytes);
//! resuming at offset Y]` — and reads on from the oldest byte kept. The note is not part of the guest's
//! stream: a client that counts offsets resumes its count at `Y` ([`parse_drop_note`]).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// How many bytes of released output a log keeps by default: the tail a primary also hands a new
/// secondary with an initial sync (`node::RETAINED_OUTPUT`).
pub const DEFAULT_TAIL: usize = 8 << 20;

/// The released output of one VM: the last `tail` bytes of it.
#[derive(Debug)]
pub struct OutputLog {
    /// Where this host's stream begins (it joined there): older offsets were never held here.
    joined: u64,
    /// Most bytes kept.
    tail: usize,
    bytes: Mutex<Kept>,
    released: watch::Sender<u64>,
    journal: Mutex<Option<Journal>>,
    console: Mutex<Option<std::fs::File>>,
}

/// The bytes kept: the stream from `start` on.
#[derive(Debug)]
struct Kept {
    start: u64,
    bytes: VecDeque<u8>,
}

impl Kept {
    fn end(&self) -> u64 {
        self.start + self.bytes.len() as u64
    }

    /// Drops the oldest bytes beyond `tail`.
    fn trim(&mut self, tail: usize) {
        let excess = self.bytes.len().saturating_sub(tail);
        if excess > 0 {
            self.bytes.drain(..excess);
            self.start += excess as u64;
        }
    }
}

/// What a client reading from an offset gets ([`OutputLog::read_at`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Read {
    /// The bytes from the offset on (empty: nothing newer was released yet).
    Bytes(Vec<u8>),
    /// The offset was held here once, but dropped by the bound: the oldest byte kept is at `resume`.
    Dropped {
        /// The first offset still kept.
        resume: u64,
    },
    /// The offset is before this host's stream began: it never held it.
    NeverHeld,
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
    /// holds only the output from then on). Clients asking for an earlier offset are refused. It keeps
    /// the last [`DEFAULT_TAIL`] bytes.
    pub fn with_base(base: u64, history: Vec<u8>) -> Arc<Self> {
        Self::with_base_and_tail(base, history, DEFAULT_TAIL)
    }

    /// [`OutputLog::with_base`] keeping at most the last `tail` bytes (at least 1).
    pub fn with_base_and_tail(base: u64, history: Vec<u8>, tail: usize) -> Arc<Self> {
        let len = base + history.len() as u64;
        let tail = tail.max(1);
        let mut kept = Kept {
            start: base,
            bytes: history.into(),
        };
        kept.trim(tail);
        Arc::new(OutputLog {
            joined: base,
            tail,
            bytes: Mutex::new(kept),
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
    /// once the VM has ended): the file holds the stream from [`OutputLog::base`] (as it is now) on,
    /// and `path` with the extension `base` holds that offset in decimal. An older file at `path` is
    /// replaced.
    pub fn console_to(&self, path: &std::path::Path) -> std::io::Result<()> {
        use std::io::Write as _;
        let b = self.bytes.lock().unwrap_or_else(|p| p.into_inner());
        failover::coordinator::write_durably(
            &path.with_extension("base"),
            format!("{}\n", b.start).as_bytes(),
        )?;
        let mut file = std::fs::File::create(path)?;
        let (front, back) = b.bytes.as_slices();
        file.write_all(front)?;
        file.write_all(back)?;
        *self.console.lock().unwrap_or_else(|p| p.into_inner()) = Some(file);
        Ok(())
    }

    /// The first stream offset this log holds now: where this host joined the stream, or later once
    /// older output was dropped (the log keeps only its last [`OutputLog::tail`] bytes).
    pub fn base(&self) -> u64 {
        self.bytes.lock().unwrap_or_else(|p| p.into_inner()).start
    }

    /// Most bytes this log keeps.
    pub fn tail(&self) -> usize {
        self.tail
    }

    /// Releases `bytes` (their epoch is committed).
    pub fn release(&self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        let mut b = self.bytes.lock().unwrap_or_else(|p| p.into_inner());
        let start = b.end();
        b.bytes.extend(bytes);
        b.trim(self.tail);
        let end = b.end();
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
            let line = format!("{now} {} {g} {start} {end}\n", j.host);
            let _ = j.file.write_all(line.as_bytes());
        }
        drop(b);
        self.released.send_replace(end);
    }

    /// Stream offset one past the last released byte.
    pub fn len(&self) -> u64 {
        *self.released.borrow()
    }

    /// Whether nothing was released yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A copy of the bytes from stream offset `offset` on; `None` if `offset` is before
    /// [`OutputLog::base`] (never held here, or dropped).
    pub fn read_from(&self, offset: u64) -> Option<Vec<u8>> {
        match self.read_at(offset) {
            Read::Bytes(b) => Some(b),
            Read::Dropped { .. } | Read::NeverHeld => None,
        }
    }

    /// What a client reading from `offset` gets: the bytes from there on, or why it cannot have them.
    pub fn read_at(&self, offset: u64) -> Read {
        if offset < self.joined {
            return Read::NeverHeld;
        }
        let b = self.bytes.lock().unwrap_or_else(|p| p.into_inner());
        let Some(rel) = offset.checked_sub(b.start) else {
            return Read::Dropped { resume: b.start };
        };
        let rel = usize::try_from(rel).unwrap_or(usize::MAX);
        Read::Bytes(b.bytes.range(rel.min(b.bytes.len())..).copied().collect())
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
            let chunk = match self.read_at(offset) {
                Read::Bytes(chunk) => chunk,
                Read::NeverHeld => {
                    tracing::info!(
                        offset,
                        joined = self.joined,
                        "output client asked for output this host never held"
                    );
                    return Ok(());
                }
                Read::Dropped { resume } => {
                    tracing::warn!(
                        offset,
                        resume,
                        missed = resume - offset,
                        "output client lagged behind the kept output: told what it missed"
                    );
                    stream
                        .write_all(drop_note(offset, resume, self.tail).as_bytes())
                        .await?;
                    offset = resume;
                    continue;
                }
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

/// The line a client gets in place of output that was dropped (offsets `from..resume`) by a log that
/// keeps `tail` bytes.
pub fn drop_note(from: u64, resume: u64, tail: usize) -> String {
    format!(
        "[ax: output dropped: offsets {from}..{resume} ({} bytes) are no longer kept (this host keeps the last {tail} bytes); resuming at offset {resume}]\n",
        resume - from
    )
}

/// If `line` (with or without its newline) is a [`drop_note`], the offset the stream resumes at.
pub fn parse_drop_note(line: &[u8]) -> Option<u64> {
    let line = std::str::from_utf8(line).ok()?.trim_end();
    let rest = line.strip_prefix("[ax: output dropped: ")?;
    let (_, resume) = rest.rsplit_once("; resuming at offset ")?;
    resume.strip_suffix(']')?.parse().ok()
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

    #[test]
    fn a_log_keeps_its_last_bytes_and_knows_what_it_dropped() {
        let log = OutputLog::with_base_and_tail(10, b"abcdef".to_vec(), 4);
        assert_eq!((log.base(), log.len(), log.tail()), (12, 16, 4));
        assert_eq!(log.read_at(5), Read::NeverHeld);
        assert_eq!(log.read_at(10), Read::Dropped { resume: 12 });
        assert_eq!(log.read_at(13), Read::Bytes(b"def".to_vec()));
        log.release(b"gh");
        assert_eq!((log.base(), log.len()), (14, 18));
        assert_eq!(log.read_from(13), None);
        assert_eq!(log.read_from(14).unwrap(), b"efgh");
        let note = drop_note(10, 14, 4);
        assert!(note.contains("(4 bytes)"), "{note}");
        assert_eq!(parse_drop_note(note.as_bytes()), Some(14));
        assert_eq!(parse_drop_note(b"5\n"), None);
    }

    #[tokio::test]
    async fn released_output_is_bounded_and_a_lagging_client_is_told_what_it_missed() {
        const MIB: usize = 1 << 20;
        let log = OutputLog::new(Vec::new());
        for i in 0..12u8 {
            log.release(&vec![b'a' + i; MIB]);
        }
        // Only the last 8 MiB are kept: the log's memory does not grow with the stream.
        let kept = 8 * MIB as u64;
        assert_eq!(log.len(), 12 * MIB as u64);
        assert_eq!(log.base(), log.len() - kept);
        assert_eq!(log.read_from(0), None);
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(Arc::clone(&log).serve(listener));
        log.release(b"tail\n");
        // A client at offset 1 MiB (dropped): one note line, then the stream from the oldest byte kept.
        let mut got = Vec::new();
        read_stream(addr, MIB as u64, &mut got, |b| b.ends_with(b"tail\n"))
            .await
            .unwrap();
        let nl = got.iter().position(|&c| c == b'\n').unwrap();
        let note = std::str::from_utf8(&got[..=nl]).unwrap();
        let resume = log.base();
        assert_eq!(resume, log.len() - kept);
        assert_eq!(note, drop_note(MIB as u64, resume, DEFAULT_TAIL));
        assert!(
            note.contains(&format!("({} bytes)", resume - MIB as u64)),
            "{note}"
        );
        assert_eq!(parse_drop_note(note.as_bytes()), Some(resume));
        let rest = &got[nl + 1..];
        assert_eq!(rest.len() as u64, kept);
        assert_eq!(rest, log.read_from(resume).unwrap().as_slice());
        assert!(rest.starts_with(&[b'e'; 16]));
    }
}
