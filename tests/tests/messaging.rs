//! Host and guests in separate processes exchanging messages, inline and in slots.

use std::collections::HashMap;
use std::time::Duration;

use shm_guest::{AttachOptions, ShmGuest};
use shm_host::{Meta, PeerId, PeerState, SegmentConfig, ShmHost, SlotClasses};
use shmhub_tests::{arg, hear, pattern, poll_until, role, tell, Proc, ShmPath, LENGTHS};

const DATA: u32 = 1;
const DONE: u32 = 2;
const REPLY: u32 = 3;
const ROUNDS: u64 = 40;

/// Guest side: sends ROUNDS messages of every length, then DONE; then receives
/// ROUNDS replies and checks every byte.
fn guest_main(mut guest: ShmGuest) {
    let seed = u64::from(guest.peer_id().get());
    tell(&format!("attached {}", guest.peer_id().get()));
    for n in 0..ROUNDS {
        let len = LENGTHS[n as usize % LENGTHS.len()];
        let payload = pattern(seed, n, len);
        poll_until(Duration::from_secs(20), "ring space", || {
            match guest.try_send(Meta::new(DATA, n), &payload) {
                Ok(()) => Some(()),
                Err(e) if e.is_would_block() => None,
                Err(e) => panic!("send: {e}"),
            }
        });
    }
    poll_until(Duration::from_secs(20), "ring space", || {
        guest.try_send(Meta::new(DONE, ROUNDS), b"").ok()
    });
    let mut buf = Vec::new();
    for n in 0..ROUNDS {
        let meta = poll_until(Duration::from_secs(20), "reply", || {
            guest.try_recv(&mut buf).unwrap()
        });
        assert_eq!(meta, Meta::new(REPLY, n), "replies arrive in order");
        let len = LENGTHS[(n as usize + 3) % LENGTHS.len()];
        assert_eq!(buf, pattern(seed + 1000, n, len), "reply {n} bytes");
    }
    guest.detach();
    tell("ok");
}

// shm[verify shm.file.attach]
// shm[verify shm.file.mmap-posix]
// shm[verify shm.peer.attach-path]
// shm[verify shm.peer.attach-reserved]
// shm[verify shm.peer.reserve]
// shm[verify shm.topology.host]
// shm[verify shm.msg.inline]
// shm[verify shm.msg.slot]
// shm[verify shm.delivery.to-host]
#[test]
fn guests_by_path_and_by_reserved_id_exchange_messages() {
    match role().as_deref() {
        Some("by-path") => return guest_main(ShmGuest::attach_path(arg("SEG")).unwrap()),
        Some("by-id") => {
            let id = PeerId::new(arg("PEER").parse().unwrap()).unwrap();
            let guest = ShmGuest::attach_path_with_id(arg("SEG"), id).unwrap();
            assert_eq!(guest.peer_id(), id);
            return guest_main(guest);
        }
        _ => {}
    }
    let seg = ShmPath::new("msg");
    let config = SegmentConfig {
        max_guests: 4,
        ring_capacity: 16,
        classes: SlotClasses::single(4096, 8),
        broadcast_slots: 0,
        broadcast_slot_size: 0,
    };
    let mut host = ShmHost::create(seg.path(), config).unwrap();
    let reserved = host.reserve_peer().unwrap();
    assert_eq!(
        host.peer_info(reserved).unwrap().state,
        Some(PeerState::Reserved)
    );
    let segenv = ("SEG", seg.path().display().to_string());
    let test = "guests_by_path_and_by_reserved_id_exchange_messages";
    let limit = Duration::from_secs(60);
    let mut by_id = Proc::spawn(
        test,
        "by-id",
        &[segenv.clone(), ("PEER", reserved.get().to_string())],
        limit,
    );
    let mut by_path = Proc::spawn(test, "by-path", &[segenv], limit);
    assert_eq!(by_id.expect("attached"), reserved.get().to_string());
    let path_id: u8 = by_path.expect("attached").parse().unwrap();
    assert_ne!(
        path_id,
        reserved.get(),
        "attach by path never takes a reserved entry"
    );

    let mut next: HashMap<PeerId, u64> = HashMap::new();
    let mut done = 0;
    let mut buf = Vec::new();
    while done < 2 {
        let msg = poll_until(Duration::from_secs(30), "guest message", || {
            host.try_recv(&mut buf).unwrap()
        });
        let n = next.entry(msg.from).or_default();
        if msg.meta.msg_type == DONE {
            assert_eq!(*n, ROUNDS, "every message before DONE arrived");
            done += 1;
            continue;
        }
        assert_eq!(msg.meta, Meta::new(DATA, *n), "in order from {}", msg.from);
        let len = LENGTHS[*n as usize % LENGTHS.len()];
        assert_eq!(buf, pattern(u64::from(msg.from.get()), *n, len));
        *n += 1;
    }
    assert_eq!(next.len(), 2);
    for peer in next.keys().copied() {
        let seed = u64::from(peer.get()) + 1000;
        for n in 0..ROUNDS {
            let payload = pattern(seed, n, LENGTHS[(n as usize + 3) % LENGTHS.len()]);
            poll_until(Duration::from_secs(20), "ring space", || {
                match host.try_send(peer, Meta::new(REPLY, n), &payload) {
                    Ok(()) => Some(()),
                    Err(e) if e.is_would_block() => None,
                    Err(e) => panic!("host send: {e}"),
                }
            });
        }
    }
    by_id.expect("ok");
    by_path.expect("ok");
    by_id.assert_success();
    by_path.assert_success();
    // Both left: the host recycles their entries (new generation, Empty).
    poll_until(Duration::from_secs(10), "recycle", || {
        host.try_recv(&mut buf).unwrap();
        (host.attached_peers().is_empty()
            && next
                .keys()
                .all(|&p| host.peer_info(p).unwrap().state == Some(PeerState::Empty)))
        .then_some(())
    });
    for peer in next.keys() {
        let info = host.peer_info(*peer).unwrap();
        assert_eq!(info.generation, 1);
        assert_eq!(info.stats.received, ROUNDS + 1);
        assert_eq!(info.stats.sent, ROUNDS);
        assert_eq!(info.stats.discarded, 0);
    }
}

// shm[verify shm.peer.attach-reserved]
#[test]
fn a_reserved_id_is_claimed_only_by_its_guest() {
    let seg = ShmPath::new("resv");
    let mut host = ShmHost::create(seg.path(), SegmentConfig::default()).unwrap();
    let id = host.reserve_peer().unwrap();
    let other = PeerId::new(id.get() + 1).unwrap();
    let opts = |peer| AttachOptions {
        peer_id: Some(peer),
        ..AttachOptions::default()
    };
    // An Empty entry cannot be claimed by id: only Reserved ones.
    let err = ShmGuest::attach_path_with(seg.path(), opts(other)).unwrap_err();
    assert!(
        matches!(
            err,
            shm_guest::AttachError::NotReserved {
                state: Some(PeerState::Empty),
                ..
            }
        ),
        "{err}"
    );
    let past = PeerId::new(200).unwrap();
    let err = ShmGuest::attach_path_with(seg.path(), opts(past)).unwrap_err();
    assert!(
        matches!(err, shm_guest::AttachError::NoSuchPeer(p) if p == past),
        "{err}"
    );
    let g = ShmGuest::attach_path_with(seg.path(), opts(id)).unwrap();
    assert_eq!(g.peer_id(), id);
    // Claimed once: a second claim of the same id fails.
    let err = ShmGuest::attach_path_with(seg.path(), opts(id)).unwrap_err();
    assert!(matches!(
        err,
        shm_guest::AttachError::NotReserved {
            state: Some(PeerState::Attached),
            ..
        }
    ));
    drop(g);
}

// shm[verify shm.delivery.to-guest]
// shm[verify shm.slot.reclaim]
#[test]
fn what_a_departed_guest_never_read_is_reclaimed_and_counted() {
    if role().as_deref() == Some("reader") {
        let mut guest = ShmGuest::attach_path(arg("SEG")).unwrap();
        tell("attached");
        // Leave only once the host has sent all five (else its later sends would
        // race the goodbye).
        assert_eq!(hear(), "sent");
        let mut buf = Vec::new();
        let meta = poll_until(Duration::from_secs(20), "first", || {
            guest.try_recv(&mut buf).unwrap()
        });
        assert_eq!(meta.user_id, 0, "in order");
        assert_eq!(buf, pattern(9, 0, 1000));
        guest.detach(); // four messages left unread: two in slots
        tell("left");
        return;
    }
    let seg = ShmPath::new("reclaim");
    let mut host = ShmHost::create(seg.path(), SegmentConfig::default()).unwrap();
    let mut child = Proc::spawn(
        "what_a_departed_guest_never_read_is_reclaimed_and_counted",
        "reader",
        &[("SEG", seg.path().display().to_string())],
        Duration::from_secs(60),
    );
    child.expect("attached");
    let peer = host.attached_peers()[0];
    for (n, len) in [1000usize, 2000, 10, 3000, 20].into_iter().enumerate() {
        host.try_send(peer, Meta::new(1, n as u64), &pattern(9, n as u64, len))
            .unwrap();
    }
    child.say("sent");
    child.expect("left");
    child.assert_success();
    let mut buf = Vec::new();
    assert!(host.try_recv(&mut buf).unwrap().is_none());
    let info = host.peer_info(peer).unwrap();
    assert_eq!(info.state, Some(PeerState::Empty));
    assert_eq!(
        info.stats.discarded, 4,
        "unread messages are counted, not lost silently"
    );
    assert_eq!(info.stats.reclaimed_slots, 2, "their slots came back");
    // The entry is reusable and its pool is whole again: a new guest gets the same id
    // and the host can fill every slot towards it.
    let mut g = ShmGuest::attach_path(seg.path()).unwrap();
    assert_eq!(g.peer_id(), peer);
    // Every class, by falling through from the smallest (`shm.slot.classes`).
    let classes = SegmentConfig::default().classes;
    let slots: u32 = classes.as_slice().iter().map(|c| c.count).sum();
    for n in 0..slots {
        host.try_send(peer, Meta::new(1, u64::from(n)), &[0u8; 100])
            .unwrap();
    }
    assert!(host
        .try_send(peer, Meta::new(1, 99), &[0u8; 100])
        .unwrap_err()
        .is_would_block());
    for _ in 0..slots {
        g.try_recv(&mut buf).unwrap().unwrap();
    }
}
