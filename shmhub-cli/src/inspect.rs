//! `shmhub inspect`: one segment's header, peers, rings, slots and broadcast pool, from
//! a private copy (`shm.cli.inspect`), as text or JSON (`shm.cli.inspect-json`).

use std::fmt::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use shmhub::primitives::header::{HOST_CLOSED, MAGIC};
use shmhub::primitives::slot::SlotState;
use shmhub::primitives::{Direction, PeerId, PeerState, Segment, Violation};

use crate::json::Json;
use crate::probe::{self, HostLiveness};
use crate::snapshot::{InspectError, SegmentFile};

/// The JSON format number (`shm.cli.inspect-json`).
pub const FORMAT: u64 = 1;

/// Everything `inspect` reports, as plain values read from the copy.
#[derive(Debug)]
pub struct Report {
    path: PathBuf,
    file_len: u64,
    header: HeaderFields,
    host: HostReport,
    peers: Vec<PeerReport>,
    broadcast: Option<BroadcastReport>,
}

#[derive(Debug)]
struct HeaderFields {
    magic: u64,
    version: u32,
    header_size: u32,
    total_size: u64,
    incompat_features: u64,
    compat_features: u64,
    segment_id: [u64; 2],
    max_guests: u32,
    ring_capacity: u32,
    /// `(slot_size, count)` of each class.
    classes: Vec<(u32, u32)>,
    broadcast_slots: u32,
    broadcast_slot_size: u32,
    host_pid: u32,
    ready: u32,
    ready_waiters: u32,
    host_parked: u32,
    host_state: u32,
    heartbeat_interval_ms: u32,
    heartbeat: u64,
}

#[derive(Debug)]
struct HostReport {
    lock_held: Option<bool>,
    pid_exists: Option<bool>,
    liveness: HostLiveness,
}

#[derive(Debug)]
struct PeerReport {
    id: u8,
    raw_word: u64,
    /// `None` when the word holds no state (`shm.peer.states`).
    state: Option<PeerState>,
    generation: u32,
    pid: u32,
    fault: u32,
    lock_held: Option<bool>,
    /// ToGuest, then ToHost.
    rings: [RingReport; 2],
    /// Per direction (ToGuest, ToHost), one entry per class.
    slots: [Vec<StateCounts>; 2],
}

#[derive(Debug, Clone, Copy)]
struct RingReport {
    head: u64,
    tail: u64,
    capacity: u32,
}

impl RingReport {
    /// `tail − head`, or `None` when that exceeds the capacity (`shm.ring.validate`).
    /// A head one past the tail is an empty ring: the consumer follows the stamps,
    /// which run one entry ahead of the tail until the producer stores it.
    fn depth(&self) -> Option<u64> {
        if self.tail.wrapping_add(1) == self.head {
            return Some(0);
        }
        let d = self.tail.wrapping_sub(self.head);
        (d <= u64::from(self.capacity)).then_some(d)
    }
}

/// Slots counted by state; `invalid` counts words that hold no state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct StateCounts {
    free: u32,
    loaned: u32,
    sent: u32,
    received: u32,
    invalid: u32,
}

impl StateCounts {
    fn add(&mut self, state: Option<SlotState>) {
        match state {
            Some(SlotState::Free) => self.free += 1,
            Some(SlotState::Loaned) => self.loaned += 1,
            Some(SlotState::Sent) => self.sent += 1,
            Some(SlotState::Received) => self.received += 1,
            None => self.invalid += 1,
        }
    }

    fn in_use(&self) -> u32 {
        self.loaned + self.sent + self.received + self.invalid
    }

    fn sum(&mut self, o: &StateCounts) {
        self.free += o.free;
        self.loaned += o.loaned;
        self.sent += o.sent;
        self.received += o.received;
        self.invalid += o.invalid;
    }

    fn to_json(self, with_received: bool) -> Vec<(&'static str, Json)> {
        let mut m = vec![
            ("free", self.free.into()),
            ("loaned", self.loaned.into()),
            ("sent", self.sent.into()),
        ];
        if with_received {
            m.push(("received", self.received.into()));
        }
        m.push(("invalid", self.invalid.into()));
        m
    }
}

#[derive(Debug)]
struct BroadcastReport {
    slot_size: u32,
    counts: StateCounts,
    /// Every slot in use (neither Free nor released), by index.
    busy: Vec<BroadcastSlot>,
}

#[derive(Debug)]
struct BroadcastSlot {
    index: u32,
    state: Option<SlotState>,
    generation: u32,
    holders: Vec<u8>,
}

/// The violation a `fault` code names, and its rule.
fn fault_name(code: u32) -> Option<(&'static str, &'static str)> {
    Violation::describe_code(code)
}

const DIRS: [Direction; 2] = [Direction::ToGuest, Direction::ToHost];

impl Report {
    /// Opens `path` read-only, validates and copies it, and reads the report off the
    /// copy; the liveness locks are tested on the file itself (`F_OFD_GETLK`).
    // shm[impl shm.cli.inspect]
    pub fn take(path: &Path) -> Result<Self, InspectError> {
        let file = SegmentFile::open(path)?;
        let snapshot = file.snapshot()?;
        let seg = snapshot.segment();
        let header = header_fields(seg);
        let lock_held = probe::host_lock_held(file.file());
        let host = HostReport {
            lock_held,
            pid_exists: probe::pid_exists(header.host_pid),
            liveness: HostLiveness::decide(lock_held, Some(header.host_state == HOST_CLOSED)),
        };
        let peers = (0..header.max_guests as usize)
            .filter_map(PeerId::from_index)
            .map(|id| peer_report(seg, &file, id))
            .collect();
        Ok(Self {
            path: path.to_path_buf(),
            file_len: file.len(),
            header,
            host,
            peers,
            broadcast: broadcast_report(seg),
        })
    }

    /// Per class and direction, the sum over every peer.
    fn class_totals(&self) -> Vec<[StateCounts; 2]> {
        let mut totals = vec![[StateCounts::default(); 2]; self.header.classes.len()];
        for peer in &self.peers {
            for (d, per_class) in peer.slots.iter().enumerate() {
                for (class, counts) in per_class.iter().enumerate() {
                    totals[class][d].sum(counts);
                }
            }
        }
        totals
    }
}

fn header_fields(seg: &Segment) -> HeaderFields {
    // The copy is private: these loads race with nobody.
    let h = seg.header();
    let r = Ordering::Relaxed;
    let config = &seg.layout().config;
    HeaderFields {
        magic: h.magic.load(r),
        version: h.version.load(r),
        header_size: h.header_size.load(r),
        total_size: h.total_size.load(r),
        incompat_features: h.incompat_features.load(r),
        compat_features: h.compat_features.load(r),
        segment_id: h.segment_id(),
        max_guests: config.max_guests,
        ring_capacity: config.ring_capacity,
        classes: config
            .classes
            .as_slice()
            .iter()
            .map(|c| (c.size, c.count))
            .collect(),
        broadcast_slots: config.broadcast_slots,
        broadcast_slot_size: config.broadcast_slot_size,
        host_pid: h.host_pid.load(r),
        ready: h.ready.load(r),
        ready_waiters: h.ready_waiters.load(r),
        host_parked: h.host_parked.load(r),
        host_state: h.host_state.load(r),
        heartbeat_interval_ms: h.heartbeat_interval_ms.load(r),
        heartbeat: h.heartbeat.load(r),
    }
}

/// One entry: everything in it is guest-writable, so it is reported as found; the
/// locations come from the validated layout only.
fn peer_report(seg: &Segment, file: &SegmentFile, id: PeerId) -> PeerReport {
    let layout = seg.layout();
    let entry = seg.peer(id).expect("id within max_guests");
    let raw_word = entry.state_word.load(Ordering::Relaxed);
    let word = entry.load();
    let region = seg.backing().region();
    let rings = DIRS.map(|dir| {
        let off = layout.ring_offset(id.index(), dir) as usize;
        let word_at = |o: usize| {
            region
                .atomic_u64(off + o)
                .expect("ring header in the layout")
                .load(Ordering::Relaxed)
        };
        RingReport {
            tail: word_at(std::mem::offset_of!(
                shmhub::primitives::ring::RingHeader,
                tail
            )),
            head: word_at(std::mem::offset_of!(
                shmhub::primitives::ring::RingHeader,
                head
            )),
            capacity: layout.config.ring_capacity,
        }
    });
    let slots = DIRS.map(|dir| {
        let pools = seg.pools(id, dir).expect("id within max_guests");
        (0..pools.classes())
            .map(|class| {
                let pool = pools.class(class).expect("class within class_count");
                let mut counts = StateCounts::default();
                for index in 0..pool.count() {
                    counts.add(pool.state(index));
                }
                counts
            })
            .collect()
    });
    PeerReport {
        id: id.get(),
        raw_word,
        state: word.ok().map(|w| w.state),
        generation: (raw_word >> 32) as u32,
        pid: entry.guest_pid.load(Ordering::Relaxed),
        fault: entry.fault.load(Ordering::Relaxed),
        lock_held: probe::lock_held(file.file(), layout.peer_offset(id.index())),
        rings,
        slots,
    }
}

fn broadcast_report(seg: &Segment) -> Option<BroadcastReport> {
    let pool = seg.broadcast()?;
    let mut counts = StateCounts::default();
    let mut busy = Vec::new();
    for index in 0..pool.count() {
        let info = pool.info(index).expect("index within the pool");
        // A Sent slot whose holders have all released it is free: the host allocates
        // it as it would a Free one (`shm.broadcast.release`).
        if info.is_free() {
            counts.add(Some(SlotState::Free));
        } else {
            counts.add(info.state);
            busy.push(BroadcastSlot {
                index,
                state: info.state,
                generation: info.generation,
                holders: info.holders.iter().map(PeerId::get).collect(),
            });
        }
    }
    Some(BroadcastReport {
        slot_size: pool.slot_size(),
        counts,
        busy,
    })
}

fn state_name(state: Option<PeerState>) -> &'static str {
    match state {
        Some(PeerState::Empty) => "Empty",
        Some(PeerState::Reserved) => "Reserved",
        Some(PeerState::Attached) => "Attached",
        Some(PeerState::Goodbye) => "Goodbye",
        None => "invalid",
    }
}

fn slot_state_name(state: Option<SlotState>) -> &'static str {
    match state {
        Some(SlotState::Free) => "Free",
        Some(SlotState::Loaned) => "Loaned",
        Some(SlotState::Sent) => "Sent",
        Some(SlotState::Received) => "Received",
        None => "invalid",
    }
}

fn yes_no(v: Option<bool>, yes: &'static str, no: &'static str) -> &'static str {
    match v {
        Some(true) => yes,
        Some(false) => no,
        None => "unknown",
    }
}

fn segment_id_hex(id: [u64; 2]) -> String {
    format!("{:016x}{:016x}", id[0], id[1])
}

// ----- text -------------------------------------------------------------------------

impl Report {
    /// The human-readable report.
    pub fn text(&self) -> String {
        let mut o = String::new();
        let h = &self.header;
        let _ = writeln!(o, "segment {}", self.path.display());
        let magic_note = if h.magic == MAGIC { "SHMHUB" } else { "?" };
        let _ = writeln!(
            o,
            "  magic {:#018x} ({magic_note}), version {}, header {} bytes, features {:#x}/{:#x}",
            h.magic, h.version, h.header_size, h.incompat_features, h.compat_features
        );
        let _ = writeln!(o, "  segment id {}", segment_id_hex(h.segment_id));
        let _ = writeln!(
            o,
            "  size {} bytes (file {} bytes)",
            h.total_size, self.file_len
        );
        let classes: Vec<String> = h
            .classes
            .iter()
            .map(|(size, count)| format!("{size} B x {count}"))
            .collect();
        let _ = writeln!(
            o,
            "  config: {} guests, ring capacity {}, slot classes [{}], broadcast {} x {} B",
            h.max_guests,
            h.ring_capacity,
            classes.join(", "),
            h.broadcast_slots,
            h.broadcast_slot_size
        );
        let _ = writeln!(
            o,
            "  host: {} (owner lock {}), pid {} ({}), host_state {}",
            self.host.liveness.as_str(),
            yes_no(self.host.lock_held, "held", "free"),
            h.host_pid,
            yes_no(self.host.pid_exists, "process exists", "no such process"),
            if h.host_state == HOST_CLOSED {
                "closed".to_string()
            } else if h.host_state == 0 {
                "running".to_string()
            } else {
                format!("invalid ({})", h.host_state)
            }
        );
        let heartbeat = match h.heartbeat_interval_ms {
            0 => "off".to_string(),
            ms => format!("every {ms} ms, count {}", h.heartbeat),
        };
        let _ = writeln!(
            o,
            "  ready {}, ready_waiters {}, host_parked {}, heartbeat {heartbeat}",
            h.ready, h.ready_waiters, h.host_parked
        );

        let shown: Vec<&PeerReport> = self.peers.iter().filter(|p| p.worth_showing()).collect();
        let _ = writeln!(
            o,
            "peers: {} attached, {} shown, {} more Empty with nothing in flight",
            self.peers
                .iter()
                .filter(|p| p.state == Some(PeerState::Attached))
                .count(),
            shown.len(),
            self.peers.len() - shown.len()
        );
        if !shown.is_empty() {
            let _ = writeln!(
                o,
                "  {:>3}  {:<9} {:>5}  {:>8}  {:<7} {:<16} {:>9}  {:>9}  {:>11}",
                "ID", "STATE", "GEN", "PID", "LOCK", "FAULT", "TO_GUEST", "TO_HOST", "SLOTS_IN_USE"
            );
        }
        for p in shown {
            let fault = match (p.fault, fault_name(p.fault)) {
                (0, _) => "-".to_string(),
                (_, Some((name, _))) => name.to_string(),
                (code, None) => format!("code {code}"),
            };
            let ring = |r: &RingReport| match r.depth() {
                Some(d) => format!("{d}/{}", r.capacity),
                None => "invalid".to_string(),
            };
            let in_use = |d: usize| p.slots[d].iter().map(StateCounts::in_use).sum::<u32>();
            let state = match p.state {
                Some(_) => state_name(p.state).to_string(),
                None => format!("{:#x}", p.raw_word),
            };
            let _ = writeln!(
                o,
                "  {:>3}  {:<9} {:>5}  {:>8}  {:<7} {:<16} {:>9}  {:>9}  {:>11}",
                p.id,
                state,
                p.generation,
                p.pid,
                yes_no(p.lock_held, "held", "free"),
                fault,
                ring(&p.rings[0]),
                ring(&p.rings[1]),
                format!("{}/{}", in_use(0), in_use(1)),
            );
        }

        let _ = writeln!(o, "slots (all guests; per class and direction, by state):");
        let _ = writeln!(
            o,
            "  {:>5}  {:>10}  {:<8}  {:>6}  {:>6}  {:>6}  {:>8}  {:>7}",
            "CLASS", "SLOT_SIZE", "DIR", "FREE", "LOANED", "SENT", "RECEIVED", "INVALID"
        );
        for (class, per_dir) in self.class_totals().iter().enumerate() {
            for (d, c) in per_dir.iter().enumerate() {
                let _ = writeln!(
                    o,
                    "  {:>5}  {:>10}  {:<8}  {:>6}  {:>6}  {:>6}  {:>8}  {:>7}",
                    class,
                    h.classes[class].0,
                    ["to_guest", "to_host"][d],
                    c.free,
                    c.loaned,
                    c.sent,
                    c.received,
                    c.invalid
                );
            }
        }
        match &self.broadcast {
            None => {
                let _ = writeln!(o, "broadcast pool: none");
            }
            Some(b) => {
                let _ = writeln!(
                    o,
                    "broadcast pool: {} slots of {} B: {} free, {} loaned, {} sent, {} invalid",
                    h.broadcast_slots,
                    b.slot_size,
                    b.counts.free,
                    b.counts.loaned,
                    b.counts.sent,
                    b.counts.invalid
                );
                for s in &b.busy {
                    let _ = writeln!(
                        o,
                        "  slot {}: {} generation {}, holders {:?}",
                        s.index,
                        slot_state_name(s.state),
                        s.generation,
                        s.holders
                    );
                }
            }
        }
        o
    }
}

impl PeerReport {
    /// Whether the text report lists this entry: anything but a quiet Empty one.
    fn worth_showing(&self) -> bool {
        self.state != Some(PeerState::Empty)
            || self.pid != 0
            || self.fault != 0
            || self.lock_held == Some(true)
            || self.rings.iter().any(|r| r.depth() != Some(0))
            || self.slots.iter().flatten().any(|c| c.in_use() > 0)
    }
}

// ----- JSON -------------------------------------------------------------------------

impl Report {
    /// The JSON document (`shm.cli.inspect-json`).
    // shm[impl shm.cli.inspect-json]
    pub fn json(&self) -> Json {
        let h = &self.header;
        let classes = h
            .classes
            .iter()
            .map(|&(slot_size, count)| {
                Json::Obj(vec![
                    ("slot_size", slot_size.into()),
                    ("count", count.into()),
                ])
            })
            .collect::<Vec<_>>();
        let header = Json::Obj(vec![
            ("magic", Json::hex(h.magic)),
            ("version", h.version.into()),
            ("header_size", h.header_size.into()),
            ("total_size", h.total_size.into()),
            ("incompat_features", Json::hex(h.incompat_features)),
            ("compat_features", Json::hex(h.compat_features)),
            (
                "segment_id",
                format!("0x{}", segment_id_hex(h.segment_id)).into(),
            ),
            ("max_guests", h.max_guests.into()),
            ("ring_capacity", h.ring_capacity.into()),
            ("classes", classes.into()),
            ("broadcast_slots", h.broadcast_slots.into()),
            ("broadcast_slot_size", h.broadcast_slot_size.into()),
            ("host_pid", h.host_pid.into()),
            ("ready", h.ready.into()),
            ("ready_waiters", h.ready_waiters.into()),
            ("host_parked", h.host_parked.into()),
            ("host_state", h.host_state.into()),
            ("closed", (h.host_state == HOST_CLOSED).into()),
            ("heartbeat_interval_ms", h.heartbeat_interval_ms.into()),
            ("heartbeat", Json::hex(h.heartbeat)),
        ]);
        let host = Json::Obj(vec![
            ("pid", h.host_pid.into()),
            ("process_exists", Json::opt(self.host.pid_exists)),
            ("lock_held", Json::opt(self.host.lock_held)),
            ("liveness", self.host.liveness.as_str().into()),
        ]);
        let peers = self.peers.iter().map(PeerReport::json).collect::<Vec<_>>();
        let slots = self
            .class_totals()
            .iter()
            .enumerate()
            .map(|(class, [to_guest, to_host])| {
                Json::Obj(vec![
                    ("class", (class as u64).into()),
                    ("slot_size", h.classes[class].0.into()),
                    ("count_per_pool", h.classes[class].1.into()),
                    ("to_guest", Json::Obj(to_guest.to_json(true))),
                    ("to_host", Json::Obj(to_host.to_json(true))),
                ])
            })
            .collect::<Vec<_>>();
        let broadcast = self.broadcast.as_ref().map_or(Json::Null, |b| {
            let busy = b
                .busy
                .iter()
                .map(|s| {
                    Json::Obj(vec![
                        ("index", s.index.into()),
                        ("state", slot_state_name(s.state).into()),
                        ("generation", s.generation.into()),
                        (
                            "holders",
                            s.holders
                                .iter()
                                .map(|&id| id.into())
                                .collect::<Vec<_>>()
                                .into(),
                        ),
                    ])
                })
                .collect::<Vec<_>>();
            let mut m = vec![
                ("slots", h.broadcast_slots.into()),
                ("slot_size", b.slot_size.into()),
            ];
            m.extend(b.counts.to_json(false));
            m.push(("busy", busy.into()));
            Json::Obj(m)
        });
        Json::Obj(vec![
            ("format", FORMAT.into()),
            ("path", self.path.display().to_string().into()),
            ("file_len", self.file_len.into()),
            ("header", header),
            ("host", host),
            ("peers", peers.into()),
            ("slots", slots.into()),
            ("broadcast", broadcast),
        ])
    }
}

impl PeerReport {
    fn json(&self) -> Json {
        let ring = |r: &RingReport| {
            Json::Obj(vec![
                ("head", Json::hex(r.head)),
                ("tail", Json::hex(r.tail)),
                ("depth", Json::opt(r.depth())),
                ("capacity", r.capacity.into()),
            ])
        };
        let pools = |d: usize| {
            self.slots[d]
                .iter()
                .map(|c| Json::Obj(c.to_json(true)))
                .collect::<Vec<_>>()
                .into()
        };
        let (fault_name, fault_rule) = match fault_name(self.fault) {
            Some((n, r)) => (Json::from(n), Json::from(r)),
            None => (Json::Null, Json::Null),
        };
        Json::Obj(vec![
            ("id", self.id.into()),
            ("state", state_name(self.state).into()),
            ("generation", self.generation.into()),
            ("state_word", Json::hex(self.raw_word)),
            ("pid", self.pid.into()),
            ("fault", self.fault.into()),
            ("fault_name", fault_name),
            ("fault_rule", fault_rule),
            ("lock_held", Json::opt(self.lock_held)),
            (
                "rings",
                Json::Obj(vec![
                    ("to_guest", ring(&self.rings[0])),
                    ("to_host", ring(&self.rings[1])),
                ]),
            ),
            (
                "slots",
                Json::Obj(vec![("to_guest", pools(0)), ("to_host", pools(1))]),
            ),
        ])
    }
}

/// The JSON document of an error (`shm.cli.inspect-json`).
pub fn error_json(e: &InspectError) -> Json {
    Json::Obj(vec![("format", FORMAT.into()), ("error", error_obj(e))])
}

/// An error as `{"kind": …, "message": …}`.
pub fn error_obj(e: &InspectError) -> Json {
    Json::Obj(vec![
        ("kind", e.kind().into()),
        ("message", e.to_string().into()),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;
    // Every code's name and rule: `violation::tests::codes_and_rules_match_the_spec_table`
    // in shm-primitives, whose table `fault_name` reads.

    #[test]
    fn a_depth_beyond_the_capacity_is_invalid() {
        let r = |head, tail| RingReport {
            head,
            tail,
            capacity: 4,
        };
        assert_eq!(r(10, 14).depth(), Some(4));
        assert_eq!(r(10, 15).depth(), None);
        assert_eq!(r(11, 10).depth(), Some(0), "a consumer one past the tail");
        assert_eq!(r(12, 10).depth(), None, "head past tail");
        assert_eq!(r(0, u64::MAX).depth(), Some(0), "one past, across the wrap");
        assert_eq!(r(u64::MAX, 1).depth(), Some(2), "counters wrap");
    }
}
