//! The ax guest kit: test guest programs for the statepoint VMM, as ELF images.
//!
//! Each program is a static ELF64 x86-64 executable (`ET_EXEC`, entry `_start`, `PT_LOAD` segments at 4 MiB
//! and up) built from the `no_std` Rust source in `guests/programs/` by this crate's build script, and
//! follows the ax guest ABI (`docs/guest-abi.md`): it runs at CPL3 on every vCPU, reads its arguments from
//! `BootInfo.args` and talks to the VMM through ports `0x500` (console), `0x501` (exit), `0x510`/`0x511` (block
//! device). An argument of 0 (or one the VM definition does not set) means "use the default".
//!
//! A program that panics prints `panic: <message> at <file>:<line>:<col>` and exits with code 101.

/// `counter`: prints `1`, `2`, `3`, … one line at a time, with real work in memory in between.
///
/// - `args[0]`: iterations between two lines (default 1 000 000); each iteration updates one word of a
///   64-word array in memory and a running checksum;
/// - `args[1]`: number of lines, then exit 0 (default 0 = forever).
///
/// Runs on vCPU 0 only; other vCPUs spin on `pause` forever.
pub const COUNTER: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/counter.elf"));

/// `dirtier`: dirties memory pages at a chosen rate, with a checkable pattern.
///
/// - `args[0]`: P, pages dirtied per iteration (default 64);
/// - `args[1]`: W, working-set size in pages (default, and at most: all of `[free_start, free_end)`);
/// - `args[2]`: print the iteration number (a decimal line) every K iterations (default 1000);
/// - `args[3]`: `pause` spins after each iteration, to set the rate (default 0 = flat out);
/// - `args[4]`: number of iterations, then exit 0 (default 0 = forever).
///
/// Iteration i = 1, 2, … writes pages `p = (i·P + k) mod W`, k = 0..P, of the working set (page p at
/// `free_start + 4096·p`): u64 word 0 of the page = p, u64 word `1 + (i mod 511)` = i (little-endian). Runs on
/// vCPU 0 only; other vCPUs spin on `pause` forever.
pub const DIRTIER: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/dirtier.elf"));

/// `disk-writer`: writes sequence-numbered sectors round and round the disk and verifies them.
///
/// - `args[0]`: B, sectors per batch (default 8, at most 2048 and the disk size);
/// - `args[1]`: number of batches, then flush and exit 0 (default 0 = forever);
/// - `args[2]`: print the batch number every K batches (default 1).
///
/// Sector-write number s = 1, 2, … goes to sector `(s-1) mod D` (D = capacity) and fills it with 32 pairs of
/// little-endian u64 `(s, sector)`. Each batch writes B sectors, reads them back and verifies them, re-reads
/// and verifies the older sector holding `s_last - D/2` (catching a disk that lost writes), and flushes every
/// 16 batches. Output and exit codes: `MISMATCH sector=<n> seq=<s>` → 2; `BLKERR status=<x>` → 3;
/// `disk-writer: no disk` → 4. Runs on vCPU 0 only; other vCPUs spin on `pause` forever.
pub const DISK_WRITER: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/disk-writer.elf"));

/// `smp-counter`: every vCPU counts and prints whole lines under a spin lock.
///
/// - `args[0]`: N, iterations between two lines of one vCPU (default 1 000 000); each iteration increments
///   the vCPU's own counter (first word of its own page, `free_start + 4096·vcpu`) and a shared atomic;
/// - `args[1]`: lines per vCPU, after which that vCPU stops (default 0 = forever). When all vCPUs have
///   stopped, vCPU 0 checks the shared total (`nr_vcpus · lines · N`, else panic) and exits 0.
///
/// Output: `cpu<i> <n>` lines, n = 1, 2, … per vCPU; a line is never interleaved with another vCPU's.
pub const SMP_COUNTER: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/smp-counter.elf"));

/// The names of the guest programs, as [`by_name`] accepts them.
pub const NAMES: &[&str] = &["counter", "dirtier", "disk-writer", "smp-counter"];

/// The ELF image of the guest program called `name` (one of [`NAMES`]).
pub fn by_name(name: &str) -> Option<&'static [u8]> {
    match name {
        "counter" => Some(COUNTER),
        "dirtier" => Some(DIRTIER),
        "disk-writer" => Some(DISK_WRITER),
        "smp-counter" => Some(SMP_COUNTER),
        _ => None,
    }
}

/// The QEMU test guests: multiboot v1 kernels (static ELF32 i386) for `qemu-system-x86_64 -kernel`, built
/// from the GNU assembler source in `guests/qemu/` (see `guests/README.md`). They run without an OS, print
/// on COM1 (0x3f8), take `key=value` arguments from the multiboot command line (QEMU `-append`), and their
/// output depends only on their memory state, never on time.
pub mod qemu {
    use std::path::Path;

    /// `qcounter`: prints `count 1`, `count 2`, … on COM1, one line per `every=N` iterations of work
    /// (default 1 000 000).
    pub const QCOUNTER: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/qcounter.elf"));

    /// `qudp`: sends a sequence-numbered UDP/IPv4 stream through an e1000 NIC (`-device e1000`) and prints
    /// `seq N` per packet. Arguments: `src=`, `dst=` (required), `dmac=`, `port=`, `sport=`, `rate=`
    /// (packets/s, default 100), `size=` (payload bytes, default 64), `print=`, `count=`. The payload starts
    /// with the sequence number (1, 2, …) as a big-endian u64; the IPv4 ID is the sequence number mod 65536;
    /// the frames depend only on the sequence number and the arguments.
    pub const QUDP: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/qudp.elf"));

    /// `qdirtier`: rewrites `pages=W` pages (default 1024) from 4 MiB up, round after round, and prints
    /// `round N` every `every=K` rounds (default max(1, 2^20 / W)).
    pub const QDIRTIER: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/qdirtier.elf"));

    /// The names of the QEMU test guests, as [`by_name`] accepts them.
    pub const NAMES: &[&str] = &["qcounter", "qudp", "qdirtier"];

    /// The image of the QEMU test guest called `name` (one of [`NAMES`]).
    pub fn by_name(name: &str) -> Option<&'static [u8]> {
        match name {
            "qcounter" => Some(QCOUNTER),
            "qudp" => Some(QUDP),
            "qdirtier" => Some(QDIRTIER),
            _ => None,
        }
    }

    /// Writes `image` to `path` (QEMU's `-kernel` needs a file), replacing any file there.
    pub fn write_image(image: &[u8], path: &Path) -> std::io::Result<()> {
        std::fs::write(path, image)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use goblin::elf::header::{EM_X86_64, ET_EXEC};
    use goblin::elf::program_header::{PF_X, PT_DYNAMIC, PT_INTERP, PT_LOAD};
    use goblin::elf::Elf;

    /// First address a `PT_LOAD` segment may use: after the VMM's 2 MiB and the 4 KiB `BootInfo` page.
    const MIN_LOAD_ADDR: u64 = 0x20_1000;
    /// The smallest guest (8 MiB) with one vCPU (a 256 KiB stack at the top) must still fit the image.
    const MAX_LOAD_END: u64 = (8 << 20) - (256 << 10);

    #[test]
    fn qemu_guests_are_multiboot_elf32() {
        for name in qemu::NAMES {
            let image = qemu::by_name(name).unwrap();
            let elf = Elf::parse(image).unwrap_or_else(|e| panic!("{name}: not an ELF: {e}"));
            assert!(
                !elf.is_64,
                "{name}: not ELF32 (QEMU refuses x86-64 multiboot images)"
            );
            assert_eq!(elf.header.e_machine, goblin::elf::header::EM_386, "{name}");
            assert_eq!(elf.header.e_type, ET_EXEC, "{name}");
            // The multiboot v1 header: magic, flags, checksum (sum 0), 4-byte aligned in the first 8 KiB.
            let word = |i: usize| u32::from_le_bytes(image[i..i + 4].try_into().unwrap());
            let at = (0..8192 - 12)
                .step_by(4)
                .find(|&i| word(i) == 0x1BAD_B002)
                .unwrap_or_else(|| panic!("{name}: no multiboot header in the first 8 KiB"));
            let sum = word(at)
                .wrapping_add(word(at + 4))
                .wrapping_add(word(at + 8));
            assert_eq!(sum, 0, "{name}: multiboot checksum");
            assert_eq!(
                word(at + 4) & 0x0001_0000,
                0,
                "{name}: a.out kludge flag set"
            );
        }
        assert!(qemu::by_name("counter").is_none());
    }

    #[test]
    fn names_resolve() {
        for name in NAMES {
            assert!(by_name(name).is_some(), "{name}");
        }
        assert!(by_name("no-such-guest").is_none());
        assert_eq!(by_name("counter"), Some(COUNTER));
        assert_eq!(by_name("smp-counter"), Some(SMP_COUNTER));
    }

    #[test]
    fn every_program_is_a_static_x86_64_executable() {
        for name in NAMES {
            let image = by_name(name).unwrap();
            let elf = Elf::parse(image).unwrap_or_else(|e| panic!("{name}: not an ELF: {e}"));
            assert!(elf.is_64, "{name}: not ELF64");
            assert!(elf.little_endian, "{name}: not little-endian");
            assert_eq!(elf.header.e_machine, EM_X86_64, "{name}: not x86-64");
            assert_eq!(elf.header.e_type, ET_EXEC, "{name}: not ET_EXEC");
            assert!(elf.interpreter.is_none(), "{name}: has an interpreter");
            assert!(elf.dynamic.is_none(), "{name}: has a dynamic section");

            let mut loads = 0;
            let mut entry_in_code = false;
            for ph in &elf.program_headers {
                assert_ne!(ph.p_type, PT_INTERP, "{name}: PT_INTERP");
                assert_ne!(ph.p_type, PT_DYNAMIC, "{name}: PT_DYNAMIC");
                if ph.p_type != PT_LOAD {
                    continue;
                }
                loads += 1;
                let end = ph.p_vaddr + ph.p_memsz;
                assert!(
                    ph.p_vaddr >= MIN_LOAD_ADDR,
                    "{name}: PT_LOAD at {:#x} < {MIN_LOAD_ADDR:#x}",
                    ph.p_vaddr
                );
                assert!(
                    end <= MAX_LOAD_END,
                    "{name}: PT_LOAD ends at {end:#x} > {MAX_LOAD_END:#x}"
                );
                assert!(ph.p_filesz <= ph.p_memsz, "{name}: p_filesz > p_memsz");
                assert!(
                    ph.p_offset + ph.p_filesz <= image.len() as u64,
                    "{name}: segment past end of file"
                );
                if (ph.p_vaddr..end).contains(&elf.entry) && ph.p_flags & PF_X != 0 {
                    entry_in_code = true;
                }
            }
            assert!(loads > 0, "{name}: no PT_LOAD");
            assert!(
                entry_in_code,
                "{name}: entry {:#x} is not in an executable PT_LOAD",
                elf.entry
            );

            let start = elf
                .syms
                .iter()
                .find(|sym| elf.strtab.get_at(sym.st_name) == Some("_start"));
            let start = start.unwrap_or_else(|| panic!("{name}: no _start symbol"));
            assert_eq!(start.st_value, elf.entry, "{name}: entry is not _start");
        }
    }
}

/// Checks that `image` is a point-in-time state of a disk that one run of `disk-writer` wrote: every
/// sector holds the newest sector-write `s ≤ S` aimed at it (S = the newest write found), or zeros if
/// none was. A copy taken while the guest wrote, without a consistent cut, shows an older write somewhere.
/// Returns S (0 for an untouched disk), or what is wrong, naming the sector.
pub fn check_disk_writer_image(image: &[u8]) -> Result<u64, String> {
    const SECTOR: usize = 512;
    if image.is_empty() || !image.len().is_multiple_of(SECTOR) {
        return Err(format!(
            "image of {} bytes is not whole sectors",
            image.len()
        ));
    }
    let word =
        |b: &[u8], i: usize| u64::from_le_bytes(b[8 * i..8 * i + 8].try_into().expect("8 bytes"));
    let disk = (image.len() / SECTOR) as u64;
    let mut seqs = Vec::with_capacity(disk as usize);
    for (d, sector) in image.chunks_exact(SECTOR).enumerate() {
        let (s, at) = (word(sector, 0), word(sector, 1));
        let whole = (0..32).all(|k| word(sector, 2 * k) == s && word(sector, 2 * k + 1) == at);
        if !whole || (s != 0 && at != d as u64) || (s == 0 && at != 0) {
            return Err(format!(
                "sector {d} is not a disk-writer sector (seq {s}, names sector {at})"
            ));
        }
        seqs.push(s);
    }
    let newest = seqs.iter().copied().max().unwrap_or(0);
    for (d, &s) in seqs.iter().enumerate() {
        let first = d as u64 + 1; // the first write aimed at sector d
        let expected = if newest >= first {
            first + (newest - first) / disk * disk
        } else {
            0
        };
        if s != expected {
            return Err(format!(
                "sector {d} holds write {s}, expected {expected} (newest write on the disk: {newest})"
            ));
        }
    }
    Ok(newest)
}

#[cfg(test)]
mod image_tests {
    use super::check_disk_writer_image;

    fn image(sectors: u64, writes: u64) -> Vec<u8> {
        let mut img = vec![0u8; sectors as usize * 512];
        for s in 1..=writes {
            let d = (s - 1) % sectors;
            for k in 0..32 {
                let at = d as usize * 512 + 16 * k;
                img[at..at + 8].copy_from_slice(&s.to_le_bytes());
                img[at + 8..at + 16].copy_from_slice(&d.to_le_bytes());
            }
        }
        img
    }

    #[test]
    fn consistent_images_pass_and_torn_ones_fail() {
        assert_eq!(check_disk_writer_image(&image(16, 0)), Ok(0));
        assert_eq!(check_disk_writer_image(&image(16, 5)), Ok(5));
        assert_eq!(check_disk_writer_image(&image(16, 40)), Ok(40));
        // A torn copy: sector 3 from an older pass than its neighbours.
        let mut torn = image(16, 40);
        torn[3 * 512..4 * 512].copy_from_slice(&image(16, 20)[3 * 512..4 * 512]);
        let e = check_disk_writer_image(&torn).unwrap_err();
        assert!(e.contains("sector 3 holds write 20"), "{e}");
        let mut garbage = image(16, 40);
        garbage[600] ^= 1;
        assert!(check_disk_writer_image(&garbage)
            .unwrap_err()
            .contains("sector 1"));
        assert!(check_disk_writer_image(&[0; 100]).is_err());
    }
}
