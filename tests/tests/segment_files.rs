//! Creating, attaching to and cleaning up segment files; planted bad files.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use shm_guest::{AttachError, AttachOptions, HeaderError, ShmGuest};
use shm_host::{CreateError, Meta, SegmentConfig, ShmHost, SlotClasses};
use shmhub_tests::{arg, hear, plant_segment, poll_until, role, tell, Proc, ShmPath};

fn attach_quick(path: &std::path::Path) -> Result<ShmGuest, AttachError> {
    ShmGuest::attach_path_with(
        path,
        AttachOptions {
            timeout: Duration::from_millis(300),
            ..AttachOptions::default()
        },
    )
}

// shm[verify shm.header.segment-id]
#[test]
fn every_segment_gets_a_fresh_random_id() {
    let a = ShmHost::create_heap(SegmentConfig::default())
        .unwrap()
        .segment_id();
    let seg = ShmPath::new("id");
    let host = ShmHost::create(seg.path(), SegmentConfig::default()).unwrap();
    let b = host.segment_id();
    assert_ne!(a, b);
    assert_ne!(a, [0, 0]);
    assert_ne!(b, [0, 0]);
    assert_eq!(
        ShmGuest::attach_path(seg.path()).unwrap().segment_id(),
        b,
        "guests read it"
    );
}

// shm[verify shm.file.permissions]
// shm[verify shm.file.cleanup]
// shm[verify shm.file.path]
#[test]
fn segment_is_0600_and_removed_with_its_host() {
    let seg = ShmPath::new("mode");
    assert!(seg.path().starts_with("/dev/shm"));
    assert!(seg
        .path()
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .starts_with(shm_host::SEGMENT_PREFIX));
    for bad in ["", ".hidden", "a/b"] {
        assert!(matches!(
            shm_host::segment_path(bad),
            Err(CreateError::InvalidPath(_))
        ));
    }
    // A permissive umask must not widen the mode.
    // SAFETY: umask only changes this process's file-creation mask.
    let old = unsafe { libc::umask(0) };
    let host = ShmHost::create(seg.path(), SegmentConfig::default());
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    let host = host.unwrap();
    let meta = std::fs::metadata(seg.path()).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert_eq!(
        meta.len(),
        SegmentConfig::default().layout().unwrap().total_size
    );
    assert_eq!(host.path(), Some(seg.path()));
    drop(host);
    assert!(!seg.path().exists(), "file removed when the host drops");
}

// shm[verify shm.file.create]
// shm[verify shm.file.reserve-space]
#[test]
fn creation_leaves_no_temporary_file_and_refuses_a_full_filesystem() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("seg");
    let host = ShmHost::create(&path, SegmentConfig::default()).unwrap();
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        names,
        vec![std::ffi::OsString::from("seg")],
        "only the public file"
    );
    // The space is reserved up front (blocks allocated), not on first touch.
    let meta = std::fs::metadata(&path).unwrap();
    assert!(
        meta.blocks() * 512 >= meta.len(),
        "fallocate reserved the file"
    );
    drop(host);
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);

    // A segment larger than the filesystem's free space: a typed error, no file left.
    let huge = SegmentConfig {
        max_guests: 255,
        ring_capacity: 64,
        classes: SlotClasses::single(1 << 30, 64),
        broadcast_slots: 0,
        broadcast_slot_size: 0,
    };
    let shm = ShmPath::new("huge");
    match ShmHost::create(shm.path(), huge) {
        Err(CreateError::NoSpace { size }) => assert!(size > 1 << 40),
        Err(other) => panic!("expected NoSpace, got {other}"),
        Ok(_) => panic!("a 32 TiB segment cannot fit"),
    }
    assert!(!shm.path().exists());
    let leftovers = std::fs::read_dir("/dev/shm")
        .unwrap()
        .filter(|e| {
            let name = e.as_ref().unwrap().file_name();
            name.to_string_lossy()
                .contains(&format!("test-{}-", std::process::id()))
                && name.to_string_lossy().contains("huge")
        })
        .count();
    assert_eq!(leftovers, 0, "no temporary file left behind");
}

// shm[verify shm.attach.wait-ready]
// shm[verify shm.header.ready]
#[test]
fn an_attacher_waits_for_a_segment_still_being_built() {
    if role().as_deref() == Some("waiter") {
        let guest = ShmGuest::attach_path_with(
            arg("SEG"),
            AttachOptions {
                timeout: Duration::from_secs(30),
                ..AttachOptions::default()
            },
        )
        .unwrap();
        assert!(guest.attach_report().waited_for_ready, "it had to wait");
        assert_eq!(format!("{:?}", guest.segment_id()), arg("SEG_ID"));
        tell("attached");
        return;
    }
    let seg = ShmPath::new("ready");
    let building = plant_segment(seg.path(), SegmentConfig::default(), false);
    let mut child = Proc::spawn(
        "an_attacher_waits_for_a_segment_still_being_built",
        "waiter",
        &[
            ("SEG", seg.path().display().to_string()),
            ("SEG_ID", format!("{:?}", building.header().segment_id())),
        ],
        Duration::from_secs(60),
    );
    // The child is now asleep on the readiness word: it registered as a waiter.
    let header = building.header();
    poll_until(Duration::from_secs(30), "a registered waiter", || {
        (header.ready_waiters.load(Ordering::SeqCst) > 0).then_some(())
    });
    building.publish();
    child.expect("attached");
    child.assert_success();
}

#[test]
fn an_attacher_waits_for_the_file_to_appear() {
    if role().as_deref() == Some("early") {
        let path = arg("SEG");
        assert!(!std::path::Path::new(&path).exists());
        tell("attaching");
        let mut guest = ShmGuest::attach_path_with(
            &path,
            AttachOptions {
                timeout: Duration::from_secs(30),
                ..AttachOptions::default()
            },
        )
        .unwrap();
        guest.try_send(Meta::new(1, 1), b"hello").unwrap();
        tell("sent");
        return;
    }
    let seg = ShmPath::new("early");
    let mut child = Proc::spawn(
        "an_attacher_waits_for_the_file_to_appear",
        "early",
        &[("SEG", seg.path().display().to_string())],
        Duration::from_secs(60),
    );
    child.expect("attaching");
    let mut host = ShmHost::create(seg.path(), SegmentConfig::default()).unwrap();
    child.expect("sent");
    let mut buf = Vec::new();
    let msg = poll_until(Duration::from_secs(10), "hello", || {
        host.try_recv(&mut buf).unwrap()
    });
    assert_eq!((msg.meta.user_id, buf.as_slice()), (1, &b"hello"[..]));
    child.assert_success();
}

// shm[verify shm.attach.wait-ready]
#[test]
fn a_segment_that_never_becomes_ready_fails_in_bounded_time() {
    let seg = ShmPath::new("stuck");
    let _stuck = plant_segment(seg.path(), SegmentConfig::default(), false);
    let start = Instant::now();
    let err = attach_quick(seg.path()).unwrap_err();
    let took = start.elapsed();
    assert!(matches!(err, AttachError::NotReady(_)), "{err}");
    assert!(
        took >= Duration::from_millis(300),
        "waited the timeout: {took:?}"
    );
    assert!(took < Duration::from_secs(10), "bounded: {took:?}");
    // Nothing to wait for at a path that never appears either.
    let missing = ShmPath::new("missing");
    assert!(matches!(
        attach_quick(missing.path()),
        Err(AttachError::NotFound(_))
    ));
}

/// Plants a published segment, lets `sabotage` corrupt it, and attaches.
fn attach_planted(
    tag: &str,
    sabotage: impl FnOnce(&shm_primitives::Segment, &std::fs::File),
) -> AttachError {
    attach_planted_with(tag, Duration::from_millis(300), sabotage)
}

/// [`attach_planted`], waiting up to `timeout` for the segment to be ready.
fn attach_planted_with(
    tag: &str,
    timeout: Duration,
    sabotage: impl FnOnce(&shm_primitives::Segment, &std::fs::File),
) -> AttachError {
    let seg = ShmPath::new(tag);
    let planted = plant_segment(seg.path(), SegmentConfig::default(), true);
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(seg.path())
        .unwrap();
    sabotage(&planted, &file);
    let options = AttachOptions {
        timeout,
        ..AttachOptions::default()
    };
    ShmGuest::attach_path_with(seg.path(), options).unwrap_err()
}

// shm[verify shm.header.magic]
// shm[verify shm.header.version]
// shm[verify shm.header.features]
// shm[verify shm.header.sections]
#[test]
fn planted_bad_files_give_typed_errors() {
    let err = attach_planted("magic", |s, _| {
        s.header().magic.store(0x1234, Ordering::Relaxed)
    });
    assert!(
        matches!(
            err,
            AttachError::Header(HeaderError::BadMagic { found: 0x1234 })
        ),
        "{err}"
    );

    // A foreign file is refused at once, not after the readiness timeout (a long one,
    // so that a loaded machine's delays cannot be mistaken for the wait).
    let start = Instant::now();
    let timeout = Duration::from_secs(30);
    let err = attach_planted_with("magic-unready", timeout, |s, _| {
        s.header().ready.store(0, Ordering::Relaxed);
        s.header().magic.store(0, Ordering::Relaxed);
    });
    assert!(
        matches!(err, AttachError::Header(HeaderError::BadMagic { .. })),
        "{err}"
    );
    assert!(start.elapsed() < timeout / 3, "{:?}", start.elapsed());

    let err = attach_planted("version", |s, _| {
        s.header().version.store(99, Ordering::Relaxed)
    });
    assert!(
        matches!(
            err,
            AttachError::Header(HeaderError::UnsupportedVersion { found: 99 })
        ),
        "{err}"
    );

    let err = attach_planted("feature", |s, _| {
        s.header()
            .incompat_features
            .store(1 << 9, Ordering::Relaxed)
    });
    assert!(
        matches!(err, AttachError::Header(HeaderError::UnknownIncompatFeatures { unknown }) if unknown == 1 << 9),
        "{err}"
    );
    // Unknown *compatible* bits are ignored.
    let seg = ShmPath::new("compat");
    let planted = plant_segment(seg.path(), SegmentConfig::default(), true);
    planted
        .header()
        .compat_features
        .store(1 << 5, Ordering::Relaxed);
    attach_quick(seg.path()).unwrap();

    // The file is shorter than the header says.
    let err = attach_planted("short", |s, f| {
        f.set_len(s.layout().total_size - 4096).unwrap();
    });
    assert!(
        matches!(err, AttachError::Header(HeaderError::FileTooShort { .. })),
        "{err}"
    );

    // Shorter than a header at all.
    let err = attach_planted("tiny", |_, f| f.set_len(100).unwrap());
    assert!(
        matches!(
            err,
            AttachError::Header(HeaderError::ShorterThanHeader { file_len: 100 })
        ),
        "{err}"
    );

    // A section that runs past the end, and one whose end overflows u64.
    let err = attach_planted("section", |s, _| {
        s.header()
            .guest_areas_len
            .store(s.layout().total_size, Ordering::Relaxed)
    });
    assert!(
        matches!(
            err,
            AttachError::Header(HeaderError::SectionOutOfBounds {
                section: "guest_areas",
                ..
            })
        ),
        "{err}"
    );
    let err = attach_planted("overflow", |s, _| {
        s.header()
            .peer_table_offset
            .store(u64::MAX - 10, Ordering::Relaxed)
    });
    assert!(
        matches!(
            err,
            AttachError::Header(HeaderError::SectionOutOfBounds {
                section: "peer_table",
                ..
            })
        ),
        "{err}"
    );
    // Offsets inside the file that disagree with the limits.
    let err = attach_planted("stride", |s, _| {
        s.header().guest_area_stride.store(64, Ordering::Relaxed)
    });
    assert!(
        matches!(
            err,
            AttachError::Header(HeaderError::LayoutMismatch {
                field: "guest_area_stride",
                ..
            })
        ),
        "{err}"
    );
    // Limits out of range.
    let err = attach_planted("limits", |s, _| {
        s.header().ring_capacity.store(3, Ordering::Relaxed)
    });
    assert!(
        matches!(err, AttachError::Header(HeaderError::Limits(_))),
        "{err}"
    );
}

// shm[verify shm.file.create]
// shm[verify shm.file.stale]
#[test]
fn a_new_host_never_corrupts_an_old_segment_still_mapped() {
    match role().as_deref() {
        Some("old-host") => {
            let host = ShmHost::create(arg("SEG"), SegmentConfig::default()).unwrap();
            let [a, b] = host.segment_id();
            tell(&format!("ready {a} {b}"));
            hear(); // blocks until killed
            return;
        }
        Some("old-guest") => {
            let mut guest = ShmGuest::attach_path(arg("SEG")).unwrap();
            let id = guest.segment_id();
            let payload = shmhub_tests::pattern(1, 2, 3000);
            guest.try_send(Meta::new(5, 5), &payload).unwrap();
            tell("attached");
            assert_eq!(hear(), "check");
            // The old inode is intact: same id, the message still in its ring, and
            // every page still mapped (a truncation would SIGBUS here).
            assert_eq!(guest.segment_id(), id);
            guest.try_send(Meta::new(6, 6), &payload).unwrap();
            tell("intact");
            return;
        }
        _ => {}
    }
    let seg = ShmPath::new("stale");
    let test = "a_new_host_never_corrupts_an_old_segment_still_mapped";
    let env = [("SEG", seg.path().display().to_string())];
    let mut old_host = Proc::spawn(test, "old-host", &env, Duration::from_secs(60));
    let old_id = old_host.expect("ready");
    let mut old_guest = Proc::spawn(test, "old-guest", &env, Duration::from_secs(60));
    old_guest.expect("attached");

    // The owner is alive: refused.
    let err = ShmHost::create(seg.path(), SegmentConfig::default())
        .map(|_| ())
        .unwrap_err();
    assert!(matches!(err, CreateError::InUse(_)), "{err}");

    // The owner dies (SIGKILL: no cleanup ran); its file stays behind.
    old_host.kill();
    assert!(seg.path().exists());
    let host = ShmHost::create(seg.path(), SegmentConfig::default()).unwrap();
    let [a, b] = host.segment_id();
    assert_ne!(
        format!("{a} {b}"),
        old_id,
        "a new segment, not the old one reused"
    );

    old_guest.say("check");
    old_guest.expect("intact");
    old_guest.assert_success();
    // A new guest sees the new segment.
    let guest = ShmGuest::attach_path(seg.path()).unwrap();
    assert_eq!(guest.segment_id(), host.segment_id());
}
