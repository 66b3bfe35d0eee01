//! The Sheepdog client's flow against an in-test fake `sheep` that speaks the same codec.
//!
//! No real `sheep` exists on this machine (sheepdog is not packaged any more): the fake keeps objects in
//! memory, checks what a real sheep checks (protocol byte, lengths, object existence, epoch) and, like a
//! cluster changing membership, refuses requests that carry a stale epoch so the client's retry path runs.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use evacuate::volume::sheepdog::{
    inode_oid, opcode, result, vdi_hash, Body, Request, Response, SheepClient, SheepdogBackend,
    HEADER_LEN, INODE_DATA_VDI_ID, PROTO_VER,
};
use evacuate::volume::{
    prune, replicate, restore, Changes, Progress, ReplicateOptions, CHUNK_SIZE,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

mod common;
use common::pattern;

const OBJ_SIZE: usize = CHUNK_SIZE as usize;
const INODE_SIZE: usize = INODE_DATA_VDI_ID as usize + 4 * (1 << 20);

#[derive(Default)]
struct Store {
    objects: HashMap<u64, Vec<u8>>,
    vdis: HashMap<String, u32>,
}

struct FakeSheep {
    store: Mutex<Store>,
    epoch: AtomicU32,
    /// Bump the epoch after this many requests (0: never).
    bump_every: u64,
    requests: AtomicU64,
    creates: AtomicU64,
    writes: AtomicU64,
}

impl FakeSheep {
    fn lock(&self) -> std::sync::MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|e| e.into_inner())
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
                    block_size_shift,
                    ..
                },
            ) => {
                let name = cstr(payload);
                if payload.len() != 256 || name.is_empty() || block_size_shift != 22 {
                    return (result::INVALID_PARMS, none, Vec::new());
                }
                if st.vdis.contains_key(&name) {
                    return (result::VDI_EXIST, none, Vec::new());
                }
                let mut vid = vdi_hash(&name);
                while st.vdis.values().any(|&v| v == vid) {
                    vid = (vid + 1) & 0xFF_FFFF;
                }
                let mut inode = vec![0u8; INODE_SIZE];
                inode[..name.len()].copy_from_slice(name.as_bytes());
                inode[536..544].copy_from_slice(&vdi_size.to_le_bytes());
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
                match st.vdis.get(&cstr(&payload[..256])) {
                    Some(&vid) => (result::SUCCESS, Response::vdi_reply(vid, 3, 22), Vec::new()),
                    None => (result::NO_VDI, none, Vec::new()),
                }
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

async fn serve_conn(sheep: Arc<FakeSheep>, mut s: TcpStream) -> std::io::Result<()> {
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
        let (res, tail, data) = sheep.handle(&req, &payload);
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

async fn start(bump_every: u64) -> (Arc<FakeSheep>, String) {
    let sheep = Arc::new(FakeSheep {
        store: Mutex::new(Store::default()),
        epoch: AtomicU32::new(1),
        bump_every,
        requests: AtomicU64::new(0),
        creates: AtomicU64::new(0),
        writes: AtomicU64::new(0),
    });
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let s = sheep.clone();
    tokio::spawn(async move {
        while let Ok((conn, _)) = listener.accept().await {
            tokio::spawn(serve_conn(s.clone(), conn));
        }
    });
    (sheep, addr)
}

fn quiet(_: Progress) {}

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

    let oid = evacuate::volume::sheepdog::data_oid(vid, 2);
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
async fn replicate_and_restore_through_a_vdi() {
    let (sheep, addr) = start(0).await;
    let backend = Arc::new(SheepdogBackend::new(&addr));
    let dir = std::env::temp_dir().join(format!("ax-sheep-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let img = dir.join("disk.img");
    let size = 5 * OBJ_SIZE + 1000;
    let mut data = pattern(size, 9);
    std::fs::write(&img, &data).expect("write");

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
    // Six data objects created, plus the manifest VDI's first object.
    assert_eq!(sheep.creates.load(Ordering::Relaxed), 7);

    data[OBJ_SIZE * 4 + 17] ^= 0xA5;
    std::fs::write(&img, &data).expect("write");
    let writes_before = sheep.writes.load(Ordering::Relaxed);
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
    // One data object rewritten in place; the manifest withdrawn and stored again (two writes).
    assert_eq!(sheep.writes.load(Ordering::Relaxed) - writes_before, 3);
    assert_eq!(
        sheep.creates.load(Ordering::Relaxed),
        7,
        "no new allocation"
    );

    // A fresh client (as after a restart) restores the latest version bit-exact.
    let fresh = SheepdogBackend::new(&addr);
    let out = dir.join("restored.img");
    restore(&fresh, "vm-disk", 2, &out, &quiet)
        .await
        .expect("restore");
    assert!(std::fs::read(&out).expect("read") == data);
    let err = restore(&fresh, "vm-disk", 1, &out, &quiet)
        .await
        .expect_err("only the latest is held");
    assert!(err.to_string().contains("version 1 not held"), "{err}");
    assert!(prune(&fresh, "vm-disk", 1)
        .await
        .expect("prune")
        .deleted_versions
        .is_empty());

    // A corrupted object is detected on restore.
    {
        let mut st = sheep.lock();
        let vid = st.vdis["vm-disk"];
        let obj = st
            .objects
            .get_mut(&evacuate::volume::sheepdog::data_oid(vid, 1))
            .expect("object 1");
        obj[5] ^= 1;
    }
    let err = restore(&fresh, "vm-disk", 2, &out, &quiet)
        .await
        .expect_err("corrupt");
    assert!(
        err.to_string().contains("chunk 1: sha256 mismatch"),
        "{err}"
    );
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
