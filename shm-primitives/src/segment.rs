//! A segment: a backing plus the validated layout that says where everything is.

use std::sync::atomic::AtomicU64;

use crate::header::{HeaderError, SegmentHeader, HEADER_SIZE};
use crate::layout::{Direction, LayoutError, SegmentConfig, SegmentLayout};
use crate::peer::{PeerEntry, PeerId};
use crate::region::{Region, ShmBacking};
use crate::ring::{RingHeader, RingView, RING_HEADER_SIZE};
use crate::slot::PoolView;

/// A segment: memory plus the layout every view is computed from.
///
/// Both constructors establish that the backing holds at least `layout.total_size`
/// bytes, so every view below is in bounds by construction.
#[derive(Debug, Clone)]
pub struct Segment {
    backing: ShmBacking,
    layout: SegmentLayout,
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
        let seg = Self { backing, layout };
        seg.header().init(&layout, segment_id, host_pid);
        Ok(seg)
    }

    /// Attacher: validates the header against the backing's length (the file length)
    /// and adopts the layout it describes. Call after the segment is ready.
    pub fn attach(backing: ShmBacking) -> Result<Self, HeaderError> {
        let file_len = backing.region().len() as u64;
        let header = Self::header_of(backing.region())?;
        let layout = header.validate(file_len)?;
        Ok(Self { backing, layout })
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
        const _: () = assert!(HEADER_SIZE == std::mem::size_of::<SegmentHeader>());
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
        let descs = atomic_slice(region, off + RING_HEADER_SIZE, cap as usize * 8)?;
        Some(RingView::new(header, descs, cap))
    }

    /// The pool whose slots travel in `dir`, of guest `id`.
    pub fn pool(&self, id: PeerId, dir: Direction) -> Option<PoolView<'_>> {
        if !self.contains(id) {
            return None;
        }
        let region = self.backing.region();
        let c = &self.layout.config;
        let off = self.layout.pool_offset(id.index(), dir) as usize;
        let metas = atomic_slice(region, off, c.slots_per_pool as usize)?;
        let data = off + self.layout.pool_meta_len as usize;
        Some(PoolView::new(metas, region, data, c.slot_size))
    }
}

fn atomic_slice(region: Region<'_>, offset: usize, n: usize) -> Option<&[AtomicU64]> {
    let ptr = region.span(offset, n.checked_mul(8)?)?;
    if ptr.as_ptr() as usize % 8 != 0 {
        return None;
    }
    // SAFETY: in bounds and 8-aligned (checked); AtomicU64 accepts any bit pattern and
    // all access through it is atomic.
    Some(unsafe { std::slice::from_raw_parts(ptr.as_ptr().cast::<AtomicU64>(), n) })
}
