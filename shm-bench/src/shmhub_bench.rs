//! shmhub round trips and one-way throughput: the host side (this process) and the
//! guest side (the re-executed child, an echo server).

use std::time::{Duration, Instant};

use shmhub::host::WaitPolicy;
use shmhub::{segment_path, Meta, SegmentConfig, ShmGuest, ShmHost, SlotClasses};

use crate::measure::{child_command, fill, touch, Hist, Plan, SpinDeadline, Watchdog, OP_TIMEOUT};
use crate::report::{Row, Throughput};
use crate::BenchResult;

const HELLO: u32 = 1;
const ECHO: u32 = 2;
const ECHO_TOUCH: u32 = 3;
const POLICY: u32 = 4;
const STREAM: u32 = 5;
const SYNC: u32 = 6;
const BYE: u32 = 7;

/// The largest payload benched; the slot size.
const SLOT_SIZE: u32 = 1 << 20;

const MODES: [(&str, WaitPolicy, u8); 3] = [
    ("spin", WaitPolicy::SPIN, 0),
    ("block", WaitPolicy::BLOCK, 1),
    ("adaptive", WaitPolicy::ADAPTIVE, 2),
];

/// Runs every shmhub measurement against one spawned guest.
pub fn run(
    plan: Plan,
    child_cpu: Option<usize>,
    rows: &mut Vec<Row>,
    tputs: &mut Vec<Throughput>,
) -> BenchResult<()> {
    let path = segment_path(&format!("bench-{}", std::process::id()))?;
    let config = SegmentConfig {
        max_guests: 1,
        ring_capacity: 64,
        classes: SlotClasses::single(SLOT_SIZE, 4),
        broadcast_slots: 0,
        broadcast_slot_size: 0,
    };
    // The host removes the segment file when dropped, on every path out of here.
    let mut host = ShmHost::create(&path, config)?;
    let spawned = host.spawn(&mut child_command("shmhub", child_cpu))?;
    let budget = if plan.quick { 120 } else { 600 };
    let _watchdog = Watchdog::arm(spawned.pid, Duration::from_secs(budget));
    let peer = spawned.handle;
    let mut buf = Vec::with_capacity(SLOT_SIZE as usize);
    let hello = recv(&mut host, &mut buf)?;
    if hello.meta.msg_type != HELLO {
        return Err("guest did not say hello".into());
    }

    for (mode, policy, code) in MODES {
        host.set_wait_policy(policy);
        host.send(peer, Meta::new(POLICY, 0), &[code], OP_TIMEOUT)?;
        recv(&mut host, &mut buf)?;
        let sizes = if mode == "spin" {
            plan.sizes()
        } else {
            plan.wait_sizes()
        };
        for &size in sizes {
            for touched in [false, true] {
                let mut h = Hist::new();
                let (warm, iters) = (plan.warmup(size), plan.iters(size));
                let ty = if touched { ECHO_TOUCH } else { ECHO };
                let mut payload = vec![0u8; size];
                for n in 0..warm + iters {
                    let t = Instant::now();
                    if touched {
                        fill(&mut payload, n);
                    }
                    host.send(peer, Meta::new(ty, n), &payload, OP_TIMEOUT)?;
                    let m = recv(&mut host, &mut buf)?;
                    if touched {
                        touch(&buf);
                    }
                    let e = t.elapsed();
                    if m.meta.user_id != n || buf.len() != size {
                        return Err(format!("bad echo for {n} ({} bytes)", buf.len()).into());
                    }
                    if n >= warm {
                        h.record(e);
                    }
                }
                rows.push(Row::new("shmhub", size, mode, touched, h.stats()));
            }
        }
    }

    // One-way throughput: both sides spin.
    host.set_wait_policy(WaitPolicy::SPIN);
    host.send(peer, Meta::new(POLICY, 0), &[0], OP_TIMEOUT)?;
    recv(&mut host, &mut buf)?;
    for size in [64usize, 1 << 20] {
        let msgs = plan.stream_msgs(size);
        let payload = vec![0x5Au8; size];
        let t = Instant::now();
        for n in 0..msgs {
            let mut dl = SpinDeadline::new(OP_TIMEOUT);
            loop {
                match host.try_send(peer, Meta::new(STREAM, n), &payload) {
                    Ok(()) => break,
                    Err(e) if e.is_would_block() => {
                        if dl.expired() {
                            return Err("stream: ring full for 10 s".into());
                        }
                        std::hint::spin_loop();
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        }
        host.send(peer, Meta::new(SYNC, 0), &[], OP_TIMEOUT)?;
        let m = recv(&mut host, &mut buf)?;
        let secs = t.elapsed().as_secs_f64();
        if m.meta.user_id != msgs {
            return Err(format!("guest counted {} of {msgs}", m.meta.user_id).into());
        }
        tputs.push(Throughput::new("shmhub", size, msgs, secs));
    }

    host.send(peer, Meta::new(BYE, 0), &[], OP_TIMEOUT)?;
    // Let the guest leave and be recycled; the watchdog bounds the child regardless.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !host.attached_peers().is_empty() && Instant::now() < deadline {
        let _ = host.recv(&mut buf, Duration::from_millis(10));
        host.maintain();
    }
    Ok(())
}

fn recv(host: &mut ShmHost, buf: &mut Vec<u8>) -> BenchResult<shmhub::host::Received> {
    host.recv(buf, OP_TIMEOUT)?
        .ok_or_else(|| "guest did not answer within 10 s".into())
}

/// The guest: attaches with the spawn ticket and serves until `BYE`.
pub fn guest() -> BenchResult<()> {
    let mut g = ShmGuest::from_env()?;
    g.try_send(Meta::new(HELLO, 0), b"")?;
    let mut buf = Vec::with_capacity(SLOT_SIZE as usize);
    let mut streamed = 0u64;
    loop {
        let Some(m) = g.recv(&mut buf, OP_TIMEOUT)? else {
            return Err("host went quiet for 10 s".into());
        };
        match m.msg_type {
            ECHO => g.send(m, &buf, OP_TIMEOUT)?,
            ECHO_TOUCH => {
                touch(&buf);
                g.send(m, &buf, OP_TIMEOUT)?;
            }
            POLICY => {
                let policy = MODES
                    .iter()
                    .find(|(_, _, c)| Some(c) == buf.first())
                    .map_or(WaitPolicy::ADAPTIVE, |m| m.1);
                g.set_wait_policy(policy);
                g.send(m, &[], OP_TIMEOUT)?;
            }
            STREAM => streamed += 1,
            SYNC => {
                g.send(Meta::new(SYNC, streamed), &[], OP_TIMEOUT)?;
                streamed = 0;
            }
            BYE => break,
            other => return Err(format!("unknown message type {other}").into()),
        }
    }
    g.detach();
    Ok(())
}
