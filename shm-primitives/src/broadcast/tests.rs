//! Unit tests of the broadcast pool: the spec table, the protocol, and hostile records.

use std::mem::{offset_of, size_of};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use super::*;
use crate::channel::{copy_out, Inbox, Outbox, Payload};
use crate::desc::{Body, Meta};
use crate::layout::{Direction, SegmentConfig};
use crate::region::{HeapRegion, ShmBacking};
use crate::segment::Segment;
use crate::view::Message;

fn segment(slots: u32, slot_size: u32) -> Segment {
    let config = SegmentConfig {
        max_guests: 8,
        broadcast_slots: slots,
        broadcast_slot_size: slot_size,
        ..SegmentConfig::default()
    };
    let len = config.layout().unwrap().total_size as usize;
    let heap = HeapRegion::new_zeroed(len).unwrap();
    let seg = Segment::init(ShmBacking::Heap(Arc::new(heap)), config, [1, 2], 7).unwrap();
    seg.publish();
    seg
}

fn id(n: u8) -> PeerId {
    PeerId::new(n).unwrap()
}

fn ids(ns: &[u8]) -> PeerSet {
    ns.iter().map(|&n| id(n)).collect()
}

/// The `AtomicU64` at byte `off` of the broadcast pool.
fn word(seg: &Segment, off: usize) -> &AtomicU64 {
    let base = seg.layout().broadcast_offset as usize;
    seg.backing().region().atomic_u64(base + off).unwrap()
}

/// The `AtomicU32` at byte `off` of the broadcast pool: a record's 32-bit `remaining`,
/// written with an access of the size the pool uses. (A 64-bit store over it made
/// Miri's weak-memory emulation panic in nightly 2026-05-19; fixed in later Miri.)
fn word32(seg: &Segment, off: usize) -> &AtomicU32 {
    let base = seg.layout().broadcast_offset as usize;
    // SAFETY: AtomicU32 is a single atomic integer.
    unsafe { seg.backing().region().view(base + off) }.unwrap()
}

/// Allocates and publishes a slot holding `payload` for `holders`.
fn broadcast(pool: &BroadcastPool<'_>, holders: &[u8], payload: &[u8]) -> BroadcastRef {
    let slot = pool.alloc().unwrap();
    assert!(pool.write(slot.index, payload));
    pool.publish(slot, &ids(holders)).unwrap();
    slot
}

// The record table of spec/10-broadcast.md, field by field, and the bytes where it
// says: state, remaining, holder bits of ids 1, 64, 65 and 255, then the data of slot i
// at 64 × slots + i × slot_size.
// shm[verify shm.broadcast.layout]
#[test]
fn broadcast_records_sit_where_the_spec_table_says() {
    type M = BroadcastMeta;
    assert_eq!(offset_of!(M, state), 0);
    assert_eq!(offset_of!(M, remaining), 8);
    assert_eq!(offset_of!(M, _reserved0), 12);
    assert_eq!(offset_of!(M, holders), 16);
    assert_eq!(offset_of!(M, _reserved1), 48);
    assert_eq!(size_of::<M>(), 64);
    assert_eq!(BROADCAST_META_SIZE, 64);
    assert_eq!(
        [SlotState::Free, SlotState::Loaned, SlotState::Sent].map(|s| s as u32),
        [0, 1, 2]
    );
    let seg = segment(3, 128);
    let pool = seg.broadcast().unwrap();
    assert_eq!((pool.count(), pool.slot_size()), (3, 128));
    let a = pool.alloc().unwrap();
    let b = pool.alloc().unwrap();
    assert_eq!(
        (a, b),
        (
            BroadcastRef {
                index: 0,
                generation: 1
            },
            BroadcastRef {
                index: 1,
                generation: 1
            }
        )
    );
    assert_eq!(
        word(&seg, 64).load(Relaxed),
        (1 << 32) | 1,
        "slot 1 Loaned(1)"
    );
    assert!(pool.write(1, &[0xCD; 128]));
    assert_eq!(
        word(&seg, 3 * 64 + 128).load(Relaxed),
        0xCDCD_CDCD_CDCD_CDCD
    );
    assert_eq!(
        word(&seg, 3 * 64 + 256 - 8).load(Relaxed),
        0xCDCD_CDCD_CDCD_CDCD
    );
    assert_eq!(
        word(&seg, 3 * 64 + 256).load(Relaxed),
        0,
        "slot 2 untouched"
    );
    let holders: PeerSet = [1, 64, 65, 255].iter().map(|&n| id(n)).collect();
    pool.publish(b, &holders).unwrap();
    assert_eq!(word(&seg, 64).load(Relaxed), (1 << 32) | 2, "Sent(1)");
    assert_eq!(
        word(&seg, 64 + 8).load(Relaxed),
        4,
        "remaining 4, reserved 0"
    );
    assert_eq!(
        word(&seg, 64 + 16).load(Relaxed),
        1 | 1 << 63,
        "ids 1 and 64"
    );
    assert_eq!(word(&seg, 64 + 24).load(Relaxed), 1, "id 65");
    assert_eq!(word(&seg, 64 + 32).load(Relaxed), 0);
    assert_eq!(word(&seg, 64 + 40).load(Relaxed), 1 << 62, "id 255");
    assert_eq!(word(&seg, 64 + 48).load(Relaxed), 0);
    assert_eq!(word(&seg, 64 + 56).load(Relaxed), 0);
    assert_eq!(
        holders.iter().map(PeerId::get).collect::<Vec<_>>(),
        [1, 64, 65, 255]
    );
    assert!(pool.abandon(a));
    assert_eq!(word(&seg, 0).load(Relaxed), 1 << 32, "Free(1)");
    assert!(segment(0, 0).broadcast().is_none(), "no pool, no view");
}

// A slot goes Free -> Loaned -> Sent, each holder checks its own reference and
// releases it once, and the last release frees it; the cursor then moves on.
// shm[verify shm.broadcast.alloc]
// shm[verify shm.broadcast.refcount]
// shm[verify shm.broadcast.release]
#[test]
fn every_holder_releases_once_and_the_last_frees() {
    let seg = segment(2, 256);
    let pool = seg.broadcast().unwrap();
    let s = broadcast(&pool, &[1, 2, 5], &[7; 200]);
    assert_eq!(
        s,
        BroadcastRef {
            index: 0,
            generation: 1
        }
    );
    for n in [1, 2, 5] {
        pool.check_ref(s.index, s.generation, 200).unwrap();
        pool.check_held(id(n), s.index, s.generation).unwrap();
    }
    let not_ours = pool.check_held(id(3), s.index, s.generation);
    assert_eq!(
        not_ours,
        Err(Violation::Broadcast {
            index: 0,
            generation: 1,
            found: pack(SlotState::Sent, 1)
        }),
        "a guest the host did not send it to holds nothing"
    );
    assert!(
        matches!(
            pool.check_held(id(1), 0, 2),
            Err(Violation::Broadcast { .. })
        ),
        "stale"
    );
    let mut out = Vec::new();
    assert!(pool.read_to_vec(s.index, 200, &mut out));
    assert_eq!(out, [7; 200]);
    assert_eq!(pool.release(id(2), 0, 1), Ok(Release::Released));
    assert_eq!(
        pool.release(id(2), 0, 1),
        Ok(Release::NotHeld),
        "twice is once"
    );
    assert_eq!(
        pool.release(id(3), 0, 1),
        Ok(Release::NotHeld),
        "never held"
    );
    assert_eq!(pool.release(id(5), 0, 1), Ok(Release::Released));
    let info = pool.info(0).unwrap();
    assert_eq!(
        (info.state, info.remaining, info.holders),
        (Some(SlotState::Sent), 1, ids(&[1]))
    );
    assert_eq!(pool.usage(), PoolUsage { free: 1, in_use: 1 });
    assert_eq!(pool.release(id(1), 0, 1), Ok(Release::Freed));
    let info = pool.info(0).unwrap();
    assert_eq!(
        (info.state, info.generation, info.remaining),
        (Some(SlotState::Free), 1, 0)
    );
    assert!(info.holders.is_empty());
    // Freed once: a late release of the old generation changes nothing.
    assert!(matches!(
        pool.release(id(1), 0, 1),
        Err(Violation::Broadcast { .. })
    ));
    assert_eq!(pool.usage(), PoolUsage { free: 2, in_use: 0 });
    // The cursor moved past slot 0: slot 1 next, then slot 0 again with generation 2.
    let t = broadcast(&pool, &[4], &[1; 64]);
    assert_eq!(
        t,
        BroadcastRef {
            index: 1,
            generation: 1
        }
    );
    let u = pool.alloc().unwrap();
    assert_eq!(
        u,
        BroadcastRef {
            index: 0,
            generation: 2
        }
    );
    assert_eq!(pool.alloc(), None, "every slot in use");
    assert!(pool.abandon(u));
    assert!(!pool.abandon(u), "abandoned once");
    assert_eq!(
        pool.check_ref(9, 1, 1),
        Err(Violation::Broadcast {
            index: 9,
            generation: 1,
            found: NO_WORD
        })
    );
    assert_eq!(
        pool.check_ref(1, 1, 257),
        Err(Violation::SlotLen {
            len: 257,
            slot_size: 256
        })
    );
}

// The host releases a gone guest's holds in every slot it is in, once, and frees the
// slots where it was the last; the guest's own late release then finds nothing.
// shm[verify shm.broadcast.reclaim]
#[test]
fn release_for_drops_a_gone_guests_holds_once() {
    let seg = segment(4, 64);
    let pool = seg.broadcast().unwrap();
    let a = broadcast(&pool, &[1, 2], &[1; 64]);
    let b = broadcast(&pool, &[2], &[2; 64]);
    let c = broadcast(&pool, &[1], &[3; 64]);
    let counts = pool.release_for(id(2));
    assert_eq!(
        counts,
        ReleaseCounts {
            cleared: 2,
            freed: 1,
            refused: 0
        }
    );
    assert_eq!(pool.info(b.index).unwrap().state, Some(SlotState::Free));
    assert_eq!(pool.info(a.index).unwrap().remaining, 1);
    assert_eq!(
        pool.release(id(2), a.index, a.generation),
        Ok(Release::NotHeld)
    );
    assert_eq!(
        pool.release_for(id(2)),
        ReleaseCounts::default(),
        "nothing left"
    );
    assert_eq!(
        pool.release(id(1), c.index, c.generation),
        Ok(Release::Freed)
    );
    assert_eq!(
        pool.release_for(id(1)),
        ReleaseCounts {
            cleared: 1,
            freed: 1,
            refused: 0
        }
    );
    assert_eq!(pool.usage().in_use, 0);
}

// Whatever a guest writes into a record, the pool answers with a typed error or skips
// the slot: no panic, no wrap of the count, no second free, no out-of-range access.
// shm[verify shm.broadcast.untrusted]
// shm[verify shm.broadcast.refcount]
#[test]
fn hostile_records_are_refused_not_trusted() {
    let seg = segment(3, 64);
    let pool = seg.broadcast().unwrap();
    let state = |i: usize| word(&seg, 64 * i);
    let remaining = |i: usize| word32(&seg, 64 * i + 8);
    // Words that hold no broadcast state (Received included) are never allocated.
    state(0).store(pack(SlotState::Received, 5), Relaxed);
    state(1).store(u64::MAX, Relaxed);
    state(2).store(7, Relaxed);
    assert_eq!(pool.alloc(), None);
    assert_eq!(pool.usage(), PoolUsage { free: 0, in_use: 3 });
    assert_eq!(pool.info(0).unwrap().state, None);
    assert_eq!(
        pool.release_for(id(1)),
        ReleaseCounts::default(),
        "nothing Sent"
    );
    for i in 0..3 {
        state(i).store(0, Relaxed);
    }
    // A zero count under a set bit: refused, not wrapped, not freed.
    let s = broadcast(&pool, &[1, 2], &[9; 64]);
    remaining(s.index as usize).store(0, Relaxed);
    let sent = pack(SlotState::Sent, s.generation);
    assert_eq!(
        pool.release(id(1), s.index, s.generation),
        Err(Violation::Broadcast {
            index: s.index,
            generation: s.generation,
            found: sent
        })
    );
    assert_eq!(pool.info(s.index).unwrap().remaining, 0);
    assert_eq!(
        pool.info(s.index).unwrap().state,
        Some(SlotState::Sent),
        "leaked, not freed"
    );
    assert_eq!(pool.release_for(id(2)).refused, 1);
    // A guest that frees a slot early: the holders' checks and releases fail, typed.
    let t = broadcast(&pool, &[1, 2], &[8; 64]);
    state(t.index as usize).store(pack(SlotState::Free, t.generation), Relaxed);
    assert!(matches!(
        pool.check_held(id(1), t.index, t.generation),
        Err(Violation::Broadcast { .. })
    ));
    assert!(matches!(
        pool.release(id(1), t.index, t.generation),
        Err(Violation::Broadcast { .. })
    ));
    // A huge count: every release succeeds, the slot is never freed (a leak only).
    state(t.index as usize).store(pack(SlotState::Sent, t.generation), Relaxed);
    remaining(t.index as usize).store(u32::MAX, Relaxed);
    assert_eq!(
        pool.release(id(1), t.index, t.generation),
        Ok(Release::Released)
    );
    assert_eq!(
        pool.release(id(2), t.index, t.generation),
        Ok(Release::Released)
    );
    assert_eq!(pool.info(t.index).unwrap().state, Some(SlotState::Sent));
    // A word rewritten while the host holds the slot: publish refuses, nothing leaks
    // into Sent, and abandon refuses too (the slot is left as found).
    state(1).store(0, Relaxed);
    let u = pool.alloc().unwrap();
    state(u.index as usize).store(pack(SlotState::Sent, 99), Relaxed);
    assert!(
        matches!(pool.publish(u, &ids(&[1])), Err(Violation::Broadcast { found, .. }) if found == pack(SlotState::Sent, 99))
    );
    assert!(!pool.abandon(u));
    // Out-of-range references and a stray bit 63 of word 3 (id 256) are harmless.
    assert_eq!(
        pool.release(id(1), 3, 1),
        Err(Violation::Broadcast {
            index: 3,
            generation: 1,
            found: NO_WORD
        })
    );
    assert_eq!(pool.info(3), None);
    assert_eq!(pool.data_ptr(3), None);
    assert!(!pool.write(0, &[0; 65]), "longer than a slot");
    assert_eq!(PeerSet::from_words([0, 0, 0, 1 << 63]).iter().count(), 0);
}

/// A ring and pools towards guest `n`, and a host outbox and guest inbox for them.
fn channel(seg: &Segment, n: u8) -> (crate::ring::RingView<'_>, crate::Pools<'_>) {
    (
        seg.ring(id(n), Direction::ToGuest).unwrap(),
        seg.pools(id(n), Direction::ToGuest).unwrap(),
    )
}

fn push(tx: &mut Outbox, ring: &crate::ring::RingView<'_>, s: BroadcastRef, len: u32, user: u64) {
    let body = Body::Broadcast {
        index: s.index,
        generation: s.generation,
    };
    tx.push(ring, Meta::new(5, user), len, body, None).unwrap();
}

// The receive path: the copying receive and the view both deliver the bytes and release
// the hold; a reference the pool no longer backs is consumed and reported once; a bad
// index is left unconsumed; the host refuses a broadcast reference from a guest.
// shm[verify shm.broadcast.receive]
// shm[verify shm.broadcast.refcount]
#[test]
fn take_copy_and_view_release_their_holds() {
    let seg = segment(2, 4096);
    let pool = seg.broadcast().unwrap();
    let payload: Vec<u8> = (0..3000u32).map(|i| (i * 7) as u8).collect();
    let s = broadcast(&pool, &[1, 2], &payload);
    let (ring1, pools1) = channel(&seg, 1);
    let (ring2, pools2) = channel(&seg, 2);
    let (mut tx1, mut tx2) = (Outbox::new(0), Outbox::new(0));
    push(&mut tx1, &ring1, s, 3000, 1);
    push(&mut tx2, &ring2, s, 3000, 1);
    // Guest 1 copies: the hold is released when the copy returns.
    let mut rx1 = Inbox::new(1);
    let mut buf = Vec::new();
    assert_eq!(
        rx1.recv(&ring1, &pools1, &mut buf, None),
        Ok(Some(Meta::new(5, 1)))
    );
    assert_eq!(buf, payload);
    assert_eq!(pool.info(s.index).unwrap().holders, ids(&[2]));
    // Guest 2 views in place: reading leaves the hold, dropping releases (and frees).
    let mut rx2 = Inbox::new(2);
    let msg = rx2.take(&ring2, &pools2, None).unwrap().unwrap();
    assert!(matches!(
        msg.payload,
        Payload::Broadcast {
            index: 0,
            generation: 1,
            len: 3000
        }
    ));
    let view = Message::new(
        &seg,
        id(2),
        Direction::ToGuest,
        msg.meta,
        msg.payload,
        None,
        None,
    )
    .unwrap();
    assert!(view.is_zero_copy());
    assert_eq!(view.len(), 3000);
    assert_eq!(view.to_vec(), payload);
    let mut tail = [0u8; 4];
    assert!(view.copy_to(2996, &mut tail) && tail == payload[2996..]);
    assert_eq!(pool.info(s.index).unwrap().state, Some(SlotState::Sent));
    drop(view);
    assert_eq!(pool.info(s.index).unwrap().state, Some(SlotState::Free));
    // A reference whose slot was freed under it (or whose bit is clear) is consumed and
    // reported once; the next message still arrives.
    push(&mut tx1, &ring1, s, 3000, 2);
    tx1.send_inline(&ring1, Meta::new(6, 3), b"after", None)
        .unwrap();
    let stale = rx1.recv(&ring1, &pools1, &mut buf, None);
    assert_eq!(
        stale,
        Err(Violation::Broadcast {
            index: 0,
            generation: 1,
            found: pack(SlotState::Free, 1)
        })
    );
    assert_eq!(
        rx1.recv(&ring1, &pools1, &mut buf, None),
        Ok(Some(Meta::new(6, 3)))
    );
    assert_eq!(buf, b"after");
    // A descriptor whose own values are wrong is the host's fault: not consumed.
    let bad = BroadcastRef {
        index: 2,
        generation: 1,
    };
    push(&mut tx1, &ring1, bad, 10, 4);
    for _ in 0..2 {
        assert_eq!(
            rx1.take(&ring1, &pools1, None),
            Err(Violation::Broadcast {
                index: 2,
                generation: 1,
                found: NO_WORD
            })
        );
    }
    // Only the host broadcasts: a kind 2 towards the host is refused, not consumed.
    let t = broadcast(&pool, &[3], &[1; 100]);
    let to_host = seg.ring(id(3), Direction::ToHost).unwrap();
    let host_pools = seg.pools(id(3), Direction::ToHost).unwrap();
    push(&mut Outbox::new(3), &to_host, t, 100, 5);
    let mut host = Inbox::new(0);
    for _ in 0..2 {
        assert!(matches!(
            host.take(&to_host, &host_pools, None),
            Err(Violation::Broadcast { found: NO_WORD, .. })
        ));
    }
    assert_eq!(pool.info(t.index).unwrap().holders, ids(&[3]), "untouched");
    let whole = Payload::Broadcast {
        index: t.index,
        generation: t.generation,
        len: 100,
    };
    assert!(Message::new(
        &seg,
        id(3),
        Direction::ToHost,
        Meta::default(),
        whole,
        None,
        None
    )
    .is_none());
    assert!(copy_out(&to_host, &host_pools, whole, &mut buf, None).is_err());
}
