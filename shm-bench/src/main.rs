//! shm-bench: the benchmark binary (see the library's documentation).
//!
//! Run: `cargo run --release -p shm-bench -- [--quick] [--out DIR]`

use clap::Parser;

fn main() {
    if let Some(served) = shm_bench::child_main() {
        if let Err(e) = served {
            eprintln!("shm-bench child: {e}");
            std::process::exit(1);
        }
        return;
    }
    match shm_bench::run(&shm_bench::Args::parse()) {
        Ok(report) => print!("{}", report.markdown()),
        Err(e) => {
            eprintln!("shm-bench: {e}");
            std::process::exit(1);
        }
    }
}
