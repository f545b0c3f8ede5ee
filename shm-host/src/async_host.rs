//! Async send and receive on tokio (feature `tokio`), built on the host's doorbell
//! set through `AsyncFd` (`shm.doorbell.async`).

use std::io;

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use crate::{Meta, Received, RecvError, SendError, ShmHost, Target};

/// A host whose waits are futures: it parks on its doorbell set (an epoll fd
/// registered with the tokio reactor) instead of the host-wide futex, and still
/// checks liveness at least once per liveness interval while it waits.
pub struct AsyncHost {
    /// The host itself, registered by its doorbell set's fd.
    host: AsyncFd<ShmHost>,
}

impl std::fmt::Debug for AsyncHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AsyncHost").finish_non_exhaustive()
    }
}

impl AsyncHost {
    /// Registers the host's doorbell set with the current tokio runtime (call it
    /// inside one).
    pub fn new(host: ShmHost) -> io::Result<Self> {
        // SAFETY: the host owns its epoll fd for its whole life and `as_raw_fd` always
        // returns that same fd; the `AsyncFd` owns the host, so the fd stays open and
        // unchanged for as long as it is registered.
        let host = unsafe { AsyncFd::register_with_interest(host, Interest::READABLE) }
            .map_err(io::Error::from)?;
        Ok(Self { host })
    }

    /// The host, for everything else (spawning, callbacks, non-blocking calls).
    pub fn get_mut(&mut self) -> &mut ShmHost {
        self.host.get_mut()
    }

    /// The host, unregistered from the runtime.
    pub fn into_inner(self) -> ShmHost {
        self.host.into_inner()
    }

    /// Receives one message from any guest into `buf`, waiting as long as it takes;
    /// wrap it in `tokio::time::timeout` for a deadline.
    // shm[impl shm.doorbell.async]
    pub async fn recv(&mut self, buf: &mut Vec<u8>) -> Result<Received, RecvError> {
        loop {
            if let Some(msg) = self.host.get_mut().try_recv(buf)? {
                return Ok(msg);
            }
            self.host.get_mut().arm_doorbell_recv();
            // Re-check after arming: a message published before the arm rang nobody.
            if let Some(msg) = self.host.get_mut().try_recv(buf)? {
                return Ok(msg);
            }
            self.wait().await;
        }
    }

    /// Sends one message, waiting for ring space and a free slot as long as it takes.
    /// A guest that dies meanwhile ends the wait with an error.
    // shm[impl shm.doorbell.async]
    pub async fn send(
        &mut self,
        to: impl Into<Target>,
        meta: Meta,
        payload: &[u8],
    ) -> Result<(), SendError> {
        let to = to.into();
        loop {
            match self.host.get_mut().try_send(to, meta, payload) {
                Err(e) if e.is_would_block() => {}
                done => return done,
            }
            self.host.get_mut().arm_doorbell_send(to);
            match self.host.get_mut().try_send(to, meta, payload) {
                Err(e) if e.is_would_block() => {}
                done => return done,
            }
            self.wait().await;
        }
    }

    /// Waits until the doorbell set is readable or a liveness interval passes. The
    /// next `try_recv` or arm runs the liveness check if it is due (and at once for
    /// a hung-up doorbell or an exited child).
    async fn wait(&mut self) {
        let interval = self.host.get_ref().liveness_interval();
        if let Ok(Ok(mut ready)) = tokio::time::timeout(interval, self.host.readable()).await {
            // The next arm drains the set; a ring after that is a new edge.
            ready.clear_ready();
        }
    }
}
