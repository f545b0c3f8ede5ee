//! Descriptor decoding and the receiver's checks of what a descriptor references
//! (`shm.ring.desc-layout`, `shm.ring.consume`, `shm.ring.validate`,
//! `shm.slot.claim`, `shm.broadcast.refcount`, `shm.untrusted.validate`), on either
//! side: a guest receiving from the host (ToGuest, where broadcast references are
//! valid) or the host receiving from a guest (ToHost).
//!
//! Eight arbitrary descriptor words sit at ring position `start` of a fresh segment;
//! the referenced slot or broadcast record can be made to match (so the checks past
//! the first are reached), and then arbitrary words of the pools and broadcast
//! records are overwritten. The receiver's `Inbox::take` must return a message whose
//! every value is in range, or a typed violation that consumed nothing.

#![no_main]

use std::sync::atomic::Ordering;

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use shm_primitives::channel::copy_out;
use shm_primitives::desc::{Body, DecodeError, Descriptor, DESC_WORDS, INLINE_CAPACITY};
use shm_primitives::slot::{owner_word, SlotState};
use shm_primitives::{Direction, Inbox, Message, Payload, PeerId, Violation};
use shmhub_fuzz::{dir, heap_segment, poke, section, slot_word, PokeMode, Section};

#[derive(Debug, Arbitrary)]
struct Input {
    config: u8,
    to_guest: bool,
    peer: u8,
    words: [u64; DESC_WORDS],
    /// Overwrite the stamp with the one of the position it is read at (`seq + 1`).
    fix_seq: bool,
    /// Ring position of the descriptor (the shared head and tail start here).
    start: u64,
    /// Overwrite the shared tail with this (default `start + 1`).
    tail: Option<u64>,
    /// Make the referenced slot Sent with the descriptor's generation (and, for a
    /// broadcast, set the receiver's holder bit).
    make_sent: bool,
    pokes: Vec<(bool, u16, u64)>,
    view: bool,
}

// shm[verify shm.ring.desc-layout]
// shm[verify shm.ring.consume]
// shm[verify shm.slot.claim]
// shm[verify shm.broadcast.refcount]
fuzz_target!(|input: Input| {
    check_decode(&input.words);
    receive(input);
});

/// Decoding refuses exactly the kinds and message kinds the spec does not define,
/// and what it accepts re-encodes to the same descriptor.
fn check_decode(words: &[u64; DESC_WORDS]) {
    let kind = words[3] as u8;
    let msg_kind = (words[3] >> 16) as u8;
    match Descriptor::decode(words) {
        Ok(d) => {
            assert!(kind <= 3 && msg_kind <= 3);
            assert_eq!(d.seq, words[0].wrapping_sub(1), "the stamp is seq + 1");
            assert_eq!(d.payload_len, (words[2] >> 32) as u32);
            assert_eq!(Descriptor::decode(&d.encode()), Ok(d));
        }
        Err(DecodeError::Kind(k)) => assert!(k == kind && k > 3),
        Err(DecodeError::MsgKind(m)) => assert!(m == msg_kind && m > 3 && kind <= 3),
    }
}

fn receive(input: Input) {
    let config = shmhub_fuzz::config(input.config);
    let seg = heap_segment(config);
    let layout = *seg.layout();
    let peer = PeerId::from_index(input.peer as usize % config.max_guests as usize).unwrap();
    let dir = dir(input.to_guest);
    let ring = seg.ring(peer, dir).unwrap();
    let pools = seg.pools(peer, dir).unwrap();
    let region = seg.backing().region();
    let ring_off = section(&layout, peer, Section::Ring(dir)).0;
    let head = region.atomic_u64(ring_off + 64).unwrap();
    let tail = region.atomic_u64(ring_off).unwrap();

    let mut words = input.words;
    if input.fix_seq {
        words[0] = input.start.wrapping_add(1);
    }
    let entry = (input.start % u64::from(config.ring_capacity)) as usize;
    let desc_off = ring_off + 128 + entry * 64;
    for (i, w) in words.iter().enumerate() {
        region
            .atomic_u64(desc_off + 8 * i)
            .unwrap()
            .store(*w, Ordering::Relaxed);
    }
    head.store(input.start, Ordering::Relaxed);
    tail.store(
        input.tail.unwrap_or(input.start.wrapping_add(1)),
        Ordering::Relaxed,
    );
    if input.make_sent {
        make_sent(&seg, peer, dir, &words);
    }
    for &(broadcast, word, value) in input.pokes.iter().take(16) {
        let sec = match broadcast {
            true => Section::BroadcastMeta,
            false => Section::Pools(dir),
        };
        poke(&seg, peer, sec, word as usize, PokeMode::Set, value);
    }

    let me = if dir == Direction::ToGuest {
        peer.get()
    } else {
        0
    };
    let Ok(mut inbox) = Inbox::resume(&ring, owner_word(me, 1)) else {
        return; // an impossible tail is refused before anything is read
    };
    let before = head.load(Ordering::Relaxed);
    match inbox.take(&ring, &pools, None) {
        Err(v) => {
            // Nothing consumed, except a broadcast reference whose record no longer
            // backs it (shm.broadcast.refcount).
            if !matches!(v, Violation::Broadcast { .. }) {
                assert_eq!(head.load(Ordering::Relaxed), before, "{v:?} consumed");
            }
        }
        Ok(None) => assert_eq!(head.load(Ordering::Relaxed), before),
        Ok(Some(msg)) => {
            assert_eq!(head.load(Ordering::Relaxed), before.wrapping_add(1));
            check_payload(&pools, dir, msg.payload);
            let mut buf = Vec::new();
            if input.view {
                let bell = None;
                if let Some(view) = Message::new(&seg, peer, dir, msg.meta, msg.payload, bell, None)
                {
                    assert_eq!(view.len(), view.to_vec().len());
                } else {
                    assert!(matches!(
                        msg.payload,
                        Payload::Large { .. } | Payload::Broadcast { .. }
                    ));
                }
            } else if copy_out(&ring, &pools, msg.payload, &mut buf, None).is_ok() {
                let len = match msg.payload {
                    Payload::Inline { len, .. } => u32::from(len),
                    Payload::Slot { len, .. } | Payload::Broadcast { len, .. } => len,
                    Payload::Large { .. } => unreachable!("copy_out refuses large"),
                };
                assert_eq!(buf.len(), len as usize);
            }
            if let Payload::Slot { class, index, .. } = msg.payload {
                // Received, then freed by the copy or the view's drop.
                let pool = pools.class(class as usize).unwrap();
                assert_eq!(pool.state(index), Some(SlotState::Free));
            }
        }
    }
}

/// What a message's payload must be once `take` accepted it.
fn check_payload(pools: &shm_primitives::Pools<'_>, dir: Direction, payload: Payload) {
    match payload {
        Payload::Inline { len, .. } => assert!(len as usize <= INLINE_CAPACITY),
        Payload::Slot {
            class, index, len, ..
        } => {
            let pool = pools.class(class as usize).expect("class in range");
            assert!(index < pool.count() && len <= pool.slot_size());
            assert_eq!(pool.state(index), Some(SlotState::Received));
        }
        Payload::Broadcast { index, len, .. } => {
            assert_eq!(dir, Direction::ToGuest, "broadcasts only travel to guests");
            let pool = pools.broadcast().expect("a broadcast pool");
            assert!(index < pool.count() && len <= pool.slot_size());
        }
        Payload::Large { .. } => {}
    }
}

/// Makes the slot or broadcast record the descriptor names match it, as an honest
/// sender would have left it.
fn make_sent(
    seg: &shm_primitives::Segment,
    peer: PeerId,
    dir: Direction,
    words: &[u64; DESC_WORDS],
) {
    let Ok(desc) = Descriptor::decode(words) else {
        return;
    };
    let layout = seg.layout();
    let sent = |generation: u32| u64::from(generation) << 32 | SlotState::Sent as u64;
    match desc.body {
        Body::Slot {
            class,
            index,
            generation,
        } => {
            if let Some(word) = slot_word(layout, class as usize, index) {
                poke(
                    seg,
                    peer,
                    Section::Pools(dir),
                    word,
                    PokeMode::Set,
                    sent(generation),
                );
            }
        }
        Body::Broadcast { index, generation } if index < layout.config.broadcast_slots => {
            let rec = index as usize * 8;
            let bc = Section::BroadcastMeta;
            poke(seg, peer, bc, rec, PokeMode::Set, sent(generation));
            let bit = peer.index();
            poke(
                seg,
                peer,
                bc,
                rec + 2 + bit / 64,
                PokeMode::Set,
                1 << (bit % 64),
            );
        }
        _ => {}
    }
}
