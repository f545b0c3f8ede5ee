//! Liveness locks: open-file-description (OFD) byte-range locks on the segment file.
//!
//! The kernel drops an OFD lock when the last descriptor of the open file description
//! closes, including when its process is SIGKILLed, and unlike classic `fcntl` locks it
//! is not lost when some other descriptor of the same file is closed. A held lock
//! therefore proves its holder alive; a free one proves it gone.

use std::fs::File;
use std::io;

/// File offset of the byte the host locks for its whole life (`shm.live.host-lock`).
pub const HOST_LOCK_BYTE: u64 = 0;

/// Takes an exclusive lock on byte `offset` without waiting; `Ok(false)` when another
/// open file description holds a conflicting lock.
pub fn try_lock(file: &File, offset: u64) -> io::Result<bool> {
    match fcntl_lock(file, libc::F_OFD_SETLK, libc::F_WRLCK, offset) {
        Ok(_) => Ok(true),
        Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EACCES)) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Releases a lock this open file description holds on byte `offset`.
pub fn unlock(file: &File, offset: u64) -> io::Result<()> {
    fcntl_lock(file, libc::F_OFD_SETLK, libc::F_UNLCK, offset).map(|_| ())
}

/// Whether another open file description holds a lock on byte `offset` (one system
/// call, nothing is taken).
pub fn is_locked_by_other(file: &File, offset: u64) -> io::Result<bool> {
    let found = fcntl_lock(file, libc::F_OFD_GETLK, libc::F_WRLCK, offset)?;
    Ok(found != libc::F_UNLCK as libc::c_short)
}

#[cfg(target_os = "linux")]
fn fcntl_lock(
    file: &File,
    cmd: libc::c_int,
    kind: libc::c_int,
    offset: u64,
) -> io::Result<libc::c_short> {
    use std::os::fd::AsRawFd;
    let start =
        libc::off_t::try_from(offset).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: flock is plain old data; all-zero is a valid value (l_pid must be 0 for
    // OFD locks).
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = start;
    fl.l_len = 1;
    // SAFETY: fcntl with an OFD lock command reads and (for GETLK) writes the flock we
    // own for the duration of the call; the fd is valid while `file` is borrowed.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), cmd, &mut fl as *mut libc::flock) };
    if rc == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(fl.l_type)
}

#[cfg(not(target_os = "linux"))]
fn fcntl_lock(
    _file: &File,
    _cmd: libc::c_int,
    _kind: libc::c_int,
    _offset: u64,
) -> io::Result<libc::c_short> {
    Err(io::Error::from(io::ErrorKind::Unsupported))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg_attr(miri, ignore = "F_OFD_SETLK locks: not in Miri")]
    fn a_lock_conflicts_across_open_file_descriptions_and_dies_with_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, [0u8; 64]).unwrap();
        let a = File::options().read(true).write(true).open(&path).unwrap();
        let b = File::options().read(true).write(true).open(&path).unwrap();
        assert!(!is_locked_by_other(&b, 3).unwrap());
        assert!(try_lock(&a, 3).unwrap());
        assert!(is_locked_by_other(&b, 3).unwrap());
        assert!(!try_lock(&b, 3).unwrap());
        assert!(try_lock(&b, 4).unwrap(), "other bytes are independent");
        // A dup of `a` shares its description: closing the dup keeps the lock.
        drop(a.try_clone().unwrap());
        assert!(is_locked_by_other(&b, 3).unwrap());
        drop(a);
        assert!(!is_locked_by_other(&b, 3).unwrap());
        unlock(&b, 4).unwrap();
    }
}
