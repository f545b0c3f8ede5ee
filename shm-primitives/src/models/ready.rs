//! The segment's readiness (`shm.header.ready`, `shm.attach.wait-ready`): the creator's
//! real `Readiness::publish` (the one `SegmentHeader::publish` runs) against two
//! attachers in the real `Readiness::wait_ready`, over loom's atomics and the futex
//! stand-in of `models`, which sleeps without a timeout: an attacher the creator fails
//! to wake never returns, and loom reports the deadlock. A witness cell stands for the
//! rest of the header, which the creator writes before it publishes. Bounded to 3
//! preemptions, about ten seconds in a debug build (every interleaving of the three
//! threads takes over ten minutes).

use loom::cell::UnsafeCell;
use loom::sync::atomic::AtomicU32;
use loom::sync::Arc;
use loom::thread;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::model;
use crate::header::{Readiness, READY_BUILDING};

/// The header's `ready` and `ready_waiters`, and the witness of everything else.
struct Header {
    ready: AtomicU32,
    waiters: AtomicU32,
    built: UnsafeCell<u64>,
}

impl Header {
    /// A header being built, its words stored SeqCst (see `models::wake`).
    fn new() -> Self {
        let word = |v| {
            let a = AtomicU32::new(v);
            a.store(v, Ordering::SeqCst);
            a
        };
        Header {
            ready: word(READY_BUILDING),
            waiters: word(0),
            built: UnsafeCell::new(0),
        }
    }

    fn readiness(&self) -> Readiness<'_, AtomicU32> {
        Readiness::new(&self.ready, &self.waiters)
    }
}

// The creator writes the header, then publishes, while two attachers wait for it (the
// fast check, then registered in `ready_waiters`: re-check, sleep, as long as it takes).
// Whatever the interleaving, each attacher returns ready and sees the header as the
// creator wrote it (the witness), and no waiter stays counted.
// shm[verify shm.header.ready]
// shm[verify shm.attach.wait-ready]
#[test]
fn attachers_waiting_for_readiness_wake_and_see_the_header_built() {
    model(Some(3), || {
        let header = Arc::new(Header::new());
        let attachers: Vec<_> = (0..2)
            .map(|_| {
                let header = header.clone();
                thread::spawn(move || {
                    // Far enough never to pass: only a wake ends a sleep.
                    let deadline = Instant::now() + Duration::from_secs(3600);
                    assert!(header.readiness().wait_ready(deadline));
                    let built = header.built.with(|b| {
                        // SAFETY: a loom cell; loom fails the model if this read is not
                        // ordered after the creator's write.
                        unsafe { *b }
                    });
                    assert_eq!(built, 1, "the header as the creator wrote it");
                })
            })
            .collect();
        let creator = {
            let header = header.clone();
            thread::spawn(move || {
                header.built.with_mut(|b| {
                    // SAFETY: a loom cell; loom fails the model if an attacher's read is
                    // not ordered after this write.
                    unsafe { *b = 1 }
                });
                header.readiness().publish();
            })
        };
        creator.join().unwrap();
        for attacher in attachers {
            attacher.join().unwrap();
        }
        assert_eq!(header.waiters.load(Ordering::Relaxed), 0);
    });
}
