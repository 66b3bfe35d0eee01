//! Real-time scheduling and memory locking for the heartbeat and detector threads.
//!
//! A failure detector judges a peer by silence, so anything that delays the *local* threads — CPU hogs
//! at normal priority, page faults on memory that was swapped out — looks like the peer's silence and
//! makes a false failover. Corosync runs its heartbeat at real-time priority with its memory locked;
//! [`Realtime`] does the same for the threads this crate starts ([`crate::heartbeat::Heartbeat::start`]
//! and [`crate::detector::spawn`]):
//!
//! - **`SCHED_FIFO`** at a modest priority ([`Realtime::DEFAULT_PRIORITY`] = 10, below the kernel's
//!   threaded interrupt handlers at 50, above every normal-priority task), with `SCHED_RESET_ON_FORK`.
//!   The threads sleep between packets (a few µs of work every 20 ms); the kernel's real-time
//!   throttling (`sched_rt_runtime_us`, 95 % by default) still bounds them should one ever spin.
//! - **Memory locking**, [`MemLock`]: by default the thread's own stack (`mlock` of the
//!   [`LOCKED_STACK`] bytes below the thread's start), not the process: an agent process maps guest
//!   memory, and `mlockall(MCL_CURRENT | MCL_FUTURE)` there would pin every guest page it ever touches
//!   (no swap, no reclaim, and a large guest can fail to map under `RLIMIT_MEMLOCK`). [`MemLock::Process`]
//!   is for processes without guest memory (a witness, a test harness).
//!
//! Both need privileges: `SCHED_FIFO` needs `CAP_SYS_NICE` (root) or an `RLIMIT_RTPRIO` of at least
//! the priority; locking needs `CAP_IPC_LOCK` or an `RLIMIT_MEMLOCK` large enough. Without them the
//! thread runs at normal priority, unlocked, and one WARN per process says which and why.
//!
//! The environment overrides the default for the whole process (the agent's nodes need no option):
//! `AX_HB_RT=off|fifo|<priority 1..=99>` and `AX_HB_MLOCK=off|thread|process`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Once;

use tracing::{debug, warn};

/// Environment variable: `off`, `fifo` (the default priority) or a priority 1..=99.
pub const ENV_RT: &str = "AX_HB_RT";
/// Environment variable: `off`, `thread` or `process`.
pub const ENV_MLOCK: &str = "AX_HB_MLOCK";
/// Bytes of a real-time thread's stack locked by [`MemLock::Thread`].
pub const LOCKED_STACK: usize = 128 * 1024;
/// Stack size of the threads this crate starts (leaves room above the locked part).
pub const THREAD_STACK: usize = 512 * 1024;

/// What to lock in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemLock {
    /// Nothing.
    Off,
    /// The real-time thread's stack ([`LOCKED_STACK`] bytes).
    Thread,
    /// The whole process, now and in future (`mlockall(MCL_CURRENT | MCL_FUTURE)`), once per process.
    /// Not for a process that maps guest memory.
    Process,
}

/// Scheduling and locking of the heartbeat and detector threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Realtime {
    /// `SCHED_FIFO` priority (1..=99); `None` keeps normal scheduling.
    pub priority: Option<u8>,
    /// What to lock.
    pub lock: MemLock,
}

impl Default for Realtime {
    fn default() -> Self {
        Realtime {
            priority: Some(Self::DEFAULT_PRIORITY),
            lock: MemLock::Thread,
        }
    }
}

/// What [`Realtime::apply_to_current_thread`] achieved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Applied {
    /// The thread runs `SCHED_FIFO`.
    pub fifo: bool,
    /// The requested memory is locked.
    pub locked: bool,
}

/// A setting of [`ENV_RT`] or [`ENV_MLOCK`] that is not understood.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{var}={value:?} is not understood (expected {expected})")]
pub struct EnvError {
    var: &'static str,
    value: String,
    expected: &'static str,
}

static WARNED_FIFO: AtomicBool = AtomicBool::new(false);
static WARNED_LOCK: AtomicBool = AtomicBool::new(false);
static LOCK_PROCESS: Once = Once::new();
static PROCESS_LOCKED: AtomicBool = AtomicBool::new(false);

impl Realtime {
    /// The default `SCHED_FIFO` priority.
    pub const DEFAULT_PRIORITY: u8 = 10;

    /// Normal scheduling, nothing locked.
    pub fn off() -> Self {
        Realtime {
            priority: None,
            lock: MemLock::Off,
        }
    }

    /// The default, overridden by [`ENV_RT`] and [`ENV_MLOCK`]; a value that is not understood is
    /// reported (WARN) and the default kept.
    pub fn from_env() -> Self {
        let rt = Self::parse(
            std::env::var(ENV_RT).ok().as_deref(),
            std::env::var(ENV_MLOCK).ok().as_deref(),
        );
        rt.unwrap_or_else(|e| {
            warn!(error = %e, "heartbeat real-time settings: using the default");
            Realtime::default()
        })
    }

    /// [`Realtime::from_env`] on given values (`None`: unset).
    pub fn parse(rt: Option<&str>, mlock: Option<&str>) -> Result<Self, EnvError> {
        let mut r = Realtime::default();
        if let Some(v) = rt {
            r.priority = match v.trim() {
                "off" | "0" | "" => None,
                "fifo" | "on" => Some(Self::DEFAULT_PRIORITY),
                n => match n.parse::<u8>() {
                    Ok(p @ 1..=99) => Some(p),
                    _ => {
                        return Err(EnvError {
                            var: ENV_RT,
                            value: v.into(),
                            expected: "off, fifo or a priority 1..=99",
                        })
                    }
                },
            };
        }
        if let Some(v) = mlock {
            r.lock = match v.trim() {
                "off" | "" => MemLock::Off,
                "thread" => MemLock::Thread,
                "process" => MemLock::Process,
                _ => {
                    return Err(EnvError {
                        var: ENV_MLOCK,
                        value: v.into(),
                        expected: "off, thread or process",
                    })
                }
            };
        }
        Ok(r)
    }

    /// Makes the calling thread real-time and locks memory as configured; `what` names the thread in
    /// the logs. A missing privilege is not an error: the thread runs on at normal priority and the
    /// first failure of each kind in the process is a WARN naming the cause.
    pub fn apply_to_current_thread(&self, what: &str) -> Applied {
        let mut applied = Applied::default();
        if let Some(prio) = self.priority {
            match set_fifo(prio) {
                Ok(()) => {
                    applied.fifo = true;
                    debug!(thread = what, priority = prio, "SCHED_FIFO");
                }
                Err(e) => warn_once(
                    &WARNED_FIFO,
                    what,
                    &format!(
                        "cannot run at SCHED_FIFO priority {prio} ({e}): needs CAP_SYS_NICE (root) or \
                         RLIMIT_RTPRIO >= {prio}; running at normal priority, so CPU load can delay \
                         heartbeats and cause false failovers"
                    ),
                ),
            }
        }
        match self.lock {
            MemLock::Off => {}
            MemLock::Thread => match lock_stack() {
                Ok(()) => applied.locked = true,
                Err(e) => warn_once(
                    &WARNED_LOCK,
                    what,
                    &format!(
                        "cannot lock {LOCKED_STACK} bytes of stack ({e}): needs CAP_IPC_LOCK or \
                         RLIMIT_MEMLOCK >= {} KiB; running unlocked",
                        LOCKED_STACK / 1024
                    ),
                ),
            },
            MemLock::Process => {
                LOCK_PROCESS.call_once(|| match lock_process() {
                    Ok(()) => {
                        PROCESS_LOCKED.store(true, Ordering::Relaxed);
                        debug!("mlockall(MCL_CURRENT | MCL_FUTURE)");
                    }
                    Err(e) => warn_once(
                        &WARNED_LOCK,
                        what,
                        &format!(
                            "mlockall(MCL_CURRENT | MCL_FUTURE) failed ({e}): needs CAP_IPC_LOCK or \
                             an RLIMIT_MEMLOCK above the process's size; running unlocked"
                        ),
                    ),
                });
                applied.locked = PROCESS_LOCKED.load(Ordering::Relaxed);
            }
        }
        applied
    }
}

fn warn_once(flag: &AtomicBool, what: &str, msg: &str) {
    if flag.swap(true, Ordering::Relaxed) {
        debug!(thread = what, "{msg}");
    } else {
        warn!(thread = what, "{msg}");
    }
}

fn set_fifo(priority: u8) -> std::io::Result<()> {
    let param = libc::sched_param {
        sched_priority: i32::from(priority),
    };
    // SAFETY: `param` is a valid, initialised sched_param that outlives the call; pid 0 is the calling
    // thread; the call only changes the scheduling class of this thread.
    let r = unsafe {
        libc::sched_setscheduler(0, libc::SCHED_FIFO | libc::SCHED_RESET_ON_FORK, &param)
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Locks the [`LOCKED_STACK`] bytes below the current stack position (the threads of this crate are
/// started with [`THREAD_STACK`] bytes of stack, so the range is mapped).
fn lock_stack() -> std::io::Result<()> {
    let here = 0u8;
    let top = std::ptr::addr_of!(here) as usize;
    let page = page_size();
    let end = top.div_ceil(page) * page;
    let start = end.saturating_sub(LOCKED_STACK);
    // SAFETY: mlock only changes the residency of the pages in [start, end), which lie inside this
    // thread's mapped stack (THREAD_STACK > LOCKED_STACK + what the thread used so far); it reads and
    // writes no memory of ours.
    let r = unsafe { libc::mlock(start as *const libc::c_void, end - start) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn lock_process() -> std::io::Result<()> {
    // SAFETY: mlockall takes only flags and changes residency, not contents, of the process's pages.
    let r = unsafe { libc::mlockall(libc::MCL_CURRENT | libc::MCL_FUTURE) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf with a valid name has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(p).ok().filter(|&p| p > 0).unwrap_or(4096)
}

/// Starts a named thread with [`THREAD_STACK`] bytes of stack that applies `rt` to itself first.
pub(crate) fn spawn_thread<F>(
    name: &str,
    rt: Realtime,
    f: F,
) -> std::io::Result<std::thread::JoinHandle<()>>
where
    F: FnOnce(Applied) + Send + 'static,
{
    let what = name.to_owned();
    std::thread::Builder::new()
        .name(name.into())
        .stack_size(THREAD_STACK)
        .spawn(move || {
            let applied = rt.apply_to_current_thread(&what);
            f(applied)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_settings() {
        assert_eq!(Realtime::parse(None, None).unwrap(), Realtime::default());
        assert_eq!(
            Realtime::parse(Some("off"), Some("off")).unwrap(),
            Realtime::off()
        );
        assert_eq!(
            Realtime::parse(Some("30"), Some("process")).unwrap(),
            Realtime {
                priority: Some(30),
                lock: MemLock::Process
            }
        );
        assert_eq!(
            Realtime::parse(Some("fifo"), None).unwrap().priority,
            Some(Realtime::DEFAULT_PRIORITY)
        );
        assert!(Realtime::parse(Some("100"), None).is_err());
        assert!(Realtime::parse(Some("high"), None).is_err());
        assert!(Realtime::parse(None, Some("all")).is_err());
    }

    #[test]
    fn a_thread_runs_with_or_without_the_privilege() {
        // Root gets SCHED_FIFO and the lock; an unprivileged user gets a WARN and normal scheduling.
        // Either way the thread runs and reports what it got.
        let (tx, rx) = std::sync::mpsc::channel();
        let h = spawn_thread("rt-test", Realtime::default(), move |a| {
            // SAFETY: sched_getscheduler(0) only reads the calling thread's policy.
            let policy = unsafe { libc::sched_getscheduler(0) };
            tx.send((a, policy)).unwrap();
        })
        .unwrap();
        h.join().unwrap();
        let (a, policy) = rx.recv().unwrap();
        assert_eq!(
            a.fifo,
            policy & !libc::SCHED_RESET_ON_FORK == libc::SCHED_FIFO
        );
        let h = spawn_thread("rt-off", Realtime::off(), move |a| {
            assert_eq!(a, Applied::default());
        })
        .unwrap();
        h.join().unwrap();
    }
}
