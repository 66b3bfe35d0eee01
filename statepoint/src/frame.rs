//! The checkpoint wire format: one frame per epoch ("statepoint").
//!
//! A frame carries everything the replica needs to move its committed state from epoch `n - 1`
//! to epoch `n`: the pages dirtied during the epoch (as XOR deltas against the previously
//! committed contents), the disk writes of the epoch, the serialised vCPU/device state and the
//! guest console output of the epoch. Both sides start from all-zero guest memory, so the first
//! frame's deltas are simply the page contents.
//!
//! # Layout
//!
//! All integers are little-endian. A frame is the concatenation of the sections below, with no
//! padding between them.
//!
//! ## Header (72 bytes)
//!
//! | offset | size | field             | meaning                                                        |
//! |-------:|-----:|-------------------|----------------------------------------------------------------|
//! |      0 |    4 | `magic`           | `b"AXSP"`                                                      |
//! |      4 |    2 | `version`         | `1`                                                            |
//! |      6 |    2 | `flags`           | bit 0 [`FLAG_DENSE_ZSTD`], bit 1 [`FLAG_SPARSE_ZSTD`]; other bits must be 0 |
//! |      8 |    8 | `epoch`           | epoch number of this checkpoint                                |
//! |     16 |    8 | `total_len`       | length of the whole frame, header and trailing CRC included    |
//! |     24 |    4 | `n_ranges`        | number of entries in the range table                           |
//! |     28 |    4 | `n_disk_writes`   | number of entries in the disk table                            |
//! |     32 |    4 | `state_len`       | length of the state section                                    |
//! |     36 |    4 | `console_len`     | length of the console section                                  |
//! |     40 |    8 | `disk_data_len`   | total length of the disk write data                            |
//! |     48 |    8 | `mem_sparse_len`  | length of the sparse stream (uncompressed)                     |
//! |     56 |    8 | `mem_sparse_zlen` | length of the sparse section as stored                         |
//! |     64 |    8 | `mem_dense_zlen`  | length of the dense section as stored                          |
//!
//! (The 64-byte header first planned grew by `mem_dense_zlen`: dense blocks travel apart from the
//! sparse stream, see below.)
//!
//! ## Body
//!
//! | section     | size                 | contents                                                                 |
//! |-------------|----------------------|--------------------------------------------------------------------------|
//! | ranges      | `16 * n_ranges`      | `(first_page u64, pages u64)` per range: sorted, non-empty, non-adjacent, inside guest memory |
//! | disk table  | `16 * n_disk_writes` | `(sector u64, len u64)` per write; `len` a non-zero multiple of 512; inside the disk |
//! | disk data   | `disk_data_len`      | the data of the writes, in table order (`disk_data_len` = sum of `len`) |
//! | state       | `state_len`          | opaque (the VMM's postcard-serialised vCPU and device state)             |
//! | console     | `console_len`        | guest console output produced during the epoch                          |
//! | dense       | `mem_dense_zlen`     | the dense stream: raw, or one zstd frame of it if [`FLAG_DENSE_ZSTD`]    |
//! | sparse      | `mem_sparse_zlen`    | the sparse stream: raw, or one zstd frame of it if [`FLAG_SPARSE_ZSTD`]  |
//! | trailer     | 4                    | CRC-32 (IEEE, as computed by `crc32fast`) of every preceding byte        |
//!
//! `total_len` = 72 + 16·`n_ranges` + 16·`n_disk_writes` + `disk_data_len` + `state_len` +
//! `console_len` + `mem_dense_zlen` + `mem_sparse_zlen` + 4. A raw section is exactly its stream
//! (`mem_sparse_zlen == mem_sparse_len`); an empty stream is an empty section with its flag clear
//! (no zstd frame). With no page listed, all three memory lengths and the flags are 0.
//!
//! ## Memory: the sparse and dense streams
//!
//! Let `P` be the number of pages listed by the ranges. For every listed page, in range order,
//! `delta` = (contents at this epoch) XOR (contents committed at the previous epoch). A page is
//! 8 *blocks* of 512 bytes; a block is 64 *words* of 8 bytes. A block's *mask* has bit `b` set iff
//! word `b` of the block's delta (block bytes `8b .. 8b+8`) is non-zero. A block is *zero* (mask
//! 0), *full* (mask all ones) or *partial*.
//!
//! * The **sparse stream** holds, for every page in order: the page's 8 block masks (64 bytes:
//!   8 little-endian `u64`, block 0 first), then the non-zero words of its partial blocks, block
//!   by block, in increasing word order, bytes as in the page. So `mem_sparse_len` =
//!   64·`P` + 8·(non-zero words in partial blocks).
//! * The **dense stream** holds the 512-byte delta of every full block, in page and block order:
//!   512·(number of full blocks) bytes, a length the reader derives from the masks.
//!
//! A reader accepts a set mask bit for a zero word (an encoder never writes one).
//!
//! # Why this shape, and the default levels
//!
//! Zero-word elision (the analogue of XBZRLE's zero runs) is the step that pays: a page where a
//! few dozen words changed costs 64 bytes of masks plus those words, an unchanged page 64 bytes.
//! On the synthetic rewrite workload ([`workload::synthetic_rewrite`]) it alone shrinks dirty
//! memory about 5×, at 5–7 GB/s per core (the XOR pass, shadow update included, is bound by memory
//! bandwidth). zstd then compresses the sparse stream. On the machines this was measured on, zstd
//! runs at 270–540 MB/s of its input at levels 1..-10 but 670–740 MB/s at its fast level -20, which
//! keeps the whole encode at 3.2–3.4 GB/s per core (1024 to 16384 dirty pages) while still gaining
//! about 10% over storing (5.5–5.7× in all instead of 5.0–5.2×); level 1 would give 6.8× at
//! 1.8–2.0 GB/s. Hence [`DEFAULT_ZSTD_LEVEL`] = -20 for the sparse stream. Blocks where every word
//! changed (fully rewritten pages: I/O buffers, compressed, encrypted or fresh data) are kept out
//! of the zstd input and stored by default, because zstd gains nothing on incompressible data and
//! is at its slowest on compressible text ([`Encoder::set_dense_level`] changes that). On links
//! slower than about 150 MB/s a higher level (`-5`..`3`) pays for itself; `examples/encode_speed.rs`
//! prints the trade-off.
//!
//! # Validation
//!
//! [`decode`] checks every declared length against the [`Limits`] and against the actual input
//! before allocating anything, checks the CRC, validates every range against guest memory and
//! every disk write against the disk, decompresses into buffers of exactly the declared (sparse)
//! or implied (dense) size — bounded by 4160·`P` and 4096·`P`, never by the size hint inside a
//! zstd frame — and parses the streams with bounds-checked reads. It never panics on any input.
//!
//! Peak allocation of a decode is the frame's own sections, the decompressed streams (only when
//! compressed) and `4096·P` bytes for the expanded deltas: for a frame that lists every page,
//! at most about 3 × guest memory. Fresh deltas are `calloc`ed, so the pages of memory whose delta
//! is zero are never touched.

use std::fmt;
use std::io::Cursor;
use std::time::{Duration, Instant};

use crate::ranges::{MemoryRange, MemoryRangeTable};

/// Frame magic, the first four bytes of every frame.
pub const MAGIC: [u8; 4] = *b"AXSP";
/// Format version written by this code and the only one it reads.
pub const VERSION: u16 = 1;
/// Length of the fixed header.
pub const HEADER_LEN: usize = 72;
/// Length of the trailing CRC.
pub const TRAILER_LEN: usize = 4;
/// Smallest possible frame: a header and a trailer.
pub const MIN_FRAME_LEN: usize = HEADER_LEN + TRAILER_LEN;
/// Header flag: the dense section is a zstd frame (otherwise it is the raw dense stream).
pub const FLAG_DENSE_ZSTD: u16 = 1;
/// Header flag: the sparse section is a zstd frame (otherwise it is the raw sparse stream).
pub const FLAG_SPARSE_ZSTD: u16 = 2;
/// Every flag this version defines.
pub const KNOWN_FLAGS: u16 = FLAG_DENSE_ZSTD | FLAG_SPARSE_ZSTD;
/// The "level" that means: store, do not run zstd (like zlib's level 0).
pub const STORE: i32 = 0;
/// Disk sector size: disk writes are whole sectors.
pub const SECTOR_SIZE: u64 = 512;
/// Default level of [`Encoder`] for the sparse stream: zstd's fast level -20, chosen by
/// measurement with `examples/encode_speed.rs` (see the module documentation): it keeps encoding
/// above 3 GB/s per core while still compressing the zero-elided stream.
pub const DEFAULT_ZSTD_LEVEL: i32 = -20;
/// Length of one entry of the range table or of the disk table.
pub const TABLE_ENTRY_LEN: usize = 16;
/// Length of a page's masks in the sparse stream.
pub const MASK_LEN: usize = 64;
/// Length of a block (the unit of the masks and of the dense stream).
pub const BLOCK_LEN: usize = 512;
/// Maximum size of one page in the sparse stream (masks + every word).
pub const MAX_SPARSE_PAGE_LEN: usize = MASK_LEN + PAGE;

/// Guest page size (the same as `crate::PAGE_SIZE`; kept local so the format never changes with it).
const PAGE: usize = 4096;
const PAGE_U64: u64 = PAGE as u64;

/// Bounds that a decoded frame must respect; they bound everything [`decode`] allocates.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest acceptable `total_len`.
    pub max_frame_bytes: u64,
    /// Guest memory size in pages: every range must end at or below it.
    pub max_pages: u64,
    /// Largest acceptable `n_ranges`.
    pub max_ranges: u32,
    /// Largest acceptable `state_len`.
    pub max_state_bytes: u32,
    /// Largest acceptable `console_len`.
    pub max_console_bytes: u32,
    /// Largest acceptable `n_disk_writes`.
    pub max_disk_writes: u32,
    /// Largest acceptable `disk_data_len`.
    pub max_disk_bytes: u64,
    /// Disk size in sectors: every write must end at or below it.
    pub disk_sectors: u64,
}

impl Limits {
    /// Default cap of [`Limits::max_state_bytes`] (vCPU + device state of one epoch).
    pub const DEFAULT_MAX_STATE_BYTES: u32 = 16 << 20;
    /// Default cap of [`Limits::max_console_bytes`].
    pub const DEFAULT_MAX_CONSOLE_BYTES: u32 = 16 << 20;
    /// Default cap of [`Limits::max_disk_bytes`] (disk data written during one epoch).
    pub const DEFAULT_MAX_DISK_BYTES: u64 = 1 << 30;
    /// Default cap of [`Limits::max_disk_writes`].
    pub const DEFAULT_MAX_DISK_WRITES: u32 = 1 << 20;

    /// Limits for a VM with `mem_size` bytes of memory and a disk of `disk_bytes` bytes:
    /// ranges must lie in memory (at most `ceil(pages / 2)` ranges, the most a coalesced table
    /// can have), writes on the disk; state and console are capped at 16 MiB, disk data at
    /// min(disk size, 1 GiB) per epoch in at most 2^20 writes; `max_frame_bytes` is the sum of all
    /// section maxima (so it never rejects a frame whose sections are all within their limits).
    pub fn for_vm(mem_size: u64, disk_bytes: u64) -> Self {
        let max_pages = mem_size / PAGE_U64;
        let max_ranges = u32::try_from(max_pages.div_ceil(2)).unwrap_or(u32::MAX);
        let max_disk_bytes = disk_bytes.min(Self::DEFAULT_MAX_DISK_BYTES);
        let max_disk_writes = u32::try_from(max_disk_bytes / SECTOR_SIZE)
            .unwrap_or(u32::MAX)
            .min(Self::DEFAULT_MAX_DISK_WRITES);
        let mut limits = Limits {
            max_frame_bytes: 0,
            max_pages,
            max_ranges,
            max_state_bytes: Self::DEFAULT_MAX_STATE_BYTES,
            max_console_bytes: Self::DEFAULT_MAX_CONSOLE_BYTES,
            max_disk_writes,
            max_disk_bytes,
            disk_sectors: disk_bytes / SECTOR_SIZE,
        };
        limits.max_frame_bytes = limits.largest_frame();
        limits
    }

    /// The largest frame whose sections are each within these limits (saturating).
    pub fn largest_frame(&self) -> u64 {
        let bound = |n: u64| {
            usize::try_from(n)
                .map(|n| zstd::zstd_safe::compress_bound(n) as u64)
                .unwrap_or(u64::MAX)
        };
        let sparse = bound(self.max_pages.saturating_mul(MAX_SPARSE_PAGE_LEN as u64));
        let dense = bound(self.max_pages.saturating_mul(PAGE_U64));
        [
            MIN_FRAME_LEN as u64,
            u64::from(self.max_ranges).saturating_mul(TABLE_ENTRY_LEN as u64),
            u64::from(self.max_disk_writes).saturating_mul(TABLE_ENTRY_LEN as u64),
            self.max_disk_bytes,
            u64::from(self.max_state_bytes),
            u64::from(self.max_console_bytes),
            sparse,
            dense,
        ]
        .into_iter()
        .fold(0u64, u64::saturating_add)
    }

    /// No limit at all, except that ranges must lie below `max_pages` (what an [`Encoder`]
    /// without receiver limits checks).
    fn unlimited(max_pages: u64) -> Self {
        Limits {
            max_frame_bytes: u64::MAX,
            max_pages,
            max_ranges: u32::MAX,
            max_state_bytes: u32::MAX,
            max_console_bytes: u32::MAX,
            max_disk_writes: u32::MAX,
            max_disk_bytes: u64::MAX,
            disk_sectors: u64::MAX,
        }
    }
}

/// Everything that can be wrong with a frame or with the input of an encode.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The first four bytes are not [`MAGIC`].
    #[error("bad magic {found:02x?}, expected {:02x?} (\"AXSP\")", MAGIC)]
    BadMagic {
        /// The bytes found.
        found: [u8; 4],
    },
    /// The version is not [`VERSION`].
    #[error("unsupported frame version {found}, this build reads version {supported}")]
    UnsupportedVersion {
        /// Version found in the header.
        found: u16,
        /// The version this code reads.
        supported: u16,
    },
    /// Non-zero flags (none is defined in version 1).
    #[error("unsupported frame flags {found:#06x} (version 1 defines none)")]
    UnsupportedFlags {
        /// Flags found in the header.
        found: u16,
    },
    /// The input ends before a structure it must contain.
    #[error("truncated {what}: need {need} bytes, have {have}")]
    Truncated {
        /// What was being read.
        what: &'static str,
        /// Bytes needed.
        need: u64,
        /// Bytes available.
        have: u64,
    },
    /// A declared length disagrees with the data.
    #[error("length mismatch in {field}: declared {declared}, actual {actual}")]
    LengthMismatch {
        /// The length field.
        field: &'static str,
        /// The declared value.
        declared: u64,
        /// What the data says.
        actual: u64,
    },
    /// A value exceeds its limit.
    #[error("{field} = {value} exceeds the limit {limit}")]
    TooLarge {
        /// The field.
        field: &'static str,
        /// Its value.
        value: u64,
        /// The limit.
        limit: u64,
    },
    /// A value is below its minimum.
    #[error("{field} = {value} is below the minimum {min}")]
    TooSmall {
        /// The field.
        field: &'static str,
        /// Its value.
        value: u64,
        /// The minimum.
        min: u64,
    },
    /// The trailing CRC does not match the frame.
    #[error("CRC mismatch: trailer says {expected:#010x}, frame hashes to {actual:#010x}")]
    Crc {
        /// CRC stored in the trailer.
        expected: u32,
        /// CRC computed over the frame.
        actual: u32,
    },
    /// A range table entry is empty, overflows, or is not after the previous range.
    #[error("range {index} (first_page {first_page}, pages {pages}): {reason}")]
    BadRange {
        /// Index of the entry.
        index: u64,
        /// Its first page.
        first_page: u64,
        /// Its page count.
        pages: u64,
        /// What is wrong.
        reason: &'static str,
    },
    /// A range ends beyond guest memory.
    #[error(
        "range {index} (first_page {first_page}, pages {pages}) ends beyond guest memory of {max_pages} pages"
    )]
    RangeOutsideMemory {
        /// Index of the range.
        index: u64,
        /// Its first page.
        first_page: u64,
        /// Its page count.
        pages: u64,
        /// Guest memory size in pages.
        max_pages: u64,
    },
    /// A disk write is empty or not a whole number of sectors.
    #[error("disk write {index} (sector {sector}, {len} bytes): {reason}")]
    BadDiskWrite {
        /// Index of the write.
        index: u64,
        /// Its first sector.
        sector: u64,
        /// Its length in bytes.
        len: u64,
        /// What is wrong.
        reason: &'static str,
    },
    /// A disk write ends beyond the disk.
    #[error(
        "disk write {index} (sector {sector}, {len} bytes) ends beyond the disk of {disk_sectors} sectors"
    )]
    DiskWriteOutOfRange {
        /// Index of the write.
        index: u64,
        /// Its first sector.
        sector: u64,
        /// Its length in bytes.
        len: u64,
        /// Disk size in sectors.
        disk_sectors: u64,
    },
    /// The memory section is not a valid zstd frame of the declared size.
    #[error("memory section: zstd decompression failed: {0}")]
    Decompress(#[source] std::io::Error),
    /// zstd failed to compress (or to create a context).
    #[error("memory section: zstd compression failed: {0}")]
    Compress(#[source] std::io::Error),
    /// The decompressed sparse delta stream is malformed.
    #[error(
        "memory section: malformed sparse delta stream at byte {offset} (page {page}): {reason}"
    )]
    BadDeltaStream {
        /// Offset in the stream.
        offset: u64,
        /// Index of the page being parsed (in range order).
        page: u64,
        /// What is wrong.
        reason: &'static str,
    },
    /// The guest memory size given to [`Encoder::new`] is not a non-zero multiple of 4096.
    #[error("invalid guest memory size {mem_size}: must be a non-zero multiple of 4096")]
    InvalidMemorySize {
        /// The size given.
        mem_size: u64,
    },
    /// The zstd level is outside what the linked zstd supports.
    #[error("invalid zstd level {level}: supported range is {min}..={max}")]
    InvalidLevel {
        /// The level given.
        level: i32,
        /// Lowest supported level.
        min: i32,
        /// Highest supported level.
        max: i32,
    },
}

/// One disk write of the epoch: `data` goes to the disk at byte offset `sector * 512`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskWrite {
    /// First sector written.
    pub sector: u64,
    /// The data: a non-zero multiple of 512 bytes.
    pub data: Vec<u8>,
}

/// The fixed header of a frame, as parsed by [`FrameHeader::parse`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    /// Flags ([`FLAG_DENSE_ZSTD`]).
    pub flags: u16,
    /// Epoch number.
    pub epoch: u64,
    /// Length of the whole frame.
    pub total_len: u64,
    /// Number of ranges.
    pub n_ranges: u32,
    /// Number of disk writes.
    pub n_disk_writes: u32,
    /// Length of the state section.
    pub state_len: u32,
    /// Length of the console section.
    pub console_len: u32,
    /// Total length of the disk data.
    pub disk_data_len: u64,
    /// Length of the sparse stream (decompressed).
    pub mem_sparse_len: u64,
    /// Length of the sparse section (compressed).
    pub mem_sparse_zlen: u64,
    /// Length of the dense section (as stored).
    pub mem_dense_zlen: u64,
}

/// Bytes at the start of a frame needed by [`frame_len`] (magic, version, flags, epoch,
/// `total_len`).
pub const FRAME_LEN_PREFIX: usize = 24;

/// Checks magic, version and flags; returns the flags.
fn parse_prefix(r: &mut Reader<'_>) -> Result<u16, FrameError> {
    let magic: [u8; 4] = r.array("header")?;
    if magic != MAGIC {
        return Err(FrameError::BadMagic { found: magic });
    }
    let version = r.u16("header")?;
    if version != VERSION {
        return Err(FrameError::UnsupportedVersion {
            found: version,
            supported: VERSION,
        });
    }
    let flags = r.u16("header")?;
    if flags & !KNOWN_FLAGS != 0 {
        return Err(FrameError::UnsupportedFlags { found: flags });
    }
    Ok(flags)
}

impl FrameHeader {
    /// Parses the first [`HEADER_LEN`] bytes of `bytes`, checking magic, version and flags only.
    pub fn parse(bytes: &[u8]) -> Result<Self, FrameError> {
        let mut r = Reader::new(bytes);
        let flags = parse_prefix(&mut r)?;
        if bytes.len() < HEADER_LEN {
            return Err(FrameError::Truncated {
                what: "header",
                need: HEADER_LEN as u64,
                have: bytes.len() as u64,
            });
        }
        Ok(FrameHeader {
            flags,
            epoch: r.u64("header")?,
            total_len: r.u64("header")?,
            n_ranges: r.u32("header")?,
            n_disk_writes: r.u32("header")?,
            state_len: r.u32("header")?,
            console_len: r.u32("header")?,
            disk_data_len: r.u64("header")?,
            mem_sparse_len: r.u64("header")?,
            mem_sparse_zlen: r.u64("header")?,
            mem_dense_zlen: r.u64("header")?,
        })
    }

    /// The header's [`HEADER_LEN`] bytes.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        let fields: [&[u8]; 13] = [
            &MAGIC,
            &VERSION.to_le_bytes(),
            &self.flags.to_le_bytes(),
            &self.epoch.to_le_bytes(),
            &self.total_len.to_le_bytes(),
            &self.n_ranges.to_le_bytes(),
            &self.n_disk_writes.to_le_bytes(),
            &self.state_len.to_le_bytes(),
            &self.console_len.to_le_bytes(),
            &self.disk_data_len.to_le_bytes(),
            &self.mem_sparse_len.to_le_bytes(),
            &self.mem_sparse_zlen.to_le_bytes(),
            &self.mem_dense_zlen.to_le_bytes(),
        ];
        let mut pos = 0;
        for f in fields {
            if let Some(d) = out.get_mut(pos..pos + f.len()) {
                d.copy_from_slice(f);
            }
            pos += f.len();
        }
        out
    }

    /// Sum of the section lengths the header declares (what `total_len` must equal), in `u128`
    /// so that it cannot overflow.
    fn sections_len(&self) -> u128 {
        MIN_FRAME_LEN as u128
            + u128::from(self.n_ranges) * TABLE_ENTRY_LEN as u128
            + u128::from(self.n_disk_writes) * TABLE_ENTRY_LEN as u128
            + u128::from(self.disk_data_len)
            + u128::from(self.state_len)
            + u128::from(self.console_len)
            + u128::from(self.mem_dense_zlen)
            + u128::from(self.mem_sparse_zlen)
    }
}

/// Reads `total_len` from the beginning of a frame (at least [`FRAME_LEN_PREFIX`] bytes; a full
/// header is fine) after checking magic, version, flags and `total_len` against
/// `limits.max_frame_bytes` and the minimum frame size: how many bytes in total a stream reader
/// must read for this frame.
pub fn frame_len(header: &[u8], limits: &Limits) -> Result<u64, FrameError> {
    let mut r = Reader::new(header);
    parse_prefix(&mut r)?;
    let _epoch = r.u64("header")?;
    let total_len = r.u64("header")?;
    check_total_len(total_len, limits)?;
    Ok(total_len)
}

fn check_total_len(total_len: u64, limits: &Limits) -> Result<(), FrameError> {
    check_limit("total_len", total_len, limits.max_frame_bytes)?;
    if total_len < MIN_FRAME_LEN as u64 {
        return Err(FrameError::TooSmall {
            field: "total_len",
            value: total_len,
            min: MIN_FRAME_LEN as u64,
        });
    }
    Ok(())
}

fn check_limit(field: &'static str, value: u64, limit: u64) -> Result<(), FrameError> {
    if value > limit {
        Err(FrameError::TooLarge {
            field,
            value,
            limit,
        })
    } else {
        Ok(())
    }
}

fn check_disk_write(index: u64, sector: u64, len: u64, limits: &Limits) -> Result<(), FrameError> {
    let bad = |reason| FrameError::BadDiskWrite {
        index,
        sector,
        len,
        reason,
    };
    if len == 0 {
        return Err(bad("empty write"));
    }
    if !len.is_multiple_of(SECTOR_SIZE) {
        return Err(bad("length is not a multiple of 512"));
    }
    match sector.checked_add(len / SECTOR_SIZE) {
        Some(end) if end <= limits.disk_sectors => Ok(()),
        _ => Err(FrameError::DiskWriteOutOfRange {
            index,
            sector,
            len,
            disk_sectors: limits.disk_sectors,
        }),
    }
}

/// Bounds-checked little-endian reader over a byte slice.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], FrameError> {
        let end = self.pos.checked_add(n);
        match end.and_then(|end| self.buf.get(self.pos..end)) {
            Some(s) => {
                self.pos += n;
                Ok(s)
            }
            None => Err(FrameError::Truncated {
                what,
                need: (self.pos as u64).saturating_add(n as u64),
                have: self.buf.len() as u64,
            }),
        }
    }

    fn take_u64len(&mut self, n: u64, what: &'static str) -> Result<&'a [u8], FrameError> {
        let n = usize::try_from(n).map_err(|_| FrameError::Truncated {
            what,
            need: n,
            have: self.buf.len() as u64,
        })?;
        self.take(n, what)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], FrameError> {
        let s = self.take(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, FrameError> {
        self.array(what).map(u16::from_le_bytes)
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, FrameError> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, FrameError> {
        self.array(what).map(u64::from_le_bytes)
    }
}

/// Statistics of one [`Encoder::encode`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EncodeStats {
    /// Dirty memory input: pages × 4096.
    pub raw_bytes: u64,
    /// Length of the sparse stream (before zstd).
    pub sparse_bytes: u64,
    /// Length of the dense stream (before zstd, if it is compressed).
    pub dense_bytes: u64,
    /// Length of the memory sections as sent (dense section + sparse section).
    pub compressed_bytes: u64,
    /// Length of the whole frame.
    pub frame_bytes: u64,
    /// Wall time of the XOR / zero-word elision pass (shadow update included).
    pub delta_elapsed: Duration,
    /// Wall time of zstd.
    pub compress_elapsed: Duration,
    /// Wall time of the whole encode.
    pub elapsed: Duration,
}

/// Encodes epoch frames. Keeps the last committed contents of every page (the "shadow", a full
/// copy of guest memory) so that each dirty page is sent as an XOR delta against it.
///
/// The shadow is a zero-initialised allocation of `mem_size` bytes obtained with `calloc`, so the
/// operating system backs only the pages that were ever sent with non-zero contents; both sides
/// start from all-zero memory.
pub struct Encoder {
    shadow: Vec<u8>,
    mem_pages: u64,
    /// zstd level and context for the sparse stream, if it is compressed.
    sparse: Option<(i32, zstd::bulk::Compressor<'static>)>,
    /// zstd level and context for the dense stream, if it is compressed.
    dense: Option<(i32, zstd::bulk::Compressor<'static>)>,
    /// Sparse stream of the current encode (reused between encodes).
    sparse_buf: Vec<u8>,
    /// Dense stream of the current encode when it is compressed (reused between encodes).
    dense_buf: Vec<u8>,
    limits: Option<Limits>,
}

impl fmt::Debug for Encoder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Encoder")
            .field("mem_pages", &self.mem_pages)
            .field("level", &self.level())
            .field("dense_level", &self.dense_level())
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

/// A zstd context for `level`, or `None` for [`STORE`].
#[allow(clippy::type_complexity)]
fn compressor_for(
    level: i32,
) -> Result<Option<(i32, zstd::bulk::Compressor<'static>)>, FrameError> {
    if level == STORE {
        return Ok(None);
    }
    let range = zstd::compression_level_range();
    if !range.contains(&level) {
        return Err(FrameError::InvalidLevel {
            level,
            min: *range.start(),
            max: *range.end(),
        });
    }
    let c = zstd::bulk::Compressor::new(level).map_err(FrameError::Compress)?;
    Ok(Some((level, c)))
}

impl Encoder {
    /// An encoder for a guest of `mem_size` bytes (a non-zero multiple of 4096) with an all-zero
    /// shadow. The sparse stream is compressed with zstd at `zstd_level` (negative levels are
    /// zstd's fast levels), or stored if it is [`STORE`] (0); see [`DEFAULT_ZSTD_LEVEL`]. The
    /// dense stream is stored until [`set_dense_level`](Self::set_dense_level) says otherwise.
    pub fn new(mem_size: u64, zstd_level: i32) -> Result<Self, FrameError> {
        if mem_size == 0 || !mem_size.is_multiple_of(PAGE_U64) {
            return Err(FrameError::InvalidMemorySize { mem_size });
        }
        let len =
            usize::try_from(mem_size).map_err(|_| FrameError::InvalidMemorySize { mem_size })?;
        Ok(Encoder {
            sparse: compressor_for(zstd_level)?,
            shadow: vec![0u8; len],
            mem_pages: mem_size / PAGE_U64,
            dense: None,
            sparse_buf: Vec::new(),
            dense_buf: Vec::new(),
            limits: None,
        })
    }

    /// Compress the dense stream (blocks where every word changed) with zstd at `level`, or
    /// store it ([`STORE`], the default: fastest, and the best choice whenever the link is
    /// faster than zstd on compressible data, a few hundred MB/s per core).
    pub fn set_dense_level(&mut self, level: i32) -> Result<(), FrameError> {
        self.dense = compressor_for(level)?;
        Ok(())
    }

    /// The zstd level of the dense stream ([`STORE`] if it is stored raw).
    pub fn dense_level(&self) -> i32 {
        self.dense.as_ref().map_or(STORE, |(l, _)| *l)
    }

    /// Makes [`encode`](Self::encode) refuse (with the error [`decode`] would give, and without
    /// changing anything) any frame that a receiver with these limits would reject, so such a
    /// failure happens on the primary rather than on the replica.
    pub fn set_limits(&mut self, limits: Option<Limits>) {
        self.limits = limits;
    }

    /// The zstd level of the sparse stream ([`STORE`] if it is stored raw).
    pub fn level(&self) -> i32 {
        self.sparse.as_ref().map_or(STORE, |(l, _)| *l)
    }

    /// Guest memory size in pages.
    pub fn mem_pages(&self) -> u64 {
        self.mem_pages
    }

    /// The shadow: the contents of guest memory as of the last successful encode.
    pub fn shadow(&self) -> &[u8] {
        &self.shadow
    }

    /// Forgets everything sent: the shadow becomes all-zero again (e.g. to resynchronise a new,
    /// all-zero replica by sending every non-zero page).
    pub fn reset(&mut self) {
        self.shadow = vec![0u8; self.shadow.len()];
    }

    /// Checks the inputs of an encode against the memory size and the limits.
    fn validate(
        &self,
        ranges: &MemoryRangeTable,
        pages: &[u8],
        state: &[u8],
        disk_writes: &[DiskWrite],
        console: &[u8],
    ) -> Result<(Limits, u64), FrameError> {
        let raw_bytes = ranges.page_count().saturating_mul(PAGE_U64);
        if pages.len() as u64 != raw_bytes {
            return Err(FrameError::LengthMismatch {
                field: "pages",
                declared: raw_bytes,
                actual: pages.len() as u64,
            });
        }
        let limits = match &self.limits {
            Some(l) => Limits {
                max_pages: l.max_pages.min(self.mem_pages),
                ..l.clone()
            },
            None => Limits::unlimited(self.mem_pages),
        };
        if let Some((index, r)) = ranges
            .ranges()
            .iter()
            .enumerate()
            .find(|(_, r)| r.first_page + r.pages > limits.max_pages)
        {
            return Err(FrameError::RangeOutsideMemory {
                index: index as u64,
                first_page: r.first_page,
                pages: r.pages,
                max_pages: limits.max_pages,
            });
        }
        let u32_limit =
            |field, value: usize, limit: u32| check_limit(field, value as u64, u64::from(limit));
        u32_limit("n_ranges", ranges.ranges().len(), limits.max_ranges)?;
        u32_limit("n_disk_writes", disk_writes.len(), limits.max_disk_writes)?;
        u32_limit("state_len", state.len(), limits.max_state_bytes)?;
        u32_limit("console_len", console.len(), limits.max_console_bytes)?;
        let mut disk_data_len = 0u64;
        for (index, w) in disk_writes.iter().enumerate() {
            check_disk_write(index as u64, w.sector, w.data.len() as u64, &limits)?;
            disk_data_len = disk_data_len.saturating_add(w.data.len() as u64);
        }
        check_limit("disk_data_len", disk_data_len, limits.max_disk_bytes)?;
        Ok((limits, disk_data_len))
    }

    /// Appends the frame of epoch `epoch` to `out`.
    ///
    /// `pages` holds the current contents of the pages listed by `ranges`, in order, 4096 bytes
    /// each (the compact staging buffer copied out during the stun). `disk_writes` are the
    /// epoch's writes in order, `state` the serialised vCPU/device state, `console` the guest
    /// output of the epoch.
    ///
    /// On success the shadow holds `pages` at their addresses. On error neither the shadow nor
    /// `out` is changed.
    #[allow(clippy::too_many_arguments)]
    pub fn encode(
        &mut self,
        epoch: u64,
        ranges: &MemoryRangeTable,
        pages: &[u8],
        state: &[u8],
        disk_writes: &[DiskWrite],
        console: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<EncodeStats, FrameError> {
        let start = Instant::now();
        let (limits, disk_data_len) = self.validate(ranges, pages, state, disk_writes, console)?;
        let page_count = ranges.page_count();
        let Encoder {
            shadow,
            sparse: sparse_compressor,
            dense: dense_compressor,
            sparse_buf,
            dense_buf,
            ..
        } = self;
        let Some(slices) = range_slices(shadow, ranges) else {
            // Unreachable: `validate` checked that the ranges lie inside memory.
            return Err(FrameError::RangeOutsideMemory {
                index: 0,
                first_page: 0,
                pages: ranges.end_page(),
                max_pages: limits.max_pages,
            });
        };
        // Every check that does not need the compressed sizes is done; from here on a failure
        // must restore the shadow (and `out`).

        let frame_start = out.len();
        let raw_dense = dense_compressor.is_none();
        let max_sparse = usize::try_from(page_count)
            .unwrap_or(usize::MAX)
            .saturating_mul(MAX_SPARSE_PAGE_LEN);
        let fixed = MIN_FRAME_LEN
            + ranges.ranges().len() * TABLE_ENTRY_LEN
            + disk_writes.len() * TABLE_ENTRY_LEN
            + disk_data_len as usize
            + state.len()
            + console.len();
        out.reserve(fixed + if raw_dense { pages.len() } else { 0 });
        out.extend_from_slice(&[0u8; HEADER_LEN]);
        for r in ranges.ranges() {
            out.extend_from_slice(&r.first_page.to_le_bytes());
            out.extend_from_slice(&r.pages.to_le_bytes());
        }
        for w in disk_writes.iter() {
            out.extend_from_slice(&w.sector.to_le_bytes());
            out.extend_from_slice(&(w.data.len() as u64).to_le_bytes());
        }
        for w in disk_writes.iter() {
            out.extend_from_slice(&w.data);
        }
        out.extend_from_slice(state);
        out.extend_from_slice(console);

        // Stage 1: XOR against the shadow, update the shadow, split into sparse and dense.
        sparse_buf.clear();
        sparse_buf.reserve(max_sparse);
        let dense_start = out.len();
        let dense: &mut Vec<u8> = if raw_dense {
            &mut *out
        } else {
            dense_buf.clear();
            dense_buf.reserve(pages.len());
            &mut *dense_buf
        };
        let old_pages = slices.into_iter().flat_map(|s| s.chunks_exact_mut(PAGE));
        for (old, new) in old_pages.zip(pages.chunks_exact(PAGE)) {
            encode_page(old, new, sparse_buf, dense);
        }
        let dense_bytes = (dense.len() - if raw_dense { dense_start } else { 0 }) as u64;
        let delta_elapsed = start.elapsed();

        // Stage 2: zstd, written in place into `out`.
        let zstd_start = Instant::now();
        let mut flags = 0u16;
        let mut result = Ok(());
        if let Some((_, c)) = dense_compressor {
            if !dense_buf.is_empty() {
                flags |= FLAG_DENSE_ZSTD;
                result = compress_into(c, dense_buf, out);
            }
        }
        let sparse_start = out.len();
        if result.is_ok() && page_count > 0 {
            match sparse_compressor {
                Some((_, c)) => {
                    flags |= FLAG_SPARSE_ZSTD;
                    result = compress_into(c, sparse_buf, out);
                }
                None => out.extend_from_slice(sparse_buf),
            }
        }
        let compress_elapsed = zstd_start.elapsed();
        let mem_dense_zlen = (sparse_start - dense_start) as u64;
        let mem_sparse_zlen = (out.len() - sparse_start) as u64;
        let total_len = (out.len() - frame_start + TRAILER_LEN) as u64;
        if result.is_ok() {
            result = check_limit("total_len", total_len, limits.max_frame_bytes);
        }
        if let Err(e) = result {
            let dense: &[u8] = if raw_dense {
                out.get(dense_start..sparse_start).unwrap_or_default()
            } else {
                dense_buf
            };
            undo_shadow(shadow, ranges, sparse_buf, dense);
            out.truncate(frame_start);
            return Err(e);
        }

        let header = FrameHeader {
            flags,
            epoch,
            total_len,
            n_ranges: ranges.ranges().len() as u32,
            n_disk_writes: disk_writes.len() as u32,
            state_len: state.len() as u32,
            console_len: console.len() as u32,
            disk_data_len,
            mem_sparse_len: sparse_buf.len() as u64,
            mem_sparse_zlen,
            mem_dense_zlen,
        };
        if let Some(h) = out.get_mut(frame_start..frame_start + HEADER_LEN) {
            h.copy_from_slice(&header.to_bytes());
        }
        let crc = crc32fast::hash(out.get(frame_start..).unwrap_or_default());
        out.extend_from_slice(&crc.to_le_bytes());
        Ok(EncodeStats {
            raw_bytes: pages.len() as u64,
            sparse_bytes: sparse_buf.len() as u64,
            dense_bytes,
            compressed_bytes: mem_dense_zlen + mem_sparse_zlen,
            frame_bytes: total_len,
            delta_elapsed,
            compress_elapsed,
            elapsed: start.elapsed(),
        })
    }
}

/// Appends one zstd frame of `src` to `out`.
fn compress_into(
    c: &mut zstd::bulk::Compressor<'static>,
    src: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), FrameError> {
    out.reserve(zstd::zstd_safe::compress_bound(src.len()));
    let at = out.len();
    let mut cursor = Cursor::new(&mut *out);
    cursor.set_position(at as u64);
    match c.compress_to_buffer(src, &mut cursor) {
        Ok(_) => Ok(()),
        Err(e) => {
            out.truncate(at);
            Err(FrameError::Compress(e))
        }
    }
}

/// Reads the 8 bytes of `w` as a native-endian word (0 if `w` is not 8 bytes long).
#[inline(always)]
fn word(w: &[u8]) -> u64 {
    <[u8; 8]>::try_from(w).map_or(0, u64::from_ne_bytes)
}

/// Stage 1 for one page: appends the page's masks and the non-zero words of its partial blocks
/// to `sparse`, its full blocks to `dense`, and stores `new` into `old`.
#[inline]
fn encode_page(old: &mut [u8], new: &[u8], sparse: &mut Vec<u8>, dense: &mut Vec<u8>) {
    let mut masks = [0u8; MASK_LEN];
    let mut x = [0u8; BLOCK_LEN];
    let mut packed = [0u8; BLOCK_LEN];
    let mask_at = sparse.len();
    sparse.extend_from_slice(&masks);
    for ((m, ob), nb) in masks
        .chunks_exact_mut(8)
        .zip(old.chunks_exact_mut(BLOCK_LEN))
        .zip(new.chunks_exact(BLOCK_LEN))
    {
        // XOR (vectorised), and the OR of all words to skip unchanged blocks early.
        let mut any = 0u64;
        for ((d, o), n) in x
            .chunks_exact_mut(8)
            .zip(ob.chunks_exact(8))
            .zip(nb.chunks_exact(8))
        {
            let w = word(o) ^ word(n);
            d.copy_from_slice(&w.to_ne_bytes());
            any |= w;
        }
        if any == 0 {
            continue;
        }
        ob.copy_from_slice(nb);
        let v = block_mask(&x);
        m.copy_from_slice(&v.to_le_bytes());
        if v == u64::MAX {
            dense.extend_from_slice(&x);
            continue;
        }
        let mut n = 0usize;
        if v.count_ones() <= 16 {
            let mut bits = v;
            while bits != 0 {
                let i = (bits.trailing_zeros() as usize) << 3;
                bits &= bits - 1;
                // In bounds: both offsets are masked to at most 504.
                let (o, i) = ((n & 63) << 3, i & 0x1f8);
                packed[o..o + 8].copy_from_slice(&x[i..i + 8]);
                n += 1;
            }
        } else {
            // Branch-free: store every word, advance only past non-zero ones.
            for w in x.chunks_exact(8) {
                // In bounds: masked to at most 504 (and `n < 64`: the block is not full).
                let o = (n & 63) << 3;
                packed[o..o + 8].copy_from_slice(w);
                n += usize::from(word(w) != 0);
            }
        }
        sparse.extend_from_slice(packed.get(..n * 8).unwrap_or_default());
    }
    if let Some(d) = sparse.get_mut(mask_at..mask_at + MASK_LEN) {
        d.copy_from_slice(&masks);
    }
}

/// Bit `i` set iff word `i` of the 512-byte block `x` is non-zero.
#[inline(always)]
fn block_mask(x: &[u8; BLOCK_LEN]) -> u64 {
    let mut v = 0u64;
    for (j, group) in x.chunks_exact(64).enumerate() {
        // Constant shifts within a group of 8 words, one variable shift per group.
        let mut b = 0u64;
        for (k, w) in group.chunks_exact(8).enumerate() {
            b |= u64::from(word(w) != 0) << k;
        }
        v |= b << (j * 8);
    }
    v
}

/// Walks the sparse stream of `pages` pages; returns the number of full blocks (the dense
/// stream is 512 times that) after checking that the stream has exactly that structure.
fn scan_sparse(sparse: &[u8], pages: u64) -> Result<u64, FrameError> {
    let mut pos = 0usize;
    let mut full = 0u64;
    for page in 0..pages {
        let masks = sparse
            .get(pos..pos + MASK_LEN)
            .ok_or_else(|| bad_stream(pos, page, "stream ends inside the masks of a page"))?;
        pos += MASK_LEN;
        for m in masks.chunks_exact(8).map(word) {
            if m == u64::MAX {
                full += 1;
            } else {
                pos += m.count_ones() as usize * 8;
            }
        }
        if pos > sparse.len() {
            return Err(bad_stream(
                pos,
                page,
                "stream ends inside the words of a page",
            ));
        }
    }
    if pos != sparse.len() {
        return Err(bad_stream(pos, pages, "trailing bytes after the last page"));
    }
    Ok(full)
}

fn bad_stream(offset: usize, page: u64, reason: &'static str) -> FrameError {
    FrameError::BadDeltaStream {
        offset: offset as u64,
        page,
        reason,
    }
}

/// XORs the deltas described by the sparse and dense streams into `pages` (4096-byte pages, in
/// stream order). Fails if the streams do not describe exactly the pages given (it may have
/// XORed some pages by then).
fn xor_streams<'a>(
    sparse: &[u8],
    dense: &[u8],
    pages: impl Iterator<Item = &'a mut [u8]>,
) -> Result<(), FrameError> {
    let mut pos = 0usize;
    let mut dpos = 0usize;
    for (page_no, page) in pages.enumerate() {
        let page_no = page_no as u64;
        let masks = sparse
            .get(pos..pos + MASK_LEN)
            .ok_or_else(|| bad_stream(pos, page_no, "stream ends inside the masks of a page"))?;
        pos += MASK_LEN;
        for (m, block) in masks
            .chunks_exact(8)
            .map(word)
            .zip(page.chunks_exact_mut(BLOCK_LEN))
        {
            let m = u64::from_le(m);
            if m == 0 {
                continue;
            }
            if m == u64::MAX {
                let src = dense
                    .get(dpos..dpos + BLOCK_LEN)
                    .ok_or_else(|| bad_stream(pos, page_no, "dense stream too short"))?;
                dpos += BLOCK_LEN;
                for (d, s) in block.iter_mut().zip(src) {
                    *d ^= s;
                }
                continue;
            }
            let n = m.count_ones() as usize * 8;
            let src = sparse.get(pos..pos + n).ok_or_else(|| {
                bad_stream(pos, page_no, "stream ends inside the words of a page")
            })?;
            pos += n;
            let mut bits = m;
            for s in src.chunks_exact(8) {
                let i = bits.trailing_zeros() as usize;
                bits &= bits - 1;
                if let Some(d) = block.get_mut(i * 8..i * 8 + 8) {
                    let x = word(d) ^ word(s);
                    d.copy_from_slice(&x.to_ne_bytes());
                }
            }
        }
    }
    if pos != sparse.len() {
        return Err(bad_stream(
            pos,
            u64::MAX,
            "sparse stream longer than the pages",
        ));
    }
    if dpos != dense.len() {
        return Err(bad_stream(
            pos,
            u64::MAX,
            "dense stream longer than the full blocks",
        ));
    }
    Ok(())
}

/// Splits `memory` into the sub-slices covered by the (sorted, disjoint) `ranges`, or `None` if a
/// range does not lie inside `memory`.
fn range_slices<'m>(memory: &'m mut [u8], ranges: &MemoryRangeTable) -> Option<Vec<&'m mut [u8]>> {
    let mut slices = Vec::with_capacity(ranges.ranges().len());
    let mut rest = memory;
    let mut consumed = 0u64;
    for r in ranges.ranges() {
        let start = r.first_page.checked_mul(PAGE_U64)?;
        let gap = usize::try_from(start.checked_sub(consumed)?).ok()?;
        let len = usize::try_from(r.pages.checked_mul(PAGE_U64)?).ok()?;
        let (_, after_gap) = rest.split_at_mut_checked(gap)?;
        let (range, after) = after_gap.split_at_mut_checked(len)?;
        slices.push(range);
        rest = after;
        consumed = start.checked_add(len as u64)?;
    }
    Some(slices)
}

/// Restores the shadow after a failed encode: XORing the same deltas again gives back the old
/// contents.
fn undo_shadow(shadow: &mut [u8], ranges: &MemoryRangeTable, sparse: &[u8], dense: &[u8]) {
    if let Some(slices) = range_slices(shadow, ranges) {
        let pages = slices.into_iter().flat_map(|s| s.chunks_exact_mut(PAGE));
        // Cannot fail: the streams were produced for exactly these pages.
        let _ = xor_streams(sparse, dense, pages);
    }
}

/// The contents of a decoded frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecodedFrame {
    /// Epoch number.
    pub epoch: u64,
    /// The pages the frame carries.
    pub ranges: MemoryRangeTable,
    /// XOR deltas of those pages, `page_count * 4096` bytes in range order; apply with
    /// [`apply_deltas`].
    pub deltas: Vec<u8>,
    /// Disk writes of the epoch, in order.
    pub disk_writes: Vec<DiskWrite>,
    /// Serialised vCPU and device state.
    pub state: Vec<u8>,
    /// Guest console output of the epoch.
    pub console: Vec<u8>,
}

/// Decodes frames, reusing its zstd context and decompression buffers between frames.
pub struct Decoder {
    dctx: zstd::bulk::Decompressor<'static>,
    sparse_buf: Vec<u8>,
    dense_buf: Vec<u8>,
}

impl fmt::Debug for Decoder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Decoder")
            .field("sparse_capacity", &self.sparse_buf.capacity())
            .field("dense_capacity", &self.dense_buf.capacity())
            .finish_non_exhaustive()
    }
}

/// Decompresses `src` into `buf[..len]` (growing `buf` if needed) and requires exactly `len`
/// bytes out.
fn decompress_exact<'b>(
    dctx: &mut zstd::bulk::Decompressor<'static>,
    src: &[u8],
    buf: &'b mut Vec<u8>,
    len: usize,
    field: &'static str,
) -> Result<&'b [u8], FrameError> {
    if buf.len() < len {
        buf.resize(len, 0);
    }
    let dst = buf.get_mut(..len).unwrap_or_default();
    let n = dctx
        .decompress_to_buffer(src, dst)
        .map_err(FrameError::Decompress)?;
    if n != len {
        return Err(FrameError::LengthMismatch {
            field,
            declared: len as u64,
            actual: n as u64,
        });
    }
    Ok(buf.get(..len).unwrap_or_default())
}

impl Decoder {
    /// A decoder with a fresh zstd context.
    pub fn new() -> Result<Self, FrameError> {
        Ok(Decoder {
            dctx: zstd::bulk::Decompressor::new().map_err(FrameError::Decompress)?,
            sparse_buf: Vec::new(),
            dense_buf: Vec::new(),
        })
    }

    /// Validates and decodes one frame (`frame` must be exactly one whole frame); see
    /// [`decode`].
    pub fn decode(&mut self, frame: &[u8], limits: &Limits) -> Result<DecodedFrame, FrameError> {
        let h = FrameHeader::parse(frame)?;
        check_total_len(h.total_len, limits)?;
        let have = frame.len() as u64;
        if have < h.total_len {
            return Err(FrameError::Truncated {
                what: "frame",
                need: h.total_len,
                have,
            });
        }
        if have > h.total_len {
            return Err(FrameError::LengthMismatch {
                field: "total_len",
                declared: h.total_len,
                actual: have,
            });
        }
        check_limit("n_ranges", h.n_ranges.into(), limits.max_ranges.into())?;
        check_limit(
            "n_disk_writes",
            h.n_disk_writes.into(),
            limits.max_disk_writes.into(),
        )?;
        check_limit(
            "state_len",
            h.state_len.into(),
            limits.max_state_bytes.into(),
        )?;
        check_limit(
            "console_len",
            h.console_len.into(),
            limits.max_console_bytes.into(),
        )?;
        check_limit("disk_data_len", h.disk_data_len, limits.max_disk_bytes)?;
        let sections = h.sections_len();
        if sections != u128::from(h.total_len) {
            return Err(FrameError::LengthMismatch {
                field: "total_len",
                declared: h.total_len,
                actual: u64::try_from(sections).unwrap_or(u64::MAX),
            });
        }
        // From here on `frame.len() == total_len >= MIN_FRAME_LEN`, and every section fits.
        let (body, trailer) = frame
            .split_at_checked(frame.len().saturating_sub(TRAILER_LEN))
            .unwrap_or_default();
        let expected = u32::from_le_bytes(<[u8; 4]>::try_from(trailer).unwrap_or_default());
        let actual = crc32fast::hash(body);
        if expected != actual {
            return Err(FrameError::Crc { expected, actual });
        }

        let mut r = Reader::new(body);
        r.take(HEADER_LEN, "header")?;

        // Ranges.
        let mut ranges = Vec::with_capacity(h.n_ranges as usize);
        let mut page_count = 0u64;
        let mut prev_end: Option<u64> = None;
        for index in 0..u64::from(h.n_ranges) {
            let first_page = r.u64("range table")?;
            let pages = r.u64("range table")?;
            let bad = |reason| FrameError::BadRange {
                index,
                first_page,
                pages,
                reason,
            };
            if pages == 0 {
                return Err(bad("empty range"));
            }
            let end = first_page
                .checked_add(pages)
                .ok_or_else(|| bad("first_page + pages overflows"))?;
            match prev_end {
                Some(p) if first_page < p => {
                    return Err(bad("starts before the end of the previous range"))
                }
                Some(p) if first_page == p => {
                    return Err(bad("adjacent to the previous range (not coalesced)"))
                }
                _ => {}
            }
            if end > limits.max_pages {
                return Err(FrameError::RangeOutsideMemory {
                    index,
                    first_page,
                    pages,
                    max_pages: limits.max_pages,
                });
            }
            prev_end = Some(end);
            // Cannot overflow: disjoint ranges below max_pages.
            page_count += pages;
            ranges.push(MemoryRange { first_page, pages });
        }
        let ranges = MemoryRangeTable::from_canonical_unchecked(ranges, page_count);

        // Disk table and data.
        let mut table = Vec::with_capacity(h.n_disk_writes as usize);
        let mut data_sum = 0u64;
        for index in 0..u64::from(h.n_disk_writes) {
            let sector = r.u64("disk table")?;
            let len = r.u64("disk table")?;
            check_disk_write(index, sector, len, limits)?;
            data_sum = data_sum.saturating_add(len);
            if data_sum > h.disk_data_len {
                return Err(FrameError::LengthMismatch {
                    field: "disk_data_len",
                    declared: h.disk_data_len,
                    actual: data_sum,
                });
            }
            table.push((sector, len));
        }
        if data_sum != h.disk_data_len {
            return Err(FrameError::LengthMismatch {
                field: "disk_data_len",
                declared: h.disk_data_len,
                actual: data_sum,
            });
        }
        let mut disk_writes = Vec::with_capacity(table.len());
        for (sector, len) in table {
            let data = r.take_u64len(len, "disk data")?.to_vec();
            disk_writes.push(DiskWrite { sector, data });
        }

        let state = r.take(h.state_len as usize, "state")?.to_vec();
        let console = r.take(h.console_len as usize, "console")?.to_vec();
        let dense = r.take_u64len(h.mem_dense_zlen, "dense section")?;
        let zsparse = r.take_u64len(h.mem_sparse_zlen, "sparse section")?;
        let deltas = self.decode_memory(&h, page_count, dense, zsparse)?;

        Ok(DecodedFrame {
            epoch: h.epoch,
            ranges,
            deltas,
            disk_writes,
            state,
            console,
        })
    }

    fn decode_memory(
        &mut self,
        h: &FrameHeader,
        page_count: u64,
        dense_section: &[u8],
        sparse_section: &[u8],
    ) -> Result<Vec<u8>, FrameError> {
        if page_count == 0 {
            check_limit("mem_sparse_len", h.mem_sparse_len, 0)?;
            check_limit("mem_sparse_zlen", h.mem_sparse_zlen, 0)?;
            check_limit("mem_dense_zlen", h.mem_dense_zlen, 0)?;
            if h.flags != 0 {
                return Err(FrameError::UnsupportedFlags { found: h.flags });
            }
            return Ok(Vec::new());
        }
        let min = page_count.saturating_mul(MASK_LEN as u64);
        let max = page_count.saturating_mul(MAX_SPARSE_PAGE_LEN as u64);
        if h.mem_sparse_len < min {
            return Err(FrameError::TooSmall {
                field: "mem_sparse_len",
                value: h.mem_sparse_len,
                min,
            });
        }
        check_limit("mem_sparse_len", h.mem_sparse_len, max)?;
        let too_big = |field, value| FrameError::TooLarge {
            field,
            value,
            limit: usize::MAX as u64,
        };
        let sparse_len = usize::try_from(h.mem_sparse_len)
            .map_err(|_| too_big("mem_sparse_len", h.mem_sparse_len))?;
        let deltas_len = page_count
            .checked_mul(PAGE_U64)
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| too_big("pages * 4096", page_count))?;

        let sparse: &[u8] = if h.flags & FLAG_SPARSE_ZSTD != 0 {
            decompress_exact(
                &mut self.dctx,
                sparse_section,
                &mut self.sparse_buf,
                sparse_len,
                "mem_sparse_len",
            )?
        } else if sparse_section.len() == sparse_len {
            sparse_section
        } else {
            return Err(FrameError::LengthMismatch {
                field: "mem_sparse_zlen (stored sparse stream)",
                declared: h.mem_sparse_zlen,
                actual: h.mem_sparse_len,
            });
        };
        let full_blocks = scan_sparse(sparse, page_count)?;
        // At most 8 per page, so at most `deltas_len` bytes.
        let dense_len = (full_blocks * BLOCK_LEN as u64) as usize;
        let dense: &[u8] = if h.flags & FLAG_DENSE_ZSTD == 0 {
            if dense_section.len() != dense_len {
                return Err(FrameError::LengthMismatch {
                    field: "mem_dense_zlen (stored dense stream)",
                    declared: h.mem_dense_zlen,
                    actual: dense_len as u64,
                });
            }
            dense_section
        } else {
            if dense_len == 0 {
                // An empty dense stream has an empty section and no flag.
                return Err(FrameError::UnsupportedFlags { found: h.flags });
            }
            decompress_exact(
                &mut self.dctx,
                dense_section,
                &mut self.dense_buf,
                dense_len,
                "dense stream (512 x full blocks)",
            )?
        };
        let mut deltas = vec![0u8; deltas_len];
        xor_streams(sparse, dense, deltas.chunks_exact_mut(PAGE))?;
        Ok(deltas)
    }
}

/// Validates and decodes one frame (`frame` must be exactly one whole frame). Never panics;
/// checks every declared length against `limits` and the input before allocating (see the
/// module documentation). Use a [`Decoder`] to reuse zstd contexts and buffers across frames.
pub fn decode(frame: &[u8], limits: &Limits) -> Result<DecodedFrame, FrameError> {
    Decoder::new()?.decode(frame, limits)
}

/// XORs each delta into `memory` (the replica's committed guest memory): page `p` of `ranges`
/// gets the next 4096 bytes of `deltas`. Fails without changing anything if `deltas` is not
/// `page_count * 4096` bytes or if a range does not lie inside `memory`.
pub fn apply_deltas(
    memory: &mut [u8],
    ranges: &MemoryRangeTable,
    deltas: &[u8],
) -> Result<(), FrameError> {
    let need = ranges.page_count().saturating_mul(PAGE_U64);
    if deltas.len() as u64 != need {
        return Err(FrameError::LengthMismatch {
            field: "deltas",
            declared: need,
            actual: deltas.len() as u64,
        });
    }
    let mem_pages = memory.len() as u64 / PAGE_U64;
    if let Some((index, r)) = ranges
        .ranges()
        .iter()
        .enumerate()
        .find(|(_, r)| r.first_page + r.pages > mem_pages)
    {
        return Err(FrameError::RangeOutsideMemory {
            index: index as u64,
            first_page: r.first_page,
            pages: r.pages,
            max_pages: mem_pages,
        });
    }
    let slices = range_slices(memory, ranges).unwrap_or_default();
    let mut src = deltas;
    for m in slices {
        let (d, rest) = src.split_at_checked(m.len()).unwrap_or_default();
        src = rest;
        for (m, d) in m.iter_mut().zip(d) {
            *m ^= d;
        }
    }
    Ok(())
}

/// Reproducible synthetic workloads for measuring the encoder (used by
/// `examples/encode_speed.rs` and by the project's benchmark).
pub mod workload {
    use crate::ranges::MemoryRangeTable;

    const PAGE: usize = super::PAGE;

    /// SplitMix64: tiny, fast, good enough for synthetic data.
    #[derive(Clone, Debug)]
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    const WORDS: &[&[u8]] = &[
        b"the ",
        b"of ",
        b"and ",
        b"kernel ",
        b"page ",
        b"memory ",
        b"epoch ",
        b"replica ",
        b"error: ",
        b"0x",
        b"\n",
        b"INFO ",
        b"request ",
        b"GET /index.html ",
        b"200 ",
        b"user=",
        b"time=",
        b"12:04:17 ",
        b"{\"id\": ",
        b"}, ",
        b"null",
        b"true",
    ];

    /// A page of typical kernel/heap data: 40% zero words, 20% small integers, 20% kernel
    /// pointers, 10% ASCII, 10% random.
    fn structured_page(rng: &mut Rng, page: &mut [u8]) {
        for w in page.chunks_exact_mut(8) {
            let v = match rng.below(10) {
                0..=3 => 0,
                4 | 5 => rng.below(1024),
                6 | 7 => 0xffff_8880_0000_0000 | (rng.next() & 0x0fff_fff8),
                8 => u64::from_le_bytes(*b"ax-guest") ^ (rng.below(26) << 56),
                _ => rng.next(),
            };
            w.copy_from_slice(&v.to_le_bytes());
        }
    }

    /// Log-like ASCII text.
    fn text_page(rng: &mut Rng, page: &mut [u8]) {
        let mut i = 0;
        while i < page.len() {
            let w = WORDS[rng.below(WORDS.len() as u64) as usize];
            for &b in w {
                if let Some(d) = page.get_mut(i) {
                    *d = b;
                }
                i += 1;
            }
        }
    }

    fn random_page(rng: &mut Rng, page: &mut [u8]) {
        for w in page.chunks_exact_mut(8) {
            w.copy_from_slice(&rng.next().to_le_bytes());
        }
    }

    /// Generates `pages` pages of "old" contents (what the shadow/replica holds) and "new"
    /// contents (the pages as dirtied during the epoch), `pages * 4096` bytes each.
    ///
    /// The pattern, drawn page by page from a SplitMix64 stream seeded by `seed`:
    /// * 70% **sparse rewrites**: old is heap-like data (40% zero words, 20% small integers,
    ///   20% kernel pointers, 10% ASCII, 10% random words); new is old with 8–63 randomly placed
    ///   u64 words overwritten (half counter increments of 1–255, a quarter new pointers, a
    ///   quarter new small integers);
    /// * 5% **fully rewritten with incompressible data** (heap-like old, random new: encrypted
    ///   or compressed buffers);
    /// * 5% **fully rewritten with text** (heap-like old, log-like ASCII new);
    /// * 15% **zero pages that were zero** (dirtied, still all zero);
    /// * 5% **zeroed pages** (heap-like old, all-zero new: freed and cleared; the XOR delta of
    ///   such a page is its old contents).
    ///
    /// On average 4096 pages give about 1.5 MiB of sparse stream and 1.5 MiB of dense blocks.
    pub fn synthetic_rewrite(seed: u64, pages: usize) -> (Vec<u8>, Vec<u8>) {
        let mut rng = Rng(seed ^ 0x5158_5a52_4c45_0001);
        let mut old = vec![0u8; pages * PAGE];
        let mut new = vec![0u8; pages * PAGE];
        for (o, n) in old.chunks_exact_mut(PAGE).zip(new.chunks_exact_mut(PAGE)) {
            match rng.below(20) {
                0..=13 => {
                    structured_page(&mut rng, o);
                    n.copy_from_slice(o);
                    let changes = 8 + rng.below(56);
                    for _ in 0..changes {
                        let i = rng.below(512) as usize * 8;
                        let Some(w) = n.get_mut(i..i + 8) else {
                            continue;
                        };
                        let cur = u64::from_le_bytes(<[u8; 8]>::try_from(&*w).unwrap_or_default());
                        let v = match rng.below(4) {
                            0 | 1 => cur.wrapping_add(1 + rng.below(255)),
                            2 => 0xffff_8880_0000_0000 | (rng.next() & 0x0fff_fff8),
                            _ => rng.below(65536),
                        };
                        w.copy_from_slice(&v.to_le_bytes());
                    }
                }
                14 => {
                    structured_page(&mut rng, o);
                    random_page(&mut rng, n);
                }
                15 => {
                    structured_page(&mut rng, o);
                    text_page(&mut rng, n);
                }
                16..=18 => {}
                _ => structured_page(&mut rng, o),
            }
        }
        (old, new)
    }

    /// A deterministic dirty set of `pages` pages (at most `mem_pages`) scattered over a guest
    /// of `mem_pages` pages in runs of 1–32 pages at random places.
    pub fn synthetic_ranges(seed: u64, pages: u64, mem_pages: u64) -> MemoryRangeTable {
        let pages = pages.min(mem_pages);
        let words = mem_pages.div_ceil(64) as usize;
        let mut bitmap = vec![0u64; words];
        let mut rng = Rng(seed ^ 0x7261_6e67_6573_0002);
        let mut count = 0u64;
        let set = |p: u64, bitmap: &mut [u64], count: &mut u64| {
            if let Some(w) = bitmap.get_mut((p / 64) as usize) {
                if *w & (1 << (p % 64)) == 0 {
                    *w |= 1 << (p % 64);
                    *count += 1;
                }
            }
        };
        let mut attempts = 0u64;
        while count < pages && attempts < pages.saturating_mul(4) {
            attempts += 1;
            let start = rng.below(mem_pages.max(1));
            let len = 1 + rng.below(32);
            let mut p = start;
            while p < mem_pages && p < start + len && count < pages {
                set(p, &mut bitmap, &mut count);
                p += 1;
            }
        }
        // Dense requests: fill the remaining pages from the bottom.
        let mut p = 0;
        while count < pages && p < mem_pages {
            set(p, &mut bitmap, &mut count);
            p += 1;
        }
        MemoryRangeTable::from_bitmap(&bitmap)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;

    // ---- allocation accounting (largest single request on the current thread) ----

    struct TrackingAlloc;

    thread_local! {
        static TRACK: Cell<bool> = const { Cell::new(false) };
        static LARGEST: Cell<usize> = const { Cell::new(0) };
    }

    fn note(size: usize) {
        // `try_with`: thread-locals may already be gone while a thread shuts down.
        let _ = TRACK.try_with(|t| {
            if t.get() {
                let _ = LARGEST.try_with(|l| l.set(l.get().max(size)));
            }
        });
    }

    // SAFETY: every method forwards to `System` with the caller's arguments unchanged; the only
    // extra work is recording sizes in const-initialised thread-locals, which never allocates.
    unsafe impl GlobalAlloc for TrackingAlloc {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            note(layout.size());
            // SAFETY: same contract as our caller's.
            unsafe { System.alloc(layout) }
        }
        unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
            note(layout.size());
            // SAFETY: same contract as our caller's.
            unsafe { System.alloc_zeroed(layout) }
        }
        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            // SAFETY: same contract as our caller's.
            unsafe { System.dealloc(ptr, layout) }
        }
        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            note(new_size);
            // SAFETY: same contract as our caller's.
            unsafe { System.realloc(ptr, layout, new_size) }
        }
    }

    #[global_allocator]
    static ALLOC: TrackingAlloc = TrackingAlloc;

    /// Runs `f` and returns its result with the largest single allocation it made.
    fn largest_alloc<T>(f: impl FnOnce() -> T) -> (T, usize) {
        LARGEST.with(|l| l.set(0));
        TRACK.with(|t| t.set(true));
        let r = f();
        TRACK.with(|t| t.set(false));
        (r, LARGEST.with(|l| l.get()))
    }

    // ---- helpers ----

    /// SplitMix64 for test data.
    struct Sm(u64);

    impl Sm {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n.max(1)
        }
        fn bytes(&mut self, n: usize) -> Vec<u8> {
            (0..n).map(|_| self.next() as u8).collect()
        }
    }

    const MIB: u64 = 1 << 20;

    /// Changes one page the way guests do (or leaves it as it is: dirty but unchanged).
    fn mutate_page(rng: &mut Sm, page: &mut [u8]) {
        match rng.below(7) {
            0 | 1 => {
                for _ in 0..1 + rng.below(40) {
                    let i = rng.below(512) as usize * 8;
                    page[i..i + 8].copy_from_slice(&rng.next().to_le_bytes());
                }
            }
            2 => page.copy_from_slice(&rng.bytes(PAGE)),
            3 => page.fill(0),
            4 => page.fill(rng.next() as u8),
            5 => {
                let i = rng.below(PAGE as u64) as usize;
                page[i] ^= 1 + rng.below(255) as u8;
            }
            _ => {}
        }
    }

    /// Dirties a random set of pages of `mem`; returns the table and the staging buffer.
    fn dirty_epoch(rng: &mut Sm, mem: &mut [u8]) -> (MemoryRangeTable, Vec<u8>) {
        let n_pages = mem.len() / PAGE;
        let density = 1 + rng.below(4);
        let mut bitmap = vec![0u64; n_pages.div_ceil(64)];
        for p in 0..n_pages {
            if rng.below(4) < density {
                bitmap[p / 64] |= 1 << (p % 64);
            }
        }
        let ranges = MemoryRangeTable::from_bitmap(&bitmap);
        let mut staging = Vec::with_capacity(ranges.page_count() as usize * PAGE);
        for p in ranges.pages() {
            let page = &mut mem[p as usize * PAGE..(p as usize + 1) * PAGE];
            mutate_page(rng, page);
            staging.extend_from_slice(page);
        }
        (ranges, staging)
    }

    fn disk_writes(rng: &mut Sm, disk_sectors: u64) -> Vec<DiskWrite> {
        (0..rng.below(4))
            .map(|_| {
                let sectors = 1 + rng.below(4);
                DiskWrite {
                    sector: rng.below(disk_sectors - sectors + 1),
                    data: rng.bytes(sectors as usize * 512),
                }
            })
            .collect()
    }

    /// Encodes `epochs` random epochs of a `mem_size` guest and checks, after every one, that a
    /// replica fed with decode + apply_deltas equals the source memory (and the shadow).
    fn round_trip(seed: u64, mem_size: u64, epochs: u32, level: i32, dense_level: i32) {
        let disk_bytes = 64 * 512;
        let limits = Limits::for_vm(mem_size, disk_bytes);
        let mut rng = Sm(seed);
        let mut enc = Encoder::new(mem_size, level).unwrap();
        enc.set_dense_level(dense_level).unwrap();
        enc.set_limits(Some(limits.clone()));
        let mut dec = Decoder::new().unwrap();
        let mut source = vec![0u8; mem_size as usize];
        let mut replica = vec![0u8; mem_size as usize];
        let mut out = Vec::new();
        for epoch in 0..u64::from(epochs) {
            let (ranges, staging) = dirty_epoch(&mut rng, &mut source);
            let writes = disk_writes(&mut rng, disk_bytes / 512);
            let n = rng.below(300) as usize;
            let state = rng.bytes(n);
            let n = rng.below(100) as usize;
            let console = rng.bytes(n);
            out.clear();
            out.extend_from_slice(b"previous frame"); // encode appends
            let stats = enc
                .encode(
                    epoch, &ranges, &staging, &state, &writes, &console, &mut out,
                )
                .unwrap();
            let frame = &out[14..];
            assert_eq!(stats.frame_bytes, frame.len() as u64);
            assert_eq!(frame_len(frame, &limits).unwrap(), frame.len() as u64);
            let f = dec.decode(frame, &limits).unwrap();
            assert_eq!(f, decode(frame, &limits).unwrap());
            assert_eq!(f.epoch, epoch);
            assert_eq!(f.ranges, ranges);
            assert_eq!(f.disk_writes, writes);
            assert_eq!(f.state, state);
            assert_eq!(f.console, console);
            apply_deltas(&mut replica, &f.ranges, &f.deltas).unwrap();
            assert!(replica == source, "replica diverged at epoch {epoch}");
            assert!(
                enc.shadow() == &source[..],
                "shadow diverged at epoch {epoch}"
            );
        }
    }

    /// A small valid frame exercising every section (and, with zstd, both compressed streams).
    fn sample_frame(level: i32, dense_level: i32) -> (Vec<u8>, Limits) {
        let mem_size = 16 * PAGE_U64;
        let limits = Limits::for_vm(mem_size, 16 * 512);
        let mut enc = Encoder::new(mem_size, level).unwrap();
        enc.set_dense_level(dense_level).unwrap();
        let mut rng = Sm(7);
        let ranges = MemoryRangeTable::from_ranges(vec![
            MemoryRange {
                first_page: 1,
                pages: 2,
            },
            MemoryRange {
                first_page: 9,
                pages: 1,
            },
        ])
        .unwrap();
        let mut pages = vec![0u8; 3 * PAGE];
        pages[..PAGE].copy_from_slice(&rng.bytes(PAGE)); // dense
        pages[PAGE + 8..PAGE + 16].copy_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8]); // sparse
        pages[2 * PAGE + 1000] = 9;
        let writes = vec![DiskWrite {
            sector: 3,
            data: vec![0xab; 512],
        }];
        let mut out = Vec::new();
        enc.encode(5, &ranges, &pages, b"state", &writes, b"console", &mut out)
            .unwrap();
        (out, limits)
    }

    fn refresh_crc(frame: &mut [u8]) {
        let n = frame.len() - TRAILER_LEN;
        let crc = crc32fast::hash(&frame[..n]);
        frame[n..].copy_from_slice(&crc.to_le_bytes());
    }

    /// Rewrites the header of `frame` through `f`, then fixes the CRC.
    fn with_header(frame: &[u8], f: impl FnOnce(&mut FrameHeader)) -> Vec<u8> {
        let mut h = FrameHeader::parse(frame).unwrap();
        f(&mut h);
        let mut v = frame.to_vec();
        v[..HEADER_LEN].copy_from_slice(&h.to_bytes());
        refresh_crc(&mut v);
        v
    }

    const CONFIGS: [(i32, i32); 4] = [(STORE, STORE), (1, STORE), (-3, 1), (STORE, -1)];

    // ---- round trips ----

    #[test]
    fn round_trip_larger_deterministic() {
        for (i, (level, dense)) in CONFIGS.into_iter().enumerate() {
            round_trip(100 + i as u64, 4 * MIB, 6, level, dense);
        }
    }

    #[test]
    fn round_trip_synthetic_workload() {
        let mem_size = 8 * MIB;
        let ranges = workload::synthetic_ranges(3, 700, mem_size / PAGE_U64);
        assert_eq!(ranges.page_count(), 700);
        let (old, new) = workload::synthetic_rewrite(3, 700);
        let limits = Limits::for_vm(mem_size, 0);
        for (level, dense) in CONFIGS {
            let mut enc = Encoder::new(mem_size, level).unwrap();
            enc.set_dense_level(dense).unwrap();
            let mut replica = vec![0u8; mem_size as usize];
            for (epoch, pages) in [&old, &new, &old].into_iter().enumerate() {
                let mut out = Vec::new();
                let s = enc
                    .encode(epoch as u64, &ranges, pages, &[], &[], &[], &mut out)
                    .unwrap();
                assert!(s.compressed_bytes < s.raw_bytes);
                let f = decode(&out, &limits).unwrap();
                apply_deltas(&mut replica, &f.ranges, &f.deltas).unwrap();
                assert!(replica == enc.shadow());
                for (i, p) in ranges.pages().enumerate() {
                    let at = p as usize * PAGE;
                    assert_eq!(&replica[at..at + PAGE], &pages[i * PAGE..(i + 1) * PAGE]);
                }
            }
        }
    }

    #[test]
    fn empty_frame_round_trips() {
        let limits = Limits::for_vm(MIB, 0);
        let mut enc = Encoder::new(MIB, 1).unwrap();
        let mut out = Vec::new();
        let empty = MemoryRangeTable::default();
        let s = enc.encode(9, &empty, &[], &[], &[], &[], &mut out).unwrap();
        assert_eq!(out.len(), MIN_FRAME_LEN);
        assert_eq!(s.frame_bytes, MIN_FRAME_LEN as u64);
        let f = decode(&out, &limits).unwrap();
        assert_eq!(f.epoch, 9);
        assert!(f.ranges.is_empty() && f.deltas.is_empty() && f.disk_writes.is_empty());
    }

    #[test]
    fn header_layout() {
        let (frame, _) = sample_frame(STORE, STORE);
        assert_eq!(&frame[0..4], b"AXSP");
        assert_eq!(u16::from_le_bytes([frame[4], frame[5]]), VERSION);
        assert_eq!(u16::from_le_bytes([frame[6], frame[7]]), 0);
        let u64_at = |o: usize| u64::from_le_bytes(frame[o..o + 8].try_into().unwrap());
        let u32_at = |o: usize| u32::from_le_bytes(frame[o..o + 4].try_into().unwrap());
        assert_eq!(u64_at(8), 5); // epoch
        assert_eq!(u64_at(16), frame.len() as u64);
        assert_eq!(u32_at(24), 2); // ranges
        assert_eq!(u32_at(28), 1); // disk writes
        assert_eq!(u32_at(32), 5); // "state"
        assert_eq!(u32_at(36), 7); // "console"
        assert_eq!(u64_at(40), 512); // disk data
        let (sparse, sparse_z, dense_z) = (u64_at(48), u64_at(56), u64_at(64));
        assert_eq!(dense_z, 8 * 512); // page 1 is fully rewritten with random bytes
        assert_eq!(sparse, 3 * 64 + 2 * 8); // masks + one word in each of pages 2 and 9
        assert_eq!(sparse_z, sparse);
        // ranges right after the header
        assert_eq!((u64_at(72), u64_at(80)), (1, 2));
        assert_eq!((u64_at(88), u64_at(96)), (9, 1));
        assert_eq!((u64_at(104), u64_at(112)), (3, 512));
        let crc = u32::from_le_bytes(frame[frame.len() - 4..].try_into().unwrap());
        assert_eq!(crc, crc32fast::hash(&frame[..frame.len() - 4]));
        let (zframe, _) = sample_frame(1, 1);
        let h = FrameHeader::parse(&zframe).unwrap();
        assert_eq!(h.flags, FLAG_DENSE_ZSTD | FLAG_SPARSE_ZSTD);
        assert_eq!(h.mem_sparse_len, sparse);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn round_trip_small_memories(
            seed in any::<u64>(),
            pages in 1u64..40,
            epochs in 1u32..5,
            config in 0usize..CONFIGS.len(),
        ) {
            let (level, dense) = CONFIGS[config];
            round_trip(seed, pages * PAGE_U64, epochs, level, dense);
        }
    }

    // ---- corruption, truncation, garbage ----

    #[test]
    fn every_single_byte_corruption_is_an_error() {
        for (level, dense) in CONFIGS {
            let (frame, limits) = sample_frame(level, dense);
            for i in 0..frame.len() {
                for x in [0x01u8, 0x80, 0xff] {
                    let mut bad = frame.clone();
                    bad[i] ^= x;
                    assert!(decode(&bad, &limits).is_err(), "byte {i} ^ {x:#x} accepted");
                }
            }
        }
    }

    #[test]
    fn every_truncation_is_an_error() {
        for (level, dense) in CONFIGS {
            let (frame, limits) = sample_frame(level, dense);
            for n in 0..frame.len() {
                let e = decode(&frame[..n], &limits).unwrap_err();
                if n >= HEADER_LEN {
                    assert!(
                        matches!(e, FrameError::Truncated { what: "frame", .. }),
                        "{e}"
                    );
                }
            }
            let mut longer = frame.clone();
            longer.push(0);
            assert!(matches!(
                decode(&longer, &limits),
                Err(FrameError::LengthMismatch {
                    field: "total_len",
                    ..
                })
            ));
        }
    }

    #[test]
    fn garbage_is_an_error() {
        let limits = Limits::for_vm(MIB, MIB);
        let mut rng = Sm(1);
        for n in [0, 1, 4, 23, 24, 71, 72, 76, 100, 4096] {
            assert!(decode(&vec![0u8; n], &limits).is_err());
            assert!(decode(&rng.bytes(n), &limits).is_err());
            let mut with_magic = rng.bytes(n);
            if n >= 8 {
                with_magic[..8].copy_from_slice(b"AXSP\x01\x00\x00\x00");
                assert!(decode(&with_magic, &limits).is_err());
            }
        }
        assert!(matches!(
            decode(b"AXSQ\x01\x00\x00\x00", &limits),
            Err(FrameError::BadMagic { .. })
        ));
        assert!(matches!(
            decode(b"AXSP\x02\x00\x00\x00", &limits),
            Err(FrameError::UnsupportedVersion { found: 2, .. })
        ));
        assert!(matches!(
            decode(b"AXSP\x01\x00\x04\x00", &limits),
            Err(FrameError::UnsupportedFlags { found: 4 })
        ));
    }

    #[test]
    fn frame_len_for_stream_framing() {
        let (frame, limits) = sample_frame(1, STORE);
        assert_eq!(
            frame_len(&frame[..HEADER_LEN], &limits).unwrap(),
            frame.len() as u64
        );
        assert_eq!(
            frame_len(&frame[..FRAME_LEN_PREFIX], &limits).unwrap(),
            frame.len() as u64
        );
        assert!(matches!(
            frame_len(&frame[..FRAME_LEN_PREFIX - 1], &limits),
            Err(FrameError::Truncated { .. })
        ));
        let small = Limits {
            max_frame_bytes: frame.len() as u64 - 1,
            ..limits.clone()
        };
        assert!(matches!(
            frame_len(&frame, &small),
            Err(FrameError::TooLarge {
                field: "total_len",
                ..
            })
        ));
        let tiny = with_header(&frame, |h| h.total_len = 10);
        assert!(matches!(
            frame_len(&tiny, &limits),
            Err(FrameError::TooSmall { .. })
        ));
    }

    #[test]
    fn oversized_declared_lengths_are_rejected_without_allocating() {
        let (frame, limits) = sample_frame(1, 1);
        let huge = u64::MAX / 2;
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (with_header(&frame, |h| h.total_len = huge), "total_len"),
            (with_header(&frame, |h| h.n_ranges = u32::MAX), "n_ranges"),
            (
                with_header(&frame, |h| h.n_disk_writes = u32::MAX),
                "n_disk_writes",
            ),
            (with_header(&frame, |h| h.state_len = u32::MAX), "state_len"),
            (
                with_header(&frame, |h| h.console_len = u32::MAX),
                "console_len",
            ),
            (
                with_header(&frame, |h| h.disk_data_len = huge),
                "disk_data_len",
            ),
            (
                with_header(&frame, |h| h.mem_sparse_len = huge),
                "mem_sparse_len",
            ),
        ];
        for (bad, field) in cases {
            let (r, largest) = largest_alloc(|| decode(&bad, &limits));
            match r {
                Err(FrameError::TooLarge { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{field}: {other:?}"),
            }
            assert!(largest < 1 << 20, "{field}: allocated {largest} bytes");
        }
        // Lengths within the limits but beyond the input: a length mismatch, no allocation.
        let lim = Limits::for_vm(1 << 30, 1 << 30);
        for bad in [
            with_header(&frame, |h| h.n_ranges = 1 << 16),
            with_header(&frame, |h| h.state_len = 1 << 24),
            with_header(&frame, |h| h.mem_dense_zlen = 1 << 30),
            with_header(&frame, |h| h.mem_sparse_zlen = u64::MAX),
        ] {
            let (r, largest) = largest_alloc(|| decode(&bad, &lim));
            assert!(
                matches!(
                    r,
                    Err(FrameError::LengthMismatch {
                        field: "total_len",
                        ..
                    })
                ),
                "{r:?}"
            );
            assert!(largest < 1 << 20, "allocated {largest} bytes");
        }
    }

    /// A frame declaring a huge page range with a tiny body: rejected before the big buffers.
    #[test]
    fn decompression_is_bounded_by_the_declared_size() {
        let mem_size = 64 * MIB;
        let limits = Limits::for_vm(mem_size, 0);
        let mut enc = Encoder::new(mem_size, 1).unwrap();
        let ranges = MemoryRangeTable::from_ranges(vec![MemoryRange {
            first_page: 0,
            pages: 16384,
        }])
        .unwrap();
        let pages = vec![0u8; 16384 * PAGE];
        let mut frame = Vec::new();
        enc.encode(0, &ranges, &pages, &[], &[], &[], &mut frame)
            .unwrap();
        assert!(frame.len() < 64 * 1024, "all-zero memory compresses");
        // A wrong declared decompressed size is caught by zstd's bounded output or by the exact
        // length check, whichever way it is wrong.
        for delta in [-8i64, 8, 4096, 1 << 20] {
            let bad = with_header(&frame, |h| {
                h.mem_sparse_len = h.mem_sparse_len.wrapping_add_signed(delta)
            });
            let e = decode(&bad, &limits).unwrap_err();
            assert!(
                matches!(
                    e,
                    FrameError::Decompress(_)
                        | FrameError::LengthMismatch { .. }
                        | FrameError::TooSmall { .. }
                ),
                "{e}"
            );
        }
        // Declaring fewer pages than the stream holds.
        let bad = {
            let mut v = frame.clone();
            v[80..88].copy_from_slice(&100u64.to_le_bytes());
            refresh_crc(&mut v);
            v
        };
        let (r, largest) = largest_alloc(|| decode(&bad, &limits));
        assert!(r.is_err());
        assert!(largest <= 100 * MAX_SPARSE_PAGE_LEN, "allocated {largest}");
    }

    #[test]
    fn ranges_are_validated() {
        let (frame, limits) = sample_frame(STORE, STORE);
        // Outside memory.
        let small = Limits {
            max_pages: 9,
            ..limits.clone()
        };
        assert!(matches!(
            decode(&frame, &small),
            Err(FrameError::RangeOutsideMemory {
                index: 1,
                first_page: 9,
                pages: 1,
                max_pages: 9
            })
        ));
        let set_range = |i: usize, first: u64, pages: u64| {
            let mut v = frame.clone();
            let at = HEADER_LEN + i * 16;
            v[at..at + 8].copy_from_slice(&first.to_le_bytes());
            v[at + 8..at + 16].copy_from_slice(&pages.to_le_bytes());
            refresh_crc(&mut v);
            v
        };
        for (bad, reason) in [
            (set_range(1, 3, 1), "adjacent"),
            (set_range(1, 2, 1), "starts before"),
            (set_range(1, 0, 1), "starts before"),
            (set_range(0, 1, 0), "empty"),
            (set_range(1, u64::MAX, 1), "overflows"),
        ] {
            match decode(&bad, &limits) {
                Err(FrameError::BadRange { reason: r, .. }) => assert!(r.contains(reason), "{r}"),
                other => panic!("{reason}: {other:?}"),
            }
        }
    }

    #[test]
    fn disk_writes_are_validated() {
        let (frame, limits) = sample_frame(STORE, STORE);
        let small = Limits {
            disk_sectors: 3,
            ..limits.clone()
        };
        assert!(matches!(
            decode(&frame, &small),
            Err(FrameError::DiskWriteOutOfRange {
                index: 0,
                sector: 3,
                len: 512,
                disk_sectors: 3
            })
        ));
        let at = HEADER_LEN + 2 * 16;
        let mut bad = frame.clone();
        bad[at..at + 8].copy_from_slice(&u64::MAX.to_le_bytes());
        refresh_crc(&mut bad);
        assert!(matches!(
            decode(&bad, &limits),
            Err(FrameError::DiskWriteOutOfRange { .. })
        ));
        let mut enc = Encoder::new(MIB, STORE).unwrap();
        let empty = MemoryRangeTable::default();
        for data in [vec![], vec![0u8; 100]] {
            let w = [DiskWrite { sector: 0, data }];
            assert!(matches!(
                enc.encode(0, &empty, &[], &[], &w, &[], &mut Vec::new()),
                Err(FrameError::BadDiskWrite { .. })
            ));
        }
        enc.set_limits(Some(Limits::for_vm(MIB, 4096)));
        let w = [DiskWrite {
            sector: 7,
            data: vec![0; 1024],
        }];
        assert!(matches!(
            enc.encode(0, &empty, &[], &[], &w, &[], &mut Vec::new()),
            Err(FrameError::DiskWriteOutOfRange { .. })
        ));
    }

    #[test]
    fn malformed_memory_sections_are_errors() {
        let (frame, limits) = sample_frame(STORE, STORE);
        let h = FrameHeader::parse(&frame).unwrap();
        let dense_at = frame.len() - TRAILER_LEN - (h.mem_sparse_zlen + h.mem_dense_zlen) as usize;
        let sparse_at = dense_at + h.mem_dense_zlen as usize;
        // Clearing a full-block mask: the dense stream becomes too long for the masks.
        let mut bad = frame.clone();
        bad[sparse_at..sparse_at + 8].fill(0);
        refresh_crc(&mut bad);
        assert!(decode(&bad, &limits).is_err());
        // Setting one more bit in a partial mask: the sparse stream becomes too short.
        let mut bad = frame.clone();
        bad[sparse_at + 64 + 8] |= 0x80;
        refresh_crc(&mut bad);
        assert!(matches!(
            decode(&bad, &limits),
            Err(FrameError::BadDeltaStream { .. })
        ));
        // Flag says zstd, data is raw.
        for flag in [FLAG_DENSE_ZSTD, FLAG_SPARSE_ZSTD] {
            let bad = with_header(&frame, |h| h.flags |= flag);
            assert!(matches!(
                decode(&bad, &limits),
                Err(FrameError::Decompress(_))
            ));
        }
        // No pages but memory lengths or flags.
        let (empty, _) = {
            let mut enc = Encoder::new(MIB, STORE).unwrap();
            let mut out = Vec::new();
            let t = MemoryRangeTable::default();
            enc.encode(0, &t, &[], &[], &[], &[], &mut out).unwrap();
            (out, ())
        };
        for bad in [
            with_header(&empty, |h| h.flags = FLAG_SPARSE_ZSTD),
            with_header(&empty, |h| h.mem_sparse_len = 64),
        ] {
            assert!(decode(&bad, &limits).is_err());
        }
    }

    #[test]
    fn apply_deltas_checks_sizes() {
        let ranges = MemoryRangeTable::from_ranges(vec![MemoryRange {
            first_page: 3,
            pages: 2,
        }])
        .unwrap();
        let deltas = vec![1u8; 2 * PAGE];
        let mut mem = vec![0u8; 4 * PAGE];
        assert!(matches!(
            apply_deltas(&mut mem, &ranges, &deltas),
            Err(FrameError::RangeOutsideMemory { max_pages: 4, .. })
        ));
        assert!(mem.iter().all(|&b| b == 0));
        let mut mem = vec![0u8; 5 * PAGE];
        assert!(matches!(
            apply_deltas(&mut mem, &ranges, &deltas[1..]),
            Err(FrameError::LengthMismatch {
                field: "deltas",
                ..
            })
        ));
        apply_deltas(&mut mem, &ranges, &deltas).unwrap();
        assert!(mem[..3 * PAGE].iter().all(|&b| b == 0));
        assert!(mem[3 * PAGE..].iter().all(|&b| b == 1));
    }

    // ---- encoder failures leave everything unchanged ----

    #[test]
    fn failed_encode_changes_nothing() {
        let mem_size = 32 * PAGE_U64;
        let mut enc = Encoder::new(mem_size, 1).unwrap();
        let mut rng = Sm(5);
        let mut source = vec![0u8; mem_size as usize];
        let (ranges, staging) = dirty_epoch(&mut rng, &mut source);
        let mut out = Vec::new();
        enc.encode(0, &ranges, &staging, &[], &[], &[], &mut out)
            .unwrap();
        let shadow = enc.shadow().to_vec();
        let (ranges, staging) = dirty_epoch(&mut rng, &mut source);
        assert!(!ranges.is_empty());
        out.clear();
        out.extend_from_slice(b"keep");
        // pages.len() inconsistent with the ranges
        assert!(matches!(
            enc.encode(1, &ranges, &staging[PAGE..], &[], &[], &[], &mut out),
            Err(FrameError::LengthMismatch { field: "pages", .. })
        ));
        // ranges beyond memory
        let beyond = MemoryRangeTable::from_ranges(vec![MemoryRange {
            first_page: 31,
            pages: 2,
        }])
        .unwrap();
        assert!(matches!(
            enc.encode(1, &beyond, &vec![0; 2 * PAGE], &[], &[], &[], &mut out),
            Err(FrameError::RangeOutsideMemory { .. })
        ));
        // a failure after the delta pass (frame larger than the receiver accepts) is undone too
        for dense in [STORE, 1] {
            enc.set_dense_level(dense).unwrap();
            enc.set_limits(Some(Limits {
                max_frame_bytes: 200,
                ..Limits::for_vm(mem_size, 0)
            }));
            assert!(matches!(
                enc.encode(1, &ranges, &staging, &[], &[], &[], &mut out),
                Err(FrameError::TooLarge {
                    field: "total_len",
                    ..
                })
            ));
            assert!(enc.shadow() == &shadow[..]);
            assert_eq!(out, b"keep");
        }
        // state over the limit
        enc.set_limits(Some(Limits::for_vm(mem_size, 0)));
        let state = vec![0u8; Limits::DEFAULT_MAX_STATE_BYTES as usize + 1];
        assert!(matches!(
            enc.encode(1, &ranges, &staging, &state, &[], &[], &mut out),
            Err(FrameError::TooLarge {
                field: "state_len",
                ..
            })
        ));
        assert!(enc.shadow() == &shadow[..]);
        assert_eq!(out, b"keep");
        // and the encoder still works
        enc.encode(1, &ranges, &staging, &[], &[], &[], &mut out)
            .unwrap();
        assert!(enc.shadow() == &source[..]);
    }

    #[test]
    fn encoder_arguments_are_checked() {
        assert!(matches!(
            Encoder::new(0, 1),
            Err(FrameError::InvalidMemorySize { .. })
        ));
        assert!(matches!(
            Encoder::new(4097, 1),
            Err(FrameError::InvalidMemorySize { .. })
        ));
        assert!(matches!(
            Encoder::new(4096, 1000),
            Err(FrameError::InvalidLevel { level: 1000, .. })
        ));
        let mut enc = Encoder::new(4096, STORE).unwrap();
        assert_eq!(enc.level(), STORE);
        assert!(enc.set_dense_level(-1000000).is_err());
        enc.set_dense_level(-5).unwrap();
        assert_eq!(enc.dense_level(), -5);
    }

    #[test]
    fn reset_forgets_the_shadow() {
        let mut enc = Encoder::new(4 * PAGE_U64, STORE).unwrap();
        let ranges = MemoryRangeTable::from_bitmap(&[0b10]);
        enc.encode(0, &ranges, &[7u8; PAGE], &[], &[], &[], &mut Vec::new())
            .unwrap();
        assert!(enc.shadow()[PAGE..2 * PAGE].iter().all(|&b| b == 7));
        enc.reset();
        assert!(enc.shadow().iter().all(|&b| b == 0));
    }

    #[test]
    fn workload_is_deterministic() {
        let (a, b) = workload::synthetic_rewrite(11, 50);
        assert_eq!(a.len(), 50 * PAGE);
        assert_eq!(b.len(), 50 * PAGE);
        assert_eq!((a.clone(), b.clone()), workload::synthetic_rewrite(11, 50));
        assert_ne!(a, b);
        assert_ne!(workload::synthetic_rewrite(12, 50).1, b);
        let t = workload::synthetic_ranges(1, 100, 1000);
        assert_eq!(t, workload::synthetic_ranges(1, 100, 1000));
        assert_eq!(t.page_count(), 100);
        assert!(t.end_page() <= 1000);
        assert_eq!(workload::synthetic_ranges(1, 5000, 1000).page_count(), 1000);
    }

    #[test]
    fn limits_for_vm() {
        let l = Limits::for_vm(256 * MIB, 64 * MIB);
        assert_eq!(l.max_pages, 65536);
        assert_eq!(l.max_ranges, 32768);
        assert_eq!(l.disk_sectors, 131072);
        assert_eq!(l.max_disk_bytes, 64 * MIB);
        assert!(l.max_frame_bytes > 256 * MIB + 64 * MIB);
        assert_eq!(l.max_frame_bytes, l.largest_frame());
    }

    // ---- fuzzing: only "no panic" is required ----

    fn mutated(frame: &[u8], edits: &[(usize, u8)], cut: Option<usize>, fix_crc: bool) -> Vec<u8> {
        let mut v = frame.to_vec();
        for &(i, x) in edits {
            if !v.is_empty() {
                let n = v.len();
                v[i % n] ^= x;
            }
        }
        if let Some(c) = cut {
            v.truncate(c % (v.len() + 1));
        }
        if fix_crc && v.len() >= MIN_FRAME_LEN {
            refresh_crc(&mut v);
        }
        v
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]
        #[test]
        fn decode_never_panics_on_random_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let limits = Limits::for_vm(MIB, MIB);
            let _ = decode(&bytes, &limits);
            let _ = frame_len(&bytes, &limits);
            let _ = FrameHeader::parse(&bytes);
        }

        #[test]
        fn decode_never_panics_on_mutated_frames(
            config in 0usize..CONFIGS.len(),
            edits in proptest::collection::vec((any::<usize>(), 1u8..=255), 1..6),
            header_edits in proptest::collection::vec((0usize..HEADER_LEN, any::<u8>()), 0..3),
            cut in proptest::option::of(any::<usize>()),
            fix_crc in any::<bool>(),
        ) {
            let (level, dense) = CONFIGS[config];
            let (frame, limits) = sample_frame(level, dense);
            let mut all = edits.clone();
            all.extend(header_edits);
            let bad = mutated(&frame, &all, cut, fix_crc);
            if let Ok(f) = decode(&bad, &limits) {
                // Whatever is accepted must be applicable.
                let mut mem = vec![0u8; (limits.max_pages * PAGE_U64) as usize];
                apply_deltas(&mut mem, &f.ranges, &f.deltas).unwrap();
            }
            let _ = frame_len(&bad, &limits);
        }
    }
}
