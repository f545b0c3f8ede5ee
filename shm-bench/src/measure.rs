//! Latency histograms, iteration counts and the watchdog that bounds every child.

use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

/// How long any single wait may take before the bench gives up.
pub const OP_TIMEOUT: Duration = Duration::from_secs(10);

/// Percentiles of one measurement, in nanoseconds.
#[derive(Debug, Clone, Copy)]
pub struct Stats {
    /// Median.
    pub p50: u64,
    /// 90th percentile.
    pub p90: u64,
    /// 99th percentile.
    pub p99: u64,
    /// 99.9th percentile.
    pub p999: u64,
    /// Largest sample.
    pub max: u64,
    /// Number of samples.
    pub count: u64,
}

/// A nanosecond histogram from 1 ns to 60 s, 3 significant digits.
pub struct Hist(Histogram<u64>);

impl Hist {
    /// An empty histogram.
    pub fn new() -> Self {
        Self(Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("valid bounds"))
    }

    /// Records one duration (saturated into the histogram's range).
    pub fn record(&mut self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.0.saturating_record(ns.max(1));
    }

    /// The percentiles.
    pub fn stats(&self) -> Stats {
        let h = &self.0;
        Stats {
            p50: h.value_at_quantile(0.50),
            p90: h.value_at_quantile(0.90),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
            count: h.len(),
        }
    }
}

/// Iteration counts for one run.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    /// Reduced set.
    pub quick: bool,
}

/// The largest payload any round trip uses (16 MiB).
pub const MAX_SIZE: usize = 16 << 20;

impl Plan {
    /// Payload sizes for spin round trips (every baseline that has a size uses these).
    pub fn sizes(&self) -> &'static [usize] {
        if self.quick {
            &[8, 4096, 1 << 20, MAX_SIZE]
        } else {
            &[8, 64, 256, 1024, 4096, 64 * 1024, 1 << 20, MAX_SIZE]
        }
    }

    /// Sizes for block and adaptive round trips.
    pub fn wait_sizes(&self) -> &'static [usize] {
        &[8, 4096]
    }

    /// Measured iterations for a payload size.
    pub fn iters(&self, size: usize) -> u64 {
        let (full, quick) = match size {
            s if s <= 4096 => (20_000, 2_000),
            s if s <= 64 * 1024 => (5_000, 500),
            s if s <= 1 << 20 => (500, 100),
            _ => (30, 5),
        };
        if self.quick {
            quick
        } else {
            full
        }
    }

    /// Warm-up iterations before measuring.
    pub fn warmup(&self, size: usize) -> u64 {
        (self.iters(size) / 5).clamp(5, 1_000)
    }

    /// Messages for one-way throughput.
    pub fn stream_msgs(&self, size: usize) -> u64 {
        match (size <= 4096, self.quick) {
            (true, false) => 1_000_000,
            (true, true) => 50_000,
            (false, false) => 5_000,
            (false, true) => 200,
        }
    }

    /// Guest counts for the scaling run.
    pub fn guest_counts(&self) -> &'static [usize] {
        if self.quick {
            &[1, 4, 16]
        } else {
            &[1, 4, 16, 64, 255]
        }
    }

    /// Round trips each of `guests` guests makes in the scaling run: the total is
    /// about the same for every count, with a floor per guest.
    pub fn scale_round_trips(&self, guests: usize) -> u64 {
        let (total, floor) = if self.quick {
            (4_000, 50)
        } else {
            (20_000, 100)
        };
        (total / guests as u64).max(floor)
    }

    /// Guest attaches timed for the setup costs.
    pub fn attaches(&self) -> u64 {
        if self.quick {
            50
        } else {
            200
        }
    }

    /// Guests spawned (each attaching with a ticket) for the setup costs.
    pub fn spawns(&self) -> u64 {
        if self.quick {
            10
        } else {
            50
        }
    }
}

/// Kills processes still running when their budget runs out. Blocks on a channel
/// (no periodic wake-ups); dropping the guard disarms it.
pub struct Watchdog {
    done: Option<mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watchdog {
    /// Arms a watchdog for `pid`.
    pub fn arm(pid: u32, budget: Duration) -> Self {
        Self::arm_all(vec![pid], budget)
    }

    /// Arms one watchdog for every process in `pids`.
    pub fn arm_all(pids: Vec<u32>, budget: Duration) -> Self {
        let (tx, rx) = mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            if let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(budget) {
                for pid in pids {
                    eprintln!("shm-bench: child {pid} over its {budget:?} budget, killing it");
                    let Ok(pid) = libc::pid_t::try_from(pid) else {
                        continue;
                    };
                    // SAFETY: kill has no memory-safety preconditions.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        });
        Self {
            done: Some(tx),
            thread: Some(thread),
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        drop(self.done.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A command that re-executes this binary as a child with `role`, pinned to `cpu`
/// (or free to run on any CPU when `None`).
pub fn child_command(role: &str, cpu: Option<usize>) -> Command {
    let exe = std::env::current_exe().expect("current_exe");
    let mut cmd = Command::new(exe);
    cmd.env(crate::child::ROLE_ENV, role);
    let cpu = cpu.map_or_else(|| crate::child::ANY_CPU.to_string(), |c| c.to_string());
    cmd.env(crate::child::CPU_ENV, cpu);
    cmd
}

/// A deadline check for spin loops: reads the clock every 4096 calls.
pub struct SpinDeadline {
    deadline: Instant,
    n: u32,
}

impl SpinDeadline {
    /// A deadline `timeout` from now.
    pub fn new(timeout: Duration) -> Self {
        Self {
            deadline: Instant::now() + timeout,
            n: 0,
        }
    }

    /// True once the deadline has passed (checked every 4096 calls).
    #[inline]
    pub fn expired(&mut self) -> bool {
        self.n = self.n.wrapping_add(1);
        self.n.is_multiple_of(4096) && Instant::now() >= self.deadline
    }
}

/// Fills `buf` with a value that changes each iteration.
#[inline]
pub fn fill(buf: &mut [u8], n: u64) {
    buf.fill(n as u8);
}

/// Reads every byte of `buf` (a sum the optimizer cannot drop).
#[inline]
pub fn touch(buf: &[u8]) -> u64 {
    let s = buf.chunks(8).fold(0u64, |acc, c| {
        acc.wrapping_add(c.iter().map(|&b| u64::from(b)).sum())
    });
    std::hint::black_box(s)
}
