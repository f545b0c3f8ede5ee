//! Crash injection for the crash-matrix tests (`shm.recover.crash-matrix`).
//!
//! With the `crash-points` feature, a process whose `SHMHUB_CRASH_AT` names a point
//! SIGKILLs itself when the real protocol reaches it. Without the feature every point
//! compiles to nothing.

/// Places in the protocol where a crash leaves distinct debris: three in the guest,
/// one in the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashPoint {
    /// The entry was claimed (Attached) but attach has not returned yet.
    AfterClaim,
    /// A slot is Loaned and holds the payload; no descriptor references it yet.
    SlotLoaned,
    /// The descriptor is written and stamped (published); the tail is not advanced.
    DescriptorWritten,
    /// The host is inside a blocking receive, about to park, with whatever guests are
    /// attached (and parked) at that moment.
    HostParking,
}

impl CrashPoint {
    /// The guest's points, in protocol order.
    pub const GUEST: [CrashPoint; 3] = [
        CrashPoint::AfterClaim,
        CrashPoint::SlotLoaned,
        CrashPoint::DescriptorWritten,
    ];

    /// Every point.
    pub const ALL: [CrashPoint; 4] = [
        CrashPoint::AfterClaim,
        CrashPoint::SlotLoaned,
        CrashPoint::DescriptorWritten,
        CrashPoint::HostParking,
    ];

    /// The name `SHMHUB_CRASH_AT` uses.
    pub fn name(self) -> &'static str {
        match self {
            CrashPoint::AfterClaim => "after-claim",
            CrashPoint::SlotLoaned => "slot-loaned",
            CrashPoint::DescriptorWritten => "descriptor-written",
            CrashPoint::HostParking => "host-parking",
        }
    }
}

/// Environment variable naming the point at which to die.
pub const CRASH_ENV: &str = "SHMHUB_CRASH_AT";
/// Environment variable: how many times the point is passed before it fires
/// (default 0: the first time).
pub const CRASH_SKIP_ENV: &str = "SHMHUB_CRASH_SKIP";

/// Dies here if `SHMHUB_CRASH_AT` names `point` and the point has already been passed
/// `SHMHUB_CRASH_SKIP` times (feature `crash-points` only).
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
    use super::{CrashPoint, CRASH_ENV, CRASH_SKIP_ENV};
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::OnceLock;

    static ARMED: OnceLock<Option<CrashPoint>> = OnceLock::new();
    static PASSES: AtomicU64 = AtomicU64::new(0);

    pub(super) fn check(point: CrashPoint) {
        let armed = ARMED.get_or_init(|| {
            let name = std::env::var(CRASH_ENV).ok()?;
            CrashPoint::ALL.into_iter().find(|p| p.name() == name)
        });
        if *armed != Some(point) {
            return;
        }
        let skip = std::env::var(CRASH_SKIP_ENV)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        if PASSES.fetch_add(1, Ordering::Relaxed) >= skip {
            // SAFETY: kill(2) on our own pid has no memory effects; SIGKILL does not
            // return.
            unsafe {
                libc::kill(libc::getpid(), libc::SIGKILL);
            }
        }
    }
}
