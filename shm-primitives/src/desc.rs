//! Message descriptors: the 64-byte entries of a ring.

/// Size of a descriptor (one cache line).
pub const DESC_SIZE: usize = 64;
/// Words in a descriptor.
pub const DESC_WORDS: usize = DESC_SIZE / 8;
/// Bytes of payload a descriptor can carry inline (bytes 28..64).
pub const INLINE_CAPACITY: usize = 36;
/// `kind` of a descriptor whose payload is inline.
pub const KIND_INLINE: u8 = 0;
/// `kind` of a descriptor whose payload is in a slot.
pub const KIND_SLOT: u8 = 1;

/// The user-visible header of a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Meta {
    /// A message type chosen by the application.
    pub msg_type: u32,
    /// An id chosen by the application (a request id, a stream id, ...).
    pub user_id: u64,
}

impl Meta {
    /// A meta with these fields.
    pub fn new(msg_type: u32, user_id: u64) -> Self {
        Self { msg_type, user_id }
    }
}

/// Where a descriptor's payload is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Body {
    /// In the descriptor itself (`payload_len` bytes of this array are meaningful).
    Inline([u8; INLINE_CAPACITY]),
    /// In slot `index` of the sender's pool, stamped with `generation`.
    Slot {
        /// Slot index in the pool.
        index: u32,
        /// The slot's generation when it was sent.
        generation: u32,
    },
}

/// A decoded descriptor (`shm.ring.desc-layout`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Descriptor {
    /// The ring position the descriptor was written at.
    pub seq: u64,
    /// Application header.
    pub meta: Meta,
    /// Payload length in bytes.
    pub payload_len: u32,
    /// Where the payload is.
    pub body: Body,
}

/// A descriptor's bytes could not be decoded (an unknown `kind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnknownKind(pub u8);

impl Descriptor {
    /// Encodes into the 8 little-endian words stored in the ring.
    // shm[impl shm.ring.desc-layout]
    pub fn encode(&self) -> [u64; DESC_WORDS] {
        let mut b = [0u8; DESC_SIZE];
        b[0..8].copy_from_slice(&self.seq.to_le_bytes());
        b[8..16].copy_from_slice(&self.meta.user_id.to_le_bytes());
        b[16..20].copy_from_slice(&self.meta.msg_type.to_le_bytes());
        b[20..24].copy_from_slice(&self.payload_len.to_le_bytes());
        match self.body {
            Body::Inline(data) => {
                b[24] = KIND_INLINE;
                b[28..64].copy_from_slice(&data);
            }
            Body::Slot { index, generation } => {
                b[24] = KIND_SLOT;
                b[28..32].copy_from_slice(&index.to_le_bytes());
                b[32..36].copy_from_slice(&generation.to_le_bytes());
            }
        }
        std::array::from_fn(|i| u64::from_le_bytes(b[i * 8..i * 8 + 8].try_into().unwrap()))
    }

    /// Decodes the 8 words read from a ring. Only the `kind` byte can be invalid here;
    /// lengths and slot references are checked by the receiver against its limits.
    // shm[impl shm.ring.desc-layout]
    pub fn decode(words: &[u64; DESC_WORDS]) -> Result<Self, UnknownKind> {
        let mut b = [0u8; DESC_SIZE];
        for (i, w) in words.iter().enumerate() {
            b[i * 8..i * 8 + 8].copy_from_slice(&w.to_le_bytes());
        }
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
        let body = match b[24] {
            KIND_INLINE => Body::Inline(b[28..64].try_into().unwrap()),
            KIND_SLOT => Body::Slot {
                index: u32_at(28),
                generation: u32_at(32),
            },
            other => return Err(UnknownKind(other)),
        };
        Ok(Self {
            seq: u64::from_le_bytes(b[0..8].try_into().unwrap()),
            meta: Meta {
                user_id: u64::from_le_bytes(b[8..16].try_into().unwrap()),
                msg_type: u32_at(16),
            },
            payload_len: u32_at(20),
            body,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // shm[verify shm.ring.desc-layout]
    #[test]
    fn encode_matches_the_spec_table_byte_for_byte() {
        let d = Descriptor {
            seq: 0x0102_0304_0506_0708,
            meta: Meta::new(0xAABB_CCDD, 0x1122_3344_5566_7788),
            payload_len: 0x0000_0100,
            body: Body::Slot {
                index: 7,
                generation: 0xDEAD_BEEF,
            },
        };
        let words = d.encode();
        let mut b = [0u8; 64];
        for (i, w) in words.iter().enumerate() {
            b[i * 8..i * 8 + 8].copy_from_slice(&w.to_le_bytes());
        }
        assert_eq!(&b[0..8], &0x0102_0304_0506_0708u64.to_le_bytes()); // seq
        assert_eq!(&b[8..16], &0x1122_3344_5566_7788u64.to_le_bytes()); // user_id
        assert_eq!(&b[16..20], &0xAABB_CCDDu32.to_le_bytes()); // msg_type
        assert_eq!(&b[20..24], &0x100u32.to_le_bytes()); // payload_len
        assert_eq!(b[24], KIND_SLOT); // kind
        assert_eq!(&b[25..28], &[0, 0, 0]); // reserved
        assert_eq!(&b[28..32], &7u32.to_le_bytes()); // slot_index
        assert_eq!(&b[32..36], &0xDEAD_BEEFu32.to_le_bytes()); // slot_generation
        assert!(b[36..64].iter().all(|&x| x == 0)); // reserved
        assert_eq!(Descriptor::decode(&words).unwrap(), d);

        let mut data = [0u8; INLINE_CAPACITY];
        data.iter_mut()
            .enumerate()
            .for_each(|(i, x)| *x = i as u8 + 1);
        let inline = Descriptor {
            body: Body::Inline(data),
            payload_len: 36,
            ..d
        };
        let words = inline.encode();
        assert_eq!(words[3] >> 32, u64::from(u32::from_le_bytes([1, 2, 3, 4])));
        assert_eq!(Descriptor::decode(&words).unwrap(), inline);
    }

    #[test]
    fn unknown_kind_is_refused() {
        let mut words = Descriptor {
            seq: 0,
            meta: Meta::default(),
            payload_len: 0,
            body: Body::Inline([0; INLINE_CAPACITY]),
        }
        .encode();
        words[3] |= 9; // the kind byte is the low byte of word 3
        assert_eq!(Descriptor::decode(&words), Err(UnknownKind(9)));
    }
}
