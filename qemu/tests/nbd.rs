//! The NBD client against a real `qemu-nbd`: a qcow2 image with data, holes and a dirty bitmap.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ax_qemu::nbd::{self, ConnectOptions, NbdError, ReadChunk};

const M: u64 = 1 << 20;

fn have(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn run(cmd: &mut Command) {
    let out = cmd.output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ax-nbd-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

struct Server(Child);
impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A 16 MiB qcow2: 0x5a in 0..1M, a hole after; bitmap `b0` (disabled) holds one write at 4M+64K.
fn image(dir: &Path) -> PathBuf {
    let img = dir.join("d.qcow2");
    let p = img.to_str().unwrap();
    run(Command::new("qemu-img").args(["create", "-q", "-f", "qcow2", p, "16M"]));
    run(Command::new("qemu-io").args(["-c", "write -P 0x5a 0 1M", p]));
    run(Command::new("qemu-img").args(["bitmap", "--add", p, "b0"]));
    run(Command::new("qemu-io").args(["-c", "write -P 0x11 4M 64k", p]));
    run(Command::new("qemu-img").args(["bitmap", "--disable", p, "b0"]));
    img
}

fn serve(img: &Path, addr: &[&str]) -> Server {
    let child = Command::new("qemu-nbd")
        .args(["-r", "-t", "-f", "qcow2", "-x", "disk", "-B", "b0"])
        .args(addr)
        .arg(img)
        .stdout(Stdio::null())
        .spawn()
        .expect("qemu-nbd");
    Server(child)
}

async fn wait_for_socket(p: &Path) {
    let t = Instant::now();
    while !p.exists() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "qemu-nbd did not start"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn reads_data_holes_and_the_dirty_bitmap_from_qemu_nbd() {
    if !have("qemu-nbd") {
        println!("SKIPPED: qemu-nbd not installed");
        return;
    }
    let dir = tmpdir("unix");
    let img = image(&dir);
    let sock = dir.join("nbd.sock");
    let _server = serve(&img, &["--socket", sock.to_str().unwrap()]);
    wait_for_socket(&sock).await;

    let opts = ConnectOptions::new("disk")
        .context("base:allocation")
        .context("qemu:dirty-bitmap:b0");
    let mut c = nbd::connect_unix(&sock, &opts).await.unwrap();
    assert_eq!(c.size(), 16 * M);
    assert!(c.structured());
    assert_ne!(c.info().flags & nbd::FLAG_READ_ONLY, 0);

    let data = c.read(M - 4096, 8192).await.unwrap();
    assert!(data[..4096].iter().all(|&b| b == 0x5a));
    assert!(data[4096..].iter().all(|&b| b == 0));
    let data = c.read(4 * M, 64 << 10).await.unwrap();
    assert!(data.iter().all(|&b| b == 0x11));
    // A read larger than the server's maximum block is split.
    let big = c.read(0, 40 * M / 4).await.unwrap();
    assert_eq!(big.len() as u64, 10 * M);

    // An unallocated range comes back as a hole chunk, not as zero bytes on the wire.
    let chunks = c.read_chunks(8 * M, 1 << 20).await.unwrap();
    assert!(
        chunks.iter().all(|c| matches!(c, ReadChunk::Hole { .. })),
        "{chunks:?}"
    );

    let bm = c.context_id("qemu:dirty-bitmap:b0").unwrap();
    let dirty: Vec<_> = c
        .extents(bm, 0..16 * M)
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.flags & nbd::STATE_DIRTY != 0)
        .map(|e| e.offset..e.offset + e.len)
        .collect();
    assert_eq!(dirty, vec![4 * M..4 * M + (64 << 10)]);

    let alloc = c.context_id("base:allocation").unwrap();
    let ext = c.extents(alloc, 0..16 * M).await.unwrap();
    assert_eq!(ext.first().unwrap().flags & nbd::STATE_HOLE, 0, "{ext:?}");
    assert_eq!(ext.first().unwrap().len, M);
    assert_eq!(ext.iter().map(|e| e.len).sum::<u64>(), 16 * M);

    // Requests outside the export are refused locally.
    assert!(matches!(
        c.read(16 * M - 10, 20).await.unwrap_err(),
        NbdError::Request(_)
    ));
    c.disconnect().await.unwrap();

    // An unknown export is an option refusal.
    let e = nbd::connect_unix(&sock, &ConnectOptions::new("nope"))
        .await
        .unwrap_err();
    assert!(matches!(e, NbdError::OptionRefused { .. }), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn reads_over_tcp() {
    if !have("qemu-nbd") {
        println!("SKIPPED: qemu-nbd not installed");
        return;
    }
    let dir = tmpdir("tcp");
    let img = image(&dir);
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let _server = serve(&img, &["-b", "127.0.0.1", "-p", &port.to_string()]);
    let t = Instant::now();
    let mut c = loop {
        match nbd::connect_tcp(("127.0.0.1", port), &ConnectOptions::new("disk")).await {
            Ok(c) => break c,
            Err(e) => {
                assert!(t.elapsed() < Duration::from_secs(10), "{e}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    let data = c.read(0, 4096).await.unwrap();
    assert!(data.iter().all(|&b| b == 0x5a));
    c.disconnect().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
