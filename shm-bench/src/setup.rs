//! Setup costs: how long a guest takes to attach (by path, and with a spawn ticket),
//! how long spawning a guest takes up to its first message, and how much of the
//! host's resident memory a fresh segment costs.

use std::io::Read;
use std::process::Stdio;
use std::time::{Duration, Instant};

use shmhub::{segment_path, Meta, SegmentConfig, ShmGuest, ShmHost, SlotClasses};

use crate::measure::{child_command, Hist, Plan, Stats, Watchdog, OP_TIMEOUT};
use crate::BenchResult;

const PATH_ENV: &str = "SHM_BENCH_ATTACH_PATH";
const COUNT_ENV: &str = "SHM_BENCH_ATTACH_COUNT";
const HELLO: u32 = 1;
const BYE: u32 = 2;

/// One timed setup step.
#[derive(Debug, Clone)]
pub struct SetupCost {
    /// What was timed.
    pub what: String,
    /// Its percentiles (ns).
    pub stats: Stats,
}

/// The host's memory around creating one segment.
#[derive(Debug, Clone)]
pub struct SegmentRss {
    /// The segment's configuration, in words.
    pub label: String,
    /// The segment's size (`SegmentLayout::total_size`), bytes.
    pub total_size: u64,
    /// `VmRSS` before and after `ShmHost::create`, KiB.
    pub rss_kib: (u64, u64),
    /// `RssShmem` (the shared-memory part of VmRSS) before and after, KiB.
    pub shmem_kib: (u64, u64),
    /// How much more of `/dev/shm` was in use after `ShmHost::create`, KiB
    /// (`statvfs`; other processes using `/dev/shm` meanwhile add noise).
    pub dev_shm_kib: i64,
    /// How long `ShmHost::create` took.
    pub create: Duration,
}

impl SegmentRss {
    /// VmRSS growth, KiB (negative if the process shrank meanwhile).
    pub fn delta_kib(&self) -> i64 {
        self.rss_kib.1 as i64 - self.rss_kib.0 as i64
    }
}

/// Host RSS after creating a 16 MiB and a 1 GiB segment (run first, while the
/// process is fresh, so earlier benchmarks' freed memory does not hide growth).
pub fn rss(out: &mut Vec<SegmentRss>) -> BenchResult<()> {
    let configs = [
        ("4 guests, 2 x 1 MiB slots per direction", 4, 2),
        ("16 guests, 32 x 1 MiB slots per direction", 16, 32),
    ];
    for (label, max_guests, slots) in configs {
        let config = SegmentConfig {
            max_guests,
            ring_capacity: 64,
            classes: SlotClasses::single(1 << 20, slots),
            broadcast_slots: 0,
            broadcast_slot_size: 0,
        };
        let total_size = config.layout()?.total_size;
        let path = segment_path(&format!("bench-rss-{}-{max_guests}", std::process::id()))?;
        let before = (status_kib("VmRSS")?, status_kib("RssShmem")?);
        let shm_before = dev_shm_used_kib()?;
        let t = Instant::now();
        let host = ShmHost::create(&path, config)?;
        let create = t.elapsed();
        let after = (status_kib("VmRSS")?, status_kib("RssShmem")?);
        let dev_shm_kib = dev_shm_used_kib()? - shm_before;
        drop(host);
        out.push(SegmentRss {
            label: label.into(),
            total_size,
            rss_kib: (before.0, after.0),
            shmem_kib: (before.1, after.1),
            dev_shm_kib,
            create,
        });
    }
    Ok(())
}

/// KiB in use on the `/dev/shm` file system.
fn dev_shm_used_kib() -> BenchResult<i64> {
    // SAFETY: statvfs is plain old data; all-zero is a valid value.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: the path is NUL-terminated and `st` is writable.
    if unsafe { libc::statvfs(c"/dev/shm".as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    let used = (st.f_blocks - st.f_bfree) as i64;
    Ok(used * st.f_frsize as i64 / 1024)
}

/// A field of `/proc/self/status`, in KiB.
fn status_kib(field: &str) -> BenchResult<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .ok_or_else(|| format!("no {field} in /proc/self/status").into())
}

/// Attach latencies: by path (a child attaches and detaches in a loop while this
/// host serves) and by spawn ticket (the host spawns guests one at a time).
pub fn attach(plan: Plan, cpu: Option<usize>, out: &mut Vec<SetupCost>) -> BenchResult<()> {
    let name = format!("bench-attach-{}", std::process::id());
    let config = SegmentConfig {
        max_guests: 255,
        ring_capacity: 64,
        classes: SlotClasses::single(4096, 4),
        broadcast_slots: 0,
        broadcast_slot_size: 0,
    };
    let path = segment_path(&name)?;
    let mut host = ShmHost::create(&path, config)?;
    let mut buf = Vec::new();

    let mut cmd = child_command("attach-path", cpu);
    cmd.env(PATH_ENV, &path)
        .env(COUNT_ENV, plan.attaches().to_string())
        .stdout(Stdio::piped());
    let mut child = cmd.spawn()?;
    let watchdog = Watchdog::arm(child.id(), Duration::from_secs(60));
    // Serve (accept doorbell connections, recycle entries) until the child is done.
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        let _ = host.recv(&mut buf, Duration::from_millis(2))?;
        host.maintain();
    };
    drop(watchdog);
    let mut text = String::new();
    child
        .stdout
        .take()
        .ok_or("no stdout")?
        .read_to_string(&mut text)?;
    if !status.success() {
        return Err(format!("attach child failed: {status}").into());
    }
    let mut by_path = Hist::new();
    for line in text.lines() {
        by_path.record(Duration::from_nanos(line.trim().parse()?));
    }
    out.push(SetupCost {
        what: "attach by path (guest: `ShmGuest::attach_path`)".into(),
        stats: by_path.stats(),
    });

    let (mut ticket, mut spawn) = (Hist::new(), Hist::new());
    for _ in 0..plan.spawns() {
        let t = Instant::now();
        let s = host.spawn(&mut child_command("attach-ticket", cpu))?;
        let _watchdog = Watchdog::arm(s.pid, Duration::from_secs(30));
        let r = host
            .recv(&mut buf, OP_TIMEOUT)?
            .ok_or("spawned guest did not say hello")?;
        let e = t.elapsed();
        if r.meta.msg_type != HELLO || buf.len() != 8 {
            return Err("bad hello from a spawned guest".into());
        }
        spawn.record(e);
        let ns = u64::from_le_bytes(buf[..8].try_into().expect("8 bytes"));
        ticket.record(Duration::from_nanos(ns));
        host.send(s.handle, Meta::new(BYE, 0), &[], OP_TIMEOUT)?;
    }
    out.push(SetupCost {
        what: "attach by spawn ticket (guest: `ShmGuest::from_env`)".into(),
        stats: ticket.stats(),
    });
    out.push(SetupCost {
        what: "spawn to first message (host: `ShmHost::spawn` .. `recv`)".into(),
        stats: spawn.stats(),
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while !host.attached_peers().is_empty() && Instant::now() < deadline {
        let _ = host.recv(&mut buf, Duration::from_millis(10));
        host.maintain();
    }
    Ok(())
}

/// Attaches by path and detaches, again and again, printing each attach's ns.
pub fn attach_path_child() -> BenchResult<()> {
    let path = std::env::var(PATH_ENV)?;
    let count: u64 = std::env::var(COUNT_ENV)?.parse()?;
    let mut lines = String::new();
    for _ in 0..count {
        let t = Instant::now();
        let g = ShmGuest::attach_path(&path)?;
        let e = t.elapsed();
        g.detach();
        lines.push_str(&format!("{}\n", e.as_nanos()));
    }
    print!("{lines}");
    Ok(())
}

/// Attaches with the spawn ticket, reports how long that took, and leaves on `BYE`.
pub fn attach_ticket_child() -> BenchResult<()> {
    let mut g = ShmGuest::from_env()?;
    let ns = g.attach_report().elapsed.as_nanos() as u64;
    g.send(Meta::new(HELLO, 0), &ns.to_le_bytes(), OP_TIMEOUT)?;
    let mut buf = Vec::new();
    match g.recv(&mut buf, OP_TIMEOUT)? {
        Some(m) if m.msg_type == BYE => {}
        _ => return Err("no bye from the host".into()),
    }
    g.detach();
    Ok(())
}
