//! The one wait loop every blocking call uses: try, spin a bounded number of rounds,
//! then park on a bell (arm and snapshot, re-check, sleep on the snapshot), always
//! against a deadline.

use std::time::{Duration, Instant};

/// Something a waiter can sleep on, across processes.
pub trait Bell {
    /// Marks the waiter parked and returns a snapshot of the futex word. Must be
    /// SeqCst so that a producer's SeqCst publish either is seen by the re-check that
    /// follows, or sees the parked flag and wakes us.
    fn arm(&self) -> u32;
    /// Sleeps while the word still equals `snapshot`, at most `timeout`.
    fn sleep(&self, snapshot: u32, timeout: Duration);
    /// Clears the parked mark.
    fn disarm(&self);
}

/// How a blocking call waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WaitPolicy {
    /// Failed attempts to spin through (with a CPU pause hint) before parking.
    /// 0 parks at once; `u32::MAX` never parks (a pure spin until the deadline).
    pub spin_rounds: u32,
}

impl WaitPolicy {
    /// Park at once: no CPU is burnt while idle.
    pub const BLOCK: Self = Self { spin_rounds: 0 };
    /// Never park: lowest latency, one core per waiter.
    pub const SPIN: Self = Self {
        spin_rounds: u32::MAX,
    };
    /// Spin briefly (a few microseconds), then park.
    pub const ADAPTIVE: Self = Self { spin_rounds: 2_000 };
}

impl Default for WaitPolicy {
    fn default() -> Self {
        Self::ADAPTIVE
    }
}

/// Spin rounds between two reads of the clock.
const CLOCK_EVERY: u32 = 64;

/// Runs `attempt` until it yields a value, an error, or `timeout` passes (`Ok(None)`).
// shm[impl shm.wake.park]
// shm[impl shm.wake.timeout]
// shm[impl shm.wake.adaptive]
pub fn wait_for<T, E>(
    policy: WaitPolicy,
    timeout: Duration,
    bell: &impl Bell,
    mut attempt: impl FnMut() -> Result<Option<T>, E>,
) -> Result<Option<T>, E> {
    let deadline = Instant::now().checked_add(timeout);
    let mut spins = 0u32;
    loop {
        if let Some(v) = attempt()? {
            return Ok(Some(v));
        }
        let spinning = spins < policy.spin_rounds;
        if spinning {
            spins += 1;
            // A clock read costs more than an attempt: look at it only now and then,
            // so a spinning waiter sees new data within one attempt.
            if spins % CLOCK_EVERY != 0 {
                std::hint::spin_loop();
                continue;
            }
        }
        let left = match deadline {
            Some(d) => d.saturating_duration_since(Instant::now()),
            None => Duration::MAX,
        };
        if left.is_zero() {
            return Ok(None);
        }
        if spinning {
            std::hint::spin_loop();
            continue;
        }
        let snapshot = bell.arm();
        let rechecked = attempt();
        if !matches!(rechecked, Ok(None)) {
            bell.disarm();
            return rechecked;
        }
        bell.sleep(snapshot, left.min(Duration::from_secs(3600)));
        bell.disarm();
    }
}
