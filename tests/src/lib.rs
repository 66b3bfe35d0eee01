//! End-to-end and fault-injection harness for ax.
//!
//! * [`netns`]: a [`netns::Lab`] of simulated hosts (`host-a`, `host-b`, `host-c`, `witness`, ...) in
//!   network namespaces wired through per-network bridges in a "switch" namespace; run commands and
//!   threads inside a host, cut links, rate-limit with `tc tbf`; torn down on drop.
//! * [`faults`]: SIGKILL, SIGSTOP/SIGCONT, link cuts and host isolation, each returning an
//!   [`faults::Injection`] record for campaign summaries.
//! * [`proxy`]: userspace UDP and TCP fault proxies (delay, jitter, drop, duplicate, corrupt, blackhole;
//!   seeded; counters), on loopback or inside a lab host.
//! * [`lan`]: a layer-2 LAN for a lab (a `br0` per VM host, a client), so a VM's NIC reaches the client
//!   on whichever host the VM runs; [`stream`]: the client's receiver of a sequence-numbered UDP
//!   stream (gaps, repeats, largest silence); [`colo`]: a COLO pair of `ax-agent colo-node`s on it.
//!
//! Tests that need root and iproute2 call [`require_netns`] (or [`require_tc`]) first: it prints a loud
//! `SKIPPED: ...` line on stdout and stderr and returns `false` when the machine cannot run them. Setting
//! `AX_TESTS_REQUIRE_NETNS=1` turns that skip into a failure.
//!
//! See `tests/README.md` for the addressing plan and examples.

pub mod agent;
pub mod colo;
pub mod colo_campaign;
pub mod faults;
pub mod lan;
pub mod netns;
pub mod proxy;
pub mod stream;

/// Environment variable that turns a [`skip`] into a panic (for machines that must run everything).
pub const REQUIRE_ENV: &str = "AX_TESTS_REQUIRE_NETNS";

/// Reports a skipped test loudly on stdout and stderr. The stdout line goes through `println!` (shown
/// by the test harness with `--nocapture` or when a test fails); the stderr line is written to the
/// process's real stderr, which the harness does not capture, so it shows in every run.
/// Panics instead if [`REQUIRE_ENV`] is set to anything but `0` or empty.
pub fn skip(test: &str, why: &str) {
    use std::io::Write;
    let line = format!("SKIPPED: {test}: {why}");
    println!("{line}");
    let _ = writeln!(std::io::stderr().lock(), "{line}");
    if std::env::var(REQUIRE_ENV).is_ok_and(|v| !v.is_empty() && v != "0") {
        panic!("{line} (and {REQUIRE_ENV} is set, so skipping is a failure)");
    }
}

/// `true` if network namespaces can be used here; otherwise reports the test as skipped (see [`skip`]).
pub fn require_netns(test: &str) -> bool {
    match netns::check_available() {
        Ok(()) => true,
        Err(e) => {
            skip(test, &e.to_string());
            false
        }
    }
}

/// Like [`require_netns`], also requiring `tc`.
pub fn require_tc(test: &str) -> bool {
    match netns::check_tc_available() {
        Ok(()) => true,
        Err(e) => {
            skip(test, &e.to_string());
            false
        }
    }
}
