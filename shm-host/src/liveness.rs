//! Telling whether a guest is alive: its pidfd, its doorbell's hang-up, and its
//! liveness lock (`shm.live.guest-death`).

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::{Child, ExitStatus};
use std::sync::Arc;
use std::time::Duration;

use shm_primitives::large_link::LargeInbox;
use shm_primitives::lock;
use shm_primitives::PeerId;

/// How often liveness is checked while the host is inside its API (and the longest a
/// blocking call sleeps between checks).
pub const DEFAULT_LIVENESS_INTERVAL: Duration = Duration::from_millis(10);

/// Why the host decided a guest is dead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeathCause {
    /// The guest's liveness lock on its peer entry is free.
    LockReleased,
    /// The spawned child's pidfd reported its exit.
    ProcessExited,
    /// The other end of the guest's doorbell was closed.
    HungUp,
}

/// One guest death, as reported to `on_death` callbacks (once per peer incarnation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Death {
    /// The entry.
    pub peer: PeerId,
    /// The generation the dead guest held (or the reservation's, if it died before
    /// attaching).
    pub generation: u32,
    /// Whether it had attached (false: a spawned child that died holding a ticket).
    pub attached: bool,
    /// How the host found out.
    pub cause: DeathCause,
    /// Its pid, when known.
    pub pid: Option<u32>,
    /// Its exit status, for a child the host spawned (the host reaps it).
    pub exit: Option<ExitStatus>,
    /// Messages it had published to the host that were not yet received (discarded).
    pub abandoned: u64,
    /// Messages the host had sent it that it never consumed (discarded).
    pub discarded: u64,
    /// Slots returned to Free.
    pub reclaimed_slots: u64,
    /// Messages it never consumed, kept for the entry's next guest (at-least-once
    /// delivery); not counted in `discarded`.
    pub retained: u64,
}

/// The host's link to one guest incarnation: the host end of its doorbell and, for a
/// child the host spawned, its pidfd and `Child` (so the host reaps it).
#[derive(Debug)]
pub(crate) struct GuestLink {
    /// The generation of the incarnation (a ticket's reservation, or the generation a
    /// path guest's hello named).
    pub(crate) generation: u32,
    /// Shared with the views that ring it when they free one of its slots.
    pub(crate) doorbell: Arc<OwnedFd>,
    pub(crate) pidfd: Option<OwnedFd>,
    pub(crate) child: Option<Child>,
    /// Memory files of large payloads the guest passed on the doorbell, waiting for
    /// their descriptors (`shm.msg.large`); closed with the link.
    pub(crate) large_in: LargeInbox,
}

impl GuestLink {
    pub(crate) fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Reaps the child if it has exited; its status.
    pub(crate) fn reap(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }
}

/// What one `poll` over a link's descriptors said.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct LinkEvents {
    pub(crate) exited: bool,
    pub(crate) hung_up: bool,
}

/// Polls (without waiting) the pidfd and doorbell of every link in one system call.
pub(crate) fn poll_links<'a>(
    links: impl Iterator<Item = Option<&'a GuestLink>>,
    scratch: &mut Vec<libc::pollfd>,
) -> Vec<LinkEvents> {
    scratch.clear();
    let mut owners = Vec::new();
    let mut total = 0;
    for (index, link) in links.enumerate() {
        total = index + 1;
        let Some(link) = link else { continue };
        for (fd, is_pidfd) in [
            (Some(link.doorbell.as_raw_fd()), false),
            (link.pidfd.as_ref().map(AsRawFd::as_raw_fd), true),
        ] {
            if let Some(fd) = fd {
                let events = if is_pidfd {
                    libc::POLLIN
                } else {
                    libc::POLLRDHUP
                };
                scratch.push(libc::pollfd {
                    fd,
                    events,
                    revents: 0,
                });
                owners.push((index, is_pidfd));
            }
        }
    }
    let mut out = vec![LinkEvents::default(); total];
    if scratch.is_empty() {
        return out;
    }
    // SAFETY: `scratch` is a live array of `len` pollfds we own; a zero timeout never
    // blocks.
    let rc = unsafe { libc::poll(scratch.as_mut_ptr(), scratch.len() as libc::nfds_t, 0) };
    if rc <= 0 {
        return out;
    }
    for (pfd, &(index, is_pidfd)) in scratch.iter().zip(&owners) {
        let fired = pfd.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLRDHUP) != 0;
        if is_pidfd && fired {
            out[index].exited = true;
        }
        let hup = pfd.revents & (libc::POLLHUP | libc::POLLRDHUP | libc::POLLERR) != 0;
        if !is_pidfd && hup {
            out[index].hung_up = true;
        }
    }
    out
}

/// Whether someone holds the liveness lock at `offset` of the segment file. An error
/// (which a working file never gives) counts as alive: never reap on doubt.
pub(crate) fn lock_held(file: &File, offset: u64) -> bool {
    lock::is_locked_by_other(file, offset).unwrap_or(true)
}

/// `pidfd_open(2)`; `None` where the kernel lacks it (the lock and the doorbell still
/// detect the death).
pub(crate) fn pidfd_open(pid: u32) -> Option<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: the kernel just returned this fd to us; nothing else owns it.
    Some(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Sends `signal` through a pidfd (no pid-reuse race).
pub(crate) fn pidfd_signal(pidfd: &OwnedFd, signal: i32) -> std::io::Result<()> {
    // SAFETY: pidfd_send_signal with a null siginfo reads nothing from our memory.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            signal,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
