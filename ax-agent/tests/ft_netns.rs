//! Automatic failover between agent processes on simulated hosts (network namespaces): a witness,
//! host-a (boots the VM), host-b and host-c (standbys), and a client host running the observer.
//! host-a is SIGKILLed; host-b detects it, wins a newer generation at the witness (compare-and-set), and
//! out, promotes and re-protects the VM to host-c by a live sync; then host-b is SIGKILLed and host-c
//! takes over. The observer's stream must stay 1, 2, 3, … with no gap and no duplicate, and the time
//! from each kill to the first new line is printed.

use ax_tests::netns::HostChild;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use ax_tests::agent;
use ax_tests::netns::{Lab, LabBuilder};

const AGENT: &str = env!("CARGO_BIN_EXE_ax-agent");

struct Hosts {
    lab: Lab,
    dir: std::path::PathBuf,
}

impl Hosts {
    fn ip(&self, host: &str, net: &str) -> Ipv4Addr {
        self.lab.addr(host, net).unwrap()
    }

    fn node(&self, host: &str, boot: bool) -> HostChild {
        self.node_with(host, boot, &agent::NodeOptions::default())
    }

    fn node_with(&self, host: &str, boot: bool, opts: &agent::NodeOptions) -> HostChild {
        let hosts = ["host-a", "host-b", "host-c"];
        let args =
            agent::ft_node_args_with(&self.lab, host, &hosts, &self.dir.join("pki"), boot, opts)
                .unwrap();
        self.lab
            .spawn_with(host, AGENT, |c| {
                c.args(&args).env("RUST_LOG", "info");
            })
            .unwrap()
    }

    /// A lab with a client host, the PKI and a running witness.
    fn new(name: &str) -> (Self, HostChild) {
        let dir = std::env::temp_dir().join(format!("ax-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let pki = std::process::Command::new(AGENT)
            .args(["certs", "--out"])
            .arg(dir.join("pki"))
            .args(["host-a", "host-b", "host-c", "witness"])
            .status()
            .unwrap();
        assert!(pki.success());
        let lab = LabBuilder::ax().host("client", &["repl"]).build().unwrap();
        let args =
            agent::witness_args(&lab, &dir.join("witness.json"), &dir.join("pki"), true).unwrap();
        let witness = lab
            .spawn_with("witness", AGENT, |c| {
                c.args(&args);
            })
            .unwrap();
        (Hosts { lab, dir }, witness)
    }

    /// Connects the observer (inside `client`) to `host`'s output endpoint at `offset`.
    fn connect(&self, host: &str, offset: u64) -> Option<TcpStream> {
        let addr = SocketAddr::from((self.ip(host, "repl"), agent::OUTPUT_PORT));
        self.lab
            .in_host("client", move || {
                let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok()?;
                s.write_all(&offset.to_le_bytes()).ok()?;
                s.set_read_timeout(Some(Duration::from_millis(100))).ok()?;
                Some(s)
            })
            .unwrap()
    }
}

fn lines(b: &[u8]) -> usize {
    b.iter().filter(|&&c| c == b'\n').count()
}

/// Reads from whichever host serves the stream until `want` lines; returns when the first new byte
/// arrived after `since` (for failover timing).
fn read_until(
    h: &Hosts,
    hosts: &[&str],
    seen: &mut Vec<u8>,
    want: usize,
    deadline: Duration,
) -> Option<Instant> {
    let end = Instant::now() + deadline;
    let mut first_new = None;
    while lines(seen) < want && Instant::now() < end {
        for host in hosts {
            let Some(mut s) = h.connect(host, seen.len() as u64) else {
                continue;
            };
            let mut buf = [0u8; 4096];
            loop {
                match s.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        first_new.get_or_insert_with(Instant::now);
                        seen.extend_from_slice(&buf[..n]);
                        if lines(seen) >= want {
                            return first_new;
                        }
                    }
                    Err(e)
                        if e.kind() == std::io::ErrorKind::WouldBlock
                            || e.kind() == std::io::ErrorKind::TimedOut =>
                    {
                        if Instant::now() > end {
                            return first_new;
                        }
                    }
                    Err(_) => break,
                }
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    first_new
}

/// SIGKILLs `victim`, then reads 30 more lines from `to`; returns the time to the first new line.
fn kill_and_follow(
    h: &Hosts,
    victim: &mut HostChild,
    to: &[&str],
    seen: &mut Vec<u8>,
) -> Option<Duration> {
    let killed = Instant::now();
    victim.kill().unwrap();
    let _ = victim.wait();
    let before = lines(seen);
    let first = read_until(h, to, seen, before + 30, Duration::from_secs(30));
    assert!(
        lines(seen) >= before + 30,
        "no takeover by {to:?}: {} new lines",
        lines(seen) - before
    );
    first.map(|t| t.duration_since(killed))
}

/// Checks the stream is whole, then removes the lab and its directory.
fn finish(h: Hosts, seen: &[u8], what: &str) {
    let total = assert_counts(seen);
    println!("observer: lines 1..{total}, no gap, no duplicate, {what}");
    let dir = h.dir.clone();
    drop(h);
    let _ = std::fs::remove_dir_all(&dir);
}

fn assert_counts(bytes: &[u8]) -> u64 {
    let v = agent::counter_verdict(bytes);
    assert_eq!((v.lost, v.duplicated), (0, 0), "gap or duplicate: {v:?}");
    v.last
}

#[test]
fn sigkill_the_primary_twice() {
    if !ax_tests::require_netns("sigkill_the_primary_twice") {
        return;
    }
    if let Err(why) = statepoint::kvm_available() {
        println!("SKIPPED: sigkill_the_primary_twice needs /dev/kvm: {why}");
        eprintln!("SKIPPED: sigkill_the_primary_twice needs /dev/kvm: {why}");
        return;
    }
    let (h, _witness) = Hosts::new("ftns1");
    let _c = h.node("host-c", false);
    let _b = h.node("host-b", false);
    std::thread::sleep(Duration::from_millis(200));
    let mut a = h.node("host-a", true);

    let mut seen = Vec::new();
    read_until(&h, &["host-a"], &mut seen, 30, Duration::from_secs(30));
    assert!(
        lines(&seen) >= 30,
        "host-a released only {} lines",
        lines(&seen)
    );

    // 1: SIGKILL the primary.
    let rto_a = kill_and_follow(&h, &mut a, &["host-b", "host-c"], &mut seen);
    println!("failover 1 (host-a killed): first new line after {rto_a:?}");

    // host-b re-protects to host-c (live sync); give it a moment, then kill host-b.
    std::thread::sleep(Duration::from_millis(800));
    let mut b = _b;
    let rto_b = kill_and_follow(&h, &mut b, &["host-c"], &mut seen);
    println!("failover 2 (host-b killed): first new line after {rto_b:?}");
    finish(h, &seen, "across two SIGKILLs");
}

/// A started pair: the lab with its witness, host-b a standby, host-a the primary of the VM, and the
/// first 30 lines the observer read from host-a.
struct Pair {
    h: Hosts,
    _witness: HostChild,
    a: HostChild,
    b: HostChild,
    seen: Vec<u8>,
}

/// Starts a [`Pair`] in a lab called `lab`; `None` (the test is skipped) without namespaces or KVM.
fn start_pair(test: &str, lab: &str) -> Option<Pair> {
    if !ax_tests::require_netns(test) {
        return None;
    }
    if let Err(why) = statepoint::kvm_available() {
        println!("SKIPPED: {test} needs /dev/kvm: {why}");
        eprintln!("SKIPPED: {test} needs /dev/kvm: {why}");
        return None;
    }
    let (h, witness) = Hosts::new(lab);
    let b = h.node("host-b", false);
    std::thread::sleep(Duration::from_millis(200));
    let a = h.node("host-a", true);
    let mut seen = Vec::new();
    read_until(&h, &["host-a"], &mut seen, 30, Duration::from_secs(30));
    assert!(lines(&seen) >= 30, "host-a released only {}", lines(&seen));
    Some(Pair {
        h,
        _witness: witness,
        a,
        b,
        seen,
    })
}

#[test]
fn sigkill_the_secondary_then_the_primary() {
    let Some(Pair {
        h,
        _witness,
        mut a,
        mut b,
        mut seen,
    }) = start_pair("sigkill_the_secondary_then_the_primary", "ftns2")
    else {
        return;
    };

    // The secondary dies: host-a runs solo under a fresh generation, then re-protects to host-c.
    b.kill().unwrap();
    let _ = b.wait();
    let _c = h.node("host-c", false);
    let before = lines(&seen);
    read_until(
        &h,
        &["host-a"],
        &mut seen,
        before + 60,
        Duration::from_secs(30),
    );
    assert!(
        lines(&seen) >= before + 60,
        "host-a stalled after losing its secondary"
    );
    std::thread::sleep(Duration::from_millis(800)); // the re-protection to host-c completes

    // Now the primary dies: host-c, the new secondary, takes over.
    let rto = kill_and_follow(&h, &mut a, &["host-c"], &mut seen);
    println!("failover after re-protection: first new line after {rto:?}");
    finish(h, &seen, "secondary and primary killed");
}

/// A primary that is superseded — stopped long enough for its secondary to take over, then resumed —
/// destroys its stale copy and stays a standby in the same process: the new primary protects the VM to
/// it again, and it takes over when that one dies. (It used to exit 3: with no third host up, the VM
/// was then left without a standby.)
#[test]
fn a_superseded_primary_stays_a_standby() {
    let Some(mut p) = start_pair("a_superseded_primary_stays_a_standby", "ftns4") else {
        return;
    };

    // host-a stops; host-b declares it dead, is granted a newer generation and serves the stream.
    let stopped = ax_tests::faults::stop(p.a.id()).unwrap();
    let before = lines(&p.seen);
    read_until(
        &p.h,
        &["host-b"],
        &mut p.seen,
        before + 30,
        Duration::from_secs(30),
    );
    assert!(lines(&p.seen) >= before + 30, "host-b did not take over");

    // host-a resumes and finds itself superseded: it destroys its copy of the VM and stays up.
    stopped.resume().unwrap();
    // Meanwhile host-b protects the VM again, to host-a, the only other host up (a live sync).
    std::thread::sleep(Duration::from_secs(4));
    let exited = p.a.try_wait().unwrap();
    assert!(
        exited.is_none(),
        "host-a exited after it was superseded: {exited:?}"
    );

    // host-b dies: host-a, its secondary now, takes over.
    let rto = kill_and_follow(&p.h, &mut p.b, &["host-a"], &mut p.seen);
    println!("failover to the superseded host: first new line after {rto:?}");
    finish(
        p.h,
        &p.seen,
        "a superseded primary stayed a standby and took over later",
    );
}

/// A `disk-writer` VM (it re-reads and checks what it wrote, so a restored disk that disagrees with the
/// guest's own view prints `MISMATCH` and ends the stream) with heartbeats on two paths and a fence
/// command. Cutting the primary's heartbeat network leaves the second path: no failover, no fence.
/// SIGKILL of the primary: the secondary fences it (the command runs with its name), takes over from
/// the last committed epoch with that epoch's disk, and the batch numbers go on without gap or repeat.
#[test]
fn disk_writer_two_heartbeat_paths_and_a_fence_command() {
    let name = "disk_writer_two_heartbeat_paths_and_a_fence_command";
    if !ax_tests::require_netns(name) {
        return;
    }
    if let Err(why) = statepoint::kvm_available() {
        println!("SKIPPED: {name} needs /dev/kvm: {why}");
        eprintln!("SKIPPED: {name} needs /dev/kvm: {why}");
        return;
    }
    let (h, _witness) = Hosts::new("ftns3");
    let fenced = h.dir.join("fenced");
    let opts = agent::NodeOptions {
        second_hb_path: true,
        fence_cmd: Some(format!("echo {{host}} >> {}", fenced.display())),
        ..agent::NodeOptions::disk_writer(16)
    };
    let mut b = h.node_with("host-b", false, &opts);
    std::thread::sleep(Duration::from_millis(200));
    let mut a = h.node_with("host-a", true, &opts);
    let mut seen = Vec::new();
    read_until(&h, &["host-a"], &mut seen, 30, Duration::from_secs(30));
    assert!(lines(&seen) >= 30, "host-a released only {}", lines(&seen));

    // The heartbeat network of the primary goes down for longer than the detector's timeout: the
    // second path (over the replication network) keeps both sides alive.
    ax_tests::faults::cut_link_for(&h.lab, "host-a", "hb", Duration::from_millis(600)).unwrap();
    let before = lines(&seen);
    read_until(
        &h,
        &["host-a"],
        &mut seen,
        before + 30,
        Duration::from_secs(30),
    );
    assert!(
        lines(&seen) >= before + 30,
        "host-a stopped serving after its heartbeat network was cut"
    );
    assert!(
        matches!(b.try_wait(), Ok(None)) && matches!(a.try_wait(), Ok(None)),
        "a node ended"
    );
    assert!(!fenced.exists(), "fenced although the second path was up");

    let kill_a = Instant::now();
    a.kill().unwrap();
    let _ = a.wait();
    let before = lines(&seen);
    let first = read_until(
        &h,
        &["host-b"],
        &mut seen,
        before + 30,
        Duration::from_secs(30),
    );
    assert!(lines(&seen) >= before + 30, "host-b did not take over");
    println!(
        "disk-writer failover: first new line after {:?}",
        first.map(|t| t.duration_since(kill_a))
    );
    assert_eq!(
        std::fs::read_to_string(&fenced).unwrap_or_default(),
        "host-a\n",
        "host-b fences host-a exactly once"
    );
    assert!(matches!(b.try_wait(), Ok(None)), "host-b ended");
    finish(h, &seen, "every batch verified by the guest");
}

/// A double failure, end to end: the secondary dies, the primary starts re-protecting the VM to
/// host-c by a live initial sync (slowed to 2 Mbit/s so that it is still under way), and the primary
/// is SIGKILLed before host-c holds a consistent epoch. host-c must not promote a partial copy: it
/// reports the loss as an ERROR that says what is left on each host, and stays up as a standby.
#[test]
fn a_primary_killed_during_a_resync_is_a_reported_loss() {
    let Some(mut p) = start_pair(
        "a_primary_killed_during_a_resync_is_a_reported_loss",
        "ftns5",
    ) else {
        return;
    };
    p.b.kill().unwrap();
    let _ = p.b.wait();
    // A slow replication network: the initial sync to host-c takes seconds.
    p.h.lab
        .rate_limit(
            "host-a",
            "repl",
            ax_tests::netns::Side::Host,
            ax_tests::netns::RateLimit::bits_per_sec(2_000_000),
        )
        .unwrap();
    let log = p.h.dir.join("host-c.log");
    let hosts = ["host-a", "host-b", "host-c"];
    let args =
        agent::ft_node_args(&p.h.lab, "host-c", &hosts, &p.h.dir.join("pki"), false).unwrap();
    let (out, err) = (
        std::fs::File::create(&log).unwrap(),
        std::fs::File::create(&log).unwrap(),
    );
    let mut c =
        p.h.lab
            .spawn_with("host-c", AGENT, |cmd| {
                cmd.args(&args)
                    .env("RUST_LOG", "info")
                    .stdout(out)
                    .stderr(err);
            })
            .unwrap();
    let read = || std::fs::read_to_string(&log).unwrap_or_default();
    let wait = |what: &str, limit: Duration| {
        let end = Instant::now() + limit;
        while !read().contains(what) && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(10));
        }
        read().contains(what)
    };
    assert!(
        wait("following as secondary", Duration::from_secs(20)),
        "host-c never got a session:\n{}",
        read()
    );
    // The sync is under way: the primary dies now.
    p.a.kill().unwrap();
    let _ = p.a.wait();
    assert!(
        wait("lost to a double failure", Duration::from_secs(20)),
        "host-c did not report the loss:\n{}",
        read()
    );
    let text = read();
    assert!(
        text.contains("Left on host-c") && text.contains("Left on host-a"),
        "{text}"
    );
    assert!(
        !text.contains("promoting"),
        "host-c promoted a partial copy:\n{text}"
    );
    assert!(
        c.try_wait().unwrap().is_none(),
        "host-c exited after the loss"
    );
    let dir = p.h.dir.clone();
    drop(p);
    let _ = std::fs::remove_dir_all(&dir);
}
