//! FT for a QEMU VM through the agent daemons (COLO driven by the VM workers): two real `ax-agent run`
//! (host-a on 127.0.0.1, host-b on 127.0.0.2) and a shared witness; the guest kit's `qcounter` (a
//! multiboot guest without an OS, under KVM, one raw disk).
//!
//! - `axctl vm create … --engine qemu --ft-capable`; a VM created without it is refused level ft with
//!   the reason;
//! - `set-level ft` through the API → protected to host-b (COLO); ft → ha → ft on the running VM;
//! - host-a's agent, worker and QEMU are SIGKILLed: host-b takes the VM over (role primary, the
//!   failover recorded) and the counter goes on there; host-a's agent comes back and the VM is
//!   protected again to host-a, automatically.
//!
//! Skipped (`SKIPPED: …`) without /dev/kvm or a QEMU whose COLO works here (`ax_qemu::colo::probe`).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

mod common;
use common::*;

const BASE: u16 = 29100;
const WITNESS: u16 = 29190;

fn config(dir: &Path, me: &str, other: &str, ip: &str, oip: &str) -> PathBuf {
    let cfg = dir.join(format!("{me}.toml"));
    let text = format!(
        "host = \"{me}\"\nstorage_dir = \"{storage}\"\npki_dir = \"{pki}\"\ntoken_file = \"{token}\"\n\
         witness = \"127.0.0.1:{WITNESS}\"\n[api]\nlisten = \"{ip}:{api}\"\n[addresses]\nlink = \"{ip}\"\n\
         hb = \"{ip}\"\n{ports}colo = {colo}\n[[peers]]\nname = \"{other}\"\napi = \"{oip}:{api}\"\n\
         link = \"{oip}\"\nhb = \"{oip}\"\n",
        storage = dir.join(me).display(),
        pki = dir.join("pki").display(),
        token = dir.join("token").display(),
        api = BASE + 50,
        ports = ports(BASE),
        colo = BASE + 200,
    );
    std::fs::write(&cfg, text).unwrap();
    cfg
}

/// The counter's last value on `host`'s console of `vm` (0 before the first line).
fn count(h: &Agent, vm: &str) -> u64 {
    let (_, v) = h.req("GET", &format!("/v1/vms/{vm}/console?offset=0"), None);
    v.as_str()
        .unwrap_or_default()
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("count ")?.trim().parse().ok())
        .unwrap_or(0)
}

/// Waits until the counter on `h` passes `n`.
fn counts_past(h: &Agent, vm: &str, n: u64, what: &str) -> u64 {
    let t = Instant::now();
    loop {
        let c = count(h, vm);
        if c > n {
            return c;
        }
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "{what}: the counter stays at {c} (not past {n})"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn level(h: &Agent, vm: &str, level: &str) -> (u16, Value) {
    h.req(
        "PUT",
        &format!("/v1/vms/{vm}/level"),
        Some(&json!({ "level": level })),
    )
}

fn protected_to(h: &Agent, vm: &str, peer: &str, what: &str) -> Value {
    wait_vm(h, vm, what, 180, |v| {
        v["protected"] == true
            && v["peer"] == peer
            && v["level"] == "ft"
            && v["transition"].is_null()
    })
}

fn colo_skip() -> Option<String> {
    if !kvm() {
        return Some("needs /dev/kvm (QEMU's COLO deadlocks under TCG)".into());
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(ax_qemu::colo::probe("qemu-system-x86_64"))
        .err()
        .map(|e| e.to_string())
}

#[test]
fn qemu_vm_at_ft_fails_over_and_is_protected_again_through_the_daemons() {
    let test = "qemu_vm_at_ft_fails_over_and_is_protected_again_through_the_daemons";
    if let Some(why) = colo_skip() {
        skip(test, &why);
        return;
    }
    let dir = scratch("qemu-ft");
    let witness = start_witness(&dir, WITNESS);
    let mut a = Agent::start(
        &config(&dir, "host-a", "host-b", "127.0.0.1", "127.0.0.2"),
        &dir.join("host-a"),
    );
    let b = Agent::start(
        &config(&dir, "host-b", "host-a", "127.0.0.2", "127.0.0.1"),
        &dir.join("host-b"),
    );
    let image = dir.join("qcounter.elf");
    ax_guests::qemu::write_image(ax_guests::qemu::QCOUNTER, &image).unwrap();
    // A raw disk image is a (sparse) file of the disk's size.
    let disk = dir.join("f1.raw");
    std::fs::File::create(&disk)
        .and_then(|f| f.set_len(16 << 20))
        .unwrap();
    let (img, dsk) = (image.display().to_string(), disk.display().to_string());
    let create = |name: &str, ft: bool| {
        let mut args = vec![
            "vm",
            "create",
            name,
            "--engine",
            "qemu",
            "--kernel",
            &img,
            "--append",
            "every=3000000",
            "--accel",
            "kvm",
            "--memory-mib",
            "64",
        ];
        if ft {
            args.extend(["--disk", &dsk, "--ft-capable"]);
        }
        axctl(a.addr, &dir, &args);
    };

    // Not FT-capable: refused with the reason.
    create("n1", false);
    let (c, v) = level(&a, "n1", "ft");
    assert_eq!(c, 409, "{v}");
    assert!(v.to_string().contains("ft_capable"), "{v}");
    let (c, v) = a.req("DELETE", "/v1/vms/n1", None);
    assert!(c == 200 || c == 204, "{c} {v}");

    create("f1", true);
    let v = wait_vm(&a, "f1", "running", 30, |v| v["state"] == "running");
    assert_eq!(v["ft_capable"], true, "{v}");
    counts_past(&a, "f1", 1, "f1 boots on host-a");

    // ha → ft: protected to host-b.
    let (c, v) = level(&a, "f1", "ft");
    assert_eq!(c, 202, "{v}");
    protected_to(&a, "f1", "host-b", "f1 protected to host-b");
    let (_, bv) = b.req("GET", "/v1/vms/f1", None);
    assert_eq!(bv["role"], "secondary", "{bv}");
    let n = count(&a, "f1");
    counts_past(&a, "f1", n + 1, "f1 counts on while protected");

    // ft → ha → ft on the running VM.
    let (c, v) = level(&a, "f1", "ha");
    assert_eq!(c, 202, "{v}");
    wait_vm(&a, "f1", "f1 at ha", 60, |v| {
        v["level"] == "ha" && v["transition"].is_null() && v["protected"] == false
    });
    let (c, _) = b.req("GET", "/v1/vms/f1", None);
    assert_eq!(c, 404, "host-b's standby was not released");
    let n = count(&a, "f1");
    counts_past(&a, "f1", n + 1, "f1 counts on at ha");
    let (c, v) = level(&a, "f1", "ft");
    assert_eq!(c, 202, "{v}");
    protected_to(&a, "f1", "host-b", "f1 protected again to host-b");

    // host-a dies: its agent, the VM's worker and its QEMU.
    let before = count(&a, "f1");
    let doomed: Vec<u32> = a.worker_pids().into_iter().chain(a.qemu_pids()).collect();
    a.signal(libc::SIGKILL);
    a.wait();
    for pid in doomed {
        // SAFETY: kill(2) on processes this test's agent started (pid + start time checked).
        unsafe {
            libc::kill(pid as i32, libc::SIGKILL);
        }
    }
    let bv = wait_vm(&b, "f1", "f1 taken over by host-b", 60, |v| {
        v["role"] == "primary" && v["state"] == "running"
    });
    assert!(bv["last_failover_ms"].as_u64().is_some(), "{bv}");
    let after = counts_past(&b, "f1", before, "f1 counts on at host-b");
    println!("host-a killed at count {before}; host-b counts on: {after}");

    // host-a's agent comes back: the VM is protected to it again, automatically.
    a.start_again();
    protected_to(&b, "f1", "host-a", "f1 protected again to host-a");
    let (_, av) = a.req("GET", "/v1/vms/f1", None);
    assert_eq!(av["role"], "secondary", "{av}");
    let n = count(&b, "f1");
    counts_past(&b, "f1", n + 1, "f1 counts on at host-b, protected");
    drop((a, b, witness));
    let _ = std::fs::remove_dir_all(&dir);
}
