//! Chaos soak (phase 007): for a fixed time, guest processes attach (by path, or with
//! a spawn ticket from `ShmHost::spawn`), run mixed, content-checked load — numbered
//! messages of every size (inline, both slot classes, memory files above them) echoed
//! by the host, loans, views held across calls on both sides, calls through an
//! `RpcClient`, broadcasts — and are SIGKILLed at random moments or told to leave,
//! while new ones keep attaching. At the end, with every guest gone, the host must hold
//! exactly what it held before the first one came (`shm.recover.quiescent`): every
//! entry Empty with both rings at zero and every slot Free, every broadcast slot Free,
//! its counters equal to what the test counted, one death per kill (never one for a
//! guest that left), no more descriptors or shared mappings than at the start, no
//! child left (alive or zombie), and, once the host is dropped, no file in /dev/shm.
//!
//! `SHMHUB_CHAOS_SECS` sets the duration (default 60 s), `SHMHUB_CHAOS_SEED` replays
//! a run's random choices (the seed is printed; timing still varies).

use std::collections::{HashMap, VecDeque};
use std::os::unix::process::ExitStatusExt;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use shm_guest::{Message as GuestMessage, RpcClient, ShmGuest};
use shm_host::{
    Death, Meta, PeerHandle, PeerId, PeerState, Received, SegmentConfig, ShmHost, SlotClass,
    SlotClasses,
};
use shm_primitives::Segment;
use shmhub_tests::{
    arg, attach_as_told, hear, open_fds, our_shm_files, pattern, role, role_command, secs_from_env,
    seed_from_env, send_checked, shared_mappings, tell, watch_segment, watchdog, Proc, Rng,
    ShmPath, Talk,
};

const TEST: &str = "guests_attaching_working_and_dying_at_random_leave_nothing_behind";
/// A guest's numbered message; the host echoes it as `ECHO` with the same payload.
const MSG: u32 = 1;
const ECHO: u32 = 2;
/// A broadcast; `user_id` counts broadcasts.
const BCAST: u32 = 3;
/// A call's `msg_type`; the response carries the request's payload reversed.
const CALL: u32 = 4;
const LONG: Duration = Duration::from_secs(20);
const WINDOW: u64 = 4;
/// Guests alive (or starting) at once.
const POPULATION: usize = 5;
const BCAST_SEED: u64 = 77;
const LENGTHS: [usize; 10] = [0, 7, 36, 37, 128, 129, 600, 1024, 1025, 5000];
const CALL_LENGTHS: [usize; 6] = [0, 20, 37, 300, 1000, 1024];
const BCAST_LENGTHS: [usize; 4] = [12, 36, 100, 256];

/// Room for `POPULATION` guests plus those whose entries are still being recovered.
fn config() -> SegmentConfig {
    SegmentConfig {
        max_guests: 12,
        ring_capacity: 16,
        classes: SlotClasses::new(&[SlotClass::new(128, 8), SlotClass::new(1024, 4)]),
        broadcast_slots: 8,
        broadcast_slot_size: 256,
    }
}

/// The payload seed of a guest incarnation: both sides derive it from the handle.
fn seed_of(id: PeerId, generation: u32) -> u64 {
    (u64::from(id.get()) << 32) | u64::from(generation)
}

fn reversed(payload: &[u8]) -> Vec<u8> {
    payload.iter().rev().copied().collect()
}

// ---------------------------------------------------------------------------------
// The guests.

/// Attaches as the parent said, reports the handle, and returns the guest with the
/// channel on which the parent's later lines ("leave") arrive.
fn attach() -> (ShmGuest, mpsc::Receiver<String>) {
    watchdog();
    let guest = attach_as_told().unwrap();
    tell(&format!(
        "attached {} {}",
        guest.peer_id().get(),
        guest.generation()
    ));
    assert_eq!(hear(), "go");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(hear());
    });
    (guest, rx)
}

/// Checks a broadcast: numbered in order, with its pattern.
fn check_bcast(last: &mut Option<u64>, meta: Meta, payload: &[u8]) {
    assert_eq!(meta.msg_type, BCAST);
    assert!(
        last.map_or(true, |l| l < meta.user_id),
        "broadcasts in order"
    );
    *last = Some(meta.user_id);
    assert!(BCAST_LENGTHS.contains(&payload.len()));
    assert_eq!(payload, pattern(BCAST_SEED, meta.user_id, payload.len()));
}

/// Numbered messages of every size, echoed back; views held across calls.
fn plain_main() {
    let (mut guest, leave) = attach();
    let seed = seed_of(guest.peer_id(), guest.generation());
    let mut rng = Rng::new(arg("SEED").parse::<u64>().unwrap() ^ seed);
    let (mut sent, mut echoed) = (0u64, 0u64);
    let mut leaving = false;
    let mut last_bcast = None;
    let mut held: VecDeque<GuestMessage> = VecDeque::new();
    loop {
        leaving |= leave.try_recv().is_ok();
        if !leaving && sent - echoed < WINDOW {
            send_checked(&mut guest, &mut rng, &LENGTHS, (MSG, seed, sent), LONG);
            sent += 1;
            continue;
        }
        if leaving && echoed == sent {
            break;
        }
        // A view of what is waiting, sometimes kept; a blocking wait holds none.
        let got = match guest.try_recv_message().unwrap() {
            Some(m) => {
                let got = (m.meta(), m.to_vec());
                if rng.chance(1, 2) {
                    held.push_back(m);
                    if held.len() > 2 {
                        held.pop_front();
                    }
                }
                got
            }
            None => {
                held.clear();
                let mut buf = Vec::new();
                let meta = guest.recv(&mut buf, LONG).unwrap().expect("a message");
                (meta, buf)
            }
        };
        match got {
            (meta, payload) if meta.msg_type == ECHO => {
                assert_eq!(meta.user_id, echoed, "echoes in order");
                assert_eq!(payload, pattern(seed, echoed, payload.len()));
                echoed += 1;
            }
            (meta, payload) => check_bcast(&mut last_bcast, meta, &payload),
        }
    }
    drop(held);
    tell(&format!("leaving {sent}"));
    guest.detach();
}

/// Calls through an `RpcClient`; broadcasts queue as other messages.
fn rpc_main() {
    let (guest, leave) = attach();
    let seed = seed_of(guest.peer_id(), guest.generation());
    let mut rng = Rng::new(arg("SEED").parse::<u64>().unwrap() ^ seed);
    let client = RpcClient::new(guest).unwrap();
    let mut last_bcast = None;
    let mut calls = 0u64;
    while leave.try_recv().is_err() {
        let payload = pattern(seed, calls, *rng.pick(&CALL_LENGTHS));
        let response = client.call(CALL, &payload, LONG).unwrap();
        assert_eq!(response.meta().msg_type, CALL);
        assert_eq!(response.to_vec(), reversed(&payload));
        calls += 1;
        while let Some(m) = client.try_recv_message().unwrap() {
            check_bcast(&mut last_bcast, m.meta(), &m.to_vec());
        }
    }
    tell(&format!("leaving {calls}"));
}

// ---------------------------------------------------------------------------------
// The host.

/// How the test talks to one guest process.
enum Line {
    /// Attached by path; the test owns the process.
    Path(Proc),
    /// Started by `ShmHost::spawn` with a ticket; the host owns the process.
    Ticket(Talk),
}

impl Line {
    fn poll(&mut self) -> Option<String> {
        match self {
            Line::Path(p) => p.poll_line(Duration::ZERO),
            Line::Ticket(t) => t.poll_line(Duration::ZERO),
        }
    }

    fn say(&mut self, line: &str) {
        match self {
            Line::Path(p) => p.say(line),
            Line::Ticket(t) => t.say(line),
        }
    }
}

struct Guest {
    line: Line,
    rpc: bool,
    /// Set once it said it attached (and was told to go).
    handle: Option<PeerHandle>,
    started: Instant,
    leaving: bool,
}

/// What the host knows of one guest incarnation's traffic.
#[derive(Default)]
struct Books {
    /// The next message number expected from it.
    next: u64,
    echoes: VecDeque<(u64, Vec<u8>)>,
    replies: VecDeque<(Received, Vec<u8>)>,
    calls: u64,
    gone: bool,
}

#[derive(Default, Debug)]
struct Figures {
    spawned: u64,
    by_ticket: u64,
    kills: u64,
    left: u64,
    received: u64,
    sent: u64,
    calls: u64,
    broadcasts: u64,
    large: u64,
    host_views: u64,
}

struct Chaos {
    host: ShmHost,
    path: String,
    seed: u64,
    rng: Rng,
    guests: Vec<Guest>,
    books: HashMap<PeerHandle, Books>,
    killed: Vec<PeerHandle>,
    views: VecDeque<shm_host::Message>,
    hold_views: bool,
    buf: Vec<u8>,
    next_bcast: u64,
    fig: Figures,
}

impl Chaos {
    fn spawn_guest(&mut self) {
        let rpc = self.rng.chance(1, 3);
        let kind = if rpc { "rpc" } else { "plain" };
        let limit = LONG * 30;
        let seed = self.rng.next_u64().to_string();
        let line = if self.rng.chance(1, 2) {
            let env = [
                ("SEG", self.path.clone()),
                ("VIA", "path".to_string()),
                ("SEED", seed),
            ];
            Line::Path(Proc::spawn(TEST, kind, &env, limit))
        } else {
            let env = [("VIA", "ticket".to_string()), ("SEED", seed)];
            let mut cmd = role_command(TEST, kind, &env, limit);
            let talk = Talk::wire(&mut cmd, kind, limit);
            self.host.spawn(&mut cmd).unwrap();
            drop(cmd);
            self.fig.by_ticket += 1;
            Line::Ticket(talk)
        };
        self.fig.spawned += 1;
        self.guests.push(Guest {
            line,
            rpc,
            handle: None,
            started: Instant::now(),
            leaving: false,
        });
    }

    /// Reads what the guests said: attachments (answered with "go") and departures.
    fn listen(&mut self) {
        let mut i = 0;
        while i < self.guests.len() {
            let g = &mut self.guests[i];
            match g.line.poll() {
                Some(line) if line.starts_with("attached ") => {
                    let mut it = line["attached ".len()..].split(' ');
                    let id = PeerId::new(it.next().unwrap().parse().unwrap()).unwrap();
                    let generation = it.next().unwrap().parse().unwrap();
                    let handle = PeerHandle { id, generation };
                    g.handle = Some(handle);
                    assert!(self.books.insert(handle, Books::default()).is_none());
                    g.line.say("go");
                }
                Some(line) if line.starts_with("leaving ") => {
                    let n: u64 = line["leaving ".len()..].parse().unwrap();
                    let g = self.guests.swap_remove(i);
                    let handle = g.handle.expect("attached before leaving");
                    let books = self.books.get_mut(&handle).unwrap();
                    books.gone = true;
                    if g.rpc {
                        assert_eq!(books.calls, n, "{handle:?}: every call answered");
                    } else {
                        assert_eq!(books.next, n, "{handle:?}: every message received");
                    }
                    assert!(books.echoes.is_empty() && books.replies.is_empty());
                    if let Line::Path(mut p) = g.line {
                        p.assert_success();
                    }
                    self.fig.left += 1;
                    continue;
                }
                Some(other) => panic!("a guest said {other:?}"),
                None => {
                    assert!(
                        g.handle.is_some() || g.started.elapsed() < LONG,
                        "a guest did not attach"
                    );
                    if let Line::Path(p) = &mut g.line {
                        match p.try_wait() {
                            // Its "leaving" line may still be on the way.
                            Some(status) if g.leaving && status.success() => {}
                            Some(status) => panic!("a guest exited by itself: {status}"),
                            None => {}
                        }
                    }
                }
            }
            i += 1;
        }
    }

    /// SIGKILLs one attached guest, or tells it to leave.
    fn strike(&mut self) {
        let ready: Vec<usize> = (0..self.guests.len())
            .filter(|&i| self.guests[i].handle.is_some() && !self.guests[i].leaving)
            .collect();
        if ready.is_empty() {
            return;
        }
        let i = ready[self.rng.below(ready.len() as u64) as usize];
        if self.rng.chance(1, 4) {
            self.guests[i].leaving = true;
            self.guests[i].line.say("leave");
            return;
        }
        let g = self.guests.swap_remove(i);
        let handle = g.handle.unwrap();
        match g.line {
            Line::Path(mut p) => {
                if let Some(status) = p.try_wait() {
                    panic!("a guest exited by itself: {status}");
                }
                assert_eq!(p.kill().signal(), Some(libc::SIGKILL));
            }
            Line::Ticket(_) => self.host.signal_guest(handle, libc::SIGKILL).unwrap(),
        }
        let books = self.books.get_mut(&handle).unwrap();
        books.gone = true;
        books.echoes.clear();
        books.replies.clear();
        self.killed.push(handle);
        self.fig.kills += 1;
    }

    /// Receives what is waiting, checking every message against its sender's books.
    fn serve(&mut self) {
        for _ in 0..32 {
            let got = if self.rng.chance(1, 4) {
                self.host.try_recv_message().unwrap().map(|(r, m)| {
                    let payload = m.to_vec();
                    if self.hold_views {
                        self.views.push_back(m);
                        self.fig.host_views += 1;
                        if self.views.len() > 4 {
                            self.views.pop_front();
                        }
                    }
                    (r, payload)
                })
            } else {
                let got = self.host.try_recv(&mut self.buf).unwrap();
                got.map(|r| (r, self.buf.clone()))
            };
            let Some((r, payload)) = got else { break };
            self.on_message(r, payload);
        }
    }

    /// Checks one message against its sender's books and queues its answer.
    fn on_message(&mut self, r: Received, payload: Vec<u8>) {
        self.fig.received += 1;
        self.fig.large += u64::from(payload.len() > 1024);
        let books = self
            .books
            .get_mut(&r.handle())
            .unwrap_or_else(|| panic!("a message from an unknown guest {:?}", r.handle()));
        if r.is_request() {
            assert_eq!(r.meta.msg_type, CALL);
            assert!(CALL_LENGTHS.contains(&payload.len()));
            books.calls += 1;
            if !books.gone {
                books.replies.push_back((r, reversed(&payload)));
            }
        } else {
            assert_eq!(r.meta, Meta::new(MSG, books.next), "in order");
            let seed = seed_of(r.from, r.generation);
            assert!(LENGTHS.contains(&payload.len()));
            assert_eq!(payload, pattern(seed, books.next, payload.len()));
            if !books.gone {
                books.echoes.push_back((books.next, payload));
            }
            books.next += 1;
        }
    }

    /// Sends the echoes and replies that fit now.
    fn answer(&mut self) {
        for (&handle, books) in &mut self.books {
            while let Some((n, payload)) = books.echoes.front() {
                let meta = Meta::new(ECHO, *n);
                let sent = if payload.len() <= 1024 && self.rng.chance(1, 3) {
                    self.host.loan(handle, payload.len()).and_then(|mut loan| {
                        assert!(loan.write_at(0, payload));
                        loan.send(meta, payload.len())
                    })
                } else {
                    self.host.try_send(handle, meta, payload)
                };
                match sent {
                    Ok(()) => {
                        books.echoes.pop_front();
                        self.fig.sent += 1;
                    }
                    Err(e) if e.is_would_block() => break,
                    Err(e) => panic!("echo to {handle:?}: {e}"),
                }
            }
            while let Some((request, payload)) = books.replies.front() {
                let sent = if self.rng.chance(1, 3) {
                    self.host
                        .loan_reply(request, payload.len())
                        .and_then(|mut loan| {
                            assert!(loan.write_at(0, payload));
                            loan.send(payload.len())
                        })
                } else {
                    self.host.try_reply(request, payload)
                };
                match sent {
                    Ok(()) => {
                        books.replies.pop_front();
                        self.fig.sent += 1;
                        self.fig.calls += 1;
                    }
                    Err(e) if e.is_would_block() => break,
                    Err(e) => panic!("reply to {handle:?}: {e}"),
                }
            }
        }
    }

    fn broadcast(&mut self) {
        let k = self.next_bcast;
        let len = *self.rng.pick(&BCAST_LENGTHS);
        match self
            .host
            .broadcast(Meta::new(BCAST, k), &pattern(BCAST_SEED, k, len))
        {
            Ok(report) => {
                assert!(report.fenced.is_empty(), "nobody breaks the protocol here");
                self.next_bcast += 1;
                self.fig.broadcasts += 1;
                self.fig.sent += u64::from(report.delivered.len());
            }
            Err(e) if e.is_would_block() => {}
            Err(e) => panic!("broadcast: {e}"),
        }
    }

    /// Every entry Empty, rings at zero, every slot Free, free lists naming only
    /// slots of their pools.
    fn assert_quiescent(&self, watch: &Segment) {
        let layout = watch.layout();
        let region = watch.backing().region();
        let word = |off: u64| {
            region
                .atomic_u64(off as usize)
                .unwrap()
                .load(std::sync::atomic::Ordering::Acquire)
        };
        for index in 0..config().max_guests as usize {
            let id = PeerId::from_index(index).unwrap();
            let info = self.host.peer_info(id).unwrap();
            assert_eq!(info.state, Some(PeerState::Empty), "{id}: {info:?}");
            assert_eq!(info.fenced, None);
            for dir in [shm_host::Direction::ToGuest, shm_host::Direction::ToHost] {
                let ring = layout.ring_offset(index, dir);
                assert_eq!(word(ring), 0, "{id} {dir:?} tail");
                assert_eq!(word(ring + 64), 0, "{id} {dir:?} head");
                assert_eq!(word(ring + 8) as u32, 0, "{id} {dir:?} consumer_parked");
                assert_eq!(word(ring + 72) as u32, 0, "{id} {dir:?} producer_parked");
                let pools = watch.pools(id, dir).unwrap();
                for class in 0..pools.classes() {
                    let pool = pools.class(class).unwrap();
                    let head = word(layout.pool_offset(index, dir, class)) as u32;
                    assert!(head <= pool.count(), "{id} {dir:?} {class}: head {head}");
                    for i in 0..pool.count() {
                        assert_eq!(
                            pool.state(i),
                            Some(shm_primitives::slot::SlotState::Free),
                            "{id} {dir:?} class {class} slot {i}"
                        );
                    }
                }
            }
        }
        assert_eq!(self.host.broadcast_usage().unwrap().in_use, 0);
    }
}

/// Whether this process has any child left, running or zombie.
fn has_children() -> bool {
    // SAFETY: siginfo_t is plain old data, valid when zeroed.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: waitid with WNOHANG | WNOWAIT only queries (it reaps nothing) and
    // writes into the siginfo we own. 0: some child, running or exited, exists.
    let rc = unsafe {
        libc::waitid(
            libc::P_ALL,
            0,
            &mut info,
            libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
        )
    };
    rc == 0
}

// shm[verify shm.recover.quiescent]
// shm[verify shm.recover.reap]
// shm[verify shm.slot.reclaim]
// shm[verify shm.recover.callback]
// shm[verify shm.spawn.pidfd]
#[test]
fn guests_attaching_working_and_dying_at_random_leave_nothing_behind() {
    match role().as_deref() {
        Some("plain") => return plain_main(),
        Some("rpc") => return rpc_main(),
        _ => {}
    }
    let seconds = secs_from_env("SHMHUB_CHAOS_SECS", 60);
    let seed = seed_from_env("SHMHUB_CHAOS_SEED");
    let fds_before = open_fds();
    let maps_before = shared_mappings();
    let seg = ShmPath::new("chaos");
    let mut host = ShmHost::create(seg.path(), config()).unwrap();
    let deaths: Arc<Mutex<Vec<Death>>> = Arc::default();
    let sink = deaths.clone();
    host.on_death(move |d| sink.lock().unwrap().push(*d));
    let watch = watch_segment(seg.path());
    let fds_start = open_fds();
    let maps_start = shared_mappings();
    let mut chaos = Chaos {
        host,
        path: seg.path().display().to_string(),
        seed,
        rng: Rng::new(seed),
        guests: Vec::new(),
        books: HashMap::new(),
        killed: Vec::new(),
        views: VecDeque::new(),
        hold_views: true,
        buf: Vec::new(),
        next_bcast: 0,
        fig: Figures::default(),
    };
    let start = Instant::now();
    let end = start + seconds;
    let mut next_strike = start;
    let mut next_bcast = start;
    while Instant::now() < end {
        if chaos.guests.len() < POPULATION {
            chaos.spawn_guest();
        }
        chaos.listen();
        chaos.serve();
        chaos.answer();
        let now = Instant::now();
        if now >= next_bcast {
            chaos.broadcast();
            next_bcast = now + Duration::from_millis(5);
        }
        // Load shaping: how often a guest dies or leaves.
        if now >= next_strike {
            chaos.strike();
            next_strike = now + Duration::from_millis(20 + chaos.rng.below(200));
        }
        // Waits for traffic a little rather than spin.
        if let Some(r) = chaos
            .host
            .recv(&mut chaos.buf, Duration::from_millis(1))
            .unwrap()
        {
            let payload = chaos.buf.clone();
            chaos.on_message(r, payload);
        }
    }
    // The end: every guest is killed or told to leave; then nothing may be left.
    chaos.hold_views = false;
    chaos.views.clear();
    let stop = Instant::now();
    while chaos.guests.iter().any(|g| g.handle.is_none()) {
        assert!(stop.elapsed() < LONG, "guests still attaching");
        chaos.listen();
        chaos.serve();
        chaos.answer();
    }
    while chaos.guests.iter().any(|g| !g.leaving) {
        chaos.strike();
    }
    while !chaos.guests.is_empty() {
        assert!(stop.elapsed() < LONG, "guests did not leave");
        chaos.listen();
        chaos.serve();
        chaos.answer();
    }
    chaos.views.clear();
    let settled = Instant::now();
    loop {
        chaos.host.maintain();
        let gone = (0..config().max_guests as usize).all(|i| {
            let info = chaos
                .host
                .peer_info(PeerId::from_index(i).unwrap())
                .unwrap();
            info.state == Some(PeerState::Empty)
        });
        if gone && !has_children() && open_fds() == fds_start {
            break;
        }
        assert!(
            settled.elapsed() < LONG,
            "not settled: children {}, fds {:?} (start {:?})",
            has_children(),
            open_fds(),
            fds_start
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    chaos.assert_quiescent(&watch);
    assert_eq!(shared_mappings(), maps_start, "no mapping left");
    // One death per kill, for exactly the guests killed, never for one that left.
    let deaths = deaths.lock().unwrap().clone();
    let mut died: Vec<PeerHandle> = deaths
        .iter()
        .map(|d| {
            assert!(d.attached, "{d:?}");
            PeerHandle {
                id: d.peer,
                generation: d.generation,
            }
        })
        .collect();
    let mut killed = chaos.killed.clone();
    died.sort_by_key(|h| (h.id, h.generation));
    killed.sort_by_key(|h| (h.id, h.generation));
    assert_eq!(died, killed, "one death per kill");
    // The host's counters agree with ours.
    let (mut sent, mut received) = (0, 0);
    for i in 0..config().max_guests as usize {
        let stats = chaos
            .host
            .peer_info(PeerId::from_index(i).unwrap())
            .unwrap()
            .stats;
        sent += stats.sent;
        received += stats.received;
    }
    assert_eq!(received, chaos.fig.received, "messages received");
    assert_eq!(sent, chaos.fig.sent, "messages sent");
    let f = &chaos.fig;
    eprintln!(
        "chaos: {:.1} s, seed {}, {} guests spawned ({} with a ticket), {} killed, {} left, \
         {} messages received and {} sent by the host ({} calls answered, {} large), \
         {} broadcasts, {} host views",
        start.elapsed().as_secs_f64(),
        chaos.seed,
        f.spawned,
        f.by_ticket,
        f.kills,
        f.left,
        f.received,
        f.sent,
        f.calls,
        f.large,
        f.broadcasts,
        f.host_views,
    );
    assert!(f.kills > 0 && f.received > 0);
    drop(watch);
    drop(chaos);
    drop(seg);
    assert_eq!(open_fds(), fds_before, "no descriptor left");
    assert_eq!(shared_mappings(), maps_before, "no mapping left");
    assert!(our_shm_files().is_empty(), "{:?}", our_shm_files());
}
