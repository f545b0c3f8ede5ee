//! Death and recovery with real processes: the crash matrix, host death, the
//! heartbeat, fenced guests, and the spawn -> exchange -> SIGKILL -> recover soak.

use std::os::unix::process::ExitStatusExt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use shm_guest::{AttachError, DetachedError, HostDeathCause, RecvError, ShmGuest, WaitPolicy};
use shm_host::{
    Death, DeathCause, Direction, GuestOptions, Meta, PeerHandle, PeerId, PeerState, SegmentConfig,
    SendError, ShmHost,
};
use shm_primitives::crash::{CrashPoint, CRASH_ENV, CRASH_SKIP_ENV};
use shmhub_tests::{
    arg, attach_as_told, guest_parked, hear, mono_ns, open_fds, our_shm_files, pattern,
    plant_segment, poll_until, role, role_command, tell, watch_segment, watchdog, Proc, ShmPath,
};

const PING: u32 = 1;
const PONG: u32 = 2;
const JUNK: u32 = 3;
const BYE: u32 = 4;
const LONG: Duration = Duration::from_secs(60);

/// Deaths reported to `on_death`, with the CLOCK_MONOTONIC time of each report.
type DeathLog = Arc<Mutex<Vec<(Death, u64)>>>;

fn log_deaths(host: &mut ShmHost) -> DeathLog {
    let log = DeathLog::default();
    let sink = log.clone();
    host.on_death(move |d| sink.lock().unwrap().push((*d, mono_ns())));
    log
}

fn parse_kv(line: &str) -> Vec<u64> {
    line.split_whitespace()
        .map(|w| w.parse().expect("numbers"))
        .collect()
}

/// A guest that stays alive through the whole test: it pings the host (one per
/// millisecond, paced), checks every echo byte for byte, and reports how many it got
/// when the host says BYE.
fn bystander_main() {
    watchdog();
    let mut guest = ShmGuest::attach_path(arg("SEG")).unwrap();
    guest.set_wait_policy(WaitPolicy::BLOCK);
    tell(&format!("attached {}", guest.peer_id().get()));
    let mut buf = Vec::new();
    let mut n = 0u64;
    loop {
        let payload = pattern(99, n, 40 + (n as usize % 200));
        guest.send(Meta::new(PING, n), &payload, LONG).unwrap();
        let meta = guest.recv(&mut buf, LONG).unwrap().expect("an echo or BYE");
        if meta.msg_type == BYE {
            tell(&format!("ok {n}"));
            guest.detach();
            return;
        }
        assert_eq!(meta, Meta::new(PONG, n), "echoes arrive in order");
        assert_eq!(buf, payload, "echo {n} bytes");
        n += 1;
        // Pacing only (not synchronisation): leave the CPUs to the crash under test.
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The host side of every scenario: echoes the bystander, counts what victims send.
struct Server {
    host: ShmHost,
    deaths: DeathLog,
    bystander: Option<PeerId>,
    echoed: u64,
    from_victims: u64,
    buf: Vec<u8>,
}

impl Server {
    fn new(path: &std::path::Path) -> Self {
        let mut host = ShmHost::create(path, SegmentConfig::default()).unwrap();
        let deaths = log_deaths(&mut host);
        Self {
            host,
            deaths,
            bystander: None,
            echoed: 0,
            from_victims: 0,
            buf: Vec::new(),
        }
    }

    /// One bounded receive; echoes a bystander ping, counts anything else.
    fn serve_once(&mut self) {
        let got = self
            .host
            .recv(&mut self.buf, Duration::from_millis(2))
            .unwrap();
        let Some(msg) = got else { return };
        if msg.meta.msg_type == PING {
            // Only the bystander pings (its id may not be known yet).
            assert!(self.bystander.map_or(true, |b| b == msg.from));
            let reply = Meta::new(PONG, msg.meta.user_id);
            self.host
                .send(msg.handle(), reply, &self.buf, LONG)
                .unwrap();
            self.echoed += 1;
        } else {
            assert_eq!(msg.meta.msg_type, JUNK, "victims send only junk");
            self.from_victims += 1;
        }
    }

    /// Serves until `child` says a line (before its deadline).
    fn serve_until_line(&mut self, child: &mut Proc) -> String {
        let limit = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(line) = child.poll_line(Duration::ZERO) {
                return line;
            }
            assert!(Instant::now() < limit, "child said nothing");
            self.serve_once();
        }
    }

    /// Serves until the death log holds `n` deaths; returns the last.
    fn serve_until_deaths(&mut self, n: usize) -> (Death, u64) {
        let limit = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(&last) = self.deaths.lock().unwrap().get(n - 1) {
                return last;
            }
            assert!(Instant::now() < limit, "death not detected within 10 s");
            self.serve_once();
        }
    }

    /// Serves for a few liveness intervals: enough for any further (wrong) report.
    fn serve_a_while(&mut self) {
        let until = Instant::now() + Duration::from_millis(60);
        while Instant::now() < until {
            self.serve_once();
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Point {
    /// One of the injected crash points inside the guest library.
    Injected(CrashPoint),
    /// Parked in a blocking receive, killed from outside.
    Parked,
}

impl Point {
    fn name(self) -> &'static str {
        match self {
            Point::Injected(p) => p.name(),
            Point::Parked => "parked",
        }
    }
}

/// Messages a victim sends (and the host may or may not receive) before its crash.
const VICTIM_SENDS: u64 = 3;

/// A guest that dies at the point named by its env: attaches (by ticket or path),
/// sends `VICTIM_SENDS` slot-sized messages, then dies in the next send (injected
/// points) or parks in a receive until killed.
fn victim_main() {
    watchdog();
    let point = arg("POINT");
    if point == CrashPoint::AfterClaim.name() {
        die_when_told();
        let survived = attach_as_told().map(|g| g.peer_id());
        panic!("survived its crash point: {survived:?}");
    }
    let mut guest = attach_as_told().unwrap();
    guest.set_wait_policy(WaitPolicy::BLOCK);
    tell(&format!(
        "attached {} {}",
        guest.peer_id().get(),
        guest.generation()
    ));
    assert_eq!(hear(), "go");
    let big = pattern(7, 0, 4000);
    for n in 0..VICTIM_SENDS {
        guest.send(Meta::new(JUNK, n), &big, LONG).unwrap();
    }
    let mut buf = Vec::new();
    if point == "parked" {
        tell("parking");
        let woke = guest.recv(&mut buf, LONG);
        panic!("woke from its park: {woke:?}");
    }
    die_when_told();
    let survived = guest.send(Meta::new(JUNK, VICTIM_SENDS), &big, LONG);
    panic!("survived its crash point: {survived:?}");
}

/// In a victim about to reach its crash point: says `ready`, waits for `die`, and says
/// when it goes on to die (see [`let_die`]).
fn die_when_told() {
    tell("ready");
    assert_eq!(hear(), "die");
    tell(&format!("crashing {}", mono_ns()));
}

/// The host's side of [`die_when_told`]: serves until the victim is ready, then lets
/// it die and waits until it is reaped without calling into the host. A liveness pass
/// polls the doorbells first and tests the locks after, so a guest that died between
/// the two would be found by its lock alone, whatever doorbell it had. Returns the
/// victim's exit status and the time it said it goes on to die.
fn let_die(srv: &mut Server, victim: &mut Proc) -> (std::process::ExitStatus, u64) {
    assert_eq!(srv.serve_until_line(victim), "ready");
    victim.say("die");
    let died_at = parse_kv(victim.expect("crashing").as_str())[0];
    (victim.wait(), died_at)
}

const MATRIX: &str = "every_crash_point_is_recovered_exactly";

/// One victim of the crash matrix: spawn it, let it die at `point`, then check that
/// the host recovered everything it held, exactly once.
fn crash_one(srv: &mut Server, path: &std::path::Path, point: Point, via: &str) {
    let mut envs = vec![
        ("SEG", path.display().to_string()),
        ("VIA", via.to_string()),
        ("POINT", point.name().to_string()),
    ];
    let slot_payload = match point {
        Point::Injected(p) => {
            envs.push((CRASH_ENV, p.name().to_string()));
            // The victim's own sends pass the in-send points first.
            let skip = if p == CrashPoint::AfterClaim {
                0
            } else {
                VICTIM_SENDS
            };
            envs.push((CRASH_SKIP_ENV, skip.to_string()));
            p != CrashPoint::AfterClaim
        }
        Point::Parked => false,
    };
    let ticket =
        (via == "ticket").then(|| srv.host.prepare_guest(GuestOptions::default()).unwrap());
    let mut victim = Proc::spawn_with(MATRIX, "victim", &envs, LONG, |cmd| {
        if let Some((_, t)) = &ticket {
            t.configure(cmd);
        }
    });
    let mut handle = ticket.as_ref().map(|(h, _)| *h);
    drop(ticket);
    let deaths_before = srv.deaths.lock().unwrap().len();
    let received_before = srv.from_victims;
    // Messages the host sends the victim and the victim never consumes.
    let mut sent_to_victim = 0;
    let (status, died_at);
    if point == Point::Injected(CrashPoint::AfterClaim) {
        (status, died_at) = let_die(srv, &mut victim);
    } else {
        let line = srv.serve_until_line(&mut victim);
        let v = parse_kv(line.strip_prefix("attached").unwrap());
        let h = PeerHandle {
            id: PeerId::new(v[0] as u8).unwrap(),
            generation: v[1] as u32,
        };
        assert!(
            handle.map_or(true, |t| t == h),
            "a ticket guest holds its ticket's entry"
        );
        handle = Some(h);
        if point != Point::Parked {
            sent_to_victim = 2;
            let big = pattern(8, 0, 4000);
            for n in 0..sent_to_victim {
                srv.host.send(h, Meta::new(JUNK, n), &big, LONG).unwrap();
            }
        }
        victim.say("go");
        if point == Point::Parked {
            assert_eq!(srv.serve_until_line(&mut victim), "parking");
            let view = watch_segment(path);
            let limit = Instant::now() + Duration::from_secs(20);
            while !guest_parked(&view, h.id.index()) {
                assert!(Instant::now() < limit, "victim never parked");
                srv.serve_once();
            }
            died_at = mono_ns();
            // Reaped before the host looks again, as in `let_die`.
            status = victim.kill();
        } else {
            (status, died_at) = let_die(srv, &mut victim);
        }
    }
    assert_eq!(
        status.signal(),
        Some(libc::SIGKILL),
        "the victim was SIGKILLed"
    );
    let (death, detected_at) = srv.serve_until_deaths(deaths_before + 1);
    println!(
        "crash point {:<18} via {:<6}: detected by {:?} {:.2} ms after the victim's last word",
        point.name(),
        via,
        death.cause,
        (detected_at.saturating_sub(died_at)) as f64 / 1e6
    );
    let handle = handle.unwrap_or(PeerHandle {
        id: death.peer,
        generation: death.generation,
    });
    assert_eq!(
        (death.peer, death.generation),
        (handle.id, handle.generation)
    );
    assert!(death.attached);
    // A ticket guest's doorbell exists before it attaches. A path guest connects its
    // doorbell after claiming, so one killed right after its claim leaves only its
    // lock; otherwise whichever signal the host polls first.
    let expected: &[DeathCause] = match (via, point) {
        ("ticket", _) => &[DeathCause::HungUp],
        (_, Point::Injected(CrashPoint::AfterClaim)) => &[DeathCause::LockReleased],
        _ => &[DeathCause::HungUp, DeathCause::LockReleased],
    };
    assert!(expected.contains(&death.cause), "{via}: {:?}", death.cause);
    // Exact accounting: every message the victim published was either received or
    // counted as abandoned; every slot it or the host used came back.
    let received = srv.from_victims - received_before;
    // A victim that dies between writing an entry's stamp and advancing the tail has
    // published that entry (`shm.ring.produce`): the host counts it either way.
    let published = match point {
        Point::Injected(CrashPoint::AfterClaim) => 0,
        Point::Injected(CrashPoint::DescriptorWritten) => VICTIM_SENDS + 1,
        _ => VICTIM_SENDS,
    };
    assert_eq!(received + death.abandoned, published, "{death:?}");
    assert_eq!(death.discarded, sent_to_victim, "{death:?}");
    // The slot of the send the victim died in, unless that send had published.
    let in_flight_slot =
        u64::from(slot_payload && point != Point::Injected(CrashPoint::DescriptorWritten));
    assert_eq!(
        death.reclaimed_slots,
        death.abandoned + death.discarded + in_flight_slot,
        "{death:?}"
    );
    let usage = srv.host.peer_usage(handle.id).unwrap();
    assert_eq!(usage.to_guest_slots.in_use + usage.to_host_slots.in_use, 0);
    assert_eq!((usage.to_guest_depth, usage.to_host_depth), (0, 0));
    let info = srv.host.peer_info(handle.id).unwrap();
    assert_eq!(info.state, Some(PeerState::Empty));
    assert_eq!(info.generation, handle.generation + 1);
    // Exactly once, even after more liveness passes.
    srv.serve_a_while();
    assert_eq!(srv.deaths.lock().unwrap().len(), deaths_before + 1);
    // A handle taken before the crash fails with a typed error.
    match srv.host.try_send(handle, Meta::new(JUNK, 0), b"late") {
        Err(SendError::Stale { handle: h, now }) => {
            assert_eq!((h, now), (handle, handle.generation + 1))
        }
        other => panic!("stale handle gave {other:?}"),
    }
    // The entry is reusable at once.
    let id = srv.host.reserve_peer().unwrap();
    assert_eq!(id, handle.id, "the recovered entry is the lowest free one");
    let reuse = ShmGuest::attach_path_with_id(path, id).unwrap();
    assert_eq!(reuse.generation(), handle.generation + 1);
    reuse.detach();
    let limit = Instant::now() + Duration::from_secs(5);
    while srv.host.peer_info(id).unwrap().state != Some(PeerState::Empty) {
        assert!(Instant::now() < limit, "the reuse was never recycled");
        srv.serve_once();
    }
}

// shm[verify shm.recover.crash-matrix]
// shm[verify shm.recover.reap]
// shm[verify shm.recover.callback]
// shm[verify shm.recover.stale-handle]
// shm[verify shm.live.guest-death]
// shm[verify shm.live.guest-lock]
// shm[verify shm.live.tick]
#[test]
fn every_crash_point_is_recovered_exactly() {
    match role().as_deref() {
        Some("bystander") => return bystander_main(),
        Some("victim") => return victim_main(),
        Some(other) => panic!("unknown role {other}"),
        None => {}
    }
    let seg = ShmPath::new("matrix");
    let mut srv = Server::new(seg.path());
    let mut bystander = Proc::spawn(
        MATRIX,
        "bystander",
        &[("SEG", seg.path().display().to_string())],
        Duration::from_secs(120),
    );
    let line = srv.serve_until_line(&mut bystander);
    let id = parse_kv(line.strip_prefix("attached").unwrap())[0];
    srv.bystander = PeerId::new(id as u8);
    let points = CrashPoint::GUEST
        .map(Point::Injected)
        .into_iter()
        .chain([Point::Parked]);
    let mut victims = 0;
    for point in points {
        for via in ["ticket", "path"] {
            crash_one(&mut srv, seg.path(), point, via);
            victims += 1;
        }
    }
    assert_eq!(srv.deaths.lock().unwrap().len(), victims);
    // The bystander never noticed: every echo arrived intact and in order.
    let bystander_id = srv.bystander.unwrap();
    let echoed_before_bye = srv.echoed;
    // Let its last ping in (it may be mid-send), then say BYE instead of an echo.
    let limit = Instant::now() + Duration::from_secs(10);
    let last = loop {
        let got = srv
            .host
            .recv(&mut srv.buf, Duration::from_millis(10))
            .unwrap();
        if let Some(m) = got {
            assert_eq!(m.from, bystander_id);
            break m;
        }
        assert!(Instant::now() < limit, "the bystander stopped pinging");
    };
    srv.host
        .send(bystander_id, Meta::new(BYE, last.meta.user_id), b"", LONG)
        .unwrap();
    let ok = bystander.expect("ok");
    assert_eq!(ok.parse::<u64>().unwrap(), echoed_before_bye);
    assert!(
        echoed_before_bye > 0,
        "the bystander was served during the crashes"
    );
    bystander.assert_success();
}

const HOST_DEATH: &str = "guests_of_a_killed_host_get_a_typed_error_promptly";

/// A guest that parks in a receive until its host dies, then reports how it learnt.
fn parked_guest_main() {
    watchdog();
    let via = arg("VIA");
    let mut guest = attach_as_told().unwrap();
    guest.set_wait_policy(WaitPolicy::BLOCK);
    tell(&format!("parking {via} {}", guest.peer_id().get()));
    let mut buf = Vec::new();
    let err = guest.recv(&mut buf, LONG).unwrap_err();
    let now = mono_ns();
    let cause = match err {
        RecvError::Detached(DetachedError::HostDead(cause)) => cause,
        other => panic!("expected HostDead, got {other:?}"),
    };
    // Sticky: every later call says the same, at once.
    assert!(matches!(
        guest.try_send(Meta::new(PING, 0), b"x"),
        Err(shm_guest::SendError::Detached(DetachedError::HostDead(c))) if c == cause
    ));
    tell(&format!("hostdead {via} {cause:?} {now}"));
}

fn host_main() {
    watchdog();
    let path = arg("SEG");
    let mut host = ShmHost::create(&path, SegmentConfig::default()).unwrap();
    // Said first: the spawned guest's lines come through our stdout too.
    tell("ready");
    let mut cmd = role_command(
        HOST_DEATH,
        "parked-guest",
        &[("VIA", "ticket".to_string())],
        LONG,
    );
    cmd.env_remove(CRASH_ENV);
    host.spawn(&mut cmd).unwrap();
    // Serve only once both guests are parked: the first blocking receive reaches
    // the injected point and this process SIGKILLs itself there.
    assert_eq!(hear(), "serve");
    let mut buf = Vec::new();
    loop {
        host.recv(&mut buf, Duration::from_millis(50)).unwrap();
    }
}

// shm[verify shm.live.host-death]
// shm[verify shm.live.host-lock]
// shm[verify shm.live.attach-dead-host]
// shm[verify shm.file.stale]
// shm[verify shm.recover.crash-matrix]
#[test]
fn guests_of_a_killed_host_get_a_typed_error_promptly() {
    match role().as_deref() {
        Some("host") => return host_main(),
        Some("parked-guest") => return parked_guest_main(),
        Some(other) => panic!("unknown role {other}"),
        None => {}
    }
    let seg = ShmPath::new("hostdeath");
    let path = seg.path().display().to_string();
    let host_envs = [
        ("SEG", path.clone()),
        (CRASH_ENV, CrashPoint::HostParking.name().to_string()),
    ];
    let mut host = Proc::spawn(HOST_DEATH, "host", &host_envs, LONG);
    host.expect("ready");
    let by_path_envs = [("SEG", path.clone()), ("VIA", "path".to_string())];
    let mut by_path = Proc::spawn(HOST_DEATH, "parked-guest", &by_path_envs, LONG);
    // The ticket guest (the host's child) speaks through the host's stdout.
    let mut ids = [
        parse_kv(host.expect("parking ticket").as_str())[0],
        parse_kv(by_path.expect("parking path").as_str())[0],
    ];
    ids.sort_unstable();
    let view = watch_segment(seg.path());
    poll_until(Duration::from_secs(20), "both guests parked", || {
        ids.iter()
            .all(|&id| guest_parked(&view, id as usize - 1))
            .then_some(())
    });
    drop(view);
    // The host dies at its injected point (`CrashPoint::HostParking`) as soon as it
    // serves: no signal from outside.
    let killed_at = mono_ns();
    host.say("serve");
    let status = host.wait();
    assert_eq!(
        status.signal(),
        Some(libc::SIGKILL),
        "died at its crash point"
    );
    for (proc_, via) in [(&mut host, "ticket"), (&mut by_path, "path")] {
        let line = proc_.expect(&format!("hostdead {via}"));
        let (cause, at) = line.split_once(' ').unwrap();
        let latency = at.parse::<u64>().unwrap().saturating_sub(killed_at);
        println!(
            "guest by {via}: host death seen as {cause} {:.2} ms after SIGKILL",
            latency as f64 / 1e6
        );
        // Both have a doorbell (by ticket, or connected while attaching by path).
        assert!(
            ["HungUp", "LockReleased"].contains(&cause),
            "{via} guest saw {cause}"
        );
        assert!(
            latency < Duration::from_secs(2).as_nanos() as u64,
            "within the lock detection bound (10 ms interval; 2 s is generous)"
        );
    }
    by_path.assert_success();
    // A dead host's file is refused by new guests, then replaced by a new host.
    assert!(matches!(
        ShmGuest::attach_path(seg.path()),
        Err(AttachError::HostDead)
    ));
    let fresh = ShmHost::create(seg.path(), SegmentConfig::default()).unwrap();
    assert!(matches!(
        ShmHost::create(seg.path(), SegmentConfig::default()),
        Err(shm_host::CreateError::InUse(_))
    ));
    drop(fresh);
}

const HEARTBEAT: &str = "a_stopped_host_is_caught_by_the_heartbeat";
/// The host's heartbeat interval there: a live host that a loaded machine leaves
/// unscheduled for less than about 1.5 intervals must not look dead (it is stale after
/// two).
const BEAT: Duration = Duration::from_millis(500);

// shm[verify shm.live.heartbeat]
#[test]
fn a_stopped_host_is_caught_by_the_heartbeat() {
    if role().as_deref() == Some("beating-host") {
        watchdog();
        let mut host = ShmHost::create(arg("SEG"), SegmentConfig::default()).unwrap();
        host.set_heartbeat(Some(BEAT));
        tell("ready");
        let mut buf = Vec::new();
        loop {
            host.recv(&mut buf, Duration::from_millis(20)).unwrap();
        }
    }
    let seg = ShmPath::new("heartbeat");
    let envs = [("SEG", seg.path().display().to_string())];
    let mut host = Proc::spawn(HEARTBEAT, "beating-host", &envs, LONG);
    host.expect("ready");
    let mut guest = ShmGuest::attach_path(seg.path()).unwrap();
    guest.set_wait_policy(WaitPolicy::BLOCK);
    let mut buf = Vec::new();
    // Alive and beating: idle receives time out quietly, well past two intervals.
    let quiet_until = Instant::now() + 3 * BEAT;
    while Instant::now() < quiet_until {
        assert!(guest
            .recv(&mut buf, Duration::from_millis(50))
            .unwrap()
            .is_none());
    }
    // SAFETY: kill(2) with a child's pid has no memory effects.
    assert_eq!(unsafe { libc::kill(host.pid() as i32, libc::SIGSTOP) }, 0);
    let stopped = Instant::now();
    let err = guest.recv(&mut buf, Duration::from_secs(20)).unwrap_err();
    let took = stopped.elapsed();
    assert!(
        matches!(
            err,
            RecvError::Detached(DetachedError::HostDead(HostDeathCause::HeartbeatStale))
        ),
        "a stopped host still holds its lock: only the heartbeat can tell ({err:?})"
    );
    println!("stopped host seen as stale after {took:?} (interval {BEAT:?})");
    assert!(took >= BEAT, "not before one interval");
    assert!(took < Duration::from_secs(10), "within a generous bound");
    host.kill();
}

// shm[verify shm.live.host-close]
// shm[verify shm.live.attach-dead-host]
#[test]
fn a_closing_host_wakes_its_parked_guests_and_closed_or_dead_files_are_refused() {
    let seg = ShmPath::new("close");
    let host = ShmHost::create(seg.path(), SegmentConfig::default()).unwrap();
    let mut guest = ShmGuest::attach_path(seg.path()).unwrap();
    guest.set_wait_policy(WaitPolicy::BLOCK);
    guest.set_liveness_interval(Duration::from_secs(30));
    let view = watch_segment(seg.path());
    let waiter = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let start = Instant::now();
        let r = guest.recv(&mut buf, Duration::from_secs(30));
        (
            r.map(|m| m.is_some()).map_err(|e| e.to_string()),
            start.elapsed(),
        )
    });
    poll_until(Duration::from_secs(20), "guest parked", || {
        guest_parked(&view, 0).then_some(())
    });
    drop(view);
    drop(host);
    let (r, took) = waiter.join().unwrap();
    assert_eq!(r, Err(DetachedError::HostClosed.to_string()));
    // Its liveness interval is 30 s: only the close's wake explains a prompt return.
    assert!(
        took < Duration::from_secs(10),
        "woken by the close, took {took:?}"
    );

    let closed = ShmPath::new("closed");
    let planted = plant_segment(closed.path(), SegmentConfig::default(), true);
    planted.header().close();
    assert!(matches!(
        ShmGuest::attach_path(closed.path()),
        Err(AttachError::HostClosed)
    ));
    let dead = ShmPath::new("dead");
    drop(plant_segment(dead.path(), SegmentConfig::default(), true));
    assert!(matches!(
        ShmGuest::attach_path(dead.path()),
        Err(AttachError::HostDead)
    ));
}

// shm[verify shm.recover.fenced]
#[test]
fn a_fenced_guest_is_recovered_once_it_dies() {
    if role().as_deref() == Some("fenced") {
        watchdog();
        let guest = ShmGuest::attach_path(arg("SEG")).unwrap();
        tell(&format!(
            "attached {} {}",
            guest.peer_id().get(),
            guest.generation()
        ));
        hear();
        return;
    }
    let seg = ShmPath::new("fenced");
    let mut host = ShmHost::create(seg.path(), SegmentConfig::default()).unwrap();
    let deaths = log_deaths(&mut host);
    let envs = [("SEG", seg.path().display().to_string())];
    let mut child = Proc::spawn(
        "a_fenced_guest_is_recovered_once_it_dies",
        "fenced",
        &envs,
        LONG,
    );
    let v = parse_kv(child.expect("attached").as_str());
    let (id, generation) = (PeerId::new(v[0] as u8).unwrap(), v[1] as u32);
    // Scribble an impossible tail into its ring to the host: the host fences it.
    let view = watch_segment(seg.path());
    let tail = view.layout().ring_offset(id.index(), Direction::ToHost) as usize;
    view.backing()
        .region()
        .atomic_u64(tail)
        .unwrap()
        .store(1 << 40, std::sync::atomic::Ordering::SeqCst);
    let mut buf = Vec::new();
    let err = host.try_recv(&mut buf).unwrap_err();
    assert_eq!(err.peer, id);
    // Quarantined while it lives: liveness passes leave it alone.
    for _ in 0..3 {
        host.maintain();
    }
    assert!(host.peer_info(id).unwrap().fenced.is_some());
    assert_eq!(host.peer_info(id).unwrap().state, Some(PeerState::Goodbye));
    // It dies: the host recovers the entry.
    child.kill();
    poll_until(Duration::from_secs(10), "fenced entry recovered", || {
        host.maintain();
        (deaths.lock().unwrap().len() == 1).then_some(())
    });
    let (death, _) = deaths.lock().unwrap()[0];
    assert_eq!((death.peer, death.generation), (id, generation));
    assert_eq!(death.cause, DeathCause::LockReleased);
    let info = host.peer_info(id).unwrap();
    assert_eq!(info.state, Some(PeerState::Empty));
    assert_eq!(info.generation, generation + 1);
    assert_eq!(info.fenced, None);
    let usage = host.peer_usage(id).unwrap();
    assert_eq!((usage.to_guest_depth, usage.to_host_depth), (0, 0));
}

const SOAK: &str = "spawn_exchange_kill_recover_soak";

fn soak(rounds: u32) {
    let seg = ShmPath::new("soak");
    let mut host = ShmHost::create(seg.path(), SegmentConfig::default()).unwrap();
    let deaths = log_deaths(&mut host);
    let fds_before = open_fds();
    let mut buf = Vec::new();
    let started = Instant::now();
    let mut worst = Duration::ZERO;
    let mut with_status = 0;
    for round in 0..rounds {
        let mut cmd = role_command(SOAK, "soak-guest", &[], LONG);
        let spawned = host.spawn(&mut cmd).unwrap();
        let msg = host.recv(&mut buf, LONG).unwrap().expect("hello");
        assert_eq!(msg.handle(), spawned.handle);
        assert_eq!(buf, pattern(5, u64::from(round), 100));
        host.send(
            spawned.handle,
            Meta::new(PONG, msg.meta.user_id),
            &buf,
            LONG,
        )
        .unwrap();
        let ack = host.recv(&mut buf, LONG).unwrap().expect("ack");
        assert_eq!(ack.meta.msg_type, PONG);
        host.signal_guest(spawned.handle, libc::SIGKILL).unwrap();
        let killed = Instant::now();
        while deaths.lock().unwrap().len() < round as usize + 1 {
            assert!(
                killed.elapsed() < Duration::from_secs(10),
                "death unnoticed"
            );
            assert!(host
                .recv(&mut buf, Duration::from_millis(20))
                .unwrap()
                .is_none());
        }
        worst = worst.max(killed.elapsed());
        let (death, _) = deaths.lock().unwrap()[round as usize];
        assert_eq!(
            (death.peer, death.generation),
            (spawned.handle.id, spawned.handle.generation)
        );
        // The doorbell can hang up a moment before the child is reapable: then the
        // host reports the death without a status (and reaps the child later).
        if let Some(status) = death.exit {
            assert_eq!(status.signal(), Some(libc::SIGKILL), "{status}");
            with_status += 1;
        }
        assert_eq!(death.abandoned + death.discarded, 0);
    }
    let elapsed = started.elapsed();
    println!(
        "{rounds} rounds in {elapsed:?} ({:?} per round), slowest detection {worst:?}, \
         {with_status} deaths reported with the exit status",
        elapsed / rounds
    );
    // Nothing leaked: entries, slots, descriptors, files.
    let n = host.config().max_guests as usize;
    for id in (0..n).filter_map(PeerId::from_index) {
        let info = host.peer_info(id).unwrap();
        assert_eq!(info.state, Some(PeerState::Empty), "{id}");
        let usage = host.peer_usage(id).unwrap();
        assert_eq!(usage.to_guest_slots.in_use + usage.to_host_slots.in_use, 0);
    }
    let total: u64 = (0..n)
        .filter_map(PeerId::from_index)
        .map(|id| host.peer_info(id).unwrap().stats.deaths)
        .sum();
    assert_eq!(total, u64::from(rounds));
    assert_eq!(deaths.lock().unwrap().len(), rounds as usize);
    assert_eq!(open_fds(), fds_before, "no descriptor leaked");
    let name = seg
        .path()
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    assert_eq!(our_shm_files(), vec![name]);
    drop(host);
    assert!(our_shm_files().is_empty(), "nothing left in /dev/shm");
}

fn soak_guest_main() {
    watchdog();
    let mut guest = ShmGuest::from_env().unwrap();
    guest.set_wait_policy(WaitPolicy::BLOCK);
    // Every round reuses entry 1, one generation later.
    let round = u64::from(guest.generation());
    let hello = pattern(5, round, 100);
    guest.send(Meta::new(PING, round), &hello, LONG).unwrap();
    let mut buf = Vec::new();
    let meta = guest.recv(&mut buf, LONG).unwrap().expect("reply");
    assert_eq!((meta.msg_type, buf.as_slice()), (PONG, hello.as_slice()));
    guest.send(Meta::new(PONG, round), b"ack", LONG).unwrap();
    // Park until killed.
    let woke = guest.recv(&mut buf, LONG);
    panic!("soak guest woke: {woke:?}");
}

// shm[verify shm.spawn.pidfd]
// shm[verify shm.recover.reap]
#[test]
fn spawn_exchange_kill_recover_soak() {
    if role().as_deref() == Some("soak-guest") {
        return soak_guest_main();
    }
    soak(1_000);
}

// The same, long: run with `--run-ignored only` (see the README).
#[test]
#[ignore = "long soak (20,000 rounds, several minutes)"]
fn spawn_exchange_kill_recover_long_soak() {
    soak(20_000);
}

const DRAIN: &str = "a_guest_drains_what_its_host_published_before_it_left";

// shm[verify shm.live.drain-after-host]
#[test]
fn a_guest_drains_what_its_host_published_before_it_left() {
    if role().as_deref() == Some("draining-host") {
        watchdog();
        let mut host = ShmHost::create(arg("SEG"), SegmentConfig::default()).unwrap();
        tell("ready");
        let mut buf = Vec::new();
        let hello = host.recv(&mut buf, LONG).unwrap().expect("hello");
        let to = hello.handle();
        host.send(to, Meta::new(1, 10), b"inline", LONG).unwrap();
        host.send(to, Meta::new(2, 11), &pattern(3, 0, 1000), LONG)
            .unwrap();
        host.send(to, Meta::new(3, 12), b"last", LONG).unwrap();
        tell("sent");
        // "close": the graceful goodbye; otherwise the test SIGKILLs us here.
        if hear() == "close" {
            drop(host);
            tell("closed");
        }
        hear();
        return;
    }
    for ending in ["close", "kill"] {
        let seg = ShmPath::new(&format!("drain-{ending}"));
        let envs = [("SEG", seg.path().display().to_string())];
        let mut host = Proc::spawn(DRAIN, "draining-host", &envs, LONG);
        host.expect("ready");
        let mut guest = ShmGuest::attach_path(seg.path()).unwrap();
        guest.set_wait_policy(WaitPolicy::BLOCK);
        guest.try_send(Meta::new(0, 0), b"hello").unwrap();
        host.expect("sent");
        let expected_verdict = if ending == "close" {
            host.say("close");
            host.expect("closed");
            host.say("bye");
            host.assert_success();
            "HostClosed"
        } else {
            host.kill();
            "HostDead"
        };
        // Every message published before the host left arrives, in order, through
        // each way of receiving; only then the verdict.
        let mut buf = Vec::new();
        let m = guest.recv(&mut buf, LONG).unwrap().expect("first");
        assert_eq!(
            (m.user_id, buf.as_slice()),
            (10, &b"inline"[..]),
            "{ending}"
        );
        let view = guest.recv_message(LONG).unwrap().expect("second");
        assert_eq!(view.meta().user_id, 11);
        let mut copied = Vec::new();
        view.copy_into(&mut copied);
        assert_eq!(copied, pattern(3, 0, 1000), "{ending}");
        drop(view);
        let m = loop {
            // A killed host's death is found by the liveness check while we poll.
            if let Some(m) = guest.try_recv(&mut buf).unwrap() {
                break m;
            }
        };
        assert_eq!((m.user_id, buf.as_slice()), (12, &b"last"[..]), "{ending}");
        let err = guest.recv(&mut buf, LONG).unwrap_err();
        let verdict = match err {
            RecvError::Detached(DetachedError::HostClosed) => "HostClosed",
            RecvError::Detached(DetachedError::HostDead(_)) => "HostDead",
            other => panic!("{ending}: {other:?}"),
        };
        assert_eq!(verdict, expected_verdict);
        // Sends fail at once.
        assert!(guest.try_send(Meta::new(0, 1), b"x").is_err());
    }
}

const BUSY: &str = "a_host_that_always_finds_work_still_notices_a_death";

/// The busy test's guests: a `backlog` guest publishes `N` messages at once and waits;
/// a `victim` attaches and waits to be killed.
fn busy_guest_main(role: &str) {
    watchdog();
    let mut guest = ShmGuest::attach_path(arg("SEG")).unwrap();
    if role == "backlog" {
        let n: u64 = arg("N").parse().unwrap();
        for i in 0..n {
            guest
                .try_send(Meta::new(PING, i), &i.to_le_bytes())
                .unwrap();
        }
    }
    tell(&format!("ready {}", guest.peer_id().get()));
    assert_eq!(hear(), "bye");
    guest.detach();
}

// A host that always finds a message never finds nothing and never sleeps, the two
// places its liveness checks used to run. Here it drains a backlog of 256 messages,
// spending 100 µs on each, with a liveness interval of 1 ms; a second guest was
// SIGKILLed before the first receive. The death must be reported while the backlog is
// still draining (every 32nd receive looks at the clock), not only once it runs out:
// before the fix the host noticed it at the first empty receive, after all 256.
// shm[verify shm.live.tick]
#[test]
fn a_host_that_always_finds_work_still_notices_a_death() {
    if let Some(role) = role() {
        return busy_guest_main(&role);
    }
    const N: u64 = 256;
    let seg = ShmPath::new("busy");
    let config = SegmentConfig {
        ring_capacity: 512,
        ..SegmentConfig::default()
    };
    let mut host = ShmHost::create(seg.path(), config).unwrap();
    host.set_liveness_interval(Duration::from_millis(1));
    let deaths = log_deaths(&mut host);
    let env = [
        ("SEG", seg.path().display().to_string()),
        ("N", N.to_string()),
    ];
    let mut backlog = Proc::spawn(BUSY, "backlog", &env, LONG);
    let mut victim = Proc::spawn(BUSY, "victim", &env, LONG);
    backlog.expect("ready");
    let victim_id = PeerId::new(victim.expect("ready").parse().unwrap()).unwrap();
    host.maintain();
    assert!(!victim.kill().success());
    let mut buf = Vec::new();
    let mut noticed_at = None;
    for i in 0..N {
        let got = host.try_recv(&mut buf).unwrap().expect("the backlog lasts");
        assert_eq!(
            (got.meta, buf.as_slice()),
            (Meta::new(PING, i), &i.to_le_bytes()[..])
        );
        // The work each message stands for (not synchronisation: nothing waits on it).
        let work = Instant::now();
        while work.elapsed() < Duration::from_micros(100) {
            std::hint::spin_loop();
        }
        if noticed_at.is_none() && !deaths.lock().unwrap().is_empty() {
            noticed_at = Some(i);
        }
    }
    let noticed_at = noticed_at.expect("the death was noticed while the host was busy");
    assert!(noticed_at < N - 1, "noticed at message {noticed_at}");
    let death = deaths.lock().unwrap()[0].0;
    assert_eq!((death.peer, death.attached), (victim_id, true));
    assert_eq!(
        host.try_recv(&mut buf).unwrap(),
        None,
        "the backlog is drained"
    );
    backlog.say("bye");
    backlog.assert_success();
}
