//! `shmhub`: the operator's command for shmhub segments (`spec/12-operations.md`).
//!
//! `list`, `inspect` and `cleanup` look at segment files from outside any host or
//! guest; `list` and `inspect` never change them, and `cleanup` removes only what the
//! library itself would consider stale. `demo` runs the demo, `bench` the short
//! benchmark.

mod cleanup;
mod inspect;
mod json;
mod list;
mod probe;
mod scan;
mod snapshot;

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "shmhub",
    version,
    about = "List, inspect and clean up shmhub segments; run the demo and the benchmark"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Our segments (files named shmhub-*), their host pids and whether the hosts are
    /// alive (by their owner lock); temporary files of segments being built.
    List {
        /// Directory to look in.
        #[arg(long, default_value = shmhub::host::SEGMENT_DIR)]
        dir: PathBuf,
        /// Print one JSON document.
        #[arg(long)]
        json: bool,
    },
    /// One segment's header, peers, ring depths, slot and broadcast use. Read-only.
    Inspect {
        /// A path (anything with a '/'), or a segment name: NAME or shmhub-NAME in DIR.
        segment: String,
        /// Directory a segment name is looked up in.
        #[arg(long, default_value = shmhub::host::SEGMENT_DIR)]
        dir: PathBuf,
        /// Print one JSON document.
        #[arg(long)]
        json: bool,
    },
    /// Removes segments whose host is dead, and temporary files whose creator is; never
    /// a live host's file.
    Cleanup {
        /// Directory to clean.
        #[arg(long, default_value = shmhub::host::SEGMENT_DIR)]
        dir: PathBuf,
        /// Say what would be removed, remove nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Runs the demo: a host, guest processes, messages, a large payload, calls, a
    /// guest killed and recovered.
    Demo {
        /// A smaller run: 8 MiB payload, 200 calls, 2,500 round trips.
        #[arg(long)]
        quick: bool,
        /// Set by the demo when it starts its own guests (not for users).
        #[arg(hide = true, trailing_var_arg = true, allow_hyphen_values = true)]
        role: Vec<String>,
    },
    /// Runs the short benchmark: `shm-bench --quick ARGS`, found next to this binary.
    Bench {
        /// Passed to shm-bench after --quick (e.g. --out DIR).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Cmd::List { dir, json } => list(&dir, json),
        Cmd::Inspect { segment, dir, json } => inspect(&resolve(&segment, &dir), json),
        Cmd::Cleanup { dir, dry_run } => cleanup(&dir, dry_run),
        Cmd::Demo { quick, role } => demo(&role, quick),
        Cmd::Bench { args } => bench(&args),
    }
}

fn list(dir: &Path, json: bool) -> ExitCode {
    match list::Listing::take(dir) {
        Ok(listing) if json => print!("{}", listing.json().pretty()),
        Ok(listing) => print!("{}", listing.text()),
        Err(e) => {
            if json {
                print!("{}", list::error_json(&e).pretty());
            }
            eprintln!("shmhub list: cannot read {}: {e}", dir.display());
            return ExitCode::FAILURE;
        }
    }
    ExitCode::SUCCESS
}

/// A path when the argument has a '/', else the segment `NAME` in `dir` (or the file
/// `shmhub-NAME` exactly as `list` prints it, when that is what exists).
fn resolve(segment: &str, dir: &Path) -> PathBuf {
    if segment.contains('/') {
        return PathBuf::from(segment);
    }
    let by_name = dir.join(format!("{}{segment}", scan::SEGMENT_PREFIX));
    let as_listed = dir.join(segment);
    if !by_name.exists() && segment.starts_with(scan::SEGMENT_PREFIX) && as_listed.exists() {
        return as_listed;
    }
    by_name
}

// shm[impl shm.cli.inspect]
fn inspect(path: &Path, json: bool) -> ExitCode {
    match inspect::Report::take(path) {
        Ok(report) if json => print!("{}", report.json().pretty()),
        Ok(report) => print!("{}", report.text()),
        Err(e) => {
            if json {
                print!("{}", inspect::error_json(&e).pretty());
            }
            eprintln!("shmhub inspect: {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    }
    ExitCode::SUCCESS
}

fn cleanup(dir: &Path, dry_run: bool) -> ExitCode {
    let actions = match cleanup::cleanup(dir, dry_run) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("shmhub cleanup: cannot read {}: {e}", dir.display());
            return ExitCode::FAILURE;
        }
    };
    if actions.is_empty() {
        println!("nothing to clean up in {}", dir.display());
    }
    for a in &actions {
        println!("{}", a.line());
    }
    let failed = actions
        .iter()
        .any(|a| matches!(a.outcome, cleanup::Outcome::Failed(_)));
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn demo(role: &[String], quick: bool) -> ExitCode {
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => {
            eprintln!("shmhub demo: cannot find this executable: {e}");
            return ExitCode::FAILURE;
        }
    };
    // The demo's guests are this binary again: `shmhub demo <role>`.
    let size = if quick {
        shmhub::demo::Size::Quick
    } else {
        shmhub::demo::Size::Full
    };
    shmhub::demo::run(
        role,
        &|| {
            let mut cmd = Command::new(&exe);
            cmd.arg("demo");
            cmd
        },
        size,
    );
    ExitCode::SUCCESS
}

/// Replaces this process with `shm-bench --quick ARGS` from this binary's directory.
fn bench(args: &[String]) -> ExitCode {
    let bench = std::env::current_exe().map(|exe| exe.with_file_name("shm-bench"));
    let bench = match bench {
        Ok(b) if b.is_file() => b,
        Ok(b) => {
            eprintln!(
                "shmhub bench: {} not found. Build it next to this binary with \
                 `cargo build --release -p shm-bench` (or `cargo install --path shm-bench` \
                 if shmhub was installed), then run `shmhub bench` again.",
                b.display()
            );
            return ExitCode::FAILURE;
        }
        Err(e) => {
            eprintln!("shmhub bench: cannot find this executable: {e}");
            return ExitCode::FAILURE;
        }
    };
    let err = Command::new(&bench).arg("--quick").args(args).exec();
    eprintln!("shmhub bench: cannot run {}: {err}", bench.display());
    ExitCode::FAILURE
}
