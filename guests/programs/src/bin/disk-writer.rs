//! `disk-writer`: writes sequence-numbered sectors cyclically over the disk and checks them by reading back.
//!
//! Arguments (`BootInfo.args`, 0 = default):
//! - `args[0]`: B, sectors per batch (default 8; at most 2048 = 1 MiB and at most the disk size);
//! - `args[1]`: number of batches, then flush and exit with code 0 (default 0 = forever);
//! - `args[2]`: print the batch number every K batches (default 1).
//!
//! Sectors carry a global sequence number s = 1, 2, 3, …: sector-write number s goes to sector
//! `(s - 1) mod D` (D the disk size in sectors, from port `0x511`), so the disk is written round and round.
//! A sector written with sequence number s holds 32 pairs of little-endian u64 words `(s, sector)`: bytes
//! `16·j..16·j+8` = s and `16·j+8..16·j+16` = the sector number, for j = 0..32. A zeroed disk never matches.
//!
//! Batch b (b = 1, 2, 3, …) covers the sequence numbers `(b-1)·B + 1 ..= b·B`:
//! 1. write its B sectors (two requests when the batch wraps past the end of the disk);
//! 2. read them back and verify every sector;
//! 3. re-read and verify one older sector: the one holding sequence number `last - D/2` (`last` = b·B), once
//!    that is ≥ 1. That sector was written D/2 sector-writes ago and is not overwritten until D/2 later, so a
//!    disk that lost (or replayed stale) writes, e.g. restored from the wrong epoch, is caught;
//! 4. flush every 16 batches;
//! 5. print the batch number every K batches.
//!
//! Failures: a sector with the wrong content prints `MISMATCH sector=<n> seq=<s>` (s = the sequence number it
//! should hold) and exits with code 2; a request with a non-zero status prints `BLKERR status=<x>` (decimal)
//! and exits with code 3; no disk (capacity 0) prints `disk-writer: no disk` and exits with code 4. Only vCPU 0
//! runs the program; other vCPUs park (`pause` forever).
#![no_std]
#![no_main]

use axrt::{BlkError, BootInfo, FreeMem, BLK_MAX_LEN, PAGE_SIZE, SECTOR_SIZE};

axrt::entry!(main);

const DEFAULT_SECTORS_PER_BATCH: u64 = 8;
const DEFAULT_REPORT_EVERY: u64 = 1;
const FLUSH_EVERY: u64 = 16;
const MAX_SECTORS_PER_BATCH: u64 = (BLK_MAX_LEN / SECTOR_SIZE) as u64;

const EXIT_MISMATCH: u32 = 2;
const EXIT_BLKERR: u32 = 3;
const EXIT_NO_DISK: u32 = 4;

fn main(vcpu: u64, boot: &'static BootInfo) -> ! {
    if vcpu != 0 {
        axrt::park();
    }
    let disk = u64::from(axrt::blk_capacity());
    if disk == 0 {
        axrt::console().str("disk-writer: no disk\n");
        axrt::exit(EXIT_NO_DISK);
    }
    let per_batch = boot
        .arg_or(0, DEFAULT_SECTORS_PER_BATCH)
        .min(MAX_SECTORS_PER_BATCH)
        .min(disk);
    let batches = boot.arg(1);
    let report_every = boot.arg_or(2, DEFAULT_REPORT_EVERY);

    let batch_bytes = per_batch as usize * SECTOR_SIZE;
    // SAFETY: only vCPU 0 runs past this point, and nothing else in this program uses the free memory.
    let mut free = unsafe { FreeMem::new(boot) };
    let (Some(write_buf), Some(read_buf)) = (
        free.alloc(batch_bytes, PAGE_SIZE),
        free.alloc(batch_bytes, PAGE_SIZE),
    ) else {
        panic!(
            "disk-writer: {} bytes of free memory is too little for two {}-byte buffers",
            boot.free_end - boot.free_start,
            batch_bytes
        );
    };
    let disk = Disk { sectors: disk };

    let mut last_seq = 0u64;
    let mut batch = 0u64;
    loop {
        batch += 1;
        let first_seq = last_seq + 1;
        for (j, sector) in write_buf.chunks_exact_mut(SECTOR_SIZE).enumerate() {
            let seq = first_seq + j as u64;
            fill_sector(sector, seq, disk.sector_of(seq));
        }
        check(disk.transfer(first_seq, write_buf, Transfer::Write));
        check(disk.transfer(first_seq, read_buf, Transfer::Read));
        for (j, sector) in read_buf.chunks_exact(SECTOR_SIZE).enumerate() {
            disk.verify(sector, first_seq + j as u64);
        }
        last_seq += per_batch;

        if let Some(old_seq) = last_seq
            .checked_sub(disk.sectors / 2)
            .filter(|&seq| seq >= 1)
        {
            let sector = &mut read_buf[..SECTOR_SIZE];
            check(axrt::blk_read(disk.sector_of(old_seq), sector));
            disk.verify(sector, old_seq);
        }
        if batch % FLUSH_EVERY == 0 {
            check(axrt::blk_flush());
        }
        if batch % report_every == 0 {
            axrt::console().u64(batch).str("\n");
        }
        if batch == batches {
            check(axrt::blk_flush());
            axrt::exit(0);
        }
    }
}

/// Fills one 512-byte sector with the pairs (`seq`, `sector`).
fn fill_sector(buf: &mut [u8], seq: u64, sector: u64) {
    for pair in buf.chunks_exact_mut(16) {
        pair[..8].copy_from_slice(&seq.to_le_bytes());
        pair[8..].copy_from_slice(&sector.to_le_bytes());
    }
}

/// Ends the guest with `BLKERR` on a failed request.
fn check(result: Result<(), BlkError>) {
    if let Err(error) = result {
        axrt::console()
            .str("BLKERR status=")
            .u64(error.status.into())
            .str("\n");
        axrt::exit(EXIT_BLKERR);
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Transfer {
    Read,
    Write,
}

struct Disk {
    sectors: u64,
}

impl Disk {
    /// The sector that sequence number `seq` (≥ 1) is written to.
    fn sector_of(&self, seq: u64) -> u64 {
        (seq - 1) % self.sectors
    }

    /// Reads or writes the sectors of sequence numbers `first_seq..` (as many as `buf` holds, at most the
    /// disk size), splitting the transfer in two where it wraps past the end of the disk.
    fn transfer(
        &self,
        first_seq: u64,
        buf: &mut [u8],
        direction: Transfer,
    ) -> Result<(), BlkError> {
        let start = self.sector_of(first_seq);
        let until_end = ((self.sectors - start) as usize).saturating_mul(SECTOR_SIZE);
        let (head, tail) = buf.split_at_mut(buf.len().min(until_end));
        for (sector, part) in [(start, head), (0, tail)] {
            if part.is_empty() {
                continue;
            }
            match direction {
                Transfer::Write => axrt::blk_write(sector, part)?,
                Transfer::Read => axrt::blk_read(sector, part)?,
            }
        }
        Ok(())
    }

    /// Ends the guest with `MISMATCH` unless `buf` is the content of sequence number `seq`.
    fn verify(&self, buf: &[u8], seq: u64) {
        let sector = self.sector_of(seq);
        let good = buf
            .chunks_exact(16)
            .all(|pair| pair[..8] == seq.to_le_bytes() && pair[8..] == sector.to_le_bytes());
        if !good {
            axrt::console()
                .str("MISMATCH sector=")
                .u64(sector)
                .str(" seq=")
                .u64(seq)
                .str("\n");
            axrt::exit(EXIT_MISMATCH);
        }
    }
}
