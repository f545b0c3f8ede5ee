//! A random hostile guest (phase 007): while three honest guest processes exchange
//! numbered, content-checked messages with the host (echoes both ways, loans, views,
//! large payloads, broadcasts), a stream of hostile guest processes attach one after
//! the other, each writing seeded random values into every word it may write and
//! mixing in protocol calls of its own, until the host fences it or its round ends.
//! The host must never crash, must fence each hostile guest with a typed `Violation`
//! naming the rule it broke, must recover the entry clean (every ring counter zero,
//! every slot Free) once the guest is dead, and the honest guests must see no error
//! and lose no message: every message is counted both ways and the counts must match
//! exactly at the end.
//!
//! What the hostile guest writes: only what the protocol calls its own — its peer
//! entry (64 bytes) and its guest area (both rings: counters, parked flags,
//! descriptors; both directions' pools: free-list heads, slot state, link and owner
//! words, slot data; and the area's padding). Every guest maps the whole segment, so
//! it could also write other guests' entries and areas, or the shared broadcast pool;
//! version 1 attributes such writes to the victim (spec/README.md, "what
//! guest-writable means"; `shm.broadcast.untrusted`), which no host check can tell
//! from the victim's own, so the honest guests could not be promised anything. That
//! includes the guest's own holder bits in broadcast records: a record is shared by
//! every recipient, and a bit set by a guest that was never sent the broadcast is
//! counted down by the host when it reclaims that guest, freeing the slot under the
//! other holders (spec 10.4).
//!
//! The host must have seen a hostile guest attached before it starts writing (the
//! child waits for `go`): a guest that claims an entry and rewrites its word before the
//! host ever looked at it is indistinguishable from an entry nobody claimed.
//!
//! `SHMHUB_HOSTILE_SECS` sets the duration (default 60 s), `SHMHUB_HOSTILE_SEED`
//! replays a run (the seed is printed).

use std::collections::{BTreeMap, VecDeque};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use shm_guest::{Message as GuestMessage, ShmGuest};
use shm_host::{
    Death, Direction, Meta, PeerId, PeerState, SegmentConfig, SendError, ShmHost, SlotClass,
    SlotClasses, Violation,
};
use shm_primitives::{Region, Segment};
use shmhub_tests::{
    arg, hear, pattern, role, secs_from_env, seed_from_env, send_checked, tell, watch_segment,
    watchdog, Proc, Rng, ShmPath,
};

const TEST: &str = "hostile_guests_scribbling_at_random_never_hurt_the_host_or_honest_guests";
/// An honest guest's message to the host: `user_id` is its number, counting from 0.
const MSG: u32 = 7;
/// The host's echo of message `user_id`, with the same payload.
const ECHO: u32 = 8;
/// A broadcast: `user_id` counts broadcasts.
const BCAST: u32 = 9;
/// Something the host sends a hostile guest, to make it use the guest's pools.
const POKE: u32 = 10;
/// Honest messages a guest has in flight at most.
const WINDOW: u64 = 4;
const HONEST: u64 = 3;
/// The longest any honest wait may take.
const LONG: Duration = Duration::from_secs(20);
/// Seed of broadcast payloads.
const BCAST_SEED: u64 = 999;
/// A hostile guest's round ends this long after it starts, at the latest.
const ROUND_MS: std::ops::Range<u64> = 30..400;

fn config() -> SegmentConfig {
    SegmentConfig {
        max_guests: 8,
        ring_capacity: 16,
        classes: SlotClasses::new(&[SlotClass::new(128, 8), SlotClass::new(1024, 4)]),
        broadcast_slots: 8,
        broadcast_slot_size: 256,
    }
}

/// Payload lengths of honest messages: inline, both classes at their edges, and one
/// above the largest class (a memory file, `shm.msg.large`).
const LENGTHS: [usize; 11] = [0, 1, 20, 36, 37, 100, 128, 129, 700, 1024, 3000];
const BCAST_LENGTHS: [usize; 5] = [10, 36, 37, 200, 256];

fn honest_seed(who: u64) -> u64 {
    1000 + who
}

// ---------------------------------------------------------------------------------
// The honest guest.

fn honest_main() {
    watchdog();
    let who: u64 = arg("WHO").parse().unwrap();
    let seed = honest_seed(who);
    let mut rng = Rng::new(arg("SEED").parse::<u64>().unwrap() ^ seed);
    let mut guest = ShmGuest::attach_path(arg("SEG")).unwrap();
    tell(&format!(
        "attached {} {}",
        guest.peer_id().get(),
        guest.generation()
    ));
    // The parent's "stop <broadcasts>" arrives on stdin while we work.
    let (stop_tx, stop_rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = stop_tx.send(hear());
    });
    let mut expect_bcasts: Option<u64> = None;
    let (mut sent, mut echoed, mut bcasts) = (0u64, 0u64, 0u64);
    let mut last_bcast: Option<u64> = None;
    let mut held: VecDeque<GuestMessage> = VecDeque::new();
    loop {
        if expect_bcasts.is_none() {
            if let Ok(line) = stop_rx.try_recv() {
                let n = line.strip_prefix("stop ").expect("stop <n>");
                expect_bcasts = Some(n.parse().unwrap());
            }
        }
        if expect_bcasts.is_none() && sent - echoed < WINDOW {
            send_checked(&mut guest, &mut rng, &LENGTHS, (MSG, seed, sent), LONG);
            sent += 1;
            continue;
        }
        if expect_bcasts == Some(bcasts) && echoed == sent {
            break;
        }
        let (meta, payload) = next_message(&mut guest, &mut held, &mut rng);
        match meta.msg_type {
            ECHO => {
                assert_eq!(meta.user_id, echoed, "echoes come in order, none lost");
                assert!(LENGTHS.contains(&payload.len()));
                assert_eq!(payload, pattern(seed, echoed, payload.len()));
                echoed += 1;
            }
            BCAST => {
                assert!(
                    last_bcast.map_or(true, |l| l < meta.user_id),
                    "broadcasts in order"
                );
                last_bcast = Some(meta.user_id);
                assert!(BCAST_LENGTHS.contains(&payload.len()));
                assert_eq!(payload, pattern(BCAST_SEED, meta.user_id, payload.len()));
                bcasts += 1;
            }
            other => panic!("honest guest {who} got message type {other}"),
        }
    }
    drop(held);
    tell(&format!("done {sent} {echoed} {bcasts}"));
    guest.detach();
}

/// The next message, read in place or copied at random; up to two views are held
/// across calls (never across a blocking wait, so the host always has slots to echo
/// into).
fn next_message(
    guest: &mut ShmGuest,
    held: &mut VecDeque<GuestMessage>,
    rng: &mut Rng,
) -> (Meta, Vec<u8>) {
    if let Some(m) = guest.try_recv_message().unwrap() {
        let got = (m.meta(), m.to_vec());
        if rng.chance(1, 2) {
            held.push_back(m);
            if held.len() > 2 {
                held.pop_front();
            }
        }
        return got;
    }
    held.clear();
    if rng.chance(1, 2) {
        let m = guest
            .recv_message(LONG)
            .unwrap()
            .expect("a message in time");
        (m.meta(), m.to_vec())
    } else {
        let mut buf = Vec::new();
        let meta = guest
            .recv(&mut buf, LONG)
            .unwrap()
            .expect("a message in time");
        (meta, buf)
    }
}

// ---------------------------------------------------------------------------------
// The hostile guest.

/// The words one guest may write: its peer entry and its guest area.
struct OwnArea<'s> {
    region: Region<'s>,
    entry: usize,
    area: usize,
    area_len: usize,
    /// ToGuest, ToHost.
    rings: [usize; 2],
    capacity: u64,
    /// (offset, slot count, slot size, metadata length) of each pool, ToGuest classes
    /// first.
    pools: Vec<(usize, u64, u64, u64)>,
}

impl<'s> OwnArea<'s> {
    fn new(seg: &'s Segment, id: PeerId) -> Self {
        let layout = seg.layout();
        let index = id.index();
        let mut pools = Vec::new();
        for dir in [Direction::ToGuest, Direction::ToHost] {
            for (class, g) in layout.pool_geometries().iter().enumerate() {
                pools.push((
                    layout.pool_offset(index, dir, class) as usize,
                    u64::from(g.count),
                    u64::from(g.slot_size),
                    g.meta_len,
                ));
            }
        }
        Self {
            region: seg.backing().region(),
            entry: layout.peer_offset(index) as usize,
            area: layout.guest_area_offset(index) as usize,
            area_len: layout.guest_area_stride as usize,
            rings: [
                layout.ring_offset(index, Direction::ToGuest) as usize,
                layout.ring_offset(index, Direction::ToHost) as usize,
            ],
            capacity: u64::from(layout.config.ring_capacity),
            pools,
        }
    }

    fn word(&self, off: usize) -> &std::sync::atomic::AtomicU64 {
        debug_assert!(
            (self.entry..self.entry + 64).contains(&off)
                || (self.area..self.area + self.area_len).contains(&off),
            "only our own entry and area"
        );
        self.region.atomic_u64(off).expect("in the segment")
    }

    fn put(&self, off: usize, value: u64) {
        self.word(off).store(value, Ordering::Release);
    }

    fn get(&self, off: usize) -> u64 {
        self.word(off).load(Ordering::Acquire)
    }

    /// One random write somewhere we may write, biased towards values that look
    /// almost right (they get further into the host's checks than noise does).
    fn scribble(&self, rng: &mut Rng) {
        let ring = self.rings[rng.below(2) as usize];
        // Per mille: a write to the state word fences almost at once, so it is rare,
        // leaving time for the values the host finds later (rings, pools, slots).
        match rng.below(1000) {
            // The entry's state word: mostly a valid state at a nearby generation.
            0..=4 => {
                let cur = self.get(self.entry);
                let value = if rng.chance(4, 5) {
                    let g = (cur >> 32) as u32;
                    let g = match rng.below(4) {
                        0 => g,
                        1 => g.wrapping_add(1),
                        2 => g.wrapping_sub(1),
                        _ => rng.next_u64() as u32,
                    };
                    (u64::from(g) << 32) | rng.below(5)
                } else {
                    rng.next_u64()
                };
                self.put(self.entry, value);
            }
            // guest_pid, fault, reserved.
            5..=40 => self.put(self.entry + 8 * (1 + rng.below(7) as usize), noise(rng)),
            // Ring counters: tail at 0, head at 64, mostly near their value.
            41..=240 => {
                let off = ring + *rng.pick(&[0, 64]);
                let value = near(rng, self.get(off), self.capacity);
                self.put(off, value);
            }
            // Parked flags (consumer's at 8, producer's at 72), with their padding.
            241..=320 => {
                let off = ring + *rng.pick(&[8, 72]);
                let any = rng.next_u64();
                self.put(off, *rng.pick(&[0, 1, 2, 3, any]));
            }
            // A descriptor word of either ring.
            321..=520 => {
                let off = ring + 128 + 8 * rng.below(self.capacity * 8) as usize;
                let cur = self.get(off);
                let value = match rng.below(3) {
                    0 => cur ^ (1 << rng.below(64)),
                    1 => noise(rng),
                    _ => rng.next_u64(),
                };
                self.put(off, value);
            }
            // Pool metadata: free-list head, slot words, links, owners.
            521..=800 => {
                let &(pool, count, _, _) = rng.pick(&self.pools);
                let i = rng.below(count) as usize;
                match rng.below(4) {
                    0 => {
                        let tag = rng.next_u64() << 32;
                        let low = match rng.chance(3, 4) {
                            true => rng.below(count + 3),
                            false => rng.next_u64() & 0xffff_ffff,
                        };
                        self.put(pool, tag | low);
                    }
                    1 => {
                        let off = pool + 64 + 8 * i;
                        let g = (self.get(off) >> 32) as u32;
                        let g = match rng.below(3) {
                            0 => g,
                            1 => g.wrapping_add(1),
                            _ => g.wrapping_sub(1),
                        };
                        let state = match rng.chance(9, 10) {
                            true => rng.below(5),
                            false => rng.next_u64() & 0xffff_ffff,
                        };
                        self.put(off, (u64::from(g) << 32) | state);
                    }
                    // Links (two u32 per word) and owners: the arrays after the states.
                    _ => {
                        // `count` words: 4-byte links, then 4-byte owners.
                        let links = pool + 64 + 8 * count as usize;
                        let off = links + 8 * rng.below(count) as usize;
                        let value = match rng.chance(3, 4) {
                            true => rng.below(count + 3) | (rng.below(count + 3) << 32),
                            false => rng.next_u64(),
                        };
                        self.put(off & !7, value);
                    }
                }
            }
            // Slot data.
            801..=900 => {
                let &(pool, count, size, meta) = rng.pick(&self.pools);
                let off = pool + meta as usize + (rng.below(count * size / 8) * 8) as usize;
                self.put(off, rng.next_u64());
            }
            // Anything in the area, or the entry.
            _ => {
                let off = match rng.chance(1, 50) {
                    true => self.entry + 8 * rng.below(8) as usize,
                    false => self.area + 8 * rng.below(self.area_len as u64 / 8) as usize,
                };
                self.put(off, rng.next_u64());
            }
        }
    }

    /// Publishes a forged descriptor on our ToHost ring at the position its shared
    /// tail says: plausible in every field but one or two.
    fn forge(&self, rng: &mut Rng) {
        let ring = self.rings[1];
        let tail = self.get(ring);
        let seq = match rng.chance(9, 10) {
            true => tail,
            false => tail ^ (1 << rng.below(64)),
        };
        let kind = *rng.pick(&[0u64, 0, 1, 1, 1, 2, 3, 4, 0xff]);
        let classes = self.pools.len() as u64 / 2;
        let class = *rng.pick(&[0u64, 0, 1, 1, classes, 7]);
        let msg_kind = *rng.pick(&[0u64, 0, 0, 1, 2, 3, 4]);
        let len = *rng.pick(&[0u64, 1, 36, 37, 100, 128, 129, 1024, 1025, 5000, 1 << 31]);
        let (index, generation) = match self.pools.get((classes + class) as usize) {
            Some(&(pool, count, _, _)) if class < classes => {
                let index = rng.below(count + 1);
                let word = pool + 64 + 8 * index as usize;
                let mut g = if index < count {
                    (self.get(word) >> 32) as u32
                } else {
                    0
                };
                // Mostly a slot we made look in flight.
                if index < count && kind == 1 && rng.chance(2, 3) {
                    g = g.wrapping_add(rng.below(2) as u32);
                    self.put(word, (u64::from(g) << 32) | 2);
                }
                (index, g.wrapping_add(rng.chance(1, 8) as u32))
            }
            _ => (rng.below(64), rng.below(4) as u32),
        };
        let mut words = [0u64; 8];
        words[0] = seq;
        words[1] = rng.next_u64();
        words[2] = u64::from(rng.next_u64() as u32) | (len << 32);
        words[3] = kind | (class << 8) | (msg_kind << 16);
        match kind {
            1 | 2 => {
                words[3] |= index << 32;
                words[4] = u64::from(generation);
            }
            3 => {
                let large_seq = rng.below(4);
                words[3] |= large_seq << 32;
                words[4] = large_seq >> 32;
            }
            _ => {
                for w in &mut words[3..] {
                    *w |= rng.next_u64() & !0xff_ffff;
                }
            }
        }
        if rng.chance(1, 10) {
            words[3] |= 1 << 24; // the reserved byte 27
        }
        let desc = ring + 128 + 64 * (tail % self.capacity) as usize;
        for (i, w) in words.iter().enumerate() {
            self.put(desc + 8 * i, *w);
        }
        if rng.chance(9, 10) {
            self.put(ring, tail.wrapping_add(1));
        }
    }
}

/// A value near `cur`: off by a little, by about a ring's worth, zero, or noise.
fn near(rng: &mut Rng, cur: u64, capacity: u64) -> u64 {
    match rng.below(7) {
        0 => cur.wrapping_add(1),
        1 => cur.wrapping_sub(1),
        2 => cur.wrapping_add(rng.below(2 * capacity + 2)),
        3 => cur.wrapping_sub(rng.below(capacity + 2)),
        4 => cur.wrapping_add(capacity),
        5 => 0,
        _ => rng.next_u64(),
    }
}

/// Small numbers, edges and noise.
fn noise(rng: &mut Rng) -> u64 {
    match rng.below(4) {
        0 => rng.below(4),
        1 => *rng.pick(&[u64::MAX, u64::from(u32::MAX), 1 << 32, 1 << 63]),
        _ => rng.next_u64(),
    }
}

fn hostile_main() {
    watchdog();
    let mut rng = Rng::new(arg("SEED").parse().unwrap());
    let path = arg("SEG");
    let mut guest = ShmGuest::attach_path(&path).unwrap();
    tell(&format!(
        "attached {} {}",
        guest.peer_id().get(),
        guest.generation()
    ));
    assert_eq!(hear(), "go");
    // A second mapping of our own, taking no lock: what a hostile process writes with.
    let seg = watch_segment(Path::new(&path));
    let area = OwnArea::new(&seg, guest.peer_id());
    let mut held: VecDeque<GuestMessage> = VecDeque::new();
    let mut buf = Vec::new();
    let (mut writes, mut reported) = (0u64, 0u64);
    loop {
        match rng.below(16) {
            0..=9 => {
                area.scribble(&mut rng);
                writes += 1;
            }
            10 => {
                area.forge(&mut rng);
                writes += 1;
            }
            // Our own traffic, whatever state we left things in; errors are expected.
            11 | 12 => {
                let len = *rng.pick(&[0, 5, 36, 37, 128, 129, 1024, 3000]);
                let meta = Meta::new(rng.next_u64() as u32, rng.next_u64());
                let _ = guest.try_send(meta, &vec![0xab; len]);
            }
            13 => {
                if let Ok(mut loan) = guest.loan(1 + rng.below(1024) as usize) {
                    let _ = loan.write_at(0, b"hostile");
                    let len = rng.below(1100) as usize;
                    let _ = loan.send(Meta::new(POKE, 0), len);
                }
            }
            14 => {
                if let Ok(Some(m)) = guest.try_recv_message() {
                    held.push_back(m);
                    if held.len() > 4 {
                        held.pop_front();
                    }
                }
            }
            _ => {
                let _ = guest.try_recv(&mut buf);
                held.clear();
            }
        }
        // Every write is told: most rounds end in a fence within a few of them.
        if writes > reported {
            reported = writes;
            tell(&format!("writes {writes}"));
        }
        // Load shaping only: let the host and the honest guests have the cores.
        if rng.chance(1, 32) {
            std::thread::sleep(Duration::from_micros(300));
        }
    }
}

// ---------------------------------------------------------------------------------
// The host.

struct Honest {
    proc: Proc,
    id: PeerId,
    who: u64,
    /// The number of the next message expected from it.
    next: u64,
    /// Echoes waiting for room towards it.
    echoes: VecDeque<(u64, Vec<u8>)>,
    echoed: u64,
    /// Broadcasts published to it.
    bcasts: u64,
}

enum Round {
    /// Spawned; waiting for it to say it attached.
    Starting { proc: Proc, since: Instant },
    /// Scribbling.
    Running {
        proc: Proc,
        id: PeerId,
        generation: u32,
        deadline: Instant,
        fenced: Option<Violation>,
        writes: u64,
    },
    /// Killed; waiting for the host to recover its entry.
    Recovering {
        id: PeerId,
        generation: u32,
        since: Instant,
    },
}

#[derive(Default)]
struct Figures {
    rounds: u64,
    by_fence: BTreeMap<String, u64>,
    by_deadline: u64,
    writes: u64,
    hostile_msgs: u64,
    hostile_sends: u64,
    broadcasts: u64,
    host_views: u64,
}

/// The host side: everything runs on this one thread, as a real host's loop would.
struct Hub {
    host: ShmHost,
    watch: Segment,
    honest: Vec<Honest>,
    rng: Rng,
    views: VecDeque<(PeerId, shm_host::Message)>,
    /// Whether views are kept a while (until the end, when the guests leave: a view
    /// the host holds past a guest's recycle frees its slot onto the next guest's free
    /// list, which is legitimate but not the fresh entry the end checks for).
    hold_views: bool,
    buf: Vec<u8>,
    next_bcast: u64,
    fig: Figures,
}

impl Hub {
    fn honest_index(&self, id: PeerId) -> Option<usize> {
        self.honest.iter().position(|h| h.id == id)
    }

    /// Receives what is waiting (up to a bound), checks honest messages and queues
    /// their echoes, and returns the hostile guest fenced by a receive, if any. Views
    /// of a hostile guest's messages are kept only while it runs: the entry of a killed
    /// one must be recovered with no slot held.
    fn serve(
        &mut self,
        hostile: Option<PeerId>,
        hostile_runs: bool,
    ) -> Option<(PeerId, Violation)> {
        let mut fenced = None;
        for _ in 0..32 {
            let got = if self.rng.chance(1, 4) {
                self.host.try_recv_message().map(|got| {
                    got.map(|(r, m)| {
                        let payload = m.to_vec();
                        let keep = hostile_runs || Some(r.from) != hostile;
                        if self.hold_views && keep {
                            self.views.push_back((r.from, m));
                            self.fig.host_views += 1;
                            if self.views.len() > 4 {
                                self.views.pop_front();
                            }
                        }
                        (r, payload)
                    })
                })
            } else {
                let mut buf = std::mem::take(&mut self.buf);
                let got = self.host.try_recv(&mut buf);
                let got = got.map(|r| r.map(|r| (r, buf.clone())));
                self.buf = buf;
                got
            };
            match got {
                Ok(Some((r, payload))) => self.on_message(r, payload, hostile),
                Ok(None) => break,
                Err(e) => {
                    assert!(
                        self.honest_index(e.peer).is_none(),
                        "honest guest {} fenced: {e}",
                        e.peer
                    );
                    assert_eq!(Some(e.peer), hostile, "only the hostile guest is fenced");
                    fenced = Some((e.peer, e.violation));
                }
            }
        }
        fenced
    }

    fn on_message(&mut self, r: shm_host::Received, payload: Vec<u8>, hostile: Option<PeerId>) {
        let Some(i) = self.honest_index(r.from) else {
            assert_eq!(Some(r.from), hostile, "a message from nobody we know");
            self.fig.hostile_msgs += 1;
            // Answer some, so the host writes into the hostile guest's pools.
            if payload.len() <= 1024 && self.rng.chance(1, 2) {
                let _ = self.host.try_send(r.handle(), Meta::new(POKE, 1), &payload);
            }
            return;
        };
        let h = &mut self.honest[i];
        assert_eq!(
            (r.meta, r.meta.kind),
            (Meta::new(MSG, h.next), shm_host::MsgKind::Plain),
            "honest guest {} in order",
            h.who
        );
        assert!(LENGTHS.contains(&payload.len()));
        assert_eq!(payload, pattern(honest_seed(h.who), h.next, payload.len()));
        h.echoes.push_back((h.next, payload));
        h.next += 1;
    }

    /// Sends the echoes that fit now.
    fn echo(&mut self) {
        for h in &mut self.honest {
            while let Some((n, payload)) = h.echoes.front() {
                let meta = Meta::new(ECHO, *n);
                let sent = if payload.len() <= 1024 && self.rng.chance(1, 3) {
                    self.host.loan(h.id, payload.len()).and_then(|mut loan| {
                        assert!(loan.write_at(0, payload));
                        loan.send(meta, payload.len())
                    })
                } else {
                    self.host.try_send(h.id, meta, payload)
                };
                match sent {
                    Ok(()) => {
                        h.echoes.pop_front();
                        h.echoed += 1;
                    }
                    Err(e) if e.is_would_block() => break,
                    Err(e) => panic!("echo to honest guest {}: {e}", h.who),
                }
            }
        }
    }

    /// Broadcasts one numbered payload; counts who was sent it.
    fn broadcast(&mut self, hostile: Option<PeerId>) {
        let k = self.next_bcast;
        let len = *self.rng.pick(&BCAST_LENGTHS);
        match self
            .host
            .broadcast(Meta::new(BCAST, k), &pattern(BCAST_SEED, k, len))
        {
            Ok(report) => {
                self.next_bcast += 1;
                self.fig.broadcasts += 1;
                for h in &mut self.honest {
                    assert!(!report.fenced.contains(h.id), "honest guest fenced");
                    if report.delivered.contains(h.id) {
                        h.bcasts += 1;
                    }
                }
                for id in report.fenced.iter() {
                    assert_eq!(Some(id), hostile);
                }
            }
            Err(e) if e.is_would_block() => {}
            Err(e) => panic!("broadcast: {e}"),
        }
    }

    /// Writes into the hostile guest's ToGuest ring and pools.
    fn poke(&mut self, id: PeerId) -> Option<Violation> {
        let len = *self.rng.pick(&[3, 36, 100, 600, 1024, 2000]);
        let sent = match self.rng.chance(1, 3) && len <= 1024 {
            true => self
                .host
                .loan(id, len)
                .and_then(|loan| loan.send(Meta::new(POKE, 2), len)),
            false => self.host.try_send(id, Meta::new(POKE, 3), &vec![0x5a; len]),
        };
        self.fig.hostile_sends += u64::from(sent.is_ok());
        match sent {
            Err(SendError::Fenced { violation, .. }) => Some(violation),
            _ => None,
        }
    }

    /// Drops the views the host holds of `id`'s messages.
    fn drop_views_of(&mut self, id: PeerId) {
        self.views.retain(|(from, _)| *from != id);
    }

    /// Whether entry `id` is back to a fresh entry: both rings at zero with no parked
    /// flag, every slot of both directions Free and both free lists empty.
    fn entry_clean(&self, id: PeerId) -> Result<(), String> {
        let layout = self.watch.layout();
        let region = self.watch.backing().region();
        let word = |off: u64| {
            region
                .atomic_u64(off as usize)
                .unwrap()
                .load(Ordering::Acquire)
        };
        for dir in [Direction::ToGuest, Direction::ToHost] {
            let ring = layout.ring_offset(id.index(), dir);
            for off in [0, 8, 64, 72] {
                let w = word(ring + off);
                // The parked flags share their word with reserved bytes.
                let w = if off % 64 == 8 { w & 0xffff_ffff } else { w };
                if w != 0 {
                    return Err(format!("{dir:?} ring word {off} is {w:#x}"));
                }
            }
            let pools = self.watch.pools(id, dir).unwrap();
            for class in 0..pools.classes() {
                let pool = pools.class(class).unwrap();
                let head = word(layout.pool_offset(id.index(), dir, class));
                if head & 0xffff_ffff != 0 {
                    return Err(format!("{dir:?} class {class} free list head {head:#x}"));
                }
                for i in 0..pool.count() {
                    let state = pool.state(i);
                    if state != Some(shm_primitives::slot::SlotState::Free) {
                        return Err(format!("{dir:?} class {class} slot {i} is {state:?}"));
                    }
                }
            }
        }
        Ok(())
    }
}

/// A child that exited on its own instead of being killed: a panic in the guest
/// library (or the harness), which is a failure.
fn assert_killed(status: std::process::ExitStatus, what: &str) {
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        status.signal(),
        Some(libc::SIGKILL),
        "{what} ended on its own: {status}"
    );
}

// shm[verify shm.untrusted.validate]
// shm[verify shm.untrusted.fence]
// shm[verify shm.recover.fenced]
// shm[verify shm.peer.observed]
// shm[verify shm.delivery.to-host]
// shm[verify shm.delivery.to-guest]
#[test]
fn hostile_guests_scribbling_at_random_never_hurt_the_host_or_honest_guests() {
    match role().as_deref() {
        Some("honest") => return honest_main(),
        Some("hostile") => return hostile_main(),
        _ => {}
    }
    let seconds = secs_from_env("SHMHUB_HOSTILE_SECS", 60);
    let seed = seed_from_env("SHMHUB_HOSTILE_SEED");
    let seg = ShmPath::new("hostile-random");
    let mut host = ShmHost::create(seg.path(), config()).unwrap();
    let deaths: Arc<Mutex<Vec<Death>>> = Arc::default();
    let sink = deaths.clone();
    host.on_death(move |d| sink.lock().unwrap().push(*d));
    let path = seg.path().display().to_string();
    let child_limit = seconds + Duration::from_secs(120);
    let mut honest: Vec<Honest> = (0..HONEST)
        .map(|who| {
            let env = [
                ("SEG", path.clone()),
                ("WHO", who.to_string()),
                ("SEED", seed.to_string()),
            ];
            let mut proc = Proc::spawn(TEST, "honest", &env, child_limit);
            let attached = proc.expect("attached");
            let id: u8 = attached.split(' ').next().unwrap().parse().unwrap();
            Honest {
                proc,
                id: PeerId::new(id).unwrap(),
                who,
                next: 0,
                echoes: VecDeque::new(),
                echoed: 0,
                bcasts: 0,
            }
        })
        .collect();
    honest.sort_by_key(|h| h.who);
    let mut hub = Hub {
        watch: watch_segment(seg.path()),
        host,
        honest,
        rng: Rng::new(seed),
        views: VecDeque::new(),
        hold_views: true,
        buf: Vec::new(),
        next_bcast: 0,
        fig: Figures::default(),
    };
    let start = Instant::now();
    let end = start + seconds;
    let mut round: Option<Round> = None;
    let mut round_no = 0u64;
    let mut next_bcast_at = Instant::now();
    loop {
        // Until its entry is recovered, the host may still read what a killed
        // hostile guest left.
        let hostile = match &round {
            Some(Round::Running { id, .. } | Round::Recovering { id, .. }) => Some(*id),
            _ => None,
        };
        let runs = matches!(round, Some(Round::Running { .. }));
        let fenced_now = hub.serve(hostile, runs);
        hub.echo();
        if Instant::now() >= next_bcast_at {
            hub.broadcast(hostile);
            next_bcast_at = Instant::now() + Duration::from_millis(3);
        }
        for h in &mut hub.honest {
            if let Some(status) = h.proc.try_wait() {
                panic!("honest guest {} exited early: {status}", h.who);
            }
        }
        round = match round.take() {
            None if Instant::now() >= end => break,
            None => {
                round_no += 1;
                let env = [
                    ("SEG", path.clone()),
                    (
                        "SEED",
                        (seed ^ round_no.wrapping_mul(0x9E37_79B9)).to_string(),
                    ),
                ];
                let limit = Duration::from_millis(ROUND_MS.end) + Duration::from_secs(60);
                let proc = Proc::spawn(TEST, "hostile", &env, limit);
                Some(Round::Starting {
                    proc,
                    since: Instant::now(),
                })
            }
            Some(Round::Starting { mut proc, since }) => match proc.poll_line(Duration::ZERO) {
                Some(line) => {
                    let mut it = line.strip_prefix("attached ").expect("attached").split(' ');
                    let id = PeerId::new(it.next().unwrap().parse().unwrap()).unwrap();
                    let generation = it.next().unwrap().parse().unwrap();
                    // The host looks at every entry, so it has seen this guest attached.
                    hub.host.maintain();
                    proc.say("go");
                    let ms = ROUND_MS.start + hub.rng.below(ROUND_MS.end - ROUND_MS.start);
                    Some(Round::Running {
                        proc,
                        id,
                        generation,
                        deadline: Instant::now() + Duration::from_millis(ms),
                        fenced: None,
                        writes: 0,
                    })
                }
                None => {
                    assert!(since.elapsed() < LONG, "hostile guest did not attach");
                    if let Some(status) = proc.try_wait() {
                        panic!("hostile guest exited before attaching: {status}");
                    }
                    Some(Round::Starting { proc, since })
                }
            },
            Some(Round::Running {
                mut proc,
                id,
                generation,
                deadline,
                mut fenced,
                mut writes,
            }) => {
                if let Some((_, v)) = fenced_now {
                    fenced.get_or_insert(v);
                }
                if fenced.is_none() && hub.rng.chance(1, 4) {
                    fenced = hub.poke(id);
                }
                // Found by background work (a liveness pass, a broadcast, maintain).
                if fenced.is_none() {
                    fenced = hub.host.peer_info(id).unwrap().fenced;
                }
                while let Some(line) = proc.poll_line(Duration::ZERO) {
                    writes = line.strip_prefix("writes ").unwrap().parse().unwrap();
                }
                if fenced.is_some() || Instant::now() >= deadline {
                    if let Some(status) = proc.try_wait() {
                        assert_killed(status, "a hostile guest");
                    }
                    hub.drop_views_of(id);
                    assert_killed(proc.kill(), "a hostile guest");
                    hub.fig.rounds += 1;
                    hub.fig.writes += writes;
                    match fenced {
                        Some(v) => {
                            assert!(v.rule().starts_with("shm."), "{v:?} names its rule");
                            let name = format!("{v:?}");
                            let name = name.split([' ', '{']).next().unwrap().to_string();
                            let key = format!("{name} ({})", v.rule());
                            *hub.fig.by_fence.entry(key).or_default() += 1;
                        }
                        None => hub.fig.by_deadline += 1,
                    }
                    Some(Round::Recovering {
                        id,
                        generation,
                        since: Instant::now(),
                    })
                } else {
                    Some(Round::Running {
                        proc,
                        id,
                        generation,
                        deadline,
                        fenced,
                        writes,
                    })
                }
            }
            Some(Round::Recovering {
                id,
                generation,
                since,
            }) => {
                let info = hub.host.peer_info(id).unwrap();
                let died = deaths
                    .lock()
                    .unwrap()
                    .iter()
                    .any(|d| d.peer == id && d.generation == generation);
                if died && info.state == Some(PeerState::Empty) && info.fenced.is_none() {
                    // Recovered at the next generation, whatever the guest wrote
                    // (`shm.recover.fenced`, `shm.peer.observed`).
                    assert_eq!(info.generation, generation.wrapping_add(1), "{info:?}");
                    if let Err(what) = hub.entry_clean(id) {
                        panic!("entry {id} after its hostile guest died: {what} ({info:?})");
                    }
                    None
                } else {
                    assert!(
                        since.elapsed() < LONG,
                        "entry {id} not recovered after its hostile guest (generation \
                         {generation}, round {round_no}) died: {info:?}; last deaths {:?}",
                        deaths
                            .lock()
                            .unwrap()
                            .iter()
                            .rev()
                            .take(2)
                            .collect::<Vec<_>>()
                    );
                    Some(Round::Recovering {
                        id,
                        generation,
                        since,
                    })
                }
            }
        };
        if round.is_none() || matches!(round, Some(Round::Starting { .. })) {
            // Nothing hostile runs: wait for traffic rather than spin.
            if let Ok(Some(r)) = hub.host.recv(&mut hub.buf, Duration::from_millis(1)) {
                let payload = hub.buf.clone();
                hub.on_message(r, payload, None);
            }
        }
    }
    // The end: every honest guest is told how many broadcasts it was sent, and the
    // host serves until each has all its echoes and broadcasts.
    let mut done = vec![None; hub.honest.len()];
    hub.hold_views = false;
    hub.views.clear();
    for h in &mut hub.honest {
        h.proc.say(&format!("stop {}", h.bcasts));
    }
    let stop = Instant::now();
    while done.iter().any(Option::is_none) {
        assert!(stop.elapsed() < LONG, "honest guests did not finish");
        if let Some((peer, v)) = hub.serve(None, false) {
            panic!("{peer} fenced at the end: {v}");
        }
        hub.echo();
        for (i, h) in hub.honest.iter_mut().enumerate() {
            if done[i].is_none() {
                if let Some(line) = h.proc.poll_line(Duration::ZERO) {
                    let rest = line.strip_prefix("done ").expect("done");
                    let n: Vec<u64> = rest.split(' ').map(|x| x.parse().unwrap()).collect();
                    done[i] = Some((n[0], n[1], n[2]));
                }
            }
        }
    }
    let mut messages = 0;
    for (h, d) in hub.honest.iter_mut().zip(&done) {
        let (sent, echoed, bcasts) = d.unwrap();
        h.proc.assert_success();
        assert_eq!(
            (h.next, h.echoed, h.echoes.len()),
            (sent, echoed, 0),
            "honest guest {}: every message received and echoed",
            h.who
        );
        assert_eq!(sent, echoed);
        assert_eq!(bcasts, h.bcasts, "honest guest {}: every broadcast", h.who);
        messages += 2 * sent;
    }
    // Every guest has left: the host's accounting is exact.
    hub.views.clear();
    let ids: Vec<PeerId> = (0..config().max_guests as usize)
        .filter_map(PeerId::from_index)
        .collect();
    let settle = Instant::now();
    while !ids.iter().all(|&id| {
        let info = hub.host.peer_info(id).unwrap();
        info.state == Some(PeerState::Empty) && info.fenced.is_none()
    }) {
        assert!(settle.elapsed() < LONG, "entries not all Empty");
        hub.host.maintain();
        std::thread::yield_now();
    }
    for &id in &ids {
        if let Err(what) = hub.entry_clean(id) {
            panic!("entry {id} at the end: {what}");
        }
    }
    assert_eq!(hub.host.broadcast_usage().unwrap().in_use, 0);
    let deaths = deaths.lock().unwrap();
    assert_eq!(
        deaths.len() as u64,
        hub.fig.rounds,
        "one death per hostile guest"
    );
    let f = &hub.fig;
    eprintln!(
        "hostile_random: {:.1} s, seed {seed}, {} rounds ({} fenced, {} ended by deadline), \
         at least {} hostile writes, {} hostile messages received, {} sent to hostile guests, \
         {} honest messages (both ways), {} broadcasts, {} host views",
        start.elapsed().as_secs_f64(),
        f.rounds,
        f.rounds - f.by_deadline,
        f.by_deadline,
        f.writes,
        f.hostile_msgs,
        f.hostile_sends,
        messages,
        f.broadcasts,
        f.host_views,
    );
    for (kind, n) in &f.by_fence {
        eprintln!("  fenced for {kind}: {n}");
    }
    assert!(f.rounds > 0 && messages > 0);
}
