//! The shmhub demo (`shmhub::demo`): a host in this process, two guest processes (one
//! attaching by path, one spawned by the host with a spawn ticket), messages both
//! ways, a 64 MiB payload read in place, request/response calls from many threads,
//! round-trip latency, and a third guest SIGKILLed and recovered.
//!
//! Run: `cargo run --release -p shmhub --example demo` (or `shmhub demo` with the CLI).

use std::process::Command;

fn main() {
    let role: Vec<String> = std::env::args().skip(1).collect();
    // The demo's guests are this example again, with their role as arguments.
    let exe = std::env::current_exe().expect("the demo's own executable");
    shmhub::demo::run(&role, &|| Command::new(&exe), shmhub::demo::Size::Full);
}
