//! Sealed segments: a segment built in an anonymous memory file, sealed so that its
//! size can never change, and handed to guests by descriptor (`shm.file.memfd`,
//! `shm.file.seals`, `shm.fd.passing`).

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;

use shm_primitives::lock::{self, HOST_LOCK_BYTE};
use shm_primitives::memfd::{self, SEGMENT_SEALS};

use crate::file::{io_err, reserve, SEGMENT_MODE};
use crate::CreateError;

/// Creates the memory file of a sealed segment: `memfd_create` (close-on-exec,
/// sealing allowed), mode 0600, the host's owner lock on byte 0, sized to `size` and
/// its space reserved. Not sealed yet: [`seal`] it once the segment is published.
// shm[impl shm.file.memfd]
// shm[impl shm.file.permissions]
pub(crate) fn create(size: u64) -> Result<File, CreateError> {
    // SAFETY: the name is a valid NUL-terminated string for the duration of the call.
    let raw = unsafe {
        libc::memfd_create(
            c"shmhub-segment".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    if raw < 0 {
        return Err(io_err("memfd_create")(std::io::Error::last_os_error()));
    }
    // SAFETY: the kernel just returned this descriptor to us; nothing else owns it.
    let file = File::from(unsafe { OwnedFd::from_raw_fd(raw) });
    // memfd_create makes the file 0777; nobody can open it by name, but a process
    // that may read our /proc/<pid>/fd could open it through there.
    file.set_permissions(std::fs::Permissions::from_mode(SEGMENT_MODE))
        .map_err(io_err("fchmod"))?;
    // shm[impl shm.live.host-lock]
    if !lock::try_lock(&file, HOST_LOCK_BYTE).map_err(io_err("lock segment"))? {
        return Err(io_err("lock segment")(
            std::io::ErrorKind::WouldBlock.into(),
        ));
    }
    file.set_len(size).map_err(io_err("ftruncate"))?;
    reserve(&file, size)?;
    Ok(file)
}

/// Seals the memory file against shrinking and growing, then against any further
/// seal, and never against writes: guests map it writable.
// shm[impl shm.file.seals]
pub(crate) fn seal(file: &File) -> Result<(), CreateError> {
    for seals in [libc::F_SEAL_SHRINK | libc::F_SEAL_GROW, libc::F_SEAL_SEAL] {
        // SAFETY: fcntl(F_ADD_SEALS) takes an integer argument, no pointers.
        if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
            return Err(io_err("seal segment")(std::io::Error::last_os_error()));
        }
    }
    debug_assert_eq!(memfd::seals(file.as_fd()).ok(), Some(SEGMENT_SEALS));
    Ok(())
}
