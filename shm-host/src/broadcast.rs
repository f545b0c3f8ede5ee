//! Broadcast: one payload to every attached guest, copied once (`shm.broadcast.alloc`).
//!
//! A payload that fits in a descriptor is pushed inline to each recipient. A larger
//! one is written once into a slot of the shared broadcast pool, whose holder bits
//! name the recipients; each recipient's ring gets a kind 2 descriptor, and the last
//! recipient to release the slot frees it (`shm.broadcast.release`).

use shm_primitives::broadcast::{BroadcastRef, PeerSet};
use shm_primitives::desc::Body;
use shm_primitives::layout::MAX_GUESTS;
use shm_primitives::slot::PoolUsage;
use shm_primitives::INLINE_CAPACITY;
use shm_primitives::{ChannelSendError, Direction, Meta, PeerId, PeerState, Violation};

const MAX_GUESTS_USIZE: usize = MAX_GUESTS as usize;

use crate::{peers, ShmHost};

/// Who a broadcast reached, and who it did not.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BroadcastReport {
    /// Guests the message was published to.
    pub delivered: PeerSet,
    /// Attached guests whose ring had no room: they did not get the message (and hold
    /// no reference to its slot). Retry them with `try_send`, or broadcast again.
    pub full: PeerSet,
    /// Guests this call found breaking the protocol (an impossible ring counter or
    /// state word) and fenced; they did not get the message.
    pub fenced: PeerSet,
    /// The broadcast slot the payload travels in, `None` for an inline payload or
    /// when nobody could be sent it (no slot was used then).
    pub slot: Option<BroadcastRef>,
}

/// Why a broadcast did not happen. Nothing was published to anyone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BroadcastError {
    /// The payload needs a slot and the segment has no broadcast pool
    /// (`SegmentConfig::broadcast_slots` is 0).
    #[error("no broadcast pool for a payload of {len} bytes")]
    NoPool {
        /// Payload length.
        len: usize,
    },
    /// The payload is larger than a broadcast slot.
    #[error("payload of {len} bytes exceeds the {max}-byte broadcast slot")]
    TooLarge {
        /// Payload length.
        len: usize,
        /// Largest broadcast payload.
        max: usize,
    },
    /// Every broadcast slot is in use: retry once recipients release theirs.
    #[error("every broadcast slot is in use")]
    WouldBlock,
    /// A broadcast slot's word changed while the host held it: some guest wrote the
    /// shared pool. Which one cannot be told, so nobody is fenced.
    #[error("broadcast pool corrupted: {0}")]
    Violation(Violation),
}

impl BroadcastError {
    /// True for the back-pressure error a caller should retry.
    pub fn is_would_block(&self) -> bool {
        matches!(self, BroadcastError::WouldBlock)
    }
}

/// The recipients a broadcast may go to, with the generation each was seen at.
struct Recipients {
    ready: PeerSet,
    generations: [u32; MAX_GUESTS_USIZE],
}

impl ShmHost {
    /// Sends one message to every attached guest the host has not fenced: inline when
    /// the payload fits in a descriptor ([`INLINE_CAPACITY`] bytes), otherwise copied
    /// once into a slot of the broadcast pool that every recipient reads. Never
    /// blocks. A guest whose ring is full is skipped and named in the report, never
    /// dropped silently. Each recipient sees the message in order with everything
    /// else the host sends it.
    // shm[impl shm.broadcast.alloc]
    pub fn broadcast(
        &mut self,
        meta: Meta,
        payload: &[u8],
    ) -> Result<BroadcastReport, BroadcastError> {
        let len = payload.len();
        // Allocate first: a broadcast that cannot get a slot changes nothing.
        let slot = match len {
            0..=INLINE_CAPACITY => None,
            _ => {
                let pool = self
                    .segment
                    .broadcast()
                    .ok_or(BroadcastError::NoPool { len })?;
                let max = pool.slot_size() as usize;
                if len > max {
                    return Err(BroadcastError::TooLarge { len, max });
                }
                let slot = pool.alloc().ok_or(BroadcastError::WouldBlock)?;
                pool.write(slot.index, payload);
                Some(slot)
            }
        };
        let mut report = BroadcastReport::default();
        let recipients = self.recipients(&mut report);
        if let Some(slot) = slot {
            let pool = self.segment.broadcast().expect("allocated from it");
            if recipients.ready.is_empty() {
                pool.abandon(slot);
                return Ok(report);
            }
            // Bits only for the guests we are about to push to.
            pool.publish(slot, &recipients.ready)
                .map_err(BroadcastError::Violation)?;
            report.slot = Some(slot);
        }
        for peer in recipients.ready.iter() {
            let generation = recipients.generations[peer.index()];
            match self.push_one(peer, generation, meta, payload, slot) {
                Ok(()) => {
                    report.delivered.insert(peer);
                }
                Err(e) => self.not_reached(peer, generation, slot, e, &mut report),
            }
        }
        for peer in report.delivered.iter() {
            self.after_send(peer, &Ok(()));
        }
        Ok(report)
    }

    /// Slot occupancy of the broadcast pool (read from shared memory, so
    /// informational only); `None` when the segment has none.
    pub fn broadcast_usage(&self) -> Option<PoolUsage> {
        self.segment.broadcast().map(|pool| pool.usage())
    }

    /// Every Attached, unfenced guest whose ring has room; the others go into the
    /// report (a full ring, or a value that fenced the guest).
    fn recipients(&mut self, report: &mut BroadcastReport) -> Recipients {
        let mut out = Recipients {
            ready: PeerSet::new(),
            generations: [0; MAX_GUESTS_USIZE],
        };
        for index in 0..self.peers.len() {
            let peer = PeerId::from_index(index).expect("index < 255");
            let entry = self.segment.peer(peer).expect("in range");
            let hp = &mut self.peers[index];
            if hp.fenced.is_some() {
                continue;
            }
            let word = match hp.observe(entry) {
                Ok(w) => w,
                Err(_) => {
                    report.fenced.insert(peer);
                    continue;
                }
            };
            if word.state != PeerState::Attached {
                continue;
            }
            let ring = self
                .segment
                .ring(peer, Direction::ToGuest)
                .expect("in range");
            // We are the only producer of this ring: room found now is still there
            // when we push.
            match hp.outbox.has_space(&ring) {
                Ok(true) => {
                    out.ready.insert(peer);
                    out.generations[index] = word.generation;
                }
                Ok(false) => {
                    report.full.insert(peer);
                }
                Err(violation) => {
                    hp.fence(entry, word.generation, violation);
                    report.fenced.insert(peer);
                }
            }
        }
        out
    }

    /// A push that failed after all (room was checked and only we produce, so this is
    /// not expected): the guest never sees the descriptor, so its hold goes back now,
    /// and the report names it.
    #[cold]
    fn not_reached(
        &mut self,
        peer: PeerId,
        generation: u32,
        slot: Option<BroadcastRef>,
        e: ChannelSendError,
        report: &mut BroadcastReport,
    ) {
        if let (Some(s), Some(pool)) = (slot, self.segment.broadcast()) {
            let _ = pool.release(peer, s.index, s.generation);
        }
        match e {
            ChannelSendError::Violation(v) => {
                let entry = self.segment.peer(peer).expect("in range");
                self.peers[peer.index()].fence(entry, generation, v);
                report.fenced.insert(peer);
            }
            _ => {
                report.full.insert(peer);
            }
        }
    }

    /// Publishes the broadcast to one recipient: inline, or a reference to `slot`.
    fn push_one(
        &mut self,
        peer: PeerId,
        generation: u32,
        meta: Meta,
        payload: &[u8],
        slot: Option<BroadcastRef>,
    ) -> Result<(), ChannelSendError> {
        let hp = &mut self.peers[peer.index()];
        let ring = self
            .segment
            .ring(peer, Direction::ToGuest)
            .expect("in range");
        let bell = peers::doorbell(&hp.link, generation);
        match slot {
            None => hp.outbox.send_inline(&ring, meta, payload, bell)?,
            Some(s) => {
                let body = Body::Broadcast {
                    index: s.index,
                    generation: s.generation,
                };
                hp.outbox
                    .push(&ring, meta, payload.len() as u32, body, bell)?
            }
        }
        hp.stats.sent += 1;
        hp.stats.broadcasts += 1;
        Ok(())
    }
}
