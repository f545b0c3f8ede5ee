//! Property tests of the layout computation (`shm.layout.guest-area`) over the whole
//! range of limits, valid and invalid, against a reference computed from the spec's
//! formulas in u128 (where nothing can overflow).

use proptest::prelude::*;
use shm_primitives::layout::{
    Direction, LayoutError, SegmentConfig, SegmentLayout, SlotClass, SlotClasses, CACHE_LINE,
    MAX_CLASSES, PAGE,
};

fn align_up(v: u128, a: u128) -> u128 {
    v.div_ceil(a) * a
}

/// The spec's formulas, in u128: `total_size` and `guest_area_stride`.
fn reference(c: &SegmentConfig) -> (u128, u128) {
    let guests = u128::from(c.max_guests);
    let broadcast_offset = align_up(256 + guests * 64, 4096);
    let broadcast_len = u128::from(c.broadcast_slots) * (64 + u128::from(c.broadcast_slot_size));
    let guest_areas_offset = align_up(broadcast_offset + broadcast_len, 4096);
    let ring_len = 128 + u128::from(c.ring_capacity) * 64;
    let pools_len: u128 = c
        .classes
        .as_slice()
        .iter()
        .map(|k| {
            let n = u128::from(k.count);
            align_up(64 + n * 16, 64) + n * u128::from(k.size)
        })
        .sum();
    let stride = align_up(2 * ring_len + 2 * pools_len, 4096);
    (guest_areas_offset + guests * stride, stride)
}

/// The limit errors `c` deserves (`shm.layout.guest-area`'s table); empty when every
/// limit holds.
fn limit_errors(c: &SegmentConfig) -> Vec<LayoutError> {
    let mut errors = Vec::new();
    if !(1..=255).contains(&c.max_guests) {
        errors.push(LayoutError::MaxGuests(c.max_guests));
    }
    if !(2..=65536).contains(&c.ring_capacity) || !c.ring_capacity.is_power_of_two() {
        errors.push(LayoutError::RingCapacity(c.ring_capacity));
    }
    if c.classes.is_empty() {
        errors.push(LayoutError::ClassCount(0));
    }
    let size_ok = |s: u32| s % 64 == 0 && (64..=1 << 30).contains(&s);
    let mut previous = 0;
    for (i, k) in c.classes.as_slice().iter().enumerate() {
        let class = i as u32;
        if !size_ok(k.size) || k.size <= previous {
            errors.push(LayoutError::SlotSize {
                class,
                size: k.size,
            });
        }
        if !(1..=65536).contains(&k.count) {
            errors.push(LayoutError::SlotsPerPool {
                class,
                count: k.count,
            });
        }
        previous = k.size;
    }
    let broadcast_ok = match c.broadcast_slots {
        0 => c.broadcast_slot_size == 0,
        n => n <= 65536 && size_ok(c.broadcast_slot_size),
    };
    if !broadcast_ok {
        errors.push(LayoutError::Broadcast {
            slots: c.broadcast_slots,
            size: c.broadcast_slot_size,
        });
    }
    errors
}

/// Every section of `l` as (start, end), in address order: header, peer table,
/// broadcast pool, then per guest its two rings and its pools, ToGuest then ToHost.
fn sections(l: &SegmentLayout) -> Vec<(u64, u64)> {
    let mut v = vec![
        (0, 256),
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

/// Aligned, disjoint, in bounds and exact, as `shm.layout.guest-area` says.
fn check_layout(l: &SegmentLayout) {
    let c = &l.config;
    let (total, stride) = reference(c);
    assert_eq!(
        u128::from(l.total_size),
        total,
        "total_size is the formula's"
    );
    assert_eq!(u128::from(l.guest_area_stride), stride);
    assert_eq!(l.peer_table_offset, 256);
    assert_eq!(l.peer_table_len, u64::from(c.max_guests) * 64);
    for (name, off) in [
        ("broadcast_offset", l.broadcast_offset),
        ("guest_areas_offset", l.guest_areas_offset),
        ("guest_area_stride", l.guest_area_stride),
    ] {
        assert_eq!(off % PAGE, 0, "{name} {off} is page-aligned");
    }
    assert_eq!(
        l.guest_areas_len,
        l.guest_area_stride * u64::from(c.max_guests)
    );
    assert_eq!(l.total_size, l.guest_areas_offset + l.guest_areas_len);
    let s = sections(l);
    for w in s.windows(2) {
        assert!(w[0].1 <= w[1].0, "overlap or disorder: {w:?}");
    }
    // Every ring, descriptor, pool, metadata array and slot on a cache line.
    for &(start, _) in &s[3..] {
        assert_eq!(start % CACHE_LINE, 0, "section at {start}");
    }
    assert_eq!(
        l.ring_len % CACHE_LINE,
        0,
        "descriptors follow a 128-byte header"
    );
    for (g, k) in l.pool_geometries().iter().zip(c.classes.as_slice()) {
        assert_eq!(g.meta_len % CACHE_LINE, 0, "slot data starts on a line");
        assert_eq!(u64::from(k.size) % CACHE_LINE, 0, "so does every slot");
        assert!(g.meta_len >= 64 + u64::from(k.count) * 16);
        assert!(g.meta_len < 64 + u64::from(k.count) * 16 + CACHE_LINE);
    }
    // The last section ends inside the last stride, and the segment ends with it.
    let last_area = l.guest_area_offset(c.max_guests as usize - 1);
    let end = s.last().unwrap().1;
    assert!(end <= l.total_size && end > last_area);
    assert_eq!(l.total_size, last_area + l.guest_area_stride);
    assert_eq!(
        l.total_size - end,
        (PAGE - end % PAGE) % PAGE,
        "padded to a page only"
    );
}

/// A slot size: mostly valid multiples of 64, with the boundary values around.
fn size() -> impl Strategy<Value = u32> {
    prop_oneof![
        4 => (1u32..=(1 << 24)).prop_map(|n| n * 64),
        1 => Just(1 << 30),
        1 => (1u32..=16).prop_map(|n| (1 << 30) - n * 64),
    ]
}

fn count() -> impl Strategy<Value = u32> {
    prop_oneof![3 => 1u32..=64, 1 => 1u32..=65536, 1 => Just(65536)]
}

/// Any configuration the limits allow, over their whole range.
fn valid_config() -> impl Strategy<Value = SegmentConfig> {
    (
        prop_oneof![1u32..=255, Just(255u32)],
        1u32..=16,
        proptest::collection::btree_set(size(), 1..=MAX_CLASSES),
        proptest::collection::vec(count(), MAX_CLASSES),
        prop_oneof![Just(0u32), 1u32..=64, Just(65536)],
        size(),
    )
        .prop_map(|(max_guests, ring_log, sizes, counts, slots, bsize)| {
            let classes: Vec<SlotClass> = sizes
                .iter()
                .zip(&counts)
                .map(|(&s, &n)| SlotClass::new(s, n))
                .collect();
            SegmentConfig {
                max_guests,
                ring_capacity: 1 << ring_log,
                classes: SlotClasses::new(&classes),
                broadcast_slots: slots,
                broadcast_slot_size: if slots == 0 { 0 } else { bsize },
            }
        })
}

/// Any u32, weighted towards the limits' edges.
fn any_limit() -> impl Strategy<Value = u32> {
    prop_oneof![
        Just(0u32),
        Just(1),
        Just(2),
        Just(3),
        Just(63),
        Just(64),
        Just(65),
        Just(255),
        Just(256),
        Just(65536),
        Just(65537),
        Just(1 << 30),
        Just((1 << 30) + 64),
        Just(u32::MAX),
        (0u32..=4096).prop_map(|n| n * 64),
        any::<u32>(),
    ]
}

/// Any configuration at all (each field anywhere in u32, up to six classes).
fn any_config() -> impl Strategy<Value = SegmentConfig> {
    (
        any_limit(),
        any_limit(),
        proptest::collection::vec((any_limit(), any_limit()), 0..=MAX_CLASSES),
        any_limit(),
        any_limit(),
    )
        .prop_map(|(max_guests, ring_capacity, classes, slots, bsize)| {
            let classes: Vec<SlotClass> =
                classes.iter().map(|&(s, n)| SlotClass::new(s, n)).collect();
            SegmentConfig {
                max_guests,
                ring_capacity,
                classes: SlotClasses::new(&classes),
                broadcast_slots: slots,
                broadcast_slot_size: bsize,
            }
        })
}

/// A valid configuration with one thing broken: a field set to an edge value, a class
/// size repeated or out of order, or no class at all.
fn one_broken_config() -> impl Strategy<Value = SegmentConfig> {
    (
        valid_config(),
        0u8..8,
        any::<prop::sample::Index>(),
        any_limit(),
    )
        .prop_map(|(mut c, what, at, v)| {
            let mut classes = c.classes.as_slice().to_vec();
            let n = classes.len();
            let i = at.index(n);
            match what {
                0 => c.max_guests = v,
                1 => c.ring_capacity = v,
                2 => classes[i].size = v,
                3 => classes[i].count = v,
                4 if i > 0 => classes[i].size = classes[i - 1].size,
                4 => classes.clear(),
                5 if n > 1 => classes.swap(i, (i + 1) % n),
                5 => classes[i].size = v,
                6 => c.broadcast_slots = v,
                _ => c.broadcast_slot_size = v,
            }
            c.classes = SlotClasses::new(&classes);
            c
        })
}

/// Accepted only when every limit holds (then laid out correctly); otherwise a typed
/// error naming a limit that really is broken, or an overflow exactly when the size
/// does not fit the address space.
fn check_accepted_or_refused(config: &SegmentConfig) -> Result<(), TestCaseError> {
    let broken = limit_errors(config);
    match config.layout() {
        Ok(l) => {
            prop_assert!(broken.is_empty(), "accepted despite {broken:?}");
            check_layout(&l);
        }
        Err(LayoutError::Overflow) => {
            prop_assert!(broken.is_empty(), "overflow reported for {broken:?}");
            prop_assert!(reference(config).0 > isize::MAX as u128);
        }
        Err(e) => prop_assert!(broken.contains(&e), "{e:?} is not among {broken:?}"),
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    // Every configuration within the limits either lays out aligned, disjoint and
    // exact, or is refused as an overflow exactly when its size does not fit the
    // address space.
    // shm[verify shm.layout.guest-area]
    #[test]
    fn valid_limits_lay_out_exactly_or_overflow(config in valid_config()) {
        prop_assert!(limit_errors(&config).is_empty());
        let (total, _) = reference(&config);
        match config.layout() {
            Ok(l) => {
                prop_assert!(total <= isize::MAX as u128);
                prop_assert_eq!(l.config, config);
                check_layout(&l);
            }
            Err(e) => {
                prop_assert_eq!(e, LayoutError::Overflow);
                prop_assert!(total > isize::MAX as u128, "refused a {total}-byte layout");
            }
        }
    }

    // Arbitrary limits, and valid ones with one thing broken: a typed error naming
    // a limit that really is broken (or an overflow), never a panic; accepted only
    // when every limit holds.
    // shm[verify shm.layout.guest-area]
    // shm[verify shm.slot.classes]
    // shm[verify shm.topology.max-guests]
    #[test]
    fn any_limits_are_accepted_or_refused_with_the_right_error(config in any_config()) {
        check_accepted_or_refused(&config)?;
    }

    // shm[verify shm.layout.guest-area]
    // shm[verify shm.slot.classes]
    #[test]
    fn one_broken_limit_is_refused_with_its_error(config in one_broken_config()) {
        check_accepted_or_refused(&config)?;
    }
}

// The largest configuration the limits allow still fits a 64-bit address space
// (about 2^57 bytes: `LayoutError::Overflow` guards 32-bit targets and headers), and
// the smallest is the spec's two pages.
// shm[verify shm.layout.guest-area]
#[test]
fn extreme_configurations() {
    let top = |i: u32| SlotClass::new((1 << 30) - (5 - i) * 64, 65536);
    let largest = SegmentConfig {
        max_guests: 255,
        ring_capacity: 65536,
        classes: SlotClasses::new(&[top(0), top(1), top(2), top(3), top(4), top(5)]),
        broadcast_slots: 65536,
        broadcast_slot_size: 1 << 30,
    };
    #[cfg(target_pointer_width = "64")]
    {
        let l = largest.layout().unwrap();
        check_layout(&l);
        assert!(l.total_size > 1 << 57 && l.total_size < 1 << 58);
    }
    #[cfg(not(target_pointer_width = "64"))]
    assert_eq!(largest.layout(), Err(LayoutError::Overflow));
    let smallest = SegmentConfig {
        max_guests: 1,
        ring_capacity: 2,
        classes: SlotClasses::single(64, 1),
        broadcast_slots: 0,
        broadcast_slot_size: 0,
    };
    let l = smallest.layout().unwrap();
    check_layout(&l);
    assert_eq!(
        l.total_size, 8192,
        "spec/02-segment.md: the smallest segment"
    );
}
