//! Volume replication against a real Swift (`tests/e2e/swift.sh` starts one and sets the variables).
//!
//! `AX_SWIFT_AUTH_URL` (TempAuth, e.g. `http://127.0.0.1:8080/auth/v1.0`), `AX_SWIFT_USER`
//! (default `test:tester`), `AX_SWIFT_KEY` (default `testing`). Without `AX_SWIFT_AUTH_URL` every test
//! prints `SKIPPED: …` and returns. Each test works in its own container.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use evacuate::auth::TokenSource;
use evacuate::volume::swift::{SwiftBackend, SwiftConfig, SwiftError, TempAuth};
use evacuate::volume::{
    prune, replicate, restore, Backend, BackendError, Changes, ChunkRef, Manifest, Progress,
    ReplicateOptions, VolumeError, CHUNK_SIZE,
};
use sha2::{Digest, Sha256};

mod common;
use common::{pattern, restores_exactly};

const MIB: usize = 1 << 20;

type Swift = SwiftBackend<TempAuth>;

fn backend(test: &str) -> Option<Arc<Swift>> {
    let Ok(url) = std::env::var("AX_SWIFT_AUTH_URL") else {
        println!(
            "SKIPPED: AX_SWIFT_AUTH_URL is not set (tests/e2e/swift.sh starts a Swift and sets it)"
        );
        return None;
    };
    let user = std::env::var("AX_SWIFT_USER").unwrap_or_else(|_| "test:tester".into());
    let key = std::env::var("AX_SWIFT_KEY").unwrap_or_else(|_| "testing".into());
    let container = format!("axtest-{test}-{}", std::process::id());
    let b = SwiftBackend::new(
        TempAuth::new(&url, &user, &key),
        SwiftConfig::new(&container),
    )
    .expect("valid container name");
    Some(Arc::new(b))
}

fn workdir(test: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ax-swift-{test}-{}", std::process::id()));
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

fn quiet(_: Progress) {}

/// Writes `len` bytes of new content at `offset` of `data` and returns the range.
fn scribble(data: &mut [u8], offset: usize, len: usize, seed: u64) -> std::ops::Range<u64> {
    data[offset..offset + len].copy_from_slice(&pattern(len, seed));
    offset as u64..(offset + len) as u64
}

async fn segments(b: &Swift, image: &str) -> Vec<String> {
    b.list_objects(&format!("{image}/segments/"))
        .await
        .expect("list segments")
}

#[tokio::test]
async fn replicate_change_blocks_replicate_again_restore_each_version() {
    let Some(b) = backend("versions") else { return };
    let dir = workdir("versions");
    let img = dir.join("disk.img");
    let mut data = pattern(64 * MIB, 1);
    std::fs::write(&img, &data).expect("write image");
    let mut versions = vec![data.clone()];

    let last = AtomicU64::new(0);
    let progress = |p: Progress| {
        assert!(p.bytes_done <= p.bytes_total);
        last.store(p.bytes_done, Ordering::Relaxed);
    };
    let r1 = replicate(
        b.clone(),
        "vm1",
        &img,
        &ReplicateOptions::default(),
        &progress,
    )
    .await
    .expect("v1");
    assert_eq!(
        (r1.version, r1.chunks, r1.changed, r1.uploaded),
        (1, 16, 16, 16)
    );
    assert_eq!(
        last.load(Ordering::Relaxed),
        64 * MIB as u64,
        "progress reached the end"
    );
    println!(
        "v1: 64 MiB in {:.2?} = {:.1} MB/s",
        r1.elapsed,
        r1.image_mb_s()
    );

    // A few 4 KiB writes in chunks 1, 7 and 15; found by hashing.
    scribble(&mut data, MIB * 4 + 4096, 4096, 2);
    scribble(&mut data, MIB * 28 + 100, 512, 3);
    scribble(&mut data, MIB * 64 - 4096, 4096, 4);
    std::fs::write(&img, &data).expect("write image");
    versions.push(data.clone());
    let r2 = replicate(b.clone(), "vm1", &img, &ReplicateOptions::default(), &quiet)
        .await
        .expect("v2");
    assert_eq!((r2.version, r2.changed, r2.uploaded), (2, 3, 3), "{r2:?}");
    assert_eq!(r2.bytes_uploaded, 3 * CHUNK_SIZE);

    // Writes in chunks 4 and 5 (one write across the boundary), told by a write log.
    let w = scribble(&mut data, MIB * 24 - 1000, 2000, 5);
    std::fs::write(&img, &data).expect("write image");
    versions.push(data.clone());
    let opts = ReplicateOptions {
        changes: Changes::WriteLog(vec![w]),
        concurrency: 4,
    };
    let r3 = replicate(b.clone(), "vm1", &img, &opts, &quiet)
        .await
        .expect("v3");
    assert_eq!((r3.version, r3.changed, r3.uploaded), (3, 2, 2), "{r3:?}");
    assert_eq!(segments(&b, "vm1").await.len(), 16 + 3 + 2);
    assert_eq!(b.list_versions("vm1").await.expect("list"), vec![1, 2, 3]);

    for (i, want) in versions.iter().enumerate() {
        let out = dir.join(format!("restored-{}.img", i + 1));
        let rr = restore(b.as_ref(), "vm1", i as u64 + 1, &out, &quiet)
            .await
            .expect("restore");
        let got = std::fs::read(&out).expect("read restored");
        assert!(got == *want, "version {} is not bit-exact", i + 1);
        println!("restore v{}: {:.1} MB/s", i + 1, rr.mb_s());
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// A backend that fails every chunk upload after the first `ok` (a crash midway), or with `stall`
/// never answers again (a process frozen mid-run).
#[derive(Debug)]
struct FailAfter {
    inner: Arc<Swift>,
    ok: u64,
    puts: AtomicU64,
    stall: bool,
}

#[derive(Debug, thiserror::Error)]
#[error("injected failure after {0} chunk uploads")]
struct Injected(u64);

impl Backend for FailAfter {
    fn content_addressed(&self) -> bool {
        true
    }
    async fn has_chunk(&self, image: &str, chunk: &ChunkRef) -> Result<bool, BackendError> {
        self.inner.has_chunk(image, chunk).await
    }
    async fn put_chunk(
        &self,
        image: &str,
        chunk: &ChunkRef,
        data: Vec<u8>,
    ) -> Result<(), BackendError> {
        if self.puts.fetch_add(1, Ordering::SeqCst) >= self.ok {
            if self.stall {
                std::future::pending::<()>().await;
            }
            return Err(Box::new(Injected(self.ok)));
        }
        self.inner.put_chunk(image, chunk, data).await
    }
    async fn get_chunk(
        &self,
        image: &str,
        version: u64,
        chunk: &ChunkRef,
    ) -> Result<Vec<u8>, BackendError> {
        self.inner.get_chunk(image, version, chunk).await
    }
    async fn put_manifest(&self, manifest: &Manifest) -> Result<(), BackendError> {
        self.inner.put_manifest(manifest).await
    }
    async fn get_manifest(&self, image: &str, version: u64) -> Result<Manifest, BackendError> {
        self.inner.get_manifest(image, version).await
    }
    async fn list_versions(&self, image: &str) -> Result<Vec<u64>, BackendError> {
        self.inner.list_versions(image).await
    }
    async fn delete_version(
        &self,
        manifest: &Manifest,
        orphans: &[ChunkRef],
    ) -> Result<(), BackendError> {
        self.inner.delete_version(manifest, orphans).await
    }
}

#[tokio::test]
async fn killed_midway_then_resumed_without_resending() {
    let Some(b) = backend("resume") else { return };
    let dir = workdir("resume");
    let img = dir.join("disk.img");
    let data = pattern(64 * MIB, 11);
    std::fs::write(&img, &data).expect("write image");

    let failing = Arc::new(FailAfter {
        inner: b.clone(),
        ok: 6,
        puts: AtomicU64::new(0),
        stall: false,
    });
    let opts = ReplicateOptions {
        changes: Changes::Hashes,
        concurrency: 1,
    };
    let err = replicate(failing, "vm2", &img, &opts, &quiet)
        .await
        .expect_err("crash");
    assert!(err.to_string().contains("injected failure"), "{err}");
    assert!(
        b.list_versions("vm2").await.expect("list").is_empty(),
        "no version without a manifest"
    );
    let present = segments(&b, "vm2").await.len() as u64;
    assert_eq!(present, 6);

    let r = replicate(b.clone(), "vm2", &img, &ReplicateOptions::default(), &quiet)
        .await
        .expect("resume");
    assert_eq!((r.version, r.changed), (1, 16));
    assert_eq!(
        (r.uploaded, r.already_stored),
        (16 - present, present),
        "segments already there are not re-sent"
    );
    let out = dir.join("restored.img");
    restore(b.as_ref(), "vm2", 1, &out, &quiet)
        .await
        .expect("restore");
    assert!(std::fs::read(&out).expect("read") == data);

    // The whole version is also readable as one Swift object (the SLO).
    let token = TempAuth::new(
        &std::env::var("AX_SWIFT_AUTH_URL").expect("set"),
        &std::env::var("AX_SWIFT_USER").unwrap_or_else(|_| "test:tester".into()),
        &std::env::var("AX_SWIFT_KEY").unwrap_or_else(|_| "testing".into()),
    )
    .token()
    .await
    .expect("token");
    let url = format!(
        "{}/{}/{}",
        token.endpoint.expect("storage url"),
        b.config().container,
        Swift::version_name("vm2", 1)
    );
    let body = reqwest::Client::new()
        .get(url)
        .header("X-Auth-Token", token.value)
        .send()
        .await
        .expect("GET SLO")
        .bytes()
        .await
        .expect("body");
    assert_eq!(Sha256::digest(&body), Sha256::digest(&data));
    std::fs::remove_dir_all(&dir).ok();
}

#[tokio::test]
async fn a_wrong_etag_is_retried_then_reported_never_ignored() {
    let Some(b) = backend("etag") else { return };
    let err = b
        .put_object_checked(
            "x/segments/bogus",
            bytes::Bytes::from_static(b"hello"),
            "00000000000000000000000000000000",
        )
        .await
        .expect_err("422");
    match &err {
        SwiftError::GaveUp { attempts, last, .. } => {
            assert_eq!(*attempts, b.config().max_attempts);
            assert!(
                matches!(**last, SwiftError::Status { status: 422, .. }),
                "{last}"
            );
        }
        other => panic!("want GaveUp after 422s, got {other}"),
    }
    assert!(b.list_objects("x/").await.expect("list").is_empty());
}

#[tokio::test]
async fn a_corrupted_segment_is_detected_on_restore() {
    let Some(b) = backend("corrupt") else { return };
    let dir = workdir("corrupt");
    let img = dir.join("disk.img");
    let data = pattern(16 * MIB, 21);
    std::fs::write(&img, &data).expect("write image");
    replicate(b.clone(), "vm3", &img, &ReplicateOptions::default(), &quiet)
        .await
        .expect("v1");
    let m = b.get_manifest("vm3", 1).await.expect("manifest");
    let victim = Swift::segment_name("vm3", &m.chunks[2].sha256);
    let mut bad = data[2 * 4 * MIB..3 * 4 * MIB].to_vec();
    bad[12345] ^= 0x40; // one flipped bit, same length
    b.put_object_unchecked(&victim, bad)
        .await
        .expect("overwrite segment");

    let err = restore(b.as_ref(), "vm3", 1, &dir.join("out.img"), &quiet)
        .await
        .expect_err("corruption must be detected");
    let msg = err.to_string();
    assert!(
        matches!(
            err,
            VolumeError::Backend {
                op: "get_chunk",
                ..
            }
        ),
        "{msg}"
    );
    assert!(
        msg.contains(&victim) && msg.contains("does not match the manifest"),
        "{msg}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[tokio::test]
async fn retention_prunes_old_versions_but_keeps_shared_segments() {
    let Some(b) = backend("retention") else {
        return;
    };
    let dir = workdir("retention");
    let img = dir.join("disk.img");
    let mut data = pattern(32 * MIB, 31);
    let mut versions = Vec::new();
    for v in 0..4u64 {
        if v > 0 {
            scribble(&mut data, (v as usize) * 4 * MIB + 77, 4096, 100 + v);
        }
        std::fs::write(&img, &data).expect("write image");
        versions.push(data.clone());
        replicate(b.clone(), "vm4", &img, &ReplicateOptions::default(), &quiet)
            .await
            .expect("replicate");
    }
    assert_eq!(segments(&b, "vm4").await.len(), 8 + 3);

    let p = prune(b.as_ref(), "vm4", 2).await.expect("prune");
    assert_eq!(p.deleted_versions, vec![1, 2]);
    // v1's chunk 1 (replaced in v2) and v2's chunk 2 (replaced in v3); everything else is shared.
    assert_eq!(p.deleted_chunks, 2);
    assert_eq!(segments(&b, "vm4").await.len(), 8 + 3 - 2);
    assert_eq!(b.list_versions("vm4").await.expect("list"), vec![3, 4]);
    for v in [3u64, 4] {
        let out = dir.join(format!("r{v}.img"));
        restore(b.as_ref(), "vm4", v, &out, &quiet)
            .await
            .expect("restore kept version");
        assert!(std::fs::read(&out).expect("read") == versions[v as usize - 1]);
    }

    // An image whose versions share nothing: the old one goes with `?multipart-manifest=delete`.
    let other = dir.join("other.img");
    for seed in [41, 42] {
        std::fs::write(&other, pattern(8 * MIB, seed)).expect("write");
        replicate(
            b.clone(),
            "vm5",
            &other,
            &ReplicateOptions::default(),
            &quiet,
        )
        .await
        .expect("replicate");
    }
    let p = prune(b.as_ref(), "vm5", 1).await.expect("prune");
    assert_eq!((p.deleted_versions.clone(), p.deleted_chunks), (vec![1], 2));
    assert_eq!(segments(&b, "vm5").await.len(), 2);
    restore(b.as_ref(), "vm5", 2, &dir.join("o2.img"), &quiet)
        .await
        .expect("restore");
    std::fs::remove_dir_all(&dir).ok();
}

#[tokio::test]
async fn interrupted_by_the_backend_failing_keeps_the_previous_version() {
    let Some(b) = backend("interrupted-fail") else {
        return;
    };
    let dir = workdir("interrupted-fail");
    let img = dir.join("disk.img");
    let v1 = pattern(32 * MIB, 51);
    std::fs::write(&img, &v1).expect("write image");
    replicate(b.clone(), "vm6", &img, &ReplicateOptions::default(), &quiet)
        .await
        .expect("v1");
    let v2 = pattern(32 * MIB, 52);
    std::fs::write(&img, &v2).expect("write image");
    let failing = Arc::new(FailAfter {
        inner: b.clone(),
        ok: 3,
        puts: AtomicU64::new(0),
        stall: false,
    });
    let opts = ReplicateOptions {
        changes: Changes::Hashes,
        concurrency: 1,
    };
    replicate(failing, "vm6", &img, &opts, &quiet)
        .await
        .expect_err("fails midway");
    assert_eq!(b.list_versions("vm6").await.expect("list"), vec![1]);
    restores_exactly(b.as_ref(), "vm6", 1, &v1, &dir).await;
    let r = replicate(b.clone(), "vm6", &img, &ReplicateOptions::default(), &quiet)
        .await
        .expect("v2");
    assert_eq!((r.version, r.already_stored), (2, 3), "{r:?}");
    restores_exactly(b.as_ref(), "vm6", 2, &v2, &dir).await;
    restores_exactly(b.as_ref(), "vm6", 1, &v1, &dir).await;
    std::fs::remove_dir_all(&dir).ok();
}

/// The child process [`interrupted_by_killing_the_agent_keeps_the_previous_version`] kills; does
/// nothing in a normal run.
#[tokio::test]
async fn child_replicator_for_the_swift_kill_test() {
    let (Ok(container), Ok(img)) = (
        std::env::var("AX_SWIFT_CHILD_CONTAINER"),
        std::env::var("AX_SWIFT_CHILD_IMG"),
    ) else {
        return;
    };
    let url = std::env::var("AX_SWIFT_AUTH_URL").expect("set by the parent");
    let user = std::env::var("AX_SWIFT_USER").unwrap_or_else(|_| "test:tester".into());
    let key = std::env::var("AX_SWIFT_KEY").unwrap_or_else(|_| "testing".into());
    let inner = Arc::new(
        SwiftBackend::new(
            TempAuth::new(&url, &user, &key),
            SwiftConfig::new(&container),
        )
        .expect("backend"),
    );
    let b = Arc::new(FailAfter {
        inner,
        ok: 3,
        puts: AtomicU64::new(0),
        stall: true,
    });
    let opts = ReplicateOptions {
        changes: Changes::Hashes,
        concurrency: 1,
    };
    let _ = replicate(b, "vm7", std::path::Path::new(&img), &opts, &quiet).await;
    std::process::exit(3); // never reached: the parent kills this process
}

#[tokio::test]
async fn interrupted_by_killing_the_agent_keeps_the_previous_version() {
    let Some(b) = backend("interrupted-kill") else {
        return;
    };
    let dir = workdir("interrupted-kill");
    let img = dir.join("disk.img");
    let v1 = pattern(32 * MIB, 61);
    std::fs::write(&img, &v1).expect("write image");
    replicate(b.clone(), "vm7", &img, &ReplicateOptions::default(), &quiet)
        .await
        .expect("v1");
    let before = segments(&b, "vm7").await.len();
    let img2 = dir.join("disk2.img");
    let v2 = pattern(32 * MIB, 62);
    std::fs::write(&img2, &v2).expect("write image");
    let mut child = std::process::Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "--exact",
            "child_replicator_for_the_swift_kill_test",
            "--nocapture",
        ])
        .env("AX_SWIFT_CHILD_CONTAINER", &b.config().container)
        .env("AX_SWIFT_CHILD_IMG", &img2)
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("spawn the child");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while segments(&b, "vm7").await.len() < before + 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "the child never got mid-run"
        );
        assert!(
            child.try_wait().expect("wait").is_none(),
            "the child ended early"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    child.kill().expect("SIGKILL");
    let status = child.wait().expect("reap");
    {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(9), "killed, not finished: {status:?}");
    }
    assert_eq!(b.list_versions("vm7").await.expect("list"), vec![1]);
    restores_exactly(b.as_ref(), "vm7", 1, &v1, &dir).await;
    let r = replicate(
        b.clone(),
        "vm7",
        &img2,
        &ReplicateOptions::default(),
        &quiet,
    )
    .await
    .expect("v2");
    assert_eq!(r.version, 2);
    assert_eq!(
        r.already_stored, 3,
        "the killed run's segments are reused: {r:?}"
    );
    restores_exactly(b.as_ref(), "vm7", 2, &v2, &dir).await;
    restores_exactly(b.as_ref(), "vm7", 1, &v1, &dir).await;
    std::fs::remove_dir_all(&dir).ok();
}
