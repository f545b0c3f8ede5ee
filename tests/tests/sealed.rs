//! Sealed segments: a segment in a sealed memory file, handed to guests by descriptor
//! (inherited with a spawn ticket, or in one message on a Unix socket). A guest can no
//! longer truncate the segment under its host, which a guest of a path segment can.

use std::collections::BTreeSet;
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::ExitStatusExt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use shm_guest::{
    AttachError, AttachOptions, DetachedError, HeaderError, RecvError, ShmGuest, TicketError,
};
use shm_host::{Death, GuestOptions, Meta, PeerState, SegmentConfig, ShmHost, SpawnError};
use shm_primitives::memfd::{self, SEGMENT_SEALS};
use shm_primitives::ticket::TicketRecord;
use shmhub_tests::{
    arg, hear, open_fds, pattern, poll_until, role, role_command, tell, watchdog, Proc, ShmPath,
    Talk, LENGTHS,
};

const REPORT: u32 = 1;
const ECHO: u32 = 2;

/// Held by the parent side of every test here: they count this process's
/// descriptors, which `cargo test` (one process, tests in threads) would otherwise
/// share between them. Under nextest each test has its own process anyway.
fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// How many of this process's descriptors are memory files named `name`.
fn memfds_named(name: &str) -> usize {
    let want = format!("/memfd:{name} (deleted)");
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|target| target.to_str() == Some(&want))
        .count()
}

/// The descriptor flags (`F_GETFD`) of `fd`, `None` if it is not open.
fn fd_flags(fd: RawFd) -> Option<i32> {
    // SAFETY: F_GETFD on any number only queries the descriptor table.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    (flags != -1).then_some(flags)
}

/// Descriptors of this process that any exec'd child inherits whatever the library
/// does (not close-on-exec).
fn inheritable_fds() -> BTreeSet<i32> {
    open_fds()
        .into_iter()
        .filter(|&fd| fd_flags(fd).is_some_and(|f| f & libc::FD_CLOEXEC == 0))
        .collect()
}

/// `errno` of a libc call that returned -1, or "ok".
fn outcome(rc: libc::c_int) -> String {
    if rc == 0 {
        return "ok".to_string();
    }
    match std::io::Error::last_os_error().raw_os_error() {
        Some(libc::EPERM) => "EPERM".to_string(),
        Some(e) => format!("errno{e}"),
        None => "error".to_string(),
    }
}

/// A `key=value` field of a child's report.
fn field<'a>(report: &'a str, key: &str) -> &'a str {
    report
        .split(' ')
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
        .unwrap_or_else(|| panic!("report {report:?} lacks {key}"))
}

fn record_deaths(host: &mut ShmHost) -> Arc<Mutex<Vec<Death>>> {
    let deaths = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&deaths);
    host.on_death(move |d| sink.lock().unwrap().push(*d));
    deaths
}

/// Echoes every message back to its sender until `stop` says so.
fn echo_until(host: &mut ShmHost, limit: Duration, mut stop: impl FnMut(&Vec<u8>) -> bool) {
    let mut buf = Vec::new();
    poll_until(limit, "the guest's messages", || {
        let msg = host.recv(&mut buf, Duration::from_millis(20)).unwrap()?;
        host.send(
            msg.handle(),
            Meta::new(ECHO, msg.meta.user_id),
            &buf,
            Duration::from_secs(5),
        )
        .unwrap();
        stop(&buf).then_some(())
    });
}

/// A guest's side of an echo exchange over every length class.
fn echo_round_trips(guest: &mut ShmGuest, seed: u64) {
    let mut buf = Vec::new();
    for (n, len) in LENGTHS.into_iter().enumerate() {
        let payload = pattern(seed, n as u64, len);
        guest
            .send(
                Meta::new(REPORT, n as u64),
                &payload,
                Duration::from_secs(10),
            )
            .unwrap();
        let meta = guest
            .recv(&mut buf, Duration::from_secs(10))
            .unwrap()
            .expect("an echo");
        assert_eq!(meta, Meta::new(ECHO, n as u64));
        assert_eq!(buf, payload);
    }
}

// shm[verify shm.file.seals]
// shm[verify shm.file.memfd]
// shm[verify shm.spawn.ticket]
// shm[verify shm.spawn.inherit]
// shm[verify shm.spawn.child]
// shm[verify shm.fd.passing]
// shm[verify shm.file.attach-fd]
#[test]
fn a_guest_cannot_truncate_a_sealed_segment_and_the_host_keeps_serving() {
    const TEST: &str = "a_guest_cannot_truncate_a_sealed_segment_and_the_host_keeps_serving";
    match role().as_deref() {
        Some("hostile") => {
            watchdog();
            let born_with = open_fds();
            let mut guest = ShmGuest::from_env().unwrap();
            let fd: RawFd = arg("SHMHUB_HUB_FD").parse().unwrap();
            let cloexec = fd_flags(fd).is_some_and(|f| f & libc::FD_CLOEXEC != 0);
            let size_of = || {
                // SAFETY: stat is plain old data; fstat writes one into our local.
                unsafe {
                    let mut st: libc::stat = std::mem::zeroed();
                    assert_eq!(libc::fstat(fd, &mut st), 0);
                    st.st_size
                }
            };
            let size = size_of();
            // Punching a hole is allowed: it writes zeros, which any guest can do.
            // Over the last page, which no entry of this segment uses.
            let last = size - 4096;
            // SAFETY: pwrite, fallocate and pread use local buffers of the given
            // lengths on an open descriptor.
            let (punch, zeros) = unsafe {
                let ones = [0xA5u8; 4096];
                assert_eq!(libc::pwrite(fd, ones.as_ptr().cast(), 4096, last), 4096);
                let punch = outcome(libc::fallocate(
                    fd,
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    last,
                    4096,
                ));
                let mut back = [1u8; 4096];
                assert_eq!(libc::pread(fd, back.as_mut_ptr().cast(), 4096, last), 4096);
                (punch, back.iter().all(|&b| b == 0))
            };
            // Every way to change the size or the seals; the truncation to 0 last, so
            // that if it worked the file would stay empty under the host.
            // SAFETY: ftruncate, fallocate and fcntl take no pointers; `fd` is open.
            let (seal, grow, allocate, shrink) = unsafe {
                (
                    outcome(libc::fcntl(
                        fd,
                        libc::F_ADD_SEALS,
                        libc::F_SEAL_FUTURE_WRITE,
                    )),
                    outcome(libc::ftruncate(fd, size * 2)),
                    outcome(libc::fallocate(fd, 0, size, 4096)),
                    outcome(libc::ftruncate(fd, 0)),
                )
            };
            let size_after = size_of();
            let fds: Vec<String> = born_with.iter().map(i32::to_string).collect();
            let report = format!(
                "shrink={shrink} grow={grow} allocate={allocate} seal={seal} punch={punch} \
                 zeros={zeros} size={size} size_after={size_after} hub_fd={fd} \
                 doorbell={} cloexec={cloexec} fds={}",
                guest.doorbell().as_raw_fd(),
                fds.join(","),
            );
            tell(&format!("attacked {report}"));
            // Still attached, still served.
            echo_round_trips(&mut guest, 1);
            guest.detach();
            tell("done");
        }
        Some("honest") => {
            watchdog();
            let stream = UnixStream::connect(arg("SOCKET")).unwrap();
            let mut guest = ShmGuest::from_ticket_socket(&stream, Duration::from_secs(10)).unwrap();
            drop(stream);
            tell(&format!("attached {}", guest.peer_id().get()));
            echo_round_trips(&mut guest, 2);
            tell("served");
            // Stay attached until killed.
            hear();
        }
        _ => {
            let _serial = serial();
            let inheritable = inheritable_fds();
            let mut host = ShmHost::create_sealed(SegmentConfig::default()).unwrap();
            assert!(host.is_sealed());
            assert_eq!(host.path(), None);
            let deaths = record_deaths(&mut host);
            let size = SegmentConfig::default().layout().unwrap().total_size;

            // The hostile guest: spawned, with the segment in its ticket.
            let limit = Duration::from_secs(60);
            let mut cmd = role_command(TEST, "hostile", &[], limit);
            let mut hostile_talk = Talk::wire(&mut cmd, "hostile", limit);
            host.spawn(&mut cmd).unwrap();
            drop(cmd);
            let report = hostile_talk.expect("attacked");
            // The host touches the segment (every peer entry) before anything else is
            // checked: had the truncation worked, this is where it would take SIGBUS.
            for _ in 0..10 {
                host.maintain();
            }
            for attack in ["shrink", "grow", "allocate", "seal"] {
                assert_eq!(field(&report, attack), "EPERM", "{attack}: {report}");
            }
            assert_eq!(field(&report, "punch"), "ok");
            assert_eq!(field(&report, "zeros"), "true");
            assert_eq!(field(&report, "size"), size.to_string());
            assert_eq!(field(&report, "size_after"), size.to_string());
            assert_eq!(
                field(&report, "cloexec"),
                "true",
                "taken: close-on-exec again"
            );
            // The child inherited exactly stdio, its doorbell and its segment
            // descriptor.
            let born_with: BTreeSet<i32> = field(&report, "fds")
                .split(',')
                .map(|fd| fd.parse().unwrap())
                .collect();
            let mut expected: BTreeSet<i32> = [0, 1, 2].into();
            expected.extend(&inheritable);
            expected.insert(field(&report, "hub_fd").parse().unwrap());
            expected.insert(field(&report, "doorbell").parse().unwrap());
            assert_eq!(born_with, expected);
            // The host serves it, touching every page it reads: no SIGBUS.
            let mut echoed = 0;
            echo_until(&mut host, Duration::from_secs(20), |_| {
                echoed += 1;
                echoed == LENGTHS.len()
            });
            hostile_talk.expect("done");

            // An honest guest attaches after the attacks, by a ticket sent over a Unix
            // socket, and is served.
            let dir = tempfile::tempdir().unwrap();
            let socket = dir.path().join("s");
            let listener = UnixListener::bind(&socket).unwrap();
            let mut honest = Proc::spawn(
                TEST,
                "honest",
                &[("SOCKET", socket.display().to_string())],
                limit,
            );
            let (stream, _) = listener.accept().unwrap();
            let handle = host.hand_over(&stream, GuestOptions::default()).unwrap();
            drop(stream);
            assert_eq!(honest.expect("attached"), handle.id.get().to_string());
            let mut echoed = 0;
            echo_until(&mut host, Duration::from_secs(20), |_| {
                echoed += 1;
                echoed == LENGTHS.len()
            });
            honest.expect("served");
            assert!(deaths.lock().unwrap().is_empty());

            // The honest guest dies: found and recovered on a sealed segment too.
            let status = honest.kill();
            assert_eq!(status.signal(), Some(libc::SIGKILL));
            let mut buf = Vec::new();
            let death = poll_until(Duration::from_secs(10), "the guest's death", || {
                host.recv(&mut buf, Duration::from_millis(10)).unwrap();
                deaths.lock().unwrap().first().copied()
            });
            assert_eq!((death.peer, death.attached), (handle.id, true));
            let info = host.peer_info(handle.id).unwrap();
            assert_eq!(info.state, Some(PeerState::Empty));
        }
    }
}

/// Path segments have no such defence: a guest that truncates the file makes its host
/// take SIGBUS on its next touch (`shm.file.attach`, known risk). The host runs in a
/// child so that the signal kills it and not the test.
#[test]
fn a_guest_that_truncates_a_path_segment_kills_its_host_with_sigbus() {
    const TEST: &str = "a_guest_that_truncates_a_path_segment_kills_its_host_with_sigbus";
    match role().as_deref() {
        Some("path-host") => {
            watchdog();
            let mut host = ShmHost::create(arg("SEGMENT"), SegmentConfig::default()).unwrap();
            tell("ready");
            assert_eq!(hear(), "go");
            let mut buf = Vec::new();
            for _ in 0..100 {
                host.try_recv(&mut buf).unwrap();
            }
            tell("survived");
            hear();
        }
        Some("truncator") => {
            watchdog();
            let path = arg("SEGMENT");
            let guest = ShmGuest::attach_path(&path).unwrap();
            let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
            file.set_len(0).unwrap();
            // Touch nothing of the mapping from here on (not even the goodbye).
            std::mem::forget(guest);
            tell("truncated");
        }
        _ => {
            let seg = ShmPath::new("sigbus");
            let env = [("SEGMENT", seg.path().display().to_string())];
            let limit = Duration::from_secs(30);
            let mut host = Proc::spawn(TEST, "path-host", &env, limit);
            host.expect("ready");
            let mut truncator = Proc::spawn(TEST, "truncator", &env, limit);
            truncator.expect("truncated");
            truncator.assert_success();
            assert_eq!(std::fs::metadata(seg.path()).unwrap().len(), 0);
            host.say("go");
            let status = host.wait();
            assert_eq!(status.signal(), Some(libc::SIGBUS), "host: {status}");
            // `seg` removes the file the dead host left.
        }
    }
}

// shm[verify shm.file.memfd]
// shm[verify shm.file.permissions]
// shm[verify shm.file.attach-fd]
// shm[verify shm.fd.passing]
// shm[verify shm.live.guest-lock]
#[test]
fn a_sealed_segment_has_no_name_and_its_descriptors_close_with_host_and_guests() {
    const NAME: &str = "shmhub-segment";
    let _serial = serial();
    let before = open_fds();
    let before_memfds = memfds_named(NAME);
    let config = SegmentConfig::default();
    let mut host = ShmHost::create_sealed(config).unwrap();
    let deaths = record_deaths(&mut host);
    assert_eq!(memfds_named(NAME), before_memfds + 1);

    let fd = host.segment_fd().unwrap();
    assert_ne!(fd_flags(fd.as_raw_fd()).unwrap() & libc::FD_CLOEXEC, 0);
    assert_eq!(memfd::seals(fd.as_fd()).unwrap(), SEGMENT_SEALS);
    let file = File::from(fd);
    let meta = file.metadata().unwrap();
    assert_eq!(meta.nlink(), 0, "no name in any filesystem");
    assert_eq!(meta.permissions().mode() & 0o7777, 0o600);
    assert_eq!(meta.len(), config.layout().unwrap().total_size);
    // A description of its own: it sees the host's lock on byte 0.
    assert!(shm_primitives::lock::is_locked_by_other(&file, 0).unwrap());
    assert_eq!(memfds_named(NAME), before_memfds + 2);

    let mut guest = ShmGuest::attach_fd(OwnedFd::from(file), AttachOptions::default()).unwrap();
    assert_eq!(memfds_named(NAME), before_memfds + 2, "the guest owns it");
    // The host tests the guest's entry lock through its own description: a guest
    // that shared the host's would look dead here.
    host.set_liveness_interval(Duration::from_millis(1));
    let until = Instant::now() + Duration::from_millis(50);
    while Instant::now() < until {
        host.maintain();
    }
    assert!(deaths.lock().unwrap().is_empty());
    guest
        .try_send(Meta::new(REPORT, 1), &pattern(3, 1, 3000))
        .unwrap();
    let mut buf = Vec::new();
    let msg = poll_until(Duration::from_secs(5), "the message", || {
        host.try_recv(&mut buf).unwrap()
    });
    assert_eq!(msg.from, guest.peer_id());
    assert_eq!(buf, pattern(3, 1, 3000));

    guest.detach();
    assert_eq!(memfds_named(NAME), before_memfds + 1, "closed on detach");
    host.maintain();
    drop(host);
    assert_eq!(memfds_named(NAME), before_memfds, "closed with the host");
    assert_eq!(open_fds(), before, "nothing else left open");
    assert!(deaths.lock().unwrap().is_empty());

    // Only a sealed segment hands out descriptors.
    let heap = ShmHost::create_heap(config).unwrap();
    assert!(matches!(heap.segment_fd(), Err(SpawnError::NotSealed)));
}

/// A segment planted by hand in a memory file of `len` bytes with `seals`: with
/// `header`, the published header of a default segment (whatever `len` is), the
/// host's lock and a doorbell listener, as a host holds them.
struct PlantedMemfd {
    /// A description of its own, as a host hands out.
    fd: OwnedFd,
    _host: File,
    _listener: Option<OwnedFd>,
}

fn plant_memfd(len: u64, seals: libc::c_int, header: bool) -> PlantedMemfd {
    // SAFETY: the name is a valid NUL-terminated string.
    let raw = unsafe {
        libc::memfd_create(
            c"shmhub-t-planted".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    assert!(raw >= 0);
    // SAFETY: just returned to us; nobody else owns it.
    let file = File::from(unsafe { OwnedFd::from_raw_fd(raw) });
    assert!(shm_primitives::lock::try_lock(&file, 0).unwrap());
    file.set_len(len).unwrap();
    let listener = header.then(|| {
        // Build the header on the heap (every other byte of a fresh segment is
        // zero), published, and write it into the file.
        let config = SegmentConfig::default();
        let total = config.layout().unwrap().total_size as usize;
        let heap = shm_primitives::HeapRegion::new_zeroed(total).unwrap();
        let id = shm_primitives::random_u64x2();
        let seg = shm_primitives::Segment::init(
            shm_primitives::ShmBacking::Heap(Arc::new(heap)),
            config,
            id,
            std::process::id(),
        )
        .unwrap();
        seg.publish();
        let mut bytes = Vec::new();
        assert!(seg.backing().region().copy_out_to_vec(0, 256, &mut bytes));
        file.write_all_at(&bytes, 0).unwrap();
        shm_primitives::doorbell::listen(id).unwrap()
    });
    if seals != 0 {
        // SAFETY: fcntl(F_ADD_SEALS) takes an integer argument.
        let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) };
        assert_eq!(rc, 0);
    }
    PlantedMemfd {
        fd: memfd::reopen(file.as_fd()).unwrap(),
        _host: file,
        _listener: listener,
    }
}

fn attach_quick(fd: OwnedFd) -> Result<ShmGuest, AttachError> {
    ShmGuest::attach_fd(
        fd,
        AttachOptions {
            timeout: Duration::from_millis(200),
            ..AttachOptions::default()
        },
    )
}

// shm[verify shm.file.attach-fd]
#[test]
fn attaching_by_descriptor_requires_all_three_seals_and_checks_the_size() {
    let total = SegmentConfig::default().layout().unwrap().total_size;
    // A complete, published segment, but not sealed, or sealed only in part.
    for seals in [
        0,
        libc::F_SEAL_SHRINK | libc::F_SEAL_GROW,
        libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL,
        libc::F_SEAL_GROW | libc::F_SEAL_SEAL,
    ] {
        let planted = plant_memfd(total, seals, true);
        match attach_quick(planted.fd) {
            Err(AttachError::NotSealed { seals: found }) => assert_eq!(found, seals),
            other => panic!("seals {seals:#x}: {other:?}"),
        }
    }
    // A regular file cannot carry seals at all.
    let file = tempfile::tempfile().unwrap();
    file.set_len(total).unwrap();
    match attach_quick(file.into()) {
        Err(AttachError::NotSealed { seals: 0 }) => {}
        other => panic!("regular file: {other:?}"),
    }
    // Sealed, but shorter than a header, or shorter than its header says.
    let planted = plant_memfd(100, SEGMENT_SEALS, false);
    match attach_quick(planted.fd) {
        Err(AttachError::Header(HeaderError::ShorterThanHeader { file_len: 100 })) => {}
        other => panic!("short file: {other:?}"),
    }
    let planted = plant_memfd(total - 4096, SEGMENT_SEALS, true);
    match attach_quick(planted.fd) {
        Err(AttachError::Header(_)) => {}
        other => panic!("file shorter than its header says: {other:?}"),
    }
    // The control: all three seals, right size.
    let planted = plant_memfd(total, SEGMENT_SEALS, true);
    let guest = attach_quick(planted.fd).unwrap();
    drop(guest);
}

/// Sends `data` with `fds` in one message, as a (possibly broken) host would.
fn send_raw(sock: &UnixStream, data: &[u8], fds: &[&OwnedFd]) {
    let borrowed: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
    memfd::send_with_fds(sock.as_fd(), data, &borrowed).unwrap();
}

fn small_memfd() -> OwnedFd {
    // SAFETY: the name is a valid NUL-terminated string.
    let raw = unsafe { libc::memfd_create(c"shmhub-t-passing".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(raw >= 0);
    // SAFETY: just returned to us.
    unsafe { OwnedFd::from_raw_fd(raw) }
}

fn receive(sock: &UnixStream, wait: Duration) -> TicketError {
    match ShmGuest::from_ticket_socket(sock, wait) {
        Err(AttachError::Ticket(e)) => e,
        other => panic!("expected a ticket error, got {other:?}"),
    }
}

// shm[verify shm.fd.passing]
#[test]
fn a_ticket_message_is_one_record_with_exactly_two_descriptors_or_is_refused() {
    const NAME: &str = "shmhub-t-passing";
    let _serial = serial();
    let before = open_fds();
    let record = TicketRecord {
        peer_id: 1,
        generation: 0,
        attach_timeout_ms: 100,
    }
    .encode();
    let (a, b) = (small_memfd(), small_memfd());
    let (tx, rx) = UnixStream::pair().unwrap();
    let nine: Vec<OwnedFd> = (0..9).map(|_| small_memfd()).collect();
    let cases: Vec<(Vec<u8>, Vec<&OwnedFd>, TicketError)> = vec![
        (
            record.to_vec(),
            vec![&a],
            TicketError::Descriptors {
                count: 1,
                truncated: false,
            },
        ),
        (
            record.to_vec(),
            vec![&a, &b, &a],
            TicketError::Descriptors {
                count: 3,
                truncated: false,
            },
        ),
        (
            record.to_vec(),
            nine.iter().collect(),
            TicketError::Descriptors {
                count: 8,
                truncated: true,
            },
        ),
        (
            b"SHMTICKX".iter().chain(&record[8..]).copied().collect(),
            vec![&a, &b],
            TicketError::Record { len: 24 },
        ),
        (
            [&record[..], &[0]].concat(),
            vec![&a, &b],
            TicketError::Record { len: 25 },
        ),
        (
            record[..20].to_vec(),
            vec![&a, &b],
            TicketError::Record { len: 20 },
        ),
        (
            TicketRecord {
                peer_id: 0,
                generation: 0,
                attach_timeout_ms: 100,
            }
            .encode()
            .to_vec(),
            vec![&a, &b],
            TicketError::Invalid {
                field: "--peer-id",
                value: "0".into(),
            },
        ),
        (
            TicketRecord {
                peer_id: 1,
                generation: 0,
                attach_timeout_ms: 3_600_001,
            }
            .encode()
            .to_vec(),
            vec![&a, &b],
            TicketError::Invalid {
                field: "--attach-timeout-ms",
                value: "3600001".into(),
            },
        ),
        (
            record.to_vec(),
            vec![&a, &b],
            TicketError::Doorbell {
                fd: -1, // checked below: the received number
                why: "not a socket",
            },
        ),
    ];
    for (data, fds, want) in cases {
        send_raw(&tx, &data, &fds);
        let got = receive(&rx, Duration::from_secs(5));
        match (&got, &want) {
            (TicketError::Doorbell { why, .. }, TicketError::Doorbell { why: w, .. }) => {
                assert_eq!(why, w)
            }
            _ => assert_eq!(got, want, "data {data:?}"),
        }
        // Everything that arrived was closed: only our own two and nine are open.
        assert_eq!(memfds_named(NAME), 11, "after {want:?}");
        // Nothing was left on the socket to confuse the next ticket.
        let mut probe = [0u8; 1];
        rx.set_nonblocking(true).unwrap();
        assert!(std::io::Read::read(&mut &rx, &mut probe).is_err());
        rx.set_nonblocking(false).unwrap();
    }
    // Data with no descriptor at all.
    std::io::Write::write_all(&mut &tx, &record).unwrap();
    assert_eq!(
        receive(&rx, Duration::from_secs(5)),
        TicketError::Descriptors {
            count: 0,
            truncated: false
        }
    );
    // Nothing: a bounded wait. A closed socket: end of stream.
    let start = Instant::now();
    assert_eq!(
        receive(&rx, Duration::from_millis(50)),
        TicketError::Timeout(Duration::from_millis(50))
    );
    assert!(start.elapsed() >= Duration::from_millis(50));
    drop(tx);
    assert_eq!(
        receive(&rx, Duration::from_secs(5)),
        TicketError::Receive(std::io::ErrorKind::UnexpectedEof)
    );
    drop((a, b, nine, rx));
    assert_eq!(open_fds(), before);

    // A real hand-over, in one process: the guest's received descriptors are
    // close-on-exec.
    let mut host = ShmHost::create_sealed(SegmentConfig::default()).unwrap();
    let (tx, rx) = UnixStream::pair().unwrap();
    let handle = host.hand_over(&tx, GuestOptions::default()).unwrap();
    let guest = ShmGuest::from_ticket_socket(&rx, Duration::from_secs(5)).unwrap();
    assert_eq!(
        (guest.peer_id(), guest.generation()),
        (handle.id, handle.generation)
    );
    assert_ne!(
        fd_flags(guest.doorbell().as_raw_fd()).unwrap() & libc::FD_CLOEXEC,
        0
    );
    drop(guest);
    // A closed socket: the reservation is released at once, nothing is left.
    let (tx, rx) = UnixStream::pair().unwrap();
    drop(rx);
    let err = host.hand_over(&tx, GuestOptions::default()).unwrap_err();
    assert!(matches!(err, SpawnError::Io { .. }), "{err:?}");
    for id in 1..=4u8 {
        let info = host.peer_info(shm_host::PeerId::new(id).unwrap()).unwrap();
        assert_ne!(info.state, Some(PeerState::Reserved), "entry {id}");
    }
    // A path segment is not handed over by descriptor.
    let seg = ShmPath::new("handover");
    let mut path_host = ShmHost::create(seg.path(), SegmentConfig::default()).unwrap();
    assert!(matches!(
        path_host.hand_over(&tx, GuestOptions::default()),
        Err(SpawnError::NotSealed)
    ));
    let (_, ticket) = path_host.prepare_guest(GuestOptions::default()).unwrap();
    assert!(matches!(ticket.send_to(&tx), Err(SpawnError::NotSealed)));
}

// shm[verify shm.live.host-death]
// shm[verify shm.live.host-lock]
#[test]
fn a_guest_of_a_sealed_segment_sees_its_host_die() {
    const TEST: &str = "a_guest_of_a_sealed_segment_sees_its_host_die";
    if role().as_deref() == Some("sealed-host") {
        watchdog();
        let mut host = ShmHost::create_sealed(SegmentConfig::default()).unwrap();
        let listener = UnixListener::bind(arg("SOCKET")).unwrap();
        tell("listening");
        let (stream, _) = listener.accept().unwrap();
        host.hand_over(&stream, GuestOptions::default()).unwrap();
        // Serve until killed.
        let mut buf = Vec::new();
        loop {
            if let Some(msg) = host.recv(&mut buf, Duration::from_millis(20)).unwrap() {
                host.send(
                    msg.handle(),
                    Meta::new(ECHO, msg.meta.user_id),
                    &buf,
                    Duration::from_secs(5),
                )
                .unwrap();
            }
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("s");
    let env = [("SOCKET", socket.display().to_string())];
    let mut host = Proc::spawn(TEST, "sealed-host", &env, Duration::from_secs(30));
    host.expect("listening");
    let stream = UnixStream::connect(&socket).unwrap();
    let mut guest = ShmGuest::from_ticket_socket(&stream, Duration::from_secs(10)).unwrap();
    echo_round_trips(&mut guest, 4);
    host.kill();
    let mut buf = Vec::new();
    let err = poll_until(Duration::from_secs(10), "the host's death", || {
        guest.recv(&mut buf, Duration::from_millis(20)).err()
    });
    assert!(
        matches!(err, RecvError::Detached(DetachedError::HostDead(_))),
        "{err:?}"
    );
}
