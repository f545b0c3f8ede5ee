//! Spawning guests with tickets: what a ticket carries, what a child inherits, and
//! how the host cleans up after tickets and children that never attach or die.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::os::fd::AsRawFd;
use std::os::unix::process::ExitStatusExt;
use std::process::Command;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use shm_guest::{AttachError, ShmGuest, TicketError};
use shm_host::{
    Death, DeathCause, GuestOptions, Meta, PeerId, PeerState, Received, SegmentConfig, SendError,
    ShmHost, SpawnError,
};
use shmhub_tests::{
    arg, open_fds, poll_until, role, role_command, tell, until_reapable, watchdog, Proc, ShmPath,
};

const REPORT: u32 = 1;
const HELLO: u32 = 2;
const READY: u32 = 3;

/// Held by the parent side of every test here: they count this process's descriptors
/// and children, which `cargo test` (one process, tests in threads) would otherwise
/// share between them. Under nextest each test has its own process anyway.
fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Registers an `on_death` callback that records every death the host reports.
fn record_deaths(host: &mut ShmHost) -> Arc<Mutex<Vec<Death>>> {
    let deaths = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&deaths);
    host.on_death(move |d| sink.lock().unwrap().push(*d));
    deaths
}

/// The deaths reported so far for `peer`.
fn deaths_of(deaths: &Mutex<Vec<Death>>, peer: PeerId) -> Vec<Death> {
    let all = deaths.lock().unwrap();
    all.iter().filter(|d| d.peer == peer).copied().collect()
}

/// State and generation of an entry.
fn entry(host: &ShmHost, peer: PeerId) -> (Option<PeerState>, u32) {
    let info = host.peer_info(peer).unwrap();
    (info.state, info.generation)
}

/// The descriptor flags (`F_GETFD`) of `fd`, `None` if it is not open.
fn fd_flags(fd: i32) -> Option<i32> {
    // SAFETY: F_GETFD on any number only queries the descriptor table.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    (flags != -1).then_some(flags)
}

/// The file status flags (`F_GETFL`) of an open `fd`.
fn fd_status_flags(fd: i32) -> i32 {
    // SAFETY: F_GETFL only queries the open file description.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    assert_ne!(flags, -1, "fd {fd} is open");
    flags
}

/// What `/proc/self/fd/<fd>` points at (`socket:[..]`, `anon_inode:[pidfd]`, a path).
fn fd_target(fd: i32) -> String {
    std::fs::read_link(format!("/proc/self/fd/{fd}"))
        .map(|p| p.display().to_string())
        .unwrap_or_default()
}

/// Whether process `pid` is gone entirely: exited and reaped (no zombie left).
fn reaped(pid: u32) -> bool {
    !std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// Whether process `pid` (a child of ours) has exited and awaits reaping.
fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| Some(s.rsplit_once(')')?.1.trim_start().starts_with('Z')))
        .unwrap_or(false)
}

/// Descriptors of this process that any exec'd child inherits whatever the library
/// does (not close-on-exec): 0, 1, 2 and whatever the test runner leaked to us.
fn inheritable_fds() -> BTreeSet<i32> {
    open_fds()
        .into_iter()
        .filter(|&fd| fd_flags(fd).is_some_and(|f| f & libc::FD_CLOEXEC == 0))
        .collect()
}

/// Receives one message within `limit` (the host keeps running its liveness checks).
fn recv_within(host: &mut ShmHost, buf: &mut Vec<u8>, limit: Duration) -> Received {
    poll_until(limit, "a message from the guest", || {
        host.recv(buf, Duration::from_millis(20)).unwrap()
    })
}

/// Runs the host until `peer` is Empty; returns its generation then.
fn until_empty(host: &mut ShmHost, peer: PeerId, limit: Duration) -> u32 {
    let mut buf = Vec::new();
    poll_until(limit, "the entry to go back to Empty", || {
        if let Some(m) = host.try_recv(&mut buf).unwrap() {
            panic!("unexpected message {m:?}");
        }
        host.maintain();
        match entry(host, peer) {
            (Some(PeerState::Empty), g) => Some(g),
            _ => None,
        }
    })
}

/// Runs the host until the process `pid` has been reaped.
fn until_reaped(host: &mut ShmHost, pid: u32) {
    poll_until(Duration::from_secs(5), "the child to be reaped", || {
        host.maintain();
        reaped(pid).then_some(())
    });
}

/// A `key=value` field of a child's report.
fn field<'a>(report: &'a str, key: &str) -> &'a str {
    report
        .split(' ')
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
        .unwrap_or_else(|| panic!("report {report:?} lacks {key}"))
}

// shm[verify shm.spawn.ticket]
// shm[verify shm.spawn.inherit]
// shm[verify shm.spawn.child]
// shm[verify shm.spawn.pidfd]
#[test]
fn a_spawned_guest_attaches_with_its_ticket_and_inherits_only_its_doorbell() {
    const TEST: &str = "a_spawned_guest_attaches_with_its_ticket_and_inherits_only_its_doorbell";
    if role().as_deref() == Some("child") {
        watchdog();
        // What this process was born with, before it opens anything itself.
        let born_with = open_fds();
        let mut guest = ShmGuest::from_env().unwrap();
        let doorbell = Some(guest.doorbell().as_raw_fd());
        let cloexec = doorbell
            .and_then(fd_flags)
            .is_some_and(|f| f & libc::FD_CLOEXEC != 0);
        let fds: Vec<String> = born_with.iter().map(i32::to_string).collect();
        let report = format!(
            "peer={} gen={} env_fd={} doorbell={} cloexec={cloexec} fds={}",
            guest.peer_id().get(),
            guest.generation(),
            arg("SHMHUB_DOORBELL_FD"),
            doorbell.map_or("none".to_string(), |fd| fd.to_string()),
            fds.join(","),
        );
        guest
            .send(
                Meta::new(REPORT, 0),
                report.as_bytes(),
                Duration::from_secs(10),
            )
            .unwrap();
        guest.detach();
        return;
    }
    // Measured before the library creates anything: only these (and the doorbell)
    // may reach the child.
    let _serial = serial();
    let inheritable = inheritable_fds();
    let seg = ShmPath::new("spawn");
    let mut host = ShmHost::create(seg.path(), SegmentConfig::default()).unwrap();
    let deaths = record_deaths(&mut host);
    // Another guest's ticket is alive while this child is spawned: neither end of its
    // doorbell, nor the host's segment descriptor, may leak into the child.
    let (other, other_ticket) = host.prepare_guest(GuestOptions::default()).unwrap();
    let before_spawn: BTreeSet<i32> = open_fds().into_iter().collect();
    for &fd in before_spawn.difference(&inheritable) {
        let flags = fd_flags(fd).unwrap();
        assert_ne!(
            flags & libc::FD_CLOEXEC,
            0,
            "library fd {fd} ({}) is not close-on-exec",
            fd_target(fd)
        );
    }
    let mut cmd = role_command(TEST, "child", &[], Duration::from_secs(30));
    let spawned = host.spawn(&mut cmd).unwrap();
    assert_ne!(spawned.handle.id, other.id);
    // The host dropped its copy of the child's end and kept one pidfd and its own
    // doorbell end: exactly two new descriptors, both close-on-exec.
    let after_spawn: BTreeSet<i32> = open_fds().into_iter().collect();
    let new: Vec<i32> = after_spawn.difference(&before_spawn).copied().collect();
    let mut kinds: Vec<String> = new
        .iter()
        .map(|&fd| {
            let target = fd_target(fd);
            assert_ne!(fd_flags(fd).unwrap() & libc::FD_CLOEXEC, 0, "{target}");
            if target.starts_with("socket:") {
                "socket".to_string()
            } else {
                target
            }
        })
        .collect();
    kinds.sort();
    assert_eq!(
        kinds,
        ["anon_inode:[pidfd]", "socket"],
        "new descriptors after spawn: {new:?}"
    );
    assert!(before_spawn.is_subset(&after_spawn));

    let mut buf = Vec::new();
    let msg = recv_within(&mut host, &mut buf, Duration::from_secs(20));
    assert_eq!(
        msg.handle(),
        spawned.handle,
        "the child holds its ticket's entry"
    );
    assert_eq!(msg.meta, Meta::new(REPORT, 0));
    let report = String::from_utf8(buf.clone()).unwrap();
    assert_eq!(field(&report, "peer"), spawned.handle.id.get().to_string());
    assert_eq!(field(&report, "gen"), spawned.handle.generation.to_string());
    let doorbell: i32 = field(&report, "doorbell").parse().unwrap();
    assert_eq!(field(&report, "env_fd"), doorbell.to_string());
    assert!(doorbell > 2);
    assert_eq!(
        field(&report, "cloexec"),
        "true",
        "the child makes its doorbell close-on-exec again"
    );
    let born_with: BTreeSet<i32> = field(&report, "fds")
        .split(',')
        .map(|fd| fd.parse().unwrap())
        .collect();
    let mut expected: BTreeSet<i32> = [0, 1, 2, doorbell].into();
    expected.extend(&inheritable);
    assert_eq!(
        born_with, expected,
        "the child inherited exactly stdio and its doorbell"
    );

    // It left by Goodbye: the entry is recycled, the child reaped, and no death
    // reported.
    let generation = until_empty(&mut host, spawned.handle.id, Duration::from_secs(10));
    assert_eq!(generation, spawned.handle.generation + 1);
    until_reaped(&mut host, spawned.pid);
    for _ in 0..5 {
        host.maintain();
    }
    assert_eq!(deaths_of(&deaths, spawned.handle.id), []);
    assert_eq!(host.peer_info(spawned.handle.id).unwrap().stats.deaths, 0);
    assert_eq!(entry(&host, other.id), (Some(PeerState::Reserved), 0));
    drop(other_ticket);
}

// shm[verify shm.spawn.ticket]
// shm[verify shm.spawn.child]
// shm[verify shm.spawn.inherit]
#[test]
fn ticket_args_render_and_parse() {
    const TEST: &str = "ticket_args_render_and_parse";
    if role().as_deref() == Some("from-args") {
        watchdog();
        // The parent removed the ticket's variables: it is only in the arguments.
        match ShmGuest::from_env() {
            Err(AttachError::Ticket(TicketError::Missing("--hub-path"))) => {}
            other => panic!("from_env without a ticket: {other:?}"),
        }
        let ticket: Vec<OsString> = arg("TICKET_ARGS")
            .split('\u{1f}')
            .map(OsString::from)
            .collect();
        let ticket_fd = ticket
            .iter()
            .skip_while(|a| a.to_str() != Some("--doorbell-fd"))
            .nth(1)
            .and_then(|fd| fd.to_str()?.parse::<i32>().ok())
            .expect("the ticket names a doorbell fd");
        // The whole argument list, with unknown arguments around the ticket.
        let args = std::env::args_os()
            .chain(["--unrelated".into(), "x".into()])
            .chain(ticket)
            .chain(["--verbose".into()]);
        let mut guest = ShmGuest::from_ticket_args(args).unwrap();
        assert_eq!(
            guest.doorbell().as_raw_fd(),
            ticket_fd,
            "the ticket's doorbell"
        );
        tell(&format!(
            "attached {} {}",
            guest.peer_id().get(),
            guest.generation()
        ));
        guest
            .send(Meta::new(HELLO, 7), b"from args", Duration::from_secs(10))
            .unwrap();
        guest.detach();
        tell("ok");
        return;
    }
    let _serial = serial();
    let seg = ShmPath::new("args");
    let mut host = ShmHost::create(seg.path(), SegmentConfig::default()).unwrap();
    let deaths = record_deaths(&mut host);
    let options = GuestOptions {
        attach_timeout: Duration::from_millis(7000),
    };
    let (handle, ticket) = host.prepare_guest(options).unwrap();
    assert_eq!(ticket.handle(), handle);
    assert_eq!(
        entry(&host, handle.id),
        (Some(PeerState::Reserved), handle.generation),
        "prepare_guest reserves the entry"
    );
    let fd_text = ticket
        .envs()
        .into_iter()
        .find(|(k, _)| k == "SHMHUB_DOORBELL_FD")
        .map(|(_, v)| v.into_string().unwrap())
        .expect("SHMHUB_DOORBELL_FD");
    let fd: i32 = fd_text.parse().unwrap();
    // The child's end, as held here: a non-blocking, close-on-exec stream socket.
    assert!(fd_target(fd).starts_with("socket:"), "{}", fd_target(fd));
    assert_ne!(fd_flags(fd).unwrap() & libc::FD_CLOEXEC, 0);
    assert_ne!(fd_status_flags(fd) & libc::O_NONBLOCK, 0);
    let path = seg.path().to_str().unwrap();
    let id = handle.id.get().to_string();
    let generation = handle.generation.to_string();
    let expected_args: Vec<OsString> = [
        "--hub-path",
        path,
        "--peer-id",
        &id,
        "--peer-generation",
        &generation,
        "--doorbell-fd",
        &fd_text,
        "--attach-timeout-ms",
        "7000",
    ]
    .into_iter()
    .map(OsString::from)
    .collect();
    assert_eq!(ticket.args(), expected_args);
    let expected_envs: Vec<(OsString, OsString)> = [
        ("SHMHUB_HUB_PATH", path),
        ("SHMHUB_PEER_ID", &id),
        ("SHMHUB_PEER_GENERATION", &generation),
        ("SHMHUB_DOORBELL_FD", &fd_text),
        ("SHMHUB_ATTACH_TIMEOUT_MS", "7000"),
    ]
    .into_iter()
    .map(|(k, v)| (k.into(), v.into()))
    .collect();
    assert_eq!(ticket.envs(), expected_envs);

    let joined = ticket
        .args()
        .iter()
        .map(|a| a.to_str().unwrap())
        .collect::<Vec<_>>()
        .join("\u{1f}");
    let mut child = Proc::spawn_with(
        TEST,
        "from-args",
        &[("TICKET_ARGS", joined)],
        Duration::from_secs(30),
        |cmd| {
            ticket.configure(cmd);
            for (k, _) in ticket.envs() {
                cmd.env_remove(k);
            }
        },
    );
    // Inheritable in the child only: the parent's copy is still close-on-exec.
    assert_ne!(fd_flags(fd).unwrap() & libc::FD_CLOEXEC, 0);
    drop(ticket);
    assert_eq!(child.expect("attached"), format!("{id} {generation}"));
    let mut buf = Vec::new();
    let msg = recv_within(&mut host, &mut buf, Duration::from_secs(20));
    assert_eq!(msg.handle(), handle);
    assert_eq!(msg.meta, Meta::new(HELLO, 7));
    assert_eq!(buf, b"from args");
    child.expect("ok");
    child.assert_success();
    let after = until_empty(&mut host, handle.id, Duration::from_secs(10));
    assert_eq!(after, handle.generation + 1);
    assert_eq!(deaths_of(&deaths, handle.id), []);
}

// shm[verify shm.spawn.generation]
#[test]
fn a_stale_ticket_cannot_claim_a_later_reservation() {
    const TEST: &str = "a_stale_ticket_cannot_claim_a_later_reservation";
    if role().as_deref() == Some("stale") {
        watchdog();
        match ShmGuest::from_env() {
            Err(AttachError::StaleTicket {
                peer,
                expected,
                found,
            }) => tell(&format!("stale {} {expected} {found}", peer.get())),
            Err(e) => tell(&format!("error {e:?}")),
            Ok(g) => tell(&format!(
                "attached {} {}",
                g.peer_id().get(),
                g.generation()
            )),
        }
        return;
    }
    let _serial = serial();
    let seg = ShmPath::new("stale");
    let mut host = ShmHost::create(seg.path(), SegmentConfig::default()).unwrap();
    let deaths = record_deaths(&mut host);
    let (handle, ticket) = host.prepare_guest(GuestOptions::default()).unwrap();
    let g = handle.generation;
    host.release_reservation(handle.id).unwrap();
    assert_eq!(entry(&host, handle.id), (Some(PeerState::Empty), g + 1));
    // The lowest Empty entry is the same one, now one generation later.
    assert_eq!(host.reserve_peer().unwrap(), handle.id);
    assert_eq!(entry(&host, handle.id), (Some(PeerState::Reserved), g + 1));

    let mut child = Proc::spawn_with(TEST, "stale", &[], Duration::from_secs(30), |cmd| {
        ticket.configure(cmd)
    });
    assert_eq!(
        child.expect_line(),
        format!("stale {} {g} {}", handle.id.get(), g + 1)
    );
    child.assert_success();
    host.maintain();
    // Nothing was written: still Reserved at the later generation, no guest pid.
    let info = host.peer_info(handle.id).unwrap();
    assert_eq!(
        (info.state, info.generation),
        (Some(PeerState::Reserved), g + 1)
    );
    assert_eq!(info.pid, 0);
    assert_eq!(deaths_of(&deaths, handle.id), []);
    drop(ticket);
}

// shm[verify shm.spawn.failure]
#[test]
fn a_failed_spawn_releases_the_reservation() {
    let _serial = serial();
    let seg = ShmPath::new("nospawn");
    let mut host = ShmHost::create(seg.path(), SegmentConfig::default()).unwrap();
    let first = PeerId::new(1).unwrap();
    let before = open_fds();
    // Not found, then found but not executable: each attempt reserves entry 1 and
    // must give it back (one generation later) with both doorbell ends closed.
    let attempts = [
        (
            "/nonexistent/shmhub-no-such-binary",
            std::io::ErrorKind::NotFound,
        ),
        ("/dev/null", std::io::ErrorKind::PermissionDenied),
    ];
    for (n, (program, kind)) in attempts.into_iter().enumerate() {
        match host.spawn(&mut Command::new(program)) {
            Err(SpawnError::Io { source, .. }) => assert_eq!(source.kind(), kind, "{program}"),
            other => panic!("spawning {program}: {other:?}"),
        }
        assert_eq!(
            open_fds(),
            before,
            "nothing left open after spawning {program}"
        );
        assert_eq!(
            entry(&host, first),
            (Some(PeerState::Empty), n as u32 + 1),
            "the reservation is released"
        );
    }
    assert_eq!(
        host.reserve_peer().unwrap(),
        first,
        "and can be reserved again"
    );
}

// shm[verify shm.spawn.failure]
// shm[verify shm.spawn.pidfd]
#[test]
fn a_dropped_ticket_or_a_child_that_exits_before_attaching_releases_the_reservation() {
    let _serial = serial();
    let seg = ShmPath::new("noattach");
    let mut host = ShmHost::create(seg.path(), SegmentConfig::default()).unwrap();
    let deaths = record_deaths(&mut host);

    // (a) A ticket dropped without a child: its doorbell hangs up.
    let (handle, ticket) = host.prepare_guest(GuestOptions::default()).unwrap();
    let g = handle.generation;
    assert_eq!(entry(&host, handle.id), (Some(PeerState::Reserved), g));
    host.maintain();
    assert_eq!(entry(&host, handle.id), (Some(PeerState::Reserved), g));
    assert_eq!(
        deaths_of(&deaths, handle.id),
        [],
        "a held ticket is no death"
    );
    drop(ticket);
    assert_eq!(
        until_empty(&mut host, handle.id, Duration::from_secs(5)),
        g + 1
    );
    for _ in 0..5 {
        host.maintain();
    }
    assert_eq!(
        deaths_of(&deaths, handle.id),
        [Death {
            peer: handle.id,
            generation: g,
            attached: false,
            cause: DeathCause::HungUp,
            pid: None,
            exit: None,
            abandoned: 0,
            discarded: 0,
            reclaimed_slots: 0,
            retained: 0,
        }],
        "reported once, as a guest that never attached"
    );

    // (b) A child that exits (successfully) without ever attaching.
    deaths.lock().unwrap().clear();
    let spawned = host.spawn(&mut Command::new("true")).unwrap();
    assert_eq!(spawned.handle.id, handle.id, "the lowest Empty entry again");
    assert_eq!(spawned.handle.generation, g + 1);
    // The host has not looked yet: it finds the child exited, not merely hung up.
    until_reapable(spawned.pid);
    assert_eq!(
        entry(&host, spawned.handle.id),
        (Some(PeerState::Reserved), g + 1),
        "nothing is detected outside the host's calls"
    );
    assert_eq!(
        until_empty(&mut host, spawned.handle.id, Duration::from_secs(5)),
        g + 2
    );
    for _ in 0..5 {
        host.maintain();
    }
    let reported = deaths_of(&deaths, spawned.handle.id);
    assert_eq!(reported.len(), 1, "reported exactly once: {reported:?}");
    let death = reported[0];
    assert_eq!(death.generation, g + 1);
    assert!(!death.attached);
    assert!(
        matches!(death.cause, DeathCause::ProcessExited | DeathCause::HungUp),
        "{death:?}"
    );
    assert_eq!(death.pid, Some(spawned.pid));
    let status = death
        .exit
        .expect("the host reaped the child and kept its status");
    assert!(status.success(), "{status}");
    until_reaped(&mut host, spawned.pid);
    assert_eq!(host.peer_info(handle.id).unwrap().stats.deaths, 2);
}

// shm[verify shm.spawn.pidfd]
// shm[verify shm.recover.stale-handle]
#[test]
fn signal_guest_kills_through_the_pidfd_and_the_host_recovers() {
    const TEST: &str = "signal_guest_kills_through_the_pidfd_and_the_host_recovers";
    if role().as_deref() == Some("victim") {
        watchdog();
        let mut guest = ShmGuest::from_env().unwrap();
        guest
            .send(Meta::new(READY, 0), b"ready", Duration::from_secs(10))
            .unwrap();
        let mut buf = Vec::new();
        let got = guest.recv(&mut buf, Duration::from_secs(30));
        // Only a child the signal missed gets here; its clean exit fails the test.
        eprintln!("victim was not killed: {got:?}");
        return;
    }
    let _serial = serial();
    let seg = ShmPath::new("signal");
    let mut host = ShmHost::create(seg.path(), SegmentConfig::default()).unwrap();
    let deaths = record_deaths(&mut host);
    let mut cmd = role_command(TEST, "victim", &[], Duration::from_secs(30));
    let spawned = host.spawn(&mut cmd).unwrap();
    let old = spawned.handle;
    let mut buf = Vec::new();
    let msg = recv_within(&mut host, &mut buf, Duration::from_secs(20));
    assert_eq!(msg.handle(), old);
    assert_eq!(buf, b"ready");
    assert_eq!(
        entry(&host, old.id),
        (Some(PeerState::Attached), old.generation)
    );
    assert_eq!(host.peer_info(old.id).unwrap().pid, spawned.pid);

    host.signal_guest(old, libc::SIGKILL).unwrap();
    // Dead before the host looks again, so its exit status is there to be reaped
    // (see the test below for a death seen by the doorbell alone).
    until_reapable(spawned.pid);
    poll_until(Duration::from_secs(5), "the death to be reported", || {
        if let Some(m) = host.recv(&mut buf, Duration::from_millis(10)).unwrap() {
            panic!("unexpected message {m:?}");
        }
        (!deaths.lock().unwrap().is_empty()).then_some(())
    });
    for _ in 0..5 {
        host.maintain();
    }
    let reported = deaths_of(&deaths, old.id);
    assert_eq!(reported.len(), 1, "reported exactly once: {reported:?}");
    let death = reported[0];
    assert_eq!(death.generation, old.generation);
    assert!(death.attached);
    assert!(
        matches!(death.cause, DeathCause::ProcessExited | DeathCause::HungUp),
        "{death:?}"
    );
    assert_eq!(death.pid, Some(spawned.pid));
    assert_eq!(death.abandoned, 0, "the host received all it sent");
    let status = death
        .exit
        .expect("the host reaped the child and kept its status");
    assert_eq!(status.signal(), Some(libc::SIGKILL), "{status}");
    assert_eq!(
        entry(&host, old.id),
        (Some(PeerState::Empty), old.generation + 1)
    );
    until_reaped(&mut host, spawned.pid);

    // The handle names a gone incarnation: no signal, no message goes through it.
    assert!(host.signal_guest(old, libc::SIGKILL).is_err());
    match host.try_send(old, Meta::new(1, 1), b"too late") {
        Err(SendError::Stale { handle, now }) => {
            assert_eq!(handle, old);
            assert_eq!(now, old.generation + 1);
        }
        other => panic!("send through a stale handle: {other:?}"),
    }
    assert_eq!(host.peer_usage(old.id).unwrap().to_guest_depth, 0);
}

// shm[verify shm.spawn.pidfd]
#[test]
fn a_child_that_hangs_up_before_attaching_is_reaped_when_it_exits_later() {
    const TEST: &str = "a_child_that_hangs_up_before_attaching_is_reaped_when_it_exits_later";
    if role().as_deref() == Some("hangup") {
        watchdog();
        let fd: i32 = arg("SHMHUB_DOORBELL_FD").parse().unwrap();
        // SAFETY: the inherited doorbell is ours alone; nothing in this process uses it.
        assert_eq!(unsafe { libc::close(fd) }, 0);
        let go = arg("GO");
        poll_until(Duration::from_secs(20), "the parent's go", || {
            std::path::Path::new(&go).exists().then_some(())
        });
        return;
    }
    let _serial = serial();
    let seg = ShmPath::new("hangup");
    let go = ShmPath::new("go");
    let mut host = ShmHost::create(seg.path(), SegmentConfig::default()).unwrap();
    let deaths = record_deaths(&mut host);
    let envs = [("GO", go.path().display().to_string())];
    let mut cmd = role_command(TEST, "hangup", &envs, Duration::from_secs(30));
    let spawned = host.spawn(&mut cmd).unwrap();
    // The child closed its doorbell but is still running: a death before attaching.
    poll_until(
        Duration::from_secs(10),
        "the hang-up to be reported",
        || {
            host.maintain();
            (!deaths.lock().unwrap().is_empty()).then_some(())
        },
    );
    let death = deaths_of(&deaths, spawned.handle.id)[0];
    assert!(!death.attached);
    assert_eq!(death.cause, DeathCause::HungUp);
    assert_eq!(death.pid, Some(spawned.pid));
    assert!(
        !reaped(spawned.pid) && !is_zombie(spawned.pid),
        "still running"
    );
    assert_eq!(
        entry(&host, spawned.handle.id),
        (Some(PeerState::Empty), spawned.handle.generation + 1)
    );
    // Now it exits: the host must still reap it.
    std::fs::write(go.path(), b"go").unwrap();
    until_reapable(spawned.pid);
    until_reaped(&mut host, spawned.pid);
}

// A ticket's doorbell speaks only for the reservation it was made for.
// shm[verify shm.live.guest-death]
// shm[verify shm.spawn.generation]
#[test]
fn a_released_tickets_hang_up_does_not_condemn_the_entrys_next_guest() {
    let _serial = serial();
    let seg = ShmPath::new("relticket");
    let mut host = ShmHost::create(seg.path(), SegmentConfig::default()).unwrap();
    let deaths = record_deaths(&mut host);
    let (handle, ticket) = host.prepare_guest(GuestOptions::default()).unwrap();
    let g = handle.generation;
    host.release_reservation(handle.id).unwrap();
    // A guest attaching by path takes the lowest Empty entry: the released one.
    let mut guest = ShmGuest::attach_path(seg.path()).unwrap();
    assert_eq!((guest.peer_id(), guest.generation()), (handle.id, g + 1));
    // The released ticket goes away; its doorbell hangs up.
    drop(ticket);
    for _ in 0..5 {
        host.maintain();
    }
    assert_eq!(deaths_of(&deaths, handle.id), [], "nobody died");
    assert_eq!(
        entry(&host, handle.id),
        (Some(PeerState::Attached), g + 1),
        "the new guest keeps its entry"
    );
    guest.try_send(Meta::new(HELLO, 1), b"still here").unwrap();
    let mut buf = Vec::new();
    let msg = recv_within(&mut host, &mut buf, Duration::from_secs(5));
    assert_eq!((msg.from, msg.generation), (handle.id, g + 1));
    assert_eq!(buf, b"still here");
}
