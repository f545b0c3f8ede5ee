//! Helpers shared by the fuzz targets: small segment configurations (so an
//! iteration allocates a few pages, not the default 7 MiB) and raw word access to the
//! parts of a segment a peer can write.

use std::sync::Arc;

use shm_primitives::layout::{SegmentLayout, MAX_CLASSES};
use shm_primitives::{
    Direction, HeapRegion, PeerId, Segment, SegmentConfig, ShmBacking, SlotClass, SlotClasses,
};

/// The configurations the targets pick from (by `index % CONFIGS.len()`): the
/// smallest segment, a typical one, one with a deep ring, and one with every class.
pub fn config(index: u8) -> SegmentConfig {
    let classes = |c: &[SlotClass]| SlotClasses::new(c);
    let configs = [
        SegmentConfig {
            max_guests: 1,
            ring_capacity: 2,
            classes: classes(&[SlotClass::new(64, 1)]),
            broadcast_slots: 0,
            broadcast_slot_size: 0,
        },
        SegmentConfig {
            max_guests: 2,
            ring_capacity: 4,
            classes: classes(&[
                SlotClass::new(64, 2),
                SlotClass::new(256, 2),
                SlotClass::new(1024, 1),
            ]),
            broadcast_slots: 2,
            broadcast_slot_size: 128,
        },
        SegmentConfig {
            max_guests: 3,
            ring_capacity: 16,
            classes: classes(&[SlotClass::new(128, 4), SlotClass::new(4096, 2)]),
            broadcast_slots: 4,
            broadcast_slot_size: 64,
        },
        SegmentConfig {
            max_guests: 2,
            ring_capacity: 8,
            classes: classes(&[
                SlotClass::new(64, 1),
                SlotClass::new(128, 1),
                SlotClass::new(192, 1),
                SlotClass::new(256, 1),
                SlotClass::new(512, 1),
                SlotClass::new(1024, 2),
            ]),
            broadcast_slots: 1,
            broadcast_slot_size: 64,
        },
    ];
    const _: () = assert!(MAX_CLASSES == 6);
    configs[index as usize % configs.len()]
}

/// A zeroed heap region of `len` bytes holding `contents` at offset 0 (truncated to
/// `len`).
pub fn heap_backing(len: usize, contents: &[u8]) -> ShmBacking {
    let heap = HeapRegion::new_zeroed(len).expect("fuzz regions are small");
    let n = contents.len().min(len);
    assert!(heap.region().copy_in(0, &contents[..n]));
    ShmBacking::Heap(Arc::new(heap))
}

/// A published segment for `config` on the heap, as a host creates it.
pub fn heap_segment(config: SegmentConfig) -> Segment {
    let len = config.layout().expect("valid config").total_size as usize;
    let seg = Segment::init(heap_backing(len, &[]), config, [0x5eed, 0xf022], 1)
        .expect("the region fits the layout");
    seg.publish();
    seg
}

/// A byte range of a segment a guest can write: its peer entry, a ring, the pools of
/// one direction, or the broadcast pool's records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Section {
    /// The peer entry (64 bytes).
    Peer,
    /// The ring header and descriptors for `Direction`.
    Ring(Direction),
    /// Every pool of `Direction`, all classes.
    Pools(Direction),
    /// The broadcast pool's metadata records.
    BroadcastMeta,
}

/// `(offset, len)` of `section` for guest `peer`, in bytes from the segment start.
pub fn section(layout: &SegmentLayout, peer: PeerId, section: Section) -> (usize, usize) {
    let i = peer.index();
    let (off, len) = match section {
        Section::Peer => (layout.peer_offset(i), 64),
        Section::Ring(dir) => (layout.ring_offset(i, dir), layout.ring_len),
        Section::Pools(dir) => (layout.pool_offset(i, dir, 0), layout.pools_len),
        Section::BroadcastMeta => (
            layout.broadcast_offset,
            u64::from(layout.config.broadcast_slots) * 64,
        ),
    };
    (off as usize, len as usize)
}

/// How a poke changes a word.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PokeMode {
    /// Replace it.
    Set,
    /// Flip bits.
    Xor,
    /// Add (wrapping): nudges counters and generations by small amounts.
    Add,
}

/// Changes the `word`-th (modulo the section's length) 64-bit word of `section` of
/// guest `peer` as a hostile peer would. Returns false for an empty section.
pub fn poke(
    segment: &Segment,
    peer: PeerId,
    sec: Section,
    word: usize,
    mode: PokeMode,
    value: u64,
) -> bool {
    let (off, len) = section(segment.layout(), peer, sec);
    let words = len / 8;
    if words == 0 {
        return false;
    }
    let at = off + (word % words) * 8;
    let cell = segment
        .backing()
        .region()
        .atomic_u64(at)
        .expect("sections are in bounds and 8-aligned");
    let ord = std::sync::atomic::Ordering::SeqCst;
    match mode {
        PokeMode::Set => cell.store(value, ord),
        PokeMode::Xor => {
            cell.fetch_xor(value, ord);
        }
        PokeMode::Add => {
            cell.fetch_add(value, ord);
        }
    }
    true
}

/// The pool-word index (counting from the start of `dir`'s pools, as [`poke`] does)
/// of slot `index`'s state word in class `class`, if both exist.
pub fn slot_word(layout: &SegmentLayout, class: usize, index: u32) -> Option<usize> {
    let g = layout.pool_geometries().get(class)?;
    (index < g.count).then(|| (g.offset_in_dir as usize + 64 + 8 * index as usize) / 8)
}

/// Direction of a ring or pool section.
pub fn dir(to_guest: bool) -> Direction {
    if to_guest {
        Direction::ToGuest
    } else {
        Direction::ToHost
    }
}
