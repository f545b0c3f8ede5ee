//! The shmhub demo: a host in this process, two guest processes (one attaching by
//! path, one by a reserved peer id), messages both ways and round-trip latency.
//!
//! Run: `cargo run --release -p shmhub --example demo`

use std::process::{Child, Command};
use std::time::{Duration, Instant};

use shmhub::{segment_path, AttachOptions, Meta, PeerId, SegmentConfig, ShmGuest, ShmHost};

const HELLO: u32 = 1;
const PING: u32 = 2;
const PONG: u32 = 3;
const BYE: u32 = 4;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("guest") {
        guest(&args[2], args.get(3).map(|s| s.parse().unwrap()));
    } else {
        host();
    }
}

fn guest(path: &str, peer: Option<u8>) {
    let options = AttachOptions {
        peer_id: peer.and_then(PeerId::new),
        ..AttachOptions::default()
    };
    let mut g = ShmGuest::attach_path_with(path, options).expect("attach");
    let how = if peer.is_some() {
        "reserved id"
    } else {
        "path"
    };
    let hello = format!("hello from pid {} (attached by {how})", std::process::id());
    g.try_send(Meta::new(HELLO, 0), hello.as_bytes())
        .expect("send hello");
    // Blocking receive: spins a few microseconds, then sleeps on a shared futex until
    // the host publishes; an idle guest costs no CPU.
    let mut buf = Vec::new();
    loop {
        match g.recv(&mut buf, Duration::from_secs(30)).expect("recv") {
            Some(m) if m.msg_type == PING => {
                g.send(Meta::new(PONG, m.user_id), &buf, Duration::from_secs(5))
                    .expect("send pong");
            }
            Some(m) if m.msg_type == BYE => break,
            Some(_) => {}
            None => panic!("the host went quiet for 30 s"),
        }
    }
    g.detach();
}

fn spawn_guest(path: &str, peer: Option<PeerId>) -> Child {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.arg("guest").arg(path);
    if let Some(p) = peer {
        cmd.arg(p.get().to_string());
    }
    cmd.spawn().expect("spawn guest")
}

fn recv(host: &mut ShmHost, buf: &mut Vec<u8>, deadline: Instant) -> shmhub::host::Received {
    let left = deadline.saturating_duration_since(Instant::now());
    host.recv(buf, left)
        .expect("recv")
        .expect("guest did not answer in time")
}

fn host() {
    let path = segment_path(&format!("demo-{}", std::process::id())).unwrap();
    let config = SegmentConfig {
        max_guests: 8,
        ring_capacity: 64,
        slot_size: 64 * 1024,
        slots_per_pool: 8,
    };
    let mut host = ShmHost::create(&path, config).expect("create segment");
    println!(
        "host: segment {} ({} bytes)",
        path.display(),
        config.layout().unwrap().total_size
    );
    let reserved = host.reserve_peer().unwrap();
    let path_str = path.display().to_string();
    let mut children = vec![
        spawn_guest(&path_str, None),
        spawn_guest(&path_str, Some(reserved)),
    ];
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut buf = Vec::new();
    let mut peers = Vec::new();
    while peers.len() < 2 {
        let m = recv(&mut host, &mut buf, deadline);
        println!("host: {} says {:?}", m.from, String::from_utf8_lossy(&buf));
        peers.push(m.from);
    }
    println!("host: {reserved} was reserved before its process started");
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

    for &(len, rounds) in &[(8usize, 20_000u64), (4096, 5_000)] {
        let peer = peers[0];
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
