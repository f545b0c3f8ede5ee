//! The host's receive path against hostile guests (`shm.untrusted.validate`,
//! `shm.untrusted.fence`, `shm.ring.consume`, `shm.slot.claim`,
//! `shm.delivery.to-host`).
//!
//! A heap-backed host and in-process guests run a script of operations: honest guest
//! sends, host receives (copying, or as views held for a while), host sends and
//! broadcasts, guests receiving, detaching and attaching, and pokes: arbitrary
//! changes to words a guest can write (its peer entry, rings, pools and the
//! broadcast records). The host must return messages or typed violations, never
//! panic. Until the first poke everything is honest, so every message must then
//! arrive exactly once, in order and intact, and no call may report a violation.

#![no_main]

use std::collections::{HashMap, VecDeque};

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use shm_guest::{AttachOptions, ShmGuest};
use shm_host::{BroadcastError, Delivery, Message, Meta, PeerId, ShmHost};
use shm_primitives::{Direction, Segment};
use shmhub_fuzz::{poke, PokeMode, Section};

/// Guests the script can drive at once.
const GUESTS: usize = 2;

#[derive(Debug, Arbitrary)]
struct Input {
    config: u8,
    at_least_once: bool,
    ops: Vec<Op>,
}

#[derive(Debug, Arbitrary)]
enum Op {
    /// Guest `guest` sends a payload of about `len` bytes (inline, slot of any class,
    /// or large when past the largest class).
    GuestSend {
        guest: u8,
        len: u16,
    },
    /// The host receives one message, copying it.
    Recv,
    /// The host receives one message as a view, holding it when `hold`.
    RecvView {
        hold: bool,
    },
    /// The host drops the views it holds.
    DropViews,
    /// The host sends to a guest; that guest receives.
    HostSend {
        guest: u8,
        len: u16,
    },
    GuestRecv {
        guest: u8,
    },
    Broadcast {
        len: u16,
    },
    /// A guest leaves (goodbye) / attaches (by id: takes a reserved entry).
    Detach {
        guest: u8,
    },
    Attach {
        guest: u8,
        by_id: Option<u8>,
    },
    Maintain,
    Poke {
        guest: u8,
        section: PokeSection,
        word: u16,
        mode: Mode,
        value: u64,
    },
}

#[derive(Debug, Arbitrary, Clone, Copy)]
enum PokeSection {
    Peer,
    ToHostRing,
    ToHostPools,
    ToGuestRing,
    ToGuestPools,
    BroadcastMeta,
}

#[derive(Debug, Arbitrary, Clone, Copy)]
enum Mode {
    Set,
    Xor,
    Add,
}

type Queue = VecDeque<(Meta, Vec<u8>)>;

/// A guest the script drives, with what the host must still receive from it.
struct Driven {
    guest: ShmGuest,
    to_host: Queue,
}

struct World {
    host: ShmHost,
    /// The host's segment, for pokes (as a guest maps it).
    segment: Segment,
    at_least_once: bool,
    guests: [Option<Driven>; GUESTS],
    /// Messages sent by guests that have left, still owed to the host, by peer id.
    departed: Vec<(PeerId, Queue)>,
    /// Messages the host sent to each peer id and its guests have not received
    /// (kept over a detach only with at-least-once delivery).
    to_guest: HashMap<PeerId, Queue>,
    views: Vec<Message>,
    honest: bool,
    counter: u64,
    buf: Vec<u8>,
}

// shm[verify shm.untrusted.validate]
// shm[verify shm.delivery.to-host]
fuzz_target!(|input: Input| {
    let config = shmhub_fuzz::config(input.config);
    let Ok(mut host) = ShmHost::create_heap(config) else {
        return; // out of file descriptors: not the code under test
    };
    if input.at_least_once {
        host.set_delivery(Delivery::AtLeastOnce);
    }
    let segment = Segment::attach(host.backing()).expect("the host's segment validates");
    let mut w = World {
        host,
        segment,
        at_least_once: input.at_least_once,
        guests: [None, None],
        to_guest: HashMap::new(),
        departed: Vec::new(),
        views: Vec::new(),
        honest: true,
        counter: 0,
        buf: Vec::new(),
    };
    w.attach(0, None);
    for op in input.ops.into_iter().take(64) {
        w.run(op);
    }
    // Drain: everything the honest guests sent arrives.
    for _ in 0..64 {
        match w.host.try_recv(&mut w.buf) {
            Ok(Some(r)) => w.received(r.from, r.meta),
            Ok(None) => break,
            Err(e) => assert!(!w.honest, "honest guests fenced: {e}"),
        }
    }
    if w.honest {
        for d in w.guests.iter().flatten() {
            assert!(d.to_host.is_empty(), "undelivered: {:?}", d.to_host.len());
        }
        for (peer, q) in &w.departed {
            assert!(q.is_empty(), "undelivered from departed {peer}");
        }
    }
    w.views.clear();
    drop(w.guests);
    w.host.maintain();
});

/// A deterministic payload, distinct per message.
fn payload(counter: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (counter as usize * 131 + i * 7) as u8)
        .collect()
}

impl World {
    fn slot(&mut self, guest: u8) -> &mut Option<Driven> {
        &mut self.guests[guest as usize % GUESTS]
    }

    fn attach(&mut self, guest: u8, by_id: Option<u8>) {
        if self.slot(guest).is_some() {
            return;
        }
        let options = AttachOptions {
            peer_id: by_id.and_then(PeerId::new),
            timeout: std::time::Duration::ZERO,
            ..AttachOptions::default()
        };
        if let Ok(g) = ShmGuest::attach_backing(self.host.backing(), options) {
            if options.peer_id.is_none() {
                // An Empty entry: nothing was retained for it.
                self.to_guest.remove(&g.peer_id());
            }
            *self.slot(guest) = Some(Driven {
                guest: g,
                to_host: VecDeque::new(),
            });
        }
    }

    fn next_meta(&mut self) -> (Meta, u64) {
        self.counter += 1;
        (Meta::new(self.counter as u32, self.counter), self.counter)
    }

    fn run(&mut self, op: Op) {
        match op {
            Op::GuestSend { guest, len } => {
                let (meta, n) = self.next_meta();
                let honest = self.honest;
                let Some(d) = self.slot(guest) else { return };
                let max = d.guest.max_slot_payload();
                let len = len as usize % (max + 2 * 4096);
                let data = payload(n, len);
                match d.guest.try_send(meta, &data) {
                    Ok(()) => d.to_host.push_back((meta, data)),
                    Err(e) => assert!(!honest || e.is_would_block(), "honest send: {e}"),
                }
            }
            Op::Recv => match self.host.try_recv(&mut self.buf) {
                Ok(Some(r)) => self.received(r.from, r.meta),
                Ok(None) => {}
                Err(e) => assert!(!self.honest, "honest guest fenced: {e}"),
            },
            Op::RecvView { hold } => match self.host.try_recv_message() {
                Ok(Some((r, msg))) => {
                    assert_eq!(msg.len(), msg.to_vec().len());
                    self.buf = msg.to_vec();
                    self.received(r.from, r.meta);
                    if hold {
                        self.views.push(msg);
                    }
                }
                Ok(None) => {}
                Err(e) => assert!(!self.honest, "honest guest fenced: {e}"),
            },
            Op::DropViews => self.views.clear(),
            Op::HostSend { guest, len } => {
                let (meta, n) = self.next_meta();
                let Some(to) = self.slot(guest).as_ref().map(|d| d.guest.peer_id()) else {
                    return;
                };
                let len = len as usize % (self.host.max_slot_payload() + 4096);
                let data = payload(n, len);
                match self.host.try_send(to, meta, &data) {
                    Ok(()) => self.to_guest.entry(to).or_default().push_back((meta, data)),
                    Err(e) => assert!(!self.honest || e.is_would_block(), "honest host send: {e}"),
                }
            }
            Op::GuestRecv { guest } => {
                let honest = self.honest;
                let mut buf = Vec::new();
                let Some(d) = self.guests[guest as usize % GUESTS].as_mut() else {
                    return;
                };
                match d.guest.try_recv(&mut buf) {
                    Ok(Some(meta)) if honest => {
                        let queue = self.to_guest.entry(d.guest.peer_id()).or_default();
                        let (want_meta, want) = queue
                            .pop_front()
                            .unwrap_or_else(|| panic!("{meta:?} was never sent"));
                        assert_eq!(meta, want_meta, "order of messages to the guest");
                        assert_eq!(buf, want, "payload of {meta:?}");
                    }
                    Ok(_) => {}
                    Err(e) => assert!(!honest, "honest guest receive: {e}"),
                }
            }
            Op::Broadcast { len } => {
                let (meta, n) = self.next_meta();
                let len = len as usize % 512;
                let data = payload(n, len);
                match self.host.broadcast(meta, &data) {
                    Ok(report) => {
                        for peer in report.delivered.iter() {
                            let queue = self.to_guest.entry(peer).or_default();
                            queue.push_back((meta, data.clone()));
                        }
                        assert!(!self.honest || report.fenced.is_empty());
                    }
                    Err(BroadcastError::Violation(v)) => assert!(!self.honest, "{v}"),
                    Err(_) => {}
                }
            }
            Op::Detach { guest } => {
                if let Some(d) = self.slot(guest).take() {
                    let peer = d.guest.peer_id();
                    d.guest.detach();
                    self.departed.push((peer, d.to_host));
                    if !self.at_least_once {
                        self.to_guest.remove(&peer);
                    }
                }
            }
            Op::Attach { guest, by_id } => {
                self.attach(guest, by_id);
                if by_id.is_some() {
                    // Link the doorbell now: a guest resuming retained large payloads
                    // would otherwise wait (boundedly) for their files.
                    self.host.maintain();
                }
            }
            Op::Maintain => {
                self.host.maintain();
            }
            Op::Poke {
                guest,
                section,
                word,
                mode,
                value,
            } => {
                let Some(peer) = self.slot(guest).as_ref().map(|d| d.guest.peer_id()) else {
                    return;
                };
                let sec = match section {
                    PokeSection::Peer => Section::Peer,
                    PokeSection::ToHostRing => Section::Ring(Direction::ToHost),
                    PokeSection::ToHostPools => Section::Pools(Direction::ToHost),
                    PokeSection::ToGuestRing => Section::Ring(Direction::ToGuest),
                    PokeSection::ToGuestPools => Section::Pools(Direction::ToGuest),
                    PokeSection::BroadcastMeta => Section::BroadcastMeta,
                };
                let mode = match mode {
                    Mode::Set => PokeMode::Set,
                    Mode::Xor => PokeMode::Xor,
                    Mode::Add => PokeMode::Add,
                };
                if poke(&self.segment, peer, sec, word as usize, mode, value) {
                    self.honest = false;
                }
            }
        }
    }

    /// The host received `meta` from `from` (payload in `self.buf`): while everyone
    /// is honest it must be the next message that guest sent.
    fn received(&mut self, from: PeerId, meta: Meta) {
        if !self.honest {
            return;
        }
        let queue = self
            .guests
            .iter_mut()
            .flatten()
            .filter(|d| d.guest.peer_id() == from)
            .map(|d| &mut d.to_host)
            .chain(
                self.departed
                    .iter_mut()
                    .filter(|(p, _)| *p == from)
                    .map(|(_, q)| q),
            )
            .find(|q| !q.is_empty())
            .unwrap_or_else(|| panic!("{meta:?} from {from} was never sent"));
        let (want_meta, want) = queue.pop_front().unwrap();
        assert_eq!(meta, want_meta, "order of messages from {from}");
        assert_eq!(self.buf, want, "payload of {meta:?}");
    }
}
