//! Userfaultfd write-protection of guest RAM: the raw `userfaultfd(2)` calls the copy-after-resume capture
//! needs (`UFFDIO_API`, `UFFDIO_REGISTER` in write-protect mode, `UFFDIO_WRITEPROTECT`, `UFFDIO_WAKE`, reading
//! fault messages). Guest RAM is an anonymous private mapping, for which write-protection needs only
//! `UFFD_FEATURE_PAGEFAULT_FLAG_WP` (shmem would also need `UFFD_FEATURE_WP_HUGETLBFS_SHMEM`).
//!
//! The descriptor is opened *without* `UFFD_USER_MODE_ONLY`: a guest write reaches the mapping through KVM
//! (a kernel-mode `get_user_pages`), which such a descriptor would not see. Without that flag the caller
//! needs `CAP_SYS_PTRACE` when `vm.unprivileged_userfaultfd` is 0 (the agent runs as root).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

const UFFD_API: u64 = 0xAA;
/// `_IOWR(0xAA, 0x3F, struct uffdio_api)`.
const UFFDIO_API: libc::c_ulong = 0xC018_AA3F;
/// `_IOWR(0xAA, 0x00, struct uffdio_register)`.
const UFFDIO_REGISTER: libc::c_ulong = 0xC020_AA00;
/// `_IOR(0xAA, 0x01, struct uffdio_range)`.
const UFFDIO_UNREGISTER: libc::c_ulong = 0x8010_AA01;
/// `_IOR(0xAA, 0x02, struct uffdio_range)`.
const UFFDIO_WAKE: libc::c_ulong = 0x8010_AA02;
/// `_IOWR(0xAA, 0x06, struct uffdio_writeprotect)`.
const UFFDIO_WRITEPROTECT: libc::c_ulong = 0xC018_AA06;

const UFFD_FEATURE_PAGEFAULT_FLAG_WP: u64 = 1 << 0;
const UFFDIO_REGISTER_MODE_WP: u64 = 2;
const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1;
/// Bit of `UFFDIO_WRITEPROTECT` in the `ioctls` mask `UFFDIO_REGISTER` returns (`_UFFDIO_WRITEPROTECT`).
const IOCTL_BIT_WRITEPROTECT: u64 = 1 << 0x06;

const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
const UFFD_PAGEFAULT_FLAG_WP: u64 = 2;

#[repr(C)]
#[derive(Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioWriteprotect {
    range: UffdioRange,
    mode: u64,
}

/// `struct uffd_msg` (32 bytes); only the page-fault member of its union is read.
#[repr(C)]
#[derive(Default, Clone, Copy)]
struct UffdMsg {
    event: u8,
    reserved1: u8,
    reserved2: u16,
    reserved3: u32,
    flags: u64,
    address: u64,
    ptid: u32,
    pad: u32,
}

/// Userfaultfd errors.
#[derive(Debug, thiserror::Error)]
pub enum UffdError {
    /// A call failed.
    #[error("userfaultfd {op}: {source}")]
    Sys {
        /// Which call.
        op: &'static str,
        /// The errno.
        #[source]
        source: std::io::Error,
    },
    /// The kernel lacks something this module needs.
    #[error("userfaultfd: {0}")]
    Unsupported(String),
}

fn sys(op: &'static str) -> UffdError {
    UffdError::Sys {
        op,
        source: std::io::Error::last_os_error(),
    }
}

/// A write-protect fault read from the descriptor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WpFault {
    /// Faulting host address (page-aligned by the kernel unless `UFFD_FEATURE_EXACT_ADDRESS`).
    pub address: u64,
    /// Whether the fault is a write-protect fault (as opposed to a missing-page fault).
    pub wp: bool,
}

/// A userfaultfd descriptor set up for write-protection.
#[derive(Debug)]
pub struct Uffd {
    fd: OwnedFd,
}

impl Uffd {
    /// Opens a descriptor (non-blocking, close-on-exec) and negotiates the write-protect feature.
    pub fn open() -> Result<Self, UffdError> {
        // SAFETY: the syscall takes flags only and returns a new descriptor or -1.
        let raw =
            unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
        if raw < 0 {
            return Err(sys("open (userfaultfd syscall)"));
        }
        // SAFETY: `raw` is a descriptor we own from here on.
        let fd = unsafe { OwnedFd::from_raw_fd(raw as i32) };
        let mut api = UffdioApi {
            api: UFFD_API,
            features: UFFD_FEATURE_PAGEFAULT_FLAG_WP,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_API reads and writes one `struct uffdio_api`, which `api` is.
        if unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API, &mut api) } < 0 {
            return Err(sys("UFFDIO_API (feature PAGEFAULT_FLAG_WP)"));
        }
        if api.features & UFFD_FEATURE_PAGEFAULT_FLAG_WP == 0 {
            return Err(UffdError::Unsupported(
                "the kernel does not offer UFFD_FEATURE_PAGEFAULT_FLAG_WP".into(),
            ));
        }
        Ok(Uffd { fd })
    }

    /// Registers `[start, start + len)` (page-aligned) for write-protect faults.
    pub fn register_wp(&self, start: u64, len: u64) -> Result<(), UffdError> {
        let mut reg = UffdioRegister {
            range: UffdioRange { start, len },
            mode: UFFDIO_REGISTER_MODE_WP,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER reads and writes one `struct uffdio_register`; the range is the caller's
        // own mapping (the kernel checks it).
        if unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_REGISTER, &mut reg) } < 0 {
            return Err(sys("UFFDIO_REGISTER (mode WP)"));
        }
        if reg.ioctls & IOCTL_BIT_WRITEPROTECT == 0 {
            let _ = self.unregister(start, len);
            return Err(UffdError::Unsupported(
                "the registered range does not allow UFFDIO_WRITEPROTECT".into(),
            ));
        }
        Ok(())
    }

    /// Unregisters a range.
    pub fn unregister(&self, start: u64, len: u64) -> Result<(), UffdError> {
        let mut range = UffdioRange { start, len };
        // SAFETY: UFFDIO_UNREGISTER reads one `struct uffdio_range`.
        if unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_UNREGISTER, &mut range) } < 0 {
            return Err(sys("UFFDIO_UNREGISTER"));
        }
        Ok(())
    }

    /// Write-protects (`protect`) or un-protects `[start, start + len)`. Un-protecting wakes the threads
    /// waiting on faults in the range.
    pub fn write_protect(&self, start: u64, len: u64, protect: bool) -> Result<(), UffdError> {
        let mut wp = UffdioWriteprotect {
            range: UffdioRange { start, len },
            // The kernel refuses DONTWAKE together with WP (protecting wakes nobody anyway).
            mode: if protect {
                UFFDIO_WRITEPROTECT_MODE_WP
            } else {
                0
            },
        };
        // SAFETY: UFFDIO_WRITEPROTECT reads one `struct uffdio_writeprotect`.
        if unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_WRITEPROTECT, &mut wp) } < 0 {
            return Err(sys(if protect {
                "UFFDIO_WRITEPROTECT (protect)"
            } else {
                "UFFDIO_WRITEPROTECT (un-protect)"
            }));
        }
        Ok(())
    }

    /// Wakes the threads waiting on faults in `[start, start + len)`.
    pub fn wake(&self, start: u64, len: u64) -> Result<(), UffdError> {
        let mut range = UffdioRange { start, len };
        // SAFETY: UFFDIO_WAKE reads one `struct uffdio_range`.
        if unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_WAKE, &mut range) } < 0 {
            return Err(sys("UFFDIO_WAKE"));
        }
        Ok(())
    }

    /// Waits up to `timeout` for the descriptor or `stop` (an eventfd or pipe, may be -1) to become
    /// readable; returns whether the descriptor is.
    pub fn wait(&self, stop: i32, timeout: Duration) -> Result<bool, UffdError> {
        let mut fds = [
            libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop,
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: `fds` is an array of two valid `pollfd`s (a negative fd is ignored by poll).
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, ms) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                return Ok(false);
            }
            return Err(UffdError::Sys {
                op: "poll",
                source: e,
            });
        }
        Ok(fds[0].revents & libc::POLLIN != 0)
    }

    /// Reads the pending page faults into `out` (cleared first), without blocking. Other events are
    /// ignored (none are enabled).
    pub fn read_faults(&self, out: &mut Vec<WpFault>) -> Result<(), UffdError> {
        out.clear();
        let mut msgs = [UffdMsg::default(); 32];
        // SAFETY: `msgs` is a buffer of `size_of_val(&msgs)` bytes; the kernel writes whole messages.
        let n = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                msgs.as_mut_ptr().cast(),
                std::mem::size_of_val(&msgs),
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::WouldBlock
                || e.kind() == std::io::ErrorKind::Interrupted
            {
                return Ok(());
            }
            return Err(UffdError::Sys {
                op: "read",
                source: e,
            });
        }
        let count = n as usize / std::mem::size_of::<UffdMsg>();
        for m in &msgs[..count] {
            if m.event == UFFD_EVENT_PAGEFAULT {
                out.push(WpFault {
                    address: m.address,
                    wp: m.flags & UFFD_PAGEFAULT_FLAG_WP != 0,
                });
            }
        }
        Ok(())
    }

    /// The raw descriptor.
    pub fn raw_fd(&self) -> i32 {
        self.fd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_match_the_kernel() {
        assert_eq!(std::mem::size_of::<UffdioApi>(), 24);
        assert_eq!(std::mem::size_of::<UffdioRegister>(), 32);
        assert_eq!(std::mem::size_of::<UffdioWriteprotect>(), 24);
        assert_eq!(std::mem::size_of::<UffdMsg>(), 32);
    }
}
