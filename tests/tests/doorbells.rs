//! Doorbells across processes (`shm.doorbell.*`): a party parked on its doorbell is
//! woken by the other process's ring, the host's fd covers every guest's doorbell and
//! death, the tokio wrappers lose no wakeup, and a connection that does not speak for
//! the guest it names is refused.

use std::future::Future;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::{Duration, Instant};

use shm_guest::{AsyncGuest, AttachError, DetachedError, HostDeathCause, RecvError, ShmGuest};
use shm_host::{
    AsyncHost, Death, DeathCause, Direction, Meta, PeerId, PeerState, SegmentConfig, ShmHost,
    SlotClasses,
};
use shm_primitives::doorbell::{self, Drained, Hello, NOT_PARKED, PARKED_DOORBELL};
use shm_primitives::Segment;
use shmhub_tests::{
    arg, attach_as_told, hear, pattern, poll_until, ring_header, role, role_command, tell,
    watch_segment, watchdog, Proc, ShmPath,
};

/// A child's deadline.
const LIMIT: Duration = Duration::from_secs(60);
/// How long a doorbell wait may last before the test calls it lost.
const LONG: Duration = Duration::from_secs(30);
/// A wait that ends sooner than this was ended by the doorbell, not its timeout.
const PROMPT: Duration = Duration::from_secs(15);
/// The bound on one async step (a lost wakeup shows as a timeout).
const STEP: Duration = Duration::from_secs(5);

/// Message types.
const WAKE: u32 = 1;
const REPORT: u32 = 2;
const DATA: u32 = 3;
const PING: u32 = 4;
const PONG: u32 = 5;
const DOWN: u32 = 6;
const UP: u32 = 7;

/// Length of the payload that wakes a sleeper (a slot payload, not inline).
const WAKE_LEN: usize = 1000;

fn segment_of(seg: &ShmPath) -> (String, Segment) {
    (seg.path().display().to_string(), watch_segment(seg.path()))
}

/// The `consumer_parked` flag of entry `index`'s ring towards its guest.
fn guest_waits_for_data(view: &Segment, index: usize) -> u32 {
    ring_header(view, index, Direction::ToGuest)
        .consumer_parked
        .load(Ordering::SeqCst)
}

/// Waits up to `timeout` for `fd` to be readable: poll's result, the events it
/// reported and the time the wait took.
fn poll_in(fd: BorrowedFd<'_>, timeout: Duration) -> (i32, i16, Duration) {
    let start = Instant::now();
    loop {
        let mut pfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let left = timeout.saturating_sub(start.elapsed()).as_millis() as i32;
        // SAFETY: one pollfd we own, for the duration of the call.
        let rc = unsafe { libc::poll(&mut pfd, 1, left) };
        if rc < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
            continue;
        }
        return (rc, pfd.revents, start.elapsed());
    }
}

/// Whether `fd` is readable right now (a zero-timeout poll).
fn readable_now(fd: BorrowedFd<'_>) -> bool {
    poll_in(fd, Duration::ZERO).0 == 1
}

/// Whether the other end of the stream `fd` is closed within `timeout` (readable, and
/// reading finds the end of the stream).
fn hung_up_within(fd: BorrowedFd<'_>, timeout: Duration) -> bool {
    poll_in(fd, timeout).0 == 1 && doorbell::drain(fd) == Drained::HungUp
}

/// Connects to a host's doorbell listener by hand, at the address the spec gives (a
/// NUL byte, `shmhub.`, the segment id as two 16-digit lower-case hex words), and
/// sends `bytes` (for example a hello cut short).
fn connect_raw(segment_id: [u64; 2], bytes: &[u8]) -> OwnedFd {
    // SAFETY: socket takes no pointers and returns a new fd or -1.
    let raw = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        )
    };
    assert!(raw >= 0, "socket: {}", std::io::Error::last_os_error());
    // SAFETY: the kernel just returned this fd; nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: sockaddr_un is plain old data; all zeroes is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let name = format!("shmhub.{:016x}{:016x}", segment_id[0], segment_id[1]);
    for (dst, src) in addr.sun_path[1..].iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    let len = std::mem::size_of::<libc::sa_family_t>() + 1 + name.len();
    // SAFETY: addr is a valid sockaddr_un of `len` bytes.
    let rc = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            len as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "connect: {}", std::io::Error::last_os_error());
    // SAFETY: send reads bytes.len() bytes from a live slice.
    let n = unsafe {
        libc::send(
            fd.as_raw_fd(),
            bytes.as_ptr().cast(),
            bytes.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    assert_eq!(n, bytes.len() as isize);
    fd
}

/// A `key=value` field of a child's report.
fn field<'a>(report: &'a str, key: &str) -> &'a str {
    report
        .split(' ')
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
        .unwrap_or_else(|| panic!("report {report:?} lacks {key}"))
}

/// In a child: arms the doorbell for a receive, re-checks, then waits in `poll(2)` on
/// the guest's fd for up to `LONG`; reports how the wait ended and what arrived.
fn sleep_on_doorbell(g: &mut ShmGuest) -> String {
    let mut buf = Vec::new();
    g.arm_doorbell_recv().unwrap();
    assert!(
        g.try_recv(&mut buf).unwrap().is_none(),
        "nothing is sent before the parent sees the guest parked"
    );
    let (rc, revents, took) = poll_in(g.as_fd(), LONG);
    let meta = g.try_recv(&mut buf).unwrap().expect("a message once rung");
    let intact = buf == pattern(u64::from(WAKE), meta.user_id, WAKE_LEN);
    format!(
        "rc={rc} pollin={} us={} type={} user={} intact={intact}",
        revents & libc::POLLIN != 0,
        took.as_micros(),
        meta.msg_type,
        meta.user_id
    )
}

/// In the parent: asserts that a `sleep_on_doorbell` report says the guest was woken
/// by readability, promptly, with message `user` intact.
fn check_woken(who: &str, report: &str, user: u64) {
    assert_eq!(field(report, "rc"), "1", "{who}: {report}");
    assert_eq!(field(report, "pollin"), "true", "{who}: {report}");
    let us: u64 = field(report, "us").parse().unwrap();
    assert!(
        us < PROMPT.as_micros() as u64,
        "{who} was woken by the ring, not the timeout: {report}"
    );
    assert_eq!(field(report, "type"), WAKE.to_string(), "{who}: {report}");
    assert_eq!(field(report, "user"), user.to_string(), "{who}: {report}");
    assert_eq!(field(report, "intact"), "true", "{who}: {report}");
    println!("{who}: woken through its doorbell after {us} us of poll");
}

/// Sends the message that wakes a sleeper: a slot payload.
fn send_wake(host: &mut ShmHost, to: PeerId, user: u64) {
    let payload = pattern(u64::from(WAKE), user, WAKE_LEN);
    host.try_send(to, Meta::new(WAKE, user), &payload).unwrap();
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Polls a future exactly once (so a test can see that it is waiting).
async fn poll_once<F: Future + Unpin>(fut: &mut F) -> Poll<F::Output> {
    std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut *fut).poll(cx))).await
}

/// Registers an `on_death` callback that records every death the host reports.
fn record_deaths(host: &mut ShmHost) -> Arc<Mutex<Vec<Death>>> {
    let deaths = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&deaths);
    host.on_death(move |d| sink.lock().unwrap().push(*d));
    deaths
}

const WOKEN: &str = "an_armed_guest_is_woken_through_its_doorbell";

/// A guest (by path or by ticket) that first takes one message without arming (its
/// doorbell must stay silent), then sleeps in `poll` on its doorbell and reports.
fn sleeper_main() {
    watchdog();
    let via = arg("VIA");
    let mut g = attach_as_told().unwrap();
    // Its fd is its doorbell.
    assert_eq!(g.as_raw_fd(), g.doorbell().as_raw_fd());
    assert_eq!(g.as_fd().as_raw_fd(), g.doorbell().as_raw_fd());
    let mut buf = Vec::new();
    let meta = poll_until(LONG, "the unannounced message", || {
        g.try_recv(&mut buf).unwrap()
    });
    assert_eq!((meta.msg_type, meta.user_id), (WAKE, 0));
    assert!(
        !readable_now(g.as_fd()),
        "{via}: the host rang a guest that was not parked on its doorbell"
    );
    let report = sleep_on_doorbell(&mut g);
    g.send(Meta::new(REPORT, 0), report.as_bytes(), LONG)
        .unwrap();
    g.detach();
}

/// Receives a guest's report (a `REPORT` message) from `from`.
fn report_from(host: &mut ShmHost, from: PeerId) -> String {
    let mut buf = Vec::new();
    let msg = host
        .recv(&mut buf, LONG)
        .unwrap()
        .expect("the guest's report");
    assert_eq!((msg.from, msg.meta.msg_type), (from, REPORT));
    String::from_utf8(buf).unwrap()
}

// A guest by path (whose connection the host has not even accepted yet when it must
// ring: it accepts first) and a guest by ticket (its socket pair) each park on their
// doorbell and are woken by the host's send, seen in shared memory as flag 2 first.
// shm[verify shm.doorbell.connect]
// shm[verify shm.doorbell.ring]
// shm[verify shm.doorbell.arm]
// shm[verify shm.doorbell.asfd]
#[test]
fn an_armed_guest_is_woken_through_its_doorbell() {
    if role().as_deref() == Some("sleeper") {
        return sleeper_main();
    }
    let seg = ShmPath::new("woken");
    let mut host = ShmHost::create(seg.path(), SegmentConfig::default()).unwrap();
    host.set_liveness_interval(LONG);
    let (path, view) = segment_of(&seg);

    // By path. Until the report, the host only sends: it accepts no connection
    // except the one it must ring.
    let envs = [("SEG", path), ("VIA", "path".to_string())];
    let mut child = Proc::spawn(WOKEN, "sleeper", &envs, LIMIT);
    let by_path = poll_until(LONG, "the path guest to attach", || {
        host.attached_peers().first().copied()
    });
    send_wake(&mut host, by_path, 0);
    poll_until(LONG, "the path guest parked on its doorbell", || {
        (guest_waits_for_data(&view, by_path.index()) == PARKED_DOORBELL).then_some(())
    });
    send_wake(&mut host, by_path, 1);
    let report = report_from(&mut host, by_path);
    check_woken("guest by path", &report, 1);
    assert_eq!(
        guest_waits_for_data(&view, by_path.index()),
        NOT_PARKED,
        "the receive disarmed it"
    );
    child.assert_success();

    // By ticket.
    let mut cmd = role_command(WOKEN, "sleeper", &[("VIA", "ticket".to_string())], LIMIT);
    let spawned = host.spawn(&mut cmd).unwrap();
    let by_ticket = spawned.handle.id;
    poll_until(LONG, "the ticket guest to attach", || {
        let state = host.peer_info(by_ticket).unwrap().state;
        (state == Some(PeerState::Attached)).then_some(())
    });
    send_wake(&mut host, by_ticket, 0);
    poll_until(LONG, "the ticket guest parked on its doorbell", || {
        (guest_waits_for_data(&view, by_ticket.index()) == PARKED_DOORBELL).then_some(())
    });
    send_wake(&mut host, by_ticket, 2);
    let report = report_from(&mut host, by_ticket);
    check_woken("guest by ticket", &report, 2);
    assert_eq!(guest_waits_for_data(&view, by_ticket.index()), NOT_PARKED);
    poll_until(LONG, "the ticket guest to leave", || {
        host.maintain();
        let state = host.peer_info(by_ticket).unwrap().state;
        (state == Some(PeerState::Empty)).then_some(())
    });
}

const HOST_FD: &str = "the_hosts_fd_is_readable_when_a_guest_rings";

// shm[verify shm.doorbell.ring]
// shm[verify shm.doorbell.arm]
// shm[verify shm.doorbell.asfd]
#[test]
fn the_hosts_fd_is_readable_when_a_guest_rings() {
    if role().as_deref() == Some("sender") {
        watchdog();
        let mut g = ShmGuest::attach_path(arg("SEG")).unwrap();
        tell("attached");
        loop {
            let line = hear();
            let Some(n) = line.strip_prefix("send ") else {
                break;
            };
            let n: u64 = n.parse().unwrap();
            g.try_send(Meta::new(DATA, n), &pattern(u64::from(DATA), n, 300))
                .unwrap();
            tell(&format!("sent {n}"));
        }
        g.detach();
        return;
    }
    let seg = ShmPath::new("hostfd");
    let mut host = ShmHost::create(seg.path(), SegmentConfig::default()).unwrap();
    host.set_liveness_interval(LONG);
    let (path, view) = segment_of(&seg);
    let host_parked = || view.header().host_parked.load(Ordering::SeqCst);
    let mut child = Proc::spawn(HOST_FD, "sender", &[("SEG", path)], LIMIT);
    child.expect("attached");
    // Link the guest's connection: then nothing is pending on the host's fd.
    host.maintain();
    assert!(
        !readable_now(host.as_fd()),
        "nothing pending after accepting"
    );
    let mut buf = Vec::new();

    // Not parked: the guest's send rings nothing.
    assert_eq!(host_parked(), NOT_PARKED);
    child.say("send 0");
    child.expect("sent 0");
    assert!(
        !readable_now(host.as_fd()),
        "a guest rang a host that was not parked"
    );
    let msg = host.try_recv(&mut buf).unwrap().expect("message 0");
    assert_eq!(
        (msg.meta.user_id, buf.as_slice()),
        (0, &pattern(3, 0, 300)[..])
    );

    // Armed: the guest's send makes the host's fd readable.
    host.arm_doorbell_recv();
    assert!(
        host.try_recv(&mut buf).unwrap().is_none(),
        "re-check: empty"
    );
    assert_eq!(host_parked(), PARKED_DOORBELL);
    assert!(!readable_now(host.as_fd()));
    child.say("send 1");
    let (rc, revents, took) = poll_in(host.as_fd(), LONG);
    assert_eq!(rc, 1, "the host's fd became readable");
    assert_ne!(revents & libc::POLLIN, 0);
    assert!(
        took < PROMPT,
        "woken by the ring, not the timeout ({took:?})"
    );
    println!("host woken through its fd after {took:?} of poll");
    let msg = host.try_recv(&mut buf).unwrap().expect("message 1");
    assert_eq!(
        (msg.meta.user_id, buf.as_slice()),
        (1, &pattern(3, 1, 300)[..])
    );
    assert_eq!(host_parked(), NOT_PARKED, "the receive disarmed the host");
    // The ring stays readable until the next arm drains it.
    assert!(readable_now(host.as_fd()));
    host.arm_doorbell_recv();
    assert!(!readable_now(host.as_fd()), "the arm drained the ring");
    child.expect("sent 1");
    child.say("bye");
    child.assert_success();
}

const PING_PONG: &str = "async_ping_pong_across_processes_loses_no_wakeup";
/// Round trips timed for the latency figures.
const ROUNDS: u64 = 20_000;
/// Round trips after those, each side starting its receive after a random delay.
const JITTERED: u64 = 10_000;

/// Busy-waits a pseudo-random 0..100 us before round `n`'s receive. Not
/// synchronisation: it spreads the moment this side arms across the moment the other
/// side publishes, so a wait that skipped its re-check after arming (or a ring lost
/// around the arm) is caught as a timeout.
fn jitter(side: u32, n: u64) {
    if n < ROUNDS {
        return;
    }
    let us = u64::from(pattern(u64::from(side), n, 1)[0]) * 100 / 256;
    let until = Instant::now() + Duration::from_micros(us);
    while Instant::now() < until {
        std::hint::spin_loop();
    }
}

// Both sides wait only on their doorbells through tokio (liveness interval 30 s, so
// nothing else can end a wait); a lost wakeup shows as a 5 s timeout. The jittered
// rounds make each side arm around the moment the other publishes.
// shm[verify shm.doorbell.async]
// shm[verify shm.doorbell.ring]
#[test]
fn async_ping_pong_across_processes_loses_no_wakeup() {
    if role().as_deref() == Some("echo") {
        watchdog();
        runtime().block_on(async {
            let mut g = ShmGuest::attach_path(arg("SEG")).unwrap();
            g.set_liveness_interval(LONG);
            let mut g = AsyncGuest::new(g).unwrap();
            tell("attached");
            let mut buf = Vec::new();
            for n in 0..ROUNDS + JITTERED {
                jitter(PONG, n);
                let meta = tokio::time::timeout(STEP, g.recv(&mut buf))
                    .await
                    .unwrap_or_else(|_| panic!("guest: lost wakeup at round {n}"))
                    .unwrap();
                assert_eq!((meta.msg_type, meta.user_id), (PING, n));
                tokio::time::timeout(STEP, g.send(Meta::new(PONG, n), &buf))
                    .await
                    .unwrap_or_else(|_| panic!("guest: no room at round {n}"))
                    .unwrap();
            }
        });
        tell("done");
        return;
    }
    let seg = ShmPath::new("asyncpp");
    let config = SegmentConfig {
        max_guests: 1,
        ring_capacity: 4,
        classes: SlotClasses::single(256, 2),
        broadcast_slots: 0,
        broadcast_slot_size: 0,
    };
    let mut host = ShmHost::create(seg.path(), config).unwrap();
    host.set_liveness_interval(LONG);
    let envs = [("SEG", seg.path().display().to_string())];
    let mut child = Proc::spawn(PING_PONG, "echo", &envs, LIMIT);
    child.expect("attached");
    let peer = PeerId::from_index(0).unwrap();
    let start = Instant::now();
    let mut rtts = runtime().block_on(async {
        let mut host = AsyncHost::new(host).unwrap();
        let mut buf = Vec::new();
        let mut rtts = Vec::with_capacity(ROUNDS as usize);
        for n in 0..ROUNDS + JITTERED {
            // A slot payload now and then, inline otherwise.
            let payload = match n % 64 {
                0 => pattern(u64::from(PING), n, 200),
                _ => n.to_le_bytes().to_vec(),
            };
            let sent = Instant::now();
            tokio::time::timeout(STEP, host.send(peer, Meta::new(PING, n), &payload))
                .await
                .unwrap_or_else(|_| panic!("host: no room at round {n}"))
                .unwrap();
            jitter(PING, n);
            let msg = tokio::time::timeout(STEP, host.recv(&mut buf))
                .await
                .unwrap_or_else(|_| panic!("host: lost wakeup at round {n}"))
                .unwrap();
            if n < ROUNDS {
                rtts.push(sent.elapsed());
            }
            assert_eq!(
                (msg.from, msg.meta.msg_type, msg.meta.user_id),
                (peer, PONG, n)
            );
            assert_eq!(buf, payload, "round {n}");
        }
        rtts
    });
    let took = start.elapsed();
    println!("{ROUNDS} + {JITTERED} jittered async round trips in {took:?}");
    rtts.sort_unstable();
    let at = |q: f64| rtts[((rtts.len() - 1) as f64 * q) as usize].as_secs_f64() * 1e6;
    println!(
        "async round trip over {ROUNDS}: p50 {:.1} us, p99 {:.1} us, max {:.1} us",
        at(0.5),
        at(0.99),
        at(1.0)
    );
    child.expect("done");
    child.assert_success();
}

const ROOM: &str = "async_sends_wait_for_room_in_both_directions";
/// Messages each way.
const TOTAL: u64 = 300;

/// Message `n` of direction `kind`: a slot payload every third message.
fn room_payload(kind: u32, n: u64) -> Vec<u8> {
    pattern(u64::from(kind), n, if n % 3 == 0 { 200 } else { 16 })
}

fn drainer_main() {
    watchdog();
    runtime().block_on(async {
        let mut g = ShmGuest::attach_path(arg("SEG")).unwrap();
        g.set_liveness_interval(LONG);
        let mut g = AsyncGuest::new(g).unwrap();
        tell("attached");
        assert_eq!(hear(), "drain");
        let mut buf = Vec::new();
        for n in 0..TOTAL {
            let meta = tokio::time::timeout(STEP, g.recv(&mut buf))
                .await
                .unwrap_or_else(|_| panic!("guest: lost wakeup at {n}"))
                .unwrap();
            assert_eq!((meta.msg_type, meta.user_id), (DOWN, n));
            assert_eq!(buf, room_payload(DOWN, n), "message {n} to the guest");
        }
        tell(&format!("got {TOTAL}"));
        // Now the other way: fill the ring to the host, then wait for room.
        let mut k = 0;
        loop {
            match g.get_mut().try_send(Meta::new(UP, k), &room_payload(UP, k)) {
                Ok(()) => k += 1,
                Err(e) if e.is_would_block() => break,
                Err(e) => panic!("{e}"),
            }
        }
        tell(&format!("full {k}"));
        {
            let payload = room_payload(UP, k);
            let send = g.send(Meta::new(UP, k), &payload);
            tokio::pin!(send);
            assert!(
                poll_once(&mut send).await.is_pending(),
                "a send into a full ring waits"
            );
            tell("pending");
            tokio::time::timeout(STEP, send)
                .await
                .expect("room once the host receives")
                .unwrap();
        }
        for n in k + 1..TOTAL {
            tokio::time::timeout(STEP, g.send(Meta::new(UP, n), &room_payload(UP, n)))
                .await
                .unwrap_or_else(|_| panic!("guest: no room for {n}"))
                .unwrap();
        }
    });
    tell("sent");
}

// shm[verify shm.doorbell.async]
#[test]
fn async_sends_wait_for_room_in_both_directions() {
    if role().as_deref() == Some("drainer") {
        return drainer_main();
    }
    let seg = ShmPath::new("asyncroom");
    let config = SegmentConfig {
        max_guests: 1,
        ring_capacity: 4,
        classes: SlotClasses::single(256, 4),
        broadcast_slots: 0,
        broadcast_slot_size: 0,
    };
    let mut host = ShmHost::create(seg.path(), config).unwrap();
    host.set_liveness_interval(LONG);
    let (path, view) = segment_of(&seg);
    let mut child = Proc::spawn(ROOM, "drainer", &[("SEG", path)], LIMIT);
    child.expect("attached");
    let peer = PeerId::from_index(0).unwrap();
    let producer_parked = |dir| {
        ring_header(&view, 0, dir)
            .producer_parked
            .load(Ordering::SeqCst)
    };
    runtime().block_on(async {
        let mut host = AsyncHost::new(host).unwrap();
        let mut n = 0;
        loop {
            let sent = host
                .get_mut()
                .try_send(peer, Meta::new(DOWN, n), &room_payload(DOWN, n));
            match sent {
                Ok(()) => n += 1,
                Err(e) if e.is_would_block() => break,
                Err(e) => panic!("{e}"),
            }
        }
        assert!((1..=4).contains(&n), "{n} messages fill the ring or pool");
        {
            let payload = room_payload(DOWN, n);
            let send = host.send(peer, Meta::new(DOWN, n), &payload);
            tokio::pin!(send);
            assert!(
                poll_once(&mut send).await.is_pending(),
                "a send into a full ring waits"
            );
            assert_eq!(producer_parked(Direction::ToGuest), PARKED_DOORBELL);
            child.say("drain");
            tokio::time::timeout(STEP, send)
                .await
                .expect("room once the guest consumes")
                .unwrap();
        }
        for m in n + 1..TOTAL {
            tokio::time::timeout(
                STEP,
                host.send(peer, Meta::new(DOWN, m), &room_payload(DOWN, m)),
            )
            .await
            .unwrap_or_else(|_| panic!("host: no room for {m}"))
            .unwrap();
        }
        assert_eq!(child.expect("got"), TOTAL.to_string());

        // The guest's side: its send waits until the host receives.
        let k: u64 = child.expect("full").parse().unwrap();
        assert!((1..=4).contains(&k), "{k} messages fill the ring or pool");
        child.expect("pending");
        assert_eq!(producer_parked(Direction::ToHost), PARKED_DOORBELL);
        let mut buf = Vec::new();
        for m in 0..TOTAL {
            let msg = tokio::time::timeout(STEP, host.recv(&mut buf))
                .await
                .unwrap_or_else(|_| panic!("host: lost wakeup at {m}"))
                .unwrap();
            assert_eq!((msg.meta.msg_type, msg.meta.user_id), (UP, m));
            assert_eq!(buf, room_payload(UP, m), "message {m} to the host");
        }
        child.expect("sent");
    });
    child.assert_success();
}

const HOST_KILL: &str = "a_killed_host_wakes_an_async_guest_at_once";

// The guest's liveness interval is 30 s, so within 2 s only its doorbell's end of
// stream can tell it that the host died.
// shm[verify shm.doorbell.async]
// shm[verify shm.doorbell.asfd]
#[test]
fn a_killed_host_wakes_an_async_guest_at_once() {
    if role().as_deref() == Some("host") {
        watchdog();
        let mut host = ShmHost::create(arg("SEG"), SegmentConfig::default()).unwrap();
        tell("ready");
        let mut buf = Vec::new();
        loop {
            if let Some(msg) = host.recv(&mut buf, Duration::from_millis(50)).unwrap() {
                let reply = Meta::new(PONG, msg.meta.user_id);
                host.try_send(msg.from, reply, &buf).unwrap();
            }
        }
    }
    let seg = ShmPath::new("hostkill");
    let path = seg.path().display().to_string();
    let mut host = Proc::spawn(HOST_KILL, "host", &[("SEG", path.clone())], LIMIT);
    host.expect("ready");
    let view = watch_segment(seg.path());
    runtime().block_on(async {
        let mut g = ShmGuest::attach_path(&path).unwrap();
        g.set_liveness_interval(LONG);
        let index = g.peer_id().index();
        let mut g = AsyncGuest::new(g).unwrap();
        // One round trip: the host serves this guest.
        let mut buf = Vec::new();
        tokio::time::timeout(STEP, g.send(Meta::new(PING, 9), b"ping"))
            .await
            .unwrap()
            .unwrap();
        let meta = tokio::time::timeout(STEP, g.recv(&mut buf))
            .await
            .expect("the host's pong")
            .unwrap();
        assert_eq!(
            (meta.msg_type, meta.user_id, buf.as_slice()),
            (PONG, 9, &b"ping"[..])
        );

        // A receive dropped mid-wait loses nothing: the host's reply rings while no
        // receive waits, and the next receive takes it.
        {
            let recv = g.recv(&mut buf);
            tokio::pin!(recv);
            assert!(
                poll_once(&mut recv).await.is_pending(),
                "nothing to receive"
            );
        }
        tokio::time::timeout(STEP, g.send(Meta::new(PING, 10), b"again"))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(poll_in(g.get_mut().as_fd(), STEP).0, 1, "the reply rang");
        let meta = tokio::time::timeout(STEP, g.recv(&mut buf))
            .await
            .expect("the reply, after a dropped receive")
            .unwrap();
        assert_eq!(
            (meta.msg_type, meta.user_id, buf.as_slice()),
            (PONG, 10, &b"again"[..])
        );

        let recv = g.recv(&mut buf);
        tokio::pin!(recv);
        assert!(
            poll_once(&mut recv).await.is_pending(),
            "nothing to receive"
        );
        assert_eq!(guest_waits_for_data(&view, index), PARKED_DOORBELL);
        let killed = Instant::now();
        host.kill();
        let got = tokio::time::timeout(Duration::from_secs(10), recv)
            .await
            .expect("the waiter wakes up (not after its 30 s interval)");
        let took = killed.elapsed();
        let cause = match got {
            Err(RecvError::Detached(DetachedError::HostDead(cause))) => cause,
            other => panic!("expected HostDead, got {other:?}"),
        };
        println!("async guest saw the host's death as {cause:?} {took:?} after SIGKILL");
        assert!(
            matches!(cause, HostDeathCause::HungUp | HostDeathCause::LockReleased),
            "{cause:?}"
        );
        assert!(took < Duration::from_secs(2), "woken within 2 s ({took:?})");
    });
}

const FORGED: &str = "forged_doorbell_hellos_are_refused";

fn forged_guest_main() {
    watchdog();
    let mut g = ShmGuest::attach_path(arg("SEG")).unwrap();
    // From the right process: a second connection with the right hello (the entry
    // is linked already), and one naming the next generation of its entry. The host
    // must refuse both.
    let hello = Hello {
        index: g.peer_id().index() as u32,
        generation: g.generation(),
    };
    let duplicate = doorbell::connect(g.segment_id(), hello).unwrap();
    let next = Hello {
        generation: hello.generation.wrapping_add(1),
        ..hello
    };
    let next_generation = doorbell::connect(g.segment_id(), next).unwrap();
    tell(&format!("attached {} {}", hello.index, hello.generation));
    assert_eq!(hear(), "check");
    assert!(
        hung_up_within(duplicate.as_fd(), STEP),
        "the duplicate connection was not refused"
    );
    assert!(
        hung_up_within(next_generation.as_fd(), STEP),
        "a hello naming another generation was not refused"
    );
    tell("refused");
    let report = sleep_on_doorbell(&mut g);
    tell(&format!("woken {report}"));
    g.detach();
}

// shm[verify shm.doorbell.connect]
#[test]
fn forged_doorbell_hellos_are_refused() {
    if role().as_deref() == Some("guest") {
        return forged_guest_main();
    }
    let seg = ShmPath::new("forged");
    let config = SegmentConfig {
        max_guests: 2,
        ..SegmentConfig::default()
    };
    let mut host = ShmHost::create(seg.path(), config).unwrap();
    host.set_liveness_interval(LONG);
    let (path, view) = segment_of(&seg);
    let id = host.segment_id();
    let e0 = PeerId::from_index(0).unwrap();
    let e1 = PeerId::from_index(1).unwrap();
    let g0 = host.peer_info(e0).unwrap().generation;
    let g1 = host.peer_info(e1).unwrap().generation;
    // Queued before the guest's own connection, naming exactly the entry and
    // generation it is about to claim: only the pid check can refuse it.
    let impostor = doorbell::connect(
        id,
        Hello {
            index: 0,
            generation: g0,
        },
    )
    .unwrap();
    let mut child = Proc::spawn(FORGED, "guest", &[("SEG", path)], LIMIT);
    assert_eq!(child.expect("attached"), format!("0 {g0}"));
    let info = host.peer_info(e0).unwrap();
    assert_eq!(
        (info.state, info.pid),
        (Some(PeerState::Attached), child.pid())
    );
    let hello = |index, generation| Hello { index, generation };
    let refused = [
        ("right entry, wrong pid", impostor),
        (
            "another generation (and pid)",
            doorbell::connect(id, hello(0, g0.wrapping_add(1))).unwrap(),
        ),
        (
            "an entry no guest holds",
            doorbell::connect(id, hello(1, g1)).unwrap(),
        ),
        (
            "an index past the table",
            doorbell::connect(id, hello(9, 0)).unwrap(),
        ),
        (
            "an index past any table",
            doorbell::connect(id, hello(u32::MAX, g0)).unwrap(),
        ),
    ];
    // Half a hello: held until 2 s after it was accepted.
    let partial = connect_raw(id, &[0, 0, 0, 0]);
    let connected = Instant::now();
    // The host accepts inside its liveness check.
    host.maintain();
    for (what, fd) in &refused {
        assert!(
            hung_up_within(fd.as_fd(), STEP),
            "a hello with {what} was not refused"
        );
    }
    assert!(!readable_now(partial.as_fd()), "half a hello waits");
    child.say("check");
    child.expect("refused");
    // The real guest's own doorbell works.
    poll_until(LONG, "the guest parked on its doorbell", || {
        (guest_waits_for_data(&view, 0) == PARKED_DOORBELL).then_some(())
    });
    send_wake(&mut host, e0, 5);
    let report = child.expect("woken");
    check_woken("the real guest", &report, 5);
    child.assert_success();
    // The half hello is closed once 2 s have passed since the host accepted it.
    poll_until(
        Duration::from_secs(10),
        "the half hello to be closed",
        || {
            host.maintain();
            (poll_in(partial.as_fd(), Duration::from_millis(20)).0 == 1).then_some(())
        },
    );
    let took = connected.elapsed();
    assert_eq!(doorbell::drain(partial.as_fd()), Drained::HungUp);
    assert!(
        took >= Duration::from_millis(1900),
        "closed only when its 2 s ran out ({took:?})"
    );
}

// A guest that cannot connect (the listener's backlog is full) gives its entry back
// and fails with an I/O error.
// shm[verify shm.doorbell.connect]
#[test]
fn a_guest_that_cannot_connect_gives_its_entry_back() {
    let seg = ShmPath::new("noconnect");
    let mut host = ShmHost::create(seg.path(), SegmentConfig::default()).unwrap();
    let id = host.segment_id();
    let mut queued = Vec::new();
    let junk = Hello {
        index: 99,
        generation: 0,
    };
    while let Ok(fd) = doorbell::connect(id, junk) {
        queued.push(fd);
        assert!(queued.len() < 10_000, "the listener's backlog never filled");
    }
    let e0 = PeerId::from_index(0).unwrap();
    let g0 = host.peer_info(e0).unwrap().generation;
    match ShmGuest::attach_path(seg.path()) {
        Err(AttachError::Io { op, .. }) => assert_eq!(op, "connect the doorbell"),
        other => panic!("expected an I/O error, got {other:?}"),
    }
    let info = host.peer_info(e0).unwrap();
    assert_eq!(
        (info.state, info.generation),
        (Some(PeerState::Goodbye), g0)
    );
    // The host refuses the junk and recycles the entry; then a guest attaches.
    host.maintain();
    assert_eq!(host.peer_info(e0).unwrap().state, Some(PeerState::Empty));
    for fd in &queued {
        assert!(hung_up_within(fd.as_fd(), STEP));
    }
    let g = ShmGuest::attach_path(seg.path()).unwrap();
    assert_eq!((g.peer_id(), g.generation()), (e0, g0 + 1));
}

const DEAD: &str = "a_dead_guest_makes_the_hosts_fd_readable";

// shm[verify shm.doorbell.asfd]
// shm[verify shm.doorbell.arm]
#[test]
fn a_dead_guest_makes_the_hosts_fd_readable() {
    match role().as_deref() {
        Some("victim") => {
            watchdog();
            let g = ShmGuest::attach_path(arg("SEG")).unwrap();
            tell(&format!(
                "attached {} {}",
                g.peer_id().index(),
                g.generation()
            ));
            hear();
            return;
        }
        Some("spawned-victim") => {
            watchdog();
            let mut g = ShmGuest::from_env().unwrap();
            g.send(Meta::new(REPORT, 0), b"attached", LONG).unwrap();
            let mut buf = Vec::new();
            let woke = g.recv(&mut buf, LIMIT);
            panic!("the victim woke: {woke:?}");
        }
        Some(other) => panic!("unknown role {other}"),
        None => {}
    }
    let seg = ShmPath::new("deadguest");
    let mut host = ShmHost::create(seg.path(), SegmentConfig::default()).unwrap();
    // Only the fd can bring the news in time: no liveness check falls due.
    host.set_liveness_interval(LONG);
    let deaths = record_deaths(&mut host);
    let count = || deaths.lock().unwrap().len();
    let mut buf = Vec::new();

    // A guest by path: its doorbell's end of stream.
    let envs = [("SEG", seg.path().display().to_string())];
    let mut child = Proc::spawn(DEAD, "victim", &envs, LIMIT);
    let attached = child.expect("attached");
    let (index, generation) = attached.split_once(' ').unwrap();
    let peer = PeerId::from_index(index.parse().unwrap()).unwrap();
    let generation: u32 = generation.parse().unwrap();
    host.arm_doorbell_recv();
    assert!(host.try_recv(&mut buf).unwrap().is_none());
    assert!(
        !readable_now(host.as_fd()),
        "nothing pending while it lives"
    );
    assert_eq!(count(), 0);
    child.kill();
    let (rc, _, took) = poll_in(host.as_fd(), LONG);
    assert_eq!(rc, 1, "the host's fd became readable");
    assert!(took < PROMPT, "at the death, not the timeout ({took:?})");
    assert_eq!(count(), 0, "nothing ran in the host yet");
    host.arm_doorbell_recv();
    let death = {
        let all = deaths.lock().unwrap();
        assert_eq!(all.len(), 1, "one death, reported once: {all:?}");
        all[0]
    };
    println!(
        "path guest's death: {:?}, fd readable after {took:?}",
        death.cause
    );
    assert_eq!(
        (death.peer, death.generation, death.attached),
        (peer, generation, true)
    );
    assert!(
        matches!(death.cause, DeathCause::HungUp | DeathCause::LockReleased),
        "{death:?}"
    );
    assert_eq!(host.peer_info(peer).unwrap().state, Some(PeerState::Empty));
    assert!(
        !readable_now(host.as_fd()),
        "the dead doorbell left the set"
    );

    // A spawned guest: its pidfd and its doorbell.
    let mut cmd = role_command(DEAD, "spawned-victim", &[], LIMIT);
    let spawned = host.spawn(&mut cmd).unwrap();
    let msg = host.recv(&mut buf, LONG).unwrap().expect("attached");
    assert_eq!(msg.from, spawned.handle.id);
    host.arm_doorbell_recv();
    assert!(host.try_recv(&mut buf).unwrap().is_none());
    assert!(
        !readable_now(host.as_fd()),
        "nothing pending while it lives"
    );
    host.signal_guest(spawned.handle, libc::SIGKILL).unwrap();
    let (rc, _, took) = poll_in(host.as_fd(), LONG);
    assert_eq!(rc, 1, "the host's fd became readable");
    assert!(took < PROMPT, "at the death, not the timeout ({took:?})");
    assert_eq!(count(), 1, "nothing ran in the host yet");
    host.arm_doorbell_recv();
    let death = {
        let all = deaths.lock().unwrap();
        assert_eq!(all.len(), 2, "one more death, reported once: {all:?}");
        all[1]
    };
    println!(
        "spawned guest's death: {:?}, fd readable after {took:?}",
        death.cause
    );
    assert_eq!(
        (death.peer, death.generation, death.attached),
        (spawned.handle.id, spawned.handle.generation, true)
    );
    assert!(
        matches!(death.cause, DeathCause::ProcessExited | DeathCause::HungUp),
        "{death:?}"
    );
    assert!(!readable_now(host.as_fd()), "the dead child left the set");
    // Exactly once: later calls report nothing new.
    for _ in 0..3 {
        host.maintain();
        host.arm_doorbell_recv();
        assert!(host.try_recv(&mut buf).unwrap().is_none());
    }
    assert_eq!(count(), 2);
}

/// Sends raw bytes on a connection made by `connect_raw`.
fn send_raw(fd: BorrowedFd<'_>, bytes: &[u8]) {
    // SAFETY: send reads bytes.len() bytes from a live slice.
    let n = unsafe {
        libc::send(
            fd.as_raw_fd(),
            bytes.as_ptr().cast(),
            bytes.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    assert_eq!(n, bytes.len() as isize);
}

// A path guest's hello is two writes away from its connect: the host may accept the
// connection between them. The rest of the hello, and any ring after it, must still
// make the host's fd readable (not wait for the next liveness check).
// shm[verify shm.doorbell.connect]
// shm[verify shm.doorbell.asfd]
#[test]
fn a_hello_that_arrives_after_the_accept_still_wakes_the_host() {
    let seg = ShmPath::new("latehello");
    let mut host = ShmHost::create(seg.path(), SegmentConfig::default()).unwrap();
    // No liveness check falls due: only the fd can bring the news.
    host.set_liveness_interval(LONG);
    let view = watch_segment(seg.path());
    // Claim entry 0 by hand, as a guest does: its liveness lock, then the claim CAS.
    let e0 = PeerId::from_index(0).unwrap();
    let file = view.backing().file().expect("file-backed");
    let offset = view.layout().peer_offset(0);
    assert!(shm_primitives::lock::try_lock(file, offset).unwrap());
    let generation = view
        .peer(e0)
        .unwrap()
        .try_claim(PeerState::Empty, None, std::process::id())
        .expect("entry 0 was Empty");
    let mut hello = [0u8; Hello::LEN];
    hello[..4].copy_from_slice(&0u32.to_le_bytes());
    hello[4..].copy_from_slice(&generation.to_le_bytes());
    // Half a hello; the host accepts the connection while it is incomplete.
    let conn = connect_raw(host.segment_id(), &hello[..4]);
    host.arm_doorbell_recv();
    // The accepted connection reports its first bytes once (one spurious wake); after
    // the next arm a half hello must not keep the fd readable (an event loop would
    // spin).
    host.arm_doorbell_recv();
    assert!(
        !readable_now(host.as_fd()),
        "a half hello leaves the fd quiet"
    );
    // The rest arrives: the host's fd must say so at once.
    send_raw(conn.as_fd(), &hello[4..]);
    let (rc, _, took) = poll_in(host.as_fd(), LONG);
    assert_eq!(rc, 1, "the completed hello made the host's fd readable");
    assert!(took < PROMPT, "woken by the fd, not a timeout ({took:?})");
    // The next arm links the connection; a ring on it then wakes the host too.
    host.arm_doorbell_recv();
    assert!(!readable_now(host.as_fd()), "the hello was consumed");
    doorbell::ring(conn.as_fd());
    let (rc, _, took) = poll_in(host.as_fd(), LONG);
    assert_eq!(
        rc, 1,
        "a ring on the linked doorbell made the host's fd readable"
    );
    assert!(took < PROMPT);
    // And the link is real: the host rings this doorbell when the "guest" waits.
    ring_header(&view, 0, Direction::ToGuest)
        .consumer_parked
        .store(PARKED_DOORBELL, Ordering::SeqCst);
    host.try_send(e0, Meta::new(WAKE, 1), b"x").unwrap();
    let (rc, _, _) = poll_in(conn.as_fd(), LONG);
    assert_eq!(rc, 1, "the host rang the linked doorbell");
    assert_eq!(doorbell::drain(conn.as_fd()), Drained::Rang);
}
