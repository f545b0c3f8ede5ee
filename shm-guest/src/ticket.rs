//! Parsing a spawn ticket in the child (`shm.spawn.child`), or receiving one over a
//! Unix socket (`shm.fd.passing`). Everything in it comes from outside the library
//! and is validated before use.

use std::ffi::OsString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use shm_primitives::memfd;
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
    /// The ticket names both a segment path and a segment descriptor.
    #[error("spawn ticket names both --hub-path and --hub-fd")]
    BothHubs,
    /// The segment descriptor is not an open regular file this process may take.
    #[error("segment fd {fd} is unusable: {why}")]
    Segment {
        /// The descriptor number.
        fd: RawFd,
        /// Why.
        why: &'static str,
    },
    /// No ticket arrived on the socket within the timeout.
    #[error("no ticket arrived on the socket within {0:?}")]
    Timeout(Duration),
    /// Receiving from the socket failed (`UnexpectedEof`: it was closed).
    #[error("receiving the ticket failed: {0}")]
    Receive(io::ErrorKind),
    /// The message on the socket is not one ticket record.
    #[error("the message on the socket is not a ticket record ({len} bytes)")]
    Record {
        /// Bytes received.
        len: usize,
    },
    /// The message did not carry exactly the two descriptors of a ticket (all that
    /// arrived were closed).
    #[error("a ticket carries 2 descriptors, this message {count} (truncated: {truncated})")]
    Descriptors {
        /// Descriptors received.
        count: usize,
        /// The kernel truncated the message (it closed what did not fit).
        truncated: bool,
    },
}

/// The segment a ticket names.
#[derive(Debug)]
pub(crate) enum Hub {
    /// A segment with a path.
    Path(PathBuf),
    /// A sealed segment's descriptor, owned.
    Fd(OwnedFd),
}

/// A parsed, validated ticket.
#[derive(Debug)]
pub(crate) struct Ticket {
    /// The path, or the number of the inherited segment descriptor.
    hub: Result<PathBuf, RawFd>,
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
        let mut values: [Option<OsString>; FIELDS.len()] = Default::default();
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
        let fd_number = |field: &'static str, text: String| {
            text.parse::<RawFd>()
                .ok()
                .filter(|&fd| fd > 2)
                .ok_or_else(|| invalid(field, &text))
        };
        let hub = match (text(HUB_PATH, false)?, text(HUB_FD, false)?) {
            (Some(_), Some(_)) => return Err(TicketError::BothHubs),
            (None, None) => return Err(TicketError::Missing(ARG_HUB_PATH)),
            (Some(path), None) => {
                if path.is_empty() || path.contains('\0') {
                    return Err(invalid(ARG_HUB_PATH, &path));
                }
                Ok(path.into())
            }
            (None, Some(fd)) => Err(fd_number(ARG_HUB_FD, fd)?),
        };
        let peer_text = text(PEER_ID, true)?.expect("required");
        let peer = peer_text
            .parse::<u8>()
            .ok()
            .and_then(PeerId::new)
            .ok_or_else(|| invalid(ARG_PEER_ID, &peer_text))?;
        let gen_text = text(PEER_GENERATION, true)?.expect("required");
        let generation = gen_text
            .parse::<u32>()
            .map_err(|_| invalid(ARG_PEER_GENERATION, &gen_text))?;
        let doorbell_fd = fd_number(ARG_DOORBELL_FD, text(DOORBELL_FD, true)?.expect("required"))?;
        let attach_timeout = match text(ATTACH_TIMEOUT_MS, false)? {
            None => Duration::from_secs(5),
            Some(t) => t
                .parse::<u64>()
                .ok()
                .and_then(timeout_ms)
                .ok_or_else(|| invalid(ARG_ATTACH_TIMEOUT_MS, &t))?,
        };
        Ok(Self {
            hub,
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
        let fd = self.doorbell_fd;
        take_inherited(fd, libc::S_IFSOCK).map_err(|why| TicketError::Doorbell {
            fd,
            why: why.unwrap_or("not a socket"),
        })
    }

    /// The ticket's segment: its path, or the inherited segment descriptor, taken as
    /// the doorbell is (it must be an open regular file; its seals are checked when
    /// attaching).
    pub(crate) fn take_hub(&self) -> Result<Hub, TicketError> {
        match &self.hub {
            Ok(path) => Ok(Hub::Path(path.clone())),
            Err(fd) => {
                let fd = *fd;
                take_inherited(fd, libc::S_IFREG)
                    .map(Hub::Fd)
                    .map_err(|why| TicketError::Segment {
                        fd,
                        why: why.unwrap_or("not a regular file"),
                    })
            }
        }
    }
}

/// A ticket's attach timeout, at most one hour.
fn timeout_ms(ms: u64) -> Option<Duration> {
    Some(Duration::from_millis(ms)).filter(|d| *d <= MAX_ATTACH_TIMEOUT)
}

/// Takes ownership of an inherited descriptor, once per process: it must be open and
/// of file type `kind` (`Err(None)` when it is of another type), and it is made
/// close-on-exec again so our own children do not inherit it.
fn take_inherited(fd: RawFd, kind: libc::mode_t) -> Result<OwnedFd, Option<&'static str>> {
    static TAKEN: Mutex<Vec<RawFd>> = Mutex::new(Vec::new());
    let mut taken = TAKEN.lock().unwrap_or_else(|e| e.into_inner());
    if taken.contains(&fd) {
        return Err(Some("already taken by this process"));
    }
    // SAFETY: stat is plain old data; all-zero is a valid value.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat writes into a stat we own; an invalid fd fails with EBADF.
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return Err(Some("not open"));
    }
    if st.st_mode & libc::S_IFMT != kind {
        return Err(None);
    }
    // SAFETY: fcntl(F_SETFD) on an fd we just checked is open changes only its flag.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } != 0 {
        return Err(Some("fcntl failed"));
    }
    taken.push(fd);
    // SAFETY: the fd is open, of the expected type, was inherited for this purpose,
    // and the TAKEN list guarantees no second OwnedFd is ever made from it here.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A ticket received over a Unix socket: its fields, the segment descriptor and the
/// doorbell end.
pub(crate) struct Received {
    pub(crate) peer: PeerId,
    pub(crate) generation: u32,
    pub(crate) attach_timeout: Duration,
    pub(crate) segment: OwnedFd,
    pub(crate) doorbell: OwnedFd,
}

/// Receives one ticket message on `socket` (`shm.fd.passing`): one record, exactly
/// two descriptors (close-on-exec), nothing truncated; the record's fields are
/// validated as a rendered ticket's are, and the doorbell must be a socket. Every
/// descriptor received is closed on refusal.
pub(crate) fn receive(socket: BorrowedFd<'_>, timeout: Duration) -> Result<Received, TicketError> {
    // One byte more than a record: a longer message is seen as such.
    let mut buf = [0u8; RECORD_LEN + 1];
    let got = memfd::recv_with_fds(socket, &mut buf, timeout)
        .map_err(|e| TicketError::Receive(e.kind()))?
        .ok_or(TicketError::Timeout(timeout))?;
    if got.truncated || got.fds.len() != RECORD_FDS {
        return Err(TicketError::Descriptors {
            count: got.fds.len(),
            truncated: got.truncated,
        });
    }
    let record =
        TicketRecord::decode(&buf[..got.len]).ok_or(TicketError::Record { len: got.len })?;
    let invalid = |field: &'static str, value: u32| TicketError::Invalid {
        field,
        value: value.to_string(),
    };
    let peer = u8::try_from(record.peer_id)
        .ok()
        .and_then(PeerId::new)
        .ok_or_else(|| invalid(ARG_PEER_ID, record.peer_id))?;
    let attach_timeout = timeout_ms(u64::from(record.attach_timeout_ms))
        .ok_or_else(|| invalid(ARG_ATTACH_TIMEOUT_MS, record.attach_timeout_ms))?;
    let mut fds = got.fds.into_iter();
    let (segment, doorbell) = (fds.next().expect("two"), fds.next().expect("two"));
    // SAFETY: stat is plain old data; all-zero is a valid value.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat writes into a stat we own; the descriptor is open (owned).
    let ok = unsafe { libc::fstat(doorbell.as_raw_fd(), &mut st) } == 0;
    if !ok || st.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return Err(TicketError::Doorbell {
            fd: doorbell.as_raw_fd(),
            why: "not a socket",
        });
    }
    Ok(Received {
        peer,
        generation: record.generation,
        attach_timeout,
        segment,
        doorbell,
    })
}

#[cfg(test)]
mod tests {
    use std::ffi::OsString;
    use std::os::fd::{AsRawFd, IntoRawFd, RawFd};
    use std::os::unix::ffi::OsStringExt;
    use std::path::PathBuf;
    use std::time::Duration;

    use super::{Ticket, TicketError};

    const PATH: &str = "/dev/shm/shmhub-ticket-test";

    /// A complete ticket as arguments, among unknown ones, with `field` given `value`
    /// instead (or left out when `value` is `None`).
    fn args_with(field: &str, value: Option<&str>) -> Vec<OsString> {
        let mut out: Vec<OsString> = vec!["prog".into(), "--unrelated".into(), "x".into()];
        let complete = [
            ("--hub-path", PATH),
            ("--peer-id", "3"),
            ("--peer-generation", "9"),
            ("--doorbell-fd", "7"),
            ("--attach-timeout-ms", "1500"),
        ];
        for (name, default) in complete {
            let value = if name == field { value } else { Some(default) };
            if let Some(v) = value {
                out.push(name.into());
                out.push(v.into());
            }
        }
        out.push("--verbose".into());
        out
    }

    fn invalid(field: &'static str, value: &str) -> TicketError {
        TicketError::Invalid {
            field,
            value: value.to_owned(),
        }
    }

    // shm[verify shm.spawn.child]
    #[test]
    fn a_complete_ticket_parses_among_unknown_arguments() {
        let t = Ticket::from_args(args_with("", None)).unwrap();
        assert_eq!(t.hub, Ok(PathBuf::from(PATH)));
        assert_eq!(t.peer.get(), 3);
        assert_eq!(t.generation, 9);
        assert_eq!(t.doorbell_fd, 7);
        assert_eq!(t.attach_timeout, Duration::from_millis(1500));
        // `--name=value` works too, and the attach timeout defaults to 5 s.
        let t = Ticket::from_args([
            "--hub-path=/p",
            "--peer-id=7",
            "--peer-generation=0",
            "--doorbell-fd=3",
        ])
        .unwrap();
        assert_eq!(t.hub, Ok(PathBuf::from("/p")));
        assert_eq!(t.peer.get(), 7);
        assert_eq!(t.generation, 0);
        assert_eq!(t.doorbell_fd, 3);
        assert_eq!(t.attach_timeout, Duration::from_secs(5));
        // The edges of every range are accepted.
        for (field, value) in [
            ("--peer-id", "1"),
            ("--peer-id", "255"),
            ("--peer-generation", "4294967295"),
            ("--doorbell-fd", "3"),
            ("--attach-timeout-ms", "0"),
            ("--attach-timeout-ms", "3600000"),
        ] {
            let parsed = Ticket::from_args(args_with(field, Some(value)));
            assert!(parsed.is_ok(), "{field} {value}: {parsed:?}");
        }
        let t = Ticket::from_args(args_with("--attach-timeout-ms", Some("3600000"))).unwrap();
        assert_eq!(t.attach_timeout, Duration::from_secs(3600));
    }

    // shm[verify shm.spawn.child]
    #[test]
    fn missing_fields_are_refused_by_name() {
        for field in [
            "--hub-path",
            "--peer-id",
            "--peer-generation",
            "--doorbell-fd",
        ] {
            assert_eq!(
                Ticket::from_args(args_with(field, None)).unwrap_err(),
                TicketError::Missing(field)
            );
        }
        // A name with no value after it.
        let mut args = args_with("--peer-id", None);
        args.push("--peer-id".into());
        assert_eq!(
            Ticket::from_args(args).unwrap_err(),
            TicketError::Missing("--peer-id")
        );
        assert_eq!(
            Ticket::from_args(Vec::<OsString>::new()).unwrap_err(),
            TicketError::Missing("--hub-path")
        );
    }

    // shm[verify shm.spawn.child]
    #[test]
    fn invalid_tickets_are_refused_with_typed_errors() {
        for (field, value) in [
            ("--hub-path", ""),
            ("--hub-path", "/dev/shm/a\0b"),
            ("--peer-id", "0"),
            ("--peer-id", "256"),
            ("--peer-id", "x"),
            ("--peer-id", "-1"),
            ("--peer-id", ""),
            ("--peer-generation", "-1"),
            ("--peer-generation", "4294967296"),
            ("--peer-generation", "1.5"),
            ("--doorbell-fd", "2"),
            ("--doorbell-fd", "1"),
            ("--doorbell-fd", "0"),
            ("--doorbell-fd", "-3"),
            ("--doorbell-fd", "x"),
            ("--attach-timeout-ms", "99999999999"),
            ("--attach-timeout-ms", "3600001"),
            ("--attach-timeout-ms", "-1"),
            ("--attach-timeout-ms", "soon"),
        ] {
            assert_eq!(
                Ticket::from_args(args_with(field, Some(value))).unwrap_err(),
                invalid(field, value),
                "{field} {value:?}"
            );
        }
        // A path that is not UTF-8.
        let mut args = args_with("--hub-path", None);
        args.push("--hub-path".into());
        args.push(OsString::from_vec(b"/dev/shm/\xff".to_vec()));
        assert_eq!(
            Ticket::from_args(args).unwrap_err(),
            invalid("--hub-path", "/dev/shm/\u{fffd}")
        );
    }

    // shm[verify shm.spawn.child]
    #[test]
    fn a_ticket_names_exactly_one_of_path_and_segment_descriptor() {
        // The fd form: `--hub-fd` instead of `--hub-path`.
        let mut args = args_with("--hub-path", None);
        args.extend(["--hub-fd".into(), "11".into()]);
        let t = Ticket::from_args(args).unwrap();
        assert_eq!(t.hub, Err(11));
        // Both is refused, and so is neither (named as the path, the usual field).
        let mut both = args_with("", None);
        both.extend(["--hub-fd".into(), "11".into()]);
        assert_eq!(Ticket::from_args(both).unwrap_err(), TicketError::BothHubs);
        assert_eq!(
            Ticket::from_args(args_with("--hub-path", None)).unwrap_err(),
            TicketError::Missing("--hub-path")
        );
        for value in ["2", "0", "-1", "x", ""] {
            let mut args = args_with("--hub-path", None);
            args.extend(["--hub-fd".into(), value.into()]);
            assert_eq!(
                Ticket::from_args(args).unwrap_err(),
                invalid("--hub-fd", value),
                "{value:?}"
            );
        }
    }

    /// The descriptor flags of `fd`, -1 if it is not open.
    fn fd_flags(fd: RawFd) -> i32 {
        // SAFETY: F_GETFD on any number only queries the descriptor table.
        unsafe { libc::fcntl(fd, libc::F_GETFD) }
    }

    // All descriptor checks live in this one test: descriptor numbers and the
    // taken-once record are per process, shared by tests running in threads.
    // shm[verify shm.spawn.child]
    #[test]
    fn the_doorbell_must_be_an_open_socket_and_is_taken_once() {
        let ticket_for =
            |fd: RawFd| Ticket::from_args(args_with("--doorbell-fd", Some(&fd.to_string())));
        // A regular file: refused, and neither closed nor recorded as taken.
        let file = std::fs::File::open(std::env::current_exe().unwrap()).unwrap();
        let fd = file.into_raw_fd();
        assert_eq!(
            ticket_for(fd).unwrap().take_doorbell().unwrap_err(),
            TicketError::Doorbell {
                fd,
                why: "not a socket"
            }
        );
        assert_ne!(fd_flags(fd), -1, "the refused descriptor is still open");
        // A number nothing is open at.
        let closed = 999;
        assert_eq!(fd_flags(closed), -1);
        assert_eq!(
            ticket_for(closed).unwrap().take_doorbell().unwrap_err(),
            TicketError::Doorbell {
                fd: closed,
                why: "not open"
            }
        );
        // Put an inheritable socket at the file's number (dup2 closes the file): the
        // refusal above did not use the number up.
        let mut pair = [0; 2];
        // SAFETY: socketpair writes two new fds into the array we own.
        let rc =
            unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_STREAM, 0, pair.as_mut_ptr()) };
        assert_eq!(rc, 0);
        // SAFETY: `fd` is ours (from into_raw_fd) and `pair[0]` was just created; dup2
        // replaces the former with a copy of the latter.
        assert_eq!(unsafe { libc::dup2(pair[0], fd) }, fd);
        // SAFETY: `pair[0]` is ours and no longer used.
        unsafe { libc::close(pair[0]) };
        assert_eq!(
            fd_flags(fd) & libc::FD_CLOEXEC,
            0,
            "inheritable, as a child finds it"
        );
        let owned = ticket_for(fd).unwrap().take_doorbell().unwrap();
        assert_eq!(owned.as_raw_fd(), fd);
        assert_ne!(
            fd_flags(fd) & libc::FD_CLOEXEC,
            0,
            "close-on-exec again once taken"
        );
        // At most once per process; a refused second take leaves it open.
        assert_eq!(
            ticket_for(fd).unwrap().take_doorbell().unwrap_err(),
            TicketError::Doorbell {
                fd,
                why: "already taken by this process"
            }
        );
        assert_ne!(fd_flags(fd), -1);
        drop(owned);
        assert_eq!(
            fd_flags(fd),
            -1,
            "the taken descriptor is owned (closed on drop)"
        );
        // The segment descriptor of a sealed segment's ticket: a regular file, taken
        // the same way (its seals are checked when attaching).
        let hub_for = |fd: RawFd| {
            let mut args = args_with("--hub-path", None);
            args.extend(["--hub-fd".into(), fd.to_string().into()]);
            Ticket::from_args(args).unwrap()
        };
        assert_eq!(
            hub_for(pair[1]).take_hub().unwrap_err(),
            TicketError::Segment {
                fd: pair[1],
                why: "not a regular file"
            }
        );
        assert_ne!(
            fd_flags(pair[1]),
            -1,
            "the refused descriptor is still open"
        );
        // SAFETY: `pair[1]` is ours and no longer used.
        unsafe { libc::close(pair[1]) };
        // At a number no earlier check has taken (taken numbers stay taken), and
        // inheritable (F_DUPFD leaves close-on-exec clear), as a child finds it.
        let exe = std::fs::File::open(std::env::current_exe().unwrap()).unwrap();
        // SAFETY: F_DUPFD on our own descriptor makes a new one; no pointers.
        let file = unsafe { libc::fcntl(exe.as_raw_fd(), libc::F_DUPFD, 500) };
        assert!(file >= 500);
        drop(exe);
        assert_eq!(fd_flags(file) & libc::FD_CLOEXEC, 0);
        match hub_for(file).take_hub().unwrap() {
            super::Hub::Fd(owned) => {
                assert_eq!(owned.as_raw_fd(), file);
                assert_ne!(fd_flags(file) & libc::FD_CLOEXEC, 0, "close-on-exec again");
            }
            super::Hub::Path(p) => panic!("a path {p:?}"),
        }
        assert_eq!(fd_flags(file), -1, "owned, closed on drop");
    }
}
