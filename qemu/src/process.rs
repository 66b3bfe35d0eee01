//! Launching QEMU, finding it again after its supervisor restarted, and its end.
//!
//! QEMU runs in its own session (`setsid`), so that neither the VM worker's death nor a signal to the
//! worker's process group takes the guest down: a new worker finds it again through `qemu.pid`
//! (`PID STARTTIME`; the start time tells a reused pid apart) and its QMP socket. QEMU's end is
//! awaited through a pidfd, which works for a process that is not the waiter's child.

use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::time::Duration;

use crate::def::{tap_name, DefError, LaunchOptions, QemuDef, RunFiles};
use crate::qmp::{Events, Qmp, QmpError};

/// A failure to start or find QEMU.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// The definition cannot run here.
    #[error(transparent)]
    Def(#[from] DefError),
    /// A file in the run directory.
    #[error("{what}: {source}")]
    Io {
        /// Which file or step.
        what: String,
        /// Why.
        source: std::io::Error,
    },
    /// Setting up a NIC's tap failed.
    #[error("nic {index}: {why}")]
    Tap {
        /// Which NIC.
        index: usize,
        /// `ip`'s complaint.
        why: String,
    },
    /// QEMU ended before its QMP socket answered.
    #[error("QEMU exited at start ({status}); its log {log} ends: {tail}")]
    EarlyExit {
        /// Its exit status.
        status: String,
        /// The log's path.
        log: String,
        /// The log's last lines.
        tail: String,
    },
    /// QMP did not come up.
    #[error(transparent)]
    Qmp(#[from] QmpError),
}

/// The start time of process `pid` (field 22 of `/proc/PID/stat`), to tell a reused pid apart.
pub fn proc_start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 2..];
    after.split_whitespace().nth(19)?.parse().ok()
}

/// Whether the process recorded in a pid file (`PID STARTTIME`) is alive (not a zombie); its pid if so.
pub fn alive(pid_file: &Path) -> Option<u32> {
    let text = std::fs::read_to_string(pid_file).ok()?;
    let mut it = text.split_whitespace();
    let pid: u32 = it.next()?.parse().ok()?;
    let start: u64 = it.next()?.parse().ok()?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let state = stat[stat.rfind(')')? + 2..].chars().next()?;
    (proc_start_time(pid) == Some(start) && state != 'Z').then_some(pid)
}

/// A running QEMU.
#[derive(Debug)]
pub struct Qemu {
    /// Its pid.
    pub pid: u32,
    /// Our child, when this process launched it (its exit status is then known).
    child: Option<std::process::Child>,
    pidfd: tokio::io::unix::AsyncFd<OwnedFd>,
    /// Whether it was found running rather than launched.
    pub reattached: bool,
}

/// How QEMU ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    /// Exit code (known when this process launched it).
    Code(i32),
    /// Killed by a signal (known when this process launched it).
    Signal(i32),
    /// Gone; how is unknown (found again after a restart, not our child).
    Unknown,
}

impl std::fmt::Display for Ended {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Ended::Code(c) => write!(f, "exit code {c}"),
            Ended::Signal(s) => write!(f, "killed by signal {s}"),
            Ended::Unknown => write!(f, "gone"),
        }
    }
}

fn pidfd(pid: u32) -> std::io::Result<tokio::io::unix::AsyncFd<OwnedFd>> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1; no memory is shared.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the descriptor was just returned by the kernel and is owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    // SAFETY: the AsyncFd owns `fd`, so it stays open and refers to the same pidfd while registered.
    unsafe { tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
        .map_err(std::io::Error::from)
}

fn run_ip(args: &[&str]) -> Result<(), String> {
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("running ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Whether the network interface `name` exists in this process's network namespace. Asked through
/// netlink (`ip link show`), not `/sys/class/net`: a process that entered a namespace with `setns`
/// still sees the sysfs of the namespace it was mounted in.
fn link_exists(name: &str) -> bool {
    std::process::Command::new("ip")
        .args(["link", "show", "dev", name])
        .output()
        .is_ok_and(|o| o.status.success() && !o.stdout.is_empty())
}

/// Whether `name` is a bridge in this process's network namespace (netlink, as [`link_exists`]).
fn is_bridge(name: &str) -> bool {
    std::process::Command::new("ip")
        .args(["link", "show", "dev", name, "type", "bridge"])
        .output()
        .is_ok_and(|o| o.status.success() && !o.stdout.is_empty())
}

/// Creates (or reuses) NIC `index`'s tap device and attaches it to its bridge.
fn setup_tap(files: &RunFiles, index: usize, bridge: &str) -> Result<(), ProcessError> {
    let tap = tap_name(files, index);
    let e = |why| ProcessError::Tap { index, why };
    if !is_bridge(bridge) {
        return Err(e(format!("bridge {bridge:?} does not exist on this host")));
    }
    if !link_exists(&tap) {
        run_ip(&["tuntap", "add", "dev", &tap, "mode", "tap"]).map_err(e)?;
    }
    run_ip(&["link", "set", &tap, "master", bridge]).map_err(e)?;
    run_ip(&["link", "set", &tap, "up"]).map_err(e)
}

/// Removes the tap devices of a VM's NICs (after QEMU has ended).
pub fn remove_taps(files: &RunFiles, def: &QemuDef) {
    for i in 0..def.nics.len() {
        let tap = tap_name(files, i);
        if link_exists(&tap) {
            let _ = run_ip(&["link", "del", &tap]);
        }
    }
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let v: Vec<&str> = text.lines().collect();
    v[v.len().saturating_sub(lines)..].join(" | ")
}

impl Qemu {
    /// Starts QEMU for `vm` from `def` in `files.dir`, and connects to its QMP socket (bounded by
    /// `timeout`). The console log is appended to, so a restarted VM's earlier boots stay readable.
    pub async fn launch(
        def: &QemuDef,
        vm: &str,
        mem_mib: u64,
        vcpus: u8,
        files: &RunFiles,
        timeout: Duration,
    ) -> Result<(Qemu, Qmp, Events), ProcessError> {
        Self::launch_with(
            def,
            vm,
            mem_mib,
            vcpus,
            files,
            timeout,
            &LaunchOptions::default(),
        )
        .await
    }

    /// [`Qemu::launch`] with [`LaunchOptions`]: `incoming` starts the destination of a live migration
    /// (`-incoming defer -S`; see [`crate::migrate`]).
    pub async fn launch_with(
        def: &QemuDef,
        vm: &str,
        mem_mib: u64,
        vcpus: u8,
        files: &RunFiles,
        timeout: Duration,
        opts: &LaunchOptions,
    ) -> Result<(Qemu, Qmp, Events), ProcessError> {
        let args = def.args_with(vm, mem_mib, vcpus, files, opts)?;
        Self::launch_args(def, vm, files, args, timeout).await
    }

    /// Starts QEMU with `args` built from `def` (its taps are set up here) in `files.dir`, and connects
    /// to its QMP socket (bounded by `timeout`): what [`Qemu::launch_with`] and
    /// [`crate::colo::launch_secondary`] share.
    pub async fn launch_args(
        def: &QemuDef,
        vm: &str,
        files: &RunFiles,
        args: Vec<String>,
        timeout: Duration,
    ) -> Result<(Qemu, Qmp, Events), ProcessError> {
        for (i, nic) in def.nics.iter().enumerate() {
            setup_tap(files, i, &nic.bridge)?;
        }
        let io = |what: &str| {
            let what = what.to_string();
            move |source| ProcessError::Io { what, source }
        };
        let _ = std::fs::remove_file(files.qmp());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(files.log())
            .map_err(io("qemu.log"))?;
        let log2 = log.try_clone().map_err(io("qemu.log"))?;
        let mut cmd = std::process::Command::new(def.binary());
        cmd.args(&args)
            .stdin(std::process::Stdio::null())
            .stdout(log)
            .stderr(log2);
        // SAFETY: setsid is async-signal-safe and touches no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        tracing::info!(vm, binary = def.binary(), args = %args.join(" "), "starting QEMU");
        let mut child = cmd
            .spawn()
            .map_err(io(&format!("starting {}", def.binary())))?;
        let pid = child.id();
        let start = proc_start_time(pid).unwrap_or(0);
        write_atomic(&files.pid(), format!("{pid} {start}\n").as_bytes())
            .map_err(io("qemu.pid"))?;
        let fd = pidfd(pid).map_err(io("pidfd_open"))?;
        // QMP is up once the socket accepts; QEMU creates it early, before the guest runs.
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait().map_err(io("waiting for QEMU"))? {
                return Err(ProcessError::EarlyExit {
                    status: status.to_string(),
                    log: files.log().display().to_string(),
                    tail: tail(&files.log(), 5),
                });
            }
            if files.qmp().exists() {
                match Qmp::connect(&files.qmp(), timeout).await {
                    Ok((qmp, events)) => {
                        let q = Qemu {
                            pid,
                            child: Some(child),
                            pidfd: fd,
                            reattached: false,
                        };
                        return Ok((q, qmp, events));
                    }
                    Err(e) if tokio::time::Instant::now() >= deadline => return Err(e.into()),
                    Err(_) => {}
                }
            }
            if tokio::time::Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(QmpError::Timeout {
                    command: "QMP socket".into(),
                    timeout,
                }
                .into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Finds the QEMU a previous supervisor left running in `files.dir` and connects to it; `None` when
    /// there is none.
    pub async fn find(
        files: &RunFiles,
        timeout: Duration,
    ) -> Result<Option<(Qemu, Qmp, Events)>, ProcessError> {
        let Some(pid) = alive(&files.pid()) else {
            return Ok(None);
        };
        let fd = pidfd(pid).map_err(|source| ProcessError::Io {
            what: "pidfd_open".into(),
            source,
        })?;
        let (qmp, events) = Qmp::connect(&files.qmp(), timeout).await?;
        Ok(Some((
            Qemu {
                pid,
                child: None,
                pidfd: fd,
                reattached: true,
            },
            qmp,
            events,
        )))
    }

    /// Waits until QEMU has ended.
    pub async fn ended(&mut self) -> Ended {
        // A pidfd is readable once the process has exited (and stays so: later calls return at once).
        if self.pidfd.readable().await.is_err() {
            while Path::new(&format!("/proc/{}", self.pid)).exists() && self.child.is_none() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        match self.child.as_mut().map(std::process::Child::wait) {
            Some(Ok(st)) => {
                use std::os::unix::process::ExitStatusExt;
                match (st.code(), st.signal()) {
                    (Some(c), _) => Ended::Code(c),
                    (None, Some(s)) => Ended::Signal(s),
                    _ => Ended::Unknown,
                }
            }
            _ => Ended::Unknown,
        }
    }

    /// Kills QEMU (SIGKILL) and waits for its end.
    pub async fn kill(&mut self) -> Ended {
        // SAFETY: kill takes a pid and a signal; the pidfd held open keeps the pid from being reused.
        unsafe {
            libc::kill(self.pid as libc::pid_t, libc::SIGKILL);
        }
        self.ended().await
    }
}

/// Kills the QEMU recorded in `files` (when it is still the same process) and waits up to `timeout`
/// for it to go; whether it is gone.
pub fn kill_recorded(files: &RunFiles, timeout: Duration) -> bool {
    let Some(pid) = alive(&files.pid()) else {
        return true;
    };
    // SAFETY: kill takes a pid and a signal; `alive` just matched the pid's start time.
    unsafe {
        libc::kill(pid as libc::pid_t, libc::SIGKILL);
    }
    let deadline = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < deadline {
        if alive(&files.pid()).is_none() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// Writes `bytes` to `path` through a temporary file and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".{}.{n}.tmp", std::process::id()));
    let tmp = path.with_file_name(name);
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// Writes `PID STARTTIME` of this process to `path` (atomically).
pub fn write_pid_file(path: &Path) -> std::io::Result<()> {
    let pid = std::process::id();
    let start = proc_start_time(pid).unwrap_or(0);
    write_atomic(path, format!("{pid} {start}\n").as_bytes())
}
