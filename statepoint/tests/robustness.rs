//! Bad frames are refused without moving the replica; a capture that fails midway loses no page.

mod common;

use std::time::Duration;

use common::*;
use statepoint::frame::Limits;
use statepoint::vm::FailPoint;
use statepoint::ReplicaError;

/// Real frames from a running guest: epoch 0 and `n` more.
fn real_frames(n: usize) -> (Vec<Vec<u8>>, u64) {
    let mut pair = Pair::new(config(ax_guests::DIRTIER, 32, 1, &[16, 512, 100]), None);
    let mut frames = vec![pair.frame.clone()];
    for _ in 0..n {
        pair.primary
            .run_epoch(Duration::from_millis(3), &mut pair.frame)
            .unwrap();
        frames.push(pair.frame.clone());
    }
    (frames, 32 << 20)
}

#[test]
fn corrupt_truncated_reordered_and_oversized_frames_are_rejected() {
    require_kvm!();
    let seed = seed("corrupt_truncated_reordered_and_oversized_frames_are_rejected");
    let mut rng = rng(seed);
    let (frames, mem) = real_frames(6);
    let mut replica = statepoint::Replica::new(mem, None).unwrap();
    replica.apply(&frames[0]).unwrap();
    replica.apply(&frames[1]).unwrap();
    let good_memory = replica.memory().to_vec();
    let next = &frames[2];

    let rejected = |replica: &mut statepoint::Replica, bytes: &[u8], what: &str| -> String {
        let err = replica.apply(bytes).expect_err(what);
        assert_eq!(replica.epoch(), Some(1), "{what}: replica moved");
        assert!(
            replica.memory() == good_memory.as_slice(),
            "{what}: memory changed"
        );
        err.to_string()
    };

    // Corruption: flip random bytes anywhere (header, tables, payload, CRC).
    for _ in 0..64 {
        let mut bad = next.clone();
        let i = rand::RngExt::random_range(&mut rng, 0..bad.len());
        bad[i] ^= 1 << rand::RngExt::random_range(&mut rng, 0..8);
        let msg = rejected(&mut replica, &bad, "corrupted frame");
        assert!(!msg.is_empty());
    }
    // Truncation at every interesting length.
    for len in [
        0,
        1,
        3,
        8,
        63,
        64,
        65,
        next.len() / 2,
        next.len() - 4,
        next.len() - 1,
    ] {
        let msg = rejected(&mut replica, &next[..len], "truncated frame");
        assert!(msg.contains("frame rejected"), "{msg}");
    }
    // Trailing garbage.
    let mut long = next.clone();
    long.extend_from_slice(b"junk");
    rejected(&mut replica, &long, "frame with trailing bytes");
    // Reordered: a later epoch, an old epoch again, epoch 0 again.
    let msg = rejected(&mut replica, &frames[3], "frame from the future");
    assert!(msg.contains("expecting epoch 2"), "{msg}");
    rejected(&mut replica, &frames[1], "replayed frame");
    rejected(&mut replica, &frames[0], "replayed epoch 0");
    // Oversized: limits below what the frame declares.
    let saved = replica.limits().clone();
    replica.set_limits(Limits {
        max_frame_bytes: 64,
        ..saved.clone()
    });
    let msg = rejected(&mut replica, next, "oversized frame");
    assert!(msg.contains("limit") || msg.contains("large"), "{msg}");
    replica.set_limits(saved);
    // Garbage of every kind.
    rejected(&mut replica, b"AXSP", "magic only");
    rejected(&mut replica, &vec![0u8; 4096], "zeros");

    // After all that, the right frames still apply in order.
    for (i, f) in frames.iter().enumerate().skip(2) {
        assert_eq!(replica.apply(f).unwrap(), i as u64);
    }
}

/// Captures that fail after the harvest and in the middle of the copy put every bit back: after one
/// successful capture the replica equals a full copy of the original memory. Run in both dirty-log modes
/// (manual protect: KVM keeps its bits, the VMM's own bits must be put back; classic: reading the log
/// cleared it, everything must be put back) and with a guest whose disk reads are VMM writes into memory.
fn failed_capture_loses_no_page(manual_protect: bool, disk_guest: bool) {
    let dir = TempDir::new("failcap");
    let mut cfg = if disk_guest {
        let (a, b) = (dir.path("a.img"), dir.path("b.img"));
        make_disk(&a, 1 << 20);
        make_disk(&b, 1 << 20);
        let mut c = config(ax_guests::DISK_WRITER, 32, 1, &[8, 0, 1]);
        c.disk = Some(a);
        c
    } else {
        // dirtier: 1 page per iteration, sweeping all free memory (~7000 pages) slowly (2000 spins per
        // iteration: ~100 pages per 4 ms epoch; a report every 20 iterations), so a page dirtied in a failed epoch is not dirtied again
        // before the final checkpoint: losing its bit would show.
        config(ax_guests::DIRTIER, 32, 1, &[1, 0, 20, 2000])
    };
    cfg.manual_dirty_protect = manual_protect;
    let replica_disk = disk_guest.then(|| dir.path("b.img"));
    // No mid-epoch polling of the dirty count: in classic mode each poll moves KVM's bits into the
    // carry-over, which would hide a missing put-back.
    let epochs = statepoint::EpochConfig {
        dirty_limit_pages: 0,
        ..Default::default()
    };
    let mut pair = Pair::with_epochs(cfg, replica_disk.as_deref(), epochs);
    assert_eq!(pair.primary.vm().manual_dirty_protect(), manual_protect);
    pair.run_random_epochs(&mut rng(7), 5, 4);
    for point in [
        FailPoint::AfterHarvest,
        FailPoint::MidCopy,
        FailPoint::AfterHarvest,
    ] {
        pair.primary.vm_mut().fail_next_capture(point);
        let err = pair
            .primary
            .run_epoch(Duration::from_millis(4), &mut pair.frame)
            .expect_err("injected failure");
        assert!(
            matches!(err, statepoint::epoch::EpochError::Vm(statepoint::VmError::Injected(p)) if p == point),
            "{err}"
        );
    }
    pair.checkpoint_and_hold(4);
    pair.assert_memory_equal();
    if disk_guest {
        pair.replica.sync_disk().unwrap();
        assert!(
            std::fs::read(dir.path("a.img")).unwrap() == std::fs::read(dir.path("b.img")).unwrap(),
            "a block write of a failed epoch was lost"
        );
    }
    // The failed epochs' console output was not lost either.
    let out = String::from_utf8(pair.replica.output().to_vec()).unwrap();
    let complete = &out[..out.rfind('\n').map_or(0, |i| i + 1)];
    let reports: Vec<u64> = complete.lines().map(|l| l.parse().unwrap()).collect();
    assert!(reports.len() >= 3, "the guest reported too little: {out:?}");
    let step = if disk_guest { 1 } else { 20 };
    for w in reports.windows(2) {
        assert_eq!(w[1], w[0] + step, "a report line was lost: {reports:?}");
    }
}

#[test]
fn failed_capture_loses_no_page_manual_protect() {
    require_kvm!();
    failed_capture_loses_no_page(true, false);
    failed_capture_loses_no_page(true, true);
}

#[test]
fn failed_capture_loses_no_page_classic_log() {
    require_kvm!();
    failed_capture_loses_no_page(false, false);
    failed_capture_loses_no_page(false, true);
}

/// Errors name what is wrong.
#[test]
fn replica_errors_are_specific() {
    require_kvm!();
    let (frames, mem) = real_frames(1);
    let mut wrong_size = statepoint::Replica::new(mem * 2, None).unwrap();
    let err = wrong_size.apply(&frames[0]).unwrap_err();
    assert!(
        matches!(
            err,
            ReplicaError::Frame(_) | ReplicaError::StateMismatch { .. }
        ),
        "{err}"
    );
    let mut fresh = statepoint::Replica::new(mem, None).unwrap();
    let err = fresh.apply(&frames[1]).unwrap_err();
    assert!(err.to_string().contains("expecting epoch 0"), "{err}");
    assert!(matches!(fresh.commit(), Err(ReplicaError::NothingStaged)));
    assert!(matches!(fresh.restore(), Err(ReplicaError::Empty)));
}
