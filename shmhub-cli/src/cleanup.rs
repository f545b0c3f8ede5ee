//! `shmhub cleanup`: removes what dead hosts and creators left behind, deciding "dead"
//! with the library's own stale test, the owner lock (`shm.cli.cleanup`,
//! `shm.cli.cleanup-temp`).

use std::fs::File;
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use shmhub::primitives::lock::{self, HOST_LOCK_BYTE};

use crate::probe;
use crate::scan;
use crate::snapshot::read_header;

/// What happened to one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Unlinked: its host (or creator) is dead.
    Removed,
    /// `--dry-run`: it would have been unlinked.
    WouldRemove,
    /// Left alone, and why.
    Kept(String),
    /// Could not be examined or removed.
    Failed(String),
}

/// One file cleanup looked at.
#[derive(Debug)]
pub struct Action {
    /// The file.
    pub path: PathBuf,
    /// The host pid from a segment's header, or the creator pid from a temporary
    /// file's name (for the report only).
    pub pid: Option<u32>,
    /// What happened.
    pub outcome: Outcome,
}

impl Action {
    /// The line printed for it.
    pub fn line(&self) -> String {
        let pid = self.pid.map_or(String::new(), |p| format!(", pid {p}"));
        match &self.outcome {
            Outcome::Removed => format!("removed {} (dead{pid})", self.path.display()),
            Outcome::WouldRemove => {
                format!("would remove {} (dead{pid})", self.path.display())
            }
            Outcome::Kept(why) => format!("kept {}: {why}", self.path.display()),
            Outcome::Failed(why) => format!("failed {}: {why}", self.path.display()),
        }
    }
}

/// Looks at every segment and temporary file in `dir` and removes those whose host or
/// creator is dead (or, with `dry_run`, says it would).
pub fn cleanup(dir: &Path, dry_run: bool) -> io::Result<Vec<Action>> {
    let found = scan::scan(dir)?;
    let mut actions = Vec::new();
    for path in found.segments {
        let (pid, outcome) = remove_if_stale(&path, dry_run);
        actions.push(Action { path, pid, outcome });
    }
    for path in found.temps {
        let pid = scan::temp_creator_pid(&path);
        let outcome = match pid.map(|p| (p, probe::pid_exists(p))) {
            None => Outcome::Kept("no creator pid in the name".into()),
            Some((p, Some(true))) => Outcome::Kept(format!("creator pid {p} still exists")),
            Some((p, None)) => Outcome::Kept(format!("cannot tell whether pid {p} exists")),
            Some((_, Some(false))) => remove_if_stale(&path, dry_run).1,
        };
        actions.push(Action { path, pid, outcome });
    }
    Ok(actions)
}

/// The library's stale test (`shm.file.stale`): a file whose owner lock can be taken
/// belongs to no live host. The path is unlinked while the lock is held, after checking
/// that it still names the locked inode, so a host replacing the file meanwhile (which
/// must take the same lock first) can neither be raced nor have its new file removed.
// shm[impl shm.cli.cleanup]
// shm[impl shm.cli.cleanup-temp]
fn remove_if_stale(path: &Path, dry_run: bool) -> (Option<u32>, Outcome) {
    // Read-write because a write lock needs a writable descriptor; nothing is written.
    let file = match File::options()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return (None, Outcome::Kept("already gone".into()))
        }
        Err(e) => return (None, Outcome::Failed(format!("open: {e}"))),
    };
    let locked = match file.metadata() {
        Ok(m) if m.is_file() => m,
        Ok(_) => return (None, Outcome::Kept("not a regular file".into())),
        Err(e) => return (None, Outcome::Failed(format!("fstat: {e}"))),
    };
    let pid = read_header(&file, locked.len())
        .ok()
        .and_then(|h| h.host())
        .map(|(pid, _)| pid);
    match lock::try_lock(&file, HOST_LOCK_BYTE) {
        Ok(true) => {}
        Ok(false) => {
            return (
                pid,
                Outcome::Kept("host alive (its owner lock is held)".into()),
            )
        }
        Err(e) => return (pid, Outcome::Failed(format!("lock: {e}"))),
    }
    match std::fs::symlink_metadata(path) {
        Ok(now) if now.dev() == locked.dev() && now.ino() == locked.ino() => {}
        _ => {
            return (
                pid,
                Outcome::Kept("the path changed while it was examined".into()),
            )
        }
    }
    if dry_run {
        // Closing the file releases the lock at once.
        return (pid, Outcome::WouldRemove);
    }
    let outcome = match std::fs::remove_file(path) {
        Ok(()) => Outcome::Removed,
        Err(e) => Outcome::Failed(format!("unlink: {e}")),
    };
    // Only now, with the path gone, is the lock released.
    drop(file);
    (pid, outcome)
}
