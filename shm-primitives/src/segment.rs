//! A segment: a backing plus the validated layout that says where everything is.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use crate::broadcast::{BroadcastMeta, BroadcastPool};
use crate::header::{HeaderError, SegmentHeader};
use crate::layout::{
    Direction, LayoutError, SegmentConfig, SegmentLayout, SlotClasses, POOL_HEADER_SIZE,
};
use crate::peer::{PeerEntry, PeerId};
use crate::region::{Region, ShmBacking};
use crate::ring::{RingHeader, RingView, RING_HEADER_SIZE};
use crate::slot::{PoolHeader, PoolUsage, PoolView};

/// A segment: memory plus the layout every view is computed from.
///
/// Both constructors establish that the backing holds at least `layout.total_size`
/// bytes, so every view below is in bounds by construction.
#[derive(Debug)]
pub struct Segment {
    backing: ShmBacking,
    layout: SegmentLayout,
    /// Where the host's next broadcast allocation starts (`shm.broadcast.alloc`).
    /// Private memory, not shared: only the host's own segment ever allocates, and a
    /// clone (a view's) starts from a copy it never uses.
    broadcast_cursor: AtomicU32,
}

impl Clone for Segment {
    fn clone(&self) -> Self {
        Self {
            backing: self.backing.clone(),
            layout: self.layout,
            broadcast_cursor: AtomicU32::new(self.broadcast_cursor.load(Ordering::Relaxed)),
        }
    }
}

/// Why a segment could not be initialised.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    /// The configuration is invalid.
    #[error(transparent)]
    Layout(#[from] LayoutError),
    /// The backing is smaller than the layout.
    #[error("backing holds {have} bytes, the layout needs {need}")]
    TooSmall {
        /// Bytes available.
        have: u64,
        /// Bytes needed.
        need: u64,
    },
}

impl Segment {
    /// Creator: writes the header for `config` into a zeroed backing. Every other
    /// table is valid as all zeros (Empty peers, empty rings, Free slots), so nothing
    /// else is written and untouched pages stay unallocated. The segment is not
    /// published: call [`publish`](Self::publish) last.
    // shm[impl shm.header.layout]
    pub fn init(
        backing: ShmBacking,
        config: SegmentConfig,
        segment_id: [u64; 2],
        host_pid: u32,
    ) -> Result<Self, InitError> {
        let layout = config.layout()?;
        let have = backing.region().len() as u64;
        if have < layout.total_size {
            return Err(InitError::TooSmall {
                have,
                need: layout.total_size,
            });
        }
        let seg = Self::new(backing, layout);
        seg.header().init(&layout, segment_id, host_pid);
        Ok(seg)
    }

    /// Attacher: validates the header against the backing's length (the file length)
    /// and adopts the layout it describes. Call after the segment is ready.
    pub fn attach(backing: ShmBacking) -> Result<Self, HeaderError> {
        let file_len = backing.region().len() as u64;
        let header = Self::header_of(backing.region())?;
        let layout = header.validate(file_len)?;
        Ok(Self::new(backing, layout))
    }

    fn new(backing: ShmBacking, layout: SegmentLayout) -> Self {
        Self {
            backing,
            layout,
            broadcast_cursor: AtomicU32::new(0),
        }
    }

    /// The header of a region, if the region is long enough to hold one.
    pub fn header_of(region: Region<'_>) -> Result<&SegmentHeader, HeaderError> {
        // SAFETY: SegmentHeader consists only of atomic integers.
        unsafe { region.view::<SegmentHeader>(0) }.ok_or(HeaderError::ShorterThanHeader {
            file_len: region.len() as u64,
        })
    }

    /// Publishes the segment (readiness word, Release, last).
    pub fn publish(&self) {
        self.header().publish();
    }

    /// The backing.
    pub fn backing(&self) -> &ShmBacking {
        &self.backing
    }

    /// The layout.
    pub fn layout(&self) -> &SegmentLayout {
        &self.layout
    }

    /// The header.
    pub fn header(&self) -> &SegmentHeader {
        Self::header_of(self.backing.region()).expect("checked at construction")
    }

    /// Whether `id` names an entry of this segment's table.
    pub fn contains(&self, id: PeerId) -> bool {
        id.index() < self.layout.config.max_guests as usize
    }

    /// Peer entry of `id`, or `None` when `id` is past `max_guests`.
    pub fn peer(&self, id: PeerId) -> Option<&PeerEntry> {
        if !self.contains(id) {
            return None;
        }
        let off = self.layout.peer_offset(id.index()) as usize;
        // SAFETY: PeerEntry consists only of atomic integers; bounds are checked.
        unsafe { self.backing.region().view::<PeerEntry>(off) }
    }

    /// The ring for `dir` of guest `id`.
    pub fn ring(&self, id: PeerId, dir: Direction) -> Option<RingView<'_>> {
        if !self.contains(id) {
            return None;
        }
        let region = self.backing.region();
        let off = self.layout.ring_offset(id.index(), dir) as usize;
        // SAFETY: RingHeader consists only of atomic integers; bounds are checked.
        let header = unsafe { region.view::<RingHeader>(off) }?;
        let cap = self.layout.config.ring_capacity;
        let descs = atomic_slice::<AtomicU64>(region, off + RING_HEADER_SIZE, cap as usize * 8)?;
        Some(RingView::new(header, descs, cap))
    }

    /// The pools (one per slot class) whose slots travel in `dir`, of guest `id`.
    pub fn pools(&self, id: PeerId, dir: Direction) -> Option<Pools<'_>> {
        self.contains(id).then_some(Pools {
            segment: self,
            index: id.index(),
            dir,
        })
    }

    /// The pool of class `class` whose slots travel in `dir`, of guest `id`.
    pub fn pool(&self, id: PeerId, dir: Direction, class: usize) -> Option<PoolView<'_>> {
        self.pools(id, dir)?.class(class)
    }

    /// The broadcast pool (`shm.broadcast.layout`), `None` when the segment has none.
    // shm[impl shm.broadcast.layout]
    pub fn broadcast(&self) -> Option<BroadcastPool<'_>> {
        let config = &self.layout.config;
        let n = config.broadcast_slots as usize;
        if n == 0 {
            return None;
        }
        let region = self.backing.region();
        let off = self.layout.broadcast_offset as usize;
        let metas = atomic_slice::<BroadcastMeta>(region, off, n)?;
        let data = off + n * std::mem::size_of::<BroadcastMeta>();
        Some(BroadcastPool::new(
            metas,
            region,
            data,
            config.broadcast_slot_size,
            &self.broadcast_cursor,
        ))
    }
}

/// The pools of one direction of one guest area, one per slot class.
#[derive(Debug, Clone, Copy)]
pub struct Pools<'a> {
    segment: &'a Segment,
    index: usize,
    dir: Direction,
}

impl<'a> Pools<'a> {
    /// Number of classes.
    pub fn classes(&self) -> usize {
        self.segment.layout.config.classes.len()
    }

    /// The slot classes.
    pub fn slot_classes(&self) -> &'a SlotClasses {
        &self.segment.layout.config.classes
    }

    /// The pool of class `class`, `None` past the last class.
    #[inline]
    pub fn class(&self, class: usize) -> Option<PoolView<'a>> {
        let layout = &self.segment.layout;
        let geometry = *layout.pool_geometries().get(class)?;
        let region = self.segment.backing.region();
        let off = layout.pool_offset(self.index, self.dir, class) as usize;
        let n = geometry.count as usize;
        // SAFETY: PoolHeader consists only of atomic integers; bounds are checked.
        let header = unsafe { region.view::<PoolHeader>(off) }?;
        let words_at = off + POOL_HEADER_SIZE as usize;
        let words = atomic_slice::<AtomicU64>(region, words_at, n)?;
        let links = atomic_slice::<AtomicU32>(region, words_at + 8 * n, n)?;
        let owners = atomic_slice::<AtomicU32>(region, words_at + 12 * n, n)?;
        let data = off + geometry.meta_len as usize;
        Some(PoolView::new(
            header,
            words,
            links,
            owners,
            region,
            data,
            geometry.slot_size,
        ))
    }

    /// The guest whose area these pools are in.
    pub fn peer(&self) -> PeerId {
        PeerId::from_index(self.index).expect("built from a PeerId")
    }

    /// The broadcast pool, for the ToGuest direction only: only the host broadcasts,
    /// so a broadcast reference travelling towards the host is never valid
    /// (`shm.broadcast.refcount`).
    #[cold]
    pub fn broadcast(&self) -> Option<BroadcastPool<'a>> {
        match self.dir {
            Direction::ToGuest => self.segment.broadcast(),
            Direction::ToHost => None,
        }
    }

    /// Slot counts over every class.
    pub fn usage(&self) -> PoolUsage {
        let mut total = PoolUsage::default();
        for class in 0..self.classes() {
            if let Some(pool) = self.class(class) {
                total += pool.usage();
            }
        }
        total
    }
}

/// Marker for the types a shared slice may hold: atomic integers, and `repr(C)`
/// records made only of them with no padding.
trait SharedAtomic {}
impl SharedAtomic for AtomicU64 {}
impl SharedAtomic for AtomicU32 {}
impl SharedAtomic for BroadcastMeta {}

fn atomic_slice<T: SharedAtomic>(region: Region<'_>, offset: usize, n: usize) -> Option<&[T]> {
    let size = std::mem::size_of::<T>();
    let ptr = region.span(offset, n.checked_mul(size)?)?;
    if ptr.as_ptr() as usize % std::mem::align_of::<T>() != 0 {
        return None;
    }
    // SAFETY: in bounds and aligned for T (checked); T is an atomic integer or a
    // padding-free record of them (`SharedAtomic`), which accepts any bit pattern and
    // is only ever accessed atomically.
    Some(unsafe { std::slice::from_raw_parts(ptr.as_ptr().cast::<T>(), n) })
}

#[cfg(test)]
mod tests {
    use std::mem::{offset_of, size_of};
    use std::sync::Arc;

    use super::*;
    use crate::desc::Meta;
    use crate::header::SegmentHeader as H;
    use crate::peer::{PeerEntry as P, PeerState};
    use crate::region::HeapRegion;
    use crate::ring::{Consumer, Producer, PushError, RingHeader as R};
    use crate::slot::SlotState;
    use crate::violation::Violation;
    use crate::{Inbox, Outbox};

    fn heap_segment(config: SegmentConfig) -> Segment {
        let len = config.layout().unwrap().total_size as usize;
        let heap = HeapRegion::new_zeroed(len).unwrap();
        let seg = Segment::init(ShmBacking::Heap(Arc::new(heap)), config, [1, 2], 7).unwrap();
        seg.publish();
        seg
    }

    fn owner(peer: u8, generation: u32) -> u32 {
        crate::slot::owner_word(peer, generation)
    }

    fn id(n: u8) -> PeerId {
        PeerId::new(n).unwrap()
    }

    // The tables in spec/02-segment.md, spec/03-peers.md, spec/04-rings.md and
    // spec/05-slots.md, field by field.
    // shm[verify shm.header.layout]
    // shm[verify shm.peer.entry-layout]
    // shm[verify shm.ring.layout]
    // shm[verify shm.slot.layout]
    #[test]
    fn structs_match_the_spec_tables() {
        let header: &[(usize, usize)] = &[
            (offset_of!(H, magic), 0),
            (offset_of!(H, version), 8),
            (offset_of!(H, header_size), 12),
            (offset_of!(H, total_size), 16),
            (offset_of!(H, incompat_features), 24),
            (offset_of!(H, compat_features), 32),
            (offset_of!(H, segment_id), 40),
            (offset_of!(H, max_guests), 56),
            (offset_of!(H, ring_capacity), 60),
            (offset_of!(H, class_count), 64),
            (offset_of!(H, broadcast_slots), 68),
            (offset_of!(H, peer_table_offset), 72),
            (offset_of!(H, peer_table_len), 80),
            (offset_of!(H, guest_areas_offset), 88),
            (offset_of!(H, guest_areas_len), 96),
            (offset_of!(H, guest_area_stride), 104),
            (offset_of!(H, host_pid), 112),
            (offset_of!(H, ready), 116),
            (offset_of!(H, ready_waiters), 120),
            (offset_of!(H, broadcast_slot_size), 124),
            (offset_of!(H, host_bell), 128),
            (offset_of!(H, host_parked), 132),
            (offset_of!(H, _reserved1), 136),
            (offset_of!(H, host_state), 192),
            (offset_of!(H, heartbeat_interval_ms), 196),
            (offset_of!(H, heartbeat), 200),
            (offset_of!(H, classes), 208),
            (size_of::<H>(), 256),
        ];
        for (i, (got, want)) in header.iter().enumerate() {
            assert_eq!(got, want, "header row {i}");
        }
        assert_eq!(crate::header::MAGIC.to_le_bytes(), *b"SHMHUB\0\x01");
        assert_eq!(offset_of!(P, state_word), 0);
        assert_eq!(offset_of!(P, guest_pid), 8);
        assert_eq!(offset_of!(P, fault), 12);
        assert_eq!(offset_of!(P, _reserved), 16);
        assert_eq!(size_of::<P>(), 64);
        assert_eq!(offset_of!(R, tail), 0);
        assert_eq!(offset_of!(R, consumer_parked), 8);
        assert_eq!(offset_of!(R, head), 64);
        assert_eq!(offset_of!(R, producer_parked), 72);
        assert_eq!(offset_of!(R, space_bell), 80);
        assert_eq!(size_of::<R>(), 128);
        assert_eq!(crate::slot::SLOT_META_SIZE, 16);
        assert_eq!(offset_of!(crate::slot::PoolHeader, free_head), 0);
        assert_eq!(size_of::<crate::slot::PoolHeader>(), 64);
        assert_eq!(
            [
                SlotState::Free,
                SlotState::Loaned,
                SlotState::Sent,
                SlotState::Received
            ]
            .map(|s| s as u32),
            [0, 1, 2, 3]
        );
        assert_eq!(
            [
                PeerState::Empty,
                PeerState::Reserved,
                PeerState::Attached,
                PeerState::Goodbye
            ]
            .map(|s| s as u32),
            [0, 1, 2, 3]
        );
    }

    // shm[verify shm.topology.peer-id]
    #[test]
    fn peer_ids_are_1_to_255_and_index_the_table() {
        assert!(PeerId::new(0).is_none());
        assert_eq!(PeerId::new(1).unwrap().index(), 0);
        assert_eq!(PeerId::new(255).unwrap().index(), 254);
        assert_eq!(PeerId::from_index(254).unwrap().get(), 255);
        assert!(PeerId::from_index(255).is_none());
        let seg = heap_segment(SegmentConfig {
            max_guests: 2,
            ..SegmentConfig::default()
        });
        assert!(seg.peer(id(2)).is_some());
        assert!(seg.peer(id(3)).is_none(), "past max_guests");
        assert!(seg.ring(id(3), Direction::ToGuest).is_none());
    }

    // shm[verify shm.peer.states]
    #[test]
    fn peer_transitions_follow_the_state_machine() {
        let seg = heap_segment(SegmentConfig::default());
        let e = seg.peer(id(1)).unwrap();
        assert_eq!(e.try_reserve(), Some(0));
        assert_eq!(e.try_reserve(), None, "only Empty can be reserved");
        assert!(
            e.try_claim(PeerState::Empty, None, 1).is_err(),
            "reserved is not Empty"
        );
        assert_eq!(e.try_claim(PeerState::Reserved, None, 42), Ok(0));
        assert!(!e.release_reservation(), "attached is not Reserved");
        assert!(!e.recycle(0), "only Goodbye is recycled");
        assert!(e.goodbye(0));
        assert!(!e.goodbye(0), "goodbye only once");
        assert!(e.recycle(0));
        let w = e.load().unwrap();
        assert_eq!((w.state, w.generation), (PeerState::Empty, 1));
        e.state_word.store(7, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(e.load().unwrap_err().raw, 7);
    }

    // shm[verify shm.ring.produce]
    // shm[verify shm.ring.consume]
    #[test]
    fn ring_wraps_many_times_in_order() {
        let seg = heap_segment(SegmentConfig {
            ring_capacity: 4,
            ..SegmentConfig::default()
        });
        let ring = seg.ring(id(1), Direction::ToGuest).unwrap();
        let pools = seg.pools(id(1), Direction::ToGuest).unwrap();
        let (mut tx, mut rx) = (Outbox::new(0), Inbox::new(0));
        let mut buf = Vec::new();
        for round in 0..50u64 {
            for i in 0..3u64 {
                let n = round * 3 + i;
                let payload = vec![n as u8; (n as usize * 37) % 200];
                tx.send(&ring, &pools, Meta::new(1, n), &payload, None)
                    .unwrap();
            }
            for i in 0..3u64 {
                let n = round * 3 + i;
                let meta = rx.recv(&ring, &pools, &mut buf, None).unwrap().unwrap();
                assert_eq!(meta.user_id, n);
                assert_eq!(buf, vec![n as u8; (n as usize * 37) % 200]);
            }
            assert_eq!(rx.recv(&ring, &pools, &mut buf, None).unwrap(), None);
        }
        assert_eq!(pools.usage().in_use, 0);
    }

    // shm[verify shm.ring.consume]
    // shm[verify shm.ring.desc-layout]
    #[test]
    fn a_consumer_follows_stamps_and_a_reset_clears_them() {
        use std::sync::atomic::Ordering::SeqCst;
        let seg = heap_segment(SegmentConfig {
            ring_capacity: 4,
            ..SegmentConfig::default()
        });
        let ring = seg.ring(id(1), Direction::ToGuest).unwrap();
        let pools = seg.pools(id(1), Direction::ToGuest).unwrap();
        let tail = seg
            .backing()
            .region()
            .atomic_u64(seg.layout().ring_offset(0, Direction::ToGuest) as usize)
            .unwrap();
        let (mut tx, mut rx) = (Outbox::new(0), Inbox::new(0));
        let mut buf = Vec::new();
        // A zeroed ring is empty: stamp 0 never equals a position + 1.
        assert_eq!(rx.recv(&ring, &pools, &mut buf, None).unwrap(), None);
        tx.send(&ring, &pools, Meta::new(1, 7), b"a", None).unwrap();
        // The stamp alone publishes: a tail still behind (a producer between P2 and
        // P3) does not hide the entry, and is not a violation once it is consumed.
        tail.store(0, SeqCst);
        let meta = rx.recv(&ring, &pools, &mut buf, None).unwrap().unwrap();
        assert_eq!((meta.user_id, buf.as_slice()), (7, &b"a"[..]));
        assert_eq!(rx.recv(&ring, &pools, &mut buf, None).unwrap(), None);
        // After a reset, the old stamp at entry 0 must not look like position 0.
        ring.reset();
        let (mut tx, mut rx) = (Outbox::new(0), Inbox::new(0));
        assert_eq!(rx.recv(&ring, &pools, &mut buf, None).unwrap(), None);
        tx.send(&ring, &pools, Meta::new(1, 8), b"b", None).unwrap();
        let meta = rx.recv(&ring, &pools, &mut buf, None).unwrap().unwrap();
        assert_eq!(meta.user_id, 8);
    }

    // shm[verify shm.wake.signal]
    #[test]
    fn no_wake_syscall_unless_the_other_side_is_parked() {
        use std::sync::atomic::Ordering::SeqCst;
        let wakes = || crate::futex::WAKE_CALLS.with(|c| c.get());
        let seg = heap_segment(SegmentConfig::default());
        let ring = seg.ring(id(1), Direction::ToGuest).unwrap();
        let pools = seg.pools(id(1), Direction::ToGuest).unwrap();
        let (mut tx, mut rx) = (Outbox::new(0), Inbox::new(0));
        let mut buf = Vec::new();
        let before = wakes();
        for n in 0..100u64 {
            tx.send(&ring, &pools, Meta::new(1, n), &[1u8; 100], None)
                .unwrap();
            rx.recv(&ring, &pools, &mut buf, None).unwrap().unwrap();
        }
        assert_eq!(wakes(), before, "busy peers: no system call at all");
        let off = seg.layout().ring_offset(0, Direction::ToGuest) as usize;
        let region = seg.backing().region();
        // The consumer is parked: one publish, one wake.
        region.atomic_u64(off + 8).unwrap().store(1, SeqCst);
        tx.send(&ring, &pools, Meta::new(1, 0), b"x", None).unwrap();
        assert_eq!(wakes(), before + 1);
        region.atomic_u64(off + 8).unwrap().store(0, SeqCst);
        // The producer is parked: one receive, one wake.
        region.atomic_u64(off + 72).unwrap().store(1, SeqCst);
        rx.recv(&ring, &pools, &mut buf, None).unwrap().unwrap();
        assert_eq!(wakes(), before + 2);
    }

    // shm[verify shm.ring.full]
    // shm[verify shm.slot.exhausted]
    #[test]
    fn full_ring_and_empty_pool_are_errors_not_drops() {
        let seg = heap_segment(SegmentConfig {
            ring_capacity: 4,
            ..SegmentConfig::default().with_slots(4096, 2)
        });
        let ring = seg.ring(id(1), Direction::ToHost).unwrap();
        let pools = seg.pools(id(1), Direction::ToHost).unwrap();
        let mut tx = Outbox::new(0);
        let big = [9u8; 100];
        tx.send(&ring, &pools, Meta::default(), &big, None).unwrap();
        tx.send(&ring, &pools, Meta::default(), &big, None).unwrap();
        assert_eq!(
            tx.send(&ring, &pools, Meta::default(), &big, None),
            Err(crate::ChannelSendError::PoolExhausted)
        );
        tx.send(&ring, &pools, Meta::default(), b"x", None).unwrap();
        tx.send(&ring, &pools, Meta::default(), b"y", None).unwrap();
        assert_eq!(
            tx.send(&ring, &pools, Meta::default(), b"z", None),
            Err(crate::ChannelSendError::RingFull)
        );
        // A full ring never strands a slot: the pool still holds exactly 2 in use.
        assert_eq!(pools.usage().in_use, 2);
        let mut rx = Inbox::new(0);
        let mut buf = Vec::new();
        let mut got = 0;
        while rx.recv(&ring, &pools, &mut buf, None).unwrap().is_some() {
            got += 1;
        }
        assert_eq!(got, 4, "everything accepted is delivered");
        assert_eq!(pools.usage().in_use, 0);
    }

    // shm[verify shm.ring.validate]
    #[test]
    fn impossible_counters_and_sequences_are_violations() {
        let seg = heap_segment(SegmentConfig {
            ring_capacity: 8,
            ..SegmentConfig::default()
        });
        let ring = seg.ring(id(1), Direction::ToHost).unwrap();
        // SAFETY: RingHeader consists only of atomic integers.
        let header = unsafe {
            seg.backing()
                .region()
                .view::<R>(seg.layout().ring_offset(0, Direction::ToHost) as usize)
        }
        .unwrap();
        let mut c = Consumer::new();
        header.tail.store(9, std::sync::atomic::Ordering::Release);
        assert!(matches!(
            c.peek(&ring),
            Err(Violation::RingIndex { tail: 9, .. })
        ));
        header
            .tail
            .store(u64::MAX - 1, std::sync::atomic::Ordering::Release);
        assert!(
            matches!(c.peek(&ring), Err(Violation::RingIndex { .. })),
            "tail behind head"
        );
        // One behind is a producer between its stamp and its tail: empty, not a fault.
        header
            .tail
            .store(u64::MAX, std::sync::atomic::Ordering::Release);
        assert_eq!(c.peek(&ring), Ok(None));
        // A tail that claims one descriptor that was never written: seq mismatch.
        let empty = || crate::desc::Descriptor {
            seq: 0,
            meta: Meta::default(),
            payload_len: 0,
            body: crate::desc::Body::Inline([0; 36]),
        };
        let mut p = Producer::new();
        header.tail.store(0, std::sync::atomic::Ordering::Release);
        p.push(&ring, empty(), None).unwrap();
        header.tail.store(2, std::sync::atomic::Ordering::Release);
        assert!(c.peek(&ring).unwrap().is_some());
        c.advance(&ring);
        assert!(matches!(
            c.peek(&ring),
            Err(Violation::DescSequence {
                expected: 1,
                found: u64::MAX, // stamp 0: never written
            })
        ));
        // A producer facing an impossible head gets a violation, not a write.
        header.head.store(100, std::sync::atomic::Ordering::Release);
        let mut p = Producer::new();
        for _ in 0..8 {
            let _ = p.push(&ring, empty(), None);
        }
        assert!(matches!(
            p.push(&ring, empty(), None),
            Err(PushError::Violation(Violation::RingIndex { .. }))
        ));
    }

    // shm[verify shm.slot.alloc]
    // shm[verify shm.slot.publish]
    // shm[verify shm.slot.claim]
    // shm[verify shm.slot.free]
    #[test]
    fn slot_protocol_is_a_cas_on_state_and_generation() {
        let seg = heap_segment(SegmentConfig::default().with_slots(4096, 2));
        let pool = seg.pool(id(1), Direction::ToGuest, 0).unwrap();
        let mut cursor = 0;
        let (a, ga) = pool.alloc(&mut cursor, 0).unwrap().unwrap();
        let (b, gb) = pool.alloc(&mut cursor, 0).unwrap().unwrap();
        assert_ne!(a, b);
        assert_eq!((ga, gb), (1, 1), "generation bumps on allocation");
        assert!(pool.alloc(&mut cursor, 0).unwrap().is_none());
        assert!(
            matches!(pool.claim(a, ga, 10, 1), Err(Violation::SlotState { .. })),
            "Loaned is not claimable"
        );
        pool.mark_sent(a, ga).unwrap();
        assert!(
            matches!(
                pool.claim(a, ga + 1, 10, 1),
                Err(Violation::SlotState { .. })
            ),
            "stale generation"
        );
        assert!(matches!(
            pool.claim(5, ga, 10, 1),
            Err(Violation::SlotIndex { index: 5, count: 2 })
        ));
        assert!(matches!(
            pool.claim(a, ga, 4097, 1),
            Err(Violation::SlotLen { .. })
        ));
        pool.claim(a, ga, 10, 1).unwrap();
        assert!(
            matches!(pool.claim(a, ga, 10, 1), Err(Violation::SlotState { .. })),
            "claimed once"
        );
        pool.release(a, ga).unwrap();
        assert!(pool.release(a, ga).is_err(), "double free is refused");
        let (a2, ga2) = pool.alloc(&mut cursor, 0).unwrap().unwrap();
        assert_eq!((a2, ga2), (a, 2), "reuse carries a new generation");
    }

    // The pool table of spec/05-slots.md: state words, links and owners where it
    // says, and a free list that hands back what the receiver freed, tag bumped.
    // shm[verify shm.slot.layout]
    // shm[verify shm.slot.free-list]
    // shm[verify shm.slot.alloc]
    #[test]
    fn pool_fields_sit_where_the_spec_table_says() {
        use std::sync::atomic::Ordering::Relaxed;
        let seg = heap_segment(SegmentConfig::default().with_slots(256, 3));
        let pool = seg.pool(id(2), Direction::ToHost, 0).unwrap();
        let base = seg.layout().pool_offset(1, Direction::ToHost, 0) as usize;
        let region = seg.backing().region();
        let u64_at = |off: usize| region.atomic_u64(base + off).unwrap().load(Relaxed);
        let u32_at = |off: usize| {
            let w = region.atomic_u64(base + off / 8 * 8).unwrap().load(Relaxed);
            (w >> (off % 8 * 8)) as u32
        };
        let mut fresh = 0;
        let (a, ga) = pool.alloc(&mut fresh, owner(2, 7)).unwrap().unwrap();
        let (b, _) = pool.alloc(&mut fresh, owner(2, 7)).unwrap().unwrap();
        assert_eq!((a, b, fresh), (0, 1, 2), "fresh slots in order");
        assert_eq!(u64_at(64 + 8 * a as usize), (1 << 32) | 1, "Loaned(1)");
        assert_eq!(u32_at(64 + 12 * 3 + 4 * b as usize), (7 << 8) | 2, "owner");
        pool.mark_sent(a, ga).unwrap();
        pool.claim(a, ga, 100, owner(0, 0)).unwrap();
        assert_eq!(u32_at(64 + 12 * 3), 0, "the host claimed it");
        assert_eq!(u64_at(0), 0, "empty list, tag 0");
        pool.release(a, ga).unwrap();
        assert_eq!(u64_at(0), (1 << 32) | 1, "tag 1, slot 0 on top");
        assert_eq!(u32_at(64 + 8 * 3), 0, "slot 0 links to nothing");
        // The data of slot i starts at pool_meta_len + i * slot_size.
        assert!(pool.write(b, &[0xAB; 256]));
        let meta_len = seg.layout().pools[0].meta_len as usize;
        assert_eq!(meta_len, 128, "align_up(64 + 3 * 16, 64)");
        assert_eq!(u64_at(meta_len + 256), 0xABAB_ABAB_ABAB_ABAB);
        // The listed slot comes back before the never-used slot 2.
        let (c, gc) = pool.alloc(&mut fresh, 0).unwrap().unwrap();
        assert_eq!((c, gc), (0, 2));
        assert_eq!(u64_at(0), 2 << 32, "popped: tag 2, empty");
        let (d, _) = pool.alloc(&mut fresh, 0).unwrap().unwrap();
        assert_eq!(d, 2);
        assert_eq!(pool.alloc(&mut fresh, 0).unwrap(), None);
        // A lying list is skipped (slot 1 is Loaned), a garbage one is a violation.
        region
            .atomic_u64(base)
            .unwrap()
            .store((9 << 32) | 2, Relaxed);
        assert_eq!(pool.alloc(&mut fresh, 0).unwrap(), None);
        region
            .atomic_u64(base)
            .unwrap()
            .store((9 << 32) | 40, Relaxed);
        assert_eq!(
            pool.alloc(&mut fresh, 0),
            Err(Violation::FreeList { found: 40 })
        );
        // Reclaim frees everything and empties the list; a rescan finds all three.
        assert_eq!(pool.reclaim_all(|_| false), 3);
        assert_eq!(u64_at(0) as u32, 0);
        let mut fresh = 0;
        for _ in 0..3 {
            pool.alloc(&mut fresh, 0).unwrap().unwrap();
        }
    }

    // shm[verify shm.msg.inline]
    // shm[verify shm.msg.slot]
    #[test]
    fn inline_up_to_36_bytes_then_slots_up_to_slot_size() {
        let seg = heap_segment(SegmentConfig::default().with_slots(128, 16));
        let ring = seg.ring(id(1), Direction::ToGuest).unwrap();
        let pools = seg.pools(id(1), Direction::ToGuest).unwrap();
        let (mut tx, mut rx) = (Outbox::new(0), Inbox::new(0));
        let mut buf = Vec::new();
        for len in [0, 1, 35, 36, 37, 127, 128] {
            let payload: Vec<u8> = (0..len).map(|i| (i * 7 + len) as u8).collect();
            tx.send(&ring, &pools, Meta::new(3, len as u64), &payload, None)
                .unwrap();
            let in_use = pools.usage().in_use;
            assert_eq!(in_use, u32::from(len > 36), "len {len}");
            rx.recv(&ring, &pools, &mut buf, None).unwrap().unwrap();
            assert_eq!(buf, payload);
        }
        assert_eq!(
            tx.send(&ring, &pools, Meta::default(), &[0; 129], None),
            Err(crate::ChannelSendError::TooLarge { len: 129, max: 128 })
        );
    }
}
