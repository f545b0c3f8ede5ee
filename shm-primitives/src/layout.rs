//! Segment configuration and the byte layout derived from it.
//!
//! Every offset is computed with checked `u64` arithmetic; the same function runs in
//! the creator (to size the file) and in the attacher (to check the header's recorded
//! offsets against what its limits imply).

use crate::desc::DESC_SIZE;
use crate::header::HEADER_SIZE;
use crate::peer::PEER_ENTRY_SIZE;
use crate::ring::RING_HEADER_SIZE;
use crate::slot::SLOT_META_SIZE;

/// Page size the sections are aligned to.
pub const PAGE: u64 = 4096;
/// Cache-line size the in-area sections are aligned to.
pub const CACHE_LINE: u64 = 64;
/// The largest number of guests one segment can hold.
pub const MAX_GUESTS: u32 = 255;
/// Largest ring capacity (descriptors per ring).
pub const MAX_RING_CAPACITY: u32 = 1 << 16;
/// Largest slot size (bytes).
pub const MAX_SLOT_SIZE: u32 = 1 << 30;
/// Largest number of slots in one pool.
pub const MAX_SLOTS_PER_POOL: u32 = 1 << 16;

/// What a host asks for when it creates a segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentConfig {
    /// Number of peer entries (guests that can be attached at once), 1..=255.
    pub max_guests: u32,
    /// Descriptors per ring, a power of two in 2..=65536.
    pub ring_capacity: u32,
    /// Bytes per slot, a multiple of 64 in 64..=1 GiB.
    pub slot_size: u32,
    /// Slots in each pool (each guest has two pools, one per direction), 1..=65536.
    pub slots_per_pool: u32,
}

impl Default for SegmentConfig {
    fn default() -> Self {
        Self {
            max_guests: 16,
            ring_capacity: 64,
            slot_size: 4096,
            slots_per_pool: 16,
        }
    }
}

/// A configuration value that cannot produce a valid segment.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    /// `max_guests` outside 1..=255.
    #[error("max_guests must be 1..=255, got {0}")]
    MaxGuests(u32),
    /// `ring_capacity` not a power of two in range.
    #[error("ring_capacity must be a power of two in 2..=65536, got {0}")]
    RingCapacity(u32),
    /// `slot_size` not a multiple of 64 in range.
    #[error("slot_size must be a multiple of 64 in 64..=1GiB, got {0}")]
    SlotSize(u32),
    /// `slots_per_pool` outside range.
    #[error("slots_per_pool must be 1..=65536, got {0}")]
    SlotsPerPool(u32),
    /// The total size does not fit in a u64 or in this process's address space.
    #[error("segment size overflows")]
    Overflow,
}

/// Where everything lives in a segment, in bytes from the start of the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentLayout {
    /// The limits this layout was computed from.
    pub config: SegmentConfig,
    /// Offset of the peer table.
    pub peer_table_offset: u64,
    /// Length of the peer table.
    pub peer_table_len: u64,
    /// Offset of the first guest area.
    pub guest_areas_offset: u64,
    /// Length of all guest areas together.
    pub guest_areas_len: u64,
    /// Distance between consecutive guest areas.
    pub guest_area_stride: u64,
    /// Length of one ring (header and descriptors).
    pub ring_len: u64,
    /// Length of one pool's metadata array (rounded up to a cache line).
    pub pool_meta_len: u64,
    /// Length of one pool (metadata and data).
    pub pool_len: u64,
    /// Total bytes of the segment.
    pub total_size: u64,
}

/// One of the two directions a guest area carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Host to guest: the host produces, the guest consumes.
    ToGuest,
    /// Guest to host: the guest produces, the host consumes.
    ToHost,
}

fn align_up(v: u64, a: u64) -> Option<u64> {
    Some(v.checked_add(a - 1)? / a * a)
}

impl SegmentConfig {
    /// Checks the limits and computes the layout.
    // shm[impl shm.layout.guest-area]
    pub fn layout(&self) -> Result<SegmentLayout, LayoutError> {
        let c = *self;
        // shm[impl shm.topology.max-guests]
        if c.max_guests == 0 || c.max_guests > MAX_GUESTS {
            return Err(LayoutError::MaxGuests(c.max_guests));
        }
        if c.ring_capacity < 2
            || c.ring_capacity > MAX_RING_CAPACITY
            || !c.ring_capacity.is_power_of_two()
        {
            return Err(LayoutError::RingCapacity(c.ring_capacity));
        }
        if c.slot_size == 0 || c.slot_size > MAX_SLOT_SIZE || c.slot_size % 64 != 0 {
            return Err(LayoutError::SlotSize(c.slot_size));
        }
        if c.slots_per_pool == 0 || c.slots_per_pool > MAX_SLOTS_PER_POOL {
            return Err(LayoutError::SlotsPerPool(c.slots_per_pool));
        }
        let of = || LayoutError::Overflow;
        let guests = u64::from(c.max_guests);
        let peer_table_offset = HEADER_SIZE as u64;
        let peer_table_len = guests * PEER_ENTRY_SIZE as u64;
        let guest_areas_offset =
            align_up(peer_table_offset + peer_table_len, PAGE).ok_or_else(of)?;
        let ring_len = RING_HEADER_SIZE as u64 + u64::from(c.ring_capacity) * DESC_SIZE as u64;
        let slots = u64::from(c.slots_per_pool);
        let pool_meta_len = align_up(slots * SLOT_META_SIZE as u64, CACHE_LINE).ok_or_else(of)?;
        let pool_data_len = slots.checked_mul(u64::from(c.slot_size)).ok_or_else(of)?;
        let pool_len = pool_meta_len.checked_add(pool_data_len).ok_or_else(of)?;
        let area = (2 * ring_len)
            .checked_add(pool_len.checked_mul(2).ok_or_else(of)?)
            .ok_or_else(of)?;
        let guest_area_stride = align_up(area, PAGE).ok_or_else(of)?;
        let guest_areas_len = guest_area_stride.checked_mul(guests).ok_or_else(of)?;
        let total_size = guest_areas_offset
            .checked_add(guest_areas_len)
            .ok_or_else(of)?;
        if usize::try_from(total_size).is_err() || total_size > isize::MAX as u64 {
            return Err(LayoutError::Overflow);
        }
        Ok(SegmentLayout {
            config: c,
            peer_table_offset,
            peer_table_len,
            guest_areas_offset,
            guest_areas_len,
            guest_area_stride,
            ring_len,
            pool_meta_len,
            pool_len,
            total_size,
        })
    }
}

impl SegmentLayout {
    /// Offset of guest area `index` (0-based table index).
    pub fn guest_area_offset(&self, index: usize) -> u64 {
        self.guest_areas_offset + self.guest_area_stride * index as u64
    }

    /// Offset of the ring for `dir` in guest area `index`.
    pub fn ring_offset(&self, index: usize, dir: Direction) -> u64 {
        let base = self.guest_area_offset(index);
        match dir {
            Direction::ToGuest => base,
            Direction::ToHost => base + self.ring_len,
        }
    }

    /// Offset of the slot pool whose slots travel in `dir`, in guest area `index`.
    pub fn pool_offset(&self, index: usize, dir: Direction) -> u64 {
        let base = self.guest_area_offset(index) + 2 * self.ring_len;
        match dir {
            Direction::ToGuest => base,
            Direction::ToHost => base + self.pool_len,
        }
    }

    /// Offset of peer entry `index` (0-based table index).
    pub fn peer_offset(&self, index: usize) -> u64 {
        self.peer_table_offset + (index * PEER_ENTRY_SIZE) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // shm[verify shm.layout.guest-area]
    #[test]
    fn default_layout_is_aligned_disjoint_and_exact() {
        let l = SegmentConfig::default().layout().unwrap();
        assert_eq!(l.peer_table_offset, 256);
        assert_eq!(l.guest_areas_offset % PAGE, 0);
        assert_eq!(l.guest_area_stride % PAGE, 0);
        assert!(l.peer_table_offset + l.peer_table_len <= l.guest_areas_offset);
        let i = 3;
        let r0 = l.ring_offset(i, Direction::ToGuest);
        let r1 = l.ring_offset(i, Direction::ToHost);
        let p0 = l.pool_offset(i, Direction::ToGuest);
        let p1 = l.pool_offset(i, Direction::ToHost);
        assert_eq!(r1, r0 + l.ring_len);
        assert_eq!(p0, r1 + l.ring_len);
        assert_eq!(p1, p0 + l.pool_len);
        assert!(p1 + l.pool_len <= l.guest_area_offset(i + 1));
        for o in [r0, r1, p0, p1] {
            assert_eq!(o % CACHE_LINE, 0);
        }
        assert_eq!(
            l.total_size,
            l.guest_areas_offset + l.guest_area_stride * u64::from(l.config.max_guests)
        );
    }

    #[test]
    fn bad_limits_are_typed_errors() {
        let base = SegmentConfig::default();
        let cases = [
            (
                SegmentConfig {
                    max_guests: 0,
                    ..base
                },
                LayoutError::MaxGuests(0),
            ),
            (
                SegmentConfig {
                    max_guests: 256,
                    ..base
                },
                LayoutError::MaxGuests(256),
            ),
            (
                SegmentConfig {
                    ring_capacity: 3,
                    ..base
                },
                LayoutError::RingCapacity(3),
            ),
            (
                SegmentConfig {
                    slot_size: 100,
                    ..base
                },
                LayoutError::SlotSize(100),
            ),
            (
                SegmentConfig {
                    slots_per_pool: 0,
                    ..base
                },
                LayoutError::SlotsPerPool(0),
            ),
        ];
        for (cfg, err) in cases {
            assert_eq!(cfg.layout().unwrap_err(), err);
        }
    }
}
