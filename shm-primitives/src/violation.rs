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
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Violation;

    fn every_variant() -> [Violation; 13] {
        [
            Violation::PeerWord { raw: 9 },
            Violation::RingIndex {
                head: 0,
                tail: 9,
                capacity: 8,
            },
            Violation::DescSequence {
                expected: 1,
                found: 2,
            },
            Violation::DescKind { kind: 9 },
            Violation::InlineLen { len: 40, max: 36 },
            Violation::SlotIndex { index: 5, count: 4 },
            Violation::SlotLen {
                len: 9,
                slot_size: 8,
            },
            Violation::SlotState {
                index: 0,
                generation: 1,
                found: 0,
            },
            Violation::FreeList { found: 99 },
            Violation::SlotClass {
                class: 7,
                classes: 1,
            },
            Violation::DescFlags { flags: 9 },
            Violation::Large {
                seq: 1,
                reason: "test",
            },
            Violation::Broadcast {
                index: 0,
                generation: 1,
                found: 0,
            },
        ]
    }

    // The fault code is what a fenced guest reads to learn why (`shm.peer.entry-layout`):
    // non-zero (0 means "not fenced"), one per variant, and the rule names a spec rule.
    // shm[verify shm.untrusted.validate]
    #[test]
    fn every_violation_has_its_own_nonzero_code_and_a_spec_rule() {
        let codes: Vec<u32> = every_variant().iter().map(Violation::code).collect();
        assert_eq!(codes, (1..=13).collect::<Vec<u32>>());
        let spec: String = [
            "03-peers",
            "04-rings",
            "05-slots",
            "06-messages",
            "10-broadcast",
        ]
        .iter()
        .map(|name| {
            let path = format!("{}/../spec/{name}.md", env!("CARGO_MANIFEST_DIR"));
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
        })
        .collect();
        for v in every_variant() {
            let rule = v.rule();
            assert!(
                spec.contains(&format!("shm[{rule}]")),
                "{v:?}: {rule} is not a rule of the spec"
            );
        }
        assert_eq!(
            Violation::DescSequence {
                expected: 0,
                found: 1
            }
            .rule(),
            "shm.ring.validate"
        );
    }
}
