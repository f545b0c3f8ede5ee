//! Finding our files in a directory: segments (`shmhub-*`, `shm.file.path`) and the
//! temporary files of segments being built (`.shmhub-*.<pid>.<random>.tmp`,
//! `shm.file.create`).

use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// File-name prefix of a segment.
pub const SEGMENT_PREFIX: &str = shmhub::host::SEGMENT_PREFIX;

/// Our regular files in a directory, each list sorted by path.
#[derive(Debug, Default)]
pub struct Found {
    /// `shmhub-*`.
    pub segments: Vec<PathBuf>,
    /// `.shmhub-*.tmp`.
    pub temps: Vec<PathBuf>,
}

/// Lists the regular files of `dir` named like segments or their temporary files.
/// Directories, symbolic links and other names are skipped.
pub fn scan(dir: &Path) -> io::Result<Found> {
    let mut found = Found::default();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        // The entry's own type: a symbolic link is not followed.
        if !entry.file_type()?.is_file() {
            continue;
        }
        let name = entry.file_name();
        let name = name.as_bytes();
        if name.starts_with(SEGMENT_PREFIX.as_bytes()) {
            found.segments.push(entry.path());
        } else if name.starts_with(format!(".{SEGMENT_PREFIX}").as_bytes())
            && name.ends_with(b".tmp")
        {
            found.temps.push(entry.path());
        }
    }
    found.segments.sort();
    found.temps.sort();
    Ok(found)
}

/// The creator pid in a temporary file's name `.<name>.<pid>.<random>.tmp`.
pub fn temp_creator_pid(path: &Path) -> Option<u32> {
    let name = path.file_name()?.to_str()?.strip_suffix(".tmp")?;
    let (rest, _random) = name.rsplit_once('.')?;
    let (_, pid) = rest.rsplit_once('.')?;
    if pid.is_empty() || !pid.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    pid.parse().ok()
}

/// What the directory entry is called without `shmhub-`, for messages.
pub fn segment_name(path: &Path) -> String {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
    let name = name.unwrap_or_default();
    name.strip_prefix(SEGMENT_PREFIX)
        .unwrap_or(&name)
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_creator_pid_comes_from_the_end_of_the_name() {
        let pid = |n: &str| temp_creator_pid(Path::new(n));
        assert_eq!(
            pid("/dev/shm/.shmhub-a.b.123.00ff00ff00ff00ff.tmp"),
            Some(123)
        );
        assert_eq!(pid(".shmhub-x.7.abc.tmp"), Some(7));
        assert_eq!(pid(".shmhub-x.-7.abc.tmp"), None);
        assert_eq!(pid(".shmhub-x.abc.tmp"), None);
        assert_eq!(pid(".shmhub-x.99999999999.abc.tmp"), None);
        assert_eq!(pid(".shmhub-x.7.abc"), None);
    }
}
