//! The segment header: the first 256 bytes of every segment.

use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::doorbell::{PARKED_DOORBELL, PARKED_FUTEX};
use crate::futex::FutexWord;
use crate::layout::{
    LayoutError, SegmentConfig, SegmentLayout, SlotClass, SlotClasses, MAX_CLASSES,
};

/// Size of the header in bytes.
pub const HEADER_SIZE: usize = 256;
/// `b"SHMHUB\0\x01"` read as a little-endian u64.
pub const MAGIC: u64 = u64::from_le_bytes(*b"SHMHUB\0\x01");
/// Current layout and protocol version (6: descriptor stamps, `shm.ring.produce`;
/// space waits park on the ring's `space_bell`, `shm.wake.space`).
pub const VERSION: u32 = 7;
/// Incompatible feature bits this build understands (an attacher refuses any other).
pub const KNOWN_INCOMPAT_FEATURES: u64 = 0;
/// Compatible feature bits this build understands (others are ignored).
pub const KNOWN_COMPAT_FEATURES: u64 = 0;
/// `ready` value while the creator is still building the segment.
pub const READY_BUILDING: u32 = 0;
/// `ready` value once the segment is fully initialised.
pub const READY_PUBLISHED: u32 = 1;
/// `host_state` while the host serves the segment.
pub const HOST_RUNNING: u32 = 0;
/// `host_state` once the host has closed the segment (its graceful goodbye).
pub const HOST_CLOSED: u32 = 1;

/// The segment header, exactly as laid out in the spec (`shm.header.layout`).
///
/// Every field is an atomic so that a `&SegmentHeader` over shared memory is sound.
#[repr(C)]
#[derive(Debug)]
pub struct SegmentHeader {
    /// `MAGIC`.
    pub magic: AtomicU64,
    /// `VERSION`.
    pub version: AtomicU32,
    /// `HEADER_SIZE`.
    pub header_size: AtomicU32,
    /// Total bytes of the segment.
    pub total_size: AtomicU64,
    /// Feature bits an attacher must understand.
    pub incompat_features: AtomicU64,
    /// Feature bits an attacher may ignore.
    pub compat_features: AtomicU64,
    /// Random 128-bit segment id (two little-endian words).
    pub segment_id: [AtomicU64; 2],
    /// Number of peer entries.
    pub max_guests: AtomicU32,
    /// Descriptors per ring.
    pub ring_capacity: AtomicU32,
    /// Number of slot classes (entries used in `classes`).
    pub class_count: AtomicU32,
    /// Slots in the broadcast pool.
    pub broadcast_slots: AtomicU32,
    /// Offset of the peer table.
    pub peer_table_offset: AtomicU64,
    /// Length of the peer table.
    pub peer_table_len: AtomicU64,
    /// Offset of the first guest area.
    pub guest_areas_offset: AtomicU64,
    /// Length of all guest areas.
    pub guest_areas_len: AtomicU64,
    /// Distance between guest areas.
    pub guest_area_stride: AtomicU64,
    /// Process id of the creator.
    pub host_pid: AtomicU32,
    /// Readiness word: `READY_BUILDING` then `READY_PUBLISHED` (Release, last).
    pub ready: AtomicU32,
    /// Number of attachers that went to sleep waiting for `ready`.
    pub ready_waiters: AtomicU32,
    /// Bytes per broadcast slot.
    pub broadcast_slot_size: AtomicU32,
    /// Host-wide bell: guests bump it (and futex-wake) after publishing while the host
    /// is parked, so the host sleeps on all guests at once.
    pub host_bell: AtomicU32,
    /// 1 while the host is parked on `host_bell`.
    pub host_parked: AtomicU32,
    /// Reserved, zero. Keeps the liveness fields off the wake words' cache line: a
    /// guest reads `host_state` on every call, the host writes `host_parked` often.
    pub _reserved1: [AtomicU64; 7],
    /// `HOST_RUNNING`, then `HOST_CLOSED` when the host leaves (`shm.live.host-close`).
    pub host_state: AtomicU32,
    /// Heartbeat interval in milliseconds; 0 = no heartbeat (`shm.live.heartbeat`).
    pub heartbeat_interval_ms: AtomicU32,
    /// Bumped by the host at least once per heartbeat interval.
    pub heartbeat: AtomicU64,
    /// Slot classes: `[slot_size, count]` for each of the first `class_count`
    /// entries, zero after them.
    pub classes: [[AtomicU32; 2]; MAX_CLASSES],
}

const _: () = {
    use std::mem::{offset_of, size_of};
    assert!(size_of::<SegmentHeader>() == HEADER_SIZE);
    assert!(offset_of!(SegmentHeader, magic) == 0);
    assert!(offset_of!(SegmentHeader, version) == 8);
    assert!(offset_of!(SegmentHeader, header_size) == 12);
    assert!(offset_of!(SegmentHeader, total_size) == 16);
    assert!(offset_of!(SegmentHeader, incompat_features) == 24);
    assert!(offset_of!(SegmentHeader, compat_features) == 32);
    assert!(offset_of!(SegmentHeader, segment_id) == 40);
    assert!(offset_of!(SegmentHeader, max_guests) == 56);
    assert!(offset_of!(SegmentHeader, ring_capacity) == 60);
    assert!(offset_of!(SegmentHeader, class_count) == 64);
    assert!(offset_of!(SegmentHeader, broadcast_slots) == 68);
    assert!(offset_of!(SegmentHeader, peer_table_offset) == 72);
    assert!(offset_of!(SegmentHeader, peer_table_len) == 80);
    assert!(offset_of!(SegmentHeader, guest_areas_offset) == 88);
    assert!(offset_of!(SegmentHeader, guest_areas_len) == 96);
    assert!(offset_of!(SegmentHeader, guest_area_stride) == 104);
    assert!(offset_of!(SegmentHeader, host_pid) == 112);
    assert!(offset_of!(SegmentHeader, ready) == 116);
    assert!(offset_of!(SegmentHeader, ready_waiters) == 120);
    assert!(offset_of!(SegmentHeader, broadcast_slot_size) == 124);
    assert!(offset_of!(SegmentHeader, host_bell) == 128);
    assert!(offset_of!(SegmentHeader, host_parked) == 132);
    assert!(offset_of!(SegmentHeader, _reserved1) == 136);
    assert!(offset_of!(SegmentHeader, host_state) == 192);
    assert!(offset_of!(SegmentHeader, heartbeat_interval_ms) == 196);
    assert!(offset_of!(SegmentHeader, heartbeat) == 200);
    assert!(offset_of!(SegmentHeader, classes) == 208);
};

/// Why a segment header was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// The file is shorter than a header.
    #[error("file is {file_len} bytes, shorter than the {HEADER_SIZE}-byte header")]
    ShorterThanHeader {
        /// Bytes in the file.
        file_len: u64,
    },
    /// Not a shmhub segment.
    #[error("bad magic {found:#018x}")]
    BadMagic {
        /// What the file holds.
        found: u64,
    },
    /// A version this build does not speak.
    #[error("unsupported version {found} (this build speaks {VERSION})")]
    UnsupportedVersion {
        /// What the file holds.
        found: u32,
    },
    /// A header size other than `HEADER_SIZE`.
    #[error("header size {found} (expected {HEADER_SIZE})")]
    HeaderSize {
        /// What the file holds.
        found: u32,
    },
    /// Incompatible feature bits this build does not understand.
    #[error("unknown incompatible feature bits {unknown:#x}")]
    UnknownIncompatFeatures {
        /// The unknown bits.
        unknown: u64,
    },
    /// The file is shorter than the header's total size.
    #[error("file is {file_len} bytes but the header says {total_size}")]
    FileTooShort {
        /// Bytes in the file.
        file_len: u64,
        /// What the header records.
        total_size: u64,
    },
    /// A section ends past the segment's end (or its end overflows).
    #[error("section {section} at {offset}+{len} lies outside the {total_size}-byte segment")]
    SectionOutOfBounds {
        /// Which section.
        section: &'static str,
        /// Its recorded offset.
        offset: u64,
        /// Its recorded length.
        len: u64,
        /// The segment's total size.
        total_size: u64,
    },
    /// The limits are out of range.
    #[error("invalid limits: {0}")]
    Limits(#[from] crate::layout::LayoutError),
    /// A recorded offset or length disagrees with what the limits imply.
    #[error("field {field} is {found}, the limits imply {expected}")]
    LayoutMismatch {
        /// Which field.
        field: &'static str,
        /// What the header records.
        found: u64,
        /// What the limits imply.
        expected: u64,
    },
}

impl SegmentHeader {
    /// Writes every field but `ready` (which stays `READY_BUILDING`).
    ///
    /// The creator calls this on fresh zeroed memory, then [`publish`](Self::publish).
    // shm[impl shm.header.layout]
    // shm[impl shm.header.segment-id]
    pub fn init(&self, layout: &SegmentLayout, segment_id: [u64; 2], host_pid: u32) {
        let r = Ordering::Relaxed;
        let c = &layout.config;
        self.magic.store(MAGIC, r);
        self.version.store(VERSION, r);
        self.header_size.store(HEADER_SIZE as u32, r);
        self.total_size.store(layout.total_size, r);
        self.incompat_features.store(KNOWN_INCOMPAT_FEATURES, r);
        self.compat_features.store(KNOWN_COMPAT_FEATURES, r);
        self.segment_id[0].store(segment_id[0], r);
        self.segment_id[1].store(segment_id[1], r);
        self.max_guests.store(c.max_guests, r);
        self.ring_capacity.store(c.ring_capacity, r);
        self.class_count.store(c.classes.len() as u32, r);
        self.broadcast_slots.store(c.broadcast_slots, r);
        self.broadcast_slot_size.store(c.broadcast_slot_size, r);
        for (entry, class) in self.classes.iter().zip(c.classes.as_slice()) {
            entry[0].store(class.size, r);
            entry[1].store(class.count, r);
        }
        self.peer_table_offset.store(layout.peer_table_offset, r);
        self.peer_table_len.store(layout.peer_table_len, r);
        self.guest_areas_offset.store(layout.guest_areas_offset, r);
        self.guest_areas_len.store(layout.guest_areas_len, r);
        self.guest_area_stride.store(layout.guest_area_stride, r);
        self.host_pid.store(host_pid, r);
    }

    /// Publishes the segment: a Release store of `READY_PUBLISHED` after everything
    /// else is written, then a shared-futex wake of any attacher sleeping on it.
    pub fn publish(&self) {
        self.readiness().publish();
    }

    /// Acquire-loads the readiness word.
    pub fn is_ready(&self) -> bool {
        self.readiness().is_ready()
    }

    /// Waits until the segment is published or `deadline` passes; returns whether it
    /// is ready. Sleeps on the readiness word with a shared futex (in bounded slices,
    /// re-checking each time), counted in `ready_waiters` so the creator knows to wake.
    pub fn wait_ready(&self, deadline: Instant) -> bool {
        self.readiness().wait_ready(deadline)
    }

    /// The readiness word and its waiter count.
    fn readiness(&self) -> Readiness<'_> {
        Readiness::new(&self.ready, &self.ready_waiters)
    }

    /// Guest, after publishing to the host: rings the host-wide bell only if the host
    /// is parked (no syscall otherwise): the futex, or the guest's `doorbell` when the
    /// host waits on its doorbells (`HostBell::ring`).
    #[inline]
    pub fn ring_host_bell(&self, doorbell: Option<BorrowedFd<'_>>) {
        self.host_bell().ring(|| {
            if let Some(fd) = doorbell {
                crate::doorbell::ring(fd);
            }
        });
    }

    /// Host, when it leaves: stores `HOST_CLOSED` (SeqCst, so a guest that parks after
    /// this store sees it in its re-check).
    // shm[impl shm.live.host-close]
    pub fn close(&self) {
        self.host_state.store(HOST_CLOSED, Ordering::SeqCst);
    }

    /// Whether the host has closed the segment.
    pub fn is_closed(&self) -> bool {
        self.host_state.load(Ordering::Acquire) == HOST_CLOSED
    }

    /// Host: sets the heartbeat interval (0 turns the heartbeat off).
    pub fn set_heartbeat_interval_ms(&self, ms: u32) {
        self.heartbeat_interval_ms.store(ms, Ordering::Release);
    }

    /// The heartbeat interval guests hold the host to, in milliseconds (0: none).
    pub fn heartbeat_interval_ms(&self) -> u32 {
        self.heartbeat_interval_ms.load(Ordering::Acquire)
    }

    /// Host: one heartbeat.
    // shm[impl shm.live.heartbeat]
    pub fn beat(&self) {
        self.heartbeat.fetch_add(1, Ordering::Release);
    }

    /// The heartbeat counter.
    pub fn heartbeat(&self) -> u64 {
        self.heartbeat.load(Ordering::Acquire)
    }

    /// The bell the host parks on while no guest has anything for it.
    #[inline]
    pub fn host_bell(&self) -> HostBell<'_> {
        HostBell::new(&self.host_bell, &self.host_parked)
    }

    /// The segment's random id.
    pub fn segment_id(&self) -> [u64; 2] {
        [
            self.segment_id[0].load(Ordering::Relaxed),
            self.segment_id[1].load(Ordering::Relaxed),
        ]
    }

    /// Checks the magic only (before waiting for readiness: a foreign file is refused
    /// at once instead of after the readiness timeout).
    // shm[impl shm.header.magic]
    pub fn check_magic(&self) -> Result<(), HeaderError> {
        let found = self.magic.load(Ordering::Acquire);
        if found != MAGIC {
            return Err(HeaderError::BadMagic { found });
        }
        Ok(())
    }

    /// Validates a published header against the real file length and returns the
    /// layout it describes. Call only after [`is_ready`](Self::is_ready) returned true.
    // shm[impl shm.header.version]
    // shm[impl shm.header.features]
    // shm[impl shm.header.sections]
    pub fn validate(&self, file_len: u64) -> Result<SegmentLayout, HeaderError> {
        let a = Ordering::Acquire;
        self.check_magic()?;
        let version = self.version.load(a);
        if version != VERSION {
            return Err(HeaderError::UnsupportedVersion { found: version });
        }
        let header_size = self.header_size.load(a);
        if header_size as usize != HEADER_SIZE {
            return Err(HeaderError::HeaderSize { found: header_size });
        }
        let unknown = self.incompat_features.load(a) & !KNOWN_INCOMPAT_FEATURES;
        if unknown != 0 {
            return Err(HeaderError::UnknownIncompatFeatures { unknown });
        }
        let total_size = self.total_size.load(a);
        if total_size > file_len {
            return Err(HeaderError::FileTooShort {
                file_len,
                total_size,
            });
        }
        let sections = [
            (
                "peer_table",
                self.peer_table_offset.load(a),
                self.peer_table_len.load(a),
            ),
            (
                "guest_areas",
                self.guest_areas_offset.load(a),
                self.guest_areas_len.load(a),
            ),
        ];
        for (section, offset, len) in sections {
            let fits = offset
                .checked_add(len)
                .is_some_and(|end| offset >= HEADER_SIZE as u64 && end <= total_size);
            if !fits {
                return Err(HeaderError::SectionOutOfBounds {
                    section,
                    offset,
                    len,
                    total_size,
                });
            }
        }
        let class_count = self.class_count.load(a);
        if class_count == 0 || class_count as usize > MAX_CLASSES {
            return Err(LayoutError::ClassCount(class_count).into());
        }
        let classes: Vec<SlotClass> = self.classes[..class_count as usize]
            .iter()
            .map(|e| SlotClass::new(e[0].load(a), e[1].load(a)))
            .collect();
        let config = SegmentConfig {
            max_guests: self.max_guests.load(a),
            ring_capacity: self.ring_capacity.load(a),
            classes: SlotClasses::new(&classes),
            broadcast_slots: self.broadcast_slots.load(a),
            broadcast_slot_size: self.broadcast_slot_size.load(a),
        };
        let layout = config.layout()?;
        let checks = [
            ("total_size", total_size, layout.total_size),
            ("peer_table_offset", sections[0].1, layout.peer_table_offset),
            ("peer_table_len", sections[0].2, layout.peer_table_len),
            (
                "guest_areas_offset",
                sections[1].1,
                layout.guest_areas_offset,
            ),
            ("guest_areas_len", sections[1].2, layout.guest_areas_len),
            (
                "guest_area_stride",
                self.guest_area_stride.load(a),
                layout.guest_area_stride,
            ),
        ];
        for (field, found, expected) in checks {
            if found != expected {
                return Err(HeaderError::LayoutMismatch {
                    field,
                    found,
                    expected,
                });
            }
        }
        Ok(layout)
    }
}

/// The segment's readiness (`shm.header.ready`, `shm.attach.wait-ready`): the header's
/// `ready` word and its `ready_waiters` count. Generic over their atomic type (the
/// segment's `AtomicU32`) only so that the loom models (`crate::models`) run this very
/// code over loom's atomics.
#[derive(Debug)]
pub(crate) struct Readiness<'a, W = AtomicU32> {
    ready: &'a W,
    waiters: &'a W,
}

impl<'a, W: FutexWord<V = u32>> Readiness<'a, W> {
    /// The readiness over its word and its waiter count.
    pub(crate) fn new(ready: &'a W, waiters: &'a W) -> Self {
        Self { ready, waiters }
    }

    /// [`SegmentHeader::publish`].
    // shm[impl shm.header.ready]
    pub(crate) fn publish(&self) {
        // SeqCst (a Release at least) so the store is ordered before the waiter check.
        self.ready.store(READY_PUBLISHED, Ordering::SeqCst);
        if self.waiters.load(Ordering::SeqCst) != 0 {
            self.ready.futex_wake();
        }
    }

    /// [`SegmentHeader::is_ready`].
    // shm[impl shm.header.ready]
    pub(crate) fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire) == READY_PUBLISHED
    }

    /// [`SegmentHeader::wait_ready`].
    // shm[impl shm.attach.wait-ready]
    pub(crate) fn wait_ready(&self, deadline: Instant) -> bool {
        if self.is_ready() {
            return true;
        }
        self.waiters.fetch_add(1, Ordering::SeqCst);
        let ready = loop {
            if self.ready.load(Ordering::SeqCst) == READY_PUBLISHED {
                break true;
            }
            let now = Instant::now();
            if now >= deadline {
                break false;
            }
            let slice = (deadline - now).min(Duration::from_millis(50));
            self.ready.futex_wait(READY_BUILDING, slice);
        };
        self.waiters.fetch_sub(1, Ordering::SeqCst);
        // Acquire so the creator's initialisation is visible to the caller.
        ready && self.is_ready()
    }
}

/// The host-wide bell (`shm.wake.host-bell`): the header's `host_bell` (the futex
/// word) and `host_parked` (the flag). Generic over their atomic type (the segment's
/// `AtomicU32`) only so that the loom models (`crate::models`) run this very code over
/// loom's atomics; products never name the parameter.
#[derive(Debug)]
pub struct HostBell<'a, W = AtomicU32> {
    bell: &'a W,
    parked: &'a W,
}

impl<W> Clone for HostBell<'_, W> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<W> Copy for HostBell<'_, W> {}

impl<'a, W: FutexWord<V = u32>> HostBell<'a, W> {
    /// The bell over its futex word and its parked flag.
    #[inline]
    pub(crate) fn new(bell: &'a W, parked: &'a W) -> Self {
        Self { bell, parked }
    }

    /// Guest, after publishing to the host: wakes the host only if it is parked (no
    /// syscall otherwise), on the futex or, when it waits on its doorbells, through
    /// `ring_doorbell` (which writes to this guest's doorbell).
    // shm[impl shm.wake.host-bell]
    // shm[impl shm.doorbell.ring]
    #[inline]
    pub(crate) fn ring(&self, ring_doorbell: impl FnOnce()) {
        match self.parked.load(Ordering::SeqCst) {
            0 => {}
            PARKED_DOORBELL => ring_doorbell(),
            _ => {
                self.bell.futex_bump();
                self.bell.futex_wake();
            }
        }
    }

    /// Marks the host parked on its doorbells (SeqCst; the host re-checks every ring
    /// after this, then waits on its doorbell fd).
    // shm[impl shm.doorbell.arm]
    pub fn arm_doorbell(&self) {
        self.parked.store(PARKED_DOORBELL, Ordering::SeqCst);
        W::seq_cst_fence();
    }

    /// Clears the parked mark, if set.
    pub fn disarm_doorbell(&self) {
        if self.parked.load(Ordering::Relaxed) != 0 {
            self.parked.store(0, Ordering::Relaxed);
        }
    }
}

impl<W: FutexWord<V = u32>> crate::wait::Bell for HostBell<'_, W> {
    fn arm(&self) -> u32 {
        self.parked.store(PARKED_FUTEX, Ordering::SeqCst);
        // As every arm (`shm.wake.park`); the re-check's C1 loads are SeqCst as well.
        W::seq_cst_fence();
        self.bell.load(Ordering::SeqCst)
    }

    fn sleep(&self, snapshot: u32, timeout: Duration) {
        self.bell.futex_wait(snapshot, timeout);
    }

    fn disarm(&self) {
        self.parked.store(0, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;
    use std::sync::Arc;

    use super::*;
    use crate::region::{HeapRegion, ShmBacking};
    use crate::segment::Segment;
    use crate::wait::Bell;

    fn segment(config: SegmentConfig) -> Segment {
        let len = config.layout().unwrap().total_size as usize;
        let heap = HeapRegion::new_zeroed(len).unwrap();
        Segment::init(ShmBacking::Heap(Arc::new(heap)), config, [1, 2], 7).unwrap()
    }

    fn wakes() -> u64 {
        crate::futex::WAKE_CALLS.with(|c| c.get())
    }

    // shm[verify shm.header.layout]
    // shm[verify shm.header.segment-id]
    // shm[verify shm.header.sections]
    #[test]
    fn a_created_header_validates_to_its_layout() {
        let six = (0..MAX_CLASSES as u32)
            .map(|i| SlotClass::new(64 << i, 2))
            .collect::<Vec<_>>();
        for config in [
            SegmentConfig::default(),
            SegmentConfig {
                classes: SlotClasses::new(&six),
                ..SegmentConfig::default()
            },
        ] {
            let seg = segment(config);
            let h = seg.header();
            let total = config.layout().unwrap().total_size;
            assert_eq!(h.validate(total), Ok(config.layout().unwrap()));
            assert_eq!(h.validate(total + 4096), Ok(config.layout().unwrap()));
            assert_eq!(
                h.validate(total - 1),
                Err(HeaderError::FileTooShort {
                    file_len: total - 1,
                    total_size: total
                })
            );
            assert_eq!(h.segment_id(), [1, 2]);
            assert_eq!(h.host_pid.load(Ordering::Relaxed), 7);
        }
    }

    // Every field an attacher checks, spoiled one at a time, gives its own typed error.
    // shm[verify shm.header.magic]
    // shm[verify shm.header.version]
    // shm[verify shm.header.features]
    // shm[verify shm.header.sections]
    #[test]
    fn each_spoiled_field_is_refused_with_its_own_error() {
        let config = SegmentConfig::default();
        let total = config.layout().unwrap().total_size;
        type Spoil = fn(&SegmentHeader);
        let cases: [(Spoil, Result<(), HeaderError>); 12] = [
            (
                |h| h.magic.store(1, Ordering::Relaxed),
                Err(HeaderError::BadMagic { found: 1 }),
            ),
            (
                |h| h.version.store(VERSION - 1, Ordering::Relaxed),
                Err(HeaderError::UnsupportedVersion { found: VERSION - 1 }),
            ),
            (
                |h| h.header_size.store(128, Ordering::Relaxed),
                Err(HeaderError::HeaderSize { found: 128 }),
            ),
            (
                |h| h.incompat_features.store(4, Ordering::Relaxed),
                Err(HeaderError::UnknownIncompatFeatures { unknown: 4 }),
            ),
            (|h| h.compat_features.store(4, Ordering::Relaxed), Ok(())),
            (
                |h| h.peer_table_offset.store(128, Ordering::Relaxed),
                Err(HeaderError::SectionOutOfBounds {
                    section: "peer_table",
                    offset: 128,
                    len: 16 * 64,
                    total_size: 7_544_832,
                }),
            ),
            (
                |h| h.peer_table_offset.store(u64::MAX, Ordering::Relaxed),
                Err(HeaderError::SectionOutOfBounds {
                    section: "peer_table",
                    offset: u64::MAX,
                    len: 16 * 64,
                    total_size: 7_544_832,
                }),
            ),
            (
                |h| {
                    h.guest_areas_len.fetch_add(1, Ordering::Relaxed);
                },
                Err(HeaderError::SectionOutOfBounds {
                    section: "guest_areas",
                    offset: 532_480,
                    len: 7_544_832 - 532_480 + 1,
                    total_size: 7_544_832,
                }),
            ),
            (
                |h| h.class_count.store(0, Ordering::Relaxed),
                Err(LayoutError::ClassCount(0).into()),
            ),
            (
                |h| {
                    h.class_count
                        .store(MAX_CLASSES as u32 + 1, Ordering::Relaxed)
                },
                Err(LayoutError::ClassCount(MAX_CLASSES as u32 + 1).into()),
            ),
            (
                |h| {
                    h.guest_area_stride.fetch_add(4096, Ordering::Relaxed);
                },
                Err(HeaderError::LayoutMismatch {
                    field: "guest_area_stride",
                    found: 438_272 + 4096,
                    expected: 438_272,
                }),
            ),
            (
                |h| {
                    h.guest_areas_len.fetch_sub(4096, Ordering::Relaxed);
                },
                Err(HeaderError::LayoutMismatch {
                    field: "guest_areas_len",
                    found: 16 * 438_272 - 4096,
                    expected: 16 * 438_272,
                }),
            ),
        ];
        for (i, (spoil, expected)) in cases.into_iter().enumerate() {
            let seg = segment(config);
            spoil(seg.header());
            let got = seg.header().validate(total).map(|_| ());
            assert_eq!(got, expected, "case {i}");
        }
        let seg = segment(config);
        assert_eq!(seg.header().check_magic(), Ok(()));
        seg.header().magic.store(0, Ordering::Relaxed);
        assert_eq!(
            seg.header().check_magic(),
            Err(HeaderError::BadMagic { found: 0 })
        );
    }

    // shm[verify shm.header.ready]
    // shm[verify shm.attach.wait-ready]
    #[test]
    fn readiness_is_published_last_and_waited_for() {
        let seg = segment(SegmentConfig::default());
        let h = seg.header();
        assert!(!h.is_ready());
        assert!(!h.wait_ready(Instant::now()));
        // A wait for an unpublished segment lasts until its deadline.
        let start = Instant::now();
        assert!(!h.wait_ready(start + Duration::from_millis(30)));
        assert!(start.elapsed() >= Duration::from_millis(30));
        // Publishing with nobody asleep makes no system call; with a sleeper, one.
        let before = wakes();
        h.publish();
        assert_eq!(wakes(), before);
        assert!(h.is_ready());
        assert!(h.wait_ready(Instant::now()));
        h.ready.store(READY_BUILDING, Ordering::Relaxed);
        h.ready_waiters.store(1, Ordering::Relaxed);
        h.publish();
        assert_eq!(wakes(), before + 1);

        // An attacher waiting while the creator publishes wakes up ready.
        let seg = segment(SegmentConfig::default());
        let waiter = {
            let seg = seg.clone();
            std::thread::spawn(move || {
                seg.header()
                    .wait_ready(Instant::now() + Duration::from_secs(10))
            })
        };
        while seg.header().ready_waiters.load(Ordering::SeqCst) == 0 && !waiter.is_finished() {
            std::thread::yield_now();
        }
        seg.publish();
        assert!(waiter.join().unwrap());
    }

    // A guest rings the host only when it is parked: on the futex (after moving the bell
    // word), or on its doorbell; otherwise no system call at all.
    // shm[verify shm.wake.host-bell]
    // shm[verify shm.doorbell.ring]
    #[test]
    #[cfg_attr(miri, ignore = "ioctl on a socketpair: not in Miri")]
    fn the_host_bell_rings_only_a_parked_host() {
        let seg = segment(SegmentConfig::default());
        let h = seg.header();
        let (ours, theirs) = UnixStream::pair().unwrap();
        theirs.set_nonblocking(true).unwrap();
        let mut byte = [0u8; 1];
        let before = wakes();
        h.ring_host_bell(Some(ours.as_fd()));
        assert_eq!((wakes(), h.host_bell.load(Ordering::Relaxed)), (before, 0));
        assert!((&theirs).read(&mut byte).is_err(), "nothing written");

        let bell = h.host_bell();
        h.host_bell.store(41, Ordering::Relaxed);
        assert_eq!(bell.arm(), 41);
        assert_eq!(h.host_parked.load(Ordering::Relaxed), PARKED_FUTEX);
        h.ring_host_bell(Some(ours.as_fd()));
        assert_eq!(
            (wakes(), h.host_bell.load(Ordering::Relaxed)),
            (before + 1, 42)
        );
        assert!((&theirs).read(&mut byte).is_err(), "futex, not doorbell");
        bell.disarm();
        assert_eq!(h.host_parked.load(Ordering::Relaxed), 0);

        bell.arm_doorbell();
        assert_eq!(h.host_parked.load(Ordering::Relaxed), PARKED_DOORBELL);
        h.ring_host_bell(Some(ours.as_fd()));
        assert_eq!(
            (wakes(), h.host_bell.load(Ordering::Relaxed)),
            (before + 1, 42)
        );
        assert_eq!((&theirs).read(&mut byte).unwrap(), 1);
        bell.disarm_doorbell();
        assert_eq!(h.host_parked.load(Ordering::Relaxed), 0);
        bell.disarm_doorbell();
        assert_eq!(h.host_parked.load(Ordering::Relaxed), 0);

        // The host sleeps on the bell while it holds the snapshot, not otherwise.
        let start = Instant::now();
        bell.sleep(41, Duration::from_secs(10));
        assert!(start.elapsed() < Duration::from_secs(5), "the word moved");
        let start = Instant::now();
        bell.sleep(42, Duration::from_millis(30));
        assert!(start.elapsed() >= Duration::from_millis(30));
    }

    // shm[verify shm.live.host-close]
    // shm[verify shm.live.heartbeat]
    #[test]
    fn close_and_heartbeat_read_back() {
        let seg = segment(SegmentConfig::default());
        let h = seg.header();
        assert!(!h.is_closed());
        h.close();
        assert!(h.is_closed());
        assert_eq!(h.heartbeat_interval_ms(), 0);
        h.set_heartbeat_interval_ms(250);
        assert_eq!(h.heartbeat_interval_ms(), 250);
        h.beat();
        h.beat();
        assert_eq!(h.heartbeat(), 2);
    }
}
