//! What the agent's integration tests share: a real `ax-agent run` on loopback, plain HTTP to its API,
//! axctl, scratch directories with a PKI and a token.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const AGENT: &str = env!("CARGO_BIN_EXE_ax-agent");

pub const TOKEN: &str = "test-token-0123456789";

pub fn kvm() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

/// Whether /dev/kvm is usable; prints `SKIPPED: <test>: needs /dev/kvm` when not.
pub fn kvm_or_skip(test: &str) -> bool {
    kvm() || {
        skip(test, "needs /dev/kvm");
        false
    }
}

pub fn skip(test: &str, why: &str) {
    println!("SKIPPED: {test}: {why}");
    eprintln!("SKIPPED: {test}: {why}");
}

/// A scratch directory with the PKI and a token file.
pub fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ax-daemon-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let ok = Command::new(AGENT)
        .args(["certs", "--out"])
        .arg(dir.join("pki"))
        .args(["host-a", "host-b", "host-c", "host-z", "witness"])
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(ok.success());
    write_token(&dir.join("token"), 0o600);
    dir
}

pub fn write_token(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, format!("{TOKEN}\n")).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// Ports for one test's agents: far from the defaults and from each other test.
pub fn ports(base: u16) -> String {
    format!(
        "[ports]\nlink = {}\nheartbeat = {}\noutput = {}\nslots = 8\nlocal_witness = {}\nhost_heartbeat = {}\n",
        base,
        base + 10,
        base + 20,
        base + 30,
        base + 31
    )
}

pub struct Agent {
    pub child: Option<Child>,
    pub config: PathBuf,
    pub storage: PathBuf,
    pub addr: SocketAddr,
}

impl Agent {
    /// Starts `ax-agent run` on `config` and waits until it serves.
    pub fn start(config: &Path, storage: &Path) -> Agent {
        let _ = std::fs::remove_file(storage.join("api.addr"));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(storage.with_extension("log"))
            .unwrap();
        let child = Command::new(AGENT)
            .arg("run")
            .arg("--config")
            .arg(config)
            .env("RUST_LOG", "info")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let t = Instant::now();
        let addr = loop {
            if let Some(a) = std::fs::read_to_string(storage.join("api.addr"))
                .ok()
                .and_then(|s| s.trim().parse().ok())
            {
                break a;
            }
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "the agent did not start: {}",
                std::fs::read_to_string(storage.with_extension("log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        Agent {
            child: Some(child),
            config: config.to_path_buf(),
            storage: storage.to_path_buf(),
            addr,
        }
    }

    pub fn req(&self, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
        http(self.addr, method, path, body, Some(TOKEN))
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    pub fn signal(&mut self, sig: i32) {
        if let Some(c) = &self.child {
            // SAFETY: kill(2) on our own child's pid.
            unsafe {
                libc::kill(c.id() as i32, sig);
            }
        }
    }

    pub fn wait(&mut self) -> Option<std::process::ExitStatus> {
        self.child.take().map(|mut c| c.wait().unwrap())
    }

    pub fn restart(&mut self) {
        self.signal(libc::SIGTERM);
        self.wait();
        self.start_again();
    }

    /// Starts a new agent on the same config after this one ended, keeping its workers (a plain
    /// assignment would drop the old value, whose `Drop` kills them).
    pub fn start_again(&mut self) {
        let new = Agent::start(&self.config, &self.storage);
        std::mem::forget(std::mem::replace(self, new));
    }

    /// Every worker pid recorded under the storage dir, and the local witness's.
    pub fn worker_pids(&self) -> Vec<u32> {
        let mut out = Vec::new();
        let mut files = vec![self.storage.join("witness/witness.pid")];
        if let Ok(rd) = std::fs::read_dir(self.storage.join("vms")) {
            files.extend(rd.flatten().map(|e| e.path().join("worker.pid")));
        }
        for f in files {
            if let Some(pid) = ax_agent::worker::alive(&f) {
                out.push(pid);
            }
        }
        out
    }
}

impl Agent {
    /// The QEMUs of this agent's QEMU VMs (they run in their own sessions and outlive their workers).
    pub fn qemu_pids(&self) -> Vec<u32> {
        std::fs::read_dir(self.storage.join("vms"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| ax_agent::worker::alive(&e.path().join("qemu.pid")))
            .collect()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        for pid in self.worker_pids().into_iter().chain(self.qemu_pids()) {
            // SAFETY: kill(2) on processes this test's agent started (pid + start time checked).
            unsafe {
                libc::kill(pid as i32, libc::SIGKILL);
            }
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// One HTTP/1.1 request (Connection: close); returns the status and the JSON body (or the text as a
/// JSON string, `null` when empty).
pub fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&Value>,
    token: Option<&str>,
) -> (u16, Value) {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some(t) = token {
        req.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    if !body.is_empty() {
        req.push_str("Content-Type: application/json\r\n");
    }
    req.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    s.write_all(req.as_bytes()).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, rest) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    let body = if chunked {
        dechunk(rest)
    } else {
        rest.to_string()
    };
    let v = if body.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&body).unwrap_or(Value::String(body))
    };
    (status, v)
}

pub fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((len, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(len.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n.min(rest.len())]);
        s = rest.get(n + 2..).unwrap_or("");
    }
    out
}

pub fn one_host_config(dir: &Path, storage: &Path, port_base: u16, extra: &str) -> PathBuf {
    let cfg = dir.join(format!(
        "{}.toml",
        storage.file_name().unwrap().to_string_lossy()
    ));
    std::fs::write(
        &cfg,
        format!(
            "host = \"host-a\"\nstorage_dir = \"{}\"\npki_dir = \"{}\"\ntoken_file = \"{}\"\n{extra}\n[api]\nlisten = \"127.0.0.1:0\"\n{}",
            storage.display(),
            dir.join("pki").display(),
            dir.join("token").display(),
            ports(port_base)
        ),
    )
    .unwrap();
    cfg
}

/// Runs `axctl` against the agent at `addr` with `dir`'s token; its stdout (it must succeed).
pub fn axctl(addr: SocketAddr, dir: &Path, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_axctl"))
        .arg("--url")
        .arg(format!("http://{addr}"))
        .arg("--token-file")
        .arg(dir.join("token"))
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "axctl {args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn wait_vm(a: &Agent, vm: &str, what: &str, secs: u64, ok: impl Fn(&Value) -> bool) -> Value {
    let t = Instant::now();
    loop {
        let (_, v) = a.req("GET", &format!("/v1/vms/{vm}"), None);
        if ok(&v) {
            return v;
        }
        assert!(t.elapsed() < Duration::from_secs(secs), "{what}: {v}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn events(a: &Agent, vm: &str) -> Vec<Value> {
    let (_, v) = a.req("GET", &format!("/v1/events?vm={vm}&limit=1000"), None);
    v["events"].as_array().cloned().unwrap_or_default()
}

pub fn qemu_installed() -> bool {
    Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The Linux test guest (kernel, initrd), built by the project's script when missing; `None` (after
/// printing SKIPPED) when QEMU is not installed.
pub fn linux_guest(test: &str) -> Option<(PathBuf, PathBuf)> {
    if !qemu_installed() {
        skip(test, "qemu-system-x86_64 not installed");
        return None;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let out = std::env::var_os("AX_LINUX_GUEST")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target/linux-guest"));
    let st = Command::new(root.join("scripts/build-linux-guest.sh"))
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "scripts/build-linux-guest.sh failed: {}",
        String::from_utf8_lossy(&st.stderr)
    );
    Some((out.join("vmlinuz"), out.join("initrd.gz")))
}

/// Waits until agent `a` has finished recovering the failed `host` (`GET /v1/recoveries`,
/// `host_failures`: `done` or `gave_up`); that recovery.
pub fn wait_host_failure(a: &Agent, host: &str, secs: u64) -> Value {
    let t = Instant::now();
    loop {
        let (code, v) = a.req("GET", "/v1/recoveries", None);
        assert_eq!(code, 200, "{v}");
        let f = v["host_failures"]
            .as_array()
            .and_then(|f| f.iter().find(|f| f["host"] == host).cloned());
        if let Some(f) = f.filter(|f| f["state"] == "done" || f["state"] == "gave_up") {
            return f;
        }
        assert!(
            t.elapsed() < Duration::from_secs(secs),
            "recovery of {host}: {v}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A witness process, killed when dropped — also when its test panics, so that a failed test never
/// leaves a witness holding the port (and old generations) for the next run.
pub struct Witness(Child);

impl Drop for Witness {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The shared witness of a test cluster (certificate `witness` of the scratch PKI).
pub fn start_witness(dir: &Path, port: u16) -> Witness {
    Witness(
        Command::new(AGENT)
            .args([
                "witness",
                "--init",
                "--listen",
                &format!("127.0.0.1:{port}"),
            ])
            .arg("--pki")
            .arg(dir.join("pki"))
            .arg("--state")
            .arg(dir.join("witness.json"))
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}
