//! Crash injection for the crash-matrix tests (`shm.recover.crash-matrix`).
//!
//! With the `crash-points` feature, a process whose `SHMHUB_CRASH_AT` names a point
//! SIGKILLs itself when the real protocol reaches it. Without the feature every point
//! compiles to nothing.

/// Places in the guest protocol where a crash leaves distinct debris.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashPoint {
    /// The entry was claimed (Attached) but attach has not returned yet.
    AfterClaim,
    /// A slot is Loaned and holds the payload; no descriptor references it yet.
    SlotLoaned,
    /// The descriptor words are written into the ring; the tail is not yet published.
    DescriptorWritten,
}

impl CrashPoint {
    /// Every point, in protocol order.
    pub const ALL: [CrashPoint; 3] = [
        CrashPoint::AfterClaim,
        CrashPoint::SlotLoaned,
        CrashPoint::DescriptorWritten,
    ];

    /// The name `SHMHUB_CRASH_AT` uses.
    pub fn name(self) -> &'static str {
        match self {
            CrashPoint::AfterClaim => "after-claim",
            CrashPoint::SlotLoaned => "slot-loaned",
            CrashPoint::DescriptorWritten => "descriptor-written",
        }
    }
}

/// Environment variable naming the point at which to die.
pub const CRASH_ENV: &str = "SHMHUB_CRASH_AT";

/// Dies here if `SHMHUB_CRASH_AT` names `point` (feature `crash-points` only).
// shm[impl shm.recover.crash-matrix]
#[inline(always)]
pub fn point(point: CrashPoint) {
    #[cfg(feature = "crash-points")]
    armed::check(point);
    #[cfg(not(feature = "crash-points"))]
    let _ = point;
}

#[cfg(feature = "crash-points")]
mod armed {
    use super::{CrashPoint, CRASH_ENV};
    use std::sync::OnceLock;

    static ARMED: OnceLock<Option<CrashPoint>> = OnceLock::new();

    pub(super) fn check(point: CrashPoint) {
        let armed = ARMED.get_or_init(|| {
            let name = std::env::var(CRASH_ENV).ok()?;
            CrashPoint::ALL.into_iter().find(|p| p.name() == name)
        });
        if *armed == Some(point) {
            // SAFETY: kill(2) on our own pid has no memory effects; SIGKILL does not
            // return.
            unsafe {
                libc::kill(libc::getpid(), libc::SIGKILL);
            }
        }
    }
}
