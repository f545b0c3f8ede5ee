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

/// Each violation's name and the spec rule it breaks, at index `code − 1`: what a
/// reader of a peer's `fault` field needs without a [`Violation`] in hand.
const BY_CODE: [(&str, &str); 14] = [
    ("PeerWord", "shm.peer.states"),
    ("RingIndex", "shm.ring.validate"),
    ("DescSequence", "shm.ring.validate"),
    ("DescKind", "shm.ring.desc-layout"),
    ("InlineLen", "shm.msg.inline"),
    ("SlotIndex", "shm.msg.slot"),
    ("SlotLen", "shm.msg.slot"),
    ("SlotState", "shm.slot.claim"),
    ("FreeList", "shm.slot.free-list"),
    ("SlotClass", "shm.slot.classes"),
    ("DescFlags", "shm.ring.desc-layout"),
    ("Large", "shm.msg.large"),
    ("Broadcast", "shm.broadcast.refcount"),
    ("PeerTransition", "shm.peer.observed"),
];

impl Violation {
    /// The spec rule this violation breaks.
    pub fn rule(&self) -> &'static str {
        BY_CODE[self.code() as usize - 1].1
    }

    /// The name and rule of the violation whose [`code`](Self::code) is `code`;
    /// `None` for 0 and for any code no violation has (a `fault` field is
    /// guest-writable: it may hold anything).
    pub fn describe_code(code: u32) -> Option<(&'static str, &'static str)> {
        let i = usize::try_from(code).ok()?.checked_sub(1)?;
        BY_CODE.get(i).copied()
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

#[cfg(test)]
mod tests {
    use super::Violation;

    /// One of each variant; the match below stops the build when one is added and not
    /// listed here.
    fn every() -> Vec<Violation> {
        let all = vec![
            Violation::PeerWord { raw: 7 },
            Violation::RingIndex {
                head: 0,
                tail: 99,
                capacity: 8,
            },
            Violation::DescSequence {
                expected: 0,
                found: 1,
            },
            Violation::DescKind { kind: 9 },
            Violation::InlineLen { len: 40, max: 36 },
            Violation::SlotIndex { index: 9, count: 4 },
            Violation::SlotLen {
                len: 300,
                slot_size: 256,
            },
            Violation::SlotState {
                index: 0,
                generation: 1,
                found: 0,
            },
            Violation::FreeList { found: 77 },
            Violation::SlotClass {
                class: 9,
                classes: 1,
            },
            Violation::DescFlags { flags: 0x80 },
            Violation::Large {
                seq: 1,
                reason: "missing",
            },
            Violation::Broadcast {
                index: 0,
                generation: 0,
                found: u64::MAX,
            },
            Violation::PeerTransition {
                generation: 3,
                found: 3 << 32,
            },
        ];
        for v in &all {
            match v {
                Violation::PeerWord { .. }
                | Violation::RingIndex { .. }
                | Violation::DescSequence { .. }
                | Violation::DescKind { .. }
                | Violation::InlineLen { .. }
                | Violation::SlotIndex { .. }
                | Violation::SlotLen { .. }
                | Violation::SlotState { .. }
                | Violation::FreeList { .. }
                | Violation::SlotClass { .. }
                | Violation::DescFlags { .. }
                | Violation::Large { .. }
                | Violation::Broadcast { .. }
                | Violation::PeerTransition { .. } => {}
            }
        }
        all
    }

    /// Every violation's code and rule are the ones of its row in the spec's table
    /// (spec/06-messages.md, `shm.untrusted.validate`), and the table has no other row.
    // shm[verify shm.untrusted.validate]
    #[test]
    fn codes_and_rules_match_the_spec_table() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../spec/06-messages.md");
        let spec = std::fs::read_to_string(path).unwrap();
        let rows: Vec<&str> = spec
            .lines()
            .filter(|l| l.starts_with("> | ") && l.contains(" | `shm."))
            .filter(|l| l[4..].split(' ').next().unwrap().parse::<u32>().is_ok())
            .collect();
        let all = every();
        let all_len = all.len() as u32;
        assert_eq!(rows.len(), all.len(), "one table row per violation");
        for v in all {
            let debug = format!("{v:?}");
            let name = debug.split([' ', '{']).next().unwrap();
            let row = rows
                .iter()
                .find(|r| r.contains(&format!("| `{name}` |")))
                .unwrap_or_else(|| panic!("no row for {name}"));
            assert_eq!(Violation::describe_code(v.code()), Some((name, v.rule())));
            let cells: Vec<&str> = row.split('|').map(str::trim).collect();
            assert_eq!(cells[1], v.code().to_string(), "{name}: code");
            assert_eq!(
                cells[cells.len() - 2],
                format!("`{}`", v.rule()),
                "{name}: rule"
            );
        }
        assert_eq!(Violation::describe_code(0), None);
        assert_eq!(Violation::describe_code(all_len + 1), None);
        assert_eq!(Violation::describe_code(u32::MAX), None);
    }
}
