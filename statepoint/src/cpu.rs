//! What the vCPU threads did with their CPU time, and a short real-time boost for the stun.
//!
//! # Progress without guest cooperation
//! Linux accounts the time a thread spends running a KVM guest as *guest time* (`/proc/<pid>/task/<tid>/stat`
//! field 43, part of `utime`); the time spent in the kernel on its behalf — write-protect faults of dirty
//! logging, exits — is `stime`. The share `guest / (utime + stime)` of a vCPU thread is therefore the part
//! of the CPU it got that went to the guest's own instructions, whatever else runs on the host (a CPU hog
//! takes CPU time away, not guest share). The counters are tick-sampled (`USER_HZ` units): the epoch
//! engine reads them over windows of ≥ 30 ms of CPU time and 50 ms of wall time.
//!
//! # Stun boost
//! Under load a stun waits for the scheduler: a kicked vCPU that was preempted inside `KVM_RUN` must run
//! again before it can leave, and the controller itself can be preempted mid-copy. While stunning, the
//! controller and the vCPU threads are raised to `SCHED_FIFO` priority 1; a vCPU drops back to
//! `SCHED_OTHER` before it re-enters the guest, the controller once the vCPUs are released. Needs
//! `CAP_SYS_NICE` (root); without it the boost is off and reported so.

use std::io;

/// CPU-time counters of one or more threads, in clock ticks (`USER_HZ`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuTimes {
    /// User time (includes guest time).
    pub utime: u64,
    /// System time: the kernel on the thread's behalf (faults, exits).
    pub stime: u64,
    /// Time spent running the guest.
    pub guest: u64,
}

impl CpuTimes {
    /// All CPU time.
    pub fn cpu(&self) -> u64 {
        self.utime + self.stime
    }

    /// `self - earlier`, saturating.
    pub fn since(&self, earlier: &CpuTimes) -> CpuTimes {
        CpuTimes {
            utime: self.utime.saturating_sub(earlier.utime),
            stime: self.stime.saturating_sub(earlier.stime),
            guest: self.guest.saturating_sub(earlier.guest),
        }
    }

    /// Sum.
    pub fn add(&mut self, other: &CpuTimes) {
        self.utime += other.utime;
        self.stime += other.stime;
        self.guest += other.guest;
    }
}

/// Nanoseconds per clock tick of [`CpuTimes`].
pub fn tick_ns() -> u64 {
    // SAFETY: `sysconf` has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    1_000_000_000 / u64::try_from(hz).ok().filter(|&h| h > 0).unwrap_or(100)
}

/// The counters of thread `tid` of this process.
pub fn thread_times(tid: libc::pid_t) -> io::Result<CpuTimes> {
    let path = format!("/proc/self/task/{tid}/stat");
    let text = std::fs::read_to_string(&path)?;
    parse_stat(&text).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{path}: unexpected format"),
        )
    })
}

fn parse_stat(text: &str) -> Option<CpuTimes> {
    // The command name (field 2) is in parentheses and may hold spaces: count fields after the last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state): field n is f[n - 3].
    let field = |n: usize| f.get(n - 3)?.parse::<u64>().ok();
    Some(CpuTimes {
        utime: field(14)?,
        stime: field(15)?,
        guest: field(43)?,
    })
}

/// The calling thread's id.
pub fn gettid() -> libc::pid_t {
    // SAFETY: `gettid` has no preconditions.
    unsafe { libc::gettid() }
}

/// Puts thread `tid` (0: the caller) under `SCHED_FIFO` priority 1 (`on`) or back under `SCHED_OTHER`.
pub fn set_boost(tid: libc::pid_t, on: bool) -> io::Result<()> {
    let (policy, prio) = if on {
        (libc::SCHED_FIFO, 1)
    } else {
        (libc::SCHED_OTHER, 0)
    };
    let param = libc::sched_param {
        sched_priority: prio,
    };
    // SAFETY: `param` is a valid `sched_param` for the call's duration.
    if unsafe { libc::sched_setscheduler(tid, policy, &param) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_after_a_name_with_spaces() {
        let mut line = String::from("42 (vcpu 0) R");
        for n in 4..=52 {
            line.push_str(&format!(" {n}"));
        }
        let t = parse_stat(&line).expect("parses");
        assert_eq!((t.utime, t.stime, t.guest), (14, 15, 43));
        assert!(thread_times(gettid()).is_ok());
    }
}
