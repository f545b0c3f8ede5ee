//! A guest that writes garbage into its rings, descriptors and peer entry is fenced
//! with a typed error; the host and the other guests carry on.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use shm_guest::{
    DetachedError, RecvError as GuestRecvError, SendError as GuestSendError, ShmGuest,
};
use shm_host::{
    Direction, Meta, PeerId, PeerState, SegmentConfig, SendError, ShmHost, SlotClasses, Violation,
};
use shm_primitives::desc::{Body, Descriptor};
use shm_primitives::{MmapRegion, Segment, ShmBacking};
use shmhub_tests::{arg, hear, pattern, poll_until, role, tell, Proc, ShmPath};

const CONFIG: SegmentConfig = SegmentConfig {
    max_guests: 16,
    ring_capacity: 8,
    classes: SlotClasses::single(256, 4),
    broadcast_slots: 0,
    broadcast_slot_size: 0,
};

/// Each way to break the protocol, and the violation the host must report.
const MODES: [&str; 13] = [
    "tail-too-far",
    "bad-seq",
    "bad-kind",
    "inline-too-long",
    "slot-index",
    "slot-state",
    "peer-word",
    "head-garbage",
    "slot-class",
    "msg-kind",
    "peer-empty",
    "peer-reserved",
    "peer-generation",
];

fn expected(mode: &str, v: &Violation) -> bool {
    match mode {
        "tail-too-far" | "head-garbage" => matches!(v, Violation::RingIndex { .. }),
        "bad-seq" => matches!(
            v,
            Violation::DescSequence {
                expected: 0,
                found: 77
            }
        ),
        "bad-kind" => matches!(v, Violation::DescKind { kind: 9 }),
        "inline-too-long" => matches!(v, Violation::InlineLen { len: 100, .. }),
        "slot-index" => matches!(
            v,
            Violation::SlotIndex {
                index: 1_000_000,
                ..
            }
        ),
        "slot-state" => matches!(
            v,
            Violation::SlotState {
                index: 0,
                generation: 5,
                ..
            }
        ),
        "peer-word" => matches!(v, Violation::PeerWord { raw: 0xdead_0007 }),
        "slot-class" => matches!(
            v,
            Violation::SlotClass {
                class: 9,
                classes: 1
            }
        ),
        "msg-kind" => matches!(v, Violation::DescFlags { flags: 0x77 }),
        // Valid states the guest may not move to (`shm.peer.observed`).
        "peer-empty" => {
            matches!(v, Violation::PeerTransition { generation, found } if *found == u64::from(*generation) << 32)
        }
        "peer-reserved" => {
            matches!(v, Violation::PeerTransition { generation, found } if *found == (u64::from(*generation) << 32) | 1)
        }
        "peer-generation" => {
            matches!(v, Violation::PeerTransition { generation, found } if *found == (u64::from(generation + 7) << 32) | 2)
        }
        _ => false,
    }
}

/// Writes raw words where a hostile guest can: its own ring, descriptors and entry.
fn scribble(seg: &Segment, id: PeerId, mode: &str) {
    let region = seg.backing().region();
    let layout = seg.layout();
    let word = |off: u64| region.atomic_u64(off as usize).unwrap();
    let to_host = layout.ring_offset(id.index(), Direction::ToHost);
    let desc0 = to_host + 128;
    let put_desc = |d: Descriptor, kind_override: Option<u8>| {
        let mut words = d.encode();
        if let Some(k) = kind_override {
            words[3] = (words[3] & !0xff) | u64::from(k);
        }
        for (i, w) in words.iter().enumerate() {
            word(desc0 + 8 * i as u64).store(*w, Ordering::Relaxed);
        }
        word(to_host).store(1, Ordering::Release); // tail = 1
    };
    let inline = |len| Descriptor {
        seq: 0,
        meta: Meta::new(1, 1),
        payload_len: len,
        body: Body::Inline([0; 36]),
    };
    let slot = |index, generation| Descriptor {
        body: Body::Slot {
            class: 0,
            index,
            generation,
        },
        payload_len: 10,
        ..inline(0)
    };
    match mode {
        "tail-too-far" => word(to_host).store(CONFIG.ring_capacity as u64 + 5, Ordering::Release),
        "bad-seq" => put_desc(
            Descriptor {
                seq: 77,
                ..inline(3)
            },
            None,
        ),
        "bad-kind" => put_desc(inline(3), Some(9)),
        "inline-too-long" => put_desc(inline(100), None),
        "slot-index" => put_desc(slot(1_000_000, 1), None),
        "slot-state" => put_desc(slot(0, 5), None),
        "slot-class" => put_desc(
            Descriptor {
                body: Body::Slot {
                    class: 9,
                    index: 0,
                    generation: 1,
                },
                ..slot(0, 1)
            },
            None,
        ),
        "msg-kind" => {
            let mut words = inline(3).encode();
            words[3] |= 0x77 << 16; // msg_kind is byte 26
            for (i, w) in words.iter().enumerate() {
                word(desc0 + 8 * i as u64).store(*w, Ordering::Relaxed);
            }
            word(to_host).store(1, Ordering::Release);
        }
        "peer-word" => word(layout.peer_offset(id.index())).store(0xdead_0007, Ordering::Release),
        "peer-empty" | "peer-reserved" | "peer-generation" => {
            let entry = word(layout.peer_offset(id.index()));
            let g = entry.load(Ordering::Acquire) >> 32;
            let to = match mode {
                "peer-empty" => g << 32,
                "peer-reserved" => (g << 32) | 1,
                _ => ((g + 7) << 32) | 2,
            };
            entry.store(to, Ordering::Release);
        }
        "head-garbage" => {
            let to_guest = layout.ring_offset(id.index(), Direction::ToGuest);
            word(to_guest + 64).store(1 << 40, Ordering::Release);
        }
        _ => unreachable!(),
    }
}

fn hostile_main() {
    let path = arg("SEG");
    let guests: Vec<ShmGuest> = MODES
        .iter()
        .map(|_| ShmGuest::attach_path(&path).unwrap())
        .collect();
    // The host must have seen us attached before we rewrite our words: a word
    // rewritten before the host ever looked is indistinguishable from one never
    // claimed.
    tell("attached");
    assert_eq!(hear(), "go");
    // A second, raw mapping of the same file: what a hostile process would use.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let len = file.metadata().unwrap().len() as usize;
    let seg = Segment::attach(ShmBacking::Mmap(Arc::new(
        MmapRegion::map(file, len).unwrap(),
    )))
    .unwrap();
    for (g, mode) in guests.iter().zip(MODES) {
        scribble(&seg, g.peer_id(), mode);
        tell(&format!("scribbled {} {mode}", g.peer_id().get()));
    }
    tell("all");
    assert_eq!(hear(), "check");
    for (mut g, mode) in guests.into_iter().zip(MODES) {
        let err = g.try_send(Meta::new(1, 1), b"x").unwrap_err();
        assert!(
            matches!(err, GuestSendError::Detached(DetachedError::Fenced { fault }) if fault != 0),
            "{mode}: {err}"
        );
        let mut buf = Vec::new();
        assert!(matches!(
            g.try_recv(&mut buf),
            Err(GuestRecvError::Detached(DetachedError::Fenced { .. }))
        ));
    }
    tell("fenced");
}

fn honest_main() {
    let mut guest = ShmGuest::attach_path(arg("SEG")).unwrap();
    tell("attached");
    let mut buf = Vec::new();
    for n in 0..300u64 {
        let payload = pattern(5, n, (n as usize * 13) % 256);
        poll_until(Duration::from_secs(30), "send", || {
            match guest.try_send(Meta::new(7, n), &payload) {
                Ok(()) => Some(()),
                Err(e) if e.is_would_block() => None,
                Err(e) => panic!("honest guest got {e}"),
            }
        });
        let meta = poll_until(Duration::from_secs(30), "echo", || {
            guest.try_recv(&mut buf).unwrap()
        });
        assert_eq!(meta, Meta::new(8, n));
        assert_eq!(buf, payload);
    }
    tell("done");
}

// shm[verify shm.untrusted.validate]
// shm[verify shm.untrusted.fence]
// shm[verify shm.ring.validate]
// shm[verify shm.peer.states]
// shm[verify shm.peer.observed]
#[test]
fn hostile_guests_are_fenced_and_everyone_else_carries_on() {
    match role().as_deref() {
        Some("hostile") => return hostile_main(),
        Some("honest") => return honest_main(),
        _ => {}
    }
    let seg = ShmPath::new("hostile");
    let mut host = ShmHost::create(seg.path(), CONFIG).unwrap();
    let env = [("SEG", seg.path().display().to_string())];
    let test = "hostile_guests_are_fenced_and_everyone_else_carries_on";
    let mut honest = Proc::spawn(test, "honest", &env, Duration::from_secs(120));
    honest.expect("attached");
    let mut hostile = Proc::spawn(test, "hostile", &env, Duration::from_secs(120));
    hostile.expect("attached");
    host.maintain();
    hostile.say("go");
    let mut modes: HashMap<PeerId, &str> = HashMap::new();
    loop {
        let line = hostile.expect_line();
        if line == "all" {
            break;
        }
        let mut it = line.strip_prefix("scribbled ").unwrap().split(' ');
        let id = PeerId::new(it.next().unwrap().parse().unwrap()).unwrap();
        let mode = it.next().unwrap();
        modes.insert(id, MODES.iter().find(|m| **m == mode).unwrap());
    }
    let mut fenced: HashMap<PeerId, Violation> = HashMap::new();
    let mut echoed = 0u64;
    let mut buf = Vec::new();
    let mut honest_done = false;
    // Serve the honest guest while the hostile ones are discovered and fenced.
    poll_until(
        Duration::from_secs(60),
        "honest traffic and all fences",
        || {
            match host.try_recv(&mut buf) {
                Ok(Some(msg)) => {
                    assert!(
                        !modes.contains_key(&msg.from),
                        "a hostile guest's garbage was delivered"
                    );
                    assert_eq!(msg.meta, Meta::new(7, echoed));
                    host.try_send(msg.from, Meta::new(8, echoed), &buf).unwrap();
                    echoed += 1;
                }
                Ok(None) => {}
                Err(e) => {
                    assert!(
                        fenced.insert(e.peer, e.violation).is_none(),
                        "reported once"
                    );
                }
            }
            // The head-garbage guest is found by sending to it until the ring looks full.
            for (&id, &mode) in &modes {
                if mode == "head-garbage" && !fenced.contains_key(&id) {
                    match host.try_send(id, Meta::new(1, 1), b"probe") {
                        Ok(()) => {}
                        Err(SendError::Fenced { peer, violation }) => {
                            fenced.insert(peer, violation);
                        }
                        Err(e) => panic!("{e}"),
                    }
                }
            }
            if !honest_done {
                honest_done = honest
                    .poll_line(Duration::ZERO)
                    .is_some_and(|l| l == "done");
            }
            (honest_done && fenced.len() == MODES.len()).then_some(())
        },
    );
    assert_eq!(echoed, 300, "the honest guest lost nothing");
    for (id, mode) in &modes {
        let v = fenced[id];
        assert!(expected(mode, &v), "{mode}: got {v:?}");
        assert!(v.rule().starts_with("shm."), "names its rule");
        let info = host.peer_info(*id).unwrap();
        assert_eq!(info.state, Some(PeerState::Goodbye), "{mode}: quarantined");
        assert_eq!(info.fenced, Some(v));
        assert!(matches!(
            host.try_send(*id, Meta::default(), b""),
            Err(SendError::Fenced { .. })
        ));
    }
    hostile.say("check");
    hostile.expect("fenced");
    hostile.assert_success();
    honest.assert_success();
    // Quarantined entries are not handed to new guests; the rest of the table works.
    let g = ShmGuest::attach_path(seg.path()).unwrap();
    assert!(!modes.contains_key(&g.peer_id()));
}

/// A guest that says goodbye but keeps the segment mapped (a view held past its
/// detach), then breaks `shm.peer.detach` by writing into its area: junk in its
/// ToHost free list and slot words, and its ToGuest head. The host leaves the entry in
/// Goodbye while the guest maps the segment, and recycles it only once the guest has
/// let go, so the reset comes after the junk and the entry's next guest finds a fresh
/// entry (`shm.peer.recycle-unmapped`).
fn lingerer_main() {
    shmhub_tests::watchdog();
    let path = arg("SEG");
    let mut guest = ShmGuest::attach_path(&path).unwrap();
    let id = guest.peer_id();
    tell(&format!("attached {} {}", id.get(), guest.generation()));
    let view = guest
        .recv_message(Duration::from_secs(20))
        .unwrap()
        .expect("the host's message");
    assert_eq!(view.to_vec(), pattern(9, 0, 200));
    guest.detach();
    tell("detached");
    assert_eq!(hear(), "scribble");
    let seg = shmhub_tests::watch_segment(std::path::Path::new(&path));
    let layout = seg.layout();
    let region = seg.backing().region();
    let word = |off: u64| region.atomic_u64(off as usize).unwrap();
    let pool = layout.pool_offset(id.index(), Direction::ToHost, 0);
    word(pool).store(1 << 40 | 1000, Ordering::Release); // a free-list head past the pool
    word(pool + 64).store(1, Ordering::Release); // slot 0 Loaned
    let to_guest = layout.ring_offset(id.index(), Direction::ToGuest);
    word(to_guest + 64).store(3, Ordering::Release); // ToGuest head
    tell("scribbled");
    assert_eq!(hear(), "exit");
    drop(view);
}

// shm[verify shm.peer.recycle-unmapped]
#[test]
fn an_entry_is_recycled_only_once_its_departed_guest_lets_go_of_the_segment() {
    if role().as_deref() == Some("lingerer") {
        return lingerer_main();
    }
    let seg = ShmPath::new("lingerer");
    let mut host = ShmHost::create(seg.path(), CONFIG).unwrap();
    let env = [("SEG", seg.path().display().to_string())];
    let test = "an_entry_is_recycled_only_once_its_departed_guest_lets_go_of_the_segment";
    let mut child = Proc::spawn(test, "lingerer", &env, Duration::from_secs(60));
    let attached = child.expect("attached");
    let id = PeerId::new(attached.split(' ').next().unwrap().parse().unwrap()).unwrap();
    let generation: u32 = attached.split(' ').nth(1).unwrap().parse().unwrap();
    host.try_send(id, Meta::new(1, 0), &pattern(9, 0, 200))
        .unwrap();
    child.expect("detached");
    let mut buf = Vec::new();
    let goodbye = |host: &ShmHost| {
        let info = host.peer_info(id).unwrap();
        (info.state, info.generation, info.fenced)
    };
    // Said goodbye, still mapped: not recycled, however often the host looks.
    for _ in 0..3 {
        assert_eq!(host.maintain(), 0);
        assert_eq!(host.try_recv(&mut buf).unwrap(), None);
        assert_eq!(goodbye(&host), (Some(PeerState::Goodbye), generation, None));
    }
    child.say("scribble");
    child.expect("scribbled");
    assert_eq!(host.maintain(), 0);
    assert_eq!(goodbye(&host), (Some(PeerState::Goodbye), generation, None));
    child.say("exit");
    child.assert_success();
    // Let go: recycled, after the junk, so the reset covers it.
    poll_until(Duration::from_secs(10), "the entry recycled", || {
        host.maintain();
        (goodbye(&host).0 == Some(PeerState::Empty)).then_some(())
    });
    assert_eq!(
        goodbye(&host),
        (Some(PeerState::Empty), generation + 1, None)
    );
    let watch = shmhub_tests::watch_segment(seg.path());
    let states = shmhub_tests::slot_states(&watch, id, Direction::ToHost);
    assert_eq!(states[0].free, CONFIG.classes.as_slice()[0].count);
    let usage = host.peer_usage(id).unwrap();
    assert_eq!((usage.to_guest_depth, usage.to_host_depth), (0, 0));
    // The entry's next guest uses every slot of both directions without an error.
    let mut next = ShmGuest::attach_path(seg.path()).unwrap();
    assert_eq!(next.peer_id(), id, "the same entry");
    let slots = CONFIG.classes.as_slice()[0].count as u64;
    for n in 0..slots {
        next.try_send(Meta::new(2, n), &pattern(3, n, 100)).unwrap();
    }
    for n in 0..slots {
        let got = host.try_recv(&mut buf).unwrap().expect("a message");
        assert_eq!((got.from, got.meta), (id, Meta::new(2, n)));
        assert_eq!(buf, pattern(3, n, 100));
        host.try_send(id, Meta::new(4, n), &buf).unwrap();
        assert_eq!(next.try_recv(&mut buf).unwrap(), Some(Meta::new(4, n)));
    }
}
