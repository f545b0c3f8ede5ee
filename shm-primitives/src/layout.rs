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
/// Largest number of slots of one class in one pool.
pub const MAX_SLOTS_PER_POOL: u32 = 1 << 16;

/// Most slot classes a segment can have.
pub const MAX_CLASSES: usize = 6;
/// Largest number of broadcast slots.
pub const MAX_BROADCAST_SLOTS: u32 = 1 << 16;
/// Size of one slot's metadata in a guest pool (`shm.slot.layout`).
pub const POOL_HEADER_SIZE: u64 = 64;
/// Size of one broadcast slot's metadata (`shm.broadcast.layout`).
pub const BROADCAST_META_SIZE: u64 = 64;

/// One slot class: `count` slots of `size` bytes in every pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SlotClass {
    /// Bytes per slot, a multiple of 64 in 64..=1 GiB.
    pub size: u32,
    /// Slots of this class in each pool, 1..=65536.
    pub count: u32,
}

impl SlotClass {
    /// `count` slots of `size` bytes.
    pub const fn new(size: u32, count: u32) -> Self {
        Self { size, count }
    }
}

/// The slot classes of a segment, smallest first (`shm.slot.classes`). Every guest
/// has one pool per class and direction.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct SlotClasses {
    len: u8,
    items: [SlotClass; MAX_CLASSES],
}

impl SlotClasses {
    /// Up to [`MAX_CLASSES`] classes, in strictly increasing size order (checked by
    /// [`SegmentConfig::layout`]). Panics on more than `MAX_CLASSES`.
    pub const fn new(classes: &[SlotClass]) -> Self {
        assert!(classes.len() <= MAX_CLASSES, "at most MAX_CLASSES classes");
        let mut items = [SlotClass::new(0, 0); MAX_CLASSES];
        let mut i = 0;
        while i < classes.len() {
            items[i] = classes[i];
            i += 1;
        }
        Self {
            len: classes.len() as u8,
            items,
        }
    }

    /// A single class of `count` slots of `size` bytes.
    pub const fn single(size: u32, count: u32) -> Self {
        Self::new(&[SlotClass::new(size, count)])
    }

    /// The classes, smallest first.
    pub fn as_slice(&self) -> &[SlotClass] {
        &self.items[..self.len as usize]
    }

    /// Number of classes.
    pub fn len(&self) -> usize {
        self.len as usize
    }

    /// True when there is no class (an invalid configuration).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The largest slot size (0 when empty).
    pub fn largest(&self) -> u32 {
        self.as_slice().last().map_or(0, |c| c.size)
    }

    /// The smallest class whose slots hold `len` bytes.
    pub fn fit(&self, len: usize) -> Option<usize> {
        self.as_slice().iter().position(|c| c.size as usize >= len)
    }
}

impl std::fmt::Debug for SlotClasses {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.as_slice()).finish()
    }
}

/// What a host asks for when it creates a segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentConfig {
    /// Number of peer entries (guests that can be attached at once), 1..=255.
    pub max_guests: u32,
    /// Descriptors per ring, a power of two in 2..=65536.
    pub ring_capacity: u32,
    /// Slot classes of every pool (each guest has one pool per class and direction).
    pub classes: SlotClasses,
    /// Slots of the shared broadcast pool, 0..=65536 (0: no broadcast of payloads
    /// larger than a descriptor).
    pub broadcast_slots: u32,
    /// Bytes per broadcast slot: 0 when `broadcast_slots` is 0, otherwise a multiple
    /// of 64 in 64..=1 GiB.
    pub broadcast_slot_size: u32,
}

impl Default for SegmentConfig {
    /// 16 guests, rings of 64, classes 1 KiB × 16, 16 KiB × 4 and 128 KiB × 1, and
    /// 8 broadcast slots of 64 KiB.
    fn default() -> Self {
        Self {
            max_guests: 16,
            ring_capacity: 64,
            classes: SlotClasses::new(&[
                SlotClass::new(1024, 16),
                SlotClass::new(16 * 1024, 4),
                SlotClass::new(128 * 1024, 1),
            ]),
            broadcast_slots: 8,
            broadcast_slot_size: 64 * 1024,
        }
    }
}

impl SegmentConfig {
    /// This configuration with a single slot class of `count` slots of `size` bytes.
    pub const fn with_slots(self, size: u32, count: u32) -> Self {
        Self {
            classes: SlotClasses::single(size, count),
            ..self
        }
    }

    /// The largest payload a slot can carry.
    pub fn max_slot_payload(&self) -> usize {
        self.classes.largest() as usize
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
    /// The number of classes is outside 1..=`MAX_CLASSES`.
    #[error("class_count must be 1..=6, got {0}")]
    ClassCount(u32),
    /// A class size is not a multiple of 64 in range, or not larger than the class
    /// before it.
    #[error("class {class}: size must be a multiple of 64 in 64..=1GiB and larger than the previous class, got {size}")]
    SlotSize {
        /// Class index.
        class: u32,
        /// Its size.
        size: u32,
    },
    /// A class count outside 1..=65536.
    #[error("class {class}: count must be 1..=65536, got {count}")]
    SlotsPerPool {
        /// Class index.
        class: u32,
        /// Its count.
        count: u32,
    },
    /// `broadcast_slots` out of range, or `broadcast_slot_size` invalid for it.
    #[error("broadcast pool of {slots} slots of {size} bytes is invalid")]
    Broadcast {
        /// Slots.
        slots: u32,
        /// Bytes per slot.
        size: u32,
    },
    /// The total size does not fit in a u64 or in this process's address space.
    #[error("segment size overflows")]
    Overflow,
}

/// Where one class's pool sits in a guest area.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PoolGeometry {
    /// Offset of the pool from the start of the guest area's pools for its direction.
    pub offset_in_dir: u64,
    /// Bytes per slot.
    pub slot_size: u32,
    /// Slots.
    pub count: u32,
    /// Pool header and metadata, rounded up to a cache line: slot data starts here.
    pub meta_len: u64,
    /// Whole pool.
    pub len: u64,
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
    /// Offset of the broadcast pool.
    pub broadcast_offset: u64,
    /// Length of the broadcast pool (metadata, then data).
    pub broadcast_len: u64,
    /// Offset of the first guest area.
    pub guest_areas_offset: u64,
    /// Length of all guest areas together.
    pub guest_areas_len: u64,
    /// Distance between consecutive guest areas.
    pub guest_area_stride: u64,
    /// Length of one ring (header and descriptors).
    pub ring_len: u64,
    /// Each class's pool, in class order.
    pub pools: [PoolGeometry; MAX_CLASSES],
    /// Length of one direction's pools together.
    pub pools_len: u64,
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

fn check_size(size: u32) -> bool {
    size != 0 && size <= MAX_SLOT_SIZE && size % 64 == 0
}

impl SegmentConfig {
    /// Checks the limits and computes the layout.
    // shm[impl shm.layout.guest-area]
    // shm[impl shm.slot.classes]
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
        if c.classes.is_empty() {
            return Err(LayoutError::ClassCount(0));
        }
        let mut previous = 0;
        for (i, class) in c.classes.as_slice().iter().enumerate() {
            if !check_size(class.size) || class.size <= previous {
                return Err(LayoutError::SlotSize {
                    class: i as u32,
                    size: class.size,
                });
            }
            if class.count == 0 || class.count > MAX_SLOTS_PER_POOL {
                return Err(LayoutError::SlotsPerPool {
                    class: i as u32,
                    count: class.count,
                });
            }
            previous = class.size;
        }
        let broadcast_ok = match c.broadcast_slots {
            0 => c.broadcast_slot_size == 0,
            n => n <= MAX_BROADCAST_SLOTS && check_size(c.broadcast_slot_size),
        };
        if !broadcast_ok {
            return Err(LayoutError::Broadcast {
                slots: c.broadcast_slots,
                size: c.broadcast_slot_size,
            });
        }
        let of = || LayoutError::Overflow;
        let guests = u64::from(c.max_guests);
        let peer_table_offset = HEADER_SIZE as u64;
        let peer_table_len = guests * PEER_ENTRY_SIZE as u64;
        let broadcast_offset = align_up(peer_table_offset + peer_table_len, PAGE).ok_or_else(of)?;
        let broadcast_len = u64::from(c.broadcast_slots)
            .checked_mul(BROADCAST_META_SIZE + u64::from(c.broadcast_slot_size))
            .ok_or_else(of)?;
        let guest_areas_offset = broadcast_offset
            .checked_add(broadcast_len)
            .and_then(|end| align_up(end, PAGE))
            .ok_or_else(of)?;
        let ring_len = RING_HEADER_SIZE as u64 + u64::from(c.ring_capacity) * DESC_SIZE as u64;
        let mut pools = [PoolGeometry::default(); MAX_CLASSES];
        let mut pools_len = 0u64;
        for (i, class) in c.classes.as_slice().iter().enumerate() {
            let slots = u64::from(class.count);
            let meta_len = align_up(POOL_HEADER_SIZE + slots * SLOT_META_SIZE as u64, CACHE_LINE)
                .ok_or_else(of)?;
            let data_len = slots.checked_mul(u64::from(class.size)).ok_or_else(of)?;
            let len = meta_len.checked_add(data_len).ok_or_else(of)?;
            pools[i] = PoolGeometry {
                offset_in_dir: pools_len,
                slot_size: class.size,
                count: class.count,
                meta_len,
                len,
            };
            pools_len = pools_len.checked_add(len).ok_or_else(of)?;
        }
        let area = (2 * ring_len)
            .checked_add(pools_len.checked_mul(2).ok_or_else(of)?)
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
            broadcast_offset,
            broadcast_len,
            guest_areas_offset,
            guest_areas_len,
            guest_area_stride,
            ring_len,
            pools,
            pools_len,
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

    /// Offset of the pool of class `class` whose slots travel in `dir`, in guest area
    /// `index` (`class` must be below the class count).
    pub fn pool_offset(&self, index: usize, dir: Direction, class: usize) -> u64 {
        let base = self.guest_area_offset(index) + 2 * self.ring_len;
        let dir_base = match dir {
            Direction::ToGuest => base,
            Direction::ToHost => base + self.pools_len,
        };
        dir_base + self.pools[class].offset_in_dir
    }

    /// The classes' pool geometries, in class order.
    pub fn pool_geometries(&self) -> &[PoolGeometry] {
        &self.pools[..self.config.classes.len()]
    }

    /// Offset of peer entry `index` (0-based table index).
    pub fn peer_offset(&self, index: usize) -> u64 {
        self.peer_table_offset + (index * PEER_ENTRY_SIZE) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every section of `l`, as (start, end), in address order.
    fn sections(l: &SegmentLayout) -> Vec<(u64, u64)> {
        let mut v = vec![
            (0, HEADER_SIZE as u64),
            (l.peer_table_offset, l.peer_table_offset + l.peer_table_len),
            (l.broadcast_offset, l.broadcast_offset + l.broadcast_len),
        ];
        for i in 0..l.config.max_guests as usize {
            for dir in [Direction::ToGuest, Direction::ToHost] {
                let r = l.ring_offset(i, dir);
                v.push((r, r + l.ring_len));
            }
            for dir in [Direction::ToGuest, Direction::ToHost] {
                for (c, g) in l.pool_geometries().iter().enumerate() {
                    let p = l.pool_offset(i, dir, c);
                    v.push((p, p + g.len));
                }
            }
        }
        v
    }

    fn check_layout(l: &SegmentLayout) {
        assert_eq!(l.peer_table_offset, 256);
        assert_eq!(l.broadcast_offset % PAGE, 0);
        assert_eq!(l.guest_areas_offset % PAGE, 0);
        assert_eq!(l.guest_area_stride % PAGE, 0);
        let s = sections(l);
        for w in s.windows(2) {
            assert!(
                w[0].1 <= w[1].0,
                "sections overlap or are out of order: {w:?}"
            );
        }
        for &(start, _) in &s[3..] {
            assert_eq!(start % CACHE_LINE, 0);
        }
        let last = l.guest_area_offset(l.config.max_guests as usize - 1);
        assert!(s.last().unwrap().1 <= last + l.guest_area_stride);
        assert_eq!(
            l.total_size,
            l.guest_areas_offset + l.guest_area_stride * u64::from(l.config.max_guests)
        );
        for (g, c) in l.pool_geometries().iter().zip(l.config.classes.as_slice()) {
            assert_eq!(g.meta_len % CACHE_LINE, 0);
            assert!(g.meta_len >= POOL_HEADER_SIZE + u64::from(c.count) * 16);
            assert_eq!(g.len, g.meta_len + u64::from(c.count) * u64::from(c.size));
        }
    }

    // shm[verify shm.layout.guest-area]
    // shm[verify shm.slot.classes]
    #[test]
    fn default_layout_is_aligned_disjoint_and_exact() {
        let l = SegmentConfig::default().layout().unwrap();
        check_layout(&l);
        // The worked example of spec/02-segment.md.
        assert_eq!(l.broadcast_offset, 4096);
        assert_eq!(l.broadcast_len, 8 * (64 + 65536));
        assert_eq!(l.guest_areas_offset, 532_480);
        assert_eq!(l.ring_len, 4224);
        let metas: Vec<u64> = l.pool_geometries().iter().map(|g| g.meta_len).collect();
        assert_eq!(metas, [320, 128, 128]);
        assert_eq!(l.pools_len, 16704 + 65664 + 131_200);
        assert_eq!(l.guest_area_stride, 438_272);
        assert_eq!(l.total_size, 532_480 + 16 * 438_272);
        assert_eq!(l.total_size, 7_544_832);
        let to_guest: Vec<u64> = (0..3)
            .map(|c| l.pool_offset(0, Direction::ToGuest, c))
            .collect();
        let to_host: Vec<u64> = (0..3)
            .map(|c| l.pool_offset(0, Direction::ToHost, c))
            .collect();
        assert_eq!(to_guest, [540_928, 557_632, 623_296]);
        assert_eq!(to_host, [754_496, 771_200, 836_864]);
        assert_eq!(to_host[2] + l.pools[2].len, 968_064);
        assert_eq!(l.guest_area_offset(1), 970_752);
        assert_eq!((l.peer_table_offset, l.peer_table_len), (256, 16 * 64));
        assert_eq!(l.peer_offset(2), 256 + 2 * 64);
        assert_eq!(l.config.max_slot_payload(), 128 * 1024);
        assert_eq!(
            format!("{:?}", SegmentConfig::default().with_slots(64, 2).classes),
            "[SlotClass { size: 64, count: 2 }]"
        );
    }

    // Each limit at its largest accepted value and one past it.
    // shm[verify shm.layout.guest-area]
    #[test]
    fn limits_hold_at_their_boundaries() {
        let base = SegmentConfig::default().with_slots(64, 1);
        let ring = |ring_capacity| SegmentConfig {
            ring_capacity,
            ..base
        };
        assert_eq!(ring(1).layout(), Err(LayoutError::RingCapacity(1)));
        assert!(ring(2).layout().is_ok());
        assert!(ring(MAX_RING_CAPACITY).layout().is_ok());
        let past = MAX_RING_CAPACITY * 2;
        assert_eq!(ring(past).layout(), Err(LayoutError::RingCapacity(past)));
        assert!(base.with_slots(64, MAX_SLOTS_PER_POOL).layout().is_ok());
        assert_eq!(
            base.with_slots(64, MAX_SLOTS_PER_POOL + 1).layout(),
            Err(LayoutError::SlotsPerPool {
                class: 0,
                count: MAX_SLOTS_PER_POOL + 1
            })
        );
    }

    proptest::proptest! {
        #![proptest_config(crate::proptest_config())]

        // shm[verify shm.layout.guest-area]
        #[test]
        fn random_configurations_are_aligned_disjoint_and_exact(
            max_guests in 1u32..=255,
            ring_log in 1u32..=16,
            sizes in proptest::collection::btree_set(1u32..=4096, 1..=MAX_CLASSES),
            counts in proptest::collection::vec(1u32..=64, MAX_CLASSES),
            broadcast in 0u32..=16,
        ) {
            let classes: Vec<SlotClass> = sizes
                .iter()
                .zip(&counts)
                .map(|(&s, &n)| SlotClass::new(s * 64, n))
                .collect();
            let config = SegmentConfig {
                max_guests,
                ring_capacity: 1 << ring_log,
                classes: SlotClasses::new(&classes),
                broadcast_slots: broadcast,
                broadcast_slot_size: if broadcast == 0 { 0 } else { 4096 },
            };
            let l = config.layout().unwrap();
            check_layout(&l);
        }
    }

    #[test]
    fn bad_limits_are_typed_errors() {
        let base = SegmentConfig::default();
        let classes = |c: &[SlotClass]| SegmentConfig {
            classes: SlotClasses::new(c),
            ..base
        };
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
            (classes(&[]), LayoutError::ClassCount(0)),
            (
                base.with_slots(100, 4),
                LayoutError::SlotSize {
                    class: 0,
                    size: 100,
                },
            ),
            (
                classes(&[SlotClass::new(128, 1), SlotClass::new(128, 1)]),
                LayoutError::SlotSize {
                    class: 1,
                    size: 128,
                },
            ),
            (
                base.with_slots(64, 0),
                LayoutError::SlotsPerPool { class: 0, count: 0 },
            ),
            (
                SegmentConfig {
                    broadcast_slots: 0,
                    broadcast_slot_size: 64,
                    ..base
                },
                LayoutError::Broadcast { slots: 0, size: 64 },
            ),
            (
                SegmentConfig {
                    broadcast_slots: 1,
                    broadcast_slot_size: 65,
                    ..base
                },
                LayoutError::Broadcast { slots: 1, size: 65 },
            ),
        ];
        for (cfg, err) in cases {
            assert_eq!(cfg.layout().unwrap_err(), err);
        }
    }
}
