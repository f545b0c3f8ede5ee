//! The results: a Markdown table and hand-written JSON.

use std::fmt::Write as _;

use crate::machine::Machine;
use crate::measure::Stats;

/// One latency measurement.
#[derive(Debug, Clone)]
pub struct Row {
    /// What was measured (`shmhub`, `raw-spin`, `socketpair`, ...).
    pub name: String,
    /// Payload bytes.
    pub size: usize,
    /// Wait mode (`spin`, `block`, `adaptive`).
    pub mode: String,
    /// Whether sender and receiver touched every byte.
    pub touched: bool,
    /// Round-trip percentiles (ns).
    pub stats: Stats,
}

impl Row {
    /// A row.
    pub fn new(name: &str, size: usize, mode: &str, touched: bool, stats: Stats) -> Self {
        Self {
            name: name.into(),
            size,
            mode: mode.into(),
            touched,
            stats,
        }
    }
}

/// One one-way throughput measurement.
#[derive(Debug, Clone)]
pub struct Throughput {
    /// What was measured.
    pub name: String,
    /// Payload bytes per message.
    pub size: usize,
    /// Messages sent.
    pub msgs: u64,
    /// Wall time, first send to the receiver's count coming back.
    pub secs: f64,
}

impl Throughput {
    /// A measurement.
    pub fn new(name: &str, size: usize, msgs: u64, secs: f64) -> Self {
        Self {
            name: name.into(),
            size,
            msgs,
            secs,
        }
    }

    fn msgs_per_sec(&self) -> f64 {
        self.msgs as f64 / self.secs
    }

    fn gb_per_sec(&self) -> f64 {
        self.msgs as f64 * self.size as f64 / self.secs / 1e9
    }
}

/// Everything one run produced.
pub struct Report {
    /// The machine.
    pub machine: Machine,
    /// Whether this was a `--quick` run.
    pub quick: bool,
    /// Round trips.
    pub rows: Vec<Row>,
    /// One-way throughput.
    pub tputs: Vec<Throughput>,
}

/// The floor a row is compared with: the raw buffer hand-off of the same size for
/// touched spin rows when there is one, else the raw spin (spin, adaptive) or raw
/// futex (block) ping-pong.
fn floor<'a>(rows: &'a [Row], r: &Row) -> Option<&'a Row> {
    let find = |name: &str, size: Option<usize>| {
        rows.iter()
            .find(|x| x.name == name && size.map_or(true, |s| x.size == s))
    };
    if r.touched && r.mode != "block" {
        if let Some(b) = find("raw-buf", Some(r.size)) {
            return Some(b);
        }
    }
    if r.mode == "block" {
        find("raw-futex", None)
    } else {
        find("raw-spin", None)
    }
}

fn socketpair<'a>(rows: &'a [Row], r: &Row) -> Option<&'a Row> {
    rows.iter()
        .find(|x| x.name == "socketpair" && x.size == r.size)
}

fn ratio(a: u64, b: Option<&Row>) -> Option<f64> {
    b.map(|b| a as f64 / b.stats.p50.max(1) as f64)
}

fn size_label(size: usize) -> String {
    match size {
        s if s >= 1 << 20 && s % (1 << 20) == 0 => format!("{} MiB", s >> 20),
        s if s >= 1024 && s % 1024 == 0 => format!("{} KiB", s >> 10),
        s => format!("{s} B"),
    }
}

fn us(ns: u64) -> String {
    format!("{:.2}", ns as f64 / 1e3)
}

fn opt(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.2}"))
}

impl Report {
    /// The Markdown report.
    pub fn markdown(&self) -> String {
        let mut s = String::new();
        let kind = if self.quick { "quick" } else { "full" };
        let _ = writeln!(s, "# shm-bench ({kind} run)\n");
        s.push_str(&self.machine.markdown());
        let _ = writeln!(
            s,
            "\nRound trips (parent -> child -> parent), microseconds. `x floor`: p50 over \
             the p50 of the matching floor (raw-buf of the same size for touched spin \
             rows, else raw-spin for spin/adaptive rows, raw-futex for block rows); \
             `x socketpair`: p50 over the socketpair p50 of the same size.\n"
        );
        s.push_str(
            "| name | size | mode | touched | samples | p50 | p90 | p99 | p99.9 | max | floor | x floor | x socketpair |\n",
        );
        s.push_str("|---|---:|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|\n");
        for r in &self.rows {
            let f = floor(&self.rows, r);
            let st = r.stats;
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                r.name,
                size_label(r.size),
                r.mode,
                if r.touched { "yes" } else { "no" },
                st.count,
                us(st.p50),
                us(st.p90),
                us(st.p99),
                us(st.p999),
                us(st.max),
                f.map_or("-".into(), |f| format!("{} {}", f.name, size_label(f.size))),
                opt(ratio(st.p50, f)),
                opt(ratio(st.p50, socketpair(&self.rows, r))),
            );
        }
        if !self.tputs.is_empty() {
            s.push_str("\nOne-way throughput (sender spins on a full ring / blocks in write; ends when the receiver's count comes back).\n\n");
            s.push_str("| name | size | messages | seconds | msg/s | GB/s |\n");
            s.push_str("|---|---:|---:|---:|---:|---:|\n");
            for t in &self.tputs {
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {:.3} | {:.0} | {:.2} |",
                    t.name,
                    size_label(t.size),
                    t.msgs,
                    t.secs,
                    t.msgs_per_sec(),
                    t.gb_per_sec()
                );
            }
        }
        s
    }

    /// The JSON report (written by hand: no serde).
    pub fn json(&self) -> String {
        let m = &self.machine;
        let mut s = String::from("{\n");
        let _ = writeln!(s, "  \"quick\": {},", self.quick);
        let _ = writeln!(s, "  \"machine\": {{");
        let _ = writeln!(s, "    \"cpu_model\": {},", json_str(&m.cpu_model));
        let _ = writeln!(s, "    \"cpus\": {},", m.cpus);
        let smt = m.smt.map_or("null".into(), |b| b.to_string());
        let _ = writeln!(s, "    \"smt\": {smt},");
        let _ = writeln!(s, "    \"vm\": {},", m.vm);
        let _ = writeln!(s, "    \"kernel\": {},", json_str(&m.kernel));
        let pin = m
            .pinning
            .map_or("null".into(), |(p, c)| format!("[{p}, {c}]"));
        let _ = writeln!(s, "    \"pinned_cpus\": {pin}");
        s.push_str("  },\n  \"rows\": [\n");
        for (i, r) in self.rows.iter().enumerate() {
            let f = floor(&self.rows, r);
            let st = r.stats;
            let _ = write!(
                s,
                "    {{\"name\": {}, \"size\": {}, \"mode\": {}, \"touched\": {}, \"samples\": {}, \
                 \"p50_ns\": {}, \"p90_ns\": {}, \"p99_ns\": {}, \"p99_9_ns\": {}, \"max_ns\": {}, \
                 \"floor\": {}, \"p50_over_floor\": {}, \"p50_over_socketpair\": {}}}",
                json_str(&r.name),
                r.size,
                json_str(&r.mode),
                r.touched,
                st.count,
                st.p50,
                st.p90,
                st.p99,
                st.p999,
                st.max,
                f.map_or("null".into(), |f| json_str(&format!("{} {}", f.name, f.size))),
                json_num(ratio(st.p50, f)),
                json_num(ratio(st.p50, socketpair(&self.rows, r))),
            );
            s.push_str(if i + 1 < self.rows.len() { ",\n" } else { "\n" });
        }
        s.push_str("  ],\n  \"throughput\": [\n");
        for (i, t) in self.tputs.iter().enumerate() {
            let _ = write!(
                s,
                "    {{\"name\": {}, \"size\": {}, \"messages\": {}, \"seconds\": {:.6}, \
                 \"msgs_per_sec\": {:.1}, \"gb_per_sec\": {:.4}}}",
                json_str(&t.name),
                t.size,
                t.msgs,
                t.secs,
                t.msgs_per_sec(),
                t.gb_per_sec()
            );
            s.push_str(if i + 1 < self.tputs.len() {
                ",\n"
            } else {
                "\n"
            });
        }
        s.push_str("  ]\n}\n");
        s
    }
}

fn json_num(v: Option<f64>) -> String {
    match v {
        Some(v) if v.is_finite() => format!("{v:.4}"),
        _ => "null".into(),
    }
}

fn json_str(v: &str) -> String {
    let mut s = String::from("\"");
    for c in v.chars() {
        match c {
            '"' => s.push_str("\\\""),
            '\\' => s.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(s, "\\u{:04x}", c as u32);
            }
            c => s.push(c),
        }
    }
    s.push('"');
    s
}
