//! Feasibility of copy-after-resume on this host: a guest write through KVM to a userfaultfd
//! write-protected page reaches the handler, resolving lets the guest continue, and KVM's dirty log
//! still records the write.
mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::config;
use statepoint::uffd::Uffd;
use statepoint::{Pausable, Snapshottable, Vm};

#[test]
fn guest_writes_through_kvm_reach_the_uffd_handler() {
    require_kvm!();
    let uffd = match Uffd::open() {
        Ok(u) => Arc::new(u),
        Err(e) => {
            println!("SKIPPED: userfaultfd unusable here: {e}");
            return;
        }
    };
    // dirtier: 16 pages per iteration over 256 pages, report every 100, 2000 pauses between iterations.
    let mut vm = Vm::try_from(config(ax_guests::DIRTIER, 32, 1, &[16, 256, 100, 2000])).unwrap();
    let base = vm.ram().host_addr() as u64;
    let size = vm.mem_size();
    vm.start().unwrap();
    std::thread::sleep(Duration::from_millis(50));
    vm.pause().unwrap();
    // A capture re-arms KVM's log: from here on it counts only the writes made under write-protection.
    vm.capture(&mut statepoint::Capture::default()).unwrap();
    let before_log = vm.dirty_pages_now().unwrap();
    uffd.register_wp(base, size).unwrap();
    let t = Instant::now();
    uffd.write_protect(base, size, true).unwrap();
    eprintln!("write-protect of {} MiB: {:?}", size >> 20, t.elapsed());
    let faults = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let handler = {
        let (uffd, faults, stop) = (uffd.clone(), faults.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 4096];
            let mut got = Vec::new();
            let mut costs = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                if !uffd.wait(-1, Duration::from_millis(20)).unwrap() {
                    continue;
                }
                uffd.read_faults(&mut got).unwrap();
                for f in &got {
                    let t = Instant::now();
                    assert!(f.wp, "a write-protect fault");
                    let page = f.address & !4095;
                    // SAFETY: `page` is a page of the guest mapping, alive for the test.
                    unsafe {
                        std::ptr::copy_nonoverlapping(page as *const u8, buf.as_mut_ptr(), 4096)
                    };
                    uffd.write_protect(page, 4096, false).unwrap();
                    costs.push(t.elapsed());
                    faults.fetch_add(1, Ordering::Relaxed);
                }
            }
            costs
        })
    };
    let out0 = vm.take_console();
    vm.resume().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    vm.pause().unwrap();
    let after_log = vm.dirty_pages_now().unwrap();
    stop.store(true, Ordering::Relaxed);
    let costs = handler.join().unwrap();
    let out = String::from_utf8(vm.take_console()).unwrap();
    let n = faults.load(Ordering::Relaxed);
    eprintln!(
        "faults {n}, dirty log {before_log} -> {after_log}, output before {} bytes, after {:?}",
        out0.len(),
        out.lines().last()
    );
    if let Some(max) = costs.iter().max() {
        eprintln!(
            "handler copy+unprotect: max {max:?}, mean {:?}",
            costs.iter().sum::<Duration>() / costs.len() as u32
        );
    }
    assert!(n > 0, "no write-protect fault reached the handler");
    assert!(
        !out.is_empty(),
        "the guest made no progress after resolving"
    );
    assert!(
        before_log == 0 && after_log >= 256,
        "KVM's dirty log missed the writes"
    );
}
