//! Zero-copy loans and views (`shm.slot.loan`, `shm.slot.view`): payloads written and
//! read in place, slots freed when views drop, across two processes.

use std::time::Duration;

use shm_guest::{AttachOptions, ShmGuest};
use shm_host::{Meta, SegmentConfig, ShmHost, SlotClass, SlotClasses};
use shmhub_tests::{arg, hear, pattern, role, tell, Proc, ShmPath};

const LONG: Duration = Duration::from_secs(20);

fn config() -> SegmentConfig {
    SegmentConfig {
        max_guests: 2,
        classes: SlotClasses::new(&[SlotClass::new(256, 4), SlotClass::new(8192, 2)]),
        ..SegmentConfig::default()
    }
}

/// A plain-old-data header a codec might put at the front of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
#[repr(C)]
struct Frame {
    width: u32,
    height: u32,
    stamp: u64,
}

fn guest_main() {
    let mut guest = ShmGuest::attach_path(arg("SEG")).unwrap();
    tell("attached");
    // Three loans written in place, one per class and one that falls through.
    for (n, len) in [(0u64, 200usize), (1, 5000), (2, 100)] {
        let mut loan = guest.loan(len).unwrap();
        assert!(loan.capacity() >= len);
        assert!(loan.write_at(0, &pattern(1, n, len)));
        let capacity = loan.capacity();
        assert!(!loan.write_at(capacity, b"x"), "past the slot");
        loan.send(Meta::new(1, n), len).unwrap();
    }
    // A dropped loan gives its slot back: the pools are whole again afterwards.
    drop(guest.loan(8000).unwrap());
    let mut loan = guest.loan(64).unwrap();
    let len = loan
        .write_pod(&Frame {
            width: 640,
            height: 480,
            stamp: 99,
        })
        .unwrap();
    loan.send(Meta::new(2, 3), len).unwrap();
    tell("sent");
    // From the host: a POD frame and a pattern, read in place and held together.
    let a = guest.recv_message(LONG).unwrap().unwrap();
    let b = guest.recv_message(LONG).unwrap().unwrap();
    assert!(a.is_zero_copy() && b.is_zero_copy());
    assert_eq!(
        a.read_pod::<Frame>(),
        Some(Frame {
            width: 1,
            height: 2,
            stamp: 3
        })
    );
    // SAFETY: the host never writes a slot it has sent.
    assert_eq!(unsafe { b.as_slice() }, &pattern(2, 7, 3000)[..]);
    drop((a, b));
    // Small payloads come inline, copied out of the descriptor.
    let c = guest.recv_message(LONG).unwrap().unwrap();
    assert!(!c.is_zero_copy());
    assert_eq!(c.to_vec(), b"tiny");
    assert_eq!(hear(), "bye");
}

// shm[verify shm.slot.loan]
// shm[verify shm.slot.view]
// shm[verify shm.slot.classes]
#[test]
fn loans_and_views_move_payloads_in_place_and_free_their_slots() {
    if role().as_deref() == Some("guest") {
        return guest_main();
    }
    let seg = ShmPath::new("zero-copy");
    let mut host = ShmHost::create(seg.path(), config()).unwrap();
    let env = [("SEG", seg.path().display().to_string())];
    let test = "loans_and_views_move_payloads_in_place_and_free_their_slots";
    let mut child = Proc::spawn(test, "guest", &env, Duration::from_secs(60));
    child.expect("attached");
    child.expect("sent");
    let peer = host.attached_peers()[0];
    // Hold all four messages at once: four slots stay claimed meanwhile.
    let mut held = Vec::new();
    while held.len() < 4 {
        if let Some((from, msg)) = host.recv_message(LONG).unwrap() {
            assert_eq!(from.from, peer);
            held.push(msg);
        }
    }
    let usage = host.peer_usage(peer).unwrap();
    assert_eq!(usage.to_host_slots.in_use, 4, "views hold their slots");
    for (n, len) in [(0usize, 200usize), (1, 5000), (2, 100)] {
        let msg = &held[n];
        assert!(msg.is_zero_copy());
        assert_eq!(msg.meta(), Meta::new(1, n as u64));
        assert_eq!(msg.to_vec(), pattern(1, n as u64, len));
        let mut tail = [0u8; 10];
        assert!(msg.copy_to(len - 10, &mut tail));
        assert!(!msg.copy_to(len - 9, &mut tail), "past the payload");
    }
    assert_eq!(held[1].len(), 5000, "5000 bytes fell into the 8 KiB class");
    assert_eq!(
        held[3].read_pod::<Frame>(),
        Some(Frame {
            width: 640,
            height: 480,
            stamp: 99
        })
    );
    assert_eq!(
        held[3].read_pod::<[u64; 4]>(),
        None,
        "longer than the payload"
    );
    // Views may move to another thread; dropping them there frees the slots.
    std::thread::spawn(move || drop(held)).join().unwrap();
    assert_eq!(host.peer_usage(peer).unwrap().to_host_slots.in_use, 0);
    // The other way: the host writes in place.
    let mut loan = host.loan(peer, 100).unwrap();
    let len = loan
        .write_pod(&Frame {
            width: 1,
            height: 2,
            stamp: 3,
        })
        .unwrap();
    loan.send(Meta::new(3, 0), len).unwrap();
    let mut loan = host.loan(peer, 3000).unwrap();
    // SAFETY: the guest never touches a slot the host holds as Loaned.
    let slot = unsafe { loan.as_mut_slice() };
    slot[..3000].copy_from_slice(&pattern(2, 7, 3000));
    loan.send(Meta::new(3, 1), 3000).unwrap();
    // A loan larger than any class is refused before anything is allocated.
    assert!(host.loan(peer, 9000).is_err());
    host.try_send(peer, Meta::new(3, 2), b"tiny").unwrap();
    let deadline = std::time::Instant::now() + LONG;
    while host.peer_usage(peer).unwrap().to_guest_slots.in_use > 0 {
        assert!(std::time::Instant::now() < deadline, "guest never freed");
        host.maintain();
        std::thread::yield_now();
    }
    child.say("bye");
    child.assert_success();
}

/// A view may outlive its guest: the host recycles the entry but keeps the slot the
/// view holds until the view is dropped; then every slot is free.
// shm[verify shm.slot.view]
// shm[verify shm.slot.reclaim]
#[test]
fn a_view_outlives_its_guest_and_its_slot_is_kept_until_dropped() {
    let mut host = ShmHost::create_heap(config()).unwrap();
    let mut guest = ShmGuest::attach_backing(host.backing(), AttachOptions::default()).unwrap();
    let peer = guest.peer_id();
    guest.try_send(Meta::new(1, 1), &[7u8; 300]).unwrap();
    guest.try_send(Meta::new(1, 2), &[8u8; 300]).unwrap();
    let (_, view) = host.try_recv_message().unwrap().unwrap();
    guest.detach();
    // The second message is delivered before the entry is recycled; then it is.
    let mut buf = Vec::new();
    assert_eq!(
        host.try_recv(&mut buf).unwrap().unwrap().meta,
        Meta::new(1, 2)
    );
    assert_eq!(buf, [8u8; 300]);
    assert!(host.try_recv(&mut buf).unwrap().is_none());
    let info = host.peer_info(peer).unwrap();
    assert_eq!(info.stats.recycled, 1);
    assert_eq!(
        host.peer_usage(peer).unwrap().to_host_slots.in_use,
        1,
        "kept"
    );
    // A new guest of the entry gets every slot but the held one: four of 256 bytes,
    // then one of the two 8 KiB slots (300-byte payloads use that class).
    let mut next = ShmGuest::attach_backing(host.backing(), AttachOptions::default()).unwrap();
    assert_eq!(next.peer_id(), peer);
    for n in 0..5 {
        next.try_send(Meta::new(2, n), &[9u8; 200]).unwrap();
    }
    let err = next.try_send(Meta::new(2, 9), &[9u8; 200]).unwrap_err();
    assert!(
        err.is_would_block(),
        "the held slot is not handed out: {err}"
    );
    assert_eq!(view.to_vec(), [7u8; 300], "the held payload is intact");
    drop(view);
    let mut got = 0;
    while host.try_recv(&mut buf).unwrap().is_some() {
        got += 1;
    }
    assert_eq!(got, 5);
    assert_eq!(host.peer_usage(peer).unwrap().to_host_slots.in_use, 0);
    next.try_send(Meta::new(2, 10), &[9u8; 300]).unwrap();
}

/// Exhausted pools: a blocking loan times out when nothing is freed, and waits for
/// the slot the other side frees (both directions), never publishing anything early.
// shm[verify shm.slot.exhausted]
#[test]
fn a_blocking_loan_times_out_or_waits_for_a_freed_slot() {
    let config = SegmentConfig {
        max_guests: 1,
        classes: SlotClasses::single(256, 1),
        ..SegmentConfig::default()
    };
    let mut host = ShmHost::create_heap(config).unwrap();
    let mut guest = ShmGuest::attach_backing(host.backing(), AttachOptions::default()).unwrap();
    let peer = guest.peer_id();
    let short = Duration::from_millis(30);

    // Guest -> host: the only slot is in flight.
    guest.try_send(Meta::new(1, 1), &[1; 100]).unwrap();
    let started = std::time::Instant::now();
    assert!(matches!(
        guest.loan_timeout(100, short),
        Err(shm_guest::SendError::TimedOut)
    ));
    assert!(started.elapsed() >= short, "it waited the whole timeout");
    let (got, host) = std::thread::scope(|s| {
        let reader = s.spawn(move || {
            let mut buf = Vec::new();
            let got = host.recv(&mut buf, LONG).unwrap().unwrap();
            (got.meta, host)
        });
        let mut loan = guest.loan_timeout(100, LONG).expect("the freed slot");
        loan.write_at(0, &[2; 100]);
        loan.send(Meta::new(1, 2), 100).unwrap();
        reader.join().unwrap()
    });
    let mut host = host;
    assert_eq!(got, Meta::new(1, 1));
    let mut buf = Vec::new();
    assert_eq!(
        host.recv(&mut buf, LONG).unwrap().unwrap().meta,
        Meta::new(1, 2)
    );
    assert_eq!(buf, [2; 100]);

    // Host -> guest, the same.
    host.try_send(peer, Meta::new(3, 1), &[3; 100]).unwrap();
    assert!(matches!(
        host.loan_timeout(peer, 100, short),
        Err(shm_host::SendError::TimedOut(p)) if p == peer
    ));
    std::thread::scope(|s| {
        let reader = s.spawn(|| {
            let mut buf = Vec::new();
            guest.recv(&mut buf, LONG).unwrap().unwrap()
        });
        let mut loan = host.loan_timeout(peer, 100, LONG).expect("the freed slot");
        loan.write_at(0, &[4; 100]);
        loan.send(Meta::new(3, 2), 100).unwrap();
        assert_eq!(reader.join().unwrap(), Meta::new(3, 1));
    });
    assert_eq!(
        guest.recv(&mut buf, LONG).unwrap().unwrap(),
        Meta::new(3, 2)
    );
    assert_eq!(buf, [4; 100]);
}
