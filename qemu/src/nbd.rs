//! An async NBD client (the Network Block Device protocol, as QEMU serves it).
//!
//! Fixed newstyle handshake, then `NBD_OPT_STRUCTURED_REPLY`, `NBD_OPT_SET_META_CONTEXT` (for
//! `base:allocation` and `qemu:dirty-bitmap:NAME`) and `NBD_OPT_GO`; in transmission `NBD_CMD_READ`
//! (structured replies: `OFFSET_DATA`, `OFFSET_HOLE`, `ERROR` chunks, or a simple reply),
//! `NBD_CMD_BLOCK_STATUS` and `NBD_CMD_DISC`. One request is in flight at a time.
//!
//! The peer is not trusted: every allocation is bounded by what was asked (a read's chunks must lie in
//! the requested range and not overlap, a block-status reply is capped, an option reply is capped at
//! [`MAX_OPTION_REPLY`]), and every wait is bounded by [`Nbd::timeout`].
//!
//! Reference: <https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md>.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufStream};
use tokio::net::{TcpStream, ToSocketAddrs, UnixStream};

/// The longest option reply accepted during the handshake.
pub const MAX_OPTION_REPLY: u32 = 64 << 10;
/// The longest block-status reply chunk accepted (QEMU sends at most 2^17 extents of 8 bytes).
pub const MAX_BLOCK_STATUS_REPLY: u32 = (1 << 20) + 16;
/// The longest error message accepted in an error chunk.
const MAX_ERROR_CHUNK: u32 = 4096 + 14;
/// The largest read ax asks for when the server states no maximum (the protocol's common 32 MiB).
pub const DEFAULT_MAX_BLOCK: u32 = 32 << 20;

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

const FLAG_FIXED_NEWSTYLE: u16 = 1;
const FLAG_NO_ZEROES: u16 = 2;

const OPT_ABORT: u32 = 2;
const OPT_GO: u32 = 7;
const OPT_STRUCTURED_REPLY: u32 = 8;
const OPT_SET_META_CONTEXT: u32 = 10;

const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const REP_META_CONTEXT: u32 = 4;
const REP_ERR_BIT: u32 = 1 << 31;

const INFO_EXPORT: u16 = 0;
const INFO_BLOCK_SIZE: u16 = 3;

const CMD_READ: u16 = 0;
const CMD_DISC: u16 = 2;
const CMD_BLOCK_STATUS: u16 = 7;

const REPLY_FLAG_DONE: u16 = 1;
const REPLY_TYPE_NONE: u16 = 0;
const REPLY_TYPE_OFFSET_DATA: u16 = 1;
const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
const REPLY_TYPE_ERROR_BIT: u16 = 1 << 15;
const REPLY_TYPE_ERROR_OFFSET: u16 = REPLY_TYPE_ERROR_BIT + 2;

/// Transmission flag: the export is read-only.
pub const FLAG_READ_ONLY: u16 = 1 << 1;

/// `base:allocation`: the extent is a hole (reads as zeros unless also not `STATE_ZERO`).
pub const STATE_HOLE: u32 = 1;
/// `base:allocation`: the extent reads as zeros.
pub const STATE_ZERO: u32 = 2;
/// `qemu:dirty-bitmap:NAME`: the extent is dirty.
pub const STATE_DIRTY: u32 = 1;

/// An NBD failure.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    /// Reading or writing the connection failed.
    #[error("NBD i/o: {0}")]
    Io(#[from] std::io::Error),
    /// No answer in time.
    #[error("NBD: no answer within {0:?} ({1})")]
    Timeout(Duration, &'static str),
    /// The server sent something the protocol does not allow.
    #[error("NBD protocol: {0}")]
    Protocol(String),
    /// The server refused an option.
    #[error("NBD option {option}: server error {code:#x}: {message}")]
    OptionRefused {
        /// The option.
        option: u32,
        /// `NBD_REP_ERR_*`.
        code: u32,
        /// The server's message.
        message: String,
    },
    /// The server answered a command with an error.
    #[error("NBD command failed: errno {errno}{}", if .message.is_empty() { String::new() } else { format!(": {}", .message) })]
    Command {
        /// The NBD error (an errno value).
        errno: u32,
        /// The server's message (structured replies only).
        message: String,
    },
    /// A request the export cannot serve (beyond its size, or a context not negotiated).
    #[error("NBD request: {0}")]
    Request(String),
}

type Result<T> = std::result::Result<T, NbdError>;

fn proto(s: impl Into<String>) -> NbdError {
    NbdError::Protocol(s.into())
}

/// What to negotiate.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// The export's name.
    pub export: String,
    /// Metadata contexts to ask for (`base:allocation`, `qemu:dirty-bitmap:NAME`).
    pub meta_contexts: Vec<String>,
    /// The bound on every wait.
    pub timeout: Duration,
}

impl ConnectOptions {
    /// Export `export`, no metadata context, a 30-second bound.
    pub fn new(export: &str) -> Self {
        ConnectOptions {
            export: export.to_string(),
            meta_contexts: Vec::new(),
            timeout: Duration::from_secs(30),
        }
    }

    /// Also ask for metadata context `name`.
    pub fn context(mut self, name: &str) -> Self {
        self.meta_contexts.push(name.to_string());
        self
    }
}

/// The export, as `NBD_OPT_GO` described it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportInfo {
    /// Its size in bytes.
    pub size: u64,
    /// Transmission flags (`NBD_FLAG_*`).
    pub flags: u16,
    /// Minimum block size (1 when not stated).
    pub min_block: u32,
    /// Preferred block size (4096 when not stated).
    pub preferred_block: u32,
    /// Maximum payload of one request.
    pub max_block: u32,
}

/// A piece of a structured read reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadChunk {
    /// Bytes at an offset.
    Data {
        /// Where.
        offset: u64,
        /// What.
        data: Vec<u8>,
    },
    /// A range that reads as zeros.
    Hole {
        /// Where.
        offset: u64,
        /// How long.
        len: u32,
    },
}

/// One block-status extent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Where it starts.
    pub offset: u64,
    /// Its length.
    pub len: u64,
    /// The context's flags (`STATE_*`).
    pub flags: u32,
}

/// An NBD connection in transmission phase.
#[derive(Debug)]
pub struct Nbd<S> {
    io: BufStream<S>,
    info: ExportInfo,
    structured: bool,
    contexts: Vec<(String, u32)>,
    next_handle: u64,
    /// The bound on every wait.
    pub timeout: Duration,
}

/// Connects to a unix socket and negotiates.
pub async fn connect_unix(path: &Path, opts: &ConnectOptions) -> Result<Nbd<UnixStream>> {
    let s = within(opts.timeout, "connect", async {
        Ok(UnixStream::connect(path).await?)
    })
    .await?;
    Nbd::handshake(s, opts).await
}

/// Connects over TCP and negotiates.
pub async fn connect_tcp<A: ToSocketAddrs>(
    addr: A,
    opts: &ConnectOptions,
) -> Result<Nbd<TcpStream>> {
    let s = within(opts.timeout, "connect", async {
        Ok(TcpStream::connect(addr).await?)
    })
    .await?;
    s.set_nodelay(true)?;
    Nbd::handshake(s, opts).await
}

async fn within<T>(
    d: Duration,
    what: &'static str,
    f: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    tokio::time::timeout(d, f)
        .await
        .map_err(|_| NbdError::Timeout(d, what))?
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}
fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}
fn be64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

/// Encodes an option request.
fn option_frame(option: u32, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(16 + data.len());
    v.extend_from_slice(&IHAVEOPT.to_be_bytes());
    v.extend_from_slice(&option.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    v
}

/// Encodes a transmission request.
fn request_frame(flags: u16, kind: u16, handle: u64, offset: u64, len: u32) -> [u8; 28] {
    let mut v = [0u8; 28];
    v[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    v[4..6].copy_from_slice(&flags.to_be_bytes());
    v[6..8].copy_from_slice(&kind.to_be_bytes());
    v[8..16].copy_from_slice(&handle.to_be_bytes());
    v[16..24].copy_from_slice(&offset.to_be_bytes());
    v[24..28].copy_from_slice(&len.to_be_bytes());
    v
}

fn name_payload(export: &str) -> Result<Vec<u8>> {
    if export.len() > 4096 {
        return Err(NbdError::Request(
            "export name longer than 4096 bytes".into(),
        ));
    }
    let mut d = Vec::new();
    d.extend_from_slice(&(export.len() as u32).to_be_bytes());
    d.extend_from_slice(export.as_bytes());
    Ok(d)
}

/// Decodes the block-status descriptors of one chunk (after the context id), from `offset` on.
fn decode_extents(payload: &[u8], offset: u64, limit: u64) -> Result<Vec<Extent>> {
    if payload.is_empty() || !payload.len().is_multiple_of(8) {
        return Err(proto(format!(
            "block status: {} bytes of descriptors",
            payload.len()
        )));
    }
    let mut out = Vec::with_capacity(payload.len() / 8);
    let mut at = offset;
    for d in payload.chunks_exact(8) {
        let len = u64::from(be32(d));
        let flags = be32(&d[4..]);
        if len == 0 {
            return Err(proto("block status: an extent of length 0"));
        }
        if at >= limit {
            return Err(proto("block status: extents beyond the export"));
        }
        // The last extent may run past the request; clamp it to the export.
        let len = len.min(limit - at);
        out.push(Extent {
            offset: at,
            len,
            flags,
        });
        at += len;
    }
    Ok(out)
}

impl<S: AsyncRead + AsyncWrite + Unpin> Nbd<S> {
    /// Runs the fixed newstyle handshake on `stream` and enters transmission.
    pub async fn handshake(stream: S, opts: &ConnectOptions) -> Result<Nbd<S>> {
        let mut io = BufStream::new(stream);
        let t = opts.timeout;
        let mut hello = [0u8; 18];
        within(t, "greeting", async {
            io.read_exact(&mut hello).await?;
            Ok(())
        })
        .await?;
        if be64(&hello) != NBDMAGIC {
            return Err(proto("not an NBD server (no NBDMAGIC)"));
        }
        if be64(&hello[8..]) != IHAVEOPT {
            return Err(proto("the server speaks oldstyle NBD, not newstyle"));
        }
        let hflags = be16(&hello[16..]);
        if hflags & FLAG_FIXED_NEWSTYLE == 0 {
            return Err(proto("the server does not speak fixed newstyle"));
        }
        let no_zeroes = hflags & FLAG_NO_ZEROES != 0;
        let cflags = u32::from(FLAG_FIXED_NEWSTYLE) | if no_zeroes { 2 } else { 0 };
        let mut nbd = Nbd {
            io,
            info: ExportInfo {
                size: 0,
                flags: 0,
                min_block: 1,
                preferred_block: 4096,
                max_block: DEFAULT_MAX_BLOCK,
            },
            structured: false,
            contexts: Vec::new(),
            next_handle: 1,
            timeout: t,
        };
        nbd.io.write_all(&cflags.to_be_bytes()).await?;
        match nbd.negotiate(opts).await {
            Ok(()) => Ok(nbd),
            Err(e) => {
                if matches!(e, NbdError::OptionRefused { .. }) {
                    // Say goodbye properly; the server may not answer.
                    let _ = nbd.send_option(OPT_ABORT, &[]).await;
                }
                Err(e)
            }
        }
    }

    async fn negotiate(&mut self, opts: &ConnectOptions) -> Result<()> {
        let nbd = self;
        // Structured replies: needed for block status and sparse reads.
        nbd.send_option(OPT_STRUCTURED_REPLY, &[]).await?;
        let (kind, data) = nbd.option_reply(OPT_STRUCTURED_REPLY).await?;
        match kind {
            REP_ACK => nbd.structured = true,
            k if k & REP_ERR_BIT != 0 => {
                if !opts.meta_contexts.is_empty() {
                    return Err(NbdError::OptionRefused {
                        option: OPT_STRUCTURED_REPLY,
                        code: k,
                        message: String::from_utf8_lossy(&data).into(),
                    });
                }
            }
            k => return Err(proto(format!("structured reply: reply type {k}"))),
        }

        if !opts.meta_contexts.is_empty() {
            let mut d = name_payload(&opts.export)?;
            d.extend_from_slice(&(opts.meta_contexts.len() as u32).to_be_bytes());
            for q in &opts.meta_contexts {
                d.extend_from_slice(&(q.len() as u32).to_be_bytes());
                d.extend_from_slice(q.as_bytes());
            }
            nbd.send_option(OPT_SET_META_CONTEXT, &d).await?;
            loop {
                let (kind, data) = nbd.option_reply(OPT_SET_META_CONTEXT).await?;
                match kind {
                    REP_ACK => break,
                    REP_META_CONTEXT => {
                        if data.len() < 4 {
                            return Err(proto("meta context reply shorter than 4 bytes"));
                        }
                        let id = be32(&data);
                        let name = String::from_utf8(data[4..].to_vec())
                            .map_err(|_| proto("meta context name is not UTF-8"))?;
                        if !opts.meta_contexts.contains(&name) {
                            return Err(proto(format!("meta context {name:?} was not asked for")));
                        }
                        if nbd.contexts.len() >= opts.meta_contexts.len() {
                            return Err(proto("more meta contexts than asked for"));
                        }
                        nbd.contexts.push((name, id));
                    }
                    k if k & REP_ERR_BIT != 0 => {
                        return Err(NbdError::OptionRefused {
                            option: OPT_SET_META_CONTEXT,
                            code: k,
                            message: String::from_utf8_lossy(&data).into(),
                        })
                    }
                    k => return Err(proto(format!("set meta context: reply type {k}"))),
                }
            }
        }

        let mut d = name_payload(&opts.export)?;
        d.extend_from_slice(&1u16.to_be_bytes());
        d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        nbd.send_option(OPT_GO, &d).await?;
        let mut have_export = false;
        loop {
            let (kind, data) = nbd.option_reply(OPT_GO).await?;
            match kind {
                REP_ACK => break,
                REP_INFO => {
                    if data.len() < 2 {
                        return Err(proto("info reply shorter than 2 bytes"));
                    }
                    match be16(&data) {
                        INFO_EXPORT if data.len() == 12 => {
                            nbd.info.size = be64(&data[2..]);
                            nbd.info.flags = be16(&data[10..]);
                            have_export = true;
                        }
                        INFO_BLOCK_SIZE if data.len() == 14 => {
                            let (min, pref, max) =
                                (be32(&data[2..]), be32(&data[6..]), be32(&data[10..]));
                            if min == 0 || pref == 0 || max == 0 {
                                return Err(proto("a block size of 0"));
                            }
                            nbd.info.min_block = min;
                            nbd.info.preferred_block = pref;
                            nbd.info.max_block = max.min(DEFAULT_MAX_BLOCK);
                        }
                        INFO_EXPORT | INFO_BLOCK_SIZE => {
                            return Err(proto("info reply of the wrong length"))
                        }
                        _ => {} // other information: ignored
                    }
                }
                k if k & REP_ERR_BIT != 0 => {
                    return Err(NbdError::OptionRefused {
                        option: OPT_GO,
                        code: k,
                        message: String::from_utf8_lossy(&data).into(),
                    })
                }
                k => return Err(proto(format!("go: reply type {k}"))),
            }
        }
        if !have_export {
            return Err(proto("go acknowledged without the export's size"));
        }
        Ok(())
    }

    async fn send_option(&mut self, option: u32, data: &[u8]) -> Result<()> {
        let frame = option_frame(option, data);
        let io = &mut self.io;
        within(self.timeout, "sending an option", async {
            io.write_all(&frame).await?;
            io.flush().await?;
            Ok(())
        })
        .await
    }

    /// Reads one option reply: (reply type, data), data capped at [`MAX_OPTION_REPLY`].
    async fn option_reply(&mut self, option: u32) -> Result<(u32, Vec<u8>)> {
        let io = &mut self.io;
        within(self.timeout, "option reply", async {
            let mut h = [0u8; 20];
            io.read_exact(&mut h).await?;
            if be64(&h) != OPT_REPLY_MAGIC {
                return Err(proto("option reply without its magic"));
            }
            if be32(&h[8..]) != option {
                return Err(proto(format!(
                    "reply to option {} while {option} was asked",
                    be32(&h[8..])
                )));
            }
            let kind = be32(&h[12..]);
            let len = be32(&h[16..]);
            if len > MAX_OPTION_REPLY {
                return Err(proto(format!("option reply of {len} bytes")));
            }
            let mut data = vec![0u8; len as usize];
            io.read_exact(&mut data).await?;
            Ok((kind, data))
        })
        .await
    }

    /// The export.
    pub fn info(&self) -> ExportInfo {
        self.info
    }

    /// The export's size.
    pub fn size(&self) -> u64 {
        self.info.size
    }

    /// Whether structured replies were negotiated.
    pub fn structured(&self) -> bool {
        self.structured
    }

    /// The id the server gave metadata context `name`, if it agreed to it.
    pub fn context_id(&self, name: &str) -> Option<u32> {
        self.contexts.iter().find(|(n, _)| n == name).map(|c| c.1)
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        if len == 0 || offset.checked_add(len).is_none_or(|e| e > self.info.size) {
            return Err(NbdError::Request(format!(
                "{offset}+{len} outside an export of {} bytes",
                self.info.size
            )));
        }
        Ok(())
    }

    async fn send_request(&mut self, kind: u16, flags: u16, offset: u64, len: u32) -> Result<u64> {
        let handle = self.next_handle;
        self.next_handle += 1;
        let frame = request_frame(flags, kind, handle, offset, len);
        let io = &mut self.io;
        within(self.timeout, "sending a request", async {
            io.write_all(&frame).await?;
            io.flush().await?;
            Ok(())
        })
        .await?;
        Ok(handle)
    }

    /// Reads `len` bytes at `offset` as the server sends them (data and holes), in offset order.
    /// `len` is at most [`ExportInfo::max_block`].
    pub async fn read_chunks(&mut self, offset: u64, len: u32) -> Result<Vec<ReadChunk>> {
        self.check_range(offset, u64::from(len))?;
        if len > self.info.max_block {
            return Err(NbdError::Request(format!(
                "a read of {len} bytes: the server's maximum is {}",
                self.info.max_block
            )));
        }
        let handle = self.send_request(CMD_READ, 0, offset, len).await?;
        let timeout = self.timeout;
        let structured = self.structured;
        let io = &mut self.io;
        let mut chunks = within(
            timeout,
            "read reply",
            read_reply(io, structured, handle, offset, len),
        )
        .await?;
        chunks.sort_by_key(|c| match c {
            ReadChunk::Data { offset, .. } | ReadChunk::Hole { offset, .. } => *offset,
        });
        Ok(chunks)
    }

    /// Reads `len` bytes at `offset` (holes as zeros); any length within the export.
    pub async fn read(&mut self, offset: u64, len: u64) -> Result<Vec<u8>> {
        if len == 0 {
            return Ok(Vec::new());
        }
        self.check_range(offset, len)?;
        let len_usize = usize::try_from(len).map_err(|_| NbdError::Request("too long".into()))?;
        let mut out = vec![0u8; len_usize];
        let step = u64::from(self.info.max_block.min(DEFAULT_MAX_BLOCK));
        let mut at = offset;
        while at < offset + len {
            let n = step.min(offset + len - at) as u32;
            for c in self.read_chunks(at, n).await? {
                if let ReadChunk::Data { offset: o, data } = c {
                    let s = (o - offset) as usize;
                    out[s..s + data.len()].copy_from_slice(&data);
                }
            }
            at += u64::from(n);
        }
        Ok(out)
    }

    /// Block status of context `context` (an id from [`Nbd::context_id`]) for `offset..offset+len`:
    /// the extents of one reply (they may cover less than asked; see [`Nbd::extents`]).
    pub async fn block_status(
        &mut self,
        context: u32,
        offset: u64,
        len: u32,
    ) -> Result<Vec<Extent>> {
        if !self.structured {
            return Err(NbdError::Request(
                "block status needs structured replies".into(),
            ));
        }
        if !self.contexts.iter().any(|c| c.1 == context) {
            return Err(NbdError::Request(format!(
                "context {context} was not negotiated"
            )));
        }
        self.check_range(offset, u64::from(len))?;
        let handle = self.send_request(CMD_BLOCK_STATUS, 0, offset, len).await?;
        let timeout = self.timeout;
        let limit = self.info.size;
        let n_contexts = self.contexts.len();
        let io = &mut self.io;
        within(timeout, "block status reply", async move {
            let mut mine: Option<Vec<Extent>> = None;
            let mut chunks = 0usize;
            loop {
                let c = read_chunk_header(io, handle).await?;
                match c.kind {
                    REPLY_TYPE_BLOCK_STATUS => {
                        chunks += 1;
                        if chunks > n_contexts {
                            return Err(proto("more block status chunks than contexts"));
                        }
                        if c.len < 12 || c.len > MAX_BLOCK_STATUS_REPLY {
                            return Err(proto(format!("block status chunk of {} bytes", c.len)));
                        }
                        let mut p = vec![0u8; c.len as usize];
                        io.read_exact(&mut p).await?;
                        if be32(&p) == context {
                            if mine.is_some() {
                                return Err(proto("two block status chunks for one context"));
                            }
                            mine = Some(decode_extents(&p[4..], offset, limit)?);
                        }
                    }
                    REPLY_TYPE_NONE if c.len == 0 => {}
                    k if k & REPLY_TYPE_ERROR_BIT != 0 => {
                        return Err(read_error_chunk(io, &c).await?);
                    }
                    k => return Err(proto(format!("block status: reply chunk type {k}"))),
                }
                if c.flags & REPLY_FLAG_DONE != 0 {
                    break;
                }
            }
            mine.ok_or_else(|| proto("block status reply without the context asked for"))
        })
        .await
    }

    /// Block status of context `context` over `range`, complete: the extents, in order, cover it
    /// exactly.
    pub async fn extents(&mut self, context: u32, range: Range<u64>) -> Result<Vec<Extent>> {
        let mut out: Vec<Extent> = Vec::new();
        let mut at = range.start;
        // Requests of at most 1 GiB keep each reply small.
        const STEP: u64 = 1 << 30;
        while at < range.end {
            let n = STEP.min(range.end - at) as u32;
            for mut e in self.block_status(context, at, n).await? {
                if e.offset >= range.end {
                    break;
                }
                e.len = e.len.min(range.end - e.offset);
                at = e.offset + e.len;
                match out.last_mut() {
                    Some(l) if l.flags == e.flags && l.offset + l.len == e.offset => l.len += e.len,
                    _ => out.push(e),
                }
            }
        }
        Ok(out)
    }

    /// Says goodbye (`NBD_CMD_DISC`) and closes the connection.
    pub async fn disconnect(mut self) -> Result<()> {
        self.send_request(CMD_DISC, 0, 0, 0).await?;
        let io = &mut self.io;
        within(self.timeout, "shutdown", async {
            io.shutdown().await?;
            Ok(())
        })
        .await
    }
}

struct ChunkHeader {
    flags: u16,
    kind: u16,
    len: u32,
}

/// Reads a structured reply chunk header for `handle`.
async fn read_chunk_header<R: AsyncRead + Unpin>(io: &mut R, handle: u64) -> Result<ChunkHeader> {
    let mut h = [0u8; 20];
    io.read_exact(&mut h).await?;
    if be32(&h) != STRUCTURED_REPLY_MAGIC {
        return Err(proto(format!("reply magic {:#x}", be32(&h))));
    }
    if be64(&h[8..]) != handle {
        return Err(proto(format!("a reply for handle {}", be64(&h[8..]))));
    }
    Ok(ChunkHeader {
        flags: be16(&h[4..]),
        kind: be16(&h[6..]),
        len: be32(&h[16..]),
    })
}

/// Reads an error chunk's payload and turns it into the error.
async fn read_error_chunk<R: AsyncRead + Unpin>(io: &mut R, c: &ChunkHeader) -> Result<NbdError> {
    if c.len < 6 || c.len > MAX_ERROR_CHUNK {
        return Err(proto(format!("error chunk of {} bytes", c.len)));
    }
    let mut p = vec![0u8; c.len as usize];
    io.read_exact(&mut p).await?;
    let errno = be32(&p);
    let mlen = usize::from(be16(&p[4..]));
    let extra = if c.kind == REPLY_TYPE_ERROR_OFFSET {
        8
    } else {
        0
    };
    if 6 + mlen + extra != p.len() {
        return Err(proto("error chunk length does not match its message"));
    }
    if errno == 0 {
        return Err(proto("error chunk with error 0"));
    }
    Ok(NbdError::Command {
        errno,
        message: String::from_utf8_lossy(&p[6..6 + mlen]).into(),
    })
}

/// Reads the reply to a read of `len` bytes at `offset`.
async fn read_reply<R: AsyncRead + Unpin>(
    io: &mut R,
    structured: bool,
    handle: u64,
    offset: u64,
    len: u32,
) -> Result<Vec<ReadChunk>> {
    let mut magic = [0u8; 4];
    io.read_exact(&mut magic).await?;
    if be32(&magic) == SIMPLE_REPLY_MAGIC {
        let mut h = [0u8; 12];
        io.read_exact(&mut h).await?;
        if be64(&h[4..]) != handle {
            return Err(proto(format!("a reply for handle {}", be64(&h[4..]))));
        }
        let errno = be32(&h);
        if errno != 0 {
            return Err(NbdError::Command {
                errno,
                message: String::new(),
            });
        }
        if structured {
            // Allowed by the protocol only for errors.
            return Err(proto(
                "a simple reply with data after structured replies were agreed",
            ));
        }
        let mut data = vec![0u8; len as usize];
        io.read_exact(&mut data).await?;
        return Ok(vec![ReadChunk::Data { offset, data }]);
    }
    if !structured {
        return Err(proto(format!("reply magic {:#x}", be32(&magic))));
    }
    // Structured: chunks until DONE. Covered ranges are kept to refuse overlaps and to check that
    // the whole request is answered.
    let mut covered: BTreeMap<u64, u64> = BTreeMap::new();
    let mut covered_bytes = 0u64;
    let mut out = Vec::new();
    let end = offset + u64::from(len);
    let mut first = true;
    let mut error: Option<NbdError> = None;
    loop {
        let mut rest = [0u8; 16];
        if first {
            io.read_exact(&mut rest).await?;
        } else {
            io.read_exact(&mut magic).await?;
            io.read_exact(&mut rest).await?;
        }
        first = false;
        if be32(&magic) != STRUCTURED_REPLY_MAGIC {
            return Err(proto(format!("reply magic {:#x}", be32(&magic))));
        }
        if be64(&rest[4..]) != handle {
            return Err(proto(format!("a reply for handle {}", be64(&rest[4..]))));
        }
        let c = ChunkHeader {
            flags: be16(&rest),
            kind: be16(&rest[2..]),
            len: be32(&rest[12..]),
        };
        match c.kind {
            REPLY_TYPE_OFFSET_DATA | REPLY_TYPE_OFFSET_HOLE => {
                let hole = c.kind == REPLY_TYPE_OFFSET_HOLE;
                if (hole && c.len != 12) || (!hole && (c.len <= 8 || c.len - 8 > len)) {
                    return Err(proto(format!(
                        "read chunk of {} bytes for a read of {len}",
                        c.len
                    )));
                }
                let mut o = [0u8; 8];
                io.read_exact(&mut o).await?;
                let at = be64(&o);
                let n = if hole {
                    let mut l = [0u8; 4];
                    io.read_exact(&mut l).await?;
                    u64::from(be32(&l))
                } else {
                    u64::from(c.len - 8)
                };
                if n == 0 || at < offset || at.checked_add(n).is_none_or(|e| e > end) {
                    return Err(proto(format!(
                        "read chunk {at}+{n} outside the request {offset}+{len}"
                    )));
                }
                let before = covered.range(..at + n).next_back();
                if before.is_some_and(|(&s, &l)| s + l > at) {
                    return Err(proto("overlapping read chunks"));
                }
                covered.insert(at, n);
                covered_bytes += n;
                if hole {
                    out.push(ReadChunk::Hole {
                        offset: at,
                        len: n as u32,
                    });
                } else {
                    let mut data = vec![0u8; n as usize];
                    io.read_exact(&mut data).await?;
                    out.push(ReadChunk::Data { offset: at, data });
                }
            }
            REPLY_TYPE_NONE => {
                if c.len != 0 {
                    return Err(proto("a NONE chunk with a payload"));
                }
            }
            k if k & REPLY_TYPE_ERROR_BIT != 0 => {
                let e = read_error_chunk(io, &c).await?;
                error.get_or_insert(e);
            }
            k => return Err(proto(format!("read: reply chunk type {k}"))),
        }
        if c.flags & REPLY_FLAG_DONE != 0 {
            break;
        }
    }
    if let Some(e) = error {
        return Err(e);
    }
    if covered_bytes != u64::from(len) {
        return Err(proto(format!(
            "read reply covers {covered_bytes} of {len} bytes"
        )));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::DuplexStream;

    fn opt_reply(option: u32, kind: u32, data: &[u8]) -> Vec<u8> {
        let mut v = OPT_REPLY_MAGIC.to_be_bytes().to_vec();
        v.extend_from_slice(&option.to_be_bytes());
        v.extend_from_slice(&kind.to_be_bytes());
        v.extend_from_slice(&(data.len() as u32).to_be_bytes());
        v.extend_from_slice(data);
        v
    }

    fn chunk(flags: u16, kind: u16, handle: u64, payload: &[u8]) -> Vec<u8> {
        let mut v = STRUCTURED_REPLY_MAGIC.to_be_bytes().to_vec();
        v.extend_from_slice(&flags.to_be_bytes());
        v.extend_from_slice(&kind.to_be_bytes());
        v.extend_from_slice(&handle.to_be_bytes());
        v.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        v.extend_from_slice(payload);
        v
    }

    /// A scripted server: answers the handshake (structured replies, one context with id 7, an
    /// export of `size` bytes), then reads one request and writes `reply(handle)`.
    async fn scripted(
        size: u64,
        reply: impl FnOnce(u64) -> Vec<u8> + Send + 'static,
    ) -> Nbd<DuplexStream> {
        let (client, mut server) = tokio::io::duplex(1 << 20);
        tokio::spawn(async move {
            let mut hello = NBDMAGIC.to_be_bytes().to_vec();
            hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
            hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
            server.write_all(&hello).await.unwrap();
            let mut cf = [0u8; 4];
            server.read_exact(&mut cf).await.unwrap();
            loop {
                let mut h = [0u8; 16];
                server.read_exact(&mut h).await.unwrap();
                assert_eq!(be64(&h), IHAVEOPT);
                let opt = be32(&h[8..]);
                let mut d = vec![0u8; be32(&h[12..]) as usize];
                server.read_exact(&mut d).await.unwrap();
                match opt {
                    OPT_STRUCTURED_REPLY => server
                        .write_all(&opt_reply(opt, REP_ACK, &[]))
                        .await
                        .unwrap(),
                    OPT_SET_META_CONTEXT => {
                        let mut p = 7u32.to_be_bytes().to_vec();
                        p.extend_from_slice(b"qemu:dirty-bitmap:b");
                        server
                            .write_all(&opt_reply(opt, REP_META_CONTEXT, &p))
                            .await
                            .unwrap();
                        server
                            .write_all(&opt_reply(opt, REP_ACK, &[]))
                            .await
                            .unwrap();
                    }
                    OPT_GO => {
                        let mut p = INFO_EXPORT.to_be_bytes().to_vec();
                        p.extend_from_slice(&size.to_be_bytes());
                        p.extend_from_slice(&(1u16 | FLAG_READ_ONLY).to_be_bytes());
                        server
                            .write_all(&opt_reply(opt, REP_INFO, &p))
                            .await
                            .unwrap();
                        server
                            .write_all(&opt_reply(opt, REP_ACK, &[]))
                            .await
                            .unwrap();
                        break;
                    }
                    o => panic!("option {o}"),
                }
            }
            let mut req = [0u8; 28];
            server.read_exact(&mut req).await.unwrap();
            assert_eq!(be32(&req), REQUEST_MAGIC);
            server.write_all(&reply(be64(&req[8..]))).await.unwrap();
            // Keep the stream open until the client is done.
            let mut sink = Vec::new();
            let _ = server.read_to_end(&mut sink).await;
        });
        let opts = ConnectOptions {
            timeout: Duration::from_secs(2),
            ..ConnectOptions::new("x").context("qemu:dirty-bitmap:b")
        };
        Nbd::handshake(client, &opts).await.unwrap()
    }

    #[test]
    fn frames_encode() {
        let f = option_frame(OPT_GO, b"ab");
        assert_eq!(&f[..8], b"IHAVEOPT");
        assert_eq!(be32(&f[8..]), 7);
        assert_eq!(be32(&f[12..]), 2);
        assert_eq!(&f[16..], b"ab");
        let r = request_frame(0, CMD_READ, 9, 4096, 512);
        assert_eq!(be32(&r), REQUEST_MAGIC);
        assert_eq!(be16(&r[6..]), CMD_READ);
        assert_eq!(be64(&r[8..]), 9);
        assert_eq!(be64(&r[16..]), 4096);
        assert_eq!(be32(&r[24..]), 512);
    }

    #[test]
    fn extents_decode_and_clamp() {
        let mut p = Vec::new();
        for (l, f) in [(4096u32, 1u32), (8192, 0), (1 << 20, 1)] {
            p.extend_from_slice(&l.to_be_bytes());
            p.extend_from_slice(&f.to_be_bytes());
        }
        let e = decode_extents(&p, 0, 20000).unwrap();
        assert_eq!(e.len(), 3);
        assert_eq!((e[1].offset, e[1].len, e[1].flags), (4096, 8192, 0));
        assert_eq!(e[2].len, 20000 - 12288);
        assert!(decode_extents(&p[..7], 0, 1 << 30).is_err());
        assert!(
            decode_extents(&[0; 8], 0, 1 << 30).is_err(),
            "zero-length extent"
        );
        assert!(
            decode_extents(&p, 0, 4096).is_err(),
            "extents past the export"
        );
    }

    #[tokio::test]
    async fn handshake_negotiates_contexts_and_size() {
        let n = scripted(1 << 20, |_| Vec::new()).await;
        assert_eq!(n.size(), 1 << 20);
        assert!(n.structured());
        assert_eq!(n.context_id("qemu:dirty-bitmap:b"), Some(7));
        assert_eq!(n.info().flags & FLAG_READ_ONLY, FLAG_READ_ONLY);
    }

    #[tokio::test]
    async fn structured_read_assembles_data_and_holes() {
        let mut n = scripted(1 << 20, |h| {
            let mut d = 4096u64.to_be_bytes().to_vec();
            d.extend_from_slice(&[0xab; 100]);
            let mut hole = 4196u64.to_be_bytes().to_vec();
            hole.extend_from_slice(&100u32.to_be_bytes());
            let mut v = chunk(0, REPLY_TYPE_OFFSET_HOLE, h, &hole);
            v.extend(chunk(REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, h, &d));
            v
        })
        .await;
        let data = n.read(4096, 200).await.unwrap();
        assert_eq!(&data[..100], &[0xab; 100]);
        assert_eq!(&data[100..], &[0; 100]);
    }

    #[tokio::test]
    async fn a_chunk_longer_than_the_request_is_refused() {
        let mut n = scripted(1 << 20, |h| {
            let mut d = 0u64.to_be_bytes().to_vec();
            d.extend_from_slice(&[1; 300]);
            chunk(REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, h, &d)
        })
        .await;
        let e = n.read(0, 200).await.unwrap_err();
        assert!(matches!(e, NbdError::Protocol(_)), "{e}");
    }

    #[tokio::test]
    async fn overlapping_or_short_replies_are_refused() {
        let mut n = scripted(1 << 20, |h| {
            let mut d = 0u64.to_be_bytes().to_vec();
            d.extend_from_slice(&[1; 100]);
            let mut v = chunk(0, REPLY_TYPE_OFFSET_DATA, h, &d);
            v.extend(chunk(REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, h, &d));
            v
        })
        .await;
        assert!(n
            .read(0, 200)
            .await
            .unwrap_err()
            .to_string()
            .contains("overlapping"));
        let mut n = scripted(1 << 20, |h| {
            let mut d = 0u64.to_be_bytes().to_vec();
            d.extend_from_slice(&[1; 100]);
            chunk(REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, h, &d)
        })
        .await;
        assert!(n
            .read(0, 200)
            .await
            .unwrap_err()
            .to_string()
            .contains("covers"));
    }

    #[tokio::test]
    async fn error_chunks_become_command_errors() {
        let mut n = scripted(1 << 20, |h| {
            let mut p = 5u32.to_be_bytes().to_vec();
            p.extend_from_slice(&3u16.to_be_bytes());
            p.extend_from_slice(b"bad");
            chunk(REPLY_FLAG_DONE, REPLY_TYPE_ERROR_BIT + 1, h, &p)
        })
        .await;
        match n.read(0, 10).await.unwrap_err() {
            NbdError::Command { errno, message } => {
                assert_eq!((errno, message.as_str()), (5, "bad"))
            }
            e => panic!("{e}"),
        }
    }

    #[tokio::test]
    async fn block_status_reads_the_context() {
        let mut n = scripted(1 << 20, |h| {
            let mut p = 7u32.to_be_bytes().to_vec();
            for (l, f) in [(65536u32, 1u32), (1 << 20, 0)] {
                p.extend_from_slice(&l.to_be_bytes());
                p.extend_from_slice(&f.to_be_bytes());
            }
            chunk(REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, h, &p)
        })
        .await;
        let e = n.extents(7, 0..1 << 20).await.unwrap();
        assert_eq!(e.len(), 2);
        assert_eq!((e[0].len, e[0].flags), (65536, 1));
        assert_eq!(e[1].offset + e[1].len, 1 << 20);
        assert!(n.block_status(8, 0, 10).await.is_err(), "not negotiated");
    }

    #[tokio::test]
    async fn a_silent_server_times_out() {
        let (client, _server) = tokio::io::duplex(64);
        let opts = ConnectOptions {
            timeout: Duration::from_millis(100),
            ..ConnectOptions::new("x")
        };
        assert!(matches!(
            Nbd::handshake(client, &opts).await.unwrap_err(),
            NbdError::Timeout(..)
        ));
    }

    #[tokio::test]
    async fn an_oversized_option_reply_is_refused() {
        let (client, mut server) = tokio::io::duplex(1 << 20);
        tokio::spawn(async move {
            let mut hello = NBDMAGIC.to_be_bytes().to_vec();
            hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
            hello.extend_from_slice(&FLAG_FIXED_NEWSTYLE.to_be_bytes());
            server.write_all(&hello).await.unwrap();
            let mut b = [0u8; 20];
            server.read_exact(&mut b).await.unwrap();
            let mut v = OPT_REPLY_MAGIC.to_be_bytes().to_vec();
            v.extend_from_slice(&OPT_STRUCTURED_REPLY.to_be_bytes());
            v.extend_from_slice(&REP_ACK.to_be_bytes());
            v.extend_from_slice(&u32::MAX.to_be_bytes());
            server.write_all(&v).await.unwrap();
            let _ = server.read_to_end(&mut Vec::new()).await;
        });
        let e = Nbd::handshake(client, &ConnectOptions::new("x"))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("option reply of"), "{e}");
    }
}
