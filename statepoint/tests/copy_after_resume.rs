//! Copy after resume (userfaultfd copy-before-write): every epoch's frame holds exactly the memory at its
//! stun, while the guest rewrites every page of its working set continuously.
mod common;

use std::time::Duration;

use common::config;
use statepoint::{EpochConfig, Replica, Statepointer, Vm};

/// Runs `epochs` epochs of 1–4 ms of a guest that rewrites all of `pages` pages per iteration, with a
/// full memory copy taken inside each stun; after each epoch the replica (which only ever saw frames) must
/// equal that copy. `pre` is `EpochConfig::pre_protect_pages`. Returns (epochs run with copy after resume,
/// write-protect faults resolved, pages pre-protected and still protected at their stun, pre-protected
/// pages written again before their stun).
fn frames_equal_memory_at_the_stun(
    copy_after_resume: bool,
    hot: u64,
    pre: u64,
    pages: u64,
    epochs: u64,
) -> (bool, u64, u64, u64) {
    let vm = Vm::try_from(config(ax_guests::DIRTIER, 32, 1, &[pages, pages, 1000, 0])).unwrap();
    let epoch_config = EpochConfig {
        copy_after_resume,
        hot_page_limit: hot,
        pre_protect_pages: pre,
        // Poll (and pre-protect) often, so pre-passes race with the guest's writes and the stun.
        poll_interval: Duration::from_micros(200),
        ..EpochConfig::default()
    };
    let mut sp = Statepointer::new(vm, epoch_config).unwrap();
    let mut replica = Replica::new(32 << 20, None).unwrap();
    let mut frame = Vec::new();
    sp.boot(&mut frame).unwrap();
    replica.apply(&frame).unwrap();
    sp.vm_mut().snapshot_at_stuns(true);
    let mut faults = 0;
    let mut dirty = 0;
    let (mut pre_protected, mut pre_faults) = (0, 0);
    for i in 0..epochs {
        // With pre-protection, epochs long enough for several polls after the copy and the encoding.
        let len = if pre > 0 {
            Duration::from_micros(4000 + (i * 7919) % 8000)
        } else {
            Duration::from_micros(1000 + (i * 7919) % 3000)
        };
        let r = sp.run_epoch(len, &mut frame).unwrap();
        assert_eq!(replica.apply(&frame).unwrap(), r.epoch);
        assert_eq!(r.capture.copy_after_resume, sp.copy_after_resume());
        faults += r.capture.wp_faults;
        dirty += r.dirty_pages;
        pre_protected += r.capture.pre_protected;
        pre_faults += r.capture.pre_faults;
        let at_stun = sp
            .vm_mut()
            .take_stun_snapshot()
            .expect("a snapshot at the stun");
        let replica_mem = replica.memory();
        if at_stun != replica_mem {
            let differ: Vec<usize> = at_stun
                .chunks(4096)
                .zip(replica_mem.chunks(4096))
                .enumerate()
                .filter(|(_, (a, b))| a != b)
                .map(|(i, _)| i)
                .take(16)
                .collect();
            panic!(
                "epoch {}: the frames differ from the memory at the stun at pages {differ:?}",
                r.epoch
            );
        }
    }
    assert!(
        sp.vm().exit().is_none(),
        "the guest ended: {:?}",
        sp.vm().exit()
    );
    eprintln!(
        "copy after resume {} (pre-protect {}): {epochs} epochs, {} dirty pages per epoch, {faults} \
         write-protect faults, {pre_protected} pages pre-protected, {pre_faults} written again",
        sp.copy_after_resume(),
        sp.pre_protect(),
        dirty / epochs
    );
    (sp.copy_after_resume(), faults, pre_protected, pre_faults)
}

#[test]
fn copy_after_resume_frames_are_the_memory_at_the_stun() {
    require_kvm!();
    let (used, faults, pre, _) = frames_equal_memory_at_the_stun(true, 0, 0, 1024, 300);
    assert_eq!(pre, 0, "pre-protection off");
    if !used {
        println!("SKIPPED: userfaultfd write-protection is unavailable here (see the log)");
        return;
    }
    assert!(faults > 0, "no guest write ever hit a page before its copy");
}

#[test]
fn copy_after_resume_with_hot_pages_is_exact_too() {
    require_kvm!();
    frames_equal_memory_at_the_stun(true, 4096, 0, 1024, 150);
}

/// Pre-protection at every poll (threshold 1 page): pages protected during the epoch, written again
/// (fault, disarm) or not (still protected at the stun, skipped by it) — every frame is still exactly the
/// memory at its stun.
#[test]
fn pre_protected_frames_are_the_memory_at_the_stun() {
    require_kvm!();
    let (used, _, pre, _) = frames_equal_memory_at_the_stun(true, 0, 1, 1024, 150);
    if !used {
        println!("SKIPPED: userfaultfd write-protection is unavailable here (see the log)");
        return;
    }
    assert!(pre > 0, "no page was still pre-protected at a stun");
    // A small working set, swept several times per epoch: pre-protected pages are written again.
    let (_, _, _, rewritten) = frames_equal_memory_at_the_stun(true, 0, 1, 96, 150);
    assert!(
        rewritten > 0,
        "no pre-protected page was written again before its stun"
    );
    // With hot pages too (hot pages are never pre-protected).
    frames_equal_memory_at_the_stun(true, 4096, 1, 1024, 100);
}

#[test]
fn the_forced_copy_in_stun_path_is_exact() {
    require_kvm!();
    let (used, faults, pre, _) = frames_equal_memory_at_the_stun(false, 4096, 1, 1024, 60);
    assert!(!used && faults == 0 && pre == 0);
}

/// The guest keeps making progress under copy after resume: its iteration reports keep coming, in
/// order, epoch after epoch (the same guest and epochs as the benchmark's slowdown run).
#[test]
fn the_guest_makes_progress_under_copy_after_resume() {
    require_kvm!();
    for after_resume in [true, false] {
        let vm = Vm::try_from(config(ax_guests::DIRTIER, 32, 1, &[64, 1024, 1000])).unwrap();
        let epoch_config = EpochConfig {
            interval: Duration::from_millis(10),
            dirty_limit_pages: 0,
            copy_after_resume: after_resume,
            ..EpochConfig::default()
        };
        let mut sp = Statepointer::new(vm, epoch_config).unwrap();
        let mut frame = Vec::new();
        sp.boot(&mut frame).unwrap();
        let mut out = Vec::new();
        let (mut faults, mut dirty) = (0, 0);
        let t = std::time::Instant::now();
        for _ in 0..100 {
            let r = sp.next_epoch(&mut frame).unwrap();
            faults += r.capture.wp_faults;
            dirty += r.dirty_pages;
            out.extend_from_slice(&sp.last_capture().console);
        }
        let text = String::from_utf8(out).unwrap();
        eprintln!(
            "copy after resume {}: {:?}, {} reports, {dirty} dirty pages, {faults} faults, hot {}, exit {:?}",
            sp.copy_after_resume(),
            t.elapsed(),
            text.lines().count(),
            sp.vm().hot_pages(),
            sp.vm().exit()
        );
        assert!(sp.vm().exit().is_none());
        let complete = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
        let reports: Vec<u64> = complete
            .lines()
            .map(|l| l.trim().parse().unwrap())
            .collect();
        assert!(!reports.is_empty(), "no progress");
        for (i, &n) in reports.iter().enumerate() {
            assert_eq!(n, 1000 * (i as u64 + 1), "reports in order");
        }
    }
}
