//! The shmhub demo: a host in this process, two guest processes (one attaching by
//! path, one spawned by the host with a spawn ticket), messages both ways, a 64 MiB
//! payload read in place, request/response calls from many threads, round-trip
//! latency, and a third guest SIGKILLed and recovered.
//!
//! Run it with `shmhub demo` (the operator CLI, `shmhub-cli`) or
//! `cargo run --release -p shmhub --example demo`. Both call [`run`]; they differ only
//! in how the demo's guest processes are started ([`Relaunch`]).

use std::process::{Child, Command};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::{segment_path, Meta, RpcClient, SegmentConfig, ShmGuest, ShmHost, SlotClasses};

/// Makes a command that runs this same program back into [`run`]. The demo appends
/// the role (`guest PATH` or `ticket-guest`), which the program must hand to `run`.
pub type Relaunch<'a> = &'a dyn Fn() -> Command;

const HELLO: u32 = 1;
const PING: u32 = 2;
const PONG: u32 = 3;
const BYE: u32 = 4;
/// A large payload: the guest answers with the FNV-1a hash of what it read in place.
const LARGE: u32 = 5;
const HASH: u32 = 6;
/// Request/response: the host asks the ticket guest to call it; the guest's calls; the
/// guest's report of how they went.
const CALL_NOW: u32 = 7;
const SQUARE: u32 = 8;
const CALLED: u32 = 9;
const THREADS: usize = 8;

/// How much work the demo does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Size {
    /// A 64 MiB payload, 2,000 calls, 25,000 round trips (a second or so, optimised).
    Full,
    /// An 8 MiB payload, 200 calls, 2,500 round trips: quick even unoptimised.
    Quick,
}

impl Size {
    fn large_mib(self) -> usize {
        match self {
            Size::Full => 64,
            Size::Quick => 8,
        }
    }

    fn calls(self) -> u64 {
        match self {
            Size::Full => 2000,
            Size::Quick => 200,
        }
    }

    /// (payload bytes, round trips) of each latency run.
    fn round_trips(self) -> [(usize, u64); 2] {
        match self {
            Size::Full => [(8, 20_000), (4096, 5_000)],
            Size::Quick => [(8, 2_000), (4096, 500)],
        }
    }
}

/// FNV-1a over a byte slice (the demo's checksum of a large payload).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Runs the demo's host when `role` is empty, or one of its guests when `role` is
/// what the host appended to a [`Relaunch`] command (`guest PATH`, `ticket-guest`).
///
/// Panics when a step fails: it is a demonstration, and a panic names the step.
pub fn run(role: &[String], relaunch: Relaunch<'_>, size: Size) {
    match role.first().map(String::as_str) {
        Some("guest") => guest(Some(role.get(1).expect("guest PATH"))),
        Some("ticket-guest") => rpc_guest(),
        Some(other) => panic!("unknown demo role {other:?}"),
        None => host(relaunch, size),
    }
}

fn guest(path: Option<&str>) {
    // By path, or with the spawn ticket the host put in our environment.
    let (mut g, how) = match path {
        Some(path) => (ShmGuest::attach_path(path).expect("attach"), "path"),
        None => (ShmGuest::from_env().expect("attach"), "spawn ticket"),
    };
    let hello = format!("hello from pid {} (attached by {how})", std::process::id());
    g.try_send(Meta::new(HELLO, 0), hello.as_bytes())
        .expect("send hello");
    // Blocking receive: spins a few microseconds, then sleeps on a shared futex until
    // the host publishes; an idle guest costs no CPU.
    let mut buf = Vec::new();
    loop {
        // A host that dies makes this an error within its liveness interval; a slow
        // one (a busy machine, an unoptimised build) is waited for.
        let Some(msg) = g.recv_message(Duration::from_secs(30)).expect("recv") else {
            continue;
        };
        let m = msg.meta();
        match m.msg_type {
            PING => {
                msg.copy_into(&mut buf);
                drop(msg);
                g.send(Meta::new(PONG, m.user_id), &buf, Duration::from_secs(5))
                    .expect("send pong");
            }
            LARGE => {
                // Read in place: the host sealed the file, so a plain slice is safe.
                let bytes = msg.sealed_slice().expect("a sealed large payload");
                let hash = fnv1a(bytes).to_le_bytes();
                drop(msg);
                g.send(Meta::new(HASH, m.user_id), &hash, Duration::from_secs(5))
                    .expect("send hash");
            }
            BYE => break,
            _ => {}
        }
    }
    g.detach();
}

/// The ticket guest: serves pings like the other, and on CALL_NOW calls its host from
/// several threads at once through one `RpcClient` (each call matched to its caller by
/// the id in `user_id`), then reports the call latency.
fn rpc_guest() {
    let guest = ShmGuest::from_env().expect("attach");
    let client = RpcClient::new(guest).expect("rpc client");
    let hello = format!(
        "hello from pid {} (attached by spawn ticket)",
        std::process::id()
    );
    let wait = Duration::from_secs(5);
    client
        .send(Meta::new(HELLO, 0), hello.as_bytes(), wait)
        .expect("hello");
    let mut buf = Vec::new();
    loop {
        let Some(msg) = client.recv_message(Duration::from_secs(30)).expect("recv") else {
            continue;
        };
        let m = msg.meta();
        match m.msg_type {
            PING => {
                msg.copy_into(&mut buf);
                drop(msg);
                client
                    .send(Meta::new(PONG, m.user_id), &buf, wait)
                    .expect("pong");
            }
            CALL_NOW => {
                let calls = msg.read_pod::<u64>().expect("the number of calls") as usize;
                drop(msg);
                let started = Instant::now();
                let mut samples: Vec<u64> = std::thread::scope(|s| {
                    let workers: Vec<_> = (0..THREADS)
                        .map(|t| {
                            let client = &client;
                            s.spawn(move || {
                                (0..calls / THREADS)
                                    .map(|i| {
                                        let x = (t * 1_000_000 + i) as u64;
                                        let t0 = Instant::now();
                                        let r = client
                                            .call(SQUARE, &x.to_le_bytes(), wait)
                                            .expect("call");
                                        let ns = t0.elapsed().as_nanos() as u64;
                                        assert_eq!(r.read_pod::<u64>(), Some(x * x), "my answer");
                                        ns
                                    })
                                    .collect::<Vec<_>>()
                            })
                        })
                        .collect();
                    workers
                        .into_iter()
                        .flat_map(|w| w.join().unwrap())
                        .collect()
                });
                let total = started.elapsed();
                samples.sort_unstable();
                let report = format!(
                    "{calls} calls from {THREADS} threads, each answer matched to its caller, \
                     in {:.1} ms: p50 {:.1} us, p99 {:.1} us per call ({} late responses)",
                    total.as_secs_f64() * 1e3,
                    samples[samples.len() / 2] as f64 / 1e3,
                    samples[samples.len() * 99 / 100] as f64 / 1e3,
                    client.stats().late_responses
                );
                client
                    .send(Meta::new(CALLED, 0), report.as_bytes(), wait)
                    .expect("report");
            }
            BYE => break,
            _ => {}
        }
    }
}

fn spawn_path_guest(relaunch: Relaunch<'_>, path: &str) -> Child {
    let mut cmd = relaunch();
    cmd.arg("guest").arg(path);
    cmd.spawn().expect("spawn guest")
}

fn ticket_guest(relaunch: Relaunch<'_>) -> Command {
    let mut cmd = relaunch();
    cmd.arg("ticket-guest");
    cmd
}

fn recv(host: &mut ShmHost, buf: &mut Vec<u8>, deadline: Instant) -> crate::host::Received {
    let left = deadline.saturating_duration_since(Instant::now());
    host.recv(buf, left)
        .expect("recv")
        .expect("guest did not answer in time")
}

fn host(relaunch: Relaunch<'_>, size: Size) {
    let path = segment_path(&format!("demo-{}", std::process::id())).unwrap();
    let config = SegmentConfig {
        max_guests: 8,
        ring_capacity: 64,
        classes: SlotClasses::single(64 * 1024, 8),
        broadcast_slots: 0,
        broadcast_slot_size: 0,
    };
    let mut host = ShmHost::create(&path, config).expect("create segment");
    println!(
        "host: segment {} ({} bytes)",
        path.display(),
        config.layout().unwrap().total_size
    );
    let (deaths_tx, deaths) = mpsc::channel();
    host.on_death(move |d| {
        let _ = deaths_tx.send((*d, Instant::now()));
    });
    let path_str = path.display().to_string();
    let mut children = vec![spawn_path_guest(relaunch, &path_str)];
    // Reserves an entry, passes the ticket in the environment, keeps the pidfd.
    let spawned = host
        .spawn(&mut ticket_guest(relaunch))
        .expect("spawn ticket guest");
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut buf = Vec::new();
    let mut peers = Vec::new();
    while peers.len() < 2 {
        let m = recv(&mut host, &mut buf, deadline);
        println!("host: {} says {:?}", m.from, String::from_utf8_lossy(&buf));
        peers.push(m.from);
    }
    println!(
        "host: {} (pid {}) was reserved before its process started",
        spawned.handle.id, spawned.pid
    );
    println!("host: guests block in recv (adaptive: spin briefly, then a shared futex)");

    for &peer in &peers {
        for (label, len) in [("inline", 8usize), ("slot", 48 * 1024)] {
            let payload: Vec<u8> = (0..len).map(|i| (i * 31 + 7) as u8).collect();
            host.try_send(peer, Meta::new(PING, 1), &payload).unwrap();
            let m = recv(&mut host, &mut buf, deadline);
            assert_eq!((m.from, m.meta.msg_type), (peer, PONG));
            assert_eq!(buf, payload, "echo is byte-exact");
            println!("host: {peer} echoed a {len}-byte {label} payload, bytes identical");
        }
    }

    // A large payload travels in a sealed memory file passed on the guest's doorbell;
    // the guest reads it in place and answers with its hash.
    let path_guest = *peers.iter().find(|&&p| p != spawned.handle.id).unwrap();
    let mib = size.large_mib();
    let big: Vec<u8> = (0..mib << 20).map(|i| (i ^ (i >> 11)) as u8).collect();
    let t = Instant::now();
    host.send(
        path_guest,
        Meta::new(LARGE, 1),
        &big,
        Duration::from_secs(5),
    )
    .unwrap();
    let m = recv(&mut host, &mut buf, deadline);
    let took = t.elapsed();
    assert_eq!(m.meta.msg_type, HASH);
    assert_eq!(buf, fnv1a(&big).to_le_bytes(), "the guest read every byte");
    println!(
        "host: {mib} MiB to {} in a sealed memfd, hashed in place by the guest: {:.1} ms \
         round trip (one copy into the file, none out)",
        path_guest,
        took.as_secs_f64() * 1e3
    );

    // Request/response: the ticket guest calls us from several threads at once.
    host.try_send(
        spawned.handle,
        Meta::new(CALL_NOW, 0),
        &size.calls().to_le_bytes(),
    )
    .unwrap();
    loop {
        let (req, msg) = host
            .recv_message(deadline.saturating_duration_since(Instant::now()))
            .expect("recv")
            .expect("the guest did not call in time");
        if req.meta.msg_type == CALLED {
            println!(
                "host: {} made {}",
                req.from,
                String::from_utf8_lossy(&msg.to_vec())
            );
            break;
        }
        assert!(req.is_request());
        let x: u64 = msg.read_pod().expect("a u64 argument");
        drop(msg);
        host.reply(&req, &(x * x).to_le_bytes(), Duration::from_secs(5))
            .unwrap();
    }

    for (len, rounds) in size.round_trips() {
        let peer = path_guest;
        let payload = vec![0xA5u8; len];
        let mut samples = Vec::with_capacity(rounds as usize);
        for n in 0..rounds {
            let t = Instant::now();
            host.send(peer, Meta::new(PING, n), &payload, Duration::from_secs(5))
                .unwrap();
            let m = recv(&mut host, &mut buf, deadline);
            samples.push(t.elapsed().as_nanos() as u64);
            assert_eq!(m.meta.user_id, n);
        }
        samples.sort_unstable();
        let pct = |p: f64| samples[((samples.len() as f64 * p) as usize).min(samples.len() - 1)];
        println!(
            "host: round trip {len:>5} B x {rounds}: p50 {:.2} us  p99 {:.2} us  p99.9 {:.2} us  max {:.2} us",
            pct(0.50) as f64 / 1e3,
            pct(0.99) as f64 / 1e3,
            pct(0.999) as f64 / 1e3,
            *samples.last().unwrap() as f64 / 1e3
        );
    }

    kill_and_recover(relaunch, &mut host, &deaths, &mut buf, deadline);

    for &peer in &peers {
        host.try_send(peer, Meta::new(BYE, 0), b"").unwrap();
    }
    for child in &mut children {
        let status = wait_child(child, deadline);
        assert!(status.success(), "guest failed: {status}");
    }
    while host.attached_peers().len() + host.maintain() > 0 && Instant::now() < deadline {
        host.try_recv(&mut buf).unwrap();
    }
    for &peer in &peers {
        let info = host.peer_info(peer).unwrap();
        println!(
            "host: {peer} left: state {:?}, generation {}, sent {}, received {}",
            info.state.unwrap(),
            info.generation,
            info.stats.sent,
            info.stats.received
        );
    }
    drop(host);
    assert!(!path.exists());
    println!("host: segment removed; nothing left in /dev/shm");
}

/// Spawns a third guest, SIGKILLs it while it is parked, and shows the host noticing
/// and taking its entry back.
fn kill_and_recover(
    relaunch: Relaunch<'_>,
    host: &mut ShmHost,
    deaths: &mpsc::Receiver<(crate::host::Death, Instant)>,
    buf: &mut Vec<u8>,
    deadline: Instant,
) {
    let victim = host
        .spawn(&mut ticket_guest(relaunch))
        .expect("spawn victim");
    let m = recv(host, buf, deadline);
    assert_eq!(m.handle(), victim.handle);
    // A frame in flight as it dies: whatever it held is reclaimed.
    let frame = vec![1u8; 40 * 1024];
    host.try_send(victim.handle, Meta::new(0, 0), &frame)
        .unwrap();
    host.signal_guest(victim.handle, 9)
        .expect("SIGKILL the victim");
    let killed = Instant::now();
    println!("host: SIGKILLed {} (pid {})", victim.handle.id, victim.pid);
    let (death, seen) = loop {
        // The host notices deaths inside its own calls (at least every 10 ms).
        assert!(host.recv(buf, Duration::from_millis(5)).unwrap().is_none());
        if let Ok(d) = deaths.try_recv() {
            break d;
        }
        assert!(Instant::now() < deadline, "death not noticed");
    };
    let info = host.peer_info(death.peer).unwrap();
    println!(
        "host: {} died ({:?}, {}), noticed and recovered after {:.2} ms: {} slot(s) reclaimed, \
         {} unread message(s) discarded; entry {:?} again at generation {}",
        death.peer,
        death.cause,
        death
            .exit
            .map_or("status unknown".into(), |s| s.to_string()),
        seen.duration_since(killed).as_secs_f64() * 1e3,
        death.reclaimed_slots,
        death.discarded,
        info.state.unwrap(),
        info.generation
    );
    let stale = host.try_send(victim.handle, Meta::new(0, 0), b"too late");
    println!("host: the old handle now fails: {}", stale.unwrap_err());
}

fn wait_child(child: &mut Child, deadline: Instant) -> std::process::ExitStatus {
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            return child.wait().unwrap();
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}
