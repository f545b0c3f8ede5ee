//! The host side of a shmhub segment.
//!
//! ```no_run
//! use shm_host::{ShmHost, SegmentConfig, Meta};
//! let mut host = ShmHost::create("/dev/shm/shmhub-example", SegmentConfig::default())?;
//! let peer = host.reserve_peer()?; // hand `peer` to the guest you are about to start
//! let mut buf = Vec::new();
//! if let Some(msg) = host.try_recv(&mut buf)? {
//!     host.try_send(msg.from, Meta::new(1, msg.meta.user_id), &buf)?;
//! }
//! # let _ = peer;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![warn(missing_docs)]

#[cfg(feature = "tokio")]
mod async_host;
mod broadcast;
mod doorbells;
mod file;
mod liveness;
mod peers;
mod rpc;
mod sealed;
mod spawn;

#[cfg(feature = "tokio")]
pub use async_host::AsyncHost;
pub use broadcast::{BroadcastError, BroadcastReport};
pub use shm_primitives::broadcast::{BroadcastRef, PeerSet};

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use shm_primitives::channel::copy_out;
use shm_primitives::large::LargeView;
pub use shm_primitives::large_link::LargeSendError;
use shm_primitives::large_link::{send_large, LargeChannelError, MAX_LARGE_PAYLOAD};
use shm_primitives::view::SlotBytes;
pub use shm_primitives::Message;
use shm_primitives::Payload;
use shm_primitives::{ChannelSendError, InitError, MmapRegion, Segment, SlotLoan};
pub use shm_primitives::{
    Direction, HeapRegion, LayoutError, Meta, MsgKind, PeerId, PeerState, SegmentConfig,
    ShmBacking, SlotClass, SlotClasses, Violation, WaitPolicy, INLINE_CAPACITY,
};

use doorbells::Doorbells;
use file::{io_err, InstalledPath, TempSegment};
pub use file::{segment_path, SEGMENT_DIR, SEGMENT_MODE, SEGMENT_PREFIX};
use liveness::GuestLink;
pub use liveness::{Death, DeathCause, DEFAULT_LIVENESS_INTERVAL};

/// Receives and sends that succeed at once between two looks at the clock for the
/// liveness checks (`shm.live.tick`): one clock read per this many messages.
const BUSY_OPS_PER_CHECK: u32 = 32;
use peers::HostPeer;
pub use peers::{PeerInfo, PeerStats, PeerUsage};
pub use rpc::{ReplyError, ReplyLoan};
pub use shm_primitives::slot::PoolUsage;
use spawn::Hub;
pub use spawn::{GuestOptions, SpawnError, SpawnTicket, SpawnedGuest};

/// Why a segment could not be created.
#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    /// The configuration cannot produce a segment.
    #[error("invalid configuration: {0}")]
    Layout(#[from] LayoutError),
    /// The path has no file name.
    #[error("invalid segment path {0:?}")]
    InvalidPath(PathBuf),
    /// Not enough room in the filesystem (a full /dev/shm).
    #[error("no space for a {size}-byte segment")]
    NoSpace {
        /// Bytes the segment needs.
        size: u64,
    },
    /// A live host owns a segment at this path.
    #[error("segment {0:?} is owned by a live host")]
    InUse(PathBuf),
    /// A system call failed.
    #[error("{op}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The OS error.
        source: io::Error,
    },
}

/// Why a message was not sent. Nothing was published.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// No such entry in this segment.
    #[error("{0} does not exist in this segment")]
    NoSuchPeer(PeerId),
    /// The peer is not attached.
    #[error("{peer} is not attached (state {state:?})")]
    NotAttached {
        /// The peer.
        peer: PeerId,
        /// Its state.
        state: PeerState,
    },
    /// The peer was fenced for a protocol violation.
    #[error("{peer} is fenced: {violation} (rule {})", violation.rule())]
    Fenced {
        /// The peer.
        peer: PeerId,
        /// What it did.
        violation: Violation,
    },
    /// The peer's ring is full: retry after it consumes (back-pressure, not loss).
    #[error("ring to {0} is full")]
    WouldBlockRing(PeerId),
    /// No free slot in the pool towards the peer: retry after it consumes.
    #[error("slot pool towards {0} is exhausted")]
    WouldBlockPool(PeerId),
    /// The payload is larger than a slot.
    #[error("payload of {len} bytes exceeds the {max}-byte slot")]
    TooLarge {
        /// Payload length.
        len: usize,
        /// Largest payload.
        max: usize,
    },
    /// A blocking send found no ring space or slot before its timeout.
    #[error("no room towards {0} before the timeout")]
    TimedOut(PeerId),
    /// A payload larger than the largest slot class could not be passed as a memory
    /// file (`shm.msg.large`).
    #[error("large payload: {0}")]
    Large(#[from] LargeSendError),
    /// The guest's doorbell is not linked yet (a path guest whose connection the host
    /// has not accepted), so no memory file can be passed to it: retry.
    #[error("{0} has no doorbell linked yet")]
    NoDoorbell(PeerId),
    /// The handle names a guest incarnation that is gone: the entry now holds
    /// generation `now` (`shm.recover.stale-handle`).
    #[error("{} generation {} is gone (entry now at generation {now})", handle.id, handle.generation)]
    Stale {
        /// The handle used.
        handle: PeerHandle,
        /// The entry's generation now.
        now: u32,
    },
}

impl SendError {
    /// True for the back-pressure errors a caller should retry.
    pub fn is_would_block(&self) -> bool {
        matches!(
            self,
            SendError::WouldBlockRing(_)
                | SendError::WouldBlockPool(_)
                | SendError::NoDoorbell(_)
                | SendError::Large(LargeSendError::WouldBlock)
        )
    }
}

/// Why a receive failed: one peer broke the protocol and was fenced. Other peers are
/// unaffected; call `try_recv` again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{peer} fenced: {violation} (rule {})", violation.rule())]
pub struct RecvError {
    /// The peer.
    pub peer: PeerId,
    /// What it did.
    pub violation: Violation,
}

/// Why a reservation or release failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PeerError {
    /// Every entry is in use.
    #[error("the peer table is full")]
    TableFull,
    /// No such entry in this segment.
    #[error("{0} does not exist in this segment")]
    NoSuchPeer(PeerId),
    /// The entry is not in the state the operation needs.
    #[error("{peer} is {state:?}")]
    WrongState {
        /// The peer.
        peer: PeerId,
        /// Its state.
        state: Option<PeerState>,
    },
}

/// One guest incarnation: a peer id and the generation the guest holds. Sending
/// through a handle reaches that guest or fails with [`SendError::Stale`]; it never
/// reaches a later guest that reuses the entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PeerHandle {
    /// The entry.
    pub id: PeerId,
    /// The generation of the guest it names.
    pub generation: u32,
}

/// Whom a send goes to: a [`PeerId`] (whichever guest holds the entry now) or a
/// [`PeerHandle`] (that guest only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target {
    id: PeerId,
    generation: Option<u32>,
}

impl From<PeerId> for Target {
    fn from(id: PeerId) -> Self {
        Self {
            id,
            generation: None,
        }
    }
}

impl From<PeerHandle> for Target {
    fn from(h: PeerHandle) -> Self {
        Self {
            id: h.id,
            generation: Some(h.generation),
        }
    }
}

/// A message received by the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Received {
    /// The guest that sent it.
    pub from: PeerId,
    /// The sender's generation.
    pub generation: u32,
    /// Its header.
    pub meta: Meta,
}

impl Received {
    /// A handle to the sender, for replies that must not reach a later guest.
    pub fn handle(&self) -> PeerHandle {
        PeerHandle {
            id: self.from,
            generation: self.generation,
        }
    }
}

/// What happens to messages the host sent a guest that left (died or detached)
/// before consuming them (`shm.delivery.to-guest`, `shm.delivery.at-least-once`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Delivery {
    /// They are discarded and counted (`PeerStats::discarded`); the entry is
    /// recycled for any guest.
    #[default]
    AtMostOnce,
    /// They are kept, in order, for the next guest that attaches with the same peer
    /// id (`ShmGuest::attach_path_with_id`, or a ticket from
    /// [`ShmHost::prepare_guest_for`] / [`ShmHost::spawn_for`]): the entry stays
    /// Reserved for it (counted in `PeerStats::retained`). A message the guest had
    /// consumed (even one whose view it still held) is not delivered again.
    AtLeastOnce,
}

type DeathHook = Box<dyn FnMut(&Death) + Send>;

/// The host of a segment: creates it, reserves peer ids, and exchanges messages with
/// every attached guest.
pub struct ShmHost {
    /// First field, so it drops first: the public path is unlinked while `segment`
    /// still holds the mapping and the owner lock.
    installed: Option<InstalledPath>,
    segment: Segment,
    /// The segment is a sealed memory file (`shm.file.memfd`), handed out by
    /// descriptor.
    sealed: bool,
    /// Cached at creation: the shared header is guest-writable.
    segment_id: [u64; 2],
    peers: Vec<HostPeer>,
    next_recv: usize,
    wait: WaitPolicy,
    liveness_interval: Duration,
    next_liveness: Instant,
    /// Receives and sends that succeeded since the clock was last read for liveness.
    busy_ops: u32,
    heartbeat: Option<Duration>,
    next_beat: Instant,
    death_hooks: Vec<DeathHook>,
    poll_scratch: Vec<libc::pollfd>,
    /// Every guest's doorbell, as one epoll set (`AsFd`).
    doorbells: Doorbells,
    /// Set while `host_parked` may say "doorbell" (cleared by the next receive).
    armed_recv: bool,
    /// The entry whose ring's `producer_parked` may say "doorbell".
    armed_send: Option<PeerId>,
}

impl ShmHost {
    /// Creates a file-backed segment at `path` (conventionally under `/dev/shm`).
    ///
    /// The segment is built under a temporary name in the same directory and moved
    /// into place only once it is complete and published, so no guest ever sees a
    /// half-built file at `path`. A file at `path` whose host is alive is refused
    /// ([`CreateError::InUse`]); one whose host died is replaced by a new inode (any
    /// process still mapping the old one keeps its bytes).
    // shm[impl shm.file.create]
    // shm[impl shm.topology.host]
    pub fn create(path: impl AsRef<Path>, config: SegmentConfig) -> Result<Self, CreateError> {
        let path = path.as_ref();
        let layout = config.layout()?;
        let tmp = TempSegment::create(path, layout.total_size)?;
        let file = tmp.file().try_clone().map_err(io_err("dup segment fd"))?;
        let map =
            MmapRegion::map(file, layout.total_size as usize).map_err(io_err("mmap segment"))?;
        let segment = init_segment(ShmBacking::Mmap(Arc::new(map)), config)?;
        let doorbells = Doorbells::new(segment.header().segment_id())
            .map_err(io_err("listen for doorbells"))?;
        segment.publish();
        let file = tmp.install(path)?;
        let installed =
            InstalledPath::new(path.to_path_buf(), &file).map_err(io_err("fstat segment"))?;
        Ok(Self::new(segment, doorbells, Some(installed)))
    }

    /// Creates a sealed segment: built in an anonymous memory file that has no name
    /// in any filesystem, published, then sealed so that no process can ever change
    /// its size (`shm.file.seals`). A guest cannot truncate it to make the host (or
    /// another guest) take `SIGBUS`, which a guest of a path segment can.
    ///
    /// Guests get it by descriptor: with a spawn ticket ([`spawn`](Self::spawn),
    /// [`prepare_guest`](Self::prepare_guest)), over a Unix socket
    /// ([`hand_over`](Self::hand_over)), or from [`segment_fd`](Self::segment_fd).
    /// It has no [`path`](Self::path), and nothing is left behind: the file goes away
    /// with the host and the last guest.
    // shm[impl shm.file.memfd]
    // shm[impl shm.topology.host]
    pub fn create_sealed(config: SegmentConfig) -> Result<Self, CreateError> {
        let layout = config.layout()?;
        let file = sealed::create(layout.total_size)?;
        let map =
            MmapRegion::map(file, layout.total_size as usize).map_err(io_err("mmap segment"))?;
        let segment = init_segment(ShmBacking::Mmap(Arc::new(map)), config)?;
        let doorbells = Doorbells::new(segment.header().segment_id())
            .map_err(io_err("listen for doorbells"))?;
        segment.publish();
        sealed::seal(segment.backing().file().expect("file-backed"))?;
        let mut host = Self::new(segment, doorbells, None);
        host.sealed = true;
        Ok(host)
    }

    /// Creates a heap-backed segment for guests in this process
    /// ([`ShmHost::backing`] gives them the memory).
    pub fn create_heap(config: SegmentConfig) -> Result<Self, CreateError> {
        let layout = config.layout()?;
        let heap = HeapRegion::new_zeroed(layout.total_size as usize)
            .map_err(io_err("allocate heap segment"))?;
        let segment = init_segment(ShmBacking::Heap(Arc::new(heap)), config)?;
        let doorbells = Doorbells::new(segment.header().segment_id())
            .map_err(io_err("listen for doorbells"))?;
        segment.publish();
        Ok(Self::new(segment, doorbells, None))
    }

    fn new(segment: Segment, doorbells: Doorbells, installed: Option<InstalledPath>) -> Self {
        let n = segment.layout().config.max_guests as usize;
        Self {
            segment_id: segment.header().segment_id(),
            segment,
            sealed: false,
            peers: (0..n).map(|_| HostPeer::default()).collect(),
            next_recv: 0,
            wait: WaitPolicy::default(),
            liveness_interval: DEFAULT_LIVENESS_INTERVAL,
            next_liveness: Instant::now(),
            busy_ops: 0,
            heartbeat: None,
            next_beat: Instant::now(),
            death_hooks: Vec::new(),
            poll_scratch: Vec::new(),
            doorbells,
            armed_recv: false,
            armed_send: None,
            installed,
        }
    }

    /// The public path of a file-backed segment (`None` for a sealed or heap-backed
    /// one).
    pub fn path(&self) -> Option<&Path> {
        self.installed.as_ref().map(|i| i.path())
    }

    /// Whether this is a sealed segment ([`create_sealed`](Self::create_sealed)).
    pub fn is_sealed(&self) -> bool {
        self.sealed
    }

    /// A new descriptor of a sealed segment, for a guest you hand it to yourself
    /// (it attaches with `ShmGuest::attach_fd`). Each call opens a new open file
    /// description (close-on-exec), never the one that holds the host's lock, so the
    /// guest's liveness lock is its own (`shm.fd.passing`). Fails with
    /// [`SpawnError::NotSealed`] for a path or heap segment.
    // shm[impl shm.fd.passing]
    pub fn segment_fd(&self) -> Result<OwnedFd, SpawnError> {
        let file = match self.segment.backing().file() {
            Some(file) if self.sealed => file,
            _ => return Err(SpawnError::NotSealed),
        };
        shm_primitives::memfd::reopen(file.as_fd()).map_err(|source| SpawnError::Io {
            op: "reopen the segment through /proc/self/fd",
            source,
        })
    }

    /// The memory of the segment, for in-process guests (`ShmGuest::attach_backing`).
    pub fn backing(&self) -> ShmBacking {
        self.segment.backing().clone()
    }

    /// The limits the segment was created with.
    pub fn config(&self) -> SegmentConfig {
        self.segment.layout().config
    }

    /// The segment's random 128-bit id.
    pub fn segment_id(&self) -> [u64; 2] {
        self.segment_id
    }

    /// The largest payload one message can carry: [`MAX_LARGE_PAYLOAD`] (payloads
    /// above [`max_slot_payload`](Self::max_slot_payload) travel in a memory file).
    pub fn max_payload(&self) -> usize {
        MAX_LARGE_PAYLOAD
    }

    /// The largest payload that travels in a slot (the largest class's slot size).
    pub fn max_slot_payload(&self) -> usize {
        self.config().max_slot_payload()
    }

    fn id_checked(&self, peer: PeerId) -> Option<usize> {
        self.segment.contains(peer).then(|| peer.index())
    }

    /// Reserves an Empty entry for a guest the host is about to start; the guest
    /// attaches with `ShmGuest::attach_path_with_id(path, id)`.
    // shm[impl shm.peer.reserve]
    pub fn reserve_peer(&mut self) -> Result<PeerId, PeerError> {
        self.reserve().map(|h| h.id)
    }

    /// Reserves the first Empty entry; its handle carries the generation the CAS
    /// reserved (never re-read from guest-writable memory).
    fn reserve(&mut self) -> Result<PeerHandle, PeerError> {
        for index in 0..self.peers.len() {
            let id = PeerId::from_index(index).expect("index < 255");
            let entry = self.segment.peer(id).expect("in range");
            if let Some(generation) = entry.try_reserve() {
                return Ok(PeerHandle { id, generation });
            }
        }
        Err(PeerError::TableFull)
    }

    /// The handle of the Reserved entry `peer`, which must have no ticket yet.
    fn reserved(&self, peer: PeerId) -> Result<PeerHandle, PeerError> {
        let entry = self.segment.peer(peer).ok_or(PeerError::NoSuchPeer(peer))?;
        let word = entry.load().ok();
        match word {
            Some(w)
                if w.state == PeerState::Reserved && self.peers[peer.index()].link.is_none() =>
            {
                Ok(PeerHandle {
                    id: peer,
                    generation: w.generation,
                })
            }
            _ => Err(PeerError::WrongState {
                peer,
                state: word.map(|w| w.state),
            }),
        }
    }

    /// How messages to a guest that leaves without consuming them are treated, from
    /// now on, for every entry (default [`Delivery::AtMostOnce`]).
    pub fn set_delivery(&mut self, delivery: Delivery) {
        for hp in &mut self.peers {
            hp.at_least_once = delivery == Delivery::AtLeastOnce;
        }
    }

    /// Returns a reservation no guest claimed to Empty (with a new generation).
    // shm[impl shm.peer.release-reservation]
    /// An entry that retained messages for a returning guest (at-least-once
    /// delivery) gives them up: they are counted as discarded.
    pub fn release_reservation(&mut self, peer: PeerId) -> Result<(), PeerError> {
        let entry = self.segment.peer(peer).ok_or(PeerError::NoSuchPeer(peer))?;
        // A guest that rewrote its word to Reserved is fenced, not released: its area
        // needs the reset of a recovery (`shm.peer.observed`).
        if let Some(hp) = self.peers.get_mut(peer.index()) {
            if hp.observe(entry).is_err() {
                return Err(PeerError::WrongState {
                    peer,
                    state: entry.load().ok().map(|w| w.state),
                });
            }
        }
        let reserved = matches!(entry.load(), Ok(w) if w.state == PeerState::Reserved);
        if reserved {
            if let Some(hp) = self.peers.get_mut(peer.index()) {
                peers::forget_retained(&self.segment, peer, hp);
            }
        }
        if entry.release_reservation() {
            // The ticket made for it (if any) speaks for no later guest.
            if let Some(hp) = self.peers.get_mut(peer.index()) {
                hp.drop_link();
            }
            Ok(())
        } else {
            Err(PeerError::WrongState {
                peer,
                state: entry.load().ok().map(|w| w.state),
            })
        }
    }

    /// State, generation and counters of one peer entry.
    // shm[impl shm.host.peer-state]
    pub fn peer_info(&self, peer: PeerId) -> Option<PeerInfo> {
        let index = self.id_checked(peer)?;
        let entry = self.segment.peer(peer)?;
        Some(self.peers[index].info(entry))
    }

    /// Ids of the entries currently in state Attached.
    pub fn attached_peers(&self) -> Vec<PeerId> {
        (0..self.peers.len())
            .filter_map(PeerId::from_index)
            .filter(|&id| {
                let word = self.segment.peer(id).and_then(|e| e.load().ok());
                word.is_some_and(|w| w.state == PeerState::Attached)
            })
            .collect()
    }

    /// Sends one message to `peer`: inline when the payload fits in the descriptor
    /// (`INLINE_CAPACITY` bytes), otherwise through a slot. Never blocks; a full ring
    /// or pool is a `WouldBlock` error and nothing is published.
    pub fn try_send(
        &mut self,
        to: impl Into<Target>,
        meta: Meta,
        payload: &[u8],
    ) -> Result<(), SendError> {
        let to = to.into();
        self.link_for_large(to.id, payload.len());
        let sent = send_once(&self.segment, &mut self.peers, to, meta, payload);
        self.after_send(to.id, &sent);
        sent
    }

    /// Before a large send to a guest whose doorbell is not linked yet: accepts
    /// pending connections, so a path guest that just attached can take a file.
    #[inline]
    fn link_for_large(&mut self, to: PeerId, len: usize) {
        let unlinked = self.peers.get(to.index()).is_some_and(|p| p.link.is_none());
        if unlinked && len > self.max_slot_payload() {
            self.doorbells.accept(&self.segment, &mut self.peers);
        }
    }

    /// Receives one message from any guest into `buf` (replacing its contents).
    ///
    /// Guests are served round-robin, starting after the one served last, so a busy
    /// guest cannot starve the others. Returns `Ok(None)` when no guest has anything.
    /// Entries whose guest said goodbye are recycled once their messages are drained.
    /// A guest that broke the protocol is fenced and reported once as `Err`; the call
    /// can be repeated at once for the others.
    ///
    /// When no guest has anything, and at most once per liveness interval, it also
    /// checks which guests died and recovers their entries (`shm.live.tick`).
    pub fn try_recv(&mut self, buf: &mut Vec<u8>) -> Result<Option<Received>, RecvError> {
        let got = recv_once(self.scan(), buf)?;
        match got {
            Some((msg, ())) => self.after_recv(msg.from),
            None => self.check_liveness_if_due(),
        }
        Ok(got.map(|(msg, ())| msg))
    }

    /// How blocking calls wait: spin rounds before parking (default: adaptive).
    pub fn set_wait_policy(&mut self, policy: WaitPolicy) {
        self.wait = policy;
    }

    /// Receives one message from any guest, waiting up to `timeout`; `Ok(None)` when
    /// the timeout passes first. While idle the host sleeps on the host-wide bell (a
    /// shared futex every guest rings after publishing while the host is parked),
    /// waking at least once per liveness interval to detect and recover dead guests.
    // shm[impl shm.wake.host-bell]
    // shm[impl shm.live.tick]
    pub fn recv(
        &mut self,
        buf: &mut Vec<u8>,
        timeout: Duration,
    ) -> Result<Option<Received>, RecvError> {
        let got = self.recv_with(timeout, |scan| recv_once(scan, buf))?;
        Ok(got.map(|(r, ())| r))
    }

    /// Receives one message from any guest without copying its payload (served as
    /// [`try_recv`](Self::try_recv) serves them): a slot payload is read in place and
    /// its slot is freed when the [`Message`] is dropped (`shm.slot.view`). Any
    /// number may be held at once, and they may outlive their guest.
    pub fn try_recv_message(&mut self) -> Result<Option<(Received, Message)>, RecvError> {
        let got = take_once(self.scan())?;
        match &got {
            Some((r, _)) => self.after_recv(r.from),
            None => self.check_liveness_if_due(),
        }
        Ok(got)
    }

    /// [`try_recv_message`](Self::try_recv_message), waiting up to `timeout` as
    /// [`recv`](Self::recv) does.
    pub fn recv_message(
        &mut self,
        timeout: Duration,
    ) -> Result<Option<(Received, Message)>, RecvError> {
        self.recv_with(timeout, take_once)
    }

    /// The blocking receive loop around one non-blocking pass.
    fn recv_with<T>(
        &mut self,
        timeout: Duration,
        mut once: impl FnMut(Scan<'_>) -> Result<Option<(Received, T)>, RecvError>,
    ) -> Result<Option<(Received, T)>, RecvError> {
        // Fast path: no clock read when a message is already waiting.
        if let Some(got) = once(self.scan())? {
            self.after_recv(got.0.from);
            return Ok(Some(got));
        }
        let deadline = Instant::now().checked_add(timeout);
        loop {
            shm_primitives::crash::point(shm_primitives::crash::CrashPoint::HostParking);
            let slice = slice_until(deadline, self.liveness_interval);
            let bell = self.segment.header().host_bell();
            let got = shm_primitives::wait::wait_for(self.wait, slice, &bell, || {
                once(Scan {
                    segment: &self.segment,
                    table: &mut self.peers,
                    next_recv: &mut self.next_recv,
                    doorbells: &mut self.doorbells,
                })
            })?;
            if let Some(msg) = got {
                self.after_recv(msg.0.from);
                return Ok(Some(msg));
            }
            self.check_liveness_if_due();
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Ok(None);
            }
        }
    }

    /// What one receive pass needs of the host.
    #[inline]
    fn scan(&mut self) -> Scan<'_> {
        Scan {
            segment: &self.segment,
            table: &mut self.peers,
            next_recv: &mut self.next_recv,
            doorbells: &mut self.doorbells,
        }
    }

    /// Loans a slot of at least `len` bytes towards `to`, to be written in place and
    /// sent with [`HostLoan::send`] (`shm.slot.loan`); dropping the loan returns the
    /// slot. Never blocks: a full ring or pool is a `WouldBlock` error.
    pub fn loan(&mut self, to: impl Into<Target>, len: usize) -> Result<HostLoan<'_>, SendError> {
        let to = to.into();
        let (slot, bytes) = loan_once(&self.segment, &mut self.peers, to, len)?;
        Ok(HostLoan {
            host: self,
            to,
            slot,
            bytes,
            done: false,
        })
    }

    /// Like [`loan`](Self::loan), waiting up to `timeout` for ring space and a free
    /// slot towards `to` (`shm.slot.exhausted`), as [`send`](Self::send) waits.
    // shm[impl shm.slot.exhausted]
    pub fn loan_timeout(
        &mut self,
        to: impl Into<Target>,
        len: usize,
        timeout: Duration,
    ) -> Result<HostLoan<'_>, SendError> {
        let to = to.into();
        let once =
            |segment: &Segment, peers: &mut [HostPeer]| match loan_once(segment, peers, to, len) {
                Ok(got) => Ok(Some(got)),
                Err(e) if e.is_would_block() => Ok(None),
                Err(e) => Err(e),
            };
        let mut got = once(&self.segment, &mut self.peers)?;
        let deadline = Instant::now().checked_add(timeout);
        while got.is_none() {
            let ring = self
                .segment
                .ring(to.id, Direction::ToGuest)
                .ok_or(SendError::NoSuchPeer(to.id))?;
            let slice = slice_until(deadline, self.liveness_interval);
            got = shm_primitives::wait::wait_for(self.wait, slice, &ring.space_bell(), || {
                once(&self.segment, &mut self.peers)
            })?;
            if got.is_none() {
                self.check_liveness_if_due();
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    return Err(SendError::TimedOut(to.id));
                }
            }
        }
        let (slot, bytes) = got.expect("loop ends with a loan");
        Ok(HostLoan {
            host: self,
            to,
            slot,
            bytes,
            done: false,
        })
    }

    /// Sends one message, waiting up to `timeout` for ring space and a free slot
    /// (parked on the ring's consumer counter, woken when the guest consumes). A guest
    /// that dies meanwhile ends the wait with an error within one liveness interval.
    // shm[impl shm.wake.space]
    pub fn send(
        &mut self,
        to: impl Into<Target>,
        meta: Meta,
        payload: &[u8],
        timeout: Duration,
    ) -> Result<(), SendError> {
        let to = to.into();
        self.link_for_large(to.id, payload.len());
        // Fast path: no clock read when there is room.
        match send_once(&self.segment, &mut self.peers, to, meta, payload) {
            Err(e) if e.is_would_block() => {}
            done => {
                self.after_send(to.id, &done);
                return done;
            }
        }
        let deadline = Instant::now().checked_add(timeout);
        loop {
            let ring = self
                .segment
                .ring(to.id, Direction::ToGuest)
                .ok_or(SendError::NoSuchPeer(to.id))?;
            let slice = slice_until(deadline, self.liveness_interval);
            let sent =
                shm_primitives::wait::wait_for(self.wait, slice, &ring.space_bell(), || {
                    match send_once(&self.segment, &mut self.peers, to, meta, payload) {
                        Ok(()) => Ok(Some(())),
                        Err(e) if e.is_would_block() => Ok(None),
                        Err(e) => Err(e),
                    }
                })?;
            if sent.is_some() {
                self.after_send(to.id, &Ok(()));
                return Ok(());
            }
            self.check_liveness_if_due();
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Err(SendError::TimedOut(to.id));
            }
        }
    }

    /// How often liveness is checked while the host is inside `recv`, `try_recv`,
    /// `send` or `maintain` (default [`DEFAULT_LIVENESS_INTERVAL`]): the bound on how
    /// long a dead guest goes unnoticed while the host is serving.
    pub fn set_liveness_interval(&mut self, interval: Duration) {
        self.liveness_interval = interval.max(Duration::from_micros(100));
    }

    /// Turns the heartbeat on (guests that see no beat for twice `interval` report the
    /// host dead) or off. The host beats from its liveness checks, so it must call
    /// into its API at least that often (`shm.live.heartbeat`).
    // shm[impl shm.live.heartbeat]
    pub fn set_heartbeat(&mut self, interval: Option<Duration>) {
        let ms = interval.map_or(0, |d| d.as_millis().clamp(1, u128::from(u32::MAX)) as u32);
        self.heartbeat = interval.map(|_| Duration::from_millis(u64::from(ms)));
        self.liveness_interval = match self.heartbeat {
            Some(beat) => self.liveness_interval.min(beat / 2),
            None => self.liveness_interval,
        };
        self.segment.header().set_heartbeat_interval_ms(ms);
        self.segment.header().beat();
    }

    /// Registers a callback run once for every guest death the host detects, after
    /// the dead guest's entry has been recovered (`shm.recover.callback`). Callbacks
    /// run inside the host call that detected the death, in registration order.
    pub fn on_death(&mut self, callback: impl FnMut(&Death) + Send + 'static) {
        self.death_hooks.push(Box::new(callback));
    }

    /// Slot and ring occupancy of one entry, for accounting (read from shared memory,
    /// so informational only).
    pub fn peer_usage(&self, peer: PeerId) -> Option<PeerUsage> {
        peers::usage(&self.segment, peer)
    }

    /// Reserves an entry for a child this host is about to start and creates its
    /// doorbell (a socket pair: the host keeps one end, the ticket carries the other).
    /// Hand the ticket to the child (see [`SpawnTicket::configure`]); if no child ever
    /// holds the doorbell, or the child dies before attaching, the reservation is
    /// released (`shm.spawn.failure`).
    // shm[impl shm.spawn.ticket]
    pub fn prepare_guest(
        &mut self,
        options: GuestOptions,
    ) -> Result<(PeerHandle, SpawnTicket), SpawnError> {
        self.ticket(None, options)
    }

    /// Like [`prepare_guest`](Self::prepare_guest), for an entry that is already
    /// Reserved: one that kept a departed guest's undelivered messages
    /// ([`Delivery::AtLeastOnce`]), so the guest restarted with this ticket receives
    /// them, in order, before anything newer (`shm.delivery.at-least-once`).
    pub fn prepare_guest_for(
        &mut self,
        peer: PeerId,
        options: GuestOptions,
    ) -> Result<(PeerHandle, SpawnTicket), SpawnError> {
        self.ticket(Some(peer), options)
    }

    /// A ticket for a new reservation, or for the Reserved entry `peer`.
    fn ticket(
        &mut self,
        peer: Option<PeerId>,
        options: GuestOptions,
    ) -> Result<(PeerHandle, SpawnTicket), SpawnError> {
        let hub = match self.path() {
            Some(path) => Hub::Path(path.to_path_buf()),
            None if self.sealed => Hub::Fd(self.segment_fd()?),
            None => return Err(SpawnError::NoPath),
        };
        let (host_end, child_end) =
            shm_primitives::doorbell::pair().map_err(|source| SpawnError::Io {
                op: "socketpair",
                source,
            })?;
        let handle = match peer {
            None => self.reserve()?,
            Some(id) => self.reserved(id)?,
        };
        let link = GuestLink {
            generation: handle.generation,
            doorbell: Arc::new(host_end),
            pidfd: None,
            child: None,
            large_in: Default::default(),
        };
        self.doorbells.watch_link(handle.id.index(), &link);
        self.peers[handle.id.index()].set_link(link);
        let ticket = SpawnTicket {
            hub,
            handle,
            child_end,
            attach_timeout: options.attach_timeout,
        };
        Ok((handle, ticket))
    }

    /// Prepares a ticket, passes it to `cmd` through the environment, spawns the
    /// child and keeps its pidfd (and reaps it when it dies). If the spawn fails the
    /// reservation is released and nothing is left behind (`shm.spawn.failure`).
    // shm[impl shm.spawn.pidfd]
    // shm[impl shm.spawn.failure]
    pub fn spawn(&mut self, cmd: &mut Command) -> Result<SpawnedGuest, SpawnError> {
        let prepared = self.prepare_guest(GuestOptions::default())?;
        self.spawn_prepared(prepared, cmd)
    }

    /// Like [`spawn`](Self::spawn), into the Reserved entry `peer` (see
    /// [`prepare_guest_for`](Self::prepare_guest_for)): restarts a guest that left
    /// messages retained for it.
    pub fn spawn_for(
        &mut self,
        peer: PeerId,
        cmd: &mut Command,
    ) -> Result<SpawnedGuest, SpawnError> {
        let prepared = self.prepare_guest_for(peer, GuestOptions::default())?;
        self.spawn_prepared(prepared, cmd)
    }

    /// Reserves an entry for the process at the other end of `socket` (a connected
    /// Unix stream socket) and sends it the ticket, with the segment's descriptor and
    /// its doorbell end, in one message (`shm.fd.passing`, [`SpawnTicket::send_to`]);
    /// that process attaches with `ShmGuest::from_ticket_socket`. Only for a sealed
    /// segment ([`SpawnError::NotSealed`] otherwise). If the message cannot be sent
    /// (a full or closed socket) the reservation is released before returning the
    /// error. If the process never attaches (it drops the descriptors or dies), the
    /// doorbell's hang-up releases the reservation, as for a spawned child.
    pub fn hand_over(
        &mut self,
        socket: impl AsFd,
        options: GuestOptions,
    ) -> Result<PeerHandle, SpawnError> {
        if !self.sealed {
            return Err(SpawnError::NotSealed);
        }
        let (handle, ticket) = self.prepare_guest(options)?;
        if let Err(e) = ticket.send_to(socket) {
            let _ = self.release_reservation(handle.id);
            return Err(e);
        }
        Ok(handle)
    }

    fn spawn_prepared(
        &mut self,
        (handle, ticket): (PeerHandle, SpawnTicket),
        cmd: &mut Command,
    ) -> Result<SpawnedGuest, SpawnError> {
        ticket.configure(cmd);
        let child = match cmd.spawn() {
            Ok(child) => child,
            Err(source) => {
                drop(ticket);
                let _ = self.release_reservation(handle.id);
                return Err(SpawnError::Io {
                    op: "spawn guest",
                    source,
                });
            }
        };
        // Our copy of the child's end must go, or the child's death is no hang-up.
        drop(ticket);
        let pid = child.id();
        let link = self.peers[handle.id.index()]
            .link
            .as_mut()
            .expect("set by prepare_guest");
        link.pidfd = liveness::pidfd_open(pid);
        link.child = Some(child);
        self.doorbells.watch_pidfd(handle.id.index(), link);
        Ok(SpawnedGuest { handle, pid })
    }

    /// Sends `signal` to a guest this host spawned (through its pidfd, so a recycled
    /// pid is never hit). Fails if the handle is stale or the guest was not spawned by
    /// [`spawn`](Self::spawn).
    pub fn signal_guest(&self, handle: PeerHandle, signal: i32) -> io::Result<()> {
        let word = self.segment.peer(handle.id).and_then(|e| e.load().ok());
        let link = self
            .peers
            .get(handle.id.index())
            .and_then(|p| p.link.as_ref());
        match (word, link.and_then(|l| l.pidfd.as_ref())) {
            (Some(w), Some(pidfd)) if w.generation == handle.generation => {
                liveness::pidfd_signal(pidfd, signal)
            }
            _ => Err(io::Error::new(
                io::ErrorKind::NotFound,
                "no spawned guest with this handle",
            )),
        }
    }

    /// Recycles every entry whose guest said goodbye and whose messages to the host
    /// are all delivered, and recovers the entries of guests that died; returns how
    /// many entries went back to Empty. `try_recv` and `recv` do this too.
    // shm[impl shm.peer.recycle]
    pub fn maintain(&mut self) -> usize {
        let mut recycled = self.check_liveness();
        for index in 0..self.peers.len() {
            let peer = PeerId::from_index(index).expect("index < 255");
            let entry = self.segment.peer(peer).expect("in range");
            let hp = &mut self.peers[index];
            if hp.fenced.is_some() {
                continue;
            }
            let Ok(word) = hp.observe(entry) else {
                continue;
            };
            if word.state != PeerState::Goodbye {
                continue;
            }
            let ring = self
                .segment
                .ring(peer, Direction::ToHost)
                .expect("in range");
            match hp.inbox.pending(&ring) {
                Ok(0) if hp.unmapped(&self.segment, index, true) => {
                    peers::recycle(&self.segment, peer, hp, word.generation);
                    recycled += 1;
                }
                Ok(_) => {}
                Err(violation) => hp.fence(entry, word.generation, violation),
            }
        }
        recycled
    }

    /// Prepares to wait on this host's fd ([`AsFd`]) for messages: consumes pending
    /// doorbell rings, links guests that are connecting, recovers guests whose
    /// doorbell hung up, then marks the host parked on its doorbells, so every guest
    /// that publishes rings its doorbell. Then call [`try_recv`](Self::try_recv) until
    /// it returns `None`, and only then wait for the fd to become readable. The next
    /// message received disarms. Wait at most [`liveness_interval`] at a time (and
    /// call in again) so deaths of guests without a doorbell signal are noticed.
    ///
    /// [`liveness_interval`]: Self::liveness_interval
    // shm[impl shm.doorbell.asfd]
    // shm[impl shm.doorbell.arm]
    pub fn arm_doorbell_recv(&mut self) {
        self.service_doorbells();
        self.segment.header().host_bell().arm_doorbell();
        self.armed_recv = true;
    }

    /// Like [`arm_doorbell_recv`](Self::arm_doorbell_recv), for room towards one
    /// guest: the guest rings its doorbell when it consumes. Then retry
    /// [`try_send`](Self::try_send) before waiting; a successful send disarms.
    pub fn arm_doorbell_send(&mut self, to: impl Into<Target>) {
        self.service_doorbells();
        let id = to.into().id;
        if let Some(old) = self.armed_send.replace(id).filter(|&old| old != id) {
            if let Some(ring) = self.segment.ring(old, Direction::ToGuest) {
                ring.space_bell().disarm_doorbell();
            }
        }
        if let Some(ring) = self.segment.ring(id, Direction::ToGuest) {
            ring.space_bell().arm_doorbell();
        }
    }

    /// How often liveness is checked while the host is inside its API.
    pub fn liveness_interval(&self) -> Duration {
        self.liveness_interval
    }

    /// Drains the doorbell set and acts on what it found.
    fn service_doorbells(&mut self) {
        let found = self.doorbells.drain(&mut self.peers);
        if found.connecting {
            self.doorbells.accept(&self.segment, &mut self.peers);
        }
        if found.death {
            self.check_liveness();
        } else {
            self.check_liveness_if_due();
        }
    }

    /// After a send: disarms a space wait on that ring, and rings a guest that waits
    /// on a doorbell the host has not linked yet (a path guest whose connection is
    /// still queued).
    #[inline]
    fn after_send(&mut self, peer: PeerId, sent: &Result<(), SendError>) {
        if sent.is_err() {
            return;
        }
        if self.armed_send == Some(peer) {
            self.armed_send = None;
            if let Some(ring) = self.segment.ring(peer, Direction::ToGuest) {
                ring.space_bell().disarm_doorbell();
            }
        }
        if self.peers[peer.index()].link.is_none() {
            self.ring_unlinked(peer, Direction::ToGuest);
        }
        self.count_busy_op();
    }

    /// After a receive: disarms the doorbell wait, and rings an unlinked guest that
    /// waits for room (as in `after_send`).
    #[inline]
    fn after_recv(&mut self, from: PeerId) {
        if self.armed_recv {
            self.armed_recv = false;
            self.segment.header().host_bell().disarm_doorbell();
        }
        if self.peers[from.index()].link.is_none() {
            self.ring_unlinked(from, Direction::ToHost);
        }
        self.count_busy_op();
    }

    /// Counts one receive or send that succeeded; every [`BUSY_OPS_PER_CHECK`]th
    /// looks at the clock, so a host that always finds work (and so never finds
    /// nothing, nor sleeps) still runs its liveness checks once per interval.
    // shm[impl shm.live.tick]
    #[inline]
    fn count_busy_op(&mut self) {
        self.busy_ops += 1;
        if self.busy_ops >= BUSY_OPS_PER_CHECK {
            self.busy_ops = 0;
            self.check_liveness_if_due();
        }
    }

    #[cold]
    fn ring_unlinked(&mut self, peer: PeerId, dir: Direction) {
        let Some(ring) = self.segment.ring(peer, dir) else {
            return;
        };
        let wants = match dir {
            Direction::ToGuest => ring.consumer_wants_doorbell(),
            Direction::ToHost => ring.producer_wants_doorbell(),
        };
        if !wants {
            return;
        }
        self.doorbells.accept(&self.segment, &mut self.peers);
        if let Some(link) = &self.peers[peer.index()].link {
            shm_primitives::doorbell::ring(link.doorbell.as_fd());
        }
    }

    fn check_liveness_if_due(&mut self) {
        if Instant::now() >= self.next_liveness {
            self.check_liveness();
        }
    }

    /// One liveness pass (`shm.live.guest-death`): polls every spawned child's pidfd
    /// and doorbell in one system call, tests the liveness lock of every other
    /// attached guest, and recovers each dead guest's entry. Returns how many entries
    /// went back to Empty.
    // shm[impl shm.live.guest-death]
    fn check_liveness(&mut self) -> usize {
        let now = Instant::now();
        self.next_liveness = now + self.liveness_interval;
        if let Some(beat) = self.heartbeat {
            if now >= self.next_beat {
                self.segment.header().beat();
                self.next_beat = now + beat / 2;
            }
        }
        // New path guests first, so their doorbells count below.
        self.doorbells.accept(&self.segment, &mut self.peers);
        let events = liveness::poll_links(
            self.peers.iter().map(|p| p.link.as_ref()),
            &mut self.poll_scratch,
        );
        let lock_file = self.segment.backing().file();
        let mut deaths = Vec::new();
        for index in 0..self.peers.len() {
            let peer = PeerId::from_index(index).expect("index < 255");
            let entry = self.segment.peer(peer).expect("in range");
            let hp = &mut self.peers[index];
            // Observed as when serving (`shm.peer.observed`): a guest that rewrote its
            // word before dying is fenced now, and then recovered as fenced.
            let word = match hp.observe(entry) {
                Ok(w) => w,
                // A fenced guest may scribble on its word; the fence generation is ours.
                Err(_) => hp.fence_word(),
            };
            let fenced = hp.fenced.is_some();
            let ev = match hp.link_matches(word.generation) {
                true => events.get(index).copied().unwrap_or_default(),
                false => Default::default(),
            };
            let cause = if ev.exited {
                Some(DeathCause::ProcessExited)
            } else if ev.hung_up {
                Some(DeathCause::HungUp)
            } else {
                None
            };
            let death = match (word.state, fenced) {
                (PeerState::Reserved, _) => cause.map(|c| (c, false)),
                (PeerState::Attached, _) | (PeerState::Goodbye, true) => {
                    let by_lock = || {
                        let offset = self.segment.layout().peer_offset(index);
                        match lock_file {
                            Some(f) if !liveness::lock_held(f, offset) => {
                                Some(DeathCause::LockReleased)
                            }
                            _ => None,
                        }
                    };
                    cause.or_else(by_lock).map(|c| (c, true))
                }
                _ => None,
            };
            if let Some((cause, attached)) = death {
                if let Some(d) = peers::recover(&self.segment, peer, hp, word, cause, attached) {
                    deaths.push(d);
                }
            }
        }
        for hp in &mut self.peers {
            hp.reap_departed();
        }
        // shm[impl shm.recover.callback]: once per recovered incarnation.
        for death in &deaths {
            for hook in &mut self.death_hooks {
                hook(death);
            }
        }
        deaths.len()
    }
}

/// The host's doorbell set: an epoll fd that is readable when a guest rang (after
/// [`ShmHost::arm_doorbell_recv`] or [`ShmHost::arm_doorbell_send`]), when a guest's
/// doorbell hung up or a spawned child exited, or when a path guest is connecting.
// shm[impl shm.doorbell.asfd]
impl AsFd for ShmHost {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.doorbells.fd()
    }
}

impl AsRawFd for ShmHost {
    fn as_raw_fd(&self) -> RawFd {
        self.doorbells.fd().as_raw_fd()
    }
}

impl Drop for ShmHost {
    /// The host's goodbye: marks the segment closed, then wakes every parked guest so
    /// each sees it at once (`shm.live.host-close`).
    fn drop(&mut self) {
        self.segment.header().close();
        for index in 0..self.peers.len() {
            let peer = PeerId::from_index(index).expect("index < 255");
            for dir in [Direction::ToGuest, Direction::ToHost] {
                if let Some(ring) = self.segment.ring(peer, dir) {
                    ring.wake_waiters();
                }
            }
        }
        for hp in &mut self.peers {
            hp.reap_departed();
        }
    }
}

/// The next sleep slice: at most `interval`, and never past `deadline`.
fn slice_until(deadline: Option<Instant>, interval: Duration) -> Duration {
    match deadline {
        Some(d) => d.saturating_duration_since(Instant::now()).min(interval),
        None => interval,
    }
}

/// One non-blocking send (the body of `try_send`), borrowing only what it uses so a
/// blocking `send` can hold the ring's bell at the same time.
// shm[impl shm.recover.stale-handle]
fn send_once(
    segment: &Segment,
    table: &mut [HostPeer],
    to: Target,
    meta: Meta,
    payload: &[u8],
) -> Result<(), SendError> {
    let peer = to.id;
    let (entry, generation) = sendable(segment, table, to)?;
    let hp = &mut table[peer.index()];
    let ring = segment.ring(peer, Direction::ToGuest).expect("in range");
    let bell = peers::doorbell(&hp.link, generation);
    if payload.len() > segment.layout().config.max_slot_payload() {
        let bell = bell.ok_or(SendError::NoDoorbell(peer))?;
        let boxes = (&mut hp.outbox, &mut hp.large_out);
        let file = send_large(&ring, bell, boxes, meta, payload).map_err(|e| match e {
            LargeChannelError::Channel(e) => channel_err(hp, entry, peer, generation, e),
            LargeChannelError::Pass(e) => SendError::Large(e),
        })?;
        hp.stats.sent += 1;
        if hp.at_least_once {
            let pos = hp.outbox.published().wrapping_sub(1);
            let head = ring.head_from(hp.outbox.published()).unwrap_or(0);
            hp.keep_file(pos, file, head);
        }
        return Ok(());
    }
    let pools = segment.pools(peer, Direction::ToGuest).expect("in range");
    match hp.outbox.send(&ring, &pools, meta, payload, bell) {
        Ok(()) => {
            hp.stats.sent += 1;
            Ok(())
        }
        Err(e) => Err(channel_err(hp, entry, peer, generation, e)),
    }
}

/// Checks that `to` names an attached guest; its entry and generation.
fn sendable<'s>(
    segment: &'s Segment,
    table: &mut [HostPeer],
    to: Target,
) -> Result<(&'s shm_primitives::peer::PeerEntry, u32), SendError> {
    let peer = to.id;
    let entry = segment.peer(peer).ok_or(SendError::NoSuchPeer(peer))?;
    let hp = &mut table[peer.index()];
    let word = match hp.observe(entry) {
        Ok(w) => w,
        Err(violation) => return Err(SendError::Fenced { peer, violation }),
    };
    if let Some(generation) = to.generation.filter(|&g| g != word.generation) {
        return Err(SendError::Stale {
            handle: PeerHandle {
                id: peer,
                generation,
            },
            now: word.generation,
        });
    }
    if word.state != PeerState::Attached {
        return Err(SendError::NotAttached {
            peer,
            state: word.state,
        });
    }
    Ok((entry, word.generation))
}

/// Maps a channel error to the API's, fencing the guest for a violation.
fn channel_err(
    hp: &mut HostPeer,
    entry: &shm_primitives::peer::PeerEntry,
    peer: PeerId,
    generation: u32,
    e: ChannelSendError,
) -> SendError {
    match e {
        ChannelSendError::RingFull => SendError::WouldBlockRing(peer),
        ChannelSendError::PoolExhausted => SendError::WouldBlockPool(peer),
        ChannelSendError::TooLarge { len, max } => SendError::TooLarge { len, max },
        ChannelSendError::Violation(violation) => {
            hp.fence(entry, generation, violation);
            SendError::Fenced { peer, violation }
        }
    }
}

/// Allocates a slot towards `to` (the body of `loan`).
fn loan_once(
    segment: &Segment,
    table: &mut [HostPeer],
    to: Target,
    len: usize,
) -> Result<(SlotLoan, SlotBytes), SendError> {
    let peer = to.id;
    let (entry, generation) = sendable(segment, table, to)?;
    let hp = &mut table[peer.index()];
    let ring = segment.ring(peer, Direction::ToGuest).expect("in range");
    let pools = segment.pools(peer, Direction::ToGuest).expect("in range");
    let slot = hp
        .outbox
        .loan(&ring, &pools, len)
        .map_err(|e| channel_err(hp, entry, peer, generation, e))?;
    let ptr = pools
        .class(slot.class as usize)
        .and_then(|p| p.data_ptr(slot.index))
        .expect("a loan names a slot of its pool");
    Ok((slot, SlotBytes::new(ptr, slot.capacity as usize)))
}

/// A slot towards one guest, loaned for writing in place ([`ShmHost::loan`]).
pub struct HostLoan<'h> {
    host: &'h mut ShmHost,
    to: Target,
    slot: SlotLoan,
    bytes: SlotBytes,
    /// Set once `send` has published or returned the slot.
    done: bool,
}

impl std::fmt::Debug for HostLoan<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostLoan")
            .field("to", &self.to)
            .field("slot", &self.slot)
            .finish_non_exhaustive()
    }
}

impl HostLoan<'_> {
    /// Publishes the first `len` bytes of the slot as one message to the guest the
    /// loan was made for (`len` at most [`capacity`](SlotBytes::capacity), otherwise
    /// `TooLarge` and the loan is returned). A guest that left meanwhile makes this
    /// fail as `try_send` would, and the slot is returned.
    pub fn send(mut self, meta: Meta, len: usize) -> Result<(), SendError> {
        // Published or returned below, whatever happens: the drop has nothing to do.
        self.done = true;
        let (to, slot, capacity) = (self.to, self.slot, self.bytes.capacity());
        let host = &mut *self.host;
        let peer = to.id;
        let segment = &host.segment;
        let pools = segment.pools(peer, Direction::ToGuest).expect("in range");
        let checked = sendable(segment, &mut host.peers, to);
        let hp = &mut host.peers[peer.index()];
        let (entry, generation) = match checked {
            Ok(ok) if len <= capacity => ok,
            Ok(_) => {
                hp.outbox.abandon(&pools, slot);
                return Err(SendError::TooLarge { len, max: capacity });
            }
            Err(e) => {
                hp.outbox.abandon(&pools, slot);
                return Err(e);
            }
        };
        let ring = segment.ring(peer, Direction::ToGuest).expect("in range");
        let bell = peers::doorbell(&hp.link, generation);
        let sent = hp
            .outbox
            .publish(&ring, &pools, slot, meta, len, bell)
            .map_err(|e| channel_err(hp, entry, peer, generation, e));
        if sent.is_ok() {
            hp.stats.sent += 1;
        }
        host.after_send(peer, &sent);
        sent
    }
}

impl std::ops::Deref for HostLoan<'_> {
    type Target = SlotBytes;
    fn deref(&self) -> &SlotBytes {
        &self.bytes
    }
}

impl std::ops::DerefMut for HostLoan<'_> {
    fn deref_mut(&mut self) -> &mut SlotBytes {
        &mut self.bytes
    }
}

impl Drop for HostLoan<'_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let peer = self.to.id;
        if let Some(pools) = self.host.segment.pools(peer, Direction::ToGuest) {
            self.host.peers[peer.index()]
                .outbox
                .abandon(&pools, self.slot);
        }
    }
}

/// What one non-blocking receive pass works on: the host's fields it needs, borrowed
/// apart from the bell a blocking receive waits on.
struct Scan<'h> {
    segment: &'h Segment,
    table: &'h mut [HostPeer],
    next_recv: &'h mut usize,
    doorbells: &'h mut Doorbells,
}

/// One non-blocking receive pass over every guest (the body of `try_recv`).
fn recv_once(scan: Scan<'_>, buf: &mut Vec<u8>) -> Result<Option<(Received, ())>, RecvError> {
    // Inline and slot payloads are copied in the pass; a large one is opened after it.
    let got = scan_once(
        scan.segment,
        scan.table,
        scan.next_recv,
        |ring, pools, inbox, bell| {
            let Some(msg) = inbox.take(ring, pools, bell)? else {
                return Ok(None);
            };
            match msg.payload {
                Payload::Large { seq, len } => Ok(Some((msg.meta, Some((seq, len))))),
                payload => {
                    copy_out(ring, pools, payload, buf, bell)?;
                    Ok(Some((msg.meta, None)))
                }
            }
        },
    )?;
    let Some((received, large)) = got else {
        return Ok(None);
    };
    if let Some((seq, len)) = large {
        let view = open_large(scan.segment, scan.table, scan.doorbells, received, seq, len)?;
        buf.clear();
        buf.resize(view.len(), 0);
        view.copy_to(0, buf);
    }
    Ok(Some((received, ())))
}

/// One non-blocking zero-copy receive pass (the body of `try_recv_message`).
fn take_once(scan: Scan<'_>) -> Result<Option<(Received, Message)>, RecvError> {
    let Scan {
        segment,
        table,
        next_recv,
        doorbells,
    } = scan;
    let got = scan_once(segment, table, next_recv, |ring, pools, inbox, bell| {
        Ok(inbox
            .take(ring, pools, bell)?
            .map(|msg| (msg.meta, msg.payload)))
    })?;
    let Some((received, payload)) = got else {
        return Ok(None);
    };
    if let Payload::Large { seq, len } = payload {
        let view = open_large(segment, table, doorbells, received, seq, len)?;
        return Ok(Some((received, Message::large(received.meta, view))));
    }
    let hp = &table[received.from.index()];
    let bell = hp.link.as_ref().map(|l| &l.doorbell);
    let live = Some(&hp.live_views);
    let dir = Direction::ToHost;
    // Guests send inline, slot and large payloads only. A broadcast reference from a
    // guest was refused above without being consumed (`shm.broadcast.refcount`); this
    // is the backstop should one ever get through.
    match Message::new(
        segment,
        received.from,
        dir,
        received.meta,
        payload,
        bell,
        live,
    ) {
        Some(msg) => Ok(Some((received, msg))),
        None => Err(fence_sender(
            segment,
            table,
            received,
            Violation::DescKind {
                kind: payload.kind(),
            },
        )),
    }
}

/// Maps the memory file of a large payload a guest announced, from the files its
/// doorbell carried (`shm.msg.large`). A path guest's doorbell may still be waiting
/// to be accepted: it is, first.
#[cold]
fn open_large(
    segment: &Segment,
    table: &mut [HostPeer],
    doorbells: &mut Doorbells,
    received: Received,
    seq: u64,
    len: u32,
) -> Result<LargeView, RecvError> {
    let index = received.from.index();
    if table[index].link.is_none() {
        doorbells.accept(segment, table);
    }
    let link = table[index]
        .link
        .as_mut()
        .filter(|l| l.generation == received.generation);
    let opened = match link {
        Some(link) => {
            let doorbell = Arc::clone(&link.doorbell);
            // A guest passes its file before publishing: never wait for one.
            link.large_in
                .open(doorbell.as_fd(), seq, len, Duration::ZERO)
        }
        None => Err(Violation::Large {
            seq,
            reason: "the sender has no doorbell to pass its file on",
        }),
    };
    opened.map_err(|violation| fence_sender(segment, table, received, violation))
}

/// Fences the guest a received message came from; the error to report.
fn fence_sender(
    segment: &Segment,
    table: &mut [HostPeer],
    received: Received,
    violation: Violation,
) -> RecvError {
    let entry = segment.peer(received.from).expect("in range");
    table[received.from.index()].fence(entry, received.generation, violation);
    RecvError {
        peer: received.from,
        violation,
    }
}

/// One round-robin pass over every serviceable guest, trying `attempt` on each ring
/// until one yields a message (its meta, and whatever else the caller needs of it).
// shm[impl shm.host.fair-recv]
fn scan_once<T>(
    segment: &Segment,
    table: &mut [HostPeer],
    next_recv: &mut usize,
    mut attempt: impl FnMut(
        &shm_primitives::ring::RingView<'_>,
        &shm_primitives::Pools<'_>,
        &mut shm_primitives::Inbox,
        Option<BorrowedFd<'_>>,
    ) -> Result<Option<(Meta, T)>, Violation>,
) -> Result<Option<(Received, T)>, RecvError> {
    let n = table.len();
    for k in 0..n {
        let index = (*next_recv + k) % n;
        let peer = PeerId::from_index(index).expect("index < 255");
        let entry = segment.peer(peer).expect("in range");
        let hp = &mut table[index];
        if hp.fenced.is_some() {
            continue;
        }
        let word = hp
            .observe(entry)
            .map_err(|violation| RecvError { peer, violation })?;
        if !matches!(word.state, PeerState::Attached | PeerState::Goodbye) {
            continue;
        }
        let ring = segment.ring(peer, Direction::ToHost).expect("in range");
        let pools = segment.pools(peer, Direction::ToHost).expect("in range");
        let bell = peers::doorbell(&hp.link, word.generation);
        match attempt(&ring, &pools, &mut hp.inbox, bell) {
            Ok(Some((meta, taken))) => {
                hp.stats.received += 1;
                *next_recv = (index + 1) % n;
                let received = Received {
                    from: peer,
                    generation: word.generation,
                    meta,
                };
                return Ok(Some((received, taken)));
            }
            // shm[impl shm.delivery.to-host]: recycle only once drained, and only once
            // the guest no longer maps the segment.
            Ok(None) if word.state == PeerState::Goodbye => {
                if hp.unmapped(segment, index, false) {
                    peers::recycle(segment, peer, hp, word.generation);
                }
            }
            Ok(None) => {}
            Err(violation) => {
                hp.fence(entry, word.generation, violation);
                return Err(RecvError { peer, violation });
            }
        }
    }
    Ok(None)
}

fn init_segment(backing: ShmBacking, config: SegmentConfig) -> Result<Segment, CreateError> {
    Segment::init(
        backing,
        config,
        shm_primitives::random_u64x2(),
        std::process::id(),
    )
    .map_err(|e| match e {
        InitError::Layout(l) => CreateError::Layout(l),
        InitError::TooSmall { need, .. } => CreateError::NoSpace { size: need },
    })
}

#[cfg(test)]
mod tests;
