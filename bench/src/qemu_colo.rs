//! COLO benches for `ax-bench qemu` (QEMU 7.2 under KVM, `ax-agent colo-node` on host-a and host-b of a
//! lab of network namespaces, `ax_tests::colo`):
//!
//! - **Checkpoint pause** (`colo_checkpoint_p50_ms`, `colo_checkpoint_p99_ms`): the `qdirtier` guest
//!   rewriting `pages=1024` pages continuously (so every 100 ms checkpoint carries the whole working
//!   set), protected by the nodes (COLO's channels through ax's relays over the lab's replication
//!   network); the pauses from the primary's `STOP`/`RESUME` events and QEMU's timestamps on them
//!   (`ax_qemu::colo::checkpoint_pauses`, read on a second QMP monitor given in the def's
//!   `extra_args`), the first second after entering COLO left out. Side by side in the same run, the
//!   native engine's stun for the same dirty set (`native_stun_p99_ms`: statepoint's dirtier with a
//!   1024-page working set and 1024-page epochs, copy after resume, as `ax-bench statepoint` measures
//!   it) and their ratio.
//! - **Guest slowdown** (`colo_guest_slowdown`): the same guest's rounds per second (from its console)
//!   on host-a before protection and in COLO, `1 - protected / unprotected`.
//! - **RTO** (`qemu_rto_p50_ms`, `qemu_rto_p99_ms`): `ax_tests::colo::stream_failover` — the `qudp`
//!   guest streaming 100 datagrams/s to the client through colo-compare; host-a's node and QEMU
//!   SIGKILLed; from the kill to the first datagram above the last one received, at the client (so it
//!   includes up to one stream period, 10 ms, of waiting for the guest's next datagram). A fresh
//!   pair per kill (3 in quick mode, 10 otherwise); each kill's gap and repeats are reported too
//!   (`colo_failover_gap_max`, `colo_failover_repeats`).

use std::path::Path;
use std::time::{Duration, Instant};

use ax_qemu::colo::{checkpoint_pauses, quantile};
use ax_qemu::def::{Accel, Disk, QemuDef};
use ax_qemu::qmp::Qmp;
use ax_tests::colo::ColoLab;
use serde_json::{json, Map, Value};

use crate::BoxError;

/// Every wait's bound.
const WAIT: Duration = Duration::from_secs(90);
/// The dirty working set, pages.
const PAGES: u64 = 1024;
/// The nodes' checkpoint period (`colo-node`'s default `--epoch-ms`).
const EPOCH_MS: u64 = 100;

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The last `round N` the dirtier printed on `console`.
fn last_round(console: &Path) -> u64 {
    let rounds = ax_tests::colo::console_numbers(console, "round ");
    rounds.last().copied().unwrap_or(0)
}

/// Rounds per second over `window`.
fn round_rate(console: &Path, window: Duration) -> f64 {
    let (r0, t0) = (last_round(console), Instant::now());
    std::thread::sleep(window);
    let (r1, t1) = (last_round(console), Instant::now());
    r1.saturating_sub(r0) as f64 / (t1 - t0).as_secs_f64()
}

struct Checkpoints {
    pauses: Vec<Duration>,
    unprotected_rate: f64,
    protected_rate: f64,
}

fn checkpoints(
    rt: &tokio::runtime::Runtime,
    agent: &Path,
    dir: &Path,
    window: Duration,
) -> Result<Checkpoints, BoxError> {
    let h = ColoLab::start(agent, dir)?;
    let kernel = dir.join("qdirtier.elf");
    ax_guests::qemu::write_image(ax_guests::qemu::QDIRTIER, &kernel)?;
    let def_b = QemuDef {
        kernel: Some(kernel),
        append: Some(format!("pages={PAGES} every=4")),
        disks: vec![Disk {
            path: "disk.raw".into(),
        }],
        accel: Accel::Kvm,
        colo: true,
        ..QemuDef::default()
    };
    let mon = h.state("host-a").join("bench-qmp.sock");
    let mut def_a = def_b.clone();
    def_a.extra_args = vec![
        "-qmp".into(),
        format!("unix:{},server=on,wait=off", mon.display()),
    ];
    let _a = h.node("host-a", &def_a, true, &[])?;
    let console = h.run_files("host-a").console();
    let end = Instant::now() + WAIT;
    while last_round(&console) == 0 || !mon.exists() {
        if Instant::now() >= end {
            return Err(format!("the dirtier did not start on host-a within {WAIT:?}").into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let (qmp, mut events) = rt.block_on(Qmp::connect(&mon, WAIT))?;
    std::thread::sleep(Duration::from_secs(1));
    let unprotected_rate = round_rate(&console, window);

    let _b = h.node("host-b", &def_b, false, &[])?;
    h.wait_log("host-a", "protection complete: in COLO", 1, WAIT)?;
    let skip = Duration::from_secs(1);
    let pauses = rt.spawn(async move {
        // Everything queued so far (protect's own stop and resume) and the first second of COLO.
        let _ = checkpoint_pauses(&mut events, skip).await;
        checkpoint_pauses(&mut events, window).await.0
    });
    std::thread::sleep(skip);
    let protected_rate = round_rate(&console, window);
    let pauses = rt.block_on(pauses)?;
    drop(qmp);
    drop(h);
    let _ = std::fs::remove_dir_all(dir);
    Ok(Checkpoints {
        pauses,
        unprotected_rate,
        protected_rate,
    })
}

/// The COLO keys of `ax-bench qemu` (see the module's documentation); `colo_skipped` with the reason
/// where COLO cannot run here.
pub fn colo(quick: bool) -> Result<Map<String, Value>, BoxError> {
    let mut m = Map::new();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    if let Some(why) = rt.block_on(ax_tests::colo::unavailable()) {
        println!("SKIPPED: qemu colo bench: {why}");
        m.insert("colo_skipped".into(), json!(why));
        return Ok(m);
    }
    let agent = crate::failover::agent_binary()?;
    let base = std::env::temp_dir().join(format!("ax-bench-colo-{}", std::process::id()));
    let window = Duration::from_secs(if quick { 5 } else { 20 });

    println!("== COLO checkpoint pause vs native stun, {PAGES} dirty pages ==");
    let c = checkpoints(&rt, &agent, &base.join("checkpoints"), window)?;
    let (p50, p99) = (quantile(&c.pauses, 0.5), quantile(&c.pauses, 0.99));
    let (mut manual, mut boost) = (false, false);
    let native = crate::stun_row(
        PAGES,
        if quick { 40 } else { 200 },
        true,
        statepoint::EpochConfig::default().pre_protect_pages,
        &mut manual,
        &mut boost,
    )?;
    let native_p99_ms = native.stun_p99_us / 1e3;
    let slowdown = 1.0 - c.protected_rate / c.unprotected_rate.max(f64::MIN_POSITIVE);
    println!(
        "COLO ({} checkpoints, {EPOCH_MS} ms period): p50 {:.1} ms, p99 {:.1} ms; native stun p99 {:.2} ms; guest {:.0} → {:.0} rounds/s (slowdown {:.0} %)",
        c.pauses.len(),
        ms(p50),
        ms(p99),
        native_p99_ms,
        c.unprotected_rate,
        c.protected_rate,
        slowdown * 100.0
    );

    let kills = if quick { 3 } else { 10 };
    println!("== QEMU RTO: {kills} kills of a COLO primary streaming to a client ==");
    let (mut rtos, mut gap_max, mut repeats) = (Vec::new(), 0u64, 0u64);
    for i in 0..kills {
        let run =
            ax_tests::colo::stream_failover(&agent, &base.join(format!("kill{i}")), 100, WAIT)?;
        let gap = run.report.missing;
        println!(
            "kill {i}: first new datagram after {:.0} ms, gap {gap}, repeats {}",
            ms(run.rto),
            run.report.repeats
        );
        gap_max = gap_max.max(gap);
        repeats += run.report.repeats;
        rtos.push(run.rto);
    }
    let _ = std::fs::remove_dir_all(&base);

    let mut put = |k: &str, v: Value| {
        m.insert(k.to_string(), v);
    };
    put("colo_dirty_pages", json!(PAGES));
    put("colo_epoch_ms", json!(EPOCH_MS));
    put("colo_checkpoints", json!(c.pauses.len()));
    put("colo_checkpoint_p50_ms", json!(ms(p50)));
    put("colo_checkpoint_p99_ms", json!(ms(p99)));
    put("native_stun_p99_ms", json!(native_p99_ms));
    put(
        "colo_vs_native_p99",
        json!(ms(p99) / native_p99_ms.max(f64::MIN_POSITIVE)),
    );
    put("colo_unprotected_rounds_per_s", json!(c.unprotected_rate));
    put("colo_protected_rounds_per_s", json!(c.protected_rate));
    put("colo_guest_slowdown", json!(slowdown));
    put("qemu_rto_kills", json!(kills));
    put("qemu_rto_p50_ms", json!(ms(quantile(&rtos, 0.5))));
    put("qemu_rto_p99_ms", json!(ms(quantile(&rtos, 0.99))));
    put("colo_failover_gap_max", json!(gap_max));
    put("colo_failover_repeats", json!(repeats));
    Ok(m)
}
