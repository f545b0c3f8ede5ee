//! The guest's view of its host's liveness (`shm.live.host-death`): the closed flag on
//! every call; the host's lock, the doorbell's hang-up and the heartbeat once per
//! liveness interval while idle or blocked.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

use std::sync::Arc;

use shm_primitives::doorbell::Drained;
use shm_primitives::large_link::LargeInbox;
use shm_primitives::{lock, Segment};

use crate::DetachedError;

/// How often an idle or blocked guest checks that its host is alive.
pub const DEFAULT_LIVENESS_INTERVAL: Duration = Duration::from_millis(10);

/// How the guest found out its host is dead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostDeathCause {
    /// No process holds the host's lock on the segment.
    LockReleased,
    /// The host's end of the doorbell was closed.
    HungUp,
    /// The heartbeat did not move for twice its interval.
    HeartbeatStale,
}

#[derive(Debug)]
pub(crate) struct HostWatch {
    interval: Duration,
    next_due: Instant,
    /// This guest's end of its doorbell (every guest has one: a ticket's socket pair
    /// or its connection to the host's listener).
    doorbell: Arc<OwnedFd>,
    last_beat: u64,
    last_beat_change: Instant,
    /// Memory files of large payloads the host passed on the doorbell, waiting for
    /// their descriptors (`shm.msg.large`).
    pub(crate) large_in: LargeInbox,
    /// How long a receive waits for a large payload's file that has not arrived with
    /// its descriptor: zero, except for a guest that resumed retained messages.
    pub(crate) large_wait: Duration,
    /// Sticky: once the host is gone, every call reports it.
    gone: Option<DetachedError>,
}

impl HostWatch {
    pub(crate) fn new(segment: &Segment, doorbell: OwnedFd) -> Self {
        let now = Instant::now();
        Self {
            interval: DEFAULT_LIVENESS_INTERVAL,
            next_due: now,
            doorbell: Arc::new(doorbell),
            last_beat: segment.header().heartbeat(),
            last_beat_change: now,
            large_in: LargeInbox::default(),
            large_wait: Duration::ZERO,
            gone: None,
        }
    }

    pub(crate) fn set_interval(&mut self, interval: Duration) {
        self.interval = interval.max(Duration::from_micros(100));
        self.next_due = Instant::now();
    }

    pub(crate) fn doorbell(&self) -> BorrowedFd<'_> {
        self.doorbell.as_fd()
    }

    /// The doorbell, shared with the views that ring it when they free a slot.
    pub(crate) fn doorbell_arc(&self) -> &Arc<OwnedFd> {
        &self.doorbell
    }

    pub(crate) fn interval(&self) -> Duration {
        self.interval
    }

    /// Consumes the doorbell's pending rings (keeping any files passed on it) before
    /// a wait on it. Its end of stream means the host is gone (or closed the segment:
    /// the closed flag says which).
    pub(crate) fn drain_doorbell(&mut self, segment: &Segment) -> Result<(), DetachedError> {
        if self.large_in.drain(self.doorbell.as_fd()) == Drained::HungUp {
            self.check_cheap(segment)?;
            return Err(*self
                .gone
                .insert(DetachedError::HostDead(HostDeathCause::HungUp)));
        }
        Ok(())
    }

    /// The next sleep slice: at most one interval, never past `deadline`.
    pub(crate) fn slice_until(&self, deadline: Option<Instant>) -> Duration {
        match deadline {
            Some(d) => d
                .saturating_duration_since(Instant::now())
                .min(self.interval),
            None => self.interval,
        }
    }

    /// Every call: the sticky verdict and the host's closed flag (one load, no
    /// syscall).
    pub(crate) fn check_cheap(&mut self, segment: &Segment) -> Result<(), DetachedError> {
        if let Some(gone) = self.gone {
            return Err(gone);
        }
        if segment.header().is_closed() {
            return Err(*self.gone.insert(DetachedError::HostClosed));
        }
        Ok(())
    }

    /// At most once per interval: the full check.
    pub(crate) fn check_if_due(&mut self, segment: &Segment) -> Result<(), DetachedError> {
        self.check_cheap(segment)?;
        let now = Instant::now();
        if now < self.next_due {
            return Ok(());
        }
        self.next_due = now + self.interval;
        match self.host_death(segment, now) {
            Some(cause) => Err(*self.gone.insert(DetachedError::HostDead(cause))),
            None => Ok(()),
        }
    }

    // shm[impl shm.live.host-death]
    // shm[impl shm.live.heartbeat]
    fn host_death(&mut self, segment: &Segment, now: Instant) -> Option<HostDeathCause> {
        if hung_up(&self.doorbell) {
            return Some(HostDeathCause::HungUp);
        }
        if let Some(file) = segment.backing().file() {
            // An error (which a working file never gives) counts as alive.
            if !lock::is_locked_by_other(file, lock::HOST_LOCK_BYTE).unwrap_or(true) {
                return Some(HostDeathCause::LockReleased);
            }
        }
        let header = segment.header();
        let beat = header.heartbeat();
        if beat != self.last_beat {
            self.last_beat = beat;
            self.last_beat_change = now;
            return None;
        }
        let interval_ms = header.heartbeat_interval_ms();
        let limit = Duration::from_millis(u64::from(interval_ms) * 2);
        if interval_ms != 0 && now.duration_since(self.last_beat_change) > limit {
            return Some(HostDeathCause::HeartbeatStale);
        }
        None
    }
}

/// Whether the other end of a stream socket was closed (a zero-timeout poll).
fn hung_up(fd: &OwnedFd) -> bool {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: one pollfd we own; a zero timeout never blocks.
    let rc = unsafe { libc::poll(&mut pfd, 1, 0) };
    rc > 0 && pfd.revents & (libc::POLLHUP | libc::POLLRDHUP | libc::POLLERR) != 0
}
