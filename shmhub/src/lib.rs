#![doc = include_str!("../../README.md")]
#![warn(missing_docs)]

#[cfg(feature = "tokio")]
pub use shm_guest::AsyncGuest;
pub use shm_guest::{self as guest, AttachOptions, ShmGuest};
#[cfg(feature = "tokio")]
pub use shm_host::AsyncHost;
pub use shm_host::{
    self as host, segment_path, Death, DeathCause, Delivery, GuestOptions, PeerHandle,
    SegmentConfig, ShmHost, SpawnTicket, SpawnedGuest,
};
pub use shm_primitives::{
    self as primitives, Meta, MsgKind, PeerId, PeerState, SlotClass, SlotClasses,
};
