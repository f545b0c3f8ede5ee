//! The results: Markdown tables and hand-written JSON.

use std::fmt::Write as _;

use crate::machine::Machine;
use crate::measure::Stats;
use crate::scaling::Scale;
use crate::setup::{SegmentRss, SetupCost};

/// One latency measurement.
#[derive(Debug, Clone)]
pub struct Row {
    /// What was measured (`shmhub`, `raw-spin`, `socketpair`, `iceoryx2`, ...).
    pub name: String,
    /// How the payload travels (`copy`, `loan`, `memfd`, `write/read`, ...).
    pub api: String,
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
    pub fn new(
        name: &str,
        api: &str,
        size: usize,
        mode: &str,
        touched: bool,
        stats: Stats,
    ) -> Self {
        Self {
            name: name.into(),
            api: api.into(),
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
    /// How the payload travels.
    pub api: String,
    /// Payload bytes per message.
    pub size: usize,
    /// Messages sent.
    pub msgs: u64,
    /// Wall time, first send to the receiver's count coming back.
    pub secs: f64,
}

impl Throughput {
    /// A measurement.
    pub fn new(name: &str, api: &str, size: usize, msgs: u64, secs: f64) -> Self {
        Self {
            name: name.into(),
            api: api.into(),
            size,
            msgs,
            secs,
        }
    }

    /// Messages per second.
    pub fn msgs_per_sec(&self) -> f64 {
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
    /// `/proc/loadavg` (1, 5 and 15 minutes) when the run started and ended.
    pub load: (String, String),
    /// Wall time of the whole run, seconds.
    pub secs: f64,
    /// Round trips.
    pub rows: Vec<Row>,
    /// One-way throughput.
    pub tputs: Vec<Throughput>,
    /// Many guests against one host.
    pub scaling: Vec<Scale>,
    /// Attach and spawn latencies.
    pub setup: Vec<SetupCost>,
    /// Host memory of fresh segments.
    pub rss: Vec<SegmentRss>,
}

/// The floor a row is compared with: the echo hand-off of the same size for touched
/// spin and adaptive rows, else the raw spin (spin, adaptive) or raw futex (block)
/// ping-pong.
pub fn floor<'a>(rows: &'a [Row], r: &Row) -> Option<&'a Row> {
    if r.touched && r.mode != "block" {
        if let Some(b) = find(rows, "raw-echo", r.size, true, "spin") {
            return Some(b);
        }
    }
    let name = if r.mode == "block" {
        "raw-futex"
    } else {
        "raw-spin"
    };
    rows.iter().find(|x| x.name == name)
}

/// The first row of `name` with this size, touch and mode.
pub fn find<'a>(
    rows: &'a [Row],
    name: &str,
    size: usize,
    touched: bool,
    mode: &str,
) -> Option<&'a Row> {
    rows.iter()
        .find(|x| x.name == name && x.size == size && x.touched == touched && x.mode == mode)
}

/// The baseline row of `name` to compare `r` with: same size and touch; kernel
/// streams only block, iceoryx2 spins or blocks as `r` does (adaptive: spin).
fn baseline<'a>(rows: &'a [Row], name: &str, r: &Row) -> Option<&'a Row> {
    let mode = match name {
        "iceoryx2" if r.mode == "block" => "block",
        "iceoryx2" => "spin",
        _ => "block",
    };
    find(rows, name, r.size, r.touched, mode)
}

fn ratio(a: u64, b: Option<&Row>) -> Option<f64> {
    b.map(|b| a as f64 / b.stats.p50.max(1) as f64)
}

/// `8 B`, `4 KiB`, `16 MiB`.
pub fn size_label(size: usize) -> String {
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

const BASELINES: [&str; 3] = ["socketpair", "pipe", "iceoryx2"];

impl Report {
    /// The Markdown report.
    pub fn markdown(&self) -> String {
        let mut s = String::new();
        let kind = if self.quick { "quick" } else { "full" };
        let _ = writeln!(s, "# shm-bench ({kind} run, {:.0} s)\n", self.secs);
        s.push_str(&self.machine.markdown());
        let _ = writeln!(
            s,
            "- Load average (1/5/15 min) at start: {}; at end: {}",
            self.load.0, self.load.1
        );
        s.push_str("\n## Targets\n\n");
        s.push_str(&crate::targets::markdown(self));
        self.round_trip_table(&mut s);
        self.throughput_table(&mut s);
        self.scaling_table(&mut s);
        self.setup_tables(&mut s);
        s
    }

    fn round_trip_table(&self, s: &mut String) {
        s.push_str(
            "\n## Round trips\n\nParent -> child -> parent, microseconds. `x floor`: p50 over \
             the p50 of the floor named (raw-echo of the same size for touched spin and \
             adaptive rows, raw-spin for other spin/adaptive rows, raw-futex for block \
             rows). `x socketpair`, `x pipe`: p50 over the p50 of that baseline at the \
             same size and touch (they always block). `x iceoryx2`: over iceoryx2 at the \
             same size and touch, spinning for spin/adaptive rows, blocking for block \
             rows. Below 1 means faster.\n\n",
        );
        s.push_str(
            "| name | api | size | mode | touched | samples | p50 | p90 | p99 | p99.9 | max | floor | x floor | x socketpair | x pipe | x iceoryx2 |\n",
        );
        s.push_str(
            "|---|---|---:|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|\n",
        );
        for r in &self.rows {
            let f = floor(&self.rows, r);
            let st = r.stats;
            let _ = write!(
                s,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                r.name,
                r.api,
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
            );
            for b in BASELINES {
                let _ = write!(s, " {} |", opt(ratio(st.p50, baseline(&self.rows, b, r))));
            }
            s.push('\n');
        }
    }

    fn throughput_table(&self, s: &mut String) {
        if self.tputs.is_empty() {
            return;
        }
        s.push_str(
            "\n## One-way throughput\n\nThe sender spins on a full ring (blocks in `write` \
             for the socket pair); the run ends when the receiver's count comes back. The \
             receiver copies every payload out. `x raw-ring`, `x socketpair`: msg/s over \
             that baseline's msg/s at the same size.\n\n",
        );
        s.push_str("| name | api | size | messages | seconds | msg/s | GB/s | x raw-ring | x socketpair |\n");
        s.push_str("|---|---|---:|---:|---:|---:|---:|---:|---:|\n");
        let rate = |name: &str, size: usize| {
            self.tputs
                .iter()
                .find(|t| t.name == name && t.size == size)
                .map(Throughput::msgs_per_sec)
        };
        for t in &self.tputs {
            let over = |b: Option<f64>| b.map(|b| t.msgs_per_sec() / b);
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {:.3} | {:.0} | {:.2} | {} | {} |",
                t.name,
                t.api,
                size_label(t.size),
                t.msgs,
                t.secs,
                t.msgs_per_sec(),
                t.gb_per_sec(),
                opt(over(rate("raw-ring", t.size))),
                opt(over(rate("socketpair", t.size))),
            );
        }
    }

    fn scaling_table(&self, s: &mut String) {
        if self.scaling.is_empty() {
            return;
        }
        s.push_str(
            "\n## Scaling\n\nN guest processes each make 8 B round trips (`copy` API) to \
             one single-threaded host, all at once. Nothing is pinned: with N guests on \
             this machine's CPUs they share them with the host. Nobody spins: `block` \
             parks at once, `adaptive` (the default policy) spins briefly then parks. \
             `µs per round trip`: wall time from the start signal to the last echo over \
             all round trips (the host's cost per message served); `x 1 guest`: over the \
             same mode with one guest. Percentiles: each round trip as its guest saw it \
             (µs).\n\n",
        );
        s.push_str("| guests | mode | round trips | seconds | µs per round trip | x 1 guest | p50 | p90 | p99 | p99.9 | max |\n");
        s.push_str("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
        for x in &self.scaling {
            let one = self
                .scaling
                .iter()
                .find(|o| o.mode == x.mode && o.guests == 1)
                .map(|o| x.ns_per_round_trip() / o.ns_per_round_trip());
            let st = x.stats;
            let _ = writeln!(
                s,
                "| {} | {} | {} | {:.3} | {:.2} | {} | {} | {} | {} | {} | {} |",
                x.guests,
                x.mode,
                x.round_trips,
                x.secs,
                x.ns_per_round_trip() / 1e3,
                opt(one),
                us(st.p50),
                us(st.p90),
                us(st.p99),
                us(st.p999),
                us(st.max),
            );
        }
    }

    fn setup_tables(&self, s: &mut String) {
        if !self.setup.is_empty() {
            s.push_str("\n## Setup costs\n\nMicroseconds. The guest attaching by path runs pinned like the round-trip children; spawned guests too (the spawn includes `fork`/`exec` of this binary).\n\n");
            s.push_str(
                "| step | samples | p50 | p90 | p99 | max |\n|---|---:|---:|---:|---:|---:|\n",
            );
            for c in &self.setup {
                let st = c.stats;
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {} | {} | {} |",
                    c.what,
                    st.count,
                    us(st.p50),
                    us(st.p90),
                    us(st.p99),
                    us(st.max)
                );
            }
        }
        if !self.rss.is_empty() {
            s.push_str("\nHost memory around `ShmHost::create` of a fresh file-backed segment (`/proc/self/status`, KiB; `RssShmem` is the shared-memory part of `VmRSS`).\n\n");
            s.push_str("| segment | total size | create (ms) | VmRSS before | VmRSS after | VmRSS delta | RssShmem delta | /dev/shm used delta |\n");
            s.push_str("|---|---:|---:|---:|---:|---:|---:|---:|\n");
            for r in &self.rss {
                let _ = writeln!(
                    s,
                    "| {} | {} | {:.1} | {} | {} | {} | {} | {} |",
                    r.label,
                    size_label_u64(r.total_size),
                    r.create.as_secs_f64() * 1e3,
                    r.rss_kib.0,
                    r.rss_kib.1,
                    r.delta_kib(),
                    r.shmem_kib.1 as i64 - r.shmem_kib.0 as i64,
                    r.dev_shm_kib,
                );
            }
        }
    }

    /// The JSON report (written by hand: no serde).
    pub fn json(&self) -> String {
        let m = &self.machine;
        let mut s = String::from("{\n");
        let _ = writeln!(s, "  \"quick\": {},", self.quick);
        let _ = writeln!(s, "  \"seconds\": {:.1},", self.secs);
        let _ = writeln!(
            s,
            "  \"loadavg\": [{}, {}],",
            json_str(&self.load.0),
            json_str(&self.load.1)
        );
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
        s.push_str("  },\n");
        let rows: Vec<String> = self
            .rows
            .iter()
            .map(|r| {
                let f = floor(&self.rows, r);
                let st = r.stats;
                let mut o = format!(
                    "{{\"name\": {}, \"api\": {}, \"size\": {}, \"mode\": {}, \"touched\": {}, {}, \
                     \"floor\": {}, \"p50_over_floor\": {}",
                    json_str(&r.name),
                    json_str(&r.api),
                    r.size,
                    json_str(&r.mode),
                    r.touched,
                    json_stats(&st),
                    f.map_or("null".into(), |f| json_str(&format!("{} {}", f.name, f.size))),
                    json_num(ratio(st.p50, f)),
                );
                for b in BASELINES {
                    let v = json_num(ratio(st.p50, baseline(&self.rows, b, r)));
                    let _ = write!(o, ", \"p50_over_{b}\": {v}");
                }
                o.push('}');
                o
            })
            .collect();
        json_array(&mut s, "rows", &rows);
        let tputs: Vec<String> = self
            .tputs
            .iter()
            .map(|t| {
                format!(
                    "{{\"name\": {}, \"api\": {}, \"size\": {}, \"messages\": {}, \"seconds\": {:.6}, \
                     \"msgs_per_sec\": {:.1}, \"gb_per_sec\": {:.4}}}",
                    json_str(&t.name),
                    json_str(&t.api),
                    t.size,
                    t.msgs,
                    t.secs,
                    t.msgs_per_sec(),
                    t.gb_per_sec()
                )
            })
            .collect();
        json_array(&mut s, "throughput", &tputs);
        let scaling: Vec<String> = self
            .scaling
            .iter()
            .map(|x| {
                format!(
                    "{{\"guests\": {}, \"mode\": {}, \"round_trips\": {}, \"seconds\": {:.6}, \
                     \"ns_per_round_trip\": {:.1}, {}}}",
                    x.guests,
                    json_str(&x.mode),
                    x.round_trips,
                    x.secs,
                    x.ns_per_round_trip(),
                    json_stats(&x.stats)
                )
            })
            .collect();
        json_array(&mut s, "scaling", &scaling);
        let setup: Vec<String> = self
            .setup
            .iter()
            .map(|c| {
                format!(
                    "{{\"what\": {}, {}}}",
                    json_str(&c.what),
                    json_stats(&c.stats)
                )
            })
            .collect();
        json_array(&mut s, "setup", &setup);
        let rss: Vec<String> = self
            .rss
            .iter()
            .map(|r| {
                format!(
                    "{{\"segment\": {}, \"total_size\": {}, \"create_ms\": {:.3}, \
                     \"vmrss_kib\": [{}, {}], \"rssshmem_kib\": [{}, {}], \"dev_shm_used_kib\": {}}}",
                    json_str(&r.label),
                    r.total_size,
                    r.create.as_secs_f64() * 1e3,
                    r.rss_kib.0,
                    r.rss_kib.1,
                    r.shmem_kib.0,
                    r.shmem_kib.1,
                    r.dev_shm_kib
                )
            })
            .collect();
        json_array(&mut s, "segment_rss", &rss);
        let targets: Vec<String> = crate::targets::evaluate(self)
            .iter()
            .map(|t| {
                let met = t.met.map_or("null".into(), |b| b.to_string());
                format!(
                    "{{\"target\": {}, \"measured\": {}, \"met\": {met}}}",
                    json_str(&t.target),
                    json_str(&t.measured)
                )
            })
            .collect();
        s.push_str("  \"targets\": [\n");
        s.push_str(&targets.join(",\n"));
        s.push_str("\n  ]\n}\n");
        s
    }
}

fn size_label_u64(size: u64) -> String {
    let mib = size as f64 / f64::from(1u32 << 20);
    if mib >= 1024.0 {
        format!("{:.2} GiB", mib / 1024.0)
    } else {
        format!("{mib:.1} MiB")
    }
}

fn json_array(s: &mut String, key: &str, items: &[String]) {
    let _ = writeln!(s, "  \"{key}\": [");
    for (i, item) in items.iter().enumerate() {
        s.push_str("    ");
        s.push_str(item);
        s.push_str(if i + 1 < items.len() { ",\n" } else { "\n" });
    }
    s.push_str("  ],\n");
}

fn json_stats(st: &Stats) -> String {
    format!(
        "\"samples\": {}, \"p50_ns\": {}, \"p90_ns\": {}, \"p99_ns\": {}, \"p99_9_ns\": {}, \"max_ns\": {}",
        st.count, st.p50, st.p90, st.p99, st.p999, st.max
    )
}

fn json_num(v: Option<f64>) -> String {
    match v {
        Some(v) if v.is_finite() => format!("{v:.4}"),
        _ => "null".into(),
    }
}

/// A JSON string literal.
pub fn json_str(v: &str) -> String {
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
