//! Hand-written SVG line charts for the simulator's figures: goodput per
//! policy by load (the paper's main figure), TTFT CDFs, average nodes used.

use std::fmt::Write;
use std::path::{Path, PathBuf};

use crate::sim::{SimResult, Summary};

const W: f64 = 640.0;
const H: f64 = 400.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 150.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 50.0;
const COLORS: [&str; 8] = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
];

pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// Text made safe inside XML or HTML elements and quoted attributes.
pub fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A "nice" axis maximum (whose fifths are round too), at least `max`.
fn nice_max(max: f64) -> f64 {
    if max <= 0.0 {
        return 1.0;
    }
    let p = 10f64.powf(max.log10().floor());
    [1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0]
        .into_iter()
        .map(|m| m * p)
        .find(|v| *v >= max)
        .unwrap_or(10.0 * p)
}

pub fn line_chart(
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
    markers: bool,
) -> String {
    let all = series.iter().flat_map(|s| s.points.iter());
    let (xmax, ymax) = all.fold((0.0f64, 0.0f64), |(a, b), p| (a.max(p.0), b.max(p.1)));
    let (xmax, ymax) = (nice_max(xmax), nice_max(ymax));
    let pw = W - LEFT - RIGHT;
    let ph = H - TOP - BOTTOM;
    let sx = |x: f64| LEFT + x / xmax * pw;
    let sy = |y: f64| TOP + ph - y / ymax * ph;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="22" text-anchor="middle" font-size="14">{}</text>"#,
        LEFT + pw / 2.0,
        escape(title)
    );
    for i in 0..=5 {
        let f = i as f64 / 5.0;
        let (x, y) = (sx(f * xmax), sy(f * ymax));
        let _ = writeln!(
            s,
            r##"<line x1="{LEFT}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#ddd"/>"##,
            LEFT + pw
        );
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
            LEFT - 6.0,
            y + 4.0,
            fmt_tick(f * ymax)
        );
        let _ = writeln!(
            s,
            r#"<text x="{x:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            TOP + ph + 18.0,
            fmt_tick(f * xmax)
        );
    }
    let _ = writeln!(
        s,
        r#"<rect x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}" fill="none" stroke="black"/>"#
    );
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{}" text-anchor="middle">{}</text>"#,
        LEFT + pw / 2.0,
        H - 10.0,
        escape(x_label)
    );
    let _ = writeln!(
        s,
        r#"<text x="16" y="{:.1}" text-anchor="middle" transform="rotate(-90 16 {:.1})">{}</text>"#,
        TOP + ph / 2.0,
        TOP + ph / 2.0,
        escape(y_label)
    );
    for (i, ser) in series.iter().enumerate() {
        let c = COLORS[i % COLORS.len()];
        let pts: Vec<String> = ser
            .points
            .iter()
            .map(|p| format!("{:.1},{:.1}", sx(p.0), sy(p.1)))
            .collect();
        let _ = writeln!(
            s,
            r#"<polyline fill="none" stroke="{c}" stroke-width="2" points="{}"/>"#,
            pts.join(" ")
        );
        if markers {
            for p in &ser.points {
                let _ = writeln!(
                    s,
                    r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{c}"/>"#,
                    sx(p.0),
                    sy(p.1)
                );
            }
        }
        let ly = TOP + 10.0 + 18.0 * i as f64;
        let lx = LEFT + pw + 12.0;
        let _ = writeln!(
            s,
            r#"<line x1="{lx}" y1="{ly}" x2="{}" y2="{ly}" stroke="{c}" stroke-width="3"/>"#,
            lx + 20.0
        );
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}">{}</text>"#,
            lx + 26.0,
            ly + 4.0,
            escape(&ser.name)
        );
    }
    s.push_str("</svg>\n");
    s
}

fn fmt_tick(v: f64) -> String {
    if v == v.round() {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

fn by_policy(runs: &[Summary], y: impl Fn(&Summary) -> f64) -> Vec<Series> {
    let mut series: Vec<Series> = Vec::new();
    for r in runs {
        let name = r.policy.name();
        let p = (r.models as f64, y(r));
        match series.iter_mut().find(|s| s.name == name) {
            Some(s) => s.points.push(p),
            None => series.push(Series {
                name: name.to_string(),
                points: vec![p],
            }),
        }
    }
    for s in &mut series {
        s.points.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    series
}

pub fn goodput_chart(runs: &[Summary]) -> String {
    line_chart(
        "Requests meeting SLO",
        "models",
        "SLO-met requests",
        &by_policy(runs, |r| r.slo_met as f64),
        true,
    )
}

pub fn nodes_chart(runs: &[Summary]) -> String {
    line_chart(
        "Average nodes in use",
        "models",
        "nodes",
        &by_policy(runs, |r| r.avg_nodes_in_use),
        true,
    )
}

/// TTFT CDF over all requests of each run (dropped ones never arrive, so a
/// curve tops out at the completed fraction).
pub fn ttft_cdf_chart(results: &[&SimResult]) -> String {
    let series: Vec<Series> = results
        .iter()
        .map(|r| {
            let n = r.summary.requests.max(1) as f64;
            let ttfts = r.ttfts_s();
            let step = (ttfts.len() / 200).max(1);
            let mut points: Vec<(f64, f64)> = vec![(0.0, 0.0)];
            points.extend(
                ttfts
                    .iter()
                    .enumerate()
                    .step_by(step)
                    .map(|(i, t)| (*t, (i + 1) as f64 / n)),
            );
            if let Some(last) = ttfts.last() {
                points.push((*last, ttfts.len() as f64 / n));
            }
            Series {
                name: format!("{} ({} models)", r.summary.policy.name(), r.summary.models),
                points,
            }
        })
        .collect();
    line_chart(
        "TTFT CDF",
        "TTFT (s)",
        "fraction of requests",
        &series,
        false,
    )
}

/// One figure of a run: its file name, caption and SVG.
pub struct Figure {
    pub file: &'static str,
    pub caption: &'static str,
    pub svg: String,
}

/// The figures for `results`: goodput and nodes by load (when there is more
/// than one load), and the TTFT CDF of every policy at the highest load.
pub fn figures(results: &[SimResult]) -> Vec<Figure> {
    let runs: Vec<Summary> = results.iter().map(|r| r.summary.clone()).collect();
    let mut out = Vec::new();
    let max_models = runs.iter().map(|r| r.models).max().unwrap_or(0);
    if runs.iter().any(|r| r.models != max_models) {
        out.push(Figure {
            file: "goodput.svg",
            caption: "Requests that met their SLO, by load (models), per policy",
            svg: goodput_chart(&runs),
        });
        out.push(Figure {
            file: "nodes.svg",
            caption: "Average nodes in use, by load, per policy",
            svg: nodes_chart(&runs),
        });
    }
    let top: Vec<&SimResult> = results
        .iter()
        .filter(|r| r.summary.models == max_models)
        .collect();
    out.push(Figure {
        file: "ttft-cdf.svg",
        caption: "Time to first token (CDF) of every request at the highest load",
        svg: ttft_cdf_chart(&top),
    });
    out
}

/// Writes [`figures`] into `dir`; returns the files written.
pub fn write_figures(dir: &Path, results: &[SimResult]) -> std::io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    figures(results)
        .into_iter()
        .map(|f| {
            let path = dir.join(f.file);
            std::fs::write(&path, f.svg)?;
            Ok(path)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chart_is_well_formed_svg_with_a_legend() {
        let svg = line_chart(
            "t <&>",
            "x",
            "y",
            &[Series {
                name: "a".into(),
                points: vec![(1.0, 2.0), (3.0, 4.0)],
            }],
            true,
        );
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("t &lt;&amp;&gt;"));
        assert_eq!(svg.matches("<circle").count(), 2);
        assert_eq!(nice_max(3.2), 4.0);
        assert_eq!(nice_max(128.0), 150.0);
    }
}
