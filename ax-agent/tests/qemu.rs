//! QEMU VMs under the agent: a real `ax-agent run`, real QEMU (TCG) and the stock Linux test guest
//! (`scripts/build-linux-guest.sh`: Debian's kernel + a busybox initramfs that prints `count N`, writes
//! and checks blocks on /dev/vda, panics or powers off on request).
//!
//! - create through axctl → `running`, `engine` `qemu`; the serial console shows the counter and the
//!   disk check; SIGKILL of the daemon, then of the worker: QEMU runs on and is re-attached (same pid);
//! - level ha: QEMU killed → `crashed` event and restarted; a guest panic (pvpanic) → restarted; a
//!   guest poweroff → `exited` (code 0), not restarted;
//! - definitions are checked before anything runs (files, fields, levels), with the field named.
//!
//! Where QEMU is missing the tests print `SKIPPED: qemu-system-x86_64 not installed`. They share the
//! host's two cores with QEMU under TCG, so they run one at a time.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

mod common;
use common::*;

/// One QEMU test at a time (each boots Linux under TCG).
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

fn qemu_body(name: &str, guest: &(PathBuf, PathBuf), append: &str, disks: &[&Path]) -> Value {
    json!({
        "name": name,
        "engine": "qemu",
        "memory_mib": 256,
        "qemu": {
            "kernel": guest.0,
            "initrd": guest.1,
            "append": format!("quiet {append}"),
            "accel": "tcg",
            "disks": disks.iter().map(|d| json!({"path": d})).collect::<Vec<_>>(),
        }
    })
}

fn qcow2(dir: &Path, name: &str, mib: u64) -> PathBuf {
    let p = dir.join(name);
    let ok = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&p)
        .arg(format!("{mib}M"))
        .status()
        .unwrap();
    assert!(ok.success());
    p
}

/// The VM's whole console log so far, as text.
fn console(a: &Agent, vm: &str) -> String {
    match a.req("GET", &format!("/v1/vms/{vm}/console?offset=0"), None) {
        (200, Value::String(s)) => s,
        (200, Value::Null) => String::new(),
        (200, v) => v.to_string(),
        (code, v) => panic!("console of {vm}: {code} {v}"),
    }
}

/// Waits until the console holds a line starting with `prefix` after `after` bytes; returns the console.
fn wait_console(a: &Agent, vm: &str, after: usize, prefix: &str, secs: u64) -> String {
    let t = Instant::now();
    loop {
        let c = console(a, vm);
        if c.get(after..)
            .is_some_and(|tail| tail.lines().any(|l| l.starts_with(prefix)))
        {
            return c;
        }
        assert!(
            t.elapsed() < Duration::from_secs(secs),
            "{vm}: no console line {prefix:?} after byte {after} within {secs} s; console:\n{c}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The last `count N` on the console.
fn last_count(c: &str) -> Option<u64> {
    c.lines()
        .rev()
        .find_map(|l| l.strip_prefix("count ").and_then(|n| n.trim().parse().ok()))
}

fn qemu_pid(a: &Agent, vm: &str) -> Option<u32> {
    ax_agent::worker::alive(&a.storage.join("vms").join(vm).join("qemu.pid"))
}

fn worker_pid(a: &Agent, vm: &str) -> Option<u32> {
    ax_agent::worker::alive(&a.storage.join("vms").join(vm).join("worker.pid"))
}

fn set_level(a: &Agent, vm: &str, level: &str) -> Value {
    let (code, v) = a.req(
        "PUT",
        &format!("/v1/vms/{vm}/level"),
        Some(&json!({ "level": level })),
    );
    assert_eq!(code, 202, "{v}");
    wait_vm(a, vm, &format!("at level {level}"), 30, |v| {
        v["level"] == level && v["transition"].is_null()
    })
}

fn kill(pid: u32) {
    // SAFETY: kill(2) on a process this test's agent started (pid + start time checked by `alive`).
    unsafe {
        libc::kill(pid as i32, libc::SIGKILL);
    }
}

fn any_event(a: &Agent, vm: &str, needle: &str) -> bool {
    events(a, vm).iter().any(|e| e.to_string().contains(needle))
}

#[test]
fn qemu_vm_runs_shows_its_console_and_is_reattached_after_agent_and_worker_kills() {
    let _g = serial();
    let test = "qemu_vm_runs_shows_its_console_and_is_reattached_after_agent_and_worker_kills";
    let Some(guest) = linux_guest(test) else {
        return;
    };
    let dir = scratch("qemu-run");
    let storage = dir.join("a");
    let cfg = one_host_config(&dir, &storage, 28100, "");
    let mut a = Agent::start(&cfg, &storage);
    let disk = qcow2(&dir, "data.qcow2", 64);

    // Created the way an operator does it.
    let out = axctl(
        a.addr,
        &dir,
        &[
            "vm",
            "create",
            "lin1",
            "--engine",
            "qemu",
            "--kernel",
            guest.0.to_str().unwrap(),
            "--initrd",
            guest.1.to_str().unwrap(),
            "--append",
            "quiet ax.tick_ms=200",
            "--mem-mib",
            "256",
            "--disk",
            disk.to_str().unwrap(),
            "--accel",
            "tcg",
        ],
    );
    assert!(out.contains("created lin1 (QEMU"), "{out}");
    let v: Value =
        serde_json::from_str(&axctl(a.addr, &dir, &["--json", "vm", "show", "lin1"])).unwrap();
    assert_eq!(v["engine"], "qemu", "{v}");
    wait_vm(&a, "lin1", "running", 30, |v| v["state"] == "running");
    // The guest checks its disk in the background while it counts.
    let c = wait_console(&a, "lin1", 0, "disk-check", 120);
    assert!(c.contains("ax-guest: up"), "{c}");
    assert!(c.contains("disk-check ok"), "{c}");
    wait_console(&a, "lin1", 0, "count 3", 60);
    let qpid = qemu_pid(&a, "lin1").expect("QEMU runs");

    // The daemon SIGKILLed and started again: QEMU and its worker run on, re-attached.
    a.signal(libc::SIGKILL);
    a.wait();
    a.start_again();
    let v = wait_vm(&a, "lin1", "running after the agent's restart", 30, |v| {
        v["state"] == "running"
    });
    assert_eq!(v["restarts"], 0, "{v}");
    assert_eq!(qemu_pid(&a, "lin1"), Some(qpid), "QEMU was not kept");
    let before = console(&a, "lin1");
    let n = last_count(&before).unwrap();
    let c = wait_console(&a, "lin1", 0, &format!("count {}", n + 2), 30);
    assert!(last_count(&c).unwrap() > n);

    // The worker SIGKILLed: a new worker re-attaches to the same QEMU; nothing restarts.
    let wpid = worker_pid(&a, "lin1").unwrap();
    kill(wpid);
    let t = Instant::now();
    while worker_pid(&a, "lin1").is_none_or(|p| p == wpid) {
        assert!(t.elapsed() < Duration::from_secs(30), "no new worker");
        std::thread::sleep(Duration::from_millis(100));
    }
    let v = wait_vm(&a, "lin1", "running with a new worker", 30, |v| {
        v["state"] == "running"
    });
    assert_eq!(v["restarts"], 0, "{v}");
    assert_eq!(qemu_pid(&a, "lin1"), Some(qpid), "QEMU was restarted");
    assert!(any_event(&a, "lin1", "QEMU runs on: re-attaching"));
    let n = last_count(&console(&a, "lin1")).unwrap();
    wait_console(&a, "lin1", 0, &format!("count {}", n + 2), 30);

    // Deleting the VM takes QEMU with it.
    axctl(a.addr, &dir, &["vm", "delete", "lin1"]);
    let t = Instant::now();
    while ax_agent::worker::alive(&dir.join("a/vms/lin1/qemu.pid")).is_some()
        || Path::new(&format!("/proc/{qpid}")).exists()
            && std::fs::read_to_string(format!("/proc/{qpid}/cmdline"))
                .is_ok_and(|c| c.contains("guest=lin1"))
    {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "QEMU outlived its VM"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(a);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn qemu_vm_at_ha_restarts_after_qemu_dies_and_after_a_guest_panic_but_not_after_poweroff() {
    let _g = serial();
    let test =
        "qemu_vm_at_ha_restarts_after_qemu_dies_and_after_a_guest_panic_but_not_after_poweroff";
    let Some(guest) = linux_guest(test) else {
        return;
    };
    let dir = scratch("qemu-ha");
    let storage = dir.join("a");
    let cfg = one_host_config(&dir, &storage, 28200, "");
    let a = Agent::start(&cfg, &storage);

    // QEMU killed under a running guest: a VM crash (not a host event), restarted at level ha.
    let (code, v) = a.req("POST", "/v1/vms", Some(&qemu_body("k1", &guest, "", &[])));
    assert_eq!(code, 201, "{v}");
    set_level(&a, "k1", "ha");
    wait_console(&a, "k1", 0, "count 1", 90);
    let qpid = qemu_pid(&a, "k1").unwrap();
    kill(qpid);
    let v = wait_vm(&a, "k1", "restarted after QEMU died", 60, |v| {
        v["restarts"] == 1 && v["state"] == "running"
    });
    assert!(
        v["last_guest_end"]
            .to_string()
            .contains("QEMU process died"),
        "{v}"
    );
    assert!(
        any_event(&a, "k1", "restarting in place"),
        "{:?}",
        events(&a, "k1")
    );
    // The new boot's console (the previous boot's is kept as console.log.1).
    wait_console(&a, "k1", 0, "ax-guest: up", 90);
    assert_ne!(qemu_pid(&a, "k1"), Some(qpid));
    let (code, _) = a.req("POST", "/v1/vms/k1/stop", None);
    assert!(code == 200 || code == 202, "stop: {code}");

    // A kernel panic, reported by pvpanic: `crashed` with QEMU's reason, restarted.
    let (code, v) = a.req(
        "POST",
        "/v1/vms",
        Some(&qemu_body("p1", &guest, "ax.crash_after=4", &[])),
    );
    assert_eq!(code, 201, "{v}");
    set_level(&a, "p1", "ha");
    let v = wait_vm(&a, "p1", "restarted after a panic", 120, |v| {
        v["restarts"].as_u64().unwrap_or(0) >= 1
    });
    assert!(v["last_guest_end"].to_string().contains("panicked"), "{v}");
    assert!(any_event(&a, "p1", "panicked"), "{:?}", events(&a, "p1"));
    let (code, _) = a.req("POST", "/v1/vms/p1/stop", None);
    assert!(code == 200 || code == 202, "stop: {code}");

    // A poweroff is the guest's own exit: `exited`, code 0, not restarted (on_exit = stop).
    let (code, v) = a.req(
        "POST",
        "/v1/vms",
        Some(&qemu_body("o1", &guest, "ax.poweroff_after=2", &[])),
    );
    assert_eq!(code, 201, "{v}");
    set_level(&a, "o1", "ha");
    let v = wait_vm(&a, "o1", "exited", 120, |v| v["state"] == "exited");
    assert_eq!(v["exit_code"], 0, "{v}");
    assert_eq!(v["restarts"], 0, "{v}");
    assert!(
        qemu_pid(&a, "o1").is_none(),
        "QEMU still runs after a poweroff"
    );
    assert!(console(&a, "o1").contains("ax-guest: poweroff"));

    let (_, m) = a.req("GET", "/metrics", None);
    let m = m.as_str().unwrap_or_default().to_string();
    assert!(m.contains("ax_guest_ends_total"), "{m}");
    drop(a);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn qemu_definitions_are_checked_before_anything_runs() {
    let dir = scratch("qemu-refusals");
    let storage = dir.join("a");
    let cfg = one_host_config(&dir, &storage, 28300, "");
    let a = Agent::start(&cfg, &storage);
    let kernel = dir.join("vmlinuz");
    std::fs::write(&kernel, b"not really a kernel").unwrap();
    let cases: Vec<(Value, &str)> = vec![
        (
            json!({"name": "q", "engine": "qemu", "qemu": {"kernel": "/nonexistent/vmlinuz"}}),
            "kernel: /nonexistent/vmlinuz",
        ),
        (
            json!({"name": "q", "engine": "qemu"}),
            "needs a qemu definition",
        ),
        (
            json!({"name": "q", "engine": "qemu", "qemu": {}}),
            "boot source",
        ),
        (
            json!({"name": "q", "engine": "qemu", "guest": "counter", "qemu": {"kernel": kernel}}),
            "guest is for native VMs",
        ),
        (
            json!({"name": "q", "engine": "qemu", "qemu": {"kernel": kernel, "extra_args": ["-S"]}}),
            "extra_args",
        ),
        (
            json!({"name": "q", "engine": "qemu", "qemu": {"kernel": kernel, "cdrom": "/x"}}),
            "unknown field `cdrom`",
        ),
        (
            json!({"name": "q", "engine": "qemu", "qemu": {"kernel": kernel, "nics": [{"bridge": "br/0"}]}}),
            "nic 0",
        ),
        (
            json!({"name": "q", "engine": "qemu", "qemu": {"kernel": kernel, "accel": "hvf"}}),
            "accel",
        ),
        (json!({"name": "q", "engine": "xen"}), "engine \"xen\""),
        (
            json!({"name": "q", "qemu": {"kernel": kernel}}),
            "needs engine \"qemu\"",
        ),
    ];
    for (body, want) in cases {
        let (code, v) = a.req("POST", "/v1/vms", Some(&body));
        assert_eq!(code, 400, "{body} → {v}");
        let error = v["error"].as_str().unwrap_or_default();
        assert!(error.contains(want), "{body} → {v}, wanted {want:?}");
    }
    // A defined (not started) QEMU VM shows its engine, and level ft is refused with the reason.
    let (code, v) = a.req(
        "POST",
        "/v1/vms",
        Some(&json!({"name": "q", "engine": "qemu", "start": false, "qemu": {"kernel": kernel, "accel": "tcg"}})),
    );
    assert_eq!(code, 201, "{v}");
    assert_eq!(v["engine"], "qemu");
    assert_eq!(v["state"], "stopped");
    assert_eq!(v["memory_mib"], 256);
    let (code, v) = a.req("PUT", "/v1/vms/q/level", Some(&json!({"level": "ft"})));
    assert_eq!(code, 409, "{v}");
    assert!(v.to_string().contains("QEMU VM"), "{v}");
    // axctl refuses QEMU flags without --engine qemu, naming the flag.
    let out = Command::new(env!("CARGO_BIN_EXE_axctl"))
        .arg("--url")
        .arg(format!("http://{}", a.addr))
        .arg("--token-file")
        .arg(dir.join("token"))
        .args(["vm", "create", "n", "--kernel"])
        .arg(&kernel)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--kernel is for QEMU VMs"),
        "{out:?}"
    );
    drop(a);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Swift settings from tests/e2e/swift.sh (`AX_SWIFT_*`), as the agent's config sections.
fn swift_sections(test: &str, dir: &Path) -> Option<(String, String, String, String, String)> {
    let (Ok(auth), Ok(user), Ok(key)) = (
        std::env::var("AX_SWIFT_AUTH_URL"),
        std::env::var("AX_SWIFT_USER"),
        std::env::var("AX_SWIFT_KEY"),
    ) else {
        skip(
            test,
            "no Swift (tests/e2e/swift.sh runs it against a real one)",
        );
        return None;
    };
    let key_file = dir.join("swift.key");
    write_token(&key_file, 0o600);
    std::fs::write(&key_file, format!("{key}\n")).unwrap();
    let container = format!("ax-qemu-{}", std::process::id());
    let sections = format!(
        "[swift]\ncontainer = \"{container}\"\ntempauth_url = \"{auth}\"\nuser = \"{user}\"\nkey_file = \"{}\"\n\
         [volume]\ninterval_s = 3600\nkeep = 3\n",
        key_file.display()
    );
    Some((sections, container, auth, user, key))
}

/// Restores version `version` of `image` from the Swift of `swift_sections` (auth URL, user, key,
/// container) into `dst`, the way any host would read it.
fn fetch_from_swift(swift: (&str, &str, &str, &str), image: &str, version: u64, dst: &Path) {
    let (auth, user, key, container) = swift;
    let tokens = evacuate::volume::swift::TempAuth::new(auth, user, key);
    let swift = evacuate::volume::swift::SwiftBackend::new(
        tokens,
        evacuate::volume::swift::SwiftConfig::new(container),
    )
    .unwrap();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(evacuate::volume::restore(
            &swift,
            image,
            version,
            dst,
            &|_| {},
        ))
        .unwrap();
}

fn config_with(dir: &Path, storage: &Path, base: u16, sections: &str) -> PathBuf {
    let cfg = one_host_config(dir, storage, base, "");
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, text.replace("[api]", &format!("{sections}[api]"))).unwrap();
    cfg
}

#[test]
fn qemu_vm_volume_replication_to_a_real_swift_sends_changed_chunks_and_restores_elsewhere() {
    let _g = serial();
    let test =
        "qemu_vm_volume_replication_to_a_real_swift_sends_changed_chunks_and_restores_elsewhere";
    let dir = scratch("qemu-swift");
    let Some((sections, container, auth, user, key)) = swift_sections(test, &dir) else {
        return;
    };
    let Some(guest) = linux_guest(test) else {
        return;
    };
    let storage = dir.join("a");
    let a = Agent::start(&config_with(&dir, &storage, 28400, &sections), &storage);
    let disk = qcow2(&dir, "q1.qcow2", 64);
    // The guest rewrites blocks in its first 64 KiB only: one 4 MiB chunk changes between versions.
    let body = qemu_body("q1", &guest, "ax.write_ms=100 ax.span_blocks=16", &[&disk]);
    let (code, v) = a.req("POST", "/v1/vms", Some(&body));
    assert_eq!(code, 201, "{v}");
    wait_console(&a, "q1", 0, "disk-write", 90);
    set_level(&a, "q1", "ha");
    let version = |n: u64| {
        move |v: &Value| {
            v["volume"]["status"]["version"] == n && v["volume"]["status"]["running"].is_null()
        }
    };
    let v = wait_vm(&a, "q1", "version 1", 120, version(1));
    let first = v["volume"]["status"]["last"].clone();
    assert_eq!(first["bytes"], 64 << 20, "{first}");
    assert_eq!(first["changed"], first["chunks"], "{first}");
    // More guest writes, then a version that reads only the changed chunks (the dirty bitmap).
    let n = console(&a, "q1").matches("disk-write").count();
    let t = Instant::now();
    while console(&a, "q1").matches("disk-write").count() < n + 3 {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the guest stopped writing"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(a.req("POST", "/v1/vms/q1/volume/replicate", None).0, 202);
    let v = wait_vm(&a, "q1", "version 2", 120, version(2));
    let last = v["volume"]["status"]["last"].clone();
    let tracking = last["change_tracking"].as_str().unwrap_or_default();
    assert!(tracking.starts_with("write log"), "{last}");
    let changed = last["changed"].as_u64().unwrap();
    assert!(
        (1..=2).contains(&changed),
        "only the rewritten chunk(s): {last}"
    );
    assert!(
        last["bytes_uploaded"].as_u64().unwrap() <= changed * (4 << 20),
        "{last}"
    );
    println!(
        "QEMU volume: first version {} ms ({} chunks); version 2 {} ms, {} of {} chunks changed, {} bytes sent ({tracking})",
        first["elapsed_ms"], first["chunks"], last["elapsed_ms"], last["changed"], last["chunks"],
        last["bytes_uploaded"]
    );

    // Version 2 restored on a second host: bit-exact with what Swift holds, and the guest's own disk
    // check passes on it.
    let fetched = dir.join("fetched.img");
    fetch_from_swift((&auth, &user, &key, &container), "q1", 2, &fetched);
    assert_eq!(a.req("POST", "/v1/vms/q1/stop", None).0, 200);
    let storage_b = dir.join("b");
    let b = Agent::start(&config_with(&dir, &storage_b, 28450, &sections), &storage_b);
    let target = dir.join("restored-on-b.img");
    let mut again = qemu_body("q1", &guest, "", &[&target]);
    again["restore_volume"] = json!(true);
    let (code, v) = b.req("POST", "/v1/vms", Some(&again));
    assert_eq!(code, 201, "{v}");
    assert!(
        std::fs::read(&target).unwrap() == std::fs::read(&fetched).unwrap(),
        "the restored disk differs from version 2"
    );
    let c = wait_console(&b, "q1", 0, "disk-check", 90);
    assert!(c.contains("disk-check ok"), "{c}");
    let (code, v) = b.req("POST", "/v1/vms", Some(&again));
    assert_eq!(code, 400, "restoring over an existing file: {v}");
    drop(b);
    drop(a);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `qemu-img convert` of `img` to a raw file next to it; its bytes.
fn raw_bytes(img: &Path) -> Vec<u8> {
    let raw = img.with_extension("as-raw");
    let ok = Command::new("qemu-img")
        .args(["convert", "-O", "raw"])
        .arg(img)
        .arg(&raw)
        .status()
        .unwrap();
    assert!(ok.success(), "qemu-img convert {}", img.display());
    let bytes = std::fs::read(&raw).unwrap();
    let _ = std::fs::remove_file(&raw);
    bytes
}

fn sha256(bytes: &[u8]) -> String {
    use std::io::Write;
    let mut child = Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(bytes).unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout)[..64].to_string()
}

/// A QEMU VM of two disks at level ha: every version holds both disks, taken at one instant (one VM
/// version = a set of per-disk versions, listed only once both are stored), the second reads only
/// the changed chunks of each disk, and `restore_volume` on another host restores both disks of the
/// newest version — bit-exact with the originals at that version (the guest wrote nothing after it).
#[test]
fn qemu_vm_with_two_disks_replicates_and_restores_both_at_one_version_from_a_real_swift() {
    let _g = serial();
    let test =
        "qemu_vm_with_two_disks_replicates_and_restores_both_at_one_version_from_a_real_swift";
    let dir = scratch("qemu-two-disks");
    let Some((sections, container, auth, user, key)) = swift_sections(test, &dir) else {
        return;
    };
    let Some(guest) = linux_guest(test) else {
        return;
    };
    let storage = dir.join("a");
    let a = Agent::start(&config_with(&dir, &storage, 28700, &sections), &storage);
    // disk0: the guest's (it writes one block every 40 s, the first at boot); disk1: data of its own
    // that the guest never touches.
    let disk0 = qcow2(&dir, "q3.qcow2", 64);
    let disk1 = qcow2(&dir, "q3-data.qcow2", 32);
    let ok = Command::new("qemu-io")
        .args([
            "-f",
            "qcow2",
            "-c",
            "write -P 0xa5 0 3M",
            "-c",
            "write -P 0x5a 17M 1M",
        ])
        .arg(&disk1)
        .status()
        .unwrap();
    assert!(ok.success(), "qemu-io");
    let body = qemu_body("q3", &guest, "ax.write_ms=40000", &[&disk0, &disk1]);
    let (code, v) = a.req("POST", "/v1/vms", Some(&body));
    assert_eq!(code, 201, "{v}");
    wait_console(&a, "q3", 0, "disk-write seq=0", 90);
    set_level(&a, "q3", "ha");
    let version = |n: u64| {
        move |v: &Value| {
            v["volume"]["status"]["version"] == n && v["volume"]["status"]["running"].is_null()
        }
    };
    let v = wait_vm(&a, "q3", "version 1", 180, version(1));
    let first = v["volume"]["status"]["last"].clone();
    assert_eq!(first["bytes"], 96 << 20, "both disks: {first}");
    assert_eq!(
        first["disks"],
        json!([{"image": "q3", "version": 1}, {"image": "q3.AX-disk1", "version": 1}]),
        "{first}"
    );
    // The guest's next write, then version 2: only the changed chunks of each disk are read.
    wait_console(&a, "q3", 0, "disk-write seq=1", 120);
    assert_eq!(a.req("POST", "/v1/vms/q3/volume/replicate", None).0, 202);
    let v = wait_vm(&a, "q3", "version 2", 180, version(2));
    let last = v["volume"]["status"]["last"].clone();
    let tracking = last["change_tracking"].as_str().unwrap_or_default();
    assert!(
        tracking.starts_with("disk0: write log") && tracking.contains("disk1: write log"),
        "{last}"
    );
    assert_eq!(last["changed"], 1, "one block rewritten on disk0: {last}");
    assert_eq!(
        last["disks"],
        json!([{"image": "q3", "version": 2}, {"image": "q3.AX-disk1", "version": 2}]),
        "{last}"
    );
    assert_eq!(a.req("POST", "/v1/vms/q3/stop", None).0, 200);
    wait_vm(&a, "q3", "stopped", 60, |v| v["state"] != "running");
    let c = console(&a, "q3");
    assert!(
        !c.contains("disk-write seq=2"),
        "the guest wrote again before it was stopped (this machine took more than 40 s for version \
         2): the originals are no longer the version's\n{c}"
    );
    println!(
        "QEMU VM of two disks: version 1 {} ms ({} chunks); version 2 {} ms, {} of {} chunks changed, {} bytes sent ({tracking})",
        first["elapsed_ms"], first["chunks"], last["elapsed_ms"], last["changed"], last["chunks"],
        last["bytes_uploaded"]
    );

    // Swift holds the set: version 2 of the VM names version 2 of each disk's image.
    let set_file = dir.join("set.json");
    fetch_from_swift((&auth, &user, &key, &container), "q3.AX-set", 2, &set_file);
    let set: Value = serde_json::from_slice(&std::fs::read(&set_file).unwrap()).unwrap();
    assert_eq!(set["disks"], last["disks"], "{set}");

    // Restored on a second host: both disks equal the originals (the guest wrote nothing after
    // version 2), and the guest's own check passes on its disk.
    let storage_b = dir.join("b");
    let b = Agent::start(&config_with(&dir, &storage_b, 28750, &sections), &storage_b);
    let targets = [dir.join("b-disk0.img"), dir.join("b-disk1.img")];
    let mut again = qemu_body("q3", &guest, "", &[&targets[0], &targets[1]]);
    again["restore_volume"] = json!(true);
    let (code, v) = b.req("POST", "/v1/vms", Some(&again));
    assert_eq!(code, 201, "{v}");
    for (orig, restored) in [&disk0, &disk1].iter().zip(&targets) {
        let (want, got) = (raw_bytes(orig), std::fs::read(restored).unwrap());
        let (hw, hg) = (sha256(&want), sha256(&got));
        assert_eq!(
            hg,
            hw,
            "{} restored from version 2 differs from {}",
            restored.display(),
            orig.display()
        );
        println!(
            "{}: sha256 {hg} = {} at version 2",
            restored.display(),
            orig.display()
        );
    }
    let c = wait_console(&b, "q3", 0, "disk-check", 90);
    assert!(c.contains("disk-check ok"), "{c}");
    // A restore never writes over an existing file, the second disk's included.
    let (code, v) = b.req("POST", "/v1/vms", Some(&again));
    assert_eq!(code, 400, "restoring over existing files: {v}");
    let mut other = qemu_body("q4", &guest, "", &[&dir.join("b-new.img"), &targets[1]]);
    other["restore_volume"] = json!(true);
    let (code, v) = b.req("POST", "/v1/vms", Some(&other));
    assert_eq!(code, 400, "restoring over an existing second disk: {v}");
    assert!(v.to_string().contains("disk1"), "{v}");
    drop(b);
    drop(a);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A QEMU VM of two disks at level ha whose host loses power is restarted on the survivor from its
/// newest replicated volume version (a real Swift, a real etcd deciding who runs it): the fence runs
/// first, both disks are restored (the second bit-exact with its original, which the guest never
/// writes), and the guest's own disk check passes on the first.
#[test]
fn qemu_vm_of_a_failed_host_restarts_elsewhere_from_a_real_swift() {
    let _g = serial();
    let test = "qemu_vm_of_a_failed_host_restarts_elsewhere_from_a_real_swift";
    let dir = scratch("qemu-hostfail");
    let Some((sections, ..)) = swift_sections(test, &dir) else {
        return;
    };
    let Some(guest) = linux_guest(test) else {
        return;
    };
    use failover::coordinator::etcd::LocalEtcd;
    if !LocalEtcd::available() {
        skip(test, "etcd is not installed (apt-get install etcd-server)");
        return;
    }
    let etcd = LocalEtcd::start(dir.join("etcd"), 1, None).unwrap();
    let host = |me: &str, ip: &str, other: &str, oip: &str, pbase: u16| {
        let storage = dir.join(me);
        let path = dir.join(format!("{me}.toml"));
        let ports = ports(pbase).replace(
            &format!("host_heartbeat = {}", pbase + 31),
            "host_heartbeat = 28580",
        );
        std::fs::write(
            &path,
            format!(
                "host = \"{me}\"\nstorage_dir = \"{}\"\npki_dir = \"{}\"\ntoken_file = \"{}\"\n{sections}\
                 [api]\nlisten = \"{ip}:28590\"\n[addresses]\nlink = \"{ip}\"\nhb = \"{ip}\"\n{ports}\
                 [coordinator]\netcd = [\"{}\"]\n[fence]\ncommand = \"echo {{host}} >> {}\"\n\
                 [ha]\nhost_interval_ms = 100\nhost_timeout_ms = 1000\n\
                 [[peers]]\nname = \"{other}\"\napi = \"{oip}:28590\"\nlink = \"{oip}\"\nhb = \"{oip}\"\n",
                storage.display(),
                dir.join("pki").display(),
                dir.join("token").display(),
                etcd.endpoints[0],
                dir.join("fence.log").display(),
            ),
        )
        .unwrap();
        (path, storage)
    };
    let (cfg_a, storage_a) = host("host-a", "127.0.0.1", "host-b", "127.0.0.2", 28500);
    let (cfg_b, storage_b) = host("host-b", "127.0.0.2", "host-a", "127.0.0.1", 28540);
    let mut a = Agent::start(&cfg_a, &storage_a);
    let b = Agent::start(&cfg_b, &storage_b);
    let disk = qcow2(&dir, "q2.qcow2", 64);
    // A second disk with data the guest never touches: the takeover restores it too.
    let data = qcow2(&dir, "q2-data.qcow2", 16);
    let ok = Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 0x3c 5M 2M"])
        .arg(&data)
        .status()
        .unwrap();
    assert!(ok.success(), "qemu-io");
    let body = qemu_body(
        "q2",
        &guest,
        "ax.write_ms=100 ax.span_blocks=16",
        &[&disk, &data],
    );
    let (code, v) = a.req("POST", "/v1/vms", Some(&body));
    assert_eq!(code, 201, "{v}");
    wait_console(&a, "q2", 0, "disk-write", 90);
    set_level(&a, "q2", "ha");
    let v = wait_vm(&a, "q2", "version 1", 120, |v| {
        v["volume"]["status"]["version"] == 1 && v["volume"]["status"]["running"].is_null()
    });
    assert_eq!(v["engine"], "qemu", "{v}");
    // The catalog lists it (every 2 s): give it time to be published before the power goes.
    std::thread::sleep(Duration::from_secs(3));

    // Power loss on host-a: the agent, the worker and QEMU die at once.
    let pids: Vec<u32> = a.worker_pids().into_iter().chain(a.qemu_pids()).collect();
    a.signal(libc::SIGKILL);
    for pid in pids {
        kill(pid);
    }
    a.wait();
    let killed = Instant::now();
    let failure = wait_host_failure(&b, "host-a", 120);
    assert_eq!(failure["state"], "done", "{failure}");
    assert_eq!(failure["vms"][0]["target"], "host-b", "{failure}");
    assert_eq!(failure["vms"][0]["outcome"], "restarted", "{failure}");
    assert_eq!(
        std::fs::read_to_string(dir.join("fence.log"))
            .unwrap()
            .trim(),
        "host-a"
    );
    let v = wait_vm(&b, "q2", "running on host-b", 60, |v| {
        v["state"] == "running" && v["level"] == "ha" && v["transition"].is_null()
    });
    assert_eq!(v["engine"], "qemu", "{v}");
    assert!(any_event(&b, "q2", "taken over from host-a"));
    let c = wait_console(&b, "q2", 0, "disk-check", 90);
    println!(
        "QEMU VM of a failed host: powered off -> guest's disk check on host-b after {} ms",
        killed.elapsed().as_millis()
    );
    assert!(c.contains("disk-check ok"), "{c}");
    // The takeover restored the newest version Swift holds (version 1: the only one).
    let version: Option<u64> = events(&b, "q2")
        .iter()
        .filter_map(|e| e["detail"].as_str())
        .find_map(|d| {
            d.split("volume version ")
                .nth(1)
                .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
                .and_then(|n| n.parse().ok())
        });
    assert_eq!(version, Some(1), "the takeover event names the version");
    let restored = storage_b.join("vms/q2/disk1.img");
    assert!(
        std::fs::read(&restored).unwrap() == raw_bytes(&data),
        "{} differs from {}",
        restored.display(),
        data.display()
    );

    // host-a comes back: the VM moved, its QEMU is not started again.
    a.start_again();
    wait_vm(&a, "q2", "moved", 60, |v| v["state"] == "moved");
    assert!(a.qemu_pids().is_empty(), "host-a runs QEMU again");
    drop(b);
    drop(a);
    drop(etcd);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Two agents on loopback that know each other (host-a, host-b), API ports fixed.
fn two_hosts(dir: &Path, base: u16) -> (PathBuf, PathBuf) {
    let cfg = |me: &str, other: &str, mine: u16, theirs: u16, pbase: u16| {
        let storage = dir.join(me);
        let path = dir.join(format!("{me}.toml"));
        std::fs::write(
            &path,
            format!(
                "host = \"{me}\"\nstorage_dir = \"{}\"\npki_dir = \"{}\"\ntoken_file = \"{}\"\n\
                 [api]\nlisten = \"127.0.0.1:{mine}\"\n{}\
                 [[peers]]\nname = \"{other}\"\napi = \"127.0.0.1:{theirs}\"\nlink = \"127.0.0.1\"\nhb = \"127.0.0.1\"\n",
                storage.display(),
                dir.join("pki").display(),
                dir.join("token").display(),
                ports(pbase),
            ),
        )
        .unwrap();
        path
    };
    (
        cfg("host-a", "host-b", base + 90, base + 91, base),
        cfg("host-b", "host-a", base + 91, base + 90, base + 40),
    )
}

#[test]
fn qemu_vm_live_migrates_to_another_agent_with_its_disk_and_level() {
    let _g = serial();
    let test = "qemu_vm_live_migrates_to_another_agent_with_its_disk_and_level";
    let Some(guest) = linux_guest(test) else {
        return;
    };
    let dir = scratch("qemu-migrate");
    let (ca, cb) = two_hosts(&dir, 28500);
    let a = Agent::start(&ca, &dir.join("host-a"));
    let b = Agent::start(&cb, &dir.join("host-b"));
    let disk = qcow2(&dir, "m1.qcow2", 64);
    // The guest's NIC on a bridge both agents' QEMUs attach to; a client reads its TCP counter.
    let net = Bridge::new(
        &format!("axm{}", std::process::id() % 100_000),
        "10.77.91.1/24",
    );
    let mut body = qemu_body(
        "m1",
        &guest,
        "ax.write_ms=300 ax.ip=10.77.91.2/24",
        &[&disk],
    );
    body["qemu"]["nics"] = json!([{ "bridge": net.name }]);
    let (code, v) = a.req("POST", "/v1/vms", Some(&body));
    assert_eq!(code, 201, "{v}");
    set_level(&a, "m1", "ha");
    let c = wait_console(&a, "m1", 0, "disk-check", 120);
    assert!(c.contains("disk-check ok"), "{c}");
    let before = wait_console(&a, "m1", 0, "count 5", 60);

    // Refusals name the problem.
    let (code, v) = a.req("POST", "/v1/vms/m1/migrate", Some(&json!({"to": "host-q"})));
    assert_eq!(code, 400, "{v}");
    assert!(v["error"].as_str().unwrap().contains("unknown host"), "{v}");
    let (code, v) = a.req("POST", "/v1/vms/m1/migrate", Some(&json!({"to": "host-a"})));
    assert_eq!(code, 400, "{v}");

    let client = CounterClient::start("10.77.91.2:7000");
    client.wait_lines(5, 120);
    // The operator's way: axctl waits for the end and prints the figures.
    let out = axctl(a.addr, &dir, &["vm", "migrate", "m1", "--to", "host-b"]);
    assert!(out.contains("migrated to host-b: downtime"), "{out}");
    println!("{out}");
    // Gone from host-a, QEMU included; running on host-b at the same level, its disk a copy there.
    let (code, _) = a.req("GET", "/v1/vms/m1", None);
    assert_eq!(code, 404);
    assert!(qemu_pid(&a, "m1").is_none());
    let v = wait_vm(&b, "m1", "running at ha on host-b", 60, |v| {
        v["state"] == "running" && v["level"] == "ha" && v["transition"].is_null()
    });
    assert_eq!(v["engine"], "qemu");
    let copied = v["qemu"]["disks"][0]["path"].as_str().unwrap().to_string();
    assert!(
        copied.starts_with(dir.join("host-b").to_str().unwrap()),
        "{v}"
    );
    // The guest goes on where it was: host-b's console continues host-a's counter with no gap.
    let last_a = last_count(&before).unwrap();
    let c = wait_console(&b, "m1", 0, &format!("count {}", last_a + 5), 60);
    let first_b = c
        .lines()
        .find_map(|l| {
            l.strip_prefix("count ")
                .and_then(|n| n.trim().parse::<u64>().ok())
        })
        .unwrap();
    assert!(
        first_b > last_a,
        "host-b's counter starts at {first_b}, host-a's was at {last_a} before: the guest rebooted"
    );
    let counts: Vec<u64> = c
        .lines()
        .filter_map(|l| l.strip_prefix("count ").and_then(|n| n.trim().parse().ok()))
        .collect();
    assert!(
        counts.windows(2).all(|w| w[1] == w[0] + 1),
        "a gap or a repeat in host-b's counter: {counts:?}"
    );
    assert!(
        c.contains("disk-write"),
        "the guest writes its disk on host-b: {c}"
    );
    assert!(any_event(&b, "m1", "live migration done"));
    // The TCP client, connected across the switch: no gap, no repeat, and it went on after it.
    let before_end = client.lines().len();
    client.wait_lines(before_end + 5, 120);
    let seen = client.stop();
    assert!(
        seen.windows(2).all(|w| w[1] == w[0] + 1),
        "a gap or a repeat in the TCP counter across the migration: {seen:?}"
    );
    println!(
        "TCP counter across the migration: {} lines, {}..{}, no gap",
        seen.len(),
        seen[0],
        seen[seen.len() - 1]
    );
    drop(a);
    drop(b);
    drop(net);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Whether a process with this pid exists (a test's own processes: no pid reuse within the test).
fn pid_exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

#[test]
fn qemu_vm_migration_cut_short_by_a_source_agent_kill_is_resumed_by_the_next_agent() {
    let _g = serial();
    let test = "qemu_vm_migration_cut_short_by_a_source_agent_kill_is_resumed_by_the_next_agent";
    let Some(guest) = linux_guest(test) else {
        return;
    };
    let dir = scratch("qemu-migrate-resume");
    let (ca, cb) = two_hosts(&dir, 28800);
    let mut a = Agent::start(&ca, &dir.join("host-a"));
    let b = Agent::start(&cb, &dir.join("host-b"));
    let disk = qcow2(&dir, "m2.qcow2", 64);
    let body = qemu_body("m2", &guest, "ax.write_ms=300", &[&disk]);
    let (code, v) = a.req("POST", "/v1/vms", Some(&body));
    assert_eq!(code, 201, "{v}");
    set_level(&a, "m2", "ha");
    let c = wait_console(&a, "m2", 0, "disk-check", 120);
    assert!(c.contains("disk-check ok"), "{c}");
    let before = wait_console(&a, "m2", 0, "count 3", 60);
    let last_a = last_count(&before).unwrap();
    let (src_worker, src_qemu) = (worker_pid(&a, "m2").unwrap(), qemu_pid(&a, "m2").unwrap());

    // A bandwidth cap keeps the RAM phase going for a while (4 MiB/s for the guest's used memory);
    // a downtime limit of 1 s lets it converge at that rate (4 MiB may be left for the switch).
    let (code, v) = a.req(
        "POST",
        "/v1/vms/m2/migrate",
        Some(&json!({"to": "host-b", "max_bandwidth": 4 << 20, "downtime_limit_ms": 1000})),
    );
    assert_eq!(code, 202, "{v}");
    let v = wait_vm(&a, "m2", "sending RAM", 120, |v| {
        v["migration"]["state"] == "running"
            && v["migration"]["worker"]["progress"]["ram_transferred"]
                .as_u64()
                .is_some_and(|n| n > 0)
    });
    println!("source agent SIGKILLed during: {}", v["migration"]);
    a.signal(libc::SIGKILL);
    a.wait();
    // The source's worker and QEMU go on without the agent; the destination waits paused.
    assert!(pid_exists(src_worker) && pid_exists(src_qemu));
    a.start_again();

    // The next agent takes the migration over and brings it to its end.
    let t = Instant::now();
    let mut notes = Vec::new();
    loop {
        let (code, v) = a.req("GET", "/v1/vms/m2", None);
        if code == 404 {
            break;
        }
        assert_eq!(code, 200, "{v}");
        assert_ne!(v["migration"]["state"], "failed", "{v}");
        if let Some(n) = v["migration"]["note"].as_str() {
            if !notes.iter().any(|m: &String| m == n) {
                println!("migration after the restart: {}", v["migration"]);
                notes.push(n.to_string());
            }
        }
        assert!(
            t.elapsed() < Duration::from_secs(300),
            "the resumed migration did not end: {v}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        notes
            .iter()
            .any(|n| n.contains("resumed after an agent restart")),
        "{notes:?}"
    );
    assert!(any_event(&a, "m2", "resumed after an agent restart"));
    assert!(any_event(&a, "m2", "migrated to host-b"));
    // Nothing left on host-a: no worker, no QEMU, no files.
    let t = Instant::now();
    while pid_exists(src_worker) || pid_exists(src_qemu) {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "host-a's worker or QEMU still runs"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(a.qemu_pids().is_empty());
    assert!(!dir.join("host-a/vms/m2").exists());

    // Running on host-b exactly once, at its level, the guest going on where it was.
    let v = wait_vm(&b, "m2", "running at ha on host-b", 60, |v| {
        v["state"] == "running" && v["level"] == "ha" && v["transition"].is_null()
    });
    assert_eq!(v["engine"], "qemu");
    assert_eq!(b.qemu_pids().len(), 1, "{:?}", b.qemu_pids());
    let c = wait_console(&b, "m2", 0, "count ", 60);
    let first_b = last_count(&c).unwrap();
    let c = wait_console(&b, "m2", 0, &format!("count {}", first_b + 5), 120);
    let counts: Vec<u64> = c
        .lines()
        .filter_map(|l| l.strip_prefix("count ").and_then(|n| n.trim().parse().ok()))
        .collect();
    assert!(
        counts.first().is_some_and(|f| *f > last_a),
        "host-b's counter starts at {:?}, host-a's was at {last_a}: the guest rebooted",
        counts.first()
    );
    assert!(
        counts.windows(2).all(|w| w[1] == w[0] + 1),
        "a gap or a repeat in host-b's counter: {counts:?}"
    );
    // The guest's own disk check: it writes and re-reads its blocks on host-b's copy.
    let c = wait_console(&b, "m2", 0, "disk-write", 60);
    assert!(!c.contains("FAILED"), "{c}");
    assert!(any_event(&b, "m2", "live migration done"));
    println!(
        "resumed migration: host-a's counter at {last_a} before, host-b's from {} to {}",
        counts[0],
        counts[counts.len() - 1]
    );
    drop(a);
    drop(b);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A bridge with an address on it, removed on drop.
struct Bridge {
    name: String,
}

impl Bridge {
    fn new(name: &str, addr: &str) -> Bridge {
        let ip = |args: &[&str]| {
            let st = Command::new("ip").args(args).status().unwrap();
            assert!(st.success(), "ip {args:?}");
        };
        let _ = Command::new("ip").args(["link", "del", name]).status();
        ip(&["link", "add", name, "type", "bridge"]);
        ip(&["addr", "add", addr, "dev", name]);
        ip(&["link", "set", name, "up"]);
        Bridge {
            name: name.to_string(),
        }
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.name])
            .status();
    }
}

/// A client of the guest's TCP counter stream (`count N` lines), reading in a thread.
struct CounterClient {
    seen: std::sync::Arc<Mutex<Vec<u64>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl CounterClient {
    fn start(addr: &str) -> CounterClient {
        use std::io::BufRead;
        let seen: std::sync::Arc<Mutex<Vec<u64>>> = Default::default();
        let stop: std::sync::Arc<std::sync::atomic::AtomicBool> = Default::default();
        let (s2, stop2, addr) = (seen.clone(), stop.clone(), addr.to_string());
        let thread = std::thread::spawn(move || {
            let t = Instant::now();
            // The guest's network comes up with its boot: retry the connect.
            let stream = loop {
                match std::net::TcpStream::connect_timeout(
                    &addr.parse().unwrap(),
                    Duration::from_secs(2),
                ) {
                    Ok(s) => break s,
                    Err(e) => {
                        assert!(t.elapsed() < Duration::from_secs(90), "connect {addr}: {e}");
                        std::thread::sleep(Duration::from_millis(300));
                    }
                }
            };
            stream
                .set_read_timeout(Some(Duration::from_millis(500)))
                .unwrap();
            let mut r = std::io::BufReader::new(stream);
            let mut line = String::new();
            while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
                match r.read_line(&mut line) {
                    Ok(0) => break,
                    Ok(_) if line.ends_with('\n') => {
                        if let Some(n) = line
                            .trim()
                            .strip_prefix("count ")
                            .and_then(|n| n.parse().ok())
                        {
                            s2.lock().unwrap().push(n);
                        }
                        line.clear();
                    }
                    // A timeout keeps the partial line for the next read.
                    _ => {}
                }
            }
        });
        CounterClient {
            seen,
            stop,
            thread: Some(thread),
        }
    }

    fn lines(&self) -> Vec<u64> {
        self.seen.lock().unwrap().clone()
    }

    fn wait_lines(&self, n: usize, secs: u64) {
        let t = Instant::now();
        while self.lines().len() < n {
            let seen = self.lines();
            assert!(
                t.elapsed() < Duration::from_secs(secs),
                "the TCP counter stream gave {} lines, not {n} (last {:?}; the reader {})",
                seen.len(),
                seen.last(),
                if self.thread.as_ref().is_some_and(|t| t.is_finished()) {
                    "ended: connection closed or never made"
                } else {
                    "still reading"
                }
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn stop(mut self) -> Vec<u64> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.lines()
    }
}
