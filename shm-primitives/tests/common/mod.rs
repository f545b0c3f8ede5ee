//! What the property tests share: proptest's configuration and the descriptor
//! strategies.

#![allow(dead_code)] // each test file uses its own part of this module

use proptest::prelude::*;
use proptest::test_runner::Config;
use shm_primitives::desc::Body;
use shm_primitives::{MsgKind, INLINE_CAPACITY};

/// Proptest's default case count (`PROPTEST_CASES` overrides it), a handful under Miri.
pub fn config() -> Config {
    let default = Config::default();
    Config {
        cases: if cfg!(miri) { 8 } else { default.cases },
        ..default
    }
}

/// Any of the four message kinds.
pub fn msg_kind() -> impl Strategy<Value = MsgKind> {
    prop_oneof![
        Just(MsgKind::Plain),
        Just(MsgKind::Request),
        Just(MsgKind::Response),
        Just(MsgKind::Cancel),
    ]
}

/// Any descriptor body, with arbitrary references.
pub fn body() -> impl Strategy<Value = Body> {
    prop_oneof![
        any::<[u8; INLINE_CAPACITY]>().prop_map(Body::Inline),
        (any::<u8>(), any::<u32>(), any::<u32>()).prop_map(|(class, index, generation)| {
            Body::Slot {
                class,
                index,
                generation,
            }
        }),
        (any::<u32>(), any::<u32>())
            .prop_map(|(index, generation)| Body::Broadcast { index, generation }),
        any::<u64>().prop_map(|seq| Body::Large { seq }),
    ]
}
