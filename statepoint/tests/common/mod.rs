//! Shared helpers of the KVM tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rand::{RngExt, SeedableRng};
use statepoint::{EpochConfig, Replica, Statepointer, Vm, VmConfig};

/// Skips the test (loudly) when `/dev/kvm` is missing; otherwise does nothing.
#[macro_export]
macro_rules! require_kvm {
    () => {
        if let Err(why) = statepoint::kvm_available() {
            eprintln!("SKIPPED: {} needs /dev/kvm: {why}", module_path!());
            println!("SKIPPED: {} needs /dev/kvm: {why}", module_path!());
            return;
        }
    };
}

/// A seed from `AX_TEST_SEED` or the clock, printed so a failure can be replayed.
pub fn seed(test: &str) -> u64 {
    let seed = std::env::var("AX_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        });
    eprintln!("{test}: seed {seed} (replay with AX_TEST_SEED={seed})");
    seed
}

/// A seeded RNG.
pub fn rng(seed: u64) -> rand::rngs::StdRng {
    rand::rngs::StdRng::seed_from_u64(seed)
}

/// A temporary directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "ax-test-{name}-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.0.join(file)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Creates a zero-filled disk image.
pub fn make_disk(path: &Path, bytes: u64) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(bytes).unwrap();
}

/// A small VM config for tests.
pub fn config(image: &[u8], mem_mib: u64, vcpus: u8, args: &[u64]) -> VmConfig {
    VmConfig {
        mem_size: mem_mib << 20,
        vcpus,
        image: image.to_vec(),
        args: args.to_vec(),
        disk: None,
        manual_dirty_protect: true,
    }
}

/// A primary with a replica that receives every frame.
pub struct Pair {
    pub primary: Statepointer,
    pub replica: Replica,
    pub frame: Vec<u8>,
    pub epochs: u64,
}

impl Pair {
    pub fn new(config: VmConfig, replica_disk: Option<&Path>) -> Self {
        let epoch_config = EpochConfig {
            dirty_limit_pages: 4096,
            ..EpochConfig::default()
        };
        Self::with_epochs(config, replica_disk, epoch_config)
    }

    pub fn with_epochs(
        config: VmConfig,
        replica_disk: Option<&Path>,
        epoch_config: EpochConfig,
    ) -> Self {
        let mem = config.mem_size;
        let vm = Vm::try_from(config).expect("VM builds");
        let mut primary = Statepointer::new(vm, epoch_config).unwrap();
        let mut replica = Replica::new(mem, replica_disk).unwrap();
        let mut frame = Vec::new();
        primary.boot(&mut frame).expect("epoch 0");
        replica.apply(&frame).expect("replica applies epoch 0");
        Pair {
            primary,
            replica,
            frame,
            epochs: 1,
        }
    }

    /// Runs `n` epochs of random lengths in `1..=max_ms` ms, each applied to the replica.
    pub fn run_random_epochs(&mut self, rng: &mut impl rand::Rng, n: usize, max_ms: u64) {
        for _ in 0..n {
            let len = Duration::from_micros(rng.random_range(500..=max_ms * 1000));
            let r = self.primary.run_epoch(len, &mut self.frame).unwrap();
            assert_eq!(self.replica.apply(&self.frame).unwrap(), r.epoch);
            self.epochs += 1;
        }
    }

    /// One more epoch that leaves the primary paused at the checkpoint, applied to the replica.
    pub fn checkpoint_and_hold(&mut self, ms: u64) {
        let r = self
            .primary
            .run_epoch_and_hold(Duration::from_millis(ms), &mut self.frame)
            .unwrap();
        assert_eq!(self.replica.apply(&self.frame).unwrap(), r.epoch);
        self.epochs += 1;
    }

    /// Asserts the paused primary's memory equals the replica's, byte for byte.
    pub fn assert_memory_equal(&self) {
        let original = self.primary.vm().memory_snapshot().unwrap();
        let replica = self.replica.memory();
        assert_eq!(original.len(), replica.len());
        if original != replica {
            let pages: Vec<usize> = original
                .chunks(4096)
                .zip(replica.chunks(4096))
                .enumerate()
                .filter(|(_, (a, b))| a != b)
                .map(|(i, _)| i)
                .take(16)
                .collect();
            panic!("replica memory differs from the primary's at pages {pages:?}");
        }
    }
}

/// Runs `vm` (started) until its console output contains `lines` complete lines or `timeout` passes;
/// returns the output.
pub fn collect_lines(vm: &Vm, lines: usize, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    while Instant::now() < deadline {
        out.extend(vm.take_console());
        if out.iter().filter(|&&b| b == b'\n').count() >= lines {
            break;
        }
        if vm.exit().is_some() {
            out.extend(vm.take_console());
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    String::from_utf8(out).expect("console output is UTF-8")
}

/// Asserts that the complete lines of `text` are consecutive integers starting at 1.
/// A trailing partial line is ignored.
pub fn assert_counts_from_one(text: &str) -> u64 {
    let complete = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
    let mut expected = 1u64;
    for line in complete.lines() {
        let n: u64 = line
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("not a number: {line:?}"));
        assert_eq!(n, expected, "gap or duplicate in the output stream");
        expected += 1;
    }
    expected - 1
}
