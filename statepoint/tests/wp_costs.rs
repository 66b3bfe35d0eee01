//! What write-protecting guest RAM with userfaultfd costs per page on this host, by the shape of the
//! calls — the figures behind pre-protection (`statepoint::cow`). Prints figures; asserts nothing about
//! time (the machine is shared). The guest ran just before each measurement, so KVM maps the working set
//! and every protection also invalidates KVM's mappings (the part that costs under nested KVM).
mod common;

use std::time::{Duration, Instant};

use common::config;
use statepoint::uffd::Uffd;
use statepoint::{Pausable, Vm, PAGE_SIZE};

const WORKING_SET: u64 = 16384;

fn rerun(vm: &mut Vm) {
    vm.resume().unwrap();
    std::thread::sleep(Duration::from_millis(100));
    vm.pause().unwrap();
}

fn per_page(d: Duration, pages: u64) -> f64 {
    d.as_secs_f64() * 1e6 / pages as f64
}

#[test]
fn write_protect_costs_by_call_shape() {
    require_kvm!();
    let uffd = match Uffd::open() {
        Ok(u) => u,
        Err(e) => {
            println!("SKIPPED: userfaultfd unusable here: {e}");
            return;
        }
    };
    // dirtier over 16384 pages (64 MiB) of a 256 MiB guest.
    let mut vm = Vm::try_from(config(
        ax_guests::DIRTIER,
        256,
        1,
        &[64, WORKING_SET, 1 << 40, 0],
    ))
    .unwrap();
    let base = vm.ram().host_addr() as u64;
    let size = vm.mem_size();
    vm.start().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    vm.pause().unwrap();
    uffd.register_wp(base, size).unwrap();
    let ws = WORKING_SET * PAGE_SIZE as u64;
    let page = PAGE_SIZE as u64;
    let mut figures = Vec::new();

    // Shapes of protecting the 16384-page working set (the guest ran, KVM maps it).
    let shapes: [(&str, u64); 4] = [
        ("one call per page", 1),
        ("one call per 64-page run", 64),
        ("one call per 1024-page run", 1024),
        ("one call over the working set", WORKING_SET),
    ];
    for (name, run) in shapes {
        rerun(&mut vm);
        let t = Instant::now();
        let mut off = 0;
        while off < ws {
            uffd.write_protect(base + off, run * page, true).unwrap();
            off += run * page;
        }
        let d = t.elapsed();
        let t = Instant::now();
        uffd.write_protect(base, ws, false).unwrap();
        let un = t.elapsed();
        figures.push(format!(
            "protect 16384 pages, {name}: {d:?} ({:.3} us/page); un-protect in one call {un:?}",
            per_page(d, WORKING_SET)
        ));
    }

    // Whole guest RAM (256 MiB) in one call: 16384 mapped and writable, the rest never touched.
    rerun(&mut vm);
    let t = Instant::now();
    uffd.write_protect(base, size, true).unwrap();
    let whole = t.elapsed();
    // Again, with everything but 1024 pages still protected: what "protect all of RAM at every stun"
    // would cost when the guest wrote 1024 pages since.
    uffd.write_protect(base, 1024 * page, false).unwrap();
    let t = Instant::now();
    uffd.write_protect(base, size, true).unwrap();
    let whole_again = t.elapsed();
    uffd.write_protect(base, 1024 * page, false).unwrap();
    let t = Instant::now();
    uffd.write_protect(base, 1024 * page, true).unwrap();
    let just_1024 = t.elapsed();
    uffd.write_protect(base, size, false).unwrap();
    figures.push(format!(
        "protect all 256 MiB in one call: {whole:?}; again with 1024 pages writable: {whole_again:?}; \
         just those 1024 pages in one call: {just_1024:?} ({:.3} us/page)",
        per_page(just_1024, 1024)
    ));

    // A page-granular un-protect after the guest ran (what the copy after resume does per batch).
    rerun(&mut vm);
    uffd.write_protect(base, ws, true).unwrap();
    let t = Instant::now();
    let mut off = 0;
    while off < ws {
        uffd.write_protect(base + off, 64 * page, false).unwrap();
        off += 64 * page;
    }
    let un64 = t.elapsed();
    figures.push(format!(
        "un-protect 16384 pages per 64-page run: {un64:?} ({:.3} us/page)",
        per_page(un64, WORKING_SET)
    ));
    uffd.unregister(base, size).unwrap();
    for f in &figures {
        eprintln!("{f}");
    }
}
