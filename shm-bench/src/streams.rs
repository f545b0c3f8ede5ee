//! Kernel byte-stream baselines: a Unix `socketpair` and a pair of pipes, echoing
//! length-prefixed messages through a re-executed child (round trips, untouched and
//! touched), and the socket pair's one-way throughput.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use crate::measure::{fill, touch, Hist, Plan, Watchdog, MAX_SIZE};
use crate::raw::{finish, spawn_with_fds};
use crate::report::{Row, Throughput};
use crate::BenchResult;

/// Environment variables naming the inherited stream fds.
pub const READ_FD_ENV: &str = "SHM_BENCH_READ_FD";
/// See [`READ_FD_ENV`].
pub const WRITE_FD_ENV: &str = "SHM_BENCH_WRITE_FD";

const QUIT: u64 = u64::MAX;
const SYNC: u64 = u64::MAX - 1;
/// Header flag: count the message, do not answer.
const STREAM_FLAG: u64 = 1 << 63;
/// Header flag: read every byte, fill the reply.
const TOUCH_FLAG: u64 = 1 << 62;
const LEN_MASK: u64 = (1 << 62) - 1;

/// Two ends of a byte stream in the parent, and the fds the child gets.
struct StreamPair {
    read: File,
    write: File,
    child_read: OwnedFd,
    child_write: OwnedFd,
}

fn socket_pair() -> BenchResult<StreamPair> {
    let (a, b) = UnixStream::pair()?;
    let a: OwnedFd = a.into();
    let b: OwnedFd = b.into();
    Ok(StreamPair {
        read: File::from(a.try_clone()?),
        write: File::from(a),
        child_read: b.try_clone()?,
        child_write: b,
    })
}

fn pipes() -> BenchResult<StreamPair> {
    let mut p2c = [0; 2];
    let mut c2p = [0; 2];
    for p in [&mut p2c, &mut c2p] {
        // SAFETY: each array has room for the two fds pipe2 writes.
        if unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
            return Err(std::io::Error::last_os_error().into());
        }
    }
    // SAFETY: pipe2 returned four fresh fds, each wrapped exactly once.
    let own = |fd| unsafe { OwnedFd::from_raw_fd(fd) };
    Ok(StreamPair {
        read: File::from(own(c2p[0])),
        write: File::from(own(p2c[1])),
        child_read: own(p2c[0]),
        child_write: own(c2p[1]),
    })
}

/// Socket pair and pipe round trips (and socket pair one-way throughput).
pub fn run(
    plan: Plan,
    cpu: Option<usize>,
    rows: &mut Vec<Row>,
    tputs: &mut Vec<Throughput>,
) -> BenchResult<()> {
    for name in ["socketpair", "pipe"] {
        let pair = if name == "pipe" {
            pipes()?
        } else {
            socket_pair()?
        };
        let (r, w) = (pair.child_read.as_raw_fd(), pair.child_write.as_raw_fd());
        let child = spawn_with_fds(
            "stream",
            cpu,
            &[r, w],
            &[(READ_FD_ENV, r), (WRITE_FD_ENV, w)],
        )?;
        let StreamPair {
            read,
            write,
            child_read,
            child_write,
        } = pair;
        // Our copies of the child's ends must go, or EOF never reaches either side.
        drop((child_read, child_write));
        let mut p = Ends { read, write };
        let _watchdog = Watchdog::arm(child.id(), Duration::from_secs(300));
        let mut inbuf = vec![0u8; 8 + MAX_SIZE];
        let mut out = vec![0u8; 8 + MAX_SIZE];
        for &size in plan.sizes() {
            for touched in [false, true] {
                let head = size as u64 | if touched { TOUCH_FLAG } else { 0 };
                out[..8].copy_from_slice(&head.to_le_bytes());
                let mut h = Hist::new();
                let warm = plan.warmup(size);
                for n in 0..warm + plan.iters(size) {
                    let t = Instant::now();
                    if touched {
                        fill(&mut out[8..8 + size], n);
                    }
                    p.write.write_all(&out[..8 + size])?;
                    p.read.read_exact(&mut inbuf[..8 + size])?;
                    if touched {
                        touch(&inbuf[8..8 + size]);
                    }
                    let e = t.elapsed();
                    if n >= warm {
                        h.record(e);
                    }
                }
                rows.push(Row::new(
                    name,
                    "write/read",
                    size,
                    "block",
                    touched,
                    h.stats(),
                ));
            }
        }
        if name == "socketpair" {
            for size in [64usize, 1 << 20] {
                tputs.push(stream(&mut p, plan.stream_msgs(size), size)?);
            }
        }
        p.write.write_all(&QUIT.to_le_bytes())?;
        finish(child)?;
    }
    Ok(())
}

/// The parent's ends of a stream pair.
struct Ends {
    read: File,
    write: File,
}

/// One-way throughput: `msgs` messages of `size` bytes, then the child's count back.
fn stream(p: &mut Ends, msgs: u64, size: usize) -> BenchResult<Throughput> {
    let mut out = vec![0x5Au8; 8 + size];
    out[..8].copy_from_slice(&(size as u64 | STREAM_FLAG).to_le_bytes());
    let t = Instant::now();
    for _ in 0..msgs {
        p.write.write_all(&out)?;
    }
    p.write.write_all(&SYNC.to_le_bytes())?;
    let mut got = [0u8; 8];
    p.read.read_exact(&mut got)?;
    let secs = t.elapsed().as_secs_f64();
    if u64::from_le_bytes(got) != msgs {
        return Err("socketpair stream lost messages".into());
    }
    Ok(Throughput::new(
        "socketpair",
        "write/read",
        size,
        msgs,
        secs,
    ))
}

/// The stream child: echoes length-prefixed messages until told to quit or EOF.
pub fn child() -> BenchResult<()> {
    let r: RawFd = std::env::var(READ_FD_ENV)?.parse()?;
    let w: RawFd = std::env::var(WRITE_FD_ENV)?.parse()?;
    // SAFETY: the parent passed us these fds; each is wrapped once (for a socket
    // pair both numbers name distinct duplicates).
    let (mut rd, mut wr) = unsafe { (File::from_raw_fd(r), File::from_raw_fd(w)) };
    let mut buf = vec![0u8; 8 + MAX_SIZE];
    let mut streamed = 0u64;
    let mut n = 0u64;
    loop {
        if rd.read_exact(&mut buf[..8]).is_err() {
            return Ok(()); // the parent closed its end
        }
        let head = u64::from_le_bytes(buf[..8].try_into().expect("8 bytes"));
        match head {
            QUIT => return Ok(()),
            SYNC => {
                wr.write_all(&streamed.to_le_bytes())?;
                streamed = 0;
            }
            h => {
                let len = (h & LEN_MASK) as usize;
                if len > MAX_SIZE {
                    return Err(format!("bad length {len}").into());
                }
                rd.read_exact(&mut buf[8..8 + len])?;
                if h & STREAM_FLAG != 0 {
                    streamed += 1;
                    continue;
                }
                if h & TOUCH_FLAG != 0 {
                    n += 1;
                    touch(&buf[8..8 + len]);
                    fill(&mut buf[8..8 + len], n);
                }
                wr.write_all(&buf[..8 + len])?;
            }
        }
    }
}
