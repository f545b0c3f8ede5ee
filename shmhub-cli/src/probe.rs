//! Questions the command asks the kernel about a segment's processes without taking
//! anything: who holds a lock (`F_OFD_GETLK`), and whether a pid exists.

use std::fs::File;

use shmhub::primitives::lock;

/// Whether the host of a segment is alive, by its owner lock (`shm.cli.host-alive`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostLiveness {
    /// Another open file description holds byte 0, and the host has not closed.
    Alive,
    /// The lock is held but `host_state` says the host is closing the segment.
    Closing,
    /// Nobody holds byte 0: the host is gone (the file is stale, `shm.file.stale`).
    Dead,
    /// The lock could not be tested.
    Unknown,
}

impl HostLiveness {
    /// From the lock test and the header's `host_state` (when it could be read).
    pub fn decide(lock_held: Option<bool>, closed: Option<bool>) -> Self {
        match (lock_held, closed) {
            (None, _) => HostLiveness::Unknown,
            (Some(false), _) => HostLiveness::Dead,
            (Some(true), Some(true)) => HostLiveness::Closing,
            (Some(true), _) => HostLiveness::Alive,
        }
    }

    /// The word the reports use.
    pub fn as_str(self) -> &'static str {
        match self {
            HostLiveness::Alive => "alive",
            HostLiveness::Closing => "closing",
            HostLiveness::Dead => "dead",
            HostLiveness::Unknown => "unknown",
        }
    }
}

/// Whether another open file description holds a lock on byte `offset` of `file`;
/// `None` when the test itself failed ("unknown", never "free").
// shm[impl shm.cli.host-alive]
pub fn lock_held(file: &File, offset: u64) -> Option<bool> {
    // F_OFD_GETLK: reports a conflicting lock, takes none; works on a read-only fd.
    lock::is_locked_by_other(file, offset).ok()
}

/// Whether the segment's host holds its owner lock (`shm.live.host-lock`).
pub fn host_lock_held(file: &File) -> Option<bool> {
    lock_held(file, lock::HOST_LOCK_BYTE)
}

/// Whether a process with this pid exists (`kill(pid, 0)`); `None` when the pid is
/// not a valid one or the answer is unclear. Informational only: pids are reused.
pub fn pid_exists(pid: u32) -> Option<bool> {
    let pid = libc::pid_t::try_from(pid).ok().filter(|&p| p > 0)?;
    // SAFETY: signal 0 sends nothing; kill only checks that the pid exists and that we
    // may signal it.
    if unsafe { libc::kill(pid, 0) } == 0 {
        return Some(true);
    }
    match std::io::Error::last_os_error().raw_os_error() {
        Some(libc::ESRCH) => Some(false),
        // It exists, and belongs to someone we may not signal.
        Some(libc::EPERM) => Some(true),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pids_that_cannot_exist_are_unknown_and_our_own_exists() {
        assert_eq!(pid_exists(0), None);
        assert_eq!(pid_exists(u32::MAX), None);
        assert_eq!(pid_exists(std::process::id()), Some(true));
    }

    #[test]
    fn liveness_is_the_lock_and_closing_needs_it_held() {
        use HostLiveness::*;
        assert_eq!(HostLiveness::decide(None, Some(false)), Unknown);
        assert_eq!(HostLiveness::decide(Some(false), Some(true)), Dead);
        assert_eq!(HostLiveness::decide(Some(true), Some(true)), Closing);
        assert_eq!(HostLiveness::decide(Some(true), None), Alive);
    }
}
