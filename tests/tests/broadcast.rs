//! Broadcast (`shm.broadcast.*`): one payload to every attached guest through one
//! shared slot, released by each holder and by the host for guests that died.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use shm_guest::{AttachOptions, RecvError, ShmGuest};
use shm_host::{
    BroadcastError, BroadcastRef, Death, Meta, PeerId, PeerSet, SegmentConfig, ShmHost,
    SlotClasses, Violation, INLINE_CAPACITY,
};
use shm_primitives::broadcast::BroadcastSlotInfo;
use shm_primitives::slot::SlotState;
use shmhub_tests::{arg, hear, pattern, poll_until, role, tell, watch_segment, Proc, ShmPath};

const LONG: Duration = Duration::from_secs(20);
const CHILD_LIMIT: Duration = Duration::from_secs(120);
const SEED: u64 = 0xB40C;
const MSG_TYPE: u32 = 3;

/// `guests` entries, small rings and guest pools, and `slots` broadcast slots of
/// `slot_size` bytes.
fn config(guests: u32, slots: u32, slot_size: u32) -> SegmentConfig {
    SegmentConfig {
        max_guests: guests,
        ring_capacity: 8,
        classes: SlotClasses::single(64, 1),
        broadcast_slots: slots,
        broadcast_slot_size: slot_size,
    }
}

/// `recv n:len ...` from the parent: the messages a child is to receive, in order.
fn expected(line: &str) -> Vec<(u64, usize)> {
    line.split_whitespace()
        .skip(1)
        .map(|item| {
            let (n, len) = item.split_once(':').unwrap();
            (n.parse().unwrap(), len.parse().unwrap())
        })
        .collect()
}

/// A guest that receives views and holds them until told to drop them.
fn holder_main() {
    let mut guest = ShmGuest::attach_path(arg("SEG")).unwrap();
    tell(&format!("attached {}", guest.peer_id().get()));
    let mut held = Vec::new();
    loop {
        let line = hear();
        match line.split_whitespace().next() {
            Some("recv") => {
                for (n, len) in expected(&line) {
                    let msg = guest.recv_message(LONG).unwrap().expect("a broadcast");
                    assert_eq!(msg.meta(), Meta::new(MSG_TYPE, n));
                    assert_eq!(msg.is_zero_copy(), len > INLINE_CAPACITY);
                    // Every byte, read in place.
                    assert!(
                        msg.to_vec() == pattern(SEED, n, len),
                        "broadcast {n} garbled"
                    );
                    held.push(msg);
                }
                tell("got");
            }
            Some("drop") => {
                held.clear();
                tell("dropped");
            }
            Some("half-release") => {
                // What an honest guest SIGKILLed inside its release leaves behind: its
                // bit cleared with the one atomic AND, and nothing after it. The views
                // stay held (never dropped) until the parent kills us.
                let index: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
                clear_own_bit(&guest, index);
                tell("cleared");
            }
            _ => break,
        }
    }
    guest.detach();
}

/// Clears this guest's holder bit of broadcast record `index` by hand, through a
/// second mapping of the segment (`shm.broadcast.layout`: word w at record offset
/// 16 + 8w).
fn clear_own_bit(guest: &ShmGuest, index: u64) {
    let seg = watch_segment(std::path::Path::new(&arg("SEG")));
    let bit = u64::from(guest.peer_id().get() - 1);
    let record = seg.layout().broadcast_offset + 64 * index;
    let word = record + 16 + 8 * (bit / 64);
    let holders = seg.backing().region().atomic_u64(word as usize).unwrap();
    let before = holders.fetch_and(!(1 << (bit % 64)), std::sync::atomic::Ordering::AcqRel);
    assert_ne!(before & 1 << (bit % 64), 0, "held before the release");
}

/// A guest that receives by copying into a vector.
fn copier_main() {
    let mut guest = ShmGuest::attach_path(arg("SEG")).unwrap();
    tell(&format!("attached {}", guest.peer_id().get()));
    let mut buf = Vec::new();
    loop {
        let line = hear();
        if !line.starts_with("recv") {
            break;
        }
        for (n, len) in expected(&line) {
            let meta = guest.recv(&mut buf, LONG).unwrap().expect("a broadcast");
            assert_eq!(meta, Meta::new(MSG_TYPE, n));
            assert!(buf == pattern(SEED, n, len), "broadcast {n} garbled");
        }
        tell("got");
    }
    guest.detach();
}

/// The host's side of a test: its guests (children), their ids, and an outside view
/// of the broadcast pool.
struct Bench {
    seg: ShmPath,
    host: ShmHost,
    guests: Vec<Proc>,
    ids: Vec<PeerId>,
}

impl Bench {
    fn start(test: &str, role: &str, tag: &str, n: usize, config: SegmentConfig) -> Self {
        let seg = ShmPath::new(tag);
        let host = ShmHost::create(seg.path(), config).unwrap();
        let env = [("SEG", seg.path().display().to_string())];
        let mut guests: Vec<Proc> = (0..n)
            .map(|_| Proc::spawn(test, role, &env, CHILD_LIMIT))
            .collect();
        let ids = guests
            .iter_mut()
            .map(|g| PeerId::new(g.expect("attached").parse().unwrap()).unwrap())
            .collect();
        Self {
            seg,
            host,
            guests,
            ids,
        }
    }

    fn everyone(&self) -> PeerSet {
        self.ids.iter().copied().collect()
    }

    /// Broadcasts message `n` of `len` bytes, which must reach every guest.
    fn broadcast(&mut self, n: u64, len: usize) -> Option<BroadcastRef> {
        let report = self
            .host
            .broadcast(Meta::new(MSG_TYPE, n), &pattern(SEED, n, len))
            .unwrap();
        assert_eq!(report.delivered, self.everyone(), "broadcast {n}");
        assert!(report.full.is_empty() && report.fenced.is_empty());
        report.slot
    }

    /// Tells the guests at `which` (indices into `guests`) `line`, then waits for each
    /// to answer `answer`.
    fn tell_all(
        &mut self,
        which: impl IntoIterator<Item = usize> + Clone,
        line: &str,
        answer: &str,
    ) {
        for i in which.clone() {
            self.guests[i].say(line);
        }
        for i in which {
            self.guests[i].expect(answer);
        }
    }

    fn slot(&self, r: BroadcastRef) -> BroadcastSlotInfo {
        let watch = watch_segment(self.seg.path());
        watch.broadcast().unwrap().info(r.index).unwrap()
    }

    fn bye(mut self) {
        for g in &mut self.guests {
            g.say("bye");
        }
        for g in &mut self.guests {
            g.assert_success();
        }
    }
}

fn recv_line(items: &[(u64, usize)]) -> String {
    let list: Vec<String> = items.iter().map(|(n, len)| format!("{n}:{len}")).collect();
    format!("recv {}", list.join(" "))
}

fn assert_held(info: BroadcastSlotInfo, r: BroadcastRef, holders: PeerSet) {
    assert_eq!(info.state, Some(SlotState::Sent), "{r:?}");
    assert_eq!(info.generation, r.generation, "{r:?}");
    assert_eq!(info.holders, holders, "{r:?}");
    assert!(!info.is_free(), "{r:?}");
}

/// Sent with the generation it was sent with and no holder left: released (free for
/// the host to take), and not reused since.
fn assert_freed(info: BroadcastSlotInfo, r: BroadcastRef) {
    assert_eq!(info.state, Some(SlotState::Sent), "{r:?}");
    assert_eq!(info.generation, r.generation, "{r:?}");
    assert!(info.holders.is_empty(), "{r:?}");
    assert!(info.is_free(), "{r:?}");
}

const SIXTY_FOUR: &str = "sixty_four_guests_read_every_byte_from_one_shared_slot";

// Sixty-four guest processes receive a series of broadcasts through three shared
// slots, check every byte in place and hold their views. The slot stays Sent until the
// very last holder lets go (checked after 63 of 64 released) and then is released with
// the generation it was sent with. Three held broadcasts fill the pool (a
// fourth is WouldBlock, an inline one still goes), and every slot is reused.
// shm[verify shm.broadcast.alloc]
// shm[verify shm.broadcast.refcount]
// shm[verify shm.broadcast.release]
// shm[verify shm.broadcast.receive]
#[test]
fn sixty_four_guests_read_every_byte_from_one_shared_slot() {
    if role().as_deref() == Some("holder") {
        return holder_main();
    }
    let mut b = Bench::start(
        SIXTY_FOUR,
        "holder",
        "bcast64",
        64,
        config(64, 3, 32 * 1024),
    );
    assert_eq!(b.host.attached_peers().len(), 64);
    let everyone = b.everyone();
    let all = 0..b.guests.len();
    // One broadcast; 63 guests let go, then the last.
    let r = b.broadcast(0, 32 * 1024).unwrap();
    b.tell_all(all.clone(), &recv_line(&[(0, 32 * 1024)]), "got");
    assert_held(b.slot(r), r, everyone);
    b.tell_all(1..64, "drop", "dropped");
    assert_held(b.slot(r), r, [b.ids[0]].into_iter().collect());
    b.tell_all(0..1, "drop", "dropped");
    assert_freed(b.slot(r), r);
    let mut used = vec![r];
    // Three held at once fill the pool; inline broadcasts need no slot.
    let batch = [(1, 3000), (2, 37), (3, 20000)];
    for &(n, len) in &batch {
        used.push(b.broadcast(n, len).unwrap());
    }
    let err = b.host.broadcast(Meta::new(MSG_TYPE, 99), &[0; 100]);
    assert_eq!(err, Err(BroadcastError::WouldBlock));
    assert_eq!(b.broadcast(4, 36), None, "inline");
    let items = [batch.as_slice(), &[(4, 36)]].concat();
    b.tell_all(all.clone(), &recv_line(&items), "got");
    for &r in &used[1..] {
        assert_held(b.slot(r), r, everyone);
    }
    b.tell_all(all.clone(), "drop", "dropped");
    for &r in &used[1..] {
        assert_freed(b.slot(r), r);
    }
    // And again: the freed slots are handed out anew, with new generations.
    let batch = [(5, 100), (6, 32 * 1024)];
    let again: Vec<BroadcastRef> = batch
        .iter()
        .map(|&(n, len)| b.broadcast(n, len).unwrap())
        .collect();
    b.tell_all(all.clone(), &recv_line(&batch), "got");
    b.tell_all(all, "drop", "dropped");
    for &r in &again {
        assert_freed(b.slot(r), r);
        let before = used
            .iter()
            .filter(|u| u.index == r.index)
            .map(|u| u.generation)
            .max();
        assert_eq!(
            before.map(|g| g + 1),
            Some(r.generation),
            "slot {} reused",
            r.index
        );
    }
    assert_eq!(b.host.broadcast_usage().unwrap().in_use, 0);
    let sent: u64 = b
        .ids
        .iter()
        .map(|&id| b.host.peer_info(id).unwrap().stats.broadcasts)
        .sum();
    assert_eq!(sent, 64 * 7, "seven broadcasts to each guest");
    b.bye();
}

const KILLED: &str = "a_guest_killed_holding_a_broadcast_is_released_for_by_the_host";

// Three guests hold a view of broadcast 0; broadcast 1 is still in their rings. One is
// SIGKILLed: the host finds it dead and releases both of its holds (one held, one
// never received), counted; both slots stay Sent for the other two, and are freed once
// those release theirs.
// shm[verify shm.broadcast.reclaim]
// shm[verify shm.broadcast.release]
#[test]
fn a_guest_killed_holding_a_broadcast_is_released_for_by_the_host() {
    if role().as_deref() == Some("holder") {
        return holder_main();
    }
    let mut b = Bench::start(KILLED, "holder", "bcast-kill", 3, config(4, 2, 4096));
    let deaths: Arc<Mutex<Vec<Death>>> = Arc::default();
    let sink = deaths.clone();
    b.host.on_death(move |d| sink.lock().unwrap().push(*d));
    let held = b.broadcast(0, 3000).unwrap();
    let queued = b.broadcast(1, 500).unwrap();
    b.tell_all(0..3, &recv_line(&[(0, 3000)]), "got");
    let victim = b.ids[1];
    let status = b.guests[1].kill();
    assert!(!status.success());
    poll_until(LONG, "the victim's death", || {
        b.host.maintain();
        (!deaths.lock().unwrap().is_empty()).then_some(())
    });
    let death = deaths.lock().unwrap()[0];
    assert_eq!(
        (death.peer, death.discarded),
        (victim, 1),
        "broadcast 1 was unread"
    );
    assert_eq!(
        b.host.peer_info(victim).unwrap().stats.released_broadcasts,
        2
    );
    let survivors: PeerSet = [b.ids[0], b.ids[2]].into_iter().collect();
    assert_held(b.slot(held), held, survivors);
    assert_held(b.slot(queued), queued, survivors);
    b.guests.remove(1);
    b.tell_all(0..2, &recv_line(&[(1, 500)]), "got");
    b.tell_all(0..1, "drop", "dropped");
    assert_held(b.slot(held), held, [b.ids[2]].into_iter().collect());
    b.tell_all(1..2, "drop", "dropped");
    assert_freed(b.slot(held), held);
    assert_freed(b.slot(queued), queued);
    b.bye();
}

const MID_RELEASE: &str = "a_guest_killed_inside_its_release_leaks_no_slot";

// A guest is SIGKILLed inside its release of a broadcast it holds last: right after
// the atomic AND that clears its holder bit. The host reaps it and the slot is free
// again: counted free, and the pool's only slot is allocated to the next broadcast.
// (Version 6 freed a slot on its count of holders, which a releaser decremented after
// clearing its bit; a death between the two leaked the slot for good, as the random
// hostile soak once found.)
// shm[verify shm.broadcast.release]
// shm[verify shm.broadcast.reclaim]
#[test]
fn a_guest_killed_inside_its_release_leaks_no_slot() {
    if role().as_deref() == Some("holder") {
        return holder_main();
    }
    let mut b = Bench::start(MID_RELEASE, "holder", "bcast-mid", 2, config(4, 1, 4096));
    let deaths: Arc<Mutex<Vec<Death>>> = Arc::default();
    let sink = deaths.clone();
    b.host.on_death(move |d| sink.lock().unwrap().push(*d));
    let held = b.broadcast(0, 3000).unwrap();
    b.tell_all(0..2, &recv_line(&[(0, 3000)]), "got");
    // The survivor lets go first: the victim is the last holder.
    b.tell_all(0..1, "drop", "dropped");
    assert_held(b.slot(held), held, [b.ids[1]].into_iter().collect());
    b.tell_all(1..2, &format!("half-release {}", held.index), "cleared");
    let victim = b.ids[1];
    assert!(!b.guests[1].kill().success());
    poll_until(LONG, "the victim's death", || {
        b.host.maintain();
        (!deaths.lock().unwrap().is_empty()).then_some(())
    });
    assert_eq!(deaths.lock().unwrap()[0].peer, victim);
    b.guests.remove(1);
    b.ids.remove(1);
    let usage = b.host.broadcast_usage().unwrap();
    assert_eq!((usage.free, usage.in_use), (1, 0), "the slot came back");
    let next = b.broadcast(1, 3000).expect("the pool's one slot, reused");
    assert_eq!(
        next,
        BroadcastRef {
            index: 0,
            generation: held.generation + 1
        }
    );
    b.tell_all(0..1, &recv_line(&[(1, 3000)]), "got");
    b.tell_all(0..1, "drop", "dropped");
    b.bye();
}

const COPY: &str = "the_copy_path_releases_each_broadcast_as_it_returns";

// Guests that receive into a vector release their hold before `recv` returns: once both
// have answered, every slot is Free, and the next broadcasts reuse them.
// shm[verify shm.broadcast.receive]
#[test]
fn the_copy_path_releases_each_broadcast_as_it_returns() {
    if role().as_deref() == Some("copier") {
        return copier_main();
    }
    let mut b = Bench::start(COPY, "copier", "bcast-copy", 2, config(2, 2, 8192));
    for round in 0..3u64 {
        let items = [(2 * round, 8192), (2 * round + 1, 100)];
        let refs: Vec<BroadcastRef> = items
            .iter()
            .map(|&(n, len)| b.broadcast(n, len).unwrap())
            .collect();
        assert_eq!(refs[0].generation, round as u32 + 1, "slots reused");
        b.tell_all(0..2, &recv_line(&items), "got");
        for &r in &refs {
            assert_freed(b.slot(r), r);
        }
    }
    b.bye();
}

// In one process: a guest whose ring is full is skipped and named, never given a bit;
// errors (no pool, too large) change nothing; no guest attached uses no slot.
// shm[verify shm.broadcast.alloc]
#[test]
fn a_full_ring_is_reported_and_holds_no_reference() {
    let mut host = ShmHost::create_heap(config(3, 1, 1024)).unwrap();
    let report = host.broadcast(Meta::new(1, 0), &[1; 500]).unwrap();
    assert!(
        report.delivered.is_empty() && report.slot.is_none(),
        "nobody to send to"
    );
    assert_eq!(host.broadcast_usage().unwrap().in_use, 0);
    let attach = || ShmGuest::attach_backing(host.backing(), AttachOptions::default()).unwrap();
    let (mut a, mut full) = (attach(), attach());
    for n in 0..8 {
        host.try_send(full.peer_id(), Meta::new(2, n), b"filler")
            .unwrap();
    }
    let report = host.broadcast(Meta::new(1, 1), &[7; 1000]).unwrap();
    assert_eq!(report.delivered, [a.peer_id()].into_iter().collect());
    assert_eq!(report.full, [full.peer_id()].into_iter().collect());
    let slot = report.slot.unwrap();
    let pool_view = shm_primitives::Segment::attach(host.backing()).unwrap();
    let info = pool_view.broadcast().unwrap().info(slot.index).unwrap();
    assert_eq!(info.holders, report.delivered);
    assert_eq!(
        host.broadcast(Meta::new(1, 2), &[0; 1025]),
        Err(BroadcastError::TooLarge {
            len: 1025,
            max: 1024
        })
    );
    assert_eq!(
        host.broadcast(Meta::new(1, 2), &[0; 50]),
        Err(BroadcastError::WouldBlock)
    );
    let mut buf = Vec::new();
    assert_eq!(a.try_recv(&mut buf).unwrap(), Some(Meta::new(1, 1)));
    assert_eq!(buf, [7; 1000]);
    assert_eq!(
        host.broadcast_usage().unwrap().in_use,
        0,
        "freed by its only holder"
    );
    // The skipped guest gets its own messages and nothing else.
    let mut got = 0;
    while let Some(meta) = full.try_recv(&mut buf).unwrap() {
        assert_eq!(meta.msg_type, 2);
        got += 1;
    }
    assert_eq!(got, 8);
    let mut none = ShmHost::create_heap(config(1, 0, 0)).unwrap();
    let _guest = ShmGuest::attach_backing(none.backing(), AttachOptions::default()).unwrap();
    assert_eq!(
        none.broadcast(Meta::default(), &[0; 37]),
        Err(BroadcastError::NoPool { len: 37 })
    );
    assert_eq!(
        none.broadcast(Meta::default(), &[0; 36])
            .unwrap()
            .delivered
            .len(),
        1
    );
}

// A guest that breaks the protocol and frees a Sent slot early only costs the other
// guests that broadcast (reported as a violation, consumed, and the next message
// arrives) and costs the host nothing: it fences nobody and keeps broadcasting.
// shm[verify shm.broadcast.untrusted]
// shm[verify shm.broadcast.refcount]
#[test]
fn a_guest_scribbling_on_the_pool_cannot_wedge_another_or_the_host() {
    let mut host = ShmHost::create_heap(config(2, 2, 1024)).unwrap();
    let attach = || ShmGuest::attach_backing(host.backing(), AttachOptions::default()).unwrap();
    let (mut rogue, mut victim) = (attach(), attach());
    let report = host.broadcast(Meta::new(1, 0), &[5; 200]).unwrap();
    host.try_send(victim.peer_id(), Meta::new(2, 0), b"next")
        .unwrap();
    // The rogue writes Free(g) over the Sent word: any guest can reach the pool.
    let slot = report.slot.unwrap();
    let seg = shm_primitives::Segment::attach(host.backing()).unwrap();
    let off = seg.layout().broadcast_offset as usize + 64 * slot.index as usize;
    let word = seg.backing().region().atomic_u64(off).unwrap();
    word.store(
        u64::from(slot.generation) << 32,
        std::sync::atomic::Ordering::Release,
    );
    let err = victim.try_recv_message().unwrap_err();
    assert!(
        matches!(err, RecvError::Violation(Violation::Broadcast { index, .. }) if index == slot.index),
        "{err}"
    );
    let next = victim.try_recv_message().unwrap().unwrap();
    assert_eq!(
        (next.meta(), next.to_vec()),
        (Meta::new(2, 0), b"next".to_vec())
    );
    assert!(
        rogue.try_recv_message().is_err(),
        "its own reference is gone too"
    );
    // The host carries on: the early-freed slot is simply free again.
    for n in 1..=4 {
        let report = host.broadcast(Meta::new(1, n), &[6; 300]).unwrap();
        assert_eq!(report.delivered.len(), 2);
        let mut buf = Vec::new();
        for guest in [&mut rogue, &mut victim] {
            guest.try_recv(&mut buf).unwrap().unwrap();
            assert_eq!(buf, [6; 300]);
        }
        assert!(report.fenced.is_empty());
    }
    for id in [rogue.peer_id(), victim.peer_id()] {
        assert!(host.peer_info(id).unwrap().fenced.is_none());
    }
}
