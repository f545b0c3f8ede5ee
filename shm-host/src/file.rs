//! Building a segment file and installing it at its public path.

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use shm_primitives::lock::{self, HOST_LOCK_BYTE};

use crate::CreateError;

/// Directory segments live in by convention.
pub const SEGMENT_DIR: &str = "/dev/shm";
/// File-name prefix of every segment made by [`segment_path`].
pub const SEGMENT_PREFIX: &str = "shmhub-";

/// The conventional path of the segment called `name`: `/dev/shm/shmhub-<name>`.
/// `name` must be non-empty, must not start with '.', and must not contain '/' or NUL.
// shm[impl shm.file.path]
pub fn segment_path(name: &str) -> Result<PathBuf, CreateError> {
    let bad = name.is_empty() || name.starts_with('.') || name.contains(['/', '\0']);
    if bad {
        return Err(CreateError::InvalidPath(PathBuf::from(name)));
    }
    Ok(Path::new(SEGMENT_DIR).join(format!("{SEGMENT_PREFIX}{name}")))
}

/// Mode of every segment file: owner read/write only.
pub const SEGMENT_MODE: u32 = 0o600;

/// Wraps an OS error with what was being done.
pub(crate) fn io_err(op: &'static str) -> impl FnOnce(io::Error) -> CreateError {
    move |source| CreateError::Io { op, source }
}

/// A freshly created file under a temporary name in the target directory; removed on
/// drop unless [`install`](TempSegment::install) moved it into place.
pub struct TempSegment {
    path: PathBuf,
    file: Option<File>,
}

impl TempSegment {
    /// Creates `.<name>.<pid>.<random>.tmp` next to `target` with O_CREAT|O_EXCL and
    /// mode 0600, takes the owner's exclusive lock on it, sizes it and reserves its
    /// space so a full tmpfs fails here and never as a SIGBUS later.
    // shm[impl shm.file.create]
    // shm[impl shm.file.permissions]
    pub fn create(target: &Path, size: u64) -> Result<Self, CreateError> {
        let name = target
            .file_name()
            .ok_or_else(|| CreateError::InvalidPath(target.to_path_buf()))?;
        let dir = target
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let [r, _] = shm_primitives::random_u64x2();
        let mut tmp_name = OsString::from(".");
        tmp_name.push(name);
        tmp_name.push(format!(".{}.{r:016x}.tmp", std::process::id()));
        let path = dir.join(tmp_name);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(SEGMENT_MODE)
            .custom_flags(libc::O_CLOEXEC)
            .open(&path)
            .map_err(io_err("create temporary segment file"))?;
        let tmp = Self {
            path,
            file: Some(file),
        };
        let file = tmp.file();
        // The umask can only narrow the mode given at open; set it exactly anyway.
        file.set_permissions(std::fs::Permissions::from_mode(SEGMENT_MODE))
            .map_err(io_err("fchmod"))?;
        // shm[impl shm.live.host-lock]
        if !lock::try_lock(file, HOST_LOCK_BYTE).map_err(io_err("lock segment"))? {
            return Err(io_err("lock segment")(io::ErrorKind::WouldBlock.into()));
        }
        file.set_len(size).map_err(io_err("ftruncate"))?;
        reserve(file, size)?;
        Ok(tmp)
    }

    /// The open file.
    pub fn file(&self) -> &File {
        self.file.as_ref().expect("present until install")
    }

    /// Moves the (fully built and published) file to `target`. A file already at
    /// `target` is replaced only if no live host holds its lock; the check and the
    /// replacement happen under that lock so two hosts can never both win.
    // shm[impl shm.file.create]
    // shm[impl shm.file.stale]
    pub fn install(mut self, target: &Path) -> Result<File, CreateError> {
        for _ in 0..64 {
            // Read-write: a write lock needs a writable descriptor.
            match OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_CLOEXEC)
                .open(target)
            {
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    // link() fails if someone else installed first: no silent replace.
                    match std::fs::hard_link(&self.path, target) {
                        Ok(()) => {
                            let _ = std::fs::remove_file(&self.path);
                            return Ok(self.file.take().expect("present"));
                        }
                        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                        Err(e) => return Err(io_err("link segment into place")(e)),
                    }
                }
                Err(e) => return Err(io_err("open existing segment")(e)),
                Ok(old) => {
                    let dead = lock::try_lock(&old, HOST_LOCK_BYTE)
                        .map_err(io_err("lock existing segment"))?;
                    if !dead {
                        return Err(CreateError::InUse(target.to_path_buf()));
                    }
                    // We hold the old owner's lock: it is dead. Replace it only if the
                    // path still names the inode we locked.
                    let locked = old.metadata().map_err(io_err("fstat"))?;
                    match std::fs::metadata(target) {
                        Ok(now) if now.dev() == locked.dev() && now.ino() == locked.ino() => {
                            std::fs::rename(&self.path, target)
                                .map_err(io_err("rename segment into place"))?;
                            return Ok(self.file.take().expect("present"));
                        }
                        _ => continue,
                    }
                }
            }
        }
        Err(CreateError::InUse(target.to_path_buf()))
    }
}

impl Drop for TempSegment {
    fn drop(&mut self) {
        if self.file.is_some() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Reserves `size` bytes of backing store so later page faults cannot fail.
// shm[impl shm.file.reserve-space]
pub(crate) fn reserve(file: &File, size: u64) -> Result<(), CreateError> {
    let len = libc::off_t::try_from(size).map_err(|_| CreateError::NoSpace { size })?;
    // SAFETY: posix_fallocate on a valid fd has no memory effects.
    let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len) };
    match rc {
        0 => Ok(()),
        libc::ENOSPC | libc::EFBIG => Err(CreateError::NoSpace { size }),
        // Filesystems without fallocate: the size is set, pages are allocated on touch.
        libc::EOPNOTSUPP | libc::EINVAL => Ok(()),
        e => Err(CreateError::Io {
            op: "posix_fallocate",
            source: io::Error::from_raw_os_error(e),
        }),
    }
}

/// The public file of a live segment, removed when the host drops it.
#[derive(Debug)]
pub struct InstalledPath {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl InstalledPath {
    /// Records `path` as naming the inode of `file`.
    pub fn new(path: PathBuf, file: &File) -> io::Result<Self> {
        let m = file.metadata()?;
        Ok(Self {
            path,
            dev: m.dev(),
            ino: m.ino(),
        })
    }

    /// The path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for InstalledPath {
    // shm[impl shm.file.cleanup]
    fn drop(&mut self) {
        // Remove the path only while it still names our inode.
        if let Ok(m) = std::fs::metadata(&self.path) {
            if m.dev() == self.dev && m.ino() == self.ino {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}
