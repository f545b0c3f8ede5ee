//! Regions and the shared `repr(C)` structures of a shmhub segment.
//!
//! Layouts here are normative copies of the tables in `spec/`; the `const` assertions
//! next to each structure and the layout tests keep the two in step.

#![warn(missing_docs)]

pub mod broadcast;
pub mod channel;
pub mod crash;
pub mod desc;
pub mod doorbell;
pub mod freelist;
pub mod futex;
pub mod header;
pub mod large;
pub mod large_link;
pub mod layout;
pub mod lock;
pub mod memfd;
pub mod peer;
pub mod region;
pub mod ring;
pub mod segment;
pub mod shared_copy;
pub mod slot;
pub mod ticket;
pub mod view;
pub mod violation;
pub mod wait;

// Not under Miri: loom runs each thread on a stack of its own (its `generator`
// dependency calls getrlimit and switches stacks in assembly), which Miri cannot run.
#[cfg(all(test, not(miri)))]
mod models;

/// Proptest's configuration for this crate's unit tests: its default case count
/// (`PROPTEST_CASES` overrides it), but a handful under Miri, where one case of these
/// tests takes from half a second to seconds.
#[cfg(test)]
fn proptest_config() -> proptest::test_runner::Config {
    let default = proptest::test_runner::Config::default();
    proptest::test_runner::Config {
        cases: if cfg!(miri) { 8 } else { default.cases },
        ..default
    }
}

pub use broadcast::{BroadcastPool, BroadcastRef, PeerSet};
pub use channel::{ChannelSendError, Inbox, Incoming, Outbox, Payload, SlotLoan};
pub use desc::{Meta, MsgKind, INLINE_CAPACITY};
pub use header::HeaderError;
pub use layout::{Direction, LayoutError, SegmentConfig, SegmentLayout, SlotClass, SlotClasses};
pub use peer::{PeerId, PeerState, PeerWord};
pub use region::{HeapRegion, MmapRegion, Region, ShmBacking};
pub use segment::{InitError, Pools, Segment};
pub use view::Message;
pub use violation::Violation;
pub use wait::{Bell, WaitPolicy};

/// 16 random bytes from the kernel, for segment ids and temporary names.
pub fn random_u64x2() -> [u64; 2] {
    let mut buf = [0u8; 16];
    #[cfg(target_os = "linux")]
    {
        let mut filled = 0;
        while filled < buf.len() {
            // SAFETY: writes at most buf.len() - filled bytes into buf[filled..].
            let n = unsafe {
                libc::getrandom(buf[filled..].as_mut_ptr().cast(), buf.len() - filled, 0)
            };
            if n <= 0 {
                break;
            }
            filled += n as usize;
        }
        if filled == buf.len() {
            return [
                u64::from_le_bytes(buf[..8].try_into().unwrap()),
                u64::from_le_bytes(buf[8..].try_into().unwrap()),
            ];
        }
    }
    // Fallback: time and pid mixed through std's randomly keyed hasher.
    use std::hash::{BuildHasher, Hasher};
    let mut out = [0u64; 2];
    for (i, o) in out.iter_mut().enumerate() {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0),
        );
        h.write_u32(std::process::id());
        h.write_usize(i);
        *o = h.finish();
    }
    buf.fill(0);
    out
}
