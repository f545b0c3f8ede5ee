//! Parsing a spawn ticket in the child (`shm.spawn.child`). Everything in it comes
//! from outside the library and is validated before use.

use std::ffi::OsString;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use shm_primitives::ticket::*;
use shm_primitives::PeerId;

/// Why a spawn ticket was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TicketError {
    /// A required field is absent.
    #[error("spawn ticket lacks {0}")]
    Missing(&'static str),
    /// A field holds an invalid value.
    #[error("spawn ticket field {field} has invalid value {value:?}")]
    Invalid {
        /// The argument name.
        field: &'static str,
        /// What it held.
        value: String,
    },
    /// The doorbell descriptor is not an open socket this process may take.
    #[error("doorbell fd {fd} is unusable: {why}")]
    Doorbell {
        /// The descriptor number.
        fd: RawFd,
        /// Why.
        why: &'static str,
    },
}

/// A parsed, validated ticket.
#[derive(Debug)]
pub(crate) struct Ticket {
    pub(crate) path: PathBuf,
    pub(crate) peer: PeerId,
    pub(crate) generation: u32,
    pub(crate) doorbell_fd: RawFd,
    pub(crate) attach_timeout: Duration,
}

/// Longest attach timeout a ticket may ask for.
const MAX_ATTACH_TIMEOUT: Duration = Duration::from_secs(3600);

impl Ticket {
    pub(crate) fn from_env() -> Result<Self, TicketError> {
        Self::parse(|index| std::env::var_os(FIELDS[index].1))
    }

    pub(crate) fn from_args<I, S>(args: I) -> Result<Self, TicketError>
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        let mut values: [Option<OsString>; 5] = Default::default();
        let mut args = args.into_iter().map(Into::into);
        while let Some(arg) = args.next() {
            let text = arg.to_string_lossy();
            for (index, &(name, _)) in FIELDS.iter().enumerate() {
                if text == name {
                    values[index] = Some(args.next().ok_or(TicketError::Missing(name))?);
                } else if let Some(v) = text.strip_prefix(name).and_then(|r| r.strip_prefix('=')) {
                    values[index] = Some(v.into());
                }
            }
        }
        Self::parse(|index| values[index].take())
    }

    fn parse(mut get: impl FnMut(usize) -> Option<OsString>) -> Result<Self, TicketError> {
        let mut text = |index: usize, required: bool| -> Result<Option<String>, TicketError> {
            let name = FIELDS[index].0;
            match get(index) {
                None if required => Err(TicketError::Missing(name)),
                None => Ok(None),
                Some(v) => v.into_string().map(Some).map_err(|v| TicketError::Invalid {
                    field: name,
                    value: v.to_string_lossy().into_owned(),
                }),
            }
        };
        let invalid = |field: &'static str, value: &str| TicketError::Invalid {
            field,
            value: value.to_owned(),
        };
        let path = text(0, true)?.expect("required");
        if path.is_empty() || path.contains('\0') {
            return Err(invalid(ARG_HUB_PATH, &path));
        }
        let peer_text = text(1, true)?.expect("required");
        let peer = peer_text
            .parse::<u8>()
            .ok()
            .and_then(PeerId::new)
            .ok_or_else(|| invalid(ARG_PEER_ID, &peer_text))?;
        let gen_text = text(2, true)?.expect("required");
        let generation = gen_text
            .parse::<u32>()
            .map_err(|_| invalid(ARG_PEER_GENERATION, &gen_text))?;
        let fd_text = text(3, true)?.expect("required");
        let doorbell_fd = fd_text
            .parse::<RawFd>()
            .ok()
            .filter(|&fd| fd > 2)
            .ok_or_else(|| invalid(ARG_DOORBELL_FD, &fd_text))?;
        let attach_timeout = match text(4, false)? {
            None => Duration::from_secs(5),
            Some(t) => t
                .parse::<u64>()
                .ok()
                .map(Duration::from_millis)
                .filter(|d| *d <= MAX_ATTACH_TIMEOUT)
                .ok_or_else(|| invalid(ARG_ATTACH_TIMEOUT_MS, &t))?,
        };
        Ok(Self {
            path: path.into(),
            peer,
            generation,
            doorbell_fd,
            attach_timeout,
        })
    }

    /// Takes ownership of the inherited doorbell, once per process: it must be an open
    /// socket, and it is made close-on-exec again so our own children do not inherit
    /// it.
    pub(crate) fn take_doorbell(&self) -> Result<OwnedFd, TicketError> {
        static TAKEN: Mutex<Vec<RawFd>> = Mutex::new(Vec::new());
        let fd = self.doorbell_fd;
        let bad = |why| TicketError::Doorbell { fd, why };
        let mut taken = TAKEN.lock().unwrap_or_else(|e| e.into_inner());
        if taken.contains(&fd) {
            return Err(bad("already taken by this process"));
        }
        // SAFETY: stat is plain old data; all-zero is a valid value.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: fstat writes into a stat we own; an invalid fd fails with EBADF.
        if unsafe { libc::fstat(fd, &mut st) } != 0 {
            return Err(bad("not open"));
        }
        if st.st_mode & libc::S_IFMT != libc::S_IFSOCK {
            return Err(bad("not a socket"));
        }
        // SAFETY: fcntl(F_SETFD) on an fd we just checked is open changes only its flag.
        if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } != 0 {
            return Err(bad("fcntl failed"));
        }
        taken.push(fd);
        // SAFETY: the fd is open, is a socket, was inherited for this purpose, and the
        // TAKEN list guarantees no second OwnedFd is ever made from it here.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }
}
