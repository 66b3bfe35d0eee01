//! Loads a guest program: a static ELF64 x86-64 executable (see `docs/guest-abi.md`).

use goblin::elf::{header, program_header, Elf};
use vm_memory::{Bytes, GuestAddress};

use crate::layout::{Layout, IMAGE_MIN};
use crate::memory::GuestRam;
use crate::PAGE_SIZE;

/// Why a guest image was refused. Every message names the offending field and value.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LoaderError {
    /// Not parseable as ELF at all.
    #[error("not an ELF file: {0}")]
    Parse(String),
    /// ELF32 or another class.
    #[error("ELF class is not ELF64")]
    NotElf64,
    /// Wrong machine.
    #[error("ELF machine is {0}, expected x86-64 (62)")]
    Machine(u16),
    /// Not `ET_EXEC`.
    #[error(
        "ELF type is {0}, expected a static executable (ET_EXEC = 2); build with -static -no-pie"
    )]
    NotExecutable(u16),
    /// Has an interpreter or dynamic section.
    #[error("ELF is dynamically linked ({0}); guests must be static")]
    Dynamic(&'static str),
    /// No loadable segment.
    #[error("ELF has no PT_LOAD segment")]
    NoSegments,
    /// A segment's file range lies outside the file or `filesz > memsz`.
    #[error("PT_LOAD segment {index}: file range {offset:#x}+{filesz:#x} (memsz {memsz:#x}) is outside the {file_len}-byte file or larger than memsz")]
    SegmentFile {
        /// Segment index.
        index: usize,
        /// `p_offset`.
        offset: u64,
        /// `p_filesz`.
        filesz: u64,
        /// `p_memsz`.
        memsz: u64,
        /// File length.
        file_len: usize,
    },
    /// A segment lies outside the guest's image area.
    #[error("PT_LOAD segment {index} at {start:#x}..{end:#x} is outside the image area {min:#x}..{max:#x}")]
    SegmentPlacement {
        /// Segment index.
        index: usize,
        /// First byte.
        start: u64,
        /// One past the last byte.
        end: u64,
        /// Lowest allowed address.
        min: u64,
        /// Highest allowed end (the stack base).
        max: u64,
    },
    /// The entry point is not inside an executable segment.
    #[error("entry point {0:#x} is not inside an executable PT_LOAD segment")]
    Entry(u64),
    /// Guest memory write failed.
    #[error("writing the image into guest memory: {0}")]
    Memory(String),
}

/// A validated guest image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadedImage {
    /// Entry point.
    pub entry: u64,
    /// First free byte after the image (4 KiB aligned).
    pub free_start: u64,
}

/// Validates `elf` against `layout` and copies its segments into guest memory.
pub fn load(elf: &[u8], layout: &Layout, ram: &GuestRam) -> Result<LoadedImage, LoaderError> {
    let segments = validate(elf, layout)?;
    for s in &segments.list {
        let data = &elf[s.offset as usize..(s.offset + s.filesz) as usize];
        ram.memory()
            .write_slice(data, GuestAddress(s.vaddr))
            .map_err(|e| LoaderError::Memory(e.to_string()))?;
    }
    Ok(LoadedImage {
        entry: segments.entry,
        free_start: segments.end.next_multiple_of(PAGE_SIZE as u64),
    })
}

/// Validates `elf` against `layout` without loading it (what [`load`] would refuse, it refuses): a guest
/// uploaded to the agent is checked once, when it is stored.
pub fn check(elf: &[u8], layout: &Layout) -> Result<(), LoaderError> {
    validate(elf, layout).map(|_| ())
}

struct Segment {
    offset: u64,
    filesz: u64,
    vaddr: u64,
}

struct Segments {
    list: Vec<Segment>,
    entry: u64,
    end: u64,
}

fn validate(bytes: &[u8], layout: &Layout) -> Result<Segments, LoaderError> {
    let elf = Elf::parse(bytes).map_err(|e| LoaderError::Parse(e.to_string()))?;
    if !elf.is_64 {
        return Err(LoaderError::NotElf64);
    }
    if elf.header.e_machine != header::EM_X86_64 {
        return Err(LoaderError::Machine(elf.header.e_machine));
    }
    if elf.header.e_type != header::ET_EXEC {
        return Err(LoaderError::NotExecutable(elf.header.e_type));
    }
    if elf.interpreter.is_some() {
        return Err(LoaderError::Dynamic("PT_INTERP"));
    }
    if elf.dynamic.is_some() {
        return Err(LoaderError::Dynamic("PT_DYNAMIC"));
    }
    let max = layout.stack_base();
    let mut list = Vec::new();
    let mut entry_ok = false;
    let mut end = IMAGE_MIN;
    for (index, ph) in elf.program_headers.iter().enumerate() {
        if ph.p_type != program_header::PT_LOAD || ph.p_memsz == 0 {
            continue;
        }
        let file_end = ph.p_offset.checked_add(ph.p_filesz);
        if ph.p_filesz > ph.p_memsz || file_end.is_none_or(|e| e > bytes.len() as u64) {
            return Err(LoaderError::SegmentFile {
                index,
                offset: ph.p_offset,
                filesz: ph.p_filesz,
                memsz: ph.p_memsz,
                file_len: bytes.len(),
            });
        }
        let seg_end = ph.p_vaddr.checked_add(ph.p_memsz);
        if ph.p_vaddr < IMAGE_MIN || seg_end.is_none_or(|e| e > max) {
            return Err(LoaderError::SegmentPlacement {
                index,
                start: ph.p_vaddr,
                end: seg_end.unwrap_or(u64::MAX),
                min: IMAGE_MIN,
                max,
            });
        }
        let seg_end = ph.p_vaddr + ph.p_memsz;
        if ph.is_executable() && (ph.p_vaddr..seg_end).contains(&elf.entry) {
            entry_ok = true;
        }
        end = end.max(seg_end);
        list.push(Segment {
            offset: ph.p_offset,
            filesz: ph.p_filesz,
            vaddr: ph.p_vaddr,
        });
    }
    if list.is_empty() {
        return Err(LoaderError::NoSegments);
    }
    if !entry_ok {
        return Err(LoaderError::Entry(elf.entry));
    }
    Ok(Segments {
        list,
        entry: elf.entry,
        end,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> Layout {
        Layout::new(16 << 20, 1).unwrap()
    }

    /// A minimal ELF64 header + one program header, built field by field.
    fn elf(e_type: u16, machine: u16, vaddr: u64, memsz: u64, entry: u64, flags: u32) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0]); // ELF64, little-endian, version 1
        b.extend_from_slice(&[0; 8]);
        b.extend_from_slice(&e_type.to_le_bytes());
        b.extend_from_slice(&machine.to_le_bytes());
        b.extend_from_slice(&1u32.to_le_bytes()); // e_version
        b.extend_from_slice(&entry.to_le_bytes());
        b.extend_from_slice(&64u64.to_le_bytes()); // e_phoff
        b.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
        b.extend_from_slice(&0u32.to_le_bytes()); // e_flags
        b.extend_from_slice(&64u16.to_le_bytes()); // e_ehsize
        b.extend_from_slice(&56u16.to_le_bytes()); // e_phentsize
        b.extend_from_slice(&1u16.to_le_bytes()); // e_phnum
        b.extend_from_slice(&[0; 6]); // shentsize, shnum, shstrndx
        b.extend_from_slice(&program_header::PT_LOAD.to_le_bytes());
        b.extend_from_slice(&flags.to_le_bytes());
        b.extend_from_slice(&120u64.to_le_bytes()); // p_offset: right after the headers
        b.extend_from_slice(&vaddr.to_le_bytes());
        b.extend_from_slice(&vaddr.to_le_bytes());
        b.extend_from_slice(&8u64.to_le_bytes()); // p_filesz
        b.extend_from_slice(&memsz.to_le_bytes());
        b.extend_from_slice(&0x1000u64.to_le_bytes());
        b.extend_from_slice(&[0x90; 8]); // eight `nop`s of content
        b
    }

    const RX: u32 = program_header::PF_R | program_header::PF_X;

    #[test]
    fn accepts_a_minimal_static_executable() {
        let e = elf(
            header::ET_EXEC,
            header::EM_X86_64,
            0x40_0000,
            0x1000,
            0x40_0000,
            RX,
        );
        let ram = GuestRam::new(16 << 20).unwrap();
        let img = load(&e, &layout(), &ram).unwrap();
        assert_eq!(img.entry, 0x40_0000);
        assert_eq!(img.free_start, 0x40_1000);
    }

    #[test]
    fn rejects_bad_images_with_clear_errors() {
        let l = layout();
        assert!(matches!(validate(b"hello", &l), Err(LoaderError::Parse(_))));
        assert!(matches!(validate(&[], &l), Err(LoaderError::Parse(_))));
        let e = elf(
            header::ET_DYN,
            header::EM_X86_64,
            0x40_0000,
            0x1000,
            0x40_0000,
            RX,
        );
        assert_eq!(validate(&e, &l).err(), Some(LoaderError::NotExecutable(3)));
        let e = elf(
            header::ET_EXEC,
            header::EM_AARCH64,
            0x40_0000,
            0x1000,
            0x40_0000,
            RX,
        );
        assert_eq!(validate(&e, &l).err(), Some(LoaderError::Machine(183)));
        let e = elf(
            header::ET_EXEC,
            header::EM_X86_64,
            0x1000,
            0x1000,
            0x1000,
            RX,
        );
        let err = validate(&e, &l).err().unwrap();
        assert!(
            matches!(err, LoaderError::SegmentPlacement { start: 0x1000, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("outside the image area"));
        let e = elf(
            header::ET_EXEC,
            header::EM_X86_64,
            0x40_0000,
            64 << 20,
            0x40_0000,
            RX,
        );
        assert!(matches!(
            validate(&e, &l),
            Err(LoaderError::SegmentPlacement { .. })
        ));
        let e = elf(
            header::ET_EXEC,
            header::EM_X86_64,
            0x40_0000,
            0x1000,
            0x50_0000,
            RX,
        );
        assert_eq!(validate(&e, &l).err(), Some(LoaderError::Entry(0x50_0000)));
        let e = elf(
            header::ET_EXEC,
            header::EM_X86_64,
            0x40_0000,
            0x1000,
            0x40_0000,
            program_header::PF_R,
        );
        assert_eq!(validate(&e, &l).err(), Some(LoaderError::Entry(0x40_0000)));
        let mut e = elf(
            header::ET_EXEC,
            header::EM_X86_64,
            0x40_0000,
            0x1000,
            0x40_0000,
            RX,
        );
        e.truncate(124); // segment content cut off
        assert!(matches!(
            validate(&e, &l),
            Err(LoaderError::SegmentFile { .. }) | Err(LoaderError::Parse(_))
        ));
        let e = elf(
            header::ET_EXEC,
            header::EM_X86_64,
            0x40_0000,
            4,
            0x40_0000,
            RX,
        ); // filesz > memsz
        assert!(matches!(
            validate(&e, &l),
            Err(LoaderError::SegmentFile { .. })
        ));
    }

    #[test]
    fn never_panics_on_mutated_images() {
        let base = elf(
            header::ET_EXEC,
            header::EM_X86_64,
            0x40_0000,
            0x1000,
            0x40_0000,
            RX,
        );
        let l = layout();
        for i in 0..base.len() {
            for v in [0u8, 0xff, 0x80, 1] {
                let mut e = base.clone();
                e[i] = v;
                let _ = validate(&e, &l);
            }
            let _ = validate(&base[..i], &l);
        }
    }
}
