//! At-least-once delivery (`shm.delivery.at-least-once`): messages the host queued
//! for a guest that died or left without consuming them are kept, in order, for the
//! next guest that attaches with the same peer id.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use shm_guest::{AttachOptions, ShmGuest};
use shm_host::{Death, Delivery, Meta, PeerState, SegmentConfig, ShmHost};
use shmhub_tests::{pattern, poll_until, role, role_command, watchdog, ShmPath};

const LONG: Duration = Duration::from_secs(20);
const TEST: &str = "queued_messages_survive_a_sigkill_and_reach_the_restarted_guest";
/// Payload sizes of messages 0..10: inline, each slot class, and one large payload
/// (above the 128 KiB class).
const SIZES: [usize; 10] = [8, 200, 2000, 20_000, 30, 300_000, 1000, 16, 5000, 10_000];
const READY: u32 = 1;
const HOLDING: u32 = 2;
const GOT_ALL: u32 = 3;
const DONE: u32 = 4;
const DATA: u32 = 9;

/// The first guest: consumes messages 0..3 (a copy, a dropped view, a held view),
/// says so, and parks until it is killed.
fn first_guest() {
    watchdog();
    let mut guest = ShmGuest::from_env().unwrap();
    guest.send(Meta::new(READY, 0), b"", LONG).unwrap();
    let mut buf = Vec::new();
    let meta = guest.recv(&mut buf, LONG).unwrap().unwrap();
    assert_eq!((meta.user_id, buf.len()), (0, SIZES[0]));
    let dropped = guest.recv_message(LONG).unwrap().unwrap();
    assert_eq!(dropped.meta().user_id, 1);
    drop(dropped);
    let held = guest.recv_message(LONG).unwrap().unwrap();
    assert_eq!(held.meta().user_id, 2);
    guest.send(Meta::new(HOLDING, 0), b"", LONG).unwrap();
    // Holds the view (and leaves messages 3..10 unread) until the host's SIGKILL;
    // the watchdog bounds the wait.
    let _keep = (guest, held);
    loop {
        std::thread::park();
    }
}

/// The restarted guest: gets messages 3..10 in order, byte for byte, then one newer.
fn second_guest() {
    watchdog();
    let mut guest = ShmGuest::from_env().unwrap();
    for n in 3..10u64 {
        let msg = guest
            .recv_message(LONG)
            .unwrap()
            .expect("a retained message");
        assert_eq!(msg.meta(), Meta::new(DATA, n), "in order");
        assert_eq!(
            msg.to_vec(),
            pattern(7, n, SIZES[n as usize]),
            "message {n}"
        );
    }
    assert!(guest.try_recv_message().unwrap().is_none(), "nothing twice");
    guest.send(Meta::new(GOT_ALL, 0), b"", LONG).unwrap();
    let newer = guest.recv_message(LONG).unwrap().unwrap();
    assert_eq!(newer.meta(), Meta::new(DATA, 10));
    drop(newer);
    guest.send(Meta::new(DONE, 0), b"", LONG).unwrap();
    guest.detach();
}

fn expect(host: &mut ShmHost, msg_type: u32) -> shm_host::Received {
    let mut buf = Vec::new();
    let got = host
        .recv(&mut buf, LONG)
        .unwrap()
        .expect("a message in time");
    assert_eq!(got.meta.msg_type, msg_type);
    got
}

// shm[verify shm.delivery.at-least-once]
// shm[verify shm.msg.large]
#[test]
fn queued_messages_survive_a_sigkill_and_reach_the_restarted_guest() {
    match role().as_deref() {
        Some("first") => return first_guest(),
        Some("second") => return second_guest(),
        _ => {}
    }
    let seg = ShmPath::new("at-least-once");
    let config = SegmentConfig {
        max_guests: 2,
        ..SegmentConfig::default()
    };
    let mut host = ShmHost::create(seg.path(), config).unwrap();
    host.set_delivery(Delivery::AtLeastOnce);
    let deaths: Arc<Mutex<Vec<Death>>> = Arc::default();
    let log = Arc::clone(&deaths);
    host.on_death(move |d| log.lock().unwrap().push(*d));

    let first = host
        .spawn(&mut role_command(TEST, "first", &[], LONG))
        .unwrap();
    let peer = first.handle.id;
    expect(&mut host, READY);
    for (n, &len) in SIZES.iter().enumerate() {
        let payload = pattern(7, n as u64, len);
        host.try_send(first.handle, Meta::new(DATA, n as u64), &payload)
            .unwrap();
    }
    expect(&mut host, HOLDING);
    host.signal_guest(first.handle, libc::SIGKILL).unwrap();
    let death = poll_until(LONG, "the death", || {
        host.maintain();
        deaths.lock().unwrap().first().copied()
    });
    assert_eq!(death.generation, first.handle.generation);
    assert_eq!(death.retained, 7, "messages 3..10 are kept");
    assert_eq!(death.discarded, 0, "none is discarded");
    // The slots of the consumed messages came back (the held view's too); the seven
    // undelivered ones that use slots stay Sent.
    let usage = host.peer_usage(peer).unwrap();
    assert_eq!(
        usage.to_guest_slots.in_use, 4,
        "slots of messages 3, 6, 8 and 9"
    );
    let info = host.peer_info(peer).unwrap();
    assert_eq!(
        info.state,
        Some(PeerState::Reserved),
        "kept for the same id"
    );
    assert_eq!(info.stats.retained, 7);
    assert!(host.try_send(peer, Meta::new(DATA, 99), b"x").is_err());

    let second = host
        .spawn_for(peer, &mut role_command(TEST, "second", &[], LONG))
        .unwrap();
    assert_eq!(second.handle.id, peer);
    assert_eq!(second.handle.generation, first.handle.generation + 1);
    expect(&mut host, GOT_ALL);
    host.send(
        second.handle,
        Meta::new(DATA, 10),
        &pattern(7, 10, 3000),
        LONG,
    )
    .unwrap();
    expect(&mut host, DONE);
    // The second guest detached having consumed everything: the entry is recycled.
    poll_until(LONG, "the recycle", || {
        host.maintain();
        let state = host.peer_info(peer).unwrap().state;
        (state == Some(PeerState::Empty)).then_some(())
    });
    let usage = host.peer_usage(peer).unwrap();
    assert_eq!(usage.to_guest_slots.in_use, 0, "every slot is free");
    assert_eq!(host.peer_info(peer).unwrap().stats.discarded, 0);
}

/// A guest that detaches with messages unread, and comes back by path with its id:
/// the retained files of large payloads are passed again on its new doorbell.
// shm[verify shm.delivery.at-least-once]
#[test]
fn a_guest_that_detaches_and_returns_by_path_gets_what_it_left() {
    let seg = ShmPath::new("return-by-path");
    let config = SegmentConfig {
        max_guests: 2,
        ..SegmentConfig::default()
    };
    let mut host = ShmHost::create(seg.path(), config).unwrap();
    host.set_delivery(Delivery::AtLeastOnce);
    let mut guest = ShmGuest::attach_path(seg.path()).unwrap();
    let peer = guest.peer_id();
    host.maintain(); // links the guest's doorbell
    let sizes = [5000usize, 200_000, 20];
    for (n, &len) in sizes.iter().enumerate() {
        host.try_send(peer, Meta::new(DATA, n as u64), &pattern(3, n as u64, len))
            .unwrap();
    }
    // A broadcast the guest never reads: its hold is kept with the message.
    host.broadcast(Meta::new(DATA, 7), &[5u8; 3000]).unwrap();
    let first = guest.recv_message(LONG).unwrap().unwrap();
    assert_eq!(first.meta().user_id, 0);
    drop(first);
    guest.detach();
    host.maintain();
    let info = host.peer_info(peer).unwrap();
    assert_eq!(info.state, Some(PeerState::Reserved));
    assert_eq!(info.stats.retained, 3);
    assert_eq!(
        host.broadcast_usage().unwrap().in_use,
        1,
        "the broadcast is kept"
    );
    // Anyone attaching by path takes another entry; only the id gets this one.
    let stranger = ShmGuest::attach_path(seg.path()).unwrap();
    assert_ne!(stranger.peer_id(), peer);
    let options = AttachOptions {
        peer_id: Some(peer),
        ..AttachOptions::default()
    };
    let mut back = ShmGuest::attach_path_with(seg.path(), options).unwrap();
    host.maintain(); // links the new doorbell and passes the kept file again
    for n in 1..3u64 {
        let msg = back.recv_message(LONG).unwrap().unwrap();
        assert_eq!(msg.meta(), Meta::new(DATA, n));
        assert_eq!(msg.to_vec(), pattern(3, n, sizes[n as usize]));
    }
    let shared = back.recv_message(LONG).unwrap().unwrap();
    assert_eq!(
        (shared.meta(), shared.to_vec()),
        (Meta::new(DATA, 7), vec![5u8; 3000])
    );
    drop(shared);
    assert_eq!(
        host.broadcast_usage().unwrap().in_use,
        0,
        "released by the reader"
    );
    assert!(back.try_recv_message().unwrap().is_none());
    // Without at-least-once, what a departing guest left is discarded and counted.
    host.set_delivery(Delivery::AtMostOnce);
    host.try_send(peer, Meta::new(DATA, 3), &pattern(3, 3, 900))
        .unwrap();
    back.detach();
    host.maintain();
    let info = host.peer_info(peer).unwrap();
    assert_eq!(info.state, Some(PeerState::Empty));
    assert_eq!(info.stats.discarded, 1);
    drop(stranger);
}
