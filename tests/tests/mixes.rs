//! Random mixes of every way to move a payload, checked against a model.
//!
//! A mix is a script of operations by the host and by one guest: sends by copy
//! (non-blocking or blocking) or by loan, loans dropped unsent (or sent past their
//! capacity), receives by copy or by view (non-blocking or blocking), views held and
//! dropped later in any order, and guest echoes of what it holds. Sizes run from 0 to
//! past the largest slot class, weighted on the edges (36/37, each class size and its
//! neighbours). Every script is first resolved against a model of the rings and pools
//! (`resolve`), which predicts the exact outcome of each step: inline, the slot class
//! (smallest fit, then fall-through), `TooLarge`, ring full, pool exhausted, a blocking
//! send timing out, or nothing to receive.
//!
//! Host and guest run the same resolved script in lockstep: the host runs its steps,
//! then hands the turn to the guest (a line on the child's stdin, or a channel for the
//! in-process guest), which runs its steps and hands it back. So the state at every
//! turn is exact, and after every step the host compares every slot word of both
//! directions (by class and state) and both ring depths with the model. Every payload
//! is derived from (seq, len) and compared byte for byte on receipt and again when a
//! held view is dropped. At the end both rings are empty and every slot is Free.

use std::collections::{BTreeSet, VecDeque};
use std::fmt;
use std::panic::AssertUnwindSafe;
use std::sync::mpsc;
use std::time::Duration;

use proptest::prelude::*;
use proptest::test_runner::{Config as PropConfig, TestCaseError, TestRunner};
use shm_guest::{AttachOptions, ShmGuest};
use shm_host::{
    Direction, Message, Meta, PeerId, SegmentConfig, ShmHost, SlotClass, SlotClasses,
    INLINE_CAPACITY,
};
use shm_primitives::view::SlotBytes;
use shm_primitives::Segment;
use shmhub_tests::{
    arg, hear, pattern, poll_until, role, slot_states, tell, watch_segment, watchdog, Proc,
    ShmPath, SlotStates,
};

const LONG: Duration = Duration::from_secs(20);
/// How long a blocking send waits when the model says it cannot succeed.
const SHORT: Duration = Duration::from_millis(2);
/// The timeout of a blocking call the model says succeeds. In lockstep the message or
/// the room is there already, so it returns at once; this bounds only a failure.
const PROMPT: Duration = Duration::from_secs(2);
/// Every payload is `pattern(SEED, src, len)`: `src` is the seq of the message whose
/// bytes it carries (itself, or the one a guest echoes).
const SEED: u64 = 0x006d_6978_6573;
const ROLE: &str = "mix-guest";
const CROSS: &str = "random_mixes_across_two_processes_deliver_every_byte_and_free_every_slot";

// ---------------------------------------------------------------------------------
// Payloads beyond the largest slot class.

/// **The one place that says what a payload beyond the largest slot class does.**
///
/// Large payloads travel by memfd (`shm.msg.large`): a copying send beyond the largest
/// class is delivered out of band (one ring descriptor, no pool slot, the exact bytes
/// at the receiver), while loans beyond the largest class are `TooLarge { len, max }`
/// (max = the largest class) with nothing allocated or published. With this `false`
/// the model expects every send beyond the largest class to be `TooLarge` (the
/// behaviour before the large-payload path).
const LARGE_PAYLOADS_DELIVERED: bool = true;

fn beyond_largest(lane: &Lane, geo: &Geometry, len: usize, loan: bool) -> Outcome {
    if LARGE_PAYLOADS_DELIVERED && !loan {
        if lane.ring.len() >= geo.ring() {
            return Outcome::Refused(Refusal::RingFull);
        }
        return Outcome::Sent(Carrier::OutOfBand);
    }
    Outcome::Refused(Refusal::TooLarge {
        len,
        max: geo.largest(),
    })
}

// ---------------------------------------------------------------------------------
// Segment shapes.

#[derive(Debug, Clone, Copy)]
struct Geometry {
    name: &'static str,
    config: SegmentConfig,
}

fn geometries() -> [Geometry; 3] {
    let base = SegmentConfig {
        max_guests: 1,
        ..SegmentConfig::default()
    };
    [
        // Small enough that rings fill, pools run dry and payloads fall through.
        Geometry {
            name: "tight",
            config: SegmentConfig {
                ring_capacity: 8,
                classes: SlotClasses::new(&[
                    SlotClass::new(64, 2),
                    SlotClass::new(256, 3),
                    SlotClass::new(1024, 1),
                ]),
                ..base
            },
        },
        Geometry {
            name: "one-class",
            config: SegmentConfig {
                ring_capacity: 4,
                classes: SlotClasses::new(&[SlotClass::new(128, 2)]),
                ..base
            },
        },
        // The default classes (1 KiB x 16, 16 KiB x 4, 128 KiB x 1, rings of 64).
        Geometry {
            name: "default",
            config: base,
        },
    ]
}

impl Geometry {
    fn classes(&self) -> &[SlotClass] {
        self.config.classes.as_slice()
    }

    fn class_size(&self, class: usize) -> usize {
        self.classes()[class].size as usize
    }

    fn largest(&self) -> usize {
        self.config.classes.largest() as usize
    }

    fn ring(&self) -> usize {
        self.config.ring_capacity as usize
    }

    /// Sizes on the edges: empty, inline/slot, each class and its neighbours, and one
    /// past the largest.
    fn edges(&self) -> Vec<usize> {
        let mut edges = BTreeSet::from([0, 1, 35, 36, 37, 38]);
        for c in self.classes() {
            let s = c.size as usize;
            edges.extend([s - 1, s, s + 1]);
        }
        edges.insert(self.largest() + 1);
        edges.into_iter().collect()
    }

    fn size(&self, size: Size) -> usize {
        match size {
            Size::Edge(k) => {
                let edges = self.edges();
                edges[k as usize % edges.len()]
            }
            Size::Any(n) => n as usize % (self.largest() + 1),
            Size::Beyond(n) => self.largest() + 1 + n as usize % self.largest(),
        }
    }
}

// ---------------------------------------------------------------------------------
// Scripts as generated (what proptest shrinks).

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Host,
    Guest,
}

impl Side {
    fn other(self) -> Side {
        match self {
            Side::Host => Side::Guest,
            Side::Guest => Side::Host,
        }
    }

    fn index(self) -> usize {
        self as usize
    }

    fn msg_type(self) -> u32 {
        match self {
            Side::Host => 1,
            Side::Guest => 2,
        }
    }
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Side::Host => "host ",
            Side::Guest => "guest",
        })
    }
}

/// A payload size, resolved against the geometry (`Geometry::size`).
#[derive(Debug, Clone, Copy)]
enum Size {
    /// One of `Geometry::edges`.
    Edge(u8),
    /// Anything from 0 to the largest class.
    Any(u32),
    /// Past the largest class.
    Beyond(u16),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SendHow {
    Copy,
    /// The blocking `send` (with a timeout).
    Blocking,
    /// A loan of the payload plus this many bytes, written in place and sent.
    Loan(u8),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RecvHow {
    Copy,
    BlockingCopy,
    View,
    BlockingView,
}

impl RecvHow {
    fn is_view(self) -> bool {
        matches!(self, RecvHow::View | RecvHow::BlockingView)
    }

    fn is_blocking(self) -> bool {
        matches!(self, RecvHow::BlockingCopy | RecvHow::BlockingView)
    }
}

#[derive(Debug, Clone, Copy)]
enum Op {
    /// A send; with `Some(pick)` it echoes a message the side holds, if it holds any.
    Send(Side, Size, SendHow, Option<u8>),
    /// A loan written and then dropped unsent (`true`: sent past its capacity).
    LoanDrop(Side, Size, bool),
    Recv(Side, RecvHow),
    /// Drops one of the side's held views.
    Drop(Side, u8),
}

/// One generated case: a geometry (index into `geometries`) and the operations.
#[derive(Clone)]
struct Mix {
    geometry: usize,
    ops: Vec<Op>,
}

impl Mix {
    fn geometry(&self) -> Geometry {
        geometries()[self.geometry]
    }

    fn script(&self) -> Script {
        resolve(&self.geometry(), &self.ops)
    }
}

/// What proptest prints for a failing case: the geometry and the resolved script, one
/// numbered step a line (the numbers the failure message names).
impl fmt::Debug for Mix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let geo = self.geometry();
        writeln!(
            f,
            "Mix {} (ring {}, classes {:?}), {} ops:",
            geo.name,
            geo.ring(),
            geo.classes()
                .iter()
                .map(|c| format!("{}x{}", c.size, c.count))
                .collect::<Vec<_>>(),
            self.ops.len()
        )?;
        for (i, (step, _)) in self.script().steps.iter().enumerate() {
            writeln!(f, "  {i:3} {step}")?;
        }
        Ok(())
    }
}

fn size_strategy() -> impl Strategy<Value = Size> {
    prop_oneof![
        6 => any::<u8>().prop_map(Size::Edge),
        3 => any::<u32>().prop_map(Size::Any),
        1 => any::<u16>().prop_map(Size::Beyond),
    ]
}

fn send_how() -> impl Strategy<Value = SendHow> {
    prop_oneof![
        Just(SendHow::Copy),
        Just(SendHow::Blocking),
        Just(SendHow::Loan(0)),
        (1u8..=64).prop_map(SendHow::Loan),
    ]
}

fn recv_how() -> impl Strategy<Value = RecvHow> {
    prop_oneof![
        1 => Just(RecvHow::Copy),
        1 => Just(RecvHow::BlockingCopy),
        2 => Just(RecvHow::View),
        1 => Just(RecvHow::BlockingView),
    ]
}

fn op_strategy() -> impl Strategy<Value = Op> {
    use Side::{Guest, Host};
    prop_oneof![
        5 => (size_strategy(), send_how()).prop_map(|(s, h)| Op::Send(Host, s, h, None)),
        4 => (size_strategy(), send_how(), any::<u8>())
            .prop_map(|(s, h, p)| Op::Send(Guest, s, h, Some(p))),
        1 => (size_strategy(), send_how()).prop_map(|(s, h)| Op::Send(Guest, s, h, None)),
        1 => (size_strategy(), any::<bool>()).prop_map(|(s, o)| Op::LoanDrop(Host, s, o)),
        1 => (size_strategy(), any::<bool>()).prop_map(|(s, o)| Op::LoanDrop(Guest, s, o)),
        5 => recv_how().prop_map(|h| Op::Recv(Guest, h)),
        4 => recv_how().prop_map(|h| Op::Recv(Host, h)),
        3 => any::<u8>().prop_map(|k| Op::Drop(Guest, k)),
        2 => any::<u8>().prop_map(|k| Op::Drop(Host, k)),
    ]
}

fn mix_strategy(max_ops: usize) -> impl Strategy<Value = Mix> {
    (
        0..geometries().len(),
        proptest::collection::vec(op_strategy(), 1..=max_ops),
    )
        .prop_map(|(geometry, ops)| Mix { geometry, ops })
}

// ---------------------------------------------------------------------------------
// Resolved scripts (what both sides run).

/// How a message travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Carrier {
    Inline,
    /// In a slot of this class.
    Slot(usize),
    /// Beyond the largest class, by the large-payload path (`LARGE_PAYLOADS_DELIVERED`).
    OutOfBand,
}

/// A message: its seq (`Meta::user_id`), the seq its bytes derive from, its length
/// and how it travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Msg {
    seq: u64,
    src: u64,
    len: usize,
    carrier: Carrier,
}

impl Msg {
    fn payload(&self) -> Vec<u8> {
        pattern(SEED, self.src, self.len)
    }
}

impl fmt::Display for Msg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.seq)?;
        if self.src != self.seq {
            write!(f, " (bytes of #{})", self.src)?;
        }
        write!(f, " {} B ", self.len)?;
        match self.carrier {
            Carrier::Inline => write!(f, "inline"),
            Carrier::Slot(c) => write!(f, "in class {c}"),
            Carrier::OutOfBand => write!(f, "out of band"),
        }
    }
}

/// Where a sender takes the bytes it sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Fresh,
    /// From its held view at this index (echo).
    View(usize),
    /// From the copy it received at this index (echo).
    Copy(usize),
}

/// A send that did not happen, as both APIs report it (nothing published).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Refusal {
    TooLarge {
        len: usize,
        max: usize,
    },
    RingFull,
    PoolExhausted,
    TimedOut,
    /// Anything else (never expected).
    Other(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    Sent(Carrier),
    Refused(Refusal),
}

#[derive(Debug, Clone)]
enum Step {
    Send {
        side: Side,
        msg: Msg,
        how: SendHow,
        source: Source,
        outcome: Outcome,
    },
    LoanDrop {
        side: Side,
        len: usize,
        oversend: bool,
        outcome: Outcome,
    },
    Recv {
        side: Side,
        how: RecvHow,
        expect: Option<Msg>,
    },
    Drop {
        side: Side,
        index: usize,
        msg: Msg,
    },
}

impl Step {
    fn side(&self) -> Side {
        match self {
            Step::Send { side, .. }
            | Step::LoanDrop { side, .. }
            | Step::Recv { side, .. }
            | Step::Drop { side, .. } => *side,
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Sent(Carrier::Inline) => write!(f, "inline"),
            Outcome::Sent(Carrier::Slot(c)) => write!(f, "slot of class {c}"),
            Outcome::Sent(Carrier::OutOfBand) => write!(f, "out of band"),
            Outcome::Refused(r) => write!(f, "refused {r:?}"),
        }
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Step::Send {
                side,
                msg,
                how,
                source,
                outcome,
            } => {
                write!(f, "{side} send #{} {} B ", msg.seq, msg.len)?;
                match source {
                    Source::Fresh => {}
                    Source::View(i) => write!(f, "(echo of #{} from view {i}) ", msg.src)?,
                    Source::Copy(i) => write!(f, "(echo of #{} from copy {i}) ", msg.src)?,
                }
                match how {
                    SendHow::Copy => write!(f, "by copy")?,
                    SendHow::Blocking => write!(f, "by blocking copy")?,
                    SendHow::Loan(extra) => write!(f, "by loan of {}", msg.len + *extra as usize)?,
                }
                write!(f, " -> {outcome}")
            }
            Step::LoanDrop {
                side,
                len,
                oversend,
                outcome,
            } => {
                let then = if *oversend {
                    "send past capacity"
                } else {
                    "drop"
                };
                write!(f, "{side} loan {len} B and {then} -> {outcome}")
            }
            Step::Recv { side, how, expect } => {
                write!(f, "{side} recv {how:?} -> ")?;
                match expect {
                    Some(m) => write!(f, "{m}"),
                    None => write!(f, "nothing"),
                }
            }
            Step::Drop { side, index, msg } => write!(f, "{side} drop view {index}: {msg}"),
        }
    }
}

/// The slot words of one direction and its ring depth, as the model predicts them or
/// as read from the segment.
#[derive(Clone, PartialEq, Eq)]
struct LaneState {
    depth: u64,
    classes: Vec<SlotStates>,
}

/// `depth D, [class: Free Loaned Sent Received (Invalid)]`.
impl fmt::Debug for LaneState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "depth {}, [", self.depth)?;
        for (c, s) in self.classes.iter().enumerate() {
            let sep = if c == 0 { "" } else { ", " };
            write!(
                f,
                "{sep}{c}: F{} L{} S{} R{}",
                s.free, s.loaned, s.sent, s.received
            )?;
            if s.invalid > 0 {
                write!(f, " I{}", s.invalid)?;
            }
        }
        write!(f, "]")
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct State {
    to_guest: LaneState,
    to_host: LaneState,
}

/// A resolved script: each step with the state after it, and the host's totals.
struct Script {
    geometry: Geometry,
    steps: Vec<(Step, State)>,
    host_sent: u64,
    host_received: u64,
}

/// One direction in the model: free slots per class, published messages not yet taken.
struct Lane {
    free: Vec<u32>,
    ring: VecDeque<Msg>,
}

/// What one side holds: views (in order) and the copies it received.
#[derive(Default)]
struct Holdings {
    views: Vec<Msg>,
    copies: Vec<Msg>,
}

struct Model {
    geo: Geometry,
    /// Indexed by the sending side: 0 is ToGuest, 1 is ToHost.
    lanes: [Lane; 2],
    /// Indexed by side.
    holdings: [Holdings; 2],
    next_seq: u64,
    script: Vec<(Step, State)>,
    host_sent: u64,
    host_received: u64,
}

impl Model {
    fn new(geo: &Geometry) -> Self {
        let lane = || Lane {
            free: geo.classes().iter().map(|c| c.count).collect(),
            ring: VecDeque::new(),
        };
        Self {
            geo: *geo,
            lanes: [lane(), lane()],
            holdings: Default::default(),
            next_seq: 0,
            script: Vec::new(),
            host_sent: 0,
            host_received: 0,
        }
    }

    fn state(&self) -> State {
        let lane = |sender: Side| {
            let lane = &self.lanes[sender.index()];
            let views = &self.holdings[sender.other().index()].views;
            let classes = (0..self.geo.classes().len())
                .map(|c| SlotStates {
                    free: lane.free[c],
                    sent: lane
                        .ring
                        .iter()
                        .filter(|m| m.carrier == Carrier::Slot(c))
                        .count() as u32,
                    received: views
                        .iter()
                        .filter(|m| m.carrier == Carrier::Slot(c))
                        .count() as u32,
                    ..SlotStates::default()
                })
                .collect();
            LaneState {
                depth: lane.ring.len() as u64,
                classes,
            }
        };
        State {
            to_guest: lane(Side::Host),
            to_host: lane(Side::Guest),
        }
    }

    fn push(&mut self, step: Step) {
        let state = self.state();
        self.script.push((step, state));
    }

    /// The outcome of a send of `len` bytes (a loan of `loan` bytes, for a loan) by
    /// `side`, as `shm.msg.inline`, `shm.msg.slot`, `shm.slot.classes`,
    /// `shm.slot.exhausted` and `shm.ring.full` say.
    fn plan(&self, side: Side, len: usize, loan: Option<usize>) -> Outcome {
        let lane = &self.lanes[side.index()];
        let need = loan.unwrap_or(len);
        if need > self.geo.largest() {
            return beyond_largest(lane, &self.geo, need, loan.is_some());
        }
        if lane.ring.len() >= self.geo.ring() {
            return Outcome::Refused(Refusal::RingFull);
        }
        if loan.is_none() && len <= INLINE_CAPACITY {
            return Outcome::Sent(Carrier::Inline);
        }
        let first = self
            .geo
            .classes()
            .iter()
            .position(|c| c.size as usize >= need)
            .expect("need fits the largest class");
        match (first..lane.free.len()).find(|&c| lane.free[c] > 0) {
            Some(c) => Outcome::Sent(Carrier::Slot(c)),
            None => Outcome::Refused(Refusal::PoolExhausted),
        }
    }

    fn apply(&mut self, op: Op) {
        match op {
            Op::Send(side, size, how, echo) => self.send(side, size, how, echo),
            Op::LoanDrop(side, size, oversend) => {
                let len = self.geo.size(size);
                let outcome = self.plan(side, len, Some(len));
                self.push(Step::LoanDrop {
                    side,
                    len,
                    oversend,
                    outcome,
                });
            }
            Op::Recv(side, how) => self.recv(side, how),
            Op::Drop(side, pick) => {
                let n = self.holdings[side.index()].views.len();
                if n > 0 {
                    self.drop_view(side, pick as usize % n);
                }
            }
        }
    }

    fn send(&mut self, side: Side, size: Size, how: SendHow, echo: Option<u8>) {
        let seq = self.next_seq;
        self.next_seq += 1;
        let wanted = self.geo.size(size);
        let held = &self.holdings[side.index()];
        let sources = held.views.len() + held.copies.len();
        let (src, len, source) = match echo {
            Some(pick) if sources > 0 && wanted <= self.geo.largest() => {
                let k = pick as usize % sources;
                let (from, source) = match k.checked_sub(held.views.len()) {
                    None => (held.views[k], Source::View(k)),
                    Some(i) => (held.copies[i], Source::Copy(i)),
                };
                (from.src, wanted.min(from.len), source)
            }
            _ => (seq, wanted, Source::Fresh),
        };
        let loan = match how {
            SendHow::Loan(extra) => Some(len + extra as usize),
            _ => None,
        };
        let mut outcome = self.plan(side, len, loan);
        if how == SendHow::Blocking
            && matches!(
                outcome,
                Outcome::Refused(Refusal::RingFull | Refusal::PoolExhausted)
            )
        {
            outcome = Outcome::Refused(Refusal::TimedOut);
        }
        let carrier = match outcome {
            Outcome::Sent(carrier) => carrier,
            Outcome::Refused(_) => Carrier::Inline,
        };
        let msg = Msg {
            seq,
            src,
            len,
            carrier,
        };
        if matches!(outcome, Outcome::Sent(_)) {
            let lane = &mut self.lanes[side.index()];
            if let Carrier::Slot(c) = carrier {
                lane.free[c] -= 1;
            }
            lane.ring.push_back(msg);
            if side == Side::Host {
                self.host_sent += 1;
            }
        }
        self.push(Step::Send {
            side,
            msg,
            how,
            source,
            outcome,
        });
    }

    fn recv(&mut self, side: Side, how: RecvHow) {
        let lane = &mut self.lanes[side.other().index()];
        let expect = lane.ring.pop_front();
        if let Some(msg) = expect {
            let held = &mut self.holdings[side.index()];
            if how.is_view() {
                held.views.push(msg);
            } else {
                if let Carrier::Slot(c) = msg.carrier {
                    lane.free[c] += 1;
                }
                held.copies.push(msg);
            }
            if side == Side::Host {
                self.host_received += 1;
            }
        }
        self.push(Step::Recv { side, how, expect });
    }

    fn drop_view(&mut self, side: Side, index: usize) {
        let msg = self.holdings[side.index()].views.remove(index);
        if let Carrier::Slot(c) = msg.carrier {
            self.lanes[side.other().index()].free[c] += 1;
        }
        self.push(Step::Drop { side, index, msg });
    }

    /// Takes everything still in flight and drops every view.
    fn drain(&mut self) {
        while !self.lanes[Side::Guest.index()].ring.is_empty() {
            self.recv(Side::Host, RecvHow::Copy);
        }
        while !self.lanes[Side::Host.index()].ring.is_empty() {
            self.recv(Side::Guest, RecvHow::Copy);
        }
        for side in [Side::Guest, Side::Host] {
            while !self.holdings[side.index()].views.is_empty() {
                self.drop_view(side, 0);
            }
        }
    }
}

/// Resolves `ops` against the model: concrete steps with their expected outcomes and
/// the state after each, followed by a drain.
fn resolve(geo: &Geometry, ops: &[Op]) -> Script {
    let mut model = Model::new(geo);
    for &op in ops {
        model.apply(op);
    }
    model.drain();
    Script {
        geometry: *geo,
        steps: model.script,
        host_sent: model.host_sent,
        host_received: model.host_received,
    }
}

// ---------------------------------------------------------------------------------
// The interpreter both sides run.

/// What to do with a loan once written.
enum Then {
    Send(Meta, usize),
    Drop,
    /// Send it with one byte more than its capacity.
    Oversend,
}

/// The operations of one side, host or guest.
trait End {
    fn send(&mut self, meta: Meta, payload: &[u8], wait: Option<Duration>) -> Result<(), Refusal>;
    /// Loans `len` bytes, lets `write` fill the slot, then does `then`; the capacity
    /// and the result of `then`.
    fn loan(
        &mut self,
        len: usize,
        write: &mut dyn FnMut(&mut SlotBytes),
        then: Then,
    ) -> Result<(usize, Result<(), Refusal>), Refusal>;
    fn recv_copy(
        &mut self,
        buf: &mut Vec<u8>,
        wait: Option<Duration>,
    ) -> Result<Option<Meta>, String>;
    fn recv_view(&mut self, wait: Option<Duration>) -> Result<Option<Message>, String>;
}

struct HostEnd<'h> {
    host: &'h mut ShmHost,
    peer: PeerId,
}

fn host_refusal(peer: PeerId, e: shm_host::SendError) -> Refusal {
    use shm_host::SendError as E;
    match e {
        E::TooLarge { len, max } => Refusal::TooLarge { len, max },
        E::WouldBlockRing(p) if p == peer => Refusal::RingFull,
        E::WouldBlockPool(p) if p == peer => Refusal::PoolExhausted,
        E::TimedOut(p) if p == peer => Refusal::TimedOut,
        other => Refusal::Other(other.to_string()),
    }
}

impl HostEnd<'_> {
    fn of_our_peer(&self, r: shm_host::Received) -> Result<Meta, String> {
        if r.from != self.peer {
            return Err(format!("message from {}, expected {}", r.from, self.peer));
        }
        Ok(r.meta)
    }
}

impl End for HostEnd<'_> {
    fn send(&mut self, meta: Meta, payload: &[u8], wait: Option<Duration>) -> Result<(), Refusal> {
        let peer = self.peer;
        match wait {
            None => self.host.try_send(peer, meta, payload),
            Some(t) => self.host.send(peer, meta, payload, t),
        }
        .map_err(|e| host_refusal(peer, e))
    }

    fn loan(
        &mut self,
        len: usize,
        write: &mut dyn FnMut(&mut SlotBytes),
        then: Then,
    ) -> Result<(usize, Result<(), Refusal>), Refusal> {
        let peer = self.peer;
        let mut loan = self
            .host
            .loan(peer, len)
            .map_err(|e| host_refusal(peer, e))?;
        let capacity = loan.capacity();
        write(&mut loan);
        let after = match then {
            Then::Send(meta, n) => loan.send(meta, n),
            Then::Drop => {
                drop(loan);
                Ok(())
            }
            Then::Oversend => loan.send(Meta::new(0, 0), capacity + 1),
        };
        Ok((capacity, after.map_err(|e| host_refusal(peer, e))))
    }

    fn recv_copy(
        &mut self,
        buf: &mut Vec<u8>,
        wait: Option<Duration>,
    ) -> Result<Option<Meta>, String> {
        let got = match wait {
            None => self.host.try_recv(buf),
            Some(t) => self.host.recv(buf, t),
        }
        .map_err(|e| format!("host receive: {e}"))?;
        got.map(|r| self.of_our_peer(r)).transpose()
    }

    fn recv_view(&mut self, wait: Option<Duration>) -> Result<Option<Message>, String> {
        let got = match wait {
            None => self.host.try_recv_message(),
            Some(t) => self.host.recv_message(t),
        }
        .map_err(|e| format!("host receive: {e}"))?;
        got.map(|(r, m)| self.of_our_peer(r).map(|_| m)).transpose()
    }
}

struct GuestEnd {
    guest: ShmGuest,
}

fn guest_refusal(e: shm_guest::SendError) -> Refusal {
    use shm_guest::SendError as E;
    match e {
        E::TooLarge { len, max } => Refusal::TooLarge { len, max },
        E::WouldBlockRing => Refusal::RingFull,
        E::WouldBlockPool => Refusal::PoolExhausted,
        E::TimedOut => Refusal::TimedOut,
        other => Refusal::Other(other.to_string()),
    }
}

impl End for GuestEnd {
    fn send(&mut self, meta: Meta, payload: &[u8], wait: Option<Duration>) -> Result<(), Refusal> {
        match wait {
            None => self.guest.try_send(meta, payload),
            Some(t) => self.guest.send(meta, payload, t),
        }
        .map_err(guest_refusal)
    }

    fn loan(
        &mut self,
        len: usize,
        write: &mut dyn FnMut(&mut SlotBytes),
        then: Then,
    ) -> Result<(usize, Result<(), Refusal>), Refusal> {
        let mut loan = self.guest.loan(len).map_err(guest_refusal)?;
        let capacity = loan.capacity();
        write(&mut loan);
        let after = match then {
            Then::Send(meta, n) => loan.send(meta, n),
            Then::Drop => {
                drop(loan);
                Ok(())
            }
            Then::Oversend => loan.send(Meta::new(0, 0), capacity + 1),
        };
        Ok((capacity, after.map_err(guest_refusal)))
    }

    fn recv_copy(
        &mut self,
        buf: &mut Vec<u8>,
        wait: Option<Duration>,
    ) -> Result<Option<Meta>, String> {
        match wait {
            None => self.guest.try_recv(buf),
            Some(t) => self.guest.recv(buf, t),
        }
        .map_err(|e| format!("guest receive: {e}"))
    }

    fn recv_view(&mut self, wait: Option<Duration>) -> Result<Option<Message>, String> {
        match wait {
            None => self.guest.try_recv_message(),
            Some(t) => self.guest.recv_message(t),
        }
        .map_err(|e| format!("guest receive: {e}"))
    }
}

fn same(what: &str, got: &[u8], want: &[u8]) -> Result<(), String> {
    if got == want {
        return Ok(());
    }
    let at = got.iter().zip(want).position(|(a, b)| a != b);
    Err(format!(
        "{what}: {} bytes, expected {}; first differing byte at {at:?}",
        got.len(),
        want.len()
    ))
}

/// One side's state while it runs a script: what it holds, in the model's order.
struct Party {
    side: Side,
    class_sizes: Vec<usize>,
    views: Vec<(Msg, Message)>,
    copies: Vec<(Msg, Vec<u8>)>,
    buf: Vec<u8>,
}

impl Party {
    fn new(side: Side, geo: &Geometry) -> Self {
        Self {
            side,
            class_sizes: (0..geo.classes().len())
                .map(|c| geo.class_size(c))
                .collect(),
            views: Vec::new(),
            copies: Vec::new(),
            buf: Vec::new(),
        }
    }

    /// Runs `step`, which must be this side's, on `end`.
    fn run(&mut self, end: &mut dyn End, step: &Step) -> Result<(), String> {
        if step.side() != self.side {
            return Err(format!("not a step of the {}", self.side));
        }
        match step {
            Step::Send {
                msg,
                how,
                source,
                outcome,
                ..
            } => self.send(end, msg, *how, *source, outcome),
            Step::LoanDrop {
                len,
                oversend,
                outcome,
                ..
            } => self.loan_drop(end, *len, *oversend, outcome),
            Step::Recv { how, expect, .. } => self.recv(end, *how, expect.as_ref()),
            Step::Drop { index, msg, .. } => self.drop_view(*index, msg),
        }
    }

    fn send(
        &mut self,
        end: &mut dyn End,
        msg: &Msg,
        how: SendHow,
        source: Source,
        outcome: &Outcome,
    ) -> Result<(), String> {
        let meta = Meta::new(self.side.msg_type(), msg.seq);
        let Party {
            views,
            copies,
            class_sizes,
            ..
        } = self;
        // The source is the message the model says it is.
        let held = match source {
            Source::Fresh => None,
            Source::View(i) => Some(views.get(i).map(|v| v.0)),
            Source::Copy(i) => Some(copies.get(i).map(|c| c.0)),
        };
        if let Some(held) = held {
            match held {
                Some(m) if m.src == msg.src && m.len >= msg.len => {}
                other => return Err(format!("source {source:?} holds {other:?}")),
            }
        }
        match how {
            SendHow::Copy | SendHow::Blocking => {
                let payload = match source {
                    Source::Fresh => msg.payload(),
                    Source::View(i) => {
                        let mut v = vec![0; msg.len];
                        views[i].1.copy_to(0, &mut v);
                        v
                    }
                    Source::Copy(i) => copies[i].1[..msg.len].to_vec(),
                };
                let wait = match (how, outcome) {
                    (SendHow::Blocking, Outcome::Sent(_)) => Some(PROMPT),
                    (SendHow::Blocking, Outcome::Refused(_)) => Some(SHORT),
                    _ => None,
                };
                match (end.send(meta, &payload, wait), outcome) {
                    (Ok(()), Outcome::Sent(_)) => Ok(()),
                    (Err(r), Outcome::Refused(want)) if r == *want => Ok(()),
                    (got, want) => Err(format!("send returned {got:?}, expected {want}")),
                }
            }
            SendHow::Loan(extra) => {
                let loan_len = msg.len + extra as usize;
                let mut wrote = None;
                let mut write = |slot: &mut SlotBytes| {
                    wrote = Some(match source {
                        Source::Fresh => slot.write_at(0, &msg.payload()),
                        // Echo in place: from the held view straight into the loan.
                        Source::View(i) => {
                            // SAFETY: the receiver never touches a slot we hold Loaned.
                            let dst = unsafe { slot.as_mut_slice() };
                            msg.len <= dst.len() && views[i].1.copy_to(0, &mut dst[..msg.len])
                        }
                        Source::Copy(i) => slot.write_at(0, &copies[i].1[..msg.len]),
                    });
                };
                let got = end.loan(loan_len, &mut write, Then::Send(meta, msg.len));
                match (got, outcome) {
                    (Ok((capacity, sent)), Outcome::Sent(Carrier::Slot(c))) => {
                        if capacity != class_sizes[*c] {
                            return Err(format!(
                                "loan of {loan_len} has capacity {capacity}, expected class {c}"
                            ));
                        }
                        if wrote != Some(true) {
                            return Err(format!("writing the loan failed ({wrote:?})"));
                        }
                        sent.map_err(|r| format!("sending the loan: {r:?}"))
                    }
                    (Err(r), Outcome::Refused(want)) if r == *want => Ok(()),
                    (got, want) => Err(format!(
                        "loan of {loan_len} returned {:?}, expected {want}",
                        got.map(|(c, s)| (c, s.is_ok()))
                    )),
                }
            }
        }
    }

    fn loan_drop(
        &mut self,
        end: &mut dyn End,
        len: usize,
        oversend: bool,
        outcome: &Outcome,
    ) -> Result<(), String> {
        // Scribble over the whole slot: a slot also named by a message in flight or a
        // held view would show it when that one is checked.
        let mut filled = false;
        let mut write = |slot: &mut SlotBytes| {
            filled = slot.write_at(0, &vec![0xA5; slot.capacity()]);
        };
        let then = if oversend { Then::Oversend } else { Then::Drop };
        match (end.loan(len, &mut write, then), outcome) {
            (Ok((capacity, after)), Outcome::Sent(Carrier::Slot(c))) => {
                if capacity != self.class_sizes[*c] {
                    return Err(format!(
                        "loan of {len} has capacity {capacity}, expected class {c}"
                    ));
                }
                if !filled {
                    return Err("filling the loan failed".into());
                }
                let want = match oversend {
                    true => Err(Refusal::TooLarge {
                        len: capacity + 1,
                        max: capacity,
                    }),
                    false => Ok(()),
                };
                match after == want {
                    true => Ok(()),
                    false => Err(format!("then returned {after:?}, expected {want:?}")),
                }
            }
            (Err(r), Outcome::Refused(want)) if r == *want => Ok(()),
            (got, want) => Err(format!(
                "loan of {len} returned {:?}, expected {want}",
                got.map(|(c, s)| (c, s.is_ok()))
            )),
        }
    }

    fn recv(
        &mut self,
        end: &mut dyn End,
        how: RecvHow,
        expect: Option<&Msg>,
    ) -> Result<(), String> {
        let Some(msg) = expect else {
            // Nothing is in flight: the non-blocking receives say so.
            let got = match how.is_view() {
                true => end.recv_view(None)?.map(|m| m.meta()),
                false => end.recv_copy(&mut self.buf, None)?,
            };
            return match got {
                None => Ok(()),
                Some(meta) => Err(format!("received {meta:?}, expected nothing")),
            };
        };
        let wait = how.is_blocking().then_some(PROMPT);
        let want_meta = Meta::new(self.side.other().msg_type(), msg.seq);
        let want = msg.payload();
        if how.is_view() {
            let view = end
                .recv_view(wait)?
                .ok_or_else(|| format!("no message, expected {msg}"))?;
            if view.meta() != want_meta || view.len() != msg.len {
                return Err(format!(
                    "view of {:?}, {} B; expected {msg}",
                    view.meta(),
                    view.len()
                ));
            }
            let zero_copy = match msg.carrier {
                Carrier::Inline => Some(false),
                Carrier::Slot(_) => Some(true),
                Carrier::OutOfBand => None,
            };
            if zero_copy.is_some_and(|z| z != view.is_zero_copy()) {
                return Err(format!("view is_zero_copy {}", view.is_zero_copy()));
            }
            same("view copy", &view.to_vec(), &want)?;
            // SAFETY: an honest sender never writes a slot it has sent.
            same("view in place", unsafe { view.as_slice() }, &want)?;
            self.views.push((*msg, view));
        } else {
            let meta = end
                .recv_copy(&mut self.buf, wait)?
                .ok_or_else(|| format!("no message, expected {msg}"))?;
            if meta != want_meta {
                return Err(format!("received {meta:?}, expected {msg}"));
            }
            same("copy", &self.buf, &want)?;
            self.copies.push((*msg, self.buf.clone()));
        }
        Ok(())
    }

    fn drop_view(&mut self, index: usize, msg: &Msg) -> Result<(), String> {
        if index >= self.views.len() {
            return Err(format!("no view {index} (holding {})", self.views.len()));
        }
        let (held, view) = self.views.remove(index);
        if held != *msg {
            return Err(format!("view {index} is {held}"));
        }
        // Intact after everything that happened while it was held.
        same("held view", &view.to_vec(), &msg.payload())?;
        drop(view);
        Ok(())
    }
}

fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "a panic".into())
}

/// Runs step `k` on `end`, naming the step in any failure.
fn run_step(party: &mut Party, end: &mut dyn End, script: &Script, k: usize) -> Result<(), String> {
    let step = &script.steps[k].0;
    match std::panic::catch_unwind(AssertUnwindSafe(|| party.run(end, step))) {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("step {k} ({step}): {e}")),
        Err(p) => Err(format!("step {k} ({step}) panicked: {}", panic_text(&*p))),
    }
}

/// The guest's part of one turn: steps `from..to`.
fn follow(
    script: &Script,
    from: usize,
    to: usize,
    party: &mut Party,
    end: &mut dyn End,
) -> Result<(), String> {
    if from >= to || to > script.steps.len() {
        return Err(format!("bad turn {from}..{to}"));
    }
    (from..to).try_for_each(|k| run_step(party, end, script, k))
}

/// Hands the turn to the guest and waits for it to come back.
trait Baton {
    /// The guest runs steps `from..to`.
    fn guest_turn(&mut self, from: usize, to: usize) -> Result<(), String>;
}

/// Reads both directions' slot words and ring depths, and checks that `peer_usage`
/// agrees with the word counts.
fn observe(host: &ShmHost, peer: PeerId, watch: &Segment) -> Result<State, String> {
    let usage = host.peer_usage(peer).ok_or("no usage for the peer")?;
    let state = State {
        to_guest: LaneState {
            depth: usage.to_guest_depth,
            classes: slot_states(watch, peer, Direction::ToGuest),
        },
        to_host: LaneState {
            depth: usage.to_host_depth,
            classes: slot_states(watch, peer, Direction::ToHost),
        },
    };
    for (pool, lane) in [
        (usage.to_guest_slots, &state.to_guest),
        (usage.to_host_slots, &state.to_host),
    ] {
        let free: u32 = lane.classes.iter().map(|c| c.free).sum();
        let all: u32 = lane
            .classes
            .iter()
            .map(|c| c.free + c.loaned + c.sent + c.received + c.invalid)
            .sum();
        if (pool.free, pool.in_use) != (free, all - free) {
            return Err(format!("peer_usage {pool:?} disagrees with {lane:?}"));
        }
    }
    Ok(state)
}

/// Runs the host's side of `script` against `peer`, handing turns to the guest
/// through `baton`, and checks the state after every step.
fn drive(
    host: &mut ShmHost,
    peer: PeerId,
    watch: &Segment,
    script: &Script,
    baton: &mut dyn Baton,
) -> Result<(), String> {
    let mut party = Party::new(Side::Host, &script.geometry);
    let steps = &script.steps;
    let mut i = 0;
    while i < steps.len() {
        let last = match steps[i].0.side() {
            Side::Host => {
                let mut end = HostEnd {
                    host: &mut *host,
                    peer,
                };
                run_step(&mut party, &mut end, script, i)?;
                i
            }
            Side::Guest => {
                let to = steps[i..]
                    .iter()
                    .position(|(s, _)| s.side() == Side::Host)
                    .map_or(steps.len(), |n| i + n);
                baton.guest_turn(i, to)?;
                to - 1
            }
        };
        let (step, want) = &steps[last];
        let got = observe(host, peer, watch)?;
        if got != *want {
            return Err(format!(
                "after step {last} ({step}):\n  state {got:?}\n  expected {want:?}"
            ));
        }
        i = last + 1;
    }
    if !party.views.is_empty() {
        return Err("the host still holds views after the drain".into());
    }
    // Whatever the model says: every slot is Free and both rings are empty.
    let end = observe(host, peer, watch)?;
    for lane in [&end.to_guest, &end.to_host] {
        let busy = lane
            .classes
            .iter()
            .any(|c| c.loaned + c.sent + c.received + c.invalid > 0);
        if lane.depth != 0 || busy {
            return Err(format!("not everything is free at the end: {end:?}"));
        }
    }
    let geo = &script.geometry;
    let slots: u32 = geo.classes().iter().map(|c| c.count).sum();
    let usage = host.peer_usage(peer).unwrap();
    if (usage.to_guest_slots.free, usage.to_host_slots.free) != (slots, slots) {
        return Err(format!("not every slot is free at the end: {usage:?}"));
    }
    Ok(())
}

/// After the guest left: the entry is recycled with nothing discarded or reclaimed,
/// and the host's counters match the script.
fn check_recycled(host: &mut ShmHost, peer: PeerId, script: &Script) -> Result<(), String> {
    poll_until(LONG, "the entry to be recycled", || {
        host.maintain();
        (host.peer_info(peer).unwrap().stats.recycled == 1).then_some(())
    });
    let stats = host.peer_info(peer).unwrap().stats;
    let want = (script.host_sent, script.host_received, 0, 0, 0, 0);
    let got = (
        stats.sent,
        stats.received,
        stats.discarded,
        stats.reclaimed_slots,
        stats.abandoned,
        stats.deaths,
    );
    match got == want {
        true => Ok(()),
        false => Err(format!(
            "stats (sent, received, discarded, reclaimed, abandoned, deaths) {got:?}, expected {want:?}"
        )),
    }
}

// ---------------------------------------------------------------------------------
// Two processes.

fn encode(mix: &Mix) -> String {
    fn size(s: Size) -> String {
        match s {
            Size::Edge(n) => format!("E{n}"),
            Size::Any(n) => format!("A{n}"),
            Size::Beyond(n) => format!("X{n}"),
        }
    }
    fn side(s: Side) -> &'static str {
        match s {
            Side::Host => "h",
            Side::Guest => "g",
        }
    }
    let mut out = mix.geometry.to_string();
    for op in &mix.ops {
        out.push(';');
        out += &match *op {
            Op::Send(s, z, how, echo) => {
                let how = match how {
                    SendHow::Copy => "c".to_string(),
                    SendHow::Blocking => "b".to_string(),
                    SendHow::Loan(n) => format!("l{n}"),
                };
                let echo = echo.map_or("-".to_string(), |p| p.to_string());
                format!("S,{},{},{how},{echo}", side(s), size(z))
            }
            Op::LoanDrop(s, z, o) => format!("L,{},{},{}", side(s), size(z), o as u8),
            Op::Recv(s, how) => format!("R,{},{how:?}", side(s)),
            Op::Drop(s, k) => format!("D,{},{k}", side(s)),
        };
    }
    out
}

fn decode(text: &str) -> Mix {
    fn size(s: &str) -> Size {
        let (kind, n) = s.split_at(1);
        match kind {
            "E" => Size::Edge(n.parse().unwrap()),
            "A" => Size::Any(n.parse().unwrap()),
            "X" => Size::Beyond(n.parse().unwrap()),
            _ => panic!("bad size {s}"),
        }
    }
    fn side(s: &str) -> Side {
        match s {
            "h" => Side::Host,
            "g" => Side::Guest,
            _ => panic!("bad side {s}"),
        }
    }
    let mut parts = text.split(';');
    let geometry = parts.next().unwrap().parse().unwrap();
    let ops = parts
        .map(|p| {
            let f: Vec<&str> = p.split(',').collect();
            match f[0] {
                "S" => {
                    let how = match f[3] {
                        "c" => SendHow::Copy,
                        "b" => SendHow::Blocking,
                        l => SendHow::Loan(l[1..].parse().unwrap()),
                    };
                    let echo = (f[4] != "-").then(|| f[4].parse().unwrap());
                    Op::Send(side(f[1]), size(f[2]), how, echo)
                }
                "L" => Op::LoanDrop(side(f[1]), size(f[2]), f[3] == "1"),
                "R" => {
                    let how = match f[2] {
                        "Copy" => RecvHow::Copy,
                        "BlockingCopy" => RecvHow::BlockingCopy,
                        "View" => RecvHow::View,
                        "BlockingView" => RecvHow::BlockingView,
                        h => panic!("bad receive {h}"),
                    };
                    Op::Recv(side(f[1]), how)
                }
                "D" => Op::Drop(side(f[1]), f[2].parse().unwrap()),
                o => panic!("bad op {o}"),
            }
        })
        .collect();
    Mix { geometry, ops }
}

/// The child: attaches, then runs its turns of the script until the host says bye.
fn guest_main() {
    watchdog();
    let mix = decode(&arg("MIX"));
    let script = mix.script();
    let guest = ShmGuest::attach_path(arg("SEG")).unwrap();
    tell("attached");
    let mut end = GuestEnd { guest };
    let mut party = Party::new(Side::Guest, &script.geometry);
    loop {
        let line = hear();
        if line == "bye" {
            break;
        }
        let turn: Vec<usize> = line
            .strip_prefix("go ")
            .map(|r| r.split(' ').filter_map(|n| n.parse().ok()).collect())
            .unwrap_or_default();
        let [from, to] = turn[..] else {
            tell(&format!("fail the host said {line:?}"));
            return;
        };
        match follow(&script, from, to, &mut party, &mut end) {
            Ok(()) => tell(&format!("done {to}")),
            Err(e) => {
                tell(&format!("fail {}", e.replace('\n', " | ")));
                return;
            }
        }
    }
    drop(party);
    end.guest.detach();
}

struct ChildBaton {
    child: Proc,
}

impl Baton for ChildBaton {
    fn guest_turn(&mut self, from: usize, to: usize) -> Result<(), String> {
        self.child.say(&format!("go {from} {to}"));
        let line = self.child.expect_line();
        if line == format!("done {to}") {
            return Ok(());
        }
        match line.strip_prefix("fail ") {
            Some(e) => Err(format!("guest: {e}")),
            None => Err(format!("guest said {line:?}")),
        }
    }
}

/// One case across two processes: this process hosts, a new child is the guest.
fn cross_process(mix: &Mix) -> Result<(), String> {
    let script = mix.script();
    let seg = ShmPath::new("mix");
    let mut host = ShmHost::create(seg.path(), mix.geometry().config).map_err(|e| e.to_string())?;
    let envs = [
        ("SEG", seg.path().display().to_string()),
        ("MIX", encode(mix)),
    ];
    let mut child = Proc::spawn(CROSS, ROLE, &envs, LONG);
    child.expect("attached");
    let peer = match host.attached_peers()[..] {
        [peer] => peer,
        ref other => return Err(format!("attached peers {other:?}")),
    };
    let watch = watch_segment(seg.path());
    let mut baton = ChildBaton { child };
    drive(&mut host, peer, &watch, &script, &mut baton)?;
    baton.child.say("bye");
    baton.child.assert_success();
    check_recycled(&mut host, peer, &script)
}

// ---------------------------------------------------------------------------------
// One process: a guest thread on a heap segment.

struct ThreadBaton {
    go: mpsc::Sender<(usize, usize)>,
    done: mpsc::Receiver<Result<usize, String>>,
}

impl Baton for ThreadBaton {
    fn guest_turn(&mut self, from: usize, to: usize) -> Result<(), String> {
        self.go
            .send((from, to))
            .map_err(|_| "the guest thread is gone")?;
        match self.done.recv_timeout(LONG) {
            Ok(Ok(t)) if t == to => Ok(()),
            Ok(Ok(t)) => Err(format!("guest finished turn {t}, expected {to}")),
            Ok(Err(e)) => Err(format!("guest: {e}")),
            Err(e) => Err(format!("guest thread: {e}")),
        }
    }
}

fn in_process(mix: &Mix) -> Result<(), String> {
    let script = std::sync::Arc::new(mix.script());
    let mut host = ShmHost::create_heap(mix.geometry().config).map_err(|e| e.to_string())?;
    let guest = ShmGuest::attach_backing(host.backing(), AttachOptions::default())
        .map_err(|e| e.to_string())?;
    let peer = guest.peer_id();
    let watch = Segment::attach(host.backing()).map_err(|e| e.to_string())?;
    let (go, turns) = mpsc::channel::<(usize, usize)>();
    let (done, dones) = mpsc::channel();
    let theirs = script.clone();
    let thread = std::thread::spawn(move || {
        let mut end = GuestEnd { guest };
        let mut party = Party::new(Side::Guest, &theirs.geometry);
        // Ends when the host drops its sender (or stops answering within LONG).
        while let Ok((from, to)) = turns.recv_timeout(LONG) {
            let r = follow(&theirs, from, to, &mut party, &mut end).map(|()| to);
            let failed = r.is_err();
            if done.send(r).is_err() || failed {
                break;
            }
        }
        drop(party);
        end.guest.detach();
    });
    let mut baton = ThreadBaton { go, done: dones };
    let driven = drive(&mut host, peer, &watch, &script, &mut baton);
    drop(baton);
    thread.join().map_err(|p| panic_text(&*p))?;
    driven?;
    check_recycled(&mut host, peer, &script)
}

// ---------------------------------------------------------------------------------
// The tests.

/// Runs `cases` random mixes of up to `max_ops` operations through `run`. Nothing is
/// persisted: a failure prints the minimal script (each step, its expected outcome)
/// and the step that failed. `PROPTEST_CASES` overrides `cases` for longer runs.
fn run_mixes(
    cases: u32,
    max_ops: usize,
    (max_shrink_iters, max_shrink_secs): (u32, u32),
    run: fn(&Mix) -> Result<(), String>,
) {
    let defaults = PropConfig::default();
    let config = PropConfig {
        cases: match std::env::var_os("PROPTEST_CASES") {
            Some(_) => defaults.cases,
            None => cases,
        },
        failure_persistence: None,
        max_shrink_iters,
        max_shrink_time: max_shrink_secs * 1000,
        ..defaults
    };
    let mut runner = TestRunner::new(config);
    let result = runner.run(&mix_strategy(max_ops), |mix| {
        run(&mix).map_err(TestCaseError::fail)
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

// shm[verify shm.slot.loan]
// shm[verify shm.slot.view]
// shm[verify shm.slot.classes]
// shm[verify shm.slot.exhausted]
// shm[verify shm.slot.free]
// shm[verify shm.msg.inline]
// shm[verify shm.msg.slot]
// shm[verify shm.ring.full]
// shm[verify shm.delivery.to-guest]
// shm[verify shm.delivery.to-host]
#[test]
fn random_mixes_across_two_processes_deliver_every_byte_and_free_every_slot() {
    if role().as_deref() == Some(ROLE) {
        return guest_main();
    }
    // Each case is a new child: few cases, few shrink steps.
    run_mixes(16, 60, (48, 30), cross_process);
}

// shm[verify shm.slot.loan]
// shm[verify shm.slot.view]
// shm[verify shm.slot.classes]
// shm[verify shm.slot.exhausted]
// shm[verify shm.slot.free]
// shm[verify shm.msg.inline]
// shm[verify shm.msg.slot]
// shm[verify shm.ring.full]
#[test]
fn random_mixes_in_one_process_deliver_every_byte_and_free_every_slot() {
    run_mixes(96, 120, (2048, 20), in_process);
}

/// A fixed script on the tight geometry whose model reaches every outcome, run in one
/// process and across two: so the outcomes are exercised even if the random cases
/// happen to miss one.
fn scripted() -> Mix {
    use Op::{Drop, LoanDrop, Recv, Send};
    use RecvHow::{BlockingCopy, BlockingView, Copy, View};
    use Side::{Guest, Host};
    use Size::{Any, Beyond};
    let ops = vec![
        Recv(Guest, View),                                 // nothing yet
        Send(Host, Any(0), SendHow::Copy, None),           // #0 inline, empty
        Send(Host, Any(36), SendHow::Blocking, None),      // #1 inline
        Send(Host, Any(37), SendHow::Copy, None),          // #2 class 0
        Send(Host, Any(64), SendHow::Loan(0), None),       // #3 class 0 (now dry)
        Send(Host, Any(40), SendHow::Copy, None),          // #4 falls through to class 1
        Send(Host, Beyond(0), SendHow::Copy, None),        // #5 1025: beyond the largest
        Send(Host, Any(1000), SendHow::Loan(30), None),    // #6 a loan of 1030: beyond
        Send(Host, Any(257), SendHow::Loan(7), None),      // #7 class 2
        Send(Host, Any(1024), SendHow::Copy, None),        // #8 class 2 is dry: exhausted
        Send(Host, Any(300), SendHow::Blocking, None),     // #9 exhausted: times out
        LoanDrop(Host, Any(65), false),                    // class 1, returned
        LoanDrop(Host, Any(1), true),                      // class 1, sent past capacity
        Send(Host, Any(3), SendHow::Copy, None),           // #10 inline
        Send(Host, Any(256), SendHow::Copy, None),         // #11 class 1: 8 in the ring
        Send(Host, Any(20), SendHow::Copy, None),          // #12 ring full
        Send(Host, Any(2), SendHow::Copy, None),           // #13 ring full
        Send(Host, Any(2), SendHow::Blocking, None),       // #14 ring full: times out
        Send(Host, Any(100), SendHow::Loan(0), None),      // #15 ring full: no slot taken
        Recv(Guest, View),                                 // #0
        Recv(Guest, BlockingCopy),                         // #1
        Recv(Guest, BlockingView),                         // #2
        Recv(Guest, View),                                 // #3
        Recv(Guest, Copy),                                 // #4
        Recv(Guest, View),                                 // #7
        Send(Guest, Any(1024), SendHow::Loan(0), Some(3)), // #16 echoes #7 (view 3), loan
        Send(Guest, Any(50), SendHow::Copy, Some(2)),      // #17 echoes 50 B of #3 (view 2)
        Send(Guest, Any(100), SendHow::Loan(3), Some(5)),  // #18 echoes #4 (copy 1), loan
        Drop(Guest, 2),                                    // #3, out of order
        Drop(Guest, 0),                                    // #0
        LoanDrop(Guest, Beyond(7), false),                 // beyond: refused
        LoanDrop(Guest, Any(37), false),                   // class 0 is dry: class 1
        LoanDrop(Guest, Any(200), true),                   // class 1, sent past capacity
        Recv(Host, View),                                  // #16
        Recv(Host, BlockingCopy),                          // #17
        Recv(Host, View),                                  // #18
        Recv(Host, Copy),                                  // nothing
        Drop(Host, 1),                                     // #18, out of order
        Send(Guest, Beyond(3), SendHow::Copy, None),       // beyond: refused
    ];
    Mix { geometry: 0, ops }
}

/// Tags of the outcomes a script reaches.
fn reached(script: &Script) -> BTreeSet<String> {
    let mut tags = BTreeSet::new();
    for (step, _) in &script.steps {
        let side = step.side().to_string();
        let side = side.trim();
        match step {
            Step::Send {
                msg,
                how,
                source,
                outcome,
                ..
            } => {
                let how = match how {
                    SendHow::Loan(_) => "loan",
                    _ => "copy",
                };
                let what = match outcome {
                    Outcome::Sent(Carrier::Slot(c)) if *c > 0 && msg.len <= 64 => {
                        "fall-through".to_string()
                    }
                    other => format!("{other}"),
                };
                let echo = match source {
                    Source::Fresh => "",
                    Source::View(_) => " echo-view",
                    Source::Copy(_) => " echo-copy",
                };
                tags.insert(format!("{side} {how}{echo} {what}"));
            }
            Step::LoanDrop {
                oversend, outcome, ..
            } => {
                tags.insert(format!("{side} loan-drop oversend={oversend} {outcome}"));
            }
            Step::Recv { how, expect, .. } => {
                tags.insert(format!("{side} recv {how:?} {}", expect.is_some()));
            }
            Step::Drop { index, .. } => {
                tags.insert(format!("{side} drop first={}", *index == 0));
            }
        }
    }
    tags
}

// shm[verify shm.slot.loan]
// shm[verify shm.slot.view]
// shm[verify shm.slot.classes]
// shm[verify shm.slot.exhausted]
// shm[verify shm.msg.inline]
// shm[verify shm.msg.slot]
// shm[verify shm.ring.full]
#[test]
fn a_scripted_mix_reaches_every_outcome_in_one_and_two_processes() {
    let mix = scripted();
    let tags = reached(&mix.script());
    for want in [
        "host copy inline",
        "host copy slot of class 0",
        "host loan slot of class 0",
        "host copy fall-through",
        "host copy out of band",
        "host loan refused TooLarge { len: 1030, max: 1024 }",
        "host loan slot of class 2",
        "host copy refused PoolExhausted",
        "host copy refused RingFull",
        "host loan refused RingFull",
        "host copy refused TimedOut",
        "host loan-drop oversend=false slot of class 1",
        "host loan-drop oversend=true slot of class 1",
        "guest loan-drop oversend=false refused TooLarge { len: 1032, max: 1024 }",
        "guest loan-drop oversend=false slot of class 1",
        "guest loan-drop oversend=true slot of class 1",
        "guest recv View false",
        "guest recv View true",
        "guest recv BlockingView true",
        "guest recv BlockingCopy true",
        "guest recv Copy true",
        "guest loan echo-view slot of class 2",
        "guest copy echo-view slot of class 0",
        "guest loan echo-copy slot of class 0",
        "guest drop first=false",
        "guest copy out of band",
        "host recv View true",
        "host recv BlockingCopy true",
        "host recv Copy false",
        "host drop first=false",
    ] {
        assert!(
            tags.contains(want),
            "the script reaches {want:?}: {tags:#?}"
        );
    }
    in_process(&mix).unwrap_or_else(|e| panic!("in one process: {e}\n{mix:?}"));
    cross_process(&mix).unwrap_or_else(|e| panic!("in two processes: {e}\n{mix:?}"));
}

#[test]
fn scripts_survive_the_trip_to_the_child() {
    let mix = scripted();
    let back = decode(&encode(&mix));
    assert_eq!(format!("{back:?}"), format!("{mix:?}"));
    assert_eq!(encode(&back), encode(&mix));
}
