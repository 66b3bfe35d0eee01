//! Copy after resume (userfaultfd copy-before-write): every epoch's frame holds exactly the memory at its
//! stun, while the guest rewrites every page of its working set continuously.
mod common;

use std::time::Duration;

use common::config;
use statepoint::{EpochConfig, Replica, Statepointer, Vm};

/// Runs `epochs` epochs of 1–4 ms of a guest that rewrites all of `pages` pages per iteration, with a
/// full memory copy taken inside each stun; after each epoch the replica (which only ever saw frames) must
/// equal that copy. Returns (epochs run with copy after resume, write-protect faults resolved).
fn frames_equal_memory_at_the_stun(copy_after_resume: bool, hot: u64, epochs: u64) -> (bool, u64) {
    let pages = 1024;
    let vm = Vm::try_from(config(ax_guests::DIRTIER, 32, 1, &[pages, pages, 1000, 0])).unwrap();
    let epoch_config = EpochConfig {
        copy_after_resume,
        hot_page_limit: hot,
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
    for i in 0..epochs {
        let len = Duration::from_micros(1000 + (i * 7919) % 3000);
        let r = sp.run_epoch(len, &mut frame).unwrap();
        assert_eq!(replica.apply(&frame).unwrap(), r.epoch);
        assert_eq!(r.capture.copy_after_resume, sp.copy_after_resume());
        faults += r.capture.wp_faults;
        dirty += r.dirty_pages;
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
        "copy after resume {}: {epochs} epochs, {} dirty pages per epoch, {faults} write-protect faults",
        sp.copy_after_resume(),
        dirty / epochs
    );
    (sp.copy_after_resume(), faults)
}

#[test]
fn copy_after_resume_frames_are_the_memory_at_the_stun() {
    require_kvm!();
    let (used, faults) = frames_equal_memory_at_the_stun(true, 0, 300);
    if !used {
        println!("SKIPPED: userfaultfd write-protection is unavailable here (see the log)");
        return;
    }
    assert!(faults > 0, "no guest write ever hit a page before its copy");
}

#[test]
fn copy_after_resume_with_hot_pages_is_exact_too() {
    require_kvm!();
    frames_equal_memory_at_the_stun(true, 4096, 150);
}

#[test]
fn the_forced_copy_in_stun_path_is_exact() {
    require_kvm!();
    let (used, faults) = frames_equal_memory_at_the_stun(false, 4096, 60);
    assert!(!used && faults == 0);
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
