//! Zero-copy access to payloads in shared memory: received messages whose slot stays
//! claimed (or whose broadcast reference stays held) until they are dropped
//! (`shm.slot.view`, `shm.broadcast.receive`), and the byte access both views and
//! loans offer.
//!
//! A payload in a slot lives in memory the other party could, if it broke the
//! protocol, write at any time. So a view never hands out a plain `&[u8]` as a safe
//! call: reads are copies (always sound, whatever the other side does), typed reads
//! of plain-old-data (`bytemuck::Pod`, a copy too), or an `unsafe` borrowed slice whose
//! caller vouches that nobody writes meanwhile — which every honest peer guarantees,
//! since nobody but the holder may write a Received slot (`shm.slot.layout`).

use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use crate::channel::Payload;
use crate::desc::{Meta, INLINE_CAPACITY};
use crate::large::LargeView;
use crate::layout::Direction;
use crate::peer::PeerId;
use crate::segment::Segment;

/// A received message. Inline payloads were copied out of the descriptor; a slot or
/// broadcast payload is read in place and its slot is freed (its broadcast reference
/// released) when the message is dropped.
#[derive(Debug)]
pub struct Message {
    meta: Meta,
    body: Body,
}

// Not boxed: a box would cost an allocation per received message, and a `Message` is
// built once and moved at most a few times.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
enum Body {
    Inline([u8; INLINE_CAPACITY], u8),
    Slot(SlotView),
    /// A payload in a memory file passed on the doorbell (`shm.msg.large`): unmapped
    /// and closed on drop.
    Large(LargeView),
    Broadcast(BroadcastView),
}

/// A held broadcast reference (`shm.broadcast.receive`): released on drop. The host
/// never waits for a broadcast slot, so there is nobody to wake.
#[derive(Debug)]
struct BroadcastView {
    segment: Segment,
    /// The receiving guest, whose holder bit the reference is.
    peer: PeerId,
    index: u32,
    generation: u32,
    len: u32,
    /// The slot's first byte: mapped while `segment` (which holds the mapping) lives.
    ptr: std::ptr::NonNull<u8>,
}

/// A claimed slot: freed (and a sender parked for a slot woken) on drop.
#[derive(Debug)]
struct SlotView {
    segment: Segment,
    peer: PeerId,
    dir: Direction,
    class: u8,
    index: u32,
    generation: u32,
    len: u32,
    /// The slot's first byte: mapped while `segment` (which holds the mapping) lives.
    ptr: std::ptr::NonNull<u8>,
    /// The producer's doorbell, rung if it waits on it for a slot.
    bell: Option<Arc<OwnedFd>>,
    /// The receiving party's count of live views into this pool's entry (the host
    /// keeps the slots they hold when it recycles the entry, `shm.slot.reclaim`).
    live: Option<Arc<AtomicU32>>,
}

impl Message {
    /// A message taken off `peer`'s ring in direction `dir`. For a slot payload the
    /// slot must be claimed (Received) by the caller; the message frees it on drop.
    /// For a broadcast payload (ToGuest only) the reference must have been checked by
    /// the caller (`Inbox::take`); the message releases it on drop. Returns `None`
    /// for other payload kinds, and for a broadcast in the ToHost direction.
    pub fn new(
        segment: &Segment,
        peer: PeerId,
        dir: Direction,
        meta: Meta,
        payload: Payload,
        bell: Option<&Arc<OwnedFd>>,
        live: Option<&Arc<AtomicU32>>,
    ) -> Option<Self> {
        let body = match payload {
            Payload::Inline { data, len } => Body::Inline(data, len),
            Payload::Slot {
                class,
                index,
                generation,
                len,
            } => {
                let ptr = segment.pool(peer, dir, class as usize)?.data_ptr(index)?;
                // Only a slot view keeps these (inline messages cost no refcount).
                let (bell, live) = (bell.cloned(), live.cloned());
                if let Some(live) = &live {
                    live.fetch_add(1, Ordering::Relaxed);
                }
                Body::Slot(SlotView {
                    ptr,
                    segment: segment.clone(),
                    peer,
                    dir,
                    class,
                    index,
                    generation,
                    len,
                    bell,
                    live,
                })
            }
            Payload::Broadcast {
                index,
                generation,
                len,
            } if dir == Direction::ToGuest => {
                let ptr = segment.broadcast()?.data_ptr(index)?;
                Body::Broadcast(BroadcastView {
                    segment: segment.clone(),
                    peer,
                    index,
                    generation,
                    len,
                    ptr,
                })
            }
            Payload::Broadcast { .. } | Payload::Large { .. } => return None,
        };
        Some(Self { meta, body })
    }

    /// A message whose payload arrived in a memory file (`shm.msg.large`), already
    /// opened and checked.
    pub fn large(meta: Meta, view: LargeView) -> Self {
        Self {
            meta,
            body: Body::Large(view),
        }
    }

    /// The message's header.
    pub fn meta(&self) -> Meta {
        self.meta
    }

    /// Payload length in bytes.
    pub fn len(&self) -> usize {
        match &self.body {
            Body::Inline(_, len) => *len as usize,
            Body::Slot(v) => v.len as usize,
            Body::Large(v) => v.len(),
            Body::Broadcast(v) => v.len as usize,
        }
    }

    /// True for an empty payload.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// True when the payload is read in place in a slot or a broadcast slot (not
    /// copied).
    pub fn is_zero_copy(&self) -> bool {
        matches!(
            self.body,
            Body::Slot(_) | Body::Broadcast(_) | Body::Large(_)
        )
    }

    /// The payload as a plain slice when nobody can change it any more: a large
    /// payload whose file the sender sealed against writes (`F_SEAL_WRITE`). `None`
    /// for other payloads (use the copying reads, or [`as_slice`](Self::as_slice)).
    pub fn sealed_slice(&self) -> Option<&[u8]> {
        match &self.body {
            Body::Large(v) => v.sealed_slice(),
            _ => None,
        }
    }

    /// Address of the first payload byte (valid while the message lives).
    pub fn as_ptr(&self) -> *const u8 {
        match &self.body {
            Body::Inline(data, _) => data.as_ptr(),
            Body::Slot(v) => v.ptr.as_ptr().cast_const(),
            Body::Large(v) => v.as_ptr(),
            Body::Broadcast(v) => v.ptr.as_ptr().cast_const(),
        }
    }

    /// Copies `dst.len()` payload bytes starting at `offset` into `dst`; false (and
    /// nothing copied) when that range is not inside the payload.
    pub fn copy_to(&self, offset: usize, dst: &mut [u8]) -> bool {
        let fits = offset
            .checked_add(dst.len())
            .is_some_and(|end| end <= self.len());
        if fits {
            match &self.body {
                Body::Inline(data, _) => dst.copy_from_slice(&data[offset..][..dst.len()]),
                Body::Large(v) => {
                    v.copy_to(offset, dst);
                }
                // SAFETY: the range is inside the payload (checked), which stays
                // mapped while `self` lives; a peer that breaks the protocol may
                // write it meanwhile, and the copy is atomic for that.
                Body::Slot(_) | Body::Broadcast(_) => unsafe {
                    crate::shared_copy::copy_from_shared(self.as_ptr().add(offset), dst)
                },
            }
        }
        fits
    }

    /// The payload, copied into a new vector.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = vec![0u8; self.len()];
        self.copy_to(0, &mut v);
        v
    }

    /// Replaces `out`'s contents with the payload.
    pub fn copy_into(&self, out: &mut Vec<u8>) {
        out.clear();
        out.resize(self.len(), 0);
        self.copy_to(0, out);
    }

    /// Reads a `T` from the start of the payload (a copy; no alignment needed);
    /// `None` when the payload is shorter than a `T`.
    pub fn read_pod<T: bytemuck::Pod>(&self) -> Option<T> {
        let mut value = T::zeroed();
        self.copy_to(0, bytemuck::bytes_of_mut(&mut value))
            .then_some(value)
    }

    /// The payload as a slice, in place.
    ///
    /// # Safety
    /// No process may write the payload while the slice lives. Every honest peer
    /// guarantees this: only the holder may write a Received slot, and the message
    /// holds it. A peer that breaks the protocol could write it meanwhile; use the
    /// copying reads when the other side is not trusted that far. The guarantee also
    /// ends if the receiving host or guest is dropped (its entry's slots may then be
    /// reclaimed). A broadcast payload is in a pool every guest can write: the host
    /// never writes a slot it has sent, but a guest that breaks the protocol can have
    /// it freed and reused early (`shm.broadcast.untrusted`), so for a broadcast the
    /// caller vouches for every guest too.
    pub unsafe fn as_slice(&self) -> &[u8] {
        // SAFETY: `len` bytes from `as_ptr` are mapped while `self` lives; the
        // caller vouches that nobody writes them meanwhile.
        unsafe { std::slice::from_raw_parts(self.as_ptr(), self.len()) }
    }
}

// SAFETY: the pointer is into a shared mapping that `segment` keeps alive wherever the
// view goes, and the claimed slot is this party's until the drop frees it; the slot's
// bytes are only read (copies, or the caller-vouched `as_slice`), so sharing a view
// between threads is sound too.
unsafe impl Send for SlotView {}
// SAFETY: as for Send: `&SlotView` only reads.
unsafe impl Sync for SlotView {}

impl Drop for SlotView {
    // shm[impl shm.slot.view]
    // shm[impl shm.slot.free]
    fn drop(&mut self) {
        if let Some(pool) = self.segment.pool(self.peer, self.dir, self.class as usize) {
            // A word changed under us means the sender broke the protocol; the slot is
            // then not ours to free, and nothing else is to be done from a drop.
            let _ = pool.release(self.index, self.generation);
        }
        if let Some(ring) = self.segment.ring(self.peer, self.dir) {
            ring.wake_producer_after_free(self.bell.as_ref().map(|b| b.as_fd()));
        }
        if let Some(live) = &self.live {
            live.fetch_sub(1, Ordering::Release);
        }
    }
}

// SAFETY: as for SlotView: the mapping lives as long as `segment`, the reference is
// this guest's until the drop releases it, and the bytes are only read.
unsafe impl Send for BroadcastView {}
// SAFETY: as for Send: `&BroadcastView` only reads.
unsafe impl Sync for BroadcastView {}

impl Drop for BroadcastView {
    // shm[impl shm.broadcast.receive]
    // shm[impl shm.broadcast.release]
    fn drop(&mut self) {
        if let Some(pool) = self.segment.broadcast() {
            // A record changed under us means someone broke the protocol; there is
            // nothing more a drop can do about it (`shm.broadcast.untrusted`).
            let _ = pool.release(self.peer, self.index, self.generation);
        }
    }
}

/// The writable bytes of a loaned slot (`shm.slot.loan`): the sender holds the slot
/// (Loaned), so nobody else may touch it until it is sent.
#[derive(Debug)]
pub struct SlotBytes {
    ptr: std::ptr::NonNull<u8>,
    capacity: usize,
}

// SAFETY: the pointer is into a shared mapping kept alive by whoever holds the loan
// (it borrows the host or guest that owns the mapping), and the slot is the loan's.
unsafe impl Send for SlotBytes {}

impl SlotBytes {
    /// The bytes of a loaned slot at `ptr` (from `PoolView::data_ptr`), `capacity`
    /// long. The caller keeps the mapping alive and the slot Loaned while this lives.
    pub fn new(ptr: std::ptr::NonNull<u8>, capacity: usize) -> Self {
        Self { ptr, capacity }
    }

    /// Bytes the slot holds: the most a send of it can publish.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The slot's first byte, for writing in place (e.g. by a reader or a codec).
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Copies `src` into the slot at `offset`; false (and nothing written) when it
    /// does not fit.
    pub fn write_at(&mut self, offset: usize, src: &[u8]) -> bool {
        let fits = offset
            .checked_add(src.len())
            .is_some_and(|end| end <= self.capacity);
        if fits {
            // SAFETY: in bounds (checked) of the loaned slot, mapped while the loan
            // lives; a peer that breaks the protocol may touch it meanwhile, and the
            // copy is atomic for that.
            unsafe { crate::shared_copy::copy_to_shared(src, self.ptr.as_ptr().add(offset)) };
        }
        fits
    }

    /// Writes `value`'s bytes at the start of the slot; returns the length written
    /// (pass it to the send), or `None` when a `T` does not fit.
    pub fn write_pod<T: bytemuck::Pod>(&mut self, value: &T) -> Option<usize> {
        let bytes = bytemuck::bytes_of(value);
        self.write_at(0, bytes).then_some(bytes.len())
    }

    /// The slot as a mutable slice, in place.
    ///
    /// # Safety
    /// No other process may read or write the slot while the slice lives. An honest
    /// receiver never touches a Loaned slot; one that breaks the protocol could.
    pub unsafe fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: `capacity` bytes from `ptr` are mapped while the loan lives; the
        // caller vouches that no other process accesses them meanwhile.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.capacity) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::SegmentConfig;
    use crate::region::{HeapRegion, ShmBacking};
    use crate::slot::SlotState;
    use crate::{Inbox, Outbox};

    fn segment() -> Segment {
        let config = SegmentConfig::default().with_slots(64, 2);
        let len = config.layout().unwrap().total_size as usize;
        let heap = HeapRegion::new_zeroed(len).unwrap();
        let seg = Segment::init(ShmBacking::Heap(Arc::new(heap)), config, [1, 2], 7).unwrap();
        seg.publish();
        seg
    }

    const PEER: u8 = 1;

    /// Sends `payload` to the host and takes it as a message, its views counted in `live`.
    fn round_trip(seg: &Segment, payload: &[u8], live: &Arc<AtomicU32>) -> Message {
        let peer = PeerId::new(PEER).unwrap();
        let ring = seg.ring(peer, Direction::ToHost).unwrap();
        let pools = seg.pools(peer, Direction::ToHost).unwrap();
        let meta = Meta::new(3, 0x0123_4567);
        Outbox::new(1)
            .send(&ring, &pools, meta, payload, None)
            .unwrap();
        let got = Inbox::new(0).take(&ring, &pools, None).unwrap().unwrap();
        let dir = Direction::ToHost;
        Message::new(seg, peer, dir, got.meta, got.payload, None, Some(live)).unwrap()
    }

    // A message reads back its header and payload, by copy or typed read; a slot message
    // is read in place and frees its slot (and its count of live views) when dropped.
    // shm[verify shm.slot.view]
    #[test]
    fn messages_read_back_and_a_slot_view_frees_its_slot_on_drop() {
        let seg = segment();
        let live = Arc::new(AtomicU32::new(0));
        let payload: Vec<u8> = (0..48).collect();
        let msg = round_trip(&seg, &payload, &live);
        assert_eq!(msg.meta(), Meta::new(3, 0x0123_4567));
        assert_eq!(
            (msg.len(), msg.is_empty(), msg.is_zero_copy()),
            (48, false, true)
        );
        assert_eq!(
            msg.sealed_slice(),
            None,
            "a slot can be written by a broken peer"
        );
        let mut out = vec![9; 3];
        msg.copy_into(&mut out);
        assert_eq!(out, payload);
        assert_eq!(
            msg.read_pod::<u64>(),
            Some(u64::from_le_bytes([0, 1, 2, 3, 4, 5, 6, 7]))
        );
        assert_eq!(msg.read_pod::<[u64; 7]>(), None, "longer than the payload");
        assert_eq!(live.load(Ordering::Relaxed), 1);
        let pool = seg
            .pool(PeerId::new(PEER).unwrap(), Direction::ToHost, 0)
            .unwrap();
        assert_eq!(pool.state(0), Some(SlotState::Received));
        drop(msg);
        assert_eq!(pool.state(0), Some(SlotState::Free));
        assert_eq!(live.load(Ordering::Relaxed), 0);

        let inline = round_trip(&seg, b"", &live);
        assert_eq!(
            (inline.len(), inline.is_empty(), inline.is_zero_copy()),
            (0, true, false)
        );
        assert_eq!(inline.sealed_slice(), None);
        let inline = round_trip(&seg, b"abc", &live);
        assert_eq!(
            (inline.is_empty(), inline.to_vec()),
            (false, b"abc".to_vec())
        );
        assert_eq!(
            live.load(Ordering::Relaxed),
            0,
            "inline messages hold no slot"
        );
    }

    // shm[verify shm.msg.large]
    #[test]
    #[cfg_attr(miri, ignore = "memfd_create: not in Miri")]
    fn a_sealed_large_payload_is_a_plain_slice() {
        let mut buf = crate::large::LargeBuffer::create(5).unwrap();
        assert!(buf.write_at(0, b"large"));
        let view = LargeView::open(buf.finish(9).unwrap(), 9, 5).unwrap();
        let msg = Message::large(Meta::new(1, 2), view);
        assert_eq!(msg.sealed_slice(), Some(&b"large"[..]));
        assert!(msg.is_zero_copy());
    }

    // A loan's bytes take writes only inside the slot.
    // shm[verify shm.slot.loan]
    #[test]
    fn slot_bytes_take_writes_only_inside_the_slot() {
        let seg = segment();
        let peer = PeerId::new(PEER).unwrap();
        let pool = seg.pool(peer, Direction::ToHost, 0).unwrap();
        let ptr = pool.data_ptr(1).unwrap();
        let mut bytes = SlotBytes::new(ptr, 64);
        assert_eq!(bytes.capacity(), 64);
        assert_eq!(bytes.as_mut_ptr(), ptr.as_ptr());
        assert!(bytes.write_at(60, &[1, 2, 3, 4]));
        assert!(!bytes.write_at(61, &[1, 2, 3, 4]), "past the end");
        assert!(!bytes.write_at(usize::MAX, &[1]), "overflowing offset");
        assert_eq!(bytes.write_pod(&0x0403_0201u32), Some(4));
        assert_eq!(bytes.write_pod(&[0u64; 9]), None);
        let mut out = Vec::new();
        assert!(pool.read_to_vec(1, 64, &mut out));
        assert_eq!(out[..4], [1, 2, 3, 4]);
        assert_eq!(out[60..], [1, 2, 3, 4]);
        assert!(out[4..60].iter().all(|&b| b == 0));
    }
}
