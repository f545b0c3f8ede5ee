//! A private copy of a segment's header and metadata, read from the file with `pread`
//! and validated the way a guest attaching by path validates it (`shm.cli.read-only`,
//! `shm.cli.inspect`).
//!
//! The file is opened read-only and never mapped: a guest can shrink it, and touching a
//! mapped page past the new end raises SIGBUS, while `pread` just returns less. The copy
//! lives in a sparse memory file of the segment's size, so the library's own view types
//! (peer entries, pools, the broadcast pool) read it at the offsets of the validated
//! layout, and slot data the copy never needs costs nothing.

use std::fs::File;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use shmhub::primitives::header::{SegmentHeader, HEADER_SIZE};
use shmhub::primitives::layout::BROADCAST_META_SIZE;
use shmhub::primitives::ring::RING_HEADER_SIZE;
use shmhub::primitives::{
    Direction, HeaderError, HeapRegion, MmapRegion, Segment, SegmentLayout, ShmBacking,
};

/// Why a file could not be inspected.
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    /// The file could not be opened or measured.
    #[error("cannot open {}: {source}", path.display())]
    Open {
        /// The path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The path names something other than a regular file.
    #[error("{} is not a regular file", path.display())]
    NotAFile {
        /// The path.
        path: PathBuf,
    },
    /// The header was refused, exactly as an attacher refuses it.
    #[error(transparent)]
    Header(#[from] HeaderError),
    /// The creator has not published the segment (`ready` is not 1).
    #[error("segment not ready: its creator has not published it (ready = {ready})")]
    NotReady {
        /// The readiness word found.
        ready: u32,
    },
    /// The file ended before a section the header promised (it shrank while read).
    #[error("file ended early: {len} bytes at offset {offset} could not be read")]
    Truncated {
        /// Offset of the read.
        offset: u64,
        /// Bytes asked for.
        len: u64,
    },
    /// The header read for the copy describes another layout than the first read.
    #[error("the header changed while the file was read")]
    Changed,
    /// Any other I/O failure, with what was being done.
    #[error("{op}: {source}")]
    Io {
        /// The operation.
        op: &'static str,
        /// The OS error.
        source: io::Error,
    },
}

impl InspectError {
    /// A stable name for the error (the `kind` of the JSON error document).
    pub fn kind(&self) -> &'static str {
        match self {
            InspectError::Open { .. } => "Open",
            InspectError::NotAFile { .. } => "NotAFile",
            InspectError::NotReady { .. } => "NotReady",
            InspectError::Truncated { .. } => "Truncated",
            InspectError::Changed => "Changed",
            InspectError::Io { .. } => "Io",
            InspectError::Header(h) => match h {
                HeaderError::ShorterThanHeader { .. } => "ShorterThanHeader",
                HeaderError::BadMagic { .. } => "BadMagic",
                HeaderError::UnsupportedVersion { .. } => "UnsupportedVersion",
                HeaderError::HeaderSize { .. } => "HeaderSize",
                HeaderError::UnknownIncompatFeatures { .. } => "UnknownIncompatFeatures",
                HeaderError::FileTooShort { .. } => "FileTooShort",
                HeaderError::SectionOutOfBounds { .. } => "SectionOutOfBounds",
                HeaderError::Limits(_) => "Limits",
                HeaderError::LayoutMismatch { .. } => "LayoutMismatch",
            },
        }
    }
}

/// A segment file opened for reading only.
#[derive(Debug)]
pub struct SegmentFile {
    file: File,
    len: u64,
}

impl SegmentFile {
    /// Opens `path` with `O_RDONLY | O_CLOEXEC` (no create, no truncate) and measures it.
    // shm[impl shm.cli.read-only]
    pub fn open(path: &Path) -> Result<Self, InspectError> {
        let open_err = |source| InspectError::Open {
            path: path.to_path_buf(),
            source,
        };
        let file = File::options()
            .read(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
            .map_err(open_err)?;
        let meta = file.metadata().map_err(open_err)?;
        if !meta.is_file() {
            return Err(InspectError::NotAFile {
                path: path.to_path_buf(),
            });
        }
        Ok(Self {
            file,
            len: meta.len(),
        })
    }

    /// The open file (for lock tests, which take nothing).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// The file's length when it was opened.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// A private copy of the header, checked only for length (`shm.file.attach` step
    /// 2): what `list` can still show of a file that fails later checks.
    pub fn header(&self) -> Result<HeaderCopy, InspectError> {
        read_header(&self.file, self.len)
    }

    /// Validates the header like an attacher (`shm.file.attach` steps 2, 3 and 5, but
    /// without waiting for readiness) and copies every metadata section the layout
    /// names into private memory.
    // shm[impl shm.cli.inspect]
    pub fn snapshot(&self) -> Result<Snapshot, InspectError> {
        let header = self.header()?;
        let layout = header.validate(self.len)?;
        let size = layout.total_size;
        let copy = private_file(size)?;
        // validate() checked that total_size fits this address space.
        let map = MmapRegion::map(copy, size as usize).map_err(|source| InspectError::Io {
            op: "map the private copy",
            source,
        })?;
        let region = map.region();
        let mut buf = Vec::new();
        for (offset, len) in metadata_sections(&layout) {
            buf.resize(len as usize, 0);
            read_at(&self.file, offset, &mut buf)?;
            // The sections come from the validated layout: inside total_size.
            assert!(region.copy_in(offset as usize, &buf), "section in bounds");
        }
        // The copy's header is re-read from the file: validate it again (a header that
        // changed in between is refused like any other).
        let segment = Segment::attach(ShmBacking::Mmap(Arc::new(map)))?;
        if *segment.layout() != layout {
            return Err(InspectError::Changed);
        }
        Ok(Snapshot { segment })
    }
}

/// The header's 256 bytes, copied out of the file.
#[derive(Debug)]
pub struct HeaderCopy(HeapRegion);

impl HeaderCopy {
    /// The header as the library's type (atomics over the private copy).
    pub fn get(&self) -> &SegmentHeader {
        Segment::header_of(self.0.region()).expect("the copy holds a whole header")
    }

    /// The creator's pid and whether it closed the segment, if the magic is right (a
    /// foreign file's bytes mean nothing).
    pub fn host(&self) -> Option<(u32, bool)> {
        let h = self.get();
        h.check_magic().ok()?;
        Some((
            h.host_pid.load(std::sync::atomic::Ordering::Relaxed),
            h.is_closed(),
        ))
    }

    /// Checks the magic, then readiness, then everything else against `file_len`.
    pub fn validate(&self, file_len: u64) -> Result<SegmentLayout, InspectError> {
        let h = self.get();
        h.check_magic()?;
        if !h.is_ready() {
            let ready = h.ready.load(std::sync::atomic::Ordering::Relaxed);
            return Err(InspectError::NotReady { ready });
        }
        Ok(h.validate(file_len)?)
    }
}

/// Copies `out.len()` bytes at `offset` of `file` into `out` (`pread`); a short file
/// is `Truncated`.
// shm[impl shm.cli.read-only]
fn read_at(file: &File, offset: u64, out: &mut [u8]) -> Result<(), InspectError> {
    file.read_exact_at(out, offset).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => InspectError::Truncated {
            offset,
            len: out.len() as u64,
        },
        _ => InspectError::Io {
            op: "pread",
            source: e,
        },
    })
}

/// A private copy of the header of `file`, which is `len` bytes long.
pub fn read_header(file: &File, len: u64) -> Result<HeaderCopy, InspectError> {
    if len < HEADER_SIZE as u64 {
        return Err(HeaderError::ShorterThanHeader { file_len: len }.into());
    }
    let mut bytes = [0u8; HEADER_SIZE];
    read_at(file, 0, &mut bytes)?;
    let heap = HeapRegion::new_zeroed(HEADER_SIZE).map_err(|source| InspectError::Io {
        op: "allocate",
        source,
    })?;
    assert!(
        heap.region().copy_in(0, &bytes),
        "the region holds a header"
    );
    Ok(HeaderCopy(heap))
}

/// A private copy of a segment's header and metadata, validated.
#[derive(Debug)]
pub struct Snapshot {
    segment: Segment,
}

impl Snapshot {
    /// The copy, seen through the library's segment type.
    pub fn segment(&self) -> &Segment {
        &self.segment
    }
}

/// Every byte range of metadata a report reads: header, peer table, broadcast records,
/// and in each guest area both ring headers and both directions' pool metadata. Slot
/// and broadcast data and ring descriptors are never copied.
fn metadata_sections(layout: &SegmentLayout) -> Vec<(u64, u64)> {
    let config = &layout.config;
    let mut sections = vec![
        (0, HEADER_SIZE as u64),
        (layout.peer_table_offset, layout.peer_table_len),
    ];
    if config.broadcast_slots > 0 {
        let len = u64::from(config.broadcast_slots) * BROADCAST_META_SIZE;
        sections.push((layout.broadcast_offset, len));
    }
    for index in 0..config.max_guests as usize {
        for dir in [Direction::ToGuest, Direction::ToHost] {
            sections.push((layout.ring_offset(index, dir), RING_HEADER_SIZE as u64));
            for (class, pool) in layout.pool_geometries().iter().enumerate() {
                sections.push((layout.pool_offset(index, dir, class), pool.meta_len));
            }
        }
    }
    sections
}

/// A sparse memory file of `size` bytes, private to this process.
fn private_file(size: u64) -> Result<File, InspectError> {
    let io_err = |op| move |source| InspectError::Io { op, source };
    // SAFETY: the name is a valid NUL-terminated string for the duration of the call.
    let raw = unsafe { libc::memfd_create(c"shmhub-inspect".as_ptr(), libc::MFD_CLOEXEC) };
    if raw < 0 {
        return Err(io_err("memfd_create")(io::Error::last_os_error()));
    }
    // SAFETY: the kernel just returned this descriptor to us; nothing else owns it.
    let file = File::from(unsafe { OwnedFd::from_raw_fd(raw) });
    file.set_len(size)
        .map_err(io_err("size the private copy"))?;
    Ok(file)
}
