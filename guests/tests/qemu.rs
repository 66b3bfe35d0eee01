//! The QEMU test guests under real QEMU with KVM: each boots and makes progress on COM1, and `qdirtier`
//! writes exactly its working set (checked in guest memory through QMP `pmemsave`).
//!
//! Skipped (`SKIPPED: …`) when `/dev/kvm` cannot be opened or `qemu-system-x86_64` is not installed. The
//! tests run one at a time (each guest spins a host CPU).

use std::io::{BufRead, BufReader, Write};
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
        let dir = std::env::temp_dir().join(format!("ax-guests-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let kernel = dir.join(format!("{name}.elf"));
        qemu::write_image(qemu::by_name(name).unwrap(), &kernel).unwrap();
        let args = qemu_args(&kernel, append, &dir);
        println!("qemu-system-x86_64 {}", args.join(" "));
        let child = Command::new("qemu-system-x86_64")
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
