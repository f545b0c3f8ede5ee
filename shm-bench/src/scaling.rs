//! Scaling: 1 to 255 guest processes, each making 8-byte round trips to one host
//! (guest sends a ping, the host echoes it, the guest waits for the pong).
//!
//! The machine this runs on may have 2 CPUs, so nobody spins: every process uses a
//! waiting policy that parks (`block`, or `adaptive`: a short spin, then park), and
//! nothing is pinned (the host and every guest may run on any CPU). The host is
//! single-threaded and serves all guests. Guests start together on a `GO` and record
//! each round trip; the run's elapsed time is from the first `GO` to the last echo.

use std::time::{Duration, Instant};

use shmhub::host::WaitPolicy;
use shmhub::{segment_path, Meta, SegmentConfig, ShmGuest, ShmHost, SlotClasses};

use crate::machine::{unpin, SavedAffinity};
use crate::measure::{child_command, Hist, Plan, Stats, Watchdog, OP_TIMEOUT};
use crate::BenchResult;

const HELLO: u32 = 1;
const GO: u32 = 2;
const PING: u32 = 3;
const PONG: u32 = 4;
const REPORT: u32 = 5;
const SAMPLES: u32 = 6;
const DONE: u32 = 7;
/// Round-trip samples (u32 nanoseconds) per report message: 4 KiB.
const CHUNK: usize = 1024;

const ROUND_TRIPS_ENV: &str = "SHM_BENCH_SCALE_ROUND_TRIPS";
const POLICY_ENV: &str = "SHM_BENCH_SCALE_POLICY";

/// How long spawned guests may take to say hello, all together.
const START_BUDGET: Duration = Duration::from_secs(60);

/// One scaling measurement.
#[derive(Debug, Clone)]
pub struct Scale {
    /// Guest processes.
    pub guests: usize,
    /// Wait policy of the host and every guest (`block` or `adaptive`).
    pub mode: String,
    /// Round trips, all guests together.
    pub round_trips: u64,
    /// Wall time from the first `GO` to the last echo.
    pub secs: f64,
    /// Round-trip percentiles over every guest's samples (ns).
    pub stats: Stats,
}

impl Scale {
    /// Elapsed time per round trip, all guests together, in nanoseconds.
    pub fn ns_per_round_trip(&self) -> f64 {
        self.secs * 1e9 / self.round_trips.max(1) as f64
    }
}

/// Runs every guest count in both waiting modes, unpinned.
pub fn run(plan: Plan, out: &mut Vec<Scale>) -> BenchResult<()> {
    let saved = SavedAffinity::save()?;
    unpin()?;
    let mut result = Ok(());
    'all: for (mode, policy) in [
        ("block", WaitPolicy::BLOCK),
        ("adaptive", WaitPolicy::ADAPTIVE),
    ] {
        for &guests in plan.guest_counts() {
            match one(plan, guests, mode, policy) {
                Ok(s) => out.push(s),
                Err(e) => {
                    result = Err(e);
                    break 'all;
                }
            }
        }
    }
    saved.restore()?;
    result
}

fn one(plan: Plan, guests: usize, mode: &str, policy: WaitPolicy) -> BenchResult<Scale> {
    let name = format!("bench-scale-{}-{guests}-{mode}", std::process::id());
    let config = SegmentConfig {
        max_guests: 255,
        ring_capacity: 16,
        classes: SlotClasses::single(4096, 2),
        broadcast_slots: 0,
        broadcast_slot_size: 0,
    };
    let mut host = ShmHost::create(segment_path(&name)?, config)?;
    host.set_wait_policy(policy);
    let per_guest = plan.scale_round_trips(guests);
    let (mut pids, mut handles) = (Vec::new(), Vec::new());
    let mut spawned = Ok(());
    for _ in 0..guests {
        let mut cmd = child_command("scale-guest", None);
        cmd.env(ROUND_TRIPS_ENV, per_guest.to_string())
            .env(POLICY_ENV, mode);
        match host.spawn(&mut cmd) {
            Ok(s) => {
                pids.push(s.pid);
                handles.push(s.handle);
            }
            Err(e) => {
                spawned = Err(e);
                break;
            }
        }
    }
    // Armed before anything can fail, so no guest outlives a failed run by long.
    let _watchdog = Watchdog::arm_all(pids, Duration::from_secs(300));
    spawned?;
    let mut buf = Vec::with_capacity(4096);
    let started = Instant::now();
    let mut hellos = 0;
    while hellos < guests {
        match host.recv(&mut buf, Duration::from_secs(1))? {
            Some(r) if r.meta.msg_type == HELLO => hellos += 1,
            Some(r) => return Err(format!("unexpected message {}", r.meta.msg_type).into()),
            None if started.elapsed() > START_BUDGET => {
                return Err(format!("only {hellos} of {guests} guests said hello").into())
            }
            None => {}
        }
    }

    let total = per_guest * guests as u64;
    let t = Instant::now();
    for &h in &handles {
        host.send(h, Meta::new(GO, 0), &[], OP_TIMEOUT)?;
    }
    let mut echoed = 0u64;
    while echoed < total {
        let r = host
            .recv(&mut buf, OP_TIMEOUT)?
            .ok_or("guests went quiet for 10 s")?;
        if r.meta.msg_type != PING {
            return Err(format!("unexpected message {}", r.meta.msg_type).into());
        }
        host.send(
            r.handle(),
            Meta::new(PONG, r.meta.user_id),
            &buf,
            OP_TIMEOUT,
        )?;
        echoed += 1;
    }
    let secs = t.elapsed().as_secs_f64();

    for &h in &handles {
        host.send(h, Meta::new(REPORT, 0), &[], OP_TIMEOUT)?;
    }
    let mut hist = Hist::new();
    let mut done = 0;
    while done < guests {
        let r = host
            .recv(&mut buf, OP_TIMEOUT)?
            .ok_or("guests went quiet for 10 s")?;
        match r.meta.msg_type {
            SAMPLES => {
                for c in buf.chunks_exact(4) {
                    let ns = u32::from_le_bytes(c.try_into().expect("4 bytes"));
                    hist.record(Duration::from_nanos(u64::from(ns)));
                }
            }
            DONE => done += 1,
            other => return Err(format!("unexpected message {other}").into()),
        }
    }
    // Let the guests leave; the host reaps the children it spawned.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !host.attached_peers().is_empty() && Instant::now() < deadline {
        let _ = host.recv(&mut buf, Duration::from_millis(10));
        host.maintain();
    }
    Ok(Scale {
        guests,
        mode: mode.into(),
        round_trips: total,
        secs,
        stats: hist.stats(),
    })
}

/// A scaling guest: says hello, waits for `GO`, makes its round trips, and sends
/// its samples when asked.
pub fn guest() -> BenchResult<()> {
    let round_trips: u64 = std::env::var(ROUND_TRIPS_ENV)?.parse()?;
    let policy = match std::env::var(POLICY_ENV)?.as_str() {
        "block" => WaitPolicy::BLOCK,
        _ => WaitPolicy::ADAPTIVE,
    };
    let mut g = ShmGuest::from_env()?;
    g.set_wait_policy(policy);
    g.send(Meta::new(HELLO, 0), &[], OP_TIMEOUT)?;
    let mut buf = Vec::with_capacity(64);
    wait_for(&mut g, &mut buf, GO, START_BUDGET + OP_TIMEOUT)?;
    let mut samples = Vec::with_capacity(round_trips as usize);
    let ping = [0x5Au8; 8];
    for i in 0..round_trips {
        let t = Instant::now();
        g.send(Meta::new(PING, i), &ping, OP_TIMEOUT)?;
        let m = g.recv(&mut buf, OP_TIMEOUT)?.ok_or("host went quiet")?;
        let e = t.elapsed();
        if m.msg_type != PONG || m.user_id != i {
            return Err(format!("bad pong for {i}").into());
        }
        samples.push(u32::try_from(e.as_nanos()).unwrap_or(u32::MAX));
    }
    wait_for(&mut g, &mut buf, REPORT, START_BUDGET)?;
    let mut bytes = Vec::with_capacity(CHUNK * 4);
    for chunk in samples.chunks(CHUNK) {
        bytes.clear();
        bytes.extend(chunk.iter().flat_map(|s| s.to_le_bytes()));
        g.send(Meta::new(SAMPLES, 0), &bytes, OP_TIMEOUT)?;
    }
    g.send(Meta::new(DONE, 0), &[], OP_TIMEOUT)?;
    g.detach();
    Ok(())
}

fn wait_for(g: &mut ShmGuest, buf: &mut Vec<u8>, ty: u32, within: Duration) -> BenchResult<()> {
    match g.recv(buf, within)? {
        Some(m) if m.msg_type == ty => Ok(()),
        Some(m) => Err(format!("expected message {ty}, got {}", m.msg_type).into()),
        None => Err(format!("no message {ty} within {within:?}").into()),
    }
}
