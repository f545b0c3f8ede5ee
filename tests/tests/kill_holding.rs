//! Guests SIGKILLed while they hold slots (`shm.recover.reap`, `shm.slot.reclaim`): a
//! loan written but not sent, zero-copy views not dropped, and both at once with
//! messages undelivered in both rings. The child says exactly when it holds them; the
//! host then kills it, finds it dead, and must return every slot to Free with the exact
//! counts in the `Death` report and the entry's stats. A new guest of the same entry
//! then fills every slot of both directions, which only works if none was lost.

use std::os::unix::process::ExitStatusExt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use shm_guest::ShmGuest;
use shm_host::{
    Death, DeathCause, Direction, Meta, PeerHandle, PeerId, PeerState, SegmentConfig, ShmHost,
    SlotClass, SlotClasses, SpawnedGuest,
};
use shm_primitives::Segment;
use shmhub_tests::{
    arg, attach_as_told, hear, pattern, poll_until, role, role_command, slot_states, tell,
    until_reapable, watch_segment, watchdog, Proc, ShmPath, SlotStates, Talk,
};

const LONG: Duration = Duration::from_secs(20);
const HELLO: u32 = 1;
const DATA: u32 = 2;
const FILL: u32 = 3;

/// Two classes: 8 slots of 256 bytes and 2 of 4 KiB in each direction.
fn config() -> SegmentConfig {
    SegmentConfig {
        max_guests: 2,
        ring_capacity: 16,
        classes: SlotClasses::new(&[SlotClass::new(256, 8), SlotClass::new(4096, 2)]),
        ..SegmentConfig::default()
    }
}

type Deaths = Arc<Mutex<Vec<Death>>>;

fn log_deaths(host: &mut ShmHost) -> Deaths {
    let log = Deaths::default();
    let sink = log.clone();
    host.on_death(move |d| sink.lock().unwrap().push(*d));
    log
}

/// Both kinds of child line readers.
trait Lines {
    fn expect(&mut self, word: &str) -> String;
    fn say(&mut self, line: &str);
}

impl Lines for Proc {
    fn expect(&mut self, word: &str) -> String {
        Proc::expect(self, word)
    }
    fn say(&mut self, line: &str) {
        Proc::say(self, line)
    }
}

impl Lines for Talk {
    fn expect(&mut self, word: &str) -> String {
        Talk::expect(self, word)
    }
    fn say(&mut self, line: &str) {
        Talk::say(self, line)
    }
}

// ---------------------------------------------------------------------------------
// The children.

fn attach() -> ShmGuest {
    watchdog();
    let guest = attach_as_told().unwrap();
    tell(&format!(
        "attached {} {}",
        guest.peer_id().get(),
        guest.generation()
    ));
    guest
}

/// One round trip with a slot payload each way, so the entry has carried traffic
/// (whose slots are all Free again) before it holds anything.
fn warm_up(guest: &mut ShmGuest) {
    guest
        .try_send(Meta::new(HELLO, 0), &pattern(1, 0, 300))
        .unwrap();
    let mut buf = Vec::new();
    let meta = guest
        .recv(&mut buf, LONG)
        .unwrap()
        .expect("the host's reply");
    assert_eq!(meta, Meta::new(HELLO, 1));
    assert_eq!(buf, pattern(2, 1, 300));
    tell("warm");
}

fn host_warm_up(host: &mut ShmHost, peer: PeerId, lines: &mut dyn Lines) {
    let mut buf = Vec::new();
    let got = host
        .recv(&mut buf, LONG)
        .unwrap()
        .expect("the guest's hello");
    assert_eq!((got.from, got.meta), (peer, Meta::new(HELLO, 0)));
    assert_eq!(buf, pattern(1, 0, 300));
    host.try_send(peer, Meta::new(HELLO, 1), &pattern(2, 1, 300))
        .unwrap();
    // Its slot is free again once the guest has read it.
    lines.expect("warm");
}

/// Waits until killed: the parent never writes to our stdin (it closes it only if it
/// fails first, and then we fail too). The watchdog bounds the wait.
fn wait_for_the_kill() -> ! {
    let line = hear();
    panic!("not killed (the parent said {line:?})");
}

/// A guest that ends up holding what `HOLD` says when it says `holding`.
fn holder_main() {
    let mut guest = attach();
    warm_up(&mut guest);
    match arg("HOLD").as_str() {
        "loan" => {
            let mut loan = guest.loan(1000).unwrap();
            assert!(loan.write_at(0, &pattern(5, 0, 1000)));
            tell("holding a loan");
            wait_for_the_kill();
        }
        "views" => {
            let views: Vec<_> = VIEWS
                .iter()
                .enumerate()
                .map(|(n, &len)| {
                    let view = guest.recv_message(LONG).unwrap().expect("a view");
                    assert!(view.is_zero_copy());
                    assert_eq!(view.meta(), Meta::new(DATA, n as u64));
                    assert_eq!(view.to_vec(), pattern(6, n as u64, len));
                    view
                })
                .collect();
            tell(&format!("holding {} views", views.len()));
            wait_for_the_kill();
        }
        "both" => {
            let views: Vec<_> = VIEWS
                .iter()
                .enumerate()
                .map(|(n, &len)| {
                    let view = guest.recv_message(LONG).unwrap().expect("a view");
                    assert_eq!(view.to_vec(), pattern(6, n as u64, len));
                    view
                })
                .collect();
            for (n, &len) in TO_HOST.iter().enumerate() {
                guest
                    .try_send(Meta::new(DATA, n as u64), &pattern(7, n as u64, len))
                    .unwrap();
            }
            let mut loan = guest.loan(200).unwrap();
            assert!(loan.write_at(0, &pattern(5, 0, 200)));
            tell(&format!("holding a loan and {} views", views.len()));
            wait_for_the_kill();
        }
        other => panic!("unknown HOLD {other}"),
    }
}

/// Every slot of both directions, by class: 8 of 256 bytes then 2 of 4 KiB.
fn fill_sizes() -> Vec<usize> {
    config()
        .classes
        .as_slice()
        .iter()
        .flat_map(|c| std::iter::repeat(c.size as usize).take(c.count as usize))
        .collect()
}

/// A later guest of the same entry: loans every ToHost slot, then reads every ToGuest
/// slot in place (all views held at once).
fn filler_main() {
    let mut guest = attach();
    for (n, len) in fill_sizes().into_iter().enumerate() {
        let mut loan = guest.loan(len).unwrap();
        assert_eq!(loan.capacity(), len, "the smallest class that fits");
        assert!(loan.write_at(0, &pattern(8, n as u64, len)));
        loan.send(Meta::new(FILL, n as u64), len).unwrap();
    }
    let err = guest.try_send(Meta::new(FILL, 99), &[0; 100]).unwrap_err();
    assert!(
        matches!(err, shm_guest::SendError::WouldBlockPool),
        "every slot is in flight: {err}"
    );
    tell("sent");
    let views: Vec<_> = fill_sizes()
        .into_iter()
        .enumerate()
        .map(|(n, len)| {
            let view = guest.recv_message(LONG).unwrap().expect("a view");
            assert_eq!(view.meta(), Meta::new(FILL, n as u64));
            assert_eq!(view.to_vec(), pattern(9, n as u64, len));
            view
        })
        .collect();
    // Hold every view until the host has seen its pools full: dropped any earlier, a
    // view frees its slot and the host's extra send would find room.
    tell("holding");
    assert_eq!(hear(), "drop");
    drop(views);
    tell("done");
    guest.detach();
}

// ---------------------------------------------------------------------------------
// The host's checks.

/// Payloads the host sends for the guest to hold as views: classes 0, 1 and 0.
const VIEWS: [usize; 3] = [100, 1000, 200];
/// Then, left undelivered in the ToGuest ring: class 0, inline, class 1.
const UNDELIVERED: [usize; 3] = [250, 30, 4000];
/// What the guest sends in the "both" case: the host takes the first as a view (class
/// 1); the others stay undelivered (class 0, inline, class 1).
const TO_HOST: [usize; 4] = [300, 100, 20, 2000];

fn states(seg: &Segment, peer: PeerId) -> [Vec<SlotStates>; 2] {
    [
        slot_states(seg, peer, Direction::ToGuest),
        slot_states(seg, peer, Direction::ToHost),
    ]
}

/// Per class: (free, loaned, sent, received).
fn counts(classes: &[SlotStates]) -> Vec<(u32, u32, u32, u32)> {
    classes
        .iter()
        .map(|c| {
            assert_eq!(c.invalid, 0);
            (c.free, c.loaned, c.sent, c.received)
        })
        .collect()
}

fn assert_all_free(host: &ShmHost, seg: &Segment, peer: PeerId) {
    let free: Vec<_> = config()
        .classes
        .as_slice()
        .iter()
        .map(|c| (c.count, 0, 0, 0))
        .collect();
    for (dir, classes) in ["to guest", "to host"].iter().zip(states(seg, peer)) {
        assert_eq!(counts(&classes), free, "every {dir} slot is Free");
    }
    let usage = host.peer_usage(peer).unwrap();
    assert_eq!(usage.to_guest_slots.in_use + usage.to_host_slots.in_use, 0);
    assert_eq!((usage.to_guest_depth, usage.to_host_depth), (0, 0));
}

/// Finds the death of `handle` (calling only `maintain`, which receives nothing) and
/// checks its report and the entry afterwards.
fn await_death(
    host: &mut ShmHost,
    deaths: &Deaths,
    handle: PeerHandle,
    (abandoned, discarded, reclaimed): (u64, u64, u64),
) -> Death {
    poll_until(LONG, "the host to find the guest dead", || {
        host.maintain();
        (!deaths.lock().unwrap().is_empty()).then_some(())
    });
    let got = deaths.lock().unwrap().clone();
    assert_eq!(got.len(), 1, "one death reported once: {got:?}");
    let death = got[0];
    assert_eq!(
        (death.peer, death.generation),
        (handle.id, handle.generation)
    );
    assert!(death.attached);
    assert_eq!(
        (death.abandoned, death.discarded, death.reclaimed_slots),
        (abandoned, discarded, reclaimed),
        "(abandoned, discarded, reclaimed_slots) in the report"
    );
    let info = host.peer_info(handle.id).unwrap();
    assert_eq!(
        info.state,
        Some(PeerState::Empty),
        "the entry is free again"
    );
    assert_eq!(info.generation, handle.generation + 1);
    assert_eq!(
        (
            info.stats.abandoned,
            info.stats.discarded,
            info.stats.reclaimed_slots,
            info.stats.deaths
        ),
        (abandoned, discarded, reclaimed, 1),
        "the entry's stats"
    );
    death
}

/// SIGKILLs a guest the host spawned and waits, without calling into the host, until
/// it can be reaped: a liveness pass polls the pidfds and doorbells first and tests the
/// locks after, so a guest that died between the two would be found by its lock.
fn kill_spawned(host: &ShmHost, guest: SpawnedGuest) {
    host.signal_guest(guest.handle, libc::SIGKILL).unwrap();
    until_reapable(guest.pid);
}

/// A spawned guest's death (after `kill_spawned`): found through its pidfd or
/// doorbell, reaped by the host.
fn assert_spawned_death(death: &Death) {
    assert!(
        matches!(death.cause, DeathCause::ProcessExited | DeathCause::HungUp),
        "{:?}",
        death.cause
    );
    let status = death
        .exit
        .expect("the host reaped the child and kept its status");
    assert_eq!(status.signal(), Some(libc::SIGKILL), "{status}");
}

/// The host's side of `filler_main`, for a guest on `peer` whose lines come through
/// `lines`: every slot of both directions must be usable again.
fn fill_exchange(host: &mut ShmHost, seg: &Segment, peer: PeerId, lines: &mut dyn Lines) {
    let sizes = fill_sizes();
    lines.expect("sent");
    let every: Vec<_> = config()
        .classes
        .as_slice()
        .iter()
        .map(|c| (0, 0, c.count, 0))
        .collect();
    assert_eq!(
        counts(&states(seg, peer)[1]),
        every,
        "every ToHost slot Sent"
    );
    let mut buf = Vec::new();
    for (n, &len) in sizes.iter().enumerate() {
        let got = host.try_recv(&mut buf).unwrap().expect("a filled slot");
        assert_eq!((got.from, got.meta), (peer, Meta::new(FILL, n as u64)));
        assert_eq!(buf, pattern(8, n as u64, len));
    }
    for (n, &len) in sizes.iter().enumerate() {
        host.try_send(peer, Meta::new(FILL, n as u64), &pattern(9, n as u64, len))
            .unwrap_or_else(|e| panic!("slot {n} of the ToGuest pools: {e}"));
    }
    lines.expect("holding");
    assert!(matches!(
        host.try_send(peer, Meta::new(FILL, 99), &[0; 100]),
        Err(shm_host::SendError::WouldBlockPool(p)) if p == peer
    ));
    lines.say("drop");
    lines.expect("done");
    poll_until(LONG, "the filler's entry to be recycled", || {
        host.maintain();
        (host.peer_info(peer).unwrap().state == Some(PeerState::Empty)).then_some(())
    });
    assert_all_free(host, seg, peer);
}

/// Spawns a guest of this test in `role` through the host, with its stdin and stdout
/// wired to the returned `Talk`.
fn spawn(
    host: &mut ShmHost,
    test: &str,
    role: &str,
    envs: &[(&str, String)],
) -> (SpawnedGuest, Talk) {
    let mut envs = envs.to_vec();
    envs.push(("VIA", "ticket".to_string()));
    let mut cmd = role_command(test, role, &envs, LONG);
    let mut talk = Talk::wire(&mut cmd, role, LONG);
    let spawned = host.spawn(&mut cmd).unwrap();
    drop(cmd);
    let attached = talk.expect("attached");
    assert_eq!(
        attached,
        format!("{} {}", spawned.handle.id.get(), spawned.handle.generation)
    );
    (spawned, talk)
}

fn dispatch() -> bool {
    match role().as_deref() {
        Some("holder") => holder_main(),
        Some("filler") => filler_main(),
        Some(other) => panic!("unknown role {other}"),
        None => return false,
    }
    true
}

// ---------------------------------------------------------------------------------
// The tests.

const LOAN: &str = "a_guest_killed_holding_a_loan_has_its_slot_reclaimed";

/// (a) A guest killed while it holds a loan written but not sent: the Loaned slot is
/// reclaimed and counted; the entry serves a new guest, which uses every slot.
// shm[verify shm.slot.loan]
// shm[verify shm.slot.reclaim]
// shm[verify shm.recover.reap]
// shm[verify shm.recover.callback]
#[test]
fn a_guest_killed_holding_a_loan_has_its_slot_reclaimed() {
    if dispatch() {
        return;
    }
    let seg = ShmPath::new("kill-loan");
    let mut host = ShmHost::create(seg.path(), config()).unwrap();
    let deaths = log_deaths(&mut host);
    let watch = watch_segment(seg.path());
    let (holder, mut talk) = spawn(&mut host, LOAN, "holder", &[("HOLD", "loan".into())]);
    let (handle, peer) = (holder.handle, holder.handle.id);
    host_warm_up(&mut host, peer, &mut talk);
    talk.expect("holding a loan");
    // 1000 bytes: one 4 KiB slot, Loaned; nothing else in use.
    assert_eq!(
        counts(&states(&watch, peer)[1]),
        [(8, 0, 0, 0), (1, 1, 0, 0)]
    );
    assert_eq!(host.peer_usage(peer).unwrap().to_host_slots.in_use, 1);
    kill_spawned(&host, holder);
    let death = await_death(&mut host, &deaths, handle, (0, 0, 1));
    assert_spawned_death(&death);
    assert_all_free(&host, &watch, peer);
    let (next, mut talk) = spawn(&mut host, LOAN, "filler", &[]);
    assert_eq!(next.handle.id, peer, "the same entry, reused");
    fill_exchange(&mut host, &watch, peer, &mut talk);
    assert_eq!(
        deaths.lock().unwrap().len(),
        1,
        "a guest that left is no death"
    );
}

const VIEWS_TEST: &str = "a_guest_killed_holding_views_has_their_slots_reclaimed";

/// (b) A guest (attached by path, killed with kill(2)) that holds three zero-copy
/// views: their Received ToGuest slots are reclaimed and counted.
// shm[verify shm.slot.view]
// shm[verify shm.slot.reclaim]
// shm[verify shm.recover.reap]
#[test]
fn a_guest_killed_holding_views_has_their_slots_reclaimed() {
    if dispatch() {
        return;
    }
    let seg = ShmPath::new("kill-views");
    let mut host = ShmHost::create(seg.path(), config()).unwrap();
    let deaths = log_deaths(&mut host);
    let watch = watch_segment(seg.path());
    let envs = [
        ("SEG", seg.path().display().to_string()),
        ("VIA", "path".to_string()),
        ("HOLD", "views".to_string()),
    ];
    let mut child = Proc::spawn(VIEWS_TEST, "holder", &envs, LONG);
    let attached = child.expect("attached");
    let (id, generation) = attached.split_once(' ').unwrap();
    let handle = PeerHandle {
        id: PeerId::new(id.parse().unwrap()).unwrap(),
        generation: generation.parse().unwrap(),
    };
    let peer = handle.id;
    host_warm_up(&mut host, peer, &mut child);
    for (n, &len) in VIEWS.iter().enumerate() {
        host.try_send(peer, Meta::new(DATA, n as u64), &pattern(6, n as u64, len))
            .unwrap();
    }
    child.expect("holding 3 views");
    assert_eq!(
        counts(&states(&watch, peer)[0]),
        [(6, 0, 0, 2), (1, 0, 0, 1)]
    );
    assert_eq!(host.peer_usage(peer).unwrap().to_guest_depth, 0);
    let status = child.kill();
    assert_eq!(status.signal(), Some(libc::SIGKILL));
    let death = await_death(&mut host, &deaths, handle, (0, 0, 3));
    assert!(
        matches!(death.cause, DeathCause::HungUp | DeathCause::LockReleased),
        "{:?}",
        death.cause
    );
    assert_eq!(death.pid, Some(child.pid()));
    assert_eq!(death.exit, None, "not the host's child");
    assert_all_free(&host, &watch, peer);
    let envs = [
        ("SEG", seg.path().display().to_string()),
        ("VIA", "path".to_string()),
    ];
    let mut next = Proc::spawn(VIEWS_TEST, "filler", &envs, LONG);
    let attached = next.expect("attached");
    assert_eq!(
        attached,
        format!("{} {}", peer.get(), handle.generation + 1),
        "the same entry, one generation later"
    );
    fill_exchange(&mut host, &watch, peer, &mut next);
    next.assert_success();
    assert_eq!(deaths.lock().unwrap().len(), 1);
}

const BOTH: &str =
    "a_guest_killed_holding_a_loan_views_and_undelivered_messages_is_counted_exactly";

/// (c) A guest killed holding a loan and three views, with three messages it never
/// took in the ToGuest ring and three it sent that the host never took in the ToHost
/// ring, while the host holds a view of its first message. The report counts exactly
/// those: 3 abandoned, 3 discarded, and 8 slots reclaimed (the loan, the views' 3, and
/// 2 + 2 named by undelivered messages); the host's view keeps its slot until dropped.
// shm[verify shm.slot.loan]
// shm[verify shm.slot.view]
// shm[verify shm.slot.reclaim]
// shm[verify shm.recover.reap]
// shm[verify shm.recover.callback]
// shm[verify shm.delivery.to-guest]
#[test]
fn a_guest_killed_holding_a_loan_views_and_undelivered_messages_is_counted_exactly() {
    if dispatch() {
        return;
    }
    let seg = ShmPath::new("kill-both");
    let mut host = ShmHost::create(seg.path(), config()).unwrap();
    let deaths = log_deaths(&mut host);
    let watch = watch_segment(seg.path());
    let (holder, mut talk) = spawn(&mut host, BOTH, "holder", &[("HOLD", "both".into())]);
    let (handle, peer) = (holder.handle, holder.handle.id);
    host_warm_up(&mut host, peer, &mut talk);
    for (n, &len) in VIEWS.iter().chain(&UNDELIVERED).enumerate() {
        host.try_send(peer, Meta::new(DATA, n as u64), &pattern(6, n as u64, len))
            .unwrap();
    }
    talk.expect("holding a loan and 3 views");
    let (_, view) = host.try_recv_message().unwrap().expect("the guest's first");
    assert_eq!(view.meta(), Meta::new(DATA, 0));
    assert_eq!(view.to_vec(), pattern(7, 0, TO_HOST[0]));
    // To the guest: views of 100 and 200 (class 0) and 1000 (class 1) Received; 250
    // (class 0) and 4000 (class 1) Sent, with the inline 30 between them.
    assert_eq!(
        counts(&states(&watch, peer)[0]),
        [(5, 0, 1, 2), (0, 0, 1, 1)]
    );
    // To the host: 100 (class 0) and 2000 (class 1) Sent, the loan of 200 (class 0),
    // and the host's view of 300 (class 1).
    assert_eq!(
        counts(&states(&watch, peer)[1]),
        [(6, 1, 1, 0), (0, 0, 1, 1)]
    );
    let usage = host.peer_usage(peer).unwrap();
    assert_eq!((usage.to_guest_depth, usage.to_host_depth), (3, 3));
    let before = host.peer_info(peer).unwrap().stats;
    kill_spawned(&host, holder);
    let death = await_death(&mut host, &deaths, handle, (3, 3, 8));
    assert_spawned_death(&death);
    let stats = host.peer_info(peer).unwrap().stats;
    assert_eq!((stats.sent, stats.received), (before.sent, before.received));
    assert_eq!((stats.sent, stats.received), (1 + 6, 1 + 1));
    // Only the host's view is left, intact; dropping it frees the last slot.
    assert_eq!(
        counts(&states(&watch, peer)[1]),
        [(8, 0, 0, 0), (1, 0, 0, 1)]
    );
    assert_eq!(
        counts(&states(&watch, peer)[0]),
        [(8, 0, 0, 0), (2, 0, 0, 0)]
    );
    assert_eq!(view.to_vec(), pattern(7, 0, TO_HOST[0]));
    drop(view);
    assert_all_free(&host, &watch, peer);
    let (next, mut talk) = spawn(&mut host, BOTH, "filler", &[]);
    assert_eq!(next.handle.id, peer, "the same entry, reused");
    fill_exchange(&mut host, &watch, peer, &mut talk);
    assert_eq!(deaths.lock().unwrap().len(), 1);
}
