//! The `shmhub` command against real segments: a live host with guest processes, a
//! SIGKILLed host, damaged and hostile files, and the promise that looking changes
//! nothing (`spec/12-operations.md`).
//!
//! Each test runs the built binary (`CARGO_BIN_EXE_shmhub`) with a deadline. Hosts and
//! guests are this test binary again in a role (`shmhub_tests::Proc`); guests are
//! spawned by their host with tickets, die with it (`PR_SET_PDEATHSIG`), and write
//! nothing after their setup, so a segment is quiescent while the command reads it.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime};

use serde_json::Value;
use shmhub::primitives::layout::POOL_HEADER_SIZE;
use shmhub::primitives::lock::{self, HOST_LOCK_BYTE};
use shmhub::primitives::Direction;
use shmhub::{Meta, PeerId, SegmentConfig, ShmGuest, ShmHost, SlotClass, SlotClasses};
use shmhub_tests::{arg, hear, role, role_command, tell, watchdog, Proc, ShmPath};

/// How long any child (host, guest, or the command) may run.
const LIMIT: Duration = Duration::from_secs(120);

const HELLO: u32 = 1;
const GO: u32 = 2;
const DATA: u32 = 3;
const LOAD: u32 = 4;

/// The test segments: 4 entries, small rings, two classes, a two-slot broadcast pool.
fn config() -> SegmentConfig {
    SegmentConfig {
        max_guests: 4,
        ring_capacity: 8,
        classes: SlotClasses::new(&[SlotClass::new(256, 4), SlotClass::new(4096, 2)]),
        broadcast_slots: 2,
        broadcast_slot_size: 1024,
    }
}

// ----- harness ----------------------------------------------------------------------

/// What one run of the command did.
struct Run {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl Run {
    /// Asserts the command ended by itself (no signal, no panic) with `code`.
    fn expect_code(self, code: i32) -> Self {
        assert_eq!(
            self.status.signal(),
            None,
            "killed by a signal: {}",
            self.stderr
        );
        assert!(!self.stderr.contains("panicked"), "panic: {}", self.stderr);
        assert_eq!(
            self.status.code(),
            Some(code),
            "stdout: {}\nstderr: {}",
            self.stdout,
            self.stderr
        );
        self
    }

    fn ok(self) -> Self {
        self.expect_code(0)
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.stdout))
    }
}

/// Runs `exe args`, killing it if it passes [`LIMIT`].
fn run_exe(exe: &Path, args: &[&str]) -> Run {
    let mut child = Command::new(exe)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start shmhub");
    let read = |mut pipe: Box<dyn std::io::Read + Send>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = pipe.read_to_string(&mut s);
            s
        })
    };
    let out = read(Box::new(child.stdout.take().unwrap()));
    let err = read(Box::new(child.stderr.take().unwrap()));
    let deadline = Instant::now() + LIMIT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("shmhub {args:?} passed its deadline and was killed");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    Run {
        status,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}

/// Runs the built `shmhub` with `args`.
fn shmhub(args: &[&str]) -> Run {
    run_exe(Path::new(env!("CARGO_BIN_EXE_shmhub")), args)
}

/// A private directory under /dev/shm for one test's segments, so that `cleanup` and
/// `list` there see nothing of other tests. Removed with everything in it on drop.
struct TestDir(PathBuf);

impl TestDir {
    fn new(tag: &str) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let path = PathBuf::from(format!(
            "/dev/shm/shmhub-clitest-{}-{n}-{tag}.d",
            std::process::id()
        ));
        std::fs::create_dir(&path).unwrap();
        Self(path)
    }

    fn path(&self) -> &Path {
        &self.0
    }

    fn str(&self) -> &str {
        self.0.to_str().unwrap()
    }

    /// The segment `name` in this directory.
    fn seg(&self, name: &str) -> PathBuf {
        self.0.join(format!("shmhub-{name}"))
    }

    /// Names of the files in the directory, sorted.
    fn files(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(&self.0)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Every byte of a file and its modification time.
fn contents(path: &Path) -> (Vec<u8>, SystemTime, u64) {
    let meta = std::fs::metadata(path).unwrap();
    (
        std::fs::read(path).unwrap(),
        meta.modified().unwrap(),
        meta.ino(),
    )
}

// ----- roles ------------------------------------------------------------------------

/// Dispatches a child started in a role; true when this process was one.
fn child_role() -> bool {
    match role().as_deref() {
        Some("host") => host_main(),
        Some("guest") => guest_main(),
        Some(other) => panic!("unknown role {other}"),
        None => return false,
    }
    true
}

/// A host: creates `SEG`, spawns `GUESTS` guests with tickets, waits for their hellos
/// and sends each a GO, then says `ready`. On `load` it sends guest 1 an inline
/// message and one slot message per class, and broadcasts once; then it waits for
/// `quit` without calling into the library (so it writes nothing meanwhile).
fn host_main() {
    watchdog();
    let guests: u8 = arg("GUESTS").parse().unwrap();
    let mut host = ShmHost::create(arg("SEG"), config()).unwrap();
    for _ in 0..guests {
        let mut cmd = role_command(
            &arg("TEST"),
            "guest",
            &[("HOST_PID", std::process::id().to_string())],
            LIMIT,
        );
        host.spawn(&mut cmd).unwrap();
    }
    let mut buf = Vec::new();
    for _ in 0..guests {
        let m = host.recv(&mut buf, LIMIT).unwrap().expect("a hello");
        assert_eq!(m.meta.msg_type, HELLO);
    }
    for id in 1..=guests {
        host.try_send(PeerId::new(id).unwrap(), Meta::new(GO, 0), b"")
            .unwrap();
    }
    tell("ready");
    loop {
        match hear().as_str() {
            "load" => {
                let one = PeerId::new(1).unwrap();
                host.try_send(one, Meta::new(LOAD, 1), b"inline").unwrap();
                host.try_send(one, Meta::new(LOAD, 2), &[2; 200]).unwrap();
                host.try_send(one, Meta::new(LOAD, 3), &[3; 3000]).unwrap();
                let report = host.broadcast(Meta::new(LOAD, 4), &[4; 600]).unwrap();
                assert_eq!(report.delivered.len(), u32::from(guests));
                tell("loaded");
            }
            "quit" => return,
            other => panic!("host heard {other:?}"),
        }
    }
}

/// A guest: attaches with its ticket, says hello, waits for GO, sends one 100-byte
/// message (a class-0 slot) the host never receives, says `sent ID PID`, then parks
/// for good: no further call, no write. It dies with its host.
fn guest_main() {
    watchdog();
    // SAFETY: prctl(PR_SET_PDEATHSIG) only sets a flag of this process.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
    if std::os::unix::process::parent_id().to_string() != arg("HOST_PID") {
        return; // the host died before the flag was set
    }
    let mut guest = ShmGuest::from_env().unwrap();
    guest.try_send(Meta::new(HELLO, 0), b"hi").unwrap();
    let mut buf = Vec::new();
    let go = guest.recv(&mut buf, LIMIT).unwrap().expect("GO");
    assert_eq!(go.msg_type, GO);
    guest.try_send(Meta::new(DATA, 0), &[9; 100]).unwrap();
    tell(&format!(
        "sent {} {}",
        guest.peer_id().get(),
        std::process::id()
    ));
    loop {
        std::thread::park();
    }
}

/// A host process (see [`host_main`]) with its guests set up: the host, and each
/// guest's pid by peer id.
fn start_host(test: &str, seg: &Path, guests: u8) -> (Proc, BTreeMap<u64, u64>) {
    let envs = [
        ("SEG", seg.display().to_string()),
        ("GUESTS", guests.to_string()),
        ("TEST", test.to_string()),
    ];
    let mut host = Proc::spawn(test, "host", &envs, LIMIT);
    let mut ready = false;
    let mut pids = BTreeMap::new();
    // The guests speak through the host's stdout, in any order with its own line.
    while !ready || pids.len() < usize::from(guests) {
        let line = host.expect_line();
        match line.split_whitespace().collect::<Vec<_>>()[..] {
            ["ready"] => ready = true,
            ["sent", id, pid] => {
                pids.insert(id.parse().unwrap(), pid.parse().unwrap());
            }
            _ => panic!("unexpected line {line:?}"),
        }
    }
    (host, pids)
}

/// The entry of `list --json` for `path`.
fn listed<'a>(list: &'a Value, path: &Path) -> &'a Value {
    list["segments"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["path"] == path.display().to_string())
        .unwrap_or_else(|| panic!("{} not listed in {list}", path.display()))
}

/// The columns of peer `id`'s row in the text report of `inspect`.
fn peer_row(text: &str, id: u8) -> Vec<&str> {
    let peers = text.split("\nslots ").next().unwrap();
    peers
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|cols| cols.first() == Some(&id.to_string().as_str()))
        .unwrap_or_else(|| panic!("no row for peer {id} in {text}"))
}

fn counts(v: &Value) -> [u64; 5] {
    ["free", "loaned", "sent", "received", "invalid"].map(|k| v[k].as_u64().unwrap())
}

// ----- tests ------------------------------------------------------------------------

const LIVE: &str = "a_live_host_and_its_guests_are_listed_and_inspected";

// shm[verify shm.cli.list]
// shm[verify shm.cli.host-alive]
// shm[verify shm.cli.inspect]
// shm[verify shm.cli.inspect-json]
#[test]
fn a_live_host_and_its_guests_are_listed_and_inspected() {
    if child_role() {
        return;
    }
    // In /dev/shm itself: the command's defaults, and whatever else is there.
    let seg = ShmPath::new("cli-live");
    let (mut host, pids) = start_host(LIVE, seg.path(), 2);
    host.say("load");
    host.expect("loaded");
    let host_pid = u64::from(host.pid());
    let name = seg.path().file_name().unwrap().to_str().unwrap();
    let name = name.strip_prefix("shmhub-").unwrap();

    let list = shmhub(&["list", "--json"]).ok().json();
    assert_eq!(list["format"], 1);
    let entry = listed(&list, seg.path());
    assert_eq!(entry["name"], name);
    assert_eq!(entry["liveness"], "alive");
    assert_eq!(entry["lock_held"], true);
    assert_eq!(entry["host_pid"], host_pid);
    assert_eq!(entry["process_exists"], true);
    assert_eq!(entry["attached"], 2);
    assert_eq!(entry["max_guests"], 4);
    assert_eq!(entry["total_size"], config().layout().unwrap().total_size);
    assert_eq!(entry["error"], Value::Null);
    let text = shmhub(&["list"]).ok().stdout;
    let row = text
        .lines()
        .find(|l| l.starts_with(&seg.path().display().to_string()))
        .expect("listed");
    let cols: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(
        cols[1..5],
        ["alive", &host_pid.to_string(), "exists", "2/4"]
    );

    // By name, as a user types it.
    let doc = shmhub(&["inspect", name, "--json"]).ok().json();
    assert_eq!(doc["format"], 1);
    let h = &doc["header"];
    assert_eq!(
        h["magic"],
        format!("{:#x}", shmhub::primitives::header::MAGIC)
    );
    assert_eq!(h["version"], u64::from(shmhub::primitives::header::VERSION));
    let id = h["segment_id"].as_str().unwrap();
    assert!(id.starts_with("0x") && id.len() == 34, "{id}");
    assert_eq!(h["max_guests"], 4);
    assert_eq!(h["ring_capacity"], 8);
    assert_eq!(
        h["classes"],
        serde_json::json!([{"slot_size": 256, "count": 4}, {"slot_size": 4096, "count": 2}])
    );
    assert_eq!(
        (&h["broadcast_slots"], &h["broadcast_slot_size"]),
        (&2.into(), &1024.into())
    );
    assert_eq!(
        (&h["host_pid"], &h["ready"], &h["closed"]),
        (&host_pid.into(), &1.into(), &false.into())
    );
    assert_eq!(
        doc["host"],
        serde_json::json!({"pid": host_pid, "process_exists": true, "lock_held": true, "liveness": "alive"})
    );
    let peers = doc["peers"].as_array().unwrap();
    assert_eq!(peers.len(), 4);
    for (i, p) in peers.iter().enumerate() {
        let id = i as u64 + 1;
        assert_eq!(p["id"], id);
        assert_eq!(p["fault"], 0);
        assert_eq!(p["generation"], 0);
        match pids.get(&id) {
            Some(&pid) => {
                assert_eq!(
                    (&p["state"], &p["pid"], &p["lock_held"]),
                    (&"Attached".into(), &pid.into(), &true.into())
                );
                // GO consumed; guest 1 has 3 messages and the broadcast waiting, guest
                // 2 the broadcast; each sent one DATA the host never received.
                let waiting = if id == 1 { 4 } else { 1 };
                assert_eq!(p["rings"]["to_guest"]["depth"], waiting);
                assert_eq!(p["rings"]["to_host"]["depth"], 1);
                assert_eq!(p["rings"]["to_host"]["capacity"], 8);
                let to_guest = &p["slots"]["to_guest"];
                let sent = u64::from(id == 1);
                assert_eq!(counts(&to_guest[0]), [4 - sent, 0, sent, 0, 0]);
                assert_eq!(counts(&to_guest[1]), [2 - sent, 0, sent, 0, 0]);
                assert_eq!(counts(&p["slots"]["to_host"][0]), [3, 0, 1, 0, 0]);
                assert_eq!(counts(&p["slots"]["to_host"][1]), [2, 0, 0, 0, 0]);
            }
            None => {
                assert_eq!(
                    (&p["state"], &p["pid"], &p["lock_held"]),
                    (&"Empty".into(), &0.into(), &false.into())
                );
                assert_eq!(p["rings"]["to_guest"]["depth"], 0);
            }
        }
    }
    let slots = &doc["slots"];
    assert_eq!(counts(&slots[0]["to_guest"]), [15, 0, 1, 0, 0]);
    assert_eq!(counts(&slots[0]["to_host"]), [14, 0, 2, 0, 0]);
    assert_eq!(counts(&slots[1]["to_guest"]), [7, 0, 1, 0, 0]);
    let b = &doc["broadcast"];
    assert_eq!(
        (&b["free"], &b["sent"], &b["invalid"]),
        (&1.into(), &1.into(), &0.into())
    );
    let busy = &b["busy"][0];
    assert_eq!(busy["state"], "Sent");
    assert_eq!(busy["holders"], serde_json::json!([1, 2]));

    let text = shmhub(&["inspect", seg.path().to_str().unwrap()])
        .ok()
        .stdout;
    assert!(
        text.contains(&format!(
            "host: alive (owner lock held), pid {host_pid} (process exists)"
        )),
        "{text}"
    );
    let cols: Vec<&str> = peer_row(&text, 1);
    assert_eq!(
        cols,
        [
            "1",
            "Attached",
            "0",
            &pids[&1].to_string(),
            "held",
            "-",
            "4/8",
            "1/8",
            "2/1"
        ]
    );
    assert!(text.contains("1 sent, 0 invalid"), "{text}");

    host.say("quit");
    host.assert_success();
    assert!(!seg.path().exists(), "the host removed its file");
}

const KILLED: &str = "a_killed_hosts_file_is_dead_and_cleanup_removes_only_it";

// shm[verify shm.cli.cleanup]
// shm[verify shm.cli.cleanup-temp]
// shm[verify shm.cli.host-alive]
// shm[verify shm.cli.list]
#[test]
fn a_killed_hosts_file_is_dead_and_cleanup_removes_only_it() {
    if child_role() {
        return;
    }
    let dir = TestDir::new("killed");
    let (live, dead) = (dir.seg("live"), dir.seg("dead"));
    let (mut live_host, _) = start_host(KILLED, &live, 1);
    let (mut dead_host, dead_pids) = start_host(KILLED, &dead, 1);
    let dead_pid = dead_host.pid();
    assert_eq!(dead_host.kill().signal(), Some(libc::SIGKILL));
    assert!(dead.exists(), "a killed host leaves its file");

    // Temporary files of segments being built: a dead creator's (no lock), a live
    // creator's (ours, before it took its lock), and a dead pid's whose lock is held.
    let tmp_dead = dir.path().join(format!(".shmhub-t1.{dead_pid}.00aa.tmp"));
    let tmp_live_pid = dir
        .path()
        .join(format!(".shmhub-t2.{}.00bb.tmp", std::process::id()));
    let tmp_locked = dir.path().join(format!(".shmhub-t3.{dead_pid}.00cc.tmp"));
    for t in [&tmp_dead, &tmp_live_pid, &tmp_locked] {
        std::fs::write(t, b"").unwrap();
    }
    let holder = File::options()
        .read(true)
        .write(true)
        .open(&tmp_locked)
        .unwrap();
    assert!(lock::try_lock(&holder, HOST_LOCK_BYTE).unwrap());

    let list = shmhub(&["list", "--dir", dir.str(), "--json"]).ok().json();
    let d = listed(&list, &dead);
    assert_eq!(
        (
            &d["liveness"],
            &d["lock_held"],
            &d["host_pid"],
            &d["process_exists"]
        ),
        (
            &"dead".into(),
            &false.into(),
            &dead_pid.into(),
            &false.into()
        )
    );
    assert_eq!(d["error"], Value::Null, "the file itself is intact");
    assert_eq!(listed(&list, &live)["liveness"], "alive");
    let temps = list["temporary"].as_array().unwrap();
    assert_eq!(temps.len(), 3);
    assert_eq!(temps[0]["creator_pid"], dead_pid);
    assert_eq!(temps[0]["process_exists"], false);
    assert_eq!(temps[0]["lock_held"], false);
    assert_eq!(temps[1]["process_exists"], true);
    assert_eq!(temps[2]["lock_held"], true);
    let text = shmhub(&["list", "--dir", dir.str()]).ok().stdout;
    assert!(text.contains("under construction"), "{text}");

    // The dead host's segment can still be read.
    let doc = shmhub(&["inspect", dead.to_str().unwrap(), "--json"])
        .ok()
        .json();
    assert_eq!(doc["host"]["liveness"], "dead");
    assert_eq!(doc["peers"][0]["state"], "Attached");
    assert_eq!(doc["peers"][0]["pid"], dead_pids[&1]);

    let before = dir.files();
    let dry = shmhub(&["cleanup", "--dir", dir.str(), "--dry-run"])
        .ok()
        .stdout;
    assert_eq!(dir.files(), before, "a dry run removes nothing");
    let expect_lines = |out: &str, removed: &str| {
        let lines: Vec<&str> = out.lines().collect();
        let line_for = |p: &Path| {
            let p = p.display().to_string();
            *lines
                .iter()
                .find(|l| l.contains(&format!(" {p}")))
                .unwrap_or_else(|| panic!("no line for {p} in {out}"))
        };
        assert!(line_for(&dead).starts_with(removed), "{out}");
        assert!(line_for(&tmp_dead).starts_with(removed), "{out}");
        assert!(line_for(&live).starts_with("kept"), "{out}");
        assert!(line_for(&live).contains("host alive"), "{out}");
        assert!(line_for(&tmp_live_pid).contains("still exists"), "{out}");
        assert!(
            line_for(&tmp_locked).contains("owner lock is held"),
            "{out}"
        );
        assert_eq!(lines.len(), 5, "{out}");
    };
    expect_lines(&dry, "would remove");

    let out = shmhub(&["cleanup", "--dir", dir.str()]).ok().stdout;
    expect_lines(&out, "removed");
    assert!(!dead.exists() && !tmp_dead.exists());
    assert!(live.exists() && tmp_live_pid.exists() && tmp_locked.exists());

    // The live host was not disturbed: a guest attaches to it by path.
    let guest = ShmGuest::attach_path(&live).unwrap();
    assert_eq!(guest.peer_id().get(), 2);
    drop(guest);
    live_host.say("quit");
    live_host.assert_success();
    assert!(!live.exists());
    let again = shmhub(&["cleanup", "--dir", dir.str()]).ok().stdout;
    assert!(!again.contains("removed"), "{again}");
}

const READ_ONLY: &str = "looking_at_segments_changes_no_byte_and_no_time";

// shm[verify shm.cli.read-only]
#[test]
fn looking_at_segments_changes_no_byte_and_no_time() {
    if child_role() {
        return;
    }
    let dir = TestDir::new("readonly");
    let (live, dead) = (dir.seg("live"), dir.seg("dead"));
    let (mut live_host, _) = start_host(READ_ONLY, &live, 2);
    live_host.say("load");
    live_host.expect("loaded");
    let (mut dead_host, _) = start_host(READ_ONLY, &dead, 1);
    dead_host.kill();
    let before = [contents(&live), contents(&dead)];
    assert!(before[0].0.iter().any(|&b| b != 0), "a segment in use");

    for path in [&live, &dead] {
        let path = path.to_str().unwrap();
        shmhub(&["inspect", path]).ok();
        shmhub(&["inspect", path, "--json"]).ok();
    }
    shmhub(&["list", "--dir", dir.str()]).ok();
    shmhub(&["list", "--dir", dir.str(), "--json"]).ok();

    let after = [contents(&live), contents(&dead)];
    for (b, a) in before.iter().zip(&after) {
        assert!(b.0 == a.0, "bytes changed");
        assert_eq!((b.1, b.2), (a.1, a.2), "mtime or inode changed");
    }
    // No lock was left behind: the live host still holds its own, the dead one none.
    let open = |p: &Path| File::open(p).unwrap();
    assert!(lock::is_locked_by_other(&open(&live), HOST_LOCK_BYTE).unwrap());
    assert!(!lock::is_locked_by_other(&open(&dead), HOST_LOCK_BYTE).unwrap());
    live_host.say("quit");
    live_host.assert_success();
}

/// A segment file made by a real host, as bytes (its host then dropped).
fn real_segment_bytes(dir: &TestDir) -> (Vec<u8>, shmhub::primitives::SegmentLayout) {
    let path = dir.seg("model");
    let host = ShmHost::create(&path, config()).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    drop(host);
    (bytes, config().layout().unwrap())
}

fn put_u32(bytes: &mut [u8], at: u64, v: u32) {
    bytes[at as usize..at as usize + 4].copy_from_slice(&v.to_le_bytes());
}

fn put_u64(bytes: &mut [u8], at: u64, v: u64) {
    bytes[at as usize..at as usize + 8].copy_from_slice(&v.to_le_bytes());
}

// shm[verify shm.cli.inspect]
// shm[verify shm.cli.inspect-json]
#[test]
fn damaged_files_are_typed_errors_and_hostile_values_are_shown_as_invalid() {
    let dir = TestDir::new("damaged");
    let (model, layout) = real_segment_bytes(&dir);
    let mut garbage = vec![0u8; 65536];
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    for b in &mut garbage {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    let edit = |f: &dyn Fn(&mut Vec<u8>)| {
        let mut b = model.clone();
        f(&mut b);
        b
    };
    // (name, contents, error kind, a fragment of the message)
    let cases: Vec<(&str, Vec<u8>, &str, &str)> = vec![
        (
            "empty",
            vec![],
            "ShorterThanHeader",
            "shorter than the 256-byte header",
        ),
        (
            "short",
            model[..100].to_vec(),
            "ShorterThanHeader",
            "file is 100 bytes",
        ),
        ("garbage", garbage, "BadMagic", "bad magic"),
        ("magic", edit(&|b| b[0] ^= 1), "BadMagic", "bad magic"),
        (
            "notready",
            edit(&|b| put_u32(b, 116, 0)),
            "NotReady",
            "ready = 0",
        ),
        (
            "version",
            edit(&|b| put_u32(b, 8, 99)),
            "UnsupportedVersion",
            "version 99",
        ),
        (
            "truncated",
            model[..8192].to_vec(),
            "FileTooShort",
            "file is 8192 bytes but the header says",
        ),
        (
            "limits",
            edit(&|b| put_u32(b, 56, 0)),
            "Limits",
            "invalid limits",
        ),
        (
            "stride",
            edit(&|b| put_u64(b, 104, layout.guest_area_stride + 4096)),
            "LayoutMismatch",
            "guest_area_stride",
        ),
        (
            "section",
            edit(&|b| put_u64(b, 72, u64::MAX - 8)),
            "SectionOutOfBounds",
            "peer_table",
        ),
    ];
    for (name, bytes, kind, message) in &cases {
        std::fs::write(dir.seg(name), bytes).unwrap();
        let path = dir.seg(name);
        let path = path.to_str().unwrap();
        let text = shmhub(&["inspect", path]).expect_code(1);
        assert!(text.stderr.contains(message), "{name}: {}", text.stderr);
        let doc = shmhub(&["inspect", path, "--json"]).expect_code(1).json();
        assert_eq!(doc["format"], 1);
        assert_eq!(doc["error"]["kind"], *kind, "{name}: {doc}");
    }
    // `list` shows each with its error, and the liveness the lock gives: none.
    let list = shmhub(&["list", "--dir", dir.str(), "--json"]).ok().json();
    for (name, _, kind, _) in &cases {
        let entry = listed(&list, &dir.seg(name));
        assert_eq!(entry["error"]["kind"], *kind, "{name}");
        assert_eq!(entry["liveness"], "dead", "{name}");
    }

    let missing = dir.path().join("no-such-dir");
    let gone = shmhub(&["list", "--dir", missing.to_str().unwrap(), "--json"]).expect_code(1);
    assert_eq!(gone.json()["error"]["kind"], "Io");

    // A valid header over hostile guest-writable values: reported, never trusted.
    let peer = layout.peer_offset(0);
    let to_guest = layout.ring_offset(0, Direction::ToGuest);
    let to_host = layout.ring_offset(0, Direction::ToHost);
    let words = layout.pool_offset(0, Direction::ToGuest, 0) + POOL_HEADER_SIZE;
    let hostile = edit(&|b| {
        put_u64(b, peer, (5 << 32) | 7); // no such state
        put_u32(b, peer + 8, 1234);
        put_u32(b, peer + 12, 6); // SlotIndex
        put_u64(b, to_guest + 64, 10); // head past tail
        put_u64(b, to_guest, 3);
        put_u64(b, to_host, u64::MAX - 1); // tail - head wraps far past the capacity (MAX would be one behind head 0: an empty ring)
        put_u64(b, words, 9); // no such slot state
        put_u64(b, words + 8, (3 << 32) | 1); // Loaned(3)
        put_u64(b, layout.broadcast_offset, 3); // Received: not a broadcast state
        put_u32(b, layout.broadcast_offset + 8, 5); // reserved: shown nowhere
        put_u64(b, layout.broadcast_offset + 16, 0b101);
        // Released (Sent, no holder bit that names a guest): free, not busy.
        put_u64(b, layout.broadcast_offset + 64, (4 << 32) | 2);
        put_u64(b, layout.broadcast_offset + 128, (4 << 32) | 2);
        put_u64(b, layout.broadcast_offset + 128 + 16 + 24, 1 << 63);
        put_u64(b, layout.peer_offset(1), 42); // entry 2: no such state either
    });
    let path = dir.seg("hostile");
    std::fs::write(&path, &hostile).unwrap();
    let doc = shmhub(&["inspect", path.to_str().unwrap(), "--json"])
        .ok()
        .json();
    let p = &doc["peers"][0];
    assert_eq!(p["state"], "invalid");
    assert_eq!(p["state_word"], "0x500000007");
    assert_eq!(p["generation"], 5);
    assert_eq!((&p["pid"], &p["fault"]), (&1234.into(), &6.into()));
    assert_eq!(
        (&p["fault_name"], &p["fault_rule"]),
        (&"SlotIndex".into(), &"shm.msg.slot".into())
    );
    assert_eq!(p["rings"]["to_guest"]["depth"], Value::Null);
    assert_eq!(p["rings"]["to_guest"]["head"], "0xa");
    assert_eq!(p["rings"]["to_host"]["depth"], Value::Null);
    assert_eq!(counts(&p["slots"]["to_guest"][0]), [2, 1, 0, 0, 1]);
    assert_eq!(doc["peers"][1]["state"], "invalid");
    let busy = &doc["broadcast"]["busy"][0];
    assert_eq!(
        (&busy["state"], &busy["holders"]),
        (&"invalid".into(), &serde_json::json!([1, 3]))
    );
    let b = &doc["broadcast"];
    assert_eq!(
        b["busy"].as_array().unwrap().len(),
        1,
        "released slots are not busy"
    );
    let slots = u64::from(layout.config.broadcast_slots);
    assert_eq!((&b["free"], &b["sent"]), (&(slots - 1).into(), &0.into()));
    let text = shmhub(&["inspect", path.to_str().unwrap()]).ok().stdout;
    let cols = peer_row(&text, 1);
    assert_eq!(
        cols,
        [
            "1",
            "0x500000007",
            "5",
            "1234",
            "free",
            "SlotIndex",
            "invalid",
            "invalid",
            "2/0"
        ],
        "{text}"
    );
}

// The demo, through the CLI, end to end (its guests are `shmhub demo <role>`).
#[test]
fn the_demo_runs_from_the_cli() {
    let run = shmhub(&["demo", "--quick"]).ok();
    for line in [
        "(attached by path)",
        "(attached by spawn ticket)",
        "hashed in place by the guest",
        "calls from 8 threads",
        "noticed and recovered",
        "segment removed; nothing left in /dev/shm",
    ] {
        assert!(run.stdout.contains(line), "{line:?} in {}", run.stdout);
    }
}

#[test]
fn bench_runs_shm_bench_from_its_own_directory_or_says_how_to_build_it() {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("shmhub-cli-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let exe = dir.join("shmhub");
    if std::fs::hard_link(env!("CARGO_BIN_EXE_shmhub"), &exe).is_err() {
        std::fs::copy(env!("CARGO_BIN_EXE_shmhub"), &exe).unwrap();
    }
    let missing = run_exe(&exe, &["bench"]).expect_code(1);
    assert!(
        missing
            .stderr
            .contains("cargo build --release -p shm-bench"),
        "{}",
        missing.stderr
    );
    // A stand-in shm-bench that shows its arguments and exits with its own status.
    let fake = dir.join("shm-bench");
    std::fs::write(&fake, "#!/bin/sh\necho \"args: $*\"\nexit 3\n").unwrap();
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let ran = run_exe(&exe, &["bench", "--out", "x y", "--json"]).expect_code(3);
    assert_eq!(ran.stdout, "args: --quick --out x y --json\n");
    std::fs::remove_dir_all(&dir).unwrap();
}
