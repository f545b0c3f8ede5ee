//! The round-trip plot: p50 latency against payload size, log-log, as hand-written
//! SVG.

use std::fmt::Write as _;

use crate::report::{size_label, Report, Row};

/// One line of the plot.
struct Series {
    label: &'static str,
    color: &'static str,
    dashed: bool,
    pick: fn(&Row) -> bool,
}

const SERIES: [Series; 10] = [
    Series {
        label: "shmhub spin, touched (loan)",
        color: "#d62728",
        dashed: false,
        pick: |r| r.name == "shmhub" && r.api == "loan" && r.mode == "spin" && r.touched,
    },
    Series {
        label: "shmhub spin, untouched (loan)",
        color: "#ff9896",
        dashed: false,
        pick: |r| r.name == "shmhub" && r.api == "loan" && r.mode == "spin" && !r.touched,
    },
    Series {
        label: "shmhub block, untouched (copy)",
        color: "#d62728",
        dashed: true,
        pick: |r| r.name == "shmhub" && r.api == "copy" && r.mode == "block" && !r.touched,
    },
    Series {
        label: "raw-echo floor, touched",
        color: "#000000",
        dashed: false,
        pick: |r| r.name == "raw-echo",
    },
    Series {
        label: "raw-spin floor, 8 B",
        color: "#7f7f7f",
        dashed: false,
        pick: |r| r.name == "raw-spin",
    },
    Series {
        label: "raw-futex floor, 8 B",
        color: "#7f7f7f",
        dashed: true,
        pick: |r| r.name == "raw-futex",
    },
    Series {
        label: "socketpair, touched",
        color: "#1f77b4",
        dashed: true,
        pick: |r| r.name == "socketpair" && r.touched,
    },
    Series {
        label: "pipe, touched",
        color: "#2ca02c",
        dashed: true,
        pick: |r| r.name == "pipe" && r.touched,
    },
    Series {
        label: "iceoryx2 spin, touched",
        color: "#9467bd",
        dashed: false,
        pick: |r| r.name == "iceoryx2" && r.mode == "spin" && r.touched,
    },
    Series {
        label: "iceoryx2 block, untouched",
        color: "#9467bd",
        dashed: true,
        pick: |r| r.name == "iceoryx2" && r.mode == "block" && !r.touched,
    },
];

const W: f64 = 960.0;
const H: f64 = 600.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 290.0;
const TOP: f64 = 50.0;
const BOTTOM: f64 = 60.0;

/// The SVG document.
pub fn svg(report: &Report) -> String {
    let points: Vec<Vec<(usize, f64)>> = SERIES
        .iter()
        .map(|se| {
            let mut p: Vec<(usize, f64)> = report
                .rows
                .iter()
                .filter(|r| (se.pick)(r))
                .map(|r| (r.size, r.stats.p50.max(1) as f64 / 1e3))
                .collect();
            p.sort_by_key(|&(size, _)| size);
            p
        })
        .collect();
    let all = || points.iter().flatten();
    let (min_size, max_size) = all().fold((usize::MAX, 1), |(a, b), &(s, _)| (a.min(s), b.max(s)));
    let (min_us, max_us) = all().fold((f64::MAX, 0.0f64), |(a, b), &(_, v)| (a.min(v), b.max(v)));
    let mut s = String::new();
    let _ = writeln!(
        s,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" viewBox=\"0 0 {W} {H}\" font-family=\"sans-serif\" font-size=\"12\">"
    );
    let _ = writeln!(s, "<rect width=\"{W}\" height=\"{H}\" fill=\"white\"/>");
    let kind = if report.quick {
        "quick run"
    } else {
        "full run"
    };
    let _ = writeln!(
        s,
        "<text x=\"{LEFT}\" y=\"28\" font-size=\"16\">Round-trip latency, p50 ({kind}; parent CPU 0, child CPU 1)</text>"
    );
    if min_size > max_size || min_us > max_us {
        s.push_str("</svg>\n");
        return s;
    }
    let (x0, x1) = (
        (min_size as f64).log2(),
        (max_size as f64).log2().max((min_size as f64).log2() + 1.0),
    );
    let (y0, y1) = (
        min_us.log10().floor(),
        max_us.log10().ceil().max(min_us.log10().floor() + 1.0),
    );
    let (pw, ph) = (W - LEFT - RIGHT, H - TOP - BOTTOM);
    let x = |size: usize| LEFT + ((size as f64).log2() - x0) / (x1 - x0) * pw;
    let y = |us: f64| TOP + ph - (us.log10() - y0) / (y1 - y0) * ph;
    // Axes and grid.
    let _ = writeln!(
        s,
        "<rect x=\"{LEFT}\" y=\"{TOP}\" width=\"{pw}\" height=\"{ph}\" fill=\"none\" stroke=\"#333\"/>"
    );
    let mut sizes: Vec<usize> = all().map(|&(s, _)| s).collect();
    sizes.sort_unstable();
    sizes.dedup();
    for &size in &sizes {
        let xs = x(size);
        let _ = writeln!(
            s,
            "<line x1=\"{xs:.1}\" y1=\"{TOP}\" x2=\"{xs:.1}\" y2=\"{:.1}\" stroke=\"#ddd\"/><text x=\"{xs:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
            TOP + ph,
            TOP + ph + 18.0,
            size_label(size)
        );
    }
    let mut decade = y0 as i32;
    while f64::from(decade) <= y1 {
        let v = 10f64.powi(decade);
        let ys = y(v);
        let label = if v < 1.0 {
            format!("{v}")
        } else {
            format!("{v:.0}")
        };
        let _ = writeln!(
            s,
            "<line x1=\"{LEFT}\" y1=\"{ys:.1}\" x2=\"{:.1}\" y2=\"{ys:.1}\" stroke=\"#ddd\"/><text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{label}</text>",
            LEFT + pw,
            LEFT - 6.0,
            ys + 4.0
        );
        decade += 1;
    }
    let _ = writeln!(
        s,
        "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">payload size (log scale)</text>",
        LEFT + pw / 2.0,
        H - 15.0
    );
    let _ = writeln!(
        s,
        "<text x=\"20\" y=\"{:.1}\" text-anchor=\"middle\" transform=\"rotate(-90 20 {:.1})\">p50 round trip, µs (log scale)</text>",
        TOP + ph / 2.0,
        TOP + ph / 2.0
    );
    // Series and legend.
    let mut legend_y = TOP + 10.0;
    for (se, pts) in SERIES.iter().zip(&points) {
        if pts.is_empty() {
            continue;
        }
        let dash = if se.dashed {
            " stroke-dasharray=\"6 4\""
        } else {
            ""
        };
        let path: Vec<String> = pts
            .iter()
            .map(|&(sz, v)| format!("{:.1},{:.1}", x(sz), y(v)))
            .collect();
        let _ = writeln!(
            s,
            "<polyline points=\"{}\" fill=\"none\" stroke=\"{}\" stroke-width=\"2\"{dash}/>",
            path.join(" "),
            se.color
        );
        for &(sz, v) in pts {
            let _ = writeln!(
                s,
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3.5\" fill=\"{}\"><title>{}: {} {v:.2} µs</title></circle>",
                x(sz),
                y(v),
                se.color,
                se.label,
                size_label(sz)
            );
        }
        let lx = LEFT + pw + 20.0;
        let _ = writeln!(
            s,
            "<line x1=\"{lx:.1}\" y1=\"{legend_y:.1}\" x2=\"{:.1}\" y2=\"{legend_y:.1}\" stroke=\"{}\" stroke-width=\"2\"{dash}/><circle cx=\"{:.1}\" cy=\"{legend_y:.1}\" r=\"3.5\" fill=\"{}\"/><text x=\"{:.1}\" y=\"{:.1}\">{}</text>",
            lx + 30.0,
            se.color,
            lx + 15.0,
            se.color,
            lx + 38.0,
            legend_y + 4.0,
            se.label
        );
        legend_y += 22.0;
    }
    s.push_str("</svg>\n");
    s
}
