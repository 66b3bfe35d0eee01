//! The Sheepdog inode object (`struct sd_inode` of sheepdog 1.0's `include/sheepdog_proto.h`) and its two
//! kinds of data index: the flat `data_vdi_id[]` table (`store_policy` 0) and the B-tree of hyper volumes
//! (`store_policy` 1: `struct sd_index_header`, `struct sd_index`, `struct sd_indirect_idx`, as
//! `lib/sd_inode.c` reads and writes them). docs/volume-replication.md has the byte layouts.
//!
//! This module is pure: it parses bytes read from a sheep and produces the bytes to write back. What it
//! does not understand (another `store_policy`, a bad magic, a depth other than 1 or 2, entries beyond
//! the node) is an error, never a guess: a client must not write into an inode it does not understand.

use super::SheepError;

/// Offset of `tag[256]`.
pub const TAG: u32 = 256;
/// Offset of `snap_ctime` (non-zero: the VDI is a snapshot).
pub const SNAP_CTIME: u32 = 520;
/// Offset of `vdi_size` (u64).
pub const VDI_SIZE: u32 = 536;
/// Offset of `copy_policy` (u8).
pub const COPY_POLICY: u32 = 552;
/// Offset of `store_policy` (u8): 0 flat table, 1 B-tree (hyper volume).
pub const STORE_POLICY: u32 = 553;
/// Offset of `nr_copies` (u8).
pub const NR_COPIES: u32 = 554;
/// Offset of `block_size_shift` (u8).
pub const BLOCK_SIZE_SHIFT: u32 = 555;
/// Offset of `snap_id` (u32).
pub const SNAP_ID: u32 = 556;
/// Offset of `vdi_id` (u32).
pub const VDI_ID: u32 = 560;
/// Offset of `parent_vdi_id` (u32).
pub const PARENT_VDI_ID: u32 = 564;
/// Offset of `btree_counter` (u32): the next B-tree node number of a hyper volume.
pub const BTREE_COUNTER: u32 = 568;
/// `SD_INODE_HEADER_SIZE`: offset of `data_vdi_id[]`, where the data index starts.
pub const HEADER_SIZE: u32 = 4664;
/// `SD_INODE_DATA_INDEX_SIZE`: bytes of `data_vdi_id[]`, and of one B-tree node object.
pub const DATA_INDEX_SIZE: u32 = 4 << 20;
/// Entries of the flat table (`SD_INODE_DATA_INDEX`).
pub const FLAT_ENTRIES: u64 = 1 << 20;
/// `INODE_BTREE_MAGIC`.
pub const BTREE_MAGIC: u16 = 0x6274;
/// `sizeof(struct sd_index_header)`: magic u16, depth u16, entries u32.
pub const BTREE_HEADER_LEN: usize = 8;
/// `sizeof(struct sd_index)`: idx u32, vdi_id u32.
pub const INDEX_LEN: usize = 8;
/// `sizeof(struct sd_indirect_idx)`: idx u32, 4 bytes of padding, oid u64.
pub const INDIRECT_LEN: usize = 16;
/// Most `sd_index` entries in one node (`MAX_INDEX`).
pub const MAX_INDEX: u32 = ((DATA_INDEX_SIZE as usize - BTREE_HEADER_LEN) / INDEX_LEN) as u32;
/// Most `sd_indirect_idx` entries in the root (`MAX_INDIRECT_IDX`).
pub const MAX_INDIRECT: u32 = ((DATA_INDEX_SIZE as usize - BTREE_HEADER_LEN) / INDIRECT_LEN) as u32;
/// `VDI_BTREE_BIT`: B-tree node objects are `vid << 32 | 1 << 60 | n`.
pub const VDI_BTREE_BIT: u64 = 1 << 60;
/// The bytes of the inode header this client reads (name … `btree_counter`).
pub const HEAD_LEN: u32 = BTREE_COUNTER + 4;

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// The fields of an inode header this client uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InodeHead {
    /// `tag`, up to the first NUL.
    pub tag: String,
    /// `snap_ctime` is non-zero.
    pub is_snapshot: bool,
    /// `vdi_size`.
    pub vdi_size: u64,
    /// `copy_policy` (0 replication, else erasure code).
    pub copy_policy: u8,
    /// `store_policy` (0 flat, 1 B-tree).
    pub store_policy: u8,
    /// `nr_copies`.
    pub nr_copies: u8,
    /// `block_size_shift`.
    pub block_size_shift: u8,
    /// `snap_id`.
    pub snap_id: u32,
    /// `vdi_id`.
    pub vdi_id: u32,
    /// `parent_vdi_id`.
    pub parent_vdi_id: u32,
    /// `btree_counter`.
    pub btree_counter: u32,
}

impl InodeHead {
    /// Parses the first [`HEAD_LEN`] bytes of an inode object.
    pub fn parse(b: &[u8]) -> Option<InodeHead> {
        if b.len() < HEAD_LEN as usize {
            return None;
        }
        let tag = &b[TAG as usize..TAG as usize + 256];
        let end = tag.iter().position(|&c| c == 0).unwrap_or(tag.len());
        Some(InodeHead {
            tag: String::from_utf8_lossy(&tag[..end]).into_owned(),
            is_snapshot: u64_at(b, SNAP_CTIME as usize) != 0,
            vdi_size: u64_at(b, VDI_SIZE as usize),
            copy_policy: b[COPY_POLICY as usize],
            store_policy: b[STORE_POLICY as usize],
            nr_copies: b[NR_COPIES as usize],
            block_size_shift: b[BLOCK_SIZE_SHIFT as usize],
            snap_id: u32_at(b, SNAP_ID as usize),
            vdi_id: u32_at(b, VDI_ID as usize),
            parent_vdi_id: u32_at(b, PARENT_VDI_ID as usize),
            btree_counter: u32_at(b, BTREE_COUNTER as usize),
        })
    }
}

/// The header of a B-tree node (`struct sd_index_header`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NodeHeader {
    /// `magic`: [`BTREE_MAGIC`] (0 with everything else 0: a tree never written).
    pub magic: u16,
    /// `depth`: 1 — the node holds `sd_index` entries; 2 — the root holds `sd_indirect_idx` entries.
    pub depth: u16,
    /// `entries`.
    pub entries: u32,
}

impl NodeHeader {
    /// Parses the 8 header bytes.
    pub fn parse(b: &[u8]) -> NodeHeader {
        NodeHeader {
            magic: u16_at(b, 0),
            depth: u16_at(b, 2),
            entries: u32_at(b, 4),
        }
    }
    /// The 8 header bytes.
    pub fn encode(&self) -> [u8; BTREE_HEADER_LEN] {
        let mut h = [0u8; BTREE_HEADER_LEN];
        h[0..2].copy_from_slice(&self.magic.to_le_bytes());
        h[2..4].copy_from_slice(&self.depth.to_le_bytes());
        h[4..8].copy_from_slice(&self.entries.to_le_bytes());
        h
    }
    /// Bytes of the node in use: the header and its entries (`sd_inode_get_meta_size`).
    pub fn meta_len(&self) -> Result<usize, String> {
        match self.depth {
            1 => Ok(BTREE_HEADER_LEN + INDEX_LEN * self.entries as usize),
            2 => Ok(BTREE_HEADER_LEN + INDIRECT_LEN * self.entries as usize),
            d => Err(format!("B-tree depth {d} (sheepdog knows 1 and 2)")),
        }
    }
}

/// One `sd_indirect_idx`: the leaf node `oid` holds the entries up to data index `max_idx`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Indirect {
    /// Highest data object index in the leaf.
    pub max_idx: u32,
    /// The leaf node's object id.
    pub oid: u64,
}

/// The B-tree node object id `n` of VDI `vid` (`vid_to_btree_oid`).
pub fn btree_oid(vid: u32, n: u32) -> u64 {
    (vid as u64) << 32 | VDI_BTREE_BIT | n as u64
}

fn bad(name: &str, reason: String) -> SheepError {
    SheepError::BadVdi {
        name: name.to_string(),
        reason,
    }
}

/// Checks a node header read from `what` and returns how many entry bytes follow it.
pub fn check_node(
    name: &str,
    what: &str,
    h: &NodeHeader,
    want_depth: Option<u16>,
) -> Result<usize, SheepError> {
    if h.magic != BTREE_MAGIC {
        return Err(bad(
            name,
            format!(
                "{what}: B-tree magic {:#06x}, want {BTREE_MAGIC:#06x}",
                h.magic
            ),
        ));
    }
    if let Some(d) = want_depth {
        if h.depth != d {
            return Err(bad(
                name,
                format!("{what}: B-tree depth {}, want {d}", h.depth),
            ));
        }
    }
    let len = h
        .meta_len()
        .map_err(|r| bad(name, format!("{what}: {r}")))?;
    let max = match h.depth {
        1 => MAX_INDEX,
        _ => MAX_INDIRECT,
    };
    if h.entries > max {
        return Err(bad(
            name,
            format!(
                "{what}: {} B-tree entries, a node holds at most {max}",
                h.entries
            ),
        ));
    }
    Ok(len - BTREE_HEADER_LEN)
}

/// Parses the `sd_index` entries of a depth-1 node into `owners` (index → owning VDI id), checking that
/// they ascend and lie below `owners.len()`.
pub fn parse_leaf(
    name: &str,
    what: &str,
    entries: &[u8],
    owners: &mut [u32],
) -> Result<(), SheepError> {
    let mut last: Option<u32> = None;
    for e in entries.chunks_exact(INDEX_LEN) {
        let (idx, vid) = (u32_at(e, 0), u32_at(e, 4));
        if last.is_some_and(|l| idx <= l) {
            return Err(bad(
                name,
                format!("{what}: B-tree index {idx} out of order"),
            ));
        }
        last = Some(idx);
        match owners.get_mut(idx as usize) {
            Some(o) => *o = vid,
            None => {
                return Err(bad(
                    name,
                    format!(
                        "{what}: B-tree index {idx} beyond the VDI's {} objects",
                        owners.len()
                    ),
                ))
            }
        }
    }
    Ok(())
}

/// Parses the `sd_indirect_idx` entries of a depth-2 root.
pub fn parse_root_indirect(name: &str, entries: &[u8]) -> Result<Vec<Indirect>, SheepError> {
    let mut out: Vec<Indirect> = Vec::with_capacity(entries.len() / INDIRECT_LEN);
    for e in entries.chunks_exact(INDIRECT_LEN) {
        let i = Indirect {
            max_idx: u32_at(e, 0),
            oid: u64_at(e, 8),
        };
        if out.last().is_some_and(|l| i.max_idx <= l.max_idx) {
            return Err(bad(
                name,
                format!("B-tree root: index {} out of order", i.max_idx),
            ));
        }
        if i.oid & VDI_BTREE_BIT == 0 {
            return Err(bad(
                name,
                format!("B-tree root: {:#018x} is not a B-tree node", i.oid),
            ));
        }
        out.push(i);
    }
    Ok(out)
}

/// The bytes of a depth-1 root holding every allocated object of `owners` (`sd_index_header` and the
/// `sd_index` entries in index order), as `sd_inode_write` stores it at [`HEADER_SIZE`]. `None` when
/// nothing is allocated and the tree was never written (it stays all-zero, which sheepdog reads as
/// empty).
pub fn encode_leaf_root(
    name: &str,
    owners: &[u32],
    was_written: bool,
) -> Result<Option<Vec<u8>>, SheepError> {
    let n = owners.iter().filter(|&&v| v != 0).count();
    if n == 0 && !was_written {
        return Ok(None);
    }
    if n > MAX_INDEX as usize {
        return Err(bad(
            name,
            format!(
                "{n} allocated objects exceed the {MAX_INDEX} a depth-1 B-tree root holds (splitting the \
                 root into depth 2 is not supported)"
            ),
        ));
    }
    let mut b = Vec::with_capacity(BTREE_HEADER_LEN + n * INDEX_LEN);
    b.extend_from_slice(
        &NodeHeader {
            magic: BTREE_MAGIC,
            depth: 1,
            entries: n as u32,
        }
        .encode(),
    );
    for (idx, &vid) in owners.iter().enumerate() {
        if vid != 0 {
            b.extend_from_slice(&(idx as u32).to_le_bytes());
            b.extend_from_slice(&vid.to_le_bytes());
        }
    }
    Ok(Some(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_follow_sheepdog_proto_h() {
        // sd_index_header: u16 magic, u16 depth, u32 entries; sd_index 2×u32; sd_indirect_idx u32 + pad + u64.
        assert_eq!((BTREE_HEADER_LEN, INDEX_LEN, INDIRECT_LEN), (8, 8, 16));
        // lib/sd_inode.c: "349524 * 524287" — the leaf count matches; the root holds (4 MiB − 8) / 16.
        assert_eq!(MAX_INDEX, 524_287);
        assert_eq!(MAX_INDIRECT, 262_143);
        assert_eq!(btree_oid(0x7c2b25, 3), 0x107c_2b25_0000_0003);
        assert_eq!(
            HEADER_SIZE as usize,
            256 + 256 + 5 * 8 + 4 + 3 * 4 + 4 + 4 * 1023
        );
    }

    #[test]
    fn leaf_root_round_trip_and_refusals() {
        let mut owners = vec![0u32; 10];
        assert_eq!(encode_leaf_root("v", &owners, false).expect("ok"), None);
        owners[3] = 7;
        owners[9] = 8;
        let b = encode_leaf_root("v", &owners, false)
            .expect("ok")
            .expect("some");
        assert_eq!(b.len(), 8 + 16);
        let h = NodeHeader::parse(&b);
        assert_eq!(
            h,
            NodeHeader {
                magic: BTREE_MAGIC,
                depth: 1,
                entries: 2
            }
        );
        let len = check_node("v", "root", &h, None).expect("valid");
        let mut back = vec![0u32; 10];
        parse_leaf("v", "root", &b[8..8 + len], &mut back).expect("parses");
        assert_eq!(back, owners);
        let mut small = vec![0u32; 5];
        let e = parse_leaf("v", "root", &b[8..8 + len], &mut small).expect_err("beyond");
        assert!(e.to_string().contains("index 9 beyond"), "{e}");
        let e = check_node(
            "v",
            "root",
            &NodeHeader {
                magic: BTREE_MAGIC,
                depth: 3,
                entries: 1,
            },
            None,
        )
        .expect_err("depth 3");
        assert!(e.to_string().contains("depth 3"), "{e}");
        let e = check_node(
            "v",
            "root",
            &NodeHeader {
                magic: 0x1234,
                depth: 1,
                entries: 1,
            },
            None,
        )
        .expect_err("magic");
        assert!(e.to_string().contains("magic 0x1234"), "{e}");
    }
}
