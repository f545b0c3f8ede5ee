//! A guest attaching to arbitrary segment contents (`shm.header.*`,
//! `shm.attach.*`, `shm.untrusted.validate`).
//!
//! Input: a 4-byte little-endian length selector, then the first bytes of the file
//! (the rest of the file is zero). Bit 31 of the selector set: the file is as long as
//! its header's `total_size` says (capped), so a valid header reaches the peer table;
//! clear: the file is as long as the bytes given plus the selector's low 16 bits.
//!
//! Every refusal must be a typed error, and a layout the header validation accepts
//! must keep every view in bounds: the host and guests index the segment with it
//! (`expect("in range")`) once it is accepted.

#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use shm_guest::{AttachOptions, ShmGuest};
use shm_primitives::header::HEADER_SIZE;
use shm_primitives::{Direction, PeerId, Segment};
use shmhub_fuzz::heap_backing;

/// Largest file the target allocates: zeroing it dominates an iteration, so larger
/// layouts are checked by header validation alone (`validate_at_many_lengths`).
const MAX_FILE: u64 = 256 << 10;

// shm[verify shm.header.sections]
// shm[verify shm.untrusted.validate]
fuzz_target!(|data: &[u8]| {
    let Some((selector, contents)) = data.split_first_chunk::<4>() else {
        return;
    };
    let selector = u32::from_le_bytes(*selector);
    validate_at_many_lengths(contents, selector);
    let declared = contents
        .get(16..24)
        .map_or(0, |b| u64::from_le_bytes(b.try_into().unwrap()));
    let file_len = if selector & (1 << 31) != 0 {
        declared.min(MAX_FILE)
    } else {
        (contents.len() as u64 + u64::from(selector & 0xFFFF)).min(MAX_FILE)
    };
    let backing = heap_backing(file_len as usize, contents);
    check_attached_views(&backing, file_len);
    // The whole guest attach: magic, readiness (no waiting), validation, claim of a
    // peer entry, doorbell (refused: no host listens on a fuzzed segment id).
    let options = AttachOptions {
        timeout: Duration::ZERO,
        ..AttachOptions::default()
    };
    let _ = ShmGuest::attach_backing(backing.clone(), options);
    // And by id, which takes the reserved-entry path.
    let by_id = AttachOptions {
        peer_id: PeerId::new(selector as u8 | 1),
        generation: Some(selector >> 8),
        ..options
    };
    let _ = ShmGuest::attach_backing(backing, by_id);
});

/// Header validation alone, against file lengths around what the header claims:
/// what it accepts must fit the file and be exactly the layout its limits imply.
fn validate_at_many_lengths(contents: &[u8], selector: u32) {
    if contents.len() < HEADER_SIZE {
        return;
    }
    let header_only = heap_backing(HEADER_SIZE, contents);
    let header = Segment::header_of(header_only.region()).expect("256 bytes");
    let declared = header.total_size.load(std::sync::atomic::Ordering::Relaxed);
    for file_len in [
        declared,
        declared.wrapping_sub(1),
        contents.len() as u64,
        u64::from(selector) << 12,
        u64::MAX,
    ] {
        if let Ok(layout) = header.validate(file_len) {
            assert!(layout.total_size <= file_len);
            assert_eq!(layout.total_size, declared);
            assert_eq!(Ok(layout), layout.config.layout());
        }
    }
}

/// `Segment::attach` on the file: if it accepts, every peer's entry, rings and pools
/// and the broadcast pool must be reachable (in bounds and aligned).
fn check_attached_views(backing: &shm_primitives::ShmBacking, file_len: u64) {
    let Ok(seg) = Segment::attach(backing.clone()) else {
        return;
    };
    let layout = *seg.layout();
    assert!(layout.total_size <= file_len);
    for index in 0..layout.config.max_guests as usize {
        let id = PeerId::from_index(index).expect("max_guests <= 255");
        let entry = seg.peer(id).expect("peer entry in bounds");
        let _ = entry.load();
        for dir in [Direction::ToGuest, Direction::ToHost] {
            assert!(seg.ring(id, dir).is_some(), "ring {id:?} {dir:?}");
            let pools = seg.pools(id, dir).expect("pools");
            for class in 0..layout.config.classes.len() {
                assert!(pools.class(class).is_some(), "pool {id:?} {dir:?} {class}");
            }
        }
    }
    assert_eq!(seg.broadcast().is_some(), layout.config.broadcast_slots > 0);
}
