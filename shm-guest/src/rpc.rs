//! Calls from a guest to its host (`spec/11-rpc.md`); see [`RpcClient`].

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, Weak};
use std::task::Waker;
use std::time::{Duration, Instant};

use crate::{
    DetachedError, LargeSendError, Message, Meta, MsgKind, PeerId, RecvError, SendError, ShmGuest,
    Violation,
};

/// Calls in flight a client allows by default (`shm.rpc.in-flight`).
pub const DEFAULT_MAX_IN_FLIGHT: usize = 32;
/// Other messages a client queues for `recv_message` by default (`shm.rpc.inbound`).
pub const DEFAULT_QUEUE_CAPACITY: usize = 32;
/// The largest `max_in_flight`.
pub const MAX_IN_FLIGHT: usize = 1 << PLACE_BITS;

/// Low bits of a correlation id: the call's place in the table.
const PLACE_BITS: u32 = 16;
const PLACE_MASK: u64 = (1 << PLACE_BITS) - 1;
/// Sequence numbers run 1..SEQ_LIMIT (48 bits), then start again at 1.
const SEQ_LIMIT: u64 = 1 << (64 - PLACE_BITS);

/// How a client is set up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RpcOptions {
    /// Calls that may be in flight at once, 1..=[`MAX_IN_FLIGHT`] (default
    /// [`DEFAULT_MAX_IN_FLIGHT`]).
    pub max_in_flight: usize,
    /// Messages other than responses (plain messages, requests and cancels from the
    /// host) held for [`RpcClient::recv_message`], at least 1 (default
    /// [`DEFAULT_QUEUE_CAPACITY`]). While the queue is full the client takes nothing
    /// from its ring (`shm.rpc.inbound`).
    pub queue_capacity: usize,
}

impl Default for RpcOptions {
    fn default() -> Self {
        Self {
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            queue_capacity: DEFAULT_QUEUE_CAPACITY,
        }
    }
}

/// Why a client could not be made (the guest passed in is dropped, which detaches it).
#[derive(Debug, thiserror::Error)]
pub enum RpcSetupError {
    /// `max_in_flight` is 0 or above [`MAX_IN_FLIGHT`].
    #[error("max_in_flight must be 1..={MAX_IN_FLIGHT}, got {0}")]
    MaxInFlight(usize),
    /// `queue_capacity` is 0.
    #[error("queue_capacity must be at least 1")]
    QueueCapacity,
    /// A system call failed.
    #[error("{op}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The OS error.
        source: io::Error,
    },
}

/// Why a call failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    /// The request was sent but no response came within the timeout; the call was
    /// cancelled (`shm.rpc.timeout`).
    #[error("no response within the timeout")]
    TimedOut,
    /// The call was cancelled (`shm.rpc.cancel`).
    #[error("the call was cancelled")]
    Cancelled,
    /// Every place for a call stayed taken until the timeout; nothing was sent.
    #[error("all {max_in_flight} calls stayed in flight until the timeout")]
    Busy {
        /// The client's limit.
        max_in_flight: usize,
    },
    /// The ring or the slot pool towards the host stayed full until the timeout;
    /// nothing was sent.
    #[error("no room towards the host before the timeout")]
    NoRoom,
    /// The request is larger than a slot.
    #[error("payload of {len} bytes exceeds the {max}-byte slot")]
    TooLarge {
        /// Payload length.
        len: usize,
        /// Largest payload.
        max: usize,
    },
    /// The guest is no longer attached (the host died or closed the segment, or the
    /// entry was lost or fenced).
    #[error(transparent)]
    Detached(#[from] DetachedError),
    /// The host left an impossible value in shared memory.
    #[error("protocol violation by the host: {0}")]
    Violation(Violation),
    /// A request above the largest slot class could not be passed in its memory file
    /// (`shm.msg.large`); nothing was sent.
    #[error("large request: {op} failed (errno {errno})")]
    LargeIo {
        /// What was being done.
        op: &'static str,
        /// The OS error number (0 if none).
        errno: i32,
    },
}

impl CallError {
    fn from_send(e: SendError) -> Self {
        match e {
            SendError::TooLarge { len, max } => CallError::TooLarge { len, max },
            SendError::Detached(d) => CallError::Detached(d),
            SendError::Violation(v) => CallError::Violation(v),
            SendError::WouldBlockRing
            | SendError::WouldBlockPool
            | SendError::TimedOut
            | SendError::Large(LargeSendError::WouldBlock) => CallError::NoRoom,
            SendError::Large(LargeSendError::Io { op, source }) => CallError::LargeIo {
                op,
                errno: source.raw_os_error().unwrap_or(0),
            },
        }
    }
}

/// Why a reply was not sent. Nothing was published.
#[derive(Debug, thiserror::Error)]
pub enum ReplyError {
    /// The message replied to is not a request (`shm.rpc.reply`).
    #[error("cannot reply to a message of kind {0:?}: only requests are answered")]
    NotRequest(MsgKind),
    /// The send failed.
    #[error(transparent)]
    Send(#[from] SendError),
}

/// A client's counters (`RpcClient::stats`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RpcStats {
    /// Requests sent.
    pub calls: u64,
    /// Responses handed to their calls.
    pub answered: u64,
    /// Responses no call waited for, dropped at once (`shm.rpc.route`).
    pub late_responses: u64,
    /// Calls that timed out.
    pub timed_out: u64,
    /// Calls cancelled (by a [`Canceller`] or by dropping them).
    pub cancelled: u64,
    /// Cancel messages sent to the host.
    pub cancels_sent: u64,
    /// Cancel messages not sent because the ring or pool was full.
    pub cancels_unsent: u64,
    /// Calls in flight now (places taken).
    pub in_flight: usize,
    /// Messages waiting in the queue for `recv_message` now.
    pub queued: usize,
}

/// The answer to a call: the response message, read in place (its slot is freed when
/// this is dropped). Dereferences to [`Message`] for the payload accessors.
#[derive(Debug)]
pub struct Response {
    message: Message,
}

impl Response {
    /// The call's correlation id.
    pub fn id(&self) -> u64 {
        self.message.meta().user_id
    }

    /// The message itself.
    pub fn into_message(self) -> Message {
        self.message
    }
}

impl std::ops::Deref for Response {
    type Target = Message;
    fn deref(&self) -> &Message {
        &self.message
    }
}

/// What made the client unusable: sticky, reported to every call (`shm.rpc.failure`).
#[derive(Debug, Clone, Copy)]
enum Failure {
    Detached(DetachedError),
    Violation(Violation),
}

impl Failure {
    fn of_recv(e: RecvError) -> Self {
        match e {
            RecvError::Detached(d) => Failure::Detached(d),
            RecvError::Violation(v) => Failure::Violation(v),
        }
    }

    fn of_send(e: &SendError) -> Option<Self> {
        match e {
            SendError::Detached(d) => Some(Failure::Detached(*d)),
            SendError::Violation(v) => Some(Failure::Violation(*v)),
            _ => None,
        }
    }
}

impl From<Failure> for CallError {
    fn from(f: Failure) -> Self {
        match f {
            Failure::Detached(d) => CallError::Detached(d),
            Failure::Violation(v) => CallError::Violation(v),
        }
    }
}

impl From<Failure> for RecvError {
    fn from(f: Failure) -> Self {
        match f {
            Failure::Detached(d) => RecvError::Detached(d),
            Failure::Violation(v) => RecvError::Violation(v),
        }
    }
}

impl From<Failure> for SendError {
    fn from(f: Failure) -> Self {
        match f {
            Failure::Detached(d) => SendError::Detached(d),
            Failure::Violation(v) => SendError::Violation(v),
        }
    }
}

/// Where a call stands.
// Not boxed: a box would cost an allocation per response; the table is allocated once.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
enum Phase {
    /// The place is not in use.
    Free,
    /// The request is being sent: a response with this id would be forged.
    Sending,
    /// Waiting for the response.
    Sent,
    /// The response arrived and waits for the caller.
    Answered(Message),
    /// Cancelled before the caller collected it.
    Cancelled,
}

/// Who sleeps until a call's phase changes.
#[derive(Debug)]
enum Waiter {
    None,
    Thread,
    // Only async clients wait as tasks.
    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    Task(Waker),
}

#[derive(Debug)]
struct Place {
    /// The call's correlation id; 0 while free.
    id: u64,
    msg_type: u32,
    phase: Phase,
    waiter: Waiter,
}

impl Place {
    fn free() -> Self {
        Self {
            id: 0,
            msg_type: 0,
            phase: Phase::Free,
            waiter: Waiter::None,
        }
    }
}

/// What a waiter waits for: its own call, or anything else (a place, room towards
/// the host, a queued message).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Waits {
    Call(usize),
    Other,
}

/// The thread or task that takes messages off the ring (`shm.rpc.receive`).
#[derive(Debug)]
struct Receiver {
    /// `None` for a thread (woken through the eventfd), else the task's waker.
    task: Option<Waker>,
    waits: Waits,
    /// Set while it sleeps with the lock released: only then must others wake it.
    parked: bool,
}

#[derive(Debug)]
struct State {
    places: Box<[Place]>,
    free: Vec<usize>,
    next_seq: u64,
    queue: VecDeque<Message>,
    receiver: Option<Receiver>,
    /// The ring's `producer_parked` says "doorbell" since the last successful send.
    send_armed: bool,
    /// Sends waiting for room towards the host.
    space_waiters: usize,
    /// Threads asleep on `general_cv`.
    general_threads: usize,
    /// Tasks waiting for something other than their call.
    general_tasks: Vec<Waker>,
    failed: Option<Failure>,
    stats: RpcStats,
    /// Last, so it drops last: held responses and queued messages free their slots
    /// before the guest says goodbye.
    guest: ShmGuest,
}

/// What a receiver's step found.
enum Step {
    /// A message was taken (or the client failed): check the conditions again.
    Progress,
    /// Nothing to take; `armed` says whether the doorbell was armed (and drained).
    Idle { armed: bool },
}

/// Why a call ends without its waiter collecting it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    TimedOut,
    Dropped,
}

#[derive(Debug)]
struct Core {
    state: Mutex<State>,
    /// One per place: the thread waiting for that call sleeps here.
    place_cv: Box<[Condvar]>,
    /// Threads waiting for a place, room towards the host or a queued message.
    general_cv: Condvar,
    /// The guest's doorbell (a duplicate), polled by a receiving thread.
    doorbell: OwnedFd,
    /// An eventfd that wakes a receiving thread out of its poll.
    wake: OwnedFd,
    max_in_flight: usize,
    queue_capacity: usize,
    /// The doorbell registered with the tokio runtime (async clients only).
    #[cfg(feature = "tokio")]
    async_bell: Option<tokio::io::unix::AsyncFd<OwnedFd>>,
}

impl Core {
    // shm[impl shm.rpc.in-flight]
    fn new(guest: ShmGuest, options: RpcOptions) -> Result<Self, RpcSetupError> {
        let n = options.max_in_flight;
        if n == 0 || n > MAX_IN_FLIGHT {
            return Err(RpcSetupError::MaxInFlight(n));
        }
        if options.queue_capacity == 0 {
            return Err(RpcSetupError::QueueCapacity);
        }
        let io = |op| move |source| RpcSetupError::Io { op, source };
        let doorbell = guest
            .as_fd()
            .try_clone_to_owned()
            .map_err(io("dup the doorbell"))?;
        let wake = eventfd().map_err(io("eventfd"))?;
        let state = State {
            places: (0..n).map(|_| Place::free()).collect(),
            // Popped from the end: place 0 first.
            free: (0..n).rev().collect(),
            next_seq: 1,
            queue: VecDeque::with_capacity(options.queue_capacity.min(1024)),
            receiver: None,
            send_armed: false,
            space_waiters: 0,
            general_threads: 0,
            general_tasks: Vec::new(),
            failed: None,
            stats: RpcStats::default(),
            guest,
        };
        Ok(Self {
            state: Mutex::new(state),
            place_cv: (0..n).map(|_| Condvar::new()).collect(),
            general_cv: Condvar::new(),
            doorbell,
            wake,
            max_in_flight: n,
            queue_capacity: options.queue_capacity,
            #[cfg(feature = "tokio")]
            async_bell: None,
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every change under the lock keeps the state consistent between statements
        // that can panic (none should), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn stats(&self) -> RpcStats {
        let st = self.lock();
        RpcStats {
            in_flight: self.max_in_flight - st.free.len(),
            queued: st.queue.len(),
            ..st.stats
        }
    }

    // ---- waking ------------------------------------------------------------------

    /// Wakes the receiver if it sleeps with the lock released (a receiver holding
    /// the lock looks at everything again before it sleeps).
    fn wake_receiver(&self, st: &State) {
        if let Some(Receiver {
            parked: true, task, ..
        }) = &st.receiver
        {
            match task {
                Some(w) => w.wake_by_ref(),
                None => write_eventfd(self.wake.as_raw_fd()),
            }
        }
    }

    /// Wakes whoever waits for call `i`.
    fn wake_place(&self, st: &mut State, i: usize) {
        if matches!(st.receiver, Some(Receiver { waits: Waits::Call(j), .. }) if j == i) {
            self.wake_receiver(st);
        }
        match &mut st.places[i].waiter {
            Waiter::Thread => self.place_cv[i].notify_one(),
            w @ Waiter::Task(_) => {
                if let Waiter::Task(w) = std::mem::replace(w, Waiter::None) {
                    w.wake();
                }
            }
            Waiter::None => {}
        }
    }

    /// Wakes everyone waiting for something other than a call.
    fn wake_general(&self, st: &mut State) {
        if st.general_threads > 0 {
            self.general_cv.notify_all();
        }
        for w in st.general_tasks.drain(..) {
            w.wake();
        }
        if matches!(
            st.receiver,
            Some(Receiver {
                waits: Waits::Other,
                ..
            })
        ) {
            self.wake_receiver(st);
        }
    }

    /// With no receiver, wakes one waiter to take the role (`shm.rpc.receive`).
    fn handoff(&self, st: &mut State) {
        if st.receiver.is_some() {
            return;
        }
        if let Some(i) = st
            .places
            .iter()
            .position(|p| !matches!(p.waiter, Waiter::None))
        {
            self.wake_place(st, i);
        } else {
            self.wake_general(st);
        }
    }

    /// Makes the client unusable and wakes every waiter to report it.
    // shm[impl shm.rpc.failure]
    fn fail(&self, st: &mut State, f: Failure) {
        if st.failed.is_none() {
            st.failed = Some(f);
        }
        for i in 0..st.places.len() {
            self.wake_place(st, i);
        }
        self.wake_general(st);
        self.wake_receiver(st);
    }

    // ---- receiving ---------------------------------------------------------------

    /// Takes messages off the ring while the queue has room, routing each.
    // shm[impl shm.rpc.inbound]
    fn pump(&self, st: &mut State) -> Result<bool, Failure> {
        let mut progressed = false;
        while st.queue.len() < self.queue_capacity {
            match st.guest.try_recv_message() {
                Ok(Some(msg)) => {
                    progressed = true;
                    self.route(st, msg);
                }
                Ok(None) => break,
                Err(e) => return Err(Failure::of_recv(e)),
            }
        }
        Ok(progressed)
    }

    /// Hands a response to its call, drops a late one, queues anything else.
    // shm[impl shm.rpc.route]
    // shm[impl shm.rpc.inbound]
    fn route(&self, st: &mut State, msg: Message) {
        let meta = msg.meta();
        if meta.kind != MsgKind::Response {
            st.queue.push_back(msg);
            self.wake_general(st);
            return;
        }
        // The id is the host's word: a range check and a comparison, nothing more.
        let id = meta.user_id;
        let i = (id & PLACE_MASK) as usize;
        match st.places.get_mut(i) {
            Some(p) if id != 0 && p.id == id && matches!(p.phase, Phase::Sent) => {
                p.phase = Phase::Answered(msg);
                st.stats.answered += 1;
                self.wake_place(st, i);
            }
            _ => {
                st.stats.late_responses += 1;
                // Dropped here: the slot is freed at once.
                drop(msg);
            }
        }
    }

    /// Arms the doorbell for what the waiters need: data (while the queue has room)
    /// and room towards the host (while a send waits). Each arm drains the doorbell,
    /// so everything it signals is looked at again afterwards: the receiver takes
    /// messages, and waiting sends are woken to retry.
    // shm[impl shm.rpc.receive]
    fn arm(&self, st: &mut State) -> Result<bool, Failure> {
        let mut armed = false;
        if st.queue.len() < self.queue_capacity {
            st.guest.arm_doorbell_recv().map_err(Failure::Detached)?;
            armed = true;
        }
        if st.space_waiters > 0 {
            st.guest.arm_doorbell_send().map_err(Failure::Detached)?;
            st.send_armed = true;
            armed = true;
            self.wake_general(st);
        }
        Ok(armed)
    }

    /// One step of the receiver: take, arm, take again.
    // shm[impl shm.rpc.receive]
    fn receive_step(&self, st: &mut State) -> Step {
        if st.failed.is_some() {
            return Step::Progress;
        }
        let mut step = || -> Result<Step, Failure> {
            if self.pump(st)? {
                return Ok(Step::Progress);
            }
            let armed = self.arm(st)?;
            if self.pump(st)? {
                return Ok(Step::Progress);
            }
            Ok(Step::Idle { armed })
        };
        match step() {
            Ok(step) => step,
            Err(f) => {
                self.fail(st, f);
                Step::Progress
            }
        }
    }

    /// After a receiver's sleep: the host's liveness, at most once per interval.
    // shm[impl shm.rpc.failure]
    fn check_host(&self, st: &mut State) {
        if let Err(e) = st.guest.check_host() {
            self.fail(st, Failure::Detached(e));
        }
    }

    // ---- conditions ----------------------------------------------------------------

    /// A free place for a call.
    fn ready_place(&self, st: &mut State) -> Option<Result<usize, CallError>> {
        if let Some(f) = st.failed {
            return Some(Err(f.into()));
        }
        st.free.pop().map(Ok)
    }

    /// One attempt to send; for the request of call `call`, the call is marked sent
    /// under the same lock, so no receiver can take its response for a late one.
    fn ready_send(
        &self,
        st: &mut State,
        meta: Meta,
        payload: &[u8],
        call: Option<usize>,
    ) -> Option<Result<(), SendError>> {
        if let Some(f) = st.failed {
            return Some(Err(f.into()));
        }
        match st.guest.try_send(meta, payload) {
            Ok(()) => {
                if let Some(i) = call {
                    st.places[i].phase = Phase::Sent;
                    st.stats.calls += 1;
                }
                self.after_send(st);
                Some(Ok(()))
            }
            Err(e) if e.is_would_block() => {
                // The receiver arms for room (and wakes us to retry) once it sees a
                // waiting send; a send since the last arm disarmed it.
                if !st.send_armed {
                    self.wake_receiver(st);
                }
                None
            }
            Err(e) => {
                if let Some(f) = Failure::of_send(&e) {
                    self.fail(st, f);
                }
                Some(Err(e))
            }
        }
    }

    /// A successful send disarms the doorbell for room: other waiting sends retry,
    /// and ask the receiver to arm again if they still find none.
    fn after_send(&self, st: &mut State) {
        st.send_armed = false;
        if st.space_waiters > 0 {
            self.wake_general(st);
        }
    }

    /// The end of call `i` (`id`), if it has ended.
    fn ready_call(&self, st: &mut State, i: usize, id: u64) -> Option<Result<Response, CallError>> {
        if st.places[i].id != id {
            return Some(Err(CallError::Cancelled));
        }
        let out = match std::mem::replace(&mut st.places[i].phase, Phase::Free) {
            Phase::Answered(message) => Ok(Response { message }),
            Phase::Cancelled => Err(CallError::Cancelled),
            other => {
                st.places[i].phase = other;
                Err(st.failed?.into())
            }
        };
        self.release(st, i);
        Some(out)
    }

    /// A queued message.
    // shm[impl shm.rpc.inbound]
    // shm[impl shm.rpc.failure]
    fn ready_queue(&self, st: &mut State) -> Option<Result<Message, RecvError>> {
        if let Some(msg) = st.queue.pop_front() {
            if st.queue.len() + 1 == self.queue_capacity {
                // The receiver stopped taking while the queue was full.
                self.wake_receiver(st);
            }
            return Some(Ok(msg));
        }
        st.failed.map(|f| Err(f.into()))
    }

    // ---- calls ---------------------------------------------------------------------

    /// Takes place `i` for a call of `msg_type` and gives it a fresh id.
    // shm[impl shm.rpc.correlate]
    fn begin_call(&self, st: &mut State, i: usize, msg_type: u32) -> u64 {
        let seq = st.next_seq;
        st.next_seq = if seq + 1 >= SEQ_LIMIT { 1 } else { seq + 1 };
        let id = (seq << PLACE_BITS) | i as u64;
        st.places[i] = Place {
            id,
            msg_type,
            phase: Phase::Sending,
            waiter: Waiter::None,
        };
        id
    }

    /// Frees place `i`.
    fn release(&self, st: &mut State, i: usize) {
        st.places[i] = Place::free();
        st.free.push(i);
        self.wake_general(st);
    }

    /// Tells the host, without waiting, that nobody waits for call `i` any more.
    // shm[impl shm.rpc.correlate]
    // shm[impl shm.rpc.timeout]
    fn send_cancel(&self, st: &mut State, i: usize) {
        if st.failed.is_some() {
            return;
        }
        let p = &st.places[i];
        let meta = Meta::new(p.msg_type, p.id).with_kind(MsgKind::Cancel);
        match st.guest.try_send(meta, &[]) {
            Ok(()) => {
                st.stats.cancels_sent += 1;
                self.after_send(st);
            }
            Err(e) => {
                st.stats.cancels_unsent += 1;
                if let Some(f) = Failure::of_send(&e) {
                    self.fail(st, f);
                }
            }
        }
    }

    /// Ends call `i` (`id`) whose waiter gave up or went away; frees its place.
    // shm[impl shm.rpc.timeout]
    // shm[impl shm.rpc.cancel]
    fn end_call(&self, st: &mut State, i: usize, id: u64, end: End) {
        if !matches!(st.places.get(i), Some(p) if p.id == id) {
            return;
        }
        match &st.places[i].phase {
            Phase::Sent => {
                self.send_cancel(st, i);
                match end {
                    End::TimedOut => st.stats.timed_out += 1,
                    End::Dropped => st.stats.cancelled += 1,
                }
            }
            Phase::Answered(_) => st.stats.late_responses += 1,
            Phase::Free | Phase::Sending | Phase::Cancelled => {}
        }
        // Drops an uncollected response here: its slot is freed at once.
        self.release(st, i);
    }

    /// Cancels call `i` (`id`) if it is still in flight.
    // shm[impl shm.rpc.cancel]
    fn cancel(&self, i: usize, id: u64) -> bool {
        let mut st = self.lock();
        if !matches!(st.places.get(i), Some(p) if p.id == id) {
            return false;
        }
        match std::mem::replace(&mut st.places[i].phase, Phase::Cancelled) {
            Phase::Sent => self.send_cancel(&mut st, i),
            Phase::Answered(response) => {
                st.stats.late_responses += 1;
                drop(response);
            }
            other => {
                st.places[i].phase = other;
                return false;
            }
        }
        st.stats.cancelled += 1;
        self.wake_place(&mut st, i);
        true
    }

    // ---- blocking waits --------------------------------------------------------------

    /// Waits until `ready` gives a value or `deadline` passes (`None`), as the receiver
    /// when there is none, else asleep until woken (`shm.rpc.receive`).
    // shm[impl shm.rpc.receive]
    fn wait_blocking<'a, T>(
        &'a self,
        mut st: MutexGuard<'a, State>,
        deadline: Option<Instant>,
        waits: Waits,
        mut ready: impl FnMut(&Core, &mut State) -> Option<T>,
    ) -> (MutexGuard<'a, State>, Option<T>) {
        let (mut leading, mut followed) = (false, false);
        let out = loop {
            if let Some(v) = ready(self, &mut st) {
                break Some(v);
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                break None;
            }
            if st.receiver.is_none() {
                st.receiver = Some(Receiver {
                    task: None,
                    waits,
                    parked: false,
                });
                leading = true;
            }
            if !leading {
                st = self.follow_blocking(st, deadline, waits);
                followed = true;
                continue;
            }
            let Step::Idle { armed } = self.receive_step(&mut st) else {
                continue;
            };
            // Armed and drained: our own condition is looked at once more too.
            if let Some(v) = ready(self, &mut st) {
                break Some(v);
            }
            st = self.sleep_blocking(st, deadline, armed);
        };
        if leading {
            st.receiver = None;
        }
        // A follower may have been woken to take over from a receiver that left.
        if leading || followed {
            self.handoff(&mut st);
        }
        (st, out)
    }

    /// A non-receiver's sleep: on its call's condition variable or the general one.
    fn follow_blocking<'a>(
        &'a self,
        mut st: MutexGuard<'a, State>,
        deadline: Option<Instant>,
        waits: Waits,
    ) -> MutexGuard<'a, State> {
        let cv = match waits {
            Waits::Call(i) => {
                st.places[i].waiter = Waiter::Thread;
                &self.place_cv[i]
            }
            Waits::Other => {
                st.general_threads += 1;
                &self.general_cv
            }
        };
        st = match deadline {
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                cv.wait_timeout(st, left)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0
            }
            None => cv.wait(st).unwrap_or_else(PoisonError::into_inner),
        };
        match waits {
            Waits::Call(i) => {
                if matches!(st.places[i].waiter, Waiter::Thread) {
                    st.places[i].waiter = Waiter::None;
                }
            }
            Waits::Other => st.general_threads -= 1,
        }
        st
    }

    /// The receiver's sleep: `poll(2)` on the doorbell (when armed) and the eventfd,
    /// with the lock released, for at most one liveness interval and never past the
    /// deadline; then the host's liveness.
    // shm[impl shm.rpc.receive]
    // shm[impl shm.rpc.failure]
    fn sleep_blocking<'a>(
        &'a self,
        mut st: MutexGuard<'a, State>,
        deadline: Option<Instant>,
        armed: bool,
    ) -> MutexGuard<'a, State> {
        let interval = st.guest.liveness_interval();
        let slice = match deadline {
            Some(d) => d.saturating_duration_since(Instant::now()).min(interval),
            None => interval,
        };
        if let Some(r) = st.receiver.as_mut() {
            r.parked = true;
        }
        drop(st);
        let doorbell = armed.then(|| self.doorbell.as_raw_fd());
        let woken = poll_two(self.wake.as_raw_fd(), doorbell, slice);
        let mut st = self.lock();
        if let Some(r) = st.receiver.as_mut() {
            r.parked = false;
        }
        if woken {
            drain_eventfd(self.wake.as_raw_fd());
        }
        self.check_host(&mut st);
        st
    }

    /// Sends one message (the request of `call`, if given), waiting for room until
    /// `deadline` (`TimedOut`).
    fn send_blocking<'a>(
        &'a self,
        mut st: MutexGuard<'a, State>,
        meta: Meta,
        payload: &[u8],
        deadline: Option<Instant>,
        call: Option<usize>,
    ) -> (MutexGuard<'a, State>, Result<(), SendError>) {
        if let Some(done) = self.ready_send(&mut st, meta, payload, call) {
            return (st, done);
        }
        st.space_waiters += 1;
        let (mut st, done) = self.wait_blocking(st, deadline, Waits::Other, |c, st| {
            c.ready_send(st, meta, payload, call)
        });
        st.space_waiters -= 1;
        (st, done.unwrap_or(Err(SendError::TimedOut)))
    }
}

/// A call's hold on its place: ends the call (cancelling it) if dropped while live.
#[derive(Debug)]
struct CallRef {
    core: Arc<Core>,
    place: usize,
    id: u64,
    live: bool,
}

impl Drop for CallRef {
    // shm[impl shm.rpc.cancel]
    fn drop(&mut self) {
        if self.live {
            let mut st = self.core.lock();
            self.core
                .end_call(&mut st, self.place, self.id, End::Dropped);
        }
    }
}

/// Cancels one call from any thread (`shm.rpc.cancel`); see
/// [`PendingCall::canceller`].
#[derive(Debug, Clone)]
pub struct Canceller {
    core: Weak<Core>,
    place: usize,
    id: u64,
}

impl Canceller {
    /// Cancels the call if it is still in flight: its wait returns
    /// [`CallError::Cancelled`] and the host is sent a Cancel (unless the response
    /// had already arrived; it is then dropped). Returns whether the call was still
    /// in flight.
    pub fn cancel(&self) -> bool {
        match self.core.upgrade() {
            Some(core) => core.cancel(self.place, self.id),
            None => false,
        }
    }

    /// The call's correlation id.
    pub fn id(&self) -> u64 {
        self.id
    }
}

fn canceller(call: &CallRef) -> Canceller {
    Canceller {
        core: Arc::downgrade(&call.core),
        place: call.place,
        id: call.id,
    }
}

/// A guest that calls its host (`spec/11-rpc.md`): a request carries a fresh
/// correlation id in `user_id`, the host answers with the same id
/// (`ShmHost::reply`), and the client hands each response to the thread waiting for
/// it. It owns the guest and is shared by every thread that calls through it (a
/// cheap handle: clones share one guest); the guest detaches when the last clone and
/// the last call are dropped.
///
/// ```no_run
/// use std::time::Duration;
/// use shm_guest::{RpcClient, ShmGuest};
/// let client = RpcClient::new(ShmGuest::attach_path("/dev/shm/shmhub-example")?)?;
/// // Any number of threads may call at once (up to `max_in_flight` in flight).
/// let response = client.call(7, b"what time is it?", Duration::from_secs(1))?;
/// println!("{} bytes back for call {}", response.len(), response.id());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// Messages from the host that are not responses (plain messages, requests, cancels)
/// are queued for [`recv_message`](Self::recv_message); the application must take
/// them, or the client stops receiving once the queue is full (`shm.rpc.inbound`).
///
/// # How waiting works
///
/// The client's state (the guest, the table of calls in flight, the queue of other
/// messages) sits behind one mutex, held only for non-blocking work. One waiting
/// thread at a time is the *receiver* (`shm.rpc.receive`): it takes every message off
/// the ring, routes responses to their calls and queues the rest, then arms the
/// doorbell, looks once more, and sleeps in `poll(2)` on the doorbell and on an
/// eventfd with the mutex released, for at most one liveness interval. The other
/// threads sleep on a condition variable of their own call. When the receiver's own
/// wait ends it hands the role to a thread still waiting. A dead host ends every call
/// with [`CallError::Detached`] within about one liveness interval.
#[derive(Debug, Clone)]
pub struct RpcClient {
    core: Arc<Core>,
}

/// A call whose request is out ([`RpcClient::start`]). Dropping it without waiting
/// cancels the call.
#[derive(Debug)]
pub struct PendingCall {
    call: CallRef,
}

impl RpcClient {
    /// A client with the default options.
    pub fn new(guest: ShmGuest) -> Result<Self, RpcSetupError> {
        Self::with_options(guest, RpcOptions::default())
    }

    /// A client with `options`.
    pub fn with_options(guest: ShmGuest, options: RpcOptions) -> Result<Self, RpcSetupError> {
        Ok(Self {
            core: Arc::new(Core::new(guest, options)?),
        })
    }

    /// Calls the host: sends `payload` as a request of type `msg_type` and waits for
    /// its response, all within `timeout` ([`start`](Self::start) then
    /// [`PendingCall::wait`]).
    pub fn call(
        &self,
        msg_type: u32,
        payload: &[u8],
        timeout: Duration,
    ) -> Result<Response, CallError> {
        let start = Instant::now();
        let pending = self.start(msg_type, payload, timeout)?;
        pending.wait(timeout.saturating_sub(start.elapsed()))
    }

    /// Sends a request and returns without waiting for the response. Waits up to
    /// `timeout` for a free place ([`CallError::Busy`]) and for room towards the host
    /// ([`CallError::NoRoom`]); in both cases nothing was sent.
    // shm[impl shm.rpc.correlate]
    // shm[impl shm.rpc.in-flight]
    pub fn start(
        &self,
        msg_type: u32,
        payload: &[u8],
        timeout: Duration,
    ) -> Result<PendingCall, CallError> {
        let core = &*self.core;
        let deadline = Instant::now().checked_add(timeout);
        let st = core.lock();
        let (mut st, place) = core.wait_blocking(st, deadline, Waits::Other, Core::ready_place);
        let i = place.unwrap_or(Err(CallError::Busy {
            max_in_flight: core.max_in_flight,
        }))?;
        let id = core.begin_call(&mut st, i, msg_type);
        let meta = Meta::new(msg_type, id).with_kind(MsgKind::Request);
        let (mut st, sent) = core.send_blocking(st, meta, payload, deadline, Some(i));
        match sent {
            Ok(()) => Ok(PendingCall {
                call: CallRef {
                    core: self.core.clone(),
                    place: i,
                    id,
                    live: true,
                },
            }),
            Err(e) => {
                core.release(&mut st, i);
                Err(CallError::from_send(e))
            }
        }
    }

    /// Receives the next message that is not a response (a plain message, a request
    /// or a cancel from the host), waiting up to `timeout` (`Ok(None)` when it
    /// passes). Messages come in the order the host sent them (`shm.rpc.inbound`).
    pub fn recv_message(&self, timeout: Duration) -> Result<Option<Message>, RecvError> {
        let core = &*self.core;
        let deadline = Instant::now().checked_add(timeout);
        let st = core.lock();
        let (_st, got) = core.wait_blocking(st, deadline, Waits::Other, Core::ready_queue);
        got.transpose()
    }

    /// [`recv_message`](Self::recv_message) without waiting.
    pub fn try_recv_message(&self) -> Result<Option<Message>, RecvError> {
        try_recv_message(&self.core)
    }

    /// Sends one message to the host, waiting up to `timeout` for room. For plain
    /// messages; a request sent this way is not a call (its response would be late).
    pub fn send(&self, meta: Meta, payload: &[u8], timeout: Duration) -> Result<(), SendError> {
        let core = &*self.core;
        let deadline = Instant::now().checked_add(timeout);
        let st = core.lock();
        core.send_blocking(st, meta, payload, deadline, None).1
    }

    /// Answers a request the host sent (`request` is its header) with `payload`,
    /// waiting up to `timeout` for room (`shm.rpc.reply`).
    // shm[impl shm.rpc.reply]
    pub fn reply(
        &self,
        request: Meta,
        payload: &[u8],
        timeout: Duration,
    ) -> Result<(), ReplyError> {
        if request.kind != MsgKind::Request {
            return Err(ReplyError::NotRequest(request.kind));
        }
        Ok(self.send(request.with_kind(MsgKind::Response), payload, timeout)?)
    }

    /// The client's counters.
    pub fn stats(&self) -> RpcStats {
        self.core.stats()
    }

    /// The guest's peer id.
    pub fn peer_id(&self) -> PeerId {
        self.core.lock().guest.peer_id()
    }

    /// The limit on calls in flight.
    pub fn max_in_flight(&self) -> usize {
        self.core.max_in_flight
    }
}

fn try_recv_message(core: &Core) -> Result<Option<Message>, RecvError> {
    let mut st = core.lock();
    if let Some(got) = core.ready_queue(&mut st) {
        return got.map(Some);
    }
    // A receiver takes everything as it comes; with none, take what is there.
    if st.receiver.is_none() {
        if let Err(f) = core.pump(&mut st) {
            core.fail(&mut st, f);
        }
        if let Some(got) = core.ready_queue(&mut st) {
            return got.map(Some);
        }
    }
    Ok(None)
}

impl PendingCall {
    /// The call's correlation id.
    pub fn id(&self) -> u64 {
        self.call.id
    }

    /// A handle that cancels this call from any thread.
    pub fn canceller(&self) -> Canceller {
        canceller(&self.call)
    }

    /// Waits up to `timeout` for the response. When it passes the call ends with
    /// [`CallError::TimedOut`]: its entry is removed and the host is sent a Cancel
    /// (`shm.rpc.timeout`).
    // shm[impl shm.rpc.timeout]
    pub fn wait(mut self, timeout: Duration) -> Result<Response, CallError> {
        let core = &*self.call.core;
        let (i, id) = (self.call.place, self.call.id);
        let deadline = Instant::now().checked_add(timeout);
        let st = core.lock();
        let (mut st, got) = core.wait_blocking(st, deadline, Waits::Call(i), |c, st| {
            c.ready_call(st, i, id)
        });
        self.call.live = false;
        got.unwrap_or_else(|| {
            core.end_call(&mut st, i, id, End::TimedOut);
            Err(CallError::TimedOut)
        })
    }
}

// ---- async -------------------------------------------------------------------------

#[cfg(feature = "tokio")]
pub use self::asynk::{AsyncPendingCall, AsyncRpcClient};

#[cfg(feature = "tokio")]
mod asynk {
    use std::future::{poll_fn, Future};
    use std::io;
    use std::pin::Pin;
    use std::sync::Arc;
    use std::task::{Context, Poll};
    use std::time::{Duration, Instant};

    use tokio::io::unix::AsyncFd;
    use tokio::io::Interest;

    use super::{
        canceller, try_recv_message, CallError, CallRef, Canceller, Core, End, Receiver,
        ReplyError, Response, RpcOptions, RpcSetupError, RpcStats, State, Step, Waiter, Waits,
    };
    use crate::{Message, Meta, MsgKind, PeerId, RecvError, SendError, ShmGuest};

    /// An async client ([`RpcClient`](super::RpcClient)'s twin for tokio): calls are
    /// futures, and the task that receives waits on the doorbell through the runtime,
    /// never blocking its thread (`shm.rpc.async`). A cheap handle: clones share one
    /// guest.
    #[derive(Debug, Clone)]
    pub struct AsyncRpcClient {
        core: Arc<Core>,
    }

    /// A call whose request is out ([`AsyncRpcClient::start`]). Dropping it, or the
    /// future of its [`wait`](Self::wait), cancels the call.
    #[derive(Debug)]
    pub struct AsyncPendingCall {
        call: CallRef,
    }

    impl AsyncRpcClient {
        /// A client with the default options. Call it inside a tokio runtime with IO
        /// and time enabled: it registers the guest's doorbell with the runtime.
        pub fn new(guest: ShmGuest) -> Result<Self, RpcSetupError> {
            Self::with_options(guest, RpcOptions::default())
        }

        /// A client with `options` (inside a runtime, as [`new`](Self::new)).
        pub fn with_options(guest: ShmGuest, options: RpcOptions) -> Result<Self, RpcSetupError> {
            let mut core = Core::new(guest, options)?;
            let io = |op| move |source| RpcSetupError::Io { op, source };
            let fd = core.doorbell.try_clone().map_err(io("dup the doorbell"))?;
            // SAFETY: the `AsyncFd` owns `fd` (a duplicate of the guest's doorbell) for
            // as long as it is registered, and `as_raw_fd` always returns that fd.
            let bell = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }
                .map_err(io::Error::from)
                .map_err(io("register the doorbell"))?;
            core.async_bell = Some(bell);
            Ok(Self {
                core: Arc::new(core),
            })
        }

        /// Calls the host and waits for the response, all within `timeout`; see
        /// [`RpcClient::call`](super::RpcClient::call).
        pub async fn call(
            &self,
            msg_type: u32,
            payload: &[u8],
            timeout: Duration,
        ) -> Result<Response, CallError> {
            let start = Instant::now();
            let pending = self.start(msg_type, payload, timeout).await?;
            pending.wait(timeout.saturating_sub(start.elapsed())).await
        }

        /// Sends a request without waiting for its response; see
        /// [`RpcClient::start`](super::RpcClient::start).
        // shm[impl shm.rpc.correlate]
        // shm[impl shm.rpc.in-flight]
        // shm[impl shm.rpc.async]
        pub async fn start(
            &self,
            msg_type: u32,
            payload: &[u8],
            timeout: Duration,
        ) -> Result<AsyncPendingCall, CallError> {
            let core = &self.core;
            let deadline = Instant::now().checked_add(timeout);
            let place = wait_async(core, deadline, Waits::Other, Core::ready_place).await;
            let i = place.unwrap_or(Err(CallError::Busy {
                max_in_flight: core.max_in_flight,
            }))?;
            // From here the place is ours; dropping `call` (this future dropped, or a
            // failed send) frees it.
            let mut call = CallRef {
                core: core.clone(),
                place: i,
                id: 0,
                live: true,
            };
            call.id = core.begin_call(&mut core.lock(), i, msg_type);
            let meta = Meta::new(msg_type, call.id).with_kind(MsgKind::Request);
            send_async(core, meta, payload, deadline, Some(i))
                .await
                .map_err(CallError::from_send)?;
            Ok(AsyncPendingCall { call })
        }

        /// Receives the next message that is not a response, waiting as long as it
        /// takes (wrap it in `tokio::time::timeout` for a deadline).
        pub async fn recv_message(&self) -> Result<Message, RecvError> {
            loop {
                // Without a deadline the wait only ends with a value.
                if let Some(got) =
                    wait_async(&self.core, None, Waits::Other, Core::ready_queue).await
                {
                    return got;
                }
            }
        }

        /// [`recv_message`](Self::recv_message) without waiting.
        pub fn try_recv_message(&self) -> Result<Option<Message>, RecvError> {
            try_recv_message(&self.core)
        }

        /// Sends one message to the host, waiting for room as long as it takes.
        pub async fn send(&self, meta: Meta, payload: &[u8]) -> Result<(), SendError> {
            send_async(&self.core, meta, payload, None, None).await
        }

        /// Answers a request the host sent (`shm.rpc.reply`).
        // shm[impl shm.rpc.reply]
        pub async fn reply(&self, request: Meta, payload: &[u8]) -> Result<(), ReplyError> {
            if request.kind != MsgKind::Request {
                return Err(ReplyError::NotRequest(request.kind));
            }
            Ok(self
                .send(request.with_kind(MsgKind::Response), payload)
                .await?)
        }

        /// The client's counters.
        pub fn stats(&self) -> RpcStats {
            self.core.stats()
        }

        /// The guest's peer id.
        pub fn peer_id(&self) -> PeerId {
            self.core.lock().guest.peer_id()
        }
    }

    impl AsyncPendingCall {
        /// The call's correlation id.
        pub fn id(&self) -> u64 {
            self.call.id
        }

        /// A handle that cancels this call from any thread or task.
        pub fn canceller(&self) -> Canceller {
            canceller(&self.call)
        }

        /// Waits up to `timeout` for the response; see
        /// [`PendingCall::wait`](super::PendingCall::wait).
        // shm[impl shm.rpc.timeout]
        // shm[impl shm.rpc.async]
        pub async fn wait(mut self, timeout: Duration) -> Result<Response, CallError> {
            let core = self.call.core.clone();
            let (i, id) = (self.call.place, self.call.id);
            let deadline = Instant::now().checked_add(timeout);
            let got = wait_async(&core, deadline, Waits::Call(i), |c, st| {
                c.ready_call(st, i, id)
            })
            .await;
            self.call.live = false;
            got.unwrap_or_else(|| {
                core.end_call(&mut core.lock(), i, id, End::TimedOut);
                Err(CallError::TimedOut)
            })
        }
    }

    async fn send_async(
        core: &Core,
        meta: Meta,
        payload: &[u8],
        deadline: Option<Instant>,
        call: Option<usize>,
    ) -> Result<(), SendError> {
        {
            let mut st = core.lock();
            if let Some(done) = core.ready_send(&mut st, meta, payload, call) {
                return done;
            }
            st.space_waiters += 1;
        }
        let _space = SpaceWaiter(core);
        wait_async(core, deadline, Waits::Other, |c, st| {
            c.ready_send(st, meta, payload, call)
        })
        .await
        .unwrap_or(Err(SendError::TimedOut))
    }

    /// Counts a waiting send for as long as it waits (its future may be dropped).
    struct SpaceWaiter<'a>(&'a Core);

    impl Drop for SpaceWaiter<'_> {
        fn drop(&mut self) {
            self.0.lock().space_waiters -= 1;
        }
    }

    /// A waiting future's part in the client: if dropped mid-wait it gives up the
    /// receiver role (handing it on) and its waker.
    struct WaitGuard<'a> {
        core: &'a Core,
        waits: Waits,
        leading: bool,
        finished: bool,
    }

    impl Drop for WaitGuard<'_> {
        // shm[impl shm.rpc.async]
        fn drop(&mut self) {
            if self.finished {
                return;
            }
            let mut st = self.core.lock();
            if self.leading {
                st.receiver = None;
            }
            if let Waits::Call(i) = self.waits {
                if matches!(st.places[i].waiter, Waiter::Task(_)) {
                    st.places[i].waiter = Waiter::None;
                }
            }
            self.core.handoff(&mut st);
        }
    }

    /// The async twin of `Core::wait_blocking`.
    async fn wait_async<T>(
        core: &Core,
        deadline: Option<Instant>,
        waits: Waits,
        mut ready: impl FnMut(&Core, &mut State) -> Option<T>,
    ) -> Option<T> {
        // Fast path: no timer when the condition holds already.
        if let Some(v) = ready(core, &mut core.lock()) {
            return Some(v);
        }
        let mut guard = WaitGuard {
            core,
            waits,
            leading: false,
            finished: false,
        };
        let sleep = tokio::time::sleep_until(tokio::time::Instant::now());
        tokio::pin!(sleep);
        poll_fn(|cx| poll_wait(cx, &mut guard, deadline, sleep.as_mut(), &mut ready)).await
    }

    /// One poll of a waiting future: the receiver's step and its doorbell and timer,
    /// or a follower's waker and deadline timer.
    // shm[impl shm.rpc.async]
    // shm[impl shm.rpc.receive]
    fn poll_wait<T>(
        cx: &mut Context<'_>,
        guard: &mut WaitGuard<'_>,
        deadline: Option<Instant>,
        mut sleep: Pin<&mut tokio::time::Sleep>,
        ready: &mut impl FnMut(&Core, &mut State) -> Option<T>,
    ) -> Poll<Option<T>> {
        let core = guard.core;
        let waits = guard.waits;
        let mut st = core.lock();
        let unpark = |st: &mut State| {
            if let Some(r) = st.receiver.as_mut() {
                r.parked = false;
            }
        };
        if guard.leading {
            unpark(&mut st);
        }
        let out = loop {
            if let Some(v) = ready(core, &mut st) {
                break Some(v);
            }
            let now = Instant::now();
            if deadline.is_some_and(|d| now >= d) {
                break None;
            }
            if st.receiver.is_none() {
                st.receiver = Some(Receiver {
                    task: Some(cx.waker().clone()),
                    waits,
                    parked: false,
                });
                guard.leading = true;
            }
            if !guard.leading {
                register_task(&mut st, waits, cx.waker());
                if let Some(d) = deadline {
                    sleep.as_mut().reset(d.into());
                    if sleep.as_mut().poll(cx).is_ready() {
                        continue;
                    }
                }
                return Poll::Pending;
            }
            let Step::Idle { armed } = core.receive_step(&mut st) else {
                continue;
            };
            if let Some(v) = ready(core, &mut st) {
                break Some(v);
            }
            if let Some(r) = st.receiver.as_mut() {
                if !r.task.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    r.task = Some(cx.waker().clone());
                }
                r.parked = true;
            }
            if armed {
                if let Some(bell) = &core.async_bell {
                    // An error (no reactor) leaves the timer to bound the wait.
                    if let Poll::Ready(Ok(mut ready)) = bell.poll_read_ready(cx) {
                        // The next arm drains the doorbell; a ring after that is a new
                        // edge.
                        ready.clear_ready();
                        unpark(&mut st);
                        continue;
                    }
                }
            }
            let interval = st.guest.liveness_interval();
            let slice_end = match deadline {
                Some(d) => d.min(now + interval),
                None => now + interval,
            };
            sleep.as_mut().reset(slice_end.into());
            if sleep.as_mut().poll(cx).is_ready() {
                unpark(&mut st);
                core.check_host(&mut st);
                continue;
            }
            return Poll::Pending;
        };
        if guard.leading {
            st.receiver = None;
            guard.leading = false;
        }
        guard.finished = true;
        core.handoff(&mut st);
        Poll::Ready(out)
    }

    fn register_task(st: &mut State, waits: Waits, waker: &std::task::Waker) {
        match waits {
            Waits::Call(i) => {
                let w = &mut st.places[i].waiter;
                if !matches!(w, Waiter::Task(old) if old.will_wake(waker)) {
                    *w = Waiter::Task(waker.clone());
                }
            }
            Waits::Other => {
                if !st.general_tasks.iter().any(|w| w.will_wake(waker)) {
                    st.general_tasks.push(waker.clone());
                }
            }
        }
    }
}

// ---- descriptors ---------------------------------------------------------------------

/// A non-blocking, close-on-exec eventfd.
fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: eventfd takes no pointers; a non-negative result is a new descriptor
    // that nothing else owns.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and is owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Adds one to an eventfd (never blocks: a saturated counter is readable anyway).
fn write_eventfd(fd: RawFd) {
    let one = 1u64;
    // SAFETY: writes the 8 bytes of a live local into a descriptor we own.
    unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
}

/// Resets an eventfd to zero.
fn drain_eventfd(fd: RawFd) {
    let mut count = 0u64;
    // SAFETY: reads at most 8 bytes into a live local; non-blocking.
    unsafe { libc::read(fd, (&mut count as *mut u64).cast(), 8) };
}

/// Polls `wake` and, if given, `doorbell` for input, for at most `timeout` (rounded
/// up to a millisecond); returns whether `wake` is readable.
fn poll_two(wake: RawFd, doorbell: Option<RawFd>, timeout: Duration) -> bool {
    let mut fds = [
        libc::pollfd {
            fd: wake,
            events: libc::POLLIN,
            revents: 0,
        },
        // poll(2) ignores a negative descriptor.
        libc::pollfd {
            fd: doorbell.unwrap_or(-1),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    let ms = timeout.as_nanos().div_ceil(1_000_000).min(i32::MAX as u128) as i32;
    // SAFETY: two pollfds we own; poll writes only their `revents`.
    let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, ms) };
    rc > 0 && fds[0].revents & libc::POLLIN != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn clients_calls_and_responses_are_send_and_sync() {
        assert_send_sync::<RpcClient>();
        assert_send_sync::<PendingCall>();
        assert_send_sync::<Canceller>();
        assert_send_sync::<Response>();
        #[cfg(feature = "tokio")]
        assert_send_sync::<AsyncRpcClient>();
    }

    #[test]
    fn ids_are_nonzero_and_name_their_place() {
        for (seq, place) in [(1u64, 0usize), (2, 31), (SEQ_LIMIT - 1, MAX_IN_FLIGHT - 1)] {
            let id = (seq << PLACE_BITS) | place as u64;
            assert_ne!(id, 0);
            assert_eq!((id & PLACE_MASK) as usize, place);
        }
    }
}
