//! Table capacity and churn: 255 guests at once, and 10,000 attach/detach cycles.

use std::sync::{Arc, Barrier};
use std::time::Duration;

use shm_guest::{AttachError, ShmGuest};
use shm_host::{Meta, PeerId, PeerState, SegmentConfig, ShmHost, SlotClasses};
use shmhub_tests::{arg, poll_until, role, tell, Proc, ShmPath};

const SMALL: SegmentConfig = SegmentConfig {
    max_guests: 255,
    ring_capacity: 4,
    classes: SlotClasses::single(64, 1),
    broadcast_slots: 0,
    broadcast_slot_size: 0,
};
const PROCESSES: usize = 8;

/// One guest: attach by path, say hello with its id, wait for the host's echo.
fn hello_guest(path: &str) -> PeerId {
    let mut guest = ShmGuest::attach_path(path).unwrap();
    let id = guest.peer_id();
    guest
        .try_send(Meta::new(1, u64::from(id.get())), &[id.get(); 50])
        .unwrap();
    let mut buf = Vec::new();
    let meta = poll_until(Duration::from_secs(60), "echo", || {
        guest.try_recv(&mut buf).unwrap()
    });
    assert_eq!(meta, Meta::new(2, u64::from(id.get())));
    assert_eq!(buf, vec![id.get(); 50]);
    guest.detach();
    id
}

// shm[verify shm.topology.max-guests]
#[test]
fn two_hundred_fifty_five_guests_attached_at_once() {
    if role().as_deref() == Some("guest") {
        hello_guest(&arg("SEG"));
        tell("ok");
        return;
    }
    let seg = ShmPath::new("255");
    let mut host = ShmHost::create(seg.path(), SMALL).unwrap();
    let path = seg.path().display().to_string();
    let mut procs: Vec<Proc> = (0..PROCESSES)
        .map(|_| {
            Proc::spawn(
                "two_hundred_fifty_five_guests_attached_at_once",
                "guest",
                &[("SEG", path.clone())],
                Duration::from_secs(120),
            )
        })
        .collect();
    let threads = 255 - PROCESSES;
    let start = Arc::new(Barrier::new(threads));
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let (path, start) = (path.clone(), start.clone());
            std::thread::spawn(move || {
                start.wait();
                hello_guest(&path)
            })
        })
        .collect();
    // Every guest says hello before any gets its echo, so all 255 are attached now.
    let mut seen = std::collections::HashSet::new();
    let mut buf = Vec::new();
    while seen.len() < 255 {
        let msg = poll_until(Duration::from_secs(60), "hello", || {
            host.try_recv(&mut buf).unwrap()
        });
        assert_eq!(msg.meta.user_id, u64::from(msg.from.get()));
        assert!(seen.insert(msg.from), "one hello per guest");
    }
    assert_eq!(host.attached_peers().len(), 255);
    // The table is full: neither a path attach nor a reservation finds an entry.
    assert!(matches!(
        ShmGuest::attach_path(seg.path()),
        Err(AttachError::TableFull)
    ));
    assert!(host.reserve_peer().is_err());
    for id in seen {
        host.try_send(id, Meta::new(2, u64::from(id.get())), &[id.get(); 50])
            .unwrap();
    }
    let mut ids: Vec<PeerId> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    for p in &mut procs {
        p.expect("ok");
        p.assert_success();
    }
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), threads);
    poll_until(Duration::from_secs(30), "all recycled", || {
        host.maintain();
        host.attached_peers().is_empty().then_some(())
    });
}

// shm[verify shm.peer.detach]
// shm[verify shm.peer.recycle]
#[test]
fn ten_thousand_attach_detach_cycles_leave_the_table_empty() {
    const CYCLES: u64 = 10_000;
    if role().as_deref() == Some("churn") {
        let path = arg("SEG");
        for i in 0..CYCLES {
            // Entries come back once the host recycles them; retry while all are
            // Goodbye.
            let mut guest =
                poll_until(
                    Duration::from_secs(30),
                    "a free entry",
                    || match ShmGuest::attach_path(&path) {
                        Ok(g) => Some(g),
                        Err(AttachError::TableFull) => None,
                        Err(e) => panic!("attach {i}: {e}"),
                    },
                );
            // Leave something behind on every tenth cycle: a slot in flight to the host
            // would be delivered; here the guest leaves host->guest messages unread.
            if i % 10 == 0 {
                guest.try_send(Meta::new(9, i), &[1u8; 40]).unwrap();
            }
            guest.detach();
        }
        tell("done");
        return;
    }
    let seg = ShmPath::new("churn");
    let config = SegmentConfig {
        max_guests: 4,
        ring_capacity: 4,
        classes: SlotClasses::single(64, 2),
        broadcast_slots: 0,
        broadcast_slot_size: 0,
    };
    let mut host = ShmHost::create(seg.path(), config).unwrap();
    let mut child = Proc::spawn(
        "ten_thousand_attach_detach_cycles_leave_the_table_empty",
        "churn",
        &[("SEG", seg.path().display().to_string())],
        Duration::from_secs(300),
    );
    let mut buf = Vec::new();
    let mut received = 0;
    loop {
        while let Some(msg) = host.try_recv(&mut buf).unwrap() {
            assert_eq!(msg.meta.msg_type, 9);
            received += 1;
        }
        host.maintain();
        if let Some(line) = child.poll_line(Duration::from_millis(0)) {
            assert_eq!(line, "done");
            break;
        }
    }
    child.assert_success();
    while host.try_recv(&mut buf).unwrap().is_some() {
        received += 1;
    }
    host.maintain();
    assert_eq!(
        received,
        CYCLES / 10,
        "messages sent before detach are delivered"
    );
    let mut recycled = 0;
    for i in 1..=4 {
        let info = host.peer_info(PeerId::new(i).unwrap()).unwrap();
        assert_eq!(info.state, Some(PeerState::Empty), "entry {i}");
        assert_eq!(u64::from(info.generation), info.stats.recycled);
        recycled += info.stats.recycled;
    }
    assert_eq!(recycled, CYCLES);
}
