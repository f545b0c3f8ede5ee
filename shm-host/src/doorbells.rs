//! The host's side of every guest's doorbell (`shm.doorbell.*`): one epoll set over
//! the doorbells, the pidfds of spawned children and the listening socket path guests
//! connect to. The epoll fd is what `ShmHost` exposes through `AsFd`.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use shm_primitives::doorbell::{self, Drained, Hello};
use shm_primitives::{PeerId, PeerState, Segment};

use crate::liveness::GuestLink;
use crate::peers::HostPeer;

/// Epoll token of the listening socket.
const LISTENER: u64 = u64::MAX;
/// Epoll token of accepted connections whose hello has not arrived (edge-triggered:
/// a half hello reports once, not until it completes).
const PENDING: u64 = u64::MAX - 1;
/// Epoll tokens of pidfds: this plus the entry index (doorbells use the bare index).
const PIDFD: u64 = 1 << 32;
/// How long an accepted connection may take to send its hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(2);

/// What one drain of the epoll set found.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Drain {
    /// A doorbell hung up or a child exited: run a liveness check now.
    pub(crate) death: bool,
    /// A path guest is connecting.
    pub(crate) connecting: bool,
}

#[derive(Debug)]
pub(crate) struct Doorbells {
    epoll: OwnedFd,
    listener: OwnedFd,
    /// Accepted connections whose hello has not arrived yet.
    pending: Vec<(OwnedFd, Instant)>,
    events: Vec<libc::epoll_event>,
}

impl Doorbells {
    pub(crate) fn new(segment_id: [u64; 2]) -> io::Result<Self> {
        // SAFETY: epoll_create1 takes only flags and returns a new fd or -1.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the kernel just returned this fd to us; nothing else owns it.
        let epoll = unsafe { OwnedFd::from_raw_fd(fd) };
        let listener = doorbell::listen(segment_id)?;
        let this = Self {
            epoll,
            listener,
            pending: Vec::new(),
            events: Vec::with_capacity(64),
        };
        this.watch(this.listener.as_fd(), LISTENER)?;
        Ok(this)
    }

    /// The epoll fd: readable when a doorbell rang or hung up, a spawned child exited,
    /// or a path guest is connecting.
    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        self.epoll.as_fd()
    }

    fn watch(&self, fd: BorrowedFd<'_>, token: u64) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_ADD, fd, token, libc::EPOLLIN as u32)
    }

    fn ctl(&self, op: i32, fd: BorrowedFd<'_>, token: u64, events: u32) -> io::Result<()> {
        let mut ev = libc::epoll_event { events, u64: token };
        // SAFETY: ev is a live epoll_event; epoll_ctl copies it.
        let rc = unsafe { libc::epoll_ctl(self.epoll.as_raw_fd(), op, fd.as_raw_fd(), &mut ev) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Stops watching `fd` (a closed fd leaves the set by itself; this is for one that
    /// stays open but must not keep the set readable).
    fn unwatch(&self, fd: BorrowedFd<'_>) {
        // SAFETY: EPOLL_CTL_DEL ignores the event pointer (null is allowed since 2.6.9).
        unsafe {
            libc::epoll_ctl(
                self.epoll.as_raw_fd(),
                libc::EPOLL_CTL_DEL,
                fd.as_raw_fd(),
                std::ptr::null_mut(),
            );
        }
    }

    /// Watches a new link's doorbell (and pidfd, if any). On failure the link still
    /// works; it just does not make the host's fd readable.
    pub(crate) fn watch_link(&self, index: usize, link: &GuestLink) {
        let _ = self.watch(link.doorbell.as_fd(), index as u64);
        self.watch_pidfd(index, link);
    }

    pub(crate) fn watch_pidfd(&self, index: usize, link: &GuestLink) {
        if let Some(pidfd) = &link.pidfd {
            let _ = self.watch(pidfd.as_fd(), PIDFD + index as u64);
        }
    }

    /// Consumes every pending ring without blocking. A doorbell that hung up or a
    /// pidfd that fired leaves the set (it would stay readable until the liveness
    /// check recovers the entry) and is reported as a death to check for.
    pub(crate) fn drain(&mut self, peers: &mut [HostPeer]) -> Drain {
        let mut out = Drain::default();
        let cap = (peers.len() * 2 + 1).max(1);
        self.events.clear();
        self.events.reserve(cap);
        // SAFETY: the buffer has room for `cap` events; a zero timeout never blocks.
        let n = unsafe {
            libc::epoll_wait(
                self.epoll.as_raw_fd(),
                self.events.as_mut_ptr(),
                cap as i32,
                0,
            )
        };
        if n <= 0 {
            return out;
        }
        // SAFETY: epoll_wait initialised the first n entries.
        unsafe { self.events.set_len(n as usize) };
        for ev in &self.events {
            let token = ev.u64;
            if token == LISTENER || token == PENDING {
                out.connecting = true;
                continue;
            }
            let index = (token & 0xffff_ffff) as usize;
            let Some(link) = peers.get_mut(index).and_then(|p| p.link.as_mut()) else {
                continue;
            };
            if token >= PIDFD {
                if let Some(pidfd) = &link.pidfd {
                    self.unwatch(pidfd.as_fd());
                }
                out.death = true;
            } else if link.large_in.drain(link.doorbell.as_fd()) == Drained::HungUp {
                self.unwatch(link.doorbell.as_fd());
                out.death = true;
            }
        }
        out
    }

    /// Accepts pending path-guest connections and links each whose hello names an
    /// Attached (or Goodbye) entry at the generation it holds, claimed by the
    /// connecting process (the kernel's record of its pid, not the guest's word).
    /// Anything else is closed: the guest sees a hang-up.
    // shm[impl shm.doorbell.connect]
    pub(crate) fn accept(&mut self, segment: &Segment, peers: &mut [HostPeer]) {
        while let Ok(Some(fd)) = doorbell::accept(self.listener.as_fd()) {
            // Watched while pending, so a hello that completes later (or a ring sent
            // right after it) makes the host's fd readable.
            let edge = (libc::EPOLLIN | libc::EPOLLET) as u32;
            let _ = self.ctl(libc::EPOLL_CTL_ADD, fd.as_fd(), PENDING, edge);
            self.pending.push((fd, Instant::now()));
        }
        let now = Instant::now();
        let pending = std::mem::take(&mut self.pending);
        for (fd, since) in pending {
            match doorbell::read_hello(fd.as_fd()) {
                Ok(Some(hello)) => self.link(segment, peers, fd, hello),
                Ok(None) if now.duration_since(since) < HELLO_TIMEOUT => {
                    self.pending.push((fd, since))
                }
                _ => {}
            }
        }
    }

    fn link(&self, segment: &Segment, peers: &mut [HostPeer], fd: OwnedFd, hello: Hello) {
        let Some(peer) = PeerId::from_index(hello.index as usize) else {
            return;
        };
        let Some(entry) = segment.peer(peer) else {
            return;
        };
        let hp = &mut peers[peer.index()];
        // A guest that said goodbye before we accepted its connection is linked too:
        // the files of large payloads it published before leaving are queued on it.
        let attached = matches!(entry.load(), Ok(w)
            if matches!(w.state, PeerState::Attached | PeerState::Goodbye)
                && w.generation == hello.generation);
        let pid = doorbell::peer_pid(fd.as_fd()).ok();
        let claimed_by_it = pid == Some(entry.guest_pid.load(Ordering::Relaxed));
        if !attached || !claimed_by_it || hp.fenced.is_some() || hp.link_matches(hello.generation) {
            return;
        }
        // A link left from an earlier incarnation speaks for nobody now.
        hp.drop_link();
        let index_token = peer.index() as u64;
        let link = GuestLink {
            generation: hello.generation,
            doorbell: std::sync::Arc::new(fd),
            pidfd: None,
            child: None,
            large_in: Default::default(),
        };
        // From pending to the entry's own token, level-triggered like every doorbell.
        let level = libc::EPOLLIN as u32;
        let _ = self.ctl(
            libc::EPOLL_CTL_MOD,
            link.doorbell.as_fd(),
            index_token,
            level,
        );
        hp.set_link(link);
    }
}
