//! Message descriptors: the 64-byte entries of a ring.

/// Size of a descriptor (one cache line).
pub const DESC_SIZE: usize = 64;
/// Words in a descriptor.
pub const DESC_WORDS: usize = DESC_SIZE / 8;
/// Bytes of payload a descriptor can carry inline (bytes 28..64).
pub const INLINE_CAPACITY: usize = 36;
/// `kind` of a descriptor whose payload is inline.
pub const KIND_INLINE: u8 = 0;
/// `kind` of a descriptor whose payload is in a slot of the sender's pool.
pub const KIND_SLOT: u8 = 1;
/// `kind` of a descriptor whose payload is in a slot of the broadcast pool.
pub const KIND_BROADCAST: u8 = 2;
/// `kind` of a descriptor whose payload is in a memory file passed on the doorbell.
pub const KIND_LARGE: u8 = 3;

/// What a message is to the request/response layer (`shm.rpc.correlate`): the
/// descriptor's `msg_kind` byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(u8)]
pub enum MsgKind {
    /// A plain message.
    #[default]
    Plain = 0,
    /// A request: `user_id` is its correlation id.
    Request = 1,
    /// The response to the request whose correlation id is `user_id`.
    Response = 2,
    /// The caller gave up on the request whose correlation id is `user_id`.
    Cancel = 3,
}

impl MsgKind {
    fn from_byte(b: u8) -> Option<Self> {
        Some(match b {
            0 => Self::Plain,
            1 => Self::Request,
            2 => Self::Response,
            3 => Self::Cancel,
            _ => return None,
        })
    }
}

/// The user-visible header of a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Meta {
    /// A message type chosen by the application.
    pub msg_type: u32,
    /// An id chosen by the application (a request id, a stream id, ...); the
    /// correlation id for requests, responses and cancels.
    pub user_id: u64,
    /// Plain, or a part of a call.
    pub kind: MsgKind,
}

impl Meta {
    /// A plain message's meta.
    pub fn new(msg_type: u32, user_id: u64) -> Self {
        Self {
            msg_type,
            user_id,
            kind: MsgKind::Plain,
        }
    }

    /// This meta with `kind`.
    pub fn with_kind(self, kind: MsgKind) -> Self {
        Self { kind, ..self }
    }
}

/// Where a descriptor's payload is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Body {
    /// In the descriptor itself (`payload_len` bytes of this array are meaningful).
    Inline([u8; INLINE_CAPACITY]),
    /// In slot `index` of the sender's pool of class `class`, stamped with
    /// `generation`.
    Slot {
        /// Slot class.
        class: u8,
        /// Slot index in the pool.
        index: u32,
        /// The slot's generation when it was sent.
        generation: u32,
    },
    /// In slot `index` of the broadcast pool, stamped with `generation`.
    Broadcast {
        /// Slot index in the broadcast pool.
        index: u32,
        /// The slot's generation when it was sent.
        generation: u32,
    },
    /// In a sealed memory file passed on the doorbell, the `seq`-th the sender passed
    /// on it (`shm.msg.large`).
    Large {
        /// The large-payload sequence number.
        seq: u64,
    },
}

/// A decoded descriptor (`shm.ring.desc-layout`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Descriptor {
    /// The ring position the descriptor was written at (stored as the stamp
    /// `seq + 1`).
    pub seq: u64,
    /// Application header.
    pub meta: Meta,
    /// Payload length in bytes.
    pub payload_len: u32,
    /// Where the payload is.
    pub body: Body,
}

/// A descriptor's bytes could not be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeError {
    /// An unknown `kind` byte.
    Kind(u8),
    /// An unknown `msg_kind` byte.
    MsgKind(u8),
}

impl Descriptor {
    /// Encodes into the 8 little-endian words stored in the ring.
    // shm[impl shm.ring.desc-layout]
    pub fn encode(&self) -> [u64; DESC_WORDS] {
        let mut b = [0u8; DESC_SIZE];
        // The stamp: position + 1, so the all-zero entry of a fresh or reset ring
        // never matches a position (`shm.ring.desc-layout`).
        b[0..8].copy_from_slice(&self.seq.wrapping_add(1).to_le_bytes());
        b[8..16].copy_from_slice(&self.meta.user_id.to_le_bytes());
        b[16..20].copy_from_slice(&self.meta.msg_type.to_le_bytes());
        b[20..24].copy_from_slice(&self.payload_len.to_le_bytes());
        b[26] = self.meta.kind as u8;
        match self.body {
            Body::Inline(data) => {
                b[24] = KIND_INLINE;
                b[28..64].copy_from_slice(&data);
            }
            Body::Slot {
                class,
                index,
                generation,
            } => {
                b[24] = KIND_SLOT;
                b[25] = class;
                b[28..32].copy_from_slice(&index.to_le_bytes());
                b[32..36].copy_from_slice(&generation.to_le_bytes());
            }
            Body::Broadcast { index, generation } => {
                b[24] = KIND_BROADCAST;
                b[28..32].copy_from_slice(&index.to_le_bytes());
                b[32..36].copy_from_slice(&generation.to_le_bytes());
            }
            Body::Large { seq } => {
                b[24] = KIND_LARGE;
                b[28..36].copy_from_slice(&seq.to_le_bytes());
            }
        }
        std::array::from_fn(|i| u64::from_le_bytes(b[i * 8..i * 8 + 8].try_into().unwrap()))
    }

    /// Decodes the 8 words read from a ring. Only the `kind` and `msg_kind` bytes can
    /// be invalid here; lengths and slot references are checked by the receiver
    /// against its limits.
    // shm[impl shm.ring.desc-layout]
    pub fn decode(words: &[u64; DESC_WORDS]) -> Result<Self, DecodeError> {
        let mut b = [0u8; DESC_SIZE];
        for (i, w) in words.iter().enumerate() {
            b[i * 8..i * 8 + 8].copy_from_slice(&w.to_le_bytes());
        }
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
        let body = match b[24] {
            KIND_INLINE => Body::Inline(b[28..64].try_into().unwrap()),
            KIND_SLOT => Body::Slot {
                class: b[25],
                index: u32_at(28),
                generation: u32_at(32),
            },
            KIND_BROADCAST => Body::Broadcast {
                index: u32_at(28),
                generation: u32_at(32),
            },
            KIND_LARGE => Body::Large {
                seq: u64::from_le_bytes(b[28..36].try_into().unwrap()),
            },
            other => return Err(DecodeError::Kind(other)),
        };
        let kind = MsgKind::from_byte(b[26]).ok_or(DecodeError::MsgKind(b[26]))?;
        Ok(Self {
            seq: u64::from_le_bytes(b[0..8].try_into().unwrap()).wrapping_sub(1),
            meta: Meta {
                user_id: u64::from_le_bytes(b[8..16].try_into().unwrap()),
                msg_type: u32_at(16),
                kind,
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
            meta: Meta::new(0xAABB_CCDD, 0x1122_3344_5566_7788).with_kind(MsgKind::Response),
            payload_len: 0x0000_0100,
            body: Body::Slot {
                class: 5,
                index: 7,
                generation: 0xDEAD_BEEF,
            },
        };
        let words = d.encode();
        let mut b = [0u8; 64];
        for (i, w) in words.iter().enumerate() {
            b[i * 8..i * 8 + 8].copy_from_slice(&w.to_le_bytes());
        }
        assert_eq!(&b[0..8], &0x0102_0304_0506_0709u64.to_le_bytes()); // stamp = seq + 1
        assert_eq!(&b[8..16], &0x1122_3344_5566_7788u64.to_le_bytes()); // user_id
        assert_eq!(&b[16..20], &0xAABB_CCDDu32.to_le_bytes()); // msg_type
        assert_eq!(&b[20..24], &0x100u32.to_le_bytes()); // payload_len
        assert_eq!(b[24], KIND_SLOT); // kind
        assert_eq!(b[25], 5); // class
        assert_eq!(b[26], 2); // msg_kind
        assert_eq!(b[27], 0); // reserved
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

        let large = Descriptor {
            body: Body::Large {
                seq: 0x0A0B_0C0D_0E0F_1011,
            },
            ..d
        };
        let words = large.encode();
        assert_eq!(words[3] & 0xFF, u64::from(KIND_LARGE));
        assert_eq!(words[3] >> 32, 0x0E0F_1011);
        assert_eq!(words[4] & 0xFFFF_FFFF, 0x0A0B_0C0D);
        assert_eq!(Descriptor::decode(&words).unwrap(), large);
        let bcast = Descriptor {
            body: Body::Broadcast {
                index: 3,
                generation: 9,
            },
            ..d
        };
        let words = bcast.encode();
        assert_eq!(words[3] & 0xFFFF, u64::from(KIND_BROADCAST));
        assert_eq!(words[3] >> 32, 3);
        assert_eq!(words[4] & 0xFFFF_FFFF, 9);
        assert_eq!(Descriptor::decode(&words).unwrap(), bcast);
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
        assert_eq!(Descriptor::decode(&words), Err(DecodeError::Kind(9)));
        words[3] &= !0xFF;
        words[3] |= 4 << 16; // msg_kind is byte 26: bits 16..24 of word 3
        assert_eq!(Descriptor::decode(&words), Err(DecodeError::MsgKind(4)));
    }

    proptest::proptest! {
        #![proptest_config(crate::proptest_config())]

        // shm[verify shm.ring.desc-layout]
        #[test]
        fn every_descriptor_round_trips(
            seq: u64, user_id: u64, msg_type: u32, len: u32, kind in 0u8..4,
            body_kind in 0u8..4, class: u8, index: u32, generation: u32,
            data: [u8; INLINE_CAPACITY],
        ) {
            let kind = MsgKind::from_byte(kind).unwrap();
            let body = match body_kind {
                0 => Body::Inline(data),
                1 => Body::Slot { class, index, generation },
                2 => Body::Broadcast { index, generation },
                _ => Body::Large { seq: u64::from(index) << 32 | u64::from(generation) },
            };
            let d = Descriptor {
                seq,
                meta: Meta::new(msg_type, user_id).with_kind(kind),
                payload_len: len,
                body,
            };
            proptest::prop_assert_eq!(Descriptor::decode(&d.encode()), Ok(d));
        }
    }
}
