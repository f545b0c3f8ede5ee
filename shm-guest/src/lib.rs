//! The guest side of a shmhub segment.
//!
//! ```no_run
//! use shm_guest::{ShmGuest, Meta};
//! let mut guest = ShmGuest::attach_path("/dev/shm/shmhub-example")?;
//! guest.try_send(Meta::new(1, 42), b"hello host")?;
//! let mut buf = Vec::new();
//! if let Some(meta) = guest.try_recv(&mut buf)? {
//!     println!("host sent type {} with {} bytes", meta.msg_type, buf.len());
//! }
//! guest.detach();
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![warn(missing_docs)]

#[cfg(feature = "tokio")]
mod async_guest;
mod rpc;
mod ticket;
mod watch;

#[cfg(feature = "tokio")]
pub use async_guest::AsyncGuest;
#[cfg(feature = "tokio")]
pub use rpc::{AsyncPendingCall, AsyncRpcClient};
pub use rpc::{
    CallError, Canceller, PendingCall, ReplyError, Response, RpcClient, RpcOptions, RpcSetupError,
    RpcStats, DEFAULT_MAX_IN_FLIGHT, DEFAULT_QUEUE_CAPACITY, MAX_IN_FLIGHT,
};

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use shm_primitives::channel::copy_out;
use shm_primitives::crash::{self, CrashPoint};
use shm_primitives::doorbell::{self, Hello};
use shm_primitives::header::HEADER_SIZE;
pub use shm_primitives::large_link::LargeSendError;
use shm_primitives::large_link::{send_large, LargeChannelError, LargeOutbox, MAX_LARGE_PAYLOAD};
use shm_primitives::lock;
use shm_primitives::memfd;
use shm_primitives::slot::owner_word;
use shm_primitives::view::SlotBytes;
pub use shm_primitives::Message;
use shm_primitives::{
    ChannelSendError, Inbox, MmapRegion, Outbox, Payload, PeerWord, Segment, SlotLoan,
};
pub use shm_primitives::{
    Direction, HeaderError, Meta, MsgKind, PeerId, PeerState, ShmBacking, Violation, WaitPolicy,
    INLINE_CAPACITY,
};
pub use ticket::TicketError;
use watch::HostWatch;
pub use watch::{HostDeathCause, DEFAULT_LIVENESS_INTERVAL};

/// How to attach.
#[derive(Debug, Clone, Copy)]
pub struct AttachOptions {
    /// Claim this Reserved entry (and nothing else); `None` claims any Empty entry.
    pub peer_id: Option<PeerId>,
    /// With `peer_id`: claim the reservation only if it is of this generation (a spawn
    /// ticket carries it, so a stale child cannot take a later reservation).
    pub generation: Option<u32>,
    /// How long to wait for the file to appear and the segment to become ready.
    pub timeout: Duration,
}

impl Default for AttachOptions {
    fn default() -> Self {
        Self {
            peer_id: None,
            generation: None,
            timeout: Duration::from_secs(5),
        }
    }
}

/// What happened while attaching.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AttachReport {
    /// The file did not exist at first and attach waited for it.
    pub waited_for_file: bool,
    /// The segment was not ready at first and attach waited for it.
    pub waited_for_ready: bool,
    /// Time from the call to success.
    pub elapsed: Duration,
}

/// Why attaching failed.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    /// No file appeared at the path before the timeout.
    #[error("no segment at the path after {0:?}")]
    NotFound(Duration),
    /// The segment did not become ready before the timeout.
    #[error("segment not ready after {0:?}")]
    NotReady(Duration),
    /// The header was refused.
    #[error("invalid segment: {0}")]
    Header(#[from] HeaderError),
    /// The requested id is outside this segment's table.
    #[error("{0} does not exist in this segment")]
    NoSuchPeer(PeerId),
    /// The requested id is not Reserved.
    #[error("{peer} is not reserved (state {state:?})")]
    NotReserved {
        /// The id.
        peer: PeerId,
        /// Its state (`None`: not a valid state word).
        state: Option<PeerState>,
    },
    /// The reservation is of another generation than the ticket's: the ticket is
    /// stale (`shm.spawn.generation`).
    #[error("{peer} is reserved at generation {found}, the ticket is for {expected}")]
    StaleTicket {
        /// The id.
        peer: PeerId,
        /// The ticket's generation.
        expected: u32,
        /// The entry's.
        found: u32,
    },
    /// No Empty entry is left.
    #[error("the peer table is full")]
    TableFull,
    /// The segment's host is dead (no process holds its lock): nothing would ever
    /// serve this guest (`shm.live.attach-dead-host`).
    #[error("the segment's host is dead")]
    HostDead,
    /// The segment's host closed it.
    #[error("the segment's host has closed it")]
    HostClosed,
    /// The descriptor given to attach by does not name a sealed segment: its seals
    /// lack `F_SEAL_SHRINK`, `F_SEAL_GROW` or `F_SEAL_SEAL` (`shm.file.attach-fd`), so
    /// its size could change under the mapping.
    #[error("the segment descriptor is not sealed (seals {seals:#x})")]
    NotSealed {
        /// The seals found (`F_GET_SEALS`; 0 for a file that cannot carry seals).
        seals: i32,
    },
    /// The spawn ticket (arguments or environment) is missing or invalid.
    #[error(transparent)]
    Ticket(#[from] TicketError),
    /// The ring this guest would resume holds impossible counters (the entry is
    /// given back).
    #[error("the entry's ring cannot be resumed: {0}")]
    Violation(Violation),
    /// A system call failed.
    #[error("{op}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The OS error.
        source: io::Error,
    },
}

/// Why a send failed. Nothing was published.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// The ring to the host is full: retry after it consumes.
    #[error("ring to the host is full")]
    WouldBlockRing,
    /// No free slot: retry after the host consumes.
    #[error("slot pool to the host is exhausted")]
    WouldBlockPool,
    /// The payload is larger than a slot.
    #[error("payload of {len} bytes exceeds the {max}-byte slot")]
    TooLarge {
        /// Payload length.
        len: usize,
        /// Largest payload.
        max: usize,
    },
    /// This guest is no longer attached.
    #[error(transparent)]
    Detached(#[from] DetachedError),
    /// The host left an impossible value in shared memory.
    #[error("protocol violation by the host: {0}")]
    Violation(Violation),
    /// A blocking send found no ring space or slot before its timeout.
    #[error("no room towards the host before the timeout")]
    TimedOut,
    /// A payload larger than the largest slot class could not be passed as a memory
    /// file (`shm.msg.large`).
    #[error("large payload: {0}")]
    Large(#[from] LargeSendError),
}

impl SendError {
    /// True for the back-pressure errors a caller should retry.
    pub fn is_would_block(&self) -> bool {
        matches!(
            self,
            SendError::WouldBlockRing
                | SendError::WouldBlockPool
                | SendError::Large(LargeSendError::WouldBlock)
        )
    }
}

/// Why a receive failed.
#[derive(Debug, thiserror::Error)]
pub enum RecvError {
    /// This guest is no longer attached.
    #[error(transparent)]
    Detached(#[from] DetachedError),
    /// The host left an impossible value in shared memory.
    #[error("protocol violation by the host: {0}")]
    Violation(Violation),
}

/// The entry no longer belongs to this guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DetachedError {
    /// The host fenced this guest for a protocol violation (`fault` is the
    /// violation's code).
    #[error("fenced by the host (fault code {fault})")]
    Fenced {
        /// The code the host wrote.
        fault: u32,
    },
    /// The entry changed hands.
    #[error("entry is no longer ours (state {state:?}, generation {generation})")]
    Lost {
        /// Its state now.
        state: Option<PeerState>,
        /// Its generation now.
        generation: u32,
    },
    /// The host closed the segment (its graceful goodbye).
    #[error("the host closed the segment")]
    HostClosed,
    /// The host died (`shm.live.host-death`).
    #[error("the host is dead ({0:?})")]
    HostDead(HostDeathCause),
}

/// A guest attached to a segment.
pub struct ShmGuest {
    segment: Segment,
    id: PeerId,
    generation: u32,
    outbox: Outbox,
    /// Numbers the large payloads this guest passes to the host.
    large_out: LargeOutbox,
    inbox: Inbox,
    report: AttachReport,
    attached: bool,
    wait: WaitPolicy,
    watch: HostWatch,
    /// Set while our ring's `consumer_parked` may say "doorbell".
    armed_recv: bool,
    /// Set while our ring's `producer_parked` may say "doorbell".
    armed_send: bool,
}

impl std::fmt::Debug for ShmGuest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShmGuest")
            .field("id", &self.id)
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

impl ShmGuest {
    /// Attaches to the segment at `path`, claiming any Empty entry.
    pub fn attach_path(path: impl AsRef<Path>) -> Result<Self, AttachError> {
        Self::attach_path_with(path, AttachOptions::default())
    }

    /// Attaches to the segment at `path`, claiming the entry `peer_id` the host
    /// reserved for this guest, and nothing else.
    pub fn attach_path_with_id(
        path: impl AsRef<Path>,
        peer_id: PeerId,
    ) -> Result<Self, AttachError> {
        Self::attach_path_with(
            path,
            AttachOptions {
                peer_id: Some(peer_id),
                ..AttachOptions::default()
            },
        )
    }

    /// Attaches to the segment at `path` with explicit options.
    ///
    /// Waits (up to `options.timeout`) for the file to exist and for the segment to be
    /// published, validates the header against the real file length, maps exactly the
    /// size the header records, then claims an entry.
    // shm[impl shm.file.attach]
    pub fn attach_path_with(
        path: impl AsRef<Path>,
        options: AttachOptions,
    ) -> Result<Self, AttachError> {
        Self::attach_path_inner(path.as_ref(), options, None)
    }

    fn attach_path_inner(
        path: &Path,
        options: AttachOptions,
        doorbell: Option<OwnedFd>,
    ) -> Result<Self, AttachError> {
        let start = Instant::now();
        let deadline = start + options.timeout;
        let mut report = AttachReport::default();
        let file = open_waiting(path, deadline, &mut report, options.timeout)?;
        Self::attach_file(file, options, doorbell, (start, report))
    }

    /// Attaches to a sealed segment by descriptor (one the host handed out:
    /// `ShmHost::segment_fd`, or passed along by whoever got it), claiming any Empty
    /// entry or `options.peer_id`. The descriptor must carry the seals
    /// `F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL`, checked before anything is mapped
    /// ([`AttachError::NotSealed`] otherwise); then the size is final, and the header
    /// is validated against it as for a path. The guest owns the descriptor from now
    /// on (its liveness lock is taken through it) and closes it when it is dropped.
    // shm[impl shm.file.attach-fd]
    pub fn attach_fd(fd: OwnedFd, options: AttachOptions) -> Result<Self, AttachError> {
        Self::attach_fd_inner(fd, options, None)
    }

    fn attach_fd_inner(
        fd: OwnedFd,
        options: AttachOptions,
        doorbell: Option<OwnedFd>,
    ) -> Result<Self, AttachError> {
        let start = Instant::now();
        let seals = memfd::seals(fd.as_fd()).map_err(|source| AttachError::Io {
            op: "F_GET_SEALS",
            source,
        })?;
        if seals & memfd::SEGMENT_SEALS != memfd::SEGMENT_SEALS {
            return Err(AttachError::NotSealed { seals });
        }
        // Sealed: the length measured next is the file's length for good.
        Self::attach_file(
            File::from(fd),
            options,
            doorbell,
            (start, AttachReport::default()),
        )
    }

    /// Steps 2–8 of `shm.file.attach` on an open segment file.
    // shm[impl shm.file.attach]
    fn attach_file(
        file: File,
        options: AttachOptions,
        doorbell: Option<OwnedFd>,
        (start, mut report): (Instant, AttachReport),
    ) -> Result<Self, AttachError> {
        let deadline = start + options.timeout;
        let io = |op| move |source| AttachError::Io { op, source };
        let file_len = file.metadata().map_err(io("fstat segment"))?.len();
        if file_len < HEADER_SIZE as u64 {
            return Err(HeaderError::ShorterThanHeader { file_len }.into());
        }
        // Map the header alone first: nothing past it is trusted until it validates.
        let head_map = MmapRegion::map(file.try_clone().map_err(io("dup"))?, HEADER_SIZE)
            .map_err(io("mmap header"))?;
        let header = Segment::header_of(head_map.region())?;
        header.check_magic()?;
        if !header.is_ready() {
            report.waited_for_ready = true;
            if !header.wait_ready(deadline) {
                return Err(AttachError::NotReady(options.timeout));
            }
        }
        let layout = header.validate(file_len)?;
        // shm[impl shm.live.attach-dead-host]
        if header.is_closed() {
            return Err(AttachError::HostClosed);
        }
        let host_alive = lock::is_locked_by_other(&file, lock::HOST_LOCK_BYTE)
            .map_err(io("test the host lock"))?;
        if !host_alive {
            return Err(AttachError::HostDead);
        }
        drop(head_map);
        let map = MmapRegion::map(file, layout.total_size as usize).map_err(io("mmap segment"))?;
        let mut guest =
            Self::attach_backing_inner(ShmBacking::Mmap(Arc::new(map)), options, doorbell)?;
        report.elapsed = start.elapsed();
        guest.report = report;
        Ok(guest)
    }

    /// Attaches to a segment this process already has in memory (a heap-backed host's
    /// `ShmHost::backing()`, or a mapping made by the caller).
    pub fn attach_backing(
        backing: ShmBacking,
        options: AttachOptions,
    ) -> Result<Self, AttachError> {
        Self::attach_backing_inner(backing, options, None)
    }

    /// Claims an entry, then takes the doorbell: the ticket's, or a new connection to
    /// the host's listener that names the entry just claimed (`shm.doorbell.connect`).
    /// If the connection fails the entry is given back (the guest says goodbye).
    fn attach_backing_inner(
        backing: ShmBacking,
        options: AttachOptions,
        doorbell: Option<OwnedFd>,
    ) -> Result<Self, AttachError> {
        let start = Instant::now();
        let header = Segment::header_of(backing.region())?;
        header.check_magic()?;
        let mut report = AttachReport::default();
        if !header.is_ready() {
            report.waited_for_ready = true;
            if !header.wait_ready(start + options.timeout) {
                return Err(AttachError::NotReady(options.timeout));
            }
        }
        let segment = Segment::attach(backing)?;
        let (id, generation) = claim(&segment, &options, start + options.timeout)?;
        crash::point(CrashPoint::AfterClaim);
        let doorbell = match doorbell {
            Some(fd) => Ok(fd),
            None => {
                let hello = Hello {
                    index: id.index() as u32,
                    generation,
                };
                doorbell::connect(segment.header().segment_id(), hello)
            }
        };
        let doorbell = match doorbell {
            Ok(fd) => fd,
            Err(source) => {
                if let Some(entry) = segment.peer(id) {
                    entry.goodbye(generation);
                }
                return Err(AttachError::Io {
                    op: "connect the doorbell",
                    source,
                });
            }
        };
        report.elapsed = start.elapsed();
        // An entry retained for us (at-least-once delivery) has undelivered messages
        // from where our predecessor stopped; any other entry's ring is at zero.
        // shm[impl shm.delivery.at-least-once]
        let ring = segment.ring(id, Direction::ToGuest).expect("claimed id");
        let owner = owner_word(id.get(), generation);
        let resumed = Inbox::resume(&ring, owner).and_then(|mut inbox| {
            let pending = inbox.pending(&ring)?;
            Ok((inbox, pending > 0))
        });
        let (inbox, resumed) = match resumed {
            Ok(got) => got,
            Err(violation) => {
                if let Some(entry) = segment.peer(id) {
                    entry.goodbye(generation);
                }
                return Err(AttachError::Violation(violation));
            }
        };
        let mut watch = HostWatch::new(&segment, doorbell);
        if resumed {
            watch.large_wait = RESUMED_FILE_WAIT;
        }
        Ok(Self {
            segment,
            id,
            generation,
            outbox: Outbox::new(owner),
            large_out: LargeOutbox::default(),
            inbox,
            report,
            attached: true,
            wait: WaitPolicy::default(),
            watch,
            armed_recv: false,
            armed_send: false,
        })
    }

    /// Attaches with the spawn ticket in this process's environment
    /// (`SHMHUB_HUB_PATH`, or `SHMHUB_HUB_FD` for a sealed segment, `SHMHUB_PEER_ID`,
    /// `SHMHUB_PEER_GENERATION`, `SHMHUB_DOORBELL_FD`, `SHMHUB_ATTACH_TIMEOUT_MS`), as
    /// set by the host's `SpawnTicket::configure` or `ShmHost::spawn`.
    // shm[impl shm.spawn.child]
    pub fn from_env() -> Result<Self, AttachError> {
        let ticket = ticket::Ticket::from_env()?;
        Self::from_ticket(ticket)
    }

    /// Attaches with a spawn ticket given as command-line arguments (`--hub-path P`
    /// or `--hub-fd S`, `--peer-id N --peer-generation G --doorbell-fd F
    /// [--attach-timeout-ms T]`);
    /// other arguments are ignored, so a child can pass its whole argument list.
    // shm[impl shm.spawn.child]
    pub fn from_ticket_args<I, S>(args: I) -> Result<Self, AttachError>
    where
        I: IntoIterator<Item = S>,
        S: Into<std::ffi::OsString>,
    {
        let ticket = ticket::Ticket::from_args(args)?;
        Self::from_ticket(ticket)
    }

    fn from_ticket(ticket: ticket::Ticket) -> Result<Self, AttachError> {
        let hub = ticket.take_hub()?;
        let doorbell = ticket.take_doorbell()?;
        let options = AttachOptions {
            peer_id: Some(ticket.peer),
            generation: Some(ticket.generation),
            timeout: ticket.attach_timeout,
        };
        match hub {
            ticket::Hub::Path(path) => Self::attach_path_inner(&path, options, Some(doorbell)),
            ticket::Hub::Fd(fd) => Self::attach_fd_inner(fd, options, Some(doorbell)),
        }
    }

    /// Attaches with a ticket the host sent over `socket`, a connected Unix stream
    /// socket (`ShmHost::hand_over` or `SpawnTicket::send_to`): waits up to `timeout`
    /// for the one message that carries the ticket record, the sealed segment's
    /// descriptor and this guest's doorbell end, refuses anything else (closing every
    /// descriptor received) with a [`TicketError`], then attaches by descriptor
    /// ([`attach_fd`](Self::attach_fd)) with the reserved peer id and generation. The
    /// ticket must be the next thing on the socket; the socket is not needed
    /// afterwards.
    // shm[impl shm.fd.passing]
    pub fn from_ticket_socket(socket: impl AsFd, timeout: Duration) -> Result<Self, AttachError> {
        let ticket = ticket::receive(socket.as_fd(), timeout)?;
        let options = AttachOptions {
            peer_id: Some(ticket.peer),
            generation: Some(ticket.generation),
            timeout: ticket.attach_timeout,
        };
        Self::attach_fd_inner(ticket.segment, options, Some(ticket.doorbell))
    }

    /// This guest's end of its doorbell: the socket its spawn ticket carried, or its
    /// connection to the host's listener for a guest that attached by path or
    /// backing. Also available through [`AsFd`].
    pub fn doorbell(&self) -> BorrowedFd<'_> {
        self.watch.doorbell()
    }

    /// Prepares to wait on this guest's fd ([`AsFd`]) for a message: consumes pending
    /// rings and marks this guest parked on its doorbell, so the host rings it when it
    /// publishes. Then call [`try_recv`](Self::try_recv) until it returns `None`, and
    /// only then wait for the fd to become readable; the next message received
    /// disarms. A host that dies or closes the segment makes the fd readable too (end
    /// of stream). Errors if the host is already gone.
    // shm[impl shm.doorbell.asfd]
    // shm[impl shm.doorbell.arm]
    pub fn arm_doorbell_recv(&mut self) -> Result<(), DetachedError> {
        self.watch.drain_doorbell(&self.segment)?;
        self.bell(Direction::ToGuest).arm_doorbell();
        self.armed_recv = true;
        Ok(())
    }

    /// Like [`arm_doorbell_recv`](Self::arm_doorbell_recv), for room towards the
    /// host: the host rings when it consumes. Then retry [`try_send`](Self::try_send)
    /// before waiting; a successful send disarms.
    pub fn arm_doorbell_send(&mut self) -> Result<(), DetachedError> {
        self.watch.drain_doorbell(&self.segment)?;
        self.bell(Direction::ToHost).arm_doorbell();
        self.armed_send = true;
        Ok(())
    }

    /// How often this guest checks that its host is alive while idle or blocked.
    pub fn liveness_interval(&self) -> Duration {
        self.watch.interval()
    }

    /// Checks that the host is alive now if a liveness interval has passed since the
    /// last check (for event loops that wait on [`AsFd`] with a timeout).
    pub fn check_host(&mut self) -> Result<(), DetachedError> {
        self.watch.check_if_due(&self.segment)
    }

    /// How often this guest checks that its host is alive while it is idle or
    /// blocked (default [`DEFAULT_LIVENESS_INTERVAL`]).
    pub fn set_liveness_interval(&mut self, interval: Duration) {
        self.watch.set_interval(interval);
    }

    /// This guest's id.
    pub fn peer_id(&self) -> PeerId {
        self.id
    }

    /// The generation of the entry this guest holds.
    pub fn generation(&self) -> u32 {
        self.generation
    }

    /// What happened while attaching.
    pub fn attach_report(&self) -> AttachReport {
        self.report
    }

    /// The segment's random 128-bit id.
    pub fn segment_id(&self) -> [u64; 2] {
        self.segment.header().segment_id()
    }

    /// The largest payload one message can carry: [`MAX_LARGE_PAYLOAD`] (payloads
    /// above [`max_slot_payload`](Self::max_slot_payload) travel in a memory file).
    pub fn max_payload(&self) -> usize {
        MAX_LARGE_PAYLOAD
    }

    /// The largest payload that travels in a slot (the largest class's slot size).
    pub fn max_slot_payload(&self) -> usize {
        self.segment.layout().config.max_slot_payload()
    }

    /// Sends one message to the host: inline when it fits in the descriptor, otherwise
    /// through a slot. Never blocks; back-pressure is a `WouldBlock` error.
    pub fn try_send(&mut self, meta: Meta, payload: &[u8]) -> Result<(), SendError> {
        let me = (self.id, self.generation);
        let sent = send_once(
            &self.segment,
            me,
            &mut self.watch,
            (&mut self.outbox, &mut self.large_out),
            meta,
            payload,
        );
        match &sent {
            Ok(()) if self.armed_send => self.disarm_send(),
            Err(e) if e.is_would_block() => self.watch.check_if_due(&self.segment)?,
            _ => {}
        }
        sent
    }

    #[cold]
    fn disarm_send(&mut self) {
        self.armed_send = false;
        self.bell(Direction::ToHost).disarm_doorbell();
    }

    #[cold]
    fn disarm_recv(&mut self) {
        self.armed_recv = false;
        self.bell(Direction::ToGuest).disarm_doorbell();
    }

    /// What this guest waits on in direction `dir`: data in the ring towards it, or
    /// room in the ring towards the host.
    fn bell(&self, dir: Direction) -> shm_primitives::ring::CounterBell<'_> {
        let ring = self.segment.ring(self.id, dir).expect("validated id");
        match dir {
            Direction::ToGuest => ring.data_bell(),
            Direction::ToHost => ring.space_bell(),
        }
    }

    /// Receives one message from the host into `buf` (replacing its contents), or
    /// `None` when there is none.
    pub fn try_recv(&mut self, buf: &mut Vec<u8>) -> Result<Option<Meta>, RecvError> {
        let me = (self.id, self.generation);
        let got = recv_once(&self.segment, me, &mut self.watch, &mut self.inbox, buf)?;
        if self.after_try_recv(got.is_some()).is_err() {
            // The host just turned out gone: deliver what it published first.
            return recv_once(&self.segment, me, &mut self.watch, &mut self.inbox, buf);
        }
        Ok(got)
    }

    /// How blocking calls wait: spin rounds before parking (default: adaptive).
    pub fn set_wait_policy(&mut self, policy: WaitPolicy) {
        self.wait = policy;
    }

    /// Receives one message, waiting up to `timeout` (`Ok(None)` when it passes).
    /// While idle the guest sleeps on its ring's producer counter with a shared futex;
    /// the host wakes it only if it is parked. It wakes at least once per liveness
    /// interval to check that the host is alive.
    // shm[impl shm.wake.park]
    // shm[impl shm.live.host-death]
    pub fn recv(
        &mut self,
        buf: &mut Vec<u8>,
        timeout: Duration,
    ) -> Result<Option<Meta>, RecvError> {
        self.recv_with(timeout, |segment, me, watch, inbox| {
            recv_once(segment, me, watch, inbox, buf)
        })
    }

    /// After a non-blocking receive: a message disarms the doorbell wait; nothing
    /// runs the liveness check when it is due.
    fn after_try_recv(&mut self, got: bool) -> Result<(), DetachedError> {
        match got {
            true if self.armed_recv => self.disarm_recv(),
            true => {}
            false => self.watch.check_if_due(&self.segment)?,
        }
        Ok(())
    }

    /// Receives one message without copying its payload, or `None` when there is
    /// none: a slot payload is read in place and its slot is freed when the
    /// [`Message`] is dropped (`shm.slot.view`); any number may be held at once.
    pub fn try_recv_message(&mut self) -> Result<Option<Message>, RecvError> {
        let me = (self.id, self.generation);
        let got = take_once(&self.segment, me, &mut self.watch, &mut self.inbox)?;
        if self.after_try_recv(got.is_some()).is_err() {
            // The host just turned out gone: deliver what it published first.
            return take_once(&self.segment, me, &mut self.watch, &mut self.inbox);
        }
        Ok(got)
    }

    /// [`try_recv_message`](Self::try_recv_message), waiting up to `timeout` as
    /// [`recv`](Self::recv) does.
    pub fn recv_message(&mut self, timeout: Duration) -> Result<Option<Message>, RecvError> {
        self.recv_with(timeout, take_once)
    }

    /// The blocking receive loop around one non-blocking attempt.
    fn recv_with<T>(
        &mut self,
        timeout: Duration,
        mut once: impl FnMut(
            &Segment,
            (PeerId, u32),
            &mut HostWatch,
            &mut Inbox,
        ) -> Result<Option<T>, RecvError>,
    ) -> Result<Option<T>, RecvError> {
        let me = (self.id, self.generation);
        if self.armed_recv {
            self.disarm_recv();
        }
        let ring = self
            .segment
            .ring(self.id, Direction::ToGuest)
            .expect("validated id");
        // Fast path: no clock read when a message is already waiting.
        if let Some(got) = once(&self.segment, me, &mut self.watch, &mut self.inbox)? {
            return Ok(Some(got));
        }
        let deadline = Instant::now().checked_add(timeout);
        loop {
            let slice = self.watch.slice_until(deadline);
            let got = shm_primitives::wait::wait_for(self.wait, slice, &ring.data_bell(), || {
                once(&self.segment, me, &mut self.watch, &mut self.inbox)
            })?;
            if got.is_some() {
                return Ok(got);
            }
            if self.watch.check_if_due(&self.segment).is_err() {
                // The host just turned out gone: deliver what it published first.
                return once(&self.segment, me, &mut self.watch, &mut self.inbox);
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Ok(None);
            }
        }
    }

    /// Loans a slot of at least `len` bytes towards the host, to be written in place
    /// and sent with [`Loan::send`] (`shm.slot.loan`); dropping the loan returns the
    /// slot. Never blocks: a full ring or pool is a `WouldBlock` error.
    pub fn loan(&mut self, len: usize) -> Result<Loan<'_>, SendError> {
        let me = (self.id, self.generation);
        let (slot, bytes) = loan_once(&self.segment, me, &mut self.watch, &mut self.outbox, len)?;
        Ok(Loan {
            guest: self,
            slot,
            bytes,
        })
    }

    /// Like [`loan`](Self::loan), waiting up to `timeout` for ring space and a free
    /// slot (`shm.slot.exhausted`): parked on the ring's consumer counter, woken when
    /// the host consumes or frees a slot. `TimedOut` when none came in time.
    // shm[impl shm.slot.exhausted]
    pub fn loan_timeout(&mut self, len: usize, timeout: Duration) -> Result<Loan<'_>, SendError> {
        let me = (self.id, self.generation);
        let ring = self
            .segment
            .ring(self.id, Direction::ToHost)
            .expect("validated id");
        let once = |watch: &mut HostWatch, outbox: &mut Outbox| match loan_once(
            &self.segment,
            me,
            watch,
            outbox,
            len,
        ) {
            Ok(got) => Ok(Some(got)),
            Err(e) if e.is_would_block() => Ok(None),
            Err(e) => Err(e),
        };
        let mut got = once(&mut self.watch, &mut self.outbox)?;
        let deadline = Instant::now().checked_add(timeout);
        while got.is_none() {
            let slice = self.watch.slice_until(deadline);
            got = shm_primitives::wait::wait_for(self.wait, slice, &ring.space_bell(), || {
                once(&mut self.watch, &mut self.outbox)
            })?;
            if got.is_none() {
                self.watch.check_if_due(&self.segment)?;
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    return Err(SendError::TimedOut);
                }
            }
        }
        let (slot, bytes) = got.expect("loop ends with a loan");
        Ok(Loan {
            guest: self,
            slot,
            bytes,
        })
    }

    /// Sends one message, waiting up to `timeout` for ring space and a free slot.
    // shm[impl shm.wake.space]
    pub fn send(&mut self, meta: Meta, payload: &[u8], timeout: Duration) -> Result<(), SendError> {
        let me = (self.id, self.generation);
        if self.armed_send {
            self.disarm_send();
        }
        let ring = self
            .segment
            .ring(self.id, Direction::ToHost)
            .expect("validated id");
        // Fast path: no clock read when there is room.
        match send_once(
            &self.segment,
            me,
            &mut self.watch,
            (&mut self.outbox, &mut self.large_out),
            meta,
            payload,
        ) {
            Err(e) if e.is_would_block() => {}
            done => return done,
        }
        let deadline = Instant::now().checked_add(timeout);
        loop {
            let slice = self.watch.slice_until(deadline);
            let sent =
                shm_primitives::wait::wait_for(self.wait, slice, &ring.space_bell(), || {
                    let once = send_once(
                        &self.segment,
                        me,
                        &mut self.watch,
                        (&mut self.outbox, &mut self.large_out),
                        meta,
                        payload,
                    );
                    match once {
                        Ok(()) => Ok(Some(())),
                        Err(e) if e.is_would_block() => Ok(None),
                        Err(e) => Err(e),
                    }
                })?;
            if sent.is_some() {
                return Ok(());
            }
            self.watch.check_if_due(&self.segment)?;
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Err(SendError::TimedOut);
            }
        }
    }

    /// Leaves the segment: Attached -> Goodbye, this guest's last write. The host
    /// delivers what this guest already sent, then recycles the entry.
    // shm[impl shm.peer.detach]
    pub fn detach(mut self) {
        self.goodbye();
    }

    fn goodbye(&mut self) {
        if std::mem::take(&mut self.attached) {
            if let Some(entry) = self.segment.peer(self.id) {
                entry.goodbye(self.generation);
            }
        }
    }
}

/// The guest's doorbell ([`ShmGuest::doorbell`]): readable when the host rang it
/// (after [`ShmGuest::arm_doorbell_recv`] or [`ShmGuest::arm_doorbell_send`]) or hung
/// up.
// shm[impl shm.doorbell.asfd]
impl AsFd for ShmGuest {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.watch.doorbell()
    }
}

impl AsRawFd for ShmGuest {
    fn as_raw_fd(&self) -> RawFd {
        self.watch.doorbell().as_raw_fd()
    }
}

impl Drop for ShmGuest {
    fn drop(&mut self) {
        self.goodbye();
    }
}

/// Checks that the host is alive and that entry `id` is still Attached with our
/// generation.
fn check_attached(
    segment: &Segment,
    (id, generation): (PeerId, u32),
    watch: &mut HostWatch,
) -> Result<(), DetachedError> {
    watch.check_cheap(segment)?;
    let entry = segment.peer(id).expect("validated id");
    match entry.load() {
        Ok(w) if w.state == PeerState::Attached && w.generation == generation => Ok(()),
        other => {
            let fault = entry.fault.load(Ordering::Relaxed);
            if fault != 0 {
                return Err(DetachedError::Fenced { fault });
            }
            let raw = entry.state_word.load(Ordering::Relaxed);
            Err(DetachedError::Lost {
                state: other.ok().map(|w| w.state),
                generation: (raw >> 32) as u32,
            })
        }
    }
}

/// The check before a receive: like [`check_attached`], except that a host that
/// closed or died still has its published messages delivered first
/// (`shm.live.drain-after-host`): `Ok(Some(verdict))` means "take what is in the
/// ring, and report `verdict` once it is empty".
// shm[impl shm.live.drain-after-host]
fn check_receivable(
    segment: &Segment,
    me: (PeerId, u32),
    watch: &mut HostWatch,
) -> Result<Option<DetachedError>, DetachedError> {
    match check_attached(segment, me, watch) {
        Ok(()) => Ok(None),
        Err(e @ (DetachedError::HostClosed | DetachedError::HostDead(_))) => {
            // Only from a ring that is still ours: Attached, our generation, no fault.
            let entry = segment.peer(me.0).expect("validated id");
            let ours = entry
                .load()
                .is_ok_and(|w| w.state == PeerState::Attached && w.generation == me.1);
            match ours && entry.fault.load(Ordering::Relaxed) == 0 {
                true => Ok(Some(e)),
                false => Err(e),
            }
        }
        Err(e) => Err(e),
    }
}

/// Allocates a slot towards the host (the body of `loan`).
fn loan_once(
    segment: &Segment,
    me: (PeerId, u32),
    watch: &mut HostWatch,
    outbox: &mut Outbox,
    len: usize,
) -> Result<(SlotLoan, SlotBytes), SendError> {
    check_attached(segment, me, watch)?;
    let ring = segment.ring(me.0, Direction::ToHost).expect("validated id");
    let pools = segment
        .pools(me.0, Direction::ToHost)
        .expect("validated id");
    let slot = outbox.loan(&ring, &pools, len).map_err(send_err)?;
    let ptr = pools
        .class(slot.class as usize)
        .and_then(|p| p.data_ptr(slot.index))
        .expect("a loan names a slot of its pool");
    Ok((slot, SlotBytes::new(ptr, slot.capacity as usize)))
}

/// One non-blocking send (the body of `try_send`); borrows only what it uses so a
/// blocking `send` can hold the ring's bell at the same time.
fn send_once(
    segment: &Segment,
    me: (PeerId, u32),
    watch: &mut HostWatch,
    (outbox, large): (&mut Outbox, &mut LargeOutbox),
    meta: Meta,
    payload: &[u8],
) -> Result<(), SendError> {
    check_attached(segment, me, watch)?;
    let ring = segment.ring(me.0, Direction::ToHost).expect("validated id");
    let bell = Some(watch.doorbell());
    if payload.len() > segment.layout().config.max_slot_payload() {
        send_large(&ring, watch.doorbell(), (outbox, large), meta, payload).map_err(
            |e| match e {
                LargeChannelError::Channel(e) => send_err(e),
                LargeChannelError::Pass(e) => SendError::Large(e),
            },
        )?;
    } else {
        let pools = segment
            .pools(me.0, Direction::ToHost)
            .expect("validated id");
        outbox
            .send(&ring, &pools, meta, payload, bell)
            .map_err(send_err)?;
    }
    // shm[impl shm.wake.host-bell]: after every publish, a syscall only if parked.
    segment.header().ring_host_bell(bell);
    Ok(())
}

fn send_err(e: ChannelSendError) -> SendError {
    match e {
        ChannelSendError::RingFull => SendError::WouldBlockRing,
        ChannelSendError::PoolExhausted => SendError::WouldBlockPool,
        ChannelSendError::TooLarge { len, max } => SendError::TooLarge { len, max },
        ChannelSendError::Violation(v) => SendError::Violation(v),
    }
}

/// A slot towards the host, loaned for writing in place ([`ShmGuest::loan`]).
#[derive(Debug)]
pub struct Loan<'g> {
    guest: &'g mut ShmGuest,
    slot: SlotLoan,
    bytes: SlotBytes,
}

impl Loan<'_> {
    /// Publishes the first `len` bytes of the slot as one message (`len` at most
    /// [`capacity`](SlotBytes::capacity), otherwise `TooLarge` and the loan is returned).
    pub fn send(self, meta: Meta, len: usize) -> Result<(), SendError> {
        let mut this = std::mem::ManuallyDrop::new(self);
        let (capacity, slot) = (this.bytes.capacity(), this.slot);
        let guest = &mut *this.guest;
        let pools = guest
            .segment
            .pools(guest.id, Direction::ToHost)
            .expect("validated id");
        if len > capacity {
            guest.outbox.abandon(&pools, slot);
            return Err(SendError::TooLarge { len, max: capacity });
        }
        let ring = guest
            .segment
            .ring(guest.id, Direction::ToHost)
            .expect("validated id");
        let bell = Some(guest.watch.doorbell());
        guest
            .outbox
            .publish(&ring, &pools, slot, meta, len, bell)
            .map_err(send_err)?;
        guest.segment.header().ring_host_bell(bell);
        if guest.armed_send {
            guest.disarm_send();
        }
        Ok(())
    }
}

impl std::ops::Deref for Loan<'_> {
    type Target = SlotBytes;
    fn deref(&self) -> &SlotBytes {
        &self.bytes
    }
}

impl std::ops::DerefMut for Loan<'_> {
    fn deref_mut(&mut self) -> &mut SlotBytes {
        &mut self.bytes
    }
}

impl Drop for Loan<'_> {
    fn drop(&mut self) {
        if let Some(pools) = self.guest.segment.pools(self.guest.id, Direction::ToHost) {
            self.guest.outbox.abandon(&pools, self.slot);
        }
    }
}

/// One non-blocking zero-copy receive (the body of `try_recv_message`).
fn take_once(
    segment: &Segment,
    me: (PeerId, u32),
    watch: &mut HostWatch,
    inbox: &mut Inbox,
) -> Result<Option<Message>, RecvError> {
    let gone = check_receivable(segment, me, watch)?;
    let ring = segment
        .ring(me.0, Direction::ToGuest)
        .expect("validated id");
    let pools = segment
        .pools(me.0, Direction::ToGuest)
        .expect("validated id");
    let Some(msg) = inbox
        .take(&ring, &pools, Some(watch.doorbell()))
        .map_err(RecvError::Violation)?
    else {
        return gone.map_or(Ok(None), |e| Err(e.into()));
    };
    if let Payload::Large { seq, len } = msg.payload {
        let view = open_large(watch, seq, len)?;
        return Ok(Some(Message::large(msg.meta, view)));
    }
    let bell = Some(watch.doorbell_arc());
    let kind = msg.payload.kind();
    Message::new(
        segment,
        me.0,
        Direction::ToGuest,
        msg.meta,
        msg.payload,
        bell,
        None,
    )
    .map(Some)
    .ok_or(RecvError::Violation(Violation::DescKind { kind }))
}

/// How long a guest that resumed retained messages waits for a large payload's file
/// that has not arrived with its descriptor: one that attached by path can read it
/// before the host links its new doorbell and passes the kept files again. Any other
/// guest's files always arrive first, so it never waits.
const RESUMED_FILE_WAIT: Duration = Duration::from_secs(2);

/// Maps the memory file of a large payload the host announced.
#[cold]
fn open_large(
    watch: &mut HostWatch,
    seq: u64,
    len: u32,
) -> Result<shm_primitives::large::LargeView, RecvError> {
    let doorbell = Arc::clone(watch.doorbell_arc());
    watch
        .large_in
        .open(doorbell.as_fd(), seq, len, watch.large_wait)
        .map_err(RecvError::Violation)
}

/// One non-blocking receive (the body of `try_recv`).
fn recv_once(
    segment: &Segment,
    me: (PeerId, u32),
    watch: &mut HostWatch,
    inbox: &mut Inbox,
    buf: &mut Vec<u8>,
) -> Result<Option<Meta>, RecvError> {
    let gone = check_receivable(segment, me, watch)?;
    let ring = segment
        .ring(me.0, Direction::ToGuest)
        .expect("validated id");
    let pools = segment
        .pools(me.0, Direction::ToGuest)
        .expect("validated id");
    let bell = Some(watch.doorbell());
    let Some(msg) = inbox
        .take(&ring, &pools, bell)
        .map_err(RecvError::Violation)?
    else {
        return gone.map_or(Ok(None), |e| Err(e.into()));
    };
    match msg.payload {
        Payload::Large { seq, len } => {
            let view = open_large(watch, seq, len)?;
            buf.clear();
            buf.resize(view.len(), 0);
            view.copy_to(0, buf);
        }
        payload => copy_out(&ring, &pools, payload, buf, bell).map_err(RecvError::Violation)?,
    }
    Ok(Some(msg.meta))
}

fn open_waiting(
    path: &Path,
    deadline: Instant,
    report: &mut AttachReport,
    timeout: Duration,
) -> Result<File, AttachError> {
    let mut backoff = Duration::from_micros(200);
    loop {
        match OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
        {
            Ok(f) => return Ok(f),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                report.waited_for_file = true;
                let now = Instant::now();
                if now >= deadline {
                    return Err(AttachError::NotFound(timeout));
                }
                // Bounded poll: the file appears by rename/link, which no fd can wait on
                // portably; the slice shrinks to the deadline.
                std::thread::sleep(backoff.min(deadline - now));
                backoff = (backoff * 2).min(Duration::from_millis(20));
            }
            Err(source) => {
                return Err(AttachError::Io {
                    op: "open segment",
                    source,
                })
            }
        }
    }
}

/// Claims `options.peer_id` (which must be Reserved, at `options.generation` if
/// given) or any Empty entry. On a file-backed segment the guest first takes the
/// liveness lock of the entry and keeps it for as long as it maps the segment; a held
/// lock means a live guest still owns (or is leaving) the entry.
// shm[impl shm.peer.attach-path]
// shm[impl shm.peer.attach-reserved]
// shm[impl shm.live.guest-lock]
// shm[impl shm.spawn.generation]
fn claim(
    segment: &Segment,
    options: &AttachOptions,
    deadline: Instant,
) -> Result<(PeerId, u32), AttachError> {
    let pid = std::process::id();
    let file = segment.backing().file();
    let lock_entry =
        |peer: PeerId| -> Result<bool, AttachError> {
            match file {
                Some(f) => lock::try_lock(f, segment.layout().peer_offset(peer.index())).map_err(
                    |source| AttachError::Io {
                        op: "lock peer entry",
                        source,
                    },
                ),
                None => Ok(true),
            }
        };
    let unlock_entry = |peer: PeerId| {
        if let Some(f) = file {
            let _ = lock::unlock(f, segment.layout().peer_offset(peer.index()));
        }
    };
    if let Some(peer) = options.peer_id {
        let entry = segment.peer(peer).ok_or(AttachError::NoSuchPeer(peer))?;
        let not_reserved = |word: Option<PeerWord>| AttachError::NotReserved {
            peer,
            state: word.map(|w| w.state),
        };
        match entry.load().ok() {
            Some(w) if w.state == PeerState::Reserved => match options.generation {
                Some(expected) if expected != w.generation => {
                    return Err(AttachError::StaleTicket {
                        peer,
                        expected,
                        found: w.generation,
                    })
                }
                _ => {}
            },
            other => return Err(not_reserved(other)),
        }
        // The entry's previous guest may still be unmapping: wait for its lock.
        let mut backoff = Duration::from_micros(50);
        while !lock_entry(peer)? {
            if Instant::now() >= deadline {
                return Err(not_reserved(entry.load().ok()));
            }
            // Bounded poll: a lock release cannot be waited for with a timeout.
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(Duration::from_millis(5));
        }
        return match entry.try_claim(PeerState::Reserved, options.generation, pid) {
            Ok(generation) => Ok((peer, generation)),
            Err(word) => {
                unlock_entry(peer);
                Err(not_reserved(word))
            }
        };
    }
    let n = segment.layout().config.max_guests as usize;
    for index in 0..n {
        let peer = PeerId::from_index(index).expect("index < 255");
        let entry = segment.peer(peer).expect("in range");
        if !matches!(entry.load(), Ok(w) if w.state == PeerState::Empty) || !lock_entry(peer)? {
            continue;
        }
        match entry.try_claim(PeerState::Empty, None, pid) {
            Ok(generation) => return Ok((peer, generation)),
            Err(_) => unlock_entry(peer),
        }
    }
    Err(AttachError::TableFull)
}
