//! What a peer can do wrong in shared memory, and the spec rule each breaks.

/// A value read from peer-writable memory that breaks the protocol. The reader treats
/// it as a typed error for that peer: it never indexes, allocates or panics on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Violation {
    /// The peer entry's state word holds no valid state.
    #[error("peer state word {raw:#x} is not a state")]
    PeerWord {
        /// The raw word.
        raw: u64,
    },
    /// A ring index is impossible: the other side's counter is more than `capacity`
    /// away from ours, or behind it.
    #[error("ring index out of range: head {head}, tail {tail}, capacity {capacity}")]
    RingIndex {
        /// Consumer counter seen.
        head: u64,
        /// Producer counter seen.
        tail: u64,
        /// Ring capacity.
        capacity: u32,
    },
    /// A descriptor's sequence word is not the position it sits at.
    #[error("descriptor sequence {found}, expected {expected}")]
    DescSequence {
        /// The position being read.
        expected: u64,
        /// The sequence the descriptor carries.
        found: u64,
    },
    /// A descriptor kind that is neither inline nor slot.
    #[error("descriptor kind {kind} is unknown")]
    DescKind {
        /// The kind byte.
        kind: u8,
    },
    /// An inline payload longer than the inline area.
    #[error("inline payload length {len} exceeds {max}")]
    InlineLen {
        /// Claimed length.
        len: u32,
        /// The inline capacity.
        max: u32,
    },
    /// A slot reference past the pool.
    #[error("slot index {index} outside the {count}-slot pool")]
    SlotIndex {
        /// Claimed index.
        index: u32,
        /// Slots in the pool.
        count: u32,
    },
    /// A slot payload longer than a slot.
    #[error("slot payload length {len} exceeds the slot size {slot_size}")]
    SlotLen {
        /// Claimed length.
        len: u32,
        /// Bytes per slot.
        slot_size: u32,
    },
    /// The slot a descriptor names is not in state Sent with that generation.
    #[error("slot {index} generation {generation} is not in flight (word {found:#x})")]
    SlotState {
        /// Slot index.
        index: u32,
        /// The generation the descriptor carries.
        generation: u32,
        /// The slot's state word as found.
        found: u64,
    },
    /// A free list names a slot outside its pool (or kept changing for every
    /// attempt: `found` is then `u32::MAX`).
    #[error("free list value {found} is impossible")]
    FreeList {
        /// The value found.
        found: u32,
    },
    /// A slot descriptor names a class the segment does not have.
    #[error("slot class {class} outside the {classes} classes")]
    SlotClass {
        /// Claimed class.
        class: u8,
        /// Classes in the segment.
        classes: u8,
    },
    /// A descriptor's flags byte has bits this version does not define, or a
    /// combination it forbids.
    #[error("descriptor flags {flags:#04x} are invalid")]
    DescFlags {
        /// The flags byte.
        flags: u8,
    },
    /// A large payload's memory file is missing or does not match its descriptor.
    #[error("large payload {seq} is invalid: {reason}")]
    Large {
        /// The large-payload sequence number the descriptor carries.
        seq: u64,
        /// What was wrong.
        reason: &'static str,
    },
    /// The peer entry's state word made a move its guest may not make: after the host
    /// saw the guest Attached (or Goodbye) at `generation`, the word holds another
    /// valid state or generation (`shm.peer.observed`).
    #[error("peer state word {found:#x} after the guest was seen at generation {generation}")]
    PeerTransition {
        /// The generation the host saw the guest at.
        generation: u32,
        /// The word found.
        found: u64,
    },
    /// A broadcast descriptor names a slot that is not a live broadcast for us.
    #[error("broadcast slot {index} generation {generation} is invalid (word {found:#x})")]
    Broadcast {
        /// Slot index.
        index: u32,
        /// Generation the descriptor carries.
        generation: u32,
        /// The slot's state word as found.
        found: u64,
    },
}

impl Violation {
    /// The spec rule this violation breaks.
    pub fn rule(&self) -> &'static str {
        match self {
            Violation::PeerWord { .. } => "shm.peer.states",
            Violation::RingIndex { .. } | Violation::DescSequence { .. } => "shm.ring.validate",
            Violation::DescKind { .. } => "shm.ring.desc-layout",
            Violation::InlineLen { .. } => "shm.msg.inline",
            Violation::SlotIndex { .. } | Violation::SlotLen { .. } => "shm.msg.slot",
            Violation::SlotState { .. } => "shm.slot.claim",
            Violation::FreeList { .. } => "shm.slot.free-list",
            Violation::SlotClass { .. } => "shm.slot.classes",
            Violation::DescFlags { .. } => "shm.ring.desc-layout",
            Violation::Large { .. } => "shm.msg.large",
            Violation::Broadcast { .. } => "shm.broadcast.refcount",
            Violation::PeerTransition { .. } => "shm.peer.observed",
        }
    }

    /// A non-zero code the host writes into the fenced peer's `fault` field.
    pub fn code(&self) -> u32 {
        match self {
            Violation::PeerWord { .. } => 1,
            Violation::RingIndex { .. } => 2,
            Violation::DescSequence { .. } => 3,
            Violation::DescKind { .. } => 4,
            Violation::InlineLen { .. } => 5,
            Violation::SlotIndex { .. } => 6,
            Violation::SlotLen { .. } => 7,
            Violation::SlotState { .. } => 8,
            Violation::FreeList { .. } => 9,
            Violation::SlotClass { .. } => 10,
            Violation::DescFlags { .. } => 11,
            Violation::Large { .. } => 12,
            Violation::Broadcast { .. } => 13,
            Violation::PeerTransition { .. } => 14,
        }
    }
}
