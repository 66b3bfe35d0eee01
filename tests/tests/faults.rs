//! Fault injection: kill, stop/continue, link cut, host isolation, blackhole routes; each with its record.

mod common;

use std::os::unix::process::ExitStatusExt;
use std::process::{Child, Command};
use std::time::{Duration, SystemTime};

use ax_tests::faults::{self, FaultKind, FaultLog};
use ax_tests::netns::{Lab, Side};
use common::{delivers, drain, host_udp, proc_state, wait_until};

const SEC: Duration = Duration::from_secs(1);

/// A `sleep 1000` child, killed on drop.
struct Sleeper(Child);

impl Sleeper {
    fn new() -> Self {
        Self(
            Command::new("sleep")
                .arg("1000")
                .spawn()
                .expect("spawn sleep"),
        )
    }
    fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Sleeper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn kill_sends_sigkill_and_records_it() {
    let mut s = Sleeper::new();
    let pid = s.pid();
    let rec = faults::kill(pid).expect("kill");
    assert_eq!(rec.kind, FaultKind::Kill);
    assert_eq!(rec.target, format!("pid {pid}"));
    assert!(rec.end >= rec.start);
    let st = s.0.wait().expect("wait");
    assert_eq!(st.signal(), Some(libc::SIGKILL));
    // A pid above any pid_max: ESRCH, reported with the pid (never signal a reaped pid: it may be reused).
    let e = faults::kill(2_000_000_000).expect_err("no such process");
    assert!(e.to_string().contains("2000000000"), "{e}");
}

#[test]
fn stop_guard_stops_and_resumes() {
    let s = Sleeper::new();
    let pid = s.pid();
    assert!(wait_until(5 * SEC, || proc_state(pid) == Some('S')));
    let g = faults::stop(pid).expect("stop");
    assert!(
        wait_until(5 * SEC, || proc_state(pid) == Some('T')),
        "not stopped: {:?}",
        proc_state(pid)
    );
    std::thread::sleep(Duration::from_millis(50));
    let rec = g.resume().expect("resume");
    assert_eq!(rec.kind, FaultKind::Stop);
    assert!(rec.duration() >= Duration::from_millis(50));
    assert!(wait_until(5 * SEC, || proc_state(pid) == Some('S')));

    // Dropping the guard (e.g. a panicking test) resumes too.
    let g = faults::stop(pid).expect("stop");
    assert!(wait_until(5 * SEC, || proc_state(pid) == Some('T')));
    drop(g);
    assert!(wait_until(5 * SEC, || proc_state(pid) == Some('S')));
}

#[test]
fn stop_for_pauses_for_the_duration() {
    let s = Sleeper::new();
    let pid = s.pid();
    let watcher = std::thread::spawn(move || {
        // Observe the stop from another thread while stop_for blocks.
        wait_until(5 * SEC, || proc_state(pid) == Some('T'))
    });
    let rec = faults::stop_for(pid, Duration::from_millis(300)).expect("stop_for");
    assert!(watcher.join().expect("watcher"), "never seen stopped");
    assert_eq!(rec.kind, FaultKind::Stop);
    assert!(rec.duration() >= Duration::from_millis(300));
    assert!(wait_until(5 * SEC, || proc_state(pid) == Some('S')));
}

#[tokio::test]
async fn stop_for_async_pauses_and_resumes() {
    let s = Sleeper::new();
    let pid = s.pid();
    let rec = faults::stop_for_async(pid, Duration::from_millis(200))
        .await
        .expect("stop_for_async");
    assert!(rec.duration() >= Duration::from_millis(200));
    assert!(wait_until(5 * SEC, || proc_state(pid) == Some('S')));
}

#[test]
fn link_cut_and_isolation_record_and_restore() {
    if !ax_tests::require_netns("link_cut_and_isolation_record_and_restore") {
        return;
    }
    let lab = Lab::ax().expect("lab");
    let log = FaultLog::new();
    let a = host_udp(&lab, "host-a", "repl");
    let b = host_udp(&lab, "host-b", "repl");
    let a_hb = host_udp(&lab, "host-a", "hb");
    let w_hb = host_udp(&lab, "witness", "hb");
    assert!(delivers(&a, &b, 5 * SEC));

    // Explicit restore.
    let cut = faults::cut_link(&lab, "host-b", "repl").expect("cut");
    drain(&b);
    assert!(!delivers(&a, &b, Duration::from_millis(500)));
    let rec = log.record(cut.restore().expect("restore"));
    assert_eq!(rec.kind, FaultKind::LinkCut);
    assert_eq!(rec.target, "host-b/repl");
    assert!(rec.detail.contains("switch"));
    assert!(rec.duration() >= Duration::from_millis(500));
    assert!(delivers(&a, &b, 10 * SEC));

    // Host side, restored by drop.
    {
        let _cut = faults::cut_link_side(&lab, "host-a", "repl", Side::Host).expect("cut");
        assert!(!delivers(&a, &b, Duration::from_millis(300)));
    }
    assert!(delivers(&a, &b, 10 * SEC), "drop did not restore");

    // Timed cut.
    let rec = log.record(
        faults::cut_link_for(&lab, "host-a", "repl", Duration::from_millis(200)).expect("cut_for"),
    );
    assert!(rec.duration() >= Duration::from_millis(200));
    assert!(delivers(&a, &b, 10 * SEC));

    // Isolation cuts every link of the host.
    let iso = faults::isolate(&lab, "host-a").expect("isolate");
    drain(&w_hb);
    assert!(!delivers(&a, &b, Duration::from_millis(400)));
    assert!(!delivers(&a_hb, &w_hb, Duration::from_millis(400)));
    let rec = log.record(iso.restore().expect("restore"));
    assert_eq!(rec.kind, FaultKind::Isolate);
    assert_eq!(rec.target, "host-a");
    assert!(rec.detail.contains("repl") && rec.detail.contains("hb"));
    assert!(delivers(&a, &b, 10 * SEC));
    assert!(delivers(&a_hb, &w_hb, 10 * SEC));

    // Kill of a process inside a host, logged too.
    let mut child = lab.spawn("host-c", "sleep", &["1000"]).expect("spawn");
    log.record(faults::kill(child.id()).expect("kill"));
    assert_eq!(child.wait().expect("wait").signal(), Some(libc::SIGKILL));

    let summary = log.summary();
    assert!(
        summary.contains("4 faults: link-cut=2 isolate=1 kill=1"),
        "{summary}"
    );
    let json = serde_json::to_string(&log.records()).expect("json");
    assert!(json.contains("\"kind\":\"link_cut\""), "{json}");
}

#[test]
fn rate_limit_for_records_and_clears() {
    if !ax_tests::require_tc("rate_limit_for_records_and_clears") {
        return;
    }
    let lab = Lab::builder()
        .network("hb", "10.77.2.0/24")
        .host("host-a", &["hb"])
        .host("witness", &["hb"])
        .build()
        .expect("lab");
    let rec = faults::rate_limit_for(
        &lab,
        "witness",
        "hb",
        Side::Switch,
        ax_tests::netns::RateLimit::bits_per_sec(64_000),
        Duration::from_millis(100),
    )
    .expect("rate limit");
    assert_eq!(rec.kind, FaultKind::RateLimit);
    assert!(rec.detail.contains("rate=64000"), "{}", rec.detail);
    assert!(!lab
        .qdisc("witness", "hb", Side::Switch)
        .expect("qdisc")
        .contains("tbf"));
    assert!(rec.end >= rec.start && rec.start <= SystemTime::now());
}

#[test]
fn blackhole_routes_partition_two_hosts_only_and_are_removed() {
    if !ax_tests::require_netns("blackhole_routes_partition_two_hosts_only_and_are_removed") {
        return;
    }
    let lab = Lab::ax().expect("lab");
    let a = host_udp(&lab, "host-a", "hb");
    let b = host_udp(&lab, "host-b", "hb");
    let w = host_udp(&lab, "witness", "hb");
    assert!(delivers(&a, &b, 5 * SEC));
    let ip = |h: &str| lab.addr(h, "hb").expect("address");
    let routes = [("host-a", ip("host-b")), ("host-b", ip("host-a"))];

    // Explicit restore: a and b cannot reach each other, both still reach the witness.
    let bh = faults::blackhole(&lab, &routes).expect("blackhole");
    drain(&b);
    drain(&a);
    assert!(!delivers(&a, &b, Duration::from_millis(400)));
    assert!(!delivers(&b, &a, Duration::from_millis(400)));
    assert!(delivers(&a, &w, 5 * SEC));
    assert!(delivers(&b, &w, 5 * SEC));
    let rec = bh.restore().expect("restore");
    assert_eq!(rec.kind, FaultKind::Partition);
    assert!(rec.target.contains("host-a") && rec.target.contains("host-b"));
    assert!(delivers(&a, &b, 10 * SEC));

    // Removed on drop too, and timed.
    {
        let _bh = faults::blackhole(&lab, &routes).expect("blackhole");
        assert!(!delivers(&a, &b, Duration::from_millis(300)));
    }
    assert!(delivers(&a, &b, 10 * SEC), "drop did not remove the routes");
    let rec = faults::blackhole_for(&lab, &routes, Duration::from_millis(200)).expect("timed");
    assert!(rec.duration() >= Duration::from_millis(200));
    assert!(delivers(&a, &b, 10 * SEC));
}
