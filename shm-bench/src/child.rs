//! The child side: the re-executed binary picks its role from the environment.

use crate::BenchResult;

/// Environment variable carrying the child's role.
pub const ROLE_ENV: &str = "SHM_BENCH_ROLE";
/// Environment variable carrying the CPU the child pins itself to, or [`ANY_CPU`].
pub const CPU_ENV: &str = "SHM_BENCH_CPU";
/// [`CPU_ENV`] value for a child that may run on every CPU (it unpins itself, since
/// it inherits the parent thread's pinning otherwise).
pub const ANY_CPU: &str = "any";

/// The role this process was started with, if it is a child.
pub fn role() -> Option<String> {
    std::env::var(ROLE_ENV).ok()
}

/// Pins to the requested CPU and serves `role`.
pub fn run(role: &str) -> BenchResult<()> {
    match std::env::var(CPU_ENV).ok().as_deref() {
        Some(ANY_CPU) => crate::machine::unpin()?,
        Some(cpu) => crate::machine::pin_to(cpu.parse()?)?,
        None => {}
    }
    match role {
        "shmhub" => crate::shmhub_bench::guest(),
        "raw-spin" | "raw-futex" | "raw-echo" => crate::raw::child(role),
        "raw-ring" => crate::raw::ring_child(),
        "stream" => crate::streams::child(),
        #[cfg(feature = "iceoryx2")]
        "iceoryx2" => crate::iox2::child(),
        "scale-guest" => crate::scaling::guest(),
        "attach-path" => crate::setup::attach_path_child(),
        "attach-ticket" => crate::setup::attach_ticket_child(),
        other => Err(format!("unknown role {other}").into()),
    }
}
