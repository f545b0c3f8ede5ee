//! In-process tests on the heap backing.

use shm_guest::{AttachOptions, ShmGuest};

use super::*;

fn heap_host(max_guests: u32) -> ShmHost {
    ShmHost::create_heap(SegmentConfig {
        max_guests,
        ..SegmentConfig::default()
    })
    .unwrap()
}

fn local_guest(host: &ShmHost) -> ShmGuest {
    ShmGuest::attach_backing(host.backing(), AttachOptions::default()).unwrap()
}

// shm[verify shm.host.fair-recv]
#[test]
fn receive_is_round_robin_across_guests() {
    let mut host = heap_host(4);
    let mut guests: Vec<ShmGuest> = (0..3).map(|_| local_guest(&host)).collect();
    // Guest 1 floods; the others send a few. Service must still alternate.
    for (i, g) in guests.iter_mut().enumerate() {
        let count = if i == 0 { 20 } else { 3 };
        for n in 0..count {
            g.try_send(Meta::new(0, n), b"m").unwrap();
        }
    }
    let mut buf = Vec::new();
    let order: Vec<u8> = std::iter::from_fn(|| host.try_recv(&mut buf).unwrap())
        .map(|m| m.from.get())
        .collect();
    assert_eq!(order.len(), 26);
    assert_eq!(&order[..9], &[1, 2, 3, 1, 2, 3, 1, 2, 3]);
    assert!(order[9..].iter().all(|&p| p == 1));
}

#[test]
fn in_process_guest_on_a_heap_segment() {
    let mut host = heap_host(2);
    assert!(host.path().is_none());
    let mut g = local_guest(&host);
    g.try_send(Meta::new(4, 5), &[3u8; 1000]).unwrap();
    let mut buf = Vec::new();
    let m = host.try_recv(&mut buf).unwrap().unwrap();
    assert_eq!((m.from, m.meta), (g.peer_id(), Meta::new(4, 5)));
    assert_eq!(buf, vec![3u8; 1000]);
    host.try_send(g.peer_id(), Meta::new(6, 7), b"back")
        .unwrap();
    assert_eq!(g.try_recv(&mut buf).unwrap(), Some(Meta::new(6, 7)));
    assert_eq!(buf, b"back");
    assert!(matches!(
        host.try_send(
            g.peer_id(),
            Meta::default(),
            &vec![0; host.max_payload() + 1]
        ),
        Err(SendError::TooLarge { .. })
    ));
}

// shm[verify shm.peer.release-reservation]
// shm[verify shm.host.peer-state]
#[test]
fn reservations_can_be_released_and_states_queried() {
    let mut host = heap_host(2);
    let a = host.reserve_peer().unwrap();
    let b = host.reserve_peer().unwrap();
    assert_eq!(host.reserve_peer(), Err(PeerError::TableFull));
    let info = host.peer_info(a).unwrap();
    assert_eq!(
        (info.state, info.generation, info.pid),
        (Some(PeerState::Reserved), 0, 0)
    );
    host.release_reservation(a).unwrap();
    let info = host.peer_info(a).unwrap();
    assert_eq!((info.state, info.generation), (Some(PeerState::Empty), 1));
    assert!(matches!(
        host.release_reservation(a),
        Err(PeerError::WrongState { .. })
    ));
    // A guest claims b by id; its pid shows up.
    let g = ShmGuest::attach_backing(
        host.backing(),
        AttachOptions {
            peer_id: Some(b),
            ..AttachOptions::default()
        },
    )
    .unwrap();
    let info = host.peer_info(b).unwrap();
    assert_eq!(info.state, Some(PeerState::Attached));
    assert_eq!(info.pid, std::process::id());
    assert!(matches!(
        host.release_reservation(b),
        Err(PeerError::WrongState { .. })
    ));
    assert!(matches!(
        host.try_send(a, Meta::default(), b""),
        Err(SendError::NotAttached {
            state: PeerState::Empty,
            ..
        })
    ));
    let far = PeerId::new(9).unwrap();
    assert!(host.peer_info(far).is_none());
    assert!(matches!(
        host.try_send(far, Meta::default(), b""),
        Err(SendError::NoSuchPeer(_))
    ));
    drop(g);
    assert_eq!(host.maintain(), 1);
    assert_eq!(host.peer_info(b).unwrap().state, Some(PeerState::Empty));
}

// Found by the host_recv fuzz target: a guest that sent a large payload and said
// goodbye before the host accepted its doorbell connection was fenced (its file's
// doorbell was refused as not Attached) and the message lost.
// shm[verify shm.doorbell.connect]
// shm[verify shm.delivery.to-host]
#[test]
fn large_payload_of_a_guest_that_left_before_its_doorbell_was_accepted_arrives() {
    let mut host = ShmHost::create_heap(SegmentConfig::default().with_slots(64, 1)).unwrap();
    let mut g = local_guest(&host);
    let payload: Vec<u8> = (0..768u32).map(|i| i as u8).collect();
    g.try_send(Meta::new(1, 2), &payload).unwrap();
    let from = g.peer_id();
    g.detach();
    let mut buf = Vec::new();
    let m = host.try_recv(&mut buf).unwrap().unwrap();
    assert_eq!((m.from, m.meta), (from, Meta::new(1, 2)));
    assert_eq!(buf, payload);
    assert_eq!(host.try_recv(&mut buf).unwrap(), None);
    assert_eq!(host.peer_info(from).unwrap().state, Some(PeerState::Empty));
}

// Found by the host_recv fuzz target: with at-least-once delivery, a guest that left
// a ToGuest `head` a little past u64::MAX behind the host's tail (inside the window
// `shm.ring.validate` accepts, across the wrap) made the host's retention subtract
// without wrapping: a panic (overflow) instead of giving the messages up.
// shm[verify shm.delivery.at-least-once]
// shm[verify shm.untrusted.validate]
#[test]
fn retention_survives_a_consumer_counter_behind_the_wrap() {
    let mut host = heap_host(1);
    host.set_delivery(Delivery::AtLeastOnce);
    let g = local_guest(&host);
    let id = g.peer_id();
    let head_at = host
        .segment
        .layout()
        .ring_offset(id.index(), Direction::ToGuest)
        + 64;
    let backing = host.backing();
    let head = backing.region().atomic_u64(head_at as usize).unwrap();
    host.try_send(id, Meta::new(1, 1), b"kept").unwrap();
    // Tail 1, head u64::MAX: "two pending", at positions u64::MAX and 0.
    head.store(u64::MAX, std::sync::atomic::Ordering::Relaxed);
    g.detach();
    let mut buf = Vec::new();
    assert_eq!(host.try_recv(&mut buf).unwrap(), None);
    // The forged positions hold no descriptor of theirs: nothing is retained.
    let info = host.peer_info(id).unwrap();
    assert_eq!(info.state, Some(PeerState::Empty));
    assert_eq!(info.stats.retained, 0);
}
