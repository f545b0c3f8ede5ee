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
const MODES: [&str; 10] = [
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
