//! shm-bench: shmhub round-trip latency, throughput, scaling and setup costs against
//! raw shared-memory floors, a futex floor, a Unix socket pair, pipes and iceoryx2,
//! host and guest in separate processes.
//!
//! The harness is a library so that other binaries (the operator CLI) can run it.
//! Every measurement runs against a child that re-executes the *current* binary with
//! its role in the environment, so such a binary must call [`child_main`] first
//! thing in `main` and exit with its result when it returns `Some`:
//!
//! ```no_run
//! use clap::Parser;
//!
//! fn main() {
//!     if let Some(served) = shm_bench::child_main() {
//!         std::process::exit(i32::from(served.is_err()));
//!     }
//!     let args = shm_bench::Args::parse();
//!     let report = shm_bench::run(&args).expect("bench");
//!     print!("{}", report.markdown());
//! }
//! ```

#![warn(missing_docs)]

mod child;
#[cfg(feature = "iceoryx2")]
mod iox2;
mod machine;
mod measure;
mod plot;
mod raw;
mod report;
mod scaling;
mod setup;
mod shmhub_bench;
mod streams;
mod targets;

use std::path::PathBuf;
use std::time::Instant;

pub use machine::Machine;
pub use measure::Stats;
pub use report::{Report, Row, Throughput};
pub use scaling::Scale;
pub use setup::{SegmentRss, SetupCost};
pub use targets::Target;

/// Every fallible step of the bench.
pub type BenchResult<T> = Result<T, Box<dyn std::error::Error>>;

/// Command-line options (also usable as a clap subcommand's arguments).
#[derive(Debug, Clone, clap::Parser)]
#[command(
    about = "Benchmarks shmhub against raw shared memory, futex, socketpair, pipes and iceoryx2"
)]
pub struct Args {
    /// Reduced set (under a minute): fewer samples, sizes 8 B, 4 KiB, 1 MiB and
    /// 16 MiB, scaling up to 16 guests.
    #[arg(long)]
    pub quick: bool,
    /// Directory for bench.md, bench.json and roundtrip.svg.
    #[arg(long, default_value = "target/shm-bench")]
    pub out: PathBuf,
}

/// If this process is a bench child (a re-execution of the current binary by
/// [`run`]), serves its role and returns how that went; `None` otherwise.
pub fn child_main() -> Option<BenchResult<()>> {
    child::role().map(|role| child::run(&role))
}

/// The iceoryx2 version in the run, when built with the `iceoryx2` feature.
pub fn iceoryx2_version() -> Option<&'static str> {
    #[cfg(feature = "iceoryx2")]
    return Some(iox2::VERSION);
    #[cfg(not(feature = "iceoryx2"))]
    None
}

/// Runs every measurement, writes `bench.md`, `bench.json` and `roundtrip.svg` into
/// `args.out`, and returns the report. Progress goes to stderr. The calling thread
/// is pinned to CPU 0 while it runs (children to CPU 1) and unpinned afterwards.
pub fn run(args: &Args) -> BenchResult<Report> {
    let started = Instant::now();
    let load_before = machine::loadavg();
    let saved = machine::SavedAffinity::save()?;
    // Parent on CPU 0, each child on CPU 1 (children pin themselves at start).
    let pinning = if machine::cpu_count() >= 2 {
        machine::pin_to(0)?;
        Some((0, 1))
    } else {
        None
    };
    let measured = measure_all(args.quick, pinning);
    saved.restore()?;
    let mut report = measured?;
    report.load = (load_before, machine::loadavg());
    report.secs = started.elapsed().as_secs_f64();
    std::fs::create_dir_all(&args.out)?;
    std::fs::write(args.out.join("bench.md"), report.markdown())?;
    std::fs::write(args.out.join("bench.json"), report.json())?;
    std::fs::write(args.out.join("roundtrip.svg"), plot::svg(&report))?;
    eprintln!(
        "shm-bench: done in {:.1} s; wrote bench.md, bench.json and roundtrip.svg to {}",
        report.secs,
        args.out.display()
    );
    Ok(report)
}

/// Runs one step, telling stderr what it is and how long it took.
fn stage(name: &str, step: impl FnOnce() -> BenchResult<()>) -> BenchResult<()> {
    eprint!("shm-bench: {name}...");
    let t = Instant::now();
    let done = step();
    eprintln!(" {:.1} s", t.elapsed().as_secs_f64());
    done
}

fn measure_all(quick: bool, pinning: Option<(usize, usize)>) -> BenchResult<Report> {
    let plan = measure::Plan { quick };
    let child_cpu = pinning.map(|(_, c)| c);
    let mut report = Report {
        machine: Machine::detect(pinning),
        quick,
        load: Default::default(),
        secs: 0.0,
        rows: Vec::new(),
        tputs: Vec::new(),
        scaling: Vec::new(),
        setup: Vec::new(),
        rss: Vec::new(),
    };
    let r = &mut report;
    // First, while this process is fresh: freed memory of later steps would hide
    // growth.
    stage("segment RSS", || setup::rss(&mut r.rss))?;
    stage("raw floors", || raw::run(plan, child_cpu, &mut r.rows))?;
    stage("raw SPSC ring", || {
        raw::run_ring(plan, child_cpu, &mut r.tputs)
    })?;
    stage("socketpair and pipe", || {
        streams::run(plan, child_cpu, &mut r.rows, &mut r.tputs)
    })?;
    #[cfg(feature = "iceoryx2")]
    stage(&format!("iceoryx2 {}", iox2::VERSION), || {
        iox2::run(plan, child_cpu, &mut r.rows)
    })?;
    stage("shmhub", || {
        shmhub_bench::run(plan, child_cpu, &mut r.rows, &mut r.tputs)
    })?;
    stage("attach and spawn", || {
        setup::attach(plan, child_cpu, &mut r.setup)
    })?;
    stage("scaling", || scaling::run(plan, &mut r.scaling))?;
    Ok(report)
}
