//! Request/response across processes (`spec/11-rpc.md`): many calls in flight from one
//! guest answered out of order, timeouts and cancels that leave nothing behind, async
//! calls, host requests served by a guest, and a host that dies under pending calls.
//!
//! Guests set their liveness interval to 30 s wherever the host stays alive, so a lost
//! wakeup cannot hide behind the periodic liveness check: it shows as a call that
//! times out, or as a wait that takes seconds.

use std::time::{Duration, Instant};

use shm_guest::{
    AsyncRpcClient, CallError, DetachedError, RpcClient, RpcOptions, ShmGuest,
    DEFAULT_MAX_IN_FLIGHT,
};
use shm_host::{
    AsyncHost, Meta, MsgKind, PeerId, Received, ReplyError, SegmentConfig, SendError, ShmHost,
    SlotClass, SlotClasses,
};
use shmhub_tests::{arg, hear, pattern, poll_until, role, tell, watchdog, Proc, ShmPath};

const LONG: Duration = Duration::from_secs(20);
const CHILD_LIMIT: Duration = Duration::from_secs(90);
/// No lost wakeup may hide behind the liveness check (see the module docs).
const QUIET: Duration = Duration::from_secs(30);

/// A call the host answers at once, echoing or by `response_payload`.
const ECHO: u32 = 1;
/// A call the host leaves unanswered (until it is late).
const SLOW: u32 = 2;
/// A plain message from the host.
const NOTE: u32 = 3;
/// A request from the host to the guest.
const ASK: u32 = 4;

const CALLERS: usize = 32;
const ROUNDS: usize = 2;
/// Inline (≤ 36 bytes) and slot payloads of both classes.
const REQUEST_LENS: [usize; 8] = [8, 20, 36, 37, 100, 256, 1000, 3000];
const RESPONSE_LENS: [usize; 8] = [3000, 8, 36, 37, 1000, 20, 256, 100];

/// Two small classes, so 32 calls in flight run out of slots in both directions and
/// the senders wait for room.
fn config() -> SegmentConfig {
    SegmentConfig {
        max_guests: 2,
        ring_capacity: 64,
        classes: SlotClasses::new(&[SlotClass::new(256, 8), SlotClass::new(4096, 8)]),
        ..SegmentConfig::default()
    }
}

/// Caller `k`'s request in round `r`: `(k, r)` then a pattern.
fn request_payload(k: usize, r: usize) -> Vec<u8> {
    let len = REQUEST_LENS[(k + r) % REQUEST_LENS.len()];
    framed(k, r, pattern(k as u64, r as u64, len - 8))
}

/// The host's answer to caller `k`'s request in round `r`.
fn response_payload(k: usize, r: usize) -> Vec<u8> {
    let len = RESPONSE_LENS[(k + r) % RESPONSE_LENS.len()];
    framed(k, r, pattern(k as u64 + 1000, r as u64, len - 8))
}

fn framed(k: usize, r: usize, rest: Vec<u8>) -> Vec<u8> {
    let mut v = Vec::with_capacity(8 + rest.len());
    v.extend_from_slice(&(k as u32).to_le_bytes());
    v.extend_from_slice(&(r as u32).to_le_bytes());
    v.extend_from_slice(&rest);
    v
}

/// The `(k, r)` a request names, checking all its bytes.
fn parse_request(payload: &[u8]) -> (usize, usize) {
    let k = u32::from_le_bytes(payload[0..4].try_into().unwrap()) as usize;
    let r = u32::from_le_bytes(payload[4..8].try_into().unwrap()) as usize;
    assert!(k < CALLERS && r < ROUNDS, "request names ({k}, {r})");
    assert_eq!(payload, request_payload(k, r), "request ({k}, {r}) bytes");
    (k, r)
}

/// CPU time used by this process so far.
fn process_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

fn attach_quiet() -> ShmGuest {
    let mut guest = ShmGuest::attach_path(arg("SEG")).unwrap();
    guest.set_liveness_interval(QUIET);
    guest
}

/// Receives `n` messages (copied), each within `LONG`.
fn collect(host: &mut ShmHost, n: usize) -> Vec<(Received, Vec<u8>)> {
    let mut got = Vec::new();
    let mut buf = Vec::new();
    while got.len() < n {
        let msg = host
            .recv(&mut buf, LONG)
            .unwrap()
            .expect("a message in time");
        got.push((msg, buf.clone()));
    }
    got
}

/// Checks one round of requests: all from one guest, requests of type ECHO with
/// distinct nonzero ids, one from each caller of round `r`. Returns them by caller.
fn check_round(round: Vec<(Received, Vec<u8>)>, r: usize) -> Vec<Received> {
    let mut by_caller: Vec<Option<Received>> = vec![None; CALLERS];
    let mut ids = std::collections::HashSet::new();
    for (req, payload) in round {
        assert!(req.is_request(), "kind {:?}", req.meta.kind);
        assert_eq!(req.meta.msg_type, ECHO);
        assert_ne!(req.meta.user_id, 0, "correlation ids are nonzero");
        assert!(
            ids.insert(req.meta.user_id),
            "ids of calls in flight differ"
        );
        let (k, rr) = parse_request(&payload);
        assert_eq!(rr, r, "every request of round {r} before any of the next");
        assert!(by_caller[k].replace(req).is_none(), "one call per caller");
    }
    by_caller.into_iter().map(Option::unwrap).collect()
}

/// The order the host answers round `r` in: reversed, then shuffled.
fn answer_order(r: usize) -> Vec<usize> {
    match r {
        0 => (0..CALLERS).rev().collect(),
        _ => (0..CALLERS).map(|i| (i * 13 + 5) % CALLERS).collect(),
    }
}

/// Slots of both classes towards the host (`config`).
const TO_HOST_SLOTS: u32 = 16;

/// Waits (a bounded poll) until every slot towards the host is taken: 20 of a round's
/// 32 requests need a slot, so at least 4 callers are then waiting for room, and the
/// host's receives are what wakes them.
fn until_pools_full(host: &ShmHost, peer: PeerId) {
    poll_until(LONG, "the guest's pools to fill", || {
        let usage = host.peer_usage(peer).unwrap();
        (usage.to_host_slots.in_use == TO_HOST_SLOTS).then_some(())
    });
}

/// Asserts that nothing of the guest's is left in the rings and pools.
fn assert_clean(host: &ShmHost, peer: PeerId) {
    let usage = host.peer_usage(peer).unwrap();
    assert_eq!(usage.to_guest_slots.in_use, 0, "slots towards the guest");
    assert_eq!(usage.to_host_slots.in_use, 0, "slots towards the host");
    assert_eq!(usage.to_guest_depth, 0, "ring towards the guest");
    assert_eq!(usage.to_host_depth, 0, "ring towards the host");
}

// ---- (a) 32 threads, answers out of order -------------------------------------------

const MANY: &str = "thirty_two_threads_each_get_their_own_response_out_of_order";

fn many_guest_main() {
    watchdog();
    let client = RpcClient::new(attach_quiet()).unwrap();
    assert!(client.max_in_flight() >= 32);
    assert_eq!(client.max_in_flight(), DEFAULT_MAX_IN_FLIGHT);
    tell("attached");
    std::thread::scope(|s| {
        for k in 0..CALLERS {
            let client = &client;
            s.spawn(move || {
                for r in 0..ROUNDS {
                    let response = client.call(ECHO, &request_payload(k, r), LONG).unwrap();
                    assert_eq!(response.meta().kind, MsgKind::Response);
                    assert_eq!(response.meta().msg_type, ECHO);
                    assert_eq!(
                        response.to_vec(),
                        response_payload(k, r),
                        "caller {k} round {r} got its own response"
                    );
                }
            });
        }
    });
    let stats = client.stats();
    assert_eq!(stats.calls, (CALLERS * ROUNDS) as u64);
    assert_eq!(stats.answered, (CALLERS * ROUNDS) as u64);
    assert_eq!(stats.late_responses, 0);
    assert_eq!((stats.timed_out, stats.cancelled), (0, 0));
    assert_eq!((stats.in_flight, stats.queued), (0, 0));
    tell("done");
    assert_eq!(hear(), "bye");
}

// shm[verify shm.rpc.correlate]
// shm[verify shm.rpc.reply]
// shm[verify shm.rpc.in-flight]
// shm[verify shm.rpc.route]
// shm[verify shm.rpc.receive]
#[test]
fn thirty_two_threads_each_get_their_own_response_out_of_order() {
    if role().as_deref() == Some("guest") {
        return many_guest_main();
    }
    let seg = ShmPath::new("rpc-many");
    let mut host = ShmHost::create(seg.path(), config()).unwrap();
    let env = [("SEG", seg.path().display().to_string())];
    let mut child = Proc::spawn(MANY, "guest", &env, CHILD_LIMIT);
    child.expect("attached");
    let peer = host.attached_peers()[0];
    for r in 0..ROUNDS {
        if r == 0 {
            until_pools_full(&host, peer);
        }
        // All 32 calls are in flight at once: the host holds every request before it
        // answers any.
        let round = check_round(collect(&mut host, CALLERS), r);
        for k in answer_order(r) {
            host.reply(&round[k], &response_payload(k, r), LONG)
                .unwrap();
        }
    }
    child.expect("done");
    assert_clean(&host, peer);
    child.say("bye");
    child.assert_success();
}

// ---- (b) a timed-out call --------------------------------------------------------

const TIMEOUT: &str = "a_timed_out_call_is_cancelled_and_its_late_response_freed";

fn timeout_guest_main() {
    watchdog();
    let client = RpcClient::new(attach_quiet()).unwrap();
    let pending = client.start(SLOW, &pattern(7, 0, 100), LONG).unwrap();
    let id = pending.id();
    tell(&format!("started {id}"));
    let began = Instant::now();
    let cpu_before = process_cpu_time();
    let wait = Duration::from_millis(300);
    assert_eq!(pending.wait(wait).unwrap_err(), CallError::TimedOut);
    assert!(began.elapsed() >= wait);
    // The receiver slept in poll(2) for those 300 ms; a spin would burn them.
    let cpu = process_cpu_time() - cpu_before;
    assert!(
        cpu < Duration::from_millis(100),
        "{cpu:?} of CPU while waiting"
    );
    let stats = client.stats();
    assert_eq!(
        (stats.in_flight, stats.timed_out),
        (0, 1),
        "nothing pending"
    );
    assert_eq!((stats.cancels_sent, stats.cancels_unsent), (1, 0));
    assert_eq!(stats.late_responses, 0);
    tell("timed-out");
    assert_eq!(hear(), "late-sent");
    // The next call's receiver meets the late response first and drops it.
    let response = client.call(ECHO, b"after the late one", LONG).unwrap();
    assert_eq!(response.to_vec(), b"after the late one");
    drop(response);
    let stats = client.stats();
    assert_eq!(stats.late_responses, 1, "the late response was counted");
    assert_eq!((stats.answered, stats.in_flight, stats.queued), (1, 0, 0));
    tell("clean");
    assert_eq!(hear(), "bye");
}

// shm[verify shm.rpc.timeout]
// shm[verify shm.rpc.route]
// shm[verify shm.rpc.correlate]
// shm[verify shm.rpc.reply]
#[test]
fn a_timed_out_call_is_cancelled_and_its_late_response_freed() {
    if role().as_deref() == Some("guest") {
        return timeout_guest_main();
    }
    let seg = ShmPath::new("rpc-timeout");
    let mut host = ShmHost::create(seg.path(), config()).unwrap();
    let env = [("SEG", seg.path().display().to_string())];
    let mut child = Proc::spawn(TIMEOUT, "guest", &env, CHILD_LIMIT);
    let id: u64 = child.expect("started").parse().unwrap();
    let (request, payload) = collect(&mut host, 1).remove(0);
    assert!(request.is_request());
    assert_eq!((request.meta.msg_type, request.meta.user_id), (SLOW, id));
    assert_eq!(payload, pattern(7, 0, 100));
    let peer = request.from;
    child.expect("timed-out");
    // The guest gave up: a Cancel with the call's id and type, and no payload.
    let (cancel, payload) = collect(&mut host, 1).remove(0);
    assert!(cancel.is_cancel());
    assert_eq!(cancel.meta, Meta::new(SLOW, id).with_kind(MsgKind::Cancel));
    assert!(payload.is_empty());
    assert!(matches!(
        host.reply(&cancel, b"no", LONG),
        Err(ReplyError::NotRequest(MsgKind::Cancel))
    ));
    // Answer anyway, in a slot: late.
    host.reply(&request, &pattern(8, 0, 2000), LONG).unwrap();
    assert_eq!(host.peer_usage(peer).unwrap().to_guest_slots.in_use, 1);
    child.say("late-sent");
    let (echo, payload) = collect(&mut host, 1).remove(0);
    assert_eq!(echo.meta.msg_type, ECHO);
    assert_ne!(echo.meta.user_id, id, "a new call has a new id");
    host.reply(&echo, &payload, LONG).unwrap();
    child.expect("clean");
    assert_clean(&host, peer);
    child.say("bye");
    child.assert_success();
}

// ---- (c) a cancelled call --------------------------------------------------------

const CANCEL: &str = "a_cancelled_call_sends_cancel_and_leaves_nothing_behind";

fn cancel_guest_main() {
    watchdog();
    let options = RpcOptions {
        max_in_flight: 1,
        ..RpcOptions::default()
    };
    let client = RpcClient::with_options(attach_quiet(), options).unwrap();
    let pending = client.start(SLOW, &pattern(9, 0, 500), LONG).unwrap();
    let id = pending.id();
    // The only place is taken: another call waits for it, then gives up having sent
    // nothing.
    assert_eq!(
        client
            .call(ECHO, b"no room", Duration::from_millis(100))
            .unwrap_err(),
        CallError::Busy { max_in_flight: 1 }
    );
    let canceller = pending.canceller();
    assert_eq!(canceller.id(), id);
    let waiter = std::thread::spawn(move || pending.wait(LONG));
    tell(&format!("started {id}"));
    assert_eq!(hear(), "got");
    // The waiter is asleep as the receiver by now (its poll slice is 20 s): the
    // cancel has to wake it.
    let cancelled_at = Instant::now();
    assert!(canceller.cancel());
    assert_eq!(waiter.join().unwrap().unwrap_err(), CallError::Cancelled);
    assert!(
        cancelled_at.elapsed() < Duration::from_secs(5),
        "the cancel woke the waiting thread"
    );
    assert!(!canceller.cancel(), "the call has ended");
    let stats = client.stats();
    assert_eq!((stats.cancelled, stats.cancels_sent), (1, 1));
    assert_eq!((stats.in_flight, stats.calls), (0, 1), "nothing pending");
    tell("cancelled");
    assert_eq!(hear(), "late-sent");
    let response = client.call(ECHO, b"and again", LONG).unwrap();
    assert_eq!(response.to_vec(), b"and again");
    drop(response);
    let stats = client.stats();
    assert_eq!(stats.late_responses, 1, "the late response was counted");
    assert_eq!((stats.in_flight, stats.queued), (0, 0));
    tell("clean");
    assert_eq!(hear(), "bye");
}

// shm[verify shm.rpc.cancel]
// shm[verify shm.rpc.in-flight]
// shm[verify shm.rpc.route]
// shm[verify shm.rpc.receive]
#[test]
fn a_cancelled_call_sends_cancel_and_leaves_nothing_behind() {
    if role().as_deref() == Some("guest") {
        return cancel_guest_main();
    }
    let seg = ShmPath::new("rpc-cancel");
    let mut host = ShmHost::create(seg.path(), config()).unwrap();
    let env = [("SEG", seg.path().display().to_string())];
    let mut child = Proc::spawn(CANCEL, "guest", &env, CHILD_LIMIT);
    let id: u64 = child.expect("started").parse().unwrap();
    let (request, payload) = collect(&mut host, 1).remove(0);
    assert_eq!(
        request.meta,
        Meta::new(SLOW, id).with_kind(MsgKind::Request)
    );
    assert_eq!(payload, pattern(9, 0, 500));
    let peer = request.from;
    child.say("got");
    child.expect("cancelled");
    // The next message is the Cancel: the Busy call sent nothing.
    let (cancel, _) = collect(&mut host, 1).remove(0);
    assert_eq!(cancel.meta, Meta::new(SLOW, id).with_kind(MsgKind::Cancel));
    host.reply(&request, &pattern(10, 0, 2000), LONG).unwrap();
    assert_eq!(host.peer_usage(peer).unwrap().to_guest_slots.in_use, 1);
    child.say("late-sent");
    let (echo, payload) = collect(&mut host, 1).remove(0);
    assert_eq!(payload, b"and again");
    host.reply(&echo, &payload, LONG).unwrap();
    child.expect("clean");
    assert_clean(&host, peer);
    child.say("bye");
    child.assert_success();
}

// ---- (d) async ---------------------------------------------------------------------

const ASYNC: &str = "async_calls_on_one_thread_are_matched_timed_out_and_cancelled";

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn async_guest_main() {
    watchdog();
    runtime().block_on(async {
        let client = AsyncRpcClient::new(attach_quiet()).unwrap();
        tell("attached");
        // 32 calls at once on one thread.
        let mut calls = tokio::task::JoinSet::new();
        for k in 0..CALLERS {
            let client = client.clone();
            calls.spawn(async move {
                let response = client.call(ECHO, &request_payload(k, 0), LONG).await;
                let response = response.unwrap();
                assert_eq!(response.meta().kind, MsgKind::Response);
                assert_eq!(response.to_vec(), response_payload(k, 0), "caller {k}");
            });
        }
        while let Some(done) = calls.join_next().await {
            done.unwrap();
        }
        // A call that times out.
        let pending = client.start(SLOW, b"slow", LONG).await.unwrap();
        let id = pending.id();
        tell(&format!("started {id}"));
        let wait = pending.wait(Duration::from_millis(200)).await;
        assert_eq!(wait.unwrap_err(), CallError::TimedOut);
        // A call whose future is dropped (here by an outer timeout) is cancelled.
        let dropped = client.call(SLOW, b"dropped", LONG);
        assert!(tokio::time::timeout(Duration::from_millis(200), dropped)
            .await
            .is_err());
        let stats = client.stats();
        assert_eq!(
            (stats.calls, stats.answered),
            (CALLERS as u64 + 2, CALLERS as u64)
        );
        assert_eq!((stats.timed_out, stats.cancelled), (1, 1));
        assert_eq!(stats.cancels_sent, 2);
        assert_eq!(stats.in_flight, 0, "nothing pending");
        tell("done");
        assert_eq!(hear(), "late-sent");
        let response = client.call(ECHO, b"async again", LONG).await.unwrap();
        assert_eq!(response.to_vec(), b"async again");
        drop(response);
        let stats = client.stats();
        assert_eq!(stats.late_responses, 2, "both late responses counted");
        assert_eq!((stats.in_flight, stats.queued), (0, 0));
        tell("clean");
        assert_eq!(hear(), "bye");
    });
}

/// One message (copied) within `LONG`, through the async host.
async fn recv_async(host: &mut AsyncHost) -> (Received, Vec<u8>) {
    let mut buf = Vec::new();
    let msg = tokio::time::timeout(LONG, host.recv(&mut buf)).await;
    (msg.expect("a message in time").unwrap(), buf)
}

// shm[verify shm.rpc.async]
// shm[verify shm.rpc.correlate]
// shm[verify shm.rpc.reply]
// shm[verify shm.rpc.timeout]
// shm[verify shm.rpc.cancel]
#[test]
fn async_calls_on_one_thread_are_matched_timed_out_and_cancelled() {
    if role().as_deref() == Some("guest") {
        return async_guest_main();
    }
    let seg = ShmPath::new("rpc-async");
    let env = [("SEG", seg.path().display().to_string())];
    runtime().block_on(async {
        let host = ShmHost::create(seg.path(), config()).unwrap();
        let mut host = AsyncHost::new(host).unwrap();
        let mut child = Proc::spawn(ASYNC, "guest", &env, CHILD_LIMIT);
        child.expect("attached");
        let peer = host.get_mut().attached_peers()[0];
        until_pools_full(host.get_mut(), peer);
        let mut round = Vec::new();
        for _ in 0..CALLERS {
            round.push(recv_async(&mut host).await);
        }
        let round = check_round(round, 0);
        for k in answer_order(1) {
            let payload = response_payload(k, 0);
            let reply = host.reply(&round[k], &payload);
            tokio::time::timeout(LONG, reply).await.unwrap().unwrap();
        }
        assert_eq!(round[0].from, peer);
        let id: u64 = child.expect("started").parse().unwrap();
        let mut late = Vec::new();
        for (n, what) in [b"slow".as_slice(), b"dropped"].into_iter().enumerate() {
            let (request, payload) = recv_async(&mut host).await;
            assert!(request.is_request());
            assert_eq!(payload, what);
            if n == 0 {
                assert_eq!(request.meta.user_id, id);
            }
            let (cancel, _) = recv_async(&mut host).await;
            assert!(cancel.is_cancel());
            assert_eq!(cancel.meta.user_id, request.meta.user_id);
            late.push(request);
        }
        child.expect("done");
        for request in &late {
            let payload = pattern(11, 0, 1500);
            let reply = host.reply(request, &payload);
            tokio::time::timeout(LONG, reply).await.unwrap().unwrap();
        }
        assert_eq!(
            host.get_mut()
                .peer_usage(peer)
                .unwrap()
                .to_guest_slots
                .in_use,
            2
        );
        child.say("late-sent");
        let (echo, payload) = recv_async(&mut host).await;
        let reply = host.reply(&echo, &payload);
        tokio::time::timeout(LONG, reply).await.unwrap().unwrap();
        child.expect("clean");
        assert_clean(host.get_mut(), peer);
        child.say("bye");
        child.assert_success();
    });
}

// ---- inbound messages --------------------------------------------------------------

const INBOUND: &str = "host_messages_are_queued_with_back_pressure_and_host_requests_served";

fn inbound_guest_main() {
    watchdog();
    let options = RpcOptions {
        queue_capacity: 2,
        ..RpcOptions::default()
    };
    let client = RpcClient::with_options(attach_quiet(), options).unwrap();
    let pending = client.start(ECHO, b"first", LONG).unwrap();
    tell(&format!("started {}", pending.id()));
    // The host sent a note, a request, a note, then the response.
    assert_eq!(hear(), "sent");
    // The queue holds two: the response stays behind the third message.
    let wait = pending.wait(Duration::from_millis(300));
    assert_eq!(wait.unwrap_err(), CallError::TimedOut);
    let stats = client.stats();
    assert_eq!(stats.queued, 2, "queued up to the capacity");
    assert_eq!(stats.late_responses, 0, "the response was left in the ring");
    let note = client.recv_message(LONG).unwrap().unwrap();
    assert_eq!(note.meta(), Meta::new(NOTE, 1));
    assert_eq!(note.to_vec(), b"p1");
    assert!(matches!(
        client.reply(note.meta(), b"x", LONG),
        Err(shm_guest::ReplyError::NotRequest(MsgKind::Plain))
    ));
    let ask = client.recv_message(LONG).unwrap().unwrap();
    assert_eq!(ask.meta(), Meta::new(ASK, 77).with_kind(MsgKind::Request));
    assert_eq!(ask.to_vec(), pattern(12, 0, 300));
    client.reply(ask.meta(), b"pong", LONG).unwrap();
    drop((note, ask));
    let note = client.recv_message(LONG).unwrap().unwrap();
    assert_eq!(note.meta(), Meta::new(NOTE, 3));
    assert_eq!(note.to_vec(), b"p3");
    let stats = client.stats();
    assert_eq!(
        stats.late_responses, 1,
        "taken after the third note, and dropped"
    );
    assert_eq!((stats.in_flight, stats.queued), (0, 0));
    assert!(client.try_recv_message().unwrap().is_none());
    tell("clean");
    assert_eq!(hear(), "bye");
}

// shm[verify shm.rpc.inbound]
// shm[verify shm.rpc.reply]
#[test]
fn host_messages_are_queued_with_back_pressure_and_host_requests_served() {
    if role().as_deref() == Some("guest") {
        return inbound_guest_main();
    }
    let seg = ShmPath::new("rpc-inbound");
    let mut host = ShmHost::create(seg.path(), config()).unwrap();
    let env = [("SEG", seg.path().display().to_string())];
    let mut child = Proc::spawn(INBOUND, "guest", &env, CHILD_LIMIT);
    let id: u64 = child.expect("started").parse().unwrap();
    let (request, _) = collect(&mut host, 1).remove(0);
    assert_eq!(request.meta.user_id, id);
    let to = request.handle();
    host.send(to, Meta::new(NOTE, 1), b"p1", LONG).unwrap();
    let ask = Meta::new(ASK, 77).with_kind(MsgKind::Request);
    host.send(to, ask, &pattern(12, 0, 300), LONG).unwrap();
    host.send(to, Meta::new(NOTE, 3), b"p3", LONG).unwrap();
    host.reply(&request, &pattern(13, 0, 2000), LONG).unwrap();
    child.say("sent");
    let (cancel, _) = collect(&mut host, 1).remove(0);
    assert_eq!(cancel.meta, Meta::new(ECHO, id).with_kind(MsgKind::Cancel));
    let (pong, payload) = collect(&mut host, 1).remove(0);
    assert_eq!(pong.meta, Meta::new(ASK, 77).with_kind(MsgKind::Response));
    assert_eq!(payload, b"pong");
    child.expect("clean");
    assert_clean(&host, request.from);
    child.say("bye");
    child.assert_success();
}

// ---- replies and entry reuse ---------------------------------------------------------

const STALE: &str = "a_reply_never_reaches_a_later_guest_of_the_entry";

fn stale_guest_main() {
    watchdog();
    let client = RpcClient::new(attach_quiet()).unwrap();
    let me = client.peer_id().get();
    if arg("STEP") == "first" {
        let pending = client.start(ECHO, b"who answers?", LONG).unwrap();
        tell(&format!("started {me} {}", pending.id()));
        assert_eq!(hear(), "bye");
        // Leaves with the call in flight: dropping it sends a Cancel, then the guest
        // detaches.
        return;
    }
    tell(&format!("attached {me}"));
    assert_eq!(hear(), "check");
    // Nothing came: not queued, and not a (late) response either.
    assert!(client.try_recv_message().unwrap().is_none());
    let stats = client.stats();
    assert_eq!((stats.late_responses, stats.queued), (0, 0));
    tell("nothing");
    assert_eq!(hear(), "bye");
}

// shm[verify shm.rpc.reply]
#[test]
fn a_reply_never_reaches_a_later_guest_of_the_entry() {
    if role().as_deref() == Some("guest") {
        return stale_guest_main();
    }
    let seg = ShmPath::new("rpc-stale");
    let config = SegmentConfig {
        max_guests: 1,
        ..config()
    };
    let mut host = ShmHost::create(seg.path(), config).unwrap();
    let path = ("SEG", seg.path().display().to_string());
    let first_env = [path.clone(), ("STEP", "first".to_string())];
    let mut first = Proc::spawn(STALE, "guest", &first_env, CHILD_LIMIT);
    let started = first.expect("started");
    let (peer, id) = started.split_once(' ').unwrap();
    let id: u64 = id.parse().unwrap();
    let (request, _) = collect(&mut host, 1).remove(0);
    assert_eq!(request.meta.user_id, id);
    first.say("bye");
    first.assert_success();
    let (cancel, _) = collect(&mut host, 1).remove(0);
    assert!(cancel.is_cancel());
    // The first guest said goodbye and its ring is drained: the entry is recycled.
    host.maintain();
    let second_env = [path, ("STEP", "second".to_string())];
    let mut second = Proc::spawn(STALE, "guest", &second_env, CHILD_LIMIT);
    assert_eq!(
        second.expect("attached"),
        peer,
        "the same entry, a new guest"
    );
    let err = host
        .reply(&request, b"for the first guest", LONG)
        .unwrap_err();
    assert!(
        matches!(err, ReplyError::Send(SendError::Stale { .. })),
        "{err}"
    );
    assert_eq!(host.peer_usage(request.from).unwrap().to_guest_depth, 0);
    second.say("check");
    second.expect("nothing");
    second.say("bye");
    second.assert_success();
}

// ---- (e) host death ------------------------------------------------------------------

const DEATH: &str = "a_dying_host_ends_pending_calls_with_an_error";
const DOOMED_CALLS: usize = 4;

fn mortal_host_main() {
    watchdog();
    let mut host = ShmHost::create(arg("SEG"), config()).unwrap();
    tell("ready");
    let mut buf = Vec::new();
    for _ in 0..DOOMED_CALLS {
        let msg = host.recv(&mut buf, LONG).unwrap().expect("a request");
        assert!(msg.is_request());
        tell(&format!("got {}", msg.meta.user_id));
    }
    // Never answers; the parent kills this process.
    let _ = hear();
    std::process::exit(1);
}

// shm[verify shm.rpc.failure]
#[test]
fn a_dying_host_ends_pending_calls_with_an_error() {
    if role().as_deref() == Some("host") {
        return mortal_host_main();
    }
    let seg = ShmPath::new("rpc-death");
    let env = [("SEG", seg.path().display().to_string())];
    let mut host = Proc::spawn(DEATH, "host", &env, CHILD_LIMIT);
    host.expect("ready");
    // Default liveness interval (10 ms): the receiver checks the host that often.
    let client = RpcClient::new(ShmGuest::attach_path(seg.path()).unwrap()).unwrap();
    let (killed_tx, killed_rx) = std::sync::mpsc::channel::<Instant>();
    let ended = std::thread::scope(|s| {
        let calls: Vec<_> = (0..DOOMED_CALLS)
            .map(|k| {
                let client = &client;
                s.spawn(move || {
                    let err = client.call(SLOW, &pattern(k as u64, 0, 50), LONG);
                    (err.unwrap_err(), Instant::now())
                })
            })
            .collect();
        for _ in 0..DOOMED_CALLS {
            host.expect("got");
        }
        killed_tx.send(Instant::now()).unwrap();
        host.kill();
        calls
            .into_iter()
            .map(|c| c.join().unwrap())
            .collect::<Vec<_>>()
    });
    let killed_at = killed_rx.recv().unwrap();
    for (err, at) in ended {
        assert!(
            matches!(err, CallError::Detached(DetachedError::HostDead(_))),
            "a pending call ends with HostDead, got {err:?}"
        );
        let latency = at.saturating_duration_since(killed_at);
        println!("pending call ended {latency:?} after SIGKILL: {err}");
        assert!(
            latency < Duration::from_secs(2),
            "ended {latency:?} after the kill, not at its 20 s timeout"
        );
    }
    // Sticky: a later call fails at once, having sent nothing.
    let began = Instant::now();
    assert!(matches!(
        client.call(ECHO, b"anyone?", LONG),
        Err(CallError::Detached(DetachedError::HostDead(_)))
    ));
    assert!(began.elapsed() < Duration::from_secs(1));
    assert_eq!(client.stats().in_flight, 0);
}
