//! iceoryx2 as a peer library: publish-subscribe ping-pong between this process and
//! a re-executed child, the way iceoryx2's own latency benchmark does it (one
//! service each way, history 0, a subscriber buffer of 1, samples loaned and sent
//! zero-copy). Spin: both sides poll `receive()`. Block: after each send the sender
//! notifies an event service and the receiver sleeps in `Listener::timed_wait`
//! (iceoryx2's blocking wait; a Unix datagram socket underneath).
//!
//! Untouched: only the 8-byte sequence header is written and read. Touched: the
//! sender fills every byte of the loaned sample and the receiver reads every byte of
//! the received one, in place, as shmhub's `loan` rows and `raw-echo` do.

use std::time::{Duration, Instant};

use iceoryx2::port::listener::Listener;
use iceoryx2::port::notifier::Notifier;
use iceoryx2::port::publisher::Publisher;
use iceoryx2::port::subscriber::Subscriber;
use iceoryx2::prelude::*;
use iceoryx2::sample::Sample;

use crate::measure::{child_command, touch, Hist, Plan, SpinDeadline, Watchdog, OP_TIMEOUT};
use crate::report::Row;
use crate::BenchResult;

/// The iceoryx2 version this crate is built against (pinned exactly in Cargo.toml).
pub const VERSION: &str = "0.10.0";

const TAG_ENV: &str = "SHM_BENCH_IOX2_TAG";
const MAX_ENV: &str = "SHM_BENCH_IOX2_MAX";

/// Header flags (the first 8 bytes of every sample are the sequence number and these).
const QUIT: u64 = 1 << 63;
const TOUCH: u64 = 1 << 62;
/// A control sample: switch to blocking (bit 0 set) or spinning, then answer.
const MODE: u64 = 1 << 61;
const READY: u64 = 1 << 60;

type Pub = Publisher<ipc::Service, [u8], ()>;
type Sub = Subscriber<ipc::Service, [u8], ()>;

/// One side's ports: data out and in, and the events that say "data is there".
struct Ports {
    publisher: Pub,
    subscriber: Sub,
    notifier: Notifier<ipc::Service>,
    listener: Listener<ipc::Service>,
    block: bool,
}

impl Ports {
    /// Opens (or creates) the four services of `tag`: the parent sends on `a2b` and
    /// receives on `b2a`, the child the other way round.
    fn open(node: &Node<ipc::Service>, tag: &str, parent: bool, max: usize) -> BenchResult<Self> {
        let (out, inn) = if parent {
            ("a2b", "b2a")
        } else {
            ("b2a", "a2b")
        };
        let data = |dir: &str| -> BenchResult<_> {
            let name = ServiceName::new(&format!("{tag}/data/{dir}"))?;
            Ok(node
                .service_builder(&name)
                .publish_subscribe::<[u8]>()
                .max_publishers(1)
                .max_subscribers(1)
                .history_size(0)
                .subscriber_max_buffer_size(1)
                .enable_safe_overflow(true)
                .open_or_create()?)
        };
        let event = |dir: &str| -> BenchResult<_> {
            let name = ServiceName::new(&format!("{tag}/event/{dir}"))?;
            Ok(node
                .service_builder(&name)
                .event()
                .max_notifiers(1)
                .max_listeners(1)
                .open_or_create()?)
        };
        Ok(Self {
            publisher: data(out)?
                .publisher_builder()
                .initial_max_slice_len(max)
                .create()?,
            subscriber: data(inn)?.subscriber_builder().create()?,
            notifier: event(out)?.notifier_builder().create()?,
            listener: event(inn)?.listener_builder().create()?,
            block: false,
        })
    }

    /// Sends `len` bytes headed by `head`; touched: every byte filled.
    fn send(&self, head: u64, len: usize) -> BenchResult<()> {
        let loan = self.publisher.loan_slice_uninit(len.max(8))?;
        let mut sample = if head & TOUCH != 0 {
            loan.write_from_fn(|_| head as u8)
        } else {
            // SAFETY: the sample is in a shared-memory mapping whose bytes are always
            // initialised (zeroed by the kernel when mapped, or written by an earlier
            // sample); untouched means only the header is written.
            unsafe { loan.assume_init() }
        };
        sample.payload_mut()[..8].copy_from_slice(&head.to_le_bytes());
        sample.send()?;
        if self.block {
            self.notifier.notify()?;
        }
        Ok(())
    }

    /// Waits for the next sample: polling (spin) or asleep on the listener (block).
    fn recv(&self) -> BenchResult<Sample<ipc::Service, [u8], ()>> {
        let mut dl = SpinDeadline::new(OP_TIMEOUT);
        let deadline = Instant::now() + OP_TIMEOUT;
        loop {
            if let Some(s) = self.subscriber.receive()? {
                return Ok(s);
            }
            if self.block {
                if Instant::now() >= deadline {
                    return Err("iceoryx2 peer did not answer within 10 s".into());
                }
                self.listener.timed_wait(|_| {}, OP_TIMEOUT)?;
            } else if dl.expired() {
                return Err("iceoryx2 peer did not answer within 10 s".into());
            } else {
                std::hint::spin_loop();
            }
        }
    }
}

fn head_of(sample: &Sample<ipc::Service, [u8], ()>) -> u64 {
    let p = sample.payload();
    p.get(..8)
        .map_or(QUIT, |h| u64::from_le_bytes(h.try_into().expect("8 bytes")))
}

fn node() -> BenchResult<Node<ipc::Service>> {
    set_log_level(LogLevel::Error);
    Ok(NodeBuilder::new()
        .signal_handling_mode(SignalHandlingMode::Disabled)
        .create::<ipc::Service>()?)
}

/// iceoryx2 round trips: spin at every size, block at the wait sizes, untouched and
/// touched.
pub fn run(plan: Plan, cpu: Option<usize>, rows: &mut Vec<Row>) -> BenchResult<()> {
    let tag = format!("shm-bench-{}", std::process::id());
    let max = plan.sizes().iter().copied().max().unwrap_or(8);
    let node = node()?;
    let mut ports = Ports::open(&node, &tag, true, max)?;
    let mut cmd = child_command("iceoryx2", cpu);
    cmd.env(TAG_ENV, &tag).env(MAX_ENV, max.to_string());
    let mut child = cmd.spawn()?;
    let _watchdog = Watchdog::arm(child.id(), Duration::from_secs(300));
    let result = measure(plan, &mut ports, rows);
    // Tell the child to quit whatever happened; it gives up by itself otherwise.
    let _ = ports.send(QUIT, 8);
    let status = child.wait()?;
    result?;
    if !status.success() {
        return Err(format!("iceoryx2 child failed: {status}").into());
    }
    Ok(())
}

fn measure(plan: Plan, ports: &mut Ports, rows: &mut Vec<Row>) -> BenchResult<()> {
    let ready = ports.recv()?;
    if head_of(&ready) & READY == 0 {
        return Err("iceoryx2 child did not say ready".into());
    }
    drop(ready);
    let mut n = 0u64;
    for (mode, block) in [("spin", false), ("block", true)] {
        // Switch both sides: the control sample and its answer travel in the old
        // mode, and each side switches once it is through.
        ports.send(MODE | u64::from(block), 8)?;
        drop(ports.recv()?);
        ports.block = block;
        let sizes = if block {
            plan.wait_sizes()
        } else {
            plan.sizes()
        };
        for &size in sizes {
            for touched in [false, true] {
                let mut h = Hist::new();
                let warm = plan.warmup(size);
                for i in 0..warm + plan.iters(size) {
                    n += 1;
                    let head = n | if touched { TOUCH } else { 0 };
                    let t = Instant::now();
                    ports.send(head, size)?;
                    let reply = ports.recv()?;
                    if touched {
                        touch(reply.payload());
                    }
                    let ok = head_of(&reply) == head && reply.payload().len() == size;
                    drop(reply);
                    let e = t.elapsed();
                    if !ok {
                        return Err(format!("iceoryx2: bad echo for {n}").into());
                    }
                    if i >= warm {
                        h.record(e);
                    }
                }
                let api = "loan/receive";
                rows.push(Row::new("iceoryx2", api, size, mode, touched, h.stats()));
            }
        }
    }
    Ok(())
}

/// The iceoryx2 child: echoes every sample (same size, same header) until `QUIT`.
pub fn child() -> BenchResult<()> {
    let tag = std::env::var(TAG_ENV)?;
    let max: usize = std::env::var(MAX_ENV)?.parse()?;
    let node = node()?;
    let mut ports = Ports::open(&node, &tag, false, max)?;
    // The parent's subscriber exists before we start, so this sample reaches it; our
    // subscriber exists before we send it, so the parent's next sample reaches us.
    ports.send(READY, 8)?;
    loop {
        let s = ports.recv()?;
        let head = head_of(&s);
        let len = s.payload().len();
        if head & QUIT != 0 {
            return Ok(());
        }
        if head & TOUCH != 0 {
            touch(s.payload());
        }
        drop(s);
        ports.send(head, len)?;
        if head & MODE != 0 {
            ports.block = head & 1 != 0;
        }
    }
}
