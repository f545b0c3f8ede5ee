//! Payloads above the largest slot class (`shm.msg.large`): sealed memory files passed
//! on the doorbell, across two processes, in both directions, with every byte
//! compared and no descriptor or file left behind.

use std::time::{Duration, Instant};

use shm_guest::ShmGuest;
use shm_host::{Meta, SegmentConfig, ShmHost};
use shmhub_tests::{arg, hear, open_fds, our_shm_files, role, tell, Proc, ShmPath};

const LONG: Duration = Duration::from_secs(30);
const MIB: usize = 1024 * 1024;

/// A deterministic payload, filled eight bytes at a time (64 MiB byte by byte is slow
/// in a debug build).
fn big(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

fn guest_main() {
    let fds_before = open_fds();
    // Attached by path: the host may not have accepted our doorbell connection yet
    // when the first file travels on it.
    let mut guest = ShmGuest::attach_path(arg("SEG")).unwrap();
    let max_slot = guest.max_slot_payload();
    // 64 MiB, then one byte over the largest slot, then a small one: in order.
    guest
        .send(Meta::new(1, 0), &big(1, 64 * MIB), LONG)
        .unwrap();
    guest
        .send(Meta::new(1, 1), &big(2, max_slot + 1), LONG)
        .unwrap();
    guest
        .send(Meta::new(1, 2), b"after the large ones", LONG)
        .unwrap();
    tell("sent");
    // 64 MiB from the host, read in place from a write-sealed file.
    let msg = guest.recv_message(LONG).unwrap().unwrap();
    assert_eq!(msg.meta(), Meta::new(2, 0));
    assert!(msg.is_zero_copy());
    assert_eq!(msg.len(), 64 * MIB);
    let sealed = msg
        .sealed_slice()
        .expect("the host sealed it against writes");
    assert!(
        sealed == big(3, 64 * MIB).as_slice(),
        "64 MiB from the host"
    );
    drop(msg);
    // And one through the copying receive.
    let mut buf = Vec::new();
    let meta = guest.recv(&mut buf, LONG).unwrap().unwrap();
    assert_eq!(meta, Meta::new(2, 1));
    assert!(buf == big(4, 3 * MIB), "3 MiB copied out");
    guest.detach();
    assert_eq!(open_fds(), fds_before, "the guest leaks no descriptor");
    tell("clean");
    assert_eq!(hear(), "bye");
}

// shm[verify shm.msg.large]
#[test]
fn large_payloads_travel_in_sealed_files_both_ways_and_leave_nothing() {
    if role().as_deref() == Some("guest") {
        return guest_main();
    }
    let fds_before = open_fds();
    let seg = ShmPath::new("large");
    let config = SegmentConfig {
        max_guests: 2,
        ..SegmentConfig::default()
    };
    let mut host = ShmHost::create(seg.path(), config).unwrap();
    let max_slot = host.max_slot_payload();
    assert!(host.max_payload() >= 64 * MIB);
    let env = [("SEG", seg.path().display().to_string())];
    let test = "large_payloads_travel_in_sealed_files_both_ways_and_leave_nothing";
    let mut child = Proc::spawn(test, "guest", &env, Duration::from_secs(120));
    child.expect("sent");

    let (from, msg) = host.recv_message(LONG).unwrap().unwrap();
    assert_eq!(msg.meta(), Meta::new(1, 0));
    assert!(msg.is_zero_copy());
    assert!(msg.sealed_slice().unwrap() == big(1, 64 * MIB).as_slice());
    let mut tail = [0u8; 16];
    assert!(msg.copy_to(64 * MIB - 16, &mut tail));
    assert!(!msg.copy_to(64 * MIB - 15, &mut tail), "past the payload");
    drop(msg);
    let mut buf = Vec::new();
    let got = host.recv(&mut buf, LONG).unwrap().unwrap();
    assert_eq!(got.meta, Meta::new(1, 1));
    assert!(buf == big(2, max_slot + 1));
    let got = host.recv(&mut buf, LONG).unwrap().unwrap();
    assert_eq!(got.meta, Meta::new(1, 2));
    assert_eq!(buf, b"after the large ones");

    host.send(from.handle(), Meta::new(2, 0), &big(3, 64 * MIB), LONG)
        .unwrap();
    host.send(from.handle(), Meta::new(2, 1), &big(4, 3 * MIB), LONG)
        .unwrap();
    child.expect("clean");
    child.say("bye");
    child.assert_success();
    // The slot pools were never touched by the large payloads.
    let usage = host.peer_usage(from.from).unwrap();
    assert_eq!(usage.to_guest_slots.in_use + usage.to_host_slots.in_use, 0);
    drop(host);
    drop(seg);
    // The child's stdout pipe is closed by the thread that reads it once that thread
    // has seen the end of the stream: maybe a moment after the child was reaped.
    let settled = Instant::now() + LONG;
    while open_fds() != fds_before && Instant::now() < settled {
        std::thread::yield_now();
    }
    assert_eq!(open_fds(), fds_before, "the host leaks no descriptor");
    assert!(our_shm_files().is_empty(), "no file in /dev/shm");
}

/// Larger than the large-payload limit: refused before anything is created.
#[test]
fn a_payload_over_the_limit_is_too_large_and_nothing_is_sent() {
    let mut host = ShmHost::create_heap(SegmentConfig::default()).unwrap();
    let mut guest =
        ShmGuest::attach_backing(host.backing(), shm_guest::AttachOptions::default()).unwrap();
    let over = host.max_payload() + 1;
    // calloc'd: the pages are never touched.
    let payload = vec![0u8; over];
    assert!(matches!(
        guest.try_send(Meta::new(1, 1), &payload),
        Err(shm_guest::SendError::TooLarge { len, max }) if len == over && max == over - 1
    ));
    let peer = guest.peer_id();
    assert!(matches!(
        host.try_send(peer, Meta::new(1, 1), &payload),
        Err(shm_host::SendError::TooLarge { .. })
    ));
    let mut buf = Vec::new();
    assert!(host.try_recv(&mut buf).unwrap().is_none());
    assert!(guest.try_recv(&mut buf).unwrap().is_none());
}
