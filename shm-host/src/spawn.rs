//! Spawn tickets: everything a child needs to attach to a peer entry reserved for it
//! (`shm.spawn.ticket`).

use std::ffi::OsString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use shm_primitives::memfd;
use shm_primitives::ticket::{self, TicketRecord};

use crate::PeerHandle;

/// Options for [`ShmHost::prepare_guest`](crate::ShmHost::prepare_guest).
#[derive(Debug, Clone, Copy)]
pub struct GuestOptions {
    /// How long the child may take to attach (its attach timeout).
    pub attach_timeout: Duration,
}

impl Default for GuestOptions {
    fn default() -> Self {
        Self {
            attach_timeout: Duration::from_secs(5),
        }
    }
}

/// Why a guest could not be prepared or spawned. Nothing is left reserved.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    /// No entry could be reserved.
    #[error(transparent)]
    Peer(#[from] crate::PeerError),
    /// A heap-backed segment has no path a child could attach to.
    #[error("a heap-backed segment cannot be handed to another process")]
    NoPath,
    /// Only a sealed segment can be handed over by descriptor
    /// ([`ShmHost::create_sealed`](crate::ShmHost::create_sealed)).
    #[error("only a sealed segment can be handed over by descriptor")]
    NotSealed,
    /// A system call failed.
    #[error("{op}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The OS error.
        source: io::Error,
    },
}

/// What a child needs to attach to the entry reserved for it: the segment (its path,
/// or for a sealed segment a descriptor of it), peer id and generation, and its end
/// of the doorbell. Render it with [`args`] or [`envs`] (or let [`configure`] do it);
/// the child calls `ShmGuest::from_env()` or `ShmGuest::from_ticket_args(..)`. A
/// sealed segment's ticket can instead be [sent](SpawnTicket::send_to) to any process
/// over a Unix socket, which calls `ShmGuest::from_ticket_socket(..)`.
///
/// Dropping the ticket closes the child's descriptors in this process; if no child
/// holds the doorbell, the host sees the hang-up and releases the reservation
/// (`shm.spawn.failure`).
///
/// [`args`]: SpawnTicket::args
/// [`envs`]: SpawnTicket::envs
/// [`configure`]: SpawnTicket::configure
#[derive(Debug)]
pub struct SpawnTicket {
    pub(crate) hub: Hub,
    pub(crate) handle: PeerHandle,
    pub(crate) child_end: OwnedFd,
    pub(crate) attach_timeout: Duration,
}

/// The segment a ticket names.
#[derive(Debug)]
pub(crate) enum Hub {
    /// A segment with a path: the child opens it.
    Path(PathBuf),
    /// A sealed segment: a new open file description of it, for this ticket alone
    /// (`shm.fd.passing`).
    Fd(OwnedFd),
}

impl SpawnTicket {
    /// The entry reserved for the child.
    pub fn handle(&self) -> PeerHandle {
        self.handle
    }

    /// `(index in ticket::FIELDS, value)` of every field this ticket renders: the
    /// path or the segment descriptor, then the rest.
    fn values(&self) -> Vec<(usize, OsString)> {
        let hub = match &self.hub {
            Hub::Path(path) => (ticket::HUB_PATH, path.clone().into_os_string()),
            Hub::Fd(fd) => (ticket::HUB_FD, fd.as_raw_fd().to_string().into()),
        };
        vec![
            hub,
            (ticket::PEER_ID, self.handle.id.get().to_string().into()),
            (
                ticket::PEER_GENERATION,
                self.handle.generation.to_string().into(),
            ),
            (
                ticket::DOORBELL_FD,
                self.child_end.as_raw_fd().to_string().into(),
            ),
            (
                ticket::ATTACH_TIMEOUT_MS,
                self.attach_timeout.as_millis().to_string().into(),
            ),
        ]
    }

    /// Command-line arguments: `--hub-path P` (or, for a sealed segment,
    /// `--hub-fd S`) `--peer-id N --peer-generation G --doorbell-fd F
    /// --attach-timeout-ms T`.
    pub fn args(&self) -> Vec<OsString> {
        self.values()
            .into_iter()
            .flat_map(|(index, value)| [OsString::from(ticket::FIELDS[index].0), value])
            .collect()
    }

    /// Environment variables: `SHMHUB_HUB_PATH` (or, for a sealed segment,
    /// `SHMHUB_HUB_FD`), `SHMHUB_PEER_ID`, `SHMHUB_PEER_GENERATION`,
    /// `SHMHUB_DOORBELL_FD`, `SHMHUB_ATTACH_TIMEOUT_MS`.
    pub fn envs(&self) -> Vec<(OsString, OsString)> {
        self.values()
            .into_iter()
            .map(|(index, value)| (OsString::from(ticket::FIELDS[index].1), value))
            .collect()
    }

    /// Sets the ticket's environment variables on `cmd` and makes the ticket's
    /// descriptors (the doorbell, and a sealed segment's descriptor) and only them
    /// inheritable by the child: every descriptor this library creates is
    /// close-on-exec, and the flag is cleared on the child's copies alone, after fork.
    // shm[impl shm.spawn.inherit]
    pub fn configure(&self, cmd: &mut Command) {
        cmd.envs(self.envs());
        let doorbell = self.child_end.as_raw_fd();
        let hub = match &self.hub {
            Hub::Fd(fd) => Some(fd.as_raw_fd()),
            Hub::Path(_) => None,
        };
        // SAFETY: the hook runs in the forked child before exec and calls only fcntl,
        // which is async-signal-safe; it touches no memory of the parent.
        unsafe {
            cmd.pre_exec(move || {
                for fd in std::iter::once(doorbell).chain(hub) {
                    if libc::fcntl(fd, libc::F_SETFD, 0) == -1 {
                        return Err(io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
    }

    /// Sends the ticket of a sealed segment to the process at the other end of
    /// `socket` (a connected Unix stream socket) in one message: the ticket record and
    /// both descriptors, the segment's and the doorbell end (`shm.fd.passing`). That
    /// process calls `ShmGuest::from_ticket_socket`. Never blocks (a full socket is an
    /// error) and never raises `SIGPIPE`. The ticket is consumed: its descriptors
    /// close here once sent, and if sending fails the host releases the reservation
    /// at its next liveness check (or call
    /// [`ShmHost::hand_over`](crate::ShmHost::hand_over), which does it at once).
    // shm[impl shm.fd.passing]
    pub fn send_to(self, socket: impl AsFd) -> Result<(), SpawnError> {
        let Hub::Fd(segment) = &self.hub else {
            return Err(SpawnError::NotSealed);
        };
        let record = TicketRecord {
            peer_id: u32::from(self.handle.id.get()),
            generation: self.handle.generation,
            // A timeout past u32 milliseconds saturates; the guest refuses it anyway.
            attach_timeout_ms: u32::try_from(self.attach_timeout.as_millis()).unwrap_or(u32::MAX),
        };
        memfd::send_with_fds(
            socket.as_fd(),
            &record.encode(),
            &[segment.as_fd(), self.child_end.as_fd()],
        )
        .map_err(|source| SpawnError::Io {
            op: "send the ticket",
            source,
        })
    }
}

/// A guest the host spawned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpawnedGuest {
    /// The entry reserved for it.
    pub handle: PeerHandle,
    /// Its process id (the host keeps its pidfd and reaps it).
    pub pid: u32,
}
