//! The targets of issue 5, checked against one run's numbers.

use std::fmt::Write as _;

use crate::report::{find, Report, Row, Throughput};

/// One target and where the run stands.
#[derive(Debug, Clone)]
pub struct Target {
    /// The target, in words.
    pub target: String,
    /// The numbers it was judged on.
    pub measured: String,
    /// Met, missed, or `None` when the run lacks a number it needs.
    pub met: Option<bool>,
}

fn p50(r: Option<&Row>) -> Option<f64> {
    r.map(|r| r.stats.p50 as f64 / 1e3)
}

fn rate(report: &Report, name: &str, api: &str, size: usize) -> Option<f64> {
    report
        .tputs
        .iter()
        .find(|t| t.name == name && t.api == api && t.size == size)
        .map(Throughput::msgs_per_sec)
}

fn shmhub<'a>(
    rows: &'a [Row],
    api: &str,
    size: usize,
    touched: bool,
    mode: &str,
) -> Option<&'a Row> {
    rows.iter().find(|r| {
        r.name == "shmhub"
            && r.api == api
            && r.size == size
            && r.touched == touched
            && r.mode == mode
    })
}

/// A ratio target: `ok(ours / base)`.
fn check(
    target: &str,
    ours: Option<f64>,
    base: Option<f64>,
    what: (&str, &str, &str),
    ok: impl Fn(f64) -> bool,
) -> Target {
    let (ours_label, base_label, unit) = what;
    match (ours, base) {
        (Some(o), Some(b)) => {
            let r = o / b;
            Target {
                target: target.into(),
                measured: format!(
                    "{ours_label} {o:.2} {unit} vs {base_label} {b:.2} {unit}: {r:.2}x"
                ),
                met: Some(ok(r)),
            }
        }
        _ => Target {
            target: target.into(),
            measured: format!("not measured in this run ({ours_label} or {base_label} missing)"),
            met: None,
        },
    }
}

/// Every target, judged on `report`.
pub fn evaluate(report: &Report) -> Vec<Target> {
    let rows = &report.rows;
    let mut out = Vec::new();
    let spin8 = p50(shmhub(rows, "copy", 8, false, "spin"));
    out.push(check(
        "spin 8 B round trip ≤ 1.3x the raw spin floor (p50)",
        spin8,
        p50(find(rows, "raw-spin", 8, false, "spin")),
        ("shmhub copy", "raw-spin", "µs"),
        |r| r <= 1.3,
    ));
    out.push(check(
        "spin 8 B round trip below iceoryx2 spinning (p50)",
        spin8,
        p50(find(rows, "iceoryx2", 8, false, "spin")),
        ("shmhub copy", "iceoryx2", "µs"),
        |r| r < 1.0,
    ));
    let block8 = p50(shmhub(rows, "copy", 8, false, "block"));
    out.push(check(
        "blocking 8 B round trip ≤ 1.2x the raw futex floor (p50)",
        block8,
        p50(find(rows, "raw-futex", 8, false, "block")),
        ("shmhub copy", "raw-futex", "µs"),
        |r| r <= 1.2,
    ));
    out.push(check(
        "blocking 8 B round trip ≤ 0.5x a Unix socketpair (p50)",
        block8,
        p50(find(rows, "socketpair", 8, false, "block")),
        ("shmhub copy", "socketpair", "µs"),
        |r| r <= 0.5,
    ));
    let stream64 = rate(report, "shmhub", "copy", 64).map(|r| r / 1e6);
    out.push(check(
        "64 B one-way stream ≥ 50% of a raw SPSC ring (msg/s)",
        stream64,
        rate(report, "raw-ring", "memfd", 64).map(|r| r / 1e6),
        ("shmhub copy", "raw-ring", "M msg/s"),
        |r| r >= 0.5,
    ));
    out.push(check(
        "64 B one-way stream ≥ 10x a Unix socketpair (msg/s)",
        stream64,
        rate(report, "socketpair", "write/read", 64).map(|r| r / 1e6),
        ("shmhub copy", "socketpair", "M msg/s"),
        |r| r >= 10.0,
    ));
    // Throughput of a round trip is the inverse of its latency: floor / ours.
    let mib = 1 << 20;
    let touched1m = p50(shmhub(rows, "loan", mib, true, "spin"));
    out.push(check(
        "1 MiB touched round trip ≥ 0.8x the raw echo hand-off's throughput (floor p50 / ours)",
        p50(find(rows, "raw-echo", mib, true, "spin")),
        touched1m,
        ("raw-echo", "shmhub loan", "µs"),
        |r| r >= 0.8,
    ));
    out.push(check(
        "1 MiB touched round trip ≥ 5x a Unix socketpair's throughput (socketpair p50 / ours)",
        p50(find(rows, "socketpair", mib, true, "block")),
        touched1m,
        ("socketpair", "shmhub loan", "µs"),
        |r| r >= 5.0,
    ));
    for mode in ["block", "adaptive"] {
        let cost = |n: usize| {
            report
                .scaling
                .iter()
                .find(|s| s.mode == mode && s.guests == n)
                .map(|s| s.ns_per_round_trip() / 1e3)
        };
        out.push(check(
            &format!("64 guests: cost per round trip ≤ 1.3x one guest's ({mode})"),
            cost(64),
            cost(1),
            ("64 guests", "1 guest", "µs"),
            |r| r <= 1.3,
        ));
    }
    let gib = report.rss.iter().find(|r| r.total_size >= 1 << 30);
    out.push(match gib {
        Some(r) => Target {
            target: "fresh 1 GiB segment: host RSS grows < 2 MiB".into(),
            measured: format!("VmRSS +{} KiB", r.delta_kib()),
            met: Some(r.delta_kib() < 2048),
        },
        None => Target {
            target: "fresh 1 GiB segment: host RSS grows < 2 MiB".into(),
            measured: "not measured in this run".into(),
            met: None,
        },
    });
    out
}

/// The targets as a Markdown table.
pub fn markdown(report: &Report) -> String {
    let mut s = String::from("| target | this run | status |\n|---|---|---|\n");
    for t in evaluate(report) {
        let status = match t.met {
            Some(true) => "met",
            Some(false) => "missed",
            None => "not measured",
        };
        let _ = writeln!(s, "| {} | {} | {status} |", t.target, t.measured);
    }
    s
}
