//! shm-bench: shmhub round-trip latency and throughput against raw shared-memory,
//! futex, socket pair and pipe baselines, host and guest in separate processes.
//!
//! Run: `cargo run --release -p shm-bench -- [--quick] [--out DIR]`

mod baselines;
mod child;
mod machine;
mod measure;
mod report;
mod shmhub_bench;

use std::path::PathBuf;
use std::time::Instant;

use clap::Parser;

/// Every fallible step of the bench.
pub type BenchResult<T> = Result<T, Box<dyn std::error::Error>>;

/// Command-line options.
#[derive(Debug, Parser)]
#[command(about = "Benchmarks shmhub against raw shared memory, futex, socketpair and pipes")]
struct Args {
    /// Reduced set: fewer iterations, sizes 8 B, 4 KiB, 1 MiB.
    #[arg(long)]
    quick: bool,
    /// Directory for bench.md and bench.json.
    #[arg(long, default_value = "target/shm-bench")]
    out: PathBuf,
}

fn main() {
    let result = match child::role() {
        Some(role) => child::run(&role),
        None => bench(Args::parse()),
    };
    if let Err(e) = result {
        eprintln!("shm-bench: {e}");
        std::process::exit(1);
    }
}

fn bench(args: Args) -> BenchResult<()> {
    let started = Instant::now();
    let plan = measure::Plan { quick: args.quick };
    // Parent on CPU 0, each child on CPU 1 (children pin themselves at start).
    let pinning = if machine::cpu_count() >= 2 {
        machine::pin_to(0)?;
        Some((0, 1))
    } else {
        None
    };
    let child_cpu = pinning.map(|(_, c)| c);
    let machine = machine::Machine::detect(pinning);
    let (mut rows, mut tputs) = (Vec::new(), Vec::new());

    eprintln!("shm-bench: raw baselines...");
    baselines::run_raw(plan, child_cpu, &mut rows)?;
    eprintln!("shm-bench: socketpair and pipe...");
    baselines::run_streams(plan, child_cpu, &mut rows, &mut tputs)?;
    eprintln!("shm-bench: shmhub...");
    shmhub_bench::run(plan, child_cpu, &mut rows, &mut tputs)?;

    let report = report::Report {
        machine,
        quick: args.quick,
        rows,
        tputs,
    };
    let md = report.markdown();
    print!("{md}");
    std::fs::create_dir_all(&args.out)?;
    std::fs::write(args.out.join("bench.md"), &md)?;
    std::fs::write(args.out.join("bench.json"), report.json())?;
    eprintln!(
        "shm-bench: done in {:.1} s; wrote {}/bench.md and bench.json",
        started.elapsed().as_secs_f64(),
        args.out.display()
    );
    Ok(())
}
