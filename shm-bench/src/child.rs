//! The child side: the re-executed binary picks its role from the environment.

use crate::BenchResult;

/// Environment variable carrying the child's role.
pub const ROLE_ENV: &str = "SHM_BENCH_ROLE";
/// Environment variable carrying the CPU the child pins itself to.
pub const CPU_ENV: &str = "SHM_BENCH_CPU";

/// The role this process was started with, if it is a child.
pub fn role() -> Option<String> {
    std::env::var(ROLE_ENV).ok()
}

/// Pins to the requested CPU and serves `role`.
pub fn run(role: &str) -> BenchResult<()> {
    if let Some(cpu) = std::env::var(CPU_ENV).ok().and_then(|c| c.parse().ok()) {
        crate::machine::pin_to(cpu)?;
    }
    match role {
        "shmhub" => crate::shmhub_bench::guest(),
        "raw-spin" | "raw-futex" | "raw-buf" => crate::baselines::raw_child(role),
        "stream" => crate::baselines::stream_child(),
        other => Err(format!("unknown role {other}").into()),
    }
}
