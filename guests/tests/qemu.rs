//! The QEMU test guests under real QEMU with KVM: each boots and makes progress on COM1, and `qdirtier`
//! writes exactly its working set (checked in guest memory through QMP `pmemsave`), and `qudp`'s frames
//! (received as raw Ethernet frames at a UDP socket through QEMU's `-netdev socket,udp=`) are well formed,
//! in order, and byte-identical across two QEMUs, and reach a kernel UDP socket through a tap (as root).
//!
//! Skipped (`SKIPPED: …`) when `/dev/kvm` cannot be opened or `qemu-system-x86_64` is not installed. The
//! tests run one at a time (each guest spins a host CPU).

use std::io::{BufRead, BufReader, Write};
use std::net::UdpSocket;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ax_guests::qemu;

/// How long a guest may take to boot through SeaBIOS and print what a test waits for (this machine's
/// nested KVM emulates the guest's code; a loaded machine is slower still).
const WAIT: Duration = Duration::from_secs(120);

static SERIAL: Mutex<()> = Mutex::new(());

/// Why the tests cannot run here, if they cannot.
fn unavailable() -> Option<String> {
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        return Some(format!("/dev/kvm cannot be opened ({e})"));
    }
    match Command::new("qemu-system-x86_64").arg("--version").output() {
        Ok(o) if o.status.success() => None,
        _ => Some("qemu-system-x86_64 not installed".into()),
    }
}

macro_rules! skip_unless_available {
    () => {
        if let Some(why) = unavailable() {
            println!("SKIPPED: {why}");
            return;
        }
    };
}

/// A QEMU running one guest; killed on drop.
struct Vm {
    child: Child,
    dir: PathBuf,
}

impl Vm {
    /// Boots guest `name` with `-append append` under KVM, 64 MiB, serial to a file, QMP on a socket.
    fn start(name: &str, append: &str) -> Vm {
        Vm::start_with(name, append, &[], None)
    }

    /// As [`Vm::start`], with more QEMU arguments.
    /// In network namespace `netns` if given (through `ip netns exec`, which execs QEMU).
    fn start_with(name: &str, append: &str, extra: &[&str], netns: Option<&str>) -> Vm {
        let dir = std::env::temp_dir().join(format!("ax-guests-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let kernel = dir.join(format!("{name}.elf"));
        qemu::write_image(qemu::by_name(name).unwrap(), &kernel).unwrap();
        let mut args = qemu_args(&kernel, append, &dir);
        args.extend(extra.iter().map(|s| s.to_string()));
        println!("qemu-system-x86_64 {}", args.join(" "));
        let mut command = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "qemu-system-x86_64"]);
                c
            }
            None => Command::new("qemu-system-x86_64"),
        };
        let child = command
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start qemu-system-x86_64");
        Vm { child, dir }
    }

    fn serial(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(self.dir.join("serial.txt")).unwrap_or_default())
            .into_owned()
    }

    /// Waits until the serial output holds a line equal to `line`; returns the output.
    fn wait_line(&mut self, line: &str) -> String {
        let start = Instant::now();
        loop {
            let out = self.serial();
            if out.lines().any(|l| l.trim_end() == line) {
                return out;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("QEMU exited ({status}) before {line:?}; serial:\n{out}");
            }
            assert!(
                start.elapsed() < WAIT,
                "no {line:?} within {WAIT:?}; serial:\n{out}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Runs one QMP command (after `qmp_capabilities`) and returns its reply line.
    fn qmp(&self, command: &str) -> String {
        let path = self.dir.join("qmp.sock");
        let start = Instant::now();
        let stream = loop {
            match UnixStream::connect(&path) {
                Ok(s) => break s,
                Err(e) => {
                    assert!(start.elapsed() < WAIT, "QMP {}: {e}", path.display());
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        };
        stream.set_read_timeout(Some(WAIT)).unwrap();
        let mut writer = stream.try_clone().unwrap();
        let mut reader = BufReader::new(stream);
        let mut reply = |send: &str| -> String {
            writer.write_all(send.as_bytes()).unwrap();
            writer.write_all(b"\n").unwrap();
            loop {
                let mut line = String::new();
                assert!(reader.read_line(&mut line).unwrap() > 0, "QMP closed");
                if line.contains("\"return\"") || line.contains("\"error\"") {
                    return line;
                }
            }
        };
        let caps = reply(r#"{"execute":"qmp_capabilities"}"#);
        assert!(caps.contains("\"return\""), "qmp_capabilities: {caps}");
        reply(command)
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The command line a test runs a guest with (as documented in `guests/README.md`).
fn qemu_args(kernel: &Path, append: &str, dir: &Path) -> Vec<String> {
    [
        "-accel",
        "kvm",
        "-m",
        "64",
        "-nographic",
        "-nodefaults",
        "-serial",
        &format!("file:{}", dir.join("serial.txt").display()),
        "-qmp",
        &format!("unix:{},server=on,wait=off", dir.join("qmp.sock").display()),
        "-kernel",
        &kernel.display().to_string(),
        "-append",
        append,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// The numbers of the lines `<prefix>N`, in order.
fn numbers(out: &str, prefix: &str) -> Vec<u64> {
    out.lines()
        .filter_map(|l| l.trim_end().strip_prefix(prefix))
        .map(|n| n.parse().unwrap_or_else(|e| panic!("{prefix}{n}: {e}")))
        .collect()
}

#[test]
fn qcounter_boots_in_ring_3_and_counts() {
    skip_unless_available!();
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut vm = Vm::start("qcounter", "every=1000");
    let out = vm.wait_line("count 3");
    assert!(out.contains("qcounter: running at CPL3\n"), "{out}");
    assert!(out.contains("qcounter: every=1000\n"), "{out}");
    let counts = numbers(&out, "count ");
    assert_eq!(counts, (1..=counts.len() as u64).collect::<Vec<_>>());
}

#[test]
fn qcounter_ring_0_option() {
    skip_unless_available!();
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut vm = Vm::start("qcounter", "every=1000 ring=0");
    let out = vm.wait_line("count 2");
    assert!(out.contains("qcounter: running at CPL0\n"), "{out}");
}

#[test]
fn qcounter_rejects_a_bad_argument() {
    skip_unless_available!();
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut vm = Vm::start("qcounter", "every=12x");
    vm.wait_line("qcounter: bad value for every= on the command line");
    std::thread::sleep(Duration::from_secs(1));
    let out = vm.serial();
    assert!(
        !out.contains("exception"),
        "the guest did not halt cleanly:\n{out}"
    );
}

#[test]
fn qdirtier_writes_exactly_its_working_set() {
    skip_unless_available!();
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    const PAGES: usize = 16;
    let mut vm = Vm::start("qdirtier", &format!("pages={PAGES} every=100"));
    let out = vm.wait_line("round 200");
    assert!(out.contains("qdirtier: pages=16 every=100\n"), "{out}");
    let rounds = numbers(&out, "round ");
    assert_eq!(
        rounds,
        (1..=rounds.len() as u64)
            .map(|i| i * 100)
            .collect::<Vec<_>>()
    );

    // Guest memory from 4 MiB: the working set and the page after it.
    let dump = vm.dir.join("mem.bin");
    let reply = vm.qmp(&format!(
        r#"{{"execute":"pmemsave","arguments":{{"val":4194304,"size":{},"filename":"{}"}}}}"#,
        (PAGES + 1) * 4096,
        dump.display()
    ));
    assert!(reply.contains("\"return\""), "pmemsave: {reply}");
    let mem = std::fs::read(&dump).unwrap();
    assert_eq!(mem.len(), (PAGES + 1) * 4096);
    let word = |page: usize, i: usize| {
        let at = page * 4096 + 4 * i;
        u32::from_le_bytes(mem[at..at + 4].try_into().unwrap())
    };
    for page in 0..PAGES {
        assert_eq!(word(page, 0), page as u32, "word 0 of page {page}");
        // Word 1 + (r mod 1023) holds r for the rounds done so far: at least rounds 1..=200.
        for r in 1..=200u32 {
            let w = word(page, 1 + (r % 1023) as usize);
            assert!(w >= r, "page {page}: word for round {r} holds {w}");
        }
    }
    assert!(
        mem[PAGES * 4096..].iter().all(|&b| b == 0),
        "the page after the working set was written"
    );
}

const QUDP_PAYLOAD: usize = 64;

/// Checks one `qudp` frame: Ethernet, IPv4 (with its header checksum), UDP, payload of packet `seq`.
fn check_qudp_frame(frame: &[u8], seq: u64) {
    assert_eq!(frame.len(), 42 + QUDP_PAYLOAD, "frame {seq} length");
    assert_eq!(
        &frame[0..6],
        &[0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xff],
        "dst MAC"
    );
    assert_eq!(
        &frame[6..12],
        &[0x52, 0x54, 0x00, 0x12, 0x34, 0x56],
        "src MAC"
    );
    assert_eq!(&frame[12..14], &[0x08, 0x00], "EtherType");
    let ip = &frame[14..34];
    let be16 = |b: &[u8], at: usize| u16::from_be_bytes([b[at], b[at + 1]]);
    assert_eq!(ip[0], 0x45);
    assert_eq!(be16(ip, 2) as usize, 28 + QUDP_PAYLOAD, "IPv4 total length");
    assert_eq!(be16(ip, 4), seq as u16, "IPv4 ID = sequence");
    assert_eq!(be16(ip, 6), 0x4000, "DF, no fragment");
    assert_eq!((ip[8], ip[9]), (64, 17), "TTL, protocol");
    let sum: u32 = (0..10).map(|i| u32::from(be16(ip, 2 * i))).sum();
    assert_eq!(
        (sum & 0xffff) + (sum >> 16),
        0xffff,
        "IPv4 header checksum of frame {seq}"
    );
    assert_eq!(&ip[12..16], &[10, 0, 3, 10], "src IP");
    assert_eq!(&ip[16..20], &[10, 0, 3, 2], "dst IP");
    let udp = &frame[34..42];
    assert_eq!((be16(udp, 0), be16(udp, 2)), (5555, 5555), "UDP ports");
    assert_eq!(be16(udp, 4) as usize, 8 + QUDP_PAYLOAD, "UDP length");
    assert_eq!(be16(udp, 6), 0, "UDP checksum (none)");
    let payload = &frame[42..];
    assert_eq!(u64::from_be_bytes(payload[..8].try_into().unwrap()), seq);
    for (k, &b) in payload.iter().enumerate().skip(8) {
        assert_eq!(
            b,
            (seq as usize + k) as u8,
            "payload byte {k} of frame {seq}"
        );
    }
}

#[test]
fn qudp_sends_an_ordered_deterministic_stream() {
    skip_unless_available!();
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    const N: u64 = 20;
    let append =
        format!("src=10.0.3.10 dst=10.0.3.2 dmac=aa:bb:cc:dd:ee:ff port=5555 rate=50 count={N}");
    let mut runs = Vec::new();
    for _ in 0..2 {
        // QEMU sends each frame the guest transmits as one datagram to `udp=`, from `localaddr=`.
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        socket.set_read_timeout(Some(WAIT)).unwrap();
        let from = UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let netdev = format!(
            "socket,id=n0,udp={},localaddr={from}",
            socket.local_addr().unwrap()
        );
        let mut vm = Vm::start_with(
            "qudp",
            &append,
            &[
                "-netdev",
                &netdev,
                "-device",
                "e1000,netdev=n0,mac=52:54:00:12:34:56",
            ],
            None,
        );
        let mut frames = Vec::new();
        let mut buf = [0u8; 2048];
        for seq in 1..=N {
            let (len, _) = socket
                .recv_from(&mut buf)
                .unwrap_or_else(|e| panic!("frame {seq}: {e}; serial:\n{}", vm.serial()));
            check_qudp_frame(&buf[..len], seq);
            frames.push(buf[..len].to_vec());
        }
        let out = vm.wait_line(&format!("qudp: done {N}"));
        assert!(
            out.contains("qudp: e1000 mac 52:54:00:12:34:56 src 10.0.3.10 dst 10.0.3.2"),
            "{out}"
        );
        assert_eq!(numbers(&out, "seq "), (1..=N).collect::<Vec<_>>());
        socket.set_nonblocking(true).unwrap();
        assert!(
            socket.recv_from(&mut buf).is_err(),
            "a frame after count={N}"
        );
        runs.push(frames);
    }
    assert!(runs[0] == runs[1], "the two QEMUs sent different frames");
}

/// Runs `ip <args>`, panicking with its error output if it fails.
fn ip(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A network namespace made with `ip netns add`, deleted on drop.
struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

#[test]
fn qudp_reaches_a_kernel_udp_socket_through_a_tap() {
    skip_unless_available!();
    // SAFETY: geteuid(2) has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        assert!(
            std::env::var_os("AX_TESTS_REQUIRE_NETNS").is_none(),
            "AX_TESTS_REQUIRE_NETNS is set but this test needs root (network namespaces, a tap)"
        );
        println!("SKIPPED: needs root for a network namespace and a tap");
        return;
    }
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    const N: u64 = 10;
    let ns = Netns(format!("axgk-{}", std::process::id()));
    let _ = Command::new("ip").args(["netns", "del", &ns.0]).output();
    ip(&["netns", "add", &ns.0]);
    ip(&["-n", &ns.0, "link", "set", "lo", "up"]);
    ip(&["-n", &ns.0, "tuntap", "add", "dev", "tapq", "mode", "tap"]);
    ip(&["-n", &ns.0, "addr", "add", "10.0.3.2/24", "dev", "tapq"]);
    ip(&["-n", &ns.0, "link", "set", "tapq", "up"]);
    let mac = ip(&["-n", &ns.0, "-br", "link", "show", "tapq"]);
    let mac = mac.split_whitespace().nth(2).expect("tap MAC").to_string();

    // The receiving socket lives in the namespace: made on a thread that entered it.
    let path = format!("/run/netns/{}", ns.0);
    let socket = std::thread::spawn(move || {
        let f = std::fs::File::open(&path).unwrap();
        use std::os::fd::AsRawFd;
        // SAFETY: `f` is open for the whole call; setns(2) only reads it and moves this thread only.
        let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        UdpSocket::bind("10.0.3.2:5555").unwrap()
    })
    .join()
    .unwrap();
    socket.set_read_timeout(Some(WAIT)).unwrap();

    let append = format!("src=10.0.3.10 dst=10.0.3.2 dmac={mac} port=5555 rate=50 count={N}");
    let mut vm = Vm::start_with(
        "qudp",
        &append,
        &[
            "-netdev",
            "tap,id=n0,ifname=tapq,script=no,downscript=no",
            "-device",
            "e1000,netdev=n0,mac=52:54:00:12:34:56",
        ],
        Some(&ns.0),
    );
    let mut buf = [0u8; 2048];
    for seq in 1..=N {
        let (len, from) = socket
            .recv_from(&mut buf)
            .unwrap_or_else(|e| panic!("datagram {seq}: {e}; serial:\n{}", vm.serial()));
        assert_eq!(from.to_string(), "10.0.3.10:5555");
        assert_eq!(len, QUDP_PAYLOAD);
        assert_eq!(u64::from_be_bytes(buf[..8].try_into().unwrap()), seq);
    }
    vm.wait_line(&format!("qudp: done {N}"));
    drop(vm);
}
