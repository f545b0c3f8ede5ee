//! Loom models of the concurrent protocols, run over the real code: the ring
//! (`crate::ring`), the slot pool (`crate::slot`, with `crate::freelist`), the peer
//! table (`crate::peer`), the park/wake protocol (`crate::wait` and the ring's bells)
//! the host-wide bell with the host's doorbell arm (`crate::header::HostBell`) and the
//! segment's readiness (`crate::header::Readiness`).
//! Those types are generic over their atomics (defaulting to the segment's); here they
//! are instantiated with loom's, so loom explores the interleavings and the weak-memory
//! outcomes of the very code products run. Like the other models in this crate they are
//! ordinary tests (`loom::model`, no `--cfg loom`), run by `cargo nextest run` like the
//! rest; each explores every interleaving or, where that takes minutes, those within a
//! preemption bound, so that each takes seconds even in a debug build
//! (`LOOM_MAX_PREEMPTIONS` overrides the bound).
//!
//! Witnesses (loom `UnsafeCell`s and counters next to the shared words) are not part of
//! the protocol: they let loom report an access that the protocol fails to order, and
//! let the models assert who holds what.
//!
//! Every party runs in a spawned thread; the main thread only sets up, spawns, joins and
//! checks. Loom 0.7 decides which interleavings to try from the last access to each
//! object only, and does not try running a spawned thread's load-then-CAS ahead of the
//! main thread's first access to the same word: a party run on the main thread right
//! after the spawns is never overtaken at its start, and bugs there go unseen.

mod host_bell;
mod peer;
mod ready;
mod ring;
mod slot;
mod wake;

use loom::sync::atomic::{AtomicU32, AtomicU64};
use loom::sync::{Condvar, Mutex};
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::futex::FutexWord;

/// Runs `f` under loom with at most `bound` preemptions (`None`: every interleaving),
/// unless `LOOM_MAX_PREEMPTIONS` says otherwise. The models whose every interleaving
/// takes seconds in a debug build are exhaustive; the others are bounded.
fn model<F: Fn() + Sync + Send + 'static>(bound: Option<usize>, f: F) {
    let mut builder = loom::model::Builder::new();
    if builder.preemption_bound.is_none() {
        builder.preemption_bound = bound;
    }
    builder.check(f);
}

loom::lazy_static! {
    /// The futex stand-in's one wait queue, like the kernel's hash bucket shared by every
    /// word: a wake wakes every sleeper, and each re-checks its own word.
    static ref FUTEX: (Mutex<()>, Condvar) = (Mutex::new(()), Condvar::new());
}

/// A futex over loom's atomics. `FUTEX_WAIT` checks the word and goes to sleep
/// atomically with respect to `FUTEX_WAKE` (both take the bucket lock), so a waker
/// that stores and then wakes either is seen by the check or wakes the sleeper; a
/// waker that never calls wake wakes nobody. The stand-in sleeps without a timeout, so
/// a lost wakeup leaves the waiter blocked and loom reports the deadlock.
fn futex_wait(still_expected: impl FnOnce() -> bool) {
    let (lock, sleepers) = &*FUTEX;
    let guard = lock.lock().unwrap();
    if still_expected() {
        drop(sleepers.wait(guard).unwrap());
    }
}

/// The stand-in's `FUTEX_WAKE`: wakes every sleeper of the bucket.
fn futex_wake() {
    let (lock, sleepers) = &*FUTEX;
    let _guard = lock.lock().unwrap();
    sleepers.notify_all();
}

/// The stand-in over a ring counter (the kernel compares its low half).
impl FutexWord for AtomicU64 {
    fn futex_wait(&self, expected: u32, _timeout: Duration) {
        futex_wait(|| self.load(Ordering::Relaxed) as u32 == expected);
    }

    fn futex_wake(&self) {
        futex_wake();
    }

    fn futex_bump(&self) {
        self.fetch_add(1, Ordering::SeqCst);
    }

    fn seq_cst_fence() {
        loom::sync::atomic::fence(Ordering::SeqCst);
    }
}

/// The stand-in over a 32-bit word (the header's host bell and readiness word).
impl FutexWord for AtomicU32 {
    fn futex_wait(&self, expected: u32, _timeout: Duration) {
        futex_wait(|| self.load(Ordering::Relaxed) == expected);
    }

    fn futex_wake(&self) {
        futex_wake();
    }

    fn futex_bump(&self) {
        self.fetch_add(1, Ordering::SeqCst);
    }

    fn seq_cst_fence() {
        loom::sync::atomic::fence(Ordering::SeqCst);
    }
}
