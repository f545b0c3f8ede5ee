#![doc = include_str!("../../README.md")]
#![warn(missing_docs)]

pub mod demo;

pub use shm_guest::{self as guest, AttachOptions, CallError, Response, RpcClient, ShmGuest};
#[cfg(feature = "tokio")]
pub use shm_guest::{AsyncGuest, AsyncRpcClient};
#[cfg(feature = "tokio")]
pub use shm_host::AsyncHost;
pub use shm_host::{
    self as host, segment_path, BroadcastReport, Death, DeathCause, Delivery, GuestOptions,
    PeerHandle, Received, SegmentConfig, ShmHost, SpawnTicket, SpawnedGuest,
};
pub use shm_primitives::{
    self as primitives, Message, Meta, MsgKind, PeerId, PeerState, SlotClass, SlotClasses,
};
