//! shmhub round trips and one-way throughput: the host side (this process) and the
//! guest side (the re-executed child, an echo server).
//!
//! Two APIs are measured. `copy`: `send(&[u8])` copies the payload into a slot (or
//! the descriptor, up to 36 bytes) and `recv(&mut Vec)` copies it out. `loan`: the
//! sender writes a loaned slot in place (`loan` + `send`) and the receiver reads the
//! slot in place through the view `recv_message` returns, so a touched loan round
//! trip is exactly one fill and one read per direction, as in the `raw-echo` floor.

use std::time::{Duration, Instant};

use shmhub::host::WaitPolicy;
use shmhub::{
    segment_path, Meta, PeerHandle, SegmentConfig, ShmGuest, ShmHost, SlotClass, SlotClasses,
};

use crate::measure::{
    child_command, fill, touch, Hist, Plan, SpinDeadline, Watchdog, MAX_SIZE, OP_TIMEOUT,
};
use crate::report::{Row, Throughput};
use crate::BenchResult;

const HELLO: u32 = 1;
const POLICY: u32 = 4;
const STREAM: u32 = 5;
const SYNC: u32 = 6;
const BYE: u32 = 7;
const ECHO_COPY: u32 = 10;
const ECHO_COPY_TOUCH: u32 = 11;
const ECHO_LOAN: u32 = 12;
const ECHO_LOAN_TOUCH: u32 = 13;

/// The measured variants: API, touched, message type.
const VARIANTS: [(&str, bool, u32); 4] = [
    ("copy", false, ECHO_COPY),
    ("copy", true, ECHO_COPY_TOUCH),
    ("loan", false, ECHO_LOAN),
    ("loan", true, ECHO_LOAN_TOUCH),
];

const MODES: [(&str, WaitPolicy, u8); 3] = [
    ("spin", WaitPolicy::SPIN, 0),
    ("block", WaitPolicy::BLOCK, 1),
    ("adaptive", WaitPolicy::ADAPTIVE, 2),
];

/// Slots per direction: enough 256-byte slots for a full ring of 64-byte stream
/// messages, and a class for each larger payload size, up to 16 MiB.
const RING: u32 = 256;
const CLASSES: [SlotClass; 5] = [
    SlotClass::new(256, RING),
    SlotClass::new(4096, 8),
    SlotClass::new(64 * 1024, 4),
    SlotClass::new(1 << 20, 4),
    SlotClass::new(MAX_SIZE as u32, 2),
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
        ring_capacity: RING,
        classes: SlotClasses::new(&CLASSES),
        broadcast_slots: 0,
        broadcast_slot_size: 0,
    };
    // The host removes the segment file when dropped, on every path out of here.
    let mut host = ShmHost::create(&path, config)?;
    let spawned = host.spawn(&mut child_command("shmhub", child_cpu))?;
    let budget = if plan.quick { 120 } else { 600 };
    let _watchdog = Watchdog::arm(spawned.pid, Duration::from_secs(budget));
    let peer = spawned.handle;
    let mut buf = Vec::with_capacity(MAX_SIZE);
    let hello = recv(&mut host, &mut buf)?;
    if hello.meta.msg_type != HELLO {
        return Err("guest did not say hello".into());
    }

    let mut payload = vec![0u8; MAX_SIZE];
    for (mode, policy, code) in MODES {
        set_policy(&mut host, peer, policy, code, &mut buf)?;
        let sizes = if mode == "spin" {
            plan.sizes()
        } else {
            plan.wait_sizes()
        };
        for &size in sizes {
            for (api, touched, ty) in VARIANTS {
                let mut h = Hist::new();
                let (warm, iters) = (plan.warmup(size), plan.iters(size));
                for n in 0..warm + iters {
                    let t = Instant::now();
                    if api == "copy" {
                        copy_round_trip(&mut host, peer, ty, n, &mut payload[..size], &mut buf)?;
                    } else {
                        loan_round_trip(&mut host, peer, ty, n, size)?;
                    }
                    let e = t.elapsed();
                    if n >= warm {
                        h.record(e);
                    }
                }
                rows.push(Row::new("shmhub", api, size, mode, touched, h.stats()));
            }
        }
    }

    // One-way throughput: both sides spin.
    set_policy(&mut host, peer, WaitPolicy::SPIN, 0, &mut buf)?;
    for (api, size) in [("copy", 64usize), ("loan", 64), ("copy", 1 << 20)] {
        let msgs = plan.stream_msgs(size);
        let t = Instant::now();
        for n in 0..msgs {
            send_stream(&mut host, peer, api, n, &payload[..size])?;
        }
        host.send(peer, Meta::new(SYNC, 0), &[], OP_TIMEOUT)?;
        let m = recv(&mut host, &mut buf)?;
        let secs = t.elapsed().as_secs_f64();
        if m.meta.user_id != msgs {
            return Err(format!("guest counted {} of {msgs}", m.meta.user_id).into());
        }
        tputs.push(Throughput::new("shmhub", api, size, msgs, secs));
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

fn set_policy(
    host: &mut ShmHost,
    peer: PeerHandle,
    policy: WaitPolicy,
    code: u8,
    buf: &mut Vec<u8>,
) -> BenchResult<()> {
    host.set_wait_policy(policy);
    host.send(peer, Meta::new(POLICY, 0), &[code], OP_TIMEOUT)?;
    recv(host, buf)?;
    Ok(())
}

/// One round trip through the copying API; touched: the payload is filled before
/// the send and every received byte is read.
fn copy_round_trip(
    host: &mut ShmHost,
    peer: PeerHandle,
    ty: u32,
    n: u64,
    payload: &mut [u8],
    buf: &mut Vec<u8>,
) -> BenchResult<()> {
    let touched = ty == ECHO_COPY_TOUCH;
    if touched {
        fill(payload, n);
    }
    host.send(peer, Meta::new(ty, n), payload, OP_TIMEOUT)?;
    let m = recv(host, buf)?;
    if touched {
        touch(buf);
    }
    if m.meta.user_id != n || buf.len() != payload.len() {
        return Err(format!("bad echo for {n} ({} bytes)", buf.len()).into());
    }
    Ok(())
}

/// One round trip through loans and views; touched: the loaned slot is filled in
/// place and the received slot is read in place.
fn loan_round_trip(
    host: &mut ShmHost,
    peer: PeerHandle,
    ty: u32,
    n: u64,
    size: usize,
) -> BenchResult<()> {
    let touched = ty == ECHO_LOAN_TOUCH;
    let mut loan = host.loan_timeout(peer, size, OP_TIMEOUT)?;
    if touched {
        // SAFETY: the slot is loaned to us; an honest guest never touches a Loaned
        // slot, and the slice is gone before the send.
        fill(unsafe { &mut loan.as_mut_slice()[..size] }, n);
    }
    loan.send(Meta::new(ty, n), size)?;
    let (r, msg) = host
        .recv_message(OP_TIMEOUT)?
        .ok_or("guest did not answer within 10 s")?;
    if touched {
        // SAFETY: the view holds the slot; an honest guest does not write a slot it
        // has sent, and the slice is gone before the view is dropped.
        touch(unsafe { msg.as_slice() });
    }
    if r.meta.user_id != n || msg.len() != size {
        return Err(format!("bad echo for {n} ({} bytes)", msg.len()).into());
    }
    Ok(())
}

/// Sends one stream message, spinning while the ring or the pool is full.
fn send_stream(
    host: &mut ShmHost,
    peer: PeerHandle,
    api: &str,
    n: u64,
    payload: &[u8],
) -> BenchResult<()> {
    let mut dl = SpinDeadline::new(OP_TIMEOUT);
    loop {
        let sent = if api == "copy" {
            host.try_send(peer, Meta::new(STREAM, n), payload)
        } else {
            host.loan(peer, payload.len()).and_then(|mut loan| {
                loan.write_at(0, payload);
                loan.send(Meta::new(STREAM, n), payload.len())
            })
        };
        match sent {
            Ok(()) => return Ok(()),
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

fn recv(host: &mut ShmHost, buf: &mut Vec<u8>) -> BenchResult<shmhub::host::Received> {
    host.recv(buf, OP_TIMEOUT)?
        .ok_or_else(|| "guest did not answer within 10 s".into())
}

/// The guest: attaches with the spawn ticket and serves until `BYE`.
pub fn guest() -> BenchResult<()> {
    let mut g = ShmGuest::from_env()?;
    g.try_send(Meta::new(HELLO, 0), b"")?;
    let mut buf = Vec::with_capacity(MAX_SIZE);
    let mut streamed = 0u64;
    loop {
        let Some(msg) = g.recv_message(OP_TIMEOUT)? else {
            return Err("host went quiet for 10 s".into());
        };
        let m = msg.meta();
        match m.msg_type {
            ECHO_COPY | ECHO_COPY_TOUCH => {
                msg.copy_into(&mut buf);
                drop(msg);
                if m.msg_type == ECHO_COPY_TOUCH {
                    touch(&buf);
                    fill(&mut buf, m.user_id);
                }
                g.send(m, &buf, OP_TIMEOUT)?;
            }
            ECHO_LOAN | ECHO_LOAN_TOUCH => {
                let len = msg.len();
                let touched = m.msg_type == ECHO_LOAN_TOUCH;
                if touched {
                    // SAFETY: the view holds the slot; the honest host does not write
                    // a slot it has sent.
                    touch(unsafe { msg.as_slice() });
                }
                let mut loan = g.loan_timeout(len, OP_TIMEOUT)?;
                if touched {
                    // SAFETY: the slot is loaned to us; the honest host never touches
                    // a Loaned slot.
                    fill(unsafe { &mut loan.as_mut_slice()[..len] }, m.user_id);
                }
                drop(msg);
                loan.send(m, len)?;
            }
            POLICY => {
                let code = msg.read_pod::<u8>();
                let policy = MODES
                    .iter()
                    .find(|(_, _, c)| Some(*c) == code)
                    .map_or(WaitPolicy::ADAPTIVE, |m| m.1);
                g.set_wait_policy(policy);
                g.send(m, &[], OP_TIMEOUT)?;
            }
            STREAM => {
                msg.copy_into(&mut buf);
                streamed += 1;
            }
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
