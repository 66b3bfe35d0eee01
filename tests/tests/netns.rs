//! The namespace lab: hosts come up and talk on each network, links go down and up, rate limits apply,
//! children are killed and nothing is left behind, even on panic or when a run was killed.

mod common;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ax_tests::netns::{
    self, cleanup_stale, netns_command, proc_start_time, Lab, NetnsError, RateLimit, Side,
};
use common::{delivers, drain, host_udp, ip_netns_list_contains, wait_until};

const SEC: Duration = Duration::from_secs(1);

#[test]
fn addresses_follow_the_plan() {
    if !ax_tests::require_netns("addresses_follow_the_plan") {
        return;
    }
    let lab = Lab::ax().expect("lab");
    let a = |h: &str, n: &str| lab.addr(h, n).expect("addr");
    assert_eq!(a("host-a", "repl"), Ipv4Addr::new(10, 77, 1, 11));
    assert_eq!(a("host-b", "repl"), Ipv4Addr::new(10, 77, 1, 12));
    assert_eq!(a("host-c", "repl"), Ipv4Addr::new(10, 77, 1, 13));
    assert_eq!(a("host-a", "hb"), Ipv4Addr::new(10, 77, 2, 11));
    assert_eq!(a("witness", "hb"), Ipv4Addr::new(10, 77, 2, 14));
    assert!(matches!(
        lab.addr("witness", "repl"),
        Err(NetnsError::NotAttached { .. })
    ));
    assert!(matches!(
        lab.addr("nobody", "repl"),
        Err(NetnsError::UnknownHost(_))
    ));
    assert!(matches!(
        lab.addr("host-a", "nonet"),
        Err(NetnsError::UnknownNetwork(_))
    ));
    // Namespace names carry the prefix, this pid and its start time.
    let me = std::process::id();
    let prefix = format!("axt-{me}-{}-", proc_start_time(me).expect("start time"));
    for ns in lab.namespaces() {
        assert!(ns.starts_with(&prefix), "{ns} lacks {prefix}");
    }
    assert_eq!(lab.namespaces().len(), 5, "switch + 4 hosts");
}

#[test]
fn hosts_exchange_udp_on_each_network() {
    if !ax_tests::require_netns("hosts_exchange_udp_on_each_network") {
        return;
    }
    let lab = Lab::ax().expect("lab");
    let mut pairs = 0;
    for net in lab.networks().to_vec() {
        let hosts: Vec<String> = lab
            .hosts()
            .iter()
            .filter(|h| lab.addr(&h.name, &net.name).is_ok())
            .map(|h| h.name.clone())
            .collect();
        for from in &hosts {
            for to in &hosts {
                if from == to {
                    continue;
                }
                let s = host_udp(&lab, from, &net.name);
                let r = host_udp(&lab, to, &net.name);
                assert!(
                    delivers(&s, &r, 5 * SEC),
                    "{from} -> {to} on {} did not deliver",
                    net.name
                );
                pairs += 1;
            }
        }
    }
    // repl: 3 hosts (6 ordered pairs); hb: 4 hosts (12).
    assert_eq!(pairs, 18);
}

#[test]
fn exec_runs_inside_the_host_and_errors_name_the_command() {
    if !ax_tests::require_netns("exec_runs_inside_the_host_and_errors_name_the_command") {
        return;
    }
    let lab = Lab::ax().expect("lab");
    let out = lab
        .exec("host-b", "ip", &["-4", "-o", "addr", "show"])
        .expect("ip addr in host-b");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("10.77.1.12/24"), "{text}");
    assert!(text.contains("10.77.2.12/24"), "{text}");
    assert!(!text.contains("10.77.1.11"), "{text}");
    let out = lab
        .exec("witness", "ip", &["-4", "-o", "addr", "show"])
        .expect("ip addr in witness");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("10.77.2.14/24") && !text.contains("10.77.1."),
        "{text}"
    );

    let err = lab
        .exec("host-a", "ip", &["link", "set", "nosuchdev", "up"])
        .expect_err("must fail");
    let msg = err.to_string();
    assert!(msg.contains("ip link set nosuchdev up"), "{msg}");
    assert!(msg.contains("host-a"), "{msg}");
    assert!(
        msg.contains("nosuchdev") && msg.to_lowercase().contains("cannot find device"),
        "stderr missing: {msg}"
    );
    let err = lab
        .exec("host-a", "/nonexistent/binary", &["x"])
        .expect_err("must fail");
    assert!(err.to_string().contains("/nonexistent/binary x"), "{err}");
}

#[test]
fn link_down_stops_traffic_and_link_up_restores_it() {
    if !ax_tests::require_netns("link_down_stops_traffic_and_link_up_restores_it") {
        return;
    }
    let lab = Lab::ax().expect("lab");
    let a_repl = host_udp(&lab, "host-a", "repl");
    let b_repl = host_udp(&lab, "host-b", "repl");
    let a_hb = host_udp(&lab, "host-a", "hb");
    let b_hb = host_udp(&lab, "host-b", "hb");
    assert!(delivers(&a_repl, &b_repl, 5 * SEC), "baseline repl");
    assert!(delivers(&a_hb, &b_hb, 5 * SEC), "baseline hb");

    for side in [Side::Switch, Side::Host] {
        lab.set_link("host-b", "repl", side, false)
            .expect("link down");
        drain(&b_repl);
        assert!(
            !delivers(&a_repl, &b_repl, Duration::from_millis(600)),
            "repl still delivers with host-b's link down ({side:?})"
        );
        assert!(
            !delivers(&b_repl, &a_repl, Duration::from_millis(300)),
            "host-b still sends on repl ({side:?})"
        );
        // The other network is unaffected.
        assert!(
            delivers(&a_hb, &b_hb, 5 * SEC),
            "hb broken by a repl cut ({side:?})"
        );
        lab.set_link("host-b", "repl", side, true).expect("link up");
        assert!(
            delivers(&a_repl, &b_repl, 10 * SEC),
            "repl not restored ({side:?})"
        );
        assert!(
            delivers(&b_repl, &a_repl, 10 * SEC),
            "reverse not restored ({side:?})"
        );
    }

    // The convenience pair is the switch side.
    lab.link_down("host-a", "hb").expect("down");
    drain(&b_hb);
    assert!(!delivers(&a_hb, &b_hb, Duration::from_millis(500)));
    lab.link_up("host-a", "hb").expect("up");
    assert!(delivers(&a_hb, &b_hb, 10 * SEC));
}

#[test]
fn spawned_children_run_inside_and_die_with_the_lab() {
    if !ax_tests::require_netns("spawned_children_run_inside_and_die_with_the_lab") {
        return;
    }
    let lab = Lab::ax().expect("lab");
    // A child's view of the network is the host's.
    let child = lab
        .spawn_with("host-c", "ip", |c| {
            c.args(["-4", "-o", "addr", "show"]).stdout(Stdio::piped());
        })
        .expect("spawn ip");
    let out = child.into_inner().wait_with_output().expect("wait");
    assert!(String::from_utf8_lossy(&out.stdout).contains("10.77.1.13/24"));

    let tracked = lab.spawn("host-a", "sleep", &["1000"]).expect("spawn");
    let pid = tracked.id();
    assert!(lab.pids("host-a").expect("pids").contains(&pid));
    assert!(!lab.pids("host-b").expect("pids").contains(&pid));
    // Handed over: the caller owns the Child, but the lab still kills it at teardown.
    let mut untracked = lab
        .spawn("host-b", "sleep", &["1000"])
        .expect("spawn")
        .into_inner();
    // A grandchild (sh forks sleep) is killed too: teardown sweeps the namespace, not a pid list.
    let shell = lab
        .spawn("witness", "sh", &["-c", "sleep 1000 & sleep 1000; wait"])
        .expect("spawn sh");
    assert!(wait_until(5 * SEC, || lab
        .pids("witness")
        .map(|p| p.len() >= 3)
        .unwrap_or(false)));
    let witness_pids = lab.pids("witness").expect("pids");
    let names: Vec<String> = lab.namespaces().to_vec();

    drop(lab);
    let deadline = Instant::now() + 5 * SEC;
    let status = loop {
        if let Some(st) = untracked.try_wait().expect("try_wait") {
            break st;
        }
        assert!(
            Instant::now() < deadline,
            "untracked child survived teardown"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(libc::SIGKILL));
    for p in witness_pids {
        assert!(
            wait_until(5 * SEC, || {
                common::proc_state(p).is_none_or(|s| s == 'Z')
            }),
            "pid {p} of witness survived"
        );
    }
    drop(tracked);
    drop(shell);
    for n in names {
        assert!(!ip_netns_list_contains(&n), "{n} left behind");
    }
}

#[test]
fn teardown_leaves_no_namespace_behind() {
    if !ax_tests::require_netns("teardown_leaves_no_namespace_behind") {
        return;
    }
    let lab = Lab::ax().expect("lab");
    let names = lab.namespaces().to_vec();
    for n in &names {
        assert!(ip_netns_list_contains(n), "{n} missing while the lab is up");
    }
    lab.teardown().expect("explicit teardown");
    for n in &names {
        assert!(!ip_netns_list_contains(n), "{n} left behind");
        assert!(!netns::netns_path(n).exists());
    }

    // Dropping does the same.
    let lab = Lab::ax().expect("lab");
    let names = lab.namespaces().to_vec();
    drop(lab);
    for n in &names {
        assert!(!ip_netns_list_contains(n), "{n} left behind by drop");
    }
}

#[test]
fn teardown_happens_during_a_panic() {
    if !ax_tests::require_netns("teardown_happens_during_a_panic") {
        return;
    }
    let names = std::sync::Mutex::new(Vec::new());
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let lab = Lab::ax().expect("lab");
        let _child = lab.spawn("host-a", "sleep", &["1000"]).expect("spawn");
        *names.lock().unwrap() = lab.namespaces().to_vec();
        panic!("deliberate panic with a lab up");
    }));
    assert!(r.is_err());
    let names = names.into_inner().unwrap();
    assert_eq!(names.len(), 5);
    for n in &names {
        assert!(!ip_netns_list_contains(n), "{n} left behind by a panic");
    }
}

#[test]
fn cleanup_stale_removes_only_dead_owners_namespaces() {
    if !ax_tests::require_netns("cleanup_stale_removes_only_dead_owners_namespaces") {
        return;
    }
    // A prefix of its own, so parallel labs' automatic cleanup (prefix "axt-") never sees these.
    let prefix = "axtstale-";
    let me = std::process::id();
    let my_start = proc_start_time(me).expect("start time");
    // A pid that just died (and a start time no live process has).
    let mut t = Command::new("true").spawn().expect("spawn true");
    let dead = t.id();
    t.wait().expect("wait");
    let stale = format!("{prefix}{dead}-1-0-host-x");
    // Our own pid but another start time: a reused pid, so also stale.
    let reused = format!("{prefix}{me}-{}-0-host-y", my_start + 1);
    let live = format!("{prefix}{me}-{my_start}-0-host-z");

    struct Guard(Vec<String>);
    impl Drop for Guard {
        fn drop(&mut self) {
            for n in &self.0 {
                let _ = Command::new("ip").args(["netns", "del", n]).output();
            }
        }
    }
    let _guard = Guard(vec![stale.clone(), reused.clone(), live.clone()]);
    for n in [&stale, &reused, &live] {
        let st = Command::new("ip")
            .args(["netns", "add", n])
            .status()
            .expect("ip netns add");
        assert!(st.success(), "ip netns add {n}");
    }
    // A process left running inside the stale namespace (as after a killed run).
    let mut orphan = netns_command(&netns::netns_path(&stale), "sleep")
        .expect("command")
        .arg("1000")
        .spawn()
        .expect("spawn in stale ns");

    let removed = cleanup_stale(prefix).expect("cleanup");
    assert!(removed.contains(&stale), "{removed:?}");
    assert!(removed.contains(&reused), "{removed:?}");
    assert!(!removed.contains(&live), "{removed:?}");
    assert!(!ip_netns_list_contains(&stale));
    assert!(!ip_netns_list_contains(&reused));
    assert!(ip_netns_list_contains(&live));
    let deadline = Instant::now() + 5 * SEC;
    loop {
        if orphan.try_wait().expect("try_wait").is_some() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "process in stale namespace survived"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Running it again finds nothing more to do.
    assert!(cleanup_stale(prefix).expect("cleanup").is_empty());
}

#[test]
fn parallel_labs_do_not_collide() {
    if !ax_tests::require_netns("parallel_labs_do_not_collide") {
        return;
    }
    let run = || {
        let lab = Lab::builder()
            .network("repl", "10.77.1.0/24")
            .host("host-a", &["repl"])
            .host("host-b", &["repl"])
            .build()
            .expect("lab");
        let a = host_udp(&lab, "host-a", "repl");
        let b = host_udp(&lab, "host-b", "repl");
        for _ in 0..3 {
            assert!(delivers(&a, &b, 5 * SEC));
            assert!(delivers(&b, &a, 5 * SEC));
        }
        lab.namespaces().to_vec()
    };
    let (x, y) = std::thread::scope(|s| {
        let x = s.spawn(run);
        let y = s.spawn(run);
        (x.join().expect("lab 1"), y.join().expect("lab 2"))
    });
    for n in &x {
        assert!(!y.contains(n), "namespace {n} shared");
        assert!(!ip_netns_list_contains(n));
    }
}

#[test]
fn rate_limit_installs_tbf_and_slows_traffic() {
    if !ax_tests::require_tc("rate_limit_installs_tbf_and_slows_traffic") {
        return;
    }
    let lab = Lab::builder()
        .network("repl", "10.77.1.0/24")
        .host("host-a", &["repl"])
        .host("host-b", &["repl"])
        .build()
        .expect("lab");
    let rate = 800_000u64; // 100 kB/s
    lab.rate_limit(
        "host-a",
        "repl",
        Side::Host,
        RateLimit {
            rate_bits_per_sec: rate,
            burst_bytes: 16 * 1024,
            latency: Duration::from_millis(500),
        },
    )
    .expect("tbf");
    let q = lab.qdisc("host-a", "repl", Side::Host).expect("qdisc");
    assert!(q.contains("tbf") && q.contains("800Kbit"), "{q}");

    let transfer = |bytes: usize| -> Duration {
        let b_addr = lab.addr("host-b", "repl").expect("addr");
        let listener = lab
            .in_host("host-b", move || TcpListener::bind((b_addr, 0)))
            .expect("ns")
            .expect("listen");
        let dest = listener.local_addr().expect("addr");
        let sink = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().expect("accept");
            let mut total = 0usize;
            let mut buf = [0u8; 65536];
            loop {
                let n = s.read(&mut buf).expect("read");
                if n == 0 {
                    break total;
                }
                total += n;
            }
        });
        let mut c = lab
            .in_host("host-a", move || TcpStream::connect(dest))
            .expect("ns")
            .expect("connect");
        let t0 = Instant::now();
        c.write_all(&vec![0x5a; bytes]).expect("write");
        c.shutdown(std::net::Shutdown::Write).expect("shutdown");
        let got = sink.join().expect("sink");
        assert_eq!(got, bytes);
        t0.elapsed()
    };
    // 300 kB at 100 kB/s, minus a 16 KiB bucket: well over a second.
    let limited = transfer(300_000);
    assert!(
        limited >= Duration::from_millis(1500),
        "300 kB took only {limited:?} through an 800 kbit/s limit"
    );
    lab.clear_rate_limit("host-a", "repl", Side::Host)
        .expect("clear");
    let q = lab.qdisc("host-a", "repl", Side::Host).expect("qdisc");
    assert!(!q.contains("tbf"), "{q}");
    // Clearing twice is a no-op.
    lab.clear_rate_limit("host-a", "repl", Side::Host)
        .expect("clear again");
    let unlimited = transfer(300_000);
    assert!(
        unlimited < limited,
        "unlimited {unlimited:?} vs limited {limited:?}"
    );
}

#[test]
fn invalid_specs_are_rejected_before_touching_anything() {
    // No root needed: validation happens first.
    let e = Lab::builder()
        .network("repl", "10.77.1.0/24")
        .host("Host_A", &["repl"])
        .build()
        .expect_err("bad host name");
    assert!(matches!(e, NetnsError::InvalidSpec(_)), "{e}");
    let e = Lab::builder()
        .network("repl", "10.77.1.0/24")
        .host("host-a", &["nope"])
        .build()
        .expect_err("unknown network");
    assert!(matches!(e, NetnsError::UnknownNetwork(_)), "{e}");
}
