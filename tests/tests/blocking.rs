//! Blocking waits across processes: waiters really park in the kernel and are woken
//! by the other side, and no wakeup is ever lost.

use std::sync::atomic::Ordering;

use std::time::{Duration, Instant};

use shm_guest::ShmGuest;
use shm_host::{Meta, SegmentConfig, ShmHost, SlotClasses, WaitPolicy};
use shm_primitives::Segment;
use shmhub_tests::{arg, guest_parked, hear, poll_until, role, tell, watch_segment, Proc, ShmPath};

const LONG: Duration = Duration::from_secs(30);

fn watch(path: &str) -> Segment {
    watch_segment(std::path::Path::new(path))
}

/// This thread's kernel id.
fn gettid() -> i64 {
    // SAFETY: gettid has no arguments and no memory effects.
    unsafe { libc::syscall(libc::SYS_gettid) }
}

/// True when thread `tid` of `pid` sleeps in the kernel's futex wait (where wchan is
/// hidden: when it is in state S, not running).
fn asleep_in_futex(pid: u32, tid: i64) -> bool {
    let task = format!("/proc/{pid}/task/{tid}");
    let wchan = std::fs::read_to_string(format!("{task}/wchan")).unwrap_or_default();
    if wchan.contains("futex") {
        return true;
    }
    let stat = std::fs::read_to_string(format!("{task}/stat")).unwrap_or_default();
    (wchan.is_empty() || wchan == "0")
        && stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('S'))
}

// shm[verify shm.wake.park]
// shm[verify shm.wake.signal]
// shm[verify shm.wake.host-bell]
// shm[verify shm.wake.shared-futex]
#[test]
fn parked_waiters_are_woken_by_the_other_process() {
    if role().as_deref() == Some("sleeper") {
        let path = arg("SEG");
        let mut g = ShmGuest::attach_path(&path).unwrap();
        g.set_wait_policy(WaitPolicy::BLOCK);
        tell(&format!("attached {}", gettid()));
        let mut buf = Vec::new();
        let start = Instant::now();
        let meta = g
            .recv(&mut buf, LONG)
            .unwrap()
            .expect("woken before the timeout");
        let took = start.elapsed();
        assert_eq!((meta.user_id, buf.as_slice()), (1, &b"wake up"[..]));
        tell(&format!("woken {}", took.as_micros()));
        // Now the host parks; wake it once its receiving thread is asleep.
        let host_tid: i64 = hear().strip_prefix("host tid ").unwrap().parse().unwrap();
        let seg = watch(&path);
        poll_until(LONG, "host parked", || {
            (seg.header().host_parked.load(Ordering::SeqCst) != 0).then_some(())
        });
        let host_pid = std::os::unix::process::parent_id();
        poll_until(LONG, "host asleep", || {
            asleep_in_futex(host_pid, host_tid).then_some(())
        });
        g.try_send(Meta::new(2, 2), b"your turn").unwrap();
        return;
    }
    let seg = ShmPath::new("park");
    let path = seg.path().display().to_string();
    let mut host = ShmHost::create(seg.path(), SegmentConfig::default()).unwrap();
    host.set_wait_policy(WaitPolicy::BLOCK);
    let mut child = Proc::spawn(
        "parked_waiters_are_woken_by_the_other_process",
        "sleeper",
        &[("SEG", path.clone())],
        Duration::from_secs(90),
    );
    let child_tid: i64 = child.expect("attached").parse().unwrap();
    let view = watch(&path);
    // The guest is parked: its flag is up and its thread sleeps in the kernel.
    poll_until(LONG, "guest parked flag", || {
        guest_parked(&view, 0).then_some(())
    });
    poll_until(LONG, "guest asleep in futex", || {
        asleep_in_futex(child.pid(), child_tid).then_some(())
    });
    let peer = host.attached_peers()[0];
    host.try_send(peer, Meta::new(1, 1), b"wake up").unwrap();
    let took: u64 = child.expect("woken").parse().unwrap();
    assert!(
        took < LONG.as_micros() as u64 / 2,
        "woken, not timed out ({took} us)"
    );
    assert!(!guest_parked(&view, 0), "the flag is cleared after waking");

    // The host parks on the host-wide bell; a try_send from the guest wakes it.
    let mut buf = Vec::new();
    child.say(&format!("host tid {}", gettid()));
    let start = Instant::now();
    let msg = host
        .recv(&mut buf, LONG)
        .unwrap()
        .expect("woken before the timeout");
    assert!(start.elapsed() < LONG / 2);
    assert_eq!((msg.meta.user_id, buf.as_slice()), (2, &b"your turn"[..]));
    child.assert_success();
}

// shm[verify shm.wake.timeout]
// shm[verify shm.wake.adaptive]
#[test]
fn blocking_calls_time_out_with_nothing_to_do() {
    let mut host = ShmHost::create_heap(SegmentConfig {
        ring_capacity: 2,
        ..SegmentConfig::default()
    })
    .unwrap();
    let mut g = ShmGuest::attach_backing(host.backing(), Default::default()).unwrap();
    for policy in [WaitPolicy::BLOCK, WaitPolicy::ADAPTIVE, WaitPolicy::SPIN] {
        host.set_wait_policy(policy);
        g.set_wait_policy(policy);
        let mut buf = Vec::new();
        let start = Instant::now();
        assert_eq!(
            host.recv(&mut buf, Duration::from_millis(50)).unwrap(),
            None
        );
        assert_eq!(g.recv(&mut buf, Duration::from_millis(50)).unwrap(), None);
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(100) && took < Duration::from_secs(10),
            "{took:?}"
        );
    }
    // A full ring: send waits, then reports the timeout; nothing is dropped.
    let peer = g.peer_id();
    host.send(peer, Meta::new(1, 1), b"a", LONG).unwrap();
    host.send(peer, Meta::new(1, 2), b"b", LONG).unwrap();
    let err = host
        .send(peer, Meta::new(1, 3), b"c", Duration::from_millis(20))
        .unwrap_err();
    assert!(
        matches!(err, shm_host::SendError::TimedOut(p) if p == peer),
        "{err}"
    );
    let mut buf = Vec::new();
    assert_eq!(g.recv(&mut buf, LONG).unwrap().unwrap().user_id, 1);
    assert_eq!(g.recv(&mut buf, LONG).unwrap().unwrap().user_id, 2);
}

// shm[verify shm.wake.space]
#[test]
fn a_million_blocking_ping_pongs_lose_no_wakeup() {
    const ROUNDS: u64 = 1_000_000;
    const STEP: Duration = Duration::from_secs(10);
    if role().as_deref() == Some("ponger") {
        let mut g = ShmGuest::attach_path(arg("SEG")).unwrap();
        g.set_wait_policy(WaitPolicy {
            spin_rounds: arg("SPIN").parse().unwrap(),
            spin_time: Duration::MAX,
        });
        tell("attached");
        let mut buf = Vec::new();
        for n in 0..ROUNDS {
            let meta = g
                .recv(&mut buf, STEP)
                .unwrap()
                .unwrap_or_else(|| panic!("lost wakeup at {n}"));
            assert_eq!(meta.user_id, n);
            g.send(Meta::new(2, n), &buf, STEP).unwrap();
        }
        tell("done");
        return;
    }
    // Blocking (park at once) both ways; a slot payload every 64th round so waiting
    // for a free slot is exercised too (2 slots only).
    let seg = ShmPath::new("pingpong");
    let config = SegmentConfig {
        max_guests: 1,
        ring_capacity: 2,
        classes: SlotClasses::single(128, 2),
        broadcast_slots: 0,
        broadcast_slot_size: 0,
    };
    let mut host = ShmHost::create(seg.path(), config).unwrap();
    host.set_wait_policy(WaitPolicy::BLOCK);
    let mut child = Proc::spawn(
        "a_million_blocking_ping_pongs_lose_no_wakeup",
        "ponger",
        &[
            ("SEG", seg.path().display().to_string()),
            ("SPIN", "0".into()),
        ],
        Duration::from_secs(600),
    );
    child.expect("attached");
    let peer = host.attached_peers()[0];
    let mut buf = Vec::new();
    let start = Instant::now();
    for n in 0..ROUNDS {
        let payload: &[u8] = if n % 64 == 0 { &[7u8; 100] } else { b"ping" };
        host.send(peer, Meta::new(1, n), payload, STEP).unwrap();
        let msg = host
            .recv(&mut buf, STEP)
            .unwrap()
            .unwrap_or_else(|| panic!("lost wakeup at {n}"));
        assert_eq!((msg.meta.user_id, buf.as_slice()), (n, payload));
    }
    let took = start.elapsed();
    println!(
        "{ROUNDS} blocking round trips in {took:?} ({:.2} us each)",
        took.as_secs_f64() * 1e6 / ROUNDS as f64
    );
    child.expect("done");
    child.assert_success();
}
