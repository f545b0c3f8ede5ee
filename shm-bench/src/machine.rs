//! What the bench ran on (CPU, SMT, VM, kernel), and pinning to a CPU.

use std::fmt::Write as _;

/// A description of the machine, for the report header.
#[derive(Debug, Clone)]
pub struct Machine {
    /// `model name` from `/proc/cpuinfo`.
    pub cpu_model: String,
    /// Online CPUs.
    pub cpus: usize,
    /// `/sys/devices/system/cpu/smt/active`, when present.
    pub smt: Option<bool>,
    /// The `hypervisor` CPU flag.
    pub vm: bool,
    /// `uname -r`.
    pub kernel: String,
    /// CPUs the parent and the child are pinned to, when pinning was possible.
    pub pinning: Option<(usize, usize)>,
}

impl Machine {
    /// Reads the machine description; `pinning` is decided by the caller.
    pub fn detect(pinning: Option<(usize, usize)>) -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .and_then(|l| l.split_once(':'))
            .map_or_else(|| "unknown".to_string(), |(_, v)| v.trim().to_string());
        let vm = cpuinfo
            .lines()
            .filter(|l| l.starts_with("flags"))
            .any(|l| l.split_whitespace().any(|f| f == "hypervisor"));
        let smt = std::fs::read_to_string("/sys/devices/system/cpu/smt/active")
            .ok()
            .map(|s| s.trim() == "1");
        Self {
            cpu_model,
            cpus: cpu_count(),
            smt,
            vm,
            kernel: kernel_release(),
            pinning,
        }
    }

    /// The header lines, as Markdown bullet points.
    pub fn markdown(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "- CPU: {}", self.cpu_model);
        let _ = writeln!(s, "- CPUs: {}", self.cpus);
        let smt = self.smt.map_or("unknown", |b| if b { "yes" } else { "no" });
        let _ = writeln!(s, "- SMT: {smt}");
        let _ = writeln!(s, "- VM: {}", if self.vm { "yes" } else { "no" });
        let _ = writeln!(s, "- Kernel: {}", self.kernel);
        let pin = self.pinning.map_or_else(
            || "none (fewer than 2 CPUs)".to_string(),
            |(p, c)| format!("parent on CPU {p}, child on CPU {c}"),
        );
        let _ = writeln!(s, "- Pinning: {pin}");
        s
    }
}

/// Online CPUs on the machine (not the calling thread's affinity mask).
pub fn cpu_count() -> usize {
    // SAFETY: sysconf has no memory-safety preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    usize::try_from(n).unwrap_or(1).max(1)
}

fn kernel_release() -> String {
    // SAFETY: utsname is plain old data; all-zero is a valid value.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: `u` is a valid, writable utsname.
    if unsafe { libc::uname(&mut u) } != 0 {
        return "unknown".into();
    }
    // SAFETY: uname NUL-terminates `release` inside the array.
    let release = unsafe { std::ffi::CStr::from_ptr(u.release.as_ptr()) };
    release.to_string_lossy().into_owned()
}

/// Pins the calling thread (and children it starts later) to one CPU.
pub fn pin_to(cpu: usize) -> std::io::Result<()> {
    // SAFETY: cpu_set_t is plain old data; all-zero is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid cpu_set_t and CPU_SET bounds-checks `cpu`.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    set_affinity(&set)
}

/// The calling thread's CPU affinity, to put back after the bench pinned it.
pub struct SavedAffinity(libc::cpu_set_t);

impl SavedAffinity {
    /// Reads the calling thread's affinity.
    pub fn save() -> std::io::Result<Self> {
        // SAFETY: cpu_set_t is plain old data; all-zero is the empty set.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        // SAFETY: `set` is writable and its size is passed; pid 0 is this thread.
        let rc = unsafe { libc::sched_getaffinity(0, std::mem::size_of_val(&set), &mut set) };
        if rc == 0 {
            Ok(Self(set))
        } else {
            Err(std::io::Error::last_os_error())
        }
    }

    /// Puts the saved affinity back on the calling thread.
    pub fn restore(&self) -> std::io::Result<()> {
        set_affinity(&self.0)
    }
}

/// Lets the calling thread (and children it starts later) run on every online CPU.
pub fn unpin() -> std::io::Result<()> {
    // SAFETY: cpu_set_t is plain old data; all-zero is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for cpu in 0..cpu_count() {
        // SAFETY: `set` is a valid cpu_set_t and CPU_SET bounds-checks `cpu`.
        unsafe { libc::CPU_SET(cpu, &mut set) };
    }
    set_affinity(&set)
}

fn set_affinity(set: &libc::cpu_set_t) -> std::io::Result<()> {
    // SAFETY: `set` is initialised and its size is passed; pid 0 is this thread.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of_val(set), set) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The load averages (1, 5, 15 minutes) from `/proc/loadavg`.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "unknown".into())
}
