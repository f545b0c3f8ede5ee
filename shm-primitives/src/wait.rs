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
    /// The longest a wait spins before parking, whatever `spin_rounds` says: an
    /// attempt's cost grows with the peers a host scans, a time does not.
    pub spin_time: Duration,
}

impl WaitPolicy {
    /// Park at once: no CPU is burnt while idle.
    pub const BLOCK: Self = Self {
        spin_rounds: 0,
        spin_time: Duration::ZERO,
    };
    /// Never park: lowest latency, one core per waiter.
    pub const SPIN: Self = Self {
        spin_rounds: u32::MAX,
        spin_time: Duration::MAX,
    };
    /// Spin briefly (at most 2,000 attempts and 20 µs), then park.
    pub const ADAPTIVE: Self = Self {
        spin_rounds: 2_000,
        spin_time: Duration::from_micros(20),
    };
}

impl Default for WaitPolicy {
    fn default() -> Self {
        Self::ADAPTIVE
    }
}

/// Spin rounds between two reads of the clock.
const CLOCK_EVERY: u32 = 8;

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
    let start = Instant::now();
    let deadline = start.checked_add(timeout);
    let spin_until = start.checked_add(policy.spin_time);
    let mut spins = 0u32;
    loop {
        if let Some(v) = attempt()? {
            return Ok(Some(v));
        }
        let mut spinning = spins < policy.spin_rounds;
        if spinning {
            spins += 1;
            // A clock read costs more than an attempt: look at it only now and then,
            // so a spinning waiter sees new data within one attempt.
            if spins % CLOCK_EVERY != 0 {
                std::hint::spin_loop();
                continue;
            }
        }
        let now = Instant::now();
        let left = match deadline {
            Some(d) => d.saturating_duration_since(now),
            None => Duration::MAX,
        };
        if left.is_zero() {
            return Ok(None);
        }
        if spin_until.is_some_and(|t| now >= t) {
            spins = policy.spin_rounds; // spun long enough: park from now on
            spinning = false;
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    /// A bell that only records when it was first armed.
    struct Recorder {
        first_arm: Cell<Option<Instant>>,
    }

    impl Bell for Recorder {
        fn arm(&self) -> u32 {
            if self.first_arm.get().is_none() {
                self.first_arm.set(Some(Instant::now()));
            }
            0
        }
        fn sleep(&self, _snapshot: u32, timeout: Duration) {
            std::thread::sleep(timeout.min(Duration::from_millis(1)));
        }
        fn disarm(&self) {}
    }

    fn first_park(policy: WaitPolicy, timeout: Duration) -> (Option<Duration>, u64) {
        let bell = Recorder {
            first_arm: Cell::new(None),
        };
        let mut attempts = 0u64;
        let start = Instant::now();
        let got: Result<Option<()>, ()> = wait_for(policy, timeout, &bell, || {
            attempts += 1;
            Ok(None)
        });
        assert_eq!(got, Ok(None), "nothing to find: the deadline ends it");
        (bell.first_arm.get().map(|t| t - start), attempts)
    }

    // shm[verify shm.wake.adaptive]
    #[test]
    #[cfg_attr(miri, ignore = "real-time bounds Miri's interpreter misses")]
    fn a_spin_is_bounded_by_time_as_well_as_by_attempts() {
        // Unbounded attempts, 200 µs of spinning: it parks, and well before the deadline.
        let timed = WaitPolicy {
            spin_rounds: u32::MAX,
            spin_time: Duration::from_micros(200),
        };
        let (parked, _) = first_park(timed, Duration::from_millis(100));
        let parked = parked.expect("a time-bounded spin parks");
        assert!(parked >= Duration::from_micros(200), "{parked:?}");
        assert!(
            parked < Duration::from_millis(50),
            "generous bound: {parked:?}"
        );
        // No time bound: the attempts decide (here 100 of them, then park).
        let counted = WaitPolicy {
            spin_rounds: 100,
            spin_time: Duration::MAX,
        };
        let (parked, attempts) = first_park(counted, Duration::from_millis(20));
        assert!(parked.is_some());
        assert!(attempts > 100);
        // SPIN never parks.
        let (parked, _) = first_park(WaitPolicy::SPIN, Duration::from_millis(5));
        assert_eq!(parked, None);
        // BLOCK parks after the first attempt.
        let bell_first = first_park(WaitPolicy::BLOCK, Duration::from_millis(5));
        assert!(bell_first.0.is_some());
    }
}
