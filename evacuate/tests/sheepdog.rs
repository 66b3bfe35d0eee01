//! The Sheepdog client's flow against an in-test fake `sheep` cluster that speaks the same codec.
//!
//! No real `sheep` exists on this machine (sheepdog is not packaged any more). The fake keeps objects in
//! memory and follows the real server where ax went wrong against a real cluster:
//!
//! - **inodes** have sheepdog 1.0's layout; a hyper volume (`store_policy` 1, inode byte 553) keeps a
//!   B-tree (`sd_index_header`, `sd_index`, `sd_indirect_idx`) where a flat volume keeps `data_vdi_id[]`.
//!   [`dog_read`] reads a VDI the way `dog vdi read` does (`lib/sd_inode.c`'s `traverse_btree` and
//!   `sd_inode_get_meta_size`), written here independently of ax's parser, and fails with sheepdog's
//!   "Depth of B-tree is out of range" where dog panics;
//! - **snapshots**: `NEW_VDI` with `snapid` and `base_vdi_id` turns the base into a snapshot and makes a
//!   new working VDI that copies its index; lookups by tag; `DEL_VDI` frees the objects nothing else
//!   references;
//! - **several gateways** (listeners) share one store; one can die (its port closes, its connections
//!   drop), a connection can be dropped after a request was applied and before the reply, and the
//!   whole cluster can go away mid-run;
//! - refusing requests that carry a stale epoch, as a cluster changing membership does.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use evacuate::volume::sheepdog::{
    data_oid, inode_oid, opcode, result, vdi_hash, Body, Request, Response, SheepClient,
    SheepdogBackend, VdiPolicy, HEADER_LEN, INODE_DATA_VDI_ID, PROTO_VER,
};
use evacuate::volume::{
    latest, prune, replicate, restore, Backend, Changes, Progress, ReplicateOptions, CHUNK_SIZE,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

mod common;
use common::{pattern, restores_exactly as assert_restores};

const OBJ_SIZE: usize = CHUNK_SIZE as usize;
const HDR: usize = INODE_DATA_VDI_ID as usize; // SD_INODE_HEADER_SIZE
const INODE_SIZE: usize = HDR + 4 * (1 << 20);
const BTREE_MAGIC: u16 = 0x6274;
const VDI_BTREE_BIT: u64 = 1 << 60;

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

#[derive(Default)]
struct Store {
    objects: HashMap<u64, Vec<u8>>,
    /// Working VDIs by name.
    vdis: HashMap<String, u32>,
    /// Snapshots: (name, tag) → vid.
    snapshots: BTreeMap<(String, String), u32>,
}

impl Store {
    fn free_vid(&self, name: &str) -> u32 {
        let mut vid = vdi_hash(name);
        while self.objects.contains_key(&inode_oid(vid)) {
            vid = (vid + 1) & 0xFF_FFFF;
        }
        vid
    }
    fn inode(&self, vid: u32) -> Option<&Vec<u8>> {
        self.objects.get(&inode_oid(vid))
    }
}

/// Reads VDI `vid` like `dog vdi read`: every object through the inode's index, unallocated ones as
/// zeros. Errors where sheepdog's own code panics or fails.
fn dog_read(st: &Store, vid: u32) -> Result<Vec<u8>, String> {
    let inode = st.inode(vid).ok_or("no inode")?;
    let size = u64_at(inode, 536) as usize;
    let n = size.div_ceil(OBJ_SIZE);
    let mut owners = vec![0u32; n];
    match inode[553] {
        0 => {
            for (i, o) in owners.iter_mut().enumerate() {
                *o = u32_at(inode, HDR + 4 * i);
            }
        }
        1 => {
            let mut entries: Vec<(u32, u32)> = Vec::new();
            if u32_at(inode, HDR) != 0 {
                // sd_inode_get_meta_size / traverse_btree
                let (magic, depth, count) = (
                    u16_at(inode, HDR),
                    u16_at(inode, HDR + 2),
                    u32_at(inode, HDR + 4) as usize,
                );
                if magic != BTREE_MAGIC {
                    return Err(format!("B-tree in inode is corrupt (magic {magic:#x})"));
                }
                match depth {
                    1 => {
                        for k in 0..count {
                            let at = HDR + 8 + 8 * k;
                            entries.push((u32_at(inode, at), u32_at(inode, at + 4)));
                        }
                    }
                    2 => {
                        for k in 0..count {
                            let at = HDR + 8 + 16 * k;
                            let leaf = st
                                .objects
                                .get(&u64_at(inode, at + 8))
                                .ok_or("missing B-tree leaf")?;
                            if u16_at(leaf, 0) != BTREE_MAGIC || u16_at(leaf, 2) != 1 {
                                return Err("B-tree leaf is corrupt".into());
                            }
                            for j in 0..u32_at(leaf, 4) as usize {
                                entries.push((u32_at(leaf, 8 + 8 * j), u32_at(leaf, 12 + 8 * j)));
                            }
                        }
                    }
                    d => return Err(format!("Depth of B-tree is out of range(depth: {d})")),
                }
            }
            for (idx, v) in entries {
                *owners
                    .get_mut(idx as usize)
                    .ok_or(format!("B-tree index {idx} beyond the VDI"))? = v;
            }
        }
        p => return Err(format!("store_policy {p}")),
    }
    let mut out = Vec::with_capacity(n * OBJ_SIZE);
    for (i, &o) in owners.iter().enumerate() {
        match o {
            0 => out.resize(out.len() + OBJ_SIZE, 0),
            v => out.extend_from_slice(
                st.objects
                    .get(&data_oid(v, i as u64))
                    .ok_or(format!("object {i} of vdi {v:#x} missing"))?,
            ),
        }
    }
    out.truncate(size);
    Ok(out)
}

/// Every (index, owner) an inode references (the fake's reference count for deletion).
fn references(st: &Store, vid: u32) -> Vec<(u64, u32)> {
    let Some(inode) = st.inode(vid) else {
        return Vec::new();
    };
    let n = (u64_at(inode, 536) as usize).div_ceil(OBJ_SIZE);
    if inode[553] == 0 {
        (0..n)
            .map(|i| (i as u64, u32_at(inode, HDR + 4 * i)))
            .filter(|(_, v)| *v != 0)
            .collect()
    } else if u16_at(inode, HDR + 2) == 1 {
        (0..u32_at(inode, HDR + 4) as usize)
            .map(|k| {
                (
                    u32_at(inode, HDR + 8 + 8 * k) as u64,
                    u32_at(inode, HDR + 12 + 8 * k),
                )
            })
            .collect()
    } else {
        Vec::new()
    }
}

#[derive(Default)]
struct Faults {
    /// After this many data-object writes the whole cluster goes away (0: never).
    down_after_writes: AtomicU64,
    /// The cluster answers nothing: connections are closed as they come.
    down: AtomicBool,
    /// Gateway to kill after `kill_after_writes` data-object writes.
    kill_gateway: AtomicUsize,
    kill_after_writes: AtomicU64,
    /// Every n-th request that changes state (object write, VDI creation) is applied and then its
    /// connection drops without a reply (0: never) …
    drop_every: AtomicU64,
    /// … this many times.
    drops_left: AtomicU64,
    /// Data-object writes beyond this many wait forever (0: never): a run frozen mid-way.
    hold_after_writes: AtomicU64,
    /// Delay of every data-object write (ms), to see requests overlap.
    write_delay_ms: AtomicU64,
}

struct FakeSheep {
    store: Mutex<Store>,
    epoch: AtomicU32,
    /// Bump the epoch after this many requests (0: never).
    bump_every: u64,
    requests: AtomicU64,
    creates: AtomicU64,
    writes: AtomicU64,
    /// Data-object writes (create or overwrite) so far.
    data_writes: AtomicU64,
    in_flight: AtomicU64,
    max_in_flight: AtomicU64,
    mutations: AtomicU64,
    faults: Faults,
    gateways: Mutex<Vec<Gateway>>,
}

struct Gateway {
    addr: String,
    accept: tokio::task::JoinHandle<()>,
    conns: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl FakeSheep {
    fn lock(&self) -> std::sync::MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn addrs(&self) -> Vec<String> {
        self.gateways
            .lock()
            .expect("gateways")
            .iter()
            .map(|g| g.addr.clone())
            .collect()
    }

    /// Kills gateway `i`: its port closes and its connections drop.
    fn kill(&self, i: usize) {
        let gws = self.gateways.lock().expect("gateways");
        let g = &gws[i];
        g.accept.abort();
        for c in g.conns.lock().expect("conns").drain(..) {
            c.abort();
        }
    }

    /// Handles one request; returns the result, the reply tail and payload.
    fn handle(&self, req: &Request, payload: &[u8]) -> (u32, [u8; 28], Vec<u8>) {
        let none = [0u8; 28];
        let n = self.requests.fetch_add(1, Ordering::Relaxed) + 1;
        if self.bump_every != 0 && n.checked_rem(self.bump_every) == Some(0) {
            self.epoch.fetch_add(1, Ordering::Relaxed);
        }
        let epoch = self.epoch.load(Ordering::Relaxed);
        if req.proto_ver != PROTO_VER {
            return (result::VER_MISMATCH, none, Vec::new());
        }
        if req.epoch < epoch {
            return (result::OLD_NODE_VER, none, Vec::new());
        }
        if req.epoch > epoch {
            return (result::NEW_NODE_VER, none, Vec::new());
        }
        let mut st = self.lock();
        match (req.opcode, req.body) {
            (
                opcode::NEW_VDI,
                Body::Vdi {
                    vdi_size,
                    base_vdi_id,
                    store_policy,
                    block_size_shift,
                    snapid,
                    ..
                },
            ) => {
                let name = cstr(payload);
                if payload.len() != 256 || name.is_empty() || block_size_shift != 22 {
                    return (result::INVALID_PARMS, none, Vec::new());
                }
                if snapid != 0 {
                    // A snapshot: the base becomes read-only, a new working VDI copies its index.
                    if st.vdis.get(&name) != Some(&base_vdi_id) {
                        return (result::NO_BASE_VDI, none, Vec::new());
                    }
                    let vid = st.free_vid(&name);
                    let Some(base) = st.objects.get_mut(&inode_oid(base_vdi_id)) else {
                        return (result::NO_BASE_VDI, none, Vec::new());
                    };
                    base[520..528].copy_from_slice(&1u64.to_le_bytes()); // snap_ctime
                    let tag = cstr(&base[256..512]);
                    let mut inode = base.clone();
                    inode[256..512].fill(0);
                    inode[520..528].fill(0);
                    let snap_id = u32_at(&inode, 556) + 1;
                    inode[556..560].copy_from_slice(&snap_id.to_le_bytes());
                    inode[560..564].copy_from_slice(&vid.to_le_bytes());
                    inode[564..568].copy_from_slice(&base_vdi_id.to_le_bytes());
                    st.objects.insert(inode_oid(vid), inode);
                    st.vdis.insert(name.clone(), vid);
                    st.snapshots.insert((name, tag), base_vdi_id);
                    return (result::SUCCESS, Response::vdi_reply(vid, 3, 22), Vec::new());
                }
                if st.vdis.contains_key(&name) {
                    return (result::VDI_EXIST, none, Vec::new());
                }
                let vid = st.free_vid(&name);
                let mut inode = vec![0u8; INODE_SIZE];
                inode[..name.len()].copy_from_slice(name.as_bytes());
                inode[536..544].copy_from_slice(&vdi_size.to_le_bytes());
                inode[553] = store_policy;
                inode[554] = 3;
                inode[555] = 22;
                inode[560..564].copy_from_slice(&vid.to_le_bytes());
                st.objects.insert(inode_oid(vid), inode);
                st.vdis.insert(name, vid);
                (result::SUCCESS, Response::vdi_reply(vid, 3, 22), Vec::new())
            }
            (opcode::GET_VDI_INFO, Body::Vdi { .. }) => {
                if payload.len() != 512 {
                    return (result::INVALID_PARMS, none, Vec::new());
                }
                let (name, tag) = (cstr(&payload[..256]), cstr(&payload[256..]));
                if !st.vdis.contains_key(&name) {
                    return (result::NO_VDI, none, Vec::new());
                }
                let vid = if tag.is_empty() {
                    st.vdis.get(&name).copied()
                } else {
                    st.snapshots.get(&(name, tag)).copied()
                };
                match vid {
                    Some(vid) => (result::SUCCESS, Response::vdi_reply(vid, 3, 22), Vec::new()),
                    None => (result::NO_TAG, none, Vec::new()),
                }
            }
            (opcode::DEL_VDI, Body::Vdi { .. }) => {
                if payload.len() != 512 {
                    return (result::INVALID_PARMS, none, Vec::new());
                }
                let (name, tag) = (cstr(&payload[..256]), cstr(&payload[256..]));
                let vid = if tag.is_empty() {
                    st.vdis.remove(&name)
                } else {
                    st.snapshots.remove(&(name, tag))
                };
                let Some(vid) = vid else {
                    return (result::NO_VDI, none, Vec::new());
                };
                let mine = references(&st, vid);
                st.objects.remove(&inode_oid(vid));
                let live: Vec<u32> = st
                    .vdis
                    .values()
                    .chain(st.snapshots.values())
                    .copied()
                    .collect();
                let still: std::collections::HashSet<(u64, u32)> =
                    live.iter().flat_map(|&v| references(&st, v)).collect();
                for (i, owner) in mine {
                    if owner == vid && !still.contains(&(i, owner)) {
                        st.objects.remove(&data_oid(vid, i));
                    }
                }
                (result::SUCCESS, none, Vec::new())
            }
            (
                op,
                Body::Obj {
                    oid,
                    offset,
                    cow_oid,
                    ..
                },
            ) => {
                let offset = offset as usize;
                match op {
                    opcode::READ_OBJ => match st.objects.get(&oid) {
                        None => (result::NO_OBJ, none, Vec::new()),
                        Some(o) => {
                            let end = offset + req.data_length as usize;
                            if end > o.len() {
                                return (result::INVALID_PARMS, none, Vec::new());
                            }
                            (result::SUCCESS, none, o[offset..end].to_vec())
                        }
                    },
                    opcode::WRITE_OBJ | opcode::CREATE_AND_WRITE_OBJ => {
                        if req.data_length as usize != payload.len() {
                            return (result::INVALID_PARMS, none, Vec::new());
                        }
                        // A snapshot's inode and objects are read-only.
                        let owner = (oid >> 32 & 0xFF_FFFF) as u32;
                        if st.snapshots.values().any(|&v| v == owner) {
                            return (result::READONLY, none, Vec::new());
                        }
                        if op == opcode::CREATE_AND_WRITE_OBJ {
                            self.creates.fetch_add(1, Ordering::Relaxed);
                            let base = if cow_oid != 0 {
                                st.objects.get(&cow_oid).cloned()
                            } else {
                                None
                            };
                            st.objects
                                .insert(oid, base.unwrap_or_else(|| vec![0; OBJ_SIZE]));
                        } else {
                            self.writes.fetch_add(1, Ordering::Relaxed);
                        }
                        let Some(o) = st.objects.get_mut(&oid) else {
                            return (result::NO_OBJ, none, Vec::new());
                        };
                        if offset + payload.len() > o.len() {
                            return (result::INVALID_PARMS, none, Vec::new());
                        }
                        o[offset..offset + payload.len()].copy_from_slice(payload);
                        (result::SUCCESS, none, Vec::new())
                    }
                    _ => (result::INVALID_PARMS, none, Vec::new()),
                }
            }
            _ => (result::INVALID_PARMS, none, Vec::new()),
        }
    }
}

fn cstr(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

fn is_data_write(req: &Request) -> bool {
    matches!(req.opcode, opcode::WRITE_OBJ | opcode::CREATE_AND_WRITE_OBJ)
        && matches!(req.body, Body::Obj { oid, .. } if oid >> 60 == 0)
}

async fn serve_conn(
    sheep: Arc<FakeSheep>,
    mut s: TcpStream,
    gateway: usize,
) -> std::io::Result<()> {
    loop {
        let mut h = [0u8; HEADER_LEN];
        if s.read_exact(&mut h).await.is_err() {
            return Ok(()); // client went away
        }
        let req = match Request::decode(&h) {
            Ok(r) => r,
            Err(_) => return Ok(()),
        };
        let mut payload = vec![
            0u8;
            if req.flags & 1 != 0 {
                req.data_length as usize
            } else {
                0
            }
        ];
        s.read_exact(&mut payload).await?;
        let f = &sheep.faults;
        if f.down.load(Ordering::SeqCst) {
            return Ok(()); // the cluster is gone: the connection closes unanswered
        }
        if is_data_write(&req) {
            let n = sheep.data_writes.fetch_add(1, Ordering::SeqCst) + 1;
            let down = f.down_after_writes.load(Ordering::SeqCst);
            if down != 0 && n > down {
                f.down.store(true, Ordering::SeqCst);
                return Ok(());
            }
            let kill = f.kill_after_writes.load(Ordering::SeqCst);
            if kill != 0 && n == kill {
                let victim = f.kill_gateway.load(Ordering::SeqCst);
                sheep.kill(victim);
                if victim == gateway {
                    return Ok(());
                }
            }
            let hold = f.hold_after_writes.load(Ordering::SeqCst);
            if hold != 0 && n > hold {
                std::future::pending::<()>().await;
            }
            let now = sheep.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            sheep.max_in_flight.fetch_max(now, Ordering::SeqCst);
            let ms = f.write_delay_ms.load(Ordering::SeqCst);
            if ms > 0 {
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }
            sheep.in_flight.fetch_sub(1, Ordering::SeqCst);
        }
        let (res, tail, data) = sheep.handle(&req, &payload);
        let mutating = matches!(
            req.opcode,
            opcode::WRITE_OBJ | opcode::CREATE_AND_WRITE_OBJ | opcode::NEW_VDI
        );
        let every = f.drop_every.load(Ordering::SeqCst);
        if mutating && every != 0 {
            let n = sheep.mutations.fetch_add(1, Ordering::SeqCst) + 1;
            if n.is_multiple_of(every)
                && f.drops_left
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |d| d.checked_sub(1))
                    .is_ok()
            {
                return Ok(()); // applied, but the reply never leaves
            }
        }
        let rsp = Response {
            proto_ver: 0, // as a real sheep does
            opcode: req.opcode,
            flags: 0,
            epoch: sheep.epoch.load(Ordering::Relaxed),
            id: req.id,
            data_length: data.len() as u32,
            result: res,
            tail,
        };
        s.write_all(&rsp.encode()).await?;
        s.write_all(&data).await?;
    }
}

async fn start_cluster(bump_every: u64, gateways: usize) -> Arc<FakeSheep> {
    let sheep = Arc::new(FakeSheep {
        store: Mutex::new(Store::default()),
        epoch: AtomicU32::new(1),
        bump_every,
        requests: AtomicU64::new(0),
        creates: AtomicU64::new(0),
        writes: AtomicU64::new(0),
        data_writes: AtomicU64::new(0),
        in_flight: AtomicU64::new(0),
        max_in_flight: AtomicU64::new(0),
        mutations: AtomicU64::new(0),
        faults: Faults::default(),
        gateways: Mutex::new(Vec::new()),
    });
    for i in 0..gateways {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let conns: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>> = Arc::default();
        let (s, c) = (sheep.clone(), conns.clone());
        let accept = tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                let h = tokio::spawn({
                    let s = s.clone();
                    async move {
                        let _ = serve_conn(s, conn, i).await;
                    }
                });
                c.lock().expect("conns").push(h);
            }
        });
        sheep.gateways.lock().expect("gateways").push(Gateway {
            addr,
            accept,
            conns,
        });
    }
    sheep
}

async fn start(bump_every: u64) -> (Arc<FakeSheep>, String) {
    let sheep = start_cluster(bump_every, 1).await;
    let addr = sheep.addrs()[0].clone();
    (sheep, addr)
}

fn quiet(_: Progress) {}

fn workdir(test: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("ax-sheep-{test}-{}", std::process::id()));
    std::fs::create_dir_all(&d).expect("dir");
    d
}

/// Whether `got` (a whole VDI, its size rounded up to objects) starts with the image `want`.
fn holds(got: &[u8], want: &[u8]) -> bool {
    got.len() >= want.len() && got[..want.len()] == *want
}

/// The image as `dog vdi read` of the snapshot of `version` would see it.
fn dog_read_version(sheep: &FakeSheep, image: &str, version: u64) -> Result<Vec<u8>, String> {
    let st = sheep.lock();
    let prefix = format!("ax-v{version}-");
    let vid = st
        .snapshots
        .iter()
        .find(|((n, t), _)| n == image && t.starts_with(&prefix))
        .map(|(_, v)| *v)
        .ok_or(format!("no snapshot of {image} version {version}"))?;
    dog_read(&st, vid)
}

#[tokio::test]
async fn client_creates_vdi_writes_and_reads_objects_across_epoch_changes() {
    let (sheep, addr) = start(5).await;
    let epoch_at_start = sheep.epoch.load(Ordering::Relaxed);
    let client = SheepClient::new(&addr);
    assert_eq!(client.lookup_vdi("vol").await.expect("lookup"), None);
    let vid = client
        .create_vdi("vol", 8 * CHUNK_SIZE, 0)
        .await
        .expect("create");
    assert_eq!(vid, vdi_hash("vol"));
    let info = client
        .lookup_vdi("vol")
        .await
        .expect("lookup")
        .expect("exists");
    assert_eq!((info.vid, info.copies, info.block_size_shift), (vid, 3, 22));
    let err = client
        .create_vdi("vol", CHUNK_SIZE, 0)
        .await
        .expect_err("exists");
    assert!(err.to_string().contains("VDI exists"), "{err}");

    let oid = data_oid(vid, 2);
    assert_eq!(
        client.read_obj(oid, 0, 16).await.expect("read"),
        None,
        "never written"
    );
    client
        .create_and_write_obj(oid, 0, 3, 4096, b"hello sheep")
        .await
        .expect("create obj");
    client
        .write_obj(oid, 4096 + 6, b"SHEEP")
        .await
        .expect("write");
    let back = client
        .read_obj(oid, 4096, 11)
        .await
        .expect("read")
        .expect("exists");
    assert_eq!(&back, b"hello SHEEP");
    assert!(
        sheep.epoch.load(Ordering::Relaxed) > epoch_at_start,
        "the cluster epoch changed"
    );
    assert_eq!(
        client.epoch(),
        sheep.epoch.load(Ordering::Relaxed),
        "the client followed it"
    );
}

#[tokio::test]
async fn versions_are_snapshots_restorable_and_pruned_with_keep() {
    let (sheep, addr) = start(0).await;
    let backend = Arc::new(SheepdogBackend::new(&addr));
    let dir = workdir("versions");
    let img = dir.join("disk.img");
    let size = 5 * OBJ_SIZE + 1000;
    let mut data = pattern(size, 9);
    std::fs::write(&img, &data).expect("write");
    let mut versions = vec![data.clone()];

    let r1 = replicate(
        backend.clone(),
        "vm-disk",
        &img,
        &ReplicateOptions::default(),
        &quiet,
    )
    .await
    .expect("v1");
    assert_eq!((r1.version, r1.changed, r1.uploaded), (1, 6, 6));

    data[OBJ_SIZE * 4 + 17] ^= 0xA5;
    std::fs::write(&img, &data).expect("write");
    versions.push(data.clone());
    let creates_before = sheep.creates.load(Ordering::Relaxed);
    let opts = ReplicateOptions {
        changes: Changes::WriteLog(
            std::iter::once(4 * CHUNK_SIZE + 17..4 * CHUNK_SIZE + 18).collect(),
        ),
        concurrency: 2,
    };
    let r2 = replicate(backend.clone(), "vm-disk", &img, &opts, &quiet)
        .await
        .expect("v2");
    assert_eq!((r2.version, r2.changed, r2.uploaded), (2, 1, 1));
    // The changed chunk is a new object of the working VDI (copy-on-write from v1's snapshot) — plus
    // catalog objects — and v1's object is untouched.
    assert!(sheep.creates.load(Ordering::Relaxed) > creates_before);

    // dog sees each version as a snapshot, bit-exact.
    for (i, want) in versions.iter().enumerate() {
        let got = dog_read_version(&sheep, "vm-disk", i as u64 + 1).expect("dog vdi read -s");
        assert!(holds(&got, want), "snapshot of v{} differs", i + 1);
    }
    // A fresh client (as after a restart) restores both versions bit-exact.
    let fresh = SheepdogBackend::new(&addr);
    assert_eq!(
        fresh.list_versions("vm-disk").await.expect("list"),
        vec![1, 2]
    );
    for (i, want) in versions.iter().enumerate() {
        assert_restores(&fresh, "vm-disk", i as u64 + 1, want, &dir).await;
    }

    // keep = 1: v1's snapshot goes, and with it the object only v1 referenced.
    let v1_vid = {
        let st = sheep.lock();
        *st.snapshots
            .iter()
            .find(|((_, t), _)| t.starts_with("ax-v1-"))
            .expect("v1 snapshot")
            .1
    };
    assert!(sheep.lock().objects.contains_key(&data_oid(v1_vid, 4)));
    let p = prune(&fresh, "vm-disk", 1).await.expect("prune");
    assert_eq!(p.deleted_versions, vec![1]);
    assert_eq!(fresh.list_versions("vm-disk").await.expect("list"), vec![2]);
    {
        let st = sheep.lock();
        assert!(!st.snapshots.keys().any(|(_, t)| t.starts_with("ax-v1-")));
        assert!(
            !st.objects.contains_key(&data_oid(v1_vid, 4)),
            "v1's own chunk 4 freed"
        );
        assert!(
            st.objects.contains_key(&data_oid(v1_vid, 0)),
            "chunk 0 is still v2's"
        );
    }
    assert_restores(&fresh, "vm-disk", 2, &data, &dir).await;
    let err = restore(&fresh, "vm-disk", 1, &dir.join("x"), &quiet)
        .await
        .expect_err("pruned");
    assert!(err.to_string().contains("version 1 not held"), "{err}");

    // A corrupted object is detected on restore.
    {
        let mut st = sheep.lock();
        let obj = st.objects.get_mut(&data_oid(v1_vid, 1)).expect("object 1");
        obj[5] ^= 1;
    }
    let err = restore(&fresh, "vm-disk", 2, &dir.join("x"), &quiet)
        .await
        .expect_err("corrupt");
    assert!(
        err.to_string().contains("chunk 1: sha256 mismatch"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[tokio::test]
async fn hyper_volume_replicates_through_its_btree_and_dog_reads_it() {
    let (sheep, addr) = start(0).await;
    let client = SheepClient::new(&addr);
    let size = 9 * OBJ_SIZE + 512;
    // `dog vdi create -y`: a hyper volume (store_policy 1), B-tree index.
    client
        .create_vdi_with(
            "hyper",
            (size as u64).div_ceil(CHUNK_SIZE) * CHUNK_SIZE,
            VdiPolicy {
                store_policy: 1,
                ..VdiPolicy::default()
            },
        )
        .await
        .expect("create hyper VDI");
    let backend = Arc::new(SheepdogBackend::new(&addr));
    let dir = workdir("hyper");
    let img = dir.join("disk.img");
    let mut data = pattern(size, 4);
    data[2 * OBJ_SIZE..3 * OBJ_SIZE].fill(0);
    std::fs::write(&img, &data).expect("write");
    let mut versions = vec![data.clone()];
    replicate(
        backend.clone(),
        "hyper",
        &img,
        &ReplicateOptions::default(),
        &quiet,
    )
    .await
    .expect("v1");
    data[7 * OBJ_SIZE + 3] ^= 0x77;
    data[size - 1] ^= 1;
    std::fs::write(&img, &data).expect("write");
    versions.push(data.clone());
    let r2 = replicate(
        backend.clone(),
        "hyper",
        &img,
        &ReplicateOptions::default(),
        &quiet,
    )
    .await
    .expect("v2");
    assert_eq!((r2.version, r2.changed), (2, 2));

    // The B-tree root as sheepdog keeps it: magic, depth 1, one sd_index per allocated object.
    {
        let st = sheep.lock();
        let vid = st.vdis["hyper"];
        let inode = st.inode(vid).expect("inode");
        assert_eq!(inode[553], 1, "still a hyper volume");
        assert_eq!(
            (
                u16_at(inode, HDR),
                u16_at(inode, HDR + 2),
                u32_at(inode, HDR + 4)
            ),
            (BTREE_MAGIC, 1, 10)
        );
        // Working VDI (sharing v2's objects) reads back like the image, as does each snapshot.
        assert!(holds(&dog_read(&st, vid).expect("dog vdi read"), &data));
    }
    for (i, want) in versions.iter().enumerate() {
        let got = dog_read_version(&sheep, "hyper", i as u64 + 1).expect("dog vdi read -s");
        assert!(holds(&got, want), "hyper snapshot v{} differs", i + 1);
        assert_restores(backend.as_ref(), "hyper", i as u64 + 1, want, &dir).await;
    }
    // Pruning a hyper snapshot frees only what it alone referenced.
    prune(backend.as_ref(), "hyper", 1).await.expect("prune");
    assert!(holds(
        &dog_read_version(&sheep, "hyper", 2).expect("v2"),
        &data
    ));
    std::fs::remove_dir_all(&dir).ok();
}

/// Puts a hyper inode with a depth-2 B-tree (root of `sd_indirect_idx`, two leaves) into the store.
fn depth_two_hyper(sheep: &FakeSheep, name: &str, objs: usize) -> u32 {
    let mut st = sheep.lock();
    let vid = st.free_vid(name);
    let mut inode = vec![0u8; INODE_SIZE];
    inode[..name.len()].copy_from_slice(name.as_bytes());
    inode[536..544].copy_from_slice(&((objs * OBJ_SIZE) as u64).to_le_bytes());
    inode[553] = 1;
    inode[554] = 3;
    inode[555] = 22;
    inode[560..564].copy_from_slice(&vid.to_le_bytes());
    inode[568..572].copy_from_slice(&2u32.to_le_bytes()); // btree_counter
    let half = objs / 2;
    let mut root = Vec::new();
    root.extend_from_slice(&BTREE_MAGIC.to_le_bytes());
    root.extend_from_slice(&2u16.to_le_bytes());
    root.extend_from_slice(&2u32.to_le_bytes());
    for (n, range) in [(0u32, 0..half), (1, half..objs)] {
        let leaf_oid = (vid as u64) << 32 | VDI_BTREE_BIT | n as u64;
        let mut leaf = vec![0u8; OBJ_SIZE];
        leaf[0..2].copy_from_slice(&BTREE_MAGIC.to_le_bytes());
        leaf[2..4].copy_from_slice(&1u16.to_le_bytes());
        leaf[4..8].copy_from_slice(&(range.len() as u32).to_le_bytes());
        for (k, i) in range.clone().enumerate() {
            leaf[8 + 8 * k..12 + 8 * k].copy_from_slice(&(i as u32).to_le_bytes());
            leaf[12 + 8 * k..16 + 8 * k].copy_from_slice(&vid.to_le_bytes());
            st.objects
                .insert(data_oid(vid, i as u64), vec![i as u8 + 1; OBJ_SIZE]);
        }
        st.objects.insert(leaf_oid, leaf);
        root.extend_from_slice(&((range.end - 1) as u32).to_le_bytes());
        root.extend_from_slice(&[0; 4]);
        root.extend_from_slice(&leaf_oid.to_le_bytes());
    }
    inode[HDR..HDR + root.len()].copy_from_slice(&root);
    st.objects.insert(inode_oid(vid), inode);
    st.vdis.insert(name.to_string(), vid);
    vid
}

/// Puts a VDI of 4 objects with `store_policy` and `root` at the index into the store.
fn put_inode(sheep: &FakeSheep, name: &str, store_policy: u8, root: &[u8]) -> u32 {
    let mut st = sheep.lock();
    let vid = st.free_vid(name);
    let mut inode = vec![0u8; INODE_SIZE];
    inode[536..544].copy_from_slice(&(4 * CHUNK_SIZE).to_le_bytes());
    inode[553] = store_policy;
    inode[555] = 22;
    inode[560..564].copy_from_slice(&vid.to_le_bytes());
    inode[HDR..HDR + root.len()].copy_from_slice(root);
    st.objects.insert(inode_oid(vid), inode);
    st.vdis.insert(name.into(), vid);
    vid
}

/// Replicating into `name` fails naming `needle`, and not a byte of the cluster changed.
async fn refused_untouched(
    sheep: &FakeSheep,
    backend: &Arc<SheepdogBackend>,
    name: &str,
    img: &std::path::Path,
    needle: &str,
) {
    let before = sheep.lock().objects.clone();
    let err = replicate(
        backend.clone(),
        name,
        img,
        &ReplicateOptions::default(),
        &quiet,
    )
    .await
    .expect_err("refused");
    assert!(err.to_string().contains(needle), "{err}");
    assert!(
        sheep.lock().objects == before,
        "nothing was written into {name}"
    );
}

#[tokio::test]
async fn hyper_volumes_ax_cannot_maintain_are_refused_untouched() {
    let (sheep, addr) = start(0).await;
    let dir = workdir("hyper-refuse");
    let img = dir.join("disk.img");
    std::fs::write(&img, pattern(4 * OBJ_SIZE, 5)).expect("write");
    let backend = Arc::new(SheepdogBackend::new(&addr));

    // A depth-2 B-tree: dog reads it; ax refuses to write into it and leaves every byte as it was.
    let vid = depth_two_hyper(&sheep, "deep", 4);
    assert!(dog_read(&sheep.lock(), vid).expect("dog reads depth 2")[OBJ_SIZE * 3] == 4);
    refused_untouched(&sheep, &backend, "deep", &img, "depth 2").await;

    // An unknown store_policy: refused, inode untouched.
    put_inode(&sheep, "odd", 2, &[]);
    refused_untouched(&sheep, &backend, "odd", &img, "store_policy 2").await;

    // A corrupt B-tree root (what ax used to leave behind: VDI ids over the header) is refused too.
    let vid = put_inode(&sheep, "torn", 1, &[0x25, 0x2b, 0x7c, 0x00]);
    assert!(dog_read(&sheep.lock(), vid)
        .expect_err("dog fails")
        .contains("B-tree"));
    refused_untouched(&sheep, &backend, "torn", &img, "B-tree magic").await;
    std::fs::remove_dir_all(&dir).ok();
}

#[tokio::test]
async fn gateway_dies_mid_upload_and_the_next_one_takes_over() {
    let sheep = start_cluster(0, 3).await;
    let addrs = sheep.addrs();
    let backend = Arc::new(SheepdogBackend::with_gateways(&addrs, 4));
    let dir = workdir("gateway-dies");
    let img = dir.join("disk.img");
    let data = pattern(12 * OBJ_SIZE, 6);
    std::fs::write(&img, &data).expect("write");
    // The gateway in use dies after the 5th object write (a request in flight on it is lost).
    sheep.faults.kill_gateway.store(0, Ordering::SeqCst);
    sheep.faults.kill_after_writes.store(5, Ordering::SeqCst);
    let r = replicate(
        backend.clone(),
        "vm",
        &img,
        &ReplicateOptions::default(),
        &quiet,
    )
    .await
    .expect("the upload finishes through the other gateways");
    assert_eq!(r.version, 1);
    assert_ne!(
        backend.client().gateway(),
        addrs[0],
        "moved off the dead gateway"
    );
    assert!(
        TcpStream::connect(&addrs[0]).await.is_err(),
        "gateway 0 is dead"
    );
    assert!(holds(
        &dog_read_version(&sheep, "vm", 1).expect("dog"),
        &data
    ));
    assert_restores(backend.as_ref(), "vm", 1, &data, &dir).await;
    std::fs::remove_dir_all(&dir).ok();
}

#[tokio::test]
async fn gateway_drops_connections_mid_request_and_the_request_is_sent_again() {
    let sheep = start_cluster(0, 2).await;
    let addrs = sheep.addrs();
    let backend = Arc::new(SheepdogBackend::with_gateways(&addrs, 2));
    let dir = workdir("gateway-drops");
    let img = dir.join("disk.img");
    let data = pattern(6 * OBJ_SIZE + 77, 7);
    std::fs::write(&img, &data).expect("write");
    // Every 2nd request that changes state — VDI creation, object creations and writes, inode
    // updates, the snapshot, the catalog — is applied and then its connection drops before the reply.
    sheep.faults.drop_every.store(2, Ordering::SeqCst);
    sheep.faults.drops_left.store(1000, Ordering::SeqCst);
    replicate(
        backend.clone(),
        "vm",
        &img,
        &ReplicateOptions::default(),
        &quiet,
    )
    .await
    .expect("v1 despite dropped connections");
    let mut data2 = data.clone();
    data2[3 * OBJ_SIZE + 5] ^= 9;
    std::fs::write(&img, &data2).expect("write");
    let r2 = replicate(
        backend.clone(),
        "vm",
        &img,
        &ReplicateOptions::default(),
        &quiet,
    )
    .await
    .expect("v2 despite dropped connections");
    assert_eq!(r2.version, 2);
    let dropped = 1000 - sheep.faults.drops_left.load(Ordering::SeqCst);
    assert!(dropped >= 10, "only {dropped} connections were dropped");
    sheep.faults.drop_every.store(0, Ordering::SeqCst);
    assert!(holds(
        &dog_read_version(&sheep, "vm", 1).expect("dog"),
        &data
    ));
    assert!(holds(
        &dog_read_version(&sheep, "vm", 2).expect("dog"),
        &data2
    ));
    assert_restores(backend.as_ref(), "vm", 1, &data, &dir).await;
    assert_restores(backend.as_ref(), "vm", 2, &data2, &dir).await;
    std::fs::remove_dir_all(&dir).ok();
}

#[tokio::test]
async fn every_gateway_down_is_an_error_naming_the_gateway() {
    let sheep = start_cluster(0, 2).await;
    let addrs = sheep.addrs();
    sheep.kill(0);
    sheep.kill(1);
    let client = SheepClient::with_gateways(&addrs, 1);
    let err = client.lookup_vdi("x").await.expect_err("all down");
    let msg = err.to_string();
    assert!(
        addrs.iter().any(|a| msg.contains(a.as_str())) && msg.contains("connect"),
        "{msg}"
    );
}

#[tokio::test]
async fn concurrent_uploads_use_several_connections() {
    let sheep = start_cluster(0, 1).await;
    sheep.faults.write_delay_ms.store(30, Ordering::SeqCst);
    let backend = Arc::new(SheepdogBackend::with_gateways(&sheep.addrs(), 4));
    let dir = workdir("concurrency");
    let img = dir.join("disk.img");
    let data = pattern(8 * OBJ_SIZE, 8);
    std::fs::write(&img, &data).expect("write");
    let opts = ReplicateOptions {
        changes: Changes::Hashes,
        concurrency: 4,
    };
    replicate(backend.clone(), "vm", &img, &opts, &quiet)
        .await
        .expect("v1");
    let peak = sheep.max_in_flight.load(Ordering::SeqCst);
    assert!(
        peak >= 2,
        "object writes overlapped: at most {peak} at once"
    );
    assert_restores(backend.as_ref(), "vm", 1, &data, &dir).await;
    std::fs::remove_dir_all(&dir).ok();
}

#[tokio::test]
async fn interrupted_by_the_backend_going_away_keeps_the_previous_version() {
    let sheep = start_cluster(0, 2).await;
    let backend = Arc::new(SheepdogBackend::with_gateways(&sheep.addrs(), 2));
    let dir = workdir("interrupted-gone");
    let img = dir.join("disk.img");
    let v1 = pattern(8 * OBJ_SIZE, 10);
    std::fs::write(&img, &v1).expect("write");
    replicate(
        backend.clone(),
        "vm",
        &img,
        &ReplicateOptions::default(),
        &quiet,
    )
    .await
    .expect("v1");

    // Version 2 changes every chunk; the cluster goes away after 3 of them were written.
    let v2 = pattern(8 * OBJ_SIZE, 11);
    std::fs::write(&img, &v2).expect("write");
    let base = sheep.data_writes.load(Ordering::SeqCst);
    sheep
        .faults
        .down_after_writes
        .store(base + 3, Ordering::SeqCst);
    let opts = ReplicateOptions {
        changes: Changes::Hashes,
        concurrency: 1,
    };
    let err = replicate(backend.clone(), "vm", &img, &opts, &quiet)
        .await
        .expect_err("the cluster went away");
    assert!(err.to_string().contains("sheep"), "{err}");

    // The cluster comes back: version 1 is still the newest, bit-exact, for ax and for dog.
    sheep.faults.down_after_writes.store(0, Ordering::SeqCst);
    sheep.faults.down.store(false, Ordering::SeqCst);
    let fresh = SheepdogBackend::new(&sheep.addrs()[1]);
    assert_eq!(fresh.list_versions("vm").await.expect("list"), vec![1]);
    assert_restores(&fresh, "vm", 1, &v1, &dir).await;
    assert!(holds(&dog_read_version(&sheep, "vm", 1).expect("dog"), &v1));

    // The next version is 2 (never reused) and correct, although its content equals version 1 in
    // the chunks the failed run had overwritten: those are rewritten, not trusted.
    std::fs::write(&img, &v1).expect("write");
    let r = replicate(
        Arc::new(fresh),
        "vm",
        &img,
        &ReplicateOptions::default(),
        &quiet,
    )
    .await
    .expect("v2");
    assert_eq!(r.version, 2);
    assert!(
        r.uploaded >= 2,
        "the chunks the failed run wrote were rewritten: {r:?}"
    );
    let again = SheepdogBackend::new(&sheep.addrs()[0]);
    assert_restores(&again, "vm", 2, &v1, &dir).await;
    assert_restores(&again, "vm", 1, &v1, &dir).await;
    {
        let st = sheep.lock();
        assert!(holds(&dog_read(&st, st.vdis["vm"]).expect("dog"), &v1));
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// Entry point of the child process that [`interrupted_by_killing_the_agent_keeps_the_previous_version`]
/// kills mid-run; does nothing in a normal test run.
#[tokio::test]
async fn child_replicator_for_the_kill_test() {
    let (Ok(addr), Ok(img)) = (
        std::env::var("AX_SHEEP_CHILD_ADDR"),
        std::env::var("AX_SHEEP_CHILD_IMG"),
    ) else {
        return;
    };
    let b = Arc::new(SheepdogBackend::new(&addr));
    let _ = replicate(
        b,
        "vm",
        std::path::Path::new(&img),
        &ReplicateOptions::default(),
        &quiet,
    )
    .await;
    std::process::exit(3); // never reached: the parent kills this process mid-run
}

#[tokio::test]
async fn interrupted_by_killing_the_agent_keeps_the_previous_version() {
    let sheep = start_cluster(0, 1).await;
    let addr = sheep.addrs()[0].clone();
    let backend = Arc::new(SheepdogBackend::new(&addr));
    let dir = workdir("interrupted-kill");
    let img = dir.join("disk.img");
    let v1 = pattern(8 * OBJ_SIZE, 12);
    std::fs::write(&img, &v1).expect("write");
    replicate(
        backend.clone(),
        "vm",
        &img,
        &ReplicateOptions::default(),
        &quiet,
    )
    .await
    .expect("v1");

    // Another process replicates version 2 and is killed (SIGKILL) while its object writes are in flight.
    let img2 = dir.join("disk2.img");
    std::fs::write(&img2, pattern(8 * OBJ_SIZE, 13)).expect("write");
    let base = sheep.data_writes.load(Ordering::SeqCst);
    sheep
        .faults
        .hold_after_writes
        .store(base + 3, Ordering::SeqCst);
    let mut child = std::process::Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "--exact",
            "child_replicator_for_the_kill_test",
            "--nocapture",
        ])
        .env("AX_SHEEP_CHILD_ADDR", &addr)
        .env("AX_SHEEP_CHILD_IMG", &img2)
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("spawn the child");
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while sheep.data_writes.load(Ordering::SeqCst) <= base + 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "the child never got mid-run"
        );
        assert!(
            child.try_wait().expect("wait").is_none(),
            "the child ended early"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    child.kill().expect("SIGKILL");
    let status = child.wait().expect("reap");
    {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(9), "killed, not finished: {status:?}");
    }
    sheep.faults.hold_after_writes.store(0, Ordering::SeqCst);

    // An agent restarting afterwards finds version 1, whole.
    let fresh = Arc::new(SheepdogBackend::new(&addr));
    assert_eq!(
        latest(fresh.as_ref(), "vm")
            .await
            .expect("latest")
            .map(|m| m.version),
        Some(1)
    );
    assert_restores(fresh.as_ref(), "vm", 1, &v1, &dir).await;
    // And its next version is 2, bit-exact (the killed run's objects are rewritten).
    let v2 = pattern(8 * OBJ_SIZE, 14);
    std::fs::write(&img, &v2).expect("write");
    let r = replicate(
        fresh.clone(),
        "vm",
        &img,
        &ReplicateOptions::default(),
        &quiet,
    )
    .await
    .expect("v2");
    assert_eq!(r.version, 2);
    assert_restores(fresh.as_ref(), "vm", 2, &v2, &dir).await;
    assert_restores(fresh.as_ref(), "vm", 1, &v1, &dir).await;
    std::fs::remove_dir_all(&dir).ok();
}

#[tokio::test]
async fn a_server_that_lies_about_lengths_is_an_error_not_a_panic() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let mut h = [0u8; HEADER_LEN];
            if s.read_exact(&mut h).await.is_err() {
                continue;
            }
            let Ok(req) = Request::decode(&h) else {
                continue;
            };
            let rsp = Response {
                proto_ver: 0,
                opcode: req.opcode,
                flags: 0,
                epoch: 0,
                id: req.id,
                data_length: u32::MAX, // far more than asked for
                result: 0,
                tail: [0; 28],
            };
            let _ = s.write_all(&rsp.encode()).await;
        }
    });
    let client = SheepClient::new(&addr);
    let err = client.read_obj(1, 0, 16).await.expect_err("too long");
    assert!(
        err.to_string().contains("data_length = 4294967295"),
        "{err}"
    );
}

/// Prints ax's upload and restore throughput against the fake sheep, with one and with four requests
/// in flight, each object write taking 100 ms in the fake (a stand-in for a cluster's write latency).
/// Not a yardstick for Sheepdog (the compares with `dog vdi write`/`read` on a real cluster):
/// it measures ax's client and how much several connections overlap. Nothing is asserted on time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_and_restore_figures_against_the_fake_sheep() {
    let dir = workdir("figures");
    let img = dir.join("disk.img");
    let data = pattern(64 << 20, 15);
    std::fs::write(&img, &data).expect("write");
    for concurrency in [1usize, 4] {
        let sheep = start_cluster(0, 1).await;
        sheep.faults.write_delay_ms.store(100, Ordering::SeqCst);
        let b = Arc::new(SheepdogBackend::with_gateways(&sheep.addrs(), concurrency));
        let opts = ReplicateOptions {
            changes: Changes::Hashes,
            concurrency,
        };
        let r = replicate(b.clone(), "bench", &img, &opts, &quiet)
            .await
            .expect("replicate");
        let out = dir.join("restored.img");
        let rr = restore(b.as_ref(), "bench", 1, &out, &quiet)
            .await
            .expect("restore");
        println!(
            "fake sheep, 64 MiB, 100 ms per object write, concurrency {concurrency}: upload {:.1} MB/s \
             (peak {} writes in flight), restore {:.1} MB/s",
            r.image_mb_s(),
            sheep.max_in_flight.load(Ordering::SeqCst),
            rr.mb_s()
        );
    }
    std::fs::remove_dir_all(&dir).ok();
}
