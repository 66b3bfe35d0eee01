//! Checkpoint → restore continuity on real KVM: a replica built only from frames resumes exactly where
//! the original was, for the `counter`, `disk-writer` and `smp-counter` guests.

mod common;

use std::time::Duration;

use common::*;
use statepoint::{GuestExit, Pausable};

/// `counter` for many epochs of random lengths; restore from the last checkpoint in a new VM; the
/// restored guest's next line is exactly the next number, and at the checkpoint memory is equal.
#[test]
fn counter_restores_bit_exact_and_continues() {
    require_kvm!();
    let seed = seed("counter_restores_bit_exact_and_continues");
    let mut rng = rng(seed);
    let mut pair = Pair::new(config(ax_guests::COUNTER, 32, 1, &[100_000]), None);
    pair.run_random_epochs(&mut rng, 60, 8);
    pair.checkpoint_and_hold(3);
    pair.assert_memory_equal();

    let committed = String::from_utf8(pair.replica.output().to_vec()).unwrap();
    let last = assert_counts_from_one(&committed);
    assert!(
        last >= 5,
        "the guest printed only {last} lines in 60 epochs"
    );

    // The original, resumed, and the replica, restored, must produce the same continuation.
    let mut restored = pair.replica.restore().expect("restore");
    restored.start().unwrap();
    let after_restore = collect_lines(&restored, 5, Duration::from_secs(20));
    pair.primary.vm_mut().resume().unwrap();
    let after_original = collect_lines(pair.primary.vm(), 5, Duration::from_secs(20));

    let joined = format!("{committed}{after_restore}");
    let total = assert_counts_from_one(&joined);
    assert!(
        total >= last + 4,
        "restored guest printed too little: {after_restore:?}"
    );
    let common = after_restore.len().min(after_original.len());
    assert_eq!(
        after_restore[..common],
        after_original[..common],
        "restored and original continuations differ"
    );
    assert_eq!(restored.exit(), None);
}

/// `disk-writer`: disk image and memory equal at the checkpoint; the restored guest keeps verifying its
/// own earlier writes (it exits 2 on a mismatch) and its output continues.
#[test]
fn disk_writer_restores_disk_and_memory() {
    require_kvm!();
    let seed = seed("disk_writer_restores_disk_and_memory");
    let mut rng = rng(seed);
    let dir = TempDir::new("disk");
    let (primary_disk, replica_disk) = (dir.path("primary.img"), dir.path("replica.img"));
    make_disk(&primary_disk, 2 << 20);
    make_disk(&replica_disk, 2 << 20);
    let mut cfg = config(ax_guests::DISK_WRITER, 32, 1, &[8, 0, 1]);
    cfg.disk = Some(primary_disk.clone());
    let mut pair = Pair::new(cfg, Some(&replica_disk));
    pair.run_random_epochs(&mut rng, 50, 6);
    pair.checkpoint_and_hold(3);
    pair.assert_memory_equal();
    pair.replica.sync_disk().unwrap();
    let a = std::fs::read(&primary_disk).unwrap();
    let b = std::fs::read(&replica_disk).unwrap();
    assert!(a.iter().any(|&x| x != 0), "the guest wrote nothing");
    assert!(
        a == b,
        "replica disk differs from the primary's at the checkpoint"
    );

    let committed = String::from_utf8(pair.replica.output().to_vec()).unwrap();
    let last = assert_counts_from_one(&committed);
    assert!(last >= 3, "only {last} batches in 50 epochs");
    drop(pair.primary); // the primary "fails": its disk is no longer used
    let mut restored = pair.replica.restore().expect("restore");
    restored.start().unwrap();
    let after = collect_lines(&restored, 20, Duration::from_secs(20));
    assert_eq!(restored.exit(), None, "restored guest ended: {after}");
    let total = assert_counts_from_one(&format!("{committed}{after}"));
    assert!(
        total >= last + 19,
        "restored disk-writer made too little progress: {after:?}"
    );
}

/// `smp-counter` on 2 vCPUs: memory equal at the checkpoint, and each vCPU's line numbers continue
/// without a gap or a duplicate after restore.
#[test]
fn smp_counter_restores_every_vcpu() {
    require_kvm!();
    let seed = seed("smp_counter_restores_every_vcpu");
    let mut rng = rng(seed);
    let mut pair = Pair::new(config(ax_guests::SMP_COUNTER, 32, 2, &[200_000]), None);
    pair.run_random_epochs(&mut rng, 50, 8);
    pair.checkpoint_and_hold(3);
    pair.assert_memory_equal();
    let committed = String::from_utf8(pair.replica.output().to_vec()).unwrap();
    let mut restored = pair.replica.restore().expect("restore");
    restored.start().unwrap();
    let after = collect_lines(&restored, 10, Duration::from_secs(20));
    let joined = format!("{committed}{after}");
    let complete = &joined[..joined.rfind('\n').map_or(0, |i| i + 1)];
    let mut next = [1u64; 2];
    for line in complete.lines() {
        let (cpu, n) = line
            .strip_prefix("cpu")
            .and_then(|l| l.split_once(' '))
            .unwrap_or_else(|| panic!("unexpected line {line:?}"));
        let (cpu, n): (usize, u64) = (cpu.parse().unwrap(), n.parse().unwrap());
        assert_eq!(n, next[cpu], "vCPU {cpu}: gap or duplicate in {joined:?}");
        next[cpu] += 1;
    }
    assert!(
        next.iter().all(|&n| n > 3),
        "a vCPU made too little progress: {next:?}"
    );
}

/// A guest that ends is captured with its exit code, and a replica restored after the end stays ended.
#[test]
fn guest_exit_is_part_of_the_checkpoint() {
    require_kvm!();
    let mut pair = Pair::new(config(ax_guests::COUNTER, 16, 1, &[1000, 3]), None);
    let mut exit = None;
    for _ in 0..400 {
        let r = pair
            .primary
            .run_epoch(Duration::from_millis(5), &mut pair.frame)
            .unwrap();
        pair.replica.apply(&pair.frame).unwrap();
        if r.exit.is_some() {
            exit = r.exit;
            break;
        }
    }
    assert_eq!(exit, Some(GuestExit::Code(0)));
    assert_eq!(pair.replica.output(), b"1\n2\n3\n");
    let restored = pair.replica.restore().unwrap();
    assert_eq!(restored.exit(), Some(GuestExit::Code(0)));
}

/// Hot pages (kept writable and copied every epoch) churn in and out when the guest's sweep is about as
/// long as an epoch; checkpoints stay bit-exact throughout.
#[test]
fn hot_pages_keep_checkpoints_exact() {
    require_kvm!();
    let seed = seed("hot_pages_keep_checkpoints_exact");
    let mut rng = rng(seed);
    // 16 pages per iteration over a 512-page working set, 300 spins per iteration.
    let mut pair = Pair::new(config(ax_guests::DIRTIER, 32, 1, &[16, 512, 50, 300]), None);
    let mut max_hot = 0;
    for round in 0..6 {
        pair.run_random_epochs(&mut rng, 15, 6);
        max_hot = max_hot.max(pair.primary.vm().hot_pages());
        pair.checkpoint_and_hold(1 + round);
        pair.assert_memory_equal();
    }
    eprintln!("hot pages: at most {max_hot}");
    assert!(max_hot > 0, "no page ever became hot");
    let out = String::from_utf8(pair.replica.output().to_vec()).unwrap();
    let complete = &out[..out.rfind('\n').map_or(0, |i| i + 1)];
    let reports: Vec<u64> = complete.lines().map(|l| l.parse().unwrap()).collect();
    for w in reports.windows(2) {
        assert_eq!(w[1], w[0] + 50, "a report line was lost: {reports:?}");
    }
}

/// Protecting a guest that already runs: the full pass, disk chunks and pre-copy rounds are taken while
/// it keeps writing memory and disk; after the first consistent epoch and a few more, the replica equals
/// the guest (memory and disk) and the restored guest continues the output stream.
#[test]
fn initial_sync_protects_a_running_guest() {
    require_kvm!();
    let seed = seed("initial_sync_protects_a_running_guest");
    let mut rng = rng(seed);
    let dir = TempDir::new("sync");
    let (primary_disk, replica_disk) = (dir.path("primary.img"), dir.path("replica.img"));
    make_disk(&primary_disk, 2 << 20);
    make_disk(&replica_disk, 2 << 20); // the replica's disk starts empty: the sync copies it
    let mut cfg = config(ax_guests::DISK_WRITER, 32, 1, &[8, 0, 1]);
    cfg.disk = Some(primary_disk.clone());
    let mut vm = statepoint::Vm::try_from(cfg).unwrap();
    vm.start().unwrap();
    // Unprotected for a while: its output is released as it comes.
    let mut history = Vec::new();
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(2));
        history.extend(vm.take_console());
    }
    let mut sp = statepoint::Statepointer::new(vm, statepoint::EpochConfig::default()).unwrap();
    let mut replica = statepoint::Replica::new(32 << 20, Some(&replica_disk)).unwrap();
    let sync = statepoint::SyncConfig {
        disk_chunk: 256 << 10,
        ..Default::default()
    };
    let mut reports = Vec::new();
    let report = sp
        .sync(&sync, &[], &mut |frame, _console, progress| {
            reports.push(progress.clone());
            let restorable_before = replica.is_restorable();
            replica.apply(frame).map_err(|e| e.to_string())?;
            assert!(!restorable_before, "a sync frame after a consistent epoch");
            assert_eq!(replica.is_restorable(), progress.done);
            Ok(())
        })
        .unwrap();
    let last = reports.last().unwrap();
    assert!(last.done && last.disk_done == 2 << 20, "{last:?}");
    assert!(
        reports.len() >= 9,
        "full pass + 7 disk chunks + final epoch: {reports:?}"
    );
    assert_eq!(replica.epoch(), Some(report.epoch));

    let mut pair = Pair {
        primary: sp,
        replica,
        frame: Vec::new(),
        epochs: report.epoch + 1,
    };
    pair.run_random_epochs(&mut rng, 20, 5);
    pair.checkpoint_and_hold(3);
    pair.assert_memory_equal();
    pair.replica.sync_disk().unwrap();
    assert!(
        std::fs::read(&primary_disk).unwrap() == std::fs::read(&replica_disk).unwrap(),
        "replica disk differs after the initial sync"
    );
    let committed = [history.as_slice(), pair.replica.output()].concat();
    let committed = String::from_utf8(committed).unwrap();
    let before = assert_counts_from_one(&committed);
    drop(pair.primary);
    let mut restored = pair.replica.restore().unwrap();
    restored.start().unwrap();
    let after = collect_lines(&restored, 10, Duration::from_secs(20));
    assert_eq!(restored.exit(), None, "restored guest ended: {after}");
    let total = assert_counts_from_one(&format!("{committed}{after}"));
    assert!(total >= before + 9, "{after:?}");
}

/// The same for a guest that writes each page once per ~280 ms sweep (the slow `dirtier`): a write lost
/// between two sync steps would never be repeated before the comparison, so it would show.
#[test]
fn initial_sync_loses_no_write_of_a_slow_sweeper() {
    require_kvm!();
    let mut vm =
        statepoint::Vm::try_from(config(ax_guests::DIRTIER, 32, 1, &[1, 0, 20, 2000])).unwrap();
    vm.start().unwrap();
    std::thread::sleep(Duration::from_millis(30));
    let history = vm.take_console();
    let mut sp = statepoint::Statepointer::new(vm, statepoint::EpochConfig::default()).unwrap();
    let mut replica = statepoint::Replica::new(32 << 20, None).unwrap();
    let report = sp
        .sync(
            &statepoint::SyncConfig::default(),
            &[],
            &mut |frame, _, _| replica.apply(frame).map(|_| ()).map_err(|e| e.to_string()),
        )
        .unwrap();
    let mut pair = Pair {
        primary: sp,
        replica,
        frame: Vec::new(),
        epochs: report.epoch + 1,
    };
    pair.run_random_epochs(&mut rng(11), 5, 4);
    pair.checkpoint_and_hold(2);
    pair.assert_memory_equal();
    let out = String::from_utf8([history.as_slice(), pair.replica.output()].concat()).unwrap();
    let complete = &out[..out.rfind('\n').map_or(0, |i| i + 1)];
    let reports: Vec<u64> = complete.lines().map(|l| l.parse().unwrap()).collect();
    assert!(reports.len() >= 3, "{out:?}");
    for w in reports.windows(2) {
        assert_eq!(w[1], w[0] + 20, "a report line was lost: {reports:?}");
    }
}

/// A disk snapshot of a running `disk-writer` is a consistent cut (every sector holds the newest write
/// up to one point), although the guest keeps writing during the copy; successive snapshots move on.
/// The paced snapshots take long enough for the guest to wrap around its 1 MiB disk during the copy: a
/// plain copy would be torn (checked by disabling the re-copy: the checker names the torn sector).
#[test]
fn disk_snapshot_of_a_running_guest_is_consistent() {
    require_kvm!();
    let dir = TempDir::new("snapshot");
    let disk = dir.path("disk.img");
    make_disk(&disk, 1 << 20);
    let mut cfg = config(ax_guests::DISK_WRITER, 32, 1, &[8, 0, 1]);
    cfg.disk = Some(disk.clone());
    let mut vm = statepoint::Vm::try_from(cfg).unwrap();
    let handle = vm
        .disk_handle()
        .expect("a VM with a disk has a disk handle");
    vm.start().unwrap();
    let _ = collect_lines(&vm, 3, Duration::from_secs(20));
    let (mut newest, mut raced) = (0, 0);
    let mut token = None;
    for i in 0..6 {
        // The guest has written since the previous snapshot (two more batches printed), whatever the
        // host's load: the check below is about consistency and progress, not about timing.
        let _ = collect_lines(&vm, 2, Duration::from_secs(30));
        let snap = dir.path(&format!("snap{i}.img"));
        let pace = (i % 2 == 0).then_some(2_000_000); // 1 MiB at 2 MB/s: about half a second
        let report = handle.snapshot_to(&snap, pace).expect("snapshot");
        assert_eq!(report.bytes, 1 << 20);
        let image = std::fs::read(&snap).unwrap();
        let s = ax_guests::check_disk_writer_image(&image)
            .unwrap_or_else(|e| panic!("snapshot {i} is not a consistent cut: {e} ({report:?})"));
        assert!(
            s > newest,
            "snapshot {i} did not move on: write {s} after {newest}"
        );
        newest = s;
        raced += report.writes_during_copy;
        // The block device's write log: each snapshot follows the previous one; the 1 MiB disk is chunk 0.
        assert_eq!(
            report.changes.since, token,
            "snapshot {i} follows the previous one"
        );
        assert_eq!(
            report.changes.chunks,
            vec![0],
            "snapshot {i}: the guest wrote chunk 0"
        );
        token = Some(report.changes.token);
        let _ = vm.take_console();
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(vm.exit(), None);
    assert!(
        raced > 0,
        "the guest never wrote during a copy: the re-copy under the lock went untested"
    );
}
