//! The port-I/O devices of the guest ABI: `console`, `blk`, `exit` (`docs/guest-abi.md`).
//!
//! Each device keeps its architectural state in a plain serde struct ([`Persist`]). What a device
//! produces during an epoch — console bytes, block writes — is *epoch output*: it stays inside the
//! device until the epoch is captured, and from there travels with the checkpoint. Console bytes reach
//! the outside world only through the output gate (`crate::output`) once their epoch is committed, so
//! there is exactly one place where guest output is released.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress};

use crate::frame::DiskWrite;
use crate::memory::GuestRam;

/// Console data port (out8).
pub const PORT_CONSOLE: u16 = 0x500;
/// Exit port (out32).
pub const PORT_EXIT: u16 = 0x501;
/// Block doorbell (out32: request address).
pub const PORT_BLK_DOORBELL: u16 = 0x510;
/// Block capacity (in32: sectors).
pub const PORT_BLK_CAPACITY: u16 = 0x511;

/// Sector size of the block device.
pub const SECTOR: u64 = 512;
/// Largest single block request.
pub const MAX_BLK_REQUEST: u32 = 1 << 20;

/// Block op codes.
const OP_READ: u32 = 0;
const OP_WRITE: u32 = 1;
const OP_FLUSH: u32 = 2;
/// Block status codes.
const ST_OK: u32 = 0;
const ST_IOERR: u32 = 1;
const ST_UNSUPPORTED: u32 = 2;
const ST_BAD_REQUEST: u32 = 3;

/// Save/restore of one component on plain serde data (Firecracker's `Persist`).
pub trait Persist: Sized {
    /// The saved state.
    type State: Serialize + for<'de> Deserialize<'de>;
    /// What restoring needs besides the state.
    type Args;
    /// Restore error.
    type Error;
    /// Saves the state.
    fn save(&self) -> Self::State;
    /// Rebuilds the component from a saved state.
    fn restore(args: Self::Args, state: &Self::State) -> Result<Self, Self::Error>;
}

/// Device errors.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The disk image could not be opened.
    #[error("disk image {path}: {source}")]
    Disk {
        /// The image path.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The disk image size is not a whole number of sectors, or differs from the saved one.
    #[error("disk image {path}: size {size} bytes {why}")]
    DiskSize {
        /// The image path.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// What is wrong with it.
        why: String,
    },
    /// A saved state names a block device but no disk was given (or the reverse).
    #[error("the saved state {0}")]
    DiskMismatch(&'static str),
}

/// Environment variable naming a file to which the console appends one line per guest line, at the
/// moment its newline reaches the VMM: `<unix time ns> <stream offset just past the newline>`. For
/// latency measurements (`ax-bench failover`); unset (the normal case), nothing is opened or recorded.
pub const CONSOLE_TIMES_ENV: &str = "AX_CONSOLE_TIMES";

/// The console: collects the bytes of the current epoch.
#[derive(Debug, Default)]
pub struct Console {
    epoch_bytes: Vec<u8>,
    total: u64,
    /// Where line write times go ([`CONSOLE_TIMES_ENV`]).
    times: Option<File>,
}

/// Saved console state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsoleState {
    /// Bytes written by the guest since boot (the output stream offset).
    pub total_bytes: u64,
}

impl Console {
    fn write(&mut self, byte: u8) {
        self.epoch_bytes.push(byte);
        self.total += 1;
        if byte == b'\n' {
            if let Some(f) = &mut self.times {
                use std::io::Write as _;
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos());
                let _ = f.write_all(format!("{now} {}\n", self.total).as_bytes());
            }
        }
    }

    /// A console that records line times if [`CONSOLE_TIMES_ENV`] names a file (appending).
    fn with_times(total: u64) -> Self {
        let times = std::env::var_os(CONSOLE_TIMES_ENV)
            .and_then(|path| OpenOptions::new().create(true).append(true).open(path).ok());
        Console {
            epoch_bytes: Vec::new(),
            total,
            times,
        }
    }

    /// Takes the bytes written since the last take.
    pub fn take_epoch_bytes(&mut self, into: &mut Vec<u8>) {
        into.clear();
        std::mem::swap(into, &mut self.epoch_bytes);
    }
}

impl Persist for Console {
    type State = ConsoleState;
    type Args = ();
    type Error = DeviceError;
    fn save(&self) -> ConsoleState {
        ConsoleState {
            total_bytes: self.total,
        }
    }
    fn restore(_: (), state: &ConsoleState) -> Result<Self, DeviceError> {
        Ok(Console::with_times(state.total_bytes))
    }
}

/// The paravirtual block device, backed by a raw image file.
#[derive(Debug)]
pub struct Blk {
    file: File,
    path: PathBuf,
    sectors: u64,
    epoch_writes: Vec<DiskWrite>,
    buf: Vec<u8>,
    /// Byte ranges written since a disk snapshot began (`Some` only while one runs).
    snapshot_log: Option<Vec<(u64, u64)>>,
    /// Bitmap of the [`CHANGE_CHUNK`]s written since the last disk snapshot (or since the start).
    changed: Vec<u64>,
    /// Identity of the last disk snapshot's take of `changed` (`None` before the first).
    change_token: Option<u64>,
}

/// Size of the chunks whose writes the block device tracks between disk snapshots (volume
/// replication's 4 MiB chunk).
pub const CHANGE_CHUNK: u64 = 4 << 20;

/// The chunks the guest wrote between two disk snapshots: a write log kept by the block device, which
/// sees every write of a VM it runs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChunkChanges {
    /// The `token` of the previous snapshot these changes follow; `None` for the first snapshot of
    /// this device (what was written before it started is unknown).
    pub since: Option<u64>,
    /// This snapshot's identity (the next snapshot's `since`).
    pub token: u64,
    /// Indexes of the [`CHANGE_CHUNK`]s written, ascending.
    pub chunks: Vec<u64>,
}

impl Blk {
    fn mark_changed(&mut self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        for c in offset / CHANGE_CHUNK..=(offset + len - 1) / CHANGE_CHUNK {
            if let Some(w) = self.changed.get_mut((c / 64) as usize) {
                *w |= 1 << (c % 64);
            }
        }
    }

    /// Takes the changed-chunk map (reset to empty) under a new token.
    fn take_changes(&mut self) -> ChunkChanges {
        let mut chunks = Vec::new();
        for (i, w) in self.changed.iter_mut().enumerate() {
            let mut bits = std::mem::take(w);
            while bits != 0 {
                chunks.push(i as u64 * 64 + u64::from(bits.trailing_zeros()));
                bits &= bits - 1;
            }
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let token = now
            ^ (u64::from(std::process::id()) << 40)
            ^ self.change_token.unwrap_or(0).rotate_left(17);
        ChunkChanges {
            since: self.change_token.replace(token),
            token,
            chunks,
        }
    }
}

/// What [`Devices::snapshot_disk`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskSnapshot {
    /// Image size.
    pub bytes: u64,
    /// Guest writes that landed during the unlocked copy.
    pub writes_during_copy: u64,
    /// Bytes copied again under the device lock.
    pub recopied_bytes: u64,
    /// How long the guest's block requests were held (the re-copy).
    pub io_held: std::time::Duration,
    /// The whole snapshot.
    pub elapsed: std::time::Duration,
    /// The chunks written since the previous snapshot, up to the point this one is a copy of.
    pub changes: ChunkChanges,
}

/// Sorts `(offset, len)` ranges and merges the overlapping and adjacent ones.
fn merge_ranges(mut ranges: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    ranges.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    for (offset, len) in ranges {
        match out.last_mut() {
            Some((o, l)) if offset <= *o + *l => *l = (*l).max(offset + len - *o),
            _ => out.push((offset, len)),
        }
    }
    out
}

/// Copies `len` bytes at `offset` from `src` to the same offset of `dst`, in 1 MiB pieces.
fn copy_range(src: &File, dst: &File, offset: u64, len: u64) -> std::io::Result<()> {
    let mut buf = vec![0u8; len.min(1 << 20) as usize];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(buf.len() as u64) as usize;
        src.read_exact_at(&mut buf[..n], offset + done)?;
        dst.write_all_at(&buf[..n], offset + done)?;
        done += n as u64;
    }
    Ok(())
}

/// Saved block-device state (requests are synchronous, so nothing is ever in flight).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlkState {
    /// Capacity in sectors.
    pub sectors: u64,
}

/// A block request as laid out in guest memory.
#[derive(Clone, Copy, Debug, Default)]
struct BlkRequest {
    op: u32,
    sector: u64,
    len: u32,
    buf: u64,
}

impl Blk {
    /// Opens a disk image read-write.
    pub fn open(path: &Path) -> Result<Self, DeviceError> {
        let disk_err = |source| DeviceError::Disk {
            path: path.to_owned(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(disk_err)?;
        let size = file.metadata().map_err(disk_err)?.len();
        if size % SECTOR != 0 || size == 0 {
            return Err(DeviceError::DiskSize {
                path: path.to_owned(),
                size,
                why: "is not a non-zero multiple of 512".into(),
            });
        }
        Ok(Blk {
            file,
            path: path.to_owned(),
            sectors: size / SECTOR,
            epoch_writes: Vec::new(),
            buf: Vec::new(),
            snapshot_log: None,
            changed: vec![0; (size.div_ceil(CHANGE_CHUNK)).div_ceil(64) as usize],
            change_token: None,
        })
    }

    /// Capacity in sectors.
    pub fn sectors(&self) -> u64 {
        self.sectors
    }

    /// The image path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Takes the writes of the current epoch.
    pub fn take_epoch_writes(&mut self, into: &mut Vec<DiskWrite>) {
        into.clear();
        std::mem::swap(into, &mut self.epoch_writes);
    }

    fn read_request(ram: &GuestRam, addr: u64) -> Option<BlkRequest> {
        let mem = ram.memory();
        Some(BlkRequest {
            op: mem.read_obj(GuestAddress(addr)).ok()?,
            sector: mem.read_obj(GuestAddress(addr + 8)).ok()?,
            len: mem.read_obj(GuestAddress(addr + 16)).ok()?,
            buf: mem.read_obj(GuestAddress(addr + 24)).ok()?,
        })
    }

    /// Executes the request at guest-physical `addr` and writes its status back.
    fn doorbell(&mut self, ram: &GuestRam, addr: u64) {
        if !addr.is_multiple_of(8) || addr.checked_add(32).is_none_or(|e| e > ram.size()) {
            // Nowhere valid to write a status: drop it (the guest will see status unchanged).
            tracing::warn!(
                addr,
                "blk request address outside guest memory or misaligned"
            );
            return;
        }
        let status = match Self::read_request(ram, addr) {
            Some(req) => self.execute(ram, req),
            None => ST_BAD_REQUEST,
        };
        // The status word is a VMM write into guest memory: vm-memory marks its page dirty.
        let _ = ram.memory().write_obj(status, GuestAddress(addr + 4));
    }

    fn execute(&mut self, ram: &GuestRam, req: BlkRequest) -> u32 {
        if req.op == OP_FLUSH {
            return match self.file.sync_data() {
                Ok(()) => ST_OK,
                Err(_) => ST_IOERR,
            };
        }
        if req.op != OP_READ && req.op != OP_WRITE {
            return ST_UNSUPPORTED;
        }
        let len = u64::from(req.len);
        let in_disk = req
            .sector
            .checked_add(len / SECTOR)
            .is_some_and(|end| end <= self.sectors);
        let in_mem = req.buf.checked_add(len).is_some_and(|e| e <= ram.size());
        if len == 0 || len % SECTOR != 0 || req.len > MAX_BLK_REQUEST || !in_disk || !in_mem {
            return ST_BAD_REQUEST;
        }
        self.buf.resize(req.len as usize, 0);
        let offset = req.sector * SECTOR;
        let mem = ram.memory();
        if req.op == OP_READ {
            if self.file.read_exact_at(&mut self.buf, offset).is_err() {
                return ST_IOERR;
            }
            // A VMM write into guest memory: vm-memory marks these pages dirty.
            if mem.write_slice(&self.buf, GuestAddress(req.buf)).is_err() {
                return ST_BAD_REQUEST;
            }
        } else {
            if mem
                .read_slice(&mut self.buf, GuestAddress(req.buf))
                .is_err()
            {
                return ST_BAD_REQUEST;
            }
            if self.file.write_all_at(&self.buf, offset).is_err() {
                return ST_IOERR;
            }
            self.epoch_writes.push(DiskWrite {
                sector: req.sector,
                data: self.buf.clone(),
            });
            if let Some(log) = &mut self.snapshot_log {
                log.push((offset, len));
            }
            self.mark_changed(offset, len);
        }
        ST_OK
    }
}

impl Persist for Blk {
    type State = BlkState;
    type Args = PathBuf;
    type Error = DeviceError;
    fn save(&self) -> BlkState {
        BlkState {
            sectors: self.sectors,
        }
    }
    fn restore(path: PathBuf, state: &BlkState) -> Result<Self, DeviceError> {
        let blk = Blk::open(&path)?;
        if blk.sectors != state.sectors {
            return Err(DeviceError::DiskSize {
                path,
                size: blk.sectors * SECTOR,
                why: format!("differs from the saved {} sectors", state.sectors),
            });
        }
        Ok(blk)
    }
}

/// What a port access asks the vCPU loop to do next.
#[derive(Debug, PartialEq, Eq)]
pub enum IoAction {
    /// Keep running.
    Continue,
    /// The guest wrote the exit port.
    Exit(u32),
    /// The guest touched a port nothing answers (ignored, counted).
    Unhandled,
}

/// All devices of a VM.
#[derive(Debug)]
pub struct Devices {
    /// Console.
    pub console: Mutex<Console>,
    /// Block device, if the VM has a disk.
    pub blk: Option<Mutex<Blk>>,
}

/// Saved state of all devices.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DevicesState {
    /// Console.
    pub console: ConsoleState,
    /// Block device.
    pub blk: Option<BlkState>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding a device lock cannot leave the device half-updated in a way that matters more
    // than losing the VM; keep going with the inner value.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Devices {
    /// Devices for a new VM.
    pub fn new(disk: Option<&Path>) -> Result<Self, DeviceError> {
        Ok(Devices {
            console: Mutex::new(Console::with_times(0)),
            blk: disk.map(Blk::open).transpose()?.map(Mutex::new),
        })
    }

    /// Handles an `out`.
    pub fn io_out(&self, port: u16, data: &[u8], ram: &GuestRam) -> IoAction {
        let word = || {
            let mut w = [0u8; 4];
            let n = data.len().min(4);
            w[..n].copy_from_slice(&data[..n]);
            u32::from_le_bytes(w)
        };
        match port {
            PORT_CONSOLE => {
                let mut c = lock(&self.console);
                for &b in data {
                    c.write(b);
                }
                IoAction::Continue
            }
            PORT_EXIT => IoAction::Exit(word()),
            PORT_BLK_DOORBELL => match &self.blk {
                Some(blk) => {
                    lock(blk).doorbell(ram, u64::from(word()));
                    IoAction::Continue
                }
                None => IoAction::Unhandled,
            },
            _ => IoAction::Unhandled,
        }
    }

    /// Handles an `in`.
    pub fn io_in(&self, port: u16, data: &mut [u8]) -> IoAction {
        data.fill(0);
        match (port, &self.blk) {
            (PORT_BLK_CAPACITY, Some(blk)) => {
                let cap = u32::try_from(lock(blk).sectors()).unwrap_or(u32::MAX);
                let bytes = cap.to_le_bytes();
                let n = data.len().min(4);
                data[..n].copy_from_slice(&bytes[..n]);
                IoAction::Continue
            }
            _ => IoAction::Unhandled,
        }
    }

    /// Disk capacity in bytes (0 without a disk).
    pub fn disk_bytes(&self) -> u64 {
        self.blk.as_ref().map_or(0, |b| lock(b).sectors() * SECTOR)
    }

    /// For an initial sync: takes the block writes logged so far, then reads `len` bytes of the disk at
    /// `offset` (clamped to the disk) and appends them as one more write — both under the device lock,
    /// so the chunk is newer than every write before it and older than every write after it. Returns the
    /// bytes read.
    pub fn take_writes_and_chunk(
        &self,
        offset: u64,
        len: u64,
        writes: &mut Vec<DiskWrite>,
    ) -> std::io::Result<u64> {
        writes.clear();
        let Some(blk) = &self.blk else {
            return Ok(0);
        };
        let mut b = lock(blk);
        b.take_epoch_writes(writes);
        let size = b.sectors * SECTOR;
        let len = len.min(size.saturating_sub(offset));
        if len == 0 {
            return Ok(0);
        }
        let mut data = vec![0u8; len as usize];
        b.file.read_exact_at(&mut data, offset)?;
        writes.push(DiskWrite {
            sector: offset / SECTOR,
            data,
        });
        Ok(len)
    }

    /// Copies the disk image to `dst` as it is at one point in time, while the guest runs on.
    ///
    /// The image is copied without the device lock while the block device logs the ranges the guest
    /// writes meanwhile; then, under the lock (block requests wait, the vCPUs do not), exactly those
    /// ranges are copied again. Every block request is atomic under that lock, so `dst` ends as the disk
    /// was between two requests: crash-consistent. The guest's I/O is held only for the re-copy.
    /// `max_bytes_per_s` paces the unlocked copy (the host's disk is shared with running guests);
    /// `None` copies at full speed. `Ok(None)` without a disk.
    pub fn snapshot_disk(
        &self,
        dst: &Path,
        max_bytes_per_s: Option<u64>,
    ) -> std::io::Result<Option<DiskSnapshot>> {
        let Some(blk) = &self.blk else {
            return Ok(None);
        };
        let started = std::time::Instant::now();
        let (src, size) = {
            let mut b = lock(blk);
            b.snapshot_log = Some(Vec::new());
            (b.file.try_clone(), b.sectors * SECTOR)
        };
        let stop_logging = || lock(blk).snapshot_log = None;
        let copied = src.and_then(|src| {
            let out = OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(true)
                .open(dst)?;
            out.set_len(size)?;
            match max_bytes_per_s.filter(|&r| r > 0) {
                None => copy_range(&src, &out, 0, size)?,
                Some(rate) => {
                    const PIECE: u64 = 64 << 10;
                    let mut offset = 0;
                    while offset < size {
                        let n = PIECE.min(size - offset);
                        copy_range(&src, &out, offset, n)?;
                        offset += n;
                        let due = std::time::Duration::from_secs_f64(offset as f64 / rate as f64);
                        if let Some(wait) = due.checked_sub(started.elapsed()) {
                            std::thread::sleep(wait);
                        }
                    }
                }
            }
            Ok((src, out))
        });
        let (src, out) = match copied {
            Ok(files) => files,
            Err(e) => {
                stop_logging();
                return Err(e);
            }
        };
        let held = std::time::Instant::now();
        let mut b = lock(blk);
        let log = b.snapshot_log.take().unwrap_or_default();
        let writes = log.len() as u64;
        let mut recopied = 0;
        for (offset, len) in merge_ranges(log) {
            copy_range(&src, &out, offset, len)?;
            recopied += len;
        }
        // The copy is the disk as of now: the changes up to here belong to it.
        let changes = b.take_changes();
        drop(b);
        let held = held.elapsed();
        out.sync_data()?;
        Ok(Some(DiskSnapshot {
            bytes: size,
            writes_during_copy: writes,
            recopied_bytes: recopied,
            io_held: held,
            elapsed: started.elapsed(),
            changes,
        }))
    }

    /// Takes the epoch's output: console bytes and block writes.
    pub fn take_epoch_output(&self, console: &mut Vec<u8>, writes: &mut Vec<DiskWrite>) {
        lock(&self.console).take_epoch_bytes(console);
        match &self.blk {
            Some(blk) => lock(blk).take_epoch_writes(writes),
            None => writes.clear(),
        }
    }

    /// Saves every device.
    pub fn save(&self) -> DevicesState {
        DevicesState {
            console: lock(&self.console).save(),
            blk: self.blk.as_ref().map(|b| lock(b).save()),
        }
    }

    /// Rebuilds the devices from a saved state; `disk` is the image the restored VM uses.
    pub fn restore(state: &DevicesState, disk: Option<PathBuf>) -> Result<Self, DeviceError> {
        let blk = match (&state.blk, disk) {
            (Some(s), Some(path)) => Some(Mutex::new(Blk::restore(path, s)?)),
            (None, None) => None,
            (Some(_), None) => {
                return Err(DeviceError::DiskMismatch("has a disk but none was given"))
            }
            (None, Some(_)) => {
                return Err(DeviceError::DiskMismatch(
                    "has no disk but a disk image was given",
                ))
            }
        };
        Ok(Devices {
            console: Mutex::new(Console::restore((), &state.console)?),
            blk,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::merge_ranges;

    #[test]
    fn ranges_merge_when_they_overlap_or_touch() {
        assert_eq!(
            merge_ranges(vec![
                (4096, 512),
                (0, 512),
                (512, 512),
                (300, 100),
                (4500, 600),
                (8192, 8)
            ]),
            vec![(0, 1024), (4096, 1004), (8192, 8)]
        );
        assert!(merge_ranges(Vec::new()).is_empty());
    }
}
