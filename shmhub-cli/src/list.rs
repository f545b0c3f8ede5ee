//! `shmhub list`: our segments in a directory, their hosts, and whether those live
//! (`shm.cli.list`, `shm.cli.host-alive`).

use std::fmt::Write;
use std::io;
use std::path::{Path, PathBuf};

use shmhub::primitives::PeerState;

use crate::inspect::{error_obj, FORMAT};
use crate::json::Json;
use crate::probe::{self, HostLiveness};
use crate::scan::{self, Found};
use crate::snapshot::{InspectError, SegmentFile};

/// One segment file.
#[derive(Debug)]
struct SegmentRow {
    path: PathBuf,
    lock_held: Option<bool>,
    liveness: HostLiveness,
    host_pid: Option<u32>,
    pid_exists: Option<bool>,
    total_size: Option<u64>,
    /// Attached entries, and `max_guests`.
    attached: Option<(u32, u32)>,
    error: Option<InspectError>,
}

/// One temporary file of a segment being built.
#[derive(Debug)]
struct TempRow {
    path: PathBuf,
    creator_pid: Option<u32>,
    pid_exists: Option<bool>,
    lock_held: Option<bool>,
}

/// Everything `list` reports.
#[derive(Debug)]
pub struct Listing {
    dir: PathBuf,
    segments: Vec<SegmentRow>,
    temps: Vec<TempRow>,
}

impl Listing {
    /// Examines every segment and temporary file in `dir`, read-only
    /// (`shm.cli.read-only`).
    // shm[impl shm.cli.list]
    pub fn take(dir: &Path) -> io::Result<Self> {
        let Found { segments, temps } = scan::scan(dir)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            segments: segments.into_iter().map(|p| segment_row(&p)).collect(),
            temps: temps.into_iter().map(|p| temp_row(&p)).collect(),
        })
    }

    /// The table.
    pub fn text(&self) -> String {
        let mut o = String::new();
        if self.segments.is_empty() {
            let _ = writeln!(o, "no segments in {}", self.dir.display());
        } else {
            let width = self
                .segments
                .iter()
                .map(|r| r.path_len())
                .max()
                .unwrap_or(0);
            let _ = writeln!(
                o,
                "{:<width$}  {:<7}  {:>8}  {:<9}  {:>6}  {:>10}",
                "SEGMENT", "HOST", "HOST_PID", "PROCESS", "GUESTS", "SIZE"
            );
            for r in &self.segments {
                let opt = |v: Option<String>| v.unwrap_or_else(|| "-".into());
                let _ = write!(
                    o,
                    "{:<width$}  {:<7}  {:>8}  {:<9}  {:>6}  {:>10}",
                    r.path.display(),
                    r.liveness.as_str(),
                    opt(r.host_pid.map(|p| p.to_string())),
                    process(r.pid_exists),
                    opt(r.attached.map(|(a, m)| format!("{a}/{m}"))),
                    opt(r.total_size.map(|s| s.to_string())),
                );
                if let Some(e) = &r.error {
                    let _ = write!(o, "  error: {e}");
                }
                o.push('\n');
            }
        }
        if !self.temps.is_empty() {
            let _ = writeln!(o, "under construction (temporary files):");
            for t in &self.temps {
                let pid = match t.creator_pid {
                    Some(pid) => format!("creator pid {pid} ({})", process(t.pid_exists)),
                    None => "no creator pid in the name".to_string(),
                };
                let lock = match t.lock_held {
                    Some(true) => "owner lock held",
                    Some(false) => "owner lock free",
                    None => "owner lock unknown",
                };
                let _ = writeln!(o, "  {}  {pid}, {lock}", t.path.display());
            }
        }
        o
    }

    /// The JSON document (`shm.cli.inspect-json`).
    // shm[impl shm.cli.inspect-json]
    pub fn json(&self) -> Json {
        let segments = self
            .segments
            .iter()
            .map(|r| {
                Json::Obj(vec![
                    ("path", r.path.display().to_string().into()),
                    ("name", scan::segment_name(&r.path).into()),
                    ("liveness", r.liveness.as_str().into()),
                    ("lock_held", Json::opt(r.lock_held)),
                    ("host_pid", Json::opt(r.host_pid)),
                    ("process_exists", Json::opt(r.pid_exists)),
                    ("total_size", Json::opt(r.total_size)),
                    ("attached", Json::opt(r.attached.map(|a| a.0))),
                    ("max_guests", Json::opt(r.attached.map(|a| a.1))),
                    ("error", r.error.as_ref().map_or(Json::Null, error_obj)),
                ])
            })
            .collect::<Vec<_>>();
        let temps = self
            .temps
            .iter()
            .map(|t| {
                Json::Obj(vec![
                    ("path", t.path.display().to_string().into()),
                    ("creator_pid", Json::opt(t.creator_pid)),
                    ("process_exists", Json::opt(t.pid_exists)),
                    ("lock_held", Json::opt(t.lock_held)),
                ])
            })
            .collect::<Vec<_>>();
        Json::Obj(vec![
            ("format", FORMAT.into()),
            ("dir", self.dir.display().to_string().into()),
            ("segments", segments.into()),
            ("temporary", temps.into()),
        ])
    }
}

impl SegmentRow {
    fn path_len(&self) -> usize {
        self.path.display().to_string().chars().count()
    }
}

fn process(exists: Option<bool>) -> &'static str {
    match exists {
        Some(true) => "exists",
        Some(false) => "gone",
        None => "unknown",
    }
}

fn segment_row(path: &Path) -> SegmentRow {
    let mut row = SegmentRow {
        path: path.to_path_buf(),
        lock_held: None,
        liveness: HostLiveness::Unknown,
        host_pid: None,
        pid_exists: None,
        total_size: None,
        attached: None,
        error: None,
    };
    let file = match SegmentFile::open(path) {
        Ok(f) => f,
        Err(e) => {
            row.error = Some(e);
            return row;
        }
    };
    row.lock_held = probe::host_lock_held(file.file());
    // What the header can say even when later checks fail: who made it.
    let closed = match file.header().map(|h| h.host()) {
        Ok(Some((pid, closed))) => {
            row.host_pid = Some(pid);
            row.pid_exists = probe::pid_exists(pid);
            Some(closed)
        }
        _ => None,
    };
    row.liveness = HostLiveness::decide(row.lock_held, closed);
    match file.snapshot() {
        Ok(snap) => {
            let seg = snap.segment();
            let max = seg.layout().config.max_guests;
            let attached = (0..max as usize)
                .filter_map(shmhub::PeerId::from_index)
                .filter_map(|id| seg.peer(id))
                .filter(|e| e.load().is_ok_and(|w| w.state == PeerState::Attached))
                .count() as u32;
            row.total_size = Some(seg.layout().total_size);
            row.attached = Some((attached, max));
        }
        Err(e) => row.error = Some(e),
    }
    row
}

fn temp_row(path: &Path) -> TempRow {
    let creator_pid = scan::temp_creator_pid(path);
    let lock_held = SegmentFile::open(path)
        .ok()
        .and_then(|f| probe::host_lock_held(f.file()));
    TempRow {
        path: path.to_path_buf(),
        creator_pid,
        pid_exists: creator_pid.and_then(probe::pid_exists),
        lock_held,
    }
}

/// The JSON document of a directory that could not be read (`shm.cli.inspect-json`).
pub fn error_json(e: &io::Error) -> Json {
    Json::Obj(vec![
        ("format", FORMAT.into()),
        (
            "error",
            Json::Obj(vec![
                ("kind", "Io".into()),
                ("message", e.to_string().into()),
            ]),
        ),
    ])
}
