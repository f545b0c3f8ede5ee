//! Spawn tickets: everything a child needs to attach to a peer entry reserved for it
//! (`shm.spawn.ticket`).

use std::ffi::OsString;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use shm_primitives::ticket;

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
    /// A system call failed.
    #[error("{op}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The OS error.
        source: io::Error,
    },
}

/// What a child needs to attach to the entry reserved for it: the segment path, peer
/// id and generation, and its end of the doorbell. Render it with [`args`] or
/// [`envs`] (or let [`configure`] do it); the child calls `ShmGuest::from_env()` or
/// `ShmGuest::from_ticket_args(..)`.
///
/// Dropping the ticket closes the child's end in this process; if no child holds it,
/// the host sees the hang-up and releases the reservation (`shm.spawn.failure`).
///
/// [`args`]: SpawnTicket::args
/// [`envs`]: SpawnTicket::envs
/// [`configure`]: SpawnTicket::configure
#[derive(Debug)]
pub struct SpawnTicket {
    pub(crate) path: PathBuf,
    pub(crate) handle: PeerHandle,
    pub(crate) child_end: OwnedFd,
    pub(crate) attach_timeout: Duration,
}

impl SpawnTicket {
    /// The entry reserved for the child.
    pub fn handle(&self) -> PeerHandle {
        self.handle
    }

    fn values(&self) -> [OsString; 5] {
        [
            self.path.clone().into_os_string(),
            self.handle.id.get().to_string().into(),
            self.handle.generation.to_string().into(),
            self.child_end.as_raw_fd().to_string().into(),
            self.attach_timeout.as_millis().to_string().into(),
        ]
    }

    /// Command-line arguments: `--hub-path P --peer-id N --peer-generation G
    /// --doorbell-fd F --attach-timeout-ms T`.
    pub fn args(&self) -> Vec<OsString> {
        ticket::FIELDS
            .iter()
            .zip(self.values())
            .flat_map(|(&(arg, _), value)| [OsString::from(arg), value])
            .collect()
    }

    /// Environment variables: `SHMHUB_HUB_PATH`, `SHMHUB_PEER_ID`,
    /// `SHMHUB_PEER_GENERATION`, `SHMHUB_DOORBELL_FD`, `SHMHUB_ATTACH_TIMEOUT_MS`.
    pub fn envs(&self) -> Vec<(OsString, OsString)> {
        ticket::FIELDS
            .iter()
            .zip(self.values())
            .map(|(&(_, env), value)| (OsString::from(env), value))
            .collect()
    }

    /// Sets the ticket's environment variables on `cmd` and makes the doorbell (and
    /// only it) inheritable by the child: every descriptor this library creates is
    /// close-on-exec, and the flag is cleared on the child's copy alone, after fork.
    // shm[impl shm.spawn.inherit]
    pub fn configure(&self, cmd: &mut Command) {
        cmd.envs(self.envs());
        let fd = self.child_end.as_raw_fd();
        // SAFETY: the hook runs in the forked child before exec and calls only fcntl,
        // which is async-signal-safe; it touches no memory of the parent.
        unsafe {
            cmd.pre_exec(move || {
                if libc::fcntl(fd, libc::F_SETFD, 0) == -1 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
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
