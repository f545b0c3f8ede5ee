//! Large payloads on one doorbell (`shm.msg.large`): the sender's sequence counter and
//! the receiver's queue of passed memory files.
//!
//! The sender puts the payload in a sealed memfd ([`crate::large::LargeBuffer`]),
//! passes the fd on the doorbell and only then publishes a kind-3 descriptor naming
//! its sequence number. The receiver collects every fd the doorbell carries
//! ([`LargeInbox::drain`], which replaces the plain doorbell drain) and matches the
//! descriptor to the fd at the front of its queue by that number.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

use crate::channel::{ChannelSendError, Outbox};
use crate::desc::{Body, Meta};
use crate::doorbell::Drained;
use crate::large::{self, LargeBuffer, LargeError, LargeView};
use crate::ring::RingView;
use crate::violation::Violation;

/// The largest payload the large-payload path carries, in either direction: 1 GiB.
/// A descriptor announcing more is refused before anything is mapped.
pub const MAX_LARGE_PAYLOAD: usize = 1 << 30;

/// The sending side: numbers the payloads it passes, from 1.
#[derive(Debug, Default)]
pub struct LargeOutbox {
    last_seq: u64,
}

/// Why a large payload could not be passed. Nothing was published.
#[derive(Debug, thiserror::Error)]
pub enum LargeSendError {
    /// The doorbell's socket buffer is full (the receiver has not drained it).
    #[error("the doorbell cannot take another file now")]
    WouldBlock,
    /// Creating, filling, sealing or passing the memory file failed.
    #[error("{op}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The OS error.
        source: io::Error,
    },
}

impl LargeOutbox {
    /// A fresh buffer of `len` bytes for the caller to fill.
    pub fn buffer(len: usize) -> Result<LargeBuffer, LargeSendError> {
        LargeBuffer::create(len).map_err(|source| LargeSendError::Io {
            op: "create a large-payload memfd",
            source,
        })
    }

    /// Seals `buffer` and passes it on `doorbell`; returns the sequence number the
    /// descriptor must carry, and the sender's own descriptor of the sealed file
    /// (drop it, or keep it to pass the file again to a guest that takes over the
    /// entry, `shm.delivery.at-least-once`). The caller has checked that the ring has
    /// room, so the descriptor follows (an fd whose descriptor never comes is an
    /// orphan the receiver discards by its number).
    // shm[impl shm.msg.large]
    pub fn pass(
        &mut self,
        buffer: LargeBuffer,
        doorbell: BorrowedFd<'_>,
    ) -> Result<(u64, OwnedFd), LargeSendError> {
        let seq = self.last_seq + 1;
        let fd = buffer.finish(seq).map_err(|source| LargeSendError::Io {
            op: "seal a large-payload memfd",
            source,
        })?;
        match large::send_fd(doorbell, fd.as_fd()) {
            Ok(()) => {
                self.last_seq = seq;
                Ok((seq, fd))
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Err(LargeSendError::WouldBlock),
            Err(source) => Err(LargeSendError::Io {
                op: "pass a large-payload memfd",
                source,
            }),
        }
    }
}

/// Why [`send_large`] did not publish: the ring (or the length, `TooLarge` up to
/// [`MAX_LARGE_PAYLOAD`]), or passing the file.
#[derive(Debug)]
pub enum LargeChannelError {
    /// As for any send on the ring.
    Channel(ChannelSendError),
    /// The memory file could not be made or passed.
    Pass(LargeSendError),
}

/// Sends a payload above the largest slot class in a sealed memory file passed on
/// `doorbell`, the receiver's (`shm.msg.large`): room in the ring first (the caller is
/// the ring's only producer, so it stays), then the file, then the descriptor naming
/// it. Returns the sender's descriptor of the sealed file (drop it unless it is kept
/// for redelivery).
// shm[impl shm.msg.large]
#[cold]
pub fn send_large(
    ring: &RingView<'_>,
    doorbell: BorrowedFd<'_>,
    (outbox, large): (&mut Outbox, &mut LargeOutbox),
    meta: Meta,
    payload: &[u8],
) -> Result<OwnedFd, LargeChannelError> {
    use LargeChannelError::{Channel, Pass};
    if payload.len() > MAX_LARGE_PAYLOAD {
        return Err(Channel(ChannelSendError::TooLarge {
            len: payload.len(),
            max: MAX_LARGE_PAYLOAD,
        }));
    }
    match outbox.has_space(ring) {
        Ok(true) => {}
        Ok(false) => return Err(Channel(ChannelSendError::RingFull)),
        Err(v) => return Err(Channel(ChannelSendError::Violation(v))),
    }
    let mut buffer = LargeOutbox::buffer(payload.len()).map_err(Pass)?;
    buffer.write_at(0, payload);
    let (seq, file) = large.pass(buffer, doorbell).map_err(Pass)?;
    let len = payload.len() as u32;
    outbox
        .push(ring, meta, len, Body::Large { seq }, Some(doorbell))
        .map_err(Channel)?;
    Ok(file)
}

/// The receiving side: memory files received on the doorbell, in arrival order.
#[derive(Debug, Default)]
pub struct LargeInbox {
    fds: VecDeque<OwnedFd>,
    /// The highest sequence number opened so far.
    last_seq: u64,
    /// Files discarded because no descriptor named them.
    orphans: u64,
}

impl LargeInbox {
    /// Reads everything pending on `doorbell` (wake-ups and files) without blocking.
    /// Every read of a doorbell that can carry files MUST go through here: a plain
    /// read makes the kernel close the files it skips.
    pub fn drain(&mut self, doorbell: BorrowedFd<'_>) -> Drained {
        large::recv_pending(doorbell, &mut self.fds)
    }

    /// Files waiting for their descriptor.
    pub fn queued(&self) -> usize {
        self.fds.len()
    }

    /// Files discarded so far because no descriptor named them.
    pub fn orphans(&self) -> u64 {
        self.orphans
    }

    /// Opens the payload a kind-3 descriptor announced: `seq`, `len` bytes. Drains
    /// the doorbell first (the sender passed the file before publishing), discards
    /// queued files with a lower number (orphans of sends that never published), and
    /// maps the file whose header carries `seq`. A number that does not grow, a
    /// length over [`MAX_LARGE_PAYLOAD`], a missing file or one that fails the checks
    /// of [`LargeView::open`] is a violation.
    ///
    /// A file still missing is waited for, on the doorbell, for at most `wait`: only
    /// a guest resuming a retained entry can see its descriptor before its file (the
    /// host passes retained files again when it links the new doorbell).
    // shm[impl shm.msg.large]
    pub fn open(
        &mut self,
        doorbell: BorrowedFd<'_>,
        seq: u64,
        len: u32,
        wait: Duration,
    ) -> Result<LargeView, Violation> {
        let bad = |reason| Violation::Large { seq, reason };
        if len as usize > MAX_LARGE_PAYLOAD {
            return Err(bad("longer than the large-payload limit"));
        }
        if seq <= self.last_seq {
            return Err(bad("sequence number did not grow"));
        }
        self.drain(doorbell);
        let deadline = Instant::now() + wait;
        while self.fds.is_empty() && wait_readable(doorbell, deadline) {
            if self.drain(doorbell) == Drained::HungUp {
                break;
            }
        }
        while let Some(fd) = self.fds.pop_front() {
            match large::header_seq(fd.as_fd()) {
                // Passed by a send that never published: nothing will name it.
                Some(found) if found < seq => {
                    self.orphans += 1;
                    continue;
                }
                Some(found) if found == seq => {}
                _ => return Err(bad("its file is missing")),
            }
            return match LargeView::open(fd, seq, u64::from(len)) {
                Ok(view) => {
                    self.last_seq = seq;
                    Ok(view)
                }
                Err(LargeError::NotSealed { .. }) => Err(bad("file is not sealed")),
                Err(LargeError::Size { .. }) => Err(bad("file size does not match")),
                Err(LargeError::Header { .. }) => Err(bad("file header does not match")),
                Err(LargeError::Io { .. }) => Err(bad("file cannot be mapped")),
            };
        }
        Err(bad("its file is missing"))
    }
}

/// Waits until `fd` is readable or `deadline` passes; true when readable.
fn wait_readable(fd: BorrowedFd<'_>, deadline: Instant) -> bool {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return false;
    }
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = left.as_millis().clamp(1, i32::MAX as u128) as i32;
    // SAFETY: one pollfd we own, for at most `ms` milliseconds.
    unsafe { libc::poll(&mut pfd, 1, ms) > 0 }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doorbell::{pair, ring};

    fn passed(out: &mut LargeOutbox, tx: BorrowedFd<'_>, bytes: &[u8]) -> u64 {
        let mut buf = LargeOutbox::buffer(bytes.len()).unwrap();
        assert!(buf.write_at(0, bytes));
        out.pass(buf, tx).unwrap().0
    }

    #[test]
    #[cfg_attr(miri, ignore = "memfd_create: not in Miri")]
    fn files_are_matched_by_number_and_orphans_are_dropped() {
        let (tx, rx) = pair().unwrap();
        let (mut out, mut inbox) = (LargeOutbox::default(), LargeInbox::default());
        let orphan = passed(&mut out, tx.as_fd(), b"never announced");
        ring(tx.as_fd());
        let seq = passed(&mut out, tx.as_fd(), b"announced");
        assert_eq!((orphan, seq), (1, 2));
        let view = inbox.open(rx.as_fd(), seq, 9, Duration::ZERO).unwrap();
        assert_eq!(view.to_vec(), b"announced");
        assert_eq!(inbox.orphans(), 1);
        assert_eq!(inbox.queued(), 0);
        // The same number again is refused, and so is a file that never came.
        assert!(matches!(
            inbox.open(rx.as_fd(), seq, 9, Duration::ZERO),
            Err(Violation::Large { .. })
        ));
        assert!(matches!(
            inbox.open(rx.as_fd(), seq + 1, 9, Duration::ZERO),
            Err(Violation::Large { .. })
        ));
    }

    #[test]
    #[cfg_attr(miri, ignore = "memfd_create: not in Miri")]
    fn a_wrong_length_or_an_oversized_one_is_a_violation() {
        let (tx, rx) = pair().unwrap();
        let (mut out, mut inbox) = (LargeOutbox::default(), LargeInbox::default());
        let seq = passed(&mut out, tx.as_fd(), &[7; 100]);
        assert!(matches!(
            inbox.open(rx.as_fd(), seq, 99, Duration::ZERO),
            Err(Violation::Large { .. })
        ));
        assert!(matches!(
            inbox.open(
                rx.as_fd(),
                seq + 1,
                (MAX_LARGE_PAYLOAD + 1) as u32,
                Duration::ZERO
            ),
            Err(Violation::Large { .. })
        ));
    }
}
