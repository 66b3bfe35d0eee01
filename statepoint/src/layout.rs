//! Guest-physical layout and boot state of the CPL3 guest ABI (`docs/guest-abi.md`).
//!
//! ```text
//! 0x0000_0000  GDT (0x500), PML4 (0x1000), PDPT (0x2000), PDs (0x3000…)   supervisor-only 2 MiB page
//! 0x0020_0000  BootInfo (4 KiB)                                            user pages from here up
//! 0x0020_1000  ELF PT_LOAD segments, then free memory
//! stack_base   vCPU stacks, 256 KiB each, vCPU 0's at the very top
//! mem_size
//! ```

use kvm_bindings::{kvm_regs, kvm_segment};
use vm_memory::{Bytes, GuestAddress};

use crate::memory::GuestRam;
use crate::vstate::BootSregs;

/// 2 MiB: the page size of the identity map and the VMM-reserved low area.
pub const HUGE_PAGE: u64 = 2 << 20;
/// Guest-physical address of the GDT.
pub const GDT_ADDR: u64 = 0x500;
/// Guest-physical address of the PML4.
pub const PML4_ADDR: u64 = 0x1000;
/// Guest-physical address of the PDPT.
pub const PDPT_ADDR: u64 = 0x2000;
/// Guest-physical address of the first page directory (one per GiB).
pub const PD_ADDR: u64 = 0x3000;
/// Guest-physical address of the `BootInfo` block.
pub const BOOT_INFO_ADDR: u64 = HUGE_PAGE;
/// Lowest address an ELF segment may use.
pub const IMAGE_MIN: u64 = BOOT_INFO_ADDR + 0x1000;
/// Stack size of each vCPU.
pub const STACK_SIZE: u64 = 256 << 10;
/// Smallest guest memory.
pub const MIN_MEM: u64 = 8 << 20;
/// Largest guest memory (one PDPT: 512 GiB; we stop well before the PDs would leave the low 2 MiB).
pub const MAX_MEM: u64 = 256 << 30;
/// Most program arguments in `BootInfo`.
pub const MAX_ARGS: usize = 8;
/// `BootInfo.magic`: `b"AXBOOT01"` read as a little-endian u64.
pub const BOOT_MAGIC: u64 = u64::from_le_bytes(*b"AXBOOT01");

/// Selector of the 64-bit user code segment (GDT entry 4, RPL 3).
pub const USER_CS: u16 = (4 << 3) | 3;
/// Selector of the user data/stack segment (GDT entry 3, RPL 3).
pub const USER_DS: u16 = (3 << 3) | 3;

const PTE_PRESENT: u64 = 1 << 0;
const PTE_WRITE: u64 = 1 << 1;
const PTE_USER: u64 = 1 << 2;
const PTE_ACCESSED: u64 = 1 << 5;
const PTE_DIRTY: u64 = 1 << 6;
const PTE_HUGE: u64 = 1 << 7;

const CR0_PE: u64 = 1 << 0;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_WP: u64 = 1 << 16;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
/// RFLAGS at entry: IOPL = 3 (port I/O from CPL3), IF = 0, bit 1 reserved-one.
const RFLAGS_BOOT: u64 = (3 << 12) | (1 << 1);

/// Layout errors.
#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    /// The memory size is not usable.
    #[error("guest memory size {0} bytes: must be a multiple of 2 MiB between 8 MiB and 256 GiB")]
    MemSize(u64),
    /// Too many vCPUs for the memory (their stacks would not fit).
    #[error(
        "{vcpus} vCPUs need {need} bytes of stack, more than fits in {mem_size} bytes of memory"
    )]
    Stacks {
        /// vCPUs asked for.
        vcpus: u8,
        /// Stack bytes needed.
        need: u64,
        /// Memory size.
        mem_size: u64,
    },
    /// Too many program arguments.
    #[error("{0} program arguments given, at most {MAX_ARGS} fit in BootInfo")]
    TooManyArgs(usize),
    /// Writing the boot structures failed.
    #[error("writing boot structures into guest memory: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
}

/// Where things go for a VM of a given shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Guest memory size.
    pub mem_size: u64,
    /// Number of vCPUs.
    pub vcpus: u8,
}

impl Layout {
    /// Validates a VM shape.
    pub fn new(mem_size: u64, vcpus: u8) -> Result<Self, LayoutError> {
        if !(MIN_MEM..=MAX_MEM).contains(&mem_size) || !mem_size.is_multiple_of(HUGE_PAGE) {
            return Err(LayoutError::MemSize(mem_size));
        }
        let need = u64::from(vcpus) * STACK_SIZE;
        if vcpus == 0 || need + IMAGE_MIN + HUGE_PAGE > mem_size {
            return Err(LayoutError::Stacks {
                vcpus,
                need,
                mem_size,
            });
        }
        Ok(Layout { mem_size, vcpus })
    }

    /// Lowest stack address: the ELF image must end below it.
    pub fn stack_base(&self) -> u64 {
        self.mem_size - u64::from(self.vcpus) * STACK_SIZE
    }

    /// Initial `rsp` of vCPU `i`: top of its stack minus 8 (as right after a `call`).
    pub fn stack_pointer(&self, i: u8) -> u64 {
        self.mem_size - u64::from(i) * STACK_SIZE - 8
    }

    /// Writes GDT, page tables and `BootInfo` into guest memory.
    pub fn write_boot_structures(
        &self,
        ram: &GuestRam,
        free_start: u64,
        args: &[u64],
    ) -> Result<(), LayoutError> {
        if args.len() > MAX_ARGS {
            return Err(LayoutError::TooManyArgs(args.len()));
        }
        let mem = ram.memory();
        for (i, entry) in gdt().iter().enumerate() {
            mem.write_obj(*entry, GuestAddress(GDT_ADDR + 8 * i as u64))?;
        }
        let gibs = self.mem_size.div_ceil(1 << 30);
        mem.write_obj(
            PDPT_ADDR | PTE_PRESENT | PTE_WRITE | PTE_USER,
            GuestAddress(PML4_ADDR),
        )?;
        for g in 0..gibs {
            let pd = PD_ADDR + g * 0x1000;
            mem.write_obj(
                pd | PTE_PRESENT | PTE_WRITE | PTE_USER,
                GuestAddress(PDPT_ADDR + 8 * g),
            )?;
        }
        // Accessed and dirty are preset so the CPU never writes the tables (no dirty page per epoch).
        for page in 0..self.mem_size / HUGE_PAGE {
            let user = if page == 0 { 0 } else { PTE_USER };
            let pde = (page * HUGE_PAGE)
                | PTE_PRESENT
                | PTE_WRITE
                | PTE_HUGE
                | PTE_ACCESSED
                | PTE_DIRTY
                | user;
            mem.write_obj(pde, GuestAddress(PD_ADDR + 8 * page))?;
        }
        let mut info = [0u64; 6 + MAX_ARGS];
        info[0] = BOOT_MAGIC;
        info[1] = self.mem_size;
        info[2] = u64::from(self.vcpus);
        info[3] = free_start;
        info[4] = self.stack_base();
        info[5] = args.len() as u64;
        info[6..6 + args.len()].copy_from_slice(args);
        for (i, word) in info.iter().enumerate() {
            mem.write_obj(*word, GuestAddress(BOOT_INFO_ADDR + 8 * i as u64))?;
        }
        Ok(())
    }

    /// Segment and control registers at entry.
    pub fn boot_sregs(&self) -> BootSregs {
        BootSregs {
            cs: segment(USER_CS, 0xb, true),
            ds: segment(USER_DS, 0x3, false),
            ss: segment(USER_DS, 0x3, false),
            gdt_base: GDT_ADDR,
            gdt_limit: (gdt().len() * 8 - 1) as u16,
            cr0: CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG,
            cr3: PML4_ADDR,
            cr4: CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT,
            efer: EFER_LME | EFER_LMA,
        }
    }

    /// General registers at entry of vCPU `i`.
    pub fn boot_regs(&self, i: u8, entry: u64) -> kvm_regs {
        kvm_regs {
            rip: entry,
            rsp: self.stack_pointer(i),
            rdi: u64::from(i),
            rsi: BOOT_INFO_ADDR,
            rflags: RFLAGS_BOOT,
            ..Default::default()
        }
    }
}

/// A DPL-3 flat segment as KVM wants it.
fn segment(selector: u16, type_: u8, long: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 3,
        db: u8::from(!long),
        s: 1,
        l: u8::from(long),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// The same segments as GDT descriptors (null, kernel code/data for completeness, user data, user code).
fn gdt() -> [u64; 5] {
    // access byte: P | DPL | S | type; flags nibble: G | D/B | L.
    let descriptor = |access: u64, flags: u64| -> u64 {
        let limit = 0xf_ffffu64;
        (limit & 0xffff) | ((limit >> 16) << 48) | (access << 40) | (flags << 52)
    };
    [
        0,
        descriptor(0x9b, 0xa), // kernel code 64
        descriptor(0x93, 0xc), // kernel data
        descriptor(0xf3, 0xc), // user data (DPL 3)
        descriptor(0xfb, 0xa), // user code 64 (DPL 3)
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_bad_shapes() {
        assert!(Layout::new(3 << 20, 1).is_err());
        assert!(Layout::new(10 << 20, 1).is_ok());
        assert!(Layout::new(9 << 20, 1).is_err());
        assert!(Layout::new(8 << 20, 0).is_err());
        assert!(Layout::new(8 << 20, 32).is_err());
        assert!(Layout::new(256 << 20, 8).is_ok());
    }

    #[test]
    fn stacks_do_not_overlap() {
        let l = Layout::new(64 << 20, 4).unwrap();
        for i in 0..4u8 {
            let sp = l.stack_pointer(i);
            assert_eq!((sp + 8) % 16, 0);
            assert!(sp >= l.stack_base());
            assert!(sp < l.mem_size);
        }
    }
}
