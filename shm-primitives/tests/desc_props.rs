//! Property tests of descriptor encoding (`shm.ring.desc-layout`): every kind
//! round-trips, and decoding arbitrary words never panics, refuses exactly the
//! undefined `kind` and `msg_kind` bytes, and keeps every byte the table gives a
//! meaning for that kind while ignoring the reserved ones.

use proptest::prelude::*;
use shm_primitives::desc::{DecodeError, Descriptor, DESC_SIZE, DESC_WORDS};
use shm_primitives::Meta;

mod common;
use common::{body, msg_kind};

/// Arbitrary words, half of them with `kind` and `msg_kind` near the valid range.
fn words() -> impl Strategy<Value = [u64; DESC_WORDS]> {
    (any::<[u64; DESC_WORDS]>(), any::<bool>(), 0u64..6, 0u64..6).prop_map(
        |(mut w, near, kind, msg_kind)| {
            if near {
                w[3] = (w[3] & !0x00FF_00FF) | kind | msg_kind << 16;
            }
            w
        },
    )
}

fn bytes_of(words: &[u64; DESC_WORDS]) -> [u8; DESC_SIZE] {
    let mut b = [0u8; DESC_SIZE];
    for (i, w) in words.iter().enumerate() {
        b[i * 8..i * 8 + 8].copy_from_slice(&w.to_le_bytes());
    }
    b
}

/// Whether byte `i` of a descriptor of `kind` carries a value (the table of
/// `shm.ring.desc-layout`): the header, `class` for slots, all of `data` inline, and
/// the 8 reference bytes otherwise. The rest is reserved.
fn meaningful(kind: u8, i: usize) -> bool {
    match i {
        0..=24 | 26 => true,
        25 => kind == 1,
        27 => false,
        28..=35 => true,
        _ => kind == 0,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    // shm[verify shm.ring.desc-layout]
    #[test]
    fn every_kind_round_trips(
        seq: u64, user_id: u64, msg_type: u32, payload_len: u32,
        kind in msg_kind(), body in body(),
    ) {
        let d = Descriptor {
            seq,
            meta: Meta::new(msg_type, user_id).with_kind(kind),
            payload_len,
            body,
        };
        let words = d.encode();
        prop_assert_eq!(Descriptor::decode(&words), Ok(d));
        // Reserved bytes are written as zero.
        let b = bytes_of(&words);
        for (i, &byte) in b.iter().enumerate() {
            if !meaningful(b[24], i) {
                prop_assert_eq!(byte, 0, "reserved byte {}", i);
            }
        }
    }

    // shm[verify shm.ring.desc-layout]
    #[test]
    fn decoding_arbitrary_words_never_panics(words in words()) {
        let b = bytes_of(&words);
        let (kind, msg_kind) = (b[24], b[26]);
        match Descriptor::decode(&words) {
            Ok(d) => {
                prop_assert!(kind <= 3 && msg_kind <= 3);
                // Re-encoding keeps every meaningful byte and zeroes the others.
                let again = bytes_of(&d.encode());
                for i in 0..DESC_SIZE {
                    let want = if meaningful(kind, i) { b[i] } else { 0 };
                    prop_assert_eq!(again[i], want, "byte {} of kind {}", i, kind);
                }
            }
            Err(DecodeError::Kind(k)) => prop_assert!(k == kind && k > 3),
            Err(DecodeError::MsgKind(m)) => {
                prop_assert!(m == msg_kind && m > 3 && kind <= 3)
            }
        }
    }

    // Reserved bytes are ignored: setting them changes nothing decoded.
    // shm[verify shm.ring.desc-layout]
    #[test]
    fn reserved_bytes_are_ignored(
        seq: u64, user_id: u64, msg_type: u32, payload_len: u32,
        kind in msg_kind(), body in body(), noise: [u8; DESC_SIZE],
    ) {
        let d = Descriptor {
            seq,
            meta: Meta::new(msg_type, user_id).with_kind(kind),
            payload_len,
            body,
        };
        let mut b = bytes_of(&d.encode());
        let kind = b[24];
        for i in 0..DESC_SIZE {
            if !meaningful(kind, i) {
                b[i] = noise[i];
            }
        }
        let words: [u64; DESC_WORDS] =
            std::array::from_fn(|i| u64::from_le_bytes(b[i * 8..i * 8 + 8].try_into().unwrap()));
        prop_assert_eq!(Descriptor::decode(&words), Ok(d));
    }
}
