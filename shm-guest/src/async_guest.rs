//! Async send and receive on tokio (feature `tokio`), built on the guest's doorbell
//! through `AsyncFd` (`shm.doorbell.async`).

use std::io;

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use crate::{DetachedError, Meta, RecvError, SendError, ShmGuest};

/// A guest whose waits are futures: it parks on its doorbell, registered with the
/// tokio reactor, instead of a futex. Dropping a future mid-wait loses nothing: the
/// message stays in the ring for the next call.
#[derive(Debug)]
pub struct AsyncGuest {
    /// The guest itself, registered by its doorbell fd.
    guest: AsyncFd<ShmGuest>,
}

impl AsyncGuest {
    /// Registers the guest's doorbell with the current tokio runtime (call it inside
    /// one; the guest keeps the fd open for as long as this lives).
    pub fn new(guest: ShmGuest) -> io::Result<Self> {
        // SAFETY: the guest owns its doorbell fd for its whole life and `as_raw_fd`
        // always returns that same fd; the `AsyncFd` owns the guest, so the fd stays
        // open and unchanged for as long as it is registered.
        let guest = unsafe { AsyncFd::register_with_interest(guest, Interest::READABLE) }
            .map_err(io::Error::from)?;
        Ok(Self { guest })
    }

    /// The guest, for its non-blocking calls.
    pub fn get_mut(&mut self) -> &mut ShmGuest {
        self.guest.get_mut()
    }

    /// The guest, unregistered from the runtime.
    pub fn into_inner(self) -> ShmGuest {
        self.guest.into_inner()
    }

    /// Receives one message into `buf` (replacing its contents), waiting as long as it
    /// takes; wrap it in `tokio::time::timeout` for a deadline. The host's death or
    /// close ends the wait with an error.
    // shm[impl shm.doorbell.async]
    pub async fn recv(&mut self, buf: &mut Vec<u8>) -> Result<Meta, RecvError> {
        loop {
            if let Some(meta) = self.guest.get_mut().try_recv(buf)? {
                return Ok(meta);
            }
            self.guest.get_mut().arm_doorbell_recv()?;
            // Re-check after arming: a message published before the arm rang nobody.
            if let Some(meta) = self.guest.get_mut().try_recv(buf)? {
                return Ok(meta);
            }
            self.wait().await?;
        }
    }

    /// Sends one message, waiting for ring space and a free slot as long as it takes.
    // shm[impl shm.doorbell.async]
    pub async fn send(&mut self, meta: Meta, payload: &[u8]) -> Result<(), SendError> {
        loop {
            match self.guest.get_mut().try_send(meta, payload) {
                Err(e) if e.is_would_block() => {}
                done => return done,
            }
            self.guest.get_mut().arm_doorbell_send()?;
            match self.guest.get_mut().try_send(meta, payload) {
                Err(e) if e.is_would_block() => {}
                done => return done,
            }
            self.wait().await?;
        }
    }

    /// Waits until the doorbell is readable or a liveness interval passes, then checks
    /// the host (its heartbeat and lock need the clock, not an fd).
    async fn wait(&mut self) -> Result<(), DetachedError> {
        let interval = self.guest.get_ref().liveness_interval();
        if let Ok(Ok(mut ready)) = tokio::time::timeout(interval, self.guest.readable()).await {
            // The next arm drains the socket; a ring after that is a new edge.
            ready.clear_ready();
        }
        self.guest.get_mut().check_host()
    }
}
