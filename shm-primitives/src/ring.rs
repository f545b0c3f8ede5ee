//! Single-producer single-consumer descriptor rings.
//!
//! Each side keeps its own counter in private memory and only ever *stores* it to the
//! shared header; the other side's counter is the only shared index it *loads*, and it
//! is validated before use (`shm.ring.validate`). Counters are monotonic u64 that wrap;
//! the depth is `tail.wrapping_sub(head)`.
//!
//! The ring types are generic over their atomics (defaulting to the segment's
//! `AtomicU64`/`AtomicU32`) only so that the loom models (`crate::models`) run this
//! very code over loom's atomics; products never name the parameters.

use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use crate::doorbell::{PARKED_DOORBELL, PARKED_FUTEX};

use crate::desc::{DecodeError, Descriptor, DESC_WORDS};
use crate::freelist::Atom;
use crate::futex::FutexWord;
use crate::violation::Violation;

/// Size of a ring header: the producer's line then the consumer's line.
pub const RING_HEADER_SIZE: usize = 128;

// shm[impl shm.ring.layout]
/// A ring header exactly as the spec's table (`shm.ring.layout`): `tail` alone on the
/// producer's cache line, `head` alone on the consumer's. `C` is the counters' atomic
/// type and `F` the parked flags' (see the module docs).
#[repr(C)]
#[derive(Debug)]
pub struct RingHeader<C = AtomicU64, F = AtomicU32> {
    /// Producer counter: descriptors published so far. Its low 32 bits are the futex
    /// word a consumer waiting for data sleeps on.
    pub tail: C,
    /// Nonzero while the consumer is parked waiting for data: 1 on the futex, 2 on its
    /// doorbell (`shm.doorbell.ring`). Written by the consumer (only when it parks),
    /// read by the producer after every publish: so it lives on the producer's line.
    pub consumer_parked: F,
    /// Reserved, zero.
    pub _producer_pad: AtomicU32,
    /// Reserved (producer line), zero.
    pub _producer_reserved: [AtomicU64; 6],
    /// Consumer counter: descriptors consumed so far. Its low 32 bits are the futex
    /// word a producer waiting for space sleeps on.
    pub head: C,
    /// Nonzero while the producer is parked waiting for ring space or a free slot (1:
    /// futex, 2: doorbell); on the consumer's line, which reads it after every receive.
    pub producer_parked: F,
    /// Reserved, zero.
    pub _consumer_pad: AtomicU32,
    /// The futex word of a producer parked for space or a slot (`shm.wake.space`):
    /// the consumer increments it before waking that producer. Not `head`, because a
    /// freed slot does not move `head`: a wake sent between the producer's re-check and
    /// its sleep would find nobody asleep, and the sleep would find `head` unchanged.
    pub space_bell: C,
    /// Reserved (consumer line), zero.
    pub _consumer_reserved: [AtomicU64; 5],
}

const _: () = {
    use std::mem::{offset_of, size_of};
    assert!(size_of::<RingHeader>() == RING_HEADER_SIZE);
    assert!(offset_of!(RingHeader, tail) == 0);
    assert!(offset_of!(RingHeader, consumer_parked) == 8);
    assert!(offset_of!(RingHeader, head) == 64);
    assert!(offset_of!(RingHeader, producer_parked) == 72);
    assert!(offset_of!(RingHeader, space_bell) == 80);
};

/// A ring in shared memory: its header and `capacity` descriptors.
#[derive(Debug)]
pub struct RingView<'a, C = AtomicU64, F = AtomicU32> {
    header: &'a RingHeader<C, F>,
    descs: &'a [C],
    capacity: u32,
}

impl<C, F> Clone for RingView<'_, C, F> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<C, F> Copy for RingView<'_, C, F> {}

impl<'a, C: FutexWord<V = u64>, F: Atom<V = u32>> RingView<'a, C, F> {
    /// A view over a header and its descriptor words.
    ///
    /// Panics if `capacity` is not a power of two or `descs` does not hold exactly
    /// `capacity` descriptors; both come from a validated layout, never from peers.
    pub fn new(header: &'a RingHeader<C, F>, descs: &'a [C], capacity: u32) -> Self {
        assert!(capacity.is_power_of_two());
        assert_eq!(descs.len(), capacity as usize * DESC_WORDS);
        Self {
            header,
            descs,
            capacity,
        }
    }

    /// Descriptors the ring holds.
    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    fn slot(&self, pos: u64) -> &'a [C] {
        let i = (pos & u64::from(self.capacity - 1)) as usize * DESC_WORDS;
        &self.descs[i..i + DESC_WORDS]
    }

    /// Depth from a trusted producer counter and the shared consumer counter,
    /// validated; used by the producer side for accounting.
    pub fn depth_from(&self, tail: u64) -> Result<u32, Violation> {
        let head = self.header.head.load(Ordering::Acquire);
        check_distance(head, tail, self.capacity)
    }

    /// The shared consumer counter, validated against a trusted producer counter.
    pub fn head_from(&self, tail: u64) -> Result<u64, Violation> {
        let head = self.header.head.load(Ordering::Acquire);
        check_distance(head, tail, self.capacity)?;
        Ok(head)
    }

    /// The descriptor at position `pos`, decoded and checked to carry `pos` as its
    /// `seq` (the producer re-reading what it published, e.g. to retain it).
    pub fn read_at(&self, pos: u64) -> Result<Descriptor, Violation> {
        let mut words = [0u64; DESC_WORDS];
        for (w, cell) in words.iter_mut().zip(self.slot(pos)) {
            *w = cell.load(Ordering::Acquire);
        }
        if !stamps(words[0], pos) {
            return Err(Violation::DescSequence {
                expected: pos,
                found: words[0].wrapping_sub(1),
            });
        }
        Descriptor::decode(&words).map_err(decode_violation)
    }

    /// `tail - head` as stored (wrapping, unvalidated): for accounting and tests only.
    pub fn raw_depth(&self) -> u64 {
        let tail = self.header.tail.load(Ordering::Acquire);
        tail.wrapping_sub(self.header.head.load(Ordering::Acquire))
    }

    /// Producer, after publishing: wakes the consumer only if it is parked (no
    /// syscall otherwise), on the futex or through `bell`, the consumer's doorbell.
    // shm[impl shm.wake.signal]
    // shm[impl shm.doorbell.ring]
    #[inline]
    fn wake_consumer(&self, bell: Option<BorrowedFd<'_>>) {
        let parked = self.header.consumer_parked.load(Ordering::SeqCst);
        if parked != 0 {
            wake(parked, &self.header.tail, bell);
        }
    }

    /// Consumer, after consuming (and freeing any slot): wakes the producer only if
    /// it is parked waiting for space or a slot, on the futex or through `bell`.
    // shm[impl shm.wake.signal]
    // shm[impl shm.doorbell.ring]
    #[inline]
    pub fn wake_producer(&self, bell: Option<BorrowedFd<'_>>) {
        let parked = self.header.producer_parked.load(Ordering::SeqCst);
        if parked != 0 {
            wake_space(parked, &self.header.space_bell, bell);
        }
    }

    /// Receiver, after freeing a slot: [`wake_producer`](Self::wake_producer) behind a
    /// SeqCst fence. A free is no SeqCst store, so the SeqCst pairs of
    /// `shm.wake.park` do not order it; the fence pairs with the one a parking producer
    /// issues after arming (`CounterBell::arm`): either the producer's re-check sees
    /// the free, or this load sees the producer's flag (`shm.wake.space`).
    // shm[impl shm.wake.space]
    #[inline]
    pub fn wake_producer_after_free(&self, bell: Option<BorrowedFd<'_>>) {
        C::seq_cst_fence();
        self.wake_producer(bell);
    }

    /// Whether the consumer waits on its doorbell (a producer that had no doorbell to
    /// ring at publish time must find one and ring it).
    pub fn consumer_wants_doorbell(&self) -> bool {
        self.header.consumer_parked.load(Ordering::SeqCst) == PARKED_DOORBELL
    }

    /// Whether the producer waits on its doorbell.
    pub fn producer_wants_doorbell(&self) -> bool {
        self.header.producer_parked.load(Ordering::SeqCst) == PARKED_DOORBELL
    }

    /// Wakes whoever is parked on either counter, unconditionally: for the host when
    /// it closes the segment, so parked guests re-check at once.
    // shm[impl shm.live.host-close]
    pub fn wake_waiters(&self) {
        self.header.tail.futex_wake();
        self.header.space_bell.futex_wake();
    }

    /// The bell a consumer parks on while the ring is empty.
    pub fn data_bell(&self) -> CounterBell<'a, C, F> {
        CounterBell {
            counter: &self.header.tail,
            parked: &self.header.consumer_parked,
        }
    }

    /// The bell a producer parks on while the ring is full or its pool is empty.
    pub fn space_bell(&self) -> CounterBell<'a, C, F> {
        CounterBell {
            counter: &self.header.space_bell,
            parked: &self.header.producer_parked,
        }
    }

    /// Zeroes both counters. Only for the host, when no guest uses the ring.
    // shm[impl shm.slot.reclaim]
    pub fn reset(&self) {
        // Stamps from the last use could match the positions of the next: clear them.
        for entry in self.descs.chunks_exact(DESC_WORDS) {
            entry[0].store(0, Ordering::Relaxed);
        }
        self.header.head.store(0, Ordering::Relaxed);
        self.header.consumer_parked.store(0, Ordering::Relaxed);
        self.header.producer_parked.store(0, Ordering::Relaxed);
        self.header.tail.store(0, Ordering::Release);
    }
}

/// The slow half of a wake, out of line: futex or doorbell, by the parked value.
#[cold]
#[inline(never)]
fn wake(parked: u32, counter: &impl FutexWord, bell: Option<BorrowedFd<'_>>) {
    match (parked, bell) {
        (PARKED_DOORBELL, Some(fd)) => crate::doorbell::ring(fd),
        (PARKED_DOORBELL, None) => {}
        _ => counter.futex_wake(),
    }
}

/// [`wake`] for a producer: a futex sleeper's word is moved first.
#[cold]
#[inline(never)]
fn wake_space(parked: u32, space_bell: &impl FutexWord, bell: Option<BorrowedFd<'_>>) {
    if parked != PARKED_DOORBELL {
        space_bell.futex_bump();
    }
    wake(parked, space_bell, bell);
}

fn decode_violation(e: DecodeError) -> Violation {
    match e {
        DecodeError::Kind(kind) => Violation::DescKind { kind },
        DecodeError::MsgKind(flags) => Violation::DescFlags { flags },
    }
}

/// Whether `stamp` publishes position `pos`: it is `pos + 1`, and never 0, the stamp
/// of an entry not written since the ring was reset. (So position 2^64 − 1, which
/// only forged counters reach, can never be published.)
#[inline]
fn stamps(stamp: u64, pos: u64) -> bool {
    stamp != 0 && stamp == pos.wrapping_add(1)
}

/// Depth as a consumer sees it. The consumer follows the stamps, so it may be one
/// entry ahead of the shared tail: the producer stores the tail just after the stamp
/// (`shm.ring.produce`), and may have died in between. That is depth 0, not a
/// violation.
fn consumer_depth(head: u64, tail: u64, capacity: u32) -> Result<u32, Violation> {
    if tail.wrapping_add(1) == head {
        return Ok(0);
    }
    check_distance(head, tail, capacity)
}

fn check_distance(head: u64, tail: u64, capacity: u32) -> Result<u32, Violation> {
    let depth = tail.wrapping_sub(head);
    if depth > u64::from(capacity) {
        return Err(Violation::RingIndex {
            head,
            tail,
            capacity,
        });
    }
    Ok(depth as u32)
}

/// Why a push failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushError {
    /// `capacity` descriptors are in flight.
    Full,
    /// The consumer's counter is impossible.
    Violation(Violation),
}

/// The producer's private state for one ring.
#[derive(Debug, Default, Clone)]
pub struct Producer {
    tail: u64,
    head_cache: u64,
}

impl Producer {
    /// A producer for a ring whose counters are zero.
    pub fn new() -> Self {
        Self::default()
    }

    /// The private producer counter.
    pub fn tail(&self) -> u64 {
        self.tail
    }

    /// Whether one more descriptor fits, refreshing the cached consumer counter only
    /// when the cache says the ring is full.
    // shm[impl shm.ring.full]
    pub fn has_space<C: FutexWord<V = u64>, F: Atom<V = u32>>(
        &mut self,
        ring: &RingView<'_, C, F>,
    ) -> Result<bool, Violation> {
        if self.tail.wrapping_sub(self.head_cache) < u64::from(ring.capacity) {
            return Ok(true);
        }
        // (P1) Load head: Acquire, so the consumer's reads of the entries it released
        // happen before we overwrite them; SeqCst, so that a producer re-checking after
        // arming its parked flag either sees the consumer's C3 or is seen by its C4
        // (`shm.wake.park`).
        let head = ring.header.head.load(Ordering::SeqCst);
        let depth = check_distance(head, self.tail, ring.capacity)?;
        self.head_cache = head;
        Ok(depth < ring.capacity)
    }

    /// Publishes `desc` (its `seq` is set to the position it lands at).
    // shm[impl shm.ring.produce]
    pub fn push<C: FutexWord<V = u64>, F: Atom<V = u32>>(
        &mut self,
        ring: &RingView<'_, C, F>,
        mut desc: Descriptor,
        bell: Option<BorrowedFd<'_>>,
    ) -> Result<(), PushError> {
        if !self.has_space(ring).map_err(PushError::Violation)? {
            return Err(PushError::Full);
        }
        desc.seq = self.tail;
        let words = desc.encode();
        let entry = ring.slot(self.tail);
        // (P2) Relaxed stores of descriptor words 1..8, then the stamp (word 0, the
        // position + 1) with Release: a consumer that Acquire-loads the stamp sees
        // the whole entry, without touching the tail's cache line.
        for (cell, &word) in entry[1..].iter().zip(&words[1..]) {
            cell.store(word, Ordering::Relaxed);
        }
        entry[0].store(words[0], Ordering::Release);
        crate::crash::point(crate::crash::CrashPoint::DescriptorWritten);
        // (P3) Store the new tail (for waiters and accounting): SeqCst orders it
        // before the parked-flag load in P4.
        self.tail = self.tail.wrapping_add(1);
        ring.header.tail.store(self.tail, Ordering::SeqCst);
        // (P4) Wake the consumer if (and only if) it is parked.
        ring.wake_consumer(bell);
        Ok(())
    }
}

/// The consumer's private state for one ring: its counter. It needs no cache of the
/// producer's counter, since each entry's stamp says whether it is published.
#[derive(Debug, Default, Clone)]
pub struct Consumer {
    head: u64,
}

impl Consumer {
    /// A consumer for a ring whose counters are zero.
    pub fn new() -> Self {
        Self::default()
    }

    /// A consumer that starts where the ring's shared consumer counter is: a guest
    /// resuming a ring whose earlier consumer died (`shm.delivery.at-least-once`).
    /// The counters are validated like any others.
    pub fn resume<C: FutexWord<V = u64>, F: Atom<V = u32>>(
        ring: &RingView<'_, C, F>,
    ) -> Result<Self, Violation> {
        let head = ring.header.head.load(Ordering::Acquire);
        let tail = ring.header.tail.load(Ordering::Acquire);
        check_distance(head, tail, ring.capacity)?;
        Ok(Self { head })
    }

    /// Reads the next descriptor without consuming it, or `None` when the ring is
    /// empty. A published entry is recognised by its stamp alone; the shared tail is
    /// loaded only when the stamp says the entry is not published.
    // shm[impl shm.ring.consume]
    // shm[impl shm.ring.validate]
    pub fn peek<C: FutexWord<V = u64>, F: Atom<V = u32>>(
        &mut self,
        ring: &RingView<'_, C, F>,
    ) -> Result<Option<Descriptor>, Violation> {
        let entry = ring.slot(self.head);
        // (C1) Acquire-load the entry's stamp: it pairs with the producer's Release
        // store of it (P2), so one cache line tells us whether the entry is ours.
        let mut stamp = entry[0].load(Ordering::Acquire);
        if !stamps(stamp, self.head) {
            // Not (yet) published, as far as this line says: the tail decides.
            // SeqCst, so that a consumer re-checking after arming its parked flag
            // either sees P3 or is seen by P4 (`shm.wake.park`).
            let tail = ring.header.tail.load(Ordering::SeqCst);
            if consumer_depth(self.head, tail, ring.capacity)? == 0 {
                return Ok(None);
            }
            // The tail says published; its Acquire pairs with P3, which follows the
            // stamp's store: the stamp is now visible, and must be ours.
            stamp = entry[0].load(Ordering::Acquire);
            if !stamps(stamp, self.head) {
                return Err(Violation::DescSequence {
                    expected: self.head,
                    found: stamp.wrapping_sub(1),
                });
            }
        }
        // (C2) Relaxed loads of the remaining words, ordered after the stamp's Acquire.
        let mut words = [0u64; DESC_WORDS];
        words[0] = stamp;
        for (w, cell) in words[1..].iter_mut().zip(&entry[1..]) {
            *w = cell.load(Ordering::Relaxed);
        }
        let desc = Descriptor::decode(&words).map_err(decode_violation)?;
        debug_assert_eq!(desc.seq, self.head);
        Ok(Some(desc))
    }

    /// Descriptors published but not consumed, from the validated shared tail.
    /// An entry whose stamp is published but whose tail store never came (its
    /// producer died between P2 and P3) counts: it is published.
    pub fn pending<C: FutexWord<V = u64>, F: Atom<V = u32>>(
        &mut self,
        ring: &RingView<'_, C, F>,
    ) -> Result<u32, Violation> {
        let tail = ring.header.tail.load(Ordering::Acquire);
        let depth = consumer_depth(self.head, tail, ring.capacity)?;
        if tail.wrapping_add(1) == self.head || depth == ring.capacity {
            return Ok(depth);
        }
        let stamped = stamps(ring.slot(tail)[0].load(Ordering::Acquire), tail);
        Ok(depth + u32::from(stamped))
    }

    /// Consumes the descriptor last returned by `peek`.
    // shm[impl shm.ring.consume]
    pub fn advance<C: FutexWord<V = u64>, F: Atom<V = u32>>(&mut self, ring: &RingView<'_, C, F>) {
        // (C3) Store head: Release so our reads of the entry happen before the
        // producer reuses it (pairs with P1); SeqCst orders it before C4's flag load.
        self.head = self.head.wrapping_add(1);
        ring.header.head.store(self.head, Ordering::SeqCst);
    }
}

/// A counter one side advances and the other side can sleep on: the snapshot, the
/// parked flag and the futex word of one wait (`shm.wake.park`).
#[derive(Debug)]
pub struct CounterBell<'a, C = AtomicU64, F = AtomicU32> {
    counter: &'a C,
    parked: &'a F,
}

impl<C, F> Clone for CounterBell<'_, C, F> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<C, F> Copy for CounterBell<'_, C, F> {}

impl<C: FutexWord<V = u64>, F: Atom<V = u32>> CounterBell<'_, C, F> {
    /// Marks the waiter parked on its doorbell (SeqCst, like [`Bell::arm`]: the
    /// caller re-checks its condition after this, then waits on the doorbell).
    ///
    /// [`Bell::arm`]: crate::wait::Bell::arm
    // shm[impl shm.doorbell.arm]
    pub fn arm_doorbell(&self) {
        self.parked.store(PARKED_DOORBELL, Ordering::SeqCst);
        // As in `arm`: orders the flag before the re-check's loads of a slot.
        C::seq_cst_fence();
    }

    /// Clears the parked mark, if set (no store otherwise: the flag shares the other
    /// side's cache line).
    pub fn disarm_doorbell(&self) {
        if self.parked.load(Ordering::Relaxed) != 0 {
            self.parked.store(0, Ordering::Relaxed);
        }
    }
}

impl<C: FutexWord<V = u64>, F: Atom<V = u32>> crate::wait::Bell for CounterBell<'_, C, F> {
    fn arm(&self) -> u32 {
        self.parked.store(PARKED_FUTEX, Ordering::SeqCst);
        // Orders the flag before every load of the re-check, including those of a
        // slot's word and free list, which no SeqCst store of the other side publishes:
        // pairs with the receiver's fence after a free (`wake_producer_after_free`).
        C::seq_cst_fence();
        self.counter.load(Ordering::SeqCst) as u32
    }

    fn sleep(&self, snapshot: u32, timeout: Duration) {
        self.counter.futex_wait(snapshot, timeout);
    }

    fn disarm(&self) {
        self.parked.store(0, Ordering::Relaxed);
    }
}
